/**
 * All ops as free functions (the Tensor methods delegate here).
 * @module
 */

export * from "./elementwise.ts";
export * from "./reduce.ts";
export * from "./shape_ops.ts";
export * from "./matmul.ts";
export * from "./index_ops.ts";
export * from "./softmax.ts";
export * from "./conv.ts";
export * from "./rms_norm.ts";
export * from "./cast.ts";
export { backward, checkpoint, noGrad } from "../autograd.ts";
