/**
 * Deno file I/O for safetensors: a reader that validates the header against the real file size before
 * reading any tensor data, and atomic writers (temp file in the same directory, fsync, rename, fsync of the
 * directory).
 * @module
 */

import {
  type DecodedTensor,
  decodeTensor,
  type ParsedSafetensors,
  parseSafetensorsHeader,
  SafetensorsError,
  safetensorsHeaderLength,
  type SafetensorsInput,
  serializeSafetensors,
} from "./safetensors.ts";

// Reads exactly `n` bytes at the current position; a short file is an error, not a partial result.
async function readExact(file: Deno.FsFile, n: number, path: string): Promise<Uint8Array<ArrayBuffer>> {
  const buf = new Uint8Array(n);
  for (let got = 0; got < n;) {
    const r = await file.read(buf.subarray(got));
    if (r === null) throw new SafetensorsError(`${path}: unexpected end of file (read ${got} of ${n} bytes)`);
    got += r;
  }
  return buf;
}

/**
 * Reads and decodes a safetensors file. The header is read and validated first (against the file's size), so
 * a corrupt header never triggers a large read. Errors name `path`.
 */
export async function readSafetensorsFile(path: string): Promise<ParsedSafetensors> {
  let file: Deno.FsFile | undefined;
  try {
    file = await Deno.open(path, { read: true });
    const fileSize = (await file.stat()).size;
    if (fileSize < 8) parseSafetensorsHeader(new Uint8Array(0), fileSize, path); // throws the usual error
    const lengthField = await readExact(file, 8, path);
    const n = safetensorsHeaderLength(lengthField, path);
    if (8 + n > fileSize) parseSafetensorsHeader(lengthField, fileSize, path); // throws: header past EOF
    const prefix = new Uint8Array(8 + n);
    prefix.set(lengthField);
    prefix.set(await readExact(file, n, path), 8);
    const header = parseSafetensorsHeader(prefix, fileSize, path);
    const data = await readExact(file, fileSize - header.dataStart, path); // the tensors tile this exactly
    const tensors = new Map<string, DecodedTensor>();
    for (const [name, entry] of header.entries) {
      const raw = data.subarray(entry.dataOffsets[0], entry.dataOffsets[1]);
      let decoded;
      try {
        decoded = decodeTensor(entry, raw, name);
      } catch (e) {
        throw new SafetensorsError(`${path}: ${(e as Error).message}`, { cause: e });
      }
      tensors.set(name, { dtype: entry.dtype, shape: entry.shape, data: decoded });
    }
    return { header, tensors };
  } catch (e) {
    if (e instanceof SafetensorsError) throw e;
    throw new Error(`cannot read safetensors file ${path}: ${(e as Error).message}`, { cause: e });
  } finally {
    file?.close();
  }
}

/** The permission bits of the regular file at `path`, or null where there is none (or the OS has no modes). */
async function fileMode(path: string): Promise<number | null> {
  try {
    const info = await Deno.stat(path);
    return info.isFile && info.mode !== null ? info.mode & 0o777 : null;
  } catch (e) {
    if (e instanceof Deno.errors.NotFound) return null;
    throw e;
  }
}

/**
 * Flushes the directory entry of a rename to disk: fsync of the directory (POSIX). Windows cannot open a
 * directory as a file, and some file systems reject fsync of one (EINVAL): there this is skipped.
 */
async function syncDir(dir: string): Promise<void> {
  if (Deno.build.os === "windows") return;
  let d: Deno.FsFile | undefined;
  try {
    d = await Deno.open(dir, { read: true });
    await d.sync();
  } catch (e) {
    const unsupported = e instanceof Deno.errors.NotSupported ||
      /os error 22\b|Invalid argument/.test(String(e));
    if (!unsupported) {
      throw new Error(`syncing directory ${dir} after the rename: ${(e as Error).message}`, { cause: e });
    }
  } finally {
    d?.close();
  }
}

/**
 * Writes `data` to `path` atomically: a temp file `<path>.tmp-<random>` in the same directory is written,
 * fsynced and renamed over `path`, then the directory is fsynced so that the rename survives a crash too
 * (not on Windows, which cannot sync a directory). Readers see either the old or the new content. A file
 * that is overwritten keeps its permission bits (the new one would otherwise get the default mode). On
 * failure the temp file is removed and the error (naming `path`) is rethrown with the original as `cause`.
 */
export async function writeFileAtomic(path: string, data: Uint8Array | string): Promise<void> {
  const bytes = typeof data === "string" ? new TextEncoder().encode(data) : data;
  const tmp = `${path}.tmp-${crypto.randomUUID().slice(0, 8)}`;
  const cut = path.lastIndexOf("/"); // (Windows skips the directory sync)
  const dir = cut < 0 ? "." : cut === 0 ? "/" : path.slice(0, cut);
  let file: Deno.FsFile | undefined;
  let created = false;
  let renamed = false;
  try {
    const mode = await fileMode(path);
    file = await Deno.open(tmp, { write: true, createNew: true });
    created = true;
    if (mode !== null) await Deno.chmod(tmp, mode);
    for (let done = 0; done < bytes.length;) done += await file.write(bytes.subarray(done));
    await file.syncData(); // data must be on disk before the rename makes it visible
    file.close();
    file = undefined;
    await Deno.rename(tmp, path);
    renamed = true;
    await syncDir(dir);
  } catch (e) {
    file?.close();
    if (created && !renamed) await Deno.remove(tmp).catch(() => {});
    throw new Error(`cannot write ${path}: ${(e as Error).message}`, { cause: e });
  }
}

/**
 * Serializes `tensors` (see {@linkcode serializeSafetensors}) and writes them atomically with
 * {@linkcode writeFileAtomic}. Invalid tensors throw before anything touches the disk; errors name `path`.
 */
export async function writeSafetensorsFile(
  path: string,
  tensors: Record<string, SafetensorsInput>,
  metadata?: Record<string, string>,
): Promise<void> {
  let bytes: Uint8Array;
  try {
    bytes = serializeSafetensors(tensors, metadata);
  } catch (e) {
    throw new SafetensorsError(`cannot write ${path}: ${(e as Error).message}`, { cause: e });
  }
  await writeFileAtomic(path, bytes);
}
