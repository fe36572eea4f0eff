/**
 * The selective scan of Mamba written as mamba.py writes it: materialise deltaA and BX (B, L, ED, N),
 * scan them, contract with C. Differentiable through autograd; memory grows with N (that is what the
 * fused kernels avoid).
 * @module
 */

import { add, cat, exp, matmul, mul, narrow } from "../core/ops/index.ts";
import { fmt, sameShape } from "../core/shape.ts";
import { freeOnThrow, type Tensor } from "../core/tensor.ts";
import { linearScan, type ScanMode } from "./linear_scan.ts";

/** Throws, naming every argument and its shape, unless x, delta are f32 (B, L, ED), A (ED, N), Bm and C
 * (B, L, N), D (ED): reshapes of the right element count would otherwise pass a wrong layout silently. */
function checkSelectiveScanArgs(x: Tensor, delta: Tensor, A: Tensor, Bm: Tensor, C: Tensor, D: Tensor): void {
  const args = { x, delta, A, Bm, C, D };
  for (const [k, t] of Object.entries(args)) {
    if (t.disposed) throw new Error(`selectiveScan: ${k} was disposed`); // (else a reshape inside names it)
  }
  const [Bsz, L, ED] = x.shape;
  const N = A.rank === 2 ? A.shape[1] : NaN;
  const want: Record<string, number[]> = {
    x: [Bsz, L, ED],
    delta: [Bsz, L, ED],
    A: [ED, N],
    Bm: [Bsz, L, N],
    C: [Bsz, L, N],
    D: [ED],
  };
  const bad = Object.entries(args).filter(([k, t]) =>
    x.rank !== 3 || t.dtype !== "f32" || !sameShape(t.shape, want[k])
  );
  if (bad.length) {
    const got = Object.entries(args).map(([k, t]) => `${k} ${t.dtype} ${fmt(t.shape)}`).join(", ");
    throw new Error(
      `selectiveScan: needs f32 x and delta (B, L, ED), A (ED, N), Bm and C (B, L, N), D (ED); got ${got} ` +
        `(${bad.map(([k]) => k).join(", ")} ${bad.length > 1 ? "do" : "does"} not fit)`,
    );
  }
}

/**
 * y[t] = C[t] . h[t] + D * x[t] with h[t] = exp(delta[t] A) h[t-1] + delta[t] B[t] x[t].
 * x, delta: (B, L, ED); A: (ED, N); Bm, C: (B, L, N); D: (ED). Returns y: (B, L, ED) and every state hs:
 * (B, L, ED, N) (hs[:, L-1] is the inference cache after a prompt). `mode` picks the scan of h (see
 * {@linkcode linearScan}): "sequential" or "pscan". With `h0` (B, ED, N), h[-1] = h0 instead of zeros (a
 * cache's state: the scan goes on from it); it enters the first step as exp(delta[0] A) h0, added to
 * delta[0] B[0] x[0], so the scan itself still starts from zero.
 */
export function selectiveScan(
  x: Tensor,
  delta: Tensor,
  A: Tensor,
  Bm: Tensor,
  C: Tensor,
  D: Tensor,
  mode: ScanMode,
  h0?: Tensor,
): { y: Tensor; hs: Tensor } {
  checkSelectiveScanArgs(x, delta, A, Bm, C, D);
  if (mode !== "pscan" && mode !== "sequential") { // before any op runs ("fused" is MambaConfig.scan's)
    throw new Error(
      `selectiveScan: mode must be "pscan" or "sequential", got ${JSON.stringify(mode)} (the fused scan is ` +
        "fusedSelectiveScan, or MambaConfig.scan)",
    );
  }
  const [Bsz, L, ED] = x.shape;
  const N = A.shape[1];
  if (h0 && (h0.disposed || h0.dtype !== "f32" || !sameShape(h0.shape, [Bsz, ED, N]))) {
    throw new Error(
      `selectiveScan: h0 must be f32 (${Bsz}, ${ED}, ${N}) (B, ED, N), got ${
        h0.disposed ? "a disposed " : ""
      }${h0.dtype} ${fmt(h0.shape)}`,
    );
  }
  // a composite of ops: what it made so far goes if one fails (out of memory part-way)
  return freeOnThrow(() => {
    const delta4 = delta.reshape(Bsz, L, ED, 1); // delta4: (B, L, ED, 1)
    const deltaA = exp(mul(delta4, A)); // deltaA: (B, L, ED, N)
    let BX = mul(mul(delta4, Bm.reshape(Bsz, L, 1, N)), x.reshape(Bsz, L, ED, 1)); // BX: (B, L, ED, N)
    if (h0 && L > 0) {
      // BX[:, 0] += deltaA[:, 0] h0 (no steps, L 0: nothing to start)
      const first = add(narrow(BX, 1, 0, 1), mul(narrow(deltaA, 1, 0, 1), h0.reshape(Bsz, 1, ED, N))); // (B, 1, ED, N)
      BX = L > 1 ? cat([first, narrow(BX, 1, 1, L - 1)], 1) : first; // BX: (B, L, ED, N)
    }
    const hs = linearScan(deltaA, BX, mode); // hs: (B, L, ED, N)
    const y = matmul(hs, C.reshape(Bsz, L, N, 1)).reshape(Bsz, L, ED); // y: (B, L, ED)
    return { y: add(y, mul(D, x)), hs };
  });
}
