/**
 * Safetensors reader and writer in plain TypeScript (no runtime APIs, so it runs in browsers too).
 *
 * Format: an 8-byte little-endian u64 N, N bytes of UTF-8 JSON (tensor name -> dtype, shape, data_offsets
 * relative to the data section, plus an optional `__metadata__` object of strings), then the data section.
 * The header is validated strictly; every error is a {@linkcode SafetensorsError} naming the source.
 * @module
 */

/** Element types that the header may name. */
export type SafetensorsDtype = "F32" | "F16" | "BF16" | "I32" | "I64" | "F64" | "U8" | "I8" | "I16" | "BOOL";

/** One tensor's header entry. */
export interface SafetensorsEntry {
  /** Element type as stored in the file. */
  dtype: SafetensorsDtype;
  /** Dimensions (non-negative integers; `[]` is a scalar). */
  shape: number[];
  /** `[begin, end)` byte range relative to the start of the data section. */
  dataOffsets: [number, number];
}

/** A parsed and validated header. */
export interface SafetensorsHeader {
  /** Tensor entries, ordered by their begin offset. */
  entries: Map<string, SafetensorsEntry>;
  /** The `__metadata__` object (empty if absent). */
  metadata: Record<string, string>;
  /** Absolute byte offset of the data section (8 + header length). */
  dataStart: number;
}

/** A decoded tensor: floating dtypes become f32, integer dtypes int32. */
export interface DecodedTensor {
  /** Element type as stored in the file. */
  dtype: SafetensorsDtype;
  /** Dimensions. */
  shape: number[];
  /** Values in row-major order. */
  data: Float32Array<ArrayBuffer> | Int32Array<ArrayBuffer>;
}

/** A whole parsed file. */
export interface ParsedSafetensors {
  /** The validated header. */
  header: SafetensorsHeader;
  /** Decoded tensors, in header order. */
  tensors: Map<string, DecodedTensor>;
}

/** A tensor to serialize. `dtype` defaults to F32 for Float32Array data and I32 for Int32Array data. */
export interface SafetensorsInput {
  /** Dimensions; their product must equal `data.length`. */
  shape: number[];
  /** Values in row-major order. */
  data: Float32Array | Int32Array;
  /** Stored type; F16 and BF16 are rounded from f32 to nearest even. */
  dtype?: "F32" | "I32" | "F16" | "BF16";
}

/** Malformed safetensors data or invalid input to the writer; the message names the source and problem. */
export class SafetensorsError extends Error {
  /** Creates the error; `options.cause` keeps an underlying error. */
  constructor(message: string, options?: ErrorOptions) {
    super(message, options);
    this.name = "SafetensorsError";
  }
}

/** Largest accepted header, the bound of the Rust `safetensors` crate (guards against huge allocations). */
export const MAX_HEADER_LENGTH = 100_000_000;

const DTYPE_SIZE: Record<SafetensorsDtype, number> = {
  F32: 4,
  F16: 2,
  BF16: 2,
  I32: 4,
  I64: 8,
  F64: 8,
  U8: 1,
  I8: 1,
  I16: 2,
  BOOL: 1,
};

// Typed-array views use host byte order; the file is little-endian.
const LITTLE_ENDIAN = new Uint8Array(new Uint16Array([1]).buffer)[0] === 1;

// A declaration (not an arrow) so that TypeScript narrows types after `if (...) fail(...)`.
function fail(source: string | undefined, msg: string): never {
  throw new SafetensorsError(`${source ?? "safetensors data"}: ${msg}`);
}

const isCount = (v: unknown): v is number => Number.isSafeInteger(v) && (v as number) >= 0;

/** Deepest nesting of objects and arrays a header may have (it needs 3); model JSON files (config.json,
 * tokenizer.json, the shard index) keep to it too. */
export const MAX_JSON_DEPTH = 64;

/** How deep `text`'s objects and arrays nest, counted up to `stop` + 1 (strings skipped; a scan, no parse):
 * checked before `JSON.parse`, which took seconds and GBs for a text nested a million deep. */
