/**
 * The fused selective scan: one kernel computes the whole SSM of a Mamba block, and the backward
 * recomputes instead of storing. No (B, L, ED, N) tensor is ever created. This module holds the autograd
 * ops and their public functions; `fused_run.ts` sizes and dispatches the kernels, each a template in its own
 * module:
 *
 * - `fused_forward_kernel.ts`: h in registers, one invocation per (b, d) walking time; writes y and the
 *   state every Lc steps (hs, the only state that leaves the chip).
 * - `fused_backward_kernel.ts`: chunks walked in reverse, each chunk's h recomputed from its saved state,
 *   then the reverse scan; dx, ddraw, dz written per element, dB/dC summed over channels into partial rows,
 *   dA, dD, dbias (and dt_proj's dW) summed over time in registers.
 * - `fused_subgroup_sums.ts`: the backward's sums over channels by a butterfly of subgroup shuffles.
 * - `fused_reduce_kernels.ts`: the second passes of those sums (WGSL has no float atomics).
 * - `fused_carry_kernels.ts`: for the chunk-parallel variant (GPUs), each chunk's carry (the forward's h, the
 *   backward's lam) from a walk of every chunk at once and a chain over the chunks, so that the main kernels
 *   walk every chunk at once too.
 * - `fused_variant.ts`: the kernels' compile-time shape, per state size; `fused_wgsl.ts`: shared WGSL.
 *
 * Inputs (per batch row b, time t, channel d, state n):
 *   x (B, L, ED), draw (B, L, ED) = dt_proj(delta) without its bias, dBC (B, L, R + 2N) = x_proj output
 *   (B and C are read from its columns R.. and R+N..), params = [bias (ED) | A_log (ED*N) | D (ED)],
 *   z (B, L, ED) optional gate. `fusedMambaScan` takes dt_proj's weight instead of draw: up to rank
 *   MAX_INLINE_DT_RANK the kernels compute draw per step. Above 16 states the states are walked in blocks of
 *   at most Nb (`stateBlocks`).
 * @module
 */

import {
  defineOp,
  type GradTargets,
  isGradEnabled,
  savesForBackward,
  savesForLater,
  WindowGrad,
} from "../core/autograd.ts";
import { copyBox } from "../core/ops/index.ts";
import { matmulRaw } from "../core/ops/matmul.ts";
import { fmt, stridesOf } from "../core/shape.ts";
import { freeOnThrow, Tensor } from "../core/tensor.ts";
import {
  type FusedAttrs,
  type FusedGrads,
  fusedScanBackward,
  fusedScanForward,
  initialState,
  lastState,
  phForBackward,
} from "./fused_run.ts";
import { MAX_INLINE_DT_RANK } from "./fused_wgsl.ts";

/**
 * The whole gradient of a wide z (in_proj's output, whose z half the gate reads in place) for the backward
 * kernel to write gz into, when autograd offers it (see GradTargets.window); else null (gz is then its own
 * tensor, returned by zGrad), as the official kernels write dz into dxz. It saves a copy and a dispatch per
 * layer; the price is that the whole gradient lives from here on instead of from the conv's backward (one
 * more (B, L, ED) at the backward's peak: 8.21 -> 8.71 MiB for a d_model 64, N 16, L 1024 layer).
 */
export function gzTarget(
  inputs: readonly Tensor[],
  ED: number,
  a: FusedAttrs,
  targets: GradTargets,
): Tensor | null {
  const z = inputs[6];
  if (!a.gated || !z?.requiresGrad || z.shape[2] === ED) return null;
  return targets.window(6, 2, a.zStart ?? 0, ED);
}

/** The op's gradient of z: its own tensor, or a window of a wider z (in_proj's output); null if unneeded or
 * written in place. */
export function zGrad(
  gz: Tensor | null,
  z: Tensor | undefined,
  ED: number,
  a: FusedAttrs,
): Tensor | WindowGrad | null {
  if (!gz || !z) return null;
  if (!z.requiresGrad) {
    gz.dispose();
    return null;
  }
  return z.shape[2] !== ED ? new WindowGrad(gz, 2, a.zStart ?? 0) : gz;
}

