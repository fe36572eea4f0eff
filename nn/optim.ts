/**
 * Training: the AdamW and SGD optimizers, global-norm gradient clipping, the warm-up + cosine learning-rate
 * schedule, and mamba.py's parameter grouping (`configureOptimizers`).
 *
 * Everything runs on the GPU without a readback: an optimizer step is one fused dispatch per parameter
 * (the learning rate and the bias corrections travel as uniforms, so they may change every step), and
 * clipping computes the norm and the scale factor into GPU buffers that the update kernels read. The
 * update formulas are PyTorch's (torch.optim.AdamW / SGD, version 1.13), evaluated in f32 in the order of its
 * CPU kernels (`addcmul` as (value * a) * b, `addcdiv` as (value * a) / b; its CUDA `addcdiv` divides first).
 * WGSL's division and square root need not be correctly rounded, and a compiler may fuse a multiply-add, so a
 * step can differ from PyTorch's in the last bits. The optimizer state (moments, per-parameter step counts)
 * can be saved and loaded so that a resumed run continues exactly as an uninterrupted one.
 *
 * ```ts
 * import {
 *   clipGradNorm,
 *   configureOptimizers,
 *   cosineSchedule,
 *   crossEntropy,
 *   init,
 *   MambaLM,
 *   tensor,
 *   tidy,
 * } from "@mambats/mamba";
 *
 * await init();
 * const V = 16; // vocabulary size
 * const model = new MambaLM({ dModel: 16, nLayers: 1 }, { vocabSize: V });
 * // a batch of 2 sequences of 8 token ids, and the next-token targets
 * const x = tensor(new Int32Array(16).map((_, i) => i % V), [2, 8], { dtype: "i32" });
 * const y = tensor(new Int32Array(16).map((_, i) => (i + 1) % V), [2, 8], { dtype: "i32" });
 *
 * const opt = configureOptimizers(model, { lr: 3e-3, weightDecay: 0.1, betas: [0.9, 0.95] });
 * const lrAt = cosineSchedule({ warmup: 100, total: 1200, maxLr: 3e-3, minLr: 3e-4 });
 * for (let it = 0; it < 1200; it++) {
 *   opt.lr = lrAt(it);
 *   const loss = tidy(() => {
 *     const l = crossEntropy(model.forward(x).reshape(-1, V), y.reshape(-1));
 *     l.backward();
 *     clipGradNorm(model.parameters(), 1.0);
 *     opt.step();
 *     opt.zeroGrad();
 *     return l;
 *   });
 *   if (it % 100 === 0) console.log(it, await loss.item());
 *   loss.dispose(); // tidy keeps the returned tensor: the caller frees it
 * }
 * ```
 * @module
 */

import { full, zeros } from "../core/creation.ts";
import { defineKernel, dispatch, dispatchElementwise, type Kernel } from "../core/kernel.ts";
import { copy } from "../core/ops/index.ts";
import { checkOptionKeys } from "../core/options.ts";
import { fmt } from "../core/shape.ts";
import { freeOnThrow, keep, Tensor } from "../core/tensor.ts";
import { entryProblem, type HostTensor, type Module, writeEntry } from "./module.ts";

// ------------------------------------------------------------------------------------------ kernels

const WG = 256;
/** Invocations of the partial-sum kernel per workgroup, and elements each of them sums. */
const NORM_WG = 64;
const NORM_ITEMS = 256;
/** Elements one workgroup of the partial-sum kernel covers. */
const NORM_BLOCK = NORM_WG * NORM_ITEMS;
/** Invocations of the kernel that finishes the norm (one workgroup). */
const FINISH_WG = 256;

/**
 * Sum of squares of one gradient, in partial sums. Workgroup w covers elements [w*BLOCK, (w+1)*BLOCK); its
 * invocation `lid` owns partial `at + gid` and sums g[w*BLOCK + lid + k*WG]^2 for k < ITEMS (strided, so
 * neighbouring invocations read neighbouring elements). Reads g; writes one element of partials.
 */
const sumSquaresKernel: Kernel = defineKernel({
  name: "optim_grad_sumsq",
  buffers: [{ name: "g", type: "f32", access: "read" }, {
    name: "partials",
    type: "f32",
    access: "read_write",
  }],
  uniforms: [["n", "u32"], ["at", "u32"]],
  workgroupSize: NORM_WG,
  body: `
  var acc = 0.0;
  var i = group * ${NORM_BLOCK}u + lid;
  for (var k = 0u; k < ${NORM_ITEMS}u; k = k + 1u) {
    if (i >= P.n) { break; }
    let v = ld_g(i);
    acc = acc + v * v;
    i = i + ${NORM_WG}u;
  }
  st_partials(P.at + gid, acc);`,
});

/**
 * Finishes the global norm: one workgroup; invocation `lid` sums partials lid, lid + WG, ... (at most
 * count / WG iterations), then invocation 0 adds the WG sums in order (deterministic), and writes
 * norm = sqrt(total) and PyTorch's clip factor scale = min(1, maxNorm / (norm + 1e-6)).
 * Reads partials; writes norm[0] and scale[0].
 */
