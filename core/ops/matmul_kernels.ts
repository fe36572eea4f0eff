/**
 * WGSL of the matmul kernels (see `matmul.ts` for how problems are planned over them):
 * - `register`: each invocation owns an rm x rn block of C in registers, no workgroup memory, no barriers;
 *   generated per operand layout (transposes, vec4 or scalar access) and tile.
 * - `tiled`, `tiled128`: a workgroup of 16x16 invocations owns 64x64 (128x128) of C, staging 64x16 (128x8)
 *   slices of A and B in workgroup memory; one template (`tiledKernel`), generated per tile and transposes.
 * - `matvec` (GPUs, any variant): a few rows against a weight, a workgroup per column of C splitting K.
 * Every kernel reads A, B through the kernel accessors (binding windows) and writes (or adds into) C. In the
 * `register` and `tiled` kernels a workgroup index maps to (K slice, batch, block of C), and slice s writes the
 * s-th partial C; in `matvec` it maps to a column of C, all of K (up to MAX_K) in one dispatch, unbatched.
 * @module
 */

import { fixedSubgroupSize } from "../device.ts";
import { defineKernel, type ElemType, type Kernel } from "../kernel.ts";

/** The kernel variants: `register`, `tiled` and `tiled128` (workgroup-memory tiles of 64x64 and 128x128),
 * and `subgroup` (the register kernel with a subgroup's lanes sharing one operand's loads) where the device has
 * subgroups of one fixed size. */
export type MatmulVariant = "register" | "tiled" | "tiled128" | "subgroup";

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
 *
 * With `share` (the `subgroup` variant) a workgroup is one subgroup of `sg` lanes that share one operand:
 * "a": the lanes' rm x rn blocks lie side by side along n (the workgroup owns rm x sg*rn of C) and read the
 * same rows of A; "b": side by side along m (sg*rm x rn), the same columns of B. Per step of k each lane
 * loads 1/sg of the shared values and subgroupBroadcast hands each to every lane. On a CPU adapter a load
 * costs a loop over the lanes while a broadcast costs almost nothing, so sharing the operand cuts the loads
 * per multiply-add about in half or more.
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
  /** The operand a subgroup's lanes share (`subgroup` variant), else null. */
  share: "a" | "b" | null;
  /** Subgroup size compiled in (with `share`), else 0. */
  sg: number;
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

/**
 * The `subgroup` tile: lanes side by side along n, sharing A's rows (16 x 8 per lane; fewer rows where C has
 * fewer), where C is at least 8 columns per lane wide; else side by side along m, sharing B's columns (up to
 * 8 rows x 16 columns per lane, fewer where C has fewer). The fastest blocks measured on lavapipe at
 * 512 x 512 x 512: sharing A, 16x8 (2.4x the `register` kernel's speed; 8x4: 1.3x); sharing B, 8x16 (2.2x;
 * 8x8: 1.5x, 16x16: 2.1x).
 */
function subgroupTile(M: number, N: number, sg: number): { rm: number; rn: number; share: "a" | "b" } {
  if (N >= 8 * sg) return { rm: M > 8 ? 16 : M > 4 ? 8 : M > 2 ? 4 : M, rn: 8, share: "a" };
  const rows = Math.ceil(M / sg); // rows per lane that cover C
  return { rm: rows > 4 ? 8 : rows > 2 ? 4 : rows, rn: N > 8 ? 16 : N > 4 ? 8 : 4, share: "b" };
}
const XYZW = "xyzw";

/**
 * How a `register` kernel reads one operand per step of k: `count` bases (rows or columns, or groups of 4
 * of them when read as vec4 along m or n) whose addresses are computed before the K loop, and for each k
 * of the step (just one load per base when read as vec4 along k) the value `name(q, i)` of base i.
 */
interface OperandReads {
  buf: "a" | "b";
  count: number;
  /** WGSL of base i's address (i: a constant, or a WGSL u32 expression). */
  base: (i: number | string) => string;
  /** Read as vec4 along k: one load covers the step's 4 k. */
  alongK: boolean;
  /** WGSL factor from k to an address ("" for 1). */
  stride: string;
  name: (q: number, i: number) => string;
}

/** How a `register` kernel reads operand `buf` in `mode` (m4 / n4: vec4 along m / n; k4: along k; m1, n1,
 * k1: scalars) for an invocation's `size` rows (A) or columns (B) from m0 or n0. */
