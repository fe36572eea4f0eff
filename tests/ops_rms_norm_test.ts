import assert from "node:assert/strict";
import * as M from "./library.ts";
import {
  assertClose,
  checkOps,
  type Nd,
  nd,
  numericGrad,
  type OpCase,
  rand,
  readAll,
  setup,
  toTensor,
} from "./helpers.ts";

await setup();

const EPS = 1e-5;

/** Float64 RMSNorm over the last dim: y and the per-row r = 1 / sqrt(mean(x^2) + eps). */
function rmsRef(x: Nd, w: Nd, eps = EPS): { y: Nd; r: Float64Array } {
  const D = w.data.length;
  const rows = D === 0 ? 0 : x.data.length / D;
  const y = new Float64Array(x.data.length), r = new Float64Array(rows);
  for (let i = 0; i < rows; i++) {
    let ss = 0;
    for (let d = 0; d < D; d++) ss += x.data[i * D + d] ** 2;
    r[i] = 1 / Math.sqrt(ss / D + eps);
    for (let d = 0; d < D; d++) y[i * D + d] = x.data[i * D + d] * r[i] * w.data[d];
  }
  return { y: { data: y, shape: x.shape }, r };
}

/**
 * Analytic float64 gradients of sum(rmsNorm(x, w) * G), with gw = G * w:
 *   dx = r gw - x r^3 mean(gw x),  dw = sum over rows of G x r,
 * and the per-element error scales of f32 results (the sums of the terms' magnitudes).
 */
function rmsGradRef(x: Nd, w: Nd, G: Nd, eps = EPS) {
  const D = w.data.length;
  const rows = x.data.length / D;
  const { r } = rmsRef(x, w, eps);
  const dx = new Float64Array(x.data.length), dxScale = new Float64Array(x.data.length);
  const dw = new Float64Array(D), dwScale = new Float64Array(D);
  for (let i = 0; i < rows; i++) {
    let s = 0, sAbs = 0;
    for (let d = 0; d < D; d++) {
      const v = G.data[i * D + d] * w.data[d] * x.data[i * D + d];
      s += v;
      sAbs += Math.abs(v);
    }
    const c = r[i] ** 3 * s / D, cAbs = r[i] ** 3 * sAbs / D;
    for (let d = 0; d < D; d++) {
      const at = i * D + d, gw = G.data[at] * w.data[d];
      dx[at] = r[i] * gw - x.data[at] * c;
      dxScale[at] = Math.abs(r[i] * gw) + Math.abs(x.data[at]) * cAbs;
      dw[d] += G.data[at] * x.data[at] * r[i];
      dwScale[d] += Math.abs(G.data[at] * x.data[at] * r[i]);
    }
  }
  return { dx: { data: dx, shape: x.shape }, dw: { data: dw, shape: w.shape }, dxScale, dwScale };
}

Deno.test("rmsNorm: analytic gradient reference matches finite differences (float64)", () => {
  const x = rand([3, 5], 1), w = rand([5], 2), G = rand([3, 5], 3);
  const f = ([xd, wd]: Float64Array[]) => {
    const y = rmsRef({ data: xd, shape: x.shape }, { data: wd, shape: w.shape }).y.data;
    return y.reduce((s, v, i) => s + v * G.data[i], 0);
  };
  const [gx, gw] = numericGrad(f, [x.data, w.data]);
  const { dx, dw } = rmsGradRef(x, w, G);
  assertClose(dx.data, gx!, { rtol: 1e-7, atol: 1e-8 }, "dx");
  assertClose(dw.data, gw!, { rtol: 1e-7, atol: 1e-8 }, "dw");
});

