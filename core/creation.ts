/**
 * Creating tensors: from host data, constants, ranges and seeded random numbers.
 * @module
 */

import { recordClear, upload } from "./executor.ts";
import { checkHostFill } from "./memory.ts";
import { checkShape, fmt, isInt32, type Shape, sizeOf } from "./shape.ts";
import { bytesOf, checkDType, type DType, Tensor } from "./tensor.ts";
import { packBF16 } from "./bf16.ts";
import { mapOp } from "./ops/map_kernel.ts";
import { fillNormal, fillUniform, streamFor } from "./random.ts";

/** Options of the creation functions. */
export interface CreateOptions {
  /** Element type (default f32, or i32 for Int32Array data; arange: i32 when start and step are integers). */
  dtype?: DType;
  /** Make the tensor a leaf that collects gradients. */
  requiresGrad?: boolean;
}

/** Options of the random creation functions (always f32, so no `dtype`). */
export interface RandomOptions extends Omit<CreateOptions, "dtype"> {
  /** Seed of this call's own stream; without it the global generator (see `manualSeed`) is used. */
  seed?: number;
}

/** Nested arrays of numbers, as accepted by {@linkcode tensor}. */
export type NestedArray = number | readonly NestedArray[];

function inferShape(data: NestedArray): number[] {
  const shape: number[] = [];
  let cur: NestedArray = data;
  while (Array.isArray(cur)) {
    shape.push(cur.length);
    cur = cur[0] ?? 0;
  }
  return shape;
}

/** The shape of nested arrays (the lengths along the first elements) and their values in order. Throws on
 * ragged or mixed-depth nesting, naming the dim and the lengths seen, as PyTorch's "expected sequence of
 * length 2 at dim 1 (got 1)". */
function flattenNested(data: readonly NestedArray[]): { shape: number[]; flat: number[] } {
  const shape = inferShape(data);
  const flat: number[] = [];
  const at: number[] = []; // index path of the element being walked, for errors
  const where = () => `data${at.map((i) => `[${i}]`).join("")}`;
  const walk = (v: NestedArray, d: number): void => {
    if (d === shape.length) {
      if (Array.isArray(v)) {
        throw new Error(
          `tensor: nested arrays of mixed depth: expected a number at ${where()} (dim ${d} of shape ` +
            `${fmt(shape)}), got an array of length ${v.length}`,
        );
      }
      if (typeof v !== "number") {
        throw new Error(`tensor: expected a number at ${where()}, got ${describeValue(v)}`);
      }
      flat.push(v);
      return;
    }
    const first = `data${"[0]".repeat(d)}`;
    if (!Array.isArray(v)) {
      throw new Error(
        `tensor: nested arrays of mixed depth: expected a sequence of length ${shape[d]} at dim ${d} ` +
          `(as ${first}), got ${typeof v === "number" ? `the number ${v}` : describeValue(v)} at ${where()}`,
      );
    }
    if (v.length !== shape[d]) {
      const want = `expected a sequence of length ${shape[d]} at dim ${d} (as ${first})`;
      throw new Error(`tensor: ragged nested arrays: ${want}, got length ${v.length} at ${where()}`);
    }
    for (let i = 0; i < v.length; i++) {
      at.push(i);
      walk(v[i], d + 1);
      at.pop();
    }
  };
  walk(data, 0);
  return { shape, flat };
}

/** What a value that is not a number is, for errors. */
function describeValue(v: unknown): string {
  if (ArrayBuffer.isView(v)) return `a ${v.constructor.name} (convert it: Float32Array.from(data))`;
  if (v === null || v === undefined) return String(v);
  if (typeof v === "string") return `the string ${JSON.stringify(v)}`;
  if (typeof v !== "object") return `${typeof v} ${String(v)}`;
  return `an object (${(v as object).constructor?.name ?? "null prototype"})`;
}

function finish(t: Tensor, options: CreateOptions): Tensor {
  if (options.requiresGrad) t.requiresGrad_(true);
  return t;
}

