/**
 * The Tensor: a shape, a dtype and a GPU storage, plus autograd links; and the lifetime rules.
 *
 * Tensors are freed explicitly: `t.dispose()`, or `tidy(fn)`, which disposes every tensor created inside
 * `fn` except those it returns (and those marked with `keep`). Parameters and gradients are kept.
 * @module
 */

import { unpackBF16 } from "./bf16.ts";
import { readBuffer } from "./executor.ts";
import { allocStorage, countTensor, releaseStorage, type Storage } from "./memory.ts";
import { fmt, type Shape, sizeOf } from "./shape.ts";
import { type BackwardOptions, type GradNode, releaseIfUnconsumed, releaseNode } from "./autograd.ts";
import * as ops from "./ops/index.ts";

/**
 * Element types: 32-bit floats, 32-bit integers, and bfloat16 (two per word, core/bf16.ts), a storage format
 * for weights that inference only reads: matmul's second operand and the embedding's table take it (their
 * kernels unpack it and compute in f32); other ops refuse it, and it takes no gradient.
 */
export type DType = "f32" | "i32" | "bf16";

/** Throws unless `dtype` is one of the element types (a misspelt one went down the i32 path or into WGSL). */
export function checkDType(dtype: unknown, what: string): asserts dtype is DType {
  if (dtype !== "f32" && dtype !== "i32" && dtype !== "bf16") {
    throw new Error(`${what} must be "f32", "i32" or "bf16", got ${JSON.stringify(dtype) ?? String(dtype)}`);
  }
}

/** A method's dims given as numbers or as one list (PyTorch takes both). */
function dimsOf(args: number[] | [readonly number[]]): number[] {
  return args.length === 1 && Array.isArray(args[0]) ? [...args[0]] : args as number[];
}

/** Bytes of `size` elements of `dtype` (bf16: whole words of two). */
export function bytesOf(size: number, dtype: DType): number {
  return dtype === "bf16" ? 4 * Math.ceil(size / 2) : 4 * size;
}

/** A scalar or a tensor operand of a binary op. */
export type Operand = Tensor | number;

let nextId = 1;

/** The most elements a tensor may have: kernels index in u32. */
const MAX_ELEMENTS = 2 ** 32 - 1;

const scopes: Set<Tensor>[] = [];

/** Tensors made inside the outermost {@linkcode freeOnThrow} running, else null (no cost outside one). */
let made: Tensor[] | null = null;

/**
 * Runs `fn` (an op's forward, a backward pass) and, if it throws part-way (out of memory under a limit, a
 * check after the first allocation), disposes the tensors it made that are neither disposed nor kept, so
 * that a caught error leaks nothing, inside tidy or not. Nested calls share the outermost one's list.
 */
export function freeOnThrow<T>(fn: () => T): T {
  const outermost = made === null;
  const list = made ??= [];
  const mark = list.length;
  try {
    return fn();
  } catch (e) {
    for (const t of list.slice(mark)) if (!t.disposed && !t.kept) t.dispose();
    throw e;
  } finally {
    if (outermost) made = null;
  }
}

/** The id the next tensor gets: every tensor made from now on has this id or a higher one. */
export function nextTensorId(): number {
  return nextId;
}

/** An n-dimensional array on the GPU. */
export class Tensor {
  /** Unique id (for debugging and autograd bookkeeping). */
  readonly id: number = nextId++;
  /** Dimensions, outermost first. */
  readonly shape: readonly number[];
  /** Element type. */
  readonly dtype: DType;
  /** Number of elements. */
  readonly size: number;
  /** Whether gradients flow to this tensor. */
  requiresGrad = false;
  /** Accumulated gradient after `backward()` (a kept tensor), or null. */
  grad: Tensor | null = null;
  /** The autograd record that produced this tensor (null for leaves and after backward). */
  node: GradNode | null = null;
  /** Kept tensors survive `tidy`. */
  kept = false;
  #storage: Storage | null;
  /** Made by `hollow`: a shape without values. */
  #hollow = false;

