/**
 * The linear recurrence H[t] = A[t] * H[t-1] + X[t] over the time dim of (B, L, ...) tensors, as a
 * differentiable op in two modes that compute the same thing:
 * - `sequential`: one invocation per (b, channel) carries h along L (in slices of at most 16384 steps per
 *   dispatch, as software adapters silently stop loops at 65535 iterations);
 * - `pscan`: mamba.py's "Blelloch" scan (strictly the inclusive Brent–Kung form: its down-sweep adds each
 *   stride's left partner, no root clearing), an up-sweep and a down-sweep of log2(L) levels each, one dispatch
 *   per level, one invocation per (b, pair, channel); any L (positions past the end are skipped, which is
 *   the same as padding with identity elements).
 * The backward is the same scan run in reverse time on (A shifted by one, G):
 *   lam[t] = A[t+1] * lam[t+1] + G[t];   dX = lam;   dA[t] = lam[t] * H[t-1]  (dA[0] = 0).
 * @module
 */

import { defineOp } from "../core/autograd.ts";
import { defineKernel, dispatch } from "../core/kernel.ts";
import { mapOp } from "../core/ops/map_kernel.ts";
import { copy, narrow, pad } from "../core/ops/shape_ops.ts";
import { fmt, sizeOf } from "../core/shape.ts";
import { Tensor } from "../core/tensor.ts";

/** How the recurrence is evaluated. */
export type ScanMode = "sequential" | "pscan";

const WG = 64;
/** Steps one invocation walks per dispatch (loops stop at 65535 iterations on software adapters). */
const MAX_STEPS = 16384;
const UNIFORMS: [string, "u32"][] = [["B", "u32"], ["L", "u32"], ["C", "u32"], ["rev", "u32"]];
/** Physical time index of logical step t: reversed for the backward scan. */
const PHYS = `fn phys(t: u32) -> u32 { return select(t, P.L - 1u - t, P.rev != 0u); }`;

const seqKernel = defineKernel({
  name: "scan_sequential",
  buffers: [
    { name: "a", type: "f32", access: "read" },
    { name: "x", type: "f32", access: "read" },
    { name: "h", type: "f32", access: "read_write" },
  ],
  uniforms: [...UNIFORMS, ["t0", "u32"], ["t1", "u32"]],
  workgroupSize: WG,
  decls: PHYS,
  body: `
  // invocation -> (b, c); carries h over logical steps [t0, t1), starting from H at step t0 - 1.
  if (gid >= P.B * P.C) { return; }
  let c = gid % P.C;
  let b = gid / P.C;
  let base = b * P.L * P.C + c;
  var h = 0.0;
  if (P.t0 > 0u) { h = ld_h(base + phys(P.t0 - 1u) * P.C); }
  for (var t = P.t0; t < P.t1; t++) {
    let at = base + phys(t) * P.C;
    h = ld_a(at) * h + ld_x(at);
    st_h(at, h);
  }`,
});

function sweepKernel(kind: "up" | "down") {
  // up: j = 2s(i+1) - 1; down: j = 2s(i+1) + s - 1; both combine j with k = j - s.
  const j = kind === "up" ? "2u * P.s * (i + 1u) - 1u" : "2u * P.s * (i + 1u) + P.s - 1u";
  return defineKernel({
    name: `pscan_${kind}`,
    buffers: [{ name: "a", type: "f32", access: "read_write" }, {
      name: "x",
      type: "f32",
      access: "read_write",
    }],
    uniforms: [...UNIFORMS, ["s", "u32"], ["pairs", "u32"]],
    workgroupSize: WG,
    decls: PHYS,
    body: `
  // invocation -> (b, pair i, channel c): (A, X)[j] = (A[j] A[k], A[j] X[k] + X[j]).
  if (gid >= P.B * P.pairs * P.C) { return; }
  let c = gid % P.C;
  let i = (gid / P.C) % P.pairs;
  let b = gid / (P.C * P.pairs);
  let j = ${j};
  let k = j - P.s;
  let base = b * P.L * P.C + c;
  let pj = base + phys(j) * P.C;
  let pk = base + phys(k) * P.C;
  let aj = ld_a(pj);
  st_x(pj, aj * ld_x(pk) + ld_x(pj));
  st_a(pj, aj * ld_a(pk));`,
  });
}

const upKernel = sweepKernel("up");
const downKernel = sweepKernel("down");

