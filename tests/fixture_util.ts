/**
 * Test helpers for the PyTorch golden fixtures in tests/fixtures (copied from the shared set), and the
 * tolerance policy that every comparison of a float32 result with a fixture or with another implementation
 * of the same computation uses.
 * @module
 */

import { AssertionError } from "node:assert/strict";
import { readSafetensorsFile } from "../core/safetensors_fs.ts";
import { deviceInfo, init } from "../core/device.ts";
import { tensor } from "../core/creation.ts";
import { Tensor, tidy } from "../core/tensor.ts";
import { noGrad } from "../core/autograd.ts";
import type { MambaLM } from "../mamba/lm.ts";
import type { DecodedTensor } from "../core/safetensors.ts";
import { type MambaConfig, mambaConfig, type MambaConfigInput } from "../mamba/config.ts";

/** Absolute path of a fixture file. */
export function fixturePath(name: string): string {
  return new URL(`./fixtures/${name}`, import.meta.url).pathname;
}

/** Loads a fixture's tensors by name, initialising the device. */
export async function loadFixture(name: string): Promise<Map<string, DecodedTensor>> {
  await init();
  return (await readSafetensorsFile(fixturePath(name))).tensors;
}

/** Uploads one fixture tensor. */
export function toTensor(f: Map<string, DecodedTensor>, key: string, requiresGrad = false): Tensor {
  const e = f.get(key);
  if (!e) throw new Error(`fixture has no tensor '${key}'`);
  return tensor(e.data, e.shape, { requiresGrad });
}

/**
 * The MambaConfig of a fixture, read in full from its `config` metadata (mamba.py's MambaConfig fields). A
 * key this function does not know is an error, so that a fixture made with an option it does not map is not
 * run with the library's default for it. `over` sets what the fixture does not fix (scan, recompute).
 */
export async function fixtureConfig(
  name: string,
  over: Partial<MambaConfigInput> = {},
): Promise<MambaConfig> {
  const meta = (await readSafetensorsFile(fixturePath(name))).header.metadata;
  const c = JSON.parse(meta.config);
  const MAPPED: Record<string, keyof MambaConfigInput> = {
    d_model: "dModel",
    n_layers: "nLayers",
    d_state: "dState",
    expand_factor: "expandFactor",
    d_conv: "dConv",
    dt_rank: "dtRank",
    dt_min: "dtMin",
    dt_max: "dtMax",
    dt_init: "dtInit",
    dt_scale: "dtScale",
    rms_norm_eps: "rmsNormEps",
    base_std: "baseStd",
    bias: "bias",
    conv_bias: "convBias",
    inner_layernorms: "innerLayernorms",
    mup: "mup",
  };
  // Checked below, or a choice of mamba.py's implementation that does not change the function.
  const OTHER = new Set(["d_inner", "pscan", "use_cuda"]);
  const input: Record<string, unknown> = {};
  for (const [k, v] of Object.entries(c)) {
    if (k in MAPPED) input[MAPPED[k]] = v;
    else if (!OTHER.has(k)) throw new Error(`${name}: config key '${k}' is not mapped to a MambaConfig key`);
  }
  if (c.mup !== false) throw new Error(`${name}: mup ${c.mup} is not supported`);
  const config = mambaConfig({ ...(input as unknown as MambaConfigInput), ...over });
  if (config.dInner !== c.d_inner) throw new Error(`${name}: d_inner ${c.d_inner}, derived ${config.dInner}`);
  return config;
}

/** Max |a - b| over two arrays of equal length (throws when lengths differ); NaN counts as Infinity. */
export function maxAbsDiff(a: ArrayLike<number>, b: ArrayLike<number>): number {
  if (a.length !== b.length) throw new Error(`length ${a.length} vs ${b.length}`);
  let m = 0;
  for (let i = 0; i < a.length; i++) {
    const d = Math.abs(a[i] - b[i]);
    if (!(d <= m)) m = Number.isNaN(d) ? Infinity : d;
  }
  return m;
}

/** Max |x| of an array (NaN if it holds a NaN, which makes a tolerance derived from it fail closed). */
export function maxAbs(a: ArrayLike<number>): number {
  let m = 0;
  for (let i = 0; i < a.length; i++) m = Math.max(m, Math.abs(a[i]));
  return m;
}

// ------------------------------------------------------------------------------------------ tolerances

