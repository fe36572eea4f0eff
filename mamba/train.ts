/**
 * Training a Mamba LM: the data (a text's bytes for a character model, or any tokenizer's ids to fine-tune a
 * pretrained model), the step (forward, loss, backward, clip, AdamW), evaluation, and checkpoints that hold
 * everything a bit-exact resume needs. Used by `deno task train` and `deno task demo`.
 *
 * A step reads nothing back: the loss is copied into a small GPU log that is read every `logEvery` steps.
 * Batches come from a counter-based generator keyed by (seed, step), so a resumed run draws the same batches.
 * @module
 */

import { tensor } from "../core/creation.ts";
import { readBuffer, recordCopy } from "../core/executor.ts";
import { add, crossEntropy, mul, narrow } from "../core/ops/index.ts";
import { noGrad } from "../core/autograd.ts";
import { checkOptionKeys } from "../core/options.ts";
import { Philox } from "../core/random.ts";
import { dispose, freeOnThrow, keep, type Tensor, tidy } from "../core/tensor.ts";
import { configureOptimizers, cosineSchedule, gradNormScale } from "../nn/optim.ts";
import type { AdamW } from "../nn/optim.ts";
import type { MambaLM } from "./lm.ts";
import type { LayerCache } from "./block.ts";
import { ensureFusedTuned } from "../scan/tune_fused.ts";

/** Hyper-parameters of a run (mamba.py's char-model recipe by default). */
export interface TrainConfig {
  /** Optimizer steps. */
  steps: number;
  /** Sequences per forward pass: the batch, or with `accumulate` > 1 one micro-batch of it. */
  batch: number;
  /**
   * Micro-batches whose gradients one optimizer step adds up (gradient accumulation, transformers'
   * `gradient_accumulation_steps`; default 1). A step draws `accumulate * batch` windows, those of one batch of
   * that size, and runs them `batch` at a time: the same update (up to rounding) in a micro-batch's memory.
   * Validation batches are as large and run alike.
   */
  accumulate?: number;
  /** Tokens per sequence (a `CharDataset`'s are bytes: characters of an ASCII text). */
  seq: number;
  /** Peak learning rate. */
  lr: number;
  /** Final learning rate of the cosine decay, reached at step `steps`: the last step, `steps - 1`, runs a hair
   * above it. */
  minLr: number;
  /** Linear warm-up steps. */
  warmup: number;
  /** AdamW weight decay of the parameters of rank >= 2 (conv weights and A_log too: see `configureOptimizers`). */
  weightDecay: number;
  /** AdamW betas. */
  betas: [number, number];
  /** Global gradient-norm clip. */
  clip: number;
  /**
   * Seed of the batches (training windows and validation batches; with `carryState` the windows are read in
   * order and the seed draws none). The model exists before the Trainer, so
   * this does not seed its initialisation: call `manualSeed(config.seed)` before building the model.
   */
  seed: number;
  /** Steps between validation evaluations. */
  evalEvery: number;
  /** Batches per validation evaluation. */
  evalBatches: number;
  /** Steps between loss readbacks (the logged train loss is the mean over them). */
  logEvery: number;
  /**
   * Train from a carried state (truncated backpropagation through time; default false). The training part is
   * cut into `accumulate * batch` equal stretches, one per row, and each row reads its stretch window after
   * window (step s: window s mod W, W = floor((stretch length - 1) / seq)), going on from the state its
   * previous window ended in; at a stretch's first window the state starts from zeros. The gradient stays
   * within the window. The model so learns to use what came before a window, as it does when it reads a text
   * past any window (`perplexity`'s `carryState`, generation). The validation part is read alike: window 0 to
   * `evalBatches - 1` of its stretches in order, the state carried from one to the next (past a stretch's last
   * window it wraps to its first, from zeros again). `seed` draws no batches here. The states take
   * `accumulate * batch * nLayers * dInner * (dState + dConv - 1)` floats, and a checkpoint saves them.
   */
  carryState?: boolean;
}

/**
 * The recipe of the PyTorch char-mamba reference run that this library's training is checked against: 1200
 * steps of batch 16 by seq 128, lr 3e-3 to 3e-4 (cosine after 100 warm-up steps), weight decay 0.1, betas
 * (0.9, 0.95), clip 1.0, seed 7, validation every 100 steps over 16 batches, loss read every 10 steps.
 */
export const DEFAULT_TRAIN: TrainConfig = {
  steps: 1200,
  batch: 16,
  seq: 128,
  lr: 3e-3,
  minLr: 3e-4,
  warmup: 100,
  weightDecay: 0.1,
  betas: [0.9, 0.95],
  clip: 1.0,
  seed: 7,
  evalEvery: 100,
  evalBatches: 16,
  logEvery: 10,
};

