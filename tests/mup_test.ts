/**
 * muP as mamba.py has it (`mup`, `mup_base_width`): RMSNorms without gains, the muP initialisation, logits
 * divided by the width multiplier in every head path, configureOptimizers' third group (lr / w, weight decay
 * x w), the Trainer using it, and checkpoints that keep it.
 * @module
 */

import assert from "node:assert/strict";
import { noGrad } from "../core/autograd.ts";
import { tensor } from "../core/creation.ts";
import { init } from "../core/device.ts";
import { memory } from "../core/memory.ts";
import { randn } from "../core/creation.ts";
import { manualSeed } from "../core/random.ts";
import { dispose, type Tensor, tidy } from "../core/tensor.ts";
import { mambaConfig, mupWidthMult } from "../mamba/config.ts";
import { MambaLM } from "../mamba/lm.ts";
import { fromPretrained, saveCheckpoint } from "../mamba/pretrained.ts";
import { CharDataset, DEFAULT_TRAIN, Trainer } from "../mamba/train.ts";
import { RMSNorm } from "../nn/layers.ts";
import { AdamW, configureOptimizers } from "../nn/optim.ts";
import { assertMatches, tolerance } from "./fixture_util.ts";

const std = (a: Float32Array) => {
  const mean = a.reduce((s, x) => s + x, 0) / a.length;
  return Math.sqrt(a.reduce((s, x) => s + (x - mean) ** 2, 0) / a.length);
};

Deno.test("muP config: mup and mupBaseWidth (mamba.py's defaults), the width multiplier dModel / mupBaseWidth", () => {
  const c = mambaConfig({ dModel: 256, nLayers: 1, mup: true });
  assert.deepEqual([c.mup, c.mupBaseWidth, mupWidthMult(c)], [true, 128, 2]);
  assert.equal(mupWidthMult(mambaConfig({ dModel: 256, nLayers: 1 })), 1, "no muP: 1");
  assert.throws(
    () => mambaConfig({ dModel: 8, nLayers: 1, mupBaseWidth: 0 }),
    /mupBaseWidth must be a positive/,
  );
  assert.throws(
    () => mambaConfig({ dModel: 8, nLayers: 1, mup: true, mupBaseWidth: 1e-320 }),
    /mupBaseWidth 1e-320 makes the width multiplier dModel \/ mupBaseWidth overflow/,
  );
  assert.throws(
    () => new RMSNorm(4, 1e-5, { affine: "false" as unknown as boolean }),
    /affine must be a boolean/,
  );
});

Deno.test("muP LM: no norm gains in the state dict, and mamba.py's muP initialisation", async () => {
  await init();
  manualSeed(3);
  const lm = new MambaLM({ dModel: 256, nLayers: 2, mup: true, innerLayernorms: true }, { vocabSize: 64 });
  const sd = lm.stateDict();
  assert.deepEqual(
    [...sd.keys()].filter((k) => /norm/.test(k)),
    [],
    "RMSNorms without gains (norm, norm_f, inner)",
  );
  const w = 2; // 256 / 128
  const values = async (k: string) => (await sd.get(k)!.toArray()) as Float32Array;
  assert.ok((await values("mamba.layers.0.mixer.conv1d.weight")).every((x) => x === 0), "conv1d weights 0");
  assert.ok((await values("lm_head.weight")).every((x) => x === 0), "lm_head 0");
  const stds: [string, number][] = [
    ["mamba.layers.0.mixer.in_proj.weight", 0.02 / Math.sqrt(w)],
    ["mamba.layers.1.mixer.x_proj.weight", 0.02 / Math.sqrt(w)],
    ["mamba.layers.0.mixer.out_proj.weight", 0.02 / Math.sqrt(2 * 2) / Math.sqrt(w)],
    ["mamba.layers.0.mixer.dt_proj.weight", 16 ** -0.5 / Math.sqrt(w)], // dtRank 16
    ["embedding.weight", 0.02],
  ];
  for (const [k, want] of stds) {
    const got = std(await values(k));
    assert.ok(Math.abs(got / want - 1) < 0.05, `${k}: std ${got}, want ${want}`);
  }
  // kept from the block's init: dt_proj's bias (inverse softplus of dt in [dtMin, dtMax]) and conv1d's bias
  assert.ok((await values("mamba.layers.0.mixer.dt_proj.bias")).every((x) => x < -2), "dt bias kept");
  assert.ok((await values("mamba.layers.0.mixer.conv1d.bias")).some((x) => x !== 0), "conv bias kept");
  lm.dispose();
});

