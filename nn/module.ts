/**
 * `Module`: a tree of named parameters and sub-modules, with state dicts named exactly as PyTorch
 * names them (`layers.0.mixer.in_proj.weight`), so that PyTorch checkpoints map one to one.
 * @module
 */

import { recordCopy, upload } from "../core/executor.ts";
import { checkOptionKeys } from "../core/options.ts";
import { fmt } from "../core/shape.ts";
import { bytesOf, keep, type Tensor } from "../core/tensor.ts";
import { packBF16 } from "../core/bf16.ts";
import { castInto } from "../core/ops/cast.ts";

/** Host data for one state-dict entry (what a safetensors file decodes to). */
export interface HostTensor {
  /** Shape of the data. */
  shape: readonly number[];
  /** Values, row-major. */
  data: Float32Array | Int32Array;
}

/**
 * What is wrong with state-dict entry `key` as a value for a tensor of `shape` and `dtype` (null: nothing).
 * Checked for every entry before anything is written, so that a bad entry leaves the target unchanged.
 */
export function entryProblem(
  key: string,
  v: unknown,
  shape: readonly number[],
  dtype: string,
  [from, to]: [string, string] = ["checkpoint", "model"],
): string | null {
  if (typeof v !== "object" || v === null || !Array.isArray((v as { shape?: unknown }).shape)) {
    return `${key} must be a Tensor or { shape, data }, got ${v === null ? "null" : typeof v}`;
  }
  const e = v as Tensor | HostTensor;
  if (e.shape.join() !== shape.join()) {
    return `shape mismatch for ${key}: ${from} ${fmt(e.shape)} vs ${to} ${fmt(shape)}`;
  }
  if ("data" in e) {
    const d = e.data as unknown;
    if (!(d instanceof Float32Array || d instanceof Int32Array)) {
      const got = d === null || typeof d !== "object" ? String(d) : d.constructor?.name ?? "an object";
      return `${key}'s data must be a Float32Array or an Int32Array, got ${got}`;
    }
    const size = shape.reduce((a, b) => a * b, 1);
    if (d.length !== size) return `${key} has ${d.length} values, needs ${size}`;
    const got = d instanceof Int32Array ? "i32" : "f32";
    return got === dtype || (got === "f32" && dtype === "bf16")
      ? null
      : `${key} is ${got}, the ${to}'s is ${dtype}`;
  }
  if (e.disposed) return `${key} was disposed`;
  // a bf16 weight takes f32 values (rounded), an f32 one bf16 values (exact)
  const floats = (t: string) => t === "f32" || t === "bf16";
  return e.dtype === dtype || (floats(e.dtype) && floats(dtype))
    ? null
    : `${key} is ${e.dtype}, the ${to}'s is ${dtype}`;
}

/** Records copying entry `v` into `dst` (nothing when `v` is `dst` itself or a view of it). */
export function writeEntry(v: Tensor | HostTensor, dst: Tensor): void {
  // f32 values into a bf16 weight are rounded to nearest even (on the host, or by the GPU cast); bf16 values
  // into an f32 one are exact
  if ("data" in v) upload(dst.storage.buffer, 0, dst.dtype === "bf16" ? packBF16(v.data) : v.data);
  else if (v.dtype !== dst.dtype) castInto(v, dst);
  else if (v.storage !== dst.storage && dst.size > 0) {
    recordCopy(v.storage.buffer, 0, dst.storage.buffer, 0, bytesOf(dst.size, dst.dtype));
  }
}

/** A state dict: parameter name to tensor (or host data when loading). */
export type StateDict = Map<string, Tensor | HostTensor>;

/** Options of {@linkcode Module.loadStateDict}. */
export interface LoadOptions {
  /** Throw on missing or unexpected keys (default true). Shape mismatches always throw. */
  strict?: boolean;
}

/** What {@linkcode Module.loadStateDict} did not match. */
export interface LoadResult {
  /** Parameters of the module that the dict does not have. */
  missingKeys: string[];
  /** Keys of the dict that the module does not have. */
  unexpectedKeys: string[];
}

/** Base class of layers and models. */
export class Module {
  #params = new Map<string, Tensor>();
  #children = new Map<string, Module>();
  #constants: Tensor[] = [];

  /** Registers a parameter: it is kept (never freed by `tidy`) and requires grad. Returns it. `name` is one
   * part of its state-dict key: non-empty, without '.', and not yet used in this module. */
  protected param(name: string, t: Tensor): Tensor {
    this.#checkName("parameter", name);
    if (t.dtype === "f32") t.requiresGrad_(true); // a bf16 weight is for inference: no gradient
    this.#params.set(name, keep(t));
    return t;
  }

