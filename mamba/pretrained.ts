/**
 * Pretrained checkpoints: `config.json` + `model.safetensors` (or a sharded `model.safetensors.index.json`,
 * or PyTorch's `pytorch_model.bin`, as state-spaces' own repositories have it) in the two layouts people
 * download, Hugging Face transformers (`state-spaces/mamba-130m-hf`) and the original state-spaces layout,
 * from a hub id (through the Hugging Face cache in Deno, fetched straight from the hub in a browser), a local
 * folder, an `https://` URL, or blobs (files picked in a page), with the tokenizer beside them; and saving a
 * model back in the Hugging Face layout, to a folder or as bytes (a download). No Deno API is used here: the
 * file-system side is `pretrained_fs.ts`, imported only in Deno.
 *
 * The parts: `checkpoint_config.ts` reads and writes config.json and maps tensor names, `model_sources.ts`
 * finds the files, `weight_stream.ts` checks and streams the weights (`torch_weights.ts` those of a
 * `pytorch_model.bin`); this module puts them together.
 * @module
 */

import type { WeightDtype } from "../nn/layers.ts";
import { init } from "../core/device.ts";
import { type SafetensorsInput, serializeSafetensors } from "../core/safetensors.ts";
import { mambaConfig, type MambaConfigInput } from "./config.ts";
import { HUB_OPTION_KEYS, HubError, type HubOptions } from "./hub.ts";
import { checkOptionKeys } from "../core/options.ts";
import type { ByteSource, ModelSource } from "./byte_source.ts";
import { hfConfig, mapKey, parseCheckpointConfig } from "./checkpoint_config.ts";
import { type LMOptions, MambaLM } from "./lm.ts";
import {
  filesSource,
  type ModelFiles,
  parseJson,
  readTokenizer,
  sourceOf,
  tokenizerDigest,
  tokenizerOf,
} from "./model_sources.ts";
import type { Tokenizer, TokenizerFiles } from "./tokenizer.ts";
import type { Tensor } from "../core/tensor.ts";
import { checkShapes, planWeights, readHeader, shardHeaders, streamInto } from "./weight_stream.ts";
import { sameView, streamTorchInto } from "./torch_weights.ts";

/** Options of {@linkcode fromPretrained} (hub options apply when the source is a hub id). */
export interface PretrainedOptions extends HubOptions {
  /**
   * Where the tokenizer comes from: a hub id, folder or URL holding `tokenizer.json` (+
   * `tokenizer_config.json`), or a {@linkcode Tokenizer}; `false`: none. Default: the model's own
   * `tokenizer.json` when it has one (it is optional). A tokenizer id is read at revision "main".
   */
  tokenizer?: string | Tokenizer | false;
  /** How the loaded model runs its selective scan (`MambaConfig.scan`; default "fused"): config.json does not
   * say, since it does not change the weights. */
  scan?: MambaConfigInput["scan"];
  /** What each block keeps for the backward when fine-tuning (`MambaConfig.recompute`; default true): "input"
   * keeps the least for deep models and long sequences. */
  recompute?: MambaConfigInput["recompute"];
  /** Throw a {@linkcode NoTokenizerError} before any weight is fetched when no tokenizer is found (default
   * false: the model loads with `tokenizer` null and `noTokenizer` saying why). For programs that need text. */
  requireTokenizer?: boolean;
  /** How the large weights are stored on the GPU (`LMOptions.weightDtype`): "f32" (default), or "bf16" for
   * inference in about half the memory (rounded to nearest even as they load, whatever the file's dtype). */
  weightDtype?: WeightDtype;
}

const PRETRAINED_OPTION_KEYS = [
  ...HUB_OPTION_KEYS,
  "tokenizer",
  "scan",
  "recompute",
  "requireTokenizer",
  "weightDtype",
];

/** {@linkcode fromPretrained} with `requireTokenizer` found no tokenizer; thrown before any weight is fetched. */
export class NoTokenizerError extends Error {
  /** Why there is none, as {@linkcode PretrainedLM.noTokenizer} would say. */
  readonly reason: string;

