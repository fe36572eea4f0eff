/**
 * Batched matrix multiplication C = op(A) @ op(B), op = identity or transpose (read through strides, no
 * copy), broadcasting over up to four leading dims.
 *
 * Two variants from one template, chosen per adapter by a one-time measurement (`matmulVariant`):
 * - `register`: each invocation owns a 4x4 block of C and keeps it in registers; no workgroup memory and
 *   no barriers. Fastest on CPU adapters, where barriers are very expensive.
 * - `tiled`: a workgroup of 16x16 invocations owns a 64x64 block of C; 64x16 slices of A and B are staged
 *   in workgroup memory, and each invocation accumulates a 4x4 block from them. Favoured on real GPUs.
 * K is walked in slices of at most MAX_K so that no invocation loops more than 65535 times; slices after
 * the first accumulate into C.
 * @module
 */

import { defineOp } from "../autograd.ts";
import { deviceInfo } from "../device.ts";
import { defineKernel, dispatch, type Kernel } from "../kernel.ts";
import { broadcastShapes, fmt, padRank, type Shape, sizeOf, stridesOf } from "../shape.ts";
import { Tensor } from "../tensor.ts";
import { sumToShape } from "./reduce.ts";

/** Options of {@linkcode matmul}. */
export interface MatmulOptions {
  /** Use A transposed in its last two dims (read through strides, no copy). */
  transA?: boolean;
  /** Use B transposed in its last two dims (read through strides, no copy). */
  transB?: boolean;
}

/** The two kernel variants. */
export type MatmulVariant = "register" | "tiled";

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
  ["sam", "u32"], // A stride along m
  ["sak", "u32"], // A stride along k
  ["sbk", "u32"],
  ["sbn", "u32"],
  ["bsh", "vec4<u32>"], // batch shape (4 dims)
  ["bsa", "vec4<u32>"], // A batch strides (0 = broadcast)
  ["bsb", "vec4<u32>"],
];

/** WGSL that turns the batch index `bi` into element offsets of A, B and C. */
const BATCH_OFFSETS = `
  var rem = bi; var aoff = 0u; var boff = 0u;
  { let c = rem % P.bsh.w; rem = rem / P.bsh.w; aoff += c * P.bsa.w; boff += c * P.bsb.w; }
  { let c = rem % P.bsh.z; rem = rem / P.bsh.z; aoff += c * P.bsa.z; boff += c * P.bsb.z; }
  { let c = rem % P.bsh.y; rem = rem / P.bsh.y; aoff += c * P.bsa.y; boff += c * P.bsb.y; }
  { let c = rem % P.bsh.x; aoff += c * P.bsa.x; boff += c * P.bsb.x; }
  let coff = bi * P.M * P.N;`;

/** WGSL that writes (or adds into) the 4x4 block `acc` at rows m0.., columns n0... */
const STORE_BLOCK = `
  for (var i = 0u; i < 4u; i++) {
    let m = m0 + i;
    if (m >= P.M) { break; }
    for (var j = 0u; j < 4u; j++) {
      let n = n0 + j;
      if (n < P.N) {
        let at = coff + m * P.N + n;
        var v = acc[i][j];
        if (P.accumulate != 0u) { v = v + ld_c(at); }
        st_c(at, v);
      }
    }
  }`;

