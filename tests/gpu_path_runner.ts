/**
 * Entry of the child `deno test` that `tests/gpu_path_test.ts` starts: it takes the adapter for a GPU before
 * anything is tuned (`isFallbackAdapter` off), sets what a GPU would run (the split over K on, the matmul
 * variant `GPU_PATH_MATMUL`, the fused scan walking chunks of 16 steps in parallel at d_state 4 and 16), then
 * loads the test files that `GPU_PATH_TESTS` names (under tests/, without `.ts`). It records the adapter's own
 * kind in `MAMBA_ADAPTER_KIND` first, so that `tolerance()` keeps this adapter's bounds. Not a test file itself
 * (its name has no `_test`), so `deno test tests/` does not run it.
 * @module
 */
import { deviceInfo, init } from "../core/device.ts";
import { type MatmulVariant, setMatmulGpuSplit, setMatmulVariant } from "../core/ops/matmul.ts";
import { defaultFusedVariant, type FusedVariant, setFusedVariant } from "../scan/fused_variant.ts";

await init({ tune: false }); // nothing measured: the choices are set below
const info = deviceInfo() as { isFallbackAdapter: boolean };
Deno.env.set("MAMBA_ADAPTER_KIND", info.isFallbackAdapter ? "software" : "hardware");
// this adapter's default scan variants, taken before the flag changes (without subgroups a GPU's default has
// large workgroup arrays, which llvmpipe through GL compiles for minutes), with chunks of 16 steps walked in
// parallel, so that the fixtures' sequences (L 24 to 64) span several chunks
const variants = [4, 16].map((N): [number, Omit<FusedVariant, "N">] => {
  const { N: _, Ls: _s, ...v } = defaultFusedVariant(N);
  return [N, { ...v, Lc: 16, chunkParallel: true }];
});
info.isFallbackAdapter = false;
setMatmulGpuSplit(true);
setMatmulVariant((Deno.env.get("GPU_PATH_MATMUL") ?? "register") as MatmulVariant);
for (const [N, v] of variants) setFusedVariant(N, v);
for (const name of (Deno.env.get("GPU_PATH_TESTS") ?? "").split(/\s+/).filter(Boolean)) {
  await import(`./${name}.ts`);
}
