/**
 * Depthwise causal 1-D convolution over time, optionally fused with silu, as one op:
 *   pre[b,t,c] = bias[c] + sum_k w[c,k] * x[b, t-(K-1)+k, c]   (x = 0 before t = 0),  y = act(pre).
 *
 * Kernels (K is a template constant, so the k loops unroll):
 * - `conv_fwd`: one invocation per output element (b, t, c); reads K inputs and the weights, writes y.
 * - `conv_bwd_x`: one invocation per input element; gx[t] = sum_k w[k] gpre[t + K-1-k], where gpre = g *
 *   act'(pre) and pre is recomputed (K^2 multiply-adds per element instead of storing pre).
 * - `conv_bwd_w`: one invocation per (row chunk, channel) sums gpre * x over at most 4096 time rows into
 *   partials (chunks, C, K + 1) = [dw, dbias]; a reduction over chunks follows (no float atomics).
 * No workgroup memory.
 * @module
 */

import { defineOp } from "../autograd.ts";
import { defineKernel, dispatch, type Kernel } from "../kernel.ts";
import { fmt } from "../shape.ts";
import { Tensor } from "../tensor.ts";
import { sum } from "./reduce.ts";

/** Activation fused after the convolution. */
export type ConvActivation = "none" | "silu";

const WG = 64;
const ROWS = 4096;
const kernels = new Map<string, Kernel>();
const UNIFORMS: [string, "u32"][] = [["B", "u32"], ["L", "u32"], ["C", "u32"], ["hasBias", "u32"], [
  "chunks",
  "u32",
]];

/** WGSL: pre-activation at (b, t, c) and, for silu, the activation and its derivative. */
function helpers(K: number, act: ConvActivation): string {
  const taps = Array.from(
    { length: K },
    (_, k) =>
      `if (t + ${k}u >= ${K - 1}u) { acc += ld_w(c * ${K}u + ${k}u) * ld_x(((b * P.L + t + ${k}u - ${
        K - 1
      }u) * P.C) + c); }`,
  ).join("\n  ");
  return `
fn pre(b: u32, t: u32, c: u32) -> f32 {
  var acc = select(0.0, ld_bias(c), P.hasBias != 0u);
  ${taps}
  return acc;
}
fn act(p: f32) -> f32 { ${act === "silu" ? "return p / (1.0 + exp(-p));" : "return p;"} }
fn dact(p: f32) -> f32 { ${
    act === "silu" ? "let s = 1.0 / (1.0 + exp(-p)); return s * (1.0 + p * (1.0 - s));" : "return 1.0;"
  } }`;
}

function kernel(kind: "fwd" | "bwd_x" | "bwd_w", K: number, act: ConvActivation): Kernel {
  const key = `${kind}|${K}|${act}`;
  let k = kernels.get(key);
  if (k) return k;
  const body = {
    fwd: `
  if (gid >= P.B * P.L * P.C) { return; }
  let c = gid % P.C;
  let t = (gid / P.C) % P.L;
  let b = gid / (P.C * P.L);
  st_y(gid, act(pre(b, t, c)));`,
    bwd_x: `
  if (gid >= P.B * P.L * P.C) { return; }
  let c = gid % P.C;
  let t = (gid / P.C) % P.L;
  let b = gid / (P.C * P.L);
  var acc = 0.0;
  ${
      Array.from({ length: K }, (_, k) =>
        `if (t + ${K - 1 - k}u < P.L) { let o = t + ${K - 1 - k}u; ` +
        `acc += ld_w(c * ${K}u + ${k}u) * ld_g((b * P.L + o) * P.C + c) * dact(pre(b, o, c)); }`).join("\n  ")
    }
  st_y(gid, acc);`,
    bwd_w: `
  // invocation -> (row chunk r, channel c): rows are (b, t) pairs, ROWS of them per chunk.
  if (gid >= P.chunks * P.C) { return; }
  let c = gid % P.C;
  let r = gid / P.C;
  var gw: array<f32, ${K + 1}>;
  let end = min(P.B * P.L, (r + 1u) * ${ROWS}u);
  for (var row = r * ${ROWS}u; row < end; row++) {
    let b = row / P.L;
    let t = row % P.L;
    let gp = ld_g(row * P.C + c) * dact(pre(b, t, c));
    ${
      Array.from({ length: K }, (_, k) =>
        `if (t + ${k}u >= ${K - 1}u) { gw[${k}] += gp * ld_x((row + ${k}u - ${K - 1}u) * P.C + c); }`).join(
          "\n    ",
        )
    }
    gw[${K}] += gp;
  }
  for (var k = 0u; k < ${K + 1}u; k++) { st_y((r * P.C + c) * ${K + 1}u + k, gw[k]); }`,
  }[kind];
  k = defineKernel({
    name: `conv_${kind}_K${K}_${act}`,
    buffers: [
      { name: "x", type: "f32", access: "read" },
      { name: "w", type: "f32", access: "read" },
      { name: "bias", type: "f32", access: "read" },
      ...(kind === "fwd" ? [] : [{ name: "g", type: "f32" as const, access: "read" as const }]),
      { name: "y", type: "f32", access: "read_write" },
    ],
    uniforms: UNIFORMS,
    workgroupSize: WG,
    decls: helpers(K, act),
    body,
  });
  kernels.set(key, k);
  return k;
}

