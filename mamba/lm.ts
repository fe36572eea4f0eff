/**
 * `MambaLM`: embedding -> Mamba -> final RMSNorm -> LM head, as mamba.py's `LM`; generation with the
 * prompt processed in one parallel forward and tokens chosen on the GPU.
 * @module
 */

import { disposeWithGraph, isGradEnabled, noGrad } from "../core/autograd.ts";
import { tensor, zeros } from "../core/creation.ts";
import { readSpans } from "../core/executor.ts";
import { cat, matmul, narrow, rmsNormMatmul } from "../core/ops/index.ts";
import { checkOptionKeys, showValue } from "../core/options.ts";
import { fmt } from "../core/shape.ts";
import { dispose, keep, Tensor, tidy } from "../core/tensor.ts";
import { normal } from "../nn/init.ts";
import { Embedding, Linear, RMSNorm, type WeightDtype } from "../nn/layers.ts";
import {
  type HostTensor,
  type LoadOptions,
  type LoadResult,
  Module,
  type StateDict,
  writeEntry,
} from "../nn/module.ts";
import { checkLayerCache, type LayerCache, Mamba } from "./block.ts";
import { type MambaConfig, mambaConfig, type MambaConfigInput, mupWidthMult } from "./config.ts";
import { drawSeed, sampleInto, type SampleOptions, sampleParams, seenMask, seenWords } from "./sampling.ts";

/** Options of {@linkcode MambaLM.prefill}. Unknown keys are an error. */
export interface PrefillOptions {
  /** The logits returned: of the last position (B, vocab), the default, or of "all" (B, L, vocab). */
  logits?: "last" | "all";
}

/** LM options on top of the Mamba config. Unknown keys are an error. */
export interface LMOptions {
  /** Vocabulary size before padding, a positive integer. */
  vocabSize: number;
  /** Pad the vocabulary to a multiple of this positive integer (default 1; as mamba.py's
   * `pad_vocab_size_multiple`). */
  padVocabSizeMultiple?: number;
  /** Share the embedding with the LM head (default false, as mamba.py). */
  tieEmbeddings?: boolean;
  /**
   * The embedding's padding row, an integer in [0, vocabSize) or null for none: its gradient is always zero,
   * so training never changes it (PyTorch's `padding_idx`). Default 0, as mamba.py's
   * `nn.Embedding(vocab_size, d_model, padding_idx=0)`; the row is still initialised with the rest of the
   * table. HF transformers' and state-spaces' Mamba have none ({@linkcode fromPretrained} gives null unless config.json
   * has `padding_idx`, as `saveCheckpoint` writes it).
   */
  paddingIdx?: number | null;
  /**
   * How the large weights are stored: "f32" (default), or "bf16" for inference: the embedding (and an untied
   * head) and every block's in_proj and out_proj in bfloat16, about half the memory, read as f32 by their
   * products (the rest stays f32). A bf16 model does not train ({@linkcode Trainer} refuses it).
   */
  weightDtype?: WeightDtype;
}

/**
 * Token ids: an i32 tensor (B, L), or B rows of L ids each, every row a number array or an Int32Array
 * (the rows {@linkcode MambaLM.generate} returns can be fed back as they are). A prompt's rows may differ in
 * length ({@linkcode MambaLM.generate}).
 */
export type Tokens = Tensor | readonly (readonly number[] | Int32Array)[];

/** Options of {@linkcode MambaLM.generate}. Unknown keys are an error. */
export interface GenerateOptions extends SampleOptions {
  /** Called with each batch of new tokens (B, n) as soon as they are read back (a row that stopped gets its
   * tokens up to its stop token, then none). */
  onTokens?: (tokens: Int32Array[]) => void;
  /** Tokens decoded between readbacks, a positive integer or Infinity (only at the end); default 16. */
  readEvery?: number;
  /**
   * Token ids that end a row (e.g. the tokenizer's end of text, as HF's eos_token_id): a row ends with its
   * first one (kept, as HF keeps it), and decoding stops at the first readback where every row has ended, so
   * rows may be shorter than nTokens. A number array or a typed array of integers (an Int32Array row of
   * generate's, a tokenizer's Uint32Array). Default none.
   */
  stopTokens?:
    | readonly number[]
    | Int32Array
    | Uint32Array
    | Uint16Array
    | Int16Array
    | Uint8Array
    | Uint8ClampedArray
    | Int8Array;
  /**
   * Prompt tokens per forward of the prompt, a positive integer or Infinity (the default: the whole prompt in
   * one forward). A long prompt then runs in chunks, each from the caches of those before
   * ({@linkcode MambaLM.prefill}): the same tokens, in the memory of one chunk's activations.
   */
  prefillChunk?: number;
  /**
   * The caches of the tokens before the prompt (from {@linkcode MambaLM.prefill} or `step`), one per layer,
   * for the prompt's B rows: each row goes on from its row of them, as if its earlier tokens came first. A
   * conversation thus continues without running it again; to go on after the reply, `prefill` the prompt and
   * the reply from these same caches. They stay alive (the caller's). `repetitionPenalty` counts the prompt's
   * and the new tokens, not the ones before. Default: from the start.
   */
  from?: LayerCache[];
}

