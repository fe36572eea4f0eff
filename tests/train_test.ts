import assert from "node:assert/strict";
import { FINE_TUNE_LR, FINE_TUNE_WARMUP, parseTrainArgs, runTraining } from "../examples/train.ts";
import { UsageError, userPath } from "../examples/lib/cli.ts";
import { init } from "../core/device.ts";
import { upload } from "../core/executor.ts";
import { memory } from "../core/memory.ts";
import { parseSafetensors } from "../core/safetensors.ts";
import { readSafetensorsFile } from "../core/safetensors_fs.ts";
import { cosineSchedule } from "../nn/optim.ts";
import { MambaLM } from "../mamba/lm.ts";
import { fromPretrained, saveCheckpoint } from "../mamba/pretrained.ts";
import {
  checkCheckpointFolder,
  loadTrainingCheckpoint,
  saveTrainingCheckpoint,
} from "../mamba/checkpoint.ts";
import {
  CharDataset,
  dataFingerprint,
  DEFAULT_TRAIN,
  TokenDataset,
  type TrainConfig,
  Trainer,
} from "../mamba/train.ts";
import { manualSeed, Philox } from "../core/random.ts";
import { ByteTokenizer, HubTokenizer } from "../mamba/tokenizer.ts";
import { fixturePath } from "./fixture_util.ts";
import { assertClose, underRisingCaps } from "./helpers.ts";
import type { Tensor } from "../core/tensor.ts";

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

/** Runs `deno task train` with `args` quietly (stopped after `stopAfter` steps if given) and returns what
 * `read` takes from its trainer before the run is freed. */
async function trainRun<R>(args: string[], read: (t: Trainer) => R, stopAfter?: number): Promise<R> {
  let n = 0;
  const t = await runTraining(parseTrainArgs(args)!, {
    progress: quiet,
    shouldStop: stopAfter === undefined ? undefined : (stepped) => stepped && ++n === stopAfter,
  });
  try {
    return read(t);
  } finally {
    t.model.dispose();
    t.dispose();
  }
}

async function weights(dir: string) {
  return (await readSafetensorsFile(`${dir}/model.safetensors`)).tensors;
}

Deno.test("DEFAULT_TRAIN is the recipe of the PyTorch char-mamba run (char-mamba/training_log.json)", async () => {
  const { train: t } = JSON.parse(await Deno.readTextFile(fixturePath("char-mamba/training_log.json")));
  const want: TrainConfig = {
    steps: t.steps,
    batch: t.batch,
    seq: t.seq_len,
    lr: t.lr,
    minLr: t.min_lr,
    warmup: t.warmup,
    weightDecay: t.weight_decay,
    betas: t.betas,
    clip: t.grad_clip,
    seed: t.seed,
    evalEvery: t.eval_every,
    evalBatches: t.eval_batches,
    logEvery: t.log_every,
  };
  assert.deepEqual(DEFAULT_TRAIN, want);
  // The recipe's other keys: val_frac is CharDataset's default split (below); threads is PyTorch's CPU thread
  // count. A key added to the recipe fails here until it is matched.
  const mapped = [
    "steps",
    "batch",
    "seq_len",
    "lr",
    "min_lr",
    "warmup",
    "weight_decay",
    "betas",
    "grad_clip",
    "seed",
    "eval_every",
    "eval_batches",
    "log_every",
  ];
  assert.deepEqual(Object.keys(t).sort(), [...mapped, "val_frac", "threads"].sort());
  const data = new CharDataset(new Uint8Array(1000));
  assert.equal(data.val.length, Math.round(1000 * t.val_frac));
});

