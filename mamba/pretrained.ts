/**
 * Pretrained checkpoints: `config.json` + `model.safetensors` (or a sharded `model.safetensors.index.json`)
 * in the two layouts people download, Hugging Face transformers (`state-spaces/mamba-130m-hf`) and the
 * original state-spaces layout, from a hub id (through the Hugging Face cache in Deno, fetched straight from
 * the hub in a browser), a local folder, an `https://` URL, or blobs (files picked in a page), with the
 * tokenizer beside them; and saving a model back in the Hugging Face layout, to a folder or as bytes (a
 * download). No Deno API is used here: the file-system side is `pretrained_fs.ts`, imported only in Deno.
 * @module
 */

import { init } from "../core/device.ts";
import { flush } from "../core/executor.ts";
import {
  decodeTensor,
  duplicateJsonKey,
  parseSafetensorsHeader,
  type SafetensorsEntry,
  type SafetensorsHeader,
  safetensorsHeaderLength,
  type SafetensorsInput,
  serializeSafetensors,
} from "../core/safetensors.ts";
import { fmt } from "../core/shape.ts";
import type { Tensor } from "../core/tensor.ts";
import { mambaConfig, type MambaConfigInput } from "./config.ts";
import { hubEndpoint, HubError, type HubOptions, isHubId } from "./hub.ts";
import { blobSource, type ByteSource, type ModelSource, responseSource } from "./byte_source.ts";
import { type LMOptions, MambaLM } from "./lm.ts";
import { type Tokenizer, type TokenizerFiles, tokenizerFromJSON } from "./tokenizer.ts";

/** A checkpoint's config turned into ours, plus how its tensor names map to ours. */
export interface CheckpointConfig {
  /** Backbone config. */
  config: MambaConfigInput;
  /** Vocabulary options. */
  lm: LMOptions;
  /** "hf" (transformers) or "state-spaces". */
  layout: "hf" | "state-spaces";
}

const HF_KEYS = new Set([
  "architectures",
  "model_type",
  "hidden_size",
  "state_size",
  "num_hidden_layers",
  "expand",
  "conv_kernel",
  "time_step_rank",
  "intermediate_size",
  "vocab_size",
  "use_bias",
  "use_conv_bias",
  "layer_norm_epsilon",
  "tie_word_embeddings",
  "residual_in_fp32",
  "pad_vocab_size_multiple",
  "hidden_act",
  "time_step_min",
  "time_step_max",
  "time_step_init_scheme",
  "time_step_scale",
  "time_step_floor",
  "initializer_range",
  "rescale_prenorm_residual",
  "use_cache",
  "use_mambapy",
  "torch_dtype",
  "bos_token_id",
  "eos_token_id",
  "pad_token_id",
  "transformers_version",
  "n_layer",
  "d_model",
  "fused_add_norm",
  "rms_norm",
  "ssm_cfg",
  "layer_norm_eps",
  "_name_or_path",
  "dtype",
  "inner_layernorms", // ours (mamba.py's inner_layernorms): written by hfConfig when true
]);
const SS_KEYS = new Set([
  "d_model",
  "d_intermediate",
  "n_layer",
  "vocab_size",
  "ssm_cfg",
  "attn_layer_idx",
  "attn_cfg",
  "rms_norm",
  "residual_in_fp32",
  "fused_add_norm",
  "pad_vocab_size_multiple",
  "tie_embeddings",
]);
const SSM_KEYS = new Set([
  "layer",
  "d_state",
  "d_conv",
  "expand",
  "dt_rank",
  "bias",
  "conv_bias",
  "dt_min",
  "dt_max",
  "dt_init",
  "dt_scale",
  "dt_init_floor",
  "use_fast_path",
]);

const show = (v: unknown) => typeof v === "number" ? String(v) : JSON.stringify(v);

// Typed reads of a config object; every error names the file and the key as config.json spells it.
class ConfigReader {
  constructor(
    readonly cfg: Record<string, unknown>,
    readonly where: string,
    readonly prefix = "",
  ) {}

