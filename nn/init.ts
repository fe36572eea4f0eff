/**
 * Parameter initialisers matching PyTorch's defaults, drawn from the seeded global generator.
 * @module
 */

import { full, rand, randn } from "../core/creation.ts";
import type { Shape } from "../core/shape.ts";
import type { Tensor } from "../core/tensor.ts";

/** Uniform in [-bound, bound). */
function uniform(shape: Shape, bound: number): Tensor {
  return rand(shape, { low: -bound, high: bound });
}

/** Normal with the given mean and std. */
export function normal(shape: Shape, std: number, mean = 0): Tensor {
  return randn(shape, { mean, std });
}

/** A constant. */
export function constant(shape: Shape, value: number): Tensor {
  return full(shape, value);
}

/**
 * PyTorch's default for Linear and Conv weights, kaiming_uniform(a = sqrt(5)): U(-1/sqrt(fanIn), 1/sqrt(fanIn)).
 * Their biases use the same bound, 0 for a fan-in of 0 as in PyTorch (1/sqrt(0) drew NaN from an infinite range).
 */
export function kaimingUniform(shape: Shape, fanIn: number): Tensor {
  return uniform(shape, fanIn > 0 ? 1 / Math.sqrt(fanIn) : 0);
}
