r"""Routing and accuracy of runs against a reference run, for precision.

    python -m smope_jax.precision_study REFERENCE_RUN RUN [RUN ...] \
        [--out=study.json]

Each argument is a finished SMoPE run's workdir; all runs share one config
but for precision and device count (docs/precision.md). Per run it prints
FAA, CAA and FFM (metrics.json), the router and prototype losses of the
last task (the mean of its logged top-K training intervals), and how many
routing decisions agree with the reference: a decision is the set of K
experts one prompted block and head chose for one test image, after the
last task, with the final checkpoint and the evaluation's routing. The
images are those of every task's test split; the run's own precision
computes the forward. It also recomputes the last accuracy row from that
forward, which must equal metrics.json's.

Runs drift apart while they train (any rounding difference can flip an
expert, and the flip changes what follows), so per run it also evaluates
the REFERENCE's final weights in the run's precision: the routing
agreement and accuracy there show what the precision alone changes in one
forward, without the drift.
"""

import functools
import os
import sys
import tempfile

from absl import flags
import jax
import ml_collections
import numpy as np

from smope_jax import precision
from smope_jax import checkpointing, cli, configuration, distributed
from smope_jax import train_step, trainer
from smope_jax import workdir as workdir_lib
from smope_jax.errors import UserError
from smope_jax import factory
from smope_jax.methods import registry


def define_flags() -> None:
  """The command's flag, defined when it runs: importing the module adds
  none (compare's --out lives in the same test process)."""
  flags.DEFINE_string("out", None, "Also write the rows as JSON here.")


def final_losses(metrics: dict) -> dict:
  """Mean router and prototype loss of the last task's top-K training.

  Means over the logged intervals of phase "train" of the last task in
  `metrics["train_log"]`; a term never logged is NaN.
  """
  log = [row for row in metrics["train_log"] if row["phase"] == "train"]
  if not log:
    raise UserError("the run's train_log has no top-K training interval.")
  last = [row for row in log if row["task"] == log[-1]["task"]]
  return {
      name: float(np.mean([row.get(name, np.nan) for row in last]))
      for name in ("router", "prototype")
  }


def agreement(selected: np.ndarray, reference: np.ndarray) -> float:
  """Fraction of decisions that chose the same set of experts.

  Args:
    selected, reference: (L, N, H, K) expert indices per prompted block,
      image and head; the order within K does not matter.
  """
  if selected.shape != reference.shape:
    raise UserError(f"the runs route differently shaped decisions: "
                    f"{selected.shape} against {reference.shape}.")
  same = np.all(np.sort(selected, -1) == np.sort(reference, -1), axis=-1)
  return float(np.mean(same))


def _load_config(workdir: str) -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict(
      workdir_lib.read_json_file(f"{workdir}/config.json"))
  if config.method != registry.REFERENCE:
    raise UserError(f"{workdir} is a {registry.display_name(config.method)} "
                    f"run; the study reads "
                    f"{registry.display_name(registry.REFERENCE)}'s routing.")
  if config.pretrained == "demo":  # The backbone cached in the run's workdir.
    config.pretrained = factory.demo_backbone_dir(workdir)
  config.progress_bar = False
  return config


PRECISION_FIELDS = ("dtype", "matmul_precision", "routing_precision")


