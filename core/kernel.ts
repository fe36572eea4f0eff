/**
 * The one place where kernels are defined, compiled, cached and dispatched.
 *
 * A kernel is WGSL with named buffers and named uniforms. Kernel bodies never index a storage array
 * directly: they call `ld_<buf>(i)` and `st_<buf>(i, v)`. That lets one kernel read or write tensors larger
 * than one storage binding (128 MiB): such a buffer is bound as several consecutive windows and the
 * accessor picks the window. Shapes travel in uniforms, so one pipeline serves every shape; pipelines are
 * cached per kernel and window count, and bind groups per pipeline and bound buffers (the uniforms sit
 * at a dynamic offset, so pooled buffers that come back step after step find their bind group; a pipeline's
 * key also holds the window size in bytes and which buffers are bf16 packed). Work is laid out over a linear
 * workgroup index `group` (the dispatch is folded into two dimensions past the device's
 * maxComputeWorkgroupsPerDimension, 65535 at least), with `lid` the local invocation id.
 * @module
 */

import { deviceInfo, gpuDevice } from "./device.ts";
import { recordDispatch, reserveUniforms, uniformRingBuffer, uniformView } from "./executor.ts";
import { bufferId, onBufferDestroyed, type Storage, storageSpan } from "./memory.ts";

/** Element type of a storage binding as WGSL sees it. */
export type ElemType = "f32" | "i32" | "u32" | "vec4<f32>" | "vec4<u32>";
/** Type of one uniform field. */
export type UniformType = "u32" | "i32" | "f32" | "vec4<u32>" | "vec4<i32>";

/** A storage buffer of a kernel. */
export interface BufferDecl {
  /** Name used in accessors: `ld_<name>`, `st_<name>`. */
  name: string;
  /** WGSL element type. */
  type: ElemType;
  /** `read` for inputs, `read_write` for outputs. */
  access: "read" | "read_write";
}

/** Everything that defines a kernel. */
export interface KernelSpec {
  /** Unique name; also the pipeline label. */
  name: string;
  /** Storage buffers, bound in this order. */
  buffers: BufferDecl[];
  /** Uniform fields `P.<name>`, in this order. */
  uniforms: [string, UniformType][];
  /** Invocations per workgroup (one-dimensional). */
  workgroupSize: number;
  /** WGSL placed before `main` (helper functions, `var<workgroup>` arrays). */
  decls?: string;
  /** Body of `main`; sees `group` (linear workgroup index), `lid` (local index) and `gid` = group*WG + lid,
   * and with `subgroups` also `sgSize` and `sgLane` (subgroup size, index within the subgroup). */
  body: string;
  /** Uses subgroup operations: needs `deviceInfo().subgroups` (checked when the pipeline is built). */
  subgroups?: boolean;
}

/** A defined kernel; compiled lazily per window signature. */
export interface Kernel {
  /** Its definition. */
  readonly spec: KernelSpec;
  /** Byte offset of each uniform field. */
  readonly uniformOffsets: Map<string, [number, UniformType]>;
  /** Size of the uniform block in bytes. */
  readonly uniformBytes: number;
}

const ELEM_BYTES: Record<ElemType, number> = {
  "f32": 4,
  "i32": 4,
  "u32": 4,
  "vec4<f32>": 16,
  "vec4<u32>": 16,
};
/** A compiled pipeline, its bind-group layout, its cache key and the spec it was compiled from. */
interface PipelineEntry {
  pipeline: GPUComputePipeline;
  layout: GPUBindGroupLayout;
  key: string;
  spec: KernelSpec;
  /** A number of its own, the seed of its bind groups' hashes. */
  id: number;
}
const pipelines = new Map<string, PipelineEntry>();

function sameSource(a: KernelSpec, b: KernelSpec): boolean {
  return a.body === b.body && a.decls === b.decls && a.workgroupSize === b.workgroupSize &&
    JSON.stringify([a.buffers, a.uniforms, a.subgroups]) ===
      JSON.stringify([b.buffers, b.uniforms, b.subgroups]);
}

