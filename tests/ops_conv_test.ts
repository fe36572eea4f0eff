import assert from "node:assert/strict";
import * as M from "./library.ts";
import { checkOps, type Nd, type OpCase, rand, setup, toTensor, UNARY_REF } from "./helpers.ts";

await setup();

type Act = "none" | "silu";

/** x[b, u, c] of the conv's input, u < 0 reading the prefix (B, C, K-1) where there is one, else 0. */
function xAt(x: Nd, prefix: Nd | null, b: number, u: number, c: number, K: number): number {
  const [, L, C] = x.shape;
  if (u >= 0) return x.data[(b * L + u) * C + c];
  return prefix ? prefix.data[(b * C + c) * (K - 1) + K - 1 + u] : 0;
}

/** Float64 pre-activation of the causal depthwise conv and the per-element error scale |bias| + sum |w x|. */
function preRef(
  x: Nd,
  w: Nd,
  bias: Nd | null,
  prefix: Nd | null = null,
): { pre: Float64Array; scale: Float64Array } {
  const [B, L, C] = x.shape;
  const K = w.data.length / C;
  const pre = new Float64Array(B * L * C), scale = new Float64Array(B * L * C);
  for (let b = 0; b < B; b++) {
    for (let t = 0; t < L; t++) {
      for (let c = 0; c < C; c++) {
        let acc = bias ? bias.data[c] : 0, mag = Math.abs(acc);
        for (let k = 0; k < K; k++) {
          const u = t - (K - 1) + k;
          const v = w.data[c * K + k] * xAt(x, prefix, b, u, c, K);
          acc += v;
          mag += Math.abs(v);
        }
        pre[(b * L + t) * C + c] = acc;
        scale[(b * L + t) * C + c] = mag;
      }
    }
  }
  return { pre, scale };
}

const ACT: Record<Act, (p: number) => number> = { none: (p) => p, silu: UNARY_REF.silu };
const DACT: Record<Act, (p: number) => number> = {
  none: () => 1,
  silu: (p) => {
    const s = UNARY_REF.sigmoid(p);
    return s * (1 + p * (1 - s));
  },
};

/** Analytic float64 gradients of sum(conv(x) * G): [gx, gw, gbias]. */
function convGradRef(x: Nd, w: Nd, bias: Nd | null, act: Act, G: Nd, prefix: Nd | null = null): Nd[] {
  const [B, L, C] = x.shape;
  const K = w.data.length / C;
  const { pre } = preRef(x, w, bias, prefix);
  const gpre = pre.map((p, i) => G.data[i] * DACT[act](p));
  const gx = new Float64Array(x.data.length), gw = new Float64Array(C * K), gb = new Float64Array(C);
  for (let b = 0; b < B; b++) {
    for (let t = 0; t < L; t++) {
      for (let c = 0; c < C; c++) {
        const gp = gpre[(b * L + t) * C + c];
        gb[c] += gp;
        for (let k = 0; k < K; k++) {
          const u = t - (K - 1) + k;
          gw[c * K + k] += gp * xAt(x, prefix, b, u, c, K);
          if (u >= 0) gx[(b * L + u) * C + c] += gp * w.data[c * K + k];
        }
      }
    }
  }
  return [{ data: gx, shape: x.shape }, { data: gw, shape: w.shape }, { data: gb, shape: [C] }];
}

