/**
 * Depthwise causal 1-D convolution over time, optionally fused with silu, as one op:
 *   pre[b,t,c] = bias[c] + sum_k w[c,k] * x[b, t-(K-1)+k, c]   (x = 0 before t = 0),  y = act(pre).
 * With a `prefix` (B, C, K-1), x before t = 0 is the prefix's instead of zeros: x[b, -j, c] = prefix[b, c, K-1-j]
 * (the conv inputs an inference cache keeps, in its layout: a sequence that goes on from a cache); it is a
 * constant (no gradient).
 *
 * Every kernel gives one invocation a (b, group of V channels, chunk of T consecutive time steps); the lanes
 * of a workgroup are consecutive channel groups, so neighbouring lanes read neighbouring addresses. V = 4
 * (C, x's row width Cx and the first channel read, start, multiples of 4) binds x, g, y, w, bias and the
 * partials as vec4<f32>; otherwise V = 1. The invocation walks its chunk in time order with a sliding window
 * of the last K-1 inputs in registers (K is a template constant, so the window is K-1 values and the k loops
 * unroll): each element is loaded once and its activation computed once, and the (b, channels, chunk)
 * decomposition costs integer divisions once per invocation (they are scalar on CPU adapters), not once per
 * element.
 * - `conv_fwd`: y[t] = act(pre[t]) for the steps of its chunk (after reading the K-1 inputs before it).
 * - `conv_bwd`: the backward of x and of (w, bias) in one pass. For each step s of its chunk and the K-1
 *   after it, gpre[s] = g[s] act'(pre[s]) (pre from the window, one exp per element) enters a second window
 *   of K-1 values; gx[t] = sum_k w[k] gpre[t + K-1-k] is written once gpre[t + K-1] is known. Over the steps
 *   of its own chunk it sums gpre * window into partials (B * chunks, C, K + 1) = [dw, dbias], which a
 *   reduction over the chunks follows (no float atomics).
 * - `conv_bwd_w`: the same without gx (x needs no gradient), over the steps of its own chunk only.
 * - `conv_bwd_params`: sums the partials over their rows, in slices of at most MAX_ROWS rows per dispatch.
 * No workgroup memory; loops run at most T + K - 1 (or MAX_ROWS) times: software adapters silently stop
 * loops past 65535 iterations.
 * @module
 */

import { defineOp, isGradEnabled, WindowGrad } from "../autograd.ts";
import { defineKernel, dispatch, type Kernel } from "../kernel.ts";
import { zeros } from "../creation.ts";
import { fmt } from "../shape.ts";
import { Tensor } from "../tensor.ts";

/** Activation fused after the convolution. */
export type ConvActivation = "none" | "silu";

const WG = 64;
/** Rows of partials one `conv_bwd_params` dispatch sums (its loop's trip count). */
const MAX_ROWS = 16384;

/**
 * Time steps per invocation. Long chunks amortise the per-invocation work (weights, bias, the K-1 inputs
 * before the chunk, the backward's K-1 look-ahead steps and its partials, which are (K + 1) / T of x's
 * size). But CPU adapters run the SIMD batches of a workgroup one after the other, each walking its whole
 * chunk: once a row is longer than one batch reads (128 bytes), every row of the chunk is its own strided
 * memory stream per buffer, and past a few dozen streams hardware prefetching seems to fail. Measured on
 * lavapipe (K = 4): forward chunks of 16 beat 64 from C = 64 on (1.1x at C = 128, 2-2.5x at C = 1536) and
 * lose at C = 32 (1.2x); backward chunks of 8 beat 64 from C = 256 on (1.1-1.2x at 256, 1.45x at 1536,
 * counting the partials' reduction) and lose at C = 128 (1.3-1.5x).
 */
function chunkSteps(kind: "fwd" | "bwd" | "bwd_w", C: number): number {
  return kind === "fwd" ? (C <= 32 ? 64 : 16) : (C <= 128 ? 64 : 8);
}

const kernels = new Map<string, Kernel>();
const UNIFORMS: [string, "u32"][] = [
  ["B", "u32"],
  ["L", "u32"],
  ["C", "u32"],
  ["hasBias", "u32"],
  ["chunks", "u32"],
  ["XS", "u32"], // row length of x in units of V channels (x may be wider than C: a channel window)
  ["X0", "u32"], // first channel of the window, in units of V
  ["YS", "u32"], // the same for y (forward) or gx (backward), which may be a window of x's gradient
  ["Y0", "u32"],
];

