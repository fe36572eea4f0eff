/**
 * The floor under the runtime's host time: what Deno's WebGPU itself costs per dispatch, with none of
 * mamba.ts in the way. A bare loop records `n` dispatches of one tiny kernel (a uniform at a dynamic offset,
 * as the runtime binds it, and `buffers` storage buffers per bind group, 32 bind groups in turn), optionally
 * breaking the compute pass for a copy every `copyEvery` dispatches (as the runtime's copies and clears do),
 * then finishes, submits and waits. Per configuration it prints the medians of 19 rounds (20, the first untimed): creating the command
 * encoder (after the wait for the previous round's submission), recording per dispatch, `finish` per
 * dispatch, and `submit`.
 *
 * Against `hostMs` in bench/scan_report.ts this says how much of a step's host time is the WebGPU
 * implementation's and how much is ours. On lavapipe (2 cores, Deno 2.9.6, two runs): recording 0.4-0.7 us
 * per dispatch (1.1 us with a copy every third); `finish` 0.8-1.6 us per dispatch with one buffer, 1.4-1.7 us
 * with eight, 3.2-3.3 us with eight and a copy every third dispatch; the encoder 20-170 us.
 *
 * Run: deno run -A bench/webgpu_floor.ts
 * @module
 */

import { simpleCommandLine } from "../examples/lib/cli.ts";
import { median } from "./report_util.ts";

simpleCommandLine("Usage: deno run -A bench/webgpu_floor.ts\n\n  --help    this text (no other flags)");

/** One configuration of the loop. */
interface FloorCase {
  /** Dispatches per submission. */
  n: number;
  /** Storage buffers per bind group. */
  buffers: number;
  /** A copy (which ends the compute pass) every this many dispatches; 0 for none. */
  copyEvery: number;
}

const CASES: FloorCase[] = [
  { n: 67, buffers: 1, copyEvery: 0 },
  { n: 500, buffers: 1, copyEvery: 0 },
  { n: 500, buffers: 8, copyEvery: 0 },
  { n: 500, buffers: 8, copyEvery: 3 },
];
const ROUNDS = 20;
const ELEMS = 4096;

const adapter = await navigator.gpu?.requestAdapter({ powerPreference: "high-performance" });
if (!adapter) {
  console.log("no WebGPU adapter");
  Deno.exit(1);
}
const device = await adapter.requestDevice({ requiredLimits: { maxStorageBuffersPerShaderStage: 8 } });

/** The pipeline and bind groups of a case: each invocation adds 1 to its element of every buffer. */
function setUp(buffers: number) {
  const decls = Array.from(
    { length: buffers },
    (_, i) => `@group(0) @binding(${i + 1}) var<storage, read_write> a${i}: array<f32>;`,
  ).join("\n");
  const adds = Array.from({ length: buffers }, (_, i) => `a${i}[g.x] += 1.0;`).join(" ");
  const module = device.createShaderModule({
    code: `struct P { n: u32 }
@group(0) @binding(0) var<uniform> p: P;
${decls}
@compute @workgroup_size(64) fn main(@builtin(global_invocation_id) g: vec3<u32>) {
  if (g.x < p.n) { ${adds} }
}`,
  });
  const layout = device.createBindGroupLayout({
    entries: [
      { binding: 0, visibility: GPUShaderStage.COMPUTE, buffer: { type: "uniform", hasDynamicOffset: true } },
      ...Array.from({ length: buffers }, (_, i) => ({
        binding: i + 1,
        visibility: GPUShaderStage.COMPUTE,
        buffer: { type: "storage" as const },
      })),
    ],
  });
  const pipeline = device.createComputePipeline({
    layout: device.createPipelineLayout({ bindGroupLayouts: [layout] }),
    compute: { module, entryPoint: "main" },
  });
  const align = device.limits.minUniformBufferOffsetAlignment;
  const uniforms = device.createBuffer({
    size: 512 * align,
    usage: GPUBufferUsage.UNIFORM | GPUBufferUsage.COPY_DST,
  });
  device.queue.writeBuffer(uniforms, 0, new Uint32Array(128 * align).fill(ELEMS));
  const storage = Array.from({ length: 64 }, () =>
    device.createBuffer({
      size: 4 * ELEMS,
      usage: GPUBufferUsage.STORAGE | GPUBufferUsage.COPY_SRC | GPUBufferUsage.COPY_DST,
    }));
  const groups = Array.from({ length: 32 }, (_, j) =>
    device.createBindGroup({
      layout,
      entries: [
        { binding: 0, resource: { buffer: uniforms, offset: 0, size: 16 } },
        ...Array.from({ length: buffers }, (_, i) => ({
          binding: i + 1,
          resource: { buffer: storage[(3 * j + 7 * i) % storage.length] },
        })),
      ],
    }));
  return { pipeline, groups, storage, align };
}

/** Medians in microseconds: encoder creation, recording per dispatch, finish per dispatch, submit. */
async function measure(c: FloorCase): Promise<[number, number, number, number]> {
  const { pipeline, groups, storage, align } = setUp(c.buffers);
  const offset = new Uint32Array(1);
  const enc: number[] = [], rec: number[] = [], fin: number[] = [], sub: number[] = [];
  for (let r = 0; r < ROUNDS; r++) {
    const t0 = performance.now();
    const encoder = device.createCommandEncoder();
    const t1 = performance.now();
    let pass = encoder.beginComputePass();
    for (let i = 0; i < c.n; i++) {
      if (c.copyEvery && i % c.copyEvery === c.copyEvery - 1) {
        pass.end();
        encoder.copyBufferToBuffer(storage[i % 64], 0, storage[(i + 1) % 64], 0, 1024);
        pass = encoder.beginComputePass();
      }
      pass.setPipeline(pipeline);
      offset[0] = (i % 512) * align;
      pass.setBindGroup(0, groups[i % groups.length], offset, 0, 1);
      pass.dispatchWorkgroups(ELEMS / 64);
    }
    pass.end();
    const t2 = performance.now();
    const commands = encoder.finish();
    const t3 = performance.now();
    device.queue.submit([commands]);
    const t4 = performance.now();
    await device.queue.onSubmittedWorkDone();
    if (r === 0) continue; // the first round compiles and allocates
    enc.push(1000 * (t1 - t0));
    rec.push((1000 * (t2 - t1)) / c.n);
    fin.push((1000 * (t3 - t2)) / c.n);
    sub.push(1000 * (t4 - t3));
  }
  for (const b of storage) b.destroy();
  return [median(enc), median(rec), median(fin), median(sub)];
}

const info = adapter.info;
console.log(`adapter: ${info.vendor} ${info.architecture} ${info.device} ${info.description}`.trim());
console.log(
  "\n| dispatches | buffers bound | copy every | encoder µs | record µs / dispatch | finish µs / dispatch | submit µs |",
);
console.log("| ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
for (const c of CASES) {
  const [e, r, f, s] = await measure(c);
  const copies = c.copyEvery ? `${c.copyEvery}` : "-";
  console.log(
    `| ${c.n} | ${c.buffers} | ${copies} | ${e.toFixed(0)} | ${r.toFixed(2)} | ${f.toFixed(2)} | ${
      s.toFixed(0)
    } |`,
  );
}
device.destroy();