/** Defines a kernel. Cheap: compilation happens at first dispatch. */
export function defineKernel(spec: KernelSpec): Kernel {
  const uniformOffsets = new Map<string, [number, UniformType]>();
  let at = 0;
  for (const [name, type] of [["_groups", "u32"], ...spec.uniforms] as [string, UniformType][]) {
    const size = type.startsWith("vec4") ? 16 : 4;
    at = Math.ceil(at / size) * size;
    uniformOffsets.set(name, [at, type]);
    at += size;
  }
  return { spec, uniformOffsets, uniformBytes: Math.ceil(at / 16) * 16 };
}

/** Bytes one binding window covers: the device's largest storage binding rounded down to the offset
 * alignment. A buffer larger than that is bound once per window. */
export function windowBytes(): number {
  const l = deviceInfo().limits;
  return Math.floor(l.maxStorageBufferBindingSize / 256) * 256;
}

function accessors(b: BufferDecl, windows: number, segElems: number): string {
  const v = (k: number) => `${b.name}_${k}`;
  let ld = `fn ld_${b.name}(i: u32) -> ${b.type} {\n`;
  let st = `fn st_${b.name}(i: u32, v: ${b.type}) {\n`;
  for (let k = 0; k < windows - 1; k++) {
    const base = k * segElems;
    ld += `  if (i < ${base + segElems}u) { return ${v(k)}[i - ${base}u]; }\n`;
    st += `  if (i < ${base + segElems}u) { ${v(k)}[i - ${base}u] = v; return; }\n`;
  }
  const last = (windows - 1) * segElems;
  ld += `  return ${v(windows - 1)}[i - ${last}u];\n}\n`;
  st += `  ${v(windows - 1)}[i - ${last}u] = v;\n}\n`;
  return b.access === "read" ? ld : ld + st;
}

/**
 * Accessors of a buffer that holds bf16 pairs (core/bf16.ts) bound to a read-only f32 or vec4<f32> declaration:
 * its windows are arrays of words (vec2s of words for vec4 loads), and `ld_<name>(i)` returns element i
 * unpacked (the upper 16 bits of an f32), so the kernel computes in f32 as with an f32 buffer.
 */
function packedAccessors(b: BufferDecl, windows: number, seg: number): string {
  const vec = b.type === "vec4<f32>";
  const per = seg / (vec ? 8 : 4); // array elements per window
  const j = vec ? "i" : "(i >> 1u)";
  let pick = `  var w: ${vec ? "vec2<u32>" : "u32"};
  let j = ${j};
`;
  for (let k = 0; k < windows - 1; k++) {
    pick += `  if (j < ${(k + 1) * per}u) { w = ${b.name}_${k}[j - ${k * per}u]; } else
`;
  }
  pick += `  { w = ${b.name}_${windows - 1}[j - ${(windows - 1) * per}u]; }
`;
  const lo = (x: string) => `bitcast<f32>(${x} << 16u)`;
  const hi = (x: string) => `bitcast<f32>(${x} & 0xffff0000u)`;
  const value = vec
    ? `vec4<f32>(${lo("w.x")}, ${hi("w.x")}, ${lo("w.y")}, ${hi("w.y")})`
    : `select(${lo("w")}, ${hi("w")}, (i & 1u) == 1u)`;
  return `fn ld_${b.name}(i: u32) -> ${b.type} {
${pick}  return ${value};
}
`;
}

/** Why a bf16 buffer cannot bind to declaration `b` (null: it can): read-only f32 or vec4<f32> declarations
 * unpack it; u32 ones see its words. */
function packedProblem(b: BufferDecl): string | null {
  if (b.type === "u32") return null;
  if (b.access === "read" && (b.type === "f32" || b.type === "vec4<f32>")) return null;
  return `a bf16 tensor can only be read there as f32 (buffer '${b.name}' is ${b.access} ${b.type})`;
}

/** The WGSL source of a kernel for the given number of windows per buffer; bit i of `packed`: buffer i holds
 * bf16 pairs. */