/** `f(k)` for k in [from, to), joined. */
function each(from: number, to: number, f: (k: number) => string, sep = " "): string {
  return Array.from({ length: Math.max(0, to - from) }, (_, i) => f(from + i)).join(sep);
}

/** WGSL: the activation and its derivative, per component of `F` (f32 or vec4<f32>). */
function helpers(act: ConvActivation, F: string): string {
  return `
fn act(p: ${F}) -> ${F} { ${act === "silu" ? "return p / (1.0 + exp(-p));" : "return p;"} }
fn dact(p: ${F}) -> ${F} { ${
    act === "silu" ? "let s = 1.0 / (1.0 + exp(-p)); return s * (1.0 + p * (1.0 - s));" : `return ${F}(1.0);`
  } }`;
}

/**
 * WGSL: the weights `w0..w{K-1}` and `bias` of the invocation's channels. With V = 4, w and bias are bound
 * as vec4<f32>: the 4K weights of channels 4cv .. 4cv+3 are K contiguous vec4 (`m0..`), transposed here.
 */
function weights(K: number, V: number): string {
  if (V === 1) {
    return `${each(0, K, (k) => `let w${k} = ld_w(cv * ${K}u + ${k}u);`)}
  let bias = select(0.0, ld_bias(cv), P.hasBias != 0u);`;
  }
  const comp = (j: number) => `m${j >> 2}.${"xyzw"[j & 3]}`;
  return `${each(0, K, (j) => `let m${j} = ld_w(cv * ${K}u + ${j}u);`)}
  ${each(0, K, (k) => `let w${k} = vec4<f32>(${each(0, 4, (i) => comp(i * K + k), ", ")});`, "\n  ")}
  let bias = select(vec4<f32>(), ld_bias(cv), P.hasBias != 0u);`;
}

/**
 * WGSL shared by every kernel: the invocation's (b, channel group cv, chunk), its weights `w0..`, `bias`,
 * and the input window `x0..x{K-2}` = x[t0-K+1 .. t0-1] (before t = 0: zeros, or with `pre` the prefix's
 * values, read channel by channel from its (B, C, K-1) layout). In units of V channels: `at`
 * indexes g at [b, t0, cv] and `CV` is its row length; `xat` indexes x at [b, t0, X0 + cv] and `P.XS` is
 * x's row length (x can be a window of a wider tensor); `yat` indexes y, or gx, the same way with Y0, YS
 * (gx can be a window of x's gradient).
 */
function prologue(K: number, T: number, V: number, F: string, pre: boolean): string {
  // x[t0 - (K-1) + k] before t = 0 is prefix[b, c, t0 + k]
  const before = (k: number) =>
    V === 1
      ? `ld_pre((b * P.C + cv) * ${K - 1}u + t0 + ${k}u)`
      : `vec4<f32>(${
        each(0, 4, (i) => `ld_pre((b * P.C + 4u * cv + ${i}u) * ${K - 1}u + t0 + ${k}u)`, ", ")
      })`;
  return `
  // invocation -> (row r = b * chunks + chunk, channel group cv): steps t0 .. end-1 of sequence b.
  let CV = P.C / ${V}u;
  let cv = gid % CV;
  let r = gid / CV;
  if (r >= P.B * P.chunks) { return; }
  let b = r / P.chunks;
  let t0 = (r - b * P.chunks) * ${T}u;
  let end = min(P.L, t0 + ${T}u);
  var at = (b * P.L + t0) * CV + cv;
  var yat = (b * P.L + t0) * P.YS + P.Y0 + cv;
  var xat = (b * P.L + t0) * P.XS + P.X0 + cv;
  ${weights(K, V)}
  ${each(0, K - 1, (k) => `var x${k} = ${F}();`)}
  ${
    each(
      0,
      K - 1,
      (k) =>
        `if (t0 >= ${K - 1 - k}u) { x${k} = ld_x(xat - ${K - 1 - k}u * P.XS); }${
          pre ? ` else { x${k} = ${before(k)}; }` : ""
        }`,
      "\n  ",
    )
  }`;
}

/**
 * WGSL: stores `gw0..gw{K}` as the partials (r, channel, K + 1) of the invocation's channels; with V = 4
 * these are K + 1 contiguous vec4 (channel-major), transposed here.
 */
