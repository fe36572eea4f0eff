/**
 * Indexing: `indexSelect`, `embedding` (a lookup with PyTorch's `padding_idx`) and `gather`, with
 * deterministic gradients.
 *
 * All are one forward kernel over the view (outer, J, inner) of the output: each invocation copies
 * x[o, idx, i] with idx read at o*so + j*sj + i*si (indexSelect: so = si = 0). The backward has no float
 * atomics to scatter with, so each invocation owns one element (o, v, i) of the gradient and sums, in
 * increasing j, the output gradients whose index equals v, in slices of at most 16384 positions (loops past
 * 65535 iterations stop silently on software adapters). For indexSelect and embedding, whose J indices serve
 * every (o, i), the positions are first sorted into buckets by index (`index_buckets.ts`), so that each
 * element reads its own positions only: O(J) reads per column instead of O(V J). gather, whose every (o, i)
 * has its own indices, scans them all. An index outside [0, V) reads NaN from an f32 x and 2143289344
 * (0x7fc00000, the bits of NaN) from an i32 x, and passes no gradient.
 * @module
 */

import { defineOp } from "../autograd.ts";
import { recordClear } from "../executor.ts";
import { defineKernel, dispatch } from "../kernel.ts";
import { fmt, normDim, sizeOf } from "../shape.ts";
import { Tensor } from "../tensor.ts";
import { indexBuckets } from "./index_buckets.ts";

const WG = 256;

const MAX_J = 16384;
const INDEX_UNIFORMS: [string, "u32"][] = [
  ["n", "u32"],
  ["V", "u32"],
  ["J", "u32"],
  ["inner", "u32"],
  ["so", "u32"],
  ["sj", "u32"],
  ["si", "u32"],
];

/** `gather`: y[gid] = x at the index's row, as raw words (f32 or i32 alike); `gather_bf16`: from a bf16 table
 * (read as f32 through its unpacking accessor) into f32. An index out of range gives NaN's bits. */
function gatherKernelOf(bf16: boolean) {
  const type = bf16 ? "f32" : "u32";
  // a NaN from a variable: WGSL rejects NaN constants (Chrome's compiler refuses bitcast<f32>(0x7fc00000u))
  const nan = bf16 ? "bitcast<f32>(nanBits)" : "nanBits";
  return defineKernel({
    name: bf16 ? "gather_bf16" : "gather",
    buffers: [
      { name: "x", type, access: "read" },
      { name: "idx", type: "i32", access: "read" },
      { name: "y", type, access: "read_write" },
    ],
    uniforms: INDEX_UNIFORMS,
    workgroupSize: WG,
    body: `
  if (gid >= P.n) { return; }
  let i = gid % P.inner;
  let j = (gid / P.inner) % P.J;
  let o = gid / (P.inner * P.J);
  let v = ld_idx(o * P.so + j * P.sj + i * P.si);
  var nanBits = 0x7fc00000u;
  if (v < 0 || u32(v) >= P.V) { st_y(gid, ${nan}); return; }
  st_y(gid, ld_x((o * P.V + u32(v)) * P.inner + i));`,
  });
}
const gatherKernels = { words: gatherKernelOf(false), bf16: gatherKernelOf(true) };

const scatterKernel = defineKernel({
  name: "gather_backward",
  buffers: [
    { name: "g", type: "f32", access: "read" },
    { name: "idx", type: "i32", access: "read" },
    { name: "dx", type: "f32", access: "read_write" },
  ],
  uniforms: [...INDEX_UNIFORMS, ["j0", "u32"], ["j1", "u32"]],
  workgroupSize: WG,
  body: `
  if (gid >= P.n) { return; }
  // gid -> (o, v, i) of dx; sums g[o, j, i] over j in [j0, j1) with idx == v.
  let i = gid % P.inner;
  let v = i32((gid / P.inner) % P.V);
  let o = gid / (P.inner * P.V);
  var acc = 0.0;
  if (P.j0 > 0u) { acc = ld_dx(gid); }
  for (var j = P.j0; j < P.j1; j++) {
    if (ld_idx(o * P.so + j * P.sj + i * P.si) == v) {
      acc += ld_g((o * P.J + j) * P.inner + i);
    }
  }
  st_dx(gid, acc);`,
});

