/**
 * Chooses the fused selective-scan variant per adapter by a one-time measurement, cached in `localStorage`.
 *
 * Candidates differ in channels per workgroup, chunk length, where the backward keeps a chunk's
 * recomputed states (private or workgroup memory), and how it sums dB/dC over channels (workgroup memory
 * and barriers, or subgroup operations where the device has subgroups; with either place for the states),
 * whether B and C rows are shared by subgroupShuffle, and (GPUs) how many lanes share a channel in both
 * kernels and whether chunks of time are walked in parallel. A CPU adapter wants few invocations per workgroup
 * (barriers are costly); GPUs want more and prefer workgroup memory. Each candidate runs a forward +
 * backward of a small problem a few times (on GPUs also of a long, narrow one and of a wide one:
 * {@linkcode tuneProblems}); the fastest by GPU time (timestamp queries, else wall clock; the geometric mean
 * over the problems) is selected with `setFusedVariant`, after the best have been measured again in
 * interleaved rounds ({@linkcode FusedTuneResult.confirmations}).
 * @module
 */

import { randn } from "../core/creation.ts";
import { acquired, autoTuneEnabled, deviceInfo, fixedSubgroupSize } from "../core/device.ts";
import { profile, profiling, sync } from "../core/executor.ts";
import { dropStaleTuneKeys, registerTuner, unclearRivals, UNSURE_TRIES } from "../core/tune.ts";
import { mul, sum } from "../core/ops/index.ts";
import { dispose, tidy } from "../core/tensor.ts";
import { fusedSelectiveScan } from "./fused.ts";
import {
  checkStateSize,
  defaultFusedVariant,
  type FusedVariant,
  fusedVariant,
  fusedVariantsByProblem,
  MAX_INLINE_DT_RANK,
  type ProblemVariant,
  setFusedVariant,
  setFusedVariantsByProblem,
  stateBlocks,
} from "./fused_variant.ts";

/** Bump when the kernels or the candidates change, so cached choices are measured again. */
export const FUSED_KERNEL_VERSION = 31;

/** What the tuner chose for one state size. */
export interface FusedTuneResult {
  /** The selected variant. */
  variant: FusedVariant;
  /**
   * Each candidate's score (JSON of the variant -> ms): the geometric mean of its milliseconds per forward +
   * backward over the {@linkcode FusedTuneResult.problems}. With timestamp queries that is the GPU time of the
   * fused-scan kernels alone (forward and backward, without the surrounding ops); without them, the wall time
   * of the whole step, host included. Empty when nothing was measured (one candidate, or an adapter that
   * cannot run the backward). A candidate measured again counts, per problem, the median of its
   * measurements (see {@linkcode FusedTuneResult.confirmations}).
   */
  timings: Record<string, number>;
  /**
   * The later measurements (per round, ms per problem) of the candidates measured again: the
   * {@linkcode CONFIRM_FINALISTS} best scores, after all the others, in interleaved rounds (slowest first,
   * then the other way) until each has {@linkcode CONFIRM_SAMPLES} measurements, each problem's time then
   * their median; likewise any candidate this leaves fastest overall or on a problem; then, while rivals'
   * scores stay within the noise of the fastest's (see {@linkcode FusedTuneResult.confident}), those and the
   * fastest, two rounds at most and within the time budget. The median, not the best time, because a
   * measurement misleads either way: a burst of other work slows one, and on the H200 the same kernel,
   * measured first in one run and among the others in another, scored 0.289 and 0.834 ms while the layer
   * steps it ran in took about the same. (Until these rounds, the finalists were measured twice and counted
   * the slower time, which a burst in either measurement decided.)
   */
  confirmations: Record<string, number[][]>;
  /** The problems measured, as [B, L, ED]: one on CPU adapters, three on GPUs (see {@linkcode tuneProblems}). */
  problems: number[][];
  /** Each candidate's milliseconds on each problem, in the order of `problems`. */
  problemTimings: Record<string, number[]>;
  /**
   * Where there were several problems, the fastest variant on each: calls near one of them in shape take it
   * ({@linkcode fusedVariantFor}), the others `variant`. Empty with one problem.
   */
  byProblem: ProblemVariant[];
  /** True when read from the cache without measuring. */
  fromCache: boolean;
  /**
   * Whether the selected variant's score was clearly ahead of every candidate measured again: by more than
   * twice the larger of the two spreads, or within `TIE_SPREAD` of it on a steady measurement (as
   * `TuneResult.confident`). A choice cached as not confident is measured again by the next call that finds
   * it, until `UNSURE_TRIES` measurements in a row were not. True when nothing was measured.
   */
  confident: boolean;
  /**
   * The spread of each candidate measured again: the median distance of its measurements' scores from
   * their median, relative (0.03: 3%). One outlier, in either direction, does not move it.
   */
  spread: Record<string, number>;
  /** Measurements in a row, this one included, that were not confident (0 when this one was). */
  unsure: number;
}

