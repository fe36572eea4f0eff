/**
 * `fused_scan_fwd`, the fused scan's forward kernel (template: N, Nb and the block's first state n0, Lc, WG,
 * shuffle, lanes, dt rank Ri; chunk-parallel: folded or not, G = Lf / Lc chunks per walk).
 *
 * Owns: one invocation per (b, d) keeps h of states n0..n0+Nb in registers and walks time t0..t1:
 * dt = softplus(draw + bias), a = exp(dt A), h = a h + dt B x, y = C.h + D x, out = y * silu(z). With
 * `lanes` > 1, that many neighbouring lanes share (b, d), each holding Nb / lanes of the states, and
 * subgroupShuffleXor sums their shares of C.h (more invocations for a GPU at batch 1).
 * Workgroup memory: none; no barriers. With `shuffle`, each step's B and C row is loaded once per subgroup
 * and handed to the lanes by subgroupShuffle.
 * Reads: x, draw (or, with Ri > 0, dBC's dt columns and dt_proj's row, draw computed per step), B and C
 * from dBC, the parameters [bias | A_log | D | W] at the front of `ph`, z (a window of a wider tensor), and
 * with the uniform init 1 (continuing from a cache) the initial state h0 (B, ED, N) at h0Off in `ph`,
 * the state before step 0 instead of zeros.
 * Writes: out (state blocks after the first add their C.h to it; the last gates), and after each chunk of Lc
 * steps (and at the end) the state into hs (B, ED, chunks, N) behind the parameters in `ph`: the only state
 * that leaves the chip, read by the backward and, after a prompt, as the inference cache. Without a backward
 * to feed (the uniform allStates 0: inference, a prompt) only the states a forward reads again (where a
 * dispatch in order ends) and the state after the last step.
 * Chunk-parallel (`chunked`): a workgroup per (b, tile, walk) walks only its walk, G chunks of Lc in order
 * (G = 1 without `Lf`), from the state the chain (fused_carry_kernels.ts) left in hs before it, and stores the
 * state after each of its chunks but the last, which the chain wrote (so none with G = 1; none either with
 * allStates 0). Folded (`folded`, at most MAX_CHUNKS_FOLDED walks): no chain; it first folds the state before
 * its walk out of the local kernel's results for the walks before it (`carry`: their states from zero and sums
 * of dt), and stores the state after each of its chunks into hs (with allStates 0, after the last step only).
 * @module
 */

import { defineKernel, type Kernel } from "../core/kernel.ts";
import type { FusedVariant, StateBlock } from "./fused_variant.ts";
import {
  blockName,
  cachedKernel,
  channelLines,
  COMMON,
  foldCarry,
  gated,
  h0Value,
  laneState,
  LOAD_BIAS,
  loadA,
  loadD,
  loadWd,
  loadZ,
  plus,
  scanInputBuffers,
  stateUpdate,
  stepInputLines,
  sumLanes,
  UNIFORMS,
  unroll,
  walkChunks,
  walksOf,
} from "./fused_wgsl.ts";

/** The forward kernel of one state block (one pipeline per block, its n0 and Nb compiled in, so that every
 * index into the states is a constant). */
