/**
 * The fused selective scan: one kernel computes the whole SSM of a Mamba block, and the backward
 * recomputes instead of storing. No (B, L, ED, N) tensor is ever created.
 *
 * Inputs (per batch row b, time t, channel d, state n):
 *   x (B, L, ED), draw (B, L, ED) = dt_proj(delta) without its bias, dBC (B, L, R + 2N) = x_proj output
 *   (B and C are read from its columns R.. and R+N..), params = [bias (ED) | A_log (ED*N) | D (ED)],
 *   z (B, L, ED) optional gate.
 * Forward kernel `fused_scan_fwd` (template: N, Lc, WG, gated): one invocation per (b, d) keeps h[0..N)
 * in registers and walks time; dt = softplus(draw + bias), a = exp(dt A), h = a h + dt B x,
 * y = C.h + D x, out = y * silu(z). It writes out and, every Lc steps (and at the end), the state
 * hs (B, ED, ceil(L/Lc), N): the only state that leaves the chip, used by the backward and as the
 * inference cache after a prompt. No workgroup memory, no barriers.
 * Backward kernel `fused_scan_bwd`: a workgroup owns one b and WG channels. It walks the chunks in
 * reverse; for each it recomputes the chunk's h from the saved boundary state into a private array
 * (Ls x Nb floats per sub-chunk), then runs the reverse scan lam = gy C + a(t+1) lam(t+1) inside the chunk. dx, ddraw
 * (through softplus) and dz are per (b, t, d) and written directly. dB and dC sum over channels, and WGSL
 * has no float atomics, so each step's terms are reduced inside the workgroup into partial rows
 * (B, L, slots, 2N): with subgroup operations where the device has subgroups (one row per subgroup,
 * summed by a butterfly of shuffles, `subgroupSums`; no workgroup memory, no barriers), else through
 * workgroup memory: each step the WG invocations put their N + N terms there and every S steps, between two
 * barriers, they sum the columns (one row per tile). `fused_scan_bwd_gather` then sums the rows straight
 * into the x_proj output's gradient (B, L, R + 2N). The partials share a buffer with `gpar`, and the
 * parameters one with the chunk states (`ph`), so that the kernel binds 10 storage buffers, what browsers
 * allow. dA, dD and dbias sum over time: kept in registers, written per (b, d) into `gpar`
 * (B, [dbias | dD | dA | lam carry]), summed over the batch by `fused_scan_bwd_params`.
 * Above 16 states (or with `Nb` set), the states are walked in blocks of Nb, one pipeline and one dispatch
 * per block, each adding its share of the outputs and gradients to the previous blocks'.
 * Every dispatch walks at most 16384 steps per invocation (loops stop at 65535 on software adapters):
 * longer sequences take several dispatches, carrying h through hs and lam through `gpar`.
 * @module
 */

import { defineOp, WindowGrad } from "../core/autograd.ts";
import { deviceInfo } from "../core/device.ts";
import { defineKernel, dispatch, type Kernel } from "../core/kernel.ts";
import { recordClear, recordCopy } from "../core/executor.ts";
import { cat, copyBox } from "../core/ops/index.ts";
import { matmulRaw } from "../core/ops/matmul.ts";
import { fmt, stridesOf } from "../core/shape.ts";
import { Tensor } from "../core/tensor.ts";

/** Compile-time shape of a fused-scan kernel. */
export interface FusedVariant {
  /** State size. */
  N: number;
  /** States per block (a divisor of N; default N up to 16, else the largest divisor up to 16): each block
   * of Nb states is its own pipeline (the block offset compiled in) and dispatch, walking all the steps
   * (states outer, time inner, as the CUDA kernel does). Loops over a block's states are unrolled, so code
   * size and live registers grow with Nb, not N; blocks after the first add their share of y (and of dx,
   * ddelta, dz, dbias, dD) to what the earlier ones wrote. */
  Nb?: number;
  /** Chunk length: steps between saved states. */
  Lc: number;
  /** Sub-chunk length of the backward's two-level recompute (a divisor of Lc; default Lc, one level): it
   * first recomputes the states at sub-chunk boundaries, then each sub-chunk's states, so only Ls x N
   * floats of h are held at once while the saved states stay Lc apart (less memory, one more forward walk). */
  Ls?: number;
  /** Channels per workgroup. */
  WG: number;
  /** Where the backward keeps the recomputed states of a chunk: each invocation's private memory, or
   * workgroup memory (laid out so that neighbouring invocations touch neighbouring words). */
  hbuf?: "private" | "workgroup";
  /** Steps whose dB/dC terms the backward gathers between two barriers (default: as many as fit). */
  S?: number;
  /** How the backward sums dB/dC over the channels of a workgroup: through workgroup memory between
   * barriers (default; every adapter), or with subgroupAdd (no workgroup memory, no barriers; needs
   * `deviceInfo().subgroups`). */
  reduce?: "workgroup" | "subgroup";
  /** Read each step's B and C row once per subgroup (lane j loads columns j, j + size, ...) and hand the
   * values to every lane with subgroupShuffle, instead of every lane loading all 2N (needs subgroups of
   * one fixed size). */
  shuffle?: boolean;
}

/** Steps per barrier pair of the backward: as many as 16 KiB of workgroup memory holds (at most 16); each
 * step holds `cols` terms per channel (2 Nb, plus the dt terms in the last state block). */
function stepsPerBarrier(v: FusedVariant, cols = 2 * (v.Nb ?? v.N)): number {
  const Nb = v.Nb ?? v.N;
  const budget = 16384 - (v.hbuf === "workgroup" ? 4 * v.WG * (v.Ls ?? v.Lc) * Nb : 0);
  return v.S ?? Math.max(1, Math.min(16, Math.floor(budget / (4 * v.WG * cols))));
}

const MAX_STEPS = 16384;

/** Repeats a WGSL line for n = 0..count-1 with the index spelled out: loops whose trip count the shader
 * compiler might not unroll would count against the 65535-iteration limit of software adapters. */
function unroll(count: number, line: (n: number) => string): string {
  return Array.from({ length: count }, (_, n) => line(n)).join("\n    ");
}
const kernels = new Map<string, Kernel>();

/** The fixed subgroup size the `shuffle` option compiles in (throws where the size may vary). */
function shuffleSize(): number {
  const sg = deviceInfo().subgroups;
  if (!sg || sg.minSize !== sg.maxSize) {
    throw new Error("fused scan: `shuffle` needs subgroups of one fixed size");
  }
  return sg.minSize;
}

/** WGSL of the offset of block column c (c < Nb: B, c < 2Nb: C, then the dt columns, `dt` of them, which
 * a partial row keeps after all 2N B and C columns) from the block's first B column (state n0); c is a WGSL
 * expression or a constant. */
function blockColumn(N: number, Nb: number, c: string | number, n0 = 0, dt = 0): string {
  if (typeof c === "number") return `${c < Nb ? c : c < 2 * Nb ? c + N - Nb : c - 2 * Nb + 2 * N - n0}u`;
  const bc = Nb === N ? c : `select(${c} + ${N - Nb}u, ${c}, ${c} < ${Nb}u)`;
  return dt ? `select(${c} + ${2 * N - n0 - 2 * Nb}u, ${bc}, ${c} < ${2 * Nb}u)` : bc;
}

/** Width of a dB/dC partial row: 2N, then `dt` dt columns (padded to a multiple of 4 for vec4 reads). */
function partialWidth(N: number, dt: number): number {
  return 2 * N + (dt && (2 * N) % 4 === 0 ? 4 * Math.ceil(dt / 4) : dt);
}

/** dt_proj inside the kernels up to this rank: draw = dBC[t, :R] . W[d, :] computed per step (R multiply-adds,
 * the R dt values shared across lanes like B and C); larger R reads draw computed by a matmul. */
export const MAX_INLINE_DT_RANK = 8;

/**
 * WGSL defining \`dr\`, the raw delta of channel dc at step t (row index \`i\`): read from draw, or with Ri > 0
 * computed from the dt columns of dBC (row starting at \`rowStart\`, loaded into \`dtv\`) and this channel's
 * dt_proj row \`Wd\`.
 */
