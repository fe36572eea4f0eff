/**
 * The subgroup-size-generic kernels at a second subgroup size. GPUs run subgroups of 8 to 64 lanes (Intel 8-32,
 * NVIDIA and Apple 32, AMD 32 or 64); lavapipe's follow its vector width: 8 lanes at its default 256 bits, 4 at
 * `LP_NATIVE_VECTOR_WIDTH=128`, 16 at 512 (CPUs with AVX-512). This runs `tests/fused_test.ts` (butterflies of
 * dB/dC, shuffled B/C rows, lanes per channel, workgroups kept whole subgroups) and the matmul test of every
 * variant (`subgroup` shares operand loads across the lanes) in a child `deno test` at another width: 16
 * lanes (512 bits) where lavapipe takes that width, else 4 (or 8 when this process runs at one of those).
 *
 * Opt-in, as it costs about 3.5 minutes with Mesa's shader cache cold (about 30 s warm): `SUBGROUP_SIZE_TESTS=1`, which
 * `.ci/run` sets on lavapipe. Where the adapter is not lavapipe the width means nothing, and the test says so.
 * @module
 */

import assert from "node:assert/strict";
import { fileURLToPath } from "node:url";
import { deviceInfo, init } from "../core/device.ts";

const enabled = Deno.env.get("SUBGROUP_SIZE_TESTS") === "1";

/** The adapter description a child process sees at vector width `bits` (lavapipe names its width there). */
async function adapterAt(bits: number): Promise<string> {
  const out = await new Deno.Command(Deno.execPath(), {
    args: ["eval", "console.log((await navigator.gpu.requestAdapter())?.info.description ?? 'none')"],
    env: { LP_NATIVE_VECTOR_WIDTH: String(bits) },
    stdout: "piped",
    stderr: "piped",
  }).output();
  return new TextDecoder().decode(out.stdout).trim();
}

Deno.test({
  name: "the fused scan's and matmul's subgroup kernels at a second subgroup size (lavapipe's 4 or 16 lanes)",
  ignore: !enabled,
  fn: async () => {
    await init();
    const here = deviceInfo().description;
    assert.match(
      here,
      /^llvmpipe .*\d+ bits\)$/,
      `SUBGROUP_SIZE_TESTS needs lavapipe (llvmpipe through Vulkan), whose subgroup size follows ` +
        `LP_NATIVE_VECTOR_WIDTH; this adapter is '${here}'`,
    );
    // another width than this process's: 512 bits (16 lanes) where lavapipe takes it, else 128 (4 lanes), else
    // 256 (8, when this process already runs at one of the others)
    const current = Number(/(\d+) bits\)$/.exec(here)![1]);
    let bits = 0;
    for (const b of [512, 128, 256].filter((b) => b !== current)) {
      if ((await adapterAt(b)).includes(`${b} bits`)) {
        bits = b;
        break;
      }
    }
    assert.ok(
      bits > 0,
      `lavapipe took none of LP_NATIVE_VECTOR_WIDTH 512, 128, 256 (this process: ${current})`,
    );
    const run = async (args: string[]) => {
      const out = await new Deno.Command(Deno.execPath(), {
        args: ["test", "--allow-read", "--allow-write", "--allow-env", ...args],
        env: { LP_NATIVE_VECTOR_WIDTH: String(bits), NO_COLOR: "1" },
        stdout: "piped",
        stderr: "piped",
      }).output();
      const text = new TextDecoder().decode(out.stdout) + new TextDecoder().decode(out.stderr);
      const summary = text.match(/^(ok|FAILED) \| \d+ passed.*$/m)?.[0] ?? "no summary";
      console.log(
        `  ${bits} bits (subgroups of ${bits / 32}): ${args.at(-1)!.split("/").at(-1)}: ${summary}`,
      );
      assert.ok(out.success, `at ${bits} bits, ${args.join(" ")}:\n${text.slice(-6000)}`);
    };
    const file = (name: string) => fileURLToPath(new URL(name, import.meta.url));
    await run([file("fused_test.ts")]);
    await run(["--filter", "every layout and variant", file("matmul_test.ts")]);
  },
});
