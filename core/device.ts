/**
 * The WebGPU adapter and device, acquired once for the whole runtime.
 *
 * `init()` asks for the adapter's own limits (storage binding size, buffer size, storage buffers per stage,
 * workgroup storage) instead of the WebGPU defaults, and turns every way the GPU can fail (validation errors,
 * out-of-memory, device loss) into a thrown JavaScript error at the next point where the runtime waits.
 * @module
 */

import { tuneKernels, tuningInProgress } from "./tune.ts";

/** Options for {@linkcode init}. */
export interface InitOptions {
  /** Passed to `requestAdapter`. Deno ignores it; browsers may honour it. */
  powerPreference?: GPUPowerPreference;
  /**
   * Choose kernel variants for this adapter (`tuneKernels`): measured once per adapter, then read from a
   * cache in `localStorage` (default true).
   */
  tune?: boolean;
}

/** What the runtime knows about the device it runs on. */
export interface DeviceInfo {
  /** Adapter description, e.g. "llvmpipe (LLVM 15.0.6, 256 bits)" or a GPU name. */
  description: string;
  /** Adapter vendor string as the platform reports it. */
  vendor: string;
  /** True for software adapters (llvmpipe, SwiftShader, WARP): CPU rasterizers, not GPUs. */
  isFallbackAdapter: boolean;
  /** Largest subgroup size (tells Vulkan lavapipe, 8, from GL llvmpipe, 128). */
  subgroupMaxSize: number;
  /** Whether kernels may be timed with timestamp queries. */
  timestampQuery: boolean;
  /** Subgroup operations (`subgroupAdd`), when the device has them and a probe kernel summed correctly and found
   * each subgroup to be an aligned run of the local index (lane = index mod size), as the kernels assume; else
   * null. */
  subgroups: SubgroupSupport | null;
  /** The limits the device was created with. */
  limits: DeviceLimits;
}

/** How kernels use subgroups on this device. */
export interface SubgroupSupport {
  /** WGSL directive to put first in a shader: "enable subgroups;" (browsers), or "" where the compiler has
   * subgroup builtins without it (Deno's naga rejects the directive). */
  directive: string;
  /** Smallest subgroup size the adapter may use (as it reports, or the probe ran if smaller). */
  minSize: number;
  /** Largest subgroup size the adapter may use (as it reports, or the probe ran if larger). */
  maxSize: number;
}

/** The device limits the runtime relies on. */
export interface DeviceLimits {
  /** Bytes one storage binding may cover (128 MiB on most adapters). */
  maxStorageBufferBindingSize: number;
  /** Largest buffer in bytes. */
  maxBufferSize: number;
  /** Storage buffers one compute stage may bind. */
  maxStorageBuffersPerShaderStage: number;
  /** Bytes of `var<workgroup>` memory per workgroup. */
  maxComputeWorkgroupStorageSize: number;
  /** Invocations per workgroup. */
  maxComputeInvocationsPerWorkgroup: number;
  /** Workgroup size along x (kernels here are one-dimensional). */
  maxComputeWorkgroupSizeX: number;
  /** Workgroups per dispatch dimension (65535). */
  maxComputeWorkgroupsPerDimension: number;
  /** Alignment of storage binding offsets in bytes (256). */
  minStorageBufferOffsetAlignment: number;
  /** Alignment of uniform binding offsets in bytes (256). */
  minUniformBufferOffsetAlignment: number;
}

/** Raised for any failure reported by the GPU (validation, out-of-memory, device loss, no adapter) and for the
 * runtime's own: an allocation past `setMemoryLimit`'s cap or of an impossible size, use before `init()`. */
export class GPUError extends Error {
  /** Creates the error; `name` is "GPUError". */
  constructor(message: string) {
    super(message);
    this.name = "GPUError";
  }
}

let device: GPUDevice | null = null;
let info: DeviceInfo | null = null;
let pending: Promise<DeviceInfo> | null = null;
/** The info once {@linkcode init} has finished, its tuning included; until then init() calls wait. */
let ready: DeviceInfo | null = null;
let autoTune = true;

