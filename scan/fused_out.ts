/**
 * The fused scan and out_proj as one op, as a Mamba block trains: out = residual + (y * silu(z)) @ W_out^T.
 * Its backward takes the gated y from the scan's backward kernel, which recomputes it anyway for dz (the
 * official kernels' `recompute_out_z`), so no (B, L, ED) y is saved for out_proj's weight gradient; and in a
 * checkpoint's rerun (`MambaConfig.recompute`) it replays: neither the scan's forward kernel nor out_proj's
 * product runs again, only the backward's kernels, from the chunk states (`ph`) that the first pass kept.
 * @module
 */

import { defineOp } from "../core/autograd.ts";
import { add, copy, sumToShape } from "../core/ops/index.ts";
import { matmulRaw } from "../core/ops/matmul.ts";
import { fmt } from "../core/shape.ts";
import { Tensor } from "../core/tensor.ts";
import {
  checkInitialState,
  dtColumns,
  dtScanBackward,
  dtScanForward,
  gzTarget,
  mambaScanAttrs,
  needed,
  phSaved,
  statesFor,
  zGrad,
} from "./fused.ts";
import { type FusedAttrs, lastState } from "./fused_run.ts";

/** The op's attributes: the scan's, which of out_proj's bias, the residual and the initial state h0 are
 * inputs, and where the forward puts the state after the last step (`stateInto`, where given). */
interface ScanOutAttrs extends FusedAttrs {
  outBias: boolean;
  residual: boolean;
  init: boolean;
  stateInto?: { h: Tensor | null };
}

/** Where the residual and h0 sit in the op's inputs (after outBias, where it has one). */
function tailIndices(a: ScanOutAttrs): { residual: number; h0: number } {
  const residual = 8 + (a.outBias ? 1 : 0);
  return { residual, h0: residual + (a.residual ? 1 : 0) };
}

/** inputs: [x, dBC, dtWeight, dtBias, A_log, D, z, outWeight, outBias?, residual?, h0?]; gated; dt_proj inside
 * (R 1..8) or draw from a matmul. Where outWeight needs a gradient, the backward kernel writes the gated y for
 * it (see fusedScanBackward), or where it cannot, the forward kernel runs again for it. h0, the state before
 * the first step, is packed into ph (where the backward and a rerun find it) and gets no gradient. */
const scanOutOp = defineOp<ScanOutAttrs>({
  name: "fusedMambaScanOut",
  forward: (inputs, a, save, keep) => {
    const [x, dBC, W, bias, A_log, D, z, Wout] = inputs;
    const at = tailIndices(a);
    const ob = a.outBias ? inputs[8] : null;
    const residual = a.residual ? inputs[at.residual] : null;
    // y: (B, L, ED), ph: par (+ h0) + chunk states, dt: above the inline rank, dBC's dt columns (B, L, R)
    // every chunk state where a backward or a checkpoint's rerun reads ph, else the last
    const h0 = a.init ? inputs[at.h0] : null;
    const { y, ph, dt } = dtScanForward(x, dBC, W, bias, A_log, D, z, a, statesFor(), h0);
    if (a.stateInto) a.stateInto.h = lastState(ph, x.shape[0], x.shape[2], a.N, x.shape[1]); // h: (B, ED, N)
    // the product added into a copy of the residual (as matmulAdd), then the bias
    const into = residual ? copy(residual) : undefined;
    const r = matmulRaw(y, Wout, { transB: true }, undefined, into); // r: (B, L, Dm)
    y.dispose();
    const out = ob ? add(r, ob) : r; // out: (B, L, Dm)
    if (out !== r) r.dispose();
    const kept = phSaved(ph); // ph, or the parameters alone (phForBackward)
    save(x, dBC, A_log, kept, z, Wout, ...(dt ? [dt, W] : []));
    keep?.(kept); // all that a checkpoint's rerun needs besides the inputs, which it recomputes
    return out;
  },
  replay: (inputs, a, [ph], save) => {
    const [x, dBC, W, , A_log, , z, Wout] = inputs;
    save(x, dBC, A_log, ph, z, Wout, ...(a.dtInside ? [] : [dtColumns(dBC, a.R), W])); // dt: a copy
    return Tensor.hollow([x.shape[0], x.shape[1], Wout.shape[0]]); // out: (B, L, Dm), without values
  },
  backward: (g, [x, dBC, A_log, ph, z, Wout, ...dtW], inputs, a, targets) => {
    const [B, L, ED] = x.shape;
    const Dm = Wout.shape[0];
    const gy = matmulRaw(g, Wout, {}); // gy: (B, L, ED), the gated y's gradient (spent: y may go over it)
    const gzInto = gzTarget(inputs, ED, a, targets);
    const r = dtScanBackward(
      gy,
      x,
      dBC,
      A_log,
      ph,
      z,
      a.dtInside ? null : dtW as [Tensor, Tensor],
      inputs,
      a,
      gzInto,
      inputs[7].requiresGrad, // y for out_proj's weight gradient
    );
    gy.dispose();
    const yg = r.y; // yg: (B, L, ED), y * silu(z), recomputed by the scan's backward
    let gWout: Tensor | null = null;
    if (yg) {
      const gf = new Tensor(g.storage, [B * L, Dm], "f32"); // gf: (B L, Dm)
      const yf = new Tensor(yg.storage, [B * L, ED], "f32"); // yf: (B L, ED)
      gWout = matmulRaw(gf, yf, { transA: true }); // gWout: (Dm, ED)
      gf.dispose();
      yf.dispose();
    }
    yg?.dispose();
    const grads = needed([r.gx, r.gdBC, r.gW, r.gbias, r.gAlog, r.gD], inputs);
    const gob = a.outBias && inputs[8].requiresGrad ? sumToShape(g, [Dm]) : null; // gob: (Dm)
    const gres = a.residual && inputs[tailIndices(a).residual].requiresGrad ? g : null; // gres: (B, L, Dm)
    return [
      ...grads,
      zGrad(r.gz, inputs[6], ED, a),
      gWout,
      ...(a.outBias ? [gob] : []),
      ...(a.residual ? [gres] : []),
      ...(a.init ? [null] : []), // h0: a constant
    ];
  },
  bf16Inputs: [7], // out_proj's weight may be stored in bfloat16 (inference): the products read it as f32
});