export function jsonDepth(text: string, stop: number): number {
  let depth = 0, deepest = 0;
  for (let i = 0; i < text.length && deepest <= stop; i++) {
    const c = text.charCodeAt(i);
    if (c === 0x7b /* { */ || c === 0x5b /* [ */) deepest = Math.max(deepest, ++depth);
    else if (c === 0x7d /* } */ || c === 0x5d /* ] */) depth--;
    else if (c === 0x22 /* " */) {
      for (i++; i < text.length && text.charCodeAt(i) !== 0x22; i++) {
        if (text.charCodeAt(i) === 0x5c /* \ */) i++;
      }
    }
  }
  return deepest;
}

/**
 * The first key that occurs twice in one object of `text` (which must be valid JSON, e.g. text that
 * `JSON.parse` accepted), named with the keys of the objects around it (`"a" in "b"`), or null if no key
 * repeats. `JSON.parse` keeps the last of two equal keys silently, which would drop an entry of a corrupt file.
 */
export function duplicateJsonKey(text: string): string | null {
  // One frame per open object (its keys so far, its name) or array (null keys).
  const stack: { keys: Set<string> | null; name: string | null }[] = [];
  let lastKey: string | null = null;
  let expectKey = false;
  for (let i = 0; i < text.length; i++) {
    const c = text.charCodeAt(i);
    if (c === 0x7b /* { */ || c === 0x5b /* [ */) {
      const parent = stack.at(-1);
      stack.push({
        keys: c === 0x7b ? new Set() : null,
        name: parent?.keys ? lastKey : parent?.name ?? null,
      });
      expectKey = c === 0x7b;
    } else if (c === 0x7d /* } */ || c === 0x5d /* ] */) {
      stack.pop();
      expectKey = false;
    } else if (c === 0x2c /* , */) {
      expectKey = !!stack.at(-1)?.keys;
    } else if (c === 0x22 /* " */) {
      let j = i + 1;
      while (text.charCodeAt(j) !== 0x22) j += text.charCodeAt(j) === 0x5c /* \ */ ? 2 : 1;
      if (expectKey) {
        const key = JSON.parse(text.slice(i, j + 1)) as string;
        const frame = stack.at(-1)!;
        if (frame.keys!.has(key)) {
          const names = stack.map((f) => f.name).filter((n) => n !== null).map((n) => JSON.stringify(n));
          return [JSON.stringify(key), ...names.reverse()].join(" in ");
        }
        frame.keys!.add(key);
        lastKey = key;
        expectKey = false;
      }
      i = j;
    }
  }
  return null;
}

/**
 * Reads the header length N from the first 8 bytes; a streaming reader then reads `8 + N` bytes and calls
 * {@linkcode parseSafetensorsHeader}. Throws if fewer than 8 bytes are given or N exceeds 100,000,000 bytes
 * (the bound of the Rust `safetensors` crate, which guards against huge allocations).
 */
export function safetensorsHeaderLength(prefix: Uint8Array, source?: string): number {
  if (prefix.length < 8) fail(source, `need at least 8 bytes for the header length, got ${prefix.length}`);
  const n = new DataView(prefix.buffer, prefix.byteOffset, 8).getBigUint64(0, true);
  if (n > BigInt(MAX_HEADER_LENGTH)) {
    fail(
      source,
      `header length ${n} exceeds the ${MAX_HEADER_LENGTH}-byte bound (corrupt or not safetensors)`,
    );
  }
  return Number(n);
}

/**
 * Parses and validates the header. `prefix` holds the first bytes of the file (at least `8 + N`, see
 * {@linkcode safetensorsHeaderLength}). As the `safetensors` library, it requires the tensors to tile the
 * data section exactly: no gaps, no overlaps, and no bytes after the last tensor. `fileSize` is the whole
 * file's size, used to check the data offsets; null when it is not known (a streamed HTTP body without
 * Content-Length), in which case the caller must check that the file ends where the last tensor does.
 * `source` (e.g. a file name) prefixes every error message. `anyDtype`: a dtype this module does not read
 * (U32, F8_E4M3: the spec has more) is let through, its entry's size unchecked (a check of the file's
 * structure, as the hub cache's, where what the loader reads is not its business).
 */