/** A and X of one shape (B, L, ...), f32, and a mode of the scan's: else an error naming `what`. */
function checkScanArgs(A: Tensor, X: Tensor, mode: ScanMode, what: string): void {
  if (A.shape.join() !== X.shape.join() || A.rank < 2) {
    throw new Error(`${what}: A ${fmt(A.shape)} and X ${fmt(X.shape)} must have one shape (B, L, ...)`);
  }
  if (mode !== "sequential" && mode !== "pscan") throw new Error(`${what}: unknown mode '${mode}'`);
  if (A.dtype !== "f32" || X.dtype !== "f32") {
    throw new Error(`${what}: A and X must be f32, got ${A.dtype}, ${X.dtype}`);
  }
}

/** Runs the scan without autograd; `rev` walks time backwards. Returns H. */
export function runScan(A: Tensor, X: Tensor, mode: ScanMode, rev = false): Tensor {
  checkScanArgs(A, X, mode, "runScan");
  const [B, L] = A.shape;
  const C = sizeOf(A.shape.slice(2));
  const u = { B, L, C, rev: rev ? 1 : 0 };
  if (mode === "sequential") {
    const H = Tensor.empty(A.shape); // H: (B, L, ...) as A
    for (let t0 = 0; t0 < L; t0 += MAX_STEPS) {
      const t1 = Math.min(L, t0 + MAX_STEPS);
      dispatch(
        seqKernel,
        { a: A.storage, x: X.storage, h: H.storage },
        { ...u, t0, t1 },
        Math.ceil(B * C / WG),
      );
    }
    return H;
  }
  // pscan works in place on copies: A's copy ends as running products, X's copy as H.
  const a = copy(A); // a: (B, L, ...)
  const H = copy(X); // H: (B, L, ...)
  const bufs = { a: a.storage, x: H.storage };
  let s = 1;
  for (; 2 * s <= L; s *= 2) {
    const pairs = Math.floor(L / (2 * s));
    dispatch(upKernel, bufs, { ...u, s, pairs }, Math.ceil(B * pairs * C / WG));
  }
  for (; s >= 1; s = Math.floor(s / 2)) {
    const pairs = Math.floor((L - s) / (2 * s));
    if (pairs > 0) dispatch(downKernel, bufs, { ...u, s, pairs }, Math.ceil(B * pairs * C / WG));
  }
  a.dispose();
  return H;
}

/** `t` shifted along time by `by` (+1: out[t] = t[t-1]; -1: out[t] = t[t+1]), zero-filled. */
function shiftTime(t: Tensor, by: 1 | -1): Tensor {
  const L = t.shape[1];
  const padding = new Array<number>(2 * (t.rank - 2)).fill(0);
  const body = narrow(t, 1, by === 1 ? 0 : 1, L - 1);
  const out = pad(body, by === 1 ? [...padding, 1, 0] : [...padding, 0, 1]);
  body.dispose();
  return out;
}

const scanOp = defineOp<{ mode: ScanMode }>({
  name: "scan",
  forward: ([A, X], { mode }, save) => {
    const H = runScan(A, X, mode);
    save(A, H);
    return H;
  },
  backward: (G, [A, H], _i, { mode }) => {
    if (A.shape[1] === 0) return [mapOp("0.0", [], A.shape), mapOp("0.0", [], A.shape)];
    const Anext = A.shape[1] > 1 ? shiftTime(A, -1) : mapOp("0.0", [], A.shape); // Anext[t] = A[t+1]
    const lam = runScan(Anext, G, mode, true); // lam: (B, L, ...)
    Anext.dispose();
    const Hprev = A.shape[1] > 1 ? shiftTime(H, 1) : mapOp("0.0", [], A.shape); // Hprev[t] = H[t-1]
    const dA = mapOp("a * b", [lam, Hprev], A.shape);
    Hprev.dispose();
    return [dA, lam];
  },
});

/** H[t] = A[t] * H[t-1] + X[t] along dim 1 of (B, L, ...) tensors, H[-1] = 0; differentiable. `mode`
 * (default "pscan"): the parallel (Blelloch) scan, or "sequential" (one step after another). */
export function linearScan(A: Tensor, X: Tensor, mode: ScanMode = "pscan"): Tensor {
  checkScanArgs(A, X, mode, "linearScan");
  return scanOp([A, X], { mode });
}