const LM_OPTION_KEYS = ["vocabSize", "padVocabSizeMultiple", "tieEmbeddings", "paddingIdx", "weightDtype"];
// A value for a message: numbers as JavaScript writes them (NaN, Infinity), strings quoted, other things by
// their type ("a Set"), arrays and typed arrays with their elements.
const show = showValue;
/** Typed arrays of integers that stopTokens takes besides a number array. */
const ID_ARRAYS = [
  Int8Array,
  Uint8Array,
  Uint8ClampedArray,
  Int16Array,
  Uint16Array,
  Int32Array,
  Uint32Array,
];
const GENERATE_OPTION_KEYS = [
  "sample",
  "topK",
  "topP",
  "minP",
  "temperature",
  "seed",
  "repetitionPenalty",
  "onTokens",
  "readEvery",
  "stopTokens",
  "prefillChunk",
  "from",
];

/** Validates LMOptions; every error names the option. Undefined values count as absent. */
function lmOptions(
  o: LMOptions,
): {
  vocabSize: number;
  multiple: number;
  tied: boolean;
  paddingIdx: number | null;
  weightDtype: WeightDtype;
} {
  if (typeof o !== "object" || o === null) {
    throw new Error(`MambaLM: options must be an object with vocabSize, got ${show(o)}`);
  }
  for (const k of Object.keys(o)) {
    if (!LM_OPTION_KEYS.includes(k)) {
      throw new Error(`MambaLM: unknown option '${k}' (LMOptions has ${LM_OPTION_KEYS.join(", ")})`);
    }
  }
  const { vocabSize, padVocabSizeMultiple: multiple = 1, tieEmbeddings: tied = false } = o;
  if (!Number.isInteger(vocabSize) || vocabSize <= 0) {
    throw new Error(`MambaLM: vocabSize must be a positive integer, got ${show(vocabSize)}`);
  }
  if (!Number.isInteger(multiple) || multiple <= 0) {
    throw new Error(
      `MambaLM: padVocabSizeMultiple must be a positive integer, got ${show(multiple)}`,
    );
  }
  if (typeof tied !== "boolean") {
    throw new Error(`MambaLM: tieEmbeddings must be a boolean, got ${show(tied)}`);
  }
  const { paddingIdx = 0 } = o;
  if (paddingIdx !== null && (!Number.isInteger(paddingIdx) || paddingIdx < 0 || paddingIdx >= vocabSize)) {
    throw new Error(
      `MambaLM: paddingIdx must be an integer in [0, vocabSize = ${vocabSize}) or null, got ${
        show(paddingIdx)
      }`,
    );
  }
  const { weightDtype = "f32" } = o;
  if (weightDtype !== "f32" && weightDtype !== "bf16") {
    throw new Error(`MambaLM: weightDtype must be "f32" or "bf16", got ${show(weightDtype)}`);
  }
  return { vocabSize, multiple, tied, paddingIdx, weightDtype };
}

/**
 * Validates the backbone config. A complete MambaConfig (say `{ ...lm.config, dState: 8 }`) is validated
 * again; its derived `dInner` must agree with `expandFactor * dModel`, since a config derived from another
 * with a new dModel would otherwise keep the old sizes.
 */
/** Whether two state-dict entries are one: the same tensor or array, or host tensors of equal shapes and values
 * (GPU tensors are compared by identity: reading them back would make loading asynchronous). */
function sameValues(a: Tensor | HostTensor, b: Tensor | HostTensor): boolean {
  if (a === b) return true;
  if (a instanceof Tensor || b instanceof Tensor) return false;
  if (a.data === b.data) return true;
  return a.shape.length === b.shape.length && a.shape.every((d, i) => d === b.shape[i]) &&
    a.data.length === b.data.length && a.data.every((v, i) => Object.is(v, b.data[i]));
}

/** Rows of a prompt that share a length, by index, and their ids (rows, length) on the GPU. */
interface PromptGroup {
  rows: number[];
  ids: Tensor;
}

/** The given batch rows of each layer's cache, in that order (copies). */
function cacheRows(caches: LayerCache[], rows: number[]): LayerCache[] {
  const pick = (t: Tensor) => cat(rows.map((b) => narrow(t, 0, b, 1)), 0);
  return caches.map((c) => ({ h: pick(c.h), inputs: pick(c.inputs) })); // h: (rows, ED, N), inputs: (rows, ED, K-1)
}

