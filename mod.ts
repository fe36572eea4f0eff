/**
 * mamba.ts: Mamba (the selective state-space model) in TypeScript on WebGPU, with its own small tensor
 * runtime (tensors, autograd, fused kernels).
 *
 * Where to start, by task:
 * - Load a model: {@linkcode fromPretrained} (a hub id, a local folder or a URL) gives a
 *   {@linkcode PretrainedLM} with its tokenizer; {@linkcode fromPretrainedFiles} takes files a page's user
 *   picked; {@linkcode loadTokenizer} a tokenizer alone.
 * - Generate: {@linkcode MambaLM.generate} (greedy by default; `sample`, `temperature`, `topK`, `topP`, `minP`,
 *   `repetitionPenalty`, `stopTokens`, `onTokens` for streaming with a {@linkcode StreamDecoder});
 *   {@linkcode MambaLM.prefill} continues from a cache.
 * - Train or fine-tune: {@linkcode Trainer} over a {@linkcode CharDataset} or {@linkcode TokenDataset} with a
 *   {@linkcode TrainConfig} such as {@linkcode DEFAULT_TRAIN}; {@linkcode saveCheckpoint} writes a model in
 *   the Hugging Face layout. Resumable training checkpoints (optimizer state included, Deno only) come from
 *   the `@mambats/mamba/checkpoint` entry.
 * - Score text: {@linkcode perplexity}.
 * - Build models: {@linkcode Mamba} and {@linkcode MambaLM} (a {@linkcode MambaConfigInput}), the layers
 *   ({@linkcode Linear}, {@linkcode RMSNorm}, ...), {@linkcode AdamW}; the scan alone: {@linkcode selectiveScan}.
 * - Memory: {@linkcode memory} (live, peak and saved-for-backward bytes), {@linkcode tidy},
 *   {@linkcode dispose}, {@linkcode setMemoryLimit}.
 * - Going under the model (custom kernels and ops, the kernel tuner's choices): the
 *   `@mambats/mamba/advanced` entry.
 *
 * ```ts
 * import { CharDataset, DEFAULT_TRAIN, init, MambaLM, Trainer } from "@mambats/mamba";
 *
 * await init();
 * const text = new TextEncoder().encode("It is a truth universally acknowledged... ".repeat(200));
 * const lm = new MambaLM({ dModel: 64, nLayers: 2 }, { vocabSize: 256 }); // bytes as tokens
 * const recipe = { ...DEFAULT_TRAIN, steps: 50, warmup: 5, seq: 64, batch: 8 };
 * const trainer = new Trainer(lm, new CharDataset(text), recipe);
 * while (trainer.step < 50) await trainer.trainStep();
 * console.log(await trainer.evaluate()); // validation loss (nats per byte)
 * const [ids] = await lm.generate([[...new TextEncoder().encode("It is")]], 20);
 * console.log(new TextDecoder().decode(new Uint8Array(ids)));
 * ```
 *
 * The runtime underneath, on its own:
 *
 * ```ts
 * import { init, tensor, tidy } from "@mambats/mamba";
 *
 * await init();
 * const w = tensor([[1, 2], [3, 4]], undefined, { requiresGrad: true });
 * const x = tensor([[1], [1]]);
 * const loss = tidy(() => {
 *   const l = w.matmul(x).square().sum(); // sum((w @ x)^2)
 *   l.backward();
 *   return l;
 * });
 * console.log(await loss.item(), await w.grad!.toArray()); // 58, [6, 6, 14, 14]
 * ```
 * @module
 */

