/**
 * Runs the fused scan's kernels, without autograd (the ops in fused.ts call these):
 *
 * - `fusedScanForward`: y, and `ph` = the parameters packed with the state at every chunk's end (hs; with
 *   `states` "last", only the last and those the forward reads again);
 * - `phForBackward`: what an op saves of `ph`: all of it, or, where the chunk states would outweigh the
 *   inputs (short chunks, large N), the parameters alone;
 * - `fusedScanBackward`: every input's gradient (and, asked, the gated y), each chunk's states recomputed from
 *   hs (worked out again first where the op saved the parameters alone);
 * - `lastState`: the state after the last step, out of `ph` (the inference cache after a prompt).
 *
 * Each call is sized here: workgroups (halved until there are enough), chunks walked in parallel or in order,
 * state blocks (one pipeline and dispatch each), time segments. Every dispatch walks at most 16384 steps per
 * invocation (loops stop at 65535 on software adapters): longer sequences take several dispatches, carrying h
 * through hs and lam through `gpar`. The backward's dB/dC partials are bounded by a memory budget: time is
 * walked in segments, each gathered before the next.
 * @module
 */

import { deviceInfo } from "../core/device.ts";
import { dispatch, windowBytes } from "../core/kernel.ts";
import type { Storage } from "../core/memory.ts";
import { recordClear } from "../core/executor.ts";
import { copyBox, packInto } from "../core/ops/index.ts";
import { reduceRun } from "../core/ops/reduce_kernel.ts";
import { fmt, sameShape } from "../core/shape.ts";
import { freeOnThrow, Tensor } from "../core/tensor.ts";
import { backwardKernel, gparWidth, type YOut } from "./fused_backward_kernel.ts";
import { forwardKernel } from "./fused_forward_kernel.ts";
import { sumsInvocations, sumsKernel, sumsLoopTrips } from "./fused_reduce_kernels.ts";
import { chainGroups, chainKernel, localKernel } from "./fused_carry_kernels.ts";
import {
  type FusedVariant,
  fusedVariantFor,
  MAX_CHUNKS_CHAINED,
  MAX_CHUNKS_FOLDED,
  stateBlocks,
} from "./fused_variant.ts";
import { partialWidth, walkChunks } from "./fused_wgsl.ts";

/** Steps one invocation walks per dispatch at most (loops stop at 65535 iterations on software adapters). */
const MAX_STEPS = 16384;

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

let partialBudget: number | null = null;

/** Caps the bytes of the backward's dB/dC partial rows (default null: max(4 MiB, bytes of x)); tests use a
 * small cap to walk time in many segments. */
export function setFusedPartialBudget(bytes: number | null): void {
  partialBudget = bytes;
}

let yOverG = true;

/** Whether the backward may write the gated y over its gradient where one state block holds all the states
 * (default, null: yes); false keeps y in a binding of its own wherever one is free. bench/gpu_timeline.ts
 * times both on GPUs, where g's read-write binding might cost more than the (B, L, ED) allocation saves. */
export function setFusedYOverG(on: boolean | null): void {
  yOverG = on ?? true;
}

let foldedChunksSet: number | null = null;

/** Sets how many chunks the chunk-parallel kernels fold their carries for, whatever the chunk length (tests
 * run both paths with it); null restores the rule (MAX_CHUNKS_FOLDED). */
export function setMaxChunksFolded(chunks: number | null): void {
  foldedChunksSet = chunks;
}

/**
 * gpar rows (one per batch row, or per batch row and chunk when chunks run in parallel) above which the
 * parameter gradients are first summed over them by core's chunked reduction, a pass or two of many short
 * invocations, instead of inside the sums kernel, where one invocation per (channel, column) walks every row.
 * On the H200 that walk cost about 0.22 µs a row: 0.40 ms of a 1.1 ms SSM step at d_model 16, L 16384 (1821
 * chunks of 9 steps), against about 5 µs of GPU time a dispatch. 256: short walks (L 1024, up to 114 chunks)
 * keep the one dispatch, since small steps are bound by the host's time per dispatch. CPU adapters keep the
 * walk (their invocations are few and long anyway).
 */
const PRESUM_ROWS_GPU = 256;

let presumRowsSet: number | null = null;

/** Sets the gpar rows above which the parameter gradients are summed by a reduction pass first (tests run
 * both paths with it); null restores the rule (PRESUM_ROWS_GPU on GPUs, never on CPU adapters). */
export function setFusedPresumRows(rows: number | null): void {
  presumRowsSet = rows;
}

function presumRows(): number {
  return presumRowsSet ?? (deviceInfo().isFallbackAdapter ? Infinity : PRESUM_ROWS_GPU);
}

/**
 * Chunks from which a GPU chains them in runs (`chainKernel`'s segments): 8 to 16 chunks a run, up to 64 runs
 * per chain (29 chunks a run at 1821 chunks), and at most CHAIN_INVOCATIONS invocations in all (wide models
 * have chains enough to hide the walk's loads). Below, the walk in order takes chunks / 8 groups of loads, a
 * few µs.
 */
