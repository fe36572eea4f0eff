import assert from "node:assert/strict";
import { cat, sum } from "../core/ops/index.ts";
import { keep, type Tensor, tidy } from "../core/tensor.ts";
import { noGrad } from "../core/autograd.ts";
import { init } from "../core/device.ts";
import { randn } from "../core/creation.ts";
import { readSafetensorsFile } from "../core/safetensors_fs.ts";
import { mambaConfig } from "../mamba/config.ts";
import { Mamba } from "../mamba/block.ts";
import type { ScanMode } from "../scan/linear_scan.ts";
import { fixturePath, loadFixture, maxAbs, maxAbsDiff, toTensor } from "./fixture_util.ts";

async function configOf(name: string, scan: ScanMode | "fused", recompute = true) {
  const meta = (await readSafetensorsFile(fixturePath(name))).header.metadata;
  const c = JSON.parse(meta.config);
  return mambaConfig({
    dModel: c.d_model,
    nLayers: c.n_layers,
    dState: c.d_state,
    expandFactor: c.expand_factor,
    dConv: c.d_conv,
    dtRank: c.dt_rank,
    bias: c.bias,
    convBias: c.conv_bias,
    rmsNormEps: c.rms_norm_eps,
    innerLayernorms: c.inner_layernorms,
    scan,
    recompute,
  });
}

// Tolerances (MANIFEST): 1e-4 absolute on y; gradients 1e-4 relative to max |grad| of each tensor.
for (const name of ["mamba_L37", "mamba_dstate4", "mamba_tiny"]) {
  for (
    const [scan, recompute] of [["pscan", false], ["sequential", false], ["fused", false], [
      "fused",
      true,
    ]] as const
  ) {
    Deno.test(`Mamba ${scan}${recompute ? "+recompute" : ""}: forward and every gradient equal mamba.py (${name})`, async () => {
      const f = await loadFixture(`${name}.safetensors`);
      const model = new Mamba(await configOf(`${name}.safetensors`, scan, recompute));
      const dict = new Map(
        [...f].filter(([k]) => !k.includes(".") || k.startsWith("layers.")).filter(([k]) =>
          k.startsWith("layers.")
        ),
      );
      model.loadStateDict(dict);
      const x = toTensor(f, "x", true);
      const G = toTensor(f, "G");
      const y = tidy(() => {
        const y = model.forward(x);
        sum(y.mul(G)).backward();
        return keep(y);
      });
      const checks: [string, Promise<Float32Array | Int32Array>][] = [["y", y.toArray()], [
        "grad.x",
        x.grad!.toArray(),
      ]];
      for (const [k, p] of model.namedParameters()) checks.push([`grad.${k}`, p.grad!.toArray()]);
      for (const [k, pending] of checks) {
        const got = await pending;
        const want = f.get(k)!.data;
        const d = maxAbsDiff(got, want);
        const tol = k === "y" ? 1e-4 : 1e-4 * Math.max(maxAbs(want), 1e-3);
        assert.ok(d <= tol, `${k}: max diff ${d.toExponential(2)} > ${tol.toExponential(2)}`);
      }
      model.dispose();
      for (const t of [x, x.grad!, G, y]) t.dispose();
    });
  }
}

for (const scan of ["fused", "pscan"] as const) {
  Deno.test(`Mamba.step (${scan === "fused" ? "fused step kernels" : "mamba.py's readable step"}) outputs and final caches equal mamba.py's step fixture and the full forward`, async () => {
    const f = await loadFixture("step_tiny.safetensors");
    const model = new Mamba(await configOf("step_tiny.safetensors", scan));
    model.loadStateDict(new Map([...f].filter(([k]) => k.startsWith("layers."))), { strict: true });
    const x = toTensor(f, "x"); // x: (B, L, D)
    const [B, L, D] = x.shape;
    const { yStep, caches, full } = tidy(() =>
      noGrad(() => {
        let caches = model.emptyCache(B);
        const ys = [];
        for (let t = 0; t < L; t++) {
          const r = model.step(x.narrow(1, t, 1).reshape(B, D), caches);
          caches = r.caches;
          ys.push(r.out.reshape(B, 1, D));
        }
        return { yStep: cat(ys, 1), caches, full: model.forwardWithCache(x, true) };
      })
    );
    const pairs: [string, Tensor, string][] = [["y_step", yStep, "y_step"], [
      "forward",
      full.out,
      "y_forward",
    ]];
    caches.forEach((c, i) => {
      pairs.push([`step cache ${i} h`, c.h, `cache.${i}.h`], [
        `step cache ${i} inputs`,
        c.inputs,
        `cache.${i}.inputs`,
      ]);
      pairs.push([`forward cache ${i} h`, full.caches[i].h, `cache.${i}.h`]);
      pairs.push([`forward cache ${i} inputs`, full.caches[i].inputs, `cache.${i}.inputs`]);
    });
    for (const [what, t, key] of pairs) {
      const d = maxAbsDiff(await t.toArray(), f.get(key)!.data);
      assert.ok(d < 1e-4, `${what} vs ${key}: max diff ${d}`);
    }
    model.dispose();
  });
}

