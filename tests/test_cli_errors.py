"""User errors through the command line: one line, exit status 2, early.

Each case runs the real command in a subprocess, as a user would. Errors
that the config or the paths alone show must come before JAX or TensorFlow
start: the whole stderr is the one `error:` line, within a few seconds.
Every rule of the config values is checked in-process in test_configs; a
few of them here prove the path through the command line.
"""

import os
import re
import signal
import subprocess
import sys
import time

import pytest

from smope_jax import cli
from smope_jax import errors
from smope_jax import main
from smope_jax import weights
from smope_jax import workdir as workdir_lib
from tests import helpers

ENV = dict(os.environ, PYTHONPATH=helpers.REPO)
DEMO = "--config=configs/demo.py"
# Config errors stop before JAX starts; the interpreter alone takes ~0.3 s.
EARLY_SECONDS = 5


def _run(module, *flags, env=None):
  """`python -m smope_jax.<module>`; its result and its seconds."""
  start = time.monotonic()
  result = helpers.run_module(module, *flags, env=env, timeout=120)
  return result, time.monotonic() - start


def _assert_one_line(result, expected: str) -> str:
  return helpers.assert_one_line_error(result, expected, alone=True)


def _main_fails_early(tmp_path, *flags, expected: str) -> str:
  result, seconds = _run("main", *flags, f"--workdir={tmp_path / 'run'}")
  line = _assert_one_line(result, expected)
  assert seconds < EARLY_SECONDS, seconds
  return line


# ----------------------------------------------------------- config files

BROKEN_CONFIGS = {
    "raises": ("def get_config():\n"
               "  raise RuntimeError('boom')\n",
               "get_config() raised RuntimeError: boom (line 2)"),
    "fails_to_import": ("import no_such_module_anywhere\n"
                        "def get_config():\n"
                        "  return None\n",
                        "fails to load: ModuleNotFoundError: No module named "
                        "'no_such_module_anywhere' (line 1)"),
    "syntax_error": ("def get_config(:\n"
                     "  return None\n", ", line 1: "),
    "no_get_config": ("config = {'lr': 0.1}\n", "defines no get_config()"),
    "not_a_configdict":
        ("def get_config():\n"
         "  return {'lr': 0.1}\n", "the config is a dict, not an "
         "ml_collections.ConfigDict"),
    "lacks_fields": ("import ml_collections\n"
                     "def get_config():\n"
                     "  config = ml_collections.ConfigDict()\n"
                     "  config.lr = 0.1\n"
                     "  return config\n", "the config lacks config."),
    "unknown_field": ("from smope_jax import configuration\n"
                      "def get_config():\n"
                      "  config = configuration.base_config()\n"
                      "  config.learning_rate = 0.1\n"
                      "  return config\n",
                      "unknown field config.learning_rate; did you mean "
                      "config.lr?"),
    "wrong_type": ("import ml_collections\n"
                   "from smope_jax import configuration\n"
                   "def get_config():\n"
                   "  fields = configuration.base_config().to_dict()\n"
                   "  fields['batch_size'] = '128'\n"
                   "  return ml_collections.ConfigDict(fields)\n",
                   "config.batch_size='128' must be an integer."),
}


@pytest.mark.parametrize("name", list(BROKEN_CONFIGS))
def test_broken_config_file_is_one_line_naming_it(tmp_path, name):
  source, expected = BROKEN_CONFIGS[name]
  path = tmp_path / f"{name}.py"
  path.write_text(source)
  line = _main_fails_early(tmp_path, f"--config={path}", expected=expected)
  assert str(path) in line


def test_missing_config_file_is_one_line(tmp_path):
  missing = tmp_path / "nowhere.py"
  _main_fails_early(
      tmp_path, f"--config={missing}",
      expected=f"cannot read the config file {missing} (No "
      "such file or directory)")


# -------------------------------------------------------------- overrides


