/**
 * The loss curve as an SVG chart, drawn by vega-lite (compiled to a vega spec, rendered headless).
 * @module
 */

import * as vega from "vega";
import * as vl from "vega-lite";
import type { TrainLog } from "../../mamba/train.ts";

/** Points of extra curves to draw beside ours (e.g. a reference run). */
export interface ReferenceCurve {
  /** Legend label. */
  name: string;
  /** [step, loss] */
  points: [number, number][];
}

/** Renders train and validation loss against step; `refs` adds reference curves (examples/train.ts draws
 * none; examples/loss_vs_pytorch.ts adds PyTorch mamba.py's validation loss for docs/loss_vs_pytorch.svg);
 * `unit` is what a loss is per: "char" for a char model, "token" for a tokenizer's ids. */
export async function lossChartSVG(
  log: TrainLog,
  refs: ReferenceCurve[] = [],
  title = "loss",
  unit: "char" | "token" = "char",
): Promise<string> {
  const values = [
    ...log.train.map(([step, loss]) => ({ step, loss, curve: "train (mamba.ts)" })),
    ...log.val.map(([step, loss]) => ({ step, loss, curve: "validation (mamba.ts)" })),
    ...refs.flatMap((r) => r.points.map(([step, loss]) => ({ step, loss, curve: r.name }))),
  ];
  const spec: vl.TopLevelSpec = {
    $schema: "https://vega.github.io/schema/vega-lite/v6.json",
    title,
    width: 560,
    height: 320,
    data: { values },
    mark: { type: "line", point: { size: 12 } },
    encoding: {
      x: { field: "step", type: "quantitative", title: "step" },
      y: {
        field: "loss",
        type: "quantitative",
        title: `cross-entropy (nats/${unit})`,
        scale: { zero: false },
      },
      color: { field: "curve", type: "nominal", title: null },
    },
  };
  const view = new vega.View(vega.parse(vl.compile(spec).spec), { renderer: "none" });
  const svg = await view.toSVG();
  view.finalize();
  return svg;
}
