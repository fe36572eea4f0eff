/**
 * Correctness of every matmul kernel variant and operand layout against a plain-TypeScript float64
 * reference: odd sizes (edge blocks), transposes, vec4 and scalar reads (contiguous dims that are and are
 * not multiples of 4), batch broadcasting, K = 0, K split into several dispatches, and operands and
 * results larger than one 128 MiB storage binding; and the autotuner's choice and cache.
 */
import assert from "node:assert/strict";
import { init, matmul, memory, rmsNormMatmul, setMemoryLimit, tensor, tidy } from "../mod.ts";
import {
  availableMatmulVariants,
  matmulRaw,
  matmulTuneCandidates,
  type MatmulVariant,
  matmulVariant,
} from "../advanced.ts";
import {
  type ProductTimer,
  SPLIT_PROBES,
  TIE_SPREAD,
  tuneCacheKey,
  tuneGpuSplit,
  tuneKernels,
  tuneMatvec,
  tuneResult,
  UNSURE_TRIES,
} from "../core/tune.ts";
import {
  matmulGpuSplit,
  matmulMatvec,
  type MatmulOptions,
  matmulPlan,
  setMatmulVariant,
} from "../core/ops/matmul.ts";
import { FUSED_KERNEL_VERSION } from "../scan/tune_fused.ts";
import { hashKey, KeyedCache } from "../core/keyed_cache.ts";
import { kernelsRun, withPlans } from "./helpers.ts";

await init();

/** The variants this device runs (`subgroup` where subgroups have one fixed size, as on lavapipe). */
const VARIANTS = availableMatmulVariants();

/** Seeded uniform values in [-1, 1), rounded to f32; integers in [-r, r] when `ints` is given. */
function data(n: number, seed: number, ints?: number): Float32Array {
  let s = (seed * 2654435761 + 12345) >>> 0;
  const out = new Float32Array(n);
  for (let i = 0; i < n; i++) {
    s = (Math.imul(s, 1664525) + 1013904223) >>> 0;
    const u = s / 4294967296;
    out[i] = ints === undefined ? 2 * u - 1 : Math.floor(u * (2 * ints + 1)) - ints;
  }
  return out;
}

interface Problem {
  aShape: number[];
  bShape: number[];
  transA: boolean;
  transB: boolean;
}

/**
 * Float64 reference of op(A) @ op(B) with batch broadcasting; also returns, per element, the sum of
 * |products| (the scale that f32 rounding error is relative to). `rows` limits the checked rows.
 */
function reference(p: Problem, a: Float32Array, b: Float32Array, rows?: number[]) {
  const { aShape, bShape, transA, transB } = p;
  const ra = aShape.length, rb = bShape.length;
  const [M, K] = transA ? [aShape[ra - 1], aShape[ra - 2]] : [aShape[ra - 2], aShape[ra - 1]];
  const N = transB ? bShape[rb - 2] : bShape[rb - 1];
  const la = aShape.slice(0, -2), lb = bShape.slice(0, -2);
  const nd = Math.max(la.length, lb.length);
  const pa = [...Array(nd - la.length).fill(1), ...la], pb = [...Array(nd - lb.length).fill(1), ...lb];
  const batch = pa.map((x, i) => Math.max(x, pb[i]));
  const nb = batch.reduce((x, y) => x * y, 1);
  const ms = rows ?? [...Array(M).keys()];
  const out = new Float64Array(nb * ms.length * N);
  const scale = new Float64Array(out.length);
  for (let bi = 0; bi < nb; bi++) {
    // Batch index -> A and B matrix indices (broadcast dims of size 1 stay at 0).
    let rem = bi, ia = 0, ib = 0, sa = 1, sb = 1;
    for (let d = nd - 1; d >= 0; d--) {
      const c = rem % batch[d];
      rem = Math.floor(rem / batch[d]);
      ia += (pa[d] === 1 ? 0 : c) * sa;
      ib += (pb[d] === 1 ? 0 : c) * sb;
      sa *= pa[d];
      sb *= pb[d];
    }
    const ao = ia * M * K, bo = ib * K * N;
    ms.forEach((m, mi) => {
      for (let n = 0; n < N; n++) {
        let acc = 0, abs = 0;
        for (let k = 0; k < K; k++) {
          const x = a[ao + (transA ? k * M + m : m * K + k)] * b[bo + (transB ? n * K + k : k * N + n)];
          acc += x;
          abs += Math.abs(x);
        }
        out[(bi * ms.length + mi) * N + n] = acc;
        scale[(bi * ms.length + mi) * N + n] = abs;
      }
    });
  }
  return { out, scale, shape: [...batch, M, N], M, N, nb };
}

/** Asserts |got - want| <= 1e-5 * (sum of |products|) + 1e-6 elementwise, naming the worst element. */
function assertMatches(got: ArrayLike<number>, want: Float64Array, scale: Float64Array, what: string) {
  assert.equal(got.length, want.length, `${what}: length`);
  let worst = -1, excess = 1;
  for (let i = 0; i < want.length; i++) {
    const e = Math.abs(got[i] - want[i]) / (1e-5 * scale[i] + 1e-6);
    if (!(e <= excess)) [worst, excess] = [i, e];
  }
  if (worst >= 0) {
    assert.fail(`${what}: element ${worst}: got ${got[worst]}, want ${want[worst]} (scale ${scale[worst]})`);
  }
}

