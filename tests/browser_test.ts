/**
 * The library and the demo page in a real headless browser: Debian's Chromium with WebGPU on SwiftShader (a
 * CPU adapter), driven by playwright-core. The bundle (`out/web/mamba.js`, built here as by
 * `deno task build:web`) reproduces the PyTorch fixtures with the tolerances of the Deno tests, loads models
 * from URLs and blobs, saves them as bytes, and trains; the page's generate and train flows work end to end
 * (screenshots in out/browser-test/).
 *
 * Skipped, with a message, when Chromium is missing (`apt-get install chromium`; .ci/run installs it).
 * Needs --allow-run (Chromium, and `deno bundle`) and --allow-sys (playwright reads the OS's name and home
 * folder), besides the usual read/write/env/net=127.0.0.1.
 */

import assert from "node:assert/strict";
import type { Browser, BrowserContext, Page } from "playwright-core";
import type * as Library from "../examples/web/library.ts";
import type * as Pretrained from "../mamba/pretrained.ts";
import { checkpointFiles, fromPretrained, fromPretrainedFiles } from "../mamba/pretrained.ts";
import { noGrad } from "../core/autograd.ts";
import { tidy } from "../core/tensor.ts";
import type * as Train from "../mamba/train.ts";
import { buildWeb, kb, stripKernelComments } from "../examples/web/build.ts";
import { CHROMIUM, haveChromium, launchChromium } from "../examples/web/chromium.ts";
import { webHandler } from "../examples/web/serve.ts";
import { MODEL_FILE_NAMES } from "../mamba/hub.ts";

/** What examples/web/app.ts exposes as `window.mambaDemo` (the fields read here). */
interface DemoState {
  model: string | null;
  loading: boolean;
  generating: boolean;
  error: string | null;
  lastGeneration: { tokens: number } | null;
}

/** The page's document, as far as the tests use it (tests are type-checked without the DOM library). */
type PageDocument = {
  getElementById(id: string): { click(): void; disabled: boolean; textContent: string | null };
};

/** What the page gets from `import("/mamba.js")`: both entries (with the browser loading and training exports). */
type Bundle = typeof Library & typeof Pretrained & typeof Train;

const ARTIFACTS = new URL("../out/browser-test/", import.meta.url).pathname;

const chromiumInstalled = await haveChromium();
if (!chromiumInstalled) {
  console.warn(
    `browser tests skipped: no Chromium at ${CHROMIUM} (apt-get install chromium, or set CHROMIUM_PATH)`,
  );
}

const sample = JSON.parse(
  await Deno.readTextFile(new URL("./fixtures/char-mamba/sample.json", import.meta.url)),
) as { key: string; prompt: string; continuation: string }[];

const TEST_PAGE =
  "<!doctype html><html><head><meta charset=utf-8><title>test</title><link rel=icon href='data:,'></head><body></body></html>";