const CHAIN_RUNS_FROM = 128;
/** Invocations a chain in runs stops adding runs at (2^18: 8 runs at ED 2048, N 16, batch 1). */
const CHAIN_INVOCATIONS = 1 << 18;

let chainRunsSet: number | null = null;

/** Sets the runs per chain of the chunk-parallel chain kernels (1, or a power of two to 64), whatever the
 * adapter and chunks (tests run both kernels with it); null restores the rule (CHAIN_RUNS_FROM on GPUs, 1 on
 * CPU adapters, where barriers and workgroups cost more than long walks). */
export function setFusedChainRuns(runs: number | null): void {
  if (runs !== null && runs !== 1) chainKernel("fwd", runs); // throws on a count it has no kernel for
  chainRunsSet = runs;
}

/** Records the chain over `chunks` links (the backward's chunks, the forward's walks of G chunks each) for
 * B x ED x N states (`dir`: up for h, down for lam). */
function dispatchChain(
  dir: "fwd" | "bwd",
  bufs: { ph: Storage; out: Storage },
  uniforms: Record<string, number>,
  states: number,
  chunks: number,
  G = 1,
): void {
  const pow2 = (x: number) => 2 ** Math.floor(Math.log2(Math.max(1, x)));
  const runs = chainRunsSet ??
    (deviceInfo().isFallbackAdapter || chunks < CHAIN_RUNS_FROM
      ? 1
      : Math.min(64, 2 * pow2(chunks / 16), pow2(CHAIN_INVOCATIONS / states)));
  dispatch(chainKernel(dir, runs, G), bufs, uniforms, chainGroups(states, runs));
}

/** Whether a chunk-parallel kernel walking `chunks` chunks (the backward's of Lc steps, the forward's walks of
 * Lf) folds its carries (see MAX_CHUNKS_FOLDED); `Lc` is that chunk's length. */
function foldsCarries(chunks: number, Lc: number): boolean {
  return chunks <= (foldedChunksSet ?? Math.min(MAX_CHUNKS_FOLDED, Math.floor(Lc / 2) + 1));
}

/** Workgroups wanted at least, so that small problems (batch 1, narrow models) still use every core. */
const MIN_GROUPS = 4;

/**
 * The variant each forward ran with, by the storage of its `ph`: the backward and `lastState` read the chunk
 * states with the forward's chunk length even if the variant in use changed in between (a tuner run).
 */
const ranWith = new WeakMap<Storage, FusedVariant>();
/** The [B, L, ED, N] of each forward, by the storage of its `ph`: `lastState` checks its arguments against it. */
const ranShape = new WeakMap<Storage, number[]>();
/** Where the initial state h0 sits in a `ph` whose forward started from one (by its storage): the backward, and
 * the states worked out again for it, start the first chunk from there too. */
const h0Offset = new WeakMap<Storage, number>();

/** The uniforms `init` and `h0Off` of the kernels that read `ph`: from h0, where its forward had one. */
function initOf(ph: Tensor): { init: number; h0Off: number } {
  const h0Off = h0Offset.get(ph.storage);
  return h0Off === undefined ? { init: 0, h0Off: 0 } : { init: 1, h0Off };
}

/** A call's shapes, its variant (the workgroup halved for small problems) and the main kernels' uniforms.
 * `forward`: size the workgroups for the forward's walks (of Lf steps), else for chunks of Lc. */
function sizes(x: Tensor, dBC: Tensor, a: FusedAttrs, z: Tensor | null, ran?: FusedVariant, forward = false) {
  const [B, L, ED] = x.shape;
  // the forward's variant in the backward; else the variant for this call's shape
  const picked = ran ?? fusedVariantFor(a.N, B, L, ED);
  const v = { ...picked };
  // Channels are the only parallelism: halve the workgroup until there are enough of them. Shuffles and
  // lanes per channel need whole subgroups: the workgroup stays a multiple of the (largest) subgroup size.
  const sg = deviceInfo().subgroups;
  const unit = (v.shuffle || (v.lanes ?? 1) > 1) && sg ? sg.maxSize : 1;
  const lanes = v.lanes ?? 1; // a workgroup holds WG / lanes channels
  const fits = (WG: number) => WG >= 8 && WG % unit === 0 && WG >= lanes;
  const chunks = Math.ceil(L / v.Lc);
  // chunk-parallel variants walk every chunk at once (unless there are too many to chain)
  const chunked = v.chunkParallel === true && chunks > 1 && chunks <= MAX_CHUNKS_CHAINED;
  // workgroups per tile of channels
  const perTile = forward ? forwardWalks(v, L) : chunked ? chunks : 1;
  while (fits(v.WG / 2) && B * Math.ceil(ED / (v.WG / lanes)) * perTile < MIN_GROUPS) v.WG /= 2;
  return {
    B,
    L,
    ED,
    v,
    picked,
    chunked,
    u: {
      B,
      L,
      ED,
      S: dBC.shape[2],
      R: a.R,
      chunks,
      tiles: Math.ceil(ED / (v.WG / lanes)),
      gated: a.gated ? 1 : 0,
      zS: z ? z.shape[2] : ED,
      z0: a.zStart ?? 0,
      init: 0, // no initial state (fusedScanForward's h0 sets these)
      h0Off: 0,
    },
  };
}

