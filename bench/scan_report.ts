/**
 * Speed of the three selective-scan modes in a Mamba layer: mamba.py's three comparisons (time vs L, vs
 * d_model, vs d_state) with our modes `fused`, `pscan` and `sequential` (recompute off, so only the scan
 * differs; the time-vs-L sweep also has `fused+recompute`, the default training setting, and `fused+chunked`,
 * the variant in use with chunks of time walked in parallel, which GPUs are meant to want; the d_model sweep is
 * also timed for the SSM part alone, fused and pscan, the work the modes change), plus a roofline of
 * the fused forward kernel, and the dispatch counts and host time per step of each mode (what a step costs the
 * host, which bounds small layers on a fast GPU).
 *
 * Measurement: one step = forward through one Mamba layer, batch 1, then backward from its output y with a
 * fixed random cotangent G (`y.backward(G)`, as torch's; the gradients of sum(y * G) without computing that
 * loss), parameter gradients dropped after each step. Until commit 7e2ccc3 the step computed the loss sum(y * G)
 * and its gradient too: 6 more dispatches (the product, two reductions, the seed, the broadcast, the
 * product's gradient), the same in every mode. For each configuration the modes are prepared side by side and measured
 * interleaved (rep 1: fused, pscan, sequential; rep 2: pscan, sequential, fused; ...: the order rotates, so
 * no mode always runs first or last), so that the machine's load drifts alike for all; each measurement
 * records k steps and waits once (k = the batch time, 250 ms, over the step time, at most 16384) and gives
 * ms per step, the wait's share included (a wait costs about 11 ms on lavapipe, 13-16 ms on the H200: about 5%
 * of a batch). Until the cap was raised from 256, the H200's fast steps (0.24-0.59 ms) and the roofline's
 * calls (0.09-0.22 ms, wait included) hit it: their batches lasted 24-150 ms, and the wait (11.4 ms) was 8-19%
 * of a step's time and up to half of a call's. The step time that sizes k is measured without its wait
 * (`stepMsWithoutWait`), then again over about a batch of steps (`refineStepMs`: over 8 steps a jittery
 * wait made the estimate up to 2.5-3x a step on the H200). Before that function it was one step with its
 * wait, which made the fastest configurations' batches short: 14-18 steps per wait on the H200, each carrying
 * about 0.8 ms of the wait, and 8-16 fused steps at L <= 1024 on lavapipe, about a fifth of whose batch was
 * the wait; the tables give the median over reps. Slow configurations get fewer reps (as few as one) and, once a mode's step takes over
 * 5 s, no warm-up step (its kernels are compiled by then, but the first step also pays for allocating fresh
 * buffers).
 *
 * Run: deno run -A bench/scan_report.ts [--quick]
 * (software adapter on Linux: DENO_WEBGPU_BACKEND=vulkan XDG_RUNTIME_DIR=<private dir>)
 * Writes bench/results/scan.json (with --quick: bench/results/scan_quick.json, smaller sizes), atomically.
 */
import { init } from "../core/device.ts";
import { deviceInfo } from "../core/device.ts";
import {
  dispatchCount,
  flush,
  type KernelTime,
  MAX_DISPATCHES_PER_SUBMIT,
  profile,
  recordCopy,
  sync,
} from "../core/executor.ts";
import { emptyPool } from "../core/memory.ts";
import { full, randn } from "../core/creation.ts";
import { cat, mul, silu, split } from "../core/ops/index.ts";
import { keep, type Tensor, tidy } from "../core/tensor.ts";
import { fusedScanAvailable, Mamba } from "../mamba/block.ts";
import { mambaConfig } from "../mamba/config.ts";
import { forwardWalks, fusedScanForward } from "../scan/fused_run.ts";
import {
  type FusedVariant,
  fusedVariant,
  fusedVariantFor,
  fusedVariantsByProblem,
  setFusedVariant,
  setFusedVariantsByProblem,
} from "../scan/fused_variant.ts";
import { type FusedTuneResult, isFusedScanKernel, tuneFusedScan } from "../scan/tune_fused.ts";
import { simpleCommandLine } from "../examples/lib/cli.ts";
import { median, resultPath, sourceVersion, writeJsonAtomic } from "./report_util.ts";

/** A timed configuration of the layer. */
export type TimeMode = "fused" | "pscan" | "sequential" | "fused+recompute" | "fused+chunked";

/** The modes of mamba.py's comparison, ours. */
export const MODES: readonly TimeMode[] = ["fused", "pscan", "sequential"];

/** One layer, its input and cotangent, ready to step. */
export interface PreparedLayer {
  /** Records one training step (forward, backward, gradients dropped); no wait. */
  step(): void;
  /** Frees everything. */
  dispose(): void;
}

/** The layer's configuration in a mode. */
function layerConfig(mode: TimeMode, dModel: number, N: number) {
  const scan = mode === "fused+recompute" || mode === "fused+chunked" ? "fused" : mode;
  return mambaConfig({ dModel, nLayers: 1, dState: N, scan, recompute: mode === "fused+recompute" });
}

/** Runs `fn` with the mode's fused variant: for "fused+chunked", the one in use with chunks walked in
 * parallel (set around the recording only, so the other modes measured alongside keep theirs). */
function inMode<T>(mode: TimeMode, N: number, fn: () => T): T {
  if (mode !== "fused+chunked") return fn();
  const [before, byProblem] = [fusedVariant(N), fusedVariantsByProblem(N)];
  setFusedVariant(N, { ...before, chunkParallel: true }); // for every shape: it clears the variants by problem
  try {
    return fn();
  } finally {
    setFusedVariant(N, before);
    setFusedVariantsByProblem(N, byProblem);
  }
}

