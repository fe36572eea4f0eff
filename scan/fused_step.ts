/**
 * One token of a Mamba block's conv and SSM, fused for decoding (what the official Mamba's
 * `causal_conv1d_update` and `selective_state_update` do): the readable step (`MambaBlock.step` with the
 * pscan and sequential modes, mamba.py's lines) takes about 25 small dispatches per layer, these two
 * kernels and x_proj's product, 3.
 *
 * - `conv_step_K{K}`: an invocation per (b, channel d). xc = bias + sum_k w[d, k] [inputs | x_new][k] with
 *   x_new read in place from in_proj's output; writes x = silu(xc) (B, ED) and the inputs shifted by one
 *   (B, ED, K-1).
 * - `ssm_step_N{N}_dt{R | loop}`: an invocation per (b, d), its N states in turn. delta = softplus(draw + bias),
 *   draw = dBC[b, :R] . W[d, :] computed here at any dt rank (unrolled up to 8, a loop above: one token's R
 *   multiply-adds per channel cost less than a matmul's dispatch, and the dt columns' copy out of dBC); then
 *   h[n] = exp(delta A[n]) h[n] + delta B[n] x, y = C.h + D x, y silu(z) with z read in place from in_proj's
 *   output. Writes y (B, ED) and the new state (B, ED, N), reading the old one once.
 * No workgroup memory; the SSM step binds 10 storage buffers (as the fused backward does, so it runs where
 * `fusedScanAvailable()`). Its invocation loops over the N states (and R above 8): past 65535 trips in all a
 * software adapter stops it silently, so there `ssmStepFits` is false and the block takes its readable step.
 * @module
 */

import { deviceInfo } from "../core/device.ts";
import { defineKernel, dispatch, type Kernel } from "../core/kernel.ts";
import { fmt } from "../core/shape.ts";
import { Tensor } from "../core/tensor.ts";
import { cachedKernel, COMMON, MAX_INLINE_DT_RANK, unroll } from "./fused_wgsl.ts";

const WG = 64;

/** Loop trips of one SSM step invocation: its loop over the N states and, above rank 8, over dt_proj's R
 * (each loop's final test a trip too). */
export function ssmStepLoopTrips(N: number, R: number): number {
  return N + 1 + (R > MAX_INLINE_DT_RANK ? R + 1 : 0);
}

/** Whether `ssmStep` runs here at state size N and dt rank R: software adapters stop an invocation silently
 * past 65535 loop trips in all (GPUs have no such limit). */
export function ssmStepFits(N: number, R: number): boolean {
  return ssmStepLoopTrips(N, R) <= 65535 || !deviceInfo().isFallbackAdapter;
}

function convStepKernel(K: number): Kernel {
  return cachedKernel(`conv_step|${K}`, () =>
    defineKernel({
      name: `conv_step_K${K}`,
      buffers: [
        { name: "xz", type: "f32", access: "read" },
        { name: "inputs", type: "f32", access: "read" },
        { name: "w", type: "f32", access: "read" },
        { name: "bias", type: "f32", access: "read" },
        { name: "x", type: "f32", access: "read_write" },
        { name: "next", type: "f32", access: "read_write" },
      ],
      uniforms: [["B", "u32"], ["ED", "u32"], ["xS", "u32"], ["hasBias", "u32"]],
      workgroupSize: WG,
      decls: COMMON,
      body: `
  // invocation -> (b, d); in_proj's row b holds x_new at column d
  if (gid >= P.B * P.ED) { return; }
  let b = gid / P.ED;
  let d = gid % P.ED;
  let xn = ld_xz(b * P.xS + d);
  var acc = select(0.0, ld_bias(d), P.hasBias != 0u);
  ${
        unroll(
          K - 1,
          (k) => `let c${k} = ld_inputs(gid * ${K - 1}u + ${k}u); acc += c${k} * ld_w(d * ${K}u + ${k}u);`,
        )
      }
  acc += xn * ld_w(d * ${K}u + ${K - 1}u);
  ${unroll(K - 2, (k) => `st_next(gid * ${K - 1}u + ${k}u, c${k + 1});`)}
  st_next(gid * ${K - 1}u + ${K - 2}u, xn);
  st_x(gid, acc * sigmoid_(acc));`,
    }));
}

