r"""Command line: `python -m smope_jax.main --config=CONFIG --workdir=DIR`.

Re-running the same command resumes from the newest checkpoint in DIR; a
finished run only reports. Problems the user can fix end with one message
and exit status 2 instead of a traceback.
"""

import os

# TensorFlow serves only the input pipeline; keep its C++ start-up chatter
# out. Set before anything imports TensorFlow.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

import contextlib  # pylint: disable=g-import-not-at-top,g-bad-import-order
import logging as std_logging  # pylint: disable=g-import-not-at-top,g-bad-import-order
import signal  # pylint: disable=g-import-not-at-top,g-bad-import-order
import sys  # pylint: disable=g-import-not-at-top,g-bad-import-order

from absl import flags
from absl import logging
from ml_collections import config_flags

from smope_jax import cli
from smope_jax import configuration
from smope_jax import workdir
from smope_jax.errors import UserError

# Exit status of a run ended by Ctrl-C or SIGTERM, as a shell reports SIGINT.
EXIT_INTERRUPTED = 130

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file, e.g. configs/cifar100.py or "
    "configs/imagenet_r.py:tasks=20; override fields with --config.x=y.",
    lock_config=True)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Directory (local or gs://) for checkpoints, metrics, "
    "plots and logs.")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", "", "HOST:PORT of process 0 in a multi-process "
    "run (GPU/CPU clusters). On Cloud TPU VMs set SMOPE_DISTRIBUTED=auto "
    "instead (launch/tpu_vm.sh does) and JAX finds the slice.")
_NUM_PROCESSES = flags.DEFINE_integer(
    "num_processes", 0, "Number of processes in a multi-process run.")
_PROCESS_ID = flags.DEFINE_integer(
    "process_id", -1, "This process's index in a multi-process run.")


class _QuietLibraries(std_logging.Filter):
  """Keeps our INFO lines; libraries (orbax, tfds, ...) only from WARNING."""

  def filter(self, record):
    return (record.levelno >= std_logging.WARNING or
            "smope_jax" in record.pathname)


# One instance: adding it again (a later run in the same process) is a no-op.
_QUIET_LIBRARIES = _QuietLibraries()


