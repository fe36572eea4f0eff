/**
 * The browser build: the library (both entries, `mod.ts` and `advanced.ts`, through `examples/web/library.ts`)
 * bundled into one ES module, `out/web/mamba.js` (minified, with a linked source map), checked against a
 * size budget, and the demo page's script, `out/web/app.js`.
 *
 * ```sh
 * deno task build:web        # deno run --allow-read --allow-write --allow-run examples/web/build.ts
 * ```
 * Both are made by `deno bundle --platform browser` (esbuild). Pages import the library with
 * `import { init, fromPretrained } from "./mamba.js"`. Each bundle is written under a temporary name beside
 * its final one and renamed into place (its source map first) only after the budget check, so a bundle over
 * the budget or a failed build leaves the previous files, and builds running at once (the browser test,
 * `deno task web`) never see each other's half-written files.
 * @module
 */

import { basename, join } from "node:path";
import { fileURLToPath } from "node:url";
import { simpleCommandLine } from "../lib/cli.ts";

/** Budget for the minified library bundle, in bytes (the build fails above it; raised from 256 KiB when
 * matmulAdd, the chunk-parallel kernels' folded carries and the fused tuner's second measurements took it to
 * 256.0 KiB minified, 91.0 KiB gzipped, 2026-11-30; from 260 KiB when a review's fixes, among them softmax's
 * path for rows past the loop limit, state-dict and creation checks and loop-limit checks, took it to 260.4
 * KiB, 92.6 KiB gzipped, the same day; from 264 KiB when the GPU's split of matmuls over K and the tuner's
 * timing of it took it to 263.9 KiB, 94.0 KiB gzipped, 2026-11-30; from 268 KiB when the scan and out_proj
 * as one op (`fusedMambaScanOut`) and the checkpoint's replay took it to 268.5 KiB, 95.8 KiB gzipped,
 * 2026-11-30; from 272 KiB when the matvec kernel, `recompute: "input"` and dt_proj inside the decoding step at
 * every rank took it to 272.2 KiB, 97.2 KiB gzipped, the same day; 272.6 KiB, 97.4 KiB gzipped with the tuner's matvec choice; from 276 KiB
 * when the fused backward's parameter sums by a reduction pass and the chains in runs, both for GPUs, took it
 * to 275.1 KiB, 98.1 KiB gzipped, the same day; 276.0 KiB, 98.5 KiB gzipped with decoding's norm inside the
 * matvec kernel; from 280 KiB when the fused forward's walks of Lf steps and its inference path that writes
 * the last state only took it to 280.2 KiB, 100.2 KiB gzipped, 2026-11-30, of which the WGSL templates'
 * comments and indentation are about 9 KiB minified; from 284 KiB when a review's input checks and fixes and
 * the `tiled128` matmul took it to 286.4 KiB, 102.3 KiB gzipped, the same day; from 290 KiB when a second
 * review's (stop tokens, sampling checks) took it to 289.6 KiB, 103.6 KiB gzipped; from 296 KiB when loading
 * `pytorch_model.bin` (the restricted unpickler, the zip reader, the views' streaming) took it to 304.1 KiB,
 * 108.5 KiB gzipped, 2026-12-01; 307.7 KiB, 110.0 KiB gzipped with its reviews' fixes and requireTokenizer; from 310 KiB when muP took it to
 * 309.3 KiB, 110.6 KiB gzipped, the same day; from 316 KiB when generation's repetition penalty, min-p and
 * prompts of different lengths, perplexity and bf16 weights took it to 319.8 KiB, 114.3 KiB gzipped, the next
 * stop; from 324 KiB when going on from a cache (the scan's initial state, `MambaLM.prefill`, generate's
 * `from` and `prefillChunk`, perplexity's `carryState`) and its review's checks took it to 324.1 KiB, 115.8
 * KiB gzipped, 2026-12-01; from 328 KiB when training from a carried state (the conv's prefix, the scan's
 * backward from h0, `forwardFrom`, the Trainer's `carryState` and `windowsInOrder`) took it to 329.7 KiB, 117.6
 * KiB gzipped, the same day; from 332 KiB when four reviews' fixes (hostile files, data fingerprints on resume,
 * option keys, bounded text files) and hub tokens took it to 333.3 KiB, 119.1 KiB gzipped, 2026-12-02; from
 * 336 KiB when four reviews' checks and fixes (optimizer groups and states, tensor-API misuse, config.json
 * bounds, logs read back during a save) took it to 338.3 KiB, 120.8 KiB gzipped, the next stop; from 340 KiB
 * when seven reviews' fixes (streamed text as a whole decode gives it, torch archives, hub downloads, memory
 * on error paths, config.json nulls) took it to 345.8 KiB, 123.2 KiB gzipped, 2026-12-02; from 348 KiB when
 * three more (checkpoints saved as a set with a save id, safetensors laid out as the Rust crate does, device
 * loss while idle) took it to 348.5 KiB, 124.3 KiB gzipped, the same day; 348.9 KiB, 124.7 KiB gzipped at the stop's end;
 * 350.1 KiB, 125.3 KiB gzipped once a page's hub source read the hub's 404s and saves kept a tokenizer digest;
 * from 352 KiB when the tuners' interleaved rounds and confidence (a choice measured on a busy machine no
 * longer sticks) took it to 353.4 KiB, 126.7 KiB gzipped, the same day; 353.9 KiB, 127.0 KiB gzipped with the exact top-p
 * search and the sampling options' checks). */
