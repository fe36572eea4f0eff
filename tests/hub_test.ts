/**
 * Hub ids, downloads and the cache, against a local HTTP server that behaves like the Hugging Face hub:
 * `/<org>/<name>/resolve/<revision>/<file>` with `X-Repo-Commit`, git-sha1 ETags for small files, and for
 * `.safetensors` (LFS) files a 302 to a storage URL with `X-Linked-Etag` (sha256) and `X-Linked-Size`;
 * Range requests; the hub's 401/404 error codes. Everything stays on 127.0.0.1.
 * @module
 */

import assert from "node:assert/strict";
import { createHash } from "node:crypto";
import { init } from "../core/device.ts";
import { manualSeed } from "../core/random.ts";
import { memory } from "../core/memory.ts";
import { parseSafetensors, serializeSafetensors } from "../core/safetensors.ts";
import { hubDownload, HubError, hubToken, MODEL_FILES, repoCacheDir } from "../mamba/hub.ts";
import { MambaLM } from "../mamba/lm.ts";
import { mapKey } from "../mamba/checkpoint_config.ts";
import { hubUrlSource, loadTokenizer, tokenizerOf } from "../mamba/model_sources.ts";
import { fromPretrained, NoTokenizerError, saveCheckpoint } from "../mamba/pretrained.ts";
import { ByteTokenizer, HubTokenizer, StreamDecoder } from "../mamba/tokenizer.ts";
import { assertLmV64Logits, fixturePath, maxAbsDiff } from "./fixture_util.ts";

const COMMIT = "0123456789abcdef0123456789abcdef01234567";
const sha256 = (b: Uint8Array) => createHash("sha256").update(b).digest("hex");
const gitSha1 = (b: Uint8Array) =>
  createHash("sha1").update(new TextEncoder().encode(`blob ${b.length}\0`)).update(b).digest("hex");

interface Req {
  method: string;
  path: string;
  range: string | null;
}

/** A fake hub serving in-memory repositories. */
class HubServer {
  readonly repos = new Map<string, Map<string, Uint8Array>>();
  readonly requests: Req[] = [];
  /** Files whose next body is cut in the middle (half is sent, then the connection ends). */
  readonly dropOnce = new Set<string>();
  /** Bytes served as a file's body instead of the real ones (headers still describe the real file). */
  readonly lie = new Map<string, Uint8Array>();
  /** Commits a repository may be read at besides "main" (which is COMMIT); each serves the same files. */
  readonly commits = new Set([COMMIT]);
  /** Answers in place of the hub while set (null: the hub answers). */
  override: ((req: Request) => Response | null) | null = null;
  /** Called while a cut body is being served, after the first half went out. */
  midBody: (() => Promise<void>) | null = null;
  readonly #ac = new AbortController();
  readonly #server: Deno.HttpServer<Deno.NetAddr>;

  constructor() {
    this.#server = Deno.serve(
      { hostname: "127.0.0.1", port: 0, signal: this.#ac.signal, onListen() {} },
      (req) => this.#handle(req),
    );
  }

  get url(): string {
    return `http://127.0.0.1:${this.#server.addr.port}`;
  }

  addRepo(id: string, files: Record<string, Uint8Array | string>): void {
    const m = new Map<string, Uint8Array>();
    for (const [k, v] of Object.entries(files)) {
      m.set(k, typeof v === "string" ? new TextEncoder().encode(v) : v);
    }
    this.repos.set(id, m);
  }

  count(pred: (r: Req) => boolean = () => true): number {
    return this.requests.filter(pred).length;
  }

  async close(): Promise<void> {
    this.#ac.abort();
    await this.#server.finished;
  }

  #body(req: Request, file: string, real: Uint8Array): Response {
    const data = this.lie.get(file) ?? real;
    const range = /^bytes=(\d+)-$/.exec(req.headers.get("range") ?? "");
    const start = range ? Number(range[1]) : 0;
    if (start > data.length) return new Response(null, { status: 416 });
    const part = data.subarray(start);
    const headers: Record<string, string> = { "content-length": String(part.length) };
    if (range) headers["content-range"] = `bytes ${start}-${data.length - 1}/${data.length}`;
    const status = range ? 206 : 200;
    if (req.method === "HEAD") return new Response(null, { status, headers });
    if (this.dropOnce.delete(file)) {
      const half = part.subarray(0, part.length >> 1);
      const mid = this.midBody;
      const body = new ReadableStream<Uint8Array>({
        async start(c) {
          c.enqueue(half.slice());
          await new Promise((r) => setTimeout(r, 30));
          if (mid) await mid();
          c.close(); // fewer bytes than Content-Length: the client sees a broken connection
        },
      });
      return new Response(body, { status, headers });
    }
    return new Response(part.slice(), { status, headers });
  }

  #handle(req: Request): Response {
    const url = new URL(req.url);
    this.requests.push({ method: req.method, path: url.pathname, range: req.headers.get("range") });
    const over = this.override?.(req);
    if (over) return over;
    const cdn = /^\/cdn\/([^/]+\/[^/]+)\/(.+)$/.exec(url.pathname);
    if (cdn) {
      const data = this.repos.get(cdn[1])?.get(cdn[2]);
      return data ? this.#body(req, cdn[2], data) : new Response("gone", { status: 404 });
    }
    const m = /^\/([^/]+\/[^/]+)\/resolve\/([^/]+)\/(.+)$/.exec(url.pathname);
    if (!m) return new Response("not found", { status: 404 });
    const [, id, revEnc, file] = m;
    const repo = this.repos.get(id);
    if (!repo) {
      // as the hub answers: X-Error-Code RepoNotFound, as a 401 (ids that could be private) or a 404
      return new Response("Repository not found", {
        status: id.endsWith("-404") ? 404 : 401,
        headers: { "x-error-code": "RepoNotFound", "x-error-message": "Repository not found" },
      });
    }
    const rev = decodeURIComponent(revEnc);
    if (rev !== "main" && !this.commits.has(rev)) {
      return new Response("Invalid rev id", {
        status: 404,
        headers: { "x-error-code": "RevisionNotFound", "x-error-message": `Invalid rev id: ${rev}` },
      });
    }
    const data = repo.get(file);
    if (!data) {
      return new Response("Entry not found", {
        status: 404,
        headers: { "x-error-code": "EntryNotFound", "x-repo-commit": rev === "main" ? COMMIT : rev },
      });
    }
    if (/\.(safetensors|bin)$/.test(file)) { // LFS files, as the hub stores weights: redirected to its CDN
      return new Response(null, {
        status: 302,
        headers: {
          location: `${this.url}/cdn/${id}/${file}`,
          "x-repo-commit": rev === "main" ? COMMIT : rev,
          "x-linked-etag": `"${sha256(data)}"`,
          "x-linked-size": String(data.length),
        },
      });
    }
    const res = this.#body(req, file, data);
    res.headers.set("x-repo-commit", rev === "main" ? COMMIT : rev);
    res.headers.set("etag", `"${gitSha1(data)}"`);
    return res;
  }
}

async function lmFiles(): Promise<Record<string, Uint8Array>> {
  return {
    "config.json": await Deno.readFile(fixturePath("lm_v64_hf/config.json")),
    "model.safetensors": await Deno.readFile(fixturePath("lm_v64_hf/model.safetensors")),
  };
}

async function tokFiles(): Promise<Record<string, Uint8Array>> {
  return {
    "tokenizer.json": await Deno.readFile(fixturePath("hub/tokenizer.json")),
    "tokenizer_config.json": await Deno.readFile(fixturePath("hub/tokenizer_config.json")),
  };
}

// Runs `fn` with a fresh server and cache folder; both go afterwards.
async function withHub(fn: (s: HubServer, cacheDir: string) => Promise<void>): Promise<void> {
  await init();
  const s = new HubServer();
  const cacheDir = await Deno.makeTempDir({ prefix: "hub-cache-" });
  try {
    await fn(s, cacheDir);
  } finally {
    await s.close();
    await Deno.remove(cacheDir, { recursive: true });
  }
}

async function list(dir: string): Promise<string[]> {
  const out: string[] = [];
  try {
    for await (const e of Deno.readDir(dir)) out.push(e.name);
  } catch (e) {
    if (!(e instanceof Deno.errors.NotFound)) throw e;
  }
  return out.sort();
}

// The cache must never hold a file under its final name that is not complete and verified.
async function assertNoModelCached(cacheDir: string, id: string): Promise<void> {
  const repo = repoCacheDir(id, cacheDir);
  const blobs = await list(`${repo}/blobs`);
  const model = sha256(await Deno.readFile(fixturePath("lm_v64_hf/model.safetensors")));
  assert.ok(!blobs.includes(model), `blobs/${model} must not exist: ${blobs}`);
  for (const snap of await list(`${repo}/snapshots`)) {
    assert.ok(!(await list(`${repo}/snapshots/${snap}`)).includes("model.safetensors"));
  }
}

const opts = (s: HubServer, cacheDir: string) => ({ endpoint: s.url, cacheDir, progress: false });