function smallCase(shape: number[], seed: number, grad: boolean[] = [true, true]): OpCase {
  const D = shape[shape.length - 1];
  return {
    what: `rmsNorm ${JSON.stringify(shape)}${grad[1] ? "" : " (weight without grad)"}${
      grad[0] ? "" : " (x without grad)"
    }`,
    inputs: [rand(shape, seed, { low: -2, high: 2 }), rand([D], seed + 1, { low: -1.5, high: 1.5 })],
    gpu: ([x, w]) => M.rmsNorm(x, w, EPS),
    ref: ([x, w]) => rmsRef(x, w).y,
    // dx cancels (r gw - x r^3 mean(gw x)); dw sums over rows.
    gradTol: { rtol: 2e-5, atol: 1e-5 },
    grad,
  };
}

Deno.test("rmsNorm: D = 1, 4, 5, 8, rank 1-3, weight or x without grad (finite differences)", async () => {
  await checkOps([
    smallCase([5], 11),
    smallCase([3, 1], 12),
    smallCase([4, 5], 13),
    smallCase([2, 3, 5], 14),
    smallCase([2, 3, 4], 15),
    smallCase([3, 2, 8], 16),
    smallCase([7, 5], 17, [true, false]),
    smallCase([2, 3, 8], 18, [true, false]),
    smallCase([6, 5], 19, [false, true]),
  ]);
});

/**
 * Forward and both gradients of larger shapes against the analytic float64 reference, each with the error
 * scale of its f32 sums: y relative (a product of rounded factors), dx relative to r |gw| + |x| r^3
 * mean(|gw x|), dw relative to sum |G x r| over rows.
 */
async function checkLarge(shape: number[], seed: number, wGrad = true, eps = EPS): Promise<void> {
  const D = shape[shape.length - 1];
  const x = rand(shape, seed, { low: -2, high: 2 }), w = rand([D], seed + 1, { low: -1.5, high: 1.5 });
  const G = rand(shape, seed + 2);
  const what = `rmsNorm ${JSON.stringify(shape)}`;
  const [tx, tw, tg] = [toTensor(x, true), toTensor(w, wGrad), toTensor(G)];
  const y = M.rmsNorm(tx, tw, eps);
  y.backward(tg);
  const outs = [y, tx.grad!, ...(wGrad ? [tw.grad!] : [])];
  const [ya, dxa, dwa] = await readAll(outs);
  if (!wGrad) assert.equal(tw.grad, null, `${what}: weight without grad got a gradient`);
  for (const t of [tx, tw, tg, ...outs]) t.dispose();
  const ref = rmsRef(x, w, eps);
  const g = rmsGradRef(x, w, G, eps);
  assertClose(ya, ref.y, { rtol: 1e-5, atol: 1e-6 }, `${what}: forward`);
  assertClose(dxa, g.dx, { rtol: 1e-5, atol: 1e-6, scale: g.dxScale }, `${what}: dx`);
  if (wGrad) assertClose(dwa, g.dw, { rtol: 1e-5, atol: 1e-6, scale: g.dwScale }, `${what}: dweight`);
}

Deno.test("rmsNorm: D = 64, odd and vec4 widths, eps = 1e-6 (analytic)", async () => {
  await checkLarge([2, 37, 64], 21);
  await checkLarge([3, 50, 5], 22);
  await checkLarge([1, 130, 17], 23, false);
  await checkLarge([1, 1, 768], 24);
  await checkLarge([2, 9, 12], 25, true, 1e-6);
  await checkLarge([16, 1000], 26);
});

Deno.test("rmsNorm: 70000 rows (past 65535 invocations) and 4194369 rows (past 65535 workgroups)", async () => {
  await checkLarge([70000, 5], 31);
  await checkLarge([2, 35000, 4], 32);
  await checkLarge([65535 * 64 + 129, 1], 33);
});

Deno.test("rmsNorm: the longest rows within the loop limit are exact (D = 32766, and 131064 as vec4); one more throws", async () => {
  // Each row's kernels loop twice over D / V; software adapters stop an invocation silently past 65535 loop
  // trips in all (each loop's final test counting), so D / V stops at 32766.
  await checkLarge([2, 32766], 34);
  await checkLarge([1, 131064], 35);
  for (const [D, limit] of [[32767, 32766], [40001, 32766], [65535, 32766], [131068, 131064]]) {
    throwsWith(
      () => M.rmsNorm(M.zeros([1, D]), M.zeros([D]), EPS),
      `rmsNorm: the last dim of x [1, ${D}] exceeds ${limit} (at most 32766, or 131064 for a multiple of 4`,
    );
  }
});

