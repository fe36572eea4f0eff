/**
 * Command lines of the examples and bench scripts: strict flags (an unknown flag, a missing value or an
 * unexpected argument is an error, so a typo such as `--quik` cannot start a long run), a usage text for
 * `--help` and errors, exit status 2 on a usage error.
 * @module
 */

import { resolve } from "node:path";
import { parseArgs } from "node:util";
import { isHubId } from "../../mamba/hub.ts";

/** A bad flag or value; {@linkcode parseCommandLine} prints it with the usage text and exits with 2. */
export class UsageError extends Error {}

/**
 * Runs `parse` (a `parseArgs({ strict: true, ... })` call with a boolean `help` option, plus any checks of
 * the values, which throw {@linkcode UsageError} or any Error) and returns its result. `--help` prints
 * `usage` and exits with 0; an error prints `error: <message>` and `usage` on stderr and exits with 2.
 */
export function parseCommandLine<R extends { values: { help?: boolean } }>(usage: string, parse: () => R): R {
  let r: R;
  try {
    r = parse();
  } catch (e) {
    console.error(`error: ${(e as Error).message}\n\n${usage}`);
    Deno.exit(2);
  }
  if (r.values.help) {
    console.log(usage);
    Deno.exit(0);
  }
  return r;
}

/**
 * The command line of a script that takes only boolean flags (and `--help`) and, when `positional` names it,
 * at most one positional argument: {@linkcode parseCommandLine} with the `parseArgs` call written once.
 */
export function simpleCommandLine(
  usage: string,
  flags: string[] = [],
  positional?: string,
): { values: Record<string, boolean | undefined>; positional: string | undefined } {
  const options = {
    ...Object.fromEntries(flags.map((f) => [f, { type: "boolean" as const }])),
    help: { type: "boolean" as const, short: "h" }, // as deno task train, generate and eval take it
  };
  const r = parseCommandLine(usage, () => {
    const r = parseArgs({
      args: Deno.args,
      strict: true,
      allowPositionals: positional !== undefined,
      options,
    });
    if (r.positionals.length > 1) {
      throw new UsageError(`one ${positional} at most, got ${r.positionals.join(" ")}`);
    }
    return r as { values: Record<string, boolean | undefined>; positionals: string[] };
  });
  return { values: r.values, positional: r.positionals[0] };
}

/** An integer flag's value in [min, max] (`dflt` when absent); throws {@linkcode UsageError}. */
export function intFlag(
  name: string,
  v: string | undefined,
  dflt: number,
  min: number,
  max = Number.MAX_SAFE_INTEGER,
): number {
  if (v === undefined) return dflt;
  const n = Number(v);
  if (v.trim() === "" || !Number.isInteger(n) || n < min || n > max) {
    const range = max === Number.MAX_SAFE_INTEGER && !(n > max) ? `>= ${min}` : `from ${min} to ${max}`;
    throw new UsageError(`--${name} must be an integer ${range}, got '${v}'`);
  }
  return n;
}

/** The `--dtype` flag of the examples that load a model: "f32" (absent) or "bf16"; throws {@linkcode UsageError}. */
export function weightDtypeFlag(v: string | undefined): "f32" | "bf16" {
  if (v === undefined || v === "f32" || v === "bf16") return v ?? "f32";
  throw new UsageError(`--dtype must be f32 or bf16, got '${v}'`);
}

/**
 * The folder relative paths on the command line mean: the user's (`deno task` runs a script in deno.json's
 * folder and names the one it was typed in as INIT_CWD), else the working folder.
 */
export function userCwd(): string {
  return Deno.env.get("INIT_CWD") || Deno.cwd();
}

/** A file or folder path given on the command line, resolved against {@linkcode userCwd}. */
export function userPath(p: string): string {
  return resolve(userCwd(), p);
}

/**
 * A model or tokenizer flag's value (hub id, folder or URL): a URL, or a hub id (org/name) with nothing of that
 * name in {@linkcode userCwd}, as given; else a path, resolved as {@linkcode userPath}.
 */
export function userModelPath(s: string): string {
  if (/^[a-z][a-z0-9+.-]*:\/\//i.test(s)) return s;
  if (!isHubId(s)) return userPath(s);
  try {
    Deno.statSync(userPath(s));
    return userPath(s);
  } catch {
    return s;
  }
}