function kernelSource(k: Kernel, windows: number[], packed = 0): string {
  const { spec } = k;
  const lines: string[] = [];
  const sg = spec.subgroups ? deviceInfo().subgroups : null;
  if (spec.subgroups && !sg) throw new Error(`kernel ${spec.name} needs subgroups, which this device lacks`);
  if (sg?.directive) lines.push(sg.directive);
  const fields = [...k.uniformOffsets].map(([n, [, t]]) => `  ${n}: ${t},`).join("\n");
  lines.push(`struct Params {\n${fields}\n}`);
  lines.push(`@group(0) @binding(0) var<uniform> P: Params;`);
  let binding = 1;
  const seg = windowBytes();
  spec.buffers.forEach((b, i) => {
    const unpack = (packed >> i) & 1 && b.type !== "u32";
    const type = unpack ? (b.type === "vec4<f32>" ? "vec2<u32>" : "u32") : b.type;
    for (let w = 0; w < windows[i]; w++) {
      lines.push(
        `@group(0) @binding(${binding++}) var<storage, ${b.access}> ${b.name}_${w}: array<${type}>;`,
      );
    }
    lines.push(
      unpack ? packedAccessors(b, windows[i], seg) : accessors(b, windows[i], seg / ELEM_BYTES[b.type]),
    );
  });
  if (spec.decls) lines.push(spec.decls);
  lines.push(
    `@compute @workgroup_size(${spec.workgroupSize})`,
    `fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,`,
    `        @builtin(local_invocation_index) lid: u32${
      sg ? ", @builtin(subgroup_size) sgSize: u32, @builtin(subgroup_invocation_id) sgLane: u32" : ""
    }) {`,
    `  let group = wid.x + wid.y * nwg.x;`,
    `  if (group >= P._groups) { return; }`,
    `  let gid = group * ${spec.workgroupSize}u + lid;`,
    spec.body,
    `}`,
  );
  return lines.join("\n");
}

function pipelineFor(k: Kernel, windows: number[], packed = 0): PipelineEntry {
  // the window's size is in the source's accessors (a test may shrink it)
  const key = `${k.spec.name}|${windows.join(",")}|${windowBytes()}|${packed}`;
  let p = pipelines.get(key);
  if (p) {
    // Pipelines are cached by name: a kernel generated again under the same name must be the same kernel.
    if (p.spec !== k.spec && !sameSource(p.spec, k.spec)) {
      throw new Error(
        `kernel "${k.spec.name}": defined twice with different sources (a name must spell every parameter)`,
      );
    }
    return p;
  }
  const dev = gpuDevice();
  const code = kernelSource(k, windows, packed);
  const entries: GPUBindGroupLayoutEntry[] = [
    { binding: 0, visibility: GPUShaderStage.COMPUTE, buffer: { type: "uniform", hasDynamicOffset: true } },
  ];
  let binding = 1;
  k.spec.buffers.forEach((b, i) => {
    for (let w = 0; w < windows[i]; w++) {
      entries.push({
        binding: binding++,
        visibility: GPUShaderStage.COMPUTE,
        buffer: { type: b.access === "read" ? "read-only-storage" : "storage" },
      });
    }
  });
  const layout = dev.createBindGroupLayout({ entries, label: k.spec.name });
  const module = dev.createShaderModule({ code, label: k.spec.name });
  const pipeline = dev.createComputePipeline({
    label: k.spec.name,
    layout: dev.createPipelineLayout({ bindGroupLayouts: [layout] }),
    compute: { module, entryPoint: "main" },
  });
  p = { pipeline, layout, key, spec: k.spec, id: pipelines.size };
  pipelines.set(key, p);
  return p;
}

/** A cached bind group: its pipeline and the ids of the buffers it binds (the uniform ring first). */
interface BindEntry {
  readonly pipeline: PipelineEntry;
  readonly ids: readonly number[];
  readonly buffers: ReadonlySet<GPUBuffer>;
  readonly group: GPUBindGroup;
  readonly hash: number;
}

