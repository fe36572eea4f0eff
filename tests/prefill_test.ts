/**
 * Going on from a cache: the selective scan from an initial state h0 (every scan mode, every fused forward
 * plan), `Mamba.forwardWithCache` / `MambaLM.prefill` from the caches of the tokens before, and
 * `perplexity`'s `carryState`. Each is checked against one run over the whole sequence, which has no initial
 * state: a sequence cut in two, the second part from the first part's state, must give the whole's outputs.
 * @module
 */

import assert from "node:assert/strict";
import { init } from "../core/device.ts";
import { randn, tensor } from "../core/creation.ts";
import { add, cat, crossEntropy, exp, matmul, mul, narrow, neg, silu, softplus } from "../core/ops/index.ts";
import { dispose, type Tensor, tidy } from "../core/tensor.ts";
import { noGrad } from "../core/autograd.ts";
import { emptyPool, memory } from "../core/memory.ts";
import { fusedMambaScanForward, fusedMambaScanFrom } from "../scan/fused.ts";
import { fusedMambaScanOut } from "../scan/fused_out.ts";
import { deviceInfo } from "../core/device.ts";
import { lastState, setFusedChainRuns, setFusedStateSaving, setMaxChunksFolded } from "../scan/fused_run.ts";
import { fusedVariant, MAX_CHUNKS_FOLDED, setFusedVariant } from "../scan/fused_variant.ts";
import { selectiveScan } from "../scan/selective_scan.ts";
import { fromPretrained } from "../mamba/pretrained.ts";
import type { LayerCache } from "../mamba/block.ts";
import type { MambaLM, PrefillOptions } from "../mamba/lm.ts";
import { perplexity } from "../mamba/perplexity.ts";
import { assertMatches, fixturePath, tolerance } from "./fixture_util.ts";
import { compare, inputs } from "./fused_cases.ts";
import { fusedUnavailable, kernelsRun } from "./helpers.ts";

await init();
const noFused = fusedUnavailable();

/** The fused forward's plans (as fused_test.ts's lastState test forces them): in order (the variant in use),
 * chunks of 8 in parallel with their carries chained or folded, walks of 3 chunks, and the chain in 8 runs (a
 * GPU's, from 128 chunks). */
const PLANS = [
  "in order",
  "chunks in parallel, carries chained",
  "chunks in parallel, carries folded",
  "walks of 3 chunks, carries chained",
  "walks of 3 chunks, carries chained in 8 runs",
  "walks of 3 chunks, carries folded",
] as const;
type Plan = typeof PLANS[number];

/** Runs `fn` with the fused forward planned as `plan` for N states, then restores the defaults. */
async function withPlan<T>(plan: Plan, N: number, fn: () => Promise<T>): Promise<T> {
  const chunkParallel = plan !== "in order";
  const { Lf: _, ...inUse } = fusedVariant(N);
  setFusedVariant(
    N,
    plan.startsWith("walks")
      ? { WG: 8, Lc: 8, Lf: 24, chunkParallel }
      : chunkParallel
      ? { WG: 8, Lc: 8, chunkParallel }
      : { ...inUse, chunkParallel },
  );
  setMaxChunksFolded(plan.includes("chained") ? 0 : plan.includes("folded") ? MAX_CHUNKS_FOLDED : null);
  setFusedChainRuns(plan.endsWith("8 runs") ? 8 : null);
  try {
    return await fn();
  } finally {
    setFusedVariant(N, null);
    setMaxChunksFolded(null);
    setFusedChainRuns(null);
  }
}

/** (x, delta, A, Bm, C) of a case's seeded inputs, as the sequential scan takes them, from step t0 for L. */
function scanArgs(t: ReturnType<typeof inputs>, R: number, N: number, t0: number, L: number) {
  const part = (v: Tensor) => narrow(v, 1, t0, L);
  const dBC = part(t.dBC);
  return {
    x: part(t.x),
    delta: softplus(add(matmul(narrow(dBC, 2, 0, R), t.W, { transB: true }), t.bias)), // (B, L, ED)
    A: neg(exp(t.A_log)), // (ED, N)
    Bm: narrow(dBC, 2, R, N),
    C: narrow(dBC, 2, R + N, N),
    z: part(t.z),
  };
}

