/**
 * The fused scan's differential check, shared by fused_test.ts and fused_variant_fuzz_test.ts: a case (shape
 * and options), its seeded inputs, the same function built from autograd ops and the sequential scan, and
 * `compare`, which runs both and asserts that y and every gradient agree within the op bound.
 * @module
 */

import assert from "node:assert/strict";
import { init } from "../core/device.ts";
import { full, randn, tensor } from "../core/creation.ts";
import { add, cat, exp, matmul, mul, narrow, neg, silu, softplus, sum } from "../core/ops/index.ts";
import { dispose, keep, type Tensor, tidy } from "../core/tensor.ts";
import { fusedMambaScan, fusedMambaScanFrom, fusedSelectiveScan } from "../scan/fused.ts";
import { fusedMambaScanOut } from "../scan/fused_out.ts";
import { selectiveScan } from "../scan/selective_scan.ts";
import { assertMatches, tolerance } from "./fixture_util.ts";

/** A fused-scan call: batch B, length L, channels ED, state size N, dt rank R (dBC's first R columns), and
 * whether y is gated by silu(z); the optional keys select the other paths. `zWindow` and `zTimesY` need
 * `gated` (the fused op reads z only then), and `dBCPad` needs `dtWeight` (fusedSelectiveScan takes the dt
 * rank from dBC's width). */
export interface Case {
  B: number;
  L: number;
  ED: number;
  N: number;
  R: number;
  gated: boolean;
  /** z is `width` columns wide and the gate reads columns start .. start + ED of it. */
  zWindow?: { width: number; start: number };
  /** The loss also has sum(cat(y, y) * z) (z twice as wide as y): that op's backward runs before the scan's,
   * so z's gradient already holds a contribution in the scan's window. */
  zTimesY?: boolean;
  /** dt_proj inside the op (fusedMambaScan): delta from dBC's dt columns and a weight W (ED, R). */
  dtWeight?: boolean;
  /** The mean of draw (default 0): far from 0, dt + bias reaches softplus's other branches (u above 20; e^u
   * where 1 + e^u rounds to 1). */
  drawMean?: number;
  /** dBC has this many extra columns after R + 2N (x_proj's output padded; fusedMambaScan ignores them). */
  dBCPad?: number;
  /** With `dtWeight` and `gated`, not with `zTimesY`: out_proj too, fusedMambaScanOut (res + y Wout^T + ob,
   * Wout (3, ED)), with a residual, also a bias, or neither. The loss's G is then (B, L, 3). */
  outProj?: "residual" | "bias" | "plain";
  /** With `dtWeight`: the scan starts from a seeded state h0 (B, ED, N), a constant (fusedMambaScanFrom, or
   * fusedMambaScanOut's `from`; the reference's sequential scan from the same h0). */
  h0?: boolean;
}

/** out_proj's output width in `outProj` cases (odd: no multiple of 4 to hide a column the product skips). */
const DM = 3;

/** The seeded inputs of a case (every one but G requires grad): x, draw (B, L, ED); dBC (B, L, R + 2N + pad);
 * bias, D (ED); A_log (ED, N); z (B, L, ED or the window's width); G (B, L, ED, or 3 with outProj), the loss's
 * weights on the output; W (ED, R), dt_proj's weight; Wout (3, ED) and res (B, L, 3), out_proj's weight and
 * the residual; ob (3), out_proj's bias; h0 (B, ED, N), an initial state. Seed s draws from seeds 100 s + 1 ..
 * 100 s + 13. */
