/**
 * What `fromPretrained` and the configs refuse, and how they say so: config.json keys (named as config.json
 * spells them), keys that would change the model, checkpoint tensors the model has no parameter for, integer
 * and bool dtypes, URL loads that stall (against a local server), a missing folder that looks like a hub id;
 * the round trip of a model with inner layernorms; `mambaConfig` with keys set to undefined.
 * @module
 */

import assert from "node:assert/strict";
import { mambaConfig } from "../mamba/config.ts";
import { parseCheckpointConfig } from "../mamba/pretrained.ts";
import { fixturePath } from "./fixture_util.ts";

const HF = fixturePath("lm_v64_hf");
const SS = fixturePath("lm_v64_state_spaces");
const hfConfig = async () => JSON.parse(await Deno.readTextFile(`${HF}/config.json`));
const ssConfig = async () => JSON.parse(await Deno.readTextFile(`${SS}/config.json`));

Deno.test("parseCheckpointConfig: bad values are named by config.json's keys, not by MambaConfig's", async () => {
  const hf = await hfConfig();
  const ss = await ssConfig();
  const bad: [Record<string, unknown>, RegExp][] = [
    [{ ...hf, intermediate_size: 48 }, /'intermediate_size' 48 is not a multiple of 'hidden_size' 32/],
    [{ ...hf, expand: 3 }, /'expand' 3 disagrees with 'intermediate_size' 64 \/ 'hidden_size' 32 = 2/],
    [{ ...hf, num_hidden_layers: 2.5 }, /'num_hidden_layers' must be a positive integer, got 2\.5/],
    [{ ...hf, hidden_size: "32" }, /'hidden_size' must be a positive integer, got "32"/],
    [{ ...hf, state_size: 0 }, /'state_size' must be a positive integer, got 0/],
    [{ ...hf, use_bias: "yes" }, /'use_bias' must be true or false, got "yes"/],
    [{ ...hf, use_conv_bias: 1 }, /'use_conv_bias' must be true or false, got 1/],
    [{ ...hf, tie_word_embeddings: "no" }, /'tie_word_embeddings' must be true or false, got "no"/],
    [{ ...hf, layer_norm_epsilon: "1e-5" }, /'layer_norm_epsilon' must be a positive number, got "1e-5"/],
    [{ ...hf, time_step_rank: 2.5 }, /'time_step_rank' must be "auto" or a positive integer, got 2\.5/],
    [{ ...hf, pad_vocab_size_multiple: 0 }, /'pad_vocab_size_multiple' must be a positive integer, got 0/],
    [{ ...hf, vocab_size: 64.5 }, /'vocab_size' must be a positive integer, got 64\.5/],
    [{ ...hf, time_step_init_scheme: "zeros" }, /'time_step_init_scheme' must be "random" or "constant"/],
    [{ ...hf, time_step_min: 0.5 }, /'time_step_min' 0\.5 is greater than 'time_step_max' 0\.1/],
    [{ ...hf, inner_layernorms: "yes" }, /'inner_layernorms' must be true or false/],
    [{ ...ss, n_layer: 2.5 }, /'n_layer' must be a positive integer, got 2\.5/],
    [{ ...ss, ssm_cfg: { ...ss.ssm_cfg, d_state: 2.5 } }, /'ssm_cfg\.d_state' must be a positive integer/],
    [{ ...ss, ssm_cfg: { ...ss.ssm_cfg, bias: "no" } }, /'ssm_cfg\.bias' must be true or false, got "no"/],
    [{ ...ss, ssm_cfg: { ...ss.ssm_cfg, expand: 1.5 } }, /'ssm_cfg\.expand' must be a positive integer/],
    [{ ...ss, ssm_cfg: [] }, /'ssm_cfg' must be an object/],
    [{ ...ss, tie_embeddings: 0 }, /'tie_embeddings' must be true or false, got 0/],
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
});

Deno.test("parseCheckpointConfig: keys that change the model are refused; residual_in_fp32 is accepted", async () => {
  const hf = await hfConfig();
  const ss = await ssConfig();
  const refused: [Record<string, unknown>, RegExp][] = [
    [{ ...hf, rms_norm: false }, /'rms_norm' false is not supported: the norms here are RMSNorm/],
    [{ ...hf, hidden_act: "gelu" }, /'hidden_act' "gelu" is not supported: .*SiLU/],
    [{ ...ss, rms_norm: false }, /'rms_norm' false is not supported/],
    [{ ...ss, d_intermediate: 128 }, /'d_intermediate' 128 is not supported: the blocks here have no MLP/],
    [{ ...ss, d_intermediate: -1 }, /'d_intermediate' must be an integer >= 0, got -1/],
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
    /rmsNormEps must be a positive finite number, got Infinity/,
  );
});
