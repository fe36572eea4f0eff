/**
 * `fused_scan_bwd`, the fused scan's backward kernel with recomputation (template: the forward's parameters,
 * plus Ls, hbuf, S, reduce), and the subgroup butterfly that sums dB and dC over channels.
 *
 * Owns: a workgroup owns one b and WG channels, an invocation one channel d and the states n0..n0+Nb (with
 * `lanes` = P: WG / P channels, P lanes per channel, each Nb / P of its states; shuffles sum dx, ddelta and
 * the gate's y over a channel's lanes). It
 * walks the chunks t1 > k >= t0 in reverse; for each it recomputes the chunk's h from the saved boundary
 * state (with Ls < Lc first the states at sub-chunk boundaries, then each sub-chunk's states into a private
 * array of Ls x Nb floats), then runs the reverse scan lam = gy C + a(t+1) lam(t+1) inside the chunk.
 * Registers: h, lam, dA, dbias, dD (and dW with dt_proj inside) of its channel; the carry of lam and the sums
 * over time leave through `gpar` between dispatches.
 * Workgroup memory: with `reduce: "workgroup"` the dB/dC terms of S steps ([step][channel][B | C | dt]),
 * summed over channels between two barriers; with "subgroup" none (a butterfly of subgroupShuffleXor sums
 * them, no barriers). With `hbuf: "workgroup"` the recomputed states too ([step][state][channel]).
 * Reads: x, draw or the dt columns, dBC, ph = [bias | A_log | D | W | hs], z, and g, the output's gradient.
 * Writes: dx, ddraw (through softplus), dz per (b, t, d) (dz possibly into a window of a wider gradient;
 * state blocks after the first add to them); one
 * partial row of dB/dC (and dt) terms per tile or subgroup and step into `gred` (B, segLen, slots, PW), and
 * after it, gpar (B, ED, [dbias | dD | dA (N) | lam carry (N) | dW (Ri)]). `fused_reduce_kernels.ts` sums
 * both.
 * @module
 */

import { defineKernel, type Kernel } from "../core/kernel.ts";
import { type FusedVariant, shuffleSize, stepsPerBarrier } from "./fused_variant.ts";
import { subgroupSums } from "./fused_subgroup_sums.ts";
import {
  blockColumn,
  blockName,
  cachedKernel,
  channelLines,
  COMMON,
  drawLines,
  laneState,
  loadBC,
  loadWd,
  partialWidth,
  plus,
  scanInputBuffers,
  sumLanes,
  UNIFORMS,
  unroll,
} from "./fused_wgsl.ts";

/** The backward kernel of the state block starting at n0 (one pipeline per block, as the forward). With
 * Ri > 0 (dt_proj inside), the last block also sums dW (ED, Ri) over time and puts the Ri dt-column terms
 * of dBC's gradient, sum_d ddraw W[d, r], into the partial rows (after the 2N B and C columns). */
export function backwardKernel(v: FusedVariant, n0: number, Ri = 0): Kernel {
  const key = `bwd|${v.N}|${v.Nb ?? v.N}|${n0}|${v.Lc}|${
    v.Ls ?? v.Lc
  }|${v.WG}|${v.hbuf}|${v.S}|${v.reduce}|${v.shuffle}|${v.lanes}|${Ri}`;
  return cachedKernel(key, () => generateBackward(v, n0, Ri));
}

