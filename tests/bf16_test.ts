/**
 * bf16 storage (core/bf16.ts): the rounding of `bf16Bits` and the GPU cast against known bits; tensors that
 * read back as the rounded values; matmul's second operand and the embedding's table read through the
 * unpacking accessors, bit for bit the f32 kernels on the rounded values (every matmul variant, the matvec
 * plan a GPU takes, windows of a shrunk binding); and bf16 refused everywhere else.
 * @module
 */

import assert from "node:assert/strict";
import { bf16Bits, packBF16, unpackBF16 } from "../core/bf16.ts";
import { arange, tensor, zeros } from "../core/creation.ts";
import { deviceInfo, init } from "../core/device.ts";
import { memory } from "../core/memory.ts";
import { add, castToBF16, copy, copyBox, embedding, matmul, matmulAdd, packInto } from "../core/ops/index.ts";
import {
  availableMatmulVariants,
  matmulVariant,
  rmsNormMatmul,
  setMatmulVariant,
} from "../core/ops/matmul.ts";
import { Philox } from "../core/random.ts";
import { dispose, type Tensor } from "../core/tensor.ts";

/** Values that round every way, specials included. */
function values(n: number, seed: number): Float32Array {
  const r = new Philox(seed);
  const v = Float32Array.from({ length: n }, () => (r.nextU32() / 2 ** 32 - 0.5) * 6);
  const specials = [
    0,
    -0,
    1,
    -1,
    1 + 2 ** -8,
    1 + 3 * 2 ** -8,
    65504,
    3e38,
    1e-40,
    -1e-40,
    Infinity,
    -Infinity,
  ];
  specials.forEach((x, i) => (v[i] = x));
  return v;
}

const bits = (a: ArrayLike<number>) => new Uint32Array(Float32Array.from(a).buffer);

Deno.test("bf16Bits rounds to nearest even (ties to even, NaN stays NaN, overflow to infinity)", () => {
  assert.equal(bf16Bits(1), 0x3f80);
  assert.equal(bf16Bits(1 + 2 ** -8), 0x3f80, "a tie goes to the even neighbour");
  assert.equal(bf16Bits(1 + 3 * 2 ** -8), 0x3f82, "this tie to the upper one");
  assert.equal(bf16Bits(1 + 2 ** -8 + 2 ** -20), 0x3f81, "above the tie: up");
  assert.equal(bf16Bits(-0), 0x8000);
  assert.equal(bf16Bits(Infinity), 0x7f80);
  assert.equal(bf16Bits(3.4e38), 0x7f80, "past bf16's largest: infinity");
  assert.ok((bf16Bits(NaN) & 0x7fff) > 0x7f80, "NaN");
  const v = values(101, 1);
  const back = unpackBF16(packBF16(v), v.length);
  v.forEach((x, i) => assert.equal(bits([back[i]])[0], (bf16Bits(x) << 16) >>> 0, `value ${i} (${x})`));
});

Deno.test("castToBF16 and tensor({ dtype: bf16 }) hold bf16Bits' values; zeros and full too", async () => {
  await init();
  const base = memory().liveBytes;
  const v = values(1001, 2); // odd: the last word's upper half is 0
  const want = unpackBF16(packBF16(v), v.length);
  const x = tensor(v, [7, 143]);
  const cast = castToBF16(x);
  const direct = tensor(v, [7, 143], { dtype: "bf16" });
  assert.equal(cast.storage.size, direct.storage.size);
  assert.equal(direct.storage.bytes, 4 * 501, "two values per word");
  assert.deepEqual(bits(await cast.toArray()), bits(want), "GPU cast");
  assert.deepEqual(bits(await direct.toArray()), bits(want), "host pack");
  const zero = zeros([3], { dtype: "bf16" });
  assert.deepEqual([...await zero.toArray()], [0, 0, 0]);
  const full = tensor(new Float32Array(5).fill(0.1), [5], { dtype: "bf16" });
  assert.deepEqual(
    bits(await full.toArray()),
    bits(new Float32Array(5).fill(unpackBF16(packBF16([0.1]), 1)[0])),
  );
  // arange in bf16: the f32 values rounded (an i32 host array truncated them to integers)
  const steps = arange(0.5, 3, 0.25, { dtype: "bf16" });
  assert.deepEqual([...await steps.toArray()], [0.5, 0.75, 1, 1.25, 1.5, 1.75, 2, 2.25, 2.5, 2.75]);
  dispose([x, cast, direct, zero, full, steps]);
  assert.equal(memory().liveBytes, base);
});

