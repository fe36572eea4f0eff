/**
 * Batched matrix multiplication C = op(A) @ op(B), op = identity or transpose (read through strides, no
 * copy), broadcasting over up to four leading dims.
 *
 * Three variants, chosen per adapter by a one-time measurement (see `tuneKernels` in core/tune.ts):
 * - `register`: each invocation owns an 8x8 block of C and keeps it in registers; a workgroup of 8x8
 *   invocations covers 64x64 of C (for few rows, M <= 32, flatter blocks: down to 1 row x 4 columns per
 *   invocation and 1 x 256 per workgroup). No workgroup memory and no barriers: the fast one on CPU adapters
 *   (llvmpipe/lavapipe), where barriers are very expensive and loads cost more than arithmetic. The kernel
 *   is generated per operand layout: when an operand's contiguous dim (k or m for A, n or k for B) is a
 *   multiple of 4 it is bound as `array<vec4<f32>>` and read four floats at a time (and C is written as
 *   vec4 when N is a multiple of 4). Each layout is its own pipeline, made and compiled on first use.
 * - `tiled`: a workgroup of 16x16 invocations owns a 64x64 block of C; 64x16 slices of A and B are staged
 *   in workgroup memory, and each invocation accumulates a 4x4 block from them. The default on GPUs before
 *   the tuner has measured.
 * - `tiled128`: the same template with 128x128 of C per workgroup, 128x8 slices and 8x8 per invocation (64
 *   multiply-adds per four vec4 reads of workgroup memory), the usual shape of a GPU's fast f32 matmul;
 *   measured by the tuner on GPUs only. A C that would fill under PLAIN_MIN_USE of its tiles takes the
 *   `register` kernel instead.
 * - `subgroup` (devices with subgroups of one fixed size): the `register` kernel with a workgroup of one
 *   subgroup whose lanes own neighbouring blocks and share one operand: each lane loads a share of the
 *   common rows of A (or columns of B) and subgroupBroadcast hands them to all. On lavapipe, where each load
 *   is a loop over the lanes and a broadcast almost free, 2.2-2.4x the `register` kernel's speed at 512^3.
 *
 * K is walked in slices of at most MAX_K so that no invocation loops more than 65535 times; slices after
 * the first accumulate into C. Every load and store goes through the kernel accessors, so operands larger
 * than one storage binding (128 MiB) are read through several binding windows, vec4 bindings included.
 *
 * Small C, long K (weight gradients g^T @ x: e.g. 32 x 32 of C from K = 16384 tokens): C has so few blocks
 * that one workgroup -- one CPU core on a software adapter -- would walk all of K, mostly computing rows
 * and columns outside C. Such a problem is split over K: the same kernels compute the partial products of
 * K slices in parallel, slice s into the s-th (batch, M, N) block of a scratch tensor, and the reduction
 * kernel adds them up (see SPLIT_BELOW). `register` then uses its `linear` layout: each invocation takes the
 * next (slice, batch, 8x8 block) of C, so that no invocation computes a block outside C. On a GPU the same
 * split serves another end: every problem of too few invocations to hide a GPU's load latency (weight
 * gradients, matrix-vector products while decoding) is split until enough run (see GPU_INVOCATIONS).
 * @module
 */

import { defineOp, type GradTargets, noGrad } from "../autograd.ts";
import { deviceInfo, fixedSubgroupSize } from "../device.ts";
import { dispatch, type Kernel } from "../kernel.ts";
import { KeyedCache } from "../keyed_cache.ts";
import { broadcastShapes, fmt, padRank, sameShape, type Shape, sizeOf, stridesOf } from "../shape.ts";
import type { Storage } from "../memory.ts";
import { Tensor } from "../tensor.ts";
import { sumToShape } from "./reduce.ts";
import { addSumOfFirstAxis, reduceRun } from "./reduce_kernel.ts";
import { copy } from "./shape_ops.ts";
import { rmsNorm } from "./rms_norm.ts";
import { kernelFor, type MatmulVariant, MATVEC_MAX_ROWS, matvecFor } from "./matmul_kernels.ts";

export type { MatmulVariant };

/** Options of {@linkcode matmul}. */
export interface MatmulOptions {
  /** Use A transposed in its last two dims (read through strides, no copy). */
  transA?: boolean;
  /** Use B transposed in its last two dims (read through strides, no copy). */
  transB?: boolean;
}

/** Every variant, in the order the tuner measures them. */
export const MATMUL_VARIANTS: readonly MatmulVariant[] = ["register", "tiled", "subgroup", "tiled128"];

