/**
 * `deno bench` of the core runtime: elementwise bandwidth against buffer copies, matmul per variant, and
 * dispatch overhead. Each iteration records a fixed number of operations (named in the bench) and waits
 * once, so on a fast GPU the small cases are dominated by the ~11 ms wait; `core_report.ts` sizes the
 * batches per adapter and prints rates (GB/s, GFLOP/s, us per dispatch) instead.
 *
 * Groups hold cases of the same work and operations per wait, so the ratios `deno bench` prints compare
 * like with like: `elementwise` (add against its baseline, the buffer copy), one group per matmul size
 * (`matmul 256^3`, ...: the variants against `register`, which every adapter has) and `dispatch` (the
 * tiny kernel as baseline) and one per embedding vocabulary (the path before 2026-11-29 as baseline).
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
  if (c.group.startsWith("embedding")) return c.group.endsWith(" 65") ? 8 : 1;
  const n = c.size!;
  return n <= 256 ? 16 : n <= 512 ? 4 : 1;
}

/** The `deno bench` group: one per matmul size. */
const benchGroup = (c: BenchCase) => (c.group === "matmul" ? `matmul ${c.size}^3` : c.group);

/** The case the others of its group are compared with. */
function isBaseline(c: BenchCase): boolean {
  if (c.group === "matmul") return c.name.endsWith(" register");
  return c.name.startsWith("copyBufferToBuffer") || c.name === "tiny kernel dispatch" ||
    c.name.includes("(before");
}

/** The case whose buffers are allocated: benches run one after another, so a bench that starts frees the
 * previous one's (a 1024^3 matmul's or the 64 MiB buffers would otherwise stay for the whole run). */
let live: { c: BenchCase; p: Prepared } | null = null;
async function preparedFor(c: BenchCase): Promise<Prepared> {
  if (live?.c === c) return live.p;
  live?.p.dispose();
  live = null;
  const p = c.prepare();
  await sync();
  live = { c, p };
  return p;
}

for (const c of coreCases()) {
  const ops = opsPerIteration(c);
  Deno.bench({
    name: `${c.name} (x${ops} per wait)`,
    group: benchGroup(c),
    baseline: isBaseline(c),
    n: c.group === "dispatch" ? 20 : 5,
    warmup: 1,
    async fn(b) {
      const prepared = await preparedFor(c);
      b.start();
      await timeBatch(prepared, ops);
      b.end();
    },
  });
}