function storePartials(K: number, V: number): string {
  if (V === 1) return each(0, K + 1, (k) => `st_part((r * P.C + cv) * ${K + 1}u + ${k}u, gw${k});`);
  const comp = (f: number) => `gw${f % (K + 1)}.${"xyzw"[Math.floor(f / (K + 1))]}`;
  return each(
    0,
    K + 1,
    (j) =>
      `st_part((r * P.C / 4u + cv) * ${K + 1}u + ${j}u, vec4<f32>(${
        each(0, 4, (c) => comp(4 * j + c), ", ")
      }));`,
    "\n  ",
  );
}

/** WGSL expression: pre-activation at the current step, whose input is `xs` (k ascending, as PyTorch). */
function preExpr(K: number): string {
  return `bias${each(0, K, (k) => ` + w${k} * ${k === K - 1 ? "xs" : `x${k}`}`, "")}`;
}

/** WGSL: slides the input window by one step (`xs` becomes the newest). */
function shiftX(K: number): string {
  return each(0, K - 1, (k) => `x${k} = ${k === K - 2 ? "xs" : `x${k + 1}`};`);
}

/**
 * The kernel of one kind for K taps, the activation, V channels and T steps per invocation. V = 4 (C, Cx and
 * start multiples of 4) binds every buffer as vec4<f32>: on lavapipe each access is a loop over the SIMD
 * lanes, which four components share, so 16-byte accesses cost little more than 4-byte ones.
 */
