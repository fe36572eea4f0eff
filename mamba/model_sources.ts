/**
 * Where a checkpoint's files come from, as a {@linkcode ModelSource}: a URL prefix (fetched, with a timeout
 * on stalls), the hub (in a browser, fetched straight from it; in Deno through the cache, in
 * `pretrained_fs.ts`), a local folder (Deno), or blobs (files picked in a page). Also the JSON and tokenizer
 * files read from a source.
 * @module
 */

import { duplicateJsonKey, jsonDepth, MAX_JSON_DEPTH } from "../core/safetensors.ts";
import { checkOptionKeys } from "../core/options.ts";
import {
  HUB_OPTION_KEYS,
  hubEndpoint,
  HubError,
  type HubOptions,
  hubRefusal,
  hubSaysAbsent,
  isHubId,
  startTimer,
  timeoutOf,
} from "./hub.ts";
import {
  blobSource,
  type ModelSource,
  OPTIONAL_WEIGHT_FILES,
  readBoundedText,
  responseSource,
} from "./byte_source.ts";
import { type Tokenizer, tokenizerFromJSON } from "./tokenizer.ts";

const isUrl = (s: string) => /^https?:\/\//i.test(s);

// A response whose body errors when no bytes come for `timeoutMs` while a read waits (each read re-arms the
// timer, so a slow download that keeps going is not cut off; time spent between reads does not count).
function timedResponse(res: Response, ac: AbortController, timeoutMs: number, url: string): Response {
  if (!res.body) return res;
  const reader = res.body.getReader();
  const body = new ReadableStream<Uint8Array>({
    async pull(controller) {
      let timer: ReturnType<typeof setTimeout> | undefined;
      const stalled = new Promise<never>((_, reject) => {
        timer = startTimer(() => reject(new Error(`no data from ${url} for ${timeoutMs} ms`)), timeoutMs);
      });
      try {
        const r = await Promise.race([reader.read(), stalled]);
        if (r.done) controller.close();
        else controller.enqueue(r.value);
      } catch (e) {
        ac.abort(e); // drops the connection
        throw e; // errors this stream: the reader sees `e`
      } finally {
        clearTimeout(timer);
      }
    },
    async cancel(reason) {
      await reader.cancel(reason).catch(() => {});
    },
  }, { highWaterMark: 0 });
  return new Response(body, { status: res.status, statusText: res.statusText, headers: res.headers });
}

/** A hub repository read over HTTP (a browser's hub source): its answers are the hub's. */
interface HubRepo {
  id: string;
  revision: string;
  endpoint: string;
  /** `HubOptions.token` where given as a string (a page has no environment); the browser drops it on a
   * redirect to another origin (the LFS storage), as the Fetch standard says. */
  token: string | null;
}

// A hub's failed answer that is not its "no such file": an error, as the Deno hub cache makes it (a bare 404
// taken for absence would skip an optional file in silence: the tokenizer, one form of the weights).
function notTheHubs(hub: HubRepo, res: Response, url: string): HubError {
  const msg = res.headers.get("x-error-message");
  const why = res.status !== 404
    ? ""
    : " without the hub's X-Error-Code (EntryNotFound) or X-Repo-Commit: not " +
      `the hub's answer (a proxy, or an endpoint that is no hub? it is ${hub.endpoint}; a page sees those ` +
      "headers only where the server exposes them: Access-Control-Expose-Headers)";
  return new HubError(
    "HTTP",
    `cannot fetch ${url}: HTTP ${res.status}${msg ? `: ${msg}` : ""}${why}`,
    url,
    res.status,
  );
}

