"""Multi-process start-up and data parallelism.

The start-up tests check what `distributed.initialize` hands to JAX on a
simulated Cloud TPU VM and under SLURM, and the devices each of 2 real
processes on 127.0.0.1 keeps. The slow tests run the tiny two-task protocol
(`helpers.TWO_TASKS`) through `e2e_runner` on 8 virtual devices and on 2
processes, each in a subprocess since the device count is fixed when JAX
starts.
"""

import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest
from jax._src import distributed as jax_distributed
from jax._src.clusters import cloud_tpu_cluster
from jax._src.clusters import cluster as cluster_env

from smope_jax import distributed
from smope_jax.errors import UserError
from tests import helpers

RUNNER = os.path.join(helpers.REPO, "tests", "e2e_runner.py")


def _start(workdir, devices, *extra, process=None):
  """Starts the tiny protocol with `devices` CPU devices in this process."""
  env = dict(os.environ, PYTHONPATH=helpers.REPO,
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
  flags = [
      *helpers.tiny_flags(**helpers.TWO_TASKS), f"--workdir={workdir}", *extra
  ]
  if process is not None:
    address, count, index = process
    flags += [
        f"--coordinator_address={address}", f"--num_processes={count}",
        f"--process_id={index}"
    ]
  return subprocess.Popen([sys.executable, RUNNER, "--", *flags],
                          cwd=helpers.REPO, env=env, stdout=subprocess.PIPE,
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
  procs = [
      _start(workdir, 2, *extra[i], process=(address, 2, i)) for i in range(2)
  ]
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
  assert ([e["global_step"] for e in a["train_log"]
          ] == [e["global_step"] for e in b["train_log"]])
  for name in ("loss", "ce"):
    np.testing.assert_allclose([e[name] for e in a["train_log"]],
                               [e[name] for e in b["train_log"]], rtol=1e-5,
                               atol=1e-6)


# ------------------------------------------------------------------ start-up
# JAX itself runs in these tests, down to the point where its runtime client
# would connect to the coordinator: a fake client stops it there.

CLUSTER_VARIABLES = ("SLURM_", "OMPI_", "TPU_", "MEGASCALE_", "SMOPE_",
                     "JAX_COORDINATOR", "JAX_LOCAL_DEVICE_IDS",
                     "KUBERNETES_SERVICE_HOST")


class Connecting(Exception):
  """Raised by the fake runtime client with (coordinator, process id)."""


@pytest.fixture
def jax_start(monkeypatch):
  """No cluster variables, a fresh JAX distributed state, and a record.

  The record holds what JAX's cluster detection returned (`detected`) and
  which devices JAX restricted the process to (`visible`).
  """
  for name in list(os.environ):
    if name.startswith(CLUSTER_VARIABLES):
      monkeypatch.delenv(name)
  monkeypatch.setattr(jax_distributed, "global_state", jax_distributed.State())
  monkeypatch.setattr(jax_distributed.xla_bridge, "backends_are_initialized",
                      lambda: False)

  def fake_client(address, process_id, **unused_kwargs):
    raise Connecting(address, process_id)

  monkeypatch.setattr(jax_distributed._jax, "get_distributed_runtime_client",
                      fake_client)
  monkeypatch.setattr(jax_distributed._jax, "get_distributed_runtime_service",
                      lambda *unused_args, **unused_kwargs: None)
  record = {"detected": [], "visible": []}
  detect = cluster_env.ClusterEnv.auto_detect_unset_distributed_params

  def recording_detect(*args):
    record["detected"].append(detect(*args))
    return record["detected"][-1]

  monkeypatch.setattr(cluster_env.ClusterEnv,
                      "auto_detect_unset_distributed_params",
                      staticmethod(recording_detect))
  monkeypatch.setattr(
      jax_distributed.config, "update",
      lambda name, value: record["visible"].append((name, value)))
  return record


def simulate_cloud_tpu_vm(monkeypatch, worker: int, endpoints: str):
  """What JAX sees on a Cloud TPU VM: libtpu found, metadata server up."""
  metadata = {
      "agent-worker-number": str(worker),
      "worker-network-endpoints": endpoints,
      "tpu-env": f"WORKER_ID: '{worker}'\n"
  }
  monkeypatch.setattr(cluster_env, "running_in_cloud_tpu_vm", True)
  monkeypatch.setattr(cloud_tpu_cluster, "running_in_cloud_tpu_vm", True)
  monkeypatch.setattr(
      cloud_tpu_cluster, "get_metadata", lambda key: (metadata[key], 200)
      if key in metadata else ("", 404))


@pytest.mark.parametrize(
    "worker, endpoints, expected",
    [
        # v4-32: 4 hosts, this is worker 2; the coordinator is worker 0, on
        # the port JAX uses on TPU VMs.
        (2, "10.130.0.5,10.130.0.6,10.130.0.7,10.130.0.8",
         ("10.130.0.5:8482", 4, 2, None)),
        # The old endpoint format, name:id:ip.
        (1, "w-0:0:10.0.0.2,w-1:1:10.0.0.3", ("10.0.0.2:8482", 2, 1, None)),
        # A single host joins as process 0 of 1.
        (0, "10.0.0.9", ("10.0.0.9:8482", 1, 0, None)),
    ])
def test_cloud_tpu_vm_is_detected_by_jax(jax_start, monkeypatch, worker,
                                         endpoints, expected):
  simulate_cloud_tpu_vm(monkeypatch, worker, endpoints)
  monkeypatch.setenv(distributed.DISTRIBUTED_ENV, "auto")
  with pytest.raises(Connecting) as connecting:
    distributed.initialize()
  assert jax_start["detected"] == [expected]
  assert connecting.value.args == (expected[0], expected[2])
  assert jax_start["visible"] == []  # A TPU process keeps all its chips.


def test_without_request_one_process_runs_alone(jax_start, monkeypatch):
  calls = []
  monkeypatch.setattr(jax.distributed, "initialize",
                      lambda *args, **kwargs: calls.append((args, kwargs)))
  distributed.initialize()
  assert calls == []


def test_detection_requested_but_no_cluster_is_a_user_error(
    jax_start, monkeypatch):
  monkeypatch.setenv(distributed.DISTRIBUTED_ENV, "auto")
  with pytest.raises(UserError, match="detected no cluster"):
    distributed.initialize()
  monkeypatch.setenv(distributed.DISTRIBUTED_ENV, "yes")
  with pytest.raises(UserError, match="'auto' or unset"):
    distributed.initialize()


SLURM_TASK_1 = {
    "SLURM_JOB_ID": "5000",
    "SLURM_STEP_NODELIST": "gpu[07-08]",
    "SLURM_NTASKS": "2",
    "SLURM_PROCID": "1",
    "SLURM_LOCALID": "0"
}


def test_slurm_with_explicit_arguments_keeps_every_device(
    jax_start, monkeypatch):
  for name, value in SLURM_TASK_1.items():
    monkeypatch.setenv(name, value)
  calls = []
  real_initialize = jax.distributed.initialize

  def recording_initialize(*args, **kwargs):
    calls.append(kwargs)
    return real_initialize(*args, **kwargs)

  monkeypatch.setattr(jax.distributed, "initialize", recording_initialize)
  with pytest.raises(Connecting) as connecting:
    distributed.initialize("gpu07:12355", 2, 1)
  assert calls == [
      dict(coordinator_address="gpu07:12355", num_processes=2, process_id=1,
           cluster_detection_method="deactivate")
  ]
  assert connecting.value.args == ("gpu07:12355", 1)
  assert jax_start["detected"] == [] and jax_start["visible"] == []

  # What the same arguments do with JAX's detection left on: one GPU only.
  monkeypatch.setattr(jax_distributed, "global_state", jax_distributed.State())
  with pytest.raises(Connecting):
    real_initialize("gpu07:12355", 2, 1)
  assert ("jax_cuda_visible_devices", "0") in jax_start["visible"]


def test_explicit_arguments_from_the_environment(jax_start, monkeypatch):
  monkeypatch.setenv("SMOPE_COORDINATOR_ADDRESS", "10.0.0.1:1234")
  monkeypatch.setenv("SMOPE_NUM_PROCESSES", "3")
  monkeypatch.setenv("SMOPE_PROCESS_ID", "2")
  for name, value in SLURM_TASK_1.items():
    monkeypatch.setenv(name, value)
  with pytest.raises(Connecting) as connecting:
    distributed.initialize()
  assert connecting.value.args == ("10.0.0.1:1234", 2)
  assert jax_start["visible"] == []
  monkeypatch.delenv("SMOPE_PROCESS_ID")
  with pytest.raises(UserError, match="--process_id"):
    distributed.initialize()


# Started twice: one SLURM task of a 2-node job, with 2 CPU devices, joined
# to the other on 127.0.0.1 with explicit arguments.
SLURM_TASK = """
import json, sys
import jax
from smope_jax import distributed
distributed.initialize(sys.argv[1], 2, int(sys.argv[2]))
print(json.dumps(dict(local=jax.local_device_count(), total=jax.device_count(),
                      processes=jax.process_count(),
                      visible=jax.config.read("jax_cuda_visible_devices"))))
"""


def test_two_slurm_tasks_keep_their_devices():
  """The run itself: each process has both of its devices, 4 in all.

  On CPU, JAX's one-device restriction would show as jax_cuda_visible_devices
  (the setting it makes for GPUs), so that is checked along with the counts.
  """
  address = f"127.0.0.1:{_free_port()}"
  procs = []
  for task in range(2):
    env = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith(CLUSTER_VARIABLES)
    }
    env.update(PYTHONPATH=helpers.REPO, JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_force_host_platform_device_count=2",
               SLURM_JOB_ID="77", SLURM_STEP_NODELIST="localhost",
               SLURM_NTASKS="2", SLURM_PROCID=str(task),
               SLURM_LOCALID=str(task), SLURM_NODEID="0")
    procs.append(
        subprocess.Popen([sys.executable, "-c", SLURM_TASK, address,
                          str(task)], cwd=helpers.REPO, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True))
  for proc in procs:
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    assert json.loads(out.splitlines()[-1]) == dict(local=2, total=4,
                                                    processes=2, visible="all")


@pytest.mark.slow
def test_eight_devices_match_one_device(tmp_path):
  one = _run(tmp_path / "one", 1)
  eight = _run(tmp_path / "eight", 8)
  _assert_same_run(one, eight)


@pytest.mark.slow
def test_two_processes_match_one_process_and_resume(tmp_path):
  reference = _run(tmp_path / "four_devices", 4)

  results = _run_two_processes(tmp_path / "two_processes")
  assert [status for status, _ in results] == [0, 0], results[0][1][-3000:]
  together = _metrics(tmp_path / "two_processes")
  _assert_same_run(reference, together)
  # Only process 0 writes reports: one TensorBoard event file, not two.
  events = [
      n for n in os.listdir(tmp_path / "two_processes")
      if n.startswith("events.out.tfevents")
  ]
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
