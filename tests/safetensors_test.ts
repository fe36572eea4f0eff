import assert from "node:assert/strict";
import {
  decodeTensor,
  MAX_HEADER_LENGTH,
  parseSafetensors,
  parseSafetensorsHeader,
  SafetensorsError,
  safetensorsHeaderLength,
  serializeSafetensors,
} from "../core/safetensors.ts";
import { readSafetensorsFile, writeFileAtomic, writeSafetensorsFile } from "../core/safetensors_fs.ts";

const FIXTURE = new URL("./fixtures/pscan_L1.safetensors", import.meta.url);

/** Builds a raw file: length field (default: the header's byte length), header text, data bytes. */
function rawFile(
  header: Uint8Array | string | object,
  data = new Uint8Array(0),
  length?: bigint,
): Uint8Array {
  const json = header instanceof Uint8Array
    ? header
    : new TextEncoder().encode(typeof header === "string" ? header : JSON.stringify(header));
  const out = new Uint8Array(8 + json.length + data.length);
  new DataView(out.buffer).setBigUint64(0, length ?? BigInt(json.length), true);
  out.set(json, 8);
  out.set(data, 8 + json.length);
  return out;
}

/** Decodes 16-bit patterns as F16 or BF16. */
function decode16(dtype: "F16" | "BF16", bits: number[]): Float32Array {
  const bytes = new Uint8Array(new Uint16Array(bits).buffer); // test hosts are little-endian
  const entry = { dtype, shape: [bits.length], dataOffsets: [0, 2 * bits.length] as [number, number] };
  return decodeTensor(entry, bytes, "t") as Float32Array;
}

/** Encodes f32 values as F16 or BF16 through the writer and returns the stored 16-bit patterns. */
function encode16(dtype: "F16" | "BF16", values: number[] | Float32Array): Uint16Array {
  const file = serializeSafetensors({ t: { shape: [values.length], data: new Float32Array(values), dtype } });
  const start = parseSafetensorsHeader(file, file.length).dataStart;
  return new Uint16Array(file.slice(start).buffer);
}

Deno.test("round trip F32 and I32 with metadata", () => {
  const w = new Float32Array([1.5, -2, 3.25, Math.PI, -0, Infinity]);
  const idx = new Int32Array([0, -1, 2147483647, -2147483648]);
  const file = serializeSafetensors(
    {
      w: { shape: [2, 3], data: w },
      idx: { shape: [4], data: idx },
      s: { shape: [], data: new Float32Array([7]) },
    },
    { format: "pt", note: "ünïcode" },
  );
  const len = safetensorsHeaderLength(file);
  assert.equal(len % 8, 0, "header is padded to a multiple of 8");
  const { header, tensors } = parseSafetensors(file, "rt");
  assert.deepEqual(header.metadata, { format: "pt", note: "ünïcode" });
  assert.equal(header.dataStart, 8 + len);
  assert.deepEqual([...header.entries.keys()], ["s", "w", "idx"], "F32 before I32, then by name");
  assert.deepEqual(header.entries.get("idx"), { dtype: "I32", shape: [4], dataOffsets: [28, 44] });
  assert.equal(file.length, header.dataStart + 44);
  assert.deepEqual(tensors.get("w"), { dtype: "F32", shape: [2, 3], data: w });
  assert.deepEqual(tensors.get("idx"), { dtype: "I32", shape: [4], data: idx });
  assert.deepEqual(tensors.get("s"), { dtype: "F32", shape: [], data: new Float32Array([7]) });
  assert.ok(Object.is(tensors.get("w")!.data[4], -0));
});

Deno.test("serialize rejects data/shape mismatch and bad dtypes, naming the tensor", () => {
  const data = new Float32Array(5);
  assert.throws(
    () => serializeSafetensors({ ok: { shape: [5], data }, bad: { shape: [2, 3], data } }),
    /tensor "bad": shape \[2,3\] needs 6 values, data has 5/,
  );
  assert.throws(() => serializeSafetensors({ x: { shape: [5], data, dtype: "I32" } }), /"x": cannot store/);
  assert.throws(
    () => serializeSafetensors({ x: { shape: [1], data: new Int32Array(1), dtype: "F16" } }),
    SafetensorsError,
  );
  assert.throws(() => serializeSafetensors({ x: { shape: [-5], data } }), /"x": shape must be/);
  assert.throws(() => serializeSafetensors({ __metadata__: { shape: [5], data } }), /reserved/);
});

