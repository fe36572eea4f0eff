/**
 * A seeded randomized test of the fused selective scan's kernel variants: each case picks a random
 * `FusedVariant` that `setFusedVariant` accepts on this adapter (channels per workgroup WG, chunk length Lc,
 * sub-chunk length Ls, states per block Nb, recomputed states in private or workgroup memory, dB/dC summed
 * through workgroup memory or subgroup operations, steps per barrier S, B/C rows shared by subgroupShuffle,
 * lanes per channel, chunks walked in parallel) and a random call (batch, length, channels, state size, dt
 * rank, gate, dt_proj inside the op, z as a column window of a wider tensor, z's gradient already holding
 * another op's share, dBC with padding columns, the backward walked in time segments, out_proj in the op:
 * fusedMambaScanOut, 10 storage buffers per stage as Chrome exposes, the parameter gradients' rows summed by
 * a reduction pass first or in the sums kernel, the chain of chunks walked in order or in runs, the chunk
 * states kept by the op or worked out again in the backward, the chunk-parallel forward walking several
 * chunks per workgroup: Lf), and checks
 * the fused op against the autograd composition over the sequential scan (`compare` in fused_cases.ts: y and
 * every gradient within the op bound), that the fused kernels that ran are the variant's, and that nothing
 * stays live after the case.
 *
 * The tuner (scan/tune_fused.ts) picks variants per adapter; on GPUs it is expected to pick what lavapipe's
 * default never runs (states in workgroup memory, subgroup sums, shuffles, lanes), so where the adapter has
 * subgroups most cases use them (see PROFILES). Lengths are drawn around the chunk length (1, Lc - 1, Lc,
 * Lc + 1 and the same around 2 Lc or 3 Lc), channel counts around the channels of one workgroup (WG / lanes)
 * as well as at random. Where the subgroup size is fixed, some cases pretend that it varies (as on Intel's
 * 8-32 or AMD's 32-64): the kernels then leave some partial rows unwritten and no shuffle or lanes apply.
 *
 * Cases are stratified as in model_fuzz_test.ts: each dimension cycles through a seeded shuffle of its values,
 * so every value of every dimension occurs within the first |values| cases (at most 11), in random
 * combinations; values that depend on others (Nb on N, Ls on Lc, L on Lc, ED on WG) are drawn from the case's
 * own generator. Case i depends only on the seed and i, not on the number of cases. Kernels whose lavapipe
 * compile takes seconds are avoided (at most 256 floats of recomputed states per invocation, at most 17 state
 * blocks): see `COMPILE` below.
 *
 * Agreement is compare's: the op bound, 1e-5 relative to max(1, max |ref|), for y and every gradient, and
 * for the per-channel parameters (sums over B L steps) relative to at least the size of their terms
 * (`cancellationFloor`: their largest value under a cotangent with random signs). Without that floor, over
 * 600 cases (seeds 1-10, 60 each) on lavapipe, y and the per-element gradients came to 1.3e-6 at worst and
 * the parameters 3.1e-6 but for one: dbias 9.6e-6 at seed 1 case 0 (ED 1, 603 steps whose terms add up to
 * 579 in size and cancel to 1.88: the fused scan 6.5e-6 and the reference 3.2e-6 from float64, on opposite
 * sides), rounding within a hair of the bound that another adapter could pass. With it, seed 1's worst is
 * 8.6% of the bound (A_log). A dropped or doubled step is still about 1e5 / sqrt(B L) times the bound. Two
 * mutations of the kernels checked that the test finds what it is for: the backward's last sub-chunk walking
 * past the chunk's end (28 of seed 1's 60 cases fail) and shuffled workgroups halved to part of a subgroup at
 * few channels (3 of seed 1's cases, 1 of seed 2's).
 *
 * Environment (all optional):
 * - FUSED_FUZZ_SEED: the seed (default 1);
 * - FUSED_FUZZ_CASES: the number of cases (default 60);
 * - FUSED_FUZZ_CASE: run only case i of the seed, e.g. to reproduce a failure (its message names it);
 * - FUSED_FUZZ_PRINT=1: print each case's variant and shape as JSON before it runs;
 * - MAMBA_TOL_REPORT=1 (fixture_util.ts): print every comparison's relative error.
 *
 * Cost (lavapipe, 2 cores): about 20 s for the default 60 cases once Mesa's shader cache holds their kernels
 * (twice that with another job on the cores), 80 s to 140 s with an empty cache: each case's variant compiles
 * its own forward and backward kernels, one per state block and inline dt rank, so another seed compiles
 * new kernels.
 * @module
 */

