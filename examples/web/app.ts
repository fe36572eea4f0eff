/// <reference lib="dom" />
/// <reference lib="dom.iterable" />
/**
 * The demo page's script (bundled into `out/web/app.js` by `deno task build:web`; served by `deno task web`).
 *
 * Generate: load a model (a local char model, a hub id, a URL, or picked files), type a prompt and watch the
 * tokens stream, Continue from where the text ends (the model's state kept: `generate`'s `from`); save the
 * model as downloads. Train: train the char model on the bundled text with a live
 * loss chart, then generate from it. The header shows the adapter, GPU memory from `memory()`, and the tokens/s
 * of the last generation and of the training, each in its own field.
 * `window.mambaDemo` exposes the state for the browser tests.
 * @module
 */

import { deviceInfo, deviceLost, init } from "../../core/device.ts";
import { memory } from "../../core/memory.ts";
import { manualSeed } from "../../core/random.ts";
import { dispose } from "../../core/tensor.ts";
import type { LayerCache } from "../../mamba/block.ts";
import { MambaLM } from "../../mamba/lm.ts";
import { type SampleOptions, sampleParams } from "../../mamba/sampling.ts";
import { checkpointFiles, fromPretrained, fromPretrainedFiles } from "../../mamba/pretrained.ts";
import { ByteTokenizer, StreamDecoder, type Tokenizer } from "../../mamba/tokenizer.ts";
import { CharDataset, DEFAULT_TRAIN, type TrainConfig, Trainer, type TrainLog } from "../../mamba/train.ts";

const $ = <T extends HTMLElement = HTMLElement>(id: string) => document.getElementById(id) as T;

/**
 * A number field's value, refused with a message that names the field as the page labels it where `ok` refuses
 * it (`want` says what it takes); an empty field is refused too (it is not 0), unless `empty` gives its value.
 */
function num(id: string, label: string, ok: (v: number) => boolean, want: string, empty?: number): number {
  const text = $<HTMLInputElement>(id).value.trim(); // "" also for text a number field cannot parse
  if (text === "" && empty !== undefined) return empty;
  const v = text === "" ? NaN : Number(text);
  if (!ok(v)) throw new Error(`${label} must be ${want}, got ${text === "" ? "an empty field" : text}`);
  return v;
}
const int = (min: number, max = Number.MAX_SAFE_INTEGER) => (v: number) =>
  Number.isSafeInteger(v) && v >= min && v <= max;
const positive = (v: number) => v > 0 && v < Infinity;

interface Loaded {
  lm: MambaLM;
  /** What generating uses. */
  tokenizer: Tokenizer;
  /** What Save writes with the model: a loaded model's own (none if it had none: the byte fallback used for
   * generating is not its tokenizer), the char model trained here's known characters. */
  saved: Tokenizer | null;
  /** What the model is, for the status line. */
  label: string;
  /** Where its tokenizer came from, for the status line ("" for a model's own tokenizer.json). */
  tokenizerNote: string;
}

/** What the tests read. */
interface DemoState {
  ready: boolean;
  error: string | null;
  model: string | null;
  /** A Load is fetching a model. */
  loading: boolean;
  generating: boolean;
  lastGeneration: { prompt: string; text: string; tokens: number; seconds: number } | null;
  training: boolean;
  trainLog: TrainLog | null;
  trainSample: string | null;
}

const state: DemoState = {
  ready: false,
  error: null,
  model: null,
  loading: false,
  generating: false,
  lastGeneration: null,
  training: false,
  trainLog: null,
  trainSample: null,
};
(globalThis as unknown as { mambaDemo: DemoState }).mambaDemo = state;

let current: Loaded | null = null;

/** Where the text in the output ends, for Continue: the model's caches after every token of it but the last,
 * which has not run through the model yet (the next generation's one-token prompt). */