export function parseSafetensorsHeader(
  prefix: Uint8Array,
  fileSize: number | null,
  source?: string,
  anyDtype = false,
): SafetensorsHeader {
  if (fileSize !== null && fileSize < 8) {
    fail(source, `file is ${fileSize} bytes, shorter than the 8-byte header length field`);
  }
  const n = safetensorsHeaderLength(prefix, source);
  if (fileSize !== null && 8 + n > fileSize) {
    fail(source, `header length ${n} exceeds the file size ${fileSize} (8 + ${n} needed)`);
  }
  if (prefix.length < 8 + n) fail(source, `need ${8 + n} bytes to parse the header, got ${prefix.length}`);
  const dataLength = fileSize === null ? Infinity : fileSize - 8 - n;

  let json: unknown;
  let text: string;
  try {
    // ignoreBOM: a byte-order mark is kept, so JSON.parse refuses it (the Rust crate does too).
    text = new TextDecoder("utf-8", { fatal: true, ignoreBOM: true }).decode(prefix.subarray(8, 8 + n));
  } catch (e) {
    fail(source, `header is not valid UTF-8 JSON (${(e as Error).message})`);
  }
  // A header nests 3 levels (tensor, its shape); a hostile one nested a million deep took seconds and GBs in
  // JSON.parse before its error (serde_json, the Rust crate's parser, stops at 128).
  const depth = jsonDepth(text, MAX_JSON_DEPTH);
  if (depth > MAX_JSON_DEPTH) {
    fail(source, `header nests deeper than ${MAX_JSON_DEPTH} levels (corrupt header)`);
  }
  try {
    json = JSON.parse(text);
  } catch (e) {
    fail(source, `header is not valid UTF-8 JSON (${(e as Error).message})`);
  }
  if (typeof json !== "object" || json === null || Array.isArray(json)) {
    fail(source, "header is not a JSON object");
  }
  const dup = duplicateJsonKey(text);
  if (dup !== null) fail(source, `header has the key ${dup} twice (corrupt header)`);

  let metadata: Record<string, string> = {};
  const entries: [string, SafetensorsEntry][] = [];
  for (const [name, raw] of Object.entries(json)) {
    if (name === "__metadata__") {
      if (typeof raw !== "object" || raw === null || Array.isArray(raw)) {
        fail(source, "__metadata__ is not an object");
      }
      for (const [k, v] of Object.entries(raw)) {
        if (typeof v !== "string") fail(source, `__metadata__ value "${k}" is not a string`);
      }
      metadata = Object.fromEntries(Object.entries(raw));
      continue;
    }
    const what = `tensor "${name}"`;
    if (typeof raw !== "object" || raw === null || Array.isArray(raw)) {
      fail(source, `${what} is not an object`);
    }
    const { dtype, shape, data_offsets: offs } = raw as Record<string, unknown>;
    if (typeof dtype !== "string") fail(source, `${what}: missing or non-string dtype`);
    const known = Object.hasOwn(DTYPE_SIZE, dtype);
    if (!known && !anyDtype) {
      fail(source, `${what}: unknown dtype "${dtype}" (known: ${Object.keys(DTYPE_SIZE).join(", ")})`);
    }
    if (!Array.isArray(shape) || !shape.every(isCount)) {
      fail(source, `${what}: shape must be an array of non-negative integers, got ${JSON.stringify(shape)}`);
    }
    if (!Array.isArray(offs) || offs.length !== 2 || !offs.every(isCount) || offs[0] > offs[1]) {
      fail(
        source,
        `${what}: data_offsets must be [begin, end] with 0 <= begin <= end, got ${JSON.stringify(offs)}`,
      );
    }
    const [begin, end] = offs as [number, number];
    const size = DTYPE_SIZE[dtype as SafetensorsDtype];
    const expected = shape.reduce((a, b) => a * b, size);
    if (known && expected !== end - begin) {
      fail(
        source,
        `${what}: shape ${JSON.stringify(shape)} x ${dtype} (${size} bytes) needs ${expected} bytes, ` +
          `but data_offsets [${begin}, ${end}] hold ${end - begin}`,
      );
    }
    if (end > dataLength) {
      fail(
        source,
        `${what}: data_offsets [${begin}, ${end}] go past the end of the data section ` +
          `(${dataLength} bytes; file truncated?)`,
      );
    }
    entries.push([name, {
      dtype: dtype as SafetensorsDtype,
      shape: shape as number[],
      dataOffsets: [begin, end],
    }]);
  }

  // JSON.parse reads 2.0 and 2e0 as 2; the Rust crate and Python refuse them (expected usize). With the strings
  // out of the way, a number with a fraction or an exponent is a digit followed by '.', 'e' or 'E'. (Checked
  // after the entries, whose errors name a 1.5 or a -1.)
  const real = text.replace(/"(?:[^"\\]|\\.)*"/g, '""').match(/\d+(?:\.\d*)?[.eE][-+\d]*/);
  if (real) {
    fail(source, `header has a number that is not an integer (${real[0]}): shapes and offsets are counts`);
  }

  // The layout rule of the safetensors library: sorted by offsets, the tensors tile the data section, each
  // starting where the previous one ends, and the last one ends at the end of the file. Checking the end
  // catches a header length that was shortened into the header's padding, which would shift every tensor.
  entries.sort(([, a], [, b]) => a.dataOffsets[0] - b.dataOffsets[0] || a.dataOffsets[1] - b.dataOffsets[1]);
  let at = 0;
  let prev = "the start of the data section";
  for (const [name, { dataOffsets: [begin, end] }] of entries) {
    if (begin !== at) {
      fail(
        source,
        `tensor "${name}" [${begin}, ${end}] ${begin < at ? "overlaps" : "leaves a gap after"} ${prev}, ` +
          `which ends at byte ${at}: tensors must tile the data section (safetensors layout)`,
      );
    }
    at = end;
    prev = `tensor "${name}"`;
  }
  if (fileSize !== null && at !== dataLength) {
    fail(
      source,
      `the tensors end at byte ${at} of the data section, which holds ${dataLength} bytes ` +
        `(wrong header length, or extra bytes after the data)`,
    );
  }
  return { entries: new Map(entries), metadata, dataStart: 8 + n };
}