Deno.test("F16 decodes known values exactly", () => {
  const out = decode16("F16", [
    0x3c00,
    0xc100,
    0x7bff,
    0x0001,
    0x03ff,
    0x0400,
    0x7c00,
    0xfc00,
    0x7e00,
    0,
    0x8000,
  ]);
  const expected = [1, -2.5, 65504, 2 ** -24, 1023 * 2 ** -24, 2 ** -14, Infinity, -Infinity, NaN, 0, -0];
  expected.forEach((v, i) => assert.ok(Object.is(out[i], v), `index ${i}: ${out[i]} !== ${v}`));
});

Deno.test("BF16 decodes known values exactly", () => {
  const out = decode16("BF16", [0x3f80, 0xc020, 0x4780, 0x7f7f, 0x0001, 0x7f80, 0xff80, 0x7fc0, 0, 0x8000]);
  const f32Max = new Float32Array(new Uint32Array([0x7f7f0000]).buffer)[0];
  const expected = [1, -2.5, 65536, f32Max, 2 ** -133, Infinity, -Infinity, NaN, 0, -0];
  expected.forEach((v, i) => assert.ok(Object.is(out[i], v), `index ${i}: ${out[i]} !== ${v}`));
});

Deno.test("F16 and BF16 decode unaligned input", () => {
  const buf = new Uint8Array(7);
  buf.set([0x00, 0x3c, 0x80, 0x3f], 1); // F16 1.0 then BF16 1.0, at odd offsets
  const e = { dtype: "F16" as const, shape: [1], dataOffsets: [0, 2] as [number, number] };
  assert.deepEqual(decodeTensor(e, buf.subarray(1, 3), "a"), new Float32Array([1]));
  assert.deepEqual(decodeTensor({ ...e, dtype: "BF16" }, buf.subarray(3, 5), "b"), new Float32Array([1]));
  const f32 = new Uint8Array(9);
  f32.set(new Uint8Array(new Float32Array([2.5, -1]).buffer), 1);
  const e32 = { dtype: "F32" as const, shape: [2], dataOffsets: [0, 8] as [number, number] };
  assert.deepEqual(decodeTensor(e32, f32.subarray(1), "c"), new Float32Array([2.5, -1]));
  assert.throws(
    () => decodeTensor(e32, f32.subarray(2), "c"),
    /tensor "c": shape \[2\] x F32 needs 8 bytes, got 7/,
  );
});

Deno.test("F16 and BF16 encode: every non-NaN pattern round-trips, NaN stays NaN", () => {
  for (const dtype of ["F16", "BF16"] as const) {
    const bits = Array.from({ length: 65536 }, (_, i) => i);
    const finite = bits.filter((_, i) => !Number.isNaN(decode16(dtype, [i])[0]));
    assert.equal(finite.length, dtype === "F16" ? 63490 : 65282);
    assert.deepEqual(encode16(dtype, decode16(dtype, finite)), new Uint16Array(finite), dtype);
    const nan = decode16(dtype, [...encode16(dtype, [NaN, -NaN])]);
    assert.ok(nan.every(Number.isNaN), `${dtype} NaN`);
  }
});

Deno.test("F16 and BF16 encode round to nearest even", () => {
  const f16 = [
    [1 + 2 ** -11, 0x3c00], // halfway, even stays down
    [1 + 3 * 2 ** -11, 0x3c02], // halfway, odd goes up
    [1 + 2 ** -11 + 2 ** -20, 0x3c01], // above halfway
    [65519, 0x7bff],
    [65520, 0x7c00], // halfway between max and 2^16: rounds to inf
    [1e6, 0x7c00],
    [-1e6, 0xfc00],
    [2 ** -25, 0x0000], // halfway between 0 and the smallest subnormal
    [1.5 * 2 ** -25, 0x0001],
    [3 * 2 ** -25, 0x0002], // halfway between subnormals 1 and 2
    [1023.5 * 2 ** -24, 0x0400], // carries into the smallest normal
    [1e-10, 0x0000],
    [-1e-10, 0x8000],
    [-0, 0x8000],
  ];
  assert.deepEqual([...encode16("F16", f16.map(([v]) => v))], f16.map(([, b]) => b));
  const bf16 = [
    [65504, 0x4780], // f32 0x477fe000: above halfway
    [1 + 2 ** -8, 0x3f80], // halfway, even stays down
    [1 + 3 * 2 ** -8, 0x3f82], // halfway, odd goes up
    [new Float32Array(new Uint32Array([0x7f7fffff]).buffer)[0], 0x7f80], // f32 max rounds to inf
    [-0, 0x8000],
  ];
  assert.deepEqual([...encode16("BF16", bf16.map(([v]) => v))], bf16.map(([, b]) => b));
});