for (const plan of PLANS) {
  Deno.test({
    name:
      `fused forward from an initial state (${plan}): a sequence cut in two gives the whole's y and last state`,
    ignore: noFused,
    fn: async () => {
      // 150 steps in chunks of 8: 19 chunks, cut at 61 (inside a chunk and a walk), so both parts span several
      const c = { B: 2, L: 150, ED: 12, N: 16, R: 2, gated: true };
      const cut = 61;
      const t = inputs(c, 31);
      emptyPool(); // fresh buffers: no state a previous plan left
      await withPlan(plan, c.N, async () => {
        const part = (v: Tensor, t0: number, L: number) => narrow(v, 1, t0, L);
        const run = (t0: number, L: number, h0: Tensor | null) =>
          fusedMambaScanForward(
            part(t.x, t0, L),
            part(t.dBC, t0, L),
            t.W,
            t.bias,
            t.A_log,
            t.D,
            part(t.z, t0, L),
            undefined,
            h0,
          );
        const whole = run(0, c.L, null);
        const first = run(0, cut, null);
        const h1 = lastState(first.ph, c.B, c.ED, c.N, cut); // h1: (B, ED, N)
        const { value: second, kernels } = await kernelsRun(() => run(cut, c.L - cut, h1));
        // the plan ran (the chain, folded carries, walks)
        assert.equal(
          kernels.some((k) => k.startsWith("fused_scan_chain_fwd")),
          plan.includes("chained"),
          `${kernels}`,
        );
        assert.equal(
          kernels.some((k) => k.endsWith("_chunked_folded")),
          plan.endsWith("folded"),
          `${kernels}`,
        );
        assert.equal(kernels.some((k) => k.startsWith("fused_scan_chain_fwd_seg8")), plan.endsWith("8 runs"));
        const bound = tolerance("op");
        const got = async (v: Tensor) => ({ data: await v.toArray(), shape: v.shape });
        const rest = part(whole.y, cut, c.L - cut);
        assertMatches(await got(second.y), await got(rest), bound, "y after the cut");
        const hWhole = lastState(whole.ph, c.B, c.ED, c.N, c.L);
        const hSecond = lastState(second.ph, c.B, c.ED, c.N, c.L - cut);
        assertMatches(await got(hSecond), await got(hWhole), bound, "last state");
        // and the sequential scan from h1 (selectiveScan's own h0), gated as the fused op gates
        const want = tidy(() => {
          const a = scanArgs(t, c.R, c.N, cut, c.L - cut);
          const { y } = selectiveScan(a.x, a.delta, a.A, a.Bm, a.C, t.D, "sequential", h1);
          return mul(y, silu(a.z));
        });
        assertMatches(await got(second.y), await got(want), bound, "y against the sequential scan from h1");
        dispose([whole, first, second, h1, rest, hWhole, hSecond, want]);
      });
      dispose(t);
    },
  });
}

