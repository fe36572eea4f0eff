/**
 * What `fromPretrained` and the configs refuse, and how they say so: config.json keys (named as config.json
 * spells them), keys that would change the model, checkpoint tensors the model has no parameter for, integer
 * and bool dtypes, URL loads that stall (against a local server), a missing folder that looks like a hub id;
 * the round trip of a model with inner layernorms; `mambaConfig` with keys set to undefined.
 * @module
 */

import assert from "node:assert/strict";
import { noGrad } from "../core/autograd.ts";
import { init } from "../core/device.ts";
import { memory } from "../core/memory.ts";
import { parseSafetensors } from "../core/safetensors.ts";
import { tidy } from "../core/tensor.ts";
import { mambaConfig } from "../mamba/config.ts";
import { MAX_TEXT_FILE_BYTES, readBoundedText } from "../mamba/byte_source.ts";
import { hubDownload, HubError } from "../mamba/hub.ts";
import { loadTokenizer } from "../mamba/model_sources.ts";
import { MambaLM } from "../mamba/lm.ts";
import { parseCheckpointConfig } from "../mamba/checkpoint_config.ts";
import { fromPretrained, fromPretrainedFiles, saveCheckpoint } from "../mamba/pretrained.ts";
import { ByteTokenizer, HubTokenizer, type Tokenizer } from "../mamba/tokenizer.ts";
import { assertLmV64Logits, fixturePath } from "./fixture_util.ts";

const HF = fixturePath("lm_v64_hf");
const SS = fixturePath("lm_v64_state_spaces");
const hfConfig = async () => JSON.parse(await Deno.readTextFile(`${HF}/config.json`));
const ssConfig = async () => JSON.parse(await Deno.readTextFile(`${SS}/config.json`));

// A safetensors file from raw entries (any dtype, bytes as given), for dtypes serializeSafetensors refuses.
function rawSafetensors(
  entries: [string, { dtype: string; shape: number[]; bytes: Uint8Array }][],
): Uint8Array {
  const header: Record<string, unknown> = {};
  let at = 0;
  for (const [k, e] of entries) {
    header[k] = { dtype: e.dtype, shape: e.shape, data_offsets: [at, at + e.bytes.length] };
    at += e.bytes.length;
  }
  let json = JSON.stringify(header);
  json += " ".repeat((8 - (json.length % 8)) % 8);
  const head = new TextEncoder().encode(json);
  const out = new Uint8Array(8 + head.length + at);
  new DataView(out.buffer).setBigUint64(0, BigInt(head.length), true);
  out.set(head, 8);
  let pos = 8 + head.length;
  for (const [, e] of entries) {
    out.set(e.bytes, pos);
    pos += e.bytes.length;
  }
  return out;
}

// The fixture's tensors as raw F32 entries, in file order.
async function fixtureEntries(
  dir = HF,
): Promise<[string, { dtype: string; shape: number[]; bytes: Uint8Array }][]> {
  const { tensors } = parseSafetensors(await Deno.readFile(`${dir}/model.safetensors`));
  return [...tensors].map(([k, t]) => [k, {
    dtype: "F32",
    shape: t.shape,
    bytes: new Uint8Array(Float32Array.from(t.data).buffer),
  }]);
}

async function folder(config: unknown, model: Uint8Array): Promise<string> {
  const dir = await Deno.makeTempDir({ prefix: "pretrained-" });
  await Deno.writeTextFile(`${dir}/config.json`, JSON.stringify(config));
  await Deno.writeFile(`${dir}/model.safetensors`, model);
  return dir;
}