Deno.test("F16 encode matches a nearest-value search on random f32 inputs", () => {
  // Non-negative finite halves in increasing order; 65536 stands in for inf as the rounding boundary.
  const table = Float64Array.from(decode16("F16", Array.from({ length: 0x7c01 }, (_, i) => i)));
  table[0x7c00] = 65536;
  let seed = 12345;
  const rand = () => (seed = (seed * 16807) % 2147483647) / 2147483647;
  const xs = Float32Array.from({ length: 5000 }, () => (rand() - 0.5) * 2 ** Math.floor(rand() * 50 - 30));
  const got = encode16("F16", xs);
  let overflow = 0;
  xs.forEach((x, i) => {
    const a = Math.abs(x);
    // Binary search for the largest lo with table[lo] <= a.
    let lo = 0, hi = 0x7c00;
    while (hi - lo > 1) {
      const mid = (lo + hi) >> 1;
      if (table[mid] <= a) lo = mid;
      else hi = mid;
    }
    const dl = a - table[lo], dh = table[lo + 1] - a;
    const want = a >= 65536 ? 0x7c00 : dl < dh || (dl === dh && lo % 2 === 0) ? lo : lo + 1;
    if (want === 0x7c00) overflow++;
    assert.equal(got[i], want | (x < 0 ? 0x8000 : 0), `x=${x}`);
  });
  assert.ok(overflow > 0, "some inputs overflow to inf");
});

Deno.test("I64 decodes to int32 and rejects values out of range", () => {
  const values = [0n, -1n, 2147483647n, -2147483648n, 42n];
  const data = new Uint8Array(new BigInt64Array(values).buffer);
  const file = rawFile({ big: { dtype: "I64", shape: [5], data_offsets: [0, 40] } }, data);
  const t = parseSafetensors(file).tensors.get("big")!;
  assert.equal(t.dtype, "I64");
  assert.deepEqual(t.data, new Int32Array([0, -1, 2147483647, -2147483648, 42]));
  for (const bad of [2147483648n, -2147483649n, 2n ** 40n]) {
    const d = new Uint8Array(new BigInt64Array([1n, bad]).buffer);
    const f = rawFile({ big: { dtype: "I64", shape: [2], data_offsets: [0, 16] } }, d);
    assert.throws(
      () => parseSafetensors(f),
      new RegExp(`tensor "big": I64 value ${bad} at index 1 does not fit in int32`),
    );
  }
});

Deno.test("F64 and small integer dtypes decode", () => {
  const f64 = new Uint8Array(new Float64Array([0.1, -3]).buffer);
  const small = new Uint8Array([0xff, 0x01, 0xfe, 0xff, 0x01]); // U8 255, BOOL 1, I16 -2, I8 1
  const file = rawFile({
    d: { dtype: "F64", shape: [2], data_offsets: [0, 16] },
    u: { dtype: "U8", shape: [1], data_offsets: [16, 17] },
    b: { dtype: "BOOL", shape: [1], data_offsets: [17, 18] },
    h: { dtype: "I16", shape: [1], data_offsets: [18, 20] },
    c: { dtype: "I8", shape: [1], data_offsets: [20, 21] },
  }, new Uint8Array([...f64, ...small]));
  const t = parseSafetensors(file).tensors;
  assert.deepEqual(t.get("d")!.data, new Float32Array([0.1, -3]));
  assert.deepEqual(["u", "b", "h", "c"].map((k) => t.get(k)!.data[0]), [255, 1, -2, 1]);
});

