/**
 * Where a layer step's wall time goes on a GPU (bench/gpu_check.sh's `timeline` phase). On the H200 (49a9be6)
 * the report gave a fused step at d_model 16, L 1024 1.5 ms, with 0.27 ms of host time (recording and
 * submitting) and kernels summing to well under 1 ms. Most of the difference was probably the report's own
 * wait: it sized its batches by one step plus one wait, so 14-18 steps carried a wait of 13-16 ms (fixed
 * since, see `stepMsWithoutWait`). This measures it all directly, per mode and layer, in one loop of k steps
 * recorded back to back and one wait (as bench/scan_report.ts times them):
 *
 * - wall: ms per step from the first recording to the end of the wait (k steps per wait, sized to 250 ms);
 * - host: ms per step spent recording and submitting (the same loop, without the wait);
 * - span: the GPU's ms per step from the start of the batch to its end, idle gaps included (timestamps written
 *   by an empty pass submitted just before the first step and one just after the last);
 * - kernels: the sum of one step's kernel times (`profile()`: each dispatch in its own pass), and the gap,
 *   span minus kernels, per dispatch.
 *
 * Each mode is measured twice: the whole layer, and its SSM part alone (`prepareSsm`: x_proj, dt_proj, the
 * scan, the gate, forward and backward). The layer's other work (norm, in_proj, conv, out_proj, residual and
 * their gradients) is the same in every mode, so the fused layer's host and kernel times less its SSM part's
 * give a floor that no scan kernel can go under, and pscan's layer step over that floor the ceiling of
 * pscan / fused on this adapter. The largest kernels of each step are listed by name (summed per name).
 *
 * First the cost of a wait with nothing in flight (on the H200 the report's batches suggest 13-16 ms). After
 * the tables, the fused step (d_state 16, d_model 64 and 1024) with the scan's backward writing y over its
 * gradient (the default) and into a binding of its own (`setFusedYOverG(false)`), alternated. Then, last, the
 * GPU's own floor per dispatch: n dispatches of one tiny workgroup in one pass, each reading and writing the
 * same buffer (every one depends on the one before) or one of 64 buffers in turn, timed by the pass's
 * timestamps.
 *
 * Run: deno run -A bench/gpu_timeline.ts [--quick]   (needs the timestamp-query feature; --quick: d_model 16
 * and 64 at L 1024 only, for software adapters, where the columns mean less: a submit there runs work on the
 * same two cores that record, so "host" includes some of the adapter's execution, and the profiled kernels,
 * each in its own pass, vary by 30-50% from run to run)
 * @module
 */
import { deviceInfo, gpuDevice, init } from "../core/device.ts";
import { simpleCommandLine } from "../examples/lib/cli.ts";
import { median } from "./report_util.ts";
import { dispatchCount, flush, profile, sync } from "../core/executor.ts";
import { emptyPool } from "../core/memory.ts";
import { setFusedYOverG } from "../scan/fused_run.ts";
import {
  type PreparedLayer,
  prepareLayer,
  prepareSsm,
  stepMsForBatch,
  stepsPerWait,
  type TimeMode,
  timeSteps,
} from "./scan_report.ts";

const quick = simpleCommandLine(
  `Usage: deno run -A bench/gpu_timeline.ts [--quick]

  --quick   d_model 16 and 64 at L 1024 only (software adapters)
  --help    this text`,
  ["quick"],
).values.quick === true; // software adapters: the two small layers only
await init();
if (!deviceInfo().timestampQuery) {
  console.log("gpu_timeline: the adapter has no timestamp-query feature");
  Deno.exit(1);
}
const device = gpuDevice();

/** Two timestamps (ns) written by passes submitted around `work`: the GPU's time from before to after it. */
async function gpuSpanMs(work: () => void | Promise<void>): Promise<number> {
  const set = device.createQuerySet({ type: "timestamp", count: 2 });
  const resolve = device.createBuffer({
    size: 16,
    usage: GPUBufferUsage.QUERY_RESOLVE | GPUBufferUsage.COPY_SRC,
  });
  const read = device.createBuffer({ size: 16, usage: GPUBufferUsage.MAP_READ | GPUBufferUsage.COPY_DST });
  const stamp = (index: number, last: boolean) => {
    const enc = device.createCommandEncoder();
    enc.beginComputePass({ timestampWrites: { querySet: set, beginningOfPassWriteIndex: index } }).end();
    if (last) {
      enc.resolveQuerySet(set, 0, 2, resolve, 0);
      enc.copyBufferToBuffer(resolve, 0, read, 0, 16);
    }
    device.queue.submit([enc.finish()]);
  };
  flush();
  stamp(0, false);
  await work();
  flush();
  stamp(1, true);
  await read.mapAsync(GPUMapMode.READ);
  const [t0, t1] = new BigUint64Array(read.getMappedRange());
  read.unmap();
  for (const b of [resolve, read]) b.destroy();
  set.destroy();
  return Number(t1 - t0) / 1e6;
}

