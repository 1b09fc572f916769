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
# Why each: only what the terminal shows; how often losses are averaged and
# logged; saving reads the state and never changes it; how many checkpoints
# stay on disk; fault injection says where a run stops, not what it
# computes; where the data is read from, not which data; the same decoded
# images, kept or decoded anew; each seed's run has its own workdir and
# `seed`; evaluation counts correct predictions exactly and feeds nothing
# back into training.
RESULT_NEUTRAL_FIELDS = ("progress_bar", "log_every_steps",
                         "checkpoint_every_steps", "keep_checkpoints",
                         "exit_at_step", "data_dir", "cache_data", "seeds",
                         "eval_batch_size")


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
  `ABSENT` standing for the missing value, except a field that the saved
  config predates and the current one leaves at its default: a new field's
  default keeps what runs computed before it existed. Fields in `ignored`
  are skipped. The order is the saved config's, then the fields only the
  current one has.
  """
  saved = configuration.dotted_fields(saved)
  current = configuration.dotted_fields(current)
  defaults = configuration.dotted_fields(configuration.base_config())
  diffs = []
  for name in [*saved, *(n for n in current if n not in saved)]:
    if name in ignored:
      continue
    old, new = saved.get(name, ABSENT), current.get(name, ABSENT)
    if old is ABSENT and name in defaults and new == defaults[name]:
      continue
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