/** The variants this device can run: `subgroup` needs subgroups of one fixed size. */
export function availableMatmulVariants(): MatmulVariant[] {
  return MATMUL_VARIANTS.filter((v) => v !== "subgroup" || fixedSubgroupSize() !== null);
}

/** The variants the tuner measures here: those this device runs, `tiled128` on GPUs only (made for a GPU's
 * large matrices; on a CPU adapter its barriers and 128x128 tiles only cost tuning time, and it runs there
 * when set, as the tests do). */
export function matmulTuneCandidates(): MatmulVariant[] {
  return availableMatmulVariants().filter((v) => v !== "tiled128" || !deviceInfo().isFallbackAdapter);
}

/**
 * Version of the matmul kernels. It is part of the tuner's cache key, so a cached choice is measured
 * again after the kernels change: bump it whenever a kernel's code or the planning of problems over them
 * changes, or the tuner's way of measuring them (matmul-8: GPUs split K by invocations; matmul-9: the tuner's
 * batches sized without the wait, so that a GPU measures its split choice again; matmul-10: the matvec kernel,
 * and decoding's out_proj, which takes it, no longer among the split's probes; matmul-11: the `tiled`
 * template's loads follow the operands' contiguous dims, and `tiled128`).
 */
export const MATMUL_KERNEL_VERSION = "matmul-11";

/** Longest K slice of one dispatch (a multiple of 16, so vec4 reads and tiles stay aligned). */
const MAX_K = 16384;

/**
 * Small C, long K, on a CPU adapter (and on a GPU with its own split off, see GPU_INVOCATIONS). A C of fewer
 * than SPLIT_BELOW workgroups with K of at least SPLIT_MIN_K is computed as partial sums over K slices
 * (split-K) in parallel -- each a multiple of 16 and at least SPLIT_MIN_SLICE long -- that are then summed;
 * at most SPLIT_MAX slices per dispatch. `tiled` takes slices until about SPLIT_GROUPS workgroups run, as
 * does `subgroup` (on CPU adapters only until each core has one). `register` takes them in its `linear` layout,
 * until about SPLIT_INVOCATIONS invocations run, when its usual blocks would leave more than a quarter of
 * their invocations outside C (PLAIN_MIN_USE; the linear layout saves that work) or when there are fewer
 * workgroups than CPU cores (a CPU adapter runs one workgroup per core). Otherwise its workgroups already
 * keep every core busy on useful work, and splitting would only add the partial sums (and the linear layout
 * reads more per multiply-add than a 64x64 block when C is wide).
 */
const SPLIT_BELOW = 8;
const SPLIT_MIN_K = 256;
const SPLIT_MIN_SLICE = 64;
const CPU_MIN_SLICE = 4096;
const SPLIT_INVOCATIONS = 1024;
const SPLIT_GROUPS = 32;
const SPLIT_MAX = 256;
/** Least share of the usual blocks' invocations inside C for `register` to keep them. At or below it the
 * linear layout was 1.3-1.7x faster on lavapipe in every shape measured (10 shapes from 1024 x 33 to
 * 4096 x 96 and 40 x 4096, K 16 to 2048; e.g. x_proj's 2048 x 33, K 32: 1.40 -> 0.98 ms); at full use it
 * was as fast or slower (1024 x 512, K 64, B not transposed: 4.7 -> 6.4 ms). */
const PLAIN_MIN_USE = 0.75;

/**
 * GPUs: a problem with K of at least SPLIT_MIN_K whose layout runs fewer than GPU_INVOCATIONS invocations is
 * split over K until about that many run, in slices of at least GPU_MIN_SLICE. Each invocation walks its K
 * slice one step after another, each step waiting for its loads, and a GPU hides that wait only with many
 * invocations per core: on the H200 (eae010e, timestamp queries) `register` with 1024 invocations took
 * 0.055 ms for 1024 x 256 x 64 (K 256: 0.6 TFLOP/s, against 1.7 at 512^3) and 0.14 ms in a layer step for the
 * in_proj weight gradient (K 1024 in 4 slices); a matrix-vector product of decoding walks all of K (768 to
 * 2048 for the pretrained models) in 1024 invocations. 32768 invocations are about eight 32-lane subgroups
 * per core of a large GPU; the partial sums then take about 32768 blocks of C at most (8 MiB for `register`'s
 * 8x8 blocks, 16 MiB for `subgroup`'s 16x8).
 */
const GPU_INVOCATIONS = 32768;
const GPU_MIN_SLICE = 32;

/** See {@linkcode matmulGpuSplit}; off, a GPU plans as before the split (SPLIT_BELOW's rules). */
let gpuSplit = true;

