/**
 * Trains a character-level Mamba LM on a text (Pride and Prejudice by default) and writes checkpoints.
 *
 * ```sh
 * deno task train                                  # mamba.py's recipe: 1200 steps of 16 x 128 characters
 * deno task train --steps 300 --out runs/short     # shorter
 * deno task train --steps 300 --overwrite          # a new run in place of the one in runs/char
 * deno task train --resume runs/char               # continue a run exactly where it stopped (on its own text)
 * deno task train --resume runs/short --steps 600  # extend a run (the cosine schedule stretches from here on)
 * deno task train --from state-spaces/mamba-130m-hf --data my.txt --out runs/ft --steps 200 --batch 4 --seq 256
 * ```
 * `--from` fine-tunes a pretrained model (hub id, folder or URL) on the text, encoded by the model's own
 * tokenizer, which the checkpoints carry (`deno task generate --model runs/ft` reads it back).
 * A progress line shows step, loss, validation loss, tokens/s and ETA. Checkpoints (config.json,
 * model.safetensors in the Hugging Face layout, optimizer state, training log, tokenizer) are written every
 * `--save-every` steps and at the end; Ctrl-C saves one before exiting (before the run's first step, none).
 * A new run refuses an `--out` holding another run's checkpoint unless `--overwrite`. The loss curve is written as
 * `loss.json` and `loss.svg`, in the checkpoint folder. A resumed run keeps its recipe and model (flags that
 * would change them are errors) and writes to the folder it resumes unless `--out` names another.
 * @module
 */

import { fileURLToPath } from "node:url";
import { parseArgs } from "node:util";
import { init } from "../core/device.ts";
import { manualSeed } from "../core/random.ts";
import { MambaLM } from "../mamba/lm.ts";
import { fromPretrained, NoTokenizerError } from "../mamba/pretrained.ts";
import { ByteTokenizer, type Tokenizer } from "../mamba/tokenizer.ts";
import {
  CharDataset,
  DEFAULT_TRAIN,
  MAX_TRAIN_SEED,
  TokenDataset,
  type TrainConfig,
  type TrainData,
  Trainer,
} from "../mamba/train.ts";
import {
  checkCheckpointFolder,
  DataMismatchError,
  loadTrainingCheckpoint,
  saveTrainingCheckpoint,
} from "../mamba/checkpoint.ts";
import { UsageError, userModelPath, userPath } from "./lib/cli.ts";
import { lossChartSVG } from "./lib/loss_chart.ts";

/** The bundled text a run trains on without --data. */
const DEFAULT_DATA = fileURLToPath(new URL("../data/pride_and_prejudice.txt", import.meta.url));

/** Default peak learning rate with --from: DEFAULT_TRAIN's 3e-3 (a new char model's) would wreck pretrained
 * weights; 1e-4 is a common fine-tuning rate for models of this size. */
export const FINE_TUNE_LR = 1e-4;
/** Default warm-up steps with --from: DEFAULT_TRAIN's 100 (a new model's, from random weights) would spend half
 * of a typical 200-step fine-tune below the peak rate; README's fine-tuning snippet uses 10. */
export const FINE_TUNE_WARMUP = 10;