interface Continuation {
  lm: MambaLM;
  caches: LayerCache[];
  last: number;
  /** Tokens generated into the text so far: a sampled Continue offsets its seed by them, so that its noise
   * is not the first run's again. */
  generated: number;
  /** The text's decoder, not flushed: a character split at the text's end (shown as U+FFFD meanwhile) comes out
   * whole when Continue pushes its last bytes. */
  decoder: StreamDecoder;
  /** The node the text ends in, and what it shows but the decoder's held-back part. */
  node: Text;
  shown: string;
}
let continuation: Continuation | null = null;

function dropContinuation(): void {
  if (continuation) dispose(continuation.caches);
  continuation = null;
}
let trained: Loaded | null = null;
/** A save is making its files (about three copies of the weights in the page): one at a time. */
let saving = false;
let stopTraining = false;
/** No WebGPU, or its device was lost: nothing can load, generate, train or save. */
let noGpu = false;

// A model that a generation, a save or the training's sample still uses is disposed only when the last of
// them ends: Load and Train replace models while such a job may be running (a load started before Generate
// was clicked finishes during the generation).
const inUse = new Map<MambaLM, number>();
const retired = new Set<MambaLM>();

/** Disposes `lm` now, or when the jobs using it end. */
function retire(lm: MambaLM): void {
  if (continuation?.lm === lm) dropContinuation();
  if (inUse.has(lm)) retired.add(lm);
  else lm.dispose();
}

/** Runs `job` with `lm` kept alive until it ends. */
async function using<T>(lm: MambaLM, job: () => Promise<T>): Promise<T> {
  inUse.set(lm, (inUse.get(lm) ?? 0) + 1);
  try {
    return await job();
  } finally {
    const n = inUse.get(lm)! - 1;
    if (n) inUse.set(lm, n);
    else {
      inUse.delete(lm);
      if (retired.delete(lm)) {
        lm.dispose();
        showMemory();
      }
    }
  }
}

/** Enables the buttons that can run now: nothing replaces a model while a generation runs (Load, Train). */
function updateButtons(): void {
  const button = (id: string) => $<HTMLButtonElement>(id);
  // until init() is done (the kernels' tuning measures then: a training meanwhile would skew what it picks)
  button("load").disabled = noGpu || !state.ready || state.loading || state.generating;
  button("train-start").disabled = noGpu || !state.ready || state.training || state.generating;
  button("train-stop").disabled = !state.training;
  button("generate").disabled = noGpu || !current || state.generating;
  button("generate-continue").disabled = noGpu || !current || state.generating ||
    continuation?.lm !== current.lm;
  button("generate-stop").disabled = !state.generating;
  button("save").disabled = noGpu || !current || saving;
}

function status(id: string, text: string, error = false): void {
  const el = $(id);
  el.textContent = text;
  el.classList.toggle("error", error);
}

const mib = (n: number) => `${(n / 2 ** 20).toFixed(1)} MiB`;

function showMemory(): void {
  if (!state.ready) return;
  const m = memory();
  $("memory").textContent = `${mib(m.liveBytes)} live, ${mib(m.peakBytes)} peak, ${
    mib(m.pooledBytes)
  } pooled`;
}

/** Tokens/s into the header's field for the job (`tps-generate`, `tps-train`): training and a generation may
 * run at once, and each keeps its own figure. */
function showSpeed(id: "tps-generate" | "tps-train", tokens: number, seconds: number): void {
  $(id).textContent = `${(tokens / Math.max(seconds, 1e-6)).toFixed(1)} tokens/s`;
}

function setCurrent(next: Loaded): void {
  if (current && current !== trained && current.lm !== next.lm) retire(current.lm);
  if (continuation && continuation.lm !== next.lm) dropContinuation(); // Continue is for the model shown
  retired.delete(next.lm);
  current = next;
  state.model = next.label;
  const lm = next.lm;
  status(
    "model-status",
    `${next.label}: ${lm.numParameters().toLocaleString()} parameters, d_model ${lm.config.dModel}, ` +
      `${lm.config.nLayers} layers, vocabulary ${lm.vocabSize}${
        lm.weightDtype === "bf16" ? ", bf16 weights" : ""
      }${next.tokenizerNote && `, ${next.tokenizerNote}`}`,
  );
  updateButtons();
  showMemory();
}