/** Checked rows of `L` ids as an i32 (rows, L) tensor. */
function rowsTensor(rows: readonly ArrayLike<number>[], L: number): Tensor {
  const flat = new Int32Array(rows.length * L);
  rows.forEach((r, b) => flat.set(r, b * L));
  return tensor(flat, [rows.length, L], { dtype: "i32" });
}

/** The language model. */
export class MambaLM extends Module {
  /** Validated config of the backbone. */
  readonly config: MambaConfig;
  /** Padded vocabulary size. */
  readonly vocabSize: number;
  /** Whether the head shares the embedding. */
  readonly tied: boolean;
  /** (vocab, D) */
  readonly embedding: Embedding;
  /** The blocks. */
  readonly mamba: Mamba;
  /** Final norm. */
  readonly normF: RMSNorm;
  /** (vocab, D) head, or null when tied. */
  readonly lmHead: Linear | null;
  /** How the large weights are stored (see {@linkcode LMOptions}'s `weightDtype`). */
  readonly weightDtype: WeightDtype;

  /**
   * Builds the LM with mamba.py's initialisation (llama2.c-style normal(0, baseStd) for every Linear weight and
   * the embedding, out_proj scaled by 1/sqrt(2 nLayers), Linear biases zeroed: dt_proj's too, so the config's
   * dt keys, which set a bare `Mamba`'s dt initialisation, have no effect here, as in mamba.py's `LM`); with
   * `mup`, mamba.py's muP initialisation instead, which keeps dt_proj's bias (so dtMin, dtMax and dtInitFloor
   * apply) and draws dt_proj's weight with dtScale. The config (a resolved one too) and the options are
   * validated; errors name the key.
   */
  constructor(config: MambaConfigInput | MambaConfig, options: LMOptions) {
    super();
    this.config = mambaConfig(config); // a resolved config passed back in is validated again
    const o = lmOptions(options);
    this.vocabSize = Math.ceil(o.vocabSize / o.multiple) * o.multiple;
    this.tied = o.tied;
    this.embedding = this.child(
      "embedding",
      new Embedding(this.vocabSize, this.config.dModel, o.paddingIdx, o.weightDtype),
    );
    this.weightDtype = o.weightDtype;
    try {
      this.mamba = this.child("mamba", new Mamba(this.config, o.weightDtype));
      // muP: no gains, and the logits divided by the width multiplier (mamba.py's x / mup_width_mult before
      // lm_head), folded into the norm's constant so that every head path (forward, prefill, decoding) has it
      this.normF = this.child(
        "norm_f",
        new RMSNorm(this.config.dModel, this.config.rmsNormEps, {
          affine: !this.config.mup,
          scale: 1 / mupWidthMult(this.config),
        }),
      );
      this.lmHead = this.tied
        ? null
        : this.child("lm_head", new Linear(this.config.dModel, this.vocabSize, false, o.weightDtype));
      this.initWeights();
    } catch (e) {
      // what was made before running out of memory (under setMemoryLimit; fromPretrained of a model that
      // does not fit) would stay live with no model to dispose it
      this.dispose();
      throw e;
    }
  }

  /**
   * {@linkcode Module.loadStateDict}; a tied model also takes `lm_head.weight`, its embedding's other name (a
   * tied PyTorch model's state dict lists both, and state-spaces' files save the head as a view of the
   * embedding): it must be the same entry as `embedding.weight` or, on the host, hold the same values (alone,
   * it loads as the embedding). A head that differs is an error: it needs an untied model.
   */
  override loadStateDict(
    dict: StateDict | Record<string, Tensor | HostTensor>,
    options: LoadOptions = {},
  ): LoadResult {
    const entries: StateDict = dict instanceof Map ? dict : new Map(Object.entries(dict));
    const head = entries.get("lm_head.weight");
    if (!this.tied || head == null) return super.loadStateDict(entries, options);
    const rest = new Map(entries);
    rest.delete("lm_head.weight");
    const emb = entries.get("embedding.weight");
    if (emb == null) rest.set("embedding.weight", head);
    else if (!sameValues(head, emb)) {
      throw new Error(
        "loadStateDict: lm_head.weight is not embedding.weight, but this model's head is its embedding " +
          "(tieEmbeddings): load it into a model built with tieEmbeddings: false",
      );
    }
    return super.loadStateDict(rest, options);
  }

  /** Draws the LM's initial weights, mamba.py's way (`plainInit`, or `mupInit` with muP), and loads them. */
  private initWeights(): void {
    const draw = this.config.mup ? this.mupInit() : this.plainInit();
    // each draw loaded and freed before the next: all of them at once held the weights twice over (a bf16
    // model: its f32 weights on top, more than an f32 model's weights)
    for (const [name, p] of this.namedParameters()) {
      const t = draw(name, p.shape); // t: p's shape, f32
      if (!t) continue;
      try {
        writeEntry(t, p); // a bf16 weight takes it rounded
      } finally {
        t.dispose();
      }
    }
  }

