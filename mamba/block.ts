/**
 * Mamba's blocks, exactly as mamba.py: `MambaBlock` (the mixer), `ResidualBlock` (norm, mixer, residual)
 * and `Mamba` (the stack), with parallel `forward` and single-token `step`.
 * @module
 */

import { tensor } from "../core/creation.ts";
import {
  add,
  cat,
  exp,
  matmul,
  mul,
  narrow,
  neg,
  pad,
  rmsNormMatmul,
  silu,
  softplus,
  split,
  sum,
  transpose,
} from "../core/ops/index.ts";
import { fmt, sameShape } from "../core/shape.ts";
import { freeOnThrow, rescope, type Tensor, tidy, unscope } from "../core/tensor.ts";
import { streamFor } from "../core/random.ts";
import { Conv1d, Linear, RMSNorm, type WeightDtype } from "../nn/layers.ts";
import { Module } from "../nn/module.ts";
import { selectiveScan } from "../scan/selective_scan.ts";
import { fusedMambaScan } from "../scan/fused.ts";
import { fusedMambaScanOut } from "../scan/fused_out.ts";
import { convStep, ssmStep, ssmStepFits } from "../scan/fused_step.ts";
import "../scan/tune_fused.ts"; // registers the fused-scan tuner that init() runs
import { checkpoint, checkpointInputsOnly, isGradEnabled, noGrad } from "../core/autograd.ts";
import { deviceInfo } from "../core/device.ts";
import { type MambaConfig, mambaConfig } from "./config.ts";

/**
 * The inference cache of one layer: plain tensors that the caller owns. A `step` returns new caches and
 * leaves the ones it was given alive, so the caller disposes the old caches once the step has run (and, at
 * the end, the last ones). A `tidy` around each step frees only what the step made, not the caches passed
 * in; a `tidy` around a whole loop frees them all only when the loop ends, so memory grows with the steps.
 * `MambaLM.generate` disposes its caches itself; `MambaLM.step` shows a manual loop.
 */
export interface LayerCache {
  /** SSM state (B, ED, N). */
  h: Tensor;
  /** The last dConv-1 inputs of the conv, oldest first (B, ED, dConv-1). */
  inputs: Tensor;
}

/** The mixer: in_proj, causal conv, selective SSM, gate, out_proj. */
export class MambaBlock extends Module {
  /** D -> 2 ED */
  readonly inProj: Linear;
  /** depthwise causal conv over ED channels */
  readonly conv1d: Conv1d;
  /** ED -> R + 2N */
  readonly xProj: Linear;
  /** R -> ED, with bias */
  readonly dtProj: Linear;
  /** (ED, N), A = -exp(A_log) */
  readonly A_log: Tensor;
  /** (ED) */
  readonly D: Tensor;
  /** ED -> D */
  readonly outProj: Linear;
  /** Optional RMSNorms of delta, B, C (innerLayernorms). */
  readonly norms: { dt: RMSNorm; B: RMSNorm; C: RMSNorm } | null;

  /** The config, checked (a key that is missing or ill-typed, or a stale dInner, is named). */
  readonly config: MambaConfig;

