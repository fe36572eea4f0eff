/**
 * A seeded, deterministic, randomized differential test of the core ops against a float64 reference in plain
 * JS, aimed at what hand-written tests tend to miss.
 *
 * Each case (its own seed) picks one family and builds a small random program of public ops:
 * - inputs are leaves of random shape (rank 0-4; dims 0, 1, odd, multiples of 4, now and then one of 1000+
 *   that crosses workgroup, vec4 and reduce-chunk boundaries), usually passed through a random chain of view
 *   ops (narrow, slice with negative and clamped bounds, a split piece, transpose, permute, expand, reshape or
 *   view with -1), planned backwards from the shape the op needs: windows start at offsets that are not
 *   multiples of 4, expanded operands have zero strides, reshapes see the output of a copy, chains nest;
 * - the op under test: the unary maps; add/sub/mul/div/pow/maximum/minimum with broadcasting between ranks,
 *   scalars on either side and operands that share a leaf (`x op x`, overlapping windows of one leaf);
 *   compare; where; clamp; i32 arithmetic (wrapping) and i32 views; sum/mean/max over random single or
 *   multiple axes (negative, unsorted, keepdim); logsumexp, softmax, logSoftmax over any axis; matmul with 1-D
 *   operands, up to 4 broadcast batch dims, transA/transB, one leaf for both operands (x @ x^T), K up to 2100
 *   (split-K); cat (repeated tensors), split, chunk, pad, gather, indexSelect (sorted-bucket and scanning backward
 *   paths), embedding (paddingIdx), with i32 tables and views of indices (repeats), out-of-range indices;
 *   rmsNorm; crossEntropy (ignoreIndex, every reduction, out-of-range targets);
 * - now and then a follow-up kept as another output: a view, tanh or a sum of the result, or tanh of one of
 *   the op's operands (its gradient then sums two paths; matmul adds into it in place);
 * - gradients: backward from sum(y * G) over every output that requires grad (random G), against a
 *   reverse-mode float64 reference: each reference op has its VJP written out (the ops that only move data
 *   are one gather whose VJP is a scatter-add). OPS_FUZZ_FD=1 also checks those VJPs against float64 central
 *   differences of the JS forward, on the cases small enough and free of ties and kinks.
 * - invalid arguments (about 1 case in 13): mismatched shapes, out-of-range axes, bad dtypes, sizes, paddings,
 *   0-d tensors where an op needs a dim, disposed tensors, bad backward calls: the call must throw an Error
 *   whose message names the op and the problem (a pattern built from the arguments; no TypeError from
 *   inside, no "NaN"/"undefined" that was not passed), free whatever it allocated, and leave the device
 *   working (a sync after each).
 *
 * Tolerance: `tolerance("op")` (tests/fixture_util.ts), 1e-5 relative to max(1, max |want|) per tensor, or,
 * where larger, to the element's error scale: for a value that sums terms which may cancel (sum, mean, matmul,
 * crossEntropy's lse - x[t], every gradient that sums contributions), the root of the sum of the squares of
 * its terms (see RV.fmag and RV.mag2). f32 rounds each term relative to its own size, and n roundings add up
 * like sqrt(n) of them, so this is what a sum that cancels (a 4099-long sum of values in [-60, 60] that came
 * out at 52; rmsNorm's gradient, whose two terms cancel for D = 1) can be held to; for sums that do not cancel
 * it is no looser than the per-tensor bound. An elementwise derivative that cancels in f32 (tanh' = 1 - y^2)
 * counts with the size of its terms. NaN must meet NaN, i32 results must be exact. Measured worst over 90,000
 * cases: 3.1e-6 of the scale (a matmul gradient summed over a K of 1221 and a broadcast; a 2868-long scatter
 * sum: 2.2e-6), so 3x headroom; OPS_FUZZ_REPORT=1 prints it per family. Inputs never broadcast a dim to LONG
 * (256) or more, see there: a long line of equal values is f32 summation's worst case.
 *
 * After each batch every tensor is disposed and `memory()` (live tensors, live bytes, saved bytes) must be back
 * at its baseline. Readbacks are batched (one wait per BATCH cases).
 *
 * Environment: OPS_FUZZ_CASES (default 2000, about 13 s here), OPS_FUZZ_SEED (first case's seed, default 1),
 * OPS_FUZZ_CASE=n (run only case n and print its program and every comparison), OPS_FUZZ_LIST=1 (print every
 * failure, one line each), OPS_FUZZ_REPORT=1 (print the worst error per family), OPS_FUZZ_FD=1 (check the
 * reference's VJPs by finite differences).
 * @module
 */

import { AssertionError } from "node:assert/strict";
import * as M from "./library.ts";
import { type DType, memory, type Tensor, tidy } from "../mod.ts";
import { env, forEachCoord, intEnv, readAll, rng, setup, sizeOf, stridesOf } from "./helpers.ts";
import { fmt } from "../core/shape.ts";
import { tolerance } from "./fixture_util.ts";

await setup();

const ONLY = env("OPS_FUZZ_CASE");
const CASES = ONLY ? 1 : intEnv("OPS_FUZZ_CASES", 2000);
const FIRST = ONLY ? intEnv("OPS_FUZZ_CASE", 0) : intEnv("OPS_FUZZ_SEED", 1);
const LIST = env("OPS_FUZZ_LIST") === "1";
const REPORT = env("OPS_FUZZ_REPORT") === "1";
const FD = env("OPS_FUZZ_FD") === "1";
const VERBOSE = ONLY !== undefined;
/** Cases whose GPU work is recorded before one readback. */
const BATCH = 40;
const RTOL = tolerance("op").rtol;
const F32_MAX = 3.4028234663852886e38;
/** The runtime side of a value when a case is replayed without the GPU. */
const NO_TENSOR = null as unknown as Tensor;

// ------------------------------------------------------------------------------------------ shapes

const esc = (s: string) => s.replace(/[.*+?^${}()|[\]\\]/g, "\\$&");

/** NumPy broadcasting; null when the shapes do not broadcast. */
function bshape(...shapes: (readonly number[])[]): number[] | null {
  const n = Math.max(0, ...shapes.map((s) => s.length));
  const out = new Array<number>(n).fill(1);
  for (const s of shapes) {
    for (let i = 0; i < s.length; i++) {
      const j = n - s.length + i;
      if (s[i] === out[j] || s[i] === 1) continue;
      if (out[j] !== 1) return null;
      out[j] = s[i];
    }
  }
  return out;
}

/** For each element of `to`, the index of the element of `from` (broadcast to `to`) it reads. */
function bIndex(from: readonly number[], to: readonly number[]): Int32Array {
  const st = stridesOf(from);
  const off = to.length - from.length;
  const bs = to.map((_, d) => (d < off || from[d - off] === 1 ? 0 : st[d - off]));
  const out = new Int32Array(sizeOf(to));
  forEachCoord(to, (i, c) => {
    let a = 0;
    for (let d = 0; d < c.length; d++) a += c[d] * bs[d];
    out[i] = a;
  });
  return out;
}

// ------------------------------------------------------------------------------------------ random

type Dist =
  | "unit"
  | "pos"
  | "nonzero"
  | "avoid0"
  | "grid"
  | "wide"
  | "big"
  | "mask"
  | "intgrid"
  | "int"
  | "intfull"
  | { index: number; bad: number; ignore?: number };

const distText = (d: Dist) => typeof d === "string" ? d : `index<${d.index}${d.bad ? `, ${d.bad} bad` : ""}>`;

class Rand {
  readonly u: () => number;
  constructor(seed: number) {
    this.u = rng(seed);
  }
  int(lo: number, hi: number): number {
    return lo + Math.floor(this.u() * (hi - lo + 1));
  }
  bool(p = 0.5): boolean {
    return this.u() < p;
  }
  pick<T>(xs: readonly T[]): T {
    return xs[Math.floor(this.u() * xs.length)];
  }
  shuffle<T>(xs: T[]): T[] {
    for (let i = xs.length - 1; i > 0; i--) {
      const j = this.int(0, i);
      [xs[i], xs[j]] = [xs[j], xs[i]];
    }
    return xs;
  }
  /** Picks a key by weight. */
  weighted<K extends string>(w: Record<K, number>): K {
    const keys = Object.keys(w) as K[];
    let x = this.u() * keys.reduce((a, k) => a + w[k], 0);
    for (const k of keys) if ((x -= w[k]) < 0) return k;
    return keys[keys.length - 1];
  }
  rank(max = 4, min = 0): number {
    const r = this.pick([0, 0, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 4, 4]);
    return Math.min(max, Math.max(min, r));
  }
  dim(zero = true): number {
    const u = this.u();
    if (zero && u < 0.03) return 0;
    if (u < 0.28) return 1;
    if (u < 0.72) return this.int(2, 7);
    if (u < 0.95) return this.pick([8, 9, 12, 13, 16, 17, 20, 31, 32, 33]);
    return this.int(34, 70);
  }
  /** A shape of `rank` dims; now and then one big dim (1000+) with small others. */
  shape(rank: number, opts: { zero?: boolean; big?: number; max?: number } = {}): number[] {
    const { zero = true, big = 0.06, max = 3000 } = opts;
    for (;;) {
      const s = Array.from({ length: rank }, () => this.dim(zero));
      if (rank > 0 && this.bool(big)) {
        const d = this.int(0, rank - 1);
        for (let i = 0; i < rank; i++) if (i !== d) s[i] = Math.min(s[i], this.int(1, 3));
        s[d] = this.pick([1000 + this.int(0, 100), 1024, 4099]);
        return s;
      }
      if (sizeOf(s) <= max) return s;
    }
  }
  /** `k` shapes that broadcast together (ranks differ, some dims 1). */
  bshapes(k: number, rank = this.rank()): number[][] {
    const out = this.shape(rank, { max: 2000 });
    return Array.from({ length: k }, () => {
      const drop = this.bool(0.6) ? 0 : this.int(0, out.length);
      return out.slice(drop).map((d) => (this.bool(0.3) ? 1 : d));
    });
  }
  values(n: number, dist: Dist): Float64Array {
    const f = Math.fround;
    const out = new Float64Array(n);
    for (let i = 0; i < n; i++) {
      let v: number;
      if (typeof dist === "object") {
        const V = dist.index;
        v = V > 0 && !this.bool(dist.bad) ? this.int(0, V - 1) : this.pick([-1, -7, V, V + 3]);
        if (dist.ignore !== undefined && this.bool(0.15)) v = dist.ignore;
      } else {
        switch (dist) {
          case "unit":
            v = f(this.u() * 2 - 1);
            break;
          case "pos":
            v = f(0.05 + this.u() * 3.95);
            break;
          case "nonzero":
            v = f((0.25 + this.u() * 1.75) * (this.bool() ? 1 : -1));
            break;
          case "avoid0":
            do v = f(this.u() * 6 - 3); while (Math.abs(v) < 0.05);
            break;
          case "grid":
            v = this.int(-8, 8) / 4;
            break;
          case "wide":
            v = f(this.u() * 8 - 4);
            break;
          case "big":
            v = f(this.u() * 120 - 60);
            break;
          case "mask":
            v = this.pick([0, 0, 0, 1, 1, -2.5, 0.5]);
            break;
          case "intgrid":
            v = this.int(-3, 3);
            break;
          case "int":
            v = this.int(-20, 20);
            break;
          case "intfull":
            v = this.bool(0.2)
              ? this.pick([2147483647, -2147483648, 2147483646, -2147483647, 65536, 46341])
              : Math.floor(this.u() * 2 ** 32) - 2 ** 31;
            break;
        }
      }
      out[i] = v;
    }
    return out;
  }
}

// ------------------------------------------------------------------------------------------ reference

/**
 * A VJP: adds to its inputs' gradients given the output's gradient `g` and the error scale `mg` of each of its
 * elements (see {@linkcode RV.mag2}).
 */
type Back = (g: Float64Array, mg: Float64Array) => void;

/** A float64 reference value with its reverse-mode record. */
interface RV {
  data: Float64Array;
  shape: number[];
  dtype: DType;
  requiresGrad: boolean;
  grad: Float64Array | null;
  /**
   * The error scale of each gradient element: the sum of the squares of the terms it adds up, each term taken
   * with the absolute values of its factors (and the incoming scale for the incoming gradient). f32 rounds
   * each term relative to that size, and the roundings of n terms add up like sqrt(n) of them, so sqrt(mag2)
   * is what a gradient that cancels (a sum of terms far larger than itself) can be held to.
   */
  mag2: Float64Array | null;
  /**
   * The error scale of each element of the value, where it sums terms that may cancel (sum, mean, matmul,
   * crossEntropy, and what is computed from those): the root of the sum of the squares of the terms, as
   * `mag2` for gradients. Null: |value| (one rounding).
   */
  fmag: Float64Array | null;
  back: Back | null;
}

/** The error scale of element i of a value (see {@linkcode RV.fmag}). */
const fm = (x: RV, i: number) => (x.fmag ? x.fmag[i] : Math.abs(x.data[i]));

let tape: RV[] = [];

function refLeaf(data: Float64Array, shape: number[], dtype: DType, requiresGrad: boolean): RV {
  const r: RV = { data, shape, dtype, requiresGrad, grad: null, mag2: null, fmag: null, back: null };
  tape.push(r);
  return r;
}

function refNode(data: Float64Array, shape: number[], dtype: DType, parents: RV[], back: Back | null): RV {
  const requiresGrad = dtype === "f32" && back !== null && parents.some((p) => p.requiresGrad);
  const r: RV = {
    data,
    shape,
    dtype,
    requiresGrad,
    grad: null,
    mag2: null,
    fmag: null,
    back: requiresGrad ? back : null,
  };
  tape.push(r);
  return r;
}

/** A gradient being accumulated: values and error scales (squared). */
interface Acc {
  g: Float64Array;
  m2: Float64Array;
}