function ssmStepKernel(N: number, Ri: number): Kernel {
  return cachedKernel(`ssm_step|${N}|${Ri}`, () =>
    defineKernel({
      name: `ssm_step_N${N}_dt${Ri || "loop"}`,
      buffers: [
        { name: "x", type: "f32", access: "read" },
        { name: "dbc", type: "f32", access: "read" },
        { name: "dtw", type: "f32", access: "read" }, // dt_proj's weight (ED, R)
        { name: "bias", type: "f32", access: "read" },
        { name: "alog", type: "f32", access: "read" },
        { name: "dd", type: "f32", access: "read" },
        { name: "xz", type: "f32", access: "read" },
        { name: "h", type: "f32", access: "read" },
        { name: "y", type: "f32", access: "read_write" },
        { name: "hnext", type: "f32", access: "read_write" },
      ],
      uniforms: [["B", "u32"], ["ED", "u32"], ["S", "u32"], ["R", "u32"], ["zS", "u32"], ["z0", "u32"]],
      workgroupSize: WG,
      decls: COMMON,
      body: `
  // invocation -> (b, d); dBC's row b: [dt (R) | B (N) | C (N)]
  if (gid >= P.B * P.ED) { return; }
  let b = gid / P.ED;
  let d = gid % P.ED;
  let row = b * P.S;
  var dr = 0.0; // dt_proj: dBC[b, :R] . W[d, :]
  ${
        Ri
          ? unroll(Ri, (r) => `dr += ld_dbc(row + ${r}u) * ld_dtw(d * ${Ri}u + ${r}u);`)
          : "for (var r = 0u; r < P.R; r++) { dr += ld_dbc(row + r) * ld_dtw(d * P.R + r); }"
      }
  let dt = softplus_(dr + ld_bias(d));
  let xv = ld_x(gid);
  let dtx = dt * xv;
  var y = ld_dd(d) * xv;
  for (var n = 0u; n < ${N}u; n++) {
    let a = exp(-exp(ld_alog(d * ${N}u + n)) * dt); // exp(delta A), A = -exp(A_log)
    let hn = a * ld_h(gid * ${N}u + n) + dtx * ld_dbc(row + P.R + n);
    st_hnext(gid * ${N}u + n, hn);
    y += ld_dbc(row + P.R + ${N}u + n) * hn;
  }
  let zv = ld_xz(b * P.zS + P.z0 + d);
  st_y(gid, y * zv * sigmoid_(zv));`,
    }));
}

/**
 * The conv of one token: xz (B, S) holds in_proj's output (x_new in columns 0..ED), `inputs` the last K-1
 * inputs (B, ED, K-1), `weight` (ED, 1, K) or (ED, K), `bias` (ED) or null. Returns x = silu(conv) (B, ED)
 * and the next inputs (B, ED, K-1). No autograd (decoding).
 */
export function convStep(
  xz: Tensor,
  inputs: Tensor,
  weight: Tensor,
  bias: Tensor | null,
): { x: Tensor; inputs: Tensor } {
  const [B, ED, K1] = inputs.shape;
  const K = K1 + 1;
  const tensors = bias ? [xz, inputs, weight, bias] : [xz, inputs, weight];
  if (
    K < 2 || weight.size !== ED * K || xz.rank !== 2 || xz.shape[0] !== B || xz.shape[1] < ED ||
    (bias && bias.size !== ED) || tensors.some((t) => t.dtype !== "f32")
  ) {
    throw new Error(
      `convStep: inputs ${inputs}, weight ${weight}, bias ${
        bias ?? "none"
      } and in_proj's output ${xz} do not ` +
        "fit (need f32 tensors, K >= 2, weight ED x K, bias (ED), xz (B, >= ED))",
    );
  }
  // the inputs' storages first: a disposed one throws before anything is allocated
  const read = { xz: xz.storage, inputs: inputs.storage, w: weight.storage, bias: (bias ?? weight).storage };
  const x = Tensor.empty([B, ED]); // x: (B, ED)
  const next = Tensor.empty([B, ED, K1]); // next: (B, ED, K-1)
  dispatch(
    convStepKernel(K),
    { ...read, x: x.storage, next: next.storage },
    { B, ED, xS: xz.shape[1], hasBias: bias ? 1 : 0 },
    Math.ceil(B * ED / WG),
  );
  return { x, inputs: next };
}

