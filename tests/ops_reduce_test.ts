import assert from "node:assert/strict";
import * as M from "./library.ts";
import { tensor } from "../mod.ts";
import { reduceRun } from "../core/ops/reduce_kernel.ts";
import {
  assertClose,
  checkOps,
  expandRef,
  F32,
  map2,
  type Nd,
  nd,
  type OpCase,
  rand,
  readAll,
  REDUCE,
  reduceRef,
  setup,
  softmaxRef,
} from "./helpers.ts";

await setup();

type Kind = "sum" | "mean" | "max";
const KINDS: Kind[] = ["sum", "mean", "max"];

Deno.test("sum/mean/max over each axis, several axes, all axes, keepdim both ways (forward + grad)", async () => {
  const x = rand([3, 4, 5], 1, { low: -2, high: 2 });
  const axesList: (number | number[] | undefined)[] = [
    0,
    1,
    2,
    -1,
    [0, 2],
    [2, 0],
    [1, 2],
    [0, 1, 2],
    undefined,
  ];
  const cases: OpCase[] = [];
  for (const kind of KINDS) {
    for (const axis of axesList) {
      for (const keepdim of [false, true]) {
        cases.push({
          what: `${kind}(axis ${JSON.stringify(axis)}, keepdim ${keepdim}) of [3,4,5]`,
          inputs: [x],
          gpu: ([t]) => (keepdim ? M[kind](t, axis, true) : t[kind](axis)),
          ref: ([t]) => reduceRef(t, axis, keepdim, REDUCE[kind]),
        });
      }
    }
    cases.push({
      what: `${kind} of odd 7x13 over axis 0`,
      inputs: [rand([7, 13], 2)],
      gpu: ([t]) => M[kind](t, 0),
      ref: ([t]) => reduceRef(t, 0, false, REDUCE[kind]),
    });
    cases.push({
      what: `${kind} of a 0-d tensor (no axes)`,
      inputs: [rand([], 3)],
      gpu: ([t]) => M[kind](t),
      ref: ([t]) => t,
    });
    cases.push({
      what: `${kind} over an axis of size 1`,
      inputs: [rand([4, 1, 3], 4)],
      gpu: ([t]) => M[kind](t, 1),
      ref: ([t]) => reduceRef(t, 1, false, REDUCE[kind]),
    });
  }
  for (const axis of [0, 1, 2, -1]) {
    for (const keepdim of [false, true]) {
      cases.push({
        what: `logsumexp(axis ${axis}, keepdim ${keepdim}) of [3,4,5]`,
        inputs: [x],
        gpu: ([t]) => t.logsumexp(axis, keepdim),
        ref: ([t]) => reduceRef(t, axis, keepdim, REDUCE.logsumexp),
      });
    }
  }
  cases.push({
    // Also the gradient's precision: exp(x - lse) would be off by ~3e-5 relative here (lse rounded to 6e-5).
    what: "logsumexp of large logits (1000 +- 3) does not overflow and keeps its gradient precise",
    inputs: [rand([8, 50], 5, { low: 997, high: 1003 })],
    gpu: ([t]) => M.logsumexp(t, 1),
    ref: ([t]) => reduceRef(t, 1, false, REDUCE.logsumexp),
  });
  await checkOps(cases);
});

Deno.test("max: tied maxima share the gradient equally", async () => {
  await checkOps([{
    what: "max with ties along axis 1",
    inputs: [nd([1, 3, 3, 0, 2, 2, 2, 2, -1, -5, -1, -3], [3, 4])],
    gpu: ([t]) => M.max(t, 1),
    ref: ([t]) => reduceRef(t, 1, false, REDUCE.max),
    refGrad: ([t], G) => {
      const m = reduceRef(t, 1, true, REDUCE.max);
      const mask = map2(t, m, (v, mx) => (v === mx ? 1 : 0));
      const count = reduceRef(mask, 1, true, REDUCE.sum);
      const gk = { data: G.data, shape: [3, 1] };
      return [map2(map2(mask, count, (a, c) => a / c), gk, (a, g) => a * g)];
    },
  }]);
});

