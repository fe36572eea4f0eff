/**
 * Checks of option objects: a misspelt key is an error that names it, never a default taken silently (PyTorch
 * raises on an unknown keyword argument alike).
 * @module
 */

/** Throws unless `options` is an object (not an array) whose keys are all in `keys`; `what` names the call. */
export function checkOptionKeys(options: unknown, keys: readonly string[], what: string): void {
  if (typeof options !== "object" || options === null || Array.isArray(options)) {
    throw new Error(`${what}: options must be an object, got ${showValue(options)}`);
  }
  for (const k of Object.keys(options)) {
    if (!keys.includes(k)) throw new Error(`${what}: unknown option '${k}' (options are ${keys.join(", ")})`);
  }
}

/**
 * A value for an error message: numbers as JavaScript writes them (NaN, Infinity, 1e+21), strings quoted
 * ("4"), arrays by their elements ([1,null], the first 10), typed arrays by their type and elements (an
 * Int32Array [1,2]), anything else by its type (a function, an object, a Set), never as [object Object].
 */
export function showValue(v: unknown): string {
  if (typeof v === "number") return String(v);
  if (typeof v === "string") return JSON.stringify(v);
  if (typeof v === "bigint") return `${v}n`;
  if (typeof v === "function") return "a function";
  if (typeof v !== "object" || v === null) return String(v); // undefined, null, a boolean, a symbol
  const items = (a: ArrayLike<unknown>) => {
    const shown = Array.from({ length: Math.min(a.length, 10) }, (_, i) => showValue(a[i]));
    return `[${shown.join(",")}${a.length > 10 ? `,... (${a.length} in all)` : ""}]`;
  };
  if (Array.isArray(v)) return items(v);
  const name = v.constructor?.name;
  const type = !name || name === "Object" ? "object" : name;
  const typed = ArrayBuffer.isView(v) && !(v instanceof DataView);
  return `${/^[AEIO]/i.test(type) ? "an" : "a"} ${type}${
    typed ? ` ${items(v as unknown as ArrayLike<unknown>)}` : ""
  }`;
}
