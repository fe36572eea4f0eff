/**
 * A seeded randomized differential test over whole-model configurations: random `MambaLM`s (width, layers,
 * state size, expand, dt rank, conv width, bias flags, inner layernorms, RMSNorm epsilon, init scale,
 * vocabulary and its padding multiple, tied head, padding row, batch, length, recompute), each checked
 * against itself across the scan modes:
 *
 * 1. the logits of "fused", "pscan" and "sequential", each with recompute on and off (and fused with recompute
 *    "input"), agree;
 * 2. so does every parameter's gradient of sum(logits * G) (G random), across modes and recompute on / off;
 * 3. per mode, a prefill with caches over a prefix (or none: steps from empty caches) and then `step`
 *    token by token give the mode's full-forward logits at every position, the final caches agree between
 *    modes, and greedy `generate` picks, at every position, the argmax of a full forward over the prompt and
 *    the tokens it generated (a token within the bound of the maximum is a tie);
 * 4. nothing leaks: live tensors and bytes are back where they were once a case disposed what it made;
 * 5. (its own test) invalid configs and LM options are rejected with an error that names the key and shows
 *    the value (mambaConfig's documented contract).
 *
 * Agreement is within the whole-model bound of fixture_util.ts (`tolerance("model")`: 1e-5 relative to each
 * tensor's max |value| on a software adapter, 1e-4 on a GPU), except that a gradient's scale is at least its
 * size without cancellation (see `floors` in runCase), and 4x with inner layernorms (see rtolOf). Measured on
 * lavapipe over 900 cases (seeds 1-15 x 60, 2026-11-29): without inner norms 2.3e-6 at worst (dt_proj.bias
 * 1.8e-6; 9.0e-6 in an earlier sweep, through the fused scan at N 17, before its 17 one-state blocks summed
 * dbias over whole steps), with inner norms 7.4e-6 but for one case, 1.6e-5. The parameters are perturbed away from their initialisation (A_log is the same
 * in every channel, D and the norms ones), so that an index that mixes channels or states up shows. The
 * kernels that ran are checked too: the fused scan (and the fused step kernels where they apply) in "fused"
 * mode, no other scan in "pscan" and "sequential".
 *
 * Cases are stratified: each dimension cycles through a seeded shuffle of its values, so that every value of
 * every dimension occurs within the first |values| cases (at most 11), in random combinations. Case i depends
 * only on the seed and i, not on the number of cases. The default seed's 14 cases include N 17 at L 130 and
 * four lengths past a chunk.
 *
 * Environment (all optional):
 * - MODEL_FUZZ_SEED: the seed (default 11);
 * - MODEL_FUZZ_CASES: the number of cases (default 14);
 * - MODEL_FUZZ_CASE: run only case i of the seed, e.g. to reproduce a failure (its message names it);
 * - MODEL_FUZZ_PRINT=1: print each case's configuration as JSON before it runs;
 * - MAMBA_TOL_REPORT=1 (fixture_util.ts): print every comparison's relative error.
 *
 * Cost (lavapipe, 2 cores): about 16 s for the default cases once Mesa's shader cache holds their kernels,
 * about 80 s with an empty cache. The fused kernels compile per state size (N 17: blocks of 9 and 8 states),
 * inline dt rank (up to 8) and workgroup size (which follows batch and width), the matmuls per tile shape.
 * @module
 */

import assert, { AssertionError } from "node:assert/strict";
import { noGrad } from "../core/autograd.ts";
import { tensor } from "../core/creation.ts";
import { init } from "../core/device.ts";
import { memory } from "../core/memory.ts";
import { matmul, mul, sum } from "../core/ops/index.ts";
import { manualSeed } from "../core/random.ts";
import { dispose, type Tensor, tidy } from "../core/tensor.ts";
import { mambaConfig, type MambaConfigInput } from "../mamba/config.ts";
import type { LayerCache } from "../mamba/block.ts";
import { type LMOptions, MambaLM } from "../mamba/lm.ts";
import { assertMatches, maxAbs, type Shaped, tolerance } from "./fixture_util.ts";
import {
  assertFusedRan,
  assertFusedStepRan,
  caseIndices,
  env,
  fusedUnavailable,
  hash,
  intEnv,
  kernelsRun,
  rng,
  stratified,
} from "./helpers.ts";

await init();
const noFused = fusedUnavailable();

