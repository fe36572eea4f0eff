import assert from "node:assert/strict";
import { cat, silu, split, sum } from "../core/ops/index.ts";
import { dispose, keep, Tensor, tidy } from "../core/tensor.ts";
import { noGrad } from "../core/autograd.ts";
import { init } from "../core/device.ts";
import { memory, resetPeak } from "../core/memory.ts";
import { randn, tensor } from "../core/creation.ts";
import { manualSeed } from "../core/random.ts";
import { mambaConfig } from "../mamba/config.ts";
import { Mamba, MambaBlock, ResidualBlock } from "../mamba/block.ts";
import type { ScanMode } from "../scan/linear_scan.ts";
import type { DecodedTensor } from "../core/safetensors.ts";
import {
  assertMatches,
  assertMatchesFixture,
  fixtureConfig,
  loadFixture,
  type Shaped,
  tolerance,
  toTensor,
} from "./fixture_util.ts";
import {
  assertClose,
  assertFusedRan,
  assertFusedStepRan,
  fusedUnavailable,
  kernelsRun,
  withPlans,
} from "./helpers.ts";

await init();
/** The fused tests are ignored where the fused kernels cannot run (the block would run pscan instead). */
const noFused = fusedUnavailable();

/** Runs `fn` with the scan variant in use at d_state 16 applied to every call, and restores the choices after
 * (the variant, or the default where none was chosen, and the tuner's variants by problem), even on a throw:
 * the default variant depends on the adapter's kind, which some tests change. */
async function withScanVariantFixed<T>(fn: () => Promise<T>): Promise<T> {
  const {
    defaultFusedVariant,
    fusedVariant,
    fusedVariantsByProblem,
    setFusedVariant,
    setFusedVariantsByProblem,
  } = await import("../scan/fused_variant.ts");
  const variant = fusedVariant(16);
  const tuned = JSON.stringify(variant) !== JSON.stringify(defaultFusedVariant(16));
  const byProblem = fusedVariantsByProblem(16);
  try {
    setFusedVariant(16, variant);
    return await fn();
  } finally {
    setFusedVariant(16, tuned ? variant : null);
    setFusedVariantsByProblem(16, byProblem);
  }
}

/** Asserts that the scan of `mode` ran among `kernels` (and no other scan). */
function assertScanRan(
  kernels: readonly string[],
  mode: ScanMode | "fused",
  what: string,
  backward: boolean,
) {
  if (mode === "fused") return assertFusedRan(kernels, what, backward);
  const mine = mode === "pscan"
    ? (k: string) => k.startsWith("pscan_")
    : (k: string) => k === "scan_sequential";
  assert.ok(kernels.some(mine), `${what}: no ${mode} kernel ran`);
  const other = kernels.find((k) => !mine(k) && (/^(pscan_|fused_scan_)/.test(k) || k === "scan_sequential"));
  assert.equal(other, undefined, `${what}: ${other} ran in ${mode} mode`);
}

// Every output, the loss and every gradient against mamba.py, within the policy's whole-model bound
// (fixture_util.ts: 1e-5 relative to the tensor's max on a software adapter, 1e-4 on a GPU).
for (const name of ["mamba_L37", "mamba_dstate4", "mamba_tiny"]) {
  for (
    const [scan, recompute] of [
      ["pscan", false],
      ["sequential", false],
      ["fused", false],
      ["fused", true],
      ["fused", "input"],
    ] as const
  ) {
    const how = recompute === "input" ? "+recompute(input)" : recompute ? "+recompute" : "";
    const what = `${name} ${scan}${how}`;
    Deno.test({
      name: `Mamba ${scan}${how}: forward, loss and every gradient equal mamba.py (${name})`,
      ignore: scan === "fused" && noFused,
      fn: async () => {
        const file = `${name}.safetensors`;
        const f = await loadFixture(file);
        const model = new Mamba(await fixtureConfig(file, { scan, recompute }));
        model.loadStateDict(new Map([...f].filter(([k]) => k.startsWith("layers."))));
        const x = toTensor(f, "x", true);
        const G = toTensor(f, "G");
        const { value: [y, loss], kernels } = await kernelsRun(() =>
          tidy(() => {
            const y = model.forward(x);
            const loss = sum(y.mul(G));
            loss.backward();
            return [keep(y), keep(loss)];
          })
        );
        assertScanRan(kernels, scan, what, true);
        const bound = tolerance("model");
        await assertMatchesFixture(y, f, "y", bound, `${what}: y`);
        const l = { data: await loss.toArray(), shape: [1] }; // the fixture stores scalars as [1]
        await assertMatchesFixture(l, f, "loss", bound, `${what}: loss`);
        await assertMatchesFixture(x.grad!, f, "grad.x", bound, `${what}: grad.x`);
        const params = model.namedParameters();
        for (const [k, p] of params) {
          await assertMatchesFixture(p.grad!, f, `grad.${k}`, bound, `${what}: grad.${k}`);
        }
        const grads = [...f.keys()].filter((k) => k.startsWith("grad."));
        assert.equal(grads.length, params.length + 1, "every gradient of the fixture was compared");
        model.dispose();
        for (const t of [x, x.grad!, G, y, loss]) t.dispose();
      },
    });
  }
}

