/**
 * Shape ops: reshape/view (share storage), and the copies permute, transpose, slice, narrow, cat, split,
 * chunk, pad, expand.
 *
 * All copies go through `copyBox`, one template `strided_copy_r<rank>`: each invocation moves one 32-bit
 * word (or one vec4<u32> when rows allow) from `src[srcOffset + sum(c_d * srcStride_d)]` to
 * `dst[dstOffset + sum(c_d * dstStride_d)]` for the coordinate `c` of its element in the copied box, after
 * dims contiguous in both boxes were merged (fewer integer divisions, which are scalar on CPU adapters);
 * fully contiguous boxes become buffer copies. Dtype-agnostic (u32 bits). No workgroup memory. `packInto`
 * (several tensors end to end into one, in one dispatch) has its own small template, `pack_<parts>`.
 * @module
 */

import { defineOp, WindowGrad } from "../autograd.ts";
import { recordCopy } from "../executor.ts";
import { defineKernel, dispatch, type Kernel, windowBytes } from "../kernel.ts";
import {
  checkShape,
  fmt,
  isInt32,
  MAX_RANK,
  normAxis,
  normDim,
  type Shape,
  sizeOf,
  stridesOf,
} from "../shape.ts";
import type { Storage } from "../memory.ts";
import { bytesOf, freeOnThrow, Tensor } from "../tensor.ts";
import { BF16_ONLY } from "../bf16.ts";
import { full } from "../creation.ts";
import { mapOp } from "./map_kernel.ts";
import { sumToShape } from "./reduce.ts";

const WG = 256;

/**
 * Index arithmetic of a copy of rank r (after merging dims): r - 1 div/mod pairs, innermost first, the
 * outermost coordinate is what remains. Integer division is scalar on CPU adapters, so fewer dims is faster.
 */
function coordLines(rank: number): string {
  const lines: string[] = [];
  for (let d = rank - 1; d >= 0; d--) {
    const c = `${d < 4 ? "0" : "1"}.${"xyzw"[d % 4]}`;
    lines.push(
      d === 0
        ? `si += rem * P.ss${c}; di += rem * P.ds${c};`
        : `{ let c = rem % P.sh${c}; rem = rem / P.sh${c}; si += c * P.ss${c}; di += c * P.ds${c}; }`,
    );
  }
  return lines.join("\n  ");
}

const copyKernels = new Map<string, Kernel>();

/**
 * `strided_copy_r<rank>[_v4]`: one invocation moves one 32-bit word (or four, as vec4<u32>);
 * `strided_add_r<rank>[_v4]` adds f32 words into the destination instead (gradient accumulation).
 */
function stridedCopyKernel(rank: number, vec4: boolean, accumulate: boolean): Kernel {
  const key = `${rank}|${vec4}|${accumulate}`;
  let k = copyKernels.get(key);
  if (!k) {
    const type = vec4 ? "vec4<u32>" : "u32";
    const f = vec4 ? "vec4<f32>" : "f32";
    const store = accumulate
      ? `st_dst(di, bitcast<${type}>(bitcast<${f}>(ld_dst(di)) + bitcast<${f}>(ld_src(si))));`
      : "st_dst(di, ld_src(si));";
    k = defineKernel({
      name: `strided_${accumulate ? "add" : "copy"}_r${rank}${vec4 ? "_v4" : ""}`,
      buffers: [{ name: "src", type, access: "read" }, { name: "dst", type, access: "read_write" }],
      uniforms: [
        ["n", "u32"],
        ["srcOffset", "u32"],
        ["dstOffset", "u32"],
        ["sh0", "vec4<u32>"],
        ["sh1", "vec4<u32>"],
        ["ss0", "vec4<u32>"],
        ["ss1", "vec4<u32>"],
        ["ds0", "vec4<u32>"],
        ["ds1", "vec4<u32>"],
      ],
      workgroupSize: WG,
      body: `
  if (gid >= P.n) { return; }
  var rem = gid;
  var si = P.srcOffset;
  var di = P.dstOffset;
  ${coordLines(rank)}
  ${store}`,
    });
    copyKernels.set(key, k);
  }
  return k;
}

/** Drops size-1 dims and merges neighbours that are contiguous in both boxes: (B, L, ED) rows of a
 * (B, L, 2ED) tensor become (B*L, ED). */
