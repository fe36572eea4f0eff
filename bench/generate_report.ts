/**
 * Generation speed: prefill and decode tokens/s, batch 1 and 8, for the char model and for randomly
 * initialised models of mamba-130m's and mamba-370m's shapes, with GPU (runtime counter) and host (peak
 * resident set) memory. Prints a markdown table and writes bench/results/generate.json (with --quick:
 * generate_quick.json).
 *
 * Per model, after one warm-up generation per batch size (kernel compilation), each rep measures batch 1
 * then batch 8 (the order alternates between reps, so the machine's drift hits both alike): a prefill
 * alone (the parallel forward over the prompt, its logits disposed, timed to the end of one wait for the GPU:
 * about 11 ms of each prefill's time is that wait, most of it for the char model at batch 1) and a
 * `generate` of the same prompt
 * that reads tokens back every R = min(16, new tokens / 2) steps. Decode is timed inside that generate,
 * from its first readback (R tokens available, the prefill and R - 1 steps behind it) to its end:
 * decode tokens/s is (new tokens - R) x batch over that time, steps and readbacks as a longer generation
 * runs them. (Until this change it was the generate's time minus the separately timed prefill, which the
 * machine's noise could make zero or negative on short runs.) The table gives medians over the reps. GPU
 * peaks: the runtime's peak live bytes (weights included, the largest over the reps) during the generate, and
 * apart during the prefill alone, whose forward computes logits at every prompt position (B x 64 x V floats:
 * 98 MiB at batch 8 and V 50280) where the generate's prompt pass computes the last position's only. (Until
 * this change one peak spanned both, so it was the prefill's: 679 / 774 MiB at the 130m shape, batch 1 / 8,
 * where a --quick run measured the generate's own at 671 / 715 and the prefill's at 679 / 774.)
 * Host peaks: Linux's VmHWM (every page the process touched, not samples), reset through
 * /proc/self/clear_refs: once from the model's creation to the end of its host-side initialisation (random
 * weights on the host, or loading the char model), and once per rep for the prefill and the generate (the
 * largest over the reps). Where VmHWM cannot be read or reset (not Linux) those
 * columns are empty.
 *
 *   deno run -A bench/generate_report.ts [--quick] [--skip-370m] [--reps <n>]
 */

import { fileURLToPath } from "node:url";
import { parseArgs } from "node:util";
import { init, MambaLM, memory, noGrad, resetPeak, sync, tidy } from "../mod.ts";
import { fromPretrained } from "../mamba/pretrained.ts";
import { intFlag, parseCommandLine } from "../examples/lib/cli.ts";
import {
  hostPeakBytes,
  median,
  resetHostPeak,
  resultPath,
  sourceVersion,
  writeJsonAtomic,
} from "./report_util.ts";

const USAGE = `Usage: deno run -A bench/generate_report.ts [options]

  --quick        fewer new tokens (char model 64, large shapes 8 instead of 256 and 32; decode is
                 timed after the first readback, at 16 tokens, or 4 of the large shapes' 8);
                 writes bench/results/generate_quick.json instead of generate.json
  --skip-370m    leave out the mamba-370m shape (its host-side init peaks at several GiB)
  --reps <n>     measured reps per row, batch sizes interleaved (default 3)
  --help         this text`;

const { values, reps: REPS } = parseCommandLine(USAGE, () => {
  const r = parseArgs({
    args: Deno.args,
    strict: true,
    options: {
      quick: { type: "boolean" },
      "skip-370m": { type: "boolean" },
      reps: { type: "string" },
      help: { type: "boolean" },
    },
  });
  return { ...r, reps: intFlag("reps", r.values.reps, 3, 1, 100) };
});
const quick = values.quick ?? false;
const BATCHES = [1, 8];
const PROMPT = 64;
const info = await init();

interface Row {
  model: string;
  batch: number;
  prompt: number;
  /** New tokens per row of each generate. */
  decode: number;
  /** Tokens decoded between readbacks (R); decode is timed from the first readback on. */
  readEvery: number;
  /** New tokens per row in the timed decode window: decode - readEvery. */
  decodeTimed: number;
  reps: number;
  /** Medians over the reps; decodeTokS is null where nothing could be timed (no token after the first
   * readback). */
  prefillTokS: number;
  decodeTokS: number | null;
  /** Every rep's rate, in measurement order. */
  prefillTokSSamples: number[];
  decodeTokSSamples: number[];
  /** Peak live GPU bytes of the runtime during a rep's generate (largest over the reps), weights included. */
  gpuPeakMiB: number;
  /** The same during a rep's prefill alone (its logits at every prompt position). */
  gpuPrefillPeakMiB: number;
  /** VmHWM from the model's creation to the end of its initialisation (before any GPU work of the rows). */
  hostInitPeakMiB: number | null;
  /** VmHWM during a rep's prefill and generate (largest over the reps). */
  hostPeakMiB: number | null;
}

const rows: Row[] = [];
const MiB = (b: number) => b / 2 ** 20;
const hostMiB = (b: number | null) => (b === null ? null : MiB(b));

/** Host peak since `resetHostPeak()`, or null when VmHWM could not be reset or read. */
function peakSince(reset: boolean): number | null {
  return reset ? hostPeakBytes() : null;
}

