// What README.md tells a user to type: the flag lists it gives for the example scripts are the flags the
// scripts take (a flag the README leaves out is one a reader never learns of; one it names that the script
// refuses fails at the first try).
import assert from "node:assert/strict";

const ROOT = new URL("..", import.meta.url);
const README = await Deno.readTextFile(new URL("README.md", ROOT));

/** A script's `--help` text (exit status 0 asserted). */
async function help(script: string): Promise<string> {
  const out = await new Deno.Command(Deno.execPath(), {
    args: ["run", "--allow-read", "--allow-write", "--allow-env", "--allow-net", script, "--help"],
    cwd: ROOT,
    stdin: "null",
    env: { NO_COLOR: "1" },
  }).output();
  const text = new TextDecoder().decode(out.stdout);
  assert.equal(out.code, 0, `${script} --help: ${new TextDecoder().decode(out.stderr)}`);
  return text;
}

/** The long flags a usage text lists, one per option line (`  --steps <n>  ...`, `  -h, --help  ...`). */
const usageFlags = (usage: string) =>
  new Set([...usage.matchAll(/^ {2}(?:-[a-z], )?(--[a-z][a-z-]*)/gm)].map((m) => m[1]));

/** The flags in a README code span that follows `after`. */
function readmeFlags(after: string): Set<string> {
  const at = README.indexOf(after);
  assert.ok(at >= 0, `README has no '${after}'`);
  const span = README.slice(at + after.length).match(/`([^`]*)`/)![1];
  return new Set(span.match(/--[a-z][a-z-]*/g));
}

Deno.test("README's flag list of deno task train is the flags examples/train.ts takes", async () => {
  const taken = usageFlags(await help("examples/train.ts"));
  assert.ok(taken.has("--steps") && taken.has("--help"), [...taken].join(" "));
  assert.deepEqual([...readmeFlags("Flags:\n")].sort(), [...taken].sort());
});

Deno.test("README's flag list of deno task generate is the flags examples/generate.ts takes", async () => {
  const taken = usageFlags(await help("examples/generate.ts"));
  assert.ok(taken.has("--model") && taken.has("--read-every"), [...taken].join(" "));
  const listed = new Set([
    "--model",
    "--help",
    ...readmeFlags("`--model` takes a hub id, a local folder or a URL; also\n"),
  ]);
  assert.deepEqual([...listed].sort(), [...taken].sort());
});