/** Disposes the gradients of inputs that need none (null for them). */
export function needed(grads: (Tensor | null)[], inputs: readonly Tensor[]): (Tensor | null)[] {
  return grads.map((t, i) => (!t || inputs[i].requiresGrad ? t : (t.dispose(), null)));
}

/** What an op saves of a forward's `ph`: where it is held until a later backward ({@linkcode savesForLater}),
 * {@linkcode phForBackward}'s choice (the parameters alone where the chunk states would outweigh the inputs);
 * else ph (nothing saves it, or a checkpoint's rerun, whose backward follows at once, reads it). */
export function phSaved(ph: Tensor): Tensor {
  return savesForLater() ? phForBackward(ph) : ph;
}

/** Which chunk states an op's forward writes: all where a backward (or a checkpoint's replay) reads what the op
 * saves, else the last state only ({@linkcode savesForBackward}: under noGrad, an evaluation). */
export function statesFor(): "all" | "last" {
  return savesForBackward() ? "all" : "last";
}

const fusedOp = defineOp<FusedAttrs>({
  name: "fusedSelectiveScan",
  forward: (inputs, a, save) => {
    const [x, draw, dBC, bias, A_log, D, z] = inputs;
    // par: (ED + ED*N + ED)
    const { y, ph } = fusedScanForward(x, draw, dBC, [bias, A_log, D], z ?? null, a, statesFor());
    save(x, draw, dBC, A_log, phSaved(ph), ...(z ? [z] : []));
    return y;
  },
  backward: (g, saved, inputs, a, targets) => {
    const [x, draw, dBC, A_log, ph] = saved;
    const z = a.gated ? saved[5] : null;
    const gzInto = gzTarget(inputs, x.shape[2], a, targets);
    const r = fusedScanBackward(g, x, draw, dBC, A_log, ph, z, a, gzInto);
    const grads = needed([r.gx, r.gdraw, r.gdBC, r.gbias, r.gAlog, r.gD], inputs);
    return z ? [...grads, zGrad(r.gz, inputs[6], x.shape[2], a)] : grads;
  },
});

/**
 * dt_proj and the SSM as one op: delta = softplus(dBC[..., :R] @ W^T + bias). It never saves delta (B, L, ED).
 * Up to rank MAX_INLINE_DT_RANK the kernels compute draw themselves, per step, from dBC's dt columns and W
 * (kept with the parameters in `ph`), and the backward kernels also give W's gradient and the dt columns of
 * dBC's: no draw tensor, no matmul. Above it, draw comes from a matmul in the forward and again in the
 * backward (as the official kernels' checkpoint_lvl 1), and the op saves the dt columns.
 */
const dtScanOp = defineOp<DtScanAttrs>({
  name: "fusedMambaScan",
  forward: (inputs, a, save) => {
    const [x, dBC, W, bias, A_log, D] = inputs;
    const z = a.gated ? inputs[6] : null;
    const h0 = a.init ? inputs[inputs.length - 1] : null; // packed into ph, where the backward reads it
    const { y, ph, dt } = dtScanForward(x, dBC, W, bias, A_log, D, z, a, statesFor(), h0);
    if (a.stateInto) a.stateInto.h = lastState(ph, x.shape[0], x.shape[2], a.N, x.shape[1]);
    save(x, dBC, A_log, phSaved(ph), ...(z ? [z] : []), ...(dt ? [dt, W] : []));
    return y;
  },
  backward: (g, saved, inputs, a, targets) => {
    const [x, dBC, A_log, ph] = saved;
    const z = a.gated ? saved[4] : null;
    const dtW = a.dtInside ? null : saved.slice(a.gated ? 5 : 4) as [Tensor, Tensor];
    const r = dtScanBackward(
      g,
      x,
      dBC,
      A_log,
      ph,
      z,
      dtW,
      inputs,
      a,
      gzTarget(inputs, x.shape[2], a, targets),
    );
    const grads = needed([r.gx, r.gdBC, r.gW, r.gbias, r.gAlog, r.gD], inputs);
    return [...grads, ...(z ? [zGrad(r.gz, inputs[6], x.shape[2], a)] : []), ...(a.init ? [null] : [])];
  },
});

