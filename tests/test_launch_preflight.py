"""The launch scripts' preflight: compile the run for its target before it starts.

The scripts run with bash in subprocesses, with the fakes of test_launch.py:
gcloud, nvidia-smi and a Python that plays `python -m smope_jax.preflight`
(FAKE_PREFLIGHT) and records how it was called.
"""

from __future__ import annotations

import os
import subprocess

import pytest

from test_launch import BASH, DATA, FAKE_PREFLIGHT, GPU1, GPUN, ROOT, SCRIPTS, TIMEOUT
from test_launch import TPU, TPU_BASE, clean_env, index_of, run, tpu_dry_run, write_exe
from test_launch import bare_path, trap_gcloud  # noqa: F401  (fixtures)

CFG = "--config=configs/cifar100.py"
OVERRIDES = [
    "--config-args=--config.batch_size=256", "--", "--config.note=it's x"
]
PASSED = ["--config.batch_size=256", "--config.note=it's x"]
NOFIT = ("preflight: does not fit {}: 40.0 GiB of 16 GiB per device; "
         "largest per-device batch that fits: 8")


@pytest.fixture
def fake(tmp_path):
  """(env, calls): the fake preflight Python as $PYTHON, with a trap gcloud.

  calls() gives the preflight's calls as (directory, arguments); the trap
  gcloud and the preflight both log to the file env["FAKE_LOG"], in order.
  """
  bindir = tmp_path / "bin"
  bindir.mkdir()
  log = tmp_path / "log"
  write_exe(bindir / "gcloud", f'#!/bin/sh\necho "$@" >> "{log}"\nexit 97\n')
  args = tmp_path / "preflight-args"
  env = clean_env(PATH=f"{bindir}{os.pathsep}{os.environ['PATH']}",
                  FAKE_LOG=str(log),
                  PYTHON=str(write_exe(tmp_path / "python", FAKE_PREFLIGHT)),
                  PREFLIGHT_ARGS=str(args))

  def calls():
    found = []
    for line in args.read_text().splitlines() if args.exists() else []:
      if line.startswith("CWD<"):
        found.append((line[4:-1], []))
      else:
        found[-1][1].append(line[4:-1])
    return found

  return env, calls


def logged(env):
  path = env["FAKE_LOG"]
  return open(path).read().splitlines() if os.path.exists(path) else []


def last_error(result):
  return result.stderr.rstrip("\n").splitlines()[-1]


# -------------------------------------------------------------- Cloud TPU


def test_all_refuses_a_run_that_does_not_fit_before_any_gcloud_call(fake):
  env, calls = fake
  args = [
      "all", *TPU_BASE, "--accelerator-type=v5litepod-16", CFG,
      "--workdir=gs://b/w", DATA, *OVERRIDES
  ]
  refused = run(TPU, *args, env=dict(env, PREFLIGHT_ANSWER="nofit"))
  assert refused.returncode == 3, refused.stderr
  assert last_error(
      refused) == "tpu_vm.sh: error: " + NOFIT.format("tpu:v5e-16")
  assert "train_step  1.0 GiB" in refused.stderr  # the preflight's table is shown
  assert refused.stdout == ""
  # The preflight ran here, in this checkout, on the run's config and
  # overrides (v5litepod as v5e); no gcloud command ran.
  assert calls() == [(str(ROOT), [CFG, "--target=tpu:v5e-16", *PASSED])]
  assert [line.split()[0] for line in logged(env)] == ["preflight"]

  # When it fits, the run goes on to gcloud (which fails here).
  os.remove(env["FAKE_LOG"])
  fits = run(TPU, *args, env=env)
  assert fits.returncode == 2
  assert logged(env)[0].startswith("preflight ")
  assert logged(env)[1:] == ["storage ls gs://bkt/tfds"]


