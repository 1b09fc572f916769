"""Keeps a workdir to one run and one config.

A workdir's checkpoints belong to one run: resuming them with another config
would mix two experiments, and two processes training in it at once would
overwrite each other's checkpoints. `config_differences` tells whether a
saved config and the current one may share a workdir; `WorkdirLock` keeps a
second run out while one is under way.
"""

from __future__ import annotations

import collections.abc
import datetime
import json
import os
import shlex
import socket
import sys
import threading
import time
import uuid

from absl import logging
from etils import epath
import jax
from jax.experimental import multihost_utils
import numpy as np

from smope_jax.errors import UserError

# Config fields that cannot change what a run computes; they may differ
# between the run that wrote a checkpoint and the one resuming it.
RESULT_NEUTRAL_FIELDS = (
    "progress_bar",            # Only what the terminal shows.
    "log_every_steps",         # How often losses are averaged and logged.
    "checkpoint_every_steps",  # Saving reads the state and never changes it.
    "keep_checkpoints",        # How many old checkpoints stay on disk.
    "exit_at_step",            # Fault injection: where a run stops, not what it computes.
    "data_dir",                # Where the prepared data is read from, not which data.
    "cache_data",              # The same decoded images, kept in memory or decoded anew.
    "seeds",                   # Each seed's run gets its own workdir and `seed`.
    "eval_batch_size",         # Evaluation counts correct predictions exactly and
                               # feeds nothing back into training.
)


class _Absent:
  """Stands for a field that one of two configs does not have."""

  def __repr__(self):
    return "(absent)"


ABSENT = _Absent()
_LISTED_DIFFERENCES = 8


def _flatten(tree: collections.abc.Mapping, prefix: str = "") -> dict:
  """{"model": {"hidden_size": 768}} -> {"model.hidden_size": 768}."""
  flat = {}
  for key, value in tree.items():
    name = f"{prefix}{key}"
    if isinstance(value, collections.abc.Mapping):
      flat.update(_flatten(value, name + "."))
    else:
      flat[name] = value
  return flat


def _comparable(value):
  """A checkpoint's JSON holds lists where the config held tuples."""
  return list(value) if isinstance(value, tuple) else value


def config_differences(saved: dict, current: dict
                       ) -> list[tuple[str, object, object]]:
  """(dotted field, saved value, current value) of every field that differs.

  Both configs are nested dicts (`config.to_dict()`). A field present in one
  only is a difference, with `ABSENT` standing for the missing value. Fields
  in `RESULT_NEUTRAL_FIELDS` are ignored. The order is the saved config's,
  then the fields only the current one has.
  """
  saved, current = _flatten(saved), _flatten(current)
  diffs = []
  for name in [*saved, *(n for n in current if n not in saved)]:
    if name in RESULT_NEUTRAL_FIELDS:
      continue
    old, new = saved.get(name, ABSENT), current.get(name, ABSENT)
    if _comparable(old) != _comparable(new):
      diffs.append((name, old, new))
  return diffs


def _shown(value) -> str:
  return repr(value) if isinstance(value, str) else str(value)


def describe_differences(workdir: str, diffs: list) -> str:
  """One line for a UserError: the differing fields, then what to do."""
  listed = ", ".join(f"{name} {_shown(old)} -> {_shown(new)}"
                     for name, old, new in diffs[:_LISTED_DIFFERENCES])
  if len(diffs) > _LISTED_DIFFERENCES:
    listed += f" and {len(diffs) - _LISTED_DIFFERENCES} more"
  return (f"{workdir} holds a run with another config: {listed}; resume it "
          "with the same config, or pass a new --workdir.")


def require_same_config(workdir: str, saved: dict, current: dict) -> None:
  """Raises UserError when `saved` and `current` would compute differently."""
  diffs = config_differences(saved, current)
  if diffs:
    raise UserError(describe_differences(workdir, diffs))


# ------------------------------------------------------------------- lock

