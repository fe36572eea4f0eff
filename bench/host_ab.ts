/**
 * Host time of two checkouts of mamba.ts side by side in one process: both runtimes are loaded (each its own
 * device), and their steps alternate, so that the machine's drift, which moves separate processes as much
 * as a change does, hits both alike. Each rep waits for both devices (on a software adapter the other side's
 * work would otherwise still run on the cores this side records on), records one step (not counted: the first
 * after a wait pays for the submission before it), then k more steps and one submit, and gives ms per step,
 * as `hostMs` in bench/scan_report.ts; the order of the two alternates between reps. Prints the medians, the
 * quartiles and the 10th percentiles, and B / A. With `--wall`, each rep times the k steps and the wait that
 * ends them: the whole step's time on a software adapter, whose kernels run on the CPU.
 *
 *   deno run -A bench/host_ab.ts <checkout A> <checkout B> [--case fused|recompute|pscan|decode]
 *     [--dmodel 16] [--dstate 16] [--reps 60] [--gpu-path] [--wall] [--storage-buffers N]
 *
 * A checkout is a folder holding this repository (e.g. `git worktree add /tmp/base <commit>`). `fused` and
 * `pscan` time a training step of one Mamba layer (batch 1, L 1024, recompute off, parameter gradients
 * dropped after each step), `recompute` the fused one with recompute on; `decode` times a token of an 8-layer model of mamba-130m's width (vocabulary 256,
 * so that the head does not dominate a software adapter). `--gpu-path` takes the adapter for a GPU
 * (`isFallbackAdapter` off), so that the code paths a GPU takes run here (their kernels on this adapter).
 * `--storage-buffers N` lowers the storage buffers per shader stage that the runtimes see to N (10: what
 * Chrome exposes), so that the code paths a browser takes run here.
 */
import { pathToFileURL } from "node:url";
import { parseArgs } from "node:util";
import { intFlag, parseCommandLine } from "../examples/lib/cli.ts";
import { median } from "./report_util.ts";

const USAGE = `Usage: deno run -A bench/host_ab.ts <checkout A> <checkout B> [options]

  --case <name>  fused (default), recompute (fused, recompute on), pscan or decode
  --dmodel <n>   d_model of the layer (fused, pscan; default 16)
  --dstate <n>   d_state (default 16)
  --reps <n>     alternating reps (default 60)
  --gpu-path     take the adapter for a GPU (isFallbackAdapter off)
  --wall         time the steps and the wait that ends them (wall time), not the host's recording alone
  --storage-buffers <n>  storage buffers per shader stage the runtimes see (10: Chrome's; default the adapter's)
  --help         this text`;

const { values, positionals, reps, dModel, dState, storageBuffers } = parseCommandLine(USAGE, () => {
  const r = parseArgs({
    args: Deno.args,
    strict: true,
    allowPositionals: true,
    options: {
      case: { type: "string", default: "fused" },
      dmodel: { type: "string" },
      dstate: { type: "string" },
      reps: { type: "string" },
      "gpu-path": { type: "boolean" },
      wall: { type: "boolean" },
      "storage-buffers": { type: "string" },
      help: { type: "boolean" },
    },
  });
  if (!r.values.help && r.positionals.length !== 2) throw new Error("two checkouts are needed, A and B");
  if (!["fused", "recompute", "pscan", "decode"].includes(r.values.case!)) {
    throw new Error(`--case must be fused, recompute, pscan or decode, got '${r.values.case}'`);
  }
  return {
    ...r,
    reps: intFlag("reps", r.values.reps, 60, 1, 10000),
    dModel: intFlag("dmodel", r.values.dmodel, 16, 1, 4096),
    dState: intFlag("dstate", r.values.dstate, 16, 1, 256),
    storageBuffers: r.values["storage-buffers"] === undefined
      ? null
      : intFlag("storage-buffers", r.values["storage-buffers"], 10, 8, 1000),
  };
});

/** One runtime, ready to step. */
interface Side {
  step(): void;
  flush(): void;
  sync(): Promise<void>;
  /** Dispatches one step records, and the most one submit holds. */
  perStep: number;
  perSubmit: number;
}

