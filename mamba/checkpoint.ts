/**
 * Training checkpoints (Deno): a folder with `config.json` + `model.safetensors` (the Hugging Face layout, so
 * `fromPretrained` and Python read it), `optimizer.safetensors` (AdamW's m and v by parameter name, step
 * counts in its metadata), `training_log.json` (recipe, loss curve, step, and the list of the folder's files)
 * and `tokenizer.json`, plus any files the caller adds (`deno task train` adds its loss chart).
 *
 * The folder is replaced as a whole: everything is written and fsynced into `<dir>.mambats-tmp-<random>`,
 * then the old folder is moved to `<dir>.prev`, the new one into place, and `.prev` removed (renamed to
 * `<dir>.mambats-del-<random>` first, so that a removal cut short leaves no half-deleted `.prev`). A crash at
 * any point leaves a complete checkpoint under `<dir>` or `<dir>.prev`: `loadTrainingCheckpoint` falls back to
 * `.prev`, and the next save first moves `.prev` back. A save never deletes files it did not write: it
 * refuses to replace a non-empty folder that is not a checkpoint, or a checkpoint holding other files.
 * @module
 */

import { normalize } from "node:path";
import { serializeSafetensors } from "../core/safetensors.ts";
import type { MambaConfig } from "./config.ts";
import { readSafetensorsFile } from "../core/safetensors_fs.ts";
import { loadTokenizer } from "./model_sources.ts";
import {
  checkpointFilesOf,
  fromPretrained,
  hfTensors,
  type PretrainedLM,
  SAVE_ID,
  tokenizerFilesFor,
} from "./pretrained.ts";
import { inOrder, syncDir, writeFiles } from "./pretrained_fs.ts";
import type { Tokenizer } from "./tokenizer.ts";
import type { Tensor } from "../core/tensor.ts";
import {
  checkFiniteLosses,
  type TrainConfig,
  type TrainData,
  Trainer,
  type TrainLog,
  validateTrainConfig,
} from "./train.ts";

/** What `training_log.json` holds. JSON has no NaN nor infinities: numbers that are not finite (a `clip` of
 * Infinity, a loss that diverged) are written as the strings "NaN", "Infinity" and "-Infinity". */
export interface TrainingState {
  /** Completed steps. */
  step: number;
  /** The recipe. */
  train: TrainConfig;
  /** The loss curve. */
  log: TrainLog;
  /** Train losses of the steps after the last logged mean. */
  pendingLosses?: number[];
  /**
   * The files the save wrote into the folder (a later save replaces the folder only if it holds no others).
   * Absent in checkpoints written before it existed.
   */
  files?: string[];
  /**
   * The embedding's padding row (see `LMOptions.paddingIdx`), which config.json holds too (`padding_idx`, ours);
   * a resumed run takes it from here. Absent in checkpoints written before it existed: 0, mamba.py's.
   */
  paddingIdx?: number | null;
  /**
   * How the model ran (`MambaConfig.scan` and `recompute`): config.json's HF layout has neither, so a resumed
   * run takes them from here. Absent in checkpoints written before it existed: the defaults.
   */
  model?: { scan: MambaConfig["scan"]; recompute: MambaConfig["recompute"] };
  /**
   * The run's data: its fingerprint (`TrainData.fingerprint`), which a resume checks, and where it came from
   * when the save was told (`SaveTrainingOptions.dataSource`). Absent in checkpoints written before it existed
   * and for data without a fingerprint: not checked.
   */
  data?: { fingerprint?: string; source?: string };
  /** The save's id, also in config.json and both safetensors files' metadata: a resume checks that they are
   * from one save. Absent in checkpoints written before it existed: not checked. */
  saveId?: string;
}

/** {@linkcode loadTrainingCheckpoint}'s refusal of data that is not the run's; `what` says so without naming
 * the way on (`otherData: true` here, a program's own flag in its message). */
export class DataMismatchError extends Error {
  /** Creates the error. */
  constructor(readonly what: string) {
    super(
      `${what} (otherData: true; or start a new run from the weights: fromPretrained, deno task train --from)`,
    );
  }
}

/** Options of {@linkcode loadTrainingCheckpoint}. */
export interface ResumeOptions {
  /** How the resumed model runs its scan (default: as the saved run did). */
  scan?: MambaConfig["scan"];
  /** What each block keeps for the backward (default: as the saved run did); it changes memory, not results. */
  recompute?: MambaConfig["recompute"];
  /** Goes on with data other than the run's (another fingerprint than the saved one). Default false: an error,
   * since a resume continues a run on its own data. */
  otherData?: boolean;
}

