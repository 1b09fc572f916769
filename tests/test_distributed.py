"""Data parallelism: 8 virtual devices, and 2 processes joined on 127.0.0.1.

Each run is the tiny two-task protocol of `e2e_runner` in a subprocess,
since the device count is fixed when JAX starts. Marked slow: run with
`pytest -m slow`.
"""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

import e2e_runner

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNNER = os.path.join(REPO, "tests", "e2e_runner.py")
pytestmark = pytest.mark.slow


def _start(workdir, devices, *extra, process=None):
  """Starts the tiny protocol with `devices` CPU devices in this process."""
  env = dict(os.environ, PYTHONPATH=REPO,
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
  flags = [*e2e_runner.TINY_FLAGS, f"--workdir={workdir}", *extra]
  if process is not None:
    address, count, index = process
    flags += [f"--coordinator_address={address}",
              f"--num_processes={count}", f"--process_id={index}"]
  return subprocess.Popen([sys.executable, RUNNER, "--", *flags], cwd=REPO,
                          env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)


def _finish(proc, timeout=900) -> tuple[int, str]:
  out, _ = proc.communicate(timeout=timeout)
  return proc.returncode, out


def _run(workdir, devices, *extra):
  status, out = _finish(_start(workdir, devices, *extra))
  assert status == 0, out[-3000:]
  return _metrics(workdir)


def _run_two_processes(workdir, extra=((), ())):
  """Two processes with 2 CPU devices each; returns their exit statuses."""
  address = f"127.0.0.1:{_free_port()}"
  procs = [_start(workdir, 2, *extra[i], process=(address, 2, i))
           for i in range(2)]
  return [_finish(p) for p in procs]


def _metrics(workdir):
  with open(os.path.join(workdir, "metrics.json")) as f:
    return json.load(f)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _assert_same_run(a, b):
  assert a["acc_matrix"] == b["acc_matrix"]
  assert a["expert_counts"] == b["expert_counts"]
  assert ([e["global_step"] for e in a["train_log"]] ==
          [e["global_step"] for e in b["train_log"]])
  for name in ("loss", "ce"):
    np.testing.assert_allclose([e[name] for e in a["train_log"]],
                               [e[name] for e in b["train_log"]],
                               rtol=1e-5, atol=1e-6)


def test_eight_devices_match_one_device(tmp_path):
  one = _run(tmp_path / "one", 1)
  eight = _run(tmp_path / "eight", 8)
  _assert_same_run(one, eight)


def test_two_processes_match_one_process_and_resume(tmp_path):
  reference = _run(tmp_path / "four_devices", 4)

  results = _run_two_processes(tmp_path / "two_processes")
  assert [status for status, _ in results] == [0, 0], results[0][1][-3000:]
  together = _metrics(tmp_path / "two_processes")
  _assert_same_run(reference, together)
  # Only process 0 writes reports: one TensorBoard event file, not two.
  events = [n for n in os.listdir(tmp_path / "two_processes")
            if n.startswith("events.out.tfevents")]
  assert len(events) == 1

  # Process 1 dies abruptly in the middle of task 2; process 0 is then killed
  # too, as a preempted slice would be. The same command resumes.
  steps = [e["global_step"] for e in reference["train_log"] if e["task"] == 1]
  workdir = tmp_path / "killed"
  address = f"127.0.0.1:{_free_port()}"
  first = _start(workdir, 2, process=(address, 2, 0))
  second = _start(workdir, 2, f"--config.exit_at_step={steps[len(steps) // 2]}",
                  process=(address, 2, 1))
  status, out = _finish(second)
  assert status == 3, out[-3000:]
  first.kill()
  first.communicate(timeout=60)
  assert len(_metrics(workdir)["acc_matrix"]) == 1  # Only task 1 finished.

  results = _run_two_processes(workdir)
  assert [status for status, _ in results] == [0, 0], results[0][1][-3000:]
  _assert_same_run(reference, _metrics(workdir))
