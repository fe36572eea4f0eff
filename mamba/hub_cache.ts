/**
 * The Hugging Face hub cache on disk (Deno only, imported by `hubDownload`): the cache lookup, and downloads
 * that resume, verify and then move into place. See `hub.ts` for the layout.
 * @module
 */

import { parseSafetensorsHeader, safetensorsHeaderLength } from "../core/safetensors.ts";
import {
  COMMIT_RE,
  help,
  hubCacheDir,
  hubEndpoint,
  hubEnv,
  HubError,
  type HubOptions,
  hubRefusal,
  hubSaysAbsent,
  isHubId,
  MODEL_FILE_NAMES,
  MODEL_FILES,
  repoCacheDir,
  repoCommitOf,
  startTimer,
  timeoutOf,
  tokenOf,
} from "./hub.ts";
import { fileSize, isDirectory, linkAtomic, ProgressBar, withLock, writeTextAtomic } from "./hub_fs.ts";

const SHA256_RE = /^[0-9a-f]{64}$/;

interface Resolved {
  id: string;
  revision: string;
  repoDir: string;
  endpoint: string;
  offline: boolean;
  progress: boolean;
  /** Retries left to this call, HEADs and resumed downloads together (see `retry`). */
  retries: number;
  timeoutMs: number;
  /** Sent to the endpoint only (see `authTo`); resolved when a request is to be made (a cached file needs
   * none, so a token that cannot be sent does not stop it). */
  token: string | null;
}

function resolveOptions(id: string, o: HubOptions): Resolved {
  if (!isHubId(id)) throw new Error(`'${id}' is not a hub model id (org/name)`);
  const revision = o.revision ?? "main";
  if (!revision || !pathPartsOk(revision)) throw new Error(`invalid revision '${revision}'`);
  // "" would put the cache at the file system's root
  if (o.cacheDir === "") throw new Error("cacheDir is empty: name a folder, or leave it out for the default");
  const timeoutMs = timeoutOf(o);
  const off = hubEnv("HF_HUB_OFFLINE")?.toLowerCase();
  let progress = o.progress;
  if (progress === undefined) {
    try {
      progress = Deno.stderr.isTerminal();
    } catch {
      progress = false;
    }
  }
  // HF_HUB_OFFLINE wins over localFilesOnly: false, as huggingface_hub goes offline whenever it is set
  const offline = (off !== undefined && ["1", "true", "yes", "on"].includes(off)) || !!o.localFilesOnly;
  return {
    id,
    revision,
    repoDir: repoCacheDir(id, o.cacheDir ?? hubCacheDir()),
    endpoint: (o.endpoint ?? hubEndpoint()).replace(/\/+$/, ""),
    offline,
    progress,
    retries: retriesOf(o.retries),
    timeoutMs,
    token: null,
  };
}

// A count of resumed attempts: NaN or Infinity would retry for ever.
function retriesOf(retries = 3): number {
  if (!(Number.isInteger(retries) && retries >= 0)) {
    throw new Error(`retries must be an integer >= 0, got ${retries}`);
  }
  return retries;
}

// Parts of a path in the repository: no empty, "." or ".." part, and no backslash (a separator on Windows,
// where "..\\x" would step out of the repository's folder).
const pathPartsOk = (p: string) =>
  !p.includes("\\") && p.split("/").every((q) => q && q !== "." && q !== "..");

function checkFilename(filename: string): void {
  if (!filename || !pathPartsOk(filename)) throw new Error(`invalid file name '${filename}'`);
}

const encodePath = (p: string) => p.split("/").map(encodeURIComponent).join("/");

// A name of one folder (a file name, not a path): what refs may hold (by-hand placement takes any such name)
// and ETags may be to name cache entries.
const FOLDER_NAME_RE = /^[\w-][\w.-]*$/;

// The commit a revision stands for in the cache: a commit hash itself, else refs/<revision> (when it names a
// folder, not a path out of snapshots/), else (as huggingface_hub) the revision string used as a snapshot name.
async function cachedCommit(r: Resolved): Promise<string> {
  if (COMMIT_RE.test(r.revision)) return r.revision;
  try {
    const ref = (await Deno.readTextFile(`${r.repoDir}/refs/${r.revision}`)).trim();
    if (FOLDER_NAME_RE.test(ref)) return ref;
  } catch { /* no ref */ }
  return r.revision;
}

