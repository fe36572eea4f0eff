import assert from "node:assert/strict";
import * as M from "./library.ts";
import { dispose, emptyPool, keep, memory, noGrad, type Tensor, tensor, tidy } from "../mod.ts";
import { defineOp } from "../advanced.ts";
import { fixturePath } from "./fixture_util.ts";
import { setup, underRisingCaps } from "./helpers.ts";

await setup();

/** A small model's parameters: two layers and an embedding. */
function makeParams(): Tensor[] {
  return [
    M.randn([20, 16], { seed: 1, std: 0.3, requiresGrad: true }), // embedding
    M.randn([16, 32], { seed: 2, std: 0.2, requiresGrad: true }),
    M.randn([32], { seed: 3, std: 0.1, requiresGrad: true }),
    M.randn([32, 20], { seed: 4, std: 0.2, requiresGrad: true }),
  ];
}

/** One training-like step: forward, cross-entropy, backward, SGD update (new params), grads disposed. */
function step(params: Tensor[], i: number): { params: Tensor[]; loss: Tensor } {
  const [emb, w1, b1, w2] = params;
  const loss = tidy(() => {
    const ids = tensor(Int32Array.from({ length: 24 }, (_, k) => (k * 7 + i) % 20), [2, 12]);
    const targets = tensor(Int32Array.from({ length: 24 }, (_, k) => (k * 3 + i + 1) % 20), [2, 12]);
    const x = M.indexSelect(emb, 0, ids); // [2,12,16]
    const h = M.checkpoint((t) => t.matmul(w1).add(b1).silu(), x); // [2,12,32]
    const logits = h.matmul(w2).add(h.narrow(2, 0, 20).mul(0.1)); // [2,12,20]
    const l = M.crossEntropy(logits, targets).add(M.mean(M.square(w1)).mul(1e-3));
    l.backward();
    return l;
  });
  const next = tidy(() =>
    noGrad(() =>
      params.map((p) => {
        const q = keep(p.sub(p.grad!.mul(0.1))).requiresGrad_();
        p.grad!.dispose();
        p.dispose();
        return q;
      })
    )
  );
  return { params: next, loss };
}

Deno.test("50 training-like steps: live bytes and tensors return to baseline, pool stays bounded", async () => {
  await M.sync();
  const base = memory();
  let params = makeParams();
  const afterParams = memory();
  const losses: Tensor[] = [];
  let steady: M.MemoryInfo | null = null;
  let maxPooled = 0;
  for (let i = 0; i < 50; i++) {
    const r = step(params, i);
    params = r.params;
    losses.push(r.loss);
    const m = memory();
    assert.equal(m.savedBytes, base.savedBytes, `step ${i}: nothing saved after backward`);
    if (i === 2) steady = m;
    if (i > 2) {
      // Only the kept loss scalars (one 256-byte buffer each) accumulate across steps.
      assert.equal(m.liveTensors, steady!.liveTensors + (i - 2), `step ${i}: live tensors`);
      assert.equal(m.liveBytes, steady!.liveBytes + (i - 2) * 256, `step ${i}: live bytes`);
      maxPooled = Math.max(maxPooled, m.pooledBytes);
    }
  }
  assert.ok(
    maxPooled <= steady!.pooledBytes + steady!.liveBytes,
    `the pool is reused: pooled bytes peaked at ${maxPooled} after step 2's ${steady!.pooledBytes}`,
  );
  const values = await Promise.all(losses.map((l) => l.item()));
  assert.ok(values.every(Number.isFinite), "losses are finite");
  assert.ok(values[49] < values[0], `training lowers the loss (${values[0]} -> ${values[49]})`);
  assert.equal(afterParams.liveTensors - base.liveTensors, 4);
  dispose([losses, params]);
  const end = memory();
  assert.equal(end.liveTensors, base.liveTensors, "live tensors back to baseline");
  assert.equal(end.liveBytes, base.liveBytes, "live bytes back to baseline");
  assert.equal(end.savedBytes, base.savedBytes, "saved bytes back to baseline");
});

