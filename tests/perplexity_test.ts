/**
 * `perplexity` and `deno task eval`: the summed negative log-likelihood of a text in windows (every id but the
 * first predicted once, from the ids before it in its window) against float64 log-softmaxes of the same
 * forward's logits, with any batch; bad input named; the command line's result line.
 * @module
 */

import assert from "node:assert/strict";
import { init } from "../core/device.ts";
import { memory } from "../core/memory.ts";
import { noGrad } from "../core/autograd.ts";
import { tidy } from "../core/tensor.ts";
import { perplexity, type PerplexityOptions } from "../mamba/perplexity.ts";
import { fromPretrained } from "../mamba/pretrained.ts";
import { main } from "../examples/eval.ts";
import { fixturePath } from "./fixture_util.ts";

const TEXT =
  "It is a truth universally acknowledged, that a single man in possession of a good fortune, must " +
  "be in want of a wife. However little known the feelings or views of such a man may be";

Deno.test("perplexity: windows of seq predictions, every id but the first once, as float64 log-softmaxes of the logits say", async () => {
  await init();
  const lm = await fromPretrained(fixturePath("char-mamba"));
  const ids = lm.tokenizer!.encode(TEXT);
  const seq = 37; // 180 predictions: 4 windows of 37 and one of 32
  let want = 0;
  for (let at = 0; at < ids.length - 1; at += seq) {
    const L = Math.min(seq, ids.length - 1 - at);
    const t = tidy(() => noGrad(() => lm.forward([ids.slice(at, at + L)])));
    const logits = Float32Array.from(await t.toArray()); // (1, L, V)
    t.dispose();
    const V = lm.vocabSize;
    for (let i = 0; i < L; i++) {
      const row = logits.subarray(i * V, (i + 1) * V);
      const max = Math.max(...row);
      const lse = max + Math.log(row.reduce((s, x) => s + Math.exp(x - max), 0));
      want += lse - row[ids[at + i + 1]];
    }
  }
  const base = memory().liveBytes;
  for (const batch of [1, 3, 8]) {
    const done: number[] = [];
    const r = await perplexity(lm, ids, { seq, batch, onProgress: (d) => done.push(d) });
    assert.equal(r.tokens, ids.length - 1);
    assert.equal(r.windows, 5);
    assert.equal(done.at(-1), r.tokens, `batch ${batch}: progress ends at every token`);
    assert.ok(Math.abs(r.nll - want) <= 1e-5 * want, `batch ${batch}: nll ${r.nll} against ${want}`);
    assert.ok(Math.abs(r.loss - want / r.tokens) <= 1e-5 * r.loss);
    assert.equal(r.perplexity, Math.exp(r.loss));
  }
  assert.equal(memory().liveBytes, base, "nothing left on the GPU");
  await assert.rejects(() => perplexity(lm, [5]), /needs at least 2 ids \(one to predict\), got 1/);
  await assert.rejects(() => perplexity(lm, ids, { seq: 0 }), /seq must be an integer >= 1, got 0/);
  await assert.rejects(
    () => perplexity(lm, ids, { seq, stride: 16 } as PerplexityOptions),
    /unknown option 'stride' \(options are seq, batch, carryState, onProgress\)/,
  );
  await assert.rejects(
    () => perplexity(lm, [1, 2, 999]),
    /id 999 at index 2 is outside the vocabulary \[0, 256\)/,
  );
  lm.dispose();
});

