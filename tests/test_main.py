"""End-to-end: the whole protocol through `main`, resume, and user errors."""

import json
import logging
import os
import re

import numpy as np
import pytest

from smope_jax import main as main_lib
from tests import helpers


def _metrics(workdir) -> dict:
  with open(os.path.join(workdir, "metrics.json")) as f:
    return json.load(f)


def _two_tasks(workdir) -> int:
  """The two-task protocol in `workdir`, in-process; its exit status."""
  return helpers.run_main(helpers.tiny_config(**helpers.TWO_TASKS), workdir)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("uninterrupted"))
  assert _two_tasks(workdir) == 0
  return workdir


def test_full_protocol_writes_all_outputs(uninterrupted):
  metrics = _metrics(uninterrupted)
  for key in ("acc_matrix", "faa", "caa", "ffm", "ffm_hide",
              "faa_sample_weighted", "task_seconds", "train_images_per_second",
              "expert_counts", "train_log"):
    assert key in metrics, key
  matrix = metrics["acc_matrix"]
  assert len(matrix) == 2 and matrix[0][1] is None
  assert all(0.0 <= a <= 100.0 for row in matrix for a in row if a is not None)
  assert metrics["faa"] == pytest.approx(np.mean(matrix[1]))
  counts = np.array(metrics["expert_counts"])
  assert counts.shape == (1, 2, 4)  # (L, H, E) of the tiny model.
  # Bookkeeping after both tasks: every sample adds K = 2 per head.
  assert np.all(counts.sum(-1) == counts.sum(-1)[0, 0]) and counts.sum() > 0
  phases = {entry["phase"] for entry in metrics["train_log"]}
  assert phases == {"warmup", "train"}
  assert any("prototype" in e for e in metrics["train_log"] if e["task"] == 1)
  assert all(
      "router" not in e for e in metrics["train_log"] if e["phase"] == "warmup")
  for name in ("config.json", "accuracy_matrix.png", "expert_frequencies.png",
               "log.txt"):
    assert os.path.getsize(os.path.join(uninterrupted, name)) > 0, name
  assert any(
      n.startswith("events.out.tfevents") for n in os.listdir(uninterrupted))
  with open(os.path.join(uninterrupted, "config.json")) as f:
    assert json.load(f)["num_tasks"] == 2


def test_finished_run_reports_and_writes_its_deleted_results_again(
    uninterrupted, caplog):
  before = _metrics(uninterrupted)
  for name in ("metrics.json", "accuracy_matrix.png"):
    os.remove(os.path.join(uninterrupted, name))
  with caplog.at_level(logging.INFO):
    status = _two_tasks(uninterrupted)
  assert status == 0
  assert "finished already" in caplog.text
  assert _metrics(uninterrupted) == before
  assert os.path.getsize(os.path.join(uninterrupted, "accuracy_matrix.png"))
  assert (f"writing again what is missing from {uninterrupted}: "
          "metrics.json, accuracy_matrix.png") in caplog.text


def test_full_disk_at_a_checkpoint_is_one_line_and_a_whole_log(
    tmp_path, caplog, capfd, full_disk_at_save):
  workdir = str(tmp_path)
  full_disk_at_save(3)
  capfd.readouterr()
  with caplog.at_level(logging.INFO):
    status = _two_tasks(workdir)
  printed = capfd.readouterr().err
  assert status == 2
  assert "Traceback" not in printed and "Logging error" not in printed
  lines = [l for l in printed.splitlines() if l.startswith("error:")]
  assert len(lines) == 1, printed[-3000:]
  assert lines[0].startswith(f"error: cannot save a checkpoint in {workdir}/"
                             "checkpoints: no space left")
  assert not [n for n in os.listdir(f"{workdir}/checkpoints") if "tmp" in n]
  # log.txt holds every record the run logged from its start (before it,
  # the start-up has no workdir yet), then the error line.
  ours = [
      r for r in caplog.records
      if "smope_jax" in r.pathname or r.levelno >= logging.WARNING
  ]
  with open(os.path.join(workdir, "log.txt")) as f:
    logged = re.sub(r"(?m)^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} ", "", f.read())
  # (Libraries' first-use warnings may come before it.)
  assert next(l for l in logged.splitlines() if l.startswith("INFO")) == (
      "INFO cifar100, 2 tasks, SMoPE, seed 0: starting")
  assert "".join(f"{r.levelname} {r.getMessage()}\n" for r in ours).endswith(
      logged.removesuffix(f"ERROR {lines[0][7:]}\n"))
  assert logged.endswith(f"ERROR {lines[0][7:]}\n")
  assert "| loss " in logged and "left by the failed save" in logged


