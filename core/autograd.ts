/**
 * Reverse-mode automatic differentiation.
 *
 * Every differentiable op is one {@linkcode defineOp} record: a forward that computes the output (run
 * without recording, so composite forwards stay a single node) and a backward that maps the output's
 * gradient to the inputs' gradients. When any input requires grad, the output gets a {@linkcode GradNode}
 * that remembers the inputs and the tensors saved for the backward. `backward()` walks the nodes in
 * reverse topological order, accumulates leaf gradients into `.grad`, and then releases the graph.
 * @module
 */

import { BF16_ONLY } from "./bf16.ts";
import { markSaved, type Storage } from "./memory.ts";
import { fmt, sameShape, stridesOf } from "./shape.ts";
import { freeOnThrow, keep, nextTensorId, Tensor, tidy, unscope } from "./tensor.ts";
import { add, copy, copyBox } from "./ops/index.ts";
import { zeros } from "./creation.ts";
import { mapOp } from "./ops/map_kernel.ts";

/** The record autograd keeps for one op application. */
export interface GradNode {
  /** Op name (for error messages). */
  readonly name: string;
  /** The op's tensor inputs. */
  readonly inputs: readonly Tensor[];
  /** Tensors the backward reads (counted in `memory().savedBytes`). */
  readonly saved: readonly Tensor[];
  /** Saved tensors that the op made itself (neither input nor output): disposed with the graph. */
  readonly owned: readonly Tensor[];
  /** Maps the output's gradient to one gradient (or null) per input. */
  readonly backward: (grad: Tensor, targets: GradTargets) => (Tensor | WindowGrad | null)[];
}

/**
 * A gradient that is zero outside a window of its input: `grad` holds elements `start ..` of `dim` (what
 * narrow's backward returns). The accumulator writes it into place, so that the pieces of a split cost
 * one copy each instead of a zero-padded tensor each plus an add.
 */
export class WindowGrad {
  /** Wraps the window's gradient; `grad`'s shape is the input's except along `dim`. */
  constructor(readonly grad: Tensor, readonly dim: number, readonly start: number) {}
}

/**
 * Lets a backward write an input's gradient window itself, straight into the input's gradient, instead of
 * returning a {@linkcode WindowGrad} that the accumulator then copies there (the conv, which reads the x
 * half of in_proj's output in place, writes that half of its gradient; the whole gradient then exists from
 * that point on, so take a target only where that does not raise the peak).
 */
export interface GradTargets {
  /**
   * The whole gradient of input `i`, owned by this backward pass, for the backward to write elements
   * start .. start + len of `dim` of it, every one of them (what is there before is undefined); the backward
   * then returns null for input i. Null where the input needs no gradient or its gradient so far overlaps
   * the window: return a WindowGrad.
   */
  window(i: number, dim: number, start: number, len: number): Tensor | null;
  /**
   * The gradient of input `i` so far, when there is one and this backward pass owns it (f32, not shared,
   * not saved), for the backward to add its own gradient of input i into in place; it then returns null for
   * input i. Null otherwise: return the gradient as usual.
   */
  sum(i: number): Tensor | null;
}

/** Definition of a differentiable op: the registry record of the op. */
export interface OpDef<A> {
  /** Op name. */
  name: string;
  /** Computes the output; `save` keeps tensors for the backward (inputs or the output). In a checkpoint's
   * first pass, an op with `replay` also gets `keep`: tensors it made (neither inputs nor the output) that
   * the checkpoint holds until its backward, where `replay` takes them instead of this forward running again. */
  forward(
    inputs: Tensor[],
    attrs: A,
    save: (...tensors: Tensor[]) => void,
    keep?: (...tensors: Tensor[]) => void,
  ): Tensor;
  /** Gradients of the inputs, given the output's gradient and the saved tensors. `inputs` is for shapes;
   * `targets` offers gradient windows to write in place. */
  backward(
    grad: Tensor,
    saved: Tensor[],
    inputs: readonly Tensor[],
    attrs: A,
    targets: GradTargets,
  ): (Tensor | WindowGrad | null)[];
  /**
   * Optional (selective recomputation): stands in for `forward` in a checkpoint's rerun, given views of what
   * the first pass's forward kept. It saves what the backward needs and returns the output tensor without
   * computing it (`Tensor.hollow`, which holds no values), so it may only be the checkpointed function's
   * result (an op that reads it throws). The rerun then skips work that only produces values its backward
   * does not read (the fused scan and out_proj: the scan's backward recomputes y itself).
   */
  replay?(inputs: Tensor[], attrs: A, kept: Tensor[], save: (...tensors: Tensor[]) => void): Tensor;
  /** Which inputs may be bf16 (weights stored in bfloat16, which its kernels read as f32); other ops
   * refuse bf16 inputs. */
  bf16Inputs?: readonly number[];
}

/** What a checkpoint's first pass kept for one op that has `replay` (in call order). */
interface KeptEntry {
  readonly name: string;
  readonly shapes: string;
  readonly tensors: readonly Tensor[];
}

