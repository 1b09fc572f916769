"""Saving and resuming the trainer's run state with Orbax.

One checkpoint per step holds two items: `state`, a pytree of arrays
(parameters, optimizer state, expert counts, RNG key data, ...) written with
`StandardSave`, and `meta`, a JSON dict (task index, phase, accuracy matrix so
far, ...). Every process of a multi-process run must call `save` and
`restore_latest`; Orbax decides who writes what.

A run killed mid-save, a full disk or a damaged copy can leave the newest step
unreadable. `restore_latest` then falls back to the newest readable step and
moves the unreadable newer ones aside to `<directory>/corrupt-<step>` (so the
resumed run can save those step numbers again); no checkpoint is ever
deleted. Only a save that fails in this process (a full disk) deletes its own
unfinished directory, to give the space back.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import gc
import json
import logging as std_logging
import sys
import threading
import time
from typing import Any

from absl import logging
from etils import epath
import jax
from jax.experimental import multihost_utils
import numpy as np
import orbax.checkpoint as ocp

from smope_jax import config_compare, errors

_STATE = "state"
_META = "meta"
# How long a failed save waits for its other writers to stop.
WRITER_JOIN_SECONDS = 30.0
# What every smope_jax before the config was checkpointed stored in `meta`:
# a checkpoint with these and no config is an older version's, not damaged.
OLDER_META_KEYS = frozenset(
    ("task", "phase", "epoch", "step", "global_step", "save_id", "seed",
     "acc_matrix", "task_seconds", "train_images_per_second"))


class MalformedCheckpoint(ValueError):
  """A checkpoint whose meta cannot be right; treated like an unreadable one."""


def check_run_meta(meta: Any, workdir: str, config: dict, num_tasks: int,
                   phases: tuple[str, ...]) -> None:
  """Refuses another run's checkpoint; a malformed one counts as corrupt.

  `meta` is a task loop's (`position.Position.to_meta`), `config` the
  current run's as a dict, `phases` every phase name it can hold.

  Raises:
    errors.UserError: the checkpoint was written by an older smope_jax or
      with a config that computes otherwise (only result-neutral fields
      such as logging intervals may differ).
    MalformedCheckpoint: its metadata is not this version's or its stored
      position cannot be right, so it is moved aside and an older one is
      tried.
  """
  if isinstance(meta, dict) and "config" not in meta and (OLDER_META_KEYS
                                                          <= meta.keys()):
    raise errors.UserError(f"the checkpoints in {workdir}/checkpoints were "
                           "written by an older smope_jax; use a new "
                           "--workdir")
  if not (isinstance(meta, dict) and isinstance(meta.get("config"), dict)):
    raise MalformedCheckpoint(
        f"its metadata is a {type(meta).__name__} without the run's config")
  config_compare.require_same_config(workdir, meta["config"], config)
  count = lambda key: isinstance(meta.get(key), int) and (  # noqa: E731
      not isinstance(meta.get(key), bool)) and meta[key] >= 0
  problems = [
      key for key in ("task", "epoch", "step", "global_step", "save_id", "seed")
      if not count(key)
  ]
  problems += [
      key for key in ("task_seconds", "train_log", "train_images_per_second")
      if not isinstance(meta.get(key), list)
  ]
  if not problems:
    if meta["task"] > num_tasks:
      problems.append(f"task {meta['task']}")
    if meta.get("phase") not in phases:
      problems.append(f"phase {meta.get('phase')!r}")
    rows = meta.get("acc_matrix")
    if not (isinstance(rows, list) and len(rows) == meta["task"] and all(
        isinstance(row, list) and len(row) == t + 1 and all(
            isinstance(a, (int, float)) and 0 <= a <= 100
            for a in row)
        for t, row in enumerate(rows))):
      problems.append("accuracy matrix")
  if problems:
    raise MalformedCheckpoint("its stored position is malformed: " +
                              ", ".join(problems))


class Checkpointer:
  """Keeps the last `max_to_keep` (state, meta) checkpoints in `directory`."""

  def __init__(self, directory: epath.PathLike, *, max_to_keep: int = 3):
    self._directory = epath.Path(directory)
    registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
    for args_type in (ocp.args.StandardSave, ocp.args.StandardRestore):
      registry.add(_STATE, args_type, ocp.handlers.StandardCheckpointHandler)
    for args_type in (ocp.args.JsonSave, ocp.args.JsonRestore):
      registry.add(_META, args_type, ocp.handlers.JsonCheckpointHandler)
    # Synchronous saves: the run state (prompts, head, optimizer moments,
    # class statistics) is a few MB, and orbax 0.12's async finaliser was
    # seen racing its own metadata writer on quick consecutive saves
    # ("Checkpoint directory does not exist: N.orbax-checkpoint-tmp/...").
    options = ocp.CheckpointManagerOptions(
        preservation_policy=ocp.checkpoint_managers.LatestN(n=max_to_keep),
        create=True,
        enable_async_checkpointing=False,
    )
    self._manager = ocp.CheckpointManager(self._directory, options=options,
                                          handler_registry=registry)

  @property
  def directory(self) -> epath.Path:
    return self._directory

  def save(self, step: int, state: Any, meta: dict[str, Any], *,
           force: bool = False) -> bool:
    """Writes `state` and `meta` as `step`; True if a save happened.

    Returns False (nothing written) if `step` is not newer
    than the latest checkpoint, unless `force`. A save that fails leaves no
    temporary directory behind.

    Raises:
      errors.UserError: the disk is full (the earlier checkpoints stay).
    """
    # A JSON round trip fails here, not in the background writer, on values
    # JSON cannot hold, and snapshots `meta` against later mutation.
    meta = json.loads(json.dumps(meta))
    args = ocp.args.Composite(**{
        _STATE: ocp.args.StandardSave(state),
        _META: ocp.args.JsonSave(meta),
    })
    try:
      with _held_writer_reports():
        return self._manager.save(step, args=args, force=force)
    except Exception as e:
      self._remove_unfinished(step)
      if not _disk_full(e):
        raise
      raise errors.UserError(
          f"cannot save a checkpoint in {self._directory}: no space left on "
          "the device. Free space there and re-run the same command to "
          "resume from the last checkpoint.") from None

  def restore_latest(self, template: Any,
                     check_meta=None) -> tuple[int, Any, dict] | None:
    """Returns (step, state, meta) of the newest readable checkpoint.

    Args:
      template: a pytree shaped like the saved state. Its leaves (numpy or
        jax arrays, `jax.ShapeDtypeStruct`s with shardings, Python or numpy
        scalars) say what type, dtype and sharding each restored leaf gets.
      check_meta: called with each candidate's meta before its arrays are
        read; it raises `MalformedCheckpoint` for a meta that cannot be
        right (the checkpoint is then treated as unreadable) or a
        `UserError` to refuse the workdir (e.g. another config wrote it).

    Returns:
      None if the directory holds no finished checkpoint.

    Raises:
      errors.UserError: no checkpoint is readable, or the newest readable one
        was written for a differently shaped state (another config).
    """
    self._warn_unfinished_saves()
    steps = sorted(self._manager.all_steps(), reverse=True)
    if not steps:
      return None
    target = jax.tree.map(_restorable_leaf, template)
    bad_steps = []
    for step in steps:
      restored, error = self._try_restore(step, target, check_meta)
      if _all_processes_succeeded(restored is not None):
        self._move_aside(bad_steps)
        state = jax.tree.map(_like_template, template, restored[_STATE])
        return step, state, restored[_META]
      error = _first_line(error) if error else "it failed on another process"
      logging.warning(
          "Checkpoint step %d in %s is unreadable (%s); trying an older one.",
          step, self._directory, error)
      bad_steps.append(step)
    raise errors.UserError(
        f"no readable checkpoint in {self._directory} (steps {steps} all"
        f" failed; the last error was: {error}). To start fresh, pass a new"
        " --workdir or delete that directory.")

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def wait_until_finished(self) -> None:
    """Blocks until every started save is committed; raises if one failed."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.close()

  def _try_restore(self, step: int, target: Any, check_meta=None):
    """Returns (restored composite, None) or (None, the error)."""
    try:
      saved = self._manager.item_metadata(step)[_STATE]
      saved_leaves = ocp.tree.to_flat_dict(saved.tree)
      meta = self._manager.restore(
          step,
          args=ocp.args.Composite(**{_META: ocp.args.JsonRestore()}))[_META]
      if check_meta is not None:
        check_meta(meta)
    except errors.UserError:
      raise
    except Exception as e:  # pylint: disable=broad-exception-caught
      _collect_failed_reads()
      return None, e
    _check_compatible(step, self._directory, saved_leaves, target)
    try:
      args = ocp.args.Composite(**{
          _STATE: ocp.args.StandardRestore(target),
          _META: ocp.args.JsonRestore(),
      })
      return self._manager.restore(step, args=args), None
    except Exception as e:  # pylint: disable=broad-exception-caught
      # Orbax and TensorStore raise many types (ValueError, KeyError,
      # FileNotFoundError, JSONDecodeError...) for missing or damaged files.
      _collect_failed_reads()
      return None, e

  def _move_aside(self, steps: list[int]) -> None:
    """Renames unreadable steps so the resumed run can reuse their numbers."""
    if not steps:
      return
    if jax.process_index() == 0:
      for step in steps:
        source = self._directory / str(step)
        target = self._directory / f"corrupt-{step}"
        suffix = 1
        while target.exists():
          suffix += 1
          target = self._directory / f"corrupt-{step}-{suffix}"
        try:
          source.rename(target)
          logging.warning("Moved unreadable checkpoint %s to %s.", source,
                          target)
        except OSError as e:
          logging.warning(
              "Could not move unreadable checkpoint %s aside (%s); saves at"
              " steps up to %d will be skipped until it is removed.", source, e,
              step)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices("smope_jax_checkpoint_move_aside")
    self._manager.reload()

  def _remove_unfinished(self, step: int) -> None:
    """Deletes what a failed save of `step` left, giving back its space."""
    if jax.process_index() != 0:
      return
    prefix = f"{step}.orbax-checkpoint-tmp"
    with contextlib.suppress(OSError):
      for path in self._directory.iterdir():
        if path.name.startswith(prefix):
          path.rmtree(missing_ok=True)
          logging.info("Removed %s, left by the failed save.", path)

  def _warn_unfinished_saves(self) -> None:
    for tmp in ocp.utils.tmp_checkpoints(self._directory):
      logging.warning(
          "Ignoring %s: a checkpoint whose save never finished (the run"
          " was probably interrupted while saving).", tmp.get())


