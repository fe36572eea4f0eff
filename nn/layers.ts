/**
 * Layers: Linear, Embedding, RMSNorm and the depthwise causal Conv1d of Mamba.
 * Weights use PyTorch's layouts and default initialisation.
 * @module
 */

import {
  add,
  castToBF16,
  causalConv1d,
  type ConvActivation,
  embedding,
  matmul,
  matmulAdd,
  rmsNorm,
} from "../core/ops/index.ts";
import { recordClear } from "../core/executor.ts";
import { fmt } from "../core/shape.ts";
import type { Tensor } from "../core/tensor.ts";
import { constant, kaimingUniform, normal } from "./init.ts";
import { Module } from "./module.ts";

/** Throws unless `v` is a size a layer's argument can take: an integer >= `min` (named here, not by the
 * creation function that would refuse the weight's shape). */
function checkSize(layer: string, name: string, v: number, min = 0): void {
  if (!Number.isInteger(v) || v < min) {
    const got = typeof v === "number" ? String(v) : `${JSON.stringify(v)} (${typeof v})`;
    throw new Error(`${layer}: ${name} must be an integer >= ${min}, got ${got}`);
  }
}

function lastDim(x: Tensor, want: number, layer: string): void {
  if (x.rank < 1 || x.shape[x.rank - 1] !== want) {
    throw new Error(`${layer}: expected input (..., ${want}), got ${fmt(x.shape)}`);
  }
}

/** How a layer stores its weight: f32 (trainable), or bf16 for inference (half the memory; read as f32 by
 * matmul and the embedding, no gradient; see core/bf16.ts). */
export type WeightDtype = "f32" | "bf16";

/** `init` as a weight of `dtype`: bf16 casts it (and frees the f32 draw). */
function asWeight(init: Tensor, dtype: WeightDtype, layer: string): Tensor {
  if (dtype === "f32") return init;
  if (dtype !== "bf16") {
    init.dispose();
    throw new Error(`${layer}: dtype must be "f32" or "bf16", got ${JSON.stringify(dtype)}`);
  }
  try {
    return castToBF16(init);
  } finally {
    init.dispose();
  }
}

/** `y = x @ W^T + b`, with W of shape (outFeatures, inFeatures) as in PyTorch. */
export class Linear extends Module {
  /** (outFeatures, inFeatures) */
  readonly weight: Tensor;
  /** (outFeatures) or null */
  readonly bias: Tensor | null;

  /** Creates the layer with PyTorch's default (kaiming-uniform) initialisation; `bias` defaults to true. A
   * bf16 `dtype` stores the weight in bfloat16, for inference (the bias stays f32). */
  constructor(
    readonly inFeatures: number,
    readonly outFeatures: number,
    bias = true,
    dtype: WeightDtype = "f32",
  ) {
    super();
    checkSize("Linear", "inFeatures", inFeatures);
    checkSize("Linear", "outFeatures", outFeatures);
    this.weight = this.param(
      "weight",
      asWeight(kaimingUniform([outFeatures, inFeatures], inFeatures), dtype, "Linear"),
    );
    try {
      this.bias = bias ? this.param("bias", kaimingUniform([outFeatures], inFeatures)) : null;
    } catch (e) {
      this.dispose(); // the weight, where the bias ran out of memory (under setMemoryLimit)
      throw e;
    }
  }

  /**
   * x: (..., in) -> (..., out). With `residual` (x's shape with `out` last, no broadcasting) the result is
   * residual + x W^T (+ bias): the product adds itself into a copy of the residual (`matmulAdd`), one
   * elementwise dispatch fewer than adding it after.
   */
  forward(x: Tensor, residual?: Tensor): Tensor {
    lastDim(x, this.inFeatures, "Linear");
    if (residual && !residualFits(x, residual, this.outFeatures)) {
      const out = [...x.shape.slice(0, -1), this.outFeatures];
      throw new Error(`Linear: residual ${fmt(residual.shape)} must have the output's shape ${fmt(out)}`);
    }
    const y = residual && x.rank >= 2
      ? matmulAdd(x, this.weight, residual, { transB: true }) // y: (..., out)
      : matmul(x, this.weight, { transB: true }); // y: (..., out)
    const r = residual && x.rank < 2 ? add(y, residual) : y; // r: (..., out)
    return this.bias ? add(r, this.bias) : r; // (..., out)
  }
}

/** Whether `residual` has the shape of x's product, (..., out) (checked without allocating: a step's hot path). */
function residualFits(x: Tensor, residual: Tensor, out: number): boolean {
  if (residual.rank !== x.rank || residual.shape[x.rank - 1] !== out) return false;
  for (let i = 0; i < x.rank - 1; i++) if (residual.shape[i] !== x.shape[i]) return false;
  return true;
}

/** Rows of a (numEmbeddings, embeddingDim) table selected by integer ids, as PyTorch's `nn.Embedding`. */
export class Embedding extends Module {
  /** (numEmbeddings, embeddingDim) */
  readonly weight: Tensor;
  #paddingIdx: number | null = null;