  /** Creates the error. */
  constructor(reason: string) {
    super(`no tokenizer (${reason}): name one with the tokenizer option`);
    this.name = "NoTokenizerError";
    this.reason = reason;
  }
}

/** A {@linkcode MambaLM} loaded by {@linkcode fromPretrained}, with its tokenizer. */
export class PretrainedLM extends MambaLM {
  /** The tokenizer found with the model or named by the `tokenizer` option; null when there is none. */
  readonly tokenizer: Tokenizer | null;
  /** Where the model came from: folder, URL, `org/name@revision`, or for {@linkcode fromPretrainedFiles} its
   * `options.name` (default "files"). */
  readonly source: string;
  /**
   * Why `tokenizer` is null: the source has no tokenizer.json, it is not in the hub cache while downloads are
   * off (the cache's own message, with how to place it by hand), or `tokenizer: false`; null when there is a
   * tokenizer. With GPT-NeoX's vocab_size, as state-spaces' repositories have, the first two also name the
   * tokenizer their models use.
   */
  readonly noTokenizer: string | null;

  /** Builds the model (weights are loaded by {@linkcode fromPretrained}); `noTokenizer` says why a null
   * tokenizer is missing (default: the source has none). */
  constructor(
    config: MambaConfigInput,
    options: LMOptions,
    tokenizer: Tokenizer | null,
    source: string,
    noTokenizer?: string,
  ) {
    super(config, options);
    this.tokenizer = tokenizer;
    this.source = source;
    this.noTokenizer = tokenizer ? null : noTokenizer ?? `${source} has no tokenizer.json`;
  }
}

// A list of names for a message: the first `n`, then how many in all.
const names = (list: string[], n = 12) =>
  list.length <= n ? list.join(", ") : `${list.slice(0, n).join(", ")}, ... (${list.length} in all)`;

/**
 * Loads a model from a hub id (`state-spaces/mamba-130m-hf`, downloaded into the Hugging Face cache; see
 * {@linkcode hubDownload}), a local folder, or a URL prefix, holding `config.json` (transformers or
 * state-spaces layout) and `model.safetensors` or `model.safetensors.index.json` with its shards, else
 * `pytorch_model.bin` (read as `torch.load(weights_only=True)` would: no code in it runs).
 * `tokenizer.json` (+ `tokenizer_config.json`) is optional; `options.tokenizer` can name another source.
 * The config is checked before any weights are fetched; the tokenizer must not have more ids than the
 * config's `vocab_size`. Tensors stream to the GPU one at a time (header first, then each tensor's bytes,
 * F16/BF16 converted on the way), so host memory stays near the largest tensor.
 *
 * In a browser there is no file system: a hub id is fetched from `<endpoint>/<id>/resolve/<revision>/` (the
 * browser's HTTP cache keeps it), any other string is a URL, relative to the page (write `./models/x` for a
 * folder beside the page: `models/x` has the form of a hub id). Files the user picked:
 * {@linkcode fromPretrainedFiles}.
 */
export async function fromPretrained(
  idOrDirOrUrl: string,
  options: PretrainedOptions = {},
): Promise<PretrainedLM> {
  checkOptionKeys(options, PRETRAINED_OPTION_KEYS, "fromPretrained");
  await init(); // idempotent: loading is often the first thing a program does
  return await loadFrom(await sourceOf(idOrDirOrUrl, options), options);
}

/**
 * Loads a model from its files given as blobs: the files a user picked in a page (`<input type="file"
 * multiple>`, by name), or a record such as `{ "config.json": blob, "model.safetensors": bytes }` (the
 * files {@linkcode checkpointFiles} returns load back this way). The files are those {@linkcode fromPretrained} reads from a
 * folder; `tokenizer.json` is optional; `options.name` names them in messages (default "files").
 */
export async function fromPretrainedFiles(
  files: ModelFiles,
  options: PretrainedOptions & { name?: string } = {},
): Promise<PretrainedLM> {
  checkOptionKeys(options, [...PRETRAINED_OPTION_KEYS, "name"], "fromPretrainedFiles");
  await init();
  return await loadFrom(filesSource(files, options.name ?? "files"), options);
}

