/**
 * `MambaConfig`: mamba.py's config fields, camelCase, with the same defaults, validated; not `use_cuda`, and
 * mamba.py's `pscan` flag became `scan`.
 * @module
 */

import type { ScanMode } from "../scan/linear_scan.ts";

/** What a user passes: `dModel` and `nLayers`, everything else optional. */
export interface MambaConfigInput {
  /** Model width D. */
  dModel: number;
  /** Number of residual Mamba blocks. */
  nLayers: number;
  /** Rank of the delta projection; "auto" = ceil(dModel / 16). */
  dtRank?: number | "auto";
  /** State size N per channel (16). */
  dState?: number;
  /** E: inner width ED = E * D (2). */
  expandFactor?: number;
  /** Kernel size of the causal depthwise conv (4). */
  dConv?: number;
  /** Smallest initial delta (0.001). The five dt keys set a bare `Mamba`'s dt_proj initialisation;
   * `MambaLM` re-draws dt_proj.weight and zeroes its bias, as mamba.py's `LM._init_weights` does. */
  dtMin?: number;
  /** Largest initial delta (0.1). */
  dtMax?: number;
  /** Initialisation of dt_proj.weight: "random" (uniform) or "constant" ("random"). */
  dtInit?: "random" | "constant";
  /** Scale of dt_proj.weight's initialisation (1.0). */
  dtScale?: number;
  /** Floor of the initial delta (1e-4). */
  dtInitFloor?: number;
  /** RMSNorm epsilon (1e-5). */
  rmsNormEps?: number;
  /** Std of the LM's normal initialisation (0.02). */
  baseStd?: number;
  /** Bias in in_proj and out_proj (false). */
  bias?: boolean;
  /** Bias in the conv (true). */
  convBias?: boolean;
  /** RMSNorm on delta, B and C after x_proj (false). */
  innerLayernorms?: boolean;
  /** muP, as mamba.py's `mup` (false): RMSNorms without weights, `MambaLM`'s muP initialisation and its
   * logits divided by the width multiplier dModel / mupBaseWidth, and `configureOptimizers`'s
   * learning rate / multiplier (weight decay x multiplier) for in_proj, x_proj, dt_proj and out_proj. */
  mup?: boolean;
  /** The width that muP's hyper-parameters were tuned at (128), as mamba.py's `mup_base_width`. */
  mupBaseWidth?: number;
  /** How the selective scan runs: "fused" (default: one kernel per block of 16 states, recomputing backward;
   * pscan on an adapter that cannot bind 10 storage buffers), "pscan" or "sequential". */
  scan?: ScanMode | "fused";
  /** Keep only each block's input (and, with the fused scan, its chunk states) and re-run its norm, in_proj,
   * conv and x_proj in the backward (true). The fused scan and out_proj are not re-run: their op replays,
   * its backward recomputing y (see `fusedMambaScanOut`: on adapters without an 11th storage buffer, above
   * d_state 16 and dt rank 8, that is the scan's forward kernel again); with pscan or sequential, the scan
   * and out_proj run again too. "input": keep the block's input alone and re-run the whole block, the fused
   * scan's forward and out_proj included (`checkpointInputsOnly`): ED N / Lc floats per token less to keep
   * per layer (half the block input's D floats for the pretrained shapes at Lc 64), one forward scan and
   * product more.
   * false: keep what each op's backward needs. */
  recompute?: boolean | "input";
}

/** A complete, validated configuration with derived sizes. */
export interface MambaConfig extends Required<Omit<MambaConfigInput, "dtRank">> {
  /** Resolved dt rank. */
  dtRank: number;
  /** ED = expandFactor * dModel. */
  dInner: number;
}

const DEFAULTS = {
  dtRank: "auto" as number | "auto",
  dState: 16,
  expandFactor: 2,
  dConv: 4,
  dtMin: 0.001,
  dtMax: 0.1,
  dtInit: "random" as "random" | "constant",
  dtScale: 1.0,
  dtInitFloor: 1e-4,
  rmsNormEps: 1e-5,
  baseStd: 0.02,
  bias: false,
  convBias: true,
  innerLayernorms: false,
  mup: false,
  mupBaseWidth: 128,
  scan: "fused" as ScanMode | "fused",
  recompute: true as boolean | "input",
};

const INT_KEYS = ["dModel", "nLayers", "dState", "expandFactor", "dConv"] as const;
/** The largest finite f32. */
const F32_MAX = 3.4028234663852886e38;
const POS_KEYS = [
  "dtMin",
  "dtMax",
  "dtScale",
  "dtInitFloor",
  "rmsNormEps",
  "baseStd",
  "mupBaseWidth",
] as const;
const BOOL_KEYS = ["bias", "convBias", "innerLayernorms", "mup"] as const;