Deno.test("reads the pscan_L1 fixture (H = X at L = 1)", async () => {
  const fromFile = await readSafetensorsFile(decodeURIComponent(FIXTURE.pathname));
  const fromBytes = parseSafetensors(await Deno.readFile(FIXTURE), "pscan_L1");
  assert.deepEqual(fromFile, fromBytes);
  const { header, tensors } = fromFile;
  assert.deepEqual([...tensors.keys()], ["A", "X", "H", "G", "dA", "dX"]);
  for (const t of tensors.values()) {
    assert.equal(t.dtype, "F32");
    assert.deepEqual(t.shape, [2, 1, 3, 4]);
    assert.equal(t.data.length, 24);
  }
  assert.match(JSON.parse(header.metadata.config).kind, /pscan/);
  const [A, X, H] = ["A", "X", "H"].map((k) => tensors.get(k)!.data);
  assert.ok(A.every((a) => a > 0 && a < 1));
  H.forEach((h, i) => assert.ok(Math.abs(h - (A[i] * 0 + X[i])) <= 1e-6, `H[${i}]`));
});

Deno.test("corrupt files give errors that name the problem", async () => {
  const good = await Deno.readFile(FIXTURE);
  const n = safetensorsHeaderLength(good);
  const withLength = (len: bigint) => {
    const f = good.slice();
    new DataView(f.buffer).setBigUint64(0, len, true);
    return f;
  };
  const parse = (f: Uint8Array) => () => parseSafetensors(f, "bad.safetensors");
  const f32 = (shape: number[], offs: number[]) => ({ dtype: "F32", shape, data_offsets: offs });

  assert.throws(
    parse(good.slice(0, good.length - 10)),
    /bad\.safetensors: tensor "dX".*past the end.*566 bytes/,
  );
  assert.throws(parse(withLength(5000n)), /header length 5000 exceeds the file size 1960/);
  assert.throws(
    parse(withLength(BigInt(MAX_HEADER_LENGTH) + 1n)),
    /100000001 exceeds the 100000000-byte bound/,
  );
  assert.throws(parse(withLength(2n ** 64n - 1n)), /18446744073709551615 exceeds the 100000000-byte bound/);
  assert.throws(parse(rawFile("{not json}")), /header is not valid UTF-8 JSON/);
  assert.throws(parse(rawFile(new Uint8Array([0x7b, 0x22, 0xff, 0x22, 0x7d]))), /not valid UTF-8 JSON/);
  assert.throws(parse(rawFile("")), /not valid UTF-8 JSON/);
  assert.throws(parse(rawFile("[1, 2]")), /header is not a JSON object/);
  assert.throws(parse(rawFile({ a: 5 })), /tensor "a" is not an object/);
  assert.throws(
    parse(rawFile({ a: { ...f32([1], [0, 4]), dtype: "F33" } })),
    /tensor "a": unknown dtype "F33"/,
  );
  assert.throws(
    parse(rawFile({ a: { shape: [1], data_offsets: [0, 4] } })),
    /"a": missing or non-string dtype/,
  );
  assert.throws(parse(rawFile({ a: f32([1.5], [0, 4]) })), /"a": shape must be an array of non-negative/);
  assert.throws(parse(rawFile({ a: f32([-1], [0, 4]) })), /"a": shape must be/);
  assert.throws(parse(rawFile({ a: { dtype: "F32", shape: [1] } })), /"a": data_offsets must be/);
  assert.throws(parse(rawFile({ a: f32([0], [4, 0]) })), /"a": data_offsets must be.*\[4,0\]/);
  assert.throws(
    parse(rawFile({ a: f32([2, 3], [0, 20]) }, new Uint8Array(20))),
    /tensor "a": shape \[2,3\] x F32 \(4 bytes\) needs 24 bytes, but data_offsets \[0, 20\] hold 20/,
  );
  assert.throws(
    parse(rawFile({ a: f32([4], [0, 16]) }, new Uint8Array(15))),
    /tensor "a": data_offsets \[0, 16\] go past the end of the data section \(15 bytes/,
  );
  assert.throws(
    parse(rawFile({ a: f32([4], [0, 16]), b: f32([4], [8, 24]) }, new Uint8Array(24))),
    /tensor "b" \[8, 24\] overlaps tensor "a", which ends at byte 16: tensors must tile/,
  );
  assert.throws(
    parse(
      rawFile({ big: f32([8], [0, 32]), a: f32([1], [4, 8]), b: f32([1], [40, 44]) }, new Uint8Array(44)),
    ),
    /tensor "a" \[4, 8\] overlaps tensor "big", which ends at byte 32/,
  );
  assert.throws(parse(rawFile({ __metadata__: { k: 1 } })), /__metadata__ value "k" is not a string/);
  assert.throws(parse(rawFile({ __metadata__: ["x"] })), /__metadata__ is not an object/);
  assert.throws(parse(new Uint8Array(5)), /bad\.safetensors: file is 5 bytes, shorter than the 8-byte/);
  assert.throws(() => parseSafetensorsHeader(good.subarray(0, 100), good.length, "p"), /p: need 1384 bytes/);
  assert.throws(() => safetensorsHeaderLength(good.subarray(0, 4)), /need at least 8 bytes/);
  assert.equal(n, 1376);
});

Deno.test("a parse error of a tensor's data names the source too", () => {
  const d = new Uint8Array(new BigInt64Array([2n ** 40n]).buffer);
  const f = rawFile({ big: { dtype: "I64", shape: [1], data_offsets: [0, 8] } }, d);
  assert.throws(
    () => parseSafetensors(f, "x.safetensors"),
    (e: Error) =>
      e instanceof SafetensorsError &&
      /^x\.safetensors: tensor "big": I64 value 1099511627776 at index 0 does not fit in int32$/.test(
        e.message,
      ),
  );
});

Deno.test("a key twice in the header (JSON.parse would keep the last) or a byte-order mark is refused", async () => {
  const data = new Uint8Array(new Float32Array([1, 2]).buffer);
  const a = '"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}';
  const a2 = '"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}';
  const cases: [string, RegExp][] = [
    [`{${a},${a2}}`, /^x: header has the key "a" twice \(corrupt header\)$/],
    [`{${a},${a}}`, /key "a" twice/], // even with equal values
    [`{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4],"shape":[1]}}`, /key "shape" in "a" twice/],
    [`{"__metadata__":{"k":"1","k":"2"},${a}}`, /key "k" in "__metadata__" twice/],
    [`{"__metadata__":{},${a},"__metadata__":{}}`, /key "__metadata__" twice/],
    [`{"a\\u0062":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"a\\\\b":{}, "ab": {}}`, /key "ab" twice/],
  ];
  for (const [header, re] of cases) {
    assert.throws(
      () => parseSafetensors(rawFile(header, data), "x"),
      (e: Error) => re.test(e.message),
      header,
    );
  }
  // Strings that hold braces, commas and quotes are not keys.
  const ok = `{"__metadata__":{"a":"{\\"a\\":1,","b":"a"},${a}}`;
  assert.deepEqual(parseSafetensors(rawFile(ok, data.subarray(0, 4))).header.metadata, {
    a: '{"a":1,',
    b: "a",
  });
  // A header nested a million deep (20 MB) took 4.8 s and 1.5 GB in JSON.parse; it is refused by a scan first.
  // Braces inside strings do not count, and 64 levels (in metadata, where any JSON text may sit) are fine.
  const deep = `{"a":${"[".repeat(1_000_000)}${"]".repeat(1_000_000)}}`;
  const t0 = performance.now();
  assert.throws(
    () => parseSafetensors(rawFile(deep, data), "x"),
    /^SafetensorsError: x: header nests deeper than 64 levels \(corrupt header\)$/,
  );
  assert.ok(performance.now() - t0 < 1000, `refused at once (${performance.now() - t0} ms)`);
  const at64 = `{"a":${"[".repeat(63)}${"]".repeat(63)}}`;
  assert.throws(() => parseSafetensors(rawFile(at64, data), "x"), /tensor "a" is not an object/);
  const quoted = `{"__metadata__":{"k":"${"[{".repeat(100)}"},${a}}`;
  assert.equal(parseSafetensors(rawFile(quoted, data.subarray(0, 4))).header.metadata.k, "[{".repeat(100));
  const bom = new Uint8Array([0xef, 0xbb, 0xbf, ...new TextEncoder().encode(`{${a}}`)]);
  assert.throws(
    () => parseSafetensors(rawFile(bom, data), "x"),
    (e: Error) => /^x: header is not valid UTF-8 JSON/.test(e.message),
  );
  const dir = await Deno.makeTempDir();
  try {
    await Deno.writeFile(`${dir}/d.safetensors`, rawFile(`{${a},${a2}}`, data));
    await assert.rejects(
      () => readSafetensorsFile(`${dir}/d.safetensors`),
      (e: Error) => e.message.startsWith(`${dir}/d.safetensors: header has the key "a" twice`),
    );
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("tensors must tile the data section, as the safetensors library requires; empty tensors anywhere in order", async () => {
  const data = new Uint8Array(new Float32Array([1, 2]).buffer);
  const tiled = {
    e2: { dtype: "F32", shape: [0], data_offsets: [0, 0] },
    a: { dtype: "F32", shape: [1], data_offsets: [0, 4] },
    e: { dtype: "F32", shape: [0, 3], data_offsets: [4, 4] },
    b: { dtype: "F32", shape: [1], data_offsets: [4, 8] },
  };
  const { tensors } = parseSafetensors(rawFile(tiled, data));
  assert.deepEqual([...tensors.keys()], ["e2", "a", "e", "b"], "ordered by offset");
  assert.deepEqual(tensors.get("b")!.data, new Float32Array([2]));
  assert.equal(tensors.get("e")!.data.length, 0);

  const refused = (header: object, bytes: Uint8Array<ArrayBuffer>, re: RegExp) =>
    assert.throws(
      () => parseSafetensors(rawFile(header, bytes), "x"),
      (e: Error) => re.test(e.message),
      re.source,
    );
  const f32 = (begin: number) => ({ dtype: "F32", shape: [1], data_offsets: [begin, begin + 4] });
  refused(
    { a: f32(0), b: f32(8) },
    new Uint8Array(12),
    /^x: tensor "b" \[8, 12\] leaves a gap after tensor "a", which ends at byte 4/,
  );
  refused(
    { b: f32(4) },
    new Uint8Array(8),
    /tensor "b" \[4, 8\] leaves a gap after the start of the data section/,
  );
  refused(
    { a: f32(0), mid: { dtype: "I32", shape: [0], data_offsets: [2, 2] } },
    data,
    /"mid" \[2, 2\] overlaps tensor "a"/,
  );
  refused({ a: f32(0) }, data, /^x: the tensors end at byte 4 of the data section, which holds 8 bytes/);
  refused({}, data, /the tensors end at byte 0 of the data section, which holds 8 bytes/);

  // A header length shortened into the header's padding would shift every tensor by the cut: refused.
  const good = serializeSafetensors({ a: { data: new Float32Array([1, 2, 3]), shape: [3] } });
  const n = Number(new DataView(good.buffer).getBigUint64(0, true));
  const cut = good.slice();
  const json = new TextDecoder().decode(good.subarray(8, 8 + n));
  assert.ok(json.endsWith(" "), "the writer pads its header with spaces (precondition)");
  new DataView(cut.buffer).setBigUint64(0, BigInt(n - 1), true);
  assert.throws(
    () => parseSafetensors(cut, "cut"),
    /cut: the tensors end at byte 12 of the data section, which holds 13 bytes/,
  );
  const dir = await Deno.makeTempDir();
  try {
    await Deno.writeFile(`${dir}/cut.safetensors`, cut);
    await assert.rejects(
      readSafetensorsFile(`${dir}/cut.safetensors`),
      /cut\.safetensors: the tensors end at byte 12/,
    );
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("readSafetensorsFile names the path in errors", async () => {
  const dir = await Deno.makeTempDir();
  try {
    const path = `${dir}/bad.safetensors`;
    await Deno.writeFile(
      path,
      rawFile({ a: { dtype: "F32", shape: [4], data_offsets: [0, 16] } }, new Uint8Array(8)),
    );
    await assert.rejects(readSafetensorsFile(path), new RegExp(`${path}: tensor "a".*past the end`));
    await Deno.writeFile(path, new Uint8Array(3));
    await assert.rejects(readSafetensorsFile(path), /bad\.safetensors: file is 3 bytes/);
    await Deno.writeFile(path, rawFile("{}", new Uint8Array(0), 99n));
    await assert.rejects(
      readSafetensorsFile(path),
      /bad\.safetensors: header length 99 exceeds the file size/,
    );
    await assert.rejects(
      readSafetensorsFile(`${dir}/missing.safetensors`),
      /cannot read .*missing\.safetensors/,
    );
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("atomic writes leave no temp files and keep old content on failure", async () => {
  const dir = await Deno.makeTempDir();
  const list = async (d: string) => (await Array.fromAsync(Deno.readDir(d))).map((e) => e.name).sort();
  try {
    // Missing directory: error names the path, nothing is created.
    const missing = `${dir}/nope/w.safetensors`;
    await assert.rejects(
      writeSafetensorsFile(missing, { a: { shape: [1], data: new Float32Array(1) } }),
      /cannot write .*\/nope\/w\.safetensors/,
    );
    assert.deepEqual(await list(dir), []);

    // Success: only the target exists and it reads back.
    const path = `${dir}/w.safetensors`;
    await writeSafetensorsFile(path, { a: { shape: [2], data: new Float32Array([1, 2]) } }, { v: "1" });
    assert.deepEqual(await list(dir), ["w.safetensors"]);
    const old = await Deno.readFile(path);
    assert.deepEqual((await readSafetensorsFile(path)).header.metadata, { v: "1" });

    // Invalid tensors: serialization throws before the disk is touched.
    await assert.rejects(
      writeSafetensorsFile(path, { a: { shape: [3], data: new Float32Array(2) } }),
      /cannot write .*w\.safetensors: .*tensor "a"/,
    );
    assert.deepEqual(await Deno.readFile(path), old);
    assert.deepEqual(await list(dir), ["w.safetensors"]);

    // Rename fails (target is a directory): the temp file is removed.
    await Deno.mkdir(`${dir}/sub`);
    await assert.rejects(writeFileAtomic(`${dir}/sub`, "x"), /cannot write .*\/sub:/);
    assert.deepEqual(await list(dir), ["sub", "w.safetensors"]);

    await writeFileAtomic(`${dir}/t.txt`, "hello");
    assert.equal(await Deno.readTextFile(`${dir}/t.txt`), "hello");

    // The disk fails after the bytes were written (injected: this runs as root too, which the read-only
    // case below cannot fail for): the old file stays, the temp file goes.
    const { syncData } = Deno.FsFile.prototype;
    Deno.FsFile.prototype.syncData = () => Promise.reject(new Error("injected disk error"));
    try {
      await assert.rejects(
        writeSafetensorsFile(path, { a: { shape: [1], data: new Float32Array([9]) } }),
        /cannot write .*w\.safetensors: injected disk error/,
      );
    } finally {
      Deno.FsFile.prototype.syncData = syncData;
    }
    assert.deepEqual(await Deno.readFile(path), old);
    assert.deepEqual(await list(dir), ["sub", "t.txt", "w.safetensors"]);

    // Read-only directory: the old file stays; root bypasses permissions, so probe and skip.
    await Deno.chmod(dir, 0o555);
    try {
      let writable = true;
      try {
        await Deno.writeTextFile(`${dir}/probe`, "");
        await Deno.remove(`${dir}/probe`);
      } catch {
        writable = false;
      }
      if (!writable) {
        await assert.rejects(
          writeSafetensorsFile(path, { a: { shape: [1], data: new Float32Array([9]) } }),
          /cannot write .*w\.safetensors/,
        );
        assert.deepEqual(await Deno.readFile(path), old);
        assert.deepEqual(await list(dir), ["sub", "t.txt", "w.safetensors"]);
      }
    } finally {
      await Deno.chmod(dir, 0o755);
    }
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test({
  name: "atomic writes keep an overwritten file's permission bits and fsync the directory after the rename",
  ignore: Deno.build.os === "windows",
  fn: async () => {
    const dir = await Deno.makeTempDir();
    const mode = async (p: string) => (await Deno.stat(p)).mode! & 0o777;
    try {
      const path = `${dir}/w.safetensors`;
      for (const bits of [0o600, 0o640, 0o755]) {
        await Deno.writeTextFile(path, "old");
        await Deno.chmod(path, bits);
        await writeSafetensorsFile(path, { a: { shape: [1], data: new Float32Array([1]) } });
        assert.equal(
          (await mode(path)).toString(8),
          bits.toString(8),
          `mode after overwriting a ${bits.toString(8)} file`,
        );
      }
      // A new file gets the default mode (0o666 less the umask), not one from an earlier file.
      const fresh = `${dir}/fresh.txt`;
      await writeFileAtomic(fresh, "x");
      const probe = `${dir}/probe.txt`;
      await Deno.writeTextFile(probe, "");
      assert.equal(await mode(fresh), await mode(probe));

      // The directory is opened and synced after the rename (so that the rename itself is durable).
      const events: string[] = [];
      const open = Deno.open;
      const spy = async (p: string | URL, o?: Deno.OpenOptions) => {
        const f = await open(p, o);
        if (String(p) === dir) {
          events.push(`open dir (target ${await Deno.readTextFile(`${dir}/t.txt`).catch(() => "missing")})`);
          const sync = f.sync.bind(f);
          f.sync = () => (events.push("sync dir"), sync());
        }
        return f;
      };
      (Deno as { open: typeof Deno.open }).open = spy;
      try {
        await writeFileAtomic(`${dir}/t.txt`, "renamed");
      } finally {
        (Deno as { open: typeof Deno.open }).open = open;
      }
      assert.deepEqual(events, ["open dir (target renamed)", "sync dir"]);
    } finally {
      await Deno.remove(dir, { recursive: true });
    }
  },
});

Deno.test("the writer lays tensors out as the Rust crate does: widest dtype first, then by name; each aligned", () => {
  const f = (n: number) => new Float32Array(n).map((_, i) => i + 0.5);
  const file = serializeSafetensors({
    odd: { shape: [3], data: f(3), dtype: "BF16" }, // 6 bytes: an F32 after it would start at byte 6
    z: { shape: [2], data: f(2) },
    h: { shape: [1], data: f(1), dtype: "F16" },
    i: { shape: [2], data: new Int32Array([7, -7]) },
    a: { shape: [3], data: f(3) },
  });
  const { header, tensors } = parseSafetensors(file, "order");
  const order = [...header.entries].map(([name, e]) => `${name}@${e.dataOffsets[0]}`);
  assert.deepEqual(order, ["a@0", "z@12", "i@20", "odd@28", "h@34"]);
  for (const [name, e] of header.entries) {
    assert.equal(
      e.dataOffsets[0] % ({ F32: 4, I32: 4, BF16: 2, F16: 2 } as Record<string, number>)[e.dtype],
      0,
    );
    assert.equal(header.dataStart % 8, 0, name);
  }
  // the header's keys follow the data (as the crate writes them), and the values come back exactly
  const json = new TextDecoder().decode(file.subarray(8, header.dataStart));
  assert.deepEqual(Object.keys(JSON.parse(json)), ["a", "z", "i", "odd", "h"]);
  assert.deepEqual([...tensors.get("a")!.data], [0.5, 1.5, 2.5]);
  assert.deepEqual([...tensors.get("odd")!.data], [0.5, 1.5, 2.5]);
  assert.deepEqual([...tensors.get("i")!.data], [7, -7]);
});

Deno.test("a shape or offset written as 1.0 or 1e0 is refused, as the Rust crate's 'expected usize'", () => {
  for (const bad of ["[2.0]", "[2e0]", "[2E+0]"]) {
    const text = `{"a":{"dtype":"F32","shape":${bad},"data_offsets":[0,8]}}`;
    assert.throws(
      () => parseSafetensors(rawFile(text, new Uint8Array(8)), "x"),
      /x: header has a number that is not an integer \((2\.0|2e0|2E\+0)\)/,
      bad,
    );
  }
  const offs = `{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8.0]}}`;
  assert.throws(() => parseSafetensors(rawFile(offs, new Uint8Array(8)), "x"), /not an integer \(8\.0\)/);
  // in a string (a name, metadata) the same text is no number
  const named = `{"__metadata__":{"v":"1.0e5"},"t 2.0e1":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}`;
  assert.deepEqual([...parseSafetensors(rawFile(named, new Uint8Array(8)), "x").tensors.keys()], ["t 2.0e1"]);
});