  #bad(key: string, what: string): never {
    throw new Error(`${this.where}: '${this.prefix}${key}' must be ${what}, got ${show(this.cfg[key])}`);
  }

  has(key: string): boolean {
    return this.cfg[key] !== undefined && this.cfg[key] !== null;
  }

  #get(key: string, fallback: unknown): unknown {
    if (this.has(key)) return this.cfg[key];
    if (fallback === undefined) throw new Error(`${this.where} has no '${this.prefix}${key}'`);
    return fallback;
  }

  /** An integer >= min (1 unless told); `fallback` when absent, else required. */
  int(key: string, fallback?: number, min = 1): number {
    const v = this.#get(key, fallback);
    if (!Number.isInteger(v) || (v as number) < min) {
      this.#bad(key, min === 1 ? "a positive integer" : `an integer >= ${min}`);
    }
    return v as number;
  }

  /** A positive finite number. */
  pos(key: string, fallback?: number): number {
    const v = this.#get(key, fallback);
    if (typeof v !== "number" || !(v > 0) || !Number.isFinite(v)) this.#bad(key, "a positive number");
    return v;
  }

  bool(key: string, fallback?: boolean): boolean {
    const v = this.#get(key, fallback);
    if (typeof v !== "boolean") this.#bad(key, "true or false");
    return v;
  }

  /** One of the given strings. */
  oneOf<T extends string>(key: string, allowed: readonly T[], fallback?: T): T {
    const v = this.#get(key, fallback);
    if (!allowed.includes(v as T)) this.#bad(key, allowed.map((a) => JSON.stringify(a)).join(" or "));
    return v as T;
  }

  /** "auto" or a positive integer; "auto" when absent. */
  rank(key: string): number | "auto" {
    const v = this.cfg[key] ?? "auto";
    if (v !== "auto" && (!Number.isInteger(v) || (v as number) < 1)) {
      this.#bad(key, `"auto" or a positive integer`);
    }
    return v as number | "auto";
  }

  /** Refuses a value that changes the model in a way this library does not implement. */
  refuse(key: string, why: string): never {
    throw new Error(`${this.where}: '${this.prefix}${key}' ${show(this.cfg[key])} is not supported: ${why}`);
  }
}

/**
 * Reads either layout's config.json; errors name the source and the key as config.json spells it. Keys
 * that would change the model beyond what is implemented are refused: LayerNorm instead of RMSNorm
 * (`rms_norm: false`), an activation other than SiLU (`hidden_act`), MLP blocks (state-spaces
 * `d_intermediate > 0`), attention layers, Mamba2. `residual_in_fp32` and `fused_add_norm` are accepted
 * either way: every tensor here is f32 (so the residual always is), and the fusion is a CUDA kernel detail.
 * The `time_step_*` (`ssm_cfg.dt_*`) keys only set the initialisation; they are kept in the config.
 */
