/**
 * Measures the kernel choices again on this adapter and caches them for the tasks (`deno task generate`,
 * `train`, `eval`, `demo`, which share this repository's deno.json and so its `localStorage`): the matmul
 * variant (with the GPU split and matvec on GPUs) and the fused scan's variant for each state size given.
 * Run it on an idle machine: a choice measured while other work loads the machine can be the slower one.
 *
 * ```sh
 * deno task tune                  # matmul, and the fused scan at d_state 16 (as init() does)
 * deno task tune --d-state 16,64  # also d_state 64 (a model's d_state is measured at its first step)
 * ```
 * @module
 */

import { parseArgs } from "node:util";
import { deviceInfo, init } from "../core/device.ts";
import { tuneKernels, type TuneResult } from "../core/tune.ts";
import type { MatmulVariant } from "../core/ops/matmul.ts";
import { type FusedTuneResult, tuneFusedScan } from "../scan/tune_fused.ts";
import { MAX_FUSED_N } from "../scan/fused_variant.ts";
import { parseCommandLine, UsageError } from "./lib/cli.ts";

const USAGE = `Usage: deno task tune [--d-state <n,...>]

Measures the kernel choices again (on an idle machine: a choice measured under load may be the slower
one) and caches them for the tasks of this repository: the matmul variant, and the fused scan's variant
for each state size. Prints each choice, whether it was clearly ahead (confident) and the spreads.

  --d-state <list>   state sizes whose fused-scan variant to measure, comma-separated (default 16)
  -h, --help         this text`;

/** The state sizes of `--d-state` (default [16]); throws {@linkcode UsageError}. */
export function parseStateSizes(v: string | undefined): number[] {
  if (v === undefined) return [16];
  const sizes = v.split(",").map((s) => s.trim());
  for (const s of sizes) {
    if (!/^[1-9][0-9]*$/.test(s) || Number(s) > MAX_FUSED_N) {
      throw new UsageError(
        `--d-state must be integers from 1 to ${MAX_FUSED_N}, comma-separated, got '${v}'`,
      );
    }
  }
  return [...new Set(sizes.map(Number))];
}

/** A relative spread as a percentage ("3.1%"; "-" where it ran once). */
const pct = (s: number) => Number.isFinite(s) ? `${(100 * s).toFixed(1)}%` : "-";

/** The matmul tuner's result as lines. */
export function matmulLines(r: TuneResult): string[] {
  const rows = (Object.entries(r.gflops) as [MatmulVariant, number][]).sort(([, a], [, b]) => b - a)
    .map(([v, g]) =>
      `  ${v.padEnd(9)} ${g.toFixed(1).padStart(7)} GFLOP/s  spread ${pct(r.spread[v] ?? Infinity)}`
    );
  const on = (b: boolean | null) => b === null ? "not measured" : b ? "on" : "off";
  return [
    `matmul: ${r.variant} (${r.confident ? "confident" : "not confident: measured again at the next start"})`,
    ...rows,
    `  GPU split ${on(r.gpuSplit)}, matvec ${on(r.matvec)}`,
  ];
}

/** The fused tuner's result for state size N as lines. */
export function fusedLines(N: number, r: FusedTuneResult): string[] {
  const best = Object.entries(r.timings).sort(([, a], [, b]) => a - b).slice(0, 3);
  return [
    `fused scan, d_state ${N}: ${JSON.stringify(r.variant)} (${
      best.length === 0 ? "the only candidate here" : r.confident ? "confident" : "not confident"
    })`,
    ...best.map(([v, ms]) => `  ${ms.toFixed(3)} ms  spread ${pct(r.spread[v] ?? Infinity)}  ${v}`),
  ];
}

async function main(): Promise<void> {
  const { values } = parseCommandLine(USAGE, () => {
    const r = parseArgs({
      args: Deno.args,
      strict: true,
      options: { "d-state": { type: "string" }, help: { type: "boolean", short: "h" } },
    });
    parseStateSizes(r.values["d-state"]);
    return r;
  });
  const sizes = parseStateSizes(values["d-state"]);
  await init({ tune: false }); // measured below, forced, instead of read from the cache
  console.log(`adapter: ${deviceInfo().description}`);
  const t0 = performance.now();
  for (const line of matmulLines(await tuneKernels({ force: true }))) console.log(line);
  for (const N of sizes) {
    // tuneKernels({ force: true }) has just measured d_state 16 (the tuner init() runs): read that one back
    const r = await tuneFusedScan(N, { force: N !== 16 });
    for (const line of fusedLines(N, r)) console.log(line);
  }
  console.log(
    `measured in ${((performance.now() - t0) / 1000).toFixed(1)} s; cached for this repository's tasks`,
  );
}

if (import.meta.main) await main();
