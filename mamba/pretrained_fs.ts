/**
 * The file-system side of `pretrained.ts` and `model_sources.ts` (Deno only, imported on demand): model files
 * from a local folder or through the Hugging Face hub cache, and writing a checkpoint's files into a folder.
 * @module
 */

import { writeFileAtomic } from "../core/safetensors_fs.ts";
import { type ModelSource, OPTIONAL_WEIGHT_FILES, readBoundedText } from "./byte_source.ts";
import { COMMIT_RE, hubDownload, HubError, type HubOptions, isHubId } from "./hub.ts";
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

// `id` has the form of a hub id but is no local folder: until the hub has answered with a file, its errors
// say first that there is no such folder (`runs/char` before training is a folder, not a repository).
function hubSource(id: string, options: HubOptions): ModelSource {
  const where = `${id}@${options.revision ?? "main"}`;
  let found = false;
  const orFolder = (e: HubError) =>
    found ? e : new HubError(
      e.code,
      `there is no local folder '${id}', and as a hub id: ${e.message}`,
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
