/**
 * Headless Chromium with WebGPU, driven by playwright-core: Debian's `chromium` package with WebGPU on
 * SwiftShader (a CPU adapter), so that GPU-less machines run pages that use WebGPU. Used by the browser tests
 * and by `screenshot.ts`.
 * @module
 */

import fs from "node:fs";
import type { Browser } from "playwright-core";

/** The browser: `CHROMIUM_PATH`, else Debian's /usr/bin/chromium (`apt-get install chromium`). */
export const CHROMIUM: string = Deno.env.get("CHROMIUM_PATH") ?? "/usr/bin/chromium";

/** Flags that give a working WebGPU adapter (SwiftShader) without a GPU, and no background traffic. */
export const CHROMIUM_FLAGS: readonly string[] = [
  "--enable-unsafe-webgpu",
  "--use-webgpu-adapter=swiftshader",
  "--no-sandbox",
  "--disable-background-networking",
  "--disable-component-update",
  "--disable-sync",
  "--disable-quic",
  "--no-first-run",
];

/** Whether the browser is installed. */
export async function haveChromium(): Promise<boolean> {
  return await Deno.stat(CHROMIUM).then((s) => s.isFile, () => false);
}

/** Launches headless Chromium with {@linkcode CHROMIUM_FLAGS}. Needs --allow-run, --allow-sys, --allow-env. */
export async function launchChromium(): Promise<Browser> {
  // playwright-core asks fs.existsSync("/proc/sys/fs/binfmt_misc/WSLInterop") when it loads; Deno throws for
  // /proc/sys paths without --allow-all where Node returns false. Give it Node's answer, then load it.
  const existsSync = fs.existsSync;
  if (!(existsSync as { patched?: boolean }).patched) {
    const safe = (p: fs.PathLike) => {
      try {
        return existsSync(p);
      } catch {
        return false;
      }
    };
    fs.existsSync = Object.assign(safe, { patched: true });
  }
  const { chromium } = await import("playwright-core");
  return await chromium.launch({ executablePath: CHROMIUM, args: [...CHROMIUM_FLAGS] });
}
