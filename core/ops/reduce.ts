/**
 * Reductions over axes: sum, mean, max, logsumexp, and `sumToShape` (the adjoint of broadcasting).
 *
 * Size-1 axes are dropped and adjacent reduced axes merged, so each run of reduced axes is one pass over
 * the input viewed as (outer, R, inner). Kernel: each invocation owns one (outer, chunk, inner) output and
 * loops over `chunk` elements of R (at most 4096: loops past 65535 iterations stop silently on software
 * adapters). Few outputs over a long R get shorter chunks, so that there are enough invocations to
 * fill the device, but at most 64 chunks each, so that the next pass reduces the partials in one go (up
 * to R = 262144). No workgroup memory.
 * @module
 */

import { defineOp } from "../autograd.ts";
import { full, zeros } from "../creation.ts";
import { deviceInfo } from "../device.ts";
import { defineKernel, dispatch, type Kernel } from "../kernel.ts";
import { fmt, normAxis, sameShape, type Shape } from "../shape.ts";
import { Tensor } from "../tensor.ts";
import { mapOp } from "./map_kernel.ts";
import { copy, reshape } from "./shape_ops.ts";

/** Longest chunk of R one invocation loops over. */
const MAX_CHUNK = 4096;
/** Shortest chunk worth a pass of its own. */
const MIN_CHUNK = 64;
/** Invocations a pass aims for, when the outputs are fewer: enough for a CPU adapter's cores, and on a GPU
 * enough to hide the wait of each invocation's loads, one after another (as matmul's GPU_INVOCATIONS). On the
 * H200, pscan's step at d_model 16, L 16384 spent 1.16 ms in reduce_sum, where the sum over (B, L) of a
 * (1, 16384, 32, 16) gradient ran 4096 invocations of 2048 steps each. */
const TARGET_INVOCATIONS = { cpu: 4096, gpu: 32768 };
const WG = 64;

function reduceKernel(kind: "sum" | "max"): Kernel {
  // max starts at -inf (a row of -inf has maximum -inf), from a variable: WGSL rejects infinite constants.
  const init = kind === "sum" ? "0.0" : "bitcast<f32>(ninf)";
  const step = kind === "sum" ? "acc = acc + v;" : "acc = max(acc, v);";
  return defineKernel({
    name: `reduce_${kind}`,
    buffers: [{ name: "x", type: "f32", access: "read" }, { name: "y", type: "f32", access: "read_write" }],
    uniforms: [["n", "u32"], ["r", "u32"], ["inner", "u32"], ["chunks", "u32"], ["chunk", "u32"]],
    workgroupSize: WG,
    body: `
  if (gid >= P.n) { return; }
  // gid -> (o, k, i): output (o, chunk k, inner i) reduces x[o, k*chunk .. min(R, (k+1)*chunk), i].
  let i = gid % P.inner;
  let ok = gid / P.inner;
  let k = ok % P.chunks;
  let o = ok / P.chunks;
  let start = k * P.chunk;
  let end = min(P.r, start + P.chunk);
  var ninf = 0xff800000u;
  var acc: f32 = ${init};
  var at = (o * P.r + start) * P.inner + i;
  for (var t = start; t < end; t = t + 1u) {
    let v = ld_x(at);
    ${step}
    at = at + P.inner;
  }
  st_y(gid, acc);`,
  });
}

const KERNELS = { sum: reduceKernel("sum"), max: reduceKernel("max") };

/** Reduces the middle axis of x viewed as (outer, r, inner), in as many passes as the chunks need; the
 * result is flat (outer * inner). No autograd; `x` is not disposed. */
function reduceRun(x: Tensor, outer: number, r: number, inner: number, kind: "sum" | "max"): Tensor {
  let cur = x;
  while (true) {
    const n0 = outer * inner;
    const target = TARGET_INVOCATIONS[deviceInfo().isFallbackAdapter ? "cpu" : "gpu"];
    // Enough invocations, and at most MIN_CHUNK partials per output so that one more pass finishes.
    const chunk = r <= MIN_CHUNK ? r : Math.min(
      MAX_CHUNK,
      Math.max(MIN_CHUNK, Math.ceil(r / MIN_CHUNK), Math.ceil((r * n0) / target)),
    );
    const chunks = Math.ceil(r / chunk);
    const out = Tensor.empty([outer * chunks * inner]);
    const n = outer * chunks * inner;
    dispatch(
      KERNELS[kind],
      { x: cur.storage, y: out.storage },
      { n, r, inner, chunks, chunk },
      Math.ceil(n / WG),
    );
    if (cur !== x) cur.dispose();
    if (chunks === 1) return out;
    cur = out;
    r = chunks;
  }
}

