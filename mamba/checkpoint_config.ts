/**
 * The config.json of a checkpoint, in the two layouts people download (Hugging Face transformers and the
 * original state-spaces one), turned into ours and back: every key read, checked and named in errors, and
 * what this library does not implement refused. Also the mapping of their tensor names to ours.
 * @module
 */

import type { MambaConfigInput } from "./config.ts";
import type { LMOptions, MambaLM } from "./lm.ts";

/** A checkpoint's config turned into ours, plus how its tensor names map to ours. */
export interface CheckpointConfig {
  /** Backbone config. */
  config: MambaConfigInput;
  /** Vocabulary options. */
  lm: LMOptions;
  /** "hf" (transformers) or "state-spaces". */
  layout: "hf" | "state-spaces";
  /**
   * Keys of an HF-layout config.json that this library does not know and so did not read, as transformers
   * ignores them (generic `PretrainedConfig` keys, and those of newer transformers versions); empty for the
   * state-spaces layout, which refuses unknown keys. The weights are still checked against the config by
   * name, shape and dtype, so a key that changed the model's tensors fails there.
   */
  ignored: string[];
}

/** The HF-layout keys this library knows: read and checked, or (token ids, `initializer_range`, `use_cache`, ...)
 * known not to change the weights or how they compute. Any other key of that layout is ignored, and listed. */
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
  "layer_norm_eps", // another spelling of layer_norm_epsilon: read where that is absent, checked where both are
  "_name_or_path",
  "dtype",
  "inner_layernorms", // ours (mamba.py's inner_layernorms): written by hfConfig when true
  "mup", // ours (mamba.py's mup and mup_base_width): written by hfConfig for a muP model
  "mup_base_width",
  "base_std", // ours (mamba.py's base_std): written by hfConfig where it is not 0.02
  "mambats_save_id", // ours: the save that wrote it, also in model.safetensors' metadata (a mixed pair is refused)
  "mambats_tokenizer_digest", // ours: the digest of the tokenizer files saved with it (others are refused)
  "padding_idx", // ours (mamba.py's Embedding padding_idx, 0 there): written by hfConfig where there is one
  "d_inner", // the -hf conversions' copies of state-spaces names (d_model, n_layer too): checked against ours
  "use_associative_scan", // transformers' choice of scan in PyTorch: how a run executes, not the weights
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