/** Whether a GPU splits a product of few invocations over K until about 32768 run (default on; the tuner
 * times both ways on a GPU and keeps the faster). CPU adapters never do. */
export function matmulGpuSplit(): boolean {
  return gpuSplit;
}

/** Turns the GPU split of {@linkcode matmulGpuSplit} on or off (the tuner calls this with its measured choice). */
export function setMatmulGpuSplit(on: boolean): void {
  gpuSplit = on;
}

/** See {@linkcode setMatmulMatvec}. */
let matvecOn = true;

/** Whether a GPU takes the `matvec` kernel for a few rows against a weight (see {@linkcode setMatmulMatvec}). */
export function matmulMatvec(): boolean {
  return matvecOn;
}

/**
 * Whether a GPU takes the `matvec` kernel for a few rows against a weight (default on): op(A) of 1 to 4 rows
 * (not transposed, unbatched) @ B^T with K from SPLIT_MIN_K to MAX_K (one dispatch), as decoding's products are
 * (x @ W^T). A workgroup per column of C splits K among its invocations and sums in workgroup memory: one
 * dispatch where the GPU split (GPU_INVOCATIONS) takes two, a partial product per slice and their sum, and
 * where no split (the tuner's choice on some GPU) walks K in about a thousand invocations. Whatever the split;
 * CPU adapters never take it. Off (a bench and test hook), those products plan as other small ones do.
 */
export function setMatmulMatvec(on: boolean): void {
  matvecOn = on;
}

/** How a problem is laid out: `slices` K slices of `kLen` per dispatch, in `groups` workgroups. */
interface Plan {
  kernel: Kernel;
  /** Blocks of C per batch entry along m and n (of a workgroup, or of an invocation when linear). */
  tilesM: number;
  tilesN: number;
  /** K slices summed in parallel, each into its own partial C; 1: straight into C. */
  slices: number;
  kLen: number;
  groups: number;
  /** A matvec plan's kernel with the rows RMS-normalized on the way (rmsNormMatmul); absent elsewhere. */
  rms?: Kernel;
}

/** A kernel's blocks of C before K is split: `blocks` per slice, each owned by a workgroup, or by one
 * invocation when `linear`. */
interface Layout {
  kernel: Kernel;
  tilesM: number;
  tilesN: number;
  blocks: number;
  linear: boolean;
  /** Share of the blocks' elements inside C. */
  used: number;
}

/** One product to plan: op(A) (M x K) @ op(B) (K x N) over `nb` batch entries, with a variant. */
interface Problem {
  variant: MatmulVariant;
  transA: boolean;
  transB: boolean;
  M: number;
  N: number;
  K: number;
  nb: number;
}

/** CPU cores, which a software adapter runs one workgroup each on. */
function cpuCores(): number {
  return globalThis.navigator?.hardwareConcurrency ?? SPLIT_BELOW;
}

/** A variant's usual layout (`linear`: register's layout of one small block per invocation). */
function layoutFor({ variant, transA, transB, M, N, K, nb }: Problem, linear = false): Layout {
  const { kernel, blockM, blockN } = kernelFor(variant, transA, transB, M, N, K, linear);
  const tilesM = Math.ceil(M / blockM);
  const tilesN = Math.ceil(N / blockN);
  const blocks = nb * tilesM * tilesN;
  return { kernel, tilesM, tilesN, blocks, linear, used: (nb * M * N) / (blocks * blockM * blockN) };
}

/** Invocations of one K slice of a layout. */
function invocationsOf(l: Layout): number {
  return l.linear ? l.blocks : l.blocks * l.kernel.spec.workgroupSize;
}

/** A layout's plan with K in about `want` slices of at least `minSlice` (want 1: not split). */
function planOf(l: Layout, K: number, want = 1, minSlice = SPLIT_MIN_SLICE): Plan {
  const { kLen, slices } = want > 1 ? splitK(K, want, minSlice) : { kLen: MAX_K, slices: 1 };
  const groups = l.linear ? Math.ceil((slices * l.blocks) / l.kernel.spec.workgroupSize) : slices * l.blocks;
  return { kernel: l.kernel, tilesM: l.tilesM, tilesN: l.tilesN, slices, kLen, groups };
}

/** Slice length and count for K split into about `want` slices of at least `minSlice`. */
function splitK(K: number, want: number, minSlice: number): { kLen: number; slices: number } {
  // no more than SPLIT_MAX slices: longer ones rather than more dispatches
  const kLen = Math.min(MAX_K, Math.ceil(Math.max(minSlice, K / want, K / SPLIT_MAX) / 16) * 16);
  return { kLen, slices: Math.min(SPLIT_MAX, Math.ceil(K / kLen)) };
}