// A GPU's short chunks at large N: the ops save the parameters alone and the backward works the chunk states
// out again (phForBackward), through a recomputing block's rerun too, which replays the scan op from what its
// first pass kept. Still mamba.py's numbers, with fewer bytes saved.
Deno.test({
  name:
    "Mamba fused+recompute, chunk states worked out again in the backward: every gradient equals mamba.py",
  ignore: noFused,
  fn: async () => {
    const { setFusedVariant } = await import("../scan/fused_variant.ts");
    const { setFusedStateSaving } = await import("../scan/fused_run.ts");
    const file = "mamba_L37.safetensors";
    const f = await loadFixture(file);
    const saved: number[] = [];
    for (const recompute of [true, false, "input"] as const) {
      for (const mode of ["keep", "recompute"] as const) {
        const config = await fixtureConfig(file, { scan: "fused", recompute });
        const what = `mamba_L37 fused, recompute ${recompute}, chunk states: ${mode}`;
        setFusedVariant(config.dState, { WG: 8, Lc: 4, chunkParallel: true }); // 10 chunks at L 37
        setFusedStateSaving(mode);
        const model = new Mamba(config);
        try {
          model.loadStateDict(new Map([...f].filter(([k]) => k.startsWith("layers."))));
          const x = toTensor(f, "x", true);
          const G = toTensor(f, "G");
          const { kernels } = await kernelsRun(() =>
            tidy(() => {
              const before = memory().savedBytes;
              const y = model.forward(x);
              saved.push(memory().savedBytes - before);
              sum(y.mul(G)).backward();
            })
          );
          // the states again: a local pass and a chain per layer in the backward besides the forward's; with
          // recompute "input" the rerun's forward runs them anyway, right before its backward, which then
          // takes them as they are (savesForLater: false there)
          const layers = config.nLayers;
          const passes = recompute === "input" ? 2 : mode === "recompute" ? 2 : 1;
          const locals = kernels.filter((k) => k.startsWith("fused_scan_local_fwd")).length;
          assert.equal(locals, layers * passes, `${what}: ${locals} local passes`);
          const bound = tolerance("model");
          await assertMatchesFixture(x.grad!, f, "grad.x", bound, `${what}: grad.x`);
          for (const [k, p] of model.namedParameters()) {
            await assertMatchesFixture(p.grad!, f, `grad.${k}`, bound, `${what}: grad.${k}`);
          }
          for (const t of [x, x.grad!, G]) t.dispose();
        } finally {
          model.dispose();
          setFusedVariant(config.dState, null);
          setFusedStateSaving(null);
        }
      }
    }
    // fewer bytes kept for the backward without the chunk states, with recompute and without; the block
    // input alone either way with recompute "input"
    assert.ok(saved[1] < saved[0] && saved[3] < saved[2] && saved[5] === saved[4], `saved bytes ${saved}`);
  },
});

/** `t[..., start:start+length]` of a fixture tensor along `dim`, on the host. */
function narrowHost(t: DecodedTensor, dim: number, start: number, length: number): Shaped {
  const shape = t.shape.map((s, i) => (i === dim ? length : s));
  const inner = t.shape.slice(dim + 1).reduce((a, b) => a * b, 1);
  const outer = t.shape.slice(0, dim).reduce((a, b) => a * b, 1);
  const data = new Float32Array(outer * length * inner);
  for (let o = 0; o < outer; o++) {
    const from = (o * t.shape[dim] + start) * inner;
    data.set(t.data.subarray(from, from + length * inner), o * length * inner);
  }
  return { data, shape };
}

// mamba.py's activations of mamba_tiny's forward, stage by stage, in the order of the data flow. Each stage
// gets the previous stage's fixture value as input, so the first failure names the stage that is wrong.
// Single ops (norm, in_proj, the conv, x_proj) are held to the op bound, the rest to the whole-model bound.
// The fused path has no stages to read (one kernel from the conv's output to the gated y), so pscan and
// sequential. (deltaA and BX, inside selectiveScan, are not exposed; they were removed from this copy of
// the fixture, see fixtures/README.md.)
for (const scan of ["pscan", "sequential"] as const) {
  Deno.test(`Mamba ${scan}: each stage of the forward equals mamba.py's activations (mamba_tiny act.*)`, async () => {
    const file = "mamba_tiny.safetensors";
    const f = await loadFixture(file);
    const config = await fixtureConfig(file, { scan });
    const model = new Mamba(config);
    model.loadStateDict(new Map([...f].filter(([k]) => k.startsWith("layers."))));
    const { dInner: ED, dConv: K } = config;
    const [B, L] = f.get("x")!.shape;
    const act = (k: string) => toTensor(f, `act.${k}`);
    const [op, whole] = [tolerance("op"), tolerance("model")];
    const checked = new Set<string>();
    const check = async (t: Tensor | Shaped, key: string, bound: typeof op) => {
      checked.add(key);
      await assertMatchesFixture(t, f, key, bound, `${scan}: ${key}`);
      if (t instanceof Tensor) t.dispose();
    };
    const run = <T>(fn: () => T) => tidy(() => noGrad(fn));
    for (const [i, layer] of model.layers.items.entries()) {
      const x = i === 0 ? toTensor(f, "x") : act(`layers.${i - 1}.out`); // (B, L, D)
      const norm = act(`layers.${i}.norm`);
      await check(run(() => layer.norm.forward(x)), `act.layers.${i}.norm`, op);
      const m = layer.mixer;
      if (i === 0) {
        // inside the mixer: in_proj, the conv before silu, x_proj, the scan's states
        await check(run(() => m.inProj.forward(norm)), "act.layers.0.mixer.in_proj", op); // (B, L, 2ED)
        const xz = act("layers.0.mixer.in_proj");
        // torch's Conv1d pads both ends with K-1: its first L steps are the causal conv, the rest is not
        const raw = f.get("act.layers.0.mixer.conv1d_raw")!; // (B, ED, L + K - 1)
        assert.deepEqual(raw.shape, [B, ED, L + K - 1]);
        const conv = run(() => m.conv1d.forward(split(xz, ED, -1)[0]).transpose(1, 2)); // (B, ED, L)
        checked.add("act.layers.0.mixer.conv1d_raw");
        assertMatches(
          { data: await conv.toArray(), shape: conv.shape },
          narrowHost(raw, 2, 0, L),
          op,
          `${scan}: conv1d_raw[..., :L]`,
        );
        conv.dispose();
        const pre = narrowHost(raw, 2, 0, L);
        const xc = run(() => silu(tensor(Float32Array.from(pre.data), pre.shape)).transpose(1, 2)); // (B, L, ED)
        await check(run(() => m.xProj.forward(xc)), "act.layers.0.mixer.x_proj", op); // (B, L, R + 2N)
        await check(run(() => m.ssm(xc).hs), "act.layers.0.mixer.hs", whole); // (B, L, ED, N)
        for (const t of [xz, xc]) t.dispose();
      }
      await check(run(() => m.forward(norm).out), `act.layers.${i}.mixer.out`, whole);
      await check(run(() => layer.forward(x).out), `act.layers.${i}.out`, whole);
      for (const t of [x, norm]) t.dispose();
    }
    const unread = [...f.keys()].filter((k) => k.startsWith("act.") && !checked.has(k));
    assert.deepEqual(unread, [], "every act.* tensor is compared");
    model.dispose();
  });
}

