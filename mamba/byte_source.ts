/**
 * Sequential byte sources for the streaming loader that work everywhere (Deno and browsers): the body of an
 * HTTP response, and a `Blob` or `File` (a file the user picked in a page). The file-system one is in
 * `hub_fs.ts`.
 * @module
 */

/** A sequential source of bytes: a file, a blob, or the body of an HTTP response. */
export interface ByteSource {
  /** Total size in bytes, or -1 when unknown (an HTTP body without Content-Length). */
  readonly size: number;
  /** File path, file name or URL, for messages. */
  readonly name: string;
  /** Fills `buf` entirely; a source that ends first is an error naming the position. */
  readExact(buf: Uint8Array): Promise<void>;
  /** Skips `n` bytes. */
  skip(n: number): Promise<void>;
  /** Whether every byte has been read or skipped (a body of unknown size is read one chunk further). */
  atEnd(): Promise<boolean>;
  /** Releases the file or the connection. */
  close(): Promise<void>;
}

/** Wraps a response body as a {@linkcode ByteSource}; `size` from Content-Length (or -1, also where the body
 * was compressed: a browser decompresses it, while Content-Length counts the compressed bytes). */
export function responseSource(res: Response, name: string): ByteSource {
  const len = res.headers.get("content-length");
  const encoded = (res.headers.get("content-encoding") ?? "identity").toLowerCase() !== "identity";
  const size = len !== null && /^\d+$/.test(len) && !encoded ? Number(len) : -1;
  const reader = res.body!.getReader();
  let chunk: Uint8Array = new Uint8Array(0);
  let at = 0;
  let pos = 0;
  let done = false;
  // Calls `take` with successive pieces until `n` bytes have been consumed.
  const consume = async (n: number, take: (piece: Uint8Array, offset: number) => void) => {
    for (let got = 0; got < n;) {
      if (at === chunk.length) {
        let r: ReadableStreamReadResult<Uint8Array>;
        try {
          r = await reader.read();
        } catch (e) {
          throw new Error(`${name}: connection failed at byte ${pos + got}: ${(e as Error).message}`, {
            cause: e,
          });
        }
        if (r.done) {
          done = true;
          throw new Error(`${name}: the body ended at byte ${pos + got} (wanted ${n - got} more)`);
        }
        chunk = r.value;
        at = 0;
      }
      const m = Math.min(n - got, chunk.length - at);
      take(chunk.subarray(at, at + m), got);
      at += m;
      got += m;
    }
    pos += n;
  };
  return {
    size,
    name,
    readExact: (buf) => consume(buf.length, (piece, off) => buf.set(piece, off)),
    skip: (n) => consume(n, () => {}),
    async atEnd(): Promise<boolean> {
      while (at === chunk.length && !done) {
        const r = await reader.read().catch((e) => {
          throw new Error(`${name}: connection failed at byte ${pos}: ${(e as Error).message}`, { cause: e });
        });
        if (r.done) done = true;
        else [chunk, at] = [r.value, 0];
      }
      return at === chunk.length;
    },
    async close(): Promise<void> {
      if (!done) await reader.cancel().catch(() => {});
      done = true;
    },
  };
}

/** Reads a `Blob` (or a `File`) as a {@linkcode ByteSource}: each read slices the blob, skips cost nothing. */
export function blobSource(blob: Blob, name: string): ByteSource {
  let pos = 0;
  return {
    size: blob.size,
    name,
    async readExact(buf: Uint8Array): Promise<void> {
      if (pos + buf.length > blob.size) {
        throw new Error(
          `${name}: unexpected end of file at byte ${blob.size} (wanted ${
            pos + buf.length - blob.size
          } more)`,
        );
      }
      buf.set(new Uint8Array(await blob.slice(pos, pos + buf.length).arrayBuffer()));
      pos += buf.length;
    },
    skip(n: number): Promise<void> {
      pos += Math.max(0, n);
      return Promise.resolve();
    },
    atEnd: () => Promise.resolve(pos >= blob.size),
    close: () => Promise.resolve(),
  };
}

/** The most bytes a model's text file (config.json, tokenizer.json, an index) may have: the largest
 * tokenizer.json files are tens of MiB. One past it is refused as it streams, not read whole first. */
export const MAX_TEXT_FILE_BYTES: number = 100 * 2 ** 20;

/**
 * A model's text file from its bytes as they stream (`size`: the length the source gives, -1 if none): an
 * error naming `name` (if not empty) once it is past {@linkcode MAX_TEXT_FILE_BYTES} (a body that never ends would otherwise
 * fill the memory). Decoded as UTF-8 as `Response.text()` decodes.
 */
export async function readBoundedText(
  stream: ReadableStream<Uint8Array> | null,
  name: string,
  size = -1,
): Promise<string> {
  const MiB = MAX_TEXT_FILE_BYTES / 2 ** 20;
  const tooLarge = (what: string) =>
    new Error(
      `${
        name ? `${name}: ` : ""
      }${what} the ${MiB} MiB a model's text file (config.json, tokenizer.json, an ` +
        "index) may have",
    );
  if (size > MAX_TEXT_FILE_BYTES) {
    await stream?.cancel().catch(() => {});
    throw tooLarge(`${size} bytes, more than`);
  }
  const parts: Uint8Array[] = [];
  let total = 0;
  if (stream) {
    const reader = stream.getReader();
    for (let r; !(r = await reader.read()).done;) {
      total += r.value.length;
      if (total > MAX_TEXT_FILE_BYTES) {
        await reader.cancel().catch(() => {});
        throw tooLarge(`${total} bytes read and more coming, past`);
      }
      parts.push(r.value);
    }
  }
  const bytes = new Uint8Array(total);
  let at = 0;
  for (const p of parts) bytes.set(p, (at += p.length) - p.length);
  return new TextDecoder().decode(bytes);
}

/** Weight files a model may lack, where another form stands for them (model.safetensors: its index, or
 * pytorch_model.bin; pytorch_model.bin: the safetensors): opening one that is absent gives null. */
export const OPTIONAL_WEIGHT_FILES: ReadonlySet<string> = new Set(["model.safetensors", "pytorch_model.bin"]);

/** A place that holds a model's files: a folder, a URL prefix, a hub repository, or a set of blobs. */
export interface ModelSource {
  /** Folder, URL, `id@revision` or a name for the blobs, for messages. */
  readonly where: string;
  /** The file's text; null when it is absent and `optional`. */
  text(file: string, optional: boolean): Promise<string | null>;
  /** The file as a byte source; null when absent. */
  open(file: string): Promise<ByteSource | null>;
  /** Hub cache, offline: the optional files that were not in the cache (the error to throw if needed). */
  readonly notCached?: Map<string, Error>;
}
