/**
 * Renders the scan benchmark's charts (time vs L, vs d_model, vs d_state) as SVG into docs/, from
 * bench/results/scan.json (written by bench/scan_report.ts): each chart is a vega-lite spec, compiled to a
 * vega spec and rendered by vega's headless `View.toSVG()`. Both axes are logarithmic (base 2 for the
 * sizes), so equal ratios between the modes look like equal gaps. Where the report has the SSM part alone (the
 * d_model sweep since 2026-11-30), the d_model chart draws it too, dashed.
 *
 * Run: deno run -A bench/charts.ts [path/to/scan.json]
 * Writes docs/scan_time_vs_L.svg, docs/scan_time_vs_d_model.svg, docs/scan_time_vs_d_state.svg and the fused
 * forward's roofline, docs/scan_roofline.svg (each atomically: a failed run leaves the old charts whole); from a
 * report in a folder of bench/results/, e.g. bench/results/h200/scan.json, docs/scan_time_vs_L_h200.svg and so
 * on.
 */
import { dirname, join, relative, resolve } from "node:path";
import * as vega from "vega";
import * as vl from "vega-lite";
import { writeFileAtomic } from "../core/safetensors_fs.ts";
import { simpleCommandLine } from "../examples/lib/cli.ts";
import type { Row, ScanReport, TimeMode } from "./scan_report.ts";
import { REPO_ROOT, resultPath } from "./report_util.ts";

/** What a point times: the whole layer's step, or its SSM part alone (dashed). */
type Part = "whole layer" | "SSM part";

/** One point of a chart: a mode's median ms per step at one size. */
interface Point {
  size: number;
  mode: TimeMode;
  part: Part;
  ms: number;
  reps: number;
}

const MODE_ORDER: TimeMode[] = ["fused", "fused+recompute", "fused+chunked", "pscan", "sequential"];
const COLORS = ["#1b7837", "#7fbf7b", "#b8a200", "#c51b7d", "#2166ac"];

function points(
  rows: Row[],
  key: "L" | "dModel" | "N",
  modes: readonly TimeMode[],
  part: Part = "whole layer",
): Point[] {
  return rows.flatMap((r) =>
    modes.filter((m) => r.ms[m] !== undefined).map((m) => ({
      size: r[key],
      mode: m,
      part,
      ms: r.ms[m]!,
      reps: r.samples[m]?.length ?? 0,
    }))
  );
}

/** The vega-lite spec of one chart. */
export function chartSpec(title: string, subtitle: string, xTitle: string, data: Point[]): vl.TopLevelSpec {
  const sizes = [...new Set(data.map((p) => p.size))].sort((a, b) => a - b);
  const modes = MODE_ORDER.filter((m) => data.some((p) => p.mode === m));
  const parts: Part[] = ["whole layer", "SSM part"];
  const twoParts = data.some((p) => p.part === "SSM part");
  return {
    $schema: "https://vega.github.io/schema/vega-lite/v6.json",
    title: { text: title, subtitle, anchor: "start" },
    width: 460,
    height: 300,
    background: "white",
    data: { values: data },
    encoding: {
      x: {
        field: "size",
        type: "quantitative",
        title: xTitle,
        scale: { type: "log", base: 2, domain: [sizes[0], sizes[sizes.length - 1]] },
        axis: { values: sizes, format: "d", grid: true },
      },
      y: {
        field: "ms",
        type: "quantitative",
        title: "ms per training step (forward + backward)",
        scale: { type: "log" },
        axis: { grid: true },
      },
      color: {
        field: "mode",
        type: "nominal",
        title: "scan",
        scale: { domain: modes, range: modes.map((m) => COLORS[MODE_ORDER.indexOf(m)]) },
      },
      // a line per mode and part
      detail: { field: "part", type: "nominal" },
      tooltip: [
        { field: "mode", type: "nominal" },
        { field: "size", type: "quantitative", title: xTitle },
        { field: "ms", type: "quantitative", format: ".1f" },
        { field: "reps", type: "quantitative" },
      ],
    },
    layer: [
      {
        mark: { type: "line", strokeWidth: 2 },
        // the SSM part alone dashed, where the chart has it (in the line layer, so its legend draws lines)
        encoding: twoParts
          ? {
            strokeDash: {
              field: "part",
              type: "nominal",
              title: "timed",
              scale: { domain: parts, range: [[1, 0], [5, 3]] },
              legend: { symbolType: "stroke", symbolStrokeColor: "#555", symbolStrokeWidth: 2 },
            },
          }
          : {},
      },
      { mark: { type: "point", filled: true, size: 40 } },
    ],
  };
}