/** The gradient accumulator of a value (created on first use), or null if it needs none. */
function acc(p: RV): Acc | null {
  if (!p.requiresGrad) return null;
  p.grad ??= new Float64Array(p.data.length);
  p.mag2 ??= new Float64Array(p.data.length);
  return { g: p.grad, m2: p.mag2 };
}

/** Adds one term (and its error scale) to element i of a gradient. */
function put(a: Acc, i: number, term: number, mag: number): void {
  a.g[i] += term;
  a.m2[i] += mag * mag;
}

/** Backpropagates `sum(root * G)` over the given roots through the tape. */
function refBackward(roots: [RV, Float64Array][]): void {
  for (const [r, G] of roots) {
    const a = acc(r);
    if (a) { for (let i = 0; i < G.length; i++) put(a, i, G[i], G[i]); }
  }
  for (let i = tape.length - 1; i >= 0; i--) {
    const n = tape[i];
    if (n.grad && n.back) n.back(n.grad, n.mag2!.map(Math.sqrt));
  }
}

/** out[i] = parents[who[i]].data[at[i]] (fill where who < 0): every op that only moves data. VJP: scatter-add. */
function remap(
  parents: RV[],
  shape: number[],
  at: Int32Array,
  who: Int32Array | null = null,
  fill = 0,
): RV {
  const n = at.length;
  const data = new Float64Array(n);
  for (let i = 0; i < n; i++) {
    const w = who ? who[i] : 0;
    data[i] = w < 0 ? fill : parents[w].data[at[i]];
  }
  const r = refNode(data, shape, parents[0].dtype, parents, (g, mg) => {
    const gs = parents.map(acc);
    for (let i = 0; i < n; i++) {
      const w = who ? who[i] : 0;
      if (w >= 0) {
        const t = gs[w];
        if (t) put(t, at[i], g[i], mg[i]);
      }
    }
  });
  if (parents.some((p) => p.fmag)) {
    r.fmag = Float64Array.from(at, (a, i) => ((who ? who[i] : 0) < 0 ? 0 : fm(parents[who ? who[i] : 0], a)));
  }
  return r;
}

function narrowR(x: RV, d: number, start: number, len: number): RV {
  const shape = x.shape.map((s, i) => (i === d ? len : s));
  const st = stridesOf(x.shape);
  const at = new Int32Array(sizeOf(shape));
  forEachCoord(shape, (i, c) => {
    let a = start * st[d];
    for (let j = 0; j < c.length; j++) a += c[j] * st[j];
    at[i] = a;
  });
  return remap([x], shape, at);
}

function permuteR(x: RV, dims: number[]): RV {
  const st = stridesOf(x.shape);
  const shape = dims.map((d) => x.shape[d]);
  const at = new Int32Array(sizeOf(shape));
  forEachCoord(shape, (i, c) => {
    let a = 0;
    for (let j = 0; j < c.length; j++) a += c[j] * st[dims[j]];
    at[i] = a;
  });
  return remap([x], shape, at);
}

const expandR = (x: RV, shape: number[]) => remap([x], shape, bIndex(x.shape, shape));
const reshapeR = (x: RV, shape: number[]) =>
  remap([x], shape, Int32Array.from({ length: x.data.length }, (_, i) => i));

function catR(xs: RV[], d: number): RV {
  const shape = [...xs[0].shape];
  shape[d] = xs.reduce((n, x) => n + x.shape[d], 0);
  const owner: number[] = [], local: number[] = [];
  xs.forEach((x, k) => {
    for (let j = 0; j < x.shape[d]; j++) owner.push(k), local.push(j);
  });
  const at = new Int32Array(sizeOf(shape)), who = new Int32Array(at.length);
  const sts = xs.map((x) => stridesOf(x.shape));
  forEachCoord(shape, (i, c) => {
    const k = owner[c[d]];
    let a = 0;
    for (let j = 0; j < c.length; j++) a += (j === d ? local[c[d]] : c[j]) * sts[k][j];
    at[i] = a;
    who[i] = k;
  });
  return remap(xs, shape, at, who);
}

function padR(x: RV, padding: number[], value: number): RV {
  const r = x.shape.length;
  const before = new Array<number>(r).fill(0), after = new Array<number>(r).fill(0);
  for (let j = 0; j < padding.length / 2; j++) {
    before[r - 1 - j] = padding[2 * j];
    after[r - 1 - j] = padding[2 * j + 1];
  }
  const shape = x.shape.map((s, i) => s + before[i] + after[i]);
  const st = stridesOf(x.shape);
  const at = new Int32Array(sizeOf(shape)), who = new Int32Array(at.length);
  forEachCoord(shape, (i, c) => {
    let a = 0;
    for (let j = 0; j < r; j++) {
      const v = c[j] - before[j];
      if (v < 0 || v >= x.shape[j]) {
        who[i] = -1;
        return;
      }
      a += v * st[j];
    }
    at[i] = a;
  });
  return remap([x], shape, at, who, value);
}

/** What an out-of-range index reads: NaN from f32, its bits (2143289344) from i32 (documented). */
const badRead = (x: RV) => (x.dtype === "f32" ? NaN : 2143289344);

function gatherR(x: RV, d: number, idx: RV): RV {
  const st = stridesOf(x.shape);
  const V = x.shape[d];
  const at = new Int32Array(idx.data.length), who = new Int32Array(at.length);
  forEachCoord(idx.shape, (i, c) => {
    const v = idx.data[i];
    if (v < 0 || v >= V) {
      who[i] = -1;
      return;
    }
    let a = 0;
    for (let j = 0; j < c.length; j++) a += (j === d ? v : c[j]) * st[j];
    at[i] = a;
  });
  return remap([x], [...idx.shape], at, who, badRead(x));
}

function indexSelectR(x: RV, d: number, idx: RV, paddingIdx = -1): RV {
  const outer = sizeOf(x.shape.slice(0, d)), V = x.shape[d], inner = sizeOf(x.shape.slice(d + 1));
  const J = idx.data.length;
  const shape = [...x.shape.slice(0, d), ...idx.shape, ...x.shape.slice(d + 1)];
  const at = new Int32Array(outer * J * inner), who = new Int32Array(at.length);
  for (let o = 0; o < outer; o++) {
    for (let j = 0; j < J; j++) {
      const v = idx.data[j];
      for (let i = 0; i < inner; i++) {
        const k = (o * J + j) * inner + i;
        if (v < 0 || v >= V) who[k] = -1;
        else at[k] = (o * V + v) * inner + i;
      }
    }
  }
  const out = remap([x], shape, at, who, badRead(x));
  if (paddingIdx >= 0 && out.back) {
    // embedding's padding row gets no gradient
    const back = out.back;
    out.back = (g, mg) => {
      const g2 = Float64Array.from(g), m2 = Float64Array.from(mg);
      for (let j = 0; j < J; j++) {
        if (idx.data[j] === paddingIdx) [g2, m2].forEach((a) => a.fill(0, j * inner, (j + 1) * inner));
      }
      back(g2, m2);
    };
  }
  return out;
}

/**
 * Elementwise f over operands broadcast together; `df(k, v, y)` is d y / d operand k (null: no gradient),
 * `dm(k, v, y)` the error scale of that derivative as f32 computes it, where it exceeds |df| (tanh' = 1 - y^2
 * is off by about u however small it is).
 */
function ew(
  ops: (RV | number)[],
  f: (...v: number[]) => number,
  df: ((k: number, v: number[], y: number) => number) | null,
  outDtype?: DType,
  diff?: boolean[],
  dm?: (k: number, v: number[], y: number) => number,
): RV {
  const tensors = ops.filter((o): o is RV => typeof o !== "number");
  const shape = bshape(...tensors.map((t) => t.shape));
  if (!shape) throw new Error("reference: operands do not broadcast");
  const maps = ops.map((o) => (typeof o === "number" ? null : bIndex(o.shape, shape)));
  const n = sizeOf(shape);
  const data = new Float64Array(n);
  const v = new Array<number>(ops.length);
  const load = (i: number) => {
    for (let k = 0; k < ops.length; k++) {
      const o = ops[k];
      v[k] = typeof o === "number" ? o : o.data[maps[k]![i]];
    }
  };
  for (let i = 0; i < n; i++) {
    load(i);
    data[i] = f(...v);
  }
  const dtype = outDtype ?? tensors[0].dtype;
  const fmag = df && tensors.some((t) => t.fmag) ? new Float64Array(n) : null;
  if (fmag) {
    // first order: |y| for the op's own rounding, plus each operand's error times |d y / d operand|
    for (let i = 0; i < n; i++) {
      load(i);
      fmag[i] = Math.abs(data[i]);
      ops.forEach((o, k) => {
        if (typeof o !== "number" && diff?.[k] !== false) {
          fmag[i] += Math.abs(df!(k, v, data[i])) * fm(o, maps[k]![i]);
        }
      });
    }
  }
  const r = refNode(
    data,
    shape,
    dtype,
    tensors,
    df &&
      ((g, mg) => {
        const gs = ops.map((o, k) => (typeof o === "number" || diff?.[k] === false ? null : acc(o)));
        for (let i = 0; i < n; i++) {
          load(i);
          for (let k = 0; k < ops.length; k++) {
            const t = gs[k];
            if (!t) continue;
            const d = df(k, v, data[i]);
            put(t, maps[k]![i], g[i] * d, mg[i] * (dm ? Math.max(Math.abs(d), dm(k, v, data[i])) : d));
          }
        }
      }),
  );
  r.fmag = fmag;
  return r;
}

/** Normalised axes (PyTorch: a 0-d tensor takes dim 0 or -1, and reduces nothing). */
function normAxes(rank: number, axis: number | number[] | undefined): number[] {
  if (rank === 0) return [];
  const list = axis === undefined ? [...Array(rank).keys()] : typeof axis === "number" ? [axis] : axis;
  return list.map((a) => (a < 0 ? a + rank : a));
}

function reduceR(x: RV, axes: number[], keepdim: boolean, kind: "sum" | "mean" | "max"): RV {
  const kept = x.shape.map((s, i) => (axes.includes(i) ? 1 : s));
  const shape = keepdim ? kept : x.shape.filter((_, i) => !axes.includes(i));
  const ks = stridesOf(kept);
  const oi = new Int32Array(x.data.length);
  forEachCoord(x.shape, (i, c) => {
    let o = 0;
    for (let d = 0; d < c.length; d++) if (!axes.includes(d)) o += c[d] * ks[d];
    oi[i] = o;
  });
  const count = axes.reduce((n, a) => n * x.shape[a], 1);
  const data = new Float64Array(sizeOf(kept)).fill(kind === "max" ? -Infinity : 0);
  for (let i = 0; i < oi.length; i++) {
    data[oi[i]] = kind === "max" ? Math.max(data[oi[i]], x.data[i]) : data[oi[i]] + x.data[i];
  }
  if (kind === "mean") { for (let o = 0; o < data.length; o++) data[o] /= count; }
  const fmag = new Float64Array(data.length);
  for (let i = 0; i < oi.length; i++) {
    fmag[oi[i]] = kind === "max" ? Math.max(fmag[oi[i]], fm(x, i)) : fmag[oi[i]] + fm(x, i) ** 2;
  }
  for (let o = 0; o < data.length; o++) {
    if (kind !== "max") fmag[o] = Math.sqrt(fmag[o]) / (kind === "mean" ? count : 1);
  }
  const r = refNode(data, shape, "f32", [x], (g, mg) => {
    const gx = acc(x)!;
    if (kind === "max") {
      const ties = new Float64Array(data.length);
      for (let i = 0; i < oi.length; i++) if (x.data[i] === data[oi[i]]) ties[oi[i]]++;
      for (let i = 0; i < oi.length; i++) {
        const o = oi[i];
        put(gx, i, x.data[i] === data[o] ? g[o] / ties[o] : 0, x.data[i] === data[o] ? mg[o] / ties[o] : 0);
      }
    } else {
      const f = kind === "mean" ? 1 / count : 1;
      for (let i = 0; i < oi.length; i++) put(gx, i, g[oi[i]] * f, mg[oi[i]] * f);
    }
  });
  r.fmag = fmag;
  return r;
}

/** Calls `fn(base, R, inner)` for every line along `axis`. */
function lines(shape: number[], axis: number, fn: (base: number, R: number, inner: number) => void): void {
  const R = shape[axis], inner = sizeOf(shape.slice(axis + 1)), outer = sizeOf(shape.slice(0, axis));
  for (let o = 0; o < outer; o++) for (let i = 0; i < inner; i++) fn(o * R * inner + i, R, inner);
}

function lseLine(x: Float64Array, base: number, R: number, inner: number): number {
  let m = -Infinity;
  for (let r = 0; r < R; r++) m = Math.max(m, x[base + r * inner]);
  const m0 = Number.isFinite(m) ? m : 0;
  let s = 0;
  for (let r = 0; r < R; r++) s += Math.exp(x[base + r * inner] - m0);
  return m0 + Math.log(s);
}

function logsumexpR(x: RV, axis: number, keepdim: boolean): RV {
  if (x.shape.length === 0) return reshapeR(x, []);
  const kept = x.shape.map((s, i) => (i === axis ? 1 : s));
  const data = new Float64Array(sizeOf(kept));
  let k = 0;
  lines(x.shape, axis, (b, R, inner) => (data[k++] = lseLine(x.data, b, R, inner)));
  const shape = keepdim ? kept : x.shape.filter((_, i) => i !== axis);
  return refNode(data, shape, "f32", [x], (g, mg) => {
    const gx = acc(x)!;
    let k = 0;
    lines(x.shape, axis, (b, R, inner) => {
      for (let r = 0; r < R; r++) {
        const p = Math.exp(x.data[b + r * inner] - data[k]);
        put(gx, b + r * inner, g[k] * p, mg[k] * p);
      }
      k++;
    });
  });
}

