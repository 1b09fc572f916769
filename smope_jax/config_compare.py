"""Whether two configs compute the same run.

A workdir's checkpoints belong to one config: resuming them with another
would mix two experiments. The comparison table likewise puts only runs of
one protocol in a row. Both ask this module, with one list of the fields
that cannot change results.
"""

from smope_jax import configuration
from smope_jax.errors import UserError

# Config fields that cannot change what a run computes: a checkpoint may be
# resumed, and runs may share a row of the comparison, when only these differ.
RESULT_NEUTRAL_FIELDS = (
    "progress_bar",  # Only what the terminal shows.
    "log_every_steps",  # How often losses are averaged and logged.
    "checkpoint_every_steps",  # Saving reads the state and never changes it.
    "keep_checkpoints",  # How many old checkpoints stay on disk.
    "exit_at_step",  # Fault injection: where a run stops, not
    # what it computes.
    "data_dir",  # Where the prepared data is read from, not
    # which data.
    "cache_data",  # The same decoded images, kept in memory or
    # decoded anew.
    "seeds",  # Each seed's run gets its own workdir and
    # `seed`.
    "eval_batch_size",  # Evaluation counts correct predictions
    # exactly and feeds nothing back into
    # training.
)


class _Absent:
  """Stands for a field that one of two configs does not have."""

  def __repr__(self):
    return "(absent)"


ABSENT = _Absent()
_LISTED_DIFFERENCES = 8


def _comparable(value):
  """A checkpoint's JSON holds lists where the config held tuples."""
  return list(value) if isinstance(value, tuple) else value


def config_differences(
    saved, current,
    ignored=RESULT_NEUTRAL_FIELDS) -> list[tuple[str, object, object]]:
  """(dotted field, saved value, current value) of every field that differs.

  Both configs are nested Mappings (`config.to_dict()`, a saved JSON config)
  or ConfigDicts. A field present in one only is a difference, with
  `ABSENT` standing for the missing value. Fields in `ignored` are skipped.
  The order is the saved config's, then the fields only the current one has.
  """
  saved = configuration.dotted_fields(saved)
  current = configuration.dotted_fields(current)
  diffs = []
  for name in [*saved, *(n for n in current if n not in saved)]:
    if name in ignored:
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


def require_same_config(workdir: str, saved, current) -> None:
  """Raises UserError when `saved` and `current` would compute differently."""
  diffs = config_differences(saved, current)
  if diffs:
    raise UserError(describe_differences(workdir, diffs))
