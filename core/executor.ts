/**
 * Records GPU work and submits it in batches; waits only when data is read back.
 *
 * Ops record dispatches into one command encoder (inside one compute pass while no copy intervenes). Each
 * dispatch's uniforms go into a host-side ring that is written to the GPU with one `writeBuffer` just before
 * the submit, so uniforms cost no extra buffers. Uploads go through a fresh mapped staging buffer and a
 * recorded copy, which keeps them in order with the dispatches around them (a `queue.writeBuffer` into a
 * reused buffer would run before earlier, not yet submitted, dispatches that still read it).
 * @module
 */

import { deviceInfo, deviceLost, gpuDevice, throwIfGPUFailed } from "./device.ts";
import { destroyDoomed } from "./memory.ts";

const UNIFORM_RING_BYTES = 1 << 20;
/** Dispatches recorded before the executor submits them (a batch of work, its uniforms in one write). */
export const MAX_DISPATCHES_PER_SUBMIT = 512;

let encoder: GPUCommandEncoder | null = null;
let pass: GPUComputePassEncoder | null = null;
let dispatches = 0;
let totalDispatches = 0;
const uniformHost = new Uint8Array(UNIFORM_RING_BYTES);
let uniformUsed = 0;
let uniformBuffer: GPUBuffer | null = null;
const afterSubmit: (() => void)[] = [];

function currentEncoder(): GPUCommandEncoder {
  encoder ??= gpuDevice().createCommandEncoder();
  return encoder;
}

function currentPass(): GPUComputePassEncoder {
  pass ??= currentEncoder().beginComputePass();
  return pass;
}

function endPass(): void {
  pass?.end();
  pass = null;
}

/** The GPU buffer of the uniform ring. */
export function uniformRingBuffer(): GPUBuffer {
  uniformBuffer ??= gpuDevice().createBuffer({
    size: UNIFORM_RING_BYTES,
    usage: GPUBufferUsage.UNIFORM | GPUBufferUsage.COPY_DST,
  });
  return uniformBuffer;
}

/** The host side of the uniform ring: a dispatch writes its fields at its reserved offset. */
export const uniformView: DataView = new DataView(uniformHost.buffer);

/** Reserves `bytes` of uniform space for the next dispatch, zeroed (fields a dispatch does not set read 0);
 * returns its offset in the ring (write the fields through {@linkcode uniformView}, bind
 * {@linkcode uniformRingBuffer}). */
export function reserveUniforms(bytes: number): number {
  const align = deviceInfo().limits.minUniformBufferOffsetAlignment;
  const size = Math.ceil(Math.max(bytes, 16) / align) * align;
  if (uniformUsed + size > UNIFORM_RING_BYTES) flush();
  const offset = uniformUsed;
  uniformUsed += size;
  uniformHost.fill(0, offset, offset + size);
  return offset;
}

/** Kernel times collected while profiling. */
export interface KernelTime {
  /** Kernel name. */
  name: string;
  /** GPU time in milliseconds (timestamp queries). */
  ms: number;
}

const PROFILE_SLOTS = 2048; // 2 queries each; a query set holds at most 4096
let profiler: { set: GPUQuerySet; names: string[]; pending: Promise<KernelTime[]>[] } | null = null;

/** Whether a {@linkcode profile} is running: its query set takes every dispatch, and a second may not start. */
export function profiling(): boolean {
  return profiler !== null;
}

/**
 * Times every dispatch of `fn` on the GPU with timestamp queries (each dispatch gets its own pass, so this
 * slows the work down a little) and returns the kernel times in order. Needs the `timestamp-query` feature.
 * With an async `fn`, the dispatches that other tasks record while it waits are timed too.
 */