/** Runs many problems on the GPU with one readback round, then checks each against the reference. */
async function check(
  problems: Problem[],
  variants: readonly MatmulVariant[] = VARIANTS,
  ints?: number,
) {
  const runs = problems.flatMap((p, pi) => {
    const size = (s: number[]) => s.reduce((x, y) => x * y, 1);
    const a = data(size(p.aShape), 2 * pi + 1, ints), b = data(size(p.bShape), 2 * pi + 2, ints);
    return variants.map((v) => {
      const c = tidy(() => matmulRaw(tensor(a, p.aShape), tensor(b, p.bShape), p, v));
      return { p, a, b, v, c };
    });
  });
  const outs = await Promise.all(runs.map((r) => r.c.toArray()));
  runs.forEach((r, i) => {
    const ref = reference(r.p, r.a, r.b);
    const what = `${r.v} [${r.p.aShape}]${r.p.transA ? "^T" : ""} @ [${r.p.bShape}]${r.p.transB ? "^T" : ""}`;
    assert.deepEqual(r.c.shape, ref.shape, `${what}: shape`);
    assertMatches(outs[i], ref.out, ref.scale, what);
    r.c.dispose();
  });
}

/** Operand shapes for op(A) of M x K and op(B) of K x N under the given transposes. */
function mats(M: number, K: number, N: number, transA: boolean, transB: boolean, la: number[] = [], lb = la) {
  return {
    aShape: [...la, ...(transA ? [K, M] : [M, K])],
    bShape: [...lb, ...(transB ? [N, K] : [K, N])],
    transA,
    transB,
  };
}

const TRANS: [boolean, boolean][] = [[false, false], [true, false], [false, true], [true, true]];

/** Runs `fn` with matmuls planned as on each kind of adapter: a GPU with its split over K on, and off (the
 * plans before it), and a CPU adapter. Plans follow `isFallbackAdapter` and `matmulGpuSplit`, and every plan
 * runs on every device. */
async function inEveryPlanKind(fn: () => Promise<void>): Promise<void> {
  for (const [gpu, split] of [[true, true], [true, false], [false, true]]) {
    await withPlans({ gpu, split }, fn);
  }
}

Deno.test("matmul: odd and aligned sizes, every layout and variant", async () => {
  // Covers vec4 and scalar reads of both operands in every transpose: M, N, K multiples of 4 or not,
  // sizes below, at and across the block edges, single rows/columns, and every `register` tile (M of
  // 1, 2, 3-4, 5-8, 9-16, 17-32 and more).
  const sizes: [number, number, number][] = [
    [1, 1, 1],
    [3, 5, 7],
    [4, 8, 12],
    [8, 3, 8],
    [5, 12, 9],
    [12, 7, 4],
    [64, 64, 64],
    [65, 33, 67],
    [70, 12, 130],
    [129, 20, 1],
    [1, 36, 100],
    [2, 9, 6],
    [16, 4, 260],
    [17, 8, 40],
    [24, 16, 300],
    [33, 5, 20],
  ];
  const problems = sizes.flatMap(([M, K, N]) => TRANS.map(([tA, tB]) => mats(M, K, N, tA, tB)));
  await check(problems);
});

Deno.test("matmul: the tiled kernels on C they fill: partial tiles, every transpose, batches, K past a slice", async () => {
  // tiled128 hands a C that would fill under 3/4 of its 128x128 tiles to the register kernel, so the sizes
  // above barely reach it: these fill 91-100% of them (partial tiles along m and n, K not a multiple of 8).
  const sizes: [number, number, number][] = [[120, 37, 125], [250, 300, 240], [256, 8, 128], [255, 17, 230]];
  const problems: Problem[] = sizes.flatMap(([M, K, N]) => TRANS.map(([tA, tB]) => mats(M, K, N, tA, tB)));
  problems.push(...TRANS.map(([tA, tB]) => mats(128, 21, 124, tA, tB, [2, 1], [3])));
  const tiled: MatmulVariant[] = ["tiled", "tiled128"];
  for (const [M, K, N] of sizes) {
    for (const [transA, transB] of TRANS) {
      const plan = matmulPlan(M, K, N, { transA, transB }, "tiled128");
      assert.match(plan.kernel, /^matmul_tiled_128x128_k8_/, `${M} x ${K} x ${N} runs tiled128 itself`);
    }
  }
  await inEveryPlanKind(() => check(problems, tiled, 2));
  // K past one dispatch's slice (MAX_K): later dispatches add into C
  await check(TRANS.map(([tA, tB]) => mats(130, 16384 + 13, 120, tA, tB)), tiled, 2);
});

Deno.test("matmul: batch dims broadcast on either side", async () => {
  const problems: Problem[] = [];
  for (const [tA, tB] of TRANS) {
    problems.push(mats(9, 8, 12, tA, tB, [2, 3], [3]));
    problems.push(mats(12, 5, 7, tA, tB, [3], [2, 1]));
    problems.push(mats(4, 4, 4, tA, tB, [2, 1, 3], [1, 2, 1]));
    problems.push(mats(7, 6, 5, tA, tB, [1], [4]));
  }
  await check(problems);
});

Deno.test("matmul: K = 0 gives zeros; 1-D operands; autograd path agrees", async () => {
  for (const v of VARIANTS) {
    const c = tidy(() =>
      matmulRaw(tensor(new Float32Array(0), [5, 0]), tensor(new Float32Array(0), [0, 6]), {}, v)
    );
    assert.deepEqual([...(await c.toArray())], new Array(30).fill(0), `${v}: K = 0`);
    c.dispose();
  }
  const a = data(12, 7), b = data(12 * 5, 8);
  const y = tidy(() => matmul(tensor(a, [12]), tensor(b, [12, 5])));
  assert.deepEqual(y.shape, [5]);
  const ref = reference(mats(1, 12, 5, false, false), a, b);
  assertMatches(await y.toArray(), ref.out, ref.scale, "vector @ matrix");
  y.dispose();
});

Deno.test("matmul: K longer than one dispatch's slice accumulates over slices", async () => {
  // K > MAX_K (16384): several dispatches, later ones add into C. Small integers keep every sum exact.
  const problems: Problem[] = [];
  for (const [tA, tB] of TRANS) {
    problems.push(mats(5, 16384 + 36, 70, tA, tB)); // K multiple of 4: vec4 along k where k is contiguous
    problems.push(mats(8, 16384 * 2 + 37, 3, tA, tB)); // odd K, three slices
  }
  await check(problems, VARIANTS, 2);
});

