/**
 * Checks of option objects: a misspelt key is an error that names it, never a default taken silently (PyTorch
 * raises on an unknown keyword argument alike).
 * @module
 */

/** Throws unless `options` is an object (not an array) whose keys are all in `keys`; `what` names the call. */
export function checkOptionKeys(options: unknown, keys: readonly string[], what: string): void {
  if (typeof options !== "object" || options === null || Array.isArray(options)) {
    throw new Error(`${what}: options must be an object, got ${JSON.stringify(options)}`);
  }
  for (const k of Object.keys(options)) {
    if (!keys.includes(k)) throw new Error(`${what}: unknown option '${k}' (options are ${keys.join(", ")})`);
  }
}