function mergeDims(shape: Shape, ss: readonly number[], ds: readonly number[]) {
  const out = { shape: [] as number[], ss: [] as number[], ds: [] as number[] };
  for (let d = 0; d < shape.length; d++) {
    if (shape[d] === 1) continue;
    const last = out.shape.length - 1;
    if (last >= 0 && out.ss[last] === ss[d] * shape[d] && out.ds[last] === ds[d] * shape[d]) {
      out.shape[last] *= shape[d];
      out.ss[last] = ss[d];
      out.ds[last] = ds[d];
    } else {
      out.shape.push(shape[d]);
      out.ss.push(ss[d]);
      out.ds.push(ds[d]);
    }
  }
  if (out.shape.length === 0) return { shape: [1], ss: [1], ds: [1] };
  return out;
}

/** A box inside a tensor: start offset (elements) and strides of each box dim. */
export interface Box {
  /** Element offset of the box's first element. */
  offset: number;
  /** Element stride of each box dim. */
  strides: readonly number[];
}

/** Throws unless `box` of `shape` lies inside `t`'s storage (a copy past it reads stale bytes, or drops writes). */
function checkBox(which: string, t: Tensor, box: Box, shape: Shape): void {
  const elements = t.storage.bytes / 4;
  let last = box.offset;
  let ok = Number.isInteger(box.offset) && box.offset >= 0 && box.strides.length === shape.length;
  for (let d = 0; ok && d < shape.length; d++) {
    ok = Number.isInteger(box.strides[d]) && box.strides[d] >= 0;
    last += (shape[d] - 1) * box.strides[d];
  }
  if (!ok || last >= elements) {
    throw new Error(
      `copyBox: the ${which} box ${fmt(shape)} at offset ${box.offset} with strides ${fmt(box.strides)} ` +
        (ok
          ? `reaches element ${last}, past the ${elements} of ${t}`
          : "needs an integer offset >= 0 and one integer stride >= 0 per dim"),
    );
  }
}

/**
 * Copies the box `shape` from `src` (read through `from`) into `dst` (written through `to`), f32 or i32; with
 * `accumulate`, adds it to what `dst` holds there (f32 only). No autograd. Dims are merged first; a
 * contiguous run becomes a buffer copy, and rows whose length, strides and offsets are multiples of 4 move
 * as vec4. `src` and `dst` may share storage, even with overlapping boxes: the box then goes through a
 * temporary (WebGPU copies no buffer into itself and binds none as both read and written). A raw write, as
 * PyTorch's writes through `.data`: into a tensor that a graph saved for its backward, it changes what that
 * backward computes.
 */
export function copyBox(
  src: Tensor,
  from: Box,
  dst: Tensor,
  to: Box,
  shape: Shape,
  accumulate = false,
): void {
  const n = sizeOf(shape);
  if (n === 0) return;
  if (src.dtype === "bf16" || dst.dtype === "bf16") {
    // boxes count 32-bit elements; a bf16 tensor holds two values a word
    throw new Error(`copyBox: ${BF16_ONLY}, got ${src} into ${dst}`);
  }
  checkBox("source", src, from, shape);
  checkBox("destination", dst, to, shape);
  if (accumulate && (src.dtype !== "f32" || dst.dtype !== "f32")) {
    throw new Error(`copyBox: accumulating needs f32 tensors, got ${src.dtype} into ${dst.dtype}`);
  }
  if (src.storage.buffer === dst.storage.buffer) {
    const tmp = Tensor.empty(shape, src.dtype);
    const box = { offset: 0, strides: stridesOf(shape) };
    copyBox(src, from, tmp, box, shape);
    copyBox(tmp, box, dst, to, shape, accumulate);
    tmp.dispose();
    return;
  }
  const m = mergeDims(shape, from.strides, to.strides);
  const r = m.shape.length;
  const contiguous = r === 1 && m.ss[0] === 1 && m.ds[0] === 1;
  if (contiguous && !accumulate) {
    recordCopy(src.storage.buffer, 4 * from.offset, dst.storage.buffer, 4 * to.offset, 4 * n);
    return;
  }
  const by4 = (v: number) => v % 4 === 0;
  const vec4 = m.ss[r - 1] === 1 && m.ds[r - 1] === 1 && by4(m.shape[r - 1]) && by4(from.offset) &&
    by4(to.offset) && m.ss.slice(0, -1).every(by4) && m.ds.slice(0, -1).every(by4);
  const q = vec4 ? 4 : 1;
  // Dims 0..r-1 of the uniforms, left-aligned (the kernel of rank r reads only those).
  const fill = (a: number[]) => [...a, ...new Array(MAX_RANK - a.length).fill(0)];
  const sh = fill(m.shape.map((v, d) => (d === r - 1 ? v / q : v)));
  const ss = fill(m.ss.map((v, d) => (d === r - 1 ? v : v / q)));
  const ds = fill(m.ds.map((v, d) => (d === r - 1 ? v : v / q)));
  dispatch(stridedCopyKernel(r, vec4, accumulate), { src: src.storage, dst: dst.storage }, {
    n: n / q,
    srcOffset: from.offset / q,
    dstOffset: to.offset / q,
    sh0: sh.slice(0, 4),
    sh1: sh.slice(4),
    ss0: ss.slice(0, 4),
    ss1: ss.slice(4),
    ds0: ds.slice(0, 4),
    ds1: ds.slice(4),
  }, Math.ceil(n / q / WG));
}

