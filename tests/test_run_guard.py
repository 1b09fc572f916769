"""One config and one run per workdir: smope_jax.config_compare and
smope_jax.workdir_lock."""

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time

import ml_collections
import pytest

from smope_jax import config_compare, configuration, workdir_lock
from smope_jax.errors import UserError
from tests import helpers

# ------------------------------------------------------------------ config

SAVED = {
    "seed": 0,
    "lr": 0.005,
    "dataset": "cifar100",
    "progress_bar": True,
    "data_dir": "/data/a",
    "eval_batch_size": 256,
    "model": {
        "variant": "B/16",
        "hidden_size": 768
    }
}


def _changed(**fields):
  current = json.loads(json.dumps(SAVED))
  for name, value in fields.items():
    *parents, leaf = name.split("__")
    tree = current
    for parent in parents:
      tree = tree[parent]
    tree[leaf] = value
  return current


def test_same_config_has_no_differences():
  assert config_compare.config_differences(SAVED, _changed()) == []


def test_nested_fields_are_named_with_dots_in_config_order():
  current = _changed(lr=0.01, seed=3, model__hidden_size=384)
  assert config_compare.config_differences(SAVED, current) == [
      ("seed", 0, 3), ("lr", 0.005, 0.01), ("model.hidden_size", 768, 384)
  ]


def test_result_neutral_fields_may_differ():
  current = _changed(progress_bar=False, data_dir="gs://bucket/tfds",
                     eval_batch_size=64)
  assert config_compare.config_differences(SAVED, current) == []
  for name in ("progress_bar", "log_every_steps", "checkpoint_every_steps",
               "keep_checkpoints", "exit_at_step", "data_dir", "cache_data",
               "seeds", "eval_batch_size"):
    assert name in config_compare.RESULT_NEUTRAL_FIELDS


def test_fields_present_in_one_config_only_differ():
  current = _changed()
  del current["dataset"]
  current["model"]["pool"] = "cls"
  current["method"] = "l2p"
  assert config_compare.config_differences(SAVED, current) == [
      ("dataset", "cifar100", config_compare.ABSENT),
      ("model.pool", config_compare.ABSENT, "cls"),
      ("method", config_compare.ABSENT, "l2p")
  ]
  # A neutral field added or removed is no difference either.
  assert config_compare.config_differences(SAVED, {
      **SAVED, "cache_data": False
  }) == []


def test_a_field_newer_than_the_saved_config_at_its_default_is_no_difference():
  """A run saved before VQ-Prompt's fields existed resumes under today's
  defaults, which compute what it computed; another value is a change."""
  current = configuration.base_config().to_dict()
  saved = configuration.base_config().to_dict()
  for name in ("vq_temperature", "vq_commit_weight", "vq_codebook_weight",
               "natural_order_seed0"):
    del saved[name]
  assert config_compare.config_differences(saved, current) == []
  current["vq_temperature"] = 5.0
  assert config_compare.config_differences(saved, current) == [
      ("vq_temperature", config_compare.ABSENT, 5.0)
  ]


def test_tuples_equal_the_lists_a_checkpoint_holds():
  assert config_compare.config_differences({"sizes": [1, 2]},
                                           {"sizes": (1, 2)}) == []


def test_a_config_dict_compares_with_its_saved_json():
  current = ml_collections.ConfigDict(_changed(seed=2))
  assert config_compare.config_differences(SAVED, current) == [("seed", 0, 2)]


def test_message_lists_both_values_and_what_to_do():
  diffs = config_compare.config_differences(
      SAVED, _changed(seed=3, lr=0.01, dataset="imagenet_r"))
  message = config_compare.describe_differences("/runs/a", diffs)
  assert message == (
      "/runs/a holds a run with another config: seed 0 -> 3, lr 0.005 -> "
      "0.01, dataset 'cifar100' -> 'imagenet_r'; resume it with the same "
      "config, or pass a new --workdir.")
  assert "\n" not in message


def test_message_lists_eight_fields_then_a_count():
  saved = {f"f{i}": i for i in range(11)}
  current = {f"f{i}": i + 1 for i in range(11)}
  message = config_compare.describe_differences(
      "w", config_compare.config_differences(saved, current))
  assert "f7 7 -> 8 and 3 more;" in message and "f8" not in message
  missing = config_compare.describe_differences(
      "w", config_compare.config_differences({"a": 1}, {}))
  assert "a 1 -> (absent)" in missing


