/**
 * One tensor's bytes read from a sequential source and decoded to f32, for the loaders of safetensors and
 * PyTorch checkpoints.
 * @module
 */

import { decodeTensor, type SafetensorsEntry } from "../core/safetensors.ts";
import { fmt } from "../core/shape.ts";
import type { Tensor } from "../core/tensor.ts";
import type { ByteSource } from "./byte_source.ts";

const LITTLE_ENDIAN = new Uint8Array(new Uint16Array([1]).buffer)[0] === 1;
const CHUNK_BYTES = 4 << 20;

/** Reads one tensor's bytes from `src` (positioned at them) and decodes them to f32, F32 straight into the
 * result, F16/BF16 (and big-endian hosts) a few MiB at a time, so that only the decoded tensor is held. */
export async function readTensor(
  src: Pick<ByteSource, "readExact">,
  entry: SafetensorsEntry,
  name: string,
): Promise<Float32Array> {
  const count = entry.shape.reduce((a, b) => a * b, 1);
  const nbytes = entry.dataOffsets[1] - entry.dataOffsets[0];
  if (entry.dtype === "F32" && LITTLE_ENDIAN) {
    const out = new Float32Array(count);
    await src.readExact(new Uint8Array(out.buffer));
    return out;
  }
  if (entry.dtype === "F16" || entry.dtype === "BF16" || entry.dtype === "F32") {
    const size = entry.dtype === "F32" ? 4 : 2;
    const out = new Float32Array(count);
    const per = Math.max(1, Math.floor(CHUNK_BYTES / size));
    const raw = new Uint8Array(Math.min(nbytes, per * size));
    for (let at = 0; at < count; at += per) {
      const m = Math.min(per, count - at);
      const bytes = raw.subarray(0, m * size);
      await src.readExact(bytes);
      out.set(decodeTensor({ dtype: entry.dtype, shape: [m], dataOffsets: [0, m * size] }, bytes, name), at);
    }
    return out;
  }
  const raw = new Uint8Array(nbytes);
  await src.readExact(raw);
  return decodeTensor(entry, raw, name) as Float32Array; // F64: the callers admit no other dtype
}

/** The dtypes that load into the (f32) parameters; integer and bool tensors are refused, not converted. */
export const FLOAT_DTYPES = new Set(["F32", "F16", "BF16", "F64"]);

/** One checkpoint tensor to load: the parameter it goes to, its dtype and shape, and how to name it. */
export interface Loadable {
  /** Our parameter name. */
  param: string;
  /** Stored dtype. */
  dtype: string;
  /** Stored shape. */
  shape: readonly number[];
  /** The tensor, for a message: name, dtype, shape and where it lies. */
  describe: () => string;
}

/** Checks, before any read, that every tensor is a float and has its parameter's shape (in `params`). */
export function checkLoadable(list: Iterable<Loadable>, params: Map<string, Tensor>, where: string): void {
  const mismatched: string[] = [];
  for (const t of list) {
    if (!FLOAT_DTYPES.has(t.dtype)) {
      throw new Error(`${where}: ${t.describe()}; expected a float dtype (F32, F16, BF16 or F64)`);
    }
    const p = params.get(t.param)!;
    if (t.shape.join() !== p.shape.join()) {
      mismatched.push(`${t.param}: checkpoint ${fmt(t.shape)} vs model ${fmt(p.shape)}`);
    }
  }
  if (mismatched.length) throw new Error(`loadStateDict: shape mismatch for ${mismatched.join("; ")}`);
}