/** Options of {@linkcode saveTrainingCheckpoint}. */
export interface SaveTrainingOptions {
  /**
   * More files to write into the checkpoint (file name -> content), e.g. a loss chart. They are written with
   * the rest and replace the folder with it, atomically. Names are plain file names, not the checkpoint's own.
   */
  files?: Record<string, Uint8Array | string>;
  /** Where the run's data comes from (e.g. its text file), kept for a resume that is not told
   * (`TrainingState.data.source`: `deno task train --resume` without `--data`). */
  dataSource?: string;
}

/** The files every training checkpoint has. */
const CHECKPOINT_FILES = [
  "config.json",
  "model.safetensors",
  "optimizer.safetensors",
  "training_log.json",
  "tokenizer.json",
];
/** The states a run with `carryState` goes on from (`Trainer.carriedState`), by name. */
const CARRIED_FILE = "carried_state.safetensors";
/** The files of checkpoints whose training_log.json has no `files` (deno task train added the loss chart). */
const LEGACY_FILES = [...CHECKPOINT_FILES, "loss.json", "loss.svg"];
/** The suffix of a save's new folder: `<dir>.mambats-tmp-` and 8 hex digits. Marked as ours (as saveFiles'
 * temporary files are), since cleanup deletes such folders: a user's `run.tmp-20250101` must not look like
 * one. */
const TMP_SUFFIX = /\.mambats-tmp-[0-9a-f]{8}$/;

function tmpSuffix(): string {
  return `.mambats-tmp-${crypto.randomUUID().slice(0, 8)}`;
}

/** The suffix of a folder of ours renamed to be deleted: `<dir>.mambats-del-` and 8 hex digits. */
const DEL_SUFFIX = /\.mambats-del-[0-9a-f]{8}$/;

/** The suffix of writeFileAtomic's temporary files (inside a save's new folder): `.tmp-` and 8 hex digits. */
const FILE_TMP_SUFFIX = /\.tmp-[0-9a-f]{8}$/;

/**
 * Deletes `<dir>.prev`, a checkpoint of ours, by first renaming it to `<dir>.mambats-del-<random>` (atomic),
 * then removing that: a removal cut short (a crash, a file held open) leaves a folder that the next save
 * deletes, never a half-deleted `.prev` that would look foreign to every later save.
 */
async function discard(prev: string): Promise<void> {
  const doomed = `${prev.replace(/\.prev$/, "")}.mambats-del-${crypto.randomUUID().slice(0, 8)}`;
  await Deno.rename(prev, doomed);
  await Deno.remove(doomed, { recursive: true });
}

/** JSON has no NaN nor infinities (JSON.stringify writes null): training_log.json writes them as strings. */
function jsonNumber(x: number): number | string {
  return Number.isFinite(x) ? x : String(x);
}

/** A number of training_log.json (see {@linkcode jsonNumber}); `what` names it in the error. With `legacy`, a
 * null is the NaN or infinity that files written before the strings had there (JSON.stringify wrote null). */
function readNumber(v: unknown, what: string, legacy: number | null = null): number {
  if (typeof v === "number") return v;
  if (v === null && legacy !== null) return legacy;
  if (v === "NaN" || v === "Infinity" || v === "-Infinity") return Number(v);
  throw new Error(`${what} must be a number, got ${JSON.stringify(v)}`);
}

/** The saved loss curve, checked: lists of [step, number] pairs. */
function readLog(log: unknown): TrainLog {
  const out: TrainLog = { train: [], val: [], time: [] };
  if (typeof log !== "object" || log === null) {
    throw new Error(`log must be an object, got ${JSON.stringify(log)}`);
  }
  for (const key of ["train", "val", "time"] as const) {
    const rows = (log as Record<string, unknown>)[key] ?? [];
    if (!Array.isArray(rows)) throw new Error(`log.${key} must be a list of [step, value] pairs`);
    out[key] = rows.map((row, i) => {
      if (!Array.isArray(row) || row.length !== 2 || !Number.isInteger(row[0])) {
        throw new Error(`log.${key}[${i}] must be a [step, value] pair, got ${JSON.stringify(row)}`);
      }
      return [row[0], readNumber(row[1], `log.${key}[${i}][1]`, NaN)];
    });
  }
  return out;
}