@pytest.mark.slow
def test_a_run_stopped_by_a_full_disk_resumes_to_the_same_results(
    uninterrupted, tmp_path, monkeypatch, full_disk_at_save):
  workdir = str(tmp_path)
  full_disk_at_save(3)
  assert _two_tasks(workdir) == 2
  monkeypatch.undo()  # Space again.
  assert _two_tasks(workdir) == 0
  resumed, reference = _metrics(workdir), _metrics(uninterrupted)
  for key in ("acc_matrix", "expert_counts", "faa", "caa", "ffm"):
    assert resumed[key] == reference[key], key
  np.testing.assert_allclose([e["loss"] for e in resumed["train_log"]],
                             [e["loss"] for e in reference["train_log"]],
                             rtol=1e-6)


def test_log_on_a_full_disk_waits_for_space_and_never_holds_half_a_line(
    tmp_path, tmpfs, capfd):
  lines = [f"record {i} " + "x" * 1500 for i in range(6)]
  with tmpfs(tmp_path / "mnt", "size=64k") as mnt:
    # pylint: disable-next=protected-access
    handler = main_lib._WorkdirLog(str(mnt / "log.txt"))
    log = logging.getLogger("smope_jax_test_log")
    log.propagate = False
    log.addHandler(handler)
    try:
      log.warning(lines[0])
      with open(mnt / "filler", "wb", buffering=0) as f:
        with pytest.raises(OSError):
          while True:
            f.write(b"\0" * 512)
      for line in lines[1:5]:
        log.warning(line)
      written = (mnt / "log.txt").read_text().splitlines(keepends=True)
      assert written and all(l.endswith("\n") for l in written)
      assert [l.split(" WARNING ")[1] for l in written
             ] == [l + "\n" for l in lines[:len(written)]]
      assert len(written) < 5  # Some records waited for space.
      os.remove(mnt / "filler")
      log.warning(lines[5])
      written = (mnt / "log.txt").read_text().splitlines()
    finally:
      log.removeHandler(handler)
  assert [l.split(" WARNING ")[1] for l in written] == lines
  assert "Logging error" not in capfd.readouterr().err


def test_bad_config_value_is_one_clear_error(tmp_path):
  result = helpers.run_module("main", "--config=configs/demo.py",
                              "--config.top_k=99", f"--workdir={tmp_path}")
  helpers.assert_one_line_error(result, "config.top_k=99")


@pytest.mark.parametrize("flag,expected", [
    ("--config=configs/imagenet_r.py:tasks=7", "tasks=5"),
    ("--config=configs/nowhere.py", "configs/nowhere.py"),
    ("--config.nosuch=1", "no field 'nosuch'"),
])
def test_bad_config_flag_is_one_clear_error(tmp_path, flag, expected):
  flags = [flag] if flag.startswith("--config=") else [
      "--config=configs/demo.py", flag
  ]
  result = helpers.run_module("main", *flags, f"--workdir={tmp_path}")
  helpers.assert_one_line_error(result, expected)


def test_missing_data_is_one_clear_error(tmp_path):
  result = helpers.run_module("main", "--config=configs/cifar100.py",
                              "--config.pretrained=",
                              f"--config.data_dir={tmp_path / 'empty'}",
                              f"--workdir={tmp_path / 'run'}")
  helpers.assert_one_line_error(result, "cifar100", "--config.data_dir")


def test_missing_weights_is_one_clear_error(tmp_path):
  missing = tmp_path / "nowhere" / "vit.npz"
  result = helpers.run_module("main", "--config=configs/demo.py",
                              f"--config.pretrained={missing}",
                              f"--workdir={tmp_path / 'run'}")
  helpers.assert_one_line_error(result, str(missing))
