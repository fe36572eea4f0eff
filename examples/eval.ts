/**
 * The perplexity of a pretrained Mamba on a text file, as Hugging Face's perplexity guide computes it with
 * max_length --seq + 1 and stride --seq (windows of --seq predictions, each id but the first predicted once):
 * the check that a model loaded here scores a text as it does in PyTorch.
 *
 * ```sh
 * deno task eval --model state-spaces/mamba-130m --tokenizer EleutherAI/gpt-neox-20b --data my.txt
 * deno task eval --model tests/fixtures/char-mamba --data data/pride_and_prejudice.txt --seq 256 --batch 8
 * deno task eval --model tests/fixtures/char-mamba --data data/pride_and_prejudice.txt --seq 256 --carry-state
 * ```
 *
 * With --carry-state each window goes on from the model's state after the windows before it: every token is
 * predicted from the whole text before it, in one window's memory.
 *
 * Prints the loss (nats per token), the perplexity and bits per byte of the scored text on stdout, progress
 * and speed on stderr.
 * @module
 */

import { parseArgs } from "node:util";
import { init } from "../core/device.ts";
import { perplexity } from "../mamba/perplexity.ts";
import { ByteTokenizer } from "../mamba/tokenizer.ts";
import { intFlag as int, UsageError, userPath } from "./lib/cli.ts";
import { loadModel, MODEL_OPTIONS, modelFlags, runProgram } from "./lib/model_cli.ts";

const USAGE = `Usage: deno task eval --model <id|folder|url> --data <file> [options]

  --model <s>        hub id (org/name), local folder or URL with config.json + model.safetensors (or
                     pytorch_model.bin)
  --data <file>      UTF-8 text to score (a char model's: any bytes)
  --seq <n>          predictions per window: each token is predicted from at most n before it (all before
                     it with --carry-state) (default 1024)
  --batch <n>        windows per forward pass (default 1)
  --carry-state      each window goes on from the state after the ones before: every token is predicted
                     from all the text before it (windows run one at a time: --batch 1)
  --max-tokens <n>   score the text's first n tokens only (default: all)
  --dtype <s>        how the large weights are stored on the GPU: f32 (default) or bf16 (about half the
                     memory, rounded to nearest even as they load)
  --tokenizer <s>    hub id, folder or URL of the tokenizer (default: the model's own)
  --revision <s>     hub branch, tag or commit (default main)
  --cache-dir <s>    hub cache folder (as for deno task generate)
  -h, --help         this text`;

/** Where {@linkcode main} writes: the result, and progress/statistics. */
export interface EvalIO {
  /** The result lines (default: stdout). */
  out(line: string): void;
  /** Progress, errors and statistics, one line each (default: stderr). */
  err(line: string): void;
}

const STDIO: EvalIO = { out: (l) => console.log(l), err: (l) => console.error(l) };

function parse(argv: string[]) {
  let values;
  try {
    ({ values } = parseArgs({
      args: argv,
      strict: true,
      allowPositionals: false,
      options: {
        ...MODEL_OPTIONS,
        data: { type: "string" },
        seq: { type: "string" },
        batch: { type: "string" },
        "carry-state": { type: "boolean" },
        "max-tokens": { type: "string" },
        help: { type: "boolean", short: "h" },
      },
    }));
  } catch (e) {
    throw new UsageError((e as Error).message);
  }
  if (values.help) return null;
  if (!values.data) throw new UsageError("--data is required");
  const batch = int("batch", values.batch, 1, 1);
  if (values["carry-state"] && batch !== 1) {
    throw new UsageError("--carry-state runs the windows one at a time: --batch must be 1");
  }
  return {
    ...modelFlags(values),
    data: userPath(values.data),
    seq: int("seq", values.seq, 1024, 1),
    batch,
    carryState: values["carry-state"] === true,
    maxTokens: values["max-tokens"] === undefined ? null : int("max-tokens", values["max-tokens"], 0, 2),
  };
}

/** Runs the command line `argv`; returns the exit status (0 ok, 2 usage errors). Other errors throw. */
export async function main(argv: string[], io: EvalIO = STDIO): Promise<number> {
  let a;
  try {
    a = parse(argv);
  } catch (e) {
    if (!(e instanceof UsageError)) throw e;
    io.err(`error: ${e.message}\n(run with --help for the options)`);
    return 2;
  }
  if (a === null) {
    io.out(USAGE);
    return 0;
  }
  // before the model downloads: a missing file says so first, naming what it was for (as train's does)
  const bytes = await Deno.readFile(a.data).catch((e) => {
    throw new Error(`cannot read the text to score ${a.data}: ${(e as Error).message}`);
  });
  await init();
  const lm = await loadModel(a, (line) => io.err(line));
  if (!lm) return 2;
  try {
    const tok = lm.tokenizer!;
    const chars = tok instanceof ByteTokenizer; // a char model: ids are bytes
    // as deno task train reads it: a char model's ids are the file's bytes (a byte-order mark, a text that is
    // not UTF-8: bytes it trained on)
    const text = chars ? "" : new TextDecoder().decode(bytes);
    const all = chars ? (tok as ByteTokenizer).encodeBytes(bytes) : tok.encode(text);
    const ids = a.maxTokens === null ? all : all.slice(0, a.maxTokens);
    if (ids.length < 2) {
      io.err(`error: ${a.data} has ${ids.length} token${ids.length === 1 ? "" : "s"}: at least 2 are needed`);
      return 2;
    }
    const t0 = performance.now();
    let shown = 0;
    const r = await perplexity(lm, ids, {
      seq: a.seq,
      batch: a.batch,
      carryState: a.carryState,
      onProgress: (done, total) => {
        if (done - shown >= total / 10 || done === total) {
          io.err(`${done} / ${total} tokens`);
          shown = done;
        }
      },
    });
    const secs = (performance.now() - t0) / 1000;
    // bytes of the scored tokens' text (all but the first token's): for a char model one per token (decoding
    // would make a character that --max-tokens cuts, or the first token splits, 3 bytes of U+FFFD); else the
    // file's text (a decode's clean-up of spaces, " ." to ".", made it up to a tenth shorter) less the first
    // token's, or where --max-tokens cuts it the decoded tokens' without clean-up
    const utf8 = (s: string) => new TextEncoder().encode(s).length;
    const plain = { skipSpecialTokens: true, cleanUpTokenizationSpaces: false };
    const scored = chars
      ? ids.length - 1
      : (ids.length === all.length ? utf8(text) : utf8(tok.decode(ids, plain))) -
        utf8(tok.decode([ids[0]], plain));
    io.out(
      `loss ${r.loss.toFixed(4)} nats/token, perplexity ${r.perplexity.toFixed(3)}, ` +
        `${(r.nll / Math.LN2 / scored).toFixed(4)} bits/byte`,
    );
    io.err(
      `${r.tokens} tokens predicted in ${r.windows} windows of at most ${a.seq}${
        a.carryState ? ", each from the state after those before" : ""
      } in ${secs.toFixed(2)} s ` +
        `(${(r.tokens / secs).toFixed(0)} tokens/s)`,
    );
    return 0;
  } finally {
    lm.dispose();
  }
}

if (import.meta.main) await runProgram(main);
