/**
 * PyTorch checkpoints (`pytorch_model.bin`), as mamba.py's `from_pretrained` reads them from state-spaces'
 * repositories: files written by torch.save (PyTorch 1.13) and repacked by Python's zipfile
 * (`tests/fixtures/torch/make.py`) load to mamba.py's logits, in every dtype, with views, tied heads, both
 * pickle protocols; and every malformed file is refused with a message naming what is wrong, leaking nothing.
 * @module
 */

import assert from "node:assert/strict";
import { init } from "../core/device.ts";
import { memory } from "../core/memory.ts";
import { parseSafetensors, serializeSafetensors } from "../core/safetensors.ts";
import { MAX_PICKLE_VALUES, parseTorchPickle } from "../core/torch_pickle.ts";
import { bytesSource, crc32, TorchArchiveReader } from "../core/torch_zip.ts";
import { parseTorchCheckpoint } from "../core/torch_checkpoint.ts";
import { fromPretrained, fromPretrainedFiles } from "../mamba/pretrained.ts";
import { assertLmV64Logits, fixturePath } from "./fixture_util.ts";

const SS_CONFIG = fixturePath("lm_v64_state_spaces/config.json");
const bin = (name: string) => Deno.readFile(fixturePath(`torch/${name}`));
const load = async (bytes: Uint8Array<ArrayBuffer>, config?: Uint8Array<ArrayBuffer>, name = "ckpt") =>
  await fromPretrainedFiles({
    "config.json": config ?? await Deno.readFile(SS_CONFIG),
    "pytorch_model.bin": bytes,
  }, { name });

Deno.test("pytorch_model.bin written by torch.save loads to mamba.py's logits (lm_v64), from a folder and from files", async () => {
  await init();
  const dir = await Deno.makeTempDir();
  await Deno.copyFile(SS_CONFIG, `${dir}/config.json`);
  await Deno.copyFile(fixturePath("torch/lm_v64.bin"), `${dir}/pytorch_model.bin`);
  const lm = await fromPretrained(dir);
  assert.equal(lm.tied, false, "lm_v64's config: tie_embeddings false");
  await assertLmV64Logits(lm);
  lm.dispose();
  await Deno.remove(dir, { recursive: true });
  const fromFiles = await load(await bin("lm_v64.bin"));
  await assertLmV64Logits(fromFiles);
  fromFiles.dispose();
});

Deno.test("pytorch_model.bin: views (offsets into a shared storage, transposed, inside a larger storage) in an archive with ZIP64 data descriptors", async () => {
  await init();
  const lm = await load(await bin("lm_v64_views.bin"));
  await assertLmV64Logits(lm);
  lm.dispose();
});

Deno.test("pytorch_model.bin: F16, BF16 and F64 tensors load as f32 values rounded as stored (sizes in ZIP64 local headers)", async () => {
  await init();
  const lm = await load(await bin("lm_v64_mixed.bin"));
  const f32 = parseSafetensors(await Deno.readFile(fixturePath("lm_v64_state_spaces/model.safetensors")));
  const names = [...f32.tensors.keys()].sort(); // make.py: dtype by sorted name, F16, BF16, F64 in turn
  const sd = lm.stateDict();
  for (const [i, k] of names.entries()) {
    const dtype = (["F16", "BF16", "F32"] as const)[i % 3];
    const t = f32.tensors.get(k)!;
    // Our own writer rounds to nearest even, as torch's .half() and .bfloat16() do; F64 holds f32 exactly.
    const want =
      parseSafetensors(serializeSafetensors({ t: { shape: t.shape, data: t.data, dtype } })).tensors
        .get("t")!.data;
    const ours = k.replace(/^backbone\.embedding/, "embedding").replace(/^backbone\.norm_f/, "norm_f")
      .replace(/^backbone\./, "mamba.");
    assert.deepEqual(await sd.get(ours)!.toArray(), want, `${k} (${["F16", "BF16", "F64"][i % 3]})`);
  }
  lm.dispose();
});

Deno.test("pytorch_model.bin: a head saved as a view of the embedding ties them where the config says so (pickle protocols 2 and 4)", async () => {
  await init();
  const want = parseSafetensors(await bin("tiny_tied.safetensors")).tensors;
  const config = await bin("tiny_tied.json");
  for (const file of ["tiny_tied.bin", "tiny_tied_p4.bin"]) {
    const lm = await load(await bin(file), config);
    assert.equal(lm.tied, true, file);
    const sd = lm.stateDict();
    assert.equal(sd.has("lm_head.weight"), false, `${file}: one tensor for both`);
    assert.deepEqual(
      await sd.get("embedding.weight")!.toArray(),
      want.get("backbone.embedding.weight")!.data,
    );
    assert.deepEqual(
      await sd.get("mamba.layers.0.mixer.x_proj.weight")!.toArray(),
      want.get("backbone.layers.0.mixer.x_proj.weight")!.data,
    );
    lm.dispose();
  }
  // A config that unties them: two parameters, both the embedding's values.
  const untie = JSON.stringify({ ...JSON.parse(new TextDecoder().decode(config)), tie_embeddings: false });
  const lm = await load(await bin("tiny_tied.bin"), new TextEncoder().encode(untie));
  assert.equal(lm.tied, false);
  const sd = lm.stateDict();
  assert.deepEqual(await sd.get("lm_head.weight")!.toArray(), want.get("backbone.embedding.weight")!.data);
  lm.dispose();
});

