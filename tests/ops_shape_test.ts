import assert from "node:assert/strict";
import * as M from "./library.ts";
import { tensor } from "../mod.ts";
import {
  catRef,
  checkOps,
  expandRef,
  map1,
  narrowRef,
  type Nd,
  ndInt,
  type OpCase,
  padRef,
  permuteRef,
  rand,
  readAll,
  setup,
  transposeRef,
} from "./helpers.ts";

await setup();

const reshaped = (x: Nd, shape: number[]): Nd => ({ data: x.data, shape });

Deno.test("reshape and view (with -1) share data; gradients flow back through them", async () => {
  const x = rand([2, 3, 4], 1);
  await checkOps([
    {
      what: "reshape [2,3,4] -> [6,4]",
      inputs: [x],
      gpu: ([t]) => t.reshape(6, 4),
      ref: ([t]) => reshaped(t, [6, 4]),
    },
    {
      what: "view [2,3,4] -> [4,-1]",
      inputs: [x],
      gpu: ([t]) => t.view(4, -1),
      ref: ([t]) => reshaped(t, [4, 6]),
    },
    {
      what: "reshape to [24] then square",
      inputs: [x],
      gpu: ([t]) => M.reshape(t, [-1]).square(),
      ref: ([t]) => map1(reshaped(t, [24]), (v) => v * v),
    },
    {
      what: "reshape to 0-d",
      inputs: [rand([1, 1], 2)],
      gpu: ([t]) => t.reshape(),
      ref: ([t]) => reshaped(t, []),
    },
    {
      what: "reshape from 0-d",
      inputs: [rand([], 3)],
      gpu: ([t]) => t.reshape(1, 1, 1),
      ref: ([t]) => reshaped(t, [1, 1, 1]),
    },
  ]);
  const t = M.arange(6, undefined, 1, { dtype: "f32" });
  const v = t.reshape(2, 3);
  assert.equal(v.storage, t.storage, "reshape shares storage");
  v.dispose();
  assert.deepEqual([...await t.toArray()], [0, 1, 2, 3, 4, 5], "disposing a view keeps the base alive");
  t.dispose();
});

Deno.test("transpose and permute (including rank 4 and odd sizes): forward and gradients", async () => {
  const x = rand([3, 7, 13], 4);
  const y = rand([2, 3, 4, 5], 5);
  await checkOps([
    {
      what: "transpose() of [3,7,13]",
      inputs: [x],
      gpu: ([t]) => t.transpose(),
      ref: ([t]) => transposeRef(t, -2, -1),
    },
    {
      what: "transpose(0, 2) of [3,7,13]",
      inputs: [x],
      gpu: ([t]) => M.transpose(t, 0, 2),
      ref: ([t]) => transposeRef(t, 0, 2),
    },
    {
      what: "permute(2,0,1)",
      inputs: [x],
      gpu: ([t]) => t.permute(2, 0, 1),
      ref: ([t]) => permuteRef(t, [2, 0, 1]),
    },
    {
      what: "permute(-1,1,0) of [3,7,13]",
      inputs: [x],
      gpu: ([t]) => M.permute(t, [-1, 1, 0]),
      ref: ([t]) => permuteRef(t, [2, 1, 0]),
    },
    {
      what: "permute(3,1,0,2) of [2,3,4,5]",
      inputs: [y],
      gpu: ([t]) => t.permute(3, 1, 0, 2),
      ref: ([t]) => permuteRef(t, [3, 1, 0, 2]),
    },
    { what: "identity permute", inputs: [y], gpu: ([t]) => t.permute(0, 1, 2, 3), ref: ([t]) => t },
  ]);
});

