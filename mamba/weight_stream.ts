/**
 * Reading a checkpoint's weights: the plan (one `model.safetensors`, or the shards an index names), each
 * file's header, the shapes checked against config.json before the model is built, then the tensors streamed
 * to the GPU one at a time (F16/BF16 decoded a few MiB at a time), so that host memory stays near the
 * largest tensor.
 * @module
 */

import { flush } from "../core/executor.ts";
import {
  parseSafetensorsHeader,
  type SafetensorsEntry,
  type SafetensorsHeader,
  safetensorsHeaderLength,
} from "../core/safetensors.ts";
import { fmt } from "../core/shape.ts";
import type { Tensor } from "../core/tensor.ts";
import { mambaConfig, type MambaConfigInput } from "./config.ts";
import type { ByteSource, ModelSource } from "./byte_source.ts";
import { type CheckpointConfig, mapKey } from "./checkpoint_config.ts";
import type { LMOptions, MambaLM } from "./lm.ts";
import { parseJson } from "./model_sources.ts";
import { readTorchWeights, type TorchWeights } from "./torch_weights.ts";
import { checkLoadable, readTensor } from "./read_tensor.ts";

/** The checkpoint's tensor names (checkpoint name -> file), from the index of a sharded checkpoint or the
 * header of the single file (whose source stays open, positioned at the data). */
export interface WeightPlan {
  /** The safetensors files, sorted (or `pytorch_model.bin`). */
  files: string[];
  /** The file of each checkpoint tensor name. */
  fileOf: Map<string, string>;
  /** The single file, already open with its header read; null for a sharded checkpoint. */
  single: { src: ByteSource; header: SafetensorsHeader } | null;
  /** `pytorch_model.bin`, open with its state dict read, where there are no safetensors; else null. */
  torch: TorchWeights | null;
}

/** Reads a safetensors header from `src` (positioned at the file's start), leaving it at the data. */
export async function readHeader(src: ByteSource, where: string): Promise<SafetensorsHeader> {
  const size = src.size >= 0 ? src.size : null; // unknown: streamInto checks where the body ends
  if (size !== null && size < 8) parseSafetensorsHeader(new Uint8Array(0), size, where); // throws: too short
  const lengthField = new Uint8Array(8);
  await src.readExact(lengthField);
  const n = safetensorsHeaderLength(lengthField, where);
  if (size !== null && 8 + n > size) parseSafetensorsHeader(lengthField, size, where); // throws: past the end
  const prefix = new Uint8Array(8 + n);
  prefix.set(lengthField);
  await src.readExact(prefix.subarray(8));
  return parseSafetensorsHeader(prefix, size, where);
}

/** Which files hold which tensors: `model.safetensors`, else the shards `model.safetensors.index.json` names. */
export async function planWeights(src: ModelSource): Promise<WeightPlan> {
  const single = await src.open("model.safetensors");
  if (single) {
    try {
      const header = await readHeader(single, `${src.where}/model.safetensors`);
      const fileOf = new Map([...header.entries.keys()].map((k) => [k, "model.safetensors"]));
      return { files: ["model.safetensors"], fileOf, single: { src: single, header }, torch: null };
    } catch (e) {
      await single.close();
      throw e;
    }
  }
  const indexWhere = `${src.where}/model.safetensors.index.json`;
  const indexText = await src.text("model.safetensors.index.json", true);
  if (indexText === null) {
    const bin = await src.open("pytorch_model.bin");
    if (bin) {
      try {
        const torch = await readTorchWeights(bin, `${src.where}/pytorch_model.bin`);
        const fileOf = new Map([...torch.state.tensors.keys()].map((k) => [k, "pytorch_model.bin"]));
        return { files: ["pytorch_model.bin"], fileOf, single: null, torch };
      } catch (e) {
        await bin.close();
        throw e;
      }
    }
    const notCached = src.notCached?.get("model.safetensors") ?? src.notCached?.get("pytorch_model.bin");
    if (notCached) throw notCached;
    throw new Error(
      `${src.where} has none of model.safetensors, model.safetensors.index.json and pytorch_model.bin ` +
        `(sharded pytorch_model.bin checkpoints are not read: convert them with transformers' save_pretrained, ` +
        `which writes safetensors)`,
    );
  }
  const map = parseJson(indexText, indexWhere, true).weight_map;
  if (typeof map !== "object" || map === null || Array.isArray(map)) {
    throw new Error(`${indexWhere}: no 'weight_map' object`);
  }
  const fileOf = new Map<string, string>();
  for (const [k, f] of Object.entries(map)) {
    if (typeof f !== "string" || !/^[\w.-]+\.safetensors$/.test(f)) {
      throw new Error(
        `${indexWhere}: weight_map['${k}'] = ${JSON.stringify(f)} is not a safetensors file name`,
      );
    }
    fileOf.set(k, f);
  }
  return { files: [...new Set(fileOf.values())].sort(), fileOf, single: null, torch: null };
}

