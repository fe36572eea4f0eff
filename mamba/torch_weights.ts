/**
 * Weights from a PyTorch checkpoint, `pytorch_model.bin` (what mamba.py's `from_pretrained` reads from the
 * state-spaces repositories): its state dict is read first (the archive's `data.pkl`), so shapes are checked
 * before the model is built, then each storage streams to the GPU as it arrives, decoded to f32 (F16, BF16
 * and F64 converted). A tensor is any strided view of a storage, as torch.save keeps it: views that are
 * contiguous and apart stream straight; others (transposed, overlapping) are gathered from the span they cover.
 * @module
 */

import { flush } from "../core/executor.ts";
import { fmt } from "../core/shape.ts";
import type { Tensor } from "../core/tensor.ts";
import {
  DTYPE_BYTES,
  isContiguous,
  type TorchStateDict,
  type TorchTensorRef,
  viewCount,
  viewExtent,
  viewKey,
} from "../core/torch_pickle.ts";
import { TorchArchiveReader } from "../core/torch_zip.ts";
import { gatherView, negated } from "../core/torch_checkpoint.ts";
import type { ByteSource } from "./byte_source.ts";
import type { MambaLM } from "./lm.ts";
import { checkLoadable, readTensor } from "./read_tensor.ts";

/** A torch checkpoint whose state dict has been read, its source positioned at the storages. */
export interface TorchWeights {
  /** The open file. */
  src: ByteSource;
  /** Its reader, past `data.pkl`. */
  archive: TorchArchiveReader;
  /** The tensors (views into storages) and storages. */
  state: TorchStateDict;
}

/** Reads the state dict of `pytorch_model.bin` from `src` (positioned at the file's start). */
export async function readTorchWeights(src: ByteSource, where: string): Promise<TorchWeights> {
  const archive = new TorchArchiveReader(src, where);
  return { src, archive, state: await archive.readStateDict() };
}

/** Whether two tensors are the same view of the same storage (a tied weight saved under both names). */
export function sameView(a: TorchTensorRef, b: TorchTensorRef): boolean {
  return viewKey(a) === viewKey(b);
}

/**
 * Streams the storages of `w` into the model's parameters: `names` maps each checkpoint name to load to its
 * parameter (checked against `params`' shapes before any read; float dtypes only). Storages come in file
 * order; each is read once.
 */
export async function streamTorchInto(
  model: MambaLM,
  params: Map<string, Tensor>,
  w: TorchWeights,
  names: Map<string, string>,
  where: string,
): Promise<void> {
  const describe = (k: string, r: TorchTensorRef) =>
    `tensor ${k} (${names.get(k)}) is ${r.dtype} ${fmt(r.shape)} in storage ${r.storage}`;
  const byStorage = new Map<string, [string, TorchTensorRef][]>();
  for (const [k] of names) {
    const r = w.state.tensors.get(k)!;
    byStorage.set(r.storage, [...byStorage.get(r.storage) ?? [], [k, r]]);
  }
  checkLoadable(
    [...names].map(([k, param]) => {
      const r = w.state.tensors.get(k)!;
      return { param, dtype: r.dtype, shape: r.shape, describe: () => describe(k, r) };
    }),
    params,
    where,
  );
  const load = (k: string, r: TorchTensorRef, data: Float32Array) => {
    model.loadStateDict(new Map([[names.get(k)!, { shape: r.shape, data }]]), { strict: false });
    flush(); // the upload's staging buffer goes with this submit
  };
  const reader = { readExact: (b: Uint8Array) => w.archive.read(b) };
  for (let rec; (rec = await w.archive.nextStorage(w.state));) {
    const views = (byStorage.get(rec.key) ?? []).sort((a, b) => a[1].offset - b[1].offset);
    byStorage.delete(rec.key);
    const size = DTYPE_BYTES[w.state.storages.get(rec.key)!.dtype];
    const entry = (dtype: TorchTensorRef["dtype"], count: number) => ({
      dtype,
      shape: [count],
      dataOffsets: [0, count * size] as [number, number],
    });
    try {
      // Contiguous views that do not overlap (or are the same view) stream in order; others need it all.
      const apart = views.every(([, r], i) =>
        isContiguous(r) &&
        (i === 0 || sameView(views[i - 1][1], r) ||
          views[i - 1][1].offset + viewCount(views[i - 1][1]) <= r.offset)
      );
      if (apart) {
        let pos = 0; // elements into the storage
        let last: [TorchTensorRef, Float32Array] | null = null;
        for (const [k, r] of views) {
          if (last && sameView(last[0], r)) {
            load(k, r, last[1]);
            continue;
          }
          await w.archive.skip((r.offset - pos) * size);
          const data = negated(r, await readTensor(reader, entry(r.dtype, viewCount(r)), k));
          pos = r.offset + viewCount(r);
          load(k, r, data);
          last = [r, data];
        }
        await w.archive.skip(rec.bytes - pos * size);
      } else {
        // The span the views cover is read, not the whole storage: its size comes from the pickle, which a
        // body of unknown length cannot check (2^40 elements claimed would be allocated). A span far wider
        // than the views (strides that spread a few elements over gigabytes) is refused.
        const lo = Math.min(...views.map(([, r]) => r.offset));
        const hi = Math.max(...views.map(([, r]) => r.offset + viewExtent(r)));
        const held = views.reduce((a, [, r]) => a + viewCount(r), 0);
        if (hi - lo > 4 * held + (1 << 24)) {
          throw new Error(
            `its views spread ${held} elements over ${
              hi - lo
            } of the storage; at most 4 x ${held} + 2^24 are read`,
          );
        }
        await w.archive.skip(lo * size);
        const span = await readTensor(reader, entry(views[0][1].dtype, hi - lo), rec.key);
        for (const [k, r] of views) load(k, r, gatherView(span, { ...r, offset: r.offset - lo }));
        await w.archive.skip(rec.bytes - hi * size);
      }
    } catch (e) {
      const what = views.length ? views.map(([k, r]) => describe(k, r)).join("; ") : `storage ${rec.key}`;
      throw new Error(
        `${where}: reading ${what} (bytes ${rec.at}-${rec.at + rec.bytes} of the file): ${
          (e as Error).message
        }`,
        { cause: e },
      );
    }
  }
  if (byStorage.size) {
    const lacking = [...byStorage].map(([key, v]) => `${key} (${v.map(([k]) => k).join(", ")})`);
    throw new Error(`${where}: the archive ends without the storages ${lacking.join(", ")}`);
  }
}