/**
 * The innermost checkpoint pass running: its first pass ("keep": replayable ops keep tensors into `entries`),
 * its rerun ("replay": those ops take them back in order; the outputs they did not compute are in
 * `replayedOutputs` while the rerun runs), or "off": nothing kept, and ops compute as usual. "off" is a
 * checkpoint run as a plain call inside a first pass (its own first pass, in the enclosing rerun, keeps for
 * it), and both passes of a `checkpointInputsOnly`.
 */
type KeepContext =
  | { mode: "keep"; entries: KeptEntry[] }
  | { mode: "replay"; entries: readonly KeptEntry[]; next: number }
  | { mode: "off" };
const keepContexts: KeepContext[] = [];
/** The outputs that running reruns replayed (hollow: no values): no op or checkpoint may read them. */
const replayedOutputs = new Set<Tensor>();

/** Throws if `inputs` hold an output that a running rerun replayed without computing it. */
function checkNotReplayed(what: string, inputs: readonly Tensor[]): void {
  if (!replayedOutputs.size) return;
  const read = inputs.find((t) => replayedOutputs.has(t));
  if (read) {
    throw new Error(
      `checkpoint: '${what}' read ${read}, the output of an op that the rerun replays without computing it: ` +
        "only the checkpointed function's result may come from such an op",
    );
  }
}

let gradEnabled = true;

/** Whether ops currently record the graph. */
export function isGradEnabled(): boolean {
  return gradEnabled;
}

/**
 * Runs `fn` without recording the graph (inference, optimizer updates). `fn` must be synchronous: an async
 * `fn` (one that returns a Promise) throws, since recording is back on by the time it resumes after an
 * await; run the synchronous parts in `noGrad` and await between them.
 */
export function noGrad<T>(fn: () => T): T {
  return withGrad(false, "noGrad", fn);
}

/** Runs `fn` with graph recording on, even inside `noGrad` (used by recomputing backward passes); `fn` must be
 * synchronous, as in {@linkcode noGrad}. */
export function enableGrad<T>(fn: () => T): T {
  return withGrad(true, "enableGrad", fn);
}

function withGrad<T>(on: boolean, name: string, fn: () => T): T {
  const before = gradEnabled;
  gradEnabled = on;
  try {
    const out = fn();
    if (out instanceof Promise) {
      out.catch(() => {}); // what fn does after the refusal fails unseen, not as an unhandled rejection
      throw new Error(
        `${name}(fn) needs a synchronous fn: after an await in fn, ops would record the graph as outside it`,
      );
    }
    return out;
  } finally {
    gradEnabled = before;
  }
}

/** Attaches a node to `out` if grad is on and an input requires grad. */
function record(
  out: Tensor,
  name: string,
  inputs: readonly Tensor[],
  saved: readonly Tensor[],
  backward: (grad: Tensor, targets: GradTargets) => (Tensor | WindowGrad | null)[],
): Tensor {
  if (readers.length) noteReads(inputs);
  const owned = saved.filter((t) => t !== out && !inputs.includes(t));
  if (!gradEnabled || !inputs.some((t) => t.requiresGrad)) {
    for (const t of owned) t.dispose();
    return out;
  }
  attach(out, { name, inputs, saved, owned, backward });
  return out;
}

/** The storages a node's saved tensors had when it was recorded: a saved view disposed before the node is
 * released still un-counts its storage. */
const savedStorages = new WeakMap<GradNode, Storage[]>();

/** How many live nodes take each tensor as an input: a disposed output's node is released once none does. */
const consumers = new WeakMap<Tensor, number>();

/** Gives `out` its node: counts the saved bytes and the node as a consumer of each input; the tensors the node
 * owns go with the node, not with the tidy() scope that made them (which may return `out`). */
function attach(out: Tensor, node: GradNode): void {
  const storages = node.saved.map((t) => t.storage);
  for (const s of storages) markSaved(s, 1);
  for (const t of node.owned) unscope(t);
  savedStorages.set(node, storages);
  for (const x of new Set(node.inputs)) if (x.node) consumers.set(x, (consumers.get(x) ?? 0) + 1);
  out.requiresGrad = true;
  out.node = node;
}

/** While an op's forward runs: whether what it saves stays held until a backward that runs later (see
 * {@linkcode savesForLater}). */
let holdsForLater = false;
/** While an op's forward runs: whether anything reads what it saves or keeps (see {@linkcode savesForBackward}). */
let feedsBackward = false;
/** Checkpoint reruns running (their backward follows their forward at once). */
let rerunDepth = 0;

/**
 * For an op's forward: whether the tensors it saves, or keeps for a checkpoint's replay, stay held past this
 * forward until a backward that runs later. False under noGrad or where no input requires grad (nothing is
 * saved), and in a checkpoint's rerun (its backward follows at once). An op that can save less at the cost of
 * recomputing in its backward asks this (the fused scan's chunk states: saving less there would only add the
 * recomputation).
 */
export function savesForLater(): boolean {
  return holdsForLater;
}