/** Frees the gradients the step left on these tensors (as an optimizer's zeroGrad). */
function dropGrads(tensors: readonly Tensor[]): void {
  for (const t of tensors) {
    t.grad?.dispose();
    t.grad = null;
  }
}

/** Prepares a one-layer Mamba (B = 1) in a mode. */
export function prepareLayer(mode: TimeMode, dModel: number, N: number, L: number): PreparedLayer {
  const model = new Mamba(layerConfig(mode, dModel, N));
  const x = randn([1, L, dModel], { seed: 1 });
  const G = randn([1, L, dModel], { seed: 2 });
  const params = model.parameters(); // held, as an optimizer holds them (walking the modules costs ~15 us)
  return {
    step() {
      inMode(mode, N, () => tidy(() => model.forward(x).backward(G)));
      dropGrads(params);
    },
    dispose() {
      model.dispose();
      x.dispose();
      G.dispose();
    },
  };
}

/**
 * The SSM part of a layer alone, as one mode runs it: x_proj, dt_proj, the selective scan, D x and the gate
 * y * silu(z), forward and backward, from x (B, L, ED) after the conv and xz (B, L, 2ED) after in_proj (whose
 * z half gates). The rest of the layer (the norm, in_proj, the conv, out_proj, the residual add and their
 * gradients) is the same work in every mode: a layer step less this part is what no scan kernel can speed up.
 */
export function prepareSsm(mode: TimeMode, dModel: number, N: number, L: number): PreparedLayer {
  const model = new Mamba(layerConfig(mode, dModel, N));
  const block = model.layers.items[0].mixer;
  const ED = block.config.dInner;
  const x = randn([1, L, ED], { seed: 1 }).requiresGrad_(); // x: (1, L, ED)
  const xz = randn([1, L, 2 * ED], { seed: 2 }).requiresGrad_(); // xz: (1, L, 2ED)
  const G = randn([1, L, ED], { seed: 3 }); // G: (1, L, ED)
  const leaves = [...model.parameters(), x, xz];
  const fusedPath = layerConfig(mode, dModel, N).scan === "fused" && fusedScanAvailable();
  return {
    step() {
      inMode(mode, N, () =>
        tidy(() => {
          if (fusedPath) return block.fusedSsm(x, xz).backward(G); // gated y: (1, L, ED)
          const z = split(xz, ED, -1)[1]; // z: (1, L, ED)
          mul(block.ssm(x).y, silu(z)).backward(G); // y * silu(z): (1, L, ED)
        }));
      dropGrads(leaves);
    },
    dispose() {
      model.dispose();
      for (const t of [x, xz, G]) t.dispose();
    },
  };
}

/** Dispatches one training step records, forward and backward apart (recorded and submitted, not awaited). */
export function countDispatches(
  mode: TimeMode,
  dModel: number,
  N: number,
  L: number,
): { forward: number; backward: number } {
  const model = new Mamba(layerConfig(mode, dModel, N));
  const x = randn([1, L, dModel], { seed: 1 });
  const G = randn([1, L, dModel], { seed: 2 });
  try {
    return inMode(mode, N, () =>
      tidy(() => {
        const d0 = dispatchCount();
        const y = model.forward(x);
        const d1 = dispatchCount();
        y.backward(G);
        return { forward: d1 - d0, backward: dispatchCount() - d1 };
      }));
  } finally {
    model.dispose();
    x.dispose();
    G.dispose();
  }
}

/** Host time of a training step ({@linkcode hostMs}), in ms. */
export interface HostTime {
  /** A step among others, the host busy recording (median). */
  steady: number;
  /** The first step after a wait for the GPU (median): the same work, plus what the wait leaves to the
   * next calls (most likely reclaiming the submission before it), once per wait. */
  first: number;
}

/**
 * Host time of one training step: recording its ops (autograd, buffers, bind groups, command encoding) and
 * submitting them, not waiting for the GPU. Each sample starts with the GPU idle (a wait): it times the first
 * step alone, then records as many more steps as one submit holds (at most 16, as the timed batches do),
 * submits them and divides by the steps, so the per-submit costs (`finish`, `submit`) are shared as there.
 * The first step after a wait costs more, once per wait (1-5 ms more at d_model 16 on this 2-core machine),
 * and more after a larger submission (d_model 64, N 64: the first step takes 1.5 ms after a one-step
 * submission, 2.5-4.3 ms after 15 steps, against 0.41-0.57 ms steady): most likely the reclaiming of that
 * submission, which the wait leaves to the next calls. Creating and finishing an empty encoder right after
 * the wait takes about 1 ms off the step; spinning the CPU for 30 ms first takes nothing off (so it is not
 * the CPU coming back from idle). A training loop on a GPU faster than its host waits only when it reads
 * something back, so `steady` is what bounds it. Medians of `reps` samples. Where the GPU's share of a step
 * is shorter than this, the step takes this long whatever the kernels do: on a GPU small layers are bound by
 * it, and modes compare as their host times, which follow their dispatch counts.
 */
