/**
 * Picks the next token of every row on the GPU, so generation never waits for logits.
 *
 * Kernel `sample_rows`: one workgroup of 64 invocations per row of logits (B, V). Greedy: argmax (first
 * index on ties, as torch.argmax). Sampling: Gumbel-max, argmax(x / T + g) with g = -log(-log(u)), which
 * draws exactly from softmax(x / T); u comes from a hash of (seed, step, row, v), so a seed reproduces a
 * run. Top-k and top-p: a bisection on the logit value finds the threshold of the k largest (24 rounds of
 * a workgroup count), or of the smallest set holding probability p (24 rounds of a workgroup sum of
 * exp((x - max) / T)); logits below it are skipped. Writes the token into `next` (B) and into column
 * `step` of `all` (B, T). Workgroup memory: 64 (value, index) pairs.
 * @module
 */

import { defineKernel, dispatch } from "../core/kernel.ts";
import type { Tensor } from "../core/tensor.ts";

const WG = 64;

const sampleKernel = defineKernel({
  name: "sample_rows",
  buffers: [
    { name: "x", type: "f32", access: "read" },
    { name: "next", type: "i32", access: "read_write" },
    { name: "all", type: "i32", access: "read_write" },
  ],
  uniforms: [
    ["V", "u32"],
    ["T", "u32"],
    ["step", "u32"],
    ["seed", "u32"],
    ["greedy", "u32"],
    ["topK", "u32"],
    ["invTemp", "f32"],
    ["topP", "f32"],
  ],
  workgroupSize: WG,
  decls: `
var<workgroup> bestV: array<f32, ${WG}>;
var<workgroup> bestI: array<u32, ${WG}>;
var<workgroup> cnt: array<u32, ${WG}>;
var<workgroup> fred: array<f32, ${WG}>;
fn hash(v: u32) -> u32 {
  // PCG-style integer hash: the same bits on every adapter.
  var s = v * 747796405u + 2891336453u;
  let w = ((s >> ((s >> 28u) + 4u)) ^ s) * 277803737u;
  return (w >> 22u) ^ w;
}
fn massAtLeast(base: u32, thr: f32, m: f32, lid: u32) -> f32 {
  // sum of exp((x - m) / T) over the logits x >= thr (unnormalised probability mass)
  var c = 0.0;
  for (var v = lid; v < P.V; v += ${WG}u) {
    let x = ld_x(base + v);
    if (x >= thr) { c += exp((x - m) * P.invTemp); }
  }
  fred[lid] = c;
  workgroupBarrier();
  for (var s = ${WG / 2}u; s > 0u; s = s >> 1u) {
    if (lid < s) { fred[lid] += fred[lid + s]; }
    workgroupBarrier();
  }
  let total = fred[0];
  workgroupBarrier();
  return total;
}
fn countAtLeast(base: u32, thr: f32, lid: u32) -> u32 {
  var c = 0u;
  for (var v = lid; v < P.V; v += ${WG}u) { c += select(0u, 1u, ld_x(base + v) >= thr); }
  cnt[lid] = c;
  workgroupBarrier();
  for (var s = ${WG / 2}u; s > 0u; s = s >> 1u) {
    if (lid < s) { cnt[lid] += cnt[lid + s]; }
    workgroupBarrier();
  }
  let total = cnt[0];
  workgroupBarrier();
  return total;
}`,
  body: `
  let row = group;
  let base = row * P.V;
  // Thresholds on the logit value: top-k keeps the largest thr with count(x >= thr) >= k; top-p the largest
  // thr whose kept mass is >= p of the total. Both by bisection between the row's min and max.
  var thr = -3.4028234663852886e38;
  let useK = P.topK > 0u && P.topK < P.V;
  let useP = P.topP < 1.0;
  if (P.greedy == 0u && (useK || useP)) {
    var lo = 3.4028234663852886e38;
    var hi = -3.4028234663852886e38;
    for (var v = lid; v < P.V; v += ${WG}u) { let x = ld_x(base + v); lo = min(lo, x); hi = max(hi, x); }
    bestV[lid] = lo;
    workgroupBarrier();
    for (var s = ${WG / 2}u; s > 0u; s = s >> 1u) {
      if (lid < s) { bestV[lid] = min(bestV[lid], bestV[lid + s]); }
      workgroupBarrier();
    }
    lo = bestV[0];
    workgroupBarrier();
    bestV[lid] = hi;
    workgroupBarrier();
    for (var s = ${WG / 2}u; s > 0u; s = s >> 1u) {
      if (lid < s) { bestV[lid] = max(bestV[lid], bestV[lid + s]); }
      workgroupBarrier();
    }
    hi = bestV[0];
    workgroupBarrier();
    let rowMin = lo;
    let rowMax = hi;
    if (useK) {
      for (var it = 0u; it < 24u; it++) {
        let mid = lo + (hi - lo) * 0.5;
        if (countAtLeast(base, mid, lid) >= P.topK) { lo = mid; } else { hi = mid; }
      }
      thr = lo;
    }
    if (useP) {
      let total = massAtLeast(base, thr, rowMax, lid); // mass left after top-k
      var plo = max(rowMin, thr);
      var phi = rowMax;
      for (var it = 0u; it < 24u; it++) {
        let mid = plo + (phi - plo) * 0.5;
        if (massAtLeast(base, mid, rowMax, lid) >= P.topP * total) { plo = mid; } else { phi = mid; }
      }
      thr = max(thr, plo);
    }
  }
  var bv = -3.4028234663852886e38;
  var bi = 0xffffffffu;
  for (var v = lid; v < P.V; v += ${WG}u) {
    let x = ld_x(base + v);
    var score = x;
    if (P.greedy == 0u) {
      if (x < thr) { continue; }
      let h = hash(P.seed ^ hash((P.step * 0x9E3779B9u) ^ hash(row * 65599u + v)));
      let u = (f32(h >> 8u) + 0.5) / 16777216.0;
      score = x * P.invTemp - log(-log(u));
    }
    if (score > bv || (score == bv && v < bi)) { bv = score; bi = v; }
  }
  bestV[lid] = bv;
  bestI[lid] = bi;
  workgroupBarrier();
  for (var s = ${WG / 2}u; s > 0u; s = s >> 1u) {
    if (lid < s) {
      let ov = bestV[lid + s];
      let oi = bestI[lid + s];
      if (ov > bestV[lid] || (ov == bestV[lid] && oi < bestI[lid])) { bestV[lid] = ov; bestI[lid] = oi; }
    }
    workgroupBarrier();
  }
  if (lid == 0u) {
    let tok = i32(min(bestI[0], P.V - 1u));
    st_next(row, tok);
    st_all(row * P.T + P.step, tok);
  }`,
});

