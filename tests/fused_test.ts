import assert from "node:assert/strict";
import { deviceInfo, fixedSubgroupSize, init } from "../core/device.ts";
import { full, randn, tensor } from "../core/creation.ts";
import { add, exp, matmul, mul, narrow, neg, softplus, sum } from "../core/ops/index.ts";
import { dispose, Tensor, tidy } from "../core/tensor.ts";
import { noGrad } from "../core/autograd.ts";
import { emptyPool, memory } from "../core/memory.ts";
import { profile } from "../core/executor.ts";
import {
  dtScanForward,
  fusedMambaScan,
  fusedMambaScanForward,
  fusedSelectiveScan,
  mambaScanAttrs,
} from "../scan/fused.ts";
import {
  fusedScanBackward,
  fusedScanForward,
  lastState,
  phForBackward,
  setFusedChainRuns,
  setFusedPartialBudget,
  setFusedPresumRows,
  setFusedStateSaving,
  setFusedYOverG,
  setMaxChunksFolded,
  yBindingFree,
} from "../scan/fused_run.ts";
import { butterflyRounds } from "../scan/fused_subgroup_sums.ts";
import { chainKernel } from "../scan/fused_carry_kernels.ts";
import {
  defaultFusedVariant,
  type FusedVariant,
  fusedVariant,
  fusedVariantFor,
  fusedVariantsByProblem,
  MAX_CHUNKS_CHAINED,
  MAX_CHUNKS_FOLDED,
  setFusedVariant,
  setFusedVariantsByProblem,
  stateBlocks,
} from "../scan/fused_variant.ts";
import { fusedMambaScanOut } from "../scan/fused_out.ts";
import { selectiveScan } from "../scan/selective_scan.ts";
import { assertMatches, tolerance } from "./fixture_util.ts";
import { type Case, compare, inputs } from "./fused_cases.ts";
import { kernelsRun, underRisingCaps } from "./helpers.ts";
import {
  CONFIRM_SAMPLES,
  ensureFusedTuned,
  fusedCandidates,
  isFusedScanKernel,
  tuneFusedScan,
  tuneProblems,
} from "../scan/tune_fused.ts";
import { UNSURE_TRIES } from "../core/tune.ts";

Deno.test("fused scan equals the sequential reference: forward and every gradient, small and odd shapes", async () => {
  await compare({ B: 1, L: 1, ED: 8, N: 4, R: 2, gated: true }, 1);
  await compare({ B: 2, L: 37, ED: 32, N: 16, R: 1, gated: true }, 2);
  await compare({ B: 2, L: 37, ED: 32, N: 16, R: 1, gated: false }, 3);
  await compare({ B: 3, L: 70, ED: 70, N: 1, R: 3, gated: true }, 4); // ED not a multiple of WG, L not of Lc
  await compare({ B: 1, L: 33, ED: 40, N: 64, R: 4, gated: true }, 5);
  await compare({ B: 1, L: 40, ED: 32, N: 32, R: 2, gated: true }, 16); // few channels; N 32 in two state blocks
  await compare({ B: 2, L: 129, ED: 16, N: 4, R: 0, gated: true }, 6);
});

Deno.test("fused scan with dt + bias far from 0 (softplus: 2.5 to 10, both sides of its linear branch at 20, past exp's overflow at 88, and near -20) equals the reference", async () => {
  // The cases above keep dt + bias within a few units of 0, and the loop-limit test's 32 is below exp's
  // overflow: a softplus without its linear branch (above 20), whose exp(u) is inf past 88 and dt NaN, passed
  // every test. Here u runs about 2.5 to 10 (a linear branch from 8 instead of 20 shows), both sides of 20,
  // about 90, and about -20, where 1 + e^u rounds to 1 (the branch that returns e^u).
  for (const drawMean of [4, 8, 21, 90, -20]) {
    await compare({ B: 2, L: 37, ED: 32, N: 16, R: 1, gated: true, drawMean }, 7);
  }
});

Deno.test("fused scan reads the gate z as a column window of a wider tensor (in_proj's output) in place; z's gradient is that window", async () => {
  // z = xz[..., ED:2ED] as in a Mamba block, and a window in the middle with ED not a multiple of 4
  await compare({ B: 2, L: 37, ED: 32, N: 16, R: 1, gated: true, zWindow: { width: 64, start: 32 } }, 18);
  await compare({ B: 1, L: 70, ED: 5, N: 4, R: 2, gated: true, zWindow: { width: 12, start: 3 } }, 19);
  // z's gradient already holds another op's contribution in the window when the scan's backward runs
  await compare({
    B: 2,
    L: 37,
    ED: 32,
    N: 16,
    R: 1,
    gated: true,
    zWindow: { width: 64, start: 32 },
    zTimesY: true,
  }, 21);
  await init();
  const t = inputs({ B: 1, L: 4, ED: 8, N: 4, R: 1, gated: true, zWindow: { width: 12, start: 0 } }, 20);
  assert.throws(
    () => fusedSelectiveScan(t.x, t.draw, t.dBC, t.bias, t.A_log, t.D, t.z, 5),
    /zStart 5: z must be \(1, 4, Z\) with Z >= 5 \+ 8, got \[1, 4, 12\]/,
  );
  assert.throws(
    () => fusedSelectiveScan(t.x, t.draw, t.dBC, t.bias, t.A_log, t.D, t.z),
    /z \[1, 4, 12\] must equal x \[1, 4, 8\]/,
  );
  // With dtRank a width that is not R + 2N is refused (without it, any leading columns are dt's): an A_log of
  // one state too many read B and C from shifted columns
  const wide = inputs({ B: 1, L: 4, ED: 8, N: 5, R: 1, gated: false }, 20);
  assert.throws(
    () => fusedSelectiveScan(t.x, t.draw, t.dBC, t.bias, wide.A_log, t.D, null, undefined, 1),
    /fusedSelectiveScan: dBC must be \(1, 4, 1 \+ 2\*5, or 12 padded\), got \[1, 4, 9\]/,
  );
  assert.throws(
    () => fusedSelectiveScan(t.x, t.draw, t.dBC, t.bias, t.A_log, t.D, null, undefined, 1.5),
    /dtRank must be an integer >= 0, got 1.5/,
  );
  for (const v of Object.values(t)) v.dispose();
});

Deno.test("fusedMambaScan (dt_proj inside, delta recomputed in the backward) equals the reference, W's gradient too", async () => {
  await compare({ B: 2, L: 37, ED: 32, N: 16, R: 1, gated: true, dtWeight: true }, 22);
  await compare({ B: 1, L: 70, ED: 12, N: 4, R: 3, gated: false, dtWeight: true }, 23);
  await compare({ B: 2, L: 33, ED: 16, N: 4, R: 0, gated: true, dtWeight: true }, 24); // matmul path, R = 0
  await compare({ B: 1, L: 45, ED: 20, N: 4, R: 9, gated: true, dtWeight: true }, 27); // above the inline rank
  await compare({ B: 2, L: 70, ED: 16, N: 32, R: 8, gated: true, dtWeight: true }, 28); // two state blocks
  // dBC padded to a multiple of 4 columns (as MambaBlock pads x_proj's output): the padding's gradient is 0
  await compare({ B: 2, L: 37, ED: 32, N: 16, R: 1, gated: true, dtWeight: true, dBCPad: 3 }, 29);
  await compare({ B: 1, L: 30, ED: 20, N: 4, R: 9, gated: true, dtWeight: true, dBCPad: 3 }, 30);
  await compare({
    B: 1,
    L: 40,
    ED: 32,
    N: 16,
    R: 2,
    gated: true,
    dtWeight: true,
    zWindow: { width: 64, start: 32 },
  }, 25);
  await init();
  const t = inputs({ B: 1, L: 4, ED: 8, N: 4, R: 2, gated: true }, 26);
  assert.throws(
    () => fusedMambaScan(t.x, t.dBC, t.x, t.bias, t.A_log, t.D, t.z),
    /fusedMambaScan: dtWeight must be f32 \(8, R\), got f32 \[1, 4, 8\]/,
  );
  for (const v of Object.values(t)) v.dispose();
});

Deno.test("fusedMambaScanOut (the scan and out_proj in one op; y recomputed by the backward) equals the reference", async () => {
  await compare({ B: 2, L: 37, ED: 32, N: 16, R: 1, gated: true, dtWeight: true, outProj: "residual" }, 31);
  await compare({ B: 1, L: 70, ED: 12, N: 4, R: 3, gated: true, dtWeight: true, outProj: "plain" }, 32);
  await compare({ B: 2, L: 29, ED: 8, N: 4, R: 2, gated: true, dtWeight: true, outProj: "bias" }, 37);
  await compare({ B: 2, L: 33, ED: 16, N: 4, R: 0, gated: true, dtWeight: true, outProj: "residual" }, 38); // R 0
  await compare({ B: 2, L: 70, ED: 16, N: 32, R: 8, gated: true, dtWeight: true, outProj: "residual" }, 33); // two state blocks
  // The backward kernel writes y over g where one state block holds all the states (10 bindings, as Chrome
  // allows); with two, into draw's binding (dt_proj inside, R 1..8) or an 11th (native adapters), or where
  // there is none the forward kernel runs again for y.
  const c34: Case = { B: 1, L: 45, ED: 20, N: 4, R: 9, gated: true, dtWeight: true, outProj: "residual" };
  const c39: Case = { B: 1, L: 40, ED: 16, N: 32, R: 9, gated: true, dtWeight: true, outProj: "residual" };
  const c41: Case = { B: 1, L: 40, ED: 16, N: 32, R: 3, gated: true, dtWeight: true, outProj: "bias" };
  const yKernels = (ks: string[]) =>
    ks.filter((k) => /^fused_scan_bwd_.*_y(_g)?$/.test(k)).map((k) => k.slice(-2));
  const forwards = (ks: string[]) => ks.filter((k) => k.startsWith("fused_scan_fwd_")).length;
  const { kernels: overG } = await kernelsRun(() => compare(c34, 34));
  assert.deepEqual([...new Set(yKernels(overG))], ["_g"], "y over g");
  const { kernels: inline } = await kernelsRun(() => compare({ ...c34, R: 2 }, 42));
  assert.deepEqual([...new Set(yKernels(inline))], ["_g"], "y over g with dt_proj inside");
  setFusedYOverG(false); // y in a binding of its own where one is free (bench/gpu_timeline.ts times both)
  try {
    const { kernels: kept } = await kernelsRun(() => compare(c34, 34));
    assert.deepEqual([...new Set(yKernels(kept))], yBindingFree() ? ["_y"] : ["_g"], "y over g turned off");
  } finally {
    setFusedYOverG(null);
  }
  const { kernels: own } = await kernelsRun(() => compare(c39, 39));
  const free = yBindingFree(); // native adapters: lavapipe has 32 storage buffers, GPUs more
  assert.deepEqual([...new Set(yKernels(own))], free ? ["_y"] : [], "y into an 11th binding");
  const { kernels: drawBinding } = await kernelsRun(() => compare(c41, 41));
  assert.deepEqual([...new Set(yKernels(drawBinding))], ["_y"], "y into draw's binding");
  const limits = deviceInfo().limits;
  const [real, realBinding] = [limits.maxStorageBuffersPerShaderStage, limits.maxStorageBufferBindingSize];
  limits.maxStorageBuffersPerShaderStage = 10; // as Chrome exposes
  try {
    const { kernels: g10 } = await kernelsRun(() => compare(c34, 34));
    assert.deepEqual([...new Set(yKernels(g10))], ["_g"], "y over g at 10 bindings");
    const { kernels: rerun } = await kernelsRun(() => compare(c39, 39));
    assert.deepEqual(
      yKernels(rerun),
      [],
      "no y from the backward kernel at 10 bindings with two state blocks",
    );
    // the forward kernel's two blocks once more, in the backward
    assert.equal(forwards(rerun), forwards(own) + (free ? 2 : 0), "the forward kernel again for y");
    const { kernels: draw10 } = await kernelsRun(() => compare(c41, 41));
    assert.deepEqual([...new Set(yKernels(draw10))], ["_y"], "y into draw's binding at 10 bindings");
    // tensors over one binding window take a binding per window: x and z of 3600 bytes in 2048-byte windows
    // take two each, so y's own binding needs 6 * 2 + 2 * 2 + 3 = 19
    const t = inputs(c34, 34);
    limits.maxStorageBufferBindingSize = 2048;
    limits.maxStorageBuffersPerShaderStage = 19;
    assert.ok(yBindingFree(t.x, t.z), "19 bindings fit");
    limits.maxStorageBuffersPerShaderStage = 18;
    assert.ok(!yBindingFree(t.x, t.z), "18 do not");
    for (const v of Object.values(t)) v.dispose();
  } finally {
    limits.maxStorageBuffersPerShaderStage = real;
    limits.maxStorageBufferBindingSize = realBinding;
  }
  // y over g with lanes sharing a channel (one lane reads g, and stores y over it) and chunks in parallel
  const SG = fixedSubgroupSize() ?? 0;
  if (SG >= 2) {
    setFusedVariant(4, { WG: SG, Lc: 16, reduce: "subgroup", lanes: 2, chunkParallel: true });
    try {
      // ED 22: the last tile's channels past ED take lanes too (with SG / 2 channels per tile)
      const { kernels } = await kernelsRun(() => compare({ ...c34, ED: 22 }, 40));
      assert.ok(
        kernels.some((k) => /^fused_scan_bwd_.*_lanes2_chunked(_folded)?_y_g$/.test(k)),
        `${kernels}`,
      );
    } finally {
      setFusedVariant(4, null);
    }
  }
  // out_proj's weight frozen: no y from the backward kernel (nor, with two state blocks at 10 bindings, from
  // the forward again), and the other gradients as with it
  for (const c of [c34, c39]) {
    const grads = async (frozen: boolean) => {
      const t = inputs(c, 43);
      t.Wout.requiresGrad_(!frozen);
      limits.maxStorageBuffersPerShaderStage = 10;
      try {
        const { kernels } = await kernelsRun(() =>
          tidy(() => {
            const out = fusedMambaScanOut(
              t.x,
              t.dBC,
              t.W,
              t.bias,
              t.A_log,
              t.D,
              t.z,
              undefined,
              t.Wout,
              null,
              t.res,
            );
            sum(mul(out, t.G)).backward();
          })
        );
        const gs = await Promise.all(
          [t.x, t.dBC, t.W, t.bias, t.A_log, t.D, t.z].map((v) => v.grad!.toArray()),
        );
        const wout = t.Wout.grad;
        for (const v of Object.values(t)) v.grad?.dispose();
        for (const v of Object.values(t)) v.dispose();
        return { kernels, gs, wout };
      } finally {
        limits.maxStorageBuffersPerShaderStage = real;
      }
    };
    const [trained, frozen] = [await grads(false), await grads(true)];
    assert.equal(frozen.wout, null);
    assert.deepEqual(yKernels(frozen.kernels), [], "no y");
    assert.equal(
      forwards(frozen.kernels),
      forwards(trained.kernels) - (c === c39 ? 2 : 0),
      "no forward again",
    );
    frozen.gs.forEach((g, i) =>
      assert.deepEqual(g, trained.gs[i], `gradient ${i} as with out_proj's trained`)
    );
  }

  await compare({
    B: 1,
    L: 40,
    ED: 32,
    N: 16,
    R: 2,
    gated: true,
    dtWeight: true,
    zWindow: { width: 64, start: 32 },
    outProj: "residual",
  }, 35);
  await init();
  const t = inputs({ B: 1, L: 4, ED: 8, N: 4, R: 2, gated: true, dtWeight: true, outProj: "residual" }, 36);
  assert.throws(
    () => fusedMambaScanOut(t.x, t.dBC, t.W, t.bias, t.A_log, t.D, t.z, undefined, t.x, null, t.res),
    /fusedMambaScanOut: outWeight must be f32 or bf16 \(Dm, 8\), got f32 \[1, 4, 8\]/,
  );
  assert.throws(
    () => fusedMambaScanOut(t.x, t.dBC, t.W, t.bias, t.A_log, t.D, t.z, undefined, t.Wout, null, t.x),
    /fusedMambaScanOut: the residual must be f32 \(1, 4, 3\), got f32 \[1, 4, 8\]/,
  );
  assert.throws(
    () => fusedMambaScanOut(t.x, t.dBC, t.W, t.bias, t.A_log, t.D, t.z, undefined, t.Wout, t.D, t.res),
    /fusedMambaScanOut: outBias must be f32 \(3\), got f32 \[8\]/,
  );
  for (const v of Object.values(t)) v.dispose();
});

