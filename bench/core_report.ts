/**
 * Measures the core benchmark cases (see core_cases.ts) and prints a markdown table with the adapter's
 * name; writes the numbers to bench/results/core.json.
 *
 * Each case is sized per adapter so that one batch of operations between two waits lasts about 150 ms,
 * then timed over 5 batches; the table gives the median and the best batch, with the fixed cost of a wait
 * subtracted.
 *
 * Run: deno run -A bench/core_report.ts
 * (software adapter on Linux: DENO_WEBGPU_BACKEND=vulkan XDG_RUNTIME_DIR=<private dir>)
 */
import { init, sync } from "../mod.ts";
import { tuneKernels } from "../core/tune.ts";
import { adapterLabel, calibrate, coreCases, rate, timeBatch } from "./core_cases.ts";
import { waitCost } from "../core/tune.ts";

const BATCHES = 5;

/** 1-minute load average (other processes share the CPU that a software adapter runs on), or null. */
function load(): number | null {
  try {
    return Deno.loadavg()[0];
  } catch {
    return null;
  }
}

const loadBefore = load();
await init();
const tune = await tuneKernels();
const waitMs = await waitCost();
const rows: {
  group: string;
  name: string;
  unit: string;
  median: number;
  best: number;
  opsPerWait: number;
  batchMs: number[];
}[] = [];
for (const c of coreCases()) {
  const p = c.prepare();
  await sync();
  const reps = await calibrate(p);
  const batchMs: number[] = [];
  for (let i = 0; i < BATCHES; i++) batchMs.push(await timeBatch(p, reps));
  p.dispose();
  const rates = batchMs.map((ms) => rate(c, reps, ms, waitMs)).sort((a, b) => a - b);
  const lowerIsBetter = c.unit === "us/dispatch";
  rows.push({
    group: c.group,
    name: c.name,
    unit: c.unit,
    median: rates[Math.floor(rates.length / 2)],
    best: lowerIsBetter ? rates[0] : rates[rates.length - 1],
    opsPerWait: reps,
    batchMs,
  });
  console.error(`${c.name}: ${rows[rows.length - 1].median.toPrecision(3)} ${c.unit}`);
}

const loadAfter = load();
const fmtNum = (x: number) => (x >= 100 ? x.toFixed(0) : x >= 10 ? x.toFixed(1) : x.toFixed(2));
const adapter = adapterLabel();
const add = rows.find((r) => r.name.startsWith("add 16M"));
const copy = rows.find((r) => r.name.startsWith("copyBufferToBuffer"));
const lines = [
  `Core benchmarks on ${adapter} (Deno ${Deno.version.deno}, ${new Date().toISOString().slice(0, 10)}; ` +
  `wait cost ${waitMs.toFixed(1)} ms, subtracted; matmul variant chosen by tuneKernels: ${tune.variant}; ` +
  `load average ${loadBefore?.toFixed(1) ?? "?"} before, ${loadAfter?.toFixed(1) ?? "?"} after)`,
  "",
  "| group | case | median | best | unit | ops per wait |",
  "|---|---|---:|---:|---|---:|",
  ...rows.map((r) =>
    `| ${r.group} | ${r.name} | ${fmtNum(r.median)} | ${fmtNum(r.best)} | ${r.unit} | ${r.opsPerWait} |`
  ),
];
if (add && copy) {
  lines.push(
    "",
    `add reaches ${(100 * add.median / copy.median).toFixed(0)}% of the copy bandwidth (medians).`,
  );
}
console.log(lines.join("\n"));

const out = new URL("./results/core.json", import.meta.url);
await Deno.mkdir(new URL("./results/", import.meta.url), { recursive: true });
await Deno.writeTextFile(
  out,
  JSON.stringify(
    {
      adapter,
      deno: Deno.version.deno,
      date: new Date().toISOString(),
      waitMs,
      loadAverage: { before: loadBefore, after: loadAfter, cpus: navigator.hardwareConcurrency },
      tune: { variant: tune.variant, gflops: tune.gflops, fromCache: tune.fromCache },
      results: rows,
    },
    null,
    2,
  ) + "\n",
);
console.error(`wrote ${out.pathname}`);
