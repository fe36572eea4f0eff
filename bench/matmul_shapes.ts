/**
 * The matmul variants at a Mamba layer's own shapes: in_proj, x_proj and out_proj forward, and their input and
 * weight gradients (y = x W^T as nn.Linear; the weight gradient g^T x reads g
 * transposed). `tuneKernels` picks a variant from square products; this shows whether that choice also wins at
 * the skinny shapes a layer runs (d_model 64, L 1024 by default).
 *
 * Measurement: per shape and variant, one untimed call (compilation), then the median of 21 calls' kernel times
 * by timestamp queries (`profile()`) where the adapter has them, a call's time the sum of its dispatches. Otherwise 5 batches of calls between two
 * waits, each batch about 100 ms of calls (sized net of a wait, as bench/scan_report.ts sizes its steps); the
 * median batch less one wait, per call. (Batches of 20 calls less a fixed 11 ms, as before, measured mostly
 * the wait on a GPU, where a wait costs 13-16 ms and 20 calls well under 1 ms.)
 *
 * Each variant runs twice: with a GPU's split over K (`matmulGpuSplit` on; on a CPU adapter, the adapter taken
 * for a GPU for the call) and without it (as GPUs planned until 2026-11-30; on a CPU adapter, its own plans).
 * On a GPU the two columns are that change's A/B, in one run; the tuner makes the same choice there from
 * probes. Decoding's rows (M = 1) are matrix-vector products: with K of at least 256 (d_model 768: in_proj,
 * x_proj, out_proj) a GPU takes the matvec kernel, split or not; for those rows the split column times matvec,
 * the no-split column the unsplit product without it, and a third the split's slices and sum
 * (`setMatmulMatvec(false)`).
 *
 * Run: deno run -A bench/matmul_shapes.ts [--d-model N] [--tokens L]
 * (software adapter on Linux: DENO_WEBGPU_BACKEND=vulkan XDG_RUNTIME_DIR=<private dir>)
 * Prints a markdown table; writes bench/results/matmul_shapes.json atomically (matmul_shapes_d<N>_L<L>.json for
 * other sizes).
 */
import { parseArgs } from "node:util";
import { deviceInfo, init } from "../core/device.ts";
import { profile, sync } from "../core/executor.ts";
import { randn } from "../core/creation.ts";
import {
  availableMatmulVariants,
  matmulGpuSplit,
  matmulMatvec,
  matmulPlan,
  matmulRaw,
  type MatmulVariant,
  setMatmulGpuSplit,
  setMatmulMatvec,
} from "../core/ops/matmul.ts";
import { intFlag, parseCommandLine } from "../examples/lib/cli.ts";
import { median, resultPath, sourceVersion, writeJsonAtomic } from "./report_util.ts";
import { stepMsForBatch, stepsPerWait } from "./scan_report.ts";

const USAGE = `Usage: deno run -A bench/matmul_shapes.ts [options]

  --d-model <n>   model width (default 64; ED = 2 d_model, dt rank ceil(d_model / 16), N 16)
  --tokens <n>    B x L rows (default 1024)
  --help          this text`;

/** One product: C (M, N) = op(A) op(B), with K the inner size. */
interface Shape {
  label: string;
  M: number;
  K: number;
  N: number;
  transA: boolean;
  transB: boolean;
}

function layerShapes(d: number, L: number): Shape[] {
  const ED = 2 * d, R = Math.ceil(d / 16), xw = R + 32;
  return [
    { label: "in_proj forward", M: L, K: d, N: 2 * ED, transA: false, transB: true },
    { label: "in_proj input gradient", M: L, K: 2 * ED, N: d, transA: false, transB: false },
    { label: "in_proj weight gradient", M: 2 * ED, K: L, N: d, transA: true, transB: false },
    { label: "x_proj forward", M: L, K: ED, N: xw, transA: false, transB: true },
    { label: "x_proj input gradient", M: L, K: xw, N: ED, transA: false, transB: false },
    { label: "x_proj weight gradient", M: xw, K: L, N: ED, transA: true, transB: false },
    { label: "out_proj forward", M: L, K: ED, N: d, transA: false, transB: true },
    { label: "out_proj input gradient", M: L, K: d, N: ED, transA: false, transB: false },
    { label: "out_proj weight gradient", M: d, K: L, N: ED, transA: true, transB: false },
    { label: "decoding's in_proj", M: 1, K: d, N: 2 * ED, transA: false, transB: true },
    { label: "decoding's x_proj", M: 1, K: ED, N: xw, transA: false, transB: true },
    { label: "decoding's out_proj", M: 1, K: ED, N: d, transA: false, transB: true },
  ];
}

/** `fn` with or without a GPU's split over K (see the module's doc), and with or without its matvec kernel;
 * the settings are restored after. */
async function withSplit<T>(split: boolean, fn: () => Promise<T>, matvec = true): Promise<T> {
  const info = deviceInfo() as { isFallbackAdapter: boolean };
  const [fallback, was, wasMatvec] = [info.isFallbackAdapter, matmulGpuSplit(), matmulMatvec()];
  if (split) info.isFallbackAdapter = false;
  setMatmulGpuSplit(split);
  setMatmulMatvec(matvec);
  try {
    return await fn();
  } finally {
    info.isFallbackAdapter = fallback;
    setMatmulGpuSplit(was);
    setMatmulMatvec(wasMatvec);
  }
}