Deno.test("savedBytes: counted between forward and backward, 0 after backward and after dispose", () => {
  const base = memory();
  const x = M.randn([1000], { seed: 5, requiresGrad: true });
  const e = x.exp();
  const m = e.mul(x);
  const y = m.tanh();
  const during = memory().savedBytes - base.savedBytes;
  // exp saves its output, mul both operands (x and exp(x)), tanh its output: 3 distinct 4096-byte buffers.
  assert.equal(during, 3 * 4096);
  const loss = y.sum();
  loss.backward();
  assert.equal(memory().savedBytes, base.savedBytes);
  // A graph dropped without backward: disposing its tensors releases the saved bytes.
  const s = x.sigmoid();
  const z = s.mul(2);
  assert.ok(memory().savedBytes > base.savedBytes);
  dispose([s, z]);
  assert.equal(memory().savedBytes, base.savedBytes);
  for (const t of [x, e, m, y, loss, x.grad!]) t.dispose();
  assert.equal(memory().liveTensors, base.liveTensors, "all tensors freed");
});

Deno.test("tidy: disposes intermediates, keeps returned values (nested) and kept tensors", () => {
  const base = memory();
  let kept: Tensor | null = null;
  const out = tidy(() => {
    const a = M.ones([10]);
    const b = a.mul(2);
    kept = keep(b.add(1));
    const inner = tidy(() => {
      const c = b.exp();
      return { c, list: [c.neg(), a.square()] };
    });
    return { b, nested: inner };
  });
  assert.equal(memory().liveTensors - base.liveTensors, 5, "b, kept, c and the two list entries, no more");
  assert.ok(!out.b.disposed && !out.nested.c.disposed && !kept!.disposed);
  dispose([out, kept]);
  assert.equal(memory().liveTensors, base.liveTensors);
  assert.equal(memory().liveBytes, base.liveBytes);
  assert.throws(() => tidy(() => Promise.resolve(1) as unknown as number), /synchronous/);
  assert.equal(memory().liveTensors, base.liveTensors, "a failing tidy does not leak");
});

Deno.test("tidy frees a leaf made inside it with its gradient, unless the gradient is returned; a parameter's gradient stays", async () => {
  await setup();
  const w = tensor([1, 2, 3], [3], { requiresGrad: true }); // made outside: its gradient outlives the tidy
  const base = memory();
  const step = (give: boolean) =>
    tidy(() => {
      const x = M.randn([1000], { requiresGrad: true });
      const loss = x.mul(w.sum()).sum();
      loss.backward();
      return give ? x.grad! : loss;
    });
  for (let i = 0; i < 3; i++) step(false).dispose();
  // x (1000 floats) went with its gradient: w's gradient (3 floats) is the only new tensor
  assert.equal(memory().liveTensors, base.liveTensors + 1, "a leaf's gradient outlived its leaf");
  assert.ok(
    memory().liveBytes - base.liveBytes < 4000,
    "one small buffer (w's gradient); x's would be 4000 bytes",
  );
  const g = step(true);
  assert.ok(!g.disposed);
  assert.deepEqual([...await g.toArray()].slice(0, 2), [6, 6]);
  g.dispose();
  // the same when fn throws after its backward
  assert.throws(() =>
    tidy(() => {
      const x = M.randn([1000], { requiresGrad: true });
      x.mul(w.sum()).sum().backward();
      throw new Error("after the backward");
    }), /after the backward/);
  assert.equal(memory().liveTensors, base.liveTensors + 1);
  dispose([w, w.grad!]);
});