const USAGE = `Usage: deno task train [options]

  --steps <n>        optimizer steps (default ${DEFAULT_TRAIN.steps})
  --batch <n>        sequences per batch (default ${DEFAULT_TRAIN.batch})
  --accumulate <n>   run each step's batch as n micro-batches of --batch sequences (gradient accumulation:
                     n times the batch in one micro-batch's memory; default 1)
  --seq <n>          tokens per sequence: characters for a char model (default ${DEFAULT_TRAIN.seq})
  --carry-state      each row reads its own stretch of the text window after window, going on from the
                     state its last window ended in (truncated backpropagation through time; validation
                     alike): the model learns to use what came before a window. Off by default
  --lr <x>           peak learning rate; warm-up then cosine to lr/10 (default ${DEFAULT_TRAIN.lr}; with
                     --from ${FINE_TUNE_LR})
  --warmup <n>       warm-up steps (default ${DEFAULT_TRAIN.warmup}; with --from ${FINE_TUNE_WARMUP}; at most --steps - 1:
                     a shorter run reaches the peak lr at its last step)
  --d-model <n>      model width (default 64)
  --layers <n>       Mamba blocks (default 2)
  --d-state <n>      SSM state size (default 16)
  --mup-base-width <n>  train with muP, its hyper-parameters tuned at width n (mamba.py's mup and
                     mup_base_width; off by default)
  --recompute <how>  what each block keeps for the backward: true (its input and the scan's chunk states,
                     default), input (its input alone: least memory for deep models and long --seq, about a
                     tenth more time per step) or false (every op's saved tensors); not with --resume
  --seed <n>         seed of the initialisation and the batches (default ${DEFAULT_TRAIN.seed})
  --data <file>      training text (default data/pride_and_prejudice.txt; last 10% is validation; with
                     --resume, the run's own, which must be the same text: its checkpoint names it)
  --other-data       with --resume: go on with a --data that is not the run's text (refused otherwise)
  --out <dir>        checkpoint folder (default runs/char; with --from runs/ft; with --resume, the resumed
                     folder); one that holds another run's checkpoint is refused unless --overwrite
  --overwrite        replace the checkpoint of another run in --out (HF Trainer's overwrite_output_dir)
  --resume <dir>     continue the run saved in <dir> with its recipe and model; only --steps (to extend
                     it), --data, --other-data, --out, --overwrite and --save-every may be given with it
  --from <model>     fine-tune a pretrained model (hub id, folder or URL) instead of training a new one:
                     the text is encoded by its tokenizer; --d-model, --layers, --d-state, --mup-base-width
                     do not apply
  --revision <s>     hub branch, tag or commit of --from (default main)
  --cache-dir <s>    hub cache folder of --from (default HF_HUB_CACHE, else HUGGINGFACE_HUB_CACHE, else
                     HF_HOME/hub, else $XDG_CACHE_HOME/huggingface/hub, else ~/.cache/huggingface/hub)
  --tokenizer <s>    hub id, folder or URL of --from's tokenizer (default: the model's own)
  --eval-every <n>   steps between validation losses (default ${DEFAULT_TRAIN.evalEvery})
  --save-every <n>   steps between checkpoints (default 200)
  -h, --help         this text`;

/** Parsed command line. */
export interface TrainArgs {
  /** Recipe. */
  train: TrainConfig;
  /** Model shape. */
  dModel: number;
  /** Blocks. */
  layers: number;
  /** State size. */
  dState: number;
  /** muP's base width (`MambaConfig.mupBaseWidth`), or null: no muP. */
  mupBaseWidth: number | null;
  /** `MambaConfig.recompute` of a new or fine-tuned model. */
  recompute: boolean | "input";
  /** Text file; null with `resume` and no --data: the run's own (its checkpoint names it). */
  data: string | null;
  /** With `resume`: go on with `data` even if it is not the run's (--other-data). */
  otherData: boolean;
  /** Output folder. */
  out: string;
  /** Whether a checkpoint of another run in `out` may be replaced (--overwrite). */
  overwrite: boolean;
  /** Folder to resume from, if any. */
  resume: string | null;
  /** Pretrained model to fine-tune (hub id, folder or URL), if any. */
  from: string | null;
  /** Hub revision and cache folder of `from`. */
  hub: { revision?: string; cacheDir?: string; tokenizer?: string };
  /** Steps between checkpoints. */
  saveEvery: number;
  /** Whether --steps was given (a resumed run keeps its own otherwise). */
  stepsGiven: boolean;
}

/** Flags that set the recipe or the model, which a resumed run takes from its checkpoint. */
const RECIPE_FLAGS = [
  "batch",
  "accumulate",
  "carry-state",
  "seq",
  "lr",
  "warmup",
  "d-model",
  "layers",
  "d-state",
  "mup-base-width",
  "seed",
  "eval-every",
  "recompute",
];
/** Flags that shape a new model, which a fine-tuned one has already. */
const MODEL_FLAGS = ["d-model", "layers", "d-state", "mup-base-width"];