function softmaxR(x: RV, axis: number, log: boolean): RV {
  const data = new Float64Array(x.data.length);
  if (x.shape.length === 0) data[0] = log ? 0 : 1;
  else {
    lines(x.shape, axis, (b, R, inner) => {
      const l = lseLine(x.data, b, R, inner);
      for (let r = 0; r < R; r++) {
        const z = x.data[b + r * inner] - l;
        data[b + r * inner] = log ? z : Math.exp(z);
      }
    });
  }
  return refNode(data, [...x.shape], "f32", [x], (g, mg) => {
    const gx = acc(x)!;
    if (x.shape.length === 0) return put(gx, 0, 0, 0); // a constant
    lines(x.shape, axis, (b, R, inner) => {
      let s = 0, sm = 0;
      for (let r = 0; r < R; r++) {
        const j = b + r * inner;
        s += log ? g[j] : g[j] * data[j];
        sm += log ? mg[j] : mg[j] * data[j];
      }
      for (let r = 0; r < R; r++) {
        const j = b + r * inner;
        if (log) put(gx, j, g[j] - Math.exp(data[j]) * s, mg[j] + Math.exp(data[j]) * sm);
        else put(gx, j, data[j] * (g[j] - s), data[j] * (mg[j] + sm));
      }
    });
  });
}

function matmulR(a: RV, b: RV, transA: boolean, transB: boolean): RV {
  const va = a.shape.length === 1, vb = b.shape.length === 1;
  const as = va ? [1, a.shape[0]] : a.shape, bs = vb ? [b.shape[0], 1] : b.shape;
  const tA = !va && transA, tB = !vb && transB;
  const ra = as.length, rb = bs.length;
  const [Mm, K] = tA ? [as[ra - 1], as[ra - 2]] : [as[ra - 2], as[ra - 1]];
  const N = tB ? bs[rb - 2] : bs[rb - 1];
  const batch = bshape(as.slice(0, -2), bs.slice(0, -2))!;
  const ai = bIndex(as.slice(0, -2), batch), bi = bIndex(bs.slice(0, -2), batch);
  const nb = sizeOf(batch);
  const out = new Float64Array(nb * Mm * N), fmag = new Float64Array(out.length);
  const ia = (p: number, m: number, k: number) => ai[p] * Mm * K + (tA ? k * Mm + m : m * K + k);
  const ib = (p: number, k: number, n: number) => bi[p] * K * N + (tB ? n * K + k : k * N + n);
  for (let p = 0; p < nb; p++) {
    for (let m = 0; m < Mm; m++) {
      for (let n = 0; n < N; n++) {
        let s = 0, f = 0;
        for (let k = 0; k < K; k++) {
          s += a.data[ia(p, m, k)] * b.data[ib(p, k, n)];
          f += (fm(a, ia(p, m, k)) * fm(b, ib(p, k, n))) ** 2;
        }
        out[(p * Mm + m) * N + n] = s;
        fmag[(p * Mm + m) * N + n] = Math.sqrt(f);
      }
    }
  }
  const shape = [...batch, Mm, N];
  if (vb) shape.splice(shape.length - 1, 1);
  if (va) shape.splice(shape.length - (vb ? 1 : 2), 1);
  const r = refNode(out, shape, "f32", [a, b], (g, mg) => {
    const ga = acc(a), gb = acc(b);
    for (let p = 0; p < nb; p++) {
      for (let m = 0; m < Mm; m++) {
        for (let n = 0; n < N; n++) {
          const gv = g[(p * Mm + m) * N + n], mv = mg[(p * Mm + m) * N + n];
          for (let k = 0; k < K; k++) {
            const av = a.data[ia(p, m, k)], bv = b.data[ib(p, k, n)];
            if (ga) put(ga, ia(p, m, k), gv * bv, mv * bv);
            if (gb) put(gb, ib(p, k, n), gv * av, mv * av);
          }
        }
      }
    }
  });
  r.fmag = fmag;
  return r;
}

function rmsNormR(x: RV, w: RV, eps: number): RV {
  const D = w.data.length, rows = x.data.length / Math.max(D, 1);
  const y = new Float64Array(x.data.length), rs = new Float64Array(rows);
  for (let r = 0; r < rows; r++) {
    let ms = 0;
    for (let j = 0; j < D; j++) ms += x.data[r * D + j] ** 2;
    rs[r] = 1 / Math.sqrt(ms / D + eps);
    for (let j = 0; j < D; j++) y[r * D + j] = x.data[r * D + j] * rs[r] * w.data[j];
  }
  return refNode(y, [...x.shape], "f32", [x, w], (g, mg) => {
    const gx = acc(x), gw = acc(w);
    for (let r = 0; r < rows; r++) {
      let dot = 0, dm = 0;
      for (let j = 0; j < D; j++) {
        dot += g[r * D + j] * w.data[j] * x.data[r * D + j];
        dm += mg[r * D + j] * Math.abs(w.data[j] * x.data[r * D + j]);
      }
      for (let j = 0; j < D; j++) {
        const i = r * D + j, c = rs[r] ** 3 / D;
        // two terms that cancel where x is one-dimensional: both count in the error scale
        if (gx) {
          put(
            gx,
            i,
            rs[r] * w.data[j] * g[i] - x.data[i] * c * dot,
            Math.hypot(rs[r] * w.data[j] * mg[i], x.data[i] * c * dm),
          );
        }
        if (gw) put(gw, j, g[i] * x.data[i] * rs[r], mg[i] * x.data[i] * rs[r]);
      }
    }
  });
}

function crossEntropyR(x: RV, t: RV, ignore: number, reduction: "mean" | "sum" | "none"): RV {
  const V = x.shape[x.shape.length - 1], rows = t.data.length;
  const loss = new Float64Array(rows), valid = new Float64Array(rows), lse = new Float64Array(rows);
  for (let r = 0; r < rows; r++) {
    const tv = t.data[r];
    lse[r] = lseLine(x.data, r * V, V, 1);
    if (tv === ignore) continue;
    if (tv < 0 || tv >= V) loss[r] = NaN;
    else {
      loss[r] = lse[r] - x.data[r * V + tv];
      valid[r] = 1;
    }
  }
  const count = valid.reduce((a, b) => a + b, 0);
  const total = loss.reduce((a, b) => a + b, 0);
  const data = reduction === "none"
    ? loss
    : Float64Array.of(reduction === "sum" ? total : count === 0 ? NaN : total / count);
  // a loss lse - x[t] cancels where the target dominates
  const rowMag = loss.map((_, r) => (valid[r] ? Math.abs(lse[r]) + Math.abs(x.data[r * V + t.data[r]]) : 0));
  const fmag = reduction === "none"
    ? rowMag
    : Float64Array.of(Math.hypot(...rowMag) / (reduction === "mean" ? Math.max(count, 1) : 1));
  const out = refNode(data, reduction === "none" ? [...t.shape] : [], "f32", [x], (g, mg) => {
    const gx = acc(x)!;
    for (let r = 0; r < rows; r++) {
      const k = reduction === "none" ? r : 0, f = reduction === "mean" ? 1 / Math.max(count, 1) : 1;
      for (let v = 0; v < V; v++) {
        const d = valid[r] ? Math.exp(x.data[r * V + v] - lse[r]) - (v === t.data[r] ? 1 : 0) : 0;
        put(gx, r * V + v, d * g[k] * f, d * mg[k] * f);
      }
    }
  });
  out.fmag = fmag;
  return out;
}

// ------------------------------------------------------------------------------------------ unary and binary refs

const sig = (x: number) => (x >= 0 ? 1 / (1 + Math.exp(-x)) : Math.exp(x) / (1 + Math.exp(x)));
type Deriv = (v: number[], y: number) => number;

/** Each unary op: the function, its derivative, the error scale of the derivative where it cancels (the sum of
 * the magnitudes of its terms), and the inputs' distribution (positive where needed, away from kinks). */
const UNARY: Record<M.UnaryName, { f: (x: number) => number; d: Deriv; m?: Deriv; dist: Dist }> = {
  neg: { f: (x) => -x, d: () => -1, dist: "wide" },
  exp: { f: Math.exp, d: (_, y) => y, dist: "wide" },
  log: { f: Math.log, d: ([x]) => 1 / x, dist: "pos" },
  sqrt: { f: Math.sqrt, d: (_, y) => 0.5 / y, dist: "pos" },
  rsqrt: { f: (x) => 1 / Math.sqrt(x), d: (_, y) => -0.5 * y * y * y, dist: "pos" },
  square: { f: (x) => x * x, d: ([x]) => 2 * x, dist: "wide" },
  abs: { f: Math.abs, d: ([x]) => Math.sign(x), dist: "avoid0" },
  sigmoid: { f: sig, d: (_, y) => y * (1 - y), m: (_, y) => y, dist: "wide" },
  silu: {
    f: (x) => x * sig(x),
    d: ([x]) => sig(x) * (1 + x * (1 - sig(x))),
    m: ([x]) => sig(x) * (1 + Math.abs(x)),
    dist: "wide",
  },
  softplus: {
    f: (x) => Math.max(x, 0) + Math.log1p(Math.exp(-Math.abs(x))),
    d: ([x]) => sig(x),
    dist: "wide",
  },
  tanh: { f: Math.tanh, d: (_, y) => 1 - y * y, m: (_, y) => 1 + y * y, dist: "wide" },
  relu: { f: (x) => Math.max(x, 0), d: ([x]) => (x > 0 ? 1 : 0), dist: "avoid0" },
};
const UNARY_NAMES = Object.keys(UNARY) as M.UnaryName[];

const tieShare = (a: number, b: number) => (a > b ? 1 : a === b ? 0.5 : 0);
const BINARY: Record<
  M.BinaryName,
  { f: (a: number, b: number) => number; d: (k: number, v: number[]) => number }
> = {
  add: { f: (a, b) => a + b, d: () => 1 },
  sub: { f: (a, b) => a - b, d: (k) => (k === 0 ? 1 : -1) },
  mul: { f: (a, b) => a * b, d: (k, [a, b]) => (k === 0 ? b : a) },
  div: { f: (a, b) => a / b, d: (k, [a, b]) => (k === 0 ? 1 / b : -a / (b * b)) },
  // PyTorch's conventions: no gradient through b = 0, none to b at a = 0 (b >= 0)
  pow: {
    f: Math.pow,
    d: (k, [a, b]) =>
      k === 0 ? (b === 0 ? 0 : b * Math.pow(a, b - 1)) : a === 0 && b >= 0 ? 0 : Math.pow(a, b) * Math.log(a),
  },
  maximum: { f: Math.max, d: (k, [a, b]) => (k === 0 ? tieShare(a, b) : tieShare(b, a)) },
  minimum: { f: Math.min, d: (k, [a, b]) => (k === 0 ? tieShare(b, a) : tieShare(a, b)) },
};
const INT_BINARY: Partial<Record<M.BinaryName, (a: number, b: number) => number>> = {
  add: (a, b) => (a + b) | 0,
  sub: (a, b) => (a - b) | 0,
  mul: (a, b) => Math.imul(a, b),
  maximum: Math.max,
  minimum: Math.min,
};
const COMPARE: Record<M.CompareName, (a: number, b: number) => boolean> = {
  eq: (a, b) => a === b,
  ne: (a, b) => a !== b,
  lt: (a, b) => a < b,
  le: (a, b) => a <= b,
  gt: (a, b) => a > b,
  ge: (a, b) => a >= b,
};

// ------------------------------------------------------------------------------------------ the case

/** A value of the program: the runtime's tensor and the reference's. */
interface V {
  name: string;
  t: Tensor;
  r: RV;
}

type Step =
  | { k: "narrow"; dim: number; start: number; len: number }
  | { k: "slice"; dim: number; start: number; end?: number }
  | { k: "split"; dim: number; sizes: number[]; index: number }
  | { k: "permute"; dims: number[] }
  | { k: "transpose"; d0?: number; d1?: number }
  | { k: "expand"; shape: number[] }
  | { k: "reshape"; shape: number[]; view: boolean };

interface Output {
  v: V;
  what: string;
}

