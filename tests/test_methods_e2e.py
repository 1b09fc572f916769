"""Every baseline through `main`: the two-task protocol, resume, comparison.

SMoPE's own end-to-end tests are in test_main.py. Marked slow: run with
`pytest -m slow`.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tests import helpers

BASELINES = ("l2p", "deep_l2p", "dualprompt", "codaprompt", "vqprompt")
pytestmark = pytest.mark.slow
# Three blocks, so that DualPrompt has G- and E-prompts.
THREE_BLOCKS = {"model.num_layers": 3, **helpers.TWO_TASKS}


def _metrics(workdir):
  with open(os.path.join(workdir, "metrics.json")) as f:
    return json.load(f)


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
  """One finished two-task run per baseline."""
  workdirs = {}
  for method in BASELINES:
    workdir = str(tmp_path_factory.mktemp(method))
    config = helpers.tiny_config(f"method={method}", **THREE_BLOCKS)
    assert helpers.run_main(config, workdir) == 0
    workdirs[method] = workdir
  return workdirs


@pytest.mark.parametrize("method", BASELINES)
def test_two_tasks_end_to_end(finished, method):
  metrics = _metrics(finished[method])
  assert metrics["method"] == method
  assert len(metrics["acc_matrix"]) == 2
  assert "expert_counts" not in metrics  # SMoPE's bookkeeping only.
  phases = {entry["phase"] for entry in metrics["train_log"]}
  assert phases == {"train"}  # No dense warm-up.
  assert all("key" in entry for entry in metrics["train_log"]) == (
      method not in ("codaprompt", "vqprompt"))
  assert all("vq_commit" in entry and "vq_codebook" in entry
             for entry in metrics["train_log"]) == (method == "vqprompt")
  for name in ("config.json", "accuracy_matrix.png"):
    assert os.path.getsize(os.path.join(finished[method], name)) > 0


@pytest.mark.parametrize("method", ("codaprompt", "vqprompt"))
def test_interrupted_baseline_resumes_to_identical_results(
    finished, method, tmp_path):
  """CODA-Prompt: its task boundary re-draws components (Gram-Schmidt);
  VQ-Prompt: the SMoPE protocol's lagged schedule and the alignment."""
  reference = _metrics(finished[method])
  task2 = [e["global_step"] for e in reference["train_log"] if e["task"] == 1]
  workdir = str(tmp_path)
  result = subprocess.run([
      sys.executable,
      os.path.join(helpers.REPO, "tests", "e2e_runner.py"), "--",
      *helpers.tiny_flags(f"method={method}", **THREE_BLOCKS),
      f"--workdir={workdir}", f"--config.exit_at_step={task2[len(task2) // 2]}"
  ], cwd=helpers.REPO, capture_output=True, text=True, timeout=600, check=False)
  assert result.returncode == 3, result.stderr[-2000:]
  config = helpers.tiny_config(f"method={method}", **THREE_BLOCKS)
  assert helpers.run_main(config, workdir) == 0
  resumed = _metrics(workdir)
  assert resumed["acc_matrix"] == reference["acc_matrix"]
  np.testing.assert_allclose([e["loss"] for e in resumed["train_log"]],
                             [e["loss"] for e in reference["train_log"]],
                             rtol=1e-6)


def test_compare_the_runs(finished, tmp_path):
  out = tmp_path / "comparison"
  result = helpers.run_module("compare", *finished.values(), f"--out={out}")
  assert result.returncode == 0, result.stderr[-2000:]
  record = json.loads((out / "comparison.json").read_text())
  (entry,) = record["benchmarks"]
  assert [row["method"] for row in entry["rows"]] == list(BASELINES)
  assert (out / "comparison.png").stat().st_size > 10_000