// The commit an answer names (X-Repo-Commit), if it is one: the value names cache folders, so anything else
// (`../..`) is not taken.
const commitOf = repoCommitOf;

// The files the by-hand instructions name: a model's, and the file asked for when it is none of them (a
// shard, or a file hubDownload was asked for).
function filesToPlace(filename: string): string {
  return MODEL_FILE_NAMES.includes(filename) ? MODEL_FILES : `${MODEL_FILES}, ${filename}`;
}

const ABSENT = Symbol("absent");

async function fromCache(r: Resolved, filename: string): Promise<string | typeof ABSENT | null> {
  const commit = await cachedCommit(r);
  const pointer = `${r.repoDir}/snapshots/${commit}/${filename}`;
  if (await fileSize(pointer) >= 0) return pointer;
  if (await fileSize(`${r.repoDir}/.no_exist/${commit}/${filename}`) >= 0) return ABSENT;
  return null;
}

/** `hubDownload` in Deno: the cached file, else a download into the cache. */
export async function cachedDownload(
  id: string,
  filename: string,
  options: HubOptions = {},
): Promise<string | null> {
  const r = resolveOptions(id, options);
  checkFilename(filename);
  const cached = await fromCache(r, filename);
  if (cached === ABSENT && (!options.refresh || r.offline)) return null;
  if (typeof cached === "string" && (!options.refresh || r.offline)) return cached;
  if (r.offline) {
    throw new HubError(
      "NotCached",
      `${id}: ${filename} (revision ${r.revision}) is not in the cache ${r.repoDir} and downloads are off ` +
        `(localFilesOnly or HF_HUB_OFFLINE). ${help(r.repoDir, r.revision, filesToPlace(filename))}`,
    );
  }
  r.token = await tokenOf(options);
  try {
    return await download(r, filename);
  } catch (e) {
    // A refresh that cannot reach the hub, or gets an answer that is not the file's (an HTTP error, a proxy's
    // page), keeps to what the cache has, as huggingface_hub does; a revision or file the hub says is not
    // there is its answer.
    if (cached !== null && e instanceof HubError && !["RevisionNotFound", "EntryNotFound"].includes(e.code)) {
      return cached === ABSENT ? null : cached;
    }
    throw e;
  }
}

interface Meta {
  commit: string;
  etag: string | null;
  size: number;
}