/** Steps of the forward's walks that the tuner offers to chunk-parallel candidates with short chunks (`Lf`). */
const WALK_STEPS = 64;

/** The variants the tuner measures for state size N on this adapter (exported for tests). */
export function fusedCandidates(N: number): FusedVariant[] {
  const limit = deviceInfo().limits.maxComputeWorkgroupStorageSize;
  const def = defaultFusedVariant(N);
  // On software adapters only the default where every candidate costs a long compile: above N = 16 (lavapipe
  // compiles a few seconds per block of states) and without subgroups (llvmpipe through GL: minutes each, see
  // SLOW_COMPILE_MS; a user who only generates text never needs the backward compiled).
  if (deviceInfo().isFallbackAdapter && (N > 16 || !deviceInfo().subgroups)) return [def];
  const chunks = def.Ls ? { Lc: def.Lc, Ls: def.Ls } : { Lc: def.Lc }; // private states: the default's chunks
  const blocks = def.Nb ? { Nb: def.Nb } : {}; // and its state blocks
  const Nb = def.Nb ?? N;
  const list: FusedVariant[] = [def];
  // Variants compared with their defaults spelled out (hbuf private, workgroup sums, no shuffle).
  const key = (v: FusedVariant) =>
    JSON.stringify([
      v.N,
      v.Nb ?? v.N,
      v.Lc,
      v.Ls ?? v.Lc,
      v.WG,
      v.hbuf ?? "private",
      v.reduce ?? "workgroup",
      !!v.shuffle,
      v.S ?? null,
      !!v.chunkParallel,
      v.Lf ?? v.Lc,
    ]);
  const has = (v: FusedVariant) => list.some((c) => key(c) === key(v));
  for (const WG of [8, 32, 64]) {
    const priv: FusedVariant = { N, ...chunks, ...blocks, WG, hbuf: "private" };
    if (!has(priv)) list.push(priv);
    // States in workgroup memory: as long a chunk as fits, one level, with room for one step of dB/dC and
    // dt terms (2 Nb + MAX_INLINE_DT_RANK per channel).
    const terms = 2 * Nb + MAX_INLINE_DT_RANK;
    const Lc = Math.max(4, Math.min(32, Math.floor((limit / (4 * WG) - terms) / Nb)));
    if (4 * WG * (terms + Nb * Lc) <= limit) list.push({ N, ...blocks, WG, Lc, hbuf: "workgroup" });
  }
  // Subgroup sums need no workgroup memory and no barriers: the states stay private (or, below, in workgroup
  // memory).
  // With a fixed subgroup size, B and C rows can also be shared by subgroupShuffle.
  const sg = deviceInfo().subgroups;
  const fixed = fixedSubgroupSize();
  if (sg) {
    for (const WG of [8, 32, 64]) {
      for (const shuffle of [false, true]) {
        if (shuffle && (fixed === null || WG % fixed !== 0)) continue;
        const v: FusedVariant = {
          N,
          ...chunks,
          ...blocks,
          WG,
          reduce: "subgroup",
          ...(shuffle ? { shuffle } : {}),
        };
        if (!has(v)) list.push(v);
        // ... and with the recomputed states in workgroup memory (where a GPU keeps them on chip; private
        // arrays that large spill): sub-chunks as long as fit, the default's chunks
        const Ls = [16, 8, 4].find((s) => def.Lc % s === 0 && 4 * WG * Nb * s <= limit);
        if (!Ls) continue;
        const onChip: FusedVariant = { ...v, Lc: def.Lc, ...(Ls < def.Lc ? { Ls } : {}), hbuf: "workgroup" };
        list.push(onChip);
        // ... and with lanes per channel (more invocations at small batch): GPUs only, a CPU
        // adapter has no idle lanes to fill; lanes sum by shuffles within a subgroup of one fixed size
        if (shuffle || deviceInfo().isFallbackAdapter || fixed === null || WG % fixed !== 0) continue;
        for (const lanes of [2, 4, 8]) {
          if (lanes <= fixed && stateBlocks(def).every((b) => b.Nb % lanes === 0)) {
            list.push({ ...onChip, lanes });
          }
        }
        // ... and, above one block of states, all N in one block, with lanes enough that each walks at most a
        // default block's states (the same registers): one pipeline and one dispatch per kernel instead of one
        // per block. Where a GPU's step is bound by the host's time per dispatch (small layers), the blocks'
        // dispatches are what grows with N.
        if (def.Nb !== undefined) {
          const { Nb: _perBlock, ...whole } = v;
          for (const lanes of [2, 4, 8]) {
            if (lanes <= fixed && N % lanes === 0 && N / lanes <= def.Nb) list.push({ ...whole, lanes });
          }
        }
      }
    }
  }
  // Chunks walked in parallel: GPUs only (a CPU adapter's cores are busy with the channels already; on
  // lavapipe one more walk of the steps cost 3-28% per layer step), every candidate so far a second time, and
  // those first: on the H200 the 13 best scores at N 16 were chunk-parallel, the best serial one 1.9 times the
  // best (49a9be6), so a measurement cut short by TUNE_BUDGET_MS has measured them.
  // Those with short chunks (a backward keeping a chunk's states in workgroup memory: 9 steps on the H200) also
  // with the forward walking chunks of about 64 steps (`Lf`): their chunk states were most of the forward's
  // traffic there (docs/selective-scan.md section 9). A few candidates more, after the others in parallel.
  if (!deviceInfo().isFallbackAdapter) {
    const parallel = list.map((v) => ({ ...v, chunkParallel: true }));
    const walks = parallel.filter((v) => v.Lc < WALK_STEPS / 2).map((v) => ({
      ...v,
      Lf: v.Lc * Math.ceil(WALK_STEPS / v.Lc),
    }));
    return [...parallel, ...walks, ...list];
  }
  return list;
}