Deno.test("muP LM: logits equal a plain model's with unit norm gains and lm_head / w (forward and decoding step)", async () => {
  await init();
  manualSeed(4);
  const config = { dModel: 32, nLayers: 2, dState: 4, mup: true, mupBaseWidth: 8 }; // w = 4
  const mup = new MambaLM(config, { vocabSize: 40 });
  const head = randn([40, 32]);
  mup.loadStateDict(new Map([["lm_head.weight", head]]), { strict: false }); // muP starts it at 0
  const plain = new MambaLM({ ...config, mup: false }, { vocabSize: 40 });
  const sd = mup.stateDict();
  const scaled = tidy(() => noGrad(() => head.mul(0.25)));
  plain.loadStateDict(new Map([...sd, ["lm_head.weight", scaled]]), { strict: false }); // norms stay 1
  const ids = tensor(new Int32Array([1, 5, 9, 33, 2, 7]), [2, 3], { dtype: "i32" });
  const [a, b] = [mup, plain].map((lm) => tidy(() => noGrad(() => lm.forward(ids))));
  const logits = async (t: Tensor) => ({ data: await t.toArray(), shape: t.shape });
  assertMatches(await logits(a), await logits(b), tolerance("model"), "forward logits");
  const step = (lm: MambaLM) =>
    tidy(() =>
      noGrad(() => {
        const c = lm.emptyCache(1);
        const r = lm.step(tensor(new Int32Array([3]), [1], { dtype: "i32" }), c);
        dispose([c, r.caches]);
        return r.logits;
      })
    );
  const [sa, sb] = [step(mup), step(plain)];
  assertMatches(await logits(sa), await logits(sb), tolerance("model"), "step logits");
  assert.ok(std((await sa.toArray()) as Float32Array) > 0, "not all zero");
  dispose([a, b, sa, sb, ids, head, scaled]);
  mup.dispose();
  plain.dispose();
});

Deno.test("configureOptimizers with muP: in_proj, x_proj, dt_proj, out_proj weights at lr / w and weight decay x w, as mamba.py", async () => {
  await init();
  const lm = new MambaLM({ dModel: 32, nLayers: 2, mup: true, mupBaseWidth: 8 }, { vocabSize: 16 });
  const opt = configureOptimizers(lm, { lr: 1e-3, weightDecay: 0.1, betas: [0.9, 0.95], mupWidthMult: 4 });
  const [hidden, decay, noDecay] = opt.paramGroups;
  assert.deepEqual(
    hidden.names.map((n) => n.replace(/^mamba\.layers\.\d\.mixer\./, "")).sort(),
    [
      ...["dt_proj.weight", "in_proj.weight", "out_proj.weight", "x_proj.weight"],
      ...["dt_proj.weight", "in_proj.weight", "out_proj.weight", "x_proj.weight"],
    ].sort(),
  );
  assert.deepEqual([hidden.lrScale, hidden.weightDecay], [0.25, 0.4]);
  assert.deepEqual(decay.names.sort(), [
    "embedding.weight",
    "lm_head.weight",
    "mamba.layers.0.mixer.A_log",
    "mamba.layers.0.mixer.conv1d.weight",
    "mamba.layers.1.mixer.A_log",
    "mamba.layers.1.mixer.conv1d.weight",
  ]);
  assert.deepEqual([decay.lrScale, decay.weightDecay, noDecay.lrScale, noDecay.weightDecay], [1, 0.1, 1, 0]);
  // Without mupWidthMult: the model's own w, as mamba.py's configure_optimizers reads config.mup; for a
  // plain model, mamba.py's two groups.
  const own = configureOptimizers(lm, { lr: 1e-3, weightDecay: 0.1, betas: [0.9, 0.95] }).paramGroups;
  assert.deepEqual([own.length, own[0].lrScale, own[0].weightDecay], [3, 0.25, 0.4], "a muP model's own w");
  const plain = new MambaLM({ dModel: 32, nLayers: 2 }, { vocabSize: 16 });
  assert.equal(
    configureOptimizers(plain, { lr: 1e-3, weightDecay: 0.1, betas: [0.9, 0.95] }).paramGroups.length,
    2,
  );
  plain.dispose();
  for (const bad of [0, -1, NaN, Infinity]) {
    assert.throws(
      () => configureOptimizers(lm, { lr: 1e-3, weightDecay: 0.1, betas: [0.9, 0.95], mupWidthMult: bad }),
      new RegExp(`mupWidthMult must be a finite number > 0, got ${bad}$`),
    );
  }
  lm.dispose();
});