/** Whether `init()` tuned kernels (not `init({ tune: false })`): later tuning on first use follows it (the
 * fused scan's for a state size other than 16, measured when training starts). */
export function autoTuneEnabled(): boolean {
  return autoTune;
}
let firstError: string | null = null;
let lostReason: string | null = null;
let onLost!: (reason: string) => void;
const lost = new Promise<string>((r) => (onLost = r));

/**
 * Resolves with the loss's message (that of the {@linkcode GPUError} every later call throws) once the device is
 * lost; never while it lives. Nothing acquires another device: a page can show it and ask for a reload.
 */
export function deviceLost(): Promise<string> {
  return lost;
}

const NO_ADAPTER = "No WebGPU adapter found (navigator.gpu.requestAdapter() returned null). mamba.ts needs " +
  "WebGPU: use a machine with a GPU and current drivers, or on Linux without a GPU install Mesa's software " +
  "Vulkan driver (`sudo apt-get install mesa-vulkan-drivers`) and run with DENO_WEBGPU_BACKEND=vulkan " +
  "and XDG_RUNTIME_DIR set to a private directory.";

/**
 * Acquires the adapter and device, and tunes the kernels (see {@linkcode InitOptions.tune}). Idempotent: later
 * calls, concurrent ones too, resolve with the same info once the first call's work is done, its tuning
 * included (their options are ignored).
 * Throws a {@linkcode GPUError} that says how to get WebGPU when there is no adapter, and the loss once the
 * device was lost (as every later call into the GPU does).
 */
export function init(options: InitOptions = {}): Promise<DeviceInfo> {
  if (lostReason) return Promise.reject(new GPUError(lostReason)); // not ready: its device is gone
  if (ready) return Promise.resolve(ready);
  // after a failed tuning, the device acquired stays (its buffers exist): a later init() tunes again
  pending ??= (info ? Promise.resolve(info) : acquire(options)).then(async (i) => {
    autoTune = options.tune ?? true;
    // a tuneKernels() called before init() is waiting for this device: it tunes, this must not wait for it
    if (autoTune && !tuningInProgress()) await tuneKernels();
    return ready = i;
  }).catch((e) => {
    pending = null;
    throw e;
  });
  return pending;
}

/**
 * The device's info as soon as it is acquired, without waiting for `init()`'s tuning: what the tuners call
 * (init() waits for them, so they must not wait for it); acquires it with `init()` where nothing has.
 */
export function acquired(): Promise<DeviceInfo> {
  return info ? Promise.resolve(info) : init();
}