/** dtScanOp's attributes: with `init`, the op's last input is the initial state h0 (no gradient); with
 * `stateInto`, the forward puts the state after the last step there (a new tensor, no autograd). */
type DtScanAttrs = FusedAttrs & { init?: boolean; stateInto?: { h: Tensor | null } };

/**
 * fusedMambaScan's backward kernels (no autograd), for inputs [x, dBC, W, ...] (`inputs` says which need
 * gradients): with dt_proj inside, the kernels give W's gradient and the dt columns of dBC's; above the inline
 * rank, `dtW` = [dt (B, L, R), W] and draw is recomputed by a matmul, and those two gradients come from ddraw.
 * With `emitY` the result's `y` is the gated y: from the kernels (see fusedScanBackward; g is then spent), or
 * where they cannot write it, from the forward kernel run again. ddraw is disposed.
 */
export function dtScanBackward(
  g: Tensor,
  x: Tensor,
  dBC: Tensor,
  A_log: Tensor,
  ph: Tensor,
  z: Tensor | null,
  dtW: [Tensor, Tensor] | null,
  inputs: readonly Tensor[],
  a: FusedAttrs,
  gzInto: Tensor | null,
  emitY = false,
): FusedGrads {
  if (!dtW) {
    const r = fusedScanBackward(g, x, null, dBC, A_log, ph, z, a, gzInto, emitY);
    r.gdraw.dispose();
    return r;
  }
  const [dt, W] = dtW;
  const [B, L, ED] = x.shape;
  const draw = matmulRaw(dt, W, { transB: true }); // recomputed: draw: (B, L, ED)
  const r = fusedScanBackward(g, x, draw, dBC, A_log, ph, z, a, gzInto, emitY);
  if (emitY && !r.y) {
    // several state blocks and no binding free for y: the forward kernel again (y: (B, L, ED)), with the
    // parameters the first forward packed into ph ([bias | A_log | D] here: dt_proj outside)
    const par = new Tensor(ph.storage, [ED * (a.N + 2)], "f32");
    const h0 = initialState(ph, B, ED, a.N); // from the first forward's initial state, where it had one
    try {
      const f = fusedScanForward(x, draw, dBC, [par], z, a, "last", h0); // for y alone
      f.ph.dispose();
      r.y = f.y;
    } finally {
      par.dispose();
      h0?.dispose();
    }
  }
  draw.dispose();
  if (inputs[2].requiresGrad) {
    const gdrawFlat = new Tensor(r.gdraw.storage, [B * L, ED], "f32"); // (B L, ED)
    const dtFlat = new Tensor(dt.storage, [B * L, a.R], "f32"); // (B L, R)
    r.gW = matmulRaw(gdrawFlat, dtFlat, { transA: true }); // gW: (ED, R)
    gdrawFlat.dispose();
    dtFlat.dispose();
  }
  if (inputs[1].requiresGrad && a.R > 0) {
    // the dt columns of dBC's gradient (zeros so far): ddraw @ W
    const gdt = matmulRaw(r.gdraw, W, {}); // gdt: (B, L, R)
    const box = { offset: 0, strides: stridesOf(r.gdBC.shape) };
    copyBox(gdt, { offset: 0, strides: stridesOf(gdt.shape) }, r.gdBC, box, [B, L, a.R]);
    gdt.dispose();
  }
  r.gdraw.dispose();
  return r;
}

/** fusedMambaScan's forward kernels (no autograd): y, `ph` and, above the inline rank, the dt columns read. */
export function dtScanForward(
  x: Tensor,
  dBC: Tensor,
  W: Tensor,
  bias: Tensor,
  A_log: Tensor,
  D: Tensor,
  z: Tensor | null,
  a: FusedAttrs,
  states: "all" | "last" = "all",
  h0: Tensor | null = null,
): { y: Tensor; ph: Tensor; dt: Tensor | null } {
  const dt = a.dtInside ? null : dtColumns(dBC, a.R); // dt: (B, L, R)
  const draw = dt && matmulRaw(dt, W, { transB: true }); // draw: (B, L, ED)
  // par: (ED + ED*N + ED), and dt_proj's weight (ED*R) after it when it runs inside
  const { y, ph } = fusedScanForward(x, draw, dBC, [bias, A_log, D, ...(dt ? [] : [W])], z, a, states, h0);
  draw?.dispose();
  return { y, ph, dt };
}