  /** Builds the mixer with mamba.py's initialisation; with `weightDtype` bf16, in_proj's and out_proj's weights
   * (most of a block's) are stored in bfloat16, for inference. */
  constructor(config: MambaConfig, weightDtype: WeightDtype = "f32") {
    super();
    config = this.config = mambaConfig(config);
    const { dModel, dInner: ED, dState: N, dtRank: R, dConv } = config;
    try {
      this.inProj = this.child("in_proj", new Linear(dModel, 2 * ED, config.bias, weightDtype));
      this.conv1d = this.child("conv1d", new Conv1d(ED, dConv, config.convBias));
      this.xProj = this.child("x_proj", new Linear(ED, R + 2 * N, false));
      this.dtProj = this.child("dt_proj", new Linear(R, ED, true));
      initDtProj(this.dtProj, config);
      const aLog = new Float32Array(ED * N);
      for (let i = 0; i < aLog.length; i++) aLog[i] = Math.log((i % N) + 1);
      this.A_log = this.param("A_log", tensor(aLog, [ED, N]));
      this.D = this.param("D", tensor(new Float32Array(ED).fill(1), [ED]));
      this.outProj = this.child("out_proj", new Linear(ED, dModel, config.bias, weightDtype));
      this.norms = config.innerLayernorms
        ? {
          dt: this.child("dt_layernorm", new RMSNorm(R, config.rmsNormEps, { affine: !config.mup })),
          B: this.child("B_layernorm", new RMSNorm(N, config.rmsNormEps, { affine: !config.mup })),
          C: this.child("C_layernorm", new RMSNorm(N, config.rmsNormEps, { affine: !config.mup })),
        }
        : null;
    } catch (e) {
      this.dispose(); // what was made before running out of memory (under setMemoryLimit)
      throw e;
    }
  }

  /**
   * u: (B, L, D) -> (B, L, D); with `wantCache`, also the layer's state after the last step. With `residual`
   * (B, L, D), `out` is residual + the mixer's output, added by out_proj's product itself (`matmulAdd`).
   * With `from`, the layer's cache after the tokens before u (`step`'s or a previous forward's), the steps
   * go on from it: the conv sees its last inputs before u's and the scan starts from its state, so u's
   * outputs are those of one forward over both (a long prompt in chunks). With autograd on, the cache given
   * is a constant (it must not require grad) and the cache returned has no autograd: training from a carried
   * state backpropagates within u's steps only (truncated backpropagation through time).
   */
  forward(
    u: Tensor,
    wantCache = false,
    residual?: Tensor,
    from?: LayerCache,
  ): { out: Tensor; cache: LayerCache | null } {
    const ED = this.config.dInner;
    const [Bsz, L] = u.shape;
    if (u.rank !== 3 || u.size === 0) { // the modes differed at L = 0 (an error inside, or an empty output)
      throw new Error(`MambaBlock.forward: u must be (B, L, D) with B, L >= 1, got ${fmt(u.shape)}`);
    }
    if (from) {
      checkLayerCache("MambaBlock.forward", from, this.config, Bsz);
      checkCacheConstant("MambaBlock.forward", from);
    }
    const xz = this.inProj.forward(u); // xz: (B, L, 2ED) = [xIn | z]
    // After a cache, the conv's inputs before u's are the cache's (the kernel reads them as its prefix) and the
    // scan starts from its h: no copies.
    const prefix = from?.inputs ?? null; // prefix: (B, ED, K-1)
    let out: Tensor;
    let h: Tensor | null = null;
    let xIn: Tensor; // the conv's input: xz (its first ED channels), or x0
    if (this.config.scan === "fused" && fusedScanAvailable()) {
      // The conv and the scan read the two halves of xz in place (no copies).
      xIn = xz;
      const x = this.conv1d.forward(xz, "silu", 0, prefix); // x: (B, L, ED)
      // The scan and out_proj in one op: no y saved (the scan's backward recomputes it), and replayed in a
      // recomputing block's rerun (see fusedMambaScanOut). After a cache the scan starts from its h; with
      // wantCache, the state after the last step (the kernel's last chunk state) comes back in `box`.
      const w = this.dtProj;
      const box = wantCache ? { h: null as Tensor | null } : undefined;
      out = fusedMambaScanOut(
        x,
        this.dBC(x),
        w.weight,
        w.bias!,
        this.A_log,
        this.D,
        xz,
        ED,
        this.outProj.weight,
        this.outProj.bias,
        residual,
        { h0: from?.h ?? null, stateInto: box },
      ); // out: (B, L, D)
      h = box?.h ?? null; // h: (B, ED, N)
    } else {
      // As mamba.py: split into copies (silu(z) keeps its own z, so xz itself need not be kept).
      const [x0, z] = split(xz, ED, -1); // x0, z: (B, L, ED)
      xz.dispose(); // nothing saves it (split's backward needs only its shape): free it before the scan
      xIn = x0;
      const x = this.conv1d.forward(x0, "silu", undefined, prefix); // x: (B, L, ED)
      const { y, hs } = this.ssm(x, from?.h); // y: (B, L, ED), hs: (B, L, ED, N)
      out = this.outProj.forward(mul(y, silu(z)), residual); // out: (B, L, D)
      // h: (B, ED, N), a copy outside the graph
      if (wantCache) h = noGrad(() => narrow(hs, 1, L - 1, 1).reshape(Bsz, ED, this.config.dState));
    }
    if (!wantCache || !h) return { out, cache: null };
    return { out, cache: { h, inputs: noGrad(() => this.convInputs(xIn, prefix)) } };
  }

