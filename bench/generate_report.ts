/**
 * Generation speed: prefill and decode tokens/s, batch 1 and 8, for the char model and for randomly
 * initialised models of mamba-130m's and mamba-370m's shapes, with GPU (runtime counter) and host (RSS)
 * memory peaks. Prints a markdown table and writes bench/results/generate.json.
 *
 *   deno run -A bench/generate_report.ts [--quick] [--skip-370m]
 */

import { parseArgs } from "node:util";
import { init, MambaLM, memory, noGrad, resetPeak, sync, tidy } from "../mod.ts";
import { fromPretrained } from "../mamba/pretrained.ts";

const { values } = parseArgs({
  args: Deno.args,
  options: { quick: { type: "boolean" }, "skip-370m": { type: "boolean" } },
});
const info = await init();

interface Row {
  model: string;
  batch: number;
  prompt: number;
  decode: number;
  prefillTokS: number;
  decodeTokS: number;
  gpuPeakMiB: number;
  hostRssMiB: number;
}

const rows: Row[] = [];
let rssPeak = 0;
const rss = () => (rssPeak = Math.max(rssPeak, Deno.memoryUsage().rss));

async function measure(name: string, lm: MambaLM, batch: number, prompt: number, decode: number) {
  const V = lm.vocabSize;
  const ids = Array.from(
    { length: batch },
    (_, b) => Array.from({ length: prompt }, (_, t) => (b * 131 + t * 7919) % V),
  );
  await lm.generate(ids, 2); // compile kernels
  resetPeak();
  rssPeak = 0;
  // Prefill alone: the parallel forward over the prompt.
  let t0 = performance.now();
  tidy(() => noGrad(() => lm.forward(ids)));
  await sync();
  const prefill = (performance.now() - t0) / 1000;
  rss();
  // Decode: generate = prefill + (decode - 1) steps; subtract the prefill.
  t0 = performance.now();
  await lm.generate(ids, decode, { readEvery: 16, onTokens: rss });
  const total = (performance.now() - t0) / 1000;
  const steps = Math.max(total - prefill, 1e-9);
  rows.push({
    model: name,
    batch,
    prompt,
    decode,
    prefillTokS: (batch * prompt) / prefill,
    decodeTokS: (batch * (decode - 1)) / steps,
    gpuPeakMiB: memory().peakBytes / 2 ** 20,
    hostRssMiB: rssPeak / 2 ** 20,
  });
  console.error(JSON.stringify(rows.at(-1)));
}

const char = await fromPretrained(new URL("../tests/fixtures/char-mamba", import.meta.url).pathname, {
  tokenizer: false,
});
for (const b of [1, 8]) await measure("char (d64, 2 layers)", char, b, 64, values.quick ? 64 : 256);
char.dispose();
const shapes: [string, number, number][] = [["mamba-130m shape (d768, 24 layers)", 768, 24]];
if (!values["skip-370m"]) shapes.push(["mamba-370m shape (d1024, 48 layers)", 1024, 48]);
for (const [name, d, n] of shapes) {
  const lm = new MambaLM({ dModel: d, nLayers: n }, { vocabSize: 50280 });
  for (const b of [1, 8]) await measure(name, lm, b, 64, values.quick ? 8 : 32);
  lm.dispose();
}

console.log(`\nGeneration on ${info.description}\n`);
console.log(
  "| model | batch | prompt | new tokens | prefill tok/s | decode tok/s | GPU peak MiB | host RSS MiB |",
);
console.log("| --- | --- | --- | --- | --- | --- | --- | --- |");
for (const r of rows) {
  console.log(
    `| ${r.model} | ${r.batch} | ${r.prompt} | ${r.decode} | ${r.prefillTokS.toFixed(0)} | ${
      r.decodeTokS.toFixed(1)
    } | ` +
      `${r.gpuPeakMiB.toFixed(0)} | ${r.hostRssMiB.toFixed(0)} |`,
  );
}
await Deno.mkdir(new URL("./results", import.meta.url), { recursive: true });
await Deno.writeTextFile(
  new URL("./results/generate.json", import.meta.url),
  JSON.stringify({ adapter: info.description, rows }, null, 1) + "\n",
);