/** Most tensors {@linkcode packInto} writes in one dispatch (with the destination, within the 8 storage
 * bindings a stage has by default). */
const MAX_PACK = 7;
const packKernels = new Map<number, Kernel>();

/**
 * The pack of `k` parts: invocation i copies word i of the parts laid end to end (part j from word
 * P.e<j> on) to dst[P.at + i]. One 32-bit word each; no workgroup memory.
 */
function packKernel(k: number): Kernel {
  let kernel = packKernels.get(k);
  if (!kernel) {
    const parts = Array.from({ length: k }, (_, j) => j);
    kernel = defineKernel({
      name: `pack_${k}`,
      buffers: [
        ...parts.map((j) => ({ name: `p${j}`, type: "u32" as const, access: "read" as const })),
        { name: "dst", type: "u32", access: "read_write" },
      ],
      uniforms: [
        ["n", "u32"],
        ["at", "u32"],
        ...parts.slice(1).map((j) => [`e${j}`, "u32"] as [string, "u32"]),
      ],
      workgroupSize: WG,
      body: `
  if (gid >= P.n) { return; }
  ${
        parts.map((j) => {
          const from = j === 0 ? "gid" : `gid - P.e${j}`;
          const read = `st_dst(P.at + gid, ld_p${j}(${from}));`;
          return j === k - 1 ? read : `if (gid < P.e${j + 1}) { ${read} return; }`;
        }).join("\n  ")
      }`,
    });
    packKernels.set(k, kernel);
  }
  return kernel;
}

/**
 * Writes `parts` one after another (their elements in order, f32 or i32) into `dst` from element `at` on:
 * one dispatch for up to 7 parts, where buffer copies would each end the compute pass (buffer copies where a
 * buffer is larger than one binding window). No autograd: a raw write, as {@linkcode copyBox}.
 */
export function packInto(dst: Tensor, parts: readonly Tensor[], at = 0): void {
  if ([dst, ...parts].some((t) => t.dtype === "bf16")) {
    // the pack copies 32-bit words, one per element; a bf16 tensor holds two values a word
    throw new Error(`packInto: ${BF16_ONLY}, got ${dst} and ${parts.join(", ")}`);
  }
  const n = parts.reduce((sum, t) => sum + t.size, 0);
  if (at < 0 || at + n > dst.size) {
    throw new Error(`packInto: ${n} elements from ${at} do not fit ${dst}`);
  }
  if (parts.some((t) => t.storage.buffer === dst.storage.buffer)) {
    throw new Error("packInto: a part shares its storage with the destination");
  }
  if ([dst, ...parts].some((t) => t.storage.size > windowBytes())) {
    // a buffer bound as several windows could pass the stage's binding limit: copies instead
    for (const t of parts) {
      if (t.size > 0) recordCopy(t.storage.buffer, 0, dst.storage.buffer, 4 * at, 4 * t.size);
      at += t.size;
    }
    return;
  }
  for (let i = 0; i < parts.length; i += MAX_PACK) {
    const group = parts.slice(i, i + MAX_PACK).filter((t) => t.size > 0);
    if (group.length === 0) continue;
    const bufs: Record<string, Storage> = { dst: dst.storage };
    const u: Record<string, number> = { at };
    let end = 0;
    group.forEach((t, j) => {
      bufs[`p${j}`] = t.storage;
      if (j > 0) u[`e${j}`] = end;
      end += t.size;
    });
    u.n = end;
    dispatch(packKernel(group.length), bufs, u, Math.ceil(end / WG));
    at += end;
  }
}

