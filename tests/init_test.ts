import assert from "node:assert/strict";
import { fileURLToPath } from "node:url";
import { init } from "../core/device.ts";
import { manualSeed } from "../core/random.ts";
import { randn } from "../core/creation.ts";
import { Mamba } from "../mamba/block.ts";
import { mambaConfig } from "../mamba/config.ts";
import { MambaLM } from "../mamba/lm.ts";
import { fromPretrained } from "../mamba/pretrained.ts";
import { fixturePath } from "./fixture_util.ts";

function stats(a: ArrayLike<number>) {
  let s = 0, s2 = 0, lo = Infinity, hi = -Infinity;
  for (let i = 0; i < a.length; i++) {
    s += a[i];
    s2 += a[i] * a[i];
    lo = Math.min(lo, a[i]);
    hi = Math.max(hi, a[i]);
  }
  const mean = s / a.length;
  return { mean, std: Math.sqrt(s2 / a.length - mean * mean), lo, hi };
}

Deno.test("Mamba initialisation follows mamba.py's distributions", async () => {
  await init();
  manualSeed(1);
  const c = mambaConfig({ dModel: 64, nLayers: 1, dState: 16 }); // ED 128, R 4
  const m = new Mamba(c);
  const p = m.stateDict();
  const get = async (k: string) => await p.get(`layers.0.${k}`)!.toArray();
  // Linear/Conv default: U(-1/sqrt(fanIn), 1/sqrt(fanIn)): std = bound / sqrt(3).
  for (
    const [k, fanIn] of [["mixer.in_proj.weight", 64], ["mixer.x_proj.weight", 128], [
      "mixer.out_proj.weight",
      128,
    ], [
      "mixer.conv1d.weight",
      4,
    ]] as const
  ) {
    const s = stats(await get(k));
    const bound = 1 / Math.sqrt(fanIn);
    assert.ok(s.lo >= -bound && s.hi <= bound, `${k} within +-${bound}`);
    assert.ok(Math.abs(s.std - bound / Math.sqrt(3)) < 0.1 * bound, `${k} std ${s.std}`);
  }
  // dt_proj.weight ~ U(+-R^-0.5); softplus(dt bias) log-uniform in [dtMin, dtMax].
  const w = stats(await get("mixer.dt_proj.weight"));
  assert.ok(w.lo >= -0.5 && w.hi <= 0.5 && w.std > 0.25, `dt_proj.weight ${JSON.stringify(w)}`);
  const dt = [...await get("mixer.dt_proj.bias")].map((b) => Math.log1p(Math.exp(b)));
  assert.ok(Math.min(...dt) >= 0.001 * 0.999 && Math.max(...dt) <= 0.1 * 1.001, "dt in [dtMin, dtMax]");
  const logDt = stats(dt.map(Math.log)); // uniform in [log 0.001, log 0.1]
  assert.ok(Math.abs(logDt.mean - (Math.log(0.001) + Math.log(0.1)) / 2) < 0.4, `log dt mean ${logDt.mean}`);
  const aLog = await get("mixer.A_log");
  for (let i = 0; i < aLog.length; i++) assert.ok(Math.abs(aLog[i] - Math.log((i % 16) + 1)) < 1e-6);
  assert.deepEqual([...new Set(await get("mixer.D"))], [1]);
  assert.deepEqual([...new Set(await get("norm.weight"))], [1]);
  m.dispose();
});

Deno.test("MambaLM initialisation: normal(0, baseStd), out_proj scaled by 1/sqrt(2 nLayers)", async () => {
  await init();
  manualSeed(2);
  const lm = new MambaLM({ dModel: 64, nLayers: 2 }, { vocabSize: 250, padVocabSizeMultiple: 8 });
  assert.equal(lm.vocabSize, 256);
  const p = lm.stateDict();
  const s1 = stats(await p.get("embedding.weight")!.toArray());
  assert.ok(Math.abs(s1.std - 0.02) < 0.002 && Math.abs(s1.mean) < 0.002, `embedding ${JSON.stringify(s1)}`);
  const s2 = stats(await p.get("mamba.layers.1.mixer.out_proj.weight")!.toArray());
  assert.ok(Math.abs(s2.std - 0.02 / 2) < 0.001, `out_proj std ${s2.std}`);
  const s3 = stats(await p.get("mamba.layers.0.mixer.in_proj.weight")!.toArray());
  assert.ok(Math.abs(s3.std - 0.02) < 0.002, `in_proj std ${s3.std}`);
  assert.deepEqual([...new Set(await p.get("mamba.layers.0.mixer.dt_proj.bias")!.toArray())], [0]);
  lm.dispose();
});

