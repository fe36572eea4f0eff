/**
 * What a run on a new adapter should record first (bench/gpu_check.sh's `adapter` phase): the adapter as
 * WebGPU reports it (features, the limits the kernels depend on, subgroup sizes), what `init()` made of it
 * (subgroup probe, timestamp queries), the matmul variant the tuner chose with each variant's speed, and the
 * fused scan's candidates at d_state 16 with their measured times (the kernels' GPU time by timestamp
 * queries where the adapter has them), fastest first.
 *
 * Run: deno run -A bench/gpu_adapter.ts [--force]   (--force measures again instead of reading the cache)
 * @module
 */
import { deviceInfo, fixedSubgroupSize, init } from "../core/device.ts";
import { tuneKernels } from "../core/tune.ts";
import { tuneFusedScan } from "../scan/tune_fused.ts";
import { simpleCommandLine } from "../examples/lib/cli.ts";

const force = simpleCommandLine(
  `Usage: deno run -A bench/gpu_adapter.ts [--force]

  --force   measure the tuners' candidates again instead of reading the cache
  --help    this text`,
  ["force"],
).values.force === true;

const adapter = await navigator.gpu?.requestAdapter({ powerPreference: "high-performance" });
if (!adapter) {
  console.log("no WebGPU adapter (navigator.gpu.requestAdapter() returned null)");
  Deno.exit(1);
}
const ai = adapter.info as GPUAdapterInfo & { subgroupMinSize?: number; subgroupMaxSize?: number };
console.log(
  "adapter:",
  JSON.stringify({
    vendor: ai.vendor,
    architecture: ai.architecture,
    device: ai.device,
    description: ai.description,
    subgroupMinSize: ai.subgroupMinSize,
    subgroupMaxSize: ai.subgroupMaxSize,
  }),
);
console.log("features:", [...adapter.features].sort().join(", "));
const limitNames = [
  "maxStorageBufferBindingSize",
  "maxBufferSize",
  "maxStorageBuffersPerShaderStage",
  "maxComputeWorkgroupStorageSize",
  "maxComputeInvocationsPerWorkgroup",
  "maxComputeWorkgroupSizeX",
  "maxComputeWorkgroupsPerDimension",
  "minStorageBufferOffsetAlignment",
] as const;
console.log(
  "adapter limits:",
  JSON.stringify(Object.fromEntries(limitNames.map((k) => [k, adapter.limits[k]]))),
);

let t0 = performance.now();
await init({ tune: false });
const info = deviceInfo();
console.log(`init: ${(performance.now() - t0).toFixed(0)} ms`);
console.log("deviceInfo:", JSON.stringify({ ...info, limits: undefined }));
console.log("fixed subgroup size:", fixedSubgroupSize());

t0 = performance.now();
const mm = await tuneKernels({ force }); // the matmul, then every registered tuner (the fused scan at N 16)
console.log(`tuning: ${(performance.now() - t0).toFixed(0)} ms${mm.fromCache ? " (cached)" : ""}`);
console.log(`matmul: ${mm.variant}; GFLOP/s`, JSON.stringify(mm.gflops), "sizes", JSON.stringify(mm.sizes));
// how sure: each variant's spread over its rounds (a busy machine shows there); whether every choice was clear
console.log(
  `  ${mm.confident ? "confident" : `not confident (${mm.unsure} in a row)`}, ${mm.rounds} rounds; spread`,
  JSON.stringify(mm.spread),
);
// GPUs: the split over K timed both ways (ms of the tuner's probes) and the one kept
console.log(`matmul split over K on GPUs: ${mm.gpuSplit ?? "not measured"}; ms`, JSON.stringify(mm.splitMs));
console.log(`matmul matvec kernel on GPUs: ${mm.matvec ?? "not measured"}; ms`, JSON.stringify(mm.matvecMs));

const fused = await tuneFusedScan(16); // cached by now: the measurement tuneKernels just made
console.log(`fused scan, d_state 16: ${JSON.stringify(fused.variant)}`);
console.log(`  ${fused.confident ? "confident" : `not confident (${fused.unsure} in a row)`}`);
const shapes = fused.problems.map((p) => `(${p.join(", ")})`);
console.log(
  `  ms per forward + backward of ${shapes.join(" and ")}` +
    `${shapes.length > 1 ? " (score: their geometric mean)" : ""}, fastest first; those measured again ` +
    "count each problem's median (the later measurements in brackets, then the spread):",
);
for (const [v, ms] of Object.entries(fused.timings).sort((a, b) => a[1] - b[1])) {
  const each = shapes.length > 1 ? fused.problemTimings[v].map((m) => m.toFixed(3).padStart(9)).join("") : "";
  const again = fused.confirmations?.[v]
    ? `  [${fused.confirmations[v].map((r) => r.map((m) => m.toFixed(3)).join(" / ")).join(", ")}] ` +
      `${((fused.spread?.[v] ?? NaN) * 100).toFixed(1)}%`
    : "";
  console.log(`  ${ms.toFixed(3).padStart(9)}${each}  ${v}${again}`);
}