/** The bindings both kernels read (their declarations: `scanInputBuffers`): x, draw (x in its place when
 * dt_proj runs inside), dBC, ph, z (x when ungated). */
function scanInputs(x: Tensor, draw: Tensor | null, dBC: Tensor, ph: Tensor, z: Tensor | null) {
  return {
    x: x.storage,
    draw: (draw ?? x).storage,
    dbc: dBC.storage,
    ph: ph.storage,
    z: (z ?? x).storage,
  };
}

/** Throws, naming what does not fit, unless the tensors agree with the attributes: x (and draw, z's columns)
 * (B, L, ED), dBC (B, L, >= R + 2N), params [bias (ED), A_log (ED, N), D (ED)] and with dtInside W (ED, R), a z
 * exactly when gated. The exported kernel runner would read past them silently otherwise. */
function checkForwardArgs(
  x: Tensor,
  draw: Tensor | null,
  dBC: Tensor,
  params: readonly Tensor[],
  z: Tensor | null,
  a: FusedAttrs,
): void {
  // Every training step's forward runs this: the checks first, allocating nothing; the messages only on failure.
  const B = x.shape[0], L = x.shape[1], ED = x.shape[2];
  const zStart = a.zStart ?? 0;
  let total = 0;
  for (let i = 0; i < params.length; i++) total += params[i].size;
  const want = ED * (2 + a.N + (a.dtInside ? a.R : 0)); // bias, A_log, D (and W): pieces, or packed already
  const badX = x.rank !== 3 || L === 0; // (L 0: no state after a last step, which lastState would read)
  let badDtype = x.dtype !== "f32" || dBC.dtype !== "f32" || (draw !== null && draw.dtype !== "f32") ||
    (z !== null && z.dtype !== "f32");
  for (let i = 0; i < params.length; i++) badDtype ||= params[i].dtype !== "f32";
  const badAttrs = !(Number.isInteger(a.N) && a.N >= 1 && Number.isInteger(a.R) && a.R >= 0);
  const badDraw = draw !== null && !sameShape(draw.shape, x.shape);
  const badDBC = dBC.rank !== 3 || dBC.shape[0] !== B || dBC.shape[1] !== L || dBC.shape[2] < a.R + 2 * a.N;
  const badGate = a.gated !== (z !== null);
  const badZ = z !== null &&
    (z.rank !== 3 || z.shape[0] !== B || z.shape[1] !== L || z.shape[2] < zStart + ED);
  if (!(badX || badDtype || badAttrs || badDraw || badDBC || total !== want || badGate || badZ)) return;
  const pieces = [ED, ED * a.N, ED, ...(a.dtInside ? [ED * a.R] : [])];
  const problems = [
    badX && `x ${fmt(x.shape)} is not (B, L, ED) with L >= 1`,
    badDtype &&
    `every input must be f32, got x ${x.dtype}, draw ${draw?.dtype ?? "none"}, dBC ${dBC.dtype}, ` +
      `params ${params.map((p) => p.dtype).join(" ")}, z ${z?.dtype ?? "none"}`,
    badAttrs && `N ${a.N} and R ${a.R}`,
    badDraw && `draw ${fmt(draw!.shape)} is not x's`,
    badDBC && `dBC ${fmt(dBC.shape)} is not (${B}, ${L}, >= R + 2N = ${a.R + 2 * a.N})`,
    total !== want &&
    `params of ${fmt(params.map((p) => p.size))} values, not ${fmt(pieces)} (bias, A_log, D${
      a.dtInside ? ", W" : ""
    })`,
    badGate && (a.gated ? "gated without z" : "z given but not gated"),
    badZ && `z ${fmt(z!.shape)} has no ${ED} columns from ${zStart}`,
  ].filter((m) => m);
  throw new Error(`fusedScanForward: ${problems.join("; ")}`);
}

/**
 * Runs the forward kernel (no autograd): returns y (B, L, ED) and `ph` = [par | hs (B, ED, chunks, N)]. par =
 * [bias | A_log | D], and dt_proj's weight after them with `a.dtInside` (draw then null): `params` lists
 * those pieces, packed into `ph` one after another in one dispatch (no row of them is built first).
 * `states` "last" (a forward no backward follows: inference, a prompt) writes of hs only what the forward
 * itself reads again and the state after the last step, which {@linkcode lastState} reads; the backward
 * refuses such a `ph`. The caller disposes `y` and `ph` (after reading the state out of `ph` with
 * {@linkcode lastState}).
 *
 * With `h0` (B, ED, N) the scan starts from that state instead of zeros (a cache's h: a prompt continued in
 * chunks, or training from a carried state); it is packed into `ph` after the parameters (`ph` = [par | h0 |
 * hs]), where the backward finds it. It is a constant: no gradient flows into h0 (truncated backpropagation
 * through time).
 */