export function parseCheckpointConfig(cfg: Record<string, unknown>, where = "config.json"): CheckpointConfig {
  if (typeof cfg !== "object" || cfg === null || Array.isArray(cfg)) {
    throw new Error(`${where}: not a JSON object`);
  }
  const r = new ConfigReader(cfg, where);
  if ("hidden_size" in cfg || cfg.model_type !== undefined) {
    if (cfg.model_type !== undefined && cfg.model_type !== "mamba") {
      throw new Error(`${where}: model_type '${cfg.model_type}' is not a Mamba (1) model`);
    }
    const unknown = Object.keys(cfg).filter((k) => !HF_KEYS.has(k));
    if (unknown.length) throw new Error(`${where}: unknown config keys ${unknown.join(", ")}`);
    // transformers' MambaMixer applies ACT2FN[hidden_act], where "swish" is SiLU too.
    if (r.has("hidden_act") && cfg.hidden_act !== "silu" && cfg.hidden_act !== "swish") {
      r.refuse("hidden_act", `the mixer's activation here is SiLU ("silu" or "swish")`);
    }
    if (r.has("rms_norm") && !r.bool("rms_norm")) {
      r.refuse("rms_norm", "the norms here are RMSNorm, not LayerNorm");
    }
    if (r.has("residual_in_fp32")) r.bool("residual_in_fp32");
    if (r.has("fused_add_norm")) r.bool("fused_add_norm");
    const dModel = r.int("hidden_size");
    const nLayers = r.int("num_hidden_layers");
    const dState = r.int("state_size");
    let expandFactor: number;
    if (r.has("intermediate_size")) {
      const inner = r.int("intermediate_size");
      if (inner % dModel !== 0) {
        throw new Error(
          `${where}: 'intermediate_size' ${inner} is not a multiple of 'hidden_size' ${dModel}: only whole ` +
            `expansion factors are supported`,
        );
      }
      expandFactor = inner / dModel;
      if (r.has("expand") && cfg.expand !== expandFactor) {
        throw new Error(
          `${where}: 'expand' ${show(cfg.expand)} disagrees with 'intermediate_size' ${inner} / ` +
            `'hidden_size' ${dModel} = ${expandFactor}`,
        );
      }
    } else {
      expandFactor = r.int("expand", 2); // transformers' MambaConfig defaults
    }
    const dtMin = r.pos("time_step_min", 0.001);
    const dtMax = r.pos("time_step_max", 0.1);
    if (dtMin > dtMax) {
      throw new Error(`${where}: 'time_step_min' ${dtMin} is greater than 'time_step_max' ${dtMax}`);
    }
    const config: MambaConfigInput = {
      dModel,
      nLayers,
      dState,
      expandFactor,
      dConv: r.int("conv_kernel", 4),
      dtRank: r.rank("time_step_rank"),
      bias: r.bool("use_bias", false),
      convBias: r.bool("use_conv_bias", true),
      rmsNormEps: r.pos("layer_norm_epsilon", 1e-5),
      dtMin,
      dtMax,
      dtInit: r.oneOf("time_step_init_scheme", ["random", "constant"] as const, "random"),
      dtScale: r.pos("time_step_scale", 1),
      dtInitFloor: r.pos("time_step_floor", 1e-4),
      innerLayernorms: r.bool("inner_layernorms", false),
    };
    // Checked, not applied: the -hf configs carry it over from state-spaces, but transformers' MambaConfig
    // has no such field, and MambaForCausalLM's embedding and head have exactly vocab_size rows.
    r.int("pad_vocab_size_multiple", 1);
    return {
      config,
      lm: {
        vocabSize: r.int("vocab_size"),
        padVocabSizeMultiple: 1,
        tieEmbeddings: r.bool("tie_word_embeddings", true),
        paddingIdx: null, // HF's MambaForCausalLM embedding has no padding_idx
      },
      layout: "hf",
    };
  }
  if ("d_model" in cfg) {
    const unknown = Object.keys(cfg).filter((k) => !SS_KEYS.has(k));
    if (unknown.length) throw new Error(`${where}: unknown config keys ${unknown.join(", ")}`);
    const rawSsm = cfg.ssm_cfg ?? {};
    if (typeof rawSsm !== "object" || rawSsm === null || Array.isArray(rawSsm)) {
      throw new Error(`${where}: 'ssm_cfg' must be an object, got ${show(rawSsm)}`);
    }
    const ssm = rawSsm as Record<string, unknown>;
    const s = new ConfigReader(ssm, where, "ssm_cfg.");
    if (ssm.layer !== undefined && ssm.layer !== "Mamba1") {
      throw new Error(`${where}: ssm_cfg.layer '${ssm.layer}' is not supported (only Mamba1)`);
    }
    const badSsm = Object.keys(ssm).filter((k) => !SSM_KEYS.has(k));
    if (badSsm.length) throw new Error(`${where}: unknown ssm_cfg keys ${badSsm.join(", ")}`);
    if (Array.isArray(cfg.attn_layer_idx) && cfg.attn_layer_idx.length) {
      throw new Error(`${where}: hybrid models with attention layers are not supported`);
    }
    if (r.int("d_intermediate", 0, 0) > 0) {
      r.refuse("d_intermediate", "the blocks here have no MLP after the mixer (0)");
    }
    if (!r.bool("rms_norm", true)) r.refuse("rms_norm", "the norms here are RMSNorm, not LayerNorm");
    r.bool("residual_in_fp32", true);
    r.bool("fused_add_norm", true);
    if (s.has("use_fast_path")) s.bool("use_fast_path");
    const dtMin = s.pos("dt_min", 0.001);
    const dtMax = s.pos("dt_max", 0.1);
    if (dtMin > dtMax) {
      throw new Error(`${where}: 'ssm_cfg.dt_min' ${dtMin} is greater than 'ssm_cfg.dt_max' ${dtMax}`);
    }
    const config: MambaConfigInput = {
      dModel: r.int("d_model"),
      nLayers: r.int("n_layer"),
      dState: s.int("d_state", 16),
      dConv: s.int("d_conv", 4),
      expandFactor: s.int("expand", 2),
      dtRank: s.rank("dt_rank"),
      bias: s.bool("bias", false),
      convBias: s.bool("conv_bias", true),
      dtMin,
      dtMax,
      dtInit: s.oneOf("dt_init", ["random", "constant"] as const, "random"),
      dtScale: s.pos("dt_scale", 1),
      dtInitFloor: s.pos("dt_init_floor", 1e-4),
    };
    return {
      config,
      lm: {
        vocabSize: r.int("vocab_size"),
        padVocabSizeMultiple: r.int("pad_vocab_size_multiple", 8),
        tieEmbeddings: r.bool("tie_embeddings", true),
        paddingIdx: null, // state-spaces' MambaLMHeadModel embedding has no padding_idx
      },
      layout: "state-spaces",
    };
  }
  throw new Error(
    `${where}: neither a transformers Mamba config (hidden_size) nor a state-spaces one (d_model)`,
  );
}