/**
 * Bind groups by pipeline and bound buffers. The uniforms are bound at a dynamic offset, so a bind group
 * depends only on the buffers, which the pool hands out again step after step: creating one costs about
 * 30 us of CPU per dispatch in Deno, more than recording the dispatch. Found by a hash of the pipeline's
 * and the buffers' ids (entries of equal hashes share a bucket): a string key, the ids joined, made a bare
 * dispatch's host time about 1.5 times as long on lavapipe (1.1 against 0.75 us). Entries of a buffer are
 * dropped when the pool destroys it.
 */
const bindGroups = new Map<number, BindEntry[]>();
let bindGroupTotal = 0;
const MAX_BIND_GROUPS = 16384;
const entriesOfBuffer = new Map<GPUBuffer, Set<BindEntry>>();

/** Mixes one number into a hash, kept within V8's small integers (fast Map keys): the bind groups' cache and
 * `KeyedCache` (matmul's plans) hash their keys with it. */
export function mix(h: number, id: number): number {
  return Math.imul(h ^ id, 0x01000193) & 0x3fffffff;
}

function findBindGroup(
  p: PipelineEntry,
  hash: number,
  ringId: number,
  storages: Storage[],
): BindEntry | null {
  const bucket = bindGroups.get(hash);
  if (!bucket) return null;
  for (const e of bucket) {
    if (e.pipeline !== p || e.ids[0] !== ringId) continue;
    let i = 0;
    while (i < storages.length && e.ids[i + 1] === storages[i].bufferId) i++;
    if (i === storages.length) return e;
  }
  return null;
}

let listening = false; // registered on first use: memory.ts may not be initialised when this module is

function forgetBuffer(b: GPUBuffer): void {
  for (const e of entriesOfBuffer.get(b) ?? []) {
    const bucket = bindGroups.get(e.hash)!;
    bucket.splice(bucket.indexOf(e), 1);
    if (bucket.length === 0) bindGroups.delete(e.hash);
    bindGroupTotal--;
    // the group's other buffers (parameters live long) must not keep the entry
    for (const other of e.buffers) if (other !== b) entriesOfBuffer.get(other)?.delete(e);
  }
  entriesOfBuffer.delete(b);
}

/** Number of cached bind groups (for tests of the cache). */
export function bindGroupCount(): number {
  return bindGroupTotal;
}

/** Bind-group entries listed under live buffers, summed over the buffers (for tests: equals the sum over
 * the cached groups of their distinct buffers, so no entry outlives its group). */
export function bindGroupKeyCount(): number {
  let n = 0;
  for (const entries of entriesOfBuffer.values()) n += entries.size;
  return n;
}

/** Uniform values by field name: numbers, or 4-element arrays for vec4 fields. */
export type UniformValues = Record<string, number | readonly number[]>;

/**
 * Records a dispatch of `groups` workgroups (any count; folded into 2-D past the device's
 * maxComputeWorkgroupsPerDimension).
 * `buffers` maps each declared buffer name to the storage it binds.
 */
