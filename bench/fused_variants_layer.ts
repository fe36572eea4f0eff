/**
 * The fused scan's variants measured where they are used: one Mamba layer's training step (batch 1, as
 * bench/scan_report.ts times it), not the tuner's bare scan on its problems (bench/gpu_check.sh's `variants`
 * phase). For d_state 16 it takes the tuner's five best candidates and the fastest on each of its problems, and
 * times a layer step with each, applied to every call (`setFusedVariant`), and with the per-call choice the
 * tuner made (`auto`: `fusedVariantFor`), at several d_model. Variants and `auto` alternate within each rep, in
 * rotating order. On the H200 (49a9be6) the tuner's pick walks chunks in parallel; at d_model 1024 the layer was
 * faster with the variant that walks them in order (11.2 against 13.7 ms, measured in separate runs): this says
 * which variant each layer wants, and whether the per-call choice finds it.
 *
 * Run: deno run -A bench/fused_variants_layer.ts [--quick]   (--quick: d_model 16 and 64 at L 256, 2 reps)
 * @module
 */
import { init } from "../core/device.ts";
import { sync } from "../core/executor.ts";
import { emptyPool } from "../core/memory.ts";
import {
  type FusedVariant,
  fusedVariant,
  fusedVariantsByProblem,
  setFusedVariant,
  setFusedVariantsByProblem,
} from "../scan/fused_variant.ts";
import { tuneFusedScan } from "../scan/tune_fused.ts";
import { simpleCommandLine } from "../examples/lib/cli.ts";
import { median } from "./report_util.ts";
import { batchSize, prepareLayer, timeSteps } from "./scan_report.ts";

const USAGE = `Usage: deno run -A bench/fused_variants_layer.ts [--quick]

Times one Mamba layer's training step (d_state 16, batch 1) with each of the fused-scan tuner's best
variants and with its per-call choice, at several d_model.

  --quick   d_model 16 and 64 at L 256, 2 reps (default: d_model 16, 64, 256 and 1024 at L 1024, 5 reps)
  --help    this text`;

const { values } = simpleCommandLine(USAGE, ["quick"]);
const quick = values.quick ?? false;
await init();
const N = 16;
const TOP = 5; // the tuner's best five (ten did not fit the H200 run's 150 s at eae010e)
const tuned = await tuneFusedScan(N); // cached after init()
const auto = { pick: fusedVariant(N), byProblem: fusedVariantsByProblem(N) };
const named = new Map<string, FusedVariant | null>([["auto", null]]); // null: the tuner's per-call choice
for (const [v] of Object.entries(tuned.timings).sort((a, b) => a[1] - b[1]).slice(0, TOP)) {
  named.set(v, JSON.parse(v) as FusedVariant);
}
for (const p of auto.byProblem) named.set(JSON.stringify(p.variant), p.variant);
named.set(JSON.stringify(auto.pick), auto.pick);

const use = (v: FusedVariant | null) => {
  if (v) return setFusedVariant(N, v);
  setFusedVariant(N, auto.pick);
  setFusedVariantsByProblem(N, auto.byProblem);
};

const L = quick ? 256 : 1024;
const dModels = quick ? [16, 64] : [16, 64, 256, 1024];
const reps = quick ? 2 : 5;
const names = [...named.keys()];
console.log(`tuner: ${tuned.fromCache ? "cached" : "measured"}; problems ${JSON.stringify(tuned.problems)}`);
console.log(`pick ${JSON.stringify(auto.pick)}`);
for (const p of auto.byProblem) {
  console.log(`fastest on ${JSON.stringify(p.problem)}: ${JSON.stringify(p.variant)}`);
}
console.log(
  `\nms per layer step (d_state ${N}, L ${L}, batch 1; medians of ${reps}), each d_model printed as done:\n`,
);
console.log("| d_model | variant | ms per step | / fastest |");
console.log("|---:|---|---:|---:|");
for (const dModel of dModels) {
  const samples = new Map<string, number[]>(names.map((n) => [n, []]));
  const ks = new Map<string, number>();
  for (let r = 0; r < reps; r++) {
    for (let j = 0; j < names.length; j++) {
      const name = names[(r + j) % names.length]; // rotate the order from one rep to the next
      use(named.get(name)!);
      const p = prepareLayer("fused", dModel, N, L);
      try {
        // a warm-up, then steps enough for about 250 ms per wait (until batchSize, the warm-up was also the
        // estimate's t1: a variant's first step compiles its kernels, which left the estimate at its floor)
        if (!ks.has(name)) ks.set(name, await batchSize((n) => timeSteps(p, n), 250));
        else await timeSteps(p, 1);
        samples.get(name)!.push(await timeSteps(p, ks.get(name)!));
      } finally {
        p.dispose();
        emptyPool();
        await sync();
      }
    }
  }
  // printed per d_model, so that a run cut short by its time limit still shows the sizes it finished
  const ms = names.map((n) => [n, median(samples.get(n)!)] as const).sort((a, b) => a[1] - b[1]);
  for (const [n, x] of ms) {
    console.log(`| ${dModel} | ${n} | ${x.toFixed(x < 10 ? 3 : 1)} | ${(x / ms[0][1]).toFixed(2)} |`);
  }
}
use(null);
