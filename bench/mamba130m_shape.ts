/**
 * A randomly initialised model of mamba-130m's shape (d_model 768, 24 layers, vocab 50280): one forward
 * on 64 tokens and 8 generated tokens; prints wall times and the runtime's peak GPU bytes.
 * Run: deno run -A bench/mamba130m_shape.ts
 */
import { init, MambaLM, memory, noGrad, resetPeak, sync, tidy } from "../mod.ts";

const info = await init();
let t = performance.now();
const lm = new MambaLM({ dModel: 768, nLayers: 24 }, { vocabSize: 50280 });
await sync();
const build = performance.now() - t;
console.log(
  `adapter: ${info.description}; parameters: ${lm.numParameters()}; init ${(build / 1000).toFixed(1)} s`,
);
const prompt = [Array.from({ length: 64 }, (_, i) => (i * 7919) % 50280)];
resetPeak();
t = performance.now();
const logits = tidy(() => noGrad(() => lm.forward(prompt)));
const firstRow = await logits.narrow(1, 63, 1).toArray();
const fwd = performance.now() - t;
console.log(
  `forward 64 tokens: ${(fwd / 1000).toFixed(2)} s, logits finite: ${firstRow.every(Number.isFinite)}`,
);
logits.dispose();
t = performance.now();
const out = await lm.generate(prompt, 8, { readEvery: 8 });
const gen = performance.now() - t;
const m = memory();
console.log(
  `generate 8 tokens (prefill 64 + 7 steps): ${(gen / 1000).toFixed(2)} s -> ${[...out[0]].join(" ")}`,
);
console.log(`peak GPU bytes (runtime counter): ${m.peakBytes} (${(m.peakBytes / 2 ** 20).toFixed(0)} MiB)`);
lm.dispose();
