r"""The comparison table: `python -m smope_jax.compare RUN_DIR ... --out=DIR`.

Reads finished or partly finished runs of any methods and seeds (a run's
workdir, or a multi-seed workdir with `seed_<s>/` inside) and writes
`DIR/comparison.md` and `.json`: per benchmark and method, FAA, CAA and FFM
as mean +- std over the seeds (the population std, as the paper), the
learnable parameters and GFLOPs per image of a train step and of inference,
and the published FAA beside ours. `DIR/comparison.png` plots accuracy
against inference cost. Runs of one method on one benchmark must share
their protocol (every config field that changes results); otherwise the
command refuses with one line naming the field.
"""

import dataclasses
import os
import sys

from absl import flags

from smope_jax import cli, config_compare, workdir
from smope_jax.errors import UserError
from smope_jax.methods import published
from smope_jax.methods import registry

_OUT = flags.DEFINE_string("out", None, "Directory for comparison.md, "
                           ".json and .png.")

METRICS = ("faa", "caa", "ffm")
# Fields that identify a benchmark: runs differing here go to other tables.
BENCHMARK_FIELDS = ("dataset", "num_tasks", "first_task_classes", "validation",
                    "imagenet_r_split", "image_size", "test_resize")
# Fields that may differ within a row: those that cannot change results,
# and `seed`, since a row is the mean over the runs of several seeds.
ROW_NEUTRAL_FIELDS = (*config_compare.RESULT_NEUTRAL_FIELDS, "seed")


@dataclasses.dataclass
class Run:
  directory: str
  config: dict
  metrics: dict

  @property
  def finished(self) -> bool:
    return self.metrics["tasks_done"] == len(self.metrics["task_classes"])


def find_runs(directory: str) -> list[Run]:
  """The run in a workdir, or the seed runs of a multi-seed workdir."""
  if os.path.isfile(os.path.join(directory, "metrics.json")):
    return [
        Run(directory,
            workdir.read_json_file(os.path.join(directory, "config.json")),
            workdir.read_json_file(os.path.join(directory, "metrics.json")))
    ]
  seeds = sorted(
      d for d in (os.listdir(directory) if os.path.isdir(directory) else [])
      if d.startswith("seed_"))
  runs = [run for d in seeds for run in find_runs(os.path.join(directory, d))]
  if not runs:
    raise UserError(f"{directory} holds no run with an evaluated task "
                    "(no metrics.json there or in seed_*/).")
  return runs


def benchmark_key(run: Run) -> tuple:
  return tuple(run.config.get(f) for f in BENCHMARK_FIELDS)


def benchmark_label(run: Run) -> str:
  c = run.config
  tasks = len(
      run.metrics["task_classes"]) if not c.get("joint") else c["num_tasks"]
  label = f"{c['dataset']}, {tasks} tasks"
  if c.get("first_task_classes"):
    label += f" (first task {c['first_task_classes']} classes)"
  if c.get("validation"):
    label += ", validation split"
  if c["dataset"] == "imagenet_r" and c.get("imagenet_r_split") == "random":
    label += ", random 80/20 split"
  return label


def group_rows(runs: list[Run]) -> dict:
  """{benchmark key: {(method, joint): [runs]}}, one protocol per row.

  Raises:
    UserError: two runs of one row differ in a field that changes results.
  """
  tables = {}
  for run in runs:
    row = (run.config["method"], bool(run.config.get("joint")))
    tables.setdefault(benchmark_key(run), {}).setdefault(row, []).append(run)
  for rows in tables.values():
    for (method, _), members in rows.items():
      for other in members[1:]:
        diffs = config_compare.config_differences(members[0].config,
                                                  other.config,
                                                  ignored=ROW_NEUTRAL_FIELDS)
        if diffs:
          name, ours, theirs = diffs[0]
          raise UserError(
              f"{members[0].directory} and {other.directory} ({method} on "
              f"{benchmark_label(other)}) differ in {name} ({ours!r} vs "
              f"{theirs!r}): a row holds runs of one protocol; compare them "
              "separately.")
  return tables


def summarize_row(members: list[Run]) -> dict:
  from smope_jax import metrics  # pylint: disable=g-import-not-at-top
  table = metrics.summarize_seeds([m.metrics for m in members])
  return {
      "seeds": sorted(m.metrics["seed"] for m in members),
      "runs": [m.directory for m in members],
      "finished": all(m.finished for m in members),
      "tasks_done": min(m.metrics["tasks_done"] for m in members),
      **{
          name: {
              k: table[name][k] for k in ("mean", "std", "sample_std")
          } for name in METRICS
      },
  }


