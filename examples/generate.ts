/**
 * Generates text with a pretrained Mamba and streams it to stdout as it is produced.
 *
 * ```sh
 * deno run -A examples/generate.ts --model state-spaces/mamba-130m-hf --prompt "Mamba is"
 * deno run -A examples/generate.ts --model tests/fixtures/char-mamba --prompt "It is a truth" --greedy
 * ```
 *
 * `--model` is a hub id (downloaded into the Hugging Face cache), a folder or a URL. Tokens are chosen on
 * the GPU (greedy, or sampled with temperature, top-k, top-p and min-p) and read back in batches.
 * Statistics go to stderr.
 * @module
 */

import { parseArgs } from "node:util";
import { init } from "../core/device.ts";
import { ByteTokenizer, StreamDecoder, type Tokenizer } from "../mamba/tokenizer.ts";
import { intFlag as int, UsageError } from "./lib/cli.ts";
import { loadModel, MODEL_OPTIONS, modelFlags, runProgram } from "./lib/model_cli.ts";

const USAGE = `Usage: deno task generate --model <id|folder|url> [options]

  --model <s>        hub id (org/name), local folder or URL with config.json + model.safetensors (or
                     pytorch_model.bin)
  --prompt <s>       text to continue (default: the tokenizer's BOS/EOS token; a char model's: a new line);
                     given several times, one row each, generated at once (rows may differ in length)
  --tokens <n>       new tokens per row (default 100; fewer where a row reaches the end-of-text token)
  --greedy           always take the most likely token (default: sample)
  --temperature <x>  softmax temperature when sampling (default 1)
  --top-k <n>        sample among the k most likely tokens (default 0: all)
  --top-p <x>        nucleus sampling: the smallest set with probability >= x
  --min-p <x>        sample among the tokens at least x times as likely as the most likely one (HF's min_p)
  --seed <n>         sampler seed (default: random, printed to stderr first); not with --greedy
  --repetition-penalty <x>  divide the logits (> 0; multiply the negative ones) of tokens already in the
                     row, prompt included, by x (HF's repetition_penalty; default 1: none; greedy too)
  --batch <n>        rows generated at once from the same prompt (default 1; not with several --prompt)
  --dtype <s>        how the large weights are stored on the GPU: f32 (default) or bf16 (about half the
                     memory, rounded to nearest even as they load)
  --tokenizer <s>    hub id, folder or URL of the tokenizer (default: the model's own)
  --revision <s>     hub branch, tag or commit (default main)
  --cache-dir <s>    hub cache folder (default HF_HUB_CACHE, else HUGGINGFACE_HUB_CACHE, else HF_HOME/hub,
                     else $XDG_CACHE_HOME/huggingface/hub, else ~/.cache/huggingface/hub)
  --read-every <n>   tokens between readbacks while streaming (default 4)
  --prefill-chunk <n>  prompt tokens per forward: a long prompt in chunks, each from the state after those
                     before, in one chunk's memory (default: the whole prompt at once)
  -h, --help         this text`;

function num(
  name: string,
  v: string | undefined,
  ok: (x: number) => boolean,
  what: string,
): number | undefined {
  if (v === undefined) return undefined;
  const x = Number(v);
  if (v.trim() === "" || !Number.isFinite(x) || !ok(x)) {
    throw new UsageError(`--${name} must be ${what}, got '${v}'`);
  }
  return x;
}