const SEED = intEnv("MODEL_FUZZ_SEED", 11);
const CASES = intEnv("MODEL_FUZZ_CASES", 14);
const PRINT = env("MODEL_FUZZ_PRINT") === "1";

const SCANS = ["fused", "pscan", "sequential"] as const;
type Scan = (typeof SCANS)[number];

// ------------------------------------------------------------------------------------------ cases

/** One random model and its inputs. */
interface Case {
  index: number;
  seed: number;
  config: MambaConfigInput;
  lm: LMOptions;
  B: number;
  L: number;
  /** Steps per decoding check: the prefill covers L - steps tokens (none: steps from empty caches). */
  steps: number;
  /** generate: prompt length and new tokens. */
  prompt: number;
  generate: number;
  readEvery: number;
  /** Which recompute setting the decoding checks use (the gradients are checked with both). */
  recompute: boolean;
}

// The values of each dimension. L: 1, odd lengths, and past the fused kernels' chunks (64 steps for N <= 16,
// 96 for N 24, 128 with sub-chunks of 64 for N 17, 17 blocks of one state). dConv 1 too (the fused step
// kernels need 2 or more: the readable step runs). Two limits keep the models where f32 can resolve what is
// compared, so that the bound says something about the code, not about the model:
// - dModel 2 or more: RMSNorm over one element is x / sqrt(x^2 + eps), +-1 but near 0, and with dModel 1
//   every gradient but the head's passes through norm_f's derivative, eps / (x^2 + eps)^1.5, a difference of
//   nearly equal numbers: measured, every mode 1e-4 to 2e-4 from a float64 reference (none the outlier);
// - baseStd at most 0.2 (lm_v64's): at 0.5 (D 33, 3 layers, inner norms) the logits of every mode were
//   already 1.1e-5 from a float64 reference, and gradients up to 5e-5, with no mode at fault;
// - inner layernorms over 2 or more values: with them, a dt rank or state size of 1 is raised to 2 (see
//   makeCase). The same norm over one value is +-w except within sqrt(eps) of 0, where it turns with slope
//   1 / sqrt(eps) (316): positions that land there amplify f32 noise 316-fold, and the gradients of what
//   feeds it, eps / (x^2 + eps)^1.5, are differences of nearly equal numbers. Measured (D 33, 3 layers, R 1,
//   L 130): every mode 0.5e-5 from a float64 reference in the logits and up to 1.9e-4 in the gradients
//   (the fused mode the closest); with R = N = 1, x_proj's gradient 5e-5 to 2e-4 off in every mode.
const POOLS = {
  dModel: [2, 3, 5, 8, 12, 17, 24, 33],
  nLayers: [1, 2, 3],
  dState: [1, 2, 3, 4, 5, 8, 16, 17, 24],
  expandFactor: [1, 2, 3],
  dtRank: ["auto", "auto", 1, 2, 8, 9] as (number | "auto")[],
  dConv: [1, 2, 3, 4, 5],
  bias: [false, true],
  convBias: [false, true],
  innerLayernorms: [false, true],
  rmsNormEps: [1e-5, 1e-3],
  baseStd: [0.02, 0.1, 0.2],
  vocabSize: [2, 5, 11, 16, 37],
  padVocabSizeMultiple: [1, 3, 8],
  tieEmbeddings: [false, true],
  paddingIdx: ["default", null, "last"] as ("default" | "last" | null)[],
  B: [1, 2, 3],
  L: [1, 2, 3, 5, 7, 16, 31, 64, 65, 97, 130],
  recompute: [false, true],
};