const finishNormKernel: Kernel = defineKernel({
  name: "optim_grad_norm_finish",
  buffers: [
    { name: "partials", type: "f32", access: "read" },
    { name: "norm", type: "f32", access: "read_write" },
    { name: "scale", type: "f32", access: "read_write" },
  ],
  uniforms: [["count", "u32"], ["maxNorm", "f32"]],
  workgroupSize: FINISH_WG,
  decls: `var<workgroup> sums: array<f32, ${FINISH_WG}>;`,
  body: `
  var acc = 0.0;
  for (var i = lid; i < P.count; i = i + ${FINISH_WG}u) { acc = acc + ld_partials(i); }
  sums[lid] = acc;
  workgroupBarrier();
  if (lid == 0u) {
    var total = 0.0;
    for (var j = 0u; j < ${FINISH_WG}u; j = j + 1u) { total = total + sums[j]; }
    let norm = sqrt(total);
    st_norm(0u, norm);
    // = min(1, maxNorm / d) without forming a quotient above 1 (no overflow); NaN norms give NaN, as PyTorch.
    // maxNorm < 0 stands for an infinite one (no infinity in a uniform): 1, even where the sum overflowed.
    let d = norm + 1e-6;
    st_scale(0u, select(select(1.0, P.maxNorm / d, !(d <= P.maxNorm)), 1.0, P.maxNorm < 0.0));
  }`,
});

/** g[i] *= s[0]: one element per invocation. Reads s; reads and writes g. */
const scaleKernel: Kernel = defineKernel({
  name: "optim_grad_scale",
  buffers: [{ name: "g", type: "f32", access: "read_write" }, { name: "s", type: "f32", access: "read" }],
  uniforms: [["n", "u32"]],
  workgroupSize: WG,
  body: `
  if (gid >= P.n) { return; }
  st_g(gid, ld_g(gid) * ld_s(0u));`,
});

/**
 * AdamW (torch.optim.AdamW, 1.13, in the order of its CPU kernels' f32 operations), one element per invocation; the
 * gradient is g * s[0] (s: the clip factor, or 1). Reads g and s; reads and writes p, m (exp_avg) and
 * v (exp_avg_sq). Uniforms: decay = 1 - lr*wd, stepSize = lr / (1 - b1^t), bc2Sqrt = sqrt(1 - b2^t).
 */
const adamwKernel: Kernel = defineKernel({
  name: "optim_adamw",
  buffers: [
    { name: "p", type: "f32", access: "read_write" },
    { name: "g", type: "f32", access: "read" },
    { name: "m", type: "f32", access: "read_write" },
    { name: "v", type: "f32", access: "read_write" },
    { name: "s", type: "f32", access: "read" },
  ],
  uniforms: [
    ["n", "u32"],
    ["decay", "f32"],
    ["b1", "f32"],
    ["c1", "f32"],
    ["b2", "f32"],
    ["c2", "f32"],
    ["stepSize", "f32"],
    ["bc2Sqrt", "f32"],
    ["eps", "f32"],
  ],
  workgroupSize: WG,
  body: `
  if (gid >= P.n) { return; }
  let g = ld_g(gid) * ld_s(0u);
  let p = ld_p(gid) * P.decay;
  let m = ld_m(gid) * P.b1 + P.c1 * g;
  let v = ld_v(gid) * P.b2 + P.c2 * g * g;
  st_m(gid, m);
  st_v(gid, v);
  let denom = sqrt(v) / P.bc2Sqrt + P.eps;
  st_p(gid, p + (-P.stepSize) * m / denom);`,
});

/**
 * SGD (torch.optim.SGD, 1.13), one element per invocation; the gradient is g * s[0]. d = g + wd*p; with
 * momentum: buf = d on the parameter's first step (`first`), else momentum*buf + (1 - dampening)*d, and
 * d = nesterov ? d + momentum*buf : buf; then p = p - lr*d. Reads g and s; reads and writes p (and buf).
 */
function sgdKernel(withMomentum: boolean): Kernel {
  return defineKernel({
    name: withMomentum ? "optim_sgd_momentum" : "optim_sgd",
    buffers: [
      { name: "p", type: "f32", access: "read_write" },
      { name: "g", type: "f32", access: "read" },
      ...(withMomentum ? [{ name: "buf", type: "f32" as const, access: "read_write" as const }] : []),
      { name: "s", type: "f32", access: "read" },
    ],
    uniforms: [
      ["n", "u32"],
      ["lr", "f32"],
      ["wd", "f32"],
      ["momentum", "f32"],
      ["damp", "f32"],
      ["first", "u32"],
      ["nesterov", "u32"],
    ],
    workgroupSize: WG,
    body: `
  if (gid >= P.n) { return; }
  let p = ld_p(gid);
  var d = ld_g(gid) * ld_s(0u);
  if (P.wd != 0.0) { d = d + P.wd * p; }
  ${
      withMomentum
        ? `var b = d;
  if (P.first == 0u) { b = ld_buf(gid) * P.momentum + P.damp * d; }
  st_buf(gid, b);
  if (P.nesterov != 0u) { d = d + P.momentum * b; } else { d = b; }`
        : ""
    }
  st_p(gid, p + (-P.lr) * d);`,
  });
}

const SGD_KERNELS = { plain: sgdKernel(false), momentum: sgdKernel(true) };

// ------------------------------------------------------------------------------------------ clipping

function withGrads(params: readonly Tensor[]): Tensor[] {
  const out = params.filter((p) => p.grad !== null);
  const gone = out.findIndex((p) => p.grad!.disposed);
  if (gone >= 0) {
    throw new Error(
      `gradient clipping: the .grad of parameter ${gone} of those with gradients (${
        out[gone]
      }) was disposed ` +
        "but not set to null (zeroGrad() does both)",
    );
  }
  return out;
}

