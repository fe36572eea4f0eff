import assert from "node:assert/strict";
import * as M from "./library.ts";
import {
  checkOps,
  map1,
  map2,
  matmulRef,
  type Nd,
  nd,
  type OpCase,
  rand,
  randInts,
  setup,
  toTensor,
  transposeRef,
  withPlans,
} from "./helpers.ts";
import { matmulRaw } from "../core/ops/matmul.ts";

await setup();

interface MatmulForm {
  a: number[];
  b: number[];
  transA?: boolean;
  transB?: boolean;
}

function matmulCase(f: MatmulForm, seed: number, extra: Partial<OpCase> = {}): OpCase {
  const opts = { transA: f.transA, transB: f.transB };
  return {
    what: `matmul [${f.a}]${f.transA ? "^T" : ""} @ [${f.b}]${f.transB ? "^T" : ""}`,
    inputs: [rand(f.a, seed), rand(f.b, seed + 1)],
    gpu: ([a, b]) => M.matmul(a, b, opts),
    ref: ([a, b]) => matmulRef(a, b, opts),
    // f32 dot products are accurate relative to sum |a_k b_k| (the entries of |A| @ |B|), not to a result
    // that cancels: use that as the error scale.
    scale: ([a, b]) => matmulRef(map1(a, Math.abs), map1(b, Math.abs), opts),
    ...extra,
  };
}

/**
 * Analytic float64 gradients of sum((op(A) @ op(B)) * G) for 2-D A and B: d op(A) = G op(B)^T and
 * d op(B) = op(A)^T G, transposed back where the operand was transposed.
 */
function matmul2dGrad(transA: boolean, transB: boolean) {
  return ([a, b]: Nd[], G: Nd): Nd[] => {
    const opA = transA ? transposeRef(a, 0, 1) : a;
    const opB = transB ? transposeRef(b, 0, 1) : b;
    const dOpA = matmulRef(G, transposeRef(opB, 0, 1));
    const dOpB = matmulRef(transposeRef(opA, 0, 1), G);
    return [transA ? transposeRef(dOpA, 0, 1) : dOpA, transB ? transposeRef(dOpB, 0, 1) : dOpB];
  };
}

Deno.test("matmul 2-D with transA/transB, odd sizes 7x13x5: forward and gradients", async () => {
  await checkOps([
    matmulCase({ a: [7, 13], b: [13, 5] }, 1),
    matmulCase({ a: [13, 7], b: [13, 5], transA: true }, 3),
    matmulCase({ a: [7, 13], b: [5, 13], transB: true }, 5),
    matmulCase({ a: [13, 7], b: [5, 13], transA: true, transB: true }, 7),
    matmulCase({ a: [1, 1], b: [1, 1] }, 9),
    matmulCase({ a: [1, 13], b: [13, 1] }, 11),
  ]);
});

Deno.test("matmul batched with broadcasting over leading dims (and transposes): forward and gradients", async () => {
  await checkOps([
    matmulCase({ a: [2, 3, 7, 13], b: [13, 5] }, 21),
    matmulCase({ a: [7, 13], b: [3, 13, 5] }, 23),
    matmulCase({ a: [2, 1, 4, 6], b: [3, 6, 5] }, 25),
    matmulCase({ a: [3, 6, 4], b: [1, 5, 6], transA: true, transB: true }, 27),
    matmulCase({ a: [2, 1, 6, 4], b: [1, 3, 6, 5], transA: true }, 29),
    matmulCase({ a: [4, 3, 5], b: [4, 5, 2] }, 31),
    matmulCase({ a: [3, 7, 13], b: [5, 13], transB: true }, 33), // a weight's gradient folds the batch
    matmulCase({ a: [1, 9, 4], b: [4, 6] }, 35),
  ]);
});

Deno.test("matmul with 1-D operands (vector-matrix, matrix-vector, dot, batched)", async () => {
  await checkOps([
    matmulCase({ a: [13], b: [13, 5] }, 41),
    matmulCase({ a: [7, 13], b: [13] }, 43),
    matmulCase({ a: [13], b: [13] }, 45),
    matmulCase({ a: [2, 7, 13], b: [13] }, 47),
    matmulCase({ a: [13], b: [2, 13, 5] }, 49),
    matmulCase({ a: [13], b: [5, 13], transB: true }, 51),
    matmulCase({ a: [13, 7], b: [13], transA: true }, 53),
  ]);
});

