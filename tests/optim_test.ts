import assert from "node:assert/strict";
import { tensor } from "../core/creation.ts";
import { memory, setMemoryLimit } from "../core/memory.ts";
import { manualSeed } from "../core/random.ts";
import { crossEntropy } from "../core/ops/index.ts";
import { keep, type Tensor, tidy } from "../core/tensor.ts";
import { MambaLM } from "../mamba/lm.ts";
import type { HostTensor } from "../nn/module.ts";
import {
  AdamW,
  type AdamWOptions,
  clipGradNorm,
  configureOptimizers,
  cosineSchedule,
  gradNormScale,
  type Optimizer,
  type OptimizerStateInput,
  type ParamGroup,
  SGD,
  type SGDOptions,
} from "../nn/optim.ts";
import { assertClose, readAll, rng, setup, uniform } from "./helpers.ts";

/**
 * Update tolerance against the float64 reference: 1e-6 relative to the magnitude of the value over the run
 * (`scale`), since a value that crosses zero keeps the absolute rounding error of its larger past.
 */
const TOL = { rtol: 1e-6, atol: 0 };

/** Asserts bit-identical f32 data; names the first differing element (no giant diff of big arrays). */
function assertBitEqual(actual: ArrayLike<number>, expected: ArrayLike<number>, what: string): void {
  const bits = (a: ArrayLike<number>) => new Uint32Array(Float32Array.from(a).buffer);
  const [a, e] = [bits(actual), bits(expected)];
  assert.equal(a.length, e.length, `${what}: length`);
  const i = a.findIndex((v, j) => v !== e[j]);
  assert.ok(i < 0, `${what}: first difference at ${i}: ${actual[i]} vs ${expected[i]}`);
}

function param(data: Float64Array, shape: number[]): Tensor {
  return keep(tensor(Float32Array.from(data), shape)).requiresGrad_();
}

function setGrad(p: Tensor, data: Float64Array | null): void {
  p.grad?.dispose();
  p.grad = data ? keep(tensor(Float32Array.from(data), [...p.shape])) : null;
}

/** One float64 parameter of the references, with its state, update count and magnitudes over the run. */
interface RefParam {
  p: Float64Array;
  wd: number;
  steps: number;
  s1: Float64Array | null;
  s2: Float64Array | null;
  /** max |value| so far of p, s1 and s2. */
  mag: [Float64Array, Float64Array, Float64Array];
}

function refParam(p: Float64Array, wd: number): RefParam {
  const mag = [p.map(Math.abs), new Float64Array(p.length), new Float64Array(p.length)];
  return { p: Float64Array.from(p), wd, steps: 0, s1: null, s2: null, mag: mag as RefParam["mag"] };
}

function trackMagnitudes(r: RefParam): void {
  [r.p, r.s1, r.s2].forEach((a, j) => {
    if (a) { for (let i = 0; i < a.length; i++) r.mag[j][i] = Math.max(r.mag[j][i], Math.abs(a[i])); }
  });
}

/** torch.optim.AdamW, in float64. */
function adamwRef(r: RefParam, g: Float64Array, lr: number, b1: number, b2: number, eps: number): void {
  r.steps++;
  r.s1 ??= new Float64Array(g.length);
  r.s2 ??= new Float64Array(g.length);
  const bc1 = 1 - b1 ** r.steps, bc2 = 1 - b2 ** r.steps;
  for (let i = 0; i < g.length; i++) {
    r.p[i] *= 1 - lr * r.wd;
    r.s1[i] = b1 * r.s1[i] + (1 - b1) * g[i];
    r.s2[i] = b2 * r.s2[i] + (1 - b2) * g[i] * g[i];
    r.p[i] -= (lr / bc1) * r.s1[i] / (Math.sqrt(r.s2[i]) / Math.sqrt(bc2) + eps);
  }
}

/** torch.optim.SGD, in float64. */
function sgdRef(
  r: RefParam,
  g: Float64Array,
  lr: number,
  o: { momentum: number; dampening: number; nesterov: boolean },
): void {
  const first = r.s1 === null;
  r.s1 ??= new Float64Array(g.length);
  for (let i = 0; i < g.length; i++) {
    let d = g[i] + r.wd * r.p[i];
    if (o.momentum > 0) {
      r.s1[i] = first ? d : o.momentum * r.s1[i] + (1 - o.dampening) * d;
      d = o.nesterov ? d + o.momentum * r.s1[i] : r.s1[i];
    }
    r.p[i] -= lr * d;
  }
}

/**
 * Three parameters in two groups (a 2-D one decayed; a 1-D and an odd-sized 1-D one not), five steps with a
 * changing lr and fresh gradients; the third parameter has no gradient at step 3 (skipped, as PyTorch).
 */
async function checkAgainstReference(
  make: (groups: { params: Tensor[]; weightDecay: number }[]) => Optimizer,
  ref: (r: RefParam, g: Float64Array, lr: number) => void,
  what: string,
): Promise<void> {
  const shapes = [[7, 5], [5], [300]];
  const init = shapes.map((s, k) => uniform(s.reduce((a, b) => a * b, 1), 100 + k));
  const ps = shapes.map((s, k) => param(init[k], s));
  const refs = init.map((d, k) => refParam(d, k === 0 ? 0.1 : 0));
  const opt = make([{ params: [ps[0]], weightDecay: 0.1 }, { params: [ps[1], ps[2]], weightDecay: 0 }]);
  const lrs = [0.01, 0.02, 0.05, 0.03, 0.004];
  lrs.forEach((lr, step) => {
    opt.lr = lr;
    ps.forEach((p, k) => {
      const g = k === 2 && step === 2 ? null : uniform(p.size, 1000 * step + k);
      setGrad(p, g);
      if (g) {
        ref(refs[k], g, lr);
        trackMagnitudes(refs[k]);
      }
    });
    opt.step();
  });
  assert.equal(opt.stepCount, 5);
  const state = opt.stateDict();
  assert.deepEqual(state.paramSteps, { "0": 5, "1": 5, "2": 4 });
  const got = await readAll([...ps, ...state.tensors.values()]);
  ps.forEach((_, k) =>
    assertClose(got[k], refs[k].p, { ...TOL, scale: refs[k].mag[0] }, `${what}: parameter ${k} after 5 steps`)
  );
  const keys = [...state.tensors.keys()];
  keys.forEach((key, j) => {
    const [k, slot] = key.split(".");
    const r = refs[Number(k)];
    const first = opt.stateNames.indexOf(slot) === 0;
    const scale = r.mag[first ? 1 : 2];
    assertClose(got[ps.length + j], first ? r.s1! : r.s2!, { ...TOL, scale }, `${what}: ${key}`);
  });
  opt.zeroGrad();
  assert.ok(ps.every((p) => p.grad === null));
  opt.dispose();
  for (const p of ps) p.dispose();
}