Deno.test("randn/rand are reproducible: the same seed gives the same bits", async () => {
  await init();
  const [ta, tb] = [randn([1000], { seed: 42 }), randn([1000], { seed: 42 })];
  const [a, b] = [await ta.toArray(), await tb.toArray()];
  ta.dispose();
  tb.dispose();
  assert.deepEqual(a, b);
  const s = stats(a);
  assert.ok(Math.abs(s.mean) < 0.1 && Math.abs(s.std - 1) < 0.1);
  // a seed that is not an integer is an error (0.5 was read as 0)
  for (const seed of [0.5, NaN, Infinity, 2 ** 53]) {
    assert.throws(
      () => randn([2], { seed }),
      /seed must be an integer \(\|seed\| < 2\^53\), got /,
      `${seed}`,
    );
  }
});

Deno.test("fromPretrained over HTTP from a local server (hub-style resolve URL)", async () => {
  await init();
  const ac = new AbortController();
  const server = Deno.serve(
    { hostname: "127.0.0.1", port: 0, signal: ac.signal, onListen() {} },
    async (req) => {
      const m = new URL(req.url).pathname.match(
        /^\/org\/lm\/resolve\/main\/(config\.json|model\.safetensors)$/,
      );
      if (!m) return new Response("not found", { status: 404 });
      return new Response(await Deno.readFile(fixturePath(`lm_v64_hf/${m[1]}`)));
    },
  );
  const base = `http://127.0.0.1:${server.addr.port}`;
  try {
    const lm = await fromPretrained(`${base}/org/lm/resolve/main/`);
    assert.equal(lm.vocabSize, 64);
    lm.dispose();
    await assert.rejects(() => fromPretrained(`${base}/org/missing/resolve/main`), /HTTP 404/);
  } finally {
    ac.abort();
    await server.finished;
  }
});

Deno.test("subgroup probe: sums that match the size and aligned subgroups give support; anything else none", async () => {
  const { subgroupProbeResult } = await import("../core/device.ts");
  const words = (sg: number) => Uint32Array.from({ length: 64 }, () => sg * 1000 + sg);
  assert.deepEqual(subgroupProbeResult(words(8), "", 0, 0), { directive: "", minSize: 8, maxSize: 8 });
  assert.deepEqual(subgroupProbeResult(words(4), "enable subgroups;", 4, 4)?.maxSize, 4);
  const wrongSum = words(8);
  wrongSum[5] = 7 * 1000 + 8; // a lane's subgroupAdd of ones disagrees with its size
  assert.equal(subgroupProbeResult(wrongSum, "", 0, 0), null);
  const interleaved = words(8);
  interleaved[9] += 1_000_000; // lane 9's subgroup is not an aligned run of the local index
  assert.equal(subgroupProbeResult(interleaved, "", 0, 0), null);
  // an adapter that reports one size (16) while the probe ran another (8): no fixed size, which kernels would
  // compile in (a softmax row came out NaN on lavapipe's 8 lanes reported as 16)
  assert.deepEqual(subgroupProbeResult(words(8), "", 16, 16), { directive: "", minSize: 8, maxSize: 16 });
  assert.deepEqual(subgroupProbeResult(words(32), "", 4, 64), { directive: "", minSize: 4, maxSize: 64 });
});

/** Runs `script` in a fresh Deno process (the repository's config and the tests' location, whose localStorage
 * holds the tests' tuner choices, not the benches'; or `flags` instead) and parses the last line it prints as
 * JSON; a non-zero exit fails with its stderr. */