LOCK_NAME = "run.lock"
# The holder rewrites its lock this often, so that a run on another host,
# which cannot see whether the holder's process exists, can tell a live lock
# from one left behind.
HEARTBEAT_SECONDS = 60.0
# A lock from another host whose heartbeat is this old was left behind.
STALE_SECONDS = 10 * 60.0
# Where a file system has no exclusive create: how long a writer waits for a
# competing write to land before reading the lock back.
SETTLE_SECONDS = 2.0
# Reads of a lock file that is being created (empty for an instant).
_READ_ATTEMPTS = 5
_MESSAGE_BYTES = 2048


def _now() -> datetime.datetime:
  return datetime.datetime.now().astimezone()


def _is_local(path: str) -> bool:
  return "://" not in path


def _process_identity(pid: int) -> str | None:
  """Tells processes apart even when a pid is reused.

  Returns None if no running process has `pid` (zombies count as ended),
  "<boot id>/<start time in clock ticks>" where Linux's /proc tells, and ""
  for a running process that cannot be identified further.
  """
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return None
  except PermissionError:
    pass  # Another user's process: it exists.
  try:
    with open(f"/proc/{pid}/stat") as f:
      # The command name may hold spaces and parentheses: split after it.
      fields = f.read().rsplit(")", 1)[1].split()
  except FileNotFoundError:  # Ended just now, or a system without /proc.
    return None if os.path.isdir("/proc/self") else ""
  except OSError:
    return ""
  if fields[0] in ("Z", "X"):  # Ended, waiting to be reaped.
    return None
  try:
    with open("/proc/sys/kernel/random/boot_id") as f:
      boot_id = f.read().strip()
  except OSError:
    boot_id = ""
  return f"{boot_id}/{fields[19]}"


def _storage_errors() -> tuple:
  """OSError, and TensorFlow's errors where tf.io.gfile serves gs:// paths."""
  tf = sys.modules.get("tensorflow")
  return (OSError, tf.errors.OpError) if tf else (OSError,)


def _age_seconds(iso_time: str) -> float:
  return (_now() - datetime.datetime.fromisoformat(iso_time)).total_seconds()


def _valid(record) -> bool:
  """A lock record this module wrote: the fields the checks rely on."""
  try:
    _age_seconds(record["heartbeat"])
    return (isinstance(record["host"], str) and
            isinstance(record["pid"], int) and 0 < record["pid"] < 2**31 and
            isinstance(record["started"], str) and
            isinstance(record["token"], str))
  except (KeyError, TypeError, ValueError):
    return False


def _command_line(record: dict, limit: int = 200) -> str:
  command = str(record.get("command", "")) or "command unknown"
  return command if len(command) <= limit else command[:limit] + "..."