Deno.test("AdamW equals torch.optim.AdamW's formulas (float64) over 5 steps with weight-decay groups", async () => {
  await setup();
  const base = memory().liveBytes;
  const [b1, b2, eps] = [0.9, 0.95, 1e-8];
  await checkAgainstReference(
    (groups) => new AdamW(groups, { lr: 0.01, betas: [b1, b2], eps }),
    (r, g, lr) => adamwRef(r, g, lr, b1, b2, eps),
    "AdamW",
  );
  assert.equal(memory().liveBytes, base, "live bytes back to baseline");
});

Deno.test("SGD (plain, momentum with dampening, Nesterov) equals torch.optim.SGD's formulas over 5 steps", async () => {
  await setup();
  const base = memory().liveBytes;
  const variants = [
    { momentum: 0, dampening: 0, nesterov: false },
    { momentum: 0.9, dampening: 0.1, nesterov: false },
    { momentum: 0.8, dampening: 0, nesterov: true },
  ];
  for (const v of variants) {
    await checkAgainstReference(
      (groups) => new SGD(groups, { lr: 0.01, ...v }),
      (r, g, lr) => sgdRef(r, g, lr, v),
      `SGD ${JSON.stringify(v)}`,
    );
  }
  assert.equal(memory().liveBytes, base, "live bytes back to baseline");
});

Deno.test("clipGradNorm: norm and clipped gradients equal the reference; no clipping leaves them bit-identical", async () => {
  await setup();
  const base = memory().liveBytes;
  // 40017 elements: three partial-sum blocks, the last one ragged.
  const sizes = [40017, 37, 1];
  const grads = sizes.map((n, k) => uniform(n, 7 + k));
  let sq = 0;
  for (const g of grads) for (const v of g) sq += v * v;
  const refNorm = Math.sqrt(sq);
  for (const maxNorm of [1.0, 2 * refNorm]) {
    const ps = sizes.map((n) => param(new Float64Array(n), [n]));
    ps.forEach((p, k) => setGrad(p, grads[k]));
    const noGradParam = param(new Float64Array(3), [3]); // skipped
    const norm = clipGradNorm([...ps, noGradParam], maxNorm);
    assert.deepEqual(norm.shape, []);
    const [n, ...gs] = await readAll([norm, ...ps.map((p) => p.grad!)]);
    assertClose(n, [refNorm], { rtol: 1e-6, atol: 0 }, `norm (maxNorm ${maxNorm})`);
    const coef = Math.min(1, maxNorm / (refNorm + 1e-6));
    gs.forEach((g, k) => {
      if (coef === 1) assertBitEqual(g, grads[k], `unclipped gradient ${k} unchanged`);
      else assertClose(g, grads[k].map((v) => v * coef), TOL, `clipped gradient ${k}`);
    });
    norm.dispose();
    for (const p of [...ps, noGradParam]) {
      p.grad?.dispose();
      p.dispose();
    }
  }
  // No maxNorm: scale exactly 1; an all-zero gradient: norm 0, scale 1; a NaN gradient: NaN, as PyTorch.
  const z = param(new Float64Array(5), [5]);
  setGrad(z, uniform(5, 3));
  const free = gradNormScale([z]);
  setGrad(z, new Float64Array(5));
  const zero = gradNormScale([z], 1);
  setGrad(z, Float64Array.from([1, NaN, 0, 0, 0]));
  const nan = gradNormScale([z], 1);
  // finite gradients whose sum of squares overflows f32: no maxNorm still means scale 1
  setGrad(z, Float64Array.from([3e19, 4e19, 0, 0, 0]));
  const huge = gradNormScale([z]);
  const [fs, zn, zs, nn, ns, hs] = await readAll([
    free.scale,
    zero.norm,
    zero.scale,
    nan.norm,
    nan.scale,
    huge.scale,
  ]);
  assert.deepEqual([fs[0], zn[0], zs[0], hs[0]], [1, 0, 1, 1]);
  assert.ok(Number.isNaN(nn[0]) && Number.isNaN(ns[0]), `NaN gradient: norm ${nn[0]}, scale ${ns[0]}`);
  for (const t of [free, zero, nan, huge]) {
    t.norm.dispose();
    t.scale.dispose();
  }
  z.grad!.dispose();
  z.dispose();
  // Gradients that share storage (a detached view) are each scaled once.
  const a = param(new Float64Array(4), [4]), b = param(new Float64Array(4), [4]);
  setGrad(a, Float64Array.from([3, 0, 0, 0]));
  b.grad = keep(a.grad!.detach());
  clipGradNorm([a, b], 1).dispose();
  const [ga, gb] = await readAll([a.grad!, b.grad!]);
  const c = 1 / (Math.sqrt(18) + 1e-6);
  assertClose(ga, [3 * c, 0, 0, 0], TOL, "shared gradient a");
  assertClose(gb, [3 * c, 0, 0, 0], TOL, "shared gradient b");
  for (const p of [a, b]) {
    p.grad!.dispose();
    p.dispose();
  }
  // A norm near PyTorch's 1e-6: the factor is maxNorm / (norm + 1e-6), 1/6 here, not maxNorm / norm (1/5).
  const t = param(new Float64Array(2), [2]);
  setGrad(t, Float64Array.from([3e-6, 4e-6]));
  clipGradNorm([t], 1e-6).dispose();
  assertClose((await readAll([t.grad!]))[0], [0.5e-6, 2e-6 / 3], TOL, "clipped tiny gradient");
  t.grad!.dispose();
  t.dispose();
  assert.equal(memory().liveBytes, base, "live bytes back to baseline");
});

Deno.test("gradNormScale + step({ gradScale }) is bit-identical to clipGradNorm + step()", async () => {
  await setup();
  const base = memory().liveBytes;
  const init = [uniform(35, 1), uniform(9, 2)];
  const grads = [uniform(35, 3, { low: -5, high: 5 }), uniform(9, 4, { low: -5, high: 5 })];
  const run = (fused: boolean) => {
    const ps = [param(init[0], [7, 5]), param(init[1], [9])];
    const opt = new AdamW([{ params: [ps[0]], weightDecay: 0.1 }, { params: [ps[1]], weightDecay: 0 }], {
      lr: 0.01,
      betas: [0.9, 0.95],
    });
    for (let step = 0; step < 3; step++) {
      ps.forEach((p, k) => setGrad(p, grads[k].map((v) => v * (step + 1))));
      if (fused) {
        const { norm, scale } = gradNormScale(ps, 1.0);
        opt.step({ gradScale: scale });
        norm.dispose();
        scale.dispose();
      } else {
        clipGradNorm(ps, 1.0).dispose();
        opt.step();
      }
      opt.zeroGrad();
    }
    opt.dispose();
    return ps;
  };
  const a = run(false), b = run(true);
  const [a0, a1, b0, b1] = await readAll([...a, ...b]);
  assertBitEqual(b0, a0, "parameter 0");
  assertBitEqual(b1, a1, "parameter 1");
  for (const p of [...a, ...b]) p.dispose();
  assert.equal(memory().liveBytes, base, "live bytes back to baseline");
});

