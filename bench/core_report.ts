/**
 * Measures the core benchmark cases (see core_cases.ts) and prints a markdown table with the adapter's
 * name; writes the numbers to bench/results/core.json.
 *
 * Each case is sized per adapter so that one batch of operations between two waits lasts about 150 ms,
 * then timed over 5 batches; the table gives the median and the best batch, with the fixed cost of a wait
 * subtracted. Cases that are compared are measured interleaved: within a group (elementwise: add and copy;
 * one group per matmul size: its variants; dispatch) every case is prepared first, then batch 1 of each,
 * batch 2 of each, ..., the order rotating from one round to the next, so that the machine's drift (up to
 * 1.5x between periods on a shared machine) hits them alike. add's share of the copy bandwidth is also
 * given as the median of the ratios of batches measured side by side.
 *
 * Run: deno run -A bench/core_report.ts [--quick]
 * (software adapter on Linux: DENO_WEBGPU_BACKEND=vulkan XDG_RUNTIME_DIR=<private dir>)
 * With --quick: matmul at 256^3 and the embedding at V 65 only, 3 batches of about 50 ms per case (a few seconds); writes
 * bench/results/core_quick.json instead.
 */
import { init, sync } from "../mod.ts";
import { tuneKernels, waitCost } from "../core/tune.ts";
import { simpleCommandLine } from "../examples/lib/cli.ts";
import {
  adapterLabel,
  type BenchCase,
  calibrate,
  coreCases,
  type Prepared,
  rate,
  timeBatch,
} from "./core_cases.ts";
import { median, resultPath, sourceVersion, writeJsonAtomic } from "./report_util.ts";

const USAGE = `Usage: deno run -A bench/core_report.ts [--quick]

Measures the core cases (elementwise bandwidth, matmul per variant, dispatch cost), prints a markdown
table and writes bench/results/core.json (the full run takes about 35 s on a software adapter).

  --quick   matmul at 256^3 and the embedding at V 65 only, 3 shorter batches per case (a few seconds); writes
            bench/results/core_quick.json instead
  --help    this text`;

const { values } = simpleCommandLine(USAGE, ["quick"]);
const quick = values.quick ?? false;

const BATCHES = quick ? 3 : 5;
/** Milliseconds one batch of a case is sized to last. */
const BATCH_MS = quick ? 50 : 150;

/** 1-minute load average (other processes share the CPU that a software adapter runs on), or null. */
function load(): number | null {
  try {
    return Deno.loadavg()[0];
  } catch {
    return null;
  }
}

/** Cases measured interleaved: one group per matmul size, else the case's group. */
const groupKey = (c: BenchCase) => (c.group === "matmul" ? `matmul ${c.size}` : c.group);

const loadBefore = load();
await init();
const tune = await tuneKernels();
const waitMs = await waitCost();
interface ResultRow {
  group: string;
  name: string;
  unit: string;
  median: number;
  best: number;
  opsPerWait: number;
  /** Every batch's milliseconds, in measurement order. */
  batchMs: number[];
}
const rows: ResultRow[] = [];
const cases = quick ? coreCases([256], [65]) : coreCases();
const groups = [...new Set(cases.map(groupKey))].map((k) => cases.filter((c) => groupKey(c) === k));
/** Per case: its rate in each batch (measurement order), for ratios of batches measured side by side. */
const batchRates = new Map<string, number[]>();
for (const group of groups) {
  const prepared: Prepared[] = [];
  try {
    for (const c of group) prepared.push(c.prepare());
    await sync();
    const reps: number[] = [];
    for (const p of prepared) reps.push(await calibrate(p, BATCH_MS));
    const batchMs: number[][] = group.map(() => []);
    for (let b = 0; b < BATCHES; b++) {
      for (let j = 0; j < group.length; j++) {
        const i = (b + j) % group.length; // rotate the order from one round to the next
        batchMs[i].push(await timeBatch(prepared[i], reps[i]));
      }
    }
    group.forEach((c, i) => {
      const inOrder = batchMs[i].map((ms) => rate(c, reps[i], ms, waitMs));
      batchRates.set(c.name, inOrder);
      const rates = [...inOrder].sort((a, b) => a - b);
      const lowerIsBetter = c.unit === "us/dispatch" || c.unit === "ms/op";
      rows.push({
        group: c.group,
        name: c.name,
        unit: c.unit,
        median: median(rates),
        best: lowerIsBetter ? rates[0] : rates[rates.length - 1],
        opsPerWait: reps[i],
        batchMs: batchMs[i],
      });
      console.error(`${c.name}: ${rows[rows.length - 1].median.toPrecision(3)} ${c.unit}`);
    });
  } finally {
    for (const p of prepared) p.dispose();
  }
}

const loadAfter = load();
const fmtNum = (x: number) => (x >= 100 ? x.toFixed(0) : x >= 10 ? x.toFixed(1) : x.toFixed(2));
const adapter = adapterLabel();
const add = rows.find((r) => r.name.startsWith("add 16M"));
const copy = rows.find((r) => r.name.startsWith("copyBufferToBuffer"));
const lines = [
  `Core benchmarks on ${adapter} (Deno ${Deno.version.deno}, ${new Date().toISOString().slice(0, 10)}; ` +
  `wait cost ${waitMs.toFixed(1)} ms, subtracted; matmul variant chosen by tuneKernels: ${tune.variant}; ` +
  `load average ${loadBefore?.toFixed(1) ?? "?"} before, ${loadAfter?.toFixed(1) ?? "?"} after` +
  `${quick ? "; --quick" : ""})`,
  "",
  "| group | case | median | best | unit | ops per wait |",
  "|---|---|---:|---:|---|---:|",
  ...rows.map((r) =>
    `| ${r.group} | ${r.name} | ${fmtNum(r.median)} | ${fmtNum(r.best)} | ${r.unit} | ${r.opsPerWait} |`
  ),
];
const addRates = add && batchRates.get(add.name), copyRates = copy && batchRates.get(copy.name);
const addToCopy = addRates && copyRates ? median(addRates.map((a, i) => a / copyRates[i])) : null;
if (add && copy && addToCopy !== null) {
  lines.push(
    "",
    `add reaches ${(100 * add.median / copy.median).toFixed(0)}% of the copy bandwidth (medians; ` +
      `median of the ratios of batches measured side by side: ${(100 * addToCopy).toFixed(0)}%).`,
  );
}
console.log(lines.join("\n"));

const out = resultPath(quick ? "core_quick.json" : "core.json");
await writeJsonAtomic(
  out,
  {
    adapter,
    deno: Deno.version.deno,
    date: new Date().toISOString(),
    source: await sourceVersion(),
    quick,
    batchMs: BATCH_MS,
    waitMs,
    loadAverage: { before: loadBefore, after: loadAfter, cpus: navigator.hardwareConcurrency },
    tune: {
      variant: tune.variant,
      gflops: tune.gflops,
      fromCache: tune.fromCache,
      gpuSplit: tune.gpuSplit,
      splitMs: tune.splitMs,
      matvec: tune.matvec,
      matvecMs: tune.matvecMs,
    },
    interleaved: true,
    addToCopy,
    results: rows,
  },
  2,
);
console.error(`wrote ${out}`);