/** The gradient of `p`, copied first if its storage is shared with another tensor (it is written in place). */
function ownGrad(p: Tensor): Tensor {
  const g = p.grad!;
  if (g.storage.users === 1) return g;
  const own = keep(copy(g));
  g.dispose();
  p.grad = own;
  return own;
}

/** The global gradient norm and the clip factor, as one-element GPU tensors. */
export interface GradNormScale {
  /** sqrt(sum over parameters of sum(grad^2)): shape [] (0-d). */
  norm: Tensor;
  /** min(1, maxNorm / (norm + 1e-6)): shape []. Pass it to `step({ gradScale })`. */
  scale: Tensor;
}

/**
 * Computes the global L2 norm of the gradients of `params` (those without a gradient are skipped) and the
 * clip factor `min(1, maxNorm / (norm + 1e-6))` on the GPU, without changing the gradients and without a
 * readback: `opt.step({ gradScale: scale })` then applies the clipped update, which is bit-identical to
 * {@linkcode clipGradNorm} followed by `opt.step()` and saves one dispatch per parameter.
 * The sum of squares is taken over all elements at once (PyTorch takes the norm of per-parameter norms;
 * the two differ by rounding only).
 * `maxNorm` defaults to `Infinity`: no clipping, the scale is 1 (the norm is still computed).
 * The caller disposes `norm` and `scale` (or creates them inside a `tidy`).
 */
export function gradNormScale(params: readonly Tensor[], maxNorm: number = Infinity): GradNormScale {
  if (!(maxNorm > 0)) throw new Error(`gradNormScale: maxNorm must be positive, got ${maxNorm}`);
  const ps = withGrads(params);
  for (const p of ps) {
    if (p.grad!.dtype !== "f32") throw new Error(`gradNormScale: gradients must be f32, got ${p.grad}`);
  }
  const counts = ps.map((p) => Math.ceil(p.grad!.size / NORM_BLOCK) * NORM_WG);
  const total = counts.reduce((a, b) => a + b, 0);
  // invocation 0 of the finishing kernel loops over its share of the partials, then over the FINISH_WG sums
  // (each loop's last test a trip too): software adapters stop an invocation past 65535 trips in all
  if (Math.ceil(total / FINISH_WG) + 1 + FINISH_WG + 1 > 65535) {
    throw new Error(`gradNormScale: ${total} partial sums exceed what one finishing workgroup can add`);
  }
  // freeOnThrow: the partial sums or the norm made before running out of memory go too, also outside tidy
  return freeOnThrow(() => {
    const partials = Tensor.empty([Math.max(total, 1)]);
    let at = 0;
    ps.forEach((p, k) => {
      const g = p.grad!;
      dispatch(
        sumSquaresKernel,
        { g: g.storage, partials: partials.storage },
        { n: g.size, at },
        counts[k] / NORM_WG,
      );
      at += counts[k];
    });
    const norm = Tensor.empty([]);
    const scale = Tensor.empty([]);
    dispatch(
      finishNormKernel,
      { partials: partials.storage, norm: norm.storage, scale: scale.storage },
      { count: total, maxNorm: maxNorm === Infinity ? -1 : maxNorm },
      1,
    );
    partials.dispose();
    return { norm, scale };
  });
}

/**
 * PyTorch's `clip_grad_norm_`: scales every gradient of `params` in place by
 * `min(1, maxNorm / (norm + 1e-6))`, where `norm` is the global L2 norm of all gradients, and returns that
 * norm (shape [], on the GPU: `await norm.item()` reads it). No readback: the factor stays on the GPU.
 * Parameters without a gradient are skipped. The caller disposes the returned norm (inside a `tidy`
 * that does not return it, it is freed with the rest).
 */
export function clipGradNorm(params: readonly Tensor[], maxNorm: number): Tensor {
  // freeOnThrow: norm and scale go if a shared gradient's copy runs out of memory
  return freeOnThrow(() => {
    const { norm, scale } = gradNormScale(params, maxNorm);
    for (const p of withGrads(params)) {
      const g = ownGrad(p);
      dispatch(scaleKernel, { g: g.storage, s: scale.storage }, { n: g.size }, Math.ceil(g.size / WG));
    }
    scale.dispose();
    return norm;
  });
}

// ------------------------------------------------------------------------------------------ optimizers

/** A group of parameters that share a weight decay. */
export interface ParamGroup {
  /** The parameters (f32 tensors, updated in place). */
  params: Tensor[];
  /** Weight decay of this group (default: the optimizer's `weightDecay`). */
  weightDecay?: number;
  /** This group's learning rate as a multiple of the optimizer's `lr` (default 1), so that a schedule that
   * sets `lr` keeps the ratio (muP's 1 / width multiplier: {@linkcode configureOptimizers}). */
  lrScale?: number;
  /** Names of the parameters, used as state-dict keys (default: their index over all groups, "0", "1"...). */
  names?: string[];
}

/** Optimizer state, ready to be saved with a checkpoint (tensors in safetensors, numbers in its metadata). */
export interface OptimizerState {
  /** Number of `step()` calls. */
  step: number;
  /** Per parameter name: the number of updates it received (bias corrections use it, as PyTorch's
   * per-parameter `state["step"]`). Parameters that never had a gradient are absent. */
  paramSteps: Record<string, number>;
  /** Per-parameter buffers, keyed `<name>.<slot>`: AdamW `exp_avg`, `exp_avg_sq`; SGD `momentum_buffer`. */
  tensors: Map<string, Tensor>;
  /** Parameters per group. A state loads into an optimizer whose parameters are named by their index
   * (groups without `names`) only where these are its own, as PyTorch's `load_state_dict` checks. */
  groupSizes: number[];
}

