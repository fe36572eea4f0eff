/**
 * Seeded random numbers, made on the host with a counter-based generator (Philox4x32-10) so that the
 * same seed gives bit-identical numbers on every adapter (GPU math functions differ between vendors).
 * @module
 */

/**
 * A stream of random 32-bit words: Philox4x32-10 keyed by a seed, counting up from 0. A second number picks
 * one of 2^53 independent streams of the same seed (the counter's upper 64 bits, as curand's subsequence), so
 * that (seed, step) pairs never share words, where a single seed made of both (seed * 1e6 + step) would.
 */
export class Philox {
  #k0: number;
  #k1: number;
  #s0: number;
  #s1: number;
  #counter = 0;
  #buf = new Uint32Array(4);
  #at = 4;

  /** Seeds the stream: `seed` any integer below 2^53 in magnitude, `stream` an integer in [0, 2^53) (0: the
   * seed's first stream); anything else is an error, not a truncation. */
  constructor(seed: number, stream = 0) {
    if (!Number.isSafeInteger(seed)) throw new Error(`seed must be an integer (|seed| < 2^53), got ${seed}`);
    if (!Number.isSafeInteger(stream) || stream < 0) {
      throw new Error(`stream must be an integer in [0, 2^53), got ${stream}`);
    }
    this.#k0 = seed >>> 0;
    this.#k1 = Math.floor(seed / 2 ** 32) >>> 0;
    this.#s0 = stream >>> 0;
    this.#s1 = Math.floor(stream / 2 ** 32) >>> 0;
  }

  /** The next random 32-bit unsigned word. */
  nextU32(): number {
    if (this.#at === 4) {
      this.#block(this.#counter++);
      this.#at = 0;
    }
    return this.#buf[this.#at++];
  }

  /**
   * An integer uniform in [0, n), for a positive integer n up to 2^53. Unbiased, as torch.randint: a draw past
   * the last whole multiple of n in its range (one word, or 53 bits of two past 2^32) is drawn again; the
   * remainder of one word alone made the low values of a large n up to twice as likely.
   */
  below(n: number): number {
    if (!Number.isSafeInteger(n) || n < 1) {
      throw new Error(`below: n must be an integer in [1, 2^53], got ${n}`);
    }
    const range = n <= 2 ** 32 ? 2 ** 32 : 2 ** 53;
    const limit = range - (range % n); // exact: both below 2^53
    for (;;) {
      const u = range === 2 ** 32 ? this.nextU32() : (this.nextU32() & 0x1fffff) * 2 ** 32 + this.nextU32();
      if (u < limit) return u % n;
    }
  }

  /** A uniform float in [0, 1) with 24 random bits (exact in f32). */
  nextFloat(): number {
    return (this.nextU32() >>> 8) / 16777216;
  }

  #block(ctr: number): void {
    let c0 = ctr >>> 0, c1 = Math.floor(ctr / 2 ** 32) >>> 0, c2 = this.#s0, c3 = this.#s1;
    let k0 = this.#k0, k1 = this.#k1;
    for (let r = 0; r < 10; r++) {
      const hi0 = mulhi(0xD2511F53, c0), lo0 = Math.imul(0xD2511F53, c0) >>> 0;
      const hi1 = mulhi(0xCD9E8D57, c2), lo1 = Math.imul(0xCD9E8D57, c2) >>> 0;
      // (c0, c1, c2, c3) <- (hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0), without allocating
      const n0 = (hi1 ^ c1 ^ k0) >>> 0;
      const n2 = (hi0 ^ c3 ^ k1) >>> 0;
      c0 = n0;
      c1 = lo1;
      c2 = n2;
      c3 = lo0;
      k0 = (k0 + 0x9E3779B9) >>> 0;
      k1 = (k1 + 0xBB67AE85) >>> 0;
    }
    this.#buf[0] = c0;
    this.#buf[1] = c1;
    this.#buf[2] = c2;
    this.#buf[3] = c3;
  }
}

function mulhi(a: number, b: number): number {
  // High 32 bits of a 32x32-bit product, from 16-bit halves (exact in doubles).
  const aH = a >>> 16, aL = a & 0xffff, bH = b >>> 16, bL = b & 0xffff;
  const mid = aH * bL + aL * bH + ((aL * bL) >>> 16);
  return (aH * bH + Math.floor(mid / 65536)) >>> 0;
}

/** Fills `out` with standard normal samples (Box-Muller on pairs of uniforms). */
export function fillNormal(rng: Philox, out: Float32Array, mean = 0, std = 1): Float32Array {
  for (let i = 0; i < out.length; i += 2) {
    const u1 = 1 - rng.nextFloat(); // (0, 1]: log never sees 0
    const u2 = rng.nextFloat();
    const r = Math.sqrt(-2 * Math.log(u1));
    out[i] = mean + std * r * Math.cos(2 * Math.PI * u2);
    if (i + 1 < out.length) out[i + 1] = mean + std * r * Math.sin(2 * Math.PI * u2);
  }
  return out;
}

/** The largest f32 below x. */
function f32Below(x: number): number {
  const f = new Float32Array([x]);
  if (f[0] < x) return f[0];
  const bits = new Int32Array(f.buffer);
  if (f[0] === 0) bits[0] = -2147483647; // 0x80000001: the negative subnormal nearest zero
  else bits[0] += f[0] > 0 ? -1 : 1;
  return f[0];
}

/** Fills `out` with uniform samples in [low, high), as f32: a sample that rounds up to `high` in f32 (1 - 2^-24
 * of [1, 2) does, or most of a range a few f32 steps wide) takes the largest f32 below it instead. */
export function fillUniform(rng: Philox, out: Float32Array, low = 0, high = 1): Float32Array {
  const top = Math.max(f32Below(high), Math.fround(low));
  for (let i = 0; i < out.length; i++) {
    out[i] = Math.min(Math.fround(low + (high - low) * rng.nextFloat()), top);
  }
  return out;
}

let globalStream = new Philox(0);

/** Seeds the global generator used when a creation function gets no `seed` (like torch.manual_seed). */
export function manualSeed(seed: number): void {
  globalStream = new Philox(seed);
}

/** The stream for a call: its own seed, or the global generator. */
export function streamFor(seed?: number): Philox {
  return seed === undefined ? globalStream : new Philox(seed);
}
