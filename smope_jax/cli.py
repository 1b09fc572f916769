"""Shared command-line start-up: flag errors as one line, exit status 2.

absl and ml_collections report a bad flag, a config file that fails to load
or an override of a field that does not exist with a traceback; users get
the message alone.
"""

import sys

from absl import app
from absl import flags

from smope_jax.errors import UserError


def _cause(error: BaseException):
  """The first UserError in an exception's cause/context chain, if any."""
  seen = set()
  while error is not None and id(error) not in seen:
    if isinstance(error, UserError):
      return error
    seen.add(id(error))
    error = error.__cause__ or error.__context__
  return None


def _last_line(text: str) -> str:
  """The final line of a flag error, which config_flags pads with a traceback.

  For "pkg.SomeError: what went wrong" only "what went wrong" is kept.
  """
  lines = [l.strip() for l in text.splitlines() if l.strip()]
  last = lines[-1] if lines else text
  head, sep, rest = last.partition(": ")
  if sep and " " not in head and head.split(".")[-1][:1].isupper():
    return rest
  return last


def parse_flags(argv: list[str]) -> list[str]:
  """Parses flags; a bad flag or config ends with one line and status 2."""
  try:
    remaining = flags.FLAGS(argv)
  except (AttributeError, KeyError) as e:
    # ml_collections raises these for an override of a field that does not
    # exist, e.g. --config.nosuch=1.
    name = str(e).strip("\"'")
    overrides = [a.split("=")[0] for a in argv if a.startswith("--config.")]
    culprit = next((o for o in overrides if name in o.split(".")), name)
    message = (f"{culprit}: the config has no field {name!r}; see the "
               "config file for the fields it has.")
  except flags.Error as e:
    message = _last_line(str(_cause(e) or e))
  else:
    try:  # config_flags loads the file lazily: surface a missing file now.
      if "config" in flags.FLAGS:
        flags.FLAGS.config.keys()
    except OSError as e:
      message = _last_line(str(e))
    else:
      return remaining
  print(f"error: {message}", file=sys.stderr)
  sys.exit(2)


def run(main, required: list[str]) -> None:
  """`app.run(main)` with `required` flags and one-line flag errors."""
  flags.mark_flags_as_required(required)
  app.run(main, flags_parser=parse_flags)