class WorkdirLock:
  """Lets one run at a time use a workdir.

  Use as `with WorkdirLock(workdir): ...`, or `acquire()` and `release()`.
  Every process of a run calls it: process 0 takes the lock and all learn
  its decision, so a refused run stops everywhere with the same message.

  The lock is the file `WORKDIR/run.lock`, a JSON record of the holder:
  host, pid, start time, command line, a random token, and a heartbeat time
  the holder rewrites every `heartbeat_seconds`. An existing lock is
  - kept (the run refuses to start) while its holder may be running;
  - taken over, with a warning, once its holder is known to have ended:
    on the same host, when no running process has its pid (or that pid now
    belongs to a process started later, e.g. after a reboot); a process
    killed outright (SIGKILL, preemption) leaves its lock behind and the
    next run on that host takes it over at once. On another host the pid
    cannot be checked, so the lock is taken over only once its heartbeat is
    `stale_seconds` old: a live holder, however long it runs, never is (the
    hosts' clocks need to agree to within minutes).

  Release removes the file only if it still holds this run's token.
  """

  def __init__(self, workdir, *, heartbeat_seconds: float = HEARTBEAT_SECONDS,
               stale_seconds: float = STALE_SECONDS,
               settle_seconds: float = SETTLE_SECONDS):
    self.workdir = str(workdir).rstrip("/")
    self.path = f"{self.workdir}/{LOCK_NAME}"
    self._heartbeat_seconds = heartbeat_seconds
    self._stale_seconds = stale_seconds
    self._settle_seconds = settle_seconds
    self._record = None
    self._stop = threading.Event()
    self._heart = None

  def __enter__(self):
    self.acquire()
    return self

  def __exit__(self, *unused_exc_info):
    self.release()

  @property
  def held(self) -> bool:
    """True on the process that holds the lock (process 0)."""
    return self._record is not None

  def acquire(self) -> None:
    """Takes the lock or raises UserError naming the run that holds it."""
    error = None
    if jax.process_index() == 0:
      try:
        self._take()
      except UserError as e:
        error = str(e)
      except _storage_errors() as e:
        error = (f"cannot use {self.path} ({e}); pass a --workdir this "
                 "program can write.")
    error = _shared_by_process_0(error)
    if error is not None:
      raise UserError(error)
    if self.held:
      self._stop.clear()
      self._heart = threading.Thread(target=self._beat, daemon=True,
                                     name="workdir-lock-heartbeat")
      self._heart.start()

  def release(self) -> None:
    """Removes the lock file if it is still this run's."""
    if not self.held:
      return
    self._stop.set()
    self._heart.join()
    token, self._record = self._record["token"], None
    try:
      current = self._read()
      if current is not None and current.get("token") == token:
        epath.Path(self.path).unlink()
      else:
        logging.warning("%s is no longer this run's lock; left in place.",
                        self.path)
    except _storage_errors() as e:
      logging.warning("Could not remove %s (%s); delete it by hand before "
                      "the next run in %s.", self.path, e, self.workdir)

  # ------------------------------------------------------------- taking it

  def _take(self) -> None:
    epath.Path(self.workdir).mkdir(parents=True, exist_ok=True)
    # A competitor can change the file between our read and our write; then
    # judge its lock afresh. Three rounds settle any real contention.
    for _ in range(3):
      holder = self._read()
      if holder is None:
        if self._create():
          return
        continue
      if not _valid(holder):
        raise UserError(
            f"{self.path} is damaged or was not written by smope_jax; delete "
            f"it if no run uses {self.workdir}, then re-run.")
      gone = self._why_gone(holder)
      if gone is None:
        raise UserError(self._in_use_message(holder))
      logging.warning("Taking over %s from process %d on %s, started %s: %s.",
                      self.path, holder["pid"], holder["host"],
                      holder["started"], gone)
      if self._replace(holder):
        return
    raise UserError(f"{self.path} keeps changing: other runs are starting in "
                    f"{self.workdir}; start one run per workdir.")

  def _why_gone(self, holder: dict) -> str | None:
    """Why the holder has surely ended, or None if it may still run."""
    if holder["host"] == socket.gethostname():
      identity = _process_identity(holder["pid"])
      if identity is None:
        return "that process no longer runs"
      if identity and holder.get("process") and identity != holder["process"]:
        return "its pid now belongs to a later process"
      return None
    age = _age_seconds(holder["heartbeat"])
    if age >= self._stale_seconds:
      return (f"its last heartbeat was {age / 60:.0f} minutes ago, so it has "
              "ended")
    return None

  def _in_use_message(self, holder: dict) -> str:
    message = (f"{self.workdir} is in use by process {holder['pid']} on host "
               f"{holder['host']}, started {holder['started']}, running "
               f"`{_command_line(holder)}`")
    if holder["host"] != socket.gethostname():
      message += (f" (last heartbeat {holder['heartbeat']}; a lock whose "
                  f"heartbeat stops for {self._stale_seconds / 60:.0f} "
                  "minutes is taken over)")
    return (f"{message}; wait for it to end, pass another --workdir, or, if "
            f"that process is surely gone, delete {self.path}.")

  def _new_record(self) -> dict:
    now = _now().isoformat(timespec="seconds")
    return {"host": socket.gethostname(), "pid": os.getpid(),
            "process": _process_identity(os.getpid()), "started": now,
            "heartbeat": now, "command": shlex.join(sys.argv),
            "token": uuid.uuid4().hex}

  def _create(self) -> bool:
    """Writes a new lock where none is; False if a competitor's is there."""
    record = self._new_record()
    if not _is_local(self.path):
      return self._write_and_read_back(record)
    try:
      fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
      return False
    try:
      with os.fdopen(fd, "w") as f:
        json.dump(record, f)
        f.flush()
        os.fsync(f.fileno())
    except OSError:  # A full disk: leave no empty lock behind.
      os.unlink(self.path)
      raise
    self._record = record
    return True

  def _replace(self, stale: dict) -> bool:
    """Puts a new lock in place of `stale`; False if a competitor got there."""
    if not _is_local(self.path):
      return self._write_and_read_back(self._new_record())
    # Renaming is atomic: of several runs taking over the same stale lock,
    # one moves it away, the others find nothing to move.
    aside = f"{self.path}.{uuid.uuid4().hex}"
    try:
      os.rename(self.path, aside)
    except FileNotFoundError:
      return False
    moved = _read_record(aside)
    if moved is None or moved.get("token") != stale["token"]:
      # A competitor's fresh lock replaced the stale one before our rename:
      # put it back (a link never overwrites) and judge it.
      try:
        os.link(aside, self.path)
      except FileExistsError:
        pass
      os.unlink(aside)
      return False
    os.unlink(aside)
    return self._create()

  def _write_and_read_back(self, record: dict) -> bool:
    """Takes the lock on a file system without exclusive create (gs://).

    Writes the record, waits `settle_seconds` and reads it back: when
    several runs write at about the same time, the last write stays and
    only its writer finds its own token. This guarantees one holder unless
    a run stalls for longer than `settle_seconds` between reading that no
    lock is there and writing its own; it cannot stop a stalled run's late
    write from replacing the holder's lock (the holder's heartbeat then
    notices and logs it). Cloud Storage reads see the latest write.
    """
    epath.Path(self.path).write_text(json.dumps(record))
    time.sleep(self._settle_seconds)
    current = self._read()
    if current is None or current.get("token") != record["token"]:
      return False
    self._record = record
    return True

  def _read(self) -> dict | None:
    return _read_record(self.path)

  # ------------------------------------------------------------- heartbeat

  def _beat(self) -> None:
    while not self._stop.wait(self._heartbeat_seconds):
      try:
        current = self._read()
        if current is None or current.get("token") != self._record["token"]:
          logging.error("%s was taken over by another run while this run "
                        "held it; the two may now write the same workdir.",
                        self.path)
          return
        record = dict(self._record,
                      heartbeat=_now().isoformat(timespec="seconds"))
        self._write(record)
        self._record = record
      except _storage_errors() as e:
        logging.warning("Could not refresh %s (%s); will retry.", self.path,
                        e)

  def _write(self, record: dict) -> None:
    """Overwrites the lock so that readers see the old or the new record."""
    text = json.dumps(record)
    if not _is_local(self.path):
      epath.Path(self.path).write_text(text)  # Objects are replaced whole.
      return
    temporary = f"{self.path}.{record['token']}.tmp"
    try:
      with open(temporary, "w") as f:
        f.write(text)
      os.replace(temporary, self.path)
    except OSError:
      if os.path.exists(temporary):
        os.unlink(temporary)
      raise


