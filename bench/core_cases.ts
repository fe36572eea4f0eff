/**
 * The core runtime's benchmark cases, shared by `core_bench.ts` (`deno bench`) and `core_report.ts` (a
 * markdown table and bench/results/core.json).
 *
 * Every case records many GPU operations between two waits (a wait costs >= 11 ms in Deno), so the
 * numbers are throughput of the recorded work, not of the wait:
 * - elementwise: `add` of two 16M-float tensors (64 MiB each) against `copyBufferToBuffer` of one 64 MiB
 *   buffer in the same run; both in GB/s of bytes read plus bytes written (add: 3 x 64 MiB, copy:
 *   2 x 64 MiB).
 * - matmul: n x n x n for n = 256, 512, 1024 and each variant, in GFLOP/s (2 n^3 per product).
 * - dispatch: microseconds per tiny dispatch: a one-invocation kernel on fixed buffers (the executor's own
 *   cost: bind group, uniforms, recording) and an `add` of one-element tensors (plus the op's allocation).
 * - embedding gradient: milliseconds per `embedding` forward + backward into a (V, 64) table, V = 65 (the
 *   char model) and 50280 (GPT-NeoX's vocabulary, the pretrained Mambas'), against the path that computed
 *   it before 2026-11-29 (see embeddingCases).
 * @module
 */

import { add, deviceInfo, embedding, full, gather, rand, sync, type Tensor, tensor } from "../mod.ts";
import { availableMatmulVariants, defineKernel, matmulRaw, type MatmulVariant } from "../advanced.ts";
import { recordCopy } from "../core/executor.ts";
import { dispatch } from "../core/kernel.ts";

/** How a case's rate is expressed. */
export type Unit = "GB/s" | "GFLOP/s" | "us/dispatch" | "ms/op";

/** A prepared case: `op` records one operation (no wait); `dispose` frees its buffers. */
export interface Prepared {
  op: () => void;
  dispose: () => void;
}

/** One benchmark case. */
export interface BenchCase {
  /** Group (elementwise, matmul, dispatch). */
  group: string;
  /** Matrix size n of a matmul case (n x n x n). */
  size?: number;
  /** Name, unique within the file. */
  name: string;
  /** Unit of the reported rate. */
  unit: Unit;
  /** Work of one op: bytes moved (GB/s), flops (GFLOP/s), dispatches (us/dispatch) or 1 (ms/op). */
  work: number;
  /** Allocates the inputs; call after `init()`. */
  prepare: () => Prepared;
}

const ADD_ELEMS = 16 * 2 ** 20;
/** The matmul sizes n of the full set of cases. */
export const MATMUL_SIZES: readonly number[] = [256, 512, 1024];

/** The vocabulary sizes of the full set of embedding-gradient cases. */
export const EMBEDDING_VOCABS: readonly number[] = [65, 50280];

/** All cases, in report order; `matmulSizes` and `vocabs` narrow the matmul and embedding cases (the report's
 * `--quick`). */
export function coreCases(
  matmulSizes: readonly number[] = MATMUL_SIZES,
  vocabs: readonly number[] = EMBEDDING_VOCABS,
): BenchCase[] {
  const cases: BenchCase[] = [
    {
      group: "elementwise",
      name: "add 16M f32",
      unit: "GB/s",
      work: 3 * 4 * ADD_ELEMS,
      prepare: () => {
        const a = full([ADD_ELEMS], 1), b = full([ADD_ELEMS], 2);
        return { op: () => add(a, b).dispose(), dispose: () => disposeAll(a, b) };
      },
    },
    {
      group: "elementwise",
      name: "copyBufferToBuffer 64 MiB",
      unit: "GB/s",
      work: 2 * 4 * ADD_ELEMS,
      prepare: () => {
        const a = full([ADD_ELEMS], 1), b = full([ADD_ELEMS], 0);
        return {
          op: () => recordCopy(a.storage.buffer, 0, b.storage.buffer, 0, 4 * ADD_ELEMS),
          dispose: () => disposeAll(a, b),
        };
      },
    },
  ];
  for (const v of availableMatmulVariants()) {
    for (const n of matmulSizes) cases.push(matmulCase(v, n));
  }
  cases.push(
    {
      group: "dispatch",
      name: "tiny kernel dispatch",
      unit: "us/dispatch",
      work: 1,
      prepare: () => {
        const x = full([1], 0);
        const k = tinyKernel();
        return { op: () => dispatch(k, { x: x.storage }, {}, 1), dispose: () => x.dispose() };
      },
    },
    {
      group: "dispatch",
      name: "add of 1-element tensors",
      unit: "us/dispatch",
      work: 1,
      prepare: () => {
        const a = full([1], 1), b = full([1], 2);
        return { op: () => add(a, b).dispose(), dispose: () => disposeAll(a, b) };
      },
    },
  );
  for (const V of vocabs) cases.push(...embeddingCases(V));
  return cases;
}

/**
 * The embedding gradient (D = 64) against the path that computed it before 2026-11-29, for a vocabulary V:
 * up to J x V = 2^24 the one-hot product onehot(ids)^T @ g (V 65, J 2048: the char model; timed alone, a
 * lower bound of that path, which also built the one-hot matrix and ran the gather forward), above it a
 * scatter kernel in which each gradient element scanned all J positions, as `gather`'s backward still does
 * (V 50280, GPT-NeoX's vocabulary of the pretrained Mambas, with J 512: J V D = 1.6e9 loop steps).
 */
