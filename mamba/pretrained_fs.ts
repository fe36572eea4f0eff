/**
 * The file-system side of `pretrained.ts` and `model_sources.ts` (Deno only, imported on demand): model files
 * from a local folder or through the Hugging Face hub cache, and writing a checkpoint's files into a folder.
 * @module
 */

import { writeFileAtomic } from "../core/safetensors_fs.ts";
import { type ModelSource, OPTIONAL_WEIGHT_FILES, readBoundedText } from "./byte_source.ts";
import { COMMIT_RE, HUB_OPTION_KEYS, hubDownload, HubError, type HubOptions, isHubId } from "./hub.ts";
import { isDirectory, openFileSource } from "./hub_fs.ts";

/** A model's text file, refused past MAX_TEXT_FILE_BYTES as it is read (a size that stat gives, or not);
 * `name` as readBoundedText's. */
async function readTextFile(path: string, name: string): Promise<string> {
  const file = await Deno.open(path);
  let size = -1;
  try {
    size = (await file.stat()).size;
  } catch {
    // read it and count
  }
  return await readBoundedText(file.readable, name, size); // (the stream closes the file)
}

function folderSource(dir: string): ModelSource {
  const base = dir.replace(/\/+$/, "") || "/";
  const path = (file: string) => `${base}/${file}`;
  return {
    where: base,
    async text(file, optional) {
      try {
        return await readTextFile(path(file), ""); // (named below)
      } catch (e) {
        if (optional && e instanceof Deno.errors.NotFound) return null;
        throw new Error(`cannot read ${path(file)}: ${(e as Error).message}`, { cause: e });
      }
    },
    async open(file) {
      try {
        return await openFileSource(path(file));
      } catch (e) {
        if (e instanceof Deno.errors.NotFound) return null;
        throw new Error(`cannot read ${path(file)}: ${(e as Error).message}`, { cause: e });
      }
    },
  };
}

/** `path` against the working folder, for messages: which folder was looked for. */
const absolute = (path: string) => path.startsWith("/") ? path : `${Deno.cwd().replace(/\/+$/, "")}/${path}`;

