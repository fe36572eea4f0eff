// What README.md tells a user to type: the flag lists it gives for the example scripts are the flags the
// scripts take (a flag the README leaves out is one a reader never learns of; one it names that the script
// refuses fails at the first try), every script they name answers --help with its usage instead of starting
// its work, the charts in docs/ are what bench/charts.ts draws from the reports in bench/results/, and the
// demo (the first command) says a missing adapter in one line.
import assert from "node:assert/strict";
import { chartSuffix, renderSvg, reportCharts } from "../bench/charts.ts";

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

/** The scripts README and docs/ tell a user to run with `deno run -A <script>`: every bench/*.ts whose header
 * says so, and the examples. */
async function runnableScripts(): Promise<string[]> {
  const bench: string[] = [];
  for await (const e of Deno.readDir(new URL("bench", ROOT))) {
    if (!e.isFile || !e.name.endsWith(".ts")) continue;
    const text = await Deno.readTextFile(new URL(`bench/${e.name}`, ROOT));
    if (text.includes(`deno run -A bench/${e.name}`)) bench.push(`bench/${e.name}`);
  }
  const examples = [
    "demo",
    "generate",
    "train",
    "loss_vs_pytorch",
    "web/build",
    "web/serve",
    "web/screenshot",
  ];
  return [...bench.sort(), ...examples.map((e) => `examples/${e}.ts`)];
}

Deno.test("every script answers --help with its usage and refuses an unknown flag, before any work", async () => {
  const scripts = await runnableScripts();
  assert.ok(
    scripts.includes("bench/scan_report.ts") && scripts.includes("bench/loop_limit.ts"),
    String(scripts),
  );
  for (const script of scripts) {
    const run = (flag: string) =>
      new Deno.Command(Deno.execPath(), {
        args: ["run", "-A", script, flag],
        cwd: ROOT,
        stdin: "null",
        env: { NO_COLOR: "1" },
      }).output();
    const h = await run("--help");
    const out = new TextDecoder().decode(h.stdout);
    assert.equal(h.code, 0, `${script} --help: ${new TextDecoder().decode(h.stderr)}`);
    assert.match(out, /^Usage: /, `${script} --help printed no usage (did it run?):\n${out.slice(0, 300)}`);
    const bad = await run("--no-such-flag");
    assert.equal(bad.code, 2, `${script} --no-such-flag: exit ${bad.code}`);
    assert.match(new TextDecoder().decode(bad.stderr), /Unknown option '--no-such-flag'/, script);
  }
});

Deno.test("-h is --help in every example, and loss_vs_pytorch draws a run's loss.json as its training_log.json", async () => {
  const run = (...args: string[]) =>
    new Deno.Command(Deno.execPath(), {
      args: ["run", "-A", ...args],
      cwd: ROOT,
      stdin: "null",
      env: { NO_COLOR: "1" },
    }).output();
  for (const script of ["demo", "generate", "eval", "train", "loss_vs_pytorch"]) {
    const h = await run(`examples/${script}.ts`, "-h");
    assert.equal(h.code, 0, `${script} -h: ${new TextDecoder().decode(h.stderr)}`);
    assert.match(new TextDecoder().decode(h.stdout), /^Usage: /, script);
  }
  // the log of the README's run as a loss.json (a checkpoint folder's): the committed chart, drawn again
  const chart = await Deno.readTextFile(new URL("docs/loss_vs_pytorch.svg", ROOT));
  const dir = await Deno.makeTempDir();
  try {
    const { log } = JSON.parse(await Deno.readTextFile(new URL("docs/char_training_log.json", ROOT)));
    await Deno.writeTextFile(`${dir}/loss.json`, JSON.stringify(log));
    const drawn = await run("examples/loss_vs_pytorch.ts", `${dir}/loss.json`);
    assert.equal(drawn.code, 0, new TextDecoder().decode(drawn.stderr));
    assert.equal(await Deno.readTextFile(new URL("docs/loss_vs_pytorch.svg", ROOT)), chart);
  } finally {
    await Deno.writeTextFile(new URL("docs/loss_vs_pytorch.svg", ROOT), chart);
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("the committed charts are what bench/charts.ts draws from the committed reports", async () => {
  for (const report of ["bench/results/scan.json", "bench/results/h200/scan.json"]) {
    const path = new URL(report, ROOT).pathname;
    const charts = reportCharts(JSON.parse(await Deno.readTextFile(path)));
    assert.ok(charts.length >= 4, report);
    for (const [name, spec] of charts) {
      const file = `docs/${name.replace(".svg", `${chartSuffix(path)}.svg`)}`;
      const drawn = (await renderSvg(spec)) + "\n";
      assert.ok(
        drawn === (await Deno.readTextFile(new URL(file, ROOT))),
        `${file} is not what bench/charts.ts draws from ${report} (deno run -A bench/charts.ts ${report})`,
      );
    }
  }
});

Deno.test({
  name: "deno task demo, README's first command, says a missing WebGPU adapter in one error line",
  // Linux's wgpu has no DX12 backend: asking for it finds no adapter, as a machine without a driver would.
  ignore: Deno.build.os !== "linux",
  fn: async () => {
    const out = await new Deno.Command(Deno.execPath(), {
      args: ["run", "-A", "examples/demo.ts"],
      cwd: ROOT,
      stdin: "null",
      env: { NO_COLOR: "1", DENO_WEBGPU_BACKEND: "dx12" },
    }).output();
    const err = new TextDecoder().decode(out.stderr);
    assert.equal(out.code, 1, err);
    assert.match(err, /^error: No WebGPU adapter found .*mesa-vulkan-drivers/);
    assert.doesNotMatch(err, /Uncaught|^ +at /m, "no stack trace");
  },
});