Deno.test("matmul with a 1-D operand leaves no tensor behind (no grad, backward, tidy without backward); gradients of a 1-D operand used twice", async () => {
  const forms: MatmulForm[] = [
    { a: [13], b: [13, 5] },
    { a: [7, 13], b: [13] },
    { a: [13], b: [13] },
    { a: [2, 7, 13], b: [13] },
    { a: [13], b: [5, 13], transB: true },
  ];
  for (const f of forms) {
    for (const mode of ["no grad", "backward", "tidy"] as const) {
      const what = `[${f.a}] @ [${f.b}]${f.transB ? "^T" : ""}, ${mode}`;
      const before = M.memory();
      const a = toTensor(rand(f.a, 60), mode !== "no grad");
      const b = toTensor(rand(f.b, 61), mode !== "no grad");
      if (mode === "tidy") {
        M.tidy(() => void M.matmul(a, b, f));
      } else {
        const y = M.matmul(a, b, f);
        await y.toArray();
        if (mode === "backward") {
          const s = M.sum(y);
          s.backward();
          for (const t of [s, a.grad!, b.grad!]) t.dispose();
        }
        y.dispose();
      }
      a.dispose();
      b.dispose();
      const after = M.memory();
      assert.equal(after.liveTensors, before.liveTensors, `${what}: live tensors`);
      assert.equal(after.liveBytes, before.liveBytes, `${what}: live bytes`);
      assert.equal(after.savedBytes, before.savedBytes, `${what}: saved bytes`);
    }
  }
  // Mismatched inner dims with a 1-D operand: an error naming the views' shapes, and nothing left behind.
  const [m, w] = [M.zeros([4, 5]), M.zeros([6])];
  const live = M.memory().liveTensors;
  assert.throws(() => M.matmul(m, w), /inner dims differ: \[4, 5\] @ \[6, 1\] \(5 vs 6\)/);
  assert.throws(() => M.matmul(w, m), /inner dims differ: \[1, 6\] @ \[4, 5\] \(6 vs 4\)/);
  assert.equal(M.memory().liveTensors, live, "live tensors after the errors");
  m.dispose();
  w.dispose();
  // loss = v . (A v) + sum(v): v's gradient gathers three contributions, A's one.
  const [ar, vr] = [rand([6, 6], 62), rand([6], 63)];
  const A = toTensor(ar, true);
  const v = toTensor(vr, true);
  M.tidy(() => M.add(M.matmul(v, M.matmul(A, v)), M.sum(v)).backward());
  const [gA, gv] = [await A.grad!.toArray(), await v.grad!.toArray()];
  for (let i = 0; i < 6; i++) {
    let want = 1; // d/dv_i of v^T A v + sum(v) = (A v)_i + (A^T v)_i + 1
    for (let j = 0; j < 6; j++) {
      want += ar.data[i * 6 + j] * vr.data[j] + ar.data[j * 6 + i] * vr.data[j];
      const wA = vr.data[i] * vr.data[j];
      assert.ok(Math.abs(gA[i * 6 + j] - wA) < 1e-5 * Math.max(1, Math.abs(wA)), `gA[${i},${j}]`);
    }
    assert.ok(Math.abs(gv[i] - want) < 1e-5 * Math.max(1, Math.abs(want)), `gv[${i}]: ${gv[i]} vs ${want}`);
  }
  for (const t of [A.grad!, v.grad!, A, v]) t.dispose();
});

Deno.test("matmul across tile edges (33x65x31, 67x129x45) with analytic gradients", async () => {
  const cases: OpCase[] = [];
  for (const [m, k, n] of [[33, 65, 31], [67, 129, 45], [64, 64, 64], [1, 200, 97]]) {
    for (const [tA, tB] of [[false, false], [true, false], [false, true], [true, true]]) {
      cases.push(
        matmulCase({ a: tA ? [k, m] : [m, k], b: tB ? [n, k] : [k, n], transA: tA, transB: tB }, m + k + n, {
          refGrad: matmul2dGrad(tA, tB),
        }),
      );
    }
  }
  await checkOps(cases);
});

