/**
 * Hugging Face hub downloads into the hub cache that Python's `huggingface_hub` uses, so that either side
 * reuses what the other downloaded.
 *
 * A file of repository `org/name` at `revision` comes from `<endpoint>/org/name/resolve/<revision>/<file>`
 * (endpoint: option, `HF_ENDPOINT`, or https://huggingface.co) into
 * `<cache>/models--org--name/` (cache: option, `HF_HUB_CACHE` or the older `HUGGINGFACE_HUB_CACHE`,
 * `HF_HOME/hub`, `$XDG_CACHE_HOME/huggingface/hub`, or `~/.cache/huggingface/hub`, as `huggingface_hub`):
 *
 * - `blobs/<etag>`: the content, named by its ETag (the sha256 for LFS files, from `X-Linked-Etag`);
 * - `snapshots/<commit>/<file>`: a relative symlink to the blob (a copy where symlinks fail); the commit is
 *   the `X-Repo-Commit` header (an answer without one is not the hub's, and is not cached);
 * - `refs/<revision>`: the commit of a branch or tag; `.no_exist/<commit>/<file>`: files the repository
 *   lacks, so that asking again needs no request.
 *
 * The cache is read first: a file already in the snapshot of `refs/<revision>` costs no request. A download
 * writes `blobs/<etag>.incomplete` (under a lock), resumes it with an HTTP Range request after an interruption
 * (in the same call up to `retries` times, or in a later one), checks the size against the server's, the
 * sha256 or git blob sha1 when the ETag is one, and a safetensors header's structure, and only then renames
 * it into place: no half-written file is ever under its final name (one that nothing checks stays
 * `.incomplete`).
 *
 * The cache itself (Deno's file system) is in `hub_cache.ts`, imported by the first download: this module
 * only names things, so it loads anywhere (browsers).
 * @module
 */

import { checkOptionKeys } from "../core/options.ts";

/** The keys of {@linkcode HubOptions}: any other is an error (a misspelt one was ignored in silence). */
export const HUB_OPTION_KEYS: readonly string[] = [
  "revision",
  "cacheDir",
  "endpoint",
  "localFilesOnly",
  "progress",
  "refresh",
  "retries",
  "timeoutMs",
  "token",
];

/** Where and how hub files are fetched. */
export interface HubOptions {
  /** Branch, tag or commit (default "main"). */
  revision?: string;
  /**
   * Hub cache folder (default {@linkcode hubCacheDir}: `HF_HUB_CACHE`, else `HUGGINGFACE_HUB_CACHE`, else
   * `HF_HOME/hub`, else `$XDG_CACHE_HOME/huggingface/hub`, else `~/.cache/huggingface/hub`).
   */
  cacheDir?: string;
  /** Hub address (default `HF_ENDPOINT`, else https://huggingface.co). */
  endpoint?: string;
  /** Use only the cache, never the network. `HF_HUB_OFFLINE` set to 1/true/yes/on means true whatever this
   * says, as huggingface_hub goes offline whenever it is set. */
  localFilesOnly?: boolean;
  /** Progress bar on stderr (default: when stderr is a terminal). */
  progress?: boolean;
  /**
   * Ask the hub for the revision's current commit even when the cache has the file (one HEAD request per
   * file; a file of a new commit is downloaded). Default false: the cache answers without any request.
   * Without network a refresh takes the cached file, as huggingface_hub does.
   */
  refresh?: boolean;
  /**
   * Retries in the same call, in all (default 3): of a request that failed (no connection, HTTP 429 or 5xx),
   * the HEAD or the download (which resumes where it broke off), after the server's Retry-After (up to 30 s)
   * or 0.1 s doubling.
   */
  retries?: number;
  /**
   * Milliseconds to wait for a response or for the next bytes of a body (default 30000): the wait restarts
   * with each piece that arrives, so a slow download that keeps going is not cut off. It applies to hub
   * downloads and to `fromPretrained`'s URL loads (and, in a browser, its hub fetches). Infinity: no limit;
   * a finite value must be at most 2^31 - 1 (about 24.8 days, what a timer holds).
   */
  timeoutMs?: number;
  /**
   * A user access token, for private and gated repositories (default in Deno {@linkcode hubToken}: `HF_TOKEN`,
   * else the file `huggingface-cli login` writes); false: none. It goes to the hub's endpoint only, never to a
   * host a redirect leads to (the LFS storage), and into no message.
   */
  token?: string | false;
}