@pytest.mark.parametrize("flag,expected", [
    ("--config.learning_rate=0.1",
     "--config.learning_rate: the config has no field 'learning_rate'; did "
     "you mean config.lr?"),
    ("--config.model.hiden_size=64", "did you mean config.model.hidden_size?"),
    ("--config.patch_size=8", "did you mean config.model.patch_size?"),
    ("--config.bach_size=8", "did you mean config.batch_size?"),
    ("--config.nosuch=1",
     "no field 'nosuch'; see the config file for the fields it has."),
    ("--config.batch_size=abc",
     "--config.batch_size=abc: config.batch_size takes an integer."),
    ("--config.lr=fast", "--config.lr=fast: config.lr takes a number."),
    ("--config.joint=maybe", "config.joint takes true or false."),
    ("stray", "unexpected arguments: stray; give every setting as a flag"),
])
def test_bad_override_is_one_line(tmp_path, flag, expected):
  _main_fails_early(tmp_path, DEMO, flag, expected=expected)


# ------------------------------------------------------------- validation


@pytest.mark.parametrize("flags,expected", [
    (["--config.model.num_heads=0"
     ], "config.model.num_heads=0 must be between 1 and 16384."),
    (["--config.image_size=4096", "--config.model.patch_size=8"
     ], "makes 262144 patches of size 8, more than 65536"),
    (["--config.top_k=99"], "config.top_k=99"),
    (["--config.lr=nan"], "config.lr=nan must be positive and finite."),
    (["--config.seeds=1,1"], "config.seeds='1,1' repeats seed 1"),
])
def test_invalid_value_is_one_line_before_jax(tmp_path, flags, expected):
  _main_fails_early(tmp_path, DEMO, *flags, expected=expected)


def test_baseline_sizes_are_checked(tmp_path):
  _main_fails_early(tmp_path, "--config=configs/demo.py:method=dualprompt",
                    "--config.g_prompt_length=3",
                    expected="config.g_prompt_length=3 must be even")


def test_config_errors_stop_before_jax_and_tensorflow_are_imported(tmp_path):
  result, _ = _run("main", DEMO, "--config.lr=nan", f"--workdir={tmp_path}",
                   env={"PYTHONPROFILEIMPORTTIME": "1"})
  assert result.returncode == 2
  imported = {
      line.rsplit("|", 1)[-1].strip()
      for line in result.stderr.splitlines()
      if "|" in line
  }
  assert "smope_jax.configuration" in imported
  assert not imported & {"jax", "jaxlib", "tensorflow", "flax"}, imported


def test_configuration_module_imports_neither_jax_nor_tensorflow():
  code = ("import sys\n"
          "from smope_jax import cli, configuration, workdir\n"
          "configuration.validate(configuration.base_config())\n"
          "print(sorted(m for m in ('jax', 'tensorflow') if m in sys.modules))")
  result = subprocess.run([sys.executable, "-c", code], cwd=helpers.REPO,
                          env=ENV, capture_output=True, text=True, timeout=60,
                          check=True)
  assert result.stdout.strip() == "[]"


# ---------------------------------------------------------------- workdir


def test_workdir_under_a_file_is_one_line(tmp_path):
  (tmp_path / "a_file").write_text("")
  workdir = tmp_path / "a_file" / "run"
  result, seconds = _run("main", DEMO, f"--workdir={workdir}")
  _assert_one_line(
      result, f"cannot write to the workdir {workdir} (Not a "
      "directory); fix its permissions or choose another "
      "--workdir.")
  assert seconds < EARLY_SECONDS


def test_workdir_that_is_a_file_is_one_line(tmp_path):
  workdir = tmp_path / "a_file"
  workdir.write_text("keep me")
  result, _ = _run("main", DEMO, f"--workdir={workdir}")
  _assert_one_line(
      result, f"the workdir {workdir} is a file, not a "
      "directory; choose another --workdir.")
  assert workdir.read_text() == "keep me"


@pytest.mark.skipif(os.geteuid() == 0,
                    reason="root writes to read-only directories")
def test_read_only_workdir_is_one_line(tmp_path):
  workdir = tmp_path / "read_only"
  workdir.mkdir()
  workdir.chmod(0o500)
  try:
    result, _ = _run("main", DEMO, f"--workdir={workdir}")
  finally:
    workdir.chmod(0o700)
  _assert_one_line(
      result, f"cannot write to the workdir {workdir} "
      "(Permission denied)")