Deno.test("fused scan on long sequences (several dispatches per pass): L = 4096, 9000, 20000 (lanes) and 70000", async () => {
  await compare({ B: 1, L: 4096, ED: 4, N: 16, R: 1, gated: true }, 7);
  await compare({ B: 1, L: 70000, ED: 2, N: 4, R: 1, gated: true }, 8);
  // N = 32: two state blocks, two-level recompute (Lc 128, Ls 16), two backward dispatches per block
  await compare({ B: 1, L: 9000, ED: 2, N: 32, R: 1, gated: true }, 17);
  // lanes per channel: the second forward dispatch starts each lane from its share of the saved state
  await init();
  if ((fixedSubgroupSize() ?? 0) >= 2) { // lanes per channel need one fixed subgroup size
    try {
      setFusedVariant(4, { WG: fixedSubgroupSize()!, Lc: 64, reduce: "subgroup", lanes: 2 });
      await compare({ B: 1, L: 20000, ED: 3, N: 4, R: 1, gated: true }, 18);
    } finally {
      setFusedVariant(4, null);
    }
  }
});

/** dbias of sum(y * G) for an ungated scan in float64: sum over (b, t) of ddelta * sigmoid(u), with ddelta =
 * sum over n of l B x + l h(t-1) a A, l = G C + a(t+1) l(t+1) (docs/selective-scan.md). Inputs as `inputs`. */
function biasGradF64(
  v: Record<string, Float32Array>,
  B: number,
  L: number,
  ED: number,
  N: number,
  R: number,
) {
  const S = R + 2 * N;
  const out = new Float64Array(ED);
  for (let b = 0; b < B; b++) {
    for (let d = 0; d < ED; d++) {
      const at = (t: number) => (b * L + t) * ED + d; // (b, t, d) of x, draw, G
      const bc = (t: number, j: number) => (b * L + t) * S + R + j; // B (j < N) and C (N + j) of dBC
      const u = Array.from({ length: L }, (_, t) => v.draw[at(t)] + v.bias[d]);
      const dt = u.map((ut) => Math.log1p(Math.exp(ut)));
      const gdt = new Float64Array(L);
      for (let n = 0; n < N; n++) {
        const A = -Math.exp(v.A_log[d * N + n]);
        const h = new Float64Array(L + 1); // h[t + 1]: the state after step t
        for (let t = 0; t < L; t++) {
          h[t + 1] = Math.exp(dt[t] * A) * h[t] + dt[t] * v.x[at(t)] * v.dBC[bc(t, n)];
        }
        let lam = 0; // a(t + 1) l(t + 1)
        for (let t = L - 1; t >= 0; t--) {
          const a = Math.exp(dt[t] * A);
          const l = v.G[at(t)] * v.dBC[bc(t, N + n)] + lam;
          gdt[t] += l * v.dBC[bc(t, n)] * v.x[at(t)] + l * h[t] * a * A;
          lam = a * l;
        }
      }
      for (let t = 0; t < L; t++) out[d] += gdt[t] / (1 + Math.exp(-u[t]));
    }
  }
  return out;
}

Deno.test("dbias with many state blocks (d_state 17 and 23 in one-state blocks) sums whole steps: within 1.5e-6 of float64 (software adapters)", async () => {
  // Each state block adds its share of ddelta; the last sums the step's whole ddelta into dbias, as the
  // sequential mode does. A running sum of every block's shares (before 2026-11-29) came to 4.8e-6 and 2.2e-6
  // here; now 4.8e-7 and 1.5e-7 (lavapipe). The bound holds where exp and log are the CPU's IEEE-accurate
  // ones (software adapters); a GPU's fast-math exp adds errors of its own, so there it is the op bound.
  const info = await init();
  const bound = info.isFallbackAdapter ? 1.5e-6 : tolerance("op").rtol;
  for (const [N, seed] of [[17, 1], [23, 3]]) {
    setFusedVariant(N, { ...defaultFusedVariant(N), Nb: 1 }); // the default since 2026-11-29: two blocks
    try {
      const c: Case = { B: 1, L: 1024, ED: 8, N, R: 1, gated: false };
      const t = inputs(c, seed);
      tidy(() =>
        sum(mul(fusedSelectiveScan(t.x, t.draw, t.dBC, t.bias, t.A_log, t.D, null), t.G)).backward()
      );
      const got = await t.bias.grad!.toArray();
      const v: Record<string, Float32Array> = {};
      for (const k of ["x", "draw", "dBC", "bias", "A_log", "G"] as const) {
        v[k] = await t[k].toArray() as Float32Array;
      }
      const want = biasGradF64(v, c.B, c.L, c.ED, N, c.R);
      const scale = Math.max(1, ...want.map(Math.abs));
      const err = Math.max(...want.map((w, i) => Math.abs(got[i] - w))) / scale;
      assert.ok(
        err <= bound,
        `N ${N}: dbias ${err.toExponential(2)} from float64 (relative to ${scale.toFixed(1)})`,
      );
      for (const x of Object.values(t)) {
        x.grad?.dispose();
        x.dispose();
      }
    } finally {
      setFusedVariant(N, null);
    }
  }
});

Deno.test("fused scan: bad shapes and dtypes are errors that name them; forward-only calls leave nothing live", async () => {
  await init();
  const c = { B: 2, L: 5, ED: 6, N: 4, R: 2, gated: true };
  const t = inputs(c, 13);
  const call = (o: Partial<typeof t>) => {
    const u = { ...t, ...o };
    return () => fusedSelectiveScan(u.x, u.draw, u.dBC, u.bias, u.A_log, u.D, u.z);
  };
  const bad: [Partial<typeof t>, RegExp][] = [
    [{ x: randn([5, 6]) }, /x must be \(B, L, ED\) with B, L, ED >= 1, got \[5, 6\]/],
    [{ x: randn([2, 0, 6]) }, /x must be \(B, L, ED\) with B, L, ED >= 1, got \[2, 0, 6\]/],
    [{ x: full([2, 5, 6], 1, { dtype: "i32" }) }, /x must be f32, got i32 \[2, 5, 6\]/],
    [{ dBC: randn([2, 5, 7]) }, /dBC must be \(2, 5, R \+ 2\*4\), got \[2, 5, 7\]/],
    [{ A_log: randn([5, 4]) }, /A_log must be \(6, N\) with N >= 1, got \[5, 4\]/],
    [{ A_log: randn([6, 0]) }, /A_log must be \(6, N\) with N >= 1, got \[6, 0\]/],
    [{ bias: randn([5]) }, /the dt bias must be \(6\), got \[5\]/],
    [{ D: randn([6, 1]) }, /D must be \(6\), got \[6, 1\]/],
    [{ draw: randn([2, 5, 7]) }, /draw f32 \[2, 5, 7\] must be f32 \[2, 5, 6\] as x/],
    [{ z: randn([2, 4, 6]) }, /z \[2, 4, 6\] must equal x \[2, 5, 6\]/],
  ];
  for (const [o, re] of bad) {
    assert.throws(call(o), re);
    for (const v of Object.values(o)) v.dispose();
  }
  assert.throws(
    () => fusedMambaScan(t.x, t.dBC, randn([6, 2, 1]), t.bias, t.A_log, t.D, t.z),
    /fusedMambaScan: dtWeight must be f32 \(6, R\), got f32 \[6, 2, 1\]/,
  );
  // dBC is x_proj's output for R = 2 (10 columns): a dtWeight of rank 1 or 3 disagrees; 11 or 13 columns
  // are neither R + 2N nor its padding to 12
  for (const [R, w] of [[1, 10], [3, 10], [2, 11], [2, 13]]) { // dtWeight's rank, dBC's width
    const W = randn([6, R]), d = w === 10 ? t.dBC : randn([2, 5, w]);
    const S = R + 8, also = S % 4 === 0 ? "" : `, or ${Math.ceil(S / 4) * 4} padded`;
    assert.throws(
      () => fusedMambaScan(t.x, d, W, t.bias, t.A_log, t.D, t.z),
      new RegExp(`fusedMambaScan: dBC must be \\(2, 5, ${R} \\+ 2\\*4${also}\\), got \\[2, 5, ${w}\\]`),
    );
    W.dispose();
    if (d !== t.dBC) d.dispose();
  }
  // the forward alone (a prompt's prefill) frees every temporary: only y, ph and the inputs stay live
  const before = memory().liveTensors;
  for (let i = 0; i < 3; i++) {
    const { y, ph } = fusedMambaScanForward(t.x, t.dBC, t.W, t.bias, t.A_log, t.D, t.z);
    y.dispose();
    ph.dispose();
  }
  assert.equal(memory().liveTensors, before, "live tensors after three forwards, all outputs disposed");
  // ... and one that runs out of memory part-way (under a limit just above what is live) leaves nothing either
  const live = memory().liveBytes;
  const { result: out, failed: partWay } = await underRisingCaps(
    () => fusedMambaScanForward(t.x, t.dBC, t.W, t.bias, t.A_log, t.D, t.z), // y takes 256 bytes first
    256,
    (room) => assert.equal(memory().liveBytes, live, `nothing left live (limit +${room} bytes)`),
    1,
  );
  out.y.dispose();
  out.ph.dispose();
  assert.ok(partWay >= 1, "some limit let the forward allocate before it failed");
  for (const v of Object.values(t)) v.dispose();
});

Deno.test("the backward's sums past a software adapter's loop limit are a clear error, not wrong gradients", async () => {
  await init();
  const { deviceInfo } = await import("../core/device.ts");
  if (!deviceInfo().isFallbackAdapter) return; // GPUs run any length of loop
  // One step, so that the tensors stay small: a sums invocation walks every channel slot per column group
  // (ED 65536 at N 16: 65558 trips; lavapipe gave 4 of 33 columns of dBC's gradient wrong), or every batch
  // row of the parameter gradients (B 65600: dD was 65531). One size class below, both were exact.
  // x = 1, draw = 32 (softplus is linear above 20: dt = 32), B and C small integers: at one step dB[n] =
  // 32 ED C[n], dC[n] = 32 ED B[n] and dD = B, every partial sum an integer below 2^24, so exact in f32 (a
  // slot lost to the loop limit shows)
  const run = async (B: number, ED: number, N: number) => {
    const x = full([B, 1, ED], 1);
    const draw = full([B, 1, ED], 32);
    const S = 1 + 2 * N;
    const dBC = tensor(Float32Array.from({ length: B * S }, (_, k) => 1 + (k * 7) % 4), [B, 1, S]);
    dBC.requiresGrad_();
    const A_log = full([ED, N], 0).requiresGrad_();
    const [bias, D] = [full([ED], 0), full([ED], 0).requiresGrad_()];
    try {
      tidy(() => fusedSelectiveScan(x, draw, dBC, bias, A_log, D, null).sum().backward());
      const [bc, g, gD] = [await dBC.toArray(), await dBC.grad!.toArray(), await D.grad!.toArray()];
      const want = (b: number, c: number) => (c === 0 ? 0 : 32 * ED * bc[b * S + (c <= N ? c + N : c - N)]);
      for (let k = 0; k < g.length; k++) assert.equal(g[k], want(Math.floor(k / S), k % S), `dBC[${k}]`);
      assert.ok(gD.every((v) => v === B), `dD ${gD[0]}, ... != ${B}`);
    } finally {
      for (const t of [x, draw, dBC, A_log, bias, D]) {
        t.grad?.dispose();
        t.dispose();
      }
    }
  };
  // exact, or the clear error: never wrong gradients (where the limit falls depends on the variant in use)
  const outcome = async (B: number, ED: number, N: number) => {
    try {
      await run(B, ED, N);
      return "exact";
    } catch (e) {
      const re = new RegExp(
        `^fusedScan backward: summing over \\d+ channel slots and ${B} batch rows \\(B ${B}, ED ${ED}, ` +
          `N ${N}\\) would loop \\d+ times per invocation, past the 65535`,
      );
      if (!re.test((e as Error).message)) throw e;
      return "refused";
    }
  };
  const before = memory().liveBytes;
  const near = [await outcome(1, 65472, 16), await outcome(1, 65536, 16), await outcome(65000, 8, 1)];
  // where it was measured (8 lanes, the default variant): exact up to the limit, refused past it
  if (fixedSubgroupSize() === 8) assert.deepEqual(near, ["exact", "refused", "exact"]);
  // past any variant's limit (a slot per 64 channels at least; 65600 batch rows in one loop)
  assert.equal(await outcome(1, 1 << 19, 16), "refused");
  assert.equal(await outcome(65600, 8, 1), "refused");
  assert.equal(memory().liveBytes, before, "nothing left live after the errors");
});