  /**
   * The cache's conv inputs (B, ED, K-1) after `src` (B, L, ED, or 2ED wide: its first ED channels): its last
   * K-1 steps; where L < K-1, the steps before them first: the prefix's (B, ED, K-1), the inputs before src's
   * (a cache's), or zeros (the conv's left padding). Copies, outside the graph.
   */
  private convInputs(src: Tensor, prefix: Tensor | null): Tensor {
    const { dInner: ED, dConv: K } = this.config;
    const L = src.shape[1];
    const n = Math.min(L, K - 1);
    let tail = narrow(src, 1, L - n, n); // tail: (B, n, ED) or, from xz, (B, n, 2ED)
    if (src.shape[2] !== ED) tail = disposeAfter(narrow(tail, -1, 0, ED), tail); // tail: (B, n, ED)
    let inputs = transpose(tail, 1, 2); // inputs: (B, ED, n)
    tail.dispose();
    if (n < K - 1) {
      const before = prefix ? narrow(prefix, 2, n, K - 1 - n) : null; // before: (B, ED, K-1-n)
      const all = before ? cat([before, inputs], 2) : pad(inputs, [K - 1 - n, 0]); // all: (B, ED, K-1)
      before?.dispose();
      inputs.dispose();
      inputs = all;
    }
    return inputs;
  }

  /** The fused path's SSM alone: x (B, L, ED) after the conv and xz (B, L, 2ED), whose z half gates -> the
   * gated y (B, L, ED): x_proj, dt_proj, the scan, D x and the gate (what bench/scan_report.ts times). */
  fusedSsm(x: Tensor, xz: Tensor): Tensor {
    const w = this.dtProj;
    return fusedMambaScan(x, this.dBC(x), w.weight, w.bias!, this.A_log, this.D, xz, this.config.dInner);
  }

  /** The fused path's x_proj: x (B, L, ED) -> dBC (B, L, R + 2N), or padded (below), normed with `norms`. */
  private dBC(x: Tensor): Tensor {
    const { dtRank: R, dState: N } = this.config;
    // On CPU adapters x_proj's output is padded to a multiple of 4 columns (zero rows appended to its weight),
    // so that its matmuls and their gradients move 16 bytes at a time (lavapipe, d_model 16: 1.47 -> 1.17 ms
    // for the three); the scan ignores the extra columns. Not on GPUs: R + 2N is a multiple of 4 wherever
    // d_model is a multiple of 64 (R = d_model / 16), so only toy layers pad, whose step a GPU's host bounds,
    // and the pad's three commands (a clear and a copy forward, a copy backward) cost it more than it saves.
    const S = R + 2 * N;
    const Sp = this.norms || !deviceInfo().isFallbackAdapter ? S : Math.ceil(S / 4) * 4;
    let dBC = Sp === S
      ? this.xProj.forward(x) // dBC: (B, L, R + 2N)
      : matmul(x, pad(this.xProj.weight, [0, 0, 0, Sp - S]), { transB: true }); // dBC: (B, L, Sp)
    if (this.norms) {
      // Nothing saves the pre-norm dBC (split's backward needs only shapes) nor the norm outputs (cat's
      // backward likewise; the norms save their inputs): free them once consumed, as xz above.
      const parts = split(dBC, [R, N, N], -1); // delta: (B, L, R), Bm: (B, L, N), C: (B, L, N)
      dBC.dispose();
      const normed = [
        this.norms.dt.forward(parts[0]),
        this.norms.B.forward(parts[1]),
        this.norms.C.forward(parts[2]),
      ];
      dBC = cat(normed, -1); // dBC: (B, L, R + 2N)
      for (const t of normed) t.dispose();
    }
    return dBC;
  }