Deno.test("hub: download into the Hugging Face cache layout; the second call makes no request", async () => {
  await withHub(async (s, cacheDir) => {
    const files = await lmFiles();
    s.addRepo("org/lm", files);
    // Endpoint and cache from the environment, as huggingface_hub reads them.
    const saved = { e: Deno.env.get("HF_ENDPOINT"), c: Deno.env.get("HF_HUB_CACHE") };
    Deno.env.set("HF_ENDPOINT", s.url + "/");
    Deno.env.set("HF_HUB_CACHE", cacheDir);
    try {
      const lm = await fromPretrained("org/lm", { progress: false });
      assert.equal(lm.source, "org/lm@main");
      assert.equal(lm.tokenizer, null);
      await assertLmV64Logits(lm);
      lm.dispose();
    } finally {
      for (const [k, v] of [["HF_ENDPOINT", saved.e], ["HF_HUB_CACHE", saved.c]] as const) {
        if (v === undefined) Deno.env.delete(k);
        else Deno.env.set(k, v);
      }
    }
    const repo = `${cacheDir}/models--org--lm`;
    assert.equal(await Deno.readTextFile(`${repo}/refs/main`), COMMIT);
    const cfgBlob = gitSha1(files["config.json"]);
    const modelBlob = sha256(files["model.safetensors"]);
    assert.deepEqual(await list(`${repo}/blobs`), [cfgBlob, modelBlob].sort());
    assert.deepEqual(await list(`${repo}/snapshots/${COMMIT}`), ["config.json", "model.safetensors"]);
    for (const [name, blob] of [["config.json", cfgBlob], ["model.safetensors", modelBlob]]) {
      const p = `${repo}/snapshots/${COMMIT}/${name}`;
      assert.ok((await Deno.lstat(p)).isSymlink, `${name} is a symlink`);
      assert.equal(await Deno.readLink(p), `../../blobs/${blob}`);
      assert.deepEqual(await Deno.readFile(p), files[name]);
    }
    // The repository has no tokenizer: remembered, so that asking again costs nothing.
    assert.deepEqual(await list(`${repo}/.no_exist/${COMMIT}`), ["tokenizer.json"]);

    const before = s.count();
    for (const revision of ["main", COMMIT]) {
      const again = await fromPretrained("org/lm", { ...opts(s, cacheDir), revision });
      await assertLmV64Logits(again);
      again.dispose();
    }
    assert.equal(s.count(), before, "a cached model costs no request");
    assert.equal(
      await hubDownload("org/lm", "config.json", opts(s, cacheDir)),
      `${repo}/snapshots/${COMMIT}/config.json`,
    );
    assert.equal(await hubDownload("org/lm", "tokenizer.json", opts(s, cacheDir)), null);
    assert.equal(s.count(), before);
    // refresh: one HEAD per file to learn the current commit, no body downloaded again.
    (await fromPretrained("org/lm", { ...opts(s, cacheDir), refresh: true })).dispose();
    assert.ok(s.requests.slice(before).every((r) => r.method === "HEAD"), "refresh sends only HEADs");
    assert.equal(s.count() - before, 3, "config.json, tokenizer.json, model.safetensors");
    // Two loads at once into an empty cache: one download of each file, both models fine.
    const cache2 = `${cacheDir}/concurrent`;
    const n = s.count((r) => r.method === "GET");
    const both = await Promise.all([1, 2].map(() => fromPretrained("org/lm", opts(s, cache2))));
    for (const m of both) {
      await assertLmV64Logits(m);
      m.dispose();
    }
    assert.equal(
      s.count((r) => r.method === "GET" && r.path.startsWith("/cdn/")),
      2,
      "one body GET per cache",
    );
    assert.ok(s.count((r) => r.method === "GET") - n <= 4);
    // The snapshot folder is an ordinary model folder too.
    const local = await fromPretrained(`${repo}/snapshots/${COMMIT}`);
    assert.equal(local.vocabSize, 64);
    local.dispose();
  });
});

Deno.test("hub in a browser (fetched, no cache): an unknown repository or revision is named; files after the first come from its commit", async () => {
  await withHub(async (s) => {
    s.addRepo("org/lm", await lmFiles());
    for (
      const [id, revision, code] of [["org/nope", "main", "RepositoryNotFound"], [
        "org/nope-404",
        "main",
        "RepositoryNotFound",
      ], ["org/lm", "v9", "RevisionNotFound"]]
    ) {
      await assert.rejects(
        () => hubUrlSource(id, { endpoint: s.url, revision }).text("config.json", false),
        (e: Error) => e instanceof HubError && e.code === code,
        `${id}@${revision}`,
      );
    }
    const src = hubUrlSource("org/lm", { endpoint: s.url });
    const before = s.requests.length;
    assert.ok((await src.text("config.json", false))!.includes("hidden_size"));
    const weights = await src.open("model.safetensors");
    await weights!.close();
    assert.deepEqual(
      s.requests.slice(before).filter((r) => r.path.includes("/resolve/")).map((r) => r.path),
      ["/org/lm/resolve/main/config.json", `/org/lm/resolve/${COMMIT}/model.safetensors`],
    );
  });
});