/** What {@linkcode Optimizer.loadStateDict} accepts: the tensors may be GPU tensors or host data. */
export interface OptimizerStateInput {
  /** Number of `step()` calls. */
  step: number;
  /** Per-parameter update counts (default: `step` for every parameter that has buffers in `tensors`). */
  paramSteps?: Record<string, number>;
  /** Per-parameter buffers keyed `<name>.<slot>`. */
  tensors: Map<string, Tensor | HostTensor> | Record<string, Tensor | HostTensor>;
  /** Parameters per group of the optimizer that saved it (checked where it is given and this optimizer names
   * parameters by their index). */
  groupSizes?: number[];
}

/** Options of {@linkcode Optimizer.step}. */
export interface StepOptions {
  /**
   * A GPU tensor whose first element multiplies every gradient before the update (e.g. the `scale` of
   * {@linkcode gradNormScale}); read by the update kernels, never by the host.
   */
  gradScale?: Tensor;
}

/** Whether `v` is a finite number >= 0 (a string such as "0.1" is not: comparisons would convert it). */
const finiteNonNegative = (v: unknown): v is number => typeof v === "number" && v >= 0 && v < Infinity;

/** `v` for a message: a string quoted, so that "0.1" does not read as the number it failed to be. */
const shown = (v: unknown) => typeof v === "string" ? JSON.stringify(v) : String(v);

function checkLr(where: string, lr: number): void {
  if (!finiteNonNegative(lr)) throw new Error(`${where}: lr must be a finite number >= 0, got ${shown(lr)}`);
}

/** The optimizer's argument as groups: a list of tensors is one group; anything else is named. */
function paramGroupsOf(groups: ParamGroup[] | Tensor[]): ParamGroup[] {
  const what = (v: unknown) => v instanceof Tensor ? "a tensor" : Array.isArray(v) ? "a list" : typeof v;
  if (!Array.isArray(groups)) {
    throw new Error(
      `optimizer: parameters must be a list of tensors or of groups ({ params: Tensor[] }), got ${
        what(groups)
      }` +
        (typeof (groups as { parameters?: unknown } | null)?.parameters === "function"
          ? " (a module: pass model.parameters())"
          : (groups as { params?: unknown } | null)?.params !== undefined
          ? " (one group: pass [group])"
          : ""),
    );
  }
  if (groups.length > 0 && groups[0] instanceof Tensor) {
    const i = groups.findIndex((p) => !(p instanceof Tensor));
    if (i >= 0) throw new Error(`optimizer: parameter ${i} of the list is ${what(groups[i])}, not a tensor`);
    return [{ params: groups as Tensor[] }];
  }
  (groups as unknown[]).forEach((g, i) => {
    const params = (g as ParamGroup | null)?.params;
    if (!Array.isArray(params) || !params.every((p) => p instanceof Tensor)) {
      throw new Error(
        `optimizer: group ${i} must be { params: Tensor[] } (a list of groups takes no bare tensors), got ` +
          (g instanceof Tensor
            ? "a tensor"
            : `params ${Array.isArray(params) ? "holding a non-tensor" : what(params)}`),
      );
    }
    // PyTorch's groups take their own lr: here a group scales the optimizer's (which a schedule sets)
    if ((g as Record<string, unknown>).lr !== undefined) {
      throw new Error(
        `optimizer: group ${i} sets lr; a group's learning rate is lrScale times the optimizer's lr (which a ` +
          "schedule sets each step), e.g. { params, lrScale: 0.1 }",
      );
    }
    checkOptionKeys(g, ["params", "weightDecay", "lrScale", "names"], `optimizer: group ${i}`);
  });
  return groups as ParamGroup[];
}

interface Slot {
  p: Tensor;
  name: string;
  weightDecay: number;
  lrScale: number;
  steps: number;
  state: Tensor[] | null;
}

/** Base of the optimizers: parameter groups, state, gradient reset, state dicts. */
export abstract class Optimizer {
  /** Learning rate of the next `step()` (set it every step to follow a schedule). */
  lr: number;
  /** Number of `step()` calls so far. */
  stepCount = 0;
  /** The groups, with every default filled in (weight decay, names). */
  readonly paramGroups: readonly Required<ParamGroup>[];
  /** Names of the per-parameter state buffers. */
  abstract readonly stateNames: readonly string[];
  #slots: Slot[] = [];
  #one: Tensor | null = null;
  /** Whether some parameter is named by its index (a group without `names`). */
  #indexNames = false;