/** A contiguous copy with its own storage (no autograd; one buffer copy). */
export function copy(x: Tensor): Tensor {
  const out = Tensor.empty(x.shape, x.dtype);
  if (x.size > 0) recordCopy(x.storage.buffer, 0, out.storage.buffer, 0, bytesOf(x.size, x.dtype)); // bf16: 2 per word
  return out;
}

/** The same data as a tensor outside any graph (shares storage). */
export function detach(x: Tensor): Tensor {
  return new Tensor(x.storage, x.shape, x.dtype);
}

function inferShape(x: Tensor, shape: readonly number[]): number[] {
  const s = [...shape];
  const free = s.indexOf(-1);
  if (free >= 0 && s.lastIndexOf(-1) !== free) {
    throw new Error(
      `reshape: only one dim can be -1 (inferred), got ${fmt(shape)} for shape ${fmt(x.shape)}`,
    );
  }
  if (free >= 0) {
    const known = sizeOf(s.filter((_, i) => i !== free));
    if (known === 0 || x.size % known !== 0) {
      throw new Error(
        `reshape: cannot infer -1 in ${fmt(shape)} for ${x.size} elements (shape ${fmt(x.shape)})`,
      );
    }
    s[free] = x.size / known;
  }
  checkShape(s, "reshape shape");
  if (sizeOf(s) !== x.size) {
    throw new Error(
      `reshape: shape ${fmt(shape)} has ${sizeOf(s)} elements, tensor ${fmt(x.shape)} has ${x.size}`,
    );
  }
  return s;
}

const reshapeOp = defineOp<{ shape: number[] }>({
  name: "reshape",
  forward: ([x], { shape }) => new Tensor(x.storage, shape, x.dtype),
  backward: (g, _s, [x]) => [new Tensor(g.storage, x.shape, g.dtype)],
});

/** Same data, new shape (one dim may be -1). Shares storage; free. */
export function reshape(x: Tensor, shape: readonly number[]): Tensor {
  return reshapeOp([x], { shape: inferShape(x, shape) });
}

const permuteOp: (inputs: Tensor[], attrs: { dims: number[] }) => Tensor = defineOp<{ dims: number[] }>({
  name: "permute",
  forward: ([x], { dims }) => {
    const st = stridesOf(x.shape);
    const shape = dims.map((d) => x.shape[d]);
    const out = Tensor.empty(shape, x.dtype);
    copyBox(
      x,
      { offset: 0, strides: dims.map((d) => st[d]) },
      out,
      { offset: 0, strides: stridesOf(shape) },
      shape,
    );
    return out;
  },
  backward: (g, _s, _i, { dims }) => {
    const inv = new Array<number>(dims.length);
    dims.forEach((d, i) => (inv[d] = i));
    return [permuteOp([g], { dims: inv })];
  },
});

/** Reorders dims (a copy): `out.shape[i] = x.shape[dims[i]]`. */
export function permute(x: Tensor, dims: readonly number[]): Tensor {
  const norm = dims.map((d) => normAxis(d, x.rank, "permute"));
  if (norm.length !== x.rank || new Set(norm).size !== x.rank) {
    throw new Error(
      `permute: ${JSON.stringify(dims)} is not a permutation of the ${x.rank} dims of ${fmt(x.shape)}`,
    );
  }
  return permuteOp([x], { dims: norm });
}

/** Swaps dims `dim0` and `dim1` (default the last two: -2, -1) into a copy. */
export function transpose(x: Tensor, dim0 = -2, dim1 = -1): Tensor {
  const dims = x.shape.map((_, i) => i);
  const a = normAxis(dim0, x.rank, "transpose");
  const b = normAxis(dim1, x.rank, "transpose");
  if (x.rank === 0) return permuteOp([x], { dims: [] }); // a 0-d tensor's axes 0 and -1 name it (PyTorch)
  [dims[a], dims[b]] = [dims[b], dims[a]];
  return permuteOp([x], { dims });
}