/** Parses flags; throws an Error naming a bad flag or value; null for --help. */
export function parseTrainArgs(argv: string[]): TrainArgs | null {
  const { values } = parseArgs({
    args: argv,
    strict: true,
    options: {
      steps: { type: "string" },
      batch: { type: "string" },
      accumulate: { type: "string" },
      "carry-state": { type: "boolean" },
      seq: { type: "string" },
      lr: { type: "string" },
      warmup: { type: "string" },
      "d-model": { type: "string" },
      layers: { type: "string" },
      "d-state": { type: "string" },
      "mup-base-width": { type: "string" },
      recompute: { type: "string" },
      seed: { type: "string" },
      data: { type: "string" },
      "other-data": { type: "boolean" },
      out: { type: "string" },
      overwrite: { type: "boolean" },
      resume: { type: "string" },
      from: { type: "string" },
      revision: { type: "string" },
      "cache-dir": { type: "string" },
      tokenizer: { type: "string" },
      "eval-every": { type: "string" },
      "save-every": { type: "string" },
      help: { type: "boolean", short: "h" },
    },
  });
  if (values.help) return null;
  // An empty path (--from "$MODEL" with the variable unset) would read as absent: a fresh run, not the one meant.
  for (const f of ["from", "resume", "out", "data", "cache-dir", "revision", "tokenizer"] as const) {
    if (values[f] !== undefined && values[f]!.trim() === "") throw new Error(`--${f} needs a value, got ''`);
  }
  if (values.from !== undefined && values.resume !== undefined) {
    throw new Error("--from and --resume cannot be used together: a resumed run already has its model");
  }
  if (values.from !== undefined) {
    const given = MODEL_FLAGS.filter((f) => values[f as keyof typeof values] !== undefined);
    if (given.length > 0) {
      throw new Error(
        `${given.map((f) => `--${f}`).join(", ")} cannot be used with --from: the model has its shape`,
      );
    }
  } else {
    const hubFlags = ["revision", "cache-dir", "tokenizer"].filter((f) =>
      values[f as keyof typeof values] !== undefined
    );
    if (hubFlags.length > 0) {
      throw new Error(`${hubFlags.map((f) => `--${f}`).join(", ")} apply to --from only`);
    }
  }
  if (values.resume !== undefined) {
    const given = RECIPE_FLAGS.filter((f) => values[f as keyof typeof values] !== undefined);
    if (given.length > 0) {
      throw new Error(
        `${given.map((f) => `--${f}`).join(", ")} cannot be used with --resume: a resumed run keeps the ` +
          `recipe and model of its checkpoint (only --steps, --data, --other-data, --out, --overwrite and --save-every apply)`,
      );
    }
  } else if (values["other-data"]) {
    throw new Error("--other-data applies to --resume only");
  }
  const path = (p: string | undefined) => p === undefined ? undefined : userPath(p);
  const int = (name: string, v: string | undefined, dflt: number, min = 1, max = Number.MAX_SAFE_INTEGER) => {
    if (v === undefined) return dflt;
    const n = Number(v);
    if (v.trim() === "" || !Number.isInteger(n) || n < min || n > max) {
      throw new Error(
        `--${name} must be an integer ${
          max === Number.MAX_SAFE_INTEGER ? `>= ${min}` : `from ${min} to ${max}`
        }` +
          `, got '${v}'`,
      );
    }
    return n;
  };
  const lr = values.lr === undefined
    ? (values.from === undefined ? DEFAULT_TRAIN.lr : FINE_TUNE_LR)
    : Number(values.lr);
  if (!(lr > 0 && Number.isFinite(lr))) {
    throw new Error(`--lr must be a finite positive number, got '${values.lr}'`);
  }
  const train: TrainConfig = {
    ...DEFAULT_TRAIN,
    steps: int("steps", values.steps, DEFAULT_TRAIN.steps),
    batch: int("batch", values.batch, DEFAULT_TRAIN.batch),
    ...(values.accumulate === undefined ? {} : { accumulate: int("accumulate", values.accumulate, 1) }),
    seq: int("seq", values.seq, DEFAULT_TRAIN.seq),
    lr,
    minLr: lr / 10,
    warmup: int(
      "warmup",
      values.warmup,
      values.from === undefined ? DEFAULT_TRAIN.warmup : FINE_TUNE_WARMUP,
      0,
    ),
    seed: int("seed", values.seed, DEFAULT_TRAIN.seed, 0, MAX_TRAIN_SEED),
    evalEvery: int("eval-every", values["eval-every"], DEFAULT_TRAIN.evalEvery),
    ...(values["carry-state"] ? { carryState: true } : {}),
  };
  // a short run reaches the peak at its last step (a warm-up of --steps left its lr below the peak, and a
  // one-step run at lr 0: no update)
  train.warmup = Math.min(train.warmup, train.steps - 1);
  const how = new Map<string | undefined, boolean | "input">([
    [undefined, true],
    ["true", true],
    ["false", false],
    ["input", "input"],
  ]);
  const recompute = how.get(values.recompute);
  if (recompute === undefined) {
    throw new Error(`--recompute must be true, false or input, got '${values.recompute}'`);
  }
  return {
    train,
    dModel: int("d-model", values["d-model"], 64),
    layers: int("layers", values.layers, 2),
    dState: int("d-state", values["d-state"], 16),
    mupBaseWidth: values["mup-base-width"] === undefined
      ? null
      : int("mup-base-width", values["mup-base-width"], 0),
    recompute,
    // relative paths given are the user's, not the repository root's that deno task runs in
    data: path(values.data) ?? (values.resume === undefined ? DEFAULT_DATA : null),
    otherData: values["other-data"] === true,
    overwrite: values.overwrite === true,
    out: path(values.out) ?? path(values.resume) ?? (values.from === undefined ? "runs/char" : "runs/ft"),
    resume: path(values.resume) ?? null,
    from: values.from === undefined ? null : userModelPath(values.from),
    hub: {
      revision: values.revision,
      cacheDir: path(values["cache-dir"]),
      ...(values.tokenizer === undefined ? {} : { tokenizer: userModelPath(values.tokenizer) }),
    },
    saveEvery: int("save-every", values["save-every"], 200),
    stepsGiven: values.steps !== undefined,
  };
}

