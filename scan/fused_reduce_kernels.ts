/**
 * The second passes of the fused backward's sums (WGSL has no float atomics, so the backward kernel writes
 * partial sums and these reduce them).
 *
 * `fused_scan_bwd_sums`: the dB/dC (and dt) partial rows summed over the channel tiles, into the gradient
 * of the x_proj output, and in the last dispatch also the parameter gradients summed over the batch, from the
 * per-(b, d) rows the backward kernel left in `gpar`. No workgroup memory.
 * @module
 */

import { defineKernel, type Kernel } from "../core/kernel.ts";
import { cachedKernel } from "./fused_wgsl.ts";

/**
 * `fused_scan_bwd_sums`: one dispatch per time segment. Invocations 0..n-1 each sum one row (b, t) of the
 * segment's partial rows (B, segLen, slots, PW) over their slots into the gradient of the x_proj output (B, L,
 * R + 2N): the 2N B and C columns at R.., and the R dt columns (kept after B and C in a partial row when dt_proj
 * runs inside the kernels) at 0..R, or zeros there (the scan does not differentiate them). Few, long
 * invocations: workgroups cost more than loops on CPU adapters. The partials are read V at a time (V = 4: as
 * vec4, when the row width is a multiple of 4; 1.1-2x faster on lavapipe than scalar loads).
 *
 * In the last segment's dispatch (`P.params` = 1; the backward walks time in reverse, so that is the segment
 * starting at t = 0, after every backward dispatch), invocations n .. n + ED (N + 2 + Ri) - 1 also sum the
 * parameter gradients over the batch, one per (d, column), from `gpar` (B, ED, [dbias | dD | dA (N) | lam carry
 * (`lamCols`: N, or none from chunk-parallel kernels) | dW (Ri)], at element `off` of the same buffer as the
 * partials; or, past `presumRows` rows on GPUs, one
 * row already summed by core's reduction, bound on its own: B 1, off 0) and write dbias (ED), dD (ED), dA_log
 * (ED, N) = dA * A with A = -exp(A_log), or dt_proj's weight gradient dW (ED, Ri): no dispatch of their own.
 */
export function sumsKernel(V: 1 | 4, dt: boolean): Kernel {
  return cachedKernel(`sums|${V}|${dt}`, () => generateSums(V, dt));
}

/**
 * Loop trips of a `fused_scan_bwd_sums` invocation at worst, each loop's last test counted: a row's walk over
 * its column groups (the R dt columns in groups of V, or R zeros; the Q groups of B and C; the padding up to
 * S), each group a walk over the slots; plus, in a dispatch that sums the parameters, a walk over the B rows
 * of gpar, since lanes of one SIMD batch that take both branches run both loops (software adapters stop an
 * invocation silently past 65535 trips in all).
 */
export function sumsLoopTrips(
  o: { R: number; S: number; slots: number; Q: number; V: number; dt: boolean; params: boolean; B: number },
): number {
  const Rq = Math.ceil(o.R / o.V);
  const dtCols = o.dt ? Rq + 1 + Rq * (o.slots + 1) : o.R + 1;
  const bc = o.Q + 1 + o.Q * (o.slots + 1);
  const pad = o.S - o.R - o.Q * o.V + 1;
  return dtCols + bc + pad + (o.params ? o.B + 1 : 0);
}

/** Invocations of a `fused_scan_bwd_sums` dispatch: the segment's rows, and with the parameters their columns. */
export function sumsInvocations(rows: number, params: boolean, ED: number, N: number, Ri: number): number {
  return rows + (params ? ED * (N + 2 + Ri) : 0);
}