function convCase(
  B: number,
  L: number,
  C: number,
  K: number,
  act: Act,
  hasBias: boolean,
  options: {
    analytic?: boolean;
    xGrad?: boolean;
    flatWeight?: boolean;
    /** x is `width` channels wide and the conv reads channels start .. start + C of it. */
    window?: { width: number; start: number };
    /** The inputs before t = 0 (B, C, K-1), the op's last input (no gradient). */
    prefix?: boolean;
  } = {},
): OpCase {
  const seed = B * 1000003 + L * 1009 + C * 31 + K * 7 + (act === "silu" ? 3 : 0) + (hasBias ? 1 : 0);
  const win = options.window;
  const x = rand([B, L, win?.width ?? C], seed, { low: -2, high: 2 });
  // The channels the conv reads, as a (B, L, C) array, and a (B, L, C) gradient put back at full width.
  const inWin = (xn: Nd): Nd => {
    if (!win) return xn;
    const data = new Float64Array(B * L * C);
    for (let r = 0; r < B * L; r++) {
      for (let c = 0; c < C; c++) data[r * C + c] = xn.data[r * win.width + win.start + c];
    }
    return { data, shape: [B, L, C] };
  };
  const widen = (g: Nd): Nd => {
    if (!win) return g;
    const data = new Float64Array(B * L * win.width);
    for (let r = 0; r < B * L; r++) {
      for (let c = 0; c < C; c++) data[r * win.width + win.start + c] = g.data[r * C + c];
    }
    return { data, shape: [B, L, win.width] };
  };
  const w = rand(options.flatWeight ? [C, K] : [C, 1, K], seed + 1);
  const pre = options.prefix ? [rand([B, C, K - 1], seed + 3, { low: -2, high: 2 })] : [];
  const inputs = [x, w, ...(hasBias ? [rand([C], seed + 2)] : []), ...pre];
  // bias and prefix of the inputs as given
  const parts = (xs: Nd[]) => ({
    bias: hasBias ? xs[2] : null,
    prefix: options.prefix ? xs[xs.length - 1] : null,
  });
  const ref = (xs: Nd[]): Nd => {
    const { bias, prefix } = parts(xs);
    const { pre } = preRef(inWin(xs[0]), xs[1], bias, prefix);
    return { data: pre.map(ACT[act]), shape: [B, L, C] };
  };
  return {
    what: `conv B=${B} L=${L} C=${C} K=${K} ${act}${hasBias ? " +bias" : ""}${
      options.xGrad === false ? " (x without grad)" : ""
    }${win ? ` (channels ${win.start}.. of ${win.width})` : ""}${options.prefix ? " after a prefix" : ""}`,
    inputs,
    gpu: (ts) => {
      const bias = hasBias ? ts[2] : null;
      return M.causalConv1d(ts[0], ts[1], bias, act, win?.start, options.prefix ? ts[ts.length - 1] : null);
    },
    ref,
    // f32 sums are accurate relative to their terms; silu' is at most 1.1.
    scale: (xs) => ({
      data: preRef(inWin(xs[0]), xs[1], parts(xs).bias, parts(xs).prefix).scale.map((s) => 1.1 * s),
      shape: [B, L, C],
    }),
    // dw and dbias sum B*L terms.
    gradTol: { rtol: 2e-5, atol: 2e-6 * Math.sqrt(B * L) },
    grad: options.xGrad === false || options.prefix
      ? [options.xGrad !== false, true, ...(hasBias ? [true] : []), ...(options.prefix ? [false] : [])]
      : true,
    refGrad: options.analytic
      ? (xs, G) => {
        const { bias, prefix } = parts(xs);
        const [gx, gw, gb] = convGradRef(inWin(xs[0]), xs[1], bias, act, G, prefix);
        return [
          widen(gx),
          gw,
          ...(hasBias ? [gb] : []),
          ...(prefix ? [{ data: new Float64Array(prefix.data.length), shape: prefix.shape }] : []),
        ];
      }
      : undefined,
  };
}

