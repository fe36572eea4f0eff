/**
 * Batched matrix multiplication C = op(A) @ op(B), op = identity or transpose (read through strides, no
 * copy), broadcasting over up to four leading dims.
 *
 * Two variants, chosen per adapter by a one-time measurement (see `tuneKernels` in core/tune.ts):
 * - `register`: each invocation owns an 8x8 block of C and keeps it in registers; a workgroup of 8x8
 *   invocations covers 64x64 of C (for few rows, M <= 32, flatter blocks: down to 1 row x 4 columns per
 *   invocation and 1 x 256 per workgroup). No workgroup memory and no barriers: the fast one on CPU adapters
 *   (llvmpipe/lavapipe), where barriers are very expensive and loads cost more than arithmetic. The kernel
 *   is generated per operand layout: when an operand's contiguous dim (k or m for A, n or k for B) is a
 *   multiple of 4 it is bound as `array<vec4<f32>>` and read four floats at a time (and C is written as
 *   vec4 when N is a multiple of 4). Each layout is its own pipeline, made and compiled on first use.
 * - `tiled`: a workgroup of 16x16 invocations owns a 64x64 block of C; 64x16 slices of A and B are staged
 *   in workgroup memory, and each invocation accumulates a 4x4 block from them. Favoured on real GPUs.
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

import { defineOp } from "../autograd.ts";
import { deviceInfo } from "../device.ts";
import { defineKernel, dispatch, type Kernel } from "../kernel.ts";
import { broadcastShapes, fmt, padRank, type Shape, sizeOf, stridesOf } from "../shape.ts";
import { Tensor } from "../tensor.ts";
import { sumToShape } from "./reduce.ts";
import { copyBox } from "./shape_ops.ts";

/** Options of {@linkcode matmul}. */
export interface MatmulOptions {
  /** Use A transposed in its last two dims (read through strides, no copy). */
  transA?: boolean;
  /** Use B transposed in its last two dims (read through strides, no copy). */
  transB?: boolean;
}

/** The two kernel variants. */
export type MatmulVariant = "register" | "tiled";

/** Every variant, in the order the tuner measures them. */
export const MATMUL_VARIANTS: readonly MatmulVariant[] = ["register", "tiled"];

/**
 * Version of the matmul kernels. It is part of the tuner's cache key, so a cached choice is measured
 * again after the kernels change: bump it whenever a kernel's code changes.
 */
export const MATMUL_KERNEL_VERSION = "matmul-6";

/** Longest K slice of one dispatch (a multiple of 16, so vec4 reads and tiles stay aligned). */
const MAX_K = 16384;

const COMMON_UNIFORMS: [string, "u32" | "vec4<u32>"][] = [
  ["M", "u32"],
  ["N", "u32"],
  ["K", "u32"],
  ["k0", "u32"],
  ["k1", "u32"],
  ["accumulate", "u32"],
  ["tilesM", "u32"],
  ["tilesN", "u32"],
  ["batches", "u32"], // batch entries (product of the batch shape)
  ["slices", "u32"], // K slices computed in parallel (1 = K not split)
  ["kLen", "u32"], // K values per slice
  ["sam", "u32"], // A stride along m
  ["sak", "u32"], // A stride along k
  ["sbk", "u32"],
  ["sbn", "u32"],
  ["bsh", "vec4<u32>"], // batch shape (4 dims)
  ["bsa", "vec4<u32>"], // A batch strides (0 = broadcast)
  ["bsb", "vec4<u32>"],
];

/** WGSL that turns a workgroup index into (K slice `s`, batch `bi`, block `t` of C), for kernels where a
 * workgroup owns one block of C. */
const GROUP_TILE = `
  let tilesPerBatch = P.tilesM * P.tilesN;
  let t = group % tilesPerBatch;
  let gs = group / tilesPerBatch; // s * batches + bi
  let bi = gs % P.batches;
  let s = gs / P.batches;`;

/** WGSL that turns the batch index `bi` and the K slice `s` into element offsets of A, B and C and the K
 * range [kb, ke) to sum over. Slice s writes its partial sums to the s-th (batch, M, N) block of C. */