// ---- tabs ----

function selectTab(name: "generate" | "train"): void {
  for (const t of ["generate", "train"]) {
    $(`tab-${t}`).setAttribute("aria-selected", String(t === name));
    $(`panel-${t}`).hidden = t !== name;
  }
}
$("tab-generate").addEventListener("click", () => selectTab("generate"));
$("tab-train").addEventListener("click", () => selectTab("train"));

// ---- loading ----

const source = $<HTMLSelectElement>("model-source");
function showSourceInput(): void {
  $("hub-id").hidden = source.value !== "hub";
  $("model-url").hidden = source.value !== "url";
  $("model-files").hidden = source.value !== "files";
}
source.addEventListener("change", showSourceInput);

async function addLocalModels(): Promise<void> {
  // `deno task web` lists the char models it serves; a page hosted elsewhere has none.
  type LocalModel = { name: string; label: string; url: string };
  const isModel = (m: unknown): m is LocalModel =>
    typeof m === "object" && m !== null &&
    ["name", "label", "url"].every((k) => typeof (m as Record<string, unknown>)[k] === "string");
  let list: LocalModel[] = [];
  try {
    const res = await fetch("models.json");
    if (res.ok) {
      const json: unknown = await res.json();
      // A server other than `deno task web` may answer anything: use only a list of well-formed entries.
      if (Array.isArray(json)) list = json.filter(isModel);
      else console.warn("models.json is not a list of models; ignored");
    }
  } catch { /* no list */ }
  for (const m of list.reverse()) {
    const opt = document.createElement("option");
    opt.value = `local:${m.url}`;
    opt.textContent = m.label;
    source.prepend(opt);
  }
  if (list.length) source.value = source.options[0].value;
  showSourceInput();
}

async function loadModel(): Promise<void> {
  if (!state.ready || state.loading || state.generating) return; // (the buttons start disabled in the page)
  state.loading = true;
  updateButtons();
  const t0 = performance.now();
  try {
    const v = source.value;
    if (v === "trained") {
      if (trained) setCurrent(trained);
      return;
    }
    let label: string;
    let lm;
    status("model-status", "loading…");
    // A model without tokenizer.json (state-spaces' own repositories) takes another's, as mamba.py does.
    const tokenizerFrom = $<HTMLInputElement>("tokenizer-from").value.trim();
    const weightDtype = $<HTMLSelectElement>("weight-dtype").value === "bf16" ? "bf16" : "f32";
    const options = { weightDtype, ...(tokenizerFrom ? { tokenizer: tokenizerFrom } : {}) } as const;
    if (v.startsWith("local:")) {
      label = v.slice("local:".length).replace(/\/$/, "");
      lm = await fromPretrained(new URL(v.slice("local:".length), location.href).href, options);
    } else if (v === "hub") {
      label = $<HTMLInputElement>("hub-id").value.trim();
      if (!label) throw new Error("the hub id field is empty: type one, e.g. state-spaces/mamba-130m-hf");
      lm = await fromPretrained(label, options);
    } else if (v === "url") {
      label = $<HTMLInputElement>("model-url").value.trim();
      if (!label) throw new Error("the URL field is empty: give the folder that holds config.json");
      // the folder, not one of its files (a pasted link to config.json would look for config.json/config.json)
      label = label.replace(/\/(config\.json|model\.safetensors|pytorch_model\.bin)$/, "");
      let url: string;
      try {
        url = new URL(label, location.href).href;
      } catch {
        throw new Error(`the URL field holds no URL: '${label}'`);
      }
      lm = await fromPretrained(url, options);
    } else {
      const files = $<HTMLInputElement>("model-files").files;
      if (!files?.length) {
        throw new Error(
          "pick config.json, model.safetensors (or pytorch_model.bin) and (optionally) tokenizer.json",
        );
      }
      label = [...files].map((f) => f.name).join(", ");
      lm = await fromPretrainedFiles(files, { ...options, name: "picked files" });
    }
    setCurrent({
      lm,
      tokenizer: lm.tokenizer ?? new ByteTokenizer(),
      saved: lm.tokenizer,
      label: `${label} (loaded in ${((performance.now() - t0) / 1000).toFixed(1)} s)`,
      tokenizerNote: !lm.tokenizer
        ? `no tokenizer (${lm.noTokenizer}): bytes as tokens`
        : tokenizerFrom
        ? `tokenizer from ${tokenizerFrom}`
        : lm.tokenizer instanceof ByteTokenizer
        ? "bytes as tokens"
        : "",
    });
  } catch (e) {
    // the model loaded before is still the one Generate uses: said, since "loading…" replaced its line
    const stays = current ? `the model loaded before stays: ${current.label}` : "no model is loaded";
    status("model-status", `cannot load: ${(e as Error).message}; ${stays}`, true);
    state.error = (e as Error).message;
  } finally {
    state.loading = false;
    updateButtons();
  }
}
$("load").addEventListener("click", loadModel);