function makeCase(seed: number, index: number): Case {
  const pick = <K extends keyof typeof POOLS>(k: K, dim: number) =>
    stratified(POOLS[k] as readonly (typeof POOLS)[K][number][], seed, dim, index);
  const r = rng(hash(seed, 1000, index));
  const int = (lo: number, hi: number) => lo + Math.floor(r() * (hi - lo + 1));
  const vocabSize = pick("vocabSize", 12);
  const pad = pick("paddingIdx", 15);
  const L = pick("L", 17);
  const dModel = pick("dModel", 0);
  const innerLayernorms = pick("innerLayernorms", 8);
  let dtRank = pick("dtRank", 4);
  let dState = pick("dState", 2);
  // inner norms over one value are not resolved in f32 (see POOLS)
  if (innerLayernorms && (dtRank === "auto" ? Math.ceil(dModel / 16) : dtRank) === 1) dtRank = 2;
  if (innerLayernorms && dState === 1) dState = 2;
  const config: MambaConfigInput = {
    dModel,
    nLayers: pick("nLayers", 1),
    dState,
    expandFactor: pick("expandFactor", 3),
    dtRank,
    dConv: pick("dConv", 5),
    bias: pick("bias", 6),
    convBias: pick("convBias", 7),
    innerLayernorms,
    rmsNormEps: pick("rmsNormEps", 9),
    baseStd: pick("baseStd", 10),
  };
  return {
    index,
    seed: hash(seed, index),
    config,
    lm: {
      vocabSize,
      padVocabSizeMultiple: pick("padVocabSizeMultiple", 13),
      tieEmbeddings: pick("tieEmbeddings", 14),
      ...(pad === "default" ? {} : { paddingIdx: pad === "last" ? vocabSize - 1 : null }),
    },
    B: pick("B", 16),
    L,
    steps: int(1, Math.min(L, 10)),
    prompt: int(1, L),
    generate: int(1, 5),
    readEvery: [1, 2, 16, Infinity][int(0, 3)],
    recompute: pick("recompute", 18),
  };
}

function describe(c: Case): string {
  const k = c.config;
  return `D ${k.dModel} x${k.nLayers} N ${k.dState} E ${k.expandFactor} R ${k.dtRank} K ${k.dConv}` +
    `${k.bias ? " bias" : ""}${k.convBias ? "" : " no-conv-bias"}${k.innerLayernorms ? " norms" : ""}` +
    ` V ${c.lm.vocabSize}/${c.lm.padVocabSizeMultiple}${c.lm.tieEmbeddings ? " tied" : ""} B ${c.B} L ${c.L}`;
}

// ------------------------------------------------------------------------------------------ checks

/**
 * The bound of a case: the policy's whole-model bound, 4x with inner layernorms. The policy was measured on
 * fixtures without them (fixture_util.ts); RMSNorms over the few values of delta (R), B and C (N) have slope
 * 1 / rms, and over B L positions some land where rms is small against the values elsewhere (for two values,
 * about 1 / sqrt(B L) of it): f32 noise grows that much there. Measured (D 33, 3 layers, R = N = 2, L 65):
 * every mode 0.5e-5 to 2e-5 from a float64 reference in the gradients (fused 2x the others), logits 3.5e-6,
 * cross-mode up to 1.6e-5; the worst of 449 other cases with inner norms 2.7e-6.
 */
function rtolOf(c: Case): number {
  return tolerance("model").rtol * (c.config.innerLayernorms ? 4 : 1);
}

/** Collects mismatches (all of a case's, not only the first) and throws them together with the case. */
class Failures {
  readonly list: string[] = [];
  constructor(readonly c: Case) {}
  /** `floor`: the scale is at least this (see the uncancelled gradient scale in runCase). */
  match(got: Shaped, want: Shaped, what: string, floor = 0): void {
    const bound = tolerance("model");
    const rtol = rtolOf(this.c);
    try {
      assertMatches(got, want, {
        rtol,
        floor,
        kind: `${bound.kind}${rtol === bound.rtol ? "" : " x4, inner norms"}, scale at least ${
          floor.toExponential(2)
        }`,
      }, what);
    } catch (e) {
      if (!(e instanceof AssertionError)) throw e;
      this.list.push(e.message);
    }
  }
  fail(msg: string): void {
    this.list.push(msg);
  }
  throwIfAny(): void {
    if (this.list.length === 0) return;
    throw new AssertionError({
      message: `model fuzz case ${this.c.index} (MODEL_FUZZ_SEED=${SEED} MODEL_FUZZ_CASE=${this.c.index}): ` +
        `${this.list.length} mismatch(es):\n  ${this.list.slice(0, 20).join("\n  ")}\ncase: ${
          JSON.stringify(this.c)
        }`,
    });
  }
}

/** Asserts that the scan of `mode` (and no other scan) ran among `kernels`. */
function assertScanRan(kernels: readonly string[], mode: Scan, what: string, L: number): void {
  if (mode === "fused") return assertFusedRan(kernels, what, true);
  const mine = mode === "pscan"
    ? (k: string) => k.startsWith("pscan_")
    : (k: string) => k === "scan_sequential";
  // pscan over one step has no level to sweep
  if (mode === "sequential" || L > 1) assert.ok(kernels.some(mine), `${what}: no ${mode} kernel ran`);
  const other = kernels.find((k) => !mine(k) && (/^(pscan_|fused_scan_)/.test(k) || k === "scan_sequential"));
  assert.equal(other, undefined, `${what}: ${other} ran in ${mode} mode`);
}