/** The box of `length` elements of dim `dim` starting at `start` inside a contiguous tensor of `shape`. */
function windowBox(shape: Shape, dim: number, start: number): Box {
  const st = stridesOf(shape);
  return { offset: start * st[dim], strides: st };
}

const narrowOp = defineOp<{ dim: number; start: number; length: number }>({
  name: "narrow",
  forward: ([x], { dim, start, length }) => {
    const shape = x.shape.map((d, i) => (i === dim ? length : d));
    const out = Tensor.empty(shape, x.dtype);
    copyBox(x, windowBox(x.shape, dim, start), out, { offset: 0, strides: stridesOf(shape) }, shape);
    return out;
  },
  // The gradient is zero outside the window: autograd writes it into place (see WindowGrad).
  backward: (g, _s, _i, { dim, start }) => [new WindowGrad(g, dim, start)],
});

/** `length` elements of `dim` starting at `start` (a copy). */
export function narrow(x: Tensor, dim: number, start: number, length: number): Tensor {
  const d = normDim(dim, x.rank, "narrow");
  if (!Number.isInteger(start) || !Number.isInteger(length)) {
    throw new Error(`narrow: start and length must be integers, got ${start} and ${length}`);
  }
  if (start < 0 || length < 0 || start + length > x.shape[d]) {
    throw new Error(
      `narrow: [${start}, ${start + length}) is outside dim ${dim} of size ${x.shape[d]} (${fmt(x.shape)})`,
    );
  }
  return narrowOp([x], { dim: d, start, length });
}

/** Python-style slice `[start, end)` along `dim`; negative indices count from the end. */
export function slice(x: Tensor, dim: number, start: number, end?: number): Tensor {
  const d = normDim(dim, x.rank, "slice");
  const n = x.shape[d];
  const s = Math.min(Math.max(start < 0 ? start + n : start, 0), n);
  const e = Math.min(Math.max(end === undefined ? n : end < 0 ? end + n : end, s), n);
  return narrow(x, d, s, e - s);
}

/** Splits along `dim` (default 0) into pieces of the given sizes, or, with a number, pieces of that size (the last may be smaller). */
export function split(x: Tensor, sizes: number | number[], dim = 0): Tensor[] {
  const d = normDim(dim, x.rank, "split");
  const n = x.shape[d];
  let list: number[];
  if (typeof sizes === "number") {
    if (!Number.isInteger(sizes) || sizes < 1) {
      throw new Error(`split: size must be a positive integer, got ${sizes}`);
    }
    list = [];
    for (let at = 0; at < n; at += sizes) list.push(Math.min(sizes, n - at));
  } else {
    list = sizes;
    if (!list.every((v) => Number.isInteger(v) && v >= 0)) {
      throw new Error(`split: sizes ${JSON.stringify(sizes)} must be non-negative integers`);
    }
    const total = list.reduce((a, b) => a + b, 0);
    if (total !== n) {
      throw new Error(`split: sizes ${JSON.stringify(sizes)} sum to ${total}, dim ${dim} has ${n}`);
    }
  }
  let at = 0;
  // freeOnThrow: the pieces made before one runs out of memory go too, also outside tidy
  return freeOnThrow(() =>
    list.map((len) => {
      const t = narrow(x, d, at, len);
      at += len;
      return t;
    })
  );
}

/**
 * Splits along `dim` (default 0) into pieces of size ceil(n / chunks) (the last may be smaller, and there may be fewer
 * than `chunks`; an empty dim gives `chunks` empty pieces, as in PyTorch); `chunks` must be a positive
 * integer.
 */
export function chunk(x: Tensor, chunks: number, dim = 0): Tensor[] {
  if (!Number.isInteger(chunks) || chunks < 1) {
    throw new Error(`chunk: the number of chunks must be a positive integer, got ${chunks}`);
  }
  const d = normDim(dim, x.rank, "chunk");
  const n = x.shape[d];
  return split(x, n === 0 ? new Array<number>(chunks).fill(0) : Math.ceil(n / chunks), d);
}

