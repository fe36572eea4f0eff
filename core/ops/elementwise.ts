/**
 * Elementwise ops: unary math, binary arithmetic with broadcasting, comparisons, where, clamp.
 * Each op is one record: its WGSL expression (for the map template) and its gradient.
 * @module
 */

import { defineOp } from "../autograd.ts";
import { broadcastShapes, isInt32 } from "../shape.ts";
import { type DType, type Operand, Tensor } from "../tensor.ts";
import { mapOp } from "./map_kernel.ts";
import { sumToShape } from "./reduce.ts";

function needF32(x: Tensor, op: string): void {
  if (x.dtype !== "f32") throw new Error(`${op} needs an f32 tensor, got ${x.dtype} ${x}`);
}

// ---------------------------------------------------------------- unary

/** Gradient rule of a unary op: WGSL of dL/dx from `a` (= x, or y when `fromOutput`) and `b` (= g). */
interface UnaryDef {
  expr: string;
  grad: string;
  fromOutput?: boolean;
}

const UNARY = {
  neg: { expr: "-a", grad: "-b" },
  exp: { expr: "exp(a)", grad: "b * a", fromOutput: true },
  log: { expr: "log(a)", grad: "b / a" },
  sqrt: { expr: "sqrt(a)", grad: "b * 0.5 / a", fromOutput: true },
  rsqrt: { expr: "inverseSqrt(a)", grad: "-0.5 * b * a * a * a", fromOutput: true },
  square: { expr: "a * a", grad: "2.0 * a * b" },
  abs: { expr: "abs(a)", grad: "b * sign(a)" },
  sigmoid: { expr: "sigmoid_(a)", grad: "b * a * (1.0 - a)", fromOutput: true },
  silu: { expr: "a * sigmoid_(a)", grad: "b * sigmoid_(a) * (1.0 + a * (1.0 - sigmoid_(a)))" },
  softplus: { expr: "softplus_(a)", grad: "b * sigmoid_(a)" },
  tanh: { expr: "tanh_(a)", grad: "b * (1.0 - a * a)", fromOutput: true },
  // NaN stays NaN, and its gradient passes, as PyTorch's threshold_backward (x <= 0 is false for NaN)
  relu: { expr: "fmax_(a, 0.0)", grad: "select(select(0.0, b, a > 0.0), b, isnan_(a))" },
} satisfies Record<string, UnaryDef>;

/** Names of the unary ops. */
export type UnaryName =
  | "neg"
  | "exp"
  | "log"
  | "sqrt"
  | "rsqrt"
  | "square"
  | "abs"
  | "sigmoid"
  | "silu"
  | "softplus"
  | "tanh"
  | "relu";

const unaryOps = new Map<string, (inputs: Tensor[], attrs: null) => Tensor>();
for (const [name, def] of Object.entries(UNARY) as [UnaryName, UnaryDef][]) {
  unaryOps.set(
    name,
    defineOp<null>({
      name,
      forward: ([x], _, save) => {
        needF32(x, name);
        const y = mapOp(def.expr, [x], x.shape);
        save(def.fromOutput ? y : x);
        return y;
      },
      backward: (g, [s]) => [mapOp(def.grad, [s, g], g.shape)],
    }),
  );
}

/** Applies a unary op by name. */
export function unary(name: UnaryName, x: Tensor): Tensor {
  return unaryOps.get(name)!([x], null);
}