const OFFSETS = `
  var rem = bi; var aoff = 0u; var boff = 0u;
  { let c = rem % P.bsh.w; rem = rem / P.bsh.w; aoff += c * P.bsa.w; boff += c * P.bsb.w; }
  { let c = rem % P.bsh.z; rem = rem / P.bsh.z; aoff += c * P.bsa.z; boff += c * P.bsb.z; }
  { let c = rem % P.bsh.y; rem = rem / P.bsh.y; aoff += c * P.bsa.y; boff += c * P.bsb.y; }
  { let c = rem % P.bsh.x; aoff += c * P.bsa.x; boff += c * P.bsb.x; }
  let coff = (s * P.batches + bi) * P.M * P.N;
  let kb = min(P.k1, P.k0 + s * P.kLen);
  let ke = min(P.k1, kb + P.kLen);`;

/** WGSL helper `put_c` that writes one element (or vec4) of C, adding the value already there after the
 * first K slice. */
function putC(type: "f32" | "vec4<f32>"): string {
  return `
fn put_c(at: u32, v: ${type}) {
  var x = v;
  if (P.accumulate != 0u) { x = x + ld_c(at); }
  st_c(at, x);
}`;
}

/**
 * Layout of one `register` pipeline: the transposes, which operands are accessed as vec4, and the tile:
 * each invocation owns `rm` x `rn` of C, a workgroup of `wm` x `wn` invocations owns `rm*wm` x `rn*wn`.
 * With `linear`, the workgroup's invocations instead take consecutive (K slice, batch, rm x rn block)
 * triples, so that a small C wastes no invocations on blocks outside it.
 */
interface RegisterLayout {
  transA: boolean;
  transB: boolean;
  vecA: boolean;
  vecB: boolean;
  vecC: boolean;
  rm: number;
  rn: number;
  wm: number;
  wn: number;
  linear: boolean;
}

/**
 * The `register` tile for a problem with M rows per matrix: 64x64 of C per workgroup for large M, and for
 * few rows (matrix-vector products, one token at a time) flatter blocks of 32, 16, 8, 4, 2 or 1 rows, so
 * that invocations do not compute rows that do not exist. Every workgroup has 64 invocations.
 */
function registerTile(M: number): { rm: number; rn: number; wm: number; wn: number } {
  if (M > 32) return { rm: 8, rn: 8, wm: 8, wn: 8 };
  if (M > 16) return { rm: 8, rn: 8, wm: 4, wn: 16 };
  if (M > 8) return { rm: 8, rn: 8, wm: 2, wn: 32 };
  return { rm: M > 4 ? 8 : M > 2 ? 4 : M, rn: 4, wm: 1, wn: 64 };
}
const XYZW = "xyzw";

/**
 * The `register` kernel for one layout. Per step of 4 k an invocation reads A as rm rows x 4 k and B as
 * 4 k x rn columns -- vec4 loads along each operand's contiguous dim, or scalar loads -- and does 4*rm*rn
 * multiply-adds (256 for the 8x8 tile: 16 vec4 loads). Row and column base addresses are computed once,
 * before the K loop; rows and columns past the edge read a clamped (valid, 4-aligned) address and their
 * results are never stored. C is written as vec4 when N is a multiple of 4.
 */