function drawLines(Ri: number, shuffle: boolean, rowStart: string): string {
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

/** WGSL loading this channel's dt_proj row \`Wd\` (Ri floats) from ph = [bias | A_log | D | W | ...]. */
function loadWd(N: number, Ri: number): string {
  if (!Ri) return "";
  return `var Wd: array<f32, ${Ri}>;
  ${unroll(Ri, (r) => `Wd[${r}] = ld_ph(P.ED * ${N + 2}u + dc * ${Ri}u + ${r}u);`)}`;
}

/**
 * WGSL filling `Bv` (and with `withC`, `Cv`): arrays of Nb floats, the B and C columns of the state block
 * starting at `row` (B at row.., C at row + N..; `row` includes the block's first state). With `shuffle`,
 * each lane loads every SG-th column and subgroupShuffle hands them out (needs uniform control flow); else
 * each lane loads them all.
 */
function loadBC(N: number, Nb: number, row: string, withC: boolean, shuffle: boolean): string {
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

const chosen = new Map<number, FusedVariant>();

/**
 * The default variant of a state size. States in blocks of at most 16 (Nb), each block its own pipeline, and
 * at most 256 floats of recomputed h held per invocation (Ls x Nb, Ls at most 64): lavapipe's first compile of
 * the backward grows steeply with that private array (N = 16: 2.0 s at 256 floats, 7.1 s at 512, 25 s at
 * 1024, about 4 minutes at 2048), and a GPU spills such arrays to slow local memory. Chunks are max(64, 4N)
 * steps (at most 16 sub-chunks of Ls), so the saved states, 4 ED N / Lc bytes per token, are at most ED bytes
 * up to N = 64; when Lc > Ls the backward first recomputes the states at sub-chunk boundaries (two-level
 * recompute: one more forward walk). Where the device has subgroups, dB/dC are summed with subgroup
 * operations (no barriers) and B, C rows shared by subgroupShuffle (when the subgroup size is fixed): the
 * fastest on every adapter measured.
 */
export function defaultFusedVariant(N: number): FusedVariant {
  const Nb = N <= MAX_STATE_BLOCK ? N : largestDivisor(N, MAX_STATE_BLOCK);
  const Ls = Math.min(64, 2 ** Math.floor(Math.log2(MAX_HELD_STATES / Nb)));
  const Lc = Ls * Math.min(16, Math.ceil(Math.max(64, 4 * N) / Ls));
  const lc = { Lc, ...(Ls < Lc ? { Ls } : {}), ...(Nb < N ? { Nb } : {}) };
  const sg = deviceInfo().subgroups;
  if (sg) {
    const shuffle = sg.minSize === sg.maxSize && 32 % sg.minSize === 0;
    return { N, ...lc, WG: 32, reduce: "subgroup", ...(shuffle ? { shuffle } : {}) };
  }
  return { N, ...lc, WG: 64 }; // workgroup memory of the backward: 2 * WG * Nb floats
}

/** States per block by default: code size and live registers grow with Nb. */
const MAX_STATE_BLOCK = 16;
/** Floats of recomputed h one invocation holds by default (Ls x Nb). */
const MAX_HELD_STATES = 256;

function largestDivisor(N: number, max: number): number {
  for (let d = max; d > 1; d--) if (N % d === 0) return d;
  return 1;
}

/** The variant in use for a state size (chosen by the tuner, else the default). */
export function fusedVariant(N: number): FusedVariant {
  return chosen.get(N) ?? defaultFusedVariant(N);
}

/** Selects the variant for a state size (the tuner calls this with its measured choice); null resets. */
export function setFusedVariant(N: number, v: Omit<FusedVariant, "N"> | null): void {
  if (v === null) chosen.delete(N);
  else {
    const Ls = v.Ls ?? v.Lc;
    const Nb = v.Nb ?? N;
    const wgBytes = 4 * v.WG * Nb * (2 + (v.hbuf === "workgroup" ? Ls : 0));
    if (
      wgBytes > deviceInfo().limits.maxComputeWorkgroupStorageSize || Ls * Nb > 2048 ||
      (v.Lc / Ls - 1) * Nb > 2048 || v.WG < 1 || v.Lc < 1 || Ls < 1 || v.Lc % Ls !== 0 ||
      Nb < 1 || N % Nb !== 0 || (v.shuffle && v.WG % shuffleSize() !== 0)
    ) {
      throw new Error(
        `setFusedVariant: WG ${v.WG}, Lc ${v.Lc}, Ls ${Ls}, Nb ${Nb} does not fit N = ${N} (Ls must divide Lc ` +
          "and Nb divide N; Ls*Nb and (Lc/Ls - 1)*Nb at most 2048 floats; workgroup memory within the device " +
          "limit; with shuffle, WG a multiple of the subgroup size)",
      );
    }
    chosen.set(N, { N, ...v });
  }
}

const COMMON = `
fn softplus_(u: f32) -> f32 {
  if (u > 20.0) { return u; }
  let e = exp(u);
  let w = 1.0 + e;
  if (w == 1.0) { return e; }
  return log(w) * e / (w - 1.0);
}
fn sigmoid_(u: f32) -> f32 { return 1.0 / (1.0 + exp(-u)); }`;

const UNIFORMS: [string, "u32"][] = [
  ["B", "u32"],
  ["L", "u32"],
  ["ED", "u32"],
  ["S", "u32"], // row stride of dBC (R + 2N)
  ["R", "u32"],
  ["chunks", "u32"],
  ["tiles", "u32"],
  ["gated", "u32"],
  ["t0", "u32"], // forward: first step; backward: first chunk of this dispatch
  ["t1", "u32"], // forward: end step; backward: end chunk
  ["zS", "u32"], // row length of z: ED, or more when z is a window of a wider tensor (in_proj's output)
  ["z0", "u32"], // z's first column in its rows
];

/** WGSL ` + k` for a compile-time offset (nothing for 0). */
const plus = (k: number) => (k ? ` + ${k}u` : "");

/** The forward kernel of the state block starting at n0 (one pipeline per block, n0 compiled in, so that
 * every index into the states is a constant). */
function forwardKernel(v: FusedVariant, n0: number, Ri = 0): Kernel {
  const shuffle = v.shuffle === true;
  const Nb = v.Nb ?? v.N;
  const key = `fwd|${v.N}|${Nb}|${n0}|${v.Lc}|${v.WG}|${shuffle}|${Ri}`;
  let k = kernels.get(key);
  if (k) return k;
  const { N, Lc } = v;
  const [first, last] = [n0 === 0, n0 + Nb === N];
  k = defineKernel({
    name: `fused_scan_fwd_N${N}${blockName(N, Nb, n0)}_Lc${Lc}_WG${v.WG}${shuffle ? "_shuf" : ""}${
      Ri ? `_dt${Ri}` : ""
    }`,
    subgroups: shuffle,
    buffers: [
      { name: "x", type: "f32", access: "read" },
      { name: "draw", type: "f32", access: "read" },
      { name: "dbc", type: "f32", access: "read" },
      // [bias | A_log | D | W (with Ri) | hs]: reads params, writes states
      { name: "ph", type: "f32", access: "read_write" },
      { name: "z", type: "f32", access: "read" },
      { name: "y", type: "f32", access: "read_write" },
    ],
    uniforms: [...UNIFORMS, ["hsOff", "u32"]],
    workgroupSize: v.WG,
    decls: COMMON,
    body: `
  // invocation -> (b, d); h of states n0..n0+Nb in registers for the whole walk. Blocks run one after
  // another: the first writes D x + C.h, later ones add their C.h, the last gates. Lanes past ED compute
  // on a valid channel and write nothing (control flow stays uniform for subgroup operations).
  let b = group / P.tiles;
  let d = (group % P.tiles) * ${v.WG}u + lid;
  let valid = d < P.ED;
  let dc = min(d, P.ED - 1u);
  var A: array<f32, ${Nb}>;
  var h: array<f32, ${Nb}>;
  var Bv: array<f32, ${Nb}>;
  var Cv: array<f32, ${Nb}>;
  let hsBase = (b * P.ED + dc) * P.chunks;
  let h0 = (hsBase + P.t0 / ${Lc}u - 1u) * ${N}u;
  ${unroll(Nb, (n) => `A[${n}] = -exp(ld_ph(P.ED + dc * ${N}u + ${n0 + n}u));`)}
  ${unroll(Nb, (n) => `h[${n}] = select(0.0, ld_ph(P.hsOff + h0 + ${n0 + n}u), P.t0 > 0u);`)}
  let bias = ld_ph(dc);
  let Dd = ld_ph(P.ED + P.ED * ${N}u + dc);
  ${loadWd(N, Ri)}
  for (var t = P.t0; t < P.t1; t++) {
    let i = (b * P.L + t) * P.ED + dc;
    ${drawLines(Ri, shuffle, "(b * P.L + t) * P.S")}
    let dt = softplus_(dr + bias);
    let xv = ld_x(i);
    let row = (b * P.L + t) * P.S + P.R${plus(n0)};
    ${loadBC(N, Nb, "row", true, shuffle)}
    var yv = ${first ? "Dd * xv" : "ld_y(i)"};
    let dtx = dt * xv;
    ${unroll(Nb, (n) => `h[${n}] = exp(dt * A[${n}]) * h[${n}] + dtx * Bv[${n}];`)}
    ${unroll(Nb, (n) => `yv += Cv[${n}] * h[${n}];`)}
    ${
      last
        ? "if (P.gated != 0u) { let zv = ld_z((b * P.L + t) * P.zS + P.z0 + dc); yv *= zv * sigmoid_(zv); }"
        : ""
    }
    if (valid) { st_y(i, yv); }
    if (valid && ((t + 1u) % ${Lc}u == 0u || t + 1u == P.L)) {
      let at = (hsBase + t / ${Lc}u) * ${N}u${plus(n0)};
      ${unroll(Nb, (n) => `st_ph(P.hsOff + at + ${n}u, h[${n}]);`)}
    }
  }`,
  });
  kernels.set(key, k);
  return k;
}

/** The kernel-name part of a state block: empty with one block. */
function blockName(N: number, Nb: number, n0: number): string {
  return Nb === N ? "" : `_Nb${Nb}_n${n0}`;
}

/** The backward kernel of the state block starting at n0 (one pipeline per block, as the forward). With
 * Ri > 0 (dt_proj inside), the last block also sums dW (ED, Ri) over time and puts the Ri dt-column terms
 * of dBC's gradient, sum_d ddraw W[d, r], into the partial rows (after the 2N B and C columns). */
function backwardKernel(v: FusedVariant, n0: number, Ri = 0): Kernel {
  const shared = v.hbuf === "workgroup";
  const sg = v.reduce === "subgroup";
  const shuffle = v.shuffle === true;
  const Nb = v.Nb ?? v.N;
  const { N, Lc, WG } = v;
  const first = n0 === 0;
  const dtHere = n0 + Nb === N ? Ri : 0; // the dt terms need the whole ddraw: the last block adds them
  const CW = 2 * Nb + dtHere; // terms per channel and step summed over channels
  const PW = partialWidth(N, Ri);
  const GP = 2 * N + 2 + Ri; // gpar row: [dbias, dD, dA (N), lam carry (N), dW (Ri)]
  const S = stepsPerBarrier(v, CW);
  const key = `bwd|${v.N}|${Nb}|${n0}|${v.Lc}|${v.Ls ?? v.Lc}|${v.WG}|${shared}|${S}|${sg}|${shuffle}|${Ri}`;
  let k = kernels.get(key);
  if (k) return k;
  /** WGSL of a term only the first state block adds (D x and its gradients). */
  const firstOnly = (val: string) => (first ? val : "0.0");
  /** WGSL storing `val` at element i of gx/gdraw/gz: the first block writes, later ones add. */
  const acc = (buf: string, val: string) => `st_${buf}(i, ${first ? "" : `ld_${buf}(i) + `}${val});`;
  const Ls = v.Ls ?? Lc;
  const SUB = Lc / Ls; // sub-chunks per chunk
  /** WGSL of one recomputed step of the state array `h` at time `t`. */
  const stepLines = (h: string, t: string) =>
    `{
      let i = (b * P.L + ${t}) * P.ED + dc;
      ${drawLines(Ri, shuffle, `(b * P.L + ${t}) * P.S`)}
      let dt = softplus_(dr + bias);
      let dtx = dt * ld_x(i);
      let row = (b * P.L + ${t}) * P.S + P.R${plus(n0)};
      var Bv: array<f32, ${Nb}>;
      ${loadBC(N, Nb, "row", false, shuffle)}
      ${unroll(Nb, (n) => `${h}[${n}] = exp(dt * A[${n}]) * ${h}[${n}] + dtx * Bv[${n}];`)}
      }`;
  /** WGSL of the recomputed state n (of the block) at chunk step `s`. */
  const H = (s: string, n: number) =>
    shared ? `hbufW[(${s} * ${Nb}u + ${n}u) * ${WG}u + lid]` : `hbuf[${s} * ${Nb}u + ${n}u]`;
  // dB, dC through workgroup memory: every S steps (and at the chunk's start), each lane sums WG channels of
  // its columns for each gathered step, one partial row per tile.
  const workgroupReduce = `
      if (slot == ${S - 1}u || s == 0u) {
        workgroupBarrier();
        for (var q = 0u; q <= slot; q++) {
          let tq = start + len - 1u - (kq - slot + q);
          let base = q * ${WG * CW}u;
          ${
    unroll(Math.ceil(CW / WG), (j) =>
      `{ let col = lid + ${j * WG}u; if (col < ${CW}u) { let acc = ${
        Array.from({ length: WG }, (_, c) =>
          `red[base + ${c * CW}u + col]`).join(" + ")
      }; st_gred(((b * P.segLen + tq - P.segStart) * P.slots + tile) * ${PW}u + ${
        blockColumn(N, Nb, "col", n0, dtHere)
      }${plus(n0)}, acc); } }`)
  }
        }
        workgroupBarrier();
      }
`;
  k = defineKernel({
    name: `fused_scan_bwd_N${N}${blockName(N, Nb, n0)}_Lc${Lc}${Ls < Lc ? `_Ls${Ls}` : ""}_WG${WG}_${
      sg ? "sg" : `S${S}`
    }${shared ? "_wgmem" : ""}${shuffle ? "_shuf" : ""}${Ri ? `_dt${Ri}` : ""}`,
    subgroups: sg || shuffle,
    buffers: [
      { name: "x", type: "f32", access: "read" },
      { name: "draw", type: "f32", access: "read" },
      { name: "dbc", type: "f32", access: "read" },
      { name: "ph", type: "f32", access: "read" }, // [bias | A_log | D | W (with Ri) | hs]
      { name: "z", type: "f32", access: "read" },
      { name: "g", type: "f32", access: "read" },
      { name: "gx", type: "f32", access: "read_write" },
      { name: "gdraw", type: "f32", access: "read_write" },
      { name: "gz", type: "f32", access: "read_write" },
      // [dB/dC partials (B, L, slots, PW) | gpar (B, ED, GP)]: with `ph`, this keeps the kernel at 10
      // storage buffers, what browsers allow.
      { name: "gred", type: "f32", access: "read_write" },
    ],
    uniforms: [
      ...UNIFORMS,
      ["hsOff", "u32"],
      ["gparOff", "u32"],
      ["slots", "u32"],
      ["slotsPerTile", "u32"],
      ["segStart", "u32"], // first step of the time segment whose partial rows this dispatch writes
      ["segLen", "u32"],
    ],
    workgroupSize: WG,
    decls: COMMON + `
${sg ? "" : `var<workgroup> red: array<f32, ${S * WG * CW}>; // [step slot][channel][B | C | dt terms]`}
${shared ? `var<workgroup> hbufW: array<f32, ${WG * Ls * Nb}>; // [step][state][channel]` : ""}`,
    body: `
  // workgroup -> (b, tile of WG channels); invocation -> channel d; states n0..n0+Nb. Chunks [t0, t1)
  // walked in reverse.
  let b = group / P.tiles;
  let tile = group % P.tiles;
  let d = tile * ${WG}u + lid;
  let valid = d < P.ED;
  let dc = min(d, P.ED - 1u); // out-of-range lanes compute on a valid channel and write nothing
  var A: array<f32, ${Nb}>;
  var lam: array<f32, ${Nb}>; // carry: a(t+1) * lam(t+1)
  var gA: array<f32, ${Nb}>;
  var h0: array<f32, ${Nb}>;
  ${shared ? "" : `var hbuf: array<f32, ${Ls * Nb}>;`}
  // gpar row of (b, d): [dbias, dD, dA (N), lam carry (N), dW (Ri)], accumulated over dispatches.
  let gp = P.gparOff + (b * P.ED + dc) * ${GP}u;
  let more = P.t1 != P.chunks; // dispatches after the first continue from gpar
  // dbias and dD sum over the state blocks too: blocks after the first always continue
  var gbias = ${first ? "select(0.0, ld_gred(gp), more)" : "ld_gred(gp)"};
  var gD = ${first ? "select(0.0, ld_gred(gp + 1u), more)" : "ld_gred(gp + 1u)"};
  ${unroll(Nb, (n) => `A[${n}] = -exp(ld_ph(P.ED + dc * ${N}u + ${n0 + n}u));`)}
  ${unroll(Nb, (n) => `gA[${n}] = select(0.0, ld_gred(gp + ${2 + n0 + n}u), more);`)}
  ${unroll(Nb, (n) => `lam[${n}] = select(0.0, ld_gred(gp + ${2 + N + n0 + n}u), more);`)}
  let bias = ld_ph(dc);
  let Dd = ld_ph(P.ED + P.ED * ${N}u + dc);
  ${loadWd(N, Ri)}
  ${
      dtHere
        ? `var gW: array<f32, ${Ri}>;
  ${unroll(Ri, (r) => `gW[${r}] = select(0.0, ld_gred(gp + ${2 + 2 * N + r}u), more);`)}`
        : ""
    }
  let hsBase = (b * P.ED + dc) * P.chunks;
  for (var kk = P.t1; kk > P.t0; kk--) {
    let k = kk - 1u;
    let cstart = k * ${Lc}u;
    let clen = min(${Lc}u, P.L - cstart);
    var hb: array<f32, ${Nb}>; // the saved state before this chunk
    let hsAt = (hsBase + k - 1u) * ${N}u${plus(n0)};
    ${unroll(Nb, (n) => `hb[${n}] = select(0.0, ld_ph(P.hsOff + hsAt + ${n}u), k > 0u);`)}
    let nsub = (clen + ${Ls - 1}u) / ${Ls}u;
    ${
      SUB > 1
        ? `// 0. two-level recompute: the states at the sub-chunk boundaries, so that only Ls x Nb floats of h
    // are held at once while chunks (and the saved states) are Lc long.
    var hsub: array<f32, ${(SUB - 1) * Nb}>;
    var hw = hb;
    for (var s = 0u; s < (nsub - 1u) * ${Ls}u; s++) {
      ${stepLines("hw", "cstart + s")}
      if ((s + 1u) % ${Ls}u == 0u) {
        // constant indices only (selects): a dynamically indexed private array is twice as slow on lavapipe
        let jw = (s + 1u) / ${Ls}u - 1u;
        ${
          unroll(SUB - 1, (jc) =>
            unroll(Nb, (n) => `hsub[${jc * Nb + n}] = select(hsub[${jc * Nb + n}], hw[${n}], jw == ${jc}u);`))
        }
      }
    }`
        : ""
    }
    for (var jj = nsub; jj > 0u; jj--) {
    let j = jj - 1u;
    let start = cstart + j * ${Ls}u;
    let len = min(${Ls}u, clen - j * ${Ls}u);
    ${
      SUB > 1
        ? unroll(Nb, (n) =>
          `h0[${n}] = hb[${n}]; ` +
          Array.from({ length: SUB - 1 }, (_, jc) =>
            `h0[${n}] = select(h0[${n}], hsub[${jc * Nb + n}], j == ${jc + 1}u);`)
            .join(" "))
        : unroll(Nb, (n) =>
          `h0[${n}] = hb[${n}];`)
    }
    // 1. recompute h over the (sub-)chunk from the state before it.
    var hc = h0;
    for (var s = 0u; s < len; s++) {
      ${stepLines("hc", "start + s")}
      ${unroll(Nb, (n) => `${H("s", n)} = hc[${n}];`)}
    }
    // 2. reverse scan inside the chunk. hcur = h(t) is carried down from the step above (the last one is
    // the recompute's final state), so each step reads one stored state, h(t-1).
    var hcur = hc;
    for (var ss = len; ss > 0u; ss--) {
      let s = ss - 1u;
      let t = start + s;
      ${
      sg ? "" : `let kq = len - ss; // steps of this chunk done before this one
      let slot = kq % ${S}u;`
    }
      let i = (b * P.L + t) * P.ED + dc;
      ${drawLines(Ri, shuffle, "(b * P.L + t) * P.S")}
      let u = dr + bias;
      let dt = softplus_(u);
      let xv = ld_x(i);
      let row = (b * P.L + t) * P.S + P.R${plus(n0)};
      var Bv: array<f32, ${Nb}>;
      var Cv: array<f32, ${Nb}>;
      ${loadBC(N, Nb, "row", true, shuffle)}
      var gy = ld_g(i);
      if (P.gated != 0u) {
        // this block's share of y (the gate's gradient is linear in y: blocks add their shares)
        var yv = ${firstOnly("Dd * xv")};
        ${unroll(Nb, (n) => `yv += Cv[${n}] * hcur[${n}];`)}
        let zv = ld_z((b * P.L + t) * P.zS + P.z0 + dc);
        let sg = sigmoid_(zv);
        if (valid) { ${acc("gz", "gy * yv * sg * (1.0 + zv * (1.0 - sg))")} }
        gy = gy * zv * sg;
      }
      gD += ${firstOnly("gy * xv")};
      var gx = ${firstOnly("gy * Dd")};
      var gdt = 0.0;
      let sp = select(0u, s - 1u, s > 0u);
      var hp: array<f32, ${Nb}>;
      ${unroll(Nb, (n) => `hp[${n}] = select(h0[${n}], ${H("sp", n)}, s > 0u);`)}
      ${
      sg
        ? `// this subgroup's partial row of step t: (B, segLen, slots, PW), the block's columns
      let part = ((b * P.segLen + t - P.segStart) * P.slots + tile * P.slotsPerTile + lid / sgSize) * ${PW}u${
          plus(n0)
        };`
        : `let lane = (slot * ${WG}u + lid) * ${CW}u; // this step's terms in workgroup memory`
    }
      ${sg ? `var terms: array<f32, ${CW}>; // [dB terms | dC terms | dt terms] of this lane's channel` : ""}
      ${
      unroll(Nb, (n) =>
        `{ let a = exp(dt * A[${n}]); ` +
        `let l = gy * Cv[${n}] + lam[${n}]; let ga = l * hp[${n}]; ` +
        `gx += l * dt * Bv[${n}]; gdt += l * Bv[${n}] * xv + ga * a * A[${n}]; gA[${n}] += ga * a * dt; ` +
        (sg
          ? `terms[${n}] = l * dt * xv; terms[${Nb + n}] = gy * hcur[${n}]; `
          : `red[lane + ${n}u] = select(0.0, l * dt * xv, valid); ` +
            `red[lane + ${Nb + n}u] = select(0.0, gy * hcur[${n}], valid); `) +
        `lam[${n}] = a * l; }`)
    }
      hcur = hp;
      let gu = gdt * sigmoid_(u);
      gbias += gu;
      ${
      dtHere
        ? `// ddraw summed over the state blocks (earlier blocks' shares are in gdraw): dW and the dt terms
      let gtot = ${first ? "gu" : "ld_gdraw(i) + gu"};
      ${unroll(Ri, (r) => `gW[${r}] += gtot * dtv[${r}];`)}
      ${
          unroll(Ri, (r) =>
            sg
              ? `terms[${2 * Nb + r}] = gtot * Wd[${r}];`
              : `red[lane + ${2 * Nb + r}u] = select(0.0, gtot * Wd[${r}], valid);`)
        }`
        : ""
    }
      if (valid) { ${acc("gx", "gx")} ${acc("gdraw", "gu")} }
      ${sg ? subgroupSums(N, Nb, shuffle ? shuffleSize() : null, n0, dtHere) : ""}
${sg ? "" : workgroupReduce}
    }
    }
  }
  if (valid) {
    st_gred(gp, gbias);
    st_gred(gp + 1u, gD);
    ${dtHere ? unroll(Ri, (r) => `st_gred(gp + ${2 + 2 * N + r}u, gW[${r}]);`) : ""}
    ${
      unroll(Nb, (n) =>
        `st_gred(gp + ${2 + n0 + n}u, gA[${n}]); st_gred(gp + ${2 + N + n0 + n}u, lam[${n}]);`)
    }
  }`,
  });
  kernels.set(key, k);
  return k;
}

/**
 * The rounds of the butterfly that sums C columns over SG lanes (a power of two), the columns padded to W * SG
 * (W = ceil(C / SG)). In the round with mask m, lanes whose bit m is clear keep columns [0, h) and the others
 * [h, 2h), each adding its partner's (lane ^ m) copy of them; after the last round lane j holds the sums of
 * columns j*W .. j*W + W - 1 in its first W slots.
 */
export function butterflyRounds(C: number, SG: number): { W: number; rounds: { m: number; h: number }[] } {
  const W = Math.ceil(C / SG);
  const rounds: { m: number; h: number }[] = [];
  for (let m = SG / 2, K = W * SG; m >= 1; m /= 2, K /= 2) rounds.push({ m, h: K / 2 });
  return { W, rounds };
}

/**
 * WGSL summing \`terms\` (2Nb: this lane's dB and dC terms of the block) over the subgroup and storing the
 * sums in the partial row at \`part\` (the block's columns). With a fixed subgroup size SG, a butterfly:
 * each round halves the columns a lane keeps and adds its partner's half (subgroupShuffleXor), so lane j ends
 * with the sums of columns j*W..j*W+W-1 (W = 2Nb / SG, the terms padded with zeros to a multiple of SG) and
 * stores them: 2Nb - W shuffles instead of 2Nb subgroupAdds and 2Nb stores from one lane (the backward 1.4x
 * faster on lavapipe, where each of those is a loop over the lanes). Where the size varies: subgroupAdd, and
 * lane 0 stores.
 */
function subgroupSums(N: number, Nb: number, SG: number | null, n0 = 0, dt = 0): string {
  const C = 2 * Nb + dt;
  if (!SG) {
    return [
      unroll(C, (c) => `let s${c} = subgroupAdd(select(0.0, terms[${c}], valid));`),
      `if (sgLane == 0u) {`,
      unroll(C, (c) => `st_gred(part + ${blockColumn(N, Nb, c, n0, dt)}, s${c});`),
      `}`,
    ].join("\n      ");
  }
  const { W, rounds } = butterflyRounds(C, SG);
  const lines = [
    `var v: array<f32, ${W * SG}>;`,
    unroll(C, (c) => `v[${c}] = select(0.0, terms[${c}], valid);`),
  ];
  for (const { m, h } of rounds) {
    lines.push(
      `{ let up = (sgLane & ${m}u) != 0u;`,
      unroll(
        h,
        (k) =>
          `v[${k}] = select(v[${k}], v[${k + h}], up) + subgroupShuffleXor(select(v[${
            k + h
          }], v[${k}], up), ${m}u);`,
      ),
      `}`,
    );
  }
  const store = (k: number) =>
    `st_gred(part + ${blockColumn(N, Nb, `sgLane * ${W}u + ${k}u`, n0, dt)}, v[${k}]);`;
  lines.push(
    W * SG === C ? unroll(W, store) : unroll(W, (k) => `if (sgLane * ${W}u + ${k}u < ${C}u) { ${store(k)} }`),
  );
  return lines.join("\n      ");
}

/** Static attributes of a fused-scan call. */
export interface FusedAttrs {
  /** dt rank: B starts at column R of dBC. */
  R: number;
  /** State size. */
  N: number;
  /** Whether the output is gated by silu(z). */
  gated: boolean;
  /** z's first column: z is (B, L, ED), or wider with ED columns from here (default 0). */
  zStart?: number;
  /** dt_proj inside the kernels (R <= MAX_INLINE_DT_RANK): draw is not given; `par` holds dt_proj's weight
   * (ED, R) after D, and the backward also gives its gradient and the dt columns of dBC's. */
  dtInside?: boolean;
}

/**
 * `fused_scan_bwd_gather`: sums a segment's partial rows (B, segLen, slots, PW) over their slots and writes
 * them into the gradient of the x_proj output (B, L, R + 2N): the 2N B and C columns at R.., and the R dt
 * columns (kept after B and C in a partial row when dt_proj runs inside the kernels) at 0..R, or zeros there
 * (the scan does not differentiate them). One invocation per row (b, t) of the segment (few, long
 * invocations: workgroups cost more than loops on CPU adapters); it reads the partials V at a time (V = 4:
 * as vec4, when the row width is a multiple of 4; 1.1-2x faster on lavapipe than scalar loads).
 */
function gatherKernel(V: 1 | 4, dt: boolean): Kernel {
  const key = `gather|${V}|${dt}`;
  let k = kernels.get(key);
  if (k) return k;
  const F = V === 4 ? "vec4<f32>" : "f32";
  const comp = (j: number) => (V === 4 ? `acc.${"xyzw"[j]}` : "acc");
  const sumSlots = (col: string) =>
    `var acc = ${F}(0.0);
    for (var s = 0u; s < P.slots; s = s + 1u) { acc = acc + ld_part(base + s * P.PQ + ${col}); }`;
  k = defineKernel({
    name: `fused_scan_bwd_gather${V === 4 ? "_v4" : ""}${dt ? "_dt" : ""}`,
    buffers: [
      { name: "part", type: F, access: "read" },
      { name: "gdbc", type: "f32", access: "read_write" },
    ],
    uniforms: [
      ["n", "u32"],
      ["L", "u32"],
      ["S", "u32"],
      ["R", "u32"],
      ["slots", "u32"],
      ["segStart", "u32"],
      ["segLen", "u32"],
      ["Q", "u32"], // groups of V columns of B and C: 2N / V
      ["PQ", "u32"], // groups of V columns per partial row: PW / V
    ],
    workgroupSize: 64,
    body: `
  if (gid >= P.n) { return; }
  let b = gid / P.segLen; // invocation -> row (b, t) of the segment
  let t = P.segStart + gid % P.segLen;
  let out = (b * P.L + t) * P.S;
  let base = gid * P.slots * P.PQ; // its partials (slot, column group)
  ${
      dt
        ? `for (var q = 0u; q * ${V}u < P.R; q = q + 1u) {
    ${sumSlots("P.Q + q")}
    ${
          Array.from({ length: V }, (_, j) =>
            `if (q * ${V}u + ${j}u < P.R) { st_gdbc(out + q * ${V}u + ${j}u, ${comp(j)}); }`).join(" ")
        }
  }`
        : "for (var c = 0u; c < P.R; c = c + 1u) { st_gdbc(out + c, 0.0); }"
    }
  for (var q = 0u; q < P.Q; q = q + 1u) {
    ${sumSlots("q")}
    ${Array.from({ length: V }, (_, j) => `st_gdbc(out + P.R + ${V}u * q + ${j}u, ${comp(j)});`).join(" ")}
  }
  for (var c = P.R + P.Q * ${V}u; c < P.S; c = c + 1u) { st_gdbc(out + c, 0.0); } // padding columns`,
  });
  kernels.set(key, k);
  return k;
}

/**
 * `fused_scan_bwd_params`: the parameter gradients out of `gpar` (B, ED, [dbias | dD | dA (N) | lam carry (N) |
 * dW (Ri)], at element `off` of its buffer): one invocation per (d, column) sums the batch and writes dbias
 * (ED), dD (ED), dA_log (ED, N) = dA * A with A = -exp(A_log), or dt_proj's weight gradient dW (ED, Ri).
 */
const paramsKernel = defineKernel({
  name: "fused_scan_bwd_params",
  buffers: [
    { name: "gpar", type: "f32", access: "read" },
    { name: "alog", type: "f32", access: "read" },
    { name: "gbias", type: "f32", access: "read_write" },
    { name: "gd", type: "f32", access: "read_write" },
    { name: "galog", type: "f32", access: "read_write" },
    { name: "gw", type: "f32", access: "read_write" },
  ],
  uniforms: [["B", "u32"], ["ED", "u32"], ["N", "u32"], ["off", "u32"], ["Ri", "u32"]],
  workgroupSize: 64,
  body: `
  let W = P.N + 2u + P.Ri; // the columns of gpar this kernel reads (the lam carry is left out)
  if (gid >= P.ED * W) { return; }
  let d = gid / W;
  let c = gid % W;
  let col = select(c, c + P.N, c >= P.N + 2u); // dW sits after the lam carry
  var acc = 0.0;
  for (var b = 0u; b < P.B; b = b + 1u) {
    acc = acc + ld_gpar(P.off + (b * P.ED + d) * (2u * P.N + 2u + P.Ri) + col);
  }
  if (c == 0u) {
    st_gbias(d, acc);
  } else if (c == 1u) {
    st_gd(d, acc);
  } else if (c < P.N + 2u) {
    let i = d * P.N + c - 2u;
    st_galog(i, -acc * exp(ld_alog(i))); // dA/dA_log = A = -exp(A_log)
  } else {
    st_gw(d * P.Ri + c - P.N - 2u, acc);
  }`,
});

let partialBudget: number | null = null;

/** Caps the bytes of the backward's dB/dC partial rows (default null: max(4 MiB, bytes of x)); tests use a
 * small cap to walk time in many segments. */
export function setFusedPartialBudget(bytes: number | null): void {
  partialBudget = bytes;
}

/** Workgroups wanted at least, so that small problems (batch 1, narrow models) still use every core. */
const MIN_GROUPS = 4;

function sizes(x: Tensor, dBC: Tensor, a: FusedAttrs, z: Tensor | null) {
  const [B, L, ED] = x.shape;
  const v = { ...fusedVariant(a.N) };
  // Channels are the only parallelism: halve the workgroup until there are enough of them (shuffles need
  // whole subgroups: not below the subgroup size).
  const least = v.shuffle ? Math.max(8, shuffleSize()) : 8;
  while (v.WG / 2 >= least && B * Math.ceil(ED / v.WG) < MIN_GROUPS) v.WG /= 2;
  return {
    B,
    L,
    ED,
    v,
    u: {
      B,
      L,
      ED,
      S: dBC.shape[2],
      R: a.R,
      chunks: Math.ceil(L / v.Lc),
      tiles: Math.ceil(ED / v.WG),
      gated: a.gated ? 1 : 0,
      zS: z ? z.shape[2] : ED,
      z0: a.zStart ?? 0,
    },
  };
}

/** The bindings both kernels read: x, draw (x in its place when dt_proj runs inside), dBC, ph, z (x when
 * ungated). */
function scanInputs(x: Tensor, draw: Tensor | null, dBC: Tensor, ph: Tensor, z: Tensor | null) {
  return {
    x: x.storage,
    draw: (draw ?? x).storage,
    dbc: dBC.storage,
    ph: ph.storage,
    z: (z ?? x).storage,
  };
}

/**
 * Runs the forward kernel (no autograd): returns out (B, L, ED) and `ph` = [par | hs (B, ED, chunks, N)]. par =
 * [bias | A_log | D], and dt_proj's weight after them with `a.dtInside` (draw then null).
 */
export function fusedScanForward(
  x: Tensor,
  draw: Tensor | null,
  dBC: Tensor,
  par: Tensor,
  z: Tensor | null,
  a: FusedAttrs,
): { y: Tensor; ph: Tensor } {
  const { B, L, ED, v, u } = sizes(x, dBC, a, z);
  const y = Tensor.empty([B, L, ED]);
  const ph = Tensor.empty([par.size + B * ED * u.chunks * a.N]);
  recordCopy(par.storage.buffer, 0, ph.storage.buffer, 0, 4 * par.size);
  const Nb = v.Nb ?? a.N;
  const Ri = a.dtInside ? a.R : 0;
  if (!draw && !Ri) throw new Error("fusedScanForward: draw is needed unless dt_proj runs inside");
  const bufs = { ...scanInputs(x, draw, dBC, ph, z), y: y.storage };
  const step = Math.floor(MAX_STEPS / v.Lc) * v.Lc;
  for (let t0 = 0; t0 < L; t0 += step) {
    const uni = { ...u, hsOff: par.size, t0, t1: Math.min(L, t0 + step) };
    // state blocks one after another: each adds its share of y
    for (let n0 = 0; n0 < a.N; n0 += Nb) dispatch(forwardKernel(v, n0, Ri), bufs, uni, B * u.tiles);
  }
  return { y, ph };
}

/** The state after the last step, h[L-1]: (B, ED, N), read out of `ph` (the inference cache after a prompt). */
export function lastState(ph: Tensor, B: number, ED: number, N: number, L: number): Tensor {
  const chunks = Math.ceil(L / fusedVariant(N).Lc);
  const h = Tensor.empty([B, ED, N]);
  const hsOff = ph.size - B * ED * chunks * N;
  copyBox(ph, { offset: hsOff + (chunks - 1) * N, strides: [ED * chunks * N, chunks * N, 1] }, h, {
    offset: 0,
    strides: [ED * N, N, 1],
  }, [B, ED, N]);
  return h;
}

/** The gradients of the fused scan's inputs (gz null when ungated). */
interface FusedGrads {
  gx: Tensor;
  /** ddraw (B, L, ED) */
  gdraw: Tensor;
  /** dt_proj's weight gradient (ED, R) when it runs inside the kernels */
  gW: Tensor | null;
  gdBC: Tensor;
  gbias: Tensor;
  gAlog: Tensor;
  gD: Tensor;
  gz: Tensor | null;
}

/** Runs the backward kernels (no autograd): every input's gradient from the output's gradient g. gdBC's dt
 * columns 0..R hold zeros, or (`a.dtInside`, draw null) ddraw @ W. */
function fusedScanBackward(
  g: Tensor,
  x: Tensor,
  draw: Tensor | null,
  dBC: Tensor,
  A_log: Tensor,
  ph: Tensor,
  z: Tensor | null,
  a: FusedAttrs,
): FusedGrads {
  const { B, L, ED, v, u } = sizes(x, dBC, a, z);
  const N = a.N;
  // dB/dC partials: one row per tile, or per subgroup of a tile (how many depends on the subgroup size the
  // adapter picks at run time: rows it leaves unwritten must be zeros). They take `slots` times the
  // memory of dB/dC, so time is walked in segments whose partials fit in max(4 MiB, bytes of x), each
  // reduced into gdBC before the next.
  const sg = v.reduce === "subgroup" ? deviceInfo().subgroups : null;
  const slotsPerTile = sg ? Math.ceil(v.WG / sg.minSize) : 1;
  const slots = u.tiles * slotsPerTile;
  const Ri = a.dtInside ? a.R : 0;
  const PW = partialWidth(N, Ri); // a partial row: [dB (N) | dC (N) | dt terms (Ri), padded]
  const GP = 2 * N + 2 + Ri; // gpar row
  // partials of one time step, as the budget counts them (the few dt columns ride along, so that they do not
  // split time into more segments than the B and C columns alone would)
  const stepBytes = 4 * B * slots * 2 * N;
  const budget = partialBudget ?? Math.max(4 << 20, 4 * x.size);
  const segChunks = Math.max(1, Math.min(u.chunks, Math.floor(budget / stepBytes / v.Lc)));
  const segSteps = Math.min(L, segChunks * v.Lc);
  const gbcSize = B * segSteps * slots * PW;
  const gx = Tensor.empty(x.shape);
  const gdraw = Tensor.empty(x.shape);
  // With z a window of a wider tensor (in_proj's output), gz is returned as that window of z's gradient:
  // writing it there in place would make the whole gradient live from here on, raising the peak.
  const gz = Tensor.empty(x.shape);
  const gred = Tensor.empty([gbcSize + B * ED * GP]); // [partials of a segment | gpar]
  const gdBC = Tensor.empty(dBC.shape); // gdBC: (B, L, R + 2N), or wider (zeros past R + 2N)
  const bufs = {
    ...scanInputs(x, draw, dBC, ph, z),
    g: g.storage,
    gx: gx.storage,
    gdraw: gdraw.storage,
    gz: gz.storage,
    gred: gred.storage,
  };
  const Nb = v.Nb ?? N;
  const hsOff = ph.size - B * ED * u.chunks * N;
  // Each dispatch walks its steps at most four times (sub-chunk states, recompute, reverse, dB/dC sums):
  // at most MAX_STEPS / 2 steps, so no invocation loops 65535 times.
  const per = Math.max(1, Math.floor(MAX_STEPS / 2 / v.Lc));
  const S = dBC.shape[2]; // row stride of dBC and its gradient (R + 2N, or more with padding)
  for (let c1 = u.chunks; c1 > 0; c1 -= segChunks) {
    const c0 = Math.max(0, c1 - segChunks);
    const segStart = c0 * v.Lc;
    const segLen = Math.min(L, c1 * v.Lc) - segStart;
    if (sg && sg.minSize !== sg.maxSize) {
      recordClear(gred.storage.buffer, 0, 4 * B * segLen * slots * PW);
    }
    for (let t1 = c1; t1 > c0; t1 -= per) {
      const t0 = Math.max(c0, t1 - per);
      const uni = { ...u, t0, t1, hsOff, gparOff: gbcSize, slots, slotsPerTile, segStart, segLen };
      // state blocks one after another: each adds its share of dx, ddelta, dz, dbias, dD
      for (let n0 = 0; n0 < N; n0 += Nb) dispatch(backwardKernel(v, n0, Ri), bufs, uni, B * u.tiles);
    }
    // partials (B, segLen, slots, PW) -> gdBC[:, segStart..segStart+segLen, :]
    const V = PW % 4 === 0 && (2 * N) % 4 === 0 ? 4 : 1;
    const n = B * segLen;
    const gu = { n, L, S, R: a.R, slots, segStart, segLen, Q: (2 * N) / V, PQ: PW / V };
    dispatch(gatherKernel(V, Ri > 0), { part: gred.storage, gdbc: gdBC.storage }, gu, Math.ceil(n / 64));
  }
  // Reductions over the batch: dbias, dD, dA_log, from gpar (B, ED, 2N + 2) at the end of gred.
  const gbias = Tensor.empty([ED]);
  const gD = Tensor.empty([ED]);
  const gAlog = Tensor.empty([ED, N]);
  const gW = Ri ? Tensor.empty([ED, Ri]) : null;
  const pbufs = { gpar: gred.storage, alog: A_log.storage, gbias: gbias.storage, gd: gD.storage };
  const pu = { B, ED, N, off: gbcSize, Ri };
  // Without dW the kernel still binds a `gw`: a scratch word (writable bindings must not alias).
  const gwOut = gW ?? Tensor.empty([1]);
  const pout = { galog: gAlog.storage, gw: gwOut.storage };
  dispatch(paramsKernel, { ...pbufs, ...pout }, pu, Math.ceil((ED * (N + 2 + Ri)) / 64));
  if (!gW) gwOut.dispose();
  gred.dispose();
  if (!z) gz.dispose();
  return { gx, gdraw, gW, gdBC, gbias, gAlog, gD, gz: z ? gz : null };
}

/** The op's gradient of z: its own tensor, or a window of a wider z (in_proj's output); null if unneeded.
 * Writing it into a whole gradient of a wide z here would make that live from here on, raising the peak. */
function zGrad(
  gz: Tensor | null,
  z: Tensor | undefined,
  ED: number,
  a: FusedAttrs,
): Tensor | WindowGrad | null {
  if (!gz || !z) return null;
  if (!z.requiresGrad) {
    gz.dispose();
    return null;
  }
  return z.shape[2] !== ED ? new WindowGrad(gz, 2, a.zStart ?? 0) : gz;
}

/** Disposes the gradients of inputs that need none (null for them). */
function needed(grads: (Tensor | null)[], inputs: readonly Tensor[]): (Tensor | null)[] {
  return grads.map((t, i) => (!t || inputs[i].requiresGrad ? t : (t.dispose(), null)));
}

const fusedOp = defineOp<FusedAttrs>({
  name: "fusedSelectiveScan",
  forward: (inputs, a, save) => {
    const [x, draw, dBC, bias, A_log, D, z] = inputs;
    const par = cat([bias, A_log.reshape(-1), D], 0); // par: (ED + ED*N + ED)
    const { y, ph } = fusedScanForward(x, draw, dBC, par, z ?? null, a);
    par.dispose();
    save(x, draw, dBC, A_log, ph, ...(z ? [z] : []));
    return y;
  },
  backward: (g, saved, inputs, a) => {
    const [x, draw, dBC, A_log, ph] = saved;
    const z = a.gated ? saved[5] : null;
    const r = fusedScanBackward(g, x, draw, dBC, A_log, ph, z, a);
    const grads = needed([r.gx, r.gdraw, r.gdBC, r.gbias, r.gAlog, r.gD], inputs);
    return z ? [...grads, zGrad(r.gz, inputs[6], x.shape[2], a)] : grads;
  },
});

/**
 * dt_proj and the SSM as one op: delta = softplus(dBC[..., :R] @ W^T + bias). It never saves delta (B, L, ED).
 * Up to rank MAX_INLINE_DT_RANK the kernels compute draw themselves, per step, from dBC's dt columns and W
 * (kept with the parameters in `ph`), and the backward kernels also give W's gradient and the dt columns of
 * dBC's: no draw tensor, no matmul. Above it, draw comes from a matmul in the forward and again in the
 * backward (as the official kernels' checkpoint_lvl 1), and the op saves the dt columns.
 */
const dtScanOp = defineOp<FusedAttrs>({
  name: "fusedMambaScan",
  forward: (inputs, a, save) => {
    const [x, dBC, W, bias, A_log, D, z] = inputs;
    const { y, ph, dt } = dtScanForward(x, dBC, W, bias, A_log, D, z ?? null, a);
    save(x, dBC, A_log, ph, ...(z ? [z] : []), ...(dt ? [dt, W] : []));
    return y;
  },
  backward: (g, saved, inputs, a) => {
    const [x, dBC, A_log, ph] = saved;
    const z = a.gated ? saved[4] : null;
    const ED = x.shape[2];
    let r: FusedGrads;
    if (a.dtInside) {
      r = fusedScanBackward(g, x, null, dBC, A_log, ph, z, a);
    } else {
      const [dt, W] = saved.slice(a.gated ? 5 : 4);
      const draw = matmulRaw(dt, W, { transB: true }); // recomputed: draw: (B, L, ED)
      r = fusedScanBackward(g, x, draw, dBC, A_log, ph, z, a);
      draw.dispose();
      const [B, L] = x.shape;
      if (inputs[2].requiresGrad) {
        const gdrawFlat = new Tensor(r.gdraw.storage, [B * L, ED], "f32"); // (B L, ED)
        const dtFlat = new Tensor(dt.storage, [B * L, a.R], "f32"); // (B L, R)
        r.gW = matmulRaw(gdrawFlat, dtFlat, { transA: true }); // gW: (ED, R)
        gdrawFlat.dispose();
        dtFlat.dispose();
      }
      if (inputs[1].requiresGrad && a.R > 0) {
        // the dt columns of dBC's gradient (zeros so far): ddraw @ W
        const gdt = matmulRaw(r.gdraw, W, {}); // gdt: (B, L, R)
        const box = { offset: 0, strides: stridesOf(r.gdBC.shape) };
        copyBox(gdt, { offset: 0, strides: stridesOf(gdt.shape) }, r.gdBC, box, [B, L, a.R]);
        gdt.dispose();
      }
    }
    r.gdraw.dispose();
    const grads = needed([r.gx, r.gdBC, r.gW, r.gbias, r.gAlog, r.gD], inputs);
    return z ? [...grads, zGrad(r.gz, inputs[6], ED, a)] : grads;
  },
});

/** fusedMambaScan's forward kernels (no autograd): y, `ph` and, above the inline rank, the dt columns read. */
function dtScanForward(
  x: Tensor,
  dBC: Tensor,
  W: Tensor,
  bias: Tensor,
  A_log: Tensor,
  D: Tensor,
  z: Tensor | null,
  a: FusedAttrs,
): { y: Tensor; ph: Tensor; dt: Tensor | null } {
  const dt = a.dtInside ? null : dtColumns(dBC, a.R); // dt: (B, L, R)
  const draw = dt && matmulRaw(dt, W, { transB: true }); // draw: (B, L, ED)
  // par: (ED + ED*N + ED), and dt_proj's weight (ED*R) after it when it runs inside
  const par = cat([bias, A_log.reshape(-1), D, ...(dt ? [] : [W.reshape(-1)])], 0);
  const { y, ph } = fusedScanForward(x, draw, dBC, par, z, a);
  par.dispose();
  draw?.dispose();
  return { y, ph, dt };
}

/** The R dt columns of dBC (B, L, R + 2N), copied: (B, L, R). */
function dtColumns(dBC: Tensor, R: number): Tensor {
  const [B, L] = dBC.shape;
  const dt = Tensor.empty([B, L, R]);
  const from = { offset: 0, strides: stridesOf(dBC.shape) };
  copyBox(dBC, from, dt, { offset: 0, strides: stridesOf(dt.shape) }, [B, L, R]);
  return dt;
}

/** Checks the shapes of a fused-scan call (`what` names the function); returns R and N. */
function checkScanArgs(
  what: string,
  x: Tensor,
  dBC: Tensor,
  bias: Tensor,
  A_log: Tensor,
  D: Tensor,
  z: Tensor | null,
  zStart: number | undefined,
  dtRank?: number,
): { R: number; N: number } {
  const [B, L, ED] = x.shape;
  const N = A_log.shape[1];
  const R = dtRank ?? dBC.shape[2] - 2 * N;
  const bad = (msg: string) => {
    throw new Error(`${what}: ${msg}`);
  };
  if (x.rank !== 3) bad(`x must be (B, L, ED), got ${fmt(x.shape)}`);
  if (z && zStart === undefined && z.shape.join() !== x.shape.join()) {
    bad(`z ${fmt(z.shape)} must equal x ${fmt(x.shape)}`);
  }
  if (zStart !== undefined) {
    const fits = z && z.rank === 3 && z.shape[0] === B && z.shape[1] === L && Number.isInteger(zStart) &&
      zStart >= 0 && zStart + ED <= z.shape[2];
    if (!fits) {
      bad(
        `zStart ${zStart}: z must be (${B}, ${L}, Z) with Z >= ${zStart} + ${ED}, got ${
          z ? fmt(z.shape) : "null"
        }`,
      );
    }
  }
  if (A_log.rank !== 2 || A_log.shape[0] !== ED) bad(`A_log must be (${ED}, N), got ${fmt(A_log.shape)}`);
  const widthOk = dtRank === undefined ? R >= 0 : dBC.shape[2] >= R + 2 * N;
  if (dBC.rank !== 3 || dBC.shape[0] !== B || dBC.shape[1] !== L || !widthOk) {
    bad(
      `dBC must be (${B}, ${L}, ${dtRank === undefined ? "R" : R} + 2*${N}${
        dtRank === undefined ? "" : " or more"
      }), got ${fmt(dBC.shape)}`,
    );
  }
  if (bias.shape.join() !== `${ED}` || D.shape.join() !== `${ED}`) bad(`bias and D must be (${ED})`);
  return { R, N };
}

/**
 * The whole SSM of a Mamba block in one kernel, differentiable with a recomputing backward.
 * x, draw: (B, L, ED); dBC: (B, L, R + 2N) (B at columns R.., C at R+N..); bias, D: (ED); A_log: (ED, N);
 * z: (B, L, ED) or null. Returns (C.h + D x) * silu(z): (B, L, ED). With `zStart`, z is (B, L, Z), Z >=
 * zStart + ED, and the gate reads its columns zStart .. zStart + ED in place (e.g. the z half of in_proj's
 * output, without a copy); z's gradient is zero outside them.
 */
export function fusedSelectiveScan(
  x: Tensor,
  draw: Tensor,
  dBC: Tensor,
  bias: Tensor,
  A_log: Tensor,
  D: Tensor,
  z: Tensor | null,
  zStart?: number,
): Tensor {
  const { R, N } = checkScanArgs("fusedSelectiveScan", x, dBC, bias, A_log, D, z, zStart);
  if (draw.shape.join() !== x.shape.join()) {
    throw new Error(`fusedSelectiveScan: draw ${fmt(draw.shape)} must equal x ${fmt(x.shape)}`);
  }
  const inputs = [x, draw, dBC, bias, A_log, D, ...(z ? [z] : [])];
  return fusedOp(inputs, { R, N, gated: z !== null, ...(zStart ? { zStart } : {}) });
}

/**
 * The SSM of a Mamba block with dt_proj folded in, as MambaBlock runs it: delta = softplus(dBC[..., :R] @
 * dtWeight^T + dtBias), then as {@linkcode fusedSelectiveScan}. dtWeight: (ED, R); dBC may be wider than R +
 * 2N (x_proj's output padded to a multiple of 4 columns: the extra columns are ignored, their gradient is
 * zero); the other arguments as there. It never saves delta or draw (B, L, ED): up to R = MAX_INLINE_DT_RANK the kernels compute draw per
 * step from dBC's dt columns (and the backward kernels W's gradient and those columns'); above it, draw comes
 * from a matmul, recomputed in the backward. The scan keeps 4 (2 ED + R + 2N) bytes per token (4 (2 ED + 2R +
 * 2N) above the inline rank) plus the chunk states.
 */
export function fusedMambaScan(
  x: Tensor,
  dBC: Tensor,
  dtWeight: Tensor,
  dtBias: Tensor,
  A_log: Tensor,
  D: Tensor,
  z: Tensor | null,
  zStart?: number,
): Tensor {
  const a = mambaScanAttrs("fusedMambaScan", x, dBC, dtWeight, dtBias, A_log, D, z, zStart);
  return dtScanOp([x, dBC, dtWeight, dtBias, A_log, D, ...(z ? [z] : [])], a);
}

/**
 * {@linkcode fusedMambaScan}'s forward without autograd (a prompt's prefill): y (B, L, ED) and `ph`, whose
 * last chunk state is the inference cache ({@linkcode lastState}).
 */
export function fusedMambaScanForward(
  x: Tensor,
  dBC: Tensor,
  dtWeight: Tensor,
  dtBias: Tensor,
  A_log: Tensor,
  D: Tensor,
  z: Tensor | null,
  zStart?: number,
): { y: Tensor; ph: Tensor } {
  const a = mambaScanAttrs("fusedMambaScanForward", x, dBC, dtWeight, dtBias, A_log, D, z, zStart);
  const { y, ph, dt } = dtScanForward(x, dBC, dtWeight, dtBias, A_log, D, z, a);
  dt?.dispose();
  return { y, ph };
}

/** Checks a fusedMambaScan call and gives its attributes (dt_proj inside the kernels up to the inline rank). */
function mambaScanAttrs(
  what: string,
  x: Tensor,
  dBC: Tensor,
  dtWeight: Tensor,
  dtBias: Tensor,
  A_log: Tensor,
  D: Tensor,
  z: Tensor | null,
  zStart: number | undefined,
): FusedAttrs {
  const ED = x.shape[2];
  if (dtWeight.rank !== 2 || dtWeight.shape[0] !== ED) {
    throw new Error(`${what}: dtWeight must be (${ED}, R), got ${fmt(dtWeight.shape)}`);
  }
  const { R, N } = checkScanArgs(what, x, dBC, dtBias, A_log, D, z, zStart, dtWeight.shape[1]);
  const dtInside = R >= 1 && R <= MAX_INLINE_DT_RANK;
  return { R, N, gated: z !== null, ...(zStart ? { zStart } : {}), ...(dtInside ? { dtInside } : {}) };
}