function operandReads(buf: "a" | "b", mode: string, size: number): OperandReads {
  const [o, d, D] = buf === "a" ? ["aoff", "m0", "P.M"] : ["boff", "n0", "P.N"];
  // base i's row or column, clamped; with a literal i the constant folded into the sum
  const at = (i: string | number, times = 1) =>
    typeof i === "number" ? `${d} + ${times * i}u` : `${d} + ${times === 1 ? "" : `${times}u * `}${i}`;
  const name = mode === "k4"
    ? (_q: number, i: number) => `${buf}${i}`
    : (q: number, i: number) => `${buf}${q}_${i}`;
  switch (mode) {
    case "k4":
      return {
        buf,
        count: size,
        alongK: true,
        stride: "",
        name,
        base: (i) => `(${o} + min(${at(i)}, ${D} - 1u) * P.K) / 4u`,
      };
    case "k1":
      return {
        buf,
        count: size,
        alongK: false,
        stride: "",
        name,
        base: (i) => `${o} + min(${at(i)}, ${D} - 1u) * P.K`,
      };
    case "m4":
    case "n4":
      return {
        buf,
        count: size >> 2,
        alongK: false,
        stride: `(${D} / 4u)`,
        name,
        base: (i) => `(${o} + min(${at(i, 4)}, ${D} - 4u)) / 4u`,
      };
    default: // m1, n1
      return {
        buf,
        count: size,
        alongK: false,
        stride: D,
        name,
        base: (i) => `${o} + min(${at(i)}, ${D} - 1u)`,
      };
  }
}

/**
 * The `register` kernel for one layout. Per step of 4 k an invocation reads A as rm rows x 4 k and B as
 * 4 k x rn columns -- vec4 loads along each operand's contiguous dim, or scalar loads -- and does 4*rm*rn
 * multiply-adds (256 for the 8x8 tile: 16 vec4 loads). Row and column base addresses are computed once,
 * before the K loop; rows and columns past the edge read a clamped (valid, 4-aligned) address and their
 * results are never stored. C is written as vec4 when N is a multiple of 4. With `share`, the shared
 * operand's loads are split over the subgroup's lanes and broadcast (see RegisterLayout).
 */