let f16Table: Float32Array | undefined;

// Exact f16 -> f32 for every bit pattern (normals, subnormals, ±0, ±inf, NaN), built once on first use.
function f16ToF32Table(): Float32Array {
  if (f16Table) return f16Table;
  f16Table = new Float32Array(65536);
  for (let h = 0; h < 65536; h++) {
    const sign = h & 0x8000 ? -1 : 1;
    const exp = (h >> 10) & 0x1f;
    const mant = h & 0x3ff;
    f16Table[h] = exp === 0
      ? sign * mant * 2 ** -24
      : exp === 31
      ? (mant ? NaN : sign * Infinity)
      : sign * (1024 + mant) * 2 ** (exp - 25);
  }
  return f16Table;
}

/**
 * Decodes one tensor's little-endian bytes (exactly shape product x dtype size of them, any alignment).
 * F32, F16, BF16 and F64 become a Float32Array (F16/BF16 exactly, F64 rounded); I32, I64, I16, I8, U8 and
 * BOOL become an Int32Array. Throws if an I64 value does not fit in int32. Always returns a fresh copy.
 */
export function decodeTensor(
  entry: SafetensorsEntry,
  bytes: Uint8Array,
  name: string,
): Float32Array<ArrayBuffer> | Int32Array<ArrayBuffer> {
  if (!Object.hasOwn(DTYPE_SIZE, entry.dtype)) {
    throw new SafetensorsError(`tensor "${name}": unknown dtype "${entry.dtype}"`);
  }
  const count = entry.shape.reduce((a, b) => a * b, 1);
  const nbytes = count * DTYPE_SIZE[entry.dtype];
  if (bytes.length !== nbytes) {
    throw new SafetensorsError(
      `tensor "${name}": shape [${entry.shape}] x ${entry.dtype} needs ${nbytes} bytes, got ${bytes.length}`,
    );
  }
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  switch (entry.dtype) {
    // On little-endian hosts one memcpy into a fresh (hence aligned) buffer; otherwise swap per element.
    case "F32": {
      const out = new Float32Array(count);
      if (LITTLE_ENDIAN) new Uint8Array(out.buffer).set(bytes);
      else for (let i = 0; i < count; i++) out[i] = view.getFloat32(4 * i, true);
      return out;
    }
    case "I32": {
      const out = new Int32Array(count);
      if (LITTLE_ENDIAN) new Uint8Array(out.buffer).set(bytes);
      else for (let i = 0; i < count; i++) out[i] = view.getInt32(4 * i, true);
      return out;
    }
    case "F16": {
      const table = f16ToF32Table();
      const out = new Float32Array(count);
      for (let i = 0; i < count; i++) out[i] = table[view.getUint16(2 * i, true)];
      return out;
    }
    case "BF16": {
      // bf16 is the top half of an f32: shifting the bits back is exact and keeps NaN payloads.
      const out = new Float32Array(count);
      const bits = new Uint32Array(out.buffer);
      for (let i = 0; i < count; i++) bits[i] = view.getUint16(2 * i, true) << 16;
      return out;
    }
    case "F64": {
      const out = new Float32Array(count);
      for (let i = 0; i < count; i++) out[i] = view.getFloat64(8 * i, true);
      return out;
    }
    case "I64": {
      const out = new Int32Array(count);
      for (let i = 0; i < count; i++) {
        const lo = view.getInt32(8 * i, true);
        // Fits in int32 iff the high word is the sign extension of the low word.
        if (view.getInt32(8 * i + 4, true) !== (lo < 0 ? -1 : 0)) {
          const value = view.getBigInt64(8 * i, true);
          throw new SafetensorsError(
            `tensor "${name}": I64 value ${value} at index ${i} does not fit in int32`,
          );
        }
        out[i] = lo;
      }
      return out;
    }
    case "I16": {
      const out = new Int32Array(count);
      for (let i = 0; i < count; i++) out[i] = view.getInt16(2 * i, true);
      return out;
    }
    case "I8":
      return Int32Array.from(new Int8Array(bytes.buffer, bytes.byteOffset, count));
    case "U8":
    case "BOOL":
      return Int32Array.from(bytes);
  }
}

