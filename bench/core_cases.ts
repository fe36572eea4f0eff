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
 * @module
 */

import {
  add,
  availableMatmulVariants,
  defineKernel,
  deviceInfo,
  full,
  matmulRaw,
  type MatmulVariant,
  rand,
  sync,
  type Tensor,
} from "../mod.ts";
import { recordCopy } from "../core/executor.ts";
import { dispatch } from "../core/kernel.ts";

/** How a case's rate is expressed. */
export type Unit = "GB/s" | "GFLOP/s" | "us/dispatch";

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
  /** Work of one op: bytes moved (GB/s), flops (GFLOP/s) or dispatches (us/dispatch). */
  work: number;
  /** Allocates the inputs; call after `init()`. */
  prepare: () => Prepared;
}

const ADD_ELEMS = 16 * 2 ** 20;
/** The matmul sizes n of the full set of cases. */
export const MATMUL_SIZES: readonly number[] = [256, 512, 1024];

/** All cases, in report order; `matmulSizes` narrows the matmul cases (the report's `--quick`). */
export function coreCases(matmulSizes: readonly number[] = MATMUL_SIZES): BenchCase[] {
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
  const perSecond = (c.work * reps) / (net / 1000);
  return perSecond / 1e9;
}

/** The adapter as reports name it. */
export function adapterLabel(): string {
  const i = deviceInfo();
  return `${i.description}${i.isFallbackAdapter ? " (software adapter)" : ""}, subgroup ${i.subgroupMaxSize}`;
}
