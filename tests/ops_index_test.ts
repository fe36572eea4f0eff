import assert from "node:assert/strict";
import * as M from "./library.ts";
import { tensor } from "../mod.ts";
import {
  checkOps,
  gatherRef,
  indexSelectRef,
  kernelsRun,
  ndInt,
  type OpCase,
  rand,
  randInts,
  setup,
} from "./helpers.ts";

await setup();

Deno.test("indexSelect along each dim, with 1-D, 2-D and 0-d indices and repeats: forward and gradients", async () => {
  const x = rand([5, 7, 3], 1);
  const cases: OpCase[] = [
    { idx: ndInt([4, 0, 4, 2, 4], [5]), dim: 0 },
    { idx: ndInt([6, 6, 1, 0, 3, 6], [2, 3]), dim: 1 },
    { idx: ndInt([2, 0, 2, 2], [4]), dim: 2 },
    { idx: ndInt([1, 2, 1], [3]), dim: -1 },
    { idx: ndInt([3], []), dim: 0 },
    { idx: ndInt([], [0]), dim: 1 },
  ].map(({ idx, dim }) => ({
    what: `indexSelect(dim ${dim}, index [${idx.shape}] = ${[...idx.data]})`,
    inputs: [x, idx],
    gpu: ([t, i]) => M.indexSelect(t, dim, i),
    ref: ([t, i]) => indexSelectRef(t, dim, i),
  }));
  cases.push({
    what: "embedding lookup: indexSelect of a [50,8] table by [4,6] token ids",
    inputs: [rand([50, 8], 2), ndInt(randInts(24, 3, 0, 49), [4, 6])],
    gpu: ([t, i]) => M.indexSelect(t, 0, i),
    ref: ([t, i]) => indexSelectRef(t, 0, i),
  });
  await checkOps(cases);
});

Deno.test("gather along each dim of a 3-D tensor (PyTorch semantics), repeats accumulate", async () => {
  const x = rand([3, 4, 5], 4);
  const cases: OpCase[] = [
    { dim: 0, shape: [2, 4, 5], hi: 2 },
    { dim: 1, shape: [3, 6, 5], hi: 3 },
    { dim: 2, shape: [3, 4, 7], hi: 4 },
    { dim: -1, shape: [3, 4, 1], hi: 4 },
  ].map(({ dim, shape, hi }, k) => {
    const idx = ndInt(randInts(shape.reduce((a, b) => a * b), 10 + k, 0, hi), shape);
    return {
      what: `gather(dim ${dim}, index [${shape}])`,
      inputs: [x, idx],
      gpu: ([t, i]) => M.gather(t, dim, i),
      ref: ([t, i]) => gatherRef(t, dim, i),
    };
  });
  await checkOps(cases);
});

Deno.test("indexSelect embedding backward (sorted buckets) with 40000 positions and heavy repeats is exact", async () => {
  // Integer cotangents: every per-row sum is an integer below 2^24, so the gradient must be exact.
  const J = 40000, V = 10, D = 3;
  const idx = randInts(J, 5, 0, V - 1);
  const g = randInts(J * D, 6, -4, 4);
  const x = M.randn([V, D], { seed: 7, requiresGrad: true });
  const y = M.indexSelect(x, 0, tensor(Int32Array.from(idx)));
  y.backward(tensor(Float32Array.from(g), [J, D]));
  const expected = new Float64Array(V * D);
  for (let j = 0; j < J; j++) for (let d = 0; d < D; d++) expected[idx[j] * D + d] += g[j * D + d];
  assert.deepEqual([...await x.grad!.toArray()], [...expected]);
  x.grad!.dispose();
  x.dispose();
  y.dispose();
});