Deno.test("matmul on a GPU: a few rows against a weight (x @ W^T, as decoding) take the matvec kernel, one dispatch", async () => {
  // Integer data keeps every sum exact: a dropped, doubled or misplaced partial of the workgroup's sum shows.
  // K a multiple of 4 (vec4 loads) or not, up to one dispatch's 16384, N odd.
  const sizes: [number, number][] = [[256, 3], [300, 17], [768, 130], [4099, 9], [16384, 5]];
  const problems = [1, 2, 3, 4].flatMap((M) => sizes.map(([K, N]) => mats(M, K, N, false, true)));
  for (const split of [true, false]) {
    // whatever the GPU split (the tuner's choice)
    await withPlans({ gpu: true, split }, () => {
      for (const p of problems) {
        const [[M, K], N] = [p.aShape, p.bShape[0]];
        const plan = matmulPlan(M, K, N, { transB: true });
        const what = `M ${M}, K ${K}, split ${split}`;
        assert.equal(plan.kernel, `matmul_matvec_m${M}_k${K % 4 === 0 ? 4 : 1}`, what);
        assert.deepEqual([plan.slices, plan.workgroups, plan.dispatches], [1, N, 1], `${what}: per column`);
      }
    });
  }
  await withPlans({ gpu: true, split: true }, async () => {
    await check(problems, ["register"], 2); // the plan is the same for every variant
    // added into a tensor (matmulAdd: out_proj adding the residual)
    const [a, b, r] = [data(2 * 768, 3, 2), data(7 * 768, 4, 2), data(14, 5, 2)];
    const c = tidy(() =>
      matmulRaw(tensor(a, [2, 768]), tensor(b, [7, 768]), { transB: true }, undefined, tensor(r, [2, 7]))
    );
    const ref = reference(mats(2, 768, 7, false, true), a, b);
    assertMatches(await c.toArray(), ref.out.map((v, i) => v + r[i]), ref.scale, "into");
    c.dispose();
    // a weight larger than one 128 MiB binding (8200 x 4100 floats: two windows), as a large head is
    const [wa, wb] = [data(2 * 4100, 6, 2), data(8200 * 4100, 7, 2)];
    const wc = tidy(() => matmulRaw(tensor(wa, [2, 4100]), tensor(wb, [8200, 4100]), { transB: true }));
    assert.equal(matmulPlan(2, 4100, 8200, { transB: true }).kernel, "matmul_matvec_m2_k4");
    const wref = reference(mats(2, 4100, 8200, false, true), wa, wb);
    assertMatches(await wc.toArray(), wref.out, wref.scale, "a weight over two binding windows");
    wc.dispose();
    // five rows, a transposed A, K under 256 or past one dispatch, or the hook off: the usual plans
    const others: [number, number, number, MatmulOptions, boolean][] = [
      [5, 768, 64, { transB: true }, true],
      [2, 768, 64, { transA: true, transB: true }, true],
      [2, 128, 64, { transB: true }, true],
      [1, 16384 + 36, 5, { transB: true }, true],
      [1, 768, 64, { transB: true }, false],
    ];
    for (const [M, K, N, opts, on] of others) {
      const plan = await withPlans({ matvec: on }, () => matmulPlan(M, K, N, opts));
      const what = `${M} x ${K} x ${N} ${JSON.stringify(opts)}${on ? "" : ", matvec off"}`;
      assert.ok(!plan.kernel.startsWith("matmul_matvec"), `${what}: ${plan.kernel}`);
    }
    // no rows: planned as before (matmulRaw returns before it dispatches), not an error
    assert.ok(!matmulPlan(0, 768, 10, { transB: true }).kernel.startsWith("matmul_matvec"), "no rows");
    // a batch of single rows: not matvec (unbatched only), and right
    const [ba, bb] = [data(2 * 300, 8, 2), data(5 * 300, 9, 2)];
    const batched = tidy(() => matmulRaw(tensor(ba, [2, 1, 300]), tensor(bb, [5, 300]), { transB: true }));
    const bref = reference(mats(1, 300, 5, false, true, [2], []), ba, bb);
    assertMatches(await batched.toArray(), bref.out, bref.scale, "a batch of two single rows");
    batched.dispose();
  });
});

Deno.test("rmsNormMatmul (decoding's norm and in_proj): on a GPU's matvec plans one kernel normalizes on the way; elsewhere the norm's kernel, then the product; both equal float64", async () => {
  // M 1 to 4 rows, K with vec4 loads (768) or scalar ones (301), N odd; eps large enough to matter
  const eps = 1e-2;
  for (const [M, K, N] of [[1, 768, 37], [3, 301, 9], [4, 768, 5]]) {
    const [x, g, w] = [data(M * K, 11 + M), data(K, 12), data(N * K, 13)];
    // float64: y[m, n] = sum_k x[m, k] r[m] g[k] w[n, k], r[m] = 1 / sqrt(mean(x[m]^2) + eps)
    const want = new Float64Array(M * N);
    const scale = new Float64Array(M * N);
    for (let m = 0; m < M; m++) {
      let ss = 0;
      for (let k = 0; k < K; k++) ss += x[m * K + k] ** 2;
      const r = 1 / Math.sqrt(ss / K + eps);
      for (let n = 0; n < N; n++) {
        for (let k = 0; k < K; k++) {
          const t = x[m * K + k] * r * g[k] * w[n * K + k];
          want[m * N + n] += t;
          scale[m * N + n] += Math.abs(t);
        }
      }
    }
    for (const gpu of [true, false]) {
      const what = `M ${M}, K ${K}, N ${N}, ${gpu ? "a GPU's" : "a CPU adapter's"} plans`;
      const { value: y, kernels } = await withPlans(
        { gpu, split: true, matvec: true },
        () =>
          kernelsRun(() =>
            tidy(() => rmsNormMatmul(tensor(x, [M, K]), tensor(g, [K]), eps, tensor(w, [N, K])))
          ),
      );
      assert.deepEqual(y.shape, [M, N], what);
      assertMatches(await y.toArray(), want, scale, what);
      y.dispose();
      const fused = `matmul_matvec_m${M}_k${K % 4 === 0 ? 4 : 1}_rms`;
      assert.deepEqual(
        gpu ? kernels : kernels.filter((k) => k.startsWith("rms_") || k.startsWith("matmul_matvec")),
        [gpu ? fused : K % 4 === 0 ? "rms_fwd_v4" : "rms_fwd"],
        `${what}: ${kernels.join(", ")}`,
      );
    }
  }
  // bad shapes and eps, named (the checks run before any plan)
  const [x, g, w] = [tensor(data(6, 1), [2, 3]), tensor(data(3, 2), [3]), tensor(data(12, 3), [4, 3])];
  const w6 = w.reshape(6, 2); // K 2 against x's 3
  assert.throws(() => rmsNormMatmul(x, g, NaN, w), /eps must be a finite number, got NaN/);
  assert.throws(
    () => rmsNormMatmul(x, w, 1e-5, w),
    /g \(K\) and w \(N, K\); got x f32 \[2, 3\], g f32 \[4, 3\]/,
  );
  assert.throws(
    () => rmsNormMatmul(x, g, 1e-5, w6),
    /got x f32 \[2, 3\], g f32 \[3\], w f32 \[6, 2\]/,
  );
  for (const t of [x, g, w, w6]) t.dispose();
});

