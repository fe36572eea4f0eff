/**
 * Memory of one Mamba layer's training step, per scan mode, from the runtime's own byte counters.
 *
 * For B = 1, d_model 64 (ED 128), N = 16 and 64, L = 1024 ... 16384, and four modes (fused + recompute,
 * keeping the chunk states or the block input alone, fused, pscan): the peak of live bytes during the training step (forward, then backward from y with a fixed
 * cotangent G: `y.backward(G)`, as bench/scan_report.ts steps, the gradients of sum(y * G) without
 * computing that loss) above the live bytes before the step, and the bytes autograd keeps for the backward
 * (`memory().savedBytes` right after the forward). Until the commit that changed this, the step computed
 * the loss sum(y * G) and its gradient too, which added a (B, L, D) product and its broadcast gradient to
 * the peaks (about 0.5 MiB at N 16, L 1024).
 * Then the scan alone, with dt_proj: the bytes saved by `fusedMambaScan` (MambaBlock runs `fusedMambaScanOut`, the same scan with out_proj in the op) against those
 * of the pscan path (dt_proj, `selectiveScan(..., "pscan")` and the gate) for the same inputs, per token. Then the "does not fit"
 * demonstration: under one memory limit, a pscan layer fails with an out-of-memory error while the
 * fused + recompute layer trains (forward, backward, SGD update). Finally 8- and 24-layer models, recompute
 * true against "input" (L 4096; 1024 with --quick).
 *
 * Every case runs under `setMemoryLimit` (8 GiB above the baseline): a case that passes it is recorded
 * with its error instead of exhausting the machine.
 *
 * Run: deno run -A bench/scan_memory.ts [--quick]
 * (software adapter on Linux: DENO_WEBGPU_BACKEND=vulkan XDG_RUNTIME_DIR=<private dir>)
 * Writes bench/results/scan_memory.json (with --quick: bench/results/scan_memory_quick.json, L up to 2048),
 * atomically.
 */
import {
  deviceInfo,
  emptyPool,
  exp,
  init,
  keep,
  Mamba,
  mambaConfig,
  matmul,
  memory,
  mul,
  narrow,
  neg,
  noGrad,
  randn,
  resetPeak,
  selectiveScan,
  setMemoryLimit,
  silu,
  softplus,
  sum,
  sync,
  type Tensor,
  tidy,
} from "../mod.ts";
import { fusedMambaScan } from "../advanced.ts";
import { add } from "../core/ops/index.ts";
import { fusedVariant, fusedVariantFor, setFusedVariant } from "../scan/fused_variant.ts";
import { setFusedStateSaving } from "../scan/fused_run.ts";
import { ensureFusedTuned } from "../scan/tune_fused.ts";
import { intFlag, parseCommandLine, UsageError } from "../examples/lib/cli.ts";
import { parseArgs } from "node:util";
import { resultPath, sourceVersion, writeJsonAtomic } from "./report_util.ts";

/** The training configurations compared: recompute keeping the chunk states (the default) or the block
 * input alone ("input"), no recompute, and mamba.py's pscan. */
export const MEMORY_MODES = [
  { name: "fused+recompute", scan: "fused", recompute: true },
  { name: "fused+recompute(input)", scan: "fused", recompute: "input" },
  { name: "fused", scan: "fused", recompute: false },
  { name: "pscan", scan: "pscan", recompute: false },
] as const;

/** Name of a training configuration. */
export type MemoryMode = (typeof MEMORY_MODES)[number]["name"];

/** What one training step of one configuration measured (bytes are exact, from the allocator). */
export interface StepMemory {
  /** Peak live bytes during forward + backward, minus the live bytes before the step. */
  peakBytes: number | null;
  /** Bytes autograd keeps for the backward, right after the forward. */
  savedBytes: number | null;
  /** Live bytes right after the forward, minus the live bytes before the step. */
  liveAfterForwardBytes: number | null;
  /** Wall time of the step including one wait (ms), for orientation only. */
  ms: number | null;
  /** The error, when the step failed (out of memory under the cap). */
  error?: string;
}

const MiB = 2 ** 20;
const GiB = 2 ** 30;