Deno.test("tidy keeps tensors returned in Sets, Maps (keys too), class instances and null-prototype objects", () => {
  const base = memory();
  class Pair {
    constructor(readonly first: Tensor, readonly second: Tensor) {}
  }
  const out = tidy(() => {
    const a = M.ones([4]);
    const bare = Object.create(null) as { t: Tensor };
    bare.t = a.mul(3);
    a.mul(4); // an intermediate: freed
    return {
      set: new Set([a.add(1)]),
      map: new Map([[a.mul(2), "key"]]),
      pair: new Pair(a.neg(), a.exp()),
      bare,
      bytes: new Float32Array(1e6), // numbers only: not walked element by element
    };
  });
  const all = [...out.set, ...out.map.keys(), out.pair.first, out.pair.second, out.bare.t];
  assert.ok(all.every((t) => !t.disposed), "every returned tensor is alive");
  assert.equal(memory().liveTensors - base.liveTensors, 5, "the five returned, not a or the intermediate");
  dispose(out);
  assert.ok(all.every((t) => t.disposed), "dispose finds them the same way");
  assert.equal(memory().liveBytes, base.liveBytes);
});

Deno.test("an op that runs out of memory part-way through its forward leaks nothing (outside tidy too)", () => {
  const x = M.zeros([64, 1000]);
  const t = tensor(new Int32Array(64), [64]);
  const base = memory();
  // crossEntropy's forward makes several tensors (the loss, the valid mask, the row statistics): a cap
  // just above what is live fails a later allocation, after the first ones were made
  for (const room of [300, 600, 1100]) {
    M.setMemoryLimit(base.liveBytes + room);
    try {
      assert.throws(() => M.crossEntropy(x, t), /out of memory/, `cap ${room} bytes above the live ones`);
    } finally {
      M.setMemoryLimit(null);
    }
    assert.equal(memory().liveBytes, base.liveBytes, `no bytes left live (cap +${room})`);
    assert.equal(memory().liveTensors, base.liveTensors, `no tensors left live (cap +${room})`);
  }
  dispose([x, t]);
});

Deno.test("a backward that runs out of memory part-way leaks nothing (outside tidy too), and can run again", async () => {
  const x = M.randn([2, 8, 6], { seed: 1, requiresGrad: true });
  const w = M.randn([6, 5], { seed: 2, requiresGrad: true });
  // no tidy: matmul's backward makes a's gradient, then b's runs out of memory; the graph is kept
  const y = x.matmul(w);
  const loss = y.sum();
  const base = memory();
  for (const room of [256, 512, 1024]) {
    M.setMemoryLimit(base.liveBytes + room);
    try {
      assert.throws(() => loss.backward(undefined, { retainGraph: true }), /out of memory/, `cap +${room}`);
    } finally {
      M.setMemoryLimit(null);
    }
    for (const p of [x, w]) {
      p.grad?.dispose(); // a gradient that reached its leaf before the throw stays, as in PyTorch
      p.grad = null;
    }
    assert.equal(memory().liveTensors, base.liveTensors, `no tensors left live (cap +${room})`);
    assert.equal(memory().liveBytes, base.liveBytes, `no bytes left live (cap +${room})`);
  }
  loss.backward();
  assert.deepEqual([...await w.grad!.toArray()].slice(0, 2).map((v) => v !== 0), [true, true]);
  dispose([y, loss, x.grad, w.grad, x, w]);
});

Deno.test("a checkpoint whose rerun's backward throws leaves no gradient of its inputs' copies behind", () => {
  const fails = defineOp<null>({
    name: "failsBackward",
    forward: ([a]) => a.mul(1),
    backward: () => {
      throw new Error("backward failed");
    },
  });
  const x = M.randn([4], { seed: 1, requiresGrad: true });
  const w = M.randn([4], { seed: 2, requiresGrad: true });
  const base = memory();
  // the copy of x gets its gradient (a kept .grad, as a leaf's) before the op on w throws
  assert.throws(
    () =>
      tidy(() => {
        M.checkpoint((t) => t.mul(2).add(fails([w], null)), x).sum().backward();
      }),
    /backward failed/,
  );
  assert.equal(memory().liveTensors, base.liveTensors, "no tensors left live");
  assert.equal(memory().liveBytes, base.liveBytes, "no bytes left live");
  dispose([x, w]);
});