Deno.test("index gradients over 70000 positions in slices of 16384 (indexSelect with outer > 1, gather) are exact", async () => {
  // 70000 positions: four slices of 16384 and one of 4464, each adding to those before (one loop over all
  // of them would stop at 65535 on software adapters). Integer cotangents: every sum is an integer below
  // 2^24, so the gradient must be exact.
  const J = 70000, V = 6, D = 3, O = 2;
  const idx = randInts(J, 8, 0, V - 1);
  // indexSelect along dim 1 of (O, V, D): outer = 2, each (o, d) reading the same buckets.
  {
    const g = randInts(O * J * D, 9, -4, 4);
    const x = M.randn([O, V, D], { seed: 10, requiresGrad: true });
    const ids = tensor(Int32Array.from(idx));
    const y = M.indexSelect(x, 1, ids);
    const gt = tensor(Float32Array.from(g), [O, J, D]);
    y.backward(gt);
    const want = new Float64Array(O * V * D);
    for (let o = 0; o < O; o++) {
      for (let j = 0; j < J; j++) {
        for (let d = 0; d < D; d++) want[(o * V + idx[j]) * D + d] += g[(o * J + j) * D + d];
      }
    }
    assert.deepEqual([...await x.grad!.toArray()], [...want], "indexSelect(dim 1) gradient");
    for (const t of [x.grad!, x, ids, y, gt]) t.dispose();
  }
  // gather along dim 0 of (V, D) with a (J, D) index: out[j, d] = x[index[j, d], d].
  {
    const gidx = randInts(J * D, 11, 0, V - 1);
    const g = randInts(J * D, 12, -4, 4);
    const x = M.randn([V, D], { seed: 13, requiresGrad: true });
    const ids = tensor(Int32Array.from(gidx), [J, D]);
    const y = M.gather(x, 0, ids);
    const gt = tensor(Float32Array.from(g), [J, D]);
    y.backward(gt);
    const want = new Float64Array(V * D);
    for (let j = 0; j < J; j++) for (let d = 0; d < D; d++) want[gidx[j * D + d] * D + d] += g[j * D + d];
    assert.deepEqual([...await x.grad!.toArray()], [...want], "gather(dim 0) gradient");
    for (const t of [x.grad!, x, ids, y, gt]) t.dispose();
  }
});

Deno.test("embedding with paddingIdx: that row's gradient is zero, without it the row gets the sum", async () => {
  // Integer cotangents: every sum is exact. Few rows with long buckets, and as many rows as positions.
  for (const [J, V, D] of [[300, 10, 3], [4100, 4100, 1]] as const) {
    const path = "index_select_backward";
    const pad = 3;
    const idx = randInts(J, 20, 0, V - 1);
    for (let j = 0; j < J; j += 7) idx[j] = pad; // the padding id appears often
    const g = randInts(J * D, 21, -4, 4);
    const sums = new Float64Array(V * D);
    for (let j = 0; j < J; j++) for (let d = 0; d < D; d++) sums[idx[j] * D + d] += g[j * D + d];
    for (const paddingIdx of [null, pad, pad - V]) {
      const what = `J ${J}, V ${V}, paddingIdx ${paddingIdx}`;
      const x = M.randn([V, D], { seed: 22, requiresGrad: true });
      const ids = tensor(Int32Array.from(idx), [J], { dtype: "i32" });
      const y = M.embedding(x, ids, paddingIdx);
      const gt = tensor(Float32Array.from(g), [J, D]);
      const { kernels } = await kernelsRun(() => y.backward(gt));
      assert.ok(kernels.includes(path), `${what}: ${path} ran (got ${kernels})`);
      const grad = await x.grad!.toArray();
      const want = sums.slice();
      if (paddingIdx !== null) want.fill(0, pad * D, (pad + 1) * D);
      assert.deepEqual([...grad], [...want], what);
      // The forward still reads the padding row.
      const xs = await x.toArray();
      const ys = await y.toArray();
      assert.deepEqual([...ys.slice(0, D)], [...xs.slice(pad * D, (pad + 1) * D)], `${what}: forward`);
      for (const t of [x.grad!, x, ids, y, gt]) t.dispose();
    }
  }
  const w = M.zeros([4, 2]);
  const ids = tensor(new Int32Array([0]), [1], { dtype: "i32" });
  assert.throws(() => M.embedding(w, ids, 4), /paddingIdx must be an integer in \[-4, 4\) or null, got 4/);
  assert.throws(() => M.embedding(w, ids, 1.5), /paddingIdx must be an integer/);
  M.dispose([w, ids]);
});