Deno.test("max and logsumexp with infinite entries give PyTorch's values (not -FLT_MAX, not NaN)", async () => {
  const I = Infinity;
  const x = nd([-I, -I, -I, I, 0, 1, -I, 2, 1], [3, 3]);
  const lse = [-I, I, Math.log(Math.exp(2) + Math.exp(1))];
  const gk = (G: Nd) => ({ data: G.data, shape: [3, 1] });
  await checkOps([
    {
      what: "max of rows with -inf and +inf (a row of -inf shares its gradient)",
      inputs: [x],
      gpu: ([t]) => M.max(t, 1),
      ref: () => nd([-I, I, 2], [3]),
      refGrad: (
        _xs,
        G,
      ) => [map2(nd([1 / 3, 1 / 3, 1 / 3, 1, 0, 0, 0, 1, 0], [3, 3]), gk(G), (a, g) => a * g)],
    },
    {
      // the gradient exp(x - lse) is NaN where both are infinite, as in PyTorch
      what: "logsumexp of rows with -inf and +inf",
      inputs: [x],
      gpu: ([t]) => M.logsumexp(t, 1),
      ref: () => nd(lse, [3]),
      refGrad: ([t], G) => [
        map2(map2(t, nd(lse, [3, 1]), (v, l) => Math.exp(v - l)), gk(G), (a, g) => a * g),
      ],
    },
  ]);
});

/** Analytic float64 gradient of `sum(reduce(x) * G)` for one axis: the references for long axes. */
function reduceGradRef(kind: Kind | "logsumexp", x: Nd, axis: number | number[], G: Nd): Nd {
  const axes = typeof axis === "number" ? [axis] : axis;
  const kept = x.shape.map((d, i) => (axes.includes(i) ? 1 : d));
  const g = expandRef({ data: G.data, shape: kept }, x.shape);
  if (kind === "sum") return g;
  const count = axes.reduce((n, a) => n * x.shape[a], 1);
  if (kind === "mean") return map2(g, 1 / count, (a, b) => a * b);
  if (kind === "logsumexp") {
    if (typeof axis !== "number") throw new Error("logsumexp reference: one axis");
    return map2(softmaxRef(x, axis), g, (a, b) => a * b);
  }
  const m = expandRef(reduceRef(x, axes, true, REDUCE.max), x.shape);
  // Distinct random values: the maximum is unique, the gradient is one-hot.
  return { data: g.data.map((v, i) => (x.data[i] === m.data[i] ? v : 0)), shape: x.shape };
}

function longAxisCases(shape: number[], axis: number, seed: number): OpCase[] {
  // Positive values: sums have no cancellation, so f32 stays within ~1e-5 of float64 even over 70000 terms.
  const x = rand(shape, seed, { low: 0.5, high: 1.5 });
  return (["sum", "mean", "max", "logsumexp"] as const).map((kind) => ({
    what: `${kind} over axis ${axis} (length ${shape[axis]}) of [${shape}]`,
    inputs: [x],
    gpu: ([t]) => (kind === "logsumexp" ? M.logsumexp(t, axis) : M[kind](t, axis)),
    ref: ([t]) => reduceRef(t, axis, false, REDUCE[kind]),
    refGrad: ([t], G) => [reduceGradRef(kind, t, axis, G)],
  }));
}

Deno.test("reductions over an axis longer than 4096 (several passes), inner and outer dims", async () => {
  await checkOps([
    ...longAxisCases([3, 5000], 1, 11),
    ...longAxisCases([5000, 3], 0, 12),
    ...longAxisCases([2, 4097, 3], 1, 13),
  ]);
});

Deno.test("long reductions laid out as on the other adapter kind (a GPU aims for 8x the invocations)", async () => {
  // [16384, 128] over axis 0 is chunked differently (512 steps per invocation on a CPU adapter, 256 on a GPU);
  // the others check the other kind's passes
  const info = await M.init();
  const cpu = info.isFallbackAdapter;
  info.isFallbackAdapter = !cpu;
  try {
    await checkOps([
      ...longAxisCases([3, 5000], 1, 31),
      ...longAxisCases([5000, 3], 0, 32),
      ...longAxisCases([16384, 128], 0, 33), // as a (B, L) sum of a gradient: 128 outputs over 16384
      ...longAxisCases([2, 70001], 1, 34),
    ]);
  } finally {
    info.isFallbackAdapter = cpu;
  }
});

Deno.test("reduceRun reads a region of a larger buffer in place (from), over one pass and several; bad regions and options are errors", async () => {
  // x: [pad (7) | region (outer 2, r, inner 3) | tail (5)]; the region summed over r, against float64
  for (const r of [10, 5000]) {
    const [outer, inner, from] = [2, 3, 7];
    const data = rand([from + outer * r * inner + 5], 90 + r, { low: 0.5, high: 1.5 }).data;
    const want = new Float64Array(outer * inner);
    for (let o = 0; o < outer; o++) {
      for (let t = 0; t < r; t++) {
        for (let i = 0; i < inner; i++) want[o * inner + i] += data[from + (o * r + t) * inner + i];
      }
    }
    const x = tensor(Float32Array.from(data));
    const y = reduceRun(x, outer, r, inner, "sum", { from, shape: [outer, inner] });
    assert.deepEqual(y.shape, [outer, inner]);
    const [got] = await readAll([y]);
    assertClose(got, want, F32, `region sum, r ${r}`);
    assert.throws(() => reduceRun(x, outer, r, inner, "sum", { from: 13 }), /elements from 13 do not fit/);
    assert.throws(() => reduceRun(x, outer, r, inner, "sum", { into: y, shape: [6] }), /not both/);
    x.dispose();
    y.dispose();
  }
});