  /** mamba.py's `_init_weights`: every Linear weight and the embedding ~ N(0, baseStd), Linear biases 0,
   * then out_proj weights ~ N(0, baseStd / sqrt(2 nLayers)). Conv, A_log, D and norms keep their init
   * (null: the parameter keeps it). */
  private plainInit(): (name: string, shape: readonly number[]) => Tensor | null {
    const { baseStd: std, nLayers } = this.config;
    return (name, shape) => {
      if (/(in_proj|x_proj|dt_proj|out_proj|lm_head)\.weight$/.test(name) || name === "embedding.weight") {
        return normal(shape, name.endsWith("out_proj.weight") ? std / Math.sqrt(2 * nLayers) : std);
      }
      return /(in_proj|out_proj|dt_proj)\.bias$/.test(name) ? zeros(shape) : null;
    };
  }

  /**
   * mamba.py's muP initialisation (`LM.__init__` with `mup`): in_proj, x_proj, dt_proj and out_proj weights ~
   * N(0, std / sqrt(w)) with w = dModel / mupBaseWidth and std = baseStd (out_proj: / sqrt(2 nLayers); dt_proj:
   * dtRank^-0.5 dtScale); conv1d weights and lm_head 0; the embedding ~ N(0, baseStd); in_proj and out_proj
   * biases 0; conv1d and dt_proj biases, A_log and D keep the block's init. A tied head is the embedding's.
   */
  private mupInit(): (name: string, shape: readonly number[]) => Tensor | null {
    const { baseStd, nLayers, dtRank, dtScale } = this.config;
    const w = mupWidthMult(this.config);
    return (name, shape) => {
      const hidden = /mixer\.(in_proj|x_proj|dt_proj|out_proj)\.weight$/.exec(name);
      if (hidden) {
        const std = hidden[1] === "out_proj"
          ? baseStd / Math.sqrt(2 * nLayers)
          : hidden[1] === "dt_proj"
          ? dtRank ** -0.5 * dtScale
          : baseStd;
        return normal(shape, std / Math.sqrt(w));
      }
      if (name === "embedding.weight") return normal(shape, baseStd);
      const zeroed = /mixer\.conv1d\.weight$/.test(name) || name === "lm_head.weight" ||
        /(in|out)_proj\.bias$/.test(name);
      return zeroed ? zeros(shape) : null;
    };
  }

  /**
   * Turns host token rows into an i32 tensor, checking every id against the vocabulary; a tensor is checked
   * for dtype and rank and returned as it is. Its ids are not range-checked here, which would need a
   * readback ({@linkcode MambaLM.generate} does check them): an id outside [0, vocabSize) gives an
   * unspecified embedding row.
   */
  tokensTensor(tokens: Tokens): Tensor {
    if (tokens instanceof Tensor) {
      if (tokens.dtype !== "i32" || tokens.rank !== 2) {
        throw new Error(`MambaLM: tokens must be an i32 (B, L) tensor, got ${tokens}`);
      }
      return tokens;
    }
    if (!Array.isArray(tokens)) {
      throw new Error(
        `MambaLM: tokens must be an i32 (B, L) tensor or an array of B rows of ids, got ${
          ArrayBuffer.isView(tokens)
            ? `a flat ${tokens.constructor.name} (wrap it as [ids] for one row)`
            : show(tokens)
        }`,
      );
    }
    const rows = tokens as readonly (readonly number[] | Int32Array)[];
    const L = rows[0]?.length ?? 0;
    rows.forEach((r, b) => {
      this.checkRow(r, b);
      if (r.length !== L) {
        throw new Error(
          `MambaLM: token rows must all have the same length: row 0 has ${L}, row ${b} has ${r.length}`,
        );
      }
    });
    return rowsTensor(rows, L);
  }

  /** Throws for a row that is not an array of ids of the vocabulary, naming the row (b) and the token. */
  private checkRow(r: unknown, b: number): void {
    if (!Array.isArray(r) && !(r instanceof Int32Array)) {
      throw new Error(
        `MambaLM: token row ${b} must be an array of ids or an Int32Array, got ${show(r)}` +
          (typeof r === "number" ? " (one row of ids is [ids])" : ""),
      );
    }
    for (let t = 0; t < r.length; t++) {
      const id = r[t];
      if (!Number.isInteger(id)) {
        throw new Error(`MambaLM: token [${b}][${t}] = ${show(id)} is not an integer`);
      }
      this.checkId(id, b, t);
    }
  }