/**
 * The (B, L, ED) problems the tuner measures. (4, 256, 128) has channels enough to fill a GPU's workgroups and
 * a short walk. GPUs also get (1, 2048, 32), d_model 16's layer at L 2048: few channels and a long walk, where
 * a variant that walks its chunks one after another leaves almost the whole GPU idle (an H200 took 56 ms for
 * such a step at L 16384 with the variant that won (4, 256, 128) by 1%, against 2.2 ms with chunks in
 * parallel, at 481ea51); and (1, 1024, 2048), d_model 1024's layer at L 1024, 16 times the first's size: there
 * the GPU is full at any chunk length, so the short chunks that win the small problems only add the chunk
 * states' traffic (the H200 ran its d_model 1024 layers with the first problem's pick, chunks of 9 steps, at
 * 2d4b27c). A CPU adapter measures the first only: its cores are busy with the channels already, and every
 * measurement costs tens of ms there.
 */
export function tuneProblems(): number[][] {
  return deviceInfo().isFallbackAdapter ? [[4, 256, 128]] : [[4, 256, 128], [1, 2048, 32], [1, 1024, 2048]];
}

const KEY_FAMILY = "mambats.fusedScan.v";

/** The `localStorage` key of a state size's choice on this adapter: with its subgroups (their size range, or
 * none), which decide the candidates, so that a choice made without them (an older browser or runtime) is not
 * kept once the device has them. */
