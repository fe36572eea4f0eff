/**
 * What the command lines that load a pretrained model share (`deno task generate`, `deno task eval`): loading
 * it with a tokenizer required (said before any weight downloads), and running `main` as the program.
 * @module
 */

import { fromPretrained, NoTokenizerError, type PretrainedLM } from "../../mamba/pretrained.ts";
import type { WeightDtype } from "../../nn/layers.ts";
import { UsageError, userModelPath, userPath, weightDtypeFlag } from "./cli.ts";

/** The model flags: `--model`'s value and the hub, tokenizer and weight options. */
export interface ModelFlags {
  /** Hub id, folder or URL. */
  model: string;
  /** `--revision`. */
  revision?: string;
  /** `--cache-dir`. */
  cacheDir?: string;
  /** `--tokenizer`. */
  tokenizer?: string;
  /** `--dtype`. */
  weightDtype: WeightDtype;
}

/** The `parseArgs` options of the model flags (`--model --dtype --tokenizer --revision --cache-dir`). */
export const MODEL_OPTIONS = {
  model: { type: "string" },
  dtype: { type: "string" },
  tokenizer: { type: "string" },
  revision: { type: "string" },
  "cache-dir": { type: "string" },
} as const;

/** The model flags of parsed values; throws a UsageError for a bad `--dtype`. */
export function modelFlags(
  values: { model?: string; dtype?: string; tokenizer?: string; revision?: string; "cache-dir"?: string },
): ModelFlags {
  if (!values.model) throw new UsageError("--model is required");
  return {
    // relative paths are the user's, not the repository root's that deno task runs in
    model: userModelPath(values.model),
    weightDtype: weightDtypeFlag(values.dtype),
    tokenizer: values.tokenizer === undefined ? undefined : userModelPath(values.tokenizer),
    revision: values.revision,
    cacheDir: values["cache-dir"] === undefined ? undefined : userPath(values["cache-dir"]),
  };
}

/** The model of `flags`, or null after printing (through `err`) that it has no tokenizer: a usage error. */
export async function loadModel(
  flags: ModelFlags,
  err: (line: string) => void,
): Promise<PretrainedLM | null> {
  try {
    return await fromPretrained(flags.model, {
      revision: flags.revision,
      cacheDir: flags.cacheDir,
      tokenizer: flags.tokenizer,
      weightDtype: flags.weightDtype,
      requireTokenizer: true, // said before the weights download
    });
  } catch (e) {
    if (!(e instanceof NoTokenizerError)) throw e;
    err(`error: no tokenizer (${e.reason}): name one with --tokenizer <id|folder|url>`);
    return null;
  }
}

/** Runs `main(Deno.args)` as the program: exits with its status, or with 1 after printing an error it threw. */
export async function runProgram(main: (argv: string[]) => Promise<number>): Promise<void> {
  try {
    Deno.exit(await main(Deno.args));
  } catch (e) {
    console.error(`error: ${(e as Error).message}`);
    Deno.exit(1);
  }
}