/** The kernel, layout and K slices of a problem (see SPLIT_BELOW, GPU_INVOCATIONS and setMatmulMatvec). */
function planFor(p: Problem): Plan {
  const { variant, K } = p;
  const onGpu = !deviceInfo().isFallbackAdapter;
  const fewRows = p.M >= 1 && p.M <= MATVEC_MAX_ROWS && p.nb === 1 && !p.transA;
  if (onGpu && matvecOn && fewRows && p.transB && K >= SPLIT_MIN_K && K <= MAX_K) {
    const [kernel, rms] = [matvecFor(p.M, K), matvecFor(p.M, K, true)];
    return { kernel, tilesM: 1, tilesN: p.N, slices: 1, kLen: MAX_K, groups: p.N, rms };
  }
  const gpu = onGpu && gpuSplit;
  const usual = layoutFor(p);
  // `tiled128` leaves a C that would fill under PLAIN_MIN_USE of its 128x128 tiles (x_proj's 36 columns, a
  // weight gradient of 16 rows) to the register kernel, which covers it in 8x8 blocks.
  if (variant === "tiled128" && usual.used <= PLAIN_MIN_USE) return planFor({ ...p, variant: "register" });
  const narrow = variant === "register" && usual.used <= PLAIN_MIN_USE;
  if (gpu) {
    const l = narrow ? layoutFor(p, true) : usual;
    const n = invocationsOf(l);
    return K < SPLIT_MIN_K || n >= GPU_INVOCATIONS
      ? planOf(l, K)
      : planOf(l, K, Math.ceil(GPU_INVOCATIONS / n), GPU_MIN_SLICE);
  }
  const split = usual.blocks < SPLIT_BELOW && K >= SPLIT_MIN_K;
  if (variant !== "register") {
    // `tiled` takes slices until about SPLIT_GROUPS workgroups run, and so does `subgroup`, except on a CPU
    // adapter: there only until every core has a workgroup, in slices of at least CPU_MIN_SLICE, as shorter
    // slices' partial sums cost more to add up than they save (lavapipe, 2 cores, x^T g from K = 1024: 16 x 32
    // in 0.17 ms unsplit against 0.29 ms in 16 slices; 64 x 16, one workgroup, 0.20 ms against 0.25 ms in two;
    // from K = 16384: 1.8 ms against 1.0 ms in two).
    const cpu = variant === "subgroup" && deviceInfo().isFallbackAdapter;
    const target = cpu ? cpuCores() : SPLIT_GROUPS;
    return split && usual.blocks < target
      ? planOf(usual, K, Math.ceil(target / usual.blocks), cpu ? CPU_MIN_SLICE : SPLIT_MIN_SLICE)
      : planOf(usual, K);
  }
  if (!narrow && (!split || usual.blocks >= cpuCores())) return planOf(usual, K);
  // A narrow C (N or M under the block: e.g. 1024 x 16, or 1024 x 1) or a small one: the linear layout, so
  // that no invocation computes a block outside C; split over K where C is small and K long.
  const lin = layoutFor(p, true);
  return split ? planOf(lin, K, Math.ceil(SPLIT_INVOCATIONS / lin.blocks)) : planOf(lin, K);
}

/** Plans by problem (see matmulRaw): on a GPU the host's time per op bounds small work, and planning (the
 * kernel's layout and its key, the K split) took about half as long as recording the matmul's dispatch (V8's
 * profiler, a fused layer step). Found by a hash of the problem's numbers: a string key per call made about 4
 * of the 127 KB of garbage of a fused layer step (V8's sampling heap profiler, d_model 16). */
const plans = new KeyedCache<Plan>(4096);
/** The key of the problem being looked up, reused: no allocation per call. */
const planKey = [0, 0, 0, 0, 0, 0];
const VARIANT_CODE: Record<MatmulVariant, number> = { register: 0, tiled: 1, subgroup: 2, tiled128: 3 };

/** The plan of a problem, made once (see `plans`). */
function cachedPlan(p: Problem): Plan {
  const { variant, transA, transB, M, N, K, nb } = p;
  // the key holds everything a plan depends on, the subgroup size, adapter kind, GPU split and matvec included
  planKey[0] = VARIANT_CODE[variant] | (+transA << 2) | (+transB << 3) |
    (+deviceInfo().isFallbackAdapter << 4) | (+gpuSplit << 5) | (+matvecOn << 6);
  planKey[1] = M;
  planKey[2] = N;
  planKey[3] = K;
  planKey[4] = nb;
  planKey[5] = fixedSubgroupSize() ?? 0;
  return plans.get(planKey, planFor, p);
}