Deno.test("a model that runs out of memory while it is built leaks nothing: MambaLM, its layers, fromPretrained", async () => {
  const config = { dModel: 8, nLayers: 2, dState: 4, bias: true, innerLayernorms: true };
  const builds: [string, () => M.Module | Promise<M.Module>][] = [
    ["MambaLM", () => new M.MambaLM(config, { vocabSize: 11 })],
    ["Mamba", () => new M.Mamba(M.mambaConfig(config))],
    ["Linear", () => new M.Linear(8, 100)],
    ["fromPretrained", () => M.fromPretrained(fixturePath("lm_v64_hf"))],
  ];
  for (const [what, build] of builds) {
    const base = memory();
    // caps from the live bytes up, until it fits: each failure leaves nothing live
    const { result: built, failed } = await underRisingCaps(build, 512, (room) => {
      assert.deepEqual(
        [memory().liveTensors, memory().liveBytes],
        [base.liveTensors, base.liveBytes],
        `${what}: nothing left live at +${room}`,
      );
    });
    built.dispose();
    assert.ok(failed > 1, `${what}: ${failed} failed builds`);
    assert.equal(memory().liveBytes, base.liveBytes, what);
  }
});

Deno.test("split and chunk that run out of memory after their first pieces leak nothing (outside tidy too)", () => {
  const x = M.zeros([4, 300]);
  const base = memory();
  // each piece is a copy of 1600 bytes (a 1792-byte buffer): room for one
  for (const cut of [() => x.split([100, 100, 100], 1), () => x.chunk(3, 1), () => x.split(100, 1)]) {
    M.setMemoryLimit(base.liveBytes + 1792);
    try {
      assert.throws(cut, /out of memory/);
    } finally {
      M.setMemoryLimit(null);
    }
    assert.deepEqual([memory().liveTensors, memory().liveBytes], [base.liveTensors, base.liveBytes]);
  }
  x.dispose();
});

Deno.test("emptyCache that runs out of memory after the first layers' caches leaks nothing", () => {
  const lm = new M.MambaLM({ dModel: 8, nLayers: 3, dState: 4 }, { vocabSize: 11 });
  const base = memory();
  // each layer's cache is h (1, 16, 4) and inputs (1, 16, 3): 256 bytes each; room for layer 0's and h of 1
  M.setMemoryLimit(base.liveBytes + 3 * 256);
  try {
    assert.throws(() => lm.emptyCache(1), /out of memory/);
  } finally {
    M.setMemoryLimit(null);
  }
  assert.deepEqual([memory().liveTensors, memory().liveBytes], [base.liveTensors, base.liveBytes]);
  lm.dispose();
});

Deno.test("a size that is not a whole number of bytes is refused before it reaches the byte counters", () => {
  const base = memory();
  for (const shape of [[NaN], [2, Infinity]]) {
    assert.throws(
      () => M.Tensor.empty(shape),
      /its size is not a whole number of bytes/,
      JSON.stringify(shape),
    );
  }
  assert.deepEqual([memory().liveBytes, memory().liveTensors], [base.liveBytes, base.liveTensors]);
  // the limit still holds (a NaN in the count had turned it off)
  M.setMemoryLimit(base.liveBytes + 1024);
  try {
    assert.throws(() => M.zeros([1 << 20]), /out of memory/);
  } finally {
    M.setMemoryLimit(null);
  }
});