/**
 * A bound on the error of a float32 result: every element must satisfy
 * `|got - want| <= rtol * max(floor, max |want|)`, the maximum taken over the whole tensor. Errors of float32
 * sums and scans grow with the magnitude of the values they accumulate, not with each element's own value,
 * so a bound relative to the tensor's largest element is the meaningful one.
 */
export interface Bound {
  /** Relative bound. */
  rtol: number;
  /** The scale is at least this (1 for ops: values below 1 are held to an absolute rtol). */
  floor: number;
  /** What the bound is for, in messages. */
  kind: string;
}

/**
 * The tolerance policy (relative bounds, see {@linkcode Bound}). Measured errors below are from lavapipe (run
 * a test with MAMBA_TOL_REPORT=1 to print them), where they were set. On an NVIDIA H200 (2026-11-30) the
 * worst of 2749 comparisons was 13% of its bound (an op: 1.3e-6; bench/results/h200/tests_49a9be6.log), and of
 * 5628 at 2d4b27c too (tests.log); whole models stayed within 5.6e-6 (mamba_L37, fused, grad of x_proj's
 * weight) against their 1e-4.
 *
 * - `op`: one op or one kernel (a scan, the fused scan and its gradients, a step kernel, one stage of a
 *   block) against the PyTorch op, a float64 reference or another implementation of the same op: 1e-5
 *   relative to max(1, max |want|) everywhere, the project's standard for ops. Measured: linearScan
 *   against mamba.py's pscan fixtures 1.4e-7 (pscan mostly bit-exact); the fused scan against the
 *   sequential one 4.7e-7 for y and every per-element gradient; the block's stages (norm, in_proj, conv,
 *   x_proj) 2e-7; the fused step kernels 1e-7. So 20x headroom or more. (The gradients of per-channel
 *   parameters summed over tens of thousands of steps need more: `compare` in fused_cases.ts says how much
 *   and why.)
 * - `model`: a whole model (Mamba stacks, an LM's logits, losses, gradients, decoding, caches): 1e-5
 *   relative to max |want| of each tensor on a software adapter, 1e-4 on a hardware GPU.
 *   - Software adapters (lavapipe, llvmpipe, SwiftShader, WARP) run WGSL's exp, log and tanh as the CPU's
 *     IEEE-accurate float32 functions, so what is left is float32 rounding in another summation order.
 *     Measured worst: 3.1e-6 (mamba_L37, grad of layers.0.mixer.A_log, pscan; every mode <= 3.1e-6), y
 *     1.4e-7, logits and decoding-step logits 1.1e-6, losses 4.9e-7, step caches 8.7e-7, hs 1.1e-6: 3.2x
 *     headroom at the worst. This bound catches a dropped RMSNorm epsilon (1.6-1.9x over it on A_log's
 *     gradient in every fixture and mode), which the old 1e-4 let through.
 *   - Hardware GPUs compile exp/log/tanh to fast-math instructions (a few ulp per call, more for large
 *     arguments), and a model chains thousands of them through softplus, exp(delta A), silu and the scan:
 *     the standard's 1e-4 for whole models, the bound mamba.py's MANIFEST gives for a GPU reimplementation
 *     (~1e-4 absolute on outputs of magnitude 1-5, ~1e-4 relative to max |grad| on gradients).
 *
 * A test that needs a looser bound than these says why next to it.
 */
export const TOLERANCES = {
  software: { op: 1e-5, model: 1e-5 },
  hardware: { op: 1e-5, model: 1e-4 },
} as const;

/** The bound of a kind on this adapter (after `init()`; `MAMBA_ADAPTER_KIND` where a test takes the adapter for
 * another kind, as tests/gpu_path_runner.ts does, so that the bounds stay this adapter's). */
export function tolerance(kind: "op" | "model"): Bound {
  const adapter = adapterKind();
  return { rtol: TOLERANCES[adapter][kind], floor: kind === "op" ? 1 : 0, kind: `${kind} (${adapter})` };
}

function adapterKind(): "software" | "hardware" {
  let kind: string | undefined;
  try {
    kind = Deno.env.get("MAMBA_ADAPTER_KIND");
  } catch {
    // no env permission: the adapter's own flag
  }
  if (kind === "software" || kind === "hardware") return kind;
  return deviceInfo().isFallbackAdapter ? "software" : "hardware";
}