const ETAG_CLEAN = (v: string | null) =>
  v === null ? null : v.replace(/^W\//, "").replace(/^"|"$/g, "") || null;

function intHeader(h: Headers, key: string): number {
  const v = h.get(key);
  return v !== null && /^\d+$/.test(v) ? Number(v) : -1;
}

async function fetchTimed(url: string, init: RequestInit, timeoutMs: number): Promise<Response> {
  const ac = new AbortController();
  const timer = startTimer(() => ac.abort(new Error(`no response within ${timeoutMs} ms`)), timeoutMs);
  try {
    return await fetch(url, { ...init, signal: ac.signal });
  } finally {
    clearTimeout(timer);
  }
}

// The Authorization header for a request to `url`: the token goes to the hub's endpoint only, never to a host
// a redirect leads to (the LFS storage), as huggingface_hub.
function authTo(r: Resolved, url: string): Record<string, string> {
  return r.token && new URL(url).origin === new URL(r.endpoint).origin
    ? { authorization: `Bearer ${r.token}` }
    : {};
}

// Read lazily: nothing in this module touches Deno or node: APIs when it is merely imported (browsers).
const userAgent = () => `mamba.ts; deno/${globalThis.Deno?.version?.deno ?? "?"}`;
const sha256Hasher = async () => (await import("node:crypto")).createHash("sha256");

// Maps a failed response to a HubError ("EntryNotFound" is returned as null by the callers).
function httpError(r: Resolved, filename: string, url: string, res: Response): HubError {
  const refusal = hubRefusal(r, res, url);
  if (refusal) return refusal;
  const code = res.headers.get("x-error-code");
  const msg = res.headers.get("x-error-message");
  const detail = `HTTP ${res.status}${msg ? `: ${msg}` : ""}`;
  if (code === "EntryNotFound") {
    return new HubError(
      "EntryNotFound",
      `${filename} not found in '${r.id}' at revision '${r.revision}' (${url})`,
      url,
      404,
    );
  }
  return new HubError("HTTP", `cannot download ${url}: ${detail}`, url, res.status);
}

// HEAD, following only same-host relative redirects (a renamed repository); an absolute redirect (to the
// LFS storage) carries the metadata itself.
async function head(r: Resolved, filename: string, url: string): Promise<Meta | null> {
  let at = url;
  for (let hop = 0, attempt = 0; hop < 5;) {
    let res: Response;
    try {
      res = await fetchTimed(at, {
        method: "HEAD",
        redirect: "manual",
        headers: { "accept-encoding": "identity", "user-agent": userAgent(), ...authTo(r, at) },
      }, r.timeoutMs);
    } catch (e) {
      if (await retry(r, attempt++, null)) continue;
      throw new HubError(
        "Network",
        `cannot reach ${url}: ${errorText(e)}. ${help(r.repoDir, r.revision, filesToPlace(filename))}`,
        url,
      );
    }
    await res.body?.cancel();
    const h = res.headers;
    if (isTransient(res.status) && await retry(r, attempt++, h.get("retry-after"))) continue;
    const location = h.get("location");
    if (res.status >= 300 && res.status < 400 && location && location.startsWith("/")) {
      at = new URL(location, at).href;
      hop++;
      continue;
    }
    // A 404 is the hub's "no such file" when it says so or names the commit; a bare one (a proxy's, a wrong
    // endpoint's) is an HTTP error, as huggingface_hub raises it.
    if (hubSaysAbsent(res)) {
      const commit404 = commitOf(h);
      if (commit404) {
        await writeTextAtomic(`${r.repoDir}/.no_exist/${commit404}/${filename}`, "");
        await writeRef(r, commit404);
      }
      return null;
    }
    if (res.status >= 400) throw httpError(r, filename, url, res);
    // The hub names the commit of every file it serves: an answer without one (a captive portal's login page,
    // a proxy's) is not cached as the file, which a later call would take without asking again.
    const commit = commitOf(h);
    if (commit === null) {
      throw new HubError(
        "HTTP",
        `${url} answered HTTP ${res.status} without naming the commit of ${filename} (X-Repo-Commit): not the ` +
          `hub's answer (a proxy or login page in between? the endpoint is ${r.endpoint}); nothing was cached`,
        url,
        res.status,
      );
    }
    // A redirect's own ETag and Content-Length describe the redirect, not the file.
    const redirect = res.status >= 300;
    const linkedSize = intHeader(h, "x-linked-size");
    return {
      commit,
      etag: ETAG_CLEAN(h.get("x-linked-etag") ?? (redirect ? null : h.get("etag"))),
      size: linkedSize >= 0 ? linkedSize : redirect ? -1 : intHeader(h, "content-length"),
    };
  }
  throw new HubError("HTTP", `too many redirects for ${url}`, url);
}

async function writeRef(r: Resolved, commit: string): Promise<void> {
  if (r.revision === commit) return;
  const ref = `${r.repoDir}/refs/${r.revision}`;
  try {
    const old = (await Deno.readTextFile(ref)).trim();
    // A ref naming a snapshot placed by hand (not a commit) is the user's choice: a download never replaces it.
    if (
      old === commit || (!COMMIT_RE.test(old) && FOLDER_NAME_RE.test(old) &&
        await isDirectory(`${r.repoDir}/snapshots/${old}`))
    ) return;
  } catch { /* not there yet */ }
  await writeTextAtomic(ref, commit);
}

async function download(r: Resolved, filename: string): Promise<string | null> {
  const url = `${r.endpoint}/${r.id}/resolve/${encodeURIComponent(r.revision)}/${encodePath(filename)}`;
  const meta = await head(r, filename, url);
  if (meta === null) return null;
  const commit = meta.commit;
  const pointer = `${r.repoDir}/snapshots/${commit}/${filename}`;
  if (await fileSize(pointer) >= 0) {
    await writeRef(r, commit);
    return pointer;
  }
  // Pin the GET to the commit, so that a branch moving in between cannot mix two versions.
  const getUrl = `${r.endpoint}/${r.id}/resolve/${commit}/${encodePath(filename)}`;
  const key = meta.etag ?? `url-${(await sha256Hasher()).update(getUrl).digest("hex")}`;
  if (!FOLDER_NAME_RE.test(key)) {
    throw new HubError("HTTP", `${url}: the ETag '${meta.etag}' cannot name a file`, url);
  }
  let blob = `${r.repoDir}/blobs/${key}`;
  const lock = `${r.repoDir.replace(/\/[^/]+$/, "")}/.locks/${r.repoDir.replace(/^.*\//, "")}/${key}.lock`;
  await withLock(lock, async () => {
    if (meta.etag && await fileSize(blob) >= 0) return; // another revision or process brought it
    const incomplete = `${blob}.incomplete`;
    await Deno.mkdir(`${r.repoDir}/blobs`, { recursive: true });
    const got = await fetchResuming(r, getUrl, incomplete, meta.size, filename);
    const sha = await verify(incomplete, meta, got, filename, url);
    if (!meta.etag) blob = `${r.repoDir}/blobs/${sha}`;
    await Deno.rename(incomplete, blob);
  });
  // Relative, as huggingface_hub makes them: up from snapshots/<commit>/<dirs of the file> to blobs/.
  await linkAtomic(
    blob,
    pointer,
    `${"../".repeat(1 + filename.split("/").length)}blobs/${blob.replace(/^.*\//, "")}`,
  );
  await writeRef(r, commit);
  return pointer;
}

// A failure worth retrying: `status` is the HTTP status that caused it (null: the connection), `retryAfter`
// the server's Retry-After, `noResponse` that no server answered.
class Retryable extends Error {
  constructor(
    msg: string,
    readonly status: number | null = null,
    readonly retryAfter: string | null = null,
    readonly noResponse = false,
  ) {
    super(msg);
  }
}

// What a retry may mend: rate limits and server errors (besides connections that fail).
const isTransient = (status: number) => status === 429 || status >= 500;

// Whether to retry, after waiting: while the call has retries left (r.retries, counted down), as long as
// the server's Retry-After asks (seconds or a date, at most 30 s), else 0.1 s doubling up to 2 s.
async function retry(r: Resolved, attempt: number, retryAfter: string | null): Promise<boolean> {
  if (r.retries <= 0) return false;
  r.retries--;
  const after = retryAfter === null
    ? NaN
    : /^\s*\d+\s*$/.test(retryAfter)
    ? Number(retryAfter) * 1000
    : Date.parse(retryAfter) - Date.now();
  const ms = Number.isNaN(after) ? Math.min(2000, 100 * 2 ** attempt) : Math.min(30_000, Math.max(0, after));
  await new Promise((res) => setTimeout(res, ms));
  return true;
}

// An error's message with its cause's (fetch's "fetch failed" says why only in the cause).
function errorText(e: unknown): string {
  const msg = (e as Error)?.message ?? String(e);
  const cause = (e as Error)?.cause as Error | undefined;
  return cause?.message && !msg.includes(cause.message) ? `${msg} (${cause.message})` : msg;
}

// Downloads `url` into `path`, appending to what is there (Range), retrying breaks up to r.retries times.
// Returns the file's size as the last answer told it (-1: none did).
async function fetchResuming(
  r: Resolved,
  url: string,
  path: string,
  size: number,
  label: string,
): Promise<number> {
  for (let attempt = 0;; attempt++) {
    let have = Math.max(0, await fileSize(path));
    if (size >= 0 && have > size) {
      await Deno.remove(path);
      have = 0;
    }
    if (size >= 0 && have === size && have > 0) return size;
    try {
      return await getOnce(r, url, path, have, size, label);
    } catch (e) {
      if (!(e instanceof Retryable)) throw e;
      if (await retry(r, attempt, e.retryAfter)) continue;
      const got = await fileSize(path);
      const kept = got > 0
        ? `; ${got} of ${
          size >= 0 ? size : "?"
        } bytes are kept in ${path} and the next call resumes from there`
        : "";
      if (e.status !== null) {
        throw new HubError("HTTP", `cannot download ${url}: ${e.message}${kept}`, url, e.status);
      }
      if (got <= 0 && e.noResponse) {
        throw new HubError(
          "Network",
          `cannot reach ${url}: ${e.message}. ${help(r.repoDir, r.revision, filesToPlace(label))}`,
          url,
        );
      }
      throw new HubError("Interrupted", `download of ${url} broke off (${e.message})${kept}`, url);
    }
  }
}

async function getOnce(
  r: Resolved,
  url: string,
  path: string,
  have: number,
  size: number,
  label: string,
): Promise<number> {
  const ac = new AbortController();
  let timer: ReturnType<typeof setTimeout> | undefined;
  const arm = () => {
    clearTimeout(timer);
    timer = startTimer(() => ac.abort(new Error(`no data for ${r.timeoutMs} ms`)), r.timeoutMs);
  };
  const headers: Record<string, string> = { "accept-encoding": "identity", "user-agent": userAgent() };
  if (have > 0) headers.range = `bytes=${have}-`;
  let file: Deno.FsFile | undefined;
  let bar: ProgressBar | undefined;
  arm();
  try {
    let res: Response;
    try {
      // redirects followed here: the token must not go along to another host
      for (let at = url, hop = 0;; hop++) {
        res = await fetch(at, {
          headers: { ...headers, ...authTo(r, at) },
          signal: ac.signal,
          redirect: "manual",
        });
        const location = res.headers.get("location");
        if (res.status < 300 || res.status >= 400 || !location || hop === 5) break;
        await res.body?.cancel();
        at = new URL(location, at).href;
      }
    } catch (e) {
      throw new Retryable(errorText(e), null, null, true);
    }
    let start = 0;
    if (res.status === 206) {
      const m = /^bytes (\d+)-\d+\/(\d+|\*)$/.exec(res.headers.get("content-range") ?? "");
      start = m ? Number(m[1]) : -1;
      if (start !== have) {
        await res.body?.cancel();
        await Deno.remove(path).catch(() => {});
        throw new Retryable(`the server resumed at byte ${start}, not ${have}`);
      }
    } else if (res.status === 200) {
      start = 0; // no Range support (or a fresh download): start over
    } else if (res.status === 416) {
      await res.body?.cancel();
      await Deno.remove(path).catch(() => {});
      throw new Retryable("range not satisfiable");
    } else if (isTransient(res.status)) {
      await res.body?.cancel();
      throw new Retryable(`HTTP ${res.status}`, res.status, res.headers.get("retry-after"));
    } else {
      await res.body?.cancel();
      throw new HubError("HTTP", `cannot download ${url}: HTTP ${res.status}`, url, res.status);
    }
    const len = intHeader(res.headers, "content-length");
    if (size >= 0 && len >= 0 && start + len !== size) {
      await res.body?.cancel();
      await Deno.remove(path).catch(() => {});
      throw new HubError(
        "Corrupt",
        `${url}: the server sends ${
          start + len
        } bytes (Content-Length ${len} from byte ${start}) but the file ` +
          `has ${size} (X-Linked-Size/Content-Length of the hub); nothing was kept`,
        url,
      );
    }
    const total = size >= 0 ? size : len >= 0 ? start + len : -1;
    file = await Deno.open(
      path,
      start > 0 ? { append: true } : { write: true, create: true, truncate: true },
    );
    bar = new ProgressBar(label, total, start, r.progress && (total < 0 || total >= 1 << 20));
    let done = start;
    const reader = res.body!.getReader();
    try {
      for (;;) {
        arm();
        let chunk: ReadableStreamReadResult<Uint8Array>;
        try {
          chunk = await reader.read();
        } catch (e) {
          throw new Retryable(`connection lost at byte ${done}: ${errorText(e)}`);
        }
        if (chunk.done) break;
        for (let off = 0; off < chunk.value.length;) off += await file.write(chunk.value.subarray(off));
        done += chunk.value.length;
        bar.update(done);
        if (total >= 0 && done > total) {
          throw new HubError("Corrupt", `${url}: more than the announced ${total} bytes`, url);
        }
      }
    } finally {
      await reader.cancel().catch(() => {});
    }
    await file.syncData();
    bar.finish(done);
    if (total >= 0 && done < total) throw new Retryable(`the body ended at byte ${done} of ${total}`);
    return total;
  } catch (e) {
    bar?.finish(Math.max(0, await fileSize(path)));
    if (e instanceof HubError && e.code === "Corrupt") await Deno.remove(path).catch(() => {});
    throw e;
  } finally {
    clearTimeout(timer);
    file?.close();
  }
}

// Size, hash (the ETag as a sha256, or as a 40-hex git blob sha1) and a safetensors header; a file that fails is deleted. A file that nothing checks (no size known, no such ETag) may be cut off
// unnoticed (a body that ends with its connection): it is refused, kept as .incomplete. Returns the sha256.
async function verify(path: string, meta: Meta, got: number, filename: string, url: string): Promise<string> {
  const fail = async (why: string): Promise<never> => {
    await Deno.remove(path).catch(() => {});
    throw new HubError("Corrupt", `${url}: ${why}; the download was deleted`, url);
  };
  const size = await fileSize(path);
  if (meta.size >= 0 && size !== meta.size) await fail(`got ${size} bytes, the hub announced ${meta.size}`);
  const etag = meta.etag ?? "";
  const hash = await sha256Hasher();
  // git names a file by sha1("blob <size>\0" + content): the hub's ETag of a file not in LFS (a mirror's may be
  // the content's plain sha1, or a hash of its own: only a match counts, a mismatch proves nothing)
  const crypto = COMMIT_RE.test(etag) ? await import("node:crypto") : null;
  const sha1 = crypto?.createHash("sha1").update(`blob ${size}\0`);
  const plainSha1 = crypto?.createHash("sha1");
  const file = await Deno.open(path, { read: true });
  const buf = new Uint8Array(1 << 20);
  let prefix: Uint8Array | null = null;
  try {
    for (;;) {
      const n = await file.read(buf);
      if (n === null) break;
      hash.update(buf.subarray(0, n));
      sha1?.update(buf.subarray(0, n));
      plainSha1?.update(buf.subarray(0, n));
      if (prefix === null && filename.endsWith(".safetensors")) prefix = buf.slice(0, n);
    }
  } finally {
    file.close();
  }
  const sha = hash.digest("hex");
  if (SHA256_RE.test(etag) && sha !== etag) {
    await fail(`sha256 ${sha} differs from the hub's ${etag} (corrupted in transfer)`);
  }
  const sha1Hex = sha1?.digest("hex");
  const sha1Matches = sha1Hex === etag || plainSha1?.digest("hex") === etag;
  if (sha1Hex !== undefined && !sha1Matches && meta.size < 0 && got < 0) {
    await fail(`git sha1 ${sha1Hex} differs from the hub's ETag ${etag}, and no size tells the whole file`);
  }
  const hashed = SHA256_RE.test(etag) || sha1Matches;
  if (!hashed && meta.size < 0 && got < 0) {
    throw new HubError(
      "Interrupted",
      `${url}: nothing tells whether the ${size} bytes received are the whole file (no Content-Length or ` +
        `X-Linked-Size, no sha256 or git sha1 ETag), so it is not cached; they are kept in ${path}`,
      url,
    );
  }
  // The header's structure (its length, JSON, offsets that tile the file); its dtypes are the loader's
  // business: spec-valid ones this project does not read (U32, F8_E4M3) were deleted as corrupt.
  if (filename.endsWith(".safetensors")) {
    try {
      const head8 = prefix ?? new Uint8Array(0);
      if (size < 8) parseSafetensorsHeader(head8, size, filename, true);
      const n = safetensorsHeaderLength(head8, filename);
      let full = head8;
      if (head8.length < 8 + n && 8 + n <= size) {
        full = new Uint8Array(8 + n);
        const f = await Deno.open(path, { read: true });
        try {
          for (let got = 0; got < full.length;) {
            const k = await f.read(full.subarray(got));
            if (k === null) break;
            got += k;
          }
        } finally {
          f.close();
        }
      }
      parseSafetensorsHeader(full, size, filename, true);
    } catch (e) {
      await fail(`not a valid safetensors file: ${(e as Error).message}`);
    }
  }
  return sha;
}
