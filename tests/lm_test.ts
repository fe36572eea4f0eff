import assert from "node:assert/strict";
import { noGrad } from "../core/autograd.ts";
import { tensor, zeros } from "../core/creation.ts";
import { deviceInfo, init } from "../core/device.ts";
import { dispatchCount } from "../core/executor.ts";
import { memory, resetPeak } from "../core/memory.ts";
import { crossEntropy, matmul, narrow } from "../core/ops/index.ts";
import { manualSeed, Philox } from "../core/random.ts";
import { dispose, type Tensor, tidy } from "../core/tensor.ts";
import { setMaxChunksFolded } from "../scan/fused_run.ts";
import { MAX_CHUNKS_FOLDED, setFusedVariant } from "../scan/fused_variant.ts";
import { sampleInto, sampleParams, seenMask, seenWords } from "../mamba/sampling.ts";
import { readSafetensorsFile } from "../core/safetensors_fs.ts";
import { MambaLM } from "../mamba/lm.ts";
import { mambaConfig } from "../mamba/config.ts";
import { parseCheckpointConfig } from "../mamba/checkpoint_config.ts";
import { fromPretrained, saveCheckpoint } from "../mamba/pretrained.ts";
import {
  assertLmV64Logits,
  assertMatchesFixture,
  fixtureConfig,
  fixturePath,
  loadFixture,
  maxAbsDiff,
  tolerance,
  toTensor,
} from "./fixture_util.ts";
import {
  assertFusedRan,
  assertFusedStepRan,
  fusedUnavailable,
  kernelsRun,
  rng,
  underRisingCaps,
  withPlans,
} from "./helpers.ts";

await init();
/** The fused tests are ignored where the fused kernels cannot run (the model would run pscan instead). */
const noFused = fusedUnavailable();
const SCANS = ["pscan", "sequential", "fused"] as const;

/** lm_v64's LM in a scan mode: the config read in full from the fixture's metadata, untied as mamba.py's LM. */
async function lmV64(scan: "pscan" | "sequential" | "fused") {
  const name = "lm_v64.safetensors";
  const f = await loadFixture(name);
  const meta = JSON.parse((await readSafetensorsFile(fixturePath(name))).header.metadata.fixture);
  const lm = new MambaLM(await fixtureConfig(name, { scan }), { vocabSize: meta.vocab_size });
  assert.equal(lm.vocabSize, meta.vocab_size);
  lm.loadStateDict(
    new Map([...f].filter(([k]) => !k.startsWith("generate.") && k !== "tokens" && k !== "logits")),
  );
  return { f, lm };
}

function rowsOf(data: Int32Array | Float32Array, B: number): number[][] {
  const L = data.length / B;
  return Array.from({ length: B }, (_, b) => Array.from(data.subarray(b * L, (b + 1) * L)));
}

for (const scan of SCANS) {
  Deno.test({
    name: `MambaLM ${scan}: logits and greedy generation equal mamba.py (lm_v64)`,
    ignore: scan === "fused" && noFused,
    fn: async () => {
      const { f, lm } = await lmV64(scan);
      const tokens = toTensor(f, "tokens");
      const fwd = await kernelsRun(() => tidy(() => noGrad(() => lm.forward(tokens))));
      await assertMatchesFixture(fwd.value, f, "logits", tolerance("model"), `${scan}: logits`);
      const prompt = rowsOf(f.get("generate.prompt")!.data, 2);
      const gen = await kernelsRun(() => lm.generate(prompt, 16));
      assert.deepEqual(gen.value.map((r) => [...r]), rowsOf(f.get("generate.tokens")!.data, 2));
      if (scan === "fused") {
        assertFusedRan(fwd.kernels, "forward");
        assertFusedRan(gen.kernels, "generate's prefill");
        assertFusedStepRan(gen.kernels, "generate's steps");
      } else {
        const other = [...fwd.kernels, ...gen.kernels].find((k) =>
          /^(fused_scan_|conv_step|ssm_step)/.test(k)
        );
        assert.equal(other, undefined, `${scan}: a fused kernel ran`);
      }
      for (const t of [tokens, fwd.value]) t.dispose();
      lm.dispose();
    },
  });
}

/**
 * The logits of generate's decoding path, teacher-forced with the reference's tokens: the prompt (B, P) in
 * one parallel forward that fills the caches (the logits at its last position choose token 0), then one
 * step per token (token j - 1 in, the logits that choose token j out). With `stepsOnly`, the prompt too
 * goes through `step`, one token at a time from empty caches. Returns (B, n, V) and the first logits (B, V).
 */
async function decodingLogits(lm: MambaLM, prompt: number[][], tokens: number[][], stepsOnly: boolean) {
  const [B, P, n, V] = [prompt.length, prompt[0].length, tokens[0].length, lm.vocabSize];
  const ids = (col: (b: number) => number) =>
    tensor(Int32Array.from({ length: B }, (_, b) => col(b)), [B], { dtype: "i32" });
  const out: Tensor[] = [];
  let caches = lm.emptyCache(B);
  const step = (id: Tensor) => {
    const prev = caches;
    const r = tidy(() => noGrad(() => lm.step(id, prev)));
    dispose([prev, id]);
    caches = r.caches;
    return r.logits;
  };
  let first: Tensor;
  if (stepsOnly) {
    for (let t = 0; t < P - 1; t++) step(ids((b) => prompt[b][t])).dispose();
    first = step(ids((b) => prompt[b][P - 1]));
  } else {
    const empty = caches;
    const r = tidy(() =>
      noGrad(() => {
        // what generate does (MambaLM.generate, i === 0): the blocks with caches, then norm_f and the head
        const x = lm.mamba.forwardWithCache(lm.embedding.forward(lm.tokensTensor(prompt)), true);
        const h = lm.normF.forward(narrow(x.out, 1, P - 1, 1).reshape(B, lm.config.dModel));
        const logits = lm.lmHead ? lm.lmHead.forward(h) : matmul(h, lm.embedding.weight, { transB: true });
        return { logits, caches: x.caches };
      })
    );
    dispose(empty);
    caches = r.caches;
    first = r.logits;
  }
  out.push(first);
  for (let j = 1; j < n; j++) out.push(step(ids((b) => tokens[b][j - 1])));
  const rows = await Promise.all(out.map((t) => t.toArray()));
  const data = new Float32Array(B * n * V);
  rows.forEach((r, j) => {
    for (let b = 0; b < B; b++) data.set(r.subarray(b * V, (b + 1) * V), (b * n + j) * V);
  });
  const firstData = rows[0];
  dispose([...out, caches]);
  return { logits: { data, shape: [B, n, V] }, first: { data: firstData, shape: [B, V] } };
}

Deno.test({
  name:
    "MambaLM fused with chunks walked in parallel (forced; chained, folded, the forward in walks of 2 chunks): the logits under noGrad and the prefill + decoding path's equal mamba.py's (lm_v64)",
  ignore: noFused,
  fn: async () => {
    // under noGrad and in a prompt's prefill the forward writes the last chunk state only: the prefill's is the
    // decoding cache. L 32 and prompts of 8 in chunks of 2 (walks of 4): several chunks and walks everywhere.
    const bound = tolerance("model");
    const { f, lm } = await lmV64("fused");
    const tokens = toTensor(f, "tokens");
    const prompt = rowsOf(f.get("generate.prompt")!.data, 2);
    const next = rowsOf(f.get("generate.tokens")!.data, 2);
    const N = lm.config.dState;
    try {
      for (
        const [variant, folded] of [
          [{ WG: 8, Lc: 2, chunkParallel: true }, false],
          [{ WG: 8, Lc: 2, chunkParallel: true }, true],
          [{ WG: 8, Lc: 2, Lf: 4, chunkParallel: true }, false],
          [{ WG: 8, Lc: 2, Lf: 4, chunkParallel: true }, true],
        ] as const
      ) {
        setFusedVariant(N, variant);
        setMaxChunksFolded(folded ? MAX_CHUNKS_FOLDED : 0);
        const how = `${JSON.stringify(variant)}${folded ? " folded" : " chained"}`;
        // the forward's kernels as the variant asks: walks of 2 chunks (_Lf4), the carries chained or folded
        const walked = (kernels: string[], what: string) => {
          const fwd = kernels.filter((k) => /^fused_scan_(local_fwd|fwd|chain_fwd)/.test(k));
          const lf = "Lf" in variant ? "_Lf4_" : "";
          const label = `${how} ${what}: ${fwd}`;
          assert.ok(fwd.some((k) => k.startsWith("fused_scan_local_fwd") && k.includes(lf)), label);
          assert.ok(fwd.some((k) => k.startsWith("fused_scan_fwd") && k.includes(lf)), label);
          assert.equal(fwd.some((k) => k.startsWith("fused_scan_chain_fwd")), !folded, label);
          assert.equal(fwd.some((k) => k.endsWith("_chunked_folded")), folded, label);
        };
        const fwd = await kernelsRun(() => tidy(() => noGrad(() => lm.forward(tokens))));
        walked(fwd.kernels, "forward");
        await assertMatchesFixture(fwd.value, f, "logits", bound, `${how}: logits`);
        fwd.value.dispose();
        const run = await kernelsRun(() => decodingLogits(lm, prompt, next, false));
        walked(run.kernels, "prefill");
        await assertMatchesFixture(run.value.logits, f, "generate.logits", bound, `${how}: decoding`);
      }
    } finally {
      setFusedVariant(N, null);
      setMaxChunksFolded(null);
      tokens.dispose();
      lm.dispose();
    }
  },
});

