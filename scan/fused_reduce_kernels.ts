/**
 * The second passes of the fused backward's sums (WGSL has no float atomics, so the backward kernel writes
 * partial sums and these reduce them).
 *
 * `fused_scan_bwd_gather`: the dB/dC (and dt) partial rows summed over the channel tiles, into the gradient
 * of the x_proj output. `fused_scan_bwd_params`: the parameter gradients summed over the batch, from the
 * per-(b, d) rows the backward kernel left in `gpar`. Neither uses workgroup memory.
 * @module
 */

import { defineKernel, type Kernel } from "../core/kernel.ts";
import { cachedKernel } from "./fused_wgsl.ts";

/**
 * `fused_scan_bwd_gather`: sums a segment's partial rows (B, segLen, slots, PW) over their slots and writes
 * them into the gradient of the x_proj output (B, L, R + 2N): the 2N B and C columns at R.., and the R dt
 * columns (kept after B and C in a partial row when dt_proj runs inside the kernels) at 0..R, or zeros there
 * (the scan does not differentiate them). One invocation per row (b, t) of the segment (few, long
 * invocations: workgroups cost more than loops on CPU adapters); it reads the partials V at a time (V = 4:
 * as vec4, when the row width is a multiple of 4; 1.1-2x faster on lavapipe than scalar loads).
 */
export function gatherKernel(V: 1 | 4, dt: boolean): Kernel {
  return cachedKernel(`gather|${V}|${dt}`, () => generateGather(V, dt));
}

function generateGather(V: 1 | 4, dt: boolean): Kernel {
  const F = V === 4 ? "vec4<f32>" : "f32";
  const comp = (j: number) => (V === 4 ? `acc.${"xyzw"[j]}` : "acc");
  const sumSlots = (col: string) =>
    `var acc = ${F}(0.0);
    for (var s = 0u; s < P.slots; s = s + 1u) { acc = acc + ld_part(base + s * P.PQ + ${col}); }`;
  return defineKernel({
    name: `fused_scan_bwd_gather${V === 4 ? "_v4" : ""}${dt ? "_dt" : ""}`,
    buffers: [
      { name: "part", type: F, access: "read" },
      { name: "gdbc", type: "f32", access: "read_write" },
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
    ],
    workgroupSize: 64,
    body: `
  if (gid >= P.n) { return; }
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
  for (var c = P.R + P.Q * ${V}u; c < P.S; c = c + 1u) { st_gdbc(out + c, 0.0); } // padding columns`,
  });
}

/**
 * `fused_scan_bwd_params`: the parameter gradients out of `gpar` (B, ED, [dbias | dD | dA (N) | lam carry (N) |
 * dW (Ri)], at element `off` of its buffer): one invocation per (d, column) sums the batch and writes dbias
 * (ED), dD (ED), dA_log (ED, N) = dA * A with A = -exp(A_log), or dt_proj's weight gradient dW (ED, Ri).
 */
export const paramsKernel: Kernel = defineKernel({
  name: "fused_scan_bwd_params",
  buffers: [
    { name: "gpar", type: "f32", access: "read" },
    { name: "alog", type: "f32", access: "read" },
    { name: "gbias", type: "f32", access: "read_write" },
    { name: "gd", type: "f32", access: "read_write" },
    { name: "galog", type: "f32", access: "read_write" },
    { name: "gw", type: "f32", access: "read_write" },
  ],
  uniforms: [["B", "u32"], ["ED", "u32"], ["N", "u32"], ["off", "u32"], ["Ri", "u32"]],
  workgroupSize: 64,
  body: `
  let W = P.N + 2u + P.Ri; // the columns of gpar this kernel reads (the lam carry is left out)
  if (gid >= P.ED * W) { return; }
  let d = gid / W;
  let c = gid % W;
  let col = select(c, c + P.N, c >= P.N + 2u); // dW sits after the lam carry
  var acc = 0.0;
  for (var b = 0u; b < P.B; b = b + 1u) {
    acc = acc + ld_gpar(P.off + (b * P.ED + d) * (2u * P.N + 2u + P.Ri) + col);
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
  }`,
});
