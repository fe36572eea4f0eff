/**
 * Test helpers for the core runtime: one-time GPU setup, a small float64 reference library in plain
 * TypeScript (the oracle every op is checked against), `assertClose` with a message that names the worst
 * element, and a gradient checker that compares the runtime's `.grad` with central finite differences of
 * the float64 reference (or with an analytic float64 gradient).
 *
 * Readbacks cost ~11 ms each on software adapters but overlap when awaited together, so `checkOps` runs
 * the GPU side of many cases first and reads everything back in one `Promise.all`.
 * @module
 */

import { AssertionError } from "node:assert/strict";
import { init, mul, sum, type Tensor, tensor, tidy } from "../mod.ts";
import { deviceInfo } from "../core/device.ts";
import { memory, setMemoryLimit } from "../core/memory.ts";
import { matmulGpuSplit, matmulMatvec, setMatmulGpuSplit, setMatmulMatvec } from "../core/ops/matmul.ts";
import { fusedScanAvailable } from "../mamba/block.ts";

// ------------------------------------------------------------------------------------------ setup

let ready: Promise<unknown> | null = null;

/** Acquires the WebGPU device once per test module. */
export function setup(): Promise<unknown> {
  ready ??= init();
  return ready;
}

/** Reads many tensors back at once (their waits overlap: one ~11 ms wait instead of one per tensor). */
export function readAll(ts: readonly Tensor[]): Promise<(Float32Array | Int32Array)[]> {
  return Promise.all(ts.map((t) => t.toArray()));
}

/**
 * Runs `run` under memory caps rising from the bytes live now (`setMemoryLimit`) by `step` from `step * first`
 * until it fits. Every failure must be out of memory; `afterFailure(room)` then checks what it left (room: the
 * cap's bytes above the live ones). Returns what the run that fit returned and how many failed before it.
 */
export async function underRisingCaps<T>(
  run: () => T | Promise<T>,
  step: number,
  afterFailure: (room: number) => void | Promise<void> = () => {},
  first = 0,
): Promise<{ result: T; failed: number }> {
  const live = memory().liveBytes;
  for (let room = step * first, failed = 0;; room += step) {
    setMemoryLimit(live + room);
    try {
      return { result: await run(), failed };
    } catch (e) {
      if (!/out of memory/.test((e as Error).message)) throw e;
    } finally {
      setMemoryLimit(null);
    }
    failed++;
    await afterFailure(room);
  }
}

// ------------------------------------------------------------------------------------------ environment

/** A test's environment variable, or undefined where it is unset or the test runs without --allow-env. */
export function env(name: string): string | undefined {
  try {
    return Deno.env.get(name);
  } catch {
    return undefined; // no --allow-env: the defaults
  }
}

/** A non-negative integer from the environment, `fallback` where unset or empty; anything else is an error
 * that names the variable. */
export function intEnv(name: string, fallback: number): number {
  const s = env(name);
  if (s === undefined || s === "") return fallback;
  if (!/^[0-9]+$/.test(s)) {
    throw new Error(`${name} must be a non-negative integer, got ${JSON.stringify(s)}`);
  }
  return Number(s);
}

/** The cases a fuzz test runs: 0 .. count - 1, or the one case the variable `name` names (to rerun one). */
export function caseIndices(name: string, count: number): number[] {
  const only = env(name);
  return only === undefined || only === "" ? Array.from({ length: count }, (_, i) => i) : [intEnv(name, 0)];
}

// ------------------------------------------------------------------------------------------ random data

/** A 32-bit hash of integers (FNV-1a style with a final mix): seeds derived from (seed, case, ...). */
export function hash(...xs: number[]): number {
  let h = 0x811c9dc5;
  for (const x of xs) {
    h = Math.imul(h ^ (x >>> 0), 0x01000193) >>> 0;
    h = Math.imul(h ^ (h >>> 15), 0x2c1b3c6d) >>> 0;
  }
  return h;
}

/** Value i of a fuzz dimension, stratified: round floor(i / n) of its n values shuffled by (seed, dimension,
 * round), so every value occurs within each n consecutive cases. */
export function stratified<T>(values: readonly T[], seed: number, dim: number, i: number): T {
  const n = values.length;
  const r = rng(hash(seed, dim, Math.floor(i / n)));
  const order = values.map((_, k) => k);
  for (let k = n - 1; k > 0; k--) {
    const j = Math.floor(r() * (k + 1));
    [order[k], order[j]] = [order[j], order[k]];
  }
  return values[order[i % n]];
}

