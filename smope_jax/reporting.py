"""What a run leaves in its workdir and tells the user while it runs.

Scalars go through CLU's default metric writer: a log line and, on process
0, TensorBoard events from one call (other processes only log). Process 0
also writes `config.json`, `metrics.json`, the PNG plots and the seed table.
JSON is written strictly: a non-finite number is an error, never a `NaN`
in a file. The log lines, ETAs and bar of a running task loop are
`run_log`'s.
"""

from absl import logging
from clu import metric_writers
import numpy as np
import tensorflow as tf

from smope_jax import configuration, metrics, plots, workdir


def _hparams(config) -> dict:
  """The config's fields by dotted name, as TensorBoard's hparams.

  Lists and None are left out: hparams hold only numbers and strings.
  """
  return {
      name: value
      for name, value in configuration.dotted_fields(config).items()
      if isinstance(value, (bool, int, float, str))
  }


def format_task_table(acc_matrix: list[list[float]], evaluated_on: str) -> str:
  """Accuracy and forgetting of every seen task after the last one trained.

  Forgetting of task j = its best accuracy after an earlier task minus its
  accuracy now (the FFM term); the current task has none yet.
  """
  rows = [row for row in acc_matrix if row is not None]
  t = len(rows)
  last = rows[-1]
  lines = [
      f"after task {t}: {evaluated_on} accuracy of each seen task",
      "  task   accuracy   forgetting"
  ]
  for j, acc in enumerate(last):
    if j < t - 1:
      best = max(rows[i][j] for i in range(j, t - 1))
      forgetting = f"{best - acc:10.2f}"
    else:
      forgetting = f"{'-':>10}"
    lines.append(f"  {j + 1:4d}   {acc:8.2f}   {forgetting}")
  lines.append(f"  mean   {np.mean(last):8.2f}")
  return "\n".join(lines)


def format_matrix(summary: dict) -> str:
  """The accuracy matrix A[t][j] (tasks numbered from 1) and FAA/CAA/FFM."""
  matrix = summary["acc_matrix"]
  header = "  after \\ task " + "".join(
      f"{j + 1:>7d}" for j in range(len(matrix)))
  lines = ["accuracy matrix (%): row t = after training task t", header]
  for t, row in enumerate(matrix):
    cells = "".join(f"{v:7.2f}" if v is not None else f"{'':>7}" for v in row)
    lines.append(f"  {t + 1:>12d} {cells}")
  lines.append(f"FAA {summary['faa']:.2f}  CAA {summary['caa']:.2f}  "
               f"FFM {summary['ffm']:.2f}")
  return "\n".join(lines)


class Reporter:
  """Scalars, metrics and plots of one run."""

  def __init__(self, workdir: str, primary: bool):
    self.workdir = workdir
    self.primary = primary
    self.writer = metric_writers.create_default_writer(
        workdir if primary else None, just_logging=not primary,
        asynchronous=False)

  def write_config(self, config) -> None:
    """config.json and the hyper-parameters in TensorBoard (fresh runs)."""
    if self.primary:
      workdir.write_run_json(f"{self.workdir}/config.json", config.to_dict())
    self.writer.write_hparams(_hparams(config))

  def scalars(self, step: int, values: dict) -> None:
    """One log line and TensorBoard scalars."""
    self.writer.write_scalars(step, {k: float(v) for k, v in values.items()})
    self.writer.flush()

  def task_report(self, summary: dict, title: str) -> None:
    """metrics.json, the plots, and the per-task table in the log."""
    logging.info(
        "%s",
        format_task_table(summary["acc_matrix"][:summary["tasks_done"]],
                          summary["evaluated_on"]))
    self.write_results(summary, title)

  def missing_results(self, summary: dict) -> list[str]:
    """The result files of `summary` that are not in the workdir."""
    if not self.primary:
      return []
    names = ["metrics.json", "accuracy_matrix.png"]
    if "expert_counts" in summary:
      names.append("expert_frequencies.png")
    return [
        name for name in names
        if not tf.io.gfile.exists(f"{self.workdir}/{name}")
    ]

  def write_results(self, summary: dict, title: str) -> None:
    """metrics.json and the plots of `summary` (process 0 only)."""
    if not self.primary:
      return
    workdir.write_run_json(f"{self.workdir}/metrics.json", summary)
    scores = (f"FAA {summary['faa']:.2f}  CAA {summary['caa']:.2f}  "
              f"FFM {summary['ffm']:.2f}")
    plots.plot_accuracy_matrix(
        np.array([[np.nan if v is None else v
                   for v in row]
                  for row in summary["acc_matrix"]], np.float64),
        f"{self.workdir}/accuracy_matrix.png", title=f"{title}\n{scores}")
    if "expert_counts" in summary:
      plots.plot_expert_frequencies(
          np.asarray(summary["expert_counts"]),
          f"{self.workdir}/expert_frequencies.png", top_k=summary["top_k"],
          frequent=np.asarray(summary["expert_frequent"]),
          title=f"{title}: expert use after task {summary['tasks_done']}")

  def final_report(self, summary: dict) -> None:
    logging.info("%s", format_matrix(summary))

  def seed_report(self, summaries: list[dict], seeds: list[int]) -> None:
    if not self.primary:
      return
    table = metrics.summarize_seeds(summaries)
    workdir.write_run_json(f"{self.workdir}/seeds_summary.json", {
        "seeds": seeds,
        **table
    })
    text = metrics.format_seed_table(table)
    with tf.io.gfile.GFile(f"{self.workdir}/seeds_summary.md", "w") as f:
      f.write(text + "\n")
    print(text)

  def close(self) -> None:
    self.writer.close()


def accuracy_matrix(rows) -> np.ndarray:
  """Square matrix of the finished tasks; NaN above the diagonal."""
  matrix = np.full((len(rows), len(rows)), np.nan)
  for t, row in enumerate(rows):
    matrix[t, :len(row)] = row
  return matrix


def run_summary(config, data, position, method_report: dict) -> dict:
  """A run's results so far (metrics.json): the metrics of its accuracy
  matrix, its records (`position.Position`) and its method's report."""
  rows = position.acc_matrix
  out = metrics.summarize(
      accuracy_matrix(rows),
      test_sizes=[data.test_size(j) for j in range(len(rows))])
  out.update(method=config.method, dataset=config.dataset, seed=position.seed,
             tasks_done=len(rows), evaluated_on=evaluated_on(config),
             joint=bool(config.joint),
             task_classes=[b - a for a, b in data.class_ranges
                          ], task_seconds=list(position.task_seconds),
             train_images_per_second=list(position.train_images_per_second),
             train_log=list(position.train_log), **method_report)
  return out


def evaluated_on(config) -> str:
  """The split each task is evaluated on."""
  return "validation" if config.validation else "test"