function registerKernel(l: RegisterLayout): Kernel {
  const { transA, transB, vecA, vecB, vecC, rm, rn, wm, wn, linear, share, sg } = l;
  if (rn % 4 !== 0 || (transA && vecA && rm % 4 !== 0)) {
    throw new Error(`matmul: bad register tile ${rm}x${rn}`);
  }
  const rows = [...Array(rm).keys()]; // rows of A (and C) of one invocation
  const cols = [...Array(rn).keys()]; // columns of B (and C)
  const colQuads = [...Array(rn >> 2).keys()]; // groups of 4 columns (vec4 along n)
  const q4 = [0, 1, 2, 3];
  const aMode = transA ? (vecA ? "m4" : "m1") : (vecA ? "k4" : "k1");
  const bMode = transB ? (vecB ? "k4" : "k1") : (vecB ? "n4" : "n1");
  const A = operandReads("a", aMode, rm);
  const B = operandReads("b", bMode, rn);
  /** The values one step over `ku` k reads: (q, base) pairs, q-major. */
  const entries = (o: OperandReads, ku: number) =>
    (o.alongK ? [0] : q4.slice(0, ku)).flatMap((q) => [...Array(o.count).keys()].map((i) => [q, i]));
  /** WGSL of the address offset of k + q (vec4 along k: k / 4). */
  const kTerm = (o: OperandReads, q: string | number) =>
    o.alongK ? "kv" : `${q === 0 ? "k" : `(k + ${q}u)`}${o.stride ? ` * ${o.stride}` : ""}`;
  const shared = (o: OperandReads) => share === o.buf;
  /** Each lane's loads of a shared operand (slot j: value j * sg + lane, q-major, clamped to the last). */
  const slots = (o: OperandReads, ku: number) => Math.ceil(entries(o, ku).length / sg);

  const pre: string[] = [];
  for (const o of [A, B]) {
    const p = `p${o.buf}`;
    if (!shared(o)) {
      for (let i = 0; i < o.count; i++) pre.push(`let ${p}${i} = ${o.base(i)};`);
      continue;
    }
    const E = entries(o, 4).length;
    for (let j = 0; j < slots(o, 4); j++) {
      const e = `e${o.buf}${j}`;
      pre.push(`let ${e} = min(sgLane + ${j * sg}u, ${E - 1}u);`);
      const q = o.alongK ? "" : ` + (${e} / ${o.count}u)${o.stride ? ` * ${o.stride}` : ""}`;
      pre.push(`let ${p}${j} = ${o.base(`(${e} % ${o.count}u)`)}${q};`);
    }
  }

  /** One K step over `ku` values of k from `k` (vec4-along-k operands use `kv` = k / 4). */
  const step = (ku: number): string => {
    const s: string[] = [];
    for (const o of [A, B]) {
      const p = `p${o.buf}`;
      if (!shared(o)) {
        for (const [q, i] of entries(o, ku)) {
          s.push(`let ${o.name(q, i)} = ld_${o.buf}(${p}${i} + ${kTerm(o, q)});`);
        }
        continue;
      }
      for (let j = 0; j < slots(o, ku); j++) {
        s.push(`let v${o.buf}${j} = ld_${o.buf}(${p}${j} + ${kTerm(o, 0)});`);
      }
      entries(o, ku).forEach(([q, i], e) =>
        s.push(`let ${o.name(q, i)} = subgroupBroadcast(v${o.buf}${Math.floor(e / sg)}, ${e % sg}u);`)
      );
    }
    // aval(r, q): A[m0 + r, k + q] as an f32 expression.
    const aval = aMode === "k4"
      ? (r: number, q: number) => `a${r}.${XYZW[q]}`
      : aMode === "m4"
      ? (r: number, q: number) => `a${q}_${r >> 2}.${XYZW[r & 3]}`
      : (r: number, q: number) => `a${q}_${r}`;
    // bvec(q, g): B[k + q, n0 + 4g .. n0 + 4g + 3] as a vec4<f32> expression.
    const gather = (f: (q: number, c: number) => string) => (q: number, g: number) =>
      `vec4<f32>(${q4.map((j) => f(q, 4 * g + j)).join(", ")})`;
    const bvec = bMode === "n4"
      ? (q: number, g: number) => `b${q}_${g}`
      : bMode === "k4"
      ? gather((q, c) => `b${c}.${XYZW[q]}`)
      : gather((q, c) => `b${q}_${c}`);
    for (const q of q4.slice(0, ku)) {
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
  const where = share
    ? `
  // workgroup = one subgroup -> (K slice, batch, ${
      share === "a" ? `${rm}x${sg * rn}` : `${sg * rm}x${rn}`
    } block
  // of C); lane -> ${rm}x${rn} of it in registers, side by side along ${
      share === "a" ? "n" : "m"
    }.${GROUP_TILE}
  let m0 = (t / P.tilesN) * ${share === "a" ? rm : sg * rm}u${share === "b" ? ` + sgLane * ${rm}u` : ""};
  let n0 = (t % P.tilesN) * ${share === "a" ? sg * rn : rn}u${share === "a" ? ` + sgLane * ${rn}u` : ""};`
    : linear
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
  const kind = share ? `subgroup${sg}_${share}` : "register";
  return defineKernel({
    name: `matmul_${kind}_${aMode}_${bMode}_c${vecC ? 4 : 1}_${rm}x${rn}${
      share ? "" : `_${linear ? "linear" : `${wm}x${wn}`}`
    }`,
    buffers: [
      { name: "a", type: vecA ? "vec4<f32>" : "f32", access: "read" },
      { name: "b", type: vecB ? "vec4<f32>" : "f32", access: "read" },
      { name: "c", type: vecC ? "vec4<f32>" : "f32", access: "read_write" },
    ],
    uniforms: COMMON_UNIFORMS,
    workgroupSize: share ? sg : wm * wn,
    subgroups: share !== null,
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

/**
 * Shape of a `tiled` pipeline: a workgroup of 16x16 invocations owns bm x bn of C and walks K in slices of
 * bk, staging bm x bk of A and bk x bn of B in workgroup memory between two barriers; each invocation
 * accumulates tm x tn of C in registers, as tm / 4 x tn / 4 quarters of 4x4 that lie 64 rows (columns) apart,
 * so that the 16 invocations of a row of the workgroup read 16 neighbouring vec4s of workgroup memory. The
 * transposes pick how invocations load the tiles: neighbouring invocations read neighbouring addresses of
 * whichever dim is contiguous (k of A, or m where A is read transposed; n of B, or k where transposed).
 */
interface TiledShape {
  bm: number;
  bn: number;
  bk: number;
  transA: boolean;
  transB: boolean;
}

/** The `tiled` variants' tiles: `tiled`, 64x64 of C in 16-deep slices (4x4 per invocation); `tiled128`,
 * 128x128 in 8-deep slices (8x8 per invocation: 64 multiply-adds per 4 vec4 reads of workgroup memory, the
 * usual shape of a GPU's fast single-precision matmul). */
const TILED_TILES: Record<"tiled" | "tiled128", { bm: number; bn: number; bk: number }> = {
  tiled: { bm: 64, bn: 64, bk: 16 },
  tiled128: { bm: 128, bn: 128, bk: 8 },
};

/** The `tiled` kernel of a shape (see {@linkcode TiledShape}). */
function tiledKernel({ bm, bn, bk, transA, transB }: TiledShape): Kernel {
  const [qm, qn] = [bm / 64, bn / 64]; // 4x4 quarters per invocation along m and n
  const range = (n: number) => [...Array(n).keys()];
  const acc = (q: number, i: number, p: number) => `c${q}_${i}_${p}`;
  // Stages `width` rows (A) or columns (B) from `first` by bk of k into `tile` ([k][width] as vec4s), zeros
  // outside the operand and the slice; element idx of the tile -> (row or column c, k), neighbouring idx
  // along the operand's contiguous dim (`kFirst`: k). One template for both operands.
  const stage = (
    o: { tile: string; width: number; kFirst: boolean; first: string; ld: string; off: string },
    s: { dim: string; k: string; limit: string },
  ) => `
    for (var e = 0u; e < ${(o.width * bk) / 256}u; e++) {
      let idx = e * 256u + lid;
      ${
    o.kFirst
      ? `let kk = idx % ${bk}u; let c = idx / ${bk}u;`
      : `let c = idx % ${o.width}u; let kk = idx / ${o.width}u;`
  }
      let d = ${o.first} + c;
      let k = kt + kk;
      ${o.tile}[kk * ${o.width / 4}u + c / 4u][c % 4u] = select(0.0,
        ${o.ld}(${o.off} + min(d, ${s.limit} - 1u) * ${s.dim} + min(k, P.K - 1u) * ${s.k}), d < ${s.limit} && k < ke);
    }`;
  return defineKernel({
    name: `matmul_tiled_${bm}x${bn}_k${bk}_${transA ? "t" : "n"}${transB ? "t" : "n"}`,
    buffers: [
      { name: "a", type: "f32", access: "read" },
      { name: "b", type: "f32", access: "read" },
      { name: "c", type: "f32", access: "read_write" },
    ],
    uniforms: COMMON_UNIFORMS,
    workgroupSize: 256,
    decls: `${putC("f32")}
var<workgroup> As: array<vec4<f32>, ${(bk * bm) / 4}>; // [k][m]: ${bk} k x ${bm} rows of A
var<workgroup> Bs: array<vec4<f32>, ${(bk * bn) / 4}>; // [k][n]: ${bk} k x ${bn} columns of B`,
    body: `
  // workgroup -> (K slice, batch, ${bm}x${bn} block of C); invocation (ty, tx) -> rows q * 64 + 4 ty + i and
  // columns p * 64 + 4 tx + j of the block.${GROUP_TILE}
  let bm0 = (t / P.tilesN) * ${bm}u;
  let bn0 = (t % P.tilesN) * ${bn}u;
  let ty = lid / 16u;
  let tx = lid % 16u;
  ${OFFSETS}
  ${
      range(qm).flatMap((q) =>
        range(4).flatMap((i) => range(qn).map((p) => `var ${acc(q, i, p)} = vec4<f32>();`))
      ).join(" ")
    }
  for (var kt = kb; kt < ke; kt += ${bk}u) {
    // Stage A[bm0.., kt..] and B[kt.., bn0..] (zeros outside A, B and the slice).${
      stage(
        { tile: "As", width: bm, kFirst: !transA, first: "bm0", ld: "ld_a", off: "aoff" },
        { dim: "P.sam", k: "P.sak", limit: "P.M" },
      )
    }${
      stage(
        { tile: "Bs", width: bn, kFirst: transB, first: "bn0", ld: "ld_b", off: "boff" },
        { dim: "P.sbn", k: "P.sbk", limit: "P.N" },
      )
    }
    workgroupBarrier();
    for (var kk = 0u; kk < ${bk}u; kk++) {
      ${range(qm).map((q) => `let a${q} = As[kk * ${bm / 4}u + ${q * 16}u + ty];`).join(" ")}
      ${range(qn).map((p) => `let b${p} = Bs[kk * ${bn / 4}u + ${p * 16}u + tx];`).join(" ")}
      ${
      range(qm).flatMap((q) =>
        range(4).flatMap((i) => range(qn).map((p) => `${acc(q, i, p)} += a${q}[${i}] * b${p};`))
      ).join("\n      ")
    }
    }
    workgroupBarrier();
  }
  ${
      range(qm).flatMap((q) =>
        range(4).map((i) =>
          `{
    let m = bm0 + ${q * 64 + i}u + 4u * ty;
    if (m < P.M) {${
            range(qn).map((p) => `
      for (var j = 0u; j < 4u; j++) {
        let n = bn0 + ${p * 64}u + 4u * tx + j;
        if (n < P.N) { put_c(coff + m * P.N + n, ${acc(q, i, p)}[j]); }
      }`).join("")
          }
    }
  }`
        )
      ).join("\n  ")
    }`,
  });
}

/** Most rows of A the `matvec` kernel takes (each an accumulator per invocation). */
export const MATVEC_MAX_ROWS = 4;
/** Invocations of a `matvec` workgroup, which split K among them. */
const MATVEC_WG = 64;

/**
 * The `matvec` kernel, for a few rows of A against a weight read as B^T (decoding's x (M, K) @ W^T, W (N, K) as
 * nn.Linear stores it) on a GPU: a workgroup of 64 owns one column n of C for all M (at most 4) rows. Its
 * invocations take every 64th element of k in [k0, k1) (vec4s where K is a multiple of 4), so that they read
 * W's row n side by side, and sum their M partials through workgroup memory (M x 64 floats) in a tree of six
 * levels (seven barriers). One dispatch with N workgroups where the `register` kernels split K into slices
 * and sum them in a second dispatch. Unbatched, A and W contiguous.
 *
 * With `rms`, A's rows are RMS-normalized on the way, as `rmsNorm(a, g, eps) @ W^T` (decoding's norm before
 * in_proj): each invocation also sums its elements' squares of each row and multiplies A by g (K), the tree
 * sums both (2M x 64 floats), and row m's sum is scaled by rsqrt(sum of squares / K + eps). Every workgroup
 * reads the rows whole anyway, so the norm costs no dispatch of its own.
 */
function matvecKernel(M: number, vec: boolean, rms: boolean): Kernel {
  const type: ElemType = vec ? "vec4<f32>" : "f32";
  const rows = [...Array(M).keys()];
  const w = vec ? 4 : 1; // floats per load
  const mul = vec ? (a: string, b: string) => `dot(${a}, ${b})` : (a: string, b: string) => `${a} * ${b}`;
  const sums = rms ? 2 * M : M; // the tree's values: row m's product at m, its sum of squares at M + m
  const at = (j: number) => `${j * MATVEC_WG}u + lid`;
  return defineKernel({
    name: `matmul_matvec_m${M}_k${w}${rms ? "_rms" : ""}`,
    buffers: [
      { name: "a", type, access: "read" },
      { name: "b", type, access: "read" },
      { name: "c", type: "f32", access: "read_write" },
      ...(rms ? [{ name: "g", type, access: "read" as const }] : []),
    ],
    uniforms: rms ? [...COMMON_UNIFORMS, ["eps", "f32"]] : COMMON_UNIFORMS,
    workgroupSize: MATVEC_WG,
    decls: `${putC("f32")}
var<workgroup> part: array<f32, ${sums * MATVEC_WG}>; // value j's partial sums at j * ${MATVEC_WG}`,
    body: `
  // workgroup -> column n of C (row n of W); invocation -> every ${MATVEC_WG}th load of k in [k0, k1)
  let n = group;
  let kw = P.K / ${w}u; // loads per row
  ${rows.map((m) => `var acc${m} = 0.0;${rms ? ` var sq${m} = 0.0;` : ""}`).join(" ")}
  for (var k = P.k0 / ${w}u + lid; k < P.k1 / ${w}u; k += ${MATVEC_WG}u) {
    let wv = ld_b(n * kw + k);${rms ? "\n    let gv = ld_g(k);" : ""}
    ${
      rows.map((m) =>
        rms
          ? `let a${m} = ld_a(${m}u * kw + k); sq${m} += ${mul(`a${m}`, `a${m}`)}; acc${m} += ${
            mul(`a${m} * gv`, "wv")
          };`
          : `acc${m} += ${mul(`ld_a(${m}u * kw + k)`, "wv")};`
      ).join("\n    ")
    }
  }
  ${rows.map((m) => `part[${at(m)}] = acc${m};${rms ? ` part[${at(M + m)}] = sq${m};` : ""}`).join(" ")}
  workgroupBarrier();
  for (var stride = ${MATVEC_WG / 2}u; stride > 0u; stride >>= 1u) {
    if (lid < stride) {
      ${[...Array(sums).keys()].map((j) => `part[${at(j)}] += part[${at(j)} + stride];`).join("\n      ")}
    }
    workgroupBarrier();
  }
  if (lid < ${M}u) {
    let v = part[lid * ${MATVEC_WG}u];
    put_c(lid * P.N + n, ${
      rms ? `v * inverseSqrt(part[(${M}u + lid) * ${MATVEC_WG}u] / f32(P.K) + P.eps)` : "v"
    });
  }`,
  });
}

const matvecKernels = new Map<string, Kernel>();

/** The `matvec` kernel for M rows (at most MATVEC_MAX_ROWS), vec4 loads where K is a multiple of 4; with
 * `rms`, the rows RMS-normalized on the way (see matvecKernel). */
export function matvecFor(M: number, K: number, rms = false): Kernel {
  if (!(M >= 1 && M <= MATVEC_MAX_ROWS)) throw new Error(`matmul: matvec takes 1 to 4 rows, got ${M}`);
  const key = `${M}|${K % 4 === 0}|${rms}`;
  let kernel = matvecKernels.get(key);
  if (!kernel) matvecKernels.set(key, kernel = matvecKernel(M, K % 4 === 0, rms));
  return kernel;
}

const registerKernels = new Map<string, Kernel>();
const tiledKernels = new Map<string, Kernel>();

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
export function kernelFor(
  variant: MatmulVariant,
  transA: boolean,
  transB: boolean,
  M: number,
  N: number,
  K: number,
  linear = false,
): { kernel: Kernel; blockM: number; blockN: number } {
  if (variant === "tiled" || variant === "tiled128") {
    const tile = TILED_TILES[variant];
    const key = `${variant}|${transA}|${transB}`;
    let kernel = tiledKernels.get(key);
    if (!kernel) tiledKernels.set(key, kernel = tiledKernel({ ...tile, transA, transB }));
    return { kernel, blockM: tile.bm, blockN: tile.bn };
  }
  // the subgroup size compiled in: only where every subgroup has one size
  const sg = variant === "subgroup" ? fixedSubgroupSize() : 0;
  if (sg === null) throw new Error("matmul: the `subgroup` variant needs subgroups of one fixed size");
  const shared = sg ? subgroupTile(M, N, sg) : null;
  const tile = shared
    ? { rm: shared.rm, rn: shared.rn, wm: 1, wn: 1 }
    : linear
    ? linearTile(M, N)
    : registerTile(M);
  // vec4 access needs the operand's contiguous dim to be a multiple of 4; then every row start, batch
  // offset and K slice start is 4-aligned too. A read as vec4 along m also needs 4 rows per invocation.
  const layout: RegisterLayout = {
    transA,
    transB,
    vecA: transA ? M % 4 === 0 && tile.rm % 4 === 0 : K % 4 === 0,
    vecB: (transB ? K : N) % 4 === 0,
    vecC: N % 4 === 0,
    ...tile,
    linear: linear && !shared,
    share: shared?.share ?? null,
    sg,
  };
  const key = JSON.stringify(layout);
  let kernel = registerKernels.get(key);
  if (!kernel) registerKernels.set(key, kernel = registerKernel(layout));
  if (shared) {
    const alongN = shared.share === "a";
    return { kernel, blockM: alongN ? tile.rm : sg * tile.rm, blockN: alongN ? sg * tile.rn : tile.rn };
  }
  return linear
    ? { kernel, blockM: tile.rm, blockN: tile.rn }
    : { kernel, blockM: tile.rm * tile.wm, blockN: tile.rn * tile.wn };
}