/**
 * The data of a run from its text: the bytes themselves for a byte tokenizer (a char model), else the ids
 * of the text run through `tokenizer`. Also the tokenizer its checkpoints carry: for a char model, one that
 * knows every byte of the text (and those the model knew before).
 */
export function encodeText(
  text: Uint8Array,
  tokenizer: Tokenizer | null,
): { data: TrainData; tokenizer: Tokenizer } {
  if (tokenizer === null || tokenizer instanceof ByteTokenizer) {
    const data = new CharDataset(text);
    if (tokenizer?.known === null) return { data, tokenizer }; // one that takes any byte stays so
    return { data, tokenizer: new ByteTokenizer([...data.train, ...data.val, ...(tokenizer?.known ?? [])]) };
  }
  return { data: new TokenDataset(tokenizer.encode(new TextDecoder().decode(text))), tokenizer };
}

function fmtTime(s: number): string {
  return s >= 60
    ? `${Math.floor(s / 60)}m${String(Math.round(s % 60)).padStart(2, "0")}s`
    : `${s.toFixed(0)}s`;
}

/** Throws where `a.out` holds the checkpoint of a run other than the one `a` resumes: a new run would replace
 * it at its first save. */
async function refuseOtherRun(a: TrainArgs): Promise<void> {
  let step: unknown;
  try {
    step = (JSON.parse(await Deno.readTextFile(`${a.out}/training_log.json`)) as { step?: unknown }).step;
  } catch {
    return; // no checkpoint there (checkCheckpointFolder refused anything else)
  }
  if (a.resume !== null) {
    const [from, to] = await Promise.all([a.resume, a.out].map((p) => Deno.realPath(p).catch(() => p)));
    if (from === to) return; // the run itself
  }
  throw new UsageError(
    `--out ${a.out} holds the checkpoint of another run (at step ${step}): pass --resume ${a.out} to continue ` +
      "it, another --out, or --overwrite to replace it",
  );
}

/** Hooks for `runTraining` (the demo uses them to print samples). */
export interface TrainHooks {
  /** Receives progress text (default: stderr, one line rewritten in place on a terminal). */
  progress?: (line: string, final: boolean) => void;
  /** Stops the run early, e.g. set by Ctrl-C: asked before the first step (`stepped` false; stopped there, the
   * run saves nothing: `--out` stays as it was) and after every step (a checkpoint of that step is saved). */
  shouldStop?: (stepped: boolean) => boolean;
  /** Runs once the model exists, before the first step (the demo prints a sample there). */
  onStart?: (trainer: Trainer) => Promise<void>;
}

