import assert from "node:assert/strict";
import * as M from "./library.ts";
import { dispose, tensor } from "../mod.ts";
import { defineOp } from "../advanced.ts";
import { assertClose, checkOps, map1, nd, numericGrad, rand, readAll, setup } from "./helpers.ts";
import { defineKernel, dispatch } from "../core/kernel.ts";

await setup();

Deno.test("tensor(): nested arrays, flat data with a shape, typed arrays, scalars, dtype and requiresGrad", async () => {
  const a = tensor([[1, 2, 3], [4, 5, 6]]);
  const b = tensor([1, 2, 3, 4, 5, 6], [3, 2]);
  const c = tensor(new Int32Array([7, -8, 9]));
  const d = tensor(2.5);
  const e = tensor([1, 2], undefined, { dtype: "i32" });
  const f = tensor(new Float32Array([0.5, 1.5]), [2, 1], { requiresGrad: true });
  const g = tensor([[[1], [2]]]);
  assert.deepEqual([a.shape, b.shape, c.shape, d.shape, e.shape, f.shape, g.shape], [
    [2, 3],
    [3, 2],
    [3],
    [],
    [2],
    [2, 1],
    [1, 2, 1],
  ]);
  assert.deepEqual([a.dtype, c.dtype, d.dtype, e.dtype], ["f32", "i32", "f32", "i32"]);
  assert.equal(f.requiresGrad, true);
  assert.equal(a.size, 6);
  assert.equal(a.rank, 2);
  assert.equal(d.rank, 0);
  assert.equal(String(f), "Tensor([2, 1], f32, requiresGrad)");
  const got = await readAll([a, b, c, d, e, f, g]);
  assert.deepEqual(got.map((x) => [...x]), [
    [1, 2, 3, 4, 5, 6],
    [1, 2, 3, 4, 5, 6],
    [7, -8, 9],
    [2.5],
    [1, 2],
    [0.5, 1.5],
    [1, 2],
  ]);
  assert.ok(got[2] instanceof Int32Array && got[0] instanceof Float32Array);
  assert.equal(await d.item(), 2.5);
  await assert.rejects(() => a.item(), /item\(\) needs a tensor with one element, got shape \[2, 3\]/);
  dispose([a, b, c, d, e, f, g]);
});

Deno.test("tensor(): ragged or mixed-depth nested arrays are rejected, naming the dim and the lengths", async () => {
  const cases: [() => unknown, RegExp][] = [
    [
      () => tensor([[1, 2], [3], [4, 5, 6]]),
      /tensor: ragged nested arrays: expected a sequence of length 2 at dim 1 \(as data\[0\]\), got length 1 at data\[1\]/,
    ],
    [
      () => tensor([[[1, 2], [3, 4]], [[5, 6], [7]]]),
      /expected a sequence of length 2 at dim 2 \(as data\[0\]\[0\]\), got length 1 at data\[1\]\[1\]/,
    ],
    [() => tensor([[], [1]]), /length 0 at dim 1 \(as data\[0\]\), got length 1 at data\[1\]/],
    // with a shape the data still has to be rectangular
    [() => tensor([[1], [2, 3]], [3]), /ragged nested arrays: .* got length 2 at data\[1\]/],
    [
      () => tensor([[1, 2], [3, [4]]] as unknown as M.NestedArray),
      /tensor: nested arrays of mixed depth: expected a number at data\[1\]\[1\] \(dim 2 of shape \[2, 2\]\), got an array of length 1/,
    ],
    [
      () => tensor([[1], 2]),
      /nested arrays of mixed depth: expected a sequence of length 1 at dim 1 \(as data\[0\]\), got the number 2 at data\[1\]/,
    ],
  ];
  for (const [fn, re] of cases) assert.throws(fn, re);
  // rectangular nestings, empty ones included, still work
  const ok = [tensor([[]]), tensor([]), tensor([[[]], [[]]]), tensor([[1, 2], [3, 4]], [4])];
  assert.deepEqual(ok.map((t) => t.shape), [[1, 0], [0], [2, 1, 0], [4]]);
  assert.deepEqual([...await ok[3].toArray()], [1, 2, 3, 4]);
  dispose(ok);
});