Deno.test("reductions over size-1 axes, merged neighbouring axes, and few outputs over a long axis", async () => {
  // Size-1 axes are dropped and neighbouring reduced axes merged into one pass; few outputs over a long
  // axis are reduced in chunks over several passes. All must match the plain reference.
  const cases: OpCase[] = [];
  const shapes: [number[], number[]][] = [
    [[3, 1, 1000, 5], [0, 1, 2]], // one merged run of 3000, inner 5
    [[6, 1, 7], [0, 2]], // 0 and 2 meet once the size-1 axis is dropped
    [[1, 2000, 1, 3], [1]],
    [[1, 4, 1], [0, 2]], // only size-1 axes: a copy
    [[2, 9000], [1]], // 2 outputs over 9000: chunks, then a second pass
    [[4, 3, 700, 2], [1, 3]], // two separate runs
  ];
  shapes.forEach(([shape, axes], i) => {
    // Positive values: no cancellation, so f32 sums stay within ~1e-5 of float64.
    const x = rand(shape, 70 + i, { low: 0.5, high: 1.5 });
    for (const kind of KINDS) {
      cases.push({
        what: `${kind} over ${JSON.stringify(axes)} of [${shape}]`,
        inputs: [x],
        gpu: ([t]) => M[kind](t, axes),
        ref: ([t]) => reduceRef(t, axes, false, REDUCE[kind]),
        refGrad: ([t], G) => [reduceGradRef(kind, t, axes, G)],
      });
    }
  });
  await checkOps(cases);
});

Deno.test("reductions over an axis longer than 65535 (beyond one invocation's loop limit)", async () => {
  await checkOps([
    ...longAxisCases([70001], 0, 21),
    ...longAxisCases([2, 70001], 1, 22),
    ...longAxisCases([70001, 2], 0, 23),
  ]);
});

Deno.test("long reductions see their last elements: a spike at the end and past 65536", async () => {
  const n = 70001;
  const outs: M.Tensor[] = [];
  const expected: number[] = [];
  for (const at of [0, 4095, 4096, 65535, 65536, n - 1]) {
    const data = new Float32Array(n).fill(1);
    data[at] = 1000;
    const t = tensor(data);
    outs.push(M.max(t), M.sum(t), M.max(t.reshape(1, n, 1), 1));
    expected.push(1000, n - 1 + 1000, 1000);
    t.dispose();
  }
  const got = await readAll(outs);
  // Sums of integers below 2^24 are exact in f32.
  assert.deepEqual(got.map((g) => g[0]), expected);
  for (const t of outs) t.dispose();
});

Deno.test("sum over an empty axis is 0; max over an empty axis throws", async () => {
  const e = M.zeros([3, 0]);
  const s = M.sum(e, 1);
  assertClose(await s.toArray(), [0, 0, 0], { rtol: 0, atol: 0 }, "sum over empty axis");
  assert.throws(() => M.max(e, 1), /empty dim/);
  s.dispose();
  e.dispose();
});

Deno.test("logsumexp over an empty axis is -inf (as PyTorch), with an empty gradient", async () => {
  const e = M.zeros([3, 0], { requiresGrad: true });
  const l = M.logsumexp(e, 1), lk = e.logsumexp(-1, true);
  assert.deepEqual([l.shape, lk.shape], [[3], [3, 1]]);
  assert.deepEqual([...await l.toArray(), ...await lk.toArray()], new Array(6).fill(-Infinity));
  l.sum().backward();
  assert.deepEqual(e.grad!.shape, [3, 0]);
  M.dispose([e, e.grad!, l, lk]);
});

Deno.test("sum/max over axes of size 1 give a copy: an in-place update of the input leaves them alone", async () => {
  const p = tensor([[1, 2, 3]], undefined, { requiresGrad: true });
  const outs = [p.sum(0), p.max(0), M.sum(p, [0], true), M.max(p.reshape(1, 3, 1), [0, 2])];
  for (const o of outs) assert.notEqual(o.storage, p.storage, `${o} shares the storage of its input`);
  p.mul(1).sum().backward(); // gradient 1: one SGD step of lr 1 subtracts 1 from p in place
  new M.SGD([p], { lr: 1 }).step();
  assert.deepEqual([...await p.toArray()], [0, 1, 2]);
  for (const o of outs) assert.deepEqual([...await o.toArray()], [1, 2, 3], `${o} after the step`);
  M.dispose([p, p.grad!, ...outs]);
});

