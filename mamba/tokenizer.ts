/**
 * Tokenizers. `ByteTokenizer` is the byte-level character tokenizer of the char models (token id = byte
 * value); it decodes incrementally, so a character split across tokens is emitted once complete.
 * @module
 */

/** What generation needs from a tokenizer. */
export interface Tokenizer {
  /** Number of token ids. */
  readonly vocabSize: number;
  /** Text to ids. */
  encode(text: string): number[];
  /** Ids to text. */
  decode(ids: ArrayLike<number>): string;
}

/** Byte-level tokenizer: UTF-8 bytes are the ids (vocabulary 256). */
export class ByteTokenizer implements Tokenizer {
  /** Always 256. */
  readonly vocabSize: number = 256;
  /** Characters the model saw in training (from tokenizer.json), if known. */
  readonly known: Set<number> | null;
  #stream = new TextDecoder("utf-8", { fatal: false });

  /** `known`: ids that occur in training; `encode` rejects other characters when given. */
  constructor(known?: Iterable<number>) {
    this.known = known ? new Set(known) : null;
  }

  /** Reads a char-model tokenizer.json (`char_to_id`). */
  static fromJSON(json: { char_to_id?: Record<string, number> }): ByteTokenizer {
    return new ByteTokenizer(json.char_to_id ? Object.values(json.char_to_id) : undefined);
  }

  /** UTF-8 bytes of the text; with a known set, unknown characters give an error naming them. */
  encode(text: string): number[] {
    const ids = [...new TextEncoder().encode(text)];
    if (this.known) {
      const bad = [
        ...new Set(
          [...text].filter((ch) => [...new TextEncoder().encode(ch)].some((b) => !this.known!.has(b))),
        ),
      ];
      if (bad.length) {
        throw new Error(
          `the prompt has characters the model never saw: ${bad.map((c) => JSON.stringify(c)).join(", ")}`,
        );
      }
    }
    return ids;
  }

  /** Whole-text decode. */
  decode(ids: ArrayLike<number>): string {
    return new TextDecoder().decode(Uint8Array.from(Array.from(ids)));
  }

  /** Streaming decode: holds back the bytes of an incomplete UTF-8 character until it completes. */
  decodeStream(ids: ArrayLike<number>): string {
    return this.#stream.decode(Uint8Array.from(Array.from(ids)), { stream: true });
  }
}