/** Trains (or resumes) as the flags say; returns the trainer, with the final checkpoint written. */
export async function runTraining(a: TrainArgs, hooks: TrainHooks = {}): Promise<Trainer> {
  await init();
  await checkCheckpointFolder(a.out); // a folder we may not replace or write in fails now, not at the first save
  if (a.from) {
    const same = await Promise.all([a.from, a.out].map((p) => Deno.realPath(p).catch(() => null)));
    if (same[0] !== null && same[0] === same[1]) {
      throw new UsageError(
        `--out ${a.out} is the folder --from reads: name another --out (or --resume it to continue that run)`,
      );
    }
  }
  if (!a.overwrite) await refuseOtherRun(a);
  const readText = (path: string) =>
    Deno.readFile(path).catch((e) => {
      throw new Error(`cannot read the training text ${path}: ${(e as Error).message}`);
    });
  // (read before any model loads, so that a missing file says so first; a resume without --data reads the
  // run's own, which its checkpoint names)
  const text = a.data === null ? null : await readText(a.data);
  let dataPath = a.data ?? DEFAULT_DATA; // kept in the checkpoints, for a resume without --data
  let trainer: Trainer;
  let tokenizer!: Tokenizer; // what the checkpoints carry
  if (a.resume) {
    trainer = await loadTrainingCheckpoint(a.resume, async (tok, source) => {
      // checkpoints written before they named their text: the bundled one, as then
      if (text === null) dataPath = source ?? DEFAULT_DATA;
      const run = encodeText(text ?? await readText(dataPath), tok);
      tokenizer = run.tokenizer;
      return run.data;
    }, { otherData: a.otherData }).catch((e) => {
      // the library's option, named by its flag here
      throw e instanceof DataMismatchError
        ? new UsageError(`${e.what} (--other-data; or start a new run from its weights: --from ${a.resume})`)
        : e;
    });
    if (a.stepsGiven) {
      try {
        trainer.setSteps(a.train.steps); // the learning-rate schedule follows
      } catch (e) {
        trainer.model.dispose();
        trainer.dispose();
        throw new Error(`--steps ${a.train.steps} for the run in ${a.resume}: ${(e as Error).message}`);
      }
    }
  } else if (a.from) {
    // a tokenizer to encode the text with is needed: said before the weights download
    const lm = await fromPretrained(a.from, { ...a.hub, recompute: a.recompute, requireTokenizer: true })
      .catch((e) => {
        if (!(e instanceof NoTokenizerError)) throw e;
        throw new UsageError( // as deno task generate and eval say it: a flag is missing
          `${a.from} has no tokenizer.json to encode the text with (${e.reason}): name one with ` +
            "--tokenizer <id|folder|url>",
        );
      });
    try {
      const run = encodeText(text!, lm.tokenizer!);
      tokenizer = run.tokenizer;
      manualSeed(a.train.seed);
      trainer = new Trainer(lm, run.data, a.train);
    } catch (e) {
      lm.dispose();
      throw e;
    }
  } else {
    const run = encodeText(text!, null);
    tokenizer = run.tokenizer;
    manualSeed(a.train.seed);
    const mup = a.mupBaseWidth === null ? {} : { mup: true, mupBaseWidth: a.mupBaseWidth };
    const config = { dModel: a.dModel, nLayers: a.layers, dState: a.dState, recompute: a.recompute, ...mup };
    const model = new MambaLM(config, { vocabSize: 256 });
    try {
      trainer = new Trainer(model, run.data, a.train); // refuses a text too short for a window of --seq
    } catch (e) {
      model.dispose();
      throw e;
    }
  }
  const dataSource = await Deno.realPath(dataPath).catch(() => dataPath); // a resume may run elsewhere
  const cfg = trainer.config;
  const isTTY = Deno.stderr.isTerminal();
  const progress = hooks.progress ??
    ((line: string, final: boolean) => {
      if (isTTY) Deno.stderr.writeSync(new TextEncoder().encode(`\r${line}\x1b[K${final ? "\n" : ""}`));
      else console.error(line);
    });
  let saved: number | null = null; // the step of this run's last checkpoint
  // A diverged run's error says which checkpoint is left: none is written once a loss is not finite.
  const diverged = (e: unknown) => {
    const kept = saved === null
      ? `no checkpoint written since the run ${a.resume ? "resumed" : "started"}`
      : `${a.out} keeps the checkpoint of step ${saved}`;
    return new Error(`${(e as Error).message} (${kept})`, { cause: e });
  };
  const save = async () => {
    // The loss chart goes into the checkpoint folder with the rest, replaced with it atomically. A run that
    // diverged since the last readback is refused by the save (its losses are read there), so it never
    // replaces the checkpoint of one that had not.
    await saveTrainingCheckpoint(trainer, a.out, tokenizer, {
      dataSource,
      files: {
        "loss.json": JSON.stringify(trainer.log) + "\n",
        "loss.svg": await lossChartSVG(
          trainer.log,
          [],
          "loss",
          tokenizer instanceof ByteTokenizer ? "char" : "token",
        ),
      },
    }).catch((e) => {
      const cause = (e as Error).cause; // the divergence itself, said with the checkpoint left
      throw cause instanceof Error && /^training diverged/.test(cause.message) ? diverged(cause) : e;
    });
    saved = trainer.step;
  };
  await hooks.onStart?.(trainer);
  const t0 = performance.now();
  const startStep = trainer.step;
  const priorSeconds = trainer.log.time.at(-1)?.[1] ?? 0;
  let [valStep, lastVal] = trainer.log.val.at(-1) ?? [0, NaN];
  if (trainer.step === 0) lastVal = await trainer.evaluate();
  // The validation loss is that of the last evaluation (every --eval-every steps, and the last), marked with
  // its step where older than the step shown: evaluating at a stop instead would cost a pass over the
  // validation text.
  const val = (step: number) => `val ${lastVal.toFixed(4)}${valStep === step ? "" : ` @${valStep}`}`;
  let lastLoss = trainer.log.train.at(-1)?.[1] ?? NaN;
  if (trainer.step < cfg.steps && (hooks.shouldStop?.(false) ?? false)) {
    // stopped before a step of its own: a save would replace the checkpoint in --out with no new work
    progress(`interrupted before the first step: nothing saved (${a.out} is as it was)`, true);
    return trainer;
  }
  while (trainer.step < cfg.steps) {
    const mean = await trainer.trainStep().catch((e) => {
      throw /^training diverged/.test((e as Error).message) ? diverged(e) : e;
    });
    if (mean !== null) lastLoss = mean;
    const step = trainer.step;
    if (step % cfg.evalEvery === 0 || step === cfg.steps) {
      [valStep, lastVal] = [step, await trainer.evaluate()];
    }
    const secs = (performance.now() - t0) / 1000;
    const stop = hooks.shouldStop?.(true) ?? false;
    const saving = step % a.saveEvery === 0 || step === cfg.steps || stop;
    // the time goes with each checkpoint too: a run resumed from one adds its own to the seconds saved there
    if (mean !== null || saving) {
      trainer.log.time.push([step, priorSeconds + secs]);
      const tps = ((step - startStep) * cfg.batch * (cfg.accumulate ?? 1) * cfg.seq) / secs;
      const eta = ((cfg.steps - step) * secs) / (step - startStep);
      progress(
        // (before the first readback of the losses, a save's line has none yet: "-", not NaN, which would
        // read as a diverged run)
        `step ${step}/${cfg.steps}  loss ${Number.isNaN(lastLoss) ? "-" : lastLoss.toFixed(4)}  ` +
          `${val(step)}  ` +
          `${tps.toFixed(0)} tok/s  ETA ${fmtTime(eta)}`,
        false,
      );
    }
    if (saving) await save();
    if (stop) break;
  }
  progress(
    saved === null
      ? `nothing to train: the run is at step ${trainer.step} of ${cfg.steps} (--steps trains it longer); ` +
        `its checkpoint stays in ${a.resume}`
      : `done: step ${trainer.step}, ${val(trainer.step)}, checkpoint in ${a.out}`,
    true,
  );
  return trainer;
}

if (import.meta.main) {
  let args: TrainArgs | null;
  try {
    args = parseTrainArgs(Deno.args);
  } catch (e) {
    console.error(`error: ${(e as Error).message}\n(run with --help for the options)`);
    Deno.exit(2);
  }
  if (args === null) {
    console.log(USAGE);
    Deno.exit(0);
  }
  let interrupted = false;
  let stepped = false; // whether a step of this run was taken: before it, a save would replace --out for nothing
  Deno.addSignalListener("SIGINT", () => {
    if (!stepped) {
      // loading, downloading (--from) or the first evaluation: nothing of this run to keep
      console.error("\ninterrupted before the first step: nothing saved");
      Deno.exit(130);
    }
    if (interrupted) Deno.exit(130);
    interrupted = true;
    console.error("\ninterrupted: saving a checkpoint (Ctrl-C again to quit at once)");
  });
  try {
    const trainer = await runTraining(args, {
      shouldStop: (took) => {
        stepped = took;
        return interrupted;
      },
    });
    trainer.model.dispose();
    trainer.dispose();
    Deno.exit(interrupted ? 130 : 0);
  } catch (e) {
    console.error(`error: ${(e as Error).message}`);
    Deno.exit(e instanceof UsageError ? 2 : 1);
  }
}
