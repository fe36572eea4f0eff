import assert from "node:assert/strict";
import * as M from "./library.ts";
import { tensor } from "../mod.ts";
import {
  checkOps,
  crossEntropyRef,
  logSoftmaxRef,
  nd,
  ndInt,
  type OpCase,
  rand,
  randInts,
  setup,
  softmaxRef,
} from "./helpers.ts";

await setup();

/** Runs `fn` with the row kernels of this device (one subgroup per row where subgroups have one size, as on
 * lavapipe), then, if that was the subgroup flavour, with subgroups hidden: a workgroup of 64 per row. */
async function bothFlavours(fn: () => Promise<void>): Promise<void> {
  const info = await M.init();
  await fn();
  const real = info.subgroups;
  if (!real) return;
  info.subgroups = null;
  try {
    await fn();
  } finally {
    info.subgroups = real;
  }
}

Deno.test("softmax and logSoftmax over last, first and middle axes: forward and gradients (both row-kernel flavours)", () =>
  bothFlavours(async () => {
    const cases: OpCase[] = [];
    const shapes: [number[], number][] = [
      [[7, 13], -1],
      [[7, 13], 0],
      [[3, 4, 5], 1],
      [[3, 4, 5], 2],
      [[9], 0],
      [[2, 1, 3], 1],
    ];
    shapes.forEach(([shape, axis], k) => {
      const x = rand(shape, 10 + k, { low: -3, high: 3 });
      cases.push(
        {
          what: `softmax [${shape}] axis ${axis}`,
          inputs: [x],
          gpu: ([t]) => M.softmax(t, axis),
          ref: ([t]) => softmaxRef(t, axis),
        },
        {
          what: `logSoftmax [${shape}] axis ${axis}`,
          inputs: [x],
          gpu: ([t]) => t.logSoftmax(axis),
          ref: ([t]) => logSoftmaxRef(t, axis),
        },
      );
    });
    cases.push(
      {
        what: "softmax method, default axis",
        inputs: [rand([4, 6], 30)],
        gpu: ([t]) => t.softmax(),
        ref: ([t]) => softmaxRef(t, -1),
      },
      {
        what: "softmax over a row of 5000 (longer than the workgroup)",
        inputs: [rand([2, 5000], 31, { low: -5, high: 5 })],
        gpu: ([t]) => M.softmax(t),
        ref: ([t]) => softmaxRef(t),
        grad: false,
      },
      {
        what: "softmax over a strided axis of 5000 ([5000, 3], axis 0)",
        inputs: [rand([5000, 3], 33, { low: -5, high: 5 })],
        gpu: ([t]) => M.softmax(t, 0),
        ref: ([t]) => softmaxRef(t, 0),
        // d/dx = y * (g - sum(g * y)), analytic: finite differences over 15000 inputs are too slow.
        refGrad: ([t], G) => {
          const y = softmaxRef(t, 0);
          const s = [0, 0, 0];
          y.data.forEach((v, i) => (s[i % 3] += v * G.data[i]));
          return [{ data: y.data.map((v, i) => v * (G.data[i] - s[i % 3])), shape: y.shape }];
        },
      },
      {
        what: "logSoftmax over a row of 5000",
        inputs: [rand([2, 5000], 32, { low: -5, high: 5 })],
        gpu: ([t]) => M.logSoftmax(t),
        ref: ([t]) => logSoftmaxRef(t),
        grad: false,
      },
    );
    await checkOps(cases);
  }));

Deno.test("softmax/logSoftmax are stable for logits of magnitude 1000 (both row-kernel flavours)", () =>
  bothFlavours(async () => {
    await checkOps([
      {
        what: "softmax of logits near 1000",
        inputs: [rand([3, 8], 40, { low: 997, high: 1003 })],
        gpu: ([t]) => M.softmax(t),
        ref: ([t]) => softmaxRef(t),
      },
      {
        what: "logSoftmax of logits near -1000",
        inputs: [rand([3, 8], 41, { low: -1003, high: -997 })],
        gpu: ([t]) => M.logSoftmax(t),
        ref: ([t]) => logSoftmaxRef(t),
      },
      {
        what: "softmax of [1000, -1000, 0]",
        inputs: [nd([1000, -1000, 0, -1000, 1000, 999], [2, 3])],
        gpu: ([t]) => M.softmax(t),
        ref: ([t]) => softmaxRef(t),
      },
      {
        what: "logSoftmax of [1000, -1000, 0]",
        inputs: [nd([1000, -1000, 0, -1000, 1000, 999], [2, 3])],
        gpu: ([t]) => M.logSoftmax(t),
        ref: ([t]) => logSoftmaxRef(t),
      },
    ]);
  }));