Deno.test("narrow and slice (negative and clamped bounds): forward and gradients", async () => {
  const x = rand([5, 7, 3], 6);
  await checkOps([
    {
      what: "narrow(1, 2, 4)",
      inputs: [x],
      gpu: ([t]) => t.narrow(1, 2, 4),
      ref: ([t]) => narrowRef(t, 1, 2, 4),
    },
    {
      what: "narrow(0, 4, 1)",
      inputs: [x],
      gpu: ([t]) => M.narrow(t, 0, 4, 1),
      ref: ([t]) => narrowRef(t, 0, 4, 1),
    },
    {
      what: "narrow(-1, 1, 2)",
      inputs: [x],
      gpu: ([t]) => t.narrow(-1, 1, 2),
      ref: ([t]) => narrowRef(t, 2, 1, 2),
    },
    {
      what: "narrow of length 0",
      inputs: [x],
      gpu: ([t]) => t.narrow(1, 3, 0).sum(1),
      ref: () => ({ data: new Float64Array(15), shape: [5, 3] }),
      grad: false,
    },
    {
      what: "slice(1, 1, -1)",
      inputs: [x],
      gpu: ([t]) => t.slice(1, 1, -1),
      ref: ([t]) => narrowRef(t, 1, 1, 5),
    },
    {
      what: "slice(1, -3)",
      inputs: [x],
      gpu: ([t]) => M.slice(t, 1, -3),
      ref: ([t]) => narrowRef(t, 1, 4, 3),
    },
    {
      what: "slice(0, 2, 100) clamps",
      inputs: [x],
      gpu: ([t]) => t.slice(0, 2, 100),
      ref: ([t]) => narrowRef(t, 0, 2, 3),
    },
  ]);
});

Deno.test("cat, split and chunk: forward and gradients (pieces used unequally)", async () => {
  const a = rand([2, 3, 4], 7), b = rand([2, 5, 4], 8), c = rand([2, 1, 4], 9);
  const x = rand([7, 6], 10);
  const weights = [1, -2, 3, 0.5];
  await checkOps([
    {
      what: "cat dim 1 of [2,3,4],[2,5,4],[2,1,4]",
      inputs: [a, b, c],
      gpu: (ts) => M.cat(ts, 1),
      ref: (xs) => catRef(xs, 1),
    },
    {
      what: "cat dim -1",
      inputs: [a, a],
      gpu: ([t, u]) => M.cat([t, u], -1),
      ref: ([t, u]) => catRef([t, u], 2),
    },
    {
      what: "cat dim 0",
      inputs: [x, rand([2, 6], 11)],
      gpu: (ts) => M.cat(ts, 0),
      ref: (xs) => catRef(xs, 0),
    },
    {
      what: "cat where only the second input requires grad",
      inputs: [a, b],
      gpu: (ts) => M.cat(ts, 1),
      ref: (xs) => catRef(xs, 1),
      grad: [false, true],
    },
    { what: "cat of one tensor", inputs: [x], gpu: (ts) => M.cat(ts), ref: ([t]) => t },
    {
      what: "split(x, [2,4,1]) pieces scaled and re-joined",
      inputs: [x],
      gpu: ([t]) => {
        const parts = t.split([2, 4, 1]);
        return M.cat(parts.map((p, i) => p.mul(weights[i])), 0);
      },
      ref: ([t]) => {
        const parts = [narrowRef(t, 0, 0, 2), narrowRef(t, 0, 2, 4), narrowRef(t, 0, 6, 1)];
        return catRef(parts.map((p, i) => map1(p, (v) => v * weights[i])), 0);
      },
    },
    {
      what: "split(x, 4, dim 1): sizes 4 and 2; only the second used",
      inputs: [x],
      gpu: ([t]) => M.split(t, 4, 1)[1],
      ref: ([t]) => narrowRef(t, 1, 4, 2),
    },
    {
      what: "chunk(x, 3) of 7 rows: 3, 3, 1",
      inputs: [x],
      gpu: ([t]) => {
        const parts = t.chunk(3);
        assert.deepEqual(parts.map((p) => p.shape[0]), [3, 3, 1]);
        return M.cat([parts[2], parts[0].mul(2)], 0);
      },
      ref: ([t]) => catRef([narrowRef(t, 0, 6, 1), map1(narrowRef(t, 0, 0, 3), (v) => 2 * v)], 0),
    },
  ]);
});