function cacheKey(N: number): string {
  const sg = deviceInfo().subgroups;
  const subgroups = sg ? `sg${sg.minSize}-${sg.maxSize}` : "nosg";
  return `${KEY_FAMILY}${FUSED_KERNEL_VERSION}.N${N}.${subgroups}.${deviceInfo().description}`;
}

/** A gated forward + backward of the fused scan on random (B, L, ED) inputs with state size N; gradients dropped. */
function problemRun(N: number, B: number, L: number, ED: number): { run: () => void; dispose: () => void } {
  const R = 4;
  const r = (shape: number[], seed: number) => randn(shape, { seed, std: 0.5 }).requiresGrad_(true);
  const t = [
    r([B, L, ED], 1), // x
    r([B, L, ED], 2), // draw
    r([B, L, R + 2 * N], 3), // dBC
    r([ED], 4), // bias
    r([ED, N], 5), // A_log
    r([ED], 6), // D
  ];
  const z = r([B, L, ED], 7);
  const G = randn([B, L, ED], { seed: 8 });
  const run = () =>
    tidy(() => {
      const [x, draw, dBC, bias, aLog, D] = t;
      sum(mul(fusedSelectiveScan(x, draw, dBC, bias, aLog, D, z), G)).backward();
      for (const p of [...t, z]) {
        p.grad?.dispose();
        p.grad = null;
      }
    });
  return { run, dispose: () => dispose([...t, z, G]) };
}

/**
 * Which of a profiled run's kernels (in the order they ran) are the fused scan's: `fused_scan_*`, and the
 * reduction passes that sum the backward's parameter gradients over many chunks first (GPUs, past 256 rows:
 * `reduce_sum` dispatches right before a `fused_scan_bwd_sums`). Counting those keeps the variants with short
 * chunks, which take them, from looking faster than they are.
 */
export function isFusedScanKernel(times: readonly { readonly name: string }[]): boolean[] {
  const scan = times.map((k) => k.name.startsWith("fused_scan"));
  for (let i = times.length - 1, sums = false; i >= 0; i--) {
    if (times[i].name === "reduce_sum") scan[i] = sums;
    else sums = times[i].name.startsWith("fused_scan_bwd_sums");
  }
  return scan;
}

/** Milliseconds per run of `run` (3 runs): the fused scan's GPU time ({@linkcode isFusedScanKernel}) where
 * timestamp queries exist and give a positive time, else the wall time; the wall time too inside a caller's
 * `profile()` (a trainer's first step tunes its state size there), which must not be refused for it. */
async function timeRuns(run: () => void): Promise<number> {
  if (deviceInfo().timestampQuery && !profiling()) {
    const times = await profile(() => {
      for (let i = 0; i < 3; i++) run();
    });
    const scan = isFusedScanKernel(times);
    const gpu = times.reduce((a, k, i) => (scan[i] ? a + k.ms : a), 0) / 3;
    if (gpu > 0 && gpu < Infinity) return gpu; // else timestamps that tell nothing: the wall time
  }
  const t0 = performance.now();
  for (let i = 0; i < 3; i++) run();
  await sync();
  return (performance.now() - t0) / 3;
}

/** A cached result as the type says, every field there: else an error (the caller measures again). A null
 * variant would reset to the default without measuring, and missing fields broke their readers. An entry from
 * before the confidence was kept (no `confident`) reads as not confident, not yet counted: measured again
 * once, as it may have been measured on a busy machine, which is what the confidence is for. */