Deno.test("causalConv1d: L = 1, L < K, L = K, chunk edges, B = 3, with/without silu and bias (finite differences)", async () => {
  const cases: OpCase[] = [];
  for (const act of ["none", "silu"] as const) {
    for (const hasBias of [false, true]) {
      for (const [B, L] of [[1, 1], [3, 1], [2, 2], [1, 3], [3, 4], [2, 7]]) {
        cases.push(convCase(B, L, 3, 4, act, hasBias));
      }
    }
  }
  cases.push(convCase(2, 5, 3, 1, "silu", true), convCase(1, 6, 2, 2, "none", false, { flatWeight: true }));
  cases.push(convCase(2, 9, 3, 4, "silu", true, { xGrad: false }));
  // C a multiple of 4: four channels per invocation (vec4), every K (weights and partials transposed).
  for (const K of [1, 2, 3, 4, 5]) cases.push(convCase(3, 6, 4, K, "silu", true));
  cases.push(convCase(2, 1, 8, 4, "none", false), convCase(1, 3, 8, 4, "silu", true, { xGrad: false }));
  await checkOps(cases);
});

Deno.test("causalConv1d: several time chunks, partial last chunk, channel counts across workgroups (analytic)", async () => {
  const cases: OpCase[] = [];
  for (const act of ["none", "silu"] as const) {
    for (const hasBias of [false, true]) {
      // L not a multiple of the chunk (64), and exactly a multiple; C below, at and above the workgroup (64).
      cases.push(convCase(3, 130, 5, 4, act, hasBias, { analytic: true }));
      cases.push(convCase(1, 128, 64, 4, act, hasBias, { analytic: true }));
      cases.push(convCase(2, 67, 70, 3, act, hasBias, { analytic: true }));
    }
  }
  cases.push(convCase(3, 200, 33, 4, "silu", true, { analytic: true, xGrad: false }));
  cases.push(convCase(1, 1000, 8, 5, "silu", true, { analytic: true }));
  // Wide rows (short chunks: 16 steps forward, 8 backward), vec4 and scalar, K = 3 and 4.
  for (
    const [B, L, C, K] of [[2, 37, 260, 4], [3, 5, 260, 4], [1, 1, 260, 4], [2, 19, 258, 4], [1, 45, 300, 3]]
  ) {
    cases.push(convCase(B, L, C, K, "silu", true, { analytic: true }));
  }
  cases.push(convCase(2, 21, 264, 4, "none", false, { analytic: true, xGrad: false }));
  // More taps than chunk steps: the window reaches back over several chunks.
  cases.push(convCase(2, 40, 260, 10, "silu", true, { analytic: true }));
  // dw and dbias sum 70000 rows of partials: past the 65535 iterations a software adapter's loop runs, so
  // the sums go in slices.
  cases.push(convCase(70000, 1, 4, 3, "silu", true, { analytic: true }));
  await checkOps(cases);
});

Deno.test("causalConv1d: reads a channel window of a wider x in place; x's gradient is zero outside it", async () => {
  const cases: OpCase[] = [];
  // vec4 (C, width and start multiples of 4: in_proj's x half and a middle window) and scalar layouts.
  for (const [C, width, start] of [[8, 16, 0], [8, 20, 8], [4, 10, 4], [3, 7, 2], [3, 3, 0]]) {
    cases.push(convCase(2, 70, C, 4, "silu", true, { analytic: true, window: { width, start } }));
  }
  cases.push(convCase(2, 5, 3, 4, "silu", true, { window: { width: 6, start: 3 } })); // finite differences
  cases.push(
    convCase(1, 9, 8, 4, "none", false, { analytic: true, xGrad: false, window: { width: 16, start: 8 } }),
  );
  await checkOps(cases);
});