async function loadFrom(src: ModelSource, options: PretrainedOptions): Promise<PretrainedLM> {
  const cfgWhere = `${src.where}/config.json`;
  const rawConfig = parseJson((await src.text("config.json", false))!, cfgWhere, true);
  const { config, lm, layout } = parseCheckpointConfig(rawConfig, cfgWhere);
  // how the model runs, which config.json does not hold: checked before anything else is read
  const runs = { scan: options.scan ?? config.scan, recompute: options.recompute ?? config.recompute };
  mambaConfig({ ...config, ...runs });
  const { weightDtype } = options;
  if (weightDtype !== undefined && weightDtype !== "f32" && weightDtype !== "bf16") {
    throw new Error(
      `fromPretrained: weightDtype must be "f32" or "bf16", got ${JSON.stringify(weightDtype)}`,
    );
  }

  let tokenizer: Tokenizer | null = null;
  let tokWhere = `${src.where}/tokenizer.json`;
  const t = options.tokenizer;
  if (typeof t === "string") {
    const tsrc = await sourceOf(t, { ...options, revision: undefined });
    tokWhere = `${tsrc.where}/tokenizer.json`;
    tokenizer = await tokenizerOf(tsrc, true);
  } else if (t && typeof t === "object") {
    tokenizer = t;
    tokWhere = "the given tokenizer";
  } else if (t !== false) {
    const own = await readTokenizer(src, false);
    tokenizer = own?.tokenizer ?? null;
    // saved with config.json as a set: files of another save (one cut short, or two at once) are refused
    const saved = (rawConfig as Record<string, unknown>)[TOKENIZER_DIGEST];
    if (own && typeof saved === "string" && own.digest !== saved) {
      throw new Error(
        `${tokWhere} (and tokenizer_config.json, or its absence) and ${cfgWhere} are from different saves ` +
          `(${TOKENIZER_DIGEST} ${saved}, the files' ${own.digest}): save again (tokenizer files edited by ` +
          `hand: remove ${TOKENIZER_DIGEST} from config.json)`,
      );
    }
  }
  if (tokenizer && tokenizer.vocabSize > lm.vocabSize) {
    throw new Error(
      `${tokWhere}: the tokenizer has ${tokenizer.vocabSize} token ids but ${cfgWhere} has vocab_size ` +
        `${lm.vocabSize}: ids past ${
          lm.vocabSize - 1
        } would have no embedding (a tokenizer of another model?)`,
    );
  }

  // state-spaces' repositories have no tokenizer; their vocab_size (50277, 50280 padded in the -hf
  // conversions) is GPT-NeoX's, whose tokenizer mamba.py loads for them. Said offline too: the cache's own
  // message asks for a tokenizer.json (mamba_ssm caches such a model without a word of it).
  const neox = lm.vocabSize === 50277 || lm.vocabSize === 50280
    ? ` (vocab_size ${lm.vocabSize} is GPT-NeoX's: state-spaces' Mamba models use the tokenizer of ` +
      "EleutherAI/gpt-neox-20b)"
    : "";
  const noTokenizer = t === false
    ? "loaded with tokenizer: false"
    : (src.notCached?.get("tokenizer.json")?.message ?? `${tokWhere} does not exist`) + neox;
  if (!tokenizer && options.requireTokenizer) throw new NoTokenizerError(noTokenizer);

  const plan = await planWeights(src);
  let model: PretrainedLM | undefined;
  const open: ByteSource[] = plan.single ? [plan.single.src] : plan.torch ? [plan.torch.src] : [];
  try {
    const weightsWhere = `${src.where}/${
      plan.single || plan.torch ? plan.files[0] : "model.safetensors.index.json"
    }`;
    // Both written by one saveCheckpoint, or the pair mixes two saves (one stopped between its renames).
    const [cfgId, wId] = [
      (rawConfig as Record<string, unknown>)[SAVE_ID],
      plan.single?.header.metadata[SAVE_ID],
    ];
    if (cfgId !== undefined && wId !== undefined && cfgId !== wId) {
      throw new Error(
        `${weightsWhere} and ${cfgWhere} are from different saves (${SAVE_ID} ${wId}, ${cfgId}): save again`,
      );
    }
    const ours = new Map<string, string>();
    const unexpected: string[] = [];
    for (const k of plan.fileOf.keys()) {
      const o = mapKey(k);
      if (o === null) unexpected.push(k);
      else if (ours.has(o)) throw new Error(`${weightsWhere}: tensors ${ours.get(o)} and ${k} are both ${o}`);
      else ours.set(o, k);
    }
    if (unexpected.length) throw new Error(`${weightsWhere}: unexpected tensors ${unexpected.join(", ")}`);
    // torch.save keeps a tied head under its own name as well, as a view of the embedding's storage.
    const views = plan.torch?.state.tensors;
    const [head, emb] = [ours.get("lm_head.weight"), ours.get("embedding.weight")];
    if (lm.tieEmbeddings === true && views && head && emb && sameView(views.get(head)!, views.get(emb)!)) {
      ours.delete("lm_head.weight");
    }
    // Tied only when the config says so and the checkpoint has no separate head.
    const tie = lm.tieEmbeddings === true && !ours.has("lm_head.weight");
    // Shapes checked against config.json before the model is built: a corrupt size there (vocab_size 1e9,
    // num_hidden_layers 2^60) would otherwise fail in an allocation, with no word of config.json. A sharded
    // checkpoint's headers are all read first for that.
    const shards = plan.single || plan.torch ? null : await shardHeaders(src, plan, weightsWhere);
    const entries = plan.single
      ? plan.single.header.entries
      : plan.torch
      ? plan.torch.state.tensors
      : new Map([...shards!.values()].flatMap((h) => [...h.entries]));
    checkShapes(config, lm, layout, entries, ours, weightsWhere, cfgWhere);
    model = new PretrainedLM(
      { ...config, ...runs },
      { ...lm, tieEmbeddings: tie, ...(weightDtype ? { weightDtype } : {}) },
      tokenizer,
      src.where,
      noTokenizer,
    );
    const params = model.stateDict();
    // Checkpoint tensors the model built from config.json has no parameter for (more layers, inner
    // layernorms, LayerNorm biases, MLPs, ...), and parameters the checkpoint lacks: refused before any read.
    const noParam = [...ours].filter(([o]) => !params.has(o)).map(([o, k]) => `${k} (${o})`);
    const missing = [...params.keys()].filter((k) => !ours.has(k));
    if (noParam.length || missing.length) {
      const parts = [];
      if (noParam.length) {
        // Saved by a version that did not record inner layernorms in config.json.
        const hint = !config.innerLayernorms && noParam.some((n) => /\.(dt|B|C)_layernorm\./.test(n))
          ? ` (inner layernorms: add "inner_layernorms": true to ${cfgWhere})`
          : "";
        parts.push(`tensors the model of ${cfgWhere} has no parameter for: ${names(noParam)}${hint}`);
      }
      if (missing.length) {
        // A muP model has no norm gains: its config.json lost "mup" (written by hfConfig) if only they lack
        // and nothing else is amiss (a checkpoint with norm biases instead is another architecture).
        const hint = !config.mup && !noParam.length && missing.every((n) =>
            /(^|\.)norm(_f)?\.weight$|_layernorm\.weight$/.test(n)
          )
          ? ` (a muP model has no norm gains: add "mup": true and its "mup_base_width" to ${cfgWhere})`
          : "";
        parts.push(`parameters the checkpoint lacks: ${names(missing)}${hint}`);
      }
      throw new Error(`${weightsWhere}: ${parts.join("; ")}`);
    }
    if (plan.single) {
      await streamInto(model, params, plan.single.src, plan.single.header, weightsWhere);
    } else if (plan.torch) {
      await streamTorchInto(
        model,
        params,
        plan.torch,
        new Map([...ours].map(([o, k]) => [k, o])),
        weightsWhere,
      );
    } else {
      for (const file of plan.files) {
        const where = `${src.where}/${file}`;
        const shard = await src.open(file);
        if (!shard) throw new Error(`${weightsWhere} names ${file}, which ${src.where} does not have`);
        open.push(shard);
        const header = await readHeader(shard, where);
        if (JSON.stringify([...header.entries]) !== JSON.stringify([...shards!.get(file)!.entries])) {
          throw new Error(`${where} changed while the model loaded (its header differs from the first read)`);
        }
        await streamInto(model, params, shard, header, where);
        await shard.close();
      }
    }
    return model;
  } catch (e) {
    model?.dispose();
    const msg = (e as Error).message;
    if (e instanceof HubError || msg.startsWith(src.where)) throw e;
    throw new Error(`${src.where}: ${msg}`, { cause: e });
  } finally {
    for (const s of open) await s.close();
  }
}