function needDeno(what: string): void {
  if (typeof (globalThis as { Deno?: unknown }).Deno === "undefined") {
    throw new Error(`${what} reads and writes folders with Deno's file system (in a page: checkpointFiles)`);
  }
}

/** `dir` without trailing separators, its parent folder and its last name; throws for names we cannot use. */
function splitDir(dir: string): { path: string; parent: string; base: string } {
  if (typeof dir !== "string" || dir === "") {
    throw new Error(`the checkpoint folder must be a path, got '${dir}'`);
  }
  // `.` and `..` resolved first (as the OS would where the folders exist): Deno's remove does not resolve a
  // `..` after a folder that does not exist yet, where mkdir and lstat do
  const path = normalize(dir).replace(/(?<=.)[\\/]+$/, "");
  const i = Math.max(path.lastIndexOf("/"), path.lastIndexOf("\\"));
  const base = path.slice(i + 1);
  if (base === "" || base === "." || base === "..") {
    throw new Error(`the checkpoint folder must end in a folder name, got '${dir}'`);
  }
  return { path, parent: i < 0 ? "." : i === 0 ? path[0] : path.slice(0, i), base };
}

function listNames(names: string[]): string {
  const shown = names.slice(0, 5).join(", ");
  return names.length > 5 ? `${shown} and ${names.length - 5} more` : shown;
}

/**
 * What is at `path`: nothing; ours to replace (an empty folder, or a checkpoint holding only the files its
 * save wrote); or something else, with why it is not ours.
 */
async function inspect(
  path: string,
): Promise<{ kind: "missing" | "empty" | "ours" } | { kind: "foreign"; why: string }> {
  let info: Deno.FileInfo;
  try {
    info = await Deno.lstat(path);
  } catch (e) {
    if (e instanceof Deno.errors.NotFound) return { kind: "missing" };
    throw e;
  }
  if (info.isSymlink) return { kind: "foreign", why: "it is a symbolic link (name the folder it points to)" };
  if (!info.isDirectory) return { kind: "foreign", why: "it is a file, not a folder" };
  const entries: Deno.DirEntry[] = [];
  for await (const e of Deno.readDir(path)) entries.push(e);
  if (entries.length === 0) return { kind: "empty" }; // (mkdir -p): no checkpoint, nothing to lose
  const names = entries.map((e) => e.name).sort();
  if (!names.includes("training_log.json")) {
    return {
      kind: "foreign",
      why: `it is not a training checkpoint (no training_log.json) and holds ${listNames(names)}`,
    };
  }
  let written: string[];
  try {
    const files = (JSON.parse(await Deno.readTextFile(`${path}/training_log.json`)) as TrainingState).files;
    if (files !== undefined && !(Array.isArray(files) && files.every((f) => typeof f === "string"))) {
      throw new Error("its files entry is not a list of names");
    }
    written = files ?? LEGACY_FILES;
  } catch (e) {
    return { kind: "foreign", why: `its training_log.json is not valid (${(e as Error).message})` };
  }
  const others = entries.filter((e) => !(e.isFile && written.includes(e.name))).map((e) => e.name).sort();
  if (others.length > 0) {
    return {
      kind: "foreign",
      why: `it holds files the checkpoint does not: ${listNames(others)} (move them out of it)`,
    };
  }
  return { kind: "ours" };
}

function refusal(path: string, target: string, why: string): Error {
  const what = target === path ? path : `${target} (the folder a save keeps the previous checkpoint in)`;
  return new Error(
    `cannot write checkpoint ${path}: refusing to replace ${what}: ${why}; choose another folder`,
  );
}

/**
 * Throws the refusal {@linkcode saveTrainingCheckpoint} would give for `dir` (Deno), or the error of a folder
 * it could not write in (no permission, a read-only file system): lets a program stop before training rather
 * than at its first save. Resolves when a save may write there. It makes and removes an empty folder where
 * the save would make its own (in `dir`'s parent, or the nearest folder above it that exists).
 */