Deno.test("a group's lrScale steps its parameters exactly as an optimizer at lr x lrScale (AdamW)", async () => {
  await init();
  const start = new Float32Array([0.5, -1, 2, 0.25]);
  const grad = new Float32Array([0.1, -0.3, 0.2, 0.05]);
  const run = async (lr: number, lrScale?: number) => {
    const p = tensor(start.slice(), [4], { requiresGrad: true });
    const opt = new AdamW([{ params: [p], lrScale, weightDecay: 0.1 }], { lr });
    for (let i = 0; i < 3; i++) {
      p.grad = tensor(grad.slice(), [4]);
      opt.step();
    }
    const out = await p.toArray();
    opt.zeroGrad();
    p.dispose();
    return out;
  };
  assert.deepEqual(await run(1e-2, 0.25), await run(2.5e-3));
  assert.notDeepEqual(await run(1e-2, 0.25), await run(1e-2));
  assert.throws(
    () => new AdamW([{ params: [], lrScale: -1 }]),
    /lrScale must be a finite number >= 0, got -1/,
  );
});

Deno.test("muP survives a checkpoint (config.json's mup, mup_base_width) and the Trainer uses its groups", async () => {
  await init();
  const live = memory().liveBytes;
  manualSeed(5);
  const lm = new MambaLM({ dModel: 16, nLayers: 1, dState: 4, mup: true, mupBaseWidth: 4 }, {
    vocabSize: 256,
  });
  lm.loadStateDict(
    new Map([["lm_head.weight", { shape: [256, 16], data: new Float32Array(4096).fill(0.01) }]]),
    {
      strict: false,
    },
  );
  const dir = await Deno.makeTempDir();
  await saveCheckpoint(lm, dir, null);
  const cfg = JSON.parse(await Deno.readTextFile(`${dir}/config.json`));
  assert.deepEqual([cfg.mup, cfg.mup_base_width], [true, 4]);
  // config.json without its muP keys: the norm gains it lacks are named, with the hint
  const plainCfg = { ...cfg };
  delete plainCfg.mup;
  delete plainCfg.mup_base_width;
  const lost = await Deno.makeTempDir();
  await Deno.copyFile(`${dir}/model.safetensors`, `${lost}/model.safetensors`);
  await Deno.writeTextFile(`${lost}/config.json`, JSON.stringify(plainCfg));
  await assert.rejects(
    () => fromPretrained(lost),
    /parameters the checkpoint lacks: .*norm_f\.weight.* \(a muP model has no norm gains: add "mup": true and its "mup_base_width"/,
  );
  await Deno.remove(lost, { recursive: true });
  const back = await fromPretrained(dir);
  assert.deepEqual([back.config.mup, back.config.mupBaseWidth], [true, 4]);
  const ids = tensor(new Int32Array([72, 105, 33]), [1, 3], { dtype: "i32" });
  const [a, b] = [lm, back].map((m) => tidy(() => noGrad(() => m.forward(ids))));
  assert.deepEqual(await a.toArray(), await b.toArray());
  dispose([a, b, ids]);
  back.dispose();
  await Deno.remove(dir, { recursive: true });
  const t = new Trainer(
    lm,
    new CharDataset(new TextEncoder().encode("It is a truth universally acknowledged. ".repeat(40))),
    {
      ...DEFAULT_TRAIN,
      steps: 2,
      warmup: 1,
      batch: 2,
      seq: 16,
      evalBatches: 1,
    },
  );
  assert.deepEqual([t.opt.paramGroups[0].lrScale, t.opt.paramGroups.length], [0.25, 3]); // w = 16 / 4
  await t.trainStep();
  t.dispose();
  lm.dispose();
  assert.equal(memory().liveBytes, live);
});