Deno.test("matmul with K > 16384 (K split into slices) is exact on integer data; gradients too", async () => {
  // Small integers: every product and partial sum is an integer below 2^24, so f32 is exact and a
  // dropped or doubled K slice shows as a wrong value.
  const K = 40000;
  const ints = (shape: number[], seed: number) => nd(randInts(shape[0] * shape[1], seed, -3, 3), shape);
  const exact = { rtol: 0, atol: 0 };
  const cases: OpCase[] = [
    {
      what: `matmul [3,${K}] @ [${K},4]`,
      inputs: [ints([3, K], 1), ints([K, 4], 2)],
      gpu: ([a, b]) => M.matmul(a, b),
      ref: ([a, b]) => matmulRef(a, b),
      tol: exact,
      refGrad: matmul2dGrad(false, false),
    },
    {
      what: `matmul [${K},3]^T @ [4,${K}]^T`,
      inputs: [ints([K, 3], 3), ints([4, K], 4)],
      gpu: ([a, b]) => M.matmul(a, b, { transA: true, transB: true }),
      ref: ([a, b]) => matmulRef(a, b, { transA: true, transB: true }),
      tol: exact,
      refGrad: matmul2dGrad(true, true),
    },
  ];
  await checkOps(cases);
});

Deno.test("matmul of weight-gradient shapes (small C, long K: split over K) with analytic gradients", async () => {
  const cases: OpCase[] = [];
  for (const [m, k, n] of [[33, 1000, 32], [7, 300, 1], [64, 520, 16]]) {
    for (const [tA, tB] of [[true, false], [false, true]]) {
      cases.push(
        matmulCase({ a: tA ? [k, m] : [m, k], b: tB ? [n, k] : [k, n], transA: tA, transB: tB }, m + k + n, {
          refGrad: matmul2dGrad(tA, tB),
        }),
      );
    }
  }
  cases.push(matmulCase({ a: [2, 600, 9], b: [600, 5], transA: true }, 91));
  await checkOps(cases);
});

Deno.test("matmul with more than 65535 workgroups (65600 batched 2x3 @ 3x2; forward)", async () => {
  // One workgroup per batch entry here: the dispatch is folded into two dimensions. Forward only: on
  // software adapters each of these dispatches takes seconds (per-workgroup overhead).
  await checkOps([matmulCase({ a: [65600, 2, 3], b: [65600, 3, 2] }, 61, { grad: false })]);
});

Deno.test("matmul errors: inner dims (with transposes), rank 0, dtype, batch dims that do not broadcast", () => {
  M.tidy(() => {
    const a = M.zeros([2, 3]), b = M.zeros([4, 5]), c = M.zeros([2, 3, 4]), d = M.zeros([3, 4, 5]);
    assert.throws(() => M.matmul(a, b), /inner dims differ: \[2, 3\] @ \[4, 5\] \(3 vs 4\)/);
    assert.throws(() => M.matmul(a, a), /\[2, 3\] @ \[2, 3\] \(3 vs 2\)/);
    assert.throws(() => M.matmul(a, b, { transA: true }), /\[2, 3\]\^T @ \[4, 5\] \(2 vs 4\)/);
    assert.throws(() => M.matmul(M.zeros([]), a), /rank >= 1/);
    assert.throws(
      () => M.matmul(M.zeros([2, 3], { dtype: "i32" }), M.zeros([3, 2])),
      /matmul needs f32 tensors/,
    );
    assert.throws(() => M.matmul(c, d), /shapes \[2\] and \[3\] cannot be broadcast/);
  });
});

Deno.test("matmul with empty dims: M = 0 gives an empty result, K = 0 gives zeros", async () => {
  await checkOps([
    matmulCase({ a: [0, 5], b: [5, 3] }, 71),
    matmulCase({ a: [3, 0], b: [0, 4] }, 73),
    matmulCase({ a: [2, 3, 0], b: [0, 4] }, 75),
  ]);
});