class Case {
  readonly R: Rand;
  readonly lines: string[] = [];
  readonly leaves: V[] = [];
  readonly outs: Output[] = [];
  /** The values `input` made (the op's operands). */
  readonly inputs: V[] = [];
  /** Distributions of the f32 leaves (ties and kinks rule out finite differences). */
  readonly dists = new Set<string>();
  /** Set where the convention is not the derivative (embedding's padding row gets none): no finite differences. */
  noFd = false;
  readonly family: string;
  #n = 0;
  /**
   * `gpu`: run the runtime's side too (else only the reference: finite differences replay cases so);
   * `override`: data for leaves by creation index (the same random draws are made either way).
   */
  constructor(
    readonly seed: number,
    readonly gpu = true,
    readonly override: Map<number, Float64Array> | null = null,
  ) {
    this.R = new Rand(seed);
    this.family = this.R.weighted(FAMILY_WEIGHTS);
  }
  line(s: string): void {
    this.lines.push(s);
  }
  program(max = 40): string {
    const l = this.lines.length > max
      ? [...this.lines.slice(0, max), `... (${this.lines.length - max} more)`]
      : this.lines;
    return l.map((s) => `      ${s}`).join("\n");
  }
  leaf(shape: number[], dtype: DType, dist: Dist, grad?: boolean): V {
    let vals = this.R.values(sizeOf(shape), dist);
    const rg = dtype === "f32" && (grad ?? this.R.bool(0.85));
    vals = this.override?.get(this.leaves.length) ?? vals;
    if (dtype === "f32") this.dists.add(distText(dist));
    const name = `x${this.#n++}`;
    this.line(`${name} = leaf(${fmt(shape)}, ${dtype}, ${distText(dist)}${rg ? ", requiresGrad" : ""})`);
    const t = !this.gpu
      ? NO_TENSOR
      : dtype === "f32"
      ? M.tensor(Float32Array.from(vals), shape, { requiresGrad: rg })
      : M.tensor(Int32Array.from(vals), shape, { dtype: "i32" });
    const v = { name, t, r: refLeaf(vals, shape, dtype, rg) };
    this.leaves.push(v);
    return v;
  }
  op(text: string, gpu: () => Tensor, ref: () => RV): V {
    const name = `v${this.#n++}`;
    this.line(`${name} = ${text}`);
    return { name, t: this.gpu ? gpu() : NO_TENSOR, r: ref() };
  }
  out(v: V, what = v.name): V {
    this.outs.push({ v, what });
    return v;
  }
  /** A leaf of some shape, through a random chain of views that ends at `shape`. */
  input(
    shape: number[],
    dtype: DType = "f32",
    dist: Dist = "unit",
    opts: { grad?: boolean; depth?: number } = {},
  ): V {
    const depth = opts.depth ?? this.R.pick([0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 4]);
    let cur = shape;
    const steps: Step[] = [];
    for (let i = 0; i < depth; i++) {
      const s = stepInto(this.R, cur);
      if (!s) break;
      steps.unshift(s.step);
      cur = s.prev;
    }
    let v = this.leaf(cur, dtype, dist, opts.grad);
    for (const s of steps) v = this.view(v, s);
    this.inputs.push(v);
    return v;
  }
  view(x: V, s: Step): V {
    const R = this.R;
    const rank = x.r.shape.length;
    const nd = (d: number) => (d >= 0 ? d : d + rank);
    switch (s.k) {
      case "narrow": {
        const method = R.bool(0.3);
        return this.op(
          `narrow(${x.name}, ${s.dim}, ${s.start}, ${s.len})`,
          () => method ? x.t.narrow(s.dim, s.start, s.len) : M.narrow(x.t, s.dim, s.start, s.len),
          () => narrowR(x.r, nd(s.dim), s.start, s.len),
        );
      }
      case "slice": {
        // Python's slice: negative indices count from the end, then both are clamped into [0, n]
        const d = nd(s.dim), n = x.r.shape[d];
        const clip = (v: number, lo: number) => Math.min(Math.max(v < 0 ? v + n : v, lo), n);
        const st = clip(s.start, 0), en = s.end === undefined ? n : clip(s.end, st);
        return this.op(
          `slice(${x.name}, ${s.dim}, ${s.start}${s.end === undefined ? "" : `, ${s.end}`})`,
          () => x.t.slice(s.dim, s.start, s.end),
          () => narrowR(x.r, d, st, en - st),
        );
      }
      case "split": {
        const at = s.sizes.slice(0, s.index).reduce((a, b) => a + b, 0);
        return this.op(
          `split(${x.name}, ${JSON.stringify(s.sizes)}, ${s.dim})[${s.index}]`,
          () => M.split(x.t, s.sizes, s.dim)[s.index],
          () => narrowR(x.r, nd(s.dim), at, s.sizes[s.index]),
        );
      }
      case "permute": {
        const method = R.bool(0.5);
        return this.op(
          `permute(${x.name}, ${JSON.stringify(s.dims)})`,
          () => method ? x.t.permute(...s.dims) : M.permute(x.t, s.dims),
          () => permuteR(x.r, s.dims.map(nd)),
        );
      }
      case "transpose": {
        const dims = [...Array(rank).keys()];
        const a = nd(s.d0 ?? -2), b = nd(s.d1 ?? -1);
        [dims[a], dims[b]] = [dims[b], dims[a]];
        return this.op(
          `transpose(${x.name}${s.d0 === undefined ? "" : `, ${s.d0}, ${s.d1}`})`,
          () => s.d0 === undefined ? x.t.transpose() : M.transpose(x.t, s.d0, s.d1),
          () => permuteR(x.r, dims),
        );
      }
      case "expand": {
        const lead = s.shape.length - rank;
        const full = s.shape.map((d, i) => (d === -1 ? x.r.shape[i - lead] : d));
        const method = R.bool(0.5);
        return this.op(
          `expand(${x.name}, ${fmt(s.shape)})`,
          () => method ? x.t.expand(...s.shape) : M.expand(x.t, s.shape),
          () => expandR(x.r, full),
        );
      }
      case "reshape": {
        const known = sizeOf(s.shape.filter((d) => d !== -1));
        const full = s.shape.map((d) => (d === -1 ? x.r.data.length / known : d));
        return this.op(
          `${s.view ? "view" : "reshape"}(${x.name}, ${fmt(s.shape)})`,
          () => s.view ? x.t.view(...s.shape) : M.reshape(x.t, s.shape),
          () => reshapeR(x.r, full),
        );
      }
    }
  }
}

/**
 * Input chains broadcast no dim to this length or more. A long line of equal values is the worst case of f32
 * summation: every step of a sequential sum then rounds the same way, so the error grows like L u relative to
 * the sum (u = 2^-24), not like sqrt(L) u as for varied values; a kernel that sums 4099 equal squares one by
 * one (rmsNorm's rows, a matmul's K, softmax's lanes) is then off by up to 2.4e-5, which is f32's, not the
 * kernel's. (Long lines of varied values, up to 4099, are generated, and pass well within 1e-5.)
 */
const LONG = 256;

/** A random view step that yields `cur`, and the shape it applies to (null when none fits). */
function stepInto(R: Rand, cur: number[]): { step: Step; prev: number[] } | null {
  const rank = cur.length;
  const kinds: string[] = ["expand", "reshape"];
  if (rank >= 1) kinds.push("narrow", "narrow", "narrow");
  if (rank >= 2) kinds.push("permute", "permute");
  const negDim = (d: number) => (R.bool(0.3) ? d - rank : d);
  for (let tries = 0; tries < 8; tries++) {
    const kind = R.pick(kinds);
    let step: Step, prev: number[];
    if (kind === "narrow") {
      const d = R.int(0, rank - 1);
      const extra = R.pick([1, 1, 2, 3, 3, 5, 7, 13]);
      const start = R.int(0, extra);
      prev = cur.map((s, i) => (i === d ? s + extra : s));
      const n = prev[d], len = cur[d];
      const form = R.int(0, 3);
      if (form === 0) {
        step = { k: "slice", dim: negDim(d), start: start < n && R.bool() ? start - n : start }; // -0 is 0
        if (start + len !== n || R.bool()) step.end = R.bool() ? start + len - n : start + len;
        if (step.end === 0 && len > 0) step.end = start + len; // 0 is the start, not the end
        if (start + len === n && R.bool(0.2)) step.end = n + R.int(1, 9); // clamped, as in Python
      } else if (form === 1) {
        step = { k: "split", dim: negDim(d), sizes: [start, len, n - start - len], index: 1 };
      } else step = { k: "narrow", dim: negDim(d), start, len };
    } else if (kind === "permute") {
      if (R.bool(0.4)) {
        const d0 = R.int(0, rank - 1);
        let d1 = R.int(0, rank - 2);
        if (d1 >= d0) d1++;
        prev = [...cur];
        [prev[d0], prev[d1]] = [prev[d1], prev[d0]];
        step = (d0 === rank - 2 && d1 === rank - 1) || (d0 === rank - 1 && d1 === rank - 2)
          ? (R.bool() ? { k: "transpose" } : { k: "transpose", d0: negDim(d0), d1: negDim(d1) })
          : { k: "transpose", d0: negDim(d0), d1: negDim(d1) };
      } else {
        const p = R.shuffle([...Array(rank).keys()]);
        prev = new Array<number>(rank);
        p.forEach((src, i) => (prev[src] = cur[i]));
        step = { k: "permute", dims: p.map(negDim) };
      }
    } else if (kind === "expand") {
      // No dim is broadcast to LONG or more: see LONG.
      let drop = R.bool(0.5) ? 0 : R.int(0, Math.min(2, rank));
      while (cur.slice(0, drop).some((d) => d >= LONG)) drop--;
      prev = cur.slice(drop).map((d) => (d < LONG && R.bool(0.4) ? 1 : d));
      if (prev.join() === cur.join()) continue;
      const shape = cur.map((d, i) => (i >= drop && prev[i - drop] === d && R.bool(0.3) ? -1 : d));
      step = { k: "expand", shape };
    } else {
      prev = reshapeOf(R, cur);
      if (prev.length > 6) continue;
      const shape = [...cur];
      if (shape.length > 0 && !cur.includes(0) && R.bool(0.3)) shape[R.int(0, shape.length - 1)] = -1;
      step = { k: "reshape", shape, view: R.bool(0.3) };
    }
    if (sizeOf(prev) > 20000) continue;
    return { step, prev };
  }
  return null;
}

/** Another shape with as many elements: a dim split in two, two merged, a 1 added or removed, or flat. */
function reshapeOf(R: Rand, s: number[]): number[] {
  const out = [...s];
  switch (R.int(0, 4)) {
    case 0: {
      const i = out.findIndex((d) => d > 3 && d % 2 === 0);
      if (i >= 0) out.splice(i, 1, 2, out[i] / 2);
      else out.push(1);
      break;
    }
    case 1:
      if (out.length >= 2) {
        const i = R.int(0, out.length - 2);
        out.splice(i, 2, out[i] * out[i + 1]);
      } else out.unshift(1);
      break;
    case 2:
      out.splice(R.int(0, out.length), 0, 1);
      break;
    case 3: {
      const i = out.indexOf(1);
      if (i >= 0) out.splice(i, 1);
      else out.push(1);
      break;
    }
    default:
      return [sizeOf(s)];
  }
  return out;
}

// ------------------------------------------------------------------------------------------ families

type Family = (c: Case) => void;

const axisText = (a: number | number[] | undefined) => (a === undefined ? "undefined" : JSON.stringify(a));

/** A random axis of a tensor of `rank`, maybe negative (0 or -1 for a 0-d tensor, as PyTorch allows). */
function randAxis(R: Rand, rank: number): number {
  if (rank === 0) return R.pick([0, -1]);
  const a = R.int(0, rank - 1);
  return R.bool(0.35) ? a - rank : a;
}