function generateSums(V: 1 | 4, dt: boolean): Kernel {
  const F = V === 4 ? "vec4<f32>" : "f32";
  const comp = (j: number) => (V === 4 ? `acc.${"xyzw"[j]}` : "acc");
  const sumSlots = (col: string) =>
    `var acc = ${F}(0.0);
    for (var s = 0u; s < P.slots; s = s + 1u) { acc = acc + ld_part(base + s * P.PQ + ${col}); }`;
  return defineKernel({
    name: `fused_scan_bwd_sums${V === 4 ? "_v4" : ""}${dt ? "_dt" : ""}`,
    buffers: [
      { name: "part", type: F, access: "read" },
      { name: "gdbc", type: "f32", access: "read_write" },
      // the parameters' buffers (gpar: the same buffer as `part`, as floats, or the rows' sum on its own)
      { name: "gpar", type: "f32", access: "read" },
      { name: "alog", type: "f32", access: "read" },
      { name: "gbias", type: "f32", access: "read_write" },
      { name: "gd", type: "f32", access: "read_write" },
      { name: "galog", type: "f32", access: "read_write" },
      { name: "gw", type: "f32", access: "read_write" },
    ],
    uniforms: [
      ["n", "u32"],
      ["L", "u32"],
      ["S", "u32"],
      ["R", "u32"],
      ["slots", "u32"],
      ["segStart", "u32"],
      ["segLen", "u32"],
      ["Q", "u32"], // groups of V columns of B and C: 2N / V
      ["PQ", "u32"], // groups of V columns per partial row: PW / V
      ["params", "u32"], // 1: this dispatch also sums the parameter gradients
      ["B", "u32"],
      ["ED", "u32"],
      ["N", "u32"],
      ["off", "u32"], // gpar's first element
      ["Ri", "u32"],
      ["lamCols", "u32"], // the lam carry's columns in a gpar row: N, or 0 (chunk-parallel rows have none)
    ],
    workgroupSize: 64,
    decls: `
fn gather_row(gid: u32) {
  let b = gid / P.segLen; // invocation -> row (b, t) of the segment
  let t = P.segStart + gid % P.segLen;
  let out = (b * P.L + t) * P.S;
  let base = gid * P.slots * P.PQ; // its partials (slot, column group)
  ${
      dt
        ? `for (var q = 0u; q * ${V}u < P.R; q = q + 1u) {
    ${sumSlots("P.Q + q")}
    ${
          Array.from({ length: V }, (_, j) =>
            `if (q * ${V}u + ${j}u < P.R) { st_gdbc(out + q * ${V}u + ${j}u, ${comp(j)}); }`).join(" ")
        }
  }`
        : "for (var c = 0u; c < P.R; c = c + 1u) { st_gdbc(out + c, 0.0); }"
    }
  for (var q = 0u; q < P.Q; q = q + 1u) {
    ${sumSlots("q")}
    ${Array.from({ length: V }, (_, j) => `st_gdbc(out + P.R + ${V}u * q + ${j}u, ${comp(j)});`).join(" ")}
  }
  for (var c = P.R + P.Q * ${V}u; c < P.S; c = c + 1u) { st_gdbc(out + c, 0.0); } // padding columns
}

fn sum_params(pid: u32) {
  let W = P.N + 2u + P.Ri; // the columns of gpar read here (the lam carry is left out)
  let d = pid / W;
  let c = pid % W;
  let col = select(c, c + P.lamCols, c >= P.N + 2u); // dW sits after the lam carry, if any
  var acc = 0.0;
  for (var b = 0u; b < P.B; b = b + 1u) {
    acc = acc + ld_gpar(P.off + (b * P.ED + d) * (W + P.lamCols) + col);
  }
  if (c == 0u) {
    st_gbias(d, acc);
  } else if (c == 1u) {
    st_gd(d, acc);
  } else if (c < P.N + 2u) {
    let i = d * P.N + c - 2u;
    st_galog(i, -acc * exp(ld_alog(i))); // dA/dA_log = A = -exp(A_log)
  } else {
    st_gw(d * P.Ri + c - P.N - 2u, acc);
  }
}`,
    body: `
  if (gid < P.n) {
    gather_row(gid);
  } else if (P.params != 0u && gid - P.n < P.ED * (P.N + 2u + P.Ri)) {
    sum_params(gid - P.n);
  }`,
  });
}