/** One row of the step table. */
interface StepRow {
  mode: TimeMode;
  /** The whole layer's step, or its SSM part alone (`prepareSsm`). */
  part: "layer" | "ssm";
  dModel: number;
  N: number;
  L: number;
  k: number;
  dispatches: number;
  wall: number;
  host: number;
  span: number;
  kernels: number;
  /** The scan's backward kernels in that step (ms). */
  scanBwd: number;
  /** The largest kernels of one step, summed by name (ms). */
  top: [string, number][];
}

async function measureSteps(
  mode: TimeMode,
  part: StepRow["part"],
  dModel: number,
  N: number,
  L: number,
): Promise<StepRow> {
  const p: PreparedLayer = (part === "layer" ? prepareLayer : prepareSsm)(mode, dModel, N, L);
  try {
    let perStep = 0;
    for (let i = 0; i < 3; i++) { // compiles, fills the pool and the caches
      const d0 = dispatchCount();
      p.step();
      perStep = dispatchCount() - d0;
      await sync();
    }
    const est = await stepMsForBatch((n) => timeSteps(p, n), await timeSteps(p, 1), 250);
    const k = stepsPerWait(250, est, 4);
    const wall: number[] = [], host: number[] = [], span: number[] = [];
    for (let r = 0; r < 5; r++) {
      await sync();
      let hostMs = 0;
      const w0 = performance.now();
      const s = await gpuSpanMs(() => {
        const h0 = performance.now();
        for (let i = 0; i < k; i++) p.step();
        flush();
        hostMs = performance.now() - h0;
      });
      wall.push((performance.now() - w0) / k);
      host.push(hostMs / k);
      span.push(s / k);
    }
    const times = await profile(() => p.step());
    const kernels = times.reduce((a, t) => a + t.ms, 0);
    const byName = new Map<string, number>();
    for (const t of times) byName.set(t.name, (byName.get(t.name) ?? 0) + t.ms);
    return {
      mode,
      part,
      dModel,
      N,
      L,
      k,
      dispatches: perStep,
      wall: median(wall),
      host: median(host),
      span: median(span),
      kernels,
      scanBwd: times.filter((t) => /^fused_scan_bwd_N/.test(t.name)).reduce((a, t) => a + t.ms, 0),
      top: [...byName].sort((a, b) => b[1] - a[1]).slice(0, 4),
    };
  } finally {
    p.dispose();
    emptyPool();
    await sync();
  }
}

/** GPU µs per dispatch of one 64-invocation workgroup, `n` in one pass: on one buffer or on 64 in turn. */
async function dispatchFloorUs(n: number, shared: boolean): Promise<number> {
  const module = device.createShaderModule({
    code: `@group(0) @binding(0) var<storage, read_write> a: array<f32>;
@compute @workgroup_size(64) fn main(@builtin(local_invocation_index) i: u32) { a[i] += 1.0; }`,
  });
  const pipeline = device.createComputePipeline({ layout: "auto", compute: { module, entryPoint: "main" } });
  const buffers = Array.from(
    { length: shared ? 1 : 64 },
    () => device.createBuffer({ size: 256, usage: GPUBufferUsage.STORAGE }),
  );
  const groups = buffers.map((buffer) =>
    device.createBindGroup({
      layout: pipeline.getBindGroupLayout(0),
      entries: [{ binding: 0, resource: { buffer } }],
    })
  );
  const us: number[] = [];
  for (let r = 0; r < 6; r++) {
    const ms = await gpuSpanMs(() => {
      const enc = device.createCommandEncoder();
      const pass = enc.beginComputePass();
      pass.setPipeline(pipeline);
      for (let i = 0; i < n; i++) {
        pass.setBindGroup(0, groups[i % groups.length]);
        pass.dispatchWorkgroups(1);
      }
      pass.end();
      device.queue.submit([enc.finish()]);
    });
    if (r > 0) us.push((1000 * ms) / n);
  }
  for (const b of buffers) b.destroy();
  return median(us);
}

/** Ms of a wait with nothing in flight: an empty command buffer submitted, then `onSubmittedWorkDone`. */
async function idleWaitMs(): Promise<number> {
  const ms: number[] = [];
  for (let r = 0; r < 11; r++) {
    await sync();
    const t0 = performance.now();
    device.queue.submit([device.createCommandEncoder().finish()]);
    await device.queue.onSubmittedWorkDone();
    ms.push(performance.now() - t0);
  }
  return median(ms.slice(1));
}