Deno.test("setMemoryLimit and emptyPool refuse a NaN, a negative or a string limit (a NaN turned the cap off)", () => {
  for (const bad of [NaN, -1, "1000" as unknown as number]) {
    assert.throws(() => M.setMemoryLimit(bad), /setMemoryLimit: bytes must be a number >= 0/, String(bad));
    assert.throws(
      () => emptyPool(bad),
      /emptyPool: the pool's limit must be a number of bytes >= 0/,
      String(bad),
    );
  }
  // the cap set before still holds
  M.setMemoryLimit(memory().liveBytes + 1024);
  try {
    assert.throws(() => M.setMemoryLimit(NaN));
    assert.throws(() => M.zeros([1 << 20]), /out of memory/);
  } finally {
    M.setMemoryLimit(null);
  }
  M.setMemoryLimit(Infinity); // no cap, as null
  M.zeros([4]).dispose();
  M.setMemoryLimit(null);
});

Deno.test("tidy disposes even when fn throws; dispose twice is harmless", () => {
  const base = memory();
  assert.throws(() =>
    tidy(() => {
      M.ones([100]).mul(3);
      throw new Error("boom");
    }), /boom/);
  const t = M.ones([3]);
  t.dispose();
  t.dispose();
  assert.equal(memory().liveTensors, base.liveTensors, "tensors made before the throw are freed");
  assert.equal(memory().liveBytes, base.liveBytes);
});

Deno.test("tidy refuses an async fn: what it made before its await is freed, and its failure after the await is not an unhandled rejection", async () => {
  const base = memory();
  const late = Promise.withResolvers<void>();
  let failed: unknown = null;
  assert.throws(
    () =>
      tidy(async () => {
        const a = M.ones([4]).mul(2);
        await late.promise;
        try {
          return a.add(1); // a was freed with the refused scope
        } catch (e) {
          failed = e;
          throw e;
        }
      }),
    /tidy\(fn\) needs a synchronous fn/,
  );
  assert.equal(memory().liveTensors, base.liveTensors);
  late.resolve();
  await new Promise((r) => setTimeout(r, 0)); // fn's rest has run; its rejection must not be unhandled
  assert.match(String(failed), /was disposed and cannot be used/);
  assert.equal(memory().liveBytes, base.liveBytes);
});

Deno.test("graphs are released without tidy: a disposed output, a throwing tidy, a saved view disposed first", () => {
  const base = memory();
  const x = M.randn([64, 16], { seed: 1, requiresGrad: true });
  const w = M.ones([16], { requiresGrad: true });
  const withX = memory();
  // outputs disposed outside tidy: their nodes (and what the ops saved or made for themselves) go with them
  M.logsumexp(x, 1).dispose();
  M.rmsNorm(x, w, 1e-5).dispose();
  const h = x.exp(); // consumed by m, m by y: disposing h and m keeps their nodes until y's goes
  const m = h.mul(2);
  const y = m.sum();
  h.dispose();
  m.dispose();
  assert.ok(h.node, "h's node stays while y's node consumes h");
  y.dispose();
  assert.equal(h.node, null, "h's node goes with y's");
  assert.equal(memory().liveTensors, withX.liveTensors, "tensors after disposing the outputs");
  assert.equal(memory().savedBytes, withX.savedBytes, "saved bytes after disposing the outputs");
  // a tidy that throws releases its graph too
  assert.throws(() =>
    tidy(() => {
      x.mul(x).exp();
      throw new Error("boom");
    }), /boom/);
  assert.equal(memory().savedBytes, withX.savedBytes, "saved bytes after a throwing tidy");
  // a saved view of x (detach) disposed before its node is released still un-counts x's buffer
  const v = x.detach();
  const z = M.mul(v, w);
  v.dispose();
  z.dispose();
  assert.equal(memory().savedBytes, withX.savedBytes, "saved bytes after a saved view was disposed first");
  dispose([x, w]);
  assert.equal(memory().liveTensors, base.liveTensors);
  assert.equal(memory().liveBytes, base.liveBytes);
});

