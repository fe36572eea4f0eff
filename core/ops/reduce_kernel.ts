/**
 * The reduction kernel: x viewed as (outer, R, inner), reduced over R. Each invocation owns one (outer, chunk,
 * inner) output and loops over `chunk` elements of R (at most 4096: loops past 65535 iterations stop silently
 * on software adapters). Few outputs over a long R get shorter chunks, so that there are enough invocations to
 * fill the device, but at most 64 chunks each, so that the next pass reduces the partials in one go (up to R =
 * 262144). No workgroup memory. A sum's last pass can add into an existing tensor instead of writing a new one
 * (`addSumOfFirstAxis`: matmul's split over K adds its slices' sum into its target so, in one dispatch).
 * Used by core/ops and by the fused scan's backward (its parameter gradients summed over many rows); not
 * re-exported.
 * @module
 */

import { deviceInfo } from "../device.ts";
import { defineKernel, dispatch, type Kernel } from "../kernel.ts";
import { fmt, sameShape, sizeOf } from "../shape.ts";
import { Tensor } from "../tensor.ts";
import { IS_NAN_WGSL } from "./map_kernel.ts";

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

/** The kernel of a reduction; `add`: the output is added into y (a sum's last pass into a given tensor). */
function reduceKernel(kind: "sum" | "max", add = false): Kernel {
  // max starts at -inf (a row of -inf has maximum -inf), from a variable: WGSL rejects infinite constants.
  const init = kind === "sum" ? "0.0" : "bitcast<f32>(ninf)";
  // max keeps a NaN, as PyTorch (WGSL's max need not; NaN found by its bits, which no compiler assumes away)
  const step = kind === "sum"
    ? "acc = acc + v;"
    : "acc = select(select(max(acc, v), v, isnan_(v)), acc, isnan_(acc));";
  return defineKernel({
    name: `reduce_${kind}${add ? "_add" : ""}`,
    buffers: [{ name: "x", type: "f32", access: "read" }, { name: "y", type: "f32", access: "read_write" }],
    uniforms: [
      ["n", "u32"],
      ["r", "u32"],
      ["inner", "u32"],
      ["chunks", "u32"],
      ["chunk", "u32"],
      ["x0", "u32"], // x's first element in its buffer
    ],
    workgroupSize: WG,
    decls: kind === "max" ? IS_NAN_WGSL : "",
    body: `
  if (gid >= P.n) { return; }
  // gid -> (o, k, i): output (o, chunk k, inner i) reduces x[o, k*chunk .. min(R, (k+1)*chunk), i], x from
  // element x0 of its buffer.
  let i = gid % P.inner;
  let ok = gid / P.inner;
  let k = ok % P.chunks;
  let o = ok / P.chunks;
  let start = k * P.chunk;
  let end = min(P.r, start + P.chunk);
  var ninf = 0xff800000u;
  var acc: f32 = ${init};
  var at = P.x0 + (o * P.r + start) * P.inner + i;
  for (var t = start; t < end; t = t + 1u) {
    let v = ld_x(at);
    ${step}
    at = at + P.inner;
  }
  st_y(gid, ${add ? "ld_y(gid) + acc" : "acc"});`,
  });
}

const KERNELS = { sum: reduceKernel("sum"), max: reduceKernel("max"), sumAdd: reduceKernel("sum", true) };

/** Where a reduction's result goes, and where its input starts. */
export interface ReduceOptions {
  /** A sum's last pass adds into this tensor (of outer * inner elements), which is returned. */
  into?: Tensor;
  /** The result's shape (outer * inner elements; default flat). */
  shape?: readonly number[];
  /** x's elements start here in its storage (default 0): a region of a larger buffer, read in place. */
  from?: number;
}

/** Reduces the middle axis of x viewed as (outer, r, inner), in as many passes as the chunks need. The result
 * is a new tensor, flat (outer * inner) or of `to.shape` (as many elements); or, with `to.into` (a sum only),
 * the last pass adds it into that tensor and returns it. No autograd; `x` is not disposed. */
export function reduceRun(
  x: Tensor,
  outer: number,
  r: number,
  inner: number,
  kind: "sum" | "max",
  to: ReduceOptions = {},
): Tensor {
  const { into, shape, from = 0 } = to;
  if (into && shape) throw new Error("reduceRun: give a result's shape or a tensor to add into, not both");
  if (into && kind !== "sum") throw new Error(`reduceRun: only a sum adds into a tensor, not ${kind}`);
  if (shape && sizeOf(shape) !== outer * inner) {
    throw new Error(`reduceRun: a result of ${outer * inner} elements cannot have shape ${fmt(shape)}`);
  }
  if (from < 0 || from + outer * r * inner > x.size) {
    throw new Error(`reduceRun: ${outer * r * inner} elements from ${from} do not fit in ${x}`);
  }
  let cur = x;
  let x0 = from;
  while (true) {
    const n0 = outer * inner;
    const target = TARGET_INVOCATIONS[deviceInfo().isFallbackAdapter ? "cpu" : "gpu"];
    // Enough invocations, and at most MIN_CHUNK partials per output so that one more pass finishes.
    const chunk = r <= MIN_CHUNK ? r : Math.min(
      MAX_CHUNK,
      Math.max(MIN_CHUNK, Math.ceil(r / MIN_CHUNK), Math.ceil((r * n0) / target)),
    );
    const chunks = Math.ceil(r / chunk);
    const add = chunks === 1 && into !== undefined; // the last pass, into the target
    const out = add ? into : Tensor.empty(chunks === 1 && shape ? shape : [outer * chunks * inner]);
    const n = outer * chunks * inner;
    dispatch(
      add ? KERNELS.sumAdd : KERNELS[kind],
      { x: cur.storage, y: out.storage },
      { n, r, inner, chunks, chunk, x0 },
      Math.ceil(n / WG),
    );
    if (cur !== x) cur.dispose();
    if (chunks === 1) return out;
    cur = out;
    x0 = 0;
    r = chunks;
  }
}

/**
 * Adds the sum of `parts` over its first axis into `into` (of `parts`' shape less that axis, f32, its own
 * storage from offset 0, as matmul's targets are), in place: the last pass adds instead of writing, so no sum
 * tensor is made. No autograd; `parts` is not disposed.
 */
export function addSumOfFirstAxis(parts: Tensor, into: Tensor): void {
  const fits = parts.rank >= 1 && sameShape(parts.shape.slice(1), into.shape);
  if (parts.dtype !== "f32" || into.dtype !== "f32" || !fits) {
    throw new Error(`addSumOfFirstAxis: cannot add the sum of ${parts} over its first axis into ${into}`);
  }
  if (into.size === 0 || parts.shape[0] === 0) return;
  reduceRun(parts, 1, parts.shape[0], into.size, "sum", { into });
}