const convOp = defineOp<{ K: number; act: ConvActivation; hasBias: boolean }>({
  name: "causalConv1d",
  forward: ([x, w, bias], { K, act, hasBias }, save) => {
    const [B, L, C] = x.shape;
    const y = Tensor.empty(x.shape);
    const u = { B, L, C, hasBias: hasBias ? 1 : 0, chunks: 0 };
    const bufs = { x: x.storage, w: w.storage, bias: (bias ?? w).storage, y: y.storage };
    dispatch(kernel("fwd", K, act), bufs, u, Math.ceil(x.size / WG));
    save(x, w, ...(bias ? [bias] : []));
    return y;
  },
  backward: (g, [x, w, bias], inputs, { K, act, hasBias }) => {
    const [B, L, C] = x.shape;
    const chunks = Math.ceil((B * L) / ROWS);
    const u = { B, L, C, hasBias: hasBias ? 1 : 0, chunks };
    const base = { x: x.storage, w: w.storage, bias: (bias ?? w).storage, g: g.storage };
    let gx: Tensor | null = null;
    if (inputs[0].requiresGrad) {
      gx = Tensor.empty(x.shape);
      dispatch(kernel("bwd_x", K, act), { ...base, y: gx.storage }, u, Math.ceil(x.size / WG));
    }
    const part = Tensor.empty([chunks, C, K + 1]);
    dispatch(kernel("bwd_w", K, act), { ...base, y: part.storage }, u, Math.ceil((chunks * C) / WG));
    const gwb = sum(part, 0); // gwb: (C, K + 1)
    part.dispose();
    const gw = gwb.narrow(1, 0, K).reshape(...w.shape);
    const gb = hasBias ? gwb.narrow(1, K, 1).reshape(C) : null;
    gwb.dispose();
    return [gx, gw, gb];
  },
});

/**
 * Depthwise causal convolution over time. x: (B, L, C); weight: (C, 1, K) or (C, K); bias: (C) or null.
 * Returns act(conv(x)): (B, L, C).
 */
export function causalConv1d(
  x: Tensor,
  weight: Tensor,
  bias: Tensor | null,
  activation: ConvActivation = "none",
): Tensor {
  const C = weight.shape[0];
  const K = weight.shape[weight.rank - 1];
  if (x.rank !== 3 || x.shape[2] !== C) {
    throw new Error(`causalConv1d: x must be (B, L, ${C}), got ${fmt(x.shape)}`);
  }
  if (weight.size !== C * K || (bias && bias.shape.join() !== `${C}`)) {
    throw new Error(
      `causalConv1d: weight ${fmt(weight.shape)} / bias ${bias ? fmt(bias.shape) : "none"} for ${C} channels`,
    );
  }
  const inputs = bias ? [x, weight, bias] : [x, weight];
  return convOp(inputs, { K, act: activation, hasBias: bias !== null });
}