Deno.test("parseTorchCheckpoint + loadStateDict: a tied MambaLM takes lm_head.weight as its embedding's other name, as mamba.py's from_pretrained feeds it", async () => {
  await init();
  const { MambaLM } = await import("../mamba/lm.ts");
  const { noGrad } = await import("../core/autograd.ts");
  const { tidy } = await import("../core/tensor.ts");
  // mamba.py's renaming of state-spaces' keys (backbone.embedding -> embedding, backbone -> mamba)
  const dict = new Map(
    [...await parseTorchCheckpoint(await bin("tiny_tied.bin"))].map(([k, v]) => [
      /^backbone\.(embedding|norm_f)\./.test(k)
        ? k.slice("backbone.".length)
        : k.replace(/^backbone\./, "mamba."),
      v,
    ]),
  );
  assert.equal(
    dict.get("lm_head.weight")!.data,
    dict.get("embedding.weight")!.data,
    "one array for both names",
  );
  const make = () =>
    new MambaLM({ dModel: 8, nLayers: 1, dState: 4, dtRank: 1 }, {
      vocabSize: 16,
      tieEmbeddings: true,
      paddingIdx: null,
    });
  const base = memory().liveBytes;
  const lm = make();
  assert.deepEqual(lm.loadStateDict(dict), { missingKeys: [], unexpectedKeys: [] }); // strict
  const ref = await load(await bin("tiny_tied.bin"), await bin("tiny_tied.json"));
  const logits = async (m: InstanceType<typeof MambaLM>) => {
    const t = tidy(() => noGrad(() => m.forward([[1, 5, 9, 3]])));
    const a = await t.toArray();
    t.dispose();
    return a;
  };
  assert.deepEqual(await logits(lm), await logits(ref), "fromPretrained's logits");
  // equal values in another array load too; a head that differs is refused, naming why
  const copy = new Map(dict);
  const emb = dict.get("embedding.weight")!;
  copy.set("lm_head.weight", { ...emb, data: emb.data.slice() });
  lm.loadStateDict(copy);
  const data = emb.data.slice();
  data[3] += 1;
  copy.set("lm_head.weight", { ...emb, data });
  assert.throws(
    () => lm.loadStateDict(copy),
    /lm_head.weight is not embedding.weight, but this model's head is its embedding/,
  );
  // alone, the head loads as the embedding
  const headOnly = new Map([["lm_head.weight", { shape: emb.shape, data }]]);
  lm.loadStateDict(headOnly, { strict: false });
  assert.deepEqual(await lm.embedding.weight.toArray(), data);
  for (const m of [lm, ref]) m.dispose();
  assert.equal(memory().liveBytes, base);
});

// --- Malformed files, made here: a protocol-2 pickle of tensors and a stored zip around it. ---

interface FakeTensor {
  name: string;
  storage?: string; // torch's storage class (default FloatStorage)
  key: string;
  numel: number;
  offset?: number;
  shape: number[];
  stride?: number[];
  stored?: number; // elements in its data/<key> record, where not numel
  meta?: Uint8Array; // a 7th argument to _rebuild_tensor_v2 (PyTorch 2.x's metadata dict)
}

const enc = new TextEncoder();
const cat = (...parts: (Uint8Array | number[])[]): Uint8Array<ArrayBuffer> => {
  const out = new Uint8Array(parts.reduce((a, p) => a + p.length, 0));
  let at = 0;
  for (const p of parts) out.set(p, (at += p.length) - p.length);
  return out;
};
const u32 = (n: number) => [n & 255, (n >> 8) & 255, (n >> 16) & 255, (n >>> 24) & 255];
const str = (s: string) => cat([0x58], u32(enc.encode(s).length), enc.encode(s)); // BINUNICODE
const int = (n: number) =>
  // BININT, or LONG1 past int32
  n < 2 ** 31 ? cat([0x4a], u32(n)) : cat([0x8a, 8], u32(n % 2 ** 32), u32(Math.floor(n / 2 ** 32)));
const tuple = (items: (Uint8Array | number[])[]) => cat([0x28], ...items, [0x74]); // MARK ... TUPLE
const global = (module: string, name: string) => cat([0x63], enc.encode(`${module}\n${name}\n`));

// data.pkl of an OrderedDict of the given tensors (as torch.save writes it, less the memo).
function statePickle(tensors: FakeTensor[], extra: Uint8Array[] = []): Uint8Array<ArrayBuffer> {
  const items = tensors.map((t) => {
    const stride = t.stride ?? t.shape.map((_, i) => t.shape.slice(i + 1).reduce((a, b) => a * b, 1));
    const pid = tuple([
      str("storage"),
      global("torch", t.storage ?? "FloatStorage"),
      str(t.key),
      str("cpu"),
      int(t.numel),
    ]);
    const args = tuple([
      cat(pid, [0x51]), // BINPERSID
      int(t.offset ?? 0),
      tuple(t.shape.map(int)),
      tuple(stride.map(int)),
      [0x89], // False
      cat(global("collections", "OrderedDict"), [0x29, 0x52]), // OrderedDict()
      ...(t.meta ? [t.meta] : []),
    ]);
    return cat(str(t.name), global("torch._utils", "_rebuild_tensor_v2"), args, [0x52]);
  });
  return cat([0x80, 2], global("collections", "OrderedDict"), [0x29, 0x52, 0x28], ...items, ...extra, [
    0x75,
    0x2e,
  ]);
}

// A stored zip of `records`, sizes in the local headers (as Python's zipfile writes to a file); `zip64`: the
// sizes 0xffffffff there and the real ones in a ZIP64 extra field, as writers do for records over 4 GiB;
// `descriptors`: sizes and CRC-32 in data descriptors after the data instead, as torch.save writes.
function storedZip(
  records: [string, Uint8Array][],
  options: { method?: number; zip64?: boolean; descriptors?: boolean } = {},
): Uint8Array<ArrayBuffer> {
  const parts: Uint8Array[] = [];
  for (const [name, data] of records) {
    const n = enc.encode(name);
    const d = options.descriptors;
    const size = d ? u32(0) : options.zip64 ? u32(0xffffffff) : u32(data.length);
    const extra = options.zip64 ? cat([1, 0, 16, 0], u32(data.length), u32(0), u32(data.length), u32(0)) : [];
    parts.push(cat(
      u32(0x04034b50),
      [20, 0, d ? 8 : 0, 0, options.method ?? 0, 0, 0, 0, 0, 0],
      d ? u32(0) : u32(crc32(data)),
      size,
      size,
      [n.length, 0, extra.length, 0],
      n,
      extra,
      data,
      d ? cat(u32(0x08074b50), u32(crc32(data)), u32(data.length), u32(data.length)) : [],
    ));
  }
  return cat(...parts, u32(0x06054b50), new Array(18).fill(0)); // an empty end record: never read
}

const lmV64Tensors = async (): Promise<FakeTensor[]> => {
  const f = parseSafetensors(await Deno.readFile(fixturePath("lm_v64_state_spaces/model.safetensors")));
  return [...f.tensors].map(([name, t], i) => ({
    name,
    key: String(i),
    numel: t.data.length,
    shape: t.shape,
  }));
};