Deno.test("matmul adds into an operand's gradient in place when it is used elsewhere too; into a given tensor (split K)", async () => {
  // loss = sum(x * (x W)): the product consumes the matmul's output, so its backward runs first and gives x a
  // gradient of its own (x W), into which the matmul's backward adds x W^T in place (targets.sum).
  const [xr, wr] = [rand([2, 9, 5], 1), rand([5, 5], 2)];
  const x = toTensor(xr, true);
  const w = toTensor(wr, true);
  M.tidy(() => M.sum(M.mul(x, M.matmul(x, w))).backward());
  const want = new Float64Array(2 * 9 * 5);
  for (let r = 0; r < 18; r++) {
    for (let k = 0; k < 5; k++) {
      for (let n = 0; n < 5; n++) {
        want[r * 5 + k] += xr.data[r * 5 + n] * (wr.data[n * 5 + k] + wr.data[k * 5 + n]);
      }
    }
  }
  const got = await x.grad!.toArray();
  for (let i = 0; i < want.length; i++) {
    assert.ok(
      Math.abs(got[i] - want[i]) < 1e-5 * Math.max(1, Math.abs(want[i])),
      `gx[${i}]: ${got[i]} vs ${want[i]}`,
    );
  }
  for (const t of [x.grad!, w.grad!, x, w]) t.dispose();
  // matmulRaw(..., into) with a small C and a long K: as this adapter plans it, and as a GPU does (split over
  // K into slices of 32: K 1000 in 32 partial products, summed in one pass that adds into `into`; K 3000 in
  // 94, whose sum takes two passes, the second adding)
  for (const K of [1000, 3000]) {
    const [a, b, c0] = [rand([4, K], 5), rand([K, 3], 6), rand([4, 3], 7)];
    const ref = matmulRef(a, b);
    for (const plans of [{}, { gpu: true, split: true }]) {
      const [ta, tb, into] = [toTensor(a), toTensor(b), toTensor(c0)];
      try {
        const out = await withPlans(plans, () => matmulRaw(ta, tb, {}, undefined, into));
        assert.equal(out, into);
        const res = await into.toArray();
        const what = `K ${K}, ${plans.gpu ? "GPU plans" : "this adapter's plans"}`;
        for (let i = 0; i < 12; i++) {
          const e = ref.data[i] + c0.data[i];
          // the op bound against the sum's own error scale (tests/ops_fuzz_test.ts): f32 rounds each of the K
          // products relative to its size, and the roundings add up like the root of the sum of their
          // squares; measured on lavapipe 2.8e-6 of that scale (the bound was 1e-3 of max(1, |e|) before
          // 2026-11-30)
          let sq = c0.data[i] ** 2;
          for (let k = 0; k < K; k++) sq += (a.data[(i / 3 | 0) * K + k] * b.data[k * 3 + i % 3]) ** 2;
          const scale = Math.max(1, Math.abs(e), Math.sqrt(sq));
          assert.ok(Math.abs(res[i] - e) <= 1e-5 * scale, `${what}: into[${i}]: ${res[i]} vs ${e}`);
        }
      } finally {
        for (const t of [ta, tb, into]) t.dispose();
      }
    }
  }
  const [a, b] = [rand([4, 3000], 5), rand([3000, 3], 6)];
  M.tidy(() =>
    assert.throws(
      () => matmulRaw(toTensor(a), toTensor(b), {}, undefined, M.zeros([4, 4])),
      /cannot add a \[4, 3\] product into/,
    )
  );
});

/** A matmulAdd case: c + op(a) @ op(b), with analytic gradients where 2-D. */
function matmulAddCase(f: MatmulForm & { c: number[] }, seed: number, extra: Partial<OpCase> = {}): OpCase {
  const opts = { transA: f.transA, transB: f.transB };
  return {
    what: `matmulAdd [${f.c}] + [${f.a}]${f.transA ? "^T" : ""} @ [${f.b}]${f.transB ? "^T" : ""}`,
    inputs: [rand(f.a, seed), rand(f.b, seed + 1), rand(f.c, seed + 2)],
    gpu: ([a, b, c]) => M.matmulAdd(a, b, c, opts),
    ref: ([a, b, c]) => map2(matmulRef(a, b, opts), c, (p, q) => p + q),
    // the product's own error scale, plus |c|
    scale: ([a, b, c]) =>
      map2(matmulRef(map1(a, Math.abs), map1(b, Math.abs), opts), c, (p, q) => p + Math.abs(q)),
    ...extra,
  };
}