import { AssertionError } from "node:assert/strict";
import { fixedSubgroupSize, init } from "../core/device.ts";
import { memory } from "../core/memory.ts";
import {
  setFusedChainRuns,
  setFusedPartialBudget,
  setFusedPresumRows,
  setFusedStateSaving,
  setMaxChunksFolded,
  yBindingFree,
} from "../scan/fused_run.ts";
import {
  type FusedVariant,
  MAX_CHUNKS_CHAINED,
  MAX_INLINE_DT_RANK,
  setFusedVariant,
  stateBlocks,
  stepsPerBarrier,
} from "../scan/fused_variant.ts";
import { type Case as ScanCase, compare } from "./fused_cases.ts";
import { caseIndices, env, fusedUnavailable, hash, intEnv, kernelsRun, rng, stratified } from "./helpers.ts";

const info = await init();
const noFused = fusedUnavailable();

const SEED = intEnv("FUSED_FUZZ_SEED", 1);
const CASES = intEnv("FUSED_FUZZ_CASES", 60);
const PRINT = env("FUSED_FUZZ_PRINT") === "1";

// ------------------------------------------------------------------------------------------ cases

type Variant = Omit<FusedVariant, "N">;

/** One random variant and call. */
interface Case {
  index: number;
  /** The inputs' seed (fused_cases.ts `inputs`). */
  seed: number;
  variant: Variant;
  scan: ScanCase;
  /** The backward walks time in segments of one chunk (setFusedPartialBudget(1)). */
  segments: boolean;
  /** Pretend the subgroup size varies (maxSize 4x the real one). */
  varying: boolean;
  /** Chunks in parallel: their carries chained by a dispatch (setMaxChunksFolded(0)), not folded by each. */
  chained: boolean;
  /** Runs per chain of the chain kernels (setFusedChainRuns): 1 walks the chunks in order. */
  chainRuns: number;
  /** The adapter's storage buffers per stage taken for 10, as Chrome exposes (the gated y's own binding is
   * then not free: fusedScanBackward writes it over g, or the forward kernel runs again). */
  tenBuffers: boolean;
  /** The parameter gradients' rows summed by core's reduction before the sums kernel
   * (setFusedPresumRows(0)), as GPUs do where there are many chunks. */
  presum: boolean;
  /** The op saves the parameters alone and the backward works the chunk states out again
   * (setFusedStateSaving("recompute"), as where N > 2 Lc); else it keeps them ("keep"). */
  statesAgain: boolean;
}

/** Lavapipe's compile time grows steeply with a kernel's private arrays and its unrolled state loops (see
 * defaultFusedVariant: N = 16, 2.0 s at 256 floats of recomputed h, 7.1 s at 512), and each state block is its
 * own pipeline: keep every case's kernels within these. */
const COMPILE = { heldStates: 256, boundaryStates: 256, blocks: 17 };

/** How a case's backward keeps states and sums dB/dC (filtered by what the adapter allows). The GPU's
 * likely choices (subgroup sums, states in workgroup memory, shuffles, lanes) are most of them. */