@pytest.mark.parametrize("answer, status, message", [
    ("fits", 0, None),
    ("error", 2, 'tpu_vm.sh: error: preflight: no TPU compiler: '
     'pip install "smope-jax[preflight-tpu]"'),
    ("crash", 2,
     "tpu_vm.sh: error: the preflight failed (exit status 1): ModuleNotFoundError: "
     "No module named 'smope_jax.preflight'; fix that, or pass --skip-preflight"
    ),
])
def test_preflight_command_runs_here_without_gcloud(answer, status, message,
                                                    fake, bare_path):
  env, calls = fake
  env = dict(env, PATH=bare_path, PREFLIGHT_ANSWER=answer)
  result = run(TPU, "preflight", "--accelerator-type=v4-32", CFG, *OVERRIDES,
               env=env)
  assert result.returncode == status, result.stderr
  assert calls() == [(str(ROOT), [CFG, "--target=tpu:v4-32", *PASSED])]
  if message:
    assert last_error(result) == message
  else:
    assert "preflight: fits tpu:v4-32" in result.stderr


def test_preflight_command_needs_type_config_and_python(fake):
  env, calls = fake
  assert "--accelerator-type" in run(TPU, "preflight", CFG, env=env).stderr
  assert "--config" in run(TPU, "preflight", "--accelerator-type=v4-8",
                           env=env).stderr
  missing = run(TPU, "preflight", "--accelerator-type=v4-8", CFG,
                "--python=no-such-py-xyz", env=env)
  assert missing.returncode == 2 and "no-such-py-xyz" in missing.stderr
  assert calls() == [] and logged(env) == []


def test_skip_preflight(fake):
  env, calls = fake
  result = run(TPU, "all", *TPU_BASE, "--accelerator-type=v4-8", CFG,
               "--workdir=gs://b/w", DATA, "--skip-preflight",
               env=dict(env, PREFLIGHT_ANSWER="nofit"))
  assert "tpu_vm.sh: preflight skipped (--skip-preflight)" in result.stderr.splitlines(
  )
  assert calls() == []
  assert logged(env) == ["storage ls gs://bkt/tfds"]


def test_dry_run_prints_the_preflight_first(fake):
  env, calls = fake
  lines = tpu_dry_run(env, "all", *TPU_BASE, "--accelerator-type=v5litepod-8",
                      CFG, "--workdir=gs://b/w", DATA, *OVERRIDES)
  assert index_of(lines, "-m smope_jax.preflight", "--target=tpu:v5e-8") == 0
  assert index_of(lines, "tpu-vm create", "--accelerator-type=v5litepod-8") > 0
  # The printed command, run by a shell, runs the preflight as the script does.
  shown = subprocess.run([BASH, "-c", lines[0]], capture_output=True, text=True,
                         timeout=TIMEOUT, env=env, cwd="/")
  assert shown.returncode == 0, shown.stderr
  assert calls() == [(str(ROOT), [CFG, "--target=tpu:v5e-8", *PASSED])]
  assert logged(env)[1:] == []  # only the preflight ran


@pytest.mark.parametrize(
    "args, preflight",
    [
        (["create", "--accelerator-type=v4-8", CFG], True),
        (["create", "--accelerator-type=v4-8"
         ], False),  # without --config it cannot
        (["run", "--accelerator-type=v4-8", CFG, "--workdir=gs://b/w", DATA
         ], True),
        ([
            "run", "--accelerator-type=v4-8", CFG, "--workdir=gs://b/w", DATA,
            "--skip-preflight"
        ], False),
    ])
def test_create_and_run_preflight_first(args, preflight, fake):
  env, _ = fake
  lines = tpu_dry_run(env, *args, *TPU_BASE)
  has = ["-m smope_jax.preflight" in line for line in lines]
  assert has == [preflight] + [False] * (len(lines) - 1), lines
  assert logged(env) == []


def test_run_takes_the_type_from_the_vm(fake, tmp_path):
  env, calls = fake
  gcloud = tmp_path / "bin" / "gcloud"
  write_exe(
      gcloud, f'#!/bin/sh\necho "$@" >> "{env["FAKE_LOG"]}"\n'
      'case "$*" in *" describe "*) echo "$FAKE_TYPE"; exit 0 ;; esac\nexit 97\n'
  )
  args = ["run", *TPU_BASE, CFG, "--workdir=gs://b/w", DATA]
  result = run(TPU, *args, env=dict(env, FAKE_TYPE="v4-32"))
  assert result.returncode == 2  # storage ls fails
  assert [line.split()[0] for line in logged(env)
         ] == ["compute", "preflight", "storage"]
  assert calls() == [(str(ROOT), [CFG, "--target=tpu:v4-32"])]

  os.remove(env["FAKE_LOG"])
  unknown = run(TPU, *args, env=dict(env, FAKE_TYPE=""))
  assert unknown.returncode == 2
  assert "--accelerator-type" in last_error(
      unknown) and "--skip-preflight" in last_error(unknown)
  assert len(calls()) == 1  # no second preflight
  assert len(logged(env)) == 1  # describe only

  lines = tpu_dry_run(env, *args)
  assert index_of(lines, "tpu-vm describe smope-test", "acceleratorType") == 0
  assert not any("smope_jax.preflight" in line for line in lines)