Deno.test("the decoding steps (convStep, ssmStep) name what does not fit", async () => {
  await init();
  const { convStep, ssmStep } = await import("../scan/fused_step.ts");
  const [B, ED, N, R] = [2, 6, 4, 2];
  const ts = {
    x: randn([B, ED]),
    dBC: randn([B, R + 2 * N]),
    W: randn([ED, R]),
    bias: randn([ED]),
    A_log: randn([ED, N]),
    D: randn([ED]),
    xz: randn([B, 2 * ED]),
    h: randn([B, ED, N]),
  };
  const step = (o: Partial<typeof ts>) => {
    const u = { ...ts, ...o };
    return () => ssmStep(u.x, u.dBC, u.W, u.bias, u.A_log, u.D, u.xz, u.h);
  };
  const bad: [Partial<typeof ts>, RegExp][] = [
    [{ h: randn([B, ED, N + 1]) }, /ssmStep: the state must be \(2, 6, 4\), got \[2, 6, 5\]/],
    [{ D: randn([ED + 1]) }, /ssmStep: D must be \(6\), got \[7\]/],
    [{ bias: randn([ED - 1]) }, /ssmStep: the dt bias must be \(6\), got \[5\]/],
    [{ dBC: randn([B, R + 2 * N - 1]) }, /ssmStep: dBC must be \(2, >= 2 \+ 2\*4\), got \[2, 9\]/],
    [{ x: full([B, ED], 1, { dtype: "i32" }) }, /ssmStep: x must be f32, got i32/],
  ];
  for (const [o, re] of bad) {
    assert.throws(step(o), re);
    for (const v of Object.values(o)) v.dispose();
  }
  // a dt weight of rank 1 (R undefined) is named, not a TypeError
  const flat = randn([ED]);
  assert.throws(step({ W: flat }), /ssmStep: the dt_proj weight must be \(6, R\), got \[6\]/);
  const inputs = randn([B, ED, 3]);
  const w = randn([ED, 4]);
  const wideBias = randn([ED + 1]);
  assert.throws(() => convStep(ts.xz, inputs, w, wideBias), /convStep: .*bias \(ED\)/);
  // a disposed input throws before the outputs are allocated: nothing left live
  const gone = randn([B, ED, N]);
  gone.dispose();
  const live = memory().liveTensors;
  assert.throws(step({ h: gone }), /was disposed/);
  const goneInputs = randn([B, ED, 3]);
  goneInputs.dispose();
  assert.throws(() => convStep(ts.xz, goneInputs, w, null), /was disposed/);
  assert.equal(memory().liveTensors, live, "nothing allocated for a step that could not run");
  for (const v of [...Object.values(ts), inputs, w, wideBias, flat]) v.dispose();
});

Deno.test("the SSM decoding step past a software adapter's loop limit is a clear error, and MambaBlock.step takes its readable step there", async () => {
  await init();
  const { ssmStep, ssmStepLoopTrips } = await import("../scan/fused_step.ts");
  // the loop over N, and over R above rank 8 (unrolled up to 8), each with its final test
  assert.deepEqual([ssmStepLoopTrips(16, 8), ssmStepLoopTrips(16, 12)], [17, 30]);
  if (!deviceInfo().isFallbackAdapter) return; // GPUs run any length of loop
  // B = ED = 1, R = 1: x = 1, W = 0 and bias 32 (dt = 32), h = 0, B[n] = 1: every new state is 32 (a state
  // the loop limit cut off stays 0)
  const run = async (N: number) => {
    const ts = [
      full([1, 1], 1),
      full([1, 1 + 2 * N], 1),
      full([1, 1], 0),
      full([1], 32),
      full([1, N], 0),
      full([1], 0),
      full([1, 2], 1),
      full([1, 1, N], 0),
    ] as const;
    try {
      const r = ssmStep(...ts);
      const h = await r.h.toArray();
      r.y.dispose();
      r.h.dispose();
      return h;
    } finally {
      dispose(ts);
    }
  };
  const h = await run(65534); // 65535 trips: all of them run
  assert.ok(h.every((v) => v === 32), `state ${h.findIndex((v) => v !== 32)} is not 32`);
  // (unguarded, lavapipe left the last state of N 65536 at 0)
  await assert.rejects(
    () => run(65536),
    /^Error: ssmStep: N 65536 and dt rank 1 would loop 65537 times per invocation, past the 65535/,
  );
  // the block's step: the readable one, as the pscan block's
  const { MambaBlock } = await import("../mamba/block.ts");
  const { mambaConfig } = await import("../mamba/config.ts");
  const config = { dModel: 2, nLayers: 1, dtRank: 1, dState: 65536 };
  const [fused, readable] = [
    new MambaBlock(mambaConfig({ ...config, scan: "fused" })),
    new MambaBlock(mambaConfig({ ...config, scan: "pscan" })),
  ];
  readable.loadStateDict(fused.stateDict(), { strict: true });
  const u = randn([1, 2], { seed: 3 });
  const outs = [];
  for (const m of [fused, readable]) {
    const { value, kernels } = await kernelsRun(() =>
      tidy(() =>
        noGrad(() => {
          const cache = { h: full([1, 4, 65536], 0), inputs: full([1, 4, 3], 0) };
          return m.step(u, cache).out;
        })
      )
    );
    assert.ok(!kernels.some((k) => k.startsWith("ssm_step")), `no fused SSM step (${kernels.join(", ")})`);
    outs.push(await value.toArray());
    value.dispose();
  }
  assert.deepEqual(outs[0], outs[1]);
  for (const t of [u, fused, readable]) t.dispose();
});

Deno.test("fusedScanForward names inputs that are not f32 and an empty sequence, and leaves nothing live when an input was disposed", async () => {
  await init();
  const [B, L, ED, N] = [1, 5, 4, 2];
  const attrs = { N, R: 0, gated: false, dtInside: false };
  const x = randn([B, L, ED]), draw = randn([B, L, ED]), dBC = randn([B, L, 2 * N]);
  const params = [randn([ED]), randn([ED * N]), randn([ED])]; // bias, A_log, D
  const ints = full([B, L, ED], 2, { dtype: "i32" });
  assert.throws(
    () => fusedScanForward(ints, draw, dBC, params, null, attrs),
    /fusedScanForward: every input must be f32, got x i32, draw f32, dBC f32, params f32 f32 f32, z none/,
  );
  const empty = [randn([B, 0, ED]), randn([B, 0, ED]), randn([B, 0, 2 * N])];
  assert.throws(
    () => fusedScanForward(empty[0], empty[1], empty[2], params, null, attrs),
    /fusedScanForward: x \[1, 0, 4\] is not \(B, L, ED\) with L >= 1/,
  );
  const gone = randn([B, L, ED]);
  gone.dispose();
  const live = memory().liveTensors;
  assert.throws(() => fusedScanForward(gone, draw, dBC, params, null, attrs), /was disposed/);
  assert.equal(memory().liveTensors, live, "y and ph freed");
  dispose([x, draw, dBC, ...params, ints, ...empty]);
});