def row_cost(run: Run) -> dict:
  """Parameters and GFLOPs per image of the row's configured method."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  from smope_jax.benchmark import cost  # pylint: disable=g-import-not-at-top
  config = ml_collections.ConfigDict(run.config)
  config.pretrained = ""
  return cost.static_cost(config, len(run.metrics["task_classes"]))


def compare(directories: list[str], out: str) -> dict:
  """Builds the comparison and writes its files; returns the JSON record."""
  runs = [run for d in directories for run in find_runs(d)]
  tables = group_rows(runs)
  record = {"sources": published.SOURCES, "benchmarks": []}
  for rows in tables.values():
    any_run = next(iter(rows.values()))[0]
    tasks = len(any_run.metrics["task_classes"])
    entry = {
        "benchmark": benchmark_label(any_run),
        "dataset": any_run.config["dataset"],
        "rows": []
    }
    for (method, joint), members in sorted(
        rows.items(), key=lambda item: (item[0][1], _order(item[0][0]))):
      row = {
          "method": method,
          "joint": joint,
          **summarize_row(members),
          **row_cost(members[0])
      }
      row["label"] = method_label(row)
      cells = [] if joint else published.faa(any_run.config["dataset"], tasks,
                                             method)
      row["published_faa"] = [
          dict(mean=m, std=s, source=src) for m, s, src in cells
      ]
      entry["rows"].append(row)
    record["benchmarks"].append(entry)
  os.makedirs(out, exist_ok=True)
  workdir.write_run_json(os.path.join(out, "comparison.json"), record, "--out")
  with workdir.atomic_file(os.path.join(out, "comparison.md")) as f:
    f.write(format_markdown(record))
  from smope_jax import plots  # pylint: disable=g-import-not-at-top
  plots.plot_comparison(record, os.path.join(out, "comparison.png"))
  return record


def _order(method: str) -> int:
  """Registered methods in the registry's order, any other after them."""
  names = registry.names()
  return names.index(method) if method in names else len(names)


def method_label(row: dict) -> str:
  name = registry.display_name(row["method"])
  return f"{name} (upper bound: joint)" if row["joint"] else name


def _stat(values: dict) -> str:
  return f"{values['mean']:.2f} +- {values['std']:.2f}"


def format_markdown(record: dict) -> str:
  lines = [
      "# Comparison", "",
      "Ours: mean +- std over seeds (population std, ddof 0, as the "
      "paper). Published: FAA as reported, with its source. GFLOPs per "
      "image from XLA's cost analysis (a multiply-add counts 2).", ""
  ]
  for entry in record["benchmarks"]:
    lines += [
        f"## {entry['benchmark']}", "",
        "| method | seeds | tasks | FAA | CAA | FFM | published FAA | "
        "learnable params | train GFLOPs/img | inference GFLOPs/img |",
        "|---|---|---|---|---|---|---|---:|---:|---:|"
    ]
    for row in entry["rows"]:
      tasks = str(row["tasks_done"]) + ("" if row["finished"] else " (partial)")
      cited = "; ".join(f"{p['mean']:.2f} +- {p['std']:.2f} [{p['source']}]"
                        for p in row["published_faa"]) or "-"
      lines.append(
          f"| {row['label']} | {len(row['seeds'])} | {tasks} | "
          f"{_stat(row['faa'])} | {_stat(row['caa'])} | {_stat(row['ffm'])} "
          f"| {cited} | {row['params']['learnable']:,} | "
          f"{row['train_gflops_per_image']:.4g} | "
          f"{row['inference_gflops_per_image']:.4g} |")
    lines.append("")
  lines += [
      "Sources: " +
      "; ".join(f"[{k}] {v}" for k, v in record["sources"].items()), ""
  ]
  methods = {r["method"] for e in record["benchmarks"] for r in e["rows"]}
  lines += [
      f"Note: {text}" for method, text in published.NOTES.items()
      if method in methods
  ]
  return "\n".join(lines)


def main(argv):
  directories = argv[1:]
  if not directories:
    print(
        "error: give at least one run directory: python -m "
        "smope_jax.compare RUN_DIR [RUN_DIR ...] --out=DIR", file=sys.stderr)
    sys.exit(2)
  try:
    out = _OUT.value
    if os.path.exists(out) and not os.path.isdir(out):
      raise UserError(f"--out={out} exists and is not a directory.")
    record = compare(directories, out)
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  print(format_markdown(record))
  print(f"wrote {out}/comparison.md, comparison.json, comparison.png")


def run():
  cli.run(main, ["out"])


if __name__ == "__main__":
  run()