// ---- generating ----

/** Set by the Generate tab's Stop: the next tokens read back end the generation (generate frees its buffers as
 * it unwinds). The Train tab's sample stops on that tab's Stop (`stopTraining`). */
let stopGenerating = false;

/** Thrown from onTokens to end a generation the user stopped. */
class Stopped extends Error {}

/**
 * Streams n tokens into `target`: after `prompt` (which replaces what it shows), or with `from` after the text
 * it shows, from the model's state at its end; `stop()` true ends it (its tab's Stop: both tabs may generate
 * at once). With `keep` (the Generate tab's output, which Continue goes on from) the state at the new end
 * becomes `continuation` (also when the user stops it). `speed`: the header's field for its tokens/s (the
 * Generate tab's; the Train tab's sample shows none, since a generation may run meanwhile).
 */
async function streamText(
  target: HTMLElement,
  lm: MambaLM,
  tokenizer: Tokenizer,
  prompt: string,
  n: number,
  sampling: SampleOptions,
  stop: () => boolean,
  from: Continuation | null = null,
  keep = false,
  speed: "tps-generate" | null = null,
): Promise<{ text: string; tokens: number; seconds: number }> {
  let ids: number[] = [];
  if (!from) {
    target.textContent = "";
    const p = document.createElement("span");
    p.className = "prompt";
    p.textContent = prompt;
    target.append(p);
    ids = tokenizer.encode(prompt);
    if (!ids.length) throw new Error("the prompt is empty");
  }
  // Continue writes on into the node the text ends in, with that text's decoder
  const out = from?.node ?? target.appendChild(document.createTextNode(""));
  // a new text's decoder has the prompt as context (a SentencePiece decoder would drop the reply's first space)
  const decoder = from?.decoder ?? new StreamDecoder(tokenizer, { skipSpecialTokens: true, context: ids });
  const before = from?.shown ?? "";
  let text = ""; // this run's
  let got = 0;
  const reply: number[] = [];
  const t0 = performance.now();
  let ended = false; // generated all, or stopped: the state at the text's end is worth keeping
  try {
    // a hub model's end-of-text token ends the reply, as in deno task generate (bytes have no such token)
    const eos = tokenizer instanceof ByteTokenizer ? null : tokenizer.specialTokens.eos;
    await lm.generate([from ? [from.last] : ids], n, {
      ...sampling,
      ...(eos === null ? {} : { stopTokens: [eos] }),
      ...(from ? { from: from.caches } : {}),
      readEvery: 8,
      onTokens: (fresh) => {
        if (stop()) throw new Stopped(`stopped after ${got} tokens`);
        got += fresh[0].length;
        reply.push(...fresh[0]);
        text += decoder.push(fresh[0]);
        out.textContent = before + text;
        if (speed) showSpeed(speed, got, (performance.now() - t0) / 1000);
        showMemory();
      },
    });
    ended = true;
  } catch (e) {
    if (e instanceof Stopped) ended = true;
    throw e;
  } finally {
    if (keep) keepEnd(lm, ended, from, ids, reply, { decoder, node: out, shown: before + text });
  }
  // what is held back is shown; flushed unless Continue may complete it
  text += continuation?.decoder === decoder ? decoder.held() : decoder.flush();
  out.textContent = before + text;
  const seconds = (performance.now() - t0) / 1000;
  if (speed) showSpeed(speed, got, seconds);
  showMemory(); // what the generation left (its buffers are back in the pool)
  return { text, tokens: got, seconds };
}

