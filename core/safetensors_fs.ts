/**
 * Deno file I/O for safetensors: a reader that validates the header against the real file size before
 * reading any tensor data, and atomic writers (temp file in the same directory, fsync, rename).
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
    // Read only up to the last tensor's end; trailing bytes are ignored.
    let dataEnd = 0;
    for (const e of header.entries.values()) dataEnd = Math.max(dataEnd, e.dataOffsets[1]);
    const data = await readExact(file, dataEnd, path);
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

/**
 * Writes `data` to `path` atomically: a temp file `<path>.tmp-<random>` in the same directory is written,
 * fsynced and renamed over `path`, so readers see either the old or the new content. On failure the temp
 * file is removed and the error (naming `path`) is rethrown with the original as `cause`.
 */
export async function writeFileAtomic(path: string, data: Uint8Array | string): Promise<void> {
  const bytes = typeof data === "string" ? new TextEncoder().encode(data) : data;
  const tmp = `${path}.tmp-${crypto.randomUUID().slice(0, 8)}`;
  let file: Deno.FsFile | undefined;
  let created = false;
  try {
    file = await Deno.open(tmp, { write: true, createNew: true });
    created = true;
    for (let done = 0; done < bytes.length;) done += await file.write(bytes.subarray(done));
    await file.syncData(); // data must be on disk before the rename makes it visible
    file.close();
    file = undefined;
    await Deno.rename(tmp, path);
  } catch (e) {
    file?.close();
    if (created) await Deno.remove(tmp).catch(() => {});
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