class _HeldReports(std_logging.Filter):
  """Holds back Orbax's warnings and errors (see `_held_writer_reports`)."""

  def __init__(self):
    super().__init__()
    self.records = []

  def filter(self, record):
    if record.levelno >= std_logging.WARNING and "orbax" in record.pathname:
      self.records.append(record)
      return False
    return True


@contextlib.contextmanager
def _held_writer_reports():
  """Lets what Orbax's writers report during a save out only if it succeeds.

  When a save fails (a full disk), each of Orbax's writer threads logs the
  same error with its traceback, and TensorStore callbacks that reach the
  writer's closed event loop report "Event loop is closed" as unraisable
  exceptions, during the save and after it; the error itself reaches
  `save`, which reports it in one line. So Orbax's log records and the
  unraisable reports are held during the save and passed on only if it
  succeeds; after a failure, late "Event loop is closed" reports are
  dropped for the rest of the process.
  """
  logger = std_logging.getLogger("absl")
  held = _HeldReports()
  unraisable = []
  hook = sys.unraisablehook
  before = set(threading.enumerate())
  logger.addFilter(held)
  sys.unraisablehook = unraisable.append
  try:
    yield
  except BaseException as e:
    if isinstance(e, Exception):  # Not on Ctrl-C: that ends the run now.
      _join_new_threads(before)
    _collect_failed_reads()  # Leftover tasks report now, while held.
    sys.unraisablehook = functools.partial(_unless_closed_loop, hook)
    raise
  else:
    sys.unraisablehook = hook
  finally:
    logger.removeFilter(held)
  for report in unraisable:
    hook(report)
  for record in held.records:
    logger.handle(record)