/** The loss curve. */
export interface TrainLog {
  /** [step, mean train loss over the steps since the last entry: logEvery of them, fewer at the run's last
   * step, one per step past it] */
  train: [number, number][];
  /** [step, validation loss] */
  val: [number, number][];
  /** [step, seconds since the run started, cumulated over resumes]: the caller's to fill (`Trainer` does not
   * time; `deno task train` records it with each train-loss entry and each checkpoint) */
  time: [number, number][];
}

/** What a {@linkcode Trainer} draws its batches from: token ids in a training and a validation part. */
export interface TrainData {
  /** The largest id in either part (-1 when both are empty): the Trainer checks it against the model's
   * vocabulary. */
  readonly maxId: number;
  /** B random windows of L + 1 ids (inputs and shifted targets), drawn from `rng`, as one (B, L + 1) array. */
  windows(split: "train" | "val", B: number, L: number, rng: Philox): Int32Array;
  /** For {@linkcode TrainConfig.carryState}: window `index` of each of B stretches read in order (see
   * {@linkcode windowsInOrder}). Optional: the Trainer refuses carryState without it. */
  windowsInOrder?(split: "train" | "val", B: number, L: number, index: number): OrderedWindows;
  /** What identifies the data (see {@linkcode dataFingerprint}), saved with a training checkpoint: a resume
   * refuses data whose fingerprint differs from the run's. Optional: data without one is not checked. */
  fingerprint?(): string;
}

/**
 * A dataset's fingerprint: the lengths of its two parts in `unit` and a 53-bit hash of every id (cyrb53), e.g.
 * "bytes 1458 + 162, hash 000c5e1f2a9b3d": data with another text, tokenizer or validation split differs.
 */
export function dataFingerprint(train: ArrayLike<number>, val: ArrayLike<number>, unit: string): string {
  let h1 = 0xdeadbeef, h2 = 0x41c6ce57;
  for (const part of [train, val]) {
    for (let i = 0; i < part.length; i++) {
      h1 = Math.imul(h1 ^ part[i], 2654435761);
      h2 = Math.imul(h2 ^ part[i], 1597334677);
    }
  }
  h1 = Math.imul(h1 ^ (h1 >>> 16), 2246822507) ^ Math.imul(h2 ^ (h2 >>> 13), 3266489909);
  h2 = Math.imul(h2 ^ (h2 >>> 16), 2246822507) ^ Math.imul(h1 ^ (h1 >>> 13), 3266489909);
  const hash = (0x100000000 * (h2 & 0x1fffff) + (h1 >>> 0)).toString(16).padStart(14, "0");
  return `${unit} ${train.length} + ${val.length}, hash ${hash}`;
}

/** Windows read in order ({@linkcode TrainConfig.carryState}): the ids, and whether they start their stretches. */
export interface OrderedWindows {
  /** (B, L + 1) ids: row b is window `index mod W` of stretch b. */
  ids: Int32Array;
  /** Whether these are the stretches' first windows (the carried state starts from zeros there). */
  first: boolean;
}

/**
 * Window `index` of B stretches of `src`, read in order: `src` is cut into B equal stretches of M =
 * floor(length / B) ids; each holds W = floor((M - 1) / L) windows of L + 1 ids, window w at w L (a window's
 * last id is the next one's first, so their inputs follow each other), and `index` wraps: window index mod W.
 * `unit` names the ids in errors.
 */
export function windowsInOrder(
  src: ArrayLike<number>,
  split: "train" | "val",
  B: number,
  L: number,
  index: number,
  unit = "ids",
): OrderedWindows {
  if (!Number.isSafeInteger(index) || index < 0) {
    throw new Error(`windowsInOrder: index must be an integer >= 0, got ${index}`);
  }
  const M = Math.floor(src.length / B);
  const W = Math.floor((M - 1) / L);
  if (!(W >= 1)) {
    throw new Error(
      `the ${split} part has ${src.length} ${unit}: ${B} stretches of ${M}, each fewer than seq + 1 = ` +
        `${L + 1} (carryState reads each row's windows in order from a stretch of its own)`,
    );
  }
  const w = index % W;
  const ids = new Int32Array(B * (L + 1));
  for (let b = 0; b < B; b++) {
    const start = b * M + w * L;
    for (let t = 0; t <= L; t++) ids[b * (L + 1) + t] = src[start + t];
  }
  return { ids, first: w === 0 };
}