export function fusedScanForward(
  x: Tensor,
  draw: Tensor | null,
  dBC: Tensor,
  params: readonly Tensor[],
  z: Tensor | null,
  a: FusedAttrs,
  states: "all" | "last" = "all",
  h0: Tensor | null = null,
): { y: Tensor; ph: Tensor } {
  const Ri = a.dtInside ? a.R : 0;
  if (!draw && !Ri) throw new Error("fusedScanForward: draw is needed unless dt_proj runs inside");
  checkForwardArgs(x, draw, dBC, params, z, a);
  if (states !== "all" && states !== "last") {
    throw new Error(`fusedScanForward: states must be "all" or "last", got ${JSON.stringify(states)}`);
  }
  const { B, L, ED, v, picked, u } = sizes(x, dBC, a, z, undefined, true);
  if (h0 && (h0.dtype !== "f32" || !sameShape(h0.shape, [B, ED, a.N]))) {
    throw new Error(
      `fusedScanForward: the initial state h0 must be f32 (${B}, ${ED}, ${a.N}) (B, ED, N), got ${h0.dtype} ${
        fmt(h0.shape)
      }`,
    );
  }
  // what it allocates goes if a read fails part-way (a disposed input: its storage throws)
  return freeOnThrow(() => {
    const y = Tensor.empty([B, L, ED]); // y: (B, L, ED)
    const h0Off = params.reduce((n, t) => n + t.size, 0);
    const parSize = h0Off + (h0 ? h0.size : 0); // where hs starts
    if (h0) Object.assign(u, { init: 1, h0Off });
    const ph = Tensor.empty([parSize + B * ED * u.chunks * a.N]); // ph: [par | h0 | hs (B, ED, chunks, N)]
    ranWith.set(ph.storage, picked);
    ranShape.set(ph.storage, [B, L, ED, a.N]);
    if (h0) h0Offset.set(ph.storage, h0Off);
    if (states === "last") lastOnly.add(ph.storage);
    const allStates = states === "all" ? 1 : 0;
    packInto(ph, h0 ? [...params, h0] : params); // one dispatch: copies would each end the compute pass
    const blocks = stateBlocks(v);
    const bufs = { ...scanInputs(x, draw, dBC, ph, z), y: y.storage };
    const walks = forwardWalks(v, L);
    if (walks > 1) {
      // Every walk (a chunk, or Lf / Lc of them) from a zero state (its local state, and its sum of dt), then
      // every walk from the state before it. With few walks the main kernels fold that state themselves out of
      // a scratch `carry` and write the states after their chunks into hs; else the local states go into hs,
      // the sums into y (written last), and the chain turns hs into the state after each walk before the main
      // kernels read it.
      const folded = foldsCarries(walks, v.Lf ?? v.Lc);
      const cells = B * ED * walks;
      const carry = folded ? Tensor.empty([cells * (a.N + 1)]) : null; // carry: [local states | sums of dt]
      const out = (carry ?? y).storage;
      const offsets = { locOff: 0, sdtOff: carry ? cells * a.N : 0 };
      localStates(v, Ri, bufs, out, ph, { ...u, N: a.N, hsOff: parSize, ...offsets }, folded, walks);
      const uni = { ...u, hsOff: parSize, t0: 0, t1: L, allStates, ...(carry ? offsets : {}) };
      const main = carry ? { ...bufs, carry: carry.storage } : bufs;
      const groups = B * u.tiles * walks;
      for (const block of blocks) dispatch(forwardKernel(v, block, Ri, true, folded), main, uni, groups);
      carry?.dispose();
      return { y, ph };
    }
    const step = Math.floor(MAX_STEPS / v.Lc) * v.Lc;
    for (let t0 = 0; t0 < L; t0 += step) {
      const uni = { ...u, hsOff: parSize, t0, t1: Math.min(L, t0 + step), allStates };
      // state blocks one after another: each adds its share of y
      for (const block of blocks) dispatch(forwardKernel(v, block, Ri), bufs, uni, B * u.tiles);
    }
    return { y, ph };
  });
}

/** How many walks the forward of a call of L steps takes with variant v: with chunks in parallel, one per Lf
 * steps, where there are at least 2 and at most MAX_CHUNKS_CHAINED; else 1 (in order). */
export function forwardWalks(v: FusedVariant, L: number): number {
  const walks = Math.ceil(L / (v.Lf ?? v.Lc));
  return v.chunkParallel === true && walks > 1 && walks <= MAX_CHUNKS_CHAINED ? walks : 1;
}

/**
 * The chunk-parallel forward's first two steps: every walk (of Lf steps) from a zero state (its local state
 * and its sum of dt, into `out`; the local states into hs at the cells of the walks' last chunks, or with
 * `folded` into `out` too), one dispatch per state block; then, unless the main kernels fold the carries
 * themselves, the chain, which turns the local states in hs into the state after each walk. `cu`: the call's
 * uniforms with N and where hs, the local states and the sums sit; `walks`: ceil(L / Lf).
 */
function localStates(
  v: FusedVariant,
  Ri: number,
  bufs: Record<string, Storage>,
  out: Storage,
  ph: Tensor,
  cu: ReturnType<typeof sizes>["u"] & { N: number; hsOff: number; locOff: number; sdtOff: number },
  folded: boolean,
  walks: number,
): void {
  const groups = cu.B * cu.tiles * walks;
  for (const block of stateBlocks(v)) {
    dispatch(localKernel(v, block, Ri, "fwd", folded), { ...bufs, out }, cu, groups);
  }
  if (!folded) {
    dispatchChain("fwd", { ph: ph.storage, out }, cu, cu.B * cu.ED * cu.N, walks, walkChunks(v));
  }
}