Deno.test("copy of a bf16 tensor copies its words (two values each), not four bytes a value", async () => {
  await init();
  const base = memory().liveBytes;
  // 4099 values: 8200 bytes in a buffer of 8448, where 4 bytes a value overran it (the GPU rejected the
  // submission: the next readback threw)
  const v = values(4099, 5);
  const w = tensor(v, [4099], { dtype: "bf16" });
  const c = copy(w);
  assert.equal(c.dtype, "bf16");
  assert.deepEqual(bits(await c.toArray()), bits(unpackBF16(packBF16(v), v.length)));
  dispose([w, c]);
  assert.equal(memory().liveBytes, base);
});

/** matmul and embedding with a bf16 weight against the f32 kernels on its rounded values, bit for bit. */
async function assertWeightReads(what: string): Promise<void> {
  for (const [M, K, N] of [[1, 64, 24], [3, 64, 10], [5, 37, 9], [70, 128, 66]]) {
    const x = tensor(values(M * K, M + K), [M, K]);
    const w = values(N * K, 7 * N);
    const wb = tensor(w, [N, K], { dtype: "bf16" });
    const wr = tensor(unpackBF16(packBF16(w), w.length), [N, K]);
    const g = tensor(values(K, 3), [K]);
    const c = tensor(values(M * N, 9), [M, N]);
    const [wbKN, wrKN] = [tensor(w, [K, N], { dtype: "bf16" }), wr.reshape(K, N)]; // the same values as (K, N)
    const pairs: [string, Tensor, Tensor][] = [
      ["matmul", matmul(x, wb, { transB: true }), matmul(x, wr, { transB: true })],
      ["matmul, b not transposed", matmul(x, wbKN), matmul(x, wrKN)],
      ["matmulAdd", matmulAdd(x, wb, c, { transB: true }), matmulAdd(x, wr, c, { transB: true })],
      ["rmsNormMatmul", rmsNormMatmul(x, g, 1e-5, wb), rmsNormMatmul(x, g, 1e-5, wr)],
    ];
    const ids = tensor(Int32Array.from([0, N - 1, 2, 2, N]), [5], { dtype: "i32" }); // N: out of range, NaN
    pairs.push(["embedding", embedding(wb, ids), embedding(wr, ids)]);
    for (const [op, got, want] of pairs) {
      assert.equal(got.dtype, "f32");
      assert.deepEqual(
        bits(await got.toArray()),
        bits(await want.toArray()),
        `${what}: ${op} (${M}, ${K}, ${N})`,
      );
    }
    dispose([x, wb, wr, wbKN, wrKN, g, c, ids, ...pairs.flatMap(([, a, b]) => [a, b])]);
  }
}

Deno.test("a bf16 weight reads as its rounded f32 values: matmul (every variant), matmulAdd, rmsNormMatmul, embedding", async () => {
  await init();
  const base = memory().liveBytes;
  const info = deviceInfo();
  const variant = matmulVariant();
  try {
    for (const v of availableMatmulVariants()) {
      setMatmulVariant(v);
      await assertWeightReads(v);
    }
    setMatmulVariant(variant);
    info.isFallbackAdapter = !info.isFallbackAdapter; // the other plans: a GPU's split over K and matvec
    try {
      await assertWeightReads("the other adapter kind's plans");
    } finally {
      info.isFallbackAdapter = !info.isFallbackAdapter;
    }
    // a weight bound as several windows of a shrunk binding (8192 bytes: 4096 bf16 values a window; the
    // (66, 128) weight takes three)
    const binding = info.limits.maxStorageBufferBindingSize;
    info.limits.maxStorageBufferBindingSize = 8192;
    try {
      await assertWeightReads("8192-byte windows");
    } finally {
      info.limits.maxStorageBufferBindingSize = binding;
    }
  } finally {
    setMatmulVariant(variant);
  }
  assert.equal(memory().liveBytes, base);
});