/** B windows of L + 1 ids from `src`, each starting where `rng` says; `unit` names the ids in errors. */
function windowsOf(
  src: ArrayLike<number>,
  split: "train" | "val",
  B: number,
  L: number,
  rng: Philox,
  unit: string,
): Int32Array {
  if (src.length < L + 1) {
    throw new Error(
      `the ${split} ${unit === "bytes" ? "text" : "part"} has ${src.length} ${unit}, fewer ` +
        `than seq + 1 = ${L + 1}`,
    );
  }
  const out = new Int32Array(B * (L + 1));
  for (let b = 0; b < B; b++) {
    const start = rng.below(src.length - L); // any window of L + 1 ids, the last one's included
    for (let t = 0; t <= L; t++) out[b * (L + 1) + t] = src[start + t];
  }
  return out;
}

function checkValFrac(valFrac: number, what: string): void {
  if (!(valFrac >= 0 && valFrac < 1)) throw new Error(`${what}: valFrac must be in [0, 1), got ${valFrac}`);
}

/** A text as bytes (the ids of a character model), split into training (first 90%) and validation (last 10%)
 * parts. */
export class CharDataset implements TrainData {
  /** Training bytes. */
  readonly train: Uint8Array;
  /** Validation bytes. */
  readonly val: Uint8Array;
  /** The largest byte (-1 for an empty text). */
  readonly maxId: number;

  /** Splits `bytes`; `valFrac` of the end is held out. */
  constructor(bytes: Uint8Array, valFrac = 0.1) {
    checkValFrac(valFrac, "CharDataset");
    const cut = Math.floor(bytes.length * (1 - valFrac));
    this.train = bytes.subarray(0, cut);
    this.val = bytes.subarray(cut);
    let maxId = -1;
    for (let i = 0; i < bytes.length && maxId < 255; i++) if (bytes[i] > maxId) maxId = bytes[i];
    this.maxId = maxId;
  }

  /** B random windows of L + 1 bytes (inputs and shifted targets), drawn from `rng`. */
  windows(split: "train" | "val", B: number, L: number, rng: Philox): Int32Array {
    return windowsOf(split === "train" ? this.train : this.val, split, B, L, rng, "bytes");
  }

  /** Window `index` of B stretches read in order (see {@linkcode windowsInOrder}). */
  windowsInOrder(split: "train" | "val", B: number, L: number, index: number): OrderedWindows {
    return windowsInOrder(split === "train" ? this.train : this.val, split, B, L, index, "bytes");
  }

  #fingerprint: string | null = null;
  /** Its {@linkcode dataFingerprint} (computed once). */
  fingerprint(): string {
    return this.#fingerprint ??= dataFingerprint(this.train, this.val, "bytes");
  }
}

/** Throws if a loss of `losses` (those of steps from + 1, from + 2, ...) is not finite, naming the first: at
 * a trainer's readback, and in a training checkpoint's save for the losses not yet read back. */
export function checkFiniteLosses(losses: ArrayLike<number>, from: number): void {
  for (let i = 0; i < losses.length; i++) {
    if (!Number.isFinite(losses[i])) {
      throw new Error(`training diverged: loss ${losses[i]} at step ${from + i + 1}`);
    }
  }
}

/**
 * Token ids (a text run through a model's tokenizer, e.g. to fine-tune a pretrained model), split into
 * training (first 90%) and validation (last 10%) parts. Ids must be integers in [0, 2^31); the Trainer
 * checks that they fit the model's vocabulary.
 *
 * ```ts ignore
 * const lm = await fromPretrained("state-spaces/mamba-130m-hf"); // lm.tokenizer: the checkpoint's own
 * const data = new TokenDataset(lm.tokenizer!.encode(text));
 * const recipe = { ...DEFAULT_TRAIN, lr: 1e-4, minLr: 1e-5, warmup: 10, steps: 200, batch: 4, seq: 256 };
 * const trainer = new Trainer(lm, data, recipe);
 * ```
 */
export class TokenDataset implements TrainData {
  /** Training ids. */
  readonly train: Int32Array;
  /** Validation ids. */
  readonly val: Int32Array;
  /** The largest id (-1 when there are none). */
  readonly maxId: number;