export async function profile(fn: () => void | Promise<void>): Promise<KernelTime[]> {
  if (!deviceInfo().timestampQuery) throw new Error("profile(): the adapter has no timestamp-query feature");
  // One query set for the device's one stream of work: a second profile at once would take the first's.
  if (profiler) throw new Error("profile(): another profile() is running (nest or overlap none)");
  flush();
  const mine = {
    set: gpuDevice().createQuerySet({ type: "timestamp", count: 2 * PROFILE_SLOTS }),
    names: [] as string[],
    pending: [] as Promise<KernelTime[]>[],
  };
  profiler = mine;
  try {
    await fn();
    resolveProfile();
    return (await Promise.all(mine.pending)).flat();
  } finally {
    // The passes that wrote timestamps are submitted before the set goes (a submit that uses a destroyed
    // query set is invalid in WebGPU), also when fn threw.
    flush();
    mine.set.destroy();
    profiler = null;
  }
}

/** Resolves the timestamps recorded so far and queues their readback (called before a submit). */
function resolveProfile(): void {
  if (!profiler || profiler.names.length === 0) return;
  const n = profiler.names.length;
  const names = profiler.names.splice(0);
  endPass();
  const dev = gpuDevice();
  const resolved = dev.createBuffer({
    size: 16 * n,
    usage: GPUBufferUsage.QUERY_RESOLVE | GPUBufferUsage.COPY_SRC,
  });
  currentEncoder().resolveQuerySet(profiler.set, 0, 2 * n, resolved, 0);
  const p = readBuffer(resolved, 0, 16 * n).then((buf) => {
    resolved.destroy();
    const t = new BigUint64Array(buf);
    return names.map((name, i) => ({ name, ms: Number(t[2 * i + 1] - t[2 * i]) / 1e6 }));
  });
  profiler.pending.push(p);
}

const dynamicOffset = new Uint32Array(1);

/** Records one compute dispatch of x by y workgroups. Submits when the batch is large. */
export function recordDispatch(
  pipeline: GPUComputePipeline,
  bindGroup: GPUBindGroup,
  x: number,
  y: number,
  uniformOffset: number,
): void {
  if (profiler) {
    if (profiler.names.length === PROFILE_SLOTS) resolveProfile();
    const i = profiler.names.length;
    profiler.names.push(pipeline.label);
    endPass();
    pass = currentEncoder().beginComputePass({
      timestampWrites: {
        querySet: profiler.set,
        beginningOfPassWriteIndex: 2 * i,
        endOfPassWriteIndex: 2 * i + 1,
      },
    });
  }
  const p = currentPass();
  p.setPipeline(pipeline);
  dynamicOffset[0] = uniformOffset;
  p.setBindGroup(0, bindGroup, dynamicOffset, 0, 1); // the typed-array form: no sequence to convert
  p.dispatchWorkgroups(x, y, 1);
  dispatches++;
  totalDispatches++;
  if (dispatches >= MAX_DISPATCHES_PER_SUBMIT) flush();
}

/** Records a buffer-to-buffer copy in order with the dispatches around it. */
export function recordCopy(
  src: GPUBuffer,
  srcOffset: number,
  dst: GPUBuffer,
  dstOffset: number,
  bytes: number,
) {
  endPass();
  currentEncoder().copyBufferToBuffer(src, srcOffset, dst, dstOffset, bytes);
}

/** Records zeroing `bytes` (a multiple of 4) of `dst` from `dstOffset`, in order with the dispatches around it. */
export function recordClear(dst: GPUBuffer, dstOffset: number, bytes: number): void {
  endPass();
  currentEncoder().clearBuffer(dst, dstOffset, bytes);
}

/** Copies host data into `dst` at `dstOffset` (bytes, multiple of 4), in order with recorded work. */
export function upload(dst: GPUBuffer, dstOffset: number, data: ArrayBufferView): void {
  const bytes = data.byteLength;
  if (bytes === 0) return;
  const padded = Math.ceil(bytes / 4) * 4;
  const staging = gpuDevice().createBuffer({
    size: padded,
    usage: GPUBufferUsage.COPY_SRC,
    mappedAtCreation: true,
  });
  new Uint8Array(staging.getMappedRange()).set(new Uint8Array(data.buffer, data.byteOffset, bytes));
  staging.unmap();
  recordCopy(staging, 0, dst, dstOffset, padded);
  afterSubmit.push(() => staging.destroy());
}

