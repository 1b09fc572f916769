"""What a run leaves in its workdir and shows on the terminal.

Only process 0 writes: `config.json`, `metrics.json`, TensorBoard events,
the PNG plots and the progress bar. Other processes get no-op writers.
"""

import json
import sys

import numpy as np
import tensorflow as tf

from smope_jax import metrics, plots


def write_json(path: str, payload) -> None:
  """Writes JSON atomically (temp file + rename); works for gs:// paths."""
  tmp = path + ".tmp"
  with tf.io.gfile.GFile(tmp, "w") as f:
    json.dump(payload, f, indent=2, sort_keys=True)
  tf.io.gfile.rename(tmp, path, overwrite=True)


def read_json(path: str):
  with tf.io.gfile.GFile(path) as f:
    return json.load(f)


class Progress:
  """A one-line progress bar on stderr: phase, step, loss, accuracy, img/s."""

  def __init__(self, enabled: bool):
    # Only on a terminal: redirected output gets the log lines instead.
    self.enabled = enabled and sys.stderr is not None and sys.stderr.isatty()
    self._last_len = 0

  def update(self, label: str, step: int, total: int, values: dict) -> None:
    if not self.enabled:
      return
    width = 24
    filled = int(width * step / max(total, 1))
    bar = "#" * filled + "." * (width - filled)
    fields = " ".join(f"{k} {v:.4g}" for k, v in values.items())
    line = f"\r{label} [{bar}] {step}/{total} {fields}"
    sys.stderr.write(line.ljust(self._last_len))
    sys.stderr.flush()
    self._last_len = len(line)

  def close(self) -> None:
    if self.enabled and self._last_len:
      sys.stderr.write("\n")
      sys.stderr.flush()
      self._last_len = 0


class Reporter:
  """Scalars, metrics and plots of one run (a no-op off process 0)."""

  def __init__(self, workdir: str, enabled: bool, progress: bool):
    self.workdir = workdir
    self.enabled = enabled
    self.progress = Progress(enabled and progress)
    self._writer = (tf.summary.create_file_writer(workdir) if enabled
                    else None)

  def write_config(self, config) -> None:
    if self.enabled:
      write_json(f"{self.workdir}/config.json", config.to_dict())

  def scalars(self, step: int, values: dict, prefix: str = "") -> None:
    if not self.enabled:
      return
    with self._writer.as_default():
      for name, value in values.items():
        tf.summary.scalar(prefix + name, float(value), step=step)
    self._writer.flush()

  def task_report(self, summary: dict) -> None:
    """Writes metrics.json and, from the same summary, the plots."""
    if not self.enabled:
      return
    write_json(f"{self.workdir}/metrics.json", summary)
    matrix = np.array([[np.nan if v is None else v for v in row]
                       for row in summary["acc_matrix"]], np.float64)
    plots.plot_accuracy_matrix(matrix, f"{self.workdir}/accuracy_matrix.png",
                               title=f"Accuracy (%) - FAA {summary['faa']:.2f}")
    if "expert_counts" in summary:
      plots.plot_expert_frequencies(np.asarray(summary["expert_counts"]),
                                    f"{self.workdir}/expert_frequencies.png")

  def seed_report(self, summaries: list[dict], seeds: list[int]) -> None:
    if not self.enabled:
      return
    table = metrics.summarize_seeds(summaries)
    write_json(f"{self.workdir}/seeds_summary.json",
               {"seeds": seeds, **table})
    text = metrics.format_seed_table(table)
    with tf.io.gfile.GFile(f"{self.workdir}/seeds_summary.md", "w") as f:
      f.write(text + "\n")
    print(text)

  def close(self) -> None:
    self.progress.close()
    if self._writer is not None:
      self._writer.close()
