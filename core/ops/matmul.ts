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
 *   in workgroup memory, and each invocation accumulates a 4x4 block from them. Favoured on real GPUs.
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
 * K slices in parallel, slice s into the s-th (batch, M, N) block of a scratch tensor, and `sumToShape`
 * adds them up (see SPLIT_BELOW). `register` then uses its `linear` layout: each invocation takes the
 * next (slice, batch, 8x8 block) of C, so that no invocation computes a block outside C.
 * @module
 */

import { defineOp, type GradTargets } from "../autograd.ts";
import { deviceInfo, fixedSubgroupSize } from "../device.ts";
import { dispatch, type Kernel } from "../kernel.ts";
import { broadcastShapes, fmt, padRank, sameShape, type Shape, sizeOf, stridesOf } from "../shape.ts";
import { Tensor } from "../tensor.ts";
import { sumToShape } from "./reduce.ts";
import { copy, copyBox } from "./shape_ops.ts";
import { kernelFor, type MatmulVariant } from "./matmul_kernels.ts";

export type { MatmulVariant };

/** Options of {@linkcode matmul}. */
export interface MatmulOptions {
  /** Use A transposed in its last two dims (read through strides, no copy). */
  transA?: boolean;
  /** Use B transposed in its last two dims (read through strides, no copy). */
  transB?: boolean;
}

/** Every variant, in the order the tuner measures them. */
export const MATMUL_VARIANTS: readonly MatmulVariant[] = ["register", "tiled", "subgroup"];

/** The variants this device can run: `subgroup` needs subgroups of one fixed size. */
export function availableMatmulVariants(): MatmulVariant[] {
  return MATMUL_VARIANTS.filter((v) => v !== "subgroup" || fixedSubgroupSize() !== null);
}

/**
 * Version of the matmul kernels. It is part of the tuner's cache key, so a cached choice is measured
 * again after the kernels change: bump it whenever a kernel's code changes.
 */
export const MATMUL_KERNEL_VERSION = "matmul-7";

/** Longest K slice of one dispatch (a multiple of 16, so vec4 reads and tiles stay aligned). */
const MAX_K = 16384;

/**
 * Small C, long K. A C of fewer than SPLIT_BELOW workgroups with K of at least SPLIT_MIN_K is computed as
 * partial sums over K slices (split-K) in parallel -- each a multiple of 16 and at least SPLIT_MIN_SLICE
 * long -- that are then summed; at most SPLIT_MAX slices per dispatch. `tiled` takes slices until about
 * SPLIT_GROUPS workgroups run, as does `subgroup` (on CPU adapters only until each core has one). `register` takes them in its `linear` layout, until about SPLIT_INVOCATIONS
 * invocations run, when its usual blocks would leave more than a quarter of their invocations outside C
 * (PLAIN_MIN_USE; the linear layout saves that work) or when there are fewer workgroups than CPU cores
 * (`register` is the variant of CPU adapters, which run one workgroup per core). Otherwise its workgroups
 * already keep every core busy on useful work, and splitting would only add the partial sums (and the
 * linear layout reads more per multiply-add than a 64x64 block when C is wide).
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
}

/** CPU cores, which a software adapter runs one workgroup each on. */
function cpuCores(): number {
  return globalThis.navigator?.hardwareConcurrency ?? SPLIT_BELOW;
}

/** Slice length and count for K split into about `want` slices of at least `minSlice`. */
function splitK(K: number, want: number, minSlice = SPLIT_MIN_SLICE): { kLen: number; slices: number } {
  const kLen = Math.min(MAX_K, Math.ceil(Math.max(minSlice, K / want) / 16) * 16);
  return { kLen, slices: Math.min(SPLIT_MAX, Math.ceil(K / kLen)) };
}