const catOp = defineOp<{ dim: number }>({
  name: "cat",
  forward: (xs, { dim }) => {
    const shape = [...xs[0].shape];
    shape[dim] = xs.reduce((n, t) => n + t.shape[dim], 0);
    const out = Tensor.empty(shape, xs[0].dtype);
    let at = 0;
    for (const t of xs) {
      copyBox(t, { offset: 0, strides: stridesOf(t.shape) }, out, windowBox(shape, dim, at), t.shape);
      at += t.shape[dim];
    }
    return out;
  },
  backward: (g, _s, xs, { dim }) => {
    let at = 0;
    return xs.map((t) => {
      const piece = t.requiresGrad ? narrowOp([g], { dim, start: at, length: t.shape[dim] }) : null;
      at += t.shape[dim];
      return piece;
    });
  },
});

/** Concatenates along `dim` (default 0); all other dims must agree. */
export function cat(tensors: Tensor[], dim = 0): Tensor {
  if (tensors.length === 0) throw new Error("cat: needs at least one tensor");
  const first = tensors[0];
  const d = normDim(dim, first.rank, "cat");
  for (const t of tensors) {
    if (
      t.rank !== first.rank || t.dtype !== first.dtype ||
      t.shape.some((s, i) => i !== d && s !== first.shape[i])
    ) {
      throw new Error(`cat: ${t} does not match ${first} outside dim ${dim}`);
    }
  }
  return catOp(tensors, { dim: d });
}

const padOp = defineOp<{ before: number[]; after: number[]; value: number }>({
  name: "pad",
  forward: ([x], { before, after, value }) => {
    const shape = x.shape.map((d, i) => d + before[i] + after[i]);
    const out = full(shape, value, { dtype: x.dtype });
    const st = stridesOf(shape);
    const offset = before.reduce((o, b, i) => o + b * st[i], 0);
    copyBox(x, { offset: 0, strides: stridesOf(x.shape) }, out, { offset, strides: st }, x.shape);
    return out;
  },
  backward: (g, _s, [x], { before }) => {
    const out = Tensor.empty(x.shape, g.dtype);
    const st = stridesOf(g.shape);
    const offset = before.reduce((o, b, i) => o + b * st[i], 0);
    copyBox(g, { offset, strides: st }, out, { offset: 0, strides: stridesOf(x.shape) }, x.shape);
    return [out];
  },
});

/**
 * Pads with `value` (default 0), PyTorch-style: `padding` lists (before, after) pairs starting from the last dim,
 * e.g. `[1, 2]` pads the last dim by 1 before and 2 after; `[0, 0, 3, 0]` pads dim -2 by 3 before.
 */
export function pad(x: Tensor, padding: number[], value = 0): Tensor {
  if (
    padding.length % 2 !== 0 || padding.length / 2 > x.rank ||
    padding.some((p) => !Number.isInteger(p) || p < 0)
  ) {
    throw new Error(
      `pad: padding ${JSON.stringify(padding)} must be non-negative pairs for at most ${x.rank} dims`,
    );
  }
  // checked here so that the error names pad, not the full() that makes the output
  if (x.dtype === "i32" && !isInt32(value)) {
    throw new Error(`pad: the value ${value} for an i32 tensor ${fmt(x.shape)} is not an int32 integer`);
  }
  const before = x.shape.map(() => 0);
  const after = x.shape.map(() => 0);
  for (let j = 0; j < padding.length / 2; j++) {
    before[x.rank - 1 - j] = padding[2 * j];
    after[x.rank - 1 - j] = padding[2 * j + 1];
  }
  return padOp([x], { before, after, value });
}

const expandOp = defineOp<{ shape: number[] }>({
  name: "expand",
  forward: ([x], { shape }) => mapOp("a", [x], shape, x.dtype),
  backward: (g, _s, [x]) => [sumToShape(g, x.shape)],
});

/** Broadcasts to `shape` (a copy); -1 keeps a dim. */
export function expand(x: Tensor, shape: readonly number[]): Tensor {
  const lead = shape.length - x.rank;
  if (lead < 0) throw new Error(`expand: ${fmt(shape)} has fewer dims than ${fmt(x.shape)}`);
  const full = shape.map((d, i) => (d === -1 && i >= lead ? x.shape[i - lead] : d));
  checkShape(full, "expand shape");
  x.shape.forEach((d, i) => {
    if (d !== 1 && d !== full[i + lead]) {
      throw new Error(`expand: cannot expand ${fmt(x.shape)} to ${fmt(shape)}`);
    }
  });
  return expandOp([x], { shape: full });
}
