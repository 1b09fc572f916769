"""Keeps a workdir to one run at a time.

Two processes training in one workdir would overwrite each other's
checkpoints; `WorkdirLock` refuses the second with one line naming the
first.
"""

from __future__ import annotations

import dataclasses
import datetime
import fcntl
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

LOCK_NAME = "run.lock"
# Remote workdirs only, where no file lock exists. The holder rewrites its
# record this often, so that another run can tell a live lock from one left
# behind by a run that was killed.
HEARTBEAT_SECONDS = 60.0
# A remote lock whose heartbeat is this old was left behind.
STALE_SECONDS = 10 * 60.0
# How long a remote writer waits for a competing write to land before it
# reads the lock back (objects have no exclusive create).
SETTLE_SECONDS = 2.0
# Reads of a lock whose holder is still writing its record.
_READ_ATTEMPTS = 5
_MESSAGE_BYTES = 2048


def _now() -> str:
  return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


def _age_seconds(iso_time: str) -> float:
  then = datetime.datetime.fromisoformat(iso_time)
  return (datetime.datetime.now().astimezone() - then).total_seconds()


def _is_local(path: str) -> bool:
  return "://" not in path


def _storage_errors() -> tuple:
  """OSError, and TensorFlow's errors where tf.io.gfile serves gs:// paths."""
  tf = sys.modules.get("tensorflow")
  return (OSError, tf.errors.OpError) if tf else (OSError,)


@dataclasses.dataclass(frozen=True)
class Holder:
  """The run holding a lock, as its lock file records it."""
  host: str
  pid: int
  started: str
  command: str
  # Remote locks only: tells this run's record from a competitor's.
  token: str = ""
  # Remote locks only: when the holder last rewrote its record.
  heartbeat: str = ""

  @classmethod
  def of_this_process(cls, remote: bool) -> Holder:
    now = _now()
    return cls(host=socket.gethostname(), pid=os.getpid(), started=now,
               command=shlex.join(sys.argv),
               token=uuid.uuid4().hex if remote else "",
               heartbeat=now if remote else "")

  def to_json(self) -> str:
    return json.dumps({
        k: v for k, v in dataclasses.asdict(self).items() if v != ""
    })

  @classmethod
  def from_json(cls, text: str) -> Holder:
    """Raises ValueError for anything this module did not write."""
    record = json.loads(text)
    try:
      holder = cls(
          **{
              f.name: record[f.name]
              for f in dataclasses.fields(cls)
              if f.name in record
          })
    except TypeError as e:  # Not an object, or a field missing.
      raise ValueError(str(e)) from None
    if not (all(
        isinstance(getattr(holder, f), str)
        for f in ("host", "started", "command", "token", "heartbeat")) and
            isinstance(holder.pid, int) and 0 < holder.pid < 2**31):
      raise ValueError("fields of the wrong kind")
    return holder

  def short_command(self, limit: int = 200) -> str:
    command = self.command or "command unknown"
    return command if len(command) <= limit else command[:limit] + "..."


def _read_holder(path: str) -> Holder | None:
  """The lock's holder, None if there is no lock; ValueError if damaged.

  A holder writes its record just after creating or locking the file, so
  an unparsable file is read again a few times.
  """
  for attempt in range(_READ_ATTEMPTS):
    try:
      return Holder.from_json(epath.Path(path).read_text())
    except FileNotFoundError:
      return None
    except ValueError:  # Includes UnicodeDecodeError.
      if attempt + 1 == _READ_ATTEMPTS:
        raise
      time.sleep(0.1)


def _same_file(fd: int, path: str) -> bool:
  """Whether `path` still names the file open as `fd`."""
  try:
    return os.path.samestat(os.fstat(fd), os.stat(path))
  except FileNotFoundError:
    return False