// An archive of lm_v64's names and shapes with zero-filled storages (`values`: some F32 storages' by key);
// `edit` changes the tensors first.
async function fakeCheckpoint(
  edit: (ts: FakeTensor[]) => FakeTensor[] = (ts) => ts,
  options: {
    extra?: Uint8Array[];
    drop?: string;
    method?: number;
    zip64?: boolean;
    descriptors?: boolean;
    values?: Map<string, Float32Array>;
    records?: (rs: [string, Uint8Array][]) => [string, Uint8Array][]; // edits the records
  } = {},
): Promise<Uint8Array<ArrayBuffer>> {
  const ts = edit(await lmV64Tensors());
  const storages = new Map(ts.map((t) => [t.key, t]));
  const records: [string, Uint8Array][] = [["archive/data.pkl", statePickle(ts, options.extra)]];
  for (const [key, t] of storages) {
    const size = { LongStorage: 8, HalfStorage: 2 }[t.storage ?? ""] ?? 4;
    const values = options.values?.get(key);
    if (key !== options.drop) {
      records.push([
        `archive/data/${key}`,
        values ? new Uint8Array(values.buffer) : new Uint8Array((t.stored ?? t.numel) * size),
      ]);
    }
  }
  records.push(["archive/version", enc.encode("3\n")]);
  return storedZip(options.records?.(records) ?? records, options);
}

