"""Where a task loop is and what it has recorded: `trainer.Run`'s position.

Checkpoints store it as a JSON dict of these fields and the run's config
(`to_meta`, `from_meta`); `checkpointing.check_run_meta` checks that dict
before it is read back.
"""

import dataclasses


@dataclasses.dataclass(frozen=True, kw_only=True)
class Position:
  """Where the run is and what it has recorded: checkpointed as `meta`.

  A phase returns the next position instead of changing this one. Clocks
  are not part of it: a resumed task's seconds count from the resume.
  """
  task: int = 0
  phase: str = "start"
  epoch: int = 0  # Of a training phase.
  step: int = 0  # In the epoch, or in the expert-counting pass.
  global_step: int = 0  # Training steps of the whole run.
  save_id: int = 0  # The step number of the last checkpoint.
  seed: int
  acc_matrix: tuple[tuple[float, ...], ...] = ()  # A row per task done.
  task_seconds: tuple[float, ...] = ()
  train_log: tuple[dict, ...] = ()  # Each logged interval's mean metrics.
  train_images_per_second: tuple[float, ...] = ()  # Of each top-K phase.

  def to_meta(self, config: dict) -> dict:
    """The checkpoint's JSON metadata: the run's config, then each field."""
    return {"config": config, **dataclasses.asdict(self)}

  @classmethod
  def from_meta(cls, meta: dict) -> "Position":
    """The position in metadata that `checkpointing.check_run_meta` passed.

    Its other keys (the config, the task clock of earlier versions) are
    not part of the position.
    """
    fields = {f.name: meta[f.name] for f in dataclasses.fields(cls)}
    fields["acc_matrix"] = tuple(map(tuple, fields["acc_matrix"]))
    for name in ("task_seconds", "train_log", "train_images_per_second"):
      fields[name] = tuple(fields[name])
    return cls(**fields)

  def logged(self, values: dict) -> "Position":
    """With one more training interval's mean metrics."""
    entry = {
        "global_step": self.global_step,
        "task": self.task,
        "phase": self.phase,
        **values
    }
    return dataclasses.replace(self, train_log=(*self.train_log, entry))