interface Profile {
  reduce: "workgroup" | "subgroup";
  hbuf: "private" | "workgroup";
  shuffle?: boolean;
  lanes?: boolean;
}
const PROFILES: Profile[] = [
  { reduce: "workgroup", hbuf: "private" },
  { reduce: "workgroup", hbuf: "workgroup" },
  { reduce: "subgroup", hbuf: "private" },
  { reduce: "subgroup", hbuf: "workgroup" },
  { reduce: "subgroup", hbuf: "workgroup" },
  { reduce: "subgroup", hbuf: "private", shuffle: true },
  { reduce: "subgroup", hbuf: "workgroup", shuffle: true },
  { reduce: "workgroup", hbuf: "workgroup", shuffle: true },
  { reduce: "subgroup", hbuf: "private", lanes: true },
  { reduce: "subgroup", hbuf: "workgroup", lanes: true },
  { reduce: "subgroup", hbuf: "workgroup", lanes: true },
];

/** Whether a profile can run on the adapter (with the subgroup size fixed or, `varying`, pretended not). */
function profileFits(p: Profile, varying: boolean): boolean {
  if (p.reduce === "subgroup" && !info.subgroups) return false;
  return !((p.shuffle || p.lanes) && (varying || fixedSubgroupSize() === null));
}

// The values of each dimension (see the header). L and ED are categories resolved against Lc and WG.
const POOLS = {
  N: [1, 2, 3, 4, 5, 8, 12, 16, 17, 24, 32],
  profile: PROFILES.map((_, i) => i),
  lc: ["1", "2-7", "8-31", "pow2", "32-128", "any"],
  twoLevel: [false, true],
  blocks: ["whole", "split", "any"],
  wg: ["1", "3", "small", "subgroups", "any"],
  S: ["default", "default", "1", "2-4"],
  B: [1, 2, 3],
  L: ["1", "2-9", "Lc-1", "Lc", "Lc+1", "kLc-1", "kLc", "kLc+1", "any"],
  ED: ["1-3", "cpw-1", "cpw", "cpw+1", "any", "any"],
  R: [0, 1, 2, 3, 4, 8, 9],
  gated: [false, true],
  z: ["plain", "window", "timesY"],
  dtWeight: [false, true],
  dBCPad: [false, true], // with dt_proj inside: R + 2N padded to the next multiple of 4, as MambaBlock pads
  outProj: ["none", "residual", "bias", "plain"] as const, // with dtWeight and the gate (not z*y): fusedMambaScanOut
  segments: [false, false, true],
  varying: [false, false, false, true],
  chunked: [false, true],
  chained: [false, true],
  chainRuns: [1, 2, 4, 64],
  tenBuffers: [false, false, true],
  presum: [false, false, true],
  statesAgain: [false, false, true],
  walk: [1, 1, 2, 3, 5], // chunks per walk of the chunk-parallel forward (Lf / Lc), fewer than the chunks
};

const divisors = (n: number) => Array.from({ length: n }, (_, k) => k + 1).filter((d) => n % d === 0);

/** Whether setFusedVariant accepts v for N (it throws on a variant that does not fit), and lavapipe compiles
 * it in reasonable time. Leaves N's variant unset. */
function accepted(N: number, v: Variant): boolean {
  const blocks = stateBlocks({ N, ...v });
  const Nb = blocks[0].Nb; // the largest
  const Ls = v.Ls ?? v.Lc;
  if (
    Ls * Nb > COMPILE.heldStates || (v.Lc / Ls - 1) * Nb > COMPILE.boundaryStates ||
    blocks.length > COMPILE.blocks
  ) return false;
  try {
    setFusedVariant(N, v);
    return true;
  } catch {
    return false;
  } finally {
    setFusedVariant(N, null);
  }
}

