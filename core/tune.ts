/**
 * One-time kernel autotuning per adapter.
 *
 * Some kernels come in variants whose speed depends on the adapter far more than on the problem: the matmul
 * `register` variant (no workgroup memory) is several times faster than `tiled` on CPU adapters such as
 * llvmpipe/lavapipe, where workgroup barriers are very expensive, while GPUs may favour workgroup-memory tiles
 * (the H200 picked `register`: 6.4 TFLOP/s against 1.5 for `tiled`).
 * {@linkcode tuneKernels} measures the variants on the current adapter, selects the fastest, and remembers
 * the choice in `localStorage` (when the platform has it) under a key made of the adapter's description and
 * the kernels' version, so later processes on the same adapter skip the measurement (unless it was not
 * confident, as on a machine busy with other work: `TuneResult.confident`).
 *
 * ```ts
 * import { init, tuneKernels } from "@mambats/mamba";
 *
 * await init();
 * const t = await tuneKernels(); // measures once per adapter, then reads the cached choice
 * console.log(t.variant, t.fromCache, t.gflops, t.confident, t.spread);
 * ```
 * @module
 */

import { acquired, deviceInfo } from "./device.ts";
import { sync } from "./executor.ts";
import { rand } from "./creation.ts";
import type { Tensor } from "./tensor.ts";
import {
  availableMatmulVariants,
  MATMUL_KERNEL_VERSION,
  matmulGpuSplit,
  matmulMatvec,
  matmulRaw,
  matmulTuneCandidates,
  type MatmulVariant,
  setMatmulGpuSplit,
  setMatmulMatvec,
  setMatmulVariant,
} from "./ops/matmul.ts";

/** Options of {@linkcode tuneKernels}. */
export interface TuneOptions {
  /** Measure even when a cached choice exists (and overwrite the cache). Default false. */
  force?: boolean;
  /**
   * Replaces timing one product on the device: returns ms per product of `variant` as the plan settings
   * (`matmulGpuSplit`, `matmulMatvec`) now stand. Tests script the times with it: nothing runs or compiles,
   * and the registered tuners (the fused scan's, which takes a timer of its own) are not run.
   */
  timer?: ProductTimer;
}

/** Milliseconds per product of a variant, with the plan settings as they stand
 * (see {@linkcode TuneOptions.timer}). */
export type ProductTimer = (variant: MatmulVariant, p: TuneProduct) => Promise<number>;

/** What {@linkcode tuneKernels} decided, and on what grounds. */
export interface TuneResult {
  /** The matmul variant now in use. */
  variant: MatmulVariant;
  /** True when the choice came from the cache, without measuring. */
  fromCache: boolean;
  /** Adapter description the choice is for. */
  adapter: string;
  /** The `localStorage` key of the choice (adapter and kernel version). */
  key: string;
  /** Measured speed of each variant in GFLOP/s (over all measured sizes, its best round), from the cache or
   * just now. */
  gflops: Partial<Record<MatmulVariant, number>>;
  /** Square matmul sizes that were measured. */
  sizes: number[];
  /** When the measurement was made (ISO 8601). */
  measuredAt: string;
  /**
   * GPUs: whether matmuls split K until enough invocations run (`matmulGpuSplit`), as measured: the
   * `SPLIT_PROBES` timed both ways with the chosen variant, back to back between waits, so that
   * the split's extra dispatches count as much as the time they save; null where not measured (CPU
   * adapters, which never split so).
   */
  gpuSplit: boolean | null;
  /** The probes' total ms with the split on and off, each way's best round (rounds on, off, then off, on,
   * ...; null where not measured). */
  splitMs: { on: number; off: number } | null;
  /** GPUs: whether a few rows against a weight take the matvec kernel (`setMatmulMatvec`), as measured: the
   * `MATVEC_PROBES` timed both ways, as the split; null where not measured. */
  matvec: boolean | null;
  /** The matvec probes' total ms with it on and off (null where not measured). */
  matvecMs: { on: number; off: number } | null;
  /**
   * Whether every choice (the variant, and where measured the split and matvec) was clearly ahead of its
   * rivals: by more than twice the measurements' spread, or within {@linkcode TIE_SPREAD} of a rival on a
   * steady measurement (a tie: either costs little). A choice cached as not confident is measured again by
   * the next call that finds it, until {@linkcode UNSURE_TRIES} measurements in a row were not.
   */
  confident: boolean;
  /**
   * Each variant's spread: how far its second-best round lay above its best, relative (0.03: 3%); Infinity
   * where it ran one round. A busy machine shows here first.
   */
  spread: Partial<Record<MatmulVariant, number>>;
  /** Timed rounds of the variant measurement (the most any variant ran). */
  rounds: number;
  /** Measurements in a row, this one included, that were not confident (0 when this one was). */
  unsure: number;
}