async function load(root: string): Promise<Side> {
  const url = (path: string) => new URL(path, pathToFileURL(`${Deno.realPathSync(root)}/`)).href;
  const dev = await import(url("core/device.ts"));
  await dev.init();
  if (values["gpu-path"]) dev.deviceInfo().isFallbackAdapter = false;
  const limits = dev.deviceInfo().limits;
  if (storageBuffers !== null) {
    if (storageBuffers > limits.maxStorageBuffersPerShaderStage) {
      throw new Error(
        `--storage-buffers ${storageBuffers}: the adapter has ${limits.maxStorageBuffersPerShaderStage}`,
      );
    }
    limits.maxStorageBuffersPerShaderStage = storageBuffers;
  }
  const ex = await import(url("core/executor.ts"));
  const { tidy, noGrad, dispose } = await import(url("mod.ts"));
  const { mambaConfig } = await import(url("mamba/config.ts"));
  const { randn, tensor } = await import(url("core/creation.ts"));
  let step: () => void;
  if (values.case === "decode") {
    const { MambaLM } = await import(url("mamba/lm.ts"));
    const lm = new MambaLM(mambaConfig({ dModel: 768, nLayers: 8, dState }), { vocabSize: 256 });
    let caches = lm.emptyCache(1);
    const ids = tensor(new Int32Array([1]), [1]);
    step = () => {
      const prev = caches;
      const r = tidy(() => noGrad(() => lm.step(ids, prev)));
      r.logits.dispose();
      dispose(prev);
      caches = r.caches;
    };
  } else {
    const { Mamba } = await import(url("mamba/block.ts"));
    // built here rather than by each checkout's bench/scan_report.ts prepareLayer, whose step may differ
    // between checkouts (before 86dde86 it walked the modules every step)
    const recompute = values.case === "recompute";
    const config = { dModel, nLayers: 1, dState, scan: recompute ? "fused" : values.case, recompute };
    const model = new Mamba(mambaConfig(config));
    const x = randn([1, 1024, dModel], { seed: 1 });
    const G = randn([1, 1024, dModel], { seed: 2 });
    const params = model.parameters();
    step = () => {
      tidy(() => model.forward(x).backward(G));
      for (const p of params) {
        p.grad?.dispose();
        p.grad = null;
      }
    };
  }
  for (let i = 0; i < 3; i++) { // compiles, fills the pool and the caches
    step();
    await ex.sync();
  }
  const d0 = ex.dispatchCount();
  step();
  const perStep = Math.max(1, ex.dispatchCount() - d0);
  await ex.sync();
  return { step, flush: ex.flush, sync: ex.sync, perStep, perSubmit: ex.MAX_DISPATCHES_PER_SUBMIT };
}

const sides = [await load(positionals[0]), await load(positionals[1])];
// the first step and k more in one submit (a second submit would wait for the first on a software adapter)
const k = Math.max(
  1,
  Math.min(16, ...sides.map((s) => Math.floor((s.perSubmit - 1) / s.perStep) - 1)),
);
const times: number[][] = [[], []];
for (let r = 0; r < reps; r++) {
  for (const i of r % 2 ? [1, 0] : [0, 1]) {
    const s = sides[i];
    // both devices idle: on a software adapter the other side's last submit would otherwise still run on the
    // cores this side records on (and the two sides' GPU work differs)
    await Promise.all(sides.map((x) => x.sync()));
    if (!values.wall) s.step(); // host time: not the first step after a wait (wall time counts each wait once)
    const t0 = performance.now();
    for (let j = 0; j < k; j++) s.step();
    if (values.wall) await s.sync();
    else s.flush();
    times[i].push((performance.now() - t0) / k);
  }
}
const q = (v: number[], f: number) => [...v].sort((a, b) => a - b)[Math.floor((v.length - 1) * f)];
const row = (v: number[]) =>
  `${median(v).toFixed(3)} ms [${q(v, 0.25).toFixed(3)}-${q(v, 0.75).toFixed(3)}], p10 ${
    q(v, 0.1).toFixed(3)
  }`;
const what = values.case === "decode"
  ? `decode token (8 layers, d_model 768, N ${dState})`
  : `${values.case} layer step (d_model ${dModel}, N ${dState}, L 1024)`;
console.log(
  `${what}, ${k} steps per batch, ${reps} reps${values["gpu-path"] ? ", GPU path" : ""}${
    storageBuffers !== null ? `, ${storageBuffers} storage buffers` : ""
  }${values.wall ? ", wall time (the wait included)" : ""}`,
);
console.log(`A ${positionals[0]}: ${row(times[0])}, ${sides[0].perStep} dispatches per step`);
console.log(`B ${positionals[1]}: ${row(times[1])}, ${sides[1].perStep} dispatches per step`);
console.log(
  `B / A: median ${(median(times[1]) / median(times[0])).toFixed(3)}, p10 ${
    (q(times[1], 0.1) / q(times[0], 0.1)).toFixed(3)
  }`,
);
await Promise.all(sides.map((s) => s.sync()));