/** indexSelect's gradient from the buckets of its indices ([order (P) | start (V) | end (V)], see
 * index_buckets.ts): invocation (o, v, i) adds g[o, j, i] over the positions j of row v's bucket that fall in
 * sorted slots [k0, k1) (windows of at most MAX_J slots); a window that holds none of them leaves dx alone. */
const bucketSumKernel = defineKernel({
  name: "index_select_backward",
  buffers: [
    { name: "g", type: "f32", access: "read" },
    { name: "buckets", type: "u32", access: "read" },
    { name: "dx", type: "f32", access: "read_write" },
  ],
  uniforms: [
    ["n", "u32"],
    ["V", "u32"],
    ["J", "u32"],
    ["inner", "u32"],
    ["P", "u32"], // start of the bucket bounds in `buckets`
    ["k0", "u32"],
    ["k1", "u32"],
  ],
  workgroupSize: WG,
  body: `
  if (gid >= P.n) { return; }
  let i = gid % P.inner;
  let v = (gid / P.inner) % P.V;
  let o = gid / (P.inner * P.V);
  let lo = max(ld_buckets(P.P + v), P.k0);
  let hi = min(ld_buckets(P.P + P.V + v), P.k1);
  if (P.k0 > 0u && lo >= hi) { return; } // nothing of this row in the window: dx holds the earlier ones
  var acc = 0.0;
  if (P.k0 > 0u) { acc = ld_dx(gid); }
  for (var k = lo; k < hi; k++) {
    acc += ld_g((o * P.J + ld_buckets(k)) * P.inner + i);
  }
  st_dx(gid, acc);`,
});

interface IndexAttrs {
  dim: number;
  outShape: number[];
  strides: [number, number, number];
  /** Row of x (dim 0 only) whose gradient is cleared after the sums: PyTorch's `padding_idx`; -1 for none. */
  paddingIdx?: number;
}

function view(x: Tensor, dim: number, J: number) {
  return { outer: sizeOf(x.shape.slice(0, dim)), V: x.shape[dim], J, inner: sizeOf(x.shape.slice(dim + 1)) };
}

const gatherOp = defineOp<IndexAttrs>({
  name: "gather",
  forward: ([x, idx], { dim, outShape, strides }, save) => {
    save(idx);
    const out = Tensor.empty(outShape, x.dtype === "bf16" ? "f32" : x.dtype); // a bf16 table gives f32 rows
    const { V, J, inner } = view(x, dim, outShape.length === x.rank ? outShape[dim] : idx.size);
    const n = out.size;
    const [so, sj, si] = strides;
    dispatch(
      x.dtype === "bf16" ? gatherKernels.bf16 : gatherKernels.words,
      { x: x.storage, idx: idx.storage, y: out.storage },
      { n, V, J, inner, so, sj, si },
      Math.ceil(n / WG),
    );
    return out;
  },
  backward: (g, [idx], [x], { dim, strides, paddingIdx = -1 }) => {
    const { outer, V, inner } = view(x, dim, 0);
    // The padding row (dim 0, outer = 1) gets no gradient: its bytes are cleared after the sums.
    const clearPad = (dx: Tensor) => {
      if (paddingIdx >= 0 && inner > 0) recordClear(dx.storage.buffer, 4 * paddingIdx * inner, 4 * inner);
    };
    const J = g.size / (outer * inner);
    const dx = Tensor.empty(x.shape);
    const n = dx.size;
    const [so, sj, si] = strides;
    const windows = (fn: (j0: number, j1: number) => void) => {
      for (let j0 = 0; j0 < Math.max(J, 1); j0 += MAX_J) fn(j0, Math.min(J, j0 + MAX_J));
    };
    if (so === 0 && si === 0 && V > 0) {
      // indexSelect, embedding: one index per position j, shared by every (o, i)
      const { buckets, P } = indexBuckets(idx, V);
      const bufs = { g: g.storage, buckets: buckets.storage, dx: dx.storage };
      windows((k0, k1) => dispatch(bucketSumKernel, bufs, { n, V, J, inner, P, k0, k1 }, Math.ceil(n / WG)));
      buckets.dispose();
    } else {
      const bufs = { g: g.storage, idx: idx.storage, dx: dx.storage };
      windows((j0, j1) =>
        dispatch(scatterKernel, bufs, { n, V, J, inner, so, sj, si, j0, j1 }, Math.ceil(n / WG))
      );
    }
    clearPad(dx);
    return [dx, null];
  },
  bf16Inputs: [0], // a table stored in bfloat16 gives f32 rows (and takes no gradient)
});