/** A product the tuner times: op(A) (M x K) @ op(B) (K x N). */
export interface TuneProduct {
  /** Rows of op(A) and of the result. */
  M: number;
  /** Columns of op(A), rows of op(B). */
  K: number;
  /** Columns of op(B) and of the result. */
  N: number;
  /** A is stored K x M. */
  transA?: boolean;
  /** B is stored N x K. */
  transB?: boolean;
}

/**
 * Products a GPU's split over K changes (few invocations, K >= 256): a layer's input and weight gradients at
 * d_model 64, L 1024. (Until matmul-10 also decoding's out_proj at mamba-130m's width; matrix-vector products
 * like it now take the matvec kernel on GPUs, split or not: `setMatmulMatvec`.)
 */
export const SPLIT_PROBES: readonly TuneProduct[] = [
  { M: 1024, K: 256, N: 64 },
  { M: 256, K: 1024, N: 64, transA: true },
];

/** Products the matvec kernel takes on GPUs: decoding's in_proj and out_proj at mamba-130m's width. */
export const MATVEC_PROBES: readonly TuneProduct[] = [
  { M: 1, K: 768, N: 3072, transB: true },
  { M: 1, K: 1536, N: 768, transB: true },
];

/** Square sizes the tuner measures: small, so a first run costs about a second on a CPU adapter. */
const TUNE_SIZES = [256, 512];
/** A timed batch's calls should last at least this long without the wait, so that the wait's ~11 ms, and its
 * variation, are a small part of the batch. */
const MIN_BATCH_MS = 40;
/** ... but no more than this many calls. The split's probes are small products, tens of µs on a fast GPU:
 * 256 calls (the cap until 2026-11-30) would last some 5-10 ms there (estimated from the H200's kernel times),
 * under the wait they were measured against. */
const MAX_REPS = 4096;
const KEY_PREFIX = "mamba.ts/tune/";
/** Rounds every candidate runs (two: a spread needs a second time) ... */
const MIN_ROUNDS = 2;
/** ... and at most, while a rival stays within the noise of the fastest. On lavapipe a round of the variants
 * costs about 0.3-0.5 s; a clear measurement stops at MIN_ROUNDS. */
const MAX_ROUNDS = 5;
/**
 * A spread (relative) up to which a measurement counts as steady: rivals within it of the pick are a tie, not
 * worth measuring again (GPUs' near-equal variants would otherwise never be confident).
 */
export const TIE_SPREAD = 0.05;
/** Measurements in a row that were not confident after which a cached choice is kept as it is: a machine that
 * is always busy does not measure at every start. */
export const UNSURE_TRIES = 3;

let current: TuneResult | null = null;
let pending: Promise<TuneResult> | null = null;

/** The result of the last {@linkcode tuneKernels} in this process, or null before the first. */
export function tuneResult(): TuneResult | null {
  return current;
}

/**
 * Measures the matmul variants once per adapter and selects the fastest with `setMatmulVariant`.
 *
 * Acquires the device if needed (`init()`). Each variant multiplies square matrices of 256 and 512: one
 * untimed dispatch first (pipeline compilation), then batches of dispatches between two waits, growing
 * until a batch's calls last at least 40 ms not counting the wait (at most 4096 calls); the cost of an empty
 * wait, measured first, is subtracted. The variants run in interleaved rounds (A B C, C B A, ...; later
 * rounds at the first's batch sizes), so that a burst of other work on the machine slows them alike, and each
 * counts its best round: the highest GFLOP/s over both sizes wins. After two rounds, a rival whose best lies
 * within twice the larger spread of the two (`TuneResult.spread`) runs more rounds with the leader, up to
 * five; the choice is `TuneResult.confident` when none is left so (spreads up to 5% count as steady, and a
 * rival that close as a tie). On a GPU it then times the `SPLIT_PROBES` (a layer's gradients) with that
 * variant, with `matmulGpuSplit` on and off, and keeps the faster (`TuneResult.gpuSplit`), and likewise the
 * `MATVEC_PROBES` (decoding's products) with the matvec kernel on and off (`TuneResult.matvec`), in rounds as
 * the variants. On a CPU adapter the first measurement takes about 2-3 s (lavapipe on 2 cores; one
 * measurement per variant took 1-2 s).
 *
 * The choice is cached in `localStorage` under `mamba.ts/tune/<kernel version>/<adapter>`; a later call
 * (in this process or a later one on the same adapter) reads it instead of measuring, unless
 * `options.force` is set, or the choice was not confident: then it is measured again, until
 * {@linkcode UNSURE_TRIES} measurements in a row were not (`TuneResult.unsure`), so that one busy moment does
 * not decide for good, nor does a machine that is always busy measure at every start. Deno keeps
 * `localStorage` per `--location`, else per configuration file (deno.json), else per main module; where
 * `localStorage` is missing or refuses access (some browsers, permissions), the tuner measures in every
 * process. Inputs come from seeded generators of their own: the global random stream is not advanced.
 * Concurrent calls share one measurement.
 *
 * {@linkcode tuneResult} returns the last result; `matmulVariant()` the variant in use.
 */
