/**
 * The elementwise kernel template: one output element per invocation, y[i] = f(a, b, c).
 *
 * Every unary, binary and ternary op (and the fused gradient helpers) is this template with a WGSL
 * expression. Operands are read in one of four ways, chosen per call:
 * - `same`: all operands have the output's shape, read at `i`;
 * - `tail`/`head`: an operand that spans only the trailing (e.g. a bias) or leading (e.g. a per-row scale)
 *   dims of the output is read at `i % m` or `i / m`;
 * - `bcast`: NumPy broadcasting in general, each operand read through its own strides (0 on broadcast dims);
 * - a scalar operand comes from the uniform `P.s0`/`P.s1` and never touches memory.
 * Workgroup: 256 invocations, no workgroup memory. Reads the operands, writes y.
 * @module
 */

import { defineKernel, dispatch, type Kernel } from "../kernel.ts";
import { broadcastStrides, MAX_RANK, padRank, sameShape, type Shape } from "../shape.ts";
import { type DType, Tensor } from "../tensor.ts";
import { BF16_ONLY } from "../bf16.ts";
import { SIGMOID_WGSL, SOFTPLUS_WGSL } from "./wgsl_math.ts";

/** One operand of a map: a tensor, or a number passed as a uniform. */
export type MapOperand = Tensor | number;

const WG = 256;
const names = ["a", "b", "c"];
const kernels = new Map<string, Kernel>();

/** WGSL's isnan_: NaN by its bits (WGSL lets a compiler assume x == x for floats). */
export const IS_NAN_WGSL =
  "fn isnan_(x: f32) -> bool { return (bitcast<u32>(x) & 0x7fffffffu) > 0x7f800000u; }";

/** WGSL helpers available to every map expression. */
const MAP_HELPERS = `${IS_NAN_WGSL}
fn log1p_(u: f32) -> f32 {
  // log(1 + u) without losing u when it is tiny (Goldberg's trick).
  let w = 1.0 + u;
  if (w == 1.0) { return u; }
  return log(w) * u / (w - 1.0);
}
// max / min / clamp that keep a NaN as PyTorch's do (WGSL leaves them unspecified there; llvmpipe returns
// the other operand).
fn fmax_(a: f32, b: f32) -> f32 { return select(select(max(a, b), b, isnan_(b)), a, isnan_(a)); }
fn fmin_(a: f32, b: f32) -> f32 { return select(select(min(a, b), b, isnan_(b)), a, isnan_(a)); }
fn fclamp_(x: f32, lo: f32, hi: f32) -> f32 { return select(clamp(x, lo, hi), x, isnan_(x)); }
${SIGMOID_WGSL}
fn tanh_(x: f32) -> f32 {
  // WGSL's tanh may lose small x (its accuracy is absolute, from exp: llvmpipe gave tanh(1e-8) = 3e-8 and
  // tanh(1e-5) 0.14% off). Below 0.1 the series x - x^3/3 + 2x^5/15 - 17x^7/315 is exact to f32 (the next
  // term is 2e-10 of x).
  if (abs(x) >= 0.1) { return tanh(x); }
  let q = x * x;
  return x + x * q * (-1.0 / 3.0 + q * (2.0 / 15.0 - q * (17.0 / 315.0)));
}
${SOFTPLUS_WGSL}
fn pow_(x: f32, p: f32) -> f32 {
  // WGSL pow is undefined for x < 0 and for x = 0 with p <= 0; PyTorch's values there: x ** 0 = 1,
  // 0 ** p = 0 (p > 0) or inf (p < 0), integer powers of negative numbers, NaN for fractional ones.
  if (p == 0.0) { return 1.0; }
  if (x > 0.0) { return pow(x, p); }
  // NaN and inf from a variable: Chrome's WGSL compiler rejects constant expressions that evaluate to them.
  var nan = 0x7fc00000u;
  var inf = 0x7f800000u;
  if (x == 0.0) { return select(0.0, bitcast<f32>(inf), p < 0.0); }
  if (fract(p) != 0.0) { return bitcast<f32>(nan); }
  let m = pow(-x, p);
  return select(m, -m, fract(p * 0.5) != 0.0);
}
`;

