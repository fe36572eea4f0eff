/**
 * One-time kernel autotuning per adapter.
 *
 * Some kernels come in variants whose speed depends on the adapter far more than on the problem: the matmul
 * `register` variant (no workgroup memory) is several times faster than `tiled` on CPU adapters such as
 * llvmpipe/lavapipe, where workgroup barriers are very expensive, while GPUs may favour workgroup-memory tiles
 * (the H200 picked `register`: 6.4 TFLOP/s against 1.5 for `tiled`).
 * {@linkcode tuneKernels} measures the variants on the current adapter, selects the fastest, and remembers
 * the choice in `localStorage` (when the platform has it) under a key made of the adapter's description and
 * the kernels' version, so later processes on the same adapter skip the measurement.
 *
 * ```ts
 * import { init, tuneKernels } from "@mambats/mamba";
 *
 * await init();
 * const t = await tuneKernels(); // measures once per adapter, then reads the cached choice
 * console.log(t.variant, t.fromCache, t.gflops);
 * ```
 * @module
 */

import { acquired, deviceInfo } from "./device.ts";
import { sync } from "./executor.ts";
import { rand } from "./creation.ts";
import {
  availableMatmulVariants,
  MATMUL_KERNEL_VERSION,
  matmulGpuSplit,
  matmulMatvec,
  matmulRaw,
  matmulTuneCandidates,
  type MatmulVariant,
  setMatmulGpuSplit,
  setMatmulMatvec,
  setMatmulVariant,
} from "./ops/matmul.ts";

/** Options of {@linkcode tuneKernels}. */
export interface TuneOptions {
  /** Measure even when a cached choice exists (and overwrite the cache). Default false. */
  force?: boolean;
}

/** What {@linkcode tuneKernels} decided, and on what grounds. */
export interface TuneResult {
  /** The matmul variant now in use. */
  variant: MatmulVariant;
  /** True when the choice came from the cache, without measuring. */
  fromCache: boolean;
  /** Adapter description the choice is for. */
  adapter: string;
  /** The `localStorage` key of the choice (adapter and kernel version). */
  key: string;
  /** Measured speed of each variant in GFLOP/s (over all measured sizes), from the cache or just now. */
  gflops: Partial<Record<MatmulVariant, number>>;
  /** Square matmul sizes that were measured. */
  sizes: number[];
  /** When the measurement was made (ISO 8601). */
  measuredAt: string;
  /**
   * GPUs: whether matmuls split K until enough invocations run (`matmulGpuSplit`), as measured: the
   * `SPLIT_PROBES` timed both ways with the chosen variant, back to back between waits, so that
   * the split's extra dispatches count as much as the time they save; null where not measured (CPU
   * adapters, which never split so).
   */
  gpuSplit: boolean | null;
  /** The probes' total ms with the split on and off, each the mean of two passes (measured on, off, off, on;
   * null where not measured). */
  splitMs: { on: number; off: number } | null;
  /** GPUs: whether a few rows against a weight take the matvec kernel (`setMatmulMatvec`), as measured: the
   * `MATVEC_PROBES` timed both ways, as the split; null where not measured. */
  matvec: boolean | null;
  /** The matvec probes' total ms with it on and off (null where not measured). */
  matvecMs: { on: number; off: number } | null;
}

/** A product the tuner times: op(A) (M x K) @ op(B) (K x N). */
export interface TuneProduct {
  M: number;
  K: number;
  N: number;
  transA?: boolean;
  transB?: boolean;
}

/**
 * Products a GPU's split over K changes (few invocations, K >= 256): a layer's input and weight gradients at
 * d_model 64, L 1024. (Until matmul-10 also decoding's out_proj at mamba-130m's width; matrix-vector products
 * like it now take the matvec kernel on GPUs, split or not: `setMatmulMatvec`.)
 */
export const SPLIT_PROBES: readonly TuneProduct[] = [
  { M: 1024, K: 256, N: 64 },
  { M: 256, K: 1024, N: 64, transA: true },
];

/** Products the matvec kernel takes on GPUs: decoding's in_proj and out_proj at mamba-130m's width. */
export const MATVEC_PROBES: readonly TuneProduct[] = [
  { M: 1, K: 768, N: 3072, transB: true },
  { M: 1, K: 1536, N: 768, transB: true },
];