export function tuneKernels(options: TuneOptions = {}): Promise<TuneResult> {
  pending ??= tune(options).then(async (r) => {
    if (!options.timer) { for (const fn of tuners.values()) await fn(options.force ?? false); }
    return r;
  }).finally(() => pending = null);
  return pending;
}

/** Whether a {@linkcode tuneKernels} call is in progress (`init()` does not start another: a tune that was
 * called before `init()` waits for the device, and the device must not wait for that tune). */
export function tuningInProgress(): boolean {
  return pending !== null;
}

const tuners = new Map<string, (force: boolean) => Promise<unknown>>();

/**
 * Registers the tuner of another kernel family (the fused selective scan registers one when its module
 * loads); {@linkcode tuneKernels} runs them after the matmul's. Each caches its own choice.
 */
export function registerTuner(name: string, fn: (force: boolean) => Promise<unknown>): void {
  tuners.set(name, fn);
}

async function tune(options: TuneOptions): Promise<TuneResult> {
  await acquired();
  const adapter = adapterName();
  const key = tuneCacheKey();
  const cached = options.force ? null : readCache(key);
  if (cached && (cached.confident || cached.unsure >= UNSURE_TRIES)) {
    setMatmulVariant(cached.variant);
    setMatmulGpuSplit(cached.gpuSplit ?? true);
    setMatmulMatvec(cached.matvec ?? true);
    current = { ...cached, fromCache: true, adapter, key };
    return current;
  }
  const overhead = await waitCost();
  const timer = options.timer ? { time: options.timer, dispose() {} } : deviceTimer(overhead);
  const variants = matmulTuneCandidates();
  const flops = TUNE_SIZES.reduce((a, n) => a + 2 * n ** 3, 0);
  const splitBefore = matmulGpuSplit();
  let split: Awaited<ReturnType<typeof tuneGpuSplit>> | null = null;
  let mv: Awaited<ReturnType<typeof tuneMatvec>> | null = null;
  let r: Rounds<MatmulVariant>;
  try {
    setMatmulGpuSplit(true); // the variants are compared as they will run by default
    try {
      r = await timeRounds(variants, async (v) => {
        let ms = 0;
        for (const n of TUNE_SIZES) ms += await timer.time(v, { M: n, K: n, N: n });
        return ms;
      });
    } finally {
      setMatmulGpuSplit(splitBefore); // a failed measurement leaves the settings as they were
    }
    // the split and matvec first: if they fail, the variant does not change
    if (!deviceInfo().isFallbackAdapter) {
      split = await tuneGpuSplit(r.pick, overhead, timer.time);
      mv = await tuneMatvec(r.pick, overhead, timer.time);
    }
  } finally {
    timer.dispose();
  }
  setMatmulVariant(r.pick);
  const gflops: Partial<Record<MatmulVariant, number>> = {};
  for (const v of variants) gflops[v] = flops / r.ms[v] / 1e6;
  const confident = r.confident && (split?.confident ?? true) && (mv?.confident ?? true);
  current = {
    variant: r.pick,
    fromCache: false,
    adapter,
    key,
    gflops,
    sizes: [...TUNE_SIZES],
    measuredAt: new Date().toISOString(),
    gpuSplit: split?.gpuSplit ?? null,
    splitMs: split?.splitMs ?? null,
    matvec: mv?.matvec ?? null,
    matvecMs: mv?.matvecMs ?? null,
    confident,
    spread: r.spread,
    rounds: r.rounds,
    // a forced measurement starts the count afresh: the user asked for this one
    unsure: confident ? 0 : (cached?.unsure ?? 0) + 1,
  };
  writeCache(key, current);
  return current;
}