/** After a generation: the caches at the end of the text, for Continue (dropped where it failed part-way). The
 * tokens that have not run through the model are the new ones but the last, after the prompt's or the one
 * `from` left: one forward over them from `from`'s caches (or from the start). */
function keepEnd(
  lm: MambaLM,
  ended: boolean,
  from: Continuation | null,
  prompt: number[],
  reply: number[],
  end: Pick<Continuation, "decoder" | "node" | "shown">,
): void {
  const all = [...(from ? [from.last] : prompt), ...reply];
  const generated = (from?.generated ?? 0) + reply.length;
  const base = from?.caches ?? null; // the generation's own (generate took them): disposed once replaced
  if (ended && all.length > 1) {
    try {
      const r = lm.prefill([all.slice(0, -1)], base);
      r.logits.dispose();
      dropContinuation();
      continuation = { lm, caches: r.caches, last: all[all.length - 1], generated, ...end };
    } catch {
      dropContinuation(); // out of memory: Continue stays off
    }
  } else if (from && reply.length === 0) {
    continuation = from; // no new token (stopped at once, or options refused before any work): the same end
  } else if (ended) {
    dropContinuation();
    continuation = { lm, caches: lm.emptyCache(1), last: all[0], generated, ...end };
  } else {
    dropContinuation();
  }
  if (base && continuation?.caches !== base) dispose(base);
  // a model replaced while this generation ran (a Load or Train finishing meanwhile): nothing to continue
  if (continuation && (retired.has(lm) || continuation.lm !== current?.lm)) dropContinuation();
}

async function generate(continueText = false): Promise<void> {
  if (!current || state.generating) return;
  if (continueText && continuation?.lm !== current.lm) return;
  const { lm, tokenizer } = current;
  state.generating = true;
  stopGenerating = false;
  updateButtons();
  status("generate-status", "generating…");
  try {
    // Every setting is checked before the output and the state Continue needs are touched: a refused one
    // leaves both as they were.
    const prompt = $<HTMLTextAreaElement>("prompt").value;
    if (!continueText && !tokenizer.encode(prompt).length) throw new Error("the prompt is empty");
    // the field's own bounds: a run past them could not be stopped short of reloading the page
    const n = num("n-tokens", "tokens", int(1, 4096), "an integer from 1 to 4096");
    // Greedy decoding reads none of the sampling fields (a cleared or 0 temperature is no error then); the
    // repetition penalty acts on both (a cleared field: none).
    const repetitionPenalty = num("repetition-penalty", "repetition penalty", positive, "a number > 0", 1);
    const sampling = $<HTMLSelectElement>("decoding").value === "sample"
      ? {
        sample: true,
        temperature: num("temperature", "temperature", positive, "a number > 0"),
        topK: num("top-k", "top-k", int(0, 2 ** 32 - 1), "an integer >= 0 (0: all)"),
        topP: num("top-p", "top-p", (v) => v > 0 && v <= 1, "a number in (0, 1]"),
        minP: num("min-p", "min-p", (v) => v >= 0 && v <= 1, "a number in [0, 1]"),
        // Continue: offset by the tokens already generated, else its noise would be the first run's again
        seed: num("seed", "seed", int(0), "an integer >= 0") +
          (continueText ? continuation?.generated ?? 0 : 0),
        repetitionPenalty,
      }
      : { sample: false, repetitionPenalty };
    sampleParams(sampling); // what generate would refuse, refused now
    // Continue takes the state over (a model loaded meanwhile drops only what is left in `continuation`)
    const from = continueText ? continuation : null;
    if (from) continuation = null;
    else dropContinuation();
    const r = await using(
      lm,
      () =>
        streamText(
          $("output"),
          lm,
          tokenizer,
          prompt,
          n,
          sampling,
          () => stopGenerating,
          from,
          true,
          "tps-generate",
        ),
    );
    state.lastGeneration = { prompt, ...r };
    status(
      "generate-status",
      `${r.tokens} tokens in ${r.seconds.toFixed(2)} s (${(r.tokens / r.seconds).toFixed(1)} tokens/s, ` +
        `prompt included)`,
    );
  } catch (e) {
    if (e instanceof Stopped) {
      status("generate-status", e.message);
    } else {
      status("generate-status", (e as Error).message, true);
      state.error = (e as Error).message;
    }
  } finally {
    state.generating = false;
    updateButtons();
  }
}
$("generate").addEventListener("click", () => generate());
$("generate-continue").addEventListener("click", () => generate(true));
$("generate-stop").addEventListener("click", () => stopGenerating = true);

