/**
 * `deno bench` of the selective-scan modes in one Mamba layer: forward + backward of sum(y * G), batch 1,
 * one training step per iteration (each iteration waits once, ~11 ms on software adapters; the steps here
 * take 20 ms to seconds). Each group has `fused` as its baseline, so `deno bench` prints how many times
 * slower pscan and sequential are. bench/scan_report.ts runs the full sweeps (time vs L, d_model, d_state),
 * interleaved, with several steps per wait, and writes bench/results/scan.json.
 *
 * Run: deno bench -A bench/scan_bench.ts
 * (software adapter on Linux: DENO_WEBGPU_BACKEND=vulkan XDG_RUNTIME_DIR=<private dir>)
 */
import { init } from "../core/device.ts";
import { sync } from "../core/executor.ts";
import { MODES, type PreparedLayer, prepareLayer, type TimeMode } from "./scan_report.ts";

await init();

/** Configurations: mamba.py's three axes, one point each around the middle, and a long sequence. */
const CONFIGS = [
  { dModel: 16, N: 16, L: 1024, n: 5 },
  { dModel: 16, N: 16, L: 4096, n: 2 },
  { dModel: 128, N: 16, L: 1024, n: 2 },
  { dModel: 64, N: 64, L: 1024, n: 2 },
];

for (const c of CONFIGS) {
  const group = `d_model ${c.dModel}, N ${c.N}, L ${c.L}`;
  for (const mode of [...MODES, "fused+recompute"] as TimeMode[]) {
    let prepared: PreparedLayer | null = null;
    Deno.bench({
      name: `${mode} (${group})`,
      group,
      baseline: mode === "fused",
      n: c.n,
      warmup: 1,
      async fn(b) {
        if (!prepared) {
          prepared = prepareLayer(mode, c.dModel, c.N, c.L);
          await sync();
        }
        b.start();
        prepared.step();
        await sync();
        b.end();
      },
    });
  }
}