Deno.test("pad (PyTorch order, constant value) and expand (-1, new leading dims): forward and gradients", async () => {
  const x = rand([2, 3, 4], 12);
  await checkOps([
    { what: "pad [1,2]", inputs: [x], gpu: ([t]) => M.pad(t, [1, 2]), ref: ([t]) => padRef(t, [1, 2]) },
    {
      what: "pad [0,0,3,0] value 1.5",
      inputs: [x],
      gpu: ([t]) => M.pad(t, [0, 0, 3, 0], 1.5),
      ref: ([t]) => padRef(t, [0, 0, 3, 0], 1.5),
    },
    {
      what: "pad all dims [1,1,2,0,0,3]",
      inputs: [x],
      gpu: ([t]) => M.pad(t, [1, 1, 2, 0, 0, 3]),
      ref: ([t]) => padRef(t, [1, 1, 2, 0, 0, 3]),
    },
    {
      what: "expand [3,1] -> [2,3,5]",
      inputs: [rand([3, 1], 13)],
      gpu: ([t]) => t.expand(2, 3, 5),
      ref: ([t]) => expandRef(t, [2, 3, 5]),
    },
    {
      what: "expand with -1",
      inputs: [rand([1, 4], 14)],
      gpu: ([t]) => M.expand(t, [3, -1]),
      ref: ([t]) => expandRef(t, [3, 4]),
    },
    {
      what: "expand a 0-d tensor",
      inputs: [rand([], 15)],
      gpu: ([t]) => t.expand(2, 2),
      ref: ([t]) => expandRef(t, [2, 2]),
    },
  ]);
});

Deno.test("pad: an i32 fill value that is not an int32 integer is an error naming pad (not full)", async () => {
  const i = M.ones([2], { dtype: "i32" });
  assert.throws(
    () => M.pad(i, [1, 1], 0.5),
    /pad: the value 0.5 for an i32 tensor \[2\] is not an int32 integer/,
  );
  assert.throws(() => M.pad(i, [1, 1], 2 ** 31), /pad: the value 2147483648 for an i32 tensor/);
  const ok = M.pad(i, [1, 0], -3);
  assert.deepEqual([...await ok.toArray()], [-3, 1, 1]);
  M.dispose([i, ok]);
});

Deno.test("shape ops on i32 tensors copy the bits exactly", async () => {
  const v = Int32Array.from({ length: 24 }, (_, i) => (i * 2654435761) | 0);
  const x = ndInt(v, [2, 3, 4]);
  const t = tensor(v, [2, 3, 4]);
  const outs = [
    t.permute(2, 0, 1),
    t.narrow(1, 1, 2),
    M.cat([t, t], 0),
    M.pad(t, [1, 0], -7),
    t.reshape(4, 6).transpose(),
    M.tensor(new Int32Array([5, -6]), [2, 1]).expand(2, 3),
  ];
  const refs = [
    permuteRef(x, [2, 0, 1]),
    narrowRef(x, 1, 1, 2),
    catRef([x, x], 0),
    padRef(x, [1, 0], -7),
    transposeRef(reshaped(x, [4, 6]), 0, 1),
    expandRef(ndInt([5, -6], [2, 1]), [2, 3]),
  ];
  const got = await readAll(outs);
  got.forEach((g, i) => {
    assert.ok(g instanceof Int32Array, `output ${i} is i32`);
    assert.deepEqual(outs[i].shape, refs[i].shape, `output ${i} shape`);
    assert.deepEqual([...g], [...refs[i].data], `output ${i}`);
  });
  for (const o of [t, ...outs]) o.dispose();
});

Deno.test("composite: shape ops chained with arithmetic give the right gradients", async () => {
  await checkOps(
    [{
      what: "sum(permute(pad(x)) * narrow(y)) style chain",
      inputs: [rand([3, 4], 16), rand([5, 3], 17)],
      gpu: ([x, y]) => M.pad(x, [1, 0]).transpose().mul(y.narrow(1, 0, 3)).expand(2, 5, 3),
      ref: ([x, y]) => {
        const px = transposeRef(padRef(x, [1, 0]), 0, 1);
        const ny = narrowRef(y, 1, 0, 3);
        return expandRef({ data: px.data.map((v, i) => v * ny.data[i]), shape: px.shape }, [2, 5, 3]);
      },
    }] satisfies OpCase[],
  );
});