def test_read_only_file_system_workdir_is_one_line(tmp_path, tmpfs):
  with tmpfs(tmp_path / "mnt", "ro,size=64k") as mnt:
    result, _ = _run("main", DEMO, f"--workdir={mnt}")
    _assert_one_line(
        result, f"cannot write to the workdir {mnt} (Read-only "
        "file system); fix its permissions or choose another "
        "--workdir.")


def test_full_workdir_is_one_line_and_leaves_no_probe(tmp_path, tmpfs):
  with tmpfs(tmp_path / "mnt", "size=64k") as mnt:
    with open(mnt / "filler", "wb", buffering=0) as f:
      with pytest.raises(OSError):
        while True:
          f.write(b"\0" * 4096)
    for workdir in (mnt, mnt / "run"):
      result, _ = _run("main", DEMO, f"--workdir={workdir}")
      _assert_one_line(
          result, f"cannot write to the workdir {workdir} (No "
          "space left on device); free space there or choose "
          "another --workdir.")
    left = [name for _, _, files in os.walk(mnt) for name in files]
    assert left == ["filler"]


def test_unwritable_weights_cache_is_one_line(tmp_path):
  (tmp_path / "a_file").write_text("")
  cache = tmp_path / "a_file" / "cache"
  result, _ = _run("main", DEMO, "--config.pretrained=sup1k",
                   f"--workdir={tmp_path / 'run'}",
                   env={"SMOPE_JAX_CACHE": str(cache)})
  _assert_one_line(
      result, f"cannot write to the weights cache for 'sup1k' "
      f"{cache} (Not a directory); fix its permissions or choose "
      "another cache directory with SMOPE_JAX_CACHE=DIR.")


SUP1K_FILE = "vit_base_patch16_224.augreg2_in21k_ft_in1k.safetensors"


def test_read_only_cache_holding_the_preset_passes_the_check(
    tmp_path, tmpfs, monkeypatch):
  with tmpfs(tmp_path / "cache", "size=64k") as cache:
    (cache / SUP1K_FILE).write_bytes(b"cached")
    subprocess.run(["mount", "-o", "remount,ro", str(cache)], check=True)
    monkeypatch.setenv("SMOPE_JAX_CACHE", str(cache))
    weights.check_cache("sup1k")  # Cached: only read.
    with pytest.raises(errors.UserError) as error:
      weights.check_cache("sup21k")
  assert str(error.value) == (
      f"cannot write to the weights cache for 'sup21k' {cache} (Read-only "
      "file system); fix its permissions or choose another cache directory "
      "with SMOPE_JAX_CACHE=DIR.")


def test_remote_workdir_goes_through_tensorflow_file_systems():
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  workdir_lib.check_workdir("ram://bucket/run")
  assert tf.io.gfile.listdir("ram://bucket/run") == []  # The probe is gone.
  with pytest.raises(errors.UserError) as error:
    workdir_lib.check_workdir("nosuchscheme://bucket/run")
  message = str(error.value)
  assert message.startswith("cannot write to the workdir "
                            "nosuchscheme://bucket/run (")
  assert "nosuchscheme" in message.split("(", 1)[1]


# ------------------------------------------------------------- interrupts


@pytest.mark.parametrize(
    "signum",
    [signal.SIGINT,
     pytest.param(signal.SIGTERM, marks=pytest.mark.slow)],
    ids=["SIGINT", "SIGTERM"])