  /** Collects the groups; `weightDecay` is the default of groups that do not set their own. */
  constructor(groups: ParamGroup[] | Tensor[], lr: number, weightDecay: number) {
    checkLr("optimizer", lr);
    this.lr = lr;
    const list = paramGroupsOf(groups);
    const seen = new Set<Tensor>();
    const names = new Set<string>();
    const resolved: Required<ParamGroup>[] = [];
    for (const group of list) {
      if (group.names && group.names.length !== group.params.length) {
        throw new Error(`optimizer: ${group.names.length} names for ${group.params.length} parameters`);
      }
      const wd = group.weightDecay ?? weightDecay;
      if (!finiteNonNegative(wd)) {
        throw new Error(`optimizer: weightDecay must be a finite number >= 0, got ${shown(wd)}`);
      }
      const lrScale = group.lrScale ?? 1;
      if (!finiteNonNegative(lrScale)) {
        throw new Error(`optimizer: lrScale must be a finite number >= 0, got ${shown(lrScale)}`);
      }
      group.params.forEach((p, i) => {
        if (seen.has(p)) throw new Error(`optimizer: parameter ${p} appears twice`);
        if (p.dtype !== "f32") throw new Error(`optimizer: parameters must be f32, got ${p}`);
        const name = group.names?.[i] ?? String(this.#slots.length);
        if (!group.names) this.#indexNames = true;
        if (names.has(name)) throw new Error(`optimizer: parameter name '${name}' appears twice`);
        seen.add(p);
        names.add(name);
        this.#slots.push({ p, name, weightDecay: wd, lrScale, steps: 0, state: null });
      });
      const at = this.#slots.length - group.params.length;
      resolved.push({
        params: [...group.params],
        weightDecay: wd,
        lrScale,
        names: this.#slots.slice(at).map((s) => s.name),
      });
    }
    this.paramGroups = resolved;
  }

  /** Every parameter, in group order. */
  get params(): Tensor[] {
    return this.#slots.map((s) => s.p);
  }

  /** Records the update of one parameter; `state` holds its buffers (`stateNames` order). */
  protected abstract update(
    p: Tensor,
    g: Tensor,
    state: Tensor[],
    info: { lr: number; weightDecay: number; steps: number; fresh: boolean; scale: Tensor },
  ): void;

  /**
   * Updates every parameter that has a gradient (one dispatch each, no readback); parameters without a
   * gradient are skipped and their state is unchanged, as in PyTorch.
   */
  step(options: StepOptions = {}): void {
    // (gradNormScale's { norm, scale } passed whole would otherwise step unclipped)
    checkOptionKeys(options, ["gradScale"], "step");
    checkLr("step", this.lr); // a schedule's NaN would turn every parameter into NaN
    if (options.gradScale !== undefined && !(options.gradScale instanceof Tensor)) {
      throw new Error(
        `step: gradScale must be a Tensor (gradNormScale(...).scale), got ${shown(options.gradScale)}`,
      );
    }
    const scale = options.gradScale ?? (this.#one ??= keep(full([1], 1)));
    if (scale.disposed) throw new Error("step: gradScale was disposed");
    if (scale.dtype !== "f32" || scale.size < 1) throw new Error(`step: gradScale must be f32, got ${scale}`);
    // every gradient checked before any parameter moves: a bad one leaves the step undone, not half done
    // (and every parameter that moves, and its state buffers, alive)
    for (const { p, name, state } of this.#slots) {
      const g = p.grad;
      if (g && (g.shape.join() !== p.shape.join() || g.dtype !== "f32" || g.disposed)) {
        const what = g.disposed ? "a disposed gradient" : `gradient ${g.dtype} ${fmt(g.shape)}`;
        throw new Error(`step: ${what} for parameter '${name}' of shape ${fmt(p.shape)} (f32)`);
      }
      if (g && p.disposed) throw new Error(`step: parameter '${name}' was disposed (its gradient was not)`);
      const gone = g && state ? this.stateNames.find((_, i) => state[i].disposed) : undefined;
      if (gone) throw new Error(`step: the ${gone} state buffer of parameter '${name}' was disposed`);
    }
    // and every new state buffer made before then: running out of memory leaves it undone too
    const fresh = this.#newState(this.#slots.filter((s) => s.p.grad && !s.state), zeros);
    this.stepCount++;
    for (const s of this.#slots) {
      const g = s.p.grad;
      if (!g) continue;
      s.steps++;
      this.update(s.p, g, s.state!, {
        lr: this.lr * s.lrScale,
        weightDecay: s.weightDecay,
        steps: s.steps,
        fresh: fresh.has(s),
        scale,
      });
    }
  }

  /** Gives `slots` their state buffers, made by `make`, all or none: a throw part-way (out of memory under a
   * limit) frees those made so far and leaves every slot as it was. Returns the slots. */
  #newState(slots: Slot[], make: (shape: readonly number[]) => Tensor): Set<Slot> {
    const made: Tensor[] = [];
    try {
      for (const s of slots) for (const _ of this.stateNames) made.push(keep(make(s.p.shape)));
    } catch (e) {
      for (const t of made) t.dispose();
      throw e;
    }
    let at = 0;
    for (const s of slots) s.state = this.stateNames.map(() => made[at++]);
    return new Set(slots);
  }

  /** Disposes every parameter's gradient and sets it to null. */
  zeroGrad(): void {
    for (const { p } of this.#slots) {
      p.grad?.dispose();
      p.grad = null;
    }
  }

  /** The state: the live buffers (not copies; do not dispose them) and the step counts. */
  stateDict(): OptimizerState {
    const tensors = new Map<string, Tensor>();
    const paramSteps: Record<string, number> = {};
    for (const s of this.#slots) {
      if (!s.state) continue;
      paramSteps[s.name] = s.steps;
      s.state.forEach((t, j) => tensors.set(`${s.name}.${this.stateNames[j]}`, t));
    }
    return {
      step: this.stepCount,
      paramSteps,
      tensors,
      groupSizes: this.paramGroups.map((g) => g.params.length),
    };
  }

  /**
   * Copies a saved state into this optimizer (same parameters and names). Throws, naming the keys, on
   * unknown keys, shape mismatches, parameters with only some of their buffers or with a step count and no
   * buffers, and, where parameters are named by their index, groups of other sizes than the state's
   * `groupSizes`. Parameters absent from the state start fresh. Hyper-parameters (lr, betas, ...) are not
   * part of the state.
   */
  loadStateDict(state: OptimizerStateInput): void {
    if (typeof state?.tensors !== "object" || state.tensors === null) {
      throw new Error(
        `loadStateDict: the state's tensors must be a Map or an object of tensors, got ${
          state === null || typeof state !== "object" ? `a state of ${state}` : typeof state.tensors
        }`,
      );
    }
    const entries = state.tensors instanceof Map ? state.tensors : new Map(Object.entries(state.tensors));
    const known = new Map(this.#slots.map((s) => [s.name, s]));
    const problems: string[] = [];
    const own = this.paramGroups.map((g) => g.params.length);
    if (this.#indexNames && state.groupSizes && state.groupSizes.join() !== own.join()) {
      problems.push(
        `the state's groups hold ${JSON.stringify(state.groupSizes)} parameters and this optimizer's ` +
          `${
            JSON.stringify(own)
          }: parameters named by their index would take other parameters' state (give ` +
          "the groups names, or the same parameters)",
      );
    }
    const unexpected = [...entries.keys()].filter((k) => {
      const dot = k.lastIndexOf(".");
      return !known.has(k.slice(0, dot)) || !this.stateNames.includes(k.slice(dot + 1));
    });
    if (unexpected.length) problems.push(`unexpected keys: ${unexpected.join(", ")}`);
    for (const name of Object.keys(state.paramSteps ?? {})) {
      if (!known.has(name)) problems.push(`step count for unknown parameter '${name}'`);
    }
    const plan: [Slot, (Tensor | HostTensor)[] | null, number][] = [];
    for (const s of this.#slots) {
      const keys = this.stateNames.map((n) => `${s.name}.${n}`);
      const vals = keys.map((k) => entries.get(k));
      const have = vals.filter((v) => v != null).length;
      // absent from the state: it starts fresh; a step count without buffers is kept where it has none (plain
      // SGD) and names its missing buffers otherwise
      if (have === 0 && state.paramSteps?.[s.name] === undefined) {
        plan.push([s, null, 0]);
        continue;
      }
      if (have < keys.length) {
        problems.push(`missing keys: ${keys.filter((_, j) => vals[j] == null).join(", ")}`);
      }
      vals.forEach((v, j) => {
        const problem = v == null ? null : entryProblem(keys[j], v, s.p.shape, "f32", ["state", "parameter"]);
        if (problem) problems.push(problem);
      });
      const steps = state.paramSteps?.[s.name] ?? state.step;
      if (!Number.isInteger(steps) || steps < 1) problems.push(`bad step count ${steps} for '${s.name}'`);
      plan.push([s, vals as (Tensor | HostTensor)[], steps]);
    }
    if (!Number.isInteger(state.step) || state.step < 0) problems.push(`bad step ${state.step}`);
    if (problems.length) throw new Error(`loadStateDict: ${problems.join(". ")}`);
    this.#newState(
      plan.filter(([s, vals]) => vals && !s.state).map(([s]) => s),
      (shape) => Tensor.empty(shape),
    );
    for (const [s, vals, steps] of plan) {
      s.steps = steps;
      if (!vals) {
        for (const t of s.state ?? []) t.dispose();
        s.state = null;
        continue;
      }
      vals.forEach((v, j) => writeEntry(v, s.state![j])); // its own state loads as a no-op
    }
    this.stepCount = state.step;
  }

  /** Frees the optimizer's buffers (not the parameters nor their gradients). */
  dispose(): void {
    for (const s of this.#slots) {
      for (const t of s.state ?? []) t.dispose();
      s.state = null;
    }
    this.#one?.dispose();
    this.#one = null;
  }
}

/** Hyper-parameters of {@linkcode AdamW}. */
export interface AdamWOptions {
  /** Learning rate (default 1e-3). */
  lr?: number;
  /** Coefficients of the running averages of the gradient and its square (default [0.9, 0.999]). */
  betas?: [number, number];
  /** Added to the denominator (default 1e-8). */
  eps?: number;
  /** Decoupled weight decay of groups that do not set their own (default 0.01, as PyTorch). */
  weightDecay?: number;
}

/**
 * AdamW with PyTorch's semantics (torch.optim.AdamW, non-amsgrad), per parameter with step count t:
 * `p *= 1 - lr*wd; m = b1*m + (1-b1)*g; v = b2*v + (1-b2)*g^2;
 * p -= (lr / (1 - b1^t)) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)`. One fused dispatch per parameter (one per
 * binding window of it where binding it whole would take more storage bindings than the device has).
 */
export class AdamW extends Optimizer {
  /** `exp_avg` (m) and `exp_avg_sq` (v), as PyTorch names them. */
  readonly stateNames: readonly string[] = ["exp_avg", "exp_avg_sq"];
  /** (b1, b2). */
  readonly betas: readonly [number, number];
  /** Denominator epsilon. */
  readonly eps: number;