Deno.test({
  name: "browser: the bundle and the demo page in headless Chromium (WebGPU on SwiftShader)",
  ignore: !chromiumInstalled,
  sanitizeOps: false,
  sanitizeResources: false,
  async fn(t) {
    for (const name of ["run", "sys"] as const) {
      if ((await Deno.permissions.query({ name })).state !== "granted") {
        throw new Error(`the browser tests need --allow-run and --allow-sys (deno task test passes them)`);
      }
    }
    const build = await buildWeb();
    console.log(
      `bundle ${kb(build.library.bytes)} (${kb(build.library.gzipBytes)} gzipped), built in ${
        build.ms.toFixed(0)
      } ms`,
    );
    await Deno.mkdir(ARTIFACTS, { recursive: true });
    const handler = webHandler({ fixtures: true });
    const HUB_COMMIT = "0123456789abcdef0123456789abcdef01234567";
    const hubRequests: string[] = []; // "<name>@<revision>/<file>", in order
    const server = Deno.serve(
      { hostname: "127.0.0.1", port: 0, onListen() {} },
      (req) => {
        const url = new URL(req.url);
        if (url.pathname === "/test.html") {
          return new Response(TEST_PAGE, { headers: { "content-type": "text/html" } });
        }
        // A stand-in for the hub: /hub/<org>/<name>/resolve/<revision>/<file>, fetched cross-origin (the page on
        // 127.0.0.1, the hub on localhost). As huggingface.co: CORS allowed, its own headers exposed; small
        // files answered in place with the commit that the revision resolves to (X-Repo-Commit), large ones
        // redirected to the CDN (here /hub-cdn/), a file the repository lacks 404 with X-Error-Code
        // EntryNotFound, an unknown repository 404 with RepoNotFound. `char-mamba-unexposed` exposes no
        // header (a mirror that forgot to), so the page cannot tell its 404s from a proxy's.
        const cors = (headers: Headers, expose: boolean) => {
          headers.set("access-control-allow-origin", "*");
          if (expose) {
            headers.set("access-control-expose-headers", "X-Repo-Commit, X-Error-Code, X-Error-Message");
          }
          return headers;
        };
        const cdn = /^\/hub-cdn\/([\w.]+)$/.exec(url.pathname);
        if (cdn) {
          return (async () => {
            const res = await handler(new Request(`${url.origin}/fixtures/char-mamba/${cdn[1]}`, req));
            return new Response(res.body, {
              status: res.status,
              headers: cors(new Headers(res.headers), false),
            });
          })();
        }
        const hub = /^\/hub\/test-org\/([\w-]+)\/resolve\/(\w+)\/([\w.]+)$/.exec(url.pathname);
        if (hub) {
          const [, name, revision, file] = hub;
          hubRequests.push(`${name}@${revision}/${file}`);
          const expose = name !== "char-mamba-unexposed";
          if (name !== "char-mamba" && expose) {
            const headers = { "x-error-code": "RepoNotFound", "x-error-message": "Repository not found" };
            return new Response("not found", { status: 404, headers: cors(new Headers(headers), true) });
          }
          const commit = { "x-repo-commit": HUB_COMMIT };
          if (file.endsWith(".safetensors")) {
            const headers = cors(
              new Headers({ ...commit, location: `${url.origin}/hub-cdn/${file}` }),
              expose,
            );
            return new Response(null, { status: 302, headers });
          }
          return (async () => {
            const fixture = `${url.origin}/fixtures/char-mamba/${file}`;
            const res = await handler(new Request(fixture, { headers: req.headers })); // its Host: the server checks it
            const headers = cors(new Headers(res.headers), expose);
            if (res.ok || res.status === 404) headers.set("x-repo-commit", HUB_COMMIT);
            if (res.status === 404) headers.set("x-error-code", "EntryNotFound");
            return new Response(res.body, { status: res.status, headers });
          })();
        }
        return handler(req);
      },
    );
    const base = `http://127.0.0.1:${server.addr.port}`;
    let browser: Browser | undefined;
    let context: BrowserContext | undefined;
    const pageErrors: string[] = [];
    /** A page at `path`, with `init` run in it before its own scripts. */
    const newPage = async (path: string, init?: string): Promise<Page> => {
      const page = await context!.newPage();
      if (init) await page.addInitScript(init);
      page.on("pageerror", (e) => pageErrors.push(`${path}: ${e.message}`));
      page.on("console", (m) => {
        // A 404 is how optional files (tokenizer_config.json) are found absent.
        if (m.type() === "error" && !/status of 404/.test(m.text())) pageErrors.push(`${path}: ${m.text()}`);
      });
      await page.goto(base + path);
      return page;
    };
    try {
      browser = await launchChromium();
      // One context: its pages share localStorage, where init() caches the kernel tuner's choices.
      context = await browser.newContext({ viewport: { width: 1000, height: 900 } });
      const lib = await newPage("/test.html");

      await t.step("the bundle loads without Deno and finds the SwiftShader adapter", async () => {
        const r = await lib.evaluate(async (url) => {
          const m = (await import(url)) as Bundle;
          const info = await m.init();
          const g = globalThis as { Deno?: unknown; mamba?: Bundle };
          g.mamba = m;
          const missing = [
            "fromPretrainedFiles",
            "checkpointFiles",
            "Trainer",
            "CharDataset",
            "DEFAULT_TRAIN",
          ]
            .filter((k) => !(k in m));
          const adapter = await (navigator as unknown as { gpu: GPU }).gpu.requestAdapter();
          return {
            deno: typeof g.Deno,
            fallback: info.isFallbackAdapter,
            vendor: info.vendor,
            subgroups: info.subgroups,
            offersSubgroups: adapter?.features.has("subgroups") ?? false,
            missing,
          };
        }, `${base}/mamba.js`);
        // Which fused-scan reduction the page's kernels use (subgroups need `enable subgroups;` in browsers).
        console.log(`browser subgroups: ${JSON.stringify(r.subgroups)}`);
        assert.equal(r.deno, "undefined");
        assert.equal(r.fallback, true, `expected SwiftShader, got ${JSON.stringify(r)}`);
        // The probe (Chromium's compiler checks uniformity strictly) must accept subgroups the adapter offers.
        assert.ok(
          !r.offersSubgroups || r.subgroups !== null,
          "the adapter offers subgroups; the probe refused them",
        );
        assert.deepEqual(r.missing, [], `mod.ts does not export ${r.missing.join(", ")}`);
      });

      await t.step(
        "a load that times out says so, with no CORS hint (that is for fetch's own TypeError)",
        async () => {
          await lib.route("**/hang/**", () => {}); // never answered
          const said = await lib.evaluate(
            (base) =>
              (globalThis as unknown as { mamba: Bundle }).mamba.fromPretrained(`${base}/hang/model`, {
                timeoutMs: 200,
              })
                .then(() => "loaded", (e) => (e as Error).message),
            base,
          );
          assert.match(said, /^cannot fetch .*\/hang\/model\/config\.json: no response within 200 ms$/);
        },
      );

      await t.step(
        "char-mamba from a URL: prompt logits within 1e-4 of PyTorch, 64 greedy tokens exact",
        async () => {
          const results = await lib.evaluate(async (base) => {
            const m = (globalThis as unknown as { mamba: Bundle }).mamba;
            const lm = await m.fromPretrained(`${base}/fixtures/char-mamba`);
            const bytes = new Uint8Array(
              await (await fetch(`${base}/fixtures/char-mamba/sample.safetensors`)).arrayBuffer(),
            );
            const s = m.parseSafetensors(bytes).tensors;
            const out = [];
            for (const key of ["sample", "sample2"]) {
              const prompt = [[...s.get(`${key}.prompt`)!.data]];
              const logits = m.tidy(() => m.noGrad(() => lm.forward(prompt)));
              const got = await logits.toArray();
              logits.dispose();
              const want = s.get(`${key}.prompt_logits`)!.data;
              let d = got.length === want.length ? 0 : Infinity;
              for (let i = 0; i < want.length; i++) {
                const x = Math.abs(got[i] - want[i]);
                if (!(x <= d)) d = Number.isNaN(x) ? Infinity : x; // a NaN fails (maxAbsDiff's rule)
              }
              const t0 = performance.now();
              const tokens = await lm.generate(prompt, 64, { readEvery: 64 });
              out.push({
                key,
                maxDiff: d,
                tokens: [...tokens[0]],
                want: [...s.get(`${key}.tokens`)!.data],
                ms: performance.now() - t0,
                text: lm.tokenizer!.decode(tokens[0]),
              });
            }
            lm.dispose();
            return out;
          }, base);
          for (const r of results) {
            assert.ok(r.maxDiff < 1e-4, `${r.key}: prompt logits max diff ${r.maxDiff}`);
            assert.deepEqual(r.tokens, r.want, `${r.key}: greedy tokens`);
            assert.equal(r.text, sample.find((x) => x.key === r.key)!.continuation);
            console.log(
              `  ${r.key}: max |logit diff| ${r.maxDiff.toExponential(2)}, 64 tokens in ${
                r.ms.toFixed(0)
              } ms`,
            );
          }
        },
      );

      await t.step(
        "models load from the hub, blobs and picked files (safetensors and pytorch_model.bin), and save to bytes that load back",
        async () => {
          const r = await lib.evaluate(async (base) => {
            const m = (globalThis as unknown as { mamba: Bundle }).mamba;
            const dir = `${base}/fixtures/char-mamba`;
            const blob = async (f: string) => await (await fetch(`${dir}/${f}`)).blob();
            const names = ["config.json", "model.safetensors", "tokenizer.json"];
            const blobs = await Promise.all(names.map(blob));
            // As a user's picks: File objects, in any order.
            const files = names.map((n, i) => new File([blobs[i]], n)).reverse();
            const prompt = [[...new TextEncoder().encode("It is a truth universally acknowledged")]];
            const logitsOf = async (lm: Library.MambaLM) => {
              const l = m.tidy(() => m.noGrad(() => lm.forward(prompt)));
              const a = await l.toArray();
              l.dispose();
              return a;
            };
            const diff = (a: ArrayLike<number>, b: ArrayLike<number>) => {
              let d = a.length === b.length ? 0 : Infinity;
              for (let i = 0; i < a.length; i++) {
                const x = Math.abs(a[i] - b[i]);
                if (!(x <= d)) d = Number.isNaN(x) ? Infinity : x; // a NaN fails (maxAbsDiff's rule)
              }
              return d;
            };
            const fromUrl = await m.fromPretrained(dir);
            const hub = base.replace("127.0.0.1", "localhost") + "/hub"; // another origin
            const fromHub = await m.fromPretrained("test-org/char-mamba", { endpoint: hub });
            const fromFiles = await m.fromPretrainedFiles(files, { name: "picked" });
            const ref = await logitsOf(fromUrl);
            const saved = await m.checkpointFiles(fromFiles); // with its own tokenizer
            const back = await m.fromPretrainedFiles(saved);
            const missing = await m.fromPretrainedFiles({ "model.safetensors": blobs[1] }).then(
              () => "loaded",
              (e: Error) => e.message,
            );
            const noRepo = await m.fromPretrained("test-org/no-such-model", { endpoint: hub }).then(
              () => "loaded",
              (e: Error) => `${e.name}: ${e.message}`,
            );
            // the hub's headers hidden from the page: its 404 for tokenizer_config.json is not taken for one
            const unexposed = await m.fromPretrained("test-org/char-mamba-unexposed", { endpoint: hub }).then(
              () => "loaded",
              (e: Error) => e.message,
            );
            // A PyTorch checkpoint picked in the page (views of storages, ZIP64 data descriptors) and the same
            // weights as safetensors from a URL: the same values, so the same logits.
            const ss = `${base}/fixtures/lm_v64_state_spaces`;
            const fromBin = await m.fromPretrainedFiles([
              new File(
                [await (await fetch(`${base}/fixtures/torch/lm_v64_views.bin`)).blob()],
                "pytorch_model.bin",
              ),
              new File([await (await fetch(`${ss}/config.json`)).blob()], "config.json"),
            ]);
            const fromSafetensors = await m.fromPretrained(ss);
            const tokens = [[1, 5, 9, 33, 60, 2]];
            const [binLogits, stLogits] = await Promise.all([fromBin, fromSafetensors].map((lm) => {
              const l = m.tidy(() => m.noGrad(() => lm.forward(tokens)));
              return l.toArray().finally(() => l.dispose());
            }));
            const out = {
              binDiff: diff(binLogits, stLogits),
              hubDiff: diff(ref, await logitsOf(fromHub)),
              hubSource: fromHub.source,
              hubTokenizer: fromHub.tokenizer instanceof m.ByteTokenizer,
              filesDiff: diff(ref, await logitsOf(fromFiles)),
              savedDiff: diff(ref, await logitsOf(back)),
              byteTokenizer: fromFiles.tokenizer instanceof m.ByteTokenizer,
              savedNames: Object.keys(saved).sort(),
              // the saved tokenizer knows the same characters
              savedKnown: [fromFiles, back].map((lm) =>
                [...(lm.tokenizer as Library.ByteTokenizer).known!].sort()
              ),
              missing,
              noRepo,
              unexposed,
            };
            for (const lm of [fromUrl, fromHub, fromFiles, back, fromBin, fromSafetensors]) lm.dispose();
            return out;
          }, base);
          assert.equal(r.hubDiff, 0);
          assert.equal(r.binDiff, 0, "pytorch_model.bin in the page: the safetensors' logits");
          assert.equal(r.hubSource, "test-org/char-mamba@main");
          // the first file by the revision asked for, every later one by the commit it resolved to
          const charHub = hubRequests.filter((q) => q.startsWith("char-mamba@"));
          assert.equal(charHub[0], "char-mamba@main/config.json");
          assert.ok(charHub.length >= 2, charHub.join());
          for (const q of charHub.slice(1)) assert.ok(q.startsWith(`char-mamba@${HUB_COMMIT}/`), q);
          assert.match(
            r.noRepo,
            /repository 'test-org\/no-such-model' not found at .*HTTP 404: Repository not found/,
          );
          assert.equal(r.hubTokenizer, true);
          assert.match(
            r.unexposed,
            /char-mamba-unexposed\/resolve\/main\/tokenizer_config\.json: HTTP 404 without the hub's X-Error-Code .*Access-Control-Expose-Headers/,
          );
          assert.equal(r.filesDiff, 0);
          assert.equal(r.savedDiff, 0);
          assert.equal(r.byteTokenizer, true);
          assert.deepEqual(r.savedNames, ["config.json", "model.safetensors", "tokenizer.json"]);
          assert.ok(r.savedKnown[0].length > 30, `${r.savedKnown[0].length} known characters`);
          assert.deepEqual(r.savedKnown[1], r.savedKnown[0]);
          assert.match(
            r.missing,
            /files\/config.json: no such file among the given ones \(model.safetensors\)/,
          );
        },
      );

      await t.step(
        "fused-scan variants for GPUs (lanes per channel, states in workgroup memory, chunks in parallel; at many chunks the chains in runs and the parameter sums by a reduction pass) compile in Chromium and agree",
        async () => {
          const r = await lib.evaluate(async () => {
            const m = (globalThis as unknown as { mamba: Bundle }).mamba;
            const info = await m.init();
            const sg = info.subgroups;
            if (!sg || sg.minSize !== sg.maxSize) {
              return { skipped: JSON.stringify(sg), rows: [], kernels: [] };
            }
            const SG = sg.minSize;
            const [ED, N, R] = [24, 8, 2];
            // a problem of batch B and length L: its leaves, and a run giving y and every leaf's gradient
            const problem = (B: number, L: number) => {
              const leaves = [
                m.randn([B, L, ED], { seed: 1 }), // x
                m.randn([B, L, R + 2 * N], { seed: 2 }), // dBC
                m.randn([ED, R], { seed: 3, std: 0.5 }), // dt_proj weight
                m.randn([ED], { seed: 4, std: 0.5 }), // dt bias
                m.randn([ED, N], { seed: 5, std: 0.3 }), // A_log
                m.randn([ED], { seed: 6 }), // D
                m.randn([B, L, ED], { seed: 7 }), // z
              ].map((t) => t.requiresGrad_(true));
              const G = m.randn([B, L, ED], { seed: 8 });
              const run = async () => {
                const y = m.tidy(() => {
                  const [x, dBC, W, bias, aLog, D, z] = leaves;
                  const y = m.fusedMambaScan(x, dBC, W, bias, aLog, D, z);
                  m.sum(m.mul(y, G)).backward();
                  return y;
                });
                const out = [...(await y.toArray())];
                y.dispose();
                for (const t of leaves) {
                  out.push(...(await t.grad!.toArray()));
                  t.grad!.dispose();
                  t.grad = null;
                }
                return out;
              };
              return { run, dispose: () => m.dispose([...leaves, G]) };
            };
            // max |got - want| over max |want| (a NaN or a length mismatch fails, maxAbsDiff's rule)
            const rel = (got: number[], want: number[]) => {
              let d = got.length === want.length ? 0 : Infinity;
              for (let i = 0; i < want.length; i++) {
                const x = Math.abs(got[i] - want[i]);
                if (!(x <= d)) d = Number.isNaN(x) ? Infinity : x;
              }
              return d / want.reduce((a, v) => Math.max(a, Math.abs(v)), 0);
            };
            const base = { Lc: 16, WG: 2 * SG, reduce: "subgroup" as const };
            const variants = [
              {},
              { hbuf: "workgroup" as const },
              { lanes: 2 },
              { lanes: Math.min(4, SG), Lc: 24, Ls: 8, hbuf: "workgroup" as const },
              { chunkParallel: true }, // L 37: three chunks of 16 at once, carries chained
              { lanes: 2, Lc: 8, Ls: 4, hbuf: "workgroup" as const, chunkParallel: true },
              // the forward in walks of 3 chunks (L 37: 10 chunks of 4 in 4 walks, the last of one chunk)
              { Lc: 4, Lf: 12, chunkParallel: true },
            ];
            const rows = [];
            const kernels: string[] = [];
            const small = problem(2, 37);
            const large = problem(2, 300);
            const gpu = m.deviceInfo() as { isFallbackAdapter: boolean };
            const wasFallback = gpu.isFallbackAdapter;
            const proto = GPUComputePassEncoder.prototype;
            const setPipeline = proto.setPipeline;
            try {
              m.setFusedVariant(N, null);
              const want = await small.run();
              for (const v of variants) {
                m.setFusedVariant(N, { ...base, ...v });
                rows.push({ variant: JSON.stringify(v), rel: rel(await small.run(), want) });
              }
              // 150 chunks of 2 steps, batch 2: as a GPU runs them (the chains in 16 runs, the 300 rows of
              // parameter sums by a reduction pass first) against a CPU adapter's plans
              m.setFusedVariant(N, { ...base, Lc: 2, chunkParallel: true });
              gpu.isFallbackAdapter = true;
              const wantLarge = await large.run();
              gpu.isFallbackAdapter = false;
              proto.setPipeline = function (this: GPUComputePassEncoder, p: GPUComputePipeline) {
                kernels.push(p.label);
                return setPipeline.call(this, p);
              };
              const gotLarge = await large.run();
              rows.push({ variant: "150 chunks on a GPU's paths", rel: rel(gotLarge, wantLarge) });
              // ... and 300 chunks of 1 step, the forward in 150 walks of 2 (its chain in runs too)
              m.setFusedVariant(N, { ...base, Lc: 1, Lf: 2, chunkParallel: true });
              const gotWalks = await large.run();
              proto.setPipeline = setPipeline;
              rows.push({
                variant: "the forward in 150 walks on a GPU's paths",
                rel: rel(gotWalks, wantLarge),
              });
            } finally {
              proto.setPipeline = setPipeline;
              gpu.isFallbackAdapter = wasFallback;
              m.setFusedVariant(N, null);
              small.dispose();
              large.dispose();
            }
            return { skipped: "", rows, kernels };
          });
          if (r.skipped) console.log(`  skipped: subgroups ${r.skipped} (lanes need a fixed subgroup size)`);
          for (const row of r.rows) {
            console.log(`  ${row.variant}: max diff ${row.rel.toExponential(2)} of the largest value`);
            assert.ok(row.rel < 1e-5, `${row.variant}: ${row.rel}`);
          }
          if (!r.skipped) {
            // (the reduction pass is core's reduce kernel, which every sum here runs)
            for (const k of ["fused_scan_chain_fwd_seg16", "fused_scan_chain_bwd_seg16"]) {
              assert.ok(r.kernels.includes(k), `${k} ran on the GPU's paths (${r.kernels.join(", ")})`);
            }
            for (const re of [/^fused_scan_chain_fwd_seg\d+_G2$/, /^fused_scan_fwd_.*_Lf2_.*_chunked$/]) {
              assert.ok(r.kernels.some((k) => re.test(k)), `${re} ran on the GPU's paths`);
            }
          }
        },
      );

      await t.step(
        "every matmul variant the page can run, and the matvec kernel (with decoding's norm inside too), compile in Chromium and agree",
        async () => {
          const r = await lib.evaluate(async () => {
            const m = (globalThis as unknown as { mamba: Bundle }).mamba;
            await m.init();
            const rows = [];
            // [M, K, N, transA, transB]: lanes sharing A's rows (wide C) and B's columns (narrow C), vec4 and
            // scalar reads, split K; a C that tiled128's 128x128 tiles run themselves (they hand smaller ones to
            // the register kernel)
            const shapes: [number, number, number, boolean, boolean][] = [
              [250, 40, 240, true, false],
              [37, 20, 300, false, true],
              [64, 48, 16, true, false],
              [5, 7, 9, false, false],
              [16, 700, 33, true, true],
            ];
            for (const [M, K, N, transA, transB] of shapes) {
              const a = m.randn(transA ? [K, M] : [M, K], { seed: M });
              const b = m.randn(transB ? [N, K] : [K, N], { seed: N });
              const outs = [];
              for (const v of m.availableMatmulVariants()) {
                const c = m.matmulRaw(a, b, { transA, transB }, v);
                outs.push({ v, data: [...(await c.toArray())] });
                c.dispose();
              }
              m.dispose([a, b]);
              const want = outs[0].data; // `register`
              const scale = want.reduce((s, x) => Math.max(s, Math.abs(x)), 0);
              for (const { v, data } of outs) {
                let d = 0;
                for (let i = 0; i < want.length; i++) d = Math.max(d, Math.abs(data[i] - want[i]));
                rows.push({
                  what: `${v} ${M}x${K}x${N}${transA ? " A^T" : ""}${transB ? " B^T" : ""}`,
                  rel: d / scale,
                });
              }
            }
            // the matvec kernel (a GPU's plan for a few rows against a weight, as decoding runs): Tint compiles it
            // too, with vec4 loads (K 300) and scalar ones (K 301), with and without the norm inside
            const info = m.deviceInfo() as { isFallbackAdapter: boolean };
            const proto = GPUComputePassEncoder.prototype;
            const setPipeline = proto.setPipeline;
            const kernels: string[] = [];
            // a product on a CPU adapter's plans (the reference), then on a GPU's with its kernels recorded
            const bothWays = async (product: () => Library.Tensor) => {
              const wasFallback = info.isFallbackAdapter;
              try {
                info.isFallbackAdapter = true;
                const ref = product();
                const want = [...(await ref.toArray())];
                ref.dispose();
                info.isFallbackAdapter = false;
                proto.setPipeline = function (this: GPUComputePassEncoder, p: GPUComputePipeline) {
                  kernels.push(p.label);
                  return setPipeline.call(this, p);
                };
                const c = product();
                const got = [...(await c.toArray())];
                c.dispose();
                const scale = want.reduce((x, v) => Math.max(x, Math.abs(v)), 0);
                let d = 0;
                for (let i = 0; i < want.length; i++) d = Math.max(d, Math.abs(got[i] - want[i]));
                return d / scale;
              } finally {
                proto.setPipeline = setPipeline;
                info.isFallbackAdapter = wasFallback;
              }
            };
            for (const K of [300, 301]) {
              const a = m.randn([3, K], { seed: K });
              const b = m.randn([70, K], { seed: K + 1 });
              const g = m.randn([K], { seed: K + 2 });
              rows.push({
                what: `matvec 3x${K}x70 B^T`,
                rel: await bothWays(() => m.matmulRaw(a, b, { transB: true })),
              });
              // ... and with decoding's norm inside (rmsNormMatmul): the CPU plans run the norm's own kernel
              const rel = await bothWays(() => m.rmsNormMatmul(a, g, 1e-5, b));
              rows.push({ what: `matvec 3x${K}x70 B^T with the norm`, rel });
              m.dispose([a, b, g]);
            }
            return { variants: m.availableMatmulVariants(), rows, kernels };
          });
          console.log(`  matmul variants here: ${r.variants.join(", ")}; ${r.kernels.join(", ")}`);
          assert.deepEqual(
            r.kernels,
            [
              "matmul_matvec_m3_k4",
              "matmul_matvec_m3_k4_rms",
              "matmul_matvec_m3_k1",
              "matmul_matvec_m3_k1_rms",
            ],
            "the matvec kernels ran",
          );
          for (const row of r.rows) assert.ok(row.rel < 1e-5, `${row.what}: ${row.rel}`);
        },
      );

      await t.step("training in the browser: the loss falls within 20 steps", async () => {
        const r = await lib.evaluate(async (base) => {
          const m = (globalThis as unknown as { mamba: Bundle }).mamba;
          const text = new Uint8Array(
            await (await fetch(`${base}/data/pride_and_prejudice.txt`)).arrayBuffer(),
          );
          m.manualSeed(7);
          const lm = new m.MambaLM({ dModel: 32, nLayers: 1, dState: 8 }, { vocabSize: 256 }); // fused scan
          const config = {
            ...m.DEFAULT_TRAIN,
            steps: 20,
            batch: 4,
            seq: 32,
            lr: 1e-2,
            minLr: 1e-3,
            warmup: 3,
            evalBatches: 2,
            logEvery: 5,
          };
          const trainer = new m.Trainer(lm, new m.CharDataset(text), config);
          const t0 = performance.now();
          const before = await trainer.evaluate();
          while (trainer.step < config.steps) await trainer.trainStep();
          const after = await trainer.evaluate();
          const ms = performance.now() - t0;
          const log = trainer.log.train;
          trainer.dispose();
          lm.dispose();
          return { before, after, log, ms, live: m.memory().liveBytes };
        }, base);
        const first = r.log[0][1], last = r.log.at(-1)![1];
        console.log(
          `  20 steps in ${r.ms.toFixed(0)} ms: train loss ${first.toFixed(3)} -> ${last.toFixed(3)}, ` +
            `validation ${r.before.toFixed(3)} -> ${r.after.toFixed(3)}`,
        );
        assert.ok(r.log.every(([, l]) => Number.isFinite(l)));
        assert.ok(last < first - 0.5, `train loss ${first} -> ${last}`);
        assert.ok(r.after < r.before - 0.5, `validation loss ${r.before} -> ${r.after}`);
        assert.equal(r.live, 0, "every tensor was freed");
      });

      await t.step(
        "above dt rank 8 at 10 storage buffers: the fused gradients and decoding steps equal pscan's",
        async () => {
          // Chrome exposes 10 storage buffers, so the backward kernel writes the gated y over its g (one state
          // block: d_state 8) instead of into an 11th binding; recompute on (the op replays) and off, and with two
          // lanes per channel (only one reads g; 62 channels leave two lanes of the last tile clamped), which
          // Chromium's compiler checks for uniformity.
          const r = await lib.evaluate(async () => {
            const m = (globalThis as unknown as { mamba: Bundle }).mamba;
            const config = { dModel: 31, nLayers: 1, dState: 8, dtRank: 12 };
            m.manualSeed(5);
            const lms = [
              new m.MambaLM({ ...config, scan: "pscan" }, { vocabSize: 64 }),
              new m.MambaLM({ ...config, scan: "fused" }, { vocabSize: 64 }),
              new m.MambaLM({ ...config, scan: "fused", recompute: false }, { vocabSize: 64 }),
              new m.MambaLM({ ...config, scan: "fused" }, { vocabSize: 64 }), // with lanes
            ];
            const lanes = { WG: 8, Lc: 16, reduce: "subgroup", lanes: 2, chunkParallel: true } as const;
            for (const lm of lms.slice(1)) lm.loadStateDict(lms[0].stateDict());
            const ids = [0, 1].map((b) => Array.from({ length: 40 }, (_, i) => (i * 7 + b * 13) % 64));
            const G = m.randn([2, 40, 64]); // a cotangent with random signs
            const grads: Float32Array[][] = [];
            // the kernels that ran, by their pipelines' labels
            const proto = GPUComputePassEncoder.prototype;
            const setPipeline = proto.setPipeline;
            const kernels: string[] = [];
            proto.setPipeline = function (this: GPUComputePassEncoder, p: GPUComputePipeline) {
              kernels.push(p.label);
              return setPipeline.call(this, p);
            };
            try {
              for (const [i, lm] of lms.entries()) {
                if (i === 3) m.setFusedVariant(8, lanes);
                try {
                  m.tidy(() => lm.forward(ids).mul(G).sum().backward());
                } finally {
                  if (i === 3) m.setFusedVariant(8, null);
                }
                grads.push(
                  await Promise.all(lm.parameters().map((p) => p.grad!.toArray() as Promise<Float32Array>)),
                );
              }
              // decoding at dt rank 12: the fused SSM step computes dt_proj's product in a loop over R
              for (const lm of lms.slice(0, 2)) {
                let caches = lm.emptyCache(2);
                const out: Float32Array[] = [];
                for (const t of [3, 9, 27]) {
                  const id = m.tensor(new Int32Array([t, t + 1]), [2]);
                  const r = m.tidy(() => m.noGrad(() => lm.step(id, caches)));
                  m.dispose(caches);
                  id.dispose();
                  caches = r.caches;
                  out.push(await r.logits.toArray() as Float32Array);
                  r.logits.dispose();
                }
                m.dispose(caches);
                grads.push(out);
              }
            } finally {
              proto.setPipeline = setPipeline;
            }
            const steps = grads.splice(4, 2);
            // each gradient's largest difference from pscan's, relative to max(1, its largest value)
            const worst = [...grads.slice(1), steps[1]].map((gs, k) =>
              Math.max(...gs.map((g, j) => {
                const ref = (k === 3 ? steps[0] : grads[0])[j];
                let [d, top] = [0, 1];
                for (let i = 0; i < g.length; i++) {
                  const x = Math.abs(g[i] - ref[i]);
                  d = x <= d ? d : Number.isNaN(x) ? Infinity : x;
                  top = Math.max(top, Math.abs(ref[i]));
                }
                return d / top;
              }))
            );
            G.dispose();
            for (const lm of lms) lm.dispose();
            return {
              buffers: m.deviceInfo().limits.maxStorageBuffersPerShaderStage,
              yOverG: kernels.filter((k) => /^fused_scan_bwd_.*_y_g$/.test(k)).length,
              lanes: kernels.filter((k) => /^fused_scan_bwd_.*_lanes2_chunked(_folded)?_y_g$/.test(k)).length,
              ssmSteps: kernels.filter((k) => k === "ssm_step_N8_dtloop").length,
              worst,
              live: m.memory().liveBytes,
            };
          });
          console.log(
            `  ${r.buffers} storage buffers; fused (recompute on, off; 2 lanes; decoding) against pscan: ${
              r.worst.map((w) => w.toExponential(1))
            }`,
          );
          assert.equal(r.buffers, 10, "Chromium's limit");
          assert.equal(r.yOverG, 3, "the backward kernel wrote y over g (recompute on and off, lanes)");
          assert.equal(r.lanes, 1, "two lanes per channel");
          assert.equal(r.ssmSteps, 3, "the fused SSM step with dt_proj's product in a loop, once per token");
          for (const w of r.worst) assert.ok(w <= 1e-4, `relative difference ${w} > 1e-4`);
          assert.equal(r.live, 0, "every tensor was freed");
        },
      );
      await lib.close();

      await t.step(
        "demo page: load the char model, stream a greedy continuation (sampling fields unread), save it; no model goes while generating",
        async () => {
          const page = await newPage("/");
          await page.waitForFunction(
            () => (globalThis as { mambaDemo?: { ready: boolean } }).mambaDemo?.ready,
            null,
            {
              timeout: 20_000,
            },
          );
          assert.match(await page.textContent("#adapter") ?? "", /swiftshader.*software adapter/i);
          await page.selectOption("#model-source", "local:models/char-mamba/");
          await page.click("#load");
          await page.waitForFunction(() =>
            !!(globalThis as { mambaDemo?: { model: string | null } }).mambaDemo?.model
          );
          assert.match(await page.textContent("#model-status") ?? "", /models\/char-mamba .*parameters/);
          const s = sample[0];
          await page.fill("#prompt", s.prompt);
          await page.fill("#n-tokens", "64");
          await page.selectOption("#decoding", "greedy");
          // Greedy decoding reads none of the sampling fields: a cleared temperature and a top-p of 0 are no
          // error then.
          await page.fill("#temperature", "");
          await page.fill("#top-p", "0");
          // While it generates, nothing can replace (and dispose) its model: Load and Train are disabled.
          const clickGenerate = () =>
            page.evaluate(() => {
              const doc = (globalThis as unknown as { document: PageDocument }).document;
              const button = (id: string) => doc.getElementById(id);
              button("generate").click(); // runs generate() up to its first await
              return {
                generating: (globalThis as unknown as { mambaDemo: DemoState }).mambaDemo.generating,
                load: button("load").disabled,
                train: button("train-start").disabled,
              };
            });
          const finished = () =>
            page.waitForFunction(
              () => {
                const d = (globalThis as unknown as { mambaDemo: DemoState }).mambaDemo;
                return !d.generating && (d.lastGeneration || d.error);
              },
              null,
              { timeout: 30_000 },
            );
          const demoState = () =>
            page.evaluate(() => (globalThis as unknown as { mambaDemo: DemoState }).mambaDemo);
          assert.deepEqual(await clickGenerate(), { generating: true, load: true, train: true });
          await finished();
          assert.equal((await demoState()).error, null);
          const output = await page.textContent("#output");
          assert.equal(output, s.prompt + s.continuation);
          for (const id of ["#load", "#train-start", "#generate"]) {
            assert.equal(await page.isDisabled(id), false);
          }
          assert.match(await page.textContent("#tps-generate") ?? "", /^\d+(\.\d)? tokens\/s$/);
          assert.equal(await page.textContent("#tps-train"), "–", "no training ran: its own field");
          assert.match(await page.textContent("#memory") ?? "", /MiB live/);
          await page.screenshot({ path: `${ARTIFACTS}/generate.png`, fullPage: true });

          const downloads: string[] = [];
          page.on("download", (d) => downloads.push(d.suggestedFilename()));
          await page.click("#save");
          const t0 = Date.now();
          while (downloads.length < 3 && Date.now() - t0 < 10_000) {
            await new Promise((r) => setTimeout(r, 50));
          }
          assert.deepEqual(downloads.sort(), ["config.json", "model.safetensors", "tokenizer.json"]);

          // A load started before Generate was clicked ends during the generation: the model it replaces
          // goes only when the generation ends. The char model's config.json is held back until tokens flow.
          let release!: () => void;
          const held = new Promise<void>((r) => (release = r));
          const configUrl = "**/models/char-mamba/config.json";
          await page.route(configUrl, async (route) => {
            await held;
            await route.continue();
          });
          // long enough to outlast the held load once released (160 ended first once, on a loaded machine)
          await page.fill("#n-tokens", "480");
          await page.evaluate(() =>
            (globalThis as unknown as { document: PageDocument }).document.getElementById("load").click()
          );
          assert.deepEqual(await clickGenerate(), { generating: true, load: true, train: true });
          await page.waitForFunction(
            (n) =>
              ((globalThis as unknown as { document: PageDocument }).document.getElementById("output")
                .textContent ?? "").length >= n,
            s.prompt.length + 16,
            { timeout: 30_000 },
          );
          release();
          // Whether it was still generating when the new model came in (else this part tested nothing).
          const swapped = await page.waitForFunction(
            () => {
              const d = (globalThis as unknown as { mambaDemo: DemoState }).mambaDemo;
              return !d.loading && { generating: d.generating, error: d.error };
            },
            null,
            { timeout: 30_000 },
          );
          assert.deepEqual(await swapped.jsonValue(), { generating: true, error: null });
          await finished();
          await page.unroute(configUrl);
          assert.equal((await demoState()).error, null);
          assert.ok((await page.textContent("#output"))!.startsWith(s.prompt + s.continuation));
          assert.equal((await demoState()).lastGeneration!.tokens, 480);
          await page.close();
        },
      );

      await t.step(
        "demo page: a model without tokenizer.json says why it runs on bytes, and takes another's tokenizer; the repetition penalty field",
        async () => {
          const page = await newPage("/");
          await page.waitForFunction(() =>
            (globalThis as { mambaDemo?: { ready: boolean } }).mambaDemo?.ready
          );
          const load = async () => {
            await page.click("#load");
            await page.waitForFunction(() =>
              !(globalThis as unknown as { mambaDemo: DemoState }).mambaDemo.loading
            );
            return await page.textContent("#model-status") ?? "";
          };
          await page.selectOption("#model-source", "url");
          // a failed load says which model stays loaded: none yet
          assert.equal(
            await load(),
            "cannot load: the URL field is empty: give the folder that holds config.json; no model is loaded",
          );
          await page.fill("#model-url", "./fixtures/lm_v64_hf/");
          assert.match(
            await load(),
            /vocabulary 64, no tokenizer \(.*fixtures\/lm_v64_hf\/tokenizer\.json.*\): bytes as tokens$/,
          );
          // the field's tokenizer is checked against the model (256 ids > 64); the model loaded before stays
          await page.fill("#tokenizer-from", "./fixtures/char-mamba/");
          assert.match(
            await load(),
            /cannot load: .*fixtures\/char-mamba\/tokenizer\.json.* 256 token ids .* 64.*; the model loaded before stays: \.\/fixtures\/lm_v64_hf\/ \(loaded in [\d.]+ s\)$/,
          );
          assert.match(
            await page.evaluate(() => (globalThis as unknown as { mambaDemo: DemoState }).mambaDemo.model) ??
              "",
            /^\.\/fixtures\/lm_v64_hf\/ \(loaded in/,
          );
          await page.selectOption("#model-source", "local:models/char-mamba/");
          assert.match(await load(), /vocabulary 256, tokenizer from \.\/fixtures\/char-mamba\/$/);
          await page.fill("#tokenizer-from", "");
          assert.match(await load(), /vocabulary 256, bytes as tokens$/); // its own char tokenizer
          // the repetition penalty field reaches generate (greedy reads it too): the Deno API's tokens
          const prompt = "It is a truth universally acknowledged";
          const lm = await fromPretrained(new URL("./fixtures/char-mamba", import.meta.url).pathname);
          const want = await lm.generate([lm.tokenizer!.encode(prompt)], 24, { repetitionPenalty: 1.5 });
          const plain = await lm.generate([lm.tokenizer!.encode(prompt)], 24);
          assert.notDeepEqual([...want[0]], [...plain[0]], "the penalty changes these tokens");
          const text = prompt + lm.tokenizer!.decode(want[0]);
          const longer = prompt +
            lm.tokenizer!.decode((await lm.generate([lm.tokenizer!.encode(prompt)], 48))[0]);
          lm.dispose();
          await page.fill("#prompt", prompt);
          await page.fill("#n-tokens", "24");
          await page.selectOption("#decoding", "greedy");
          await page.fill("#repetition-penalty", "1.5");
          await page.click("#generate");
          await page.waitForFunction(() => {
            const d = (globalThis as unknown as { mambaDemo: DemoState }).mambaDemo;
            return !d.generating && (d.lastGeneration || d.error);
          });
          assert.equal(await page.textContent("#output"), text);
          // Continue: 24 greedy tokens, then 24 more from the state at the text's end, are 48 at once
          const done = () =>
            page.waitForFunction(() => {
              const d = (globalThis as unknown as { mambaDemo: DemoState }).mambaDemo;
              return !d.generating && (d.lastGeneration || d.error);
            });
          await page.fill("#repetition-penalty", "1");
          await page.click("#generate");
          await done();
          assert.equal(await page.isDisabled("#generate-continue"), false);
          await page.click("#generate-continue");
          await page.waitForFunction(() =>
            !(globalThis as unknown as { mambaDemo: DemoState }).mambaDemo.generating
          );
          await done();
          assert.equal(await page.textContent("#output"), longer);
          // A setting generate refuses leaves the output and Continue as they were; the message names the
          // field as the page does, and an empty field is not 0
          await page.selectOption("#decoding", "sample");
          for (
            const [id, value, said] of [
              ["#temperature", "0", "temperature must be a number > 0, got 0"],
              ["#top-k", "", "top-k must be an integer >= 0 (0: all), got an empty field"],
              ["#n-tokens", "", "tokens must be an integer from 1 to 4096, got an empty field"],
            ]
          ) {
            const was = await page.inputValue(id);
            await page.fill(id, value);
            await page.click("#generate");
            await done();
            assert.equal(await page.textContent("#generate-status"), said);
            assert.equal(await page.textContent("#output"), longer);
            assert.equal(await page.isDisabled("#generate-continue"), false);
            await page.fill(id, was);
          }
          await page.selectOption("#decoding", "greedy");
          await page.fill("#repetition-penalty", "1.5");
          // bf16 weights: the Deno API's text for the bf16 model
          await page.selectOption("#weight-dtype", "bf16");
          assert.match(await load(), /vocabulary 256, bf16 weights, bytes as tokens$/);
          const half = await fromPretrained(new URL("./fixtures/char-mamba", import.meta.url).pathname, {
            weightDtype: "bf16",
          });
          const halfIds = await half.generate([half.tokenizer!.encode(prompt)], 24, {
            repetitionPenalty: 1.5,
          });
          const halfText = prompt + half.tokenizer!.decode(halfIds[0]);
          half.dispose();
          await page.click("#generate");
          await page.waitForFunction(() => {
            const d = (globalThis as unknown as { mambaDemo: DemoState }).mambaDemo;
            return !d.generating && (d.lastGeneration || d.error);
          });
          assert.equal(await page.textContent("#output"), halfText);
          await page.close();
        },
      );

      await t.step(
        "demo page: the Train tab trains with a live loss chart, then generates; a lost device",
        async () => {
          // every device the page asks for, to lose it at the end
          const page = await newPage(
            "/",
            `const requestDevice = GPUAdapter.prototype.requestDevice;
          GPUAdapter.prototype.requestDevice = async function (...a) {
            const d = await requestDevice.apply(this, a);
            (globalThis.devices ??= []).push(d);
            return d;
          };`,
          );
          // Load and Train wait for init() (the tuner measures then): disabled until the page is ready
          assert.ok(
            await page.evaluate(() => {
              const g = globalThis as unknown as {
                mambaDemo?: { ready: boolean };
                document: { getElementById(id: string): { disabled: boolean } };
              };
              const off = (id: string) => g.document.getElementById(id).disabled;
              return g.mambaDemo?.ready === true || (off("load") && off("train-start"));
            }),
            "Load and Train enabled before the page was ready",
          );
          await page.waitForFunction(
            () => (globalThis as { mambaDemo?: { ready: boolean } }).mambaDemo?.ready,
            null,
            {
              timeout: 20_000,
            },
          );
          await page.click("#tab-train");
          for (
            const [id, v] of [
              ["train-steps", "12"],
              ["train-batch", "4"],
              ["train-seq", "32"],
              ["train-lr", "0.01"],
              ["train-layers", "1"],
              ["train-dmodel", "32"],
            ]
          ) {
            await page.fill(`#${id}`, v);
          }
          const trained = async () => {
            await page.click("#train-start");
            await page.waitForFunction(
              () => !(globalThis as { mambaDemo?: { training: boolean } }).mambaDemo?.training,
              null,
              { timeout: 45_000 },
            );
            return await page.textContent("#train-status") ?? "";
          };
          // a field named as the page labels it, an empty one refused (not 0)
          await page.fill("#train-steps", "");
          assert.equal(await trained(), "steps must be an integer >= 1, got an empty field");
          // a diverged run: its NaN losses are left out of the chart (not drawn at NaN coordinates)
          await page.fill("#train-steps", "5");
          await page.fill("#train-lr", "1e9");
          assert.match(await trained(), /^training diverged: loss NaN/);
          const chart = await page.innerHTML("#loss-chart");
          assert.ok(chart.includes("<polyline") && !/NaN|Infinity/.test(chart), chart);
          await page.evaluate(() =>
            (globalThis as unknown as { mambaDemo: { error: null } }).mambaDemo.error = null
          );
          await page.fill("#train-steps", "12");
          await page.fill("#train-lr", "0.01");
          await trained();
          const st = await page.evaluate(() =>
            (globalThis as unknown as {
              mambaDemo: { error: string | null; trainLog: Train.TrainLog; trainSample: string };
            })
              .mambaDemo
          );
          assert.equal(st.error, null);
          const train = st.trainLog.train;
          assert.ok(train.length >= 3, `logged ${train.length} losses`);
          assert.ok(train.at(-1)![1] < train[0][1], `train loss ${train[0][1]} -> ${train.at(-1)![1]}`);
          assert.ok(st.trainLog.val.at(-1)![1] < st.trainLog.val[0][1]);
          assert.ok(st.trainSample.length > 0);
          assert.equal(await page.locator("#loss-chart polyline").count(), 1);
          assert.match(await page.textContent("#train-status") ?? "", /trained 12 steps/);
          await page.screenshot({ path: `${ARTIFACTS}/train.png`, fullPage: true });
          const memoryShown = await page.textContent("#memory");
          // the training's tokens/s in its own field; the sample after it writes none (a generation may run
          // meanwhile, whose figure is the other field's)
          const trainSpeed = await page.textContent("#tps-train") ?? "";
          assert.match(trainSpeed, /^\d+(\.\d)? tokens\/s$/);
          assert.equal(await page.textContent("#tps-generate"), "–");
          // The trained model is offered in the Generate tab.
          await page.click("#tab-generate");
          await page.selectOption("#model-source", "trained");
          await page.click("#load");
          await page.waitForFunction(() =>
            /trained here/.test(
              (globalThis as { mambaDemo?: { model: string | null } }).mambaDemo?.model ?? "",
            )
          );
          // the figure shown when training ended was without the trainer's buffers (loading allocates nothing)
          assert.equal(memoryShown, await page.textContent("#memory"));
          // Nothing was generated in the Generate tab: Continue has no text to go on from (the Train tab's sample
          // is not the output's)
          assert.equal(await page.isDisabled("#generate-continue"), true);
          // Stop ends a long generation at the next readback, with what streamed kept and no error.
          await page.fill("#n-tokens", "4096");
          await page.click("#generate");
          await page.waitForFunction(() =>
            ((globalThis as unknown as {
              document: { querySelector(s: string): { textContent: string } | null };
            })
              .document.querySelector("#output")?.textContent ?? "").length > 40
          );
          await page.click("#generate-stop");
          await page.waitForFunction(() =>
            !(globalThis as { mambaDemo?: { generating: boolean } }).mambaDemo?.generating
          );
          const stopped = await page.textContent("#generate-status") ?? "";
          const n = Number(/stopped after (\d+) tokens/.exec(stopped)?.[1]);
          assert.ok(n > 0 && n < 4096, stopped);
          // the generation's figure did not replace the training's
          assert.match(await page.textContent("#tps-generate") ?? "", /^\d+(\.\d)? tokens\/s$/);
          assert.equal(await page.textContent("#tps-train"), trainSpeed);
          assert.equal(
            await page.evaluate(() =>
              (globalThis as unknown as { mambaDemo: { error: string | null } }).mambaDemo.error
            ),
            null,
          );
          assert.equal(await page.isDisabled("#generate-stop"), true);
          // Train again, then Stop before its first step: the model trained before stays, loaded and listed
          await page.click("#tab-train");
          // both clicks in one task: train() runs up to its first evaluation before the Stop (deterministic)
          await page.evaluate(() => {
            const doc = (globalThis as unknown as {
              document: { getElementById(id: string): { click(): void } };
            }).document;
            doc.getElementById("train-start").click();
            doc.getElementById("train-stop").click();
          });
          await page.waitForFunction(() =>
            !(globalThis as { mambaDemo?: { training: boolean } }).mambaDemo?.training
          );
          assert.match(
            await page.textContent("#train-status") ?? "",
            /stopped before the first step: the model trained before stays/,
          );
          assert.equal(await page.isDisabled('#model-source option[value="trained"]'), false);
          assert.match(
            await page.evaluate(() =>
              (globalThis as unknown as { mambaDemo: { model: string } }).mambaDemo.model
            ),
            /trained here \(12 steps\)/,
          );
          // The device lost during a generation: the generation says so (not Chromium's "Buffer was unmapped"),
          // the adapter line asks for a reload, and nothing that needs the GPU can be clicked
          await page.click("#tab-generate");
          await page.click("#generate");
          await page.waitForFunction(() =>
            ((globalThis as unknown as {
              document: { querySelector(s: string): { textContent: string } | null };
            })
              .document.querySelector("#output")?.textContent ?? "").length > 40
          );
          await page.evaluate(() =>
            (globalThis as unknown as { devices: { destroy(): void }[] }).devices.forEach((d) => d.destroy())
          );
          await page.waitForFunction(() =>
            !(globalThis as { mambaDemo?: { generating: boolean } }).mambaDemo?.generating
          );
          assert.match(await page.textContent("#generate-status") ?? "", /^GPU device lost \(destroyed\): /);
          assert.match(
            await page.textContent("#adapter") ?? "",
            /^GPU device lost \(destroyed\): .* Reload the page\.$/,
          );
          for (const id of ["load", "save", "generate", "generate-continue", "train-start"]) {
            assert.equal(await page.isDisabled(`#${id}`), true, id);
          }
          await page.close();
        },
      );

      await t.step(
        "demo page: without WebGPU, or without an adapter, the browser's advice, once",
        async () => {
          const said = async (init: string) => {
            const page = await newPage("/", init);
            await page.waitForFunction(() =>
              (globalThis as { mambaDemo?: { error: string | null } }).mambaDemo?.error
            );
            const text = await page.textContent("#model-status") ?? "";
            assert.equal(await page.isDisabled("#load"), true);
            await page.close();
            return text;
          };
          const noGpu = await said(
            `Object.defineProperty(Navigator.prototype, "gpu", { get: () => undefined });`,
          );
          assert.equal(noGpu.match(/Chrome and Edge/g)?.length, 1, noGpu);
          const noAdapter = await said(`GPU.prototype.requestAdapter = async () => null;`);
          assert.match(noAdapter, /requestAdapter\(\) returned null.*chrome:\/\/gpu/);
          assert.doesNotMatch(noAdapter, /apt-get|DENO_WEBGPU_BACKEND/);
        },
      );
      assert.deepEqual(pageErrors, []);
    } finally {
      await browser?.close();
      await server.shutdown();
    }
  },
});

Deno.test("fromPretrainedFiles and checkpointFiles (the browser's loading and saving) work in Deno too", async () => {
  const dir = new URL("./fixtures/char-mamba/", import.meta.url);
  const names = ["config.json", "model.safetensors", "tokenizer.json"];
  const files = await Promise.all(
    names.map(async (n) => new File([await Deno.readFile(new URL(n, dir))], n)),
  );
  const prompt = [[...new TextEncoder().encode("It is a truth")]];
  const logitsOf = async (lm: Library.MambaLM) => {
    const l = tidy(() => noGrad(() => lm.forward(prompt)));
    const a = await l.toArray();
    l.dispose();
    return [...a];
  };
  const ref = await fromPretrained(dir.pathname);
  const picked = await fromPretrainedFiles(files);
  const back = await fromPretrainedFiles(await checkpointFiles(picked));
  const bare = await fromPretrainedFiles(await checkpointFiles(picked, null));
  const want = await logitsOf(ref);
  assert.deepEqual(await logitsOf(picked), want);
  assert.deepEqual(await logitsOf(back), want);
  assert.equal(picked.source, "files");
  // checkpointFiles saves the model's own tokenizer unless told null
  assert.deepEqual(back.tokenizer, picked.tokenizer);
  assert.equal(bare.tokenizer, null);
  for (const lm of [ref, picked, back, bare]) lm.dispose();
  await assert.rejects(
    () => fromPretrainedFiles([files[1], files[1]]),
    /files: two files are named model.safetensors/,
  );
  await assert.rejects(
    () => fromPretrainedFiles({ "config.json": files[0] }, { name: "mine" }),
    /mine has none of model.safetensors, model.safetensors.index.json and pytorch_model.bin/,
  );
});

Deno.test("the demo page's file picker admits every file fromPretrainedFiles reads, pytorch_model.bin too (no browser needed)", async () => {
  const html = await Deno.readTextFile(new URL("../examples/web/index.html", import.meta.url));
  const accept = /id="model-files"[^>]*\saccept="([^"]*)"/.exec(html)?.[1];
  assert.ok(accept !== undefined, "the page has its #model-files picker");
  const endings = accept.split(",").map((e) => e.trim());
  // a file dialog hides (macOS: greys out) the files that match none of them
  for (
    const name of [...MODEL_FILE_NAMES, "model.safetensors.index.json", "model-00001-of-00002.safetensors"]
  ) {
    assert.ok(endings.some((e) => name.endsWith(e)), `${name} is admitted by accept="${accept}"`);
  }
});