const shaped = (data: ArrayLike<number>, shape: readonly number[]): Shaped => ({ data, shape });

/** Positions [from, from + n) of every row of a (B, L, V) array. */
function positions(a: Shaped, from: number, n: number): Shaped {
  const [B, L, V] = a.shape;
  const out = new Float32Array(B * n * V);
  for (let b = 0; b < B; b++) {
    for (let i = 0; i < n * V; i++) out[b * n * V + i] = a.data[(b * L + from) * V + i];
  }
  return shaped(out, [B, n, V]);
}

/** The LM's head as generate's prefill runs it (norm_f, then lm_head or the tied embedding). */
function head(lm: MambaLM, x: Tensor): Tensor {
  const h = lm.normF.forward(x);
  return lm.lmHead ? lm.lmHead.forward(h) : matmul(h, lm.embedding.weight, { transB: true });
}

const idsOf = (rows: number[][]) =>
  tensor(Int32Array.from(rows.flat()), [rows.length, rows[0].length], { dtype: "i32" });

async function runCase(c: Case): Promise<void> {
  if (PRINT) console.log(`model fuzz case ${c.index}: ${JSON.stringify(c)}`);
  const f = new Failures(c);
  const base = memory();
  const { B, L } = c;
  const r = rng(c.seed);

  // The weights: the LM's own initialisation, then every parameter perturbed (seeded).
  manualSeed(c.seed);
  const first = new MambaLM({ ...c.config, scan: "fused" }, c.lm);
  const V = first.vocabSize;
  const names = first.namedParameters().map(([k]) => k);
  const host = await Promise.all(first.parameters().map((p) => p.toArray() as Promise<Float32Array>));
  const weights = new Map(
    first.namedParameters().map(([k, p], i) => {
      const data = Float32Array.from(host[i], (v) => v * (1 + 0.3 * (2 * r() - 1)) + 0.05 * (2 * r() - 1));
      return [k, { shape: p.shape, data }];
    }),
  );
  first.dispose();
  const models = new Map<string, MambaLM>();
  for (const scan of SCANS) {
    for (const recompute of [false, true]) {
      const lm = new MambaLM({ ...c.config, scan, recompute }, c.lm);
      lm.loadStateDict(weights, { strict: true });
      models.set(`${scan}${recompute ? "+rc" : ""}`, lm);
    }
  }
  // and the fused block keeping its input alone (recompute "input": the scan and out_proj run again)
  const inputOnly = new MambaLM({ ...c.config, scan: "fused", recompute: "input" }, c.lm);
  inputOnly.loadStateDict(weights, { strict: true });
  models.set("fused+rci", inputOnly);

  const tokens = Array.from(
    { length: B },
    () => Array.from({ length: L }, () => Math.floor(r() * c.lm.vocabSize)),
  );
  const ids = idsOf(tokens);
  const G = tensor(Float32Array.from({ length: B * L * V }, () => 2 * r() - 1), [B, L, V]);

  // 1, 2: logits and every gradient, in every mode with recompute on and off
  const results = new Map<string, { logits: Tensor; grads: Tensor[] }>();
  for (const [name, lm] of models) {
    const scan = name.split("+")[0] as Scan;
    const run = await kernelsRun(() =>
      tidy(() => {
        const logits = lm.forward(ids);
        sum(mul(logits, G)).backward();
        return logits;
      })
    );
    assertScanRan(run.kernels, scan, `${describe(c)}: ${name} forward + backward`, L);
    const grads = lm.namedParameters().map(([k, p]) => {
      if (!p.grad) throw new AssertionError({ message: `${name}: ${k} has no gradient` });
      return p.grad;
    });
    results.set(name, { logits: run.value, grads });
  }
  const read = new Map<string, Shaped[]>();
  await Promise.all(
    [...results].map(async ([name, { logits, grads }]) => {
      const ts = [logits, ...grads];
      const arrays = await Promise.all(ts.map((t) => t.toArray()));
      read.set(name, arrays.map((a, i) => shaped(a, ts[i].shape)));
    }),
  );
  const clearGrads = () => {
    for (const lm of models.values()) {
      for (const p of lm.parameters()) {
        p.grad?.dispose();
        p.grad = null;
      }
    }
  };
  clearGrads();
  for (const { logits } of results.values()) logits.dispose();
  // The scale of each gradient without cancellation. A gradient element is a sum over positions (and
  // channels) of terms of both signs; where they cancel, f32 rounding of the terms leaves an error that is
  // small against the terms but not against their sum (measured: a norm weight's gradient of 0.078 summed
  // from terms near 1, every mode 4e-5 to 1e-4 of it from a float64 reference). So each gradient's scale is
  // at least its largest value under G with random signs, which keep the terms' sizes but not their
  // cancellation: the bound is 1e-5 of the size of the terms, not of what is left of them.
  const seq = models.get("sequential")!;
  const floors = new Array<number>(names.length + 1).fill(0);
  for (let k = 0; k < 2; k++) {
    const signed = tensor(Float32Array.from({ length: B * L * V }, () => (r() < 0.5 ? -1 : 1)), [B, L, V]);
    tidy(() => sum(mul(mul(seq.forward(ids), G), signed)).backward());
    const gs = await Promise.all(seq.parameters().map((p) => p.grad!.toArray()));
    gs.forEach((g, i) => (floors[i + 1] = Math.max(floors[i + 1], maxAbs(g))));
    signed.dispose();
    clearGrads();
  }
  const what = ["logits", ...names.map((k) => `grad ${k}`)];
  const compare = (a: string, b: string) => {
    const [x, y] = [read.get(a)!, read.get(b)!];
    x.forEach((t, i) => f.match(t, y[i], `${a} vs ${b}: ${what[i]}`, floors[i]));
  };
  // every mode and setting against sequential without recompute; recompute on against off in each mode
  for (const name of models.keys()) if (name !== "sequential") compare(name, "sequential");
  for (const scan of ["fused", "pscan"]) compare(`${scan}+rc`, scan);
  compare("fused+rci", "fused+rc");

  // 3: decoding. Prefill L - steps tokens (or none), then one step per token; logits at every position
  // against the same mode's full forward, final caches against sequential's.
  const P = L - c.steps;
  const decoded = new Map<Scan, { out: Tensor[]; caches: LayerCache[] }>();
  for (const scan of SCANS) {
    const lm = models.get(`${scan}${c.recompute ? "+rc" : ""}`)!;
    const out: Tensor[] = [];
    const run = await kernelsRun(() => {
      let caches: LayerCache[];
      if (P === 0) caches = lm.emptyCache(B);
      else {
        const prefix = idsOf(tokens.map((row) => row.slice(0, P)));
        const pre = tidy(() =>
          noGrad(() => {
            const x = lm.mamba.forwardWithCache(lm.embedding.forward(prefix), true);
            return { logits: head(lm, x.out), caches: x.caches };
          })
        );
        prefix.dispose();
        out.push(pre.logits);
        caches = pre.caches;
      }
      for (let t = P; t < L; t++) {
        const id = tensor(Int32Array.from(tokens, (row) => row[t]), [B], { dtype: "i32" });
        const prev = caches;
        const s = tidy(() => noGrad(() => lm.step(id, prev)));
        dispose([prev, id]);
        caches = s.caches;
        out.push(s.logits);
      }
      return caches;
    });
    if (scan === "fused") {
      if (P > 0) assertFusedRan(run.kernels, `${describe(c)}: fused prefill`);
      // the fused step kernels: without inner norms, and with a conv of 2 taps or more
      if (!c.config.innerLayernorms && c.config.dConv! >= 2) {
        assertFusedStepRan(run.kernels, `${describe(c)}: fused steps`);
      }
    }
    decoded.set(scan, { out, caches: run.value });
  }
  const cacheRead = new Map<Scan, Shaped[]>();
  await Promise.all(
    [...decoded].map(async ([scan, { out, caches }]) => {
      const ts = [...out, ...caches.flatMap((k) => [k.h, k.inputs])];
      const arrays = await Promise.all(ts.map((t) => t.toArray()));
      const own = read.get(`${scan}${c.recompute ? "+rc" : ""}`)![0]; // this mode's full-forward logits
      let i = 0;
      if (P > 0) {
        f.match(shaped(arrays[i++], [B, P, V]), positions(own, 0, P), `${scan} prefill ${P}: logits`);
      }
      for (let t = P; t < L; t++) {
        f.match(
          shaped(arrays[i++], [B, 1, V]),
          positions(own, t, 1),
          `${scan} step at position ${t}: logits`,
        );
      }
      cacheRead.set(scan, arrays.slice(i).map((a, j) => shaped(a, ts[i + j].shape)));
      dispose(ts);
    }),
  );
  for (const scan of ["fused", "pscan"] as const) {
    cacheRead.get(scan)!.forEach((t, j) =>
      f.match(
        t,
        cacheRead.get("sequential")![j],
        `${scan} vs sequential: final cache ${j >> 1} ${j % 2 ? "inputs" : "h"}`,
      )
    );
  }

  // 3: greedy generate against the argmax of a full forward over prompt + generated tokens
  const prompt = tokens.map((row) => row.slice(0, c.prompt));
  const n = c.generate;
  const tol = rtolOf(c);
  for (const scan of SCANS) {
    const lm = models.get(`${scan}${c.recompute ? "+rc" : ""}`)!;
    const gen = await kernelsRun(() => lm.generate(prompt, n, { readEvery: c.readEvery }));
    if (scan === "fused") {
      assertFusedRan(gen.kernels, `${describe(c)}: generate's prefill`);
      if (n > 1 && !c.config.innerLayernorms && c.config.dConv! >= 2) {
        assertFusedStepRan(gen.kernels, `${describe(c)}: generate's steps`);
      }
    }
    const rows = prompt.map((p, b) => [...p, ...gen.value[b]]);
    const all = idsOf(rows);
    const logits = tidy(() => noGrad(() => lm.forward(all)));
    const data = await logits.toArray();
    dispose([all, logits]);
    const Lg = c.prompt + n;
    let scale = 0;
    for (const v of data) scale = Math.max(scale, Math.abs(v));
    for (let b = 0; b < B; b++) {
      for (let j = 0; j < n; j++) {
        const at = (b * Lg + c.prompt - 1 + j) * V;
        const row = data.subarray(at, at + V);
        const tok = gen.value[b][j];
        let best = 0;
        for (let v = 1; v < V; v++) if (row[v] > row[best]) best = v;
        // a token whose logit is within the bound of the maximum is a tie, not an error
        if (!(tok >= 0 && tok < V) || !(row[tok] >= row[best] - tol * scale)) {
          f.fail(
            `${scan} generate: row ${b}, new token ${j} is ${tok} (logit ${row[tok]}), the full forward's ` +
              `argmax is ${best} (logit ${row[best]}; bound ${tol * scale})`,
          );
        }
      }
    }
  }

  // 4: no leaks
  for (const lm of models.values()) lm.dispose();
  dispose([ids, G]);
  const now = memory();
  if (now.liveTensors !== base.liveTensors || now.liveBytes !== base.liveBytes) {
    f.fail(
      `leak: ${now.liveTensors - base.liveTensors} tensors, ${now.liveBytes - base.liveBytes} bytes live ` +
        "after the case disposed everything it made",
    );
  }
  f.throwIfAny();
}