/** Saved `ph`s that hold the parameters alone (`phForBackward`): the backward works the chunk states out
 * again. */
const statesDropped = new WeakSet<Storage>();
/** `ph`s of forwards that wrote the last state only (`states` "last"): no backward can read them. */
const lastOnly = new WeakSet<Storage>();

/** Throws where a backward is given the `ph` of a forward that wrote the last state only. */
function checkAllStates(ph: Tensor, who: string): void {
  if (lastOnly.has(ph.storage)) {
    throw new Error(
      `${who}: ph holds the last state only (a forward run with states "last", for no backward)`,
    );
  }
}

let stateSaving: "keep" | "recompute" | null = null;

/** Whether the ops keep the chunk states for the backward ("keep"), or save the parameters alone and work the
 * states out again in the backward ("recompute"), wherever a call has chunks to chain; null restores the rule
 * (recompute where N > 2 Lc). Tests run both paths with it. */
export function setFusedStateSaving(mode: "keep" | "recompute" | null): void {
  stateSaving = mode;
}

/**
 * What a differentiable op saves of a forward's `ph` (the forward's own `ph` is then disposed or returned):
 * the chunk states take 4 N / Lc bytes per channel and token, x and z (what the block saves besides) 8
 * together. Where N > 2 Lc the states outweigh them: a GPU's short chunks (9 steps on the H200 at N 64: 28 bytes) against what
 * mamba.py's pscan saves (about 12 N) leave the scan's saved bytes 19 times below pscan's instead of 58. There
 * the op saves the parameters alone (a copy: one dispatch) and the backward recomputes the states by the
 * chunk-parallel forward's first two kernels, every chunk from a zero state, then the chain (one dispatch
 * per state block, one more, and the parameters' pack). Elsewhere, and with one chunk or more than
 * MAX_CHUNKS_CHAINED, ph itself.
 */
export function phForBackward(ph: Tensor): Tensor {
  const v = ranWith.get(ph.storage);
  const shape = ranShape.get(ph.storage);
  if (!v || !shape) throw new Error("phForBackward: ph must be the `ph` a fused forward returned");
  checkAllStates(ph, "phForBackward");
  const [B, L, ED, N] = shape;
  const chunks = Math.ceil(L / v.Lc);
  const recompute = stateSaving === "recompute" || (stateSaving === null && N > 2 * v.Lc);
  if (!recompute || chunks < 2 || chunks > MAX_CHUNKS_CHAINED) return ph;
  const par = Tensor.empty([ph.size - B * ED * chunks * N]); // par: the parameters, as packed
  const view = new Tensor(ph.storage, par.shape, "f32"); // ph's first par.size floats
  packInto(par, [view]);
  view.dispose();
  ranWith.set(par.storage, v);
  ranShape.set(par.storage, shape);
  const h0Off = h0Offset.get(ph.storage);
  if (h0Off !== undefined) h0Offset.set(par.storage, h0Off); // par holds h0 too: it precedes the states
  statesDropped.add(par.storage);
  ph.dispose();
  return par;
}

/** The full `ph` (parameters and chunk states) again, from the parameters that `phForBackward` saved: every
 * chunk's state from a zero state into hs, then the chain turns them into the state after each chunk (from h0
 * where the forward had one). */
function statesAgain(
  x: Tensor,
  draw: Tensor | null,
  dBC: Tensor,
  par: Tensor,
  z: Tensor | null,
  a: FusedAttrs,
) {
  const { B, ED, v, u } = sizes(x, dBC, a, z, ranWith.get(par.storage));
  return freeOnThrow(() => { // an allocation past a memory limit leaves nothing behind
    const ph = Tensor.empty([par.size + B * ED * u.chunks * a.N]); // ph: [par | hs (B, ED, chunks, N)]
    ranWith.set(ph.storage, ranWith.get(par.storage)!);
    ranShape.set(ph.storage, ranShape.get(par.storage)!);
    const h0Off = h0Offset.get(par.storage);
    if (h0Off !== undefined) h0Offset.set(ph.storage, h0Off);
    packInto(ph, [par]);
    const sdt = Tensor.empty([B * ED * u.chunks]); // sdt: each chunk's sum of dt (B, ED, chunks)
    const cu = { ...u, ...initOf(par), N: a.N, hsOff: par.size, locOff: 0, sdtOff: 0 };
    // every chunk's state, the forward's walks of Lf steps or not: one walk per chunk
    const { Lf: _walk, ...perChunk } = v;
    const Ri = a.dtInside ? a.R : 0;
    localStates(perChunk, Ri, scanInputs(x, draw, dBC, ph, z), sdt.storage, ph, cu, false, u.chunks);
    sdt.dispose();
    return ph;
  });
}