/**
 * For an op's forward: whether a backward (or a checkpoint's replay) may read what it saves or keeps: the op's
 * node is recorded (grad on, an input requiring grad), or a checkpoint's first pass keeps its tensors (always
 * true there, even where the rerun will not record the op: a safe answer, at worst memory held for nothing).
 * False otherwise: under noGrad and where no input requires grad. An op whose forward writes something only its
 * backward reads may skip it then (the fused scan's chunk states: an inference forward writes the last state
 * only).
 */
export function savesForBackward(): boolean {
  return feedsBackward;
}

/** Runs an op's forward with {@linkcode savesForLater} answering `later` and {@linkcode savesForBackward}
 * answering `read`. */
function forwardHolding<T>(later: boolean, read: boolean, fn: () => T): T {
  const before = [holdsForLater, feedsBackward];
  [holdsForLater, feedsBackward] = [later, read];
  try {
    return fn();
  } finally {
    [holdsForLater, feedsBackward] = before;
  }
}

/** Registers a differentiable op and returns the function that applies it. */
export function defineOp<A>(def: OpDef<A>): (inputs: Tensor[], attrs: A) => Tensor {
  return (inputs, attrs) => {
    // before the forward allocates its output, which a throw on a disposed input would leak
    const gone = inputs.find((t) => t.disposed);
    if (gone) {
      throw new Error(
        `${def.name}: Tensor#${gone.id} ${fmt(gone.shape)} ${gone.dtype} was disposed and cannot be used`,
      );
    }
    for (let i = 0; i < inputs.length; i++) {
      if (inputs[i].dtype === "bf16" && !def.bf16Inputs?.includes(i)) {
        throw new Error(`${def.name}: input ${i} is ${inputs[i]}: ${BF16_ONLY}`);
      }
    }
    checkNotReplayed(def.name, inputs);
    const ctx = keepContexts[keepContexts.length - 1];
    const saved: Tensor[] = [];
    const save = (...t: Tensor[]) => saved.push(...t);
    let out: Tensor;
    if (def.replay && ctx?.mode === "replay") {
      const entry = takeKept(ctx, def.name, inputs);
      // replayed only where the output gets a node (its values are never read); else computed as usual
      if (gradEnabled && inputs.some((t) => t.requiresGrad)) {
        out = noGrad(() =>
          freeOnThrow(() => {
            const views = entry.tensors.map((t) => new Tensor(t.storage, t.shape, t.dtype));
            const o = def.replay!(inputs, attrs, views, save);
            if (!o.hollow) throw new Error(`${def.name}: replay must return Tensor.hollow(shape), got ${o}`);
            return o;
          })
        );
        replayedOutputs.add(out);
      } else {
        out = forwardHolding(
          false,
          false,
          () => noGrad(() => freeOnThrow(() => def.forward(inputs, attrs, save))),
        );
      }
    } else if (def.replay && ctx?.mode === "keep") {
      const kept: Tensor[] = [];
      const from = nextTensorId();
      // what it keeps is held until the checkpoint's rerun
      out = forwardHolding(
        rerunDepth === 0,
        true,
        () => noGrad(() => freeOnThrow(() => def.forward(inputs, attrs, save, (...t) => kept.push(...t)))),
      );
      // only tensors this forward made (not inputs, parameters or captured ones, which others dispose)
      const bad = kept.find((t) => t === out || t.id < from || t.kept);
      if (bad) {
        out.dispose();
        throw new Error(`${def.name}: keep takes tensors the op made, other than its output; got ${bad}`);
      }
      for (const t of kept) unscope(t);
      ctx.entries.push({ name: def.name, shapes: shapesOf(inputs), tensors: kept });
      // the checkpoint owns them from here: a node the op records (grad on inside the first pass) saves views
      const recorded = gradEnabled && inputs.some((t) => t.requiresGrad);
      for (let i = saved.length - 1; i >= 0; i--) {
        const t = saved[i];
        if (!kept.includes(t)) continue;
        if (recorded) saved[i] = new Tensor(t.storage, t.shape, t.dtype);
        else saved.splice(i, 1);
      }
    } else {
      const read = gradEnabled && inputs.some((t) => t.requiresGrad);
      out = forwardHolding(
        rerunDepth === 0 && read,
        read,
        () => noGrad(() => freeOnThrow(() => def.forward(inputs, attrs, save))),
      );
    }
    return record(
      out,
      def.name,
      inputs,
      saved,
      (g, targets) => def.backward(g, saved, inputs, attrs, targets),
    );
  };
}

/** Input shapes as one string (a replayed op's call is checked against its first pass's). */
const shapesOf = (inputs: readonly Tensor[]) => inputs.map((t) => fmt(t.shape)).join(" ");

/** The next kept entry of a rerun, which must be the same op's, called on inputs of the same shapes. */
function takeKept(
  ctx: { entries: readonly KeptEntry[]; next: number },
  name: string,
  inputs: Tensor[],
): KeptEntry {
  const entry = ctx.entries[ctx.next++];
  const shapes = shapesOf(inputs);
  if (!entry || entry.name !== name || entry.shapes !== shapes) {
    throw new Error(
      `checkpoint: the rerun called '${name}' on ${shapes} where the first pass called ${
        entry ? `'${entry.name}' on ${entry.shapes}` : "no more replayable ops"
      }: the function must run the same ops each time`,
    );
  }
  return entry;
}