/** How an operand is read: at i; through strides; as a uniform; at i % m (trailing dims); at i / m (leading). */
type Kind = "same" | "bcast" | "scalar" | "tail" | "head";

/**
 * The vec4 form of a same-shape f32 map: each invocation loads and stores four elements at once (16-byte
 * accesses) and evaluates the scalar expression per component, so every expression works unchanged.
 */
function vec4Kernel(expr: string, kinds: Kind[]): Kernel {
  const key = `vec4|${expr}|${kinds.join()}`;
  let k = kernels.get(key);
  if (k) return k;
  const lines = [`if (gid >= P.n) { return; }`];
  kinds.forEach((kind, j) => kind !== "scalar" && lines.push(`let ${names[j]}4 = ld_${names[j]}(gid);`));
  lines.push(`var r: vec4<f32>;`);
  for (const c of "xyzw") {
    const lets = kinds.map((kind, j) =>
      `let ${names[j]} = ${kind === "scalar" ? `P.s${j}` : `${names[j]}4.${c}`};`
    );
    lines.push(`{ ${lets.join(" ")} r.${c} = ${expr}; }`);
  }
  lines.push(`st_y(gid, r);`);
  const uniforms: [string, "u32" | "f32"][] = [["n", "u32"]];
  kinds.forEach((_, j) => uniforms.push([`s${j}`, "f32"]));
  k = defineKernel({
    name: `map4_${kernels.size}_${kinds.join("")}`,
    buffers: [
      ...kinds.flatMap((kind, j) =>
        kind === "scalar" ? [] : [{ name: names[j], type: "vec4<f32>" as const, access: "read" as const }]
      ),
      { name: "y", type: "vec4<f32>", access: "read_write" },
    ],
    uniforms,
    workgroupSize: WG,
    decls: MAP_HELPERS,
    body: lines.join("\n"),
  });
  kernels.set(key, k);
  return k;
}

/** The element types of map kernels' buffers (bf16 is refused before). */
type Word = "f32" | "i32";

function kernelFor(
  expr: string,
  kinds: Kind[],
  types: Word[],
  outType: Word,
): Kernel {
  const key = `${expr}|${kinds.join()}|${types.join()}|${outType}`;
  let k = kernels.get(key);
  if (k) return k;
  const bcast = kinds.includes("bcast");
  const lines: string[] = [`if (gid >= P.n) { return; }`];
  if (bcast) {
    lines.push(`var rem = gid;`);
    kinds.forEach((kind, j) => kind === "bcast" && lines.push(`var i${names[j]} = 0u;`));
    for (let d = MAX_RANK - 1; d >= 0; d--) {
      const comp = `${d < 4 ? "sh0" : "sh1"}.${"xyzw"[d % 4]}`;
      lines.push(`{ let c = rem % P.${comp}; rem = rem / P.${comp};`);
      kinds.forEach((kind, j) => {
        if (kind === "bcast") {
          lines.push(`  i${names[j]} += c * P.st${names[j]}${d < 4 ? 0 : 1}.${"xyzw"[d % 4]};`);
        }
      });
      lines.push(`}`);
    }
  }
  kinds.forEach((kind, j) => {
    const n = names[j];
    const read = kind === "scalar"
      ? `P.s${j}` // an i32 scalar travels as an i32 uniform: through f32 it lost integers past 2^24
      : `ld_${n}(${
        kind === "bcast"
          ? `i${n}`
          : kind === "tail"
          ? `gid % P.m${j}`
          : kind === "head"
          ? `gid / P.m${j}`
          : "gid"
      })`;
    lines.push(`let ${n} = ${read};`);
  });
  lines.push(`st_y(gid, ${expr});`);
  const uniforms: [string, "u32" | "i32" | "f32" | "vec4<u32>"][] = [["n", "u32"]];
  kinds.forEach((_, j) => uniforms.push([`s${j}`, types[j] === "i32" ? "i32" : "f32"], [`m${j}`, "u32"]));
  if (bcast) {
    uniforms.push(["sh0", "vec4<u32>"], ["sh1", "vec4<u32>"]);
    kinds.forEach((kind, j) => {
      if (kind === "bcast") uniforms.push([`st${names[j]}0`, "vec4<u32>"], [`st${names[j]}1`, "vec4<u32>"]);
    });
  }
  k = defineKernel({
    name: `map_${kernels.size}_${kinds.join("")}`,
    buffers: [
      ...kinds.flatMap((kind, j) =>
        kind === "scalar" ? [] : [{ name: names[j], type: types[j], access: "read" as const }]
      ),
      { name: "y", type: outType, access: "read_write" },
    ],
    uniforms,
    workgroupSize: WG,
    decls: MAP_HELPERS,
    body: lines.join("\n"),
  });
  kernels.set(key, k);
  return k;
}