Deno.test("matmul: small C with long K is split over K (weight-gradient shapes); no scratch is left", async () => {
  // A C of few workgroups with K >= 256 sums partial products of K slices computed in parallel: odd M
  // and N, every transpose, K not a multiple of the slice length, K just below and at the threshold, a C
  // of several workgroups, and batches (broadcast on either side).
  const problems: Problem[] = [];
  for (const [tA, tB] of TRANS) {
    problems.push(mats(33, 1024, 32, tA, tB));
    problems.push(mats(32, 1000, 1, tA, tB));
    problems.push(mats(1, 777, 3, tA, tB));
    problems.push(mats(3, 300, 2, tA, tB));
    problems.push(mats(7, 513, 13, tA, tB));
    problems.push(mats(64, 256, 16, tA, tB));
    problems.push(mats(16, 255, 32, tA, tB)); // below the threshold: not split
    problems.push(mats(64, 400, 64, tA, tB)); // C of exactly one 64x64 block
    problems.push(mats(100, 2000, 90, tA, tB)); // several workgroups, few slices
    problems.push(mats(5, 1500, 6, tA, tB, [3], [2, 1])); // batch 2x3, broadcast both ways
    problems.push(mats(9, 700, 4, tA, tB, [2], [2]));
  }
  const before = memory();
  // as each kind of adapter plans them (a GPU splits into slices of 32 until 32768 invocations run)
  await inEveryPlanKind(() => check(problems));
  const after = memory();
  assert.equal(after.liveBytes, before.liveBytes, "live bytes");
  assert.equal(after.liveTensors, before.liveTensors, "live tensors");
});

Deno.test("matmul: narrow C (few columns or rows, short K) takes the linear layout", async () => {
  // Blocks of 64 x 64 would leave most invocations outside C: each invocation takes the next 8x8 (or
  // smaller) block instead, not split over K. Odd sizes, every transpose, batches.
  const problems: Problem[] = [];
  for (const [tA, tB] of TRANS) {
    problems.push(mats(1024, 16, 64, tA, tB)); // 64 columns fill the usual blocks (control)
    problems.push(mats(1000, 32, 1, tA, tB)); // one column
    problems.push(mats(333, 17, 16, tA, tB));
    problems.push(mats(517, 1, 33, tA, tB)); // K = 1
    problems.push(mats(250, 40, 3, tA, tB, [2], [2]));
    problems.push(mats(3, 600, 777, tA, tB)); // matrix-vector-like: few rows, K long enough to split on a GPU
  }
  const before = memory();
  await inEveryPlanKind(() => check(problems));
  const after = memory();
  assert.equal(after.liveBytes, before.liveBytes, "live bytes");
});

Deno.test("matmul: split K with K longer than one dispatch's slice; a batch of small C's that is not split", async () => {
  // Small integers keep every sum exact, so a dropped or doubled slice shows. Batch 2: split over K into
  // slices shorter than one dispatch's. Batch 8: eight workgroups, not split on a CPU adapter: three
  // dispatches accumulate into C. K past 256 slices of 16384 (SPLIT_MAX of MAX_K): two dispatches of split
  // slices, the second adding into the first's partial sums.
  const problems: Problem[] = [];
  for (const [tA, tB] of TRANS) {
    problems.push(mats(33, 16384 * 2 + 37, 17, tA, tB));
    problems.push(mats(5, 16384 * 2 + 36, 7, tA, tB, [2]));
    problems.push(mats(5, 16384 * 2 + 37, 7, tA, tB, [8]));
  }
  await inEveryPlanKind(() => check(problems, VARIANTS, 2));
  // the split path is the same for every variant; every partial sum is an integer below 2^24, so the result
  // must be exact, and the second dispatch's 100000 values of K show if lost or doubled
  for (
    const [pi, p] of [
      mats(1, 256 * 16384 + 100_000, 2, false, false),
      mats(2, 256 * 16384 + 99_999, 1, true, true),
    ].entries()
  ) {
    const size = (s: number[]) => s.reduce((x, y) => x * y, 1);
    const a = data(size(p.aShape), 90 + pi, 2), b = data(size(p.bShape), 92 + pi, 2);
    const c = tidy(() => matmulRaw(tensor(a, p.aShape), tensor(b, p.bShape), p, "register"));
    const got = [...await c.toArray()];
    c.dispose();
    assert.equal(
      matmulPlan(p.transA ? 2 : 1, size(p.aShape) / (p.transA ? 2 : 1), p.transA ? 1 : 2, p, "register")
        .dispatches,
      2,
    );
    assert.deepEqual(got, [...reference(p, a, b).out], `K ${size(p.aShape)}: exact`);
  }
});