/** A variant for state size N drawn from the case's stratified choices, redrawn (from r) until it fits. */
function makeVariant(
  N: number,
  pick: <K extends keyof typeof POOLS>(k: K, dim: number) => (typeof POOLS)[K][number],
  r: () => number,
  varying: boolean,
): Variant {
  const int = (lo: number, hi: number) => lo + Math.floor(r() * (hi - lo + 1));
  const any = <T>(xs: readonly T[]) => xs[Math.floor(r() * xs.length)];
  const SG = info.subgroups?.maxSize ?? 1;
  for (let attempt = 0; attempt < 2000; attempt++) {
    // the stratified choice first, then (it did not fit) random ones
    const first = attempt < 50;
    let profile = PROFILES[first ? pick("profile", 20) : int(0, PROFILES.length - 1)];
    if (!profileFits(profile, varying)) {
      // the nearest that fits: drop lanes / shuffle, then subgroup sums
      profile = { reduce: profile.reduce, hbuf: profile.hbuf };
      if (!profileFits(profile, varying)) profile = { reduce: "workgroup", hbuf: profile.hbuf };
    }
    const lcKind = first ? pick("lc", 21) : any(POOLS.lc);
    const Lc = lcKind === "1"
      ? 1
      : lcKind === "2-7"
      ? int(2, 7)
      : lcKind === "8-31"
      ? int(8, 31)
      : lcKind === "pow2"
      ? 2 ** int(1, 7)
      : lcKind === "32-128"
      ? int(32, 128)
      : int(1, 128);
    const twoLevel = first ? pick("twoLevel", 22) : r() < 0.5;
    const subs = divisors(Lc).filter((d) => d < Lc);
    const Ls = twoLevel && subs.length ? any(subs) : Lc;
    const blocks = first ? pick("blocks", 23) : any(POOLS.blocks);
    // any block size: one that does not divide N gives blocks of two sizes (N 17 at Nb 10: 9 + 8)
    const Nb = blocks === "whole" ? N : blocks === "split" && N > 1 ? int(1, N - 1) : int(1, N);
    const sizes = stateBlocks({ N, Nb, Lc: 1, WG: 1 }).map((b) => b.Nb);
    const lanes = profile.lanes
      ? any([2, 4, 8, 16, 32].filter((p) => p <= SG && sizes.every((n) => n % p === 0)))
      : undefined;
    const wgKind = first ? pick("wg", 24) : any(POOLS.wg);
    const whole = profile.shuffle || lanes; // whole subgroups per workgroup
    const multiples = [1, 2, 3, 4, 5, 6, 7, 8].map((k) => k * SG).filter((w) => w <= 64);
    const WG = whole || wgKind === "subgroups"
      ? any(multiples)
      : wgKind === "1"
      ? 1
      : wgKind === "3"
      ? 3
      : wgKind === "small"
      ? any([1, 2, 3, 4, 5, 7])
      : any([1, 3, 8, 16, 32, 64, ...multiples]);
    if (profile.lanes && lanes === undefined) continue; // Nb has no power-of-two divisor: redraw
    const v: Variant = {
      WG,
      Lc,
      ...(Ls < Lc ? { Ls } : {}),
      ...(Nb < N ? { Nb } : {}),
      hbuf: profile.hbuf,
      reduce: profile.reduce,
      ...(profile.shuffle ? { shuffle: true } : {}),
      ...(lanes ? { lanes } : {}),
      ...((first ? pick("chunked", 26) : r() < 0.5) ? { chunkParallel: true } : {}),
    };
    // steps per barrier (workgroup sums only): at most what fits with the dt terms of dt_proj inside
    if (v.reduce === "workgroup") {
      const sKind = first ? pick("S", 25) : any(POOLS.S);
      const fit = stepsPerBarrier({ N, ...v }, sizes[0], 2 * sizes[0] + MAX_INLINE_DT_RANK);
      if (sKind === "1") v.S = 1;
      else if (sKind === "2-4" && fit >= 2) v.S = int(2, Math.min(4, fit));
    }
    if (accepted(N, v)) return v;
  }
  throw new Error(`no variant fits N = ${N} on this adapter`);
}