export async function hostMs(
  mode: TimeMode,
  dModel: number,
  N: number,
  L: number,
  reps: number,
): Promise<HostTime> {
  const p = prepareLayer(mode, dModel, N, L);
  try {
    let perStep = 1;
    for (let i = 0; i < 3; i++) { // compiles, fills the buffer pool and the bind-group cache, warms the JIT
      const d0 = dispatchCount();
      p.step();
      perStep = Math.max(1, dispatchCount() - d0);
      await sync();
    }
    // the first step and k more in one submit
    const k = Math.max(1, Math.min(16, Math.floor((MAX_DISPATCHES_PER_SUBMIT - 1) / perStep) - 1));
    const steady: number[] = [];
    const first: number[] = [];
    for (let r = 0; r < reps; r++) {
      await sync();
      const t0 = performance.now();
      p.step();
      const t1 = performance.now();
      for (let i = 0; i < k; i++) p.step();
      flush();
      steady.push((performance.now() - t1) / k);
      first.push(t1 - t0);
    }
    await sync();
    return { steady: median(steady), first: median(first) };
  } finally {
    p.dispose();
    emptyPool();
    await sync();
  }
}

/**
 * Ms per step net of the wait that ends a measurement: `time(n)` gives ms per step of n steps recorded and one
 * wait, `t1` is `time(1)`; n steps and one differ by n - 1 steps, the wait cancelling. (Sizing batches by `t1`
 * alone took the wait, 13-16 ms on the H200, for the step.)
 */
export async function stepMsWithoutWait(
  time: (n: number) => Promise<number>,
  t1: number,
  n = 8,
): Promise<number> {
  const tn = await time(n);
  const net = (n * tn - t1) / (n - 1);
  // t1 slower than n steps (noise, or a first call's compilation): tn, wait share and all, is still an upper
  // bound, where a tiny floor would size a batch of the most steps a wait takes
  return net > 0 ? net : tn;
}

/**
 * A second estimate of a step's time, over as many steps as the first estimate `est` puts in a batch of
 * `batchMs`: there the wait's noise weighs n times less than over 8 steps. (Estimates from 1 and 8 steps came
 * out up to 2.5-3x a step's time on the H200, where a wait of 11.4 ms jitters by milliseconds, and left
 * batches of 80 ms where 250 were meant.) `time` as in {@linkcode stepMsWithoutWait}.
 */
export async function refineStepMs(
  time: (n: number) => Promise<number>,
  est: number,
  batchMs: number,
): Promise<number> {
  const n = stepsPerWait(batchMs, est);
  return n <= 8 ? est : await stepMsWithoutWait(time, await time(1), n);
}

/** A step's time for sizing batches of about `batchMs`: net of the wait over 8 steps, then again over about a
 * batch ({@linkcode stepMsWithoutWait}, {@linkcode refineStepMs}); `t1` is `time(1)`, after any warm-up. */
export async function stepMsForBatch(
  time: (n: number) => Promise<number>,
  t1: number,
  batchMs: number,
): Promise<number> {
  return await refineStepMs(time, await stepMsWithoutWait(time, t1), batchMs);
}

/** The most steps one wait ends: enough that a batch of the fastest calls measured (about 0.05 ms, the
 * roofline's on the H200; a 64 MiB copy there about 0.03 ms) lasts its 250-500 ms, so that the wait's share
 * stays a few percent. */
export const MAX_STEPS_PER_WAIT = 16384;

/** Steps per wait for a batch of about `batchMs` of steps of `stepMs` each: at least `min`, at most
 * {@linkcode MAX_STEPS_PER_WAIT}. */
export function stepsPerWait(batchMs: number, stepMs: number, min = 1): number {
  return Math.max(min, Math.min(MAX_STEPS_PER_WAIT, Math.round(batchMs / stepMs)));
}

/**
 * Steps per wait for batches of about `batchMs` (at least `min`), from `time(n)`: ms per step of n steps
 * recorded and one wait. One untimed call first: a first call compiles and allocates, and in the `t1` of
 * {@linkcode stepMsWithoutWait} it would hide the step's time.
 */
export async function batchSize(
  time: (n: number) => Promise<number>,
  batchMs: number,
  min = 1,
): Promise<number> {
  await time(1);
  return stepsPerWait(batchMs, await stepMsForBatch(time, await time(1), batchMs), min);
}

/** The tuner's result for state size N as the report keeps it: the ten best candidates. */
function tuningSummary(N: number, r: FusedTuneResult): NonNullable<ScanReport["tuning"]>[number] {
  const top = Object.entries(r.timings).sort((a, b) => a[1] - b[1]).slice(0, 10)
    .map(([v, score]): [string, number, number[]] => [v, score, r.problemTimings?.[v] ?? []]);
  return { N, fromCache: r.fromCache, problems: r.problems ?? [], top, byProblem: r.byProblem ?? [] };
}

/** Records `k` steps, waits once; ms per step. */
export async function timeSteps(p: PreparedLayer, k: number): Promise<number> {
  const t0 = performance.now();
  for (let i = 0; i < k; i++) p.step();
  await sync();
  return (performance.now() - t0) / k;
}

/** One measured configuration. */
export interface Row {
  dModel: number;
  N: number;
  L: number;
  /** Median ms per step, per mode. */
  ms: Partial<Record<TimeMode, number>>;
  /** Every measurement (ms per step), per mode. */
  samples: Partial<Record<TimeMode, number[]>>;
  /** Steps per wait, per mode. */
  stepsPerWait: Partial<Record<TimeMode, number>>;
  /** Whether the mode had a warm-up step before its measurements. */
  warmedUp: Partial<Record<TimeMode, boolean>>;
}

