"""The comparison command on run directories written by the test."""

import json
import os

import numpy as np
import pytest

from smope_jax import compare, config_compare
from configs import cifar100, demo
from tests import helpers


def _write_run(directory, config, faa, seed, tasks_done=2, tasks=2):
  os.makedirs(directory, exist_ok=True)
  config = config.copy_and_resolve_references()
  config.seed = seed
  with open(os.path.join(directory, "config.json"), "w") as f:
    json.dump(config.to_dict(), f)
  metrics = {
      "faa": faa,
      "caa": faa + 5.0,
      "ffm": 100.0 - faa,
      "seed": seed,
      "tasks_done": tasks_done,
      "task_classes": [5] * tasks
  }
  with open(os.path.join(directory, "metrics.json"), "w") as f:
    json.dump(metrics, f)
  return directory


def _tiny(method="smope", **overrides):
  config = demo.get_config(f"method={method}")
  config.update(num_tasks=2, **overrides)
  return config


def test_table_plot_and_statistics(tmp_path):
  runs = [
      _write_run(tmp_path / "smope" / f"seed_{s}", _tiny(), faa, s)
      for s, faa in ((0, 80.0), (1, 84.0))
  ]
  runs += [_write_run(tmp_path / "l2p", _tiny("l2p"), 70.0, 0, tasks_done=1)]
  joint = _tiny(joint=True)
  runs += [_write_run(tmp_path / "joint", joint, 95.0, 0)]
  record = compare.compare(
      [str(tmp_path / "smope"),
       str(tmp_path / "l2p"),
       str(tmp_path / "joint")], str(tmp_path / "out"))
  (entry,) = record["benchmarks"]
  rows = {r["label"]: r for r in entry["rows"]}
  assert list(rows) == ["SMoPE", "L2P++", "SMoPE (upper bound: joint)"]
  smope = rows["SMoPE"]
  assert smope["seeds"] == [0, 1]
  assert smope["faa"]["mean"] == 82.0
  assert smope["faa"]["std"] == pytest.approx(2.0)  # ddof 0.
  assert smope["faa"]["sample_std"] == pytest.approx(np.sqrt(8.0))
  assert not rows["L2P++"]["finished"] and rows["L2P++"]["tasks_done"] == 1
  # Costs from the configs: L2P needs the query pass, about 2x SMoPE.
  assert rows["L2P++"]["inference_gflops_per_image"] > (
      1.5 * smope["inference_gflops_per_image"])
  assert rows["L2P++"]["params"]["prompts"] == 30 * 20 * 64 + 30 * 64
  text = (tmp_path / "out" / "comparison.md").read_text()
  assert "| SMoPE | 2 | 2 | 82.00 +- 2.00 |" in text
  assert "1 (partial)" in text
  assert (tmp_path / "out" / "comparison.png").stat().st_size > 10_000
  assert json.loads(
      (tmp_path / "out" / "comparison.json").read_text()) == (record)


def test_published_numbers_beside_ours(tmp_path):
  config = cifar100.get_config()
  config.update(pretrained="", image_size=32)
  config.model.update(variant="custom", patch_size=8, hidden_size=16,
                      num_layers=2, num_heads=2, mlp_dim=32)
  config.num_prompted_layers = 1
  _write_run(tmp_path / "run", config, 88.0, 0, tasks=10, tasks_done=10)
  record = compare.compare([str(tmp_path / "run")], str(tmp_path / "out"))
  row = record["benchmarks"][0]["rows"][0]
  assert row["published_faa"] == [{"mean": 89.23, "std": 0.12, "source": "S"}]
  assert "89.23 +- 0.12 [S]" in (tmp_path / "out" / "comparison.md").read_text()


def test_published_numbers_of_unknown_provenance_carry_their_note(tmp_path):
  config = cifar100.get_config("method=hideprompt")
  config.update(pretrained="", image_size=32)
  config.model.update(variant="custom", patch_size=8, hidden_size=16,
                      num_layers=2, num_heads=2, mlp_dim=32)
  _write_run(tmp_path / "run", config, 80.0, 0, tasks=10, tasks_done=10)
  record = compare.compare([str(tmp_path / "run")], str(tmp_path / "out"))
  row = record["benchmarks"][0]["rows"][0]
  assert row["published_faa"] == [{"mean": 88.27, "std": 0.59, "source": "S"}]
  text = (tmp_path / "out" / "comparison.md").read_text()
  assert "Note: HiDe-Prompt's published FAA" in text
  assert "provenance" in text
  # Without the method, no note.
  smope = compare.format_markdown({**record, "benchmarks": []})
  assert "Note:" not in smope


def test_refuses_to_mix_protocols_in_one_row(tmp_path):
  _write_run(tmp_path / "a", _tiny(), 80.0, 0)
  _write_run(tmp_path / "b", _tiny(lr=0.01), 81.0, 1)
  result = helpers.run_module("compare", str(tmp_path / "a"),
                              str(tmp_path / "b"), f"--out={tmp_path / 'out'}",
                              timeout=120)
  helpers.assert_one_line_error(result, "differ in lr (0.005 vs 0.01)")


def test_not_a_run_directory(tmp_path):
  with pytest.raises(compare.UserError, match="holds no run"):
    compare.compare([str(tmp_path)], str(tmp_path / "out"))


def test_a_row_and_a_resume_ignore_the_same_result_neutral_fields():
  neutral = config_compare.RESULT_NEUTRAL_FIELDS
  assert compare.ROW_NEUTRAL_FIELDS[:len(neutral)] == neutral
  # A row only adds the seed: it is the mean over several seeds' runs.
  assert compare.ROW_NEUTRAL_FIELDS[len(neutral):] == ("seed",)


def test_runs_differing_only_in_result_neutral_fields_share_a_row(tmp_path):
  runs = [
      _write_run(tmp_path / "a", _tiny(), 80.0, 0),
      _write_run(tmp_path / "b",
                 _tiny(eval_batch_size=7, data_dir="d", progress_bar=False),
                 82.0, 1)
  ]
  tables = compare.group_rows([r for d in runs for r in compare.find_runs(d)])
  ((rows,),) = [list(t.values()) for t in tables.values()]
  assert [r.directory for r in rows] == runs