// ---- saving as downloads ----

async function save(): Promise<void> {
  if (!current || saving) return;
  const { lm, saved } = current;
  status("model-status", "saving…");
  saving = true;
  updateButtons();
  try {
    const files = await using(lm, () => checkpointFiles(lm, saved));
    for (const [name, bytes] of Object.entries(files)) {
      const a = document.createElement("a");
      a.href = URL.createObjectURL(new Blob([bytes]));
      a.download = name;
      document.body.append(a);
      a.click();
      a.remove();
      setTimeout(() => URL.revokeObjectURL(a.href), 10_000);
    }
    status("model-status", `saved ${Object.keys(files).join(", ")} as downloads`);
  } catch (e) {
    // a large model's files are about three copies of its weights in the page: this can fail
    status("model-status", `saving failed: ${(e as Error).message}`, true);
    state.error = (e as Error).message;
  } finally {
    saving = false;
    updateButtons();
  }
}
$("save").addEventListener("click", save);

// ---- training ----

const SVG = "http://www.w3.org/2000/svg";

function drawChart(log: TrainLog, totalSteps: number): void {
  const svg = $("loss-chart") as unknown as SVGSVGElement;
  const W = 900, H = 260, left = 50, right = 12, top = 14, bottom = 28;
  // a diverged run's NaN or infinite losses are left out (they have no place on the chart)
  const finite = (points: [number, number][]) => points.filter(([, l]) => Number.isFinite(l));
  const train = finite(log.train), val = finite(log.val);
  const all = [...train, ...val].map(([, l]) => l);
  const hi = Math.max(...all, 1e-3), lo = Math.min(...all, hi) * 0.95;
  const x = (s: number) => left + (s / Math.max(totalSteps, 1)) * (W - left - right);
  const y = (l: number) => top + (1 - (l - lo) / Math.max(hi - lo, 1e-6)) * (H - top - bottom);
  const el = (name: string, attrs: Record<string, string | number>, text?: string) => {
    const e = document.createElementNS(SVG, name);
    for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, String(v));
    if (text !== undefined) e.textContent = text;
    return e;
  };
  svg.replaceChildren(
    el("line", { x1: left, y1: H - bottom, x2: W - right, y2: H - bottom, stroke: "#999" }),
    el("line", { x1: left, y1: top, x2: left, y2: H - bottom, stroke: "#999" }),
    el("text", { x: 4, y: top + 10, "font-size": 12, fill: "#555" }, hi.toFixed(2)),
    el("text", { x: 4, y: H - bottom, "font-size": 12, fill: "#555" }, lo.toFixed(2)),
    el("text", { x: W - right - 60, y: H - 8, "font-size": 12, fill: "#555" }, `step ${totalSteps}`),
    el("text", { x: left + 8, y: H - 8, "font-size": 12, fill: "#2f6fde" }, "train loss"),
    el("text", { x: left + 90, y: H - 8, "font-size": 12, fill: "#d9822b" }, "validation loss"),
    el("polyline", {
      points: train.map(([s, l]) => `${x(s).toFixed(1)},${y(l).toFixed(1)}`).join(" "),
      fill: "none",
      stroke: "#2f6fde",
      "stroke-width": 2,
    }),
    ...val.map(([s, l]) => el("circle", { cx: x(s), cy: y(l), r: 4, fill: "#d9822b" })),
  );
}