// Greedy tokens only rule out errors larger than the top-1/top-2 margin (2.8e-2 in lm_v64, 1.8e-2 in
// char-mamba); the logits of every decoding step are held to the whole-model bound.
for (const scan of SCANS) {
  Deno.test({
    name:
      `MambaLM ${scan}: the decoding path's logits at every step equal mamba.py's (lm_v64 generate.logits, char-mamba step_logits)`,
    ignore: scan === "fused" && noFused,
    fn: async () => {
      const bound = tolerance("model");
      const { f, lm } = await lmV64(scan);
      const prompt = rowsOf(f.get("generate.prompt")!.data, 2);
      const tokens = rowsOf(f.get("generate.tokens")!.data, 2);
      for (const stepsOnly of [false, true]) {
        const how = `${scan} ${stepsOnly ? "steps only" : "prefill + steps"}`;
        const run = await kernelsRun(() => decodingLogits(lm, prompt, tokens, stepsOnly));
        if (scan === "fused") assertFusedStepRan(run.kernels, how);
        await assertMatchesFixture(run.value.logits, f, "generate.logits", bound, `lm_v64 ${how}`);
      }
      lm.dispose();
      const s = await loadFixture("char-mamba/sample.safetensors");
      const loaded = await fromPretrained(fixturePath("char-mamba"));
      const char = new MambaLM({ ...loaded.config, scan }, { vocabSize: loaded.vocabSize });
      char.loadStateDict(loaded.stateDict(), { strict: true });
      loaded.dispose();
      for (const key of ["sample", "sample2"]) {
        const p = rowsOf(s.get(`${key}.prompt`)!.data, 1);
        const t = rowsOf(s.get(`${key}.tokens`)!.data, 1);
        const r = await decodingLogits(char, p, t, false);
        await assertMatchesFixture(r.first, s, `${key}.first_step_logits`, bound, `char-mamba ${scan}`);
        await assertMatchesFixture(r.logits, s, `${key}.step_logits`, bound, `char-mamba ${scan}`);
      }
      char.dispose();
    },
  });
}

Deno.test("fromPretrained loads the transformers and the state-spaces layouts to the same logits", async () => {
  const f = await loadFixture("lm_v64.safetensors");
  const tokens = toTensor(f, "tokens");
  for (const dir of ["lm_v64_hf", "lm_v64_state_spaces"]) {
    const lm = await fromPretrained(fixturePath(dir));
    assert.equal(lm.vocabSize, 64);
    assert.equal(lm.tied, false);
    assert.equal(lm.embedding.paddingIdx, null, `${dir}: HF and state-spaces embeddings have no padding_idx`);
    const logits = tidy(() => noGrad(() => lm.forward(tokens)));
    await assertMatchesFixture(logits, f, "logits", tolerance("model"), `${dir}: logits`);
    logits.dispose();
    lm.dispose();
  }
  tokens.dispose();
});

Deno.test("fromPretrained sets how the model runs (scan, recompute), which config.json does not hold", async () => {
  const dir = fixturePath("lm_v64_hf");
  const lm = await fromPretrained(dir, { scan: "pscan", recompute: "input" });
  assert.deepEqual([lm.config.scan, lm.config.recompute], ["pscan", "input"]);
  lm.dispose();
  const plain = await fromPretrained(dir);
  assert.deepEqual([plain.config.scan, plain.config.recompute], ["fused", true], "the defaults");
  plain.dispose();
  const live = memory().liveBytes;
  await assert.rejects(
    () => fromPretrained(dir, { recompute: "all" as "input" }),
    /MambaConfig: recompute must be true, false or "input", got "all"/,
  );
  assert.equal(memory().liveBytes, live, "refused before any weight was loaded");
});