export function forwardKernel(
  v: FusedVariant,
  { n0, Nb }: StateBlock,
  Ri = 0,
  chunked = false,
  folded = false,
): Kernel {
  const shuffle = v.shuffle === true;
  const lanes = v.lanes ?? 1;
  const fold = chunked && folded;
  const G = chunked ? walkChunks(v) : 1; // chunks per workgroup's walk
  const key = `fwd|${v.N}|${Nb}|${n0}|${v.Lc}|${G}|${v.WG}|${shuffle}|${lanes}|${Ri}|${chunked}|${fold}`;
  const { N, Lc } = v;
  const W = walksOf(G);
  // Which states after a chunk it stores. For the backward (P.allStates): in order and folded, all; a chunked
  // walk, all but its last chunk's (the chain's, which the next walk may be reading), so none with one chunk
  // per walk. Without (inference): those that a forward reads again or lastState reads, the state where a
  // dispatch in order ends (the next starts from it), and after the last step.
  const store = !chunked
    ? "valid && (P.allStates != 0u || cend == t1)"
    : fold
    ? "valid && (P.allStates != 0u || cend == P.L)"
    : G > 1
    ? "valid && P.allStates != 0u && cend < t1"
    : "";
  const [first, last] = [n0 === 0, n0 + Nb === N];
  const K = Nb / lanes; // states of the block per invocation
  /** WGSL of this invocation's state j of the block, from the block's first: j, or with lanes its share. */
  const st = (j: number) => laneState(lanes, j);
  /** WGSL of whether this invocation stores the channel's y: the channel is valid, and with lanes, lane 0. */
  const own = lanes > 1 ? "valid && q == 0u" : "valid";
  /** WGSL of its state j before step 0: h0's where the call has one, else 0 (ph holds at least B ED N values
   * past h0Off 0, so the load is in bounds either way). */
  const init = (j: number) => h0Value(`hInit + ${st(j)}`);
  return cachedKernel(key, () =>
    defineKernel({
      name: `fused_scan_fwd_N${N}${blockName(N, Nb, n0)}_Lc${Lc}${G > 1 ? `_Lf${G * Lc}` : ""}_WG${v.WG}${
        shuffle ? "_shuf" : ""
      }${lanes > 1 ? `_lanes${lanes}` : ""}${Ri ? `_dt${Ri}` : ""}${chunked ? "_chunked" : ""}${
        fold ? "_folded" : ""
      }`,
      subgroups: shuffle || lanes > 1,
      buffers: [
        ...scanInputBuffers("read_write"),
        { name: "y", type: "f32", access: "read_write" },
        // folded: the local kernel's walk states (B, ED, walks, N) at locOff and sums of dt (B, ED, walks) at
        // sdtOff
        ...(fold ? [{ name: "carry", type: "f32" as const, access: "read" as const }] : []),
      ],
      uniforms: [
        ...UNIFORMS,
        ["allStates", "u32"],
        ...(fold ? [["locOff", "u32"], ["sdtOff", "u32"]] : []),
      ] as [
        string,
        "u32",
      ][],
      workgroupSize: v.WG,
      decls: COMMON,
      body: `
  // invocation -> (b, d); h of states n0..n0+Nb in registers for the whole walk. Blocks run one after
  // another: the first writes D x + C.h, later ones add their C.h, the last gates. Lanes past ED compute
  // on a valid channel and write nothing (control flow stays uniform for subgroup operations).
  ${
        chunked
          ? `// chunk-parallel: workgroup -> (b, tile, walk of ${G} chunk${
            G > 1 ? "s" : ""
          }); the walk starts from the
  // state the chain left before it in hs, and writes the states after its chunks but the last, which the chain
  // wrote (folded: from the state it folds out of the local results of the walks before it, and it writes
  // the state after each of its chunks into hs)
  let bt = group / ${W};
  let t0 = (group % ${W}) * ${G * Lc}u;
  let t1 = min(P.L, t0 + ${G * Lc}u);`
          : `let bt = group;
  let t0 = P.t0;
  let t1 = P.t1;`
      }
  let b = bt / P.tiles;
  ${channelLines("(bt % P.tiles)", v.WG, lanes, Nb)}
  let valid = d < P.ED;
  let dc = min(d, P.ED - 1u);
  var A: array<f32, ${K}>;
  var h: array<f32, ${K}>;
  var Bv: array<f32, ${K}>;
  var Cv: array<f32, ${K}>;
  let hsBase = (b * P.ED + dc) * P.chunks;
  let hPrev = (hsBase + t0 / ${Lc}u - 1u) * ${N}u${plus(n0)}; // the state before t0 in hs (t0 > 0)
  let hInit = (b * P.ED + dc) * ${N}u${plus(n0)}; // this channel's h0 (in ph whenever init is 1)
  ${loadA(N, n0, K, lanes)}
  ${
        fold
          ? `// the state before this chunk, from every chunk j before it: h = exp(A S_j) h + its local state
  ${
            foldCarry(
              "h",
              K,
              `t0 / ${G * Lc}u`,
              (j) => `(b * P.ED + dc) * ${W} + (${j})`,
              (c) => `ld_carry(P.sdtOff + ${c})`,
              (c, n) => `ld_carry(P.locOff + ${c} * ${N}u${plus(n0)} + ${st(n)})`,
              init,
            )
          }`
          : unroll(K, (n) => `h[${n}] = select(${init(n)}, ld_ph(P.hsOff + hPrev + ${st(n)}), t0 > 0u);`)
      }
  ${LOAD_BIAS}
  ${loadD(N)}
  ${loadWd(N, Ri)}
  // chunks, then their steps: the state is stored after each chunk's loop, not under a condition inside it
  // (lavapipe runs an \`if\` body on every step with its lanes masked off: 1.5-2x slower)
  for (var c0 = t0; c0 < t1; c0 += ${Lc}u) {
  let cend = min(c0 + ${Lc}u, t1);
  for (var t = c0; t < cend; t++) {
    ${
        stepInputLines({ N, Nb, n0, Ri, shuffle, lanes }, "t", {
          withC: true,
          afterDt: "let xv = ld_x(i);",
          indent: "    ",
        })
      }
    ${
        first
          ? `var yv = ${lanes > 1 ? "select(0.0, Dd * xv, q == 0u)" : "Dd * xv"};`
          : `// the earlier blocks' y, read only by the invocation that stores it (the other lanes of the channel
    // and the clamped lanes past ED reading it as it is written would be a data race)
    var yv = 0.0;
    if (${own}) { yv = ld_y(i); }`
      }
    let dtx = dt * xv;
    ${stateUpdate(K, "h")}
    ${unroll(K, (n) => `yv += Cv[${n}] * h[${n}];`)}
    ${sumLanes("yv", lanes)}
    ${last ? `if (P.gated != 0u) { ${loadZ("t")} yv = ${gated("yv")}; }` : ""}
    if (${own}) { st_y(i, yv); }
  }
  ${
        !store ? "" : `if (${store}) {
    let at = (hsBase + (cend - 1u) / ${Lc}u) * ${N}u${plus(n0)};
    ${unroll(K, (n) => `st_ph(P.hsOff + at + ${st(n)}, h[${n}]);`)}
  }`
      }
  }`,
    }));
}