function registerKernel(l: RegisterLayout): Kernel {
  const { transA, transB, vecA, vecB, vecC, rm, rn, wm, wn, linear } = l;
  if (rn % 4 !== 0 || (transA && vecA && rm % 4 !== 0)) {
    throw new Error(`matmul: bad register tile ${rm}x${rn}`);
  }
  const rows = [...Array(rm).keys()]; // rows of A (and C) of one invocation
  const cols = [...Array(rn).keys()]; // columns of B (and C)
  const rowQuads = [...Array(rm >> 2).keys()]; // groups of 4 rows (vec4 along m)
  const colQuads = [...Array(rn >> 2).keys()]; // groups of 4 columns (vec4 along n)
  const q4 = [0, 1, 2, 3];
  const aMode = transA ? (vecA ? "m4" : "m1") : (vecA ? "k4" : "k1");
  const bMode = transB ? (vecB ? "k4" : "k1") : (vecB ? "n4" : "n1");
  const pre: string[] = [];
  const each = (list: number[], f: (i: number) => string) => list.forEach((i) => pre.push(f(i)));
  if (aMode === "k4") each(rows, (r) => `let pa${r} = (aoff + min(m0 + ${r}u, P.M - 1u) * P.K) / 4u;`);
  if (aMode === "k1") each(rows, (r) => `let pa${r} = aoff + min(m0 + ${r}u, P.M - 1u) * P.K;`);
  if (aMode === "m4") each(rowQuads, (g) => `let pa${g} = (aoff + min(m0 + ${4 * g}u, P.M - 4u)) / 4u;`);
  if (aMode === "m1") each(rows, (r) => `let pa${r} = aoff + min(m0 + ${r}u, P.M - 1u);`);
  if (bMode === "n4") each(colQuads, (g) => `let pb${g} = (boff + min(n0 + ${4 * g}u, P.N - 4u)) / 4u;`);
  if (bMode === "n1") each(cols, (c) => `let pb${c} = boff + min(n0 + ${c}u, P.N - 1u);`);
  if (bMode === "k4") each(cols, (c) => `let pb${c} = (boff + min(n0 + ${c}u, P.N - 1u) * P.K) / 4u;`);
  if (bMode === "k1") each(cols, (c) => `let pb${c} = boff + min(n0 + ${c}u, P.N - 1u) * P.K;`);

  /** One K step over `ku` values of k from `k` (vec4-along-k operands use `kv` = k / 4). */
  const step = (ku: number): string => {
    const s: string[] = [];
    const qs = q4.slice(0, ku);
    const kq = (q: number) => (q === 0 ? "k" : `(k + ${q}u)`);
    const loads = (list: number[], f: (q: number, i: number) => string) =>
      qs.forEach((q) => list.forEach((i) => s.push(f(q, i))));
    // aval(r, q): A[m0 + r, k + q] as an f32 expression.
    let aval: (r: number, q: number) => string = (r, q) => `a${q}_${r}`;
    if (aMode === "k4") {
      rows.forEach((r) => s.push(`let a${r} = ld_a(pa${r} + kv);`));
      aval = (r, q) => `a${r}.${XYZW[q]}`;
    } else if (aMode === "m4") {
      loads(rowQuads, (q, g) => `let a${q}_${g} = ld_a(pa${g} + ${kq(q)} * (P.M / 4u));`);
      aval = (r, q) => `a${q}_${r >> 2}.${XYZW[r & 3]}`;
    } else if (aMode === "k1") {
      loads(rows, (q, r) => `let a${q}_${r} = ld_a(pa${r} + ${kq(q)});`);
    } else {
      loads(rows, (q, r) => `let a${q}_${r} = ld_a(pa${r} + ${kq(q)} * P.M);`);
    }
    // bvec(q, g): B[k + q, n0 + 4g .. n0 + 4g + 3] as a vec4<f32> expression.
    const gather = (f: (q: number, c: number) => string) => (q: number, g: number) =>
      `vec4<f32>(${q4.map((j) => f(q, 4 * g + j)).join(", ")})`;
    let bvec = gather((q, c) => `b${q}_${c}`);
    if (bMode === "n4") {
      loads(colQuads, (q, g) => `let b${q}_${g} = ld_b(pb${g} + ${kq(q)} * (P.N / 4u));`);
      bvec = (q, g) => `b${q}_${g}`;
    } else if (bMode === "k4") {
      cols.forEach((c) => s.push(`let b${c} = ld_b(pb${c} + kv);`));
      bvec = gather((q, c) => `b${c}.${XYZW[q]}`);
    } else if (bMode === "n1") {
      loads(cols, (q, c) => `let b${q}_${c} = ld_b(pb${c} + ${kq(q)} * P.N);`);
    } else {
      loads(cols, (q, c) => `let b${q}_${c} = ld_b(pb${c} + ${kq(q)});`);
    }
    for (const q of qs) {
      colQuads.forEach((g) => s.push(`let bq${q}_${g} = ${bvec(q, g)};`));
      rows.forEach((r) => colQuads.forEach((g) => s.push(`acc${r}_${g} += ${aval(r, q)} * bq${q}_${g};`)));
    }
    return s.map((x) => `    ${x}`).join("\n");
  };
  // With an operand read as vec4 along k, K, k0 and kLen are multiples of 4 and the 4-step loop leaves no
  // tail.
  const tail = aMode === "k4" || bMode === "k4"
    ? ""
    : `  for (var k = kEnd4; k < ke; k++) {\n${step(1)}\n  }`;
  // C rows are contiguous: with N a multiple of 4, 4-aligned vec4 stores (n0 is a multiple of 4).
  const store: string[] = [];
  for (const r of rows) {
    store.push(`  if (m0 + ${r}u < P.M) {`);
    if (vecC) {
      store.push(`    let row = (coff + (m0 + ${r}u) * P.N + n0) / 4u;`);
      for (const g of colQuads) {
        store.push(`    if (n0 + ${4 * g}u < P.N) { put_c(row + ${g}u, acc${r}_${g}); }`);
      }
    } else {
      store.push(`    let row = coff + (m0 + ${r}u) * P.N + n0;`);
      for (const c of cols) {
        store.push(`    if (n0 + ${c}u < P.N) { put_c(row + ${c}u, acc${r}_${c >> 2}.${XYZW[c & 3]}); }`);
      }
    }
    store.push(`  }`);
  }
  const acc = rows.flatMap((r) => colQuads.map((g) => `  var acc${r}_${g} = vec4<f32>();`));
  const where = linear
    ? `
  // invocation -> (K slice s, batch bi, ${rm}x${rn} block of C), blocks first; in registers.
  if (gid >= P.slices * P.batches * P.tilesM * P.tilesN) { return; }
  let n0 = (gid % P.tilesN) * ${rn}u;
  let mq = gid / P.tilesN;
  let m0 = (mq % P.tilesM) * ${rm}u;
  let bq = mq / P.tilesM;
  let bi = bq % P.batches;
  let s = bq / P.batches;`
    : `
  // workgroup -> (K slice, batch, ${rm * wm}x${rn * wn} block of C); invocation -> ${rm}x${rn} sub-block in
  // registers.${GROUP_TILE}
  let m0 = (t / P.tilesN) * ${rm * wm}u + (lid / ${wn}u) * ${rm}u;
  let n0 = (t % P.tilesN) * ${rn * wn}u + (lid % ${wn}u) * ${rn}u;`;
  return defineKernel({
    name: `matmul_register_${aMode}_${bMode}_c${vecC ? 4 : 1}_${rm}x${rn}_${
      linear ? "linear" : `${wm}x${wn}`
    }`,
    buffers: [
      { name: "a", type: vecA ? "vec4<f32>" : "f32", access: "read" },
      { name: "b", type: vecB ? "vec4<f32>" : "f32", access: "read" },
      { name: "c", type: vecC ? "vec4<f32>" : "f32", access: "read_write" },
    ],
    uniforms: COMMON_UNIFORMS,
    workgroupSize: wm * wn,
    decls: putC(vecC ? "vec4<f32>" : "f32"),
    body: `${where}
  ${OFFSETS}
  ${pre.join("\n  ")}
${acc.join("\n")}
  let kEnd4 = kb + ((ke - kb) / 4u) * 4u;
  for (var k = kb; k < kEnd4; k += 4u) {
    let kv = k / 4u;
${step(4)}
  }
${tail}
${store.join("\n")}`,
  });
}

