/**
 * WGSL math helpers shared by the elementwise template (map_kernel.ts) and the fused scan's kernels, so that
 * an op and a fused kernel compute softplus and sigmoid alike.
 * @module
 */

/** softplus as torch.nn.functional.softplus (threshold 20: linear above it), log(1 + e^u) below through
 * Goldberg's log1p (exact for tiny e^u). */
export const SOFTPLUS_WGSL = `fn softplus_(u: f32) -> f32 {
  if (u > 20.0) { return u; }
  let e = exp(u);
  let w = 1.0 + e;
  if (w == 1.0) { return e; }
  return log(w) * e / (w - 1.0);
}`;

/** The logistic sigmoid. */
export const SIGMOID_WGSL = "fn sigmoid_(u: f32) -> f32 { return 1.0 / (1.0 + exp(-u)); }";
