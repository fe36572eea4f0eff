/**
 * Entry of the child `deno test` that `tests/gpu_path_test.ts` starts: it takes the adapter for a GPU before
 * anything is tuned (`isFallbackAdapter` off), sets what a GPU would run (the split over K on, the matmul
 * variant `GPU_PATH_MATMUL`, the fused scan walking chunks of 16 steps in parallel at d_state 4 and 16), then loads the
 * test files that `GPU_PATH_TESTS` names (under tests/, without `.ts`). Not a test file itself (its name has
 * no `_test`), so `deno test tests/` does not run it.
 * @module
 */
import { deviceInfo, init } from "../core/device.ts";
import { type MatmulVariant, setMatmulGpuSplit, setMatmulVariant } from "../core/ops/matmul.ts";
import { defaultFusedVariant, setFusedVariant } from "../scan/fused_variant.ts";

await init({ tune: false }); // nothing measured: the choices are set below
(deviceInfo() as { isFallbackAdapter: boolean }).isFallbackAdapter = false;
setMatmulGpuSplit(true);
setMatmulVariant((Deno.env.get("GPU_PATH_MATMUL") ?? "register") as MatmulVariant);
// chunks of 16 steps, so that the fixtures' sequences (L 24 to 64) span several chunks walked in parallel
for (const N of [4, 16]) {
  const { N: _, Ls: _s, ...v } = defaultFusedVariant(N);
  setFusedVariant(N, { ...v, Lc: 16, chunkParallel: true });
}
for (const name of (Deno.env.get("GPU_PATH_TESTS") ?? "").split(/\s+/).filter(Boolean)) {
  await import(`./${name}.ts`);
}
