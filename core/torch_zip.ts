/**
 * A PyTorch checkpoint (`pytorch_model.bin`, the zip archive `torch.save` writes since PyTorch 1.6) read
 * front to back, as it downloads: `<prefix>/data.pkl` first (the state dict, see `torch_pickle.ts`), then
 * one `<prefix>/data/<key>` record per storage, and small records (`version`, ...) that are skipped; a
 * `byteorder` other than "little" is refused wherever it is, and so are a storage before `data.pkl` and a
 * name twice.
 * Records are stored uncompressed. PyTorch's writer puts their sizes in data descriptors after the data, not
 * in the headers before it, so a storage's size comes from the pickle, and the pickle's own end is found by
 * its descriptor (signature, CRC-32 and size must all agree). ZIP64 sizes are read. The central directory at
 * the end is not needed, so a stream of unknown length works too. The storages' own CRC-32s are not checked,
 * as `torch.load` does not check them (PyTorch builds miniz with `MINIZ_DISABLE_ZIP_READER_CRC32_CHECKS`); a
 * download from the hub is checked by its sha256 instead.
 * @module
 */

import { DTYPE_BYTES, parseTorchPickle, type TorchStateDict } from "./torch_pickle.ts";

/** A sequential byte source (`ByteSource` of the loader fits it). */
export interface SequentialSource {
  /** Total size in bytes, or -1 when unknown. */
  readonly size: number;
  /** Fills `buf` entirely (an error if the source ends first). */
  readExact(buf: Uint8Array): Promise<void>;
  /** Skips `n` bytes. */
  skip(n: number): Promise<void>;
}

/** `bytes` as a {@linkcode SequentialSource} of the given `size` (-1: as a body of unknown length); a read
 * past the end is an error naming `source`. */
export function bytesSource(
  bytes: Uint8Array,
  source: string,
  size: number = bytes.length,
): SequentialSource {
  let pos = 0;
  return {
    size,
    readExact(buf: Uint8Array): Promise<void> {
      if (pos + buf.length > bytes.length) {
        throw new Error(
          `${source}: unexpected end of file at byte ${bytes.length} (wanted ${
            pos + buf.length - bytes.length
          } more)`,
        );
      }
      buf.set(bytes.subarray(pos, pos + buf.length));
      pos += buf.length;
      return Promise.resolve();
    },
    skip(n: number): Promise<void> {
      pos += n;
      return Promise.resolve();
    },
  };
}

/** One storage record, positioned at its first byte. */
export interface StorageRecord {
  /** The storage's key (`data/<key>`). */
  key: string;
  /** Its size in bytes (elements times their size). */
  bytes: number;
  /** Offset of its first byte in the file, for messages. */
  at: number;
}

const LOCAL = 0x04034b50;
const DESCRIPTOR = 0x08074b50;
const ENDS = new Set([0x02014b50, 0x06054b50, 0x06064b50]); // central directory, end records
const SCAN_CHUNK = 64; // bytes read at a time while looking for a descriptor (at least 68 bytes follow one)
const MAX_SMALL_RECORD = 64 << 20; // data.pkl and the other records read whole (a state dict's pickle: ~1 MB)
// A pre-1.6 torch.save file (still written under _use_new_zipfile_serialization=False) is pickles back to back,
// the first torch's magic number: it starts with a PROTO opcode of the pickle_protocol it was saved with (2 by
// default, up to 5), where a zip starts with a record's signature.
const isLegacy = (head: Uint8Array) => head[0] === 0x80 && head[1] >= 2 && head[1] <= 5;

// A local header's, the central directory's or an end record's signature.
const isSignature = (sig: number) => sig === LOCAL || ENDS.has(sig);

let crcTable: Uint32Array | null = null;
/** CRC-32 (zip's) of `bytes`; with `prev`, the CRC-32 of what `prev` was the CRC of, followed by `bytes`. */
export function crc32(bytes: Uint8Array, prev = 0): number {
  if (!crcTable) {
    crcTable = new Uint32Array(256);
    for (let i = 0; i < 256; i++) {
      let c = i;
      for (let k = 0; k < 8; k++) c = c & 1 ? 0xedb88320 ^ (c >>> 1) : c >>> 1;
      crcTable[i] = c >>> 0;
    }
  }
  let c = (prev ^ 0xffffffff) >>> 0;
  for (let i = 0; i < bytes.length; i++) c = crcTable[(c ^ bytes[i]) & 0xff] ^ (c >>> 8);
  return (c ^ 0xffffffff) >>> 0;
}