/** The `tiled` kernel: 64x64 of C per workgroup of 16x16 invocations, 64x16 slices in workgroup memory. */
function tiledKernel(): Kernel {
  return defineKernel({
    name: "matmul_tiled",
    buffers: [
      { name: "a", type: "f32", access: "read" },
      { name: "b", type: "f32", access: "read" },
      { name: "c", type: "f32", access: "read_write" },
    ],
    uniforms: COMMON_UNIFORMS,
    workgroupSize: 256,
    decls: `${putC("f32")}
var<workgroup> As: array<f32, 1024>; // 64 rows x 16 k of A
var<workgroup> Bs: array<f32, 1024>; // 16 k x 64 columns of B`,
    body: `
  // workgroup -> (K slice, batch, 64x64 block of C); invocation (ty, tx) -> 4x4 sub-block.${GROUP_TILE}
  let bm = (t / P.tilesN) * 64u;
  let bn = (t % P.tilesN) * 64u;
  let m0 = bm + (lid / 16u) * 4u;
  let n0 = bn + (lid % 16u) * 4u;
  ${OFFSETS}
  var acc = mat4x4<f32>();
  for (var kt = kb; kt < ke; kt += 16u) {
    // Stage A[bm..bm+64, kt..kt+16] and B[kt..kt+16, bn..bn+64]: 4 elements each per invocation.
    for (var e = 0u; e < 4u; e++) {
      let idx = lid * 4u + e;
      let r = idx / 16u; let kk = idx % 16u;
      let k = kt + kk;
      let m = bm + r;
      As[idx] = select(0.0, ld_a(aoff + min(m, P.M - 1u) * P.sam + min(k, P.K - 1u) * P.sak), m < P.M && k < ke);
      let kr = idx / 64u; let cn = idx % 64u;
      let n = bn + cn;
      let k2 = kt + kr;
      Bs[idx] = select(0.0, ld_b(boff + min(k2, P.K - 1u) * P.sbk + min(n, P.N - 1u) * P.sbn), n < P.N && k2 < ke);
    }
    workgroupBarrier();
    let ly = (lid / 16u) * 4u;
    let lx = (lid % 16u) * 4u;
    for (var kk = 0u; kk < 16u; kk++) {
      let av = vec4<f32>(As[(ly) * 16u + kk], As[(ly + 1u) * 16u + kk], As[(ly + 2u) * 16u + kk], As[(ly + 3u) * 16u + kk]);
      let bv = vec4<f32>(Bs[kk * 64u + lx], Bs[kk * 64u + lx + 1u], Bs[kk * 64u + lx + 2u], Bs[kk * 64u + lx + 3u]);
      acc[0] += av.x * bv;
      acc[1] += av.y * bv;
      acc[2] += av.z * bv;
      acc[3] += av.w * bv;
    }
    workgroupBarrier();
  }
  for (var i = 0u; i < 4u; i++) {
    let m = m0 + i;
    if (m >= P.M) { break; }
    for (var j = 0u; j < 4u; j++) {
      let n = n0 + j;
      if (n < P.N) { put_c(coff + m * P.N + n, acc[i][j]); }
    }
  }`,
  });
}