  /** Takes a list of parameters or of groups (each may set its own weight decay). */
  constructor(params: ParamGroup[] | Tensor[], options: AdamWOptions = {}) {
    checkOptionKeys(options, ["lr", "betas", "eps", "weightDecay"], "AdamW");
    super(params, options.lr ?? 1e-3, options.weightDecay ?? 1e-2);
    const [b1, b2] = options.betas ?? [0.9, 0.999];
    if (!(typeof b1 === "number" && typeof b2 === "number" && b1 >= 0 && b1 < 1 && b2 >= 0 && b2 < 1)) {
      throw new Error(`AdamW: betas must be numbers in [0, 1), got ${shown(b1)}, ${shown(b2)}`);
    }
    this.betas = [b1, b2];
    this.eps = options.eps ?? 1e-8;
    if (!(typeof this.eps === "number" && this.eps >= 0)) {
      throw new Error(`AdamW: eps must be a number >= 0, got ${shown(this.eps)}`);
    }
  }

  /** Records the fused AdamW update of one parameter. */
  protected update(
    p: Tensor,
    g: Tensor,
    [m, v]: Tensor[],
    { lr, weightDecay, steps, scale }: { lr: number; weightDecay: number; steps: number; scale: Tensor },
  ): void {
    const [b1, b2] = this.betas;
    const buffers = { p: p.storage, g: g.storage, m: m.storage, v: v.storage, s: scale.storage };
    dispatchElementwise(adamwKernel, buffers, ["p", "g", "m", "v"], {
      decay: 1 - lr * weightDecay,
      b1,
      c1: 1 - b1,
      b2,
      c2: 1 - b2,
      stepSize: lr / (1 - b1 ** steps),
      bc2Sqrt: Math.sqrt(1 - b2 ** steps),
      eps: this.eps,
    }, p.size);
  }
}

/** Hyper-parameters of {@linkcode SGD}. */
export interface SGDOptions {
  /** Learning rate (default 1e-3). */
  lr?: number;
  /** Momentum factor (default 0: plain SGD, no state). */
  momentum?: number;
  /** Dampening of the momentum (default 0). */
  dampening?: number;
  /** L2 penalty added to the gradient (coupled, as torch.optim.SGD) of groups without their own (default 0). */
  weightDecay?: number;
  /** Nesterov momentum (default false). */
  nesterov?: boolean;
}

/**
 * SGD with PyTorch's semantics (torch.optim.SGD): `d = g + wd*p`; with momentum, `buf = d` on the first
 * step and `buf = momentum*buf + (1 - dampening)*d` afterwards, `d = nesterov ? d + momentum*buf : buf`;
 * then `p -= lr*d`. One dispatch per parameter.
 */
export class SGD extends Optimizer {
  /** `momentum_buffer` when momentum is used, else nothing. */
  readonly stateNames: readonly string[];
  /** Momentum factor. */
  readonly momentum: number;
  /** Dampening. */
  readonly dampening: number;
  /** Nesterov momentum. */
  readonly nesterov: boolean;