export async function checkCheckpointFolder(dir: string): Promise<void> {
  needDeno("checkCheckpointFolder");
  const { path, parent, base } = splitDir(dir);
  const prev = `${path}.prev`;
  const prevKind = await inspect(prev);
  if (prevKind.kind === "foreign") throw refusal(path, prev, prevKind.why);
  const cur = await inspect(path);
  if (cur.kind === "foreign") throw refusal(path, path, cur.why);
  let at = parent; // a save makes the folders up to its parent: the first of them is made where one exists
  while (!(await Deno.lstat(at).then(() => true, (e) => !(e instanceof Deno.errors.NotFound)))) {
    const up = splitDir(at).parent;
    if (up === at) break;
    at = up;
  }
  const probe = `${at}/${base}${tmpSuffix()}`;
  try {
    await Deno.mkdir(probe);
  } catch (e) {
    throw new Error(`cannot write checkpoint ${path}: ${(e as Error).message}`, { cause: e });
  }
  await Deno.remove(probe);
}

/** The names of the temporary folders of the saves in flight (this process), which removeOrphans leaves. */
const savesInFlight = new Set<string>();

/**
 * Removes the `<base>.mambats-tmp-*` folders that interrupted saves left in `parent` and the
 * `<base>.mambats-del-*` ones that a deletion cut short left (see {@linkcode discard}), each only if it holds
 * nothing but files a save writes (or, a `-del-` one, a checkpoint whose training_log.json lists what it
 * holds): a save deletes no files of others. Folders named `<base>.tmp-*` or `<base>.del-*` by versions before
 * the `mambats-` names are left: nothing tells them from a user's own (`run.tmp-20250101`).
 */
async function removeOrphans(parent: string, base: string, names: string[]): Promise<void> {
  let entries: Deno.DirEntry[];
  try {
    entries = await Array.fromAsync(Deno.readDir(parent));
  } catch {
    return;
  }
  for (const e of entries) {
    if (
      !e.isDirectory || !e.name.startsWith(base) || e.name.length !== base.length + ".mambats-tmp-".length + 8
    ) {
      continue;
    }
    const path = `${parent}/${e.name}`;
    if (!TMP_SUFFIX.test(e.name) && !DEL_SUFFIX.test(e.name)) continue;
    try {
      const inside = await Array.fromAsync(Deno.readDir(path));
      // a new folder's files (some under their temporary names), or what is left of an old checkpoint
      const ours = (f: Deno.DirEntry) =>
        f.isFile &&
        [names, LEGACY_FILES, ["tokenizer_config.json"]].some((n) =>
          n.includes(f.name.replace(FILE_TMP_SUFFIX, ""))
        );
      const known = !savesInFlight.has(e.name) &&
        (inside.every(ours) || (DEL_SUFFIX.test(e.name) && (await inspect(path)).kind !== "foreign"));
      if (known) await Deno.remove(path, { recursive: true });
    } catch {
      // left for the next save
    }
  }
}

/**
 * Writes a complete checkpoint of `trainer`'s run into `dir` (Deno; the run first, then where, as
 * {@linkcode saveCheckpoint}'s model and folder), replacing the previous one only once the new one
 * is complete; `options.files` adds files to it. Refuses (and writes nothing) when `dir` or `<dir>.prev` is a
 * non-empty folder that is not a checkpoint, or a checkpoint holding files its save did not write. Errors
 * name `dir`. `tokenizer` is required: the run's {@linkcode Tokenizer} (one with `toFiles()`, as
 * `ByteTokenizer` and `HubTokenizer`: its `tokenizer.json`, and `tokenizer_config.json` when it has one), or
 * the parsed `tokenizer.json` itself (any JSON value); undefined, or anything else that is not JSON, throws.
 * The run is read as it is at the call: steps taken before the promise resolves are in none of the files.
 * A diverged run is refused (a loss since the last readback, or a weight, that is not finite: the message says
 * `training diverged` and the step, or names the tensor), and `dir` keeps what it held.
 */