/**
 * The SSM of one token: x (B, ED) after the conv, dBC (B, R + 2N) x_proj's output, dt_proj's weight W (ED, R)
 * and bias (ED), A_log (ED, N), D (ED), xz (B, 2 ED) in_proj's output (z in columns ED..2ED), h (B, ED, N)
 * the state before. Returns the gated y (B, ED) and the state after (B, ED, N). No autograd (decoding).
 */
export function ssmStep(
  x: Tensor,
  dBC: Tensor,
  W: Tensor,
  bias: Tensor,
  A_log: Tensor,
  D: Tensor,
  xz: Tensor,
  h: Tensor,
): { y: Tensor; h: Tensor } {
  const [B, ED] = x.shape;
  const [, R] = W.shape;
  const N = A_log.shape[1];
  const S = dBC.shape[1];
  // Checked on every decoded token: comparisons here, the messages (shapes formatted) only on failure.
  const tensors = [x, dBC, W, A_log, h, xz, bias, D];
  const bad = [
    x.rank !== 2,
    dBC.shape[0] !== B || S < R + 2 * N,
    W.rank !== 2 || W.shape[0] !== ED,
    A_log.rank !== 2 || A_log.shape[0] !== ED,
    h.rank !== 3 || h.shape[0] !== B || h.shape[1] !== ED || h.shape[2] !== N,
    xz.rank !== 2 || xz.shape[0] !== B || xz.shape[1] !== 2 * ED,
    bias.size !== ED,
    D.size !== ED,
    ...tensors.map((t) => t.dtype !== "f32"),
  ];
  if (bad.includes(true)) {
    const messages = [
      `x must be (B, ED), got ${fmt(x.shape)}`,
      `dBC must be (${B}, >= ${R} + 2*${N}), got ${fmt(dBC.shape)}`,
      `the dt_proj weight must be (${ED}, R), got ${fmt(W.shape)}`,
      `A_log must be (${ED}, N), got ${fmt(A_log.shape)}`,
      `the state must be (${B}, ${ED}, ${N}), got ${fmt(h.shape)}`,
      `xz must be (${B}, ${2 * ED}), got ${fmt(xz.shape)}`,
      `the dt bias must be (${ED}), got ${fmt(bias.shape)}`,
      `D must be (${ED}), got ${fmt(D.shape)}`,
      ...["x", "dBC", "the dt_proj weight", "A_log", "the state", "xz", "the dt bias", "D"].map((n, i) =>
        `${n} must be f32, got ${tensors[i].dtype}`
      ),
    ];
    throw new Error(`ssmStep: ${messages.filter((_, i) => bad[i]).join("; ")}`);
  }
  if (!ssmStepFits(N, R)) {
    throw new Error(
      `ssmStep: N ${N} and dt rank ${R} would loop ${
        ssmStepLoopTrips(N, R)
      } times per invocation, past the ` +
        "65535 a software adapter runs (GPUs have no such limit; MambaBlock.step takes its readable step there)",
    );
  }
  const Ri = R <= MAX_INLINE_DT_RANK ? R : 0; // unrolled up to rank 8, else a loop over R
  // the inputs' storages first: a disposed one throws before anything is allocated
  const read = {
    x: x.storage,
    dbc: dBC.storage,
    dtw: W.storage,
    bias: bias.storage,
    alog: A_log.storage,
    dd: D.storage,
    xz: xz.storage,
    h: h.storage,
  };
  const y = Tensor.empty([B, ED]); // y: (B, ED)
  const next = Tensor.empty([B, ED, N]); // next: (B, ED, N)
  const bufs = { ...read, y: y.storage, hnext: next.storage };
  dispatch(ssmStepKernel(N, Ri), bufs, { B, ED, S, R, zS: 2 * ED, z0: ED }, Math.ceil(B * ED / WG));
  return { y, h: next };
}
