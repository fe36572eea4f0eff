/**
 * Fused, numerically stable softmax, log-softmax and cross-entropy.
 *
 * Row kernels (`softmax_rows`, `log_softmax_rows`, `cross_entropy_rows`; rows may be strided: the input is
 * viewed as (outer, R, inner)), in two flavours:
 * - where subgroups have one fixed size SG: a workgroup of one subgroup per row. Lanes stride over the row
 *   for the maximum, then for sum(exp(x - max)), each reduced by a butterfly of subgroupShuffleXor (no
 *   workgroup memory, no barriers), then write the row. On lavapipe (SG 8) cross-entropy over 2048 rows of
 *   256 took 8.7 ms with barriers and 0.3 ms so.
 * - else: one workgroup of 64 invocations per row, reducing in a 64-float workgroup array between barriers.
 * Each invocation walks R / lanes elements three times (twice for cross-entropy). Software adapters stop an
 * invocation silently once its loops have run about 65535 trips in all (see `rowLoopTrips`), so rows too long
 * for one subgroup take the 64-lane flavour, and rows too long for that (about 1.4M elements, 2.1M for
 * cross-entropy) are not one kernel: their max and log-sum come from the multi-pass reductions of `max` and
 * `sum`, and an elementwise pass writes the output (`cross_entropy_pick`, one invocation per row, for
 * cross-entropy). Vocabularies are far below either limit.
 * Cross-entropy is the row kernel that writes lse - x[target] per row (0 for ignored rows), a validity mask
 * and the row's max and log-sum (`ignoreIndex` is an i32 uniform: one kernel for every value); its backward
 * is one pass (softmax - onehot) * g * valid (/ count for the mean), a workgroup per row (per element for rows
 * too long for the loop limit).
 * @module
 */

import { defineOp } from "../autograd.ts";
import { fixedSubgroupSize } from "../device.ts";
import { type BufferDecl, defineKernel, dispatch, type Kernel } from "../kernel.ts";
import { fmt, normAxis, sizeOf } from "../shape.ts";
import { checkOptionKeys } from "../options.ts";
import { Tensor } from "../tensor.ts";
import { mapOp } from "./map_kernel.ts";
import { reshape } from "./shape_ops.ts";
import { max, sum } from "./reduce.ts";

const WG = 64;
const LOWEST = "-3.4028234663852886e38";

/** WGSL of a row kernel's start, reduced over `lanes` invocations: `row`, `base` (the row's first element),
 * its maximum `m` and `logz` = log(sum(exp(x - m))). With `sg` the lanes are one subgroup (butterflies),
 * else a workgroup (tree in workgroup memory between barriers). */
function rowPrelude(sg: number | null): string {
  const head = `
  let row = group;
  let o = row / P.inner;
  let i = row % P.inner;
  let base = o * P.R * P.inner + i;`;
  if (sg) {
    const butterfly = (v: string, f: (a: string, b: string) => string) =>
      Array.from({ length: Math.log2(sg) }, (_, k) => {
        const mask = sg >> (k + 1);
        return `${v} = ${f(v, `subgroupShuffleXor(${v}, ${mask}u)`)};`;
      }).join(" ");
    // Every lane runs the same trips (the tail masked), so the butterflies sit in uniform control flow.
    const each = (f: string) =>
      `for (var r0 = 0u; r0 < P.R; r0 += ${sg}u) {
    let r = r0 + lid;
    let xv = ld_x(base + min(r, P.R - 1u) * P.inner);
    ${f}
  }`;
    return `${head}
  var m = ${LOWEST};
  ${each(`m = max(m, select(${LOWEST}, xv, r < P.R));`)}
  ${butterfly("m", (a, b) => `max(${a}, ${b})`)}
  var z = 0.0;
  ${each("z += select(0.0, exp(xv - m), r < P.R);")}
  ${butterfly("z", (a, b) => `${a} + ${b}`)}
  let logz = log(z);`;
  }
  return `${head}
  var m = ${LOWEST};
  for (var r = lid; r < P.R; r += ${WG}u) { m = max(m, ld_x(base + r * P.inner)); }
  red[lid] = m;
  workgroupBarrier();
  for (var s = ${WG / 2}u; s > 0u; s = s >> 1u) {
    if (lid < s) { red[lid] = max(red[lid], red[lid + s]); }
    workgroupBarrier();
  }
  m = red[0];
  workgroupBarrier();
  var z = 0.0;
  for (var r = lid; r < P.R; r += ${WG}u) { z += exp(ld_x(base + r * P.inner) - m); }
  red[lid] = z;
  workgroupBarrier();
  for (var s = ${WG / 2}u; s > 0u; s = s >> 1u) {
    if (lid < s) { red[lid] = red[lid] + red[lid + s]; }
    workgroupBarrier();
  }
  let logz = log(red[0]);`;
}

