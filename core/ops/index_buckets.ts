/**
 * Buckets of an index vector, for gradients that scatter-add without float atomics (an embedding's, an
 * `indexSelect`'s): the positions j of `ids` (J) sorted by (id, j), and for each row v of [0, V) the range
 * [start[v], end[v]) of that order whose id is v (empty where v does not occur). Ids outside [0, V) are left
 * out. A gradient kernel then gives each element of row v the sum of its bucket's positions, in increasing j:
 * O(J) reads in all, and the same order on every run (deterministic, as PyTorch's sort-based CUDA kernel).
 *
 * Kernels (a bitonic sort of the pairs (key, pos), pos breaking ties, so the order is strict and unique):
 * - `bucket_sort_block`: a workgroup of 256 owns a block of T = 512 elements (key and pos: 4 KiB of workgroup
 *   memory; small, as Mesa's GL compiles large workgroup arrays slowly) and runs the sort's steps (k, j) for k
 *   in [kLo, kHi] and j < T, a barrier before each: with kLo = 2, kHi = T it sorts the block (reading ids: key
 *   = id, or 0xffffffff for an id outside [0, V) and for the padding past J; pos = the position); with kLo =
 *   kHi = k > T it finishes stage k of the merge, whose steps j >= T ran in `bucket_bitonic`. In a step, the
 *   invocation owning pair q compares elements i and i + j (i: q with a zero bit j inserted) and orders them
 *   ascending where bit k of i's global index is clear, else descending.
 * - `bucket_bitonic`: one step (k, j >= T) on global memory, one pair per invocation.
 * - `bucket_bounds`: invocation k < J reads sorted key k: where it starts (ends) a run of equal keys, it
 *   writes k (k + 1) to start (end) of that row. Rows without a run keep the zeros they were cleared to.
 * Dispatches for P elements (P = J rounded up to a power of two, at least T): 1 + sum over k = 2T .. P of
 * (log2(k / T) + 1), then the bounds: 2 for J <= 512, 7 at J = 2048, 16 at 8192 (a dispatch per step would
 * be 66 at 2048). The order and the bounds share one buffer, [order (P) | start (V) | end (V)], so that a
 * kernel reading them binds one storage buffer (a large gradient table may need several bindings).
 * @module
 */

import { recordClear } from "../executor.ts";
import { defineKernel, dispatch } from "../kernel.ts";
import { Tensor } from "../tensor.ts";

const WG = 256;
const NONE = 0xffffffff;

/** Elements a block sorts in workgroup memory (T / 2 compare-exchanges per step, T / (2 WG) per invocation). */
const T = 512;

/** The compare-exchange of pair (i, l = i + j) of arrays `key`/`pos` (workgroup or global accessors), in
 * the direction that bit k of global index `at` gives. */
function compareExchange(
  ld: (a: string, i: string) => string,
  st: (a: string, i: string, v: string) => string,
): string {
  return `let ki = ${ld("key", "i")};
    let kl = ${ld("key", "l")};
    let pi = ${ld("pos", "i")};
    let pl = ${ld("pos", "l")};
    let greater = ki > kl || (ki == kl && pi > pl);
    if (greater == ((at & k) == 0u)) {
      ${st("key", "i", "kl")} ${st("key", "l", "ki")} ${st("pos", "i", "pl")} ${st("pos", "l", "pi")}
    }`;
}

const blockKernel = defineKernel({
  name: "bucket_sort_block",
  buffers: [
    { name: "ids", type: "i32", access: "read" },
    { name: "key", type: "u32", access: "read_write" },
    { name: "pos", type: "u32", access: "read_write" },
  ],
  uniforms: [["J", "u32"], ["V", "u32"], ["kLo", "u32"], ["kHi", "u32"], ["init", "u32"]],
  workgroupSize: WG,
  decls: `var<workgroup> wkey: array<u32, ${T}>;
var<workgroup> wpos: array<u32, ${T}>;`,
  body: `
  let base = group * ${T}u;
  for (var e = lid; e < ${T}u; e += ${WG}u) {
    let p = base + e;
    if (P.init != 0u) {
      var key = ${NONE}u;
      if (p < P.J) {
        let id = ld_ids(p);
        if (id >= 0 && u32(id) < P.V) { key = u32(id); }
      }
      wkey[e] = key;
      wpos[e] = p;
    } else {
      wkey[e] = ld_key(p);
      wpos[e] = ld_pos(p);
    }
  }
  for (var k = P.kLo; k <= P.kHi; k *= 2u) {
    for (var j = min(k, ${T}u) / 2u; j >= 1u; j /= 2u) {
      workgroupBarrier();
      for (var q = lid; q < ${T / 2}u; q += ${WG}u) {
        let i = 2u * j * (q / j) + q % j; // bit j of i is clear: its partner is i + j
        let l = i + j;
        let at = base + i;
        ${compareExchange((a, i) => `w${a}[${i}]`, (a, i, v) => `w${a}[${i}] = ${v};`)}
      }
    }
  }
  workgroupBarrier();
  for (var e = lid; e < ${T}u; e += ${WG}u) {
    st_key(base + e, wkey[e]);
    st_pos(base + e, wpos[e]);
  }`,
});