class WorkdirLock:
  """Lets one run at a time use a workdir.

  Use as `with WorkdirLock(workdir): ...`, or `acquire()` and `release()`.
  Every process of a run calls it: process 0 takes the lock and all learn
  its decision, so a refused run stops everywhere with the same message.

  The lock is the file `WORKDIR/run.lock`, which records its holder (host,
  pid, start time, command line) for the message that refuses another run.
  In a local workdir the holder keeps an exclusive `flock` on it, which the
  kernel drops however the holder ends (SIGKILL and preemption included), so
  the next run starts at once. A remote workdir (gs://) has no file locks:
  there the holder rewrites a heartbeat time in its record every
  `heartbeat_seconds`, and a record whose heartbeat is `stale_seconds` old
  was left behind and is taken over with a warning (the hosts' clocks need
  to agree to within minutes).
  """

  def __init__(self, workdir, *, heartbeat_seconds: float = HEARTBEAT_SECONDS,
               stale_seconds: float = STALE_SECONDS,
               settle_seconds: float = SETTLE_SECONDS):
    self.workdir = str(workdir).rstrip("/")
    self.path = f"{self.workdir}/{LOCK_NAME}"
    self._heartbeat_seconds = heartbeat_seconds
    self._stale_seconds = stale_seconds
    self._settle_seconds = settle_seconds
    self._fd = None  # Local: the locked file.
    self._holder = None  # Remote: this run's record.
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
    return self._fd is not None or self._holder is not None

  def acquire(self) -> None:
    """Takes the lock or raises UserError naming the run that holds it."""
    error = None
    if jax.process_index() == 0:
      try:
        epath.Path(self.workdir).mkdir(parents=True, exist_ok=True)
        if _is_local(self.path):
          self._lock_local()
        else:
          self._take_remote()
      except UserError as e:
        error = str(e)
      except _storage_errors() as e:
        error = (f"cannot use {self.path} ({e}); pass a --workdir this "
                 "program can write.")
    error = _shared_by_process_0(error)
    if error is not None:
      raise UserError(error)
    if self._holder is not None:
      self._stop.clear()
      self._heart = threading.Thread(target=self._beat, daemon=True,
                                     name="workdir-lock-heartbeat")
      self._heart.start()

  def release(self) -> None:
    """Removes the lock file if it is still this run's."""
    if self._fd is not None:
      fd, self._fd = self._fd, None
      try:
        if _same_file(fd, self.path):
          os.unlink(self.path)  # Still locked: no other run holds it.
        else:
          logging.warning("%s is no longer this run's lock; left in place.",
                          self.path)
      except OSError as e:  # Harmless: the next run locks the file anew.
        logging.warning("Could not remove %s (%s).", self.path, e)
      finally:
        os.close(fd)
    elif self._holder is not None:
      self._stop.set()
      self._heart.join()
      ours, self._holder = self._holder, None
      try:
        if self._read() == ours:
          epath.Path(self.path).unlink()
        else:
          logging.warning("%s is no longer this run's lock; left in place.",
                          self.path)
      except (UserError, *_storage_errors()) as e:
        logging.warning(
            "Could not remove %s (%s); delete it by hand before "
            "the next run in %s.", self.path, e, self.workdir)

  def _in_use_message(self, holder: Holder | None) -> str:
    if holder is None:
      return (f"{self.workdir} is in use by another run; wait for it to end "
              "or pass another --workdir.")
    message = (f"{self.workdir} is in use by process {holder.pid} on host "
               f"{holder.host}, started {holder.started}, running "
               f"`{holder.short_command()}`")
    if _is_local(self.path):
      return f"{message}; wait for it to end or pass another --workdir."
    return (f"{message} (last heartbeat {holder.heartbeat}; a lock whose "
            f"heartbeat stops for {self._stale_seconds / 60:.0f} minutes is "
            "taken over); wait for it to end, pass another --workdir, or, if "
            f"that process is surely gone, delete {self.path}.")

  # ---------------------------------------------------------------- local

  def _lock_local(self) -> None:
    while True:
      fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
      try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
      except BlockingIOError:
        os.close(fd)
        try:
          holder = _read_holder(self.path)
        except ValueError:  # Its record is not written yet.
          holder = None
        raise UserError(self._in_use_message(holder)) from None
      except OSError:  # A file system without file locks.
        os.close(fd)
        raise
      if _same_file(fd, self.path):
        break
      # The holder removed the file as we opened it; lock the next one.
      os.close(fd)
    try:
      os.ftruncate(fd, 0)
      os.write(fd, Holder.of_this_process(remote=False).to_json().encode())
      os.fsync(fd)
    except OSError:
      os.close(fd)
      raise
    self._fd = fd

  # --------------------------------------------------------------- remote

  def _read(self) -> Holder | None:
    """The remote lock's holder, None if there is none; UserError if damaged."""
    try:
      holder = _read_holder(self.path)
      if holder is not None:
        _age_seconds(holder.heartbeat)  # Every remote record has one.
      return holder
    except ValueError:
      raise UserError(
          f"{self.path} is damaged or was not written by smope_jax; delete "
          f"it if no run uses {self.workdir}, then re-run.") from None

  def _take_remote(self) -> None:
    """Writes this run's record, waits `settle_seconds` and reads it back.

    When several runs write at about the same time, the last write stays
    and only its writer finds its own record. This guarantees one holder
    unless a run stalls for longer than `settle_seconds` between reading
    that no lock is there and writing its own (the holder's heartbeat then
    notices and logs it). Cloud Storage reads see the latest write.
    """
    holder = self._read()
    if holder is not None:
      age = _age_seconds(holder.heartbeat)
      if age < self._stale_seconds:
        raise UserError(self._in_use_message(holder))
      logging.warning(
          "Taking over %s from process %d on %s, started %s: its "
          "last heartbeat was %.0f minutes ago, so it has ended.", self.path,
          holder.pid, holder.host, holder.started, age / 60)
    ours = Holder.of_this_process(remote=True)
    epath.Path(self.path).write_text(ours.to_json())
    time.sleep(self._settle_seconds)
    current = self._read()
    if current is None:
      raise UserError(f"{self.path} keeps changing: other runs are starting "
                      f"in {self.workdir}; start one run per workdir.")
    if current != ours:
      raise UserError(self._in_use_message(current))
    self._holder = ours

  def _beat(self) -> None:
    while not self._stop.wait(self._heartbeat_seconds):
      try:
        if self._read() != self._holder:
          logging.error(
              "%s was taken over by another run while this run "
              "held it; the two may now write the same workdir.", self.path)
          return
        holder = dataclasses.replace(self._holder, heartbeat=_now())
        epath.Path(self.path).write_text(holder.to_json())
        self._holder = holder
      except (UserError, *_storage_errors()) as e:
        logging.warning("Could not refresh %s (%s); will retry.", self.path, e)


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
  return bytes(data[1:].astype(np.uint8)).rstrip(b"\0").decode(errors="replace")
