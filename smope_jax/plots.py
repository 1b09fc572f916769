"""PNG figures of a run: the accuracy matrix and the experts' usage.

Figures are built on `matplotlib.figure.Figure` with the Agg canvas, never
pyplot, so nothing needs a display or changes matplotlib's global backend.
They are written through epath, so `path` may be on `gs://`.
"""

from __future__ import annotations

import io
import math
from typing import Any

from etils import epath
from matplotlib.backends import backend_agg
from matplotlib import colormaps
from matplotlib import figure as mpl_figure
from matplotlib import lines as mpl_lines
import numpy as np


def _write_png(fig: mpl_figure.Figure, path: epath.PathLike) -> epath.Path:
  backend_agg.FigureCanvasAgg(fig)
  buffer = io.BytesIO()
  fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
  path = epath.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_bytes(buffer.getvalue())
  return path


def plot_accuracy_matrix(acc: Any, path: epath.PathLike,
                         title: str | None = None) -> epath.Path:
  """Heatmap of A[t][j] (percent) with the value in each cell; NaN is blank."""
  acc = np.asarray(acc, dtype=np.float64)
  num_tasks = acc.shape[0]
  side = max(4.0, 0.55 * num_tasks + 2.0)
  fig = mpl_figure.Figure(figsize=(side + 1.0, side))
  ax = fig.add_subplot()
  cmap = colormaps["viridis"].with_extremes(bad="white")
  image = ax.imshow(np.ma.masked_invalid(acc), cmap=cmap, vmin=0.0, vmax=100.0)
  fontsize = 9 if num_tasks <= 10 else 7
  for (t, j), value in np.ndenumerate(acc):
    if not np.isnan(value):
      # Dark text on the bright (high) end of viridis, light text elsewhere.
      color = "black" if value > 60.0 else "white"
      ax.text(j, t, f"{value:.1f}", ha="center", va="center", color=color,
              fontsize=fontsize)
  # Tasks are numbered from 1, as in the log.
  ax.set_xticks(range(num_tasks), [str(j + 1) for j in range(num_tasks)])
  ax.set_yticks(range(num_tasks), [str(t + 1) for t in range(num_tasks)])
  ax.set_xlabel("evaluated task j")
  ax.set_ylabel("after training task t")
  if title:
    ax.set_title(title)
  fig.colorbar(image, ax=ax, label="accuracy (%)", shrink=0.8)
  return _write_png(fig, path)


def plot_expert_frequencies(counts: Any, path: epath.PathLike, *, top_k: int,
                            frequent: Any = None,
                            title: str | None = None) -> epath.Path:
  """How often each expert was chosen, per prompted layer and head.

  Args:
    counts: int array (L, H, E): how often each expert was in a sample's
      clean top-K during the counting passes.
    path: where to write the PNG.
    top_k: K; each counted sample adds K to every head's counts.
    frequent: bool array (L, H, E) of the experts marked frequently used,
      drawn with a cross.
    title: the figure's title.

  Returns:
    `path` as an epath.Path. The colour is the fraction of counted samples
    that chose the expert, on a fixed 0..1 scale, so that figures of
    different runs and tasks compare.
  """
  counts = np.asarray(counts, dtype=np.float64)
  if counts.ndim != 3:
    raise ValueError(f"counts must be (layers, heads, experts), got shape "
                     f"{counts.shape}.")
  num_layers, num_heads, num_experts = counts.shape
  samples = counts.sum(axis=-1, keepdims=True) / top_k
  fractions = np.divide(counts, samples, out=np.zeros_like(counts),
                        where=samples > 0)
  ncols = min(num_layers, 3)
  nrows = math.ceil(num_layers / ncols)
  panel_w = max(3.0, 0.22 * num_experts + 1.0)
  panel_h = max(2.0, 0.22 * num_heads + 1.0)
  fig = mpl_figure.Figure(
      figsize=(ncols * panel_w + 1.2, nrows * panel_h + 0.6),
      layout="constrained")
  axes = fig.subplots(nrows, ncols, squeeze=False)
  image = None
  for layer, ax in enumerate(axes.flat):
    if layer >= num_layers:
      ax.set_axis_off()
      continue
    image = ax.imshow(fractions[layer], cmap="magma", vmin=0.0, vmax=1.0,
                      aspect="auto", interpolation="nearest")
    if frequent is not None:
      heads, experts = np.nonzero(np.asarray(frequent)[layer])
      ax.scatter(experts, heads, marker="x", s=18, c="cyan", linewidths=1.0)
    ax.set_title(f"block {layer}", fontsize=10)
    ax.set_xlabel("expert")
    ax.set_ylabel("head")
    ax.set_xticks(range(0, num_experts, max(num_experts // 8, 1)))
    ax.set_yticks(range(num_heads))
  fig.colorbar(
      image, ax=axes,
      label=f"fraction of samples with the expert in their top-{top_k}")
  if title:
    fig.suptitle(
        title +
        ("   (x: marked frequently used)" if frequent is not None else ""),
        fontsize=10)
  return _write_png(fig, path)


def plot_comparison(record: dict, path: epath.PathLike) -> epath.Path:
  """Accuracy against inference cost, one panel per benchmark.

  Our runs are filled markers with the std over seeds as error bars, one
  colour per method (in the legend); the published FAA of the same method is
  a hollow marker at the same cost.
  """
  benchmarks = record["benchmarks"]
  fig = mpl_figure.Figure(figsize=(6.0 * len(benchmarks), 4.6),
                          layout="constrained")
  axes = fig.subplots(1, len(benchmarks), squeeze=False)[0]
  colors = colormaps["tab10"]
  for ax, entry in zip(axes, benchmarks):
    for i, row in enumerate(entry["rows"]):
      x, faa = row["inference_gflops_per_image"], row["faa"]
      color, label = colors(i % 10), row["label"]
      ax.errorbar(x, faa["mean"], yerr=faa["std"], fmt="o", color=color,
                  capsize=3, markersize=7, label=label)
      for published in row["published_faa"][:1]:
        ax.scatter(x, published["mean"], s=60, facecolors="none",
                   edgecolors=color, linewidths=1.5)
    ax.set_xlabel("inference GFLOPs per image (XLA)")
    ax.set_ylabel("final average accuracy (%)")
    ax.set_title(entry["benchmark"], fontsize=10)
    ax.grid(alpha=0.3)
    ax.margins(x=0.25, y=0.15)
    handles, _ = ax.get_legend_handles_labels()
    if any(row["published_faa"] for row in entry["rows"]):
      handles += [
          mpl_lines.Line2D([], [], marker="o", linestyle="none",
                           markerfacecolor="none", color="gray",
                           label="published FAA")
      ]
    ax.legend(handles=handles, loc="best", fontsize=8)
  return _write_png(fig, path)