/**
 * The state after the last step, h[L-1]: (B, ED, N), read out of the `ph` that {@linkcode fusedMambaScanForward}
 * or {@linkcode fusedScanForward} returned (the inference cache after a prompt). B, ED, N and L are that
 * call's batch, channels (x's last dimension), state size (A_log's second dimension) and sequence length.
 * The chunk length is the one that forward ran with, even if the fused variant changed since. Returns a new
 * tensor: `ph` is not consumed, and the caller disposes both.
 */
export function lastState(ph: Tensor, B: number, ED: number, N: number, L: number): Tensor {
  const ran = ranShape.get(ph.storage);
  if (!ran || statesDropped.has(ph.storage)) {
    throw new Error("lastState: ph must be the `ph` a fused forward returned");
  }
  if ([B, L, ED, N].join() !== ran.join()) {
    throw new Error(
      `lastState: (B, L, ED, N) = (${B}, ${L}, ${ED}, ${N}) differ from the forward that made ph: (${
        ran.join(", ")
      })`,
    );
  }
  const chunks = Math.ceil(L / ranWith.get(ph.storage)!.Lc);
  const h = Tensor.empty([B, ED, N]); // h: (B, ED, N)
  const hsOff = ph.size - B * ED * chunks * N;
  copyBox(ph, { offset: hsOff + (chunks - 1) * N, strides: [ED * chunks * N, chunks * N, 1] }, h, {
    offset: 0,
    strides: [ED * N, N, 1],
  }, [B, ED, N]);
  return h;
}

/** A copy of the initial state h0 (B, ED, N) that the forward which made `ph` started from (or of the `ph` that
 * phForBackward saved of it), or null where it started from zeros. */
export function initialState(ph: Tensor, B: number, ED: number, N: number): Tensor | null {
  const off = h0Offset.get(ph.storage);
  if (off === undefined) return null;
  const h0 = Tensor.empty([B, ED, N]); // h0: (B, ED, N)
  const box = { offset: off, strides: [ED * N, N, 1] };
  copyBox(ph, box, h0, { offset: 0, strides: [ED * N, N, 1] }, [B, ED, N]);
  return h0;
}

/** The gradients of the fused scan's inputs (gz null when ungated). */
export interface FusedGrads {
  gx: Tensor;
  /** ddraw (B, L, ED); with dt_proj inside the kernels, scratch (not ddraw) */
  gdraw: Tensor;
  /** dt_proj's weight gradient (ED, R) when it runs inside the kernels */
  gW: Tensor | null;
  gdBC: Tensor;
  gbias: Tensor;
  gAlog: Tensor;
  gD: Tensor;
  gz: Tensor | null;
  /** With `emitY`: the gated output y * silu(z) (B, L, ED) that the kernels recomputed (a view of g's
   * storage where they wrote it over g), or null where they could not write it (see fusedScanBackward). */
  y: Tensor | null;
}

/** Whether the backward kernel can bind `yg` besides draw (dt_proj outside; needed with several state
 * blocks): an 11th storage buffer, which native adapters offer and browsers may not (Chrome exposes 10).
 * With x (B, L, ED) and z given, it counts
 * their binding windows (a tensor over one window takes one binding per window): x, draw, g, gx, gdraw and
 * yg as large as x, z and gz as z, and dBC, ph and gred one each. */
export function yBindingFree(x?: Tensor, z?: Tensor): boolean {
  const w = (t: Tensor | undefined) => (t ? Math.max(1, Math.ceil((4 * t.size) / windowBytes())) : 1);
  return deviceInfo().limits.maxStorageBuffersPerShaderStage >= 6 * w(x) + 2 * w(z) + 3;
}

/** Runs the backward kernels (no autograd): every input's gradient from the output's gradient g. gdBC's dt
 * columns 0..R hold zeros, or (`a.dtInside`, draw null) ddraw @ W. With `emitY` (gated only) the kernels also
 * give the gated output y * silu(z) (`y` of the result), recomputed on the way: over g (which is then spent)
 * where one state block walks all the states; else through draw's binding with dt_proj inside, or an 11th
 * binding where the adapter has one (`yBindingFree`). Otherwise `y` is null. */
export function fusedScanBackward(
  g: Tensor,
  x: Tensor,
  draw: Tensor | null,
  dBC: Tensor,
  A_log: Tensor,
  ph: Tensor,
  z: Tensor | null,
  a: FusedAttrs,
  gzInto: Tensor | null = null,
  emitY = false,
): FusedGrads {
  // ph the parameters alone (phForBackward): the chunk states again first
  checkAllStates(ph, "fusedScanBackward");
  const full = statesDropped.has(ph.storage) ? statesAgain(x, draw, dBC, ph, z, a) : null;
  try {
    return backwardKernels(g, x, draw, dBC, A_log, full ?? ph, z, a, gzInto, emitY);
  } finally {
    full?.dispose();
  }
}