function generateBackward(v: FusedVariant, n0: number, Ri: number): Kernel {
  const shared = v.hbuf === "workgroup";
  const sg = v.reduce === "subgroup";
  const shuffle = v.shuffle === true;
  const Nb = v.Nb ?? v.N;
  const { N, Lc, WG } = v;
  const first = n0 === 0;
  const dtHere = n0 + Nb === N ? Ri : 0; // the dt terms need the whole ddraw: the last block adds them
  const lanes = v.lanes ?? 1; // lanes sharing a channel (subgroup sums only)
  const K = Nb / lanes; // states of the block per invocation
  /** WGSL of this invocation's state j of the block, from the block's first: j, or with lanes its share. */
  const st = (j: number) => laneState(lanes, j);
  /** WGSL of a per-channel value that lanes > 1 hold alike: only lane q = 0 stores it (or adds it once). */
  const once = (cond: string) => (lanes > 1 ? `${cond} && q == 0u` : cond);
  const CW = 2 * Nb + dtHere; // terms per channel and step summed over channels
  const PW = partialWidth(N, Ri);
  const GP = 2 * N + 2 + Ri; // gpar row: [dbias, dD, dA (N), lam carry (N), dW (Ri)]
  const S = stepsPerBarrier(v, CW);
  /** WGSL of a term only the first state block adds (D x and its gradients). */
  const firstOnly = (val: string) => (first ? val : "0.0");
  /** The same, added by one lane of a channel's (a term of a sum over the lanes). */
  const firstOnce = (val: string) => (first && lanes > 1 ? `select(0.0, ${val}, q == 0u)` : firstOnly(val));
  const TW = 2 * K + dtHere; // terms per lane and step summed over channels (CW without lanes)
  /** WGSL storing `val` at element `i` of gx/gdraw/gz: the first block writes, later ones add. */
  const acc = (buf: string, val: string, i = "i") =>
    `st_${buf}(${i}, ${first ? "" : `ld_${buf}(${i}) + `}${val});`;
  const Ls = v.Ls ?? Lc;
  const SUB = Lc / Ls; // sub-chunks per chunk
  /** WGSL of one recomputed step of the state array `h` at time `t`. */
  const stepLines = (h: string, t: string) =>
    `{
      let i = (b * P.L + ${t}) * P.ED + dc;
      ${drawLines(Ri, shuffle, `(b * P.L + ${t}) * P.S`)}
      let dt = softplus_(dr + bias);
      let dtx = dt * ld_x(i);
      let row = (b * P.L + ${t}) * P.S + P.R${plus(n0)};
      var Bv: array<f32, ${K}>;
      ${loadBC(N, Nb, "row", false, shuffle, lanes)}
      ${unroll(K, (n) => `${h}[${n}] = exp(dt * A[${n}]) * ${h}[${n}] + dtx * Bv[${n}];`)}
      }`;
  /** WGSL of the recomputed state n (of the block) at chunk step `s`. */
  const H = (s: string, n: number) =>
    shared ? `hbufW[(${s} * ${K}u + ${n}u) * ${WG}u + lid]` : `hbuf[${s} * ${K}u + ${n}u]`;
  // dB, dC through workgroup memory: every S steps (and at the chunk's start), each lane sums WG channels of
  // its columns for each gathered step, one partial row per tile.
  const workgroupReduce = `
      if (slot == ${S - 1}u || s == 0u) {
        workgroupBarrier();
        for (var q = 0u; q <= slot; q++) {
          let tq = start + len - 1u - (kq - slot + q);
          let base = q * ${WG * CW}u;
          ${
    unroll(Math.ceil(CW / WG), (j) =>
      `{ let col = lid + ${j * WG}u; if (col < ${CW}u) { let acc = ${
        Array.from({ length: WG }, (_, c) =>
          `red[base + ${c * CW}u + col]`).join(" + ")
      }; st_gred(((b * P.segLen + tq - P.segStart) * P.slots + tile) * ${PW}u + ${
        blockColumn(N, Nb, "col", n0, dtHere)
      }${plus(n0)}, acc); } }`)
  }
        }
        workgroupBarrier();
      }
`;
  return defineKernel({
    name: `fused_scan_bwd_N${N}${blockName(N, Nb, n0)}_Lc${Lc}${Ls < Lc ? `_Ls${Ls}` : ""}_WG${WG}_${
      sg ? "sg" : `S${S}`
    }${shared ? "_wgmem" : ""}${shuffle ? "_shuf" : ""}${lanes > 1 ? `_lanes${lanes}` : ""}${
      Ri ? `_dt${Ri}` : ""
    }`,
    subgroups: sg || shuffle,
    buffers: [
      ...scanInputBuffers("read"),
      { name: "g", type: "f32", access: "read" },
      { name: "gx", type: "f32", access: "read_write" },
      // ddraw: an output, or with dt_proj inside only the earlier state blocks' shares for the last one
      { name: "gdraw", type: "f32", access: "read_write" },
      { name: "gz", type: "f32", access: "read_write" },
      // [dB/dC partials (B, L, slots, PW) | gpar (B, ED, GP)]: with `ph`, this keeps the kernel at 10
      // storage buffers, what browsers allow.
      { name: "gred", type: "f32", access: "read_write" },
    ],
    uniforms: [
      ...UNIFORMS,
      ["gparOff", "u32"],
      ["slots", "u32"],
      ["slotsPerTile", "u32"],
      ["segStart", "u32"], // first step of the time segment whose partial rows this dispatch writes
      ["segLen", "u32"],
      ["gzS", "u32"], // row length of gz: ED, or z's when gz is a window of the whole gradient of a wide z
      ["gz0", "u32"], // gz's first column in its rows
    ],
    workgroupSize: WG,
    decls: COMMON + `
${sg ? "" : `var<workgroup> red: array<f32, ${S * WG * CW}>; // [step slot][channel][B | C | dt terms]`}
${shared ? `var<workgroup> hbufW: array<f32, ${WG * Ls * K}>; // [step][state][lane]` : ""}`,
    body: `
  // workgroup -> (b, tile of WG channels); invocation -> channel d; states n0..n0+Nb. Chunks [t0, t1)
  // walked in reverse.
  let b = group / P.tiles;
  let tile = group % P.tiles;
  ${channelLines("tile", WG, lanes, Nb)}
  let valid = d < P.ED;
  let dc = min(d, P.ED - 1u); // out-of-range lanes compute on a valid channel and write nothing
  var A: array<f32, ${K}>;
  var lam: array<f32, ${K}>; // carry: a(t+1) * lam(t+1)
  var gA: array<f32, ${K}>;
  var h0: array<f32, ${K}>;
  ${shared ? "" : `var hbuf: array<f32, ${Ls * K}>;`}
  // gpar row of (b, d): [dbias, dD, dA (N), lam carry (N), dW (Ri)], accumulated over dispatches.
  let gp = P.gparOff + (b * P.ED + dc) * ${GP}u;
  let more = P.t1 != P.chunks; // dispatches after the first continue from gpar
  // dbias and dD sum over the state blocks too: blocks after the first always continue
  var gbias = ${first ? "select(0.0, ld_gred(gp), more)" : "ld_gred(gp)"};
  var gD = ${first ? "select(0.0, ld_gred(gp + 1u), more)" : "ld_gred(gp + 1u)"};
  ${unroll(K, (n) => `A[${n}] = -exp(ld_ph(P.ED + dc * ${N}u + ${n0}u + ${st(n)}));`)}
  ${unroll(K, (n) => `gA[${n}] = select(0.0, ld_gred(gp + ${2 + n0}u + ${st(n)}), more);`)}
  ${unroll(K, (n) => `lam[${n}] = select(0.0, ld_gred(gp + ${2 + N + n0}u + ${st(n)}), more);`)}
  let bias = ld_ph(dc);
  let Dd = ld_ph(P.ED + P.ED * ${N}u + dc);
  ${loadWd(N, Ri)}
  ${
      dtHere
        ? `var gW: array<f32, ${Ri}>;
  ${unroll(Ri, (r) => `gW[${r}] = select(0.0, ld_gred(gp + ${2 + 2 * N + r}u), more);`)}`
        : ""
    }
  let hsBase = (b * P.ED + dc) * P.chunks;
  for (var kk = P.t1; kk > P.t0; kk--) {
    let k = kk - 1u;
    let cstart = k * ${Lc}u;
    let clen = min(${Lc}u, P.L - cstart);
    var hb: array<f32, ${K}>; // the saved state before this chunk
    let hsAt = (hsBase + k - 1u) * ${N}u${plus(n0)};
    ${unroll(K, (n) => `hb[${n}] = select(0.0, ld_ph(P.hsOff + hsAt + ${st(n)}), k > 0u);`)}
    let nsub = (clen + ${Ls - 1}u) / ${Ls}u;
    ${
      SUB > 1
        ? `// 0. two-level recompute: the states at the sub-chunk boundaries, so that only Ls x Nb floats of h
    // are held at once while chunks (and the saved states) are Lc long.
    var hsub: array<f32, ${(SUB - 1) * K}>;
    var hw = hb;
    for (var s = 0u; s < (nsub - 1u) * ${Ls}u; s++) {
      ${stepLines("hw", "cstart + s")}
      if ((s + 1u) % ${Ls}u == 0u) {
        // constant indices only (selects): a dynamically indexed private array is twice as slow on lavapipe
        let jw = (s + 1u) / ${Ls}u - 1u;
        ${
          unroll(SUB - 1, (jc) =>
            unroll(K, (n) => `hsub[${jc * K + n}] = select(hsub[${jc * K + n}], hw[${n}], jw == ${jc}u);`))
        }
      }
    }`
        : ""
    }
    for (var jj = nsub; jj > 0u; jj--) {
    let j = jj - 1u;
    let start = cstart + j * ${Ls}u;
    let len = min(${Ls}u, clen - j * ${Ls}u);
    ${
      SUB > 1
        ? unroll(K, (n) =>
          `h0[${n}] = hb[${n}]; ` +
          Array.from({ length: SUB - 1 }, (_, jc) =>
            `h0[${n}] = select(h0[${n}], hsub[${jc * K + n}], j == ${jc + 1}u);`)
            .join(" "))
        : unroll(K, (n) =>
          `h0[${n}] = hb[${n}];`)
    }
    // 1. recompute h over the (sub-)chunk from the state before it.
    var hc = h0;
    for (var s = 0u; s < len; s++) {
      ${stepLines("hc", "start + s")}
      ${unroll(K, (n) => `${H("s", n)} = hc[${n}];`)}
    }
    // 2. reverse scan inside the chunk. hcur = h(t) is carried down from the step above (the last one is
    // the recompute's final state), so each step reads one stored state, h(t-1).
    var hcur = hc;
    for (var ss = len; ss > 0u; ss--) {
      let s = ss - 1u;
      let t = start + s;
      ${
      sg ? "" : `let kq = len - ss; // steps of this chunk done before this one
      let slot = kq % ${S}u;`
    }
      let i = (b * P.L + t) * P.ED + dc;
      ${drawLines(Ri, shuffle, "(b * P.L + t) * P.S")}
      let u = dr + bias;
      let dt = softplus_(u);
      let xv = ld_x(i);
      let row = (b * P.L + t) * P.S + P.R${plus(n0)};
      var Bv: array<f32, ${K}>;
      var Cv: array<f32, ${K}>;
      ${loadBC(N, Nb, "row", true, shuffle, lanes)}
      var gy = ld_g(i);
      if (P.gated != 0u) {
        // this block's share of y (the gate's gradient is linear in y: blocks add their shares)
        var yv = ${firstOnce("Dd * xv")};
        ${unroll(K, (n) => `yv += Cv[${n}] * hcur[${n}];`)}
        ${sumLanes("yv", lanes)}
        let zv = ld_z((b * P.L + t) * P.zS + P.z0 + dc);
        let sg = sigmoid_(zv);
        // gz is its own (B, L, ED) or a window of the whole gradient of a wider z (P.gzS, P.gz0)
        let iz = (b * P.L + t) * P.gzS + P.gz0 + dc;
        if (${once("valid")}) { ${acc("gz", "gy * yv * sg * (1.0 + zv * (1.0 - sg))", "iz")} }
        gy = gy * zv * sg;
      }
      gD += ${firstOnly("gy * xv")};
      var gx = ${firstOnce("gy * Dd")};
      var gdt = 0.0;
      let sp = select(0u, s - 1u, s > 0u);
      var hp: array<f32, ${K}>;
      ${unroll(K, (n) => `hp[${n}] = select(h0[${n}], ${H("sp", n)}, s > 0u);`)}
      ${
      sg
        ? `// this subgroup's partial row of step t: (B, segLen, slots, PW), the block's columns
      let part = ((b * P.segLen + t - P.segStart) * P.slots + tile * P.slotsPerTile + lid / sgSize) * ${PW}u${
          plus(n0)
        };`
        : `let lane = (slot * ${WG}u + lid) * ${CW}u; // this step's terms in workgroup memory`
    }
      ${sg ? `var terms: array<f32, ${TW}>; // [dB terms | dC terms | dt terms] of this lane's states` : ""}
      ${
      unroll(K, (n) =>
        `{ let a = exp(dt * A[${n}]); ` +
        `let l = gy * Cv[${n}] + lam[${n}]; let ga = l * hp[${n}]; ` +
        `gx += l * dt * Bv[${n}]; gdt += l * Bv[${n}] * xv + ga * a * A[${n}]; gA[${n}] += ga * a * dt; ` +
        (sg
          ? `terms[${n}] = l * dt * xv; terms[${K + n}] = gy * hcur[${n}]; `
          : `red[lane + ${n}u] = select(0.0, l * dt * xv, valid); ` +
            `red[lane + ${Nb + n}u] = select(0.0, gy * hcur[${n}], valid); `) +
        `lam[${n}] = a * l; }`)
    }
      ${sumLanes("gx", lanes)}
      ${sumLanes("gdt", lanes)}
      hcur = hp;
      let gu = gdt * sigmoid_(u);
      gbias += gu;
      ${
      dtHere
        ? `// ddraw summed over the state blocks (earlier blocks' shares are in gdraw): dW and the dt terms
      let gtot = ${first ? "gu" : "ld_gdraw(i) + gu"};
      ${unroll(Ri, (r) => `gW[${r}] += gtot * dtv[${r}];`)}
      ${
          unroll(Ri, (r) =>
            sg
              ? `terms[${2 * K + r}] = gtot * Wd[${r}];`
              : `red[lane + ${2 * Nb + r}u] = select(0.0, gtot * Wd[${r}], valid);`)
        }`
        : ""
    }
      if (${once("valid")}) { ${acc("gx", "gx")} ${dtHere ? "" : acc("gdraw", "gu")} }
      ${sg ? subgroupSums(N, Nb, shuffle || lanes > 1 ? shuffleSize() : null, n0, dtHere, lanes) : ""}
${sg ? "" : workgroupReduce}
    }
    }
  }
  if (${once("valid")}) {
    st_gred(gp, gbias);
    st_gred(gp + 1u, gD);
    ${dtHere ? unroll(Ri, (r) => `st_gred(gp + ${2 + 2 * N + r}u, gW[${r}]);`) : ""}
  }
  if (valid) {
    ${
      unroll(K, (n) =>
        `st_gred(gp + ${2 + n0}u + ${st(n)}, gA[${n}]); st_gred(gp + ${2 + N + n0}u + ${st(n)}, lam[${n}]);`)
    }
  }`,
  });
}