// mamba.py's step fixture: outputs and final caches of a token-by-token run, and the caches the parallel
// prefill leaves (forwardWithCache), in every scan mode.
for (const scan of ["fused", "pscan", "sequential"] as const) {
  const how = scan === "fused" ? "fused step kernels" : `mamba.py's readable step, ${scan} prefill`;
  Deno.test({
    name: `Mamba.step (${how}) outputs and final caches equal mamba.py's step fixture and the full forward`,
    ignore: scan === "fused" && noFused,
    fn: async () => {
      const file = "step_tiny.safetensors";
      const f = await loadFixture(file);
      const model = new Mamba(await fixtureConfig(file, { scan }));
      model.loadStateDict(new Map([...f].filter(([k]) => k.startsWith("layers."))), { strict: true });
      const x = toTensor(f, "x"); // x: (B, L, D)
      const [B, L, D] = x.shape;
      const stepped = await kernelsRun(() =>
        tidy(() =>
          noGrad(() => {
            let caches = model.emptyCache(B);
            const ys = [];
            for (let t = 0; t < L; t++) {
              const r = model.step(x.narrow(1, t, 1).reshape(B, D), caches);
              caches = r.caches;
              ys.push(r.out.reshape(B, 1, D));
            }
            return { yStep: cat(ys, 1), caches };
          })
        )
      );
      const prefill = await kernelsRun(() => tidy(() => noGrad(() => model.forwardWithCache(x, true))));
      if (scan === "fused") {
        assertFusedStepRan(stepped.kernels, "step");
        assertFusedRan(prefill.kernels, "forwardWithCache");
      } else {
        assert.ok(!stepped.kernels.some((k) => k.startsWith("conv_step")), "the readable step ran");
        assertScanRan(prefill.kernels, scan, "forwardWithCache", false);
      }
      const { yStep, caches } = stepped.value;
      const full = prefill.value;
      const pairs: [string, Tensor, string][] = [["step", yStep, "y_step"], [
        "forward",
        full.out,
        "y_forward",
      ]];
      caches.forEach((c, i) => {
        pairs.push([`step cache ${i} h`, c.h, `cache.${i}.h`]);
        pairs.push([`step cache ${i} inputs`, c.inputs, `cache.${i}.inputs`]);
        pairs.push([`forward cache ${i} h`, full.caches[i].h, `cache.${i}.h`]);
        pairs.push([`forward cache ${i} inputs`, full.caches[i].inputs, `cache.${i}.inputs`]);
      });
      for (const [what, t, key] of pairs) {
        await assertMatchesFixture(t, f, key, tolerance("model"), `${scan} ${what}`);
      }
      model.dispose();
    },
  });
}

