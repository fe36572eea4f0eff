/**
 * Renders docs/loss_vs_pytorch.svg, the README's loss chart: a mamba.ts run of mamba.py's char recipe
 * (train and validation loss, from the `training_log.json` of its checkpoint; default
 * docs/char_training_log.json, the run the README shows) beside PyTorch mamba.py's validation loss for the
 * same recipe (tests/fixtures/char-mamba/training_log.json, written by the fixture generator).
 *
 * ```sh
 * deno run -A examples/loss_vs_pytorch.ts [runs/<folder>/training_log.json or loss.json]
 * ```
 * @module
 */

import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { writeFileAtomic } from "../core/safetensors_fs.ts";
import type { TrainLog } from "../mamba/train.ts";
import { simpleCommandLine } from "./lib/cli.ts";
import { lossChartSVG } from "./lib/loss_chart.ts";

const ROOT = fileURLToPath(new URL("../", import.meta.url));

const USAGE = `Usage: deno run -A examples/loss_vs_pytorch.ts [training_log.json | loss.json]

Draws a mamba.ts run's train and validation loss (the training_log.json or loss.json of its checkpoint
folder; default docs/char_training_log.json) beside PyTorch mamba.py's validation loss for the same recipe
(tests/fixtures/char-mamba/training_log.json) into docs/loss_vs_pytorch.svg.

  -h, --help    this text`;

const logPath = simpleCommandLine(USAGE, [], "log").positional;

const oursPath = logPath ?? join(ROOT, "docs", "char_training_log.json");
let ours: { log: TrainLog };
try {
  const json = JSON.parse(await Deno.readTextFile(oursPath));
  ours = Array.isArray(json?.train) ? { log: json } : json; // a loss.json is the log itself
  if (!Array.isArray(ours?.log?.train) || !Array.isArray(ours.log.val)) {
    throw new Error("no log.train and log.val (training_log.json) nor train and val (loss.json)");
  }
} catch (e) {
  console.error(`error: ${oursPath} is not a training log: ${(e as Error).message}\n\n${USAGE}`);
  Deno.exit(2);
}
const pytorch = JSON.parse(
  await Deno.readTextFile(join(ROOT, "tests", "fixtures", "char-mamba", "training_log.json")),
) as { log: { val: [number, number][] } };
const svg = await lossChartSVG(
  ours.log,
  [{ name: "validation (PyTorch mamba.py)", points: pytorch.log.val }],
  "char model, mamba.py recipe: mamba.ts vs PyTorch",
);
const out = join(ROOT, "docs", "loss_vs_pytorch.svg");
await writeFileAtomic(out, svg);
console.log(`${out}: ${svg.length} bytes`);