function urlSource(prefix: string, options: HubOptions, where?: string, hub?: HubRepo): ModelSource {
  let base = prefix.replace(/\/+$/, "");
  let pinned = false;
  const refused = new Map<string, HubError>();
  const timeoutMs = timeoutOf(options);
  // `optional`: a file a model may lack (tokenizer files, one form of the weights where another may stand for
  // it), which servers that hide what they do not list (S3 buckets) answer with 403 rather than 404; the hub
  // says which of its 404s are a missing file, and any other failure of its is an error
  const get = async (file: string, optional: boolean): Promise<Response | null> => {
    const url = `${base}/${file}`;
    const ac = new AbortController();
    const timer = startTimer(() => ac.abort(new Error(`no response within ${timeoutMs} ms`)), timeoutMs);
    let res: Response;
    try {
      const auth: Record<string, string> = hub?.token ? { authorization: `Bearer ${hub.token}` } : {};
      res = await fetch(url, { headers: { "accept-encoding": "identity", ...auth }, signal: ac.signal });
    } catch (e) {
      // a browser's fetch says only "Failed to fetch" (a TypeError) for a refused connection and for a server
      // that does not allow this page's origin alike; a timeout is the abort's own error
      const page = typeof (globalThis as { Deno?: unknown }).Deno === "undefined";
      const why = page && e instanceof TypeError
        ? " (a network error, or the server does not allow this page's origin: CORS)"
        : "";
      throw new Error(`cannot fetch ${url}: ${(e as Error).message}${why}`, { cause: e });
    } finally {
      clearTimeout(timer);
    }
    if (hub) {
      const refusal = hubRefusal(hub, res, url);
      if (refusal) {
        await res.body?.cancel();
        throw refusal;
      }
      // Every later file from the commit of the first (as the Deno hub cache does), where the hub says it.
      const commit = res.headers.get("x-repo-commit");
      if (!pinned && res.ok && commit && /^[0-9a-f]{40}$/.test(commit)) {
        base = `${hub.endpoint}/${hub.id}/resolve/${commit}`;
        pinned = true;
      }
    }
    if (hub && !res.ok) {
      await res.body?.cancel();
      if (hubSaysAbsent(res)) return null;
      throw notTheHubs(hub, res, url);
    }
    if (res.status === 404 || (optional && (res.status === 403 || res.status === 410))) {
      await res.body?.cancel();
      // a refusal counted as absence: said if the file turns out to be needed (weights without an index)
      if (res.status !== 404) {
        refused.set(file, new HubError("HTTP", `cannot fetch ${url}: HTTP ${res.status}`, url, res.status));
      }
      return null;
    }
    if (!res.ok) {
      await res.body?.cancel();
      throw new Error(`cannot fetch ${url}: HTTP ${res.status}`);
    }
    return timedResponse(res, ac, timeoutMs, url);
  };
  return {
    where: where ?? base,
    notCached: refused,
    async text(file, optional) {
      const res = await get(file, optional);
      if (res === null) {
        if (optional) return null;
        throw new Error(`cannot fetch ${base}/${file}: HTTP 404`);
      }
      try {
        return await readBoundedText(res.body, "", Number(res.headers.get("content-length") ?? -1));
      } catch (e) {
        throw new Error(`cannot fetch ${base}/${file}: ${(e as Error).message}`, { cause: e });
      }
    },
    async open(file) {
      const res = await get(file, OPTIONAL_WEIGHT_FILES.has(file));
      return res && responseSource(res, `${base}/${file}`);
    },
  };
}

// Whether the file system is there (Deno): folders and the hub cache; in a browser, only fetch and blobs.
const hasFileSystem = () => typeof (globalThis as { Deno?: unknown }).Deno !== "undefined";

/** In a browser: the files of a hub repository fetched straight from the hub (the HTTP cache keeps them);
 * exported for tests, which run it in Deno. */
export function hubUrlSource(id: string, options: HubOptions): ModelSource {
  const revision = options.revision ?? "main";
  if (options.localFilesOnly) {
    throw new HubError(
      "NotCached",
      `${id}: there is no hub cache folder in a browser and downloads are off (localFilesOnly); load the ` +
        `files from a URL or pick them (fromPretrainedFiles) instead`,
    );
  }
  const endpoint = (options.endpoint ?? hubEndpoint()).replace(/\/+$/, "");
  const base = `${endpoint}/${id}/resolve/${encodeURIComponent(revision)}`;
  const token = typeof options.token === "string" ? options.token : null;
  return urlSource(base, options, `${id}@${revision}`, { id, revision, endpoint, token });
}

/** The source of a hub id, folder or URL: a folder or the hub cache in Deno, fetched in a browser. */
export async function sourceOf(s: string, options: HubOptions): Promise<ModelSource> {
  if (isUrl(s)) return urlSource(s, options);
  if (hasFileSystem()) return (await import("./pretrained_fs.ts")).localSource(s, options);
  if (isHubId(s)) return hubUrlSource(s, options);
  // A browser: a path relative to the page.
  const page = (globalThis as { location?: { href: string } }).location?.href;
  if (!page) throw new Error(`'${s}' is neither a URL nor a hub id, and there is no file system here`);
  return urlSource(new URL(s, page).href, options);
}

/** Model files by name (`config.json`, `model.safetensors`, ...): files picked in a page, or blobs/bytes. */
export type ModelFiles = Iterable<File> | Record<string, Blob | Uint8Array<ArrayBuffer>>;