/** Options for {@linkcode backward}. */
export interface BackwardOptions {
  /** Keep the graph (and its saved tensors) so that backward can run again. */
  retainGraph?: boolean;
}

/** Backpropagates from `root`; accumulates into the `.grad` of every leaf that requires grad. */
export function backward(root: Tensor, grad?: Tensor, options: BackwardOptions = {}): void {
  for (const g of propagate(root, grad, options).values()) if (g !== grad) g.dispose();
}

/**
 * The backward pass. `stop` marks tensors it does not go through (a checkpoint's rerun stops at the tensors
 * its function captured from the enclosing graph): returns their gradients, for the caller to pass on.
 */
function propagate(
  root: Tensor,
  grad: Tensor | undefined,
  options: BackwardOptions,
  stop?: (t: Tensor) => boolean,
): Map<Tensor, Tensor> {
  if (!root.requiresGrad) {
    throw new Error(`backward(): ${root} does not require grad (no input of it requires grad, or noGrad)`);
  }
  if (!grad && root.size !== 1) {
    throw new Error(`backward() without a gradient needs a scalar, got shape ${fmt(root.shape)}`);
  }
  if (grad?.disposed) throw new Error(`backward(): the gradient given for ${root} was disposed`);
  if (grad && grad.dtype !== root.dtype) {
    throw new Error(`backward(): gradient dtype ${grad.dtype} differs from tensor dtype ${root.dtype}`);
  }
  if (grad && !sameShape(grad.shape, root.shape)) {
    throw new Error(
      `backward(): gradient shape ${fmt(grad.shape)} differs from tensor shape ${fmt(root.shape)}`,
    );
  }
  const order = topoOrder(root, stop);
  const grads = new Map<Tensor, Tensor>();
  // `claimed`: tensors held by the map, by `pending` or by a leaf's .grad; anything else produced here is
  // disposed.
  const claimed = new Set<Tensor>();
  // Gradients made here from windows alone (zeros elsewhere, or unzeroed below), with the windows written so far.
  const windows = new Map<Tensor, Span[]>();
  // Those of them that targets.window made without zeroing: zero outside their windows only once the whole
  // gradient is read (see `complete`). The fused layer's two windows tile in_proj's output gradient, so its
  // zeroing (a clear of (B, L, 2ED) and a command per layer) is never needed.
  const unzeroed = new Set<Tensor>();
  // Window gradients not written anywhere yet (an input has either these or an entry in `grads`): kept as
  // they are until another contribution or the input's own backward needs the whole gradient, so that a
  // split's pieces cost one copy each and no whole, mostly-zero gradient is held before it is needed.
  const pending = new Map<Tensor, WindowGrad[]>();
  const seed = grad ?? onesLike(root);
  if (grad) claimed.add(grad);
  grads.set(root, seed);
  claimed.add(seed);
  const release = (t: Tensor) => {
    claimed.delete(t);
    if (t !== grad) t.dispose();
  };
  /** Makes x's gradient whole before it is read or added to: an unzeroed one (see targets.window) whose
   * windows do not tile it is copied window by window into zeros. */
  const complete = (x: Tensor) => {
    const g = grads.get(x);
    if (!g || !unzeroed.delete(g)) return;
    const spans = windows.get(g)!;
    if (covers(spans, x.shape)) return;
    const z = zeros(x.shape, { dtype: x.dtype });
    const whole = { offset: 0, strides: stridesOf(x.shape) };
    for (const span of spans) {
      const box = [...x.shape];
      box[span.dim] = span.end - span.start;
      const at = { offset: span.start * whole.strides[span.dim], strides: whole.strides };
      copyBox(g, at, z, at, box);
    }
    release(g);
    windows.set(z, spans);
    grads.set(x, z);
    claimed.add(z);
  };
  /** Writes x's pending windows into one whole gradient (zero elsewhere; not cleared where they cover it). */
  const settle = (x: Tensor) => {
    const ws = pending.get(x);
    if (!ws) return;
    pending.delete(x);
    const spans = ws.map(spanOf);
    const whole = covers(spans, x.shape)
      ? Tensor.empty(x.shape, x.dtype)
      : zeros(x.shape, { dtype: x.dtype });
    for (const w of ws) {
      copyBox(
        w.grad,
        { offset: 0, strides: stridesOf(w.grad.shape) },
        whole,
        windowAt(x.shape, w),
        w.grad.shape,
      );
      release(w.grad);
    }
    windows.set(whole, spans);
    grads.set(x, whole);
    claimed.add(whole);
  };
  // The gradient being propagated and what its node's backward returned: on a throw, freed with the rest.
  let inFlight = new Set<Tensor>();
  // Tensors whose node this pass ran (and released, unless retainGraph).
  const ran: Tensor[] = [];
  const pass = () => {
    for (const t of order) {
      settle(t);
      complete(t);
      const g = grads.get(t);
      if (!g) continue;
      grads.delete(t);
      inFlight = new Set([g]);
      if (!t.node) {
        accumulateLeaf(t, g, grad);
        continue;
      }
      const node = t.node;
      for (const s of node.saved) {
        if (s.disposed) {
          throw new Error(`backward(): a tensor saved by '${node.name}' was disposed before backward`);
        }
      }
      const targets: GradTargets = {
        window: (i, dim, start, len) => {
          const x = node.inputs[i];
          if (!x?.requiresGrad) return null;
          const span = { dim, start, end: start + len };
          if (dim < 0 || dim >= x.rank || start < 0 || len < 0 || span.end > x.shape[dim]) {
            throw new Error(
              `backward of '${node.name}': window ${start}..${span.end} of dim ${dim} of ${fmt(x.shape)}`,
            );
          }
          settle(x);
          const prev = grads.get(x);
          if (!prev) {
            const z = Tensor.empty(x.shape, x.dtype);
            windows.set(z, [span]);
            unzeroed.add(z);
            grads.set(x, z);
            claimed.add(z);
            return z;
          }
          const spans = windows.get(prev);
          if (!spans?.every((s) => disjoint(s, span))) return null;
          spans.push(span); // still zero there
          return prev;
        },
        sum: (i) => {
          const x = node.inputs[i];
          if (!x?.requiresGrad) return null;
          settle(x);
          complete(x);
          const prev = grads.get(x);
          if (!prev || prev === grad || prev.dtype !== "f32") return null;
          if (prev.storage.users !== 1 || prev.storage.savedBy !== 0) return null;
          windows.delete(prev); // no longer zero outside its windows
          return prev;
        },
      };
      const inGrads = node.backward(g, targets);
      const transient = inFlight;
      // Released first, so that a backward that passes `g` through hands it on without a copy.
      if (g !== grad) claimed.delete(g);
      node.inputs.forEach((x, i) => {
        const r = inGrads[i];
        if (!r) return;
        if (r instanceof WindowGrad) {
          transient.add(r.grad);
          if (!x.requiresGrad) return;
          checkWindow(x, r, node.name);
          const ws = pending.get(x);
          const prev = grads.get(x);
          if (!prev && !claimed.has(r.grad) && (!ws || ws.every((w) => disjoint(spanOf(w), spanOf(r))))) {
            if (ws) ws.push(r);
            else pending.set(x, [r]);
            claimed.add(r.grad);
            return;
          }
          settle(x);
          const held = grads.get(x);
          // an unzeroed gradient takes a disjoint window as it is; anything else reads it whole
          if (held && !windows.get(held)?.every((w) => disjoint(w, spanOf(r)))) complete(x);
          const before = grads.get(x);
          const next = accumulateWindow(before, x, r, windows, grad);
          if (next !== before) {
            if (before) release(before);
            grads.set(x, next);
            claimed.add(next);
          }
          return;
        }
        let gi = r;
        // Also a gradient for an input that needs none (a custom backward may return one): it is
        // transient, so it is disposed below instead of leaking.
        transient.add(gi);
        if (!x.requiresGrad) return;
        if (!sameShape(gi.shape, x.shape)) {
          throw new Error(`backward of '${node.name}': gradient ${fmt(gi.shape)} for input ${fmt(x.shape)}`);
        }
        if (claimed.has(gi)) gi = copy(gi);
        settle(x);
        complete(x);
        const prev = grads.get(x);
        if (prev) {
          const sum = add(prev, gi);
          claimed.delete(prev);
          prev.dispose();
          transient.add(gi);
          gi = sum;
        }
        grads.set(x, gi);
        claimed.add(gi);
      });
      for (const x of transient) if (!claimed.has(x) && x !== grad) x.dispose();
      // Every consumer of t came earlier in the order: its saved tensors are no longer needed.
      ran.push(t);
      if (!options.retainGraph) releaseNode(t);
    }
  };
  try {
    // freeOnThrow: what a backward made before it threw and had not returned yet (a's gradient where b's ran
    // out of memory) goes too, also outside tidy.
    freeOnThrow(() => {
      noGrad(pass);
      // What is left are the gradients of the tensors where the pass stopped (none are in the order).
      for (const x of [...pending.keys()]) settle(x);
      for (const x of [...grads.keys()]) complete(x);
    });
  } catch (e) {
    // Otherwise the gradients held so far leak, and disposed tensors upstream keep their nodes for good.
    for (const x of new Set([...claimed, ...inFlight])) if (x !== grad && !x.kept) x.dispose();
    if (!options.retainGraph) abandonGraph(order, ran);
    throw e;
  }
  if (!options.retainGraph) releaseGraph(order);
  return grads;
}