/** A one-layer Mamba with the given scan and recompute setting. */
export function makeLayer(dModel: number, N: number, mode: MemoryMode): Mamba {
  const m = MEMORY_MODES.find((x) => x.name === mode)!;
  return new Mamba(mambaConfig({ dModel, nLayers: 1, dState: N, scan: m.scan, recompute: m.recompute }));
}

/** Drops the parameters' gradients. */
export function zeroGrad(model: Mamba): void {
  for (const p of model.parameters()) {
    p.grad?.dispose();
    p.grad = null;
  }
}

/**
 * One training step (forward, then `y.backward(G)`; gradients stay in `.grad`) under a memory limit of
 * `capAbove` bytes above the live bytes before the step. Never throws: an error is returned.
 */
export async function measureStep(model: Mamba, x: Tensor, G: Tensor, capAbove: number): Promise<StepMemory> {
  await sync();
  const m0 = memory();
  resetPeak();
  let saved: number | null = null;
  let live: number | null = null;
  const t0 = performance.now();
  setMemoryLimit(m0.liveBytes + capAbove);
  try {
    tidy(() => {
      const y = model.forward(x);
      saved = memory().savedBytes - m0.savedBytes;
      live = memory().liveBytes - m0.liveBytes;
      y.backward(G);
    });
    await sync();
    const peakBytes = memory().peakBytes - m0.liveBytes;
    return { peakBytes, savedBytes: saved, liveAfterForwardBytes: live, ms: performance.now() - t0 };
  } catch (e) {
    await sync().catch(() => {});
    return {
      peakBytes: null,
      savedBytes: saved,
      liveAfterForwardBytes: live,
      ms: null,
      error: e instanceof Error ? e.message : String(e),
    };
  } finally {
    setMemoryLimit(null);
    zeroGrad(model);
  }
}

/** One training-step measurement of a fresh layer (input and cotangent seeded). */
export function layerCase(
  dModel: number,
  N: number,
  L: number,
  mode: MemoryMode,
  capAbove: number,
): Promise<StepMemory> {
  return modelCase(makeLayer(dModel, N, mode), L, capAbove);
}

/** One training step of a fused model of `nLayers` layers with recompute true or "input" (see `layerCase`):
 * over many layers the chunk states that recompute true keeps per layer add up, and "input"'s higher
 * one-layer peak does not. */
export function deepCase(
  dModel: number,
  N: number,
  L: number,
  nLayers: number,
  recompute: true | "input",
  capAbove: number,
): Promise<StepMemory> {
  const model = new Mamba(mambaConfig({ dModel, nLayers, dState: N, scan: "fused", recompute }));
  return modelCase(model, L, capAbove);
}

/** One training step of `model` on a seeded input and cotangent of L tokens; the model is disposed and the
 * pool emptied after, so that the next case starts from the same state. */
async function modelCase(model: Mamba, L: number, capAbove: number): Promise<StepMemory> {
  const dModel = model.config.dModel;
  const x = randn([1, L, dModel], { seed: 1 });
  const G = randn([1, L, dModel], { seed: 2 });
  try {
    return await measureStep(model, x, G, capAbove);
  } finally {
    model.dispose();
    x.dispose();
    G.dispose();
    emptyPool();
    await sync();
  }
}

/**
 * Bytes autograd saves for the scan alone with dt_proj, for the same leaves (x, dBC, W = dt_proj's weight,
 * bias, A_log, D, z): the fused op, or the pscan path (draw = dBC[..., :R] W^T, softplus(draw + bias),
 * -exp(A_log), `selectiveScan` in pscan mode, gate silu(z)).
 */
export async function scanSavedBytes(
  ED: number,
  N: number,
  L: number,
  R: number,
  path: "fused" | "pscan",
): Promise<number> {
  const leaves = tidy(() => {
    const r = (shape: number[], seed: number, std = 1) =>
      keep(randn(shape, { seed, std, requiresGrad: true }));
    return {
      x: r([1, L, ED], 1),
      W: r([ED, R], 2, 0.5),
      dBC: r([1, L, R + 2 * N], 3),
      bias: r([ED], 4, 0.5),
      A_log: r([ED, N], 5, 0.3),
      D: r([ED], 6),
      z: r([1, L, ED], 7),
    };
  });
  await sync();
  const before = memory().savedBytes;
  let saved = 0;
  try {
    tidy(() => {
      const t = leaves;
      if (path === "fused") {
        fusedMambaScan(t.x, t.dBC, t.W, t.bias, t.A_log, t.D, t.z);
      } else {
        const draw = matmul(narrow(t.dBC, 2, 0, R), t.W, { transB: true });
        const delta = softplus(add(draw, t.bias));
        const A = neg(exp(t.A_log));
        const Bm = narrow(t.dBC, 2, R, N);
        const C = narrow(t.dBC, 2, R + N, N);
        const { y } = selectiveScan(t.x, delta, A, Bm, C, t.D, "pscan");
        mul(y, silu(t.z));
      }
      saved = memory().savedBytes - before;
    });
  } finally {
    for (const t of Object.values(leaves)) t.dispose();
    emptyPool();
    await sync();
  }
  return saved;
}