Deno.test("copies that merge dims, move vec4 rows, or become buffer copies: forward and gradients", async () => {
  // (2, 5, 8) rows of 8 split into halves of 4: vec4 copies over merged (B*L) rows; narrow on dim 0 is one
  // contiguous run (a buffer copy); cat along 1 merges to (2, 10*8) boxes; an offset of 2 keeps it scalar.
  const x = rand([2, 5, 8], 18);
  await checkOps(
    [
      {
        what: "split halves of the last dim (vec4 rows), second half",
        inputs: [x],
        gpu: ([a]) => M.split(a, 4, -1)[1],
        ref: ([a]) => narrowRef(a, 2, 4, 4),
      },
      {
        what: "narrow(0, 1, 1): one contiguous run",
        inputs: [x],
        gpu: ([a]) => a.narrow(0, 1, 1),
        ref: ([a]) => narrowRef(a, 0, 1, 1),
      },
      {
        what: "cat along 1 of (2,5,8) twice",
        inputs: [x, rand([2, 5, 8], 19)],
        gpu: ([a, b]) => M.cat([a, b], 1),
        ref: ([a, b]) => catRef([a, b], 1),
      },
      {
        what: "narrow(2, 2, 4): rows at an offset that is not a multiple of 4",
        inputs: [x],
        gpu: ([a]) => a.narrow(2, 2, 4),
        ref: ([a]) => narrowRef(a, 2, 2, 4),
      },
    ] satisfies OpCase[],
  );
});

Deno.test("chunk and split reject counts and sizes that are not positive integers, as PyTorch", () => {
  const x = M.zeros([6, 2]);
  for (const bad of [0, -1, 1.5, NaN, Infinity]) {
    assert.throws(
      () => x.chunk(bad),
      new RegExp(`chunk: the number of chunks must be a positive integer, got ${bad}`),
    );
    assert.throws(() => x.split(bad), new RegExp(`split: size must be a positive integer, got ${bad}`));
  }
  assert.throws(() => x.split([2.5, 3.5]), /split: sizes \[2\.5,3\.5\] must be non-negative integers/);
  assert.throws(() => x.split([-1, 7]), /split: sizes \[-1,7\] must be non-negative integers/);
  // PyTorch's counts: 6 rows in 4 chunks are 3 pieces of 2; more chunks than rows, one row each.
  M.tidy(() => {
    assert.deepEqual(x.chunk(4).map((t) => t.shape[0]), [2, 2, 2]);
    assert.deepEqual(x.chunk(9).map((t) => t.shape[0]), [1, 1, 1, 1, 1, 1]);
    assert.deepEqual(x.split([0, 6]).map((t) => t.shape[0]), [0, 6]);
    assert.deepEqual(M.zeros([0, 2]).chunk(3).map((t) => t.shape), [[0, 2], [0, 2], [0, 2]]);
  });
  x.dispose();
});

Deno.test("copyBox within one storage (overlapping boxes, contiguous and strided, accumulate) goes through a temporary", async () => {
  const host = Float32Array.from({ length: 16 }, (_, i) => i + 1);
  const cases: { what: string; from: M.Box; to: M.Box; shape: number[]; acc?: boolean }[] = [
    {
      what: "contiguous, shifted right by 3 (overlapping)",
      from: { offset: 0, strides: [1] },
      to: { offset: 3, strides: [1] },
      shape: [10],
    },
    {
      what: "contiguous, shifted left by 2 (overlapping)",
      from: { offset: 2, strides: [1] },
      to: { offset: 0, strides: [1] },
      shape: [12],
    },
    {
      what: "strided 2x4 box onto its transpose",
      from: { offset: 0, strides: [4, 1] },
      to: { offset: 1, strides: [1, 4] },
      shape: [2, 4],
    },
    {
      what: "accumulate onto an overlapping box",
      from: { offset: 0, strides: [1] },
      to: { offset: 1, strides: [1] },
      shape: [8],
      acc: true,
    },
  ];
  for (const c of cases) {
    const t = tensor(host);
    const alias = t.detach(); // another tensor on the same storage
    const want = Float64Array.from(host);
    const coords = (shape: number[]): number[][] =>
      shape.reduce<number[][]>(
        (acc, n) => acc.flatMap((p) => Array.from({ length: n }, (_, i) => [...p, i])),
        [[]],
      );
    const at = (b: M.Box, p: number[]) => b.offset + p.reduce((o, v, d) => o + v * b.strides[d], 0);
    const moved = coords(c.shape).map((p) => [at(c.to, p), host[at(c.from, p)]]);
    for (const [i, v] of moved) want[i] = c.acc ? want[i] + v : v;
    M.copyBox(alias, c.from, t, c.to, c.shape, c.acc);
    assert.deepEqual([...await t.toArray()], [...want], c.what);
    t.dispose();
    alias.dispose();
  }
});

