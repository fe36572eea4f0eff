import assert from "node:assert/strict";
import * as M from "./library.ts";
import { backward, checkpoint, dispose, memory, noGrad, type Tensor, tensor, tidy } from "../mod.ts";
import { checkpointInputsOnly, defineOp } from "../advanced.ts";
import {
  assertClose,
  checkOps,
  map1,
  map2,
  matmulRef,
  type Nd,
  nd,
  rand,
  readAll,
  setup,
  toTensor,
  UNARY_REF,
} from "./helpers.ts";

await setup();

Deno.test(".grad accumulates across two backward calls; an explicit output gradient is left intact", async () => {
  const xr = rand([3, 4], 1);
  const x = toTensor(xr, true);
  tidy(() => M.sum(M.mul(x, x)).backward()); // d/dx = 2x
  const first = await x.grad!.toArray();
  tidy(() => M.sum(M.mul(x, 3)).backward()); // + 3
  const g = tensor(Float32Array.from({ length: 12 }, (_, i) => i - 5), [3, 4]);
  tidy(() => x.exp().backward(g)); // + g * e^x
  const [second, gAfter] = await readAll([x.grad!, g]);
  assertClose(first, map1(xr, (v) => 2 * v), {}, "first backward");
  assertClose(
    second,
    map1(xr, (v) => 2 * v + 3).data.map((v, i) => v + (i - 5) * Math.exp(xr.data[i])),
    {},
    "after three backward calls",
  );
  assert.deepEqual(
    [...gAfter],
    Array.from({ length: 12 }, (_, i) => i - 5),
    "the caller's gradient is untouched",
  );
  for (const t of [x.grad!, x, g]) t.dispose();
});

Deno.test("a tensor used several times (x*x, x+x, diamonds) gets the sum of its gradient paths", async () => {
  const x = rand([2, 5], 2, { low: -1.5, high: 1.5 });
  const w = rand([5, 5], 3);
  await checkOps([
    { what: "x * x", inputs: [x], gpu: ([t]) => M.mul(t, t), ref: ([t]) => map1(t, (v) => v * v) },
    { what: "x + x", inputs: [x], gpu: ([t]) => t.add(t), ref: ([t]) => map1(t, (v) => 2 * v) },
    {
      what: "x - x (exact zero forward, zero grad)",
      inputs: [x],
      gpu: ([t]) => t.sub(t),
      ref: ([t]) => map1(t, () => 0),
    },
    {
      what: "x*x + exp(x) + x (three paths)",
      inputs: [x],
      gpu: ([t]) => t.mul(t).add(t.exp()).add(t),
      ref: ([t]) => map1(t, (v) => v * v + Math.exp(v) + v),
    },
    {
      what: "diamond: a = x @ w; tanh(a) * sigmoid(a) + a",
      inputs: [x, w],
      gpu: ([t, u]) => {
        const a = t.matmul(u);
        return a.tanh().mul(a.sigmoid()).add(a);
      },
      ref: ([t, u]) => map1(matmulRef(t, u), (v) => Math.tanh(v) * UNARY_REF.sigmoid(v) + v),
    },
    {
      what: "x @ x^T (same tensor as both matmul operands)",
      inputs: [x],
      gpu: ([t]) => M.matmul(t, t, { transB: true }),
      ref: ([t]) => matmulRef(t, t, { transB: true }),
    },
  ]);
});

/** sum(a * b), a loss whose gradient in a is b. */
const dot = (a: Tensor, b: Tensor) => M.sum(M.mul(a, b));

/**
 * Gradients of x (3, 8) through windows along dim 1. `expect(uses)`: the sum of each use's output gradient
 * G[i] zero-padded into x's shape (Float64), a use being [G index, start, length]. `grad(loss)`: x.grad after
 * `loss(x, G).backward()`; with `poison`, the pool's buffers of x's size class first hold 7s, so that a
 * gradient element left unwritten shows.
 */
function windowGrads(xr: Nd, G: Nd[], poison = false) {
  const expect = (uses: [number, number, number][]) => {
    const out = new Float64Array(24);
    for (const [gi, start, len] of uses) {
      for (let i = 0; i < 3; i++) {
        for (let j = 0; j < len; j++) out[i * 8 + start + j] += G[gi].data[i * len + j];
      }
    }
    return out;
  };
  const grad = async (loss: (x: Tensor, g: Tensor[]) => Tensor) => {
    if (poison) dispose(Array.from({ length: 8 }, () => M.full([3, 8], 7)));
    const x = toTensor(xr, true);
    const gs = G.map((g) => toTensor(g));
    tidy(() => loss(x, gs).backward());
    const [out] = await readAll([x.grad!]);
    for (const t of [x.grad!, x, ...gs]) t.dispose();
    return out;
  };
  return { expect, grad };
}