def test_require_same_config():
  config_compare.require_same_config("w", SAVED, _changed(progress_bar=False))
  with pytest.raises(UserError, match=r"seed 0 -> 1"):
    config_compare.require_same_config("w", SAVED, _changed(seed=1))


# -------------------------------------------------------------------- lock


def _lock_file(workdir):
  return os.path.join(workdir, workdir_lock.LOCK_NAME)


def _read_lock(workdir):
  with open(_lock_file(workdir)) as f:
    return json.load(f)


def _write_lock(workdir, **fields):
  """A remote lock as another run would leave it; fields override defaults."""
  now = time.strftime("%Y-%m-%dT%H:%M:%S%z")
  record = {
      "host": socket.gethostname(),
      "pid": 1,
      "started": now,
      "heartbeat": now,
      "command": "python -m smope_jax.main --other",
      "token": "theirs",
      **fields
  }
  with open(_lock_file(workdir), "w") as f:
    json.dump(record, f)
  return record


@pytest.fixture
def remote(monkeypatch):
  """Takes the path of gs:// workdirs, which have no file locks."""
  monkeypatch.setattr(workdir_lock, "_is_local", lambda path: False)


# Takes the lock on argv[1], says so on stdout, then holds it until killed.
HOLDER = """
import sys, time
from smope_jax import workdir_lock
workdir_lock.WorkdirLock(sys.argv[1]).acquire()
print("held", flush=True)
time.sleep(120)
"""


@pytest.fixture
def holder(tmp_path):
  """Another process that holds the lock on tmp_path; ended by its pid."""
  proc = subprocess.Popen([sys.executable, "-c", HOLDER,
                           str(tmp_path)], cwd=helpers.REPO,
                          env=dict(os.environ, PYTHONPATH=helpers.REPO,
                                   JAX_PLATFORMS="cpu"), stdout=subprocess.PIPE,
                          text=True)
  try:
    assert proc.stdout.readline() == "held\n"
    yield proc
  finally:
    if proc.poll() is None:
      os.kill(proc.pid, signal.SIGKILL)
    proc.wait()


def test_lock_records_its_holder_and_release_removes_it(tmp_path):
  workdir = tmp_path / "new" / "run"  # Created by the lock.
  with workdir_lock.WorkdirLock(workdir) as lock:
    assert lock.held
    record = _read_lock(workdir)
    assert record["host"] == socket.gethostname()
    assert record["pid"] == os.getpid()
    assert record["command"] and record["started"]
  assert not os.path.exists(_lock_file(workdir))
  assert not lock.held


def test_workdir_held_by_another_process_is_refused(tmp_path, holder):
  theirs = _read_lock(tmp_path)
  with pytest.raises(UserError) as refused:
    workdir_lock.WorkdirLock(tmp_path).acquire()
  message = str(refused.value)
  for part in (str(tmp_path), f"process {holder.pid} on host "
               f"{socket.gethostname()}", theirs["started"],
               f"running `-c {str(tmp_path)}", "another --workdir"):
    assert part in message, part
  assert "\n" not in message
  assert _read_lock(tmp_path) == theirs


def test_a_killed_holder_frees_the_lock_at_once(tmp_path, holder):
  os.kill(holder.pid, signal.SIGKILL)  # As a preempted run ends.
  holder.wait()
  assert _read_lock(tmp_path)["pid"] == holder.pid  # Its file is left.
  with workdir_lock.WorkdirLock(tmp_path):
    assert _read_lock(tmp_path)["pid"] == os.getpid()
  assert not os.listdir(tmp_path)


def test_second_lock_in_the_same_process_is_refused(tmp_path):
  with workdir_lock.WorkdirLock(tmp_path):
    with pytest.raises(UserError, match=f"process {os.getpid()} "):
      workdir_lock.WorkdirLock(tmp_path).acquire()
    assert _read_lock(tmp_path)["pid"] == os.getpid()


@pytest.mark.parametrize("content", ["", "not json", '{"pid": 1}'])
def test_a_local_lock_file_nobody_holds_is_reused(tmp_path, content):
  with open(_lock_file(tmp_path), "w") as f:
    f.write(content)
  with workdir_lock.WorkdirLock(tmp_path):
    assert _read_lock(tmp_path)["pid"] == os.getpid()


def test_release_removes_only_our_lock(tmp_path, caplog):
  first = workdir_lock.WorkdirLock(tmp_path)
  first.acquire()
  os.remove(_lock_file(tmp_path))  # By hand, while the run goes on.
  with workdir_lock.WorkdirLock(tmp_path):
    with caplog.at_level(logging.WARNING):
      first.release()
    assert _read_lock(tmp_path)["pid"] == os.getpid()
    assert any(
        "no longer this run's lock" in r.getMessage() for r in caplog.records)
  assert not os.path.exists(_lock_file(tmp_path))