function parse(argv: string[]) {
  let values;
  try {
    ({ values } = parseArgs({
      args: argv,
      strict: true,
      allowPositionals: false,
      options: {
        ...MODEL_OPTIONS,
        prompt: { type: "string", multiple: true },
        tokens: { type: "string" },
        greedy: { type: "boolean" },
        temperature: { type: "string" },
        "top-k": { type: "string" },
        "top-p": { type: "string" },
        "min-p": { type: "string" },
        seed: { type: "string" },
        "repetition-penalty": { type: "string" },
        batch: { type: "string" },
        "read-every": { type: "string" },
        "prefill-chunk": { type: "string" },
        help: { type: "boolean", short: "h" },
      },
    }));
  } catch (e) {
    throw new UsageError((e as Error).message);
  }
  if (values.help) return null;
  const temperature = num("temperature", values.temperature, (x) => x > 0, "a number > 0");
  const topP = num("top-p", values["top-p"], (x) => x > 0 && x <= 1, "a number in (0, 1]");
  const topK = int("top-k", values["top-k"], 0, 0, 2 ** 32 - 1);
  const minP = num("min-p", values["min-p"], (x) => x >= 0 && x <= 1, "a number in [0, 1]");
  const repetitionPenalty = num(
    "repetition-penalty",
    values["repetition-penalty"],
    (x) => x > 0,
    "a number > 0",
  );
  const sampling = [
    temperature !== undefined,
    values["top-k"] !== undefined,
    topP !== undefined,
    minP !== undefined,
    values.seed !== undefined,
  ];
  if (values.greedy && sampling.some((given) => given)) {
    throw new UsageError(
      "--greedy takes the most likely token: it does not combine with --temperature/--top-k/--top-p/--min-p/--seed",
    );
  }
  if ((values.prompt?.length ?? 0) > 1 && values.batch !== undefined) {
    throw new UsageError("--batch repeats one prompt: it does not combine with several --prompt");
  }
  return {
    ...modelFlags(values),
    prompts: values.prompt ?? [""],
    tokens: int("tokens", values.tokens, 100, 1),
    greedy: values.greedy ?? false,
    temperature: temperature ?? 1,
    topK,
    topP: topP !== undefined && topP < 1 ? topP : undefined,
    minP: minP ? minP : undefined,
    repetitionPenalty: repetitionPenalty ?? 1,
    seed: values.seed === undefined ? Math.floor(Math.random() * 2 ** 31) : int("seed", values.seed, 0, 0),
    seedDrawn: values.seed === undefined && !values.greedy,
    batch: int("batch", values.batch, 1, 1),
    readEvery: int("read-every", values["read-every"], 4, 1),
    prefillChunk: values["prefill-chunk"] === undefined
      ? Infinity
      : int("prefill-chunk", values["prefill-chunk"], 0, 1),
  };
}

type Args = NonNullable<ReturnType<typeof parse>>;

/** Where {@linkcode main} writes: the text, and messages/statistics. */
export interface GenerateIO {
  /** Generated text (default: stdout, unbuffered). */
  out(text: string): void;
  /** Errors and statistics, one line each (default: stderr). */
  err(line: string): void;
}

const enc = new TextEncoder();
const STDIO: GenerateIO = {
  out(text: string): void {
    const bytes = enc.encode(text);
    for (let done = 0; done < bytes.length;) done += Deno.stdout.writeSync(bytes.subarray(done));
  },
  err: (line: string) => console.error(line),
};

/** The text's reader went away (`| head`): generation stops, quietly. */
class OutputClosed extends Error {}

/** Runs the command line `argv`; returns the exit status (0 ok, or the text's reader closed it; 2 usage
 * errors). Other errors throw. */
export async function main(argv: string[], io: GenerateIO = STDIO): Promise<number> {
  try {
    return await generate(argv, io);
  } catch (e) {
    if (e instanceof OutputClosed || (e as Error).cause instanceof OutputClosed) return 0;
    throw e;
  }
}

