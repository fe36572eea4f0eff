/**
 * Both entries of the library as one module, for tests that reach every op by name (`M[op]`), the
 * extension points of `advanced.ts` included.
 * @module
 */

export * from "../mod.ts";
export * from "../advanced.ts";