  /**
   * A prompt's rows on the host and its ids on the GPU, grouped by row length: one group of all rows for a
   * tensor or rows of one length, else one per length (rows in order of first appearance). A tensor's ids
   * are read back once and range-checked.
   */
  private async promptGroups(
    prompt: Tokens,
  ): Promise<{ B: number; rows: readonly ArrayLike<number>[]; groups: PromptGroup[] }> {
    const ragged = Array.isArray(prompt) && prompt.some((r) => r?.length !== prompt[0]?.length);
    if (!ragged) {
      const ids = this.tokensTensor(prompt); // ids: (B, P) i32
      const [B, P] = ids.shape;
      if (P === 0 || B === 0) {
        if (ids !== prompt) ids.dispose();
        throw new Error(`generate: the prompt is empty (shape ${fmt(ids.shape)})`);
      }
      let rows = prompt as readonly ArrayLike<number>[];
      if (ids === prompt) {
        const host = await ids.toArray();
        for (let i = 0; i < host.length; i++) this.checkId(host[i], Math.floor(i / P), i % P);
        rows = Array.from({ length: B }, (_, b) => host.subarray(b * P, (b + 1) * P));
      }
      return { B, rows, groups: [{ rows: rows.map((_, b) => b), ids }] };
    }
    const rows = prompt as readonly (readonly number[] | Int32Array)[];
    const byLength = new Map<number, number[]>();
    rows.forEach((r, b) => {
      this.checkRow(r, b);
      if (r.length === 0) throw new Error(`generate: prompt row ${b} is empty`);
      byLength.get(r.length)?.push(b) ?? byLength.set(r.length, [b]);
    });
    const groups: PromptGroup[] = [];
    try {
      for (const [L, of] of byLength) groups.push({ rows: of, ids: rowsTensor(of.map((b) => rows[b]), L) });
    } catch (e) {
      // out of memory at a later group's ids (under setMemoryLimit): the earlier ones have no other owner
      dispose(groups.map((g) => g.ids));
      throw e;
    }
    return { B: rows.length, rows, groups };
  }

  /** Throws for an id outside the vocabulary, naming its position [b][t] and the vocabulary size. */
  private checkId(id: number, b: number, t: number): void {
    if (id < 0 || id >= this.vocabSize) {
      throw new Error(`MambaLM: token [${b}][${t}] = ${id} is outside the vocabulary [0, ${this.vocabSize})`);
    }
  }

  /** Final norm and LM head. */
  private head(x: Tensor): Tensor {
    const h = this.normF.forward(x); // h: (..., D)
    // logits: (..., vocab)
    return this.lmHead ? this.lmHead.forward(h) : matmul(h, this.embedding.weight, { transB: true });
  }

  /** tokens (B, L) -> logits (B, L, vocab). The ids of a tensor are not range-checked (see
   * {@linkcode MambaLM.tokensTensor}). Under noGrad the logits are all it leaves; with autograd the backward
   * reads its intermediates: run it in a tidy. */
  forward(tokens: Tokens): Tensor {
    const run = () => this.head(this.mamba.forward(this.embed(tokens))); // logits: (B, L, vocab)
    // without autograd nothing reads the intermediates later: only the logits leave (with it, the backward
    // reads them: the caller's tidy frees them)
    return isGradEnabled() ? run() : tidy(run);
  }

  /** The embedding of `tokens` (B, L, D); ids built from an array go with its graph, or at once without one. */
  private embed(tokens: Tokens): Tensor {
    const ids = this.tokensTensor(tokens); // ids: (B, L) i32
    const x = this.embedding.forward(ids);
    if (ids !== tokens) disposeWithGraph(ids, x);
    return x;
  }

  /**
   * tokens (B, L) -> logits (B, L, vocab) with autograd, going on from `from` (each layer's cache after the
   * tokens before: from `prefill`, `step` or an earlier `forwardFrom`; null: from the start), and each layer's
   * cache after the last token. The caches are constants: those given must not require grad and those returned
   * have no autograd, so a loss on these logits backpropagates through these L positions only, not into the
   * windows before (truncated backpropagation through time: training on a long text window after window with
   * the state carried between them, as `TrainConfig.carryState` does). With `MambaConfig.recompute` the blocks
   * rerun in the backward as usual, from the caches given: keep those alive until the backward. The caches
   * given stay alive; the caller disposes the returned ones (return them from a `tidy`, or `keep` them, to
   * carry them past it).
   */
  forwardFrom(tokens: Tokens, from: LayerCache[] | null): { logits: Tensor; caches: LayerCache[] } {
    const run = () => {
      const r = this.mamba.forwardWithCache(this.embed(tokens), true, from ?? undefined);
      return { logits: this.head(r.out), caches: r.caches }; // logits: (B, L, vocab)
    };
    return isGradEnabled() ? run() : tidy(run); // as forward
  }

