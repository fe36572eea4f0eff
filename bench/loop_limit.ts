/**
 * How many trips a loop in one invocation makes on this adapter: one workgroup whose invocations each count a
 * loop of n trips (n read from a uniform at run time), for n around 65535 and past it, in workgroups of 1, 8
 * and 32. Software adapters (llvmpipe, through Vulkan and GL) stop an invocation's loops silently at 65535
 * trips; the kernels here are written so that none runs more (README, "How it executes"). A hardware GPU
 * should print every n back.
 *
 * Measured on lavapipe (2026-11-30): 65535 for every n from 65535 on, at 4, 8 and 16 lanes
 * (`LP_NATIVE_VECTOR_WIDTH=128`, `256`, `512`) and through GL alike, in every workgroup size: the limit does
 * not depend on the subgroup width.
 *
 * Run: deno run -A bench/loop_limit.ts   (software adapter on Linux: DENO_WEBGPU_BACKEND=vulkan
 * XDG_RUNTIME_DIR=<private dir>; LP_NATIVE_VECTOR_WIDTH=128 or 512 for 4 or 16 lanes)
 * @module
 */

import { simpleCommandLine } from "../examples/lib/cli.ts";

simpleCommandLine("Usage: deno run -A bench/loop_limit.ts\n\n  --help    this text (no other flags)");

const adapter = await navigator.gpu.requestAdapter();
if (!adapter) throw new Error("loop_limit: no WebGPU adapter");
const device = await adapter.requestDevice();

/** One workgroup of `wg` invocations, each counting a loop of n trips; returns each invocation's count. */
async function tripsPerInvocation(wg: number, n: number): Promise<number[]> {
  const code = `
@group(0) @binding(0) var<storage, read_write> out: array<u32>;
struct U { n: u32 }
@group(0) @binding(1) var<uniform> u: U;
@compute @workgroup_size(${wg}) fn main(@builtin(local_invocation_index) i: u32) {
  var c = 0u;
  for (var k = 0u; k < u.n; k++) { c += 1u; }
  out[i] = c;
}`;
  const pipeline = device.createComputePipeline({
    layout: "auto",
    compute: { module: device.createShaderModule({ code }), entryPoint: "main" },
  });
  const bytes = 4 * wg;
  const out = device.createBuffer({ size: bytes, usage: GPUBufferUsage.STORAGE | GPUBufferUsage.COPY_SRC });
  const uniforms = device.createBuffer({ size: 16, usage: GPUBufferUsage.UNIFORM | GPUBufferUsage.COPY_DST });
  const readback = device.createBuffer({
    size: bytes,
    usage: GPUBufferUsage.MAP_READ | GPUBufferUsage.COPY_DST,
  });
  device.queue.writeBuffer(uniforms, 0, new Uint32Array([n, 0, 0, 0]));
  const bindGroup = device.createBindGroup({
    layout: pipeline.getBindGroupLayout(0),
    entries: [{ binding: 0, resource: { buffer: out } }, { binding: 1, resource: { buffer: uniforms } }],
  });
  const encoder = device.createCommandEncoder();
  const pass = encoder.beginComputePass();
  pass.setPipeline(pipeline);
  pass.setBindGroup(0, bindGroup);
  pass.dispatchWorkgroups(1);
  pass.end();
  encoder.copyBufferToBuffer(out, 0, readback, 0, bytes);
  device.queue.submit([encoder.finish()]);
  await readback.mapAsync(GPUMapMode.READ);
  const counts = Array.from(new Uint32Array(readback.getMappedRange().slice(0)));
  readback.unmap();
  for (const b of [out, uniforms, readback]) b.destroy();
  return counts;
}

const info = adapter.info;
console.log([info.vendor, info.architecture, info.description].filter(Boolean).join(" "));
console.log("| workgroup | n | trips per invocation |");
console.log("|---:|---:|---|");
for (const wg of [1, 8, 32]) {
  for (const n of [65534, 65535, 65536, 70000, 200000]) {
    const counts = [...new Set(await tripsPerInvocation(wg, n))];
    console.log(
      `| ${wg} | ${n} | ${counts.join(", ")}${
        counts.length === 1 && counts[0] !== n ? " (cut short)" : ""
      } |`,
    );
  }
}