  /** Holds a tensor that is no parameter (a constant: not trained, not in the state dict), kept and freed
   * with the module. Returns it. */
  protected keepConstant(t: Tensor): Tensor {
    this.#constants.push(keep(t));
    return t;
  }

  /** Registers a sub-module under `name` (named as a parameter is). Returns it. */
  protected child<M extends Module>(name: string, m: M): M {
    this.#checkName("child", name);
    this.#children.set(name, m);
    return m;
  }

  /** Names join into dotted keys: a dot inside one (param "a.weight" beside child "a") would give two parameters
   * one key, and a name registered again would drop what it named, both silently. */
  #checkName(kind: string, name: string): void {
    if (typeof name !== "string" || name === "" || name.includes(".")) {
      throw new Error(
        `Module: a ${kind} name must be a non-empty string without '.', got ${JSON.stringify(name)}`,
      );
    }
    if (this.#params.has(name) || this.#children.has(name)) {
      const what = this.#params.has(name) ? "parameter" : "child";
      throw new Error(`Module: the ${kind} name '${name}' is already taken by a ${what} of this module`);
    }
  }

  /** Every parameter under every name it has, in registration order (a shared one under each). */
  #named(prefix: string, out: [string, Tensor][]): [string, Tensor][] {
    for (const [n, p] of this.#params) out.push([prefix + n, p]);
    for (const [n, c] of this.#children) c.#named(`${prefix}${n}.`, out);
    return out;
  }

  /**
   * Every parameter with its dotted name, in registration order. A tensor registered under several names (a
   * weight shared by two layers) comes once, under its first name, as in PyTorch's `named_parameters()`: an
   * optimizer or `clipGradNorm` over `parameters()` sees it once.
   */
  namedParameters(prefix = ""): [string, Tensor][] {
    const seen = new Set<Tensor>();
    return this.#named(prefix, []).filter(([, p]) => {
      if (seen.has(p)) return false;
      seen.add(p);
      return true;
    });
  }

  /** Every parameter, in registration order (a shared one once). */
  parameters(): Tensor[] {
    return this.namedParameters().map(([, p]) => p);
  }

  /** Total number of parameter elements (a shared parameter counted once). */
  numParameters(): number {
    return this.parameters().reduce((n, p) => n + p.size, 0);
  }

  /** Parameters by name (the live tensors, not copies); a shared parameter under each of its names, as in
   * PyTorch's `state_dict()`. */
  stateDict(): Map<string, Tensor> {
    return new Map(this.#named("", []));
  }

  /**
   * Copies values into the parameters (in place: optimizers keep working). Shape and dtype mismatches always
   * throw, naming the key and both shapes or dtypes, before any parameter is written; with `strict`
   * (default), missing and unexpected keys throw too.
   */
  loadStateDict(
    dict: StateDict | Record<string, Tensor | HostTensor>,
    options: LoadOptions = {},
  ): LoadResult {
    checkOptionKeys(options, ["strict"], "loadStateDict");
    if (options.strict !== undefined && typeof options.strict !== "boolean") {
      throw new Error(`loadStateDict: strict must be a boolean, got ${JSON.stringify(options.strict)}`);
    }
    const entries = dict instanceof Map ? dict : new Map(Object.entries(dict));
    const own = this.stateDict();
    // a null or undefined value counts as missing
    const missingKeys = [...own.keys()].filter((k) => entries.get(k) == null);
    const unexpectedKeys = [...entries.keys()].filter((k) => !own.has(k));
    const problems: string[] = []; // all checked before any parameter is written
    for (const [k, p] of own) {
      const v = entries.get(k);
      const problem = v == null ? null : entryProblem(k, v, p.shape, p.dtype);
      if (problem) problems.push(problem);
    }
    if ((options.strict ?? true) && missingKeys.length) {
      problems.push(`missing keys: ${missingKeys.join(", ")}`);
    }
    if ((options.strict ?? true) && unexpectedKeys.length) {
      problems.push(`unexpected keys: ${unexpectedKeys.join(", ")}`);
    }
    if (problems.length) throw new Error(`loadStateDict: ${problems.join(". ")}`);
    for (const [k, p] of own) {
      const v = entries.get(k);
      if (v != null) writeEntry(v, p); // a dict of the module's own tensors loads as a no-op
    }
    return { missingKeys, unexpectedKeys };
  }

  /** Frees every parameter (and its gradient), and the constants of every module in the tree. */
  dispose(): void {
    for (const p of this.parameters()) {
      p.grad?.dispose();
      p.grad = null;
      p.dispose();
    }
    this.#disposeConstants();
  }

  #disposeConstants(): void {
    for (const t of this.#constants) t.dispose();
    for (const c of this.#children.values()) c.#disposeConstants();
  }
}
