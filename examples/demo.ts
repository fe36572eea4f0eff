/**
 * The main job, with no arguments: trains a small character-level Mamba on Pride and Prejudice (300 steps,
 * under a minute), printing a sample before and after, saves the checkpoint and generates from it.
 *
 * ```sh
 * deno task demo            # or, on a machine with only Node: npx -y deno@2.9.6 task demo
 * ```
 * @module
 */

import { relative } from "node:path";
import { fileURLToPath } from "node:url";
import { deviceInfo, init } from "../core/device.ts";
import { ByteTokenizer } from "../mamba/tokenizer.ts";
import type { MambaLM } from "../mamba/lm.ts";
import { parseTrainArgs, runTraining } from "./train.ts";
import { simpleCommandLine, userCwd } from "./lib/cli.ts";

const PROMPT = "It is a truth universally acknowledged, that a single man";
/** The repository's runs/demo (which deno task web serves), wherever the command is typed. */
const OUT = fileURLToPath(new URL("../runs/demo", import.meta.url));
/** OUT as the user names it: relative to the folder the command was typed in. */
const SHOWN = relative(userCwd(), OUT);

const USAGE = `Usage: deno task demo

Trains a small character-level Mamba on Pride and Prejudice (300 steps, under a minute on a
2-core software adapter), prints a sample before and after, saves the checkpoint to ${SHOWN}/ and
generates from it. It takes no options: deno task train has them (steps, batch, model size, data,
output folder, resume).

  -h, --help    this text`;

simpleCommandLine(USAGE);

async function sample(lm: MambaLM, label: string, n = 200): Promise<void> {
  const tok = new ByteTokenizer();
  // Bytes that are not printable ASCII (an untrained model emits all 256) show as a middle dot.
  const show = (ids: Int32Array) =>
    String.fromCharCode(...[...ids].map((b) => (b === 10 || (b >= 32 && b < 127) ? b : 0xb7)));
  const write = (s: string) => Deno.stdout.writeSync(new TextEncoder().encode(s));
  write(`\n--- ${label} ---\n${PROMPT}`);
  const t0 = performance.now();
  await lm.generate([tok.encode(PROMPT)], n, {
    sample: true,
    temperature: 0.7,
    topK: 20,
    seed: 1,
    readEvery: 8,
    onTokens: (fresh) => write(show(fresh[0])),
  });
  write("\n");
  console.error(`(${n} characters in ${((performance.now() - t0) / 1000).toFixed(1)} s)`);
}

async function main(): Promise<void> {
  await init();
  const info = deviceInfo();
  console.log(
    `mamba.ts demo on ${info.description}${info.isFallbackAdapter ? " (a software adapter: CPU speed)" : ""}`,
  );
  // each demo replaces the last one's checkpoint
  const args = parseTrainArgs([
    "--steps",
    "300",
    "--eval-every",
    "50",
    "--save-every",
    "100",
    "--out",
    OUT,
    "--overwrite",
  ])!;
  const t0 = performance.now();
  const trainer = await runTraining(args, {
    onStart: (t) => sample(t.model, "before training (random weights)"),
  });
  const log = trainer.log;
  const secs = (performance.now() - t0) / 1000;
  const params = trainer.model.numParameters();
  console.log(
    `\ntrained ${trainer.step} steps (${params} parameters) in ${secs.toFixed(0)} s: ` +
      `validation loss ${log.val[0][1].toFixed(3)} -> ${log.val.at(-1)![1].toFixed(3)} nats/char`,
  );
  await sample(trainer.model, "after training");
  console.log(`\ncheckpoint: ${SHOWN}/ (loss curve: ${SHOWN}/loss.svg)`);
  console.log(`more text: deno task generate --model ${SHOWN} --prompt "Elizabeth" --tokens 300`);
  trainer.model.dispose();
  trainer.dispose();
}

// Errors (no WebGPU adapter on a fresh machine, a folder it cannot write) as one line, as deno task train
// and generate print them, not as an uncaught exception with a stack trace.
try {
  await main();
} catch (e) {
  console.error(`error: ${(e as Error).message}`);
  Deno.exit(1);
}