export function dispatch(
  k: Kernel,
  buffers: Record<string, Storage>,
  uniforms: UniformValues,
  groups: number,
) {
  if (groups <= 0) return;
  const { limits } = deviceInfo();
  const maxDim = limits.maxComputeWorkgroupsPerDimension;
  const seg = windowBytes();
  const decls = k.spec.buffers;
  // Plain loops: this runs for every dispatch, and on a GPU the host's time per dispatch bounds small work.
  const storages: Storage[] = new Array(decls.length);
  const windows: number[] = new Array(decls.length);
  let bindings = 0;
  let packed = 0; // bit i: buffer i holds bf16 pairs
  for (let i = 0; i < decls.length; i++) {
    const s = buffers[decls[i].name];
    if (!s) throw new Error(`kernel ${k.spec.name}: buffer '${decls[i].name}' not given`);
    storages[i] = s;
    bindings += windows[i] = Math.max(1, Math.ceil(s.size / seg));
    if (s.bf16) {
      const problem = packedProblem(decls[i]);
      if (problem) throw new Error(`kernel ${k.spec.name}: ${problem}`);
      packed |= 1 << i;
    }
  }
  // WebGPU forbids a writable storage binding that aliases another binding of the same dispatch (browsers
  // reject it; Deno's wgpu does not check): say so here, on every adapter.
  for (let i = 0; i < decls.length; i++) {
    if (decls[i].access !== "read_write") continue;
    for (let j = 0; j < storages.length; j++) {
      if (j !== i && storages[j].buffer === storages[i].buffer) {
        throw new Error(
          `kernel ${k.spec.name}: writable buffer '${decls[i].name}' is the same GPU buffer as '${
            decls[j].name
          }' (writable bindings must not alias)`,
        );
      }
    }
  }
  if (bindings > limits.maxStorageBuffersPerShaderStage) {
    const sizes = decls.map((b, i) => `${b.name} ${storages[i].size} B`).join(", ");
    throw new Error(
      `kernel ${k.spec.name}: needs ${bindings} storage bindings (${sizes}; a buffer over the ${seg}-byte ` +
        `binding window takes one per window), the device allows ${limits.maxStorageBuffersPerShaderStage}`,
    );
  }
  const p = packed === 0 && bindings === decls.length
    ? singleWindowPipeline(k, windows)
    : pipelineFor(k, windows, packed);
  const at = reserveUniforms(k.uniformBytes);
  writeUniform(k, at, "_groups", groups);
  for (const name in uniforms) writeUniform(k, at, name, uniforms[name]);
  const ring = uniformRingBuffer();
  const ringId = bufferId(ring);
  let hash = mix(p.id, ringId);
  for (let i = 0; i < storages.length; i++) hash = mix(hash, storages[i].bufferId);
  const bindGroup = (findBindGroup(p, hash, ringId, storages) ??
    newBindGroup(k, p, hash, ring, storages, windows, seg)).group;
  const x = Math.min(groups, maxDim);
  const y = Math.ceil(groups / x);
  if (y > maxDim) throw new Error(`kernel ${k.spec.name}: ${groups} workgroups exceed ${maxDim}^2`);
  recordDispatch(p.pipeline, bindGroup, x, y, at);
}

/**
 * Records an elementwise kernel over `n` elements (its uniform `n`; each invocation `gid < P.n` touches
 * element `gid` of the buffers named in `spanned`, which all have the element type of their declaration, and
 * may read the other buffers whole). Where binding the buffers whole takes more storage bindings than the
 * device allows (a buffer over the binding window takes one per window: AdamW on a 154 MB embedding needs 9
 * at WebGPU's default 128 MiB and 8), it records one dispatch per window-sized span of the elements instead,
 * each binding only its span of the spanned buffers. The same arithmetic, element for element.
 */
export function dispatchElementwise(
  k: Kernel,
  buffers: Record<string, Storage>,
  spanned: readonly string[],
  uniforms: UniformValues,
  n: number,
): void {
  const seg = windowBytes();
  const wg = k.spec.workgroupSize;
  let bindings = 0;
  for (const b of k.spec.buffers) bindings += Math.max(1, Math.ceil((buffers[b.name]?.size ?? 0) / seg));
  if (bindings <= deviceInfo().limits.maxStorageBuffersPerShaderStage) {
    dispatch(k, buffers, { ...uniforms, n }, Math.ceil(n / wg));
    return;
  }
  const bytes = spanned.map((name) => {
    const decl = k.spec.buffers.find((b) => b.name === name);
    if (!decl) throw new Error(`kernel ${k.spec.name}: no buffer '${name}' to span`);
    // its spans would be counted in 32-bit elements and lose the packing: refused, not read as raw words
    if (buffers[name].bf16) {
      throw new Error(`kernel ${k.spec.name}: a bf16 buffer ('${name}') cannot be spanned`);
    }
    return ELEM_BYTES[decl.type];
  });
  // elements per span: at most a window of every spanned buffer, and a multiple of `step` so that each span
  // starts 256-byte aligned (the binding offset alignment) in every buffer, also where their elements differ
  // in size (a whole window of vec4s is a quarter window of f32s, not a multiple of 256 bytes in general)
  const step = 256 / Math.min(...bytes);
  const per = Math.floor(seg / Math.max(...bytes) / step) * step;
  if (per === 0) throw new Error(`kernel ${k.spec.name}: a ${seg}-byte binding window is too small to span`);
  for (let at = 0; at < n; at += per) {
    const count = Math.min(per, n - at);
    const spans = { ...buffers };
    spanned.forEach((name, i) => spans[name] = storageSpan(buffers[name], at * bytes[i], count * bytes[i]));
    dispatch(k, spans, { ...uniforms, n: count }, Math.ceil(count / wg));
  }
}

