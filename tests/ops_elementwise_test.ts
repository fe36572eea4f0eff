import assert from "node:assert/strict";
import * as M from "./library.ts";
import { type Tensor, tensor, tidy } from "../mod.ts";
import {
  assertClose,
  checkOps,
  map1,
  map2,
  mapN,
  type Nd,
  nd,
  type OpCase,
  rand,
  randInts,
  readAll,
  setup,
  UNARY_REF,
  type UniformOptions,
} from "./helpers.ts";

await setup();

type UnaryName =
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

/** Input domain per unary op: positive where the function needs it, away from kinks at 0. */
const UNARY_DOMAIN: Record<UnaryName, UniformOptions> = {
  neg: { low: -3, high: 3 },
  exp: { low: -4, high: 4 },
  log: { low: 0.05, high: 5 },
  sqrt: { low: 0.05, high: 5 },
  rsqrt: { low: 0.05, high: 5 },
  square: { low: -3, high: 3 },
  abs: { low: -3, high: 3, avoid: [0] },
  sigmoid: { low: -8, high: 8 },
  silu: { low: -8, high: 8 },
  softplus: { low: -8, high: 8 },
  tanh: { low: -4, high: 4 },
  relu: { low: -3, high: 3, avoid: [0] },
};

Deno.test("unary ops: forward and gradient match float64 references on a 7x13 tensor", async () => {
  const cases: OpCase[] = [];
  (Object.keys(UNARY_DOMAIN) as UnaryName[]).forEach((name, k) => {
    const f = UNARY_REF[name];
    cases.push({
      what: `${name} (free function)`,
      inputs: [rand([7, 13], 100 + k, UNARY_DOMAIN[name])],
      gpu: ([x]) => M[name](x),
      ref: ([x]) => map1(x, f),
    });
    cases.push({
      what: `${name} (method) on a 0-d tensor`,
      inputs: [rand([], 200 + k, UNARY_DOMAIN[name])],
      gpu: ([x]) => x[name](),
      ref: ([x]) => map1(x, f),
    });
  });
  await checkOps(cases);
});

Deno.test("unary ops stay finite and exact at large |x| (softplus, sigmoid, silu, tanh)", async () => {
  const big = nd([-1000, -100, -50, -30, -20, -10, 10, 20, 30, 50, 88, 100, 1000], [13]);
  const cases: OpCase[] = (["softplus", "sigmoid", "silu", "tanh", "relu", "abs"] as const).map((name) => ({
    what: `${name} at large |x|`,
    inputs: [big],
    gpu: ([x]) => M[name](x),
    ref: ([x]) => map1(x, UNARY_REF[name]),
    // Finite differences are exact here too: the functions are smooth (or linear) around each point.
  }));
  await checkOps(cases);
  // softplus must not overflow: exp(1000) is inf in f32, the stable form gives 1000.
  const y = await tidy(() => M.softplus(tensor([1000, 100, -1000]))).toArray();
  assert.deepEqual([...y], [1000, 100, 0]);
});

Deno.test("unary ops keep tiny |x| to f32's relative precision (WGSL's tanh may lose it: tanh(1e-8) gave 3e-8)", async () => {
  // |x| from 1e-30 to 0.3, both signs; the ops defined there for negative x take both
  const mags = Array.from({ length: 59 }, (_, i) => Math.fround(10 ** (-30 + i / 2)));
  const both = nd([...mags, ...mags.map((v) => -v)], [2, 59]);
  const positive = nd(mags, [59]);
  const names = ["exp", "sigmoid", "silu", "softplus", "tanh", "log", "sqrt", "rsqrt"] as const;
  const inputs = names.map((name) => ["log", "sqrt", "rsqrt"].includes(name) ? positive : both);
  const ys = tidy(() =>
    names.map((name, k) => M[name](tensor(Float32Array.from(inputs[k].data), inputs[k].shape)))
  );
  const got = await readAll(ys);
  for (const t of ys) t.dispose();
  // rtol: a few ulp, within what WGSL allows its exp and log (log: 2^-21 absolute near 1, in softplus)
  names.forEach((name, k) => {
    assertClose(got[k], map1(inputs[k], UNARY_REF[name]), { rtol: 2e-6, atol: 0 }, `${name} at tiny |x|`);
  });
});

