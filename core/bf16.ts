/**
 * bfloat16 storage: a bf16 tensor holds two values per 32-bit word (element 2k in the low half of word k),
 * each the upper 16 bits of an f32, rounded to nearest even as torch's `.bfloat16()` rounds. It exists to halve
 * the memory of weights that inference only reads: kernels read a bf16 buffer bound to a read-only f32 (or
 * vec4<f32>) declaration through accessors that unpack it (core/kernel.ts), so matmul and embedding take bf16
 * weights with their f32 kernels, and compute in f32. Here: the host conversions (the GPU cast is
 * `castToBF16`, core/ops/cast.ts).
 * @module
 */

/** What every op but matmul's second operand and the embedding's table says to a bf16 tensor. */
export const BF16_ONLY =
  "bf16 tensors are weights for matmul's second operand and the embedding's table only";

const f32 = new Float32Array(1);
const u32 = new Uint32Array(f32.buffer);

/** The bf16 bits of x: f32 rounded to nearest even (a NaN stays a NaN). */
export function bf16Bits(x: number): number {
  f32[0] = x;
  const b = u32[0];
  if ((b & 0x7fffffff) > 0x7f800000) return (b >>> 16) | 0x40; // quiet NaN, sign kept
  return (b + 0x7fff + ((b >>> 16) & 1)) >>> 16;
}

/** Values packed as bf16 pairs, two per word (the last word's upper half 0 for an odd count). */
export function packBF16(data: ArrayLike<number>): Uint32Array {
  const words = new Uint32Array(Math.ceil(data.length / 2));
  for (let i = 0; i < data.length; i++) words[i >> 1] |= bf16Bits(data[i]) << (16 * (i & 1));
  return words;
}

/** The first `n` values of bf16 pairs as f32. */
export function unpackBF16(words: Uint32Array, n: number): Float32Array {
  const out = new Float32Array(n);
  const bits = new Uint32Array(out.buffer);
  for (let i = 0; i < n; i++) bits[i] = i & 1 ? words[i >> 1] & 0xffff0000 : words[i >> 1] << 16;
  return out;
}