  /** x: (B, L, ED) after the conv -> y: (B, L, ED) and the states hs: (B, L, ED, N); from `h0` (B, ED, N)
   * where given, else zeros. */
  ssm(x: Tensor, h0?: Tensor): { y: Tensor; hs: Tensor } {
    const { dtRank: R, dState: N } = this.config;
    const A = neg(exp(this.A_log)); // A: (ED, N)
    const dBC = this.xProj.forward(x); // dBC: (B, L, R + 2N)
    let [delta, Bm, C] = split(dBC, [R, N, N], -1); // (B, L, R), (B, L, N), (B, L, N)
    dBC.dispose(); // nothing saves it (split's backward needs only shapes)
    if (this.norms) {
      // delta: (B, L, R), Bm: (B, L, N), C: (B, L, N)
      [delta, Bm, C] = [this.norms.dt.forward(delta), this.norms.B.forward(Bm), this.norms.C.forward(C)];
    }
    delta = softplus(this.dtProj.forward(delta)); // delta: (B, L, ED)
    return selectiveScan(
      x,
      delta,
      A,
      Bm,
      C,
      this.D,
      this.config.scan === "fused" ? "pscan" : this.config.scan,
      h0,
    );
  }

  /** One token. u: (B, D); cache from the previous step -> (B, D) and the new cache. With `residual` (B, D),
   * `out` is residual + the mixer's output, as in {@linkcode MambaBlock.forward}. With `norm`, the mixer
   * takes norm(u) (the residual block's norm: on a GPU's fused path in_proj's product normalizes on the way). */
  step(u: Tensor, cache: LayerCache, residual?: Tensor, norm?: RMSNorm): { out: Tensor; cache: LayerCache } {
    const { dInner: ED, dState: N, dtRank: R, dConv: K, dModel: D } = this.config;
    const Bu = u.shape[0];
    if (
      u.rank !== 2 || u.shape[1] !== D || u.dtype !== "f32" ||
      (residual && !sameShape(residual.shape, u.shape))
    ) {
      throw new Error(
        `MambaBlock.step: u must be f32 (B, ${D}), a residual as u; got u ${u.dtype} ${fmt(u.shape)}${
          residual ? `, residual ${fmt(residual.shape)}` : ""
        }`,
      );
    }
    // (a disposed or i32 cache met an op's error inside, different per mode)
    checkLayerCache("MambaBlock.step", cache, this.config, Bu, undefined, `u ${fmt(u.shape)}`);
    // The fused step's kernels have no backward: with gradients wanted (the input or a parameter requires
    // grad, outside noGrad) the readable step below runs, differentiable as mamba.py's (the fused one dropped
    // every gradient but out_proj's and the residual's).
    const wantsGrad = isGradEnabled() &&
      [u, residual, norm?.weight, cache.h, cache.inputs, ...this.parameters()].some((t) => t?.requiresGrad);
    // (On a software adapter a large N would loop past its limit in the SSM step: the readable step runs.)
    if (
      this.config.scan === "fused" && fusedScanAvailable() && !this.norms && K >= 2 && !wantsGrad &&
      ssmStepFits(N, R)
    ) {
      // The same step in two kernels (conv, SSM) around x_proj's product: see scan/fused_step.ts. The norm
      // inside in_proj's product where it is one (matvec) kernel.
      const fold = norm && !this.inProj.bias;
      // xz: (B, 2ED) = [xIn | z]
      const xz = fold
        ? rmsNormMatmul(u, norm.weight, norm.eps, this.inProj.weight)
        : this.inProj.forward(norm ? norm.forward(u) : u);
      // conv.x: (B, ED), conv.inputs: (B, ED, K-1)
      const conv = convStep(xz, cache.inputs, this.conv1d.weight, this.conv1d.bias);
      const dBC = this.xProj.forward(conv.x); // dBC: (B, R + 2N)
      const w = this.dtProj;
      // r.y: (B, ED), r.h: (B, ED, N)
      const r = ssmStep(conv.x, dBC, w.weight, w.bias!, this.A_log, this.D, xz, cache.h);
      const out = this.outProj.forward(r.y, residual); // out: (B, D)
      return { out, cache: { h: r.h, inputs: conv.inputs } };
    }
    // mamba.py's step, line by line
    const Bsz = u.shape[0];
    const [xIn, z] = split(this.inProj.forward(norm ? norm.forward(u) : u), ED, -1); // xIn, z: (B, ED)
    const xcat = cat([cache.inputs, xIn.reshape(Bsz, ED, 1)], 2); // xcat: (B, ED, K)
    let xc = sum(mul(xcat, this.conv1d.weight.reshape(ED, K)), -1); // xc: (B, ED)
    if (this.conv1d.bias) xc = add(xc, this.conv1d.bias); // xc: (B, ED)
    const x = silu(xc); // x: (B, ED)
    let [delta, Bm, C] = split(this.xProj.forward(x), [R, N, N], -1); // (B, R), (B, N), (B, N)
    if (this.norms) {
      // delta: (B, R), Bm: (B, N), C: (B, N)
      [delta, Bm, C] = [this.norms.dt.forward(delta), this.norms.B.forward(Bm), this.norms.C.forward(C)];
    }
    delta = softplus(this.dtProj.forward(delta)); // delta: (B, ED)
    const A = neg(exp(this.A_log)); // A: (ED, N)
    const delta3 = delta.reshape(Bsz, ED, 1); // delta3: (B, ED, 1)
    const deltaA = exp(mul(delta3, A)); // deltaA: (B, ED, N)
    const BX = mul(mul(delta3, Bm.reshape(Bsz, 1, N)), x.reshape(Bsz, ED, 1)); // BX: (B, ED, N)
    const h = add(mul(deltaA, cache.h), BX); // h: (B, ED, N)
    const y = add(matmul(h, C.reshape(Bsz, N, 1)).reshape(Bsz, ED), mul(this.D, x)); // y: (B, ED)
    const out = this.outProj.forward(mul(y, silu(z)), residual); // out: (B, D)
    return { out, cache: { h, inputs: narrow(xcat, 2, 1, K - 1) } }; // inputs: (B, ED, K-1)
  }
}

