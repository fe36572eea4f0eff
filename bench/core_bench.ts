/**
 * `deno bench` of the core runtime: elementwise bandwidth against buffer copies, matmul per variant, and
 * dispatch overhead. Each iteration records a fixed number of operations (named in the bench) and waits
 * once, so on a fast GPU the small cases are dominated by the ~11 ms wait; `core_report.ts` sizes the
 * batches per adapter and prints rates (GB/s, GFLOP/s, us per dispatch) instead.
 *
 * Run: deno bench -A bench/core_bench.ts
 * (software adapter on Linux: DENO_WEBGPU_BACKEND=vulkan XDG_RUNTIME_DIR=<private dir>)
 */
import { init, sync } from "../mod.ts";
import { type BenchCase, coreCases, type Prepared, timeBatch } from "./core_cases.ts";

await init();

/** Operations per iteration (per wait), by group and size. */
function opsPerIteration(c: BenchCase): number {
  if (c.group === "dispatch") return 500;
  if (c.group === "elementwise") return 8;
  const n = Math.round(Math.cbrt(c.work / 2));
  return n <= 256 ? 16 : n <= 512 ? 4 : 1;
}

for (const c of coreCases()) {
  const ops = opsPerIteration(c);
  let prepared: Prepared | null = null;
  Deno.bench({
    name: `${c.name} (x${ops} per wait)`,
    group: c.group,
    n: c.group === "dispatch" ? 20 : 5,
    warmup: 1,
    async fn(b) {
      if (!prepared) {
        prepared = c.prepare();
        await sync();
      }
      b.start();
      await timeBatch(prepared, ops);
      b.end();
    },
  });
}
