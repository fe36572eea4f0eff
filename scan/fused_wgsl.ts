/**
 * The WGSL pieces the fused scan's kernel templates share: compile-time unrolling, the columns of a state
 * block in dBC and in the backward's partial rows, loading B, C and the dt columns of a step (each lane
 * loading all, or one subgroup load handed out by shuffles), dt_proj's product inside the kernels, softplus
 * and sigmoid, the common uniforms, and the cache of generated kernels.
 * @module
 */

import type { BufferDecl, Kernel } from "../core/kernel.ts";
import { SIGMOID_WGSL, SOFTPLUS_WGSL } from "../core/ops/wgsl_math.ts";
import { type FusedVariant, shuffleSize } from "./fused_variant.ts";
export { MAX_INLINE_DT_RANK } from "./fused_variant.ts";

const kernels = new Map<string, Kernel>();

/** The kernel of a template's parameters, generated once: `key` spells every parameter. */
export function cachedKernel(key: string, make: () => Kernel): Kernel {
  let k = kernels.get(key);
  if (!k) kernels.set(key, k = make());
  return k;
}

/** Repeats a WGSL line for n = 0..count-1 with the index spelled out: loops whose trip count the shader
 * compiler might not unroll would count against the 65535-iteration limit of software adapters. */
export function unroll(count: number, line: (n: number) => string): string {
  return Array.from({ length: count }, (_, n) => line(n)).join("\n    ");
}

/** WGSL of the offset of block column c (c < Nb: B, c < 2Nb: C, then the dt columns, `dt` of them, which
 * a partial row keeps after all 2N B and C columns) from the block's first B column (state n0); c is a WGSL
 * expression or a constant. */
export function blockColumn(N: number, Nb: number, c: string | number, n0 = 0, dt = 0): string {
  if (typeof c === "number") return `${c < Nb ? c : c < 2 * Nb ? c + N - Nb : c - 2 * Nb + 2 * N - n0}u`;
  const bc = Nb === N ? c : `select(${c} + ${N - Nb}u, ${c}, ${c} < ${Nb}u)`;
  return dt ? `select(${c} + ${2 * N - n0 - 2 * Nb}u, ${bc}, ${c} < ${2 * Nb}u)` : bc;
}

/** Width of a dB/dC partial row: 2N, then `dt` dt columns (padded to a multiple of 4 for vec4 reads). */
export function partialWidth(N: number, dt: number): number {
  return 2 * N + (dt && (2 * N) % 4 === 0 ? 4 * Math.ceil(dt / 4) : dt);
}

/**
 * WGSL defining `dr`, the raw delta of channel dc at step t (row index `i`): read from draw, or with Ri > 0
 * computed from the dt columns of dBC (row starting at `rowStart`, loaded into `dtv`) and this channel's
 * dt_proj row `Wd`.
 */
export function drawLines(Ri: number, shuffle: boolean, rowStart: string): string {
  if (!Ri) return "let dr = ld_draw(i);";
  const lines = [`var dtv: array<f32, ${Ri}>;`];
  if (shuffle) {
    const SG = shuffleSize();
    const J = Math.ceil(Ri / SG);
    lines.push(
      `var dtb: array<f32, ${J}>;`,
      unroll(
        J,
        (j) =>
          `{ let c = ${j * SG}u + sgLane; dtb[${j}] = select(0.0, ld_dbc(${rowStart} + min(c, ${
            Ri - 1
          }u)), c < ${Ri}u); }`,
      ),
      unroll(Ri, (r) => `dtv[${r}] = subgroupShuffle(dtb[${Math.floor(r / SG)}], ${r % SG}u);`),
    );
  } else lines.push(unroll(Ri, (r) => `dtv[${r}] = ld_dbc(${rowStart} + ${r}u);`));
  lines.push(`let dr = ${Array.from({ length: Ri }, (_, r) => `dtv[${r}] * Wd[${r}]`).join(" + ")};`);
  return lines.join("\n    ");
}