for (
  const mode of [
    "in order",
    "chunks in parallel, carries chained",
    "chunks in parallel, carries folded",
    "walks of 3 chunks in parallel (the last of one), carries chained",
    "walks of 3 chunks in parallel (the last of one), carries chained in 8 runs",
    "walks of 3 chunks in parallel (the last of one), carries folded",
  ]
) {
  const chunkParallel = mode !== "in order";
  const walks = mode.startsWith("walks");
  const runs = mode.endsWith("in 8 runs") ? 8 : null;
  Deno.test(
    `lastState after a prompt of several chunks equals the sequential scan's, with the forward's chunk length${
      chunkParallel ? ` (${mode}: the last chunk's state)` : ""
    }`,
    async () => {
      await init();
      const c = { B: 2, L: 150, ED: 12, N: 16, R: 2, gated: true };
      const t = inputs(c, 14);
      // a fresh buffer (zeros) for ph: not the previous mode's, which holds the same last state
      emptyPool();
      // walks: 19 chunks of 8 in 7 walks of 24 steps; else the variant in use (a GPU's tuned one may walk
      // longer chunks in its forward: not here)
      const { Lf: _, ...inUse } = fusedVariant(c.N);
      setFusedVariant(c.N, walks ? { WG: 8, Lc: 8, Lf: 24, chunkParallel } : { ...inUse, chunkParallel });
      setMaxChunksFolded(mode.includes("chained") ? 0 : null);
      setFusedChainRuns(runs);
      assert.ok(c.L > 2 * fusedVariant(c.N).Lc, "the prompt spans several chunks");
      const { y, ph, kernels } = await kernelsRun(() =>
        fusedMambaScanForward(t.x, t.dBC, t.W, t.bias, t.A_log, t.D, t.z)
      ).then((r) => ({ ...r.value, kernels: r.kernels }));
      // (on GPUs, from 128 chunks, the chain runs in runs: fused_scan_chain_fwd_seg{S})
      assert.equal(
        kernels.some((k) => /^fused_scan_chain_fwd(_seg\d+)?(_G3)?$/.test(k)),
        mode.includes("chained"),
      );
      assert.equal(kernels.some((k) => k.startsWith("fused_scan_chain_fwd_seg8")), runs === 8);
      assert.equal(
        kernels.some((k) => /^fused_scan_fwd_N16_Lc8_Lf24_WG8(_dt\d+)?_chunked(_folded)?$/.test(k)),
        walks,
      );
      assert.equal(kernels.some((k) => k.endsWith("_chunked_folded")), mode.endsWith("folded"));
      // the variant changes (a tuner run) between the forward and the read: hs keeps the forward's chunks
      setFusedVariant(c.N, { WG: 8, Lc: 8 });
      try {
        // arguments that are not the forward's: named, not a state read at the wrong offset
        assert.throws(
          () => lastState(ph, c.B, c.ED, c.N, 40),
          /lastState: \(B, L, ED, N\) = \(2, 40, 12, 16\) differ from the forward that made ph: \(2, 150, 12, 16\)/,
        );
        assert.throws(
          () => lastState(y, c.B, c.ED, c.N, c.L),
          /ph must be the `ph` a fused forward returned/,
        );
        const h = lastState(ph, c.B, c.ED, c.N, c.L); // h: (B, ED, N)
        const want = tidy(() => {
          const delta = softplus(add(matmul(narrow(t.dBC, 2, 0, c.R), t.W, { transB: true }), t.bias));
          const A = neg(exp(t.A_log));
          const Bm = narrow(t.dBC, 2, c.R, c.N);
          const C = narrow(t.dBC, 2, c.R + c.N, c.N);
          const { hs } = selectiveScan(t.x, delta, A, Bm, C, t.D, "sequential"); // hs: (B, L, ED, N)
          return narrow(hs, 1, c.L - 1, 1).reshape(c.B, c.ED, c.N);
        });
        // the op bound (fixture_util.ts); measured on lavapipe 1.6e-7
        assertMatches(
          { data: await h.toArray(), shape: h.shape },
          { data: await want.toArray(), shape: want.shape },
          tolerance("op"),
          "last state",
        );
        for (const v of [h, want]) v.dispose();
      } finally {
        setFusedVariant(c.N, null);
        setMaxChunksFolded(null);
        setFusedChainRuns(null);
      }
      for (const v of [y, ph, ...Object.values(t)]) v.dispose();
    },
  );
}

Deno.test("fused scan backward in time segments (dB/dC partials capped): results unchanged", async () => {
  const { setFusedPartialBudget } = await import("../scan/fused_run.ts");
  try {
    setFusedPartialBudget(1); // one chunk per segment
    await compare({ B: 2, L: 150, ED: 40, N: 16, R: 2, gated: true }, 12);
    setFusedPartialBudget(300_000); // L = 40000: 5 segments of 2 dispatches each
    await compare({ B: 1, L: 40000, ED: 2, N: 4, R: 1, gated: false }, 13);
  } finally {
    setFusedPartialBudget(null);
  }
});

Deno.test("fused scan variants (channels per workgroup, chunk length, states in workgroup memory, subgroup sums, both, state blocks, chunks in parallel) agree", async () => {
  const info = await init();
  const variants: Omit<FusedVariant, "N">[] = [
    { WG: 8, Lc: 16, hbuf: "workgroup" },
    { WG: 32, Lc: 8 },
    { WG: 16, Lc: 5 },
    { WG: 16, Lc: 12, Ls: 4 }, // two-level recompute; L = 37, 21: the last chunk has a partial sub-chunk
    { WG: 8, Lc: 20, Ls: 5, hbuf: "workgroup" },
    // states in blocks (N = 16: 4 and 8 blocks; N = 4: 1 and 2): later blocks add to y, dx, ddelta, dz
    { WG: 16, Lc: 12, Ls: 4, Nb: 4 },
    { WG: 8, Lc: 16, hbuf: "workgroup", Nb: 2 },
    { WG: 8, Lc: 16, Nb: 3 }, // blocks of two sizes: N = 16 as 3 3 3 3 2 2 (N = 4: 2 2)
    { WG: 8, Lc: 64, Ls: 16, S: 2 }, // llvmpipe-through-GL's default: 2 steps per barrier
    // chunks in parallel (L = 37: 3 chunks of 16, the last partial, 8 of 5; L = 21: 2 and 5), one- and two-level
    // recompute, workgroup sums (in state blocks: the shuffled variant below and the fuzz test)
    { WG: 8, Lc: 16, chunkParallel: true },
    { WG: 16, Lc: 5, S: 2, chunkParallel: true },
    { WG: 16, Lc: 12, Ls: 4, chunkParallel: true },
  ];
  // Subgroup sums where the device has them (lavapipe does; ED 40 leaves some lanes of the last tile idle).
  if (info.subgroups) {
    variants.push(
      { WG: 8, Lc: 16, reduce: "subgroup" },
      { WG: 64, Lc: 7, reduce: "subgroup" },
      { WG: 32, Lc: 24, Ls: 8, reduce: "subgroup" },
      { WG: 32, Lc: 24, Ls: 8, reduce: "subgroup", Nb: 2 },
      // subgroup sums with the recomputed states in workgroup memory (what a GPU is expected to prefer)
      { WG: 8, Lc: 16, reduce: "subgroup", hbuf: "workgroup" },
      { WG: 32, Lc: 24, Ls: 8, reduce: "subgroup", hbuf: "workgroup", Nb: 4 },
      { WG: 32, Lc: 24, Ls: 8, reduce: "subgroup", Nb: 3 },
      { WG: 8, Lc: 16, reduce: "subgroup", hbuf: "workgroup", chunkParallel: true },
    );
    const SG = info.subgroups.minSize;
    if (SG === info.subgroups.maxSize && SG <= 32) {
      // B and C rows shared by subgroupShuffle (with subgroup or workgroup sums, one- and two-level).
      variants.push(
        { WG: SG, Lc: 16, reduce: "subgroup", shuffle: true },
        { WG: 2 * SG, Lc: 12, Ls: 4, shuffle: true },
        { WG: 2 * SG, Lc: 24, Ls: 8, reduce: "subgroup", shuffle: true },
        { WG: 2 * SG, Lc: 16, reduce: "subgroup", shuffle: true, Nb: 4 },
        { WG: SG, Lc: 12, Ls: 4, shuffle: true, Nb: 2 },
        { WG: SG, Lc: 16, reduce: "subgroup", shuffle: true, Nb: 1 }, // 2 columns a block: padded butterfly
        { WG: 2 * SG, Lc: 24, Ls: 8, reduce: "subgroup", shuffle: true, Nb: 3 },
        { WG: 2 * SG, Lc: 24, Ls: 8, reduce: "subgroup", shuffle: true, hbuf: "workgroup" },
        { WG: 2 * SG, Lc: 12, Ls: 4, reduce: "subgroup", shuffle: true, Nb: 4, chunkParallel: true },
      );
    }
    // Lanes per channel (each walks Nb / lanes states; shuffles sum C.h, dx and ddelta over a channel's
    // lanes, the butterfly dB/dC over its channels), with two-level recompute, states in workgroup memory and
    // state blocks.
    if (SG === info.subgroups.maxSize && SG >= 4) {
      variants.push(
        { WG: SG, Lc: 16, reduce: "subgroup", lanes: 2 },
        { WG: 2 * SG, Lc: 12, Ls: 4, reduce: "subgroup", lanes: 4 },
        { WG: 2 * SG, Lc: 24, Ls: 8, reduce: "subgroup", hbuf: "workgroup", lanes: 2 },
        { WG: SG, Lc: 16, reduce: "subgroup", lanes: 4, Nb: 4 }, // one state per lane (four blocks at N = 16)
        { WG: 2 * SG, Lc: 8, Ls: 4, reduce: "subgroup", hbuf: "workgroup", lanes: 2, chunkParallel: true },
      );
    }
  }
  try {
    for (const v of variants) {
      setFusedVariant(16, v);
      setFusedVariant(4, v);
      await compare({ B: 2, L: 37, ED: 40, N: 16, R: 2, gated: true }, 9);
      // dt_proj inside the kernels: draw computed per step, dW and the dt columns' terms in the last block
      await compare({ B: 1, L: 21, ED: 12, N: 4, R: 1, gated: false, dtWeight: true }, 10);
    }
    const SG = fixedSubgroupSize();
    if (info.subgroups && SG !== null && SG >= 4) {
      // 64 states in one block over 4 lanes (16 each, as a default block's): the tuner's candidate that saves
      // the other blocks' dispatches on GPUs; private and workgroup states, chunks in order and in parallel
      for (
        const v of [
          { WG: SG, Lc: 64, Ls: 16, reduce: "subgroup", lanes: 4 },
          // workgroup states: WG x Ls x 64 floats within 16 KiB at up to 16 lanes
          { WG: SG, Lc: 16, Ls: 4, reduce: "subgroup", lanes: 4, hbuf: "workgroup", chunkParallel: true },
        ] as const
      ) {
        setFusedVariant(64, v);
        await compare({ B: 2, L: 37, ED: 12, N: 64, R: 2, gated: true }, 13);
        await compare({ B: 1, L: 150, ED: 8, N: 64, R: 1, gated: true, dtWeight: true }, 14);
      }
      setFusedVariant(64, null);
    }
    if (info.subgroups && fixedSubgroupSize() !== null) {
      // Few channels at batch 1 halve the workgroup; with shuffles it must stay whole subgroups (3 SG lanes
      // would become 1.5 SG: half a subgroup's B and C columns never loaded).
      setFusedVariant(16, { WG: 3 * fixedSubgroupSize()!, Lc: 16, reduce: "subgroup", shuffle: true });
      await compare({ B: 1, L: 37, ED: 40, N: 16, R: 2, gated: true }, 12);
    }
    if (info.subgroups) {
      // An adapter whose subgroup size may vary leaves some partial rows unwritten: they start as zeros.
      const real = info.subgroups;
      info.subgroups = { ...real, maxSize: 4 * real.maxSize };
      try {
        setFusedVariant(16, { WG: 32, Lc: 8, reduce: "subgroup" });
        await compare({ B: 2, L: 37, ED: 40, N: 16, R: 2, gated: true }, 11);
        await compare({ B: 2, L: 37, ED: 40, N: 16, R: 3, gated: true, dtWeight: true }, 11);
      } finally {
        info.subgroups = real;
      }
    }
  } finally {
    setFusedVariant(16, null);
    setFusedVariant(4, null);
  }
});

Deno.test("chunks in parallel: every chunk's kernels run at once, carries folded by each chunk (few chunks) or chained; in order past MAX_CHUNKS_CHAINED chunks, or where the backward's per-chunk sums would not fit half a binding", async () => {
  const info = await init();
  /** How each direction ran: carries "folded" by the main kernels, "chained" by a dispatch, or not in parallel. */
  const ran = async (c: Case, seed: number) => {
    const { kernels } = await kernelsRun(() => compare(c, seed));
    const has = (re: RegExp) => kernels.some((k) => re.test(k));
    const how = (dir: "fwd" | "bwd") => {
      if (!has(new RegExp(`^fused_scan_local_${dir}_`))) return false;
      if (
        has(new RegExp(`^fused_scan_${dir}_.*_chunked_folded$`)) &&
        !has(new RegExp(`^fused_scan_chain_${dir}(_seg\\d+)?$`))
      ) {
        return "folded";
      }
      return has(new RegExp(`^fused_scan_${dir}_.*_chunked$`)) &&
          has(new RegExp(`^fused_scan_chain_${dir}(_seg\\d+)?$`))
        ? "chained"
        : "mixed";
    };
    return {
      fwd: how("fwd"),
      bwd: how("bwd"),
      serial: has(/^fused_scan_(fwd|bwd)_N\d+(?!.*_chunked(_folded)?$)/),
    };
  };
  try {
    // 63 chunks, batch 2, the backward in time segments of 8 chunks (each its own dispatch: a chunk folds
    // carries from other segments), dt_proj inside: chained (more than Lc / 2 + 1 = 9 chunks), then folded
    setFusedVariant(4, { WG: 8, Lc: 16, Ls: 4, chunkParallel: true });
    setFusedPartialBudget(4 * 2 * 1 * 8 * 16 * 8); // bytes: B 2 x 1 slot x 2N floats a step, x Lc x 8 chunks
    const c = { B: 2, L: 1000, ED: 5, N: 4, R: 2, gated: true, dtWeight: true };
    assert.deepEqual(await ran(c, 21), { fwd: "chained", bwd: "chained", serial: false });
    setMaxChunksFolded(MAX_CHUNKS_FOLDED);
    assert.deepEqual(await ran(c, 21), { fwd: "folded", bwd: "folded", serial: false });
    setMaxChunksFolded(null);
    setFusedPartialBudget(null);
    // the rule: up to min(MAX_CHUNKS_FOLDED, Lc / 2 + 1) chunks fold (here 9 of Lc 16, two state blocks)
    setFusedVariant(4, { WG: 8, Lc: 16, Nb: 2, chunkParallel: true });
    assert.deepEqual(await ran({ ...c, L: 144 }, 24), { fwd: "folded", bwd: "folded", serial: false });
    assert.deepEqual(await ran({ ...c, L: 145 }, 24), { fwd: "chained", bwd: "chained", serial: false });
    // past MAX_CHUNKS_CHAINED chunks: time walked in order (also a regression test: one-step chunks made the
    // backward's dispatches loop past 65535 iterations, which stopped them short silently)
    setFusedVariant(4, { WG: 8, Lc: 1, chunkParallel: true });
    const L = MAX_CHUNKS_CHAINED + 1;
    assert.deepEqual(await ran({ B: 1, L, ED: 2, N: 4, R: 1, gated: true }, 22), {
      fwd: false,
      bwd: false,
      serial: true,
    });
    // the backward's per-chunk sums and carries (512 cells x 12 floats, 24 KiB) over half a 40 KiB binding:
    // the forward runs in parallel (256 chunks: chained), the backward in order (every buffer of the call fits
    // the window)
    setFusedVariant(4, { WG: 8, Lc: 2, chunkParallel: true });
    const real = info.limits.maxStorageBufferBindingSize;
    info.limits.maxStorageBufferBindingSize = 40 * 1024;
    try {
      const r = await ran({ B: 1, L: 512, ED: 2, N: 4, R: 1, gated: true }, 23);
      assert.deepEqual({ fwd: r.fwd, bwd: r.bwd }, { fwd: "chained", bwd: false });
    } finally {
      info.limits.maxStorageBufferBindingSize = real;
    }
  } finally {
    setFusedVariant(4, null);
    setFusedPartialBudget(null);
    setMaxChunksFolded(null);
  }
});

Deno.test("chunks in parallel chained in runs (GPUs, from 128 chunks): 2 to 64 runs per chain, runs left empty, chains past the last workgroup's, both directions equal the reference", async () => {
  await init();
  const chains = async (c: Case, seed: number) => {
    const { kernels } = await kernelsRun(() => compare(c, seed)); // compare: y and every gradient
    return kernels.filter((k) => k.startsWith("fused_scan_chain_")).sort();
  };
  try {
    // chunks of 4 steps: 300 chunks (B 2, ED 5, N 4: 40 chains, not a multiple of a workgroup's 64 / runs),
    // 11 chunks and 3 (fewer than the runs: some runs walk nothing)
    setFusedVariant(4, { WG: 8, Lc: 4, chunkParallel: true });
    setMaxChunksFolded(0); // chained, however few the chunks
    for (const runs of [2, 8, 64]) {
      setFusedChainRuns(runs);
      const want = [`fused_scan_chain_bwd_seg${runs}`, `fused_scan_chain_fwd_seg${runs}`];
      const c: Case = { B: 2, L: 1200, ED: 5, N: 4, R: 2, gated: true, dtWeight: true };
      assert.deepEqual(await chains(c, 41 + runs), want);
      assert.deepEqual(await chains({ ...c, L: 44, B: 1 }, 42 + runs), want);
      assert.deepEqual(await chains({ ...c, L: 9, ED: 3 }, 43 + runs), want);
    }
    assert.throws(() => chainKernel("fwd", 3), /power of two from 2 to 64, got 3/);
    assert.throws(() => setFusedChainRuns(128), /power of two from 2 to 64, got 128/);
  } finally {
    setFusedVariant(4, null);
    setMaxChunksFolded(null);
    setFusedChainRuns(null);
  }
});

Deno.test("the chunk-parallel forward walks chunks of Lf steps (the chunk states still every Lc): folded, chained, in runs, a last walk of fewer chunks, state blocks, lanes, states worked out again; y and every gradient equal the reference", async () => {
  const info = await init();
  const kernelsOf = async (c: Case, seed: number) => (await kernelsRun(() => compare(c, seed))).kernels;
  const has = (kernels: string[], re: RegExp) => kernels.some((k) => re.test(k));
  try {
    // the backward reads the chunk states the forward wrote (N 16 > 2 Lc would work them out again)
    setFusedStateSaving("keep");
    // Lc 4, Lf 12: L 37 is 10 chunks in 4 walks, the last of one chunk (of one step); 4 <= Lf / 2 + 1 fold
    setFusedVariant(16, { WG: 8, Lc: 4, Lf: 12, chunkParallel: true });
    const c: Case = { B: 2, L: 37, ED: 40, N: 16, R: 2, gated: true };
    let k = await kernelsOf(c, 71);
    assert.ok(has(k, /^fused_scan_fwd_N16_Lc4_Lf12_WG8_chunked_folded$/), `${k}`);
    assert.ok(has(k, /^fused_scan_local_fwd_N16_Lc4_Lf12_WG8_folded$/), `${k}`);
    // the backward keeps chunks of 4 (10 chunks: chained)
    assert.ok(has(k, /^fused_scan_local_bwd_N16_Lc4_WG8$/) && has(k, /^fused_scan_chain_bwd$/), `${k}`);
    // chained: L 150 is 38 chunks in 13 walks (the last of two chunks); dt_proj inside; two state blocks
    setMaxChunksFolded(0);
    for (const v of [{}, { Nb: 8 }]) {
      setFusedVariant(16, { WG: 8, Lc: 4, Lf: 12, chunkParallel: true, ...v });
      k = await kernelsOf({ ...c, L: 150, dtWeight: true }, 72);
      assert.ok(
        has(k, /^fused_scan_chain_fwd_G3$/) && has(k, /^fused_scan_fwd_N16.*_Lf12_WG8_dt2_chunked$/),
        `${k}`,
      );
    }
    // the chain in runs: walks of 3 chunks (L 149: 13 walks, the last of 2) in 8 and 64 runs (runs of at most
    // two walks, whose carries do not decay away before the next run)
    setFusedVariant(4, { WG: 8, Lc: 4, Lf: 12, chunkParallel: true });
    for (const runs of [8, 64]) {
      setFusedChainRuns(runs);
      k = await kernelsOf({ B: 2, L: 149, ED: 5, N: 4, R: 2, gated: true, dtWeight: true }, 73);
      assert.ok(has(k, new RegExp(`^fused_scan_chain_fwd_seg${runs}_G3$`)), `${k}`);
    }
    setFusedChainRuns(null);
    setMaxChunksFolded(null);
    // few walks (B 1, one tile of channels, 2 walks): the forward's workgroup halved for its walks (to 16: 4
    // workgroups), the backward's not (32 chunks)
    setFusedVariant(4, { WG: 32, Lc: 4, Lf: 64, chunkParallel: true });
    k = await kernelsOf({ B: 1, L: 128, ED: 32, N: 4, R: 1, gated: false }, 78);
    assert.ok(has(k, /^fused_scan_fwd_N4_Lc4_Lf64_WG16_chunked_folded$/), `${k}`);
    assert.ok(has(k, /^fused_scan_bwd_N4_Lc4_WG32_/), `${k}`);
    // more chunks than MAX_CHUNKS_CHAINED but fewer walks: the forward in parallel, the backward in order
    setFusedVariant(4, { WG: 8, Lc: 1, Lf: 2, chunkParallel: true });
    k = await kernelsOf({ B: 1, L: MAX_CHUNKS_CHAINED + 1, ED: 2, N: 4, R: 1, gated: true }, 79);
    assert.ok(
      has(k, /^fused_scan_chain_fwd(_seg\d+)?_G2$/) && has(k, /^fused_scan_fwd_N4_Lc1_Lf2_WG8_chunked$/),
      `${k}`,
    );
    assert.ok(!has(k, /^fused_scan_local_bwd/) && has(k, /^fused_scan_bwd_N4_Lc1_WG8_S\d+$/), `${k}`);
    // one walk (Lf >= L): the forward in order
    setFusedVariant(4, { WG: 8, Lc: 4, Lf: 64, chunkParallel: true });
    k = await kernelsOf({ B: 1, L: 60, ED: 5, N: 4, R: 1, gated: false }, 74);
    assert.ok(!has(k, /^fused_scan_local_fwd/) && has(k, /^fused_scan_fwd_N4_Lc4_WG8$/), `${k}`);
    // the chunk states worked out again in the backward (one chunk per walk there), chained and folded
    setFusedStateSaving("recompute");
    setFusedVariant(16, { WG: 8, Lc: 4, Lf: 8, chunkParallel: true });
    for (const L of [40, 150]) {
      k = await kernelsOf({ ...c, L }, 75);
      assert.ok(has(k, /^fused_scan_local_fwd_N16_Lc4_WG8$/), `${k}`); // the backward's, every chunk
    }
    setFusedStateSaving(null);
    const SG = fixedSubgroupSize();
    if (info.subgroups && SG !== null && SG >= 4) {
      setFusedVariant(16, {
        WG: 2 * SG,
        Lc: 8,
        Ls: 4,
        reduce: "subgroup",
        hbuf: "workgroup",
        lanes: 2,
        Lf: 24,
        chunkParallel: true,
      });
      await compare({ ...c, L: 150 }, 76);
      await compare({ ...c, L: 100, B: 1 }, 77);
    }
    // what does not fit is named
    assert.throws(
      () => setFusedVariant(4, { WG: 8, Lc: 4, Lf: 10, chunkParallel: true }),
      /Lf must be a multiple of Lc = 4/,
    );
    assert.throws(() => setFusedVariant(4, { WG: 8, Lc: 4, Lf: 8 }), /Lf 8 without chunkParallel/);
    assert.throws(
      () => setFusedVariant(4, { WG: 8, Lc: 4, Lf: 2, chunkParallel: true }),
      /Lf must be a multiple/,
    );
    assert.throws(() => chainKernel("bwd", 1, 2), /1 for the backward, got 2/);
  } finally {
    setFusedVariant(16, null);
    setFusedVariant(4, null);
    setMaxChunksFolded(null);
    setFusedChainRuns(null);
    setFusedStateSaving(null);
  }
});

Deno.test("a forward that feeds no backward (inference, a prompt) writes the last state only: y and lastState as with every state, the other chunk states untouched, the backward refuses its ph", async () => {
  await init();
  const c = { B: 2, L: 150, ED: 12, N: 16, R: 2, gated: true };
  const t = inputs(c, 15);
  const a = mambaScanAttrs("test", t.x, t.dBC, t.W, t.bias, t.A_log, t.D, t.z, undefined);
  const run = (states: "all" | "last") =>
    dtScanForward(t.x, t.dBC, t.W, t.bias, t.A_log, t.D, t.z, a, states);
  const walkEnds = (chunks: number, G: number) =>
    Array.from({ length: Math.ceil(chunks / G) }, (_, k) => Math.min(k * G + G - 1, chunks - 1));
  // [mode, variant, carries folded (else chained), the chunks whose states the "last" forward writes]
  const modes: [string, Omit<FusedVariant, "N">, boolean, (chunks: number) => number[]][] = [
    ["in order", { WG: 8, Lc: 16 }, false, (n) => [n - 1]],
    ["chunks in parallel, chained", { WG: 8, Lc: 16, chunkParallel: true }, false, (n) => walkEnds(n, 1)],
    ["chunks in parallel, folded", { WG: 8, Lc: 16, chunkParallel: true }, true, (n) => [n - 1]],
    [
      "walks of 3 chunks, chained",
      { WG: 8, Lc: 8, Lf: 24, chunkParallel: true },
      false,
      (n) => walkEnds(n, 3),
    ],
    ["walks of 3 chunks, folded", { WG: 8, Lc: 8, Lf: 24, chunkParallel: true }, true, (n) => [n - 1]],
  ];
  try {
    for (const [mode, variant, folded, written] of modes) {
      setFusedVariant(c.N, variant);
      setMaxChunksFolded(folded ? MAX_CHUNKS_FOLDED : 0);
      const all = run("all");
      // the "last" forward's ph gets a buffer of NaNs: what it does not write stays NaN
      const poison = full([all.ph.size], NaN);
      const buffer = poison.storage.buffer;
      poison.dispose();
      const last = run("last");
      assert.equal(last.ph.storage.buffer, buffer, `${mode}: the test's set-up (ph in the poisoned buffer)`);
      const chunks = Math.ceil(c.L / variant.Lc);
      const cells = c.B * c.ED * chunks * c.N;
      const hsOff = all.ph.size - cells;
      const [yAll, yLast, phAll, phLast] = await Promise.all(
        [all.y, last.y, all.ph, last.ph].map((u) => u.toArray()),
      );
      assert.deepEqual(yLast, yAll, `${mode}: y`);
      const want = new Set(written(chunks));
      for (let i = 0; i < cells; i++) {
        const k = Math.floor(i / c.N) % chunks;
        const [got, ref] = [phLast[hsOff + i], phAll[hsOff + i]];
        assert.ok(Number.isFinite(ref), `${mode}: every state with states "all"`);
        if (want.has(k)) assert.equal(got, ref, `${mode}: chunk ${k}'s state, float ${i}`);
        else assert.ok(Number.isNaN(got), `${mode}: chunk ${k}'s state written (float ${i}: ${got})`);
      }
      const [hAll, hLast] = [all, last].map((r) => lastState(r.ph, c.B, c.ED, c.N, c.L));
      assert.deepEqual(await hLast.toArray(), await hAll.toArray(), `${mode}: lastState`);
      assert.throws(() => phForBackward(last.ph), /phForBackward: ph holds the last state only/);
      assert.throws(
        () => fusedScanBackward(t.G, t.x, null, t.dBC, t.A_log, last.ph, t.z, a),
        /fusedScanBackward: ph holds the last state only/,
      );
      for (const u of [all.y, all.ph, last.y, last.ph, hAll, hLast]) u.dispose();
    }
    // the ops choose: under noGrad the last state only. The op's ph goes back to the pool when it returns, and
    // the next allocation of its size gets its buffer: in order, all but the last chunk's state untouched.
    setFusedVariant(c.N, { WG: 8, Lc: 16 });
    const chunks = Math.ceil(c.L / 16);
    const phFloats = c.ED * (c.N + 2 + c.R) + c.B * c.ED * chunks * c.N; // [bias | A_log | D | W | hs]
    const poison = full([phFloats], NaN);
    const buffer = poison.storage.buffer;
    poison.dispose();
    const y = noGrad(() => fusedMambaScan(t.x, t.dBC, t.W, t.bias, t.A_log, t.D, t.z));
    const left = Tensor.empty([phFloats]); // what the op's ph left
    assert.equal(left.storage.buffer, buffer, "the test's set-up (the op's ph in the poisoned buffer)");
    const leftStates = (await left.toArray()).subarray(phFloats - c.B * c.ED * chunks * c.N);
    for (let i = 0; i < leftStates.length; i++) {
      const k = Math.floor(i / c.N) % chunks;
      assert.equal(
        Number.isNaN(leftStates[i]),
        k !== chunks - 1,
        `noGrad op: chunk ${k}'s state (float ${i}: ${leftStates[i]})`,
      );
    }
    [y, left].forEach((v) => v.dispose());
    // a prompt's prefill: its ph holds the last state only
    const prefill = fusedMambaScanForward(t.x, t.dBC, t.W, t.bias, t.A_log, t.D, t.z);
    assert.throws(() => phForBackward(prefill.ph), /phForBackward: ph holds the last state only/);
    [prefill.y, prefill.ph].forEach((v) => v.dispose());
    // a misspelt states is named, not run as "last" with a ph the backward would take
    assert.throws(
      () => dtScanForward(t.x, t.dBC, t.W, t.bias, t.A_log, t.D, t.z, a, "Last" as "last"),
      /fusedScanForward: states must be "all" or "last", got "Last"/,
    );
    // in order over two dispatches (L 16400): the second starts from the state where the first ended
    setFusedVariant(4, { WG: 8, Lc: 16 });
    const long = { B: 1, L: 16400, ED: 2, N: 4, R: 1, gated: true };
    const u = inputs(long, 16);
    const b = mambaScanAttrs("test", u.x, u.dBC, u.W, u.bias, u.A_log, u.D, u.z, undefined);
    const states = [
      dtScanForward(u.x, u.dBC, u.W, u.bias, u.A_log, u.D, u.z, b, "all"),
      fusedMambaScanForward(u.x, u.dBC, u.W, u.bias, u.A_log, u.D, u.z), // a prompt's: the last state only
    ];
    const [ya, yb] = await Promise.all(states.map((r) => r.y.toArray()));
    assert.deepEqual(yb, ya, "L 16400: y");
    const hs = states.map((r) => lastState(r.ph, 1, 2, 4, long.L));
    assert.deepEqual(await hs[1].toArray(), await hs[0].toArray(), "L 16400: lastState");
    for (const r of states) [r.y, r.ph].forEach((v) => v.dispose());
    hs.forEach((h) => h.dispose());
    Object.values(u).forEach((v) => v.dispose());
  } finally {
    setFusedVariant(c.N, null);
    setFusedVariant(4, null);
    setMaxChunksFolded(null);
    Object.values(t).forEach((v) => v.dispose());
  }
});