/** The roofline chart: the fused forward kernel's minimal bytes per second for each measured configuration,
 * against the copy bandwidth measured in the same run and half of it (the aim); beside each training
 * forward (every chunk state written), the inference forward (the last only) where the report timed it. */
export function rooflineSpec(rep: ScanReport, subtitle: string): vl.TopLevelSpec {
  const { copyGBs, rows } = rep.roofline;
  const bar = (config: string, forward: string, GBs: number) => ({
    config,
    forward,
    GBs,
    share: GBs / copyGBs,
  });
  const bars = rows.flatMap((r) => {
    const config = `d_model ${r.dModel}, N ${r.N}, L ${r.L}`;
    const inference = r.GBsInference === undefined ? [] : [bar(config, "inference", r.GBsInference)];
    return [bar(config, "training", r.GBs), ...inference];
  });
  const forwards = [...new Set(bars.map((b) => b.forward))];
  // a report without the inference forward draws one bar per config, as before it was timed
  const both = forwards.length > 1;
  const lines = [
    { what: `copy bandwidth, ${copyGBs.toFixed(1)} GB/s`, GBs: copyGBs },
    { what: "half of it (the aim)", GBs: copyGBs / 2 },
  ];
  const low = Math.min(...bars.map((b) => b.GBs)) / 2;
  const high = Math.max(copyGBs, ...bars.map((b) => b.GBs)) * 1.5; // a kernel may beat a 64 MiB copy (caches)
  const y = {
    field: "GBs",
    type: "quantitative" as const,
    title: "GB/s (minimal bytes: x, dt, z, B, C read once, y written)",
    scale: { type: "log" as const, domain: [low, high] },
    axis: { grid: true },
  };
  return {
    $schema: "https://vega.github.io/schema/vega-lite/v6.json",
    title: { text: "Fused forward kernel against the copy bandwidth (same run)", subtitle, anchor: "start" },
    width: 460,
    height: 300,
    background: "white",
    layer: [
      {
        data: { values: bars },
        mark: both ? { type: "bar" } : { type: "bar", color: "#1b7837" },
        encoding: {
          x: {
            field: "config",
            type: "nominal",
            sort: null,
            title: null,
            axis: { labelAngle: -30, labelLimit: 240 },
          },
          ...(both
            ? {
              xOffset: { field: "forward", type: "nominal", sort: forwards },
              color: {
                field: "forward",
                type: "nominal",
                sort: forwards,
                scale: { domain: forwards, range: ["#1b7837", "#7fbf7b"] },
                legend: { title: null, orient: "top", direction: "horizontal" },
              },
            }
            : {}),
          y,
          y2: { datum: low }, // bars from the bottom of the log scale (it has no zero)
          tooltip: [
            { field: "config", type: "nominal" },
            ...(both ? [{ field: "forward", type: "nominal" as const }] : []),
            { field: "GBs", type: "quantitative", format: ".2f" },
            { field: "share", type: "quantitative", format: ".1%", title: "of the copy bandwidth" },
          ],
        },
      },
      {
        data: { values: lines },
        mark: { type: "rule", strokeWidth: 2, color: "#555" },
        encoding: {
          y,
          strokeDash: {
            field: "what",
            type: "nominal",
            scale: { domain: lines.map((l) => l.what), range: [[1, 0], [5, 3]] },
            legend: null,
          },
        },
      },
      {
        // each rule named at its right end, above it
        data: { values: lines },
        mark: { type: "text", align: "right", baseline: "bottom", dy: -3, color: "#333" },
        encoding: { y, x: { value: 456 }, text: { field: "what" } },
      },
    ],
  };
}