for (const i of caseIndices("MODEL_FUZZ_CASE", CASES)) {
  const c = makeCase(SEED, i);
  Deno.test({
    name: `model fuzz ${SEED}/${i}: ${describe(c)}`,
    ignore: noFused,
    fn: () => runCase(c),
  });
}

// ------------------------------------------------------------------------------------------ invalid configs

/** How a rejected value is written in a message: numbers as JavaScript writes them, the rest as JSON. */
const shown = (v: unknown) => typeof v === "number" ? String(v) : JSON.stringify(v);

const NOT_INT = [0, -1, -16, 1.5, 4 + 1e-9, NaN, Infinity, -Infinity, "4", null, true, [4]];
const NOT_POS = [0, -1e-3, -Infinity, NaN, Infinity, "0.1", null, false];
const NOT_BOOL = [0, 1, "true", "false", null, [true]];
/** Config keys, each with values mambaConfig must reject, naming the key. */
const BAD_CONFIG: Record<string, unknown[]> = {
  dModel: NOT_INT,
  nLayers: NOT_INT,
  dState: NOT_INT,
  expandFactor: NOT_INT,
  dConv: NOT_INT,
  dtRank: [0, -2, 2.5, NaN, Infinity, "4", "AUTO", "", null, true],
  dtMin: NOT_POS,
  dtMax: NOT_POS,
  dtScale: NOT_POS,
  dtInitFloor: NOT_POS,
  rmsNormEps: NOT_POS,
  baseStd: NOT_POS,
  bias: NOT_BOOL,
  convBias: NOT_BOOL,
  innerLayernorms: NOT_BOOL,
  mup: NOT_BOOL,
  mupBaseWidth: NOT_POS,
  recompute: NOT_BOOL,
  dtInit: ["uniform", "", "Random", 1, NaN, null],
  scan: ["Fused", "parallel", "", 1, null, NaN],
};
/** LM options, each with values MambaLM must reject, naming the option (vocabSize 11 in the base). */
const BAD_LM: Record<string, unknown[]> = {
  vocabSize: [0, -3, 2.5, NaN, Infinity, "16", null],
  padVocabSizeMultiple: [0, -8, 1.5, NaN, Infinity, "8", null],
  tieEmbeddings: [0, 1, "yes", null],
  paddingIdx: [-1, 11, 12, 1.5, NaN, "0", true],
};