/** How {@linkcode matmulRaw} lays out one problem on this device (see {@linkcode matmulPlan}). */
export interface MatmulPlan {
  /** The kernel's name (its variant, operand layout and tile). */
  kernel: string;
  /** K slices computed in parallel into partial products that one more dispatch sums (1: not split). */
  slices: number;
  /** K values per slice. */
  kLen: number;
  /** Dispatches of the kernel (K longer than one dispatch's slices takes several), not counting the sum. */
  dispatches: number;
  /** Workgroups per dispatch. */
  workgroups: number;
  /** Invocations per dispatch. */
  invocations: number;
}

/** How an (M x K) @ (K x N) product over `batch` matrices is laid out on this device: for tests and
 * benchmarks (the layout follows the adapter kind, see GPU_INVOCATIONS). */
export function matmulPlan(
  M: number,
  K: number,
  N: number,
  opts: MatmulOptions = {},
  variant: MatmulVariant = matmulVariant(),
  batch = 1,
): MatmulPlan {
  const transA = opts.transA ?? false, transB = opts.transB ?? false;
  const p = cachedPlan({ variant, transA, transB, M, N, K, nb: batch });
  return {
    kernel: p.kernel.spec.name,
    slices: p.slices,
    kLen: p.kLen,
    dispatches: Math.max(1, Math.ceil(K / (p.slices * p.kLen))),
    workgroups: p.groups,
    invocations: p.groups * p.kernel.spec.workgroupSize,
  };
}

let chosen: MatmulVariant | null = null;

/** The variant in use: set by {@linkcode setMatmulVariant} or by the autotuner; else by adapter kind (also
 * where the device can no longer run the choice: `subgroup` once `deviceInfo().subgroups` changed). */
export function matmulVariant(): MatmulVariant {
  if (chosen && (chosen !== "subgroup" || fixedSubgroupSize() !== null)) return chosen;
  return deviceInfo().isFallbackAdapter ? "register" : "tiled";
}

/** Forces a matmul variant (the autotuner calls this with its measured choice); throws for one this device
 * cannot run. */
export function setMatmulVariant(v: MatmulVariant): void {
  if (!availableMatmulVariants().includes(v)) {
    throw new Error(
      `setMatmulVariant: '${v}' cannot run here (this device runs ${availableMatmulVariants().join(", ")})`,
    );
  }
  chosen = v;
}

/**
 * Computes op(a) @ op(b) into a new tensor with a given variant; no autograd. With `into` (an f32 tensor of
 * the result's shape), adds the product to it in place instead and returns it.
 */
export function matmulRaw(
  a: Tensor,
  b: Tensor,
  opts: MatmulOptions,
  variant: MatmulVariant = matmulVariant(),
  into?: Tensor,
): Tensor {
  return product(a, b, opts, variant, into, null);
}

/**
 * rmsNorm(x, g, eps) @ w^T, with no autograd: decoding's norm and in_proj (x (M, K), g (K), w (N, K)). Where
 * a GPU takes the `matvec` kernel for the product (1 to 4 rows), that kernel normalizes the rows on the way:
 * one dispatch instead of two. Elsewhere the norm's kernel, then the product.
 */
export function rmsNormMatmul(x: Tensor, g: Tensor, eps: number, w: Tensor): Tensor {
  const K = x.shape[1];
  if (
    x.rank !== 2 || w.rank !== 2 || w.shape[1] !== K || !sameShape(g.shape, [K]) ||
    x.dtype !== "f32" || g.dtype !== "f32" || !isF32Weight(w)
  ) {
    throw new Error(
      `rmsNormMatmul: x must be f32 (M, K), g (K) and w (N, K); got x ${x.dtype} ${fmt(x.shape)}, ` +
        `g ${g.dtype} ${fmt(g.shape)}, w ${w.dtype} ${fmt(w.shape)} (w may be bf16)`,
    );
  }
  // as rmsNorm checks it, whichever path runs
  if (!Number.isFinite(eps)) throw new Error(`rmsNormMatmul: eps must be a finite number, got ${eps}`);
  return product(x, w, { transB: true }, matmulVariant(), undefined, { g, eps });
}

/** Whether `b` can be matmul's second operand: f32, or a weight stored in bf16 (its kernels read it as f32). */
function isF32Weight(b: Tensor): boolean {
  return b.dtype === "f32" || b.dtype === "bf16";
}