  /** Wraps a storage; use the creation functions (`tensor`, `zeros`, ...) instead. */
  constructor(storage: Storage, shape: Shape, dtype: DType) {
    this.#storage = storage;
    storage.users++;
    this.shape = Object.freeze(shape.slice()); // slice: no iterator, unlike a spread
    this.dtype = dtype;
    if (dtype === "bf16") storage.bf16 = true; // kernels read it through unpacking accessors
    this.size = sizeOf(shape);
    countTensor(1);
    scopes[scopes.length - 1]?.add(this);
    made?.push(this);
  }

  /** Allocates an uninitialised tensor (kernels fill it). */
  static empty(shape: Shape, dtype: DType = "f32"): Tensor {
    checkDType(dtype, "Tensor.empty: dtype");
    const n = sizeOf(shape);
    // kernels count elements, offsets and strides in u32 (WGSL's index type): past it they would wrap
    if (n > MAX_ELEMENTS && n < Infinity) { // (NaN and Infinity: not a size, said below)
      throw new Error(
        `cannot allocate ${dtype} ${fmt(shape)}: ${n} elements, more than 2^32 - 1 in one tensor`,
      );
    }
    return new Tensor(
      allocStorage(Math.max(bytesOf(n, dtype), 4), () => `${dtype} ${fmt(shape)}`),
      shape,
      dtype,
    );
  }

  /**
   * A tensor with a shape and no values (it holds the smallest pooled buffer, 256 bytes): what an op's
   * `replay` returns, since a checkpoint's rerun only backpropagates from that output. Anything that reads it
   * (its `storage`: an op, a kernel, `toArray`) throws.
   */
  static hollow(shape: Shape, dtype: DType = "f32"): Tensor {
    const t = new Tensor(allocStorage(4, () => `hollow ${dtype} ${fmt(shape)}`), shape, dtype);
    t.#hollow = true;
    return t;
  }

  /** The storage; throws a clear error if the tensor was disposed or is hollow. */
  get storage(): Storage {
    if (!this.#storage || this.#hollow) {
      throw new Error(
        `Tensor#${this.id} ${fmt(this.shape)} ${this.dtype} ${
          this.#storage
            ? "holds no values (Tensor.hollow: the output of an op that a checkpoint's rerun replayed)"
            : "was disposed"
        } and cannot be used`,
      );
    }
    return this.#storage;
  }

  /** Whether the tensor was made by {@linkcode Tensor.hollow}: a shape without values. */
  get hollow(): boolean {
    return this.#hollow;
  }

  /** Whether `dispose()` has been called. */
  get disposed(): boolean {
    return this.#storage === null;
  }

  /** Number of dimensions. */
  get rank(): number {
    return this.shape.length;
  }

  /** Frees the tensor's GPU memory (when no view shares it). Safe to call twice. */
  dispose(): void {
    const s = this.#storage;
    if (!s) return;
    this.#storage = null;
    countTensor(-1);
    if (--s.users === 0) releaseStorage(s);
    // A node no other node consumes goes now; one still consumed stays (with its tensor listed in its scope)
    // until its consumers are released or its tidy scope ends. A leaf with a .grad stays listed too: the
    // scope's end frees the gradient (kept, it has no other owner), or hands it on where it is returned.
    releaseIfUnconsumed(this);
    if (!this.node && !this.grad) { for (const scope of scopes) scope.delete(this); }
  }

  /** Reads the data back: Float32Array for f32 and bf16 (its values, exactly), Int32Array for i32. */
  async toArray(): Promise<Float32Array | Int32Array> {
    const buf = await readBuffer(this.storage.buffer, 0, bytesOf(this.size, this.dtype));
    if (this.dtype === "bf16") return unpackBF16(new Uint32Array(buf), this.size);
    return this.dtype === "f32" ? new Float32Array(buf) : new Int32Array(buf);
  }

