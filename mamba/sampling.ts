/**
 * Picks the next token of every row on the GPU, so generation never waits for logits.
 *
 * Kernel `sample_rows`: one workgroup of WG invocations per row of logits (B, V): 64, or 256 where a row is so
 * long that 64 would loop past 65535 iterations (software adapters stop there silently; top-k and top-p
 * walk the row 66 times: V above 62912). Greedy: argmax (first index on ties, as torch.argmax; NaN logits
 * are skipped, where torch.argmax would return a NaN's index, and a row of NaN alone is marked -1).
 * Sampling: Gumbel-max, argmax((x - max) / T + g) with g = -log(-log(u)), which draws exactly from
 * softmax(x / T); u comes from a hash of (seed, step, row, v), so a seed reproduces a run. Top-k, as
 * mamba.py's generate and HF's TopKLogitsWarper: a bisection on an order-preserving u32 key of the f32 logit
 * (32 rounds of a workgroup count) finds the k-th largest value, and every logit at least that large is kept
 * (so ties with the k-th are all kept, more than k then, where torch.topk alone would cut them by index).
 * Top-p: a bisection on the same key of the scaled logit s = (x - max) / T (31 rounds of a workgroup sum of
 * exp(s) over the top-k set, from every key to key(0), the max's) finds, exactly, the smallest set of the
 * most likely tokens holding probability p, as HF's TopPLogitsWarper; logits outside it are skipped (ties at
 * its edge, equal s, are all kept; the max always is, as HF keeps at least one token). Min-p (HF's
 * MinPLogitsWarper): tokens whose probability is below minP times the most likely one's are skipped too,
 * x < max + T log(minP), after top-k and top-p as HF's warpers (top-p's mass is over the top-k set alone;
 * min-p's threshold needs only the max, which neither drops). Writes the token into `next` (B) and into
 * column `step` of `all` (B, T).
 * Repetition penalty (HF's RepetitionPenaltyLogitsProcessor, mamba_ssm's generate): before all of that, a
 * logit x of an id the row has seen (its bit in `seen` (B, W) u32, W = ceil(V / 32): the prompt's ids and the
 * tokens chosen so far) counts as x / penalty, or x * penalty where x < 0; the chosen id's bit is then set.
 * Workgroup memory: WG (value, index) pairs, WG counts, WG partial sums.
 * @module
 */

import { deviceInfo } from "../core/device.ts";
import { defineKernel, dispatch, type Kernel } from "../core/kernel.ts";
import { showValue } from "../core/options.ts";
import { streamFor } from "../core/random.ts";
import { Tensor } from "../core/tensor.ts";

/**
 * Loop trips one invocation runs for a row of V logits, each loop's final test counted (software adapters
 * stop an invocation silently once all its loops together pass 65535): greedy walks the row once and reduces
 * by a tree; sampling also finds the row's max (a walk and a tree); top-k and top-p add the bisections (32
 * and 31 rounds, each a walk and a tree, and the bisection loops' own 33 + 32 trips) and the top-p total (a
 * walk and a tree). Lavapipe counts a few trips more than these loops (9 greedy, 7 sampling: added as
 * measured); the counts reproduce the lengths at which it was measured to fail: greedy right to V 16772096
 * at 256 invocations, wrong at 16772352; sampling right to 8385024, wrong at 8385280; top-k/top-p right to
 * 62912 at 64 invocations and 251136 at 256, wrong at 62976 and 251392.
 */
export function loopIterations(V: number, WG: number, mode: "greedy" | "sample" | "top"): number {
  const [walk, tree] = [Math.ceil(V / WG) + 1, Math.log2(WG) + 1];
  if (mode === "greedy") return walk + tree + 9;
  if (mode === "sample") return 2 * walk + 2 * tree + 7;
  return 66 * walk + 66 * tree + 65 + 7;
}

/** The workgroup size for rows of V logits: 64, or 256 when top-k and top-p would loop past 65535 trips at 64. */
export function sampleWorkgroup(V: number): number {
  return loopIterations(V, 64, "top") <= 65535 ? 64 : 256;
}

const kernels = new Map<number, Kernel>();
const F32_MAX = 3.4028234663852886e38;
const F32_MIN_NORMAL = 2 ** -126;

function sampleKernel(WG: number): Kernel {
  let k = kernels.get(WG);
  if (!k) kernels.set(WG, k = makeSampleKernel(WG));
  return k;
}

