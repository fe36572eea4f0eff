/**
 * Shape arithmetic shared by the ops: sizes, strides, broadcasting and axis normalisation.
 * @module
 */

/** A tensor shape. */
export type Shape = readonly number[];

/** Highest rank the generic kernels handle (their strides travel in two vec4 uniforms). */
export const MAX_RANK = 8;

/** Number of elements of a shape. */
export function sizeOf(shape: Shape): number {
  // an indexed loop: for-of allocated an iterator result per element where V8 did not inline it (about 6 KB
  // of garbage per layer step, V8's sampling heap profiler)
  let n = 1;
  for (let i = 0; i < shape.length; i++) n *= shape[i];
  return n;
}

/** Whether two shapes are equal, dim by dim. */
export function sameShape(a: Shape, b: Shape): boolean {
  if (a.length !== b.length) return false;
  for (let i = 0; i < a.length; i++) if (a[i] !== b[i]) return false;
  return true;
}

/** Row-major strides of a contiguous tensor. */
export function stridesOf(shape: Shape): number[] {
  const s = new Array<number>(shape.length);
  let acc = 1;
  for (let i = shape.length - 1; i >= 0; i--) {
    s[i] = acc;
    acc *= shape[i];
  }
  return s;
}

/** `[2, 3]` as text, for error messages. */
export function fmt(shape: Shape): string {
  return `[${shape.join(", ")}]`;
}

/** Whether `v` is an integer that int32 holds (-2^31 .. 2^31 - 1). */
export function isInt32(v: number): boolean {
  return Number.isInteger(v) && v >= -(2 ** 31) && v < 2 ** 31;
}

/** Checks that a shape is a list of non-negative integers. */
export function checkShape(shape: Shape, what = "shape"): void {
  if (!Array.isArray(shape) || shape.some((d) => !Number.isInteger(d) || d < 0)) {
    // numbers as written (JSON would show NaN and Infinity as null), anything else as JSON ("3")
    const got = Array.isArray(shape)
      ? `[${shape.map((d) => (typeof d === "number" ? String(d) : JSON.stringify(d))).join(", ")}]`
      : JSON.stringify(shape);
    throw new Error(`${what} must be a list of non-negative integers, got ${got}`);
  }
  if (shape.length > MAX_RANK) {
    throw new Error(`${what} ${fmt(shape)} has rank ${shape.length} > ${MAX_RANK}`);
  }
}

/** NumPy broadcasting of two shapes; the error names both. */
export function broadcastShapes(a: Shape, b: Shape, op = "op"): number[] {
  const n = Math.max(a.length, b.length);
  const out = new Array<number>(n);
  for (let i = 0; i < n; i++) {
    const x = a[a.length - n + i] ?? 1;
    const y = b[b.length - n + i] ?? 1;
    if (x !== y && x !== 1 && y !== 1) {
      throw new Error(
        `${op}: shapes ${fmt(a)} and ${fmt(b)} cannot be broadcast together (dim ${i}: ${x} vs ${y})`,
      );
    }
    out[i] = x === 1 ? y : x;
  }
  return out;
}

/** Strides to read a tensor of shape `from` as if broadcast to `to` (0 along broadcast dims). */
export function broadcastStrides(from: Shape, to: Shape): number[] {
  const s = stridesOf(from);
  const off = to.length - from.length;
  return to.map((_, i) => (i < off || from[i - off] === 1 ? 0 : s[i - off]));
}

/** Resolves a possibly negative dim (an axis); the error names the dim and the rank. */
export function normAxis(axis: number, rank: number, op = "op"): number {
  // As PyTorch, a 0-d tensor's axes wrap as a vector's: 0 and -1 both name it (reductions, softmax).
  const r = Math.max(rank, 1);
  const a = axis < 0 ? axis + r : axis;
  if (!Number.isInteger(axis)) throw new Error(`${op}: dim ${axis} is not an integer`);
  if (a < 0 || a >= r) {
    throw new Error(`${op}: dim ${axis} is out of range for a tensor of rank ${rank}`);
  }
  return a;
}

/** {@linkcode normAxis} for ops that need a real dim to cut, join or index along; a 0-d tensor has none. */
export function normDim(dim: number, rank: number, op: string): number {
  if (rank === 0) throw new Error(`${op}: needs a tensor of rank >= 1 (dim ${dim}), got a 0-d tensor`);
  return normAxis(dim, rank, op);
}

/** Pads shape/stride lists to {@linkcode MAX_RANK} entries (leading 1s / 0s), as the kernels expect. */
export function padRank(values: readonly number[], fill: number): number[] {
  return [...new Array<number>(MAX_RANK - values.length).fill(fill), ...values];
}
