import assert from "node:assert/strict";
import { sum } from "../core/ops/index.ts";
import { tidy } from "../core/tensor.ts";
import { linearScan, type ScanMode } from "../scan/linear_scan.ts";
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
