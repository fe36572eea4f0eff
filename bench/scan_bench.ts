/**
 * A smoke check of the selective-scan modes in one Mamba layer under `deno bench`: every mode runs its
 * training step (forward, then backward from y with a fixed cotangent G, `y.backward(G)`, batch 1) at four
 * configurations, and `deno bench` prints rough ratios to `fused` (each group's baseline). It is not the
 * measurement the README cites: the modes run one after another, not interleaved, and most configurations
 * average only n = 2 iterations, so the ratios move with the machine's load. bench/scan_report.ts is that
 * measurement (the full sweeps over L, d_model and d_state, modes interleaved in rotating order, medians;
 * bench/results/scan.json).
 *
 * Each iteration records `k` steps and waits once, the same k for every mode of a group, chosen so that the
 * fused steps outlast the one wait per iteration (~11 ms on software adapters) several times: with one step
 * per wait, the wait alone made a 6 ms fused step look 3x slower and pscan only 3.8x slower than fused at
 * L = 1024. Only one mode's layer is allocated at a time: a bench frees the previous bench's.
 *
 * Run: deno bench -A bench/scan_bench.ts
 * (software adapter on Linux: DENO_WEBGPU_BACKEND=vulkan XDG_RUNTIME_DIR=<private dir>)
 */
import { init } from "../core/device.ts";
import { sync } from "../core/executor.ts";
import { emptyPool } from "../core/memory.ts";
import { ensureFusedTuned } from "../scan/tune_fused.ts";
import { MODES, type PreparedLayer, prepareLayer, type TimeMode } from "./scan_report.ts";

await init();
await ensureFusedTuned(64); // as the trainer does before its first step (init() tunes N 16)

/** Configurations: mamba.py's three axes, one point each around the middle, and a long sequence. */
const CONFIGS = [
  { dModel: 16, N: 16, L: 1024, n: 5, k: 16 },
  { dModel: 16, N: 16, L: 4096, n: 2, k: 6 },
  { dModel: 128, N: 16, L: 1024, n: 2, k: 3 },
  { dModel: 64, N: 64, L: 1024, n: 2, k: 2 },
];

/** The layer allocated now, and which bench it is for. */
let live: { key: string; p: PreparedLayer } | null = null;
async function layerFor(key: string, mode: TimeMode, c: (typeof CONFIGS)[number]): Promise<PreparedLayer> {
  if (live?.key === key) return live.p;
  if (live) {
    live.p.dispose();
    live = null;
    emptyPool();
  }
  const p = prepareLayer(mode, c.dModel, c.N, c.L);
  await sync();
  live = { key, p };
  return p;
}

for (const c of CONFIGS) {
  const group = `d_model ${c.dModel}, N ${c.N}, L ${c.L}, x${c.k} per wait`;
  for (const mode of [...MODES, "fused+recompute"] as TimeMode[]) {
    const name = `${mode} (${group})`;
    Deno.bench({
      name,
      group,
      baseline: mode === "fused",
      n: c.n,
      warmup: 1,
      async fn(b) {
        const prepared = await layerFor(name, mode, c);
        b.start();
        for (let i = 0; i < c.k; i++) prepared.step();
        await sync();
        b.end();
      },
    });
  }
}
