/**
 * GPU memory: the buffer pool and the runtime's byte counters.
 *
 * Every tensor's data lives in a {@linkcode Storage}: one GPUBuffer, shared by views (reshape) of the same
 * data. Freed buffers go back to a pool keyed by their size class and are reused; `memory()` reports exact
 * counts of the bytes allocated (each buffer's size class, which may round a tensor's bytes up), from these
 * counters, which tests use to prove that nothing leaks.
 * @module
 */

import { deviceInfo, gpuDevice, GPUError } from "./device.ts";

/** Byte counts from the runtime's own allocator. */
export interface MemoryInfo {
  /** Bytes held by live tensors' buffers (each its size class: 256-byte multiples up to 1 MiB). */
  liveBytes: number;
  /** Highest `liveBytes` since start or the last {@linkcode resetPeak}. */
  peakBytes: number;
  /** Bytes in freed buffers kept for reuse. */
  pooledBytes: number;
  /** Number of live tensors (views of one buffer count once each). */
  liveTensors: number;
  /** Bytes of distinct buffers that autograd keeps for the backward pass. */
  savedBytes: number;
}

/** GPU memory that holds one tensor's data; views share it. */
export class Storage {
  /** The buffer; its size is the size class of `bytes`. */
  readonly buffer: GPUBuffer;
  /** Bytes the data needs (the buffer may be a little larger). */
  readonly bytes: number;
  /** The buffer's size in bytes, kept here: reading `buffer.size` is a call into Deno's native WebGPU, and
   * every dispatch needs the sizes of the buffers it binds. */
  readonly size: number;
  /** The buffer's id, unique for the process (`bufferId`): caches keyed by bound buffers (the
   * bind groups) hash numbers, not strings, on every dispatch. */
  readonly bufferId: number;
  /** Tensors that use this storage; it returns to the pool when the last is disposed. */
  users = 0;
  /** Autograd nodes that keep this storage for the backward pass. */
  savedBy = 0;
  /** Set once the buffer went back to the pool. */
  released = false;
  /** Holds bfloat16 pairs (a bf16 tensor's): kernels read it through unpacking accessors (core/kernel.ts). */
  bf16 = false;

  /** Where in `buffer` the storage starts: 0, but for a `storageSpan`. */
  readonly offset: number;

  /** Wraps a pooled buffer of `size` bytes (or, with `offset` and `id`, a span of it). */
  constructor(buffer: GPUBuffer, bytes: number, size: number, offset = 0, id: number = bufferId(buffer)) {
    this.buffer = buffer;
    this.bytes = bytes;
    this.size = size;
    this.offset = offset;
    this.bufferId = id;
  }
}

const bufferIds = new WeakMap<GPUBuffer, number>();
let nextBufferId = 0;

/** A process-wide number for a GPU buffer, the same for its whole life (small integers, from 0). */
export function bufferId(b: GPUBuffer): number {
  let id = bufferIds.get(b);
  if (id === undefined) bufferIds.set(b, id = nextBufferId++);
  return id;
}

const spanIds = new WeakMap<GPUBuffer, Map<string, number>>();

/**
 * `bytes` bytes of `s` from byte `offset` (a multiple of 256, the binding offset alignment), to bind in place
 * of the whole buffer. Only for binding: not pooled nor counted. Its id is its own, the same for the same
 * span of the same buffer, so cached bind groups find it again and never confuse it with the whole buffer.
 */
export function storageSpan(s: Storage, offset: number, bytes: number): Storage {
  const at = s.offset + offset;
  if (at % 256 !== 0 || bytes <= 0 || bytes % 4 !== 0 || offset + bytes > s.size) {
    throw new Error(
      `storageSpan: bytes [${offset}, ${offset + bytes}) of a ${s.size}-byte storage at ${s.offset}`,
    );
  }
  let ids = spanIds.get(s.buffer);
  if (!ids) spanIds.set(s.buffer, ids = new Map());
  const key = `${at}:${bytes}`;
  let id = ids.get(key);
  if (id === undefined) ids.set(key, id = nextBufferId++);
  return new Storage(s.buffer, bytes, bytes, at, id);
}

const USAGE = GPUBufferUsage.STORAGE | GPUBufferUsage.COPY_SRC | GPUBufferUsage.COPY_DST;
const pool = new Map<number, GPUBuffer[]>();
let live = 0;
let peak = 0;
let pooled = 0;
let saved = 0;
let tensors = 0;
let poolLimit = 2 ** 30;
/** Buffers evicted from the pool: destroyed after the next submit, as pending work may still use them. */
const doomed: GPUBuffer[] = [];

/** The size class of a request: multiples of 256 bytes up to 1 MiB, then steps of 1/8 of a power of two. */
function sizeClass(bytes: number): number {
  const b = Math.max(bytes, 16);
  if (b <= 1 << 20) return Math.ceil(b / 256) * 256;
  const step = 2 ** (Math.floor(Math.log2(b)) - 3);
  return Math.ceil(b / step) * step;
}

let limit = Infinity;

/**
 * Caps the bytes live tensors may hold (default: no cap). An allocation past the cap throws a clear
 * out-of-memory error (a `GPUError`) instead of reaching the driver; use it to test that a workload fits a budget.
 */