/** Settings of a sweep's timing. */
export interface TimingOptions {
  /** Wall time a batch of steps should last (ms). */
  batchMs: number;
  /** Time budget of one configuration's reps (ms), which sets the number of reps. */
  configMs: number;
  /** At most this many reps. */
  maxReps: number;
  /** At least this many reps while one rep costs under `configMs / 2`. */
  minReps: number;
}

/** What a sweep times: the whole layer's step, or its SSM part alone ({@linkcode prepareSsm}). */
export type StepPart = "layer" | "ssm";

/** Times one configuration, modes interleaved. `previous` (ms per step of the last config) skips warm-ups;
 * `part` "ssm" times each mode's SSM part alone ({@linkcode prepareSsm}) instead of the whole layer. */
export async function timeConfig(
  modes: readonly TimeMode[],
  dModel: number,
  N: number,
  L: number,
  opt: TimingOptions,
  previous: Partial<Record<TimeMode, number>> = {},
  part: StepPart = "layer",
): Promise<Row> {
  const row: Row = { dModel, N, L, ms: {}, samples: {}, stepsPerWait: {}, warmedUp: {} };
  const prepare = part === "ssm" ? prepareSsm : prepareLayer;
  const prepared = modes.map((m) => prepare(m, dModel, N, L));
  try {
    const estimate: number[] = [];
    for (const [i, m] of modes.entries()) {
      const p = prepared[i];
      const prev = previous[m] ?? 0;
      if (prev > 5000) {
        estimate.push(prev * 2);
        row.warmedUp[m] = false;
        continue;
      }
      let t = await timeSteps(p, 1); // warm-up (compiles kernels on first use, fills the pool)
      if (t < 2000) t = await timeSteps(p, 1);
      if (t < opt.batchMs) t = await stepMsForBatch((n) => timeSteps(p, n), t, opt.batchMs);
      estimate.push(t);
      row.warmedUp[m] = true;
    }
    const ks = estimate.map((t) => stepsPerWait(opt.batchMs, t));
    const perRep = estimate.reduce((s, t, i) => s + Math.max(t * ks[i], t), 0);
    const reps = perRep > opt.configMs / 2
      ? 1
      : Math.max(opt.minReps, Math.min(opt.maxReps, Math.floor(opt.configMs / perRep)));
    modes.forEach((m, i) => {
      row.samples[m] = [];
      row.stepsPerWait[m] = ks[i];
    });
    for (let r = 0; r < reps; r++) {
      for (let j = 0; j < modes.length; j++) {
        const i = (r + j) % modes.length; // rotate the order from one rep to the next
        row.samples[modes[i]]!.push(await timeSteps(prepared[i], ks[i]));
      }
    }
    for (const m of modes) row.ms[m] = median(row.samples[m]!);
  } finally {
    for (const p of prepared) p.dispose();
    emptyPool();
    await sync();
  }
  return row;
}

/** Copy bandwidth of the adapter: copyBufferToBuffer of a 64 MiB buffer, bytes read + written per second;
 * at least `copies` copies per wait, more where that many take less than about `batchMs` (the roofline's
 * batches, so that the wait that each includes weighs alike). */
export async function copyBandwidth(
  copies: number,
  reps: number,
  batchMs: number,
): Promise<{ GBs: number; samples: number[] }> {
  const n = 16 * 2 ** 20;
  const a = full([n], 1), b = full([n], 0);
  await sync();
  const samples: number[] = [];
  const run = async (k: number) => {
    const t0 = performance.now();
    for (let i = 0; i < k; i++) recordCopy(a.storage.buffer, 0, b.storage.buffer, 0, 4 * n);
    await sync();
    return performance.now() - t0;
  };
  try {
    // As many copies per wait as fill the batch, sized by a copy's time net of the wait. On the H200, 32
    // copies of 64 MiB per wait gave 255 GB/s (49a9be6): 17 ms where the copies alone would take about 1 ms at
    // the 4.3 TB/s that PyTorch's device-to-device copies reach there, so it timed the wait, not the copies.
    // Sizing by 32 copies with their wait (until this change) still took the wait for copies: 724 GB/s there
    // (2d4b27c), in batches far shorter than 250 ms.
    const k = await batchSize(async (c) => await run(c) / c, batchMs, copies);
    for (let r = 0; r < reps; r++) samples.push((k * 2 * 4 * n) / (await run(k) / 1000) / 1e9);
  } finally {
    a.dispose();
    b.dispose();
  }
  return { GBs: median(samples), samples };
}

/** Roofline case of the fused forward kernel. */
export interface RooflineRow {
  dModel: number;
  ED: number;
  N: number;
  L: number;
  /** Minimal bytes: read x, draw, z (B, L, ED) and B, C (B, L, 2N) once, write y (B, L, ED). Not counted:
   * the chunk states hs written (`stateBytes`), and each further state block's re-reads of x, draw, z, B, C
   * and read-modify-write of y. */
  bytes: number;
  /** Bytes of the chunk states hs (B, ED, chunks, N) that the forward also writes (absent in reports
   * written before it was recorded). */
  stateBytes?: number;
  /** Dispatches per call (absent in older reports): the parameters' pack and one per state block (ceil(N /
   * Nb)), each walking all L steps; with chunks in parallel also the local walks (one per block) and the
   * chain. */
  dispatchesPerCall?: number;
  /** How the forward walked (absent in older reports): chunk length Lc, and where it walked chunks in
   * parallel, "parallel" and its walk Lf where that is longer than Lc. */
  walk?: string;
  /** Median ms per kernel call (many calls per wait), writing every chunk state (a training forward). */
  ms: number;
  /** bytes / time. */
  GBs: number;
  /** Median ms per call writing the last state only (an inference forward, `states` "last"), measured
   * alternately with `ms` (absent in older reports). */
  msInference?: number;
  /** bytes / msInference (absent in older reports). */
  GBsInference?: number;
  /** State updates h = a h + b x per second (L * ED * N per call), in units of 1e9. */
  GUpdatesPerS: number;
  /** Calls per wait. */
  callsPerWait: number;
}

