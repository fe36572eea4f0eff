/**
 * The browser build: `mod.ts` bundled into one ES module, `out/web/mamba.js` (minified, with a linked source
 * map), checked against a size budget, and the demo page's script, `out/web/app.js`.
 *
 * ```sh
 * deno task build:web        # deno run --allow-read --allow-write --allow-env --allow-run examples/web/build.ts
 * ```
 * Both are made by `deno bundle --platform browser` (esbuild). Pages import the library with
 * `import { init, fromPretrained } from "./mamba.js"`.
 * @module
 */

/** Budget for the minified library bundle, in bytes (the build fails above it). */
export const LIBRARY_BUDGET_BYTES = 256 * 1024;
/** Budget for the gzip-compressed library bundle, in bytes (raised from 80 KiB when input validation with
 * messages naming keys, shapes and offsets took the bundle to 81 KiB). */
export const LIBRARY_BUDGET_GZIP_BYTES = 88 * 1024;

const ROOT = new URL("../../", import.meta.url);
/** Where the build writes: `<repo>/out/web/`. */
export const OUT_DIR: string = new URL("out/web/", ROOT).pathname;

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
  /** `mod.ts` as one ES module. */
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

async function bundle(entry: string, out: string, extra: string[]): Promise<BundleInfo> {
  const args = ["bundle", "--quiet", "--platform", "browser", "--format", "esm", ...extra, "-o", out, entry];
  const r = await new Deno.Command(Deno.execPath(), {
    args,
    cwd: new URL(".", ROOT).pathname,
    stdout: "piped",
    stderr: "piped",
  })
    .output();
  if (!r.success) {
    const msg = new TextDecoder().decode(r.stderr) + new TextDecoder().decode(r.stdout);
    throw new Error(`deno ${args.join(" ")} failed:\n${msg}`);
  }
  const bytes = await Deno.readFile(out);
  return { path: out, bytes: bytes.length, gzipBytes: await gzipSize(bytes) };
}

/**
 * Bundles the library (`mod.ts` -> `out/web/mamba.js`, minified) and the demo (`examples/web/app.ts` ->
 * `out/web/app.js`); throws when the library is over its budget.
 */
export async function buildWeb(outDir: string = OUT_DIR): Promise<WebBuild> {
  const t0 = performance.now();
  await Deno.mkdir(outDir, { recursive: true });
  const dir = outDir.replace(/\/+$/, "");
  const [library, app] = await Promise.all([
    bundle("mod.ts", `${dir}/mamba.js`, ["--minify", "--sourcemap", "linked"]),
    bundle("examples/web/app.ts", `${dir}/app.js`, ["--minify", "--sourcemap", "linked"]),
  ]);
  if (library.bytes > LIBRARY_BUDGET_BYTES || library.gzipBytes > LIBRARY_BUDGET_GZIP_BYTES) {
    throw new Error(
      `${library.path} is ${kb(library.bytes)} (${kb(library.gzipBytes)} gzipped), over the budget of ` +
        `${kb(LIBRARY_BUDGET_BYTES)} (${kb(LIBRARY_BUDGET_GZIP_BYTES)} gzipped)`,
    );
  }
  return { library, app, ms: performance.now() - t0 };
}

/** Bytes as KiB with one decimal. */
export const kb = (n: number): string => `${(n / 1024).toFixed(1)} KiB`;

if (import.meta.main) {
  const b = await buildWeb();
  const rel = (p: string) => p.replace(new URL(".", ROOT).pathname, "");
  console.log(
    `${rel(b.library.path)}  ${kb(b.library.bytes)} minified, ${kb(b.library.gzipBytes)} gzipped ` +
      `(budget ${kb(LIBRARY_BUDGET_BYTES)}, ${kb(LIBRARY_BUDGET_GZIP_BYTES)} gzipped)`,
  );
  console.log(`${rel(b.app.path)}  ${kb(b.app.bytes)} minified, ${kb(b.app.gzipBytes)} gzipped (demo page)`);
  console.log(`built in ${(b.ms / 1000).toFixed(1)} s`);
}