Deno.test("model fuzz: invalid configs and LM options are rejected; the error names key and value", () => {
  const r = rng(hash(SEED, 77));
  const base = memory();
  const failures: string[] = [];
  // every bad value of every key, each on a random valid case's config (a raw input and a resolved one)
  const check = (what: string, key: string, value: unknown, fn: () => unknown, showsValue = true) => {
    let message: string | null = null;
    try {
      fn();
    } catch (e) {
      message = (e as Error).message;
    }
    if (message === null) failures.push(`${what}: ${key} = ${shown(value)} was accepted`);
    else if (!new RegExp(`\\b${key}\\b`).test(message)) {
      failures.push(`${what}: ${key} = ${shown(value)}: the error does not name ${key}: ${message}`);
    } else if (showsValue && !message.includes(shown(value))) {
      failures.push(`${what}: ${key} = ${shown(value)}: the error does not show the value: ${message}`);
    }
  };
  let k = 0;
  for (const [key, values] of Object.entries(BAD_CONFIG)) {
    for (const value of values) {
      const c = makeCase(SEED, Math.floor(r() * 1000));
      const input = { ...c.config, [key]: value } as MambaConfigInput;
      check("mambaConfig", key, value, () => mambaConfig(input));
      // a resolved config changed afterwards is validated again (MambaLM accepts both)
      const resolved = { ...mambaConfig(c.config), [key]: value } as MambaConfigInput;
      if (k++ % 2) check("new MambaLM(input)", key, value, () => new MambaLM(input, c.lm));
      else check("new MambaLM(resolved)", key, value, () => new MambaLM(resolved, c.lm));
    }
  }
  for (const [key, values] of Object.entries(BAD_LM)) {
    for (const value of values) {
      const c = makeCase(SEED, Math.floor(r() * 1000));
      check("new MambaLM", key, value, () => new MambaLM(c.config, { ...c.lm, vocabSize: 11, [key]: value }));
    }
  }
  // keys that mamba.py spells otherwise, and relations between keys
  const c = makeCase(SEED, 0);
  for (const key of ["d_state", "d_model", "expand", "dInnerr"]) {
    check("mambaConfig", key, 4, () => mambaConfig({ ...c.config, [key]: 4 } as MambaConfigInput), false);
  }
  const lm = { ...c.lm, vocab_size: 4 } as LMOptions;
  check("new MambaLM", "vocab_size", 4, () => new MambaLM(c.config, lm), false);
  assert.throws(
    () => mambaConfig({ ...c.config, dtMin: 0.5, dtMax: 0.1 }),
    /dtMin 0\.5 is greater than dtMax 0\.1/,
  );
  assert.throws(
    () => mambaConfig({ ...mambaConfig(c.config), dInner: 7 } as MambaConfigInput),
    /dInner is 7, but expandFactor \* dModel/,
  );
  const now = memory();
  assert.equal(now.liveTensors, base.liveTensors, "a rejected MambaLM left tensors behind");
  assert.equal(now.liveBytes, base.liveBytes, "a rejected MambaLM left bytes behind");
  if (failures.length) {
    throw new AssertionError({ message: `${failures.length} invalid value(s):\n  ${failures.join("\n  ")}` });
  }
});