  /** Reads a one-element tensor as a number. */
  async item(): Promise<number> {
    if (this.size !== 1) {
      throw new Error(`item() needs a tensor with one element, got shape ${fmt(this.shape)}`);
    }
    return (await this.toArray())[0];
  }

  /** Human-readable summary (no readback). */
  toString(): string {
    return `Tensor(${fmt(this.shape)}, ${this.dtype}${this.requiresGrad ? ", requiresGrad" : ""})`;
  }

  /** Computes gradients of this scalar (or of `sum(this * grad)`) w.r.t. every leaf that requires grad;
   * `{ retainGraph: true }` keeps the graph for another backward (PyTorch's `retain_graph`). */
  backward(grad?: Tensor, options: BackwardOptions = {}): void {
    ops.backward(this, grad, options);
  }

  /** A new tensor with the same data that is not part of any graph. */
  detach(): Tensor {
    return ops.detach(this);
  }

  /** Sets `requiresGrad` (default true: `t.requiresGrad_()` makes `t` a leaf that collects gradients) and
   * returns this tensor. Only f32 tensors can require grad. */
  requiresGrad_(value = true): this {
    if (typeof value !== "boolean") {
      throw new Error(
        `requiresGrad_: the value must be a boolean, got ${JSON.stringify(value) ?? String(value)}`,
      );
    }
    if (value && this.dtype !== "f32") {
      throw new Error(`only f32 tensors can require grad, got ${this.dtype}`);
    }
    this.requiresGrad = value;
    return this;
  }

