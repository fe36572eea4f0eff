/**
 * mamba.ts's extension points and knobs, for programs that go under the model: custom kernels and ops with
 * hand-written backwards, the kernel tuner's registry and its per-adapter choices, the fused selective
 * scan's raw entry points and variants, raw writes without autograd, and the checkpoint-mapping helpers.
 * The main entry (`@mambats/mamba`) holds what training, fine-tuning and generation need; what is here
 * follows the runtime's internals more closely and may change between minor versions.
 *
 * ```ts
 * import { init, tensor, zeros } from "@mambats/mamba";
 * import { defineKernel, dispatch } from "@mambats/mamba/advanced";
 *
 * await init();
 * // One invocation per element; `ld_x`/`st_y` are the accessors the kernel layer generates.
 * const double = defineKernel({
 *   name: "double",
 *   buffers: [{ name: "x", type: "f32", access: "read" }, { name: "y", type: "f32", access: "read_write" }],
 *   uniforms: [["n", "u32"]],
 *   workgroupSize: 64,
 *   body: "  if (gid < P.n) { st_y(gid, 2.0 * ld_x(gid)); }",
 * });
 * const x = tensor([1, 2, 3]);
 * const y = zeros([3]);
 * dispatch(double, { x: x.storage, y: y.storage }, { n: 3 }, 1); // 1 workgroup
 * console.log(await y.toArray()); // Float32Array(3) [ 2, 4, 6 ]
 * ```
 * @module
 */

// Storage, autograd's extension points and the kernel layer.
export { Storage } from "./core/memory.ts";
export {
  checkpointInputsOnly,
  defineOp,
  type GradNode,
  type GradTargets,
  type OpDef,
  savesForBackward,
  savesForLater,
  WindowGrad,
} from "./core/autograd.ts";
export {
  type BufferDecl,
  defineKernel,
  dispatch,
  dispatchElementwise,
  type ElemType,
  type Kernel,
  type KernelSpec,
  type UniformType,
  type UniformValues,
} from "./core/kernel.ts";
export {
  type ProductTimer,
  registerTuner,
  TIE_SPREAD,
  tuneCacheKey,
  type TuneProduct,
  UNSURE_TRIES,
} from "./core/tune.ts";

// Generic elementwise entry points, raw writes (no autograd) and gradient helpers.
export { binary, type BinaryName, unary, type UnaryName } from "./core/ops/elementwise.ts";
export { type Box, copyBox, packInto } from "./core/ops/shape_ops.ts";
export { castInto } from "./core/ops/cast.ts";
export { sumToShape } from "./core/ops/reduce.ts";

// Matmul's kernel choice (the tuner sets these at init()).
export {
  availableMatmulVariants,
  MATMUL_KERNEL_VERSION,
  MATMUL_VARIANTS,
  matmulGpuSplit,
  matmulMatvec,
  type MatmulPlan,
  matmulPlan,
  matmulRaw,
  matmulTuneCandidates,
  type MatmulVariant,
  matmulVariant,
  setMatmulGpuSplit,
  setMatmulMatvec,
  setMatmulVariant,
} from "./core/ops/matmul.ts";

// The scans' raw entry points, the fused scan's variants and its tuner.
export { runScan } from "./scan/linear_scan.ts";
export { fusedMambaScan, fusedMambaScanForward, fusedMambaScanFrom } from "./scan/fused.ts";
export { type FusedAttrs, fusedScanForward, lastState, setFusedStateSaving } from "./scan/fused_run.ts";
export { fusedMambaScanOut, type ScanFrom } from "./scan/fused_out.ts";
export {
  defaultFusedVariant,
  type FusedVariant,
  fusedVariant,
  fusedVariantFor,
  fusedVariantsByProblem,
  NEAR_PROBLEM,
  type ProblemVariant,
  setFusedVariant,
  setFusedVariantsByProblem,
} from "./scan/fused_variant.ts";
export { MAX_INLINE_DT_RANK } from "./scan/fused_wgsl.ts";
export {
  CONFIRM_FINALISTS,
  CONFIRM_SAMPLES,
  FUSED_KERNEL_VERSION,
  type FusedTuneResult,
  TUNE_BUDGET_MS,
  tuneFusedScan,
  tuneProblems,
} from "./scan/tune_fused.ts";

// Checkpoint mapping and the hub's by-hand help.
export { hfTensors } from "./mamba/pretrained.ts";
export { mapKey } from "./mamba/checkpoint_config.ts";
export { placeByHandHelp } from "./mamba/hub.ts";