function makeCase(seed: number, index: number): Case {
  const pick = <K extends keyof typeof POOLS>(k: K, dim: number) =>
    stratified(POOLS[k] as readonly (typeof POOLS)[K][number][], seed, dim, index);
  const r = rng(hash(seed, 1000, index));
  const int = (lo: number, hi: number) => lo + Math.floor(r() * (hi - lo + 1));
  const N = pick("N", 0);
  const varying = pick("varying", 16) && fixedSubgroupSize() !== null;
  const real = info.subgroups;
  if (varying) info.subgroups = { ...real!, maxSize: 4 * real!.maxSize };
  let variant: Variant;
  try {
    variant = makeVariant(N, pick, r, varying);
  } finally {
    info.subgroups = real;
  }
  const { Lc } = variant;
  const lkind = pick("L", 3);
  const k = int(2, Math.max(2, Math.min(3, Math.floor(299 / Lc))));
  const lengths: Record<string, () => number> = {
    "1": () => 1,
    "2-9": () => int(2, 9),
    "Lc-1": () => Lc - 1,
    Lc: () => Lc,
    "Lc+1": () => Lc + 1,
    "kLc-1": () => k * Lc - 1,
    kLc: () => k * Lc,
    "kLc+1": () => k * Lc + 1,
    any: () => int(1, 300),
  };
  const L = Math.max(1, Math.min(300, lengths[lkind]()));
  // the chunk-parallel forward's walks of G chunks: at least two walks, so that the forward walks in parallel
  const G = Math.min(pick("walk", 33), Math.ceil(L / Lc) - 1);
  if (variant.chunkParallel && G >= 2) variant = { ...variant, Lf: G * Lc };
  const cpw = Math.max(1, variant.WG / (variant.lanes ?? 1)); // channels per workgroup (before any halving)
  const edKind = pick("ED", 4);
  const widths: Record<string, () => number> = {
    "1-3": () => int(1, 3),
    "cpw-1": () => cpw - 1,
    cpw: () => cpw,
    "cpw+1": () => cpw + 1,
    any: () => int(1, 70),
  };
  const ED = Math.max(1, Math.min(70, widths[edKind]()));
  const gated = pick("gated", 6);
  const zKind = gated ? pick("z", 7) : "plain"; // a window needs the gate (zStart reads z)
  const zWindow = zKind === "window"
    ? (() => {
      const width = ED + int(1, ED + 4);
      return { width, start: int(0, width - ED) };
    })()
    : zKind === "timesY"
    ? { width: 2 * ED, start: int(0, ED) } // sum(cat(y, y) * z): z twice as wide as y
    : undefined;
  const dtWeight = pick("dtWeight", 8);
  // padding columns only with dt_proj inside: fusedSelectiveScan reads the dt rank off dBC's width
  const padded = dtWeight && pick("dBCPad", 9);
  const R = pick("R", 5);
  const dBCPad = padded ? (4 - ((R + 2 * N) % 4)) % 4 : 0; // 0 where R + 2N is a multiple of 4 already
  // out_proj in the op too: its backward writes the recomputed gated y (`yg`) for out_proj's weight gradient
  const outProj = dtWeight && gated && zKind !== "timesY" ? pick("outProj", 28) : "none";
  const scan: ScanCase = {
    B: pick("B", 2),
    L,
    ED,
    N,
    R,
    gated,
    ...(zWindow ? { zWindow } : {}),
    ...(zKind === "timesY" ? { zTimesY: true } : {}),
    ...(dtWeight ? { dtWeight } : {}),
    ...(dBCPad ? { dBCPad } : {}),
    ...(outProj !== "none" ? { outProj } : {}),
  };
  return {
    index,
    seed: 1 + (hash(seed, index) % 100_000),
    variant,
    scan,
    segments: pick("segments", 10),
    varying,
    chained: !!variant.chunkParallel && pick("chained", 27),
    chainRuns: pick("chainRuns", 31),
    tenBuffers: pick("tenBuffers", 29),
    presum: pick("presum", 30),
    statesAgain: pick("statesAgain", 32),
  };
}