/** The dtype and requiresGrad_'s checks, before the tensor is made (an i32 tensor made first would be left
 * live). */
function checkCreateOptions(dtype: DType, options: CreateOptions): void {
  checkDType(dtype, "dtype");
  if (options.requiresGrad !== undefined && typeof options.requiresGrad !== "boolean") {
    throw new Error(`requiresGrad must be a boolean, got ${describeValue(options.requiresGrad)}`);
  }
  if (options.requiresGrad && dtype !== "f32") {
    throw new Error(`only f32 tensors can require grad, got ${dtype}`);
  }
}

/**
 * A tensor from host data: a typed array or flat array with a `shape`, or nested arrays (shape inferred).
 * Integers in an Int32Array give an i32 tensor unless `dtype` says otherwise.
 */
export function tensor(
  data: Float32Array | Int32Array | readonly number[] | NestedArray,
  shape?: Shape,
  options: CreateOptions = {},
): Tensor {
  const dtype = options.dtype ?? (data instanceof Int32Array ? "i32" : "f32");
  checkCreateOptions(dtype, options);
  let flat: ArrayLike<number>;
  let inferred: number[];
  if (data instanceof Float32Array || data instanceof Int32Array) [flat, inferred] = [data, [data.length]];
  else if (typeof data === "number") [flat, inferred] = [[data], []];
  else if (!Array.isArray(data)) {
    throw new Error(
      `tensor: data must be a Float32Array, an Int32Array, a number or (nested) arrays of numbers, got ` +
        describeValue(data),
    );
  } else ({ flat, shape: inferred } = flattenNested(data as readonly NestedArray[]));
  const s = shape ?? inferred;
  checkShape(s, "tensor: shape");
  if (sizeOf(s) !== flat.length) {
    throw new Error(`tensor: shape ${fmt(s)} needs ${sizeOf(s)} values, got ${flat.length}`);
  }
  if (dtype === "i32" && !(flat instanceof Int32Array)) {
    for (let i = 0; i < flat.length; i++) {
      if (!isInt32(flat[i])) throw new Error(`tensor: i32 data has ${flat[i]} at ${i}, not an int32 integer`);
    }
  }
  const host = dtype === "bf16"
    ? packBF16(flat) // rounded to nearest even, two per word
    : dtype === "f32"
    ? (flat instanceof Float32Array ? flat : Float32Array.from(flat))
    : (flat instanceof Int32Array ? flat : Int32Array.from(flat));
  const t = Tensor.empty(s, dtype);
  upload(t.storage.buffer, 0, host);
  return finish(t, options);
}

/** A tensor filled with `value`. */
export function full(shape: Shape, value: number, options: CreateOptions = {}): Tensor {
  return filled("full", shape, value, options);
}

/** full(), with errors naming `op` (the function the caller called). */
function filled(op: string, shape: Shape, value: number, options: CreateOptions): Tensor {
  checkShape(shape, `${op}: shape`);
  const dtype = options.dtype ?? "f32";
  checkCreateOptions(dtype, options);
  if (dtype === "i32" && !isInt32(value)) {
    throw new Error(`${op}: i32 fill value ${value} is not an int32 integer`);
  }
  if (value === 0 && !Object.is(value, -0)) return finish(cleared(shape, dtype), options);
  if (dtype === "bf16") {
    checkHostFill(bytesOf(sizeOf(shape), dtype), () => `${op} bf16 ${fmt(shape)}`); // before the host array
    return tensor(new Float32Array(sizeOf(shape)).fill(value), shape, { dtype });
  }
  return finish(mapOp("a", [value], shape, dtype, [dtype]), options);
}

/** Zeros by clearing the buffer (a memset on the queue, no kernel): 0.0 and 0 are both all-zero bits. */
function cleared(shape: Shape, dtype: DType): Tensor {
  const t = Tensor.empty(shape, dtype);
  if (t.size > 0) recordClear(t.storage.buffer, 0, bytesOf(t.size, dtype));
  return t;
}