function kernel(
  kind: "fwd" | "bwd" | "bwd_w",
  K: number,
  act: ConvActivation,
  V: number,
  T: number,
  pre: boolean,
): Kernel {
  const key = `${kind}|${K}|${act}|${V}|${T}|${pre}`;
  let k = kernels.get(key);
  if (k) return k;
  const F = V === 1 ? "f32" : `vec4<f32>`;
  const gx = kind === "bwd";
  const body = kind === "fwd"
    ? `${prologue(K, T, V, F, pre)}
  for (var s = t0; s < end; s++) {
    let xs = ld_x(xat);
    st_y(yat, act(${preExpr(K)}));
    ${shiftX(K)}
    at += CV;
    xat += P.XS;
    yat += P.YS;
  }`
    : `${prologue(K, T, V, F, pre)}
  ${each(0, K + 1, (k) => `var gw${k} = ${F}();`)}
  ${gx ? `${each(1, K, (k) => `var d${k} = ${F}();`)} // dk = gpre[s - k]` : ""}
  // ${gx ? "its steps, then K-1 more (gpre for its last gx)" : "its steps"}
  for (var s = t0; s < end${gx ? ` + ${K - 1}u` : ""}; s++) {
    var d0 = ${F}(); // gpre[s]
    if (s < P.L) {
      let xs = ld_x(xat);
      d0 = ld_g(at) * dact(${preExpr(K)});
      if (s < end) {
        ${each(0, K, (k) => `gw${k} += d0 * ${k === K - 1 ? "xs" : `x${k}`};`)}
        gw${K} += d0;
      }
      ${shiftX(K)}
    }${
      gx
        ? `
    if (s >= t0 + ${K - 1}u) { st_y(yat - ${K - 1}u * P.YS, ${each(0, K, (k) => `w${k} * d${k}`, " + ")}); }
    ${each(1, K, (k) => `d${K - k} = d${K - k - 1};`)}`
        : ""
    }
    at += CV;
    xat += P.XS;
    yat += P.YS;
  }
  ${storePartials(K, V)}`;
  const data = (name: string, access: "read" | "read_write") => ({ name, type: F as "f32", access });
  k = defineKernel({
    name: `conv_${kind}_K${K}_${act}${V === 1 ? "" : "_v4"}_T${T}${pre ? "_pre" : ""}`,
    buffers: [
      data("x", "read"),
      data("w", "read"),
      data("bias", "read"),
      ...(pre ? [{ name: "pre", type: "f32" as const, access: "read" as const }] : []),
      ...(kind === "fwd" ? [] : [data("g", "read")]),
      ...(kind === "bwd_w" ? [] : [data("y", "read_write")]),
      ...(kind === "fwd" ? [] : [data("part", "read_write")]),
    ],
    uniforms: UNIFORMS,
    workgroupSize: WG,
    decls: helpers(act, F),
    body,
  });
  kernels.set(key, k);
  return k;
}

/** Static attributes of a conv call: taps, activation, bias, and the channel window of x it reads. */
interface ConvAttrs {
  K: number;
  act: ConvActivation;
  hasBias: boolean;
  /** Channels C (the weight's) and x's first channel of them. */
  C: number;
  start: number;
  /** A prefix (B, C, K-1) is the op's last input: x before t = 0. */
  pre: boolean;
}

/** Vector width and the uniforms of a call on x: (B, L, Cx) reading channels start .. start + C. */
function layout(x: Tensor, { C, start, hasBias }: ConvAttrs, kind: "fwd" | "bwd" | "bwd_w") {
  const [B, L, Cx] = x.shape;
  const V = C % 4 === 0 && Cx % 4 === 0 && start % 4 === 0 ? 4 : 1;
  const T = chunkSteps(kind, C);
  const chunks = Math.ceil(L / T);
  const u = { B, L, C, hasBias: hasBias ? 1 : 0, chunks, XS: Cx / V, X0: start / V, YS: C / V, Y0: 0 };
  return { B, L, V, T, chunks, u, groups: Math.ceil((B * chunks * C) / V / WG) };
}

/**
 * `conv_bwd_params`: the weight and bias gradients out of the backward's partials (rows, C, K + 1): one
 * invocation per (channel, tap or bias) sums the rows (neighbouring invocations read neighbouring partials)
 * and writes gw (C, K) or gbias (C) directly, instead of a reduction and two copies. One dispatch sums rows
 * r0 .. r1; dispatches after the first (r0 > 0) add to what the earlier ones wrote.
 */
const paramsKernel = defineKernel({
  name: "conv_bwd_params",
  buffers: [
    { name: "part", type: "f32", access: "read" },
    { name: "gw", type: "f32", access: "read_write" },
    { name: "gb", type: "f32", access: "read_write" },
  ],
  uniforms: [["r0", "u32"], ["r1", "u32"], ["C", "u32"], ["K", "u32"], ["hasBias", "u32"]],
  workgroupSize: WG,
  body: `
  let W = P.K + 1u;
  if (gid >= P.C * W) { return; }
  let c = gid / W;
  let k = gid % W;
  let more = P.r0 > 0u;
  var acc = 0.0;
  if (k < P.K) { acc = select(0.0, ld_gw(c * P.K + k), more); } else if (P.hasBias != 0u) { acc = select(0.0, ld_gb(c), more); }
  for (var r = P.r0; r < P.r1; r = r + 1u) { acc = acc + ld_part(r * P.C * W + gid); }
  if (k < P.K) { st_gw(c * P.K + k, acc); } else if (P.hasBias != 0u) { st_gb(c, acc); }`,
});

const convOp = defineOp<ConvAttrs>({
  name: "causalConv1d",
  forward: (inputs, a, save) => {
    const [x, w] = inputs;
    const bias = a.hasBias ? inputs[2] : null;
    const pre = a.pre ? inputs[inputs.length - 1] : null;
    const { B, L, V, T, u, groups } = layout(x, a, "fwd");
    const y = Tensor.empty([B, L, a.C]);
    const bufs = { x: x.storage, w: w.storage, bias: (bias ?? w).storage, y: y.storage };
    dispatch(kernel("fwd", a.K, a.act, V, T, a.pre), pre ? { ...bufs, pre: pre.storage } : bufs, u, groups);
    save(x, w, ...(bias ? [bias] : []), ...(pre ? [pre] : []));
    return y;
  },
  backward: (g, saved, inputs, a, targets) => {
    const [x, w] = saved;
    const bias = a.hasBias ? saved[2] : null;
    const pre = a.pre ? saved[saved.length - 1] : null;
    const { K, act, C, start } = a;
    const kind = inputs[0].requiresGrad ? "bwd" : "bwd_w";
    const { B, L, V, T, chunks, u, groups } = layout(x, a, kind);
    const part = Tensor.empty([B * chunks, C, K + 1]);
    const bufs = {
      x: x.storage,
      w: w.storage,
      bias: (bias ?? w).storage,
      g: g.storage,
      part: part.storage,
      ...(pre ? { pre: pre.storage } : {}),
    };
    // x a window of a wider tensor: write gx straight into that window of x's gradient where autograd
    // offers it (else gx is its own tensor, returned as a window).
    const wide = x.shape[2] !== C;
    const target = kind === "bwd" && wide ? targets.window(0, 2, start, C) : null;
    const gx = kind === "bwd" ? target ?? Tensor.empty([B, L, C]) : null;
    const gu = target ? { ...u, YS: u.XS, Y0: u.X0 } : u;
    dispatch(kernel(kind, K, act, V, T, a.pre), gx ? { ...bufs, y: gx.storage } : bufs, gu, groups);
    // No rows (B or L zero): the sums over them are zero, which the params kernel would never write.
    const none = B * chunks === 0;
    const gw = none ? zeros(w.shape) : Tensor.empty(w.shape);
    const gb = a.hasBias ? (none ? zeros([C]) : Tensor.empty([C])) : null;
    // Without a bias the kernel still binds `gb`: a scratch word (writable bindings must not alias).
    const gbOut = gb ?? Tensor.empty([1]);
    const pbufs = { part: part.storage, gw: gw.storage, gb: gbOut.storage };
    for (let r0 = 0; r0 < B * chunks; r0 += MAX_ROWS) {
      const pu = { r0, r1: Math.min(B * chunks, r0 + MAX_ROWS), C, K, hasBias: a.hasBias ? 1 : 0 };
      dispatch(paramsKernel, pbufs, pu, Math.ceil((C * (K + 1)) / WG));
    }
    if (!gb) gbOut.dispose();
    part.dispose();
    const rest = a.pre ? [null] : []; // the prefix: a constant
    if (target || !gx) return [null, gw, gb, ...rest];
    return [wide ? new WindowGrad(gx, 2, start) : gx, gw, gb, ...rest];
  },
});

/**
 * Depthwise causal convolution over time. x: (B, L, C); weight: (C, 1, K) or (C, K); bias: (C) or null.
 * Returns act(conv(x)): (B, L, C), where `activation` defaults to "none" ("silu" as a Mamba block uses it).
 * With `start`, x is (B, L, Cx), Cx >= start + C, and the conv reads its
 * channels start .. start + C in place (e.g. the x half of in_proj's output, without a copy); x's gradient
 * is zero outside them. With `prefix` (B, C, K-1), the inputs before x's first step (an inference cache's
 * `inputs`: a sequence that goes on from it) instead of zeros; it gets no gradient (one that requires grad is
 * refused).
 */
export function causalConv1d(
  x: Tensor,
  weight: Tensor,
  bias: Tensor | null,
  activation: ConvActivation = "none",
  start?: number,
  prefix?: Tensor | null,
): Tensor {
  for (const [name, t] of [["x", x], ["weight", weight], ["bias", bias]] as const) {
    if (t && t.dtype !== "f32") throw new Error(`causalConv1d: ${name} must be f32, got ${t.dtype} ${t}`);
  }
  if (activation !== "none" && activation !== "silu") {
    throw new Error(`causalConv1d: activation must be "none" or "silu", got ${JSON.stringify(activation)}`);
  }
  if ((weight.rank !== 2 && weight.rank !== 3) || (weight.rank === 3 && weight.shape[1] !== 1)) {
    throw new Error(`causalConv1d: weight must be (C, 1, K) or (C, K), got ${fmt(weight.shape)}`);
  }
  const C = weight.shape[0];
  const K = weight.shape[weight.rank - 1];
  if (K < 1) {
    throw new Error(`causalConv1d: kernel size K must be at least 1, got weight ${fmt(weight.shape)}`);
  }
  if (start === undefined) {
    if (x.rank !== 3 || x.shape[2] !== C) {
      throw new Error(`causalConv1d: x must be (B, L, ${C}), got ${fmt(x.shape)}`);
    }
  } else if (x.rank !== 3 || !Number.isInteger(start) || start < 0 || start + C > x.shape[2]) {
    throw new Error(
      `causalConv1d: to read channels ${start}..${start + C}, x must be (B, L, Cx) with Cx >= ${
        start + C
      }, got ${fmt(x.shape)}`,
    );
  }
  if (weight.size !== C * K || (bias && bias.shape.join() !== `${C}`)) {
    throw new Error(
      `causalConv1d: weight ${fmt(weight.shape)} / bias ${bias ? fmt(bias.shape) : "none"} for ${C} channels`,
    );
  }
  const pre = prefix && K > 1 ? prefix : null; // one tap reads no step before its own
  if (prefix && (prefix.dtype !== "f32" || prefix.shape.join() !== `${x.shape[0]},${C},${K - 1}`)) {
    throw new Error(
      `causalConv1d: the prefix must be f32 (${x.shape[0]}, ${C}, ${
        K - 1
      }) (B, C, K-1), got ${prefix.dtype} ${fmt(prefix.shape)}`,
    );
  }
  if (pre?.requiresGrad && isGradEnabled()) {
    throw new Error("causalConv1d: the prefix requires grad, but it gets none (a constant): detach it");
  }
  const inputs = [x, weight, ...(bias ? [bias] : []), ...(pre ? [pre] : [])];
  return convOp(inputs, {
    K,
    act: activation,
    hasBias: bias !== null,
    C,
    start: start ?? 0,
    pre: pre !== null,
  });
}