/** WGSL loading this channel's dt_proj row `Wd` (Ri floats) from ph = [bias | A_log | D | W | ...]. */
export function loadWd(N: number, Ri: number): string {
  if (!Ri) return "";
  return `var Wd: array<f32, ${Ri}>;
  ${unroll(Ri, (r) => `Wd[${r}] = ld_ph(P.ED * ${N + 2}u + dc * ${Ri}u + ${r}u);`)}`;
}

/**
 * WGSL giving an invocation its channel `d` in tile `tile` (a WGSL expression) of WG invocations; with `lanes`
 * > 1, that many neighbouring lanes share the channel, and lane q holds its states nq .. nq + Nb / lanes.
 */
export function channelLines(tile: string, WG: number, lanes: number, Nb: number): string {
  if (lanes === 1) return `let d = ${tile} * ${WG}u + lid;`;
  return `// ${lanes} lanes share a channel, each holding ${
    Nb / lanes
  } of its states; what the channel sums over
  // its states is summed over its lanes by shuffles, and lane q = 0 writes the channel's outputs
  let d = ${tile} * ${WG / lanes}u + lid / ${lanes}u;
  let q = sgLane % ${lanes}u;
  let nq = q * ${Nb / lanes}u;`;
}

/** WGSL adding to `x` its values in the other lanes of the channel (each lane gets the channel's sum). */
export function sumLanes(x: string, lanes: number): string {
  return unroll(Math.log2(lanes), (r) => `${x} += subgroupShuffleXor(${x}, ${1 << r}u);`);
}

/** WGSL of an invocation's state j of the block, counted from the block's first: j, or with `lanes` > 1 the
 * j-th of its share (lane q of a channel holds states nq = q * Nb / lanes ..). */
export function laneState(lanes: number, j: number): string {
  return lanes > 1 ? `nq + ${j}u` : `${j}u`;
}

/**
 * WGSL filling `Bv` (and with `withC`, `Cv`): arrays of Nb floats, the B and C columns of the state block
 * starting at `row` (B at row.., C at row + N..; `row` includes the block's first state). With `shuffle`,
 * each lane loads every SG-th column and subgroupShuffle hands them out (needs uniform control flow); else
 * each lane loads them all. With `lanes` > 1, each lane loads its Nb / lanes states' columns.
 */
export function loadBC(
  N: number,
  Nb: number,
  row: string,
  withC: boolean,
  shuffle: boolean,
  lanes = 1,
): string {
  if (lanes > 1) {
    const cols = (n: number) =>
      `Bv[${n}] = ld_dbc(${row} + ${laneState(lanes, n)});` +
      (withC ? ` Cv[${n}] = ld_dbc(${row} + ${N}u + ${laneState(lanes, n)});` : "");
    return unroll(Nb / lanes, cols);
  }
  const cols = withC ? 2 * Nb : Nb;
  const dst = (c: number) => (c < Nb ? `Bv[${c}]` : `Cv[${c - Nb}]`);
  if (!shuffle) return unroll(cols, (c) => `${dst(c)} = ld_dbc(${row} + ${blockColumn(N, Nb, c)});`);
  const SG = shuffleSize();
  const J = Math.ceil(cols / SG);
  return [
    `var bcv: array<f32, ${J}>;`,
    unroll(
      J,
      (j) =>
        `{ let c = ${j * SG}u + sgLane; bcv[${j}] = select(0.0, ld_dbc(${row} + ${
          blockColumn(N, Nb, `min(c, ${cols - 1}u)`)
        }), c < ${cols}u); }`,
    ),
    unroll(cols, (c) => `${dst(c)} = subgroupShuffle(bcv[${Math.floor(c / SG)}], ${c % SG}u);`),
  ].join("\n    ");
}

/** The compile-time shape a step's loads depend on: the state block (N, Nb, n0), dt_proj's rank inside (Ri),
 * whether B and C rows (and dt columns) are shuffled, and the lanes per channel. */
export interface StepShape {
  N: number;
  Nb: number;
  n0: number;
  Ri: number;
  shuffle: boolean;
  lanes: number;
}