/**
 * The token huggingface_hub would send: `HF_TOKEN` (or the older `HUGGING_FACE_HUB_TOKEN`), else the file at
 * `HF_TOKEN_PATH`, else `HF_HOME/token` (`$XDG_CACHE_HOME/huggingface/token`, `~/.cache/huggingface/token`),
 * which `huggingface-cli login` writes; null when there is none (or in a browser).
 */
export async function hubToken(): Promise<string | null> {
  const env = hubEnv("HF_TOKEN") ?? hubEnv("HUGGING_FACE_HUB_TOKEN");
  if (env?.trim()) return env.trim();
  const deno = (globalThis as { Deno?: typeof Deno }).Deno;
  if (!deno) return null;
  const path = hubEnv("HF_TOKEN_PATH") ?? `${hfHome()}/token`;
  try {
    return (await deno.readTextFile(expand(path))).trim() || null;
  } catch {
    return null; // none (or no --allow-read there)
  }
}

/** The token of `options` (see {@linkcode HubOptions.token}), checked: a string with a space or none at all
 * would make a broken header. */
export async function tokenOf(options: HubOptions): Promise<string | null> {
  if (options.token === false) return null;
  const token = options.token ?? await hubToken();
  if (token !== null && !/^[\x21-\x7e]+$/.test(token)) {
    throw new Error(
      "the hub token must be printable ASCII without spaces (HubOptions.token, HF_TOKEN or its file)",
    );
  }
  return token;
}

/**
 * The hub's refusal of a request for a repository or revision that it does not have (or will not show), as
 * the {@linkcode HubError} the cache and a page's fetches both throw; null for any other answer. The hub says
 * X-Error-Code: RepoNotFound (what huggingface_hub checks), also as a 401 for a private id.
 */
export function hubRefusal(
  repo: { id: string; revision: string; endpoint: string; token?: string | null },
  res: Response,
  url: string,
): HubError | null {
  const code = res.headers.get("x-error-code");
  const msg = res.headers.get("x-error-message");
  const detail = `HTTP ${res.status}${msg ? `: ${msg}` : ""}`;
  const token = repo.token
    ? "the token sent was refused or has no access to it"
    : "a private one needs a token (HubOptions.token, HF_TOKEN, or huggingface-cli login)";
  if (code === "RepoNotFound" || code === "RepositoryNotFound" || (res.status === 401 && !code)) {
    return new HubError(
      "RepositoryNotFound",
      `repository '${repo.id}' not found at ${repo.endpoint} (${detail}, ${url}): check the id; ${token}`,
      url,
      res.status,
    );
  }
  if (code === "GatedRepo") {
    return new HubError(
      "RepositoryNotFound",
      `repository '${repo.id}' is gated (${detail}, ${url}): its files need the token of an account that ` +
        `accepted its conditions on the hub; ${token}`,
      url,
      res.status,
    );
  }
  if (code === "RevisionNotFound") {
    return new HubError(
      "RevisionNotFound",
      `revision '${repo.revision}' not found in '${repo.id}' (${detail}, ${url}): check the branch, tag or commit`,
      url,
      res.status,
    );
  }
  return null;
}

/**
 * The commit in a hub answer's `X-Repo-Commit` (40 hex digits), or null: the hub names it in every answer
 * about a file, its 404s included.
 */
export function repoCommitOf(h: Headers): string | null {
  const c = h.get("x-repo-commit");
  return c !== null && COMMIT_RE.test(c) ? c : null;
}