/** Square sizes the tuner measures: small, so a first run costs about a second on a CPU adapter. */
const TUNE_SIZES = [256, 512];
/** A timed batch's calls should last at least this long without the wait, so that the wait's ~11 ms, and its
 * variation, are a small part of the batch. */
const MIN_BATCH_MS = 40;
/** ... but no more than this many calls. The split's probes are small products, tens of µs on a fast GPU:
 * 256 calls (the cap until 2026-11-30) would last some 5-10 ms there (estimated from the H200's kernel times),
 * under the wait they were measured against. */
const MAX_REPS = 4096;
const KEY_PREFIX = "mamba.ts/tune/";

let current: TuneResult | null = null;
let pending: Promise<TuneResult> | null = null;

/** The result of the last {@linkcode tuneKernels} in this process, or null before the first. */
export function tuneResult(): TuneResult | null {
  return current;
}

/**
 * Measures the matmul variants once per adapter and selects the fastest with `setMatmulVariant`.
 *
 * Acquires the device if needed (`init()`). Each variant multiplies square matrices of 256 and 512: one
 * untimed dispatch first (pipeline compilation), then batches of dispatches between two waits, growing
 * until a batch's calls last at least 40 ms not counting the wait (at most 4096 calls); the cost of an empty
 * wait, measured first, is subtracted. The variant with the highest GFLOP/s over both sizes wins. On a GPU it then times the
 * `SPLIT_PROBES` (a layer's gradients) with that variant, with `matmulGpuSplit` on and off, and keeps
 * the faster (`TuneResult.gpuSplit`), and likewise the `MATVEC_PROBES` (decoding's products) with the
 * matvec kernel on and off (`TuneResult.matvec`). On a CPU adapter the first
 * measurement takes about 1-2 s.
 *
 * The choice is cached in `localStorage` under `mamba.ts/tune/<kernel version>/<adapter>`; a later call
 * (in this process or a later one on the same adapter) reads it instead of measuring, unless
 * `options.force` is set. Deno keeps `localStorage` per `--location`, else per configuration file
 * (deno.json), else per main module; where `localStorage` is missing or refuses access (some browsers,
 * permissions), the tuner measures in every process. Inputs come from seeded generators of their own: the
 * global random stream is not advanced. Concurrent calls share one measurement.
 *
 * {@linkcode tuneResult} returns the last result; `matmulVariant()` the variant in use.
 */
export function tuneKernels(options: TuneOptions = {}): Promise<TuneResult> {
  pending ??= tune(options).then(async (r) => {
    for (const fn of tuners.values()) await fn(options.force ?? false);
    return r;
  }).finally(() => pending = null);
  return pending;
}

/** Whether a {@linkcode tuneKernels} call is in progress (`init()` does not start another: a tune that was
 * called before `init()` waits for the device, and the device must not wait for that tune). */
export function tuningInProgress(): boolean {
  return pending !== null;
}

const tuners = new Map<string, (force: boolean) => Promise<unknown>>();

/**
 * Registers the tuner of another kernel family (the fused selective scan registers one when its module
 * loads); {@linkcode tuneKernels} runs them after the matmul's. Each caches its own choice.
 */
export function registerTuner(name: string, fn: (force: boolean) => Promise<unknown>): void {
  tuners.set(name, fn);
}

