/**
 * mamba.ts: Mamba (the selective state-space model) in TypeScript on WebGPU, with its own small tensor
 * runtime (tensors, autograd, fused kernels).
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
