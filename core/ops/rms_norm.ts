/**
 * Fused RMSNorm over the last dim, as mamba.py and PyTorch compute it in f32:
 *   r = rsqrt(mean(x^2, -1) + eps),  y = (x * r) * weight.
 * x (..., D) is viewed as (rows, D), rows = size / D. With D a multiple of 4, x, y, g, dx, weight and the
 * partials are bound as vec4<f32> (V = 4: one 16-byte access per four elements); otherwise V = 1.
 * - `rms_fwd`: one invocation per row. Reads the row of x twice (sum of squares, then y) and weight;
 *   writes the row of y and r = rstd[row] (saved for the backward).
 * - `rms_bwd_x`: one invocation per row. With gw = g * weight, reads the row of g, x twice and rstd[row];
 *   writes dx = r * gw - x * r^3 * mean(gw * x) for the row.
 * - `rms_bwd_w`: one invocation per (chunk of rows, group of V columns); neighbouring lanes own neighbouring
 *   columns. Reads g, x and rstd of its rows; writes partials (chunks, D) of sum(g * (x * r)), which `sum`
 *   over the chunks reduces to dweight (no float atomics).
 * No workgroup memory. A per-row invocation runs two loops of D / V trips; a `rms_bwd_w` invocation one
 * loop of ceil(sqrt(rows)). Software adapters stop an invocation silently once its loops have run about
 * 65535 trips in all (each loop's final test counting as one), so D / V is capped at 32766: D is at most
 * 32766, or 131064 for a multiple of 4. Past the device's maxComputeWorkgroupsPerDimension workgroups the
 * dispatch is folded into two dimensions.
 * @module
 */

import { defineOp } from "../autograd.ts";
import { defineKernel, dispatch, type Kernel } from "../kernel.ts";
import { fmt } from "../shape.ts";
import { Tensor } from "../tensor.ts";
import { zeros } from "../creation.ts";
import { sum } from "./reduce.ts";
import { reshape } from "./shape_ops.ts";

const WG = 64;
/** Loop trips software adapters run per invocation, all loops together, before stopping it silently. */
const LOOP_LIMIT = 65535;

/** The longest row in units of V: the per-row kernels run two loops of D / V trips, plus each loop's final
 * test, within the loop limit (32766). */
const MAX_DV = Math.floor(LOOP_LIMIT / 2) - 1;

const kernels = new Map<string, Kernel>();

/** WGSL: the sum of the components of `v` (a scalar for V = 1). */
function total(v: string, V: number): string {
  return V === 1 ? v : `((${v}.x + ${v}.y) + (${v}.z + ${v}.w))`;
}

function kernel(kind: "fwd" | "bwd_x" | "bwd_w", V: number): Kernel {
  const key = `${kind}|${V}`;
  let k = kernels.get(key);
  if (k) return k;
  const F = V === 1 ? "f32" : "vec4<f32>";
  const data = (name: string, access: "read" | "read_write") => ({ name, type: F as "f32", access });
  const scalar = (name: string, access: "read" | "read_write") => ({ name, type: "f32" as const, access });
  // Per-row kernels: `base` indexes the row's first element in units of V.
  const row = `
  let row = gid;
  if (row >= P.rows) { return; }
  let DV = P.D / ${V}u;
  let base = row * DV;`;
  const bodies = {
    fwd: `${row}
  var acc = ${F}();
  for (var j = 0u; j < DV; j++) { let v = ld_x(base + j); acc += v * v; }
  let r = inverseSqrt(${total("acc", V)} / f32(P.D) + P.eps);
  for (var j = 0u; j < DV; j++) { st_y(base + j, ld_x(base + j) * r * ld_w(j)); }
  st_rstd(row, r);`,
    bwd_x: `${row}
  let r = ld_rstd(row);
  var acc = ${F}();
  for (var j = 0u; j < DV; j++) { acc += ld_g(base + j) * ld_w(j) * ld_x(base + j); }
  let c = r * r * r * (${total("acc", V)} / f32(P.D));
  for (var j = 0u; j < DV; j++) { st_y(base + j, r * (ld_g(base + j) * ld_w(j)) - ld_x(base + j) * c); }`,
    bwd_w: `
  // invocation -> (chunk k, column group dv): rows k*per .. min(rows, (k+1)*per) - 1.
  let DV = P.D / ${V}u;
  let dv = gid % DV;
  let k = gid / DV;
  if (k >= P.chunks) { return; }
  let start = k * P.per;
  let end = min(P.rows, start + P.per);
  var acc = ${F}();
  var at = start * DV + dv;
  for (var i = start; i < end; i++) {
    acc += ld_g(at) * (ld_x(at) * ld_rstd(i));
    at += DV;
  }
  st_y(k * DV + dv, acc);`,
  };
  const buffers = {
    fwd: [data("x", "read"), data("w", "read"), data("y", "read_write"), scalar("rstd", "read_write")],
    bwd_x: [
      data("x", "read"),
      data("w", "read"),
      scalar("rstd", "read"),
      data("g", "read"),
      data("y", "read_write"),
    ],
    bwd_w: [data("x", "read"), scalar("rstd", "read"), data("g", "read"), data("y", "read_write")],
  };
  k = defineKernel({
    name: `rms_${kind}${V === 1 ? "" : "_v4"}`,
    buffers: buffers[kind],
    uniforms: [["rows", "u32"], ["D", "u32"], ["eps", "f32"], ["chunks", "u32"], ["per", "u32"]],
    workgroupSize: WG,
    body: bodies[kind],
  });
  kernels.set(key, k);
  return k;
}

