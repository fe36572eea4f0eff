/**
 * The fused backward's sums of dB/dC (and dt) terms over the channels of a subgroup, without workgroup memory
 * or barriers: a butterfly of subgroupShuffleXor where the subgroup size is fixed, else subgroupAdd.
 * @module
 */

import { blockColumn, unroll } from "./fused_wgsl.ts";

/**
 * The rounds of the butterfly that sums C columns over SG lanes (a power of two), the columns padded to W * SG
 * (W = ceil(C / SG)). In the round with mask m, lanes whose bit m is clear keep columns [0, h) and the others
 * [h, 2h), each adding its partner's (lane ^ m) copy of them; after the last round lane j holds the sums of
 * columns j*W .. j*W + W - 1 in its first W slots.
 */
export function butterflyRounds(C: number, SG: number): { W: number; rounds: { m: number; h: number }[] } {
  const W = Math.ceil(C / SG);
  const rounds: { m: number; h: number }[] = [];
  for (let m = SG / 2, K = W * SG; m >= 1; m /= 2, K /= 2) rounds.push({ m, h: K / 2 });
  return { W, rounds };
}

/**
 * WGSL summing `terms` over the subgroup's channels and storing the sums in the partial row at `part` (the
 * block's columns). A lane's terms are [dB | dC] of its states (K = Nb / lanes of them: all the block's, or with
 * `lanes` > 1 lane q's share, states q*K..), then the dt terms (`dt` of them, alike in a channel's lanes).
 * With a fixed subgroup size SG, a butterfly over the masks that change the channel (lanes .. SG/2): each round
 * halves the columns a lane keeps and adds its partner's half, so lane (g, q) of channel group g ends with the
 * sums of columns g*W..g*W+W-1 of its set (W = ceil(C / G), G = SG / lanes channels, the terms padded with
 * zeros to W G) and stores them: W (G - 1) shuffles (C - W where G divides C) and W stores per lane instead of
 * C subgroupAdds and C stores from one lane (the backward 1.4x faster on lavapipe,
 * where each of those is a loop over the lanes). Only lane q = 0 stores dt columns. Without SG (the size
 * varies, or the variant neither shuffles nor splits lanes, so whole subgroups are not guaranteed; lanes 1
 * only): subgroupAdd, and lane 0 stores.
 */
export function subgroupSums(N: number, Nb: number, SG: number | null, n0 = 0, dt = 0, lanes = 1): string {
  const K = Nb / lanes;
  const C = 2 * K + dt;
  if (!SG) {
    return [
      unroll(C, (c) => `let s${c} = subgroupAdd(select(0.0, terms[${c}], valid));`),
      `if (sgLane == 0u) {`,
      unroll(C, (c) => `st_gred(part + ${blockColumn(N, Nb, c, n0, dt)}, s${c});`),
      `}`,
    ].join("\n      ");
  }
  const G = SG / lanes; // channels per subgroup
  const { W, rounds } = butterflyRounds(C, G);
  const lines = [
    `var v: array<f32, ${W * G}>;`,
    unroll(C, (c) => `v[${c}] = select(0.0, terms[${c}], valid);`),
  ];
  for (const { m, h } of rounds) {
    const mask = m * lanes;
    lines.push(
      `{ let up = (sgLane & ${mask}u) != 0u;`,
      unroll(
        h,
        (k) =>
          `v[${k}] = select(v[${k}], v[${k + h}], up) + subgroupShuffleXor(select(v[${
            k + h
          }], v[${k}], up), ${mask}u);`,
      ),
      `}`,
    );
  }
  if (lanes === 1) {
    const store = (k: number) =>
      `st_gred(part + ${blockColumn(N, Nb, `sgLane * ${W}u + ${k}u`, n0, dt)}, v[${k}]);`;
    lines.push(
      W * SG === C
        ? unroll(W, store)
        : unroll(W, (k) => `if (sgLane * ${W}u + ${k}u < ${C}u) { ${store(k)} }`),
    );
  } else {
    // column c of lane q's set -> column of the block: B of state nq + c, C of state nq + c - K, dt column c - 2K
    const col = `select(select(c - ${2 * K}u + ${2 * Nb}u, c - ${K}u + ${Nb}u + nq, c < ${
      2 * K
    }u), nq + c, c < ${K}u)`;
    lines.push(unroll(W, (k) =>
      `{ let c = (sgLane / ${lanes}u) * ${W}u + ${k}u; let col = ${col}; ` +
      `if (c < ${C}u && (c < ${2 * K}u || q == 0u)) { st_gred(part + ${
        blockColumn(N, Nb, "col", n0, dt)
      }, v[${k}]); } }`));
  }
  return lines.join("\n      ");
}