// A value for a message: numbers as JavaScript writes them (Infinity, NaN), anything else as JSON.
const show = (v: unknown) => typeof v === "number" ? String(v) : JSON.stringify(v);

/**
 * Fills defaults and validates; every error names the key and the value. A key set to `undefined` takes its
 * default (as if absent), so options can be passed through: `{ dModel, nLayers, dState: opts.dState }`.
 */
export function mambaConfig(config: MambaConfigInput | MambaConfig): MambaConfig {
  if (typeof config !== "object" || config === null || Array.isArray(config)) {
    throw new Error(`MambaConfig must be an object with dModel and nLayers, got ${show(config)}`);
  }
  // A resolved config passed back in: dInner is derived, and must agree with what it derives from.
  const { dInner, ...input } = config as MambaConfigInput & { dInner?: number };
  const known = new Set(["dModel", "nLayers", ...Object.keys(DEFAULTS)]);
  for (const k of Object.keys(input)) {
    if (!known.has(k)) throw new Error(`MambaConfig: unknown key '${k}'`);
  }
  const given = Object.fromEntries(Object.entries(input).filter(([, v]) => v !== undefined));
  const c = { ...DEFAULTS, ...given } as Required<MambaConfigInput>;
  // sizes within int32 and values within f32: past them a size fails later at an allocation that does not
  // name the key, and a value becomes Infinity on the GPU (dtScale 1e39 made every output NaN). (nLayers
  // sizes no tensor: a loader compares it with the checkpoint's layers, and says that better.)
  for (const k of INT_KEYS) {
    if (!Number.isInteger(c[k]) || c[k] <= 0 || (k !== "nLayers" && c[k] > 2 ** 31 - 1)) {
      throw new Error(`MambaConfig: ${k} must be a positive integer below 2^31, got ${show(c[k])}`);
    }
  }
  for (const k of POS_KEYS) {
    if (typeof c[k] !== "number" || !(c[k] > 0) || !(c[k] <= F32_MAX)) {
      throw new Error(`MambaConfig: ${k} must be a positive number within f32's range, got ${show(c[k])}`);
    }
  }
  for (const k of BOOL_KEYS) {
    if (typeof c[k] !== "boolean") {
      throw new Error(`MambaConfig: ${k} must be a boolean, got ${show(c[k])}`);
    }
  }
  if (typeof c.recompute !== "boolean" && c.recompute !== "input") {
    throw new Error(`MambaConfig: recompute must be true, false or "input", got ${show(c.recompute)}`);
  }
  if (c.dtMin > c.dtMax) throw new Error(`MambaConfig: dtMin ${c.dtMin} is greater than dtMax ${c.dtMax}`);
  if (c.dtInit !== "random" && c.dtInit !== "constant") {
    throw new Error(`MambaConfig: dtInit must be "random" or "constant", got ${show(c.dtInit)}`);
  }
  if (c.scan !== "fused" && c.scan !== "pscan" && c.scan !== "sequential") {
    throw new Error(
      `MambaConfig: scan must be "fused", "pscan" or "sequential", got ${show(c.scan)}`,
    );
  }
  if (c.mup && !Number.isFinite(c.dModel / c.mupBaseWidth)) {
    throw new Error(
      `MambaConfig: mupBaseWidth ${c.mupBaseWidth} makes the width multiplier dModel / mupBaseWidth overflow`,
    );
  }
  const dtRank = c.dtRank === "auto" ? Math.ceil(c.dModel / 16) : c.dtRank;
  if (!Number.isInteger(dtRank) || dtRank <= 0 || dtRank > 2 ** 31 - 1) {
    throw new Error(
      `MambaConfig: dtRank must be "auto" or a positive integer below 2^31, got ${show(c.dtRank)}`,
    );
  }
  const derived = c.expandFactor * c.dModel;
  if (derived > 2 ** 31 - 1) {
    throw new Error(
      `MambaConfig: expandFactor * dModel (the inner width, ${c.expandFactor} * ${c.dModel}) must be below 2^31`,
    );
  }
  if (dInner !== undefined && dInner !== derived) {
    throw new Error(
      `MambaConfig: dInner is ${
        show(dInner)
      }, but expandFactor * dModel = ${c.expandFactor} * ${c.dModel} = ` +
        `${derived}. dInner is derived: leave it out (and give dtRank: "auto" if the rank should follow ` +
        "dModel, ceil(dModel / 16))",
    );
  }
  return { ...c, dtRank, dInner: derived };
}

/** muP's width multiplier dModel / mupBaseWidth (mamba.py's `mup_width_mult`); 1 without muP. */
export function mupWidthMult(c: MambaConfig): number {
  return c.mup ? c.dModel / c.mupBaseWidth : 1;
}