function registerKernel(): Kernel {
  return defineKernel({
    name: "matmul_register",
    buffers: [
      { name: "a", type: "f32", access: "read" },
      { name: "b", type: "f32", access: "read" },
      { name: "c", type: "f32", access: "read_write" },
    ],
    uniforms: COMMON_UNIFORMS,
    workgroupSize: 64,
    body: `
  // workgroup -> (batch, 32x32 block); invocation -> 4x4 sub-block, kept in registers.
  let tilesPerBatch = P.tilesM * P.tilesN;
  let bi = group / tilesPerBatch;
  let t = group % tilesPerBatch;
  let m0 = (t / P.tilesN) * 32u + (lid / 8u) * 4u;
  let n0 = (t % P.tilesN) * 32u + (lid % 8u) * 4u;
  ${BATCH_OFFSETS}
  // Rows/columns past the edge read a clamped (valid) address; their results are never stored.
  var ar: array<u32, 4>;
  var bc: array<u32, 4>;
  for (var i = 0u; i < 4u; i++) {
    ar[i] = aoff + min(m0 + i, P.M - 1u) * P.sam;
    bc[i] = boff + min(n0 + i, P.N - 1u) * P.sbn;
  }
  var acc = mat4x4<f32>();
  for (var k = P.k0; k < P.k1; k++) {
    let av = vec4<f32>(ld_a(ar[0] + k * P.sak), ld_a(ar[1] + k * P.sak), ld_a(ar[2] + k * P.sak), ld_a(ar[3] + k * P.sak));
    let bv = vec4<f32>(ld_b(bc[0] + k * P.sbk), ld_b(bc[1] + k * P.sbk), ld_b(bc[2] + k * P.sbk), ld_b(bc[3] + k * P.sbk));
    acc[0] += av.x * bv;
    acc[1] += av.y * bv;
    acc[2] += av.z * bv;
    acc[3] += av.w * bv;
  }
  ${STORE_BLOCK}`,
  });
}

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
    decls: `
var<workgroup> As: array<f32, 1024>; // 64 rows x 16 k of A
var<workgroup> Bs: array<f32, 1024>; // 16 k x 64 columns of B`,
    body: `
  // workgroup -> (batch, 64x64 block of C); invocation (ty, tx) -> 4x4 sub-block.
  let tilesPerBatch = P.tilesM * P.tilesN;
  let bi = group / tilesPerBatch;
  let t = group % tilesPerBatch;
  let bm = (t / P.tilesN) * 64u;
  let bn = (t % P.tilesN) * 64u;
  let m0 = bm + (lid / 16u) * 4u;
  let n0 = bn + (lid % 16u) * 4u;
  ${BATCH_OFFSETS}
  var acc = mat4x4<f32>();
  for (var kt = P.k0; kt < P.k1; kt += 16u) {
    // Stage A[bm..bm+64, kt..kt+16] and B[kt..kt+16, bn..bn+64]: 4 elements each per invocation.
    for (var e = 0u; e < 4u; e++) {
      let idx = lid * 4u + e;
      let r = idx / 16u; let kk = idx % 16u;
      let k = kt + kk;
      let m = bm + r;
      As[idx] = select(0.0, ld_a(aoff + min(m, P.M - 1u) * P.sam + min(k, P.K - 1u) * P.sak), m < P.M && k < P.k1);
      let kb = idx / 64u; let cn = idx % 64u;
      let n = bn + cn;
      let k2 = kt + kb;
      Bs[idx] = select(0.0, ld_b(boff + min(k2, P.K - 1u) * P.sbk + min(n, P.N - 1u) * P.sbn), n < P.N && k2 < P.k1);
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
  ${STORE_BLOCK}`,
  });
}

const KERNELS: Record<MatmulVariant, { kernel: Kernel; block: number }> = {
  register: { kernel: registerKernel(), block: 32 },
  tiled: { kernel: tiledKernel(), block: 64 },
};

let chosen: MatmulVariant | null = null;

/** The variant in use: set by {@linkcode setMatmulVariant} or by the autotuner; else by adapter kind. */
export function matmulVariant(): MatmulVariant {
  return chosen ?? (deviceInfo().isFallbackAdapter ? "register" : "tiled");
}

/** Forces a matmul variant (the autotuner calls this with its measured choice). */
export function setMatmulVariant(v: MatmulVariant): void {
  chosen = v;
}

/** Computes op(a) @ op(b) into a new tensor with a given variant; no autograd. */
export function matmulRaw(a: Tensor, b: Tensor, opts: MatmulOptions, variant: MatmulVariant = matmulVariant()): Tensor {
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
  const out = Tensor.empty([...batch, M, N]);
  const nb = sizeOf(batch);
  if (out.size === 0) return out;
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
  const { kernel, block } = KERNELS[variant];
  const tilesM = Math.ceil(M / block);
  const tilesN = Math.ceil(N / block);
  const base = {
    M,
    N,
    K,
    tilesM,
    tilesN,
    sam: transA ? 1 : K,
    sak: transA ? M : 1,
    sbk: transB ? 1 : N,
    sbn: transB ? K : 1,
    bsh,
    bsa: batchStrides(a.shape),
    bsb: batchStrides(b.shape),
  };
  const storages = { a: a.storage, b: b.storage, c: out.storage };
  const groups = nb * tilesM * tilesN;
  if (K === 0) {
    dispatch(kernel, storages, { ...base, k0: 0, k1: 0, accumulate: 0 }, groups);
    return out;
  }
  for (let k0 = 0; k0 < K; k0 += MAX_K) {
    dispatch(
      kernel,
      storages,
      { ...base, k0, k1: Math.min(K, k0 + MAX_K), accumulate: k0 > 0 ? 1 : 0 },
      groups,
    );
  }
  return out;
}

const matmulOp = defineOp<Required<MatmulOptions>>({
  name: "matmul",
  forward: ([a, b], opts, save) => {
    save(a, b);
    return matmulRaw(a, b, opts);
  },
  backward: (g, [a, b], _i, { transA, transB }) => {
    let ga: Tensor | null = null;
    let gb: Tensor | null = null;
    if (a.requiresGrad) {
      const full = transA
        ? matmulRaw(b, g, { transA: transB, transB: true })
        : matmulRaw(g, b, { transB: !transB });
      ga = sumToShape(full, a.shape);
      if (ga !== full) full.dispose();
    }
    if (b.requiresGrad) {
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

/** Sizes the tuner measures with (kept small: it runs once per adapter). */
export const TUNE_SIZE = 256;