async function tune(options: TuneOptions): Promise<TuneResult> {
  await acquired();
  const adapter = adapterName();
  const key = tuneCacheKey();
  if (!options.force) {
    const cached = readCache(key);
    if (cached) {
      setMatmulVariant(cached.variant);
      setMatmulGpuSplit(cached.gpuSplit ?? true);
      setMatmulMatvec(cached.matvec ?? true);
      current = { ...cached, fromCache: true, adapter, key };
      return current;
    }
  }
  const overhead = await waitCost();
  const flops: Record<string, number> = {};
  const ms: Record<string, number> = {};
  const variants = matmulTuneCandidates();
  const splitBefore = matmulGpuSplit();
  setMatmulGpuSplit(true); // the variants are compared as they will run by default
  try {
    for (const v of variants) {
      flops[v] = 0;
      ms[v] = 0;
      for (const n of TUNE_SIZES) {
        ms[v] += await timeProduct(v, { M: n, K: n, N: n }, overhead);
        flops[v] += 2 * n ** 3;
      }
    }
  } finally {
    setMatmulGpuSplit(splitBefore); // a failed measurement leaves the settings as they were
  }
  const gflops: Partial<Record<MatmulVariant, number>> = {};
  for (const v of variants) gflops[v] = flops[v] / ms[v] / 1e6;
  const variant = variants.reduce((best, v) => ((gflops[v] ?? 0) > (gflops[best] ?? 0) ? v : best));
  // the split and matvec first: if they fail, the variant does not change
  const split = deviceInfo().isFallbackAdapter ? null : await tuneGpuSplit(variant, overhead);
  const mv = deviceInfo().isFallbackAdapter ? null : await tuneMatvec(variant, overhead);
  setMatmulVariant(variant);
  current = {
    variant,
    fromCache: false,
    adapter,
    key,
    gflops,
    sizes: [...TUNE_SIZES],
    measuredAt: new Date().toISOString(),
    gpuSplit: split?.gpuSplit ?? null,
    splitMs: split?.splitMs ?? null,
    matvec: mv?.matvec ?? null,
    matvecMs: mv?.matvecMs ?? null,
  };
  writeCache(key, current);
  return current;
}

/** The fixed cost of one wait with no work (best of 3), in ms; timings subtract it. */
export async function waitCost(): Promise<number> {
  let best = Infinity;
  for (let i = 0; i < 3; i++) {
    const t0 = performance.now();
    await sync();
    best = Math.min(best, performance.now() - t0);
  }
  return best;
}

/**
 * Times the `SPLIT_PROBES` with a variant, with the GPU split on and off, and keeps the faster
 * (`setMatmulGpuSplit`). Runs on any adapter (the split applies on GPUs only: on a CPU adapter both ways
 * plan alike unless the adapter is taken for a GPU).
 */
export async function tuneGpuSplit(
  variant: MatmulVariant,
  overhead: number,
): Promise<{ gpuSplit: boolean; splitMs: { on: number; off: number } }> {
  const splitMs = await bothWays(variant, overhead, SPLIT_PROBES, matmulGpuSplit, setMatmulGpuSplit);
  return { gpuSplit: matmulGpuSplit(), splitMs };
}

/**
 * Times the `MATVEC_PROBES` with a variant, with the matvec kernel on and off (with the GPU split as
 * set), and keeps the faster (`setMatmulMatvec`). As {@linkcode tuneGpuSplit}, it runs on any adapter; only
 * GPU plans take matvec.
 */
export async function tuneMatvec(
  variant: MatmulVariant,
  overhead: number,
): Promise<{ matvec: boolean; matvecMs: { on: number; off: number } }> {
  const matvecMs = await bothWays(variant, overhead, MATVEC_PROBES, matmulMatvec, setMatmulMatvec);
  return { matvec: matmulMatvec(), matvecMs };
}

/** Times `probes` with a setting on and off (on, off, off, on: a drift of the clocks over the measurement, a
 * GPU leaving its idle clock, hits both), back to back between waits so that extra dispatches count, and
 * leaves the faster set; as it was, should a measurement throw. Returns the ms of each way. */
async function bothWays(
  variant: MatmulVariant,
  overhead: number,
  probes: readonly TuneProduct[],
  get: () => boolean,
  set: (on: boolean) => void,
): Promise<{ on: number; off: number }> {
  const ms = { on: 0, off: 0 };
  const before = get();
  try {
    for (const on of [true, false, false, true]) {
      set(on);
      for (const p of probes) ms[on ? "on" : "off"] += await timeProduct(variant, p, overhead) / 2;
    }
  } catch (e) {
    set(before);
    throw e;
  }
  set(ms.on <= ms.off);
  return ms;
}