/** Parses a whole file held in memory: validates the header, then decodes every tensor. */
export function parseSafetensors(bytes: Uint8Array, source?: string): ParsedSafetensors {
  const header = parseSafetensorsHeader(bytes, bytes.length, source);
  const tensors = new Map<string, DecodedTensor>();
  for (const [name, entry] of header.entries) {
    const [begin, end] = entry.dataOffsets;
    const raw = bytes.subarray(header.dataStart + begin, header.dataStart + end);
    let data;
    try {
      data = decodeTensor(entry, raw, name);
    } catch (e) {
      fail(source, (e as Error).message); // an I64 value past int32: the message names the tensor and index
    }
    tensors.set(name, { dtype: entry.dtype, shape: entry.shape, data });
  }
  return { header, tensors };
}

const WRITABLE: string[] = ["F32", "I32", "F16", "BF16"];
const f32Scratch = new Float32Array(1);
const u32Scratch = new Uint32Array(f32Scratch.buffer);

// f32 -> f16 bits, round to nearest even; overflow gives ±inf, NaN stays a (quiet) NaN.
function f32ToF16Bits(x: number): number {
  f32Scratch[0] = x;
  const bits = u32Scratch[0];
  const sign = (bits >>> 16) & 0x8000;
  const exp = (bits >>> 23) & 0xff;
  const mant = bits & 0x7fffff;
  if (exp === 0xff) return sign | 0x7c00 | (mant ? 0x200 | (mant >>> 13) : 0);
  if (exp > 142) return sign | 0x7c00; // unbiased exponent > 15
  // Normal halves drop 13 mantissa bits; subnormal halves (exp <= 112) shift the full significand further.
  const shift = exp > 112 ? 13 : 126 - exp;
  if (shift > 24) return sign; // below half the smallest subnormal: rounds to ±0
  const sig = exp > 112 ? ((exp - 112) << 23) | mant : mant | 0x800000;
  let half = sig >>> shift;
  const rest = sig & ((1 << shift) - 1);
  const halfway = 1 << (shift - 1);
  // A carry out of the mantissa correctly bumps the exponent (up to inf).
  if (rest > halfway || (rest === halfway && (half & 1))) half++;
  return sign | half;
}

// f32 -> bf16 bits, round to nearest even; NaN stays a (quiet) NaN.
function f32ToBf16Bits(x: number): number {
  f32Scratch[0] = x;
  const bits = u32Scratch[0];
  if ((bits & 0x7fffffff) > 0x7f800000) return (bits >>> 16) | 0x40;
  return (bits + 0x7fff + ((bits >>> 16) & 1)) >>> 16;
}

/** The writable dtypes in the Rust crate's `Dtype` order, which its writer sorts by (descending). */
const DTYPE_RANK: Record<string, number> = { F16: 0, BF16: 1, I32: 2, F32: 3 };