const bitonicKernel = defineKernel({
  name: "bucket_bitonic",
  buffers: [
    { name: "key", type: "u32", access: "read_write" },
    { name: "pos", type: "u32", access: "read_write" },
  ],
  uniforms: [["half", "u32"], ["k", "u32"], ["j", "u32"]],
  workgroupSize: WG,
  body: `
  if (gid >= P.half) { return; }
  let k = P.k;
  let i = 2u * P.j * (gid / P.j) + gid % P.j; // bit j of i is clear: its partner is i + j
  let l = i + P.j;
  let at = i;
  ${compareExchange((a, i) => `ld_${a}(${i})`, (a, i, v) => `st_${a}(${i}, ${v});`)}`,
});

const boundsKernel = defineKernel({
  name: "bucket_bounds",
  buffers: [
    { name: "key", type: "u32", access: "read" },
    { name: "buckets", type: "u32", access: "read_write" },
  ],
  uniforms: [["J", "u32"], ["P", "u32"], ["V", "u32"]],
  workgroupSize: WG,
  body: `
  if (gid >= P.J) { return; }
  let v = ld_key(gid);
  if (v == ${NONE}u) { return; }
  if (gid == 0u || ld_key(gid - 1u) != v) { st_buckets(P.P + v, gid); }
  if (gid + 1u == P.J || ld_key(gid + 1u) != v) { st_buckets(P.P + P.V + v, gid + 1u); }`,
});

/** What {@linkcode indexBuckets} returns; the caller disposes `buckets`. */
export interface IndexBuckets {
  /** (P + 2V) i32: [order (P) | start (V) | end (V)]. order: the positions 0..J-1 sorted by (id, position),
   * those with an id outside [0, V) after the others, then padding. start[v], end[v]: `order[start[v] ..
   * end[v])` are the positions whose id is v (both 0 for a row without any). */
  buckets: Tensor;
  /** Where start begins: P, J rounded up to a power of two (at least 512); end begins at P + V. */
  P: number;
}

/** Sorts the positions of `ids` (J i32 values, any shape read flat) into buckets of rows 0..V-1; see the
 * module doc. Everything is recorded on the GPU: nothing is read back. */
export function indexBuckets(ids: Tensor, V: number): IndexBuckets {
  const J = ids.size;
  const P = Math.max(T, 2 ** Math.ceil(Math.log2(Math.max(J, 1))));
  const key = Tensor.empty([P], "i32");
  const buckets = Tensor.empty([P + 2 * V], "i32"); // [order | start | end]
  const bufs = { ids: ids.storage, key: key.storage, pos: buckets.storage };
  const pairs = { key: key.storage, pos: buckets.storage };
  const blocks = P / T;
  dispatch(blockKernel, bufs, { J, V, kLo: 2, kHi: T, init: 1 }, blocks);
  for (let k = 2 * T; k <= P; k *= 2) {
    for (let j = k / 2; j >= T; j /= 2) {
      dispatch(bitonicKernel, pairs, { half: P / 2, k, j }, Math.ceil(P / 2 / WG));
    }
    dispatch(blockKernel, bufs, { J, V, kLo: k, kHi: k, init: 0 }, blocks);
  }
  recordClear(buckets.storage.buffer, 4 * P, 8 * V);
  dispatch(boundsKernel, { key: key.storage, buckets: buckets.storage }, { J, P, V }, Math.ceil(J / WG));
  key.dispose();
  return { buckets, P };
}