Deno.test("chunk states that would outweigh the inputs (N > 2 Lc) are not saved: the backward works them out again, and every gradient equals the reference", async () => {
  await init();
  // bytes of a buffer as the pool sizes it (multiples of 256 up to 1 MiB)
  const pooled = (floats: number) => Math.ceil(Math.max(4 * floats, 16) / 256) * 256;
  const base: Case = { B: 2, L: 40, ED: 6, N: 16, R: 2, gated: true }; // 10 chunks of 4 steps
  const count = (kernels: string[], name: string) => kernels.filter((k) => k.startsWith(name)).length;
  try {
    for (
      const [variant, what] of [
        [{ WG: 8, Lc: 4, chunkParallel: true }, "chunks in parallel"],
        [{ WG: 8, Lc: 4 }, "chunks in order"], // the states again by the chunk-parallel kernels all the same
        [{ WG: 8, Lc: 4, Nb: 8, chunkParallel: true }, "two state blocks"],
      ] as [Omit<FusedVariant, "N">, string][]
    ) {
      setFusedVariant(16, variant);
      const blocks = variant.Nb ? 2 : 1;
      for (
        const c of [base, { ...base, dtWeight: true }, {
          ...base,
          dtWeight: true,
          outProj: "residual" as const,
        }]
      ) {
        for (const mode of ["keep", null] as const) { // null: the rule, which recomputes here (16 > 2 x 4)
          setFusedStateSaving(mode);
          const { kernels } = await kernelsRun(() => compare(c, 61)); // y and every gradient
          const again = mode === null;
          const inOrder = !variant.chunkParallel;
          const label = `${what}, ${JSON.stringify(c)}, ${mode ?? "rule"}: ${
            kernels.filter((k) => k.startsWith("fused"))
          }`;
          // the forward's local states (in parallel), and the backward's again
          assert.equal(
            count(kernels, "fused_scan_local_fwd"),
            blocks * ((inOrder ? 0 : 1) + (again ? 1 : 0)),
            label,
          );
          // 10 chunks of 4: the forward chains them (folding is for at most Lc / 2 + 1), and so does the backward
          assert.equal(count(kernels, "fused_scan_chain_fwd"), (inOrder ? 0 : 1) + (again ? 1 : 0), label);
        }
      }
    }
    // the bytes saved: the parameters alone, not the 2 x 6 x 10 x 16 floats of chunk states
    setFusedVariant(16, { WG: 8, Lc: 4, chunkParallel: true });
    const saved: number[] = [];
    for (const mode of ["keep", "recompute"] as const) {
      setFusedStateSaving(mode);
      const t = inputs(base, 62);
      const before = memory().savedBytes;
      const y = fusedSelectiveScan(t.x, t.draw, t.dBC, t.bias, t.A_log, t.D, t.z);
      saved.push(memory().savedBytes - before);
      y.dispose();
      for (const v of Object.values(t)) v.dispose();
    }
    const par = 6 * (16 + 2); // bias, A_log, D
    assert.equal(saved[0] - saved[1], pooled(par + 2 * 6 * 10 * 16) - pooled(par), `saved bytes ${saved}`);
    // under noGrad nothing is saved, so nothing is dropped either: the same kernels whatever the mode
    const ran: string[][] = [];
    for (const mode of ["keep", "recompute"] as const) {
      setFusedStateSaving(mode);
      const t = inputs(base, 64);
      const { kernels } = await kernelsRun(() =>
        noGrad(() => fusedSelectiveScan(t.x, t.draw, t.dBC, t.bias, t.A_log, t.D, t.z).dispose())
      );
      ran.push(kernels);
      for (const v of Object.values(t)) v.dispose();
    }
    assert.deepEqual(ran[1], ran[0], "noGrad: no copy of the parameters");
    // one chunk: nothing to chain, ph kept whatever the mode
    const one = { ...base, L: 4 };
    const { kernels } = await kernelsRun(() => compare(one, 63));
    assert.equal(count(kernels, "fused_scan_chain_fwd"), 0);
    // at N = 2 Lc the rule keeps them (chunks of 8 in order: no local pass anywhere)
    setFusedStateSaving(null);
    setFusedVariant(16, { WG: 8, Lc: 8 });
    const even = await kernelsRun(() => compare(base, 65));
    assert.equal(count(even.kernels, "fused_scan_local_fwd"), 0, "N = 2 Lc: the states kept");
    // the forward kernel again for the gated y, from the parameters alone: dt_proj outside (R 9), two state
    // blocks and 10 storage buffers leave no binding for y
    const info = deviceInfo();
    const buffers = info.limits.maxStorageBuffersPerShaderStage;
    setFusedVariant(32, { WG: 8, Lc: 4, Nb: 16 });
    info.limits.maxStorageBuffersPerShaderStage = 10;
    try {
      const c: Case = { B: 1, L: 24, ED: 6, N: 32, R: 9, gated: true, dtWeight: true, outProj: "residual" };
      const { kernels } = await kernelsRun(() => compare(c, 66));
      assert.equal(count(kernels, "fused_scan_local_fwd"), 2, `the states again, two blocks: ${kernels}`);
      assert.equal(count(kernels, "fused_scan_fwd_"), 4, `the forward, then again for y: ${kernels}`);
    } finally {
      info.limits.maxStorageBuffersPerShaderStage = buffers;
      setFusedVariant(32, null);
    }
    // a forward walked in order in two dispatches (16384 steps each at most), its states worked out again
    setFusedVariant(16, { WG: 8, Lc: 4 });
    const long = await kernelsRun(() => compare({ B: 1, L: 16400, ED: 2, N: 16, R: 2, gated: true }, 67));
    assert.equal(
      count(long.kernels, "fused_scan_fwd_"),
      2,
      `${long.kernels.filter((k) => k.startsWith("fused"))}`,
    );
    assert.equal(count(long.kernels, "fused_scan_local_fwd"), 1);
  } finally {
    setFusedVariant(16, null);
    setFusedStateSaving(null);
  }
});