/** Operand forms of a binary op check: tensors of shapes (sa, sb), or a number on one side. */
interface BinaryForm {
  label: string;
  a: number[] | number;
  b: number[] | number;
}

const BINARY_FORMS: BinaryForm[] = [
  { label: "same shape 7x13", a: [7, 13], b: [7, 13] },
  { label: "[3,1,5] with [4,1]", a: [3, 1, 5], b: [4, 1] },
  { label: "[1,13] with [7,1]", a: [1, 13], b: [7, 1] },
  { label: "[2,3] with a 0-d tensor", a: [2, 3], b: [] },
  { label: "0-d tensor with [2,3]", a: [], b: [2, 3] },
  { label: "[5] with [2,3,5]", a: [5], b: [2, 3, 5] },
  { label: "tensor with scalar 1.75", a: [7, 13], b: 1.75 },
  { label: "scalar 1.75 with tensor", a: 1.75, b: [7, 13] },
];

type BinaryName = "add" | "sub" | "mul" | "div" | "pow" | "maximum" | "minimum";

const BINARY_REF: Record<BinaryName, (a: number, b: number) => number> = {
  add: (a, b) => a + b,
  sub: (a, b) => a - b,
  mul: (a, b) => a * b,
  div: (a, b) => a / b,
  pow: (a, b) => Math.pow(a, b),
  maximum: Math.max,
  minimum: Math.min,
};

/** Operand domains: div needs |b| away from 0, pow a positive base; max/min draw a and b independently. */
const BINARY_DOMAIN: Record<BinaryName, [UniformOptions, UniformOptions]> = {
  add: [{ low: -2, high: 2 }, { low: -2, high: 2 }],
  sub: [{ low: -2, high: 2 }, { low: -2, high: 2 }],
  mul: [{ low: -2, high: 2 }, { low: -2, high: 2 }],
  div: [{ low: -2, high: 2 }, { low: -2, high: 2, avoid: [0], margin: 0.3 }],
  pow: [{ low: 0.3, high: 2.5 }, { low: -2, high: 2 }],
  maximum: [{ low: -2, high: 2 }, { low: -2, high: 2 }],
  minimum: [{ low: -2, high: 2 }, { low: -2, high: 2 }],
};

Deno.test("binary ops: tensors, scalars on either side, NumPy broadcasting; forward and gradients", async () => {
  const cases: OpCase[] = [];
  let seed = 1000;
  for (const name of Object.keys(BINARY_REF) as BinaryName[]) {
    const f = BINARY_REF[name];
    const [da, db] = BINARY_DOMAIN[name];
    for (const form of BINARY_FORMS) {
      const inputs: Nd[] = [];
      // A scalar operand must lie in the op's domain too (pow's base 1.75 > 0; div's divisor 1.75).
      if (typeof form.a !== "number") inputs.push(rand(form.a, seed++, da));
      if (typeof form.b !== "number") inputs.push(rand(form.b, seed++, db));
      const pick = (xs: Tensor[]) =>
        typeof form.a === "number"
          ? [form.a, xs[0]] as const
          : typeof form.b === "number"
          ? [xs[0], form.b] as const
          : [xs[0], xs[1]] as const;
      const pickRef = (xs: Nd[]) =>
        typeof form.a === "number"
          ? [form.a, xs[0]] as const
          : typeof form.b === "number"
          ? [xs[0], form.b] as const
          : [xs[0], xs[1]] as const;
      cases.push({
        what: `${name} ${form.label}`,
        inputs,
        gpu: (xs) => {
          const [a, b] = pick(xs);
          return M[name](a, b);
        },
        ref: (xs) => {
          const [a, b] = pickRef(xs);
          return map2(a, b, f);
        },
      });
    }
    // The method form, with broadcasting.
    cases.push({
      what: `${name} as a method, [4,1] with [3,1,5]`,
      inputs: [rand([4, 1], seed++, da), rand([3, 1, 5], seed++, db)],
      gpu: ([a, b]) => a[name](b),
      ref: ([a, b]) => map2(a, b, f),
    });
  }
  await checkOps(cases);
});