const f = (x: number) => (x >= 10 ? x.toFixed(1) : x.toFixed(3));
console.log(`adapter: ${deviceInfo().description}`);
console.log(`a wait with nothing in flight (empty submit, onSubmittedWorkDone): ${f(await idleWaitMs())} ms`);
console.log(
  "\n| mode | part | d_model | N | L | steps per wait | dispatches per step | wall ms / step | host ms / step | " +
    "GPU span ms / step | kernels ms / step | gap µs / dispatch | largest kernels (ms) |",
);
console.log("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|");
const configs = [
  { dModel: 16, N: 16, L: 1024 },
  { dModel: 16, N: 16, L: 16384 },
  { dModel: 64, N: 16, L: 1024 },
  { dModel: 1024, N: 16, L: 1024 },
].filter((c) => !quick || (c.dModel <= 64 && c.L === 1024));
const rows: StepRow[] = [];
for (const c of configs) {
  const modes: TimeMode[] = [
    "fused",
    "pscan",
    ...(c.dModel === 16 && c.L === 1024 ? ["fused+recompute" as const] : []),
  ];
  for (const mode of modes) {
    for (const part of ["layer", "ssm"] as const) {
      if (mode === "fused+recompute" && part === "ssm") continue; // recompute acts on the whole block
      const r = await measureSteps(mode, part, c.dModel, c.N, c.L);
      rows.push(r);
      const gap = (1000 * (r.span - r.kernels)) / r.dispatches;
      const top = r.top.map(([n, ms]) => `${n} ${ms.toFixed(3)}`).join(", ");
      console.log(
        `| ${r.mode} | ${r.part} | ${r.dModel} | ${r.N} | ${r.L} | ${r.k} | ${r.dispatches} | ${
          f(r.wall)
        } | ` +
          `${f(r.host)} | ${f(r.span)} | ${f(r.kernels)} | ${gap.toFixed(1)} | ${top} |`,
      );
    }
  }
}

// The layer's work outside its SSM part is the same in every mode; a step cannot take less than that part's
// host time or its kernels' time (whichever is longer), however fast the scan. pscan's layer step over that
// floor bounds pscan / fused on this adapter.
console.log(
  "\n| d_model | L | pscan / fused (layer) | pscan / fused (SSM part) | rest of the fused layer: host ms | " +
    "kernels ms | ceiling of pscan / fused (layer) |",
);
console.log("|---:|---:|---:|---:|---:|---:|---:|");
for (const c of configs) {
  const at = (mode: TimeMode, part: StepRow["part"]) =>
    rows.find((r) => r.mode === mode && r.part === part && r.dModel === c.dModel && r.L === c.L)!;
  const [fl, fs, pl, ps] = [
    at("fused", "layer"),
    at("fused", "ssm"),
    at("pscan", "layer"),
    at("pscan", "ssm"),
  ];
  const restHost = Math.max(fl.host - fs.host, 0), restKernels = Math.max(fl.kernels - fs.kernels, 0);
  const floor = Math.max(restHost, restKernels);
  console.log(
    `| ${c.dModel} | ${c.L} | ${(pl.wall / fl.wall).toFixed(2)} | ${(ps.wall / fs.wall).toFixed(2)} | ` +
      `${f(restHost)} | ${f(restKernels)} | ${
        floor > 0 ? (pl.wall / floor).toFixed(1) : "- (noise: the part outlasted the layer)"
      } |`,
  );
}
// Where the scan's backward writes the recomputed y (d_state 16: one state block): over its gradient (the
// default: g bound read-write, no (B, L, ED) tensor) or into a binding of its own (g read-only). Alternated,
// twice each.
console.log(
  "\n| d_model | L | y over g: wall ms / step | kernels ms | scan backward ms | y in its own binding: wall ms | " +
    "kernels ms | scan backward ms |",
);
console.log("|---:|---:|---:|---:|---:|---:|---:|---:|");
for (const dModel of quick ? [64] : [64, 1024]) {
  const runs: StepRow[][] = [[], []];
  for (let rep = 0; rep < 2; rep++) {
    for (const own of [false, true]) {
      setFusedYOverG(!own);
      try {
        runs[+own].push(await measureSteps("fused", "layer", dModel, 16, 1024));
      } finally {
        setFusedYOverG(null);
      }
    }
  }
  const cell = (rs: StepRow[]) =>
    `${f(median(rs.map((r) => r.wall)))} | ${f(median(rs.map((r) => r.kernels)))} | ${
      f(median(rs.map((r) => r.scanBwd)))
    }`;
  console.log(`| ${dModel} | 1024 | ${cell(runs[0])} | ${cell(runs[1])} |`);
}

console.log("\n| dispatches in one pass | buffers | GPU µs per dispatch |");
console.log("|---:|---|---:|");
for (const shared of [true, false]) {
  for (const n of [100, 1000]) {
    const us = await dispatchFloorUs(n, shared);
    console.log(`| ${n} | ${shared ? "one (each depends on the last)" : "64 in turn"} | ${us.toFixed(2)} |`);
  }
}