Deno.test({
  name:
    "the fused step kernels equal mamba.py's readable step: dt_proj inside, unrolled (R <= 8) and as a loop (R 12), conv with and without bias, dConv 2 and 4, batch 3",
  ignore: noFused,
  fn: async () => {
    for (
      const [dtRank, convBias, dConv, dState] of [[2, true, 4, 16], [12, false, 2, 4], [
        8,
        true,
        3,
        5,
      ]] as const
    ) {
      const config = { dModel: 24, nLayers: 2, dtRank, convBias, dConv, dState };
      const fused = new Mamba(mambaConfig({ ...config, scan: "fused" }));
      const readable = new Mamba(mambaConfig({ ...config, scan: "pscan" }));
      readable.loadStateDict(fused.stateDict(), { strict: true });
      const B = 3;
      const xs = randn([B, 5, 24], { seed: dtRank });
      const what = `R ${dtRank}, conv bias ${convBias}, dConv ${dConv}, N ${dState}`;
      const runs = [];
      for (const m of [fused, readable]) {
        runs.push(
          await kernelsRun(() =>
            tidy(() =>
              noGrad(() => {
                let caches = m.emptyCache(B);
                const ys: Tensor[] = [];
                for (let t = 0; t < 5; t++) {
                  const r = m.step(xs.narrow(1, t, 1).reshape(B, 24), caches);
                  caches = r.caches;
                  ys.push(r.out);
                }
                return [...ys, ...caches.flatMap((c) => [c.h, c.inputs])].map((t) => keep(t));
              })
            )
          ),
        );
      }
      assertFusedStepRan(runs[0].kernels, `${what}: fused`);
      // dt_proj's product inside the SSM step at every rank (unrolled up to 8): no matmul for it
      const ssm = `ssm_step_N${dState}_dt${dtRank <= 8 ? dtRank : "loop"}`;
      assert.ok(runs[0].kernels.includes(ssm), `${what}: ${ssm} ran (${runs[0].kernels.join(", ")})`);
      const matmuls = runs[0].kernels.filter((k) => k.startsWith("matmul_")).length;
      assert.equal(matmuls, 3 * 2 * 5, `${what}: in_proj, x_proj and out_proj per layer and token`);
      assert.ok(!runs[1].kernels.some((k) => k.startsWith("conv_step")), `${what}: the readable step ran`);
      const outs = runs.map((r) => r.value);
      for (let i = 0; i < outs[0].length; i++) {
        // one step's kernels against the same step in autograd ops: the op bound
        const [a, b] = [outs[0][i], outs[1][i]];
        assertMatches(
          { data: await a.toArray(), shape: a.shape },
          { data: await b.toArray(), shape: b.shape },
          tolerance("op"),
          `${what}, output ${i}`,
        );
      }
      for (const t of [...outs.flat(), xs]) t.dispose();
      fused.dispose();
      readable.dispose();
    }
  },
});

Deno.test("Mamba rejects bad input and configs with clear errors", async () => {
  const config = mambaConfig({ dModel: 8, nLayers: 1 });
  const model = new Mamba(config);
  const bad = (await import("../core/creation.ts")).zeros([2, 3, 7]);
  assert.throws(() => model.forward(bad), /expected an f32 input \(B, L, 8\), got f32 \[2, 3, 7\]/);
  assert.throws(() => model.step(bad.reshape(6, 7), model.emptyCache(6)), /\(B, 8\)/);
  const caches = model.emptyCache(3);
  const x2 = (await import("../core/creation.ts")).zeros([2, 8]);
  assert.throws(
    () => model.step(x2, caches),
    /cache of layer 0 has h \[3, 16, 16\] and inputs \[3, 16, 3\]; input \[2, 8\] needs h \[2, 16, 16\]/,
  );
  // A cache of another dConv (K-1 = 2 columns for 3) or dState, named with its layer and shapes.
  const two = new Mamba(mambaConfig({ dModel: 8, nLayers: 2 }));
  const others = [{ dConv: 3 }, { dState: 8 }].map((o) =>
    new Mamba(mambaConfig({ dModel: 8, nLayers: 2, ...o }))
  );
  const [short, small] = others.map((m) => m.emptyCache(2));
  const good = two.emptyCache(2);
  assert.throws(
    () => two.step(x2, [good[0], short[1]]),
    /cache of layer 1 has h \[2, 16, 16\] and inputs \[2, 16, 2\]; .*inputs \[2, 16, 3\] \(B, ED, dConv-1\)/,
  );
  assert.throws(
    () => two.step(x2, [small[0], good[1]]),
    /cache of layer 0 has h \[2, 16, 8\] and inputs \[2, 16, 3\]; input \[2, 8\] needs h \[2, 16, 16\] \(B, ED, N\)/,
  );
  // a block's own step checks too (it is exported; a (B, 1, D) input gave a (B, B, D) output in pscan mode)
  for (const scan of ["fused", "pscan"] as const) {
    const block = new MambaBlock(mambaConfig({ dModel: 8, nLayers: 1, scan }));
    const u3 = (await import("../core/creation.ts")).zeros([2, 1, 8]);
    assert.throws(
      () => block.step(u3, good[0]),
      /MambaBlock.step: u must be f32 \(B, 8\), a residual as u; got u f32 \[2, 1, 8\]/,
    );
    assert.throws(
      () => block.step(x2, short[0]),
      /MambaBlock.step: the cache has h \[2, 16, 16\] and inputs \[2, 16, 2\]; u \[2, 8\] needs .* inputs \[2, 16, 3\]/,
    );
    u3.dispose();
    block.dispose();
  }
  for (const c of [...short, ...small, ...good]) (c.h.dispose(), c.inputs.dispose());
  for (const m of [two, ...others]) m.dispose();
  // L = 0 and B = 0 are rejected at the input, with its shape (in every scan mode: the fused one failed on
  // B = 0 inside fusedMambaScanOut, naming its x [0, 3, 16]; pscan returned an empty output).
  const empty = (await import("../core/creation.ts")).zeros([2, 0, 8]);
  assert.throws(() => model.forward(empty), /input \[2, 0, 8\] has no positions \(L = 0\)/);
  empty.dispose();
  const neither = (await import("../core/creation.ts")).zeros([0, 0, 8]); // prefill([])'s: no rows, first
  assert.throws(() => model.forward(neither), /input \[0, 0, 8\] has no rows \(B = 0\)/);
  neither.dispose();
  for (const scan of ["fused", "pscan"] as const) {
    const m = new Mamba(mambaConfig({ dModel: 8, nLayers: 1, scan }));
    const none = (await import("../core/creation.ts")).zeros([0, 3, 8]);
    assert.throws(() => m.forward(none), /Mamba: the input \[0, 3, 8\] has no rows \(B = 0\)/);
    none.dispose();
    m.dispose();
  }
  for (const b of [0, -1, 1.5, NaN]) {
    assert.throws(() => model.emptyCache(b), /emptyCache: batch must be a positive integer, got/);
  }
  assert.throws(
    () => mambaConfig({ dModel: 0, nLayers: 1 }),
    /dModel must be a positive integer below 2\^31, got 0/,
  );
  // sizes past int32 and values past f32's range are named here, not as an allocation or NaN outputs later
  assert.throws(
    () => mambaConfig({ dModel: 1e300, nLayers: 1 }),
    /dModel must be a positive integer below 2\^31/,
  );
  assert.throws(
    () => mambaConfig({ dModel: 4, nLayers: 1, dtScale: 1e39 }),
    /dtScale must be a positive number within f32's range, got 1e\+39/,
  );
  assert.throws(() => mambaConfig({ dModel: 4, nLayers: 1, scan: "fast" as "pscan" }), /scan must be/);
  assert.throws(() => mambaConfig({ dModel: 4, nLayers: 1, dtInit: "x" as "random" }), /dtInit/);
  assert.throws(
    () => mambaConfig({ dModel: 4, nLayers: 1, recompute: "all" as "input" }),
    /recompute must be true, false or "input", got "all"/,
  );
  assert.throws(() => mambaConfig({ dModel: 4, nLayers: 1, foo: 1 } as never), /unknown key 'foo'/);
  model.dispose();
  bad.dispose();
  x2.dispose();
});