Deno.test("window gradients (narrow, split) land in place: disjoint, overlapping, after a full gradient, shared storage", async () => {
  const live0 = memory().liveTensors;
  const xr = rand([3, 8], 31);
  const G = [rand([3, 2], 32), rand([3, 5], 33), rand([3, 1], 34), rand([3, 4], 35), rand([3, 8], 36)];
  const { expect, grad } = windowGrads(xr, G);
  // Disjoint pieces of a split: each copied into one zero tensor.
  assertClose(
    await grad((x, g) => {
      const [a, b, c] = M.split(x, [2, 5, 1], 1);
      return M.add(M.add(dot(a, g[0]), dot(b, g[1])), dot(c, g[2]));
    }),
    expect([[0, 0, 2], [1, 2, 5], [2, 7, 1]]),
    {},
    "split pieces",
  );
  // Overlapping windows: the second is added in place.
  assertClose(
    await grad((x, g) => M.add(dot(M.narrow(x, 1, 0, 5), g[1]), dot(M.narrow(x, 1, 3, 4), g[3]))),
    expect([[1, 0, 5], [3, 3, 4]]),
    {},
    "overlapping windows",
  );
  // A full gradient and a window, in both orders.
  const full = expect([[4, 0, 8]]);
  const win = expect([[3, 4, 4]]);
  const both = full.map((v, i) => v + win[i]);
  assertClose(
    await grad((x, g) => M.add(dot(x, g[4]), dot(M.narrow(x, 1, 4, 4), g[3]))),
    both,
    {},
    "full, window",
  );
  assertClose(
    await grad((x, g) => M.add(dot(M.narrow(x, 1, 4, 4), g[3]), dot(x, g[4]))),
    both,
    {},
    "window, full",
  );
  // Shared storage: add's backward hands v's gradient and a view of it to x (a batch of one); the window
  // must not be written into that storage, or v's gradient would change too.
  const x = toTensor(xr, true);
  const v = toTensor(rand([1, 3, 8], 37), true);
  const g4flat = toTensor(G[4]);
  const [g4, g3] = [g4flat.reshape(1, 3, 8), toTensor(G[3])];
  tidy(() => M.add(dot(M.add(x, v), g4), dot(M.narrow(x, 1, 4, 4), g3)).backward());
  const [gx, gv] = await readAll([x.grad!, v.grad!]);
  assertClose(gx, both, {}, "shared storage: x");
  assertClose(gv, full, {}, "shared storage: v keeps its own gradient");
  for (const t of [x.grad!, v.grad!, x, v, g4flat, g4, g3]) t.dispose();
  // A window held until x's gradient is needed, then a second one that only partly overlaps it, and a
  // piece of a split used twice.
  assertClose(
    await grad((x, g) => {
      const [a, b] = M.split(x, [4, 4], 1);
      return M.add(M.add(dot(b, g[3]), dot(M.narrow(x, 1, 2, 5), g[1])), dot(M.add(a, a), g[3]));
    }),
    expect([[3, 4, 4], [1, 2, 5], [3, 0, 4], [3, 0, 4]]),
    {},
    "pending window, overlap, piece used twice",
  );
  assert.equal(memory().liveTensors, live0, "no tensor left behind");
});

Deno.test("window targets: a backward writes only its window of the whole gradient; the rest reads zero without a clear where windows tile it", async () => {
  const live0 = memory().liveTensors;
  const { copyBox } = await import("../core/ops/shape_ops.ts");
  const xr = rand([3, 8], 41);
  const G = [rand([3, 3], 42), rand([3, 5], 43), rand([3, 8], 44), rand([3, 4], 45)];
  // x[:, start : start + len] as an op whose backward writes that window of x's gradient itself when
  // autograd offers a target (as the conv and the fused scan do), else returns it as a WindowGrad.
  const slice = (start: number, len: number) =>
    defineOp<null>({
      name: "slice",
      forward: ([x]) => {
        const y = M.Tensor.empty([3, len]);
        copyBox(x, { offset: start, strides: [8, 1] }, y, { offset: 0, strides: [len, 1] }, [3, len]);
        return y;
      },
      backward: (g, _saved, _inputs, _a, targets) => {
        const into = targets.window(0, 1, start, len);
        const gx = into ?? M.Tensor.empty([3, len]);
        const to = into ? { offset: start, strides: [8, 1] } : { offset: 0, strides: [len, 1] };
        copyBox(g, { offset: 0, strides: [len, 1] }, gx, to, [3, len]);
        return [into ? null : new M.WindowGrad(gx, 1, start)];
      },
    });
  const { expect, grad } = windowGrads(xr, G, true);
  const sl = (x: Tensor, start: number, len: number) => slice(start, len)([x], null);
  assertClose(
    await grad((x, g) => dot(sl(x, 2, 3), g[0])),
    expect([[0, 2, 3]]),
    {},
    "one window: zeros around it",
  );
  assertClose(
    await grad((x, g) => M.add(dot(sl(x, 0, 3), g[0]), dot(sl(x, 3, 5), g[1]))),
    expect([[0, 0, 3], [1, 3, 5]]),
    {},
    "two windows that tile x",
  );
  assertClose(
    await grad((x, g) => M.add(dot(x, g[2]), dot(sl(x, 2, 3), g[0]))),
    expect([[2, 0, 8], [0, 2, 3]]),
    {},
    "a window, then a full gradient",
  );
  assertClose(
    await grad((x, g) => M.add(dot(M.narrow(x, 1, 0, 4), g[3]), dot(sl(x, 2, 3), g[0]))),
    expect([[3, 0, 4], [0, 2, 3]]),
    {},
    "a window, then an overlapping one",
  );
  assertClose(
    await grad((x, g) => M.add(dot(M.narrow(x, 1, 5, 3), g[0]), dot(sl(x, 0, 3), g[0]))),
    expect([[0, 5, 3], [0, 0, 3]]),
    {},
    "a window, then a disjoint one (narrow's), not tiling x",
  );
  assert.equal(memory().liveTensors, live0, "no tensor left behind");
});