Deno.test("config.json as the hub's -hf models have it (mamba-130m-hf): read, extra keys ignored and listed, copies checked", async () => {
  const real = JSON.parse(await Deno.readTextFile(fixturePath("hf_configs/mamba-130m-hf.json")));
  const parsed = parseCheckpointConfig(real);
  assert.equal(parsed.layout, "hf");
  assert.deepEqual(parsed.ignored, []);
  const c = parsed.config;
  assert.deepEqual(
    [c.dModel, c.nLayers, c.dState, c.expandFactor, c.dConv, c.dtRank, c.bias, c.convBias, c.rmsNormEps],
    [768, 24, 16, 2, 4, 48, false, true, 1e-5],
  );
  assert.deepEqual([parsed.lm.vocabSize, parsed.lm.tieEmbeddings], [50280, true]);
  // Newer transformers write use_associative_scan; generic PretrainedConfig keys are ignored, as transformers does.
  const newer = parseCheckpointConfig({ ...real, use_associative_scan: true, max_length: 20, id2label: {} });
  assert.deepEqual(newer.ignored, ["max_length", "id2label"]);
  assert.deepEqual(newer.config, c);
  const bad: [Record<string, unknown>, RegExp][] = [
    [{ d_inner: 1024 }, /'d_inner' 1024 disagrees with 'intermediate_size' 1536/],
    [{ d_model: 512 }, /'d_model' 512 disagrees with 'hidden_size' 768/],
    [{ n_layer: 12 }, /'n_layer' 12 disagrees with 'num_hidden_layers' 24/],
    [
      { intermediate_size: undefined, expand: 3 },
      /'d_inner' 1536 disagrees with 'expand \* hidden_size' 2304/,
    ],
    [{ use_associative_scan: "yes" }, /'use_associative_scan' must be true or false, got "yes"/],
  ];
  for (const [change, want] of bad) assert.throws(() => parseCheckpointConfig({ ...real, ...change }), want);
  // The state-spaces layout is a closed dataclass: an unknown key there is refused.
  assert.throws(
    () => parseCheckpointConfig({ d_model: 8, n_layer: 1, vocab_size: 8, wat: 1 }),
    /unknown config keys wat/,
  );
  // A -hf model's config.json with the small fixture's shapes loads (the keys above, with the weights).
  const dir = await Deno.makeTempDir();
  try {
    const small = JSON.parse(await Deno.readTextFile(fixturePath("lm_v64_hf/config.json")));
    const like130m = {
      ...small,
      d_inner: 64,
      d_model: 32,
      n_layer: 2,
      fused_add_norm: true,
      rms_norm: true,
      ssm_cfg: {},
    };
    await Deno.writeTextFile(
      `${dir}/config.json`,
      JSON.stringify({ ...like130m, transformers_version: "4.39.0.dev0" }),
    );
    await Deno.copyFile(fixturePath("lm_v64_hf/model.safetensors"), `${dir}/model.safetensors`);
    const lm = await fromPretrained(dir);
    await assertLmV64Logits(lm);
    lm.dispose();
    // An unread key nested a million deep would pass as ignored, after seconds and GBs in JSON.parse: refused
    // by a scan first.
    await Deno.writeTextFile(
      `${dir}/config.json`,
      JSON.stringify(like130m).replace(/}$/, `,"x":${"[".repeat(1e6)}${"]".repeat(1e6)}}`),
    );
    const t0 = performance.now();
    await assert.rejects(
      () => fromPretrained(dir),
      /config\.json: nests deeper than 64 levels \(not a model's JSON\)/,
    );
    assert.ok(performance.now() - t0 < 2000, `refused at once (${performance.now() - t0} ms)`);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("char-mamba trained in PyTorch: prompt logits within the whole-model bound and 64 greedy tokens exactly", async () => {
  const s = await loadFixture("char-mamba/sample.safetensors");
  const lm = await fromPretrained(fixturePath("char-mamba"));
  for (const key of ["sample", "sample2"]) {
    const prompt = rowsOf(s.get(`${key}.prompt`)!.data, 1);
    const logits = tidy(() => noGrad(() => lm.forward(prompt)));
    await assertMatchesFixture(
      logits,
      s,
      `${key}.prompt_logits`,
      tolerance("model"),
      `${key}: prompt logits`,
    );
    logits.dispose();
    const got = await lm.generate(prompt, 64, { readEvery: 64 });
    assert.deepEqual([...got[0]], [...s.get(`${key}.tokens`)!.data]);
  }
  lm.dispose();
});

/**
 * `MambaLM` as a whole: the gradients of embedding, norm_f and lm_head (and of the tied embedding, where the
 * input lookup and the head both add to one gradient) against finite differences of the model's own f32 loss.
 * The backbone's gradients are checked against mamba.py's fixtures (mamba_test.ts); no fixture has an LM's.
 *
 * For each parameter, 5 directions v (|v| = 1): the gradient's own direction, where a doubled term shows
 * most, and 4 random sign vectors, which see a dropped term even where it is orthogonal to the rest. The
 * derivative along v is the fourth-order central difference (8 (f(e) - f(-e)) - (f(2e) - f(-2e))) / 12 with
 * e = 0.01 |p|, against g . d, d the same combination of the parameter values as rounded to f32.
 *
 * Bound: |fd - g . d| <= 1e-3 |g| |d|. The loss (~2.8, a mean over 18 tokens) carries f32 rounding of a few
 * ulp (~1e-6); that divided by the step, 0.02-0.03, and the truncation of the stencil, O(e^4), are 1e-4 of
 * |g| at most; measured on lavapipe: 6.9e-5 at worst (norm_f, tied). A term that is dropped, doubled or
 * halved moves the derivative by a large part of |g| (measured under such mutations: see the commit).
 * baseStd 0.2 (as lm_v64) keeps the embedding away from RMSNorm's scale, where the curvature is large.
 */
Deno.test("MambaLM's gradients (embedding, norm_f, lm_head; tied and untied) equal finite differences of its loss", async () => {
  await init();
  for (const tied of [false, true]) {
    manualSeed(3);
    const lm = new MambaLM(
      { dModel: 8, nLayers: 2, dState: 4, scan: "pscan", baseStd: 0.2 },
      // No padding row: every embedding row's gradient is the loss's derivative.
      { vocabSize: 16, tieEmbeddings: tied, paddingIdx: null },
    );
    const r = rng(7);
    const [B, L] = [2, 9];
    const seq = Array.from({ length: B }, () => Array.from({ length: L + 1 }, () => Math.floor(r() * 16)));
    const x = tensor(Int32Array.from(seq.flatMap((s) => s.slice(0, L))), [B, L], { dtype: "i32" });
    const y = tensor(Int32Array.from(seq.flatMap((s) => s.slice(1))), [B, L], { dtype: "i32" });
    tidy(() => crossEntropy(lm.forward(x), y).backward());
    const lossOf = async () => {
      const l = tidy(() => noGrad(() => crossEntropy(lm.forward(x), y)));
      const v = (await l.toArray())[0];
      l.dispose();
      return v;
    };
    const params = new Map(lm.namedParameters());
    const names = ["embedding.weight", "norm_f.weight", ...(tied ? [] : ["lm_head.weight"])];
    assert.equal(params.has("lm_head.weight"), !tied);
    for (const name of names) {
      const p = params.get(name)!;
      assert.ok(p.grad, `${name}: no gradient`);
      const p0 = (await p.toArray()) as Float32Array;
      const g = await p.grad.toArray();
      const norm = (a: ArrayLike<number>) => Math.sqrt(Array.from(a).reduce((s, v) => s + v * v, 0));
      const [gn, eps] = [norm(g), 0.01 * norm(p0)];
      assert.ok(gn > 0, `${name}: zero gradient`);
      const dirs = [Float64Array.from(g, (v) => v / gn)];
      for (let k = 0; k < 4; k++) {
        dirs.push(Float64Array.from(g, () => (r() < 0.5 ? -1 : 1) / Math.sqrt(g.length)));
      }
      const set = (data: Float32Array) =>
        lm.loadStateDict(new Map([[name, { shape: p.shape, data }]]), { strict: false });
      for (const [j, v] of dirs.entries()) {
        const at = async (k: number) => {
          const q = Float32Array.from(p0, (a, i) => a + k * eps * v[i]);
          set(q);
          return { loss: await lossOf(), q };
        };
        const [p1, m1, p2, m2] = [await at(1), await at(-1), await at(2), await at(-2)];
        set(p0);
        let [an, dn] = [0, 0];
        for (let i = 0; i < g.length; i++) {
          const d = (8 * (p1.q[i] - m1.q[i]) - (p2.q[i] - m2.q[i])) / 12;
          an += g[i] * d;
          dn += d * d;
        }
        const fd = (8 * (p1.loss - m1.loss) - (p2.loss - m2.loss)) / 12;
        const err = Math.abs(fd - an) / (gn * Math.sqrt(dn));
        assert.ok(
          err <= 1e-3,
          `${tied ? "tied" : "untied"} ${name}, direction ${j === 0 ? "of the gradient" : `random ${j}`}: ` +
            `finite differences ${fd / Math.sqrt(dn)}, gradient ${an / Math.sqrt(dn)}, |g| ${gn}: ${
              err.toExponential(2)
            } of |g|`,
        );
      }
    }
    dispose([x, y]);
    lm.dispose();
  }
});

Deno.test("saveCheckpoint writes the HF layout that fromPretrained reads back identically", async () => {
  const lm = await fromPretrained(fixturePath("lm_v64_hf"));
  const dir = await Deno.makeTempDir();
  await saveCheckpoint(lm, dir);
  // the HF layout itself: transformers' names and config keys, not only something fromPretrained reads
  const names = [...(await readSafetensorsFile(`${dir}/model.safetensors`)).tensors.keys()];
  assert.ok(names.includes("backbone.embeddings.weight"), names.join());
  assert.ok(
    names.includes("backbone.layers.0.mixer.in_proj.weight") && names.includes("backbone.norm_f.weight"),
  );
  assert.ok(names.every((n) => n.startsWith("backbone.") || n === "lm_head.weight"), names.join());
  const cfg = JSON.parse(await Deno.readTextFile(`${dir}/config.json`));
  assert.deepEqual([cfg.model_type, cfg.architectures], ["mamba", ["MambaForCausalLM"]]);
  assert.equal(cfg.hidden_size, lm.config.dModel);
  const back = await fromPretrained(dir);
  for (const [k, p] of lm.namedParameters()) {
    const q = back.stateDict().get(k)!;
    assert.equal(maxAbsDiff(await p.toArray(), await q.toArray()), 0, k);
  }
  lm.dispose();
  back.dispose();
  await Deno.remove(dir, { recursive: true });
});

Deno.test("sampling is seeded, respects topK and bad inputs give clear errors", async () => {
  const lm = await fromPretrained(fixturePath("char-mamba"));
  const prompt = [[...new TextEncoder().encode("It is a truth")]];
  const a = await lm.generate(prompt, 24, { sample: true, seed: 5, temperature: 0.8, topK: 5 });
  const b = await lm.generate(prompt, 24, { sample: true, seed: 5, temperature: 0.8, topK: 5 });
  const c = await lm.generate(prompt, 24, { sample: true, seed: 6, temperature: 0.8, topK: 5 });
  assert.deepEqual(a, b);
  assert.notDeepEqual(a, c);
  // every bit of the seed counts: 5 + 2^32 and -(2^32 - 5) sample other tokens than 5 (it was taken modulo 2^32)
  for (const seed of [5 + 2 ** 32, 5 - 2 ** 32]) {
    const far = await lm.generate(prompt, 24, { sample: true, seed, temperature: 0.8, topK: 5 });
    assert.notDeepEqual(far, a, `seed ${seed}`);
  }
  // topK = 1 is greedy.
  assert.deepEqual(
    await lm.generate(prompt, 12, { sample: true, topK: 1, seed: 3 }),
    await lm.generate(prompt, 12),
  );
  assert.throws(
    () => lm.tokensTensor([[1, 300]]),
    /token \[0\]\[1\] = 300 is outside the vocabulary \[0, 256\)/,
  );
  assert.throws(() => lm.tokensTensor([[1.5]]), /is not an integer/);
  // values shown as what they are: a string quoted, an object by its type (they read 1 and [object Object])
  assert.throws(() => lm.tokensTensor([[1, "1" as never]]), /token \[0\]\[1\] = "1" is not an integer/);
  assert.throws(
    () => lm.tokensTensor([{} as never]),
    /token row 0 must be an array of ids or an Int32Array, got an object$/,
  );
  assert.throws(
    () => lm.tokensTensor([Uint32Array.of(1, 2) as never]),
    /token row 0 must be an array of ids or an Int32Array, got a Uint32Array \[1,2\]$/,
  );
  assert.throws(() => new MambaLM({ dModel: 8, nLayers: 1 }, "x" as never), /with vocabSize, got "x"$/);
  await assert.rejects(
    () => lm.generate(prompt, 2, { temperature: 0, sample: true }),
    /temperature must be a number > 0 and at most 2\^126 \(8.507059e\+37: 1 \/ temperature is an f32 normal in the sampler\), got 0/,
  );
  lm.dispose();
  assert.throws(() => parseCheckpointConfig({ model_type: "llama", hidden_size: 8 }), /not a Mamba/);
  assert.throws(() => parseCheckpointConfig({ hidden_size: 8, num_hidden_layers: 1 }), /has no 'state_size'/);
  assert.throws(
    () => parseCheckpointConfig({ d_model: 8, n_layer: 1, vocab_size: 8, ssm_cfg: { layer: "Mamba2" } }),
    /Mamba1/,
  );
  // the HF layout reads no ssm_cfg, but one naming Mamba2 is no Mamba1 model
  const hf = { model_type: "mamba", hidden_size: 8, num_hidden_layers: 1, state_size: 4, vocab_size: 8 };
  assert.throws(
    () => parseCheckpointConfig({ ...hf, ssm_cfg: { layer: "Mamba2" } }),
    /config\.json: ssm_cfg\.layer 'Mamba2' is not supported \(only Mamba1\)/,
  );
  assert.throws(() => parseCheckpointConfig({ ...hf, ssm_cfg: [] }), /'ssm_cfg' must be an object, got \[\]/);
  assert.equal(parseCheckpointConfig({ ...hf, ssm_cfg: {} }).layout, "hf");
  // attn_layer_idx null: no attention layers (state-spaces' own default is None)
  assert.equal(
    parseCheckpointConfig({ d_model: 8, n_layer: 1, vocab_size: 8, attn_layer_idx: null }).layout,
    "state-spaces",
  );
  assert.throws(
    () => parseCheckpointConfig({ d_model: 8, n_layer: 1, vocab_size: 8, attn_layer_idx: { 0: 1 } }),
    /'attn_layer_idx' must be a list of layer indices, got \{"0":1\}/,
  );
  await assert.rejects(
    () => fromPretrained("/nonexistent/model"),
    /cannot read \/nonexistent\/model\/config.json/,
  );
});

Deno.test("fromPretrained: BF16/F16 weights are converted; shapes that disagree with config.json are named", async () => {
  const { parseSafetensors, serializeSafetensors } = await import("../core/safetensors.ts");
  const src = fixturePath("lm_v64_hf");
  const parsed = parseSafetensors(await Deno.readFile(`${src}/model.safetensors`));
  const f = await loadFixture("lm_v64.safetensors");
  const tokens = toTensor(f, "tokens");
  for (const dtype of ["BF16", "F16"] as const) {
    const dir = await Deno.makeTempDir();
    const tensors = Object.fromEntries(
      [...parsed.tensors].map(([k, t]) => [k, { shape: t.shape, data: t.data, dtype }]),
    );
    await Deno.writeFile(`${dir}/model.safetensors`, serializeSafetensors(tensors));
    await Deno.copyFile(`${src}/config.json`, `${dir}/config.json`);
    const lm = await fromPretrained(dir);
    const logits = tidy(() => noGrad(() => lm.forward(tokens)));
    assert.deepEqual(logits.shape, f.get("logits")!.shape);
    const d = maxAbsDiff(await logits.toArray(), f.get("logits")!.data);
    // Rounding the weights to 8 (BF16) or 11 (F16) mantissa bits moves logits of magnitude ~5 a little.
    assert.ok(d < (dtype === "BF16" ? 0.5 : 0.05) && d > 0, `${dtype}: logits max diff ${d}`);
    logits.dispose();
    lm.dispose();
    await Deno.remove(dir, { recursive: true });
  }
  tokens.dispose();
  const dir = await Deno.makeTempDir();
  const cfg = JSON.parse(await Deno.readTextFile(`${src}/config.json`));
  await Deno.writeTextFile(`${dir}/config.json`, JSON.stringify({ ...cfg, state_size: 8 }));
  await Deno.copyFile(`${src}/model.safetensors`, `${dir}/model.safetensors`);
  await assert.rejects(
    () => fromPretrained(dir),
    /shape mismatch for mamba\.layers\.0\.mixer\.A_log: checkpoint \[64, 16\] vs model \[64, 8\]/,
  );
  await Deno.remove(dir, { recursive: true });
});

Deno.test("LMOptions are validated and a config derived from another with a new dModel is an error", async () => {
  await init();
  const cfg = { dModel: 16, nLayers: 1 };
  assert.throws(
    () => new MambaLM(cfg, { vocabSize: 3, padVocabSizeMultiple: 0 }),
    /padVocabSizeMultiple must be a positive integer, got 0/,
  );
  assert.throws(
    () => new MambaLM(cfg, { vocabSize: 3, padVocabSizeMultiple: 2.5 }),
    /padVocabSizeMultiple must be a positive integer, got 2.5/,
  );
  assert.throws(
    () => new MambaLM(cfg, { vocabSize: 3, tieEmbedding: true } as never),
    /unknown option 'tieEmbedding'/,
  );
  assert.throws(
    () => new MambaLM(cfg, { vocabSize: 3, tieEmbeddings: "yes" } as never),
    /tieEmbeddings must be a boolean, got "yes"/,
  );
  assert.throws(() => new MambaLM(cfg, { vocabSize: 0 }), /vocabSize must be a positive integer, got 0/);
  assert.throws(
    () => new MambaLM(cfg, { vocabSize: 3, padVocabSizeMultiple: NaN }),
    /padVocabSizeMultiple must be a positive integer, got NaN/,
  );
  for (const bad of [-1, 3, 1.5, "0"]) {
    assert.throws(
      () => new MambaLM(cfg, { vocabSize: 3, paddingIdx: bad as number }),
      new RegExp(
        `paddingIdx must be an integer in \\[0, vocabSize = 3\\) or null, got ${JSON.stringify(bad)}`,
      ),
    );
  }
  const lm = new MambaLM(cfg, { vocabSize: 30, padVocabSizeMultiple: 8, tieEmbeddings: undefined });
  assert.equal(lm.vocabSize, 32);
  assert.equal(lm.embedding.paddingIdx, 0, "mamba.py's padding_idx=0 by default");
  assert.equal(new MambaLM(cfg, { vocabSize: 3, paddingIdx: null }).embedding.paddingIdx, null);
  assert.equal(new MambaLM(cfg, { vocabSize: 3, paddingIdx: 2 }).embedding.paddingIdx, 2);
  // A complete config is validated again; a stale derived dInner (and with it dtRank) is named.
  assert.throws(
    () => new MambaLM({ ...lm.config, dModel: 32 }, { vocabSize: 30 }),
    /MambaConfig: dInner is 32, but expandFactor \* dModel = 2 \* 32 = 64/,
  );
  // ... by mambaConfig itself too: a resolved config round-trips
  assert.deepEqual(mambaConfig(lm.config), lm.config);
  // sizes past int32 are named by their key (they failed at an allocation that named none)
  assert.throws(
    () => mambaConfig({ dModel: 16, nLayers: 1, dtRank: 2 ** 40 }),
    /MambaConfig: dtRank must be "auto" or a positive integer below 2\^31, got 1099511627776/,
  );
  assert.throws(
    () => mambaConfig({ dModel: 2 ** 20, nLayers: 1, expandFactor: 2 ** 12 }),
    /MambaConfig: expandFactor \* dModel \(the inner width, 4096 \* 1048576\) must be below 2\^31/,
  );
  assert.throws(
    () => new MambaLM({ ...lm.config, dState: 0 }, { vocabSize: 30 }),
    /dState must be a positive integer/,
  );
  const other = new MambaLM({ ...lm.config, dState: 8 }, { vocabSize: 30 });
  assert.equal(other.config.dState, 8);
  assert.deepEqual(new MambaLM(lm.config, { vocabSize: 30 }).config, lm.config);
  lm.dispose();
  other.dispose();
});

Deno.test("MambaLM's embedding row paddingIdx (default 0, as mamba.py) is initialised but gets no gradient", async () => {
  const cfg = { dModel: 8, nLayers: 1, dState: 4, scan: "pscan" as const };
  const ids = tensor(new Int32Array([0, 1, 0, 2, 3, 0]), [2, 3], { dtype: "i32" });
  for (const paddingIdx of [undefined, null]) {
    manualSeed(1);
    const lm = new MambaLM(cfg, { vocabSize: 5, ...(paddingIdx === undefined ? {} : { paddingIdx }) });
    tidy(() => lm.forward(ids).sum().backward());
    const w = await lm.embedding.weight.toArray();
    const g = await lm.embedding.weight.grad!.toArray();
    const row0 = (a: ArrayLike<number>) => Array.from(a).slice(0, 8);
    assert.ok(
      row0(w).some((v) => v !== 0),
      "row 0 is re-initialised with the table, as mamba.py's _init_weights",
    );
    if (paddingIdx === undefined) {
      assert.deepEqual(row0(g), new Array(8).fill(0), "default: no gradient for row 0");
    } else assert.ok(row0(g).some((v) => v !== 0), "paddingIdx null: row 0 gets its gradient");
    assert.ok(Array.from(g).slice(8, 16).some((v) => v !== 0), "row 1 gets its gradient");
    lm.dispose();
  }
  ids.dispose();
});

Deno.test({
  name:
    "decoding on a GPU's plans: one matvec dispatch per product (in_proj, x_proj, out_proj, head), the norms inside in_proj's and the head's, no sums",
  ignore: fusedUnavailable(),
  fn: async () => {
    // d_model 512: every product's K is at least 256 (512 and ED 1024), as at the pretrained widths; the head
    // its own weight, then the embedding's (tied)
    for (const tieEmbeddings of [false, true]) await decodeOnGpuPlans(tieEmbeddings);
  },
});

/** decoding's kernels on a GPU's plans, and its logits against the CPU plans' (see the test above) */
async function decodeOnGpuPlans(tieEmbeddings: boolean): Promise<void> {
  manualSeed(3);
  const lm = new MambaLM(mambaConfig({ dModel: 512, nLayers: 2 }), { vocabSize: 300, tieEmbeddings });
  const ids = tensor(new Int32Array([5]), [1]);
  const step = async (grad = false) => {
    const caches = lm.emptyCache(1);
    const r = await kernelsRun(() =>
      tidy(() => grad ? lm.step(ids, caches) : noGrad(() => lm.step(ids, caches)))
    );
    const logits = await r.value.logits.toArray();
    dispose([
      r.value.logits,
      ...r.value.caches.flatMap((c) => [c.h, c.inputs]),
      ...caches.flatMap((c) => [c.h, c.inputs]),
    ]);
    return { kernels: r.kernels, logits };
  };
  try {
    const cpu = await withPlans({ gpu: false }, step);
    for (const matvec of [true, false]) {
      const gpu = await withPlans({ gpu: true, split: true, matvec }, step);
      const count = (re: RegExp) => gpu.kernels.filter((k) => re.test(k)).length;
      if (matvec) {
        // x_proj and out_proj per layer; in_proj and the head with their norms (each layer's, norm_f)
        assert.equal(count(/^matmul_matvec_m1_k4$/), 2 * 2, gpu.kernels.join(", "));
        assert.equal(count(/^matmul_matvec_m1_k4_rms$/), 2 + 1, gpu.kernels.join(", "));
        assert.equal(count(/^rms_/), 0, `no norm kernels: ${gpu.kernels.join(", ")}`);
        assert.equal(count(/^reduce_/), 0, `no sums of K slices: ${gpu.kernels.join(", ")}`);
      } else {
        assert.equal(count(/^matmul_matvec/), 0, "the hook off");
        assert.equal(count(/^rms_fwd/), 2 + 1, "the norms' own kernels");
        assert.ok(count(/^reduce_/) > 0, "the split's sums");
      }
      // the whole-model bound, relative to the logits' largest (1e-5 on a software adapter, 1e-4 on GPUs)
      const { rtol } = tolerance("model");
      const scale = Math.max(...cpu.logits.map(Math.abs));
      const worst = Math.max(...gpu.logits.map((v, i) => Math.abs(v - cpu.logits[i])));
      assert.ok(
        worst <= rtol * scale,
        `tied ${tieEmbeddings}, matvec ${matvec}: logits ${worst} from the CPU plans' (scale ${scale})`,
      );
    }
    // with autograd on (the parameters require grad), MambaLM.step is the differentiable one: no kernel
    // without a backward (the norms inside the products, the fused step's conv and SSM kernels), the same logits
    const withGrad = await withPlans({ gpu: true, split: true, matvec: true }, () => step(true));
    assert.equal(
      withGrad.kernels.filter((k) => k === "matmul_matvec_m1_k4_rms").length,
      0,
      withGrad.kernels.join(),
    );
    assert.equal(withGrad.kernels.filter((k) => /^fused_step|^ssm_step|^conv_step/.test(k)).length, 0);
    const scale = Math.max(...cpu.logits.map(Math.abs));
    const worst = Math.max(...withGrad.logits.map((v, i) => Math.abs(v - cpu.logits[i])));
    assert.ok(worst <= tolerance("model").rtol * scale, `grad on: logits ${worst} (scale ${scale})`);
  } finally {
    ids.dispose();
    lm.dispose();
  }
}

Deno.test("generate: the prompt's logits are computed for its last position only, with the same tokens", async () => {
  manualSeed(4);
  const [V, P] = [4096, 512];
  const lm = new MambaLM({ dModel: 32, nLayers: 4 }, { vocabSize: V });
  const prompt = [Array.from({ length: P }, (_, i) => (i * 7) % V)];
  const last = tidy(() => noGrad(() => narrow(lm.forward(prompt), 1, P - 1, 1))); // last: (1, 1, V)
  const row = await last.toArray();
  last.dispose();
  const first = row.indexOf(Math.max(...row));
  await lm.generate(prompt, 2); // the kernels and pools are warm
  const base = memory().liveBytes;
  resetPeak();
  const got = await lm.generate(prompt, 2);
  const peak = memory().peakBytes - base;
  assert.equal(got[0][0], first, "the first token is the argmax of the whole forward's last logits");
  // All P positions' logits alone would be 8 MiB (measured on lavapipe: 1.16 MiB peak; 8.2 MiB with a per-layer
  // tidy but every position's logits, 12.2 MiB before both). Where the fused scan is unavailable (fewer than
  // 10 storage buffers) the block falls back to pscan, whose (B, L, ED, N) terms alone pass that bound.
  if (!fusedUnavailable()) {
    assert.ok(peak < 4 * P * V, `prefill peak ${peak} bytes is not below the prompt's logits, ${4 * P * V}`);
  }
  lm.dispose();
});

Deno.test("generate with prefillChunk: a long prompt in chunks gives the same tokens at a fraction of the peak", async () => {
  await init();
  const lm = await fromPretrained(fixturePath("char-mamba"));
  // prompt rows of two lengths (two groups), longer than the chunk
  const P = 600;
  const long = Array.from({ length: P }, (_, i) => (i * 13 + 5) % lm.vocabSize);
  const prompt = [long, long.slice(0, 437)];
  const sampled = { sample: true, temperature: 1.5, seed: 9 };
  try {
    const peakOf = async (options: Record<string, unknown>) => {
      await lm.generate(prompt, 2, options); // warm
      const base = memory().liveBytes;
      resetPeak();
      const tokens = await lm.generate(prompt, 12, options);
      return { tokens, peak: memory().peakBytes - base };
    };
    const whole = await peakOf({});
    for (const chunk of [1, 37, 256]) {
      const parts = await peakOf({ prefillChunk: chunk });
      assert.deepEqual(parts.tokens, whole.tokens, `greedy, chunks of ${chunk}`);
    }
    const chunked = await peakOf({ prefillChunk: 64 });
    // measured on lavapipe: 315,136 bytes against 1,957,376 (chunks of 256: 1,002,496)
    assert.ok(
      chunked.peak < whole.peak / 3,
      `peak ${chunked.peak} bytes in chunks of 64, ${whole.peak} whole`,
    );
    assert.deepEqual(
      await lm.generate(prompt, 12, { ...sampled, prefillChunk: 100 }),
      await lm.generate(prompt, 12, sampled),
      "sampled, chunks of 100",
    );
    for (const bad of [0, 1.5, -1, NaN]) {
      await assert.rejects(
        () => lm.generate(prompt, 1, { prefillChunk: bad }),
        new RegExp(`generate: prefillChunk must be a positive integer or Infinity, got ${bad}`),
      );
    }
  } finally {
    lm.dispose();
  }
});

Deno.test("generate: tensor prompt ids are range-checked, Int32Array rows are accepted", async () => {
  await init();
  const lm = new MambaLM({ dModel: 16, nLayers: 1 }, { vocabSize: 32 });
  for (
    const [ids, msg] of [
      [[1, 999999, 3], /token \[0\]\[1\] = 999999 is outside the vocabulary \[0, 32\)/],
      [[1, 2, -4], /token \[0\]\[2\] = -4 is outside the vocabulary \[0, 32\)/],
    ] as const
  ) {
    const t = tensor(new Int32Array(ids), [1, 3], { dtype: "i32" });
    await assert.rejects(() => lm.generate(t, 3), msg);
    t.dispose();
  }
  const t2 = tensor(new Int32Array([1, 2, 3, 4, 5, 32]), [2, 3], { dtype: "i32" });
  await assert.rejects(() => lm.generate(t2, 3), /token \[1\]\[2\] = 32 is outside/);
  t2.dispose();
  // generate's own rows can be fed back; a flat Int32Array and ragged rows get clear errors.
  const out = await lm.generate([[1, 2, 3], [4, 5, 6]], 4);
  assert.deepEqual(
    (await lm.generate(out, 3)).map((r) => [...r]),
    (await lm.generate(out.map((r) => [...r]), 3)).map((r) => [...r]),
  );
  await assert.rejects(() => lm.generate(new Int32Array([1, 2]) as never, 2), /a flat Int32Array/);
  assert.throws(
    () => lm.forward([[1, 2, 3], [1, 2]]),
    /token rows must all have the same length: row 0 has 3, row 1 has 2/,
  );
  // generate takes rows of different lengths; each is checked, naming its own index
  await assert.rejects(
    () => lm.generate([[1, 2, 3], [1, 2], [4, 32]], 2),
    /token \[2\]\[1\] = 32 is outside/,
  );
  await assert.rejects(() => lm.generate([[1, 2, 3], []], 2), /generate: prompt row 1 is empty/);
  await assert.rejects(() => lm.generate([[1, 2, 3], 4] as never, 2), /token row 1 must be an array of ids/);
  lm.dispose();
});

Deno.test("generate: prompt rows of different lengths each continue as they would alone (greedy, with a repetition penalty, stop tokens)", async () => {
  await init();
  // the trained char model: its tokens depend on the whole prompt (a random one's on the last token alone,
  // which would not see a row given another's state)
  const lm = await fromPretrained(fixturePath("char-mamba"));
  const texts = ["Elizabeth was", "Mr. Darcy", "It is a truth", "She", "Mr. Bingley", "Jane"];
  const rows = texts.map((t) => [...new TextEncoder().encode(t)]);
  const base = memory().liveBytes;
  for (const o of [{}, { repetitionPenalty: 1.4 }]) {
    const together = await lm.generate(rows, 9, o);
    for (let b = 0; b < rows.length; b++) {
      const alone = await lm.generate([rows[b]], 9, o);
      assert.deepEqual([...together[b]], [...alone[0]], `${JSON.stringify(o)}: row ${b}`);
    }
  }
  // a row's stop token ends that row alone
  const plain = await lm.generate(rows, 9);
  const stop = plain[1][3];
  const stopped = await lm.generate(rows, 9, { stopTokens: [stop] });
  stopped.forEach((r, b) => {
    const end = plain[b].indexOf(stop);
    assert.deepEqual([...r], [...plain[b].slice(0, end < 0 ? 9 : end + 1)], `row ${b} with a stop token`);
  });
  assert.equal(memory().liveBytes, base, "nothing left behind");
  lm.dispose();
});

Deno.test("generate: rows of different lengths that run out of memory part-way leave nothing behind", async () => {
  await init();
  const lm = new MambaLM({ dModel: 16, nLayers: 2, dState: 8 }, { vocabSize: 32 });
  const rows = [[1, 2, 3, 4, 5], [6, 7], [8, 9, 10, 11, 12], [13]]; // three groups: 5, 2 and 1 ids
  const base = memory();
  // caps from the live bytes up: the groups' ids (a later one's after an earlier one's), the prefill of a
  // later group, the decoding, until it fits
  const { failed } = await underRisingCaps(
    () => lm.generate(rows, 2, { repetitionPenalty: 1.3 }),
    256,
    (room) => {
      assert.deepEqual(
        [memory().liveBytes, memory().liveTensors],
        [base.liveBytes, base.liveTensors],
        `left behind at +${room} bytes`,
      );
    },
  );
  assert.ok(failed > 10, `${failed} failed runs`);
  lm.dispose();
});

Deno.test("generate: options are checked before any work; sampling options need sample", async () => {
  await init();
  const lm = new MambaLM({ dModel: 16, nLayers: 1 }, { vocabSize: 32 });
  const prompt = [[1, 2, 3]];
  const before = dispatchCount();
  for (
    const [o, msg] of [
      [{ topK: 3 }, /topK is a sampling option but sample is not set/],
      [{ temperature: 5, seed: 4 }, /temperature, seed are sampling options but sample is not set/],
      [{ sample: true, topP: 2 }, /topP must be a number in \(0, 1\], got 2/],
      [{ sample: true, topK: 2.5 }, /topK must be an integer from 0 to 2\^32 - 1 \(0: all\), got 2.5/],
      [
        { sample: true, topK: 1e10 },
        /topK must be an integer from 0 to 2\^32 - 1 \(0: all\), got 10000000000/,
      ],
      [{ sample: true, temperature: "1" }, /temperature must be a number > 0 and at most 2\^126 .*, got "1"/],
      // 1 / temperature, an f32 in the sampler, would be 0 (Infinity sampled uniformly) or subnormal
      [
        { sample: true, temperature: Infinity },
        /temperature must be a number > 0 and at most 2\^126 .*, got Infinity/,
      ],
      [{ sample: true, temperature: 1e38 }, /temperature must be .*, got 1e\+38/],
      [{ sample: true, seed: 0.5 }, /seed must be an integer within ±\(2\^53 - 1\), got 0.5/],
      [{ readEvery: NaN }, /readEvery must be a positive integer or Infinity, got NaN/],
      [{ readEvery: 2.5 }, /readEvery must be a positive integer or Infinity, got 2.5/],
      // a string shows quoted, an object by its type (they read 4 and [object Object])
      [{ readEvery: "4" }, /readEvery must be a positive integer or Infinity, got "4"$/],
      [{ onTokens: { a: 1 } }, /onTokens must be a function, got an object$/],
      [{ onTokens: [1] }, /onTokens must be a function, got \[1\]$/],
      [{ prefillChunk: new Map() }, /prefillChunk must be a positive integer or Infinity, got a Map$/],
      [{ topk: 3 }, /unknown option 'topk'/],
      [{ minP: 0.1 }, /minP is a sampling option but sample is not set/],
      [{ sample: true, minP: 1.5 }, /minP must be a number in \[0, 1\], got 1.5/],
      [{ repetitionPenalty: 0 }, /repetitionPenalty must be a number in f32's normal range .*, got 0/],
      [
        { repetitionPenalty: Infinity },
        /repetitionPenalty must be a number in f32's normal range .*, got Infinity/,
      ],
      [
        { sample: true, repetitionPenalty: "1.2" },
        /repetitionPenalty must be a number in f32's normal range .*, got "1.2"/,
      ],
      // an f32 in the sampler: 1e-50 was 0 there (a seen logit over it infinite), 1e39 infinite, 1e-40 subnormal
      [
        { repetitionPenalty: 1e-50 },
        /repetitionPenalty must be a number in f32's normal range \[1.1754944e-38, 3.4028235e\+38\] \(it is an f32 in the sampler\), got 1e-50/,
      ],
      [
        { repetitionPenalty: 1e39 },
        /repetitionPenalty must be a number in f32's normal range .*, got 1e\+39/,
      ],
      [
        { repetitionPenalty: 1e-40 },
        /repetitionPenalty must be a number in f32's normal range .*, got 1e-40/,
      ],
    ] as const
  ) {
    await assert.rejects(() => lm.generate(prompt, 4, o as never), msg);
  }
  // the ends of the ranges are accepted (a temperature below f32's reach samples as the argmax, by design)
  for (
    const o of [
      { repetitionPenalty: 2 ** -126 },
      { repetitionPenalty: 3.4028234663852886e38 },
      { sample: true, temperature: 2 ** 126 },
      { sample: true, temperature: 1e-300 },
    ]
  ) sampleParams(o);
  await assert.rejects(() => lm.generate(prompt, 2.5), /nTokens must be a non-negative integer, got 2.5/);
  await assert.rejects(() => lm.generate(prompt, NaN), /nTokens must be a non-negative integer, got NaN/); // not null
  await assert.rejects(() => lm.generate(prompt, 2, null as never), /options must be an object, got null/);
  const noRows = zeros([0, 3], { dtype: "i32" });
  await assert.rejects(() => lm.generate(noRows, 2), /generate: the prompt is empty \(shape \[0, 3\]\)/);
  noRows.dispose();
  assert.equal(dispatchCount(), before, "a bad option threw after work was dispatched");
  // sample: false says greedy on purpose: the sampling options are ignored.
  assert.deepEqual(
    await lm.generate(prompt, 6, { sample: false, topK: 3, temperature: 5 }),
    await lm.generate(prompt, 6),
  );
  let calls = 0;
  await lm.generate(prompt, 8, { readEvery: Infinity, onTokens: () => calls++ });
  assert.equal(calls, 1);
  lm.dispose();
});

Deno.test("repetition penalty: the sampler reads penalised logits (greedy, sampling, top-k, top-p) and marks the chosen ids seen", async () => {
  await init();
  // A penalty of 2 halves (doubles below 0) exactly in f32, so the kernel's penalised rows must choose as
  // the same rows penalised here and sampled without one, id for id.
  const [B, V] = [16, 300];
  const rnd = new Philox(11);
  const x = Float32Array.from({ length: B * V }, () => (rnd.nextU32() / 2 ** 32 - 0.5) * 8);
  const rows = Array.from({ length: B }, () => Array.from({ length: 40 }, () => rnd.nextU32() % V));
  const penalised = x.map((v, i) => {
    const [b, id] = [Math.floor(i / V), i % V];
    return rows[b].includes(id) ? (v < 0 ? v * 2 : v / 2) : v;
  });
  const cases = [{ sample: false }, { sample: true }, { sample: true, topK: 5 }, { sample: true, topP: 0.6 }];
  for (const o of cases) {
    const [logits, plain] = [tensor(x, [B, V]), tensor(penalised, [B, V])];
    const seen = tensor(seenMask(rows, V), [B, seenWords(V)], { dtype: "i32" });
    const outs: (Int32Array | Float32Array)[] = [];
    for (const [l, p, mask] of [[logits, 2, seen], [plain, 1, undefined]] as const) {
      const next = zeros([B], { dtype: "i32" });
      const all = zeros([B, 1], { dtype: "i32" });
      sampleInto(l, next, all, 0, { ...sampleParams({ ...o, repetitionPenalty: p }), seed: 5 }, mask);
      outs.push(await all.toArray());
      dispose([next, all]);
    }
    assert.deepEqual([...outs[0]], [...outs[1]], `${JSON.stringify(o)}: the penalised rows' choices`);
    // the chosen ids join the rows' seen ids, nothing else changes
    const want = seenMask(rows.map((r, b) => [...r, outs[0][b]]), V);
    assert.deepEqual([...await seen.toArray()], [...want], `${JSON.stringify(o)}: the mask after`);
    assert.ok(rows.some((r, b) => !r.includes(outs[0][b])), "some row chose an id it had not seen");
    dispose([logits, plain, seen]);
  }
  assert.throws(
    () =>
      sampleInto(
        zeros([2, V]),
        zeros([2], { dtype: "i32" }),
        zeros([2, 1], { dtype: "i32" }),
        0,
        sampleParams({ repetitionPenalty: 1.5 }),
      ),
    /a repetition penalty needs the mask of the ids seen, \(2, 10\), got none/,
  );
});

Deno.test("generate with a repetition penalty: greedy tokens equal a full forward's penalised argmax, step by step (HF's rule)", async () => {
  await init();
  manualSeed(21);
  const V = 48;
  const lm = new MambaLM({ dModel: 16, nLayers: 2, dState: 4 }, { vocabSize: V });
  // prompts over most of the vocabulary, so that their ids' penalty decides tokens from the first on
  const prompt = [0, 1].map((b) => Array.from({ length: 30 }, (_, i) => (i * (5 + 2 * b) + 3 * b) % V));
  const penalty = 1.6;
  const n = 12;
  const got = await lm.generate(prompt, n, { repetitionPenalty: penalty });
  // the reference: the whole sequence through forward, the last logits penalised on the host, argmax
  for (let b = 0; b < prompt.length; b++) {
    const seq = [...prompt[b]];
    for (let t = 0; t < n; t++) {
      const logits = tidy(() => noGrad(() => narrow(lm.forward([seq]), 1, seq.length - 1, 1)));
      const row = [...await logits.toArray()].map((
        v,
        id,
      ) => (seq.includes(id) ? (v < 0 ? v * penalty : v / penalty) : v));
      logits.dispose();
      const best = row.indexOf(Math.max(...row));
      assert.equal(got[b][t], best, `row ${b}, token ${t}`);
      seq.push(best);
    }
  }
  // a prompt given as a tensor: its ids come back from the GPU for the mask
  const ids = tensor(Int32Array.from(prompt.flat()), [2, 30], { dtype: "i32" });
  const fromTensor = await lm.generate(ids, n, { repetitionPenalty: penalty });
  ids.dispose();
  assert.deepEqual(fromTensor.map((r) => [...r]), got.map((r) => [...r]), "a tensor prompt");
  // without it this model repeats itself: the penalty changed the output
  const plain = await lm.generate(prompt, n);
  assert.notDeepEqual(plain.map((r) => [...r]), got.map((r) => [...r]));
  lm.dispose();
});

Deno.test("generate: without a seed, sampling draws one from the global generator (manualSeed)", async () => {
  await init();
  const lm = new MambaLM({ dModel: 16, nLayers: 1 }, { vocabSize: 32 });
  const prompt = [[1, 2, 3]];
  const run = async () => [...(await lm.generate(prompt, 16, { sample: true }))[0]];
  assert.notDeepEqual(await run(), await run());
  manualSeed(11);
  const a = await run();
  manualSeed(11);
  assert.deepEqual(await run(), a);
  lm.dispose();
});

Deno.test("sampling's noise stays finite: a token far below the best one is never drawn in 10^5 draws", async () => {
  // Uniforms of 24 bits rounded to 1.0 once in 2^24 draws: an infinite score, so a uniformly random token won
  // about V / 2^24 of the draws (49 of these 102400 at V 8192; 1 in 330 tokens at a 50k vocabulary). With one
  // logit at 0 and the rest at -30 softmax gives the others 7.7e-10 in all: no draw.
  await init();
  const V = 8192, R = 1024, S = 100;
  const host = new Float32Array(R * V).fill(-30);
  for (let r = 0; r < R; r++) host[r * V + 123] = 0;
  const logits = tensor(host, [R, V]);
  const next = zeros([R], { dtype: "i32" });
  const all = zeros([R, S], { dtype: "i32" });
  const params = { ...sampleParams({ sample: true }), seed: 42 };
  for (let s = 0; s < S; s++) sampleInto(logits, next, all, s, params);
  const drawn = await all.toArray();
  const others = drawn.filter((t) => t !== 123);
  assert.equal(
    others.length,
    0,
    `${others.length} of ${drawn.length} draws were not the dominant token: ${others.slice(0, 8)}`,
  );
  dispose([logits, next, all]);
});

Deno.test("generate: stopTokens end each row at its first one (kept) and stop decoding once every row has ended", async () => {
  await init();
  manualSeed(5);
  const lm = new MambaLM({ dModel: 16, nLayers: 1 }, { vocabSize: 32 });
  const prompt = [[1, 2, 3], [4, 5, 6]];
  const full = await lm.generate(prompt, 40, { sample: true, seed: 9 });
  // stop tokens that each row meets by its 6th token: every row ends by then, so decoding stops at the first
  // readback (8 tokens) instead of running 40
  const stops = [full[0][5], full[1][5]];
  const ends = full.map((r) => r.findIndex((t) => stops.includes(t)) + 1);
  const seen: Int32Array[][] = [];
  const { value: got, kernels } = await kernelsRun(() =>
    lm.generate(prompt, 40, {
      sample: true,
      seed: 9,
      stopTokens: stops,
      readEvery: 8,
      onTokens: (t) => seen.push(t),
    })
  );
  got.forEach((r, b) => {
    assert.ok(ends[b] >= 1 && ends[b] <= 6, `row ${b} ends at ${ends[b]}`);
    assert.deepEqual([...r], [...full[b].slice(0, ends[b])], `row ${b}`);
    assert.deepEqual([...seen.flatMap((t) => [...t[b]])], [...r], `row ${b} as onTokens saw it`);
  });
  assert.equal(seen.length, 1, "one readback: decoding stopped once every row had ended");
  const drawn = kernels.filter((k) => k.startsWith("sample_rows")).length;
  assert.equal(drawn, 8, "8 tokens drawn: decoding stopped at the readback of the 8th, not a step later");
  await assert.rejects(
    () => lm.generate(prompt, 4, { stopTokens: [32] }),
    /stopTokens must be a list of token ids in \[0, 32\) \(an array, or a typed array of integers\), got \[32\]$/,
  );
  await assert.rejects(
    () => lm.generate(prompt, 4, { stopTokens: 3 as unknown as number[] }),
    /stopTokens must be a list of token ids in \[0, 32\) \(.*\), got 3$/,
  );
  // typed arrays of ids are lists too (generate returns Int32Array rows); other containers are named (a Set
  // read as {}, an Int32Array as {"0":1})
  for (const ids of [Int32Array.from(stops), Uint32Array.from(stops), Uint16Array.from(stops)]) {
    const rows = await lm.generate(prompt, 40, { sample: true, seed: 9, stopTokens: ids, readEvery: 8 });
    assert.deepEqual(rows.map((r) => [...r]), got.map((r) => [...r]), ids.constructor.name);
  }
  for (
    const [bad, said] of [
      [new Set(stops), "a Set"],
      [Float32Array.of(1, 2), "a Float32Array \\[1,2\\]"],
      [{ 0: 1, length: 1 }, "an object"],
      [Int32Array.of(1, 32), "an Int32Array \\[1,32\\]"],
      [["1"], '\\["1"\\]'],
    ] as const
  ) {
    await assert.rejects(
      () => lm.generate(prompt, 4, { stopTokens: bad as unknown as number[] }),
      new RegExp(`stopTokens must be a list of token ids in \\[0, 32\\) \\(.*\\), got ${said}$`),
    );
  }
  // a char tokenizer's specialTokens.eos is null: the message says where such an id comes from
  await assert.rejects(
    () => lm.generate(prompt, 4, { stopTokens: [null as unknown as number] }),
    /got \[null\] \(a null or undefined id: is it a tokenizer's specialTokens\.eos/,
  );
  lm.dispose();
});

Deno.test("logits with no token to choose (NaN; infinities when sampling) are named by generate, not read as the last id", async () => {
  await init();
  // the sampler: greedy over -inf takes the first id (torch.argmax); NaN rows, and sampling over -inf or +inf,
  // are marked -1 (they read as id V - 1 before)
  const V = 6;
  const rows = [Array(V).fill(NaN), Array(V).fill(-Infinity), [0, 1, Infinity, 2, 0, 0]];
  const logits = tensor(rows.flat(), [3, V]);
  const all = zeros([3, 2], { dtype: "i32" });
  const next = zeros([3], { dtype: "i32" });
  sampleInto(logits, next, all, 0, sampleParams({}));
  sampleInto(logits, next, all, 1, { ...sampleParams({ sample: true }), seed: 1 });
  assert.deepEqual([...await all.toArray()], [-1, -1, 0, -1, 2, -1]);
  assert.deepEqual([...await next.toArray()], [0, 0, 0], "the next step's ids stay valid");
  dispose([logits, all, next]);
  // a few NaN logits among finite ones are passed over, greedy or sampling (torch.argmax would return the
  // NaN's index; documented on SampleOptions.sample)
  const someNaN = tensor([[NaN, 0, 3, NaN, 1, NaN]]);
  const [n1, a1] = [zeros([1], { dtype: "i32" }), zeros([1, 2], { dtype: "i32" })];
  sampleInto(someNaN, n1, a1, 0, sampleParams({}));
  sampleInto(someNaN, n1, a1, 1, { ...sampleParams({ sample: true, temperature: 0.01 }), seed: 1 });
  assert.deepEqual([...await a1.toArray()], [2, 2]);
  dispose([someNaN, n1, a1]);
  // generate names the row and the token
  const lm = new MambaLM({ dModel: 8, nLayers: 1 }, { vocabSize: 16 });
  // a final norm of NaN: every logit NaN (one NaN logit among finite ones is only never chosen)
  lm.loadStateDict({ "norm_f.weight": { shape: [8], data: new Float32Array(8).fill(NaN) } }, {
    strict: false,
  });
  await assert.rejects(
    () => lm.generate([[1, 2]], 3, { readEvery: 1 }),
    /generate: row 0, token 0: the logits had no token to choose \(NaN: a diverged model\?\)/,
  );
  lm.dispose();
  // a repetition penalty below 1 divides a seen logit past f32's range (above 4.08 at 2^-126): named with it
  const big = new MambaLM({ dModel: 8, nLayers: 1 }, { vocabSize: 16 });
  big.loadStateDict({ "norm_f.weight": { shape: [8], data: new Float32Array(8).fill(1e4) } }, {
    strict: false,
  });
  const every = [Array.from({ length: 16 }, (_, i) => i)];
  await assert.rejects(
    () => big.generate(every, 2, { sample: true, seed: 1, repetitionPenalty: 2 ** -126, readEvery: 1 }),
    /no token to choose \(NaN, or an infinity when sampling: a diverged model\? Or repetitionPenalty 1.1754943508222875e-38, which divides a seen token's logit, took it past f32's range\)/,
  );
  big.dispose();
});

Deno.test("top-k keeps the k largest logits and every logit tied with the k-th (as mamba.py and HF)", async () => {
  await init();
  const sevens = Array(70).fill(0).map((_, i) => (i % 7 === 3 ? 2 : 0)); // ten 2s (ids 3, 10, .. 66), else 0
  const all = (n: number) => Array.from({ length: n }, (_, i) => i);
  const cases: SampleCase[] = [
    [Array(10).fill(1), { topK: 2 }, all(10)],
    [[0, 5, 5, 5, 1, 5], { topK: 2 }, [1, 2, 3, 5]],
    [[0, 5, 5, 5, 1, 5], { topK: 5 }, [1, 2, 3, 4, 5]],
    [[0, 5, 5, 4, 1, 6], { topK: 3 }, [1, 2, 5]],
    [[-3, -1, -2, -1, -0, 0], { topK: 3 }, [1, 3, 4, 5]], // -0 and 0 tie
    [[-3, -1, -2, -1, -0, 0], { topK: 2 }, [4, 5]],
    [[2, 9, 4, 7, 1, 8], { topK: 3 }, [1, 3, 5]],
    [sevens, { topK: 4 }, [3, 10, 17, 24, 31, 38, 45, 52, 59, 66]],
    [sevens, { topK: 10 }, [3, 10, 17, 24, 31, 38, 45, 52, 59, 66]],
    [sevens, { topK: 11 }, all(70)],
    [[Math.log(0.5), Math.log(0.3), Math.log(0.15), Math.log(0.05)], { topP: 0.7 }, [0, 1]],
    // top-p keeps the ties at its edge too
    [[1, 1, 1, 1, 1, 1], { topK: 3, topP: 0.5 }, all(6)],
    [[3, 1, 3, 0, 3, 3], { topK: 3, topP: 0.5, temperature: 0.5 }, [0, 2, 4, 5]],
    [[3, 1, 2, 0, 2, 4], { topK: 3, topP: 0.5 }, [5]],
    // a NaN takes no top-k place (its key was the largest: top-1 found no token, top-2 only the best)
    [[0, 1, NaN, 2, 0], { topK: 1 }, [3]],
    [[0, 1, NaN, 2, 0], { topK: 2, temperature: 3 }, [1, 3]],
  ];
  await assertSampledSets(cases);
});

type SampleCase = [number[], { topK?: number; topP?: number; minP?: number; temperature?: number }, number[]];

/** Each case: one row of logits repeated over 256 rows (each row draws its own noise), and the set of ids
 * that sampling must produce, all of them and no other. */
async function assertSampledSets(cases: SampleCase[]) {
  // enough draws that every kept token shows: the least likely kept one below holds 0.0046 of the mass (1 in
  // 256 draws missed it about a third of the time, passing or not by the seed's luck)
  const R = 4096;
  for (const [row, o, want] of cases) {
    const V = row.length;
    const logits = tensor(new Float32Array(Array.from({ length: R }, () => row).flat()), [R, V]);
    const next = zeros([R], { dtype: "i32" });
    const all = zeros([R, 1], { dtype: "i32" });
    sampleInto(logits, next, all, 0, { ...sampleParams({ sample: true, ...o }), seed: 3 });
    const got = [...new Set(await all.toArray())].sort((a, b) => a - b);
    assert.deepEqual(got, [...want].sort((a, b) => a - b), `${JSON.stringify(o)} over ${row}`);
    dispose([logits, next, all]);
  }
}

Deno.test("min-p keeps the tokens at least minP times as likely as the best (after the temperature), with top-k and top-p", async () => {
  await init();
  const x = [0.5, 0.3, 0.15, 0.05].map(Math.log); // probability ratios to the best: 0.6, 0.3, 0.1
  await assertSampledSets([
    [x, { minP: 0.2 }, [0, 1, 2]],
    [x, { minP: 0.55 }, [0, 1]],
    [x, { minP: 0.65 }, [0]],
    [x, { minP: 1 }, [0]],
    [x, { minP: 0.4, temperature: 2 }, [0, 1, 2]], // at T 2 the ratios are 0.77, 0.55, 0.32
    [x, { minP: 0.6, temperature: 2 }, [0, 1]],
    [x, { minP: 0.2, topK: 2 }, [0, 1]],
    [x, { minP: 0.05, topP: 0.85 }, [0, 1, 2]],
    [x, { minP: 0.2, topP: 0.95 }, [0, 1, 2]], // top-p's set {0, 1, 2, 3}, then min-p's
    // min-p after top-p, as HF's warpers: top-p's set of 0.6 is {0, 1}, then min-p's; with min-p first
    // ({0, 1}, renormalised to 0.625 and 0.375) top-p's would be {0}
    [x, { minP: 0.55, topP: 0.6 }, [0, 1]],
  ]);
});

Deno.test("top-p with -inf or far outliers in the row, and temperatures too small for 1 / T in f32", async () => {
  await init();
  // token 1 holds 0.91 of the mass (0.95 in the third row): the nucleus of 0.5 (0.9) is {1} alone. (When the
  // search halved logit values, from the row's minimum 24 rounds never got near the logits.)
  // 1 / 1e-40 overflows f32: scores (x - max) / T stay finite, so the draw tends to the argmax (ties
  // split), not to the first positive logit or the last id.
  await assertSampledSets([
    [[-Infinity, 5, 2, 2], { topP: 0.5 }, [1]],
    [[-1e30, 5, 2, 2], { topP: 0.5 }, [1]],
    [[-Infinity, 5, -Infinity, 2], { topP: 0.9 }, [1]],
    [[0.5, 3, 5, 2], { temperature: 1e-40 }, [2]],
    [[-3, -0.5, -2, -1], { temperature: 1e-40 }, [1]],
    [[5, 1, 5, -2], { temperature: 1e-40 }, [0, 2]],
    [[5, 1, 5, -2], { temperature: 1e-40, topP: 0.9 }, [0, 2]],
  ]);
});

Deno.test("top-p cuts exactly where the sorted mass reaches p, as HF: a token a few ulps below the last one kept is dropped", async () => {
  await init();
  // Token 2's probability is token 1's (0.3) less a hair; p = 0.65 of the mass (1.15 in all) is reached with
  // tokens 0 and 1, so HF's TopPLogitsWarper keeps those two alone. The cut was found by halving logit values
  // 24 times between max - 104 T and max, within 6.2e-6 T: token 2 was kept with d = 9.5e-7 and 3.9e-6
  // (drawn in about a third of the rows). Now on the f32 keys of the scaled logits, exactly.
  const x1 = Math.fround(Math.log(0.3));
  const below = (v: number) => { // the next f32 below v < 0
    const b = new Float32Array([v]);
    new Int32Array(b.buffer)[0]++;
    return b[0];
  };
  const row = (x2: number) => [Math.log(0.5), x1, x2, Math.log(0.05), -1000];
  await assertSampledSets([
    [row(Math.log(0.3) - 9.5e-7), { topP: 0.65 }, [0, 1]],
    [row(Math.log(0.3) - 3.9e-6), { topP: 0.65 }, [0, 1]],
    [row(Math.log(0.3) - 6e-6), { topP: 0.65 }, [0, 1]],
    [row(below(x1)), { topP: 0.65 }, [0, 1]], // one ulp below
    [row(below(x1)), { topP: 0.55, temperature: 3 }, [0, 1]], // at T 3 tokens 0 and 1 hold 0.585 of the mass
    [row(x1), { topP: 0.65 }, [0, 1, 2]], // an exact tie at the cut: both kept (documented)
    // at T 1e-40 every exp((x - max) / T) but the max's is 0: the max alone
    [row(below(x1)), { topP: 0.99, temperature: 1e-40 }, [0]],
    // p so small that p times the mass is 0 in f32: the most likely token still (HF keeps at least one)
    [row(below(x1)), { topP: 1e-50 }, [0]],
    [[2, 7, 7, 1], { topP: 1e-50 }, [1, 2]],
  ]);
});

Deno.test("sampling draws from softmax(x / T), renormalised over top-k and top-p: each token's frequency within 5 sigma", async () => {
  // The set tests above see which tokens are drawn, not how often: a temperature applied twice, or noise
  // that is not Gumbel's, keeps every set. 8192 rows, each its own draw (sigma at most 0.0055).
  await init();
  const R = 8192;
  const x = [Math.log(0.5), Math.log(0.3), Math.log(0.15), Math.log(0.05)];
  const cases: [{ temperature?: number; topK?: number; topP?: number; minP?: number }, number[]][] = [
    [{}, [0.5, 0.3, 0.15, 0.05]],
    [{ temperature: 2 }, x.map((v) => Math.exp(v / 2))],
    [{ temperature: 0.5 }, x.map((v) => Math.exp(v / 0.5))],
    [{ topK: 2, temperature: 2 }, x.map((v, i) => (i < 2 ? Math.exp(v / 2) : 0))],
    [{ topP: 0.7 }, [0.5, 0.3, 0, 0]],
    [{ minP: 0.2 }, [0.5, 0.3, 0.15, 0]],
    [{ minP: 0.4, temperature: 2 }, x.map((v, i) => (i < 3 ? Math.exp(v / 2) : 0))],
  ];
  const logits = tensor(new Float32Array(Array.from({ length: R }, () => x).flat()), [R, x.length]);
  for (const [o, weights] of cases) {
    const total = weights.reduce((a, b) => a + b);
    const want = weights.map((w) => w / total);
    const next = zeros([R], { dtype: "i32" });
    const all = zeros([R, 1], { dtype: "i32" });
    sampleInto(logits, next, all, 0, { ...sampleParams({ sample: true, ...o }), seed: 7 });
    const counts = new Array(x.length).fill(0);
    for (const t of await all.toArray()) counts[t]++;
    counts.forEach((c, i) => {
      const sigma = Math.sqrt(want[i] * (1 - want[i]) / R);
      assert.ok(
        Math.abs(c / R - want[i]) <= 5 * sigma,
        `${JSON.stringify(o)}: token ${i} drawn ${c / R}, softmax gives ${want[i].toFixed(4)} (sigma ${
          sigma.toFixed(4)
        })`,
      );
    });
    dispose([next, all]);
  }
  logits.dispose();
});

Deno.test("greedy decoding takes the first of tied maxima, as torch.argmax: in one invocation's walk and across the workgroup", async () => {
  await init();
  const V = 200; // 64 invocations: ids 3, 67, 131 and 195 are one invocation's, 20 and 90 two others'
  const rows = [[67, 131, 3], [150, 90, 20], [1, 2, 4]].map((peaks) => {
    const row = Array.from({ length: V }, (_, v) => Math.sin(v) * 0.5);
    for (const v of peaks) row[v] = 2;
    return row;
  });
  const logits = tensor(new Float32Array(rows.flat()), [rows.length, V]);
  const next = zeros([rows.length], { dtype: "i32" });
  const all = zeros([rows.length, 1], { dtype: "i32" });
  sampleInto(logits, next, all, 0, sampleParams({}));
  assert.deepEqual([...await next.toArray()], [3, 20, 1]);
  dispose([logits, next, all]);
});

Deno.test("top-k and top-p over a 100k vocabulary: a wider workgroup keeps every loop under 65535 iterations", async () => {
  await init();
  const { loopIterations, sampleWorkgroup } = await import("../mamba/sampling.ts");
  const R = 4;
  assert.equal(sampleWorkgroup(50_280), 64, "the hub models' vocabulary keeps 64 invocations");
  assert.equal(sampleWorkgroup(100_000), 256);
  // lavapipe (trips counted with each loop's last test) kept the right token at these lengths and lost it
  // one size class up (measured with repro scripts since top-p's exact search of 31 rounds, which moved the
  // top-k/top-p limits from 70464 and 281344): top-k/top-p at 64 invocations to V 62912, not 62976, and at
  // 256 to 251136, not 251392; greedy to 16772096, not 16772352; sampling to 8385024, not 8385280
  const fits = (V: number, WG: number, mode: "greedy" | "sample" | "top") =>
    loopIterations(V, WG, mode) <= 65535;
  assert.deepEqual([fits(62_912, 64, "top"), fits(62_976, 64, "top")], [true, false]);
  assert.deepEqual([fits(251_136, 256, "top"), fits(251_392, 256, "top")], [true, false]);
  assert.deepEqual([fits(16_772_096, 256, "greedy"), fits(16_772_352, 256, "greedy")], [true, false]);
  assert.deepEqual([fits(8_385_024, 256, "sample"), fits(8_385_280, 256, "sample")], [true, false]);
  assert.equal(sampleWorkgroup(62_912), 64);
  assert.equal(sampleWorkgroup(62_976), 256, "past 64 invocations' limit: 256");
  // distinct logits with each row's maximum somewhere else (the last id's among them), at 256 invocations
  // and at the longest row 64 take
  const rows: [number, number[]][] = [[100_000, [99_999, 7, 65_000, 50_001]], [62_912, [
    62_911,
    7,
    62_000,
    31_001,
  ]]];
  for (const [V, peaks] of rows) {
    const host = new Float32Array(R * V).map((_, i) => Math.sin(i * 12.9898) * 0.5);
    peaks.forEach((v, r) => (host[r * V + v] = 3));
    const logits = tensor(host, [R, V]);
    for (const o of [{ topK: 1 }, { topP: 1e-6 }, { topK: 2, topP: 0.5, temperature: 0.1 }]) {
      const next = zeros([R], { dtype: "i32" });
      const all = zeros([R, 1], { dtype: "i32" });
      sampleInto(logits, next, all, 0, { ...sampleParams({ sample: true, ...o }), seed: 11 });
      assert.deepEqual([...await next.toArray()], peaks, `V ${V}: ${JSON.stringify(o)}`);
      dispose([next, all]);
    }
    logits.dispose();
  }
  if (deviceInfo().isFallbackAdapter) {
    // past what even 256 invocations walk within the limit: a clear error, not a silently wrong token
    const wide = zeros([1, 300_000]);
    const [next, all] = [zeros([1], { dtype: "i32" }), zeros([1, 1], { dtype: "i32" })];
    assert.throws(
      () => sampleInto(wide, next, all, 0, { ...sampleParams({ sample: true, topK: 5 }), seed: 1 }),
      /top-k\/top-p over 300000 logits would loop \d+ times per invocation, past the 65535/,
    );
    dispose([wide, next, all]);
    // greedy decoding has a limit too, far above any vocabulary
    const huge = zeros([1, 16_793_600]);
    const [n2, a2] = [zeros([1], { dtype: "i32" }), zeros([1, 1], { dtype: "i32" })];
    assert.throws(
      () => sampleInto(huge, n2, a2, 0, sampleParams({})),
      /greedy decoding over 16793600 logits would loop \d+ times per invocation, past the 65535/,
    );
    dispose([huge, n2, a2]);
  }
});

Deno.test("MambaLM.forward and forwardFrom of array tokens free the ids and, under noGrad, every intermediate; with autograd the backward still runs", async () => {
  await init();
  const lm = new MambaLM({ dModel: 8, nLayers: 1, dState: 4 }, { vocabSize: 16 });
  const rows = [[1, 2, 3], [4, 5, 6]];
  const base = memory();
  for (let i = 0; i < 3; i++) {
    noGrad(() => lm.forward(rows)).dispose(); // it left the ids, the embedding, the block's and norm_f's output
    dispose(noGrad(() => lm.forwardFrom(rows, null)));
  }
  assert.equal(memory().liveTensors, base.liveTensors, "noGrad forward leaked");
  assert.equal(memory().liveBytes, base.liveBytes);
  // with autograd: the ids (saved by the embedding's gather) stay until its backward, then go with its graph
  const ids = tensor(Int32Array.from(rows.flat()), [2, 3], { dtype: "i32" });
  const grads = async (tokens: number[][] | Tensor) => {
    tidy(() => lm.forward(tokens).square().sum().backward());
    const gs = await Promise.all(lm.parameters().map((p) => p.grad!.toArray()));
    for (const p of lm.parameters()) p.grad!.dispose(), p.grad = null;
    return gs;
  };
  assert.deepEqual(await grads(rows), await grads(ids));
  ids.dispose();
  assert.equal(memory().liveTensors, base.liveTensors, "forward with autograd leaked");
  assert.equal(memory().savedBytes, base.savedBytes);
  lm.dispose();
});
