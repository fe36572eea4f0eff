/**
 * Tokenizers behind one small interface, {@linkcode Tokenizer}, with two implementations:
 *
 * - {@linkcode HubTokenizer}: a Hugging Face `tokenizer.json` (+ `tokenizer_config.json`), run by the
 *   `@huggingface/tokenizers` package (pure JavaScript: Deno and browsers). This is the GPT-NeoX byte-level
 *   BPE of the `state-spaces/mamba-*-hf` models, or any other tokenizer that package supports.
 * - {@linkcode ByteTokenizer}: the byte-level character tokenizer of the char models (token id = byte value).
 *
 * {@linkcode StreamDecoder} turns a stream of token ids into text for either one, holding back a character
 * whose UTF-8 bytes are split across tokens until it is complete. No Deno APIs here: this file runs in
 * browsers too; reading the files is `model_sources.ts`'s job.
 * @module
 */

import { Tokenizer as HFTokenizer } from "@huggingface/tokenizers";

/** Ids of the special tokens a tokenizer declares (null where it declares none). */
export interface SpecialTokens {
  /** Beginning of sequence. */
  bos: number | null;
  /** End of sequence: `MambaLM.generate` stops a row at it when given as `stopTokens: [eos]` (deno task
   * generate does), else produces `nTokens` tokens. */
  eos: number | null;
  /** Padding. */
  pad: number | null;
  /** Unknown token. */
  unk: number | null;
}

/** Options of {@linkcode Tokenizer.encode}. */
export interface EncodeOptions {
  /** Add the special tokens the tokenizer's post-processor adds (e.g. a BOS); default true. */
  addSpecialTokens?: boolean;
}

/** Options of {@linkcode Tokenizer.decode}. */
export interface DecodeOptions {
  /** Leave special tokens (`<|endoftext|>`, ...) out of the text; default false. */
  skipSpecialTokens?: boolean;
  /**
   * transformers' clean-up of tokenization spaces (" ." to ".", " n't" to "n't", ...: see
   * {@linkcode cleanUpTokenization}); default: the tokenizer's own {@linkcode Tokenizer.cleanUpTokenizationSpaces}.
   * A tokenizer that never cleans up (ByteTokenizer) ignores it.
   */
  cleanUpTokenizationSpaces?: boolean;
}

/**
 * The parsed files that describe a tokenizer, as a checkpoint stores them: `tokenizer.json` and, when there is
 * one, `tokenizer_config.json`. {@linkcode tokenizerFromJSON} builds the tokenizer back from them.
 */
export interface TokenizerFiles {
  /** `tokenizer.json`. */
  tokenizer: Record<string, unknown>;
  /** `tokenizer_config.json` (special tokens), when the tokenizer has one. */
  config?: Record<string, unknown>;
}

/** What generation needs from a tokenizer. */
export interface Tokenizer {
  /** Number of token ids: 1 + the largest id, added tokens included. */
  readonly vocabSize: number;
  /** Special token ids. */
  readonly specialTokens: SpecialTokens;
  /** Whether `decode` applies transformers' clean-up of tokenization spaces unless told (absent: it does not);
   * {@linkcode StreamDecoder} reads it to apply the clean-up to a stream as a whole decode would. */
  readonly cleanUpTokenizationSpaces?: boolean;
  /** Text to ids. */
  encode(text: string, options?: EncodeOptions): number[];
  /** Ids to text; an incomplete UTF-8 character at either end decodes to U+FFFD. */
  decode(ids: ArrayLike<number>, options?: DecodeOptions): string;
  /** The files to save with a model (`saveCheckpoint` needs it); optional for tokenizers of your own. */
  toFiles?(): TokenizerFiles;
}

const NO_SPECIAL: SpecialTokens = Object.freeze({ bos: null, eos: null, pad: null, unk: null });

/** A character as an error shows it: quoted, or U+XXXX where it does not show (a byte-order mark, a control
 * character, a space other than ' '). */
function showChar(c: string): string {
  if (c === " " || !/[\p{C}\p{Z}]/u.test(c)) return JSON.stringify(c);
  const u = `U+${c.codePointAt(0)!.toString(16).toUpperCase().padStart(4, "0")}`;
  return c === "\uFEFF" ? `${u} (byte-order mark)` : u;
}