Deno.test("matmul plans: a GPU splits K until enough invocations run; a CPU adapter keeps one workgroup per core", async () => {
  // A layer's shapes at d_model 64, 1024 tokens, and decoding's matrix-vector products (M = 1).
  const shapes: [string, number, number, number, boolean, boolean][] = [
    ["in_proj forward", 1024, 64, 256, false, true],
    ["in_proj input gradient", 1024, 256, 64, false, false],
    ["in_proj weight gradient", 256, 1024, 64, true, false],
    ["out_proj weight gradient", 64, 1024, 128, true, false],
    ["weight gradient over 16384 tokens", 64, 16384, 16, true, false],
    ["decoding's in_proj", 1, 768, 3072, false, true],
    ["decoding's head", 1, 768, 50280, false, true],
    ["a large product", 1024, 1024, 4096, false, true],
  ];
  const plans = () =>
    shapes.flatMap(([what, M, K, N, transA, transB]) =>
      VARIANTS.map((v) => ({ what: `${v} ${what}`, K, plan: matmulPlan(M, K, N, { transA, transB }, v) }))
    );
  // the split on, whatever this adapter's tuner chose
  const gpuPlans = await withPlans({ gpu: true, split: true }, plans);
  for (const { what, K, plan } of gpuPlans) {
    const split = plan.slices > 1;
    if (K < 256) assert.ok(!split, `${what}: K ${K} is not split (${JSON.stringify(plan)})`);
    // enough invocations, or slices as short as they go (32), or as many as one dispatch holds (256)
    const enough = plan.invocations >= 32768 / 2 || plan.kLen === 32 || plan.slices === 256;
    assert.ok(K < 256 || enough, `${what}: ${JSON.stringify(plan)}`);
    if (split) {
      assert.ok(plan.invocations / plan.slices < 32768, `${what}: split though it had enough invocations`);
    }
    assert.equal(plan.dispatches, 1, `${what}: one dispatch`);
  }
  const inProjGrad = gpuPlans.find((p) => p.what === "register in_proj input gradient")!.plan;
  assert.deepEqual([inProjGrad.slices, inProjGrad.kLen], [8, 32], "K 256 in eight slices of 32");
  // A CPU adapter's plans are as before: the usual blocks where each core has a workgroup of them.
  const cpuPlans = await withPlans({ gpu: false }, plans);
  const cpu = (what: string) => cpuPlans.find((p) => p.what === `register ${what}`)!.plan;
  assert.equal(cpu("in_proj input gradient").slices, 1);
  assert.equal(cpu("decoding's in_proj").slices, 1);
  assert.deepEqual([
    cpu("weight gradient over 16384 tokens").slices,
    cpu("weight gradient over 16384 tokens").kLen,
  ], [
    64,
    256,
  ]);
});

Deno.test("matmul: operands larger than one 128 MiB storage binding", async () => {
  // A has 8200 x 4100 floats (134.5 MB > 128 MiB), so it is bound as two windows; the rows checked
  // include those around the window boundary (element 2^25 lies in row 8184) and the last row.
  // K = 4100 (multiple of 4): vec4 reads of A; then A transposed with M odd (scalar reads).
  for (const [M, K, transA] of [[8200, 4100, false], [8199, 4097, true]] as const) {
    const N = 5;
    const rows = [0, 1, 2, 8182, 8183, 8184, 8185, 8190, M - 1];
    const p = mats(M, K, N, transA, false);
    const a = data(M * K, 11, 2), b = data(K * N, 12, 2);
    const ta = tensor(a, p.aShape), tb = tensor(b, p.bShape);
    const ref = reference(p, a, b, rows);
    for (const v of VARIANTS) {
      const c = matmulRaw(ta, tb, p, v);
      const all = await c.toArray();
      c.dispose();
      const got = rows.flatMap((m) => [...all.subarray(m * N, m * N + N)]);
      assertMatches(got, ref.out, ref.scale, `${v} big A [${p.aShape}]${transA ? "^T" : ""} @ [${p.bShape}]`);
    }
    ta.dispose();
    tb.dispose();
  }
});

Deno.test("matmul: few rows times a transposed weight larger than one 128 MiB binding", async () => {
  // Like a language-model head: x [M, 4100] @ W^T with W [8200, 4100] (134.5 MB), M = 1 and 3.
  for (const M of [1, 3]) {
    const N = 8200, K = 4100;
    const p = mats(M, K, N, false, true);
    const a = data(M * K, 31, 2), b = data(K * N, 32, 2);
    const ta = tensor(a, p.aShape), tb = tensor(b, p.bShape);
    const ref = reference(p, a, b);
    for (const v of VARIANTS) {
      const c = matmulRaw(ta, tb, p, v);
      assertMatches(await c.toArray(), ref.out, ref.scale, `${v} [${M}, ${K}] @ [${N}, ${K}]^T`);
      c.dispose();
    }
    ta.dispose();
    tb.dispose();
  }
});

Deno.test("matmul: a result larger than one 128 MiB storage binding", async () => {
  // C has 8200 x 4100 floats (vec4 stores) or 8200 x 4099 (scalar stores): written through two windows.
  for (const N of [4100, 4099]) {
    const M = 8200, K = 6;
    const rows = [0, 8182, 8183, 8184, 8185, M - 1];
    const p = mats(M, K, N, false, true);
    const a = data(M * K, 21, 3), b = data(K * N, 22, 3);
    const ta = tensor(a, p.aShape), tb = tensor(b, p.bShape);
    const ref = reference(p, a, b, rows);
    for (const v of VARIANTS) {
      const c = matmulRaw(ta, tb, p, v);
      const all = await c.toArray();
      c.dispose();
      const got = rows.flatMap((m) => [...all.subarray(m * N, m * N + N)]);
      assertMatches(got, ref.out, ref.scale, `${v} big C [${M}, ${N}]`);
    }
    ta.dispose();
    tb.dispose();
  }
});