function axesOf(x: Tensor, axis: number | number[] | undefined, op: string): number[] {
  const list = axis === undefined ? x.shape.map((_, i) => i) : typeof axis === "number" ? [axis] : axis;
  const norm = list.map((a) => normAxis(a, x.rank, op));
  if (new Set(norm).size !== norm.length) throw new Error(`${op}: repeated axis in ${JSON.stringify(axis)}`);
  // a 0-d tensor's one axis (0 or -1, as PyTorch allows) holds its one value: nothing to reduce
  return x.rank === 0 ? [] : norm.sort((a, b) => b - a);
}

/** Reduces `axes` of a contiguous f32 tensor (no autograd), keeping them as size 1. A new tensor with its own
 * storage (a copy of `x` when every reduced axis has size 1: only reshape, view and detach share), or, with
 * `share`, a view of `x` then (for a caller that owns `x`, such as a gradient being summed to a shape). */
function reduceAxes(x: Tensor, axes: number[], kind: "sum" | "max", share = false): Tensor {
  if (x.dtype !== "f32") throw new Error(`${kind} needs an f32 tensor, got ${x.dtype}`);
  const outShape = keptShape(x.shape, axes);
  if (x.size === 0) {
    if (kind === "max" && axes.some((a) => x.shape[a] === 0)) {
      throw new Error(`max over an empty axis of shape ${fmt(x.shape)}`);
    }
    return zeros(outShape);
  }
  // Runs of dims: size-1 dims dropped, neighbours of the same kind (reduced or kept) merged.
  const runs: { size: number; reduced: boolean }[] = [];
  x.shape.forEach((d, i) => {
    if (d === 1) return;
    const reduced = axes.includes(i);
    const last = runs.at(-1);
    if (last && last.reduced === reduced) last.size *= d;
    else runs.push({ size: d, reduced });
  });
  let cur = x;
  for (let j = runs.length - 1; j >= 0; j--) {
    if (!runs[j].reduced) continue;
    const outer = runs.slice(0, j).reduce((n, q) => n * q.size, 1);
    const inner = runs.slice(j + 1).reduce((n, q) => n * q.size, 1);
    const next = reduceRun(cur, outer, runs[j].size, inner, kind);
    if (cur !== x) cur.dispose();
    cur = next;
    runs[j].size = 1;
  }
  // Only size-1 axes: a copy, not a view, so that in-place updates of x (optimizer steps) leave it alone.
  if (cur === x) {
    if (share) return new Tensor(x.storage, outShape, "f32");
    cur = copy(x);
  }
  const out = new Tensor(cur.storage, outShape, "f32");
  cur.dispose();
  return out;
}

function dropAxes(shape: Shape, axes: number[]): number[] {
  return shape.filter((_, i) => !axes.includes(i));
}

function keptShape(shape: Shape, axes: number[]): number[] {
  return shape.map((d, i) => (axes.includes(i) ? 1 : d));
}

const sumOp = defineOp<{ axes: number[]; keepdim: boolean }>({
  name: "sum",
  forward: ([x], { axes, keepdim }) => {
    const y = reduceAxes(x, axes, "sum");
    return keepdim ? y : reshapeOwned(y, dropAxes(x.shape, axes));
  },
  backward: (g, _s, [x], { axes }) => [broadcastGrad(g, x.shape, axes)],
});

const maxOp = defineOp<{ axes: number[]; keepdim: boolean }>({
  name: "max",
  forward: ([x], { axes, keepdim }, save) => {
    const y = reduceAxes(x, axes, "max");
    const out = keepdim ? y : reshapeOwned(y, dropAxes(x.shape, axes));
    save(x, out);
    return out;
  },
  backward: (g, [x, out], _i, { axes }) => {
    // Ties share the gradient: mask / count, as torch.amax does.
    const y = reshape(out, keptShape(x.shape, axes));
    const mask = mapOp("select(0.0, 1.0, a == b)", [x, y], x.shape);
    const count = reduceAxes(mask, axes, "sum", true); // mask is this op's own: a view of it is safe
    const gk = reshape(g, keptShape(x.shape, axes));
    const grad = mapOp("a * b / c", [mask, gk, count], x.shape);
    for (const t of [y, mask, count, gk]) t.dispose();
    return [grad];
  },
});

/** `y` reshaped, `y` itself disposed (its node lives on while the view consumes it). */
function reshapeOwned(y: Tensor, shape: number[]): Tensor {
  const r = reshape(y, shape);
  y.dispose();
  return r;
}

function broadcastGrad(g: Tensor, shape: Shape, axes: number[]): Tensor {
  const gk = reshape(g, keptShape(shape, axes));
  const out = mapOp("a", [gk], shape);
  gk.dispose();
  return out;
}