Deno.test("a forward without grad keeps one layer's intermediates at a time; under grad a forward's caches have no autograd", () => {
  for (const scan of ["fused", "pscan"] as const) {
    // Peak bytes over the live ones of a noGrad forward of 1 and of 8 layers (the same shapes).
    const peakOf = (n: number) => {
      const m = new Mamba(mambaConfig({ dModel: 16, nLayers: n, dState: 8, scan }));
      const x = randn([1, 512, 16], { seed: 1 });
      const base = memory().liveBytes;
      resetPeak();
      tidy(() => noGrad(() => m.forward(x)));
      const p = memory().peakBytes - base;
      m.dispose();
      x.dispose();
      return p;
    };
    const [one, eight] = [peakOf(1), peakOf(8)];
    // Each layer's intermediates go before the next layer runs: 8 layers peak at one layer's intermediates
    // plus the outputs (measured on lavapipe: fused 0.39 / 0.42 MiB, pscan 3.48 / 3.51 MiB; before, with one
    // tidy around the stack, 8 layers peaked at 3.08 and 26.9 MiB).
    assert.ok(eight < 1.5 * one, `${scan}: 8 layers peak at ${eight} bytes, 1 layer at ${one}`);
  }
  const model = new Mamba(mambaConfig({ dModel: 8, nLayers: 1 }));
  const x = randn([1, 4, 8], { seed: 2, requiresGrad: true });
  // with autograd, the output has it and the caches do not (constants for the next window)
  tidy(() => {
    const r = model.forwardWithCache(x, true);
    assert.ok(r.out.requiresGrad);
    assert.ok(r.caches.every((c) => !c.h.requiresGrad && !c.inputs.requiresGrad && !c.h.node));
    dispose(r.caches);
  });
  model.dispose();
  x.dispose();
});

/** Runs one layer forward + backward with scan "fused" and "pscan" at state size N (the same weights). */
async function fusedVsPscan(N: number) {
  const make = (scan: "fused" | "pscan") =>
    new Mamba(mambaConfig({ dModel: 8, nLayers: 1, dState: N, scan, recompute: false }));
  const reference = make("pscan"); // the weights both runs use
  const run = async (scan: "fused" | "pscan") => {
    const model = make(scan);
    model.loadStateDict(reference.stateDict());
    const x = randn([1, 5, 8], { seed: 3, requiresGrad: true });
    const { value: y, kernels } = await kernelsRun(() =>
      tidy(() => {
        const out = model.forward(x);
        sum(out).backward();
        return out;
      })
    );
    const out = [
      { data: await y.toArray(), shape: y.shape },
      { data: await x.grad!.toArray(), shape: x.shape },
    ];
    model.dispose();
    for (const t of [x, y]) t.dispose();
    return { out, kernels };
  };
  const fused = await run("fused");
  const pscan = await run("pscan");
  reference.dispose();
  return { fused, pscan };
}

Deno.test({
  name: "scan 'fused' at state sizes in blocks (17: 9 + 8; 24: two of 12; 80: five of 16) equals pscan",
  ignore: noFused,
  fn: async () => {
    for (const N of [17, 24, 80]) {
      const { fused, pscan } = await fusedVsPscan(N);
      assertFusedRan(fused.kernels, `N = ${N}`, true);
      assertScanRan(pscan.kernels, "pscan", `N = ${N}`, true);
      // blocks of states: the fused kernel runs once per block, over the same channels
      const blocks = new Set(fused.kernels.filter((k) => k.startsWith("fused_scan_fwd_"))).size;
      assert.equal(blocks, Math.ceil(N / 16), `N = ${N}: forward kernels, expected one per block of states`);
      for (const [i, what] of ["output", "grad x"].entries()) {
        assertMatches(fused.out[i], pscan.out[i], tolerance("model"), `N = ${N}, ${what}`);
      }
    }
  },
});

