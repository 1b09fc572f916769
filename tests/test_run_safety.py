"""Through the command line: a diverging run, a changed config, two runs on
one workdir, and what the log says when output goes to a file (with one
compiled train step for every task)."""

import json
import os
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from tests import helpers


def _main(workdir, *flags, timeout=600, env=None):
  """`python -m smope_jax.main` on the tiny run, output to files."""
  return helpers.run_module("main", *helpers.tiny_flags(), *flags,
                            f"--workdir={workdir}", env=env, timeout=timeout)


def _all_finite_on_disk(workdir):
  """Every JSON file parses strictly and every checkpointed array is finite."""
  for root, _, names in os.walk(workdir):
    for name in names:
      if name.endswith(".json"):
        with open(os.path.join(root, name)) as f:
          json.loads(f.read(),
                     parse_constant=lambda c: pytest.fail(f"{name} holds {c}"))
  directory = os.path.join(workdir, "checkpoints")
  steps = [d for d in os.listdir(directory) if d.isdigit()]
  for step in steps:
    state = ocp.StandardCheckpointer().restore(
        os.path.join(directory, step, "state"))
    for leaf in jax.tree_util.tree_leaves(state):
      assert np.all(np.isfinite(np.asarray(leaf, np.float64))), step
  return steps


@pytest.mark.slow
def test_diverging_run_stops_and_keeps_its_last_good_state(tmp_path):
  workdir = tmp_path / "run"
  # A sane start (frozen rate, no lag) checkpointed every 2 steps, then a
  # rate that overflows float32.
  diverging = ("--config.lr=1e30", "--config.schedule_delay=False",
               "--config.freeze_steps=4", "--config.checkpoint_every_steps=2",
               "--config.log_every_steps=1")
  result = _main(workdir, *diverging)
  assert result.returncode == 2
  line = helpers.assert_one_line_error(result)
  assert "training diverged at task 1, phase warmup" in line
  assert "--config.lr" in line and "last good state" in line
  assert _all_finite_on_disk(workdir)  # Some good checkpoints were kept.
  # The same workdir with a sane rate is another run: refused.
  refused = _main(workdir, *diverging[1:])
  assert refused.returncode == 2
  assert "lr 1e+30 -> 0.005" in helpers.assert_one_line_error(refused)
  # Without the checkpoints, the sane run starts afresh and finishes.
  for step in os.listdir(workdir / "checkpoints"):
    os.rename(workdir / "checkpoints" / step, tmp_path / f"old-{step}")
  fine = _main(workdir, *diverging[1:])
  assert fine.returncode == 0, fine.stderr[-3000:]
  with open(workdir / "config.json") as f:
    assert json.load(f)["lr"] == 0.005  # Written again on the fresh start.
  _all_finite_on_disk(workdir)


@pytest.mark.slow
def test_a_resume_refuses_another_config_and_accepts_neutral_changes(tmp_path):
  workdir = tmp_path / "run"
  stopped = _main(workdir, "--config.exit_at_step=5",
                  "--config.checkpoint_every_steps=2")
  assert stopped.returncode == 3  # Stopped abruptly, mid task 1.
  refused = _main(workdir, "--config.seed=1")
  assert refused.returncode == 2
  line = helpers.assert_one_line_error(refused)
  assert "seed 0 -> 1" in line and "--workdir" in line
  resumed = _main(workdir, "--config.log_every_steps=3",
                  "--config.checkpoint_every_steps=7")
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert "resuming task 1" in resumed.stderr
  again = _main(workdir)
  assert again.returncode == 0 and "finished already" in again.stderr


@pytest.mark.slow
def test_one_run_per_workdir(tmp_path):
  workdir = tmp_path / "run"
  env = dict(os.environ, PYTHONPATH=helpers.REPO)
  first = subprocess.Popen([
      sys.executable, "-m", "smope_jax.main", *helpers.tiny_flags(),
      "--config.epochs=30", f"--workdir={workdir}"
  ], cwd=helpers.REPO, env=env, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
  try:
    deadline = time.time() + 300
    while not (workdir / "run.lock").exists():
      assert time.time() < deadline and first.poll() is None
      time.sleep(0.5)
    second = _main(workdir)
    assert second.returncode == 2
    line = helpers.assert_one_line_error(second)
    assert str(first.pid) in line and "in use" in line
  finally:
    first.kill()
    first.wait()


@pytest.mark.slow
def test_log_tells_the_story_when_output_goes_to_a_file(tmp_path):
  """Also: one compiled train step per mode serves tasks of every size."""
  workdir = tmp_path / "run"
  # Tasks of 4, 2, 2 and 2 classes: their steps per epoch differ.
  result = _main(workdir, "--config.first_task_classes=4",
                 "--config.log_every_steps=4", env={"JAX_LOG_COMPILES": "1"})
  assert result.returncode == 0, result.stderr[-3000:]
  with open(workdir / "log.txt") as f:
    log_file = f.read()
  for text in (result.stderr, log_file):
    assert "\r" not in text  # No progress bar off a terminal.
    for needle in ("seed 0: starting", "class order (seed 0) starts",
                   "task 1: 4 classes", "task 2: 2 classes", "training images",
                   "learnable parameters", "devices: 1 cpu",
                   "first dense step (compilation) took",
                   "after task 1: test accuracy of each seen task",
                   "accuracy matrix (%)", "FAA", "4 tasks done"):
      assert needle in text, needle
    intervals = [l for l in text.splitlines() if "| loss " in l]
    assert intervals
    for line in intervals:
      for needle in (" epoch ", " step ", "| acc ", "| lr prompts ",
                     " img/s | ETA phase ", ", run "):
        assert needle in line, (needle, line)
  # The dense warm-up's step and the top-K step, for all four tasks.
  assert result.stderr.count("Compiling jit(train_step)") == 2
  with open(workdir / "metrics.json") as f:
    metrics = json.load(f)
  assert metrics["task_classes"] == [4, 2, 2, 2]
  matrix = metrics["acc_matrix"]
  assert len(matrix) == 4 and all(len(row) == 4 for row in matrix)
  assert metrics["faa"] == pytest.approx(np.mean(matrix[-1]))
  assert 0.0 <= metrics["faa_sample_weighted"] <= 100.0