async function acquire(options: InitOptions): Promise<DeviceInfo> {
  const gpu = (globalThis.navigator as Navigator | undefined)?.gpu;
  // a page's user needs the browser's advice, not Deno's
  const page = typeof (globalThis as { Deno?: unknown }).Deno === "undefined" &&
    typeof (globalThis as { isSecureContext?: boolean }).isSecureContext === "boolean";
  if (!gpu) {
    // a page without navigator.gpu: WebGPU is off, or the page is not a secure context (http:// on a LAN
    // address), where browsers hide it
    throw new GPUError(
      page
        ? "No WebGPU in this page (navigator.gpu is undefined). " +
          ((globalThis as { isSecureContext?: boolean }).isSecureContext
            ? "Enable WebGPU in the browser (Chrome and Edge have it), or use one that has it."
            : "The page is not a secure context, where browsers hide WebGPU: serve it over https or from " +
              "localhost / 127.0.0.1.")
        : NO_ADAPTER,
    );
  }
  const adapter = await gpu.requestAdapter({ powerPreference: options.powerPreference });
  if (!adapter) {
    throw new GPUError(
      page
        ? "No WebGPU adapter (navigator.gpu.requestAdapter() returned null): the browser has WebGPU but offers " +
          "no adapter (a GPU or driver it blocks, or hardware acceleration off; chrome://gpu says why in Chrome)"
        : NO_ADAPTER,
    );
  }
  const a = adapter.limits;
  const wanted: Record<string, number> = {
    maxStorageBufferBindingSize: a.maxStorageBufferBindingSize,
    maxBufferSize: a.maxBufferSize,
    maxStorageBuffersPerShaderStage: a.maxStorageBuffersPerShaderStage,
    maxComputeWorkgroupStorageSize: a.maxComputeWorkgroupStorageSize,
    maxComputeInvocationsPerWorkgroup: a.maxComputeInvocationsPerWorkgroup,
    maxComputeWorkgroupSizeX: a.maxComputeWorkgroupSizeX,
  };
  const timestampQuery = adapter.features.has("timestamp-query");
  const requiredFeatures: GPUFeatureName[] = timestampQuery ? ["timestamp-query"] : [];
  // Subgroups: ask even when the adapter does not list them (Deno's Vulkan adapters grant them unlisted);
  // an adapter without them rejects the request, and we ask again without.
  let dev: GPUDevice;
  try {
    dev = await adapter.requestDevice({
      requiredLimits: wanted,
      requiredFeatures: [...requiredFeatures, "subgroups" as GPUFeatureName],
    });
  } catch {
    dev = await adapter.requestDevice({ requiredLimits: wanted, requiredFeatures });
  }
  dev.addEventListener("uncapturederror", (ev) => {
    const err = (ev as GPUUncapturedErrorEvent).error;
    firstError ??= `${err.constructor.name}: ${err.message}`;
  });
  dev.lost.then((l) => {
    // nothing is acquired again: every buffer, pipeline and cache belongs to the lost device
    lostReason = `GPU device lost (${l.reason}): ${l.message}. mamba.ts does not acquire another device: ` +
      "reload the page or restart the process";
    device = null;
    onLost(lostReason);
  });
  const ai = adapter.info;
  const l = dev.limits;
  info = {
    description: ai.description || [ai.vendor, ai.architecture].filter(Boolean).join(" ") ||
      "unknown adapter",
    vendor: ai.vendor,
    isFallbackAdapter: ai.isFallbackAdapter ?? false,
    subgroupMaxSize: ai.subgroupMaxSize ?? 0,
    timestampQuery,
    subgroups: dev.features.has("subgroups")
      ? await probeSubgroups(dev, ai.subgroupMinSize ?? 0, ai.subgroupMaxSize ?? 0)
      : null,
    limits: {
      maxStorageBufferBindingSize: l.maxStorageBufferBindingSize,
      maxBufferSize: l.maxBufferSize,
      maxStorageBuffersPerShaderStage: l.maxStorageBuffersPerShaderStage,
      maxComputeWorkgroupStorageSize: l.maxComputeWorkgroupStorageSize,
      maxComputeInvocationsPerWorkgroup: l.maxComputeInvocationsPerWorkgroup,
      maxComputeWorkgroupSizeX: l.maxComputeWorkgroupSizeX,
      maxComputeWorkgroupsPerDimension: l.maxComputeWorkgroupsPerDimension,
      minStorageBufferOffsetAlignment: l.minStorageBufferOffsetAlignment,
      minUniformBufferOffsetAlignment: l.minUniformBufferOffsetAlignment,
    },
  };
  device = dev;
  return info;
}

/**
 * Checks that subgroupAdd compiles and sums, and that subgroups are aligned runs of the local index (the
 * kernels derive a lane's channel and its partial-row slot from the local index): tries the shader with and
 * without `enable subgroups;` and runs the one that compiles on 64 invocations (one readback at init, only on
 * devices that grant the feature).
 */