  /** Copies `ids` and splits them; `valFrac` of the end is held out. */
  constructor(ids: ArrayLike<number>, valFrac = 0.1) {
    checkValFrac(valFrac, "TokenDataset");
    const all = new Int32Array(ids.length);
    let maxId = -1;
    for (let i = 0; i < ids.length; i++) {
      const v = ids[i];
      if (!Number.isInteger(v) || v < 0 || v > 0x7fffffff) {
        throw new Error(`TokenDataset: ids must be integers in [0, 2^31), got ${v} at index ${i}`);
      }
      all[i] = v;
      if (v > maxId) maxId = v;
    }
    const cut = Math.floor(all.length * (1 - valFrac));
    this.train = all.subarray(0, cut);
    this.val = all.subarray(cut);
    this.maxId = maxId;
  }

  /** B random windows of L + 1 ids (inputs and shifted targets), drawn from `rng`. */
  windows(split: "train" | "val", B: number, L: number, rng: Philox): Int32Array {
    return windowsOf(split === "train" ? this.train : this.val, split, B, L, rng, "tokens");
  }

  /** Window `index` of B stretches read in order (see {@linkcode windowsInOrder}). */
  windowsInOrder(split: "train" | "val", B: number, L: number, index: number): OrderedWindows {
    return windowsInOrder(split === "train" ? this.train : this.val, split, B, L, index, "tokens");
  }

  #fingerprint: string | null = null;
  /** Its {@linkcode dataFingerprint} (computed once). */
  fingerprint(): string {
    return this.#fingerprint ??= dataFingerprint(this.train, this.val, "tokens");
  }
}

/** Largest {@linkcode TrainConfig.seed} (2^53 - 1): a batch's generator is the seed's stream numbered by the
 * step, so seeds and steps never share windows. */
export const MAX_TRAIN_SEED: number = Number.MAX_SAFE_INTEGER;
/** The seed's stream that validation batches are drawn from (no step reaches it). */
const EVAL_STREAM = Number.MAX_SAFE_INTEGER;

/**
 * Checks a {@linkcode TrainConfig}: every key present, integers where steps or counts are meant, finite
 * rates, `minLr <= lr`, `warmup <= steps`. Returns a frozen copy; throws an Error naming the first bad key and its value.
 */
export function validateTrainConfig(config: TrainConfig): Readonly<TrainConfig> {
  if (typeof config !== "object" || config === null) {
    throw new Error(`TrainConfig must be an object, got ${config === null ? "null" : typeof config}`);
  }
  checkOptionKeys(config, [...Object.keys(DEFAULT_TRAIN), "accumulate", "carryState"], "TrainConfig");
  const c = config as unknown as Record<string, unknown>;
  const show = (v: unknown) => (typeof v === "string" ? `'${v}'` : Array.isArray(v) ? JSON.stringify(v) : v);
  const bad = (key: string, want: string): never => {
    throw new Error(`TrainConfig.${key} must be ${want}, got ${show(c[key])}`);
  };
  const int = (key: string, min: number, max = Number.MAX_SAFE_INTEGER) => {
    const v = c[key];
    if (typeof v !== "number" || !Number.isSafeInteger(v) || v < min || v > max) {
      bad(key, max === Number.MAX_SAFE_INTEGER ? `an integer >= ${min}` : `an integer in [${min}, ${max}]`);
    }
  };
  const num = (key: string, ok: (v: number) => boolean, want: string) => {
    const v = c[key];
    if (typeof v !== "number" || Number.isNaN(v) || !ok(v)) bad(key, want);
  };
  int("steps", 1);
  int("batch", 1);
  int("seq", 1);
  num("lr", (v) => v > 0 && Number.isFinite(v), "a finite number > 0");
  num("minLr", (v) => v >= 0 && Number.isFinite(v), "a finite number >= 0");
  int("warmup", 0);
  num("weightDecay", (v) => v >= 0 && Number.isFinite(v), "a finite number >= 0");
  const betas = c.betas;
  if (
    !Array.isArray(betas) || betas.length !== 2 ||
    !betas.every((b) => typeof b === "number" && b >= 0 && b < 1)
  ) bad("betas", "two numbers in [0, 1)");
  num("clip", (v) => v > 0, "a number > 0 (Infinity: no clipping)");
  int("seed", 0, MAX_TRAIN_SEED);
  int("evalEvery", 1);
  int("evalBatches", 1);
  int("logEvery", 1);
  if (c.accumulate !== undefined) int("accumulate", 1);
  if (c.carryState !== undefined && typeof c.carryState !== "boolean") bad("carryState", "true or false");
  if (config.minLr > config.lr) {
    throw new Error(
      `TrainConfig.minLr (${config.minLr}) must be <= lr (${config.lr}): the schedule decays from lr to minLr ` +
        "(set both when lowering lr, e.g. for fine-tuning)",
    );
  }
  if (config.warmup > config.steps) {
    throw new Error(
      `TrainConfig.warmup (${config.warmup}) must be <= steps (${config.steps}): ` +
        `lower warmup for a run this short (deno task train clamps it to steps - 1, so that the last step runs at the peak lr)`,
    );
  }
  return Object.freeze({ ...config, betas: Object.freeze([...config.betas]) as [number, number] });
}