/** What {@linkcode timeRounds} found. */
interface Rounds<K extends string> {
  /** The fastest candidate by its best time (the first listed on a tie). */
  pick: K;
  /** Whether no rival was left within the noise of the pick ({@linkcode unclearRivals}). */
  confident: boolean;
  /** Each candidate's best time. */
  ms: Record<K, number>;
  /** Each candidate's spread (see {@linkcode TuneResult.spread}). */
  spread: Record<K, number>;
  /** The most rounds any candidate ran. */
  rounds: number;
}

/**
 * Times candidates in interleaved rounds and picks the fastest by its best time. Each round times every
 * candidate still in question once, in reverse order every other round (A B C, C B A, ...): a burst of load,
 * or a drift of the clocks, then hits them alike rather than whichever ran at the time. Load only ever slows
 * a timing, so a candidate's best time is its estimate. After MIN_ROUNDS only the pick and its unclear rivals
 * ({@linkcode unclearRivals}) go on, up to MAX_ROUNDS.
 */
async function timeRounds<K extends string>(
  keys: readonly K[],
  time: (k: K) => Promise<number>,
): Promise<Rounds<K>> {
  const samples = Object.fromEntries(keys.map((k) => [k, [] as number[]])) as Record<K, number[]>;
  const ms = {} as Record<K, number>;
  const spread = {} as Record<K, number>;
  let asked = [...keys];
  let pick = keys[0];
  let confident = false;
  for (let round = 0; round < MAX_ROUNDS && asked.length; round++) {
    for (const k of round % 2 ? [...asked].reverse() : asked) samples[k].push(await time(k));
    for (const k of asked) [ms[k], spread[k]] = bestAndSpread(samples[k]);
    pick = keys.reduce((a, k) => (ms[k] < ms[a] ? k : a));
    if (round + 1 < MIN_ROUNDS) continue;
    const unclear = unclearRivals(ms, spread, pick);
    confident = unclear.length === 0;
    asked = confident ? [] : [pick, ...unclear];
  }
  return { pick, confident, ms, spread, rounds: Math.max(...keys.map((k) => samples[k].length)) };
}

/** The best of some times, and how far (relative) the next best lies above it: Infinity with one time. */
function bestAndSpread(times: readonly number[]): [number, number] {
  const [best, next] = [...times].sort((a, b) => a - b);
  return [best, next === undefined ? Infinity : next / best - 1];
}

/**
 * The rivals that a pick is not clearly ahead of: those whose time (ms, lower is better) exceeds the pick's
 * by no more than twice the larger of the two spreads (relative), where that spread is above
 * {@linkcode TIE_SPREAD}. At or below it the machine measured steadily, and a rival that close is a tie, not
 * worth measuring again. Twice: a spread from a few times is a rough gauge of the noise (on lavapipe under
 * load, `register` once led `subgroup` by 38% with spreads of 26 and 12%, `subgroup` 2-3 times faster
 * idle). A rival without a finite time (one that could not be measured) is never unclear. Empty: a confident
 * pick.
 */
export function unclearRivals<K extends string>(
  ms: Readonly<Record<K, number>>,
  spread: Readonly<Record<K, number>>,
  pick: K,
): K[] {
  return (Object.keys(ms) as K[]).filter((k) => {
    if (k === pick || !Number.isFinite(ms[k])) return false;
    const noise = Math.max(spread[k], spread[pick]);
    return !(noise <= TIE_SPREAD) && !(ms[k] / ms[pick] - 1 > 2 * noise);
  });
}

/** The fixed cost of one wait with no work (best of 3), in ms; timings subtract it. */
export async function waitCost(): Promise<number> {
  let best = Infinity;
  for (let i = 0; i < 3; i++) {
    const t0 = performance.now();
    await sync();
    best = Math.min(best, performance.now() - t0);
  }
  return best;
}

/**
 * Times the `SPLIT_PROBES` with a variant, with the GPU split on and off, and keeps the faster
 * (`setMatmulGpuSplit`). Runs on any adapter (the split applies on GPUs only: on a CPU adapter both ways
 * plan alike unless the adapter is taken for a GPU). `timer` replaces timing on the device (tests).
 */