Deno.test("gradients flow only to tensors that require grad; detach cuts the graph", async () => {
  const x = M.randn([4], { seed: 1, requiresGrad: true });
  const y = M.randn([4], { seed: 2 });
  const z = tidy(() => {
    const loss = x.mul(y).add(x.detach().mul(100)).sum();
    loss.backward();
    return loss;
  });
  assert.equal(y.grad, null, "y does not require grad");
  const [gx, yv] = await readAll([x.grad!, y]);
  assertClose(gx, yv, { rtol: 0, atol: 0 }, "d/dx sum(x*y + 100*detach(x)) = y");
  for (const t of [x.grad!, x, y, z]) t.dispose();
});

Deno.test("noGrad records nothing and keeps no saved tensors; enableGrad re-enables inside it", () => {
  const x = M.randn([8], { seed: 3, requiresGrad: true });
  const before = memory().savedBytes;
  const y = noGrad(() => x.exp().mul(x).sum());
  assert.equal(y.requiresGrad, false);
  assert.equal(y.node, null);
  assert.equal(memory().savedBytes, before, "nothing saved under noGrad");
  assert.equal(M.isGradEnabled(), true);
  const z = noGrad(() => {
    assert.equal(M.isGradEnabled(), false);
    return M.enableGrad(() => x.exp());
  });
  assert.equal(z.requiresGrad, true, "enableGrad records inside noGrad");
  assert.throws(() => y.backward(), /does not require grad/);
  z.sum().backward();
  for (const t of [x, y, z, x.grad!]) t.dispose();
  assert.equal(memory().savedBytes, before);
});

Deno.test("noGrad and enableGrad refuse an async fn (after its await, ops recorded the graph unseen)", async () => {
  const x = M.randn([8], { seed: 3, requiresGrad: true });
  const before = memory().savedBytes;
  let resumed: Tensor | null = null;
  const late = Promise.withResolvers<void>();
  assert.throws(
    () =>
      noGrad(async () => {
        await late.promise;
        resumed = x.exp(); // runs after the refusal: it must not leave an unhandled rejection either
        throw new Error("fn failed after its await");
      }),
    /noGrad\(fn\) needs a synchronous fn/,
  );
  assert.equal(M.isGradEnabled(), true);
  assert.throws(() => noGrad(() => M.enableGrad(async () => {})), /enableGrad\(fn\) needs a synchronous fn/);
  assert.equal(M.isGradEnabled(), true);
  late.resolve();
  await new Promise((r) => setTimeout(r, 0)); // fn's rest has run (its error was not unhandled)
  assert.ok(resumed !== null);
  (resumed as Tensor).dispose();
  x.dispose();
  assert.equal(memory().savedBytes, before);
});

Deno.test("checkpoint: same gradients for the input and a parameter used inside, fewer saved bytes", async () => {
  const xr = rand([6, 16], 4), wr = rand([16, 16], 5, { low: -0.5, high: 0.5 }), br = rand([16], 6);
  const w = toTensor(wr, true), b = toTensor(br, true);
  const block = (x: Tensor) => x.matmul(w).add(b).silu().mul(x).tanh().square();
  const run = (useCheckpoint: boolean) => {
    const x = toTensor(xr, true);
    const saved0 = memory().savedBytes;
    const y = useCheckpoint ? checkpoint(block, x) : block(x);
    const loss = y.mul(y.exp()).sum();
    const savedBytes = memory().savedBytes - saved0;
    loss.backward();
    assert.equal(memory().savedBytes, saved0, "backward releases every saved tensor");
    const grads = [x.grad!, w.grad!, b.grad!];
    for (const t of [x, y, loss]) t.dispose();
    w.grad = null;
    b.grad = null;
    return { savedBytes, grads };
  };
  const direct = run(false);
  const ckpt = run(true);
  const [dx, dw, db, cx, cw, cb] = await readAll([...direct.grads, ...ckpt.grads]);
  assertClose(cx, dx, { rtol: 1e-6, atol: 1e-7 }, "checkpoint d/dx");
  assertClose(cw, dw, { rtol: 1e-6, atol: 1e-7 }, "checkpoint d/dw (parameter inside fn)");
  assertClose(cb, db, { rtol: 1e-6, atol: 1e-7 }, "checkpoint d/db (parameter inside fn)");
  assert.ok(
    ckpt.savedBytes < direct.savedBytes / 2,
    `checkpoint keeps ${ckpt.savedBytes} saved bytes, direct ${direct.savedBytes}`,
  );
  // And both against the float64 reference (finite differences through the whole block).
  await checkOps([{
    what: "checkpointed block vs float64 reference",
    inputs: [rand([3, 4], 7), rand([4, 4], 8)],
    gpu: ([x, u]) => checkpoint((t, v) => t.matmul(v).silu().mul(t), x, u),
    ref: ([x, u]) => {
      const a = matmulRef(x, u);
      return map2(map1(a, UNARY_REF.silu), x, (p, q) => p * q);
    },
  }, {
    what: "checkpoint with an input that does not require grad",
    inputs: [rand([3, 4], 9), rand([4], 10)],
    gpu: ([x, c]) => checkpoint((t, v) => t.mul(v).exp(), x, c),
    ref: ([x, c]) => map2(x, c, (p, q) => Math.exp(p * q)),
    grad: [true, false],
  }]);
  // Under noGrad, checkpoint just runs fn.
  const y = noGrad(() => checkpoint((t) => t.exp(), w));
  assert.equal(y.node, null);
  y.dispose();
  for (const t of [...direct.grads, ...ckpt.grads, w, b]) t.dispose();
});