export async function saveTrainingCheckpoint(
  trainer: Trainer,
  dir: string,
  tokenizer: Tokenizer | unknown,
  options: SaveTrainingOptions = {},
): Promise<void> {
  needDeno("saveTrainingCheckpoint");
  if (!(trainer instanceof Trainer) || typeof dir !== "string") {
    // (the folder came first until 2026-12-02: a call written so is named, not a crash inside)
    const got = typeof trainer === "string"
      ? "a folder name first"
      : `a ${typeof trainer} and a ${typeof dir}`;
    throw new Error(
      `saveTrainingCheckpoint(trainer, dir, tokenizer): takes the Trainer first, then the folder; got ${got}`,
    );
  }
  const { path, parent, base } = splitDir(dir);
  let tok: { tokenizer: unknown; config?: unknown };
  try {
    if (tokenizer === null || tokenizer === undefined) {
      throw new Error(
        `the run's tokenizer is required, got ${tokenizer} (a model loaded without one: pass a Tokenizer, ` +
          "e.g. new ByteTokenizer() or tokenizerFromJSON(json))",
      );
    }
    // a Tokenizer (checked as checkpointFiles checks it), or a parsed tokenizer.json
    tok = typeof (tokenizer as Tokenizer).encode === "function"
      ? tokenizerFilesFor(trainer.model, tokenizer as Tokenizer)
      : { tokenizer };
  } catch (e) {
    throw new Error(`cannot write checkpoint ${path}: ${(e as Error).message}`, { cause: e });
  }
  // a run with carryState saves the states its rows go on from (none where the next step starts them again)
  const carried = trainer.config.carryState ? trainer.carriedState() : null;
  const own = [
    ...CHECKPOINT_FILES,
    ...(tok.config === undefined ? [] : ["tokenizer_config.json"]),
    ...(carried ? [CARRIED_FILE] : []),
  ];
  const extra = Object.entries(options.files ?? {});
  for (const [name, content] of extra) {
    if (!/^[^\\/]+$/.test(name) || name === "." || name === ".." || own.includes(name)) {
      throw new Error(
        `cannot write checkpoint ${path}: options.files: '${name}' must be a plain file name ` +
          `other than ${own.join(", ")}`,
      );
    }
    if (typeof content !== "string" && !(content instanceof Uint8Array)) {
      throw new Error(`cannot write checkpoint ${path}: options.files['${name}'] must be a string or bytes`);
    }
  }
  const names = [...own, ...extra.map(([n]) => n)].sort();
  const prev = `${path}.prev`;

  const wrap = (e: unknown) =>
    (e as Error).message.startsWith("cannot write checkpoint")
      ? e
      : new Error(`cannot write checkpoint ${path}: ${(e as Error).message}`, { cause: e });

  // The run as it is at the call, its readbacks recorded before the first wait: steps taken while the files
  // are written (a save not awaited) end up in none of them.
  const state = trainer.opt.stateDict();
  const inFlight = trainer.logsInFlight(); // readbacks started before the call: their rows belong to it
  inFlight.catch(() => {}); // awaited below
  const { scan, recompute } = trainer.model.config;
  const pairs = (rows: [number, number][]) => rows.map(([step, x]) => [step, jsonNumber(x)]);
  const log = {
    step: trainer.step,
    train: { ...trainer.config, clip: jsonNumber(trainer.config.clip) }, // clip may be Infinity
    log: { train: pairs(trainer.log.train), val: pairs(trainer.log.val), time: pairs(trainer.log.time) },
    pendingLosses: [] as (number | string)[],
    files: names,
    paddingIdx: trainer.model.embedding.paddingIdx,
    model: { scan, recompute },
    data: { fingerprint: trainer.data.fingerprint?.(), source: options.dataSource },
    saveId: undefined as string | undefined,
  };
  const read = Promise.all([
    hfTensors(trainer.model),
    Promise.all([...state.tensors.values()].map((t) => t.toArray())),
    trainer.pendingLosses(),
    Promise.all(
      [...(carried ?? new Map<string, Tensor>())].map(async ([k, t]) => [k, t, await t.toArray()] as const),
    ),
  ]);
  read.catch(() => {}); // awaited below, unless the save is refused first
  // The run is read: the folder is replaced after the saves to it called before this one (saves not awaited
  // raced, and an older state could replace a newer one).
  return await inOrder(path, () => replaceFolder());

  async function replaceFolder(): Promise<void> {
    // An interrupted save can leave the checkpoint under .prev alone: move it back first, so that one stays in
    // place until the new one is complete.
    let prevKind: Awaited<ReturnType<typeof inspect>>;
    let cur: Awaited<ReturnType<typeof inspect>>;
    try {
      prevKind = await inspect(prev);
      if (prevKind.kind === "foreign") throw refusal(path, prev, prevKind.why);
      cur = await inspect(path);
      // an empty folder is none: .prev, the checkpoint, goes back in its place
      if (cur.kind === "empty" && prevKind.kind === "ours") {
        await Deno.remove(path);
        cur = { kind: "missing" };
      }
      if (cur.kind === "missing" && prevKind.kind === "ours") {
        await Deno.rename(prev, path);
        await syncDir(parent);
        [cur, prevKind] = [{ kind: "ours" }, { kind: "missing" }];
      }
      if (cur.kind === "foreign") throw refusal(path, path, cur.why);
    } catch (e) {
      throw wrap(e);
    }

    const tmp = `${path}${tmpSuffix()}`;
    savesInFlight.add(tmp.slice(parent.length + 1));
    try {
      await Deno.mkdir(parent, { recursive: true });
      await Deno.mkdir(tmp);
      const [weights, optData, losses, carriedData] = await read;
      // A diverged run never replaces a checkpoint: its losses since the last readback (which waits for
      // logEvery steps) are checked here (and those a readback in flight at the call checks, as it logs them),
      // and its weights (a step whose loss was finite can still have written NaN into them).
      try {
        const rows = await inFlight;
        log.log.train.push(...pairs(rows.train));
        log.log.val.push(...pairs(rows.val));
        checkFiniteLosses(losses, log.step - losses.length);
      } catch (e) {
        throw new Error(
          `cannot write checkpoint ${path}: ${(e as Error).message}; ${path} keeps what it held`,
          {
            cause: e,
          },
        );
      }
      const bad = Object.entries(weights).find(([, t]) => !t.data.every(Number.isFinite));
      if (bad) {
        throw new Error(
          `cannot write checkpoint ${path}: ${
            bad[0]
          } holds values that are not finite (the run diverged by ` +
            `step ${log.step}); ${path} keeps what it held`,
        );
      }
      const hf = checkpointFilesOf(trainer.model, weights, null); // the tokenizer's files below
      // the save's id, as checkpointFilesOf wrote it into config.json and model.safetensors, in every part
      const saveId = JSON.parse(new TextDecoder().decode(hf["config.json"]))[SAVE_ID];
      log.saveId = saveId;
      await writeFiles(tmp, hf);
      const tensors: Record<string, { shape: number[]; data: Float32Array }> = {};
      [...state.tensors].forEach(([k, t], i) =>
        tensors[k] = { shape: [...t.shape], data: optData[i] as Float32Array }
      );
      await Deno.writeFile(
        `${tmp}/optimizer.safetensors`,
        serializeSafetensors(tensors, {
          step: String(state.step),
          paramSteps: JSON.stringify(state.paramSteps),
          [SAVE_ID]: saveId,
        }),
      );
      if (carried) {
        const tensors: Record<string, { shape: number[]; data: Float32Array }> = {};
        for (const [k, t, data] of carriedData) {
          tensors[k] = { shape: [...t.shape], data: data as Float32Array };
        }
        await Deno.writeFile(`${tmp}/${CARRIED_FILE}`, serializeSafetensors(tensors));
      }
      log.pendingLosses = losses.map(jsonNumber);
      await Deno.writeTextFile(`${tmp}/training_log.json`, JSON.stringify(log) + "\n");
      const tokText = JSON.stringify(tok.tokenizer, null, 1);
      if (tokText === undefined) {
        throw new Error(`the tokenizer is not a JSON value or a Tokenizer (got ${typeof tok.tokenizer})`);
      }
      await Deno.writeTextFile(`${tmp}/tokenizer.json`, tokText + "\n");
      if (tok.config !== undefined) {
        await Deno.writeTextFile(`${tmp}/tokenizer_config.json`, JSON.stringify(tok.config, null, 2) + "\n");
      }
      for (const [name, content] of extra) {
        const bytes = typeof content === "string" ? new TextEncoder().encode(content) : content;
        await Deno.writeFile(`${tmp}/${name}`, bytes);
      }
      // Make the new folder durable before it replaces the old one.
      for await (const e of Deno.readDir(tmp)) {
        const f = await Deno.open(`${tmp}/${e.name}`, { read: true });
        try {
          await f.syncData();
        } finally {
          f.close();
        }
      }
      await syncDir(tmp);
    } catch (e) {
      await Deno.remove(tmp, { recursive: true }).catch(() => {});
      savesInFlight.delete(tmp.slice(parent.length + 1));
      throw wrap(e);
    }

    let moved = false;
    try {
      // The folder may have changed while the new one was written: look again.
      cur = await inspect(path);
      if (cur.kind === "foreign") throw refusal(path, path, cur.why);
      if (cur.kind === "empty") {
        await Deno.remove(path); // (an empty folder is none: .prev is discarded only for a checkpoint in place)
        cur = { kind: "missing" };
      }
      // Both present: .prev is what an interrupted save had left behind after putting its folder in place.
      if (prevKind.kind === "ours" && cur.kind === "ours") await discard(prev);
      if (cur.kind === "ours") {
        await Deno.rename(path, prev);
        moved = true;
      }
      await Deno.rename(tmp, path);
      moved = false;
      await syncDir(parent);
    } catch (e) {
      if (moved) await Deno.rename(prev, path).catch(() => {}); // the old checkpoint back in place
      await Deno.remove(tmp, { recursive: true }).catch(() => {});
      throw wrap(e);
    } finally {
      savesInFlight.delete(tmp.slice(parent.length + 1));
    }
    if (cur.kind === "ours") {
      await discard(prev).catch(() => {}); // the next save removes it otherwise
      await syncDir(parent);
    }
    await removeOrphans(parent, base, names);
  }
}