Deno.test("deno task eval prints the loss, perplexity and bits per byte of a text file", async () => {
  await init();
  const dir = await Deno.makeTempDir();
  try {
    const file = `${dir}/text.txt`;
    await Deno.writeTextFile(file, TEXT);
    const run = async (...argv: string[]) => {
      const out: string[] = [], err: string[] = [];
      const code = await main(argv, { out: (l) => out.push(l), err: (l) => err.push(l) });
      return { code, out: out.join("\n"), err: err.join("\n") };
    };
    const char = fixturePath("char-mamba");
    const r = await run("--model", char, "--data", file, "--seq", "50", "--batch", "2");
    assert.equal(r.code, 0, r.err);
    const lm = await fromPretrained(char);
    const ids = lm.tokenizer!.encode(TEXT);
    const want = await perplexity(lm, ids, { seq: 50, batch: 2 });
    lm.dispose();
    // a char model's ids are the bytes: bits per byte = loss / ln 2
    assert.equal(
      r.out,
      `loss ${want.loss.toFixed(4)} nats/token, perplexity ${want.perplexity.toFixed(3)}, ` +
        `${(want.loss / Math.LN2).toFixed(4)} bits/byte`,
    );
    assert.match(r.err, /180 tokens predicted in 4 windows of at most 50 in [\d.]+ s/);
    // --dtype bf16: the bf16 model's numbers
    const bf = await run("--model", char, "--data", file, "--seq", "50", "--dtype", "bf16");
    const half = await fromPretrained(char, { weightDtype: "bf16" });
    const wantBf = await perplexity(half, ids, { seq: 50 });
    half.dispose();
    assert.ok(bf.out.startsWith(`loss ${wantBf.loss.toFixed(4)} nats/token`), bf.out);
    const head = await run("--model", char, "--data", file, "--max-tokens", "20", "--seq", "8");
    assert.match(head.err, /19 tokens predicted in 3 windows of at most 8/);
    // a char model's bytes are its tokens, whatever characters --max-tokens or the first token split (decoding
    // the scored ids made each half character 3 bytes of U+FFFD); a tokenizer that takes any byte reads "é"
    await Deno.mkdir(`${dir}/bytes`);
    await Deno.writeTextFile(
      `${dir}/bytes/tokenizer.json`,
      JSON.stringify({ type: "byte-level characters" }),
    );
    await Deno.writeTextFile(`${dir}/e.txt`, "ééé");
    const cut = await run(
      "--model",
      char,
      "--tokenizer",
      `${dir}/bytes`,
      "--data",
      `${dir}/e.txt`,
      "--max-tokens",
      "3",
    );
    const [loss, bits] = /^loss ([\d.]+) nats\/token, .* ([\d.]+) bits\/byte$/.exec(cut.out)!.slice(1).map(
      Number,
    );
    assert.ok(Math.abs(bits - loss / Math.LN2) < 1e-3, `${cut.out} ${cut.err}`);
    // A byte-level BPE without merges (GPT-2's byte characters, id = byte): a hub tokenizer whose tokens are
    // the bytes too. Its decode cleans up spaces (" ," to ","), which made the scored text shorter than the
    // file's: bits per byte came out too high, here by 3 bytes in 29.
    const byteChars: number[] = [];
    for (let b = 0; b < 256; b++) {
      if ((b >= 33 && b <= 126) || (b >= 161 && b <= 172) || b >= 174) byteChars[b] = b;
    }
    let extra = 0;
    for (let b = 0; b < 256; b++) if (byteChars[b] === undefined) byteChars[b] = 256 + extra++;
    const vocab = Object.fromEntries(byteChars.map((c, b) => [String.fromCharCode(c), b]));
    const byteLevel = { type: "ByteLevel", add_prefix_space: false, trim_offsets: true, use_regex: true };
    await Deno.mkdir(`${dir}/bpe`);
    await Deno.writeTextFile(
      `${dir}/bpe/tokenizer.json`,
      JSON.stringify({
        version: "1.0",
        added_tokens: [],
        normalizer: null,
        pre_tokenizer: byteLevel,
        post_processor: null,
        decoder: byteLevel,
        model: { type: "BPE", vocab, merges: [], unk_token: null, fuse_unk: false, byte_fallback: false },
      }),
    );
    await Deno.writeTextFile(`${dir}/spaced.txt`, "It is , you see ! Is it ? Yes .");
    const bpe = await run("--model", char, "--tokenizer", `${dir}/bpe`, "--data", `${dir}/spaced.txt`);
    const [bLoss, bBits] = /^loss ([\d.]+) nats\/token, .* ([\d.]+) bits\/byte$/.exec(bpe.out)!.slice(1).map(
      Number,
    );
    assert.match(bpe.err, /30 tokens predicted/);
    assert.ok(Math.abs(bBits - bLoss / Math.LN2) < 1e-3, `${bpe.out}: one byte per token`);
    // --carry-state: windows of 50 from the state before score as one window over all 181 ids
    const carried = await run("--model", char, "--data", file, "--seq", "50", "--carry-state");
    const all = await run("--model", char, "--data", file, "--seq", "1024");
    assert.equal(carried.out, all.out);
    assert.notEqual(r.out, all.out);
    assert.match(
      carried.err,
      /180 tokens predicted in 4 windows of at most 50, each from the state after those before/,
    );
    assert.match(
      (await run("--model", char, "--data", file, "--carry-state", "--batch", "2")).err,
      /--carry-state runs the windows one at a time: --batch must be 1/,
    );
    // --batch is compared as a number: 1.0 is 1
    const one = await run("--model", char, "--data", file, "--seq", "50", "--carry-state", "--batch", "1.0");
    assert.equal(one.out, carried.out, one.err);
    // a char model scores a text that is not UTF-8 on its bytes, as deno task train trains on them (decoding
    // made each byte 3 of U+FFFD); bytes it never saw are named
    await Deno.writeFile(`${dir}/latin1.txt`, new Uint8Array([0x49, 0x20, 0xe9, 0x74, 0xe9]));
    const latin1 = await run("--model", char, "--tokenizer", `${dir}/bytes`, "--data", `${dir}/latin1.txt`);
    assert.match(latin1.err, /^4 tokens predicted/m, latin1.out + latin1.err);
    await assert.rejects(
      () => run("--model", char, "--data", `${dir}/latin1.txt`),
      /the text has bytes this tokenizer does not know \(the model never saw them\): 0xE9$/,
    );
    // a relative --data is the user's folder's (deno task's INIT_CWD), not the repository root's
    const cwd = Deno.env.get("INIT_CWD");
    Deno.env.set("INIT_CWD", dir);
    try {
      assert.equal((await run("--model", char, "--data", "e.txt", "--tokenizer", "bytes")).code, 0);
    } finally {
      if (cwd === undefined) Deno.env.delete("INIT_CWD");
      else Deno.env.set("INIT_CWD", cwd);
    }
    assert.equal((await run("--model", char)).code, 2);
    assert.match((await run("--model", char)).err, /--data is required/);
    assert.match(
      (await run("--model", char, "--data", file, "--seq", "0")).err,
      /--seq must be an integer >= 1/,
    );
    await Deno.writeTextFile(file, "I");
    assert.match((await run("--model", char, "--data", file)).err, /has 1 token: at least 2 are needed/);
    await assert.rejects(
      () => run("--model", char, "--data", `${dir}/none.txt`),
      /^Error: cannot read the text to score \S*none\.txt: .*(No such file|not found)/i,
    );
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});
