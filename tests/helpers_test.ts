// The checkers themselves: a check that cannot fail, or that passes on a malformed tolerance, checks nothing.
import assert from "node:assert/strict";
import { assertClose, expandRef, kernelsRun, map2, mapN, nd, setup } from "./helpers.ts";
import { assertMatches, tolerance } from "./fixture_util.ts";
import { randn } from "../core/creation.ts";

Deno.test("assertClose refuses a NaN, negative or infinite tolerance and a scale that is NaN or of another length", () => {
  assertClose([1.000001], [1], { rtol: 1e-5, atol: 0 }, "ok");
  assertClose([100], [1], { rtol: 1, atol: 0, scale: [200] }, "a scale can widen the bound");
  const bad: [Parameters<typeof assertClose>[2], RegExp][] = [
    [{ scale: [NaN] }, /scale\[0\] is NaN/],
    [{ scale: [Infinity] }, /scale\[0\] is Infinity/],
    [{ scale: [-1] }, /scale\[0\] is -1/],
    [{ scale: [1, 2] }, /2 scale values for 1 values/],
    [{ scale: [] }, /0 scale values for 1 values/],
    [{ rtol: NaN }, /rtol must be a finite number >= 0, got NaN/],
    [{ rtol: -1e-5 }, /rtol must be/],
    [{ atol: -1 }, /atol must be/],
    [{ atol: Infinity }, /atol must be/],
  ];
  for (const [tol, msg] of bad) {
    assert.throws(() => assertClose([100], [1], tol, "check"), msg, JSON.stringify(tol));
  }
  // the values themselves: NaN only meets NaN
  assert.throws(() => assertClose([NaN], [1], {}, "nan"), /outside/);
  assertClose([NaN], [NaN], {}, "nan meets nan");
});

Deno.test("expandRef and mapN with a target shape refuse shapes that do not broadcast to it", () => {
  const x = nd([1, 2, 3], [3]);
  assert.throws(() => expandRef(x, [2]), /cannot broadcast \[3\] \[2\]/); // was silently truncated
  assert.throws(() => expandRef(nd([1, 2], [2]), [3]), /cannot broadcast|does not broadcast/); // read NaN
  assert.throws(() => expandRef(nd([1, 2, 3, 4], [2, 2]), [2]), /does not broadcast to \[2\]/); // more dims
  assert.throws(() => mapN([x, nd([1, 2], [2, 1])], (a, b) => a + b, [2, 2]), /cannot broadcast/);
  assert.throws(
    () => mapN([nd([1, 2], [2, 1]), 3], (a, b) => a + b, [1, 3]),
    /\[2,1\] \[\] does not broadcast to \[1, 3\]/,
  );
  assert.deepEqual([...expandRef(nd([1, 2], [2, 1]), [2, 3]).data], [1, 1, 1, 2, 2, 2]);
  assert.deepEqual(expandRef(nd([5], [1]), [2, 2]).shape, [2, 2]);
  const s = map2(nd([1, 2], [2, 1]), nd([10, 20, 30], [3]), (a, b) => a + b);
  assert.deepEqual([...s.data], [11, 21, 31, 12, 22, 32]);
});

Deno.test("assertMatches checks the shape, fails on NaN and names the worst element", async () => {
  await setup();
  const op = tolerance("op");
  const want = { data: [1, 2, 3, 4, 5, 6], shape: [2, 3] };
  assertMatches({ data: [1, 2, 3, 4, 5, 6.00001], shape: [2, 3] }, want, op, "ok");
  assert.throws(
    () => assertMatches({ data: want.data, shape: [3, 2] }, want, op, "t"),
    /t: shape \[3,2\], expected \[2,3\]/,
  );
  assert.throws(
    () => assertMatches({ data: want.data, shape: [6] }, want, op, "t"),
    /shape \[6\], expected \[2,3\]/,
  );
  assert.throws(() => assertMatches({ data: [1, 2], shape: [2, 3] }, want, op, "t"), /2 values, expected 6/);
  assert.throws(
    () => assertMatches({ data: [1, 2, 3, 4, NaN, 6], shape: [2, 3] }, want, op, "t"),
    /max \|diff\| Infinity .* at index 4 \[1, 1\]: got NaN, expected 5/,
  );
  assert.throws(
    () => assertMatches({ data: [1, 2.01, 3, 4, 5, 6.001], shape: [2, 3] }, want, op, "t"),
    /at index 1 \[0, 1\]: got 2\.01, expected 2/,
  );
  assert.throws(() => assertMatches(want, want, { ...op, rtol: NaN }, "t"), /bad bound/);
  // relative to the tensor's largest value: 5.5e-5 off passes a bound of 1e-5 x 6, 7e-5 does not
  const model = { ...tolerance("model"), rtol: 1e-5 };
  assertMatches({ data: [1.000055, 2, 3, 4, 5, 6], shape: [2, 3] }, want, model, "below the bound");
  assert.throws(
    () => assertMatches({ data: [1, 2, 3, 4, 5.00007, 6], shape: [2, 3] }, want, model, "t"),
    /t: max \|diff\| 7\.000e-5 > 6\.000e-5 = 0\.00001 x 6\.000e\+0 .*, at index 4 \[1, 1\]: got 5\.00007, expected 5$/,
  );
});

Deno.test("kernelsRun lists the kernels a computation dispatched, awaited parts included", async () => {
  await setup();
  const { value, kernels } = await kernelsRun(async () => {
    const x = randn([4, 4]);
    const y = x.add(x);
    const out = await y.toArray();
    x.dispose();
    y.dispose();
    return out.length;
  });
  assert.equal(value, 16);
  assert.ok(kernels.length >= 1 && kernels.every((k) => typeof k === "string" && k.length > 0), `${kernels}`);
  const again = await kernelsRun(() => 1);
  assert.deepEqual(again.kernels, [], "nothing dispatched");
});