/** Whether the fused kernels run on this adapter: their backward binds 10 storage buffers (WebGPU's default
 * limit is 8; the device is asked for the adapter's limits). Where it cannot, the block uses pscan. */
export function fusedScanAvailable(): boolean {
  return deviceInfo().limits.maxStorageBuffersPerShaderStage >= 10;
}

/** dt_proj as mamba.py: weight U(+-R^-0.5 * dtScale) or constant; bias = softplus^-1(dt), dt log-uniform. */
function initDtProj(dtProj: Linear, c: MambaConfig): void {
  const std = c.dtRank ** -0.5 * c.dtScale;
  const rng = streamFor();
  const w = new Float32Array(c.dInner * c.dtRank);
  for (let i = 0; i < w.length; i++) w[i] = c.dtInit === "constant" ? std : (2 * rng.nextFloat() - 1) * std;
  const b = new Float32Array(c.dInner);
  for (let i = 0; i < b.length; i++) {
    const u = rng.nextFloat();
    const dt = Math.max(
      Math.exp(u * (Math.log(c.dtMax) - Math.log(c.dtMin)) + Math.log(c.dtMin)),
      c.dtInitFloor,
    );
    b[i] = dt + Math.log(-Math.expm1(-dt)); // inverse of softplus
  }
  dtProj.loadStateDict({
    weight: { shape: [c.dInner, c.dtRank], data: w },
    bias: { shape: [c.dInner], data: b },
  });
}

