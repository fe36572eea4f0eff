/**
 * Makes the README's screenshot of the demo page (examples/web/screenshot.png): headless Chromium, the char
 * model trained by mamba.py, a sampled continuation.
 *
 * ```sh
 * deno run -A examples/web/screenshot.ts [out.png]
 * ```
 * @module
 */

import { fileURLToPath } from "node:url";
import { simpleCommandLine } from "../lib/cli.ts";
import { buildWeb } from "./build.ts";
import { launchChromium } from "./chromium.ts";
import { webHandler } from "./serve.ts";
import { writeFileAtomic } from "../../core/safetensors_fs.ts";

const USAGE = `Usage: deno run -A examples/web/screenshot.ts [out.png]

Builds the demo page, opens it in headless Chromium, loads the char model, generates and saves a
screenshot (default examples/web/screenshot.png).

  --help    this text`;

const out = simpleCommandLine(USAGE, [], "output file").positional ??
  fileURLToPath(new URL("./screenshot.png", import.meta.url));
await buildWeb();
const server = Deno.serve({ hostname: "127.0.0.1", port: 0, onListen() {} }, webHandler());
const browser = await launchChromium();
try {
  const page = await browser.newPage({ viewport: { width: 1000, height: 720 } });
  await page.goto(`http://127.0.0.1:${server.addr.port}/`);
  // A fresh browser profile tunes the kernels on the first load (SwiftShader: over 30 s on 2 cores).
  await page.waitForFunction(
    () => (globalThis as { mambaDemo?: { ready: boolean } }).mambaDemo?.ready,
    null,
    { timeout: 300_000 },
  );
  await page.selectOption("#model-source", "local:models/char-mamba/");
  await page.click("#load");
  await page.waitForFunction(() =>
    !!(globalThis as { mambaDemo?: { model: string | null } }).mambaDemo?.model
  );
  await page.fill("#prompt", "Elizabeth could not help");
  await page.fill("#n-tokens", "300");
  await page.click("#generate");
  await page.waitForFunction(
    () => (globalThis as { mambaDemo?: { lastGeneration: unknown } }).mambaDemo?.lastGeneration,
    null,
    { timeout: 60_000 },
  );
  await writeFileAtomic(out, await page.screenshot()); // the committed PNG: never left half written
  console.log(`wrote ${out}`);
} finally {
  await browser.close();
  await server.shutdown();
}