function embeddingCases(V: number): BenchCase[] {
  const D = 64;
  const J = V <= 4096 ? 2048 : 512;
  const group = `embedding grad V ${V}`;
  let seed = 7;
  const idArray = Int32Array.from(
    { length: J },
    () => (seed = (Math.imul(seed, 1103515245) + 12345) >>> 0) % V,
  );
  const forwardBackward = (w: Tensor, ids: Tensor, g: Tensor, lookup: (w: Tensor, ids: Tensor) => Tensor) => {
    const y = lookup(w, ids);
    y.backward(g);
    w.grad!.dispose();
    w.grad = null;
    y.dispose();
  };
  const cases: BenchCase[] = [{
    group,
    name: `embedding fwd+bwd V ${V}, J ${J}, D ${D}`,
    unit: "ms/op",
    work: 1,
    prepare: () => {
      const ids = tensor(idArray, [J], { dtype: "i32" }), g = rand([J, D], { seed: 4 });
      const w = rand([V, D], { seed: 5 }).requiresGrad_(true);
      return { op: () => forwardBackward(w, ids, g, embedding), dispose: () => disposeAll(ids, g, w) };
    },
  }];
  if (J * V <= 2 ** 24) {
    cases.push({
      group,
      name: `one-hot matmul alone V ${V} (before: without its one-hot kernel, forward, autograd)`,
      unit: "ms/op",
      work: 1,
      prepare: () => {
        const onehot = new Float32Array(J * V);
        idArray.forEach((v, j) => onehot[j * V + v] = 1);
        const a = tensor(onehot, [J, V]), g = rand([J, D], { seed: 4 });
        return { op: () => matmulRaw(a, g, { transA: true }).dispose(), dispose: () => disposeAll(a, g) };
      },
    });
  } else {
    cases.push({
      group,
      name: `gather fwd+bwd V ${V} (before: scans all positions)`,
      unit: "ms/op",
      work: 1,
      prepare: () => {
        const wide = Int32Array.from({ length: J * D }, (_, i) => idArray[Math.floor(i / D)]); // ids[j] in each column
        const ids = tensor(wide, [J, D], { dtype: "i32" }), g = rand([J, D], { seed: 4 });
        const w = rand([V, D], { seed: 5 }).requiresGrad_(true);
        const op = () => forwardBackward(w, ids, g, (w, ids) => gather(w, 0, ids));
        return { op, dispose: () => disposeAll(ids, g, w) };
      },
    });
  }
  return cases;
}

function matmulCase(variant: MatmulVariant, n: number): BenchCase {
  return {
    group: "matmul",
    size: n,
    name: `matmul ${n}^3 ${variant}`,
    unit: "GFLOP/s",
    work: 2 * n ** 3,
    prepare: () => {
      const a = rand([n, n], { seed: 1 }), b = rand([n, n], { seed: 2 });
      return { op: () => matmulRaw(a, b, {}, variant).dispose(), dispose: () => disposeAll(a, b) };
    },
  };
}

let tiny: ReturnType<typeof defineKernel> | null = null;
function tinyKernel() {
  tiny ??= defineKernel({
    name: "bench_tiny",
    buffers: [{ name: "x", type: "f32", access: "read_write" }],
    uniforms: [],
    workgroupSize: 1,
    body: "  st_x(0u, ld_x(0u) + 1.0);",
  });
  return tiny;
}

function disposeAll(...ts: Tensor[]) {
  for (const t of ts) t.dispose();
}

/** Milliseconds of `reps` ops recorded back to back and one wait. */
export async function timeBatch(p: Prepared, reps: number): Promise<number> {
  const t0 = performance.now();
  for (let i = 0; i < reps; i++) p.op();
  await sync();
  return performance.now() - t0;
}

/**
 * Ops per wait so that one batch lasts about `targetMs` (at least 1, at most 2000): one untimed op first
 * (pipeline compilation), then batches that grow until one lasts `targetMs / 4`.
 */
export async function calibrate(p: Prepared, targetMs = 150): Promise<number> {
  await timeBatch(p, 1);
  let reps = 1;
  for (;;) {
    const t = await timeBatch(p, reps);
    if (t >= targetMs / 4 || reps >= 2000) {
      return Math.min(2000, Math.max(1, Math.round(reps * targetMs / t)));
    }
    reps *= 4;
  }
}

/** A rate in the case's unit from a batch of `reps` ops that took `ms` (the wait's cost subtracted). */
export function rate(c: BenchCase, reps: number, ms: number, waitMs: number): number {
  const net = Math.max(ms - waitMs, ms * 0.05);
  if (c.unit === "us/dispatch") return (net * 1000) / (reps * c.work);
  if (c.unit === "ms/op") return net / (reps * c.work);
  const perSecond = (c.work * reps) / (net / 1000);
  return perSecond / 1e9;
}

/** The adapter as reports name it. */
export function adapterLabel(): string {
  const i = deviceInfo();
  return `${i.description}${i.isFallbackAdapter ? " (software adapter)" : ""}, subgroup ${i.subgroupMaxSize}`;
}