/** fusedScanBackward from a full `ph` (the parameters and every chunk's state). */
function backwardKernels(
  g: Tensor,
  x: Tensor,
  draw: Tensor | null,
  dBC: Tensor,
  A_log: Tensor,
  ph: Tensor,
  z: Tensor | null,
  a: FusedAttrs,
  gzInto: Tensor | null,
  emitY: boolean,
): FusedGrads {
  if (emitY && !z) throw new Error("fusedScanBackward: emitY needs a gated scan (z)");
  if (emitY && g.shape.join() !== x.shape.join()) {
    throw new Error(`fusedScanBackward: g ${fmt(g.shape)} must be x's shape ${fmt(x.shape)}`);
  }
  const { B, L, ED, v, u, chunked: parallel } = sizes(x, dBC, a, z, ranWith.get(ph.storage));
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

  // chunk-parallel: gpar rows per chunk, and the chain's lam carries (B, ED, chunks, N) and sums of dt
  // (B, ED, chunks) after them in gred; walked in order where these would take more than half a binding
  // window
  const cells = B * ED * u.chunks;
  const chunked = parallel && 4 * cells * (gparWidth(N, Ri, true) + N + 1) <= windowBytes() / 2;
  const GP = gparWidth(N, Ri, chunked); // a gpar row: [dbias, dD, dA (N), the lam carry (N) unless chunked, dW]
  // lam carries folded by each chunk itself (MAX_CHUNKS_FOLDED); either way of the forward left the true
  // chunk states in hs
  const folded = chunked && foldsCarries(u.chunks, v.Lc);
  const gparSize = B * ED * GP * (chunked ? u.chunks : 1);
  // partials of one time step, as the budget counts them (the few dt columns ride along, so that they do not
  // split time into more segments than the B and C columns alone would)
  const stepBytes = 4 * B * slots * 2 * N;
  // ... and within one binding window, so that gred takes one binding (dispatch splits larger buffers)
  const fit = windowBytes() - 4 * (gparSize + (chunked ? cells * (N + 1) : 0));
  const budget = Math.min(partialBudget ?? Math.max(4 << 20, 4 * x.size), Math.floor((fit * 2 * N) / PW));
  const segChunks = Math.max(1, Math.min(u.chunks, Math.floor(budget / stepBytes / v.Lc)));
  const segSteps = Math.min(L, segChunks * v.Lc);
  const gbcSize = B * segSteps * slots * PW;
  // the sums pass reads the partials V columns at a time (Q groups of B and C, PQ per partial row)
  const S = dBC.shape[2]; // row stride of dBC and its gradient (R + 2N, or more with padding)
  const V = PW % 4 === 0 && (2 * N) % 4 === 0 ? 4 : 1;
  const [Q, PQ] = [(2 * N) / V, PW / V];
  const gparRows = B * (chunked ? u.chunks : 1); // gpar's rows: per b, or per b and chunk
  // summed by a reduction pass first where they are many (then the sums kernel reads one row)
  const presum = gparRows > presumRows();
  const sumsB = presum ? 1 : gparRows;
  const trips = sumsLoopTrips({ R: a.R, S, slots, Q, V, dt: Ri > 0, params: true, B: sumsB });
  if (trips > 65535 && deviceInfo().isFallbackAdapter) {
    throw new Error(
      `fusedScan backward: summing over ${slots} channel slots and ${sumsB} batch rows (B ${B}, ED ${ED}, ` +
        `N ${N}) would loop ${trips} times per invocation, past the 65535 a software adapter runs (GPUs have ` +
        "no such limit; here, scan: 'pscan', or fewer channels or batch rows)",
    );
  }
  const gx = Tensor.empty(x.shape); // gx: (B, L, ED)
  const blocks = stateBlocks(v);
  // where the kernels write the gated y (YOut); nowhere: the caller reruns the forward for it
  const free = emitY && (Ri > 0 || yBindingFree(x, z!)); // draw's binding, or an 11th (z: emitY needs it)
  const yOut: YOut | null = !emitY
    ? null
    : blocks.length === 1 && (yOverG || !free)
    ? "g"
    : free
    ? "yg"
    : null;
  const yg = yOut === "yg" ? Tensor.empty(x.shape) : null; // yg: (B, L, ED)
  // ddraw: with dt_proj inside, the kernels consume it themselves (dW and the dt columns); only state blocks
  // before the last leave their shares there, so one block needs no tensor (a scratch word is bound)
  const gdraw = Tensor.empty(Ri && blocks.length === 1 ? [1] : x.shape); // gdraw: (B, L, ED) or a scratch word
  // gz: written straight into `gzInto` (the whole gradient of a wide z, laid out as z) when autograd offers
  // it, else its own (B, L, ED)
  const gz = gzInto ?? Tensor.empty(z ? x.shape : [1]); // gz: (B, L, ED), z's window, or (ungated) scratch
  const gzLayout = gzInto ? { gzS: u.zS, gz0: u.z0 } : { gzS: ED, gz0: 0 };
  // gred: [partials of a segment | gpar | chunk-parallel: lam carries, sums of dt]
  const [lamOff, sdtOff] = [gbcSize + gparSize, gbcSize + gparSize + cells * N];
  const gred = Tensor.empty([gbcSize + gparSize + (chunked ? cells * (N + 1) : 0)]);
  const gdBC = Tensor.empty(dBC.shape); // gdBC: (B, L, R + 2N), or wider (zeros past R + 2N)
  const bufs = {
    ...scanInputs(x, draw, dBC, ph, z),
    g: g.storage,
    gx: gx.storage,
    gdraw: gdraw.storage,
    gz: gz.storage,
    gred: gred.storage,
    ...(yg ? { yg: yg.storage } : {}),
  };
  const hsOff = ph.size - B * ED * u.chunks * N;
  Object.assign(u, initOf(ph)); // the first chunk starts from h0 where the forward did
  if (chunked) {
    // every chunk's lam carry from a zero carry, and its sum of dt; the chain down the chunks leaves in
    // place of each the carry into its chunk
    const cu = { ...u, N, hsOff, locOff: lamOff, sdtOff };
    const groups = B * u.tiles * u.chunks;
    for (const block of blocks) {
      dispatch(localKernel(v, block, Ri, "bwd"), { ...bufs, out: gred.storage }, cu, groups);
    }
    // with few chunks, each main workgroup folds its own carry (MAX_CHUNKS_FOLDED)
    if (!folded) {
      dispatchChain("bwd", { ph: ph.storage, out: gred.storage }, cu, B * ED * N, u.chunks);
    }
  }
  // Each dispatch walks its steps at most four times (sub-chunk states, recompute, reverse, dB/dC sums): at
  // most MAX_STEPS / 2 steps, so no invocation loops 65535 times (a chunk-parallel one walks one chunk). Short
  // chunks take fewer: each chunk's loops also count their entries and exits, about 5 Lc + 2 SUB + 6
  // iterations in all (at Lc 1, 8192 chunks were 70000 and more: a dispatch stopped short, silently).
  const sub = v.Lc / (v.Ls ?? v.Lc);
  const perChunk = 5 * v.Lc + 2 * sub + 6;
  const per = chunked
    ? u.chunks
    : Math.max(1, Math.min(Math.floor(MAX_STEPS / 2 / v.Lc), Math.floor((3 * MAX_STEPS) / perChunk)));
  // The parameter gradients (summed over the batch in the last segment's sums dispatch, from gpar (B, ED, GP)
  // at the end of gred).
  const gbias = Tensor.empty([ED]);
  const gD = Tensor.empty([ED]);
  const gAlog = Tensor.empty([ED, N]);
  const gW = Ri ? Tensor.empty([ED, Ri]) : null;
  // Without dW the kernel still binds a `gw`: a scratch word (writable bindings must not alias).
  const gwOut = gW ?? Tensor.empty([1]);
  const sumBufs = {
    part: gred.storage,
    gdbc: gdBC.storage,
    gpar: gred.storage,
    alog: A_log.storage,
    gbias: gbias.storage,
    gd: gD.storage,
    galog: gAlog.storage,
    gw: gwOut.storage,
  };
  for (let c1 = u.chunks; c1 > 0; c1 -= segChunks) {
    const c0 = Math.max(0, c1 - segChunks);
    const segStart = c0 * v.Lc;
    const segLen = Math.min(L, c1 * v.Lc) - segStart;
    if (sg && sg.minSize !== sg.maxSize) {
      recordClear(gred.storage.buffer, 0, 4 * B * segLen * slots * PW);
    }
    for (let t1 = c1; t1 > c0; t1 -= per) {
      const t0 = Math.max(c0, t1 - per);
      const uni = {
        ...u,
        ...gzLayout,
        t0,
        t1,
        hsOff,
        gparOff: gbcSize,
        slots,
        slotsPerTile,
        segStart,
        segLen,
        pc: t1 - t0,
        lamOff,
        sdtOff,
      };
      // state blocks one after another: each adds its share of dx, ddelta, dz (the first sums dD, the last dbias)
      const groups = B * u.tiles * (chunked ? t1 - t0 : 1);
      for (const block of blocks) {
        dispatch(backwardKernel(v, block, Ri, chunked, folded, yOut), bufs, uni, groups);
      }
    }
    // partials (B, segLen, slots, PW) -> gdBC[:, segStart..segStart+segLen, :]; the last segment (c0 = 0) also
    // sums the parameter gradients
    const n = B * segLen;
    const params = c0 === 0;
    // gparSum: (ED, GP), gpar summed over its rows (chunk-parallel rows: no lam carry columns)
    const gparSum = params && presum ? reduceRun(gred, 1, gparRows, ED * GP, "sum", { from: gbcSize }) : null;
    const su = {
      n,
      L,
      S,
      R: a.R,
      slots,
      segStart,
      segLen,
      Q,
      PQ,
      params: +params,
      B: sumsB,
      ED,
      N,
      off: gparSum ? 0 : gbcSize,
      Ri,
      lamCols: GP - (N + 2 + Ri),
    };
    const invocations = sumsInvocations(n, params, ED, N, Ri);
    const sumsIn = gparSum ? { ...sumBufs, gpar: gparSum.storage } : sumBufs;
    dispatch(sumsKernel(V, Ri > 0), sumsIn, su, Math.ceil(invocations / 64));
    gparSum?.dispose();
  }
  if (!gW) gwOut.dispose();
  gred.dispose();
  if (!z) gz.dispose();
  const y = yOut === "g" ? new Tensor(g.storage, x.shape, "f32") : yg; // y: (B, L, ED)
  return { gx, gdraw, gW, gdBC, gbias, gAlog, gD, gz: z && !gzInto ? gz : null, y };
}
