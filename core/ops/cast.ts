/**
 * Casts between f32 tensors and bf16 storage (core/bf16.ts). Kernel `to_bf16`: one invocation per output word,
 * which reads two f32 values and writes their bf16 bits rounded to nearest even, as `bf16Bits` on the host.
 * Kernel `from_bf16`: one invocation per value, read through the unpacking accessor.
 * @module
 */

import { defineKernel, dispatch, type Kernel } from "../kernel.ts";
import { Tensor } from "../tensor.ts";

/** `to_bf16`: invocation w packs x's elements 2w and 2w + 1 into word w of y (rounded as {@linkcode bf16Bits}). */
const castKernel: Kernel = defineKernel({
  name: "to_bf16",
  buffers: [{ name: "x", type: "f32", access: "read" }, { name: "y", type: "u32", access: "read_write" }],
  uniforms: [["n", "u32"]],
  workgroupSize: 64,
  decls: `
fn bits(x: f32) -> u32 {
  let b = bitcast<u32>(x);
  if ((b & 0x7fffffffu) > 0x7f800000u) { return (b >> 16u) | 0x40u; }
  return (b + 0x7fffu + ((b >> 16u) & 1u)) >> 16u;
}`,
  body: `
  let i = 2u * gid;
  if (i >= P.n) { return; }
  var hi = 0u;
  if (i + 1u < P.n) { hi = bits(ld_x(i + 1u)) << 16u; }
  st_y(gid, bits(ld_x(i)) | hi);`,
});

/** x (f32) as a new bf16 tensor of its shape (no gradient). */
export function castToBF16(x: Tensor): Tensor {
  if (x.dtype !== "f32") throw new Error(`castToBF16: needs an f32 tensor, got ${x}`);
  return castInto(x, Tensor.empty(x.shape, "bf16"));
}

/** `from_bf16`: y[gid] = x[gid], x a bf16 buffer read through its unpacking accessor. */
const uncastKernel: Kernel = defineKernel({
  name: "from_bf16",
  buffers: [{ name: "x", type: "f32", access: "read" }, { name: "y", type: "f32", access: "read_write" }],
  uniforms: [["n", "u32"]],
  workgroupSize: 64,
  body: `
  if (gid >= P.n) { return; }
  st_y(gid, ld_x(gid));`,
});

/** x (bf16) as a new f32 tensor of its shape, exactly (no gradient). */
export function castToF32(x: Tensor): Tensor {
  if (x.dtype !== "bf16") throw new Error(`castToF32: needs a bf16 tensor, got ${x}`);
  return castInto(x, Tensor.empty(x.shape));
}

/** Writes x's values into y, one f32 and the other bf16, of x's size (no gradient: a raw write, as `copyBox`);
 * returns y. */
export function castInto(x: Tensor, y: Tensor): Tensor {
  if (
    x.size !== y.size || x.dtype === y.dtype || ![x.dtype, y.dtype].every((d) => d === "f32" || d === "bf16")
  ) {
    throw new Error(`castInto: needs an f32 and a bf16 tensor of one size, got ${x} into ${y}`);
  }
  if (x.size === 0) return y;
  const toBF16 = y.dtype === "bf16";
  const invocations = toBF16 ? Math.ceil(x.size / 2) : x.size; // a word of two, or a value
  dispatch(
    toBF16 ? castKernel : uncastKernel,
    { x: x.storage, y: y.storage },
    { n: x.size },
    Math.ceil(invocations / 64),
  );
  return y;
}
