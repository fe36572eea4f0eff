/**
 * Pretrained checkpoints: `config.json` + `model.safetensors` in the two layouts people download,
 * Hugging Face transformers (`state-spaces/mamba-130m-hf`) and the original state-spaces layout, from a
 * local folder or an `https://` URL; and saving a model back in the Hugging Face layout.
 * @module
 */

import { parseSafetensors, type SafetensorsInput, serializeSafetensors } from "../core/safetensors.ts";
import type { MambaConfigInput } from "./config.ts";
import { type LMOptions, MambaLM } from "./lm.ts";

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
]);

function need<T>(cfg: Record<string, unknown>, key: string, type: "number" | "string", where: string): T {
  const v = cfg[key];
  if (v === undefined) throw new Error(`${where}: config.json has no '${key}'`);
  const ok = type === "number" ? typeof v === "number" && Number.isFinite(v) : typeof v === "string";
  if (!ok) throw new Error(`${where}: config.json '${key}' must be a ${type}, got ${JSON.stringify(v)}`);
  return v as T;
}

/** Reads either layout's config.json; errors name the key and the source. */
export function parseCheckpointConfig(cfg: Record<string, unknown>, where = "config.json"): CheckpointConfig {
  if (typeof cfg !== "object" || cfg === null || Array.isArray(cfg)) {
    throw new Error(`${where}: not a JSON object`);
  }
  if ("hidden_size" in cfg || cfg.model_type !== undefined) {
    if (cfg.model_type !== undefined && cfg.model_type !== "mamba") {
      throw new Error(`${where}: model_type '${cfg.model_type}' is not a Mamba (1) model`);
    }
    const unknown = Object.keys(cfg).filter((k) => !HF_KEYS.has(k));
    if (unknown.length) throw new Error(`${where}: unknown config keys ${unknown.join(", ")}`);
    const dModel = need<number>(cfg, "hidden_size", "number", where);
    const config: MambaConfigInput = {
      dModel,
      nLayers: need<number>(cfg, "num_hidden_layers", "number", where),
      dState: need<number>(cfg, "state_size", "number", where),
      expandFactor: cfg.intermediate_size !== undefined
        ? need<number>(cfg, "intermediate_size", "number", where) / dModel
        : need<number>(cfg, "expand", "number", where),
      dConv: need<number>(cfg, "conv_kernel", "number", where),
      dtRank: cfg.time_step_rank === "auto" || cfg.time_step_rank === undefined
        ? "auto"
        : need<number>(cfg, "time_step_rank", "number", where),
      bias: (cfg.use_bias as boolean | undefined) ?? false,
      convBias: (cfg.use_conv_bias as boolean | undefined) ?? true,
      rmsNormEps: (cfg.layer_norm_epsilon as number | undefined) ?? 1e-5,
    };
    return {
      config,
      lm: {
        vocabSize: need<number>(cfg, "vocab_size", "number", where),
        padVocabSizeMultiple: (cfg.pad_vocab_size_multiple as number | undefined) ?? 1,
        tieEmbeddings: (cfg.tie_word_embeddings as boolean | undefined) ?? true,
      },
      layout: "hf",
    };
  }
  if ("d_model" in cfg) {
    const unknown = Object.keys(cfg).filter((k) => !SS_KEYS.has(k));
    if (unknown.length) throw new Error(`${where}: unknown config keys ${unknown.join(", ")}`);
    const ssm = (cfg.ssm_cfg ?? {}) as Record<string, unknown>;
    if (ssm.layer !== undefined && ssm.layer !== "Mamba1") {
      throw new Error(`${where}: ssm_cfg.layer '${ssm.layer}' is not supported (only Mamba1)`);
    }
    const badSsm = Object.keys(ssm).filter((k) => !SSM_KEYS.has(k));
    if (badSsm.length) throw new Error(`${where}: unknown ssm_cfg keys ${badSsm.join(", ")}`);
    if (Array.isArray(cfg.attn_layer_idx) && cfg.attn_layer_idx.length) {
      throw new Error(`${where}: hybrid models with attention layers are not supported`);
    }
    const config: MambaConfigInput = {
      dModel: need<number>(cfg, "d_model", "number", where),
      nLayers: need<number>(cfg, "n_layer", "number", where),
      dState: (ssm.d_state as number | undefined) ?? 16,
      dConv: (ssm.d_conv as number | undefined) ?? 4,
      expandFactor: (ssm.expand as number | undefined) ?? 2,
      dtRank: (ssm.dt_rank as number | "auto" | undefined) ?? "auto",
      bias: (ssm.bias as boolean | undefined) ?? false,
      convBias: (ssm.conv_bias as boolean | undefined) ?? true,
    };
    return {
      config,
      lm: {
        vocabSize: need<number>(cfg, "vocab_size", "number", where),
        padVocabSizeMultiple: (cfg.pad_vocab_size_multiple as number | undefined) ?? 8,
        tieEmbeddings: (cfg.tie_embeddings as boolean | undefined) ?? true,
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
  if (key === "backbone.norm_f.weight") return "norm_f.weight";
  if (key.startsWith("backbone.layers.")) return "mamba." + key.slice("backbone.".length);
  if (key === "lm_head.weight") return key;
  return null;
}

async function readBytes(base: string, file: string): Promise<Uint8Array> {
  if (/^https?:\/\//.test(base)) {
    const url = base.replace(/\/?$/, "/") + file;
    let res: Response;
    try {
      res = await fetch(url);
    } catch (e) {
      throw new Error(`cannot fetch ${url}: ${(e as Error).message}`);
    }
    if (!res.ok) {
      await res.body?.cancel();
      throw new Error(`cannot fetch ${url}: HTTP ${res.status}`);
    }
    return new Uint8Array(await res.arrayBuffer());
  }
  const path = `${base.replace(/\/$/, "")}/${file}`;
  try {
    return await Deno.readFile(path);
  } catch (e) {
    throw new Error(`cannot read ${path}: ${(e as Error).message}`);
  }
}

/** Loads a model from a local folder or a URL holding `config.json` and `model.safetensors`. */
export async function fromPretrained(dirOrUrl: string): Promise<MambaLM> {
  const cfgText = new TextDecoder().decode(await readBytes(dirOrUrl, "config.json"));
  let json: Record<string, unknown>;
  try {
    json = JSON.parse(cfgText);
  } catch (e) {
    throw new Error(`${dirOrUrl}/config.json is not valid JSON: ${(e as Error).message}`);
  }
  const { config, lm } = parseCheckpointConfig(json, `${dirOrUrl}/config.json`);
  const { tensors } = parseSafetensors(
    await readBytes(dirOrUrl, "model.safetensors"),
    `${dirOrUrl}/model.safetensors`,
  );
  const dict = new Map<string, { shape: number[]; data: Float32Array | Int32Array }>();
  const unexpected: string[] = [];
  for (const [k, t] of tensors) {
    const ours = mapKey(k);
    if (ours) dict.set(ours, t);
    else unexpected.push(k);
  }
  if (unexpected.length) {
    throw new Error(`${dirOrUrl}/model.safetensors: unexpected tensors ${unexpected.join(", ")}`);
  }
  // Tied only when the config says so and the file has no separate head.
  const tie = lm.tieEmbeddings === true && !dict.has("lm_head.weight");
  const model = new MambaLM(config, { ...lm, tieEmbeddings: tie });
  try {
    model.loadStateDict(dict);
  } catch (e) {
    model.dispose();
    throw new Error(`${dirOrUrl}: ${(e as Error).message}`);
  }
  return model;
}

/** The Hugging Face transformers config.json of a model. */
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

/** Saves `config.json` + `model.safetensors` (Hugging Face layout) into `dir`, each file atomically. */
export async function saveCheckpoint(model: MambaLM, dir: string): Promise<void> {
  const { writeFileAtomic } = await import("../core/safetensors_fs.ts");
  await Deno.mkdir(dir, { recursive: true });
  await writeFileAtomic(`${dir}/model.safetensors`, serializeSafetensors(await hfTensors(model)));
  await writeFileAtomic(`${dir}/config.json`, JSON.stringify(hfConfig(model), null, 2) + "\n");
}