Deno.test("parseCheckpointConfig: bad values are named by config.json's keys, not by MambaConfig's", async () => {
  const hf = await hfConfig();
  const ss = await ssConfig();
  const bad: [Record<string, unknown>, RegExp][] = [
    [{ ...hf, intermediate_size: 48 }, /'intermediate_size' 48 is not a multiple of 'hidden_size' 32/],
    [{ ...hf, expand: 3 }, /'expand' 3 disagrees with 'intermediate_size' 64 \/ 'hidden_size' 32 = 2/],
    [{ ...hf, num_hidden_layers: 2.5 }, /'num_hidden_layers' must be a positive integer, got 2\.5/],
    [{ ...hf, hidden_size: "32" }, /'hidden_size' must be a positive integer below 2\^31, got "32"/],
    [{ ...hf, state_size: 0 }, /'state_size' must be a positive integer below 2\^31, got 0/],
    [{ ...hf, use_bias: "yes" }, /'use_bias' must be true or false, got "yes"/],
    [{ ...hf, use_conv_bias: 1 }, /'use_conv_bias' must be true or false, got 1/],
    [{ ...hf, tie_word_embeddings: "no" }, /'tie_word_embeddings' must be true or false, got "no"/],
    [
      { ...hf, layer_norm_epsilon: "1e-5" },
      /'layer_norm_epsilon' must be a positive number within f32's range, got "1e-5"/,
    ],
    [{ ...hf, time_step_rank: 2.5 }, /'time_step_rank' must be "auto" or a positive integer, got 2\.5/],
    [
      { ...hf, pad_vocab_size_multiple: 0 },
      /'pad_vocab_size_multiple' must be a positive integer below 2\^31, got 0/,
    ],
    [{ ...hf, vocab_size: 64.5 }, /'vocab_size' must be a positive integer below 2\^31, got 64\.5/],
    [{ ...hf, time_step_init_scheme: "zeros" }, /'time_step_init_scheme' must be "random" or "constant"/],
    [{ ...hf, time_step_min: 0.5 }, /'time_step_min' 0\.5 is greater than 'time_step_max' 0\.1/],
    [{ ...hf, inner_layernorms: "yes" }, /'inner_layernorms' must be true or false/],
    [{ ...ss, n_layer: 2.5 }, /'n_layer' must be a positive integer, got 2\.5/],
    [{ ...ss, ssm_cfg: { ...ss.ssm_cfg, d_state: 2.5 } }, /'ssm_cfg\.d_state' must be a positive integer/],
    [{ ...ss, ssm_cfg: { ...ss.ssm_cfg, bias: "no" } }, /'ssm_cfg\.bias' must be true or false, got "no"/],
    [{ ...ss, ssm_cfg: { ...ss.ssm_cfg, expand: 1.5 } }, /'ssm_cfg\.expand' must be a positive integer/],
    [{ ...ss, ssm_cfg: [] }, /'ssm_cfg' must be an object/],
    [{ ...ss, tie_embeddings: 0 }, /'tie_embeddings' must be true or false, got 0/],
    // what MambaConfig refuses is refused here, by the file's key (its message named MambaConfig's)
    [{ ...hf, time_step_scale: 1e39 }, /'time_step_scale' must be a positive number within f32's range/],
    [{ ...hf, state_size: 2 ** 31 }, /'state_size' must be a positive integer below 2\^31, got 2147483648/],
    [{ ...hf, mup: true, mup_base_width: 1e-320 }, /'mup_base_width' 1e-320 makes the width multiplier/],
    [{ ...hf, padding_idx: 500 }, /'padding_idx' must be an integer in \[0, 64\) \(vocab_size 64\), got 500/],
    // a null is not the default (transformers keeps the None): conv_kernel null built 4-wide convs
    [{ ...hf, conv_kernel: null }, /'conv_kernel' must be a positive integer below 2\^31, got null/],
    [{ ...hf, time_step_rank: null }, /'time_step_rank' must be "auto" or a positive integer, got null/],
    [
      { ...hf, layer_norm_epsilon: null },
      /'layer_norm_epsilon' must be a positive number within f32's range/,
    ],
    [{ ...ss, ssm_cfg: { ...ss.ssm_cfg, d_state: null } }, /'ssm_cfg\.d_state' must be a positive integer/],
    // the other spelling of layer_norm_epsilon is read, and must agree with it
    [
      { ...hf, layer_norm_eps: 1e-6 },
      /'layer_norm_eps' 0\.000001 disagrees with 'layer_norm_epsilon' 0\.00001/,
    ],
    [{ ...hf, base_std: -1 }, /'base_std' must be a positive number within f32's range, got -1/],
  ];
  for (const [cfg, re] of bad) {
    assert.throws(
      () => parseCheckpointConfig(cfg, "m/config.json"),
      (e: Error) => {
        assert.match(e.message, /^m\/config\.json: /);
        assert.match(e.message, re);
        assert.doesNotMatch(e.message, /MambaConfig|expandFactor|nLayers|dState|rmsNormEps/);
        return true;
      },
    );
  }
  // What does parse becomes a valid MambaConfig; the initialisation keys are kept.
  const c = parseCheckpointConfig({ ...hf, time_step_min: 0.002, time_step_init_scheme: "constant" });
  assert.equal(mambaConfig(c.config).dtMin, 0.002);
  assert.equal(mambaConfig(c.config).dtInit, "constant");
  assert.equal(mambaConfig(c.config).expandFactor, 2);
  const s = parseCheckpointConfig({ ...ss, ssm_cfg: { ...ss.ssm_cfg, dt_max: 0.05, use_fast_path: false } });
  assert.equal(mambaConfig(s.config).dtMax, 0.05);
  // null where it means none; layer_norm_eps where layer_norm_epsilon is absent; mamba.py's base_std
  const { layer_norm_epsilon: _eps, ...noEps } = hf;
  const n = parseCheckpointConfig({
    ...noEps,
    padding_idx: null,
    ssm_cfg: null,
    layer_norm_eps: 1e-6,
    base_std: 0.01,
  });
  assert.deepEqual([n.lm.paddingIdx, n.config.rmsNormEps, n.config.baseStd, n.ignored], [
    null,
    1e-6,
    0.01,
    [],
  ]);
  assert.equal(
    parseCheckpointConfig({ ...hf, layer_norm_eps: hf.layer_norm_epsilon }).config.rmsNormEps,
    1e-5,
  );
  assert.equal(mambaConfig(parseCheckpointConfig(hf).config).baseStd, 0.02);
  // keys a hand-written config may leave out take transformers' MambaConfig defaults
  const { conv_kernel: _k, expand: _e, intermediate_size: _i, use_bias: _b, ...bare } = hf;
  const d = mambaConfig(parseCheckpointConfig(bare).config);
  assert.deepEqual([d.dConv, d.expandFactor, d.bias], [4, 2, false]);
});

Deno.test("parseCheckpointConfig: keys that change the model are refused; residual_in_fp32 is accepted", async () => {
  const hf = await hfConfig();
  const ss = await ssConfig();
  const refused: [Record<string, unknown>, RegExp][] = [
    [{ ...hf, rms_norm: false }, /'rms_norm' false is not supported: the norms here are RMSNorm/],
    [{ ...hf, hidden_act: "gelu" }, /'hidden_act' "gelu" is not supported: .*SiLU/],
    [{ ...ss, rms_norm: false }, /'rms_norm' false is not supported/],
    [{ ...ss, d_intermediate: 128 }, /'d_intermediate' 128 is not supported: the blocks here have no MLP/],
    [{ ...ss, d_intermediate: -1 }, /'d_intermediate' must be an integer >= 0 and below 2\^31, got -1/],
  ];
  for (const [cfg, re] of refused) assert.throws(() => parseCheckpointConfig(cfg, "m/config.json"), re);
  // Everything here is f32, so the residual always is; the fused add+norm is a CUDA kernel detail;
  // transformers' ACT2FN["swish"] is SiLU.
  for (
    const cfg of [
      { ...hf, residual_in_fp32: false, fused_add_norm: false, rms_norm: true, hidden_act: "swish" },
      { ...ss, residual_in_fp32: false, fused_add_norm: false, d_intermediate: 0 },
    ]
  ) {
    parseCheckpointConfig(cfg);
  }
  assert.throws(
    () => parseCheckpointConfig({ ...hf, residual_in_fp32: "yes" }),
    /'residual_in_fp32' must be true/,
  );
});

Deno.test("mambaConfig: a key set to undefined takes its default; infinite numbers are refused", () => {
  const opts: { dState?: number; scan?: "pscan" } = {};
  const c = mambaConfig({ dModel: 16, nLayers: 2, dState: opts.dState, scan: opts.scan, dtRank: undefined });
  assert.deepEqual(c, mambaConfig({ dModel: 16, nLayers: 2 }));
  assert.equal(c.dState, 16);
  assert.equal(c.scan, "fused");
  // A misspelt key is still an error, even when undefined.
  assert.throws(
    () =>
      mambaConfig(
        { dModel: 16, nLayers: 2, dstate: undefined } as unknown as { dModel: number; nLayers: number },
      ),
    /unknown key 'dstate'/,
  );
  assert.throws(
    () => mambaConfig({ dModel: 16, nLayers: undefined as unknown as number }),
    /nLayers .* got undefined/,
  );
  assert.throws(
    () => mambaConfig({ dModel: 16, nLayers: 2, rmsNormEps: Infinity }),
    /rmsNormEps must be a positive number within f32's range, got Infinity/,
  );
  for (const bad of [null, 3, [16, 2]]) {
    assert.throws(
      () => mambaConfig(bad as never),
      /^Error: MambaConfig must be an object with dModel and nLayers, got /,
      JSON.stringify(bad),
    );
  }
});

Deno.test("fromPretrained: checkpoint tensors the model has no parameter for are named, before any read", async () => {
  await init();
  const entries = await fixtureEntries();
  const cfg = await hfConfig();
  const f32 = (n: number) => ({ dtype: "F32", shape: [n], bytes: new Uint8Array(4 * n) });
  const cases: [string, typeof entries, RegExp][] = [
    [
      "an extra tensor in a layer",
      [...entries, ["backbone.layers.0.mixer.extra.weight", f32(2)]],
      /backbone\.layers\.0\.mixer\.extra\.weight \(mamba\.layers\.0\.mixer\.extra\.weight\)/,
    ],
    [
      "a third layer with 2 in config.json",
      [...entries, ["backbone.layers.2.norm.weight", f32(32)]],
      /backbone\.layers\.2\.norm\.weight \(mamba\.layers\.2\.norm\.weight\)/,
    ],
    [
      "a LayerNorm bias",
      [...entries, ["backbone.layers.1.norm.bias", f32(32)]],
      /backbone\.layers\.1\.norm\.bias \(mamba\.layers\.1\.norm\.bias\)/,
    ],
    [
      "names of Object.prototype's properties (the shape table's lookup found functions)",
      [...entries, ["backbone.layers.0.constructor", f32(2)], ["backbone.layers.1.toString", f32(2)]],
      /backbone\.layers\.0\.constructor .*backbone\.layers\.1\.toString /,
    ],
  ];
  const before = memory().liveTensors;
  for (const [what, list, re] of cases) {
    const dir = await folder(cfg, rawSafetensors(list));
    await assert.rejects(() => fromPretrained(dir), (e: Error) => {
      assert.ok(!(e instanceof TypeError), `${what}: ${e.stack}`);
      assert.match(
        e.message,
        new RegExp(
          `^${dir}/model\\.safetensors: tensors the model of ${dir}/config\\.json has no parameter for: `,
        ),
        what,
      );
      assert.match(e.message, re, what);
      return true;
    });
    await Deno.remove(dir, { recursive: true });
  }
  // A state-spaces checkpoint with MLP blocks: refused by its config; with the config saying 0, by its tensors.
  const ss = await ssConfig();
  const ssEntries = await fixtureEntries(SS);
  const mlp = [...ssEntries, ["backbone.layers.0.mlp.fc1.weight", f32(8)]] as typeof entries;
  let dir = await folder({ ...ss, d_intermediate: 8 }, rawSafetensors(mlp));
  await assert.rejects(() => fromPretrained(dir), /'d_intermediate' 8 is not supported/);
  await Deno.remove(dir, { recursive: true });
  dir = await folder(ss, rawSafetensors(mlp));
  await assert.rejects(
    () => fromPretrained(dir),
    /backbone\.layers\.0\.mlp\.fc1\.weight \(mamba\.layers\.0\.mlp\.fc1\.weight\)/,
  );
  await Deno.remove(dir, { recursive: true });
  // Missing and unexpected together: both named in one message.
  dir = await folder(
    cfg,
    rawSafetensors([...entries.filter(([k]) => k !== "backbone.norm_f.weight"), ["x.weight", f32(1)]]),
  );
  await assert.rejects(() => fromPretrained(dir), /unexpected tensors x\.weight/);
  await Deno.remove(dir, { recursive: true });
  dir = await folder(
    cfg,
    rawSafetensors([...entries.filter(([k]) => k !== "backbone.norm_f.weight"), [
      "backbone.norm_f.bias",
      f32(32),
    ]]),
  );
  await assert.rejects(
    () => fromPretrained(dir),
    /no parameter for: backbone\.norm_f\.bias \(norm_f\.bias\); parameters the checkpoint lacks: norm_f\.weight$/,
  );
  await Deno.remove(dir, { recursive: true });
  assert.equal(memory().liveTensors, before, "failed loads leave no tensors");
});

Deno.test("saveCheckpoint then fromPretrained round-trips a model with inner layernorms", async () => {
  await init();
  for (const innerLayernorms of [true, false]) {
    const baseStd = innerLayernorms ? 0.01 : 0.02; // saved where not the default (it was lost)
    const lm = new MambaLM({ dModel: 16, nLayers: 2, dState: 4, innerLayernorms, baseStd }, {
      vocabSize: 32,
    });
    // Non-trivial norm weights, so that a load that skipped them would show.
    const sd = lm.stateDict();
    const norms = [...sd.keys()].filter((k) => k.includes("_layernorm"));
    assert.equal(norms.length, innerLayernorms ? 6 : 0);
    lm.loadStateDict(
      Object.fromEntries(norms.map((k, i) => {
        const n = sd.get(k)!.shape[0];
        return [k, { shape: [n], data: Float32Array.from({ length: n }, (_, j) => 1 + 0.1 * (i + j)) }];
      })),
      { strict: false },
    );
    const dir = await Deno.makeTempDir({ prefix: "pretrained-" });
    await saveCheckpoint(lm, dir);
    const cfg = JSON.parse(await Deno.readTextFile(`${dir}/config.json`));
    assert.equal(cfg.inner_layernorms, innerLayernorms ? true : undefined);
    const back = await fromPretrained(dir);
    assert.equal(back.config.innerLayernorms, innerLayernorms);
    assert.deepEqual([cfg.base_std, back.config.baseStd], [innerLayernorms ? 0.01 : undefined, baseStd]);
    const got = back.stateDict();
    for (const [k, p] of lm.stateDict()) {
      assert.deepEqual(await got.get(k)!.toArray(), await p.toArray(), k);
    }
    const tokens = [[1, 5, 9, 30, 2, 7]];
    const a = tidy(() => noGrad(() => lm.forward(lm.tokensTensor(tokens))));
    const b = tidy(() => noGrad(() => back.forward(back.tokensTensor(tokens))));
    assert.deepEqual(await a.toArray(), await b.toArray());
    a.dispose();
    b.dispose();
    lm.dispose();
    back.dispose();
    if (innerLayernorms) {
      // A folder saved before config.json recorded them: the error says what to add.
      delete cfg.inner_layernorms;
      await Deno.writeTextFile(`${dir}/config.json`, JSON.stringify(cfg));
      await assert.rejects(
        () => fromPretrained(dir),
        /no parameter for: backbone\.layers\.0\.mixer\.B_layernorm\.weight \(mamba\.layers\.0\.mixer\.B_layernorm\.weight\), .* \(inner layernorms: add "inner_layernorms": true to .*config\.json\)$/,
      );
    }
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("an HF config's pad_vocab_size_multiple is not applied (transformers has exactly vocab_size rows)", async () => {
  await init();
  // what an HF fine-tune with added tokens looks like: a vocabulary of 67 and the key copied from a -hf config
  const lm = new MambaLM({ dModel: 16, nLayers: 1, dState: 4 }, { vocabSize: 67 });
  const dir = await Deno.makeTempDir({ prefix: "pretrained-pad-" });
  try {
    await saveCheckpoint(lm, dir, null);
    const cfg = JSON.parse(await Deno.readTextFile(`${dir}/config.json`));
    await Deno.writeTextFile(`${dir}/config.json`, JSON.stringify({ ...cfg, pad_vocab_size_multiple: 8 }));
    const back = await fromPretrained(dir);
    assert.equal(back.vocabSize, 67);
    assert.deepEqual(back.stateDict().get("embedding.weight")!.shape, [67, 16]);
    back.dispose();
  } finally {
    lm.dispose();
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("fromPretrained refuses integer and bool tensors, naming file, tensor, dtype, shape and offsets", async () => {
  await init();
  const entries = await fixtureEntries();
  const cfg = await hfConfig();
  const D = "backbone.layers.0.mixer.D";
  const sizes: Record<string, number> = { I32: 4, I64: 8, U8: 1, BOOL: 1 };
  for (const [dtype, size] of Object.entries(sizes)) {
    const list = entries.map(([k, e]) =>
      [k, k === D ? { dtype, shape: e.shape, bytes: new Uint8Array(64 * size).fill(1) } : e] as const
    );
    const file = rawSafetensors(list as typeof entries);
    const dir = await folder(cfg, file);
    const begin = list.slice(0, list.findIndex(([k]) => k === D)).reduce((a, [, e]) => a + e.bytes.length, 0);
    await assert.rejects(() => fromPretrained(dir), (e: Error) => {
      assert.equal(
        e.message,
        `${dir}/model.safetensors: tensor ${D} (mamba.layers.0.mixer.D) is ${dtype} [64] at data_offsets ` +
          `[${begin}, ${begin + 64 * size}]; expected a float dtype (F32, F16, BF16 or F64)`,
      );
      return true;
    });
    await Deno.remove(dir, { recursive: true });
  }
  // F64 is a float dtype: it loads (these values are exact in f32).
  const f64 = entries.map(([k, e]) => {
    if (k !== D) return [k, e] as const;
    const x = new Float32Array(e.bytes.buffer.slice(0) as ArrayBuffer);
    return [k, { dtype: "F64", shape: e.shape, bytes: new Uint8Array(Float64Array.from(x).buffer) }] as const;
  });
  const dir = await folder(cfg, rawSafetensors(f64 as typeof entries));
  const lm = await fromPretrained(dir);
  await assertLmV64Logits(lm);
  lm.dispose();
  await Deno.remove(dir, { recursive: true });
});

// A server for one model folder whose responses can stall, trickle or end early.
function modelServer(
  body: (file: string, data: Uint8Array<ArrayBuffer>, release: Promise<void>) => Response | Promise<Response>,
  missing = 404,
) {
  let release!: () => void;
  const released = new Promise<void>((r) => release = r);
  const ac = new AbortController();
  const server = Deno.serve(
    { hostname: "127.0.0.1", port: 0, signal: ac.signal, onListen() {} },
    async (req) => {
      const file = new URL(req.url).pathname.slice(1);
      if (file !== "config.json" && file !== "model.safetensors") {
        return new Response("no", { status: missing });
      }
      return await body(file, await Deno.readFile(`${HF}/${file}`), released);
    },
  );
  return {
    url: `http://127.0.0.1:${server.addr.port}`,
    async close() {
      release();
      ac.abort();
      await server.finished;
    },
  };
}

// A body that sends `data` in pieces, waiting `pause` before each, stopping for good after `stopAt` bytes.
function trickle(
  data: Uint8Array,
  piece: number,
  pause: () => Promise<void>,
  stopAt = Infinity,
  known = true,
) {
  let at = 0;
  const stream = new ReadableStream<Uint8Array>({
    async pull(c) {
      if (at >= Math.min(data.length, stopAt)) {
        if (at >= data.length) return c.close();
        await pause();
        try {
          c.close(); // ends early: fewer bytes than announced, or a short body of unknown size
        } catch { /* the client is gone */ }
        return;
      }
      await pause();
      const n = Math.min(piece, data.length - at, stopAt - at);
      try {
        c.enqueue(data.slice(at, at + n));
      } catch { /* the client is gone */ }
      at += n;
    },
  }, { highWaterMark: 0 });
  return new Response(stream, { headers: known ? { "content-length": String(data.length) } : {} });
}

// Fails (instead of hanging the test run) when `p` has not settled after `ms`.
function within<T>(ms: number, p: Promise<T>): Promise<T> {
  let timer: ReturnType<typeof setTimeout> | undefined;
  const late = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new Error(`still waiting after ${ms} ms`)), ms);
  });
  return Promise.race([p, late]).finally(() => clearTimeout(timer));
}

Deno.test("fromPretrained from a URL: a stalled server fails after timeoutMs; a slow one that keeps going loads", async () => {
  await init();
  for (const source of ["http://127.0.0.1:9/m", "org/m"]) {
    for (const ms of [0, -1, NaN, 2 ** 31]) {
      await assert.rejects(
        () => fromPretrained(source, { timeoutMs: ms }),
        new RegExp(`timeoutMs must be a positive number of ms up to 2\\^31 - 1, or Infinity, got ${ms}`),
      );
    }
  }
  const sleep = (ms: number) => () => new Promise<void>((r) => setTimeout(r, ms));
  // No response at all to config.json.
  let s = modelServer(async (_f, _d, release) => {
    await release;
    return new Response("late");
  });
  await assert.rejects(
    () => within(5000, fromPretrained(s.url, { timeoutMs: 300 })),
    new RegExp(`cannot fetch ${s.url}/config\\.json: no response within 300 ms`),
  );
  await s.close();

  // The weights start, then stop coming (the connection stays open): the read names the tensor.
  s = modelServer((file, data, release) =>
    file === "config.json" ? new Response(data) : stalledAfter(data, 20000, release)
  );
  await assert.rejects(
    () => within(5000, fromPretrained(s.url, { timeoutMs: 300 })),
    new RegExp(
      `${s.url}/model\\.safetensors: reading tensor (\\S+) \\(\\S+\\) is F32 \\[[\\d, ]+\\] at data_offsets \\[\\d+, \\d+\\] ` +
        `\\(bytes \\d+-\\d+ of the file\\): .*no data from ${s.url}/model\\.safetensors for 300 ms`,
    ),
  );
  await s.close();

  // Slow but live: a piece every 100 ms, 1.5 s in all, with a 300 ms timeout.
  s = modelServer((file, data) =>
    file === "config.json" ? new Response(data) : trickle(data, Math.ceil(data.length / 15), sleep(100))
  );
  const t0 = performance.now();
  const lm = await within(10000, fromPretrained(s.url, { timeoutMs: 300 }));
  assert.ok(performance.now() - t0 > 1000, "the download took longer than the timeout");
  await assertLmV64Logits(lm);
  lm.dispose();
  await s.close();
  // A server that answers 403 for what it does not have (an S3 bucket that hides its listing): the optional
  // files count as absent, as with 404 (the load failed on tokenizer_config.json's 403).
  s = modelServer((_f, data) => new Response(data), 403);
  const hidden = await fromPretrained(s.url);
  await assertLmV64Logits(hidden);
  assert.equal(hidden.tokenizer, null);
  hidden.dispose();
  await s.close();
  // ... but where the weights themselves are refused (a private object, an expired link), the 403 is said
  // (it read as "neither model.safetensors nor model.safetensors.index.json")
  s = modelServer(
    (file, data) => file === "config.json" ? new Response(data) : new Response("no", { status: 403 }),
    403,
  );
  await assert.rejects(
    () => fromPretrained(s.url),
    /cannot fetch http:\/\/127\.0\.0\.1:\d+\/model\.safetensors: HTTP 403/,
  );
  await s.close();
  s = modelServer((file, data) =>
    file === "config.json" ? new Response(data) : trickle(data, Math.ceil(data.length / 15), sleep(100))
  );
  // No limit (Infinity): a timer given Infinity would fire at once (setTimeout clamps what it cannot hold).
  const unlimited = await within(10000, fromPretrained(s.url, { timeoutMs: Infinity }));
  await assertLmV64Logits(unlimited);
  unlimited.dispose();
  await s.close();

  // A body of unknown length that ends early: the read error names the tensor and its offsets.
  s = modelServer((file, data) =>
    file === "config.json" ? new Response(data) : trickle(data, 4096, sleep(0), 30000, false)
  );
  await assert.rejects(
    () => within(5000, fromPretrained(s.url)),
    /model\.safetensors: reading tensor \S+ \(\S+\) is F32 \[[\d, ]+\] at data_offsets \[\d+, \d+\] \(bytes \d+-\d+ of the file\): .*the body ended at byte 30000/,
  );
  await s.close();

  // Of unknown length and whole, it loads; with bytes after the last tensor (what a header length cut into
  // its padding looks like) it is refused, with a known length at the header, with an unknown one at the end.
  for (const [extra, known] of [[0, false], [4, false], [4, true]] as const) {
    s = modelServer((file, data) => {
      if (file === "config.json") return new Response(data);
      const body = new Uint8Array(data.length + extra);
      body.set(data);
      return trickle(body, 4096, sleep(0), Infinity, known);
    });
    const loading = within(5000, fromPretrained(s.url));
    if (extra === 0) {
      const whole = await loading;
      await assertLmV64Logits(whole);
      whole.dispose();
    } else {
      await assert.rejects(
        () => loading,
        known
          ? /model\.safetensors: the tensors end at byte \d+ of the data section, which holds \d+ bytes/
          : /model\.safetensors: the body goes on after the last tensor, which ends at byte \d+ \(wrong header/,
      );
    }
    await s.close();
  }
});

// A body that sends the first `n` bytes, then nothing until `release` (the connection stays open).
function stalledAfter(data: Uint8Array, n: number, release: Promise<void>): Response {
  let sent = false;
  const stream = new ReadableStream<Uint8Array>({
    async pull(c) {
      if (!sent) {
        sent = true;
        c.enqueue(data.slice(0, n));
        return;
      }
      await release;
      try {
        c.close();
      } catch { /* cancelled */ }
    },
  }, { highWaterMark: 0 });
  return new Response(stream, { headers: { "content-length": String(data.length) } });
}

Deno.test("fromPretrained, fromPretrainedFiles, loadTokenizer and hubDownload refuse an unknown option by name", async () => {
  // { weightDType: "bf16" } loaded in f32 without a word, as every misspelt key did
  const dir = fixturePath("char-mamba");
  await assert.rejects(
    () => fromPretrained(dir, { weightDType: "bf16" } as never),
    /fromPretrained: unknown option 'weightDType' \(options are revision, .*, weightDtype\)/,
  );
  await assert.rejects(
    () => fromPretrainedFiles({}, { nmae: "x" } as never),
    /fromPretrainedFiles: unknown option 'nmae'/,
  );
  await assert.rejects(
    () => loadTokenizer(dir, { scan: "fused" } as never),
    /loadTokenizer: unknown option 'scan'/,
  );
  await assert.rejects(
    () => hubDownload("org/m", "config.json", { cachedir: "c" } as never),
    /hubDownload: unknown option 'cachedir'/,
  );
});

Deno.test("fromPretrained: a missing folder that looks like a hub id says that the folder is missing too", async () => {
  await init();
  const probe = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  const dead = `http://127.0.0.1:${(probe.addr as Deno.NetAddr).port}`;
  probe.close();
  const cacheDir = await Deno.makeTempDir({ prefix: "hub-cache-" });
  const id = "no-such-folder-3e1/char";
  for (const extra of [{}, { localFilesOnly: true }]) {
    await assert.rejects(
      () => fromPretrained(id, { endpoint: dead, cacheDir, progress: false, ...extra }),
      (e: Error) => {
        assert.ok(e instanceof HubError, String(e));
        assert.match(
          e.message,
          /cannot reach http:\/\/127\.0\.0\.1:\d+\/no-such-folder-3e1\/char\/resolve|is not in the cache/,
        );
        // the folder looked for, as an absolute path: the user sees where a relative one was resolved
        const where = `${Deno.cwd()}/${id}`.replace(/[.*+?^${}()|[\]\\/]/g, "\\$&");
        assert.match(
          e.message,
          new RegExp(
            `^there is no local folder '${id.replace("/", "\\/")}' \\(${where}\\), and as a hub id: `,
          ),
        );
        return true;
      },
    );
  }
  await Deno.remove(cacheDir, { recursive: true });
});

Deno.test("fromPretrained: sizes in config.json that the checkpoint does not have are named before the model is built", async () => {
  await init();
  const cfg = await hfConfig();
  const model = await Deno.readFile(`${HF}/model.safetensors`);
  const before = memory().liveTensors;
  const load = (c: Record<string, unknown>) =>
    fromPretrainedFiles({ "config.json": new Blob([JSON.stringify(c)]), "model.safetensors": model }, {
      name: "m",
    });
  const cases: [Record<string, unknown>, RegExp][] = [
    // Was "m: Array buffer allocation failed" (the embedding allocated first).
    [
      { vocab_size: 1e9 },
      /^m\/model\.safetensors: shape mismatch for embedding\.weight: checkpoint \[64, 32\] vs model \[1000000000, 32\] \(vocab_size 1000000000, hidden_size 32\); lm_head\.weight: .* \(the model's sizes are those of m\/config\.json\)$/,
    ],
    // Was "m: Invalid array length".
    [
      { num_hidden_layers: 2 ** 40 },
      /^m\/model\.safetensors: m\/config\.json has num_hidden_layers 1099511627776, but the checkpoint has layers 0-1 only$/,
    ],
    [
      { state_size: 1e7 },
      /mamba\.layers\.0\.mixer\.A_log: checkpoint \[64, 16\] vs model \[64, 10000000\] \(intermediate_size 64, state_size 10000000\)/,
    ],
    [
      { conv_kernel: 1e6 },
      /conv1d\.weight: checkpoint \[64, 1, 4\] vs model \[64, 1, 1000000\] \(intermediate_size 64, conv_kernel 1000000\)/,
    ],
    [
      { time_step_rank: 1e9 },
      /x_proj\.weight: checkpoint \[34, 64\] vs model \[1000000032, 64\] \(time_step_rank 1000000000, state_size 16/,
    ],
  ];
  for (const [change, re] of cases) {
    const started = performance.now();
    await assert.rejects(() => load({ ...cfg, ...change }), (e: Error) => {
      assert.match(e.message, re, JSON.stringify(change));
      return true;
    });
    assert.ok(performance.now() - started < 2000, `${JSON.stringify(change)}: refused before any allocation`);
  }
  // A state-spaces config names its own keys.
  const ss = await ssConfig();
  const ssModel = await Deno.readFile(`${SS}/model.safetensors`);
  await assert.rejects(
    () =>
      fromPretrainedFiles({
        "config.json": new Blob([JSON.stringify({ ...ss, ssm_cfg: { ...ss.ssm_cfg, d_state: 8 } })]),
        "model.safetensors": ssModel,
      }, { name: "s" }),
    /A_log: checkpoint \[64, 16\] vs model \[64, 8\] \(ssm_cfg\.expand x d_model = 64, ssm_cfg\.d_state 8\)/,
  );
  assert.equal(memory().liveTensors, before, "failed loads leave no tensors");
});

Deno.test("fromPretrained: a key twice in config.json or the shard index is refused (JSON.parse keeps the last)", async () => {
  await init();
  const text = await Deno.readTextFile(`${HF}/config.json`);
  const model = await Deno.readFile(`${HF}/model.safetensors`);
  await assert.rejects(
    () =>
      fromPretrainedFiles({
        "config.json": new Blob([text.replace("{", '{"hidden_size": 64,')]),
        "model.safetensors": model,
      }, { name: "m" }),
    (e: Error) => {
      assert.equal(e.message, `m/config.json: the key "hidden_size" is there twice`);
      return true;
    },
  );
  const index = '{"weight_map": {"lm_head.weight": "a.safetensors", "lm_head.weight": "b.safetensors"}}';
  await assert.rejects(
    () =>
      fromPretrainedFiles({
        "config.json": new Blob([text]),
        "model.safetensors.index.json": new Blob([index]),
      }, { name: "m" }),
    /^Error: m\/model\.safetensors\.index\.json: the key "lm_head\.weight" in "weight_map" is there twice$/,
  );
});

Deno.test("saveCheckpoint keeps a loaded model's tokenizer (and its config); null or a tokenizer without files", async () => {
  await init();
  const root = await Deno.makeTempDir({ prefix: "pretrained-" });
  const json = JSON.parse(await Deno.readTextFile(fixturePath("hub/tokenizer.json")));
  const config = JSON.parse(await Deno.readTextFile(fixturePath("hub/tokenizer_config.json")));
  const lm = new MambaLM({ dModel: 4, nLayers: 1, dState: 4 }, { vocabSize: 65000 });
  const small = new MambaLM({ dModel: 4, nLayers: 1, dState: 4 }, { vocabSize: 64 });
  try {
    await assert.rejects(
      () => saveCheckpoint(small, `${root}/small`, new HubTokenizer(json, config)),
      /cannot save the tokenizer with this model: it has 65000 token ids, the model's vocabulary 64/,
    );
    await saveCheckpoint(lm, `${root}/plain`); // a MambaLM has no tokenizer: none written
    assert.deepEqual([...Deno.readDirSync(`${root}/plain`)].map((e) => e.name).sort(), [
      "config.json",
      "model.safetensors",
    ]);
    await saveCheckpoint(lm, `${root}/hub`, new HubTokenizer(json, config));
    const loaded = await fromPretrained(`${root}/hub`);
    try {
      assert.ok(loaded.tokenizer instanceof HubTokenizer);
      assert.deepEqual(loaded.tokenizer.specialTokens, new HubTokenizer(json, config).specialTokens);
      assert.notEqual(loaded.tokenizer.specialTokens.eos, null, "tokenizer_config.json came along");
      // A PretrainedLM saves its own tokenizer by default; null leaves it out.
      await saveCheckpoint(loaded, `${root}/again`);
      assert.deepEqual(
        JSON.parse(await Deno.readTextFile(`${root}/again/tokenizer_config.json`)),
        config,
      );
      await saveCheckpoint(loaded, `${root}/weights`, null);
      const has = (f: string) => Deno.stat(f).then(() => true, () => false);
      assert.ok(!(await has(`${root}/weights/tokenizer.json`)));
      // a tokenizer without a config replaces the pair (a stale tokenizer_config.json would load with it)
      await saveCheckpoint(loaded, `${root}/again`, new HubTokenizer(json));
      assert.ok(await has(`${root}/again/tokenizer.json`));
      assert.ok(!(await has(`${root}/again/tokenizer_config.json`)));
      // raw tokenizer.json is not a Tokenizer: the error says what to pass
      await assert.rejects(
        () => saveCheckpoint(loaded, `${root}/raw`, json as unknown as Tokenizer),
        /expected a Tokenizer, got object \(for a parsed tokenizer.json, pass tokenizerFromJSON\(json\)\)/,
      );
    } finally {
      loaded.dispose();
    }
    const own: Tokenizer = {
      vocabSize: 32,
      specialTokens: { bos: null, eos: null, pad: null, unk: null },
      encode: () => [],
      decode: () => "",
    };
    await assert.rejects(
      () => saveCheckpoint(lm, `${root}/own`, own),
      /cannot save the tokenizer: it has no toFiles\(\) \(ByteTokenizer and HubTokenizer have it\); pass null/,
    );
  } finally {
    lm.dispose();
    small.dispose();
    await Deno.remove(root, { recursive: true });
  }
});

Deno.test("a model's text files (config.json, tokenizer.json, an index) past 100 MiB are refused as they stream, not read whole", async () => {
  // a folder whose config.json stat says is 101 MiB (sparse: nothing is written)
  const dir = await Deno.makeTempDir();
  try {
    const f = await Deno.open(`${dir}/config.json`, { write: true, create: true });
    await f.truncate(101 * 2 ** 20);
    f.close();
    await assert.rejects(
      () => fromPretrained(dir),
      new RegExp(
        `^Error: cannot read ${dir}/config\\.json: 105906176 bytes, more than the 100 MiB a model's text file`,
      ),
    );
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
  // a body that never ends (a server gone wrong): refused once past the bound, the stream cancelled
  let cancelled = false;
  const endless = new ReadableStream<Uint8Array>({
    pull: (c) => c.enqueue(new Uint8Array(1 << 20)),
    cancel: () => {
      cancelled = true;
    },
  });
  await assert.rejects(
    () => readBoundedText(endless, "https://example.test/config.json"),
    /^Error: https:\/\/example\.test\/config\.json: 105906176 bytes read and more coming, past the 100 MiB/,
  );
  assert.ok(cancelled, "the stream is cancelled");
  // a size given up front is refused before any read; below the bound, chunks join (a character split
  // across two of them decodes whole)
  await assert.rejects(
    () => readBoundedText(null, "", MAX_TEXT_FILE_BYTES + 1),
    /^Error: 104857601 bytes, more/,
  );
  const bytes = new TextEncoder().encode('{"name": "é😀"}');
  const split = new ReadableStream<Uint8Array>({
    start(c) {
      c.enqueue(bytes.subarray(0, 12));
      c.enqueue(bytes.subarray(12));
      c.close();
    },
  });
  assert.equal(await readBoundedText(split, "x"), '{"name": "é😀"}');
});

Deno.test("saveCheckpoint's tokenizer files are part of its set: those of another save are refused; null keeps the folder's", async () => {
  await init();
  const root = await Deno.makeTempDir({ prefix: "pretrained-" });
  const fs = Deno as unknown as { remove: typeof Deno.remove };
  const { remove } = fs;
  const json = JSON.parse(await Deno.readTextFile(fixturePath("hub/tokenizer.json")));
  const config = JSON.parse(await Deno.readTextFile(fixturePath("hub/tokenizer_config.json")));
  const lm = new MambaLM({ dModel: 4, nLayers: 1, dState: 4 }, { vocabSize: 65000 });
  const mixed =
    /tokenizer\.json \(and tokenizer_config\.json, or its absence\) and .*config\.json are from different saves \(mambats_tokenizer_digest [0-9a-f+]+, the files' [0-9a-f+]+\): save again/;
  try {
    // A save stopped after its renames, before it removed the tokenizer_config.json of the one before: the
    // new tokenizer.json would load with the old special tokens.
    const dir = `${root}/stopped`;
    await saveCheckpoint(lm, dir, new HubTokenizer(json, config));
    fs.remove = (p, o) =>
      String(p).endsWith("/tokenizer_config.json")
        ? Promise.reject(new Error("injected: stopped"))
        : remove(p, o);
    await assert.rejects(() => saveCheckpoint(lm, dir, new HubTokenizer(json)), /injected: stopped/);
    fs.remove = remove;
    await assert.rejects(() => fromPretrained(dir), mixed);
    // Two saves at once (two processes): one's tokenizer.json beside the other's config.json and weights.
    const [a, b] = [`${root}/a`, `${root}/b`];
    await saveCheckpoint(lm, a, new ByteTokenizer());
    await saveCheckpoint(lm, b, new ByteTokenizer(new TextEncoder().encode("abc")));
    await Deno.copyFile(`${b}/tokenizer.json`, `${a}/tokenizer.json`);
    await assert.rejects(() => fromPretrained(a), mixed);
    // A save without a tokenizer (null) leaves the folder's own to load with it, as it says.
    await saveCheckpoint(lm, b, null);
    const back = await fromPretrained(b);
    assert.deepEqual([...(back.tokenizer as ByteTokenizer).known!].sort(), [97, 98, 99]);
    back.dispose();
  } finally {
    fs.remove = remove;
    lm.dispose();
    await Deno.remove(root, { recursive: true });
  }
});

Deno.test("saveCheckpoint keeps the embedding's padding row (padding_idx, ours) and says bf16 weights are bfloat16", async () => {
  await init();
  const dir = await Deno.makeTempDir();
  try {
    for (const [paddingIdx, weightDtype] of [[3, "f32"], [0, "bf16"], [null, "f32"]] as const) {
      const lm = new MambaLM({ dModel: 8, nLayers: 1 }, { vocabSize: 10, paddingIdx, weightDtype });
      await saveCheckpoint(lm, dir, null);
      lm.dispose();
      const cfg = JSON.parse(await Deno.readTextFile(`${dir}/config.json`));
      assert.equal(cfg.torch_dtype, weightDtype === "bf16" ? "bfloat16" : "float32");
      assert.equal(cfg.padding_idx, paddingIdx ?? undefined);
      const back = await fromPretrained(dir);
      assert.equal(back.embedding.paddingIdx, paddingIdx, `paddingIdx ${paddingIdx}`);
      back.dispose();
    }
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("saveCheckpoint replaces its files as a set: a failed save leaves the folder as it was, a mixed pair is refused", async () => {
  await init();
  const dir = await Deno.makeTempDir();
  const fs = Deno as unknown as {
    writeFile: typeof Deno.writeFile;
    rename: typeof Deno.rename;
  };
  const { writeFile, rename } = fs;
  const a = new MambaLM({ dModel: 8, nLayers: 1, dState: 4 }, { vocabSize: 256 });
  const b = new MambaLM({ dModel: 8, nLayers: 1, dState: 4, rmsNormEps: 0.5 }, {
    vocabSize: 256,
    paddingIdx: 3,
  });
  const snapshot = async () =>
    Object.fromEntries(
      await Promise.all(
        [...Deno.readDirSync(dir)].map(async (e) =>
          [e.name, await Deno.readFile(`${dir}/${e.name}`)] as const
        ),
      ),
    );
  try {
    await saveCheckpoint(a, dir, new ByteTokenizer());
    await Deno.writeTextFile(`${dir}/notes.txt`, "mine"); // a file of the user's: kept
    // as save_pretrained: "format": "pt" (transformers <= 4.48 fails without it), and the save's id
    const meta = parseSafetensors(await Deno.readFile(`${dir}/model.safetensors`)).header.metadata;
    assert.equal(meta.format, "pt");
    const cfg = JSON.parse(await Deno.readTextFile(`${dir}/config.json`));
    assert.equal(meta.mambats_save_id, cfg.mambats_save_id);
    const before = await snapshot();
    // A write that fails (a full disk) at the second file: nothing replaced, no temporary file left.
    let writes = 0;
    fs.writeFile = (p, d, o) =>
      ++writes === 2 ? Promise.reject(new Error("injected: no space")) : writeFile(p, d, o);
    await assert.rejects(
      () => saveCheckpoint(b, dir, new ByteTokenizer()),
      /cannot save into .*: injected: no space/,
    );
    fs.writeFile = writeFile;
    assert.deepEqual(await snapshot(), before);
    // Stopped between its renames: b's weights beside a's config.json, which fromPretrained refuses.
    fs.rename = (p, q) =>
      String(q).endsWith("/config.json") ? Promise.reject(new Error("injected: stopped")) : rename(p, q);
    await assert.rejects(() => saveCheckpoint(b, dir, new ByteTokenizer()), /injected: stopped/);
    fs.rename = rename;
    await assert.rejects(
      () => fromPretrained(dir),
      /model\.safetensors and .*config\.json are from different saves \(mambats_save_id [0-9a-f]+, [0-9a-f]+\): save again/,
    );
    // A crash's temporary files are removed by the next save; the user's file stays.
    await Deno.writeTextFile(`${dir}/config.json.mambats-tmp-0123abcd`, "{");
    await saveCheckpoint(b, dir, new ByteTokenizer());
    assert.deepEqual(
      [...Deno.readDirSync(dir)].map((e) => e.name).sort(),
      ["config.json", "model.safetensors", "notes.txt", "tokenizer.json"],
    );
    const back = await fromPretrained(dir);
    assert.deepEqual([back.config.rmsNormEps, back.embedding.paddingIdx], [0.5, 3]);
    back.dispose();
    // A training checkpoint's folder: its optimizer state and log would stay beside other weights.
    await Deno.writeTextFile(`${dir}/training_log.json`, "{}");
    await assert.rejects(
      () => saveCheckpoint(a, dir, null),
      /cannot save into .*: it holds a training checkpoint \(training_log\.json\).*use saveTrainingCheckpoint/,
    );
  } finally {
    fs.writeFile = writeFile;
    fs.rename = rename;
    a.dispose();
    b.dispose();
    await Deno.remove(dir, { recursive: true });
  }
});
