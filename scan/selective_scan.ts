/**
 * The selective scan of Mamba written as mamba.py writes it: materialise deltaA and BX (B, L, ED, N),
 * scan them, contract with C. Differentiable through autograd; memory grows with N (that is what the
 * fused kernels avoid).
 * @module
 */

import { add, exp, matmul, mul } from "../core/ops/index.ts";
import type { Tensor } from "../core/tensor.ts";
import { linearScan, type ScanMode } from "./linear_scan.ts";

/**
 * y[t] = C[t] . h[t] + D * x[t] with h[t] = exp(delta[t] A) h[t-1] + delta[t] B[t] x[t].
 * x, delta: (B, L, ED); A: (ED, N); Bm, C: (B, L, N); D: (ED). Returns y: (B, L, ED) and every state hs:
 * (B, L, ED, N) (hs[:, L-1] is the inference cache after a prompt). `mode` picks the scan of h (see
 * {@linkcode linearScan}): "sequential" or "pscan".
 */
export function selectiveScan(
  x: Tensor,
  delta: Tensor,
  A: Tensor,
  Bm: Tensor,
  C: Tensor,
  D: Tensor,
  mode: ScanMode,
): { y: Tensor; hs: Tensor } {
  const [Bsz, L, ED] = x.shape;
  const N = A.shape[1];
  const delta4 = delta.reshape(Bsz, L, ED, 1); // delta4: (B, L, ED, 1)
  const deltaA = exp(mul(delta4, A)); // deltaA: (B, L, ED, N)
  const BX = mul(mul(delta4, Bm.reshape(Bsz, L, 1, N)), x.reshape(Bsz, L, ED, 1)); // BX: (B, L, ED, N)
  const hs = linearScan(deltaA, BX, mode); // hs: (B, L, ED, N)
  const y = matmul(hs, C.reshape(Bsz, L, N, 1)).reshape(Bsz, L, ED); // y: (B, L, ED)
  return { y: add(y, mul(D, x)), hs };
}