Deno.test("AdamW and SGD over a parameter past the binding window with too few bindings: one dispatch per span, bit-identical", async () => {
  await setup();
  const { deviceInfo } = await import("../core/device.ts");
  const { dispatchCount } = await import("../core/executor.ts");
  const limits = deviceInfo().limits;
  const [buffers, binding] = [limits.maxStorageBuffersPerShaderStage, limits.maxStorageBufferBindingSize];
  const base = memory().liveBytes;
  const n = 1300; // 5200 bytes: three 2048-byte windows
  /** Three steps of each optimizer (the gradient scaled by a clip factor); the states and dispatches. */
  const run = async () => {
    const out: ArrayLike<number>[] = [];
    const dispatches: number[] = [];
    for (
      const make of [
        (ps: Tensor[]) => new AdamW(ps, { lr: 0.01, weightDecay: 0.1 }),
        (ps: Tensor[]) => new SGD(ps, { lr: 0.01, momentum: 0.9, weightDecay: 0.1 }),
      ]
    ) {
      const p = param(uniform(n, 7), [n]);
      const opt = make([p]);
      const scale = keep(tensor(new Float32Array([0.75]), []));
      for (let step = 0; step < 3; step++) {
        setGrad(p, uniform(n, 70 + step));
        const before = dispatchCount();
        opt.step({ gradScale: scale });
        dispatches.push(dispatchCount() - before);
      }
      out.push(...await readAll([p, ...opt.stateDict().tensors.values()]));
      opt.dispose();
      setGrad(p, null);
      p.dispose();
      scale.dispose();
    }
    return { out, dispatches };
  };
  const whole = await run();
  try {
    limits.maxStorageBufferBindingSize = 2048;
    const windowed = await run(); // AdamW binds 4 x 3 + 1 = 13 windows, SGD 3 x 3 + 1 = 10
    limits.maxStorageBuffersPerShaderStage = 8;
    const spans = await run();
    assert.deepEqual(whole.dispatches, [1, 1, 1, 1, 1, 1]);
    assert.deepEqual(windowed.dispatches, [1, 1, 1, 1, 1, 1]);
    assert.deepEqual(spans.dispatches, [3, 3, 3, 3, 3, 3], "one dispatch per 512-element span");
    assert.equal(spans.out.length, 5); // AdamW: p, exp_avg, exp_avg_sq; SGD: p, momentum_buffer
    spans.out.forEach((a, i) => {
      assertBitEqual(a, whole.out[i], `spans against one dispatch, array ${i}`);
      assertBitEqual(windowed.out[i], whole.out[i], `windows against one dispatch, array ${i}`);
    });
  } finally {
    limits.maxStorageBuffersPerShaderStage = buffers;
    limits.maxStorageBufferBindingSize = binding;
  }
  assert.equal(memory().liveBytes, base, "live bytes back to baseline");
});

Deno.test("dispatchElementwise: spans of buffers of different element sizes start aligned in each", async () => {
  await setup();
  const { deviceInfo } = await import("../core/device.ts");
  const { dispatchCount } = await import("../core/executor.ts");
  const { defineKernel, dispatchElementwise } = await import("../core/kernel.ts");
  const k = defineKernel({
    name: "test_span_vec4_f32",
    buffers: [{ name: "a", type: "f32", access: "read" }, {
      name: "y",
      type: "vec4<f32>",
      access: "read_write",
    }],
    uniforms: [["n", "u32"]],
    workgroupSize: 64,
    body: `
  if (gid >= P.n) { return; }
  st_y(gid, ld_a(gid) * vec4<f32>(1.0, 2.0, 3.0, 4.0));`,
  });
  const limits = deviceInfo().limits;
  const [buffers, binding] = [limits.maxStorageBuffersPerShaderStage, limits.maxStorageBufferBindingSize];
  const n = 1300;
  const a = tensor(Float32Array.from({ length: n }, (_, i) => i + 0.5), [n]);
  const y = tensor(new Float32Array(4 * n), [4 * n]);
  try {
    // a window of 9 x 256 bytes: 144 vec4s, whose f32 counterparts (576 bytes) are not 256-byte aligned
    limits.maxStorageBufferBindingSize = 2304;
    limits.maxStorageBuffersPerShaderStage = 8; // y alone takes 10 windows
    const before = dispatchCount();
    dispatchElementwise(k, { a: a.storage, y: y.storage }, ["a", "y"], {}, n);
    assert.equal(dispatchCount() - before, 11, "spans of 128 elements");
    // a bf16 buffer's spans would be counted in 32-bit elements and lose its packing: refused
    const half = tensor(new Float32Array(n).fill(1), [n], { dtype: "bf16" });
    assert.throws(
      () => dispatchElementwise(k, { a: half.storage, y: y.storage }, ["a", "y"], {}, n),
      /kernel test_span_vec4_f32: a bf16 buffer \('a'\) cannot be spanned/,
    );
    half.dispose();
  } finally {
    limits.maxStorageBuffersPerShaderStage = buffers;
    limits.maxStorageBufferBindingSize = binding;
  }
  const got = await y.toArray();
  const want = Float32Array.from({ length: 4 * n }, (_, i) => (Math.floor(i / 4) + 0.5) * (1 + (i % 4)));
  assertBitEqual(got, want, "y");
  a.dispose();
  y.dispose();
});

Deno.test("cosineSchedule: linear warm-up from 0, cosine to minLr at total, minLr afterwards", () => {
  const lr = cosineSchedule({ warmup: 100, total: 1200, maxLr: 3e-3, minLr: 3e-4 });
  assert.equal(lr(0), 0);
  assert.equal(lr(50), 1.5e-3);
  assert.ok(Math.abs(lr(99) - 3e-3 * 0.99) < 1e-15);
  assert.equal(lr(100), 3e-3);
  assert.ok(Math.abs(lr(650) - (3e-3 + 3e-4) / 2) < 1e-15, `midpoint ${lr(650)}`);
  assert.ok(Math.abs(lr(375) - (3e-4 + 0.5 * (1 + Math.SQRT1_2) * 2.7e-3)) < 1e-15, "quarter");
  assert.equal(lr(1200), 3e-4);
  assert.equal(lr(5000), 3e-4);
  for (let s = 101; s < 1200; s++) assert.ok(lr(s) < lr(s - 1), `decreasing at ${s}`);
  const noWarmup = cosineSchedule({ warmup: 0, total: 10, maxLr: 1, minLr: 0 });
  assert.equal(noWarmup(0), 1);
  assert.throws(() => cosineSchedule({ warmup: 10, total: 5, maxLr: 1, minLr: 0 }), /warmup <= total/);
  assert.throws(
    () => cosineSchedule({ warmup: 0, total: 5, maxLr: NaN, minLr: 0 }),
    /cosineSchedule: maxLr must be a finite number >= 0, got NaN/,
  );
  assert.throws(
    () => cosineSchedule({ warmup: 0, total: 5, maxLr: 1, minLr: -1 }),
    /cosineSchedule: minLr must be a finite number >= 0, got -1/,
  );
  assert.throws(() => lr(-1), /cosineSchedule: the step must be a finite number >= 0, got -1/);
  assert.throws(() => lr(NaN), /got NaN/);
});

// ------------------------------------------------------------------------------------------ training