/** Byte-level tokenizer: UTF-8 bytes are the ids (vocabulary 256). */
export class ByteTokenizer implements Tokenizer {
  /** Always 256. */
  readonly vocabSize: number = 256;
  /** None. */
  readonly specialTokens: SpecialTokens = NO_SPECIAL;
  /** Never: bytes are the text. */
  readonly cleanUpTokenizationSpaces: boolean = false;
  /** Characters the model saw in training (from tokenizer.json), if known. */
  readonly known: Set<number> | null;

  /** `known`: ids that occur in training; `encode` rejects other characters when given. */
  constructor(known?: Iterable<number>) {
    this.known = known ? new Set(known) : null;
  }

  /**
   * Reads a char-model tokenizer.json (`char_to_id`, whose ids must be the bytes: each key one character below
   * U+0100 whose code is its id, as `toFiles` writes it). A map of characters to ids of its own (a dense
   * char-level vocabulary) is an error: this tokenizer could not decode it.
   */
  static fromJSON(json: { char_to_id?: Record<string, number> }): ByteTokenizer {
    const map = json.char_to_id;
    if (map === undefined) return new ByteTokenizer();
    if (typeof map !== "object" || map === null || Array.isArray(map)) {
      throw new Error(`char_to_id must be an object of characters to byte ids, got ${JSON.stringify(map)}`);
    }
    for (const [ch, id] of Object.entries(map)) {
      if (ch.length !== 1 || ch.charCodeAt(0) > 255 || id !== ch.charCodeAt(0)) {
        throw new Error(
          `char_to_id maps ${JSON.stringify(ch)} to ${
            JSON.stringify(id)
          }: a byte-level char model's ids are ` +
            "the bytes (each key one character below U+0100, its id that character's code); a vocabulary of " +
            "its own is not supported",
        );
      }
    }
    return new ByteTokenizer(Object.values(map));
  }

  /** UTF-8 bytes of the text; with a known set, unknown characters give an error naming them. */
  encode(text: string, _options?: EncodeOptions): number[] {
    const ids = [...new TextEncoder().encode(text)];
    if (this.known) {
      const bad = [
        ...new Set(
          [...text].filter((ch) => [...new TextEncoder().encode(ch)].some((b) => !this.known!.has(b))),
        ),
      ];
      if (bad.length) {
        throw new Error(
          `the text has characters this tokenizer does not know (the model never saw them): ${
            bad.map(showChar).join(", ")
          }`,
        );
      }
    }
    return ids;
  }

  /**
   * The bytes themselves as ids, as training reads a text (one that is not UTF-8 too); with a known set,
   * unknown bytes give an error naming them (the characters, where the bytes are UTF-8).
   */
  encodeBytes(bytes: Uint8Array): number[] {
    const bad = this.known ? [...new Set(bytes)].filter((b) => !this.known!.has(b)) : [];
    if (bad.length) {
      let text: string | null = null;
      try {
        text = new TextDecoder("utf-8", { fatal: true, ignoreBOM: true }).decode(bytes);
      } catch { /* not UTF-8: the bytes are named */ }
      if (text !== null) this.encode(text); // throws, naming the characters
      throw new Error(
        `the text has bytes this tokenizer does not know (the model never saw them): ${
          bad.map((b) => `0x${b.toString(16).toUpperCase().padStart(2, "0")}`).join(", ")
        }`,
      );
    }
    return [...bytes];
  }

  /** Whole-text decode (a leading byte-order mark kept: it was a byte of the text). Ids outside 0..255 are an
   * error. */
  decode(ids: ArrayLike<number>, _options?: DecodeOptions): string {
    return new TextDecoder("utf-8", { ignoreBOM: true }).decode(bytesOf(ids));
  }

  /** The char-model `tokenizer.json` (`char_to_id` lists the known bytes, when there is a known set). */
  toFiles(): TokenizerFiles {
    const tokenizer: Record<string, unknown> = { type: "byte-level characters", vocab_size: 256 };
    if (this.known) {
      const charToId: Record<string, number> = {};
      for (const b of [...this.known].sort((a, b) => a - b)) charToId[String.fromCharCode(b)] = b;
      tokenizer.char_to_id = charToId;
    }
    return { tokenizer };
  }
}

function bytesOf(ids: ArrayLike<number>): Uint8Array {
  const out = new Uint8Array(ids.length);
  for (let i = 0; i < ids.length; i++) {
    const id = ids[i];
    if (!Number.isInteger(id) || id < 0 || id > 255) {
      throw new Error(`ByteTokenizer: id ${id} is not a byte (0..255)`);
    }
    out[i] = id;
  }
  return out;
}