Deno.test("the parameter gradients over many chunks' rows: summed by a reduction pass first (GPUs, past 256 rows) or walked by the sums kernel, both equal the reference", async () => {
  await init();
  // 300 chunks of 4 steps, batch 2: 600 gpar rows, which core's reduction sums in chunks of 64, then their 10
  // partials (two passes); dt_proj inside, so dW is summed there too
  const c: Case = { B: 2, L: 1200, ED: 6, N: 4, R: 2, gated: true, dtWeight: true };
  const reduces: number[] = [];
  const scanReduces: number[] = []; // those the tuner and the report count as the scan's
  try {
    setFusedVariant(4, { WG: 8, Lc: 4, chunkParallel: true });
    for (const rows of [Infinity, 0]) {
      setFusedPresumRows(rows);
      const { kernels } = await kernelsRun(() => compare(c, 31)); // compare: y and every gradient
      reduces.push(kernels.filter((k) => k === "reduce_sum").length);
      const scan = isFusedScanKernel(kernels.map((name) => ({ name })));
      scanReduces.push(kernels.filter((k, i) => k === "reduce_sum" && scan[i]).length);
    }
  } finally {
    setFusedVariant(4, null);
    setFusedPresumRows(null);
  }
  assert.equal(
    reduces[1],
    reduces[0] + 2,
    `reduce_sum dispatches: walked ${reduces[0]}, presummed ${reduces[1]}`,
  );
  assert.ok(reduces[0] > 0, "the comparison's own sums ran too"); // so the next line tells them apart
  assert.deepEqual(scanReduces, [0, 2], "the reduction passes counted as the scan's");
});

Deno.test("subgroups as the probe reports them: sizes within its range, aligned runs of the local index", async () => {
  const info = await init();
  if (!info.subgroups) return; // nothing granted: kernels use workgroup-memory sums
  const { defineKernel, dispatch } = await import("../core/kernel.ts");
  // what the kernels assume: each subgroup is the local indices sgSize * j .. sgSize * (j + 1), in order
  const k = defineKernel({
    name: "subgroup_layout_check",
    subgroups: true,
    buffers: [{ name: "y", type: "f32", access: "read_write" }],
    uniforms: [],
    workgroupSize: 64,
    body: `
  let first = subgroupBroadcastFirst(lid); // the subgroup's first local index
  st_y(gid * 3u, f32(sgSize));
  st_y(gid * 3u + 1u, f32(first + sgLane) - f32(lid)); // 0 where lanes are the local indices in order
  st_y(gid * 3u + 2u, f32(first % sgSize)); // 0 where subgroups start at multiples of their size`,
  });
  const y = Tensor.empty([2 * 64 * 3]);
  dispatch(k, { y: y.storage }, {}, 2);
  const v = await y.toArray();
  for (let i = 0; i < 128; i++) {
    const size = v[3 * i];
    assert.ok(
      size >= info.subgroups.minSize && size <= info.subgroups.maxSize,
      `invocation ${i}: size ${size}`,
    );
    assert.equal(v[3 * i + 1], 0, `invocation ${i}: lane out of order`);
    assert.equal(v[3 * i + 2], 0, `invocation ${i}: subgroup not aligned`);
  }
  y.dispose();
});

Deno.test("the backward's butterfly sums columns over any subgroup size (simulated lanes, 4 to 128)", () => {
  // The rounds the kernel generator emits, run on plain arrays: the subgroup sizes of GPUs that lavapipe (8)
  // cannot show, and column counts that need padding (C not a multiple of SG, C < SG).
  for (const SG of [4, 8, 16, 32, 64, 128]) {
    for (const C of [2, 6, 8, 32, 34, 128]) {
      const terms = Array.from(
        { length: SG },
        (_, j) => Array.from({ length: C }, (_, c) => (j * 7 + c * 3) % 11),
      );
      const { W, rounds } = butterflyRounds(C, SG);
      let v = terms.map((t) => [...t, ...Array(W * SG - C).fill(0)]);
      for (const { m, h } of rounds) {
        // lane j: v[k] = (up ? v[k+h] : v[k]) + partner's (up' ? v[k] : v[k+h]), k < h (WGSL's select(f, t, c))
        const sent = v.map((x, j) => Array.from({ length: h }, (_, k) => ((j & m) !== 0 ? x[k] : x[k + h])));
        v = v.map((x, j) => {
          const y = [...x];
          for (let k = 0; k < h; k++) y[k] = ((j & m) !== 0 ? x[k + h] : x[k]) + sent[j ^ m][k];
          return y;
        });
      }
      const got = Array(C).fill(NaN);
      for (let j = 0; j < SG; j++) for (let k = 0; k < W; k++) if (j * W + k < C) got[j * W + k] = v[j][k];
      const want = Array.from({ length: C }, (_, c) => terms.reduce((a, t) => a + t[c], 0));
      assert.deepEqual(got, want, `SG ${SG}, C ${C}`);
    }
  }
});

Deno.test("variants by problem: a call near a problem's shape runs that problem's variant, its backward the forward's; other calls the tuner's pick", async () => {
  await init();
  const before = fusedVariant(16);
  // three variants told apart by their chunk lengths (and chunks in parallel for the long, narrow problem),
  // from the default, which fits every adapter
  const base = defaultFusedVariant(16);
  const pick: FusedVariant = { ...base, Lc: 64, Ls: 16, chunkParallel: false };
  const small: FusedVariant = { ...base, Lc: 32, Ls: 16, chunkParallel: false };
  const narrowPick: FusedVariant = { ...base, Lc: 16, Ls: 16, chunkParallel: true };
  const wide: FusedVariant = { ...base, Lc: 64, Ls: 8, chunkParallel: true };
  try {
    setFusedVariant(16, pick);
    setFusedVariantsByProblem(16, [
      { problem: [4, 256, 128], variant: small }, // L / (B ED) = 0.5, B L ED = 2^17
      { problem: [1, 2048, 32], variant: narrowPick }, // 64, 2^16
      { problem: [1, 1024, 2048], variant: wide }, // 0.5, 2^21
    ]);
    // among the problems within a factor of 4 in L / (B ED), the nearest by that and B L ED; else the pick
    for (
      const [B, L, ED, want] of [
        [4, 256, 128, small],
        [1, 16, 32, small], // 0.5, 2^9: far smaller than any, nearest the first in size
        [2, 256, 256, small], // 0.5, 2^17
        [1, 512, 512, small], // 1, 2^18: 2x from the first, 8x from the third in size
        [1, 1024, 1536, wide], // 0.67, 1.5 x 2^20
        [1, 1024, 2048, wide],
        [8, 2048, 2048, wide], // 0.125, 2^25: far larger than any, nearest the third
        [1, 2048, 32, narrowPick],
        [1, 1024, 32, narrowPick], // 32
        [1, 8192, 128, narrowPick], // 64, 2^20: 16x the second's size, but the only walk near
        [1, 2048, 128, narrowPick], // 16: exactly 4x from the second's walk
        [1, 4096, 16, narrowPick], // 256: 4x too, where the logs' difference rounds above log 4
        [1, 1024, 128, pick], // 8: 16x and 8x away
        [1, 16, 1024, pick], // 0.016
        [16, 1024, 2048, pick], // 0.03: 16x away in walk
      ] as [number, number, number, FusedVariant][]
    ) {
      const got = fusedVariantFor(16, B, L, ED);
      assert.deepEqual(got, want, `(${B}, ${L}, ${ED}): ${JSON.stringify(got)}`);
    }
    assert.deepEqual(fusedVariantFor(4, 1, 2048, 32), fusedVariant(4), "another state size: its own variant");
    // run: the kernels of the variant for the shape, and every gradient right (the backward reads the chunk
    // states with the forward's chunk length)
    for (
      const [c, lc, local] of [
        [{ B: 1, L: 160, ED: 4, N: 16, R: 2, gated: true }, "_Lc16_", true], // 40
        [{ B: 2, L: 20, ED: 24, N: 16, R: 2, gated: true }, "_Lc32_", false], // 0.42, 960
        [{ B: 1, L: 100, ED: 12, N: 16, R: 2, gated: false }, "_Lc64_", false], // 8.3
      ] as [Case, string, boolean][]
    ) {
      const { kernels } = await kernelsRun(() => compare(c, 31));
      const scan = kernels.filter((k) => k.startsWith("fused_scan_"));
      assert.ok(scan.some((k) => k.includes(lc)), `${JSON.stringify(c)}: ${lc} in ${scan}`);
      assert.equal(
        scan.some((k) => k.startsWith("fused_scan_local")),
        local,
        `${JSON.stringify(c)}: ${scan}`,
      );
    }
    // an explicit choice applies to every call; a variant that does not fit is refused
    setFusedVariant(16, pick);
    assert.deepEqual(fusedVariantsByProblem(16), []);
    assert.deepEqual(fusedVariantFor(16, 1, 2048, 32), pick);
    assert.throws(
      () => setFusedVariantsByProblem(16, [{ problem: [1, 1, 1], variant: { ...before, Lc: 64, Ls: 48 } }]),
      /Ls 48, .* does not fit N = 16/,
    );
  } finally {
    setFusedVariant(16, before);
  }
});