/** `-x` */
export const neg = (x: Tensor): Tensor => unary("neg", x);
/** `e^x` */
export const exp = (x: Tensor): Tensor => unary("exp", x);
/** Natural logarithm. */
export const log = (x: Tensor): Tensor => unary("log", x);
/** Square root. */
export const sqrt = (x: Tensor): Tensor => unary("sqrt", x);
/** `1 / sqrt(x)` */
export const rsqrt = (x: Tensor): Tensor => unary("rsqrt", x);
/** `x * x` */
export const square = (x: Tensor): Tensor => unary("square", x);
/** `|x|` */
export const abs = (x: Tensor): Tensor => unary("abs", x);
/** `1 / (1 + e^-x)` */
export const sigmoid = (x: Tensor): Tensor => unary("sigmoid", x);
/** `x * sigmoid(x)` */
export const silu = (x: Tensor): Tensor => unary("silu", x);
/** `log(1 + e^x)`, computed stably for all x. */
export const softplus = (x: Tensor): Tensor => unary("softplus", x);
/** Hyperbolic tangent. */
export const tanh = (x: Tensor): Tensor => unary("tanh", x);
/** `max(x, 0)` (NaN stays NaN, as in PyTorch). */
export const relu = (x: Tensor): Tensor => unary("relu", x);

// ---------------------------------------------------------------- binary

/** Forward WGSL (a, b) and the two gradient expressions of (a, b, c = g, [y]) of a binary op. */
interface BinaryDef {
  expr: string;
  /** The expression for f32 operands where it differs from `expr` (the i32 one). */
  f32Expr?: string;
  ga: string;
  gb: string;
  ints?: boolean;
}

const BINARY = {
  add: { expr: "a + b", ga: "", gb: "", ints: true },
  sub: { expr: "a - b", ga: "", gb: "", ints: true },
  mul: { expr: "a * b", ga: "c * b", gb: "c * a", ints: true },
  // dL/db as PyTorch: -g (a / b) / b, so that b * b neither overflows (|b| > 1.8e19) nor underflows (< 1e-19)
  div: { expr: "a / b", ga: "c / b", gb: "-c * ((a / b) / b)" },
  // As PyTorch: no gradient through a zero exponent, and none to the exponent where a = 0 and b >= 0
  // (0 * log(0) would be NaN).
  pow: {
    expr: "pow_(a, b)",
    ga: "select(c * b * pow_(a, b - 1.0), 0.0, b == 0.0)",
    gb: "select(c * pow_(a, b) * log(a), 0.0, a == 0.0 && b >= 0.0)",
  },
  // A NaN operand gives NaN, and both operands its gradient, as PyTorch's masks do (a < b is false for NaN).
  maximum: {
    expr: "max(a, b)",
    f32Expr: "fmax_(a, b)",
    ga: "c * select(select(select(0.0, 0.5, a == b), 1.0, a > b), 1.0, isnan_(a) || isnan_(b))",
    gb: "c * select(select(select(0.0, 0.5, a == b), 1.0, b > a), 1.0, isnan_(a) || isnan_(b))",
    ints: true,
  },
  minimum: {
    expr: "min(a, b)",
    f32Expr: "fmin_(a, b)",
    ga: "c * select(select(select(0.0, 0.5, a == b), 1.0, a < b), 1.0, isnan_(a) || isnan_(b))",
    gb: "c * select(select(select(0.0, 0.5, a == b), 1.0, b < a), 1.0, isnan_(a) || isnan_(b))",
    ints: true,
  },
} satisfies Record<string, BinaryDef>;

/** Names of the binary arithmetic ops. */
export type BinaryName = "add" | "sub" | "mul" | "div" | "pow" | "maximum" | "minimum";

function operandShape(o: Operand): readonly number[] {
  return typeof o === "number" ? [] : o.shape;
}

function resultType(a: Operand, b: Operand, op: string, ints: boolean): DType {
  const ta = typeof a === "number" ? null : a.dtype;
  const tb = typeof b === "number" ? null : b.dtype;
  if (ta && tb && ta !== tb) {
    // no op converts between dtypes: say how to, instead of sending the user looking for one
    throw new Error(
      `${op}: dtypes differ (${a} and ${b}); no op converts f32 and i32: make one again from its values, ` +
        "tensor(await t.toArray(), t.shape, { dtype })",
    );
  }
  const t = ta ?? tb ?? "f32";
  if (t === "i32" && !ints) throw new Error(`${op} needs f32 tensors, got i32`);
  if (t === "i32" && [a, b].some((o) => typeof o === "number" && !isInt32(o))) {
    throw new Error(
      `${op}: an i32 tensor with a scalar that is not an int32 integer (${typeof a === "number" ? a : b})`,
    );
  }
  return t;
}