// A special token in tokenizer_config.json: a string or an AddedToken object ({"content": ...}).
function tokenText(v: unknown): string | null {
  if (typeof v === "string") return v;
  if (v && typeof v === "object" && typeof (v as { content?: unknown }).content === "string") {
    return (v as { content: string }).content;
  }
  return null;
}

/**
 * A Hugging Face tokenizer (`tokenizer.json` and, optionally, `tokenizer_config.json`) run by
 * `@huggingface/tokenizers`: byte-level BPE (GPT-NeoX, GPT-2), and the other models that package supports.
 */
export class HubTokenizer implements Tokenizer {
  /** 1 + the largest id of the vocabulary and the added tokens. */
  readonly vocabSize: number;
  /** From `tokenizer_config.json` (`bos_token`, `eos_token`, `pad_token`, `unk_token`). */
  readonly specialTokens: SpecialTokens;
  /** The `model.type` of tokenizer.json ("BPE", "Unigram", ...). */
  readonly modelType: string;
  /** tokenizer_config.json's `clean_up_tokenization_spaces`; true where it has none, as @huggingface/tokenizers
   * (and transformers before 4.45) take it. */
  readonly cleanUpTokenizationSpaces: boolean;
  #tok: HFTokenizer;
  #files: TokenizerFiles;

  /**
   * `tokenizerJson`: the parsed `tokenizer.json`; `config`: the parsed `tokenizer_config.json` (optional).
   * Throws a clear error when the JSON is not a tokenizers file or uses something the package lacks.
   */
  constructor(tokenizerJson: Record<string, unknown>, config: Record<string, unknown> = {}) {
    const model = tokenizerJson?.model as Record<string, unknown> | undefined;
    if (!model || typeof model !== "object") {
      throw new Error("tokenizer.json has no 'model': not a Hugging Face tokenizers file");
    }
    this.modelType = String(model.type ?? "unknown");
    this.#files = { tokenizer: tokenizerJson, ...(Object.keys(config).length > 0 ? { config } : {}) };
    try {
      this.#tok = new HFTokenizer(tokenizerJson, config);
    } catch (e) {
      throw new Error(`cannot build the ${this.modelType} tokenizer: ${(e as Error).message}`, { cause: e });
    }
    let max = -1;
    for (const id of this.#tok.get_vocab(true).values()) if (id > max) max = id;
    this.vocabSize = max + 1;
    const id = (key: string): number | null => {
      const text = tokenText(config[key]);
      return text === null ? null : this.#tok.token_to_id(text) ?? null;
    };
    const cleanUp = config.clean_up_tokenization_spaces ?? true;
    if (typeof cleanUp !== "boolean") {
      throw new Error(
        `tokenizer_config.json: 'clean_up_tokenization_spaces' must be true or false, got ${
          JSON.stringify(cleanUp)
        }`,
      );
    }
    this.cleanUpTokenizationSpaces = cleanUp;
    this.specialTokens = Object.freeze({
      bos: id("bos_token"),
      eos: id("eos_token"),
      pad: id("pad_token"),
      unk: id("unk_token"),
    });
  }

  /** Text to ids (special tokens in the text are recognised; `addSpecialTokens` as the post-processor). */
  encode(text: string, options: EncodeOptions = {}): number[] {
    return this.#tok.encode(text, { add_special_tokens: options.addSpecialTokens ?? true }).ids;
  }

  /** Ids to text ("" for no ids, as ByteTokenizer; the tokenizers library throws there). */
  decode(ids: ArrayLike<number>, options: DecodeOptions = {}): string {
    if (ids.length === 0) return "";
    return this.#tok.decode(Array.from(ids), {
      skip_special_tokens: options.skipSpecialTokens ?? false,
      clean_up_tokenization_spaces: options.cleanUpTokenizationSpaces ?? this.cleanUpTokenizationSpaces,
    });
  }

  /** The id of a token string, or null. */
  tokenToId(token: string): number | null {
    return this.#tok.token_to_id(token) ?? null;
  }

  /** The token string of an id, or null. */
  idToToken(id: number): string | null {
    return this.#tok.id_to_token(id) ?? null;
  }

  /** The `tokenizer.json` and `tokenizer_config.json` it was built from (the objects given, not copies). */
  toFiles(): TokenizerFiles {
    return this.#files;
  }
}

/**
 * Builds the tokenizer that a `tokenizer.json` describes: a char-model file (`char_to_id`, or
 * `"type": "byte-level characters"`) gives a {@linkcode ByteTokenizer}, a Hugging Face tokenizers file
 * (`model`) a {@linkcode HubTokenizer} with `config` (`tokenizer_config.json`). `where` names the source
 * in errors.
 */