export function setMemoryLimit(bytes: number | null): void {
  // a NaN (or a string) would compare false with every allocation: no cap, silently
  if (bytes != null && !(typeof bytes === "number" && bytes >= 0)) {
    throw new Error(`setMemoryLimit: bytes must be a number >= 0 (Infinity or null: no cap), got ${bytes}`);
  }
  limit = bytes ?? Infinity;
}

/**
 * Throws the error {@linkcode allocStorage} would give for `bytes` (not a whole number, or more than the
 * device's largest buffer) without allocating: creators that fill host memory first check before they do
 * (with `limit`, also against the memory limit). Returns the device's largest buffer size.
 */
export function checkAllocatable(bytes: number, what?: () => string): number {
  const max = deviceInfo().limits.maxBufferSize;
  // (a size past 2^53 is merely too large: the next check names it)
  if (!(Number.isSafeInteger(bytes) && bytes >= 0) && !(Number.isFinite(bytes) && bytes > max)) {
    // a NaN or fractional size would poison the byte counters (and with them the memory limit) for good
    throw new GPUError(`cannot allocate ${what?.() ?? "a buffer"}: its size is not a whole number of bytes`);
  }
  if (bytes > max) {
    throw new GPUError(
      `cannot allocate ${what?.() ?? `${bytes} bytes`}: ${bytes} bytes is more than the device's largest ` +
        `buffer (${max})`,
    );
  }
  return max;
}

/** Throws the out-of-memory error {@linkcode allocStorage} gives where `size` bytes more would pass the limit
 * set by {@linkcode setMemoryLimit}. */
function checkLimit(size: number): void {
  if (live + size > limit) {
    throw new GPUError(
      `out of memory: allocating ${size} bytes with ${live} live would pass the memory limit of ${limit} bytes`,
    );
  }
}

/** {@linkcode checkAllocatable} and the memory limit, for a tensor of `bytes` about to be filled on the host
 * (rand, randn, arange): the errors allocStorage would give, before the host array is made. */
export function checkHostFill(bytes: number, what: () => string): void {
  const max = checkAllocatable(bytes, what);
  checkLimit(Math.min(sizeClass(bytes), Math.floor(max / 4) * 4));
}

/**
 * Allocates storage for `bytes` bytes, reusing a pooled buffer of the same size class when there is one.
 * `what` names the request in errors (e.g. the tensor's shape; called only then).
 */
export function allocStorage(bytes: number, what?: () => string): Storage {
  const max = checkAllocatable(bytes, what);
  const size = Math.min(sizeClass(bytes), Math.floor(max / 4) * 4); // the class's rounding stays within it
  checkLimit(size);
  let buffer = pool.get(size)?.pop();
  if (buffer) {
    pooled -= size;
  } else {
    buffer = gpuDevice().createBuffer({ size, usage: USAGE });
  }
  live += size;
  if (live > peak) peak = live;
  return new Storage(buffer, bytes, size);
}

/** Returns a storage's buffer to the pool (or marks it for destruction when the pool is full). */
export function releaseStorage(s: Storage): void {
  const size = s.size;
  live -= size;
  if (s.savedBy > 0) saved -= size;
  s.savedBy = 0;
  s.released = true;
  if (pooled + size > poolLimit) {
    doomed.push(s.buffer);
    return;
  }
  let list = pool.get(size);
  if (!list) pool.set(size, list = []);
  list.push(s.buffer);
  pooled += size;
}

/** Counts a tensor handle created (+1) or disposed (-1). */
export function countTensor(delta: number): void {
  tensors += delta;
}

/** Adjusts the bytes kept for the backward pass when a storage is first saved or last released. */
export function markSaved(s: Storage, delta: 1 | -1): void {
  if (s.released || (delta === -1 && s.savedBy === 0)) return;
  const before = s.savedBy;
  s.savedBy += delta;
  if (before === 0 && delta === 1) saved += s.size;
  if (before === 1 && delta === -1) saved -= s.size;
}

/** Current byte counts. */
export function memory(): MemoryInfo {
  return { liveBytes: live, peakBytes: peak, pooledBytes: pooled, liveTensors: tensors, savedBytes: saved };
}

/** Starts a new peak measurement from the current live bytes. */
export function resetPeak(): void {
  peak = live;
}

/**
 * Frees every pooled buffer (after pending work completes) and sets how many bytes of freed buffers the pool
 * may keep for reuse. `limitBytes` defaults to the current limit, which starts at 2^30 bytes (1 GiB).
 */
export function emptyPool(limitBytes: number = poolLimit): void {
  if (!(typeof limitBytes === "number" && limitBytes >= 0)) {
    throw new Error(`emptyPool: the pool's limit must be a number of bytes >= 0, got ${limitBytes}`);
  }
  poolLimit = limitBytes;
  for (const list of pool.values()) doomed.push(...list);
  pool.clear();
  pooled = 0;
}

const destroyListeners: ((buffer: GPUBuffer) => void)[] = [];

/** Calls `fn` with every pooled buffer just before it is destroyed (caches that refer to it drop it). */
export function onBufferDestroyed(fn: (buffer: GPUBuffer) => void): void {
  destroyListeners.push(fn);
}

/** Destroys buffers evicted from the pool; called by the executor right after a submit. */
export function destroyDoomed(): void {
  for (const b of doomed.splice(0)) {
    for (const fn of destroyListeners) fn(b);
    b.destroy();
  }
}
