"""ImageNet-R as the reference uses it: its fixed split and class numbering.

The reference does not split ImageNet-R at random: it reads a fixed list of
24,000 training and 6,000 test images (the split used by every prompt-based
paper that reports ImageNet-R) and numbers the 200 classes in its own
order, not the sorted WordNet-id order. Both ship with this package under
`reference/imagenet_r/` (MIT licence, see the LICENSE there); a seed's class
order is a shuffle of these class numbers.
"""

import functools
import gzip
from importlib import resources

import numpy as np

from smope_jax import errors

_FILES = resources.files("smope_jax.data") / "reference" / "imagenet_r"
EXAMPLES_SHOWN = 3


@functools.cache
def class_wnids() -> tuple[str, ...]:
  """The 200 WordNet ids; position i is the reference's class i."""
  return tuple((_FILES / "classes.txt").read_text().split())


@functools.cache
def listed_files(role: str) -> tuple[str, ...]:
  """`<wnid>/<file name>` of every image of a role, in the reference's order."""
  with gzip.open(_FILES / f"{role}.txt.gz", "rt") as f:
    return tuple(f.read().split())


def _text(name) -> str:
  return name.decode() if isinstance(name, bytes) else str(name)


def labels_of(file_names) -> np.ndarray:
  """The reference's class number of each `<wnid>/<file>` name."""
  number = {wnid: i for i, wnid in enumerate(class_wnids())}
  try:
    return np.array(
        [number[_text(name).split("/", 1)[0]] for name in file_names], np.int64)
  except KeyError as e:
    raise errors.MissingDataError(
        f"ImageNet-R file {e.args[0]!r} belongs to no class of the "
        "reference's 200; the TFDS imagenet_r copy is not the expected "
        "dataset.") from None


def reference_roles(file_names) -> dict[str, np.ndarray]:
  """Positions in `file_names` of the listed train and test images.

  Each role's positions follow the reference's list order, so a role's
  canonical order is the reference's.

  Raises:
    MissingDataError: when the dataset lacks listed files or holds others.
  """
  file_names = [_text(name) for name in file_names]
  position = {name: i for i, name in enumerate(file_names)}
  listed = {role: listed_files(role) for role in ("train", "test")}
  missing = [
      name for names in listed.values() for name in names
      if name not in position
  ]
  extra = sorted(set(position) - set(listed["train"]) - set(listed["test"]))
  problems = []
  if missing:
    problems.append(f"lacks {len(missing)} listed images (e.g. "
                    f"{', '.join(missing[:EXAMPLES_SHOWN])})")
  if extra:
    problems.append(f"holds {len(extra)} images the split does not list "
                    f"(e.g. {', '.join(extra[:EXAMPLES_SHOWN])})")
  if problems:
    raise errors.MissingDataError(
        f"the TFDS imagenet_r copy {' and '.join(problems)}; the reference "
        "split needs exactly its 30,000 images (rebuild it with `tfds build "
        "imagenet_r`), or set --config.imagenet_r_split=random for a seeded "
        "80/20 split that is not comparable with published numbers.")
  return {
      role: np.array([position[name] for name in names], np.int64)
      for role, names in listed.items()
  }