Deno.test("reductions: the same values through free functions and methods, and along non-last axes", async () => {
  const x = rand([4, 3, 2], 31);
  const t = tensor(Float32Array.from(x.data), x.shape);
  const outs = [t.sum(1), M.sum(t, 1), t.mean([0, 2], true), t.max(-2, true), t.logsumexp(0)];
  const refs = [
    reduceRef(x, 1, false, REDUCE.sum),
    reduceRef(x, 1, false, REDUCE.sum),
    reduceRef(x, [0, 2], true, REDUCE.mean),
    reduceRef(x, -2, true, REDUCE.max),
    reduceRef(x, 0, false, REDUCE.logsumexp),
  ];
  const got = await readAll(outs);
  got.forEach((g, i) => {
    assert.deepEqual(outs[i].shape, refs[i].shape, `output ${i} shape`);
    assertClose(g, refs[i], {}, `reduction ${i}`);
  });
  for (const o of [t, ...outs]) o.dispose();
});

Deno.test("0-d tensors, as PyTorch: reductions and softmax over axis 0 or -1 give the value; ops that cut or join along a dim refuse them", async () => {
  await M.init();
  const base = M.memory().liveTensors;
  const x = tensor(5, undefined, { requiresGrad: true });
  const cases: [string, (t: M.Tensor) => M.Tensor, number, number][] = [
    ["sum", (t) => M.sum(t, 0), 5, 1],
    ["mean", (t) => M.mean(t, -1), 5, 1],
    ["max", (t) => M.max(t, 0, true), 5, 1],
    ["logsumexp", (t) => M.logsumexp(t, -1), 5, 1],
    ["softmax", (t) => M.softmax(t), 1, 0],
    ["logSoftmax", (t) => M.logSoftmax(t, 0), 0, 0],
  ];
  for (const [name, f, value, grad] of cases) {
    const y = f(x);
    assert.deepEqual(y.shape, [], name);
    y.backward();
    assert.deepEqual([...await y.toArray(), ...await x.grad!.toArray()], [value, grad], name);
    y.dispose();
    x.grad!.dispose();
    x.grad = null;
  }
  const idx = tensor([0], undefined, { dtype: "i32" });
  for (
    const [name, f] of [
      ["narrow", () => M.narrow(x, 0, 0, 1)],
      ["split", () => M.split(x, 1)],
      ["chunk", () => M.chunk(x, 1)],
      ["cat", () => M.cat([x, x])],
      ["gather", () => M.gather(x, 0, idx)],
      ["indexSelect", () => M.indexSelect(x, 0, idx)],
    ] as const
  ) {
    assert.throws(
      f,
      new RegExp(`^Error: ${name}: needs a tensor of rank >= 1 \\(dim 0\\), got a 0-d tensor`),
    );
  }
  assert.throws(() => M.sum(x, 1), /sum: dim 1 is out of range for a tensor of rank 0/);
  for (const t of [x, idx]) t.dispose();
  assert.equal(M.memory().liveTensors, base, "nothing leaked");
});

Deno.test("an op given a disposed tensor names it and allocates nothing; reshape with two -1 says only one can be inferred", async () => {
  await M.init();
  const a = M.ones([3, 4]);
  const b = M.ones([4, 2]);
  b.dispose();
  const before = M.memory();
  assert.throws(
    () => M.matmul(a, b),
    /^Error: matmul: Tensor#\d+ \[4, 2\] f32 was disposed and cannot be used/,
  );
  assert.throws(() => M.softmax(b), /softmax: Tensor#\d+ \[4, 2\] f32 was disposed/);
  assert.equal(M.memory().liveTensors, before.liveTensors);
  assert.equal(M.memory().liveBytes, before.liveBytes);
  assert.throws(
    () => a.reshape(-1, -1),
    /^Error: reshape: only one dim can be -1 \(inferred\), got \[-1, -1\]/,
  );
  a.dispose();
});

Deno.test("sumToShape: a shape that does not broadcast to the gradient's is an error naming both, and leaks nothing", async () => {
  const g = M.randn([2, 4, 8], { seed: 1 });
  const ok = M.sumToShape(g, [4, 1]);
  assert.deepEqual(ok.shape, [4, 1]);
  ok.dispose();
  const before = M.memory();
  for (const shape of [[3], [2, 1, 4, 8], [4, 2]]) {
    assert.throws(
      () => M.sumToShape(g, shape),
      new RegExp(`sumToShape: cannot sum \\[2, 4, 8\\] to \\[${shape.join(", ")}\\]`),
    );
  }
  // the sum over the broadcast axes was made before the reshape's check threw, and leaked
  assert.equal(M.memory().liveTensors, before.liveTensors);
  assert.equal(M.memory().liveBytes, before.liveBytes);
  await M.sync();
  g.dispose();
});