def test_workdir_that_cannot_be_made_is_a_user_error(tmp_path):
  (tmp_path / "file").write_text("")  # Root may write anywhere, not here.
  with pytest.raises(UserError, match="cannot use .*file/run/run.lock"):
    workdir_lock.WorkdirLock(tmp_path / "file" / "run").acquire()


# ------------------------------------------------------ remote (gs://) lock


def test_remote_heartbeat_refreshes_the_lock_and_notices_a_takeover(
    tmp_path, remote, caplog):
  lock = workdir_lock.WorkdirLock(tmp_path, heartbeat_seconds=0.1,
                                  settle_seconds=0)
  lock.acquire()
  first = _read_lock(tmp_path)
  assert first["started"] == first["heartbeat"] and first["token"]
  time.sleep(1.3)  # The heartbeat is written to the second.
  second = _read_lock(tmp_path)
  assert second["heartbeat"] > first["heartbeat"]
  assert {
      k: v for k, v in second.items() if k != "heartbeat"
  } == {
      k: v for k, v in first.items() if k != "heartbeat"
  }
  theirs = _write_lock(tmp_path, token="taker")
  with caplog.at_level(logging.ERROR):
    time.sleep(0.5)
  assert _read_lock(tmp_path) == theirs  # Not overwritten by our heartbeat.
  assert any("taken over" in r.getMessage() for r in caplog.records)
  with caplog.at_level(logging.WARNING):
    lock.release()
  assert _read_lock(tmp_path) == theirs
  assert any(
      "no longer this run's lock" in r.getMessage() for r in caplog.records)


def test_remote_lock_is_refused_until_its_heartbeat_is_stale(
    tmp_path, remote, caplog):
  theirs = _write_lock(tmp_path, host="tpu-vm-7", pid=os.getpid())
  with pytest.raises(UserError) as refused:
    workdir_lock.WorkdirLock(tmp_path, settle_seconds=0).acquire()
  message = str(refused.value)
  assert f"process {os.getpid()} on host tpu-vm-7" in message
  assert theirs["started"] in message and "10 minutes" in message
  assert _lock_file(tmp_path) in message and "\n" not in message
  assert _read_lock(tmp_path) == theirs
  # The same lock with a heartbeat 11 minutes old: its run has ended.
  _write_lock(
      tmp_path, host="tpu-vm-7", pid=4242,
      heartbeat=time.strftime("%Y-%m-%dT%H:%M:%S%z",
                              time.localtime(time.time() - 660)))
  with caplog.at_level(logging.WARNING):
    with workdir_lock.WorkdirLock(tmp_path, settle_seconds=0):
      assert _read_lock(tmp_path)["host"] == socket.gethostname()
  assert any("process 4242 on tpu-vm-7" in r.getMessage() and
             "11 minutes ago" in r.getMessage() for r in caplog.records)
  assert not os.listdir(tmp_path)


@pytest.mark.parametrize("content", [
    "", "not json", "[1]", '{"host": "h", "pid": 0}',
    '{"host": "h", "pid": 1, "started": "s",'
    ' "command": "c"}'
])
def test_damaged_remote_lock_is_refused_with_what_to_do(tmp_path, remote,
                                                        content):
  with open(_lock_file(tmp_path), "w") as f:
    f.write(content)
  with pytest.raises(UserError, match="damaged.*delete it if no run uses"):
    workdir_lock.WorkdirLock(tmp_path, settle_seconds=0).acquire()


def test_remote_the_last_writer_holds_the_lock(tmp_path, remote, monkeypatch):
  with workdir_lock.WorkdirLock(tmp_path, settle_seconds=0) as lock:
    assert lock.held and _read_lock(tmp_path)["pid"] == os.getpid()
  assert not os.path.exists(_lock_file(tmp_path))

  # A competitor writes while this run waits to read back: it holds the lock.
  settle = []

  def competitor_writes(seconds):
    settle.append(seconds)
    _write_lock(tmp_path, host="other-host", token="competitor")

  monkeypatch.setattr(workdir_lock.time, "sleep", competitor_writes)
  with pytest.raises(UserError, match="on host other-host"):
    workdir_lock.WorkdirLock(tmp_path, settle_seconds=2.0).acquire()
  assert settle == [2.0]
  assert _read_lock(tmp_path)["token"] == "competitor"