export function tokenizerFromJSON(
  json: unknown,
  config: Record<string, unknown> = {},
  where = "tokenizer.json",
): Tokenizer {
  if (typeof json !== "object" || json === null || Array.isArray(json)) {
    throw new Error(`${where}: not a JSON object`);
  }
  const j = json as Record<string, unknown>;
  if ("char_to_id" in j || j.type === "byte-level characters") {
    return ByteTokenizer.fromJSON(j as { char_to_id?: Record<string, number> });
  }
  if ("model" in j) {
    try {
      return new HubTokenizer(j, config);
    } catch (e) {
      throw new Error(`${where}: ${(e as Error).message}`, { cause: e });
    }
  }
  throw new Error(`${where}: neither a Hugging Face tokenizers file ('model') nor a char tokenizer`);
}

/** Ids of `StreamDecoder`'s context that are kept (more than a character's bytes, for a split one). */
const CONTEXT_IDS = 8;

/** Options of {@linkcode StreamDecoder}. */
export interface StreamDecoderOptions extends DecodeOptions {
  /**
   * Most tokens held back waiting for a split character to complete (default 4, the most bytes a UTF-8
   * character has); past that the text is emitted with U+FFFD for the invalid bytes. A positive integer (1: none
   * held); anything else is an error.
   */
  maxPending?: number;
  /**
   * Ids shown before the stream (a prompt): its last few are the context of the first window, their text not
   * emitted. A decoder that drops the space at the start of a text (SentencePiece's Metaspace) then keeps the
   * one before the first new token, as decoding the prompt and the reply together does.
   */
  context?: ArrayLike<number>;
}

/**
 * Incremental decoding for any {@linkcode Tokenizer}: `push` ids as they are generated and get the text they
 * complete. Each step decodes a small window (the last emitted tokens as context plus the new ones) and emits
 * what lies past the context's text, up to an incomplete UTF-8 character at its end (U+FFFD), which waits for
 * the tokens that complete it. The window moves on once its text ends in a whole character. The context keeps
 * decoders that treat the first token specially (a leading space) right; the algorithm is that of the Rust
 * `tokenizers` crate's `DecodeStream`, plus the text before a pending character (in byte-level BPE a run of
 * tokens can each finish one character and start the next), and transformers' clean-up of spaces applied to
 * the stream as a whole-text decode applies it (see {@linkcode StreamDecoderOptions.cleanUpTokenizationSpaces}).
 */
export class StreamDecoder {
  readonly #tok: Tokenizer;
  readonly #opts: DecodeOptions;
  readonly #maxPending: number;
  readonly #cleanUp: boolean;
  #ids: number[] = [];
  #prefix = "";
  #prefixIndex = 0;
  /** UTF-16 units of the window's text past the context already emitted (what came before a pending character). */
  #emitted = 0;
  /** Tokens since the text last grew. */
  #stalled = 0;
  /** With clean-up: the end of the emitted text that the next tokens may still rewrite (" ", " n", " '", ...). */
  #tail = "";

  /** Decodes with `tokenizer`; options as {@linkcode Tokenizer.decode} plus `maxPending` and `context`. */
  constructor(tokenizer: Tokenizer, options: StreamDecoderOptions = {}) {
    this.#tok = tokenizer;
    const max = options.maxPending ?? 4;
    if (!Number.isInteger(max) || max < 1) {
      throw new Error(`StreamDecoder: maxPending must be a positive integer, got ${max}`);
    }
    this.#maxPending = max;
    const cleanUp = options.cleanUpTokenizationSpaces ?? tokenizer.cleanUpTokenizationSpaces ?? false;
    if (typeof cleanUp !== "boolean") {
      throw new Error(`StreamDecoder: cleanUpTokenizationSpaces must be true or false, got ${cleanUp}`);
    }
    this.#cleanUp = cleanUp;
    // windows are decoded without clean-up: it rewrites text across their edges
    this.#opts = { skipSpecialTokens: options.skipSpecialTokens, cleanUpTokenizationSpaces: false };
    const context = Array.from(options.context ?? []).slice(-CONTEXT_IDS);
    if (context.length) {
      this.#ids = context;
      this.#prefixIndex = context.length;
      this.#prefix = tokenizer.decode(context, this.#opts);
    }
  }

  /** Adds ids; returns the text they complete (possibly ""). */
  push(ids: ArrayLike<number>): string {
    let out = "";
    for (let i = 0; i < ids.length; i++) out += this.#step(ids[i]);
    return this.#clean(out);
  }