Deno.test("bf16 tensors go into matmul's second operand and the embedding's table only, and take no gradient", async () => {
  await init();
  const w = tensor([1, 2, 3, 4], [2, 2], { dtype: "bf16" });
  const x = tensor([1, 2, 3, 4], [2, 2]);
  assert.throws(
    () => add(w, x),
    /add: input 0 is Tensor.*bf16.*: bf16 tensors are weights for matmul's second/,
  );
  assert.throws(() => matmul(w, x), /matmul needs f32 tensors \(b: f32 or bf16\)/);
  assert.throws(() => w.reshape(4).exp(), /bf16 tensors are weights/);
  assert.throws(() => w.requiresGrad_(), /only f32 tensors can require grad, got bf16/);
  assert.throws(
    () => tensor([1, 2], [2], { dtype: "bf16", requiresGrad: true }),
    /only f32 tensors can require grad/,
  );
  // the shape helpers that copy 32-bit words without an op (they counted a bf16 tensor's values as words)
  const f = tensor(new Float32Array(8), [8]);
  assert.throws(
    () => packInto(f, [w]),
    /packInto: bf16 tensors are weights for matmul's second operand and the embedding's table only/,
  );
  const box = { offset: 0, strides: [2, 1] };
  assert.throws(() => copyBox(w, box, x, box, [2, 2]), /copyBox: bf16 tensors are weights/);
  f.dispose();
  // the gradient flows to x, none to the weight
  const xg = tensor([1, 2, 3, 4], [2, 2], { requiresGrad: true });
  matmul(xg, w, { transB: true }).sum().backward();
  assert.deepEqual([...await xg.grad!.toArray()], [4, 6, 4, 6]);
  dispose([w, x, xg, xg.grad!]);
});

Deno.test("MambaLM with weightDtype bf16: the logits and tokens of an f32 model holding its rounded weights, bit for bit, in about half the memory", async () => {
  await init();
  const { MambaLM } = await import("../mamba/lm.ts");
  const { noGrad } = await import("../core/autograd.ts");
  const { tidy } = await import("../core/tensor.ts");
  const { manualSeed } = await import("../core/random.ts");
  const { Trainer, CharDataset, DEFAULT_TRAIN } = await import("../mamba/train.ts");
  const info = deviceInfo();
  for (const gpuPath of [false, true]) {
    const real = info.isFallbackAdapter;
    if (gpuPath) info.isFallbackAdapter = false; // a GPU's plans: the split over K, matvec, rmsNormMatmul
    try {
      for (const tieEmbeddings of [false, true]) {
        manualSeed(3);
        const before = memory().liveBytes;
        const half = new MambaLM({ dModel: 32, nLayers: 2, dState: 8 }, {
          vocabSize: 300,
          tieEmbeddings,
          weightDtype: "bf16",
        });
        const halfBytes = memory().liveBytes - before;
        const full = new MambaLM({ dModel: 32, nLayers: 2, dState: 8 }, { vocabSize: 300, tieEmbeddings });
        const fullBytes = memory().liveBytes - before - halfBytes;
        full.loadStateDict(half.stateDict()); // bf16 into f32: exact
        const what = `${gpuPath ? "GPU plans" : "this adapter's plans"}, ${
          tieEmbeddings ? "tied" : "untied"
        }`;
        const big = half.stateDict();
        assert.deepEqual(
          [...big].filter(([, t]) => t.dtype === "bf16").map(([k]) => k).sort(),
          [
            "embedding.weight",
            ...(tieEmbeddings ? [] : ["lm_head.weight"]),
            ...[0, 1].flatMap((
              l,
            ) => [`mamba.layers.${l}.mixer.in_proj.weight`, `mamba.layers.${l}.mixer.out_proj.weight`]),
          ].sort(),
          `${what}: the large weights`,
        );
        assert.ok(halfBytes < 0.62 * fullBytes, `${what}: ${halfBytes} bytes against ${fullBytes}`);
        const prompt = [[5, 17, 250, 3, 99, 42, 7]];
        const logits = async (m: InstanceType<typeof MambaLM>) => {
          const t = tidy(() => noGrad(() => m.forward(prompt)));
          const a = await t.toArray();
          t.dispose();
          return bits(a);
        };
        assert.deepEqual(await logits(half), await logits(full), `${what}: forward logits`);
        const [a, b] = [await half.generate(prompt, 12), await full.generate(prompt, 12)];
        assert.deepEqual([...a[0]], [...b[0]], `${what}: greedy tokens (prefill and decoding)`);
        if (!gpuPath && !tieEmbeddings) {
          const data = new CharDataset(new TextEncoder().encode("abcdefghij".repeat(30)));
          assert.throws(
            () => new Trainer(half, data, { ...DEFAULT_TRAIN, steps: 2, warmup: 1, batch: 1, seq: 8 }),
            /Trainer: the model stores its weights in bf16, which is for inference/,
          );
        }
        half.dispose();
        full.dispose();
        assert.equal(memory().liveBytes, before, `${what}: nothing left`);
      }
    } finally {
      info.isFallbackAdapter = real;
    }
  }
});