interface LocalHeader {
  name: string;
  at: number;
  /** Size from the header; null where a descriptor after the data gives it. */
  size: number | null;
  crc: number;
  descriptor: boolean;
}

/** Reads a torch zip archive front to back: {@linkcode readStateDict}, then {@linkcode nextStorage} in turn. */
export class TorchArchiveReader {
  #src: SequentialSource;
  #where: string;
  #pos = 0; // file offset of the next byte
  #back: Uint8Array = new Uint8Array(0); // bytes read ahead, given back
  #prefix = "";
  #open: LocalHeader | null = null; // the record whose data is being read
  #seen = new Map<string, number>(); // each record's offset, by name

  /** Reads `src` (positioned at the file's start); `where` names the file in errors. */
  constructor(src: SequentialSource, where: string) {
    this.#src = src;
    this.#where = where;
  }

  #fail(at: number, why: string): never {
    throw new Error(`${this.#where}: byte ${at}: ${why}`);
  }

  /** Reads `buf.length` bytes of the open record (or of the structure around records). */
  async read(buf: Uint8Array): Promise<void> {
    const n = Math.min(this.#back.length, buf.length);
    buf.set(this.#back.subarray(0, n));
    this.#back = this.#back.subarray(n);
    if (n < buf.length) await this.#src.readExact(buf.subarray(n));
    this.#pos += buf.length;
  }

  /** Skips `n` bytes of the open record. */
  async skip(n: number): Promise<void> {
    const m = Math.min(this.#back.length, n);
    this.#back = this.#back.subarray(m);
    if (n > m) await this.#src.skip(n - m);
    this.#pos += n;
  }

  // Bytes left in the file; Infinity for a source of unknown size.
  #left(): number {
    return this.#src.size >= 0 ? this.#src.size - this.#pos : Infinity;
  }

  async #bytes(n: number): Promise<Uint8Array> {
    const b = new Uint8Array(n);
    await this.read(b);
    return b;
  }

  #unread(bytes: Uint8Array) {
    const joined = new Uint8Array(bytes.length + this.#back.length);
    joined.set(bytes);
    joined.set(this.#back, bytes.length);
    this.#back = joined;
    this.#pos -= bytes.length;
  }

  // The next local header, or null at the central directory.
  async #header(): Promise<LocalHeader | null> {
    const at = this.#pos;
    const head = await this.#bytes(4);
    const sig = new DataView(head.buffer).getUint32(0, true);
    if (ENDS.has(sig)) return null;
    if (sig !== LOCAL) {
      if (at === 0 && isLegacy(head)) {
        this.#fail(
          0,
          "a torch.save file of the format before PyTorch 1.6 (not a zip archive), which is not read: " +
            "load it in PyTorch and save it again with torch.save, or as safetensors",
        );
      }
      this.#fail(
        at,
        `expected a zip record, found bytes ${
          [...head].map((b) => b.toString(16).padStart(2, "0")).join(" ")
        }` +
          (at === 0 ? " (not a PyTorch zip checkpoint)" : ""),
      );
    }
    const h = new DataView((await this.#bytes(26)).buffer);
    const flags = h.getUint16(2, true);
    const method = h.getUint16(4, true);
    const crc = h.getUint32(10, true);
    let size: number | null = h.getUint32(14, true);
    const name = new TextDecoder().decode(await this.#bytes(h.getUint16(22, true)));
    const extra = await this.#bytes(h.getUint16(24, true));
    // A name twice (a second storage or data.pkl, appended) leaves which is meant to the reader: torch.load's
    // takes one, a streaming one the other.
    const first = this.#seen.get(name);
    if (first !== undefined) {
      this.#fail(at, `record ${name} is in the archive twice (at bytes ${first} and ${at})`);
    }
    this.#seen.set(name, at);
    if (flags & 1) this.#fail(at, `record ${name} is encrypted`);
    if (method !== 0) {
      this.#fail(at, `record ${name} is compressed (method ${method}); PyTorch stores records as they are`);
    }
    if (size === 0xffffffff) {
      size = zip64Size(extra) ?? this.#fail(at, `record ${name}: size 0xffffffff without a ZIP64 field`);
    }
    if (size > this.#left()) {
      this.#fail(at, `record ${name} claims ${size} bytes, past the end of the file (${this.#left()} left)`);
    }
    const descriptor = (flags & 8) !== 0;
    if (descriptor && size === 0) size = null; // the descriptor says
    return { name, at, size, crc, descriptor };
  }

  // After `size` bytes of data: the descriptor, checked against them (signature, size, and `crc` if given).
  async #endRecord(h: LocalHeader, size: number, crc: number | null): Promise<void> {
    if (!h.descriptor) return;
    const at = this.#pos;
    const d = new DataView((await this.#bytes(16)).buffer);
    const [sig, dcrc, a, b] = [0, 4, 8, 12].map((o) => d.getUint32(o, true));
    const lo = size % 2 ** 32;
    const hi = Math.floor(size / 2 ** 32);
    let wide = hi > 0 || (b === 0 && a === lo && lo !== 0); // 8-byte sizes (ZIP64)
    if (size === 0 && a === 0 && b === 0) { // either width: 8 more zero bytes, or the next record's signature
      const next = await this.#bytes(4);
      wide = next.every((x) => x === 0);
      if (!wide) this.#unread(next);
      else await this.#bytes(4);
    } else if (wide) {
      const u = new DataView((await this.#bytes(8)).buffer);
      wide = a === lo && b === hi && u.getUint32(0, true) === lo && u.getUint32(4, true) === hi;
      if (!wide) this.#fail(at, `record ${h.name}'s data descriptor does not give its size, ${size} bytes`);
    } else if (a !== lo || b !== lo) {
      this.#fail(at, `record ${h.name}'s data descriptor gives ${a} bytes, but it has ${size}`);
    }
    if (sig !== DESCRIPTOR) this.#fail(at, `record ${h.name} has no data descriptor after its ${size} bytes`);
    if (crc !== null && dcrc !== crc) this.#fail(at, `record ${h.name}'s CRC-32 does not match its data`);
  }

  // The data of a record of unknown size: up to the descriptor whose size and CRC-32 match what precedes it.
  async #scan(h: LocalHeader): Promise<Uint8Array> {
    // Grown by doubling, and read in chunks as large as what is held where the file's size bounds them: a
    // copy per 64-byte chunk made a 64 MiB search quadratic (minutes for a pickle whose descriptor is bad).
    let buf = new Uint8Array(1024);
    let len = 0;
    const start = this.#pos;
    // the CRC-32 of buf[0, crcTo), carried forward as candidates come: one from the start per candidate made a
    // record full of descriptor-like bytes quadratic (a file of 512 KiB took a minute)
    let crc = 0;
    let crcTo = 0;
    for (let from = 0;;) {
      const left = this.#left();
      if (left <= 0) {
        this.#fail(
          h.at,
          `record ${h.name}: no data descriptor matches its size and CRC-32 before the end of the file`,
        );
      }
      const n = Math.min(
        this.#src.size >= 0 ? Math.max(SCAN_CHUNK, len) : SCAN_CHUNK,
        left,
        MAX_SMALL_RECORD + SCAN_CHUNK - len,
      );
      if (len + n > buf.length) {
        const grown = new Uint8Array(Math.max(2 * buf.length, len + n));
        grown.set(buf.subarray(0, len));
        buf = grown;
      }
      await this.read(buf.subarray(len, len + n));
      len += n;
      const v = new DataView(buf.buffer, 0, len);
      for (; from + 24 <= len; from++) {
        if (v.getUint32(from, true) !== DESCRIPTOR) continue;
        const [a, b] = [v.getUint32(from + 8, true), v.getUint32(from + 12, true)];
        if (a !== from || (b !== from && b !== 0)) continue;
        // 4-byte sizes (a, b = size, size), else ZIP64's 8-byte ones (size, 0, size, 0); for an empty record
        // both read 0, 0: a record's signature follows the short form
        const short = from !== 0 ? b === from : isSignature(v.getUint32(from + 16, true));
        if (!short && (v.getUint32(from + 16, true) !== from || v.getUint32(from + 20, true) !== 0)) continue;
        const end = from + (short ? 16 : 24);
        // torch.save under torch.serialization.set_crc32_options(False) (PyTorch 2.x) writes 0 for
        // every CRC-32, which torch.load accepts: taken where a record's signature (or the file's end) follows
        const want = v.getUint32(from + 4, true);
        crc = crc32(buf.subarray(crcTo, from), crc);
        crcTo = from;
        if (want !== crc) {
          if (want !== 0) continue;
          if (end + 4 > len) {
            if (this.#left() > 0) break; // look again with more bytes
          } else if (!isSignature(v.getUint32(end, true))) continue;
        }
        this.#unread(buf.subarray(end, len));
        return buf.slice(0, from);
      }
      if (len > MAX_SMALL_RECORD) {
        this.#fail(start, `record ${h.name}: no data descriptor in its first 64 MiB`);
      }
    }
  }

  // A whole small record's data, checked by its CRC-32.
  async #whole(h: LocalHeader): Promise<Uint8Array> {
    if (h.size === null) return await this.#scan(h);
    if (h.size > MAX_SMALL_RECORD) {
      this.#fail(h.at, `record ${h.name} claims ${h.size} bytes, over the 64 MiB bound`);
    }
    const data = await this.#bytes(h.size);
    const crc = crc32(data);
    if (!h.descriptor && crc !== h.crc) this.#fail(h.at, `record ${h.name}'s CRC-32 does not match its data`);
    await this.#endRecord(h, h.size, crc);
    return data;
  }

  // A `byteorder` record (torch.save's since PyTorch 2.1) other than "little": refused.
  #checkOrder(h: LocalHeader, data: Uint8Array) {
    const order = new TextDecoder().decode(data);
    if (order !== "little") this.#fail(h.at, `the storages are ${order}-endian; only little-endian is read`);
  }

  /**
   * Reads the records up to `<prefix>/data.pkl` and parses it (the records before it are skipped, but a
   * `byteorder` is checked and a storage refused: torch.save writes data.pkl first).
   */
  async readStateDict(): Promise<TorchStateDict> {
    for (;;) {
      const h = await this.#header();
      if (!h) this.#fail(this.#pos - 4, "the archive has no data.pkl (not a torch.save checkpoint?)");
      // (the archive's prefix is not known yet: torch's has one, so any is taken as it)
      // (torch.save("data.pt") names its prefix data/: its data.pkl is data/data.pkl, no storage)
      if (/(^|\/)data\/[^/]+$/.test(h.name) && !h.name.endsWith("/data.pkl")) {
        this.#fail(
          h.at,
          `record ${h.name}, a storage, comes before data.pkl: this reader needs data.pkl first, as torch.save ` +
            "writes it (load the file in PyTorch and save it again with torch.save)",
        );
      }
      const data = await this.#whole(h);
      if (h.name === "data.pkl" || h.name.endsWith("/data.pkl")) {
        this.#prefix = h.name.slice(0, -"data.pkl".length);
        return parseTorchPickle(data, `${this.#where}: ${h.name}`);
      }
      if (/(^|\/)byteorder$/.test(h.name)) this.#checkOrder(h, data);
    }
  }

  /**
   * Goes to the next storage record of `state` (skipping other records; a `byteorder` that is not "little" is
   * refused) and returns it; null at the end of the records. Read exactly `bytes` of it (`read`/`skip`)
   * before the next call.
   */
  async nextStorage(state: TorchStateDict): Promise<StorageRecord | null> {
    if (this.#open) {
      const h = this.#open;
      this.#open = null;
      await this.#endRecord(h, h.size!, null);
    }
    for (;;) {
      const h = await this.#header();
      if (!h) return null;
      const dataPrefix = `${this.#prefix}data/`;
      if (!h.name.startsWith(dataPrefix)) {
        const data = await this.#whole(h);
        if (h.name === `${this.#prefix}byteorder`) this.#checkOrder(h, data);
        continue;
      }
      const key = h.name.slice(dataPrefix.length);
      const s = state.storages.get(key);
      if (!s) this.#fail(h.at, `record ${h.name} is a storage that data.pkl does not name`);
      const bytes = s.numel * DTYPE_BYTES[s.dtype];
      if (h.size !== null && h.size !== bytes) {
        this.#fail(
          h.at,
          `record ${h.name} has ${h.size} bytes, but data.pkl makes it ${s.numel} x ${s.dtype} = ${bytes}`,
        );
      }
      // A record sized by its descriptor has only the pickle's word for it until its end: checked against the
      // file before anyone allocates that many bytes.
      if (bytes > this.#left()) {
        this.#fail(
          h.at,
          `record ${h.name}: data.pkl makes it ${s.numel} x ${s.dtype} = ${bytes} bytes, past the end of the ` +
            `file (${this.#left()} left)`,
        );
      }
      this.#open = { ...h, size: bytes };
      return { key, bytes, at: this.#pos };
    }
  }
}

// The size in a local header's ZIP64 extra field (id 1: uncompressed size, then compressed size).
function zip64Size(extra: Uint8Array): number | null {
  const v = new DataView(extra.buffer, extra.byteOffset, extra.byteLength);
  for (let o = 0; o + 4 <= extra.length;) {
    const id = v.getUint16(o, true);
    const n = v.getUint16(o + 2, true);
    if (id === 1 && n >= 16 && o + 20 <= extra.length) {
      const size = v.getUint32(o + 12, true) + v.getUint32(o + 16, true) * 2 ** 32; // compressed = stored size
      return Number.isSafeInteger(size) ? size : null;
    }
    o += 4 + n;
  }
  return null;
}