type RowKind = "softmax" | "log_softmax" | "cross_entropy";

/** Loop trips software adapters run per invocation, all loops together, before stopping it silently. */
const LOOP_LIMIT = 65535;

/**
 * Loop trips one invocation of a row kernel of `kind` runs for rows of R, with `sg` lanes (one subgroup)
 * or, for null, a workgroup of 64 (plus its two trees of 6 steps): walks of R / lanes for the max and the
 * sum, and one more for the writes of softmax and logSoftmax. Each loop's final test counts as a trip, as
 * lavapipe counts them: a 64-lane softmax row of 64 x 21839 runs 65534 trips and is exact; one of
 * 64 x 21840 runs 65537 and loses elements.
 */
function rowLoopTrips(kind: RowKind, R: number, sg: number | null): number {
  const walks = kind === "cross_entropy" ? 2 : 3;
  const trips = walks * (Math.ceil(R / (sg ?? WG)) + 1);
  return sg ? trips : trips + 2 * (Math.log2(WG) + 1);
}

/** How rows of R are reduced: by one subgroup (its size), by a workgroup of 64 ("wg"), or, for rows too long
 * for either within the loop limit, by the multi-pass reductions ("reduce"). */
function rowFlavour(kind: RowKind, R: number): number | "wg" | "reduce" {
  const sg = fixedSubgroupSize();
  if (sg && rowLoopTrips(kind, R, sg) <= LOOP_LIMIT) return sg;
  return rowLoopTrips(kind, R, null) <= LOOP_LIMIT ? "wg" : "reduce";
}

/** WGSL writing cross-entropy's outputs for `row` from its `m` and `logz` (x's row starts at `base`, with
 * stride P.inner): the loss, the validity and the stats. */
const CE_WRITE = `
    let t = ld_target(row);
    let ok = t != P.ignore && t >= 0 && u32(t) < P.R;
    var loss = 0.0;
    if (ok) { loss = (m - ld_x(base + u32(t) * P.inner)) + logz; }
    var nan = 0x7fc00000u; // a variable: Chrome rejects a constant expression that evaluates to NaN
    if (t != P.ignore && !ok) { loss = bitcast<f32>(nan); }
    st_y(row, loss);
    st_valid(row, select(0.0, 1.0, ok));
    st_stats(2u * row, m);
    st_stats(2u * row + 1u, logz);
`;

/** What each row kernel writes after the prelude; `lanes` invocations share a row (`lid` is the lane). Outputs
 * use (x - m) - logz, never x - (m + logz): for large logits m + logz would be rounded to the spacing of m
 * (6e-5 at 1000) and every probability would inherit that error. */
const ROW_WRITES: Record<RowKind, (lanes: number) => string> = {
  softmax: (lanes) =>
    `for (var r = lid; r < P.R; r += ${lanes}u) { st_y(base + r * P.inner, exp(ld_x(base + r * P.inner) - m - logz)); }`,
  log_softmax: (lanes) =>
    `for (var r = lid; r < P.R; r += ${lanes}u) { st_y(base + r * P.inner, ld_x(base + r * P.inner) - m - logz); }`,
  cross_entropy: () => `if (lid == 0u) {${CE_WRITE}}`,
};

const ROW_OUTPUTS: Record<RowKind, BufferDecl[]> = {
  softmax: [{ name: "y", type: "f32", access: "read_write" }],
  log_softmax: [{ name: "y", type: "f32", access: "read_write" }],
  cross_entropy: [
    { name: "target", type: "i32", access: "read" },
    { name: "y", type: "f32", access: "read_write" },
    { name: "valid", type: "f32", access: "read_write" },
    { name: "stats", type: "f32", access: "read_write" },
  ],
};

const rowKernels = new Map<string, Kernel>();

