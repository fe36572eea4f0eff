/**
 * The carries of the chunk-parallel variant (`chunkParallel`): what each chunk of Lc steps needs from the
 * chunks before it (the forward's h) or after it (the backward's lam), so that the main kernels can walk
 * every chunk at once. Both recurrences are linear in their carry with the decay a(t) = exp(dt(t) A), and
 * the product of a chunk's decays is exp(A S) with S the chunk's sum of dt: a chunk's effect on its carry is
 * its result from a zero carry plus exp(A S) times the carry.
 *
 * `fused_scan_local_{fwd,bwd}` (template: the forward's N, Nb, n0, Lc, WG, shuffle, lanes, Ri; the forward's
 * G = Lf / Lc chunks per walk, 1 for the backward).
 * Owns: a workgroup owns (b, a tile of WG channels, walk k: chunk k where G is 1); an invocation one channel
 * (with `lanes`, its share of the block's states), walking walk k from a zero state, the forward up, h = a h + dt x B, the
 * backward down, m = a (gy C + m) with gy the gated gradient of y (m after the chunk's first step is the
 * carry it passes to the chunk before it). Registers only; no workgroup memory, no barriers.
 * Reads: draw (or dBC's dt columns and dt_proj's row), B or C from dBC and the parameters in `ph`; the
 * forward also x, the backward g and z (never x). Writes: the chunk's local state into `loc` (B, ED, chunks,
 * N) (the forward: the chunk states hs in `ph`, or with folded carries a scratch `out` at `locOff`; the
 * backward: in `out` at `locOff`) and, from the first state block, S into `sdt` (B, ED, chunks) (in `out`,
 * at `sdtOff`). With few chunks no chain follows: the main kernels fold their carries from these
 * (`foldCarry`, MAX_CHUNKS_FOLDED). The forward with `Lf` > Lc walks G = Lf / Lc chunks per workgroup
 * instead of one: its local state goes into hs at the cell of its last chunk (or into the scratch `out`, one
 * cell per walk), its S beside it, one per walk.
 *
 * `fused_scan_chain_{fwd,bwd}` (template: the runs per chain, 1 or `_seg{S}`; the forward's chunks per walk G,
 * `_G{G}` above 1, whose links are the walks' cells in hs: the last chunk of each).
 * Owns: an invocation owns one (b, d, n) and walks its links in order (chunks; the forward's walks of G
 * chunks), the forward up from zero (or the call's initial state h0: uniform init), h = exp(A S_k) h + loc_k,
 * leaving loc_k = h, the state after link k; the backward down, leaving loc_k = m, the carry into
 * chunk k from the chunks after it, then m = loc_k + exp(A S_k) m. Reads A_log from `ph` and S; reads and
 * writes `loc`, loading 8 chunks' values at a time so that their loads overlap. At most MAX_CHUNKS_CHAINED / 8
 * + 7 iterations. `_seg{S}` (GPUs, many chunks): S invocations per (b, d, n), each owning a run of the chunks,
 * which it walks twice (from a zero carry; then from the carry into it, storing); between the two walks the
 * runs' results and sums of dt sit in workgroup memory (2 x 64 floats), where the chain's first invocation
 * turns them into each run's carry. Two barriers.
 * @module
 */

import { defineKernel, type Kernel } from "../core/kernel.ts";
import type { FusedVariant, StateBlock } from "./fused_variant.ts";
import {
  blockName,
  cachedKernel,
  channelLines,
  COMMON,
  gated,
  h0Value,
  laneState,
  LOAD_BIAS,
  loadA,
  loadWd,
  loadZ,
  plus,
  scanInputBuffers,
  stateUpdate,
  stepInputLines,
  UNIFORMS,
  unroll,
  walkChunks,
  walksOf,
} from "./fused_wgsl.ts";

/** Which carry: the forward's state h, or the backward's lam. */
export type CarryDirection = "fwd" | "bwd";

/** The uniforms of both carry kernels: the main kernels' (they walk every chunk, so no t0, t1), then N and
 * where `loc` (the backward's) and S sit in `out`. The forward's loc is hs, at hsOff in ph. */
const CARRY_UNIFORMS: [string, "u32"][] = [
  ...UNIFORMS.filter(([name]) => name !== "t0" && name !== "t1"),
  ["N", "u32"],
  ["locOff", "u32"],
  ["sdtOff", "u32"],
];