/** A window written into a gradient: elements start..end of dim. */
interface Span {
  dim: number;
  start: number;
  end: number;
}

const spanOf = (w: WindowGrad): Span => ({ dim: w.dim, start: w.start, end: w.start + w.grad.shape[w.dim] });
const disjoint = (a: Span, b: Span) => a.dim === b.dim && (a.end <= b.start || b.end <= a.start);

/** Whether disjoint spans of one dim tile all of it. */
function covers(spans: Span[], shape: readonly number[]): boolean {
  const sorted = [...spans].sort((a, b) => a.start - b.start);
  let at = 0;
  for (const s of sorted) {
    if (s.dim !== sorted[0].dim || s.start !== at) return false;
    at = s.end;
  }
  return sorted.length > 0 && at === shape[sorted[0].dim];
}

/** Where window `w` sits in a contiguous tensor of `shape`. */
function windowAt(shape: readonly number[], w: WindowGrad): { offset: number; strides: number[] } {
  const st = stridesOf(shape);
  return { offset: w.start * st[w.dim], strides: st };
}

function checkWindow(x: Tensor, w: WindowGrad, op: string): void {
  const len = w.grad.shape[w.dim];
  const fits = w.grad.rank === x.rank && w.start + len <= x.shape[w.dim] &&
    w.grad.shape.every((d, k) => k === w.dim || d === x.shape[k]);
  if (!fits) {
    const where = `window gradient ${fmt(w.grad.shape)} at ${w.start} of dim ${w.dim}`;
    throw new Error(`backward of '${op}': ${where} does not fit input ${fmt(x.shape)}`);
  }
}