/** The R dt columns of dBC (..., R + 2N), copied: (..., R). */
export function dtColumns(dBC: Tensor, R: number): Tensor {
  const shape = [...dBC.shape.slice(0, -1), R];
  const dt = Tensor.empty(shape);
  const from = { offset: 0, strides: stridesOf(dBC.shape) };
  copyBox(dBC, from, dt, { offset: 0, strides: stridesOf(shape) }, shape);
  return dt;
}

/** Checks the shapes of a fused-scan call (`what` names the function); returns R and N. */
function checkScanArgs(
  what: string,
  x: Tensor,
  dBC: Tensor,
  bias: Tensor,
  A_log: Tensor,
  D: Tensor,
  z: Tensor | null,
  zStart: number | undefined,
  dtRank?: number,
): { R: number; N: number } {
  const [B, L, ED] = x.shape;
  const N = A_log.shape[1];
  const R = dtRank ?? dBC.shape[2] - 2 * N;
  const bad = (msg: string) => {
    throw new Error(`${what}: ${msg}`);
  };
  if (x.rank !== 3 || x.size === 0) bad(`x must be (B, L, ED) with B, L, ED >= 1, got ${fmt(x.shape)}`);
  const named: [string, Tensor | null][] = [["x", x], ["dBC", dBC], ["bias", bias], ["A_log", A_log], [
    "D",
    D,
  ]];
  for (const [name, t] of [...named, ["z", z] as [string, Tensor | null]]) {
    if (t && t.dtype !== "f32") bad(`${name} must be f32, got ${t.dtype} ${fmt(t.shape)}`);
  }
  if (z && zStart === undefined && z.shape.join() !== x.shape.join()) {
    bad(`z ${fmt(z.shape)} must equal x ${fmt(x.shape)}`);
  }
  if (zStart !== undefined) {
    const fits = z && z.rank === 3 && z.shape[0] === B && z.shape[1] === L && Number.isInteger(zStart) &&
      zStart >= 0 && zStart + ED <= z.shape[2];
    if (!fits) {
      bad(
        `zStart ${zStart}: z must be (${B}, ${L}, Z) with Z >= ${zStart} + ${ED}, got ${
          z ? fmt(z.shape) : "null"
        }`,
      );
    }
  }
  if (A_log.rank !== 2 || A_log.shape[0] !== ED || N < 1) {
    bad(`A_log must be (${ED}, N) with N >= 1, got ${fmt(A_log.shape)}`);
  }
  // With dtWeight's R known, dBC is R + 2N wide or padded to the next multiple of 4 (as MambaBlock pads
  // x_proj's output on CPU adapters): any other width means a dt rank that disagrees with x_proj's.
  const S = R + 2 * N, padded = Math.ceil(S / 4) * 4;
  const widthOk = dtRank === undefined ? R >= 0 : dBC.shape[2] === S || dBC.shape[2] === padded;
  if (dBC.rank !== 3 || dBC.shape[0] !== B || dBC.shape[1] !== L || !widthOk) {
    bad(
      `dBC must be (${B}, ${L}, ${dtRank === undefined ? "R" : R} + 2*${N}${
        dtRank === undefined || padded === S ? "" : `, or ${padded} padded`
      }), got ${fmt(dBC.shape)}`,
    );
  }
  if (bias.shape.join() !== `${ED}`) bad(`the dt bias must be (${ED}), got ${fmt(bias.shape)}`);
  if (D.shape.join() !== `${ED}`) bad(`D must be (${ED}), got ${fmt(D.shape)}`);
  return { R, N };
}