const V = 32, B = 4, L = 16;
const CONFIG = { warmup: 3, total: 30, maxLr: 1e-2, minLr: 1e-3 };

/** Batch `i`: rows counting up by 3 modulo V from a random start (the next token is learnable). */
function batch(i: number): { x: Int32Array; y: Int32Array } {
  const r = rng(5000 + i);
  const x = new Int32Array(B * L), y = new Int32Array(B * L);
  for (let b = 0; b < B; b++) {
    const s = Math.floor(r() * V);
    for (let t = 0; t < L; t++) {
      x[b * L + t] = (s + 3 * t) % V;
      y[b * L + t] = (s + 3 * (t + 1)) % V;
    }
  }
  return { x, y };
}

function tinyLM(seed: number): MambaLM {
  manualSeed(seed);
  return new MambaLM({ dModel: 16, nLayers: 1 }, { vocabSize: V });
}

function optimizerFor(model: MambaLM): AdamW {
  return configureOptimizers(model, { lr: CONFIG.maxLr, weightDecay: 0.1, betas: [0.9, 0.95] });
}

/** One training step as mamba.py's loop does it: schedule, forward, backward, clip 1.0, AdamW, zero grads. */
function trainStep(model: MambaLM, opt: AdamW, lrAt: (s: number) => number): Tensor {
  const { x, y } = batch(opt.stepCount);
  opt.lr = lrAt(opt.stepCount);
  return tidy(() => {
    const logits = model.forward(tensor(x, [B, L]));
    const loss = crossEntropy(logits.reshape(-1, V), tensor(y, [B * L]));
    loss.backward();
    clipGradNorm(model.parameters(), 1.0);
    opt.step();
    opt.zeroGrad();
    return loss;
  });
}

Deno.test("configureOptimizers: mamba.py's grouping (rank >= 2 decayed, incl. A_log and conv weights)", () =>
  setup().then(() => {
    const model = tinyLM(1);
    const opt = optimizerFor(model);
    const named = model.namedParameters();
    const [decay, noDecay] = opt.paramGroups;
    assert.equal(decay.weightDecay, 0.1);
    assert.equal(noDecay.weightDecay, 0);
    assert.deepEqual([...decay.names, ...noDecay.names].sort(), named.map(([n]) => n).sort());
    assert.deepEqual(decay.names, named.filter(([, p]) => p.rank >= 2).map(([n]) => n));
    decay.params.forEach((p, i) => assert.equal(p, model.stateDict().get(decay.names[i])));
    for (const n of ["embedding.weight", "lm_head.weight", "mamba.layers.0.mixer.A_log"]) {
      assert.ok(decay.names.includes(n), `${n} decayed`);
    }
    assert.ok(decay.names.includes("mamba.layers.0.mixer.conv1d.weight"), "conv weight (ED, 1, K) decayed");
    for (const n of ["mamba.layers.0.mixer.D", "norm_f.weight", "mamba.layers.0.mixer.dt_proj.bias"]) {
      assert.ok(noDecay.names.includes(n), `${n} not decayed`);
    }
    // a weight decay left out or misspelt was AdamW's default 0.01 in silence
    const [lr, betas] = [1e-3, [0.9, 0.95] as [number, number]];
    const wrong: [unknown, RegExp][] = [
      [{ lr, betas }, /configureOptimizers: options\.weightDecay is required/],
      [
        { lr, betas, weightDecay: 0.1, weight_decay: 0 },
        /configureOptimizers: unknown option 'weight_decay'/,
      ],
      [{ weightDecay: 0.1, betas }, /configureOptimizers: options\.lr is required/],
    ];
    for (const [o, want] of wrong) {
      assert.throws(() => configureOptimizers(model, o as Parameters<typeof configureOptimizers>[1]), want);
    }
    opt.dispose();
    model.dispose();
  }));

Deno.test("training a tiny MambaLM with AdamW, clipping and the schedule: the loss falls over 30 steps", async () => {
  await setup();
  const model = tinyLM(2);
  const opt = optimizerFor(model);
  const lrAt = cosineSchedule(CONFIG);
  const losses: Tensor[] = [];
  for (let i = 0; i < 30; i++) losses.push(keep(trainStep(model, opt, lrAt)));
  const values = (await readAll(losses)).map((a) => a[0]);
  for (const l of losses) l.dispose();
  const first = values[0], last = values.slice(-3).reduce((a, b) => a + b) / 3;
  assert.ok(Math.abs(first - Math.log(V)) < 0.3, `initial loss ${first} near ln(${V})`);
  assert.ok(last < 0.5 * first, `loss fell from ${first} to ${last}: ${values.map((v) => v.toFixed(3))}`);
  opt.dispose();
  model.dispose();
});

async function toHost(ts: Map<string, Tensor>): Promise<Map<string, HostTensor>> {
  const keys = [...ts.keys()];
  const arrays = await readAll([...ts.values()]);
  return new Map(keys.map((k, i) => [k, { shape: [...ts.get(k)!.shape], data: arrays[i] }]));
}

Deno.test("resume: 3 steps, save model + optimizer state, load into fresh objects, 3 more = 6 steps, bit for bit", async () => {
  await setup();
  const base = memory().liveBytes;
  const lrAt = cosineSchedule(CONFIG);
  const run = (model: MambaLM, opt: AdamW, n: number) =>
    Array.from({ length: n }, () => keep(trainStep(model, opt, lrAt)));

  const straight = tinyLM(3);
  const straightOpt = optimizerFor(straight);
  const straightLosses = run(straight, straightOpt, 6);

  const first = tinyLM(3);
  const firstOpt = optimizerFor(first);
  const firstLosses = run(first, firstOpt, 3);
  // What a checkpoint holds: parameters and optimizer buffers as host data, step counts as JSON metadata.
  const savedParams = await toHost(first.stateDict());
  const state = firstOpt.stateDict();
  const savedState = await toHost(state.tensors);
  const meta = JSON.parse(JSON.stringify({ step: state.step, paramSteps: state.paramSteps }));
  assert.equal(savedState.size, 2 * first.namedParameters().length);
  firstOpt.dispose();
  first.dispose();

  const resumed = tinyLM(99); // different initial weights: all of them must come from the checkpoint
  resumed.loadStateDict(savedParams);
  const resumedOpt = optimizerFor(resumed);
  resumedOpt.loadStateDict({ ...meta, tensors: savedState });
  assert.equal(resumedOpt.stepCount, 3);
  const resumedLosses = run(resumed, resumedOpt, 3);

  const ls = (await readAll([...straightLosses, ...firstLosses, ...resumedLosses])).map((a) => a[0]);
  assertBitEqual(ls.slice(6), ls.slice(0, 6), "losses of the resumed run vs the uninterrupted run");
  const a = await readAll(straight.parameters()), b = await readAll(resumed.parameters());
  straight.namedParameters().forEach(([n], i) => assertBitEqual(b[i], a[i], n));
  const sa = await readAll([...straightOpt.stateDict().tensors.values()]);
  const sb = await readAll([...resumedOpt.stateDict().tensors.values()]);
  sa.forEach((t, i) => assertBitEqual(sb[i], t, `optimizer buffer ${i}`));

  for (const l of [...straightLosses, ...firstLosses, ...resumedLosses]) l.dispose();
  for (const o of [straightOpt, resumedOpt]) o.dispose();
  for (const m of [straight, resumed]) m.dispose();
  assert.equal(memory().liveBytes, base, "live bytes back to baseline");
});