const FAMILIES: Record<string, [number, Family]> = {
  unary: [10, (c) => {
    const R = c.R;
    const op = R.pick(UNARY_NAMES);
    const x = c.input(R.shape(R.rank()), "f32", UNARY[op].dist);
    const method = R.bool(0.3);
    c.out(c.op(
      `${op}(${x.name})`,
      () => method ? (x.t[op] as () => Tensor).call(x.t) : M[op](x.t),
      () => {
        const { f, d, m } = UNARY[op];
        return ew([x.r], f, (_k, v, y) => d(v, y), undefined, undefined, m && ((_k, v, y) => m(v, y)));
      },
    ));
  }],

  binary: [16, (c) => {
    const R = c.R;
    const op = R.pick(Object.keys(BINARY) as M.BinaryName[]);
    const [sa, sb] = R.bshapes(2);
    let da: Dist = "unit", db: Dist = "unit";
    let gradB: boolean | undefined;
    if (op === "div") db = "nonzero";
    if (op === "pow") {
      if (R.bool(0.25)) [da, db, gradB] = ["nonzero", "intgrid", false]; // integer powers of negative numbers
      else [da, db] = ["pos", R.pick(["unit", "grid"] as Dist[])];
    }
    if ((op === "maximum" || op === "minimum") && R.bool(0.5)) da = db = "grid";
    const mode = R.weighted({ tensors: 6, scalarA: 1, scalarB: 2, same: 1, windows: 1 });
    let a: V | number, b: V | number;
    if (mode === "same") {
      a = b = c.input(sa, "f32", op === "pow" ? "pos" : da);
    } else if (mode === "windows") {
      // two overlapping windows of one leaf (gradients of both land in it)
      const shape = R.shape(Math.max(1, R.rank()), { zero: false });
      const d = R.int(0, shape.length - 1), extra = R.int(1, 4);
      const x = c.leaf(shape.map((s, i) => (i === d ? s + extra : s)), "f32", op === "pow" ? "pos" : da);
      a = c.view(x, { k: "narrow", dim: d, start: R.int(0, extra), len: shape[d] });
      b = c.view(x, { k: "narrow", dim: d, start: R.int(0, extra), len: shape[d] });
    } else {
      a = mode === "scalarA" ? R.values(1, da)[0] : c.input(sa, "f32", da);
      b = mode === "scalarB" ? R.values(1, db)[0] : c.input(sb, "f32", db, { grad: gradB });
    }
    const A = a, B = b;
    const name = (o: V | number) => (typeof o === "number" ? `${o}` : o.name);
    const val = (o: V | number) => (typeof o === "number" ? o : o.t);
    const method = typeof A !== "number" && R.bool(0.3);
    c.out(c.op(
      `${op}(${name(A)}, ${name(B)})`,
      () =>
        method
          ? ((val(A) as Tensor)[op] as (o: M.Operand) => Tensor).call(val(A), val(B))
          : M[op](val(A), val(B)),
      () =>
        ew(
          [typeof A === "number" ? A : A.r, typeof B === "number" ? B : B.r],
          BINARY[op].f,
          (k, v) => BINARY[op].d(k, v),
        ),
    ));
  }],

  compare: [4, (c) => {
    const R = c.R;
    const op = R.pick(Object.keys(COMPARE) as M.CompareName[]);
    const dtype: DType = R.bool(0.3) ? "i32" : "f32";
    const dist: Dist = dtype === "i32" ? "intgrid" : "grid";
    const [sa, sb] = R.bshapes(2);
    const a = c.input(sa, dtype, dist);
    const b: V | number = R.bool(0.25) ? R.values(1, dist)[0] : c.input(sb, dtype, dist);
    const swap = R.bool(0.2);
    const bv = typeof b === "number" ? b : b.t, bn = typeof b === "number" ? `${b}` : b.name;
    const br = typeof b === "number" ? b : b.r;
    c.out(c.op(
      swap ? `compare(${op}, ${bn}, ${a.name})` : `compare(${op}, ${a.name}, ${bn})`,
      () => swap ? M.compare(op, bv, a.t) : M.compare(op, a.t, bv),
      () =>
        ew(
          swap ? [br, a.r] : [a.r, br],
          (x, y) => (COMPARE[op](x, y) ? 1 : 0),
          null,
          "f32",
        ),
    ));
  }],

  where: [5, (c) => {
    const R = c.R;
    const [s0, s1, s2] = R.bshapes(3);
    const cond = c.input(s0, "f32", "mask", { grad: R.bool(0.2) });
    const a = c.input(s1, "f32");
    const b = R.bool(0.15) ? a : c.input(s2, "f32");
    c.out(c.op(
      `where(${cond.name}, ${a.name}, ${b.name})`,
      () => M.where(cond.t, a.t, b.t),
      () =>
        ew(
          [cond.r, a.r, b.r],
          (k, x, y) => (k !== 0 ? x : y),
          (k, [q]) => (k === 1 ? (q !== 0 ? 1 : 0) : q !== 0 ? 0 : 1),
          "f32",
          [false, true, true],
        ),
    ));
  }],

  clamp: [3, (c) => {
    const R = c.R;
    const x = c.input(R.shape(R.rank()), "f32", "grid");
    const mode = R.int(0, 3);
    let lo: number | undefined = mode & 1 ? R.int(-8, 4) / 4 : undefined;
    let hi: number | undefined = mode & 2 ? R.int(-4, 8) / 4 : undefined;
    if (lo !== undefined && hi !== undefined && lo > hi) [lo, hi] = [hi, lo];
    const L = lo ?? -F32_MAX, H = hi ?? F32_MAX;
    const method = R.bool(0.5);
    c.out(c.op(
      `clamp(${x.name}, ${lo}, ${hi})`,
      () => method ? x.t.clamp(lo, hi) : M.clamp(x.t, lo, hi),
      () => ew([x.r], (v) => Math.min(Math.max(v, L), H), (_k, [v]) => (v >= L && v <= H ? 1 : 0)),
    ));
  }],

  int: [5, (c) => {
    const R = c.R;
    const op = R.pick(Object.keys(INT_BINARY) as M.BinaryName[]);
    const dist: Dist = R.pick(["int", "intfull"] as Dist[]);
    const [sa, sb] = R.bshapes(2);
    const a = c.input(sa, "i32", dist);
    const b: V | number = R.bool(0.3) ? R.values(1, dist)[0] : R.bool(0.1) ? a : c.input(sb, "i32", dist);
    const swap = typeof b === "number" && R.bool(0.3);
    const bv = typeof b === "number" ? b : b.t, bn = typeof b === "number" ? `${b}` : b.name;
    const br = typeof b === "number" ? b : b.r;
    const f = INT_BINARY[op]!;
    c.out(c.op(
      swap ? `${op}(${bn}, ${a.name})` : `${op}(${a.name}, ${bn})`,
      () => swap ? M[op](bv, a.t) : M[op](a.t, bv),
      () => ew(swap ? [br, a.r] : [a.r, br], f, null, "i32"),
    ));
  }],

  view: [4, (c) => {
    const R = c.R;
    const dtype: DType = R.bool(0.35) ? "i32" : "f32";
    c.out(c.input(R.shape(R.rank()), dtype, dtype === "i32" ? "intfull" : "unit", { depth: R.int(1, 4) }));
  }],

  reduce: [12, (c) => {
    const R = c.R;
    const kind = R.pick(["sum", "mean", "max"] as const);
    const rank = R.rank();
    const shape = R.shape(rank, { zero: kind !== "max", big: 0.12 });
    const x = c.input(
      shape,
      "f32",
      kind === "max" && R.bool(0.6) ? "grid" : R.pick(["unit", "unit", "big"] as Dist[]),
    );
    const mode = rank === 0 ? R.int(0, 1) : R.int(0, 4);
    let axis: number | number[] | undefined;
    if (mode === 0) axis = undefined;
    else if (mode <= 2) axis = randAxis(R, rank);
    else {
      const set = R.shuffle([...Array(rank).keys()]).slice(0, R.int(1, rank));
      axis = set.map((a) => (R.bool(0.3) ? a - rank : a));
    }
    const keepdim = R.bool(0.4);
    const fn = R.int(0, 2); // free function, method, or default keepdim
    c.out(c.op(
      `${kind}(${x.name}, ${axisText(axis)}${fn === 2 ? "" : `, ${keepdim}`})`,
      () => fn === 0 ? M[kind](x.t, axis, keepdim) : fn === 1 ? x.t[kind](axis, keepdim) : M[kind](x.t, axis),
      () => reduceR(x.r, normAxes(rank, axis), fn === 2 ? false : keepdim, kind),
    ));
  }],

  softmax: [7, (c) => {
    const R = c.R;
    const kind = R.pick(["softmax", "logSoftmax", "logsumexp"] as const);
    const rank = R.rank();
    const shape = R.shape(rank, { big: 0.12 });
    const axis = randAxis(R, rank);
    const a = rank === 0 ? 0 : (axis + rank) % rank;
    if (kind === "logsumexp" && shape[a] === 0) shape[a] = 1; // PyTorch: -inf; here an error (see report)
    const x = c.input(shape, "f32", R.pick(["unit", "big", "grid"] as Dist[]));
    if (kind === "logsumexp") {
      const keepdim = R.bool(0.4), method = R.bool();
      c.out(c.op(
        `logsumexp(${x.name}, ${axis}, ${keepdim})`,
        () => method ? x.t.logsumexp(axis, keepdim) : M.logsumexp(x.t, axis, keepdim),
        () => logsumexpR(x.r, a, keepdim),
      ));
    } else {
      const dflt = R.bool(0.3);
      c.out(c.op(
        `${kind}(${x.name}${dflt ? "" : `, ${axis}`})`,
        () => dflt ? M[kind](x.t) : M[kind](x.t, axis),
        () => softmaxR(x.r, dflt ? rank - 1 : a, kind === "logSoftmax"),
      ));
    }
  }],

  matmul: [10, (c) => {
    const R = c.R;
    const mdim = () => R.pick([1, 1, 2, 3, 4, 5, 7, 8, 9, 12, 16, 17, 31, 32, 33, 64, R.int(65, 140)]);
    let K = R.bool(0.1) ? R.int(300, 2100) : R.pick([0, 1, 1, 2, 3, 4, 5, 7, 8, 12, 16, 17, 32, 33, 64]);
    let Mm = mdim(), N = mdim();
    const ranks = [1, 2, 2, 2, 3, 3, 4, 4, 5, 6];
    const ra = R.pick(ranks), rb = R.pick(ranks);
    const out = Array.from({ length: Math.max(ra, rb, 2) - 2 }, () => R.int(1, 4));
    const lead = (r: number) =>
      r <= 2 ? [] : out.slice(out.length - (r - 2)).map((d) => (R.bool(0.35) ? 1 : d));
    while (sizeOf(out) * Mm * N * Math.max(K, 1) > 400000) {
      if (K > 64) K = Math.ceil(K / 2);
      else if (Mm >= N) Mm = Math.ceil(Mm / 2);
      else N = Math.ceil(N / 2);
    }
    const transA = ra >= 2 && R.bool(0.4), transB = rb >= 2 && R.bool(0.4);
    const la = lead(ra), lb = lead(rb);
    const selfUse = ra >= 2 && R.bool(0.12);
    let a: V, b: V, tA = transA, tB = transB;
    if (selfUse) {
      // x @ x^T or x^T @ x: one leaf for both operands
      a = b = c.input([...la, Mm, K]);
      [tA, tB] = R.bool() ? [false, true] : [true, false];
    } else {
      a = c.input(ra === 1 ? [K] : [...la, ...(transA ? [K, Mm] : [Mm, K])]);
      b = c.input(rb === 1 ? [K] : [...lb, ...(transB ? [N, K] : [K, N])]);
    }
    const opts = tA || tB ? { transA: tA, transB: tB } : R.bool() ? undefined : {};
    const method = R.bool(0.3);
    c.out(c.op(
      `matmul(${a.name}, ${b.name}${opts ? `, ${JSON.stringify(opts)}` : ""})`,
      () => method ? a.t.matmul(b.t, opts) : M.matmul(a.t, b.t, opts),
      () => matmulR(a.r, b.r, tA, tB),
    ));
  }],

  cat: [6, (c) => {
    const R = c.R;
    const dtype: DType = R.bool(0.2) ? "i32" : "f32";
    const rank = R.rank(4, 1);
    const base = R.shape(rank, { max: 1500 });
    const d = R.int(0, rank - 1);
    const n = R.int(1, 4);
    const xs: V[] = [];
    for (let k = 0; k < n; k++) {
      if (k > 0 && R.bool(0.15)) xs.push(R.pick(xs));
      else {xs.push(
          c.input(base.map((s, i) => (i === d ? R.dim() : s)), dtype, dtype === "i32" ? "int" : "unit"),
        );}
    }
    const dim = R.bool(0.3) ? d - rank : d;
    const dflt = d === 0 && R.bool(0.3);
    c.out(c.op(
      `cat([${xs.map((x) => x.name).join(", ")}]${dflt ? "" : `, ${dim}`})`,
      () => dflt ? M.cat(xs.map((x) => x.t)) : M.cat(xs.map((x) => x.t), dim),
      () => catR(xs.map((x) => x.r), d),
    ));
  }],

  split: [4, (c) => {
    const R = c.R;
    const rank = R.rank(4, 1);
    const x = c.input(R.shape(rank), "f32");
    const d = R.int(0, rank - 1), n = x.r.shape[d];
    const dim = R.bool(0.3) ? d - rank : d;
    const mode = R.int(0, 2), method = R.bool();
    let sizes: number[], text: string, run: () => Tensor[];
    if (mode === 0) {
      const s = R.int(1, Math.max(1, n + 1));
      sizes = [];
      for (let at = 0; at < n; at += s) sizes.push(Math.min(s, n - at));
      text = `split(${x.name}, ${s}, ${dim})`;
      run = () => (method ? x.t.split(s, dim) : M.split(x.t, s, dim));
    } else if (mode === 1) {
      sizes = [];
      let left = n;
      while (left > 0 || R.bool(0.2)) {
        const s = Math.min(left, R.int(0, Math.max(1, Math.ceil(n / 2))));
        sizes.push(s);
        left -= s;
        if (sizes.length > 8) {
          sizes.push(left);
          left = 0;
        }
      }
      if (sizes.length === 0) sizes.push(0);
      const list = [...sizes];
      text = `split(${x.name}, ${JSON.stringify(list)}, ${dim})`;
      run = () => M.split(x.t, list, dim);
    } else {
      const k = R.int(1, 6);
      sizes = n === 0 ? new Array<number>(k).fill(0) : [];
      for (let at = 0; at < n; at += Math.ceil(n / k)) sizes.push(Math.min(Math.ceil(n / k), n - at));
      text = `chunk(${x.name}, ${k}, ${dim})`;
      run = () => (method ? x.t.chunk(k, dim) : M.chunk(x.t, k, dim));
    }
    let pieces: Tensor[] = [];
    const all = c.op(`${text} (${sizes.length} pieces)`, () => {
      pieces = run();
      return pieces[0] ?? x.t;
    }, () => x.r);
    if (c.gpu && pieces.length !== sizes.length) {
      throw new Error(
        `${text}: ${pieces.length} pieces, expected ${sizes.length} (sizes ${JSON.stringify(sizes)})`,
      );
    }
    let at = 0;
    sizes.forEach((s, i) => {
      const start = at;
      at += s;
      if (!R.bool(0.75)) return;
      c.out({ name: `${all.name}[${i}]`, t: pieces[i], r: narrowR(x.r, d, start, s) });
    });
  }],

  pad: [4, (c) => {
    const R = c.R;
    const dtype: DType = R.bool(0.2) ? "i32" : "f32";
    const rank = R.rank();
    const x = c.input(R.shape(rank, { max: 1500 }), dtype, dtype === "i32" ? "int" : "unit");
    const k = R.int(0, rank);
    const padding = Array.from({ length: 2 * k }, () => R.pick([0, 0, 1, 2, 3, 5]));
    const value = R.bool(0.5) ? 0 : dtype === "i32" ? R.int(-9, 9) : R.values(1, "grid")[0];
    const dflt = value === 0 && R.bool();
    c.out(c.op(
      `pad(${x.name}, ${JSON.stringify(padding)}${dflt ? "" : `, ${value}`})`,
      () => dflt ? M.pad(x.t, padding) : M.pad(x.t, padding, value),
      () => padR(x.r, padding, value),
    ));
  }],

  gather: [4, (c) => {
    const R = c.R;
    const dtype: DType = R.bool(0.2) ? "i32" : "f32";
    const rank = R.rank(4, 1);
    const xs = R.shape(rank, { max: 1500 });
    const d = R.int(0, rank - 1);
    const x = c.input(xs, dtype, dtype === "i32" ? "intfull" : "unit");
    const J = R.bool(0.1) ? R.int(40, 300) : R.dim();
    const idxShape = xs.map((s, i) => (i === d ? J : s));
    if (sizeOf(idxShape) > 20000) idxShape[d] = 1;
    const idx = c.input(idxShape, "i32", { index: xs[d], bad: R.bool(0.15) ? 0.1 : 0 });
    const dim = R.bool(0.3) ? d - rank : d;
    c.out(c.op(
      `gather(${x.name}, ${dim}, ${idx.name})`,
      () => M.gather(x.t, dim, idx.t),
      () => gatherR(x.r, d, idx.r),
    ));
  }],

  indexSelect: [4, (c) => {
    const R = c.R;
    const dtype: DType = R.bool(0.2) ? "i32" : "f32";
    const rank = R.rank(4, 1);
    const xs = R.shape(rank, { max: 1500 });
    const d = R.int(0, rank - 1);
    const x = c.input(xs, dtype, dtype === "i32" ? "intfull" : "unit");
    const ir = R.pick([0, 1, 1, 1, 2]);
    const is = R.bool(0.1) && ir > 0 ? [R.int(1000, 5000)] : R.shape(ir, { big: 0, max: 60 });
    if (sizeOf(is) * sizeOf(xs) / Math.max(xs[d], 1) > 100000) is.fill(1);
    const idx = c.input(is, "i32", { index: xs[d], bad: R.bool(0.15) ? 0.1 : 0 });
    const dim = R.bool(0.3) ? d - rank : d;
    c.out(c.op(
      `indexSelect(${x.name}, ${dim}, ${idx.name})`,
      () => M.indexSelect(x.t, dim, idx.t),
      () => indexSelectR(x.r, d, idx.r),
    ));
  }],

  embedding: [2, (c) => {
    const R = c.R;
    const V = R.int(1, 40), D = R.dim(false);
    const w = c.input([V, D], "f32");
    const ids = c.input(R.shape(R.rank(3), { max: 300 }), "i32", { index: V, bad: R.bool(0.1) ? 0.1 : 0 });
    const pad = R.bool(0.5) ? null : R.int(-V, V - 1);
    c.noFd = pad !== null;
    c.out(c.op(
      `embedding(${w.name}, ${ids.name}, ${pad})`,
      () => M.embedding(w.t, ids.t, pad),
      () => indexSelectR(w.r, 0, ids.r, pad === null ? -1 : pad < 0 ? pad + V : pad),
    ));
  }],

  rmsNorm: [2, (c) => {
    const R = c.R;
    const shape = R.shape(R.rank(4, 1), { zero: false, big: 0.1 });
    const D = shape[shape.length - 1];
    const x = c.input(shape, "f32", R.pick(["unit", "wide"] as Dist[]));
    const w = c.input([D], "f32", "wide");
    const eps = R.pick([1e-5, 1e-6, 0.01]);
    c.out(c.op(
      `rmsNorm(${x.name}, ${w.name}, ${eps})`,
      () => M.rmsNorm(x.t, w.t, eps),
      () => rmsNormR(x.r, w.r, eps),
    ));
  }],

  crossEntropy: [3, (c) => {
    const R = c.R;
    const V = R.bool(0.1) ? R.int(1000, 1100) : R.int(1, 40);
    const lead = R.shape(R.rank(2), { big: 0, max: V > 100 ? 6 : 200 });
    const logits = c.input([...lead, V], "f32", R.pick(["unit", "big"] as Dist[]));
    const ignoreIndex = R.pick([undefined, -100, -1, R.int(0, V - 1)]);
    const target = c.input(lead, "i32", {
      index: V,
      bad: R.bool(0.1) ? 0.1 : 0,
      ignore: ignoreIndex ?? -100,
    });
    const reduction = R.pick([undefined, "mean", "sum", "none"] as const);
    const opts = {
      ...(ignoreIndex === undefined ? {} : { ignoreIndex }),
      ...(reduction ? { reduction } : {}),
    };
    c.out(c.op(
      `crossEntropy(${logits.name}, ${target.name}, ${JSON.stringify(opts)})`,
      () => M.crossEntropy(logits.t, target.t, opts),
      () => crossEntropyR(logits.r, target.r, ignoreIndex ?? -100, reduction ?? "mean"),
    ));
  }],
};