/** The model's tensors under Hugging Face names, read back from the GPU: as they are at the call (a training
 * step taken before the promise resolves changes none of them). */
export async function hfTensors(model: MambaLM): Promise<Record<string, SafetensorsInput>> {
  const named: [string, Tensor][] = [];
  for (const [name, p] of model.namedParameters()) {
    const key = name === "embedding.weight"
      ? "backbone.embeddings.weight"
      : name === "norm_f.weight"
      ? "backbone.norm_f.weight"
      : name.startsWith("mamba.")
      ? "backbone." + name.slice("mamba.".length)
      : name;
    named.push([key, p]);
  }
  // every readback is recorded before the first wait (a wait per parameter let steps run in between)
  const data = await Promise.all(named.map(([, p]) => p.toArray()));
  const out: Record<string, SafetensorsInput> = {};
  // a bf16 weight is written as BF16: its values exactly, in half the bytes
  named.forEach(([key, p], i) =>
    out[key] = {
      shape: [...p.shape],
      data: data[i],
      ...(p.dtype === "bf16" ? { dtype: "BF16" as const } : {}),
    }
  );
  return out;
}

/**
 * The files of `tokenizer` to save with `model`, checked: a {@linkcode Tokenizer} with `toFiles()`, with no
 * more ids than the model's vocabulary (`fromPretrained` would refuse the pair). Errors say what to pass.
 */