/** `ssm_cfg` as an object whose `layer`, if any, is Mamba1 (the only mixer here). */
function ssmConfig(raw: unknown, where: string): Record<string, unknown> {
  if (typeof raw !== "object" || raw === null || Array.isArray(raw)) {
    throw new Error(`${where}: 'ssm_cfg' must be an object, got ${show(raw)}`);
  }
  const ssm = raw as Record<string, unknown>;
  if (ssm.layer !== undefined && ssm.layer !== "Mamba1") {
    throw new Error(`${where}: ssm_cfg.layer '${ssm.layer}' is not supported (only Mamba1)`);
  }
  return ssm;
}

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

  /** Whether the key is present. A JSON null is present: a key read here that is null is an error naming it
   * (transformers would keep the None), except where null means none (`padding_idx`, `ssm_cfg`). */
  has(key: string): boolean {
    return this.cfg[key] !== undefined;
  }

  #get(key: string, fallback: unknown): unknown {
    if (this.has(key)) return this.cfg[key];
    if (fallback === undefined) throw new Error(`${this.where} has no '${this.prefix}${key}'`);
    return fallback;
  }

  /** An integer >= min (1 unless told) and, where `sized` (a tensor's size: MambaConfig's bound, named here by
   * the file's key), below 2^31; `fallback` when absent, else required. */
  int(key: string, fallback?: number, min = 1, sized = true): number {
    const v = this.#get(key, fallback);
    if (!Number.isInteger(v) || (v as number) < min || (sized && (v as number) > 2 ** 31 - 1)) {
      const below = sized ? " below 2^31" : "";
      this.#bad(
        key,
        min === 1 ? `a positive integer${below}` : `an integer >= ${min}${sized ? " and" : ""}${below}`,
      );
    }
    return v as number;
  }

  /** An index into the `n` rows that key `of` counts: an integer in [0, n). */
  index(key: string, n: number, of: string): number {
    const v = this.#get(key, undefined);
    if (!Number.isInteger(v) || (v as number) < 0 || (v as number) >= n) {
      this.#bad(key, `an integer in [0, ${n}) (${of} ${n})`);
    }
    return v as number;
  }

  /** A positive number within f32's range (MambaConfig's bound, named here by the file's key). */
  pos(key: string, fallback?: number): number {
    const v = this.#get(key, fallback);
    if (typeof v !== "number" || !(v > 0) || !(v <= 3.4028234663852886e38)) {
      this.#bad(key, "a positive number within f32's range");
    }
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
    const v = this.cfg[key] === undefined ? "auto" : this.cfg[key];
    if (v !== "auto" && (!Number.isInteger(v) || (v as number) < 1)) {
      this.#bad(key, `"auto" or a positive integer`);
    }
    return v as number | "auto";
  }

  /** Checks that `key`, where present, is the integer `want` that `of` gave (a key with two spellings). */
  same(key: string, of: string, want: number): void {
    if (this.has(key) && this.int(key) !== want) {
      throw new Error(
        `${this.where}: '${this.prefix}${key}' ${show(this.cfg[key])} disagrees with '${of}' ${want}`,
      );
    }
  }

  /** Refuses a value that changes the model in a way this library does not implement. */
  refuse(key: string, why: string): never {
    throw new Error(`${this.where}: '${this.prefix}${key}' ${show(this.cfg[key])} is not supported: ${why}`);
  }
}