// `id` has the form of a hub id but is no local folder: until the hub has answered with a file, its errors
// say first that there is no such folder (`runs/char` before training is a folder, not a repository).
function hubSource(id: string, given: HubOptions): ModelSource {
  // the hub's own options (a PretrainedOptions holds others, which hubDownload refuses)
  const options: HubOptions = Object.fromEntries(
    Object.entries(given).filter(([k]) => HUB_OPTION_KEYS.includes(k)),
  );
  const where = `${id}@${options.revision ?? "main"}`;
  let found = false;
  const orFolder = (e: HubError) =>
    found ? e : new HubError(
      e.code,
      `there is no local folder '${id}' (${absolute(id)}), and as a hub id: ${e.message}`,
      e.url,
      e.status,
    );
  // Offline, a file the cache lacks may still exist upstream: optional files count as absent then, except
  // that the weights must be found one way or the other (planWeights throws this error if neither is).
  const notCached = new Map<string, HubError>();
  // Every file after the first comes from the snapshot that one did (as huggingface_hub's snapshot_download
  // pins one commit): else a branch that moved between a cached config.json and its weights' download would
  // mix two versions of the model.
  let pinned: string | null = null;
  // Whether the first file came from the cache without a request: then a hub failure on an optional file
  // means no hub (a model placed there by hand, an outage), not a blip while downloading: it counts as absent.
  let fromCacheFirst: boolean | null = null;
  const get = async (file: string, optional: boolean) => {
    try {
      let path: string | null = null;
      if (fromCacheFirst === null) {
        // the first file: from the cache alone if it is there (no request), else as any other
        if (!options.refresh) {
          path = await hubDownload(id, file, { ...options, localFilesOnly: true }).catch(() => null);
        }
        fromCacheFirst = path !== null;
      }
      // A snapshot placed by hand (no commit names it) is looked up by the revision's ref, which a download
      // never replaces; a file it lacks comes from the hub as without it.
      const byHand = pinned !== null && !COMMIT_RE.test(pinned);
      if (byHand) path = await hubDownload(id, file, { ...options, localFilesOnly: true }).catch(() => null);
      path ??= await hubDownload(
        id,
        file,
        pinned === null || byHand ? options : { ...options, revision: pinned },
      );
      if (path !== null) {
        found = true;
        // the snapshot folder, whatever its name: <repo>/snapshots/<name>/<file>
        pinned ??= path.slice(0, -file.length - 1).replace(/^.*\//, "");
      }
      return path;
    } catch (e) {
      if (!(e instanceof HubError)) throw e;
      // Offline, or once the first file came from the cache: an optional file that the hub cannot give (no
      // network, an outage's 503, a proxy's page, a lapsed token's 401) counts as absent, as a cached model
      // needs no hub (huggingface_hub falls back to the cache on HTTP errors too). Not what the hub answered
      // about the file (no such revision or file) or what its download did (Interrupted, Corrupt): an
      // interrupted model.safetensors must not turn into a fallback to pytorch_model.bin.
      const unreachable = e.code === "Network" || e.code === "HTTP" || e.code === "RepositoryNotFound";
      if (optional && (e.code === "NotCached" || (fromCacheFirst && unreachable))) {
        notCached.set(file, orFolder(e));
        return null;
      }
      throw orFolder(e);
    }
  };
  return {
    where,
    notCached,
    async text(file, optional) {
      const path = await get(file, optional);
      if (path === null) {
        if (optional) return null;
        throw orFolder(new HubError("EntryNotFound", `${where}: the repository has no ${file}`));
      }
      return await readTextFile(path, path);
    },
    async open(file) {
      const path = await get(file, OPTIONAL_WEIGHT_FILES.has(file));
      return path === null ? null : await openFileSource(path);
    },
  };
}

/** A local folder, else a hub id read through the cache (a missing folder says so when it is read). */
export async function localSource(s: string, options: HubOptions): Promise<ModelSource> {
  if (await isDirectory(s)) return folderSource(s);
  if (isHubId(s)) return hubSource(s, options);
  return folderSource(s); // reading it will say that it does not exist
}

/** Writes each file into `dir` (created if needed), each atomically, then removes the files named in
 * `remove` if they are there. */
export async function writeFiles(
  dir: string,
  files: Record<string, Uint8Array>,
  remove: readonly string[] = [],
): Promise<void> {
  await Deno.mkdir(dir, { recursive: true });
  for (const [name, bytes] of Object.entries(files)) await writeFileAtomic(`${dir}/${name}`, bytes);
  for (const name of remove) {
    await Deno.remove(`${dir}/${name}`).catch((e) => {
      if (!(e instanceof Deno.errors.NotFound)) throw e;
    });
  }
}

/** A folder's path made absolute, "." and ".." resolved: one key for its spellings. (Not node:path's normalize:
 * pretrained.ts reaches this module by a dynamic import, which bundles it, its static imports hoisted, and no
 * browser has node:path.) */
function folderKey(dir: string): string {
  const parts: string[] = [];
  const abs = /^([a-zA-Z]:)?[\\/]/.test(dir) ? dir : `${Deno.cwd()}/${dir}`;
  for (const p of abs.split(/[\\/]+/)) {
    if (p === "..") parts.pop();
    else if (p !== "." && p !== "") parts.push(p);
  }
  return parts.join("/");
}

// The saves in flight, by folder: each waits for the one before it.
const saving = new Map<string, Promise<unknown>>();

/** Runs `save` after the saves to `dir` called before it (this process) have settled, so that saves that are
 * not awaited replace the folder in call order and never touch each other's temporary files. */
export function inOrder<T>(dir: string, save: () => Promise<T>): Promise<T> {
  const key = folderKey(dir);
  const run = (saving.get(key) ?? Promise.resolve()).then(save, save);
  const done = run.catch(() => {});
  saving.set(key, done);
  done.then(() => saving.get(key) === done && saving.delete(key));
  return run;
}

/** Temporary names of {@linkcode saveFiles}: `<file>.mambats-tmp-` and 8 hex digits. */
const SAVE_TMP = /\.mambats-tmp-[0-9a-f]{8}$/;

/**
 * Writes `files` into `dir` (created if needed) as one set, keeping its other files: each is written and
 * synced as `<name>.mambats-tmp-<random>`, then all are renamed into place and the files named in `remove`
 * deleted. A failure before the renames leaves `dir` as it was; temporary files that a crash left are removed
 * by the next save. A training checkpoint's folder is refused (its optimizer state and log would stay beside
 * other weights). Saves to one folder run in call order.
 */
export function saveFiles(dir: string, files: Record<string, Uint8Array>, remove: readonly string[] = []) {
  return inOrder(dir, async () => {
    await Deno.mkdir(dir, { recursive: true });
    if (await Deno.lstat(`${dir}/training_log.json`).then(() => true, () => false)) {
      throw new Error(
        `cannot save into ${dir}: it holds a training checkpoint (training_log.json), whose optimizer state ` +
          "and log would no longer match its weights; use saveTrainingCheckpoint, or another folder",
      );
    }
    for await (const e of Deno.readDir(dir)) {
      if (e.isFile && SAVE_TMP.test(e.name)) await Deno.remove(`${dir}/${e.name}`).catch(() => {});
    }
    const suffix = `.mambats-tmp-${crypto.randomUUID().slice(0, 8)}`;
    const written: string[] = [];
    try {
      for (const [name, bytes] of Object.entries(files)) {
        const tmp = `${dir}/${name}${suffix}`;
        written.push(tmp);
        await Deno.writeFile(tmp, bytes);
        const f = await Deno.open(tmp, { read: true });
        try {
          await f.syncData(); // on disk before the renames make it visible
        } finally {
          f.close();
        }
      }
      // config.json last: weights renamed beside an older config.json before a crash are from another save,
      // which fromPretrained refuses (the save id both hold)
      const names = Object.keys(files).sort((a, b) => +(a === "config.json") - +(b === "config.json"));
      for (const name of names) await Deno.rename(`${dir}/${name}${suffix}`, `${dir}/${name}`);
    } catch (e) {
      for (const tmp of written) await Deno.remove(tmp).catch(() => {}); // (those renamed are gone already)
      throw new Error(`cannot save into ${dir}: ${(e as Error).message}`, { cause: e });
    }
    for (const name of remove) {
      await Deno.remove(`${dir}/${name}`).catch((e) => {
        if (!(e instanceof Deno.errors.NotFound)) throw e;
      });
    }
    await syncDir(dir);
  });
}

/** Makes renames in `dir` durable; skipped where a folder cannot be opened or synced (Windows). */
export async function syncDir(dir: string): Promise<void> {
  try {
    const f = await Deno.open(dir, { read: true });
    try {
      await f.sync();
    } finally {
      f.close();
    }
  } catch {
    // best effort: not every platform can fsync a folder
  }
}