def routing_decisions(
    workdir: str, fields: dict | None = None) -> tuple[np.ndarray, list[float]]:
  """The final checkpoint's experts (L, N, H, K) on all test images.

  Also returns the accuracy (%) on each task's test images, predicting
  over all classes, as the run's last evaluation. `fields` overrides
  the run's PRECISION_FIELDS for this forward.
  """
  workdir = os.path.abspath(workdir)  # Orbax reads absolute paths only.
  config = _load_config(workdir)
  config.update(fields or {})
  configuration.validate(config)  # `trainer.Run` takes valid configs.
  with tempfile.TemporaryDirectory() as scratch:
    run = trainer.Run(config, scratch)  # Builds model and data, writes there.
    try:
      template, frozen = run.fresh_state()[0], run.frozen
      restored = checkpointing.Checkpointer(
          f"{workdir}/checkpoints").restore_latest(template)
      if restored is None or restored[2]["task"] < run.data.num_tasks:
        raise UserError(f"{workdir} holds no finished run.")
      state, last = restored[1], run.data.num_tasks - 1
      infer = jax.jit(
          functools.partial(train_step.infer, model=run.model,
                            method=run.method, evaluating=True))
      seen = run.data.class_ranges[last][1]
      chosen, accuracy = [], []
      with jax.default_matmul_precision(
          precision.model_precision(run.config)["context"]):
        for j in range(run.data.num_tasks):
          correct = 0
          for local in run.data.test_batches(j, config.eval_batch_size):
            batch = distributed.global_batch(local, run.batch_sharding)
            out = distributed.to_host(
                infer(state["trainable"], frozen, state["method_state"], batch,
                      np.int32(last)))
            real = np.asarray(local["mask"]) > 0
            chosen.append(np.asarray(out["selected"])[:, real])
            predicted = np.asarray(train_step.predict_seen(out["logits"],
                                                           seen))[real]
            labels = np.asarray(local["label"])[real]
            correct += int(np.sum(predicted == labels))
          accuracy.append(100.0 * correct / run.data.test_size(j))
    finally:
      run.reporter.close()
      run.checkpointer.close()
  return np.concatenate(chosen, axis=1), accuracy


def study(reference: str, runs: list[str]) -> list[dict]:
  """One row per run (the reference first), see the module docstring."""
  rows, reference_choice = [], None
  for workdir in [reference, *runs]:
    metrics = workdir_lib.read_json_file(f"{workdir}/metrics.json")
    config = _load_config(workdir)
    fields = {k: config[k] for k in PRECISION_FIELDS}
    chosen, accuracy = routing_decisions(workdir)
    if reference_choice is None:
      reference_choice = chosen
    same_weights, same_weights_accuracy = (routing_decisions(reference, fields)
                                           if rows else (chosen, accuracy))
    rows.append({
        "run":
            workdir,
        **fields,
        **{
            k: metrics[k] for k in ("faa", "caa", "ffm")
        },
        **final_losses(metrics), "routing_agreement":
            agreement(chosen, reference_choice),
        "decisions":
            int(chosen[..., 0].size),
        "last_row":
            metrics["acc_matrix"][-1],
        "last_row_recomputed":
            accuracy,
        "reference_weights_agreement":
            agreement(same_weights, reference_choice),
        "reference_weights_last_row":
            same_weights_accuracy
    })
  return rows


def format_table(rows: list[dict]) -> str:
  """Markdown; "ref. weights" columns evaluate the reference's weights."""
  lines = [
      "| run | dtype | matmul | routing | FAA | CAA | FFM | router "
      "| prototype | same experts | ref. weights: same experts | "
      "ref. weights: FAA |", "|" + " --- |" * 12
  ]
  for r in rows:
    lines.append(
        f"| {r['run']} | {r['dtype']} | {r['matmul_precision']} | "
        f"{r['routing_precision']} | {r['faa']:.2f} | {r['caa']:.2f} | "
        f"{r['ffm']:.2f} | {r['router']:.4g} | {r['prototype']:.4g} | "
        f"{100 * r['routing_agreement']:.2f} % of {r['decisions']} | "
        f"{100 * r['reference_weights_agreement']:.2f} % | "
        f"{np.mean(r['reference_weights_last_row']):.2f} |")
  return "\n".join(lines)


def main(argv):
  if len(argv) < 3:
    print(
        "error: give the reference run and at least one other: python -m "
        "smope_jax.precision_study REFERENCE_RUN RUN [RUN ...]",
        file=sys.stderr)
    sys.exit(2)
  try:
    rows = study(argv[1], argv[2:])
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  for row in rows:
    if not np.allclose(row["last_row"], row["last_row_recomputed"]):
      print(
          f"warning: {row['run']}: the recomputed last row "
          f"{row['last_row_recomputed']} differs from metrics.json's "
          f"{row['last_row']}", file=sys.stderr)
  print(format_table(rows))
  if flags.FLAGS.out:
    workdir_lib.write_json_file(flags.FLAGS.out, rows, "--out")


if __name__ == "__main__":
  define_flags()
  cli.run(main, [])