/** Renders a vega-lite spec to an SVG string (headless vega view). */
export async function renderSvg(spec: vl.TopLevelSpec): Promise<string> {
  const view = new vega.View(vega.parse(vl.compile(spec).spec), { renderer: "none" });
  try {
    return await view.toSVG();
  } finally {
    view.finalize();
  }
}

const USAGE = `Usage: deno run -A bench/charts.ts [path/to/scan.json]

Renders docs/scan_time_vs_L.svg, docs/scan_time_vs_d_model.svg, docs/scan_time_vs_d_state.svg and
docs/scan_roofline.svg from a report of bench/scan_report.ts (default bench/results/scan.json). A report in a
folder of bench/results/ (bench/results/h200/scan.json) renders docs/scan_time_vs_L_h200.svg and so on.

  --help    this text`;

/** The charts of a report, by file name (in docs/, before a folder's suffix). */
export function reportCharts(rep: ScanReport): [string, vl.TopLevelSpec][] {
  const s = rep.sweeps;
  const quickMark = rep.quick ? " (--quick)" : "";
  const where = `${rep.adapter}, batch 1, one Mamba layer; medians${quickMark}`;
  return [
    [
      "scan_time_vs_L.svg",
      chartSpec(
        `Time vs sequence length (d_model ${s.L.fixed.dModel}, N ${s.L.fixed.N})`,
        where,
        "sequence length L",
        points(s.L.rows, "L", s.L.modes),
      ),
    ],
    [
      "scan_time_vs_d_model.svg",
      chartSpec(
        `Time vs d_model (N ${s.dModel.fixed.N}, L ${s.dModel.fixed.L})`,
        where,
        "d_model",
        [
          ...points(s.dModel.rows, "dModel", s.dModel.modes),
          ...(s.dModelSsm ? points(s.dModelSsm.rows, "dModel", s.dModelSsm.modes, "SSM part") : []),
        ],
      ),
    ],
    // (a report whose roofline measured nothing gets no such chart)
    ...(rep.roofline.rows.some((r) => r.GBs > 0)
      ? [["scan_roofline.svg", rooflineSpec(rep, `${rep.adapter}, batch 1, gated; medians${quickMark}`)] as [
        string,
        vl.TopLevelSpec,
      ]]
      : []),
    [
      "scan_time_vs_d_state.svg",
      chartSpec(
        `Time vs d_state (d_model ${s.dState.fixed.dModel}, L ${s.dState.fixed.L})`,
        where,
        "d_state N",
        points(s.dState.rows, "N", s.dState.modes),
      ),
    ],
  ];
}

/** The suffix of a report's chart files: a report from another adapter, in its own folder of bench/results/,
 * gets that folder's name (bench/results/h200/scan.json: `_h200`). */
export function chartSuffix(path: string): string {
  const folder = relative(join(REPO_ROOT, "bench", "results"), dirname(resolve(path)));
  return folder && !folder.startsWith("..") ? `_${folder.replaceAll(/[^A-Za-z0-9]+/g, "_")}` : "";
}

if (import.meta.main) {
  const path = simpleCommandLine(USAGE, [], "report").positional ?? resultPath("scan.json");
  const rep = JSON.parse(await Deno.readTextFile(path)) as ScanReport;
  const charts = reportCharts(rep);
  const suffix = chartSuffix(path);
  const docs = join(REPO_ROOT, "docs");
  await Deno.mkdir(docs, { recursive: true });
  for (const [name, spec] of charts) {
    const svg = await renderSvg(spec);
    const file = name.replace(".svg", `${suffix}.svg`);
    await writeFileAtomic(join(docs, file), svg + "\n");
    console.log(`docs/${file}: ${svg.length} bytes`);
  }
}