Deno.test({
  name:
    "a layer's output and gradients under a GPU's matmul plans, its products split over K, equal this adapter's",
  ignore: noFused,
  fn: async () => {
    const { matmulPlan, matmulVariant } = await import("../core/ops/matmul.ts");
    // d_model 64, L 512: in_proj's input gradient (K = 2 ED = 256) and the weight gradients (K = 512) are split
    // on a GPU, until about 32768 invocations run; summed by one more dispatch each
    const config = { dModel: 64, nLayers: 1, dState: 16, scan: "fused" as const, recompute: false };
    const model = new Mamba(mambaConfig(config));
    const x = randn([1, 512, 64], { seed: 7 }); // x: (B, L, D)
    const G = randn([1, 512, 64], { seed: 8 }); // G: (B, L, D)
    const run = async () => {
      const y = tidy(() => {
        const out = model.forward(x); // out: (B, L, D)
        out.backward(G);
        return out;
      });
      const grads = model.parameters().map((p) => p.grad!.toArray());
      const values = [await y.toArray(), ...await Promise.all(grads)];
      y.dispose();
      for (const p of model.parameters()) {
        p.grad?.dispose();
        p.grad = null;
      }
      return values;
    };
    try {
      // the same scan variant both ways (the default one depends on the adapter's kind): only the plans differ
      await withScanVariantFixed(async () => {
        const slices = await withPlans(
          { gpu: true, split: true },
          () => matmulPlan(512, 256, 64, {}, matmulVariant()).slices,
        );
        assert.ok(slices > 1, `in_proj's input gradient is split on a GPU (${slices} slices)`);
        const gpu = await withPlans({ gpu: true, split: true }, run);
        const here = await withPlans({ gpu: false }, run);
        const names = ["y", ...model.namedParameters().map(([n]) => `gradient of ${n}`)];
        gpu.forEach((v, i) => {
          const shape = [v.length];
          assertMatches({ data: v, shape }, { data: here[i], shape }, tolerance("model"), names[i]);
        });
      });
    } finally {
      model.dispose();
      x.dispose();
      G.dispose();
    }
  },
});

Deno.test({
  name:
    "the fused layer pads x_proj's output to 4 columns on CPU adapters only (R + 2N = 33 here); padded or not, the same outputs and gradients",
  ignore: noFused,
  fn: async () => {
    const { deviceInfo } = await import("../core/device.ts");
    const info = deviceInfo() as { isFallbackAdapter: boolean };
    const fallback = info.isFallbackAdapter;
    // recompute off: the pad runs once forward (with recompute on, once more inside the backward)
    const config = { dModel: 16, nLayers: 1, dState: 16, scan: "fused" as const, recompute: false };
    const model = new Mamba(mambaConfig(config));
    const x = randn([2, 9, 16], { seed: 5 });
    const G = randn([2, 9, 16], { seed: 6 });
    const run = async (cpu: boolean) => {
      info.isFallbackAdapter = cpu;
      try {
        const copies = { n: 0 };
        // count the encoder's copies and clears
        type Method = (this: GPUCommandEncoder, ...a: unknown[]) => void;
        const enc = GPUCommandEncoder.prototype as unknown as Record<
          "copyBufferToBuffer" | "clearBuffer",
          Method
        >;
        const [copy, clear] = [enc.copyBufferToBuffer, enc.clearBuffer];
        const counted = (f: Method): Method =>
          function (this: GPUCommandEncoder, ...a: unknown[]) {
            copies.n++;
            return f.apply(this, a);
          };
        enc.copyBufferToBuffer = counted(copy);
        enc.clearBuffer = counted(clear);
        let y: Tensor;
        try {
          y = tidy(() => {
            const out = model.forward(x);
            out.backward(G);
            return out;
          });
        } finally {
          [enc.copyBufferToBuffer, enc.clearBuffer] = [copy, clear];
        }
        const grads = model.parameters().map((p) => p.grad!);
        const values = [await y.toArray(), ...await Promise.all(grads.map((g) => g.toArray()))];
        y.dispose();
        for (const p of model.parameters()) {
          p.grad?.dispose();
          p.grad = null;
        }
        return { values, commands: copies.n };
      } finally {
        info.isFallbackAdapter = fallback;
      }
    };
    // the same scan variant in both runs (the default one depends on the adapter's kind), so that only the
    // padding differs in their commands
    const [padded, plain] = await withScanVariantFixed(async () => [await run(true), await run(false)]);
    // the pad: a clear and a copy of the weight forward, a copy of its gradient backward
    assert.equal(
      padded.commands - plain.commands,
      3,
      `non-dispatch commands ${padded.commands} vs ${plain.commands}`,
    );
    padded.values.forEach((v, i) => {
      assertMatches(
        { data: v, shape: [v.length] },
        { data: plain.values[i], shape: [v.length] },
        tolerance("model"),
        i === 0 ? "y" : `gradient ${i - 1}`,
      );
    });
    model.dispose();
    x.dispose();
    G.dispose();
  },
});