function describe(c: Case): string {
  const v = c.variant;
  const s = c.scan;
  const variant = `WG ${v.WG} Lc ${v.Lc}${v.Ls ? `/${v.Ls}` : ""}${v.Nb ? ` Nb ${v.Nb}` : ""} ${
    v.hbuf === "workgroup" ? "wgmem" : "private"
  } ${v.reduce === "subgroup" ? "sg" : `wg${v.S ? ` S ${v.S}` : ""}`}${v.shuffle ? " shuffle" : ""}${
    v.lanes ? ` lanes ${v.lanes}` : ""
  }${
    v.chunkParallel
      ? ` chunked${c.chained ? ` chained${c.chainRuns > 1 ? ` in ${c.chainRuns} runs` : ""}` : ""}`
      : ""
  }${c.varying ? " varying-sg" : ""}${c.segments ? " segments" : ""}${c.tenBuffers ? " 10-buffers" : ""}${
    c.presum ? " presum" : ""
  }${c.statesAgain ? " states-again" : ""}${v.Lf ? ` Lf ${v.Lf}` : ""}`;
  const shape = `B ${s.B} L ${s.L} ED ${s.ED} N ${s.N} R ${s.R}${s.gated ? " gated" : ""}${
    s.dtWeight ? " dt_proj" : ""
  }${s.zWindow ? ` z ${s.zWindow.start}+${s.ED}/${s.zWindow.width}` : ""}${s.zTimesY ? " z*y" : ""}${
    s.dBCPad ? ` pad ${s.dBCPad}` : ""
  }${s.outProj ? ` out_proj ${s.outProj}` : ""}`;
  return `${variant} | ${shape}`;
}

// ------------------------------------------------------------------------------------------ checks

/** Asserts that the fused kernels that ran (forward and backward, every state block) are the variant's. */
function assertVariantRan(kernels: readonly string[], c: Case): void {
  const { N } = c.scan;
  const v = c.variant;
  const Ls = v.Ls ?? v.Lc;
  const fused = [...new Set(kernels.filter((k) => /^fused_scan_(fwd|bwd)_N\d/.test(k)))]; // not the reductions
  // chunks in parallel where the variant asks and there are several (the cases have few enough to chain); the
  // forward walks chunks of Lf (several where L > Lf), the backward of Lc
  const G = (v.Lf ?? v.Lc) / v.Lc;
  const chunkedIn = {
    fwd: !!v.chunkParallel && c.scan.L > G * v.Lc,
    bwd: !!v.chunkParallel && c.scan.L > v.Lc,
  };
  for (const pass of ["fwd", "bwd"] as const) {
    for (const { n0, Nb } of stateBlocks({ N, ...v })) {
      const block = Nb === N ? "" : `_Nb${Nb}_n${n0}`;
      const head = `fused_scan_${pass}_N${N}${block}_Lc${v.Lc}${
        pass === "bwd" && Ls < v.Lc ? `_Ls${Ls}` : ""
      }${pass === "fwd" && chunkedIn.fwd && G > 1 ? `_Lf${G * v.Lc}` : ""}_WG`;
      if (!fused.some((k) => k.startsWith(head))) {
        throw new AssertionError({ message: `no ${head}* kernel ran (fused kernels: ${fused})` });
      }
    }
  }
  // the backward's chunk states worked out again: the forward's local kernels and a chain, whatever the variant
  // (a walk per chunk)
  const again = c.statesAgain && c.scan.L > v.Lc;
  for (const pass of ["fwd", "bwd"] as const) {
    const chunked = chunkedIn[pass];
    const local = chunked || (pass === "fwd" && again);
    if (kernels.some((k) => k.startsWith(`fused_scan_local_${pass}_`)) !== local) {
      throw new AssertionError({ message: `${pass}: ${local ? "no" : "unexpected"} chunk-local kernel` });
    }
    // carries chained by a dispatch, or folded by the main kernels (the cases have few enough chunks)
    const chain = `fused_scan_chain_${pass}${c.chainRuns > 1 ? `_seg${c.chainRuns}` : ""}`;
    const ranChains = kernels.filter((k) =>
      k.startsWith(chain) && /^fused_scan_chain_(fwd|bwd)(_seg\d+)?(_G\d+)?$/.test(k)
    );
    const want = [
      ...(chunked && c.chained ? [`${chain}${pass === "fwd" && G > 1 ? `_G${G}` : ""}`] : []),
      ...(pass === "fwd" && again ? [chain] : []),
    ];
    if ([...new Set(ranChains)].sort().join() !== [...new Set(want)].sort().join()) {
      throw new AssertionError({ message: `${pass}: chains ${[...new Set(ranChains)]}, expected ${want}` });
    }
  }
  const inside = c.scan.R >= 1 && c.scan.R <= MAX_INLINE_DT_RANK;
  const oneBlock = stateBlocks({ ...v, N: c.scan.N }).length === 1;
  for (const k of fused) {
    const bwd = k.startsWith("fused_scan_bwd_");
    // each option's token in the name, present exactly when the variant has it
    const want: [string, boolean][] = [
      ["_shuf", !!v.shuffle],
      ["_chunked", chunkedIn[bwd ? "bwd" : "fwd"]],
      // the backward writes the gated y where out_proj is in the op: over g (one state block), else into
      // draw's binding (dt_proj inside, R 1..8) or an 11th
      ["_y", bwd && !!c.scan.outProj && (oneBlock || inside || yBindingFree())],
      ["_y_g", bwd && !!c.scan.outProj && oneBlock],
      ["_folded", chunkedIn[bwd ? "bwd" : "fwd"] && !c.chained],
      [(v.lanes ?? 1) > 1 ? `_lanes${v.lanes}` : "_lanes\\d+", (v.lanes ?? 1) > 1],
      ...(bwd
        ? [["_sg", v.reduce === "subgroup"], ["_wgmem", v.hbuf === "workgroup"]] as [string, boolean][]
        : []),
    ];
    for (const [token, on] of want) {
      if (new RegExp(`${token}(_|$)`).test(k) !== on) {
        throw new AssertionError({ message: `${k}: ${on ? "no" : "unexpected"} ${token}` });
      }
    }
  }
}