Deno.test("pow: integer powers of negative bases, fractional powers give NaN, scalar base 2 ** x", async () => {
  const x = rand([3, 5], 7, { low: -2, high: 2, avoid: [0], margin: 0.1 });
  await checkOps([
    {
      what: "pow(x, 3) with negative x",
      inputs: [x],
      gpu: ([a]) => M.pow(a, 3),
      ref: ([a]) => map1(a, (v) => v ** 3),
    },
    {
      what: "pow(x, 2) with negative x",
      inputs: [x],
      gpu: ([a]) => M.pow(a, 2),
      ref: ([a]) => map1(a, (v) => v ** 2),
    },
    {
      what: "pow(x, -1) with negative x",
      inputs: [x],
      gpu: ([a]) => M.pow(a, -1),
      ref: ([a]) => map1(a, (v) => 1 / v),
    },
    { what: "pow(2, x)", inputs: [x], gpu: ([a]) => M.pow(2, a), ref: ([a]) => map1(a, (v) => 2 ** v) },
    {
      // PyTorch's values: 0 ** 0 = 1, 0 ** -1 = inf; no gradient through b = 0, nor to b where a = 0, b >= 0.
      what: "pow at base 0 and exponent 0, as PyTorch",
      inputs: [nd([0, 0, 0, 0, 2, -2, 3], [7]), nd([0, 1, 2, -1, 0, 3, 0.5], [7])],
      gpu: ([a, b]) => M.pow(a, b),
      ref: () => nd([1, 0, 0, Infinity, 1, -8, Math.sqrt(3)], [7]),
      refGrad: ([a, b], G) => [
        map2(mapN([a, b], (u, v) => (v === 0 ? 0 : v * u ** (v - 1))), G, (p, g) => p * g),
        map2(
          mapN([a, b], (u, v) => (u === 0 && v >= 0 ? 0 : u < 0 ? NaN : u ** v * Math.log(u))),
          G,
          (p, g) => p * g,
        ),
      ],
    },
    {
      what: "pow(x, 0.5) is NaN for negative x",
      inputs: [x],
      gpu: ([a]) => M.pow(a, 0.5),
      ref: ([a]) => map1(a, (v) => (v < 0 ? NaN : Math.sqrt(v))),
      grad: false,
    },
  ]);
});

Deno.test("div: the divisor's gradient at very large and very small divisors is PyTorch's -g (a / b) / b", async () => {
  // -g a / (b * b) lost these: b * b overflows past |b| 1.8e19 (gradient -0) and is subnormal or 0 below 1e-19
  // (gradient off by 5e-6, or -inf where a GPU flushes subnormals, or always at 1e-25).
  const a = [1e20, 2e30, 1e-20, 1e-30, 6];
  const b = [1e20, 4e25, 1e-20, 1e-25, 3];
  const x = tensor(a, undefined, { requiresGrad: true });
  const y = tensor(b, undefined, { requiresGrad: true });
  tidy(() => M.div(x, y).sum().backward());
  const f = Math.fround;
  const want = a.map((u, i) => -f(f(f(u) / f(b[i])) / f(b[i]))); // [-1e-20, -1.25e-21, -1e20, -1e20, -0.666..]
  assertClose(await y.grad!.toArray(), want, { rtol: 1e-6, atol: 0 }, "div's dL/db");
  x.dispose();
  y.dispose();
});