/** Result of the "does not fit" demonstration. */
export interface DemoResult {
  /** Memory limit on all live bytes (including the parameters and the input). */
  limitBytes: number;
  dModel: number;
  N: number;
  L: number;
  /** The pscan step's error (null if it unexpectedly fitted). */
  pscanError: string | null;
  /** sum(y * G) of the fused + recompute steps, whose parameter gradients `y.backward(G)` gives (each step
   * followed by an SGD update, so it falls). */
  fusedLosses: number[];
  /** Peak live bytes (absolute) of the fused + recompute steps. */
  fusedPeakBytes: number;
}

/**
 * Under `setMemoryLimit(limitBytes)` (absolute), tries one pscan training step, then trains a fused +
 * recompute layer for `steps` steps: forward, `y.backward(G)`, p -= lr * grad with core ops under noGrad
 * (sum(y * G) is computed under noGrad after the backward, to show it falls).
 */
export async function doesNotFit(
  dModel: number,
  N: number,
  L: number,
  limitBytes: number,
  steps = 3,
  lr = 1e-3,
): Promise<DemoResult> {
  const x = randn([1, L, dModel], { seed: 1 });
  const G = randn([1, L, dModel], { seed: 2 });
  let pscanError: string | null = null;
  const losses: number[] = [];
  let fusedPeak = 0;
  try {
    const p = makeLayer(dModel, N, "pscan");
    await sync();
    resetPeak();
    setMemoryLimit(limitBytes);
    try {
      tidy(() => p.forward(x).backward(G));
      await sync();
    } catch (e) {
      pscanError = e instanceof Error ? e.message : String(e);
    } finally {
      setMemoryLimit(null);
      p.dispose();
      emptyPool();
      await sync();
    }

    const f = makeLayer(dModel, N, "fused+recompute");
    await sync();
    resetPeak();
    setMemoryLimit(limitBytes);
    try {
      for (let s = 0; s < steps; s++) {
        const loss = tidy(() => {
          const y = f.forward(x);
          y.backward(G);
          const l = noGrad(() => sum(mul(y, G)));
          noGrad(() => {
            const named = f.namedParameters();
            f.loadStateDict(new Map(named.map(([k, q]) => [k, q.sub(q.grad!.mul(lr))])));
          });
          zeroGrad(f);
          return l;
        });
        losses.push(await loss.item());
        loss.dispose();
      }
      fusedPeak = memory().peakBytes;
    } finally {
      setMemoryLimit(null);
      f.dispose();
      emptyPool();
      await sync();
    }
  } finally {
    x.dispose();
    G.dispose();
  }
  return { limitBytes, dModel, N, L, pscanError, fusedLosses: losses, fusedPeakBytes: fusedPeak };
}

// ------------------------------------------------------------------------------------------ report

const mib = (b: number | null) => (b === null ? "-" : (b / MiB).toFixed(2));
const ratio = (
  a: number | null,
  b: number | null,
) => (a === null || b === null || b === 0 ? "-" : (a / b).toFixed(1));

const USAGE = `Usage: deno run -A bench/scan_memory.ts [--quick] [--lc <steps>] [--states keep|recompute]

Memory of one Mamba layer's training step per scan mode (exact bytes from the runtime's allocator), the
bytes the scan alone saves, and the "does not fit" demonstration; prints markdown tables and writes
bench/results/scan_memory.json.

  --quick            L 1024 and 2048 only; writes bench/results/scan_memory_quick.json instead
  --lc <steps>       the fused variant with chunks of this many steps (1 to 128) walked in parallel (as
                     GPUs' tuners pick: 9 on the H200), states in private memory; writes no JSON
  --states <how>     the ops keep the chunk states ("keep") or save the parameters alone ("recompute")
                     wherever there are chunks to chain (default: the rule, recompute where N > 2 Lc);
                     writes no JSON
  --help             this text`;

