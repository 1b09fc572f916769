"""Start-up checks that a run can write where it must.

A read-only directory, a path through a file or a full disk then end the
program at start with one line naming the path and the system's reason,
instead of a traceback at the first checkpoint or download, hours later.
"""

import contextlib
import errno
import json
import os
import socket
import uuid

from smope_jax.errors import UserError

# Written and removed again: a disk that cannot take this is full.
PROBE_BYTES = 4096


def _reason(error: OSError, *ours: str) -> str:
  """The system's reason, naming the file it concerns if not one of ours."""
  reason = error.strerror or str(error)
  if error.filename and os.fspath(error.filename) not in ours:
    reason += f": {os.fspath(error.filename)}"
  return reason


def _probe_name(directory: str) -> str:
  """A probe file that no other process (or host) writes at the same time."""
  name = f".write_probe.{socket.gethostname()}.{os.getpid()}"
  return f"{directory.rstrip('/')}/{name}"


def _advice(error: OSError, other: str) -> str:
  if error.errno in (errno.ENOSPC, errno.EDQUOT):
    return f"free space there or choose another {other}"
  return f"fix its permissions or choose another {other}"


def _check_local(directory: str, what: str, other: str) -> None:
  if os.path.exists(directory) and not os.path.isdir(directory):
    raise UserError(f"{what} {directory} is a file, not a directory; choose "
                    f"another {other}.")
  probe = _probe_name(directory)
  try:
    os.makedirs(directory, exist_ok=True)
    with open(probe, "wb") as f:
      f.write(b"\0" * PROBE_BYTES)
      f.flush()
      os.fsync(f.fileno())
  except OSError as e:
    raise UserError(f"cannot write to {what} {directory} "
                    f"({_reason(e, directory, probe)}); "
                    f"{_advice(e, other)}.") from None
  finally:
    try:
      os.remove(probe)
    except OSError:
      pass  # Never created; an error above says why.


def _check_remote(directory: str, what: str, other: str) -> None:
  """Cloud storage (gs://...) through TensorFlow's file system layer."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  probe = _probe_name(directory)
  try:
    tf.io.gfile.makedirs(directory)
    with tf.io.gfile.GFile(probe, "wb") as f:
      f.write(b"\0" * PROBE_BYTES)
    tf.io.gfile.remove(probe)
  except (tf.errors.OpError, OSError) as e:
    reason = " ".join(str(getattr(e, "message", "") or e).split())
    raise UserError(f"cannot write to {what} {directory} ({reason}); check "
                    "its permissions and quota or choose another "
                    f"{other}.") from None


def check_writable(directory: str, what: str, other: str) -> None:
  """Creates `directory` if needed and writes and removes a probe file there.

  Raises:
    UserError: "cannot write to {what} {directory} (reason); ... choose
      another {other}."
  """
  if "://" in directory:
    _check_remote(directory, what, other)
  else:
    _check_local(directory, what, other)


def check_workdir(path: str) -> None:
  """The workdir (local or gs://) exists or is created, and takes files."""
  check_writable(path, "the workdir", "--workdir")


def weights_cache_dir() -> str:
  """Where presets are cached unless a caller names another directory."""
  return os.path.expanduser(
      os.environ.get("SMOPE_JAX_CACHE") or "~/.cache/smope_jax")


def check_output_file(path: str, flag: str) -> None:
  """Checks early that the file a flag names can be written.

  It must not be a directory, and its directory must exist or be created
  and take files (a file already there is replaced whole).
  """
  if os.path.isdir(path):
    raise UserError(f"{flag}={path} is a directory; name a file.")
  check_writable(os.path.dirname(path) or ".", f"the directory of {flag}", flag)


@contextlib.contextmanager
def atomic_file(path: str, mode: str = "w"):
  """A file that appears at `path` only once it is completely written.

  It is written to a new temporary file in the same directory, synced and
  renamed over `path`; on any failure (a full disk, Ctrl-C) the temporary
  file is removed and `path` keeps its old content, if any.
  """
  tmp = f"{path}.{uuid.uuid4().hex[:8]}.tmp"
  try:
    with open(tmp, mode) as f:
      yield f
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(OSError):
      os.remove(tmp)
    raise


def write_json_file(path: str, record: dict, flag: str) -> None:
  """Writes `record` whole or not at all (a full disk leaves no half file).

  Raises:
    UserError: the file cannot be written; names `flag`.
  """
  _write_text(path, json.dumps(record, indent=2), flag)


def _write_text(path: str, text: str, flag: str) -> None:
  try:
    with atomic_file(path) as f:
      f.write(text)
  except OSError as e:
    raise UserError(f"cannot write {flag}={path} ({e.strerror or e}); free "
                    f"space there or choose another {flag}.") from None


def read_json_file(path: str):
  """A JSON file's content; a missing or damaged file is a UserError."""
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError) as e:
    raise UserError(f"cannot read {path}: {e}") from None


def write_run_json(path: str, record, flag: str = "--workdir") -> None:
  """`write_json_file` for a run's own files, in a local or gs:// workdir.

  Strict: a non-finite number raises ValueError before anything is written,
  never a `NaN` in a file.
  """
  text = json.dumps(record, indent=2, allow_nan=False)
  if "://" not in path:
    _write_text(path, text, flag)
    return
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  with tf.io.gfile.GFile(path, "w") as f:  # An object is replaced whole.
    f.write(text)