/** Gradient of one operand (a tensor) of a binary op, reduced to the operand's shape. */
function operandGrad(expr: string, a: Operand, b: Operand, g: Tensor, target: Tensor): Tensor {
  const full = expr === "" ? g : expr === "-" ? mapOp("-a", [g], g.shape) : mapOp(expr, [a, b, g], g.shape);
  const r = sumToShape(full, target.shape);
  if (r !== full && full !== g) full.dispose();
  return r;
}

const binaryOps = new Map<string, (inputs: Tensor[], attrs: { a: Operand; b: Operand }) => Tensor>();
for (const [name, def] of Object.entries(BINARY) as [BinaryName, BinaryDef][]) {
  const gb = name === "sub" ? "-" : def.gb;
  binaryOps.set(
    name,
    defineOp<{ a: Operand; b: Operand }>({
      name,
      forward: (_inputs, { a, b }, save) => {
        const t = resultType(a, b, name, def.ints ?? false);
        const shape = broadcastShapes(operandShape(a), operandShape(b), name);
        if (def.ga !== "") { for (const o of [a, b]) if (typeof o !== "number") save(o); }
        return mapOp(t === "f32" ? def.f32Expr ?? def.expr : def.expr, [a, b], shape, t, [t, t]);
      },
      // One gradient per tensor input, in order: a number operand is not an input, so for
      // `sub(2, x)` the inputs are [x] and x's gradient must come first (not after a null for 2).
      backward: (g, _saved, _inputs, { a, b }) => [
        ...(typeof a === "number" ? [] : [a.requiresGrad ? operandGrad(def.ga, a, b, g, a) : null]),
        ...(typeof b === "number" ? [] : [b.requiresGrad ? operandGrad(gb, a, b, g, b) : null]),
      ],
    }),
  );
}

/** Throws unless both operands are tensors or numbers (a string or an array read as a tensor's fields). */
function checkOperands(name: string, ...operands: Operand[]): void {
  operands.forEach((o, i) => {
    if (typeof o !== "number" && !(o instanceof Tensor)) {
      const what = o === null ? "null" : Array.isArray(o) ? "an array (make it a tensor)" : typeof o;
      throw new Error(`${name}: operand ${i + 1} must be a Tensor or a number, got ${what}`);
    }
  });
}

/** Applies a binary op by name; either operand may be a number. */
export function binary(name: BinaryName, a: Operand, b: Operand): Tensor {
  checkOperands(name, a, b);
  const inputs = [a, b].filter((o): o is Tensor => typeof o !== "number");
  if (inputs.length === 0) throw new Error(`${name}: at least one operand must be a tensor`);
  return binaryOps.get(name)!(inputs, { a, b });
}

/** `a + b` with broadcasting. */
export const add = (a: Operand, b: Operand): Tensor => binary("add", a, b);
/** `a - b` with broadcasting. */
export const sub = (a: Operand, b: Operand): Tensor => binary("sub", a, b);
/** `a * b` with broadcasting. */
export const mul = (a: Operand, b: Operand): Tensor => binary("mul", a, b);
/** `a / b` with broadcasting. */
export const div = (a: Operand, b: Operand): Tensor => binary("div", a, b);
/** `a ** b` with broadcasting, with PyTorch's values where WGSL leaves pow undefined: integer powers of negative
 * numbers, 0 ** 0 = 1, 0 ** p = inf for p < 0 (and its gradients: none through b = 0, none to b at a = 0). */
export const pow = (a: Operand, b: Operand): Tensor => binary("pow", a, b);
/** Elementwise maximum (ties share the gradient equally; a NaN operand gives NaN, as in PyTorch). */
export const maximum = (a: Operand, b: Operand): Tensor => binary("maximum", a, b);
/** Elementwise minimum (ties share the gradient equally; a NaN operand gives NaN, as in PyTorch). */
export const minimum = (a: Operand, b: Operand): Tensor => binary("minimum", a, b);

