import assert from "node:assert/strict";
import { parseTrainArgs, runTraining } from "../examples/train.ts";
import { init } from "../core/device.ts";
import { memory } from "../core/memory.ts";
import { readSafetensorsFile } from "../core/safetensors_fs.ts";
import { cosineSchedule } from "../nn/optim.ts";
import { MambaLM } from "../mamba/lm.ts";
import { fromPretrained } from "../mamba/pretrained.ts";
import { saveTrainingCheckpoint } from "../mamba/checkpoint.ts";
import { CharDataset, DEFAULT_TRAIN, type TrainConfig, Trainer } from "../mamba/train.ts";

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

async function names(dir: string): Promise<string[]> {
  return (await Array.fromAsync(Deno.readDir(dir))).map((e) => e.name).sort();
}

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

Deno.test("train: --resume writes to its own folder, and extending a run with --steps is bit-exact", async () => {
  const root = await Deno.makeTempDir();
  try {
    // Without --out, a resumed run writes to the folder it resumes.
    assert.equal(parseTrainArgs(["--resume", `${root}/a`])!.out, `${root}/a`);
    assert.equal(parseTrainArgs(["--resume", `${root}/a`, "--out", `${root}/z`])!.out, `${root}/z`);
    const run = async (args: string[], stopAfter?: number) => {
      let n = 0;
      const t = await runTraining(parseTrainArgs(args)!, {
        progress: quiet,
        shouldStop: stopAfter === undefined ? undefined : () => ++n === stopAfter,
      });
      const r = { step: t.step, lr9: t.schedule(9), config: t.config };
      t.model.dispose();
      t.dispose();
      return r;
    };
    const base = ["--batch", "4", "--seq", "32", "--d-model", "16", "--layers", "1", "--eval-every", "4"];
    // a: 6 steps, then extended to 12 at once.
    await run([...base, "--steps", "6", "--out", `${root}/a`]);
    const ra = await run(["--resume", `${root}/a`, "--steps", "12"]);
    assert.equal(ra.step, 12);
    // The schedule follows the new length: warm-up 6 (clamped to the first run's 6 steps), cosine to 12.
    const lrAt = cosineSchedule({
      warmup: 6,
      total: 12,
      maxLr: DEFAULT_TRAIN.lr,
      minLr: DEFAULT_TRAIN.lr / 10,
    });
    assert.equal(ra.lr9, lrAt(9));
    assert.ok(ra.lr9 > DEFAULT_TRAIN.lr / 10 && ra.lr9 < DEFAULT_TRAIN.lr);
    assert.equal(ra.config.steps, 12);
    // b: 6 steps, extended to 12 but interrupted after step 9, then resumed without flags.
    await run([...base, "--steps", "6", "--out", `${root}/b`]);
    assert.equal((await run(["--resume", `${root}/b`, "--steps", "12"], 3)).step, 9);
    assert.equal((await run(["--resume", `${root}/b`])).step, 12);
    assert.deepEqual(await names(root), ["a", "b"]);
    const [wa, wb] = [await weights(`${root}/a`), await weights(`${root}/b`)];
    for (const [k, t] of wa) assert.deepEqual(wb.get(k)!.data, t.data, `${k} differs`);
    const oa = (await readSafetensorsFile(`${root}/a/optimizer.safetensors`)).tensors;
    const ob = (await readSafetensorsFile(`${root}/b/optimizer.safetensors`)).tensors;
    for (const [k, t] of oa) assert.deepEqual(ob.get(k)!.data, t.data, `optimizer ${k}`);
    const la = JSON.parse(await Deno.readTextFile(`${root}/a/training_log.json`));
    const lb = JSON.parse(await Deno.readTextFile(`${root}/b/training_log.json`));
    assert.deepEqual(lb.log.train, la.log.train);
    assert.deepEqual(lb.train, la.train);
    // Fewer steps than the run has done is an error; so are flags that would change its recipe.
    await assert.rejects(
      () => run(["--resume", `${root}/a`, "--steps", "8"]),
      /--steps 8 for the run in .*\/a: steps \(8\) is below the 12 steps this run has already done/,
    );
  } finally {
    await Deno.remove(root, { recursive: true });
  }
});

Deno.test("train: Trainer checks its recipe, and evaluate frees its buffer when it fails", async () => {
  await init();
  const model = new MambaLM({ dModel: 8, nLayers: 1 }, { vocabSize: 256 });
  const text = new TextEncoder().encode("abcdefghij".repeat(10)); // 90 training bytes, 10 validation
  const data = new CharDataset(text);
  try {
    const bad = (patch: Record<string, unknown>, re: RegExp) =>
      assert.throws(() => new Trainer(model, data, { ...DEFAULT_TRAIN, ...patch } as TrainConfig), re);
    bad({ steps: 50 }, /TrainConfig.warmup \(100\) must be <= steps \(50\)/);
    bad({ logEvery: 0 }, /TrainConfig.logEvery must be an integer >= 1, got 0/);
    bad({ batch: 2.5 }, /TrainConfig.batch must be an integer >= 1, got 2.5/);
    bad({ lr: NaN }, /TrainConfig.lr must be a finite number > 0, got NaN/);
    bad({ betas: [0.9] }, /TrainConfig.betas must be two numbers in \[0, 1\), got \[0.9\]/);
    bad({ seq: undefined }, /TrainConfig.seq must be an integer >= 1, got undefined/);
    bad({ seed: "7" }, /TrainConfig.seed must be an integer in \[0, 9000000000\], got '7'/);
    const t = new Trainer(model, data, { ...DEFAULT_TRAIN, steps: 4, warmup: 2, batch: 2, seq: 16 });
    assert.throws(() => (t.config as TrainConfig).steps = 9, TypeError); // read-only: use setSteps
    assert.throws(() => t.setSteps(1), /steps \(1\) is below the run's warm-up of 2 steps/);
    assert.throws(() => t.setSteps(2.5), /steps must be an integer >= 1, got 2.5/);
    // The validation text (10 bytes) is shorter than seq + 2.
    const live = memory().liveTensors;
    await assert.rejects(() => t.evaluate(), /the val text has 10 bytes, fewer than seq \+ 2 = 18/);
    assert.equal(memory().liveTensors, live);
    t.dispose();
  } finally {
    model.dispose();
  }
});

Deno.test("train: bad flags give clear errors", () => {
  assert.throws(() => parseTrainArgs(["--steps", "x"]), /--steps must be an integer >= 1, got 'x'/);
  assert.throws(() => parseTrainArgs(["--lr", "0"]), /--lr must be a positive number, got '0'/);
  assert.throws(() => parseTrainArgs(["--bogus"]), /Unknown option '--bogus'/);
  assert.equal(parseTrainArgs(["--help"]), null);
  assert.throws(
    () => parseTrainArgs(["--resume", "runs/x", "--lr", "0.1", "--d-model", "32"]),
    /--lr, --d-model cannot be used with --resume: a resumed run keeps the recipe and model of its checkpoint/,
  );
  assert.ok(parseTrainArgs(["--resume", "runs/x", "--steps", "9", "--data", "t.txt", "--save-every", "3"]));
});