/**
 * The local walk of every chunk for one state block (one dispatch per block, B x tiles x chunks workgroups).
 * `folded` (the forward only): the local states go to `out` at locOff, beside the sums of dt, for the main
 * kernel to fold (MAX_CHUNKS_FOLDED); it writes the true chunk states into hs itself.
 */
export function localKernel(
  v: FusedVariant,
  block: StateBlock,
  Ri: number,
  dir: CarryDirection,
  folded = false,
): Kernel {
  const inOut = dir === "bwd" || folded; // where the local states go: `out` at locOff, else hs in ph
  const G = dir === "fwd" ? walkChunks(v) : 1;
  const key =
    `local|${dir}|${v.N}|${block.Nb}|${block.n0}|${v.Lc}|${G}|${v.WG}|${v.shuffle}|${v.lanes}|${Ri}|${inOut}`;
  return cachedKernel(key, () => generateLocal(v, block, Ri, dir, inOut, G));
}

function generateLocal(
  v: FusedVariant,
  { n0, Nb }: StateBlock,
  Ri: number,
  dir: CarryDirection,
  inOut: boolean,
  G: number,
): Kernel {
  const { N, Lc, WG } = v;
  const W = walksOf(G);
  const shuffle = v.shuffle === true;
  const lanes = v.lanes ?? 1;
  const K = Nb / lanes;
  const st = (j: number) => laneState(lanes, j);
  const fwd = dir === "fwd";
  // the forward reads B (columns R + n0..), the backward C (R + N + n0..): loadBC's "B" at an offset row
  const step = fwd
    ? `let dtx = dt * ld_x(i);
    ${stateUpdate(K, "m")}`
    : `var gy = ld_g(i);
    if (P.gated != 0u) { ${loadZ("t")} gy = ${gated("gy")}; }
    ${unroll(K, (n) => `m[${n}] = exp(dt * A[${n}]) * (gy * Bv[${n}] + m[${n}]);`)}`;
  const loc = (n: number) =>
    inOut ? `st_out(P.locOff + at + ${st(n)}, m[${n}]);` : `st_ph(P.hsOff + at + ${st(n)}, m[${n}]);`;
  return defineKernel({
    name: `fused_scan_local_${dir}_N${N}${blockName(N, Nb, n0)}_Lc${Lc}${
      G > 1 ? `_Lf${G * Lc}` : ""
    }_WG${WG}${shuffle ? "_shuf" : ""}${lanes > 1 ? `_lanes${lanes}` : ""}${Ri ? `_dt${Ri}` : ""}${
      fwd && inOut ? "_folded" : ""
    }`,
    subgroups: shuffle || lanes > 1,
    buffers: [
      ...scanInputBuffers(inOut ? "read" : "read_write"),
      ...(fwd ? [] : [{ name: "g", type: "f32" as const, access: "read" as const }]),
      { name: "out", type: "f32", access: "read_write" },
    ],
    uniforms: CARRY_UNIFORMS,
    workgroupSize: WG,
    decls: COMMON,
    body: `
  // workgroup -> (b, tile, walk k over ${
      G > 1 ? `${G} chunks` : "a chunk"
    }); invocation -> channel d (lanes past
  // ED compute on a valid one and write nothing); the walk from a zero state
  let k = group % ${W};
  let bt = group / ${W};
  let b = bt / P.tiles;
  ${channelLines("(bt % P.tiles)", WG, lanes, Nb)}
  let valid = d < P.ED;
  let dc = min(d, P.ED - 1u);
  var A: array<f32, ${K}>;
  var m: array<f32, ${K}>;
  var Bv: array<f32, ${K}>;
  ${loadA(N, n0, K, lanes)}
  ${unroll(K, (n) => `m[${n}] = 0.0;`)}
  ${LOAD_BIAS}
  ${loadWd(N, Ri)}
  let t0 = k * ${G * Lc}u;
  let t1 = min(P.L, t0 + ${G * Lc}u);
  var sdt = 0.0;
  for (var j = t0; j < t1; j++) {
    let t = ${fwd ? "j" : "t0 + t1 - 1u - j"};
    ${
      stepInputLines({ N, Nb, n0, Ri, shuffle, lanes }, "t", {
        fromC: !fwd,
        afterDt: "sdt += dt;",
        indent: "    ",
      })
    }
    ${step}
  }
  // the walk's cell in the scratch out; in hs, the cell of its last chunk
  let cell = (b * P.ED + dc) * ${W} + k;
  if (valid) {
    let at = ${inOut ? "cell" : `((b * P.ED + dc) * P.chunks + (t1 - 1u) / ${Lc}u)`} * ${N}u${plus(n0)};
    ${unroll(K, loc)}
  }
  ${n0 === 0 ? `if (valid${lanes > 1 ? " && q == 0u" : ""}) { st_out(P.sdtOff + cell, sdt); }` : ""}`,
  });
}