/**
 * The whole SSM of a Mamba block in one kernel, differentiable with a recomputing backward.
 * x, draw: (B, L, ED); dBC: (B, L, R + 2N), B and C its last 2N columns (B at columns R.., C at R+N..; the R
 * before them, x_proj's dt columns, are not read); bias, D: (ED); A_log: (ED, N); z: (B, L, ED) or null.
 * Returns (C.h + D x) * silu(z): (B, L, ED). With `zStart`, z is (B, L, Z), Z >= zStart + ED, and the gate
 * reads its columns zStart .. zStart + ED in place (e.g. the z half of in_proj's output, without a copy); z's
 * gradient is zero outside them. With `dtRank`, dBC must be R + 2N wide, or padded to a multiple of 4 as
 * {@linkcode fusedMambaScan} takes it (B and C then the 2N columns after the R, the padding last): without it
 * any R fits, so an N or a width off by one reads B and C from the wrong columns.
 *
 * Per batch, channel d and step t, with h[-1] = 0 (h[t] a row of N):
 * delta = softplus(draw[t] + bias[d]) (torch's softplus, linear above 20), A = -exp(A_log[d]),
 * h[t] = exp(delta A) * h[t-1] + delta B[t] x[t] (elementwise over the N columns),
 * y[t] = C[t] . h[t] + D[d] x[t], and the output is y * silu(z) (y alone when z is null).
 */
export function fusedSelectiveScan(
  x: Tensor,
  draw: Tensor,
  dBC: Tensor,
  bias: Tensor,
  A_log: Tensor,
  D: Tensor,
  z: Tensor | null,
  zStart?: number,
  dtRank?: number,
): Tensor {
  if (dtRank !== undefined && !(Number.isInteger(dtRank) && dtRank >= 0)) {
    throw new Error(`fusedSelectiveScan: dtRank must be an integer >= 0, got ${dtRank}`);
  }
  const { R, N } = checkScanArgs("fusedSelectiveScan", x, dBC, bias, A_log, D, z, zStart, dtRank);
  if (draw.shape.join() !== x.shape.join() || draw.dtype !== "f32") {
    throw new Error(
      `fusedSelectiveScan: draw ${draw.dtype} ${fmt(draw.shape)} must be f32 ${fmt(x.shape)} as x`,
    );
  }
  const inputs = [x, draw, dBC, bias, A_log, D, ...(z ? [z] : [])];
  return fusedOp(inputs, { R, N, gated: z !== null, ...(zStart ? { zStart } : {}) });
}

/**
 * The SSM of a Mamba block with dt_proj folded in, as MambaBlock runs it: delta = softplus(dBC[..., :R] @
 * dtWeight^T + dtBias), then as {@linkcode fusedSelectiveScan}. dtWeight: (ED, R); dBC may be wider than R +
 * 2N, padded to the next multiple of 4 columns (as MambaBlock pads x_proj's output: the extra columns are
 * ignored, their gradient is zero; any other width is an error, a dt rank that disagrees with x_proj's); the
 * other arguments as there. It never saves delta or draw (B, L, ED): up to R = MAX_INLINE_DT_RANK
 * the kernels compute draw per step from dBC's dt columns (and the backward kernels W's gradient and those
 * columns'); above it, draw comes from a matmul, recomputed in the backward. The scan keeps 4 (2 ED + R + 2N)
 * bytes per token (4 (2 ED + 2R + 2N) above the inline rank) plus the chunk states.
 */
export function fusedMambaScan(
  x: Tensor,
  dBC: Tensor,
  dtWeight: Tensor,
  dtBias: Tensor,
  A_log: Tensor,
  D: Tensor,
  z: Tensor | null,
  zStart?: number,
): Tensor {
  const a = mambaScanAttrs("fusedMambaScan", x, dBC, dtWeight, dtBias, A_log, D, z, zStart);
  return dtScanOp([x, dBC, dtWeight, dtBias, A_log, D, ...(z ? [z] : [])], a);
}

/**
 * {@linkcode fusedMambaScan} from an initial state, and the state after: the scan starts from `h0` (B, ED, N)
 * where given (a cache's h), else zeros, and `h` is the state after the last step (B, ED, N), a new tensor
 * without autograd that the caller disposes. The output y is differentiable as fusedMambaScan's; h0 is a
 * constant, so no gradient flows into it: training from a carried state is truncated backpropagation through
 * time (h0 that requires grad is refused, not silently cut). Under noGrad this is the prefill of a prompt
 * continued in chunks.
 */