Deno.test("tuneKernels measures once, selects a variant and caches the choice", async () => {
  const measured = await tuneKernels({ force: true });
  assert.ok(VARIANTS.includes(measured.variant));
  assert.equal(measured.fromCache, false);
  assert.equal(matmulVariant(), measured.variant);
  // every variant the tuner measures here (tiled128 on GPUs only), and no other
  assert.deepEqual(Object.keys(measured.gflops).sort(), [...matmulTuneCandidates()].sort());
  for (const v of matmulTuneCandidates()) assert.ok((measured.gflops[v] ?? 0) > 0, `${v} measured`);
  assert.equal(matmulTuneCandidates().includes("tiled128"), !(await init()).isFallbackAdapter);
  assert.equal(tuneResult(), measured);
  // the GPU split over K is timed on GPUs only
  const gpu = !(await init()).isFallbackAdapter;
  assert.equal(measured.gpuSplit === null, !gpu, `gpuSplit ${measured.gpuSplit}`);
  assert.equal(measured.splitMs === null, !gpu);
  assert.equal(measured.matvec === null, !gpu, `matvec ${measured.matvec}`);
  assert.equal(measured.matvecMs === null, !gpu);
  // a forced measurement counts the unsure afresh
  assert.equal(measured.unsure, measured.confident ? 0 : 1);
  const again = await tuneKernels();
  const hasStorage = (localStorageOrNull()?.getItem(measured.key) ?? null) !== null; // none: every call measures
  // a choice that was not clear (a busy machine) is measured again
  assert.equal(again.fromCache, hasStorage && measured.confident, `confident ${measured.confident}`);
  if (again.fromCache) {
    assert.equal(again.variant, measured.variant);
    assert.equal(again.gpuSplit, measured.gpuSplit);
    assert.equal(again.matvec, measured.matvec);
    assert.deepEqual(again.spread, measured.spread);
  }
  assert.equal(again.key, tuneCacheKey());
});

/** `localStorage`, or null where there is none or access to it is refused. */
function localStorageOrNull(): Storage | null {
  try {
    return typeof localStorage === "undefined" ? null : localStorage;
  } catch {
    return null;
  }
}

Deno.test("a new tuning drops the cached choices of older kernel versions, keeps the current ones", async () => {
  const storage = localStorageOrNull(); // none: nothing is cached, nothing to drop
  if (!storage) return;
  const stale = ["mamba.ts/tune/matmul-0/some adapter", "mambats.fusedScan.v0.N16.some adapter"];
  const other = "mamba.ts-unrelated-key"; // outside both families: untouched
  for (const k of [...stale, other]) storage.setItem(k, "{}");
  const r = await tuneKernels({ force: true });
  for (const k of stale) assert.equal(storage.getItem(k), null, `${k} dropped`);
  assert.equal(storage.getItem(other), "{}");
  assert.notEqual(storage.getItem(r.key), null, "the new choice is cached");
  assert.ok(
    Array.from({ length: storage.length }, (_, i) => storage!.key(i)).some((k) =>
      k?.startsWith(`mambats.fusedScan.v${FUSED_KERNEL_VERSION}.N16.`)
    ),
    "the fused scan's current choice is cached",
  );
  storage.removeItem(other);
});

Deno.test("on a GPU the tuner times the split over K both ways and keeps the faster; off, a GPU plans as before it", async () => {
  await withPlans({ gpu: true }, async () => {
    const r = await tuneGpuSplit(matmulVariant(), 0);
    assert.ok(r.splitMs.on > 0 && r.splitMs.off > 0, JSON.stringify(r));
    assert.equal(r.gpuSplit, r.splitMs.on <= r.splitMs.off);
    assert.equal(matmulGpuSplit(), r.gpuSplit, "the faster way is in use");
  });
  // off: a GPU's plans are those before the split (SPLIT_BELOW): the input gradient of d_model 64 is not split,
  // the weight gradient over 16384 tokens is, as it was (register's linear layout until about 1024
  // invocations run, tiled and subgroup until about 32 workgroups do)
  const plan = (v: MatmulVariant, split: boolean, M: number, K: number, N: number, transA = false) =>
    withPlans({ gpu: true, split }, () => matmulPlan(M, K, N, { transA }, v));
  for (const v of VARIANTS) {
    assert.equal((await plan(v, false, 1024, 256, 64)).slices, 1, `${v}: input gradient, off`);
    assert.equal((await plan(v, true, 1024, 256, 64)).slices, 8, `${v}: input gradient, on`);
    const w = await plan(v, false, 64, 16384, 16, true);
    // register: 8x8 blocks, linear (tiled128 hands this narrow C to it); tiled (64x64 tiles, one per slice):
    // 32 workgroups; subgroup: about 32, however many blocks of C one slice has (its block follows the
    // subgroup width: 1 at 8 lanes, 2 at 4)
    const slices = v === "register" || v === "tiled128"
      ? 64
      : v === "tiled"
      ? 32
      : Math.ceil(32 / (w.workgroups / w.slices));
    assert.deepEqual([w.slices, w.kLen], [slices, 16384 / slices], `${v}: weight gradient, off`);
  }
});

Deno.test("on a GPU the tuner times the matvec kernel both ways and keeps the faster; a failed timing leaves it", async () => {
  await withPlans({ gpu: true }, async () => {
    const r = await tuneMatvec(matmulVariant(), 0);
    assert.ok(r.matvecMs.on > 0 && r.matvecMs.off > 0, JSON.stringify(r));
    assert.equal(r.matvec, r.matvecMs.on <= r.matvecMs.off);
    assert.equal(matmulMatvec(), r.matvec, "the faster way is in use");
  });
  await failedTuningLeaves("matvec", () => tuneMatvec(matmulVariant(), 0), matmulMatvec);
});