/** matmulRaw's product; with `rms`, op(a)'s rows RMS-normalized with weight g first (rmsNormMatmul). */
function product(
  a: Tensor,
  b: Tensor,
  opts: MatmulOptions,
  variant: MatmulVariant,
  into: Tensor | undefined,
  rms: { g: Tensor; eps: number } | null,
): Tensor {
  // Plain reads, and no batch strides for one batch entry (B = 1): on a GPU the host's time per op bounds
  // small work, and this path had cost 3-4 times a bare dispatch (lavapipe, x_proj's shape).
  const transA = opts.transA ?? false;
  const transB = opts.transB ?? false;
  const as = a.shape, bs = b.shape;
  const M = as[as.length - (transA ? 1 : 2)], Ka = as[as.length - (transA ? 2 : 1)];
  const Kb = bs[bs.length - (transB ? 1 : 2)], N = bs[bs.length - (transB ? 2 : 1)];
  if (Ka !== Kb) {
    throw new Error(
      `matmul: inner dims differ: ${fmt(as)}${transA ? "^T" : ""} @ ${fmt(bs)}${transB ? "^T" : ""} ` +
        `(${Ka} vs ${Kb})`,
    );
  }
  const K = Ka;
  const batch = batchShape(as, bs);
  if (batch.length > 4) throw new Error(`matmul: at most 4 batch dims, got ${fmt(batch)}`);
  const shape = batch.length === 0 ? [M, N] : [...batch, M, N];
  if (into && (into.dtype !== "f32" || !sameShape(into.shape, shape))) {
    throw new Error(`matmul: cannot add a ${fmt(shape)} product into ${into}`);
  }
  const nb = sizeOf(batch);
  if (nb * M * N === 0) return into ?? Tensor.empty(shape);
  const { kernel, tilesM, tilesN, slices, kLen, groups, rms: rmsKernel } = cachedPlan({
    variant,
    transA,
    transB,
    M,
    N,
    K,
    nb,
  });
  if (rms && !rmsKernel) { // not a matvec plan: the norm's own kernel, then the product
    const an = noGrad(() => rmsNorm(a, rms.g, rms.eps)); // an: (M, K)
    try {
      return product(an, b, opts, variant, into, null);
    } finally {
      an.dispose();
    }
  }
  // the norm's sum of squares needs all of K in one dispatch (matvec plans take up to MAX_K in one slice)
  if (rms && (slices !== 1 || K > kLen)) throw new Error(`rmsNormMatmul: K ${K} in more than one dispatch`);
  const unbatched = nb === 1; // batch strides would multiply coordinate 0 only
  // Split K: slice s of each dispatch writes partial sums to c[s]; they are summed at the end.
  const direct = into !== undefined && slices === 1; // the kernel adds into `into` itself
  const c = direct ? into : Tensor.empty(slices > 1 ? [slices, ...shape] : shape);
  const storages: Record<string, Storage> = { a: a.storage, b: b.storage, c: c.storage };
  if (rms) storages.g = rms.g.storage;
  const u = {
    M,
    N,
    K,
    tilesM,
    tilesN,
    batches: nb,
    slices,
    kLen,
    sam: transA ? 1 : K,
    sak: transA ? M : 1,
    sbk: transB ? 1 : N,
    sbn: transB ? K : 1,
    bsh: unbatched ? NO_BATCH_SHAPE : padRank(batch, 1).slice(-4),
    bsa: unbatched ? NO_BATCH_STRIDES : batchStrides(as, batch),
    bsb: unbatched ? NO_BATCH_STRIDES : batchStrides(bs, batch),
    k0: 0,
    k1: 0,
    accumulate: 0,
  };
  if (rms) (u as Record<string, unknown>).eps = rms.eps; // the normalizing kernel's (the others have none)
  // Each dispatch covers slices * kLen values of K (at most MAX_K per invocation); later ones accumulate.
  // K = 0: one dispatch that writes zeros (or adds them).
  do {
    u.k1 = Math.min(K, u.k0 + slices * kLen);
    u.accumulate = direct || u.k0 > 0 ? 1 : 0;
    dispatch(rms ? rmsKernel! : kernel, storages, u, groups); // reads u now: it may change for the next
    u.k0 = u.k1;
  } while (u.k0 < K);
  if (slices === 1) return c; // C, or `into` itself (direct)
  if (into) {
    addSumOfFirstAxis(c, into); // the slices' sum, added into `into` by the sum's last pass: one dispatch
    c.dispose();
    return into;
  }
  // the slices' sum straight from the reduction kernel: sumToShape's general axes cost a GPU's host more
  const out = reduceRun(c, 1, slices, nb * M * N, "sum", { shape });
  c.dispose();
  return out;
}