/** Times `fusedScanForward` (gated, R = ceil(dModel / 16)) with many calls per wait, writing every chunk state
 * (training) and the last only (inference), alternately. */
export async function rooflineFused(
  dModel: number,
  N: number,
  L: number,
  batchMs: number,
  reps: number,
): Promise<RooflineRow> {
  const ED = 2 * dModel;
  const R = Math.ceil(dModel / 16);
  const t = tidy(() => ({
    x: keep(randn([1, L, ED], { seed: 1 })),
    draw: keep(randn([1, L, ED], { seed: 2, std: 0.5 })),
    dBC: keep(randn([1, L, R + 2 * N], { seed: 3 })),
    par: keep(
      cat([randn([ED], { seed: 4 }), randn([ED * N], { seed: 5, std: 0.3 }), randn([ED], { seed: 6 })]),
    ),
    z: keep(randn([1, L, ED], { seed: 7 })),
  }));
  const call = (states: "all" | "last") => {
    const r = fusedScanForward(t.x, t.draw, t.dBC, [t.par], t.z, { R, N, gated: true }, states);
    r.y.dispose();
    r.ph.dispose();
  };
  const samples: number[] = [];
  const inference: number[] = [];
  let k = 1;
  let stateBytes = 0;
  let dispatchesPerCall = 0;
  let walk = "";
  try {
    const d0 = dispatchCount();
    const first = fusedScanForward(t.x, t.draw, t.dBC, [t.par], t.z, { R, N, gated: true });
    dispatchesPerCall = dispatchCount() - d0;
    const v = fusedVariantFor(N, 1, L, ED);
    const parallel = forwardWalks(v, L) > 1; // as the forward walks this call
    walk = `Lc ${v.Lc}${parallel ? `, parallel${v.Lf && v.Lf > v.Lc ? `, Lf ${v.Lf}` : ""}` : ""}`;
    stateBytes = 4 * (first.ph.size - t.par.size); // ph = [par | hs]
    first.y.dispose();
    first.ph.dispose();
    const run = async (n: number, states: "all" | "last" = "all") => {
      const t0 = performance.now();
      for (let i = 0; i < n; i++) call(states);
      await sync();
      return (performance.now() - t0) / n;
    };
    await run(1);
    await run(1, "last");
    const perCall = await stepMsForBatch(run, await run(1), batchMs);
    k = stepsPerWait(batchMs, perCall);
    for (let r = 0; r < reps; r++) {
      // alternately, the order swapped each rep
      const order: ("all" | "last")[] = r % 2 ? ["last", "all"] : ["all", "last"];
      for (const states of order) (states === "all" ? samples : inference).push(await run(k, states));
    }
  } finally {
    for (const v of Object.values(t) as Tensor[]) v.dispose();
    emptyPool();
    await sync();
  }
  const ms = median(samples);
  const msInference = median(inference);
  const bytes = 4 * (4 * L * ED + 2 * L * N);
  const GUpdatesPerS = (L * ED * N) / (ms / 1000) / 1e9;
  return {
    dModel,
    ED,
    N,
    L,
    bytes,
    stateBytes,
    dispatchesPerCall,
    walk,
    ms,
    GBs: bytes / (ms / 1000) / 1e9,
    msInference,
    GBsInference: bytes / (msInference / 1000) / 1e9,
    GUpdatesPerS,
    callsPerWait: k,
  };
}

/** GPU time of one training step by kernel (timestamp queries). */
export interface BreakdownRow {
  dModel: number;
  N: number;
  L: number;
  mode: TimeMode;
  /** Sum of all kernel times (ms); each dispatch runs in its own pass while profiling. */
  totalMs: number;
  /** Time of the scan kernels: fused_scan_* (with the reduction passes of the fused backward's parameter sums)
   * or pscan_* / scan_sequential (ms). */
  scanMs: number;
  dispatches: number;
  /** The kernels that took longest, summed by name (ms). */
  top: { name: string; ms: number }[];
}

/** Profiles one step (after a warm-up step) with timestamp queries. */
export async function breakdown(mode: TimeMode, dModel: number, N: number, L: number): Promise<BreakdownRow> {
  const p = prepareLayer(mode, dModel, N, L);
  try {
    p.step();
    await sync();
    const times = await profile(async () => {
      p.step();
      await sync();
    });
    const by = new Map<string, number>();
    for (const t of times) by.set(t.name, (by.get(t.name) ?? 0) + t.ms);
    // the scan's kernels, with the fused backward's reduction passes of its parameter sums
    const fused = isFusedScanKernel(times);
    const isScan = (t: KernelTime, i: number) => fused[i] || /^(pscan_|scan_sequential)/.test(t.name);
    return {
      dModel,
      N,
      L,
      mode,
      totalMs: times.reduce((a, t) => a + t.ms, 0),
      scanMs: times.filter(isScan).reduce((a, t) => a + t.ms, 0),
      dispatches: times.length,
      top: [...by].sort((a, b) => b[1] - a[1]).slice(0, 4).map(([name, ms]) => ({ name, ms })),
    };
  } finally {
    p.dispose();
    emptyPool();
    await sync();
  }
}