for (const mode of ["sequential", "pscan"] as const) {
  Deno.test(`selectiveScan (${mode}) from an initial state: a sequence cut in two gives the whole's y and states`, async () => {
    const c = { B: 2, L: 37, ED: 6, N: 4, R: 2, gated: true };
    const t = inputs(c, 32);
    // (compared outside tidy: toArray is async)
    for (const cut of [1, 20, 36]) {
      const r = tidy(() => {
        const whole = scanArgs(t, c.R, c.N, 0, c.L);
        const w = selectiveScan(whole.x, whole.delta, whole.A, whole.Bm, whole.C, t.D, mode);
        const a = scanArgs(t, c.R, c.N, 0, cut);
        const first = selectiveScan(a.x, a.delta, a.A, a.Bm, a.C, t.D, mode);
        const h1 = narrow(first.hs, 1, cut - 1, 1).reshape(c.B, c.ED, c.N);
        const b = scanArgs(t, c.R, c.N, cut, c.L - cut);
        const second = selectiveScan(b.x, b.delta, b.A, b.Bm, b.C, t.D, mode, h1);
        return [cat([first.y, second.y], 1), w.y, cat([first.hs, second.hs], 1), w.hs];
      });
      const arr = async (v: Tensor) => ({ data: await v.toArray(), shape: v.shape });
      assertMatches(await arr(r[0]), await arr(r[1]), tolerance("op"), `y, cut at ${cut}`);
      assertMatches(await arr(r[2]), await arr(r[3]), tolerance("op"), `states, cut at ${cut}`);
      dispose(r);
    }
    const h0 = randn([c.B, c.ED, c.N + 1]);
    const a = scanArgs(t, c.R, c.N, 0, c.L);
    assert.throws(
      () => selectiveScan(a.x, a.delta, a.A, a.Bm, a.C, t.D, mode, h0),
      /selectiveScan: h0 must be f32 \(2, 6, 4\) \(B, ED, N\), got f32 \[2, 6, 5\]/,
    );
    dispose([t, a, h0]);
  });
}

// Training from a carried state: the fused op from h0 and its gradients (h0 a constant), every forward plan
// with its backward, the chunk states kept or worked out again in the backward.
for (const plan of PLANS) {
  for (const saving of plan === "in order" ? ["keep"] as const : ["keep", "recompute"] as const) {
    Deno.test({
      name:
        `fusedMambaScanFrom (${plan}, states ${saving}): y and every gradient from h0 as the sequential scan's`,
      ignore: noFused,
      fn: async () => {
        // 150 steps in chunks of 8 (19 chunks; in order: the variant's chunks)
        const c = { B: 2, L: 150, ED: 12, N: 16, R: 2, gated: true, dtWeight: true, h0: true };
        emptyPool();
        setFusedStateSaving(saving);
        try {
          await withPlan(plan, c.N, () => compare(c, 41));
        } finally {
          setFusedStateSaving(null);
        }
      },
    });
  }
}

Deno.test({
  name: "fusedMambaScanFrom from h0: several state blocks (N 40), dt_proj outside (R 20), z a window, L 1",
  ignore: noFused,
  fn: async () => {
    const base = { B: 2, ED: 12, gated: true, dtWeight: true, h0: true };
    await compare({ ...base, L: 70, N: 40, R: 2 }, 42);
    await compare({ ...base, L: 70, N: 16, R: 20 }, 43);
    await compare({ ...base, L: 33, N: 4, R: 2, zWindow: { width: 30, start: 12 } }, 44);
    await compare({ ...base, L: 1, N: 16, R: 2 }, 45);
  },
});

Deno.test({
  name:
    "fusedMambaScanOut from h0: y and every gradient, also where the backward runs the forward again for y",
  ignore: noFused,
  fn: async () => {
    const base = { B: 2, gated: true, dtWeight: true, h0: true } as const;
    await compare({ ...base, L: 70, ED: 16, N: 16, R: 2, outProj: "residual" }, 48);
    await compare({ ...base, L: 37, ED: 12, N: 4, R: 9, outProj: "bias" }, 49);
    // two state blocks, dt_proj outside and 10 bindings (Chrome's): no binding for y, so the backward runs the
    // forward kernel again, which must start from h0 too
    const limits = deviceInfo().limits;
    const real = limits.maxStorageBuffersPerShaderStage;
    limits.maxStorageBuffersPerShaderStage = 10;
    try {
      const c = { ...base, B: 1, L: 40, ED: 16, N: 32, R: 9, outProj: "residual" } as const;
      const { kernels } = await kernelsRun(() => compare(c, 50));
      assert.ok(!kernels.some((k) => /^fused_scan_bwd_.*_y(_g)?$/.test(k)), `${kernels}`);
    } finally {
      limits.maxStorageBuffersPerShaderStage = real;
    }
    // the state after the last step comes back where asked for
    const c = { B: 2, L: 30, ED: 8, N: 4, R: 2, gated: true, dtWeight: true, outProj: "plain" } as const;
    const t = inputs(c, 51);
    const box: { h: Tensor | null } = { h: null };
    const out = noGrad(() =>
      fusedMambaScanOut(t.x, t.dBC, t.W, t.bias, t.A_log, t.D, t.z, undefined, t.Wout, null, undefined, {
        h0: t.h0,
        stateInto: box,
      })
    );
    const a = scanArgs(t, c.R, c.N, 0, c.L);
    const want = selectiveScan(a.x, a.delta, a.A, a.Bm, a.C, t.D, "sequential", t.h0);
    const last = narrow(want.hs, 1, c.L - 1, 1).reshape(c.B, c.ED, c.N); // last: (B, ED, N)
    assertMatches(await shaped(box.h!), await shaped(last), tolerance("op"), "the state after the last step");
    dispose([t, out, box.h, a, want, last]);
  },
});

