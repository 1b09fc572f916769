"""Class orders, task chunks and per-class train/test splits.

Everything here is pure Python/NumPy so that the protocol (which classes form
which task, which images are held out) can be checked without TensorFlow.
"""

from collections.abc import Sequence
import random

import numpy as np

from smope_jax import errors


def class_order(num_classes: int, seed: int) -> list[int]:
  """The order in which classes arrive, exactly as the reference draws it.

  The reference calls `random.seed(seed)` and shuffles `list(range(C))`; a
  private `random.Random(seed)` gives the same sequence without touching the
  global generator.

  Args:
    num_classes: number of classes C of the benchmark.
    seed: the run's seed (0..4 in the paper).

  Returns:
    A permutation of range(num_classes): class `order[i]` gets label `i`.
  """
  order = list(range(num_classes))
  random.Random(seed).shuffle(order)
  return order


def task_classes(order: Sequence[int], num_tasks: int) -> list[list[int]]:
  """Splits a class order into `num_tasks` consecutive equal chunks.

  Labels are re-mapped to positions in `order`, so task t owns the remapped
  labels [t * c, (t + 1) * c) with c = len(order) // num_tasks.

  Args:
    order: the class order from `class_order`.
    num_tasks: number of tasks.

  Returns:
    For each task, the original class ids it contains, in arrival order.

  Raises:
    ConfigError: if the classes do not split into equal tasks.
  """
  if num_tasks <= 0 or len(order) % num_tasks:
    raise errors.ConfigError(
        f"config.num_tasks={num_tasks} must be positive and divide the "
        f"{len(order)} classes into equal tasks.")
  c = len(order) // num_tasks
  return [list(order[t * c:(t + 1) * c]) for t in range(num_tasks)]


def per_class_split(
    keys: Sequence[object],
    labels: Sequence[int],
    seed: int,
    test_fraction: float = 0.2,
) -> tuple[np.ndarray, np.ndarray]:
  """A deterministic per-class train/test split that ignores reading order.

  For every class c: its examples are sorted by key, permuted with
  `np.random.default_rng([seed, c])`, and the first
  `floor(n_c * test_fraction + 0.5)` of the permutation are held out for test.
  Seeding per class makes a class's split independent of the other classes.

  Args:
    keys: a unique, sortable key per example (e.g. a file name).
    labels: the class id of every example (non-negative ints).
    seed: split seed.
    test_fraction: fraction of every class held out for test.

  Returns:
    (train_indices, test_indices): ascending indices into `keys`.
  """
  keys = np.asarray(keys)
  labels = np.asarray(labels, dtype=np.int64)
  test = []
  for c in np.unique(labels):
    members = np.flatnonzero(labels == c)
    members = members[np.argsort(keys[members], kind="stable")]
    perm = np.random.default_rng([seed, int(c)]).permutation(len(members))
    test.append(members[perm[:int(len(members) * test_fraction + 0.5)]])
  is_test = np.zeros(len(labels), dtype=bool)
  if test:
    is_test[np.concatenate(test)] = True
  return np.flatnonzero(~is_test), np.flatnonzero(is_test)


def imagenet_r_split(
    file_names: Sequence[str],
    labels: Sequence[int],
    split_seed: int,
    test_fraction: float = 0.2,
) -> tuple[np.ndarray, np.ndarray]:
  """The 80/20 train/test split of ImageNet-R (TFDS ships a single split).

  Per class: sort the images by file name ('<wnid>/<image>.jpg'), permute
  them with `np.random.default_rng([split_seed, label])`, and hold out
  round-half-up(0.2 * n) of them for test (see `per_class_split`). The result
  depends only on the file names, labels and seed, not on the order TFDS
  reads the records in, so every host computes the same split.

  Args:
    file_names: TFDS 'file_name' feature of every image.
    labels: class id of every image.
    split_seed: `config.split_seed`.
    test_fraction: fraction of every class held out for test.

  Returns:
    (train_indices, test_indices): ascending indices into `file_names`.
  """
  return per_class_split(file_names, labels, split_seed, test_fraction)
