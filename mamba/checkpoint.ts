/**
 * Training checkpoints: a folder with `config.json` + `model.safetensors` (the Hugging Face layout, so
 * `fromPretrained` and Python read it), `optimizer.safetensors` (AdamW's m and v by parameter name, step
 * counts in its metadata), `training_log.json` (recipe, loss curve, step) and `tokenizer.json`.
 *
 * The folder is replaced as a whole: everything is written into `<dir>.tmp-<random>`, then the old folder
 * is moved to `<dir>.prev`, the new one into place, and `.prev` removed. A crash at any point leaves a
 * complete checkpoint under `<dir>` or `<dir>.prev` (which `loadTrainingCheckpoint` falls back to).
 * @module
 */

import { serializeSafetensors } from "../core/safetensors.ts";
import { readSafetensorsFile } from "../core/safetensors_fs.ts";
import type { MambaLM } from "./lm.ts";
import { fromPretrained, saveCheckpoint } from "./pretrained.ts";
import { type CharDataset, type TrainConfig, Trainer, type TrainLog } from "./train.ts";

/** What `training_log.json` holds. */
export interface TrainingState {
  /** Completed steps. */
  step: number;
  /** The recipe. */
  train: TrainConfig;
  /** The loss curve. */
  log: TrainLog;
  /** Train losses of the steps after the last logged mean. */
  pendingLosses?: number[];
}

async function exists(path: string): Promise<boolean> {
  try {
    await Deno.lstat(path);
    return true;
  } catch {
    return false;
  }
}

/** Writes a complete checkpoint of a run into `dir`, replacing the previous one only once it is complete. */
export async function saveTrainingCheckpoint(
  dir: string,
  trainer: Trainer,
  tokenizerJson: unknown,
): Promise<void> {
  const tmp = `${dir}.tmp-${crypto.randomUUID().slice(0, 8)}`;
  try {
    await Deno.mkdir(tmp, { recursive: true });
    await saveCheckpoint(trainer.model, tmp);
    const state = trainer.opt.stateDict();
    const tensors: Record<string, { shape: number[]; data: Float32Array }> = {};
    for (const [k, t] of state.tensors) {
      tensors[k] = { shape: [...t.shape], data: (await t.toArray()) as Float32Array };
    }
    await Deno.writeFile(
      `${tmp}/optimizer.safetensors`,
      serializeSafetensors(tensors, {
        step: String(state.step),
        paramSteps: JSON.stringify(state.paramSteps),
      }),
    );
    const log: TrainingState = {
      step: trainer.step,
      train: trainer.config,
      log: trainer.log,
      pendingLosses: await trainer.pendingLosses(),
    };
    await Deno.writeTextFile(`${tmp}/training_log.json`, JSON.stringify(log) + "\n");
    await Deno.writeTextFile(`${tmp}/tokenizer.json`, JSON.stringify(tokenizerJson, null, 1) + "\n");
    // Make the new folder durable before it replaces the old one.
    for (const e of Deno.readDirSync(tmp)) {
      const f = await Deno.open(`${tmp}/${e.name}`, { read: true });
      await f.syncData();
      f.close();
    }
  } catch (e) {
    await Deno.remove(tmp, { recursive: true }).catch(() => {});
    throw new Error(`cannot write checkpoint ${dir}: ${(e as Error).message}`, { cause: e });
  }
  const prev = `${dir}.prev`;
  await Deno.remove(prev, { recursive: true }).catch(() => {});
  if (await exists(dir)) await Deno.rename(dir, prev);
  await Deno.rename(tmp, dir);
  await Deno.remove(prev, { recursive: true }).catch(() => {});
}

/** The folder to read: `dir`, or `<dir>.prev` when a save was interrupted between its two renames. */
async function resolveDir(dir: string): Promise<string> {
  if (await exists(`${dir}/training_log.json`)) return dir;
  if (await exists(`${dir}.prev/training_log.json`)) return `${dir}.prev`;
  throw new Error(`${dir} is not a training checkpoint (no training_log.json)`);
}

/** Loads a run to continue it: the model, the optimizer state, the step and the log. */
export async function loadTrainingCheckpoint(dir: string, data: CharDataset): Promise<Trainer> {
  const from = await resolveDir(dir);
  let state: TrainingState;
  try {
    state = JSON.parse(await Deno.readTextFile(`${from}/training_log.json`));
  } catch (e) {
    throw new Error(`${from}/training_log.json is not valid: ${(e as Error).message}`);
  }
  const model: MambaLM = await fromPretrained(from, { tokenizer: false });
  const trainer = new Trainer(model, data, state.train);
  try {
    const opt = await readSafetensorsFile(`${from}/optimizer.safetensors`);
    const meta = opt.header.metadata;
    trainer.opt.loadStateDict({
      step: Number(meta.step),
      paramSteps: JSON.parse(meta.paramSteps ?? "{}"),
      tensors: new Map([...opt.tensors].map(([k, t]) => [k, { shape: t.shape, data: t.data }])),
    });
  } catch (e) {
    trainer.dispose();
    model.dispose();
    throw new Error(`${from}/optimizer.safetensors: ${(e as Error).message}`, { cause: e });
  }
  trainer.step = state.step;
  trainer.log = state.log;
  trainer.restorePendingLosses(state.pendingLosses ?? []);
  return trainer;
}
