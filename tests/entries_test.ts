// The package's entries: `@mambats/mamba` (mod.ts) and `@mambats/mamba/advanced` (advanced.ts) give every
// name one home, so that a symbol's JSDoc page and README's mention of its entry agree.
import assert from "node:assert/strict";
import * as Main from "../mod.ts";
import * as Advanced from "../advanced.ts";

Deno.test("entries: no value is exported by both mod.ts and advanced.ts", () => {
  const both = Object.keys(Advanced).filter((k) => k in Main);
  assert.deepEqual(both, [], `exported by both entries: ${both.join(", ")}`);
});

Deno.test("entries: deno.json maps each entry to its module", async () => {
  const config = JSON.parse(await Deno.readTextFile(new URL("../deno.json", import.meta.url)));
  assert.equal(config.exports["."], "./mod.ts");
  assert.equal(config.exports["./advanced"], "./advanced.ts");
});
