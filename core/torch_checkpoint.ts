/**
 * A whole PyTorch checkpoint in memory (`torch.save(model.state_dict())`, any module's) decoded to host
 * tensors, as {@linkcode parseSafetensors} decodes a safetensors file: what `model.load_state_dict(torch.load(f))`
 * loads in mamba.py, here `model.loadStateDict(await parseTorchCheckpoint(bytes))`.
 * @module
 */

import { type DecodedTensor, decodeTensor } from "./safetensors.ts";
import { isContiguous, type TorchTensorRef, viewCount, viewKey } from "./torch_pickle.ts";
import { bytesSource, TorchArchiveReader } from "./torch_zip.ts";

/** The elements of a strided view, in row-major order, taken from its whole storage's values (negated where
 * the view has the neg bit). */
export function gatherView<T extends Float32Array | Int32Array | BigInt64Array>(
  all: T,
  r: TorchTensorRef,
): T {
  const count = viewCount(r);
  if (isContiguous(r)) return negated(r, all.slice(r.offset, r.offset + count) as T);
  const out = new (all.constructor as new (n: number) => T)(count);
  const idx = new Array(r.shape.length).fill(0);
  for (let i = 0; i < count; i++) {
    let at = r.offset;
    for (let d = 0; d < idx.length; d++) at += idx[d] * r.strides[d];
    out[i] = all[at];
    for (let d = idx.length - 1; d >= 0 && ++idx[d] === r.shape[d]; d--) idx[d] = 0;
  }
  return negated(r, out);
}

/** `data`, a view's values as stored (a copy of them), negated in place where the view has the neg bit. */
export function negated<T extends Float32Array | Int32Array | BigInt64Array>(r: TorchTensorRef, data: T): T {
  const d = data as Float32Array; // only float views have the neg bit (parseTorchPickle refuses it on others)
  if (r.neg) { for (let i = 0; i < d.length; i++) d[i] = -d[i]; }
  return data;
}

const MAX_REPEATED = 2 ** 24;

/**
 * Decodes every tensor of a PyTorch checkpoint (the zip archive `torch.save` writes since PyTorch 1.6) held in
 * memory: floats to f32, integers and bools to int32 (an I64 value past int32 in a tensor is an error naming the
 * tensor and its index there; one no tensor views is not read), views (offsets, strides, shared storages) as
 * saved; a view that repeats elements (expand()) up to 2^24 of them.
 * Names that save the same view (a tied head, a module listed twice) share one array.
 * The pickle is read by a restricted unpickler that refuses any global a state dict of tensors does not name,
 * so nothing in the file runs. `source` names it in errors.
 */
export async function parseTorchCheckpoint(
  bytes: Uint8Array,
  source = "torch checkpoint",
): Promise<Map<string, DecodedTensor>> {
  const archive = new TorchArchiveReader(bytesSource(bytes, source), source);
  const state = await archive.readStateDict();
  for (const [name, r] of state.tensors) {
    // Only a view that repeats elements (a zero stride, as expand() makes) has more than its storage; each is
    // copied out whole, so a few bytes of pickle could otherwise ask for gigabytes.
    const count = viewCount(r);
    const numel = state.storages.get(r.storage)!.numel;
    if (count > Math.max(numel, MAX_REPEATED)) {
      throw new Error(
        `${source}: tensor ${name} of size (${r.shape.join(", ")}), stride (${
          r.strides.join(", ")
        }) repeats ` +
          `the ${numel} elements of storage ${r.storage} as ${count}: such views are decoded up to 2^24 elements`,
      );
    }
  }
  const storages = new Map<string, Float32Array | Int32Array | BigInt64Array>();
  for (let rec; (rec = await archive.nextStorage(state));) {
    const raw = new Uint8Array(rec.bytes);
    await archive.read(raw);
    const s = state.storages.get(rec.key)!;
    const entry = { dtype: s.dtype, shape: [s.numel], dataOffsets: [0, rec.bytes] as [number, number] };
    // int64 goes to int32 per view (below): a value past int32 that no tensor views is no error
    storages.set(
      rec.key,
      s.dtype === "I64" ? new BigInt64Array(raw.buffer) : decodeTensor(entry, raw, rec.key),
    );
  }
  // A view's int64 values as int32; one that does not fit is an error naming the tensor and its index there.
  const toInt32 = (v: BigInt64Array, name: string) => {
    const entry = {
      dtype: "I64" as const,
      shape: [v.length],
      dataOffsets: [0, v.byteLength] as [number, number],
    };
    try {
      return decodeTensor(entry, new Uint8Array(v.buffer, v.byteOffset, v.byteLength), name);
    } catch (e) {
      throw new Error(`${source}: ${(e as Error).message}`, { cause: e });
    }
  };
  // Each distinct view is copied out (the same view under several names, as a tied head or a module listed
  // twice saves it, shares one array), so views that differ but share a storage decode it again. In all at
  // most 4 times what the storages read hold (not what the pickle claims: a storage it names but the archive
  // lacks would raise the bound), plus 4 repeated views' allowance: else thousands of views of one storage, a
  // few bytes of pickle each, could ask for gigabytes.
  const distinct = new Map([...state.tensors.values()].map((r) => [viewKey(r), r]));
  // (views of a storage the archive lacks are named as such below, not counted here)
  const total = [...distinct.values()].reduce((a, r) => a + (storages.has(r.storage) ? viewCount(r) : 0), 0);
  const stored = [...storages.values()].reduce((a, s) => a + s.length, 0);
  if (total > 4 * stored + 4 * MAX_REPEATED) {
    throw new Error(
      `${source}: its ${distinct.size} distinct views would decode to ${total} elements from the ${stored} that ` +
        `its storages hold: views share storages more than 4 times over (at most 4 x ${stored} + 2^26 are decoded)`,
    );
  }
  const out = new Map<string, DecodedTensor>();
  const decoded = new Map<string, DecodedTensor["data"]>(); // by view
  for (const [name, r] of state.tensors) {
    const all = storages.get(r.storage);
    if (!all) throw new Error(`${source}: the archive ends without storage ${r.storage} (of ${name})`);
    const key = viewKey(r);
    if (!decoded.has(key)) {
      const v = gatherView(all, r);
      decoded.set(key, v instanceof BigInt64Array ? toInt32(v, name) : v as DecodedTensor["data"]);
    }
    out.set(name, { dtype: r.dtype, shape: r.shape, data: decoded.get(key)! });
  }
  return out;
}