Deno.test("causalConv1d: windows of one x, disjoint (written in place) and overlapping (accumulated), sum their gradients", async () => {
  const [B, L, W, K] = [2, 33, 12, 4];
  const x = rand([B, L, W], 1, { low: -2, high: 2 });
  // [C, start]: two disjoint vec4 windows, then one overlapping both (scalar layout)
  const wins = [[4, 0], [4, 8], [5, 2]];
  const ws = wins.map(([C], i) => rand([C, 1, K], 10 + i));
  const bs = wins.map(([C], i) => rand([C], 20 + i));
  const Gs = wins.map(([C], i) => rand([B, L, C], 30 + i));
  const tx = toTensor(x, true);
  const tw = ws.map((w) => toTensor(w, true));
  const tb = bs.map((b) => toTensor(b, true));
  M.tidy(() => {
    let loss = M.zeros([]);
    wins.forEach(([, start], i) => {
      const y = M.causalConv1d(tx, tw[i], tb[i], "silu", start);
      loss = M.add(loss, M.sum(M.mul(y, toTensor(Gs[i]))));
    });
    loss.backward();
  });
  const gx = new Float64Array(B * L * W);
  for (const [i, [C, start]] of wins.entries()) {
    const xi = new Float64Array(B * L * C);
    for (let r = 0; r < B * L; r++) for (let c = 0; c < C; c++) xi[r * C + c] = x.data[r * W + start + c];
    const [g, gw, gb] = convGradRef({ data: xi, shape: [B, L, C] }, ws[i], bs[i], "silu", Gs[i]);
    for (let r = 0; r < B * L; r++) for (let c = 0; c < C; c++) gx[r * W + start + c] += g.data[r * C + c];
    assertClose(await tw[i].grad!.toArray(), gw.data, 1e-5, `gw of window ${i}`); // the op bound
    assertClose(await tb[i].grad!.toArray(), gb.data, 1e-5, `gbias of window ${i}`);
  }
  assertClose(await tx.grad!.toArray(), gx, 1e-5, "gx");
  for (const t of [tx, ...tw, ...tb]) t.dispose();
});

function assertClose(got: ArrayLike<number>, want: ArrayLike<number>, tol: number, what: string): void {
  assert.equal(got.length, want.length, what);
  let worst = 0;
  for (let i = 0; i < got.length; i++) {
    worst = Math.max(worst, Math.abs(got[i] - want[i]) / Math.max(1, Math.abs(want[i])));
  }
  assert.ok(worst <= tol, `${what}: worst relative error ${worst.toExponential(2)} > ${tol}`);
}

Deno.test("causalConv1d after a prefix (a cache's conv inputs): forward and gradients, L shorter than the window too", async () => {
  const cases: OpCase[] = [];
  for (
    const [B, L, C, K] of [[2, 1, 3, 4], [1, 2, 3, 4], [2, 7, 3, 4], [3, 70, 5, 3], [2, 9, 8, 4], [
      1,
      2,
      8,
      4,
    ]]
  ) {
    cases.push(convCase(B, L, C, K, "silu", true, { prefix: true })); // finite differences
    cases.push(convCase(B, L, C, K, "none", false, { prefix: true, analytic: true }));
  }
  // wide rows (vec4, chunks of 16 / 8), a channel window of a wider x (in_proj's x half), K 2, x without grad
  cases.push(convCase(2, 37, 260, 4, "silu", true, { prefix: true, analytic: true }));
  cases.push(
    convCase(2, 70, 8, 4, "silu", true, { prefix: true, analytic: true, window: { width: 16, start: 0 } }),
  );
  cases.push(convCase(2, 5, 4, 2, "silu", true, { prefix: true, analytic: true }));
  cases.push(convCase(2, 9, 8, 4, "silu", true, { prefix: true, analytic: true, xGrad: false }));
  await checkOps(cases);
  const x = M.randn([2, 5, 4]), w = M.randn([4, 1, 4]);
  assert.throws(
    () => M.causalConv1d(x, w, null, "silu", undefined, M.randn([2, 4, 2])),
    /causalConv1d: the prefix must be f32 \(2, 4, 3\) \(B, C, K-1\), got f32 \[2, 4, 2\]/,
  );
  const wants = M.randn([2, 4, 3]).requiresGrad_(true);
  assert.throws(() => M.causalConv1d(x, w, null, "silu", undefined, wants), /the prefix requires grad/);
  M.dispose([x, w, wants]);
});