const tanhR = (x: RV) =>
  ew([x], Math.tanh, (_k, _v, y) => 1 - y * y, undefined, undefined, (_k, _v, y) => 1 + y * y);

/**
 * Now and then a follow-up on the (first) output, kept as another output: a view, tanh, or a sum; and now
 * and then another use of one of the op's operands (tanh of it), so that its gradient sums two paths (made
 * later, its backward runs first: matmul then adds into that gradient in place).
 */
function followUp(c: Case): void {
  const R = c.R;
  const f32 = c.inputs.filter((v) => v.r.dtype === "f32");
  if (f32.length && R.bool(0.12)) {
    const v = R.pick(f32);
    c.out(c.op(`tanh(${v.name})`, () => M.tanh(v.t), () => tanhR(v.r)));
  }
  const o = c.outs[0]?.v;
  if (!o || !R.bool(0.2)) return;
  const rank = o.r.shape.length;
  const kind = o.r.dtype === "i32" ? "view" : R.pick(["view", "view", "tanh", "sum"]);
  if (kind === "tanh") {
    c.out(c.op(`tanh(${o.name})`, () => M.tanh(o.t), () => tanhR(o.r)));
  } else if (kind === "sum") {
    const axis = randAxis(R, rank);
    c.out(
      c.op(
        `sum(${o.name}, ${axis})`,
        () => M.sum(o.t, axis),
        () => reduceR(o.r, normAxes(rank, axis), false, "sum"),
      ),
    );
  } else {
    // a view of the result: a window, a permutation or a reshape of it
    const s = o.r.shape;
    let step: Step;
    const k = R.int(0, 2);
    if (k === 0 && rank >= 1 && s.some((d) => d > 0)) {
      const d = s.findIndex((x) => x > 0);
      const len = R.int(0, s[d]);
      step = { k: "narrow", dim: d, start: R.int(0, s[d] - len), len };
    } else if (k === 1 && rank >= 2) step = { k: "permute", dims: R.shuffle([...Array(rank).keys()]) };
    else step = { k: "reshape", shape: reshapeOf(R, [...s]), view: false };
    c.out(c.view(o, step));
  }
}

// ------------------------------------------------------------------------------------------ invalid arguments

interface Invalid {
  text: string;
  /** Makes the inputs (outside the measured region). */
  make: () => unknown[];
  /** The call that must throw. */
  call: (inputs: unknown[]) => unknown;
  /** What the message must say. */
  re: RegExp;
  /** An Error or a result are both fine (PyTorch accepts it too), but no crash, leak or NaN in a message. */
  mayReturn?: boolean;
}

const z = (shape: number[], dtype: DType = "f32") => M.zeros(shape, { dtype });

/** A shape that does not broadcast with `s` (needs a dim >= 2 somewhere: `s` is given one). */
function clash(R: Rand, s: number[]): { a: number[]; b: number[]; dim: number; x: number; y: number } {
  const a = s.length ? [...s] : [R.int(2, 5)];
  const j = R.int(0, a.length - 1);
  if (a[j] < 2) a[j] = R.int(2, 5);
  const b = a.slice(R.int(0, j)).map((d) => (R.bool(0.3) ? 1 : d));
  const jb = j - (a.length - b.length);
  b[jb] = a[j] + R.int(1, 3);
  const n = Math.max(a.length, b.length);
  return { a, b, dim: n - a.length + j, x: a[j], y: b[jb] };
}