Deno.test("building a bf16 MambaLM holds one f32 draw at a time: it peaks below the f32 model's weights", async () => {
  await init();
  const { MambaLM } = await import("../mamba/lm.ts");
  const { resetPeak } = await import("../core/memory.ts");
  // the blocks' weights outweigh the embedding, as in the pretrained shapes (the 130m: 30% of the weights)
  const cfg = { dModel: 64, nLayers: 8, dState: 8 };
  const sizes: Record<string, number> = {};
  for (const weightDtype of ["f32", "bf16"] as const) {
    const base = memory().liveBytes;
    resetPeak();
    const lm = new MambaLM(cfg, { vocabSize: 256, weightDtype });
    sizes[weightDtype] = memory().liveBytes - base;
    sizes[`${weightDtype} peak`] = memory().peakBytes - base;
    lm.dispose();
  }
  // drawn all at once, the f32 initial weights came on top of the bf16 ones: 1.55 times the f32 weights
  assert.ok(sizes["bf16 peak"] < 0.75 * sizes.f32, JSON.stringify(sizes));
  assert.ok(sizes["f32 peak"] < 1.25 * sizes.f32, JSON.stringify(sizes));
});

Deno.test("fromPretrained({ weightDtype: bf16 }): the char model's weights rounded as they load; its text as the rounded f32 model's", async () => {
  await init();
  const { fromPretrained } = await import("../mamba/pretrained.ts");
  const { fixturePath } = await import("./fixture_util.ts");
  const dir = fixturePath("char-mamba");
  const half = await fromPretrained(dir, { weightDtype: "bf16" });
  const full = await fromPretrained(dir);
  assert.equal(half.weightDtype, "bf16");
  for (const bad of ["", "f16"]) {
    await assert.rejects(
      () => fromPretrained(dir, { weightDtype: bad as "bf16" }),
      new RegExp(`weightDtype must be "f32" or "bf16", got "${bad}"`),
    );
  }
  const rounded = new Map<string, { shape: number[]; data: Float32Array }>();
  for (const [k, t] of full.stateDict()) {
    const v = await t.toArray() as Float32Array;
    const isBig = /embedding|in_proj|out_proj|lm_head/.test(k) && k.endsWith(".weight");
    rounded.set(k, { shape: [...t.shape], data: isBig ? unpackBF16(packBF16(v), v.length) : v });
    if (isBig) {
      assert.deepEqual(bits(await half.stateDict().get(k)!.toArray()), bits(rounded.get(k)!.data), k);
    }
  }
  full.loadStateDict(rounded);
  const prompt = half.tokenizer!.encode("It is a truth universally acknowledged");
  const [a, b] = [await half.generate([prompt], 40), await full.generate([prompt], 40)];
  assert.deepEqual([...a[0]], [...b[0]]);
  // saved, its bf16 weights are BF16 in the file (their values, half the bytes); it loads back as either
  const { saveCheckpoint } = await import("../mamba/pretrained.ts");
  const { readSafetensorsFile } = await import("../core/safetensors_fs.ts");
  const out = await Deno.makeTempDir();
  try {
    await saveCheckpoint(half, `${out}/half`);
    await saveCheckpoint(full, `${out}/full`);
    const file = (d: string) => readSafetensorsFile(`${d}/model.safetensors`);
    const [h, f] = [await file(`${out}/half`), await file(`${out}/full`)];
    assert.equal(h.tensors.get("backbone.embeddings.weight")!.dtype, "BF16");
    assert.equal(h.tensors.get("backbone.layers.0.mixer.x_proj.weight")!.dtype, "F32");
    const size = async (d: string) => (await Deno.stat(`${d}/model.safetensors`)).size;
    assert.ok(await size(`${out}/half`) < 0.6 * await size(`${out}/full`));
    for (const [k, t] of f.tensors) {
      assert.deepEqual(bits(h.tensors.get(k)!.data), bits(t.data), `saved ${k}`);
    }
    for (const weightDtype of ["f32", "bf16"] as const) {
      const back = await fromPretrained(`${out}/half`, { weightDtype });
      assert.deepEqual([...(await back.generate([prompt], 40))[0]], [...a[0]], `reloaded as ${weightDtype}`);
      back.dispose();
    }
  } finally {
    await Deno.remove(out, { recursive: true });
  }
  half.dispose();
  full.dispose();
});