export function fusedMambaScanFrom(
  x: Tensor,
  dBC: Tensor,
  dtWeight: Tensor,
  dtBias: Tensor,
  A_log: Tensor,
  D: Tensor,
  z: Tensor | null,
  zStart: number | undefined,
  h0: Tensor | null,
): { y: Tensor; h: Tensor } {
  const a = mambaScanAttrs("fusedMambaScanFrom", x, dBC, dtWeight, dtBias, A_log, D, z, zStart);
  checkInitialState("fusedMambaScanFrom", h0, x.shape[0], x.shape[2], a.N);
  const box: { h: Tensor | null } = { h: null };
  const inputs = [x, dBC, dtWeight, dtBias, A_log, D, ...(z ? [z] : []), ...(h0 ? [h0] : [])];
  const y = dtScanOp(inputs, { ...a, ...(h0 ? { init: true } : {}), stateInto: box });
  return { y, h: box.h! };
}

/** Throws unless `h0` is null or an f32 (B, ED, N) state that takes no gradient (`what` names the function). */
export function checkInitialState(what: string, h0: Tensor | null, B: number, ED: number, N: number): void {
  if (h0 && (h0.dtype !== "f32" || h0.shape.join() !== [B, ED, N].join())) {
    throw new Error(
      `${what}: h0 must be f32 (${B}, ${ED}, ${N}) (B, ED, N), got ${h0.dtype} ${fmt(h0.shape)}`,
    );
  }
  if (h0?.requiresGrad && isGradEnabled()) {
    throw new Error(
      `${what}: h0 requires grad, but no gradient flows into the initial state (truncated ` +
        "backpropagation): pass a state without autograd (a cache, or detach it)",
    );
  }
}

/**
 * {@linkcode fusedMambaScan}'s forward without autograd (a prompt's prefill): y (B, L, ED) and `ph`, whose
 * last chunk state (the only one it writes, besides those the forward reads again) is the inference cache:
 * `lastState(ph, B, ED, N, L)` ({@linkcode lastState}) copies it out as (B, ED, N). The caller disposes `y` and
 * `ph`. With `h0` (B, ED, N), the scan starts from that state (a cache's h) instead of zeros.
 */
export function fusedMambaScanForward(
  x: Tensor,
  dBC: Tensor,
  dtWeight: Tensor,
  dtBias: Tensor,
  A_log: Tensor,
  D: Tensor,
  z: Tensor | null,
  zStart?: number,
  h0: Tensor | null = null,
): { y: Tensor; ph: Tensor } {
  const a = mambaScanAttrs("fusedMambaScanForward", x, dBC, dtWeight, dtBias, A_log, D, z, zStart);
  // not an op (no autograd), so freed here if it throws part-way (out of memory under a limit)
  const { y, ph, dt } = freeOnThrow(() =>
    dtScanForward(x, dBC, dtWeight, dtBias, A_log, D, z, a, "last", h0)
  );
  dt?.dispose();
  return { y, ph };
}

/** Checks a fusedMambaScan call and gives its attributes (dt_proj inside the kernels up to the inline rank). */
export function mambaScanAttrs(
  what: string,
  x: Tensor,
  dBC: Tensor,
  dtWeight: Tensor,
  dtBias: Tensor,
  A_log: Tensor,
  D: Tensor,
  z: Tensor | null,
  zStart: number | undefined,
): FusedAttrs {
  const ED = x.shape[2];
  if (dtWeight.rank !== 2 || dtWeight.shape[0] !== ED || dtWeight.dtype !== "f32") {
    throw new Error(`${what}: dtWeight must be f32 (${ED}, R), got ${dtWeight.dtype} ${fmt(dtWeight.shape)}`);
  }
  const { R, N } = checkScanArgs(what, x, dBC, dtBias, A_log, D, z, zStart, dtWeight.shape[1]);
  const dtInside = R >= 1 && R <= MAX_INLINE_DT_RANK;
  return { R, N, gated: z !== null, ...(zStart ? { zStart } : {}), ...(dtInside ? { dtInside } : {}) };
}