async function measure(name: string, make: () => Promise<MambaLM>, decode: number): Promise<void> {
  const readEvery = Math.max(1, Math.min(16, Math.floor(decode / 2)));
  const decodeTimed = decode - readEvery;
  await sync();
  const initReset = resetHostPeak();
  const lm = await make();
  await sync();
  const initPeak = peakSince(initReset);
  try {
    const V = lm.vocabSize;
    const ids = new Map(BATCHES.map((batch) => [
      batch,
      Array.from(
        { length: batch },
        (_, b) => Array.from({ length: PROMPT }, (_, t) => (b * 131 + t * 7919) % V),
      ),
    ]));
    for (const b of BATCHES) await lm.generate(ids.get(b)!, 2); // compile kernels
    const s = new Map(
      BATCHES.map((b) => [
        b,
        { prefill: [] as number[], decode: [] as number[], gpu: 0, gpuPrefill: 0, host: 0 },
      ]),
    );
    let hostKnown = true;
    for (let r = 0; r < REPS; r++) {
      const order = r % 2 ? [...BATCHES].reverse() : BATCHES;
      for (const batch of order) {
        const prompt = ids.get(batch)!;
        const acc = s.get(batch)!;
        await sync();
        resetPeak();
        const reset = resetHostPeak();
        // Prefill alone: the parallel forward over the prompt (its logits disposed by tidy).
        const t0 = performance.now();
        tidy(() => {
          noGrad(() => lm.forward(prompt));
        });
        await sync();
        const prefill = (performance.now() - t0) / 1000;
        acc.gpuPrefill = Math.max(acc.gpuPrefill, memory().peakBytes);
        resetPeak(); // the generate's own peak: the prefill's logits are gone
        // Decode: timed from the generate's first readback (readEvery tokens available) to its end.
        let first: number | null = null;
        await lm.generate(prompt, decode, {
          readEvery,
          onTokens: () => {
            first ??= performance.now();
          },
        });
        const decodeSecs = first === null ? 0 : (performance.now() - first) / 1000;
        const host = peakSince(reset);
        if (host === null) hostKnown = false;
        acc.prefill.push((batch * PROMPT) / prefill);
        if (decodeTimed > 0 && decodeSecs > 0) acc.decode.push((batch * decodeTimed) / decodeSecs);
        acc.gpu = Math.max(acc.gpu, memory().peakBytes);
        acc.host = Math.max(acc.host, host ?? 0);
      }
    }
    for (const batch of BATCHES) {
      const acc = s.get(batch)!;
      rows.push({
        model: name,
        batch,
        prompt: PROMPT,
        decode,
        readEvery,
        decodeTimed,
        reps: REPS,
        prefillTokS: median(acc.prefill),
        decodeTokS: acc.decode.length ? median(acc.decode) : null,
        prefillTokSSamples: acc.prefill,
        decodeTokSSamples: acc.decode,
        gpuPeakMiB: MiB(acc.gpu),
        gpuPrefillPeakMiB: MiB(acc.gpuPrefill),
        hostInitPeakMiB: hostMiB(initPeak),
        hostPeakMiB: hostKnown ? MiB(acc.host) : null,
      });
      console.error(JSON.stringify(rows.at(-1)));
    }
  } finally {
    lm.dispose();
  }
}

const charDir = fileURLToPath(new URL("../tests/fixtures/char-mamba", import.meta.url));
await measure("char (d64, 2 layers)", () => fromPretrained(charDir, { tokenizer: false }), quick ? 64 : 256);
const shapes: [string, number, number][] = [["mamba-130m shape (d768, 24 layers)", 768, 24]];
if (!values["skip-370m"]) shapes.push(["mamba-370m shape (d1024, 48 layers)", 1024, 48]);
for (const [name, d, n] of shapes) {
  const make = () => Promise.resolve(new MambaLM({ dModel: d, nLayers: n }, { vocabSize: 50280 }));
  await measure(name, make, quick ? 8 : 32);
}

const fmtMiB = (x: number | null) => (x === null ? "-" : x.toFixed(0));
console.log(
  `\nGeneration on ${info.description} (medians of ${REPS} reps; GPU peaks: the runtime's live bytes, ` +
    `during the generate and during the prefill alone (logits at every position); ` +
    `decode timed from a generate's first readback to its end; ` +
    `host peaks: VmHWM, from the model's creation to the end of its init, and during prefill + generate)\n`,
);
console.log(
  "| model | batch | prompt | new tokens | prefill tok/s | decode tok/s | GPU peak MiB (generate) | " +
    "GPU peak MiB (prefill) | " +
    "host peak MiB (init) | host peak MiB (prefill + generate) |",
);
console.log("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |");
for (const r of rows) {
  const decodeRate = r.decodeTokS === null ? "not measured" : r.decodeTokS.toFixed(1);
  console.log(
    `| ${r.model} | ${r.batch} | ${r.prompt} | ${r.decode} | ${r.prefillTokS.toFixed(0)} | ${decodeRate} | ` +
      `${r.gpuPeakMiB.toFixed(0)} | ${r.gpuPrefillPeakMiB.toFixed(0)} | ${fmtMiB(r.hostInitPeakMiB)} | ` +
      `${fmtMiB(r.hostPeakMiB)} |`,
  );
}
const out = resultPath(quick ? "generate_quick.json" : "generate.json");
await writeJsonAtomic(out, {
  adapter: info.description,
  deno: Deno.version.deno,
  date: new Date().toISOString(),
  source: await sourceVersion(),
  quick,
  skip370m: values["skip-370m"] ?? false,
  reps: REPS,
  rows,
});
console.error(`wrote ${out}`);
