import assert from "node:assert/strict";
import { sum } from "../core/ops/index.ts";
import { dispose, tidy } from "../core/tensor.ts";
import { rand, randn } from "../core/creation.ts";
import { init } from "../core/device.ts";
import { memory } from "../core/memory.ts";
import { selectiveScan } from "../scan/selective_scan.ts";
import { linearScan, runScan, type ScanMode } from "../scan/linear_scan.ts";
import { assertMatchesFixture, loadFixture, tolerance, toTensor } from "./fixture_util.ts";

// mamba.py's pscan fixtures: H = pscan(A, X); dA, dX = gradients of sum(H * G). linearScan is one op: the
// policy's op bound (fixture_util.ts), 1e-5 relative to max(1, max |want|) for H and both gradients.
for (const L of [1, 17, 64, 128]) {
  for (const mode of ["sequential", "pscan"] as ScanMode[]) {
    Deno.test(`linearScan ${mode} equals mamba.py pscan fixture L=${L} (H, dA, dX)`, async () => {
      const f = await loadFixture(`pscan_L${L}.safetensors`);
      const A = toTensor(f, "A", true);
      const X = toTensor(f, "X", true);
      const G = toTensor(f, "G");
      const H = tidy(() => {
        const H = linearScan(A, X, mode);
        sum(H.mul(G)).backward();
        return H;
      });
      const op = tolerance("op");
      await assertMatchesFixture(H, f, "H", op, `${mode} L=${L}: H`);
      await assertMatchesFixture(A.grad!, f, "dA", op, `${mode} L=${L}: dA`);
      await assertMatchesFixture(X.grad!, f, "dX", op, `${mode} L=${L}: dX`);
      for (const t of [A, X, G, H, A.grad!, X.grad!]) t.dispose();
    });
  }
}

Deno.test("linearScan: shapes, dtypes and modes that do not fit are errors that name them", async () => {
  const { full, randn } = await import("../core/creation.ts");
  const [a, x, xi] = [randn([2, 5, 3]), randn([2, 4, 3]), full([2, 5, 3], 1, { dtype: "i32" })];
  assert.throws(() => linearScan(a, x), /linearScan: A \[2, 5, 3\] and X \[2, 4, 3\] must have one shape/);
  assert.throws(() => linearScan(a, xi), /linearScan: A and X must be f32, got f32, i32/);
  assert.throws(() => linearScan(a, a, "blelloch" as ScanMode), /linearScan: unknown mode 'blelloch'/);
  for (const t of [a, x, xi]) t.dispose();
});

Deno.test("runScan (exported) checks what linearScan checks; selectiveScan names a disposed input, leaves nothing live, and runs L = 0 with h0", async () => {
  await init();
  const a = rand([2, 5, 3]), x = randn([2, 4, 3]);
  assert.throws(
    () => runScan(a, x, "sequential"),
    /runScan: A \[2, 5, 3\] and X \[2, 4, 3\] must have one shape/,
  );
  assert.throws(() => runScan(a, a, "fused" as ScanMode), /runScan: unknown mode 'fused'/);
  const [B, L, ED, N] = [2, 6, 4, 3];
  const args = () => [
    randn([B, L, ED]),
    rand([B, L, ED]),
    randn([ED, N]),
    randn([B, L, N]),
    randn([B, L, N]),
    randn([ED]),
  ];
  const t = args();
  const h0 = randn([B, ED, N]);
  h0.dispose();
  const [xs, delta, A, Bm, C, D] = t;
  const gone = randn([B, L, N]);
  gone.dispose();
  const live = memory().liveTensors;
  assert.throws(
    () => selectiveScan(xs, delta, A, Bm, C, D, "pscan", h0),
    /selectiveScan: h0 must be .*got a disposed f32/,
  );
  assert.throws(() => selectiveScan(xs, delta, A, gone, C, D, "pscan"), /selectiveScan: Bm was disposed/);
  assert.equal(memory().liveTensors, live, "nothing made");
  // no steps: no state to start, nothing to scan (with h0 it failed in a narrow)
  const e = [randn([B, 0, ED]), rand([B, 0, ED]), randn([B, 0, N]), randn([B, 0, N]), randn([B, ED, N])];
  const r = selectiveScan(e[0], e[1], A, e[2], e[3], D, "sequential", e[4]);
  assert.deepEqual([r.y.shape, r.hs.shape], [[B, 0, ED], [B, 0, ED, N]]);
  dispose([a, x, xs, delta, A, Bm, C, D, ...e, r.y, r.hs]);
});
