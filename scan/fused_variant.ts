/**
 * The variants of the fused scan's kernels: their compile-time shape (states per block, chunk and sub-chunk
 * lengths, channels per workgroup, where the backward keeps recomputed states and how it sums over channels),
 * the default for a state size, and the one in use (set by the tuner, `tune_fused.ts`, from a one-time
 * measurement on the adapter).
 * @module
 */

import { deviceInfo, fixedSubgroupSize } from "../core/device.ts";

/** Compile-time shape of a fused-scan kernel. */
export interface FusedVariant {
  /** State size. */
  N: number;
  /** Most states per block (1 to N; default N up to 16, else the largest of ceil(N / 16) near-equal blocks:
   * 9 at N = 17, 16 at N = 64): N is walked in ceil(N / Nb) blocks of near-equal size (`stateBlocks`:
   * N = 17 at Nb = 16 is 9 + 8), each block its own pipeline (its offset and size compiled in) and dispatch,
   * walking all the steps (states outer, time inner, as the CUDA kernel does). Loops over a block's states are
   * unrolled, so code size and live registers grow with the block, not N; blocks after the first add their
   * share of y (and of dx, ddelta, dz) to what the earlier ones wrote; the last sums dbias over whole steps. */
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
   * barriers (every adapter), or with subgroup operations (no workgroup memory, no barriers; needs
   * `deviceInfo().subgroups`; the default where it has them): a butterfly of shuffles where `shuffle` or
   * `lanes` guarantee whole subgroups of one fixed size, else subgroupAdd. */
  reduce?: "workgroup" | "subgroup";
  /** Read each step's B and C row once per subgroup (lane j loads columns j, j + size, ...) and hand the
   * values to every lane with subgroupShuffle, instead of every lane loading all 2N (needs subgroups of
   * one fixed size). */
  shuffle?: boolean;
  /** Lanes per channel (a power of two dividing Nb, at most the subgroup size, which must be fixed; needs
   * subgroup sums; default 1): each walks Nb / lanes of the channel's states, and shuffles sum what a channel
   * sums over its states (C.h, dx, ddelta). More invocations for the same work, which a GPU needs at batch 1
   * (B x ED invocations otherwise, 1536 for mamba-130m), and fewer recomputed states per invocation; on a
   * CPU adapter it only adds work. */
  lanes?: number;
  /** Walk the chunks of time in parallel (default false): a workgroup per chunk of Lc steps instead of one
   * walking all L, for GPUs, where B x ED invocations (x lanes) each walking L steps in order leave the chip
   * idle at batch 1 and take L sequential steps. Each kernel first walks every chunk from a zero state (the
   * forward's h, the backward's carry of lam) and sums its dt; one invocation per (b, d, n) then chains the
   * chunks, the decay over a chunk being exp(A sum dt); then every chunk runs from its carry
   * (`fused_carry_kernels.ts`). One more walk of the steps and two more dispatches per kernel (one with few
   * chunks: the main kernels fold their carries, MAX_CHUNKS_FOLDED); the backward keeps its sums over time
   * per chunk. Where a backward has more than MAX_CHUNKS_CHAINED chunks, or its per-chunk sums would not fit
   * one binding, it walks time in order (a forward, where it has more than MAX_CHUNKS_CHAINED walks of Lf). */
  chunkParallel?: boolean;
  /** The chunk-parallel forward's walk length (a multiple of Lc, default Lc; needs `chunkParallel`): its local
   * walk and chain run over walks of Lf steps, and its main kernel walks each walk's chunks in order, storing
   * the state every Lc steps for the backward. Short chunks (a backward that keeps a chunk's states on chip: 9
   * steps on the H200) make the chunk states most of the forward's traffic: written by the local walk, read
   * and written by the chain, read by the main kernel, 4 N / Lc floats per channel and step. Walks of Lf leave
   * 3 N / Lf + N / Lc of that (the main kernel stores all states but a walk's last, which the chain wrote;
   * 4 N / Lf where no backward reads them), for Lf / Lc times fewer workgroups. The backward keeps chunks of
   * Lc. */
  Lf?: number;
}

/** Most links (the backward's chunks, the forward's walks of Lf steps) the chunk-parallel variant chains in one
 * invocation (its loop over them stays well within the 65535 iterations of software adapters); a call with
 * more walks time in order. */