export function inputs(c: Case, seed: number) {
  const r = (shape: number[], s: number, scale = 1) => randn(shape, { seed: seed * 100 + s, std: scale });
  const t = {
    x: r([c.B, c.L, c.ED], 1),
    draw: randn([c.B, c.L, c.ED], { seed: seed * 100 + 2, std: 0.5, mean: c.drawMean ?? 0 }),
    dBC: r([c.B, c.L, c.R + 2 * c.N + (c.dBCPad ?? 0)], 3),
    bias: r([c.ED], 4, 0.5),
    A_log: r([c.ED, c.N], 5, 0.3),
    D: r([c.ED], 6),
    z: r([c.B, c.L, c.zWindow?.width ?? c.ED], 7),
    G: r([c.B, c.L, c.outProj ? DM : c.ED], 8),
    W: r([c.ED, c.R], 9, 0.5),
    Wout: r([DM, c.ED], 10, 0.5),
    res: r([c.B, c.L, DM], 11),
    ob: r([DM], 12),
    h0: r([c.B, c.ED, c.N], 13), // no gradient: a carried state is a constant
  };
  for (const k of GRADS) t[k].requiresGrad_(true);
  return t;
}

/** The inputs that get gradients. */
const GRADS = ["x", "draw", "dBC", "bias", "A_log", "D", "z", "W", "Wout", "res", "ob"] as const;

/** The same function built from autograd ops and the sequential scan (the reference). */
export function reference(t: ReturnType<typeof inputs>, c: Case): Tensor {
  const draw = c.dtWeight ? matmul(narrow(t.dBC, 2, 0, c.R), t.W, { transB: true }) : t.draw; // (B, L, ED)
  const delta = softplus(add(draw, t.bias)); // (B, L, ED)
  const Bm = narrow(t.dBC, 2, c.R, c.N);
  const C = narrow(t.dBC, 2, c.R + c.N, c.N);
  const A = neg(exp(t.A_log));
  const { y } = selectiveScan(t.x, delta, A, Bm, C, t.D, "sequential", c.h0 ? t.h0 : undefined);
  const z = c.zWindow ? narrow(t.z, 2, c.zWindow.start, c.ED) : t.z;
  const yg = c.gated ? mul(y, silu(z)) : y; // (B, L, ED)
  if (!c.outProj) return yg;
  const o = matmul(yg, t.Wout, { transB: true }); // (B, L, 3)
  if (c.outProj === "plain") return o;
  return c.outProj === "bias" ? add(add(o, t.res), t.ob) : add(o, t.res);
}

/** Runs `fn` and the backward of sum(y * G) (plus sum(cat(y, y) * z) with `zTimesY`): y and the gradient
 * of every input that got one, read back. Clears the inputs' gradients first. */
export async function gradsOf(t: ReturnType<typeof inputs>, fn: () => Tensor, c: Case) {
  const names = GRADS;
  for (const k of names) {
    t[k].grad?.dispose();
    t[k].grad = null;
  }
  const y = tidy(() => {
    const y = fn();
    const loss = sum(mul(y, t.G));
    (c.zTimesY ? add(loss, sum(mul(cat([y, y], 2), t.z))) : loss).backward();
    return keep(y);
  });
  const out: Record<string, Float32Array | Int32Array> = { y: await y.toArray() };
  for (const k of names) if (t[k].grad) out[k] = await t[k].grad!.toArray();
  y.dispose();
  return out;
}

/** Options of {@linkcode compare}. */
export interface CompareOptions {
  /** Hold the per-channel parameters' gradients to the size of their terms, not of what is left of them
   * where the terms cancel (see the comment inside compare). Costs one more reference run. */
  cancellationFloor?: boolean;
}

/** The per-channel parameters, whose gradients are sums over the B L steps. */
const SUMMED = ["bias", "A_log", "D", "W", "Wout", "ob"];

/**
 * The fused op (fusedSelectiveScan, or fusedMambaScan with `dtWeight`) against {@linkcode reference} on the
 * inputs of (c, seed): y and every gradient within the op bound (see the comment inside for the sums over
 * B L steps). Disposes every tensor it made; uses the fused variant in use for c.N.
 */