const registerKernels = new Map<string, Kernel>();
let tiledKernelCache: Kernel | null = null;

/**
 * The `register` tile of the `linear` layout, for a small C: 8x8 per invocation, or 4 or fewer rows and 4
 * columns where C has that few.
 */
function linearTile(M: number, N: number): { rm: number; rn: number; wm: number; wn: number } {
  return { rm: M > 4 ? 8 : M > 2 ? 4 : M, rn: N > 4 ? 8 : 4, wm: 1, wn: 64 };
}

/**
 * The kernel and the rows x columns of C per workgroup (per invocation with `linear`) for a variant and a
 * problem (made on first use).
 */
function kernelFor(
  variant: MatmulVariant,
  transA: boolean,
  transB: boolean,
  M: number,
  N: number,
  K: number,
  linear = false,
): { kernel: Kernel; blockM: number; blockN: number } {
  if (variant === "tiled") return { kernel: tiledKernelCache ??= tiledKernel(), blockM: 64, blockN: 64 };
  const tile = linear ? linearTile(M, N) : registerTile(M);
  // vec4 access needs the operand's contiguous dim to be a multiple of 4; then every row start, batch
  // offset and K slice start is 4-aligned too. A read as vec4 along m also needs 4 rows per invocation.
  const layout: RegisterLayout = {
    transA,
    transB,
    vecA: transA ? M % 4 === 0 && tile.rm % 4 === 0 : K % 4 === 0,
    vecB: (transB ? K : N) % 4 === 0,
    vecC: N % 4 === 0,
    ...tile,
    linear,
  };
  const key = JSON.stringify(layout);
  let kernel = registerKernels.get(key);
  if (!kernel) registerKernels.set(key, kernel = registerKernel(layout));
  return linear
    ? { kernel, blockM: tile.rm, blockN: tile.rn }
    : { kernel, blockM: tile.rm * tile.wm, blockN: tile.rn * tile.wn };
}