export const MAX_CHUNKS_CHAINED = 16384;

/**
 * Most chunks (the forward's walks of Lf steps) whose carries the chunk-parallel main kernels fold themselves:
 * each workgroup walks the local results of the chunks before it (the forward) or after it (the backward)
 * instead of a chain dispatch computing every carry first. Two dispatches fewer per training step (each costs
 * a GPU's host about 20 µs). A call folds where its chunks are at most this and at most Lc / 2 + 1 (walks: Lf /
 * 2 + 1): a chunk's fold then averages at most
 * a quarter of its own walk's steps (a fold step costs about what a step of the walk does, an exp per state);
 * past that the chain's one walk over the chunks costs less.
 */
export const MAX_CHUNKS_FOLDED = 64;

/** dt_proj inside the kernels up to this rank: draw = dBC[t, :R] . W[d, :] computed per step (R multiply-adds,
 * the R dt values shared across lanes like B and C); larger R reads draw computed by a matmul. The backward's
 * last state block keeps R more terms per step in workgroup memory: variants must leave room for them. */
export const MAX_INLINE_DT_RANK = 8;

/** Longest chunk: the backward walks a chunk up to four times per dispatch, and a dispatch walks at least one
 * chunk, within the 65535 loop iterations of software adapters. */
const MAX_CHUNK = 8192;

/** One block of states, n0 .. n0 + Nb: what one pipeline of the fused kernels walks. */
export interface StateBlock {
  /** First state. */
  n0: number;
  /** States in the block. */
  Nb: number;
}

/** The state blocks of a variant, in order: N split into ceil(N / Nb) blocks whose sizes differ by at most
 * one, larger first (Nb dividing N: N / Nb blocks of Nb). */
export function stateBlocks(v: FusedVariant): StateBlock[] {
  const Nb = v.Nb ?? v.N;
  if (!(Number.isInteger(Nb) && Nb >= 1 && Nb <= v.N)) {
    throw new Error(`stateBlocks: Nb must be an integer from 1 to N = ${v.N}, got ${Nb}`);
  }
  const count = Math.ceil(v.N / Nb);
  const [size, extra] = [Math.floor(v.N / count), v.N % count];
  const blocks: StateBlock[] = [];
  for (let i = 0, n0 = 0; i < count; n0 += blocks[i++].Nb) {
    blocks.push({ n0, Nb: size + (i < extra ? 1 : 0) });
  }
  return blocks;
}

/** Steps per barrier pair of the backward in a block of Nb states (default the variant's largest): as many
 * as 16 KiB of workgroup memory holds, less the recomputed states kept there (hbuf "workgroup": WG x Ls x Nb
 * floats), at most 16 and at least 1; each step holds `cols` terms per channel (2 Nb, plus the
 * dt terms in the last state block). */
export function stepsPerBarrier(v: FusedVariant, Nb = stateBlocks(v)[0].Nb, cols = 2 * Nb): number {
  const budget = 16384 - (v.hbuf === "workgroup" ? 4 * v.WG * (v.Ls ?? v.Lc) * Nb : 0);
  return v.S ?? Math.max(1, Math.min(16, Math.floor(budget / (4 * v.WG * cols))));
}

/** The fixed subgroup size the `shuffle` option compiles in (throws where the size may vary). */
export function shuffleSize(): number {
  const size = fixedSubgroupSize();
  if (size === null) throw new Error("fused scan: `shuffle` needs subgroups of one fixed size");
  return size;
}

/** States per block by default: code size and live registers grow with Nb. */
const MAX_STATE_BLOCK = 16;
/** Floats of recomputed h one invocation holds by default (Ls x Nb). */
const MAX_HELD_STATES = 256;

const chosen = new Map<number, FusedVariant>();