/**
 * The headers of a sharded checkpoint's files, each read and its file closed again (a header is small; the
 * bodies stream later), checked against the index: each file holds exactly the tensors the index puts in it.
 * Read before the model is built, so that {@linkcode checkShapes} sees every shape first.
 */
export async function shardHeaders(
  src: ModelSource,
  plan: WeightPlan,
  indexWhere: string,
): Promise<Map<string, SafetensorsHeader>> {
  const headers = new Map<string, SafetensorsHeader>();
  for (const file of plan.files) {
    const where = `${src.where}/${file}`;
    const shard = await src.open(file);
    if (!shard) throw new Error(`${indexWhere} names ${file}, which ${src.where} does not have`);
    try {
      headers.set(file, await readHeader(shard, where));
    } finally {
      await shard.close();
    }
    const header = headers.get(file)!;
    const lacking = [...plan.fileOf].filter(([k, f]) => f === file && !header.entries.has(k)).map(([k]) => k);
    const extra = [...header.entries.keys()].filter((k) => plan.fileOf.get(k) !== file);
    if (lacking.length || extra.length) {
      throw new Error(
        `${where} does not match ${indexWhere}` +
          (lacking.length ? `; it lacks ${lacking.join(", ")}` : "") +
          (extra.length ? `; the index does not put ${extra.join(", ")} here` : ""),
      );
    }
  }
  return headers;
}

const describe = (k: string, e: SafetensorsEntry) =>
  `tensor ${k} (${mapKey(k)}) is ${e.dtype} ${fmt(e.shape)} at data_offsets [${e.dataOffsets.join(", ")}]`;

/** Streams the tensors of one file into the model, in file order, one tensor on the host at a time. Every
 * name maps to a parameter of `params` (the caller checked); shapes and dtypes are checked before any read. */
export async function streamInto(
  model: MambaLM,
  params: Map<string, Tensor>,
  src: ByteSource,
  header: SafetensorsHeader,
  where: string,
): Promise<void> {
  const list = [...header.entries].map(([k, e]) => ({
    param: mapKey(k)!,
    ...e,
    describe: () => describe(k, e),
  }));
  checkLoadable(list, params, where);
  let pos = 0; // within the data section
  for (const [k, e] of header.entries) {
    const [begin, end] = e.dataOffsets;
    let data: Float32Array;
    if (begin === end) {
      data = new Float32Array(0);
    } else {
      try {
        await src.skip(begin - pos);
        data = await readTensor(src, e, k);
      } catch (err) {
        throw new Error(
          `${where}: reading ${describe(k, e)} (bytes ${header.dataStart + begin}-${
            header.dataStart + end
          } of the file): ${(err as Error).message}`,
          { cause: err },
        );
      }
      pos = end;
    }
    model.loadStateDict(new Map([[mapKey(k)!, { shape: e.shape, data }]]), { strict: false });
    flush(); // the upload's staging buffer goes with this submit
  }
  // The header could not check the end of a body of unknown size: the tensors tile the data, so the body
  // must end at the last tensor's end (a longer one means a wrong header length, which shifts every tensor).
  if (src.size < 0 && !(await src.atEnd())) {
    throw new Error(
      `${where}: the body goes on after the last tensor, which ends at byte ${header.dataStart + pos} ` +
        `(wrong header length, or extra bytes after the data)`,
    );
  }
}

// config.json's names of the sizes, by layout.
const SIZE_KEYS = {
  hf: {
    D: "hidden_size",
    L: "num_hidden_layers",
    N: "state_size",
    K: "conv_kernel",
    R: "time_step_rank",
    E: "intermediate_size",
    V: "vocab_size",
  },
  "state-spaces": {
    D: "d_model",
    L: "n_layer",
    N: "ssm_cfg.d_state",
    K: "ssm_cfg.d_conv",
    R: "ssm_cfg.dt_rank",
    E: "ssm_cfg.expand x d_model =",
    V: "vocab_size",
  },
} as const;