function makeSampleKernel(WG: number): Kernel {
  return defineKernel({
    name: `sample_rows_${WG}`,
    buffers: [
      { name: "x", type: "f32", access: "read" },
      { name: "next", type: "i32", access: "read_write" },
      { name: "all", type: "i32", access: "read_write" },
      { name: "seen", type: "u32", access: "read_write" },
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
      ["minP", "f32"],
      ["W", "u32"],
      ["penalty", "f32"],
      ["seedHi", "u32"],
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
fn key(x: f32) -> u32 {
  // Order-preserving: key(a) < key(b) exactly when a < b (-0 and +0 share a key). A NaN gets the lowest key,
  // below -inf, so that it takes no top-k place (it is no candidate).
  let b = bitcast<u32>(x);
  if ((b & 0x7fffffffu) > 0x7f800000u) { return 0u; }
  if (x == 0.0) { return 0x80000000u; }
  return select(b | 0x80000000u, ~b, (b & 0x80000000u) != 0u);
}
fn logit(row: u32, v: u32) -> f32 {
  // every read of a logit: with a penalty, one of an id the row has seen is divided by it (multiplied if < 0)
  let x = ld_x(row * P.V + v);
  if (P.penalty == 1.0 || ((ld_seen(row * P.W + (v >> 5u)) >> (v & 31u)) & 1u) == 0u) { return x; }
  return select(x / P.penalty, x * P.penalty, x < 0.0);
}
fn massAtLeast(row: u32, pKey: u32, m: f32, kKey: u32, lid: u32) -> f32 {
  // sum of exp(s), s = (x - m) / T, over the top-k logits x with key(s) >= pKey (unnormalised probability
  // mass; pKey 1 and up leaves out NaN, whose key is 0)
  var c = 0.0;
  for (var v = lid; v < P.V; v += ${WG}u) {
    let x = logit(row, v);
    let s = (x - m) * P.invTemp;
    if (key(x) >= kKey && key(s) >= pKey) { c += exp(s); }
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
fn sumCounts(c: u32, lid: u32) -> u32 {
  cnt[lid] = c;
  workgroupBarrier();
  for (var s = ${WG / 2}u; s > 0u; s = s >> 1u) {
    if (lid < s) { cnt[lid] += cnt[lid + s]; }
    workgroupBarrier();
  }
  let total = cnt[0];
  workgroupBarrier();
  return total;
}
fn countKeyAtLeast(row: u32, k: u32, lid: u32) -> u32 {
  var c = 0u;
  for (var v = lid; v < P.V; v += ${WG}u) { c += select(0u, 1u, key(logit(row, v)) >= k); }
  return sumCounts(c, lid);
}`,
    body: `
  let row = group;
  // top-k: key(x) >= kKey (0: all, NaN included; NaN is no candidate anyway); top-p: key(s) >= pKey, s the
  // scaled logit (x - max) / T; min-p: x >= thr
  var kKey = 0u;
  var pKey = 0u;
  var thr = -3.4028234663852886e38;
  let useK = P.topK > 0u && P.topK < P.V;
  let useP = P.topP < 1.0;
  var rowMax = 0.0; // sampling scores (x - rowMax) / T: no overflow however small T is
  if (P.greedy == 0u) {
    var hi = -3.4028234663852886e38;
    for (var v = lid; v < P.V; v += ${WG}u) { hi = max(hi, logit(row, v)); }
    bestV[lid] = hi;
    workgroupBarrier();
    for (var s = ${WG / 2}u; s > 0u; s = s >> 1u) {
      if (lid < s) { bestV[lid] = max(bestV[lid], bestV[lid + s]); }
      workgroupBarrier();
    }
    rowMax = bestV[0];
    workgroupBarrier();
    if (useK) {
      // the largest key with count(key >= it) >= k: the k-th largest logit's
      var klo = 0u;
      var khi = 0xffffffffu;
      for (var it = 0u; it < 32u; it++) {
        let d = khi - klo;
        let mid = klo + (d >> 1u) + (d & 1u);
        if (countKeyAtLeast(row, mid, lid) >= P.topK) { klo = mid; } else { khi = mid - 1u; }
      }
      kKey = klo;
    }
    if (useP) {
      // the largest key of a score s with mass(key(s) >= it) >= p of the mass left after top-k: exactly, as
      // the scores' keys are integers. From 1 (every score but NaN's: the whole mass) up to key(0), the max's
      // score, which is so always kept (when p times the mass is 0 in f32, the max and its ties alone, as
      // HF keeps at least one token): 2^31 keys, 31 rounds.
      let want = P.topP * massAtLeast(row, 1u, rowMax, kKey, lid);
      var plo = 1u;
      var phi = 0x80000000u;
      for (var it = 0u; it < 31u; it++) {
        let d = phi - plo;
        let mid = plo + (d >> 1u) + (d & 1u);
        if (massAtLeast(row, mid, rowMax, kKey, lid) >= want) { plo = mid; } else { phi = mid - 1u; }
      }
      pKey = plo;
    }
    // min-p: exp((x - max) / T) >= minP
    if (P.minP > 0.0) { thr = max(thr, rowMax + log(P.minP) / P.invTemp); }
  }
  // from -inf (a variable: WGSL rejects infinite constants), so that a greedy row of -inf takes its first id
  // as torch.argmax does; a row with no candidate at all (NaN logits, or an infinity when sampling: torch's
  // multinomial refuses those) is marked -1 in \`all\` for generate to name
  var ninf = 0xff800000u;
  var bv = bitcast<f32>(ninf);
  var bi = 0xffffffffu;
  // the seed's upper word (of seeds past 2^32 or below 0) mixed in; seeds below 2^32 as before it was read
  let seed = select(P.seed ^ hash(P.seedHi ^ 0x5BD1E995u), P.seed, P.seedHi == 0u);
  for (var v = lid; v < P.V; v += ${WG}u) {
    let x = logit(row, v);
    var score = x;
    if (P.greedy == 0u) {
      let s = (x - rowMax) * P.invTemp;
      if (x < thr || key(x) < kKey || key(s) < pKey) { continue; }
      // Gumbel noise -log(-log(u)) from u in (0, 1): 23 bits, so that 0.5 + (2^23 - 1) stays below 2^23 in f32
      // (24 bits rounded u to 1.0 once in 2^24 draws: an infinite score, a uniformly random token once in about
      // 330 at a 50k vocabulary); and -log(u) kept above 0 where log rounds u near 1 to 0. The row is hashed
      // apart from the token id (row * 65599 + v made row r + 1's noise row r's past 65599 tokens).
      let h = hash(seed ^ hash((P.step * 0x9E3779B9u) ^ hash(hash(v) ^ hash(row + 0x85EBCA6Bu))));
      let u = (f32(h >> 9u) + 0.5) / 8388608.0;
      score = s - log(max(-log(u), 2.98e-8));
    }
    // a NaN score (a NaN logit, or inf - inf) is no candidate, nor when sampling one of probability 0 (a score
    // of -inf: beside a logit of +inf, every finite one): tested by its bits, as WGSL lets a compiler assume
    // x == x
    let bits = bitcast<u32>(score);
    if ((bits & 0x7fffffffu) > 0x7f800000u || (P.greedy == 0u && bits == ninf)) { continue; }
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
    let found = bestI[0] < P.V;
    st_next(row, i32(select(0u, bestI[0], found))); // a valid id for the next step's embedding either way
    st_all(row * P.T + P.step, select(-1, i32(bestI[0]), found));
    if (found && P.penalty != 1.0) {
      let w = row * P.W + (bestI[0] >> 5u);
      st_seen(w, ld_seen(w) | (1u << (bestI[0] & 31u)));
    }
  }`,
  });
}

/**
 * How the next token is chosen. Greedy (argmax) unless `sample` is true. `temperature`, `topK`, `topP`,
 * `minP` and `seed` only act when sampling: giving any of them without `sample` is an error (say `sample:
 * true`, or `sample: false` to decode greedily and ignore them, as a UI toggle would).
 */
export interface SampleOptions {
  /** Draw from the distribution (default false: greedy argmax, the first of tied maxima as torch.argmax). A
   * NaN logit is never chosen, greedy or sampling: greedy takes the largest of the others, where
   * torch.argmax would return the NaN's index; a row with no other candidate is an error of generate's. */
  sample?: boolean;
  /** Keep only the k most likely tokens before sampling, and every token tied with the k-th (as mamba.py's
   * generate and HF's TopKLogitsWarper); 0 or undefined: all. */
  topK?: number;
  /** Nucleus sampling, in (0, 1]: keep the fewest most likely tokens whose probability (after top-k) adds up
   * to at least p, as HF's TopPLogitsWarper (1: all). The cut is exact; tokens tied with the last one kept are
   * kept too, and the most likely always is. */
  topP?: number;
  /** Min-p sampling (HF's `min_p`): keep the tokens at least minP times as likely as the most likely one, in
   * [0, 1] (0: all). */
  minP?: number;
  /** Softmax temperature, > 0 and at most 2^126 (1 / temperature is an f32 in the sampler: past 2^126 it
   * would be subnormal, 0 on GPUs that flush those, and sampling uniform); default 1. A temperature below
   * about 2.9e-39, where 1 / temperature overflows f32, samples as one just above: the argmax, ties drawn
   * evenly. */
  temperature?: number;
  /**
   * Repetition penalty, in f32's normal range [1.1754944e-38, 3.4028235e+38] (it is an f32 in the sampler)
   * (1: none), as HF's `repetition_penalty` and mamba_ssm's generate: the logit x of every id already in the
   * row (prompt or output) counts as x / penalty, or x * penalty where x < 0, before anything else. Greedy
   * decoding too: it is not a sampling option.
   */
  repetitionPenalty?: number;
  /**
   * Seed of the sampler, an integer within ±(2^53 - 1), all of its bits used: the same seed, prompt and options give the same
   * tokens. Without one, each call draws its seed from the global generator, so successive calls differ
   * and `manualSeed` makes a program's samples reproducible (as torch.manual_seed before HF's generate).
   * That generator starts from one fixed seed in every process, as PyTorch's default generator does (its
   * 67280421310721): a program that never seeds samples the same text in every run (`deno task generate`
   * draws a seed per run unless `--seed` is given).
   */
  seed?: number;
}

/** Validated sampling parameters, as {@linkcode sampleInto} takes them. */
export interface SampleParams {
  /** Argmax instead of sampling. */
  greedy: boolean;
  /** Softmax temperature. */
  temperature: number;
  /** Top-k (0: all). */
  topK: number;
  /** Top-p (1: all). */
  topP: number;
  /** Min-p (0: all). */
  minP: number;
  /** Repetition penalty (1: none). */
  repetitionPenalty: number;
  /** Seed (a safe integer); undefined: not given (generate draws one from the global generator when sampling). */
  seed: number | undefined;
}

const SAMPLING_ONLY = ["temperature", "topK", "topP", "minP", "seed"] as const;

/** A value for a message: numbers as JavaScript writes them (1e+21, NaN), strings quoted ("1"), other things
 * by their type. */
const show = showValue;

/** Validates sampling options before any work starts; errors name the option and the value. */
export function sampleParams(o: SampleOptions): SampleParams {
  if (o.sample !== undefined && typeof o.sample !== "boolean") {
    throw new Error(`generate: sample must be a boolean, got ${show(o.sample)}`);
  }
  if (o.sample === undefined) {
    const given = SAMPLING_ONLY.filter((k) => o[k] !== undefined);
    if (given.length) {
      const what = given.length > 1 ? "are sampling options" : "is a sampling option";
      throw new Error(
        `generate: ${given.join(", ")} ${what} but sample is not set: pass sample: true to sample ` +
          "(or sample: false to decode greedily and ignore them)",
      );
    }
  }
  const temperature = o.temperature ?? 1;
  // the sampler multiplies by 1 / temperature, an f32: at most F32_MAX (smaller temperatures sample as the
  // smallest above), and normal, or a GPU that flushes subnormals would sample uniformly (Infinity did)
  if (
    typeof temperature !== "number" || !(temperature > 0 && Math.fround(1 / temperature) >= F32_MIN_NORMAL)
  ) {
    throw new Error(
      `generate: temperature must be a number > 0 and at most 2^126 (8.507059e+37: 1 / temperature is an f32 ` +
        `normal in the sampler), got ${show(temperature)}`,
    );
  }
  const topK = o.topK ?? 0;
  if (!Number.isInteger(topK) || topK < 0 || topK > 0xffffffff) {
    throw new Error(`generate: topK must be an integer from 0 to 2^32 - 1 (0: all), got ${show(topK)}`);
  }
  const topP = o.topP ?? 1;
  if (typeof topP !== "number" || !(topP > 0 && topP <= 1)) {
    throw new Error(`generate: topP must be a number in (0, 1], got ${show(topP)}`);
  }
  const minP = o.minP ?? 0;
  if (typeof minP !== "number" || !(minP >= 0 && minP <= 1)) {
    throw new Error(`generate: minP must be a number in [0, 1], got ${show(minP)}`);
  }
  const repetitionPenalty = o.repetitionPenalty ?? 1;
  // an f32 in the sampler: 1e-50 was 0 there (seen logits divided by it: infinities), 1e39 infinity
  const penalty32 = typeof repetitionPenalty === "number" ? Math.fround(repetitionPenalty) : NaN;
  if (!(penalty32 >= F32_MIN_NORMAL && penalty32 <= F32_MAX)) {
    throw new Error(
      "generate: repetitionPenalty must be a number in f32's normal range [1.1754944e-38, 3.4028235e+38] " +
        `(it is an f32 in the sampler), got ${show(repetitionPenalty)}`,
    );
  }
  if (o.seed !== undefined && !Number.isSafeInteger(o.seed)) {
    throw new Error(`generate: seed must be an integer within ±(2^53 - 1), got ${show(o.seed)}`);
  }
  return {
    greedy: !o.sample,
    temperature,
    topK,
    topP,
    minP,
    repetitionPenalty,
    seed: o.seed,
  };
}

/** The seed of a sampling call that gave none: the next word of the global generator (see `manualSeed`). */
export function drawSeed(): number {
  return streamFor().nextU32();
}

/** Words per row of a repetition penalty's mask of the ids seen, one bit per id of a vocabulary of V. */
export function seenWords(V: number): number {
  return Math.ceil(V / 32);
}

/** The mask of the ids each row of `rows` (B rows of ids < V) holds: (B, seenWords(V)) words, as i32. */
export function seenMask(rows: readonly ArrayLike<number>[], V: number): Int32Array {
  const W = seenWords(V);
  const mask = new Int32Array(rows.length * W);
  rows.forEach((r, b) => {
    for (let i = 0; i < r.length; i++) mask[b * W + (r[i] >> 5)] |= 1 << (r[i] & 31);
  });
  return mask;
}

/**
 * Writes the chosen token of each row of `logits` (B, V) into `next` (B) and column `step` of `all` (B, T).
 * With a repetition penalty, `seen` (B, seenWords(V)) holds the ids each row has seen ({@linkcode seenMask});
 * the chosen ones are added to it. Without one, `seen` may be any tensor (it is bound, not read): a caller
 * that samples many times passes one, else each call makes and frees its own.
 */
export function sampleInto(
  logits: Tensor,
  next: Tensor,
  all: Tensor,
  step: number,
  p: SampleParams,
  seen?: Tensor,
): void {
  const [B, V] = logits.shape;
  const penalised = p.repetitionPenalty !== 1;
  if (penalised && (!seen || seen.size !== B * seenWords(V))) {
    throw new Error(
      `sampleInto: a repetition penalty needs the mask of the ids seen, (${B}, ${seenWords(V)}), got ${
        seen ? `(${seen.shape.join(", ")})` : "none"
      }`,
    );
  }
  const WG = sampleWorkgroup(V);
  const mode = p.greedy ? "greedy" : p.topK || p.topP < 1 ? "top" : "sample";
  const trips = loopIterations(V, WG, mode);
  if (deviceInfo().isFallbackAdapter && trips > 65535) {
    const what = { greedy: "greedy decoding", sample: "sampling", top: "top-k/top-p" }[mode];
    throw new Error(
      `generate: ${what} over ${V} logits would loop ${trips} times per invocation, past the 65535 a ` +
        "software adapter runs (top-k/top-p: at most about 251k logits; sampling 8.3M; greedy 16.7M)",
    );
  }
  // without a penalty the kernel neither reads nor writes the mask: any buffer of its own will do
  const mask = seen ?? Tensor.empty([1], "i32");
  dispatch(
    sampleKernel(WG),
    { x: logits.storage, next: next.storage, all: all.storage, seen: mask.storage },
    {
      V,
      T: all.shape[1],
      step,
      seed: (p.seed ?? 0) >>> 0,
      seedHi: Math.floor((p.seed ?? 0) / 2 ** 32) >>> 0,
      greedy: p.greedy ? 1 : 0,
      topK: p.topK,
      invTemp: Math.min(1 / p.temperature, F32_MAX), // an f32: 1 / 1e-40 would be inf there, and 0 * inf NaN
      topP: p.topP,
      minP: p.minP,
      W: seenWords(V),
      penalty: p.repetitionPenalty,
    },
    B,
  );
  if (!seen) mask.dispose();
}