/**
 * The default variant of a state size. States in blocks of at most 16 (Nb; N = 17 is 9 + 8), each block its
 * own pipeline, and at most 256 floats of recomputed h held per invocation (Ls x Nb, Ls at most 64):
 * lavapipe's first compile of the backward grows steeply with that private array (N = 16: 2.0 s at 256
 * floats, 7.1 s at 512, 25 s at 1024, about 4 minutes at 2048), and a GPU spills such arrays to slow local
 * memory. Chunks are max(64, 4N) steps rounded up to whole sub-chunks of Ls, at most 16 of them, so the saved states, 4 ED N / Lc bytes
 * per token, are at most ED bytes up to N = 64; when Lc > Ls the backward first recomputes the states at
 * sub-chunk boundaries (two-level recompute: one more forward walk). Where the device has subgroups, dB/dC are
 * summed with subgroup operations (no barriers) and B, C rows shared by subgroupShuffle (when the subgroup
 * size is fixed): the fastest on every adapter measured. A software adapter without them (llvmpipe through
 * GL) gets a small workgroup array, which Mesa's GL compiles in seconds instead of minutes.
 */
export function defaultFusedVariant(N: number): FusedVariant {
  const Nb = Math.ceil(N / Math.ceil(N / MAX_STATE_BLOCK)); // the largest of ceil(N / 16) near-equal blocks
  const Ls = Math.min(64, 2 ** Math.floor(Math.log2(MAX_HELD_STATES / Nb)));
  const Lc = Ls * Math.min(16, Math.ceil(Math.max(64, 4 * N) / Ls));
  const lc = { Lc, ...(Ls < Lc ? { Ls } : {}), ...(Nb < N ? { Nb } : {}) };
  const sg = deviceInfo().subgroups;
  if (sg) {
    const size = fixedSubgroupSize();
    const shuffle = size !== null && 32 % size === 0;
    return { N, ...lc, WG: 32, reduce: "subgroup", ...(shuffle ? { shuffle } : {}) };
  }
  if (deviceInfo().isFallbackAdapter) {
    // A software adapter without subgroups is llvmpipe through GL, where naga zero-fills workgroup arrays with
    // one constructor that Mesa compiles in time quadratic in its length. A small array: 2 steps of 8 channels
    // per barrier. Measured at N 16 (B 4, L 256, ED 128): the backward's first compile 5 s instead of 100 s
    // (WG 64, 16 KiB of terms), its step as fast (124 ms against 113-162).
    return { N, ...lc, WG: 8, S: 2 };
  }
  return { N, ...lc, WG: 64 }; // workgroup memory of the backward: S steps x WG x (2 Nb + dt) floats
}

/** The variant in use for a state size (chosen by the tuner, else the default). */
export function fusedVariant(N: number): FusedVariant {
  return chosen.get(N) ?? defaultFusedVariant(N);
}

/** Selects the variant for a state size (the tuner calls this with its measured choice); null resets. It
 * applies to every call: it also clears the variants by problem ({@linkcode setFusedVariantsByProblem}). */
export function setFusedVariant(N: number, v: Omit<FusedVariant, "N"> | null): void {
  byProblem.delete(N);
  if (v === null) chosen.delete(N);
  else chosen.set(N, checked(N, v));
}

const VARIANT_KEYS = [
  "N",
  "Nb",
  "Lc",
  "Ls",
  "WG",
  "hbuf",
  "S",
  "reduce",
  "shuffle",
  "lanes",
  "chunkParallel",
  "Lf",
];
const VARIANT_CHOICES: Record<string, readonly unknown[]> = {
  hbuf: ["private", "workgroup"],
  reduce: ["workgroup", "subgroup"],
  shuffle: [true, false],
  chunkParallel: [true, false],
};

/** Largest state size the fused scan's variants are set or tuned for (its blocks of states are pipelines). */
export const MAX_FUSED_N = 65536;

/** Throws unless N is a state size: an integer from 1 to MAX_FUSED_N (NaN, 0 and 1e9 failed far from here). */
export function checkStateSize(N: number, where: string): void {
  if (!(Number.isInteger(N) && N >= 1 && N <= MAX_FUSED_N)) {
    throw new Error(`${where}: N must be a state size, an integer from 1 to ${MAX_FUSED_N}, got ${N}`);
  }
}

