/**
 * Reductions over axes: sum, mean, max, logsumexp, and `sumToShape` (the adjoint of broadcasting).
 *
 * Size-1 axes are dropped and adjacent reduced axes merged, so each run of reduced axes is one pass over
 * the input viewed as (outer, R, inner), by the kernel of `reduce_kernel.ts`.
 * @module
 */

import { defineOp } from "../autograd.ts";
import { full, zeros } from "../creation.ts";
import { fmt, normAxis, sameShape, type Shape } from "../shape.ts";
import { Tensor } from "../tensor.ts";
import { mapOp } from "./map_kernel.ts";
import { copy, reshape } from "./shape_ops.ts";
import { reduceRun } from "./reduce_kernel.ts";

function axesOf(x: Tensor, dim: number | number[] | undefined, op: string): number[] {
  // every public reduction takes f32 (named here, where the op's own name is known)
  if (x.dtype !== "f32") throw new Error(`${op} needs an f32 tensor, got ${x.dtype} ${fmt(x.shape)}`);
  const list = dim === undefined ? x.shape.map((_, i) => i) : typeof dim === "number" ? [dim] : dim;
  const norm = list.map((a) => normAxis(a, x.rank, op));
  if (new Set(norm).size !== norm.length) throw new Error(`${op}: repeated dim in ${JSON.stringify(dim)}`);
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
      throw new Error(`max over an empty dim of shape ${fmt(x.shape)}`);
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

/** Sum over `dim` (one or several; all when omitted); `keepdim` keeps reduced dims as size 1. */
export function sum(x: Tensor, dim?: number | number[], keepdim = false): Tensor {
  return sumOp([x], { axes: axesOf(x, dim, "sum"), keepdim });
}

/** Maximum over `dim` (one or several, or all; -inf over a row of -inf, NaN over a row with a NaN, as in PyTorch); ties
 * share the gradient. */
export function max(x: Tensor, dim?: number | number[], keepdim = false): Tensor {
  return maxOp([x], { axes: axesOf(x, dim, "max"), keepdim });
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

/** Mean over `dim` (one or several; all when omitted). */
export function mean(x: Tensor, dim?: number | number[], keepdim = false): Tensor {
  return meanOp([x], { axes: axesOf(x, dim, "mean"), keepdim });
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

/** `log(sum(exp(x), dim))`, shifted by the maximum so that it never overflows (a row with +inf gives inf, one of
 * -inf or an empty one gives -inf, as PyTorch). */
export function logsumexp(x: Tensor, dim: number, keepdim = false): Tensor {
  const a = normAxis(dim, x.rank, "logsumexp");
  if (x.rank === 0) return reshape(x, []); // its one value: a view of it
  return logsumexpOp([x], { axis: a, keepdim });
}

/** Sums a broadcast gradient back to `shape` (the adjoint of broadcasting). Returns `g` if nothing to do. */
export function sumToShape(g: Tensor, shape: Shape): Tensor {
  if (sameShape(g.shape, shape)) return g;
  const lead = g.rank - shape.length;
  // checked first: the reshape's own check came after the sum was made, which then leaked
  if (lead < 0 || shape.some((d, i) => d !== 1 && d !== g.shape[i + lead])) {
    throw new Error(
      `sumToShape: cannot sum ${fmt(g.shape)} to ${fmt(shape)}, which does not broadcast to it`,
    );
  }
  const axes: number[] = [];
  g.shape.forEach((d, i) => {
    if (i < lead || (shape[i - lead] === 1 && d !== 1)) axes.push(i);
  });
  const y = reduceAxes(g, axes.sort((a, b) => b - a), "sum", true); // a gradient: a view of it is safe
  return reshapeOwned(y, [...shape]);
}