# --------------------------------------------------------------------- GPUs


def gpu_env(tmp_path, bare_path, names):
  """(env, calls, python): nvidia-smi listing GPUs `names` (None: no nvidia-smi)."""
  bindir = tmp_path / "gpubin"
  bindir.mkdir()
  if names is not None:
    listing = "".join(
        f"echo 'GPU {i}: {n} (UUID: GPU-{i})'\n" for i, n in enumerate(names))
    query = "".join(f"echo '{n}'\n" for n in names)
    write_exe(
        bindir / "nvidia-smi", f'#!/bin/sh\nif [ "$1" = -L ]; then\n{listing}'
        'elif [ "$*" = "--query-gpu=name --format=csv,noheader" ]; then\n'
        f'{query}else exit 9; fi\n')
  args = tmp_path / "preflight-args"
  env = clean_env(PATH=f"{bindir}{os.pathsep}{bare_path}",
                  PREFLIGHT_ARGS=str(args))

  def calls():
    return [
        line[4:-1]
        for line in args.read_text().splitlines()
        if line.startswith("ARG<")
    ] if args.exists() else None

  return env, calls, write_exe(tmp_path / "python", FAKE_PREFLIGHT)


H100 = "NVIDIA H100 80GB HBM3"


def test_gpu_single_preflight_for_the_local_gpus(tmp_path, bare_path):
  env, calls, py = gpu_env(tmp_path, bare_path, [H100] * 8)
  args = [CFG, "--workdir=w", f"--data-dir={tmp_path}", f"--python={py}"]
  result = run(GPU1, *args, *OVERRIDES, env=env)
  assert result.returncode == 0, result.stderr
  assert calls() == [
      CFG, "--target=gpu:h100x8", "--memory_fraction=.9", *PASSED
  ]
  assert "preflight: fits gpu:h100x8" in result.stderr
  assert "MAIN<--config.note=it's x>" in result.stdout  # then the run started

  refused = run(GPU1, *args, *OVERRIDES, env=dict(env,
                                                  PREFLIGHT_ANSWER="nofit"))
  assert refused.returncode == 3
  assert last_error(
      refused) == "gpu_single.sh: error: " + NOFIT.format("gpu:h100x8")
  assert "MAIN<" not in refused.stdout

  skipped = run(GPU1, *args, "--skip-preflight",
                env=dict(env, PREFLIGHT_ANSWER="nofit"))
  assert skipped.returncode == 0 and "MAIN<" in skipped.stdout
  assert "preflight skipped (--skip-preflight)" in skipped.stderr


@pytest.mark.parametrize("select, target", [
    (["--gpus=0,2,5"], "gpu:h100x3"),
    (["--gpus=GPU-0,GPU-1"], "gpu:h100x2"),
    ({
        "CUDA_VISIBLE_DEVICES": "6,7"
    }, "gpu:h100x2"),
])
def test_gpu_single_counts_the_gpus_used(select, target, tmp_path, bare_path):
  env, calls, py = gpu_env(tmp_path, bare_path, [H100] * 8)
  flags = select if isinstance(select, list) else []
  env.update(select if isinstance(select, dict) else {})
  result = run(GPU1, CFG, "--workdir=w", f"--data-dir={tmp_path}",
               f"--python={py}", *flags, env=env)
  assert result.returncode == 0, result.stderr
  assert calls() == [CFG, f"--target={target}", "--memory_fraction=.9"]