/** Chunks whose loads the chain issues together (see the kernel's body). */
const CHAIN_GROUP = 8;

/**
 * The chain over the chunks: one dispatch for all states. With `segments` 1, B x ED x N invocations, each
 * walking its chain's chunks in order. With `segments` S (a power of two, 2 to 64), S invocations per chain
 * (64 / S chains per workgroup), each owning a run of about chunks / S chunks: it walks its run from a zero
 * carry (the run's local result, and its sum of dt), the chain's first invocation then walks the S runs'
 * results in workgroup memory (2 x 64 floats) for the carry into each, and each walks its run again from its
 * carry, storing as the walk in order does. Two loads of each chunk instead of one, but S times shorter walks:
 * at L 16384 (1821 chunks of 9) each chain took 0.09-0.12 ms in order on the H200 (2d4b27c), 512 invocations
 * each waiting on 1821 chunks' loads.
 */
export function chainKernel(dir: CarryDirection, segments = 1, G = 1): Kernel {
  if (segments !== 1 && !(segments >= 2 && segments <= 64 && Number.isInteger(Math.log2(segments)))) {
    throw new Error(`chainKernel: segments must be 1 or a power of two from 2 to 64, got ${segments}`);
  }
  if (!(Number.isInteger(G) && G >= 1) || (G > 1 && dir === "bwd")) {
    throw new Error(`chainKernel: G must be a positive integer, 1 for the backward, got ${G}`);
  }
  return cachedKernel(`chain|${dir}|${segments}|${G}`, () => generateChain(dir, segments, G));
}

/** Workgroups of a chain dispatch over `states` (B x ED x N) chains. */
export function chainGroups(states: number, segments: number): number {
  return Math.ceil((states * segments) / 64);
}

/** WGSL of the forward chain's carry before its first link: the call's initial state h0 (at h0Off in ph) where
 * it has one (uniform init 1), else 0 (the load is in bounds either way: ph holds B ED N values past 0). */
const H0 = h0Value("bd * P.N + n");