Deno.test("creation errors show a NaN as NaN and name the function and the argument", () => {
  const shape = /shape must be a list of non-negative integers, got \[2, NaN\]/;
  assert.throws(() => M.zeros([2, NaN]), new RegExp(`zeros: ${shape.source}`));
  assert.throws(() => M.ones([2, NaN]), new RegExp(`ones: ${shape.source}`));
  assert.throws(() => M.full([2, NaN], 1), new RegExp(`full: ${shape.source}`));
  assert.throws(() => M.randn([2, NaN]), new RegExp(`randn: ${shape.source}`));
  assert.throws(() => M.rand([2, NaN]), new RegExp(`rand: ${shape.source}`));
  assert.throws(() => tensor([1, 2], [2, NaN]), new RegExp(`tensor: ${shape.source}`));
  assert.throws(() => M.zeros([1.5]), /zeros: shape must be .*, got \[1.5\]/);
  assert.throws(() => M.arange(0, NaN), /arange: end must be a finite number, got NaN/);
  assert.throws(() => M.arange(NaN), /arange: end must be a finite number, got NaN/);
  assert.throws(() => M.arange(0, Infinity), /arange: end must be a finite number, got Infinity/);
  assert.throws(() => M.arange(-Infinity, 0), /arange: start must be a finite number, got -Infinity/);
  assert.throws(() => M.arange(0, 5, NaN), /arange: step must be a finite number, got NaN/);
  // Past the device's largest buffer: refused before a host array of that size is filled (rand([30000,
  // 30000]) spent 21 s and 3.6 GB first; randn([1e5, 1e5]) died in a RangeError).
  const max = M.deviceInfo().limits.maxBufferSize;
  const t0 = performance.now();
  // sized from this device's limit (2^31 - 1 here, about 4 GiB on the H200)
  const past = Math.floor(max / 4) + 1;
  assert.throws(
    () => M.rand([past]),
    new RegExp(
      `cannot allocate rand f32 \\[${past}\\]: ${
        4 * past
      } bytes is more than the device's largest buffer \\(${max}\\)`,
    ),
  );
  assert.throws(() => M.randn([1e5, 1e5]), /cannot allocate randn f32 \[100000, 100000\]: 40000000000 bytes/);
  assert.throws(() => M.arange(0, 1e10, 1, { dtype: "f32" }), /cannot allocate arange f32 \[10000000000\]/);
  // 2^32 elements or more: kernels index in u32 and would wrap (a device may allow such buffers: 16 GiB of f32)
  assert.throws(
    () => M.Tensor.empty([2 ** 16, 2 ** 16], "bf16"),
    /cannot allocate bf16 \[65536, 65536\]: 4294967296 elements, more than 2\^32 - 1 in one tensor/,
  );
  // a size past 2^53 bytes is too large too (it said: not a whole number of bytes)
  assert.throws(() => M.rand([2 ** 30, 2 ** 30, 2 ** 30]), /bytes is more than the device's largest buffer/);
  assert.ok(performance.now() - t0 < 1000, `refused at once (${performance.now() - t0} ms)`);
  // ... and past the memory limit (setMemoryLimit), before the host array is filled
  M.setMemoryLimit(M.memory().liveBytes + (1 << 20));
  try {
    assert.throws(
      () => M.rand([1 << 24]),
      /out of memory: allocating \d+ bytes with \d+ live would pass the memory limit/,
    );
  } finally {
    M.setMemoryLimit(null);
  }
});

Deno.test("creation with requiresGrad on an i32 tensor is refused before anything is made", () => {
  const base = M.memory();
  const made: [string, () => M.Tensor][] = [
    ["tensor", () => tensor([1, 2], undefined, { dtype: "i32", requiresGrad: true })],
    ["Int32Array", () => tensor(new Int32Array(2), [2], { requiresGrad: true })],
    ["zeros", () => M.zeros([3], { dtype: "i32", requiresGrad: true })],
    ["full", () => M.full([3], 2, { dtype: "i32", requiresGrad: true })],
    ["arange", () => M.arange(5, undefined, 1, { requiresGrad: true })],
  ];
  for (const [what, make] of made) {
    assert.throws(make, /only f32 tensors can require grad, got i32/, what);
    assert.deepEqual(
      [M.memory().liveTensors, M.memory().liveBytes],
      [base.liveTensors, base.liveBytes],
      what,
    );
  }
});

Deno.test("tensor(): data that is not numbers is named (it became NaN, 0 or a parsed number)", () => {
  const bad: [unknown, RegExp][] = [
    [
      new Float64Array([1, 2]),
      /data must be a Float32Array, .*got a Float64Array \(convert it: Float32Array\.from\(data\)\)/,
    ],
    [[new Float32Array(2), new Float32Array(2)], /expected a number at data\[0\], got a Float32Array/],
    [["1", "2"], /expected a number at data\[0\], got the string "1"/],
    [[1, null], /expected a number at data\[1\], got null/],
    [[1, undefined], /expected a number at data\[1\], got undefined/],
    // a row that is not an array, after a first that is (it said "got the number 3,4")
    [
      [[1, 2], new Float32Array([3, 4])],
      /expected a sequence of length 2 at dim 1 .*got a Float32Array .*at data\[1\]/,
    ],
    [[[1, 2], "ab"], /got the string "ab" at data\[1\]/],
    [[[1, 2], null], /got null at data\[1\]/],
    [[[1, true]], /expected a number at data\[0\]\[1\], got boolean true/],
    [{ length: 2 }, /data must be .*got an object \(Object\)/],
  ];
  for (const [data, want] of bad) assert.throws(() => tensor(data as number[]), want);
});

Deno.test("zeros/ones/full/arange/zerosLike/onesLike give exact values and dtypes", async () => {
  const ts = [
    M.zeros([2, 3]),
    M.ones([4], { dtype: "i32" }),
    M.full([3], -2.25),
    M.full([2], 7, { dtype: "i32" }),
    M.arange(5),
    M.arange(2, 11, 3),
    M.arange(0, 1, 0.25),
    M.arange(5, 0, -2),
    M.zerosLike(M.ones([2], { dtype: "i32" })),
    M.onesLike(M.zeros([3])),
    M.zeros([0, 4]),
  ];
  const got = await readAll(ts);
  assert.deepEqual(got.map((x) => [...x]), [
    [0, 0, 0, 0, 0, 0],
    [1, 1, 1, 1],
    [-2.25, -2.25, -2.25],
    [7, 7],
    [0, 1, 2, 3, 4],
    [2, 5, 8],
    [0, 0.25, 0.5, 0.75],
    [5, 3, 1],
    [0, 0],
    [1, 1, 1],
    [],
  ]);
  assert.deepEqual(ts.map((t) => t.dtype), [
    "f32",
    "i32",
    "f32",
    "i32",
    "i32",
    "i32",
    "f32",
    "i32",
    "i32",
    "f32",
    "f32",
  ]);
  dispose(ts);
});

Deno.test("rand stays below high after rounding to f32 (a range a few f32 steps wide; the top of [1, 2))", async () => {
  const { fillUniform, Philox } = await import("../core/random.ts");
  // 2^24 .. 2^24 + 2 holds two f32 values: 11 of 16 samples used to round up to high
  const narrow = M.rand([64], { seed: 1, low: 2 ** 24, high: 2 ** 24 + 2 });
  const got = await narrow.toArray();
  narrow.dispose();
  assert.ok(got.every((v) => v === 2 ** 24), `all at low, the one f32 below high: ${[...new Set(got)]}`);
  // the largest draw of [1, 2) is 2 - 2^-24 in double, 2 in f32: it takes the f32 just below 2
  const top = { nextFloat: () => 1 - 2 ** -24 } as unknown as InstanceType<typeof Philox>;
  assert.deepEqual([...fillUniform(top, new Float32Array(1), 1, 2)], [2 - 2 ** -23]);
  assert.deepEqual([...fillUniform(top, new Float32Array(1), -2, 0)], [-(2 ** -23)], "exact in f32: kept");
});

Deno.test("rand and randn refuse an empty or infinite range and a negative std (as torch's uniform_ and normal)", () => {
  const live = M.memory().liveTensors;
  assert.throws(
    () => M.rand([4], { low: 1, high: 0 }),
    /rand: \[low, high\) must be finite with low <= high .*got \[1, 0\)/,
  );
  assert.throws(() => M.rand([4], { high: Infinity }), /got \[0, Infinity\)/);
  assert.throws(
    () => M.randn([4], { std: -1 }),
    /randn: mean must be finite and std finite and >= 0 .*got 0, -1/,
  );
  assert.throws(() => M.randn([4], { mean: NaN }), /got NaN, 1/);
  assert.equal(M.memory().liveTensors, live);
  const same = M.rand([3], { low: 2, high: 2 }); // torch's uniform_(2, 2) gives 2
  same.dispose();
});

Deno.test("randn/rand: seeded and reproducible, in range, with the requested moments", async () => {
  const n = 20000;
  const ts = [
    M.randn([n], { seed: 42 }),
    M.randn([n], { seed: 42 }),
    M.randn([n], { seed: 43 }),
    M.rand([n], { seed: 1, low: -2, high: 3 }),
    M.randn([n], { seed: 7, mean: 5, std: 0.5 }),
  ];
  M.manualSeed(9);
  ts.push(M.rand([8]));
  M.manualSeed(9);
  ts.push(M.rand([8]));
  const [a, a2, b, u, s, g1, g2] = await readAll(ts);
  assert.deepEqual(a, a2, "same seed, same numbers");
  assert.notDeepEqual(a, b, "different seeds differ");
  assert.deepEqual(g1, g2, "manualSeed makes the global stream reproducible");
  const moments = (x: ArrayLike<number>) => {
    let m = 0, v = 0;
    for (let i = 0; i < x.length; i++) m += x[i];
    m /= x.length;
    for (let i = 0; i < x.length; i++) v += (x[i] - m) ** 2;
    return [m, Math.sqrt(v / x.length)];
  };
  // Fixed seeds, so these are deterministic; 20000 samples put the moments within a few 1e-2.
  const [m0, s0] = moments(a);
  assert.ok(Math.abs(m0) < 0.03 && Math.abs(s0 - 1) < 0.03, `randn moments ${m0}, ${s0}`);
  const [m1, s1] = moments(s);
  assert.ok(
    Math.abs(m1 - 5) < 0.02 && Math.abs(s1 - 0.5) < 0.02,
    `randn(mean 5, std 0.5) moments ${m1}, ${s1}`,
  );
  assert.ok(u.every((v) => v >= -2 && v < 3), "rand within [low, high)");
  const [mu] = moments(u);
  assert.ok(Math.abs(mu - 0.5) < 0.05, `rand mean ${mu}`);
  dispose(ts);
});

Deno.test("bad input: shape mismatches name both shapes", () => {
  const a = M.zeros([2, 3]), b = M.zeros([4]), c = M.zeros([2, 4]);
  assert.throws(() => M.add(a, b), /add: shapes \[2, 3\] and \[4\] cannot be broadcast together/);
  assert.throws(() => a.mul(M.zeros([3, 3])), /mul: shapes \[2, 3\] and \[3, 3\]/);
  assert.throws(() => M.compare("lt", a, b), /lt: shapes \[2, 3\] and \[4\]/);
  assert.throws(() => M.where(M.zeros([2, 3]), a, b), /where: shapes \[2, 3\] and \[4\]/);
  assert.throws(() => M.matmul(a, c), /\[2, 3\] @ \[2, 4\]/);
  assert.throws(
    () => M.cat([a, c], 0),
    /cat: Tensor\(\[2, 4\], f32\) does not match Tensor\(\[2, 3\], f32\) outside dim 0/,
  );
  assert.throws(() => M.cat([a, M.zeros([2], { dtype: "i32" })], 0), /cat: .*does not match/);
  assert.throws(() => M.cat([]), /needs at least one tensor/);
  assert.throws(() => M.expand(a, [2, 4]), /expand: cannot expand \[2, 3\] to \[2, 4\]/);
  assert.throws(() => M.expand(a, [3]), /fewer dims/);
  dispose([a, b, c]);
});

Deno.test("bad input: wrong dtypes are rejected with the op and dtype named", () => {
  const i = M.ones([3], { dtype: "i32" }), f = M.ones([3]);
  assert.throws(() => M.exp(i), /exp needs an f32 tensor, got i32/);
  assert.throws(() => i.sigmoid(), /sigmoid needs an f32 tensor, got i32/);
  // there is no cast op: the error says how to convert, not to look for one
  assert.throws(
    () => M.add(i, f),
    /add: dtypes differ .*no op converts .*tensor\(await t\.toArray\(\), t\.shape, \{ dtype \}\)/,
  );
  assert.throws(() => M.div(i, i), /div needs f32 tensors, got i32/);
  assert.throws(() => M.add(i, 0.5), /add: an i32 tensor with a scalar that is not an int32 integer \(0.5\)/);
  assert.throws(() => M.sum(i), /sum needs an f32 tensor, got i32 \[3\]/);
  assert.throws(() => M.mean(i, 0), /mean needs an f32 tensor, got i32 \[3\]/); // it said "sum"
  assert.throws(() => M.max(i), /max needs an f32 tensor, got i32 \[3\]/);
  assert.throws(() => M.indexSelect(f, 0, f), /indices must be an i32 tensor, got f32/);
  assert.throws(() => M.where(i, f, f), /condition must be an f32 mask, got i32/);
  assert.throws(() => M.add(1, 2), /at least one operand must be a tensor/);
  assert.throws(
    () => tensor([1.5], undefined, { dtype: "i32" }),
    /i32 data has 1.5 at 0, not an int32 integer/,
  );
  assert.throws(() => M.full([2], 0.5, { dtype: "i32" }), /full: i32 fill value 0.5 is not an int32 integer/);
  dispose([i, f]);
});

Deno.test("bad input: reshape, permute, narrow, split, pad, axes and shapes out of range", () => {
  const x = M.zeros([2, 3]);
  assert.throws(() => x.reshape(4, 4), /reshape: shape \[4, 4\] has 16 elements, tensor \[2, 3\] has 6/);
  assert.throws(() => x.reshape(4, -1), /cannot infer -1 in \[4, -1\] for 6 elements/);
  assert.throws(() => x.reshape(-1, -1), /reshape: only one dim can be -1 \(inferred\), got \[-1, -1\]/);
  assert.throws(() => x.permute(0, 0), /permute: \[0,0\] is not a permutation of the 2 dims of \[2, 3\]/);
  assert.throws(() => x.permute(1), /not a permutation/);
  assert.throws(() => x.permute(0, 2), /dim 2 is out of range for a tensor of rank 2/);
  assert.throws(() => x.narrow(1, 2, 5), /narrow: \[2, 7\) is outside dim 1 of size 3 \(\[2, 3\]\)/);
  assert.throws(() => x.narrow(0, -1, 1), /outside dim 0/);
  assert.throws(() => x.split([1, 1], 1), /split: sizes \[1,1\] sum to 2, dim 1 has 3/);
  assert.throws(() => M.pad(x, [1]), /pad: padding \[1\] must be non-negative pairs/);
  assert.throws(() => M.pad(x, [1, -1]), /non-negative pairs/);
  assert.throws(() => x.sum(2), /sum: dim 2 is out of range for a tensor of rank 2/);
  assert.throws(() => x.sum([0, -2]), /repeated dim/);
  assert.throws(() => x.softmax(5), /softmax: dim 5 is out of range/);
  assert.throws(() => x.clamp(1, 0), /clamp: min 1 is greater than max 0/);
  assert.throws(() => tensor([1, 2, 3], [2, 2]), /tensor: shape \[2, 2\] needs 4 values, got 3/);
  assert.throws(() => M.zeros([2, -1]), /non-negative integers/);
  assert.throws(() => M.zeros([1, 1, 1, 1, 1, 1, 1, 1, 1]), /rank 9 > 8/);
  assert.throws(() => M.arange(0, 5, 0), /step must not be 0/);
  assert.throws(() => M.ones([3]).transpose(), /dim -2 is out of range for a tensor of rank 1/);
  x.dispose();
});

Deno.test("bad input: a disposed tensor is named in the error when read or used", async () => {
  const t = M.ones([2, 3]);
  const id = t.id;
  t.dispose();
  assert.equal(t.disposed, true);
  await assert.rejects(
    () => t.toArray(),
    new RegExp(`Tensor#${id} \\[2, 3\\] f32 was disposed and cannot be used`),
  );
  assert.throws(() => t.add(1), new RegExp(`Tensor#${id} .*was disposed`));
  assert.throws(() => M.matmul(t, t, { transB: true }), /was disposed/);
});

Deno.test("the test helpers themselves detect wrong values, wrong gradients and missing gradients", async () => {
  // A reference that is off by 1e-4 relative must fail the forward check.
  await assert.rejects(
    () =>
      checkOps([{
        what: "exp vs a slightly wrong reference",
        inputs: [rand([5], 1)],
        gpu: ([x]) => x.exp(),
        ref: ([x]) => map1(x, (v) => Math.exp(v) * (1 + 1e-4)),
        grad: false,
      }]),
    /exp vs a slightly wrong reference: forward: \d+ of 5 values outside/,
  );
  // A custom op with a 1% wrong backward must fail the gradient check.
  const wrong = defineOp<null>({
    name: "wrongSquare",
    forward: ([x], _, save) => {
      save(x);
      return x.square();
    },
    backward: (g, [x]) => [g.mul(x).mul(2.02)],
  });
  await assert.rejects(
    () =>
      checkOps([{
        what: "square with a wrong backward",
        inputs: [rand([6], 2, { avoid: [0] })],
        gpu: ([x]) => wrong([x], null),
        ref: ([x]) => map1(x, (v) => v * v),
      }]),
    /square with a wrong backward: d\/d input 0/,
  );
  // An op that cuts the graph (here the gradient comes out 0 instead of 1) is reported.
  await assert.rejects(
    () =>
      checkOps([{
        what: "detached",
        inputs: [rand([3], 3)],
        gpu: ([x]) => x.detach().add(x.mul(0)),
        ref: ([x]) => x,
      }]),
    /detached: d\/d input 0/,
  );
  // assertClose: names the worst element with its coordinate; NaN only matches NaN.
  assert.throws(
    () => assertClose([1, 2, 3, 4.5], nd([1, 2, 3, 4], [2, 2]), {}, "demo"),
    /demo: 1 of 4 values outside .*worst at index 3 \[1, 1\] of shape \[2, 2\]: actual 4.5, expected 4/,
  );
  assert.throws(() => assertClose([NaN], [1], {}, "nan"), /nan: 1 of 1/);
  assert.throws(() => assertClose([1], [NaN], {}, "nan2"), /nan2: 1 of 1/);
  assertClose([NaN, Infinity], [NaN, Infinity], {}, "nan and inf match");
  // numericGrad: d/dx (x^3 + xy) = 3x^2 + y, d/dy = x.
  const [gx, gy] = numericGrad(([x, y]) => x[0] ** 3 + x[0] * y[0], [
    Float64Array.of(1.5),
    Float64Array.of(-2),
  ]);
  assert.ok(Math.abs(gx![0] - (3 * 2.25 - 2)) < 1e-8 && Math.abs(gy![0] - 1.5) < 1e-8);
});

/** A kernel that copies buffer a into buffer b, for the dispatch checks. */
function copyKernel(name: string) {
  return defineKernel({
    name,
    buffers: [
      { name: "a", type: "f32", access: "read" },
      { name: "b", type: "f32", access: "read_write" },
    ],
    uniforms: [],
    workgroupSize: 64,
    body: "st_b(gid, ld_a(gid));",
  });
}

Deno.test("dispatch: a writable binding that aliases another binding is a clear error (browsers reject it)", () => {
  const k = copyKernel("alias_check");
  const t = M.zeros([4]);
  const u = M.zeros([4]);
  assert.throws(
    () => dispatch(k, { a: t.storage, b: t.storage }, {}, 1),
    /kernel alias_check: writable buffer 'b' is the same GPU buffer as 'a'/,
  );
  dispatch(k, { a: t.storage, b: u.storage }, {}, 1); // distinct buffers: fine
  t.dispose();
  u.dispose();
});

Deno.test("dispatch: more storage bindings than the device allows is a clear error naming the buffers", () => {
  const k = copyKernel("binding_count_check");
  const [t, u] = [M.zeros([4]), M.zeros([4])];
  // a device that allows one storage buffer per stage (a buffer over the binding window takes one per window:
  // the same count)
  const limits = M.deviceInfo().limits;
  const real = limits.maxStorageBuffersPerShaderStage;
  limits.maxStorageBuffersPerShaderStage = 1;
  try {
    assert.throws(
      () => dispatch(k, { a: t.storage, b: u.storage }, {}, 1),
      /kernel binding_count_check: needs 2 storage bindings \(a 256 B, b 256 B; .*\), the device allows 1/,
    );
  } finally {
    limits.maxStorageBuffersPerShaderStage = real;
  }
  t.dispose();
  u.dispose();
});

Deno.test("dispatch: two kernels under one name with different sources are a clear error (pipelines are cached by name)", async () => {
  const spec = (body: string) => ({
    name: "name_check",
    buffers: [{ name: "a", type: "f32" as const, access: "read_write" as const }],
    uniforms: [],
    workgroupSize: 64,
    body,
  });
  const t = M.zeros([4]);
  dispatch(defineKernel(spec("st_a(gid, 1.0);")), { a: t.storage }, {}, 1);
  dispatch(defineKernel(spec("st_a(gid, 1.0);")), { a: t.storage }, {}, 1); // same source again: fine
  assert.throws(
    () => dispatch(defineKernel(spec("st_a(gid, 2.0);")), { a: t.storage }, {}, 1),
    /kernel "name_check": defined twice with different sources/,
  );
  assert.deepEqual([...await t.toArray()], [1, 1, 1, 1]);
  t.dispose();
});

Deno.test("profile: times a block's kernels; a second profile while one runs is a clear error; one that throws leaves the device usable", async () => {
  await setup();
  if (!M.deviceInfo().timestampQuery) return; // every adapter this suite runs on has it; some browsers do not
  const x = tensor([1, 2, 3]);
  let inner: unknown = null;
  const times = await M.profile(async () => {
    M.tidy(() => M.keep(M.add(x, 1))).dispose();
    inner = await M.profile(() => {}).catch((e: Error) => e.message);
  });
  assert.equal(inner, "profile(): another profile() is running (nest or overlap none)");
  assert.ok(
    times.length >= 1 && times.every((t) => t.ms >= 0 && typeof t.name === "string"),
    JSON.stringify(times),
  );
  await assert.rejects(
    () =>
      M.profile(() => {
        M.tidy(() => M.keep(M.add(x, 2))).dispose();
        throw new Error("fn failed");
      }),
    /fn failed/,
  );
  // the next profile and the next work run as usual (that the failed block's timestamp passes were submitted
  // before its query set was destroyed, which the WebGPU spec requires, Deno's wgpu does not check: not seen here)
  const again = await M.profile(() => M.tidy(() => M.keep(M.mul(x, 2))).dispose());
  assert.ok(again.length >= 1);
  const y = M.add(x, 10);
  assert.deepEqual([...await y.toArray()], [11, 12, 13]);
  for (const t of [x, y]) t.dispose();
});

Deno.test("readSpans reads several spans of a buffer with one wait, one after another", async () => {
  await setup();
  const { readSpans } = await import("../core/executor.ts");
  const t = tensor(Int32Array.from({ length: 12 }, (_, i) => i), [3, 4], { dtype: "i32" });
  // the last two columns of each row, as generate reads its new tokens
  const got = new Int32Array(await readSpans(t.storage.buffer, [[8, 8], [24, 8], [40, 8]]));
  assert.deepEqual([...got], [2, 3, 6, 7, 10, 11]);
  assert.deepEqual([...new Int32Array(await readSpans(t.storage.buffer, [[4, 4]]))], [1]);
  await assert.rejects(
    () => readSpans(t.storage.buffer, [[0, 6], [8, 4]]),
    /a span of 6 bytes is not a multiple of 4/,
  );
  t.dispose();
});

Deno.test("misuse is named: a misspelt dtype, non-boolean grad flags, operands that are not tensors, NaN clamp bounds", () => {
  const x = tensor([[1, 2, 3], [4, 5, 6]]);
  const bad: [() => unknown, RegExp][] = [
    // a misspelt dtype read its values as i32, or reached WGSL as a type name
    [
      () => tensor([1.5], undefined, { dtype: "f64" as M.DType }),
      /dtype must be "f32", "i32" or "bf16", got "f64"/,
    ],
    [
      () => M.ones([2], { dtype: "float32" as M.DType }),
      /dtype must be "f32", "i32" or "bf16", got "float32"/,
    ],
    [() => M.arange(0, 3, 1, { dtype: "f64" as M.DType }), /dtype must be .*got "f64"/],
    [() => M.Tensor.empty([2], "u8" as M.DType), /Tensor\.empty: dtype must be .*got "u8"/],
    [
      () => tensor([1], undefined, { requiresGrad: "no" as unknown as boolean }),
      /requiresGrad must be a boolean/,
    ],
    [
      () => x.requiresGrad_("no" as unknown as boolean),
      /requiresGrad_: the value must be a boolean, got "no"/,
    ],
    [() => M.keep(3 as unknown as M.Tensor), /keep: expected a Tensor, got number/],
    // a string, null or an array read as a tensor's fields
    [() => x.mul("3" as unknown as number), /mul: operand 2 must be a Tensor or a number, got string/],
    [() => x.add(null as unknown as number), /add: operand 2 must be a Tensor or a number, got null/],
    [() => x.add([1, 2, 3] as unknown as number), /add: operand 2 .*got an array \(make it a tensor\)/],
    [
      () => M.compare("lt", x, "1" as unknown as number),
      /lt: operand 2 must be a Tensor or a number, got string/,
    ],
    [() => x.clamp(NaN), /clamp: a bound is NaN/],
    [() => x.clamp(0, NaN), /clamp: a bound is NaN/],
    [() => x.sum(0.5), /sum: dim 0\.5 is not an integer/],
    [() => x.narrow(1, 1.5, 1), /narrow: start and length must be integers, got 1\.5 and 1/],
  ];
  for (const [f, want] of bad) assert.throws(f, want);
  assert.equal(x.requiresGrad, false);
  x.dispose();
});

Deno.test("shapes as one list (reshape, view, permute, expand, as PyTorch) and a 0-d tensor's transpose", async () => {
  const x = tensor([[1, 2, 3], [4, 5, 6]]);
  const s = tensor(3);
  const outs = [x.reshape([3, 2]), x.view([6]), x.permute([1, 0]), x.expand([2, 2, 3]), s.transpose(0, -1)];
  assert.deepEqual(outs.map((t) => t.shape), [[3, 2], [6], [3, 2], [2, 2, 3], []]);
  assert.deepEqual([...await outs[2].toArray()], [1, 4, 2, 5, 3, 6]);
  assert.deepEqual([...await outs[4].toArray()], [3]);
  for (const t of [x, s, ...outs]) t.dispose();
});

Deno.test("Philox: Random123's known answer, and a seed's streams apart", async () => {
  const { Philox } = await import("../core/random.ts");
  // philox4x32_10 of counter 0, key 0 (Random123's kat_vectors): stream 0 is the plain counter
  const words = (r: InstanceType<typeof Philox>, n = 4) => Array.from({ length: n }, () => r.nextU32());
  assert.deepEqual(words(new Philox(0)), [0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8]);
  // streams are the counter's upper words: no two of (seed, stream) below share a word in their first 64
  const seen = new Map<number, string>();
  for (const [seed, stream] of [[7, 0], [7, 1], [8, 0], [7, 2 ** 32], [7, 2 ** 53 - 1], [2 ** 32 + 7, 0]]) {
    for (const w of words(new Philox(seed, stream), 64)) {
      assert.equal(seen.get(w), undefined, `(${seed}, ${stream}) repeats a word of ${seen.get(w)}`);
      seen.set(w, `(${seed}, ${stream})`);
    }
  }
  for (const bad of [-1, 0.5, 2 ** 53, NaN]) {
    assert.throws(() => new Philox(1, bad), /stream must be an integer/);
  }
});

Deno.test("Philox.below: unbiased integers in [0, n) (one word's remainder made low values twice as likely)", async () => {
  const { Philox } = await import("../core/random.ts");
  // n = 3 * 2^30: 2^32 % n = 2^30, so a remainder puts half of the draws below 2^30 instead of a third
  const rng = new Philox(7);
  const n = 3 * 2 ** 30, draws = 3000;
  let low = 0;
  for (let i = 0; i < draws; i++) {
    const v = rng.below(n);
    assert.ok(Number.isInteger(v) && v >= 0 && v < n);
    if (v < 2 ** 30) low++;
  }
  assert.ok(Math.abs(low / draws - 1 / 3) < 0.03, `${low} of ${draws} below 2^30, expected about a third`);
  // past 2^32 (two words), and every value of a small n
  const big = 2 ** 40 + 3;
  for (let i = 0; i < 100; i++) assert.ok(rng.below(big) < big);
  const seen = new Set(Array.from({ length: 200 }, () => rng.below(5)));
  assert.deepEqual([...seen].sort(), [0, 1, 2, 3, 4]);
  for (const bad of [0, 1.5, 2 ** 54, NaN]) {
    assert.throws(() => rng.below(bad), /below: n must be an integer/);
  }
});