Deno.test("step with gradients wanted takes the differentiable step (the fused one dropped all but out_proj's)", async () => {
  await init();
  const grads = async (scan: "fused" | "pscan") => {
    manualSeed(5); // the same initialisation for both
    const model = new Mamba(mambaConfig({ dModel: 8, nLayers: 1, scan }));
    const x = randn([2, 8], { seed: 3 }).requiresGrad_(true);
    const caches = model.emptyCache(2);
    const r = model.step(x, caches);
    tidy(() => sum(r.out).backward());
    const named = model.namedParameters().map(([n, p]) => [n, p.grad] as const);
    const out = {
      missing: named.filter(([, g]) => g === null).map(([n]) => n),
      x: [...await x.grad!.toArray()],
    };
    for (const c of [...caches, ...r.caches]) (c.h.dispose(), c.inputs.dispose());
    r.out.dispose();
    x.grad!.dispose();
    x.dispose();
    for (const [, p] of model.namedParameters()) p.grad?.dispose();
    model.dispose();
    return out;
  };
  // fused and pscan models share their initialisation (seeded the same): the same gradients
  const [fused, pscan] = [await grads("fused"), await grads("pscan")];
  assert.deepEqual(fused.missing, [], "every parameter has a gradient");
  assert.deepEqual(pscan.missing, []);
  const err = Math.max(...fused.x.map((v, i) => Math.abs(v - pscan.x[i])));
  assert.ok(err < 1e-5, `x's gradient: fused step against pscan's, ${err}`);
  // gradients wanted only by the block's norm (a ResidualBlock's, outside the mixer) or by a cache (a learned
  // initial state): the fused step cut the graph there too
  const model = new Mamba(mambaConfig({ dModel: 8, nLayers: 2 }));
  for (const [name, p] of model.namedParameters()) p.requiresGrad_(/\.norm\.weight$/.test(name));
  const x = randn([2, 8], { seed: 4 });
  const caches = model.emptyCache(2);
  let r = model.step(x, caches);
  tidy(() => sum(r.out).backward());
  const norms = model.namedParameters().filter(([n]) => /\.norm\.weight$/.test(n));
  assert.equal(norms.length, 2);
  assert.ok(norms.every(([, p]) => p.grad !== null), "both norms' weights have gradients");
  for (const [, p] of norms) (p.grad!.dispose(), p.grad = null, p.requiresGrad_(false));
  dispose(r.caches.flatMap((c) => [c.h, c.inputs]));
  r.out.dispose();
  caches[0].h.requiresGrad_(true);
  r = model.step(x, caches);
  tidy(() => sum(r.out).backward());
  assert.ok(caches[0].h.grad !== null, "the first cache's h has a gradient");
  caches[0].h.grad!.dispose();
  dispose([...r.caches.flatMap((c) => [c.h, c.inputs]), ...caches.flatMap((c) => [c.h, c.inputs]), r.out, x]);
  model.dispose();
});

Deno.test("selectiveScan, Mamba's constructors, Mamba.step's caches and the fused variants' N check what they are given", async () => {
  await init();
  const { selectiveScan } = await import("../scan/selective_scan.ts");
  const { setFusedVariant, setFusedVariantsByProblem } = await import("../scan/fused_variant.ts");
  const { tuneFusedScan } = await import("../scan/tune_fused.ts");
  const [B, L, ED, N] = [2, 5, 6, 3];
  const t = (...s: number[]) => randn(s, { seed: s.reduce((a, b) => a * 7 + b, 1) });
  const ok = { x: t(B, L, ED), delta: t(B, L, ED), A: t(ED, N), Bm: t(B, L, N), C: t(B, L, N), D: t(ED) };
  const call = (o: Partial<typeof ok>) => {
    const a = { ...ok, ...o };
    return selectiveScan(a.x, a.delta, a.A, a.Bm, a.C, a.D, "sequential");
  };
  // a wrong layout of the right size was accepted (and gave wrong numbers)
  const wrong: [Partial<typeof ok>, RegExp][] = [
    [{ delta: t(B, ED, L) }, /\(delta does not fit\)/],
    [{ Bm: t(L, B, N) }, /\(Bm does not fit\)/],
    [{ C: t(B, N, L) }, /\(C does not fit\)/],
    [{ Bm: t(B * L * N) }, /Bm f32 \[30\].*\(Bm does not fit\)/],
    [{ x: t(B * L, ED) }, /selectiveScan: needs f32 x and delta \(B, L, ED\)/],
  ];
  for (const [o, want] of wrong) {
    assert.throws(() => call(o), want);
    for (const v of Object.values(o)) v!.dispose();
  }
  const r = tidy(() => call({}));
  r.y.dispose();
  r.hs.dispose();
  for (const v of Object.values(ok)) v.dispose();
  // constructors validate what they are given: an input config is completed (it failed with a NaN shape), a
  // fractional rank and a stale dInner are named
  new Mamba({ dModel: 8, nLayers: 1 } as ReturnType<typeof mambaConfig>).dispose();
  assert.throws(
    () => new Mamba({ ...mambaConfig({ dModel: 8, nLayers: 1 }), dtRank: 2.5 }),
    /dtRank/,
  );
  assert.throws(
    () => new MambaBlock({ ...mambaConfig({ dModel: 8, nLayers: 1 }), dModel: 16 }),
    /dInner/,
  );
  // a step's caches are all checked before any layer runs: a disposed or i32 one is named with its layer
  const model = new Mamba(mambaConfig({ dModel: 8, nLayers: 3 }));
  const x = randn([2, 8], { seed: 1 });
  const live = memory().liveTensors;
  const caches = model.emptyCache(2);
  caches[1].h.dispose();
  assert.throws(() => model.step(x, caches), /Mamba.step: the cache of layer 1 has h disposed/);
  assert.equal(memory().liveTensors, live + 5, "nothing left behind but the caches");
  for (const c of caches) (c.h.disposed || c.h.dispose(), c.inputs.dispose());
  // ... and a block's own step and forward (a disposed cache met an op's error inside, different per mode; L
  // = 0 gave an empty output or an error in a narrow, per mode)
  const beforeBlocks = memory().liveTensors;
  for (const scan of ["fused", "pscan"] as const) {
    const one = new Mamba(mambaConfig({ dModel: 8, nLayers: 1, scan }));
    const block = one.layers.items[0].mixer;
    const [c] = one.emptyCache(2);
    c.inputs.dispose();
    assert.throws(() => block.step(x, c), /MambaBlock.step: the cache has inputs disposed/);
    c.h.dispose();
    const empty = randn([2, 0, 8]);
    assert.throws(
      () => block.forward(empty, true),
      /MambaBlock.forward: u must be \(B, L, D\) with B, L >= 1, got \[2, 0, 8\]/,
    );
    empty.dispose();
    one.dispose();
  }
  assert.equal(memory().liveTensors, beforeBlocks, "the refused calls left nothing");
  x.dispose();
  model.dispose();
  // selectiveScan's mode is checked before any op runs
  const few = [t(1, 2, 3), t(1, 2, 3), t(3, 2), t(1, 2, 2), t(1, 2, 2), t(3)];
  const before = memory().liveTensors;
  assert.throws(
    () => selectiveScan(few[0], few[1], few[2], few[3], few[4], few[5], "fused" as "pscan"),
    /selectiveScan: mode must be "pscan" or "sequential", got "fused"/,
  );
  assert.equal(memory().liveTensors, before);
  for (const v of few) v.dispose();
  // state sizes for the fused variants
  for (const n of [0, NaN, 1.5, 1e9]) {
    assert.throws(
      () => setFusedVariant(n, { Lc: 64, WG: 32 }),
      /N must be a state size, an integer from 1 to 65536/,
    );
    await assert.rejects(() => tuneFusedScan(n), /tuneFusedScan: N must be a state size/);
  }
  assert.throws(
    () => setFusedVariantsByProblem(16, [{ problem: [1, 2], variant: { Lc: 64, WG: 32 } }]),
    /a problem is \(B, L, ED\), three positive integers, got \[1,2\]/,
  );
});