export function tokenizerFilesFor(model: MambaLM, tokenizer: Tokenizer): TokenizerFiles {
  if (typeof tokenizer?.encode !== "function" || typeof tokenizer?.decode !== "function") {
    const got = tokenizer === null ? "null" : typeof tokenizer;
    throw new Error(
      `cannot save the tokenizer: expected a Tokenizer, got ${got} (for a parsed tokenizer.json, pass ` +
        "tokenizerFromJSON(json))",
    );
  }
  if (typeof tokenizer.toFiles !== "function") {
    throw new Error(
      "cannot save the tokenizer: it has no toFiles() (ByteTokenizer and HubTokenizer have it); pass null " +
        "to save the model without it",
    );
  }
  if (tokenizer.vocabSize > model.vocabSize) {
    throw new Error(
      `cannot save the tokenizer with this model: it has ${tokenizer.vocabSize} token ids, the model's ` +
        `vocabulary ${model.vocabSize} (fromPretrained would refuse the pair)`,
    );
  }
  return tokenizer.toFiles();
}

/** The key of a save's id in config.json and in model.safetensors' metadata. */
export const SAVE_ID = "mambats_save_id";
/** The key of the {@linkcode tokenizerDigest} of the tokenizer files saved with config.json (where there were
 * some): tokenizer.json is Hugging Face's format, whose Rust reader may not skip a key it does not know. */
export const TOKENIZER_DIGEST = "mambats_tokenizer_digest";