/** Submits everything recorded so far. Does not wait. */
export function flush(): void {
  if (!encoder && uniformUsed === 0) {
    destroyDoomed(); // everything recorded is submitted: nothing left to record can use them
    return;
  }
  endPass();
  const dev = gpuDevice();
  if (uniformUsed > 0) {
    // writeBuffer copies the data at the call, so the host ring is reused (a fresh, zeroed 1 MiB array per
    // submit made a one-dispatch submit about 10% slower in Deno)
    dev.queue.writeBuffer(uniformRingBuffer(), 0, uniformHost, 0, uniformUsed);
    uniformUsed = 0;
  }
  if (encoder) dev.queue.submit([encoder.finish()]);
  encoder = null;
  dispatches = 0;
  for (const f of afterSubmit.splice(0)) f();
  destroyDoomed();
}

/** Reads `bytes` bytes at `offset` of a GPU buffer back to the host. The only place the runtime waits. */
export async function readBuffer(src: GPUBuffer, offset: number, bytes: number): Promise<ArrayBuffer> {
  return await readSpans(src, [[offset, bytes]]);
}

/**
 * Reads several spans (byte offset, byte count) of a GPU buffer back to the host with one wait: their bytes one
 * after another. Where there are several, each must be a multiple of 4 bytes (what a buffer copy moves), e.g.
 * the new columns of each row of a (rows, columns) i32 tensor.
 */
export async function readSpans(
  src: GPUBuffer,
  spans: readonly (readonly [number, number])[],
): Promise<ArrayBuffer> {
  if (profiler && profiler.names.length) resolveProfile();
  for (const [, n] of spans.length > 1 ? spans : []) {
    if (n % 4 !== 0) throw new Error(`readSpans: a span of ${n} bytes is not a multiple of 4`);
  }
  const bytes = spans.reduce((n, [, b]) => n + b, 0);
  const size = Math.ceil(Math.max(bytes, 4) / 4) * 4;
  const staging = gpuDevice().createBuffer({
    size,
    usage: GPUBufferUsage.MAP_READ | GPUBufferUsage.COPY_DST,
  });
  if (spans.length === 1) recordCopy(src, spans[0][0], staging, 0, size);
  else {
    let at = 0;
    for (const [offset, n] of spans) {
      if (n > 0) recordCopy(src, offset, staging, at, n);
      at += n;
    }
  }
  flush();
  try {
    await staging.mapAsync(GPUMapMode.READ);
  } catch (e) {
    staging.destroy();
    // Chromium rejects the map ("unmapped before mapping was resolved") before device.lost resolves: wait a
    // little for a loss, to throw it rather than that
    let timer: ReturnType<typeof setTimeout> | undefined;
    await Promise.race([deviceLost(), new Promise((r) => (timer = setTimeout(r, 500)))]);
    clearTimeout(timer);
    throwIfGPUFailed();
    throw e;
  }
  try {
    throwIfGPUFailed();
  } catch (e) {
    staging.destroy();
    throw e;
  }
  const out = new ArrayBuffer(bytes);
  const dst = new Uint8Array(out);
  // Copy in pieces of at most 4 MiB: large single copies out of a mapped range are slow in Deno.
  const piece = 4 << 20;
  for (let at = 0; at < bytes; at += piece) {
    const n = Math.min(piece, bytes - at);
    dst.set(new Uint8Array(staging.getMappedRange(at, Math.ceil(n / 4) * 4), 0, n), at);
  }
  staging.unmap();
  staging.destroy();
  return out;
}

/** Submits recorded work and waits until the GPU has finished it; rethrows any GPU error. */
export async function sync(): Promise<void> {
  flush();
  await gpuDevice().queue.onSubmittedWorkDone();
  throwIfGPUFailed();
}

/** Total dispatches recorded since start (for counting dispatches per layer in benchmarks). */
export function dispatchCount(): number {
  return totalDispatches;
}
