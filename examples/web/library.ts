/**
 * What the browser bundle (`out/web/mamba.js`) exports: both entries of the library, `@mambats/mamba` and
 * `@mambats/mamba/advanced`, so that a page without a bundler reaches the extension points too.
 * @module
 */

export * from "../../mod.ts";
export * from "../../advanced.ts";