/** The row kernel of a kind: one subgroup of `sg` lanes, or for null a workgroup of 64, per row. */
function rowKernel(kind: RowKind, sg: number | null): Kernel {
  const name = `${kind}_rows${sg ? `_sg${sg}` : ""}`;
  let k = rowKernels.get(name);
  if (!k) {
    k = defineKernel({
      name,
      buffers: [{ name: "x", type: "f32", access: "read" }, ...ROW_OUTPUTS[kind]],
      uniforms: [["R", "u32"], ["inner", "u32"], ["ignore", "i32"]],
      workgroupSize: sg ?? WG,
      subgroups: sg !== null,
      decls: sg ? "" : `var<workgroup> red: array<f32, ${WG}>;`,
      body: rowPrelude(sg) + "\n  " + ROW_WRITES[kind](sg ?? WG),
    });
    rowKernels.set(name, k);
  }
  return k;
}

function rowsOf(x: Tensor, axis: number) {
  const outer = sizeOf(x.shape.slice(0, axis));
  const inner = sizeOf(x.shape.slice(axis + 1));
  return { rows: outer * inner, R: x.shape[axis], inner };
}

/** The row statistics of the row kernels from multi-pass reductions over `axis` (kept as size 1): the max m
 * (at least the lowest f32, as the kernels start there) and logz = log(sum(exp(x - m))). */
function rowStats(x: Tensor, axis: number): { m: Tensor; logz: Tensor } {
  const m0 = max(x, axis, true);
  const m = mapOp(`max(a, ${LOWEST})`, [m0], m0.shape);
  const e = mapOp("exp(a - b)", [x, m], x.shape);
  const z = sum(e, axis, true);
  const logz = mapOp("log(a)", [z], z.shape);
  for (const t of [m0, e, z]) t.dispose();
  return { m, logz };
}

function rowOp(x: Tensor, axis: number, kind: "softmax" | "log_softmax"): Tensor {
  const { rows, R, inner } = rowsOf(x, axis);
  const f = rowFlavour(kind, R);
  if (f === "reduce") {
    const { m, logz } = rowStats(x, axis);
    const y = mapOp(kind === "softmax" ? "exp((a - b) - c)" : "(a - b) - c", [x, m, logz], x.shape);
    m.dispose();
    logz.dispose();
    return y;
  }
  const y = Tensor.empty(x.shape);
  const k = rowKernel(kind, f === "wg" ? null : f);
  if (R > 0) dispatch(k, { x: x.storage, y: y.storage }, { R, inner, ignore: 0 }, rows);
  return y;
}

const softmaxOp = defineOp<{ axis: number }>({
  name: "softmax",
  forward: ([x], { axis }, save) => {
    const y = rowOp(x, axis, "softmax");
    save(y);
    return y;
  },
  backward: (g, [y], _i, { axis }) => {
    // dx = y * (g - sum(g * y))
    const gy = mapOp("a * b", [g, y], y.shape);
    const s = sum(gy, axis, true);
    const dx = mapOp("a * (b - c)", [y, g, s], y.shape);
    gy.dispose();
    s.dispose();
    return [dx];
  },
});

const logSoftmaxOp = defineOp<{ axis: number }>({
  name: "logSoftmax",
  forward: ([x], { axis }, save) => {
    const y = rowOp(x, axis, "log_softmax");
    save(y);
    return y;
  },
  backward: (g, [y], _i, { axis }) => {
    // dx = g - exp(y) * sum(g)
    const s = sum(g, axis, true);
    const dx = mapOp("b - exp(a) * c", [y, g, s], y.shape);
    s.dispose();
    return [dx];
  },
});

function checkF32(x: Tensor, op: string): void {
  if (x.dtype !== "f32") throw new Error(`${op} needs an f32 tensor, got ${x.dtype}`);
}

/** Softmax over `dim` (default last), stable for any input range. */
export function softmax(x: Tensor, dim = -1): Tensor {
  checkF32(x, "softmax");
  const a = normAxis(dim, x.rank, "softmax");
  // a 0-d tensor (axis 0 or -1, as PyTorch allows) is a row of one: exp(x - x) (1; NaN at +-inf, as PyTorch)
  if (x.rank === 0) {
    const d = x.sub(x);
    try {
      return d.exp();
    } finally {
      d.dispose(); // its node lives while exp's consumes it
    }
  }
  return softmaxOp([x], { axis: a });
}

/** Log-softmax over `dim` (default last), stable for any input range. */
export function logSoftmax(x: Tensor, dim = -1): Tensor {
  checkF32(x, "logSoftmax");
  const a = normAxis(dim, x.rank, "logSoftmax");
  if (x.rank === 0) return x.sub(x); // a row of one: x - x
  return logSoftmaxOp([x], { axis: a });
}