/** The measured errors of every comparison (relative, as the bound: `maxdiff / max(floor, max |want|)`). */
export const measured: { what: string; rel: number; rtol: number }[] = [];

const report = (() => {
  try {
    return Deno.env.get("MAMBA_TOL_REPORT") === "1";
  } catch {
    return false;
  }
})();

function coordOf(i: number, shape: readonly number[]): string {
  const c: number[] = [];
  let rem = i;
  for (let d = shape.length - 1; d >= 0; d--) {
    c.unshift(rem % shape[d]);
    rem = Math.floor(rem / shape[d]);
  }
  return `[${c.join(", ")}]`;
}

/** Values with their shape (a tensor's readback, or a host array). */
export interface Shaped {
  data: ArrayLike<number>;
  shape: readonly number[];
}

/**
 * Asserts that `got` has the shape and, within `bound`, the values of `want` (another array with its shape,
 * e.g. a fixture tensor); NaN anywhere fails. The message names the worst element: index, coordinate, both
 * values, the difference and the tolerance. Returns the relative error (see {@linkcode measured}); with
 * MAMBA_TOL_REPORT=1 it is printed.
 */
export function assertMatches(got: Shaped, want: Shaped, bound: Bound, what: string): number {
  if (!(Number.isFinite(bound.rtol) && bound.rtol >= 0 && bound.floor >= 0)) {
    throw new Error(`${what}: bad bound ${JSON.stringify(bound)}`);
  }
  if (got.shape.join() !== want.shape.join() || got.shape.length !== want.shape.length) {
    throw new AssertionError({ message: `${what}: shape [${got.shape}], expected [${want.shape}]` });
  }
  const n = want.shape.reduce((a, b) => a * b, 1);
  if (got.data.length !== n || want.data.length !== n) {
    throw new AssertionError({
      message: `${what}: ${got.data.length} values, expected ${want.data.length} (shape [${want.shape}])`,
    });
  }
  const scale = Math.max(bound.floor, maxAbs(want.data));
  const tol = bound.rtol * scale;
  let worst = 0, worstAt = -1;
  for (let i = 0; i < n; i++) {
    const d = Math.abs(got.data[i] - want.data[i]);
    if (!(d <= worst)) [worst, worstAt] = [Number.isNaN(d) ? Infinity : d, i];
  }
  const rel = worst === 0 ? 0 : worst / scale; // scale 0 (all zeros wanted, floor 0) with no difference
  measured.push({ what, rel, rtol: bound.rtol });
  if (report) console.log(`tolerance report: ${what}: ${rel.toExponential(2)} (bound ${bound.rtol})`);
  if (!(worst <= tol)) {
    throw new AssertionError({
      message: `${what}: max |diff| ${worst.toExponential(3)} > ${tol.toExponential(3)} = ${bound.rtol} x ` +
        `${scale.toExponential(3)} (${bound.kind}), at index ${worstAt} ${
          coordOf(worstAt, want.shape)
        }: got ` +
        `${got.data[worstAt]}, expected ${want.data[worstAt]}`,
    });
  }
  return rel;
}

/**
 * Asserts that `got` (a tensor, read back, or a host array with its shape) matches the fixture tensor `key`
 * within `bound`: the shape first, then the values (see {@linkcode assertMatches}).
 */
export async function assertMatchesFixture(
  got: Tensor | Shaped,
  f: Map<string, DecodedTensor>,
  key: string,
  bound: Bound,
  what = key,
): Promise<number> {
  const want = f.get(key);
  if (!want) throw new Error(`${what}: the fixture has no tensor '${key}'`);
  const g = got instanceof Tensor ? { data: await got.toArray(), shape: got.shape } : got;
  return assertMatches(g, want, bound, what === key ? key : `${what} (${key})`);
}

/** Asserts that `lm` gives lm_v64's logits for its tokens (a model loaded from lm_v64's weights, any layout). */
export async function assertLmV64Logits(lm: MambaLM): Promise<void> {
  const f = await loadFixture("lm_v64.safetensors");
  const tokens = toTensor(f, "tokens");
  const logits = tidy(() => noGrad(() => lm.forward(tokens)));
  try {
    await assertMatchesFixture(logits, f, "logits", tolerance("model"), "logits");
  } finally {
    logits.dispose();
    tokens.dispose();
  }
}
