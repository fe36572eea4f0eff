/**
 * Training a character-level Mamba LM: the data, the step (forward, loss, backward, clip, AdamW), evaluation,
 * and checkpoints that hold everything a bit-exact resume needs. Used by `deno task train` and `deno task demo`.
 *
 * A step reads nothing back: the loss is copied into a small GPU log that is read every `logEvery` steps.
 * Batches come from a counter-based generator keyed by (seed, step), so a resumed run draws the same batches.
 * @module
 */

import { tensor } from "../core/creation.ts";
import { readBuffer, recordCopy } from "../core/executor.ts";
import { crossEntropy, narrow } from "../core/ops/index.ts";
import { noGrad } from "../core/autograd.ts";
import { Philox } from "../core/random.ts";
import { keep, type Tensor, tidy } from "../core/tensor.ts";
import { configureOptimizers, cosineSchedule, gradNormScale } from "../nn/optim.ts";
import type { AdamW } from "../nn/optim.ts";
import type { MambaLM } from "./lm.ts";
import { ensureFusedTuned } from "../scan/tune_fused.ts";

/** Hyper-parameters of a run (mamba.py's char-model recipe by default). */
export interface TrainConfig {
  /** Optimizer steps. */
  steps: number;
  /** Sequences per batch. */
  batch: number;
  /** Characters per sequence. */
  seq: number;
  /** Peak learning rate. */
  lr: number;
  /** Final learning rate of the cosine decay. */
  minLr: number;
  /** Linear warm-up steps. */
  warmup: number;
  /** AdamW weight decay of 2-D weights. */
  weightDecay: number;
  /** AdamW betas. */
  betas: [number, number];
  /** Global gradient-norm clip. */
  clip: number;
  /** Seed of the initialisation and the batches. */
  seed: number;
  /** Steps between validation evaluations. */
  evalEvery: number;
  /** Batches per validation evaluation. */
  evalBatches: number;
  /** Steps between loss readbacks (the logged train loss is the mean over them). */
  logEvery: number;
}

/** The recipe of ../shared/models/char-mamba's PyTorch run. */
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
  /** [step, mean train loss over the last logEvery steps] */
  train: [number, number][];
  /** [step, validation loss] */
  val: [number, number][];
  /** [step, seconds since the run started, cumulated over resumes] */
  time: [number, number][];
}

/** A text as bytes, split into training (first 90%) and validation (last 10%) parts. */
export class CharDataset {
  /** Training bytes. */
  readonly train: Uint8Array;
  /** Validation bytes. */
  readonly val: Uint8Array;

  /** Splits `bytes`; `valFrac` of the end is held out. */
  constructor(bytes: Uint8Array, valFrac = 0.1) {
    const cut = Math.floor(bytes.length * (1 - valFrac));
    this.train = bytes.subarray(0, cut);
    this.val = bytes.subarray(cut);
  }

  /** B random windows of L + 1 bytes (inputs and shifted targets), drawn from `rng`. */
  windows(split: "train" | "val", B: number, L: number, rng: Philox): Int32Array {
    const src = split === "train" ? this.train : this.val;
    if (src.length < L + 2) {
      throw new Error(`the ${split} text has ${src.length} bytes, fewer than seq + 2 = ${L + 2}`);
    }
    const out = new Int32Array(B * (L + 1));
    for (let b = 0; b < B; b++) {
      const start = rng.nextU32() % (src.length - L - 1);
      for (let t = 0; t <= L; t++) out[b * (L + 1) + t] = src[start + t];
    }
    return out;
  }
}

/** One training run's moving parts. */
export class Trainer {
  /** The optimizer (mamba.py's grouping). */
  readonly opt: AdamW;
  /** Learning rate per step. */
  readonly schedule: (step: number) => number;
  /** Completed steps. */
  step = 0;
  /** The loss curve so far. */
  log: TrainLog = { train: [], val: [], time: [] };
  #losses: Tensor;
  #pending = 0;
  #tuned = false;