/**
 * WGSL of the inputs of step `t` of channel dc: `i`, its index in (B, L, ED); `dr` (drawLines); `dt` =
 * softplus(dr + bias) (with `u`, dr + bias named `u` too), then the caller's `afterDt` lines (x's load);
 * `row`, the block's first B column of the step's dBC row (with `fromC`, its first C column), and `Bv` (with
 * `withC` also `Cv`) loaded from it (with `declare`, the arrays declared here). Every kernel that walks
 * steps reads them so.
 */
export function stepInputLines(
  { N, Nb, n0, Ri, shuffle, lanes }: StepShape,
  t: string,
  o: { withC?: boolean; fromC?: boolean; u?: boolean; declare?: boolean; afterDt?: string; indent: string },
): string {
  const K = Nb / lanes;
  return [
    `let i = (b * P.L + ${t}) * P.ED + dc;`,
    drawLines(Ri, shuffle, `(b * P.L + ${t}) * P.S`),
    ...(o.u ? ["let u = dr + bias;", "let dt = softplus_(u);"] : ["let dt = softplus_(dr + bias);"]),
    ...(o.afterDt ? [o.afterDt] : []),
    `let row = (b * P.L + ${t}) * P.S + P.R${o.fromC ? ` + ${N}u` : ""}${plus(n0)};`,
    ...(o.declare ? [`var Bv: array<f32, ${K}>;`, ...(o.withC ? [`var Cv: array<f32, ${K}>;`] : [])] : []),
    loadBC(N, Nb, "row", o.withC === true, shuffle, lanes),
  ].join(`\n${o.indent}`);
}

/** WGSL of the state update over K states of array `h`: h = exp(dt A) h + dt x B (`dtx` = dt x in scope). */
export function stateUpdate(K: number, h: string): string {
  return unroll(K, (n) => `${h}[${n}] = exp(dt * A[${n}]) * ${h}[${n}] + dtx * Bv[${n}];`);
}

/** WGSL loading A = -exp(A_log) of channel dc's K states of the block at n0 (with lanes, this lane's share)
 * from ph = [bias | A_log | D | ...]. */
export function loadA(N: number, n0: number, K: number, lanes: number): string {
  return unroll(K, (n) => `A[${n}] = -exp(ld_ph(P.ED + dc * ${N}u${plus(n0)} + ${laneState(lanes, n)}));`);
}

/** WGSL of channel dc's dt bias from ph. */
export const LOAD_BIAS = "let bias = ld_ph(dc);";

/** WGSL of channel dc's D from ph = [bias (ED) | A_log (ED N) | D | ...]. */
export function loadD(N: number): string {
  return `let Dd = ld_ph(P.ED + P.ED * ${N}u + dc);`;
}

/** WGSL of a state before step 0 at `at` (a WGSL offset into h0): h0's where the call has one (uniform init
 * 1), else 0 (ph holds at least B ED N values past h0Off 0, so the load is in bounds either way). */
export function h0Value(at: string): string {
  return `select(0.0, ld_ph(P.h0Off + ${at}), P.init != 0u)`;
}

/** WGSL reading the gate's z of channel dc at step `t` into `zv` (z is (B, L, zS), ED columns from z0). */
export function loadZ(t: string): string {
  return `let zv = ld_z((b * P.L + ${t}) * P.zS + P.z0 + dc);`;
}

/** WGSL of `v` gated: v silu(z) / z = v z sigmoid(z), with `zv` (loadZ) in scope. */
export function gated(v: string): string {
  return `${v} * zv * sigmoid_(zv)`;
}

/** WGSL functions both kernels use: softplus (as torch's, linear above 20) and sigmoid. */
export const COMMON = `
${SOFTPLUS_WGSL}
${SIGMOID_WGSL}`;

/** The uniforms both kernels take (each adds its own after them). */
export const UNIFORMS: [string, "u32"][] = [
  ["B", "u32"],
  ["L", "u32"],
  ["ED", "u32"],
  ["S", "u32"], // row stride of dBC (R + 2N, or wider: x_proj's output padded)
  ["R", "u32"],
  ["chunks", "u32"],
  ["tiles", "u32"],
  ["gated", "u32"],
  ["t0", "u32"], // forward: first step; backward: first chunk of this dispatch
  ["t1", "u32"], // forward: end step; backward: end chunk
  ["zS", "u32"], // row length of z: ED, or more when z is a window of a wider tensor (in_proj's output)
  ["z0", "u32"], // z's first column in its rows
  ["hsOff", "u32"], // where the chunk states start in ph
  ["init", "u32"], // 1: the forward starts from an initial state h0 (B, ED, N), at h0Off in ph (a cache)
  ["h0Off", "u32"],
];