  /** Takes a list of parameters or of groups (each may set its own weight decay). */
  constructor(params: ParamGroup[] | Tensor[], options: SGDOptions = {}) {
    checkOptionKeys(options, ["lr", "momentum", "dampening", "weightDecay", "nesterov"], "SGD");
    super(params, options.lr ?? 1e-3, options.weightDecay ?? 0);
    this.momentum = options.momentum ?? 0;
    this.dampening = options.dampening ?? 0;
    this.nesterov = options.nesterov ?? false;
    if (!finiteNonNegative(this.momentum)) {
      throw new Error(`SGD: momentum must be a finite number >= 0, got ${shown(this.momentum)}`);
    }
    // (torch.optim.SGD checks neither; a NaN here would turn every parameter into NaN)
    if (!Number.isFinite(this.dampening)) {
      throw new Error(`SGD: dampening must be a finite number, got ${shown(this.dampening)}`);
    }
    if (typeof this.nesterov !== "boolean") {
      throw new Error(`SGD: nesterov must be true or false, got ${shown(this.nesterov)}`);
    }
    if (this.nesterov && (this.momentum <= 0 || this.dampening !== 0)) {
      throw new Error("SGD: nesterov needs a positive momentum and zero dampening");
    }
    this.stateNames = this.momentum > 0 ? ["momentum_buffer"] : [];
  }