Deno.test("crossEntropy: reductions mean/sum/none, ignoreIndex, 1-D to 3-D logits, large logits; forward and gradients (both row-kernel flavours)", () =>
  bothFlavours(async () => {
    const logits = rand([6, 9], 50, { low: -3, high: 3 });
    const targets = ndInt([3, -100, 0, 8, 5, 3], [6]);
    const cases: OpCase[] = [];
    for (const reduction of ["mean", "sum", "none"] as const) {
      cases.push({
        what: `crossEntropy ${reduction} with an ignored target`,
        inputs: [logits, targets],
        gpu: ([x, t]) => M.crossEntropy(x, t, { reduction }),
        ref: ([x, t]) => crossEntropyRef(x, t, { reduction }),
      });
      cases.push({
        what: `crossEntropy ${reduction}, ignoreIndex 3`,
        inputs: [logits, targets.data.includes(-100) ? ndInt([3, 1, 0, 8, 5, 3], [6]) : targets],
        gpu: ([x, t]) => M.crossEntropy(x, t, { reduction, ignoreIndex: 3 }),
        ref: ([x, t]) => crossEntropyRef(x, t, { reduction, ignoreIndex: 3 }),
      });
      cases.push({
        what: `crossEntropy ${reduction} of [2,3,9] logits`,
        inputs: [rand([2, 3, 9], 51), ndInt(randInts(6, 52, 0, 8), [2, 3])],
        gpu: ([x, t]) => M.crossEntropy(x, t, { reduction }),
        ref: ([x, t]) => crossEntropyRef(x, t, { reduction }),
      });
      cases.push({
        what: `crossEntropy ${reduction} of logits near 1000`,
        inputs: [rand([4, 9], 53, { low: 995, high: 1005 }), ndInt([0, 8, 4, 4], [4])],
        gpu: ([x, t]) => M.crossEntropy(x, t, { reduction }),
        ref: ([x, t]) => crossEntropyRef(x, t, { reduction }),
      });
    }
    cases.push({
      what: "crossEntropy of a single row [9] with a 0-d target",
      inputs: [rand([9], 54), ndInt([2], [])],
      gpu: ([x, t]) => M.crossEntropy(x, t),
      ref: ([x, t]) => crossEntropyRef(x, t),
    });
    cases.push({
      what: "crossEntropy with one-sided extreme logits (loss 2000 for the wrong class)",
      inputs: [nd([1000, -1000, 0, 0, 1000, -1000], [2, 3]), ndInt([1, 2], [2])],
      gpu: ([x, t]) => M.crossEntropy(x, t, { reduction: "none" }),
      ref: ([x, t]) => crossEntropyRef(x, t, { reduction: "none" }),
    });
    cases.push({
      what: "crossEntropy over a vocabulary of 5000",
      inputs: [rand([3, 5000], 55, { low: -4, high: 4 }), ndInt([0, 4999, 2500], [3])],
      gpu: ([x, t]) => M.crossEntropy(x, t),
      ref: ([x, t]) => crossEntropyRef(x, t),
      // d/dx = (softmax - onehot) * g / count, analytic: finite differences over 15000 inputs are too slow.
      refGrad: ([x, t], G) => {
        const p = softmaxRef(x);
        const g = p.data.map((v, i) =>
          (v - (t.data[Math.floor(i / 5000)] === i % 5000 ? 1 : 0)) * G.data[0] / 3
        );
        return [{ data: g, shape: x.shape }, null];
      },
    });
    await checkOps(cases);
  }));