// A custom op: y = a * x^3 with a hand-written backward dy/dx = 3 a x^2 (attrs carry a).
const cube = defineOp<{ a: number }>({
  name: "scaledCube",
  forward: ([x], { a }, save) => {
    save(x);
    return x.mul(x).mul(x).mul(a);
  },
  backward: (g, [x], _inputs, { a }) => [g.mul(x.square().mul(3 * a))],
});

// A two-input custom op: y = x * sigmoid(z), gradients for both inputs.
const gate = defineOp<null>({
  name: "gate",
  forward: ([x, z], _, save) => {
    const s = z.sigmoid();
    save(x, s);
    return x.mul(s);
  },
  backward: (g, [x, s]) => [g.mul(s), g.mul(x).mul(s).mul(s.neg().add(1))],
});

Deno.test("defineOp: custom ops with hand-written backward match finite differences", async () => {
  await checkOps([
    {
      what: "custom scaledCube",
      inputs: [rand([3, 5], 9)],
      gpu: ([x]) => cube([x], { a: -1.5 }),
      ref: ([x]) => map1(x, (v) => -1.5 * v ** 3),
    },
    {
      what: "custom gate(x, z) inside a larger graph",
      inputs: [rand([4, 3], 10), rand([4, 3], 11)],
      gpu: ([x, z]) => gate([x.tanh(), z], null).add(x),
      ref: ([x, z]) => map2(x, z, (u, v) => Math.tanh(u) * UNARY_REF.sigmoid(v) + u),
    },
    {
      what: "custom gate with only z requiring grad",
      inputs: [rand([4, 3], 12), rand([4, 3], 13)],
      gpu: ([x, z]) => gate([x, z], null),
      ref: ([x, z]) => map2(x, z, (u, v) => u * UNARY_REF.sigmoid(v)),
      grad: [false, true],
    },
  ]);
  // The custom op records one node with its name, and saves what it asked for.
  const x = M.randn([2], { seed: 5, requiresGrad: true });
  const y = cube([x], { a: 2 });
  assert.equal(y.node?.name, "scaledCube");
  assert.equal(y.node?.saved.length, 1);
  assert.ok(memory().savedBytes > 0);
  y.sum().backward();
  for (const t of [x, y, x.grad!]) t.dispose();
});

