"""Shared test set-up."""

import contextlib
import errno
import gc
import os
import subprocess

from etils import epath
import pytest

# With libtpu installed (the preflight's TPU compiler), JAX would otherwise
# try to start a TPU runtime in every test process, and concurrent
# processes would contend for its lock file. Subprocesses inherit this.
os.environ.setdefault("JAX_PLATFORMS", "cpu")


@pytest.fixture(autouse=True)
def _collect_garbage_on_main_thread():
  """Collects each test's leftovers (e.g. failed orbax tasks) right away.

  Their deferred error logs format tracebacks with `ast`, which on CPython
  3.11 must not run on a background thread while the main thread parses
  too (see `checkpointing._collect_failed_reads`).

  What survives is then frozen: the imports (JAX, TensorFlow, ...) and the
  caches hold millions of long-lived objects, and traversing them again
  after every test would cost about half a second each. The price: a
  reference cycle among frozen objects is never collected (the default
  suite peaks at about 3.5 GB of memory).
  """
  yield
  gc.collect()
  gc.freeze()


@pytest.fixture
def tmpfs():
  """`with tmpfs(path, options) as path:` mounts a small tmpfs there.

  Skips the test where mounting is refused (no root, a container).
  """

  @contextlib.contextmanager
  def mount(path, options):
    path.mkdir(exist_ok=True)
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", options, "tmpfs",
         str(path)], capture_output=True, text=True, check=False)
    if result.returncode:
      pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip()}")
    try:
      yield path
    finally:
      subprocess.run(["umount", str(path)], check=True)

  return mount


@pytest.fixture
def full_disk_at_save(monkeypatch):
  """`full_disk_at_save(n)`: from the n-th checkpoint save on, counted from
  the call, Orbax's writer finds the disk full.

  Orbax writes a checkpoint's `meta` item in a writer thread; that write
  fails after writing half its data, with the OSError a full disk raises.
  For where a tmpfs cannot be mounted; `monkeypatch.undo()` gives the
  space back.
  """
  path_class = type(epath.Path("/"))
  write_text = path_class.write_text

  def arm(n):
    saves = [0]

    def write_meta(self, data, *args, **kwargs):
      if (self.name, self.parent.name) != ("metadata",
                                           "meta.orbax-checkpoint-tmp"):
        return write_text(self, data, *args, **kwargs)
      saves[0] += 1
      if saves[0] < n:
        return write_text(self, data, *args, **kwargs)
      with open(self, "w") as f:
        f.write(data[:len(data) // 2])
      raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))

    monkeypatch.setattr(path_class, "write_text", write_meta)

  return arm