async function probeSubgroups(
  dev: GPUDevice,
  minSize: number,
  maxSize: number,
): Promise<SubgroupSupport | null> {
  const body = `@group(0) @binding(0) var<storage, read_write> o: array<u32>;
@compute @workgroup_size(64)
fn main(@builtin(local_invocation_index) l: u32, @builtin(subgroup_size) sz: u32,
        @builtin(subgroup_invocation_id) lane: u32) {
  let first = subgroupBroadcast(l, 0u); // before the &&: its right side is not uniform control flow
  let aligned = lane == l % sz && first == l - lane;
  o[l] = select(${NOT_ALIGNED}u, 0u, aligned) + u32(subgroupAdd(1.0)) * 1000u + sz;
}`;
  for (const directive of ["enable subgroups;", ""]) {
    dev.pushErrorScope("validation");
    const module = dev.createShaderModule({ code: `${directive}\n${body}` });
    const pipeline = dev.createComputePipeline({ layout: "auto", compute: { module, entryPoint: "main" } });
    if (await dev.popErrorScope()) continue;
    const buf = dev.createBuffer({ size: 256, usage: GPUBufferUsage.STORAGE | GPUBufferUsage.COPY_SRC });
    const read = dev.createBuffer({ size: 256, usage: GPUBufferUsage.MAP_READ | GPUBufferUsage.COPY_DST });
    const enc = dev.createCommandEncoder();
    const pass = enc.beginComputePass();
    pass.setPipeline(pipeline);
    pass.setBindGroup(
      0,
      dev.createBindGroup({
        layout: pipeline.getBindGroupLayout(0),
        entries: [{ binding: 0, resource: { buffer: buf } }],
      }),
    );
    pass.dispatchWorkgroups(1);
    pass.end();
    enc.copyBufferToBuffer(buf, 0, read, 0, 256);
    dev.queue.submit([enc.finish()]);
    await read.mapAsync(GPUMapMode.READ);
    const o = new Uint32Array(read.getMappedRange().slice(0));
    read.unmap();
    buf.destroy();
    read.destroy();
    return subgroupProbeResult(o, directive, minSize, maxSize);
  }
  return null;
}

/** Added to a probe invocation's word when its subgroup is not an aligned run of the local index. */
const NOT_ALIGNED = 1_000_000;

/**
 * Reads the subgroup probe's words (one per invocation: NOT_ALIGNED if its subgroup is not an aligned run of
 * the local index, + 1000 x the sum of ones over its subgroup + the subgroup_size builtin): the support, its
 * sizes the adapter's range (`minSize`, `maxSize`; 0 where not reported) widened to the sizes the probe ran, or
 * null when a sum disagrees with the size or a subgroup is laid out otherwise. Exported for tests.
 */
export function subgroupProbeResult(
  o: Uint32Array,
  directive: string,
  minSize: number,
  maxSize: number,
): SubgroupSupport | null {
  // Each invocation saw its subgroup's size twice: as the builtin and as the sum of ones.
  const ok = o.every((v) =>
    v < NOT_ALIGNED && Math.floor(v / 1000) === v % 1000 && v % 1000 >= 1 && v % 1000 <= 64
  );
  if (!ok) return null;
  // The range covers the sizes seen too: kernels compile a fixed size in where min = max, so an adapter that
  // reports one size while the probe ran another (a misreport, or a range it does not state) gets none.
  const sizes = [...o].map((v) => v % 1000);
  return {
    directive,
    minSize: Math.min(minSize || Infinity, ...sizes),
    maxSize: Math.max(maxSize, ...sizes),
  };
}

/** The device; throws if {@linkcode init} has not completed or the device was lost. */
export function gpuDevice(): GPUDevice {
  if (lostReason) throw new GPUError(lostReason);
  if (!device) throw new GPUError("mamba.ts is not initialised: call `await init()` first.");
  return device;
}

/** Info about the device; throws if {@linkcode init} has not completed. */
export function deviceInfo(): DeviceInfo {
  if (!info) throw new GPUError("mamba.ts is not initialised: call `await init()` first.");
  return info;
}

/** The subgroup size when the device's subgroups all have one size (kernels that compile it in, e.g. a
 * workgroup of exactly one subgroup, need that), else null (no subgroups, or a size that varies). */
export function fixedSubgroupSize(): number | null {
  const sg = deviceInfo().subgroups;
  return sg && sg.minSize === sg.maxSize ? sg.minSize : null;
}

/** Throws the first error the GPU reported since the last check (validation, out-of-memory, loss). */
export function throwIfGPUFailed(): void {
  if (lostReason) throw new GPUError(lostReason);
  if (firstError) {
    const e = firstError;
    firstError = null;
    throw new GPUError(`The GPU rejected work: ${e}`);
  }
}