export async function tuneGpuSplit(
  variant: MatmulVariant,
  overhead: number,
  timer?: ProductTimer,
): Promise<{ gpuSplit: boolean; splitMs: { on: number; off: number }; confident: boolean }> {
  const r = await bothWays(variant, overhead, SPLIT_PROBES, matmulGpuSplit, setMatmulGpuSplit, timer);
  return { gpuSplit: matmulGpuSplit(), splitMs: r.ms, confident: r.confident };
}

/**
 * Times the `MATVEC_PROBES` with a variant, with the matvec kernel on and off (with the GPU split as
 * set), and keeps the faster (`setMatmulMatvec`). As {@linkcode tuneGpuSplit}, it runs on any adapter; only
 * GPU plans take matvec.
 */
export async function tuneMatvec(
  variant: MatmulVariant,
  overhead: number,
  timer?: ProductTimer,
): Promise<{ matvec: boolean; matvecMs: { on: number; off: number }; confident: boolean }> {
  const r = await bothWays(variant, overhead, MATVEC_PROBES, matmulMatvec, setMatmulMatvec, timer);
  return { matvec: matmulMatvec(), matvecMs: r.ms, confident: r.confident };
}

/** Times `probes` with a setting on and off in rounds ({@linkcode timeRounds}: on, off, off, on, ...), back
 * to back between waits so that extra dispatches count, and leaves the faster set (on, on a tie); as it was,
 * should a measurement throw. Returns each way's best ms and whether the choice was clear. */
async function bothWays(
  variant: MatmulVariant,
  overhead: number,
  probes: readonly TuneProduct[],
  get: () => boolean,
  set: (on: boolean) => void,
  timer?: ProductTimer,
): Promise<{ ms: { on: number; off: number }; confident: boolean }> {
  const before = get();
  const device = timer ? null : deviceTimer(overhead);
  const time = timer ?? device!.time;
  try {
    const r = await timeRounds(["on", "off"] as const, async (way) => {
      set(way === "on");
      let ms = 0;
      for (const p of probes) ms += await time(variant, p);
      return ms;
    });
    set(r.pick === "on");
    return { ms: r.ms, confident: r.confident };
  } catch (e) {
    set(before);
    throw e;
  } finally {
    device?.dispose();
  }
}

/**
 * Times products on the device ({@linkcode ProductTimer}): batches of calls between waits, the wait's cost
 * subtracted. A configuration's (variant, product, split and matvec settings) first timing compiles its
 * pipeline untimed and grows its batch until the calls last at least MIN_BATCH_MS (at most MAX_REPS calls);
 * later timings run a batch of that size (grown again where it came out short), so each round costs about
 * MIN_BATCH_MS per product. Operands are made once per product from seeded generators of their own (the
 * global random stream is not advanced) and freed by `dispose`.
 */
function deviceTimer(overhead: number): { time: ProductTimer; dispose: () => void } {
  const operands = new Map<string, [Tensor, Tensor]>();
  const reps = new Map<string, number>();
  const time = async (variant: MatmulVariant, p: TuneProduct) => {
    const opts = { transA: p.transA ?? false, transB: p.transB ?? false };
    const product = JSON.stringify([p.M, p.K, p.N, opts.transA, opts.transB]);
    let ab = operands.get(product);
    if (!ab) {
      const a = rand(opts.transA ? [p.K, p.M] : [p.M, p.K], { seed: 1 });
      try {
        ab = [a, rand(opts.transB ? [p.N, p.K] : [p.K, p.N], { seed: 2 })];
      } catch (e) {
        a.dispose();
        throw e;
      }
      operands.set(product, ab);
    }
    const [a, b] = ab;
    const run = async (n: number) => {
      const t0 = performance.now();
      for (let i = 0; i < n; i++) matmulRaw(a, b, opts, variant).dispose();
      await sync();
      return performance.now() - t0;
    };
    const config = JSON.stringify([variant, product, matmulGpuSplit(), matmulMatvec()]);
    const known = reps.get(config);
    if (known === undefined) await run(1); // compiles the pipeline
    let n = known ?? 1;
    let t = await run(n);
    // a first timing grows its batch until it lasts long enough; a later one takes its time, short or not
    while (known === undefined && grown(n, t - overhead) > n) {
      n = grown(n, t - overhead);
      t = await run(n);
    }
    reps.set(config, grown(n, t - overhead)); // a short batch grows for the next round
    // The wait's fixed cost cancels; keep a floor so a noisy subtraction cannot go to zero.
    return Math.max(t - overhead, t * 0.05) / n;
  };
  const dispose = () => {
    for (const [a, b] of operands.values()) {
      a.dispose();
      b.dispose();
    }
  };
  return { time, dispose };
}

