/**
 * A cache of values by a short key of numbers (a problem's sizes and flags: matmul's plans), found by a hash of
 * the key, so a lookup builds no string (on a GPU the host's time per op bounds small work). Keys whose hashes
 * collide share a bucket and are told apart by every number. Past `max` entries it starts over rather than
 * grow (a workload of ever new shapes). Not re-exported.
 * @module
 */

import { mix } from "./kernel.ts";

/** The default hash of a key: its numbers mixed in order. */
export function hashKey(key: readonly number[]): number {
  let h = 0x2f1a3b;
  for (let i = 0; i < key.length; i++) h = mix(h, key[i]);
  return h;
}

/** Values by keys of numbers (see the module). */
export class KeyedCache<V> {
  #buckets = new Map<number, { key: number[]; value: V }[]>();
  #size = 0;

  /** At most `max` entries; `hash` maps a key to a bucket (tests make them collide). */
  constructor(readonly max: number, readonly hash: (key: readonly number[]) => number = hashKey) {}

  /** Entries held. */
  get size(): number {
    return this.#size;
  }

  /** The value of `key`, made by `make(arg)` on a miss. `key` is copied when stored, so a caller may pass the
   * same scratch array every time, and `make` a function of its own with `arg` (no allocation on a hit). */
  get<A>(key: readonly number[], make: (arg: A) => V, arg: A): V {
    const h = this.hash(key);
    const bucket = this.#buckets.get(h);
    if (bucket) {
      for (const e of bucket) if (sameKey(e.key, key)) return e.value;
    }
    const value = make(arg);
    if (this.#size >= this.max) this.clear();
    const entry = { key: key.slice(), value };
    const list = this.#buckets.get(h); // after a clear, the bucket found above is gone
    if (list) list.push(entry);
    else this.#buckets.set(h, [entry]);
    this.#size++;
    return value;
  }

  /** Drops every entry. */
  clear(): void {
    this.#buckets.clear();
    this.#size = 0;
  }
}

function sameKey(a: readonly number[], b: readonly number[]): boolean {
  if (a.length !== b.length) return false;
  for (let i = 0; i < a.length; i++) if (a[i] !== b[i]) return false;
  return true;
}
