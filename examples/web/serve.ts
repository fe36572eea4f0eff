/**
 * Serves the demo page on 127.0.0.1 (or localhost) after building it, and prints the URL.
 *
 * ```sh
 * deno task web                    # http://127.0.0.1:8000/
 * deno task web --port 9000
 * deno task web --host localhost   # http://localhost:8000/
 * ```
 * Routes: `/` the page, `/app.js` and `/mamba.js` (+ source maps) from `out/web/`, `/data/` the bundled
 * text (`data/`), `/models/char-mamba/` the PyTorch-trained char model (tests/fixtures/char-mamba),
 * `/models/runs-demo/` and `/models/runs-char/` the char models of `deno task demo` (runs/demo) and
 * `deno task train` (runs/char), `/models.json` the list of the local models that exist. WebGPU needs a secure context: 127.0.0.1 and localhost are one.
 * @module
 */

import { fileURLToPath } from "node:url";
import { parseArgs } from "node:util";
import { intFlag, parseCommandLine } from "../lib/cli.ts";
import { buildWeb, kb } from "./build.ts";

/** The repository's root folder, without a trailing separator (a file path: spaces and non-ASCII names
 * stay as they are). */
const ROOT = fileURLToPath(new URL("../../", import.meta.url)).replace(/[\\/]$/, "");

/** A local model the page can load (a folder served under `/models/<name>/`). */
export interface LocalModel {
  /** URL path segment. */
  name: string;
  /** What it is, for the page's menu. */
  label: string;
  /** Folder on disk. */
  dir: string;
}

/** The char models: the PyTorch-trained fixture, and the runs of `deno task train` and `deno task demo`
 * (`/models.json` lists those whose folder holds a config.json). */
export function localModels(root: string = ROOT): LocalModel[] {
  return [
    {
      name: "char-mamba",
      label: "char model trained by mamba.py (tests/fixtures/char-mamba)",
      dir: `${root}/tests/fixtures/char-mamba`,
    },
    { name: "runs-demo", label: "char model of `deno task demo` (runs/demo)", dir: `${root}/runs/demo` },
    { name: "runs-char", label: "char model of `deno task train` (runs/char)", dir: `${root}/runs/char` },
  ];
}

/** Options of {@linkcode webHandler}. */
export interface WebOptions {
  /** Folder holding the built `app.js` and `mamba.js` (default `<repo>/out/web`). */
  outDir?: string;
  /** Also serve `tests/fixtures/` under `/fixtures/` (the browser tests use it). */
  fixtures?: boolean;
  /** Host names requests may name besides the loopback ones (the address given with --host). */
  hosts?: string[];
}

const TYPES: Record<string, string> = {
  html: "text/html; charset=utf-8",
  js: "text/javascript; charset=utf-8",
  map: "application/json",
  json: "application/json",
  txt: "text/plain; charset=utf-8",
  png: "image/png",
  svg: "image/svg+xml",
  css: "text/css",
};

async function exists(path: string): Promise<boolean> {
  try {
    return (await Deno.stat(path)).isFile;
  } catch {
    return false;
  }
}

async function sendFile(path: string, method: string): Promise<Response> {
  let file: Deno.FsFile;
  try {
    file = await Deno.open(path, { read: true });
  } catch {
    return new Response("not found\n", { status: 404 });
  }
  const { size, isFile } = await file.stat();
  if (!isFile) {
    file.close();
    return new Response("not found\n", { status: 404 });
  }
  const ext = path.slice(path.lastIndexOf(".") + 1);
  // No compression: the loader checks Content-Length against the safetensors header.
  const headers = {
    "content-type": TYPES[ext] ?? "application/octet-stream",
    "content-length": String(size),
    "cache-control": "no-cache",
  };
  if (method === "HEAD") {
    file.close();
    return new Response(null, { headers });
  }
  return new Response(file.readable, { headers });
}

/** The names a request's Host header may give: the loopback addresses the server listens on. */
const LOCAL_HOSTS = new Set(["127.0.0.1", "localhost", "[::1]"]);

/** The host name of a Host header ("127.0.0.1:8000" -> "127.0.0.1"), or "" where there is none. */
function hostOf(header: string | null): string {
  try {
    return header ? new URL(`http://${header}`).hostname : "";
  } catch {
    return "";
  }
}