/**
 * Small C, long K. A C of fewer than SPLIT_BELOW workgroups with K of at least SPLIT_MIN_K is computed as
 * partial sums over K slices (split-K) in parallel -- each a multiple of 16 and at least SPLIT_MIN_SLICE
 * long -- that are then summed; at most SPLIT_MAX slices per dispatch. `tiled` takes slices until about
 * SPLIT_GROUPS workgroups run. `register` takes them in its `linear` layout, until about SPLIT_INVOCATIONS
 * invocations run, when its usual blocks would leave more than a quarter of their invocations outside C
 * (PLAIN_MIN_USE; the linear layout saves that work) or when there are fewer workgroups than CPU cores
 * (`register` is the variant of CPU adapters, which run one workgroup per core). Otherwise its workgroups
 * already keep every core busy on useful work, and splitting would only add the partial sums (and the
 * linear layout reads more per multiply-add than a 64x64 block when C is wide).
 */
const SPLIT_BELOW = 8;
const SPLIT_MIN_K = 256;
const SPLIT_MIN_SLICE = 64;
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

/** Slice length and count for K split into about `want` slices. */
function splitK(K: number, want: number): { kLen: number; slices: number } {
  const kLen = Math.min(MAX_K, Math.ceil(Math.max(SPLIT_MIN_SLICE, K / want) / 16) * 16);
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
  if (variant === "tiled") {
    if (!split) return plain;
    const { kLen, slices } = splitK(K, Math.ceil(SPLIT_GROUPS / groups));
    return slices === 1 ? plain : { ...plain, slices, kLen, groups: groups * slices };
  }
  if (
    used > PLAIN_MIN_USE && (!split || groups >= (globalThis.navigator?.hardwareConcurrency ?? SPLIT_BELOW))
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

let chosen: MatmulVariant | null = null;

/** The variant in use: set by {@linkcode setMatmulVariant} or by the autotuner; else by adapter kind. */
export function matmulVariant(): MatmulVariant {
  return chosen ?? (deviceInfo().isFallbackAdapter ? "register" : "tiled");
}

/** Forces a matmul variant (the autotuner calls this with its measured choice). */
export function setMatmulVariant(v: MatmulVariant): void {
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
  const { transA = false, transB = false } = opts;
  const [M, Ka] = transA
    ? [a.shape[a.rank - 1], a.shape[a.rank - 2]]
    : [a.shape[a.rank - 2], a.shape[a.rank - 1]];
  const [Kb, N] = transB
    ? [b.shape[b.rank - 1], b.shape[b.rank - 2]]
    : [b.shape[b.rank - 2], b.shape[b.rank - 1]];
  if (Ka !== Kb) {
    throw new Error(
      `matmul: inner dims differ: ${fmt(a.shape)}${transA ? "^T" : ""} @ ${fmt(b.shape)}${
        transB ? "^T" : ""
      } ` +
        `(${Ka} vs ${Kb})`,
    );
  }
  const K = Ka;
  const batch = broadcastShapes(a.shape.slice(0, -2), b.shape.slice(0, -2), "matmul batch dims");
  if (batch.length > 4) throw new Error(`matmul: at most 4 batch dims, got ${fmt(batch)}`);
  const shape = [...batch, M, N];
  if (into && (into.dtype !== "f32" || into.shape.join() !== shape.join())) {
    throw new Error(`matmul: cannot add a ${fmt(shape)} product into ${into}`);
  }
  const nb = sizeOf(batch);
  if (sizeOf(shape) === 0) return into ?? Tensor.empty(shape);
  const batchStrides = (s: Shape) => {
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
  };
  const bsh = padRank(batch, 1).slice(-4);
  const { kernel, tilesM, tilesN, slices, kLen, groups } = planFor(variant, transA, transB, M, N, K, nb);
  const base = {
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
    bsh,
    bsa: batchStrides(a.shape),
    bsb: batchStrides(b.shape),
  };
  // Split K: slice s of each dispatch writes partial sums to c[s]; they are summed at the end.
  const direct = into && slices === 1; // the kernel adds into `into` itself
  const c = direct ? into : Tensor.empty(slices > 1 ? [slices, ...shape] : shape);
  const storages = { a: a.storage, b: b.storage, c: c.storage };
  // Each dispatch covers slices * kLen values of K (at most MAX_K per invocation); later ones accumulate.
  // K = 0: one dispatch that writes zeros (or adds them).
  let k0 = 0;
  do {
    const k1 = Math.min(K, k0 + slices * kLen);
    dispatch(kernel, storages, { ...base, k0, k1, accumulate: direct || k0 > 0 ? 1 : 0 }, groups);
    k0 = k1;
  } while (k0 < K);
  const out = slices === 1 ? c : sumToShape(c, shape);
  if (c !== out) c.dispose();
  if (!into || direct) return out;
  const box = { offset: 0, strides: stridesOf(shape) };
  copyBox(out, box, into, box, shape, true);
  out.dispose();
  return into;
}

const matmulOp = defineOp<Required<MatmulOptions>>({
  name: "matmul",
  forward: ([a, b], opts, save) => {
    save(a, b);
    return matmulRaw(a, b, opts);
  },
  backward: (g, [a, b], _i, { transA, transB }, targets) => {
    let ga: Tensor | null = null;
    let gb: Tensor | null = null;
    if (a.requiresGrad) {
      // Where a's gradient so far is this pass's own tensor (a used elsewhere too, e.g. the conv output that
      // feeds both x_proj and the scan), add into it in place instead of making a tensor and adding it.
      const batch = broadcastShapes(a.shape.slice(0, -2), b.shape.slice(0, -2), "matmul batch dims");
      const into = (batch.join() === a.shape.slice(0, -2).join() && targets.sum(0)) || undefined;
      const full = transA
        ? matmulRaw(b, g, { transA: transB, transB: true }, undefined, into)
        : matmulRaw(g, b, { transB: !transB }, undefined, into);
      if (!into) {
        ga = sumToShape(full, a.shape);
        if (ga !== full) full.dispose();
      }
    }
    if (b.requiresGrad && b.rank === 2 && a.rank > 2 && !transA) {
      // A weight used by a batch (x @ W): fold the batch into the contraction instead of summing
      // one product per batch element.
      const M = sizeOf(a.shape.slice(0, -1));
      const af = new Tensor(a.storage, [M, a.shape[a.rank - 1]], "f32"); // af: (batch * M, K)
      const gf = new Tensor(g.storage, [M, g.shape[g.rank - 1]], "f32"); // gf: (batch * M, N)
      gb = transB ? matmulRaw(gf, af, { transA: true }) : matmulRaw(af, gf, { transA: true });
      af.dispose();
      gf.dispose();
    } else if (b.requiresGrad) {
      const full = transB
        ? matmulRaw(g, a, { transA: true, transB: transA })
        : matmulRaw(a, g, { transA: !transA });
      gb = sumToShape(full, b.shape);
      if (gb !== full) full.dispose();
    }
    return [ga, gb];
  },
});

/**
 * Matrix product with PyTorch's rules: batched over leading dims with broadcasting; 1-D operands are
 * treated as a row (A) or column (B) vector and that dim is dropped from the result.
 */
export function matmul(a: Tensor, b: Tensor, options: MatmulOptions = {}): Tensor {
  if (a.dtype !== "f32" || b.dtype !== "f32") throw new Error(`matmul needs f32 tensors, got ${a} and ${b}`);
  if (a.rank === 0 || b.rank === 0) {
    throw new Error(`matmul: operands must have rank >= 1, got ${a} and ${b}`);
  }
  const opts = { transA: options.transA ?? false, transB: options.transB ?? false };
  if (a.rank === 1 || b.rank === 1) {
    const a2 = a.rank === 1 ? a.reshape(1, a.shape[0]) : a;
    const b2 = b.rank === 1 ? b.reshape(b.shape[0], 1) : b;
    const c = matmulOp([a2, b2], {
      transA: a.rank === 1 ? false : opts.transA,
      transB: b.rank === 1 ? false : opts.transB,
    });
    const shape = [...c.shape];
    if (b.rank === 1) shape.splice(shape.length - 1, 1);
    if (a.rank === 1) shape.splice(shape.length - (b.rank === 1 ? 1 : 2), 1);
    return c.reshape(...shape);
  }
  return matmulOp([a, b], opts);
}