// ------------------------------------------------------------------------------------------ report

/** The whole report's data, as written to bench/results/scan.json. */
export interface ScanReport {
  adapter: string;
  deno: string;
  date: string;
  quick: boolean;
  /** Commit measured, and runtime files changed since it. */
  source: { commit: string; uncommitted: string[] };
  /** Fused-scan kernel variant per state size. */
  fusedVariants: FusedVariant[];
  /** What the tuner measured for each state size (absent in older reports): its problems, and the fastest
   * candidates with their score and their time on each problem (empty where it measured nothing, or read its
   * choice from the cache: then `fromCache`). */
  tuning?: {
    N: number;
    fromCache: boolean;
    problems: number[][];
    top: [string, number, number[]][];
    /** The fastest variant on each problem, for calls near it in shape (several problems only). */
    byProblem?: { problem: number[]; variant: FusedVariant }[];
  }[];
  timing: TimingOptions;
  sweeps: {
    L: { fixed: { dModel: number; N: number }; modes: TimeMode[]; rows: Row[] };
    dModel: { fixed: { N: number; L: number }; modes: TimeMode[]; rows: Row[] };
    dState: { fixed: { dModel: number; L: number }; modes: TimeMode[]; rows: Row[] };
    /** The d_model sweep's SSM part alone ({@linkcode prepareSsm}): the work the scan modes change, without the
     * layer's matmuls, norm, conv and residual, which every mode runs alike (absent in older reports). */
    dModelSsm?: { fixed: { N: number; L: number }; modes: TimeMode[]; rows: Row[] };
  };
  roofline: { copyGBs: number; copySamples: number[]; rows: RooflineRow[] };
  dispatches: {
    dModel: number;
    N: number;
    L: number;
    mode: TimeMode;
    forward: number;
    backward: number;
    /** Host time per step ({@linkcode hostMs}; absent in reports written before it was measured). */
    host?: HostTime;
  }[];
  /** Per-kernel GPU time of one step (empty without timestamp queries). */
  breakdown: BreakdownRow[];
  seconds: number;
}

const fmtMs = (x: number | undefined) =>
  x === undefined ? "-" : x >= 100 ? x.toFixed(0) : x >= 10 ? x.toFixed(1) : x.toFixed(2);
const fmtRatio = (a: number | undefined, b: number | undefined) =>
  a === undefined || b === undefined ? "-" : (a / b).toFixed(2);

/** Markdown table of a sweep: ms per step per mode and the ratios to fused. */
export function sweepTable(
  key: "L" | "dModel" | "N",
  label: string,
  modes: readonly TimeMode[],
  rows: Row[],
): string {
  const others = modes.filter((m) => m !== "fused");
  const head = [label, ...modes.map((m) => `${m} (ms)`), ...others.map((m) => `${m} / fused`), "reps"];
  const lines = [`| ${head.join(" | ")} |`, `|${head.map(() => "---:").join("|")}|`];
  for (const r of rows) {
    const reps = Math.min(...modes.map((m) => r.samples[m]?.length ?? 0));
    lines.push(
      `| ${
        [
          r[key],
          ...modes.map((m) => fmtMs(r.ms[m])),
          ...others.map((m) => fmtRatio(r.ms[m], r.ms.fused)),
          reps,
        ].join(" | ")
      } |`,
    );
  }
  return lines.join("\n");
}