/** The request handler: the page, the bundles, the text and the local models. */
export function webHandler(options: WebOptions = {}): (req: Request) => Promise<Response> {
  const out = (options.outDir ?? `${ROOT}/out/web`).replace(/\/+$/, "");
  const models = localModels();
  const allowed = new Set(
    (options.hosts ?? []).map((h) => hostOf(h.includes(":") && !h.startsWith("[") ? `[${h}]` : h)),
  );
  const routes: [string, string][] = [
    ["/data/", `${ROOT}/data/`],
    ...models.map((m): [string, string] => [`/models/${m.name}/`, `${m.dir}/`]),
    ...(options.fixtures ? [["/fixtures/", `${ROOT}/tests/fixtures/`] as [string, string]] : []),
  ];
  return async (req) => {
    if (req.method !== "GET" && req.method !== "HEAD") {
      return new Response("method not allowed\n", { status: 405 });
    }
    // Only this machine's names: a page elsewhere that rebinds its own name to 127.0.0.1 (DNS rebinding)
    // sends its name as the Host, and is refused (the address given with --host is allowed too).
    const host = hostOf(req.headers.get("host"));
    if (!LOCAL_HOSTS.has(host) && !allowed.has(host)) {
      return new Response("forbidden host\n", { status: 403 });
    }
    let path: string;
    try {
      path = decodeURIComponent(new URL(req.url).pathname);
    } catch {
      return new Response("bad path\n", { status: 400 }); // a malformed escape such as %E0%A4%A
    }
    // ".." as a part, and backslashes and NULs anywhere (Windows reads "..\" as the parent: %5c decodes to it)
    if (path.split("/").some((p) => p === "..") || /[\\\0]/.test(path)) {
      return new Response("bad path\n", { status: 400 });
    }
    if (path === "/" || path === "/index.html") {
      return await sendFile(`${ROOT}/examples/web/index.html`, req.method);
    }
    if (/^\/(app|mamba)\.js(\.map)?$/.test(path)) return await sendFile(`${out}${path}`, req.method);
    if (path === "/models.json") {
      const list = [];
      for (const m of models) {
        if (await exists(`${m.dir}/config.json`)) {
          list.push({ name: m.name, label: m.label, url: `models/${m.name}/` });
        }
      }
      return Response.json(list, { headers: { "cache-control": "no-cache" } });
    }
    for (const [prefix, dir] of routes) {
      if (path.startsWith(prefix) && path.length > prefix.length) {
        return await sendFile(dir + path.slice(prefix.length), req.method);
      }
    }
    return new Response("not found\n", { status: 404 });
  };
}

const USAGE = `Usage: deno task web [options]

Builds the demo page (out/web) and serves it, the text and the local char models.

  --port <n>     port, 0 for any free one (default 8000)
  --host <name>  address to listen on: 127.0.0.1 (default) or localhost. WebGPU needs a secure
                 context, which these are; the task's --allow-net names only them (another
                 address: deno run --allow-read --allow-write --allow-env --allow-run --allow-net
                 examples/web/serve.ts --host <name>)
  --help         this text`;

if (import.meta.main) {
  const { values, port } = parseCommandLine(USAGE, () => {
    const r = parseArgs({
      args: Deno.args,
      strict: true,
      options: {
        port: { type: "string", default: "8000" },
        host: { type: "string", default: "127.0.0.1" },
        help: { type: "boolean" },
      },
    });
    return { ...r, port: intFlag("port", r.values.port, 8000, 0, 65535) };
  });
  // Asked before the build: the task grants 127.0.0.1 and localhost; another address is refused here (or
  // asked for, in a terminal), not after the build by Deno.serve.
  let net: string;
  try {
    const host = values.host.includes(":") ? `[${values.host}]` : values.host; // IPv6
    net = Deno.permissions.requestSync({ name: "net", host }).state;
  } catch (e) {
    net = (e as Error).message;
  }
  if (net !== "granted") {
    console.error(
      `error: no permission to listen on ${values.host} (${net}); deno task web listens on 127.0.0.1 or ` +
        "localhost (see --help for another address)",
    );
    Deno.exit(1);
  }
  let b;
  try {
    b = await buildWeb();
  } catch (e) {
    console.error(`error: ${(e as Error).message}`);
    Deno.exit(1);
  }
  console.log(`built out/web/mamba.js (${kb(b.library.bytes)}) and out/web/app.js (${kb(b.app.bytes)})`);
  try {
    Deno.serve({
      hostname: values.host,
      port,
      // localhost as asked, not the address it resolved to; an IPv6 address in brackets
      onListen: ({ hostname, port }) => {
        const host = values.host === "localhost"
          ? values.host
          : hostname.includes(":")
          ? `[${hostname}]`
          : hostname;
        console.log(`mamba.ts demo: http://${host}:${port}/`);
      },
    }, webHandler({ hosts: [values.host] }));
  } catch (e) {
    const busy = e instanceof Deno.errors.AddrInUse
      ? ": the port is taken (another server?): pick one with --port"
      : "";
    console.error(`error: cannot listen on ${values.host}:${port} (${(e as Error).message})${busy}`);
    Deno.exit(1);
  }
}