function generateChain(dir: CarryDirection, segments: number, G: number): Kernel {
  const fwd = dir === "fwd";
  const W = walksOf(G); // the chain's links: walks of G chunks (the backward's: chunks)
  // the forward's loc is hs in ph, its S in `out`; the backward's both in `out`
  const locAt = fwd ? "P.hsOff" : "P.locOff";
  const ldLoc = (i: string) => (fwd ? `ld_ph(${locAt} + ${i})` : `ld_out(${locAt} + ${i})`);
  const stLoc = (
    i: string,
    val: string,
  ) => (fwd ? `st_ph(${locAt} + ${i}, ${val});` : `st_out(${locAt} + ${i}, ${val});`);
  // link j of the chain (up for the forward, down for the backward): its cell c among the sums of dt, and
  // where its state sits in loc (c itself, or in the forward's hs with walks the cell of the walk's last chunk)
  const cellAt = (j: string) => `bd * ${W} + ${fwd ? j : `P.chunks - 1u - (${j})`}`;
  const locCell = (j: string, c: string) =>
    G === 1 ? c : `(bd * P.chunks + min((${j}) * ${G}u + ${G - 1}u, P.chunks - 1u))`;
  // h after the chunk = its decay times h before + its local state; the backward stores the carry first
  const update = (cell: string, decay: string, l: string, guard = "") => {
    const store = stLoc(`${cell} * P.N + n`, "m");
    const st = guard ? `if (${guard}) { ${store} }` : store;
    return fwd ? `m = ${decay} * m + ${l}; ${st}` : `${st} m = ${l} + ${decay} * m;`;
  };
  // The walk over chunks j0 .. j1 of the chain from the carry m, storing each result. Groups of CHAIN_GROUP (8)
  // chunks: all their loads first, then the updates and stores. One chunk at a time, each load waited behind
  // the store before it (same buffer, so the compiler cannot move it up): at L = 16384 (512 chunks of 32) each
  // chain took 0.15 ms on the H200 (49a9be6), most of it memory latency.
  const walk = (j0: string, j1: string, guard = "") =>
    `var j = ${j0};
  loop {
    if (j + ${CHAIN_GROUP}u > ${j1}) { break; }
    ${unroll(CHAIN_GROUP, (q) => `let c${q} = ${cellAt(`j + ${q}u`)};`)}
    ${unroll(CHAIN_GROUP, (q) => `let e${q} = ${locCell(`j + ${q}u`, `c${q}`)};`)}
    ${unroll(CHAIN_GROUP, (q) => `let a${q} = exp(A * ld_out(P.sdtOff + c${q}));`)}
    ${unroll(CHAIN_GROUP, (q) => `let l${q} = ${ldLoc(`e${q} * P.N + n`)};`)}
    ${unroll(CHAIN_GROUP, (q) => update(`e${q}`, `a${q}`, `l${q}`, guard))}
    j += ${CHAIN_GROUP}u;
  }
  for (; j < ${j1}; j++) { // the last few
    let c = ${cellAt("j")};
    let e = ${locCell("j", "c")};
    let a = exp(A * ld_out(P.sdtOff + c));
    let l = ${ldLoc("e * P.N + n")}; // loaded before the backward's store to the same cell
    ${update("e", "a", "l", guard)}
  }`;
  const buffers = [
    { name: "ph", type: "f32" as const, access: fwd ? "read_write" as const : "read" as const },
    { name: "out", type: "f32" as const, access: "read_write" as const },
  ];
  const walks = G > 1 ? `_G${G}` : "";
  if (segments === 1) {
    return defineKernel({
      name: `fused_scan_chain_${dir}${walks}`,
      buffers,
      uniforms: CARRY_UNIFORMS,
      workgroupSize: 64,
      body: `
  // invocation -> (b, d, n); the chunks walked ${fwd ? "up" : "down"}
  if (gid >= P.B * P.ED * P.N) { return; }
  let n = gid % P.N;
  let bd = gid / P.N; // b * ED + d
  let d = bd % P.ED;
  let A = -exp(ld_ph(P.ED + d * P.N + n));
  var m = ${fwd ? H0 : "0.0"};
  ${walk("0u", W)}`,
    });
  }
  return defineKernel({
    name: `fused_scan_chain_${dir}_seg${segments}${walks}`,
    buffers,
    uniforms: CARRY_UNIFORMS,
    workgroupSize: 64,
    decls: `
var<workgroup> runM: array<f32, 64>; // each run's result from a zero carry, then the carry into it
var<workgroup> runS: array<f32, 64>; // each run's sum of dt`,
    body: `
  // invocation -> (chain (b, d, n), run s of its chunks); invocations past the last chain walk the last one
  // and store nothing (every invocation reaches the barriers)
  let s = lid % ${segments}u;
  let chain = gid / ${segments}u;
  let valid = chain < P.B * P.ED * P.N;
  let ch = min(chain, P.B * P.ED * P.N - 1u);
  let n = ch % P.N;
  let bd = ch / P.N; // b * ED + d
  let d = bd % P.ED;
  let A = -exp(ld_ph(P.ED + d * P.N + n));
  let links = ${W};
  let len = (links + ${segments - 1}u) / ${segments}u;
  let j0 = min(links, s * len);
  let j1 = min(links, j0 + len);
  // the run from a zero carry
  var m = 0.0;
  var sum = 0.0;
  for (var j = j0; j < j1; j++) {
    let c = ${cellAt("j")};
    let sd = ld_out(P.sdtOff + c);
    sum += sd;
    m = exp(A * sd) * m + ${ldLoc(`${locCell("j", "c")} * P.N + n`)};
  }
  runM[lid] = m;
  runS[lid] = sum;
  workgroupBarrier();
  // the carry into each run, walked over the chain's runs by its first invocation
  if (s == 0u) {
    var h = ${fwd ? H0 : "0.0"};
    for (var q = lid; q < lid + ${segments}u; q++) {
      let mq = runM[q];
      runM[q] = h;
      h = exp(A * runS[q]) * h + mq;
    }
  }
  workgroupBarrier();
  // the run again from its carry, storing as the walk in order does
  m = runM[lid];
  ${walk("j0", "j1", "valid")}`,
  });
}