/** norm -> mixer -> + residual */
export class ResidualBlock extends Module {
  /** The mixer. */
  readonly mixer: MambaBlock;
  /** The pre-norm. */
  readonly norm: RMSNorm;

  /** Builds one block (see {@linkcode MambaBlock}'s `weightDtype`). */
  constructor(config: MambaConfig, weightDtype: WeightDtype = "f32") {
    super();
    this.mixer = this.child("mixer", new MambaBlock(config, weightDtype)); // validates the config
    const { dModel, rmsNormEps, mup } = this.mixer.config;
    try {
      this.norm = this.child("norm", new RMSNorm(dModel, rmsNormEps, { affine: !mup }));
    } catch (e) {
      this.dispose(); // the mixer, where the norm ran out of memory
      throw e;
    }
  }

  /** x: (B, L, D) -> (B, L, D); with `from`, on from that cache (see {@linkcode MambaBlock.forward}). */
  forward(x: Tensor, wantCache = false, from?: LayerCache): { out: Tensor; cache: LayerCache | null } {
    const recompute = this.mixer.config.recompute;
    // Checked before the norm runs (a throw after it left its output behind), and before a checkpoint's first
    // pass, which runs without autograd: the mixer's own check there let a cache that requires grad through.
    if (from) {
      checkLayerCache("ResidualBlock.forward", from, this.mixer.config, x.shape[0]);
      checkCacheConstant("ResidualBlock.forward", from);
    }
    if (recompute && isGradEnabled()) {
      // Keep only the block's input; norm, in_proj, conv and x_proj run again in the backward (the fused
      // scan and out_proj replay from the chunk states they keep: fusedMambaScanOut; with "input" they keep
      // nothing and run again too). The residual is added inside, by out_proj's product (so the block's
      // output is the checkpoint's). A cache wanted is the first pass's (made without autograd), taken out of
      // its scope; the rerun makes none. A cache given must outlive the backward (the rerun reads it).
      const run = recompute === "input" ? checkpointInputsOnly : checkpoint;
      let cache: LayerCache | null = null;
      let firstPass = true;
      const out = run((u) => {
        const r = this.mixer.forward(this.norm.forward(u), wantCache && firstPass, u, from);
        if (r.cache) {
          cache = r.cache;
          unscope(cache.h);
          unscope(cache.inputs);
        }
        firstPass = false;
        return r.out;
      }, x); // out: (B, L, D)
      const c = cache as LayerCache | null;
      if (c) [c.h, c.inputs].forEach(rescope);
      return { out, cache: c };
    }
    // out_proj adds the residual x itself (matmulAdd): no elementwise add after it
    return this.mixer.forward(this.norm.forward(x), wantCache, x, from); // out: (B, L, D)
  }

  /** x: (B, D) -> (B, D) */
  step(x: Tensor, cache: LayerCache): { out: Tensor; cache: LayerCache } {
    return this.mixer.step(x, cache, x, this.norm); // out: (B, D): out_proj(mixer(norm(x))) + x
  }
}

/** A list of sub-modules named "0", "1", ... */
export class ModuleList<M extends Module> extends Module {
  /** The modules in order. */
  readonly items: M[];
  /** Registers the modules. */
  constructor(items: M[]) {
    super();
    this.items = items.map((m, i) => this.child(String(i), m));
  }
}

/** The stack of residual Mamba blocks (no embedding, no final norm), as mamba.py's `Mamba`. */
export class Mamba extends Module {
  /** The blocks. */
  readonly layers: ModuleList<ResidualBlock>;

  /** The config, checked (a key that is missing or ill-typed, or a stale dInner, is named). */
  readonly config: MambaConfig;