/** Options of {@linkcode crossEntropy}. */
export interface CrossEntropyOptions {
  /** Targets equal to this are skipped (PyTorch's default -100); an integer in the int32 range. */
  ignoreIndex?: number;
  /** `mean` over non-ignored targets (default; NaN if all are ignored), `sum`, or `none` (per-target losses). */
  reduction?: "mean" | "sum" | "none";
}

const ceOp = defineOp<{ reduction: "mean" | "sum" | "none"; ignore: number }>({
  name: "crossEntropy",
  forward: ([logits, target], { reduction, ignore }, save) => {
    const V = logits.shape[logits.rank - 1];
    const rows = target.size; // not logits.size / V: with V = 0 every (non-ignored) row still gets its NaN
    const loss = Tensor.empty([rows]);
    const valid = Tensor.empty([rows]);
    const stats = Tensor.empty([rows, 2]); // per row: max, log(sum(exp(x - max)))
    const bufs = {
      x: logits.storage,
      target: target.storage,
      y: loss.storage,
      valid: valid.storage,
      stats: stats.storage,
    };
    const f = rowFlavour("cross_entropy", V);
    if (f === "reduce") {
      const { m, logz } = rowStats(logits, logits.rank - 1);
      const u = { rows, R: V, inner: 1, ignore };
      dispatch(cePickKernel, { ...bufs, m: m.storage, logz: logz.storage }, u, Math.ceil(rows / WG));
      m.dispose();
      logz.dispose();
    } else {
      dispatch(rowKernel("cross_entropy", f === "wg" ? null : f), bufs, { R: V, inner: 1, ignore }, rows);
    }
    save(logits, target, stats, valid);
    if (reduction === "none") {
      const out = reshape(loss, target.shape);
      loss.dispose();
      return out;
    }
    const total = sum(loss);
    loss.dispose();
    if (reduction === "sum") return total;
    const count = sum(valid);
    save(count);
    // No counted target: NaN (0 / 0), as PyTorch. The NaN comes in as a uniform: a NaN constant in WGSL is
    // rejected by Chrome, and a runtime 0 / 0 is not guaranteed to give NaN.
    const out = mapOp("select(a / b, c, b == 0.0)", [total, count, NaN], []);
    total.dispose();
    return out;
  },
  backward: (g, [logits, target, stats, valid, count], _i, { reduction }) => {
    // d/dx = (softmax(x) - onehot(t)) * g_row * valid_row (/ count for the mean: 0 where no row counts).
    const V = logits.shape[logits.rank - 1];
    const rows = target.size;
    const rowShape = [rows, 1];
    const t2 = reshape(target, rowShape);
    const g2 = reduction === "none" ? reshape(g, rowShape) : reshape(g, [1, 1]);
    const v2 = reshape(valid, rowShape);
    const x2 = reshape(logits, [rows, V]);
    const weight = reduction === "mean"
      ? mapOp("a * b / max(c, 1.0)", [g2, v2, count], rowShape)
      : mapOp("a * b", [g2, v2], rowShape);
    const dx = softmaxMinusOneHot(x2, stats, t2, weight);
    for (const t of [t2, g2, v2, x2, weight]) t.dispose();
    const out = reshape(dx, logits.shape);
    dx.dispose();
    return [out, null];
  },
});

/** Cross-entropy of rows too long for the row kernels, from their max `m` and `logz` (reductions): each
 * invocation owns one row; it reads the row's target, m, logz and x at the target, and writes the row's
 * loss, validity and stats, as `cross_entropy_rows` does. */
const cePickKernel = defineKernel({
  name: "cross_entropy_pick",
  buffers: [
    { name: "x", type: "f32", access: "read" },
    { name: "m", type: "f32", access: "read" },
    { name: "logz", type: "f32", access: "read" },
    ...ROW_OUTPUTS.cross_entropy,
  ],
  uniforms: [["rows", "u32"], ["R", "u32"], ["inner", "u32"], ["ignore", "i32"]],
  workgroupSize: WG,
  body: `
  if (gid >= P.rows) { return; }
  let row = gid;
  let base = row * P.R;
  let m = ld_m(row);
  let logz = ld_logz(row);${CE_WRITE}`,
});