  // ---- op methods: each delegates to the free function of the same name in core/ops ----
  /** `-x` */
  neg(): Tensor {
    return ops.neg(this);
  }
  /** `e^x` */
  exp(): Tensor {
    return ops.exp(this);
  }
  /** Natural logarithm. */
  log(): Tensor {
    return ops.log(this);
  }
  /** Square root. */
  sqrt(): Tensor {
    return ops.sqrt(this);
  }
  /** `1 / sqrt(x)` */
  rsqrt(): Tensor {
    return ops.rsqrt(this);
  }
  /** `x * x` */
  square(): Tensor {
    return ops.square(this);
  }
  /** Absolute value. */
  abs(): Tensor {
    return ops.abs(this);
  }
  /** Logistic sigmoid. */
  sigmoid(): Tensor {
    return ops.sigmoid(this);
  }
  /** `x * sigmoid(x)` */
  silu(): Tensor {
    return ops.silu(this);
  }
  /** `log(1 + e^x)`, stable. */
  softplus(): Tensor {
    return ops.softplus(this);
  }
  /** Hyperbolic tangent. */
  tanh(): Tensor {
    return ops.tanh(this);
  }
  /** `max(x, 0)` */
  relu(): Tensor {
    return ops.relu(this);
  }
  /** Elementwise sum with broadcasting. */
  add(other: Operand): Tensor {
    return ops.add(this, other);
  }
  /** Elementwise difference with broadcasting. */
  sub(other: Operand): Tensor {
    return ops.sub(this, other);
  }
  /** Elementwise product with broadcasting. */
  mul(other: Operand): Tensor {
    return ops.mul(this, other);
  }
  /** Elementwise quotient with broadcasting. */
  div(other: Operand): Tensor {
    return ops.div(this, other);
  }
  /** Elementwise power with broadcasting. */
  pow(other: Operand): Tensor {
    return ops.pow(this, other);
  }
  /** Elementwise maximum with broadcasting. */
  maximum(other: Operand): Tensor {
    return ops.maximum(this, other);
  }
  /** Elementwise minimum with broadcasting. */
  minimum(other: Operand): Tensor {
    return ops.minimum(this, other);
  }
  /** Clamps into `[min, max]`; an omitted bound is ±3.4e38 (the f32 maximum), so infinities are clamped too. */
  clamp(min?: number, max?: number): Tensor {
    return ops.clamp(this, min, max);
  }
  /** Sum over `dim` (one or several; all when omitted). */
  sum(dim?: number | number[], keepdim = false): Tensor {
    return ops.sum(this, dim, keepdim);
  }
  /** Mean over `dim` (one or several; all when omitted). */
  mean(dim?: number | number[], keepdim = false): Tensor {
    return ops.mean(this, dim, keepdim);
  }
  /** Maximum over `dim` (one or several; all when omitted). */
  max(dim?: number | number[], keepdim = false): Tensor {
    return ops.max(this, dim, keepdim);
  }
  /** `log(sum(exp(x)))` over `dim`, stable. */
  logsumexp(dim: number, keepdim = false): Tensor {
    return ops.logsumexp(this, dim, keepdim);
  }
  /** Matrix product (batched, broadcasting leading dims). */
  matmul(other: Tensor, options?: ops.MatmulOptions): Tensor {
    return ops.matmul(this, other, options);
  }
  /** Same data, new shape (one dim may be -1), given as numbers or one list (`reshape(3, 2)`,
   * `reshape([3, 2])`, as PyTorch). Shares storage. */
  reshape(...shape: number[] | [readonly number[]]): Tensor {
    return ops.reshape(this, dimsOf(shape));
  }
  /** Alias of `reshape` (tensors are always contiguous). */
  view(...shape: number[] | [readonly number[]]): Tensor {
    return ops.reshape(this, dimsOf(shape));
  }
  /** Swaps two dims (a copy). */
  transpose(dim0 = -2, dim1 = -1): Tensor {
    return ops.transpose(this, dim0, dim1);
  }
  /** Reorders dims (a copy), given as numbers or one list. */
  permute(...dims: number[] | [readonly number[]]): Tensor {
    return ops.permute(this, dimsOf(dims));
  }
  /** `length` elements of `dim` from `start`. */
  narrow(dim: number, start: number, length: number): Tensor {
    return ops.narrow(this, dim, start, length);
  }
  /** Python-style slice `[start, end)` along `dim`. */
  slice(dim: number, start: number, end?: number): Tensor {
    return ops.slice(this, dim, start, end);
  }
  /** Splits along `dim` into pieces of the given sizes (or, with a number, pieces of that size). */
  split(sizes: number | number[], dim = 0): Tensor[] {
    return ops.split(this, sizes, dim);
  }
  /** Splits along `dim` into pieces of ceil(size / chunks) (the last smaller): at most `chunks` pieces, fewer
   * where that size covers the dim sooner (6 into 4 gives 3 of 2), as torch.chunk. */
  chunk(chunks: number, dim = 0): Tensor[] {
    return ops.chunk(this, chunks, dim);
  }
  /** Broadcasts to a larger shape (a copy), given as numbers or one list. */
  expand(...shape: number[] | [readonly number[]]): Tensor {
    return ops.expand(this, dimsOf(shape));
  }
  /** Softmax over `dim` (default last). */
  softmax(dim = -1): Tensor {
    return ops.softmax(this, dim);
  }
  /** Log-softmax over `dim` (default last). */
  logSoftmax(dim = -1): Tensor {
    return ops.logSoftmax(this, dim);
  }
}

/**
 * Runs `fn`; afterwards disposes every tensor it created, except the ones it returns or `keep`s, and with a
 * leaf it disposes (or one that `fn` disposed) the leaf's `.grad`. A `.grad` it returns is no longer kept: it
 * moves on as any returned tensor (the disposed leaf still names it as its `.grad`). The graph through the disposed
 * intermediates goes with them (their saved tensors are freed): run `backward()` inside the tidy, or `keep()`
 * the tensors it must pass through. `fn` must be synchronous: an async `fn` (one that returns a Promise)
 * throws, since its tensors would be freed before it awaits; await readbacks such as
 * `item()` outside of tidy. Tensors it returns move to the enclosing tidy, if any, else the caller disposes them.
 * Returned tensors are found at any depth in arrays, Sets, Maps and objects (their own enumerable properties).
 */