Deno.test("views share one buffer: counted once in liveBytes, freed with the last user", async () => {
  const base = memory();
  const t = M.arange(0, 1000, 1, { dtype: "f32" });
  const bytes = memory().liveBytes - base.liveBytes;
  assert.equal(bytes, 4096, "1000 f32 round up to a 4096-byte size class");
  const v = t.reshape(10, 100);
  assert.equal(memory().liveBytes - base.liveBytes, bytes, "a view allocates nothing");
  assert.equal(memory().liveTensors - base.liveTensors, 2);
  t.dispose();
  assert.equal(memory().liveBytes - base.liveBytes, bytes, "the view keeps the buffer");
  assert.equal((await v.toArray())[999], 999);
  v.dispose();
  assert.equal(memory().liveBytes, base.liveBytes);
});

Deno.test("the pool reuses freed buffers of the same size class; emptyPool empties it", () => {
  emptyPool();
  const base = memory();
  assert.equal(base.pooledBytes, 0);
  const a = M.zeros([5000]);
  a.dispose();
  const pooled = memory().pooledBytes;
  assert.ok(pooled >= 20000, `a freed 20000-byte tensor is pooled (${pooled})`);
  const b = M.zeros([5050]); // 20200 bytes: the same 256-byte size class as 20000
  assert.equal(memory().pooledBytes, 0, "reused from the pool");
  b.dispose();
  emptyPool();
  assert.equal(memory().pooledBytes, 0);
  M.resetPeak();
  assert.equal(memory().peakBytes, memory().liveBytes);
});

Deno.test("a custom op whose backward returns a gradient for an input that needs none does not leak", () => {
  const op = defineOp<null>({
    name: "mulBoth",
    forward: ([a, b], _, save) => {
      save(a, b);
      return a.mul(b);
    },
    backward: (g, [a, b]) => [g.mul(b), g.mul(a)], // always both, even if b needs no gradient
  });
  const x = M.randn([64], { seed: 8, requiresGrad: true });
  const c = M.randn([64], { seed: 9 });
  const base = memory();
  // No tidy around it: a tidy would dispose the stray gradient and hide a leak.
  const y = op([x, c], null);
  const loss = y.sum();
  loss.backward();
  dispose([y, loss]);
  x.grad!.dispose();
  x.grad = null;
  assert.equal(memory().liveTensors, base.liveTensors, "no tensor left behind");
  assert.equal(memory().savedBytes, base.savedBytes);
  for (const t of [x, c]) t.dispose();
});

Deno.test("bind groups are cached per pipeline and buffers, and dropped with the buffers the pool destroys", async () => {
  const { bindGroupCount, bindGroupKeyCount } = await import("../core/kernel.ts");
  const { sync } = await import("../core/executor.ts");
  emptyPool();
  await sync();
  const run = async () => {
    const x = tensor([1, 2, 3, 4, 5, 6], [2, 3]);
    const y = tidy(() => M.sum(M.mul(M.add(x, 1), x), -1));
    const out = [...await y.toArray()];
    dispose([x, y]);
    return out;
  };
  const first = await run();
  const counts = [bindGroupCount()];
  for (let i = 0; i < 6; i++) {
    assert.deepEqual(await run(), first);
    counts.push(bindGroupCount());
  }
  // Steady state: once the pool's buffers have met these ops, a step makes no new bind groups.
  const cached = counts.at(-1)!;
  assert.equal(counts.at(-2), cached, `a repeated step reuses its bind groups (${counts})`);
  assert.deepEqual(first, [2 + 6 + 12, 20 + 30 + 42]);
  // Destroying the pooled buffers drops their bind groups; results stay right with fresh buffers.
  emptyPool();
  await sync();
  assert.ok(bindGroupCount() < cached, `bind groups of destroyed buffers are dropped (${bindGroupCount()})`);
  assert.deepEqual(await run(), first);
  // A long-lived buffer (a parameter) bound with short-lived ones keeps no keys of their dropped groups.
  const w = tensor([1, 2, 3], [3]);
  emptyPool();
  await sync();
  const keysBefore = bindGroupKeyCount();
  for (let i = 0; i < 5; i++) {
    const t = M.randn([1000 + 100 * i]); // a new size class each time: fresh buffers, fresh groups
    dispose([tidy(() => M.mul(M.narrow(t, 0, 0, 3), w)), t]);
    emptyPool();
    await sync();
  }
  assert.equal(
    bindGroupKeyCount(),
    keysBefore,
    `keys left behind under the long-lived buffer (${keysBefore} before)`,
  );
  w.dispose();
});