Deno.test("ResidualBlock.forward refuses a cache that requires grad with every recompute setting, leaving nothing behind", async () => {
  await init();
  // With recompute the checkpoint's first pass runs without autograd, where the mixer's check does not fire:
  // the block checks before it (else the backward's rerun threw, or the state's gradient was cut silently).
  for (const recompute of [true, "input", false] as const) {
    const block = new ResidualBlock(mambaConfig({ dModel: 8, nLayers: 1, recompute }));
    const x = randn([2, 3, 8], { seed: 2 });
    const { dInner: ED, dState: N, dConv: K } = block.mixer.config;
    const c = { h: randn([2, ED, N], { seed: 3 }), inputs: randn([2, ED, K - 1], { seed: 4 }) };
    const wants = { h: c.h.detach().requiresGrad_(true), inputs: c.inputs };
    const x1 = randn([1, 3, 8], { seed: 5 });
    const live = memory().liveBytes;
    assert.throws(
      () => block.forward(x, false, wants),
      /ResidualBlock.forward: the cache requires grad, but no gradient flows into a carried state/,
      `recompute ${recompute}`,
    );
    assert.equal(memory().liveBytes, live, `bytes left behind (recompute ${recompute})`);
    // a cache of another batch size: named before the norm runs
    assert.throws(
      () => block.forward(x1, false, c),
      /ResidualBlock.forward: the cache has h \[2, 16, 16\] and inputs \[2, 16, 3\]; a batch of 1 needs h \[1, 16, 16\]/,
    );
    assert.equal(memory().liveBytes, live, `bytes left behind by the wrong batch (recompute ${recompute})`);
    // the same cache without grad goes through, and the gradient reaches x
    const u = x.detach().requiresGrad_(true);
    const out = block.forward(u, false, c).out;
    tidy(() => sum(out).backward());
    assert.deepEqual(u.grad?.shape, [2, 3, 8]);
    dispose([out, u, wants.h, c, x, x1]);
    block.dispose();
  }
});

Deno.test("a Mamba fed data (an input that needs no grad) trains its weights with every recompute setting", async () => {
  await init();
  const grads: Float32Array[][] = [];
  for (const recompute of [false, true, "input"] as const) {
    manualSeed(3);
    const model = new Mamba(mambaConfig({ dModel: 16, nLayers: 2, recompute }));
    manualSeed(4);
    const x = randn([1, 12, 16]); // x: (B, L, D), no grad: data, as bench and the report feed a layer
    const y = model.forward(x);
    assert.equal(y.requiresGrad, true, `recompute ${recompute}`);
    const loss = y.sum();
    loss.backward();
    const params = model.parameters();
    grads.push(await Promise.all(params.map(async (p) => (await p.grad!.toArray()) as Float32Array)));
    for (const p of params) p.grad!.dispose();
    dispose([x, y, loss]);
    model.dispose();
  }
  for (const g of grads.slice(1)) {
    g.forEach((t, i) => assertClose(t, grads[0][i], { rtol: 1e-5, atol: 1e-6 }, `parameter ${i}`));
  }
});