export function tidy<T>(fn: () => T): T {
  const scope = new Set<Tensor>();
  scopes.push(scope);
  let result: T;
  try {
    result = fn();
    if (result instanceof Promise) {
      // fn resumes after its await with its tensors freed: that failure is this error's, not an unhandled
      // rejection (which ends a Deno process)
      result.catch(() => {});
      throw new Error("tidy(fn) needs a synchronous fn: await readbacks outside of tidy");
    }
  } catch (e) {
    // Free what fn made before it failed (and its graph); otherwise every tensor of a failed step leaks.
    scopes.pop();
    for (const t of scope) if (!t.kept) free(t, null);
    throw e;
  }
  scopes.pop();
  const returned = new Set<Tensor>();
  collectTensors(result, returned);
  for (const t of scope) {
    if (returned.has(t)) scopes[scopes.length - 1]?.add(t);
    else if (!t.kept) free(t, returned);
  }
  return result;
}

/** Frees a tensor of a tidy scope, and a leaf's gradient with it (kept, as every gradient is, it has no owner
 * left) unless `returned` holds it: that one becomes an ordinary tensor of the enclosing scope, as any
 * returned tensor. The scope's graph ends with it: nodes of its intermediates stop holding saved tensors. */
function free(t: Tensor, returned: Set<Tensor> | null): void {
  if (t.grad && returned?.has(t.grad)) { // (the leaf goes on naming it: code that kept the leaf reads it)
    t.grad.kept = false;
    scopes[scopes.length - 1]?.add(t.grad);
  } else if (t.grad) {
    t.grad.dispose();
    t.grad = null;
  }
  t.dispose();
  releaseNode(t, "tidy");
}

function collectTensors(value: unknown, into: Set<Tensor>, seen = new Set<unknown>()): void {
  // Walks arrays, Sets, Maps (keys and values) and any other object's own enumerable properties (plain,
  // null-prototype or class instances), at any depth; `seen` guards against cycles. Typed arrays and
  // buffers hold numbers only: not walked element by element.
  if (value instanceof Tensor) {
    into.add(value);
    return;
  }
  if (!value || typeof value !== "object" || seen.has(value)) return;
  if (ArrayBuffer.isView(value) || value instanceof ArrayBuffer) return;
  seen.add(value);
  if (Array.isArray(value) || value instanceof Set) { for (const v of value) collectTensors(v, into, seen); }
  else if (value instanceof Map) {
    for (const [k, v] of value) {
      collectTensors(k, into, seen);
      collectTensors(v, into, seen);
    }
  } else for (const v of Object.values(value)) collectTensors(v, into, seen);
}

/** Marks a tensor as kept: no `tidy` disposes it (it still can be disposed explicitly). Returns it. */
export function keep<T extends Tensor>(t: T): T {
  if (!(t instanceof Tensor)) {
    throw new Error(`keep: expected a Tensor, got ${t === null ? "null" : typeof t}`);
  }
  t.kept = true;
  for (const scope of scopes) scope.delete(t);
  return t;
}

/**
 * Takes a tensor out of every tidy scope without keeping it: its owner disposes it (an autograd node, for
 * the tensors it made for its backward, which must live as long as the node, not as the scope).
 */
export function unscope(t: Tensor): void {
  for (const scope of scopes) scope.delete(t);
}

/** Puts a tensor into the innermost tidy scope, which then frees it unless it is returned or kept: for one made
 * in an inner scope and taken out of it with {@linkcode unscope} (a checkpoint's first pass). */
export function rescope(t: Tensor): void {
  scopes[scopes.length - 1]?.add(t);
}

/** Disposes every tensor found in a value: a tensor, or arrays, Sets, Maps and objects holding tensors at any
 * depth (as `tidy` finds what it returns). */
export function dispose(value: unknown): void {
  const found = new Set<Tensor>();
  collectTensors(value, found);
  for (const t of found) t.dispose();
}