const NO_BATCH_SHAPE: readonly number[] = Object.freeze([1, 1, 1, 1]);
const NO_BATCH_STRIDES: readonly number[] = Object.freeze([0, 0, 0, 0]);

/** The broadcast batch dims of two operands' shapes (all but their last two dims). */
function batchShape(as: Shape, bs: Shape): readonly number[] {
  if (bs.length <= 2) return as.slice(0, -2); // x @ W: nothing to broadcast
  if (as.length <= 2) return bs.slice(0, -2);
  return broadcastShapes(as.slice(0, -2), bs.slice(0, -2), "matmul batch dims");
}

/** Whether `batch` is the shape's own batch dims (all but its last two): nothing broadcast it. */
function isBatchOf(batch: readonly number[], s: Shape): boolean {
  if (batch.length !== s.length - 2) return false;
  for (let i = 0; i < batch.length; i++) if (batch[i] !== s[i]) return false;
  return true;
}

/** An operand's element strides over the (last four) batch dims, 0 where it broadcasts. */
function batchStrides(s: Shape, batch: readonly number[]): number[] {
  const mat = s[s.length - 1] * s[s.length - 2];
  const lead = s.slice(0, -2);
  const st = stridesOf(lead).map((x) => x * mat);
  return padRank(
    batch.map((_, i) => {
      const j = i - (batch.length - lead.length);
      return j < 0 || lead[j] === 1 ? 0 : st[j];
    }),
    0,
  ).slice(-4);
}

interface MatmulAttrs extends Required<MatmulOptions> {
  /** A is 1-D: the product runs on its (1, K) view and the result drops that dim. */
  vecA: boolean;
  /** B is 1-D: the product runs on its (K, 1) view and the result drops that dim. */
  vecB: boolean;
}

/**
 * The gradients of op(a) @ op(b)'s operands from the product's gradient g0 (a matmul's backward, and
 * `matmulAdd`'s for its first two inputs). a and b are the 2-D+ operands (the views of 1-D inputs); g is g0
 * with the dropped dims put back.
 */
function matmulGrads(
  g0: Tensor,
  a: Tensor,
  b: Tensor,
  inputs: readonly Tensor[],
  { transA, transB, vecA, vecB }: MatmulAttrs,
  targets: GradTargets,
): [Tensor | null, Tensor | null] {
  const batch = batchShape(a.shape, b.shape);
  const M = a.shape[a.rank - (transA ? 1 : 2)], N = b.shape[b.rank - (transB ? 2 : 1)];
  const g = vecA || vecB ? new Tensor(g0.storage, [...batch, M, N], "f32") : g0;
  /** The gradient of an operand's view as the gradient of the input (the view's dim dropped). */
  const asInput = (grad: Tensor, i: number) => {
    if (grad.rank === inputs[i].rank) return grad;
    const out = new Tensor(grad.storage, inputs[i].shape, "f32");
    grad.dispose();
    return out;
  };
  let ga: Tensor | null = null;
  let gb: Tensor | null = null;
  if (inputs[0].requiresGrad) {
    // Where a's gradient so far is this pass's own tensor (a used elsewhere too, e.g. the conv output that
    // feeds both x_proj and the scan), add into it in place instead of making a tensor and adding it.
    const into = (!vecA && isBatchOf(batch, a.shape) && targets.sum(0)) || undefined;
    const full = transA
      ? matmulRaw(b, g, { transA: transB, transB: true }, undefined, into)
      : matmulRaw(g, b, { transB: !transB }, undefined, into);
    if (!into) {
      ga = sumToShape(full, a.shape);
      if (ga !== full) full.dispose();
      ga = asInput(ga, 0);
    }
  }
  if (inputs[1].requiresGrad && b.rank === 2 && a.rank > 2 && !transA) {
    // A weight used by a batch (x @ W): fold the batch into the contraction instead of summing
    // one product per batch element.
    const rows = sizeOf(a.shape.slice(0, -1));
    const af = new Tensor(a.storage, [rows, a.shape[a.rank - 1]], "f32"); // af: (batch * M, K)
    const gf = new Tensor(g.storage, [rows, N], "f32"); // gf: (batch * M, N)
    gb = transB ? matmulRaw(gf, af, { transA: true }) : matmulRaw(af, gf, { transA: true });
    af.dispose();
    gf.dispose();
    gb = asInput(gb, 1);
  } else if (inputs[1].requiresGrad) {
    const full = transB
      ? matmulRaw(g, a, { transA: true, transB: transA })
      : matmulRaw(a, g, { transA: !transA });
    gb = sumToShape(full, b.shape);
    if (gb !== full) full.dispose();
    gb = asInput(gb, 1);
  }
  if (g !== g0) g.dispose();
  return [ga, gb];
}