/**
 * Adds a window gradient to `prev` (the input's gradient so far, if any) and returns the result: a fresh
 * zero tensor with the window copied in; `prev` itself when the window could be written into it (a copy
 * where `prev` is still zero there, an in-place add where `prev` is this backward's own tensor); or,
 * when `prev` shares its storage, `prev` plus the zero-padded window.
 */
function accumulateWindow(
  prev: Tensor | undefined,
  x: Tensor,
  w: WindowGrad,
  windows: Map<Tensor, Span[]>,
  userGrad: Tensor | undefined,
): Tensor {
  const span = spanOf(w);
  const to = windowAt(x.shape, w);
  const from = { offset: 0, strides: stridesOf(w.grad.shape) };
  const padded = () => {
    const z = zeros(x.shape, { dtype: x.dtype });
    copyBox(w.grad, from, z, to, w.grad.shape);
    return z;
  };
  if (!prev) {
    const z = padded();
    windows.set(z, [span]);
    return z;
  }
  const spans = windows.get(prev);
  if (spans?.every((s) => disjoint(s, span))) {
    copyBox(w.grad, from, prev, to, w.grad.shape); // still zero there
    spans.push(span);
    return prev;
  }
  const own = prev !== userGrad && prev.storage.users === 1 && prev.storage.savedBy === 0;
  if (own && prev.dtype === "f32") {
    copyBox(w.grad, from, prev, to, w.grad.shape, true);
    windows.delete(prev);
    return prev;
  }
  const z = padded();
  const sum = add(prev, z);
  z.dispose();
  return sum;
}

function onesLike(t: Tensor): Tensor {
  return mapOp("1.0", [], t.shape);
}

/** Adds `g` into a leaf's `.grad`; takes ownership of `g` unless it is the caller's own gradient. */
function accumulateLeaf(t: Tensor, g: Tensor, userGrad: Tensor | undefined): void {
  if (!t.requiresGrad) return;
  if (t.disposed) { // a .grad kept on it would have no owner left: nothing frees a disposed leaf's .grad
    if (g !== userGrad) g.dispose();
    return;
  }
  if (t.grad?.disposed) {
    throw new Error(
      `backward: the .grad of ${t} was disposed but not set to null (zeroGrad() does both; or set .grad = null)`,
    );
  }
  if (t.grad) {
    const sum = add(t.grad, g);
    t.grad.dispose();
    t.grad = keep(sum);
    if (g !== userGrad) g.dispose();
  } else {
    t.grad = keep(g === userGrad ? copy(g) : g);
  }
}

/** Why a node was released: after its backward (in a pass that went through, or in one that threw), when the
 * tidy() scope that made it ended, or when its output was disposed with no node consuming it. */
export type ReleaseReason = "backward" | "failed" | "tidy" | "dispose";

/**
 * Outputs whose node was released, with the op's name and why. Without this, backward through such a
 * tensor again treated it as a leaf: no error, no gradients for the real leaves, and a kept `.grad` on the
 * output that nothing disposed.
 */
const released = new WeakMap<Tensor, [string, ReleaseReason]>();

const RELEASED_HOW: Record<ReleaseReason, string> = {
  backward: "by an earlier backward(); pass { retainGraph: true } to the first backward() to run backward " +
    "through it again",
  failed: "by an earlier backward() that threw part-way (the nodes it had run were released)",
  tidy:
    "when the tidy() scope that made it ended (a tidy's intermediates take their graph with them): call " +
    "backward() inside that tidy, or keep() the tensors it goes through",
  dispose: "when it was disposed",
};