def _join_new_threads(before: set[threading.Thread]) -> None:
  """Waits for the writer threads a failed save leaves running.

  A save fails as soon as one of its items does; the other items' writers
  go on writing into the save's directory for a moment.
  """
  deadline = time.monotonic() + WRITER_JOIN_SECONDS
  for thread in set(threading.enumerate()) - before:
    while not thread.daemon:
      try:
        thread.join(max(deadline - time.monotonic(), 0))
        break
      except RuntimeError:  # Listed while starting: it cannot be joined yet.
        if time.monotonic() >= deadline:
          break
        time.sleep(0.01)


def _unless_closed_loop(hook, report) -> None:
  if not (isinstance(report.exc_value, RuntimeError) and
          str(report.exc_value) == "Event loop is closed"):
    hook(report)


def _disk_full(error: Exception) -> bool:
  """Orbax reports a full disk as OSError(ENOSPC) or inside a ValueError."""
  return (getattr(error, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or
          "No space left on device" in str(error))


def _collect_failed_reads() -> None:
  """Lets the failed read's leftover asyncio tasks report here and now.

  A failed restore leaves orbax tasks whose unretrieved exceptions are
  logged when they are garbage-collected. Logging formats the traceback, and
  on CPython 3.11 that parses source with `ast`; if the collection happens
  on a background thread while the main thread also parses (TFDS, tests),
  3.11's shared AST recursion counter breaks ("SystemError: AST constructor
  recursion depth mismatch"). Collecting here keeps it on this thread.
  """
  gc.collect()


def _first_line(error: Exception, limit: int = 300) -> str:
  """TensorStore errors embed kilobytes of spec; keep logs readable."""
  text = f"{type(error).__name__}: {error}".split("\n", 1)[0]
  return text if len(text) <= limit else text[:limit] + "..."


def _restorable_leaf(leaf: Any) -> Any:
  """Orbax restores into arrays but rejects numpy scalars as templates."""
  if isinstance(leaf, np.generic):
    return np.asarray(leaf)
  return leaf


def _like_template(template_leaf: Any, restored_leaf: Any) -> Any:
  if isinstance(template_leaf, np.generic):
    return restored_leaf[()]
  return restored_leaf


def _check_compatible(step, directory, saved_leaves, target) -> None:
  """Raises UserError when the checkpoint was saved for another state layout.

  Orbax would otherwise restore a differently shaped numpy leaf silently, or
  fail with an error indistinguishable from a damaged file.
  """
  wanted = {
      k: tuple(getattr(v, "shape", ()))
      for k, v in ocp.tree.to_flat_dict(target).items()
  }
  saved = {k: tuple(v.shape) for k, v in saved_leaves.items()}
  if wanted == saved:
    return
  names = lambda keys: ", ".join("/".join(k) for k in sorted(keys)[:5])
  problems = []
  if missing := wanted.keys() - saved.keys():
    problems.append(f"missing {names(missing)}")
  if extra := saved.keys() - wanted.keys():
    problems.append(f"unexpected {names(extra)}")
  if reshaped := [
      k for k in wanted.keys() & saved.keys() if wanted[k] != saved[k]
  ]:
    problems.append(f"other shapes for {names(reshaped)}")
  raise errors.UserError(
      f"checkpoint step {step} in {directory} does not fit the current model"
      f' and config ({"; ".join(problems)}). Resume with the config that wrote'
      " it, or start fresh with a new --workdir.")


def _all_processes_succeeded(ok: bool) -> bool:
  """Makes every process fall back together if any failed to read a step."""
  if jax.process_count() == 1:
    return ok
  return bool(np.all(multihost_utils.process_allgather(np.int32(ok))))