/** The calls a batch of `n` that took `ms` (without the wait) should have to last MIN_BATCH_MS: `n` where it
 * did, else several times more (at most MAX_REPS). */
function grown(n: number, ms: number): number {
  if (ms >= MIN_BATCH_MS || n >= MAX_REPS) return n;
  return Math.min(MAX_REPS, n * Math.max(2, Math.ceil(MIN_BATCH_MS / Math.max(ms, 1))));
}

/** `localStorage`, or null where the platform lacks it or refuses access. */
function storage(): Storage | null {
  try {
    return (globalThis as { localStorage?: Storage }).localStorage ?? null;
  } catch {
    return null;
  }
}

/**
 * Removes the cached choices of other kernel versions: keys that start with `family` but not with `current`
 * (a prefix of the family naming this version). Each kernel change bumps the version, and a browser's
 * `localStorage` (a few MiB per origin, shared with the page) would otherwise keep every old choice.
 */
export function dropStaleTuneKeys(family: string, current: string): void {
  try {
    const s = storage();
    if (!s) return;
    const stale: string[] = [];
    for (let i = 0; i < s.length; i++) {
      const k = s.key(i);
      if (k !== null && k.startsWith(family) && !k.startsWith(current)) stale.push(k);
    }
    for (const k of stale) s.removeItem(k);
  } catch {
    // No storage or no permission: nothing was kept there either.
  }
}

/** A cached choice, its measurement's fields checked. An entry from before the confidence was kept (no
 * `confident`) reads as not confident, not yet counted: measured again once, as it may have been measured on
 * a busy machine, which is what the confidence is for. */
function readCache(key: string): Omit<TuneResult, "fromCache" | "adapter" | "key"> | null {
  try {
    const text = storage()?.getItem(key);
    if (!text) return null;
    const v = JSON.parse(text);
    if (!availableMatmulVariants().includes(v?.variant)) return null;
    return {
      variant: v.variant,
      gflops: typeof v.gflops === "object" && v.gflops ? v.gflops : {},
      sizes: Array.isArray(v.sizes) ? v.sizes : [],
      measuredAt: typeof v.measuredAt === "string" ? v.measuredAt : "",
      gpuSplit: typeof v.gpuSplit === "boolean" ? v.gpuSplit : null,
      splitMs: onOff(v.splitMs),
      matvec: typeof v.matvec === "boolean" ? v.matvec : null,
      matvecMs: onOff(v.matvecMs),
      confident: v.confident === true,
      // JSON writes Infinity as null
      spread: typeof v.spread === "object" && v.spread
        ? Object.fromEntries(
          Object.entries(v.spread).map(([k, x]) => [k, typeof x === "number" ? x : Infinity]),
        )
        : {},
      rounds: Number.isInteger(v.rounds) ? v.rounds : 1,
      unsure: Number.isInteger(v.unsure) && v.unsure >= 0 ? v.unsure : 0,
    };
  } catch {
    return null;
  }
}

/** A cached { on, off } pair of ms, or null where malformed. */
function onOff(v: { on?: unknown; off?: unknown } | undefined): { on: number; off: number } | null {
  return typeof v?.on === "number" && typeof v?.off === "number" ? { on: v.on, off: v.off } : null;
}

function writeCache(key: string, r: TuneResult): void {
  try {
    const { fromCache: _, adapter: _a, key: _k, ...entry } = r;
    storage()?.setItem(key, JSON.stringify(entry));
    dropStaleTuneKeys(KEY_PREFIX, `${KEY_PREFIX}${MATMUL_KERNEL_VERSION}/`);
  } catch {
    // No storage, quota or permission: the choice holds for this process only.
  }
}

/** The adapter as the tuner names it: description, vendor, subgroup size (GL and Vulkan llvmpipe differ). */
function adapterName(): string {
  const info = deviceInfo();
  return `${info.description} (${info.vendor || "unknown vendor"}, subgroup ${info.subgroupMaxSize})`;
}

/** The `localStorage` key of the tuner's choice on this adapter and kernel version; needs `init()` first. */
export function tuneCacheKey(): string {
  return `${KEY_PREFIX}${MATMUL_KERNEL_VERSION}/${adapterName()}`;
}