function checkIndex(idx: Tensor, op: string): void {
  if (idx.dtype !== "i32") throw new Error(`${op}: indices must be an i32 tensor, got ${idx.dtype} ${idx}`);
}

/**
 * Selects entries of `x` along `dim` by integer `index` (any shape): the result's shape is
 * `x.shape[:dim] + index.shape + x.shape[dim+1:]`. With `dim = 0` this is an embedding lookup. An index
 * outside [0, x.shape[dim]) reads NaN (f32 x) or 2143289344 (i32 x: the bits of NaN) and gets no gradient.
 */
export function indexSelect(x: Tensor, dim: number, index: Tensor): Tensor {
  checkIndex(index, "indexSelect");
  const d = normDim(dim, x.rank, "indexSelect");
  const outShape = [...x.shape.slice(0, d), ...index.shape, ...x.shape.slice(d + 1)];
  return gatherOp([x, index], { dim: d, outShape, strides: [0, 1, 0] });
}

/**
 * PyTorch's `F.embedding(ids, weight, padding_idx)`: the rows of `weight` (V, D) selected by integer `ids`
 * (any shape), giving `ids.shape + (D)`, as {@linkcode indexSelect} along dim 0. With `paddingIdx` the row
 * `weight[paddingIdx]` does not contribute to the gradient: the forward still reads it, but its gradient row
 * stays zero, so an optimizer step never changes it (a negative `paddingIdx` counts from the end, as in
 * PyTorch). Ids outside [0, V) read NaN and get no gradient.
 */
export function embedding(weight: Tensor, ids: Tensor, paddingIdx: number | null = null): Tensor {
  checkIndex(ids, "embedding");
  if (weight.rank !== 2) throw new Error(`embedding: weight must be (V, D), got ${fmt(weight.shape)}`);
  const V = weight.shape[0];
  let pad = -1;
  if (paddingIdx !== null && paddingIdx !== undefined) {
    if (!Number.isInteger(paddingIdx) || paddingIdx < -V || paddingIdx >= V) {
      throw new Error(`embedding: paddingIdx must be an integer in [-${V}, ${V}) or null, got ${paddingIdx}`);
    }
    pad = paddingIdx < 0 ? paddingIdx + V : paddingIdx;
  }
  const outShape = [...ids.shape, weight.shape[1]];
  return gatherOp([weight, ids], { dim: 0, outShape, strides: [0, 1, 0], paddingIdx: pad }); // bf16 weight: f32 rows
}

/**
 * PyTorch's `gather`: `out[..., j, ...] = x[..., index[..., j, ...], ...]` along `dim`; out has index's shape.
 * An index outside [0, x.shape[dim]) reads NaN (f32 x) or 2143289344 (i32 x: the bits of NaN) and gets no
 * gradient.
 */
export function gather(x: Tensor, dim: number, index: Tensor): Tensor {
  checkIndex(index, "gather");
  const d = normDim(dim, x.rank, "gather");
  if (index.rank !== x.rank || index.shape.some((s, i) => i !== d && s !== x.shape[i])) {
    throw new Error(`gather: index ${fmt(index.shape)} must match x ${fmt(x.shape)} in every dim but ${dim}`);
  }
  const J = index.shape[d];
  const inner = sizeOf(x.shape.slice(d + 1));
  return gatherOp([x, index], { dim: d, outShape: [...index.shape], strides: [J * inner, inner, 1] });
}