Deno.test("loadStateDict names bad keys, shapes and partial states", async () => {
  await setup();
  const p = param(new Float64Array(6), [2, 3]);
  const opt = new AdamW([{ params: [p], names: ["w"] }]);
  const host = (shape: number[]) => ({ shape, data: new Float32Array(shape.reduce((a, b) => a * b, 1)) });
  assert.throws(
    () => opt.loadStateDict({ step: 1, tensors: { "w.exp_avg": host([2, 3]), "v.exp_avg": host([1]) } }),
    /unexpected keys: v\.exp_avg.*missing keys: w\.exp_avg_sq/,
  );
  assert.throws(
    () =>
      opt.loadStateDict({ step: 1, tensors: { "w.exp_avg": host([3, 2]), "w.exp_avg_sq": host([2, 3]) } }),
    /shape mismatch for w\.exp_avg: state \[3, 2\] vs parameter \[2, 3\]/,
  );
  opt.loadStateDict({ step: 4, tensors: { "w.exp_avg": host([2, 3]), "w.exp_avg_sq": host([2, 3]) } });
  assert.deepEqual(opt.stateDict().paramSteps, { w: 4 });
  opt.dispose();
  p.dispose();
});

Deno.test("loadStateDict: a parameter with a step count and no buffers, another optimizer's groups, no tensors", async () => {
  await setup();
  const host = (shape: number[]) => ({ shape, data: new Float32Array(shape.reduce((a, b) => a * b, 1)) });
  const [a, b] = [param(new Float64Array(2), [2]), param(new Float64Array(2), [2])];
  const named = new AdamW([{ params: [a, b], names: ["a", "b"] }]);
  // b's step count says its moments were saved: a state that lost them is not b starting fresh
  assert.throws(
    () =>
      named.loadStateDict({
        step: 2,
        paramSteps: { a: 2, b: 2 },
        tensors: { "a.exp_avg": host([2]), "a.exp_avg_sq": host([2]) },
      }),
    /loadStateDict: missing keys: b\.exp_avg, b\.exp_avg_sq/,
  );
  assert.throws(
    () => named.loadStateDict({ step: 2 } as unknown as OptimizerStateInput),
    /loadStateDict: the state's tensors must be a Map or an object of tensors, got undefined/,
  );
  // parameters named by their index: one more parameter shifts every name, so the group sizes must agree
  const w0 = param(new Float64Array(2), [2]);
  const saver = new AdamW([a, b]);
  a.grad = keep(tensor([1, 1], [2]));
  b.grad = keep(tensor([-5, -5], [2]));
  saver.step();
  const saved = saver.stateDict();
  assert.deepEqual(saved.groupSizes, [1 + 1]);
  const shifted = new AdamW([w0, a, b]);
  assert.throws(
    () => shifted.loadStateDict(saved),
    /the state's groups hold \[2\] parameters and this optimizer's \[3\]: parameters named by their index/,
  );
  // the same parameters load; named parameters match by name whatever the groups
  const same = new AdamW([a, b]);
  same.loadStateDict(saved);
  assert.deepEqual(same.stateDict().paramSteps, { 0: 1, 1: 1 });
  const byName = new AdamW([{ params: [w0], names: ["0"] }, { params: [a], names: ["1"] }]);
  byName.loadStateDict({
    ...saved,
    tensors: new Map([...saved.tensors].filter(([k]) => !k.startsWith("1."))),
    paramSteps: { 0: 1 },
  });
  for (const o of [named, saver, shifted, same, byName]) o.dispose();
  for (const t of [a, b, w0]) {
    t.grad?.dispose();
    t.dispose();
  }
});