/** A tensor of zeros. */
export function zeros(shape: Shape, options: CreateOptions = {}): Tensor {
  return filled("zeros", shape, 0, options);
}

/** A tensor of ones. */
export function ones(shape: Shape, options: CreateOptions = {}): Tensor {
  return filled("ones", shape, 1, options);
}

/** Zeros with another tensor's shape and dtype. */
export function zerosLike(t: Tensor): Tensor {
  return full(t.shape, 0, { dtype: t.dtype });
}

/** Ones with another tensor's shape and dtype. */
export function onesLike(t: Tensor): Tensor {
  return full(t.shape, 1, { dtype: t.dtype });
}

/**
 * `[start, start + step, ...)` below `end`, like `torch.arange`; `arange(n)` counts 0..n-1.
 * Without `options.dtype` the result is i32 when `start` and `step` are integers (so `arange(5)` is i32,
 * and cannot require grad) and f32 otherwise; pass `{ dtype: "f32" }` for float values from integer bounds.
 */
export function arange(start: number, end?: number, step = 1, options: CreateOptions = {}): Tensor {
  if (end === undefined) [start, end] = [0, start];
  // named here: a NaN or infinite bound would otherwise surface as a bad length or shape
  for (const [name, v] of [["start", start], ["end", end], ["step", step]] as const) {
    if (!Number.isFinite(v)) throw new Error(`arange: ${name} must be a finite number, got ${v}`);
  }
  if (step === 0) throw new Error("arange: step must not be 0");
  const n = Math.max(0, Math.ceil((end - start) / step));
  const dtype = options.dtype ?? (Number.isInteger(start) && Number.isInteger(step) ? "i32" : "f32");
  if (dtype === "i32" && n > 0 && ![start, step, start + (n - 1) * step].every(isInt32)) {
    throw new Error(`arange: i32 values from ${start} by ${step} (${n} of them) do not fit int32`);
  }
  checkHostFill(4 * n, () => `arange ${dtype} [${n}]`);
  const host = dtype === "i32" ? new Int32Array(n) : new Float32Array(n); // (bf16 rounds from f32)
  for (let i = 0; i < n; i++) host[i] = start + i * step;
  return tensor(host, [n], { ...options, dtype });
}

/** Normal samples (mean 0, std 1 unless given), seeded and identical on every adapter. */
export function randn(shape: Shape, options: RandomOptions & { mean?: number; std?: number } = {}): Tensor {
  checkShape(shape, "randn: shape");
  const { mean = 0, std = 1 } = options;
  if (!Number.isFinite(mean) || !(std >= 0 && std < Infinity)) {
    throw new Error(
      `randn: mean must be finite and std finite and >= 0 (as torch.normal), got ${mean}, ${std}`,
    );
  }
  checkHostFill(4 * sizeOf(shape), () => `randn f32 ${fmt(shape)}`); // before the host array is filled
  const host = fillNormal(
    streamFor(options.seed),
    new Float32Array(sizeOf(shape)),
    options.mean,
    options.std,
  );
  return tensor(host, shape, { ...options, dtype: "f32" });
}

/** Uniform samples in [low, high) (default [0, 1)), seeded and identical on every adapter. */
export function rand(shape: Shape, options: RandomOptions & { low?: number; high?: number } = {}): Tensor {
  checkShape(shape, "rand: shape");
  const { low = 0, high = 1 } = options;
  if (!(Number.isFinite(low) && Number.isFinite(high) && low <= high)) {
    throw new Error(
      `rand: [low, high) must be finite with low <= high (as torch's uniform_), got [${low}, ${high})`,
    );
  }
  checkHostFill(4 * sizeOf(shape), () => `rand f32 ${fmt(shape)}`);
  const host = fillUniform(
    streamFor(options.seed),
    new Float32Array(sizeOf(shape)),
    options.low,
    options.high,
  );
  return tensor(host, shape, { ...options, dtype: "f32" });
}
