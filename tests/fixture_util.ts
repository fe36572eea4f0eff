/**
 * Test helpers for the PyTorch golden fixtures in tests/fixtures (copied from the shared set).
 * @module
 */

import { readSafetensorsFile } from "../core/safetensors_fs.ts";
import { init } from "../core/device.ts";
import { tensor } from "../core/creation.ts";
import type { Tensor } from "../core/tensor.ts";
import type { DecodedTensor } from "../core/safetensors.ts";

/** Absolute path of a fixture file. */
export function fixturePath(name: string): string {
  return new URL(`./fixtures/${name}`, import.meta.url).pathname;
}

/** Loads a fixture's tensors by name, initialising the device. */
export async function loadFixture(name: string): Promise<Map<string, DecodedTensor>> {
  await init();
  return (await readSafetensorsFile(fixturePath(name))).tensors;
}

/** Uploads one fixture tensor. */
export function toTensor(f: Map<string, DecodedTensor>, key: string, requiresGrad = false): Tensor {
  const e = f.get(key);
  if (!e) throw new Error(`fixture has no tensor '${key}'`);
  return tensor(e.data, e.shape, { requiresGrad });
}

/** Max |a - b| over two arrays of equal length (throws when lengths differ). */
export function maxAbsDiff(a: ArrayLike<number>, b: ArrayLike<number>): number {
  if (a.length !== b.length) throw new Error(`length ${a.length} vs ${b.length}`);
  let m = 0;
  for (let i = 0; i < a.length; i++) {
    const d = Math.abs(a[i] - b[i]);
    if (!(d <= m)) m = Number.isNaN(d) ? Infinity : d;
  }
  return m;
}

/** Max |x| of an array. */
export function maxAbs(a: ArrayLike<number>): number {
  let m = 0;
  for (let i = 0; i < a.length; i++) m = Math.max(m, Math.abs(a[i]));
  return m;
}