Deno.test({
  name: "fusedMambaScanFrom: its last state is the sequential scan's; an h0 that requires grad is refused",
  ignore: noFused,
  fn: async () => {
    const c = { B: 2, L: 75, ED: 12, N: 16, R: 2, gated: true };
    const t = inputs(c, 46);
    const h0 = randn([c.B, c.ED, c.N], { seed: 47 });
    const { y, h } = fusedMambaScanFrom(t.x, t.dBC, t.W, t.bias, t.A_log, t.D, t.z, undefined, h0);
    const a = scanArgs(t, c.R, c.N, 0, c.L);
    const want = selectiveScan(a.x, a.delta, a.A, a.Bm, a.C, t.D, "sequential", h0);
    const last = narrow(want.hs, 1, c.L - 1, 1).reshape(c.B, c.ED, c.N); // last: (B, ED, N)
    assertMatches(await shaped(h), await shaped(last), tolerance("op"), "the state after the last step");
    h0.requiresGrad_(true);
    assert.throws(
      () => fusedMambaScanFrom(t.x, t.dBC, t.W, t.bias, t.A_log, t.D, t.z, undefined, h0),
      /fusedMambaScanFrom: h0 requires grad, but no gradient flows into the initial state/,
    );
    const wrong = randn([c.B, c.ED, c.N + 1]);
    assert.throws(
      () => fusedMambaScanFrom(t.x, t.dBC, t.W, t.bias, t.A_log, t.D, t.z, undefined, wrong),
      /fusedMambaScanFrom: h0 must be f32 \(2, 12, 16\) \(B, ED, N\), got f32 \[2, 12, 17\]/,
    );
    dispose([t, h0, y, h, a, want, last, wrong]);
  },
});

/** The char model (trained in PyTorch: its state carries what it read) in a scan mode. */
function charModel(
  scan: "fused" | "pscan" | "sequential",
  recompute: boolean | "input" = true,
): ReturnType<typeof fromPretrained> {
  return fromPretrained(fixturePath("char-mamba"), { scan, recompute });
}

/** Seeded ids of the char model's vocabulary. */
function someIds(n: number, vocab: number, seed = 7): number[] {
  let s = seed;
  return Array.from({ length: n }, () => (s = (s * 1103515245 + 12345) % 2147483648) % vocab);
}

/** Every position's logits and the caches, running `ids` (B rows) in chunks of the given lengths, each from the
 * caches of the chunks before; the caches in between are freed. */
function chunked(lm: MambaLM, ids: number[][], lengths: number[]) {
  const logits: Tensor[] = [];
  let caches: LayerCache[] | null = null;
  let at = 0;
  for (const n of lengths) {
    const r = lm.prefill(ids.map((row) => row.slice(at, at + n)), caches, { logits: "all" });
    dispose(caches);
    caches = r.caches;
    logits.push(r.logits);
    at += n;
  }
  const all = cat(logits, 1); // all: (B, L, vocab)
  dispose(logits);
  return { logits: all, caches: caches! };
}