/** Markdown tables of the whole report. */
export function reportMarkdown(rep: ScanReport): string {
  const s = rep.sweeps;
  const out = [
    `Selective-scan modes in one Mamba layer, forward + backward, batch 1, on ${rep.adapter} ` +
    `(Deno ${rep.deno}, ${rep.date.slice(0, 10)}, commit ${rep.source.commit}` +
    `${rep.source.uncommitted.length ? " + uncommitted changes" : ""}${rep.quick ? ", --quick" : ""}); ` +
    `medians of ms per step.`,
    "",
    `Time vs L (d_model ${s.L.fixed.dModel}, N ${s.L.fixed.N}):`,
    "",
    sweepTable("L", "L", s.L.modes, s.L.rows),
    "",
    `Time vs d_model (N ${s.dModel.fixed.N}, L ${s.dModel.fixed.L}):`,
    "",
    sweepTable("dModel", "d_model", s.dModel.modes, s.dModel.rows),
    "",
    ...(s.dModelSsm
      ? [
        `The same, the SSM part alone (x_proj, dt_proj, the scan, D x and the gate, forward + backward: what ` +
        `the modes change; the layer's norm, in_proj, conv, out_proj and residual, the same work in every ` +
        `mode, left out):`,
        "",
        sweepTable("dModel", "d_model", s.dModelSsm.modes, s.dModelSsm.rows),
        "",
      ]
      : []),
    `Time vs d_state (d_model ${s.dState.fixed.dModel}, L ${s.dState.fixed.L}):`,
    "",
    sweepTable("N", "N", s.dState.modes, s.dState.rows),
    "",
    `Fused forward kernel alone (gated, B = 1) against the copy bandwidth of the same adapter in the same run ` +
    `(copyBufferToBuffer of 64 MiB: ${rep.roofline.copyGBs.toFixed(2)} GB/s, bytes read + written). ` +
    `GB/s and its share of the copy bandwidth count minimal bytes only: read x, draw, z and B, C once, ` +
    `write y. Not counted: the chunk states hs that the forward also writes (column hs), and, where the ` +
    `state is split into blocks (one dispatch per block), each further block's re-reads of x, draw, z, B, C ` +
    `and read-modify-write of y: with 4 blocks the real traffic is about 4-5x the minimal bytes. A training ` +
    `forward writes every chunk state for the backward; an inference forward (a prompt, an evaluation) the ` +
    `last only: both timed, alternately.`,
    "",
    "| d_model | ED | N | L | walk | minimal MiB | hs MiB (not counted) | dispatches | training: ms per call | " +
    "training: GB/s (minimal bytes) | training: / copy bandwidth | state updates (G/s) | inference: ms | " +
    "inference: / copy bandwidth |",
    "|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ...rep.roofline.rows.map((r) =>
      `| ${r.dModel} | ${r.ED} | ${r.N} | ${r.L} | ${r.walk ?? "-"} | ${(r.bytes / 2 ** 20).toFixed(1)} | ` +
      `${r.stateBytes === undefined ? "-" : (r.stateBytes / 2 ** 20).toFixed(2)} | ` +
      `${r.dispatchesPerCall ?? "-"} | ${fmtMs(r.ms)} | ${r.GBs.toFixed(2)} | ` +
      `${(100 * r.GBs / rep.roofline.copyGBs).toFixed(1)}% | ${r.GUpdatesPerS.toFixed(2)} | ` +
      `${r.msInference === undefined ? "-" : fmtMs(r.msInference)} | ` +
      `${
        r.GBsInference === undefined ? "-" : `${(100 * r.GBsInference / rep.roofline.copyGBs).toFixed(1)}%`
      } |`
    ),
    "",
    "Dispatches per layer step (forward / backward) and host time per step (recording steps and submitting " +
    "them, as many as one submit holds, not waiting for the GPU; median): where the GPU's share is shorter, " +
    "a step takes this long, and modes compare as their host times. The first step after a wait for the GPU " +
    "costs more (most likely reclaiming the submission before it), once per wait.",
    "",
  ];
  const cfgs = [...new Set(rep.dispatches.map((d) => `${d.dModel}|${d.N}|${d.L}`))];
  const dmodes = [...new Set(rep.dispatches.map((d) => d.mode))];
  out.push(
    `| d_model | N | L | ${dmodes.join(" | ")} |`,
    `|---:|---:|---:|${dmodes.map(() => "---:").join("|")}|`,
  );
  for (const c of cfgs) {
    const [dModel, N, L] = c.split("|");
    const cells = dmodes.map((m) => {
      const d = rep.dispatches.find((x) => `${x.dModel}|${x.N}|${x.L}` === c && x.mode === m);
      if (!d) return "-";
      const h = d.host;
      const each = h && (1000 * h.steady / (d.forward + d.backward)).toFixed(0);
      const host = h
        ? `, host ${fmtMs(h.steady)} ms (${each} µs each), first after a wait ${fmtMs(h.first)}`
        : "";
      return `${d.forward} / ${d.backward}${host}`;
    });
    out.push(`| ${dModel} | ${N} | ${L} | ${cells.join(" | ")} |`);
  }
  if (rep.breakdown.length) {
    out.push(
      "",
      "Where one step's GPU time goes (timestamp queries, one step after a warm-up; each dispatch in its own " +
        "pass, so totals run a little above the step times):",
      "",
      "| d_model | N | L | mode | GPU ms | scan kernels ms | share | largest kernels (ms) |",
      "|---:|---:|---:|---|---:|---:|---:|---|",
      ...rep.breakdown.map((b) =>
        `| ${b.dModel} | ${b.N} | ${b.L} | ${b.mode} | ${fmtMs(b.totalMs)} | ${fmtMs(b.scanMs)} | ` +
        `${(100 * b.scanMs / b.totalMs).toFixed(0)}% | ${
          b.top.map((t) => `${t.name} ${fmtMs(t.ms)}`).join(", ")
        } |`
      ),
    );
  }
  out.push("", `(${rep.seconds.toFixed(0)} s in all)`);
  return out.join("\n");
}

const USAGE = `Usage: deno run -A bench/scan_report.ts [--quick]

Times the scan modes in one Mamba layer (time vs L, d_model, d_state), the fused forward kernel against the
copy bandwidth, dispatch counts and a per-kernel breakdown; prints markdown tables and writes
bench/results/scan.json (the full run takes tens of minutes on a software adapter).

  --quick   smaller sizes and fewer reps (a minute or two); writes bench/results/scan_quick.json instead
  --help    this text`;

