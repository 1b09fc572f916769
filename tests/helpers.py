"""What the tests share: the repository, its tiny runs, its command line.

The tiny run is `configs/demo.py:tiny=true`; a test that needs other numbers
names them as overrides. End-to-end tests run it in-process through
`main.run_from_config`; only tests of the process boundary (exit statuses,
interrupts, several processes) start `python -m smope_jax.<module>`.
"""

import contextlib
import importlib
import os
import re
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The end-to-end protocol on mocked CIFAR-100: 2 tasks of 50 classes, 2
# epochs each, a checkpoint every 3 steps.
TWO_TASKS = {
    "dataset": "cifar100",
    "num_classes": 100,
    "num_tasks": 2,
    "batch_size": 8,
    "eval_batch_size": 16,
    "epochs": 2,
    "freeze_steps": 2,
    "align_epochs": 2,
    "checkpoint_every_steps": 3,
    "log_every_steps": 1
}
# Examples per split that mocked TFDS datasets yield.
MOCK_EXAMPLES = 48


def benchmark_config(name: str, arg=None):
  """`get_config(arg)` of configs/<name>.py."""
  return importlib.import_module(f"configs.{name}").get_config(arg)


def _tiny_arg(arg: str) -> str:
  return f"tiny=true,{arg}" if arg else "tiny=true"


def tiny_config(arg: str = "", **overrides):
  """The tiny run's config; `arg` adds demo.py arguments ("method=l2p").

  Overrides take dotted names, e.g. `**{"model.num_layers": 3}`.
  """
  from configs import demo  # pylint: disable=g-import-not-at-top
  config = demo.get_config(_tiny_arg(arg))
  config.update_from_flattened_dict(overrides)
  return config


def tiny_flags(arg: str = "", **overrides) -> list[str]:
  """The same config as `tiny_config`, as command-line flags."""
  return [
      f"--config=configs/demo.py:{_tiny_arg(arg)}",
      *(f"--config.{k}={v}" for k, v in overrides.items())
  ]


@contextlib.contextmanager
def mocked_tfds(examples: int = MOCK_EXAMPLES):
  """TFDS datasets yield `examples` random examples per split, in the block.

  The mock lives only in the process that enters it.
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  with tfds.testing.mock_data(num_examples=examples,
                              policy=tfds.testing.MockPolicy.USE_CODE):
    yield


def run_main(config, workdir, mock_examples: int = MOCK_EXAMPLES) -> int:
  """Runs `config` in-process as the command line does, on mocked TFDS.

  Returns the exit status the command would have: 0, or 2 after a user
  error (its one `error:` line printed to stderr).
  """
  from smope_jax import main  # pylint: disable=g-import-not-at-top
  with mocked_tfds(mock_examples):
    return main.run_from_config(config, str(workdir))


def run_module(module: str, *args: str, env: dict | None = None,
               timeout: float = 300) -> subprocess.CompletedProcess:
  """`python -m smope_jax.<module> ARGS` from the repository root.

  `env` adds variables to this process's environment.
  """
  return subprocess.run([sys.executable, "-m", f"smope_jax.{module}", *args],
                        cwd=REPO, env=dict(os.environ, PYTHONPATH=REPO,
                                           **(env or {})), capture_output=True,
                        text=True, timeout=timeout, check=False)


def assert_one_line_error(result, *parts: str, alone: bool = False) -> str:
  """Exit status 2 and one `error: ` line, the last, naming every part.

  The message starts lower-case (unless with a name such as JAX); `alone`:
  nothing else on stderr. Returns the line.
  """
  stderr = result.stderr
  assert result.returncode == 2, stderr[-3000:]
  assert "Traceback" not in stderr, stderr[-3000:]
  lines = stderr.splitlines()
  errors = [l for l in lines if l.startswith("error:")]
  assert len(errors) == 1 and lines[-1] == errors[0], stderr[-3000:]
  assert not alone or lines == errors, stderr[-3000:]
  line = errors[0]
  assert line.startswith("error: ") and not re.match(r"error: [A-Z][a-z]",
                                                     line), line
  for part in parts:
    assert part in line, (part, line)
  return line
