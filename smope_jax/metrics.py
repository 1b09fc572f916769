"""Continual-learning metrics computed from the accuracy matrix.

`A[t][j]` is the top-1 accuracy in percent (0..100) on the test set of task j
after training task t; entries with j > t are NaN. Rows after the last task
trained so far may be all NaN (a run in progress): every function here looks
only at the tasks trained so far, so it can be called after any task.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np

# Display names, in table order, of the per-run scalars `summarize` returns.
METRIC_NAMES = {
    "faa": "FAA",
    "caa": "CAA",
    "ffm": "FFM",
    "ffm_hide": "FFM (HiDe)",
    "faa_sample_weighted": "FAA (sample-weighted)",
}


def _trained_part(acc: Any) -> np.ndarray:
  """Validated (T, T) float copy over the tasks trained so far, NaN above."""
  acc = np.array(acc, dtype=np.float64)
  if acc.ndim != 2 or acc.shape[0] != acc.shape[1] or acc.shape[0] == 0:
    raise ValueError(f"Accuracy matrix must be square and non-empty, got "
                     f"shape {acc.shape}.")
  trained = ~np.all(np.isnan(acc), axis=1)
  num_tasks = int(np.max(np.nonzero(trained)[0], initial=-1)) + 1
  if num_tasks == 0:
    raise ValueError("Accuracy matrix has no evaluated task.")
  acc = acc[:num_tasks, :num_tasks]
  lower = np.tril(np.ones_like(acc, dtype=bool))
  if np.any(np.isnan(acc[lower])):
    t, j = np.argwhere(np.isnan(acc) & lower)[0]
    raise ValueError(f"Accuracy matrix lacks A[{t}][{j}] (task {j} after "
                     f"training task {t}).")
  acc[~lower] = np.nan
  return acc


def average_accuracy_per_step(acc: Any) -> np.ndarray:
  """Mean over the seen tasks after each task t: mean_{j<=t} A[t][j]."""
  acc = _trained_part(acc)
  return np.array([acc[t, :t + 1].mean() for t in range(acc.shape[0])])


def final_average_accuracy(acc: Any) -> float:
  """FAA: mean over tasks j of A[T-1][j]."""
  return float(average_accuracy_per_step(acc)[-1])


def cumulative_average_accuracy(acc: Any) -> float:
  """CAA: mean over t of the average accuracy after task t."""
  return float(average_accuracy_per_step(acc).mean())


def final_forgetting(acc: Any) -> float:
  """FFM (the paper's): mean_{j<T-1} (max_{t<T-1} A[t][j] - A[T-1][j]).

  The best earlier accuracy excludes the last row, so forgetting can be
  negative when a task improved at the end. 0 for a single task.
  """
  acc = _trained_part(acc)
  if acc.shape[0] == 1:
    return 0.0
  best = np.nanmax(acc[:-1, :-1], axis=0)
  return float(np.mean(best - acc[-1, :-1]))


def final_forgetting_hide(acc: Any) -> float:
  """FFM as HiDe-Prompt's code computes it: the max includes the last row.

  So each task contributes max_{t<=T-1} A[t][j] - A[T-1][j] >= 0.
  """
  acc = _trained_part(acc)
  if acc.shape[0] == 1:
    return 0.0
  best = np.nanmax(acc[:, :-1], axis=0)
  return float(np.mean(best - acc[-1, :-1]))


def sample_weighted_accuracy(correct_counts: Sequence[int],
                             totals: Sequence[int]) -> float:
  """Accuracy in percent over all test images of the seen tasks together.

  Differs from FAA when tasks have test sets of different sizes (ImageNet-R).
  """
  correct = np.asarray(correct_counts, dtype=np.float64)
  totals = np.asarray(totals, dtype=np.float64)
  if correct.shape != totals.shape or totals.sum() <= 0:
    raise ValueError("Need one correct count and one positive total per task.")
  return float(100.0 * correct.sum() / totals.sum())


def _json_float(value: float) -> float | None:
  value = float(value)
  return None if math.isnan(value) else value


def summarize(acc: Any, test_sizes: Sequence[int] | None = None) -> dict:
  """All metrics of one run as a JSON-serialisable dict.

  Args:
    acc: the (T, T) accuracy matrix, possibly with untrained rows all NaN.
    test_sizes: number of test images of each task (length T); adds
      'faa_sample_weighted', the final accuracy over all test images.

  Returns:
    {'num_tasks': tasks trained so far, 'acc_matrix': list of lists with None
    for NaN, 'avg_acc_per_step': mean accuracy over seen tasks after each
    task, 'faa', 'caa', 'ffm', 'ffm_hide'[, 'faa_sample_weighted']}.
  """
  matrix = _trained_part(acc)
  num_tasks = matrix.shape[0]
  full = np.full(np.shape(acc), np.nan)
  full[:num_tasks, :num_tasks] = matrix
  summary = {
      "num_tasks": num_tasks,
      "acc_matrix": [[_json_float(v) for v in row] for row in full],
      "avg_acc_per_step": [float(v) for v in average_accuracy_per_step(matrix)],
      "faa": final_average_accuracy(matrix),
      "caa": cumulative_average_accuracy(matrix),
      "ffm": final_forgetting(matrix),
      "ffm_hide": final_forgetting_hide(matrix),
  }
  if test_sizes is not None:
    sizes = np.asarray(test_sizes, dtype=np.float64)[:num_tasks]
    summary["faa_sample_weighted"] = sample_weighted_accuracy(
        matrix[-1] * sizes / 100.0, sizes)
  return summary


def summarize_seeds(summaries: Sequence[dict]) -> dict:
  """Mean and standard deviations over runs (seeds) of each scalar metric.

  `std` is the population standard deviation (ddof 0), the paper's
  convention (NumPy's `.std()` in the reference); `sample_std` (ddof 1) is
  given beside it. Both are 0.0 for a single run.

  Returns:
    {'num_seeds': n, METRIC: {'mean', 'std', 'sample_std', 'values'}, ...}
    for each METRIC of METRIC_NAMES present in every summary.
  """
  if not summaries:
    raise ValueError("Need at least one run summary.")
  result = {"num_seeds": len(summaries)}
  for name in METRIC_NAMES:
    if not all(name in s for s in summaries):
      continue
    values = np.array([s[name] for s in summaries], dtype=np.float64)
    sample = values.std(ddof=1) if len(values) > 1 else 0.0
    result[name] = {
        "mean": float(values.mean()),
        "std": float(values.std()),
        "sample_std": float(sample),
        "values": [float(v) for v in values]
    }
  return result


def format_seed_table(seed_summary: dict, digits: int = 2) -> str:
  """Markdown table: metric, mean +- std (ddof 0), sample std, per-seed."""
  lines = [
      "| metric | mean +- std (ddof 0, as the paper) | sample std "
      "(ddof 1) | per-seed values |", "|---|---|---|---|"
  ]
  for name, label in METRIC_NAMES.items():
    if name not in seed_summary:
      continue
    stats = seed_summary[name]
    values = ", ".join(f"{v:.{digits}f}" for v in stats["values"])
    lines.append(f"| {label} | {stats['mean']:.{digits}f} +- "
                 f"{stats['std']:.{digits}f} | {stats['sample_std']:.{digits}f}"
                 f" | {values} |")
  return "\n".join(lines) + "\n"