Deno.test("rmsNorm: one dispatch forward; backward only for the inputs that need a gradient", async () => {
  const x = M.randn([4, 32, 16], { requiresGrad: true });
  const w = M.randn([16]);
  const g = M.randn([4, 32, 16]);
  const d0 = M.dispatchCount();
  const y = M.rmsNorm(x, w, EPS);
  assert.equal(M.dispatchCount() - d0, 1, "forward dispatches");
  const d1 = M.dispatchCount();
  y.backward(g);
  assert.equal(M.dispatchCount() - d1, 1, "backward dispatches with only dx needed");
  assert.equal(w.grad, null);
  // No gradient needed at all: nothing is recorded (rstd is released at once).
  const y2 = M.noGrad(() => M.rmsNorm(x, w, EPS));
  assert.equal(y2.requiresGrad, false);
  await M.sync();
  for (const t of [x, w, g, y, y2, x.grad!]) t.dispose();
});

Deno.test("rmsNorm: empty inputs", async () => {
  const x = M.zeros([0, 3], { requiresGrad: true });
  const w = M.ones([3], { requiresGrad: true });
  const y = M.rmsNorm(x, w, EPS);
  assert.deepEqual(y.shape, [0, 3]);
  M.sum(y).backward();
  assert.deepEqual(Array.from(await w.grad!.toArray()), [0, 0, 0]);
  assert.deepEqual(x.grad!.shape, [0, 3]);
  for (const t of [x, w, y, x.grad!, w.grad!]) t.dispose();
});

/** Asserts that `fn` throws an error whose message contains `text`. */
function throwsWith(fn: () => unknown, text: string): void {
  assert.throws(
    fn,
    (e: unknown) => e instanceof Error && e.message.includes(text),
    `expected an error with "${text}"`,
  );
}

Deno.test("rmsNorm: bad inputs name the shapes", () =>
  M.tidy(() => {
    const x = M.zeros([2, 3]);
    throwsWith(() => M.rmsNorm(x, M.zeros([4]), EPS), "weight must be [3] for x [2, 3], got [4]");
    throwsWith(() => M.rmsNorm(x, M.zeros([1, 3]), EPS), "got [1, 3]");
    throwsWith(() => M.rmsNorm(M.zeros([]), M.zeros([1]), EPS), "x must be (..., D)");
    throwsWith(
      () => M.rmsNorm(M.zeros([2, 3], { dtype: "i32" }), M.zeros([3]), EPS),
      "rmsNorm needs f32 tensors, got x i32",
    );
    throwsWith(() => M.rmsNorm(M.zeros([1, 70001]), M.zeros([70001]), EPS), "exceeds 32766");
    throwsWith(() => M.rmsNorm(x, M.zeros([3]), NaN), "eps");
    const norm = new M.RMSNorm(3);
    throwsWith(() => norm.forward(M.zeros([2, 4])), "RMSNorm: expected input (..., 3), got [2, 4]");
  }));

Deno.test("rmsNorm: matches the composite of generic ops", async () => {
  const xs = rand([3, 7, 6], 41), ws = rand([6], 42);
  const x = toTensor(xs), w = toTensor(ws);
  const fused = M.rmsNorm(x, w, EPS);
  const r = M.rsqrt(M.add(M.mean(M.mul(x, x), -1, true), EPS));
  const composite = M.mul(M.mul(x, r), w);
  const [a, b] = await readAll([fused, composite]);
  assertClose(a, nd(b, [3, 7, 6]), { rtol: 2e-6, atol: 1e-7 }, "fused vs composite");
});