  /**
   * One token per row: ids (B) i32 -> logits (B, vocab) and the new caches (ids are not range-checked).
   *
   * The caches passed in stay alive: the caller owns them and disposes them once the step has run
   * ({@linkcode MambaLM.generate} does). A loop that only keeps the new caches leaks one set per step
   * (`tidy` around a step does not free the caches it was given). Run each step in `tidy` and `noGrad`
   * so its intermediates go, and dispose the old caches:
   *
   * ```ts
   * import { dispose, init, MambaLM, noGrad, tensor, tidy } from "@mambats/mamba";
   *
   * await init();
   * const lm = new MambaLM({ dModel: 16, nLayers: 1 }, { vocabSize: 16 });
   * let caches = lm.emptyCache(1);
   * for (const id of [1, 2, 3]) {
   *   const ids = tensor(new Int32Array([id]), [1], { dtype: "i32" });
   *   const prev = caches;
   *   const r = tidy(() => noGrad(() => lm.step(ids, prev)));
   *   dispose([prev, ids]);
   *   caches = r.caches;
   *   // ... read or sample r.logits, then:
   *   r.logits.dispose();
   * }
   * dispose(caches);
   * lm.dispose();
   * ```
   */
  step(ids: Tensor, caches: LayerCache[]): { logits: Tensor; caches: LayerCache[] } {
    if (ids.dtype !== "i32" || ids.rank !== 1) {
      throw new Error(`MambaLM.step: ids must be an i32 (B) tensor, got ${ids}`);
    }
    const r = this.mamba.step(this.embedding.forward(ids), caches); // r.out: (B, D)
    // without autograd, norm_f inside the head's product (one kernel where a GPU takes matvec for it)
    const logits = isGradEnabled()
      ? this.head(r.out)
      : rmsNormMatmul(r.out, this.normF.weight, this.normF.eps, (this.lmHead ?? this.embedding).weight);
    return { logits, caches: r.caches }; // logits: (B, vocab)
  }

  /**
   * Runs `tokens` (B, L) on from `from`, each layer's cache after the tokens before them (from `step` or an
   * earlier `prefill`; omitted or null: from the start), and returns each layer's cache after the last token
   * and the logits of the last position (B, vocab), or with `{ logits: "all" }` of every position (B, L,
   * vocab). The logits and caches are those of one forward over all the tokens so far: a long prompt can be
   * processed in chunks (memory grows with the chunk, not with the prompt), a conversation can go on from
   * where it stopped, and text can be scored past any window (`perplexity`'s `carryState`). Inference-only:
   * it runs without gradients and frees its intermediates. The caches given stay alive; the caller disposes
   * them and the results (`dispose`).
   *
   * ```ts
   * import { dispose, init, MambaLM } from "@mambats/mamba";
   *
   * await init();
   * const lm = new MambaLM({ dModel: 16, nLayers: 1 }, { vocabSize: 16 });
   * const first = lm.prefill([[1, 2, 3]]); // from the start
   * const next = lm.prefill([[4, 5]], first.caches); // logits as after [[1, 2, 3, 4, 5]]
   * dispose([first, next]);
   * lm.dispose();
   * ```
   */
  prefill(
    tokens: Tokens,
    from: LayerCache[] | null = null,
    options: PrefillOptions = {},
  ): { logits: Tensor; caches: LayerCache[] } {
    checkOptionKeys(options, ["logits"], "MambaLM.prefill");
    const which = options.logits ?? "last";
    if (which !== "last" && which !== "all") {
      throw new Error(`MambaLM.prefill: logits must be "last" or "all", got ${JSON.stringify(which)}`);
    }
    return tidy(() =>
      noGrad(() => {
        const ids = this.tokensTensor(tokens); // ids: (B, L) i32
        const [B, L] = ids.shape;
        const r = this.mamba.forwardWithCache(this.embedding.forward(ids), true, from ?? undefined);
        // r.out: (B, L, D); the head (norm_f works row by row) on the last position alone where that is all
        const out = which === "all" ? r.out : narrow(r.out, 1, L - 1, 1); // out: (B, L or 1, D)
        const logits = this.head(out); // logits: (B, L or 1, vocab)
        return { logits: which === "all" ? logits : logits.reshape(B, this.vocabSize), caches: r.caches };
      })
    );
  }

  /** Zero caches for a batch size; the caller disposes them (see {@linkcode MambaLM.step}). */
  emptyCache(batch: number): LayerCache[] {
    return this.mamba.emptyCache(batch);
  }

