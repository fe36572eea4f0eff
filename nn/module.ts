/**
 * `Module`: a tree of named parameters and sub-modules, with state dicts named exactly as PyTorch
 * names them (`layers.0.mixer.in_proj.weight`), so that PyTorch checkpoints map one to one.
 * @module
 */

import { recordCopy, upload } from "../core/executor.ts";
import { fmt } from "../core/shape.ts";
import { keep, type Tensor } from "../core/tensor.ts";

/** Host data for one state-dict entry (what a safetensors file decodes to). */
export interface HostTensor {
  /** Shape of the data. */
  shape: readonly number[];
  /** Values, row-major. */
  data: Float32Array | Int32Array;
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

  /** Registers a parameter: it is kept (never freed by `tidy`) and requires grad. Returns it. */
  protected param(name: string, t: Tensor): Tensor {
    t.requiresGrad_(true);
    this.#params.set(name, keep(t));
    return t;
  }

  /** Registers a sub-module under `name`. Returns it. */
  protected child<M extends Module>(name: string, m: M): M {
    this.#children.set(name, m);
    return m;
  }

  /** Every parameter with its dotted name, in registration order. */
  namedParameters(prefix = ""): [string, Tensor][] {
    const out: [string, Tensor][] = [];
    for (const [n, p] of this.#params) out.push([prefix + n, p]);
    for (const [n, c] of this.#children) out.push(...c.namedParameters(`${prefix}${n}.`));
    return out;
  }

  /** Every parameter, in registration order. */
  parameters(): Tensor[] {
    return this.namedParameters().map(([, p]) => p);
  }

  /** Total number of parameter elements. */
  numParameters(): number {
    return this.parameters().reduce((n, p) => n + p.size, 0);
  }

  /** Parameters by name (the live tensors, not copies). */
  stateDict(): Map<string, Tensor> {
    return new Map(this.namedParameters());
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
    const entries = dict instanceof Map ? dict : new Map(Object.entries(dict));
    const own = this.stateDict();
    const missingKeys = [...own.keys()].filter((k) => !entries.has(k));
    const unexpectedKeys = [...entries.keys()].filter((k) => !own.has(k));
    const mismatched: string[] = [];
    const wrong: string[] = []; // wrong dtype or value count: checked before any parameter is written
    for (const [k, p] of own) {
      const v = entries.get(k);
      if (!v) continue;
      if (v.shape.join() !== p.shape.join()) {
        mismatched.push(`${k}: checkpoint ${fmt(v.shape)} vs model ${fmt(p.shape)}`);
        continue;
      }
      const dtype = "data" in v ? (v.data instanceof Int32Array ? "i32" : "f32") : v.dtype;
      if (dtype !== p.dtype) wrong.push(`${k} is ${dtype}, the model's is ${p.dtype}`);
      else if ("data" in v && v.data.length !== p.size) {
        wrong.push(`${k} has ${v.data.length} values, needs ${p.size}`);
      }
    }
    const problems: string[] = [];
    if (mismatched.length) problems.push(`shape mismatch for ${mismatched.join("; ")}`);
    problems.push(...wrong);
    if ((options.strict ?? true) && missingKeys.length) {
      problems.push(`missing keys: ${missingKeys.join(", ")}`);
    }
    if ((options.strict ?? true) && unexpectedKeys.length) {
      problems.push(`unexpected keys: ${unexpectedKeys.join(", ")}`);
    }
    if (problems.length) throw new Error(`loadStateDict: ${problems.join(". ")}`);
    for (const [k, p] of own) {
      const v = entries.get(k);
      if (!v) continue;
      if ("data" in v) {
        upload(p.storage.buffer, 0, v.data);
      } else {
        recordCopy(v.storage.buffer, 0, p.storage.buffer, 0, p.size * 4);
      }
    }
    return { missingKeys, unexpectedKeys };
  }

  /** Frees every parameter (and its gradient). */
  dispose(): void {
    for (const p of this.parameters()) {
      p.grad?.dispose();
      p.grad = null;
      p.dispose();
    }
  }
}