/** Runs a tuning of one setting (`split` or `matvec`) on GPU plans from each value, with too little memory
 * for its probes' operands: it must throw, and leave the setting as it was. */
async function failedTuningLeaves(
  setting: "split" | "matvec",
  tune: () => Promise<unknown>,
  get: () => boolean,
): Promise<void> {
  for (const before of [false, true]) {
    await withPlans({ gpu: true, [setting]: before }, async () => {
      setMemoryLimit(memory().liveBytes + 1024);
      try {
        await assert.rejects(tune, /out of memory/);
      } finally {
        setMemoryLimit(null);
      }
      assert.equal(get(), before, `${setting}, was ${before}`);
    });
  }
}

Deno.test("a split tuning that fails leaves the split as it was", async () => {
  await failedTuningLeaves("split", () => tuneGpuSplit(matmulVariant(), 0), matmulGpuSplit);
});

Deno.test("the tuner's cached choice carries the GPU split and matvec", async () => {
  const storage = localStorageOrNull(); // none: nothing is cached
  if (!storage) return;
  await tuneKernels(); // a choice for this adapter exists
  const key = tuneCacheKey();
  const before = storage.getItem(key)!;
  // the split that reading the cache sets is restored after
  await withPlans({}, async () => {
    try {
      const entry = {
        ...JSON.parse(before),
        confident: true, // else read only after measuring again
        gpuSplit: false,
        splitMs: { on: 2, off: 1 },
        matvec: false,
        matvecMs: { on: 4, off: 3 },
      };
      storage.setItem(key, JSON.stringify(entry));
      const r = await tuneKernels();
      assert.equal(r.fromCache, true);
      assert.equal(r.gpuSplit, false);
      assert.deepEqual(r.splitMs, { on: 2, off: 1 });
      assert.deepEqual([r.matvec, r.matvecMs], [false, { on: 4, off: 3 }]);
      assert.equal(matmulGpuSplit(), false, "the cached choice is in use");
      assert.equal(matmulMatvec(), false, "the cached matvec choice is in use");
      const malformed = { gpuSplit: "yes", splitMs: { on: "1" }, matvec: 1, matvecMs: { off: 2 } };
      storage.setItem(key, JSON.stringify({ ...entry, ...malformed }));
      const odd = await tuneKernels();
      assert.deepEqual(
        [odd.gpuSplit, odd.splitMs, odd.matvec, odd.matvecMs],
        [null, null, null, null],
        "malformed fields read as not measured",
      );
      assert.equal(matmulGpuSplit(), true, "not measured: the default");
      assert.equal(matmulMatvec(), true, "not measured: the default");
    } finally {
      storage.setItem(key, before);
    }
  });
});

/** Runs `fn` with this adapter's cached tuner choice saved, and puts it back after, with the variant, split
 * and matvec in use (the scripted tunings set them); without `localStorage` nothing is cached, and `fn` does
 * not run. */
async function withTuneCache(fn: (storage: Storage, key: string) => Promise<void>): Promise<void> {
  const storage = localStorageOrNull();
  if (!storage) return;
  const key = tuneCacheKey();
  const [before, variant] = [storage.getItem(key), matmulVariant()];
  await withPlans({}, async () => {
    try {
      await fn(storage, key);
    } finally {
      if (before === null) storage.removeItem(key);
      else storage.setItem(key, before);
      setMatmulVariant(variant);
    }
  });
}

/** A scripted tuner timer: `ms(variant, round)` gives a variant's ms per product in its n-th round (each of
 * the square sizes alike); `calls` records the variant of each round, in order. Probes (split, matvec) take 1
 * ms either way. */
function scripted(ms: (v: MatmulVariant, round: number) => number): { timer: ProductTimer; calls: string[] } {
  const calls: string[] = [];
  const seen = new Map<string, number>();
  const timer: ProductTimer = (v, p) => {
    if (p.M !== p.K || p.K !== p.N) return Promise.resolve(1); // a probe
    const n = seen.get(v) ?? 0; // a round times each square size once: two calls
    seen.set(v, n + 1);
    if (n % 2 === 0) calls.push(v);
    return Promise.resolve(ms(v, n >> 1));
  };
  return { timer, calls };
}

Deno.test("the matmul tuner times its variants in interleaved rounds, each at its best: a slow first round does not decide", async () => {
  await withTuneCache(async () => {
    const vs = matmulTuneCandidates();
    const last = vs.at(-1)!;
    // every variant 2 ms, `last` 1 ms but 8 in its first round (a burst of other work on the machine):
    // measured once each, as before, the first variant won
    const { timer, calls } = scripted((v, round) => v !== last ? 2 : round === 0 ? 8 : 1);
    const r = await tuneKernels({ force: true, timer });
    assert.equal(r.variant, last);
    assert.equal(matmulVariant(), last);
    // two rounds in turn (A B C, C B A); `last`'s spread (8 over 1) left the others unclear: one more round
    // of all, then each has two equal best times
    assert.deepEqual(calls.slice(0, 2 * vs.length), [...vs, ...[...vs].reverse()]);
    assert.deepEqual(calls.slice(2 * vs.length), [last, ...vs.slice(0, -1)]);
    assert.deepEqual([r.confident, r.rounds, r.unsure, r.spread[last]], [true, 3, 0, 0]);
    const flops = 2 * (256 ** 3 + 512 ** 3);
    assert.ok(
      Math.abs(r.gflops[last]! - flops / 2 / 1e6) < 1e-9,
      `${r.gflops[last]} GFLOP/s: the best round`,
    );
  });
});