  /**
   * Creates the table with N(0, 1) entries (PyTorch's default).
   *
   * `paddingIdx` (PyTorch's `padding_idx`): if given, the entries at `paddingIdx` do not contribute to the
   * gradient; therefore, the embedding vector at `paddingIdx` is not updated during training, i.e. it remains
   * as a fixed "pad". For a newly constructed Embedding, the embedding vector at `paddingIdx` defaults to all
   * zeros, but can be updated to another value (say by `loadStateDict`) to be used as the padding vector. A
   * negative value counts from the end.
   */
  constructor(
    readonly numEmbeddings: number,
    readonly embeddingDim: number,
    paddingIdx: number | null = null,
    dtype: WeightDtype = "f32",
  ) {
    super();
    checkSize("Embedding", "numEmbeddings", numEmbeddings);
    checkSize("Embedding", "embeddingDim", embeddingDim);
    this.paddingIdx = paddingIdx;
    const init = normal([numEmbeddings, embeddingDim], 1);
    // The padding row starts at zero, as in PyTorch.
    if (this.paddingIdx !== null && embeddingDim > 0) {
      recordClear(init.storage.buffer, 4 * this.paddingIdx * embeddingDim, 4 * embeddingDim);
    }
    this.weight = this.param("weight", asWeight(init, dtype, "Embedding"));
  }

  /** The padding row in [0, numEmbeddings), or null (PyTorch's `padding_idx`). Setting it (a negative value
   * counts from the end) changes only which row the gradient skips from then on, not the weights. */
  get paddingIdx(): number | null {
    return this.#paddingIdx;
  }
  set paddingIdx(p: number | null) {
    const n = this.numEmbeddings;
    if (p !== null && (!Number.isInteger(p) || p < -n || p >= n)) {
      throw new Error(`Embedding: paddingIdx must be an integer in [-${n}, ${n}) or null, got ${p}`);
    }
    this.#paddingIdx = p === null ? null : p < 0 ? p + n : p;
  }

  /** ids: (...) i32 -> (..., embeddingDim) */
  forward(ids: Tensor): Tensor {
    if (ids.dtype !== "i32") throw new Error(`Embedding: token ids must be i32, got ${ids.dtype} ${ids}`);
    return embedding(this.weight, ids, this.paddingIdx); // (..., embeddingDim)
  }
}

/** `x * rsqrt(mean(x^2, -1) + eps) * weight` */
export class RMSNorm extends Module {
  /** (dim): the learned gains, or with `affine: false` a constant that is no parameter. */
  readonly weight: Tensor;

  /**
   * Creates the norm with weights `scale` (default 1: unit gains); `eps` defaults to 1e-5. With `affine: false`
   * (muP: gains prevent muTransfer, as mamba.py drops them) there is no parameter and the output is multiplied
   * by the constant `scale`.
   */
  constructor(readonly dim: number, readonly eps = 1e-5, options: { affine?: boolean; scale?: number } = {}) {
    super();
    checkSize("RMSNorm", "dim", dim);
    if (options.affine !== undefined && typeof options.affine !== "boolean") {
      throw new Error(`RMSNorm: affine must be a boolean, got ${JSON.stringify(options.affine)}`);
    }
    const scale = options.scale ?? 1;
    if (!Number.isFinite(scale)) throw new Error(`RMSNorm: scale must be a finite number, got ${scale}`);
    const w = constant([dim], scale);
    this.weight = options.affine ?? true ? this.param("weight", w) : this.keepConstant(w);
  }

  /** x: (..., dim) -> (..., dim) */
  forward(x: Tensor): Tensor {
    lastDim(x, this.dim, "RMSNorm");
    return rmsNorm(x, this.weight, this.eps); // (..., dim)
  }
}

/**
 * Depthwise causal 1-D convolution over time, as Mamba uses it: weight (channels, 1, kernel), left padding
 * kernel-1, so `y[t] = bias + sum_k w[k] * x[t - (kernel-1) + k]` with x = 0 before the start.
 */
export class Conv1d extends Module {
  /** (channels, 1, kernelSize) */
  readonly weight: Tensor;
  /** (channels) or null */
  readonly bias: Tensor | null;

  /** Creates the layer with PyTorch's default initialisation (fan-in = kernelSize); `bias` defaults to true. */
  constructor(readonly channels: number, readonly kernelSize: number, bias = true) {
    super();
    checkSize("Conv1d", "channels", channels);
    checkSize("Conv1d", "kernelSize", kernelSize, 1); // as causalConv1d: a kernel of 0 taps computes nothing
    this.weight = this.param("weight", kaimingUniform([channels, 1, kernelSize], kernelSize));
    try {
      this.bias = bias ? this.param("bias", kaimingUniform([channels], kernelSize)) : null;
    } catch (e) {
      this.dispose(); // the weight, where the bias ran out of memory
      throw e;
    }
  }

  /**
   * x: (B, L, channels), time along dim 1 -> (B, L, channels); `activation` ("none" by default) fuses silu into
   * the kernel.
   * With `start`, x is wider and the layer reads its channels start .. start + channels in place. With
   * `prefix` (B, channels, kernelSize - 1), the inputs before x's first step instead of zeros (a cache's).
   */
  forward(x: Tensor, activation: ConvActivation = "none", start?: number, prefix?: Tensor | null): Tensor {
    if (start === undefined) lastDim(x, this.channels, "Conv1d");
    return causalConv1d(x, this.weight, this.bias, activation, start, prefix); // (B, L, channels)
  }
}