  /** Builds `config.nLayers` blocks; `weightDtype` bf16 stores in_proj's and out_proj's weights in bfloat16,
   * for inference (half the memory; see {@linkcode MambaBlock}). */
  constructor(config: MambaConfig, weightDtype: WeightDtype = "f32") {
    super();
    config = this.config = mambaConfig(config);
    const blocks: ResidualBlock[] = [];
    try {
      for (let i = 0; i < config.nLayers; i++) blocks.push(new ResidualBlock(config, weightDtype));
    } catch (e) {
      for (const b of blocks) b.dispose(); // the blocks made before one ran out of memory
      throw e;
    }
    this.layers = this.child("layers", new ModuleList(blocks));
  }

  /** x: (B, L, D) -> (B, L, D) */
  forward(x: Tensor): Tensor {
    return this.forwardWithCache(x, false).out;
  }

  /**
   * Forward that can also return each layer's cache after the last position (for generation). With
   * `wantCache`, the caller owns the returned caches: dispose them (`dispose(caches)`) when done. With `from`
   * (one cache per layer, from `step` or a forward before), x's positions follow the tokens those caches have
   * seen: the outputs are those of one forward over both (a long prompt in chunks). The caches given stay
   * alive. With autograd on, the caches are constants: those given must not require grad, those returned have
   * no autograd, and the gradients stay within x's positions (truncated backpropagation through time: training
   * from a carried state). With `recompute`, each block's cache is its checkpoint's first pass's, and a cache
   * given must stay alive until the backward (the rerun reads it).
   */
  forwardWithCache(
    x: Tensor,
    wantCache: boolean,
    from?: LayerCache[],
  ): { out: Tensor; caches: LayerCache[] } {
    this.checkInput(x, 3);
    if (from) { // checked before the first layer's norm runs (with autograd: nothing frees it)
      checkCacheCount("Mamba.forwardWithCache", from, this.config.nLayers);
      const B = x.shape[0];
      from.forEach((c, i) => {
        checkLayerCache("Mamba.forwardWithCache", c, this.config, B, i, `input ${fmt(x.shape)}`);
        checkCacheConstant("Mamba.forwardWithCache", c, i);
      });
    }
    const caches: LayerCache[] = [];
    // Without autograd nothing later needs a layer's intermediates: each layer runs in its own tidy, and the
    // previous layer's output goes as soon as the next one has read it (the caller's input stays).
    const grad = isGradEnabled();
    const input = x;
    this.layers.items.forEach((layer, i) => {
      const prev = x;
      const c = from?.[i];
      const r = grad ? layer.forward(prev, wantCache, c) : tidy(() => layer.forward(prev, wantCache, c));
      x = r.out; // x: (B, L, D)
      if (!grad && prev !== input) prev.dispose();
      if (r.cache) caches.push(r.cache);
    });
    return { out: x, caches };
  }

  /** x: (B, D), one cache per layer -> (B, D) and the new caches. */
  step(x: Tensor, caches: LayerCache[]): { out: Tensor; caches: LayerCache[] } {
    this.checkInput(x, 2);
    checkCacheCount("Mamba.step", caches, this.config.nLayers);
    // Every cache is checked before any layer runs: h (B, ED, N), inputs (B, ED, K-1).
    const B = x.shape[0];
    caches.forEach((c, i) => checkLayerCache("Mamba.step", c, this.config, B, i, `input ${fmt(x.shape)}`));
    const next: LayerCache[] = [];
    this.layers.items.forEach((layer, i) => {
      const r = layer.step(x, caches[i]);
      x = r.out; // x: (B, D)
      next.push(r.cache);
    });
    return { out: x, caches: next };
  }

  /** Zero caches for a batch size (a positive integer); the caller owns and disposes them. */
  emptyCache(batch: number): LayerCache[] {
    if (!Number.isInteger(batch) || batch < 1) {
      throw new Error(`Mamba.emptyCache: batch must be a positive integer, got ${batch}`);
    }
    const { dInner: ED, dState: N, dConv: K } = this.config;
    // freeOnThrow: the layers' caches made before one runs out of memory go too
    return freeOnThrow(() =>
      this.layers.items.map(() => ({
        h: tensor(new Float32Array(batch * ED * N), [batch, ED, N]),
        inputs: tensor(new Float32Array(batch * ED * (K - 1)), [batch, ED, K - 1]),
      }))
    );
  }