def _parsed(text: str) -> dict:
  record = json.loads(text)
  if not isinstance(record, dict):
    raise ValueError("not a JSON object")
  return record


def _read_record(path: str) -> dict | None:
  """A lock record: None if there is none, {} if it stays unreadable.

  An exclusive create leaves the file empty for an instant before its
  record is written, so an unparsable file is read again a few times.
  """
  for attempt in range(_READ_ATTEMPTS):
    try:
      return _parsed(epath.Path(path).read_text())
    except FileNotFoundError:
      return None
    except ValueError:  # Includes UnicodeDecodeError.
      if attempt + 1 < _READ_ATTEMPTS:
        time.sleep(0.1)
  return {}


def _shared_by_process_0(error: str | None) -> str | None:
  """Process 0's outcome (None: acquired, else its message) on every process."""
  if jax.process_count() == 1:
    return error
  data = np.zeros(_MESSAGE_BYTES + 1, np.int32)
  if error is not None:
    encoded = error.encode()[:_MESSAGE_BYTES]
    data[0] = 1
    data[1:1 + len(encoded)] = np.frombuffer(encoded, np.uint8)
  data = np.asarray(multihost_utils.broadcast_one_to_all(data))
  if not data[0]:
    return None
  return bytes(data[1:].astype(np.uint8)).rstrip(b"\0").decode(
      errors="replace")