/** training_log.json's content, checked where a resume reads it unchecked (the recipe is the Trainer's to check). */
function readTrainingState(json: unknown): TrainingState {
  if (typeof json !== "object" || json === null) throw new Error("it is not an object");
  const state = { ...json } as TrainingState;
  if (!Number.isInteger(state.step) || state.step < 0) {
    throw new Error(`step must be an integer >= 0, got ${JSON.stringify(state.step)}`);
  }
  const train = state.train as unknown as Record<string, unknown> | undefined;
  if (train && typeof train === "object") {
    // clip: Infinity was written as null before it was written as "Infinity" (no other clip is valid JSON null)
    state.train = {
      ...state.train,
      clip: readNumber(train.clip, "train.clip", Infinity),
    };
  }
  state.log = readLog(state.log);
  const pending: unknown = state.pendingLosses ?? [];
  if (!Array.isArray(pending)) throw new Error("pendingLosses must be a list of losses");
  state.pendingLosses = pending.map((x, i) => readNumber(x, `pendingLosses[${i}]`, NaN));
  if (state.model !== undefined) {
    const { scan, recompute } = state.model ?? {};
    if (!["fused", "pscan", "sequential"].includes(scan as string)) {
      throw new Error(`model.scan must be "fused", "pscan" or "sequential", got ${JSON.stringify(scan)}`);
    }
    if (recompute !== true && recompute !== false && recompute !== "input") {
      throw new Error(`model.recompute must be true, false or "input", got ${JSON.stringify(recompute)}`);
    }
  }
  if (state.data !== undefined) {
    if (typeof state.data !== "object" || state.data === null) {
      throw new Error(`data must be an object, got ${JSON.stringify(state.data)}`);
    }
    const { fingerprint, source } = state.data;
    for (const [k, v] of [["fingerprint", fingerprint], ["source", source]]) {
      if (v !== undefined && typeof v !== "string") throw new Error(`data.${k} must be a string, got ${v}`);
    }
  }
  return state;
}