/**
 * Whether an HTTP 404 is the hub's "no such file": it says so (`X-Error-Code: EntryNotFound`), or names the
 * commit it looked in (`X-Repo-Commit`, with no other error code). A bare 404 (a proxy's, an endpoint that is
 * no hub) is an error, as huggingface_hub raises it: taken for absence, it would skip an optional file (a
 * tokenizer, one form of the weights) in silence. A page reads them only where the hub exposes them
 * (`Access-Control-Expose-Headers`): huggingface.co does (huggingface.js, which runs in pages, tells absence
 * by `X-Error-Code` alike); a mirror that does not makes every missing file an error, which says so.
 */
export function hubSaysAbsent(res: Response): boolean {
  if (res.status !== 404) return false;
  const code = res.headers.get("x-error-code");
  return code === "EntryNotFound" || (code === null && repoCommitOf(res.headers) !== null);
}

/** `HubOptions.timeoutMs` checked, with its default (30 s). */
export function timeoutOf(options: HubOptions): number {
  const ms = options.timeoutMs ?? 30_000;
  if (!(ms > 0 && (ms <= 2 ** 31 - 1 || ms === Infinity))) {
    throw new Error(`timeoutMs must be a positive number of ms up to 2^31 - 1, or Infinity, got ${ms}`);
  }
  return ms;
}

/** setTimeout for a checked `timeoutMs` (see {@linkcode timeoutOf}): never fires for Infinity. */
export function startTimer(fn: () => void, ms: number): ReturnType<typeof setTimeout> | undefined {
  return ms === Infinity ? undefined : setTimeout(fn, ms);
}

/** Why a hub request failed. */
export type HubErrorCode =
  | "RepositoryNotFound"
  | "RevisionNotFound"
  | "EntryNotFound"
  | "Network"
  | "NotCached"
  | "Corrupt"
  | "Interrupted"
  | "HTTP";

/** A hub failure; the message says what was tried and what to do. */
export class HubError extends Error {
  /** The kind of failure. */
  readonly code: HubErrorCode;
  /** The URL involved, if any. */
  readonly url: string | null;
  /** The HTTP status, if any. */
  readonly status: number | null;

  /** Creates the error. */
  constructor(code: HubErrorCode, message: string, url: string | null = null, status: number | null = null) {
    super(message);
    this.name = "HubError";
    this.code = code;
    this.url = url;
    this.status = status;
  }
}

/** The files a model repository usually has (for messages): state-spaces' own hold pytorch_model.bin. */
export const MODEL_FILES =
  "config.json, model.safetensors (or pytorch_model.bin), tokenizer.json, tokenizer_config.json";
/** The names in {@linkcode MODEL_FILES}. */
export const MODEL_FILE_NAMES: readonly string[] = [
  "config.json",
  "model.safetensors",
  "pytorch_model.bin",
  "tokenizer.json",
  "tokenizer_config.json",
];
/** A commit hash: the cache keeps a commit's files as a snapshot of its own name. */
export const COMMIT_RE = /^[0-9a-f]{40}$/;
const ID_RE = /^[A-Za-z0-9][A-Za-z0-9._-]*\/[A-Za-z0-9][A-Za-z0-9._-]*$/;

/** Whether `s` has the form of a hub model id `org/name` (letters, digits, `._-`; no `--` or `..`). */
export function isHubId(s: string): boolean {
  return s.length <= 96 && ID_RE.test(s) && !s.includes("--") && !s.includes("..");
}

/** An environment variable, or undefined (none set, no --allow-env, or no Deno: a browser). */
export function hubEnv(key: string): string | undefined {
  try {
    return (globalThis as { Deno?: typeof Deno }).Deno?.env.get(key) || undefined;
  } catch {
    return undefined; // no --allow-env: the defaults apply
  }
}

function homeDir(): string {
  return hubEnv("HOME") ?? hubEnv("USERPROFILE") ?? ".";
}