  /** Records the SGD update of one parameter. */
  protected update(
    p: Tensor,
    g: Tensor,
    state: Tensor[],
    { lr, weightDecay, fresh, scale }: { lr: number; weightDecay: number; fresh: boolean; scale: Tensor },
  ): void {
    const withMomentum = this.momentum > 0;
    const buffers: Record<string, Tensor["storage"]> = { p: p.storage, g: g.storage, s: scale.storage };
    if (withMomentum) buffers.buf = state[0].storage;
    const spanned = withMomentum ? ["p", "g", "buf"] : ["p", "g"];
    dispatchElementwise(withMomentum ? SGD_KERNELS.momentum : SGD_KERNELS.plain, buffers, spanned, {
      lr,
      wd: weightDecay,
      momentum: this.momentum,
      damp: 1 - this.dampening,
      first: fresh ? 1 : 0,
      nesterov: this.nesterov ? 1 : 0,
    }, p.size);
  }
}

// ------------------------------------------------------------------------------------------ recipes

/** Options of {@linkcode configureOptimizers}. */
export interface ConfigureOptions {
  /** Learning rate. */
  lr: number;
  /** Weight decay of the decayed group. */
  weightDecay: number;
  /** AdamW betas. */
  betas: [number, number];
  /** AdamW epsilon (default 1e-8). */
  eps?: number;
  /** muP's width multiplier w (default: a muP model's own, `mupWidthMult(model.config)`, as mamba.py's
   * `configure_optimizers` reads `config.mup`; for another model, none: no muP group). */
  mupWidthMult?: number;
}

/**
 * mamba.py's `LM.configure_optimizers`: AdamW with two groups, every parameter of rank >= 2 decayed with
 * `weightDecay` and every parameter of rank < 2 (biases, norm weights, D) not. This follows mamba.py's
 * actual rule (`p.dim() >= 2`), so `A_log` (ED, N) and the conv weights (ED, 1, d_conv) ARE decayed, as in
 * mamba.py (and in the char-mamba reference run), even though A_log is not a matmul weight. Parameters are
 * named as in the model's state dict, so the optimizer state saves under the same names.
 *
 * For a muP model (`config.mup`), or with `mupWidthMult` w given, a third group first, as mamba.py's: the
 * in_proj, x_proj, dt_proj and out_proj weights with learning rate lr / w (`lrScale`) and weight decay
 * `weightDecay` x w, where w is by default the model's `mupWidthMult(config)`.
 */
export function configureOptimizers(model: Module, options: ConfigureOptions): AdamW {
  checkOptionKeys(options, ["lr", "weightDecay", "betas", "eps", "mupWidthMult"], "configureOptimizers");
  // required, as mamba.py's arguments: a missing weight decay must not become AdamW's default
  for (const k of ["lr", "weightDecay", "betas"] as const) {
    if (options[k] === undefined) throw new Error(`configureOptimizers: options.${k} is required`);
  }
  const named = model.namedParameters().filter(([, p]) => p.requiresGrad);
  // a muP model's own multiplier by default: mamba.py's configure_optimizers reads its config.mup
  const own = (model as { config?: { mup?: unknown; dModel: number; mupBaseWidth: number } }).config;
  const given = options.mupWidthMult ?? (own?.mup === true ? own.dModel / own.mupBaseWidth : undefined);
  const w = given ?? 1;
  if (!(w > 0 && w < Infinity)) {
    throw new Error(`configureOptimizers: mupWidthMult must be a finite number > 0, got ${w}`);
  }
  const isMup = (n: string) => given !== undefined && MUP_HIDDEN.test(n);
  const mup = named.filter(([n]) => isMup(n));
  const decay = named.filter(([n, p]) => p.rank >= 2 && !isMup(n));
  const noDecay = named.filter(([, p]) => p.rank < 2);
  const group = (list: [string, Tensor][], g: Omit<ParamGroup, "params" | "names">): ParamGroup => ({
    params: list.map(([, p]) => p),
    names: list.map(([n]) => n),
    ...g,
  });
  return new AdamW([
    ...(mup.length ? [group(mup, { weightDecay: options.weightDecay * w, lrScale: 1 / w })] : []),
    group(decay, { weightDecay: options.weightDecay }),
    group(noDecay, { weightDecay: 0 }),
  ], { lr: options.lr, betas: options.betas, eps: options.eps ?? 1e-8 });
}

// muP's "hidden weights" (mamba.py's list for Mamba).
const MUP_HIDDEN = /mixer\.(in_proj|x_proj|dt_proj|out_proj)\.weight$/;

/** Options of {@linkcode cosineSchedule}. */
export interface CosineScheduleOptions {
  /** Steps of linear warm-up (may be 0). */
  warmup: number;
  /** Step at which the cosine reaches `minLr` (>= warmup). */
  total: number;
  /** Learning rate at the end of the warm-up. */
  maxLr: number;
  /** Learning rate from `total` on. */
  minLr: number;
}

/**
 * The llama2.c / nanoGPT learning-rate schedule (the one the char-mamba reference run used), for a step
 * counted from 0:
 * - `step < warmup`: `maxLr * step / warmup` (0 at step 0);
 * - `warmup <= step <= total`: `minLr + 0.5 * (1 + cos(pi * (step - warmup) / (total - warmup))) * (maxLr - minLr)`
 *   (maxLr at `warmup`, minLr at `total`);
 * - `step > total`: `minLr`.
 *
 * With `warmup == total` there is no decay: `maxLr` at `total`, `minLr` after it.
 */
export function cosineSchedule(options: CosineScheduleOptions): (step: number) => number {
  checkOptionKeys(options, ["warmup", "total", "maxLr", "minLr"], "cosineSchedule");
  const { warmup, total, maxLr, minLr } = options;
  if (
    !(typeof warmup === "number" && typeof total === "number" && warmup >= 0 && total >= warmup &&
      total < Infinity)
  ) {
    throw new Error(
      `cosineSchedule: needs 0 <= warmup <= total < Infinity, got warmup ${warmup}, total ${total}`,
    );
  }
  for (const [name, lr] of [["maxLr", maxLr], ["minLr", minLr]] as const) {
    if (!finiteNonNegative(lr)) {
      throw new Error(`cosineSchedule: ${name} must be a finite number >= 0, got ${shown(lr)}`);
    }
  }
  return (step: number): number => {
    if (!(step >= 0 && step < Infinity)) {
      throw new Error(`cosineSchedule: the step must be a finite number >= 0, got ${step}`);
    }
    if (step < warmup) return maxLr * step / warmup;
    if (step >= total) return step === warmup ? maxLr : minLr;
    const ratio = (step - warmup) / (total - warmup);
    return minLr + 0.5 * (1 + Math.cos(Math.PI * ratio)) * (maxLr - minLr);
  };
}