export const LIBRARY_BUDGET_BYTES = 356 * 1024;
/** Budget for the gzip-compressed library bundle, in bytes (raised from 80 KiB when input validation with
 * messages naming keys, shapes and offsets took the bundle to 81 KiB; 236 KiB minified, 84 KiB gzipped at
 * commit e71a001; from 88 KiB when the fused scan's chunk-parallel variant, for GPUs, took it to 248.6 KiB
 * minified, 88.1 KiB gzipped, 2026-11-29; from 92 and 94 KiB with the minified budget, above; from 96 KiB when
 * `fusedMambaScanOut` above the inline dt rank and its binding-window count took it to 269.0 KiB minified,
 * 96.0 KiB gzipped, 2026-11-30; from 98, 100, 102, 104, 106, 112 and 114 KiB with the minified budget,
 * above; from 117, 119, 121, 123, 125 and 127 KiB with the minified budget, above). */
export const LIBRARY_BUDGET_GZIP_BYTES = 129 * 1024;

/** The repository's root folder (a file path: spaces and non-ASCII names stay as they are). */
const ROOT: string = fileURLToPath(new URL("../../", import.meta.url));
/** Where the build writes: `<repo>/out/web/`. */
export const OUT_DIR: string = join(ROOT, "out", "web");

/** One bundle's file and sizes. */
export interface BundleInfo {
  /** Absolute path of the bundle. */
  path: string;
  /** Size in bytes. */
  bytes: number;
  /** Size after gzip, in bytes. */
  gzipBytes: number;
}

/** What {@linkcode buildWeb} made. */
export interface WebBuild {
  /** The library (both entries) as one ES module. */
  library: BundleInfo;
  /** The demo page's script. */
  app: BundleInfo;
  /** Milliseconds the build took. */
  ms: number;
}

async function gzipSize(bytes: Uint8Array<ArrayBuffer>): Promise<number> {
  const stream = new Blob([bytes]).stream().pipeThrough(new CompressionStream("gzip"));
  return (await new Response(stream).arrayBuffer()).byteLength;
}

/** A bundle written under a temporary name: `install` renames it (and its source map) into place. */
interface Staged {
  info: BundleInfo;
  install(): Promise<void>;
  discard(): Promise<void>;
}

/**
 * A minified bundle without the comment lines of its WGSL sources (about 6 KiB): minified JavaScript keeps
 * no comments of its own, so a line that starts with `//` lies inside a template literal, a kernel's source.
 * Each such line is emptied, its newline kept so that the source map's lines still match; lines holding a
 * `${...}` (a comment whose expression may add code) or an unescaped backtick (the template ends there) and
 * the `//#` source-map link are left alone.
 */