/** One training run's moving parts. */
export class Trainer {
  /** The optimizer (mamba.py's grouping). */
  readonly opt: AdamW;
  /** Completed steps. */
  step = 0;
  /** The loss curve so far. */
  log: TrainLog = { train: [], val: [], time: [] };
  #config: Readonly<TrainConfig>;
  #schedule: (step: number) => number;
  #losses: Tensor;
  #pending = 0;
  /** Log rows whose readback is in flight ("train" or "val", step, value): a save records them too. */
  #inFlight = new Set<Promise<["train" | "val", number, number]>>();
  /** The scan's tuning for the model's state size, which the first step starts and every step waits for;
   * null: not started. */
  #tuning: Promise<void> | null = null;
  #tuned = false;
  /** With carryState: each micro-batch's caches after its last window (null: from zeros). */
  #carried: (LayerCache[] | null)[] = [];

  /**
   * Builds the optimizer and schedule for `model`. `config` is validated (see
   * {@linkcode validateTrainConfig}: `warmup` must not exceed `steps`) and copied.
   */
  constructor(readonly model: MambaLM, readonly data: TrainData, config: TrainConfig) {
    this.#config = validateTrainConfig(config);
    if (model.weightDtype !== "f32") {
      throw new Error(
        `Trainer: the model stores its weights in ${model.weightDtype}, which is for inference (no gradient): ` +
          'build or load it with weightDtype "f32" to train it',
      );
    }
    if (!Number.isInteger(data.maxId) || data.maxId < -1) {
      throw new Error(`TrainData.maxId must be an integer >= -1 (the largest id), got ${data.maxId}`);
    }
    if (data.maxId >= model.vocabSize) {
      throw new Error(
        `the data has token id ${data.maxId}, outside the model's vocabulary of ${model.vocabSize} ` +
          "(ids must come from the model's own tokenizer)",
      );
    }
    // Parts that hold ids but too few for one window fail here, not at the first evaluate() after training
    // (CharDataset and TokenDataset show their parts; an empty validation part is for runs that never
    // evaluate): windowsOf's own error, from a throwaway generator.
    const parts = data as { train?: ArrayLike<number>; val?: ArrayLike<number> };
    for (const split of ["train", "val"] as const) {
      const n = parts[split]?.length;
      if (n !== undefined && (split === "train" || n > 0) && n < this.#config.seq + 1) {
        data.windows(split, 1, this.#config.seq, new Philox(0)); // throws, naming the part and its size
      }
    }
    if (this.#config.carryState) {
      if (typeof data.windowsInOrder !== "function") {
        throw new Error(
          "TrainConfig.carryState needs data that reads windows in order (TrainData.windowsInOrder)",
        );
      }
      // every row's stretch holds a window (the validation part's too, where it has ids)
      const { batch, accumulate = 1, seq } = this.#config;
      for (const split of ["train", "val"] as const) {
        const n = parts[split]?.length;
        if (split === "train" || n === undefined || n > 0) {
          data.windowsInOrder(split, accumulate * batch, seq, 0);
        }
      }
    }
    this.#schedule = Trainer.#scheduleOf(this.#config);
    // a muP model gets its third group from its own config, as mamba.py's configure_optimizers
    this.opt = configureOptimizers(model, {
      lr: config.lr,
      weightDecay: config.weightDecay,
      betas: config.betas,
    });
    this.#losses = keep(tensor(new Float32Array(config.logEvery), [config.logEvery]));
  }

  static #scheduleOf(c: Readonly<TrainConfig>): (step: number) => number {
    return cosineSchedule({ warmup: c.warmup, total: c.steps, maxLr: c.lr, minLr: c.minLr });
  }

  /** The recipe (read-only: change the length of a run with {@linkcode Trainer.setSteps}). */
  get config(): Readonly<TrainConfig> {
    return this.#config;
  }

  /** Learning rate per step: warm-up, then cosine to `minLr` at the current `config.steps`. */
  get schedule(): (step: number) => number {
    return this.#schedule;
  }

