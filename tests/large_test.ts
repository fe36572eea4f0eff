/**
 * Sizes where WebGPU limits bite: more workgroups than one dispatch dimension allows (65535 x 256
 * elements), and tensors larger than one 128 MiB storage binding (read and written through two windows).
 * Values are small integers or halves, so every expected value is exact; only small slices are read back.
 */
import assert from "node:assert/strict";
import * as M from "./library.ts";
import { dispose, noGrad, tensor } from "../mod.ts";
import { readAll, setup } from "./helpers.ts";

await setup();

Deno.test("elementwise and sum over 16.8M elements (more than 65535 workgroups per dimension)", async () => {
  const N = 16_800_000; // > 65535 * 256 = 16_776_960
  assert.ok(N > 65535 * 256);
  // x[i] = 1 where i % 7 is 0 or 3, else 0: a broadcast fill over N elements.
  const pattern = [1, 0, 0, 1, 0, 0, 0];
  const x = M.add(M.zeros([N / 7, 1]), tensor(pattern, [1, 7])).reshape(N);
  const y = M.mul(x, 2).sub(0.5); // 1.5 or -0.5
  const total = y.sum(); // 2.4M * (2 * 1.5 - 5 * 0.5) = 1.2M; every partial sum is a multiple of 0.5 below 2^23
  const starts = [0, 65535 * 256 - 3, N - 7];
  const slices = starts.map((s) => y.narrow(0, s, 7));
  const [t, ...got] = await readAll([total, ...slices]);
  assert.equal(t[0], (N / 7) * (2 * 1.5 - 5 * 0.5), "sum over 16.8M elements");
  starts.forEach((s, k) => {
    const expected = Array.from({ length: 7 }, (_, j) => (pattern[(s + j) % 7] ? 1.5 : -0.5));
    assert.deepEqual([...got[k]], expected, `y[${s}..${s + 7})`);
  });
  dispose([x, y, total, slices]);
});

Deno.test("tensors larger than one 128 MiB binding: fill, elementwise, indexSelect, reductions, gradient", async () => {
  const V = 50280, D = 768; // 38.6M f32 = 154 MB: two binding windows
  const window = 134217728 / 4; // elements per 128 MiB window
  assert.ok(V * D * 4 > 134217728);
  // x[r, c] = 256 r + c % 256: exact in f32 (below 2^24), and tells rows and columns apart.
  const value = (r: number, c: number) => 256 * r + (c % 256);
  const rows = tensor(Float32Array.from({ length: V }, (_, r) => 256 * r), [V, 1]);
  const cols = tensor(Float32Array.from({ length: D }, (_, c) => c % 256), [1, D]);
  const x = M.add(rows, cols); // a broadcast fill writing both windows
  const y = M.mul(x, -0.5); // an elementwise op reading and writing both windows (exact: halves)
  const filled = M.full([V, D], 3.25);
  // Row 43690 straddles the window boundary (element 33554432 is its column 512); 43691+ lie beyond it.
  const picks = [0, 1, 43690, 43691, 50279, 43691];
  const sel = M.indexSelect(y, 0, tensor(Int32Array.from(picks)));
  const flat = y.reshape(V * D);
  const boundary = flat.narrow(0, window - 5, 10);
  const tail = filled.reshape(V * D).narrow(0, V * D - 3, 3);
  const colMax = M.max(x, 0); // reduces 50280 rows (several passes) down the windows
  const rowMax = M.max(x, 1);
  const rowMaxPicks = rowMax.narrow(0, 43688, 4);
  const got = await readAll([sel, boundary, tail, colMax, rowMaxPicks]);
  const [gSel, gBoundary, gTail, gColMax, gRowMax] = got;
  picks.forEach((r, k) => {
    for (let c = 0; c < D; c++) {
      const v = gSel[k * D + c];
      if (v !== -0.5 * value(r, c)) {
        assert.fail(`indexSelect row ${r} col ${c}: ${v}, expected ${-0.5 * value(r, c)}`);
      }
    }
  });
  const at = (i: number) => -0.5 * value(Math.floor(i / D), i % D);
  assert.deepEqual(
    [...gBoundary],
    Array.from({ length: 10 }, (_, j) => at(window - 5 + j)),
    "across the boundary",
  );
  assert.deepEqual([...gTail], [3.25, 3.25, 3.25], "the last elements of a filled 154 MB tensor");
  assert.deepEqual([...gColMax], Array.from({ length: D }, (_, c) => value(V - 1, c)), "max over 50280 rows");
  assert.deepEqual([...gRowMax], [43688, 43689, 43690, 43691].map((r) => value(r, 255)), "row maxima");
  dispose([rows, cols, y, filled, sel, flat, boundary, tail, colMax, rowMax, rowMaxPicks]);

  // The gradient of an embedding lookup into the 154 MB table: written through both windows.
  const table = x.detach().requiresGrad_();
  const g = tensor(Float32Array.from({ length: picks.length * D }, (_, i) => (i % 5) - 2), [picks.length, D]);
  const out = M.indexSelect(table, 0, tensor(Int32Array.from(picks)));
  out.backward(g);
  const check = [43691, 43690, 50279, 2];
  const gradRows = noGrad(() => M.indexSelect(table.grad!, 0, tensor(Int32Array.from(check))));
  const gr = await gradRows.toArray();
  check.forEach((r, k) => {
    for (let c = 0; c < D; c++) {
      let e = 0;
      picks.forEach((p, j) => (e += p === r ? (j * D + c) % 5 - 2 : 0));
      if (gr[k * D + c] !== e) assert.fail(`grad row ${r} col ${c}: ${gr[k * D + c]}, expected ${e}`);
    }
  });
  dispose([x, table, table.grad, g, out, gradRows]);
});

Deno.test("i32 tensors larger than one binding: exact linear indices through both windows", async () => {
  const V = 50280, D = 768;
  const r = tensor(Int32Array.from({ length: V }, (_, i) => i), [V, 1]);
  const c = tensor(Int32Array.from({ length: D }, (_, i) => i), [1, D]);
  const lin = M.add(M.mul(r, D), c); // lin[r, c] = r * 768 + c, an i32 tensor of 154 MB
  const picks = [43690, 50279, 3, 43691];
  const sel = M.indexSelect(lin, 0, tensor(Int32Array.from(picks)));
  const got = await sel.toArray();
  assert.ok(got instanceof Int32Array);
  picks.forEach((p, k) => {
    for (let j = 0; j < D; j++) {
      if (got[k * D + j] !== p * D + j) {
        assert.fail(`row ${p} col ${j}: ${got[k * D + j]}, expected ${p * D + j}`);
      }
    }
  });
  dispose([r, c, lin, sel]);
});