  /**
   * The prompt's forward: the last position's logits (B, vocab) and each layer's cache. Each group of rows of
   * one length runs as one batch; with several, their logits and caches are put back in row order. A group
   * longer than `chunk` runs in forwards of `chunk` positions, each from the caches of those before, each in
   * its own tidy (its activations go before the next runs). With `start` (B rows), each row goes on from its
   * row of those caches (the caller's: left alive).
   */
  private prefillGroups(
    groups: PromptGroup[],
    B: number,
    chunk = Infinity,
    start: LayerCache[] | null = null,
  ): { logits: Tensor; caches: LayerCache[] } {
    const parts = groups.map(({ ids, rows }) => {
      const [Bg, P] = ids.shape;
      // this group's rows of the starting caches (a copy, where the group is not every row in order)
      const own = start && groups.length > 1 ? cacheRows(start, rows) : null;
      let caches: LayerCache[] | null = own ?? start;
      let last: Tensor | null = null; // the last position's output: (Bg, 1, D)
      for (let t0 = 0; t0 < P; t0 += chunk) {
        const n = Math.min(chunk, P - t0);
        const from = caches;
        const r = tidy(() => {
          const part = n === P ? ids : narrow(ids, 1, t0, n); // part: (Bg, n) i32
          const f = this.mamba.forwardWithCache(this.embedding.forward(part), true, from ?? undefined);
          // Only the last position's logits are needed: the head (norm_f works row by row) runs on it alone.
          return { last: t0 + n === P ? narrow(f.out, 1, n - 1, 1) : null, caches: f.caches };
        });
        if (from !== start) dispose(from);
        caches = r.caches;
        last = r.last;
      }
      // logits: (Bg, vocab)
      return { logits: this.head(last!).reshape(Bg, this.vocabSize), caches: caches! };
    });
    if (parts.length === 1) return parts[0];
    const at: [number, number][] = new Array(B); // row b: [its group, its row there]
    groups.forEach((g, k) => g.rows.forEach((b, j) => (at[b] = [k, j])));
    const inRowOrder = (of: (k: number) => Tensor) => cat(at.map(([k, j]) => narrow(of(k), 0, j, 1)), 0);
    return {
      logits: inRowOrder((k) => parts[k].logits), // logits: (B, vocab)
      caches: parts[0].caches.map((_, l) => ({
        h: inRowOrder((k) => parts[k].caches[l].h), // h: (B, ED, N)
        inputs: inRowOrder((k) => parts[k].caches[l].inputs), // inputs: (B, ED, dConv - 1)
      })),
    };
  }

