import assert from "node:assert/strict";
import { parseTrainArgs, runTraining } from "../examples/train.ts";
import { readSafetensorsFile } from "../core/safetensors_fs.ts";
import { fromPretrained } from "../mamba/pretrained.ts";
import { saveTrainingCheckpoint } from "../mamba/checkpoint.ts";

const quiet = () => {};
const small = [
  "--steps",
  "12",
  "--batch",
  "4",
  "--seq",
  "32",
  "--d-model",
  "16",
  "--layers",
  "1",
  "--eval-every",
  "4",
];

async function weights(dir: string) {
  return (await readSafetensorsFile(`${dir}/model.safetensors`)).tensors;
}

Deno.test("train: a resumed run continues exactly as an uninterrupted one (losses, weights, optimizer)", async () => {
  const root = await Deno.makeTempDir();
  try {
    const a = parseTrainArgs([...small, "--out", `${root}/a`, "--save-every", "100"])!;
    (await runTraining(a, { progress: quiet })).model.dispose();
    // The same run, interrupted after step 5 (as Ctrl-C does), then resumed.
    let steps = 0;
    const b = parseTrainArgs([...small, "--out", `${root}/b`, "--save-every", "100"])!;
    const tb = await runTraining(b, { progress: quiet, shouldStop: () => ++steps === 5 });
    assert.equal(tb.step, 5);
    tb.model.dispose();
    const r = parseTrainArgs(["--resume", `${root}/b`, "--out", `${root}/b`])!;
    const tr = await runTraining(r, { progress: quiet });
    assert.equal(tr.step, 12);
    tr.model.dispose();
    const [wa, wb] = [await weights(`${root}/a`), await weights(`${root}/b`)];
    for (const [k, t] of wa) assert.deepEqual(wb.get(k)!.data, t.data, `${k} differs after resume`);
    const la = JSON.parse(await Deno.readTextFile(`${root}/a/training_log.json`)).log;
    const lb = JSON.parse(await Deno.readTextFile(`${root}/b/training_log.json`)).log;
    assert.deepEqual(lb.train, la.train);
    assert.deepEqual(lb.val.filter(([s]: number[]) => s !== 5), la.val);
    const oa = (await readSafetensorsFile(`${root}/a/optimizer.safetensors`)).tensors;
    const ob = (await readSafetensorsFile(`${root}/b/optimizer.safetensors`)).tensors;
    for (const [k, t] of oa) assert.deepEqual(ob.get(k)!.data, t.data, `optimizer ${k}`);
    // The checkpoint is a model folder: fromPretrained reads it, with its tokenizer.
    const lm = await fromPretrained(`${root}/a`);
    assert.equal(lm.vocabSize, 256);
    assert.ok(lm.tokenizer);
    lm.dispose();
    assert.ok((await Deno.readTextFile(`${root}/a/loss.svg`)).startsWith("<svg"));
  } finally {
    await Deno.remove(root, { recursive: true });
  }
});

Deno.test("train: the loss falls, and a failed save keeps the previous checkpoint intact", async () => {
  const root = await Deno.makeTempDir();
  try {
    const a = parseTrainArgs([
      ...small,
      "--steps",
      "20",
      "--lr",
      "0.01",
      "--warmup",
      "2",
      "--out",
      `${root}/c`,
    ])!;
    const t = await runTraining(a, { progress: quiet });
    const val = t.log.val;
    assert.ok(val.at(-1)![1] < val[0][1] - 0.5, `val ${JSON.stringify(val)}`);
    const before = await Deno.readFile(`${root}/c/model.safetensors`);
    // A save into a path that cannot be created fails with a clear message and touches nothing else.
    await Deno.writeTextFile(`${root}/file`, "x");
    await assert.rejects(() => saveTrainingCheckpoint(`${root}/file/sub`, t, {}), /cannot write checkpoint/);
    assert.deepEqual(await Deno.readFile(`${root}/c/model.safetensors`), before);
    t.model.dispose();
    t.dispose();
  } finally {
    await Deno.remove(root, { recursive: true });
  }
});

Deno.test("train: bad flags give clear errors", () => {
  assert.throws(() => parseTrainArgs(["--steps", "x"]), /--steps must be an integer >= 1, got 'x'/);
  assert.throws(() => parseTrainArgs(["--lr", "0"]), /--lr must be a positive number, got '0'/);
  assert.throws(() => parseTrainArgs(["--bogus"]), /Unknown option '--bogus'/);
  assert.equal(parseTrainArgs(["--help"]), null);
});