/**
 * Reads either layout's config.json; errors name the source and the key as config.json spells it. The HF
 * layout's keys that this library does not know are ignored, as transformers does (listed in `ignored`); the
 * state-spaces layout (a closed dataclass) refuses them. Keys
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
    const ignored = Object.keys(cfg).filter((k) => !HF_KEYS.has(k));
    // transformers' MambaMixer applies ACT2FN[hidden_act], where "swish" is SiLU too.
    if (r.has("hidden_act") && cfg.hidden_act !== "silu" && cfg.hidden_act !== "swish") {
      r.refuse("hidden_act", `the mixer's activation here is SiLU ("silu" or "swish")`);
    }
    if (r.has("rms_norm") && !r.bool("rms_norm")) {
      r.refuse("rms_norm", "the norms here are RMSNorm, not LayerNorm");
    }
    if (r.has("residual_in_fp32")) r.bool("residual_in_fp32");
    if (r.has("fused_add_norm")) r.bool("fused_add_norm");
    if (r.has("use_associative_scan")) r.bool("use_associative_scan");
    if (r.has("use_mambapy")) r.bool("use_mambapy");
    // carried over from state-spaces configs, read by neither transformers nor us: one naming another layer
    // (Mamba2) is refused, not loaded as Mamba1
    if (cfg.ssm_cfg != null) ssmConfig(cfg.ssm_cfg, where);
    const dModel = r.int("hidden_size");
    const nLayers = r.int("num_hidden_layers", undefined, 1, false); // the loader names a count past the file's
    r.same("d_model", "hidden_size", dModel);
    r.same("n_layer", "num_hidden_layers", nLayers);
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
    r.same(
      "d_inner",
      r.has("intermediate_size") ? "intermediate_size" : "expand * hidden_size",
      expandFactor * dModel,
    );
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
      rmsNormEps: r.has("layer_norm_epsilon") ? r.pos("layer_norm_epsilon") : r.pos("layer_norm_eps", 1e-5),
      dtMin,
      dtMax,
      dtInit: r.oneOf("time_step_init_scheme", ["random", "constant"] as const, "random"),
      dtScale: r.pos("time_step_scale", 1),
      dtInitFloor: r.pos("time_step_floor", 1e-4),
      innerLayernorms: r.bool("inner_layernorms", false),
      mup: r.bool("mup", false),
      mupBaseWidth: r.pos("mup_base_width", 128),
      baseStd: r.pos("base_std", 0.02),
    };
    if (
      r.has("layer_norm_epsilon") && r.has("layer_norm_eps") && r.pos("layer_norm_eps") !== config.rmsNormEps
    ) {
      throw new Error(
        `${where}: 'layer_norm_eps' ${show(cfg.layer_norm_eps)} disagrees with 'layer_norm_epsilon' ` +
          `${config.rmsNormEps}`,
      );
    }
    if (config.mup && !Number.isFinite(dModel / config.mupBaseWidth!)) {
      throw new Error(
        `${where}: 'mup_base_width' ${config.mupBaseWidth} makes the width multiplier hidden_size / ` +
          "mup_base_width overflow",
      );
    }
    const vocabSize = r.int("vocab_size");
    // Checked, not applied: the -hf configs carry it over from state-spaces, but transformers' MambaConfig
    // has no such field, and MambaForCausalLM's embedding and head have exactly vocab_size rows.
    r.int("pad_vocab_size_multiple", 1);
    return {
      config,
      lm: {
        vocabSize,
        padVocabSizeMultiple: 1,
        tieEmbeddings: r.bool("tie_word_embeddings", true),
        // HF's MambaForCausalLM embedding has none; ours, saved here, keeps the row it froze
        paddingIdx: cfg.padding_idx == null ? null : r.index("padding_idx", vocabSize, "vocab_size"),
      },
      layout: "hf",
      ignored,
    };
  }
  if ("d_model" in cfg) {
    const unknown = Object.keys(cfg).filter((k) => !SS_KEYS.has(k));
    if (unknown.length) throw new Error(`${where}: unknown config keys ${unknown.join(", ")}`);
    const ssm = ssmConfig(cfg.ssm_cfg ?? {}, where);
    const s = new ConfigReader(ssm, where, "ssm_cfg.");
    const badSsm = Object.keys(ssm).filter((k) => !SSM_KEYS.has(k));
    if (badSsm.length) throw new Error(`${where}: unknown ssm_cfg keys ${badSsm.join(", ")}`);
    if (cfg.attn_layer_idx != null && !Array.isArray(cfg.attn_layer_idx)) { // (null: absent, as elsewhere)
      throw new Error(
        `${where}: 'attn_layer_idx' must be a list of layer indices, got ${show(cfg.attn_layer_idx)}`,
      );
    }
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
      nLayers: r.int("n_layer", undefined, 1, false),
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
      ignored: [],
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

/**
 * The Hugging Face transformers config.json of a model. A model with inner layernorms (`innerLayernorms`,
 * which transformers' Mamba does not have) also gets `"inner_layernorms": true`, a muP model `"mup": true`
 * and `"mup_base_width"`, a model initialised with another std than 0.02 `"base_std"`, and an embedding with a
 * padding row `"padding_idx"`: keys of ours
 * (mamba.py's names) that {@linkcode fromPretrained} reads back (transformers would ignore them, and give a muP
 * model's logits w times too large: a muP checkpoint is for mamba.ts).
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
    torch_dtype: model.weightDtype === "bf16" ? "bfloat16" : "float32",
    ...(model.embedding.paddingIdx === null ? {} : { padding_idx: model.embedding.paddingIdx }),
    ...(c.baseStd === 0.02 ? {} : { base_std: c.baseStd }),
    ...(c.innerLayernorms ? { inner_layernorms: true } : {}),
    ...(c.mup ? { mup: true, mup_base_width: c.mupBaseWidth } : {}),
  };
}
