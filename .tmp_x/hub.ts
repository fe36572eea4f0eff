// A minimal hub serving /tmp/m130 as state-spaces/mamba-130m (pytorch_model.bin as an LFS object).
const COMMIT = "0123456789abcdef0123456789abcdef01234567";
const sha = (await Deno.readTextFile("/tmp/m130.sha")).trim();
Deno.serve({ hostname: "127.0.0.1", port: 8765 }, async (req) => {
  const url = new URL(req.url);
  const cdn = /^\/cdn\/(.+)$/.exec(url.pathname);
  if (cdn) {
    const f = await Deno.open(`/tmp/m130/${cdn[1]}`);
    const size = (await f.stat()).size;
    if (req.method === "HEAD") { f.close(); return new Response(null, { headers: { "content-length": String(size) } }); }
    return new Response(f.readable, { headers: { "content-length": String(size) } });
  }
  const m = /^\/state-spaces\/mamba-130m\/resolve\/[^/]+\/(.+)$/.exec(url.pathname);
  const file = m?.[1];
  if (file === "pytorch_model.bin") {
    const size = (await Deno.stat(`/tmp/m130/${file}`)).size;
    return new Response(null, { status: 302, headers: { location: `http://127.0.0.1:8765/cdn/${file}`, "x-repo-commit": COMMIT, "x-linked-etag": `"${sha}"`, "x-linked-size": String(size) } });
  }
  if (file === "config.json") {
    const data = await Deno.readFile(`/tmp/m130/${file}`);
    return new Response(req.method === "HEAD" ? null : data, { headers: { "x-repo-commit": COMMIT, etag: `"cfg1"`, "content-length": String(data.length) } });
  }
  return new Response("Entry not found", { status: 404, headers: { "x-error-code": "EntryNotFound", "x-repo-commit": COMMIT } });
});