@pytest.mark.parametrize("name, model", [
    ("NVIDIA H100 PCIe", "h100"),
    ("NVIDIA A100-SXM4-80GB", "a100-80gb"),
    ("NVIDIA A100 80GB PCIe", "a100-80gb"),
    ("NVIDIA A100-PCIE-40GB", "a100-40gb"),
    ("NVIDIA L4", None),
    ("Tesla V100-SXM2-16GB", None),
])
def test_gpu_models(name, model, tmp_path, bare_path):
  env, calls, py = gpu_env(tmp_path, bare_path, [name] * 2)
  result = run(GPU1, CFG, "--workdir=w", f"--data-dir={tmp_path}",
               f"--python={py}", env=env)
  assert result.returncode == 0, result.stderr
  assert "MAIN<" in result.stdout
  if model:
    assert calls() == [CFG, f"--target=gpu:{model}x2", "--memory_fraction=.9"]
  else:
    assert calls() is None
    warnings = [
        line for line in result.stderr.splitlines() if "preflight" in line
    ]
    assert warnings == [
        f"gpu_single.sh: warning: preflight skipped: no device description "
        f"is known for GPU '{name}' (known: H100, A100 40GB, A100 80GB)"
    ]


def test_gpu_models_of_the_gpus_used(tmp_path, bare_path):
  env, calls, py = gpu_env(tmp_path, bare_path, [H100, "NVIDIA A100-SXM4-40GB"])
  args = [CFG, "--workdir=w", f"--data-dir={tmp_path}", f"--python={py}"]
  mixed = run(GPU1, *args, env=env)
  assert mixed.returncode == 0 and calls() is None
  assert "gpu_single.sh: warning: preflight skipped: GPUs of two models (h100, a100-40gb)" in (
      mixed.stderr.splitlines())
  second = run(GPU1, *args, "--gpus=1", env=env)
  assert second.returncode == 0 and calls() == [
      CFG, "--target=gpu:a100-40gbx1", "--memory_fraction=.9"
  ]


def test_gpu_multi_preflight_counts_all_machines(tmp_path, bare_path):
  env, calls, py = gpu_env(tmp_path, bare_path, ["NVIDIA A100-SXM4-80GB"] * 8)
  args = [
      CFG, "--workdir=gs://b/w", f"--data-dir={tmp_path}", "--coordinator=h:1",
      "--num-processes=3", "--process-id=2", "--gpus=0,1,2,3", f"--python={py}"
  ]
  result = run(GPUN, *args, env=env)
  assert result.returncode == 0, result.stderr
  assert calls() == [CFG, "--target=gpu:a100-80gbx12/3", "--memory_fraction=.9"]
  assert "MAIN<--process_id=2>" in result.stdout

  refused = run(GPUN, *args, env=dict(env, PREFLIGHT_ANSWER="nofit"))
  assert refused.returncode == 3 and "MAIN<" not in refused.stdout
  assert last_error(
      refused) == "gpu_multi.sh: error: " + NOFIT.format("gpu:a100-80gbx12/3")

  dry = run(GPUN, *args, "--dry-run", env=env)
  lines = dry.stdout.splitlines()
  assert "smope_jax.preflight" in lines[
      0] and "--target=gpu:a100-80gbx12/3" in lines[0]
  assert "smope_jax.main" in lines[1] and len(lines) == 2


@pytest.mark.parametrize(
    "script, flags",
    [(GPU1, ["--skip-gpu-check"]),
     (GPUN, ["--coordinator=h:1", "--num-processes=2", "--process-id=0"])],
    ids=["gpu_single", "gpu_multi"])
def test_gpu_without_nvidia_smi_skips_the_preflight(script, flags, tmp_path,
                                                    bare_path):
  env, calls, py = gpu_env(tmp_path, bare_path, None)
  result = run(script, CFG, "--workdir=gs://b/w", f"--data-dir={tmp_path}",
               f"--python={py}", *flags, env=env)
  assert result.returncode == 0, result.stderr
  assert "MAIN<" in result.stdout and calls() is None
  assert f"{script.name}: preflight skipped: without nvidia-smi the GPU model is unknown" in (
      result.stderr.splitlines())


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_help_documents_the_preflight(script):
  text = run(script, "--help").stdout
  assert "--skip-preflight" in text and "smope_jax.preflight" in text
  if script == TPU:
    assert "\n  preflight " in text and "--python PY" in text