export {
  type DeviceInfo,
  deviceInfo,
  type DeviceLimits,
  deviceLost,
  GPUError,
  init,
  type InitOptions,
  type SubgroupSupport,
} from "./core/device.ts";
export { dispose, type DType, keep, type Operand, Tensor, tidy } from "./core/tensor.ts";
export { emptyPool, memory, type MemoryInfo, resetPeak, setMemoryLimit } from "./core/memory.ts";
export { type Shape } from "./core/shape.ts";
export { dispatchCount, flush, sync } from "./core/executor.ts";
export {
  arange,
  type CreateOptions,
  full,
  type NestedArray,
  ones,
  onesLike,
  rand,
  randn,
  type RandomOptions,
  tensor,
  zeros,
  zerosLike,
} from "./core/creation.ts";
export { manualSeed, Philox } from "./core/random.ts";
export { tuneKernels, type TuneOptions, type TuneResult, tuneResult } from "./core/tune.ts";
export { type KernelTime, profile } from "./core/executor.ts";
export {
  backward,
  type BackwardOptions,
  checkpoint,
  enableGrad,
  isGradEnabled,
  noGrad,
} from "./core/autograd.ts";
export {
  abs,
  add,
  castToBF16,
  castToF32,
  cat,
  causalConv1d,
  chunk,
  clamp,
  compare,
  type CompareName,
  type ConvActivation,
  copy,
  crossEntropy,
  type CrossEntropyOptions,
  detach,
  div,
  embedding,
  exp,
  expand,
  gather,
  indexSelect,
  log,
  logSoftmax,
  logsumexp,
  matmul,
  matmulAdd,
  type MatmulOptions,
  max,
  maximum,
  mean,
  minimum,
  mul,
  narrow,
  neg,
  pad,
  permute,
  pow,
  relu,
  reshape,
  rmsNorm,
  rmsNormMatmul,
  rsqrt,
  sigmoid,
  silu,
  slice,
  softmax,
  softplus,
  split,
  sqrt,
  square,
  sub,
  sum,
  tanh,
  transpose,
  where,
} from "./core/ops/index.ts";
export {
  type DecodedTensor,
  decodeTensor,
  type ParsedSafetensors,
  parseSafetensors,
  parseSafetensorsHeader,
  type SafetensorsDtype,
  type SafetensorsEntry,
  SafetensorsError,
  type SafetensorsHeader,
  safetensorsHeaderLength,
  type SafetensorsInput,
  serializeSafetensors,
} from "./core/safetensors.ts";
export { parseTorchCheckpoint } from "./core/torch_checkpoint.ts";
export { type HostTensor, type LoadOptions, type LoadResult, Module, type StateDict } from "./nn/module.ts";
export { Conv1d, Embedding, Linear, RMSNorm, type WeightDtype } from "./nn/layers.ts";
export {
  AdamW,
  type AdamWOptions,
  clipGradNorm,
  configureOptimizers,
  type ConfigureOptions,
  cosineSchedule,
  type CosineScheduleOptions,
  type GradNormScale,
  gradNormScale,
  Optimizer,
  type OptimizerState,
  type OptimizerStateInput,
  type ParamGroup,
  SGD,
  type SGDOptions,
  type StepOptions,
} from "./nn/optim.ts";
export { linearScan, type ScanMode } from "./scan/linear_scan.ts";
export { selectiveScan } from "./scan/selective_scan.ts";
export { fusedSelectiveScan } from "./scan/fused.ts";
export { type MambaConfig, mambaConfig, type MambaConfigInput, mupWidthMult } from "./mamba/config.ts";
export { type LayerCache, Mamba, MambaBlock, ModuleList, ResidualBlock } from "./mamba/block.ts";
export {
  type GenerateOptions,
  type LMOptions,
  MambaLM,
  type PrefillOptions,
  type Tokens,
} from "./mamba/lm.ts";
export { type SampleOptions } from "./mamba/sampling.ts";
export { perplexity, type PerplexityOptions, type PerplexityResult } from "./mamba/perplexity.ts";
export {
  checkpointFiles,
  fromPretrained,
  fromPretrainedFiles,
  NoTokenizerError,
  PretrainedLM,
  type PretrainedOptions,
  saveCheckpoint,
  tokenizerFilesFor,
} from "./mamba/pretrained.ts";
export { type CheckpointConfig, hfConfig, parseCheckpointConfig } from "./mamba/checkpoint_config.ts";
export { loadTokenizer, type ModelFiles } from "./mamba/model_sources.ts";
export {
  hubCacheDir,
  hubDownload,
  hubEndpoint,
  HubError,
  type HubErrorCode,
  type HubOptions,
  hubToken,
  isHubId,
  repoCacheDir,
} from "./mamba/hub.ts";
export {
  ByteTokenizer,
  cleanUpTokenization,
  type DecodeOptions,
  type EncodeOptions,
  HubTokenizer,
  type SpecialTokens,
  StreamDecoder,
  type StreamDecoderOptions,
  type Tokenizer,
  type TokenizerFiles,
  tokenizerFromJSON,
} from "./mamba/tokenizer.ts";
export {
  CharDataset,
  dataFingerprint,
  DEFAULT_TRAIN,
  type OrderedWindows,
  TokenDataset,
  type TrainConfig,
  type TrainData,
  Trainer,
  type TrainLog,
  validateTrainConfig,
  windowsInOrder,
} from "./mamba/train.ts";
