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
   * Copies values into the parameters (in place: optimizers keep working). Shape mismatches always throw,
   * naming the key and both shapes; with `strict` (default), missing and unexpected keys throw too.
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
    for (const [k, p] of own) {
      const v = entries.get(k);
      if (v && v.shape.join() !== p.shape.join()) {
        mismatched.push(`${k}: checkpoint ${fmt(v.shape)} vs model ${fmt(p.shape)}`);
      }
    }
    const problems: string[] = [];
    if (mismatched.length) problems.push(`shape mismatch for ${mismatched.join("; ")}`);
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
        if (v.data.length !== p.size) {
          throw new Error(`loadStateDict: ${k} has ${v.data.length} values, needs ${p.size}`);
        }
        upload(p.storage.buffer, 0, v.data instanceof Float32Array ? v.data : Float32Array.from(v.data));
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