const shaped = async (v: Tensor) => ({ data: await v.toArray(), shape: v.shape });

/** Asserts that two runs' logits and caches agree within the model bound. */
async function assertSameRun(
  got: { logits: Tensor; caches: LayerCache[] },
  want: { logits: Tensor; caches: LayerCache[] },
  what: string,
) {
  const bound = tolerance("model");
  assertMatches(await shaped(got.logits), await shaped(want.logits), bound, `${what}: logits`);
  for (const [l, c] of got.caches.entries()) {
    assertMatches(await shaped(c.h), await shaped(want.caches[l].h), bound, `${what}: layer ${l}'s h`);
    assertMatches(
      await shaped(c.inputs),
      await shaped(want.caches[l].inputs),
      bound,
      `${what}: layer ${l}'s inputs`,
    );
  }
}

/** Training from a carried state with the char model in a scan mode: the first 50 ids of each row prefilled,
 * then forwardFrom over the next 40 under autograd, and the backward of their next-id loss. Gives the logits,
 * the caches after, and every parameter's gradient (read back); `carry` false runs the 40 from the start. */
async function windowAfter(
  scan: "fused" | "pscan" | "sequential",
  ids: number[][],
  carry = true,
  recompute: boolean | "input" = true,
) {
  const lm = await charModel(scan, recompute);
  try {
    const first = lm.prefill(ids.map((r) => r.slice(0, 50)));
    const r = tidy(() => {
      const out = lm.forwardFrom(ids.map((r) => r.slice(50, 90)), carry ? first.caches : null);
      const logits = narrow(out.logits, 1, 0, 39); // logits: (B, 39, vocab)
      const targets = tensor(new Int32Array(ids.flatMap((r) => r.slice(51, 90))), [ids.length, 39], {
        dtype: "i32",
      });
      crossEntropy(logits, targets).backward();
      return out;
    });
    const grads = new Map<string, { data: Float32Array | Int32Array; shape: readonly number[] }>();
    for (const [name, p] of lm.namedParameters()) grads.set(name, await shaped(p.grad!));
    const got = {
      logits: await shaped(r.logits),
      caches: await Promise.all(
        r.caches.map(async (c) => ({ h: await shaped(c.h), inputs: await shaped(c.inputs) })),
      ),
    };
    dispose([first, r]);
    return { ...got, grads, requiresGrad: r.logits.requiresGrad };
  } finally {
    lm.dispose();
  }
}

Deno.test({
  name: "MambaLM.forwardFrom: a window from the carried state, with gradients, in every scan mode alike",
  ignore: noFused,
  fn: async () => {
    const lm = await charModel("sequential");
    const ids = [someIds(90, lm.vocabSize, 3), someIds(90, lm.vocabSize, 4)];
    // the whole 90 in one forward: the window's logits and the caches after it
    const whole = lm.prefill(ids, null, { logits: "all" });
    const tail = narrow(whole.logits, 1, 50, 40);
    const want = {
      logits: await shaped(tail),
      caches: await Promise.all(
        whole.caches.map(async (c) => ({ h: await shaped(c.h), inputs: await shaped(c.inputs) })),
      ),
    };
    dispose([whole, tail]);
    lm.dispose();
    const bound = tolerance("model");
    const runs = {
      sequential: await windowAfter("sequential", ids),
      pscan: await windowAfter("pscan", ids),
      fused: await windowAfter("fused", ids),
    };
    for (const [scan, r] of Object.entries(runs)) {
      assert.ok(r.requiresGrad, `${scan}: the logits have autograd`);
      assertMatches(r.logits, want.logits, bound, `${scan}: the window's logits`);
      r.caches.forEach((c, l) => {
        assertMatches(c.h, want.caches[l].h, bound, `${scan}: layer ${l}'s h after the window`);
        assertMatches(c.inputs, want.caches[l].inputs, bound, `${scan}: layer ${l}'s conv inputs`);
      });
      // the gradients of truncated backpropagation: the fused kernels' against autograd through the
      // sequential scan from h0 (selectiveScan's), and pscan's
      for (const [name, g] of runs.sequential.grads) {
        assertMatches(r.grads.get(name)!, g, bound, `${scan}: the gradient of ${name}`);
      }
    }
    // the blocks' recompute (a checkpoint around each, its cache the first pass's) changes nothing
    for (const recompute of [false, "input"] as const) {
      const r = await windowAfter("fused", ids, true, recompute);
      assertMatches(r.logits, runs.fused.logits, bound, `recompute ${recompute}: logits`);
      r.caches.forEach((c, l) =>
        assertMatches(c.h, runs.fused.caches[l].h, bound, `recompute ${recompute}: h`)
      );
      for (const [name, g] of runs.fused.grads) {
        assertMatches(r.grads.get(name)!, g, bound, `recompute ${recompute}: the gradient of ${name}`);
      }
    }
    // the carried state changes the gradients (the char model's first few positions of the window)
    const fresh = await windowAfter("fused", ids, false);
    const moved = [...fresh.grads].some(([name, g]) => {
      const c = runs.fused.grads.get(name)!.data;
      const scale = Math.max(1, ...[...c].map(Math.abs));
      return [...g.data].some((v, i) => Math.abs(v - c[i]) > 100 * bound.rtol * scale);
    });
    assert.ok(moved, "the gradients from the carried state equal those from the start");
  },
});