const rmsNormOp = defineOp<{ eps: number }>({
  name: "rmsNorm",
  forward: ([x, w], { eps }, save) => {
    const D = x.shape[x.rank - 1];
    const rows = D === 0 ? 0 : x.size / D;
    const y = Tensor.empty(x.shape);
    const rstd = Tensor.empty(x.shape.slice(0, -1));
    if (rows > 0) {
      const V = D % 4 === 0 ? 4 : 1;
      const bufs = { x: x.storage, w: w.storage, y: y.storage, rstd: rstd.storage };
      dispatch(kernel("fwd", V), bufs, { rows, D, eps, chunks: 0, per: 0 }, Math.ceil(rows / WG));
    }
    save(x, w, rstd);
    return y;
  },
  backward: (g, [x, w, rstd], inputs) => {
    const D = x.shape[x.rank - 1];
    const rows = D === 0 ? 0 : x.size / D;
    const V = D % 4 === 0 ? 4 : 1;
    let dx: Tensor | null = null;
    let dw: Tensor | null = null;
    if (inputs[0].requiresGrad) {
      dx = Tensor.empty(x.shape);
      if (rows > 0) {
        const bufs = { x: x.storage, w: w.storage, rstd: rstd.storage, g: g.storage, y: dx.storage };
        dispatch(kernel("bwd_x", V), bufs, { rows, D, eps: 0, chunks: 0, per: 0 }, Math.ceil(rows / WG));
      }
    }
    if (inputs[1].requiresGrad) {
      if (rows === 0) {
        dw = zeros(w.shape);
      } else {
        // ~sqrt(rows) rows per chunk: the partials' pass and `sum`'s pass over the chunks loop alike.
        const per = Math.ceil(Math.sqrt(rows));
        const chunks = Math.ceil(rows / per);
        const part = Tensor.empty([chunks, D]);
        const bufs = { x: x.storage, rstd: rstd.storage, g: g.storage, y: part.storage };
        const u = { rows, D, eps: 0, chunks, per };
        dispatch(kernel("bwd_w", V), bufs, u, Math.ceil((chunks * D) / V / WG));
        dw = chunks === 1 ? reshape(part, w.shape) : sum(part, 0);
        part.dispose();
      }
    }
    return [dx, dw];
  },
});

/**
 * RMSNorm over the last dim in one op: `x * rsqrt(mean(x^2, -1) + eps) * weight`, with x (..., D) and
 * weight (D), both f32. One dispatch forward; the backward computes only the gradients that are needed.
 */
export function rmsNorm(x: Tensor, weight: Tensor, eps: number): Tensor {
  if (x.dtype !== "f32" || weight.dtype !== "f32") {
    throw new Error(`rmsNorm needs f32 tensors, got x ${x.dtype} and weight ${weight.dtype}`);
  }
  if (x.rank === 0) throw new Error(`rmsNorm: x must be (..., D), got a scalar of shape ${fmt(x.shape)}`);
  const D = x.shape[x.rank - 1];
  if (weight.rank !== 1 || weight.shape[0] !== D) {
    throw new Error(`rmsNorm: weight must be ${fmt([D])} for x ${fmt(x.shape)}, got ${fmt(weight.shape)}`);
  }
  const V = D % 4 === 0 ? 4 : 1;
  if (D / V > MAX_DV) {
    const limits = `${MAX_DV}, or ${4 * MAX_DV} for a multiple of 4`;
    throw new Error(
      `rmsNorm: the last dim of x ${fmt(x.shape)} exceeds ${MAX_DV * V} (at most ${limits}: each row's ` +
        `kernel loops twice over it, within the ${LOOP_LIMIT} loop trips software adapters run)`,
    );
  }
  if (!Number.isFinite(eps)) throw new Error(`rmsNorm: eps must be a finite number, got ${eps}`);
  return rmsNormOp([x, weight], { eps });
}