  /**
   * Changes the run's total steps, e.g. to extend a resumed run; the cosine schedule follows from the next
   * step on. The steps already done ran on the old total, so a run extended at step s differs from one
   * planned with the new total from the start; it is the same whether or not it is interrupted and resumed
   * after s (the checkpoint stores the new total). Throws if `steps` is not an integer, is below the steps
   * done or below `warmup`.
   */
  setSteps(steps: number): void {
    if (!Number.isSafeInteger(steps) || steps < 1) {
      throw new Error(`steps must be an integer >= 1, got ${steps}`);
    }
    if (steps < this.step) {
      throw new Error(`steps (${steps}) is below the ${this.step} steps this run has already done`);
    }
    if (steps < this.#config.warmup) {
      throw new Error(`steps (${steps}) is below the run's warm-up of ${this.#config.warmup} steps`);
    }
    this.#config = Object.freeze({ ...this.#config, steps });
    this.#schedule = Trainer.#scheduleOf(this.#config);
  }

  /** The windows of a step, (accumulate * batch, seq + 1): the same for the same (seed, step), so resumed runs
   * see the same data, and one batch of 8 draws the windows of two micro-batches of 4. With carryState, window
   * `step` of each row's stretch (see {@linkcode windowsInOrder}; the seed plays no part). */
  batchOf(step: number): Int32Array {
    return this.#windowsOf(step).ids;
  }