Deno.test("a tensor larger than the device's largest buffer is a clear error naming its shape; size classes stay within it", () => {
  const limits = M.deviceInfo().limits;
  const real = limits.maxBufferSize;
  const base = memory();
  assert.throws(
    () => M.Tensor.empty([Math.ceil(real / 4) + 1]),
    new RegExp(
      `cannot allocate f32 \\[${
        Math.ceil(real / 4) + 1
      }\\]: \\d+ bytes is more than the device's largest buffer`,
    ),
  );
  // a request just under the limit whose size class (1/8 steps) would round past it
  limits.maxBufferSize = (1 << 20) + 1000;
  try {
    const t = M.Tensor.empty([((1 << 20) + 500) / 4]);
    assert.ok(t.storage.buffer.size <= limits.maxBufferSize, `buffer of ${t.storage.buffer.size} bytes`);
    t.dispose();
  } finally {
    limits.maxBufferSize = real;
  }
  assert.equal(memory().liveTensors, base.liveTensors);
});

Deno.test("disposing the end of a chain of 10^4 disposed tensors releases the whole graph without a stack overflow", () => {
  const w = M.randn([1], { seed: 1, requiresGrad: true });
  const before = memory();
  let y = w.mul(2); // mul saves w: savedBytes counts it until the chain is released
  for (let i = 0; i < 10_000; i++) {
    const next = y.add(1);
    y.dispose(); // consumed: its node stays until the chain's end goes
    y = next;
  }
  assert.ok(memory().savedBytes > before.savedBytes);
  y.dispose(); // it threw RangeError part-way, and savedBytes stayed counted
  const after = memory();
  assert.equal(after.savedBytes, before.savedBytes);
  assert.equal(after.liveTensors, before.liveTensors);
  assert.equal(after.liveBytes, before.liveBytes);
  w.dispose();
});

Deno.test("tidy frees the .grad of a leaf that fn disposed itself", () => {
  const x = M.randn([4, 8], { seed: 2 });
  const base = memory();
  for (let i = 0; i < 3; i++) {
    tidy(() => {
      const w = M.randn([8, 8], { seed: 1, requiresGrad: true });
      x.matmul(w).sum().backward();
      w.dispose(); // it left the scope, and its kept .grad with no owner leaked
    });
  }
  assert.equal(memory().liveTensors, base.liveTensors, "a disposed leaf's .grad outlived its tidy");
  assert.equal(memory().liveBytes, base.liveBytes);
  x.dispose();
});

Deno.test("a .grad returned from a nested tidy is no longer kept: the enclosing tidy frees it", async () => {
  const x = M.randn([4, 8], { seed: 2 });
  const base = memory();
  let sum = 0;
  for (let i = 0; i < 3; i++) {
    const s = tidy(() => {
      const g = tidy(() => {
        const w = M.randn([8, 8], { seed: 1, requiresGrad: true });
        x.matmul(w).sum().backward();
        return w.grad!; // stayed kept, in no scope: the enclosing tidy did not free it
      });
      assert.ok(!g.kept);
      return g.sum();
    });
    sum += await s.item();
    s.dispose();
  }
  assert.ok(sum !== 0);
  assert.equal(memory().liveTensors, base.liveTensors, "a returned .grad outlived the enclosing tidy");
  assert.equal(memory().liveBytes, base.liveBytes);
  x.dispose();
});