async function runCase(c: Case): Promise<void> {
  if (PRINT) console.log(`fused variant fuzz case ${c.index}: ${JSON.stringify(c)}`);
  const { N } = c.scan;
  const real = info.subgroups;
  const buffers = info.limits.maxStorageBuffersPerShaderStage;
  const before = memory();
  try {
    if (c.varying) info.subgroups = { ...real!, maxSize: 4 * real!.maxSize };
    if (c.tenBuffers) info.limits.maxStorageBuffersPerShaderStage = 10;
    setFusedVariant(N, c.variant);
    if (c.segments) setFusedPartialBudget(1); // one chunk per segment
    setMaxChunksFolded(c.chained ? 0 : MAX_CHUNKS_CHAINED); // folded whatever the chunk length
    setFusedPresumRows(c.presum ? 0 : Infinity);
    setFusedChainRuns(c.chainRuns);
    setFusedStateSaving(c.statesAgain ? "recompute" : "keep");
    const { kernels } = await kernelsRun(() => compare(c.scan, c.seed, { cancellationFloor: true }));
    assertVariantRan(kernels, c);
    const now = memory();
    if (now.liveTensors !== before.liveTensors || now.liveBytes !== before.liveBytes) {
      throw new AssertionError({
        message: `leak: ${now.liveTensors - before.liveTensors} tensors, ${
          now.liveBytes - before.liveBytes
        } bytes live after the case disposed everything it made`,
      });
    }
  } catch (e) {
    const message = e instanceof Error ? e.message : String(e);
    throw new AssertionError({
      message: `fused variant fuzz case ${c.index} (FUSED_FUZZ_SEED=${SEED} FUSED_FUZZ_CASE=${c.index}): ` +
        `${message}\ncase: ${JSON.stringify(c)}`,
    });
  } finally {
    setFusedVariant(N, null);
    setFusedPartialBudget(null);
    setMaxChunksFolded(null);
    setFusedPresumRows(null);
    setFusedChainRuns(null);
    setFusedStateSaving(null);
    info.subgroups = real;
    info.limits.maxStorageBuffersPerShaderStage = buffers;
  }
}

for (const i of caseIndices("FUSED_FUZZ_CASE", CASES)) {
  const c = makeCase(SEED, i);
  Deno.test({
    name: `fused variant fuzz ${SEED}/${i}: ${describe(c)}`,
    ignore: noFused,
    fn: () => runCase(c),
  });
}