// ---------------------------------------------------------------- comparisons, where, clamp

const COMPARE = { eq: "==", ne: "!=", lt: "<", le: "<=", gt: ">", ge: ">=" } as const;

/** Names of the comparison ops. */
export type CompareName = "eq" | "ne" | "lt" | "le" | "gt" | "ge";

/** Elementwise comparison; returns an f32 mask of 0 and 1 (not differentiable). */
export function compare(name: CompareName, a: Operand, b: Operand): Tensor {
  if (!Object.hasOwn(COMPARE, name)) { // else invalid WGSL, an error only at the next sync
    throw new Error(
      `compare: name must be one of ${Object.keys(COMPARE).join(", ")}, got ${JSON.stringify(name)}`,
    );
  }
  checkOperands(name, a, b);
  if (typeof a === "number" && typeof b === "number") {
    throw new Error(`${name}: one operand must be a tensor`);
  }
  const t = resultType(a, b, name, true);
  const shape = broadcastShapes(operandShape(a), operandShape(b), name);
  return mapOp(`select(0.0, 1.0, a ${COMPARE[name]} b)`, [a, b], shape, "f32", [t, t]);
}

const whereOp = defineOp<null>({
  name: "where",
  forward: ([cond, a, b], _, save) => {
    needF32(a, "where");
    needF32(b, "where");
    save(cond);
    const s1 = broadcastShapes(cond.shape, a.shape, "where");
    return mapOp("select(c, b, a != 0.0)", [cond, a, b], broadcastShapes(s1, b.shape, "where"));
  },
  backward: (g, [cond], [, a, b]) => [
    null,
    a.requiresGrad ? reduceTo(mapOp("select(0.0, b, a != 0.0)", [cond, g], g.shape), a) : null,
    b.requiresGrad ? reduceTo(mapOp("select(b, 0.0, a != 0.0)", [cond, g], g.shape), b) : null,
  ],
});

function reduceTo(full: Tensor, target: Tensor): Tensor {
  const r = sumToShape(full, target.shape);
  if (r !== full) full.dispose();
  return r;
}

/** `cond ? a : b` elementwise with broadcasting; `cond` is a mask (nonzero = true), f32. */
export function where(cond: Tensor, a: Tensor, b: Tensor): Tensor {
  if (cond.dtype !== "f32") throw new Error(`where: the condition must be an f32 mask, got ${cond.dtype}`);
  return whereOp([cond, a, b], null);
}

const clampOp = defineOp<{ lo: number; hi: number }>({
  name: "clamp",
  forward: ([x], { lo, hi }, save) => {
    needF32(x, "clamp");
    save(x);
    return mapOp("fclamp_(a, b, c)", [x, lo, hi], x.shape); // NaN stays NaN, as PyTorch
  },
  backward: (g, [x], _, { lo, hi }) =>
    [mapOp("select(0.0, c, a >= b)", [x, lo, g], g.shape, "f32")].map((t) => {
      const r = mapOp("select(0.0, a, b <= c)", [t, x, hi], g.shape);
      t.dispose();
      return r;
    }),
});

/**
 * Clamps into `[min, max]`. An omitted bound is the f32 maximum, -3.4e38 or 3.4e38 (not infinity):
 * `clamp(x)` maps -Infinity and Infinity to those finite values. Gradient 1 inside, 0 outside. NaN stays NaN,
 * as in PyTorch.
 */
export function clamp(x: Tensor, min?: number, max?: number): Tensor {
  // a NaN bound would be dropped by the kernel's clamp, not applied
  if (Number.isNaN(min) || Number.isNaN(max)) {
    throw new Error(`clamp: a bound is NaN (min ${min}, max ${max})`);
  }
  const lo = min ?? -3.4028234663852886e38;
  const hi = max ?? 3.4028234663852886e38;
  if (lo > hi) throw new Error(`clamp: min ${min} is greater than max ${max}`);
  return clampOp([x], { lo, hi });
}