// chunks shorter than the conv's window (dConv - 1 = 3), one of a single token, and longer ones
const LENGTHS = [1, 2, 3, 37, 64, 43];

for (const scan of ["fused", "pscan", "sequential"] as const) {
  Deno.test({
    name:
      `MambaLM.prefill (${scan}): a text in chunks, each from the caches before, gives one forward's logits and caches`,
    ignore: scan === "fused" && noFused,
    fn: async () => {
      const lm = await charModel(scan);
      const L = LENGTHS.reduce((a, b) => a + b, 0);
      const ids = [someIds(L, lm.vocabSize, 1), someIds(L, lm.vocabSize, 2)];
      try {
        const whole = lm.prefill(ids, null, { logits: "all" });
        // the whole forward's logits are forward()'s (no cache path)
        const plain = tidy(() => noGrad(() => lm.forward(ids)));
        assertMatches(
          await shaped(whole.logits),
          await shaped(plain),
          tolerance("model"),
          "prefill against forward",
        );
        const parts = chunked(lm, ids, LENGTHS);
        await assertSameRun(parts, whole, `chunks ${LENGTHS}`);
        // the last position's logits alone (the default)
        const last = lm.prefill(ids.map((r) => r.slice(0, 6)), null);
        assert.deepEqual(last.logits.shape, [2, lm.vocabSize]);
        const six = lm.prefill(ids.map((r) => r.slice(0, 6)), null, { logits: "all" });
        const want = narrow(six.logits, 1, 5, 1).reshape(2, lm.vocabSize);
        assertMatches(await shaped(last.logits), await shaped(want), tolerance("model"), "the last position");
        dispose([whole, plain, parts, last, six, want]);
      } finally {
        lm.dispose();
      }
    },
  });
}

for (const plan of PLANS) {
  Deno.test({
    name: `MambaLM.prefill, fused forward ${plan}: a text in chunks gives one forward's logits and caches`,
    ignore: noFused,
    fn: async () => {
      const lm = await charModel("fused");
      const lengths = [5, 70, 61]; // chunks of 8 (walks of 24) on both sides of the cuts
      const L = lengths.reduce((a, b) => a + b, 0);
      const ids = [someIds(L, lm.vocabSize, 3)];
      try {
        await withPlan(plan, lm.config.dState, async () => {
          const whole = lm.prefill(ids, null, { logits: "all" });
          const parts = chunked(lm, ids, lengths);
          await assertSameRun(parts, whole, plan);
          dispose([whole, parts]);
        });
      } finally {
        lm.dispose();
      }
    },
  });
}