/** The variant with its N, or an error naming what does not fit. */
function checked(N: number, v: Omit<FusedVariant, "N">): FusedVariant {
  checkStateSize(N, "setFusedVariant");
  const given = v as Record<string, unknown>;
  const unknown = Object.keys(given).filter((k) => !VARIANT_KEYS.includes(k));
  if (unknown.length) {
    throw new Error(
      `setFusedVariant: unknown keys ${unknown.join(", ")} (a variant has ${VARIANT_KEYS.join(", ")})`,
    );
  }
  if (given.N !== undefined && given.N !== N) {
    throw new Error(`setFusedVariant: the variant is for N = ${given.N}, set for N = ${N}`);
  }
  for (const [k, choices] of Object.entries(VARIANT_CHOICES)) {
    if (given[k] !== undefined && !choices.includes(given[k])) {
      throw new Error(
        `setFusedVariant: ${k} must be ${choices.map((c) => JSON.stringify(c)).join(" or ")}, got ${
          JSON.stringify(given[k])
        }`,
      );
    }
  }
  if (v.lanes !== undefined && !(Number.isInteger(v.lanes) && v.lanes >= 1)) {
    throw new Error(`setFusedVariant: lanes must be a positive integer, got ${JSON.stringify(v.lanes)}`);
  }
  const Ls = v.Ls ?? v.Lc;
  const nb = v.Nb ?? N;
  const blocks = Number.isInteger(nb) && nb >= 1 && nb <= N ? stateBlocks({ N, ...v }) : [];
  const Nb = blocks[0]?.Nb ?? v.Nb ?? N; // the largest block
  // workgroup memory: the recomputed states (hbuf "workgroup") and, without subgroup sums, S steps (at
  // least one) of dB/dC terms (2 Nb, and the dt terms of dt_proj inside the kernels)
  const terms = v.reduce === "subgroup" ? 0 : 2 * Nb + MAX_INLINE_DT_RANK;
  const wgBytes = 4 * v.WG * ((v.S ?? 1) * terms + (v.hbuf === "workgroup" ? Ls * Nb : 0));
  const { limits, subgroups } = deviceInfo();
  if (
    wgBytes > limits.maxComputeWorkgroupStorageSize || Ls * Nb > 2048 || (v.Lc / Ls - 1) * Nb > 2048 ||
    !Number.isInteger(v.WG) || v.WG < 1 || v.WG > limits.maxComputeInvocationsPerWorkgroup ||
    v.WG > limits.maxComputeWorkgroupSizeX || !Number.isInteger(v.Lc) || v.Lc < 1 || v.Lc > MAX_CHUNK ||
    !Number.isInteger(Ls) || Ls < 1 || v.Lc % Ls !== 0 || blocks.length === 0 ||
    (v.S !== undefined && !(Number.isInteger(v.S) && v.S >= 1)) ||
    (v.reduce === "subgroup" && !subgroups) || (v.shuffle && v.WG % shuffleSize() !== 0) ||
    !blocks.every((b) => lanesFit(v, b.Nb))
  ) {
    throw new Error(
      `setFusedVariant: WG ${v.WG}, Lc ${v.Lc}, Ls ${Ls}, Nb ${v.Nb ?? N}${
        v.S !== undefined ? `, S ${v.S}` : ""
      }${v.lanes ? `, lanes ${v.lanes}` : ""}${
        v.reduce ? `, reduce ${v.reduce}` : ""
      } does not fit N = ${N} on this device (Ls must divide Lc, Lc at ` +
        `most ${MAX_CHUNK}, Nb be an integer from 1 to N and S be an integer >= 1; ` +
        "Ls*Nb and (Lc/Ls - 1)*Nb at most 2048 floats; WG within the device's workgroup size; workgroup " +
        `memory (${wgBytes} bytes) within the device limit (${limits.maxComputeWorkgroupStorageSize}); subgroup ` +
        "sums need subgroups; with shuffle, WG a multiple of the subgroup size; lanes a power of two dividing " +
        "every state block, at most a fixed subgroup size, WG a multiple of it, subgroup sums, no shuffle)",
    );
  }
  const Lf = v.Lf ?? v.Lc;
  if (
    !(Number.isInteger(Lf) && Lf >= v.Lc && Lf % v.Lc === 0 && Lf <= MAX_CHUNK) ||
    (Lf !== v.Lc && v.chunkParallel !== true)
  ) {
    throw new Error(
      `setFusedVariant: Lf must be a multiple of Lc = ${v.Lc} up to ${MAX_CHUNK}, with chunkParallel, got Lf ${
        JSON.stringify(v.Lf)
      }${v.chunkParallel ? "" : " without chunkParallel"}`,
    );
  }
  return { ...v, N };
}

