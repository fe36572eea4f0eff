// deno task tune: its flag and its printed lines (the measuring itself is tuneKernels' and tuneFusedScan's,
// tested in matmul_test and fused_test).
import assert from "node:assert/strict";
import { fusedLines, matmulLines, parseStateSizes } from "../examples/tune.ts";
import type { TuneResult } from "../core/tune.ts";
import type { FusedTuneResult } from "../scan/tune_fused.ts";

Deno.test("deno task tune: --d-state takes a comma-separated list of state sizes, each once", () => {
  assert.deepEqual(parseStateSizes(undefined), [16]);
  assert.deepEqual(parseStateSizes("16,64, 16"), [16, 64]);
  for (const bad of ["", "0", "16,", "x", "1.5", "-4", "70000"]) {
    assert.throws(
      () => parseStateSizes(bad),
      /--d-state must be integers from 1 to 65536, comma-separated/,
      bad,
    );
  }
});

Deno.test("deno task tune: prints each choice, its confidence and the spreads, fastest first", () => {
  const matmul = {
    variant: "subgroup",
    gflops: { register: 17.7, subgroup: 39.7 },
    spread: { register: 0.054, subgroup: Infinity },
    confident: false,
    gpuSplit: null,
    matvec: true,
  } as unknown as TuneResult;
  assert.deepEqual(matmulLines(matmul), [
    "matmul: subgroup (not confident: measured again at the next start)",
    "  subgroup     39.7 GFLOP/s  spread -",
    "  register     17.7 GFLOP/s  spread 5.4%",
    "  GPU split not measured, matvec on",
  ]);
  const fused = {
    variant: { N: 16, Lc: 64 },
    timings: { b: 14.2, a: 13.8, c: 15.6, d: 20 },
    spread: { a: 0.05 },
    confident: true,
  } as unknown as FusedTuneResult;
  assert.deepEqual(fusedLines(16, fused), [
    'fused scan, d_state 16: {"N":16,"Lc":64} (confident)',
    "  13.800 ms  spread 5.0%  a",
    "  14.200 ms  spread -  b",
    "  15.600 ms  spread -  c",
  ]);
  const only = { ...fused, timings: {} } as FusedTuneResult;
  assert.equal(fusedLines(4, only)[0], 'fused scan, d_state 4: {"N":16,"Lc":64} (the only candidate here)');
});