Deno.test("the tuner's candidates are valid variants on a CPU adapter, a GPU-like one (lanes per channel) and where the subgroup size varies, at this device's workgroup memory and at WebGPU's 16 KiB", async () => {
  const info = await init();
  const { backwardKernel } = await import("../scan/fused_backward_kernel.ts");
  const { fallback, subgroups } = { fallback: info.isFallbackAdapter, subgroups: info.subgroups };
  const limit = info.limits.maxComputeWorkgroupStorageSize;
  /** Bytes of the workgroup arrays a kernel declares. */
  const wgBytes = (decls: string) =>
    [...decls.matchAll(/var<workgroup> \w+: array<f32, (\d+)>/g)].reduce((a, m) => a + 4 * +m[1], 0);
  try {
    const adapters = [
      { gpuLike: false, varying: false },
      { gpuLike: true, varying: false },
      ...(subgroups ? [{ gpuLike: true, varying: true }] : []),
    ];
    // ... on this device (lavapipe: 32 KiB) and at WebGPU's default, what every adapter has (many mobile and
    // integrated GPUs no more): a candidate past it would fail its pipeline at init()'s tuning there
    const adapterLimits = [...new Set([limit, 16384])].flatMap((wg) => adapters.map((a) => ({ ...a, wg })));
    for (const { gpuLike, varying, wg } of adapterLimits) {
      info.limits.maxComputeWorkgroupStorageSize = wg;
      info.isFallbackAdapter = !gpuLike; // on a GPU too: the CPU adapter's list is simulated
      // Intel's 8-32 and AMD's 32-64: lanes per channel and shuffles need one fixed size
      if (varying) info.subgroups = { ...subgroups!, minSize: 8, maxSize: 32 };
      for (const N of [4, 16, 64]) {
        const list = fusedCandidates(N);
        if (gpuLike && !varying && subgroups) {
          assert.ok(list.some((v) => (v.lanes ?? 1) > 1), `N = ${N}: no lanes candidate`);
          // above one block of states (N > 16) also all of them in one block (one dispatch per kernel), split
          // over lanes so that each walks at most 16
          const whole = list.filter((v) => stateBlocks(v).length === 1 && (v.lanes ?? 1) > 1);
          const perLane = whole.map((v) => N / v.lanes!);
          assert.ok(whole.length > 0, `N = ${N}: no whole-block lanes candidate`);
          assert.ok(perLane.every((k) => k <= 16), `N = ${N}: states per lane ${perLane}`);
        }
        if (varying) assert.ok(list.every((v) => !v.lanes && !v.shuffle), `N = ${N}: lanes or shuffle`);
        // chunks in parallel on GPUs only, each candidate also without
        const [par, serial] = [list.filter((v) => v.chunkParallel), list.filter((v) => !v.chunkParallel)];
        // ... and those with chunks shorter than 32 also with the forward walking about 64 steps at a time
        const walks = par.filter((v) => v.Lf !== undefined);
        const short = gpuLike ? serial.filter((v) => v.Lc < 32) : [];
        assert.equal(
          par.length,
          gpuLike ? serial.length + short.length : 0,
          `N = ${N}: chunk-parallel candidates`,
        );
        assert.deepEqual(
          walks.map(({ Lf, chunkParallel: _, ...v }) => [v, Lf! / v.Lc, Lf! >= 64 && Lf! - v.Lc < 64]),
          short.map((v) => [v, Math.ceil(64 / v.Lc), true]),
          `N = ${N}: walks of about 64 steps`,
        );
        if (gpuLike) assert.ok(walks.length > 0, `N = ${N}: no candidate walking chunks of Lf`);
        // ... and on GPUs measured first (a measurement cut short by its budget has them)
        assert.ok(list.slice(0, par.length).every((v) => v.chunkParallel), `N = ${N}: chunk-parallel first`);
        for (const v of list) {
          setFusedVariant(N, v); // throws on a variant that does not fit
          // the backward's workgroup memory fits with dt_proj inside (its last block keeps the dt terms too)
          for (const block of stateBlocks(v)) {
            for (const Ri of [0, 8]) {
              const bytes = wgBytes(backwardKernel(v, block, Ri).spec.decls ?? "");
              assert.ok(bytes <= wg, `N ${N} ${JSON.stringify(v)} dt rank ${Ri}: ${bytes} > ${wg} bytes`);
            }
          }
        }
        setFusedVariant(N, null);
      }
      info.subgroups = subgroups;
      info.limits.maxComputeWorkgroupStorageSize = limit;
    }
    // a variant that does not fit is refused with what was wrong
    assert.throws(
      () => setFusedVariant(16, { WG: 32, Lc: 64, reduce: "subgroup", lanes: 3 }),
      /setFusedVariant: WG 32, Lc 64, Ls 64, Nb 16, lanes 3, reduce subgroup does not fit N = 16 .*lanes a power of two dividing every state block/,
    );
    // steps per barrier: a whole number, and S steps of terms within the workgroup memory
    assert.throws(
      () => setFusedVariant(16, { WG: 8, Lc: 64, S: 0 }),
      /WG 8, Lc 64, Ls 64, Nb 16, S 0 does not fit/,
    );
    assert.throws(() => setFusedVariant(16, { WG: 8, Lc: 64, S: 2.5 }), /S be an integer >= 1/);
    for (const Nb of [0, 2.5, 17]) {
      assert.throws(() => setFusedVariant(16, { WG: 8, Lc: 64, Nb }), /Nb be an integer from 1 to N/);
    }
    assert.throws(
      () => setFusedVariant(16, { WG: 64, Lc: 64, S: 16 }), // 16 x 64 x 40 floats: 160 KiB
      /S 16 does not fit .*workgroup memory \(163840 bytes\) within the device limit/,
    );
    // chunks longer than a dispatch's loop budget (the forward's dispatches would walk 0 steps: a hang)
    assert.throws(() => setFusedVariant(1, { WG: 8, Lc: 20000, Ls: 2000 }), /Lc at most 8192/);
    // a full workgroup memory leaves no room for the dt terms
    const tight = Math.floor((limit / (4 * 32) - 32) / 16); // Lc filling the memory with 2 Nb terms only
    assert.throws(
      () => setFusedVariant(16, { WG: 32, Lc: tight, hbuf: "workgroup" }),
      /workgroup memory \(\d+ bytes\) within the device limit/,
    );
  } finally {
    info.isFallbackAdapter = fallback;
    info.subgroups = subgroups;
    info.limits.maxComputeWorkgroupStorageSize = limit;
  }
});

Deno.test("a software adapter without subgroups (llvmpipe through GL) gets the default only: no compile at init()", async () => {
  const info = await init();
  const { fallback, subgroups } = { fallback: info.isFallbackAdapter, subgroups: info.subgroups };
  const before = fusedVariant(16);
  try {
    info.isFallbackAdapter = true;
    info.subgroups = null;
    assert.equal(fusedCandidates(16).length, 1);
    const r = await tuneFusedScan(16, { force: true });
    assert.deepEqual(r.timings, {}, "nothing measured");
    assert.deepEqual(fusedVariant(16), fusedCandidates(16)[0]);
    // a small workgroup array (2 steps x 8 channels): Mesa's GL compiles the backward in 5 s, not 100
    assert.deepEqual(fusedVariant(16), { N: 16, Lc: 64, Ls: 16, WG: 8, S: 2 });
    info.isFallbackAdapter = false; // a GPU without subgroups still measures its candidates
    assert.ok(fusedCandidates(16).length > 1);
  } finally {
    info.isFallbackAdapter = fallback;
    info.subgroups = subgroups;
    setFusedVariant(16, before);
  }
});

/** What the tuner tests change (the adapter kind they pretend, the cached choices, d_state 16's variant),
 * saved: the returned function puts it back as it was for the rest of the suite. */
async function tunerState(): Promise<() => void> {
  const info = await init();
  const fallback = info.isFallbackAdapter;
  const before = fusedVariant(16);
  const cached = Object.entries(localStorage).filter(([k]) => k.startsWith("mambats.fusedScan."));
  return () => {
    info.isFallbackAdapter = fallback;
    for (const k of Object.keys(localStorage)) {
      if (k.startsWith("mambats.fusedScan.")) localStorage.removeItem(k);
    }
    for (const [k, v] of cached) localStorage.setItem(k, v);
    setFusedVariant(16, before);
  };
}

Deno.test("the fused tuner measures again where its cached entry is not whole (not JSON, null, a null variant, fields missing)", async () => {
  await init();
  if (fusedCandidates(16).length < 2) return; // one candidate: nothing is cached or read
  const restore = await tunerState();
  try {
    const timer = () => Promise.resolve(1); // scripted: nothing runs
    // the entry this device reads, alone (others, of another subgroup size or adapter, go; restore puts them back)
    const entries = () => Object.keys(localStorage).filter((k) => k.startsWith("mambats.fusedScan."));
    for (const k of entries()) localStorage.removeItem(k);
    await tuneFusedScan(16, { force: true, timer });
    assert.equal(entries().length, 1);
    const key = entries()[0];
    const whole = JSON.parse(localStorage.getItem(key)!);
    assert.equal((await tuneFusedScan(16, { timer })).fromCache, true, "a whole entry is taken");
    for (
      const bad of [
        "{",
        "null",
        JSON.stringify({ variant: null }),
        JSON.stringify({ variant: whole.variant }),
      ]
    ) {
      localStorage.setItem(key, bad);
      const r = await tuneFusedScan(16, { timer });
      assert.equal(r.fromCache, false, bad);
      assert.ok(r.variant !== null && Array.isArray(r.problems) && Array.isArray(r.byProblem), bad);
    }
  } finally {
    restore();
  }
});

Deno.test("the fused tuner stops after a candidate whose compile is slow or past its time budget, keeping the fastest measured; GPUs score three problems", async () => {
  const info = await init();
  const candidates = fusedCandidates(16);
  if (candidates.length < 2) return; // nothing to cut short
  const restore = await tunerState();
  try {
    const r = await tuneFusedScan(16, { force: true, slowCompileMs: 0 }); // every compile counts as slow
    assert.deepEqual(Object.keys(r.timings), [JSON.stringify(candidates[0])], "the default only");
    assert.deepEqual(r.variant, candidates[0]);
    assert.deepEqual(fusedVariant(16), candidates[0]);
    // likewise once the measurement has used its time budget
    const cut = await tuneFusedScan(16, { force: true, budgetMs: 0 });
    assert.deepEqual(Object.keys(cut.timings), [JSON.stringify(candidates[0])], "the first only");
    // a GPU also measures a long, narrow problem and a wide one; a candidate's score is the geometric mean of
    // its times
    info.isFallbackAdapter = false;
    const g = await tuneFusedScan(16, { force: true, slowCompileMs: 0 });
    const key = JSON.stringify(fusedCandidates(16)[0]);
    assert.deepEqual(g.problems, [[4, 256, 128], [1, 2048, 32], [1, 1024, 2048]]);
    assert.deepEqual(Object.keys(g.problemTimings), [key]);
    const [a, b, c] = g.problemTimings[key];
    assert.ok(a > 0 && b > 0 && c > 0, `times ${a}, ${b}, ${c}`);
    assert.ok(
      Math.abs(g.timings[key] - Math.cbrt(a * b * c)) <= 1e-9 * g.timings[key],
      `score ${g.timings[key]}`,
    );
    // the finalists (here the one measured) are measured again, CONFIRM_SAMPLES times in all; each problem
    // counts the median, which lies between the later two whatever the first
    assert.deepEqual(Object.keys(g.confirmations), [key]);
    assert.equal(g.confirmations[key].length, CONFIRM_SAMPLES - 1);
    g.problemTimings[key].forEach((m, i) => {
      const [x, y] = g.confirmations[key].map((again) => again[i]);
      assert.ok(x > 0 && y > 0 && Math.min(x, y) <= m && m <= Math.max(x, y), `median ${m} of ?, ${x}, ${y}`);
    });
    // ... and keeps the fastest on each problem (here the one measured) for calls near it in shape
    assert.deepEqual(g.byProblem.map((p) => [p.problem, JSON.stringify(p.variant)]), [
      [[4, 256, 128], key],
      [[1, 2048, 32], key],
      [[1, 1024, 2048], key],
    ]);
    assert.equal(
      r.byProblem.length,
      r.problems.length > 1 ? r.problems.length : 0,
      "one problem: none by problem",
    );
  } finally {
    restore();
  }
});

/** Tunes d_state 16 with scripted times (nothing runs): `times[k]` gives candidate k's measurements in order,
 * each ms per problem (a number: the same on every problem), its last repeated; candidates not named take 6 ms.
 * Returns the result, the candidate of each timer call, and the number of problems. */
async function scriptedTune(
  times: Record<string, (number | number[])[]>,
  options: { force?: boolean } = { force: true },
) {
  const P = tuneProblems().length;
  const count = new Map<string, number>();
  const calls: string[] = [];
  const r = await tuneFusedScan(16, {
    ...options,
    budgetMs: Infinity,
    slowCompileMs: Infinity,
    timer: () => { // a measurement is P calls, one per problem, in order
      const k = JSON.stringify(fusedVariant(16));
      calls.push(k);
      const n = count.get(k) ?? 0;
      count.set(k, n + 1);
      const list = times[k] ?? [6];
      const v = list[Math.min(Math.floor(n / P), list.length - 1)];
      return Promise.resolve(typeof v === "number" ? v : v[n % P]);
    },
  });
  return { r, calls, P };
}