Deno.test("maximum/minimum: ties split the gradient equally; scalar operands", async () => {
  const a = nd([1, 2, 3, -1, 0.5, 4], [6]);
  const b = nd([1, 5, 3, -2, 0.5, 0], [6]);
  const tie = (x: Nd, y: Nd, pick: (u: number, v: number) => boolean) => // d max(a,b)/da = 1 where a wins, 0.5 on a tie, 0 where b wins (and the mirror image for b).
  [
    mapN([x, y], (u, v) => (u === v ? 0.5 : pick(u, v) ? 1 : 0)),
    mapN([x, y], (u, v) => (u === v ? 0.5 : pick(v, u) ? 1 : 0)),
  ];
  await checkOps([
    {
      what: "maximum with ties",
      inputs: [a, b],
      gpu: ([x, y]) => M.maximum(x, y),
      ref: ([x, y]) => map2(x, y, Math.max),
      refGrad: ([x, y], G) => tie(x, y, (u, v) => u > v).map((m) => map2(m, G, (p, g) => p * g)),
    },
    {
      what: "minimum with ties",
      inputs: [a, b],
      gpu: ([x, y]) => M.minimum(x, y),
      ref: ([x, y]) => map2(x, y, Math.min),
      refGrad: ([x, y], G) => tie(x, y, (u, v) => u < v).map((m) => map2(m, G, (p, g) => p * g)),
    },
    {
      what: "maximum(x, 0) (scalar)",
      inputs: [rand([9], 3, { low: -1, high: 1, avoid: [0] })],
      gpu: ([x]) => M.maximum(x, 0),
      ref: ([x]) => map1(x, (v) => Math.max(v, 0)),
    },
    {
      what: "minimum(0.25, x) (scalar first)",
      inputs: [rand([9], 4, { low: -1, high: 1, avoid: [0.25] })],
      gpu: ([x]) => M.minimum(0.25, x),
      ref: ([x]) => map1(x, (v) => Math.min(0.25, v)),
    },
  ]);
});

Deno.test("i32 arithmetic: add/sub/mul/maximum/minimum are exact, broadcast, and wrap like int32", async () => {
  const a = randInts(12, 1, -1000, 1000);
  const b = randInts(4, 2, -1000, 1000);
  const ta = tensor(Int32Array.from(a), [3, 4]);
  const tb = tensor(Int32Array.from(b), [4]);
  const outs = [
    M.add(ta, tb),
    M.sub(ta, tb),
    M.mul(ta, tb),
    M.maximum(ta, tb),
    M.minimum(ta, tb),
    M.add(ta, 7),
    M.sub(3, ta),
    M.mul(ta, -3),
    M.add(tensor(new Int32Array([2147483647, -2147483648])), 1),
    M.mul(tensor(new Int32Array([65536, 123456789])), 65536),
    // scalars past 2^24 stay exact (they are i32 uniforms, not f32 ones)
    M.add(tensor(new Int32Array([0, 1])), 16777217),
    M.full([2], 2147483647, { dtype: "i32" }),
  ];
  for (const t of outs) assert.equal(t.dtype, "i32");
  const got = await readAll(outs);
  const bc = (f: (x: number, y: number) => number) => Array.from(a, (x, i) => f(x, b[i % 4]));
  const expected = [
    bc((x, y) => x + y),
    bc((x, y) => x - y),
    bc((x, y) => x * y),
    bc(Math.max),
    bc(Math.min),
    Array.from(a, (x) => x + 7),
    Array.from(a, (x) => 3 - x),
    Array.from(a, (x) => x * -3),
    [-2147483648, -2147483647], // two's-complement wrap, as WGSL defines i32 overflow
    [0, Math.imul(123456789, 65536)],
    [16777217, 16777218],
    [2147483647, 2147483647],
  ];
  got.forEach((g, i) => {
    assert.ok(g instanceof Int32Array, `output ${i} reads back as Int32Array`);
    assert.deepEqual([...g], expected[i], `i32 op #${i}`);
  });
  for (const t of [ta, tb, ...outs]) t.dispose();
  // values int32 cannot hold are errors, not silent wraps
  assert.throws(
    () => tensor([2 ** 31], [1], { dtype: "i32" }),
    /tensor: i32 data has 2147483648 at 0, not an int32/,
  );
  assert.throws(() => M.full([1], -(2 ** 31) - 1, { dtype: "i32" }), /full: i32 fill value -2147483649/);
  assert.throws(() => M.arange(2 ** 31 - 2, 2 ** 31 + 2), /arange: i32 values from 2147483646 by 1/);
  const i = tensor(new Int32Array([1]));
  assert.throws(
    () => M.add(i, 2 ** 31),
    /add: an i32 tensor with a scalar that is not an int32 integer \(2147483648\)/,
  );
  i.dispose();
});