Deno.test("a matmul choice that was not clear is cached as such and measured again by the next call, up to UNSURE_TRIES in a row; a clear one is reused", async () => {
  await withTuneCache(async (storage, key) => {
    const vs = matmulTuneCandidates();
    // the first variant 10% ahead, but every round 50% slower than the one before: the spread (50%) hides the
    // margin in every round
    const unclear = () => scripted((v, round) => (v === vs[0] ? 1 : 1.1) * (1 + round / 2));
    let s = unclear();
    const first = await tuneKernels({ force: true, timer: s.timer });
    assert.deepEqual([first.variant, first.confident, first.rounds, first.unsure], [vs[0], false, 5, 1]);
    assert.equal(JSON.parse(storage.getItem(key)!).confident, false, "cached as not confident");
    for (let unsure = 2; unsure <= UNSURE_TRIES; unsure++) {
      s = unclear();
      const again = await tuneKernels({ timer: s.timer });
      assert.deepEqual(
        [again.fromCache, again.confident, again.unsure],
        [false, false, unsure],
        `try ${unsure}`,
      );
      assert.ok(s.calls.length > 0, "measured again");
    }
    s = unclear();
    const kept = await tuneKernels({ timer: s.timer });
    assert.deepEqual([kept.fromCache, kept.confident, kept.unsure, s.calls], [true, false, UNSURE_TRIES, []]);
    // a clear measurement (forced) is cached as confident, and read from then on
    s = scripted((v) => (v === vs[0] ? 1 : 2));
    const clear = await tuneKernels({ force: true, timer: s.timer });
    assert.deepEqual([clear.confident, clear.rounds, clear.unsure], [true, 2, 0]);
    s = scripted(() => 1);
    const cached = await tuneKernels({ timer: s.timer });
    assert.deepEqual([cached.fromCache, cached.confident, s.calls], [true, true, []]);
    assert.equal(cached.spread[vs[0]], 0);
  });
});

Deno.test("a cached matmul choice from before the confidence was kept is measured again once; a steady near-tie is confident", async () => {
  await withTuneCache(async (storage, key) => {
    const vs = matmulTuneCandidates();
    const old = {
      variant: vs[0],
      gflops: {},
      sizes: [256, 512],
      measuredAt: "",
      gpuSplit: null,
      splitMs: null,
    };
    storage.setItem(key, JSON.stringify({ ...old, matvec: null, matvecMs: null }));
    // the last variant 3% ahead, every round alike: a tie within TIE_SPREAD, not worth more rounds
    let s = scripted((v) => (v === vs.at(-1) ? 1 : 1.03));
    const r = await tuneKernels({ timer: s.timer });
    assert.deepEqual([r.fromCache, r.variant, r.confident, r.rounds, r.unsure], [
      false,
      vs.at(-1),
      true,
      2,
      0,
    ]);
    assert.ok(1.03 - 1 < TIE_SPREAD);
    s = scripted(() => 1);
    assert.equal((await tuneKernels({ timer: s.timer })).fromCache, true, "then read");
    assert.deepEqual(s.calls, []);
  });
});

Deno.test("on a GPU an unclear split or matvec leaves the tuner's choice not confident", async () => {
  await withTuneCache(async () => {
    await withPlans({ gpu: true }, async () => {
      const vs = matmulTuneCandidates();
      const probes = new Map<string, number>(); // each way's rounds so far
      const timer: ProductTimer = (v, p) => {
        if (p.M === p.K && p.K === p.N) return Promise.resolve(v === vs[0] ? 1 : 2); // the variants: clear
        // the split: on 1 ms a round, off 1.02, but each way's rounds 50% apart; matvec clear
        if (!SPLIT_PROBES.includes(p)) return Promise.resolve(matmulMatvec() ? 1 : 2);
        const way = String(matmulGpuSplit());
        const n = probes.get(way) ?? 0;
        probes.set(way, n + 1);
        return Promise.resolve((matmulGpuSplit() ? 1 : 1.02) * (1 + (n >> 1) / 2));
      };
      const r = await tuneKernels({ force: true, timer });
      assert.deepEqual([r.variant, r.gpuSplit, r.matvec, r.confident, r.unsure], [
        vs[0],
        true,
        true,
        false,
        1,
      ]);
      assert.deepEqual(r.spread[vs[0]], 0, "the variants were clear");
    });
  });
});

Deno.test("matmul's plan cache (KeyedCache): keys whose hashes collide are told apart, the key is copied, and past its size it starts over", () => {
  const made: string[] = [];
  const make = (k: string) => (made.push(k), `plan ${k}`);
  const cache = new KeyedCache<string>(3, () => 7); // every key in one bucket
  const key = [1, 2, 3];
  assert.equal(cache.get(key, make, "a"), "plan a");
  key[2] = 4; // the same scratch array, another problem
  assert.equal(cache.get(key, make, "b"), "plan b", "a colliding key is another entry");
  assert.equal(cache.get([1, 2, 3], make, "x"), "plan a", "the first key was copied when stored");
  assert.equal(cache.get([1, 2, 4], make, "x"), "plan b");
  assert.equal(cache.get([1, 2], make, "c"), "plan c", "a prefix is another key");
  assert.deepEqual(made, ["a", "b", "c"]);
  assert.equal(cache.size, 3);
  cache.get([9], make, "d"); // past 3: starts over with this one
  assert.equal(cache.size, 1);
  assert.equal(cache.get([1, 2, 3], make, "e"), "plan e", "made again after the clear");
  assert.deepEqual(made, ["a", "b", "c", "d", "e"]);
  // the default hash: different keys, different buckets here; equal keys, equal hashes
  assert.notEqual(hashKey([64, 1024, 16]), hashKey([64, 16, 1024]));
  assert.equal(hashKey([5, 6]), hashKey([5, 6]));
  // and matmul's plans through it: the same plan for the same problem, another for another
  assert.deepEqual(matmulPlan(64, 256, 32), matmulPlan(64, 256, 32));
  assert.notDeepEqual(matmulPlan(64, 256, 32).workgroups, matmulPlan(640, 256, 32).workgroups);
});