if (import.meta.main) {
  const { values } = simpleCommandLine(USAGE, ["quick"]);
  const quick = values.quick ?? false;
  const start = performance.now();
  await init();
  const timing: TimingOptions = quick
    ? { batchMs: 100, configMs: 1500, maxReps: 2, minReps: 1 }
    : { batchMs: 250, configMs: 40000, maxReps: 5, minReps: 2 };
  const log = (s: string) => console.error(`[${((performance.now() - start) / 1000).toFixed(0)} s] ${s}`);
  // The variant for each state size measured, as the trainer does before its first step (init() tunes N 16 only)
  const tuning: ScanReport["tuning"] = [];
  for (const N of [4, 16, 64]) tuning.push(tuningSummary(N, await tuneFusedScan(N)));
  for (const t of tuning) {
    const best = t.top.slice(0, 3).map(([v, score, each]) =>
      `${score.toFixed(3)}${each.length > 1 ? ` (${each.map((m) => m.toFixed(3)).join(" / ")})` : ""} ${v}`
    );
    log(`fused scan, N ${t.N}${t.fromCache ? " (cached)" : ""}: ${best.join("; ") || "nothing measured"}`);
  }
  log(`fused variants: ${[4, 16, 64].map((n) => JSON.stringify(fusedVariant(n))).join(", ")}`);

  const sweep = async (
    modes: readonly TimeMode[],
    configs: { dModel: number; N: number; L: number }[],
    part: StepPart = "layer",
  ): Promise<Row[]> => {
    const rows: Row[] = [];
    for (const c of configs) {
      const row = await timeConfig(modes, c.dModel, c.N, c.L, timing, rows.at(-1)?.ms, part);
      rows.push(row);
      log(
        `${part === "ssm" ? "SSM part, " : ""}d_model ${c.dModel} N ${c.N} L ${c.L}: ` +
          modes.map((m) => `${m} ${fmtMs(row.ms[m])} ms (x${row.samples[m]!.length})`).join(", "),
      );
    }
    return rows;
  };

  const Ls = quick ? [128, 256, 512, 1024] : [128, 256, 512, 1024, 2048, 4096, 8192, 16384];
  const dModels = quick ? [16, 64, 128] : [16, 32, 64, 128, 256, 512, 1024];
  const Ns = [4, 16, 64];
  const sweepL = quick ? 256 : 1024;
  const lModes: TimeMode[] = [...MODES, "fused+recompute", "fused+chunked"];

  const rowsL = await sweep(lModes, Ls.map((L) => ({ dModel: 16, N: 16, L })));
  const rowsD = await sweep(MODES, dModels.map((dModel) => ({ dModel, N: 16, L: sweepL })));
  const rowsN = await sweep(MODES, Ns.map((N) => ({ dModel: 64, N, L: sweepL })));
  const ssmModes: TimeMode[] = ["fused", "pscan"];
  const rowsDSsm = await sweep(ssmModes, dModels.map((dModel) => ({ dModel, N: 16, L: sweepL })), "ssm");

  const copy = await copyBandwidth(quick ? 8 : 32, quick ? 2 : 5, timing.batchMs * 2); // the roofline's batches
  log(`copy ${copy.GBs.toFixed(2)} GB/s`);
  const roofCases = quick ? [{ dModel: 64, N: 16, L: 1024 }, { dModel: 1024, N: 16, L: 256 }] : [
    { dModel: 16, N: 16, L: 16384 },
    { dModel: 64, N: 16, L: 1024 },
    { dModel: 64, N: 64, L: 1024 },
    { dModel: 1024, N: 4, L: 1024 },
    { dModel: 1024, N: 16, L: 1024 },
    { dModel: 1024, N: 64, L: 1024 },
  ];
  const roof: RooflineRow[] = [];
  for (const c of roofCases) {
    roof.push(await rooflineFused(c.dModel, c.N, c.L, timing.batchMs * 2, quick ? 2 : 5));
    log(`roofline d_model ${c.dModel} N ${c.N} L ${c.L}: ${roof.at(-1)!.GBs.toFixed(2)} GB/s`);
  }

  const dispatches: ScanReport["dispatches"] = [];
  const dispCfgs = quick
    ? [{ dModel: 16, N: 16, L: 1024 }]
    : [{ dModel: 16, N: 16, L: 1024 }, { dModel: 16, N: 16, L: 16384 }, { dModel: 64, N: 64, L: 1024 }];
  for (const c of dispCfgs) {
    for (const mode of lModes) {
      const counts = countDispatches(mode, c.dModel, c.N, c.L);
      await sync();
      dispatches.push({
        ...c,
        mode,
        ...counts,
        host: await hostMs(mode, c.dModel, c.N, c.L, quick ? 5 : 9),
      });
      await sync();
      emptyPool();
    }
  }

  const breakdownRows: BreakdownRow[] = [];
  if (deviceInfo().timestampQuery) {
    const cfgs = quick
      ? [{ dModel: 64, N: 16, L: 256 }]
      : [{ dModel: 16, N: 16, L: 16384 }, { dModel: 64, N: 16, L: 1024 }, { dModel: 64, N: 64, L: 1024 }];
    for (const c of cfgs) {
      for (const mode of MODES) breakdownRows.push(await breakdown(mode, c.dModel, c.N, c.L));
      log(`breakdown d_model ${c.dModel} N ${c.N} L ${c.L}`);
    }
  }

  const report: ScanReport = {
    adapter: deviceInfo().description,
    deno: Deno.version.deno,
    date: new Date().toISOString(),
    quick,
    source: await sourceVersion(),
    fusedVariants: [4, 16, 64].map((n) => fusedVariant(n)),
    tuning,
    timing,
    sweeps: {
      L: { fixed: { dModel: 16, N: 16 }, modes: lModes, rows: rowsL },
      dModel: { fixed: { N: 16, L: sweepL }, modes: [...MODES], rows: rowsD },
      dState: { fixed: { dModel: 64, L: sweepL }, modes: [...MODES], rows: rowsN },
      dModelSsm: { fixed: { N: 16, L: sweepL }, modes: ssmModes, rows: rowsDSsm },
    },
    roofline: { copyGBs: copy.GBs, copySamples: copy.samples, rows: roof },
    dispatches,
    breakdown: breakdownRows,
    seconds: (performance.now() - start) / 1000,
  };
  console.log(reportMarkdown(report));
  const out = resultPath(quick ? "scan_quick.json" : "scan.json");
  await writeJsonAtomic(out, report);
  console.error(`wrote ${out}`);
}
