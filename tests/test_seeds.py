"""Several seeds in one command: per-seed runs and a mean +- std table."""

import json
import os

import numpy as np
import pytest

from tests import helpers

pytestmark = pytest.mark.slow


def test_seeds_run_separately_and_are_summarised(tmp_path):
  config = helpers.tiny_config(**helpers.TWO_TASKS)
  config.update(seeds="0,1", epochs=1)
  assert helpers.run_main(config, tmp_path) == 0
  faa = []
  for seed in (0, 1):
    with open(tmp_path / f"seed_{seed}" / "metrics.json") as f:
      metrics = json.load(f)
    assert metrics["seed"] == seed and len(metrics["acc_matrix"]) == 2
    faa.append(metrics["faa"])
  with open(tmp_path / "seeds_summary.json") as f:
    summary = json.load(f)
  assert summary["seeds"] == [0, 1]
  assert summary["faa"]["mean"] == pytest.approx(np.mean(faa))
  # The paper's population std, and the sample std beside it.
  assert summary["faa"]["std"] == pytest.approx(np.std(faa))
  assert summary["faa"]["sample_std"] == pytest.approx(np.std(faa, ddof=1))
  table = (tmp_path / "seeds_summary.md").read_text()
  assert "+-" in table and "FAA" in table.upper()
  assert os.path.exists(tmp_path / "seed_1" / "accuracy_matrix.png")