  /**
   * The text held back so far, as {@linkcode StreamDecoder.flush} would emit it now (an incomplete character as U+FFFD), but
   * kept: to show where a stream paused, and go on with `push` later (the character then comes out whole).
   */
  held(): string {
    const raw = this.#tail + this.#past(this.#tok.decode(this.#ids, this.#opts));
    return this.#cleanUp ? cleanUpTokenization(raw) : raw;
  }

  /** Emits whatever is held back (an incomplete character becomes U+FFFD) and starts over. */
  flush(): string {
    const out = this.held();
    this.#ids = [];
    this.#prefix = "";
    this.#prefixIndex = 0;
    this.#emitted = 0;
    this.#stalled = 0;
    this.#tail = "";
    return out;
  }

  // One id: the text it completes, before clean-up.
  #step(id: number): string {
    this.#ids.push(id);
    const text = this.#tok.decode(this.#ids, this.#opts);
    if (text.length > this.#prefix.length && !text.endsWith("\uFFFD")) return this.#advance(text);
    // what comes before the incomplete character at the end is final
    const whole = text.replace(/\uFFFD+$/, "");
    if (whole.length > this.#prefix.length + this.#emitted) {
      const out = this.#past(whole);
      this.#emitted = whole.length - this.#prefix.length; // (#past may skip a surrogate half: not out.length)
      this.#stalled = 0;
      return out;
    }
    return ++this.#stalled >= this.#maxPending ? this.#advance(text) : "";
  }

  // Emits the rest of the window's text and keeps the tokens past the context as the next window's context.
  #advance(text: string): string {
    const out = this.#past(text);
    this.#ids = this.#ids.slice(this.#prefixIndex);
    this.#prefixIndex = this.#ids.length;
    this.#prefix = this.#tok.decode(this.#ids, this.#opts);
    this.#emitted = 0;
    this.#stalled = 0;
    return out;
  }

  // The part of a window's `text` not yet emitted. (A context emitted with U+FFFD for a character that maxPending
  // cut short ends where the completed character does: the U+FFFD stood for it, and the cut skips the second
  // half of a surrogate pair rather than emit it alone.)
  #past(text: string): string {
    let at = this.#prefix.length + this.#emitted;
    if (
      at > 0 && at < text.length && isLowSurrogate(text.charCodeAt(at)) &&
      isHighSurrogate(text.charCodeAt(at - 1))
    ) {
      at++;
    }
    return text.slice(at);
  }

  // With clean-up: cleans what the tokens to come cannot change, and holds back the rest.
  #clean(raw: string): string {
    if (!this.#cleanUp) return raw;
    const text = this.#tail + raw;
    const cut = settledLength(text);
    this.#tail = text.slice(cut);
    return cleanUpTokenization(text.slice(0, cut));
  }
}

const isHighSurrogate = (c: number) => c >= 0xd800 && c <= 0xdbff;
const isLowSurrogate = (c: number) => c >= 0xdc00 && c <= 0xdfff;

/** transformers' `clean_up_tokenization` (and @huggingface/tokenizers'): the space before punctuation and
 * English contractions removed, in this order. */
const CLEAN_UPS: readonly (readonly [string, string])[] = [
  [" .", "."],
  [" ?", "?"],
  [" !", "!"],
  [" ,", ","],
  [" ' ", "'"],
  [" n't", "n't"],
  [" 'm", "'m"],
  [" 's", "'s"],
  [" 've", "'ve"],
  [" 're", "'re"],
];

/** Applies transformers' clean-up of tokenization spaces to a text. */
export function cleanUpTokenization(text: string): string {
  for (const [from, to] of CLEAN_UPS) text = text.replaceAll(from, to);
  return text;
}

/**
 * The longest start of `text` that no clean-up can reach across, whatever text follows: no pattern that starts
 * before the cut and ends after it matches, or could match, the text there. Every pattern starts with a space,
 * and what a replacement removes is spaces, so cleaning the two sides apart cleans the whole.
 */
function settledLength(text: string): number {
  const longest = 4; // " n't", " 've", " 're"
  for (let cut = text.length; cut > 0; cut--) {
    let settled = true;
    for (let s = Math.max(0, cut - longest + 1); s < cut && settled; s++) {
      if (text[s] !== " ") continue;
      settled = !CLEAN_UPS.some(([from]) =>
        s + from.length > cut && from.startsWith(text.slice(s, s + from.length))
      );
    }
    if (settled) return cut;
  }
  return 0;
}