  /**
   * Continues each prompt row by `nTokens` tokens. The prompt runs as one parallel forward that also fills
   * the caches (or, with `prefillChunk`, as forwards of that many tokens, each from the caches before); then
   * each token costs one `step`. Tokens are chosen on the GPU (greedy by default) and read
   * back every `readEvery` steps. Returns the new tokens (B rows of up to nTokens: with `stopTokens` a row ends
   * at its first stop token).
   *
   * Prompt rows given as arrays may differ in length (no padding, as an SSM would read pads into its state):
   * the rows of each length run their forward together, then all rows decode as one batch, each exactly as
   * it would alone (greedy; a sampled row's noise depends on its index in the batch).
   *
   * Everything is checked before the prompt runs: the options (see {@linkcode SampleOptions}: sampling
   * options without `sample` are an error) and every prompt id, a tensor's ids after one readback.
   */
  async generate(prompt: Tokens, nTokens: number, options: GenerateOptions = {}): Promise<Int32Array[]> {
    if (!Number.isSafeInteger(nTokens) || nTokens < 0) {
      throw new Error(`generate: nTokens must be a non-negative integer, got ${show(nTokens)}`);
    }
    checkOptionKeys(options, GENERATE_OPTION_KEYS, "generate");
    const params = sampleParams(options);
    const readEvery = options.readEvery ?? 16;
    if (!(Number.isInteger(readEvery) && readEvery >= 1) && readEvery !== Infinity) {
      throw new Error(`generate: readEvery must be a positive integer or Infinity, got ${show(readEvery)}`);
    }
    if (options.onTokens !== undefined && typeof options.onTokens !== "function") {
      throw new Error(`generate: onTokens must be a function, got ${show(options.onTokens)}`);
    }
    const stopList: unknown = options.stopTokens ?? [];
    const isList = Array.isArray(stopList) || ID_ARRAYS.some((T) => stopList instanceof T);
    const ids = isList ? Array.from(stopList as ArrayLike<unknown>) : [];
    if (
      !isList ||
      !ids.every((t) => Number.isInteger(t) && (t as number) >= 0 && (t as number) < this.vocabSize)
    ) {
      // [tok.specialTokens.eos] with a tokenizer that declares no eos (a char model's) is the usual way here.
      const hint = ids.some((t) => t === null || t === undefined)
        ? " (a null or undefined id: is it a tokenizer's specialTokens.eos, which is null for one that declares " +
          "no end-of-text token? Leave it out, or choose a stop id of your own)"
        : "";
      throw new Error(
        `generate: stopTokens must be a list of token ids in [0, ${this.vocabSize}) (an array, or a typed ` +
          `array of integers), got ${show(stopList)}${hint}`,
      );
    }
    const stops = new Set(ids as number[]);
    const prefillChunk = options.prefillChunk ?? Infinity;
    if (!(Number.isInteger(prefillChunk) && prefillChunk >= 1) && prefillChunk !== Infinity) {
      throw new Error(
        `generate: prefillChunk must be a positive integer or Infinity, got ${show(prefillChunk)}`,
      );
    }
    const { B, rows: rowsIn, groups } = await this.promptGroups(prompt);
    const release = () => groups.forEach((g) => g.ids !== prompt && g.ids.dispose());
    const start = options.from ?? null;
    try {
      if (start !== null) {
        if (!Array.isArray(start) || start.length !== this.config.nLayers) {
          throw new Error(
            `generate: from must be one cache per layer (${this.config.nLayers}), got ${
              Array.isArray(start) ? `${start.length}` : typeof start
            }`,
          );
        }
        start.forEach((c, i) =>
          checkLayerCache("generate: from", c, this.config, B, i, `a prompt of ${B} rows`)
        );
      }
    } catch (e) {
      release();
      throw e;
    }
    let all: Tensor | null = null, next: Tensor | null = null, seen: Tensor | null = null;
    try {
      all = keep(zeros([B, Math.max(nTokens, 1)], { dtype: "i32" })); // all: (B, max(nTokens, 1)) i32
      next = keep(zeros([B], { dtype: "i32" })); // next: (B) i32, the last chosen tokens
      // seen: (B, ceil(vocab / 32)) bits, the ids of each row so far: its prompt's, then the chosen ones
      // (without a penalty a word the sampler binds but never reads: made once here, not at every token)
      seen = keep(
        params.repetitionPenalty === 1
          ? Tensor.empty([1], "i32")
          : tensor(seenMask(rowsIn, this.vocabSize), [B, seenWords(this.vocabSize)], { dtype: "i32" }),
      );
    } catch (e) {
      dispose([all, next, seen]);
      release();
      throw new Error(`generate: ${B} rows of nTokens ${nTokens}: ${(e as Error).message}`, { cause: e });
    }
    // Drawn only once everything is checked, so a call that throws leaves the global generator alone.
    if (!params.greedy && params.seed === undefined) params.seed = drawSeed();
    let caches: LayerCache[] = [];
    const rows: Int32Array[] = Array.from({ length: B }, () => new Int32Array(nTokens));
    const ended = new Array<number>(B).fill(-1); // a row's length once its stop token came, else -1
    const allEnded = () => stops.size > 0 && ended.every((e) => e >= 0); // then decoding stops
    let done = 0;
    const readNew = async (upto: number) => {
      if (upto <= done) return;
      // only the new columns of each row, in one wait (the whole (B, nTokens) buffer each time made the bytes
      // read grow with the square of the output's length)
      const [T, n] = [all!.shape[1], upto - done];
      const spans = Array.from({ length: B }, (_, b) => [(b * T + done) * 4, n * 4] as const);
      const buf = new Int32Array(await readSpans(all!.storage.buffer, spans));
      const fresh: Int32Array[] = [];
      for (let b = 0; b < B; b++) {
        rows[b].set(buf.subarray(b * n, (b + 1) * n), done);
        let end = ended[b] >= 0 ? done : upto;
        for (let t = done; t < end; t++) {
          if (rows[b][t] < 0) {
            // the sampler's mark for a row of logits with no token to choose
            const penalty = params.repetitionPenalty;
            throw new Error(
              `generate: row ${b}, token ${t}: the logits had no token to choose (NaN${
                params.greedy ? "" : ", or an infinity when sampling"
              }: a diverged model?${
                params.greedy || penalty >= 1
                  ? ""
                  : ` Or repetitionPenalty ${penalty}, which divides a seen token's logit, took it past f32's range`
              })`,
            );
          }
          if (stops.has(rows[b][t])) [end, ended[b]] = [t + 1, t + 1];
        }
        fresh.push(rows[b].slice(done, end));
      }
      done = upto;
      options.onTokens?.(fresh);
    };
    try {
      for (let i = 0; i < nTokens; i++) {
        const prev = caches;
        caches = tidy(() =>
          noGrad(() => {
            let logits: Tensor;
            let c: LayerCache[];
            if (i === 0) {
              ({ logits, caches: c } = this.prefillGroups(groups, B, prefillChunk, start));
            } else {
              const r = this.step(next, prev);
              logits = r.logits; // logits: (B, vocab)
              c = r.caches;
            }
            sampleInto(logits, next, all, i, params, seen!);
            return c;
          })
        );
        dispose(prev);
        if ((i + 1) % readEvery === 0) {
          await readNew(i + 1);
          if (allEnded()) break;
        }
      }
      if (!allEnded()) await readNew(nTokens);
    } finally {
      dispose([caches, all, next, seen]);
      release();
    }
    return rows.map((r, b) => (ended[b] >= 0 ? r.slice(0, ended[b]) : r));
  }
}