Deno.test("matmulAdd: c + op(a) @ op(b) with transposes, batched (a layer's x W^T + residual) and split over K; gradients to all three", async () => {
  const grad2d =
    (tA: boolean, tB: boolean) => ([a, b]: Nd[], G: Nd) => [...matmul2dGrad(tA, tB)([a, b], G), G];
  const cases: OpCase[] = [];
  for (const [tA, tB] of [[false, false], [true, false], [false, true], [true, true]]) {
    const [m, k, n] = [7, 13, 5];
    cases.push(matmulAddCase(
      { a: tA ? [k, m] : [m, k], b: tB ? [n, k] : [k, n], c: [m, n], transA: tA, transB: tB },
      11 + m,
      { refGrad: grad2d(tA, tB) },
    ));
  }
  // out_proj's shape: (B, L, ED) @ W^T (D, ED) + residual (B, L, D); finite differences for the batched case
  cases.push(matmulAddCase({ a: [2, 9, 12], b: [8, 12], c: [2, 9, 8], transB: true }, 31));
  // small C, long K: split over K where this adapter splits it, its slices summed and then added into c's copy
  const split = matmulAddCase({ a: [4, 3000], b: [3000, 3], c: [4, 3] }, 41, {
    refGrad: grad2d(false, false),
  });
  await checkOps([...cases, split]);
  // ... and as a GPU plans it: split into slices of 32, their sum's last pass adding into c's copy
  await withPlans(
    { gpu: true, split: true },
    () => checkOps([{ ...split, what: `${split.what}, GPU plans` }]),
  );
});

Deno.test("matmulAdd costs the product's dispatches only (c is copied, not added by a kernel); errors name the shapes", async () => {
  const { dispatchCount } = await import("../core/executor.ts");
  M.tidy(() => {
    const [x, w, r] = [M.randn([2, 9, 12]), M.randn([8, 12]), M.randn([2, 9, 8])];
    const d0 = dispatchCount();
    M.matmul(x, w, { transB: true });
    const d1 = dispatchCount();
    M.matmulAdd(x, w, r, { transB: true });
    assert.equal(dispatchCount() - d1, d1 - d0, "matmulAdd records the matmul's dispatches and no add");
  });
  // split over K (small C, long K, planned as on a GPU): the slices' sum adds into c's copy in its last pass,
  // with no add after it
  await withPlans({ gpu: true, split: true }, () =>
    M.tidy(() => {
      const [a, b, c] = [M.randn([4, 3000]), M.randn([3000, 3]), M.randn([4, 3])];
      const d2 = dispatchCount();
      M.matmul(a, b);
      const d3 = dispatchCount();
      M.matmulAdd(a, b, c);
      assert.ok(d3 - d2 > 1, `the product is split here (${d3 - d2} dispatches)`);
      assert.equal(dispatchCount() - d3, d3 - d2, "a split matmulAdd records the split matmul's dispatches");
    }));
  const live = M.memory().liveTensors;
  M.tidy(() => {
    const a = M.zeros([2, 3]), b = M.zeros([3, 4]);
    assert.throws(() => M.matmulAdd(a, b, M.zeros([2, 5])), /cannot add a \[2, 4\] product into/);
    assert.throws(() => M.matmulAdd(a, M.zeros([4, 4]), M.zeros([2, 4])), /inner dims differ/);
    assert.throws(() => M.matmulAdd(M.zeros([3]), b, M.zeros([4])), /rank >= 2/);
    assert.throws(() => M.matmulAdd(a, b, M.zeros([2, 4], { dtype: "i32" })), /matmulAdd needs f32 tensors/);
  });
  assert.equal(M.memory().liveTensors, live, "live tensors after the errors");
  // outside tidy too: the copy of c, made before the product's shapes are checked, is freed
  const [a3, b3, c3] = [M.zeros([2, 3]), M.zeros([4, 4]), M.zeros([2, 4])];
  const live3 = M.memory().liveTensors;
  assert.throws(() => M.matmulAdd(a3, b3, c3), /inner dims differ/);
  assert.equal(M.memory().liveTensors, live3, "live tensors after an error outside tidy");
  for (const t of [a3, b3, c3]) t.dispose();
});