  /** A step's windows, and whether they start the stretches (with carryState; else always false). */
  #windowsOf(step: number): OrderedWindows {
    const { batch, accumulate = 1, seq, seed, carryState } = this.config;
    if (carryState) return this.data.windowsInOrder!("train", accumulate * batch, seq, step);
    return {
      ids: this.data.windows("train", accumulate * batch, seq, new Philox(seed, step)),
      first: false,
    };
  }

  /**
   * One optimizer step. Returns the mean train loss of the steps since the last readback when it reads them
   * back (every `logEvery` steps, and at the run's last step and every step past it, then over fewer steps),
   * else null. A step that throws (out of memory under a limit) counts nothing and leaves no gradients.
   * Throws at a readback where a loss is not finite, naming the first step whose loss was not.
   */
  async trainStep(): Promise<number | null> {
    const { scan, dState } = this.model.config;
    if (!this.#tuned && scan === "fused") {
      // init() measured N = 16 only. Every step waits for the first's tuning: one called meanwhile (not
      // awaited) would run on the untuned scan, inside the tuner's timings.
      this.#tuning ??= ensureFusedTuned(dState);
      try {
        await this.#tuning;
      } finally {
        this.#tuned = true;
      }
    }
    const { clip, logEvery, carryState } = this.config;
    const { ids: tokens, first } = this.#windowsOf(this.step); // tokens: (accumulate * batch, seq + 1)
    if (first) this.#dropCarried(); // the stretches start again: from zeros
    this.opt.lr = this.schedule(this.step);
    let loss: Tensor | null = null;
    let next: LayerCache[][] | null = null; // with carryState: the states after this step's windows
    try {
      ({ loss, next } = this.#batchLoss(tokens, true, carryState ? this.#carried : null));
      tidy(() => {
        const { scale } = gradNormScale(this.model.parameters(), clip);
        this.opt.step({ gradScale: scale });
        this.opt.zeroGrad();
        recordCopy(loss!.storage.buffer, 0, this.#losses.storage.buffer, 4 * this.#pending, 4);
      });
    } catch (e) {
      // a step that failed part-way (out of memory in the backward) leaves no gradients for the next to add to,
      // and the carried states as they were (a retried step starts from the same states)
      this.opt.zeroGrad();
      if (next) dispose(next);
      throw e;
    } finally {
      loss?.dispose();
    }
    if (next) {
      dispose(this.#carried);
      this.#carried = next;
    }
    const step = ++this.step;
    const n = ++this.#pending;
    if (n < logEvery && step < this.config.steps) return null;
    // Counted before the wait: a step called meanwhile (not awaited) writes its loss from slot 0, after this
    // readback's copy in the GPU's order, and logs under its own step.
    this.#pending = 0;
    const [, , mean] = await this.#reading(
      readBuffer(this.#losses.storage.buffer, 0, 4 * n).then((bytes) => {
        const losses = new Float32Array(bytes);
        checkFiniteLosses(losses, step - n);
        return ["train", step, losses.reduce((a, b) => a + b, 0) / n];
      }),
    );
    this.log.train.push([step, mean]);
    return mean;
  }

  /**
   * The mean loss of a batch of windows, (accumulate * batch, seq + 1), as a kept 0-d tensor: run `batch` at a
   * time (`accumulate` micro-batches, each one's activations freed before the next), each micro-batch's mean
   * divided by accumulate; with `train`, each one's gradients are added into the parameters' .grad. With
   * `carried` (carryState: one entry per micro-batch), each micro-batch goes on from its caches there (null:
   * from zeros), and `next` holds the caches after these windows (kept; the caller replaces `carried` with
   * them once the step has succeeded, so that a step that throws leaves the states as they were); else null.
   */
  #batchLoss(
    tokens: Int32Array,
    train: boolean,
    carried: (LayerCache[] | null)[] | null = null,
  ): { loss: Tensor; next: LayerCache[][] | null } {
    const { batch: B, accumulate = 1, seq: L } = this.config;
    let total: Tensor | null = null; // the micro-batches' shares so far
    const next: LayerCache[][] = []; // the caches after each micro-batch's windows
    try {
      for (let a = 0; a < accumulate; a++) {
        total = tidy(() => {
          const rows = tokens.subarray(a * B * (L + 1), (a + 1) * B * (L + 1));
          const ids = tensor(rows, [B, L + 1], { dtype: "i32" });
          const x = narrow(ids, 1, 0, L); // x: (B, L)
          const y = narrow(ids, 1, 1, L); // y: (B, L)
          let logits: Tensor; // logits: (B, L, vocab)
          if (carried) {
            const r = this.model.forwardFrom(x, carried[a] ?? null);
            for (const c of r.caches) {
              keep(c.h);
              keep(c.inputs);
            }
            next.push(r.caches);
            logits = r.logits;
          } else {
            logits = this.model.forward(x);
          }
          const mean = crossEntropy(logits, y); // mean: []
          const loss = accumulate === 1 ? mean : mul(mean, 1 / accumulate); // loss: [], a share of the batch's mean
          if (train) loss.backward();
          const sum = total ? noGrad(() => add(total!, loss)) : loss; // sum: []
          total?.dispose();
          return keep(sum);
        });
      }
    } catch (e) {
      total?.dispose();
      dispose(next);
      throw e;
    }
    return { loss: total!, next: carried ? next : null };
  }

  /** Frees the carried states: the next step starts from zeros. */
  #dropCarried(): void {
    dispose(this.#carried);
    this.#carried = [];
  }

  /**
   * The carried states ({@linkcode TrainConfig.carryState}) by name, `carry.<micro-batch>.<layer>.h` and
   * `.inputs`: what a training checkpoint saves so that a resumed run goes on from them. Empty without
   * carryState, and where the next step starts the stretches again. The tensors are the Trainer's (do not
   * dispose them).
   */
  carriedState(): Map<string, Tensor> {
    const out = new Map<string, Tensor>();
    // at a stretch's end the states are still held (the next step drops them), but nothing goes on from them
    if (!this.config.carryState || this.#windowsOf(this.step).first) return out;
    this.#carried.forEach((caches, a) =>
      caches?.forEach((c, l) => {
        out.set(`carry.${a}.${l}.h`, c.h);
        out.set(`carry.${a}.${l}.inputs`, c.inputs);
      })
    );
    return out;
  }

  /**
   * Restores {@linkcode Trainer.carriedState}'s tensors (as saved: name -> shape and values), replacing the
   * carried states. Throws, naming it, at a tensor that is missing, unknown or of the wrong shape, and
   * without carryState; then nothing changes.
   */
  restoreCarriedState(
    tensors: Map<string, { shape: readonly number[]; data: Float32Array | Int32Array }>,
  ): void {
    const { carryState, batch: B, accumulate = 1 } = this.config;
    if (tensors.size === 0) return this.#dropCarried();
    if (!carryState) throw new Error("carried states given to a run without TrainConfig.carryState");
    const { nLayers, dInner: ED, dState: N, dConv: K } = this.model.config;
    const want = new Map<string, number[]>();
    for (let a = 0; a < accumulate; a++) {
      for (let l = 0; l < nLayers; l++) {
        want.set(`carry.${a}.${l}.h`, [B, ED, N]);
        want.set(`carry.${a}.${l}.inputs`, [B, ED, K - 1]);
      }
    }
    for (const [name, shape] of want) {
      const t = tensors.get(name);
      if (!t) {
        throw new Error(`the carried state ${name} is missing (${accumulate} x ${nLayers} caches wanted)`);
      }
      if (t.shape.join() !== shape.join() || t.data.length !== shape.reduce((p, d) => p * d, 1)) {
        throw new Error(`the carried state ${name} is [${t.shape}], not [${shape}] (B, ED, ...)`);
      }
      if (!(t.data instanceof Float32Array)) throw new Error(`the carried state ${name} is not f32`);
    }
    const unknown = [...tensors.keys()].find((k) => !want.has(k));
    if (unknown) {
      throw new Error(`unknown carried state ${unknown} (${accumulate} x ${nLayers} caches wanted)`);
    }
    const carried = freeOnThrow(() =>
      Array.from({ length: accumulate }, (_, a) =>
        Array.from({ length: nLayers }, (_, l) => {
          const of = (k: string) => tensors.get(`carry.${a}.${l}.${k}`)!;
          return {
            h: keep(tensor(of("h").data, [...of("h").shape])),
            inputs: keep(tensor(of("inputs").data, [...of("inputs").shape])),
          };
        }))
    );
    this.#dropCarried();
    this.#carried = carried;
  }

  /** Mean loss over `evalBatches` fixed validation batches (the same every time), each of accumulate x batch
   * windows run batch at a time: the windows and loss of a run of the same batch without accumulation. With
   * carryState, the validation part's windows 0 to evalBatches - 1 in order, each from the state the one
   * before ended in (wrapping, from zeros, past a stretch's last window). */
  async evaluate(): Promise<number> {
    const { batch: B, accumulate = 1, seq: L, evalBatches, seed, carryState } = this.config;
    const step = this.step; // the step evaluated: a step taken while the losses are read back comes after it
    const rng = new Philox(seed, EVAL_STREAM);
    const sums = keep(tensor(new Float32Array(evalBatches), [evalBatches]));
    const carried: (LayerCache[] | null)[] = []; // with carryState, each micro-batch's state so far
    let val: number;
    try {
      for (let i = 0; i < evalBatches; i++) {
        // tokens: (accumulate * B, L + 1)
        const w = carryState
          ? this.data.windowsInOrder!("val", accumulate * B, L, i)
          : { ids: this.data.windows("val", accumulate * B, L, rng), first: false };
        if (w.first) dispose(carried.splice(0)); // the stretches start again
        const { loss, next } = noGrad(() => this.#batchLoss(w.ids, false, carryState ? carried : null)); // loss: []
        if (next) dispose(carried.splice(0, carried.length, ...next));
        recordCopy(loss.storage.buffer, 0, sums.storage.buffer, 4 * i, 4);
        loss.dispose();
      }
      [, , val] = await this.#reading(
        readBuffer(sums.storage.buffer, 0, 4 * evalBatches).then((bytes) => {
          const v = new Float32Array(bytes);
          return ["val", step, v.reduce((a, b) => a + b, 0) / evalBatches];
        }),
      );
    } finally {
      sums.dispose();
      dispose(carried);
    }
    this.log.val.push([step, val]);
    return val;
  }

  /** Tracks a log row's readback until it ends (read or failed). */
  #reading(
    read: Promise<["train" | "val", number, number]>,
  ): Promise<["train" | "val", number, number]> {
    this.#inFlight.add(read);
    const done = () => this.#inFlight.delete(read);
    read.then(done, done);
    return read;
  }

  /**
   * The log rows whose readback is in flight when called (a step's mean loss or an evaluation not yet logged),
   * as they will be logged: a save records the log as it is at its call, these included.
   */
  logsInFlight(): Promise<{ train: [number, number][]; val: [number, number][] }> {
    return Promise.all([...this.#inFlight]).then((rows) => ({
      train: rows.filter(([part]) => part === "train").map(([, step, x]) => [step, x]),
      val: rows.filter(([part]) => part === "val").map(([, step, x]) => [step, x]),
    }));
  }

  /** Losses of the steps since the last logged mean (saved with a checkpoint so that a resume logs alike). */
  async pendingLosses(): Promise<number[]> {
    if (this.#pending === 0) return [];
    return [...new Float32Array(await readBuffer(this.#losses.storage.buffer, 0, 4 * this.#pending))];
  }

  /** Restores losses saved by {@linkcode Trainer.pendingLosses}. */
  restorePendingLosses(losses: number[]): void {
    if (losses.length >= this.config.logEvery) {
      throw new Error(`${losses.length} pending losses, logEvery is ${this.config.logEvery}`);
    }
    const fresh = tensor(
      Float32Array.from([...losses, ...new Array(this.config.logEvery - losses.length).fill(0)]),
      [
        this.config.logEvery,
      ],
    );
    recordCopy(fresh.storage.buffer, 0, this.#losses.storage.buffer, 0, 4 * this.config.logEvery);
    fresh.dispose();
    this.#pending = losses.length;
  }

  /** Frees the optimizer state, the loss log and the carried states (not the model). */
  dispose(): void {
    this.opt.dispose();
    this.#losses.dispose();
    this.#dropCarried();
  }
}