function readCachedResult(json: unknown): FusedTuneResult {
  const r = json as Partial<FusedTuneResult> | null;
  const obj = (v: unknown) => typeof v === "object" && v !== null && !Array.isArray(v);
  if (
    !obj(r) || !obj(r!.variant) || !obj(r!.timings) || !obj(r!.confirmations) || !obj(r!.problemTimings) ||
    !Array.isArray(r!.problems) || !Array.isArray(r!.byProblem)
  ) {
    throw new Error("a cached tuning result without every field");
  }
  const unsure = Number.isInteger(r!.unsure) && r!.unsure! >= 0 ? r!.unsure! : 0;
  return {
    ...r,
    confident: r!.confident === true,
    spread: obj(r!.spread) ? r!.spread : {},
    unsure,
  } as FusedTuneResult;
}

/** The result of a choice made without measuring. */
function unmeasured(variant: FusedVariant): FusedTuneResult {
  return {
    variant,
    timings: {},
    confirmations: {},
    problems: [],
    problemTimings: {},
    byProblem: [],
    fromCache: false,
    confident: true,
    spread: {},
    unsure: 0,
  };
}

/** How many of the best candidates are measured again (see `FusedTuneResult.confirmations`). */
export const CONFIRM_FINALISTS = 3;

/** Measurements of a candidate measured again, the first included: three, so that the median sets one that
 * misleads aside, whichever way. */
export const CONFIRM_SAMPLES = 3;

/** Rounds at most, after the confirmations, of the fastest and the rivals within its noise. */
const EXTRA_ROUNDS = 2;

function geometricMean(xs: number[]): number {
  return Math.exp(xs.reduce((a, x) => a + Math.log(x), 0) / xs.length);
}

function median(xs: readonly number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  const h = s.length >> 1;
  return s.length % 2 ? s[h] : (s[h - 1] + s[h]) / 2;
}

/** The median distance of times from their median, relative to it (see `FusedTuneResult.spread`). */
function medianSpread(xs: readonly number[]): number {
  const m = median(xs);
  return median(xs.map((x) => Math.abs(x - m))) / m;
}

/** A candidate whose first run (its compile) takes longer than this ends the measurement. */
const SLOW_COMPILE_MS = 20_000;

/**
 * Milliseconds of measuring after which no further candidate is started (the fastest so far is kept). On the
 * H200, N 16's 44 candidates took 27 s, but N 64's 52 (up to four blocks of states, so up to 16 pipelines
 * each) about 150 s, which a trainer's first step would wait for.
 */
export const TUNE_BUDGET_MS = 60_000;

/**
 * Measures (or reads the cached choice of) the fused-scan variants for state size N and selects the fastest.
 * `force` measures even when a choice is cached; so does a cached choice that was not confident
 * ({@linkcode FusedTuneResult.confident}), until `UNSURE_TRIES` measurements in a row were not. The default
 * variant is measured first (on GPUs, with chunks in parallel); once a candidate's first run (its compile)
 * takes longer than `slowCompileMs` (default 20,000: Mesa through GL takes minutes), or once the measurement
 * has taken `budgetMs` (default {@linkcode TUNE_BUDGET_MS}), no further candidate is measured and the fastest
 * measured is kept. The best are then measured again ({@linkcode FusedTuneResult.confirmations}; the rounds
 * for an unclear choice only within `budgetMs`). `timer` replaces running and timing one problem's runs under
 * the variant in use (tests script the times with it, and nothing is compiled; the default times the GPU's
 * kernels, or the wall time without timestamp queries or inside a `profile()`).
 */