/** Picks the cheapest way to read an operand of `shape` broadcast to `out`. */
function readKind(shape: Shape, out: Shape): Kind {
  if (sameShape(shape, out)) return "same";
  const core = [...shape];
  while (core.length && core[0] === 1) core.shift(); // leading 1s change nothing
  if (core.length === 0) return "tail"; // one element: i % 1
  if (core.join() === out.slice(out.length - core.length).join()) return "tail";
  const padded = [...new Array<number>(out.length - shape.length).fill(1), ...shape];
  let k = 0;
  while (k < out.length && padded[k] === out[k]) k++;
  if (k > 0 && padded.slice(k).every((d) => d === 1)) return "head";
  return "bcast";
}

/**
 * Computes `expr` elementwise over operands `a`, `b`, `c` (tensors broadcast to `outShape`, or numbers).
 * No autograd: ops wrap this in their op records.
 */
export function mapOp(
  expr: string,
  operands: MapOperand[],
  outShape: Shape,
  outType: DType = "f32",
  scalarTypes?: DType[],
): Tensor {
  const types = operands.map((o, j) => typeof o === "number" ? (scalarTypes?.[j] ?? "f32") : o.dtype);
  if (outType === "bf16" || types.includes("bf16")) throw new Error(`elementwise ${expr}: ${BF16_ONLY}`);
  const out = Tensor.empty(outShape, outType);
  const n = out.size;
  if (n === 0) return out;
  const kinds = operands.map((o): Kind => typeof o === "number" ? "scalar" : readKind(o.shape, outShape));
  if (
    n % 4 === 0 && outType === "f32" && types.every((t) => t === "f32") && !/\bgid\b/.test(expr) &&
    kinds.every((k) => k === "same" || k === "scalar")
  ) {
    const buffers: Record<string, Tensor["storage"]> = { y: out.storage };
    const uniforms: Record<string, number> = { n: n / 4 };
    operands.forEach((o, j) => {
      if (typeof o === "number") uniforms[`s${j}`] = o;
      else buffers[names[j]] = o.storage;
    });
    dispatch(vec4Kernel(expr, kinds), buffers, uniforms, Math.ceil(n / 4 / WG));
    return out;
  }
  const k = kernelFor(expr, kinds, types as Word[], outType as Word);
  const buffers: Record<string, Tensor["storage"]> = { y: out.storage };
  const uniforms: Record<string, number | number[]> = { n };
  operands.forEach((o, j) => {
    if (typeof o === "number") uniforms[`s${j}`] = o;
    else buffers[names[j]] = o.storage;
    if (kinds[j] === "tail") uniforms[`m${j}`] = (o as Tensor).size;
    if (kinds[j] === "head") uniforms[`m${j}`] = n / (o as Tensor).size;
  });
  if (kinds.includes("bcast")) {
    const sh = padRank(outShape, 1);
    uniforms.sh0 = sh.slice(0, 4);
    uniforms.sh1 = sh.slice(4);
    operands.forEach((o, j) => {
      if (kinds[j] !== "bcast") return;
      const st = padRank(broadcastStrides((o as Tensor).shape, outShape), 0);
      uniforms[`st${names[j]}0`] = st.slice(0, 4);
      uniforms[`st${names[j]}1`] = st.slice(4);
    });
  }
  dispatch(k, buffers, uniforms, Math.ceil(n / WG));
  return out;
}