Deno.test("train: a resumed run continues exactly as an uninterrupted one (losses, weights, optimizer); --recompute input trains to the same weights", async () => {
  const root = await Deno.makeTempDir();
  try {
    const a = parseTrainArgs([...small, "--out", `${root}/a`, "--save-every", "100"])!;
    (await runTraining(a, { progress: quiet })).model.dispose();
    // The same run, interrupted after step 5 (as Ctrl-C does), then resumed.
    let steps = 0;
    const b = parseTrainArgs([...small, "--out", `${root}/b`, "--save-every", "100"])!;
    const tb = await runTraining(b, { progress: quiet, shouldStop: (stepped) => stepped && ++steps === 5 });
    assert.equal(tb.step, 5);
    tb.model.dispose();
    // The checkpoint holds the seconds up to step 5 (there was no readback yet), which the resume adds to.
    const time5 = JSON.parse(await Deno.readTextFile(`${root}/b/training_log.json`)).log.time;
    assert.equal(time5.at(-1)?.[0], 5, `time ${JSON.stringify(time5)}`);
    const r = parseTrainArgs(["--resume", `${root}/b`, "--out", `${root}/b`])!;
    const tr = await runTraining(r, { progress: quiet });
    assert.equal(tr.step, 12);
    assert.ok(tr.log.time.at(-1)![1] > time5.at(-1)[1], "the resumed run's seconds add to those saved");
    tr.model.dispose();
    const [wa, wb] = [await weights(`${root}/a`), await weights(`${root}/b`)];
    for (const [k, t] of wa) assert.deepEqual(wb.get(k)!.data, t.data, `${k} differs after resume`);
    // --recompute input: the same gradients bit for bit (the block input alone kept), so the same weights
    const c = parseTrainArgs([
      ...small,
      "--out",
      `${root}/c`,
      "--save-every",
      "100",
      "--recompute",
      "input",
    ])!;
    const tc = await runTraining(c, { progress: quiet });
    assert.equal(tc.model.config.recompute, "input");
    tc.model.dispose();
    const wc = await weights(`${root}/c`);
    for (const [k, t] of wa) assert.deepEqual(wc.get(k)!.data, t.data, `${k} differs with --recompute input`);
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

/** Every file under `dir` (relative path -> bytes). */
async function snapshot(dir: string, at = ""): Promise<Map<string, Uint8Array>> {
  const out = new Map<string, Uint8Array>();
  for await (const e of Deno.readDir(`${dir}${at}`)) {
    const rel = `${at}/${e.name}`;
    if (e.isDirectory) { for (const [k, v] of await snapshot(dir, rel)) out.set(k, v); }
    else out.set(rel, await Deno.readFile(`${dir}${rel}`));
  }
  return out;
}

async function copyDir(from: string, to: string): Promise<void> {
  await Deno.mkdir(to, { recursive: true });
  for await (const e of Deno.readDir(from)) {
    if (e.isDirectory) await copyDir(`${from}/${e.name}`, `${to}/${e.name}`);
    else await Deno.copyFile(`${from}/${e.name}`, `${to}/${e.name}`);
  }
}

async function names(dir: string): Promise<string[]> {
  return (await Array.fromAsync(Deno.readDir(dir))).map((e) => e.name).sort();
}

type Fs = { rename: typeof Deno.rename; remove: typeof Deno.remove };

/**
 * Runs `f` with Deno.rename and Deno.remove replaced: `hook` sees each call that is not inside a temporary
 * folder (index from 1, name, paths) and may throw to make it fail instead of running. Returns the number
 * of calls it saw.
 */
async function withFsHook(
  hook: (n: number, op: string, args: string[]) => void,
  f: () => Promise<void>,
): Promise<number> {
  const fs = Deno as unknown as Fs;
  const { rename, remove } = fs;
  let n = 0;
  const inTmp = /\.mambats-tmp-[0-9a-f]{8}[\\/]/;
  const hooked = <T>(op: string, args: string[], run: () => Promise<T>): Promise<T> => {
    if (inTmp.test(args[0])) return run(); // writing the new folder: its files' own renames
    try {
      hook(++n, op, args);
    } catch (e) {
      return Promise.reject(e);
    }
    return run();
  };
  fs.rename = (a, b) => hooked("rename", [String(a), String(b)], () => rename(a, b));
  fs.remove = (a, o) => hooked("remove", [String(a)], () => remove(a, o));
  try {
    await f();
  } finally {
    fs.rename = rename;
    fs.remove = remove;
  }
  return n;
}

Deno.test("train: the loss falls, and a save that fails after writing its new folder keeps the old one", async () => {
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
    const before = await snapshot(`${root}/c`);
    assert.ok(before.has("/loss.svg") && before.has("/loss.json"), "the loss chart is in the checkpoint");
    await t.trainStep(); // the save below would write different weights
    // The new folder is complete; putting it in place fails.
    let failed = false;
    await withFsHook((_, op, [from, to]) => {
      if (op === "rename" && to === `${root}/c` && from.includes(".mambats-tmp-")) {
        failed = true;
        throw new Error("injected: no space left");
      }
    }, async () => {
      await assert.rejects(
        () => saveTrainingCheckpoint(t, `${root}/c`, {}),
        /cannot write checkpoint .*\/c: injected: no space left/,
      );
    });
    assert.ok(failed, "the save reached the rename of its new folder");
    assert.deepEqual(await names(root), ["c"], "no .prev or temporary folder left");
    assert.deepEqual(await snapshot(`${root}/c`), before);
    // the same checkpoint through a path with `..` and `.`, into a folder that does not exist yet
    await saveTrainingCheckpoint(t, `${root}/x/../c2/./`, {});
    assert.deepEqual(await names(root), ["c", "c2"]);
    await Deno.remove(`${root}/c2`, { recursive: true });
    const back = await loadTrainingCheckpoint(`${root}/c`, t.data);
    assert.equal(back.step, 20);
    // config.json (HF layout) has no padding_idx: the resumed run keeps mamba.py's padding row 0.
    assert.equal(t.model.embedding.paddingIdx, 0);
    assert.equal(back.model.embedding.paddingIdx, 0, "the resumed model keeps the run's padding row");
    back.model.dispose();
    back.dispose();
    t.model.dispose();
    t.dispose();
  } finally {
    await Deno.remove(root, { recursive: true });
  }
});

Deno.test("train: a save interrupted at any point leaves a loadable checkpoint; the next one cleans up", async () => {
  const root = await Deno.makeTempDir();
  try {
    const t = await runTraining(parseTrainArgs([...small, "--steps", "3", "--out", `${root}/tpl`])!, {
      progress: quiet,
    });
    await t.trainStep(); // step 4: what the saves below write
    const tok = { type: "test" };
    // An orphan of an earlier interrupted save: a partial temporary folder.
    const orphan = async (at: string) => {
      await Deno.mkdir(`${at}.mambats-tmp-0123abcd`);
      await Deno.writeTextFile(`${at}.mambats-tmp-0123abcd/config.json.tmp-89abcdef`, "{");
    };
    const states: Record<string, (at: string) => Promise<void>> = {
      "a checkpoint": (at) => copyDir(`${root}/tpl`, at),
      "only .prev (and an orphan)": async (at) => {
        await copyDir(`${root}/tpl`, `${at}.prev`);
        await orphan(at);
      },
      "a checkpoint and a stale .prev": async (at) => {
        await copyDir(`${root}/tpl`, at);
        await copyDir(`${root}/tpl`, `${at}.prev`);
      },
    };
    for (const [what, make] of Object.entries(states)) {
      const ops: string[] = [];
      await (async () => {
        const dir = `${root}/count/c`;
        await Deno.mkdir(`${root}/count`);
        await make(dir);
        await withFsHook((_, op) => ops.push(op), () => saveTrainingCheckpoint(t, dir, tok));
        assert.deepEqual(await names(`${root}/count`), ["c"], `${what}: a save leaves the folder alone`);
        await Deno.remove(`${root}/count`, { recursive: true });
      })();
      const calls = ops.length;
      // A crash at call k: calls before it ran, none from it on. Where call k removes a folder, also a removal
      // cut short: its training_log.json gone, the rest left (a crash inside a recursive remove).
      const cases = ops.flatMap((op, i) =>
        op === "remove" ? [[i + 1, false], [i + 1, true]] : [[i + 1, false]]
      );
      for (const [k, halfRemoved] of cases as [number, boolean][]) {
        const at = `${root}/k${k}${halfRemoved ? "h" : ""}`;
        const dir = `${at}/c`;
        await Deno.mkdir(at);
        await make(dir);
        await withFsHook((n, _op, args) => {
          if (n === k && halfRemoved) Deno.removeSync(`${args[0]}/training_log.json`);
          if (n >= k) throw new Error("injected crash");
        }, () => saveTrainingCheckpoint(t, dir, tok).catch(() => {}));
        const where = `${what}, crash at fs call ${k} of ${calls}${halfRemoved ? " (half removed)" : ""}`;
        const back = await loadTrainingCheckpoint(dir, t.data).catch((e) => {
          throw new Error(
            `${where}: ${(e as Error).message} (left: ${[...Deno.readDirSync(at)].map((e) => e.name)})`,
          );
        });
        assert.ok(back.step === 3 || back.step === 4, `${where}: step ${back.step}`);
        back.model.dispose();
        back.dispose();
        await saveTrainingCheckpoint(t, dir, tok);
        assert.deepEqual(await names(at), ["c"], `${where}: the next save leaves only the checkpoint`);
        const state = JSON.parse(await Deno.readTextFile(`${dir}/training_log.json`));
        assert.equal(state.step, 4, where);
        await Deno.remove(at, { recursive: true });
      }
    }
    t.model.dispose();
    t.dispose();
  } finally {
    await Deno.remove(root, { recursive: true });
  }
});

Deno.test("train: a save refuses to replace a folder that is not its checkpoint, and deletes nothing", async () => {
  await init();
  const root = await Deno.makeTempDir();
  const text = new TextEncoder().encode("It is a truth universally acknowledged. ".repeat(40));
  const cfg: TrainConfig = { ...DEFAULT_TRAIN, steps: 2, warmup: 1, batch: 2, seq: 16, evalBatches: 1 };
  const model = new MambaLM({ dModel: 8, nLayers: 1 }, { vocabSize: 256 });
  const t = new Trainer(model, new CharDataset(text), cfg);
  try {
    await t.trainStep();
    const foreign = `${root}/mine`;
    await Deno.mkdir(foreign);
    await Deno.writeTextFile(`${foreign}/precious.txt`, "user data");
    await assert.rejects(
      () => saveTrainingCheckpoint(t, foreign, {}),
      /cannot write checkpoint .*\/mine: refusing to replace .*\/mine: it is not a training checkpoint \(no training_log\.json\) and holds precious\.txt/,
    );
    assert.equal(await Deno.readTextFile(`${foreign}/precious.txt`), "user data");
    assert.deepEqual(await names(root), ["mine"], "nothing written next to it");
    // The command line stops before training.
    await assert.rejects(
      () => runTraining(parseTrainArgs([...small, "--out", foreign])!, { progress: quiet }),
      /refusing to replace .*\/mine: it is not a training checkpoint/,
    );
    // A file, not a folder.
    await assert.rejects(() => saveTrainingCheckpoint(t, `${foreign}/precious.txt`, {}), /it is a file/);
    // Folders named as a save's leftovers (<dir>.mambats-tmp-*, <dir>.mambats-del-*) holding what no save
    // writes are left.
    const fresh = `${root}/fresh`;
    for (const left of [`${fresh}.mambats-tmp-0123abcd`, `${fresh}.mambats-del-0123abcd`]) {
      await Deno.mkdir(left);
      await Deno.writeTextFile(`${left}/precious.txt`, "user data");
    }
    await saveTrainingCheckpoint(t, fresh, {});
    for (const left of [`${fresh}.mambats-tmp-0123abcd`, `${fresh}.mambats-del-0123abcd`]) {
      assert.equal(await Deno.readTextFile(`${left}/precious.txt`), "user data", left);
      await Deno.remove(left, { recursive: true });
    }
    // A user's own folders named <dir>.tmp-<8 digits> or .del-<8 digits> (a date is 8 hex digits): not a save's,
    // whatever they hold (a model saved there, a copy of the checkpoint, nothing yet).
    const mine = [`${fresh}.tmp-20250101`, `${fresh}.del-20250101`, `${fresh}.tmp-20250102`];
    await saveCheckpoint(model, mine[0], null);
    await copyDir(fresh, mine[1]);
    await Deno.mkdir(mine[2]);
    await saveTrainingCheckpoint(t, fresh, {});
    assert.deepEqual(
      await names(root),
      ["fresh", ...mine.map((d) => d.slice(root.length + 1)), "mine"].sort(),
    );
    for (const d of mine) await Deno.remove(d, { recursive: true });
    await Deno.remove(fresh, { recursive: true });
    // A checkpoint that also holds a file its save did not write.
    const ck = `${root}/ck`;
    await saveTrainingCheckpoint(t, ck, {}, { files: { "notes.md": "x" } });
    await Deno.writeTextFile(`${ck}/samples.txt`, "kept");
    await assert.rejects(
      () => saveTrainingCheckpoint(t, ck, {}),
      /holds files the checkpoint does not: samples\.txt/,
    );
    assert.equal(await Deno.readTextFile(`${ck}/samples.txt`), "kept");
    await Deno.remove(`${ck}/samples.txt`);
    await saveTrainingCheckpoint(t, ck, {}); // notes.md was ours: replaced
    assert.deepEqual(await names(ck), [
      "config.json",
      "model.safetensors",
      "optimizer.safetensors",
      "tokenizer.json",
      "training_log.json",
    ]);
    // A foreign folder where the save keeps the previous checkpoint.
    await Deno.mkdir(`${ck}.prev`);
    await Deno.writeTextFile(`${ck}.prev/x.txt`, "x");
    await assert.rejects(
      () => saveTrainingCheckpoint(t, ck, {}),
      /refusing to replace .*ck\.prev \(the folder a save keeps the previous checkpoint in\): it is not a training/,
    );
    assert.equal(await Deno.readTextFile(`${ck}.prev/x.txt`), "x");
    // An empty folder holds nothing to lose.
    await Deno.mkdir(`${root}/empty`);
    await saveTrainingCheckpoint(t, `${root}/empty/`, {});
    assert.ok((await names(`${root}/empty`)).includes("training_log.json"));
    await assert.rejects(
      () => saveTrainingCheckpoint(t, `${root}/e2`, {}, { files: { "model.safetensors": "x" } }),
      /options.files: 'model.safetensors' must be a plain file name/,
    );
  } finally {
    model.dispose();
    t.dispose();
    await Deno.remove(root, { recursive: true });
  }
});

Deno.test("train: an --out it cannot write in fails before the first step, not at the first save", async () => {
  const root = await Deno.makeTempDir();
  // A folder it may not write in (tests may run as root, whom permissions do not stop): mkdir fails there.
  const fs = Deno as unknown as { mkdir: typeof Deno.mkdir };
  const { mkdir } = fs;
  fs.mkdir = (p, o) =>
    String(p).startsWith(`${root}/ro/`)
      ? Promise.reject(new Deno.errors.PermissionDenied(`injected: permission denied, mkdir '${p}'`))
      : mkdir(p, o);
  try {
    await Deno.mkdir(`${root}/ro`);
    const denied = /cannot write checkpoint .*\/ro\/(sub\/)?run: injected: permission denied/;
    for (const out of [`${root}/ro/run`, `${root}/ro/sub/run`]) {
      let started = false;
      await assert.rejects(
        () =>
          runTraining(parseTrainArgs([...small, "--out", out])!, {
            progress: quiet,
            onStart: () => Promise.resolve(void (started = true)),
          }),
        denied,
      );
      assert.ok(!started, `${out}: no training before the refusal`);
    }
    await checkCheckpointFolder(`${root}/w/sub/run`); // a folder it may write in: nothing left behind
    // `..` and `.` after folders that do not exist yet: resolved as paths (a raw NotFound from remove, and a
    // stray probe folder, before)
    await checkCheckpointFolder(`${root}/new/../run`);
    await checkCheckpointFolder(`${root}/new/./run/`);
    assert.deepEqual(await names(root), ["ro"]);
  } finally {
    fs.mkdir = mkdir;
    await Deno.remove(root, { recursive: true });
  }
});

Deno.test("train: a new run refuses an --out holding another run's checkpoint unless --overwrite; stopped before its first step it saves nothing; a stale validation loss shows its step", async () => {
  const root = await Deno.makeTempDir();
  try {
    const lines: string[] = [];
    const progress = (line: string) => lines.push(line);
    const step = async (dir: string) =>
      JSON.parse(await Deno.readTextFile(`${dir}/training_log.json`)).step as number;
    const run = async (args: string[], stopAfter?: number) => {
      let n = 0;
      const t = await runTraining(parseTrainArgs([...small, ...args])!, {
        progress,
        shouldStop: stopAfter === undefined ? undefined : (stepped) => (stepped ? ++n : 0) === stopAfter,
      });
      t.model.dispose();
      t.dispose();
    };
    // stopped after step 1 of evaluations every 4: the validation loss shown is step 0's, marked so
    await run(["--steps", "2", "--out", `${root}/a`], 1);
    assert.match(lines.at(-2)!, /^step 1\/2 {2}loss \S+ {2}val \d+\.\d{4} @0 /);
    assert.match(lines.at(-1)!, /^done: step 1, val \d+\.\d{4} @0, checkpoint in .*\/a$/);
    await run(["--steps", "4", "--out", `${root}/b`]);
    assert.match(lines.at(-1)!, /^done: step 4, val \d+\.\d{4}, checkpoint/, "measured at the step shown");
    // a new run into a's folder is refused, naming it and its step; --resume continues it
    const live = memory().liveBytes;
    await assert.rejects(
      () => run(["--steps", "2", "--out", `${root}/a`]),
      (e) =>
        e instanceof UsageError &&
        e.message === `--out ${root}/a holds the checkpoint of another run (at step 1): pass --resume ` +
            `${root}/a to continue it, another --out, or --overwrite to replace it`,
    );
    await assert.rejects(
      () => runTraining(parseTrainArgs(["--resume", `${root}/b`, "--out", `${root}/a`])!, { progress }),
      /holds the checkpoint of another run \(at step 1\)/,
    );
    assert.equal(memory().liveBytes, live, "a refused run leaves nothing behind");
    assert.equal(await step(`${root}/a`), 1);
    // stopped before its first step (Ctrl-C while it loads): nothing saved over the checkpoint
    await run(["--steps", "3", "--out", `${root}/a`, "--overwrite"], 0);
    assert.match(lines.at(-1)!, /^interrupted before the first step: nothing saved \(.*\/a is as it was\)$/);
    assert.equal(await step(`${root}/a`), 1);
    await run(["--steps", "3", "--out", `${root}/a`, "--overwrite"]);
    assert.equal(await step(`${root}/a`), 3, "--overwrite replaces it");
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
        shouldStop: stopAfter === undefined ? undefined : (stepped) => stepped && ++n === stopAfter,
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
    // The schedule follows the new length: warm-up 5 (clamped to the first run's 6 steps - 1), cosine to 12.
    const lrAt = cosineSchedule({
      warmup: 5,
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

Deno.test("train: a resume trains on the run's own text: without --data it reads the file its checkpoint names; another text is refused unless --other-data; a finished run says nothing was trained", async () => {
  const root = await Deno.makeTempDir();
  try {
    const book = await Deno.readFile(new URL("../data/pride_and_prejudice.txt", import.meta.url));
    await Deno.writeFile(`${root}/mine.txt`, book.subarray(0, 4000));
    await Deno.writeFile(`${root}/other.txt`, book.subarray(10000, 14000));
    const base = ["--batch", "4", "--seq", "32", "--d-model", "16", "--layers", "1", "--eval-every", "4"];
    const fingerprint = (t: Trainer) => t.data.fingerprint!();
    const mine = new CharDataset(book.subarray(0, 4000)).fingerprint();
    // a and b: 4 steps on mine.txt, stopped after 2
    for (const d of ["a", "b"]) {
      const at = await trainRun(
        [...base, "--steps", "4", "--data", `${root}/mine.txt`, "--out", `${root}/${d}`],
        (t) => t.step,
        2,
      );
      assert.equal(at, 2);
    }
    const log = JSON.parse(await Deno.readTextFile(`${root}/a/training_log.json`));
    assert.deepEqual(log.data, { fingerprint: mine, source: await Deno.realPath(`${root}/mine.txt`) });
    assert.match(mine, /^bytes 3600 \+ 400, hash [0-9a-f]{14}$/);
    // README's fine-tuning example resumes without --data: the run's own text, not the bundled book
    assert.deepEqual(await trainRun(["--resume", `${root}/a`], (t) => [t.step, fingerprint(t)]), [4, mine]);
    // another text is refused, naming both; --other-data goes on with it
    const live = memory().liveBytes;
    await assert.rejects(
      () => trainRun(["--resume", `${root}/b`, "--data", `${root}/other.txt`], (t) => t.step),
      new RegExp(
        `cannot resume .*/b with this data: the run trained on bytes 3600 \\+ 400, hash [0-9a-f]+ ` +
          `\\(.*/mine\\.txt\\), this data is bytes 3600 \\+ 400, hash (?!${mine.slice(-14)}).*` +
          `go on with this one \\(--other-data; or start a new run from its weights: --from .*/b\\)$`,
      ),
    );
    assert.equal(memory().liveBytes, live, "a refused resume leaves nothing behind");
    const other = new CharDataset(book.subarray(10000, 14000)).fingerprint();
    assert.deepEqual(
      await trainRun(
        ["--resume", `${root}/b`, "--data", `${root}/other.txt`, "--other-data"],
        (t) => [t.step, fingerprint(t)],
      ),
      [4, other],
    );
    assert.throws(() => parseTrainArgs(["--other-data"]), /--other-data applies to --resume only/);
    // a finished run resumed into another folder trains nothing and writes nothing there
    const lines: string[] = [];
    const t = await runTraining(parseTrainArgs(["--resume", `${root}/a`, "--out", `${root}/c`])!, {
      progress: (line) => lines.push(line),
    });
    t.model.dispose();
    t.dispose();
    assert.match(
      lines.at(-1)!,
      /^nothing to train: the run is at step 4 of 4 .*its checkpoint stays in .*\/a$/,
    );
    assert.deepEqual(await names(root), ["a", "b", "mine.txt", "other.txt"]);
  } finally {
    await Deno.remove(root, { recursive: true });
  }
});

Deno.test("dataFingerprint: the same ids give the same; another id, split or unit another", () => {
  const bytes = new TextEncoder().encode("It is a truth universally acknowledged, that a single man");
  const f = new CharDataset(bytes).fingerprint();
  assert.equal(new CharDataset(bytes.slice()).fingerprint(), f);
  assert.equal(dataFingerprint(new CharDataset(bytes).train, new CharDataset(bytes).val, "bytes"), f);
  const changed = bytes.slice();
  changed[20] ^= 1;
  assert.notEqual(new CharDataset(changed).fingerprint(), f);
  assert.notEqual(new CharDataset(bytes, 0.2).fingerprint(), f, "another validation split");
  const tokens = new TokenDataset([...bytes]).fingerprint();
  assert.equal(tokens.replace(/^tokens/, "bytes"), f, "the ids hash alike; the unit names them");
  // the parts' boundary counts: 1 + 2 and 2 + 1 of the same ids differ
  assert.notEqual(dataFingerprint([1], [2, 3], "x"), dataFingerprint([1, 2], [3], "x"));
});

Deno.test("train: a loss that is not finite names its first step, and no checkpoint of the diverged run replaces the last good one", async () => {
  const root = await Deno.makeTempDir();
  try {
    // Every weight of the embedding NaN after step 12: the loss of step 13 is the first NaN. logEvery is 10.
    const run = async (saveEvery: string, poisonAt = 12) => {
      let trainer: Trainer | undefined;
      const args = ["--steps", "30", "--batch", "2", "--seq", "16", "--d-model", "8", "--layers", "1"];
      const out = ["--out", `${root}/r`, "--overwrite"]; // each run replaces the last
      const a = parseTrainArgs([...args, "--warmup", "2", "--save-every", saveEvery, ...out])!;
      try {
        await runTraining(a, {
          progress: quiet,
          onStart: (t) => Promise.resolve(void (trainer = t)),
          shouldStop: () => {
            if (trainer!.step === poisonAt) {
              const p = trainer!.model.embedding.weight;
              upload(p.storage.buffer, 0, new Float32Array(p.size).fill(NaN));
            }
            return false;
          },
        });
      } finally {
        trainer?.model.dispose();
        trainer?.dispose();
      }
    };
    // Read back at step 20: the error names step 13, not the readback's step.
    await assert.rejects(
      () => run("100"),
      /training diverged: loss NaN at step 13 \(no checkpoint written since the run started\)/,
    );
    // A save at step 15 comes before that readback: it refuses, and the checkpoint of step 10 stays.
    await assert.rejects(
      () => run("5"),
      new RegExp(`training diverged: loss NaN at step 13 \\(${root}/r keeps the checkpoint of step 10\\)`),
    );
    assert.equal(JSON.parse(await Deno.readTextFile(`${root}/r/training_log.json`)).step, 10);
    for (const [k, t] of await weights(`${root}/r`)) assert.ok(t.data.every(Number.isFinite), `${k} finite`);
    // NaN weights from step 15's update, saved at step 15 before any loss shows them: the save refuses
    await assert.rejects(
      () => run("5", 15),
      new RegExp(
        `cannot write checkpoint ${root}/r: backbone.embeddings.weight holds values that are not finite \\(the ` +
          `run diverged by step 15\\); ${root}/r keeps what it held`,
      ),
    );
    assert.equal(JSON.parse(await Deno.readTextFile(`${root}/r/training_log.json`)).step, 10);
    // The library's save itself reads the losses not yet read back: a NaN among them is refused there too
    manualSeed(3);
    const lm = new MambaLM({ dModel: 8, nLayers: 1 }, { vocabSize: 256 });
    const text = new TextEncoder().encode("the quick brown fox jumps over the lazy dog. ".repeat(20));
    const t = new Trainer(lm, new CharDataset(text), {
      ...DEFAULT_TRAIN,
      steps: 10,
      warmup: 1,
      batch: 2,
      seq: 16,
    });
    try {
      await t.trainStep();
      upload(lm.embedding.weight.storage.buffer, 0, new Float32Array(lm.embedding.weight.size).fill(NaN));
      await t.trainStep(); // step 2's loss is NaN, read back at step 10 only (logEvery 10)
      await assert.rejects(
        () => saveTrainingCheckpoint(t, `${root}/lib`, new ByteTokenizer()),
        new RegExp(
          `cannot write checkpoint ${root}/lib: training diverged: loss NaN at step 2; ${root}/lib keeps`,
        ),
      );
      assert.deepEqual((await names(root)).sort(), ["r"], "nothing written");
    } finally {
      t.dispose();
      lm.dispose();
    }
  } finally {
    await Deno.remove(root, { recursive: true });
  }
});

Deno.test("train: --resume of a folder that does not exist says so, and suggests training first", async () => {
  const root = await Deno.makeTempDir();
  try {
    const missing = `${root}/runs/char`;
    const said =
      /there is no folder .*\/runs\/char to resume: train a run there first \(`deno task train --out /;
    await assert.rejects(() => loadTrainingCheckpoint(missing, new CharDataset(new Uint8Array(64))), said);
    await assert.rejects(
      () => runTraining(parseTrainArgs(["--resume", missing])!, { progress: quiet }),
      said,
    );
    assert.deepEqual(await names(root), [], "nothing created");
    // A folder that exists but holds no run is not a checkpoint, as before.
    await Deno.mkdir(missing, { recursive: true });
    await assert.rejects(
      () => loadTrainingCheckpoint(missing, new CharDataset(new Uint8Array(64))),
      /runs\/char is not a training checkpoint \(no training_log\.json\)/,
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
    bad({ lr: 1e-4 }, /TrainConfig.minLr \(0.0003\) must be <= lr \(0.0001\): the schedule decays from lr/);
    bad({ betas: [0.9] }, /TrainConfig.betas must be two numbers in \[0, 1\), got \[0.9\]/);
    bad({ seq: undefined }, /TrainConfig.seq must be an integer >= 1, got undefined/);
    bad({ seed: "7" }, /TrainConfig.seed must be an integer >= 0, got '7'/);
    bad({ seed: 2 ** 53 }, /TrainConfig.seed must be an integer >= 0, got 9007199254740992/);
    // a misspelt key would leave its setting at the default (and be saved with the run)
    bad(
      { accumulation: 4 },
      /TrainConfig: unknown option 'accumulation' \(options are steps, .*, carryState\)/,
    );
    // The validation text (10 bytes) is shorter than seq + 1: said when the Trainer is made, not at the first
    // evaluate() after the training steps
    const recipe = { ...DEFAULT_TRAIN, steps: 4, warmup: 2, batch: 2, seq: 16 };
    assert.throws(
      () => new Trainer(model, data, recipe),
      /the val text has 10 bytes, fewer than seq \+ 1 = 17/,
    );
    // ... a TrainData that shows no parts finds it at evaluate(), which frees its buffer
    const opaque = { maxId: data.maxId, windows: data.windows.bind(data) };
    const t = new Trainer(model, opaque, recipe);
    assert.throws(() => (t.config as TrainConfig).steps = 9, TypeError); // read-only: use setSteps
    assert.throws(() => t.setSteps(1), /steps \(1\) is below the run's warm-up of 2 steps/);
    assert.throws(() => t.setSteps(2.5), /steps must be an integer >= 1, got 2.5/);
    const live = memory().liveTensors;
    await assert.rejects(() => t.evaluate(), /the val text has 10 bytes, fewer than seq \+ 1 = 17/);
    assert.equal(memory().liveTensors, live);
    t.dispose();
    // Batches are seed's stream number step: a generator seeded with seed * 10^6 + step gave seed 8's step 0
    // the windows of seed 7's step 10^6 (and evaluation seed 7's step 10^6 - 1)
    const batches = (seed: number, ...steps: number[]) => {
      const tr = new Trainer(model, data, { ...recipe, batch: 16, seq: 8, seed });
      try {
        return steps.map((step) => [...tr.batchOf(step)].join());
      } finally {
        tr.dispose();
      }
    };
    const [late, first] = [batches(7, 1e6, 0), batches(8, 0)[0]];
    assert.notEqual(late[0], first, "seed 7's step 10^6 and seed 8's step 0 draw other windows");
    assert.deepEqual(batches(7, 1e6, 0), late, "the same (seed, step), the same windows");
  } finally {
    model.dispose();
  }
});

/** Two trainers of one model (the same weights, data and recipe), each one step in: `fail` makes a's next step
 * fail (in ways of its own) until it succeeds, then b takes that step once. a's weights and carried states must
 * be b's: the failures left nothing that changed the step. */
async function retriedStepIsTheSame(
  carryState: boolean,
  fail: (ta: Trainer) => Promise<void>,
): Promise<void> {
  await init();
  const a = new MambaLM({ dModel: 16, nLayers: 2, dState: 4 }, { vocabSize: 11 });
  const b = new MambaLM({ dModel: 16, nLayers: 2, dState: 4 }, { vocabSize: 11 });
  b.loadStateDict(a.stateDict());
  const data = new TokenDataset(Array.from({ length: 400 }, (_, i) => (i * 7) % 11));
  const recipe = { ...DEFAULT_TRAIN, steps: 10, warmup: 1, batch: 2, seq: 8, logEvery: 1, carryState };
  const [ta, tb] = [new Trainer(a, data, recipe), new Trainer(b, data, recipe)];
  const states = (t: Trainer) =>
    Promise.all([...t.carriedState()].map(async ([k, v]) => [k, await v.toArray()]));
  try {
    await ta.trainStep();
    await tb.trainStep();
    await fail(ta);
    assert.equal(ta.step, 2);
    await tb.trainStep();
    assert.deepEqual(await states(ta), await states(tb), "carried states after the retried step");
    const [pa, pb] = [a.parameters(), b.parameters()];
    for (let i = 0; i < pa.length; i++) {
      assert.deepEqual(await pa[i].toArray(), await pb[i].toArray(), `parameter ${i} after the retried step`);
    }
  } finally {
    for (const t of [ta, tb]) t.dispose();
    for (const m of [a, b]) m.dispose();
  }
}

Deno.test("train: a step that runs out of memory part-way leaves no gradients: the next step is the one it would have been", async () => {
  await retriedStepIsTheSame(false, async (ta) => {
    // caps from the live bytes up: the step fails in the forward, then in the backward (some gradients
    // made), until it fits
    const { failed } = await underRisingCaps(() => ta.trainStep(), 1024, (room) => {
      assert.deepEqual(
        ta.model.parameters().filter((p) => p.grad).map(String),
        [],
        `gradients left at +${room}`,
      );
    });
    assert.ok(failed > 10, `${failed} failed steps`);
  });
});

Deno.test("train: with carryState, a step that throws (out of memory, or in the optimizer's step) leaves the carried states as they were", async () => {
  await retriedStepIsTheSame(true, async (ta) => {
    // a throw in the optimizer's step, after the windows ran (no cap reaches it: the backward's peak is higher)
    const step = ta.opt.step;
    ta.opt.step = () => {
      throw new Error("injected");
    };
    await assert.rejects(() => ta.trainStep(), /injected/);
    ta.opt.step = step;
    // caps from the live bytes up: the step fails in the forward, then the backward, until it fits
    const { failed } = await underRisingCaps(() => ta.trainStep(), 512);
    assert.ok(failed > 10, `${failed} failed steps`);
  });
});

Deno.test("train: steps and an evaluation called without awaiting each log the losses of steps awaited one by one", async () => {
  await init();
  const text = new TextEncoder().encode("the quick brown fox jumps over the lazy dog. ".repeat(20));
  const recipe = { ...DEFAULT_TRAIN, steps: 6, warmup: 1, batch: 2, seq: 16, logEvery: 2, evalBatches: 2 };
  const run = async (awaited: boolean) => {
    manualSeed(5);
    const model = new MambaLM({ dModel: 8, nLayers: 1 }, { vocabSize: 256 });
    const t = new Trainer(model, new CharDataset(text), recipe);
    try {
      await t.trainStep(); // the first waits for the scan's tuning: an evaluation called meanwhile does not
      // steps 2-3, an evaluation at step 3, steps 4-6
      const calls = [2, 3, 0, 4, 5, 6].map((s) => () => s ? t.trainStep() : t.evaluate());
      if (awaited) { for (const c of calls) await c(); }
      else await Promise.all(calls.map((c) => c()));
      const byStep = (a: [number, number][]) => [...a].sort((x, y) => x[0] - y[0]);
      return { train: byStep(t.log.train), val: t.log.val };
    } finally {
      t.dispose();
      model.dispose();
    }
  };
  const one = await run(true);
  assert.deepEqual(one.train.map(([s]) => s), [2, 4, 6]);
  assert.deepEqual(one.val.map(([s]) => s), [3]);
  assert.deepEqual(await run(false), one);
});

Deno.test("train: a step called while the first step waits for the scan's tuning waits too, and runs after it", async () => {
  await init();
  const text = new TextEncoder().encode("the quick brown fox jumps over the lazy dog. ".repeat(20));
  const recipe = { ...DEFAULT_TRAIN, steps: 4, warmup: 1, batch: 2, seq: 16, logEvery: 2 };
  const run = async (awaited: boolean) => {
    manualSeed(5);
    const model = new MambaLM({ dModel: 8, nLayers: 1 }, { vocabSize: 256 });
    const t = new Trainer(model, new CharDataset(text), recipe);
    try {
      if (awaited) { for (let i = 0; i < 4; i++) await t.trainStep(); }
      else {
        const steps = [1, 2, 3, 4].map(() => t.trainStep());
        const early = t.step;
        await Promise.all(steps);
        // none ran ahead of the first's tuning (on the untuned scan, inside the tuner's timings)
        assert.equal(early, 0, "steps taken before the first step's tuning ended");
      }
      return { step: t.step, train: t.log.train };
    } finally {
      t.dispose();
      model.dispose();
    }
  };
  const one = await run(true);
  assert.deepEqual(one.train.map(([s]) => s), [2, 4]);
  assert.deepEqual(await run(false), one);
});

Deno.test("train: a save not awaited writes the run as it was when called, though steps are taken meanwhile", async () => {
  await init();
  const text = new TextEncoder().encode("the quick brown fox jumps over the lazy dog. ".repeat(20));
  const recipe = { ...DEFAULT_TRAIN, steps: 8, warmup: 1, batch: 2, seq: 16, logEvery: 3 };
  const model = new MambaLM({ dModel: 8, nLayers: 1 }, { vocabSize: 256 });
  const t = new Trainer(model, new CharDataset(text), recipe);
  const dir = await Deno.makeTempDir();
  try {
    for (let i = 0; i < 4; i++) await t.trainStep(); // a loss logged, one pending
    await saveTrainingCheckpoint(t, `${dir}/awaited`, new ByteTokenizer());
    await saveCheckpoint(model, `${dir}/model-awaited`, null);
    const run = saveTrainingCheckpoint(t, `${dir}/meanwhile`, new ByteTokenizer());
    const plain = saveCheckpoint(model, `${dir}/model-meanwhile`, null);
    await t.trainStep();
    await t.trainStep(); // reads its losses back
    await Promise.all([run, plain]);
    for (const [a, b] of [["awaited", "meanwhile"], ["model-awaited", "model-meanwhile"]]) {
      const names = (d: string) => Array.from(Deno.readDirSync(`${dir}/${d}`), (e) => e.name).sort();
      assert.deepEqual(names(b), names(a));
      for (const name of names(a)) {
        // the same content, but for the id of the save that wrote it
        const content = (d: string) => {
          const bytes = Deno.readFileSync(`${dir}/${d}/${name}`);
          if (name.endsWith(".json")) {
            const { mambats_save_id: _, saveId: __, ...rest } = JSON.parse(new TextDecoder().decode(bytes));
            return rest;
          }
          const { header: { metadata: { mambats_save_id: _, ...meta }, entries }, tensors } =
            parseSafetensors(bytes);
          return {
            meta,
            entries: [...entries.values()],
            data: [...tensors.values()].map((t) => [...t.data]),
          };
        };
        assert.deepEqual(content(b), content(a), `${b}/${name} differs from ${a}'s`);
      }
    }
  } finally {
    t.dispose();
    model.dispose();
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("train: a save called while a step's losses or an evaluation are read back records them (they were lost)", async () => {
  await init();
  const text = new TextEncoder().encode("the quick brown fox jumps over the lazy dog. ".repeat(20));
  const recipe = { ...DEFAULT_TRAIN, steps: 8, warmup: 1, batch: 2, seq: 16, logEvery: 2, evalBatches: 2 };
  const model = new MambaLM({ dModel: 8, nLayers: 1 }, { vocabSize: 256 });
  const t = new Trainer(model, new CharDataset(text), recipe);
  const dir = await Deno.makeTempDir();
  const savedLog = (d: string) => JSON.parse(Deno.readTextFileSync(`${dir}/${d}/training_log.json`)).log;
  try {
    await t.trainStep();
    const step = t.trainStep(); // its readback is in flight when the save is called
    await saveTrainingCheckpoint(t, `${dir}/a`, new ByteTokenizer());
    await step;
    assert.equal(t.log.train.length, 1);
    assert.deepEqual(savedLog("a").train, t.log.train);
    const evaluation = t.evaluate();
    await saveTrainingCheckpoint(t, `${dir}/b`, new ByteTokenizer());
    await evaluation;
    assert.equal(t.log.val.length, 1);
    assert.deepEqual(savedLog("b").val, t.log.val);
    assert.deepEqual(savedLog("b").train, t.log.train);
  } finally {
    t.dispose();
    model.dispose();
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("TokenDataset: the same windows as CharDataset from the same ids; bad ids, valFrac and ids past the model's vocabulary are named", async () => {
  await init();
  const bytes = new TextEncoder().encode("It is a truth universally acknowledged. ".repeat(20));
  const chars = new CharDataset(bytes), tokens = new TokenDataset([...bytes]);
  assert.equal(tokens.maxId, chars.maxId);
  for (const split of ["train", "val"] as const) {
    assert.deepEqual(
      tokens.windows(split, 3, 17, new Philox(5)),
      chars.windows(split, 3, 17, new Philox(5)),
      split,
    );
  }
  assert.throws(
    () => new TokenDataset([1, 2, -1]),
    /TokenDataset: ids must be integers in \[0, 2\^31\), got -1 at index 2/,
  );
  assert.throws(() => new TokenDataset([1, 2.5]), /got 2.5 at index 1/);
  assert.throws(() => new TokenDataset([1, 2], 1), /TokenDataset: valFrac must be in \[0, 1\), got 1/);
  assert.throws(() => new CharDataset(bytes, -0.1), /CharDataset: valFrac must be in \[0, 1\), got -0.1/);
  assert.throws(
    () => new TokenDataset([1, 2, 3]).windows("val", 1, 4, new Philox(1)),
    /the val part has 1 tokens, fewer than seq \+ 1 = 5/,
  );
  // Windows start anywhere a window of seq + 1 ids fits: a part of exactly seq + 1 ids is one window, and
  // over many draws every id is drawn, the last one's included (as nanoGPT's get_batch).
  const ten = new TokenDataset([0, 1, 2, 3, 4, 5, 6, 7, 8, 9], 0);
  assert.deepEqual([...ten.windows("train", 2, 9, new Philox(3))], [
    ...Array(10).keys(),
    ...Array(10).keys(),
  ]);
  const drawn = new Set(ten.windows("train", 64, 4, new Philox(5)));
  assert.deepEqual([...drawn].sort((a, b) => a - b), [...Array(10).keys()]);
  const model = new MambaLM({ dModel: 8, nLayers: 1 }, { vocabSize: 50, padVocabSizeMultiple: 8 }); // padded to 56
  try {
    const config = { ...DEFAULT_TRAIN, steps: 4, warmup: 2, batch: 2, seq: 16 };
    assert.throws(
      () => new Trainer(model, new TokenDataset([3, 56, 7]), config),
      /the data has token id 56, outside the model's vocabulary of 56 \(ids must come from the model's own tokenizer\)/,
    );
    // (200 ids: both parts hold a window of seq + 1; three were too few, said when the Trainer is made)
    new Trainer(model, new TokenDataset(Array.from({ length: 200 }, (_, i) => (i % 2 ? 55 : 3))), config)
      .dispose();
    assert.throws(
      () => new Trainer(model, new TokenDataset([3, 55, 7]), config),
      /the train part has 2 tokens/,
    );
    const duck = { windows: () => new Int32Array(0) } as unknown as TokenDataset; // no maxId
    assert.throws(
      () => new Trainer(model, duck, config),
      /TrainData.maxId must be an integer >= -1 \(the largest id\), got undefined/,
    );
  } finally {
    model.dispose();
  }
});

Deno.test("fine-tune: a pretrained checkpoint trains on its tokenizer's ids (TokenDataset) and saves and resumes as a run", async () => {
  const root = await Deno.makeTempDir();
  const lm = await fromPretrained(fixturePath("char-mamba"));
  try {
    assert.ok(lm.tokenizer, "the checkpoint has its tokenizer");
    // A sentence the model never saw as such: fine-tuning on it should drive its loss down fast.
    const text = "The quick brown fox jumps over the lazy dog; the dog sleeps on. ".repeat(40);
    const data = new TokenDataset(lm.tokenizer!.encode(text, { addSpecialTokens: false }));
    const config = { ...DEFAULT_TRAIN, steps: 30, warmup: 3, batch: 4, seq: 64, lr: 3e-3, evalBatches: 2 };
    const t = new Trainer(lm, data, config);
    const before = await t.evaluate();
    for (let i = 0; i < 30; i++) await t.trainStep();
    const after = await t.evaluate();
    assert.ok(after < before - 0.5, `val loss ${before} -> ${after}`);
    await saveTrainingCheckpoint(t, `${root}/ft`, {});
    // no tokenizer (a model loaded without one), or one that cannot be saved: refused before anything is written
    await assert.rejects(
      () => saveTrainingCheckpoint(t, `${root}/none`, null),
      /cannot write checkpoint .*none: the run's tokenizer is required, got null/,
    );
    const own = { ...lm.tokenizer!, encode: () => [], decode: () => "", toFiles: undefined };
    await assert.rejects(
      () => saveTrainingCheckpoint(t, `${root}/none`, own),
      /cannot write checkpoint .*none: cannot save the tokenizer: it has no toFiles\(\)/,
    );
    // the argument order of before 2026-12-02 (folder first) is named, not a crash inside
    await assert.rejects(
      () => saveTrainingCheckpoint(`${root}/none` as never, t as never, {}),
      /saveTrainingCheckpoint\(trainer, dir, tokenizer\): takes the Trainer first, then the folder; got a folder name first/,
    );
    assert.ok(!(await Deno.stat(`${root}/none`).then(() => true, () => false)), "nothing written");
    // a run saved with a tokenizer.json that is no tokenizer resumes with its data, not with a data function
    await assert.rejects(
      () => loadTrainingCheckpoint(`${root}/ft`, () => data),
      /tokenizer.json.*\(the data of this resume is made from the run's tokenizer: .*ft needs a tokenizer.json/,
    );
    const back = await loadTrainingCheckpoint(`${root}/ft`, data);
    assert.equal(back.step, 30);
    assert.ok(Math.abs((await back.evaluate()) - after) < 1e-5, "the saved run evaluates alike");
    // a run saved with minLr above lr (a Trainer refuses that now) says how to resume it
    const logPath = `${root}/ft/training_log.json`;
    const saved = JSON.parse(await Deno.readTextFile(logPath));
    await Deno.writeTextFile(logPath, JSON.stringify({ ...saved, train: { ...saved.train, minLr: 1 } }));
    await assert.rejects(
      () => loadTrainingCheckpoint(`${root}/ft`, data),
      /training_log.json: train.minLr \(1\) is above train.lr \(0.003\).*set train.minLr <= train.lr in this file/,
    );
    back.setSteps(31);
    await back.trainStep(); // and trains on (bit-exact resumes: the CharDataset test above)
    assert.equal(back.step, 31);
    back.model.dispose();
    back.dispose();
    // The weights alone, with the tokenizer from the original checkpoint (as README shows for a hub model).
    await saveCheckpoint(lm, `${root}/weights`);
    const tuned = await fromPretrained(`${root}/weights`, { tokenizer: fixturePath("char-mamba") });
    try {
      const prompt = [lm.tokenizer!.encode("The quick", { addSpecialTokens: false })];
      const [a] = await lm.generate(prompt, 12), [b] = await tuned.generate(prompt, 12);
      assert.deepEqual(b, a, "the saved weights generate as the fine-tuned model");
      assert.equal(tuned.tokenizer!.decode(b), lm.tokenizer!.decode(a));
      assert.equal(lm.tokenizer!.decode(a), " brown fox j", "it learned the sentence");
    } finally {
      tuned.dispose();
    }
    t.dispose();
  } finally {
    lm.dispose();
    await Deno.remove(root, { recursive: true });
  }
});

Deno.test("train: a run shorter than the warm-up reaches the peak lr at its last step; one step trains at the peak", () => {
  for (const [steps, warmup] of [[1, 0], [20, 19], [500, 100]]) {
    const { train } = parseTrainArgs(["--steps", String(steps)])!;
    assert.equal(train.warmup, warmup, `--steps ${steps}`);
    const lr = cosineSchedule({
      warmup: train.warmup,
      total: train.steps,
      maxLr: train.lr,
      minLr: train.minLr,
    });
    assert.equal(lr(Math.min(warmup, steps - 1)), train.lr, `--steps ${steps}: the peak`);
  }
});

Deno.test("train: bad flags give clear errors", () => {
  assert.throws(() => parseTrainArgs(["--steps", "x"]), /--steps must be an integer >= 1, got 'x'/);
  assert.throws(() => parseTrainArgs(["--lr", "0"]), /--lr must be a finite positive number, got '0'/);
  assert.throws(() => parseTrainArgs(["--lr", "Infinity"]), /--lr must be a finite positive number/);
  assert.throws(
    () => parseTrainArgs(["--seed", "9007199254740992"]),
    /--seed must be an integer >= 0, got '9007199254740992'/,
  );
  assert.throws(() => parseTrainArgs(["--steps", ""]), /--steps must be an integer >= 1, got ''/);
  // an empty path read as absent: --from "" trained a fresh char model, --resume "" started a new run
  for (const f of ["--from", "--resume", "--out", "--data"]) {
    assert.throws(() => parseTrainArgs([f, ""]), new RegExp(`${f} needs a value, got ''`));
  }
  assert.equal(parseTrainArgs(["-h"]), null, "-h is --help, as for deno task generate");
  assert.throws(() => parseTrainArgs(["--bogus"]), /Unknown option '--bogus'/);
  assert.equal(parseTrainArgs(["--help"]), null);
  assert.deepEqual(
    ["true", "false", "input"].map((v) => parseTrainArgs(["--recompute", v])!.recompute),
    [true, false, "input"],
  );
  assert.equal(parseTrainArgs([])!.recompute, true);
  assert.throws(
    () => parseTrainArgs(["--recompute", "all"]),
    /--recompute must be true, false or input, got 'all'/,
  );
  assert.throws(() => parseTrainArgs(["--recompute", "constructor"]), /--recompute must be/);
  assert.throws(
    () => parseTrainArgs(["--resume", "runs/x", "--recompute", "input"]),
    /--recompute cannot be used with --resume/,
  );
  assert.throws(
    () => parseTrainArgs(["--resume", "runs/x", "--lr", "0.1", "--d-model", "32"]),
    /--lr, --d-model cannot be used with --resume: a resumed run keeps the recipe and model of its checkpoint/,
  );
  assert.ok(parseTrainArgs(["--resume", "runs/x", "--steps", "9", "--data", "t.txt", "--save-every", "3"]));
  assert.throws(
    () => parseTrainArgs(["--from", "m", "--layers", "2", "--d-state", "8"]),
    /--layers, --d-state cannot be used with --from: the model has its shape/,
  );
  assert.throws(
    () => parseTrainArgs(["--from", "m", "--resume", "runs/x"]),
    /--from and --resume cannot be used together/,
  );
  assert.throws(() => parseTrainArgs(["--revision", "v1"]), /--revision apply to --from only/);
  const ft = parseTrainArgs(["--from", "org/model", "--revision", "v1", "--cache-dir", "c"])!;
  assert.deepEqual([ft.from, ft.hub, ft.train.lr, ft.train.minLr, ft.train.warmup], [
    "org/model",
    { revision: "v1", cacheDir: userPath("c") }, // the folder deno task was typed in
    FINE_TUNE_LR,
    FINE_TUNE_LR / 10,
    FINE_TUNE_WARMUP, // as README's fine-tuning snippet, which it says this does the same as
  ]);
  assert.equal(parseTrainArgs(["--from", "m", "--lr", "0.002"])!.train.lr, 0.002);
  assert.equal(parseTrainArgs(["--from", "m", "--warmup", "30"])!.train.warmup, 30);
  assert.equal(parseTrainArgs([])!.train.warmup, 100, "a new model keeps DEFAULT_TRAIN's warm-up");
  // a fine-tuned run does not replace the char run of the default folder
  assert.deepEqual([parseTrainArgs([])!.out, parseTrainArgs(["--from", "m"])!.out], ["runs/char", "runs/ft"]);
});

Deno.test("train: relative paths are the user's folder's (deno task's INIT_CWD), not the repository root's", () => {
  const saved = Deno.env.get("INIT_CWD");
  const dir = Deno.makeTempDirSync();
  try {
    Deno.env.set("INIT_CWD", dir);
    Deno.mkdirSync(`${dir}/org/local`, { recursive: true });
    const a = parseTrainArgs([
      "--data",
      "t.txt",
      "--out",
      "../o",
      "--from",
      "./m",
      "--tokenizer",
      "org/local",
    ])!;
    const ft = parseTrainArgs(["--from", "state-spaces/mamba-130m-hf", "--cache-dir", "c"])!;
    assert.deepEqual([a.data, a.out, a.from, a.hub.tokenizer], [
      `${dir}/t.txt`,
      `${dir.replace(/\/[^/]+$/, "")}/o`,
      `${dir}/m`,
      `${dir}/org/local`, // a folder there, though it has the form of a hub id
    ]);
    assert.deepEqual([ft.from, ft.hub.cacheDir], ["state-spaces/mamba-130m-hf", `${dir}/c`]);
    assert.equal(parseTrainArgs(["--resume", "r"])!.out, `${dir}/r`);
    assert.equal(parseTrainArgs(["--resume", "/abs/r"])!.resume, "/abs/r");
  } finally {
    if (saved === undefined) Deno.env.delete("INIT_CWD");
    else Deno.env.set("INIT_CWD", saved);
    Deno.removeSync(dir, { recursive: true });
  }
});

Deno.test("train: --from fine-tunes a pretrained model on its own tokenizer's ids; the run carries the tokenizer and resumes", async () => {
  const root = await Deno.makeTempDir();
  const run = async (args: string[]) => {
    const t = await runTraining(parseTrainArgs(args)!, { progress: quiet });
    const r = { step: t.step, val: t.log.val.map(([, v]) => v) };
    t.model.dispose();
    t.dispose();
    return r;
  };
  try {
    const text = `${root}/text.txt`;
    await Deno.writeTextFile(
      text,
      "The quick brown fox jumps over the lazy dog; the dog sleeps on. ".repeat(40),
    );
    // A char model (ByteTokenizer): the data is the text's bytes.
    const flags = ["--data", text, "--batch", "4", "--seq", "32", "--eval-every", "5"];
    const a = await run([
      "--from",
      fixturePath("char-mamba"),
      ...flags,
      "--steps",
      "10",
      "--lr",
      "3e-3",
      "--out",
      `${root}/char`,
    ]);
    assert.ok(a.val.at(-1)! < a.val[0] - 0.3, `val loss ${a.val}`);
    const tuned = await fromPretrained(`${root}/char`);
    try {
      const tok = tuned.tokenizer;
      assert.ok(tok instanceof ByteTokenizer);
      const base = await fromPretrained(fixturePath("char-mamba"));
      const known = (base.tokenizer as ByteTokenizer).known!;
      base.dispose();
      assert.ok([...known].every((b) => tok.known!.has(b)), "it knows what the pretrained model knew");
      assert.ok(tok.known!.has(";".charCodeAt(0)));
    } finally {
      tuned.dispose();
    }
    assert.equal((await run(["--resume", `${root}/char`, "--data", text, "--steps", "12"])).step, 12);
    // fine-tuning a run further must not write over it
    await assert.rejects(
      () => run(["--from", `${root}/char`, ...flags, "--steps", "2", "--out", `${root}/char`]),
      /--out .*char is the folder --from reads: name another --out \(or --resume it to continue that run\)/,
    );

    // A Hugging Face tokenizer (65000 ids): the data is the text's token ids; tokenizer_config.json comes along.
    const hubTok = new HubTokenizer(
      JSON.parse(await Deno.readTextFile(fixturePath("hub/tokenizer.json"))),
      JSON.parse(await Deno.readTextFile(fixturePath("hub/tokenizer_config.json"))),
    );
    const lm = new MambaLM({ dModel: 8, nLayers: 1, dState: 4 }, { vocabSize: 65000 });
    await saveCheckpoint(lm, `${root}/base`, hubTok);
    lm.dispose();
    const flagsHub = ["--data", text, "--batch", "2", "--seq", "16", "--eval-every", "2", "--lr", "3e-3"];
    const b = await run(["--from", `${root}/base`, ...flagsHub, "--steps", "4", "--out", `${root}/hub`]);
    assert.equal(b.step, 4);
    const log = JSON.parse(await Deno.readTextFile(`${root}/hub/training_log.json`));
    assert.ok(log.files.includes("tokenizer_config.json"), `files: ${log.files}`);
    // its loss chart's unit is the tokenizer's tokens; a char model's are characters
    assert.match(await Deno.readTextFile(`${root}/hub/loss.svg`), /cross-entropy \(nats\/token\)/);
    assert.match(await Deno.readTextFile(`${root}/char/loss.svg`), /cross-entropy \(nats\/char\)/);
    assert.equal((await run(["--resume", `${root}/hub`, "--data", text, "--steps", "6"])).step, 6);
    const back = await fromPretrained(`${root}/hub`);
    try {
      assert.ok(back.tokenizer instanceof HubTokenizer);
      assert.deepEqual(back.tokenizer.specialTokens, hubTok.specialTokens);
    } finally {
      back.dispose();
    }
    // A model without a tokenizer needs one named (--tokenizer): nothing to encode the text with else.
    const bare = new MambaLM({ dModel: 8, nLayers: 1 }, { vocabSize: 256 });
    await saveCheckpoint(bare, `${root}/bare`, null);
    bare.dispose();
    await assert.rejects(
      () => run(["--from", `${root}/bare`, ...flags, "--steps", "2", "--out", `${root}/x`]),
      (e) =>
        e instanceof UsageError && // exit status 2, as deno task generate and eval give it
        /bare has no tokenizer.json to encode the text with \(.*\): name one with --tokenizer <id\|folder\|url>/
          .test(e.message),
    );
    const named = await run([
      "--from",
      `${root}/bare`,
      "--tokenizer",
      fixturePath("char-mamba"),
      ...flags,
      "--steps",
      "2",
      "--out",
      `${root}/x`,
    ]);
    assert.equal(named.step, 2);
    assert.throws(() => parseTrainArgs(["--tokenizer", "x"]), /--tokenizer apply to --from only/);
  } finally {
    await Deno.remove(root, { recursive: true });
  }
});

Deno.test("checkpoint: a clip of Infinity and the model's scan and recompute survive a resume; bad training_log fields are named", async () => {
  await init();
  const root = await Deno.makeTempDir();
  const text = new TextEncoder().encode("It is a truth universally acknowledged. ".repeat(20));
  const data = new CharDataset(text);
  const recipe = { ...DEFAULT_TRAIN, steps: 4, warmup: 1, batch: 2, seq: 8, clip: Infinity, logEvery: 3 };
  const model = new MambaLM({ dModel: 8, nLayers: 1, scan: "pscan", recompute: "input" }, { vocabSize: 256 });
  const t = new Trainer(model, data, recipe);
  try {
    await t.trainStep();
    const dir = `${root}/c`;
    await saveTrainingCheckpoint(t, dir, new ByteTokenizer());
    const saved = JSON.parse(await Deno.readTextFile(`${dir}/training_log.json`));
    assert.equal(saved.train.clip, "Infinity", "JSON has no Infinity: written as a string, not null");
    assert.deepEqual(saved.model, { scan: "pscan", recompute: "input" });
    const back = await loadTrainingCheckpoint(dir, data);
    assert.equal(back.config.clip, Infinity);
    assert.equal(back.model.config.scan, "pscan");
    assert.equal(back.model.config.recompute, "input");
    assert.deepEqual(await back.pendingLosses(), await t.pendingLosses());
    back.model.dispose();
    back.dispose();
    const other = await loadTrainingCheckpoint(dir, data, { scan: "fused", recompute: true });
    assert.equal(other.model.config.scan, "fused");
    assert.equal(other.model.config.recompute, true);
    other.model.dispose();
    other.dispose();
    // Before this file wrote "Infinity", JSON.stringify wrote a clip of Infinity as null: read back as Infinity.
    const edit = async (change: (s: Record<string, unknown>) => void) => {
      const s = structuredClone(saved);
      change(s);
      await Deno.writeTextFile(`${dir}/training_log.json`, JSON.stringify(s));
    };
    // (and a loss that was NaN or infinite as null: read as NaN)
    await edit((s) => {
      (s.train as Record<string, unknown>).clip = null;
      s.pendingLosses = [null];
      s.log = { train: [[3, null]], val: [], time: [] };
    });
    const legacy = await loadTrainingCheckpoint(dir, data);
    assert.equal(legacy.config.clip, Infinity);
    assert.deepEqual(legacy.log.train, [[3, NaN]]);
    assert.deepEqual(await legacy.pendingLosses(), [NaN]);
    legacy.model.dispose();
    legacy.dispose();
    const live = memory().liveTensors;
    const bad: [(s: Record<string, unknown>) => void, RegExp][] = [
      [(s) => s.step = -1, /training_log.json is not valid: step must be an integer >= 0, got -1/],
      [(s) => s.step = "3", /step must be an integer >= 0, got "3"/],
      [(s) => s.pendingLosses = [1, "x"], /pendingLosses\[1\] must be a number, got "x"/],
      [(s) => s.log = { train: [[1, "x"]] }, /log.train\[0\]\[1\] must be a number, got "x"/],
      [(s) => s.log = { val: [[1.5, 2]] }, /log.val\[0\] must be a \[step, value\] pair, got \[1.5,2\]/],
      [
        (s) => s.model = { scan: "fast", recompute: true },
        /model.scan must be "fused", "pscan" or "sequential", got "fast"/,
      ],
      [
        (s) => s.model = { scan: "fused", recompute: 1 },
        /model.recompute must be true, false or "input", got 1/,
      ],
    ];
    for (const [change, want] of bad) {
      await edit(change);
      await assert.rejects(() => loadTrainingCheckpoint(dir, data), want);
    }
    // Data the run cannot take is named as the data's fault, not training_log.json's (other data than the
    // run's is refused first, unless otherData).
    await edit(() => {});
    const short = new CharDataset(new TextEncoder().encode("tiny"));
    await assert.rejects(
      () => loadTrainingCheckpoint(dir, short),
      /^Error: cannot resume .*\/c with this data: the run trained on bytes 720 \+ 80, hash [0-9a-f]{14}, this data is bytes 3 \+ 1, hash/,
    );
    await assert.rejects(
      () => loadTrainingCheckpoint(dir, short, { otherData: true }),
      /^Error: cannot resume .*\/c with this data: the train text has 3 bytes, fewer than seq \+ 1 = 9$/,
    );
    await assert.rejects(
      () => loadTrainingCheckpoint(dir, new TokenDataset(new Array(20).fill(300)), { otherData: true }),
      /^Error: cannot resume .*\/c with this data: the data has token id 300, outside the model's vocabulary/,
    );
    assert.equal(memory().liveTensors, live, "a refused resume leaves nothing behind");
  } finally {
    t.dispose();
    model.dispose();
    await Deno.remove(root, { recursive: true });
  }
});

Deno.test("train: --mup-base-width trains a muP model (mamba.py's groups), whose checkpoint resumes as one, bit-exact", async () => {
  const root = await Deno.makeTempDir();
  try {
    const run = (args: string[], stopAfter?: number) =>
      trainRun(args, (t) => ({
        step: t.step,
        mup: t.model.config.mup,
        base: t.model.config.mupBaseWidth,
        groups: t.opt.paramGroups,
      }), stopAfter);
    const base = ["--batch", "4", "--seq", "32", "--d-model", "16", "--layers", "1", "--eval-every", "2"];
    const mup = [...base, "--mup-base-width", "8", "--steps", "2"];
    const a = await run([...mup, "--out", `${root}/a`]);
    assert.deepEqual([a.mup, a.base, a.groups[0].lrScale, a.groups[0].weightDecay], [true, 8, 0.5, 0.2]);
    const cfg = JSON.parse(await Deno.readTextFile(`${root}/a/config.json`));
    assert.deepEqual([cfg.mup, cfg.mup_base_width], [true, 8]);
    assert.ok(![...(await weights(`${root}/a`)).keys()].some((k) => k.includes("norm")), "no norm gains");
    // a: extended to 4 at once; b: the same, interrupted after step 3 and resumed: the same weights (the muP
    // groups' optimizer state restored by name).
    const ra = await run(["--resume", `${root}/a`, "--steps", "4"]);
    assert.deepEqual([ra.step, ra.mup, ra.groups.length], [4, true, 3]);
    await run([...mup, "--out", `${root}/b`]);
    assert.equal((await run(["--resume", `${root}/b`, "--steps", "4"], 1)).step, 3);
    assert.equal((await run(["--resume", `${root}/b`])).step, 4);
    const [wa, wb] = [await weights(`${root}/a`), await weights(`${root}/b`)];
    for (const [k, t] of wa) assert.deepEqual(wb.get(k)!.data, t.data, `${k} differs`);
    assert.throws(
      () => parseTrainArgs(["--mup-base-width", "0"]),
      /--mup-base-width must be an integer >= 1, got '0'/,
    );
  } finally {
    await Deno.remove(root, { recursive: true });
  }
});

Deno.test("train: accumulate 2 micro-batches of 2 = one batch of 4 (same windows, loss, gradients and validation loss) in less memory", async () => {
  await init();
  const { keep } = await import("../core/tensor.ts");
  const { copy } = await import("../core/ops/index.ts");
  const { resetPeak } = await import("../core/memory.ts");
  manualSeed(5);
  const a = new MambaLM({ dModel: 16, nLayers: 2, dState: 4 }, { vocabSize: 11 });
  const b = new MambaLM({ dModel: 16, nLayers: 2, dState: 4 }, { vocabSize: 11 });
  b.loadStateDict(a.stateDict());
  const data = new TokenDataset(Array.from({ length: 4000 }, (_, i) => (i * 7 + (i >> 3)) % 11));
  const recipe = { ...DEFAULT_TRAIN, steps: 10, warmup: 1, seq: 64, logEvery: 1 };
  const whole = new Trainer(a, data, { ...recipe, batch: 4 });
  const micro = new Trainer(b, data, { ...recipe, batch: 2, accumulate: 2 });
  /** One step's loss, the gradients the optimizer got (before clipping), and the step's peak bytes. */
  const step = async (t: Trainer) => {
    let grads: Tensor[] = [];
    const opt = t.opt;
    const real = opt.step.bind(opt);
    opt.step = (o) => {
      grads = t.model.parameters().map((p) => keep(copy(p.grad!)));
      real(o);
    };
    resetPeak();
    const base = memory().liveBytes;
    const loss = (await t.trainStep())!;
    const peak = memory().peakBytes - base;
    opt.step = real;
    const g = await Promise.all(grads.map(async (x) => Float32Array.from(await x.toArray())));
    for (const x of grads) x.dispose();
    return { loss, grads: g, peak };
  };
  try {
    assert.deepEqual(micro.batchOf(3), whole.batchOf(3), "the same windows");
    for (let s = 0; s < 2; s++) {
      const [w, m] = [await step(whole), await step(micro)];
      assert.ok(Math.abs(m.loss - w.loss) <= 1e-6 * w.loss, `step ${s}: loss ${m.loss} against ${w.loss}`);
      w.grads.forEach((g, i) => {
        // summed in another order: errors relative to the parameter's largest gradient
        const scale = new Float32Array(g.length).fill(g.reduce((x, v) => Math.max(x, Math.abs(v)), 0));
        assertClose(m.grads[i], g, { rtol: 1e-5, atol: 0, scale }, `step ${s}: gradient of parameter ${i}`);
      });
      assert.ok(m.peak < w.peak, `step ${s}: peak ${m.peak} bytes with micro-batches, ${w.peak} without`);
    }
    // validation: the windows of the unaccumulated run, run in micro-batches
    const [vw, vm] = [await whole.evaluate(), await micro.evaluate()];
    assert.ok(Math.abs(vm - vw) <= 1e-6 * vw, `validation loss ${vm} against ${vw}`);
    const bad = { ...recipe, batch: 2, accumulate: 0 };
    assert.throws(() => new Trainer(b, data, bad), /TrainConfig.accumulate must be an integer >= 1, got 0/);
  } finally {
    for (const t of [whole, micro]) t.dispose();
    for (const m of [a, b]) m.dispose();
  }
});

Deno.test("train: --accumulate is a recipe flag: its checkpoint keeps it and resumes bit-exact", async () => {
  const root = await Deno.makeTempDir();
  try {
    const run = (args: string[], stopAfter?: number) =>
      trainRun(args, (t) => ({ step: t.step, accumulate: t.config.accumulate }), stopAfter);
    const args = [...small.slice(2), "--accumulate", "2", "--steps", "4"]; // small without its --steps
    assert.deepEqual(await run([...args, "--out", `${root}/a`]), { step: 4, accumulate: 2 });
    const log = JSON.parse(await Deno.readTextFile(`${root}/a/training_log.json`));
    assert.equal(log.train.accumulate, 2);
    // b: interrupted after step 3 and resumed: the same weights as a
    assert.equal((await run([...args, "--out", `${root}/b`], 3)).step, 3);
    assert.deepEqual(await run(["--resume", `${root}/b`]), { step: 4, accumulate: 2 });
    const [wa, wb] = [await weights(`${root}/a`), await weights(`${root}/b`)];
    for (const [k, t] of wa) assert.deepEqual(wb.get(k)!.data, t.data, `${k} differs`);
    assert.throws(
      () => parseTrainArgs(["--accumulate", "0"]),
      /--accumulate must be an integer >= 1, got '0'/,
    );
    assert.throws(
      () => parseTrainArgs(["--resume", `${root}/a`, "--accumulate", "4"]),
      /--accumulate/,
    );
  } finally {
    await Deno.remove(root, { recursive: true });
  }
});

Deno.test("windowsInOrder: B stretches, each read window after window (inputs following each other), wrapping", async () => {
  const { windowsInOrder } = await import("../mamba/train.ts");
  const src = Array.from({ length: 103 }, (_, i) => i);
  // 3 stretches of 34 ids: 6 windows of 5 + 1 ids each
  const rows = (index: number) => {
    const { ids, first } = windowsInOrder(src, "train", 3, 5, index);
    return { rows: [0, 1, 2].map((b) => [...ids.subarray(b * 6, b * 6 + 6)]), first };
  };
  assert.deepEqual(rows(0), {
    rows: [[0, 1, 2, 3, 4, 5], [34, 35, 36, 37, 38, 39], [68, 69, 70, 71, 72, 73]],
    first: true,
  });
  assert.deepEqual(rows(1).rows[0], [5, 6, 7, 8, 9, 10]);
  assert.deepEqual(rows(5), {
    rows: [[25, 26, 27, 28, 29, 30], [59, 60, 61, 62, 63, 64], [93, 94, 95, 96, 97, 98]],
    first: false,
  });
  assert.deepEqual(rows(6), rows(0), "past its last window a stretch starts again");
  assert.throws(
    () => windowsInOrder(src, "val", 20, 5, 0),
    /the val part has 103 ids: 20 stretches of 5, each fewer than seq \+ 1 = 6/,
  );
  assert.throws(() => windowsInOrder(src, "train", 3, 5, -1), /index must be an integer >= 0, got -1/);
});

Deno.test("train: carryState: each step's loss is its windows' loss in one forward over each stretch; stretches wrap from zeros", async () => {
  await init();
  const { tidy } = await import("../core/tensor.ts");
  const { noGrad } = await import("../core/autograd.ts");
  // the char model trained in PyTorch (its state carries what it read: a fresh model's hardly does)
  const lm = await fromPretrained(fixturePath("char-mamba"));
  const V = lm.vocabSize;
  // 400 bytes of its book: a training part of 200, 4 stretches of 50: 3 windows of 16 + 1 each (validation
  // alike)
  const text = await Deno.readFile(new URL("../data/pride_and_prejudice.txt", import.meta.url));
  const ids = [...text.subarray(5000, 5400)];
  const data = new CharDataset(Uint8Array.from(ids), 0.5);
  // a learning rate too small to move a weight in f32: every step sees the same model
  const recipe = {
    ...DEFAULT_TRAIN,
    steps: 6,
    warmup: 0,
    lr: 1e-30,
    minLr: 1e-30,
    weightDecay: 0,
    batch: 2,
    accumulate: 2,
    seq: 16,
    logEvery: 1,
    evalBatches: 3,
    carryState: true,
  };
  const trainer = new Trainer(lm, data, recipe);
  try {
    const losses: number[] = [];
    for (let s = 0; s < 6; s++) {
      losses.push((await trainer.trainStep())!);
      // the states a checkpoint saves: none at a stretch's end (the next step starts from zeros), else
      // h and the conv inputs of each of 2 micro-batches x the layers
      const held = trainer.carriedState().size;
      if ((s + 1) % 3 === 0) assert.equal(held, 0, `states held after step ${s + 1}, a stretch's end`);
      else assert.equal(held, 2 * 2 * lm.config.nLayers, `states held after step ${s + 1}`);
    }
    /** Cross-entropy of each position of `input` (one row) predicting the id after it in `ids` from `at`. */
    const perPositionOf = async (at: number, n: number) => {
      const logits = tidy(() => noGrad(() => lm.forward([ids.slice(at, at + n)]))); // logits: (1, n, V)
      const v = Float32Array.from(await logits.toArray());
      logits.dispose();
      return Array.from({ length: n }, (_, t) => {
        const row = v.subarray(t * V, t * V + V);
        const max = Math.max(...row);
        const lse = max + Math.log(row.reduce((a, x) => a + Math.exp(x - max), 0));
        return lse - row[ids[at + t + 1]];
      });
    };
    const mean = (rows: number[][]) => rows.flat().reduce((a, x) => a + x, 0) / rows.flat().length;
    // the reference: each stretch's first 48 inputs in one forward
    const stretches = await Promise.all([0, 1, 2, 3].map((b) => perPositionOf(b * 50, 48)));
    for (let s = 0; s < 6; s++) {
      const w = s % 3;
      const want = mean(stretches.map((p) => p.slice(16 * w, 16 * w + 16)));
      assert.ok(
        Math.abs(losses[s] - want) <= 1e-5 * want,
        `step ${s}: loss ${losses[s]}, one forward ${want}`,
      );
    }
    // validation: the validation part's 3 windows in order, as one forward over each of its stretches
    const val = await trainer.evaluate();
    const valStretches = await Promise.all([0, 1, 2, 3].map((b) => perPositionOf(200 + b * 50, 48)));
    assert.ok(
      Math.abs(val - mean(valStretches)) <= 1e-5 * val,
      `validation ${val}, one forward ${mean(valStretches)}`,
    );
    // the second window from zeros has another loss: the comparison above can tell a state not carried
    const fromZeros = mean(await Promise.all([0, 1, 2, 3].map((b) => perPositionOf(b * 50 + 16, 16))));
    assert.ok(Math.abs(losses[1] - fromZeros) > 1e-3 * fromZeros, `${losses[1]} against ${fromZeros}`);
  } finally {
    trainer.dispose();
    lm.dispose();
  }
});

Deno.test("train: --carry-state is a recipe flag: its checkpoint holds the carried states and resumes bit-exact", async () => {
  const root = await Deno.makeTempDir();
  try {
    const run = (args: string[], stopAfter?: number) =>
      trainRun(
        args,
        (t) => ({ step: t.step, carryState: t.config.carryState, held: t.carriedState().size }),
        stopAfter,
      );
    const args = [...small.slice(2), "--carry-state", "--steps", "4"]; // small without its --steps
    // one micro-batch of one layer: its h and conv inputs
    assert.deepEqual(await run([...args, "--out", `${root}/a`]), { step: 4, carryState: true, held: 2 });
    const log = JSON.parse(await Deno.readTextFile(`${root}/a/training_log.json`));
    assert.equal(log.train.carryState, true);
    assert.ok(log.files.includes("carried_state.safetensors"), `${log.files}`);
    // b: interrupted after step 3 and resumed from the states it saved: the same weights as a
    assert.equal((await run([...args, "--out", `${root}/b`], 3)).step, 3);
    assert.deepEqual(await run(["--resume", `${root}/b`]), { step: 4, carryState: true, held: 2 });
    const [wa, wb] = [await weights(`${root}/a`), await weights(`${root}/b`)];
    for (const [k, t] of wa) assert.deepEqual(wb.get(k)!.data, t.data, `${k} differs`);
    // a checkpoint without its states is refused, naming the file
    await Deno.remove(`${root}/a/carried_state.safetensors`);
    const text = await Deno.readFile(new URL("../data/pride_and_prejudice.txt", import.meta.url));
    await assert.rejects(
      () => loadTrainingCheckpoint(`${root}/a`, new CharDataset(text)),
      /carried_state.safetensors \(the states of a run with carryState\)/,
    );
    assert.throws(
      () => parseTrainArgs(["--resume", `${root}/a`, "--carry-state"]),
      /--carry-state cannot be used with --resume/,
    );
  } finally {
    await Deno.remove(root, { recursive: true });
  }
});

Deno.test("train: carryState needs data read in order, stretches that hold a window, and a boolean", async () => {
  await init();
  manualSeed(3);
  const lm = new MambaLM({ dModel: 16, nLayers: 1, dState: 16 }, { vocabSize: 11 });
  const ids = Array.from({ length: 3000 }, (_, i) => i % 11);
  const recipe = { ...DEFAULT_TRAIN, steps: 2, warmup: 0, batch: 4, seq: 32, carryState: true };
  try {
    const random = { maxId: 10, windows: new TokenDataset(ids).windows.bind(new TokenDataset(ids)) };
    assert.throws(() => new Trainer(lm, random, recipe), /carryState needs data that reads windows in order/);
    // 2700 training ids in 32 stretches of 84: no window of 101
    assert.throws(
      () => new Trainer(lm, new TokenDataset(ids), { ...recipe, batch: 8, accumulate: 4, seq: 100 }),
      /the train part has 2700 tokens: 32 stretches of 84, each fewer than seq \+ 1 = 101/,
    );
    assert.throws(
      () => new Trainer(lm, new TokenDataset(ids), { ...recipe, carryState: "yes" as unknown as boolean }),
      /TrainConfig.carryState must be true or false, got 'yes'/,
    );
    const t = new Trainer(lm, new TokenDataset(ids), recipe);
    assert.throws(
      () =>
        t.restoreCarriedState(
          new Map([["carry.0.0.h", { shape: [4, 32, 16], data: new Float32Array(2048) }]]),
        ),
      /the carried state carry.0.0.inputs is missing \(1 x 1 caches wanted\)/,
    );
    t.dispose();
  } finally {
    lm.dispose();
  }
});

Deno.test("train: saves not awaited replace the folder in call order; an empty folder beside .prev and mixed parts are caught", async () => {
  await init();
  const root = await Deno.makeTempDir();
  const text = new TextEncoder().encode("hello world, the quick brown fox. ".repeat(40));
  const data = new CharDataset(text);
  const cfg: TrainConfig = { ...DEFAULT_TRAIN, steps: 100, warmup: 1, batch: 2, seq: 16, evalEvery: 1000 };
  const model = new MambaLM({ dModel: 8, nLayers: 1, dState: 4 }, { vocabSize: 256 });
  const t = new Trainer(model, data, cfg);
  const c = `${root}/c`;
  const resumedStep = async (dir: string) => {
    const back = await loadTrainingCheckpoint(dir, data);
    back.model.dispose();
    back.dispose();
    return back.step;
  };
  try {
    await t.trainStep();
    await saveTrainingCheckpoint(t, c, new ByteTokenizer());
    // Three saves in flight at once (a documented pattern): each succeeds, the last called is what stays.
    for (let round = 0; round < 2; round++) {
      const saves: Promise<void>[] = [];
      for (let k = 0; k < 3; k++) {
        await t.trainStep();
        saves.push(saveTrainingCheckpoint(t, c, new ByteTokenizer()));
      }
      await Promise.all(saves);
      assert.equal(await resumedStep(c), t.step, `round ${round}`);
      assert.deepEqual(await names(root), ["c"], `round ${round}: no folder of a save left`);
    }
    // An interrupted save left .prev; a script made an empty <dir> (mkdir -p). A save that then fails at
    // its last rename leaves the checkpoint of .prev, not nothing.
    await Deno.rename(c, `${c}.prev`);
    await Deno.mkdir(c);
    await withFsHook((_, op, [from, to]) => {
      if (op === "rename" && to === c && from.includes(".mambats-tmp-")) {
        throw new Error("injected: no space left");
      }
    }, () => assert.rejects(() => saveTrainingCheckpoint(t, c, new ByteTokenizer()), /injected/));
    assert.equal(await resumedStep(c), t.step);
    // saveCheckpoint refuses the run's folder: its optimizer state and log would no longer match the weights.
    await assert.rejects(
      () => saveCheckpoint(model, c, null),
      /cannot save into .*\/c: it holds a training checkpoint \(training_log\.json\)/,
    );
    // Parts of two saves (a file copied by hand): the resume refuses them, naming the ids.
    await t.trainStep();
    await saveTrainingCheckpoint(t, `${root}/d`, new ByteTokenizer());
    await Deno.copyFile(`${root}/d/optimizer.safetensors`, `${c}/optimizer.safetensors`);
    await assert.rejects(
      () => loadTrainingCheckpoint(c, data),
      /optimizer\.safetensors: the model \(config\.json: \w+\), the optimizer state \(\w+\) and training_log\.json \(\w+\) are not from one save/,
    );
  } finally {
    model.dispose();
    t.dispose();
    await Deno.remove(root, { recursive: true });
  }
});