Deno.test("Module.loadStateDict checks dtypes and value counts before writing any parameter", async () => {
  await setup();
  const { Linear } = await import("../nn/layers.ts");
  const lin = new Linear(3, 2);
  const before = await lin.weight.toArray();
  const weight = { shape: [2, 3], data: new Float32Array(6).fill(9) }; // valid, listed first
  assert.throws(
    () => lin.loadStateDict({ weight, bias: { shape: [2], data: new Int32Array([1, 2]) } }),
    /loadStateDict: bias is i32, the model's is f32/,
  );
  assert.throws(
    () => lin.loadStateDict({ weight, bias: { shape: [2], data: new Float32Array(3) } }),
    /loadStateDict: bias has 3 values, needs 2/,
  );
  assert.deepEqual([...await lin.weight.toArray()], [...before], "the weight was not written");
  // a disposed tensor, f64 or plain-array data, a null entry: named, and nothing written before
  const gone = tensor([7, 8]);
  gone.dispose();
  const bad: [unknown, RegExp][] = [
    [gone, /loadStateDict: bias was disposed/],
    [
      { shape: [2], data: new Float64Array(2) },
      /bias's data must be a Float32Array or an Int32Array, got Float64Array/,
    ],
    [{ shape: [2], data: [1, 2] }, /bias's data must be a Float32Array or an Int32Array, got Array/],
    [null, /loadStateDict: missing keys: bias/],
    [3, /loadStateDict: bias must be a Tensor or \{ shape, data \}, got number/],
  ];
  for (const [bias, want] of bad) {
    assert.throws(() => lin.loadStateDict({ weight, bias } as Record<string, HostTensor>), want);
  }
  assert.deepEqual([...await lin.weight.toArray()], [...before], "the weight was not written");
  // a misspelt option loaded strictly in silence (Python raises on an unknown keyword)
  const opts: [unknown, RegExp][] = [
    [{ strcit: false }, /loadStateDict: unknown option 'strcit' \(options are strict\)/],
    [{ strict: "no" }, /loadStateDict: strict must be a boolean, got "no"/],
  ];
  for (const [o, want] of opts) {
    assert.throws(() => lin.loadStateDict(lin.stateDict(), o as { strict?: boolean }), want);
  }
  lin.dispose();
});

Deno.test("Module: a weight shared by two layers is one parameter (clipping sees it once); state dicts name both", async () => {
  await setup();
  const { Module } = await import("../nn/module.ts");
  const { Embedding } = await import("../nn/layers.ts");
  class Head extends Module {
    constructor(readonly weight: Tensor) {
      super();
      this.param("weight", weight);
    }
  }
  class Tied extends Module {
    readonly emb = this.child("emb", new Embedding(4, 2));
    readonly head = this.child("head", new Head(this.emb.weight));
  }
  const model = new Tied();
  const w = model.emb.weight;
  assert.deepEqual(model.namedParameters().map(([n]) => n), ["emb.weight"]);
  assert.equal(model.numParameters(), 8);
  assert.deepEqual([...model.stateDict().keys()], ["emb.weight", "head.weight"], "PyTorch's state_dict keys");
  tidy(() => w.sum().mul(3).backward()); // every gradient element 3: norm sqrt(8 * 9)
  const norm = clipGradNorm(model.parameters(), 1);
  const [n, g] = await readAll([norm, w.grad!]);
  assertClose(n, { data: Float64Array.of(Math.sqrt(72)), shape: [] }, { rtol: 1e-6 }, "norm");
  const clipped = 3 / (Math.sqrt(72) + 1e-6);
  assertClose(g, { data: new Float64Array(8).fill(clipped), shape: [4, 2] }, { rtol: 1e-6 }, "clipped once");
  const opt = configureOptimizers(model, { lr: 1, weightDecay: 0, betas: [0.9, 0.999] }); // no "appears twice"
  assert.deepEqual(opt.paramGroups.flatMap((group) => group.names), ["emb.weight"]);
  for (const t of [norm, opt, model]) t.dispose();
});

Deno.test("step: a bad gradient (shape, dtype, disposed) is named before any parameter moves", async () => {
  await setup();
  const [a, b] = [param(Float64Array.from([1, 2]), [2]), param(Float64Array.from([3, 4, 5]), [3])];
  const opt = new AdamW([{ params: [a, b], names: ["a", "b"] }]);
  setGrad(a, Float64Array.from([1, 1]));
  const bad: [() => Tensor, RegExp][] = [
    [() => tensor([1, 1]), /step: gradient f32 \[2\] for parameter 'b' of shape \[3\] \(f32\)/],
    [() => tensor(new Int32Array(3), [3]), /step: gradient i32 \[3\] for parameter 'b'/],
    [() => {
      const t = tensor([1, 1, 1]);
      t.dispose();
      return t;
    }, /step: a disposed gradient for parameter 'b'/],
  ];
  for (const [grad, want] of bad) {
    b.grad?.dispose();
    b.grad = keep(grad());
    assert.throws(() => opt.step(), want);
    assert.deepEqual([...await a.toArray()], [1, 2], "a did not move");
    assert.equal(opt.stepCount, 0, "no step counted");
  }
  b.grad = null;
  // a disposed gradScale (gradNormScale's result freed too early): the step is undone, its counts too
  const scale = tensor([1]);
  scale.dispose();
  assert.throws(() => opt.step({ gradScale: scale }), /step: gradScale was disposed/);
  assert.deepEqual([...await a.toArray()], [1, 2], "a did not move");
  assert.deepEqual([opt.stepCount, opt.stateDict().paramSteps], [0, {}], "no step counted");
  // a learning rate set to NaN or Infinity (a schedule's bug) would turn every parameter into NaN
  for (const lr of [NaN, Infinity, -1]) {
    opt.lr = lr;
    assert.throws(() => opt.step(), new RegExp(`step: lr must be a finite number >= 0, got ${lr}`));
    assert.deepEqual([...await a.toArray()], [1, 2], "a did not move");
  }
  opt.dispose();
  for (const p of [a, b]) {
    p.grad?.dispose();
    p.dispose();
  }
  // what is not a list of parameters or of groups is named (a module, where PyTorch takes its parameters())
  const model = new MambaLM({ dModel: 8, nLayers: 1 }, { vocabSize: 8 });
  const c = param(Float64Array.from([1]), [1]);
  const notParams: [unknown, RegExp][] = [
    [
      model,
      /parameters must be a list of tensors or of groups.*got object \(a module: pass model.parameters\(\)\)/,
    ],
    [
      { params: [c] },
      /parameters must be a list of tensors or of groups \(\{ params: Tensor\[\] \}\), got object \(one group: pass \[group\]\)/,
    ],
    [[c, 3], /parameter 1 of the list is number, not a tensor/],
    [
      [{ params: [c] }, c],
      /group 1 must be \{ params: Tensor\[\] \} \(a list of groups takes no bare tensors\), got a tensor/,
    ],
    [[{ params: [c, "w"] }], /group 0 must be .*got params holding a non-tensor/],
  ];
  for (const [arg, want] of notParams) {
    assert.throws(() => new AdamW(arg as Tensor[]), want);
  }
  // a misspelt option is named, not a default taken silently (PyTorch raises on unknown keywords too)
  const misspelt: [() => unknown, RegExp][] = [
    [
      () => new AdamW([c], { weight_decay: 0.1 } as AdamWOptions),
      /AdamW: unknown option 'weight_decay' \(options are lr, betas, eps, weightDecay\)/,
    ],
    [() => new SGD([c], { momentum: 0.9, nestrov: true } as SGDOptions), /SGD: unknown option 'nestrov'/],
    [
      () => new SGD([c], { momentum: 0.9, dampening: NaN }),
      /SGD: dampening must be a finite number, got NaN/,
    ],
    // infinite hyper-parameters turned every parameter into NaN at the first or second step
    [
      () => new AdamW([c], { weightDecay: Infinity }),
      /optimizer: weightDecay must be a finite number >= 0, got Infinity/,
    ],
    [() => new SGD([c], { momentum: Infinity }), /SGD: momentum must be a finite number >= 0, got Infinity/],
    // a group's keys too: PyTorch's per-group lr (here lrScale) or a snake_case key were dropped in silence
    [
      () => new SGD([{ params: [c], lr: 0.5 } as ParamGroup], { lr: 0.1 }),
      /optimizer: group 0 sets lr; a group's learning rate is lrScale times the optimizer's lr/,
    ],
    [
      () => new AdamW([{ params: [c], weight_decay: 0 } as ParamGroup]),
      /optimizer: group 0: unknown option 'weight_decay' \(options are params, weightDecay, lrScale, names\)/,
    ],
  ];
  for (const [make, want] of misspelt) assert.throws(make, want);
  assert.throws(
    () => new SGD([c], { lr: Infinity }),
    /optimizer: lr must be a finite number >= 0, got Infinity/,
  );
  // values of the wrong type: comparisons converted "0.001" to a number, and "no" made nesterov true
  const wrongType: [() => unknown, RegExp][] = [
    [
      () => new AdamW([c], { lr: "0.001" as unknown as number }),
      /optimizer: lr must be a finite number >= 0, got "0\.001"/,
    ],
    [
      () => new AdamW([c], { eps: "1e-8" as unknown as number }),
      /AdamW: eps must be a number >= 0, got "1e-8"/,
    ],
    [
      () => new AdamW([c], { betas: ["0.9", 0.95] as unknown as [number, number] }),
      /AdamW: betas must be numbers in \[0, 1\), got "0\.9", 0\.95/,
    ],
    [
      () => new SGD([c], { momentum: "0.9" as unknown as number }),
      /SGD: momentum must be a finite number >= 0, got "0\.9"/,
    ],
    [
      () => new SGD([c], { momentum: 0.9, nesterov: "no" as unknown as boolean }),
      /SGD: nesterov must be true or false, got "no"/,
    ],
    [
      () => cosineSchedule({ warmup: 1, total: 9, maxLr: 1, minLr: 0, steps: 99 } as never),
      /cosineSchedule: unknown option 'steps' \(options are warmup, total, maxLr, minLr\)/,
    ],
  ];
  for (const [make, want] of wrongType) assert.throws(make, want);
  // step's options: gradNormScale's result passed whole (or as { scale }) stepped unclipped
  const sgd = new SGD([c], { lr: 0.1 });
  const g = gradNormScale([c], 1);
  assert.throws(() => sgd.step(g as never), /step: unknown option 'norm' \(options are gradScale\)/);
  assert.throws(() => sgd.step({ scale: g.scale } as never), /step: unknown option 'scale'/);
  assert.throws(() => sgd.step({ gradScale: 0.5 } as never), /step: gradScale must be a Tensor/);
  sgd.lr = "0.1" as unknown as number;
  assert.throws(() => sgd.step(), /step: lr must be a finite number >= 0, got "0\.1"/);
  g.norm.dispose();
  g.scale.dispose();
  c.dispose();
  model.dispose();
});

Deno.test("step and loadStateDict that run out of memory for new state buffers leave everything as it was", async () => {
  await setup();
  const [a, b] = [param(Float64Array.from([1, 2]), [2]), param(Float64Array.from([3, 4, 5]), [3])];
  setGrad(a, Float64Array.from([1, 1]));
  setGrad(b, Float64Array.from([1, 1, 1]));
  const one = tensor([1]);
  const opt = new AdamW([{ params: [a, b], names: ["a", "b"] }]);
  const base = memory();
  // room for three of the four 256-byte moment buffers: b's second runs out
  setMemoryLimit(base.liveBytes + 3 * 256);
  try {
    assert.throws(() => opt.step({ gradScale: one }), /out of memory/);
  } finally {
    setMemoryLimit(null);
  }
  assert.deepEqual([...await a.toArray()], [1, 2], "a did not move");
  assert.equal(opt.stepCount, 0, "no step counted");
  assert.equal(opt.stateDict().tensors.size, 0, "no state kept");
  assert.equal(memory().liveTensors, base.liveTensors, "no buffer left live");
  assert.equal(memory().liveBytes, base.liveBytes);
  // a retry takes the same step as an optimizer that never failed
  const other = new AdamW([{ params: [param(Float64Array.from([1, 2]), [2])], names: ["a"] }]);
  setGrad(other.params[0], Float64Array.from([1, 1]));
  opt.step({ gradScale: one });
  other.step({ gradScale: one });
  assertBitEqual(await a.toArray(), await other.params[0].toArray(), "a after the retried step");
  const saved = opt.stateDict();
  const state = {
    step: saved.step,
    paramSteps: saved.paramSteps,
    tensors: new Map(
      await Promise.all(
        [...saved.tensors].map(async ([k, t]) =>
          [k, { shape: [...t.shape], data: await t.toArray() }] as const
        ),
      ),
    ),
  };
  const fresh = new AdamW([{ params: [a, b], names: ["a", "b"] }]);
  const before = memory();
  setMemoryLimit(before.liveBytes + 3 * 256);
  try {
    assert.throws(() => fresh.loadStateDict(state), /out of memory/);
  } finally {
    setMemoryLimit(null);
  }
  assert.equal(fresh.stateDict().tensors.size, 0, "no state loaded");
  assert.equal(fresh.stepCount, 0);
  assert.equal(memory().liveTensors, before.liveTensors, "no buffer left live");
  fresh.loadStateDict(state);
  assert.equal(fresh.stateDict().tensors.size, 4, "loads once there is room");
  for (const o of [opt, other, fresh]) o.dispose();
  for (const p of [a, b, other.params[0]]) {
    p.grad?.dispose();
    p.dispose();
  }
  one.dispose();
});

Deno.test("gradNormScale and clipGradNorm that run out of memory part-way leak nothing (outside tidy too)", async () => {
  await setup();
  const p = param(uniform(21000, 3), [300, 70]);
  setGrad(p, uniform(21000, 4));
  const base = memory();
  // the partial sums take 512 bytes, the norm and the scale 256 each: the norm, then the scale, runs out
  for (const room of [512, 768]) {
    for (
      const [what, run] of [["gradNormScale", () => gradNormScale([p], 1)], [
        "clipGradNorm",
        () => clipGradNorm([p], 1),
      ]] as const
    ) {
      setMemoryLimit(base.liveBytes + room);
      try {
        assert.throws(run, /out of memory/, `${what} at +${room}`);
      } finally {
        setMemoryLimit(null);
      }
      assert.equal(memory().liveTensors, base.liveTensors, `${what} at +${room}: no tensor left live`);
    }
  }
  p.grad!.dispose();
  p.dispose();
});

Deno.test("gradient clipping names a .grad disposed but not set to null", async () => {
  await setup();
  const [a, b] = [param(Float64Array.from([1, 2]), [2]), param(Float64Array.from([3]), [1])];
  setGrad(a, Float64Array.from([1, 1]));
  setGrad(b, Float64Array.from([2]));
  b.grad!.dispose();
  const want =
    /gradient clipping: the \.grad of parameter 1 of those with gradients \(.*\) was disposed but not set to null/;
  assert.throws(() => clipGradNorm([a, b], 1), want);
  assert.throws(() => gradNormScale([a, b], 1), want);
  b.grad = null;
  a.grad!.dispose();
  for (const p of [a, b]) p.dispose();
});

Deno.test("plain SGD keeps its step counts through a state dict", async () => {
  await setup();
  const p = param(Float64Array.from([1, 2]), [2]);
  const opt = new SGD([{ params: [p], names: ["w"] }], { lr: 0.1 });
  setGrad(p, Float64Array.from([1, 1]));
  opt.step();
  opt.step();
  const saved = opt.stateDict();
  assert.deepEqual(saved.paramSteps, { w: 2 });
  const fresh = new SGD([{ params: [p], names: ["w"] }], { lr: 0.1 });
  fresh.loadStateDict(saved);
  assert.deepEqual(fresh.stateDict().paramSteps, { w: 2 });
  assert.equal(fresh.stepCount, 2);
  for (const o of [opt, fresh]) o.dispose();
  p.grad?.dispose();
  p.dispose();
});

Deno.test("loading a module's or an optimizer's own state dict is a no-op (as PyTorch), not a lost batch", async () => {
  await setup();
  const { Linear } = await import("../nn/layers.ts");
  const lin = new Linear(3, 2);
  const before = await lin.weight.toArray();
  lin.loadStateDict(lin.stateDict());
  // a view of the parameter too: same storage, nothing to copy (WebGPU refuses a copy onto itself)
  lin.loadStateDict({ weight: lin.weight.reshape(2, 3), bias: lin.bias! });
  const x = tensor([[1, 2, 3]]);
  lin.forward(x).sum().backward();
  const opt = new AdamW(lin.parameters());
  opt.step();
  const [key, m] = [...opt.stateDict().tensors][0];
  const m0 = await m.toArray();
  opt.loadStateDict(opt.stateDict());
  assert.deepEqual([...await opt.stateDict().tensors.get(key)!.toArray()], [...m0], key);
  const after = await lin.weight.toArray();
  assert.ok(after.some((v, i) => v !== before[i]), "the step moved the weight (so the batch was not lost)");
  opt.zeroGrad();
  opt.dispose();
  lin.dispose();
  x.dispose();
});

Deno.test("no leaks: after training steps, zeroGrad and dispose, live bytes are back to baseline", async () => {
  await setup();
  const base = memory().liveBytes;
  const model = tinyLM(4);
  const opt = optimizerFor(model);
  const lrAt = cosineSchedule(CONFIG);
  const after: number[] = [];
  for (let i = 0; i < 3; i++) {
    trainStep(model, opt, lrAt).dispose();
    after.push(memory().liveBytes);
  }
  assert.equal(after[2], after[1], "steady state: no growth per step");
  opt.zeroGrad();
  opt.dispose();
  model.dispose();
  assert.equal(memory().liveBytes, base, "live bytes back to baseline");
});

Deno.test("Module: a name with a dot, an empty one or one taken is refused (keys would collide or drop)", async () => {
  await setup();
  const { Module } = await import("../nn/module.ts");
  const { RMSNorm } = await import("../nn/layers.ts");
  class Custom extends Module {
    constructor(params: string[], children: string[]) {
      super();
      for (const n of params) this.param(n, tensor([1]));
      for (const n of children) this.child(n, new RMSNorm(1));
    }
  }
  const bad: [string[], string[], RegExp][] = [
    [
      ["a.weight"],
      ["a"],
      /Module: a parameter name must be a non-empty string without '\.', got "a\.weight"/,
    ],
    [[""], [], /Module: a parameter name must be .*, got ""/],
    [[], ["x.y"], /Module: a child name must be .*, got "x\.y"/],
    [["w", "w"], [], /Module: the parameter name 'w' is already taken by a parameter of this module/],
    [["norm"], ["norm"], /Module: the child name 'norm' is already taken by a parameter of this module/],
    [[], ["n", "n"], /Module: the child name 'n' is already taken by a child of this module/],
  ];
  for (const [params, children, want] of bad) assert.throws(() => new Custom(params, children), want);
  const ok = new Custom(["w"], ["norm"]);
  assert.deepEqual([...ok.stateDict().keys()], ["w", "norm.weight"]);
  ok.dispose();
});

Deno.test("layer constructors name the layer and the argument of a bad size (not rand's weight shape)", async () => {
  await setup();
  const { Conv1d, Embedding, Linear, RMSNorm } = await import("../nn/layers.ts");
  const live = memory().liveBytes;
  const bad: [() => unknown, RegExp][] = [
    [() => new Linear(-1, 3), /Linear: inFeatures must be an integer >= 0, got -1$/],
    [() => new Linear(3, 2.5), /Linear: outFeatures must be an integer >= 0, got 2.5$/],
    [() => new Linear("3" as unknown as number, 2), /Linear: inFeatures .* got "3" \(string\)$/],
    [() => new Embedding(NaN, 3), /Embedding: numEmbeddings must be an integer >= 0, got NaN$/],
    [() => new Embedding(3, -2), /Embedding: embeddingDim must be an integer >= 0, got -2$/],
    [() => new RMSNorm(1.5), /RMSNorm: dim must be an integer >= 0, got 1.5$/],
    [() => new Conv1d(-4, 4), /Conv1d: channels must be an integer >= 0, got -4$/],
    [() => new Conv1d(4, 0), /Conv1d: kernelSize must be an integer >= 1, got 0$/],
  ];
  for (const [make, want] of bad) assert.throws(make, want);
  assert.equal(memory().liveBytes, live, "nothing allocated");
});

Deno.test("Linear with no inputs: its bias starts at zero (PyTorch's bound 0), not NaN", async () => {
  await setup();
  const { Linear } = await import("../nn/layers.ts");
  const lin = new Linear(0, 3);
  const y = lin.forward(tensor(new Float32Array(0), [2, 0]));
  const [bias, out] = await readAll([lin.bias!, y]);
  assert.ok(bias.length === 3 && bias.every((v) => v === 0), `bias ${bias}`);
  assert.ok(out.length === 6 && out.every((v) => v === 0), `output ${out}`);
  y.dispose();
  lin.dispose();
});

Deno.test("Linear: the residual must have the output's shape, for 1-D inputs too (no broadcasting)", async () => {
  await setup();
  const { Linear } = await import("../nn/layers.ts");
  const lin = new Linear(3, 2);
  const live = memory().liveTensors;
  const cases: [number[], number[]][] = [[[3], [4, 2]], [[3], [1]], [[5, 3], [2]], [[5, 3], [5, 3]]];
  for (const [xs, rs] of cases) {
    tidy(() => {
      const [x, r] = [
        tensor(new Float32Array(xs.reduce((a, b) => a * b)), xs),
        tensor(new Float32Array(rs.reduce((a, b) => a * b)), rs),
      ];
      const out = [...xs.slice(0, -1), 2].join(", ");
      assert.throws(
        () => lin.forward(x, r),
        new RegExp(`Linear: residual \\[${rs.join(", ")}\\] must have the output's shape \\[${out}\\]`),
      );
    });
  }
  assert.equal(memory().liveTensors, live, "nothing left behind");
  const y = tidy(() => lin.forward(tensor([1, 2, 3]), tensor([10, 20])));
  const plain = tidy(() => lin.forward(tensor([1, 2, 3])));
  assertClose(
    await y.toArray(),
    Float32Array.from(await plain.toArray(), (v, i) => v + [10, 20][i]),
    TOL,
    "1-D",
  );
  y.dispose();
  plain.dispose();
  lin.dispose();
});

Deno.test("step: a disposed parameter or state buffer is named before any parameter moves", async () => {
  await setup();
  const make = () => {
    const [a, b] = [param(Float64Array.from([1, 2]), [2]), param(Float64Array.from([3, 4, 5]), [3])];
    const opt = new AdamW([{ params: [a, b], names: ["a", "b"] }]);
    setGrad(a, Float64Array.from([1, 1]));
    setGrad(b, Float64Array.from([1, 1, 1]));
    return { a, b, opt };
  };
  const undone = async (a: Tensor, opt: AdamW, steps: number, want: RegExp) => {
    const before = [...await a.toArray()];
    assert.throws(() => opt.step(), want);
    assert.deepEqual([...await a.toArray()], before, "a did not move");
    assert.equal(opt.stepCount, steps, "no step counted"); // it counted the step and moved a, then threw
  };
  const base = memory();
  {
    const { a, b, opt } = make();
    b.dispose(); // its gradient stays
    await undone(a, opt, 0, /step: parameter 'b' was disposed/);
    for (const t of [a, a.grad!, b.grad!, opt]) t.dispose();
  }
  {
    const { a, b, opt } = make();
    opt.step(); // makes the state buffers
    opt.stateDict().tensors.get("b.exp_avg_sq")!.dispose();
    await undone(a, opt, 1, /step: the exp_avg_sq state buffer of parameter 'b' was disposed/);
    for (const t of [a, b, a.grad!, b.grad!, opt]) t.dispose();
  }
  assert.equal(memory().liveTensors, base.liveTensors);
});