Deno.test("pytorch_model.bin made here: the test's own writer is read (so that the refusals below test what they say)", async () => {
  await init();
  for (const options of [{ zip64: false }, { zip64: true }, { descriptors: true }]) {
    const lm = await load(await fakeCheckpoint(undefined, options));
    assert.equal(lm.stateDict().size, 23, JSON.stringify(options));
    lm.dispose();
  }
  // torch.save names the archive's folder after the file: "data.pt" writes data/data.pkl, which the check for a
  // storage record (<prefix>/data/<key>) before data.pkl took for one
  const prefixed = (rs: [string, Uint8Array][]) =>
    rs.map(([name, bytes]) => [name.replace(/^archive\//, "data/"), bytes] as [string, Uint8Array]);
  const lm = await load(await fakeCheckpoint(undefined, { records: prefixed }));
  assert.equal(lm.stateDict().size, 23, "the prefix data/");
  lm.dispose();
});

Deno.test("pytorch_model.bin: malformed files are refused, naming what is wrong, and leak nothing", async () => {
  await init();
  const live = memory().liveBytes;
  const refuse = async (bytes: Uint8Array<ArrayBuffer>, re: RegExp, what: string) => {
    await assert.rejects(() => load(bytes), (e: Error) => {
      assert.match(e.message, re, `${what}: ${e.message}`);
      assert.match(e.message, /^ckpt/, `${what}: the message names the files`);
      return true;
    });
    assert.equal(memory().liveBytes, live, `${what}: nothing left on the GPU`);
  };
  const real = await bin("lm_v64.bin");
  await refuse(
    cat([0x80, 0x02, 0x8a, 0x0a, 0x6c, 0xfc, 0x9c, 0x46], new Uint8Array(64)),
    /format before PyTorch 1\.6 .* save it again/,
    "legacy torch.save",
  );
  // the same under pickle_protocol=4: a FRAME before the magic number
  await refuse(
    cat(
      [0x80, 0x04, 0x95, 0x0d, 0, 0, 0, 0, 0, 0, 0, 0x8a, 0x0a, 0x6c, 0xfc, 0x9c, 0x46],
      new Uint8Array(64),
    ),
    /format before PyTorch 1\.6 .* save it again/,
    "legacy torch.save, protocol 4",
  );
  await refuse(
    enc.encode("not a checkpoint at all"),
    /byte 0: expected a zip record.*not a PyTorch zip/,
    "not zip",
  );
  const version = new TextDecoder("latin1").decode(real).indexOf("archive/version") - 30; // its local header
  for (const cut of [10, 200, 2000, 50000, version - 10, version]) {
    await refuse(
      real.slice(0, cut),
      /ckpt\/pytorch_model\.bin.*(end|descriptor)/,
      `cut at ${cut} of ${real.length}`,
    );
  }
  // The central directory is not needed: a file cut inside it loads (every storage was there, sizes checked).
  const centralDirectory = new TextDecoder("latin1").decode(real).indexOf("PK\x01\x02");
  assert.ok(centralDirectory > version);
  const lm = await load(real.slice(0, centralDirectory + 10));
  lm.dispose();
  const flipped = real.slice();
  flipped[200] ^= 1; // inside data.pkl: its CRC no longer matches, so its end is not found
  await refuse(flipped, /data\.pkl.*no data descriptor matches its size and CRC-32/, "pickle corrupted");
  const mixed = await bin("lm_v64_mixed.bin");
  mixed[100] ^= 1; // inside data.pkl, whose size the local header gives
  await refuse(
    mixed,
    /record archive\/data\.pkl's CRC-32 does not match its data/,
    "pickle corrupted (local sizes)",
  );
  const evil = cat([0x80, 2], global("os", "system"), str("ls"), [0x85, 0x52, 0x2e]);
  await refuse(
    storedZip([["archive/data.pkl", evil]]),
    /byte 2 of the pickle: it refers to os\.system.*refused/,
    "os.system",
  );
  const fakeStorage = cat([0x80, 2], global("os", "FloatStorage"), [0x2e]);
  await refuse(
    storedZip([["archive/data.pkl", fakeStorage]]),
    /os\.FloatStorage.*refused/,
    "a storage type elsewhere",
  );
  const builtins = cat([0x80, 2], global("builtins", "eval"), [0x2e]);
  await refuse(storedZip([["archive/data.pkl", builtins]]), /builtins\.eval.*refused/, "eval");
  await refuse(
    storedZip([["archive/data.pkl", cat([0x80, 2, 0x7d, 0x28], str("step"), int(3), [0x75, 0x2e])]]),
    /'step' is a number, not a tensor/,
    "a number",
  );
  await refuse(
    storedZip([["archive/data.pkl", cat([0x80, 2, 0x7d, 0x28], str("model"), [0x7d, 0x75, 0x2e])]]),
    /'model' is a dict, not a tensor \(a training checkpoint\?/,
    "nested",
  );
  await refuse(
    storedZip([["archive/data.pkl", cat([0x80, 2, 0x5d, 0x2e])]]),
    /holds a list, not a state dict/,
    "list",
  );
  await refuse(
    storedZip([["archive/data.pkl", cat([0x80, 2, 0x7d, 0x28])]]),
    /ends inside an instruction/,
    "no STOP",
  );
  await refuse(
    storedZip([["archive/data.pkl", cat([0x80, 2, 0xff])]]),
    /byte 2 of the pickle: opcode 0xff/,
    "opcode",
  );
  await refuse(storedZip([["archive/version", enc.encode("3")]]), /has no data\.pkl/, "no data.pkl");
  await refuse(await fakeCheckpoint(undefined, { method: 8 }), /compressed \(method 8\)/, "deflated");
  await refuse(
    await fakeCheckpoint((ts) => ts.map((t, i) => i === 0 ? { ...t, offset: 1 } : t)),
    /reaches element \d+ of storage 0, which has \d+/,
    "past its storage",
  );
  await refuse(
    await fakeCheckpoint((ts) => ts.map((t, i) => i === 1 ? { ...t, storage: "LongStorage" } : t)),
    /tensor backbone\.layers\.0\.mixer\.D \(mamba\.layers\.0\.mixer\.D\) is I64 \[64\] in storage 1; expected a float dtype/,
    "int64",
  );
  await refuse(
    await fakeCheckpoint((ts) => ts.map((t, i) => i === 1 ? { ...t, shape: [32], numel: 32 } : t)),
    /mamba\.layers\.0\.mixer\.D: checkpoint \[32\] vs model \[64\]/,
    "shape",
  );
  await refuse(
    await fakeCheckpoint(undefined, { drop: "3" }),
    /ends without the storages 3 \(backbone\.layers\.0\.mixer\.conv1d\.weight\)/,
    "missing storage",
  );
  await refuse(
    await fakeCheckpoint((ts) => ts.map((t, i) => i === 2 ? { ...t, key: "1" } : t)),
    /storage 1 named as F32 x 4096 and as F32 x 64/,
    "one key, two sizes",
  );
  const big = await fakeCheckpoint();
  const at = new TextDecoder("latin1").decode(big).indexOf("archive/data/0") - 30;
  new DataView(big.buffer).setUint32(at + 18, 5, true); // the local header's compressed size
  await refuse(big, /record archive\/data\/0 has 5 bytes, but data\.pkl makes it 1024 x F32 = 4096/, "size");
  new DataView(big.buffer).setUint32(at + 18, 2 ** 31, true);
  await refuse(
    big,
    /record archive\/data\/0 claims 2147483648 bytes, past the end of the file \(\d+ left\)/,
    "size past the end",
  );
  // Sizes in descriptors: a storage's size is the pickle's until its end, checked against the file first (a
  // transposed view reads its storage whole: 2^40 elements were an allocation that failed with a RangeError).
  const lying = await fakeCheckpoint(
    (ts) =>
      ts.map((t, i) => i === 5 ? { ...t, numel: 2 ** 40, stored: t.numel, stride: [1, t.shape[0]] } : t),
    { descriptors: true },
  );
  const pastTheEnd =
    /record archive\/data\/5: data\.pkl makes it 1099511627776 x F32 = 4398046511104 bytes, past the end of the file \(\d+ left\)/;
  await refuse(lying, pastTheEnd, "storage past the end");
  await assert.rejects(() => parseTorchCheckpoint(lying, "ckpt"), pastTheEnd);
  const pkl = storedZip([["archive/data.pkl", new Uint8Array(100)]], { zip64: true });
  new DataView(pkl.buffer).setUint32(30 + 16 + 12, 2 ** 30, true); // the ZIP64 field's size of data.pkl
  await refuse(pkl, /record archive\/data\.pkl claims 1073741824 bytes, past the end/, "pickle past the end");
});

Deno.test("parseTorchPickle: memo, LONG1 and BINFLOAT values; the state dict's _metadata (BUILD) is not needed", () => {
  const pickle = cat(
    [0x80, 2],
    global("collections", "OrderedDict"),
    [0x71, 0, 0x29, 0x52, 0x28], // BINPUT 0, OrderedDict(), MARK
    str("w"),
    global("torch._utils", "_rebuild_tensor_v2"),
    tuple([
      cat(
        tuple([str("storage"), global("torch", "HalfStorage"), str("k"), str("cpu"), [0x8a, 2, 0x10, 0x27]]),
        [0x51],
      ),
      [0x4b, 7], // BININT1 7
      tuple([int(3), int(1000)]),
      tuple([int(1), int(3)]),
      [0x89],
      cat([0x68, 0, 0x29, 0x52]), // BINGET 0: OrderedDict again
    ]),
    [0x52, 0x75], // REDUCE, SETITEMS
    [0x7d, 0x28], // the state: {'_metadata': 1.5}
    str("_metadata"),
    [0x47, 0x3f, 0xf8, 0, 0, 0, 0, 0, 0],
    [0x75, 0x62, 0x2e], // SETITEMS, BUILD, STOP
  );
  const sd = parseTorchPickle(pickle, "p");
  assert.deepEqual(sd.tensors.get("w"), {
    storage: "k",
    dtype: "F16",
    shape: [3, 1000],
    strides: [1, 3],
    offset: 7,
  });
  assert.deepEqual(sd.storages.get("k"), { dtype: "F16", numel: 10000 });
});

Deno.test("parseTorchPickle: malformed pickles are refused with an Error naming the byte, never a TypeError or RangeError", () => {
  const refuse = (bytes: (Uint8Array | number[])[], re: RegExp, what: string) =>
    assert.throws(() => parseTorchPickle(cat(...bytes), "p"), (e: Error) => {
      assert.equal(e.constructor, Error, `${what}: ${e.constructor.name}: ${e.message}`);
      assert.match(e.message, re, what);
      return true;
    });
  refuse(
    [[0x80, 2, 0x58], u32(2), [0xc3, 0x28, 0x2e]],
    /^p: byte 2 of the pickle: a string that is not valid UTF-8/,
    "BINUNICODE",
  );
  refuse(
    [[0x80, 4, 0x8c, 1, 0xff, 0x2e]],
    /^p: byte 2 of the pickle: a string that is not valid UTF-8/,
    "SHORT_BINUNICODE",
  );
  // tensors of kinds not read are named as such (they had 'which a state dict of tensors does not need')
  refuse(
    [[0x80, 2], global("torch", "ComplexFloatStorage"), [0x2e]],
    /^p: byte 2 of the pickle: torch\.ComplexFloatStorage: a storage of an element type that is not read \(read: FloatStorage, /,
    "complex",
  );
  refuse(
    [[0x80, 2], global("torch._utils", "_rebuild_sparse_tensor"), [0x2e]],
    /^p: byte 2 of the pickle: torch\._utils\._rebuild_sparse_tensor: a kind of tensor that is not read/,
    "sparse",
  );
  // PyTorch 2.3+ saves dense tensors of types without a storage class (uint16, float8, ...) with v3
  refuse(
    [[0x80, 2], global("torch._utils", "_rebuild_tensor_v3"), [0x2e]],
    /^p: byte 2 of the pickle: torch\._utils\._rebuild_tensor_v3: a tensor of an element type without a storage class \(uint16, uint32, uint64, float8, \.\.\.: PyTorch 2\.3\+ saves those with it\), which is not read \(read: FloatStorage, /,
    "uint16",
  );
  // items that would be lost: OrderedDict's arguments, a dict's odd item out (SETITEMS, DICT)
  const od = global("collections", "OrderedDict");
  refuse(
    [[0x80, 2], od, tuple([[0x5d]]), [0x52, 0x2e]],
    /^p: byte 30 of the pickle: OrderedDict called with arguments$/,
    "OrderedDict([])",
  );
  refuse(
    [[0x80, 2, 0x7d, 0x28], str("a"), [0x4e], str("b"), [0x75, 0x2e]],
    /^p: byte 17 of the pickle: an odd number of items \(3\) for a dict/,
    "SETITEMS",
  );
  refuse(
    [[0x80, 2, 0x28], str("a"), [0x64, 0x2e]],
    /^p: byte 9 of the pickle: an odd number of items \(1\) for a dict/,
    "DICT",
  );
  // names of Object.prototype's properties are no storage types (`name in` took them for one)
  for (const name of ["constructor", "__proto__", "toString", "hasOwnProperty"]) {
    refuse(
      [[0x80, 2], global("torch", name), [0x2e]],
      new RegExp(`^p: byte 2 of the pickle: it refers to torch\\.${name}, which a state dict .* refused`),
      `torch.${name}`,
    );
  }
  // A pickle of opcodes that each make a value (a 32 MiB one of EMPTY_DICT exhausted memory) is refused at
  // the value past the bound, pushed or memoized.
  const over = new RegExp(
    `^p: byte ${2 + MAX_PICKLE_VALUES} of the pickle: it makes over ${MAX_PICKLE_VALUES} values`,
  );
  refuse([[0x80, 2], new Uint8Array(MAX_PICKLE_VALUES + 1).fill(0x28), [0x2e]], over, "MARKs");
  refuse([[0x80, 2, 0x7d], new Uint8Array(MAX_PICKLE_VALUES).fill(0x94), [0x2e]], over, "MEMOIZEs");
  // APPENDS of 300000 items (a list is refused as the top object, after it is built)
  refuse(
    [[0x80, 2, 0x5d, 0x28], new Uint8Array(300000).fill(0x4e), [0x65, 0x2e]],
    /holds a list, not a state dict/,
    "APPENDS",
  );
});

Deno.test("parseTorchCheckpoint refuses distinct views that share a storage far more often than a tied weight does (each is copied out); the same view under many names is decoded once", async () => {
  const views = (n: number) =>
    // distinct views: each starts one element further
    Array.from(
      { length: n },
      (_, i) => ({ name: `v${i}`, key: "0", numel: 1 << 20, offset: i, shape: [(1 << 20) - 128] }),
    );
  const file = (n: number) =>
    storedZip([["archive/data.pkl", statePickle(views(n))], ["archive/data/0", new Uint8Array(4 << 20)]]);
  assert.equal((await parseTorchCheckpoint(file(68), "ok.pt")).size, 68); // 68 x (2^20 - 128) <= 4 x 2^20 + 2^26
  await assert.rejects(
    () => parseTorchCheckpoint(file(69), "many.pt"),
    /many\.pt: its 69 distinct views would decode to 72342912 elements from the 1048576 that its storages hold/,
  );
  // The bound counts the storages the archive holds, not those the pickle claims: a storage it names but lacks,
  // claimed huge, would otherwise let repeated views (2^24 each, of a small storage) decode gigabytes first.
  const repeated = Array.from(
    { length: 20 },
    (_, i) => ({ name: `r${i}`, key: "0", numel: 1024, offset: i, shape: [1 << 24], stride: [0] }),
  );
  await assert.rejects(
    () =>
      parseTorchCheckpoint(
        storedZip([
          [
            "archive/data.pkl",
            statePickle([...repeated, { name: "z", key: "big", numel: 2 ** 40, shape: [0] }]),
          ],
          ["archive/data/0", new Uint8Array(4096)],
        ]),
        "claims.pt",
      ),
    /claims\.pt: its 21 distinct views would decode to 335544320 elements from the 1024 that its storages hold/,
  );
  // ... and a storage missing from the archive is named as such, not as views outnumbering what is held
  await assert.rejects(
    () =>
      parseTorchCheckpoint(
        storedZip([[
          "archive/data.pkl",
          statePickle([
            { name: "w", key: "1", numel: 2 ** 27, shape: [2 ** 27] },
            { name: "b", key: "0", numel: 4, shape: [4] },
          ]),
        ], ["archive/data/0", new Uint8Array(16)]]),
        "cut.bin",
      ),
    /cut\.bin: the archive ends without storage 1 \(of w\)/,
  );
  // The same view under many names (a module listed 200 times, as nn.ModuleList([layer] * 200) saves it):
  // one array for all, so no bound is reached.
  const same = Array.from(
    { length: 200 },
    (_, i) => ({ name: `m${i}`, key: "0", numel: 1 << 20, shape: [1 << 20] }),
  );
  const shared = await parseTorchCheckpoint(
    storedZip([["archive/data.pkl", statePickle(same)], ["archive/data/0", new Uint8Array(4 << 20)]]),
    "same.pt",
  );
  assert.equal(shared.size, 200);
  assert.equal(shared.get("m0")!.data, shared.get("m199")!.data, "one array");
});

Deno.test("TorchArchiveReader on a stream of unknown length (a body without Content-Length) reads every storage, never past the end", async () => {
  for (const file of ["lm_v64.bin", "lm_v64_views.bin", "lm_v64_mixed.bin"]) {
    const bytes = await bin(file);
    const src = bytesSource(bytes, file, -1); // a read past the end throws
    const archive = new TorchArchiveReader(src, file);
    const state = await archive.readStateDict();
    const seen: string[] = [];
    for (let rec; (rec = await archive.nextStorage(state));) {
      await archive.read(new Uint8Array(rec.bytes));
      seen.push(rec.key);
    }
    assert.deepEqual(seen.sort(), [...state.storages.keys()].sort(), file);
    assert.equal(state.tensors.size, 23);
  }
});

Deno.test("parseTorchCheckpoint decodes every tensor in memory: views as saved, dtypes as stored, integers to int32", async () => {
  const want =
    parseSafetensors(await Deno.readFile(fixturePath("lm_v64_state_spaces/model.safetensors"))).tensors;
  const views = await parseTorchCheckpoint(await bin("lm_v64_views.bin"));
  assert.deepEqual([...views.keys()].sort(), [...want.keys()].sort());
  for (const [k, t] of views) {
    assert.equal(t.dtype, "F32", k);
    assert.deepEqual(t.shape, want.get(k)!.shape, k);
    assert.deepEqual(t.data, want.get(k)!.data, k);
  }
  const mixed = await parseTorchCheckpoint(await bin("lm_v64_mixed.bin"));
  assert.deepEqual([...mixed.values()].map((t) => t.dtype).sort(), [
    ...new Array(8).fill("BF16"),
    ...new Array(8).fill("F16"),
    ...new Array(7).fill("F64"),
  ]);
  const ints = await parseTorchCheckpoint(
    storedZip([
      [
        "archive/data.pkl",
        statePickle([{ name: "step", storage: "LongStorage", key: "0", numel: 2, shape: [2] }]),
      ],
      [
        "archive/data/0",
        new Uint8Array([7, 0, 0, 0, 0, 0, 0, 0, 0xfe, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff]),
      ],
    ]),
  );
  assert.deepEqual(ints.get("step"), { dtype: "I64", shape: [2], data: new Int32Array([7, -2]) });
  await assert.rejects(
    () =>
      parseTorchCheckpoint(
        storedZip([
          [
            "archive/data.pkl",
            statePickle([{ name: "n", storage: "LongStorage", key: "0", numel: 1, shape: [] }]),
          ],
          ["archive/data/0", new Uint8Array([0, 0, 0, 0, 1, 0, 0, 0])],
        ]),
        "big.pt",
      ),
    /big\.pt: tensor "n": I64 value 4294967296 at index 0 does not fit in int32$/,
  );
  // int64 is converted per view, as torch.load keeps it: a value past int32 that no tensor views is no error,
  // and one that a view holds is named by that view and its own index (it was the storage's, and its first viewer)
  const longs = (ts: Omit<FakeTensor, "key" | "numel">[], values: bigint[]) =>
    storedZip([
      [
        "archive/data.pkl",
        statePickle(ts.map((t) => ({ ...t, storage: "LongStorage", key: "0", numel: 4 }))),
      ],
      ["archive/data/0", new Uint8Array(new BigInt64Array(values).buffer)],
    ]);
  assert.deepEqual(
    (await parseTorchCheckpoint(longs([{ name: "a", offset: 1, shape: [3] }], [2n ** 40n, 5n, -6n, 7n]))).get(
      "a",
    ),
    { dtype: "I64", shape: [3], data: new Int32Array([5, -6, 7]) },
  );
  await assert.rejects(
    () =>
      parseTorchCheckpoint(
        longs([{ name: "a", shape: [2] }, { name: "b", offset: 1, shape: [3] }], [5n, 6n, 7n, -(2n ** 40n)]),
        "big.pt",
      ),
    /big\.pt: tensor "b": I64 value -1099511627776 at index 2 does not fit in int32$/,
  );
  // a file cut short is named too, as the file sources of fromPretrained name theirs
  await assert.rejects(
    async () => parseTorchCheckpoint((await bin("lm_v64.bin")).slice(0, 10), "cut.pt"),
    /^Error: cut\.pt: unexpected end of file at byte 10 \(wanted \d+ more\)$/,
  );
  // expand(): a zero stride repeats the storage's elements, which are copied out, up to 2^24 of them.
  const expanded = (shape: number[]) =>
    storedZip([
      ["archive/data.pkl", statePickle([{ name: "e", key: "0", numel: 2, shape, stride: [0, 1] }])],
      ["archive/data/0", new Uint8Array(new Float32Array([1.5, -2]).buffer)],
    ]);
  assert.deepEqual((await parseTorchCheckpoint(expanded([3, 2]))).get("e"), {
    dtype: "F32",
    shape: [3, 2],
    data: new Float32Array([1.5, -2, 1.5, -2, 1.5, -2]),
  });
  await assert.rejects(
    () => parseTorchCheckpoint(expanded([2 ** 30, 2]), "wide.pt"),
    /wide\.pt: tensor e of size \(1073741824, 2\), stride \(0, 1\) repeats the 2 elements of storage 0 as 2147483648: such views are decoded up to 2\^24 elements/,
  );
});

Deno.test("parseTorchCheckpoint: every kind of state dict decodes to torch.load's values (torch.save of PyTorch 1.13, pickle protocols 2 and 5; PyTorch 2.x's layout, with and without CRC-32s)", async () => {
  for (
    const [file, values] of [
      ["kinds.bin", "kinds.safetensors"], // buffers, Parameters, views, 0-d and empty, every dtype, LONG_BINPUT
      ["kinds_p5.bin", "kinds.safetensors"],
      ["torch2.bin", "torch2.safetensors"], // metadata (7th argument), _rebuild_parameter_with_state, 'FB' padding
      ["torch2_nocrc.bin", "torch2.safetensors"], // torch.serialization.set_crc32_options(False): CRC-32s 0
    ]
  ) {
    const want = parseSafetensors(await bin(values)).tensors; // make.py: torch.load's values as F32 or I32
    const got = await parseTorchCheckpoint(await bin(file), file);
    assert.deepEqual([...got.keys()].sort(), [...want.keys()].sort(), file);
    for (const [k, t] of got) {
      assert.deepEqual(t.shape, want.get(k)!.shape, `${file}: ${k}`);
      assert.deepEqual(t.data, want.get(k)!.data, `${file}: ${k} (${t.dtype})`);
    }
  }
});

// PyTorch 2.x's metadata dict (the 7th argument of _rebuild_tensor_v2) of the given bits.
const metadata = (...bits: [string, boolean][]) =>
  cat([0x7d, 0x28], ...bits.flatMap(([k, v]) => [str(k), [v ? 0x88 : 0x89]]), [0x75]);

Deno.test("parseTorchCheckpoint applies a tensor's metadata as torch.load does: the neg bit negates its values, conj is the identity on real ones; any other bit is refused, naming the tensor", async () => {
  const file = (ts: FakeTensor[]) =>
    storedZip([
      ["archive/data.pkl", statePickle(ts)],
      ["archive/data/0", new Uint8Array(new Float32Array([1, -2, 3, 4]).buffer)],
    ]);
  const got = await parseTorchCheckpoint(file([
    { name: "neg", key: "0", numel: 4, shape: [4], meta: metadata(["neg", true]) },
    { name: "plain", key: "0", numel: 4, shape: [4] },
    {
      name: "negT",
      key: "0",
      numel: 4,
      shape: [2, 2],
      stride: [1, 2],
      meta: metadata(["neg", true], ["conj", false]),
    },
    { name: "conj", key: "0", numel: 4, shape: [4], meta: metadata(["conj", true]) },
    { name: "unset", key: "0", numel: 4, shape: [4], meta: metadata(["neg", false]) },
  ]));
  assert.deepEqual(got.get("neg")!.data, new Float32Array([-1, 2, -3, -4]));
  assert.deepEqual(got.get("negT")!.data, new Float32Array([-1, -3, 2, -4]));
  for (const k of ["plain", "conj", "unset"]) {
    assert.deepEqual(got.get(k)!.data, new Float32Array([1, -2, 3, 4]), k);
  }
  await assert.rejects(
    () =>
      parseTorchCheckpoint(
        file([{ name: "w", key: "0", numel: 4, shape: [4], meta: metadata(["sparse", true]) }]),
        "m.pt",
      ),
    /^Error: m\.pt: archive\/data\.pkl: tensor 'w': byte \d+ of the pickle: its metadata sets sparse \(on F32\), which is not applied/,
  );
  await assert.rejects(
    () =>
      parseTorchCheckpoint(
        file([{
          name: "n",
          storage: "IntStorage",
          key: "0",
          numel: 4,
          shape: [4],
          meta: metadata(["neg", true]),
        }]),
        "m.pt",
      ),
    /m\.pt: archive\/data\.pkl: tensor 'n': byte \d+ of the pickle: its metadata sets neg \(on I32\), which is not applied/,
  );
});

Deno.test("pytorch_model.bin: tensors saved with the neg bit load negated, streamed (contiguous) and gathered (transposed)", async () => {
  await init();
  const ts = await lmV64Tensors();
  const [d, x] = [ts[1], ts[5]]; // backbone.layers.0.mixer.D [64], x_proj.weight [a, b] saved transposed
  const [a, b] = x.shape;
  const iota = (n: number) => Float32Array.from({ length: n }, (_, i) => i + 1);
  const bytes = await fakeCheckpoint(
    (ts) =>
      ts.map((t) =>
        t.name === d.name || t.name === x.name
          ? { ...t, meta: metadata(["neg", true]), stride: t.name === d.name ? [1] : [1, a] }
          : t
      ),
    { values: new Map([[d.key, iota(d.numel)], [x.key, iota(x.numel)]]) },
  );
  const lm = await load(bytes);
  const sd = lm.stateDict();
  assert.deepEqual(await sd.get("mamba.layers.0.mixer.D")!.toArray(), iota(d.numel).map((v) => -v));
  const want = new Float32Array(a * b).map((_, k) => -(1 + Math.floor(k / b) + a * (k % b)));
  assert.deepEqual(await sd.get("mamba.layers.0.mixer.x_proj.weight")!.toArray(), want);
  lm.dispose();
});

Deno.test("Torch archives: a byteorder record is checked wherever it is; a storage before data.pkl and a record twice are refused, naming them, by both loaders", async () => {
  await init();
  const pkl = statePickle([{ name: "w", key: "0", numel: 1, shape: [1] }]);
  const one = new Uint8Array(new Float32Array([1]).buffer);
  const read = async (records: [string, Uint8Array][]) =>
    (await parseTorchCheckpoint(storedZip(records), "o.pt")).get("w")!.data;
  // PyTorch 2.x puts byteorder after data.pkl (at 30 + 16 + its size); a zip of sorted names, before it
  for (const order of ["little", "big"]) {
    for (const before of [true, false]) {
      const records: [string, Uint8Array][] = [["archive/data.pkl", pkl], ["archive/data/0", one]];
      records.splice(before ? 0 : 1, 0, ["archive/byteorder", enc.encode(order)]);
      if (order === "little") assert.deepEqual(await read(records), new Float32Array([1]));
      else {
        await assert.rejects(
          () => read(records),
          new RegExp(
            `^Error: o\\.pt: byte ${
              before ? 0 : 46 + pkl.length
            }: the storages are big-endian; only little-endian`,
          ),
        );
      }
    }
  }
  await assert.rejects(
    () => read([["archive/data/0", one], ["archive/data.pkl", pkl]]),
    /^Error: o\.pt: byte 0: record archive\/data\/0, a storage, comes before data\.pkl: this reader needs data\.pkl first, as torch\.save writes it \(load the file in PyTorch and save it again with torch\.save\)/,
  );
  // the same name twice: a storage (torch.load took the last copy, the streaming loader the first), data.pkl
  const live = memory().liveBytes;
  for (const name of ["archive/data/1", "archive/data.pkl"]) {
    const bytes = await fakeCheckpoint(undefined, {
      records: (rs) => [...rs, rs.find(([n]) => n === name)!],
    });
    const text = new TextDecoder("latin1").decode(bytes);
    const [first, second] = [text.indexOf(name) - 30, text.lastIndexOf(name) - 30];
    const twice = new RegExp(
      `byte ${second}: record ${
        name.replaceAll(".", "\\.")
      } is in the archive twice \\(at bytes ${first} and ${second}\\)`,
    );
    await assert.rejects(() => parseTorchCheckpoint(bytes, "o.pt"), twice);
    await assert.rejects(() => load(bytes), twice);
  }
  assert.equal(memory().liveBytes, live);
});

// The search is linear in what follows (measured: 8 MiB in 56 ms; quadratic, it took 48 s): no timing here, as
// timings belong in bench/, but a regression would show as this test's minute.
Deno.test("parseTorchCheckpoint: a pickle whose data descriptor is bad is refused after searching the 8 MiB that follow", async () => {
  const bytes = await bin("lm_v64.bin");
  bytes[new TextDecoder("latin1").decode(bytes).indexOf("PK\x07\x08") + 4] ^= 1; // data.pkl's CRC-32
  await assert.rejects(
    () => parseTorchCheckpoint(cat(bytes, new Uint8Array(8 << 20)), "bad.pt"),
    /bad\.pt: byte 0: record archive\/data\.pkl: no data descriptor matches its size and CRC-32/,
  );
});

Deno.test("parseTorchCheckpoint: the search for data.pkl's end is linear: 2 MiB of descriptor-like bytes, each with a wrong CRC-32, are refused", async () => {
  // data.pkl sized by a descriptor (flag 8), then 16-byte records that look like its descriptor at every
  // offset (signature, sizes equal to the offset) but carry a CRC-32 of 1: one CRC from the start per
  // candidate took about an hour at this size
  const name = enc.encode("archive/data.pkl");
  const head = cat(u32(0x04034b50), [20, 0, 8, 0, 0, 0, 0, 0, 0, 0], u32(0), u32(0), u32(0), [
    name.length,
    0,
    0,
    0,
  ], name);
  const body = new Uint8Array(2 << 20);
  const v = new DataView(body.buffer);
  for (let p = 0; p < body.length; p += 16) {
    v.setUint32(p, 0x08074b50, true);
    v.setUint32(p + 4, 1, true);
    v.setUint32(p + 8, p, true);
    v.setUint32(p + 12, p, true);
  }
  await assert.rejects(
    () => parseTorchCheckpoint(cat(head, body), "fake.pt"),
    /fake\.pt: byte 0: record archive\/data\.pkl: no data descriptor matches its size and CRC-32/,
  );
  // the CRC-32 carried over parts is the CRC-32 of the whole
  const bytes = crypto.getRandomValues(new Uint8Array(1000));
  assert.equal(crc32(bytes.subarray(300), crc32(bytes.subarray(0, 300))), crc32(bytes));
});

Deno.test("parseTorchCheckpoint: a seeded corruption fuzz (bit flips, bytes set, cuts, insertions, deletions) gives a value or an Error naming the file, never a crash or garbage from a damaged structure", async () => {
  const files = [
    "tiny_tied.bin",
    "tiny_tied_p4.bin",
    "lm_v64_views.bin",
    "lm_v64_mixed.bin",
    "kinds.bin",
    "torch2_nocrc.bin",
  ];
  const originals = await Promise.all(files.map((f) => bin(f)));
  const decoded = await Promise.all(originals.map((b) => parseTorchCheckpoint(b)));
  // The storages' bytes, which no CRC-32 covers: what is read from elsewhere is checked or must not matter.
  const storageBytes = await Promise.all(originals.map(async (bytes) => {
    let pos = 0;
    const archive = new TorchArchiveReader({
      size: bytes.length,
      readExact: (buf: Uint8Array) =>
        Promise.resolve(void (buf.set(bytes.subarray(pos, pos + buf.length)), pos += buf.length)),
      skip: (n: number) => Promise.resolve(void (pos += n)),
    }, "f");
    const state = await archive.readStateDict();
    const ranges: [number, number][] = [];
    for (let rec; (rec = await archive.nextStorage(state));) {
      ranges.push([rec.at, rec.at + rec.bytes]);
      await archive.skip(rec.bytes);
    }
    return ranges;
  }));
  let seed = 7;
  const rand = (n: number) => (seed = (Math.imul(seed, 1664525) + 1013904223) >>> 0) % n;
  const outcomes = { refused: 0, read: 0, readIntact: 0 };
  for (let c = 0; c < 3000; c++) {
    const f = rand(files.length);
    let b = originals[f].slice();
    // half the damage in the first 1.5 KB (headers, data.pkl), a third of the rest near a zip signature
    const pk = () => {
      const i = b.indexOf(0x50, rand(b.length));
      return i < 0 || i + 40 >= b.length ? rand(b.length) : i + rand(40);
    };
    const at = () => (rand(2) ? rand(Math.min(b.length, 1500)) : rand(3) ? pk() : rand(b.length));
    const kind = rand(5);
    const touched: number[] = [];
    if (kind === 0) {
      for (let k = rand(3); k >= 0; k--) touched.push(at()), b[touched.at(-1)!] ^= 1 << rand(8);
    } else if (kind === 1) touched.push(at()), b[touched.at(-1)!] = [0, 0xff, 0x7f, 0x80][rand(4)];
    else if (kind === 2) b = b.slice(0, rand(b.length));
    else if (kind === 3) {
      const i = at();
      b = cat(b.subarray(0, i), new Uint8Array(1 + rand(4)).map(() => rand(256)), b.subarray(i));
    } else {
      const n = 1 + rand(4);
      const i = Math.min(at(), b.length - n);
      b = cat(b.subarray(0, i), b.subarray(i + n));
    }
    const what = `${files[f]}, case ${c} (kind ${kind}, bytes ${touched})`;
    let got;
    try {
      got = await parseTorchCheckpoint(b, "F");
    } catch (e) {
      assert.equal(
        (e as Error).constructor,
        Error,
        `${what}: ${(e as Error).constructor.name} ${(e as Error).message}`,
      );
      assert.match((e as Error).message, /^F: /, what);
      outcomes.refused++;
      continue;
    }
    outcomes.read++;
    const inStorage = (i: number) => storageBytes[f].some(([s, e]) => i >= s && i < e);
    // (torch2_nocrc.bin: its pickle has no CRC-32, so a damaged name reads as another name, as in torch.load)
    if (touched.length && !touched.some(inStorage) && files[f] !== "torch2_nocrc.bin") {
      const want = decoded[f];
      outcomes.readIntact++;
      assert.deepEqual([...got.keys()], [...want.keys()], what);
      for (const [k, t] of got) assert.deepEqual(t, want.get(k), `${what}: ${k}`);
    }
  }
  assert.ok(outcomes.refused > 1500 && outcomes.readIntact > 50, JSON.stringify(outcomes));
});

Deno.test("pytorch_model.bin over a body of unknown length (chunked): a storage the pickle makes huge behind a transposed view is not allocated, and views spread far wider than they hold are refused", async () => {
  await init();
  const live = memory().liveBytes;
  let body = new Uint8Array(0);
  const ac = new AbortController();
  const server = Deno.serve(
    { hostname: "127.0.0.1", port: 0, signal: ac.signal, onListen() {} },
    async (req) => {
      const file = new URL(req.url).pathname.slice(1);
      if (file === "config.json") return new Response(await Deno.readFile(SS_CONFIG));
      if (file !== "pytorch_model.bin") return new Response("no", { status: 404 });
      const data = body;
      // no Content-Length: the body is chunked, so its size is unknown until it ends
      return new Response(new ReadableStream({ start: (c) => (c.enqueue(data.slice()), c.close()) }));
    },
  );
  const url = `http://127.0.0.1:${server.addr.port}`;
  try {
    // x_proj (34, 64) saved transposed (stride (1, 34)) in a storage the pickle says holds 2^40 elements: only
    // the view's span is read, and the body's end comes while skipping the rest.
    body = await fakeCheckpoint(
      (ts) => ts.map((t, i) => i === 5 ? { ...t, numel: 2 ** 40, stored: t.numel, stride: [1, 34] } : t),
      { descriptors: true },
    );
    await assert.rejects(() => fromPretrained(url), (e: Error) => {
      assert.match(e.message, /backbone\.layers\.0\.mixer\.x_proj\.weight.*the body ended at byte \d+/);
      return true;
    });
    // The same view with strides that spread its 2176 elements over 66 M of the storage: refused before a read.
    body = await fakeCheckpoint(
      (ts) => ts.map((t, i) => i === 5 ? { ...t, numel: 2 ** 27, stored: t.numel, stride: [1, 2 ** 20] } : t),
      { descriptors: true },
    );
    await assert.rejects(
      () => fromPretrained(url),
      /its views spread 2176 elements over 66060322 of the storage; at most 4 x 2176 \+ 2\^24 are read/,
    );
    assert.equal(memory().liveBytes, live);
  } finally {
    ac.abort();
    await server.finished;
  }
});