def test_interrupted_run_ends_with_one_line_and_status_130(tmp_path, signum):
  workdir = tmp_path / "run"
  with open(tmp_path / "stderr.txt", "w+") as log:
    process = subprocess.Popen(
        [
            sys.executable, "-m", "smope_jax.main", DEMO,
            "--config.pretrained=", "--config.progress_bar=false",
            f"--workdir={workdir}"
        ],
        cwd=helpers.REPO,
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=log,
        # A shell starts background jobs with SIGINT ignored; Ctrl-C in a
        # terminal reaches a foreground run, as restoring it here does.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
      deadline = time.monotonic() + 120
      while not (workdir / "checkpoints").exists():
        assert process.poll() is None, "the run ended before training"
        assert time.monotonic() < deadline, "the run did not start"
        time.sleep(0.2)
      time.sleep(1)  # Into the first task.
      assert process.poll() is None
      process.send_signal(signum)
      process.wait(timeout=60)
    finally:
      if process.poll() is None:
        process.kill()
    log.seek(0)
    stderr = log.read()
  assert process.returncode == 130, stderr[-3000:]
  lines = stderr.splitlines()
  # The position, once training has started: "interrupted at task 1, ...".
  assert re.fullmatch(
      r"interrupted( at task \d+, [\w ,]+)?; re-run the same "
      r"command to resume from the last checkpoint", lines[-1]), lines[-1]
  assert sum("interrupted" in line for line in lines) == 1
  assert "Traceback" not in stderr and "Fatal Python error" not in stderr


def test_interrupt_message_names_the_position_when_known(monkeypatch):
  assert main.interrupt_message(KeyboardInterrupt("task 2, step 140")) == (
      "interrupted at task 2, step 140; re-run the same command to resume "
      "from the last checkpoint")
  monkeypatch.setattr(cli, "progress", "task 3, step 7")
  assert main.interrupt_message(KeyboardInterrupt()) == (
      "interrupted at task 3, step 7; re-run the same command to resume "
      "from the last checkpoint")


# -------------------------------------------------------------- benchmark


@pytest.mark.parametrize("flags,expected", [
    (["--methods=l2p,foo"], "--methods: unknown foo; choose from smope,l2p,"),
    (["--batch=-3"], "--batch=-3 must be between 1 and 1048576, or 0 for the "
     "config's batch."),
    (["--batch=abc"], "flag --batch=abc: invalid literal for int()"),
    (["--repeats=0"], "--repeats=0 must be at least 1."),
    (["--warmup=-1"], "--warmup=-1 must not be negative."),
    (["--matmul_size=0"], "--matmul_size=0 must be between 1 and 16384."),
    (["--config.lr=nan"], "config.lr=nan must be positive and finite."),
    (["--config.learning_rate=1"], "did you mean config.lr?"),
    (["stray"], "unexpected arguments: stray;"),
])
def test_benchmark_flag_error_is_one_line_before_measuring(flags, expected):
  result, seconds = _run("benchmark", DEMO, *flags)
  _assert_one_line(result, expected)
  assert seconds < EARLY_SECONDS


def test_benchmark_unwritable_out_is_one_line_before_measuring(tmp_path):
  (tmp_path / "a_file").write_text("")
  out = tmp_path / "a_file" / "bench.json"
  result, seconds = _run("benchmark", DEMO, f"--out={out}")
  _assert_one_line(
      result, f"the directory of --out {out.parent} is a file, "
      "not a directory; choose another --out.")
  assert seconds < EARLY_SECONDS
  result, _ = _run("benchmark", DEMO, f"--out={tmp_path}")
  _assert_one_line(result, f"--out={tmp_path} is a directory; name a file.")


def test_benchmark_batch_must_split_into_l2p_key_loss_groups():
  result, _ = _run("benchmark", DEMO, "--batch=2", "--methods=l2p")
  assert result.returncode == 2, result.stderr[-3000:]
  assert "Traceback" not in result.stderr
  assert result.stderr.splitlines()[-1] == (
      "error: L2P++'s key loss splits the batch of 2 into "
      "config.key_loss_groups=4 equal groups; pick a batch that divides by it "
      "(config.batch_size, or the benchmark's --batch) or set "
      "--config.key_loss_groups=1.")


def test_benchmark_record_is_written_whole_or_not_at_all(tmp_path, tmpfs):
  with tmpfs(tmp_path / "mnt", "size=64k") as mnt:
    out = mnt / "bench.json"
    out.write_text("{}")
    with pytest.raises(errors.UserError) as error:
      workdir_lib.write_json_file(str(out), {"rows": "x" * 200_000}, "--out")
    assert str(error.value) == (
        f"cannot write --out={out} (No space left on device); free space "
        "there or choose another --out.")
    assert os.listdir(mnt) == ["bench.json"] and out.read_text() == "{}"
