/**
 * `deno bench` of the selective-scan modes in one Mamba layer: forward, then backward from y with a fixed
 * cotangent G (`y.backward(G)`), batch 1,
 * `k` training steps per iteration, the same k for every mode of a group, chosen so that the fused steps
 * outlast the one wait per iteration (~11 ms on software adapters) several times: with one step per wait,
 * the wait alone made a 6 ms fused step look 3x slower and pscan only 3.8x slower than fused at L = 1024.
 * Each group has `fused` as its baseline, so `deno bench` prints how many times slower pscan and sequential
 * are. bench/scan_report.ts runs the full sweeps (time vs L, d_model, d_state),
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
  { dModel: 16, N: 16, L: 1024, n: 5, k: 16 },
  { dModel: 16, N: 16, L: 4096, n: 2, k: 6 },
  { dModel: 128, N: 16, L: 1024, n: 2, k: 3 },
  { dModel: 64, N: 64, L: 1024, n: 2, k: 2 },
];

for (const c of CONFIGS) {
  const group = `d_model ${c.dModel}, N ${c.N}, L ${c.L}, x${c.k} per wait`;
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
        for (let i = 0; i < c.k; i++) prepared.step();
        await sync();
        b.end();
      },
    });
  }
}