function invalidCase(R: Rand): Invalid {
  const rank = R.rank(4, 1);
  const s = R.shape(rank, { zero: false, big: 0, max: 200 });
  const kind = R.int(0, 27);
  switch (kind) {
    case 0: {
      const op = R.pick([...Object.keys(BINARY), ...Object.keys(COMPARE)]);
      const { a, b, dim, x, y } = clash(R, s);
      const swap = R.bool();
      const [p, q] = swap ? [b, a] : [a, b];
      return {
        text: `${op}(zeros(${fmt(p)}), zeros(${fmt(q)}))`,
        make: () => [z(p), z(q)],
        call: ([u, v]) =>
          op in BINARY
            ? M[op as M.BinaryName](u as Tensor, v as Tensor)
            : M.compare(op as M.CompareName, u as Tensor, v as Tensor),
        re: new RegExp(
          `^${op}: shapes ${esc(fmt(p))} and ${esc(fmt(q))} cannot be broadcast together \\(dim ${dim}: ${
            swap ? `${y} vs ${x}` : `${x} vs ${y}`
          }\\)`,
        ),
      };
    }
    case 1: {
      const op = R.pick(Object.keys(INT_BINARY) as M.BinaryName[]);
      return {
        text: `${op}(f32 ${fmt(s)}, i32 ${fmt(s)})`,
        make: () => [z(s), z(s, "i32")],
        call: ([u, v]) => M[op](u as Tensor, v as Tensor),
        re: new RegExp(
          `^${op}: dtypes differ \\(Tensor\\(${esc(fmt(s))}, f32\\) and Tensor\\(${esc(fmt(s))}, i32\\)\\)`,
        ),
      };
    }
    case 2: {
      const op = R.pick(["div", "pow"] as const);
      return {
        text: `${op}(i32, i32)`,
        make: () => [z(s, "i32"), z(s, "i32")],
        call: ([u, v]) => M[op](u as Tensor, v as Tensor),
        re: new RegExp(`^${op} needs f32 tensors, got i32`),
      };
    }
    case 3: {
      const op = R.pick(UNARY_NAMES);
      return {
        text: `${op}(i32)`,
        make: () => [z(s, "i32")],
        call: ([u]) => M[op](u as Tensor),
        re: new RegExp(`^${op} needs an f32 tensor, got i32`),
      };
    }
    case 4: {
      const op = R.pick(Object.keys(INT_BINARY) as M.BinaryName[]);
      const v = R.pick([0.5, -1.25, 2 ** 31, -(2 ** 31) - 1]);
      return {
        text: `${op}(i32, ${v})`,
        make: () => [z(s, "i32")],
        call: ([u]) => M[op](u as Tensor, v),
        re: new RegExp(
          `^${op}: an i32 tensor with a scalar that is not an int32 integer \\(${esc(String(v))}\\)`,
        ),
      };
    }
    case 5:
    case 6: {
      // axis out of range (0-d tensors included: PyTorch takes 0 and -1 there, nothing else)
      const op = R.pick(
        [
          "sum",
          "mean",
          "max",
          "logsumexp",
          "softmax",
          "logSoftmax",
          "transpose",
          "narrow",
          "split",
          "chunk",
          "cat",
          "indexSelect",
          "gather",
        ] as const,
      );
      const r = ["sum", "mean", "max", "logsumexp", "softmax", "logSoftmax"].includes(op) && R.bool(0.3)
        ? 0
        : rank;
      const shape = r === 0 ? [] : s;
      const axis = R.pick([Math.max(r, 1), -Math.max(r, 1) - 1, r + 3, 1.5]);
      const calls: Record<typeof op, (t: Tensor, i: Tensor, j: Tensor) => unknown> = {
        sum: (t) => M.sum(t, axis),
        mean: (t) => M.mean(t, [axis]),
        max: (t) => M.max(t, axis, true),
        logsumexp: (t) => M.logsumexp(t, axis),
        softmax: (t) => M.softmax(t, axis),
        logSoftmax: (t) => M.logSoftmax(t, axis),
        transpose: (t) => M.transpose(t, 0, axis),
        narrow: (t) => M.narrow(t, axis, 0, 1),
        split: (t) => M.split(t, 1, axis),
        chunk: (t) => M.chunk(t, 2, axis),
        cat: (t) => M.cat([t, t], axis),
        indexSelect: (t, i) => M.indexSelect(t, axis, i),
        gather: (t, _i, j) => M.gather(t, axis, j),
      };
      return {
        text: `${op}(zeros(${fmt(shape)}), axis ${axis})`,
        make: () => [z(shape), z([2], "i32"), z(shape, "i32")],
        call: ([t, i, j]) => calls[op](t as Tensor, i as Tensor, j as Tensor),
        re: new RegExp(
          `^${op}: dim ${esc(String(axis))} ${
            Number.isInteger(axis) ? `is out of range for a tensor of rank ${r}` : "is not an integer"
          }`,
        ),
      };
    }
    case 7: {
      const op = R.pick(["sum", "mean", "max"] as const);
      const a = R.int(0, rank - 1);
      const list = [a, R.bool() ? a : a - rank];
      return {
        text: `${op}(zeros(${fmt(s)}), ${JSON.stringify(list)})`,
        make: () => [z(s)],
        call: ([t]) => M[op](t as Tensor, list),
        re: new RegExp(`^${op}: repeated dim in ${esc(JSON.stringify(list))}`),
      };
    }
    case 8: {
      const shape = [...s];
      const a = R.int(0, rank - 1);
      shape[a] = 0;
      const op = R.pick(["max", "logsumexp"] as const);
      return {
        text: `${op}(zeros(${fmt(shape)}), ${a})`,
        make: () => [z(shape)],
        call: ([t]) => (op === "max" ? M.max(t as Tensor, a) : M.logsumexp(t as Tensor, a)),
        re: new RegExp(`max over an empty dim of shape ${esc(fmt(shape))}`),
        mayReturn: op === "logsumexp", // PyTorch: -inf
      };
    }
    case 9: {
      const d = R.int(0, rank - 1), n = s[d];
      const [start, len] = R.pick([[0, n + 1], [n, 1], [-1, 1], [1, -1], [0.5, 1], [n + 2, 0]]);
      return {
        text: `narrow(zeros(${fmt(s)}), ${d}, ${start}, ${len})`,
        make: () => [z(s)],
        call: ([t]) => M.narrow(t as Tensor, d, start, len),
        re: Number.isInteger(start)
          ? new RegExp(
            `^narrow: \\[${esc(String(start))}, ${
              esc(String(start + len))
            }\\) is outside dim ${d} of size ${n}`,
          )
          : new RegExp(`^narrow: start and length must be integers, got ${esc(String(start))} and ${len}`),
      };
    }
    case 10: {
      const bad = R.pick([
        [...Array(rank + 1).keys()],
        [...Array(Math.max(rank - 1, 0)).keys()],
        rank >= 2 ? [0, 0, ...[...Array(rank - 2).keys()].map((i) => i + 2)] : [0, 0],
      ]);
      return {
        text: `permute(zeros(${fmt(s)}), ${JSON.stringify(bad)})`,
        make: () => [z(s)],
        call: ([t]) => M.permute(t as Tensor, bad),
        re: /^permute: (\[.*\] is not a permutation of the \d+ dims|dim \d+ is out of range)/,
      };
    }
    case 11: {
      const n = sizeOf(s);
      const shape = R.pick([[n + 1], [n, 2], [-1, n + 1], [-1, -1]]);
      return {
        text: `reshape(zeros(${fmt(s)}), ${fmt(shape)})`,
        make: () => [z(s)],
        call: ([t]) => M.reshape(t as Tensor, shape),
        // the message names what was asked for ([-1, -1]: "only one dim can be inferred", PyTorch)
        re: new RegExp(`^reshape.*${esc(fmt(shape))}`),
      };
    }
    case 12: {
      const { a, b } = clash(R, s);
      const to = b.length >= a.length ? b : [...a.slice(0, a.length - b.length), ...b];
      if (to.length < a.length) to.unshift(...a.slice(0, a.length - to.length));
      const fewer = R.bool(0.3) && a.length > 1;
      const target = fewer ? a.slice(1) : to;
      return {
        text: `expand(zeros(${fmt(a)}), ${fmt(target)})`,
        make: () => [z(a)],
        call: ([t]) => M.expand(t as Tensor, target),
        re: fewer
          ? new RegExp(`^expand: ${esc(fmt(target))} has fewer dims than ${esc(fmt(a))}`)
          : new RegExp(`^expand: cannot expand ${esc(fmt(a))} to ${esc(fmt(target))}`),
      };
    }
    case 13: {
      const d = R.int(0, rank - 1);
      const other = [...s];
      const j = rank > 1 ? (d + 1) % rank : 0;
      const mode = rank > 1 ? R.int(0, 2) : R.int(1, 2);
      if (mode === 0) other[j] += 1;
      const o = mode === 2 ? [...s, 1] : other;
      const dt: DType = mode === 1 ? "i32" : "f32";
      return {
        text: `cat([zeros(${fmt(s)}), zeros(${fmt(o)}, ${dt})], ${d})`,
        make: () => [z(s), z(o, dt)],
        call: ([u, v]) => M.cat([u as Tensor, v as Tensor], d),
        re: new RegExp(
          `^cat: Tensor\\(${esc(fmt(o))}, ${dt}\\) does not match Tensor\\(${
            esc(fmt(s))
          }, f32\\) outside dim ${d}`,
        ),
      };
    }
    case 14:
      return {
        text: "cat([])",
        make: () => [],
        call: () => M.cat([]),
        re: /^cat: needs at least one tensor/,
      };
    case 15: {
      const d = R.int(0, rank - 1), n = s[d];
      const sizes = R.pick([[n + 1], [n, 1], [-1, n + 1], [0.5, n - 0.5], 0, -2, 1.5]);
      return {
        text: `split(zeros(${fmt(s)}), ${JSON.stringify(sizes)}, ${d})`,
        make: () => [z(s)],
        call: ([t]) => M.split(t as Tensor, sizes, d),
        re: typeof sizes === "number"
          ? new RegExp(`^split: size must be a positive integer, got ${esc(String(sizes))}`)
          : sizes.every((v) => Number.isInteger(v) && v >= 0)
          ? new RegExp(
            `^split: sizes ${esc(JSON.stringify(sizes))} sum to ${
              sizes.reduce((x, y) => x + y, 0)
            }, dim ${d} has ${n}`,
          )
          : new RegExp(`^split: sizes ${esc(JSON.stringify(sizes))} must be non-negative integers`),
      };
    }
    case 16: {
      const k = R.pick([0, -1, 1.5]);
      return {
        text: `chunk(zeros(${fmt(s)}), ${k})`,
        make: () => [z(s)],
        call: ([t]) => M.chunk(t as Tensor, k),
        re: new RegExp(`^chunk: the number of chunks must be a positive integer, got ${esc(String(k))}`),
      };
    }
    case 17: {
      const padding = R.pick([[1], [1, 2, 3], new Array(2 * rank + 2).fill(1), [-1, 0], [0.5, 1]]);
      return {
        text: `pad(zeros(${fmt(s)}), ${JSON.stringify(padding)})`,
        make: () => [z(s)],
        call: ([t]) => M.pad(t as Tensor, padding),
        re: new RegExp(
          `^pad: padding ${esc(JSON.stringify(padding))} must be non-negative pairs for at most ${rank} dims`,
        ),
      };
    }
    case 18: {
      const d = R.int(0, rank - 1);
      const f32 = R.bool(0.3);
      const is = f32 ? s : rank === 1 || R.bool() ? [...s, 2] : s.map((v, i) => (i !== d ? v + 1 : v));
      return {
        text: `gather(zeros(${fmt(s)}), ${d}, zeros(${fmt(is)}, ${f32 ? "f32" : "i32"}))`,
        make: () => [z(s), z(is, f32 ? "f32" : "i32")],
        call: ([t, i]) => M.gather(t as Tensor, d, i as Tensor),
        re: f32
          ? /^gather: indices must be an i32 tensor, got f32/
          : new RegExp(`^gather: index ${esc(fmt(is))} must match x ${esc(fmt(s))} in every dim but ${d}`),
      };
    }
    case 19: {
      const op = R.pick(["indexSelect", "embedding"] as const);
      return {
        text: `${op}(zeros(${fmt(s)}), f32 index)`,
        make: () => [z(op === "embedding" ? [5, 3] : s), z([2])],
        call: (
          [t, i],
        ) => (op === "embedding"
          ? M.embedding(t as Tensor, i as Tensor)
          : M.indexSelect(t as Tensor, 0, i as Tensor)),
        re: new RegExp(`^${op}: indices must be an i32 tensor, got f32`),
      };
    }
    case 20: {
      const mode = R.int(0, 4);
      const Kx = R.int(2, 6);
      const shapes: [number[], number[]] = mode === 0
        ? [[R.int(1, 4), Kx], [Kx + R.int(1, 3), R.int(1, 4)]]
        : mode === 1
        ? [[2, R.int(1, 3), Kx], [3, Kx, R.int(1, 3)]]
        : mode === 2
        ? [[], [Kx]]
        : mode === 3
        ? [[2, Kx], [Kx, 2]]
        : [[1, 1, 1, 1, 1, 2, Kx], [Kx, 2]];
      return {
        text: `matmul(${fmt(shapes[0])}, ${fmt(shapes[1])}${mode === 3 ? " i32" : ""})`,
        make: () => [z(shapes[0], mode === 3 ? "i32" : "f32"), z(shapes[1])],
        call: ([u, v]) => M.matmul(u as Tensor, v as Tensor),
        re: [
          /^matmul: inner dims differ: \[\d+, \d+\] @ \[\d+, \d+\] \(\d+ vs \d+\)/,
          /^matmul batch dims: shapes \[2\] and \[3\] cannot be broadcast together/,
          /^matmul: operands must have rank >= 1/,
          /^matmul needs f32 tensors/,
          /^matmul: at most 4 batch dims, got \[1, 1, 1, 1, 1\]/,
        ][mode],
      };
    }
    case 21: {
      const mode = R.int(0, 2);
      const { a, b } = clash(R, s);
      return {
        text: `where(${
          mode === 0 ? `mask ${fmt(a)}, x ${fmt(b)}, y ${fmt(a)}` : mode === 1 ? "i32 cond" : "i32 x"
        })`,
        make: () =>
          mode === 0
            ? [z(a), z(b), z(a)]
            : mode === 1
            ? [z(s, "i32"), z(s), z(s)]
            : [z(s), z(s, "i32"), z(s)],
        call: ([q, u, v]) => M.where(q as Tensor, u as Tensor, v as Tensor),
        re: [
          new RegExp(`^where: shapes ${esc(fmt(a))} and ${esc(fmt(b))} cannot be broadcast together`),
          /^where: the condition must be an f32 mask, got i32/,
          /^where needs an f32 tensor, got i32/,
        ][mode],
      };
    }
    case 22:
      return {
        text: "clamp(x, 2, 1)",
        make: () => [z(s)],
        call: ([t]) => M.clamp(t as Tensor, 2, 1),
        re: /^clamp: min 2 is greater than max 1/,
      };
    case 23: {
      const mode = R.int(0, 2);
      const shape = mode === 1 && sizeOf(s) === 1 ? [...s, 2] : s;
      const g = mode === 0 ? [...shape, 2] : shape;
      return {
        text: `backward(${
          [
            "with a gradient of the wrong shape",
            "of a non-scalar without a gradient",
            "of a tensor that needs no grad",
          ][mode]
        })`,
        make: () => {
          const x = M.ones(shape, { requiresGrad: mode !== 2 });
          return [x, M.mul(x, 2), z(g)];
        },
        call: ([, y, gr]) => (mode === 1 ? (y as Tensor).backward() : (y as Tensor).backward(gr as Tensor)),
        re: [
          new RegExp(
            `^backward\\(\\): gradient shape ${esc(fmt(g))} differs from tensor shape ${esc(fmt(shape))}`,
          ),
          new RegExp(`^backward\\(\\) without a gradient needs a scalar, got shape ${esc(fmt(shape))}`),
          /^backward\(\): Tensor\(.*\) does not require grad/,
        ][mode],
      };
    }
    case 24: {
      const mode = R.int(0, 3);
      const V = R.int(2, 5);
      return {
        text: [
          "crossEntropy(target shape)",
          "crossEntropy(f32 target)",
          "rmsNorm(weight shape)",
          "embedding(paddingIdx)",
        ][mode],
        make: () => [
          z([...s, V]),
          mode === 1 ? z(s) : z(mode === 0 ? [...s, 2] : s, "i32"),
          z([V + 1]),
          z([V, 3]),
        ],
        call: ([x, t, w, e]) =>
          mode <= 1
            ? M.crossEntropy(x as Tensor, t as Tensor)
            : mode === 2
            ? M.rmsNorm(x as Tensor, w as Tensor, 1e-5)
            : M.embedding(e as Tensor, t as Tensor, V),
        re: [
          new RegExp(
            `^crossEntropy: logits ${esc(fmt([...s, V]))} need targets of shape ${esc(fmt(s))}, got ${
              esc(fmt([...s, 2]))
            }`,
          ),
          /^crossEntropy: targets must be i32, got f32/,
          new RegExp(`^rmsNorm: weight must be \\[${V}\\] for x ${esc(fmt([...s, V]))}, got \\[${V + 1}\\]`),
          new RegExp(`^embedding: paddingIdx must be an integer in \\[-${V}, ${V}\\) or null, got ${V}`),
        ][mode],
      };
    }
    case 25: {
      const op = R.pick(["add", "sum", "matmul", "narrow", "toArray"] as const);
      return {
        text: `${op}(disposed tensor)`,
        make: () => {
          const x = z(s);
          x.dispose();
          return [x];
        },
        call: ([x]) => {
          const t = x as Tensor;
          return op === "add"
            ? M.add(t, 1)
            : op === "sum"
            ? M.sum(t)
            : op === "matmul"
            ? M.matmul(t, t, { transB: true })
            : op === "narrow"
            ? M.narrow(t, 0, 0, 1)
            : t.toArray();
        },
        re: new RegExp(`^(\\w+: )?Tensor#\\d+ ${esc(fmt(s))} f32 was disposed and cannot be used`),
      };
    }
    default: {
      // 0-d tensors where an op needs a dim: PyTorch raises for narrow, slice, split, chunk and cat (and takes
      // index_select / gather): a clear error naming the op, or (where PyTorch takes it) a result.
      const op = R.pick(["narrow", "slice", "split", "chunk", "cat", "indexSelect", "gather"] as const);
      const axis = R.pick([0, -1]);
      const calls: Record<typeof op, (t: Tensor, i: Tensor, j: Tensor) => unknown> = {
        narrow: (t) => M.narrow(t, axis, 0, 1),
        slice: (t) => M.slice(t, axis, 0),
        split: (t) => M.split(t, 1, axis),
        chunk: (t) => M.chunk(t, 1, axis),
        cat: (t) => M.cat([t, t], axis),
        indexSelect: (t, i) => M.indexSelect(t, axis, i),
        gather: (t, _i, j) => M.gather(t, axis, j),
      };
      return {
        text: `${op}(0-d tensor, axis ${axis})`,
        make: () => [M.tensor(3), z([2], "i32"), z([], "i32")],
        call: ([t, i, j]) => calls[op](t as Tensor, i as Tensor, j as Tensor),
        re: new RegExp(`^${op}: `),
        mayReturn: op === "indexSelect" || op === "gather",
      };
    }
  }
}

/** Runs one invalid call: it must throw the promised error, free what it made, and leave the device working. */
/** Set once `memory()` stops adding up (a NaN byte count): later memory checks would only repeat it. */
let countersBroken = false;

/** Whether memory() is back at `base`; reports a broken counter once. */
function memoryBack(base: M.MemoryInfo, failures: string[], what: string): boolean {
  const end = memory();
  if (countersBroken) return true;
  if (!Number.isFinite(end.liveBytes)) {
    countersBroken = true;
    failures.push(`${what}: memory() counts ${end.liveBytes} live bytes; memory checks skipped from here on`);
    return true;
  }
  return end.liveTensors === base.liveTensors && end.liveBytes === base.liveBytes &&
    end.savedBytes === base.savedBytes;
}