/** The folder to read: `dir`, or `<dir>.prev` when a save was interrupted between its two renames. */
async function resolveDir(dir: string): Promise<string> {
  const { path } = splitDir(dir);
  const has = (p: string) => Deno.lstat(p).then(() => true, () => false);
  if (await has(`${path}/training_log.json`)) return path;
  if (await has(`${path}.prev/training_log.json`)) return `${path}.prev`;
  if (!(await has(path)) && !(await has(`${path}.prev`))) {
    throw new Error(
      `there is no folder ${path} to resume: train a run there first (\`deno task train --out ${path}\`, ` +
        `or saveTrainingCheckpoint)`,
    );
  }
  throw new Error(`${path} is not a training checkpoint (no training_log.json)`);
}

/**
 * Loads a run to continue it (Deno): the model, the optimizer state, the step and the log. `data` is the
 * run's data, or a function that makes it from the checkpoint's tokenizer (its `tokenizer.json`, read as
 * `fromPretrained` reads it), for data that must be encoded by the run's own tokenizer; the function also gets
 * where the run's data came from, when its save was told (`SaveTrainingOptions.dataSource`). Data whose
 * fingerprint differs from the run's is refused (`options.otherData` goes on with it). The caller disposes
 * both `trainer` and `trainer.model` (a `PretrainedLM`, with the tokenizer when `data` is a function):
 * `trainer.dispose()` frees the optimizer state and the loss log, not the model.
 */
