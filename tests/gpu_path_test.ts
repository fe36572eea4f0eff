/**
 * The whole-model tests again on the code paths a GPU takes, on a CPU adapter: a child `deno test` takes the
 * adapter for a GPU (`tests/gpu_path_runner.ts`: `isFallbackAdapter` off before anything is tuned), so that
 * matmuls take the GPU's plans (the split over K on), reductions the GPU's chunking, x_proj no padding, and the
 * fused scan walks chunks in parallel (what the tuners picked on the H200), here chunks of 16 steps, so that
 * the fixtures' sequences span several (cutting each chunk's last step fails 16 of the register run's 59). It
 * runs the block and LM tests against PyTorch's fixtures and the model fuzz against the plain-TS reference,
 * once per matmul variant, with this adapter's bounds. The child has a `--location` of its own, so that
 * nothing it caches mixes with this adapter's own choices. (The fixtures' models are small: their products are
 * not split; `tests/mamba_test.ts` checks a layer whose products are, in this process.)
 *
 * Ignored on a hardware GPU (the default run is that path already) and on a CPU adapter without subgroups
 * (llvmpipe through GL, whose compiles of the workgroup-memory paths took the child past 10 minutes).
 * @module
 */

import assert from "node:assert/strict";
import { fileURLToPath } from "node:url";
import { deviceInfo, init } from "../core/device.ts";
import { availableMatmulVariants } from "../core/ops/matmul.ts";

const TESTS = ["mamba_test", "lm_test", "model_fuzz_test"];

await init();
// On a hardware GPU the default run takes these paths already. A CPU adapter without subgroups (llvmpipe through
// GL) compiles the kernels' workgroup-memory paths for minutes each: the child ran past 10 minutes there.
const ignore = !deviceInfo().isFallbackAdapter || !deviceInfo().subgroups;

Deno.test({
  name: "the block, LM and model-fuzz tests on the code paths a GPU takes (the adapter taken for a GPU)",
  ignore,
  fn: async () => {
    // each matmul variant this adapter runs with the block and LM tests, register (the H200's pick) with the
    // model fuzz too (about 25 s a run on lavapipe; tiled's 64x64 tiles are slow there); not tiled128, which
    // hands these tests' small products to the register kernel (matmul_test runs its own in every plan kind)
    for (const variant of availableMatmulVariants().filter((v) => v !== "tiled128")) {
      const files = variant === "register" ? TESTS : TESTS.slice(0, 2);
      const out = await new Deno.Command(Deno.execPath(), {
        args: [
          "test",
          "--no-check", // this run's own type check covered tests/
          "--allow-read",
          "--allow-write",
          "--allow-env",
          "--location",
          "http://gpu-path.mamba.test/",
          fileURLToPath(new URL("gpu_path_runner.ts", import.meta.url)),
        ],
        env: { GPU_PATH_TESTS: files.join(" "), GPU_PATH_MATMUL: variant, NO_COLOR: "1" },
        stdout: "piped",
        stderr: "piped",
        signal: AbortSignal.timeout(10 * 60_000), // a hung child fails this test, not the whole run
      }).output();
      const text = new TextDecoder().decode(out.stdout) + new TextDecoder().decode(out.stderr);
      const summary = text.match(/^(ok|FAILED) \| \d+ passed.*$/m)?.[0] ?? "no summary";
      console.log(`  GPU path, matmul ${variant}: ${files.join(", ")}: ${summary}`);
      assert.ok(
        out.success,
        `on the GPU path (matmul ${variant}), ${files.join(", ")}:\n${text.slice(-6000)}`,
      );
      // every test the files registered passed (none filtered or ignored), and there were tests
      const running = Number(/^running (\d+) tests? from/m.exec(text)?.[1] ?? 0);
      const passed = Number(/(\d+) passed/.exec(summary)?.[1] ?? 0);
      assert.ok(
        running > 0 && passed === running,
        `${passed} of ${running} tests passed:\n${text.slice(-3000)}`,
      );
    }
  },
});