/** A problem the tuner measured, [B, L, ED], and the variant fastest on it. */
export interface ProblemVariant {
  /** [B, L, ED] */
  problem: number[];
  /** The fastest variant on it. */
  variant: FusedVariant;
}

const byProblem = new Map<number, ProblemVariant[]>();

/** A call this close to a problem in L / (B ED) (a factor, either way) may take that problem's variant. */
export const NEAR_PROBLEM = 4;

/**
 * Sets, for state size N, the fastest variant on each of the tuner's problems (after `setFusedVariant` with the
 * variant for everything else); null clears them. Each must fit, as `setFusedVariant` checks.
 */
export function setFusedVariantsByProblem(
  N: number,
  picks: { problem: number[]; variant: Omit<FusedVariant, "N"> }[] | null,
): void {
  checkStateSize(N, "setFusedVariantsByProblem");
  for (const { problem } of picks ?? []) {
    if (
      !(Array.isArray(problem) && problem.length === 3 && problem.every((d) => Number.isInteger(d) && d >= 1))
    ) {
      throw new Error(
        `setFusedVariantsByProblem: a problem is (B, L, ED), three positive integers, got ${
          JSON.stringify(problem)
        }`,
      );
    }
  }
  if (picks === null || picks.length === 0) byProblem.delete(N);
  else byProblem.set(N, picks.map((p) => ({ problem: [...p.problem], variant: checked(N, p.variant) })));
}

/** The variants by problem set for state size N (empty when none). */
export function fusedVariantsByProblem(N: number): ProblemVariant[] {
  return [...(byProblem.get(N) ?? [])];
}

/**
 * The variant for one call of shape (B, L, ED). A long walk over few channels leaves a GPU idle unless chunks
 * are walked in parallel; a short walk over many channels is faster in order (on the H200 the tuner's pick for
 * both took 0.79 ms on (4, 256, 128), the fastest there 0.51); and a wide layer fills the GPU at any chunk
 * length, where short chunks only add traffic (the chunk states). So a call whose walk L / (B ED) is within a
 * factor NEAR_PROBLEM of one or more of the tuner's problems takes the variant fastest on the nearest of those
 * by both its walk and its size B L ED (the larger of the two distances, on log scales; ties go to the problem
 * listed first). Other calls, and every call where the tuner measured one problem, take
 * {@linkcode fusedVariant}.
 */
export function fusedVariantFor(N: number, B: number, L: number, ED: number): FusedVariant {
  const picks = byProblem.get(N);
  if (!picks) return fusedVariant(N);
  const [w, s] = [logWalk(B, L, ED), logSize(B, L, ED)];
  const near = Math.log(NEAR_PROBLEM) + 1e-9; // a factor of exactly 4 counts, whatever the rounding
  let best: FusedVariant | null = null;
  let bestDist = Infinity;
  for (const { problem: [b, l, ed], variant } of picks) {
    const dw = Math.abs(w - logWalk(b, l, ed));
    const d = Math.max(dw, Math.abs(s - logSize(b, l, ed)));
    if (dw <= near && d < bestDist) [best, bestDist] = [variant, d];
  }
  return best ?? fusedVariant(N);
}

/** log(L / (B ED)): how long a walk each channel of a (B, L, ED) call has. */
function logWalk(B: number, L: number, ED: number): number {
  return Math.log(L / Math.max(1, B * ED));
}

/** log(B L ED): a (B, L, ED) call's size. */
function logSize(B: number, L: number, ED: number): number {
  return Math.log(Math.max(1, B * L * ED));
}

/** Whether a variant's lanes per channel fit: a power of two dividing Nb, within one subgroup of a fixed size
 * (they sum by shuffles), whole subgroups per workgroup, subgroup sums of dB/dC, and no shuffled B/C rows
 * (each lane loads its own states'). */
function lanesFit(v: Omit<FusedVariant, "N">, Nb: number): boolean {
  const P = v.lanes ?? 1;
  if (P === 1) return true;
  const size = fixedSubgroupSize();
  return Number.isInteger(Math.log2(P)) && Nb % P === 0 && !v.shuffle && v.reduce === "subgroup" &&
    size !== null && P <= size && v.WG % size === 0;
}