Deno.test("the fused step kernels equal mamba.py's readable step: dt_proj inside (R <= 8) and as a matmul (R 12), conv with and without bias, dConv 2 and 4, batch 3", async () => {
  for (
    const [dtRank, convBias, dConv, dState] of [[2, true, 4, 16], [12, false, 2, 4], [8, true, 3, 5]] as const
  ) {
    const config = { dModel: 24, nLayers: 2, dtRank, convBias, dConv, dState };
    const fused = new Mamba(mambaConfig({ ...config, scan: "fused" }));
    const readable = new Mamba(mambaConfig({ ...config, scan: "pscan" }));
    readable.loadStateDict(fused.stateDict(), { strict: true });
    const B = 3;
    const xs = randn([B, 5, 24], { seed: dtRank });
    const outs = tidy(() =>
      noGrad(() =>
        [fused, readable].map((m) => {
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
    );
    const what = `R ${dtRank}, conv bias ${convBias}, dConv ${dConv}, N ${dState}`;
    for (let i = 0; i < outs[0].length; i++) {
      const [a, b] = [await outs[0][i].toArray(), await outs[1][i].toArray()];
      assert.deepEqual(outs[0][i].shape, outs[1][i].shape);
      const d = maxAbsDiff(a, b);
      assert.ok(d <= 1e-5 * Math.max(1, maxAbs(b)), `${what}, output ${i}: max diff ${d}`);
    }
    for (const t of [...outs.flat(), xs]) t.dispose();
    fused.dispose();
    readable.dispose();
  }
});

Deno.test("Mamba rejects bad input and configs with clear errors", async () => {
  const config = mambaConfig({ dModel: 8, nLayers: 1 });
  const model = new Mamba(config);
  const bad = (await import("../core/creation.ts")).zeros([2, 3, 7]);
  assert.throws(() => model.forward(bad), /expected an f32 input \(B, L, 8\), got f32 \[2, 3, 7\]/);
  assert.throws(() => model.step(bad.reshape(6, 7), model.emptyCache(6)), /\(B, 8\)/);
  const caches = model.emptyCache(3);
  const x2 = (await import("../core/creation.ts")).zeros([2, 8]);
  assert.throws(() => model.step(x2, caches), /cache of layer 0 is for batch 3, input has batch 2/);
  assert.throws(() => mambaConfig({ dModel: 0, nLayers: 1 }), /dModel must be a positive integer, got 0/);
  assert.throws(() => mambaConfig({ dModel: 4, nLayers: 1, scan: "fast" as "pscan" }), /scan must be/);
  assert.throws(() => mambaConfig({ dModel: 4, nLayers: 1, dtInit: "x" as "random" }), /dtInit/);
  assert.throws(() => mambaConfig({ dModel: 4, nLayers: 1, foo: 1 } as never), /unknown key 'foo'/);
  model.dispose();
  bad.dispose();
  x2.dispose();
});

/** Runs one layer forward + backward with scan "fused" and "pscan" at state size N (the same weights). */
async function fusedVsPscan(N: number) {
  const { dispatchCount } = await import("../core/executor.ts");
  const { randn } = await import("../core/creation.ts");
  const make = (scan: "fused" | "pscan") =>
    new Mamba(mambaConfig({ dModel: 8, nLayers: 1, dState: N, scan, recompute: false }));
  const reference = make("pscan"); // the weights both runs use
  const run = async (scan: "fused" | "pscan") => {
    const model = make(scan);
    model.loadStateDict(reference.stateDict());
    const x = randn([1, 5, 8], { seed: 3, requiresGrad: true });
    const d0 = dispatchCount();
    const y = tidy(() => {
      const out = model.forward(x);
      sum(out).backward();
      return out;
    });
    const out = [await y.toArray(), await x.grad!.toArray()].map((a) => [...a]);
    const dispatches = dispatchCount() - d0;
    model.dispose();
    for (const t of [x, y]) t.dispose();
    return { out, dispatches };
  };
  const fused = await run("fused");
  const pscan = await run("pscan");
  reference.dispose();
  return { fused, pscan };
}

Deno.test("scan 'fused' at state sizes in blocks (24: two of 12; 80: five of 16) equals pscan", async () => {
  const info = await init();
  const { fusedScanAvailable } = await import("../mamba/block.ts");
  assert.equal(fusedScanAvailable(), info.limits.maxStorageBuffersPerShaderStage >= 10);
  for (const N of [24, 80]) {
    const { fused, pscan } = await fusedVsPscan(N);
    if (fusedScanAvailable()) assert.ok(fused.dispatches < pscan.dispatches, `N = ${N}: the fused path ran`);
    for (const [i, what] of ["output", "grad x"].entries()) {
      const [a, b] = [fused.out[i], pscan.out[i]];
      const scale = Math.max(...b.map(Math.abs));
      const err = Math.max(...a.map((v, j) => Math.abs(v - b[j])));
      assert.ok(err <= 1e-4 * scale, `N = ${N}, ${what}: max error ${err} > 1e-4 x ${scale}`);
    }
  }
});