Deno.test("compare: all six comparisons with tensors, scalars, broadcasting and i32; f32 0/1 masks", async () => {
  const a = nd([1, 2, 3, 4, 5, 6], [2, 3]);
  const b = nd([3, 2, 1], [3]);
  const ops = {
    eq: (x: number, y: number) => x === y,
    ne: (x: number, y: number) => x !== y,
    lt: (x: number, y: number) => x < y,
    le: (x: number, y: number) => x <= y,
    gt: (x: number, y: number) => x > y,
    ge: (x: number, y: number) => x >= y,
  };
  const ta = tensor(Float32Array.from(a.data), [2, 3]);
  const tb = tensor(Float32Array.from(b.data), [3]);
  const ia = tensor(Int32Array.from(a.data), [2, 3]);
  const outs: Tensor[] = [];
  const refs: Nd[] = [];
  for (const [name, f] of Object.entries(ops) as [M.CompareName, (x: number, y: number) => boolean][]) {
    const m = (x: number, y: number) => (f(x, y) ? 1 : 0);
    outs.push(
      M.compare(name, ta, tb),
      M.compare(name, ta, 3),
      M.compare(name, 3, ta),
      M.compare(name, ia, 4),
    );
    refs.push(map2(a, b, m), map2(a, 3, m), map2(3, a, m), map2(a, 4, m));
  }
  for (const t of outs) assert.equal(t.dtype, "f32");
  const got = await readAll(outs);
  got.forEach((g, i) => assertClose(g, refs[i], { rtol: 0, atol: 0 }, `compare #${i}`));
  for (const t of [ta, tb, ia, ...outs]) t.dispose();
});

Deno.test("where: selects with a broadcast mask; gradients go to the chosen side only", async () => {
  const cond = nd([1, 0, 0, 1, 1, 0, 1], [7, 1]);
  await checkOps([
    {
      what: "where([7,1] mask, [7,13], [13])",
      inputs: [cond, rand([7, 13], 1), rand([13], 2)],
      gpu: ([c, a, b]) => M.where(c, a, b),
      ref: ([c, a, b]) => mapN([c, a, b], (m, x, y) => (m !== 0 ? x : y)),
      grad: [false, true, true],
    },
    {
      what: "where(mask from compare, [2,3], 0-d tensor)",
      inputs: [rand([2, 3], 3), rand([], 4)],
      gpu: ([a, b]) => M.where(M.compare("gt", a, 0), a, b),
      ref: ([a, b]) => mapN([a, b], (x, y) => (x > 0 ? x : y)),
    },
  ]);
});

Deno.test("clamp: both bounds, one bound, gradient 1 inside (bounds included) and 0 outside", async () => {
  const x = rand([5, 7], 11, { low: -2, high: 2, avoid: [-0.5, 0.75], margin: 0.02 });
  const clampRef = (lo: number, hi: number) => (v: number) => Math.min(Math.max(v, lo), hi);
  await checkOps([
    {
      what: "clamp(-0.5, 0.75)",
      inputs: [x],
      gpu: ([t]) => t.clamp(-0.5, 0.75),
      ref: ([t]) => map1(t, clampRef(-0.5, 0.75)),
    },
    {
      what: "clamp(min only)",
      inputs: [x],
      gpu: ([t]) => M.clamp(t, -0.5),
      ref: ([t]) => map1(t, clampRef(-0.5, Infinity)),
    },
    {
      what: "clamp(max only)",
      inputs: [x],
      gpu: ([t]) => M.clamp(t, undefined, 0.75),
      ref: ([t]) => map1(t, clampRef(-Infinity, 0.75)),
    },
    {
      what: "clamp at exactly the bounds",
      inputs: [nd([-0.5, 0.75, -1, 1, 0], [5])],
      gpu: ([t]) => M.clamp(t, -0.5, 0.75),
      ref: ([t]) => map1(t, clampRef(-0.5, 0.75)),
      // PyTorch's rule: the gradient passes where lo <= x <= hi.
      refGrad: ([t], G) => [map2(t, G, (v, g) => (v >= -0.5 && v <= 0.75 ? g : 0))],
    },
  ]);
});

