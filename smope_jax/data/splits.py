"""Class orders, task chunks and per-class train/test splits.

Everything here is pure Python/NumPy so that the protocol (which classes form
which task, which images are held out) can be checked without TensorFlow.
"""

from collections.abc import Sequence
import random

import numpy as np

from smope_jax import errors


def class_order(num_classes: int, seed: int, *, natural_seed0: bool = False,
                natural: bool = False) -> list[int]:
  """The order in which classes arrive, exactly as the reference draws it.

  The reference calls `random.seed(seed)` and shuffles `list(range(C))`; a
  private `random.Random(seed)` gives the same sequence without touching the
  global generator. VQ-Prompt's code shuffles only for seeds above 0, so
  its seed 0 keeps the natural order (`natural_seed0`); HiDe-Prompt's
  code never shuffles (`natural`).

  Args:
    num_classes: number of classes C of the benchmark.
    seed: the run's seed (0..4 in the paper).
    natural_seed0: seed 0 gives range(num_classes) unshuffled.
    natural: every seed gives range(num_classes) unshuffled.

  Returns:
    A permutation of range(num_classes): class `order[i]` gets label `i`.
  """
  order = list(range(num_classes))
  if not natural and (seed or not natural_seed0):
    random.Random(seed).shuffle(order)
  return order


def task_classes(order: Sequence[int], num_tasks: int,
                 first_task_classes: int = 0) -> list[list[int]]:
  """Splits a class order into consecutive tasks.

  Every task takes len(order) / num_tasks classes. With
  `first_task_classes` F, task 0 takes F classes instead and the others
  keep that size, so their number follows, as the reference's
  `first_split_size` / `other_split_size`: CIFAR-100 with 10 tasks and
  F = 50 gives 50 + 5 x 10. Labels are re-mapped to positions in `order`,
  so every task owns a consecutive range of remapped labels.

  Args:
    order: the class order from `class_order`.
    num_tasks: the number of equal tasks, which sets the task size.
    first_task_classes: classes of task 0; 0 = the same as every task.

  Returns:
    For each task, the original class ids it contains, in arrival order.

  Raises:
    ConfigError: if the classes do not split that way.
  """
  total = len(order)
  if num_tasks <= 0 or total % num_tasks:
    raise errors.ConfigError(
        f"config.num_tasks={num_tasks} must be positive and divide the "
        f"{total} classes into equal tasks.")
  size = total // num_tasks
  first = first_task_classes or size
  if not 0 < first <= total or (total - first) % size:
    raise errors.ConfigError(
        f"config.first_task_classes={first_task_classes} must be at most "
        f"{total} and leave a multiple of the task size {size} "
        f"(= {total} classes / config.num_tasks={num_tasks}) for the other "
        "tasks.")
  bounds = [0] + list(range(first, total + 1, size))
  return [list(order[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]


def holdout_split(num_examples: int, seed: int,
                  train_fraction: float = 0.8) -> tuple[np.ndarray, np.ndarray]:
  """The reference's validation split of a training set.

  One permutation of all examples drawn with NumPy's legacy generator
  seeded with `seed` (the reference's `np.random.seed(seed)`); the first
  int(0.8 n) examples of it train and the rest validate.

  Returns:
    (train_indices, validation_indices), each ascending.
  """
  perm = np.random.RandomState(seed).permutation(num_examples)
  cut = int(train_fraction * num_examples)
  return np.sort(perm[:cut]), np.sort(perm[cut:])


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