/** (softmax(x) - onehot(t)) * w per element: one invocation each (`i / V` and `i % V` per element). */
const onehotKernel = defineKernel({
  name: "softmax_minus_onehot",
  buffers: [
    { name: "x", type: "f32", access: "read" },
    { name: "stats", type: "f32", access: "read" },
    { name: "t", type: "i32", access: "read" },
    { name: "w", type: "f32", access: "read" },
    { name: "y", type: "f32", access: "read_write" },
  ],
  uniforms: [["n", "u32"], ["V", "u32"]],
  workgroupSize: 256,
  body: `
  if (gid >= P.n) { return; }
  let row = gid / P.V;
  let v = gid % P.V;
  let w = ld_w(row);
  let p = exp(ld_x(gid) - ld_stats(2u * row) - ld_stats(2u * row + 1u));
  st_y(gid, (p - select(0.0, 1.0, ld_t(row) == i32(v))) * w);`,
});

const onehotRowKernels = new Map<number, Kernel>();

/** The same per row, a workgroup of `lanes` invocations each: the row's stats, target and weight are read once
 * per invocation, and no element pays for a division (scalar on CPU adapters). */
function onehotRowKernel(lanes: number): Kernel {
  let k = onehotRowKernels.get(lanes);
  if (!k) {
    k = defineKernel({
      ...onehotKernel.spec,
      name: `softmax_minus_onehot_rows${lanes}`,
      workgroupSize: lanes,
      body: `
  let row = group;
  let m = ld_stats(2u * row);
  let logz = ld_stats(2u * row + 1u);
  let t = ld_t(row);
  let w = ld_w(row);
  for (var v = lid; v < P.V; v += ${lanes}u) {
    let at = row * P.V + v;
    st_y(at, (exp(ld_x(at) - m - logz) - select(0.0, 1.0, t == i32(v))) * w);
  }`,
    });
    onehotRowKernels.set(lanes, k);
  }
  return k;
}

function softmaxMinusOneHot(x: Tensor, stats: Tensor, t: Tensor, w: Tensor): Tensor {
  const y = Tensor.empty(x.shape);
  const n = x.size;
  const [rows, V] = x.shape;
  // a row per workgroup of one subgroup (lavapipe: 8 lanes, one CPU vector), or of 64
  const lanes = fixedSubgroupSize() ?? WG;
  if (n === 0) return y;
  const bufs = { x: x.storage, stats: stats.storage, t: t.storage, w: w.storage, y: y.storage };
  if (Math.ceil(V / lanes) < 65535) dispatch(onehotRowKernel(lanes), bufs, { n, V }, rows);
  else dispatch(onehotKernel, bufs, { n, V }, Math.ceil(n / 256));
  return y;
}

/**
 * Cross-entropy of `logits` (..., V) against integer `target` (...): fused log-softmax and pick, stable.
 * Mean over non-ignored targets by default; as in PyTorch, the mean is NaN when every target is ignored (its
 * gradient is then zero). Targets outside [0, V) that are not ignored give NaN (PyTorch raises); they get no
 * gradient and do not count towards the mean. `ignoreIndex` must be an integer in the int32 range.
 */
export function crossEntropy(logits: Tensor, target: Tensor, options: CrossEntropyOptions = {}): Tensor {
  // (PyTorch's spellings, ignore_index or label_smoothing, would otherwise give the plain mean in silence)
  checkOptionKeys(options, ["ignoreIndex", "reduction"], "crossEntropy");
  checkF32(logits, "crossEntropy");
  if (target.dtype !== "i32") throw new Error(`crossEntropy: targets must be i32, got ${target.dtype}`);
  const ignore = options.ignoreIndex ?? -100;
  if (!Number.isInteger(ignore) || ignore < -(2 ** 31) || ignore >= 2 ** 31) {
    throw new Error(`crossEntropy: ignoreIndex must be an int32 integer, got ${ignore}`);
  }
  if (logits.rank < 1 || target.shape.join() !== logits.shape.slice(0, -1).join()) {
    throw new Error(
      `crossEntropy: logits ${fmt(logits.shape)} need targets of shape ${fmt(logits.shape.slice(0, -1))}, ` +
        `got ${fmt(target.shape)}`,
    );
  }
  const reduction = options.reduction ?? "mean";
  if (!["mean", "sum", "none"].includes(reduction)) {
    throw new Error(
      `crossEntropy: reduction must be "mean", "sum" or "none", got ${JSON.stringify(reduction)}`,
    );
  }
  return ceOp([logits, target], { reduction, ignore });
}