Deno.test("broadcasting at ranks 6 and 8 (shapes travel in two vec4 uniforms)", async () => {
  const cases: [number[], number[]][] = [
    [[2, 1, 3, 1, 2, 1], [1, 2, 1, 3, 1, 2]],
    [[2, 1, 2, 1, 2, 1, 3, 1], [1, 2, 1, 2, 1, 3, 1, 2]],
    [[3, 1, 1, 1, 1, 2], [2]],
  ];
  await checkOps(cases.flatMap(([sa, sb], k) => [
    {
      what: `mul [${sa}] with [${sb}]`,
      inputs: [rand(sa, 300 + k), rand(sb, 310 + k)],
      gpu: ([a, b]) => M.mul(a, b),
      ref: ([a, b]) => map2(a, b, (x, y) => x * y),
    },
    {
      what: `where(a > 0, a, b) [${sa}] with [${sb}]`,
      inputs: [rand(sa, 320 + k), rand(sb, 330 + k)],
      gpu: ([a, b]) => M.where(M.compare("gt", a, 0), a, b),
      ref: ([a, b]) => map2(a, b, (x, y) => (x > 0 ? x : y)),
    },
  ]));
});

Deno.test("empty tensors: elementwise, broadcasting and gradients of size-0 operands", async () => {
  await checkOps([
    {
      what: "add [0,3] + [3]",
      inputs: [rand([0, 3], 1), rand([3], 2)],
      gpu: ([a, b]) => M.add(a, b),
      ref: ([a, b]) => map2(a, b, (x, y) => x + y),
    },
    {
      what: "exp of [2,0]",
      inputs: [rand([2, 0], 3)],
      gpu: ([a]) => a.exp(),
      ref: ([a]) => map1(a, Math.exp),
    },
  ]);
});

Deno.test("NaN stays NaN through max, maximum, minimum, relu and clamp, as in PyTorch (WGSL's max/min may drop it)", async () => {
  await M.init();
  const x = tensor([1, NaN, 3, -2]);
  const [nanFirst, inf] = [tensor([NaN, 1]), tensor([-Infinity, -Infinity])];
  const got = tidy(() =>
    [
      M.max(x),
      M.max(nanFirst),
      M.max(tensor([1, NaN, 3, -2, 5, 6], [2, 3]), 1), // rows [1, NaN, 3], [-2, 5, 6]
      M.maximum(x, 0),
      M.minimum(x, 0),
      M.maximum(0, x),
      M.relu(x),
      M.clamp(x, 0, 2),
      M.clamp(x),
      M.max(inf), // no NaN made of -inf
      M.maximum(tensor(new Int32Array([3, -5]), [2], { dtype: "i32" }), 0), // i32 keeps WGSL's max
    ].map((t) => M.keep(t))
  );
  const values = await Promise.all(got.map(async (t) => [...await t.toArray()]));
  assert.deepEqual(values, [
    [NaN],
    [NaN],
    [NaN, 6],
    [1, NaN, 3, 0],
    [0, NaN, 0, -2],
    [1, NaN, 3, 0],
    [1, NaN, 3, 0],
    [1, NaN, 2, 0],
    [1, NaN, 3, -2],
    [-Infinity],
    [3, 0],
  ]);
  for (const t of [...got, x, nanFirst, inf]) t.dispose();
  // Gradients at a NaN as PyTorch's: relu's passes (threshold_backward masks x <= 0, false for NaN); maximum
  // and minimum give it to both operands (their masks a < b, b < a are false for NaN).
  const a = tensor([NaN, 1, -1]).requiresGrad_(true);
  const b = tensor([2, NaN, -1]).requiresGrad_(true);
  M.tidy(() => M.add(M.add(M.relu(a), M.maximum(a, b)), M.minimum(a, b)).sum().backward());
  assert.deepEqual([...await a.grad!.toArray()], [3, 3, 1], "a: relu 1, 1, 0; max 1, 1, 0.5; min 1, 1, 0.5");
  assert.deepEqual([...await b.grad!.toArray()], [2, 2, 1], "b: max 1, 1, 0.5; min 1, 1, 0.5");
  for (const t of [a, b]) {
    t.grad!.dispose();
    t.dispose();
  }
});

Deno.test("compare: an unknown name is an error naming it and the six names, before any kernel", () => {
  const a = tensor([1, 2, 3]);
  const before = M.memory();
  assert.throws(
    () => M.compare("gte" as "eq", a, 2), // it made a kernel of invalid WGSL, an error at the next sync
    /compare: name must be one of eq, ne, lt, le, gt, ge, got "gte"/,
  );
  assert.equal(M.memory().liveTensors, before.liveTensors);
  a.dispose();
});