Deno.test("causalConv1d: a window that does not fit, or a wider x without one, is a clear error", () => {
  const x = M.zeros([1, 4, 6]);
  const w = M.zeros([4, 1, 3]);
  assert.throws(
    () => M.causalConv1d(x, w, null, "silu", 3),
    /channels 3\.\.7, x must be \(B, L, Cx\) with Cx >= 7/,
  );
  assert.throws(() => M.causalConv1d(x, w, null, "silu"), /x must be \(B, L, 4\), got \[1, 4, 6\]/);
  assert.throws(() => M.causalConv1d(x, w, null, "silu", -1), /channels -1/);
  x.dispose();
  w.dispose();
});

Deno.test("causalConv1d: non-f32 operands, an unknown activation, an empty kernel (K = 0) and a weight that is not (C, K) or (C, 1, K) are clear errors", () => {
  const x = M.zeros([1, 4, 4]);
  const w = M.zeros([4, 2]);
  const b = M.zeros([4]);
  const xi = M.zeros([1, 4, 4], { dtype: "i32" });
  const wi = M.zeros([4, 2], { dtype: "i32" });
  const bi = M.zeros([4], { dtype: "i32" });
  assert.throws(() => M.causalConv1d(xi, w, b), /causalConv1d: x must be f32, got i32/);
  assert.throws(() => M.causalConv1d(x, wi, b), /causalConv1d: weight must be f32, got i32/);
  assert.throws(() => M.causalConv1d(x, w, bi), /causalConv1d: bias must be f32, got i32/);
  // an unknown activation is named, not run as "none"
  assert.throws(
    () => M.causalConv1d(x, w, b, "gelu" as "silu"),
    /causalConv1d: activation must be "none" or "silu", got "gelu"/,
  );
  const w0 = M.zeros([4, 0]);
  const w01 = M.zeros([4, 1, 0]);
  assert.throws(() => M.causalConv1d(x, w0, null), /kernel size K must be at least 1, got weight \[4, 0\]/);
  assert.throws(() => M.causalConv1d(x, w01, b), /kernel size K must be at least 1, got weight \[4, 1, 0\]/);
  const w3 = M.zeros([4, 2, 1]);
  const w4 = M.zeros([4, 1, 1, 2]);
  assert.throws(() => M.causalConv1d(x, w3, null), /weight must be \(C, 1, K\) or \(C, K\), got \[4, 2, 1\]/);
  assert.throws(
    () => M.causalConv1d(x, w4, null),
    /weight must be \(C, 1, K\) or \(C, K\), got \[4, 1, 1, 2\]/,
  );
  for (const t of [x, w, b, xi, wi, bi, w0, w01, w3, w4]) t.dispose();
});

Deno.test("causalConv1d: with no rows (L = 0 or B = 0) the weight and bias gradients are zeros, not stale pool bytes", async () => {
  await setup();
  for (const shape of [[1, 0, 4], [0, 5, 4]]) {
    for (const withBias of [true, false]) {
      // Pooled buffers full of 7s: what an unwritten gradient would show.
      for (let i = 0; i < 20; i++) M.full([60], 7).dispose();
      const x = M.zeros(shape, { requiresGrad: true });
      const w = M.ones([4, 3], { requiresGrad: true });
      const b = withBias ? M.ones([4], { requiresGrad: true }) : null;
      M.tidy(() => M.causalConv1d(x, w, b, "silu").sum().backward());
      assert.deepEqual(
        [...await w.grad!.toArray()],
        new Array(12).fill(0),
        `w.grad, ${shape}, bias ${withBias}`,
      );
      if (b) assert.deepEqual([...await b.grad!.toArray()], [0, 0, 0, 0], `b.grad, ${shape}`);
      for (const t of [x, w, b]) {
        t?.grad?.dispose();
        t?.dispose();
      }
    }
  }
});