// r[k] where k is r's own key (not one of Object.prototype's)
const ownEntry = <T>(r: Record<string, T>, k: string): T | undefined =>
  Object.hasOwn(r, k) ? r[k] : undefined;

/** Compares the checkpoint's shapes (of the parameters that config.json sizes) and its number of layers with
 * what config.json makes, naming the config keys; names that are no parameter are left to the caller. */
export function checkShapes(
  input: MambaConfigInput,
  lm: LMOptions,
  layout: CheckpointConfig["layout"],
  entries: ReadonlyMap<string, { readonly shape: readonly number[] }>,
  ours: Map<string, string>,
  weightsWhere: string,
  cfgWhere: string,
): void {
  const c = mambaConfig(input);
  const keys = SIZE_KEYS[layout];
  const pad = lm.padVocabSizeMultiple ?? 1;
  const V = Math.ceil(lm.vocabSize / pad) * pad;
  const { dModel: D, dInner: E, dState: N, dConv: K, dtRank: R, nLayers: L } = c;
  const vocab = `${keys.V} ${lm.vocabSize}${V !== lm.vocabSize ? ` padded to ${V}` : ""}`;
  const dims: Record<string, [number[], string]> = {
    "embedding.weight": [[V, D], `${vocab}, ${keys.D} ${D}`],
    "lm_head.weight": [[V, D], `${vocab}, ${keys.D} ${D}`],
    "norm_f.weight": [[D], `${keys.D} ${D}`],
  };
  const layer: Record<string, [number[], string]> = {
    "norm.weight": [[D], `${keys.D} ${D}`],
    "mixer.in_proj.weight": [[2 * E, D], `${keys.E} ${E}, ${keys.D} ${D}`],
    "mixer.in_proj.bias": [[2 * E], `${keys.E} ${E}`],
    "mixer.conv1d.weight": [[E, 1, K], `${keys.E} ${E}, ${keys.K} ${K}`],
    "mixer.conv1d.bias": [[E], `${keys.E} ${E}`],
    "mixer.x_proj.weight": [[R + 2 * N, E], `${keys.R} ${R}, ${keys.N} ${N}, ${keys.E} ${E}`],
    "mixer.dt_proj.weight": [[E, R], `${keys.E} ${E}, ${keys.R} ${R}`],
    "mixer.dt_proj.bias": [[E], `${keys.E} ${E}`],
    "mixer.A_log": [[E, N], `${keys.E} ${E}, ${keys.N} ${N}`],
    "mixer.D": [[E], `${keys.E} ${E}`],
    "mixer.out_proj.weight": [[D, E], `${keys.D} ${D}, ${keys.E} ${E}`],
    "mixer.out_proj.bias": [[D], `${keys.D} ${D}`],
  };
  const mismatched: string[] = [];
  let layers = 0;
  for (const [o, k] of ours) {
    const m = /^mamba\.layers\.(\d+)\.(.*)$/.exec(o);
    if (m) layers = Math.max(layers, Number(m[1]) + 1);
    // own keys only: a name ending in `constructor` or `toString` is no parameter
    const want = m ? (Number(m[1]) < L ? ownEntry(layer, m[2]) : undefined) : ownEntry(dims, o);
    const shape = entries.get(k)!.shape;
    if (want && shape.join() !== want[0].join()) {
      mismatched.push(`${o}: checkpoint ${fmt(shape)} vs model ${fmt(want[0])} (${want[1]})`);
    }
  }
  if (mismatched.length) {
    throw new Error(
      `${weightsWhere}: shape mismatch for ${mismatched.slice(0, 4).join("; ")}` +
        (mismatched.length > 4 ? `; ... (${mismatched.length} in all)` : "") +
        ` (the model's sizes are those of ${cfgWhere})`,
    );
  }
  if (layers < L) {
    throw new Error(
      `${weightsWhere}: ${cfgWhere} has ${keys.L} ${L}, but the checkpoint has ${
        layers ? `layers 0-${layers - 1} only` : "no layers"
      }`,
    );
  }
}