Deno.test("the bundle drops its kernels' comment lines, keeping the lines (source map), code, expressions and the map link (no browser needed)", () => {
  const js = [
    "const k=`fn f() {",
    "  // what each invocation owns",
    "  let a = 1; // kept: after code",
    "  // block of ${n}x${m}${more}",
    "  // an \\`if\\` body (escaped backticks stay in the template)",
    "  // the kernel's last line`;f();const v=`", // the template ends here: code follows
    '}`;const u="https://x";',
    "//# sourceMappingURL=mamba.js.map",
  ].join("\n");
  const out = stripKernelComments(js).split("\n");
  assert.deepEqual(out, [
    "const k=`fn f() {",
    "",
    "  let a = 1; // kept: after code",
    "  // block of ${n}x${m}${more}",
    "",
    "  // the kernel's last line`;f();const v=`",
    '}`;const u="https://x";',
    "//# sourceMappingURL=mamba.js.map",
  ]);
});

Deno.test("web server: only loopback Host names, no backslashes or NULs in paths (no browser needed)", async () => {
  const handler = webHandler({ fixtures: true });
  const ask = async (path: string, host = "127.0.0.1:8000") => {
    const res = await handler(
      new Request(`http://127.0.0.1:8000${path}`, { method: "HEAD", headers: { host } }),
    );
    await res.body?.cancel();
    return res.status;
  };
  assert.equal(await ask("/data/pride_and_prejudice.txt"), 200);
  assert.equal(await ask("/data/pride_and_prejudice.txt", "localhost:8000"), 200);
  // a page elsewhere whose name was rebound to 127.0.0.1 (DNS rebinding) sends its own name
  assert.equal(await ask("/data/pride_and_prejudice.txt", "evil.example:8000"), 403);
  assert.equal(await ask("/data/pride_and_prejudice.txt", ""), 403);
  // the address given with --host is allowed too (another machine's, or an IPv6 one)
  for (const h of ["192.168.1.5", "::1", "fe80::1"]) {
    const other = webHandler({ hosts: [h] });
    const host = h.includes(":") ? `[${h}]:8000` : `${h}:8000`;
    const res = await other(
      new Request("http://x/data/pride_and_prejudice.txt", { method: "HEAD", headers: { host } }),
    );
    assert.equal(res.status, 200, h);
  }
  // Windows reads "..\" as the parent: an encoded backslash passed the ".." check
  for (
    const bad of [
      "/data/..%5c..%5cdeno.json",
      "/data/%00x",
      "/data/..%2f..%2fdeno.json",
    ]
  ) {
    assert.equal(await ask(bad), 400, bad);
  }
});