Deno.test("backward: clear errors for a non-scalar without gradient, a wrong gradient shape, no grad", () => {
  const x = M.randn([2, 3], { seed: 6, requiresGrad: true });
  const y = x.mul(2);
  assert.throws(() => y.backward(), /backward\(\) without a gradient needs a scalar, got shape \[2, 3\]/);
  assert.throws(
    () => backward(y, M.ones([3, 2])),
    /gradient shape \[3, 2\] differs from tensor shape \[2, 3\]/,
  );
  const gi = M.ones([2, 3], { dtype: "i32" });
  assert.throws(() => backward(y, gi), /backward\(\): gradient dtype i32 differs from tensor dtype f32/);
  gi.dispose();
  const gone = M.ones([2, 3]);
  gone.dispose();
  assert.throws(
    () => backward(y, gone),
    /backward\(\): the gradient given for Tensor\(\[2, 3\].* was disposed/,
  );
  const c = M.ones([2]);
  assert.throws(() => c.sum().backward(), /does not require grad/);
  assert.throws(() => M.ones([2], { dtype: "i32" }).requiresGrad_(), /only f32 tensors can require grad/);
  y.sum().backward();
  // A .grad disposed without being set to null is named (it read "add: Tensor#.. was disposed").
  x.grad!.dispose();
  assert.throws(
    () => x.mul(3).sum().backward(),
    /backward: the \.grad of Tensor\(\[2, 3\], f32, requiresGrad\) was disposed but not set to null \(zeroGrad\(\) does both/,
  );
  x.grad = null;
  for (const t of [x, y, c]) t.dispose();
});

Deno.test("backward twice: retainGraph allows it; otherwise a clear error, no silent wrong result", async () => {
  const xr = nd([1, -2, 3], [3]);
  const x = toTensor(xr, true);
  const y = x.square().sum();
  backward(y, undefined, { retainGraph: true });
  y.backward(undefined, { retainGraph: true }); // the method takes the option too (the error below names it)
  backward(y);
  assertClose(
    await x.grad!.toArray(),
    map1(xr, (v) => 6 * v),
    {},
    "three backward passes through a retained graph",
  );
  assert.throws(() => y.backward(), /already|released|retainGraph/);
  assert.equal(y.grad, null, "the released output did not turn into a leaf with its own .grad");
  // An intermediate of a released graph, used again in a new graph, is an error too (as in PyTorch).
  const h = x.exp();
  tidy(() => h.sum().backward());
  const l2 = h.mul(h).sum();
  assert.throws(() => l2.backward(), /graph through 'exp'.*already released/);
  for (const t of [x, y, x.grad!, h, l2]) t.dispose();
  assert.equal(memory().savedBytes, 0);
});

Deno.test("backward through a value returned from tidy names tidy as the cause, not an earlier backward", () => {
  const x = M.randn([3], { seed: 8, requiresGrad: true });
  const loss = tidy(() => x.exp().mul(2).sum());
  assert.throws(() => loss.backward(), /was already released when the tidy\(\) scope that made it ended/);
  for (const t of [x, loss]) t.dispose();
  assert.equal(memory().savedBytes, 0);
});

Deno.test("tidy that returns an op's output keeps what its node made for the backward (logsumexp, rmsNorm, 1-D matmul)", async () => {
  const x = toTensor(rand([2, 3], 41), true), w = toTensor(rand([3], 42), true);
  const v = toTensor(rand([2], 43), true);
  const before = memory();
  const gradsOf = async (y: Tensor) => {
    tidy(() => y.sum().backward());
    y.dispose();
    const leaves = [x, w, v].filter((t) => t.grad);
    const out = await readAll(leaves.map((t) => t.grad!));
    for (const t of leaves) {
      t.grad!.dispose();
      t.grad = null;
    }
    return out;
  };
  for (const op of [() => M.logsumexp(x, 1), () => M.rmsNorm(x, w, 1e-5), () => M.matmul(v, x)]) {
    const direct = await gradsOf(op());
    assert.deepEqual(await gradsOf(tidy(op)), direct, `${op}`);
  }
  const after = memory();
  assert.deepEqual([after.liveTensors, after.savedBytes], [before.liveTensors, before.savedBytes]);
  for (const t of [x, w, v]) t.dispose();
});

Deno.test("checkpoint of a function whose input needs no grad but a weight it reads does: the weight gets its gradient", async () => {
  await setup();
  // what a layer with recompute sees when its input is data: the weights are leaves read inside fn
  const c = tensor([4, 5, 6]);
  const w = tensor([1, 2, 3], [3], { requiresGrad: true });
  const y = checkpoint((a) => a.mul(w).sum(), c);
  assert.equal(y.requiresGrad, true);
  y.backward();
  assert.deepEqual([...await w.grad!.toArray()], [4, 5, 6]);
  dispose([c, w, w.grad!, y]);
});

Deno.test("checkpoint of a function that returns its input: the input keeps its own graph", async () => {
  const x = M.ones([3], { requiresGrad: true });
  const h = x.mul(3); // h's node (mul) must survive: checkpoint's output is a tensor of its own
  const y = checkpoint((t) => t, h);
  assert.notEqual(y, h);
  y.sum().backward();
  assert.deepEqual([...await x.grad!.toArray()], [3, 3, 3]);
  for (const t of [x, x.grad!, h, y]) t.dispose();
});

Deno.test("checkpoint of a function that returns a tensor it did not make (captured, or from a nested checkpoint) returns a new one", async () => {
  const c = M.ones([3], { requiresGrad: true }), p = M.ones([3], { requiresGrad: true });
  // a nested checkpoint runs under the outer first pass's noGrad, where it returns fn's result as is: c
  const nested = checkpoint(() => checkpoint((t) => t, c), p);
  const captured = checkpoint(() => c, p);
  for (const y of [nested, captured]) {
    assert.notEqual(y, c);
    assert.equal(c.node, null, "the leaf got no node");
    y.sum().backward();
  }
  assert.deepEqual([...await c.grad!.toArray()], [2, 2, 2]);
  assert.equal(p.grad, null, "neither output depends on p");
  for (const t of [c, c.grad!, p, nested, captured]) t.dispose();
});

Deno.test("checkpoint of a function that reads an intermediate that requires grad: its gradient goes on through that intermediate's graph", async () => {
  const w = M.tensor([1, 2, 3], undefined, { requiresGrad: true });
  const x = M.tensor([1, 1, 1], undefined, { requiresGrad: true });
  const before = memory();
  /** Runs backward of loss(h) with h = 2w; returns w's and x's gradients. */
  const grads = async (loss: (h: Tensor) => Tensor) => {
    const h = w.mul(2);
    tidy(() => loss(h).backward());
    assert.equal(h.grad, null, "the intermediate is no leaf");
    h.dispose();
    assert.equal(memory().savedBytes, before.savedBytes, "nothing left saved");
    const out = await Promise.all([w.grad, x.grad].map(async (g) => g ? [...await g.toArray()] : null));
    for (const t of [w, x]) {
      t.grad?.dispose();
      t.grad = null;
    }
    return out;
  };
  // sum(x * h) + sum(h): d/dh = x + 1 = 2, so d/dw = 4; d/dx = h
  assert.deepEqual(await grads((h) => checkpoint((t) => t.mul(h), x).sum().add(h.sum())), [[4, 4, 4], [
    2,
    4,
    6,
  ]]);
  // sum(h * h), h read as the input and by closure: d/dw = 2 * 2h
  assert.deepEqual(await grads((h) => checkpoint((t) => t.mul(h), h).sum()), [[8, 16, 24], null]);
  // a nested checkpoint that captures it
  assert.deepEqual(
    await grads((h) => checkpoint((t) => checkpoint((u) => u.mul(h), t), x).sum()),
    [[2, 2, 2], [2, 4, 6]],
  );
  // a function that returns it
  assert.deepEqual(await grads((h) => checkpoint(() => h, x).sum()), [[2, 2, 2], null]);
  // a function that reads it in the rerun only: a clear error
  let runs = 0;
  const h = w.mul(2);
  const y = checkpoint((t) => runs++ ? t.mul(h) : t.exp(), x);
  assert.throws(
    () => tidy(() => y.sum().backward()),
    /rerun of its function read .* which its first run did not read/,
  );
  for (const t of [h, y]) t.dispose();
  w.grad?.dispose();
  x.grad?.dispose();
  const after = memory();
  assert.deepEqual([after.liveTensors, after.savedBytes], [before.liveTensors, before.savedBytes]);
  for (const t of [w, x]) t.dispose();
});

Deno.test("a backward that uses a saved tensor disposed by the caller fails with a clear error", () => {
  const x = M.randn([3], { seed: 7, requiresGrad: true });
  const y = x.exp(); // saves its output
  const loss = y.sum();
  y.dispose();
  assert.throws(() => loss.backward(), /a tensor saved by 'exp' was disposed before backward/);
  for (const t of [x, loss]) t.dispose();
});

Deno.test("a backward that throws leaks nothing: its gradients are freed, and so is the graph once disposed", () => {
  const x = M.tensor([[1, 2, 3]], undefined, { requiresGrad: true });
  const before = memory();
  const h = M.logsumexp(x, 1); // its node owns two tensors
  const y = h.exp(); // saves y
  const loss = y.sum();
  h.dispose();
  y.dispose();
  assert.throws(() => loss.backward(), /a tensor saved by 'exp' was disposed before backward/);
  assert.equal(h.node, null, "a disposed tensor whose consumers are gone loses its node");
  assert.throws(() => loss.backward(), /already released by an earlier backward\(\) that threw part-way/);
  loss.dispose();
  const after = memory();
  assert.deepEqual(
    [after.liveTensors, after.liveBytes, after.savedBytes],
    [before.liveTensors, before.liveBytes, before.savedBytes],
    "back to where it started",
  );
  x.dispose();
});

/** Float64 references used above must agree with themselves (helps keep the oracles honest). */
Deno.test("float64 reference sanity: matmulRef and map helpers on a hand-computed case", () => {
  const a: Nd = nd([1, 2, 3, 4], [2, 2]);
  const b: Nd = nd([5, 6, 7, 8], [2, 2]);
  assert.deepEqual([...matmulRef(a, b).data], [19, 22, 43, 50]);
  assert.deepEqual([...matmulRef(a, b, { transA: true }).data], [26, 30, 38, 44]);
  assert.deepEqual([...map2(a, nd([10, 20], [2]), (p, q) => p + q).data], [11, 22, 13, 24]);
});

/** A toy op with `replay` (as fusedMambaScanOut): out = 2 exp(x), whose backward reads only exp(x), which it
 * keeps for a checkpoint's rerun; counts how often its forward and replay run. */
function replayableExp() {
  const runs = { forward: 0, replay: 0 };
  const op = defineOp<Record<string, never>>({
    name: "twoExp",
    forward: ([x], _a, save, keep) => {
      runs.forward++;
      const e = M.exp(x); // e: what the backward reads
      save(e);
      keep?.(e);
      return M.mul(e, 2);
    },
    replay: ([x], _a, [e], save) => {
      runs.replay++;
      save(e);
      return M.Tensor.hollow(x.shape);
    },
    backward: (g, [e]) => [M.mul(M.mul(g, e), 2)],
  });
  return { runs, twoExp: (x: Tensor) => op([x], {}) };
}

Deno.test("checkpoint replays an op with `replay`: its forward runs once, gradients as without checkpoint, what it kept counted and freed; checkpointInputsOnly keeps nothing and runs it again", async () => {
  const { runs, twoExp } = replayableExp();
  const xr = rand([5, 7], 31);
  const grads = async (useCheckpoint: boolean | "inputsOnly", retain = false) => {
    const live0 = memory().liveBytes;
    const x = toTensor(xr, true);
    const fn = (u: Tensor) => twoExp(u.mul(3).tanh()); // tanh runs again in the rerun
    const saved0 = memory().savedBytes;
    const keptBytes = tidy(() => {
      const y = useCheckpoint === "inputsOnly"
        ? checkpointInputsOnly(fn, x)
        : useCheckpoint
        ? checkpoint(fn, x)
        : fn(x);
      const kept = memory().savedBytes - saved0;
      const loss = y.mul(y).sum();
      loss.backward(undefined, { retainGraph: retain });
      if (retain) loss.backward(); // the second rerun replays from the same kept tensors: twice the gradient
      return kept;
    });
    assert.equal(memory().savedBytes, saved0, "the backward releases what the first pass kept");
    const g = await x.grad!.toArray();
    const unit = x.storage.size; // bytes of a (5, 7) buffer, as the pool rounds them
    dispose([x, x.grad!]);
    assert.equal(memory().liveBytes, live0, "nothing stays live");
    return { g, keptBuffers: keptBytes / unit };
  };
  const direct = await grads(false);
  assert.deepEqual(runs, { forward: 1, replay: 0 });
  const ckpt = await grads(true);
  assert.deepEqual(runs, { forward: 2, replay: 1 }, "the rerun replays instead of running the forward");
  assert.equal(
    ckpt.keptBuffers,
    2,
    "the checkpoint saves its input and what the op kept, a (5, 7) buffer each",
  );
  assertClose(ckpt.g, direct.g, { rtol: 1e-6, atol: 1e-7 }, "checkpoint with replay d/dx");
  const twice = await grads(true, true);
  assert.deepEqual(runs, { forward: 3, replay: 3 });
  assertClose(twice.g, direct.g.map((v) => 2 * v), { rtol: 1e-6, atol: 1e-7 }, "retained graph, twice");
  // checkpointInputsOnly: the op keeps nothing and runs its forward again in the rerun
  const inputsOnly = await grads("inputsOnly");
  assert.deepEqual(runs, { forward: 5, replay: 3 }, "the rerun runs the forward, not replay");
  assert.equal(inputsOnly.keptBuffers, 1, "checkpointInputsOnly saves its input alone");
  assert.deepEqual(inputsOnly.g, ckpt.g, "the same gradient as checkpoint's, bit for bit");
  const twiceInputsOnly = await grads("inputsOnly", true);
  assert.deepEqual(runs, { forward: 8, replay: 3 });
  assert.deepEqual(twiceInputsOnly.g, twice.g, "retained graph, twice, bit for bit");
});

Deno.test("savesForLater: true where an op's saved or kept tensors wait for a later backward; false under noGrad, without inputs needing grad, and in a checkpoint's rerun. savesForBackward: true wherever a backward or a replay reads them, the rerun too", () => {
  const seen: boolean[] = [];
  const read: boolean[] = [];
  const op = defineOp<Record<string, never>>({
    name: "asks",
    forward: ([x], _a, save, keep) => {
      seen.push(M.savesForLater());
      read.push(M.savesForBackward());
      const e = M.exp(x);
      save(e);
      keep?.(e);
      return M.mul(e, 2);
    },
    replay: ([x], _a, [e], save) => {
      save(e);
      return M.Tensor.hollow(x.shape);
    },
    backward: (g, [e]) => [M.mul(M.mul(g, e), 2)],
  });
  // a plain op: asks in its forward only
  const plain = defineOp<Record<string, never>>({
    name: "asksPlain",
    forward: ([x], _a, save) => {
      seen.push(M.savesForLater());
      read.push(M.savesForBackward());
      save(x);
      return M.mul(x, x);
    },
    backward: (g, [x]) => [M.mul(M.mul(g, x), 2)],
  });
  const x = tensor([0.5, -1], [2]).requiresGrad_();
  const c = tensor([1, 2], [2]);
  tidy(() => {
    op([x], {}).sum().backward(); // recorded: true
    noGrad(() => op([x], {})); // false
    op([c], {}); // no input needs grad: false
    // a checkpoint's first pass keeps for its replay (true); its rerun replays, its forward does not run
    checkpoint((u) => op([u], {}), x).sum().backward();
    // checkpointInputsOnly: the first pass saves nothing (false), the rerun's forward feeds a backward that
    // follows at once (false)
    checkpointInputsOnly((u) => plain([u], {}), x).sum().backward();
    plain([x], {}); // true again after the reruns
  });
  assert.deepEqual(seen, [true, false, false, true, false, false, true]);
  // the same calls: a checkpointInputsOnly's first pass feeds no backward, its rerun one that follows at once
  assert.deepEqual(read, [true, false, false, true, false, true, true]);
  assert.equal(M.savesForLater(), false, "outside a forward");
  assert.equal(M.savesForBackward(), false, "outside a forward");
  dispose([x, x.grad!, c]);
});

Deno.test("checkpoint replay: an op reading a replayed output, or a rerun running other ops, throws; no grad or a nested checkpoint computes", async () => {
  const { runs, twoExp } = replayableExp();
  const x = toTensor(rand([4, 3], 32), true);
  // the replayed output holds no values (hollow): only the function's result may come from it
  const read = checkpoint((u) => twoExp(u).add(1), x);
  assert.throws(
    () => read.sum().backward(),
    /checkpoint: 'add' read Tensor\(\[4, 3\].*the output of an op that the rerun replays/,
  );
  // ... nor a checkpoint inside the rerun (under noGrad the op computes: its output gets no node)
  const inner = checkpoint((u) => checkpoint((v) => v.add(1), twoExp(u)), x);
  assert.throws(() => inner.sum().backward(), /checkpoint: 'checkpoint' read Tensor\(\[4, 3\]/);
  // keep takes only tensors the op made: not an input
  const keepsInput = defineOp<Record<string, never>>({
    name: "keepsInput",
    forward: ([t], _a, _save, keep) => {
      keep?.(t);
      return M.mul(t, 2);
    },
    replay: ([t]) => M.Tensor.hollow(t.shape),
    backward: (g) => [M.mul(g, 2)],
  });
  assert.throws(
    () => checkpoint((u) => keepsInput([u], {}), x),
    /keepsInput: keep takes tensors the op made/,
  );
  // replay must return a hollow tensor (no values to read by mistake); nothing leaks when it does not
  const notHollow = defineOp<Record<string, never>>({
    name: "notHollow",
    forward: ([t], _a, _save, keep) => {
      const h = M.mul(t, 3); // kept: the rerun makes a view of it
      if (keep) keep(h);
      else h.dispose();
      return M.mul(t, 2);
    },
    replay: ([t]) => M.Tensor.empty(t.shape),
    backward: (g) => [M.mul(g, 2)],
  });
  const live = [memory().liveBytes, memory().liveTensors];
  const nh = checkpoint((u) => notHollow([u], {}), x);
  const nhSum = nh.sum();
  assert.throws(() => nhSum.backward(), /notHollow: replay must return Tensor.hollow\(shape\), got Tensor/);
  dispose([nh, nhSum]);
  assert.deepEqual([memory().liveBytes, memory().liveTensors], live, "nothing left by the failed rerun");
  // a hollow tensor: any read throws, naming it
  const hollow = M.Tensor.hollow([2, 3]);
  assert.ok(hollow.hollow && !hollow.disposed);
  await assert.rejects(() => hollow.toArray(), /Tensor#\d+ \[2, 3\] f32 holds no values \(Tensor.hollow/);
  assert.throws(() => M.add(hollow, 1), /holds no values/);
  hollow.dispose();
  assert.ok(hollow.disposed);
  // a rerun that runs other ops than the first pass (here a replayable op less)
  let first = true;
  const differs = checkpoint((u) => {
    const y = first ? twoExp(twoExp(u)) : twoExp(u);
    first = false;
    return y;
  }, x);
  assert.throws(
    () => differs.sum().backward(),
    /checkpoint: the rerun called 1 replayable ops where the first pass called 2/,
  );
  // an input that needs no gradient: the op records no node, so the rerun computes its output (read by mul)
  const c = toTensor(rand([4, 3], 33), false);
  const before = runs.forward;
  const mixed = checkpoint((u) => twoExp(c).mul(u), x);
  x.grad?.dispose();
  x.grad = null;
  mixed.sum().backward();
  assert.equal(runs.forward, before + 2, "computed in both passes");
  assertClose(
    await x.grad!.toArray(),
    (await c.toArray()).map((v) => 2 * Math.exp(v)),
    { rtol: 1e-5 },
    "d/dx",
  );
  // nested: the inner checkpoint keeps for its own rerun, which runs inside the outer's
  x.grad!.dispose();
  x.grad = null;
  const r = runs.replay;
  const nested = checkpoint((u) => checkpoint((v) => twoExp(v), u.mul(2)), x);
  nested.sum().backward();
  assert.equal(runs.replay, r + 1, "the inner rerun replays");
  const xv = await x.toArray();
  assertClose(await x.grad!.toArray(), xv.map((v) => 4 * Math.exp(2 * v)), { rtol: 1e-5 }, "nested d/dx");
  dispose([x, c, read, inner, differs, mixed, nested, x.grad!]);
});

Deno.test("backward gives no .grad to a leaf disposed before it: the gradient is freed, the other leaves get theirs", async () => {
  const x = M.randn([4, 8], { seed: 2, requiresGrad: true });
  const before = memory();
  for (let i = 0; i < 5; i++) {
    const b = M.randn([8], { seed: 1, requiresGrad: true });
    const y = x.add(b); // add saves neither operand: b can go before the backward
    const s = y.sum();
    b.dispose();
    s.backward();
    assert.equal(b.grad, null); // it got a kept .grad that nothing freed
    dispose([y, s]);
  }
  assert.deepEqual(await x.grad!.toArray(), new Float32Array(32).fill(5));
  x.grad!.dispose();
  x.grad = null;
  const after = memory();
  assert.equal(after.liveTensors, before.liveTensors);
  assert.equal(after.liveBytes, before.liveBytes);
  x.dispose();
});