let textBytes: Uint8Array | null = null;

async function train(): Promise<void> {
  if (!state.ready || state.training || state.generating) return;
  stopTraining = false;
  state.training = true;
  updateButtons();
  state.trainLog = null;
  state.trainSample = null;
  let trainer: Trainer | null = null;
  let model: MambaLM | null = null;
  try {
    status("train-status", "fetching the text…");
    if (!textBytes) {
      const res = await fetch("data/pride_and_prejudice.txt");
      if (!res.ok) throw new Error(`cannot fetch data/pride_and_prejudice.txt: HTTP ${res.status}`);
      textBytes = new Uint8Array(await res.arrayBuffer());
    }
    const data = new CharDataset(textBytes);
    const steps = num("train-steps", "steps", int(1), "an integer >= 1");
    const lr = num("train-lr", "learning rate", positive, "a number > 0");
    const config: TrainConfig = {
      ...DEFAULT_TRAIN,
      steps,
      batch: num("train-batch", "batch", int(1), "an integer >= 1"),
      seq: num("train-seq", "sequence", int(1), "an integer >= 1"),
      lr,
      minLr: lr / 10,
      warmup: Math.min(DEFAULT_TRAIN.warmup, Math.floor(steps / 10)),
      evalEvery: Math.max(1, Math.ceil(steps / 5)),
      evalBatches: 4,
      logEvery: Math.max(1, Math.min(10, Math.ceil(steps / 20))),
    };
    manualSeed(config.seed);
    // the new model and its trainer first: a setting they refuse leaves the model trained before in place
    const fresh = new MambaLM(
      {
        dModel: num("train-dmodel", "d_model", int(1, 2 ** 31 - 1), "an integer >= 1"),
        nLayers: num("train-layers", "layers", int(1, 2 ** 31 - 1), "an integer >= 1"),
        dState: 16,
      },
      { vocabSize: 256 },
    );
    try {
      trainer = new Trainer(fresh, data, config);
    } catch (e) {
      fresh.dispose();
      throw e;
    }
    model = fresh;
    state.trainLog = trainer.log;
    const t0 = performance.now();
    let lastVal = await trainer.evaluate();
    let lastLoss = NaN;
    drawChart(trainer.log, steps);
    while (trainer.step < steps && !stopTraining) {
      const mean = await trainer.trainStep();
      const step = trainer.step;
      if (step % config.evalEvery === 0 || step === steps) lastVal = await trainer.evaluate();
      if (mean === null) continue;
      lastLoss = mean;
      const secs = (performance.now() - t0) / 1000;
      trainer.log.time.push([step, secs]);
      showSpeed("tps-train", step * config.batch * config.seq, secs);
      showMemory();
      status(
        "train-status",
        `step ${step}/${steps}  loss ${lastLoss.toFixed(3)}  validation ${lastVal.toFixed(3)}  ` +
          `${secs.toFixed(0)} s`,
      );
      drawChart(trainer.log, steps);
      await new Promise((r) => setTimeout(r, 0)); // let the page repaint
    }
    const endedByStop = stopTraining;
    if (trainer.step === 0) {
      // stopped before its first step: the model trained before (if any) stays
      retire(model);
      model = null;
      status(
        "train-status",
        "stopped before the first step" + (trained ? ": the model trained before stays" : ""),
      );
      return;
    }
    if (trainer.log.val.at(-1)?.[0] !== trainer.step) lastVal = await trainer.evaluate();
    drawChart(trainer.log, steps);
    const secs = (performance.now() - t0) / 1000;
    if (trained) {
      // replaced by this run's model
      if (current === trained) {
        current = null;
        state.model = null;
        status("model-status", "no model loaded (the Train tab trained a new one: load it from the list)");
        updateButtons();
      }
      retire(trained.lm);
      trained = null;
    }
    status(
      "train-status",
      `trained ${trainer.step} steps in ${secs.toFixed(1)} s: validation loss ${
        trainer.log.val[0][1].toFixed(3)
      } → ${lastVal.toFixed(3)} nats/char. Sampling…`,
    );
    trained = {
      lm: model,
      tokenizer: new ByteTokenizer(), // any prompt, as before
      saved: new ByteTokenizer([...data.train, ...data.val]), // the characters it knows
      label: `char model trained here (${trainer.step} steps)`,
      tokenizerNote: "bytes as tokens",
    };
    (source.querySelector('option[value="trained"]') as HTMLOptionElement).disabled = false;
    const prompt = $<HTMLTextAreaElement>("prompt").value || "It is a truth";
    const lm = model, tokenizer = trained.tokenizer;
    let sample = ""; // a Stop while it samples ends the sample only: the model is trained
    if (endedByStop) stopTraining = false; // a Stop that ended the training is not the sample's (one since is)
    try {
      const r = await using(lm, () =>
        streamText($("train-sample"), lm, tokenizer, prompt, 200, {
          sample: true,
          temperature: 0.7,
          topK: 20,
          seed: 1,
        }, () => stopTraining));
      state.trainSample = r.text;
    } catch (e) {
      if (!(e instanceof Stopped)) throw e;
      sample = ` The sample was ${e.message}.`;
    }
    status(
      "train-status",
      `trained ${trainer.step} steps in ${secs.toFixed(1)} s: validation loss ${
        trainer.log.val[0][1].toFixed(3)
      } → ${
        lastVal.toFixed(3)
      } nats/char.${sample} The Generate tab can use this model ("the model trained ` +
        `in the Train tab").`,
    );
  } catch (e) {
    status("train-status", (e as Error).message, true);
    state.error = (e as Error).message;
    if (model && trained?.lm !== model) retire(model);
  } finally {
    trainer?.dispose();
    showMemory(); // without the trainer's gradients and optimizer state
    state.training = false;
    updateButtons();
  }
}
$("train-start").addEventListener("click", train);
$("train-stop").addEventListener("click", () => (stopTraining = true));