  /** Checks dtype, rank and width of an input. */
  private checkInput(x: Tensor, rank: number): void {
    const D = this.config.dModel;
    if (x.dtype !== "f32" || x.rank !== rank || x.shape[rank - 1] !== D) {
      const want = rank === 3 ? `(B, L, ${D})` : `(B, ${D})`;
      throw new Error(`Mamba: expected an f32 input ${want}, got ${x.dtype} ${fmt(x.shape)}`);
    }
    // rows first: an empty batch (prefill([])) is (0, 0), which said "no positions"; as L = 0, the fused scan's
    // check named its own x (B, L, ED), not this input
    if (rank === 3 && x.shape[0] === 0) {
      throw new Error(`Mamba: the input ${fmt(x.shape)} has no rows (B = 0)`);
    }
    if (rank === 3 && x.shape[1] === 0) {
      throw new Error(`Mamba: the input ${fmt(x.shape)} has no positions (L = 0)`);
    }
  }
}

/** Throws where a cache that a forward goes on from requires grad (with autograd on): no gradient flows into
 * a carried state (truncated backpropagation), so one that wants it is refused rather than silently cut. */
function checkCacheConstant(who: string, cache: LayerCache, layer?: number): void {
  if (!isGradEnabled() || !(cache.h.requiresGrad || cache.inputs.requiresGrad)) return;
  const which = layer === undefined ? "cache" : `cache of layer ${layer}`;
  throw new Error(
    `${who}: the ${which} requires grad, but no gradient flows ` +
      "into a carried state (truncated backpropagation through time): pass caches without autograd (those a " +
      "forward returns), or detach them",
  );
}

/** Throws unless `caches` is an array of one cache per layer (a single cache given as the list is named). */
function checkCacheCount(who: string, caches: unknown, layers: number): void {
  if (Array.isArray(caches) && caches.length === layers) return;
  throw new Error(
    Array.isArray(caches)
      ? `${who}: ${caches.length} caches for ${layers} layers`
      : `${who}: ${typeof caches} given where an array of ${layers} caches (one per layer) is needed`,
  );
}

/** Throws, naming what it wants and what it got, unless `cache` (of layer `layer`, where given) fits a batch of
 * B for this config; `input` names the input in the message. */
export function checkLayerCache(
  who: string,
  cache: LayerCache,
  config: MambaConfig,
  B: number,
  layer?: number,
  input = `a batch of ${B}`,
): void {
  const { dInner: ED, dState: N, dConv: K } = config;
  const of = layer === undefined ? "the cache" : `the cache of layer ${layer}`;
  if (typeof cache !== "object" || cache === null) {
    // a hole in the list (a cache disposed and set to null) read 'Cannot read properties of null'
    throw new Error(`${who}: ${of} is ${cache === null ? "null" : typeof cache}, not a cache {h, inputs}`);
  }
  for (const [name, t] of [["h", cache.h], ["inputs", cache.inputs]] as const) {
    if (!t || t.disposed || t.dtype !== "f32") {
      throw new Error(
        `${who}: ${of} has ${name} ${!t ? "missing" : t.disposed ? "disposed" : `of ${t.dtype}`}`,
      );
    }
  }
  const wantH = [B, ED, N];
  const wantInputs = [B, ED, K - 1];
  if (!sameShape(cache.h.shape, wantH) || !sameShape(cache.inputs.shape, wantInputs)) {
    throw new Error(
      `${who}: ${of} has h ${fmt(cache.h.shape)} and inputs ${fmt(cache.inputs.shape)}; ${input} needs ` +
        `h ${fmt(wantH)} (B, ED, N) and inputs ${fmt(wantInputs)} (B, ED, dConv-1)`,
    );
  }
}

/** Returns `next` after disposing `prev`, which made it. */
function disposeAfter(next: Tensor, prev: Tensor): Tensor {
  prev.dispose();
  return next;
}