  /** Builds the optimizer and schedule for `model`. */
  constructor(readonly model: MambaLM, readonly data: CharDataset, readonly config: TrainConfig) {
    this.opt = configureOptimizers(model, {
      lr: config.lr,
      weightDecay: config.weightDecay,
      betas: config.betas,
    });
    this.schedule = cosineSchedule({
      warmup: config.warmup,
      total: config.steps,
      maxLr: config.lr,
      minLr: config.minLr,
    });
    this.#losses = keep(tensor(new Float32Array(config.logEvery), [config.logEvery]));
  }

  /** The batch of a step: the same for the same (seed, step), so resumed runs see the same data. */
  batchOf(step: number): Int32Array {
    return this.data.windows(
      "train",
      this.config.batch,
      this.config.seq,
      new Philox(this.config.seed * 1e6 + step),
    );
  }

  /**
   * One optimizer step. Returns the mean train loss of the last `logEvery` steps when it read them back
   * (every `logEvery` steps), else null.
   */
  async trainStep(): Promise<number | null> {
    if (!this.#tuned) {
      this.#tuned = true;
      const { scan, dState } = this.model.config;
      if (scan === "fused") await ensureFusedTuned(dState); // init() measured N = 16 only
    }
    const { batch: B, seq: L, clip, logEvery } = this.config;
    const tokens = this.batchOf(this.step);
    this.opt.lr = this.schedule(this.step);
    tidy(() => {
      const ids = tensor(tokens, [B, L + 1], { dtype: "i32" });
      const x = narrow(ids, 1, 0, L); // x: (B, L)
      const y = narrow(ids, 1, 1, L); // y: (B, L)
      const loss = crossEntropy(this.model.forward(x), y); // loss: []
      loss.backward();
      const { scale } = gradNormScale(this.model.parameters(), clip);
      this.opt.step({ gradScale: scale });
      this.opt.zeroGrad();
      recordCopy(loss.storage.buffer, 0, this.#losses.storage.buffer, 4 * this.#pending, 4);
    });
    this.step++;
    this.#pending++;
    if (this.#pending < logEvery && this.step < this.config.steps) return null;
    const losses = new Float32Array(await readBuffer(this.#losses.storage.buffer, 0, 4 * this.#pending));
    const mean = losses.reduce((a, b) => a + b, 0) / this.#pending;
    this.#pending = 0;
    if (!Number.isFinite(mean)) throw new Error(`training diverged: loss ${mean} at step ${this.step}`);
    this.log.train.push([this.step, mean]);
    return mean;
  }

  /** Mean loss over `evalBatches` fixed validation batches (the same every time). */
  async evaluate(): Promise<number> {
    const { batch: B, seq: L, evalBatches, seed } = this.config;
    const rng = new Philox(seed * 1e6 - 1);
    const sums = keep(tensor(new Float32Array(evalBatches), [evalBatches]));
    for (let i = 0; i < evalBatches; i++) {
      const tokens = this.data.windows("val", B, L, rng);
      tidy(() =>
        noGrad(() => {
          const ids = tensor(tokens, [B, L + 1], { dtype: "i32" });
          const loss = crossEntropy(this.model.forward(narrow(ids, 1, 0, L)), narrow(ids, 1, 1, L));
          recordCopy(loss.storage.buffer, 0, sums.storage.buffer, 4 * i, 4);
        })
      );
    }
    const v = new Float32Array(await readBuffer(sums.storage.buffer, 0, 4 * evalBatches));
    sums.dispose();
    const val = v.reduce((a, b) => a + b, 0) / evalBatches;
    this.log.val.push([this.step, val]);
    return val;
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

  /** Frees the optimizer state and the loss log (not the model). */
  dispose(): void {
    this.opt.dispose();
    this.#losses.dispose();
  }
}