export async function tuneFusedScan(
  N: number,
  options: {
    force?: boolean;
    slowCompileMs?: number;
    budgetMs?: number;
    timer?: (run: () => void) => Promise<number>;
  } = {},
): Promise<FusedTuneResult> {
  checkStateSize(N, "tuneFusedScan");
  await acquired();
  // The backward binds 10 storage buffers: an adapter that allows fewer cannot run it (WebGPU's default is 8;
  // browsers give 10 or more when asked), so there is nothing to measure.
  if (deviceInfo().limits.maxStorageBuffersPerShaderStage < 10) return unmeasured(defaultFusedVariant(N));
  const candidates = fusedCandidates(N);
  if (candidates.length === 1) {
    // nothing to choose between (a software adapter above N = 16): no measurement
    setFusedVariant(N, candidates[0]);
    return unmeasured(candidates[0]);
  }
  const key = cacheKey(N);
  let unsure = 0; // the cached choice's count, where it is measured again for want of confidence
  if (!options.force) {
    try {
      const cached = globalThis.localStorage?.getItem(key);
      if (cached) {
        const r = readCachedResult(JSON.parse(cached));
        if (r.confident || r.unsure >= UNSURE_TRIES) {
          setFusedVariant(N, r.variant);
          setFusedVariantsByProblem(N, r.byProblem);
          return { ...r, fromCache: true };
        }
        unsure = r.unsure;
      }
    } catch { /* no localStorage here, or a cached variant that no longer fits: measure */ }
  }
  const started = performance.now();
  const budgetMs = options.budgetMs ?? TUNE_BUDGET_MS;
  // A time that is not a positive number (timestamps quantised to 0, as Chrome's 100 µs can make a fast
  // kernel's, or out of order) tells nothing: it counts as Infinity, so that it can never win.
  const timer = options.timer ?? timeRuns;
  const time = async (run: () => void) => {
    const ms = await timer(run);
    return ms > 0 ? ms : Infinity;
  };
  const problems = tuneProblems();
  // A run that fails part-way (out of memory, a lost device) leaves the variants as they were, and its
  // problems' tensors freed.
  const [prevVariant, prevPicks] = [fusedVariant(N), fusedVariantsByProblem(N)];
  const runs: { run: () => void; dispose: () => void }[] = [];
  const samples: Record<string, number[][]> = {}; // each measurement of a candidate: ms per problem
  const timings: Record<string, number> = {};
  const problemTimings: Record<string, number[]> = {};
  /** Measures the variant in use, and counts it in its candidate's timings. */
  const measure = async (k: string) => {
    const ms: number[] = [];
    for (const p of runs) ms.push(await time(p.run));
    (samples[k] ??= []).push(ms);
    problemTimings[k] = problems.map((_, i) => median(samples[k].map((s) => s[i])));
    // geometric mean: a candidate 20x slower on one problem is not rescued by being 5% faster on the other
    timings[k] = geometricMean(problemTimings[k]);
  };
  let best: FusedVariant;
  let byProblem: ProblemVariant[];
  let confident = false;
  const spread: Record<string, number> = {};
  try {
    for (const [B, L, ED] of problems) runs.push(problemRun(N, B, L, ED));
    for (const v of candidates) {
      setFusedVariant(N, v);
      const t0 = performance.now();
      if (!options.timer) { // a scripted timer (tests) runs nothing, so nothing compiles either
        for (const p of runs) p.run(); // compile
        await sync();
      }
      const compileMs = performance.now() - t0;
      await measure(JSON.stringify(v));
      // Where one compile takes this long, each further candidate would too: keep the fastest so far. (naga's
      // GLSL backend zero-fills workgroup arrays with one array constructor, which Mesa's GL drivers compile in
      // time quadratic in its length: minutes for the backward's 16 KiB; lavapipe takes seconds.)
      if (compileMs > (options.slowCompileMs ?? SLOW_COMPILE_MS)) break;
      if (performance.now() - started > budgetMs) break;
    }
    // Measured again in rounds, each round's order the last one's reversed, so that a burst of load or a
    // drift of the clocks hits them alike: the finalists (slowest first) and any candidate left fastest
    // overall or on a problem, until each has CONFIRM_SAMPLES measurements; then the fastest and its unclear
    // rivals, a few rounds at most.
    let round = 0;
    const again = async (keys: string[]) => {
      for (const k of round++ % 2 ? [...keys].reverse() : keys) {
        setFusedVariant(N, JSON.parse(k) as FusedVariant);
        await measure(k);
      }
    };
    const fastest = (time: (k: string) => number) =>
      Object.keys(timings).reduce((a, b) => (time(b) < time(a) ? b : a));
    const leaders = () => [
      fastest((k) => timings[k]),
      ...problems.map((_, i) => fastest((k) => problemTimings[k][i])),
    ];
    const ranked = Object.keys(timings).sort((a, b) => timings[a] - timings[b]);
    const finalists = ranked.slice(0, CONFIRM_FINALISTS).reverse(); // slowest first
    for (let extra = 0;;) {
      const todo = [...new Set([...finalists, ...leaders()])]
        .filter((k) => samples[k].length < CONFIRM_SAMPLES);
      if (todo.length) {
        await again(todo);
        continue;
      }
      const confirmed = Object.keys(samples).filter((k) => samples[k].length >= CONFIRM_SAMPLES);
      for (const k of confirmed) spread[k] = medianSpread(samples[k].map(geometricMean));
      const pick = fastest((k) => timings[k]);
      const unclear = unclearRivals(Object.fromEntries(confirmed.map((k) => [k, timings[k]])), spread, pick);
      confident = unclear.length === 0;
      if (confident || extra++ >= EXTRA_ROUNDS || performance.now() - started > budgetMs) break;
      await again([pick, ...unclear]);
    }
    best = JSON.parse(fastest((k) => timings[k])) as FusedVariant;
    // the fastest on each problem, for calls of about its shape (with one problem, `best` is that)
    byProblem = problems.length < 2 ? [] : problems.map((problem, i) => ({
      problem,
      variant: JSON.parse(fastest((k) => problemTimings[k][i])) as FusedVariant,
    }));
    setFusedVariant(N, best);
    setFusedVariantsByProblem(N, byProblem);
  } catch (e) {
    setFusedVariant(N, prevVariant);
    setFusedVariantsByProblem(N, prevPicks.length ? prevPicks : null);
    throw e;
  } finally {
    for (const p of runs) p.dispose();
  }
  const confirmations = Object.fromEntries(
    Object.entries(samples).filter(([, s]) => s.length > 1).map(([k, s]) => [k, s.slice(1)]),
  );
  const result = {
    variant: best,
    timings,
    confirmations,
    problems,
    problemTimings,
    byProblem,
    fromCache: false,
    confident,
    spread,
    // a forced measurement starts the count afresh: the user asked for this one
    unsure: confident ? 0 : unsure + 1,
  };
  try {
    globalThis.localStorage?.setItem(key, JSON.stringify(result));
    dropStaleTuneKeys(KEY_FAMILY, `${KEY_FAMILY}${FUSED_KERNEL_VERSION}.`);
  } catch { /* not persistent here */ }
  return result;
}

registerTuner("fusedScan.N16", (force) => tuneFusedScan(16, { force }));

// init() tunes N = 16; the others once each, on first use. One promise per N: a caller that comes while N
// is being tuned waits for it (it ran on the untuned scan, inside the tuner's timings).
const tuned = new Map<number, Promise<unknown>>([[16, Promise.resolve()]]);

/** Tunes the fused scan for state size N once per process, where `init()` tuned (the trainer calls this before
 * its first step: models with N other than 16 get a measured variant too); a call during that tuning waits
 * for it. */
export async function ensureFusedTuned(N: number): Promise<void> {
  if (!autoTuneEnabled()) return;
  const pending = tuned.get(N);
  if (pending) {
    await pending;
    return;
  }
  const run = tuneFusedScan(N);
  tuned.set(N, run.catch(() => {})); // a failure is the first caller's to report; later ones run untuned
  await run;
}