/** Our parameter name for a checkpoint tensor name (or null if it is not ours). */
export function mapKey(key: string): string | null {
  if (key === "backbone.embeddings.weight" || key === "backbone.embedding.weight") return "embedding.weight";
  if (key.startsWith("backbone.norm_f.")) return key.slice("backbone.".length);
  if (key.startsWith("backbone.layers.")) return "mamba." + key.slice("backbone.".length);
  if (key === "lm_head.weight") return key;
  return null;
}

/** Options of {@linkcode fromPretrained} (hub options apply when the source is a hub id). */
export interface PretrainedOptions extends HubOptions {
  /**
   * Where the tokenizer comes from: a hub id, folder or URL holding `tokenizer.json` (+
   * `tokenizer_config.json`), or a {@linkcode Tokenizer}; `false`: none. Default: the model's own
   * `tokenizer.json` when it has one (it is optional). A tokenizer id is read at revision "main".
   */
  tokenizer?: string | Tokenizer | false;
}

/** A {@linkcode MambaLM} loaded by {@linkcode fromPretrained}, with its tokenizer. */
export class PretrainedLM extends MambaLM {
  /** The tokenizer found with the model or named by the `tokenizer` option; null when there is none. */
  readonly tokenizer: Tokenizer | null;
  /** Where the model came from: folder, URL, `org/name@revision`, or for {@linkcode fromPretrainedFiles} its
   * `options.name` (default "files"). */
  readonly source: string;

  /** Builds the model (weights are loaded by {@linkcode fromPretrained}). */
  constructor(config: MambaConfigInput, options: LMOptions, tokenizer: Tokenizer | null, source: string) {
    super(config, options);
    this.tokenizer = tokenizer;
    this.source = source;
  }
}

const isUrl = (s: string) => /^https?:\/\//i.test(s);

// A response whose body errors when no bytes come for `timeoutMs` while a read waits (each read re-arms the
// timer, so a slow download that keeps going is not cut off; time spent between reads does not count).
function timedResponse(res: Response, ac: AbortController, timeoutMs: number, url: string): Response {
  if (!res.body) return res;
  const reader = res.body.getReader();
  const body = new ReadableStream<Uint8Array>({
    async pull(controller) {
      let timer: ReturnType<typeof setTimeout> | undefined;
      const stalled = new Promise<never>((_, reject) => {
        timer = setTimeout(() => reject(new Error(`no data from ${url} for ${timeoutMs} ms`)), timeoutMs);
      });
      try {
        const r = await Promise.race([reader.read(), stalled]);
        if (r.done) controller.close();
        else controller.enqueue(r.value);
      } catch (e) {
        ac.abort(e); // drops the connection
        throw e; // errors this stream: the reader sees `e`
      } finally {
        clearTimeout(timer);
      }
    },
    async cancel(reason) {
      await reader.cancel(reason).catch(() => {});
    },
  }, { highWaterMark: 0 });
  return new Response(body, { status: res.status, statusText: res.statusText, headers: res.headers });
}

