/**
 * The whole-model tests again on the code paths a GPU takes, on a CPU adapter: a child `deno test` takes the
 * adapter for a GPU (`tests/gpu_path_runner.ts`: `isFallbackAdapter` off before anything is tuned), so that
 * matmuls take the GPU's plans (the split over K on), reductions the GPU's chunking, x_proj no padding, and
 * the fused scan walks chunks in parallel (what the tuners picked on the H200), here chunks of 16 steps, so that
 * the fixtures' sequences span several (cutting each chunk's last step fails 16 of the register run's 59). It runs the block and LM tests
 * against PyTorch's fixtures and the model fuzz against the plain-TS reference, once per matmul variant. The
 * child has a `--location` of its own, so that nothing it caches mixes with this adapter's own choices. (The
 * fixtures' models are small: their products are not split; `tests/mamba_test.ts` checks a layer whose
 * products are, in this process.)
 *
 * On a hardware GPU this is the default run already, and the test says so and does nothing.
 * @module
 */

import assert from "node:assert/strict";
import { fileURLToPath } from "node:url";
import { deviceInfo, init } from "../core/device.ts";

const TESTS = ["mamba_test", "lm_test", "model_fuzz_test"];

Deno.test("the block, LM and model-fuzz tests on the code paths a GPU takes (the adapter taken for a GPU)", async () => {
  await init();
  if (!deviceInfo().isFallbackAdapter) {
    console.log("  a hardware GPU: the default run took these paths");
    return;
  }
  // every variant with the block and LM tests, register (the H200's pick) with the model fuzz too (about 25
  // s a run; tiled's 64x64 tiles are slow on lavapipe)
  const runs: [string, string[]][] = [["register", TESTS], ["tiled", TESTS.slice(0, 2)], [
    "subgroup",
    TESTS.slice(0, 2),
  ]];
  for (const [variant, files] of runs) {
    const out = await new Deno.Command(Deno.execPath(), {
      args: [
        "test",
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
    }).output();
    const text = new TextDecoder().decode(out.stdout) + new TextDecoder().decode(out.stderr);
    const summary = text.match(/^(ok|FAILED) \| \d+ passed.*$/m)?.[0] ?? "no summary";
    console.log(`  GPU path, matmul ${variant}: ${files.join(", ")}: ${summary}`);
    assert.ok(out.success, `on the GPU path (matmul ${variant}), ${files.join(", ")}:\n${text.slice(-6000)}`);
    // every test of the files ran (a file that failed to load would leave fewer)
    const passed = Number(/(\d+) passed/.exec(summary)?.[1] ?? 0);
    assert.ok(
      passed >= (files.length === 3 ? 58 : 43),
      `only ${passed} tests ran on the GPU path:\n${text.slice(-3000)}`,
    );
  }
});