class _WorkdirLog(std_logging.Handler):
  """WORKDIR/log.txt: every record written and flushed at once.

  A local file is appended to; on a bucket (gs://), where objects cannot be
  appended to, the whole log is rewritten after each record, which keeps it
  complete whenever the run stops. A record that cannot be written (a full
  disk) leaves no partial line and no error report; it is kept and written
  before the next record once there is room again, so the log stays whole up
  to the last record the disk could take.
  """

  # Records kept while the file cannot be written, at most.
  MAX_PENDING = 10_000

  def __init__(self, path: str):
    super().__init__()
    self.path = path
    self.setFormatter(
        std_logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    self.addFilter(_QUIET_LIBRARIES)
    self._remote = "://" in path
    self._lines = []  # Local: records not written yet; remote: the log.
    if self._remote:
      import tensorflow as tf  # pylint: disable=g-import-not-at-top
      if tf.io.gfile.exists(path):
        with tf.io.gfile.GFile(path) as f:
          self._lines = [f.read()]

  def emit(self, record):
    try:
      line = self.format(record) + "\n"
    except Exception:  # pylint: disable=broad-exception-caught
      self.handleError(record)
      return
    if not self._remote:
      del self._lines[:-self.MAX_PENDING + 1]
    self._lines.append(line)
    try:
      if self._remote:
        import tensorflow as tf  # pylint: disable=g-import-not-at-top
        with tf.io.gfile.GFile(self.path, "w") as f:
          f.write("".join(self._lines))
      else:
        _append_whole(self.path, "".join(self._lines).encode())
        self._lines = []
    except Exception:  # pylint: disable=broad-exception-caught
      pass  # Kept in self._lines for the next record.


def _append_whole(path: str, data: bytes) -> None:
  """Appends `data` to `path` entirely, or not at all (raising OSError)."""
  with open(path, "ab", buffering=0) as f:
    start = f.seek(0, os.SEEK_END)
    try:
      while data:
        data = data[f.write(data):]
    except OSError:
      f.truncate(start)
      raise


@contextlib.contextmanager
def _log_to_workdir(workdir: str):
  """Also logs to WORKDIR/log.txt on process 0, within the block.

  A UserError that ends the block is its last line, as on the terminal.
  """
  import jax  # pylint: disable=g-import-not-at-top
  root = std_logging.getLogger()
  handler = std_logging.NullHandler()
  if jax.process_index() == 0:
    handler = _WorkdirLog(f"{workdir}/log.txt")
  root.addHandler(handler)
  try:
    yield
  except UserError as e:
    handler.handle(
        std_logging.LogRecord(__name__, std_logging.ERROR, __file__, 0, "%s",
                              (e,), None))
    raise
  finally:
    root.removeHandler(handler)


def _interrupt(signum, frame):
  del signum, frame
  raise KeyboardInterrupt


@contextlib.contextmanager
def _sigterm_interrupts():
  """SIGTERM (preemption, `kill`) ends the run like Ctrl-C, in this block.

  A SIGTERM that is ignored or handled already stays so.
  """
  previous = signal.getsignal(signal.SIGTERM)
  if previous == signal.SIG_DFL:
    signal.signal(signal.SIGTERM, _interrupt)
  try:
    yield
  finally:
    signal.signal(signal.SIGTERM, previous)


def interrupt_message(error: KeyboardInterrupt) -> str:
  """The one line of an interrupted run, naming where it was if known."""
  where = error.args[0] if error.args else cli.progress
  at = f" at {where}" if where else ""
  return (f"interrupted{at}; re-run the same command to resume from the "
          "last checkpoint")


def check_before_start(config, workdir_path: str) -> None:
  """What the config and the paths alone can show, before any work starts.

  The config (seeds included) is checked before JAX or TensorFlow is even
  imported; then the workdir and the weights' source and cache.

  Raises:
    UserError: the first problem, in one sentence.
  """
  configuration.validate(config)
  workdir.check_workdir(workdir_path)
  # The demo makes its own backbone.
  if config.pretrained and config.pretrained != "demo":
    from smope_jax import weights  # pylint: disable=g-import-not-at-top
    weights.check_source(config.pretrained)
    if config.pretrained in weights.PRESETS:
      weights.check_cache(config.pretrained)


def _stop(message: str) -> None:
  """Ends an interrupted run at once, with `message` as its last line.

  The interrupt may have stopped a library mid-way (a tf.data thread, a
  file write); tearing the interpreter down around it can hang or crash
  after the message, so the process exits without it, as after `kill -9`,
  from which every run resumes. Log files are flushed first; another
  interrupt meanwhile ends the process there.
  """

  def exit_now(*_):
    os._exit(EXIT_INTERRUPTED)  # pylint: disable=protected-access

  for signum in (signal.SIGINT, signal.SIGTERM):
    signal.signal(signum, exit_now)
  std_logging.shutdown()
  print(message, file=sys.stderr, flush=True)
  sys.stdout.flush()
  os._exit(EXIT_INTERRUPTED)  # pylint: disable=protected-access


def _report(error: UserError) -> int:
  """Prints a user error as its one `error:` line; returns exit status 2."""
  logging.flush()
  print(f"error: {error}", file=sys.stderr)
  return 2


def run_from_config(config, workdir_path: str, coordinator_address: str = "",
                    num_processes: int = 0, process_id: int = -1) -> int:
  """Runs `config` in `workdir_path` as the command line does.

  Tests call it in-process. A UserError ends it with its one `error:` line
  on stderr and status 2; an interrupt ends the process (status 130).

  Returns:
    The exit status: 0, or 2 after a user error.
  """
  with _sigterm_interrupts():
    try:
      check_before_start(config, workdir_path)
      # Imported only now, so that the checks above come before JAX starts.
      from smope_jax import distributed  # pylint: disable=g-import-not-at-top
      from smope_jax import trainer  # pylint: disable=g-import-not-at-top
      from smope_jax import workdir_lock  # pylint: disable=g-import-not-at-top
      logging.get_absl_handler().addFilter(_QUIET_LIBRARIES)
      distributed.initialize(coordinator_address, num_processes, process_id)
      # One run per workdir, taken before any log, checkpoint or output.
      with workdir_lock.WorkdirLock(workdir_path), _log_to_workdir(
          workdir_path):
        trainer.train_and_evaluate(config, workdir_path, validated=True)
    except UserError as e:
      return _report(e)
    except KeyboardInterrupt as e:
      _stop(interrupt_message(e))
  return 0


def main(argv):
  """The command line: its flags, then `run_from_config`."""
  try:
    cli.refuse_arguments(argv)
  except UserError as e:
    sys.exit(_report(e))
  sys.exit(
      run_from_config(_CONFIG.value, _WORKDIR.value, _COORDINATOR.value,
                      _NUM_PROCESSES.value, _PROCESS_ID.value))


def run():
  cli.run(main, ["config", "workdir"])


if __name__ == "__main__":
  run()
