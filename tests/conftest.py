"""Shared test set-up."""

import gc
import os

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