function urlSource(prefix: string, options: HubOptions, where?: string): ModelSource {
  const base = prefix.replace(/\/+$/, "");
  const timeoutMs = options.timeoutMs ?? 30_000;
  if (!(timeoutMs > 0)) throw new Error(`timeoutMs must be a positive number, got ${timeoutMs}`);
  const get = async (file: string): Promise<Response | null> => {
    const url = `${base}/${file}`;
    const ac = new AbortController();
    const timer = setTimeout(
      () => ac.abort(new Error(`no response within ${timeoutMs} ms`)),
      timeoutMs,
    );
    let res: Response;
    try {
      res = await fetch(url, { headers: { "accept-encoding": "identity" }, signal: ac.signal });
    } catch (e) {
      throw new Error(`cannot fetch ${url}: ${(e as Error).message}`, { cause: e });
    } finally {
      clearTimeout(timer);
    }
    if (res.status === 404) {
      await res.body?.cancel();
      return null;
    }
    if (!res.ok) {
      await res.body?.cancel();
      throw new Error(`cannot fetch ${url}: HTTP ${res.status}`);
    }
    return timedResponse(res, ac, timeoutMs, url);
  };
  return {
    where: where ?? base,
    async text(file, optional) {
      const res = await get(file);
      if (res === null) {
        if (optional) return null;
        throw new Error(`cannot fetch ${base}/${file}: HTTP 404`);
      }
      try {
        return await res.text();
      } catch (e) {
        throw new Error(`cannot fetch ${base}/${file}: ${(e as Error).message}`, { cause: e });
      }
    },
    async open(file) {
      const res = await get(file);
      return res && responseSource(res, `${base}/${file}`);
    },
  };
}

// Whether the file system is there (Deno): folders and the hub cache; in a browser, only fetch and blobs.
const hasFileSystem = () => typeof (globalThis as { Deno?: unknown }).Deno !== "undefined";

// In a browser: the files of a hub repository fetched straight from the hub (the HTTP cache keeps them).
function hubUrlSource(id: string, options: HubOptions): ModelSource {
  const revision = options.revision ?? "main";
  if (options.localFilesOnly) {
    throw new HubError(
      "NotCached",
      `${id}: there is no hub cache folder in a browser and downloads are off (localFilesOnly); load the ` +
        `files from a URL or pick them (fromPretrainedFiles) instead`,
    );
  }
  const endpoint = (options.endpoint ?? hubEndpoint()).replace(/\/+$/, "");
  return urlSource(`${endpoint}/${id}/resolve/${encodeURIComponent(revision)}`, options, `${id}@${revision}`);
}

async function sourceOf(s: string, options: HubOptions): Promise<ModelSource> {
  if (isUrl(s)) return urlSource(s, options);
  if (hasFileSystem()) return (await import("./pretrained_fs.ts")).localSource(s, options);
  if (isHubId(s)) return hubUrlSource(s, options);
  // A browser: a path relative to the page.
  const page = (globalThis as { location?: { href: string } }).location?.href;
  if (!page) throw new Error(`'${s}' is neither a URL nor a hub id, and there is no file system here`);
  return urlSource(new URL(s, page).href, options);
}

/** Model files by name (`config.json`, `model.safetensors`, ...): files picked in a page, or blobs/bytes. */
export type ModelFiles = Iterable<File> | Record<string, Blob | Uint8Array<ArrayBuffer>>;

function filesSource(files: ModelFiles, where: string): ModelSource {
  const byName = new Map<string, Blob>();
  if (Symbol.iterator in files) {
    for (const f of files as Iterable<File>) {
      if (byName.has(f.name)) throw new Error(`${where}: two files are named ${f.name}`);
      byName.set(f.name, f);
    }
  } else {
    for (const [name, b] of Object.entries(files)) byName.set(name, b instanceof Blob ? b : new Blob([b]));
  }
  const names = () => [...byName.keys()].join(", ") || "none";
  return {
    where,
    async text(file, optional) {
      const b = byName.get(file);
      if (b) return await b.text();
      if (optional) return null;
      throw new Error(`${where}/${file}: no such file among the given ones (${names()})`);
    },
    open(file) {
      const b = byName.get(file);
      return Promise.resolve(b ? blobSource(b, `${where}/${file}`) : null);
    },
  };
}

// `unique`: a key twice in one object is an error (JSON.parse would keep the last one silently); set for
// config.json and the shard index, whose keys decide the model, not for the tokenizer's files.
function parseJson(text: string, where: string, unique = false): Record<string, unknown> {
  let json: unknown;
  try {
    json = JSON.parse(text);
  } catch (e) {
    throw new Error(`${where} is not valid JSON: ${(e as Error).message}`);
  }
  if (typeof json !== "object" || json === null || Array.isArray(json)) {
    throw new Error(`${where}: not a JSON object`);
  }
  const dup = unique ? duplicateJsonKey(text) : null;
  if (dup !== null) throw new Error(`${where}: the key ${dup} is there twice`);
  return json as Record<string, unknown>;
}