/** Whether a GPU runs `s` with the matvec kernel (a few rows against a weight; split on or off). */
function takesMatvec(s: Shape): Promise<boolean> {
  return withSplit(
    true,
    () => Promise.resolve(matmulPlan(s.M, s.K, s.N, s).kernel.startsWith("matmul_matvec")),
  );
}

async function msPerCall(s: Shape, v: MatmulVariant): Promise<number> {
  const a = randn(s.transA ? [s.K, s.M] : [s.M, s.K], { seed: 1 });
  const b = randn(s.transB ? [s.N, s.K] : [s.K, s.N], { seed: 2 });
  const opts = { transA: s.transA, transB: s.transB };
  try {
    matmulRaw(a, b, opts, v).dispose();
    await sync();
    const call = () => matmulRaw(a, b, opts, v).dispose();
    if (deviceInfo().timestampQuery) {
      const calls = 21;
      const times = await profile(() => {
        for (let i = 0; i < calls; i++) call();
      });
      // a call may be several dispatches (split K: the products, then their sum): a call's time is the sum
      // of its own (before 2026-11-30 this took the median over every dispatch, about half for such calls)
      const per = times.length / calls;
      if (!Number.isInteger(per)) throw new Error(`${times.length} dispatches for ${calls} calls`);
      const sums = Array.from({ length: calls }, (_, i) => times.slice(i * per, (i + 1) * per));
      return median(sums.map((ts) => ts.reduce((a, t) => a + t.ms, 0)));
    }
    const time = async (n: number) => {
      const t0 = performance.now();
      for (let i = 0; i < n; i++) call();
      await sync();
      return (performance.now() - t0) / n;
    };
    const t1 = await time(1);
    const net = await stepMsForBatch(time, t1, 100); // ms per call without the wait
    const k = stepsPerWait(100, net, 8);
    const wait = t1 - net; // one call and its wait, less the call
    const batches: number[] = [];
    for (let r = 0; r < 5; r++) batches.push(((await time(k)) * k - wait) / k);
    return median(batches);
  } finally {
    a.dispose();
    b.dispose();
  }
}

if (import.meta.main) {
  const { d, L } = parseCommandLine(USAGE, () => {
    const { values } = parseArgs({
      args: Deno.args,
      strict: true,
      options: { "d-model": { type: "string" }, tokens: { type: "string" }, help: { type: "boolean" } },
    });
    // the flags are checked here, so that a bad value prints the usage
    const d = intFlag("d-model", values["d-model"], 64, 1);
    return { values, d, L: intFlag("tokens", values.tokens, 1024, 1) };
  });
  await init();
  const variants = availableMatmulVariants();
  type Times = Partial<Record<MatmulVariant, number>>;
  // Where a GPU takes the matvec kernel (split or not), msSplit times it, msNoSplit the unsplit product
  // without it and msSplitNoMatvec the split's slices and sum: the three ways such a product has run
  const rows: { shape: Shape; msSplit: Times; msNoSplit: Times; msSplitNoMatvec: Times | null }[] = [];
  for (const shape of layerShapes(d, L)) {
    const msSplit: Times = {}, msNoSplit: Times = {};
    const msSplitNoMatvec: Times | null = (await takesMatvec(shape)) ? {} : null;
    for (const v of variants) {
      msSplit[v] = await withSplit(true, () => msPerCall(shape, v));
      msNoSplit[v] = await withSplit(false, () => msPerCall(shape, v), !msSplitNoMatvec);
      if (msSplitNoMatvec) msSplitNoMatvec[v] = await withSplit(true, () => msPerCall(shape, v), false);
    }
    rows.push({ shape, msSplit, msNoSplit, msSplitNoMatvec });
  }
  console.log(
    `\nmatmul ms per call at d_model ${d}, ${L} rows, ${
      deviceInfo().timestampQuery ? "kernel time by timestamp queries" : "wall time less a wait"
    } (${deviceInfo().description}); split: a GPU's split over K, or the matvec kernel for a few rows ` +
      `against a weight (K >= 256); no split: as before it (without matvec); split, no matvec: the split's ` +
      `slices and their sum where matvec would run\n`,
  );
  const heads = variants.flatMap((v) => [`${v}, split`, `${v}, no split`, `${v}, split, no matvec`]);
  console.log(`| shape (M x K x N) | ${heads.join(" | ")} |`);
  console.log(`| --- | ${heads.map(() => "---:").join(" | ")} |`);
  for (const { shape: s, msSplit, msNoSplit, msSplitNoMatvec } of rows) {
    const cells = variants.flatMap((v) => [
      msSplit[v]!.toFixed(3),
      msNoSplit[v]!.toFixed(3),
      msSplitNoMatvec?.[v]?.toFixed(3) ?? "-",
    ]);
    console.log(`| ${s.label} (${s.M} x ${s.K} x ${s.N}) | ${cells.join(" | ")} |`);
  }
  // other sizes than the default's go to their own file, not over the committed one
  const file = d === 64 && L === 1024 ? "matmul_shapes.json" : `matmul_shapes_d${d}_L${L}.json`;
  await writeJsonAtomic(resultPath(file), {
    source: await sourceVersion(),
    adapter: deviceInfo().description,
    timing: deviceInfo().timestampQuery ? "kernel (timestamp queries)" : "wall less a wait",
    dModel: d,
    tokens: L,
    rows,
  });
}