Deno.test("crossEntropy: targets out of range give NaN; bad targets and an unknown reduction are rejected", async () => {
  const x = tensor([[1, 2, 3], [0, 0, 0]]);
  const loss = M.crossEntropy(x, tensor(new Int32Array([3, 0])), { reduction: "none" });
  const v = await loss.toArray();
  assert.ok(Number.isNaN(v[0]), `target 3 of 3 classes gives NaN, got ${v[0]}`);
  assert.ok(Math.abs(v[1] - Math.log(3)) < 1e-6);
  assert.throws(() => M.crossEntropy(x, tensor([0, 1])), /targets must be i32, got f32/);
  assert.throws(
    () => M.crossEntropy(x, tensor(new Int32Array([0, 1, 2]))),
    /logits \[2, 3\] need targets of shape \[2\], got \[3\]/,
  );
  assert.throws(() => M.softmax(tensor(new Int32Array([1, 2]))), /softmax needs an f32 tensor, got i32/);
  // an unknown reduction is named, not taken as the mean
  assert.throws(
    () => M.crossEntropy(x, tensor(new Int32Array([0, 1])), { reduction: "avg" as "mean" }),
    /crossEntropy: reduction must be "mean", "sum" or "none", got "avg"/,
  );
  // PyTorch's spellings and options this one lacks are named, not dropped (the plain mean came out)
  for (const key of ["ignore_index", "label_smoothing", "weight"]) {
    assert.throws(
      () => M.crossEntropy(x, tensor(new Int32Array([0, 1])), { [key]: 0 } as never),
      new RegExp(`crossEntropy: unknown option '${key}' \\(options are ignoreIndex, reduction\\)`),
    );
  }
  for (const t of [x, loss]) t.dispose();
});

Deno.test("crossEntropy: every target ignored gives NaN for the mean (as PyTorch), 0 for the sum; zero gradients", async () => {
  for (const [reduction, want] of [["mean", NaN], ["sum", 0]] as const) {
    const x = M.randn([3, 4], { seed: 60, requiresGrad: true });
    const t = tensor(new Int32Array([-100, -100, -100]));
    const loss = M.crossEntropy(x, t, { reduction });
    assert.ok(Object.is(await loss.item(), want), `${reduction}: ${await loss.item()}, want ${want}`);
    loss.backward();
    assert.deepEqual([...await x.grad!.toArray()], new Array(12).fill(0), `${reduction} gradient`);
    for (const u of [x, x.grad!, t, loss]) u.dispose();
  }
  // One row counted among ignored ones: the mean is that row's loss.
  const x = tensor([[1, 2, 3], [0, 0, 0]]);
  const loss = M.crossEntropy(x, tensor(new Int32Array([-100, 1])));
  assert.ok(Math.abs(await loss.item() - Math.log(3)) < 1e-6);
  for (const u of [x, loss]) u.dispose();
});

Deno.test("crossEntropy: ignoreIndex must be an int32 integer; any such value works (a uniform, not WGSL source)", async () => {
  const x = tensor([[1, 2, 3], [0, 0, 0]]);
  const t = tensor(new Int32Array([2, 1]));
  for (const bad of [1.5, NaN, Infinity, 2 ** 31, -(2 ** 31) - 1]) {
    assert.throws(
      () => M.crossEntropy(x, t, { ignoreIndex: bad }),
      new RegExp(`crossEntropy: ignoreIndex must be an int32 integer, got ${bad}`),
    );
  }
  // Extreme ignore values, in the forward and the gradient: the ignored row counts for nothing.
  for (const ignore of [2 ** 31 - 1, -(2 ** 31), 16777217]) {
    const xs = M.randn([2, 3], { seed: 61, requiresGrad: true });
    const ts = tensor(new Int32Array([ignore, 1]));
    const loss = M.crossEntropy(xs, ts, { ignoreIndex: ignore });
    loss.backward();
    const xv = await xs.toArray();
    const p = [...xv.slice(3)].map(Math.exp);
    const z = p.reduce((a, b) => a + b);
    assert.ok(Math.abs(await loss.item() - (Math.log(z) - xv[4])) < 1e-5, `ignore ${ignore}: loss`);
    const want = [0, 0, 0, p[0] / z, p[1] / z - 1, p[2] / z];
    const got = await xs.grad!.toArray();
    want.forEach((w, i) =>
      assert.ok(Math.abs(got[i] - w) < 1e-6, `ignore ${ignore}: grad[${i}] ${got[i]} vs ${w}`)
    );
    for (const u of [xs, xs.grad!, ts, loss]) u.dispose();
  }
  for (const u of [x, t]) u.dispose();
});

Deno.test("crossEntropy leaves no tensor behind outside tidy, for every reduction, with and without backward", async () => {
  for (const reduction of ["none", "sum", "mean"] as const) {
    for (const grad of [false, true]) {
      const before = M.memory();
      const x = M.randn([4, 5], { seed: 62, requiresGrad: grad });
      const t = tensor(new Int32Array([0, 1, -100, 3]));
      const loss = M.crossEntropy(x, t, { reduction });
      await loss.toArray();
      const made: M.Tensor[] = [x, t, loss];
      if (grad) {
        const s = loss.sum();
        s.backward();
        made.push(s, x.grad!);
      }
      for (const u of made) u.dispose();
      const after = M.memory();
      assert.equal(after.liveTensors, before.liveTensors, `${reduction}, grad ${grad}: live tensors`);
      assert.equal(after.liveBytes, before.liveBytes, `${reduction}, grad ${grad}: live bytes`);
      assert.equal(after.savedBytes, before.savedBytes, `${reduction}, grad ${grad}: saved bytes`);
    }
  }
});

