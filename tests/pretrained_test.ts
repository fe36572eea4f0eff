/**
 * What `fromPretrained` and the configs refuse, and how they say so: config.json keys (named as config.json
 * spells them), keys that would change the model, checkpoint tensors the model has no parameter for, integer
 * and bool dtypes, URL loads that stall (against a local server), a missing folder that looks like a hub id;
 * the round trip of a model with inner layernorms; `mambaConfig` with keys set to undefined.
 * @module
 */

import assert from "node:assert/strict";
import { mambaConfig } from "../mamba/config.ts";

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