export async function compare(c: Case, seed: number, options: CompareOptions = {}) {
  await init();
  const t = inputs(c, seed);
  // A pooled buffer of dBC's size full of 7s: a gradient that left its padding columns unwritten shows it.
  if (c.dBCPad) full(t.dBC.shape, 7).dispose();
  const fused = await gradsOf(
    t,
    () => {
      const z = c.gated ? t.z : null;
      if (c.outProj) {
        const res = c.outProj === "plain" ? undefined : t.res;
        const ob = c.outProj === "bias" ? t.ob : null;
        return fusedMambaScanOut(
          t.x,
          t.dBC,
          t.W,
          t.bias,
          t.A_log,
          t.D,
          t.z,
          c.zWindow?.start,
          t.Wout,
          ob,
          res,
          { h0: c.h0 ? t.h0 : null },
        );
      }
      if (c.h0) return fusedMambaScanFrom(t.x, t.dBC, t.W, t.bias, t.A_log, t.D, z, c.zWindow?.start, t.h0).y;
      return c.dtWeight
        ? fusedMambaScan(t.x, t.dBC, t.W, t.bias, t.A_log, t.D, z, c.zWindow?.start)
        : fusedSelectiveScan(t.x, t.draw, t.dBC, t.bias, t.A_log, t.D, z, c.zWindow?.start);
    },
    c,
  );
  const ref = await gradsOf(t, () => reference(t, c), c);
  // With cancellationFloor: a summed gradient whose terms cancel (measured: dbias of one channel over 603
  // steps, terms adding up to 579 in size and to 1.88 in value) keeps f32 rounding that is small against the
  // terms but not against their sum (fused 6.5e-6 and reference 3.2e-6 of 1.88 from float64, on opposite
  // sides). So, as in model_fuzz_test.ts, each such gradient's scale is at least its largest value under G
  // with random signs, which keeps the terms' sizes but not their cancellation.
  const floors: Record<string, number> = {};
  if (options.cancellationFloor) {
    let s = seed * 7919 + 1;
    const sign = () => ((s = (Math.imul(s, 1103515245) + 12345) >>> 0) & 0x10000 ? 1 : -1);
    const signs = tensor(Float32Array.from({ length: t.G.size }, sign), t.G.shape);
    const G = t.G;
    t.G = mul(G, signs);
    const signed = await gradsOf(t, () => reference(t, c), c);
    dispose([t.G, signs]);
    t.G = G;
    for (const k of SUMMED) if (signed[k]) floors[k] = Math.max(...[...signed[k]].map(Math.abs));
  }
  const shapes: Record<string, readonly number[]> = { y: t.G.shape };
  for (const k of Object.keys(t) as (keyof typeof t)[]) shapes[k] = t[k].shape;
  assert.deepEqual(Object.keys(fused).sort(), Object.keys(ref).sort(), "the same inputs get gradients");
  // The fused scan is one op: the policy's op bound (fixture_util.ts), 1e-5 relative to max(1, max |ref|),
  // for y and every gradient. The gradients of the per-channel parameters (bias, A_log, D, W) are sums over
  // the B L time steps, computed in f32 in another order on each side, and the rounding of an n-term sum
  // grows like sqrt(n): past 1024 terms their bound grows by sqrt(n / 1024). Measured on lavapipe: every
  // other gradient and y 4.7e-7 at most; the parameters 1.4e-6 up to L 4096 (bound 2e-5), 2.7e-6 at L 9000
  // (3e-5), and bias at L 20000, 40000, 70000 5.4e-6, 1.03e-5, 6.8e-6 (bounds 4.4e-5, 6.3e-5, 8.3e-5), which
  // the plain 1e-5 would not hold with 3x headroom.
  const op = tolerance("op");
  const reduced = { ...op, rtol: op.rtol * Math.max(1, Math.sqrt((c.B * c.L) / 1024)) };
  for (const k of Object.keys(ref)) {
    assert.ok(fused[k], `${k}: fused gave no gradient`);
    const shape = shapes[k];
    const bound = SUMMED.includes(k) ? { ...reduced, floor: Math.max(reduced.floor, floors[k] ?? 0) } : op;
    assertMatches({ data: fused[k], shape }, { data: ref[k], shape }, bound, `${JSON.stringify(c)} ${k}`);
  }
  for (const v of Object.values(t)) {
    v.grad?.dispose();
    v.dispose();
  }
}