async function runInvalid(seed: number, failures: string[]): Promise<void> {
  const R = new Case(seed, false).R; // past the family pick
  const inv = invalidCase(R);
  const head = `case ${seed} (invalid): ${inv.text}`;
  if (VERBOSE) console.log(`${head}\n      expect ${inv.re}`);
  const base = memory();
  const inputs = inv.make();
  const before = memory();
  let err: unknown = null;
  let result: unknown = undefined;
  try {
    result = inv.call(inputs);
    if (result instanceof Promise) result = await result;
  } catch (e) {
    err = e;
  }
  const problems: string[] = [];
  if (err === null) {
    if (!inv.mayReturn) problems.push(`did not throw (expected ${inv.re})`);
  } else if (!(err instanceof Error) || err.name !== "Error" && err.name !== "GPUError") {
    problems.push(`threw ${err instanceof Error ? `a ${err.name}` : "a non-Error"}: ${err}`);
  } else if (!inv.re.test(err.message)) {
    problems.push(`message ${JSON.stringify(err.message)} does not match ${inv.re}`);
  } else if (/NaN|undefined/.test(err.message) && !/NaN|undefined/.test(inv.text)) {
    problems.push(`message ${JSON.stringify(err.message)} names NaN/undefined, which were not passed`);
  }
  const after = memory();
  if (err !== null && !memoryBack(before, problems, "the failed call")) {
    problems.push(
      `the failed call leaked ${after.liveTensors - before.liveTensors} tensors, ` +
        `${after.liveBytes - before.liveBytes} bytes`,
    );
  }
  M.dispose(result);
  M.dispose(inputs);
  if (err === null && !memoryBack(base, problems, "the call")) {
    problems.push(`memory not back after disposing the inputs and the result`);
  }
  try {
    await M.sync();
  } catch (e) {
    problems.push(`the device failed after the call: ${e instanceof Error ? e.message : e}`);
  }
  if (VERBOSE) console.log(`      got ${err instanceof Error ? `${err.name}: ${err.message}` : "a result"}`);
  if (problems.length) failures.push(`${head}: ${problems.join("; ")}`);
}

// ------------------------------------------------------------------------------------------ running

const FAMILY_WEIGHTS: Record<string, number> = {
  ...Object.fromEntries(Object.entries(FAMILIES).map(([k, [w]]) => [k, w])),
  invalid: 9,
};

/** The worst relative error seen per family, and where (OPS_FUZZ_REPORT). */
const worst = new Map<string, { rel: number; where: string }>();

/** A built case: its outputs, and the reference's loss sum(y * G) over the outputs that require grad. */
interface Built {
  c: Case;
  diff: Output[];
  loss: number;
}

/**
 * Builds a valid case (null for an invalid-arguments one): the program, then (with the GPU) the backward from
 * sum(y * G) over every output that requires grad, and the reference's backward. Call inside a tidy.
 */
function buildCase(c: Case): Built | null {
  if (c.family === "invalid") return null;
  const gpu = c.gpu;
  tape = [];
  FAMILIES[c.family][1](c);
  followUp(c);
  const diff = c.outs.filter((o) => o.v.r.requiresGrad);
  const Gs = diff.map((o) => c.R.values(o.v.r.data.length, "unit"));
  let loss = 0;
  diff.forEach((o, k) => o.v.r.data.forEach((v, i) => (loss += v * Gs[k][i])));
  if (diff.length === 0) return { c, diff, loss };
  c.line(`backward: sum(y * G) over ${diff.map((o) => o.what).join(", ")}`);
  if (gpu) {
    // an output the runtime did not give a graph is reported by checkCase; backward runs through the others
    const ok = diff.map((o, k) => [o, k] as const).filter(([o]) => o.v.t.requiresGrad);
    const gt = ok.map(([o, k]) => M.tensor(Float32Array.from(Gs[k]), o.v.t.shape));
    if (ok.length === 1) ok[0][0].v.t.backward(gt[0]);
    else if (ok.length > 1) {
      let total: Tensor | null = null;
      ok.forEach(([o], j) => {
        const term = M.sum(M.mul(o.v.t, gt[j]));
        total = total ? M.add(total, term) : term;
      });
      total!.backward();
    }
  }
  refBackward(diff.map((o, k) => [o.v.r, Gs[k]]));
  return { c, diff, loss };
}

/**
 * `got` against `want` within RTOL x max(1, max |want|) per element, or RTOL x mag[i] where the element's error
 * scale (see {@linkcode RV.fmag}, {@linkcode RV.mag2}) is larger. NaN must meet NaN, infinities must match; i32
 * exactly.
 */
function compareTo(
  got: ArrayLike<number>,
  want: RV,
  what: string,
  family: string,
  mag?: Float64Array | null,
): string | null {
  if (got.length !== want.data.length) return `${what}: ${got.length} values, expected ${want.data.length}`;
  if (want.dtype === "i32") {
    for (let i = 0; i < got.length; i++) {
      if (got[i] !== want.data[i]) return `${what}: i32 at ${i}: got ${got[i]}, expected ${want.data[i]}`;
    }
    return null;
  }
  let scale = 1;
  for (const v of want.data) if (Number.isFinite(v)) scale = Math.max(scale, Math.abs(v));
  let bad = -1, rel = 0;
  for (let i = 0; i < got.length; i++) {
    const a = got[i], e = want.data[i];
    let d: number;
    if (Number.isNaN(e) || Number.isNaN(a)) d = Number.isNaN(e) && Number.isNaN(a) ? 0 : Infinity;
    else if (!Number.isFinite(e) || !Number.isFinite(a)) d = a === e ? 0 : Infinity;
    else d = Math.abs(a - e) / Math.max(scale, mag ? mag[i] : 0);
    if (d > rel) [rel, bad] = [d, i];
  }
  if (REPORT && Number.isFinite(rel) && rel >= (worst.get(family)?.rel ?? 0)) {
    worst.set(family, { rel, where: what });
  }
  if (rel <= RTOL) return null;
  const s = Math.max(scale, mag ? mag[bad] : 0);
  return `${what}: |diff| ${Math.abs(got[bad] - want.data[bad]).toExponential(3)} > ${RTOL} x ${
    s.toExponential(3)
  }` +
    ` at index ${bad} of ${fmt(want.shape)}: got ${got[bad]}, expected ${want.data[bad]}`;
}

/** Compares a case's readbacks (outputs, then the leaves' gradients) with the reference; returns the problems. */
function checkCase(b: Built, arrays: (Float32Array | Int32Array)[]): string[] {
  const { c } = b;
  const problems: string[] = [];
  let at = 0;
  for (const o of c.outs) {
    const a = arrays[at++];
    const { t, r } = o.v;
    if (t.shape.join() !== r.shape.join() || t.rank !== r.shape.length) {
      problems.push(`${o.what}: shape ${fmt(t.shape)}, expected ${fmt(r.shape)}`);
      continue;
    }
    if (t.dtype !== r.dtype) problems.push(`${o.what}: dtype ${t.dtype}, expected ${r.dtype}`);
    if (t.requiresGrad !== r.requiresGrad) {
      problems.push(`${o.what}: requiresGrad ${t.requiresGrad}, expected ${r.requiresGrad}`);
    }
    const m = compareTo(a, r, `case ${c.seed}: ${o.what} (forward)`, c.family, r.fmag);
    if (m) problems.push(m);
  }
  for (const leaf of c.leaves) {
    if (!leaf.r.requiresGrad) continue;
    const g = leaf.t.grad, want = leaf.r.grad;
    if (!g) {
      if (want && want.some((v) => v !== 0)) problems.push(`d/d ${leaf.name}: no .grad after backward()`);
      continue;
    }
    const a = arrays[at++];
    if (g.shape.join() !== leaf.r.shape.join()) {
      problems.push(`d/d ${leaf.name}: .grad shape ${fmt(g.shape)}, expected ${fmt(leaf.r.shape)}`);
      continue;
    }
    const m = compareTo(
      a,
      { ...leaf.r, data: want ?? new Float64Array(a.length) },
      `case ${c.seed}: d/d ${leaf.name}`,
      c.family,
      leaf.r.mag2?.map(Math.sqrt),
    );
    if (m) problems.push(m);
  }
  return problems;
}

/** The tensors a case reads back, in checkCase's order. */
function readbacks(b: Built): Tensor[] {
  return [
    ...b.c.outs.map((o) => o.v.t),
    ...b.c.leaves.flatMap((l) => (l.r.requiresGrad && l.t.grad ? [l.t.grad] : [])),
  ];
}

/**
 * Checks the reference's hand-written VJPs against float64 central differences of its forward (replaying the
 * case without the GPU, one perturbed leaf element at a time), on cases small enough and free of ties and
 * kinks (grid values, masks, NaN outputs). Returns the problems, or null when the case was skipped.
 */
function checkReference(b: Built, limit: number): string[] | null {
  const { c } = b;
  const leaves = c.leaves.map((l, k) => [l, k] as const).filter(([l]) => l.r.requiresGrad);
  const n = leaves.reduce((a, [l]) => a + l.r.data.length, 0);
  if (!b.diff.length || n === 0 || n > limit || c.noFd || c.dists.has("grid") || c.dists.has("mask")) {
    return null;
  }
  if (!Number.isFinite(b.loss)) return null;
  const problems: string[] = [];
  for (const [leaf, k] of leaves) {
    const analytic = leaf.r.grad ?? new Float64Array(leaf.r.data.length);
    const x = Float64Array.from(leaf.r.data);
    const fd = new Float64Array(x.length);
    for (let i = 0; i < x.length; i++) {
      const v = x[i], h = 1e-6 * Math.max(1, Math.abs(v));
      const at = (u: number) => {
        x[i] = u;
        const r = buildCase(new Case(c.seed, false, new Map([[k, x]])))!;
        x[i] = v;
        return r.loss;
      };
      fd[i] = (at(v + h) - at(v - h)) / (2 * h);
    }
    let scale = 1, worstDiff = 0, bad = 0;
    for (let i = 0; i < x.length; i++) scale = Math.max(scale, Math.abs(fd[i]));
    for (let i = 0; i < x.length; i++) {
      const d = Math.abs(fd[i] - analytic[i]);
      if (!(d <= worstDiff)) [worstDiff, bad] = [Number.isNaN(d) ? Infinity : d, i];
    }
    if (worstDiff > 1e-5 * scale) {
      problems.push(
        `reference VJP d/d ${leaf.name} at ${bad}: ${analytic[bad]}, finite differences ${
          fd[bad]
        } (a bug in this test)`,
      );
    }
  }
  return problems;
}

async function runBatch(seeds: number[], failures: string[], fdLimit: number): Promise<number> {
  const base = memory();
  const built: Built[] = [];
  const invalid: number[] = [];
  for (const seed of seeds) {
    let b: Built | null = null;
    const c = new Case(seed);
    try {
      tidy(() => {
        b = buildCase(c);
        return b ? readbacks(b) : null;
      });
    } catch (e) {
      failures.push(
        `case ${seed} (${c.family}): threw ${e instanceof Error ? `${e.name}: ${e.message}` : e}\n` +
          `    program up to there (OPS_FUZZ_CASE=${seed} reruns it):\n${c.program()}`,
      );
      if (VERBOSE) console.log(`case ${seed} (${c.family}):\n${c.program(1000)}\n`, e);
      continue;
    }
    if (b) built.push(b);
    else invalid.push(seed);
  }
  const tensors = built.map(readbacks);
  let arrays: (Float32Array | Int32Array)[] | null = null;
  try {
    arrays = await readAll(tensors.flat());
  } catch (e) {
    failures.push(
      `cases ${seeds[0]}..${seeds.at(-1)}: the readback failed: ${e instanceof Error ? e.message : e}`,
    );
  }
  let at = 0, checked = 0;
  for (const [j, b] of built.entries()) {
    const mine = arrays?.slice(at, at += tensors[j].length);
    const problems = mine ? checkCase(b, mine) : [];
    const ref = fdLimit > 0 ? checkReference(b, fdLimit) : null;
    if (ref) {
      checked++;
      problems.push(...ref);
    }
    if (VERBOSE) {
      console.log(`case ${b.c.seed} (${b.c.family}):\n${b.c.program(1000)}`);
      console.log(problems.length ? problems.map((s) => `      FAIL ${s}`).join("\n") : "      ok");
    }
    if (problems.length) {
      failures.push(
        `case ${b.c.seed} (${b.c.family}): ${
          problems.join("; ")
        }\n    program (OPS_FUZZ_CASE=${b.c.seed} reruns it):\n` +
          b.c.program(),
      );
    }
  }
  for (const t of tensors.flat()) t.dispose();
  const end = memory();
  if (!memoryBack(base, failures, `cases ${seeds[0]}..${seeds.at(-1)}`)) {
    failures.push(
      `cases ${seeds[0]}..${seeds.at(-1)}: memory not back after disposing everything: ` +
        `${end.liveTensors - base.liveTensors} tensors, ${end.liveBytes - base.liveBytes} live bytes, ` +
        `${end.savedBytes - base.savedBytes} saved bytes`,
    );
  }
  for (const seed of invalid) await runInvalid(seed, failures);
  return checked;
}

Deno.test(`ops fuzz: ${CASES} random programs from seed ${FIRST} against a float64 reference`, async () => {
  const failures: string[] = [];
  const t0 = performance.now();
  let fdChecked = 0;
  for (let i = 0; i < CASES; i += BATCH) {
    const seeds = Array.from({ length: Math.min(BATCH, CASES - i) }, (_, k) => FIRST + i + k);
    fdChecked += await runBatch(seeds, failures, FD ? 400 : 0);
  }
  if (REPORT || FD) {
    console.log(
      `${CASES} cases in ${((performance.now() - t0) / 1000).toFixed(1)} s` +
        (FD ? `; reference VJPs checked by finite differences in ${fdChecked} cases` : ""),
    );
    if (REPORT) {
      console.log("worst |got - want| / (max(1, max |want|) or the element's error scale), per family:");
      for (const [k, v] of [...worst].sort()) console.log(`  ${k}: ${v.rel.toExponential(2)} (${v.where})`);
    }
  }
  if (LIST) { for (const f of failures) console.log(f.split("\n")[0]); }
  if (failures.length) {
    throw new AssertionError({
      message: `${failures.length} of ${CASES} cases failed:\n  ${failures.slice(0, 12).join("\n  ")}` +
        (failures.length > 12 ? `\n  ... (${failures.length - 12} more; OPS_FUZZ_LIST=1 lists them)` : ""),
    });
  }
});