Deno.test("index ops: i32 tables, out-of-range indices read NaN (i32: its bits), bad indices are rejected", async () => {
  const table = tensor(new Int32Array([10, 11, 12, 20, 21, 22]), [2, 3]);
  const picked = M.indexSelect(table, 0, tensor(new Int32Array([1, 1, 0])));
  assert.equal(picked.dtype, "i32");
  assert.deepEqual([...await picked.toArray()], [20, 21, 22, 20, 21, 22, 10, 11, 12]);
  const pickedOob = M.indexSelect(table, 0, tensor(new Int32Array([2, -1])));
  assert.deepEqual([...await pickedOob.toArray()], new Array(6).fill(0x7fc00000), "i32 rows out of range");
  pickedOob.dispose();
  const f = tensor([[1, 2], [3, 4]]);
  const oob = M.indexSelect(f, 0, tensor(new Int32Array([1, 2, -1])));
  const v = await oob.toArray();
  assert.deepEqual([...v.slice(0, 2)], [3, 4]);
  assert.ok(v.slice(2).every(Number.isNaN), `out-of-range rows are NaN, got ${[...v]}`);
  assert.throws(() => M.indexSelect(f, 0, tensor([0, 1])), /indices must be an i32 tensor, got f32/);
  assert.throws(() => M.gather(f, 0, tensor([[0, 1]])), /indices must be an i32 tensor/);
  assert.throws(
    () => M.gather(f, 1, tensor(new Int32Array([0, 1, 0]), [3, 1])),
    /gather: index \[3, 1\] must match x \[2, 2\]/,
  );
  assert.throws(() => M.indexSelect(f, 2, tensor(new Int32Array([0]))), /dim 2 is out of range/);
  for (const t of [table, picked, f, oob]) t.dispose();
});

Deno.test("embedding gradient: each row sums its positions in increasing order (float32, bit for bit), out-of-range ids pass nothing, a non-finite cotangent reaches its own row only", async () => {
  // Sizes around powers of two (the bitonic sort pads to one), one row, more rows than positions, and past
  // 16384 positions (the sums run in windows of that many sorted slots, each adding to the ones before).
  const sizes: [number, number, number][] = [
    [1, 1, 2],
    [2, 3, 1],
    [3, 1, 4],
    [5, 7, 3],
    [64, 5, 2],
    [65, 70, 2],
    [1000, 37, 5],
    [4097, 300, 2],
    [40000, 9, 2],
  ];
  for (const [J, V, D] of sizes) {
    const what = `J ${J}, V ${V}, D ${D}`;
    // ids from -2 to V + 1: out-of-range ones read NaN and get no gradient (PyTorch would raise); every
    // third position a valid id, so that small cases have some
    const idx = randInts(J, 30 + J, -2, V + 1);
    for (let j = 0; j < J; j += 3) idx[j] = (j / 3) % V;
    const g = Float32Array.from(rand([J, D], 31 + J).data);
    const want = new Float32Array(V * D); // float32 running sums in increasing j: the kernel's order
    for (let j = 0; j < J; j++) {
      if (idx[j] < 0 || idx[j] >= V) continue;
      for (let d = 0; d < D; d++) want[idx[j] * D + d] = Math.fround(want[idx[j] * D + d] + g[j * D + d]);
    }
    const x = M.randn([V, D], { seed: 32, requiresGrad: true });
    const ids = tensor(Int32Array.from(idx), [J], { dtype: "i32" });
    const gt = tensor(g, [J, D]);
    const y = M.embedding(x, ids);
    y.backward(gt, { retainGraph: true });
    assert.deepEqual([...await x.grad!.toArray()], [...want], what);
    x.grad!.dispose();
    x.grad = null;
    // A NaN and an inf at two positions of valid rows: only those rows' columns change (the one-hot matmul
    // this path replaced spread NaN over every row)
    const valid = [...idx.keys()].filter((j) => idx[j] >= 0 && idx[j] < V);
    if (valid.length >= 2 && idx[valid[0]] !== idx[valid[1]]) {
      const bad = g.slice();
      bad[valid[0] * D] = NaN;
      bad[valid[1] * D] = Infinity;
      const gb = tensor(bad, [J, D]);
      y.backward(gb);
      const got = await x.grad!.toArray();
      for (let v = 0; v < V; v++) {
        for (let d = 0; d < D; d++) {
          const i = v * D + d;
          const expect = d === 0 && v === idx[valid[0]]
            ? NaN
            : d === 0 && v === idx[valid[1]]
            ? Infinity
            : want[i];
          assert.ok(
            Object.is(got[i], expect),
            `${what}: non-finite cotangent: grad[${v}, ${d}] = ${got[i]}, want ${expect}`,
          );
        }
      }
      M.dispose([gb, x.grad!]);
    }
    M.dispose([x, ids, gt, y]);
  }
});