Deno.test("copyBox: a box past either tensor's storage, a negative offset or a bad stride is named, and nothing moves", async () => {
  const src = tensor([1, 2, 3, 4, 5, 6], [2, 3]);
  const dst = tensor(new Float32Array(6).fill(9), [2, 3]);
  const row = (offset: number, strides = [3, 1]) => ({ offset, strides });
  const bad: [M.Box, M.Box, number[], RegExp][] = [
    [
      row(4),
      row(0),
      [2, 3],
      /the source box \[2, 3\] at offset 4 with strides \[3, 1\] reaches element 9, past the 6 of/,
    ],
    [row(0), row(5), [2, 3], /the destination box \[2, 3\] at offset 5 .*reaches element 10, past the 6/],
    [row(1, [4]), row(0, [1]), [3], /the source box \[3\] at offset 1 with strides \[4\] reaches element 9/],
    [
      row(-1),
      row(0),
      [2, 3],
      /source box .*needs an integer offset >= 0 and one integer stride >= 0 per dim/,
    ],
    [row(0, [3]), row(0), [2, 3], /source box .*one integer stride >= 0 per dim/],
    [row(0, [3, 0.5]), row(0), [2, 3], /source box .*integer stride/],
  ];
  for (const [from, to, shape, want] of bad) {
    assert.throws(() => M.copyBox(src, from, dst, to, shape), want);
    assert.deepEqual([...await dst.toArray()], new Array(6).fill(9), "nothing written");
  }
  M.copyBox(src, row(3, [1]), dst, row(0, [1]), [3]); // the last row, to the start: in bounds
  assert.deepEqual([...await dst.toArray()], [4, 5, 6, 9, 9, 9]);
  src.dispose();
  dst.dispose();
});

Deno.test("packInto writes parts end to end at an offset in one dispatch per 7 parts (f32, i32, empty parts); bad calls are errors", async () => {
  const live0 = M.memory().liveTensors;
  const sizes = [3, 0, 5, 1, 8, 2, 4, 6, 7]; // 9 parts: two dispatches, one empty part
  const parts = sizes.map((n, j) =>
    j === 3
      ? tensor(new Int32Array([-123456789]), [1])
      : tensor(Float32Array.from({ length: n }, (_, i) => 100 * j + i + 0.25), [n])
  );
  const total = sizes.reduce((a, b) => a + b, 0);
  const dst = tensor(new Float32Array(total + 7).fill(-1), [total + 7]);
  const d0 = M.dispatchCount();
  M.packInto(dst, parts, 5);
  assert.equal(M.dispatchCount() - d0, 2, "7 non-empty parts in the first dispatch, 1 in the second");
  const got = new Uint32Array((await dst.toArray()).buffer);
  const expect = new Uint32Array(total + 7);
  expect.set(new Uint32Array(new Float32Array(total + 7).fill(-1).buffer));
  let at = 5;
  for (const p of parts) {
    const words = new Uint32Array((await p.toArray()).buffer);
    expect.set(words, at);
    at += words.length;
  }
  assert.deepEqual([...got], [...expect], "the parts' bits in order from element 5; the rest untouched");
  assert.throws(() => M.packInto(dst, parts, 8), /packInto: 36 elements from 8 do not fit/);
  // Buffers larger than one binding window (here: the limit cut to 256 bytes) go by buffer copies.
  const limits = M.deviceInfo().limits as { maxStorageBufferBindingSize: number };
  const real = limits.maxStorageBufferBindingSize;
  const big = tensor(new Float32Array(100).fill(-1), [100]);
  limits.maxStorageBufferBindingSize = 256;
  try {
    const d1 = M.dispatchCount();
    M.packInto(big, [parts[0], parts[2]], 90);
    assert.equal(M.dispatchCount() - d1, 0, "copies, no dispatch");
  } finally {
    limits.maxStorageBufferBindingSize = real;
  }
  const tail = [...(await big.toArray()).slice(88)];
  assert.deepEqual(tail, [-1, -1, 0.25, 1.25, 2.25, 200.25, 201.25, 202.25, 203.25, 204.25, -1, -1]);
  big.dispose();
  const view = dst.reshape(total + 7);
  assert.throws(() => M.packInto(dst, [view], 0), /shares its storage/);
  M.dispose([parts, dst, view]);
  assert.equal(M.memory().liveTensors, live0);
});