/** The bindings both kernels read first, in this order (fused_run.ts's scanInputs gives them): x, draw (x in its
 * place with dt_proj inside), dbc, ph = [bias | A_log | D | W (with Ri) | hs] (the forward writes hs), z. */
export function scanInputBuffers(ph: "read" | "read_write"): BufferDecl[] {
  return [
    { name: "x", type: "f32", access: "read" },
    { name: "draw", type: "f32", access: "read" },
    { name: "dbc", type: "f32", access: "read" },
    { name: "ph", type: "f32", access: ph },
    { name: "z", type: "f32", access: "read" },
  ];
}

/** The forward's chunks of Lc per walk of a chunk-parallel call: Lf / Lc. */
export function walkChunks(v: FusedVariant): number {
  return (v.Lf ?? v.Lc) / v.Lc;
}

/** WGSL of the number of walks of G chunks each, from the uniform `chunks` (of Lc steps). */
export function walksOf(G: number): string {
  return G === 1 ? "P.chunks" : `((P.chunks + ${G - 1}u) / ${G}u)`;
}

/** WGSL ` + k` for a compile-time offset (nothing for 0). */
export const plus = (k: number) => (k ? ` + ${k}u` : "");

/** The kernel-name part of a state block: empty with one block. */
export function blockName(N: number, Nb: number, n0: number): string {
  return Nb === N ? "" : `_Nb${Nb}_n${n0}`;
}

/** Chunks whose loads a fold issues together (see {@linkcode foldCarry}). */
const FOLD_GROUP = 4;

/**
 * WGSL that folds a carry over chunks: for i = 0 .. count-1, chunk c = cell(i), each state n of `v` (K in
 * registers, `init` first) becomes exp(S_c A[n]) v[n] + loc_c[n] (the forward's h from the chunks before, the
 * backward's lam from the chunks after: the same form). Loads come FOLD_GROUP chunks at a time, state by
 * state, before their updates: one chunk at a time, each load would wait out its latency alone.
 * `count` is a WGSL u32 expression; `cell(i)` gives chunk i's cell from a WGSL index; `sAt(cell)` and
 * `locAt(cell, n)` the loads of its sum of dt and its local state n; `init(n)`, WGSL of state n before the
 * first chunk (0.0 without).
 */
export function foldCarry(
  v: string,
  K: number,
  count: string,
  cell: (i: string) => string,
  sAt: (cell: string) => string,
  locAt: (cell: string, n: number) => string,
  init: (n: number) => string = () => "0.0",
): string {
  const G = FOLD_GROUP;
  const steps = (q: number) =>
    unroll(G, (g) => `let l${g} = ${locAt(`c${g}`, q)};`) + "\n    " +
    unroll(G, (g) => `${v}[${q}] = exp(s${g} * A[${q}]) * ${v}[${q}] + l${g};`);
  return `${unroll(K, (n) => `${v}[${n}] = ${init(n)};`)}
  var fi = 0u;
  loop {
    if (fi + ${G}u > ${count}) { break; }
    ${unroll(G, (g) => `let c${g} = ${cell(`(fi + ${g}u)`)};`)}
    ${unroll(G, (g) => `let s${g} = ${sAt(`c${g}`)};`)}
    ${Array.from({ length: K }, (_, q) => `{ ${steps(q)} }`).join("\n    ")}
    fi += ${G}u;
  }
  for (; fi < ${count}; fi++) {
    let c = ${cell("fi")};
    let s = ${sAt("c")};
    ${unroll(K, (n) => `${v}[${n}] = exp(s * A[${n}]) * ${v}[${n}] + ${locAt("c", n)};`)}
  }`;
}