async function tokenizerOf(src: ModelSource, required: boolean): Promise<Tokenizer | null> {
  const text = await src.text("tokenizer.json", !required);
  if (text === null) return null;
  const cfgText = await src.text("tokenizer_config.json", true);
  const where = `${src.where}/tokenizer.json`;
  return tokenizerFromJSON(
    parseJson(text, where),
    cfgText === null ? {} : parseJson(cfgText, `${src.where}/tokenizer_config.json`),
    where,
  );
}

/**
 * Loads the tokenizer of a hub id, folder or URL: its `tokenizer.json` (required) and
 * `tokenizer_config.json` (optional). Char-model files give a {@linkcode ByteTokenizer}, Hugging Face ones a
 * {@linkcode HubTokenizer}.
 */
export async function loadTokenizer(idOrDirOrUrl: string, options: HubOptions = {}): Promise<Tokenizer> {
  return (await tokenizerOf(await sourceOf(idOrDirOrUrl, options), true))!;
}

// The checkpoint's tensor names (checkpoint name -> file), from the index of a sharded checkpoint or the
// header of the single file (whose source stays open, positioned at the data).
interface WeightPlan {
  files: string[];
  fileOf: Map<string, string>;
  // The single file, already open with its header read.
  single: { src: ByteSource; header: SafetensorsHeader } | null;
}