/** The pipeline of a kernel whose buffers each fit one binding window (the common case), found without
 * building its cache key. */
const singleWindow = new WeakMap<Kernel, PipelineEntry>();
function singleWindowPipeline(k: Kernel, windows: number[]): PipelineEntry {
  let p = singleWindow.get(k);
  if (!p) singleWindow.set(k, p = pipelineFor(k, windows));
  return p;
}

/** Writes one uniform field (a number, or the elements of a vec4) at the dispatch's ring offset `at`. */
function writeUniform(k: Kernel, at: number, name: string, value: number | readonly number[]): void {
  const f = k.uniformOffsets.get(name);
  if (!f) throw new Error(`kernel ${k.spec.name}: unknown uniform '${name}'`);
  const [off, type] = f;
  const v = uniformView;
  const signed = type === "i32" || type === "vec4<i32>";
  if (typeof value === "number") {
    if (type === "f32") v.setFloat32(at + off, value, true);
    else if (signed) v.setInt32(at + off, value, true);
    else v.setUint32(at + off, value, true);
    return;
  }
  for (let j = 0; j < value.length; j++) {
    if (type === "f32") v.setFloat32(at + off + 4 * j, value[j], true);
    else if (signed) v.setInt32(at + off + 4 * j, value[j], true);
    else v.setUint32(at + off + 4 * j, value[j], true);
  }
}

/** Creates and caches the bind group of a pipeline and its buffers (each buffer bound once per window). */
function newBindGroup(
  k: Kernel,
  p: PipelineEntry,
  hash: number,
  ring: GPUBuffer,
  storages: Storage[],
  windows: number[],
  seg: number,
): BindEntry {
  const entries: GPUBindGroupEntry[] = [
    { binding: 0, resource: { buffer: ring, offset: 0, size: k.uniformBytes } },
  ];
  let binding = 1;
  storages.forEach((s, i) => {
    const size = s.size;
    for (let w = 0; w < windows[i]; w++) {
      const offset = w * seg;
      entries.push({
        binding: binding++,
        resource: { buffer: s.buffer, offset: s.offset + offset, size: Math.min(seg, size - offset) },
      });
    }
  });
  if (!listening) onBufferDestroyed(forgetBuffer);
  listening = true;
  const group = gpuDevice().createBindGroup({ layout: p.layout, entries, label: k.spec.name });
  if (bindGroupTotal >= MAX_BIND_GROUPS) {
    // A safety valve for workloads whose buffers keep changing: start over rather than grow without bound.
    bindGroups.clear();
    entriesOfBuffer.clear();
    bindGroupTotal = 0;
  }
  const ids = [bufferId(ring), ...storages.map((s) => s.bufferId)];
  const buffers = new Set(storages.map((s) => s.buffer));
  const e: BindEntry = { pipeline: p, ids, buffers, group, hash };
  const bucket = bindGroups.get(hash);
  if (bucket) bucket.push(e);
  else bindGroups.set(hash, [e]);
  bindGroupTotal++;
  for (const b of buffers) {
    let set = entriesOfBuffer.get(b);
    if (!set) entriesOfBuffer.set(b, set = new Set());
    set.add(e);
  }
  return e;
}