async function generate(argv: string[], io: GenerateIO): Promise<number> {
  const out = (text: string) => {
    try {
      io.out(text);
    } catch (e) {
      throw e instanceof Deno.errors.BrokenPipe ? new OutputClosed("stdout closed", { cause: e }) : e;
    }
  };
  let a: Args | null;
  try {
    a = parse(argv);
  } catch (e) {
    if (!(e instanceof UsageError)) throw e;
    io.err(`error: ${e.message}\n(run with --help for the options)`);
    return 2;
  }
  if (a === null) {
    out(USAGE + "\n");
    return 0;
  }
  // said first: a run stopped part-way (Ctrl-C) keeps it
  if (a.seedDrawn) io.err(`seed ${a.seed} (--seed ${a.seed} samples this text again)`);
  await init();
  const t0 = performance.now();
  const lm = await loadModel(a, (line) => io.err(line));
  if (!lm) return 2;
  try {
    const tok: Tokenizer = lm.tokenizer!;
    // a char model has no special tokens: it starts from a new line, as a text's paragraphs do
    const start = tok.specialTokens.bos ?? tok.specialTokens.eos ??
      (tok instanceof ByteTokenizer ? 10 : null);
    const encoded = a.prompts.map((p) => (p ? tok.encode(p) : []));
    if (start === null && encoded.some((ids) => ids.length === 0)) {
      io.err("error: the prompt is empty and the tokenizer has no BOS/EOS token to start from");
      return 2;
    }
    const loadMs = performance.now() - t0;
    // one row per --prompt, or --batch rows of the one prompt
    const texts = a.prompts.length > 1 ? a.prompts : Array.from({ length: a.batch }, () => a.prompts[0]);
    const rows = (a.prompts.length > 1 ? encoded : texts.map(() => encoded[0]))
      .map((ids) => (ids.length ? ids : [start!]));
    // Row 0 streams; a special end token (not for byte tokenizers) ends what is shown.
    const eos = tok instanceof ByteTokenizer ? null : tok.specialTokens.eos;
    // the prompt as context: decoders that drop a text's leading space keep the one before the reply
    const decoder = new StreamDecoder(tok, { skipSpecialTokens: true, context: rows[0] });
    let ended = false;
    let firstMs = 0;
    const t1 = performance.now();
    const onTokens = (fresh: Int32Array[]) => {
      if (!firstMs) firstMs = performance.now() - t1;
      if (ended) return;
      let ids = fresh[0];
      const stop = eos === null ? -1 : ids.indexOf(eos);
      if (stop >= 0) {
        ids = ids.subarray(0, stop);
        ended = true;
      }
      try {
        out(decoder.push(ids));
      } catch (e) {
        // a tokenizer with fewer ids than the model, and the model sampled past them
        const hint = tok.vocabSize < lm.vocabSize
          ? ` (the tokenizer has ${tok.vocabSize} ids, the model ${lm.vocabSize}: a tokenizer of another model?)`
          : "";
        throw new Error(`${(e as Error).message}${hint}`, { cause: e });
      }
    };
    if (rows.length > 1) out(`[1/${rows.length}] `);
    out(texts[0]);
    const result = await lm.generate(rows, a.tokens, {
      sample: !a.greedy,
      temperature: a.temperature,
      topK: a.topK,
      topP: a.topP,
      minP: a.minP,
      repetitionPenalty: a.repetitionPenalty,
      seed: a.seed,
      readEvery: a.readEvery,
      prefillChunk: a.prefillChunk,
      onTokens,
      ...(eos === null ? {} : { stopTokens: [eos] }), // every row at its end: decoding stops
    }).catch((e) => {
      // the error's line starts on its own, after the text streamed so far
      if (!(e instanceof OutputClosed || e.cause instanceof OutputClosed)) out("\n");
      throw e;
    });
    const genMs = performance.now() - t1;
    out(decoder.flush() + "\n");
    for (let b = 1; b < rows.length; b++) {
      let ids = result[b];
      const stop = eos === null ? -1 : ids.indexOf(eos);
      if (stop >= 0) ids = ids.subarray(0, stop);
      // the reply as decoded after its prompt (alone, a leading space could go), less the prompt's own text
      const decode = (x: ArrayLike<number>) => tok.decode(x, { skipSpecialTokens: true });
      const reply = decode([...rows[b], ...ids]).slice(decode(rows[b]).length);
      out(`[${b + 1}/${rows.length}] ${texts[b]}${reply}\n`);
    }
    const n = result.reduce((sum, r) => sum + r.length, 0); // rows end at the end token
    const penalty = a.repetitionPenalty === 1 ? "" : `, repetition penalty ${a.repetitionPenalty}`;
    const mode = a.greedy
      ? `greedy${penalty && ` (${penalty.slice(2)})`}`
      : `sampled (T ${a.temperature}${a.topK ? `, top-k ${a.topK}` : ""}${
        a.topP !== undefined ? `, top-p ${a.topP}` : ""
      }${a.minP !== undefined ? `, min-p ${a.minP}` : ""}${penalty}, seed ${a.seed})`;
    io.err(
      `${n} tokens (${rows.length} x ${a.tokens}${
        n < rows.length * a.tokens ? " at most: rows end at the end token" : ""
      }, ${mode}) in ${(genMs / 1000).toFixed(2)} s: ` +
        `${(n / (genMs / 1000)).toFixed(1)} tokens/s; prompt ${
          [...new Set(rows.map((r) => r.length))].join(" / ")
        } tokens${
          a.prefillChunk < Infinity ? ` (run in chunks of ${a.prefillChunk})` : ""
        }, first tokens after ` +
        `${firstMs.toFixed(0)} ms; model loaded in ${(loadMs / 1000).toFixed(2)} s${
          a.weightDtype === "bf16" ? " (bf16 weights)" : ""
        }`,
    );
    return 0;
  } finally {
    lm.dispose();
  }
}

if (import.meta.main) await runProgram(main);