// ---- start ----

async function start(): Promise<void> {
  showSourceInput();
  deviceLost().then(showLoss); // a device lost while the page is idle shows now, not at the next click
  try {
    // init() measures the kernel variants the first time a browser runs this page (up to about a minute on a
    // software adapter; cached after): say so rather than "starting…" all along
    $("adapter").textContent = "starting… (measuring kernel variants on first use: up to a minute)";
    await init();
    const info = deviceInfo();
    let name = info.description;
    if (name === "unknown adapter") {
      // Chrome leaves the description empty; its architecture names the implementation (swiftshader, ...).
      const a = await navigator.gpu.requestAdapter();
      name = [a?.info.vendor, a?.info.architecture].filter(Boolean).join(" ") || name;
    }
    $("adapter").textContent = name + (info.isFallbackAdapter ? " (software adapter: CPU speed)" : "");
    state.ready = true;
    updateButtons();
    showMemory();
    await addLocalModels();
  } catch (e) {
    if (noGpu) return; // lost (during init() too): said already
    $("adapter").textContent = "no WebGPU";
    // init()'s message says what a browser user can do (Chrome and Edge have WebGPU)
    status("model-status", (e as Error).message, true);
    state.error = (e as Error).message;
    noGpu = true;
    updateButtons();
  }
}

/** The device is gone for good: nothing can run until the page is reloaded. */
function showLoss(reason: string): void {
  noGpu = true;
  status("adapter", reason.replace(/ mamba\.ts does not acquire.*/, " Reload the page."), true);
  state.error = reason;
  updateButtons();
}

start();