const expand = (p: string) => p.startsWith("~/") || p === "~" ? homeDir() + p.slice(1) : p;

/**
 * The hub cache folder: `HF_HUB_CACHE`, else `HUGGINGFACE_HUB_CACHE`, else `HF_HOME/hub`, else
 * `$XDG_CACHE_HOME/huggingface/hub`, else `~/.cache/huggingface/hub` (a leading `~/` is the home folder).
 */
export function hubCacheDir(): string {
  const hub = hubEnv("HF_HUB_CACHE") ?? hubEnv("HUGGINGFACE_HUB_CACHE");
  return hub ? expand(hub) : `${hfHome()}/hub`;
}

/** huggingface_hub's home folder: `HF_HOME`, else `$XDG_CACHE_HOME/huggingface`, else `~/.cache/huggingface`. */
function hfHome(): string {
  const home = hubEnv("HF_HOME");
  if (home) return expand(home);
  const xdg = hubEnv("XDG_CACHE_HOME");
  return `${xdg ? expand(xdg) : `${homeDir()}/.cache`}/huggingface`;
}

/** The hub address: `HF_ENDPOINT`, else https://huggingface.co (no trailing slash). */
export function hubEndpoint(): string {
  return (hubEnv("HF_ENDPOINT") ?? "https://huggingface.co").replace(/\/+$/, "");
}

/** The cache folder of a model repository: `<cacheDir>/models--org--name`. */
export function repoCacheDir(id: string, cacheDir: string = hubCacheDir()): string {
  return `${cacheDir.replace(/\/+$/, "")}/models--${id.split("/").join("--")}`;
}

/**
 * How to put the files in place without network, for error messages.
 * @param files the files a model needs
 */
export function placeByHandHelp(
  id: string,
  options: HubOptions = {},
  files: string = MODEL_FILES,
): string {
  return help(repoCacheDir(id, options.cacheDir ?? hubCacheDir()), options.revision ?? "main", files);
}

/** The by-hand instructions for a cache folder, revision and files. */
export function help(dir: string, rev: string, files: string): string {
  // A commit is looked up as a snapshot of its own name (no refs/ file names it): a model pinned to the
  // commit its first file came from, or a --revision given as a hash.
  const place = COMMIT_RE.test(rev)
    ? `${dir}/snapshots/${rev}/ (the folder of commit ${rev}; `
    : `${dir}/snapshots/<name>/ and write <name> into ${dir}/refs/${rev} (any name works; `;
  return `To work without network, copy the repository's files (${files}) from a machine that has it, ` +
    `then either pass their folder instead of the id, or put them into the cache as ${place}` +
    `the cacheDir option or HF_HUB_CACHE picks the cache, HF_HUB_OFFLINE=1 keeps to it).`;
}

/**
 * The local path of `filename` of hub repository `id` (a file in the cache's snapshot), downloading it when
 * the cache does not have it. Returns null when the repository has no such file (known from the hub or
 * from the cache's `.no_exist`). Throws {@linkcode HubError}: unknown repository or revision, no network
 * (the message has the URL tried and how to place the files by hand), offline and not cached ("NotCached"),
 * an interrupted download ("Interrupted": the `.incomplete` file stays for the next call to resume), a
 * file that fails the checks ("Corrupt": it is deleted), or another HTTP answer ("HTTP": a 401 or 403 of a gated
 * or private repository without a token that may read it, a 5xx left after the retries).
 */
export async function hubDownload(
  id: string,
  filename: string,
  options: HubOptions = {},
): Promise<string | null> {
  checkOptionKeys(options, HUB_OPTION_KEYS, "hubDownload");
  if (typeof (globalThis as { Deno?: unknown }).Deno === "undefined") {
    throw new Error(
      "hubDownload stores files in the hub cache folder, which needs Deno's file system; in a browser, " +
        "fromPretrained(id) fetches a repository's files from the hub directly",
    );
  }
  return await (await import("./hub_cache.ts")).cachedDownload(id, filename, options);
}
