/**
 * Perplexity of a language model on a text's token ids, as Hugging Face's perplexity guide computes it with
 * max_length seq + 1 and stride seq (with a stride equal to its max_length, the guide leaves each window's
 * first id unpredicted): the ids are cut into consecutive windows of `seq` predictions (seq + 1 ids, each
 * window's last id the next one's first), every id but the first is predicted once from the ids before it in
 * its window, and the mean negative log-likelihood is summed on the GPU and read back once.
 *
 * With `carryState`, each window goes on from the model's state after the windows before it
 * (`MambaLM.prefill`'s caches): every id is then predicted from all the ids before it, as one forward over the
 * whole text would, in the memory of one window (a Transformer cannot: its context is its window).
 * @module
 */

import { tensor } from "../core/creation.ts";
import { readBuffer, recordCopy } from "../core/executor.ts";
import { noGrad } from "../core/autograd.ts";
import { checkOptionKeys } from "../core/options.ts";
import { crossEntropy, mul, narrow } from "../core/ops/index.ts";
import { dispose, keep, tidy } from "../core/tensor.ts";
import type { LayerCache } from "./block.ts";
import type { MambaLM } from "./lm.ts";

/** Options of {@linkcode perplexity}. */
export interface PerplexityOptions {
  /** Predictions per window: each id is predicted from at most seq ids before it (with `carryState`, from all the
   * ids before it; default 1024). */
  seq?: number;
  /** Windows per forward pass (default 1; the last, shorter window runs alone). 1 with `carryState`. */
  batch?: number;
  /** Each window goes on from the state after the windows before it: every id is predicted from all the ids
   * before it (default false: from its window's only, as Hugging Face's guide). Needs `batch` 1. */
  carryState?: boolean;
  /** Called after each forward pass with the ids predicted so far and in all (before they are read back). */
  onProgress?: (done: number, total: number) => void;
}

const OPTION_KEYS = ["seq", "batch", "carryState", "onProgress"];

/** What {@linkcode perplexity} measured. */
export interface PerplexityResult {
  /** Mean negative log-likelihood per predicted id, in nats. */
  loss: number;
  /** exp(loss). */
  perplexity: number;
  /** Ids predicted: all but the first. */
  tokens: number;
  /** Windows (forward rows). */
  windows: number;
  /** The summed negative log-likelihood, in nats (bits per byte: nll / ln 2 / the text's bytes). */
  nll: number;
}

/**
 * The perplexity of `lm` on `ids` (at least 2, each in its vocabulary), in windows of `seq` predictions
 * (see the module). Runs without gradients; one readback at the end. An unknown option is an error (the
 * guide's stride is `seq` here: windows share their boundary id only).
 */
export async function perplexity(
  lm: MambaLM,
  ids: ArrayLike<number>,
  options: PerplexityOptions = {},
): Promise<PerplexityResult> {
  // named: HF's guide has a stride (here the window, seq), which would otherwise be ignored silently
  checkOptionKeys(options, OPTION_KEYS, "perplexity");
  const { seq = 1024, batch = 1, carryState = false } = options;
  for (const [name, v] of [["seq", seq], ["batch", batch]] as const) {
    if (!Number.isSafeInteger(v) || v < 1) {
      throw new Error(`perplexity: ${name} must be an integer >= 1, got ${v}`);
    }
  }
  if (typeof carryState !== "boolean") {
    throw new Error(`perplexity: carryState must be true or false, got ${JSON.stringify(carryState)}`);
  }
  if (carryState && batch !== 1) {
    throw new Error(
      `perplexity: carryState runs the windows one after another: batch must be 1, got ${batch}`,
    );
  }
  if (ids.length < 2) throw new Error(`perplexity: needs at least 2 ids (one to predict), got ${ids.length}`);
  for (let i = 0; i < ids.length; i++) {
    const v = ids[i];
    if (!Number.isInteger(v) || v < 0 || v >= lm.vocabSize) {
      throw new Error(`perplexity: id ${v} at index ${i} is outside the vocabulary [0, ${lm.vocabSize})`);
    }
  }
  const tokens = ids.length - 1;
  const full = Math.floor(tokens / seq); // windows of seq predictions; then one of the rest
  const rest = tokens - full * seq;
  // passes: [first window, windows, predictions each]
  const passes: [number, number, number][] = [];
  for (let w = 0; w < full; w += batch) passes.push([w, Math.min(batch, full - w), seq]);
  if (rest > 0) passes.push([full, 1, rest]);
  const sums = keep(tensor(new Float32Array(passes.length), [passes.length])); // sums: (passes), nats
  let caches: LayerCache[] | null = null; // with carryState: the state after the windows so far
  try {
    let done = 0;
    passes.forEach(([w0, B, L], p) => {
      tidy(() =>
        noGrad(() => {
          const rows = new Int32Array(B * (L + 1));
          for (let b = 0; b < B; b++) {
            const at = (w0 + b) * seq;
            for (let t = 0; t <= L; t++) rows[b * (L + 1) + t] = ids[at + t];
          }
          const x = tensor(rows, [B, L + 1], { dtype: "i32" }); // x: (B, L + 1)
          let logits; // logits: (B, L, vocab)
          if (carryState) {
            const r = lm.prefill(narrow(x, 1, 0, L), caches, { logits: "all" });
            dispose(caches);
            // the new state outlives this pass's tidy
            for (const c of r.caches) [c.h, c.inputs].forEach((t) => keep(t));
            caches = r.caches;
            logits = r.logits;
          } else {
            logits = lm.forward(narrow(x, 1, 0, L));
          }
          const nll = mul(crossEntropy(logits, narrow(x, 1, 1, L)), B * L); // nll: [], summed over B L
          recordCopy(nll.storage.buffer, 0, sums.storage.buffer, 4 * p, 4);
        })
      );
      done += B * L;
      options.onProgress?.(done, tokens);
    });
    const parts = new Float32Array(await readBuffer(sums.storage.buffer, 0, 4 * passes.length));
    const nll = parts.reduce((a, b) => a + b, 0); // summed in f64 here
    const loss = nll / tokens;
    return { loss, perplexity: Math.exp(loss), tokens, windows: full + (rest > 0 ? 1 : 0), nll };
  } finally {
    sums.dispose();
    dispose(caches);
  }
}