function topoOrder(root: Tensor, stop?: (t: Tensor) => boolean): Tensor[] {
  const order: Tensor[] = [];
  const seen = new Set<Tensor>();
  const stack: [Tensor, boolean][] = [[root, false]];
  while (stack.length) {
    const [t, done] = stack.pop()!;
    if (done) {
      order.push(t);
      continue;
    }
    if (seen.has(t)) continue;
    if (stop?.(t)) {
      seen.add(t);
      continue;
    }
    const was = t.node ? undefined : released.get(t);
    if (was) {
      throw new Error(
        `backward(): the graph through '${was[0]}' (${t}) was already released ${RELEASED_HOW[was[1]]}`,
      );
    }
    seen.add(t);
    stack.push([t, true]);
    for (const x of t.node?.inputs ?? []) if (x.requiresGrad && !seen.has(x)) stack.push([x, false]);
  }
  return order.reverse();
}

function releaseGraph(order: Tensor[]): void {
  for (const t of order) releaseNode(t);
}

/**
 * After a backward that threw: the nodes it ran stay released (as in PyTorch; a later backward through them
 * says the earlier one failed), the others stay for the tensors that hold them. Its releases skipped the
 * cascade to disposed inputs (it would have released every node at its end): disposed tensors that no node
 * consumes any more are released now, in order, so that nothing is left behind once the rest is disposed.
 */
function abandonGraph(order: Tensor[], ran: Tensor[]): void {
  for (const t of ran) {
    const was = released.get(t);
    if (was) released.set(t, [was[0], "failed"]);
  }
  for (const t of order) if (t.node && t.disposed && !consumers.get(t)) releaseNode(t, "dispose");
}

/**
 * Drops a node: its saved tensors stop counting as saved, and the tensors it made for itself are freed.
 * Called after the node's backward, for a tidy() scope's intermediates when it ends, and when its output is
 * disposed with no node consuming it. Except after a backward (which releases every node in order), inputs
 * that were disposed and that no node consumes any more are released in turn.
 */
export function releaseNode(t: Tensor, why: ReleaseReason = "backward"): void {
  // a worklist, not recursion: a chain of disposed tensors 10^4 long would overflow the stack part-way
  const work = [t];
  while (work.length) {
    const t = work.pop()!;
    if (!t.node) continue;
    const node = t.node;
    t.node = null; // first: disposing an owned tensor below must not come back here
    for (const s of savedStorages.get(node) ?? []) markSaved(s, -1);
    for (const s of node.owned) s.dispose();
    released.set(t, [node.name, why]);
    for (const x of new Set(node.inputs)) {
      const n = (consumers.get(x) ?? 0) - 1;
      if (n > 0) consumers.set(x, n);
      else {
        consumers.delete(x);
        if (why !== "backward" && x.disposed) work.push(x);
      }
    }
  }
}

/**
 * Disposes `t`, a tensor made for one op's call alone (the ids a model built from an array), when that op's
 * output `out` is released, where its node saved `t` for the backward; else now.
 */
export function disposeWithGraph(t: Tensor, out: Tensor): void {
  if (!out.node?.saved.includes(t)) return t.dispose();
  (out.node.owned as Tensor[]).push(t); // owned: disposed with the node (after its backward, or with its tidy)
  unscope(t);
}

/** Releases a disposed output's node when no node consumes it (called by `Tensor.dispose`). */
export function releaseIfUnconsumed(t: Tensor): void {
  if (t.node && !consumers.get(t)) releaseNode(t, "dispose");
}

/** The tensors read by each checkpoint first pass that is running (innermost last): what its function captures. */
const readers: Set<Tensor>[] = [];

/** Notes the op inputs that have a node (intermediates; leaves need no note) for the running first passes. */
function noteReads(inputs: readonly Tensor[]): void {
  for (const x of inputs) if (x.node) { for (const r of readers) r.add(x); }
}

/**
 * Runs `fn(...inputs)` without keeping its intermediates; the backward runs `fn` again to get them.
 * Trades compute for memory (gradient checkpointing).
 *
 * `fn` may read tensors other than its inputs. Parameters (leaves) get their gradients in the rerun, as
 * usual. Intermediates of the enclosing graph that require grad (`h = w.mul(2)`, read by `fn` by closure)
 * are found in the first run and become inputs of the checkpoint's node, as in PyTorch's non-reentrant
 * checkpoint: the rerun's backward stops at them (and at the inputs, where `fn` reads them by closure too)
 * and hands their gradient to the enclosing backward, which goes on through their own graph. Like the
 * inputs, they are saved for the backward: dispose them only after it. `fn` must read the same tensors in
 * both runs: a rerun that reads an intermediate from outside that the first run did not read throws.
 */
export function checkpoint(fn: (...inputs: Tensor[]) => Tensor, ...inputs: Tensor[]): Tensor {
  return checkpointOf(fn, inputs, true);
}

/**
 * {@linkcode checkpoint} that saves only its inputs (and the tensors `fn` captures): ops that could replay in
 * the rerun from what their first pass kept (the fused scan and out_proj: its chunk states) keep nothing and
 * compute again, as every other op does. Less memory, more time: what `MambaConfig.recompute: "input"` runs.
 */
export function checkpointInputsOnly(fn: (...inputs: Tensor[]) => Tensor, ...inputs: Tensor[]): Tensor {
  return checkpointOf(fn, inputs, false);
}