async function lastLineOf(script: string, flags?: string[]): Promise<unknown> {
  const config = [
    "--config",
    fileURLToPath(new URL("../deno.json", import.meta.url)),
    "--location",
    "http://tests.mambats.test/",
  ];
  const out = await new Deno.Command(Deno.execPath(), {
    args: ["eval", ...(flags ?? config), script],
    stdout: "piped",
    stderr: "piped",
    signal: AbortSignal.timeout(120_000),
  }).output();
  const text = new TextDecoder().decode(out.stdout);
  assert.equal(out.code, 0, `exit ${out.code}: ${new TextDecoder().decode(out.stderr)}`);
  return JSON.parse(text.trim().split("\n").at(-1)!);
}

Deno.test("tuneKernels() before init() acquires the device and tunes (it waited on init, and init on it)", async () => {
  // a fresh process: init() runs once per process
  const script = `import { tuneKernels, deviceInfo } from ${
    JSON.stringify(new URL("../mod.ts", import.meta.url).href)
  };
const r = await tuneKernels();
console.log(JSON.stringify({ variant: r.variant, adapter: deviceInfo().description.length > 0 }));`;
  const r = await lastLineOf(script) as { variant: unknown; adapter: boolean };
  assert.ok(typeof r.variant === "string" && r.adapter, JSON.stringify(r));
});

Deno.test("init() called while the first call tunes waits for that tuning, as the first call does", async () => {
  // a fresh process with a local storage of its own, emptied: the tuner measures (a cached choice takes no
  // wait at all, and leaves no time between acquiring the device and the end of tuning to call in)
  const url = (p: string) => JSON.stringify(new URL(p, import.meta.url).href);
  const script = `import { deviceInfo, init, tuneResult } from ${url("../mod.ts")};
import { tuningInProgress } from ${url("../core/tune.ts")};
localStorage.clear();
const first = init();
for (;;) { try { deviceInfo(); break; } catch { await new Promise((r) => setTimeout(r, 0)); } }
const tuning = tuneResult() === null; // the device is there, the first call still tunes
await init();
// the matmul's result comes before the fused scan's tuners run: all of them must be done
console.log(JSON.stringify({ tuning, tunedWhenSecondResolved: tuneResult() !== null && !tuningInProgress() }));
await first;`;
  assert.deepEqual(await lastLineOf(script, ["--location", "http://init-while-tuning.mambats.test/"]), {
    tuning: true,
    tunedWhenSecondResolved: true,
  });
});

Deno.test("a lost device: a readback that the browser rejects before device.lost resolves throws the loss, and deviceLost() says it", async () => {
  // as Chromium: mapAsync rejects ("unmapped before mapping was resolved") a moment before the loss is known
  const url = (p: string) => JSON.stringify(new URL(p, import.meta.url).href);
  const script = `import { deviceLost, init, randn } from ${url("../mod.ts")};
import { gpuDevice } from ${url("../core/device.ts")};
await init({ tune: false });
const dev = gpuDevice();
GPUBuffer.prototype.mapAsync = () => {
  setTimeout(() => dev.destroy(), 20);
  return Promise.reject(new Error("Buffer was unmapped before mapping was resolved"));
};
const said = await randn([4]).toArray().then(() => "resolved", (e) => e.name + ": " + e.message);
console.log(JSON.stringify([said, "GPUError: " + await deviceLost()]));`;
  const [said, lost] = await lastLineOf(script) as string[];
  assert.match(said, /^GPUError: GPU device lost \(destroyed\): .*reload/, said);
  assert.equal(said, lost);
});

Deno.test("a lost device: a readback in flight, later ops, sync() and init() all reject with the loss, none waits", async () => {
  // a fresh process: the device is destroyed for good
  const url = (p: string) => JSON.stringify(new URL(p, import.meta.url).href);
  const script = `import { init, randn, sync } from ${url("../mod.ts")};
import { gpuDevice } from ${url("../core/device.ts")};
await init({ tune: false });
const a = randn([64, 64]);
const pending = a.matmul(a).toArray();
gpuDevice().destroy();
const out = [];
const said = (p) => p.then(() => "resolved", (e) => e.name + ": " + e.message);
out.push(await said(pending));
out.push(await said((async () => a.add(1))()));
out.push(await said(sync()));
out.push(await said(init()));
console.log(JSON.stringify(out));`;
  const said = await lastLineOf(script) as string[];
  assert.equal(said.length, 4);
  for (const s of said) {
    assert.match(s, /^GPUError: GPU device lost \(destroyed\): .*does not acquire another device: reload/, s);
  }
});