/** Sum over `axis` (or all axes); `keepdim` keeps reduced axes as size 1. */
export function sum(x: Tensor, axis?: number | number[], keepdim = false): Tensor {
  return sumOp([x], { axes: axesOf(x, axis, "sum"), keepdim });
}

/** Maximum over `axis` (or all axes; -inf over a row of -inf); ties share the gradient. */
export function max(x: Tensor, axis?: number | number[], keepdim = false): Tensor {
  return maxOp([x], { axes: axesOf(x, axis, "max"), keepdim });
}

const meanOp = defineOp<{ axes: number[]; keepdim: boolean }>({
  name: "mean",
  forward: ([x], { axes, keepdim }) => {
    const y = reduceAxes(x, axes, "sum", true); // only read, by the scaling below
    const m = mapOp("a * b", [y, 1 / countOf(x.shape, axes)], y.shape);
    y.dispose();
    return keepdim ? m : reshapeOwned(m, dropAxes(x.shape, axes));
  },
  backward: (g, _s, [x], { axes }) => {
    const gk = reshape(g, keptShape(x.shape, axes));
    const out = mapOp("a * b", [gk, 1 / countOf(x.shape, axes)], x.shape);
    gk.dispose();
    return [out];
  },
});

function countOf(shape: Shape, axes: number[]): number {
  return axes.reduce((n, a) => n * shape[a], 1);
}

/** Mean over `axis` (or all axes). */
export function mean(x: Tensor, axis?: number | number[], keepdim = false): Tensor {
  return meanOp([x], { axes: axesOf(x, axis, "mean"), keepdim });
}

/** WGSL of the shift of logsumexp from the max in operand `v`: the max, or 0 where it is infinite, as PyTorch's
 * logsumexp: a row whose max is +inf sums to inf and one of -inf to 0 (log: -inf), not exp(inf - inf) = NaN.
 * Applied where the max is read, so that it costs no dispatch of its own. */
const shift = (v: string) => `select(${v}, 0.0, abs(${v}) > 3.4028234663852886e38)`;

const logsumexpOp = defineOp<{ axis: number; keepdim: boolean }>({
  name: "logsumexp",
  forward: ([x], { axis, keepdim }, save) => {
    // lse = log(sum(exp(x - m))) + m with m = max(x) (0 if infinite): exp never overflows. Over an empty
    // axis m is -inf (max would throw) and the sum 0, so lse is -inf, as PyTorch.
    const m = x.shape[axis] === 0
      ? full(keptShape(x.shape, [axis]), -Infinity)
      : reduceAxes(x, [axis], "max");
    const e = mapOp(`exp(a - ${shift("b")})`, [x, m], x.shape);
    const s = reduceAxes(e, [axis], "sum", true); // e is this op's own
    const logs = mapOp("log(a)", [s], s.shape);
    const lse = mapOp(`a + ${shift("b")}`, [logs, m], s.shape);
    for (const t of [e, s]) t.dispose();
    // The backward needs m and log(s) apart: exp(x - lse) would inherit lse's rounding to the spacing
    // of m (6e-5 at 1000), a relative error of that size in every gradient.
    save(x, m, logs);
    return keepdim ? lse : reshapeOwned(lse, dropAxes(x.shape, [axis]));
  },
  backward: (g, [x, m, logs], _i, { axis }) => {
    // d lse / dx = softmax(x) = exp((x - m) - log(s)).
    const p = mapOp(`exp(a - ${shift("b")} - c)`, [x, m, logs], x.shape);
    const gk = reshape(g, keptShape(x.shape, [axis]));
    const out = mapOp("a * b", [p, gk], x.shape);
    for (const t of [p, gk]) t.dispose();
    return [out];
  },
});

/** `log(sum(exp(x), axis))`, shifted by the maximum so that it never overflows (a row with +inf gives inf, one of
 * -inf or an empty one gives -inf, as PyTorch). */
export function logsumexp(x: Tensor, axis: number, keepdim = false): Tensor {
  const a = normAxis(axis, x.rank, "logsumexp");
  if (x.rank === 0) return reshape(x, []); // its one value: a view of it
  return logsumexpOp([x], { axis: a, keepdim });
}

/** Sums a broadcast gradient back to `shape` (the adjoint of broadcasting). Returns `g` if nothing to do. */
export function sumToShape(g: Tensor, shape: Shape): Tensor {
  if (sameShape(g.shape, shape)) return g;
  const lead = g.rank - shape.length;
  const axes: number[] = [];
  g.shape.forEach((d, i) => {
    if (i < lead || (shape[i - lead] === 1 && d !== 1)) axes.push(i);
  });
  const y = reduceAxes(g, axes.sort((a, b) => b - a), "sum", true); // a gradient: a view of it is safe
  return reshapeOwned(y, [...shape]);
}