Deno.test("the fused tuner measures its three best again, counting each problem's median, and then any candidate left fastest overall or on a problem", async () => {
  const info = await init();
  if (fusedCandidates(16).length < 6) return; // a software adapter without subgroups measures the default only
  const restore = await tunerState();
  /** `first` and `second` give a candidate's first and later measurements (a number: the same on every
   * problem); candidates not named take 6 ms. */
  const run = (first: Record<string, number | number[]>, second: Record<string, number | number[]>) =>
    scriptedTune(Object.fromEntries(
      fusedCandidates(16).map((v) => JSON.stringify(v)).map((k) => [k, [first[k] ?? 6, second[k] ?? 6]]),
    ));
  const close = (a: number, b: number, what: string) =>
    assert.ok(Math.abs(a - b) < 1e-9, `${what}: ${a}, ${b}`);
  try {
    const [c0, c1, c2, c3, c4] = fusedCandidates(16).map((v) => JSON.stringify(v));
    const first = { [c0]: 5, [c1]: 1, [c2]: 2, [c3]: 3, [c4]: 4 };
    // c1 (first 1 ms) measures 10 ms twice more: c2 (2, then 2.5) wins; finalists c1, c2, c3 measured again
    const a = await run(first, { [c1]: 10, [c2]: 2.5, [c3]: 3 });
    assert.equal(JSON.stringify(a.r.variant), c2);
    assert.deepEqual(Object.keys(a.r.confirmations).sort(), [c1, c2, c3].sort());
    close(a.r.timings[c1], 10, "c1 counts its median");
    close(a.r.timings[c2], 2.5, "c2");
    assert.deepEqual(a.r.confirmations[c2], Array(CONFIRM_SAMPLES - 1).fill(Array(a.P).fill(2.5)));
    assert.deepEqual([a.r.confident, a.r.unsure, a.r.spread[c2]], [true, 0, 0]);
    // all three finalists slower later: c4 (4, never a finalist) leads, so it is measured again
    const b = await run(first, { [c1]: 10, [c2]: 8, [c3]: 9, [c4]: 4.5 });
    assert.equal(JSON.stringify(b.r.variant), c4);
    assert.deepEqual(Object.keys(b.r.confirmations).sort(), [c1, c2, c3, c4].sort());
    close(b.r.timings[c4], 4.5, "c4");
    // the finalists are measured again in rounds, slowest first, then the other way: c3, c2, c1, then (c1's
    // second time leaving c4 fastest, which joins them) c4, c1, c2, c3, and c4 once more
    const again = b.calls.slice(fusedCandidates(16).length * b.P);
    assert.deepEqual(
      again.filter((_, i) => i % b.P === 0),
      [c3, c2, c1, c4, c1, c2, c3, c4],
      "order of the later measurements",
    );
    // a GPU (three problems): g5 is no finalist (score cbrt(36 x 0.5 x 6) = 4.8) but the fastest on the second
    // problem, and g0 (cbrt(9 x 9 x 0.4) = 3.2) on the third, so they are measured again too, and calls near
    // those problems take them
    info.isFallbackAdapter = false;
    const [g0, g1, g2, g3, g4, g5] = fusedCandidates(16).map((v) => JSON.stringify(v));
    const g = await run(
      { [g0]: [9, 9, 0.4], [g1]: 1, [g2]: 2, [g3]: 3, [g4]: 4, [g5]: [36, 0.5, 6] },
      { [g0]: [9, 9, 0.45], [g1]: 1, [g2]: 2, [g3]: 3, [g5]: [36, 0.6, 6] },
    );
    assert.equal(g.P, 3);
    assert.equal(JSON.stringify(g.r.variant), g1);
    assert.deepEqual(Object.keys(g.r.confirmations).sort(), [g0, g1, g2, g3, g5].sort());
    assert.deepEqual(g.r.problemTimings[g5], [36, 0.6, 6], "each problem at the median of its times");
    close(g.r.timings[g5], Math.cbrt(36 * 0.6 * 6), "g5's score");
    close(g.r.timings[g0], Math.cbrt(9 * 9 * 0.45), "g0's score");
    assert.deepEqual(g.r.byProblem.map((p) => JSON.stringify(p.variant)), [g1, g5, g0]);
    // times that tell nothing (0 from timestamps quantised to 100 µs, as Chrome's; NaN, negative) never win,
    // overall or on a problem: as 0 ms, g0 was the fastest everywhere
    const z = await run({ [g0]: 0, [g1]: 1, [g2]: [2, NaN, 2], [g3]: -1 }, {
      [g0]: 0,
      [g1]: 1,
      [g2]: [2, NaN, 2],
    });
    assert.equal(JSON.stringify(z.r.variant), g1);
    assert.equal(z.r.timings[g0], Infinity);
    assert.ok(z.r.byProblem.every((p) => ![g0, g2, g3].includes(JSON.stringify(p.variant))));
  } finally {
    restore();
  }
});

Deno.test("the fused tuner's median: a burst in one of a finalist's measurements does not rule it out", async () => {
  await init();
  if (fusedCandidates(16).length < 6) return;
  const restore = await tunerState();
  try {
    const [c0, c1, c2, c3, c4] = fusedCandidates(16).map((v) => JSON.stringify(v));
    // c1 is the fastest, but its second measurement ran into other work (10 ms): the slower of its first two,
    // as the tuner counted before, made c2 the pick
    const { r } = await scriptedTune({ [c0]: [5], [c1]: [1, 10, 1], [c2]: [2, 2.5], [c3]: [3], [c4]: [4] });
    assert.equal(JSON.stringify(r.variant), c1);
    assert.equal(r.timings[c1], 1);
    assert.deepEqual([r.confident, r.spread[c1]], [true, 0], "two of three alike: steady");
  } finally {
    restore();
  }
});

Deno.test("a fused choice that was not clear is cached as such and measured again by the next call, up to UNSURE_TRIES in a row; a clear one, and one cached before the confidence was kept, measured once", async () => {
  await init();
  if (fusedCandidates(16).length < 6 || typeof localStorage === "undefined") return;
  const restore = await tunerState();
  try {
    const entries = () => Object.keys(localStorage).filter((k) => k.startsWith("mambats.fusedScan."));
    for (const k of entries()) localStorage.removeItem(k); // this device's entry alone (restored after)
    const [c0, c1] = fusedCandidates(16).map((v) => JSON.stringify(v));
    // c1 10% ahead of c0, their measurements 40% apart round after round: unclear however many rounds
    const unclear = { [c0]: [1.1, 1.7, 0.7, 1.1, 1.7, 0.7], [c1]: [1, 1.6, 0.6, 1, 1.6, 0.6] };
    const first = await scriptedTune(unclear);
    assert.deepEqual([JSON.stringify(first.r.variant), first.r.confident, first.r.unsure], [c1, false, 1]);
    assert.ok(first.r.spread[c1] > 0.2 && first.r.spread[c0] > 0.2, JSON.stringify(first.r.spread));
    // the rounds after the confirmations: the two again, at most twice
    assert.equal(first.r.confirmations[c1].length, CONFIRM_SAMPLES + 1);
    for (let unsure = 2; unsure <= UNSURE_TRIES; unsure++) {
      const again = await scriptedTune(unclear, {});
      assert.deepEqual([again.r.fromCache, again.r.confident, again.r.unsure], [false, false, unsure]);
      assert.ok(again.calls.length > 0, "measured again");
    }
    const kept = await scriptedTune(unclear, {});
    assert.deepEqual([kept.r.fromCache, kept.r.unsure, kept.calls.length], [true, UNSURE_TRIES, 0]);
    // clear: cached as confident, then read
    const clear = await scriptedTune({ [c0]: [2], [c1]: [1] });
    assert.deepEqual([clear.r.confident, clear.r.unsure], [true, 0]);
    const cached = await scriptedTune({}, {});
    assert.deepEqual([cached.r.fromCache, cached.r.confident, cached.calls.length], [true, true, 0]);
    // an entry from before (no confident, spread, unsure): measured again once, then read
    assert.equal(entries().length, 1);
    const key = entries()[0];
    const { confident: _c, spread: _s, unsure: _u, ...old } = JSON.parse(localStorage.getItem(key)!);
    localStorage.setItem(key, JSON.stringify(old));
    assert.equal((await scriptedTune({ [c0]: [2], [c1]: [1] }, {})).r.fromCache, false, "measured again");
    assert.equal((await scriptedTune({}, {})).r.fromCache, true, "then read");
  } finally {
    restore();
  }
});

Deno.test("setFusedVariant refuses a variant made for another N, unknown keys and values outside their choices", async () => {
  await init();
  const before = fusedVariant(8);
  const bad: [object, RegExp][] = [
    [fusedVariant(16), /the variant is for N = 16, set for N = 8/],
    [{ WG: 8, Lc: 16, lane: 4 }, /unknown keys lane \(a variant has N, Nb, Lc/],
    [{ WG: 8, Lc: 16, reduce: "subgroups" }, /reduce must be "workgroup" or "subgroup", got "subgroups"/],
    [{ WG: 8, Lc: 16, hbuf: "shared" }, /hbuf must be "private" or "workgroup", got "shared"/],
    [{ WG: 8, Lc: 16, chunkParallel: "no" }, /chunkParallel must be true or false, got "no"/],
    [{ WG: 8, Lc: 16, lanes: 1.5 }, /lanes must be a positive integer, got 1.5/],
  ];
  for (const [v, want] of bad) {
    assert.throws(() => setFusedVariant(8, v as Omit<FusedVariant, "N">), want);
    assert.deepEqual(fusedVariant(8), before, "unchanged");
  }
  setFusedVariant(8, { ...fusedVariant(8) }); // its own N: accepted
  assert.deepEqual(fusedVariant(8), before);
});

Deno.test("a tuner run that fails part-way keeps the variant in use and frees its problems' tensors", async () => {
  await init();
  if (fusedCandidates(16).length < 3) return; // nothing measured on this adapter
  const restore = await tunerState();
  try {
    const [before, live] = [fusedVariant(16), memory().liveBytes];
    let calls = 0;
    const failing = () => (++calls === 3 ? Promise.reject(new Error("lost device")) : Promise.resolve(1));
    await assert.rejects(() => tuneFusedScan(16, { force: true, timer: failing }), /lost device/);
    assert.deepEqual(fusedVariant(16), before, "the variant in use, not the candidate being measured");
    assert.equal(memory().liveBytes, live, "the problems' tensors freed");
  } finally {
    restore();
  }
});

Deno.test("the fused tuner inside a caller's profile() times by the clock, not refused (a trainer's first step tunes its state size there)", async () => {
  await init();
  const candidates = fusedCandidates(16);
  if (candidates.length < 2 || !deviceInfo().timestampQuery) return; // nothing measured, or no profile()
  const restore = await tunerState();
  try {
    let r: Awaited<ReturnType<typeof tuneFusedScan>> | null = null;
    const times = await profile(async () => {
      r = await tuneFusedScan(16, { force: true, budgetMs: 0 });
    });
    assert.deepEqual(Object.keys(r!.timings), [JSON.stringify(candidates[0])]);
    assert.ok(r!.timings[JSON.stringify(candidates[0])] > 0);
    // the caller's profile saw the tuner's kernels
    assert.ok(times.some((k) => k.name.startsWith("fused_scan")), JSON.stringify(times.slice(0, 5)));
  } finally {
    restore();
  }
});

Deno.test("the fused tuner's cached choice is per subgroup support: one made without subgroups is not reused once the device has them", async () => {
  const info = await init();
  const subgroups = info.subgroups;
  if (!subgroups || typeof localStorage === "undefined") return; // nothing to gain, or nothing cached
  const restore = await tunerState();
  try {
    for (const k of Object.keys(localStorage)) {
      if (k.startsWith("mambats.fusedScan.")) localStorage.removeItem(k); // no choice cached (restored after)
    }
    info.isFallbackAdapter = false; // a GPU's candidates (a software adapter without subgroups has one only)
    const timer = () => Promise.resolve(1); // scripted: nothing runs; ties go to the first candidate
    info.subgroups = null; // an older browser or runtime
    const without = await tuneFusedScan(16, { force: true, budgetMs: Infinity, timer });
    assert.notEqual(without.variant.reduce, "subgroup");
    info.subgroups = subgroups; // the same adapter, now with subgroups: its own measurement
    const r = await tuneFusedScan(16, { budgetMs: Infinity, timer });
    assert.equal(r.fromCache, false, `reused ${JSON.stringify(r.variant)}, chosen without subgroups`);
    assert.equal(r.variant.reduce, "subgroup");
    assert.equal((await tuneFusedScan(16, { timer })).fromCache, true, "its own choice is cached");
  } finally {
    info.subgroups = subgroups;
    restore();
  }
});

Deno.test("the trainer's tuning on first use: a state size with one candidate is set without measuring; N 16 is init()'s", async () => {
  const info = await init();
  const before16 = fusedVariant(16);
  await ensureFusedTuned(16); // init() tuned it: nothing happens
  assert.deepEqual(fusedVariant(16), before16);
  if (info.isFallbackAdapter) {
    // above N = 16 a software adapter measures no alternative (each costs lavapipe seconds of compiling)
    assert.equal(fusedCandidates(32).length, 1);
    const r = await tuneFusedScan(32);
    assert.deepEqual(r.timings, {}, "no measurement");
    assert.deepEqual(fusedVariant(32), fusedCandidates(32)[0]);
    setFusedVariant(32, null);
    await ensureFusedTuned(32);
    assert.deepEqual(fusedVariant(32), fusedCandidates(32)[0]);
    setFusedVariant(32, null);
  }
  // a second caller during the first's tuning (a second Trainer, say) waits for it: it marked N tuned and
  // returned at once, then ran on the untuned scan inside the tuner's timings
  const order: string[] = [];
  const first = ensureFusedTuned(24).then(() => order.push("first"));
  const second = ensureFusedTuned(24).then(() => order.push("second"));
  await Promise.all([first, second]);
  assert.deepEqual(order, ["first", "second"]);
  setFusedVariant(24, null);
});
