"""What every weights module shares: the error for files that are not
weights, one-line message pieces, and file digests."""

import hashlib
import os

from smope_jax.errors import MissingWeightsError


class UnreadableWeightsError(MissingWeightsError):
  """The file is not usable weights at all (corrupt, malformed, NaN), as
  opposed to usable weights for another model: the cache deletes those."""


def shown(text, limit=80):
  """A name or value as it may appear in a one-line message."""
  text = text if isinstance(text, str) and text.isprintable() else repr(text)
  return text if len(text) <= limit else text[:limit] + "..."


def reason(error):
  """An exception as '(Type: message)' text on one line."""
  message = " ".join(str(error).split())
  return shown(f"{type(error).__name__}: {message}", 300)


def listed(items):
  """The first few items, comma-separated, for a one-line message."""
  items = list(items)
  return ", ".join(items[:8]) + (" ..." if len(items) > 8 else "")


def sha256_file(path):
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 22), b""):
      digest.update(chunk)
  return digest.hexdigest()


def remove(path):
  """Deletes `path` if it exists."""
  try:
    os.remove(path)
  except FileNotFoundError:
    pass