async function readHeader(src: ByteSource, where: string): Promise<SafetensorsHeader> {
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

async function planWeights(src: ModelSource): Promise<WeightPlan> {
  const single = await src.open("model.safetensors");
  if (single) {
    try {
      const header = await readHeader(single, `${src.where}/model.safetensors`);
      const fileOf = new Map([...header.entries.keys()].map((k) => [k, "model.safetensors"]));
      return { files: ["model.safetensors"], fileOf, single: { src: single, header } };
    } catch (e) {
      await single.close();
      throw e;
    }
  }
  const indexWhere = `${src.where}/model.safetensors.index.json`;
  const indexText = await src.text("model.safetensors.index.json", true);
  if (indexText === null) {
    const notCached = src.notCached?.get("model.safetensors");
    if (notCached) throw notCached;
    throw new Error(
      `${src.where} has neither model.safetensors nor model.safetensors.index.json: only safetensors ` +
        `checkpoints are read (convert a pytorch_model.bin with transformers' save_pretrained, which writes ` +
        `safetensors)`,
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
  return { files: [...new Set(fileOf.values())].sort(), fileOf, single: null };
}

const LITTLE_ENDIAN = new Uint8Array(new Uint16Array([1]).buffer)[0] === 1;
const CHUNK_BYTES = 4 << 20;

// Reads one tensor's bytes from `src` (positioned at them) and decodes them to f32, F32 straight into the
// result, F16/BF16 (and big-endian hosts) a few MiB at a time, so that only the decoded tensor is held.
async function readTensor(src: ByteSource, entry: SafetensorsEntry, name: string): Promise<Float32Array> {
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
  return decodeTensor(entry, raw, name) as Float32Array; // F64: streamInto admits no other dtype here
}

// The dtypes that load into the (f32) parameters; integer and bool tensors are refused, not converted.
const FLOAT_DTYPES = new Set(["F32", "F16", "BF16", "F64"]);

const describe = (k: string, e: SafetensorsEntry) =>
  `tensor ${k} (${mapKey(k)}) is ${e.dtype} ${fmt(e.shape)} at data_offsets [${e.dataOffsets.join(", ")}]`;

// Streams the tensors of one file into the model, in file order, one tensor on the host at a time. Every
// name maps to a parameter of `params` (loadFrom checked); shapes and dtypes are checked before any read.
async function streamInto(
  model: MambaLM,
  params: Map<string, Tensor>,
  src: ByteSource,
  header: SafetensorsHeader,
  where: string,
): Promise<void> {
  const mismatched: string[] = [];
  for (const [k, e] of header.entries) {
    if (!FLOAT_DTYPES.has(e.dtype)) {
      throw new Error(`${where}: ${describe(k, e)}; expected a float dtype (F32, F16, BF16 or F64)`);
    }
    const p = params.get(mapKey(k)!)!;
    if (e.shape.join() !== p.shape.join()) {
      mismatched.push(`${mapKey(k)}: checkpoint ${fmt(e.shape)} vs model ${fmt(p.shape)}`);
    }
  }
  if (mismatched.length) throw new Error(`loadStateDict: shape mismatch for ${mismatched.join("; ")}`);
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

// Compares the checkpoint's shapes (of the parameters that config.json sizes) and its number of layers with
// what config.json makes, naming the config keys; names that are no parameter are left to loadFrom's check.
function checkShapes(
  input: MambaConfigInput,
  lm: LMOptions,
  layout: CheckpointConfig["layout"],
  header: SafetensorsHeader,
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
    const want = m ? (Number(m[1]) < L ? layer[m[2]] : undefined) : dims[o];
    const shape = header.entries.get(k)!.shape;
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

// A list of names for a message: the first `n`, then how many in all.
const names = (list: string[], n = 12) =>
  list.length <= n ? list.join(", ") : `${list.slice(0, n).join(", ")}, ... (${list.length} in all)`;

/**
 * Loads a model from a hub id (`state-spaces/mamba-130m-hf`, downloaded into the Hugging Face cache; see
 * {@linkcode hubDownload}), a local folder, or a URL prefix, holding `config.json` (transformers or
 * state-spaces layout) and `model.safetensors` or `model.safetensors.index.json` with its shards.
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
  await init();
  return await loadFrom(filesSource(files, options.name ?? "files"), options);
}

async function loadFrom(src: ModelSource, options: PretrainedOptions): Promise<PretrainedLM> {
  const cfgWhere = `${src.where}/config.json`;
  const { config, lm, layout } = parseCheckpointConfig(
    parseJson((await src.text("config.json", false))!, cfgWhere, true),
    cfgWhere,
  );

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
    tokenizer = await tokenizerOf(src, false);
  }
  if (tokenizer && tokenizer.vocabSize > lm.vocabSize) {
    throw new Error(
      `${tokWhere}: the tokenizer has ${tokenizer.vocabSize} token ids but ${cfgWhere} has vocab_size ` +
        `${lm.vocabSize}: ids past ${
          lm.vocabSize - 1
        } would have no embedding (a tokenizer of another model?)`,
    );
  }

  const plan = await planWeights(src);
  let model: PretrainedLM | undefined;
  const open: ByteSource[] = plan.single ? [plan.single.src] : [];
  try {
    const weightsWhere = plan.single
      ? `${src.where}/model.safetensors`
      : `${src.where}/model.safetensors.index.json`;
    const ours = new Map<string, string>();
    const unexpected: string[] = [];
    for (const k of plan.fileOf.keys()) {
      const o = mapKey(k);
      if (o === null) unexpected.push(k);
      else if (ours.has(o)) throw new Error(`${weightsWhere}: tensors ${ours.get(o)} and ${k} are both ${o}`);
      else ours.set(o, k);
    }
    if (unexpected.length) throw new Error(`${weightsWhere}: unexpected tensors ${unexpected.join(", ")}`);
    // Tied only when the config says so and the checkpoint has no separate head.
    const tie = lm.tieEmbeddings === true && !ours.has("lm_head.weight");
    // Shapes checked against config.json before the model is built: a corrupt size there (vocab_size 1e9,
    // num_hidden_layers 2^60) would otherwise fail in an allocation, with no word of config.json.
    if (plan.single) checkShapes(config, lm, layout, plan.single.header, ours, weightsWhere, cfgWhere);
    model = new PretrainedLM(config, { ...lm, tieEmbeddings: tie }, tokenizer, src.where);
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
      if (missing.length) parts.push(`parameters the checkpoint lacks: ${names(missing)}`);
      throw new Error(`${weightsWhere}: ${parts.join("; ")}`);
    }
    if (plan.single) {
      await streamInto(model, params, plan.single.src, plan.single.header, weightsWhere);
    } else {
      for (const file of plan.files) {
        const where = `${src.where}/${file}`;
        const shard = await src.open(file);
        if (!shard) throw new Error(`${weightsWhere} names ${file}, which ${src.where} does not have`);
        open.push(shard);
        const header = await readHeader(shard, where);
        const want = [...plan.fileOf].filter(([, f]) => f === file).map(([k]) => k);
        const lacking = want.filter((k) => !header.entries.has(k));
        const extra = [...header.entries.keys()].filter((k) => plan.fileOf.get(k) !== file);
        if (lacking.length || extra.length) {
          throw new Error(
            `${where} does not match ${weightsWhere}` +
              (lacking.length ? `; it lacks ${lacking.join(", ")}` : "") +
              (extra.length ? `; the index does not put ${extra.join(", ")} here` : ""),
          );
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

/**
 * The Hugging Face transformers config.json of a model. A model with inner layernorms (`innerLayernorms`,
 * which transformers' Mamba does not have) also gets `"inner_layernorms": true`, a key of ours (mamba.py's
 * name) that {@linkcode fromPretrained} reads back.
 */
export function hfConfig(model: MambaLM): Record<string, unknown> {
  const c = model.config;
  return {
    architectures: ["MambaForCausalLM"],
    model_type: "mamba",
    hidden_size: c.dModel,
    state_size: c.dState,
    num_hidden_layers: c.nLayers,
    expand: c.expandFactor,
    conv_kernel: c.dConv,
    time_step_rank: c.dtRank,
    intermediate_size: c.dInner,
    vocab_size: model.vocabSize,
    use_bias: c.bias,
    use_conv_bias: c.convBias,
    layer_norm_epsilon: c.rmsNormEps,
    tie_word_embeddings: model.tied,
    pad_vocab_size_multiple: 1,
    time_step_min: c.dtMin,
    time_step_max: c.dtMax,
    time_step_init_scheme: c.dtInit,
    time_step_scale: c.dtScale,
    time_step_floor: c.dtInitFloor,
    torch_dtype: "float32",
    ...(c.innerLayernorms ? { inner_layernorms: true } : {}),
  };
}

/** The model's tensors under Hugging Face names, read back from the GPU. */
export async function hfTensors(model: MambaLM): Promise<Record<string, SafetensorsInput>> {
  const out: Record<string, SafetensorsInput> = {};
  for (const [name, p] of model.namedParameters()) {
    const key = name === "embedding.weight"
      ? "backbone.embeddings.weight"
      : name === "norm_f.weight"
      ? "backbone.norm_f.weight"
      : name.startsWith("mamba.")
      ? "backbone." + name.slice("mamba.".length)
      : name;
    out[key] = { shape: [...p.shape], data: await p.toArray() };
  }
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

/**
 * A checkpoint's files as bytes, by name: `model.safetensors` and `config.json` (Hugging Face layout), and the
 * tokenizer's `tokenizer.json` (+ `tokenizer_config.json` when it has one). `tokenizer` defaults to the
 * model's own (a {@linkcode PretrainedLM}'s); null leaves it out. In a page, offer the files as downloads; in
 * Deno, {@linkcode saveCheckpoint} writes them into a folder. {@linkcode fromPretrainedFiles} and
 * {@linkcode fromPretrained} read them back, tokenizer included.
 */
export async function checkpointFiles(
  model: MambaLM,
  tokenizer: Tokenizer | null = model instanceof PretrainedLM ? model.tokenizer : null,
): Promise<Record<string, Uint8Array<ArrayBuffer>>> {
  const text = (v: unknown, indent: number) =>
    new TextEncoder().encode(JSON.stringify(v, null, indent) + "\n");
  const tok = tokenizer === null ? null : tokenizerFilesFor(model, tokenizer);
  const files: Record<string, Uint8Array<ArrayBuffer>> = {
    "model.safetensors": serializeSafetensors(await hfTensors(model)),
    "config.json": text(hfConfig(model), 2),
  };
  if (tok) files["tokenizer.json"] = text(tok.tokenizer, 1);
  if (tok?.config) files["tokenizer_config.json"] = text(tok.config, 2);
  return files;
}

/**
 * Saves `config.json` + `model.safetensors` (Hugging Face layout) and the tokenizer's files (see
 * {@linkcode checkpointFiles}: the model's own by default; null writes none and leaves any in `dir` alone) into
 * `dir`, each file atomically (Deno). A tokenizer without a `tokenizer_config.json` removes one left in `dir`
 * by an earlier save, which would otherwise load with it.
 */
export async function saveCheckpoint(
  model: MambaLM,
  dir: string,
  tokenizer: Tokenizer | null = model instanceof PretrainedLM ? model.tokenizer : null,
): Promise<void> {
  const files = await checkpointFiles(model, tokenizer);
  const stale = files["tokenizer.json"] && !files["tokenizer_config.json"] ? ["tokenizer_config.json"] : [];
  await (await import("./pretrained_fs.ts")).writeFiles(dir, files, stale);
}