# ---------------------------------------------------------- several runs

# Takes the lock on argv[1] once the test says go, reports, then holds it.
CONTENDER = """
import os, sys, time
from smope_jax import workdir_lock
from smope_jax.errors import UserError
workdir, sync, name = sys.argv[1:]
open(os.path.join(sync, "ready-" + name), "w").close()
while not os.path.exists(os.path.join(sync, "go")):
  time.sleep(0.01)
try:
  workdir_lock.WorkdirLock(workdir).acquire()
except UserError as e:
  print("refused", e, flush=True)
  sys.exit(0)
print("acquired", os.getpid(), flush=True)
time.sleep(120)
"""


def _wait_for(predicate, seconds=120):
  deadline = time.time() + seconds
  while not predicate():
    assert time.time() < deadline, "timed out"
    time.sleep(0.05)


def test_two_concurrent_runs_one_refuses_and_a_killed_one_frees_the_lock(
    tmp_path):
  workdir, sync = tmp_path / "work", tmp_path / "sync"
  sync.mkdir()
  env = dict(os.environ, PYTHONPATH=helpers.REPO, JAX_PLATFORMS="cpu")
  procs = [
      subprocess.Popen(
          [sys.executable, "-c", CONTENDER,
           str(workdir),
           str(sync), name], cwd=helpers.REPO, env=env, stdout=subprocess.PIPE,
          text=True) for name in ("a", "b")
  ]
  try:
    _wait_for(lambda: len(os.listdir(sync)) == 2)
    (sync / "go").touch()  # Both try at the same moment.
    lines = sorted(proc.stdout.readline() for proc in procs)
    assert lines[0].startswith("acquired"), lines
    assert lines[1].startswith("refused"), lines
    winner = int(lines[0].split()[1])
    assert f"process {winner} on host {socket.gethostname()}" in lines[1]
    assert _read_lock(workdir)["pid"] == winner
    # The winner dies without releasing, as a preempted run does: the next
    # run on this host starts at once.
    os.kill(winner, signal.SIGKILL)
    for proc in procs:
      proc.wait(timeout=60)
    with workdir_lock.WorkdirLock(workdir):
      assert _read_lock(workdir)["pid"] == os.getpid()
  finally:
    for proc in procs:
      if proc.poll() is None:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()


# One of two processes joined on 127.0.0.1: process 0 takes the lock on
# argv[3] and both see it; on argv[4], held by the test, both refuse.
TWO_PROCESSES = """
import json, os, sys
from jax.experimental import multihost_utils
from smope_jax import distributed, workdir_lock
from smope_jax.errors import UserError
address, index, free, taken = sys.argv[1:]
distributed.initialize(address, 2, int(index))
out = {"pid": os.getpid()}
lock = workdir_lock.WorkdirLock(free)
lock.acquire()
out["held"] = lock.held
with open(os.path.join(free, workdir_lock.LOCK_NAME)) as f:
  out["holder"] = json.load(f)["pid"]
multihost_utils.sync_global_devices("read")
lock.release()
multihost_utils.sync_global_devices("released")
out["left"] = os.listdir(free)
try:
  workdir_lock.WorkdirLock(taken).acquire()
  out["taken"] = "acquired"
except UserError as e:
  out["taken"] = str(e)
print(json.dumps(out), flush=True)
"""


@pytest.mark.slow
def test_only_process_0_locks_and_all_processes_agree(tmp_path):
  free, taken = tmp_path / "free", tmp_path / "taken"
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    address = f"127.0.0.1:{s.getsockname()[1]}"
  env = dict(os.environ, PYTHONPATH=helpers.REPO, JAX_PLATFORMS="cpu")
  with workdir_lock.WorkdirLock(taken):
    procs = [
        subprocess.Popen([
            sys.executable, "-c", TWO_PROCESSES, address,
            str(index),
            str(free),
            str(taken)
        ], cwd=helpers.REPO, env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
        for index in range(2)
    ]
    outs = []
    for proc in procs:
      out, err = proc.communicate(timeout=300)
      assert proc.returncode == 0, err[-3000:]
      outs.append(json.loads(out.splitlines()[-1]))
  first, second = outs
  assert [first["held"], second["held"]] == [True, False]
  assert first["holder"] == second["holder"] == first["pid"]
  assert first["left"] == second["left"] == []
  assert first["taken"] == second["taken"]
  assert f"process {os.getpid()} on host" in first["taken"]