/** A seeded uniform generator in [0, 1) (mulberry32). */
export function rng(seed: number): () => number {
  let s = (seed * 0x9e3779b1 + 0x6d2b79f5) >>> 0;
  return () => {
    s = (s + 0x6d2b79f5) >>> 0;
    let t = s;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

/** Options of {@linkcode uniform}. */
export interface UniformOptions {
  low?: number;
  high?: number;
  /** Keep every value at least `margin` away from each of these points (kinks, ties, bounds). */
  avoid?: number[];
  margin?: number;
}

/** `n` uniform values in [low, high), each exactly representable in f32 (so GPU and reference agree). */
export function uniform(n: number, seed: number, options: UniformOptions = {}): Float64Array {
  const { low = -1, high = 1, avoid = [], margin = 0.05 } = options;
  const r = rng(seed);
  const out = new Float64Array(n);
  for (let i = 0; i < n; i++) {
    let v: number;
    do v = Math.fround(low + (high - low) * r()); while (avoid.some((p) => Math.abs(v - p) < margin));
    out[i] = v;
  }
  return out;
}

/** `n` random integers in [low, high]. */
export function randInts(n: number, seed: number, low: number, high: number): Float64Array {
  const r = rng(seed);
  return Float64Array.from({ length: n }, () => low + Math.floor(r() * (high - low + 1)));
}

// ------------------------------------------------------------------------------------------ float64 arrays

/** A float64 n-d array of the reference library (row-major). `dtype` marks integer data (indices). */
export interface Nd {
  readonly data: Float64Array;
  readonly shape: readonly number[];
  readonly dtype?: "f32" | "i32";
}

/** Number of elements of a shape. */
export function sizeOf(shape: readonly number[]): number {
  return shape.reduce((a, b) => a * b, 1);
}

/** Row-major strides. */
export function stridesOf(shape: readonly number[]): number[] {
  const s = new Array<number>(shape.length);
  let acc = 1;
  for (let i = shape.length - 1; i >= 0; i--) {
    s[i] = acc;
    acc *= shape[i];
  }
  return s;
}

/** An f32-valued reference array (values are rounded to f32, so the GPU sees exactly the same inputs). */
export function nd(data: ArrayLike<number>, shape: readonly number[]): Nd {
  if (data.length !== sizeOf(shape)) throw new Error(`nd: ${data.length} values for shape [${shape}]`);
  return { data: Float64Array.from(data, Math.fround), shape: [...shape] };
}

/** An integer-valued reference array (becomes an i32 tensor). */
export function ndInt(data: ArrayLike<number>, shape: readonly number[]): Nd {
  if (data.length !== sizeOf(shape)) throw new Error(`ndInt: ${data.length} values for shape [${shape}]`);
  return { data: Float64Array.from(data), shape: [...shape], dtype: "i32" };
}

/** Uniform random f32-exact reference array. */
export function rand(shape: readonly number[], seed: number, options: UniformOptions = {}): Nd {
  return nd(uniform(sizeOf(shape), seed, options), shape);
}

/** The GPU tensor holding the same values as a reference array. */
export function toTensor(x: Nd, requiresGrad = false): Tensor {
  return x.dtype === "i32"
    ? tensor(Int32Array.from(x.data), x.shape, { dtype: "i32" })
    : tensor(Float32Array.from(x.data), x.shape, { requiresGrad });
}

/** NumPy broadcasting of shapes (throws on mismatch). */
export function broadcastShape(...shapes: (readonly number[])[]): number[] {
  const n = Math.max(0, ...shapes.map((s) => s.length));
  const out = new Array<number>(n).fill(1);
  for (const s of shapes) {
    for (let i = 0; i < s.length; i++) {
      const j = n - s.length + i;
      if (s[i] === out[j] || s[i] === 1) continue;
      if (out[j] !== 1) throw new Error(`reference: cannot broadcast [${shapes.join("] [")}]`);
      out[j] = s[i];
    }
  }
  return out;
}

/** Calls `fn(index, coord)` for every element of `shape` in row-major order. */
export function forEachCoord(shape: readonly number[], fn: (i: number, coord: number[]) => void): void {
  const n = sizeOf(shape);
  const coord = new Array<number>(shape.length).fill(0);
  for (let i = 0; i < n; i++) {
    fn(i, coord);
    for (let d = shape.length - 1; d >= 0; d--) {
      if (++coord[d] < shape[d]) break;
      coord[d] = 0;
    }
  }
}

/** Elementwise `f` over operands broadcast together (NumPy rules); numbers are scalars. */
export function mapN(
  xs: readonly (Nd | number)[],
  f: (...v: number[]) => number,
  outShape?: readonly number[],
): Nd {
  const shapes = xs.map((x) => typeof x === "number" ? [] : x.shape);
  const shape = outShape ?? broadcastShape(...shapes);
  if (outShape) {
    // every operand must broadcast to outShape itself (not truncate to it, nor read past its end)
    const b = broadcastShape(...shapes, outShape);
    if (b.length !== outShape.length || b.join() !== outShape.join()) {
      throw new Error(`reference: [${shapes.join("] [")}] does not broadcast to [${outShape.join(", ")}]`);
    }
  }
  const strides = xs.map((x) => {
    if (typeof x === "number") return [];
    const st = stridesOf(x.shape);
    const off = shape.length - x.shape.length;
    return shape.map((_, d) => (d < off || x.shape[d - off] === 1 ? 0 : st[d - off]));
  });
  const out = new Float64Array(sizeOf(shape));
  const vals = new Array<number>(xs.length);
  forEachCoord(shape, (i, c) => {
    xs.forEach((x, j) => {
      if (typeof x === "number") vals[j] = x;
      else {
        let at = 0;
        for (let d = 0; d < c.length; d++) at += c[d] * strides[j][d];
        vals[j] = x.data[at];
      }
    });
    out[i] = f(...vals);
  });
  return { data: out, shape };
}

/** Unary map. */
export function map1(x: Nd, f: (v: number) => number): Nd {
  return { data: x.data.map(f), shape: x.shape };
}

/** Binary map with broadcasting. */
export function map2(a: Nd | number, b: Nd | number, f: (a: number, b: number) => number): Nd {
  return mapN([a, b], f);
}

/** Broadcast to a shape (the reference of `expand`). */
export function expandRef(x: Nd, shape: readonly number[]): Nd {
  return mapN([x], (v) => v, shape);
}

/** Normalises an axis list (undefined = all axes). */
function axesOf(rank: number, axis?: number | readonly number[]): number[] {
  const list = axis === undefined ? [...Array(rank).keys()] : typeof axis === "number" ? [axis] : [...axis];
  return list.map((a) => (a < 0 ? a + rank : a));
}

/** Reduces the lines over `axis` with `f` (each call gets the values of one output element). */
export function reduceRef(
  x: Nd,
  axis: number | readonly number[] | undefined,
  keepdim: boolean,
  f: (values: number[]) => number,
): Nd {
  const axes = axesOf(x.shape.length, axis);
  const kept = x.shape.map((d, i) => (axes.includes(i) ? 1 : d));
  const ks = stridesOf(kept);
  const groups: number[][] = Array.from({ length: sizeOf(kept) }, () => []);
  forEachCoord(x.shape, (i, c) => {
    let o = 0;
    for (let d = 0; d < c.length; d++) if (!axes.includes(d)) o += c[d] * ks[d];
    groups[o].push(x.data[i]);
  });
  const data = Float64Array.from(groups, f);
  return { data, shape: keepdim ? kept : x.shape.filter((_, i) => !axes.includes(i)) };
}

const fsum = (v: number[]) => v.reduce((a, b) => a + b, 0);
const fmax = (v: number[]) => v.reduce((a, b) => Math.max(a, b), -Infinity);
const flse = (v: number[]) => {
  const m = fmax(v);
  return m + Math.log(v.reduce((a, b) => a + Math.exp(b - m), 0));
};

/** Float64 reductions by name. */
export const REDUCE = {
  sum: fsum,
  mean: (v: number[]) => fsum(v) / v.length,
  max: fmax,
  logsumexp: flse,
};

/** Applies `f` to every line along `axis` (same shape out). */
export function alongAxis(x: Nd, axis: number, f: (line: Float64Array) => Float64Array): Nd {
  const a = axis < 0 ? axis + x.shape.length : axis;
  const R = x.shape[a];
  const inner = sizeOf(x.shape.slice(a + 1));
  const outer = sizeOf(x.shape.slice(0, a));
  const out = new Float64Array(x.data.length);
  const line = new Float64Array(R);
  for (let o = 0; o < outer; o++) {
    for (let i = 0; i < inner; i++) {
      for (let r = 0; r < R; r++) line[r] = x.data[(o * R + r) * inner + i];
      const y = f(line);
      for (let r = 0; r < R; r++) out[(o * R + r) * inner + i] = y[r];
    }
  }
  return { data: out, shape: x.shape };
}

/** Float64 log-softmax along an axis. */
export function logSoftmaxRef(x: Nd, axis = -1): Nd {
  return alongAxis(x, axis, (line) => {
    const l = flse([...line]);
    return line.map((v) => v - l);
  });
}

/** Float64 softmax along an axis. */
export function softmaxRef(x: Nd, axis = -1): Nd {
  return map1(logSoftmaxRef(x, axis), Math.exp);
}

/** Float64 cross-entropy with PyTorch's semantics (targets equal to `ignoreIndex` are skipped). */
export function crossEntropyRef(
  logits: Nd,
  target: Nd,
  options: { ignoreIndex?: number; reduction?: "mean" | "sum" | "none" } = {},
): Nd {
  const { ignoreIndex = -100, reduction = "mean" } = options;
  const V = logits.shape[logits.shape.length - 1];
  const ls = logSoftmaxRef(logits, -1);
  const losses = new Float64Array(target.data.length);
  let count = 0;
  target.data.forEach((t, r) => {
    if (t === ignoreIndex) return;
    losses[r] = -ls.data[r * V + t];
    count++;
  });
  if (reduction === "none") return { data: losses, shape: target.shape };
  const total = losses.reduce((a, b) => a + b, 0);
  return { data: Float64Array.of(reduction === "sum" ? total : total / count), shape: [] };
}

/**
 * Float64 matrix product with PyTorch's rules: batch dims broadcast, 1-D operands are a row (a) or a
 * column (b) whose dim is dropped; `transA`/`transB` transpose the last two dims of 2-D+ operands.
 */
export function matmulRef(a: Nd, b: Nd, options: { transA?: boolean; transB?: boolean } = {}): Nd {
  const a2 = a.shape.length === 1 ? { ...a, shape: [1, a.shape[0]] } : a;
  const b2 = b.shape.length === 1 ? { ...b, shape: [b.shape[0], 1] } : b;
  const tA = a.shape.length > 1 && !!options.transA;
  const tB = b.shape.length > 1 && !!options.transB;
  const ra = a2.shape.length, rb = b2.shape.length;
  const [M, K] = tA ? [a2.shape[ra - 1], a2.shape[ra - 2]] : [a2.shape[ra - 2], a2.shape[ra - 1]];
  const [K2, N] = tB ? [b2.shape[rb - 1], b2.shape[rb - 2]] : [b2.shape[rb - 2], b2.shape[rb - 1]];
  if (K !== K2) throw new Error(`matmulRef: inner dims ${K} vs ${K2}`);
  const batch = broadcastShape(a2.shape.slice(0, -2), b2.shape.slice(0, -2));
  const aIdx = expandRef(
    nd(Float64Array.from({ length: sizeOf(a2.shape.slice(0, -2)) }, (_, i) => i), a2.shape.slice(0, -2)),
    batch,
  ).data;
  const bIdx = expandRef(
    nd(Float64Array.from({ length: sizeOf(b2.shape.slice(0, -2)) }, (_, i) => i), b2.shape.slice(0, -2)),
    batch,
  ).data;
  const nb = sizeOf(batch);
  const out = new Float64Array(nb * M * N);
  for (let p = 0; p < nb; p++) {
    const ao = aIdx[p] * M * K, bo = bIdx[p] * K * N;
    for (let m = 0; m < M; m++) {
      for (let n = 0; n < N; n++) {
        let acc = 0;
        for (let k = 0; k < K; k++) {
          const av = a2.data[ao + (tA ? k * M + m : m * K + k)];
          const bv = b2.data[bo + (tB ? n * K + k : k * N + n)];
          acc += av * bv;
        }
        out[(p * M + m) * N + n] = acc;
      }
    }
  }
  const shape = [...batch, M, N];
  if (b.shape.length === 1) shape.splice(shape.length - 1, 1);
  if (a.shape.length === 1) shape.splice(shape.length - (b.shape.length === 1 ? 1 : 2), 1);
  return { data: out, shape };
}

/** Float64 permute: `out.shape[i] = x.shape[dims[i]]`. */
export function permuteRef(x: Nd, dims: readonly number[]): Nd {
  const st = stridesOf(x.shape);
  const shape = dims.map((d) => x.shape[d]);
  const out = new Float64Array(x.data.length);
  forEachCoord(shape, (i, c) => {
    let at = 0;
    c.forEach((v, j) => (at += v * st[dims[j]]));
    out[i] = x.data[at];
  });
  return { data: out, shape };
}

/** Float64 transpose of two dims. */
export function transposeRef(x: Nd, d0: number, d1: number): Nd {
  const r = x.shape.length;
  const dims = [...Array(r).keys()];
  const a = d0 < 0 ? d0 + r : d0, b = d1 < 0 ? d1 + r : d1;
  [dims[a], dims[b]] = [dims[b], dims[a]];
  return permuteRef(x, dims);
}

/** Float64 narrow. */
export function narrowRef(x: Nd, dim: number, start: number, length: number): Nd {
  const d = dim < 0 ? dim + x.shape.length : dim;
  const shape = x.shape.map((s, i) => (i === d ? length : s));
  const st = stridesOf(x.shape);
  const out = new Float64Array(sizeOf(shape));
  forEachCoord(shape, (i, c) => {
    let at = 0;
    c.forEach((v, j) => (at += (j === d ? v + start : v) * st[j]));
    out[i] = x.data[at];
  });
  return { data: out, shape };
}

/** Float64 concatenation. */
export function catRef(xs: readonly Nd[], dim: number): Nd {
  const d = dim < 0 ? dim + xs[0].shape.length : dim;
  const shape = [...xs[0].shape];
  shape[d] = xs.reduce((n, x) => n + x.shape[d], 0);
  const out = new Float64Array(sizeOf(shape));
  const owner: number[] = [];
  const local: number[] = [];
  xs.forEach((x, k) => {
    for (let j = 0; j < x.shape[d]; j++) {
      owner.push(k);
      local.push(j);
    }
  });
  forEachCoord(shape, (i, c) => {
    const x = xs[owner[c[d]]];
    const st = stridesOf(x.shape);
    let at = 0;
    c.forEach((v, j) => (at += (j === d ? local[c[d]] : v) * st[j]));
    out[i] = x.data[at];
  });
  return { data: out, shape };
}

/** Float64 constant padding, PyTorch order ((before, after) pairs from the last dim). */
export function padRef(x: Nd, padding: readonly number[], value = 0): Nd {
  const r = x.shape.length;
  const before = new Array<number>(r).fill(0), after = new Array<number>(r).fill(0);
  for (let j = 0; j < padding.length / 2; j++) {
    before[r - 1 - j] = padding[2 * j];
    after[r - 1 - j] = padding[2 * j + 1];
  }
  const shape = x.shape.map((s, i) => s + before[i] + after[i]);
  const st = stridesOf(x.shape);
  const out = new Float64Array(sizeOf(shape)).fill(value);
  forEachCoord(shape, (i, c) => {
    let at = 0;
    for (let j = 0; j < r; j++) {
      const v = c[j] - before[j];
      if (v < 0 || v >= x.shape[j]) return;
      at += v * st[j];
    }
    out[i] = x.data[at];
  });
  return { data: out, shape };
}

/** Float64 `indexSelect`: out shape `x.shape[:dim] + index.shape + x.shape[dim+1:]`. */
export function indexSelectRef(x: Nd, dim: number, index: Nd): Nd {
  const d = dim < 0 ? dim + x.shape.length : dim;
  const outer = sizeOf(x.shape.slice(0, d)), V = x.shape[d], inner = sizeOf(x.shape.slice(d + 1));
  const J = index.data.length;
  const out = new Float64Array(outer * J * inner);
  for (let o = 0; o < outer; o++) {
    for (let j = 0; j < J; j++) {
      for (let i = 0; i < inner; i++) {
        out[(o * J + j) * inner + i] = x.data[(o * V + index.data[j]) * inner + i];
      }
    }
  }
  return { data: out, shape: [...x.shape.slice(0, d), ...index.shape, ...x.shape.slice(d + 1)] };
}

/** Float64 `gather` (PyTorch): `out[..., j, ...] = x[..., index[..., j, ...], ...]` along `dim`. */
export function gatherRef(x: Nd, dim: number, index: Nd): Nd {
  const d = dim < 0 ? dim + x.shape.length : dim;
  const st = stridesOf(x.shape);
  const out = new Float64Array(index.data.length);
  forEachCoord(index.shape, (i, c) => {
    let at = 0;
    c.forEach((v, j) => (at += (j === d ? index.data[i] : v) * st[j]));
    out[i] = x.data[at];
  });
  return { data: out, shape: index.shape };
}

/** Float64 unary functions, computed stably (the oracle for the runtime's unary ops). */
export const UNARY_REF: Record<string, (x: number) => number> = {
  neg: (x) => -x,
  exp: Math.exp,
  log: Math.log,
  sqrt: Math.sqrt,
  rsqrt: (x) => 1 / Math.sqrt(x),
  square: (x) => x * x,
  abs: Math.abs,
  sigmoid: (x) => (x >= 0 ? 1 / (1 + Math.exp(-x)) : Math.exp(x) / (1 + Math.exp(x))),
  silu: (x) => x * UNARY_REF.sigmoid(x),
  softplus: (x) => Math.max(x, 0) + Math.log1p(Math.exp(-Math.abs(x))),
  tanh: Math.tanh,
  relu: (x) => Math.max(x, 0),
};

// ------------------------------------------------------------------------------------------ assertions

/**
 * Tolerance: `|actual - expected| <= atol + rtol * max(|expected|, scale)` elementwise. `scale` (per
 * element) is the magnitude the error of the computation is proportional to when that exceeds the result:
 * for a dot product, `sum |a_k b_k|` (f32 sums are accurate relative to their terms, not to a cancelled
 * result).
 */
export interface Tol {
  rtol?: number;
  atol?: number;
  scale?: ArrayLike<number>;
}

/** Default tolerance of f32 results against a float64 reference. */
export const F32: { rtol: number; atol: number } = { rtol: 1e-5, atol: 1e-6 };

function coordOf(i: number, shape?: readonly number[]): string {
  if (!shape || shape.length === 0) return "";
  const c: number[] = [];
  let rem = i;
  for (let d = shape.length - 1; d >= 0; d--) {
    c.unshift(rem % shape[d]);
    rem = Math.floor(rem / shape[d]);
  }
  return ` [${c.join(", ")}] of shape [${shape.join(", ")}]`;
}

/**
 * Asserts elementwise closeness; NaN must meet NaN and infinities must match exactly. The message names
 * how many elements fail, and the worst one: index, coordinate, both values and the difference.
 */
export function assertClose(
  actual: ArrayLike<number>,
  expected: ArrayLike<number> | Nd,
  tol: Tol,
  what: string,
): void {
  const { rtol = F32.rtol, atol = F32.atol, scale } = tol;
  const exp = "data" in expected ? expected.data : expected;
  const shape = "data" in expected ? expected.shape : undefined;
  // A tolerance that is NaN, negative or infinite, or a scale that is NaN, would let anything pass (or
  // nothing): the check itself is wrong, so it fails.
  for (const [k, v] of [["rtol", rtol], ["atol", atol]] as const) {
    if (!(Number.isFinite(v) && v >= 0)) {
      throw new AssertionError({ message: `${what}: ${k} must be a finite number >= 0, got ${v}` });
    }
  }
  if (scale) {
    if (scale.length !== exp.length) {
      throw new AssertionError({ message: `${what}: ${scale.length} scale values for ${exp.length} values` });
    }
    for (let i = 0; i < scale.length; i++) {
      if (!(Number.isFinite(scale[i]) && scale[i] >= 0)) {
        throw new AssertionError({
          message: `${what}: scale[${i}] is ${scale[i]}; a scale must be finite and >= 0`,
        });
      }
    }
  }
  if (actual.length !== exp.length) {
    throw new AssertionError({ message: `${what}: ${actual.length} values, expected ${exp.length}` });
  }
  let worst = -1, worstExcess = 1, bad = 0;
  for (let i = 0; i < exp.length; i++) {
    const a = actual[i], e = exp[i];
    let excess: number;
    if (Number.isNaN(e) || Number.isNaN(a)) excess = Number.isNaN(e) && Number.isNaN(a) ? 0 : Infinity;
    else if (!Number.isFinite(e) || !Number.isFinite(a)) excess = a === e ? 0 : Infinity;
    else excess = Math.abs(a - e) / (atol + rtol * Math.max(Math.abs(e), scale?.[i] ?? 0));
    if (excess > 1) {
      bad++;
      if (excess > worstExcess || worst < 0) [worst, worstExcess] = [i, excess];
    }
  }
  if (bad > 0) {
    const a = actual[worst], e = exp[worst];
    throw new AssertionError({
      message: `${what}: ${bad} of ${exp.length} values outside rtol ${rtol}, atol ${atol}` +
        `${scale ? " (relative to the per-element scale)" : ""}; worst at index ${worst}` +
        `${coordOf(worst, shape)}: actual ${a}, expected ${e}, |diff| ${Math.abs(a - e)}` +
        `${scale ? `, scale ${scale[worst]}` : ""}`,
    });
  }
}

/** Asserts a tensor's shape. */
export function assertShape(t: Tensor | Nd, shape: readonly number[], what: string): void {
  if (t.shape.join() !== shape.join() || t.shape.length !== shape.length) {
    throw new AssertionError({
      message: `${what}: shape [${t.shape.join(", ")}], expected [${shape.join(", ")}]`,
    });
  }
}

// ------------------------------------------------------------------------------------------ gradients

/**
 * Central finite differences of a float64 scalar function: d f / d inputs[k][i] for each input with
 * `which[k]` true (null for the others). The step is relative to the value (float64 keeps it accurate).
 */
export function numericGrad(
  f: (inputs: Float64Array[]) => number,
  inputs: readonly Float64Array[],
  which: readonly boolean[] = inputs.map(() => true),
  h = 1e-6,
): (Float64Array | null)[] {
  const xs = inputs.map((x) => Float64Array.from(x));
  return xs.map((x, k) => {
    if (!which[k]) return null;
    const g = new Float64Array(x.length);
    for (let i = 0; i < x.length; i++) {
      const v = x[i];
      const step = h * Math.max(1, Math.abs(v));
      x[i] = v + step;
      const fp = f(xs);
      x[i] = v - step;
      const fm = f(xs);
      x[i] = v;
      g[i] = (fp - fm) / (2 * step);
    }
    return g;
  });
}

/** One op check: forward against the float64 reference, gradients against finite differences. */
export interface OpCase {
  /** Name used in failure messages. */
  what: string;
  /** Inputs (f32 data becomes f32 tensors that require grad; `ndInt` data becomes i32 tensors). */
  inputs: Nd[];
  /** The runtime computation under test. */
  gpu: (xs: Tensor[]) => Tensor;
  /** The float64 reference of the same function. */
  ref: (xs: Nd[]) => Nd;
  /** Forward tolerance (default {@linkcode F32}). */
  tol?: Tol;
  /** Per-element error scale of the forward (see {@linkcode Tol}), e.g. `|A| @ |B|` for a matmul. */
  scale?: (xs: Nd[]) => Nd;
  /** Gradient tolerance (default {@linkcode F32}). */
  gradTol?: Tol;
  /** Whether to check gradients (default: of every f32 input), or per input. */
  grad?: boolean | boolean[];
  /**
   * Analytic float64 gradients of `sum(ref(xs) * G)`, one per input (null where not differentiated);
   * replaces finite differences for inputs too large to perturb one element at a time.
   */
  refGrad?: (xs: Nd[], G: Nd) => (Nd | null)[];
  /** Seed of the random cotangent G (default derived from `what`). */
  seed?: number;
}

function hashSeed(s: string): number {
  let h = 2166136261;
  for (let i = 0; i < s.length; i++) h = Math.imul(h ^ s.charCodeAt(i), 16777619);
  return h >>> 0;
}

/**
 * Runs many op checks with one readback round: for each case, forward, then `sum(y * G)` with a fixed
 * random G and `backward()`; compares y with the reference and every input's `.grad` with the finite
 * differences of `xs -> sum(ref(xs) * G)` (or `refGrad`). Throws one error that lists every failure.
 */
export async function checkOps(cases: OpCase[]): Promise<void> {
  const runs = cases.map((c) => {
    const wants = c.inputs.map((x, k) =>
      x.dtype !== "i32" && (typeof c.grad === "boolean" ? c.grad : c.grad?.[k] ?? true)
    );
    const refOut = c.ref(c.inputs);
    const G = rand(refOut.shape, c.seed ?? hashSeed(c.what));
    const out = tidy(() => {
      const xs = c.inputs.map((x, k) => toTensor(x, wants[k]));
      const y = c.gpu(xs);
      if (wants.some((w) => w)) {
        const yf = y.dtype === "f32" ? y : null;
        if (!yf) throw new Error(`${c.what}: cannot differentiate an ${y.dtype} output`);
        sum(mul(yf, toTensor(G))).backward();
      }
      return { y, grads: xs.map((x) => x.grad) };
    });
    return { c, wants, refOut, G, ...out };
  });
  const tensors = runs.flatMap((r) => [r.y, ...r.grads.filter((g): g is Tensor => g !== null)]);
  let arrays: (Float32Array | Int32Array)[];
  try {
    arrays = await readAll(tensors);
  } finally {
    for (const t of tensors) t.dispose();
  }
  const failures: string[] = [];
  let at = 0;
  for (const r of runs) {
    const y = arrays[at++];
    const gradArrays = r.grads.map((g) => (g ? arrays[at++] : null));
    const { c } = r;
    const attempt = (fn: () => void) => {
      try {
        fn();
      } catch (e) {
        failures.push(e instanceof Error ? e.message : String(e));
      }
    };
    attempt(() => assertShape(r.y, r.refOut.shape, `${c.what}: forward`));
    const scale = c.scale?.(c.inputs).data;
    attempt(() => assertClose(y, r.refOut, { ...F32, ...c.tol, scale }, `${c.what}: forward`));
    if (!r.wants.some((w) => w)) continue;
    let expected: (Float64Array | null)[];
    if (c.refGrad) {
      expected = c.refGrad(c.inputs, r.G).map((g) => g?.data ?? null);
    } else {
      const f = (datas: Float64Array[]) => {
        const out = c.ref(datas.map((d, k) => ({ ...c.inputs[k], data: d })));
        let s = 0;
        for (let i = 0; i < out.data.length; i++) s += out.data[i] * r.G.data[i];
        return s;
      };
      expected = numericGrad(f, c.inputs.map((x) => x.data), r.wants);
    }
    r.wants.forEach((w, k) => {
      if (!w) return;
      const ga = gradArrays[k];
      if (!ga) {
        failures.push(`${c.what}: input ${k} requires grad but has no .grad after backward()`);
        return;
      }
      const ge = expected[k];
      if (!ge) throw new Error(`${c.what}: refGrad gave no gradient for input ${k}`);
      attempt(() =>
        assertClose(ga, { data: ge, shape: c.inputs[k].shape }, c.gradTol ?? F32, `${c.what}: d/d input ${k}`)
      );
    });
  }
  if (failures.length > 0) {
    throw new AssertionError({ message: `${failures.length} check(s) failed:\n  ${failures.join("\n  ")}` });
  }
}

// ------------------------------------------------------------------------------------------ kernels run

/**
 * Runs `fn` and returns, with its value, the names of the compute kernels it dispatched, in order. A spy on
 * `GPUComputePassEncoder.prototype.setPipeline` (the runtime labels every pipeline with its kernel's name,
 * core/kernel.ts): it needs no timestamp queries, unlike `profile`, and sees every dispatch recorded while
 * `fn` runs, awaited parts included. Not reentrant.
 */
export async function kernelsRun<T>(fn: () => T | Promise<T>): Promise<{ value: T; kernels: string[] }> {
  const proto = GPUComputePassEncoder.prototype;
  const original = proto.setPipeline;
  if ((original as { spy?: boolean }).spy) throw new Error("kernelsRun: already running");
  const kernels: string[] = [];
  const spy = function (this: GPUComputePassEncoder, pipeline: GPUComputePipeline) {
    kernels.push(pipeline.label);
    return original.call(this, pipeline);
  };
  (spy as { spy?: boolean }).spy = true;
  proto.setPipeline = spy;
  try {
    return { value: await fn(), kernels };
  } finally {
    proto.setPipeline = original;
  }
}

/**
 * Asserts that the fused scan's kernels ran among `kernels` (its forward; with `backward`, its backward
 * too) and that neither the parallel nor the sequential scan did: a fused-mode test that silently ran the
 * pscan fallback (mamba/block.ts, where `fusedScanAvailable()` is false) fails here.
 */
export function assertFusedRan(kernels: readonly string[], what: string, backward = false): void {
  const has = (prefix: string) => kernels.some((k) => k.startsWith(prefix));
  const need = ["fused_scan_fwd_", ...(backward ? ["fused_scan_bwd_"] : [])];
  for (const p of need) {
    if (!has(p)) {
      throw new AssertionError({
        message: `${what}: no ${p}* kernel ran (kernels: ${[...new Set(kernels)]})`,
      });
    }
  }
  const other = kernels.filter((k) => k.startsWith("pscan_") || k === "scan_sequential");
  if (other.length) throw new AssertionError({ message: `${what}: the fused path ran ${other[0]}` });
}

/** Asserts that the fused decoding-step kernels (scan/fused_step.ts) ran among `kernels`. */
export function assertFusedStepRan(kernels: readonly string[], what: string): void {
  for (const p of ["conv_step_K", "ssm_step_N"]) {
    if (!kernels.some((k) => k.startsWith(p))) {
      throw new AssertionError({
        message: `${what}: no ${p}* kernel ran (kernels: ${[...new Set(kernels)]})`,
      });
    }
  }
}

let fusedNoted = false;

/**
 * Whether the tests of the fused kernels must be ignored on this adapter (after `init()`): true where
 * `fusedScanAvailable()` is false (fewer than 10 storage buffers per stage), with the reason printed once;
 * there the model would run pscan under the name "fused", so its tests would check nothing they name.
 */
export function fusedUnavailable(): boolean {
  const available = fusedScanAvailable();
  const storageBuffers = deviceInfo().limits.maxStorageBuffersPerShaderStage;
  if (!available && !fusedNoted) {
    fusedNoted = true;
    console.log(
      `fused-scan tests ignored: this adapter binds ${storageBuffers} storage buffers per shader stage, ` +
        "the fused kernels need 10 (mamba/block.ts falls back to pscan)",
    );
  }
  return !available;
}

/** `fn`'s result with matmuls planned as on a GPU or a CPU adapter (`isFallbackAdapter`), with the GPU split
 * and the matvec kernel on or off, where given; all are restored after. */
export async function withPlans<T>(
  set: { gpu?: boolean; split?: boolean; matvec?: boolean },
  fn: () => T | Promise<T>,
): Promise<T> {
  const info = await init();
  const [fallback, split, matvec] = [info.isFallbackAdapter, matmulGpuSplit(), matmulMatvec()];
  if (set.gpu !== undefined) info.isFallbackAdapter = !set.gpu;
  if (set.split !== undefined) setMatmulGpuSplit(set.split);
  if (set.matvec !== undefined) setMatmulMatvec(set.matvec);
  try {
    return await fn();
  } finally {
    info.isFallbackAdapter = fallback;
    setMatmulGpuSplit(split);
    setMatmulMatvec(matvec);
  }
}