Deno.test({
  name: "MambaLM.prefill goes on from step's caches, and step from prefill's: one forward's logits",
  ignore: noFused,
  fn: async () => {
    const lm = await charModel("fused");
    const ids = [someIds(30, lm.vocabSize, 4)];
    try {
      const whole = lm.prefill(ids, null, { logits: "all" });
      const a = lm.prefill([ids[0].slice(0, 10)], null, { logits: "all" });
      const id = tensor(new Int32Array([ids[0][10]]), [1], { dtype: "i32" });
      const s = tidy(() => noGrad(() => lm.step(id, a.caches))); // s.logits: (1, vocab)
      const b = lm.prefill([ids[0].slice(11)], s.caches, { logits: "all" });
      const logits = cat([a.logits, s.logits.reshape(1, 1, lm.vocabSize), b.logits], 1);
      await assertSameRun({ logits, caches: b.caches }, whole, "prefill, step, prefill");
      dispose([whole, a, id, s, b, logits]);
    } finally {
      lm.dispose();
    }
  },
});

Deno.test("MambaLM.prefill and Mamba.forwardWithCache name what is wrong with the caches they are given", async () => {
  const lm = await charModel("fused");
  try {
    const a = lm.prefill([[1, 2, 3], [4, 5, 6]], null);
    assert.throws(
      () => lm.prefill([[1, 2]], a.caches),
      /Mamba.forwardWithCache: the cache of layer 0 has h \[2, 128, 16\] .*input \[1, 2, 64\] needs h \[1, 128, 16\] \(B, ED, N\)/,
    );
    assert.throws(
      () => lm.prefill([[1, 2], [3, 4]], a.caches.slice(1)),
      /Mamba.forwardWithCache: 1 caches for 2 layers/,
    );
    assert.throws(
      () => lm.prefill([[1, 2], [3, 4]], a.caches[0] as unknown as LayerCache[]),
      /Mamba.forwardWithCache: object given where an array of 2 caches \(one per layer\) is needed/,
    );
    assert.throws(
      () => lm.prefill([[1, 2], [3, 4]], [a.caches[0], null] as unknown as LayerCache[]),
      /Mamba.forwardWithCache: the cache of layer 1 is null, not a cache \{h, inputs\}/,
    );
    await assert.rejects(
      () => lm.generate([[1, 2], [3, 4]], 2, { from: [a.caches[0], undefined] as unknown as LayerCache[] }),
      /generate: from: the cache of layer 1 is undefined, not a cache \{h, inputs\}/,
    );
    assert.throws(
      () => lm.prefill([[1, 2], [3, 4]], a.caches, { logits: "first" as "all" }),
      /MambaLM.prefill: logits must be "last" or "all", got "first"/,
    );
    // a misspelt option is an error, not the last position's logits
    assert.throws(
      () => lm.prefill([[1, 2], [3, 4]], a.caches, { logit: "all" } as PrefillOptions),
      /MambaLM.prefill: unknown option 'logit' \(options are logits\)/,
    );
    assert.throws(
      () => lm.prefill([[1, 2], [3, 4]], a.caches, null as unknown as PrefillOptions),
      /MambaLM.prefill: options must be an object, got null/,
    );
    const x = randn([2, 2, 64]);
    // with gradients on, a cache that requires grad is refused (no gradient flows into a carried state)
    // rather than cut silently, before any layer runs (nothing would free what it made)
    const live = memory().liveBytes;
    const wants = { h: a.caches[1].h, inputs: a.caches[1].inputs.detach().requiresGrad_(true) };
    assert.throws(
      () => lm.mamba.forwardWithCache(x, false, [a.caches[0], wants]),
      /Mamba.forwardWithCache: the cache of layer 1 requires grad, but no gradient flows into a carried state/,
    );
    assert.equal(memory().liveBytes, live, "bytes left behind by the refused forward");
    wants.inputs.dispose();
    a.caches[1].h.dispose();
    assert.throws(() => lm.prefill([[1, 2], [3, 4]], a.caches), /the cache of layer 1 has h disposed/);
    dispose([a, x]);
  } finally {
    lm.dispose();
  }
});