/** How the next token is chosen. */
export interface SampleOptions {
  /** Draw from the distribution (default false: greedy argmax). */
  sample?: boolean;
  /** Keep only the k most likely tokens before sampling (0 or undefined: all). */
  topK?: number;
  /** Nucleus sampling: keep the most likely tokens whose probability adds up to at least p (1: all). */
  topP?: number;
  /** Softmax temperature (1). */
  temperature?: number;
  /** Seed of the sampler (0). */
  seed?: number;
}

/** Writes the chosen token of each row of `logits` (B, V) into `next` (B) and column `step` of `all` (B, T). */
export function sampleInto(logits: Tensor, next: Tensor, all: Tensor, step: number, o: SampleOptions): void {
  const [B, V] = logits.shape;
  const temperature = o.temperature ?? 1;
  if (!(temperature > 0)) throw new Error(`generate: temperature must be > 0, got ${temperature}`);
  const topK = o.topK ?? 0;
  if (!Number.isInteger(topK) || topK < 0) {
    throw new Error(`generate: topK must be a non-negative integer, got ${topK}`);
  }
  const topP = o.topP ?? 1;
  if (!(topP > 0 && topP <= 1)) throw new Error(`generate: topP must be in (0, 1], got ${topP}`);
  dispatch(sampleKernel, { x: logits.storage, next: next.storage, all: all.storage }, {
    V,
    T: all.shape[1],
    step,
    seed: (o.seed ?? 0) >>> 0,
    greedy: o.sample ? 0 : 1,
    topK,
    invTemp: 1 / temperature,
    topP,
  }, B);
}