Deno.test("hub in a browser: a 404 is a missing file only where the hub says so (EntryNotFound, or its commit); a bare 404 or a 403 is an error", async () => {
  await withHub(async (s) => {
    s.addRepo("org/lm", { ...await lmFiles(), ...await tokFiles() });
    const src = () => hubUrlSource("org/lm", { endpoint: s.url });
    // the hub's own answer for a file the repository lacks (X-Error-Code and X-Repo-Commit), or either header
    assert.equal(await src().text("no_such_file.json", true), null);
    for (
      const headers of [{ "x-error-code": "EntryNotFound" }, { "x-repo-commit": COMMIT }] as Record<
        string,
        string
      >[]
    ) {
      s.override = (req) =>
        req.url.endsWith("/tokenizer_config.json") ? new Response("no", { status: 404, headers }) : null;
      assert.equal(await src().text("tokenizer_config.json", true), null, JSON.stringify(headers));
    }
    // A proxy's or a wrong endpoint's 404 (no hub's headers), or a 403, is no missing file: the tokenizer is not
    // loaded without its config in silence, nor the weights without a form of them.
    for (
      const [status, said] of [[404, /HTTP 404 without the hub's X-Error-Code/], [403, /HTTP 403$/]] as const
    ) {
      s.override = (req) =>
        /\/(tokenizer_config\.json|model\.safetensors)$/.test(req.url)
          ? new Response("no", { status })
          : null;
      await assert.rejects(
        () => tokenizerOf(src(), false),
        (e: Error) =>
          e instanceof HubError && e.code === "HTTP" && e.status === status && said.test(e.message),
        `tokenizer_config.json: HTTP ${status}`,
      );
      await assert.rejects(() => src().open("model.safetensors"), said, `model.safetensors: HTTP ${status}`);
    }
  });
});

Deno.test("hub: a model's files all come from one commit, though main moved after its config.json was cached", async () => {
  await withHub(async (s, cacheDir) => {
    s.addRepo("org/lm", await lmFiles());
    const OLD = "fedcba9876543210fedcba9876543210fedcba98";
    s.commits.add(OLD);
    // An earlier load cached config.json at OLD, then stopped; main is COMMIT now.
    const repo = repoCacheDir("org/lm", cacheDir);
    await Deno.mkdir(`${repo}/snapshots/${OLD}`, { recursive: true });
    await Deno.copyFile(fixturePath("lm_v64_hf/config.json"), `${repo}/snapshots/${OLD}/config.json`);
    await Deno.mkdir(`${repo}/refs`);
    await Deno.writeTextFile(`${repo}/refs/main`, OLD);
    const lm = await fromPretrained("org/lm", opts(s, cacheDir));
    await assertLmV64Logits(lm);
    lm.dispose();
    const asked = s.requests.filter((r) => r.path.includes("/resolve/")).map((r) => r.path);
    assert.ok(asked.length > 0 && asked.every((p) => p.includes(`/resolve/${OLD}/`)), asked.join(", "));
    assert.deepEqual(await list(`${repo}/snapshots`), [OLD]);
    assert.deepEqual(await list(`${repo}/snapshots/${OLD}`), ["config.json", "model.safetensors"]);
    assert.equal(await Deno.readTextFile(`${repo}/refs/main`), OLD, "main still names the commit read");
    // A refresh without network keeps to the cache, as huggingface_hub does (it threw "Network").
    await s.close();
    const offline = await fromPretrained("org/lm", { ...opts(s, cacheDir), refresh: true, retries: 0 });
    await assertLmV64Logits(offline);
    offline.dispose();
    await assert.rejects(
      () => fromPretrained("org/other", { ...opts(s, cacheDir), refresh: true, retries: 0 }),
      (e: Error) => e instanceof HubError && e.code === "Network",
    );
  });
});

Deno.test("hub: a download cut off mid-file resumes with a Range request; no half file is ever final", async () => {
  await withHub(async (s, cacheDir) => {
    const files = await lmFiles();
    const size = files["model.safetensors"].length;
    s.addRepo("org/lm", files);
    // In one call: the retry resumes where the cut left off.
    s.dropOnce.add("model.safetensors");
    let seenMid = false;
    s.midBody = async () => {
      await assertNoModelCached(cacheDir, "org/lm");
      const blobs = await list(`${repoCacheDir("org/lm", cacheDir)}/blobs`);
      assert.ok(
        blobs.some((b) => b.endsWith(".incomplete")),
        `an .incomplete file while downloading: ${blobs}`,
      );
      seenMid = true;
    };
    const lm = await fromPretrained("org/lm", opts(s, cacheDir));
    await assertLmV64Logits(lm);
    lm.dispose();
    assert.ok(seenMid);
    // The body comes from the storage URL the hub redirects to: cut once, then resumed.
    const gets = s.requests.filter((r) => r.method === "GET" && r.path.startsWith("/cdn/"));
    assert.deepEqual(gets.map((r) => r.range), [null, `bytes=${size >> 1}-`]);
    assert.ok(
      !(await list(`${repoCacheDir("org/lm", cacheDir)}/blobs`)).some((b) => b.endsWith(".incomplete")),
    );

    // Across calls: without retries the first call fails and keeps the .incomplete; the next resumes it.
    const cache2 = `${cacheDir}/second`;
    s.dropOnce.add("model.safetensors");
    s.midBody = null;
    await assert.rejects(
      () => fromPretrained("org/lm", { ...opts(s, cache2), retries: 0 }),
      (e: Error) => e instanceof HubError && e.code === "Interrupted" && /next call resumes/.test(e.message),
    );
    await assertNoModelCached(cache2, "org/lm");
    const blobs = `${repoCacheDir("org/lm", cache2)}/blobs`;
    const incomplete = (await list(blobs)).filter((b) => b.endsWith(".incomplete"));
    assert.equal(incomplete.length, 1);
    assert.equal((await Deno.stat(`${blobs}/${incomplete[0]}`)).size, size >> 1);
    const n = s.count();
    const lm2 = await fromPretrained("org/lm", { ...opts(s, cache2), retries: 0 });
    await assertLmV64Logits(lm2);
    lm2.dispose();
    const ranges = s.requests.slice(n).filter((r) => r.path.startsWith("/cdn/")).map((r) => r.range);
    assert.deepEqual(ranges, [`bytes=${size >> 1}-`]);
  });
});

Deno.test("hub: truncated or corrupted downloads are detected, deleted and never cached", async () => {
  await withHub(async (s, cacheDir) => {
    const files = await lmFiles();
    const model = files["model.safetensors"];
    s.addRepo("org/lm", files);
    // A flipped byte: the sha256 (the LFS ETag) does not match.
    const flipped = model.slice();
    flipped[model.length - 10] ^= 0xff;
    s.lie.set("model.safetensors", flipped);
    await assert.rejects(
      () => fromPretrained("org/lm", opts(s, cacheDir)),
      (e: Error) =>
        e instanceof HubError && e.code === "Corrupt" && /sha256 \w+ differs from the hub's/.test(e.message),
    );
    await assertNoModelCached(cacheDir, "org/lm");
    assert.ok(
      !(await list(`${repoCacheDir("org/lm", cacheDir)}/blobs`)).some((b) => b.endsWith(".incomplete")),
    );
    // Content-Length disagrees with the size the hub announced.
    s.lie.set("model.safetensors", model.subarray(0, 5000));
    await assert.rejects(
      () => fromPretrained("org/lm", opts(s, cacheDir)),
      new RegExp(`the server sends 5000 bytes .* but the file has ${model.length}`),
    );
    await assertNoModelCached(cacheDir, "org/lm");
    s.lie.clear();

    // A file that is consistent in size and hash but whose header points past its end.
    s.addRepo("org/truncated", { ...files, "model.safetensors": model.subarray(0, model.length - 100) });
    await assert.rejects(
      () => fromPretrained("org/truncated", opts(s, cacheDir)),
      /not a valid safetensors file: .*go past the end of the data section/,
    );
    await assertNoModelCached(cacheDir, "org/truncated");
    // The same file read from a folder is refused before any tensor is read.
    const dir = await Deno.makeTempDir();
    await Deno.writeFile(`${dir}/config.json`, files["config.json"]);
    await Deno.writeFile(`${dir}/model.safetensors`, model.subarray(0, model.length - 100));
    await assert.rejects(() => fromPretrained(dir), /go past the end of the data section/);
    await Deno.remove(dir, { recursive: true });
  });
});

Deno.test("hub: unknown repository, revision and file give clear errors", async () => {
  await withHub(async (s, cacheDir) => {
    s.addRepo("org/lm", await lmFiles());
    s.addRepo("org/empty", { "README.md": "nothing here" });
    await assert.rejects(
      () => fromPretrained("org/nope", opts(s, cacheDir)),
      /repository 'org\/nope' not found at http:\/\/127\.0\.0\.1:\d+ \(HTTP 401: Repository not found/,
    );
    await assert.rejects(
      () => fromPretrained("org/nope-404", opts(s, cacheDir)),
      (e: Error) =>
        e instanceof HubError && e.code === "RepositoryNotFound" &&
        /repository 'org\/nope-404' not found .*HTTP 404: Repository not found.*check the id/.test(e.message),
    );
    await assert.rejects(
      () => fromPretrained("org/lm", { ...opts(s, cacheDir), revision: "v9" }),
      (e: Error) =>
        e instanceof HubError && e.code === "RevisionNotFound" &&
        /revision 'v9' not found in 'org\/lm'/.test(e.message),
    );
    await assert.rejects(
      () => fromPretrained("org/empty", opts(s, cacheDir)),
      /org\/empty@main: the repository has no config\.json/,
    );
    assert.equal(await hubDownload("org/lm", "nope.json", opts(s, cacheDir)), null);
    await assert.rejects(() => hubDownload("org/lm", "../x", opts(s, cacheDir)), /invalid file name/);
    await assert.rejects(() => hubDownload("not an id", "x", opts(s, cacheDir)), /is not a hub model id/);
  });
});

Deno.test("hub: answers that are not the hub's are never cached; a commit header is no path; a refresh keeps the cache when the hub errs", async () => {
  const cache = await Deno.makeTempDir({ prefix: "hub-cache-" });
  const outside = await Deno.makeTempDir({ prefix: "outside-" });
  let answer: (req: Request, url: URL) => Response = () => new Response(null, { status: 500 });
  const ac = new AbortController();
  const server = Deno.serve(
    { hostname: "127.0.0.1", port: 0, signal: ac.signal, onListen() {} },
    (req) => answer(req, new URL(req.url)),
  );
  const o = (x = {}) => ({
    endpoint: `http://127.0.0.1:${server.addr.port}`,
    cacheDir: cache,
    progress: false,
    ...x,
  });
  const body = new TextEncoder().encode('{"a": 1}');
  const file = (commit: string) => (req: Request) =>
    new Response(req.method === "HEAD" ? null : body, {
      headers: { "x-repo-commit": commit, etag: '"abc123"', "content-length": String(body.length) },
    });
  try {
    // X-Repo-Commit names cache folders: a path in it would write outside the cache (a symlink, refs/main)
    const evil = `../../../../../../..${outside}`;
    answer = file(evil);
    await assert.rejects(
      () => hubDownload("org/m", "config.json", o()),
      /config\.json answered HTTP 200 without naming the commit of config\.json \(X-Repo-Commit\): not the hub's/,
    );
    await Deno.writeTextFile(`${outside}/tokenizer.json`, "precious");
    answer = () =>
      new Response("no", {
        status: 404,
        headers: { "x-error-code": "EntryNotFound", "x-repo-commit": evil },
      });
    assert.equal(await hubDownload("org/m", "tokenizer.json", o()), null);
    assert.deepEqual([...Deno.readDirSync(outside)].map((e) => e.name), ["tokenizer.json"]);
    assert.equal(await Deno.readTextFile(`${outside}/tokenizer.json`), "precious");
    assert.equal(await Deno.lstat(`${repoCacheDir("org/m", cache)}/refs`).catch(() => null), null, "no ref");
    // a captive portal: every URL redirected to a login page, no commit, no ETag; nothing cached, so once it
    // is gone the next call asks the hub again
    answer = (req, url) =>
      url.pathname === "/login"
        ? new Response(req.method === "HEAD" ? null : "<html>log in</html>", {
          headers: { "content-type": "text/html" },
        })
        : new Response(null, { status: 302, headers: { location: `${url.origin}/login` } });
    await assert.rejects(
      () => hubDownload("org/m", "config.json", o()),
      /not the hub's answer \(a proxy or login page/,
    );
    assert.equal(await Deno.lstat(`${repoCacheDir("org/m", cache)}/snapshots`).catch(() => null), null);
    answer = file("0123456789abcdef0123456789abcdef01234567");
    const path = await hubDownload("org/m", "config.json", o());
    assert.equal(await Deno.readTextFile(path!), '{"a": 1}');
    // a refresh whose HEAD gets an HTTP error (503, a gated 401) keeps to the cached file, as huggingface_hub
    for (const status of [503, 429, 401]) {
      answer = () => new Response("down", { status });
      assert.equal(await hubDownload("org/m", "config.json", o({ refresh: true })), path, `HTTP ${status}`);
    }
    // a gated repository says so, in Deno and in a browser's fetches
    answer = () =>
      new Response("x", {
        status: 401,
        headers: { "x-error-code": "GatedRepo", "x-error-message": "Access to model org/g is restricted." },
      });
    await assert.rejects(
      () => hubDownload("org/g", "config.json", o()),
      /repository 'org\/g' is gated \(HTTP 401/,
    );
    await assert.rejects(() => hubUrlSource("org/g", o()).text("config.json", false), /is gated/);
    // options and names that cannot be right
    await assert.rejects(
      () => hubDownload("org/m", "x.json", o({ retries: NaN })),
      /retries must be an integer >= 0, got NaN/,
    );
    await assert.rejects(() => hubDownload("org/m", "./x.json", o()), /invalid file name '\.\/x\.json'/);
  } finally {
    ac.abort();
    await server.finished;
    await Deno.remove(cache, { recursive: true });
    await Deno.remove(outside, { recursive: true });
  }
});

Deno.test("hub: a private repository loads with a token (option, HF_TOKEN, or the login file), which goes to the hub only, never to the storage a redirect leads to", async () => {
  await init();
  const TOKEN = "hf_testtoken123";
  const files = await lmFiles();
  const seen: { host: string; auth: string | null }[] = [];
  const ac = new AbortController();
  // the LFS storage: another origin (another port), as the hub's CDN
  const cdn = Deno.serve({ hostname: "127.0.0.1", port: 0, signal: ac.signal, onListen() {} }, (req) => {
    seen.push({ host: "cdn", auth: req.headers.get("authorization") });
    const data = files["model.safetensors"];
    return new Response(req.method === "HEAD" ? null : data.slice(), {
      headers: { "content-length": String(data.length) },
    });
  });
  const hub = Deno.serve({ hostname: "127.0.0.1", port: 0, signal: ac.signal, onListen() {} }, (req) => {
    const auth = req.headers.get("authorization");
    seen.push({ host: "hub", auth });
    if (auth !== `Bearer ${TOKEN}`) {
      return new Response("no", { status: 401, headers: { "x-error-code": "RepoNotFound" } });
    }
    const file = new URL(req.url).pathname.replace(/^.*\/resolve\/[^/]+\//, "");
    const headers = { "x-repo-commit": COMMIT };
    if (file === "model.safetensors") {
      const data = files[file];
      return new Response(null, {
        status: 302,
        headers: {
          ...headers,
          location: `http://127.0.0.1:${cdn.addr.port}/blob`,
          "x-linked-etag": sha256(data),
          "x-linked-size": String(data.length),
        },
      });
    }
    const data = files[file];
    if (!data) {
      return new Response("no", { status: 404, headers: { ...headers, "x-error-code": "EntryNotFound" } });
    }
    return new Response(req.method === "HEAD" ? null : data.slice(), {
      headers: { ...headers, etag: `"${gitSha1(data)}"`, "content-length": String(data.length) },
    });
  });
  const cacheDir = await Deno.makeTempDir({ prefix: "hub-cache-" });
  const o = { endpoint: `http://127.0.0.1:${hub.addr.port}`, cacheDir, progress: false };
  try {
    // without a token (none in the environment: token false), the refusal says what is missing
    await assert.rejects(
      () => fromPretrained("org/private", { ...o, token: false }),
      /repository 'org\/private' not found .*a private one needs a token \(HubOptions\.token, HF_TOKEN/,
    );
    await assert.rejects(
      () => fromPretrained("org/private", { ...o, token: "hf_wrong" }),
      (e: Error) => /the token sent was refused/.test(e.message) && !e.message.includes("hf_wrong"),
    );
    seen.length = 0;
    const lm = await fromPretrained("org/private", { ...o, token: TOKEN });
    assert.equal(lm.config.dModel, 32);
    lm.dispose();
    assert.ok(seen.some((s) => s.host === "cdn"), "the weights came from the storage");
    assert.deepEqual(
      seen.filter((s) => s.host === "cdn").map((s) => s.auth),
      seen.filter((s) => s.host === "cdn").map(() => null),
      "no token to another host",
    );
    assert.ok(seen.filter((s) => s.host === "hub").every((s) => s.auth === `Bearer ${TOKEN}`));
    // a page's fetches send the token given as an option (a page has no environment)
    const page = hubUrlSource("org/private", { ...o, token: TOKEN });
    assert.equal(await page.text("config.json", false), new TextDecoder().decode(files["config.json"]));
    await assert.rejects(() => hubUrlSource("org/private", o).text("config.json", false), /needs a token/);
    // the token huggingface_hub would send: HF_TOKEN, else the file at HF_TOKEN_PATH (HF_HOME/token)
    const saved = ["HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_TOKEN_PATH"].map((k) =>
      [k, Deno.env.get(k)] as const
    );
    try {
      for (const [k] of saved) Deno.env.delete(k);
      await Deno.writeTextFile(`${cacheDir}/token`, `${TOKEN}\n`);
      Deno.env.set("HF_TOKEN_PATH", `${cacheDir}/token`);
      assert.equal(await hubToken(), TOKEN);
      Deno.env.set("HF_TOKEN", "hf_fromenv");
      assert.equal(await hubToken(), "hf_fromenv");
      await assert.rejects(
        () => hubDownload("org/private", "config.json", { ...o, token: "two words", refresh: true }),
        /the hub token must be printable ASCII without spaces/,
      );
      // a cached file needs no request, so no token: one that could not be sent does not stop it
      assert.ok(await hubDownload("org/private", "config.json", { ...o, token: "two words" }));
    } finally {
      for (const [k, v] of saved) v === undefined ? Deno.env.delete(k) : Deno.env.set(k, v);
    }
  } finally {
    ac.abort();
    await Promise.all([hub.finished, cdn.finished]);
    await Deno.remove(cacheDir, { recursive: true });
  }
});

// Two shards and an index, made from lm_v64_hf.
function shard(model: Uint8Array): Record<string, Uint8Array | string> {
  const { tensors } = parseSafetensors(model);
  const names = [...tensors.keys()];
  const parts = [names.slice(0, names.length >> 1), names.slice(names.length >> 1)];
  const out: Record<string, Uint8Array | string> = {};
  const weightMap: Record<string, string> = {};
  parts.forEach((keys, i) => {
    const file = `model-0000${i + 1}-of-00002.safetensors`;
    out[file] = serializeSafetensors(
      Object.fromEntries(keys.map((k) => [k, { shape: tensors.get(k)!.shape, data: tensors.get(k)!.data }])),
    );
    for (const k of keys) weightMap[k] = file;
  });
  out["model.safetensors.index.json"] = JSON.stringify({
    metadata: { total_size: 0 },
    weight_map: weightMap,
  });
  return out;
}

Deno.test("hub: sharded checkpoints (index + shards) load from the hub and from a folder", async () => {
  await withHub(async (s, cacheDir) => {
    const files = await lmFiles();
    const shards = shard(files["model.safetensors"]);
    s.addRepo("org/sharded", { "config.json": files["config.json"], ...shards });
    const lm = await fromPretrained("org/sharded", opts(s, cacheDir));
    await assertLmV64Logits(lm);
    lm.dispose();
    const snap = `${repoCacheDir("org/sharded", cacheDir)}/snapshots/${COMMIT}`;
    assert.deepEqual(await list(snap), ["config.json", ...Object.keys(shards)].sort());
    const n = s.count();
    (await fromPretrained("org/sharded", opts(s, cacheDir))).dispose();
    assert.equal(s.count(), n, "cached shards cost no request");

    const dir = await Deno.makeTempDir();
    await Deno.writeFile(`${dir}/config.json`, files["config.json"]);
    for (const [k, v] of Object.entries(shards)) {
      await Deno.writeFile(`${dir}/${k}`, typeof v === "string" ? new TextEncoder().encode(v) : v);
    }
    const local = await fromPretrained(dir);
    await assertLmV64Logits(local);
    local.dispose();
    // An index that names a tensor a shard lacks, or a shard that is missing.
    const index = JSON.parse(shards["model.safetensors.index.json"] as string);
    const first = Object.keys(index.weight_map)[0];
    index.weight_map[first] = "model-00002-of-00002.safetensors";
    await Deno.writeTextFile(`${dir}/model.safetensors.index.json`, JSON.stringify(index));
    await assert.rejects(
      () => fromPretrained(dir),
      /model-00001-of-00002\.safetensors does not match .*index/,
    );
    await Deno.writeTextFile(
      `${dir}/model.safetensors.index.json`,
      shards["model.safetensors.index.json"] as string,
    );
    // A config.json whose sizes the shards do not have is named before the model is built (a vocab_size of
    // 5e7 allocated for 80 s before failing, 3000 layers were built before they were found missing).
    const cfg = JSON.parse(new TextDecoder().decode(files["config.json"]));
    const live = memory().liveBytes;
    for (
      const [change, want] of [
        [
          { vocab_size: 5e7 },
          /shape mismatch for embedding\.weight: checkpoint \[64, 32\] vs model \[50000000, 32\]/,
        ],
        [
          { num_hidden_layers: 3000 },
          /config\.json has num_hidden_layers 3000, but the checkpoint has layers 0-1 only/,
        ],
      ] as const
    ) {
      await Deno.writeTextFile(`${dir}/config.json`, JSON.stringify({ ...cfg, ...change }));
      const t0 = performance.now();
      await assert.rejects(() => fromPretrained(dir), want);
      assert.ok(performance.now() - t0 < 5000, `refused at once (${performance.now() - t0} ms)`);
      assert.equal(memory().liveBytes, live, "nothing allocated");
    }
    await Deno.writeFile(`${dir}/config.json`, files["config.json"]);
    await Deno.remove(`${dir}/model-00002-of-00002.safetensors`);
    await assert.rejects(
      () => fromPretrained(dir),
      /names model-00002-of-00002\.safetensors, which .* does not have/,
    );
    await Deno.remove(dir, { recursive: true });
  });
});

Deno.test("hub: pytorch_model.bin where there are no safetensors (state-spaces' repositories), downloaded, then offline, and over a URL", async () => {
  await withHub(async (s, cacheDir) => {
    s.addRepo("org/bin", {
      "config.json": await Deno.readFile(fixturePath("lm_v64_state_spaces/config.json")),
      "pytorch_model.bin": await Deno.readFile(fixturePath("torch/lm_v64.bin")),
    });
    // Not cached yet and offline: the files to place by hand include the one such a repository holds.
    await assert.rejects(
      () => fromPretrained("org/bin", { ...opts(s, cacheDir), localFilesOnly: true }),
      (e: Error) =>
        e.message.includes(
          "copy the repository's files (config.json, model.safetensors (or pytorch_model.bin),",
        ),
    );
    // A program that needs text hears that there is no tokenizer before any weight is fetched.
    await assert.rejects(
      () => fromPretrained("org/bin", { ...opts(s, cacheDir), requireTokenizer: true }),
      (e) => {
        assert.ok(e instanceof NoTokenizerError);
        assert.match(e.reason, /org\/bin@main\/tokenizer\.json does not exist$/);
        assert.match(e.message, /^no tokenizer \(.*\): name one with the tokenizer option$/);
        return true;
      },
    );
    assert.equal(
      s.count((r) => /\/(model\.safetensors|pytorch_model\.bin)$/.test(r.path)),
      0,
      "no weights asked for",
    );
    const lm = await fromPretrained("org/bin", opts(s, cacheDir));
    await assertLmV64Logits(lm);
    lm.dispose();
    const weights = /\/(model\.safetensors|model\.safetensors\.index\.json|pytorch_model\.bin)$/;
    const asked = s.requests.map((r) => weights.exec(r.path)?.[1]).filter((f) => f !== undefined);
    assert.deepEqual(
      [...new Set(asked)],
      ["model.safetensors", "model.safetensors.index.json", "pytorch_model.bin"],
      "safetensors looked for first, as transformers prefers them",
    );
    const offline = await fromPretrained("org/bin", { ...opts(s, cacheDir), localFilesOnly: true });
    await assertLmV64Logits(offline);
    offline.dispose();
    const streamed = await fromPretrained(`${s.url}/org/bin/resolve/main`); // a response body, read as it comes
    await assertLmV64Logits(streamed);
    streamed.dispose();
  });
});

Deno.test("hub: offline, a model cached without tokenizer.json (as mamba_ssm caches state-spaces' repositories): the missing tokenizer names GPT-NeoX's", async () => {
  await withHub(async (s, cacheDir) => {
    // What Python's mamba_ssm leaves in the cache: config.json and pytorch_model.bin, no word of tokenizer.json.
    const repo = repoCacheDir("org/ss", cacheDir);
    await Deno.mkdir(`${repo}/snapshots/${COMMIT}`, { recursive: true });
    await Deno.mkdir(`${repo}/refs`);
    await Deno.writeTextFile(`${repo}/refs/main`, COMMIT);
    const config = JSON.parse(await Deno.readTextFile(fixturePath("lm_v64_state_spaces/config.json")));
    await Deno.writeTextFile(
      `${repo}/snapshots/${COMMIT}/config.json`,
      JSON.stringify({ ...config, vocab_size: 50277 }),
    );
    await assert.rejects(
      () => fromPretrained("org/ss", { ...opts(s, cacheDir), localFilesOnly: true, requireTokenizer: true }),
      (e) => {
        assert.ok(e instanceof NoTokenizerError, String(e));
        assert.ok(e.reason.includes(`tokenizer.json (revision ${COMMIT}) is not in the cache`), e.reason);
        assert.match(e.reason, /vocab_size 50277 is GPT-NeoX's: .* EleutherAI\/gpt-neox-20b\)$/);
        return true;
      },
    );
  });
});

Deno.test("hub: no weights, or a config of another architecture: clear errors, no weights fetched", async () => {
  await withHub(async (s, cacheDir) => {
    const files = await lmFiles();
    s.addRepo("org/none", { "config.json": files["config.json"] });
    await assert.rejects(
      () => fromPretrained("org/none", opts(s, cacheDir)),
      /org\/none@main has none of model\.safetensors, model\.safetensors\.index\.json and pytorch_model\.bin/,
    );
    const llama = JSON.stringify({ model_type: "llama", hidden_size: 64, vocab_size: 100 });
    s.addRepo("org/llama", { "config.json": llama, "model.safetensors": files["model.safetensors"] });
    await assert.rejects(
      () => fromPretrained("org/llama", opts(s, cacheDir)),
      /org\/llama@main\/config\.json: model_type 'llama' is not a Mamba \(1\) model/,
    );
    assert.equal(s.count((r) => r.path.includes("org/llama") && r.path.endsWith(".safetensors")), 0);
  });
});

Deno.test("hub: the tokenizer comes from the repository or the tokenizer option; vocab sizes must agree", async () => {
  await withHub(async (s, cacheDir) => {
    const tok = await tokFiles();
    // A small random model with the tokenizer's 65000 ids.
    const tiny = new MambaLM({ dModel: 8, nLayers: 1, dState: 4 }, { vocabSize: 65000 });
    const dir = await Deno.makeTempDir();
    await saveCheckpoint(tiny, dir);
    tiny.dispose();
    const tinyFiles = {
      "config.json": await Deno.readFile(`${dir}/config.json`),
      "model.safetensors": await Deno.readFile(`${dir}/model.safetensors`),
    };
    s.addRepo("org/tiny", { ...tinyFiles, ...tok });
    s.addRepo("org/tiny-notok", tinyFiles);
    s.addRepo("org/tok", tok);
    s.addRepo("org/lm", { ...(await lmFiles()), ...tok });

    const lm = await fromPretrained("org/tiny", opts(s, cacheDir));
    assert.ok(lm.tokenizer instanceof HubTokenizer);
    assert.equal(lm.tokenizer.vocabSize, 65000);
    assert.equal(lm.tokenizer.specialTokens.eos, 0);
    const prompt = lm.tokenizer.encode("Hello World");
    const dec = new StreamDecoder(lm.tokenizer);
    let text = "";
    const [out] = await lm.generate([prompt], 6, {
      readEvery: 2,
      onTokens: (rows) => text += dec.push(rows[0]),
    });
    text += dec.flush();
    assert.equal(text, lm.tokenizer.decode(out));
    lm.dispose();

    // From another repository, a folder, a Tokenizer object; or none.
    for (const t of ["org/tok", fixturePath("hub"), new ByteTokenizer()]) {
      const m = await fromPretrained("org/tiny-notok", { ...opts(s, cacheDir), tokenizer: t });
      assert.equal(m.tokenizer?.vocabSize, typeof t === "string" ? 65000 : 256);
      m.dispose();
    }
    const none = await fromPretrained("org/tiny", { ...opts(s, cacheDir), tokenizer: false });
    assert.equal(none.tokenizer, null);
    assert.equal(none.noTokenizer, "loaded with tokenizer: false");
    const missing = await fromPretrained("org/tiny-notok", opts(s, cacheDir));
    assert.equal(missing.noTokenizer, "org/tiny-notok@main/tokenizer.json does not exist");
    missing.dispose();
    none.dispose();
    assert.equal((await loadTokenizer("org/tok", opts(s, cacheDir))).vocabSize, 65000);
    await assert.rejects(() => loadTokenizer("org/tiny-notok", opts(s, cacheDir)), /has no tokenizer\.json/);

    // 65000 token ids for a 64-token model.
    await assert.rejects(
      () => fromPretrained("org/lm", opts(s, cacheDir)),
      /org\/lm@main\/tokenizer\.json: the tokenizer has 65000 token ids but .*config\.json has vocab_size 64/,
    );
    await assert.rejects(
      () => fromPretrained(fixturePath("lm_v64_hf"), { tokenizer: fixturePath("hub") }),
      /hub\/tokenizer\.json: the tokenizer has 65000 token ids but .*vocab_size 64/,
    );
    // The char model folder has its char tokenizer.
    const char = await fromPretrained(fixturePath("char-mamba"));
    assert.ok(char.tokenizer instanceof ByteTokenizer);
    assert.ok(char.tokenizer.known?.has(97));
    char.dispose();
    await Deno.remove(dir, { recursive: true });
  });
});

Deno.test("hub: without network it fails fast, naming the URL and how to place the files by hand", async () => {
  await withHub(async (s, cacheDir) => {
    const files = await lmFiles();
    const copyAll =
      "copy the repository's files (config.json, model.safetensors (or pytorch_model.bin), tokenizer.json, " +
      "tokenizer_config.json)";
    // A port where nothing listens.
    const probe = Deno.listen({ hostname: "127.0.0.1", port: 0 });
    const dead = `http://127.0.0.1:${(probe.addr as Deno.NetAddr).port}`;
    probe.close();
    const t0 = performance.now();
    await assert.rejects(
      () => fromPretrained("org/lm", { endpoint: dead, cacheDir, progress: false }),
      (e: Error) => {
        assert.ok(e instanceof HubError && e.code === "Network", String(e));
        assert.match(e.message, new RegExp(`cannot reach ${dead}/org/lm/resolve/main/config\\.json`));
        assert.match(e.message, /models--org--lm\/snapshots\/<name>\/ and write <name> into .*refs\/main/);
        assert.ok(e.message.includes(copyAll), e.message);
        return true;
      },
    );
    assert.ok(performance.now() - t0 < 5000, "fails fast");
    // Offline by option or environment: only the cache. The message names the same files to copy.
    await assert.rejects(
      () => fromPretrained("org/lm", { ...opts(s, cacheDir), localFilesOnly: true }),
      (e: Error) => {
        assert.match(e.message, /config\.json \(revision main\) is not in the cache .* downloads are off/);
        assert.ok(e.message.includes(copyAll), e.message);
        return true;
      },
    );
    // A file that is none of a model's is named too.
    await assert.rejects(
      () => hubDownload("org/lm", "extra.bin", { ...opts(s, cacheDir), localFilesOnly: true }),
      (e: Error) => {
        assert.ok(e.message.includes(`files (${MODEL_FILES}, extra.bin)`), e.message);
        return true;
      },
    );
    Deno.env.set("HF_HUB_OFFLINE", "1");
    try {
      await assert.rejects(() => fromPretrained("org/lm", opts(s, cacheDir)), (e: Error) => {
        assert.match(e.message, /downloads are off \(localFilesOnly or HF_HUB_OFFLINE\)/);
        assert.ok(e.message.includes(copyAll), e.message);
        return true;
      });
      // Placed by hand as the message says: loads offline, with no tokenizer.
      const repo = repoCacheDir("org/lm", cacheDir);
      await Deno.mkdir(`${repo}/snapshots/manual`, { recursive: true });
      await Deno.mkdir(`${repo}/refs`, { recursive: true });
      await Deno.writeTextFile(`${repo}/refs/main`, "manual");
      await Deno.writeFile(`${repo}/snapshots/manual/config.json`, files["config.json"]);
      await assert.rejects(
        () => fromPretrained("org/lm", opts(s, cacheDir)),
        /model\.safetensors \(revision main\) is not in the cache/,
      );
      await Deno.writeFile(`${repo}/snapshots/manual/model.safetensors`, files["model.safetensors"]);
      const lm = await fromPretrained("org/lm", opts(s, cacheDir));
      await assertLmV64Logits(lm);
      assert.equal(lm.tokenizer, null);
      // ... and says why: not that the repository has none, but that the cache lacks it (deno task generate
      // prints this).
      assert.match(
        lm.noTokenizer!,
        /tokenizer\.json \(revision main\) is not in the cache .* downloads are off/,
      );
      lm.dispose();
    } finally {
      Deno.env.delete("HF_HUB_OFFLINE");
    }
    // The same without HF_HUB_OFFLINE and without network: the cached files load, the optional ones it lacks
    // count as absent (they failed with "cannot reach" before).
    const unreachable = await fromPretrained("org/lm", { ...opts(s, cacheDir), endpoint: dead, retries: 0 });
    await assertLmV64Logits(unreachable);
    assert.equal(unreachable.tokenizer, null);
    assert.match(unreachable.noTokenizer!, /cannot reach/);
    unreachable.dispose();
    assert.equal(s.count(), 0, "offline means no request");
  });
});

Deno.test("hub: offline with a model's first file cached, the by-hand help names its commit's snapshot folder", async () => {
  await withHub(async (s, cacheDir) => {
    const files = await lmFiles();
    s.addRepo("org/lm", files);
    // config.json downloaded (a download of the weights interrupted, say), then offline: the model's other
    // files are read at the commit config.json came from, which no refs/ file names.
    await hubDownload("org/lm", "config.json", opts(s, cacheDir));
    const repo = repoCacheDir("org/lm", cacheDir);
    await assert.rejects(
      () => fromPretrained("org/lm", { ...opts(s, cacheDir), localFilesOnly: true }),
      (e: Error) => {
        assert.match(
          e.message,
          new RegExp(`model\\.safetensors \\(revision ${COMMIT}\\) is not in the cache`),
        );
        assert.ok(e.message.includes(`put them into the cache as ${repo}/snapshots/${COMMIT}/ `), e.message);
        assert.ok(!e.message.includes(`refs/${COMMIT}`), e.message);
        return true;
      },
    );
    // Placed as it says: loads offline.
    await Deno.writeFile(`${repo}/snapshots/${COMMIT}/model.safetensors`, files["model.safetensors"]);
    const lm = await fromPretrained("org/lm", { ...opts(s, cacheDir), localFilesOnly: true });
    await assertLmV64Logits(lm);
    lm.dispose();
  });
});

Deno.test("hub: a model placed in the cache by hand (snapshots/<name>, refs/main = <name>) survives an online load: its files are read from it, a file it lacks is asked for at main, the ref stays", async () => {
  await withHub(async (s, cacheDir) => {
    s.addRepo("org/lm", await lmFiles());
    const repo = repoCacheDir("org/lm", cacheDir);
    await Deno.mkdir(`${repo}/snapshots/byhand`, { recursive: true });
    await Deno.mkdir(`${repo}/refs`);
    for (const f of ["config.json", "model.safetensors"]) {
      await Deno.copyFile(fixturePath(`lm_v64_hf/${f}`), `${repo}/snapshots/byhand/${f}`);
    }
    await Deno.writeTextFile(`${repo}/refs/main`, "byhand");
    const lm = await fromPretrained("org/lm", opts(s, cacheDir));
    await assertLmV64Logits(lm);
    assert.equal(lm.tokenizer, null);
    lm.dispose();
    assert.deepEqual(s.requests.map((r) => r.path).filter((p) => !p.includes("tokenizer")), []);
    assert.equal(await Deno.readTextFile(`${repo}/refs/main`), "byhand", "a download never replaces it");
    const offline = await fromPretrained("org/lm", { ...opts(s, cacheDir), localFilesOnly: true });
    await assertLmV64Logits(offline);
    offline.dispose();
  });
});

Deno.test("hub: a cached model loads when the hub errs (503, a portal's page, 401) as when it is unreachable; optional files count as absent", async () => {
  await withHub(async (s, cacheDir) => {
    s.addRepo("org/lm", await lmFiles());
    for (const f of ["config.json", "model.safetensors"]) await hubDownload("org/lm", f, opts(s, cacheDir));
    // as mamba_ssm caches a model: no tokenizer files and no .no_exist for them
    await Deno.remove(`${repoCacheDir("org/lm", cacheDir)}/.no_exist`, { recursive: true }).catch(() => {});
    for (
      const res of [
        () => new Response("down", { status: 503 }),
        () => new Response("<html>login</html>", { status: 200 }),
        () => new Response("no", { status: 401, headers: { "x-error-code": "RepoNotFound" } }),
      ]
    ) {
      s.override = res;
      const lm = await fromPretrained("org/lm", { ...opts(s, cacheDir), retries: 0 });
      assert.equal(lm.tokenizer, null);
      await assertLmV64Logits(lm);
      lm.dispose();
    }
  });
});

Deno.test("hub: a cached model's weights that fail to download (Corrupt) are an error, not a fallback to pytorch_model.bin", async () => {
  await withHub(async (s, cacheDir) => {
    const files = await lmFiles();
    s.addRepo("org/lm", {
      ...files,
      "pytorch_model.bin": await Deno.readFile(fixturePath("torch/lm_v64.bin")),
    });
    await hubDownload("org/lm", "config.json", opts(s, cacheDir));
    const bad = files["model.safetensors"].slice().fill(7, 100, 200); // the size announced, other bytes
    s.override = (req) =>
      req.method === "GET" && req.url.includes("model.safetensors")
        ? new Response(bad, { status: 200 })
        : null;
    await assert.rejects(
      () => fromPretrained("org/lm", { ...opts(s, cacheDir), retries: 0 }),
      (e: Error) => e instanceof HubError && e.code === "Corrupt",
    );
  });
});

// A hub over raw TCP whose answers have no Content-Length (HTTP/1.1 close-delimited bodies): each GET sends
// the bytes `body` gives for its count (the file cut short, or whole), then closes.
function closeDelimitedHub(data: Uint8Array, etag: string | null, cut: (n: number) => number) {
  const lis = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  (async () => {
    let gets = 0;
    for await (const c of lis) {
      (async () => {
        const buf = new Uint8Array(8192);
        const n = await c.read(buf);
        const head = new TextDecoder().decode(buf.subarray(0, n ?? 0)).startsWith("HEAD");
        const tag = etag ? `etag: "${etag}"\r\n` : "";
        await c.write(
          new TextEncoder().encode(
            `HTTP/1.1 200 OK\r\nx-repo-commit: ${COMMIT}\r\n${tag}connection: close\r\n\r\n`,
          ),
        );
        if (!head) await c.write(data.subarray(0, cut(gets++)));
        c.close();
      })().catch(() => {});
    }
  })().catch(() => {});
  return { url: `http://127.0.0.1:${(lis.addr as Deno.NetAddr).port}`, close: () => lis.close() };
}

Deno.test("hub: a body of unknown size cut off is never cached: a git sha1 ETag is checked, and without one nothing is finalized", async () => {
  const cacheDir = await Deno.makeTempDir({ prefix: "hub-cache-" });
  const data = new TextEncoder().encode(JSON.stringify({ d_model: 64, pad: "x".repeat(5000) }));
  const o = { cacheDir, progress: false, token: false as const, retries: 0 };
  const repo = repoCacheDir("org/lm", cacheDir);
  try {
    const sha1Hub = closeDelimitedHub(data, gitSha1(data), (n) => n === 0 ? data.length >> 1 : data.length);
    try {
      await assert.rejects(
        () => hubDownload("org/lm", "config.json", { ...o, endpoint: sha1Hub.url }),
        (e: Error) => e instanceof HubError && e.code === "Corrupt" && /git sha1/.test(e.message),
      );
      assert.deepEqual(await list(`${repo}/blobs`), []);
      assert.deepEqual(await list(`${repo}/snapshots`), []);
      const p = await hubDownload("org/lm", "config.json", { ...o, endpoint: sha1Hub.url });
      assert.deepEqual(await Deno.readFile(p!), data, "the whole body, its sha1 checked, is cached");
    } finally {
      sha1Hub.close();
    }
    // a mirror's ETag of its own (40 hex digits, neither sha1): with the size known, no proof of corruption
    const own = Deno.serve(
      { hostname: "127.0.0.1", port: 0, onListen: () => {} },
      (req) =>
        new Response(req.method === "HEAD" ? null : data, {
          headers: {
            "x-repo-commit": COMMIT,
            etag: `"${"ab".repeat(20)}"`,
            "content-length": String(data.length),
          },
        }),
    );
    try {
      const p = await hubDownload("org/lm", "own.json", {
        ...o,
        endpoint: `http://127.0.0.1:${own.addr.port}`,
      });
      assert.deepEqual(await Deno.readFile(p!), data, "cached, not deleted as corrupt");
    } finally {
      await own.shutdown();
    }
    // a mirror's ETag may be the content's plain sha1: it checks the body as well
    const plain = (await import("node:crypto")).createHash("sha1").update(data).digest("hex");
    const mirror = closeDelimitedHub(data, plain, () => data.length);
    try {
      const p = await hubDownload("org/lm", "mirror.json", { ...o, endpoint: mirror.url });
      assert.deepEqual(await Deno.readFile(p!), data);
    } finally {
      mirror.close();
    }
    const bare = closeDelimitedHub(data, null, () => data.length >> 1);
    try {
      await assert.rejects(
        () => hubDownload("org/lm", "other.json", { ...o, endpoint: bare.url }),
        (e: Error) =>
          e instanceof HubError && e.code === "Interrupted" && /nothing tells whether/.test(e.message),
      );
      const blobs = await list(`${repo}/blobs`);
      assert.equal(blobs.filter((b) => b.endsWith(".incomplete")).length, 1, blobs.join());
      assert.ok(!(await list(`${repo}/snapshots/${COMMIT}`)).includes("other.json"), "not in the snapshot");
    } finally {
      bare.close();
    }
  } finally {
    await Deno.remove(cacheDir, { recursive: true });
  }
});

Deno.test("hub: safetensors files whose dtypes the spec has but this project does not read (U32, F8_E4M3) are cached, not deleted", async () => {
  await withHub(async (s, cacheDir) => {
    const st = (dtype: string, nbytes: number) => {
      const hdr = new TextEncoder().encode(
        JSON.stringify({ w: { dtype, shape: [4], data_offsets: [0, nbytes] } }),
      );
      const out = new Uint8Array(8 + hdr.length + nbytes);
      new DataView(out.buffer).setBigUint64(0, BigInt(hdr.length), true);
      out.set(hdr, 8);
      return out;
    };
    s.addRepo("org/lm", { "u32.safetensors": st("U32", 16), "fp8.safetensors": st("F8_E4M3", 4) });
    for (const f of ["u32.safetensors", "fp8.safetensors"]) {
      const p = await hubDownload("org/lm", f, opts(s, cacheDir));
      assert.ok(p && await Deno.stat(p), f);
      const before = s.count();
      assert.equal(await hubDownload("org/lm", f, opts(s, cacheDir)), p);
      assert.equal(s.count(), before, `${f} is cached`);
    }
  });
});

Deno.test("hub: HEAD requests are retried on 429/5xx as downloads are, Retry-After honoured, within the retries option", async () => {
  await withHub(async (s, cacheDir) => {
    s.addRepo("org/lm", await lmFiles());
    const answers = [
      () => new Response("busy", { status: 503, headers: { "retry-after": "1" } }),
      () => new Response("slow down", { status: 429 }),
    ];
    const failTwice = () => {
      let n = 0;
      s.override = (req) => req.method === "HEAD" && n < 2 ? answers[n++]() : null;
    };
    failTwice();
    const t0 = performance.now();
    assert.ok(await hubDownload("org/lm", "config.json", opts(s, cacheDir)));
    assert.ok(performance.now() - t0 >= 950, "waited the Retry-After of 1 s");
    assert.equal(s.count((r) => r.method === "HEAD"), 3);
    failTwice();
    await assert.rejects(
      () => hubDownload("org/lm", "model.safetensors", { ...opts(s, cacheDir), retries: 1 }),
      (e: Error) => e instanceof HubError && e.code === "HTTP" && e.status === 429,
    );
  });
});

Deno.test("hub: a download that the storage refuses (5xx) or that cannot reach it says so, and says bytes are kept only when some are", async () => {
  await withHub(async (s, cacheDir) => {
    s.addRepo("org/lm", await lmFiles());
    const o = { ...opts(s, cacheDir), retries: 1 };
    s.override = (req) =>
      new URL(req.url).pathname.startsWith("/cdn/") ? new Response("x", { status: 503 }) : null;
    await assert.rejects(() => hubDownload("org/lm", "model.safetensors", o), (e: Error) => {
      assert.ok(e instanceof HubError && e.code === "HTTP" && e.status === 503, e.message);
      assert.match(
        e.message,
        /cannot download http:\/\/127\.0\.0\.1:\d+\/org\/lm\/resolve\/\w+\/model\.safetensors: HTTP 503/,
      );
      assert.doesNotMatch(e.message, /kept/);
      return true;
    });
    const probe = Deno.listen({ hostname: "127.0.0.1", port: 0 });
    const dead = `http://127.0.0.1:${(probe.addr as Deno.NetAddr).port}`;
    probe.close();
    s.override = (req) =>
      req.method === "GET" && new URL(req.url).pathname.includes("/resolve/")
        ? new Response(null, { status: 302, headers: { location: `${dead}/cdn/org/lm/model.safetensors` } })
        : null;
    await assert.rejects(() => hubDownload("org/lm", "model.safetensors", o), (e: Error) => {
      assert.ok(e instanceof HubError && e.code === "Network", e.message);
      assert.match(e.message, /cannot reach .* To work without network/);
      assert.doesNotMatch(e.message, /kept/);
      return true;
    });
  });
});

Deno.test("hub: HF_HUB_OFFLINE wins over localFilesOnly: false; an empty cacheDir, backslashes in names, and a bare 404 (no hub's headers) are refused", async () => {
  await withHub(async (s, cacheDir) => {
    s.addRepo("org/lm", await lmFiles());
    Deno.env.set("HF_HUB_OFFLINE", "1");
    try {
      await assert.rejects(
        () => hubDownload("org/lm", "config.json", { ...opts(s, cacheDir), localFilesOnly: false }),
        (e: Error) => e instanceof HubError && e.code === "NotCached",
      );
    } finally {
      Deno.env.delete("HF_HUB_OFFLINE");
    }
    assert.equal(s.count(), 0);
    await assert.rejects(
      () => hubDownload("org/lm", "config.json", { ...opts(s, cacheDir), cacheDir: "" }),
      /cacheDir is empty/,
    );
    await assert.rejects(
      () => hubDownload("org/lm", "..\\..\\x.json", opts(s, cacheDir)),
      /invalid file name/,
    );
    await assert.rejects(
      () => hubDownload("org/lm", "config.json", { ...opts(s, cacheDir), revision: "..\\..\\x" }),
      /invalid revision/,
    );
    assert.equal(s.count(), 0);
    s.override = () => new Response("no such page", { status: 404 });
    await assert.rejects(() => hubDownload("org/lm", "config.json", opts(s, cacheDir)), (e: Error) => {
      assert.ok(e instanceof HubError && e.code === "HTTP" && e.status === 404, e.message);
      assert.match(
        e.message,
        /cannot download http:\/\/127\.0\.0\.1:\d+\/org\/lm\/resolve\/main\/config\.json: HTTP 404/,
      );
      return true;
    });
    assert.deepEqual(await list(`${repoCacheDir("org/lm", cacheDir)}/.no_exist`), []);
  });
});

Deno.test("fromPretrained streams F16/BF16 tensors larger than one read chunk, converting exactly", async () => {
  await init();
  // 65000 x 40 = 2.6M elements: the embedding spans two 4 MiB chunks as BF16.
  const lm = new MambaLM({ dModel: 40, nLayers: 1, dState: 4 }, { vocabSize: 65000, tieEmbeddings: true });
  const dir = await Deno.makeTempDir();
  await saveCheckpoint(lm, dir);
  lm.dispose();
  const parsed = parseSafetensors(await Deno.readFile(`${dir}/model.safetensors`));
  for (const dtype of ["BF16", "F16"] as const) {
    const bytes = serializeSafetensors(
      Object.fromEntries([...parsed.tensors].map(([k, t]) => [k, { shape: t.shape, data: t.data, dtype }])),
    );
    await Deno.writeFile(`${dir}/model.safetensors`, bytes);
    const want = parseSafetensors(bytes).tensors; // whole-file decode, the reference
    const back = await fromPretrained(dir);
    assert.equal(back.tied, true);
    const got = back.stateDict();
    for (const [k, t] of want) {
      assert.equal(maxAbsDiff(await got.get(mapKey(k)!)!.toArray(), t.data), 0, `${dtype} ${k}`);
    }
    back.dispose();
  }
  await Deno.remove(dir, { recursive: true });
});

Deno.test("examples/generate.ts streams text from the char folder and from a hub-layout folder", async () => {
  await init();
  const { main } = await import("../examples/generate.ts");
  const run = async (...argv: string[]) => {
    let out = "";
    const pieces: string[] = [];
    const err: string[] = [];
    const code = await main(argv, {
      out: (t) => {
        out += t;
        pieces.push(t);
      },
      err: (l) => err.push(l),
    });
    return { code, out, pieces, err: err.join("\n") };
  };
  const prompt = "It is a truth universally acknowledged, that a single man";
  const char = fixturePath("char-mamba");
  /** 64 greedy tokens of the char model after `prompt`, with `extra` flags. */
  const greedy64 = (...extra: string[]) =>
    run("--model", char, "--prompt", prompt, "--greedy", "--tokens", "64", ...extra);
  const g = await greedy64("--read-every", "8");
  assert.equal(g.code, 0, g.err);
  // mamba.py's greedy continuation (tests/fixtures/char-mamba/sample.json), streamed in pieces.
  assert.equal(g.out, `${prompt}ner was not the more the consideration of the consideration of t\n`);
  assert.ok(g.pieces.length >= 8, `streamed in ${g.pieces.length} pieces`);
  // a seed drawn at random is said first, before the model loads: a run stopped part-way keeps it
  const drawn = await run("--model", char, "--tokens", "4");
  const seed = /^seed (\d+) \(--seed \1 samples this text again\)\n/.exec(drawn.err)?.[1];
  assert.ok(seed !== undefined, drawn.err);
  assert.equal((await run("--model", char, "--tokens", "4", "--seed", seed)).out, drawn.out);
  // a reader that goes away (deno task generate | head -c 3) stops it quietly, not with "error: Broken pipe"
  let writes = 0;
  const piped = await main(["--model", char, "--greedy", "--tokens", "64", "--read-every", "8"], {
    out: () => {
      if (++writes > 2) throw new Deno.errors.BrokenPipe("Broken pipe (os error 32)");
    },
    err: () => {},
  });
  assert.deepEqual([piped, writes], [0, 3], "stopped at the first write it could not make");
  assert.match(g.err, /64 tokens \(1 x 64, greedy\) in [\d.]+ s: [\d.]+ tokens\/s/);
  // --prefill-chunk: the prompt in forwards of 5 tokens, each from the state before; the same text
  const pc = await greedy64("--prefill-chunk", "5");
  assert.equal(pc.out, g.out, pc.err);
  assert.match(pc.err, /prompt 57 tokens \(run in chunks of 5\)/);
  assert.match(
    (await run("--model", char, "--prefill-chunk", "0")).err,
    /--prefill-chunk must be an integer >= 1/,
  );
  // The repetition penalty: the API's tokens (lm_test checks them against a full forward), another text.
  const rp = await greedy64("--repetition-penalty", "1.3");
  assert.equal(rp.code, 0, rp.err);
  const charLm = await fromPretrained(char);
  const want = await charLm.generate([charLm.tokenizer!.encode(prompt)], 64, { repetitionPenalty: 1.3 });
  assert.equal(rp.out, `${prompt}${charLm.tokenizer!.decode(want[0])}\n`);
  assert.notEqual(rp.out, g.out);
  assert.match(rp.err, /64 tokens \(1 x 64, greedy \(repetition penalty 1\.3\)\)/);
  // --dtype bf16: the weights rounded as they load, the API's tokens
  const bf = await run("--model", char, "--prompt", prompt, "--greedy", "--tokens", "32", "--dtype", "bf16");
  assert.equal(bf.code, 0, bf.err);
  const charBf = await fromPretrained(char, { weightDtype: "bf16" });
  const bfWant = await charBf.generate([charBf.tokenizer!.encode(prompt)], 32);
  charBf.dispose();
  assert.equal(bf.out, `${prompt}${charLm.tokenizer!.decode(bfWant[0])}\n`);
  assert.match(bf.err, /\(bf16 weights\)/);
  assert.match((await run("--model", char, "--dtype", "f16")).err, /--dtype must be f32 or bf16, got 'f16'/);
  // --min-p 1 keeps the most likely token alone: sampling gives the greedy text
  const mp = await run("--model", char, "--prompt", prompt, "--tokens", "64", "--min-p", "1", "--seed", "3");
  assert.equal(mp.out, g.out, mp.err);
  // several --prompt: one row each, of different lengths, each as it would continue alone
  const two = await run(
    "--model",
    char,
    "--prompt",
    "Elizabeth",
    "--prompt",
    "Mr. Darcy said",
    "--greedy",
    "--tokens",
    "20",
  );
  assert.equal(two.code, 0, two.err);
  const alone = await Promise.all(
    ["Elizabeth", "Mr. Darcy said"].map(async (p) =>
      p + charLm.tokenizer!.decode((await charLm.generate([charLm.tokenizer!.encode(p)], 20))[0])
    ),
  );
  assert.equal(two.out, `[1/2] ${alone[0]}\n[2/2] ${alone[1]}\n`);
  assert.match(two.err, /40 tokens \(2 x 20, greedy\)[^]*prompt 9 \/ 14 tokens/);
  assert.match(
    (await run("--model", char, "--prompt", "a", "--prompt", "b", "--batch", "2")).err,
    /--batch repeats one prompt: it does not combine with several --prompt/,
  );
  charLm.dispose();
  // Sampling: seeded runs repeat, on the GPU (top-k) and on the host (top-p); batches print every row.
  for (const extra of [["--top-k", "5"], ["--top-p", "0.9"], ["--min-p", "0.1"]]) {
    const args = [
      "--model",
      char,
      "--prompt",
      "It is",
      "--tokens",
      "20",
      "--seed",
      "7",
      "--batch",
      "2",
      ...extra,
    ];
    const a = await run(...args);
    const b = await run(...args);
    assert.equal(a.code, 0, a.err);
    assert.equal(a.out, b.out);
    assert.match(a.out, /^\[1\/2\] It is[^]*\n\[2\/2\] It is/);
    if (extra[0] === "--top-p") assert.match(a.err, /top-p 0\.9,/);
    if (extra[0] === "--min-p") assert.match(a.err, /min-p 0\.1,/);
  }
  // A hub-layout folder (config.json, model.safetensors, tokenizer.json, tokenizer_config.json).
  const dir = await Deno.makeTempDir();
  const tiny = new MambaLM({ dModel: 8, nLayers: 1, dState: 4 }, { vocabSize: 65000 });
  await saveCheckpoint(tiny, dir);
  tiny.dispose();
  for (const f of ["tokenizer.json", "tokenizer_config.json"]) {
    await Deno.copyFile(fixturePath(`hub/${f}`), `${dir}/${f}`);
  }
  const h = await run("--model", dir, "--prompt", "Hello 😀", "--tokens", "12", "--seed", "1");
  assert.equal(h.code, 0, h.err);
  assert.ok(h.out.startsWith("Hello 😀"));
  assert.match(h.err, /12 tokens/);
  const none = await run("--model", dir, "--tokens", "3", "--greedy"); // empty prompt: starts from BOS
  assert.equal(none.code, 0, none.err);
  // A model whose every logit is 0 takes id 0 greedily, the tokenizer's end of text: the row ends there and
  // decoding stops (it ran all 400 steps and counted them).
  const ends = new MambaLM({ dModel: 8, nLayers: 1, dState: 4 }, { vocabSize: 65000, tieEmbeddings: false });
  await saveCheckpoint(ends, dir, null);
  ends.dispose();
  const { tensors } = parseSafetensors(await Deno.readFile(`${dir}/model.safetensors`));
  const weights = Object.fromEntries([...tensors].map(([k, t]) => [k, { shape: t.shape, data: t.data }]));
  weights["lm_head.weight"].data = new Float32Array(65000 * 8);
  await Deno.writeFile(`${dir}/model.safetensors`, serializeSafetensors(weights));
  const eos = await run("--model", dir, "--prompt", "Hello", "--tokens", "400", "--greedy");
  assert.equal(eos.code, 0, eos.err);
  assert.equal(eos.out, "Hello\n");
  assert.match(eos.err, /^1 tokens \(1 x 400 at most: rows end at the end token, greedy\)/);
  assert.match((await run("--model", char, "--greedy", "--seed", "3")).err, /does not combine/);
  // No tokenizer with GPT-NeoX's vocabulary, as state-spaces' repositories (pytorch_model.bin and
  // config.json alone): the error says which tokenizer their models use.
  const neoxDir = await Deno.makeTempDir();
  manualSeed(5);
  const neox = new MambaLM({ dModel: 8, nLayers: 1, dState: 4 }, { vocabSize: 50277 });
  await saveCheckpoint(neox, neoxDir, null);
  neox.dispose();
  const noTok = await run("--model", neoxDir, "--tokens", "3");
  assert.equal(noTok.code, 2, noTok.err);
  assert.match(
    noTok.err,
    /no tokenizer \(.*tokenizer\.json does not exist \(vocab_size 50277 is GPT-NeoX's: .* EleutherAI\/gpt-neox-20b\)\): name one with --tokenizer/,
  );
  // A tokenizer with fewer ids than the model: an id past them is said on its own line, with the sizes.
  // (The model's random weights are seeded: its greedy first token is past 255.)
  let streamed = "";
  await assert.rejects(
    () =>
      main(["--model", neoxDir, "--tokenizer", char, "--prompt", "Hi", "--tokens", "3", "--greedy"], {
        out: (t) => streamed += t,
        err: () => {},
      }),
    /id \d+ is not a byte \(0\.\.255\) \(the tokenizer has 256 ids, the model 50277: a tokenizer of another model\?\)/,
  );
  assert.equal(streamed, "Hi\n");
  await Deno.remove(neoxDir, { recursive: true });
  const noPrompt = await run("--model", char, "--tokens", "5", "--greedy"); // a char model starts from "\n"
  assert.equal(noPrompt.code, 0, noPrompt.err);
  await Deno.remove(dir, { recursive: true });
  // Usage.
  assert.match((await run("--help")).out, /^Usage: deno task generate --model/);
  const bad = await run("--model", char, "--bogus");
  assert.equal(bad.code, 2);
  assert.match(bad.err, /Unknown option '--bogus'[^]*--help/);
  assert.equal((await run("--prompt", "x")).code, 2);
  assert.match((await run("--model", char, "--top-p", "2")).err, /--top-p must be a number in \(0, 1\]/);
  assert.match(
    (await run("--model", char, "--repetition-penalty", "0")).err,
    /--repetition-penalty must be a number > 0, got '0'/,
  );
  assert.match((await run("--model", char, "--greedy", "--top-k", "3")).err, /does not combine/);
  assert.match((await run("--model", char, "--greedy", "--min-p", "0.1")).err, /does not combine/);
  assert.match(
    (await run("--model", char, "--min-p", "2")).err,
    /--min-p must be a number in \[0, 1\], got '2'/,
  );
  // out-of-range integers: refused as flags, before the model loads
  const tooBig: [string, string, string][] = [
    ["--seed", "99999999999999999999", `from 0 to ${Number.MAX_SAFE_INTEGER}`],
    ["--top-k", "99999999999", `from 0 to ${2 ** 32 - 1}`],
  ];
  for (const [flag, v, max] of tooBig) {
    const r = await run("--model", char, flag, v);
    assert.equal(r.code, 2, r.err);
    assert.equal(r.out, "", "nothing generated");
    assert.match(r.err, new RegExp(`${flag} must be an integer ${max}, got '${v}'`));
  }
  await assert.rejects(
    () => run("--model", char, "--prompt", "naïve"),
    /this tokenizer does not know \(the model never saw them\): "ï"/,
  );
});