Deno.test({
  name: "perplexity with carryState: windows of 32 score the text as one window over all of it",
  ignore: noFused,
  fn: async () => {
    const lm = await charModel("fused");
    const ids = someIds(150, lm.vocabSize, 5);
    try {
      const one = await perplexity(lm, ids, { seq: 1024 });
      const carried = await perplexity(lm, ids, { seq: 32, carryState: true });
      const cut = await perplexity(lm, ids, { seq: 32 });
      assert.equal(carried.tokens, 149);
      assert.equal(carried.windows, 5);
      // the model bound on a sum of 149 log-likelihoods; without the state the windows score differently
      assert.ok(Math.abs(carried.nll - one.nll) <= 1e-4 * one.nll, `${carried.nll} vs ${one.nll}`);
      assert.ok(Math.abs(cut.nll - one.nll) > 1e-3 * one.nll, `${cut.nll} vs ${one.nll}`);
      await assert.rejects(
        () => perplexity(lm, ids, { seq: 32, batch: 2, carryState: true }),
        /perplexity: carryState runs the windows one after another: batch must be 1, got 2/,
      );
      await assert.rejects(
        () => perplexity(lm, ids, { carryState: "yes" as unknown as boolean }),
        /perplexity: carryState must be true or false, got "yes"/,
      );
    } finally {
      lm.dispose();
    }
  },
});

Deno.test({
  name: "generate from caches: a conversation goes on as if run whole, prompt rows of different lengths too",
  ignore: noFused,
  fn: async () => {
    const lm = await charModel("fused");
    const tok = lm.tokenizer!;
    // the conversation so far (three rows), then each row's next message (two lengths): text the model knows,
    // so that what came before changes what it says next
    const text =
      "It is a truth universally acknowledged, that a single man in possession of a good fortune, " +
      "must be in want of a wife.";
    const before = [text.slice(0, 60), text.slice(10, 70), text.slice(20, 80)].map((t) => tok.encode(t));
    // (short: the char model's state forgets in about 20 characters)
    // rows 0 and 2 one group, row 1 another
    const prompt = [text.slice(60, 62), text.slice(70, 71), text.slice(80, 82)].map((t) => tok.encode(t));
    const sampled = { sample: true, seed: 3, temperature: 0.8 };
    try {
      const state = lm.prefill(before, null);
      for (const prefillChunk of [Infinity, 3]) {
        const got = await lm.generate(prompt, 40, { from: state.caches, prefillChunk });
        // each row alone, run whole: its earlier tokens, then its message
        for (let b = 0; b < 3; b++) {
          const [want] = await lm.generate([[...before[b], ...prompt[b]]], 40);
          assert.deepEqual(got[b], want, `row ${b}, prefillChunk ${prefillChunk}`);
        }
      }
      // sampled: the same noise for the same row and step, so the same tokens where the logits agree
      const got = await lm.generate(prompt, 40, { ...sampled, from: state.caches });
      const want = await lm.generate(before.map((r, b) => [...r, ...prompt[b]]), 40, sampled);
      assert.deepEqual(got, want, "sampled");
      // without the conversation before, the model says something else
      assert.notDeepEqual(await lm.generate(prompt, 40, sampled), want);
      // the caches given stay alive and unchanged: the same call again gives the same tokens
      const again = await lm.generate(prompt, 20, { from: state.caches });
      assert.deepEqual(again, await lm.generate(prompt, 20, { from: state.caches }));
      await assert.rejects(
        () => lm.generate([prompt[0]], 2, { from: state.caches }),
        /generate: from: the cache of layer 0 has h \[3, 128, 16\] .*a prompt of 1 rows needs h \[1, 128, 16\]/,
      );
      await assert.rejects(
        () => lm.generate(prompt, 2, { from: state.caches.slice(1) }),
        /generate: from must be one cache per layer \(2\), got 1/,
      );
      dispose(state);
    } finally {
      lm.dispose();
    }
  },
});