/** Milliseconds per product of a variant (batches of calls between waits, the wait's cost subtracted). */
async function timeProduct(variant: MatmulVariant, p: TuneProduct, overhead: number): Promise<number> {
  const a = rand(p.transA ? [p.K, p.M] : [p.M, p.K], { seed: 1 });
  const b = rand(p.transB ? [p.N, p.K] : [p.K, p.N], { seed: 2 });
  const opts = { transA: p.transA ?? false, transB: p.transB ?? false };
  try {
    const run = async (reps: number) => {
      const t0 = performance.now();
      for (let i = 0; i < reps; i++) matmulRaw(a, b, opts, variant).dispose();
      await sync();
      return performance.now() - t0;
    };
    await run(1); // compiles the pipeline
    let reps = 1;
    let t = await run(reps);
    while (t - overhead < MIN_BATCH_MS && reps < MAX_REPS) {
      reps = Math.min(MAX_REPS, reps * Math.max(2, Math.ceil(MIN_BATCH_MS / Math.max(t - overhead, 1))));
      t = await run(reps);
    }
    // The wait's fixed cost cancels; keep a floor so a noisy subtraction cannot go to zero.
    return Math.max(t - overhead, t * 0.05) / reps;
  } finally {
    a.dispose();
    b.dispose();
  }
}

/** `localStorage`, or null where the platform lacks it or refuses access. */
function storage(): Storage | null {
  try {
    return (globalThis as { localStorage?: Storage }).localStorage ?? null;
  } catch {
    return null;
  }
}

/**
 * Removes the cached choices of other kernel versions: keys that start with `family` but not with `current`
 * (a prefix of the family naming this version). Each kernel change bumps the version, and a browser's
 * `localStorage` (a few MiB per origin, shared with the page) would otherwise keep every old choice.
 */
export function dropStaleTuneKeys(family: string, current: string): void {
  try {
    const s = storage();
    if (!s) return;
    const stale: string[] = [];
    for (let i = 0; i < s.length; i++) {
      const k = s.key(i);
      if (k !== null && k.startsWith(family) && !k.startsWith(current)) stale.push(k);
    }
    for (const k of stale) s.removeItem(k);
  } catch {
    // No storage or no permission: nothing was kept there either.
  }
}

function readCache(key: string): Omit<TuneResult, "fromCache" | "adapter" | "key"> | null {
  try {
    const text = storage()?.getItem(key);
    if (!text) return null;
    const v = JSON.parse(text);
    if (!availableMatmulVariants().includes(v?.variant)) return null;
    return {
      variant: v.variant,
      gflops: typeof v.gflops === "object" && v.gflops ? v.gflops : {},
      sizes: Array.isArray(v.sizes) ? v.sizes : [],
      measuredAt: typeof v.measuredAt === "string" ? v.measuredAt : "",
      gpuSplit: typeof v.gpuSplit === "boolean" ? v.gpuSplit : null,
      splitMs: onOff(v.splitMs),
      matvec: typeof v.matvec === "boolean" ? v.matvec : null,
      matvecMs: onOff(v.matvecMs),
    };
  } catch {
    return null;
  }
}

/** A cached { on, off } pair of ms, or null where malformed. */
function onOff(v: { on?: unknown; off?: unknown } | undefined): { on: number; off: number } | null {
  return typeof v?.on === "number" && typeof v?.off === "number" ? { on: v.on, off: v.off } : null;
}

function writeCache(key: string, r: TuneResult): void {
  try {
    const { variant, gflops, sizes, measuredAt, gpuSplit, splitMs, matvec, matvecMs } = r;
    storage()?.setItem(
      key,
      JSON.stringify({ variant, gflops, sizes, measuredAt, gpuSplit, splitMs, matvec, matvecMs }),
    );
    dropStaleTuneKeys(KEY_PREFIX, `${KEY_PREFIX}${MATMUL_KERNEL_VERSION}/`);
  } catch {
    // No storage, quota or permission: the choice holds for this process only.
  }
}

/** The adapter as the tuner names it: description, vendor, subgroup size (GL and Vulkan llvmpipe differ). */
function adapterName(): string {
  const info = deviceInfo();
  return `${info.description} (${info.vendor || "unknown vendor"}, subgroup ${info.subgroupMaxSize})`;
}

/** The `localStorage` key of the tuner's choice on this adapter and kernel version; needs `init()` first. */
export function tuneCacheKey(): string {
  return `${KEY_PREFIX}${MATMUL_KERNEL_VERSION}/${adapterName()}`;
}