if (import.meta.main) {
  const { values, lc } = parseCommandLine(USAGE, () => {
    const r = parseArgs({
      args: Deno.args,
      strict: true,
      options: {
        quick: { type: "boolean" },
        lc: { type: "string" },
        states: { type: "string" },
        help: { type: "boolean" },
      },
    });
    if (r.values.states !== undefined && !["keep", "recompute"].includes(r.values.states)) {
      throw new UsageError(`--states must be keep or recompute, got '${r.values.states}'`);
    }
    // private states: Lc x 16 floats of a state block per invocation, at most 2048 (setFusedVariant)
    return { ...r, lc: r.values.lc === undefined ? null : intFlag("lc", r.values.lc, 0, 1, 128) };
  });
  const quick = values.quick ?? false;
  const states = values.states as "keep" | "recompute" | undefined;
  await init();
  const dModel = 64;
  const ED = 2 * dModel;
  const R = Math.ceil(dModel / 16);
  const Ns = [16, 64];
  const Ls = quick ? [1024, 2048] : [1024, 2048, 4096, 8192, 16384];
  const cap = 8 * GiB;

  // the variants a trainer runs (it tunes each state size before its first step; init() tuned 16): on GPUs the
  // chunk length, and so the chunk states' bytes, is the tuner's choice
  for (const N of Ns) {
    await ensureFusedTuned(N);
    if (lc !== null) {
      const { Ls: _, hbuf: _h, Lf: _f, ...v } = fusedVariant(N); // the chunk length forced: one walk a chunk
      setFusedVariant(N, { ...v, Lc: lc, chunkParallel: true });
    }
    console.error(`fused variant, N ${N}: ${JSON.stringify(fusedVariant(N))}`);
  }
  if (states) setFusedStateSaving(states);

  const rows: { N: number; L: number; mode: MemoryMode; r: StepMemory }[] = [];
  for (const N of Ns) {
    for (const L of Ls) {
      for (const m of MEMORY_MODES) {
        const r = await layerCase(dModel, N, L, m.name, cap);
        rows.push({ N, L, mode: m.name, r });
        console.error(
          `N=${N} L=${L} ${m.name}: peak ${mib(r.peakBytes)} MiB, saved ${mib(r.savedBytes)} MiB` +
            (m.scan === "fused" ? ` (chunks of ${fusedVariantFor(N, 1, L, ED).Lc} steps)` : "") +
            (r.ms !== null ? `, ${r.ms.toFixed(0)} ms` : "") + (r.error ? `, ERROR ${r.error}` : ""),
        );
      }
    }
  }

  const scanRows: { N: number; L: number; fused: number; pscan: number }[] = [];
  for (const N of Ns) {
    for (const L of quick ? [1024] : [1024, 4096]) {
      const fused = await scanSavedBytes(ED, N, L, R, "fused");
      const pscan = await scanSavedBytes(ED, N, L, R, "pscan");
      scanRows.push({ N, L, fused, pscan });
    }
  }

  const demo = await doesNotFit(dModel, 64, 4096, 256 * MiB);

  const deepL = quick ? 1024 : 4096;
  const deep: { nLayers: number; recompute: true | "input"; r: StepMemory }[] = [];
  for (const nLayers of [8, 24]) {
    for (const recompute of [true, "input"] as const) {
      deep.push({ nLayers, recompute, r: await deepCase(dModel, 16, deepL, nLayers, recompute, cap) });
    }
  }

  const get = (N: number, L: number, mode: MemoryMode) =>
    rows.find((r) => r.N === N && r.L === L && r.mode === mode)!.r;
  const out: string[] = [];
  out.push(
    `Training-step memory of one Mamba layer on ${deviceInfo().description} (B = 1, d_model ${dModel}, ` +
      `ED ${ED}; forward, then y.backward(G) with a fixed cotangent G; exact bytes from the runtime's allocator, ` +
      `in MiB = 2^20 bytes; cap ${cap / GiB} GiB above the baseline per case)`,
    "",
  );
  for (const what of ["peakBytes", "savedBytes"] as const) {
    out.push(
      what === "peakBytes"
        ? "Peak live bytes of the step above the baseline (MiB):"
        : "Bytes saved for the backward, right after the forward (MiB):",
      "",
      "| N | L | fused+recompute | fused+recompute(input) | fused | pscan | pscan / fused | " +
        "pscan / fused+recompute | pscan / fused+recompute(input) |",
      "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    );
    for (const N of Ns) {
      for (const L of Ls) {
        const [a, i, b, c] = MEMORY_MODES.map((m) => get(N, L, m.name)[what]);
        out.push(
          `| ${N} | ${L} | ${mib(a)} | ${mib(i)} | ${mib(b)} | ${mib(c)} | ${ratio(c, b)} | ${
            ratio(c, a)
          } | ` +
            `${ratio(c, i)} |`,
        );
      }
    }
    out.push("");
  }
  const errors = rows.filter((r) => r.r.error);
  if (errors.length) {
    out.push("Failed cases:", "");
    for (const e of errors) out.push(`- N ${e.N}, L ${e.L}, ${e.mode}: ${e.r.error}`);
    out.push("");
  }
  out.push(
    "The scan alone (with dt_proj): bytes autograd saves for the backward, per token (B = 1), for the same leaves:",
    "",
    "| N | L | fused scan (B/token) | pscan path (B/token) | pscan / fused |",
    "|---:|---:|---:|---:|---:|",
  );
  for (const s of scanRows) {
    out.push(
      `| ${s.N} | ${s.L} | ${(s.fused / s.L).toFixed(0)} | ${(s.pscan / s.L).toFixed(0)} | ${
        (s.pscan / s.fused).toFixed(1)
      } |`,
    );
  }
  out.push(
    "",
    `Deep models (d_model ${dModel}, N 16, L ${deepL}), fused, recompute true (block input and chunk states) ` +
      `or "input" (block input alone):`,
    "",
    "| layers | recompute | peak (MiB) | saved (MiB) |",
    "|---:|---|---:|---:|",
    ...deep.map((d) => `| ${d.nLayers} | ${d.recompute} | ${mib(d.r.peakBytes)} | ${mib(d.r.savedBytes)} |`),
  );
  out.push(
    "",
    `Does not fit: d_model ${demo.dModel}, N ${demo.N}, L ${demo.L}, memory limit ${
      mib(demo.limitBytes)
    } MiB ` +
      `on all live bytes.`,
    `- pscan: ${demo.pscanError ? `fails: ${demo.pscanError}` : "fitted (no error)"}`,
    `- fused+recompute: trains, peak ${mib(demo.fusedPeakBytes)} MiB; sum(y*G) of successive SGD steps ` +
      `(lr 1e-3): ${demo.fusedLosses.map((l) => l.toFixed(3)).join(", ")}`,
  );
  console.log(out.join("\n"));

  // a forced variant or state saving is an experiment, not this adapter's result
  if (lc === null && !states) {
    const file = resultPath(quick ? "scan_memory_quick.json" : "scan_memory.json");
    await writeJsonAtomic(
      file,
      {
        adapter: deviceInfo().description,
        deno: Deno.version.deno,
        date: new Date().toISOString(),
        source: await sourceVersion(),
        quick,
        step: "forward, then y.backward(G)",
        fusedVariants: Ns.map((n) => fusedVariant(n)),
        B: 1,
        dModel,
        ED,
        capBytesAboveBaseline: cap,
        // each row's chunk length: the variant its call ran with (GPUs' tuners pick by problem)
        layer: rows.map((r) => ({
          N: r.N,
          L: r.L,
          mode: r.mode,
          ...(r.mode === "pscan" ? {} : { Lc: fusedVariantFor(r.N, 1, r.L, ED).Lc }),
          ...r.r,
        })),
        scanSavedBytes: scanRows.map((s) => ({
          ...s,
          fusedPerToken: s.fused / s.L,
          pscanPerToken: s.pscan / s.L,
          ratio: s.pscan / s.fused,
        })),
        doesNotFit: demo,
        deep: deep.map((d) => ({
          dModel,
          N: 16,
          L: deepL,
          nLayers: d.nLayers,
          recompute: d.recompute,
          ...d.r,
        })),
      },
      2,
    );
    console.error(`wrote ${file}`);
  }
}