/**
 * A checkpoint's files as bytes, by name: `model.safetensors` and `config.json` (Hugging Face layout), and the
 * tokenizer's `tokenizer.json` (+ `tokenizer_config.json` when it has one). `tokenizer` defaults to the
 * model's own (a {@linkcode PretrainedLM}'s); null leaves it out. In a page, offer the files as downloads; in
 * Deno, {@linkcode saveCheckpoint} writes them into a folder. {@linkcode fromPretrainedFiles} and
 * {@linkcode fromPretrained} read them back, tokenizer included, and refuse files of two saves: config.json
 * holds the save's id (as model.safetensors does) and the {@linkcode tokenizerDigest} of the tokenizer files.
 * The weights are read as they are at the call (a training step taken before the promise resolves changes none
 * of them).
 */
export async function checkpointFiles(
  model: MambaLM,
  tokenizer: Tokenizer | null = model instanceof PretrainedLM ? model.tokenizer : null,
): Promise<Record<string, Uint8Array<ArrayBuffer>>> {
  const tok = tokenizer === null ? null : tokenizerFilesFor(model, tokenizer);
  return checkpointFilesOf(model, await hfTensors(model), tok);
}

/** {@linkcode checkpointFiles} from the model's tensors as {@linkcode hfTensors} read them, and the tokenizer's
 * files (checked), or null for none. */
export function checkpointFilesOf(
  model: MambaLM,
  tensors: Record<string, SafetensorsInput>,
  tok: TokenizerFiles | null,
): Record<string, Uint8Array<ArrayBuffer>> {
  const text = (v: unknown, indent: number) =>
    new TextEncoder().encode(JSON.stringify(v, null, indent) + "\n");
  // "format": "pt" as save_pretrained writes it (transformers <= 4.48 fails on weights without it); the save's
  // id in both files lets a loader tell a pair that mixes two saves
  const id = Math.random().toString(16).slice(2); // (randomUUID needs a secure context)
  const tokText = tok && JSON.stringify(tok.tokenizer, null, 1) + "\n";
  const tokCfgText = tok?.config ? JSON.stringify(tok.config, null, 2) + "\n" : null;
  // the tokenizer files' digest too: a loader tells them from another save's (the tokenizer has no id of its own)
  const digest = tokText === null ? {} : { [TOKENIZER_DIGEST]: tokenizerDigest(tokText, tokCfgText) };
  const files: Record<string, Uint8Array<ArrayBuffer>> = {
    "model.safetensors": serializeSafetensors(tensors, { format: "pt", [SAVE_ID]: id }),
    "config.json": text({ ...hfConfig(model), [SAVE_ID]: id, ...digest }, 2),
  };
  const utf8 = (s: string) => new TextEncoder().encode(s);
  if (tokText !== null) files["tokenizer.json"] = utf8(tokText);
  if (tokCfgText !== null) files["tokenizer_config.json"] = utf8(tokCfgText);
  return files;
}

/**
 * Saves `config.json` + `model.safetensors` (Hugging Face layout) and the tokenizer's files (see
 * {@linkcode checkpointFiles}: the model's own by default; null writes none and leaves any in `dir` alone) into
 * `dir` (Deno), keeping the folder's other files: all are written and synced under temporary names first, then
 * renamed into place, so a save that fails leaves the folder as it was. A tokenizer without a
 * `tokenizer_config.json` removes one left in `dir` by an earlier save, which would otherwise load with it.
 * A training checkpoint's folder (with `training_log.json`) is refused: use `saveTrainingCheckpoint`.
 */
export async function saveCheckpoint(
  model: MambaLM,
  dir: string,
  tokenizer: Tokenizer | null = model instanceof PretrainedLM ? model.tokenizer : null,
): Promise<void> {
  if (typeof (globalThis as { Deno?: unknown }).Deno === "undefined") {
    throw new Error(
      "saveCheckpoint writes a folder with Deno's file system; in a page, checkpointFiles(model) gives the " +
        "files (name -> bytes) to offer for download",
    );
  }
  const files = await checkpointFiles(model, tokenizer);
  const stale = files["tokenizer.json"] && !files["tokenizer_config.json"] ? ["tokenizer_config.json"] : [];
  await (await import("./pretrained_fs.ts")).saveFiles(dir, files, stale);
}