export async function loadTrainingCheckpoint(
  dir: string,
  data: TrainData | ((tokenizer: Tokenizer, source?: string) => TrainData | Promise<TrainData>),
  options: ResumeOptions = {},
): Promise<Trainer> {
  needDeno("loadTrainingCheckpoint");
  const from = await resolveDir(dir);
  let state: TrainingState;
  try {
    state = readTrainingState(JSON.parse(await Deno.readTextFile(`${from}/training_log.json`)));
  } catch (e) {
    throw new Error(`${from}/training_log.json is not valid: ${(e as Error).message}`, { cause: e });
  }
  // A checkpoint's tokenizer.json may be any JSON: read it only for a caller that needs the tokenizer.
  let tokenizer: Tokenizer | false = false;
  if (typeof data === "function") {
    tokenizer = await loadTokenizer(from).catch((e) => {
      const why =
        `the data of this resume is made from the run's tokenizer: ${from} needs a tokenizer.json ` +
        "that fromPretrained reads, or pass the data itself";
      throw new Error(`${(e as Error).message} (${why})`, { cause: e });
    });
  }
  const model: PretrainedLM = await fromPretrained(from, {
    tokenizer,
    scan: options.scan ?? state.model?.scan,
    recompute: options.recompute ?? state.model?.recompute,
  });
  if (typeof data === "function") {
    try {
      data = await data(model.tokenizer!, state.data?.source);
    } catch (e) {
      model.dispose();
      throw e;
    }
  }
  const [saved, given] = [state.data?.fingerprint, data.fingerprint?.()];
  if (saved !== undefined && given !== undefined && saved !== given && !options.otherData) {
    model.dispose();
    throw new DataMismatchError(
      `cannot resume ${from} with this data: the run trained on ${saved}${
        state.data?.source ? ` (${state.data.source})` : ""
      }, this data is ${given}. Resume with the run's own data, or go on with this one`,
    );
  }
  let trainer: Trainer;
  try {
    // fromPretrained builds HF's embedding, without a padding row; the run keeps its own.
    model.embedding.paddingIdx = state.paddingIdx === undefined ? 0 : state.paddingIdx;
    const { lr, minLr } = state.train ?? {};
    if (typeof lr === "number" && typeof minLr === "number" && minLr > lr) {
      // validateTrainConfig's message suggests setting both, which a resume cannot
      throw new Error(
        `train.minLr (${minLr}) is above train.lr (${lr}): this run's schedule rose instead of decaying, which ` +
          "a Trainer refuses since 2026-11-29; set train.minLr <= train.lr in this file to resume it",
      );
    }
    validateTrainConfig(state.train);
  } catch (e) {
    model.dispose();
    throw new Error(`${from}/training_log.json: ${(e as Error).message}`, { cause: e });
  }
  try {
    trainer = new Trainer(model, data, state.train); // the recipe is valid: what it refuses is the data
  } catch (e) {
    model.dispose();
    throw new Error(`cannot resume ${from} with this data: ${(e as Error).message}`, { cause: e });
  }
  try {
    const opt = await readSafetensorsFile(`${from}/optimizer.safetensors`);
    const meta = opt.header.metadata;
    // model (config.json, which fromPretrained checked against model.safetensors), optimizer and log: one save's
    if (state.saveId !== undefined) {
      const cfgId = JSON.parse(await Deno.readTextFile(`${from}/config.json`))[SAVE_ID];
      if (cfgId !== state.saveId || meta[SAVE_ID] !== state.saveId) {
        throw new Error(
          `the model (config.json: ${cfgId}), the optimizer state (${meta[SAVE_ID]}) and training_log.json ` +
            `(${state.saveId}) are not from one save (${SAVE_ID}); the folder mixes two checkpoints`,
        );
      }
    }
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
  try {
    trainer.step = state.step;
    trainer.log = state.log;
    trainer.restorePendingLosses(state.pendingLosses!);
  } catch (e) {
    trainer.dispose();
    model.dispose();
    throw new Error(`${from}/training_log.json: ${(e as Error).message}`, { cause: e });
  }
  if (state.train.carryState) {
    try {
      const carried = await readSafetensorsFile(`${from}/${CARRIED_FILE}`);
      const tensors = new Map([...carried.tensors].map(([k, t]) => [k, { shape: t.shape, data: t.data }]));
      trainer.restoreCarriedState(tensors);
    } catch (e) {
      trainer.dispose();
      model.dispose();
      throw new Error(
        `${from}/${CARRIED_FILE} (the states of a run with carryState): ${(e as Error).message}`,
        { cause: e },
      );
    }
  }
  return trainer;
}