/** The source of files given as blobs or bytes, by name; `where` names them in messages. */
export function filesSource(files: ModelFiles, where: string): ModelSource {
  const byName = new Map<string, Blob>();
  if (Symbol.iterator in files) {
    for (const f of files as Iterable<File>) {
      if (byName.has(f.name)) throw new Error(`${where}: two files are named ${f.name}`);
      byName.set(f.name, f);
    }
  } else {
    for (const [name, b] of Object.entries(files)) byName.set(name, b instanceof Blob ? b : new Blob([b]));
  }
  const names = () => [...byName.keys()].join(", ") || "none";
  return {
    where,
    async text(file, optional) {
      const b = byName.get(file);
      if (b) return await readBoundedText(b.stream(), `${where}/${file}`, b.size);
      if (optional) return null;
      throw new Error(`${where}/${file}: no such file among the given ones (${names()})`);
    },
    open(file) {
      const b = byName.get(file);
      return Promise.resolve(b ? blobSource(b, `${where}/${file}`) : null);
    },
  };
}

/** A JSON object read from `where`. `unique`: a key twice in one object is an error (JSON.parse would keep
 * the last one silently); set for config.json and the shard index, whose keys decide the model, not for the
 * tokenizer's files. */
export function parseJson(text: string, where: string, unique = false): Record<string, unknown> {
  if (jsonDepth(text, MAX_JSON_DEPTH) > MAX_JSON_DEPTH) {
    throw new Error(`${where}: nests deeper than ${MAX_JSON_DEPTH} levels (not a model's JSON)`);
  }
  let json: unknown;
  try {
    json = JSON.parse(text);
  } catch (e) {
    throw new Error(`${where} is not valid JSON: ${(e as Error).message}`);
  }
  if (typeof json !== "object" || json === null || Array.isArray(json)) {
    throw new Error(`${where}: not a JSON object`);
  }
  const dup = unique ? duplicateJsonKey(text) : null;
  if (dup !== null) throw new Error(`${where}: the key ${dup} is there twice`);
  return json as Record<string, unknown>;
}

/** 32 bits of a text (FNV-1a over its UTF-16 units) as 8 hex digits. */
function fnv1a(text: string, seed: number): string {
  let h = seed;
  for (let i = 0; i < text.length; i++) h = Math.imul(h ^ text.charCodeAt(i), 0x01000193);
  return (h >>> 0).toString(16).padStart(8, "0");
}

/**
 * The digest of a tokenizer's files as saved (`tokenizer.json`'s text, and `tokenizer_config.json`'s or null
 * where there is none), which `config.json` keeps to tell them from another save's. Two 32-bit FNV-1a lanes
 * per file: against mix-ups, not tampering (crypto.subtle is async, and absent from pages that are no secure
 * context).
 */
export function tokenizerDigest(tokenizer: string, config: string | null): string {
  const of = (text: string) => fnv1a(text, 0x811c9dc5) + fnv1a(text, 0x5bd1e995 ^ text.length);
  return of(tokenizer) + (config === null ? "" : `+${of(config)}`);
}

/** The tokenizer of a source (`tokenizer.json` + optional `tokenizer_config.json`) and the
 * {@linkcode tokenizerDigest} of those files; null where it has none and it is not `required`. */
export async function readTokenizer(
  src: ModelSource,
  required: boolean,
): Promise<{ tokenizer: Tokenizer; digest: string } | null> {
  const text = await src.text("tokenizer.json", !required);
  if (text === null) return null;
  const cfgText = await src.text("tokenizer_config.json", true);
  const where = `${src.where}/tokenizer.json`;
  const tokenizer = tokenizerFromJSON(
    parseJson(text, where),
    cfgText === null ? {} : parseJson(cfgText, `${src.where}/tokenizer_config.json`),
    where,
  );
  return { tokenizer, digest: tokenizerDigest(text, cfgText) };
}

/** The tokenizer of a source (see {@linkcode readTokenizer}); null where it has none and it is not
 * `required`. */
export async function tokenizerOf(src: ModelSource, required: boolean): Promise<Tokenizer | null> {
  return (await readTokenizer(src, required))?.tokenizer ?? null;
}

/**
 * Loads the tokenizer of a hub id, folder or URL: its `tokenizer.json` (required) and
 * `tokenizer_config.json` (optional). Char-model files give a {@linkcode ByteTokenizer}, Hugging Face ones a
 * {@linkcode HubTokenizer}.
 */
export async function loadTokenizer(idOrDirOrUrl: string, options: HubOptions = {}): Promise<Tokenizer> {
  checkOptionKeys(options, HUB_OPTION_KEYS, "loadTokenizer");
  return (await tokenizerOf(await sourceOf(idOrDirOrUrl, options), true))!;
}