export function stripKernelComments(js: string): string {
  // a line holding an unescaped backtick ends its template literal there: code may follow it
  const keep = (line: string) => line.includes("${") || /(^|[^\\])`/.test(line);
  return js.replace(/^[ \t]*\/\/(?!#)[^\n]*$/gm, (line) => (keep(line) ? line : ""));
}

async function bundle(entry: string, out: string, extra: string[]): Promise<Staged> {
  const tmp = `${out.replace(/\.js$/, "")}.tmp-${crypto.randomUUID().slice(0, 8)}.js`;
  const files = [tmp, `${tmp}.map`];
  const discard = async () => {
    for (const f of files) await Deno.remove(f).catch(() => {});
  };
  try {
    const args = [
      "bundle",
      "--quiet",
      "--platform",
      "browser",
      "--format",
      "esm",
      ...extra,
      "-o",
      tmp,
      entry,
    ];
    const r = await new Deno.Command(Deno.execPath(), { args, cwd: ROOT, stdout: "piped", stderr: "piped" })
      .output();
    if (!r.success) {
      const msg = new TextDecoder().decode(r.stderr) + new TextDecoder().decode(r.stdout);
      throw new Error(`deno ${args.join(" ")} failed:\n${msg}`);
    }
    // The linked source map is named after the file esbuild wrote; point it at the final name. The map's
    // sources are relative to the folder, which the temporary file shares with the final one.
    let js = await Deno.readTextFile(tmp);
    const link = `//# sourceMappingURL=${basename(tmp)}.map`;
    const hasMap = js.includes(link);
    if (hasMap) js = js.replace(link, `//# sourceMappingURL=${basename(out)}.map`);
    if (extra.includes("--minify")) js = stripKernelComments(js);
    // A static import of a Node built-in (a Deno-only module reached even by a dynamic import is bundled in,
    // its imports hoisted) fails the whole module in a browser: "Failed to fetch dynamically imported module"
    const nodeImport = /(?:\bfrom|\bimport)\s*"(node:[\w/]+)"/.exec(js);
    if (nodeImport) {
      throw new Error(
        `${entry}'s bundle imports ${
          nodeImport[1]
        } statically, which no browser has: import it dynamically ` +
          "where it is used (as hub_cache.ts does node:crypto), or do without it",
      );
    }
    await Deno.writeTextFile(tmp, js);
    const bytes = new TextEncoder().encode(js);
    return {
      info: { path: out, bytes: bytes.length, gzipBytes: await gzipSize(bytes) },
      async install() {
        if (hasMap) await Deno.rename(`${tmp}.map`, `${out}.map`);
        await Deno.rename(tmp, out);
      },
      discard,
    };
  } catch (e) {
    await discard();
    throw e;
  }
}

/**
 * Bundles the library (`examples/web/library.ts` -> `out/web/mamba.js`, minified) and the demo (`examples/web/app.ts` ->
 * `out/web/app.js`); throws when the library is over its budget, and then leaves the files it would have
 * replaced as they were.
 */
export async function buildWeb(outDir: string = OUT_DIR): Promise<WebBuild> {
  const t0 = performance.now();
  await Deno.mkdir(outDir, { recursive: true });
  const dir = outDir.replace(/\/+$/, "");
  const staged = await Promise.allSettled([
    bundle("examples/web/library.ts", `${dir}/mamba.js`, ["--minify", "--sourcemap", "linked"]),
    bundle("examples/web/app.ts", `${dir}/app.js`, ["--minify", "--sourcemap", "linked"]),
  ]);
  const ok = staged.flatMap((s) => (s.status === "fulfilled" ? [s.value] : []));
  try {
    for (const s of staged) if (s.status === "rejected") throw s.reason;
    const [library, app] = ok.map((s) => s.info);
    if (library.bytes > LIBRARY_BUDGET_BYTES || library.gzipBytes > LIBRARY_BUDGET_GZIP_BYTES) {
      throw new Error(
        `${library.path} would be ${kb(library.bytes)} (${kb(library.gzipBytes)} gzipped), over the budget ` +
          `of ${kb(LIBRARY_BUDGET_BYTES)} (${kb(LIBRARY_BUDGET_GZIP_BYTES)} gzipped); out/web is unchanged`,
      );
    }
    for (const s of ok) await s.install();
    return { library, app, ms: performance.now() - t0 };
  } finally {
    for (const s of ok) await s.discard(); // nothing left after install
  }
}

/** Bytes as KiB with one decimal. */
export const kb = (n: number): string => `${(n / 1024).toFixed(1)} KiB`;

const USAGE = `Usage: deno task build:web

Bundles the library (mod.ts and advanced.ts) into out/web/mamba.js (minified, checked against the size budget) and the demo page's
script into out/web/app.js.

  --help    this text`;

if (import.meta.main) {
  simpleCommandLine(USAGE);
  let b: WebBuild;
  try {
    b = await buildWeb();
  } catch (e) {
    console.error(`error: ${(e as Error).message}`);
    Deno.exit(1);
  }
  const rel = (p: string) => (p.startsWith(ROOT) ? p.slice(ROOT.length) : p);
  console.log(
    `${rel(b.library.path)}  ${kb(b.library.bytes)} minified, ${kb(b.library.gzipBytes)} gzipped ` +
      `(budget ${kb(LIBRARY_BUDGET_BYTES)}, ${kb(LIBRARY_BUDGET_GZIP_BYTES)} gzipped)`,
  );
  console.log(`${rel(b.app.path)}  ${kb(b.app.bytes)} minified, ${kb(b.app.gzipBytes)} gzipped (demo page)`);
  console.log(`built in ${(b.ms / 1000).toFixed(1)} s`);
}