/**
 * Serializes tensors and optional string metadata. As the Rust `safetensors` crate (and so Python's
 * `save_file`), the tensors are stored back to back by dtype, widest first (F32, I32, BF16, F16), then by name:
 * every tensor starts at a multiple of its element size, which zero-copy loaders need. The header is
 * padded with spaces to a multiple of 8 bytes so the data section is aligned. Throws
 * {@linkcode SafetensorsError} naming the tensor if `data.length` does not match the shape or the dtype does
 * not fit the data's array type.
 */
export function serializeSafetensors(
  tensors: Record<string, SafetensorsInput>,
  metadata?: Record<string, string>,
): Uint8Array<ArrayBuffer> {
  // Null prototype so a tensor named "__proto__" is an ordinary key.
  const header: Record<string, unknown> = Object.create(null);
  if (metadata) {
    for (const [k, v] of Object.entries(metadata)) {
      if (typeof v !== "string") {
        throw new SafetensorsError(`serializeSafetensors: metadata "${k}" is not a string`);
      }
    }
    header.__metadata__ = metadata;
  }
  const plan: { data: Float32Array | Int32Array; dtype: string; begin: number }[] = [];
  let offset = 0;
  const rank = ([, t]: [string, SafetensorsInput]) =>
    DTYPE_RANK[t?.dtype ?? (t?.data instanceof Int32Array ? "I32" : "F32")] ?? 0; // (bad ones refused below)
  const ordered = Object.entries(tensors).sort((a, b) =>
    rank(b) - rank(a) || (a[0] < b[0] ? -1 : +(a[0] > b[0]))
  );
  for (const [name, { shape, data, dtype: given }] of ordered) {
    const what = `serializeSafetensors: tensor "${name}"`;
    if (name === "__metadata__") throw new SafetensorsError(`${what}: the name is reserved`);
    if (!Array.isArray(shape) || !shape.every(isCount)) {
      throw new SafetensorsError(
        `${what}: shape must be non-negative integers, got ${JSON.stringify(shape)}`,
      );
    }
    const isFloat = data instanceof Float32Array;
    if (!isFloat && !(data instanceof Int32Array)) {
      throw new SafetensorsError(`${what}: data must be a Float32Array or Int32Array`);
    }
    const count = shape.reduce((a, b) => a * b, 1);
    if (data.length !== count) {
      throw new SafetensorsError(`${what}: shape [${shape}] needs ${count} values, data has ${data.length}`);
    }
    const dtype = given ?? (isFloat ? "F32" : "I32");
    // Float data may be stored as F32/F16/BF16, int data only as I32.
    if (!WRITABLE.includes(dtype) || isFloat !== (dtype !== "I32")) {
      throw new SafetensorsError(`${what}: cannot store ${data.constructor.name} data as dtype ${dtype}`);
    }
    const nbytes = count * DTYPE_SIZE[dtype];
    header[name] = { dtype, shape, data_offsets: [offset, offset + nbytes] };
    plan.push({ data, dtype, begin: offset });
    offset += nbytes;
  }

  const json = new TextEncoder().encode(JSON.stringify(header));
  const padded = Math.ceil(json.length / 8) * 8;
  const out = new Uint8Array(8 + padded + offset);
  const view = new DataView(out.buffer);
  view.setBigUint64(0, BigInt(padded), true);
  out.set(json, 8);
  out.fill(0x20, 8 + json.length, 8 + padded); // spaces are valid trailing JSON whitespace
  const start = 8 + padded;
  for (const { data, dtype, begin } of plan) {
    const at = start + begin;
    if (dtype === "F16" || dtype === "BF16") {
      const conv = dtype === "F16" ? f32ToF16Bits : f32ToBf16Bits;
      for (let i = 0; i < data.length; i++) view.setUint16(at + 2 * i, conv(data[i]), true);
    } else if (LITTLE_ENDIAN) {
      out.set(new Uint8Array(data.buffer, data.byteOffset, data.byteLength), at);
    } else if (dtype === "F32") {
      for (let i = 0; i < data.length; i++) view.setFloat32(at + 4 * i, data[i], true);
    } else {
      for (let i = 0; i < data.length; i++) view.setInt32(at + 4 * i, data[i], true);
    }
  }
  return out;
}