/** A checkpoint whose replayable ops keep what their rerun needs (`replay`), or keep nothing. */
function checkpointOf(fn: (...inputs: Tensor[]) => Tensor, inputs: Tensor[], replay: boolean): Tensor {
  // Its inputs are its node's inputs in the rerun of an enclosing checkpoint, whatever fn reads.
  if (readers.length) noteReads(inputs);
  checkNotReplayed("checkpoint", inputs);
  if (!gradEnabled) {
    // a plain call: inside an enclosing first pass nothing is kept for it (its own first pass, in the
    // enclosing rerun, keeps what its rerun replays)
    keepContexts.push({ mode: "off" });
    try {
      return fn(...inputs);
    } finally {
      keepContexts.pop();
    }
  }
  // The first pass keeps nothing but its output: its intermediates are freed at once.
  // fn may return a tensor it did not make (one of its inputs, one it captured, or what a checkpoint in it
  // returned as is under noGrad): the output gets a node of its own, so it must be a tensor of its own.
  const first = nextTensorId();
  const reads = new Set<Tensor>();
  const keeps: KeptEntry[] = [];
  readers.push(reads);
  keepContexts.push(replay ? { mode: "keep", entries: keeps } : { mode: "off" });
  let out: Tensor;
  try {
    out = noGrad(() =>
      tidy(() => {
        const y = fn(...inputs);
        if (y.node) reads.add(y);
        return y.id < first ? copy(y) : y;
      })
    );
  } catch (e) {
    for (const t of keeps.flatMap((k) => k.tensors)) t.dispose();
    throw e;
  } finally {
    readers.pop();
    keepContexts.pop();
  }
  const captured = [...reads].filter((x) => x.node && x.id < first && !inputs.includes(x));
  // what replayable ops kept: saved (counted) and owned by this node, so freed with the graph
  const kept = keeps.flatMap((k) => k.tensors);
  attach(out, {
    name: "checkpoint",
    inputs: [...inputs, ...captured],
    saved: [...inputs, ...captured, ...kept],
    owned: kept,
    backward: (g) => rerun(fn, inputs, captured, replay ? keeps : null, g),
  });
  return out;
}

/**
 * checkpoint's backward: runs `fn` again on copies of the inputs with grad on, and backpropagates through
 * what it made. Returns the inputs' gradients, then the captured tensors'. `keeps`: what the first pass's
 * replayable ops kept, which they replay from; null: they compute again (checkpointInputsOnly).
 */
function rerun(
  fn: (...inputs: Tensor[]) => Tensor,
  inputs: readonly Tensor[],
  captured: readonly Tensor[],
  keeps: readonly KeptEntry[] | null,
  g: Tensor,
): (Tensor | null)[] {
  return tidy(() => {
    const leaves = inputs.map((x) => {
      const d = copy(x);
      d.requiresGrad = x.requiresGrad;
      return d;
    });
    const from = nextTensorId();
    const ctx = keeps ? { mode: "replay" as const, entries: keeps, next: 0 } : { mode: "off" as const };
    keepContexts.push(ctx);
    const before = new Set(replayedOutputs);
    let y: Tensor;
    rerunDepth++;
    try {
      y = enableGrad(() => fn(...leaves));
    } finally {
      rerunDepth--;
      keepContexts.pop();
      // this rerun's replayed outputs leave the set (only backpropagated from, below)
      for (const t of [...replayedOutputs]) if (!before.has(t)) replayedOutputs.delete(t);
    }
    if (ctx.mode === "replay" && ctx.next !== ctx.entries.length) {
      throw new Error(
        `checkpoint: the rerun called ${ctx.next} replayable ops where the first pass called ${ctx.entries.length}: ` +
          "the function must run the same ops each time",
      );
    }
    // On a throw, this tidy frees the copies with their gradients (kept, as leaves' .grad are).
    const outside = y.requiresGrad ? propagate(y, g, {}, stopAt([...inputs, ...captured], from)) : new Map();
    const grads = leaves.map((d, i) => {
      const gd = d.grad;
      if (gd) gd.kept = false;
      // fn may read an input by closure too, not only through its copy: that gradient goes to it as well
      const direct = inputs.indexOf(inputs[i]) === i ? outside.get(inputs[i]) : undefined;
      if (!gd || !direct) return gd ?? direct ?? null;
      const sum = add(gd, direct);
      gd.dispose(); // kept by the backward, so in no tidy scope
      return sum;
    });
    return [...grads, ...captured.map((x) => outside.get(x) ?? null)];
  });
}

/**
 * Where a rerun's backward stops: at the intermediates made before the rerun (ids below `from`), the
 * enclosing graph's: the checkpoint's inputs and captured tensors. Their nodes are not the rerun's to run or
 * release: the enclosing backward runs them.
 */
function stopAt(reads: readonly Tensor[], from: number): (t: Tensor) => boolean {
  const known = new Set(reads);
  return (t) => {
    if (!t.node || t.id >= from) return false;
    if (known.has(t)) return true;
    throw new Error(
      `checkpoint: the backward's rerun of its function read ${t} (made by '${t.node.name}' outside of ` +
        "it), which its first run did not read: the function must read the same tensors each time",
    );
  };
}