Deno.test("softmax/logSoftmax/crossEntropy: rows past the row kernels' loop limit are exact (both row-kernel flavours)", () =>
  bothFlavours(async () => {
    // The first lengths past the 64-lane kernels' 65535 loop trips (3 walks of R / 64 for softmax, 2 for
    // cross-entropy): software adapters stop such kernels silently, so these rows take the reductions.
    const pattern = (n: number) => Float32Array.from({ length: n }, (_, i) => ((i * 7919) % 13) * 0.25 - 1.5);
    const logSumExp = (v: Float32Array) => {
      let m = -Infinity, z = 0;
      for (const a of v) m = Math.max(m, a);
      for (const a of v) z += Math.exp(a - m);
      return m + Math.log(z);
    };
    const R = 64 * 21840, rows = 2; // strided: the rows are the columns of an (R, 2) tensor
    const host = pattern(R * rows);
    const cols = [0, 1].map((c) => host.filter((_, i) => i % rows === c));
    const lse = cols.map(logSumExp);
    const x = tensor(host, [R, rows]);
    const [sm, lsm] = [M.softmax(x, 0), M.logSoftmax(x, 0)];
    const [s, l] = [await sm.toArray(), await lsm.toArray()];
    const want = Float64Array.from(host, (v, i) => v - lse[i % rows]);
    let worstS = 0, worstL = 0;
    for (let i = 0; i < host.length; i++) {
      worstS = Math.max(worstS, Math.abs(s[i] - Math.exp(want[i])) / Math.exp(want[i]));
      worstL = Math.max(worstL, Math.abs(l[i] - want[i]));
    }
    assert.ok(worstS < 1e-4, `softmax over ${R}: worst relative error ${worstS}`);
    assert.ok(worstL < 1e-4, `logSoftmax over ${R}: worst error ${worstL}`);

    const V = 64 * 32761;
    const logits = pattern(V);
    const xl = tensor(logits, [1, V], { requiresGrad: true });
    const t = tensor(new Int32Array([V - 3]));
    const loss = M.crossEntropy(xl, t);
    const want0 = logSumExp(logits) - logits[V - 3];
    const got0 = await loss.item();
    assert.ok(Math.abs(got0 - want0) < 1e-4, `crossEntropy over ${V}: ${got0}, want ${want0}`);
    loss.backward();
    const g = await xl.grad!.toArray();
    const lz = logSumExp(logits);
    let worstG = 0;
    for (let i = 0; i < V; i++) {
      worstG = Math.max(worstG, Math.abs(g[i] - (Math.exp(logits[i] - lz) - (i === V - 3 ? 1 : 0))));
    }
    assert.ok(worstG < 1e-6, `crossEntropy gradient over ${V}: worst error ${worstG}`);
    // ignored and out-of-range targets, as in the row kernels
    const none = M.crossEntropy(xl, tensor(new Int32Array([-100])), { reduction: "none" });
    const bad = M.crossEntropy(xl, tensor(new Int32Array([V])), { reduction: "none" });
    assert.equal(await none.item(), 0);
    assert.ok(Number.isNaN(await bad.item()));
    M.dispose([x, sm, lsm, xl, xl.grad!, t, loss, none, bad]);
  }));

Deno.test("crossEntropy over V = 0 classes: every row a NaN loss (its target is out of range), ignored rows 0", async () => {
  const x = M.zeros([3, 0], { requiresGrad: true });
  const t = tensor(new Int32Array([0, -100, 1]));
  const none = M.crossEntropy(x, t, { reduction: "none" });
  assert.deepEqual(none.shape, [3]);
  const v = await none.toArray();
  assert.ok(Number.isNaN(v[0]) && v[1] === 0 && Number.isNaN(v[2]), `losses ${v}`);
  const mean = M.crossEntropy(x, t);
  assert.ok(Number.isNaN(await mean.item()));
  mean.backward();
  assert.deepEqual(x.grad!.shape, [3, 0]);
  M.dispose([x, x.grad!, t, none, mean]);
});
