"""Continual-learning data: class orders, task splits and input pipelines.

The splits are plain NumPy; TensorFlow starts only when the input pipeline
is first used, so that a config can be checked without it.
"""

from smope_jax.data.splits import class_order
from smope_jax.data.splits import holdout_split
from smope_jax.data.splits import per_class_split
from smope_jax.data.splits import task_classes


def __getattr__(name):
  if name in ("build_continual_data", "ContinualData"):
    from smope_jax.data import pipeline  # pylint: disable=g-import-not-at-top
    return getattr(pipeline, name)
  raise AttributeError(f"module 'smope_jax.data' has no attribute {name!r}")
