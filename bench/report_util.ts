/**
 * What the report scripts share: the repository's root, the commit measured, atomic result files, medians
 * and the process's host memory peak.
 * @module
 */

import { dirname } from "node:path";
import { fileURLToPath } from "node:url";
import { writeFileAtomic } from "../core/safetensors_fs.ts";

/** The repository's root folder (a file path, not a URL: spaces and non-ASCII names stay as they are). */
export const REPO_ROOT: string = fileURLToPath(new URL("../", import.meta.url));

/** `bench/results/<name>` as a file path. */
export function resultPath(name: string): string {
  return fileURLToPath(new URL(`./results/${name}`, import.meta.url));
}

/**
 * The commit measured, and the runtime files (core, scan, mamba, nn, mod.ts) changed since it, if any. Git
 * runs in the repository's root, whatever the current folder.
 */
export async function sourceVersion(): Promise<{ commit: string; uncommitted: string[] }> {
  const git = async (...args: string[]) => {
    try {
      const out = await new Deno.Command("git", { args, cwd: REPO_ROOT, stdout: "piped", stderr: "null" })
        .output();
      if (!out.success) return "";
      return new TextDecoder().decode(out.stdout).trimEnd(); // porcelain lines start with a space
    } catch {
      return "";
    }
  };
  const commit = (await git("rev-parse", "--short", "HEAD")).trim();
  const status = await git("status", "--porcelain", "--", "core", "scan", "mamba", "nn", "mod.ts");
  return {
    commit: commit || "unknown",
    uncommitted: status ? status.split("\n").map((l) => l.slice(3)) : [],
  };
}

/** Writes `value` as JSON to `path` atomically (temporary file, fsync, rename): a killed run leaves the old
 * file whole. `indent` as JSON.stringify's. */
export async function writeJsonAtomic(path: string, value: unknown, indent = 1): Promise<void> {
  await Deno.mkdir(dirname(path), { recursive: true });
  await writeFileAtomic(path, JSON.stringify(value, null, indent) + "\n");
}

/** The median (the mean of the middle two for an even count). */
export function median(xs: number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  const m = s.length >> 1;
  return s.length % 2 ? s[m] : (s[m - 1] + s[m]) / 2;
}

/** Reads a field in kB of /proc/self/status, as bytes; null where there is none (not Linux). */
function procStatusBytes(field: string): number | null {
  try {
    const m = new RegExp(`^${field}:\\s+(\\d+) kB`, "m").exec(Deno.readTextFileSync("/proc/self/status"));
    return m ? Number(m[1]) * 1024 : null;
  } catch {
    return null;
  }
}

/**
 * The process's peak resident set since it started or since the last {@linkcode resetHostPeak} (Linux's
 * `VmHWM`: every page the process touched counts, between any two samples); null where it cannot be read.
 */
export function hostPeakBytes(): number | null {
  return procStatusBytes("VmHWM");
}

/** Resets `VmHWM` to the current resident set (writes 5 to /proc/self/clear_refs); false where it cannot. */
export function resetHostPeak(): boolean {
  try {
    Deno.writeTextFileSync("/proc/self/clear_refs", "5");
    return true;
  } catch {
    return false;
  }
}
