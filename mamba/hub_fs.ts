/**
 * File helpers of the hub cache and of the streaming loader (Deno only): a sequential byte source over a
 * file (read exactly n bytes, skip), atomic links into a snapshot, an exclusive lock file, and a terminal
 * progress bar. The byte sources that also work in browsers (HTTP bodies, blobs) are in `byte_source.ts`.
 * @module
 */

import { writeFileAtomic } from "../core/safetensors_fs.ts";
import type { ByteSource } from "./byte_source.ts";

// The folder part of a path ("/" or "\\" separated).
function dirname(path: string): string {
  const i = Math.max(path.lastIndexOf("/"), path.lastIndexOf("\\"));
  return i > 0 ? path.slice(0, i) : i === 0 ? path.slice(0, 1) : ".";
}

/** Opens a file as a {@linkcode ByteSource} (`Deno.open`, reads at the current position, seeks to skip). */
export async function openFileSource(path: string): Promise<ByteSource> {
  const file = await Deno.open(path, { read: true });
  let size: number;
  try {
    size = (await file.stat()).size;
  } catch (e) {
    file.close();
    throw e;
  }
  let pos = 0;
  let closed = false;
  return {
    size,
    name: path,
    async readExact(buf: Uint8Array): Promise<void> {
      for (let got = 0; got < buf.length;) {
        const r = await file.read(buf.subarray(got));
        if (r === null) {
          throw new Error(
            `${path}: unexpected end of file at byte ${pos + got} (wanted ${buf.length - got} more)`,
          );
        }
        got += r;
      }
      pos += buf.length;
    },
    async skip(n: number): Promise<void> {
      if (n > 0) pos = await file.seek(n, Deno.SeekMode.Current);
    },
    atEnd: () => Promise.resolve(pos >= size),
    close(): Promise<void> {
      if (!closed) file.close();
      closed = true;
      return Promise.resolve();
    },
  };
}

/** Size of a file (following links), or -1 when it does not exist. */
export async function fileSize(path: string): Promise<number> {
  try {
    const s = await Deno.stat(path);
    return s.isFile ? s.size : -1;
  } catch (e) {
    if (e instanceof Deno.errors.NotFound) return -1;
    throw e;
  }
}

/** Whether `path` is a directory. */
export async function isDirectory(path: string): Promise<boolean> {
  try {
    return (await Deno.stat(path)).isDirectory;
  } catch {
    return false;
  }
}

const tmpName = (path: string) => `${path}.tmp-${crypto.randomUUID().slice(0, 8)}`;

/**
 * Makes `link` point at `target` atomically: a symlink holding `relTarget` (the target relative to the link's
 * folder) is made under a temporary name and renamed over `link`. Where symlinks fail (Windows without the
 * privilege) the target is copied instead, also under a temporary name first. Returns "symlink" or "copy".
 */
export async function linkAtomic(
  target: string,
  link: string,
  relTarget: string,
): Promise<"symlink" | "copy"> {
  await Deno.mkdir(dirname(link), { recursive: true });
  const tmp = tmpName(link);
  try {
    await Deno.symlink(relTarget, tmp);
    await Deno.rename(tmp, link);
    return "symlink";
  } catch {
    await Deno.remove(tmp).catch(() => {});
  }
  try {
    await Deno.copyFile(target, tmp);
    await Deno.rename(tmp, link);
    return "copy";
  } catch (e) {
    await Deno.remove(tmp).catch(() => {});
    throw new Error(`cannot link ${link} to ${target}: ${(e as Error).message}`, { cause: e });
  }
}

/** Writes a small text file atomically and durably (its folder made if needed; {@linkcode writeFileAtomic}:
 * the data synced before the rename, the folder after), so that a crash leaves the old file or the new one,
 * never a partly written one. */
export async function writeTextAtomic(path: string, text: string): Promise<void> {
  await Deno.mkdir(dirname(path), { recursive: true });
  await writeFileAtomic(path, text);
}

/**
 * Runs `fn` holding an exclusive lock on `path` (created if needed; `flock`, as Python's `filelock` on Unix,
 * so a Python process and this one do not download the same blob at once).
 */
export async function withLock<T>(path: string, fn: () => Promise<T>): Promise<T> {
  await Deno.mkdir(dirname(path), { recursive: true });
  const file = await Deno.open(path, { create: true, write: true });
  try {
    await file.lock(true);
    return await fn();
  } finally {
    file.close(); // closing releases the lock
  }
}

/** A one-line progress bar on stderr: bytes, MB/s, ETA. Does nothing unless enabled. */
export class ProgressBar {
  readonly #label: string;
  readonly #total: number;
  readonly #start = performance.now();
  readonly #first: number;
  #last = 0;
  #enabled: boolean;

  /** `total` bytes expected (-1 unknown), `first` already on disk (a resumed download). */
  constructor(label: string, total: number, first: number, enabled: boolean) {
    this.#label = label;
    this.#total = total;
    this.#first = first;
    this.#enabled = enabled;
  }

  /** Redraws (at most 10 times a second unless `force`). */
  update(done: number, force = false): void {
    if (!this.#enabled) return;
    const now = performance.now();
    if (!force && now - this.#last < 100) return;
    this.#last = now;
    const secs = Math.max((now - this.#start) / 1000, 1e-3);
    const rate = (done - this.#first) / secs;
    const mb = (n: number) => (n / 1e6).toFixed(1);
    let line = `${this.#label} ${mb(done)}`;
    if (this.#total > 0) {
      const frac = Math.min(1, done / this.#total);
      const width = 20;
      const fill = Math.round(frac * width);
      const eta = rate > 0 ? Math.max(0, (this.#total - done) / rate) : Infinity;
      line =
        `${this.#label} [${"#".repeat(fill)}${" ".repeat(width - fill)}] ${mb(done)}/${mb(this.#total)} MB` +
        ` ${mb(rate)} MB/s ETA ${formatSeconds(eta)}`;
    } else {
      line += ` MB ${mb(rate)} MB/s`;
    }
    let cols = 100;
    try {
      cols = Deno.consoleSize().columns;
    } catch { /* not a console */ }
    if (line.length > cols - 1) line = line.slice(0, cols - 1);
    Deno.stderr.writeSync(new TextEncoder().encode(`\r${line}\x1b[K`));
  }

  /** Draws the final state and ends the line. */
  finish(done: number): void {
    if (!this.#enabled) return;
    this.update(done, true);
    Deno.stderr.writeSync(new TextEncoder().encode("\n"));
    this.#enabled = false;
  }
}

function formatSeconds(s: number): string {
  if (!Number.isFinite(s)) return "?";
  if (s < 60) return `${Math.ceil(s)}s`;
  if (s < 3600) return `${Math.floor(s / 60)}m${String(Math.ceil(s % 60)).padStart(2, "0")}s`;
  return `${Math.floor(s / 3600)}h${String(Math.floor((s % 3600) / 60)).padStart(2, "0")}m`;
}
