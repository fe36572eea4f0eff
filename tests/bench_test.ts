// The benchmarks' own arithmetic (bench/): how they size the batches of steps that one wait for the GPU
// ends, checked against a model of a step's time s and a wait's w (n steps and one wait take n s + w), with
// the H200's times (s 0.05-6.5 ms, w 11.4 ms), where the batch sizes decide how much of a measured step is
// the wait.
import assert from "node:assert/strict";
import { batchSize, refineStepMs, stepMsWithoutWait, stepsPerWait } from "../bench/scan_report.ts";

/** ms per step of n steps and one wait, as timeSteps gives it, for steps of s ms and a wait of w ms. */
const model = (s: number, w: number) => (n: number) => Promise.resolve(s + w / n);

Deno.test("stepsPerWait: a batch of fast steps lasts the batch time, so the wait stays a few percent", () => {
  // 0.05: the roofline's calls on the H200; 0.235: its fused SSM part; 6.5: its fused layer at d_model 1024
  for (const batchMs of [250, 500]) {
    for (const s of [0.05, 0.235, 0.5, 6.5, 25]) {
      const k = stepsPerWait(batchMs, s);
      assert.ok(
        Math.abs(k * s - batchMs) <= 0.1 * batchMs,
        `${k} steps of ${s} ms for a batch of ${batchMs} ms`,
      );
      assert.ok(11.4 / (k * s + 11.4) < 0.05, `a wait of 11.4 ms after ${k} steps of ${s} ms`);
    }
  }
  assert.equal(stepsPerWait(250, 400), 1);
  assert.equal(stepsPerWait(250, 400, 4), 4);
});

Deno.test("stepMsWithoutWait: the step's time net of the wait, an upper bound where t1 was slow", async () => {
  for (const [s, w] of [[0.5, 11.4], [6.5, 14], [20, 11.4]]) {
    const time = model(s, w);
    assert.ok(Math.abs((await stepMsWithoutWait(time, await time(1))) - s) < 1e-9, `s ${s}, w ${w}`);
  }
  // t1 slower than 8 steps (a first call that compiled its kernels): the batch must not grow past the batch
  // time, as it did with the floor of 1e-3 ms (256 steps of 20 ms per wait, 5 s)
  const time = model(20, 11.4);
  const est = await stepMsWithoutWait(time, 3000);
  assert.ok(est >= 20, `estimate ${est} ms for steps of 20 ms`);
  assert.ok(stepsPerWait(250, est) * 20 <= 250 * 1.1, `${stepsPerWait(250, est)} steps of 20 ms`);
});

Deno.test("batchSize: batches of about the batch time from the step's time net of the wait", async () => {
  // a 64 MiB copy on the H200 (0.03 ms; sized by 32 copies with their wait, a batch held 20 ms of copies),
  // the roofline's calls there, a fused layer step there and on lavapipe
  for (const [s, w] of [[0.031, 11.4], [0.05, 11.4], [0.5, 14], [4, 11]]) {
    let calls = 0;
    // the first call compiles its kernels: in t1 it would hide the step's time
    const time = (n: number) => calls++ === 0 ? Promise.resolve(3000) : model(s, w)(n);
    const k = await batchSize(time, 500, 8);
    assert.ok(Math.abs(k * s - 500) <= 50, `${k} steps of ${s} ms (wait ${w} ms) for a batch of 500 ms`);
  }
});

Deno.test("refineStepMs: a jittery wait that made the 8-step estimate 4-5x a step gives a batch near its time", async () => {
  // every wait after the first single step is slow (25 ms against 11.4): over 8 steps that reads as 1.9 ms
  // more per step, over a batch's steps as hardly any (the H200's estimates came out 2.5-3x)
  for (const s of [0.235, 0.5]) {
    let calls = 0;
    const time = (n: number) => Promise.resolve(s + (calls++ === 0 ? 11.4 : 25) / n);
    const est = await stepMsWithoutWait(time, await time(1));
    assert.ok(est > 4 * s, `the first estimate ${est} for steps of ${s} ms`);
    const k = stepsPerWait(250, await refineStepMs(time, est, 250));
    assert.ok(Math.abs(k * s - 250) <= 0.15 * 250, `${k} steps of ${s} ms for a batch of 250 ms`);
    assert.ok(stepsPerWait(250, est) * s < 0.3 * 250, "without the second estimate: batches of a fifth");
  }
  // an estimate that gives 8 steps or fewer is kept (nothing to gain, and a slow step's batch stays short)
  assert.equal(await refineStepMs(() => Promise.reject(new Error("not called")), 40, 250), 40);
});