/** The kernel, layout and K slices of a problem (see SPLIT_BELOW). */
function planFor(
  variant: MatmulVariant,
  transA: boolean,
  transB: boolean,
  M: number,
  N: number,
  K: number,
  nb: number,
): Plan {
  const { kernel, blockM, blockN } = kernelFor(variant, transA, transB, M, N, K);
  const tilesM = Math.ceil(M / blockM);
  const tilesN = Math.ceil(N / blockN);
  const groups = nb * tilesM * tilesN;
  const plain: Plan = { kernel, tilesM, tilesN, slices: 1, kLen: MAX_K, groups };
  const used = (nb * M * N) / (groups * blockM * blockN); // share of the blocks' invocations inside C
  const split = groups < SPLIT_BELOW && K >= SPLIT_MIN_K;
  if (variant !== "register") {
    // `tiled` (GPUs) takes slices until about SPLIT_GROUPS workgroups run, and so does `subgroup`, except on a
    // CPU adapter: there only until every core has a workgroup, in slices of at least CPU_MIN_SLICE, as shorter
    // slices' partial sums cost more to add up than they save (lavapipe, 2 cores, x^T g from K = 1024: 16 x 32
    // in 0.17 ms unsplit against 0.29 ms in 16 slices; 64 x 16, one workgroup, 0.20 ms against 0.25 ms in two;
    // from K = 16384: 1.8 ms against 1.0 ms in two).
    const cpu = variant === "subgroup" && deviceInfo().isFallbackAdapter;
    const target = cpu ? cpuCores() : SPLIT_GROUPS;
    if (!split || groups >= target) return plain;
    const { kLen, slices } = splitK(K, Math.ceil(target / groups), cpu ? CPU_MIN_SLICE : SPLIT_MIN_SLICE);
    return slices === 1 ? plain : { ...plain, slices, kLen, groups: groups * slices };
  }

  if (
    used > PLAIN_MIN_USE && (!split || groups >= cpuCores())
  ) {
    return plain;
  }
  // A narrow C (N or M under the block: e.g. 1024 x 16, or 1024 x 1) or a small one: the linear layout, so
  // that no invocation computes a block outside C; split over K where C is small and K long.
  const lin = kernelFor(variant, transA, transB, M, N, K, true);
  const linM = Math.ceil(M / lin.blockM);
  const linN = Math.ceil(N / lin.blockN);
  const blocks = nb * linM * linN;
  const { kLen, slices } = split
    ? splitK(K, Math.ceil(SPLIT_INVOCATIONS / blocks))
    : { kLen: MAX_K, slices: 1 };
  const groups2 = Math.ceil((slices * blocks) / lin.kernel.spec.workgroupSize);
  return { kernel: lin.kernel, tilesM: linM, tilesN: linN, slices, kLen, groups: groups2 };
}

/** Plans by problem (see matmulRaw): on a GPU the host's time per op bounds small work, and planning (the
 * kernel's layout and its key, the K split) took about half as long as recording the matmul's dispatch (V8's
 * profiler, a fused layer step). */
const plans = new Map<string, Plan>();
const MAX_PLANS = 4096;

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
  // the plan's key holds everything it depends on, the subgroup size and adapter kind included
  const cpu = deviceInfo().isFallbackAdapter ? 1 : 0;
  const planKey = `${variant}|${+transA}${+transB}|${M}|${N}|${K}|${nb}|${fixedSubgroupSize()}|${cpu}`;
  let plan = plans.get(planKey);
  if (!plan) {
    if (plans.size >= MAX_PLANS) plans.clear(); // a workload of ever new shapes: start over, do not grow
    plans.set(planKey, plan = planFor(variant, transA, transB, M, N, K, nb));
  }
  const { kernel, tilesM, tilesN, slices, kLen, groups } = plan;
  const unbatched = nb === 1; // batch strides would multiply coordinate 0 only
  // Split K: slice s of each dispatch writes partial sums to c[s]; they are summed at the end.
  const direct = into !== undefined && slices === 1; // the kernel adds into `into` itself
  const c = direct ? into : Tensor.empty(slices > 1 ? [slices, ...shape] : shape);
  const storages = { a: a.storage, b: b.storage, c: c.storage };
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
  // Each dispatch covers slices * kLen values of K (at most MAX_K per invocation); later ones accumulate.
  // K = 0: one dispatch that writes zeros (or adds them).
  do {
    u.k1 = Math.min(K, u.k0 + slices * kLen);
    u.accumulate = direct || u.k0 > 0 ? 1 : 0;
    dispatch(kernel, storages, u, groups); // reads u now: it may change for the next
    u.k0 = u.k1;
  } while (u.k0 < K);
  const out = slices === 1 ? c : sumToShape(c, shape);
  if (c !== out) c.dispose();
  if (!into || direct) return out;
  const box = { offset: 0, strides: stridesOf(shape) };
  copyBox(out, box, into, box, shape, true);
  out.dispose();
  return into;
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
    const b2 = vecB ? new Tensor(b.storage, [b.shape[0], 1], "f32") : b;
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
});

/**
 * c + op(a) @ op(b), a and b of rank 2 or more: the product adds itself into a copy of c (a copy command, not
 * a dispatch) in its own pass, so the sum costs no elementwise dispatch of its own (a residual added to a
 * layer's output projection: one dispatch fewer per layer, every forward and decoding step). Where the
 * product is split over K, the sum of the slices is added into the copy instead. The backward is the
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
});

/**
 * `c + matmul(a, b, options)` in one op, for a and b of rank 2 or more and c of exactly the product's
 * shape (no broadcasting): the product accumulates into a copy of c instead of an elementwise add after it.
 * Gradients flow to all three.
 */
export function matmulAdd(a: Tensor, b: Tensor, c: Tensor, options: MatmulOptions = {}): Tensor {
  for (const t of [a, b, c]) {
    if (t.dtype !== "f32") throw new Error(`matmulAdd needs f32 tensors, got ${a}, ${b} and ${c}`);
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
  if (a.dtype !== "f32" || b.dtype !== "f32") throw new Error(`matmul needs f32 tensors, got ${a} and ${b}`);
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