const matmulOp = defineOp<MatmulAttrs>({
  name: "matmul",
  forward: ([a, b], { vecA, vecB, ...opts }, save) => {
    // 1-D operands are viewed as a row (A) or a column (B) here, inside the op, so that the views are saved
    // tensors the op owns (disposed with the graph, or at once without one) rather than graph nodes.
    const a2 = vecA ? new Tensor(a.storage, [1, a.shape[0]], "f32") : a;
    const b2 = vecB ? new Tensor(b.storage, [b.shape[0], 1], b.dtype) : b;
    const c = matmulRaw(a2, b2, opts); // bad shapes throw: defineOp's freeOnThrow disposes the views
    save(a2, b2);
    if (!vecA && !vecB) return c;
    const shape = [...c.shape];
    if (vecB) shape.splice(shape.length - 1, 1);
    if (vecA) shape.splice(shape.length - (vecB ? 1 : 2), 1);
    const out = new Tensor(c.storage, shape, "f32");
    c.dispose();
    return out;
  },
  backward: (g, [a, b], inputs, attrs, targets) => matmulGrads(g, a, b, inputs, attrs, targets),
  bf16Inputs: [1], // a weight stored in bfloat16, read as f32 (it takes no gradient)
});

/**
 * c + op(a) @ op(b), a and b of rank 2 or more: the product adds itself into a copy of c (a copy command, not
 * a dispatch) in its own pass, so the sum costs no elementwise dispatch of its own (a residual added to a
 * layer's output projection: one dispatch fewer per layer, every forward and decoding step). Where the
 * product is split over K, the last pass of the slices' sum adds into the copy instead (no add dispatch
 * either). The backward is the
 * matmul's for a and b, and g itself for c.
 */
const matmulAddOp = defineOp<MatmulAttrs>({
  name: "matmulAdd",
  forward: ([a, b, c], opts, save) => {
    const out = copy(c);
    matmulRaw(a, b, opts, undefined, out); // bad shapes throw: defineOp's freeOnThrow disposes out
    save(a, b);
    return out;
  },
  backward: (g, [a, b], inputs, attrs, targets) => [
    ...matmulGrads(g, a, b, inputs, attrs, targets),
    inputs[2].requiresGrad ? g : null,
  ],
  bf16Inputs: [1],
});

/**
 * `c + matmul(a, b, options)` in one op, for a and b of rank 2 or more and c of exactly the product's
 * shape (no broadcasting): the product accumulates into a copy of c instead of an elementwise add after it.
 * Gradients flow to all three.
 */
export function matmulAdd(a: Tensor, b: Tensor, c: Tensor, options: MatmulOptions = {}): Tensor {
  if (a.dtype !== "f32" || !isF32Weight(b) || c.dtype !== "f32") {
    throw new Error(`matmulAdd needs f32 tensors (b: f32 or bf16), got ${a}, ${b} and ${c}`);
  }
  if (a.rank < 2 || b.rank < 2) {
    throw new Error(`matmulAdd: operands must have rank >= 2, got ${a} and ${b} (use matmul and add)`);
  }
  // the product's shape must be c's: matmulRaw checks `into` against it and names both
  return matmulAddOp([a, b, c], {
    transA: options.transA ?? false,
    transB: options.transB ?? false,
    vecA: false,
    vecB: false,
  });
}

/**
 * Matrix product with PyTorch's rules: batched over leading dims with broadcasting; 1-D operands are
 * treated as a row (A) or column (B) vector and that dim is dropped from the result. At most 4 batch dims
 * (after broadcasting; the result has rank 6 or less): more throw.
 */
export function matmul(a: Tensor, b: Tensor, options: MatmulOptions = {}): Tensor {
  if (a.dtype !== "f32" || !isF32Weight(b)) {
    throw new Error(`matmul needs f32 tensors (b: f32 or bf16), got ${a} and ${b}`);
  }
  if (a.rank === 0 || b.rank === 0) {
    throw new Error(`matmul: operands must have rank >= 1, got ${a} and ${b}`);
  }
  const vecA = a.rank === 1, vecB = b.rank === 1;
  return matmulOp([a, b], {
    transA: !vecA && (options.transA ?? false),
    transB: !vecB && (options.transB ?? false),
    vecA,
    vecB,
  });
}