/**
 * A Mamba block's SSM and its output projection: `residual + fusedMambaScan(x, dBC, dtWeight, dtBias, A_log,
 * D, z, zStart) @ outWeight^T + outBias` (bias and residual optional), differentiable. outWeight: (Dm, ED);
 * outBias: (Dm); residual: (B, L, Dm);
 * the other arguments as `fusedMambaScan`'s (z required: the gate). It is one op that saves neither
 * y nor delta: its backward recomputes the gated y in the scan's backward kernel for outWeight's gradient, and a
 * checkpoint's rerun replays it without running the scan's forward or the product. Within 10 storage buffers
 * (what browsers allow) the kernel writes y where one state block holds all the states (d_state up to 16 with
 * the default variant) or where dt_proj runs inside it (dt rank 1 to `MAX_INLINE_DT_RANK`); otherwise it
 * needs an 11th (native adapters have it; Chrome exposes 10), and without one the backward runs the scan's
 * forward kernel again for y.
 *
 * With `from`, the scan goes on from a state (a cache's, or one carried between training windows): `h0` (B, ED,
 * N) is the state before the first step (a constant: no gradient flows into it, and one that requires grad is
 * refused; a checkpoint's rerun reads it again, so keep it alive until the backward), and `stateInto.h`, where
 * given, receives the state after the last step (B, ED, N; no autograd; the caller disposes it).
 */
export function fusedMambaScanOut(
  x: Tensor,
  dBC: Tensor,
  dtWeight: Tensor,
  dtBias: Tensor,
  A_log: Tensor,
  D: Tensor,
  z: Tensor,
  zStart: number | undefined,
  outWeight: Tensor,
  outBias: Tensor | null = null,
  residual?: Tensor,
  from: ScanFrom = {},
): Tensor {
  if (!z) throw new Error("fusedMambaScanOut: z (the gate) is required");
  const a = mambaScanAttrs("fusedMambaScanOut", x, dBC, dtWeight, dtBias, A_log, D, z, zStart);
  const [B, L, ED] = x.shape;
  const h0 = from.h0 ?? null;
  checkInitialState("fusedMambaScanOut", h0, B, ED, a.N);
  const Dm = outWeight.shape[0];
  // bf16: a weight stored in bfloat16 for inference (its products read it as f32; it takes no gradient)
  const weightType = outWeight.dtype === "f32" || outWeight.dtype === "bf16";
  if (outWeight.rank !== 2 || outWeight.shape[1] !== ED || !weightType) {
    throw new Error(
      `fusedMambaScanOut: outWeight must be f32 or bf16 (Dm, ${ED}), got ${outWeight.dtype} ${
        fmt(outWeight.shape)
      }`,
    );
  }
  if (outBias && (outBias.shape.join() !== `${Dm}` || outBias.dtype !== "f32")) {
    throw new Error(
      `fusedMambaScanOut: outBias must be f32 (${Dm}), got ${outBias.dtype} ${fmt(outBias.shape)}`,
    );
  }
  if (residual && (residual.shape.join() !== `${B},${L},${Dm}` || residual.dtype !== "f32")) {
    throw new Error(
      `fusedMambaScanOut: the residual must be f32 (${B}, ${L}, ${Dm}), got ${residual.dtype} ${
        fmt(residual.shape)
      }`,
    );
  }
  // null or undefined: none
  const extra = [...(outBias ? [outBias] : []), ...(residual ? [residual] : []), ...(h0 ? [h0] : [])];
  return scanOutOp([x, dBC, dtWeight, dtBias, A_log, D, z, outWeight, ...extra], {
    ...a,
    outBias: outBias != null,
    residual: residual != null,
    init: h0 !== null,
    ...(from.stateInto ? { stateInto: from.stateInto } : {}),
  });
}

/** Where {@linkcode fusedMambaScanOut} starts and what it gives back of the state. */
export interface ScanFrom {
  /** The state before the first step (B, ED, N), a constant; null or absent: zeros. */
  h0?: Tensor | null;
  /** Receives the state after the last step (B, ED, N), a new tensor without autograd. */
  stateInto?: { h: Tensor | null };
}
