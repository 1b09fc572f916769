"""Continual-learning batches: what each task, epoch, step and host sees.

A batch's contents are a pure function of (config.seed, task, epoch, step):
the epoch's shuffle is a seeded NumPy permutation and each example's
augmentation uses TF stateless ops seeded by its position in that order. So
any number of processes see the same global batches, and resuming at a step
reproduces exactly what an uninterrupted run would have seen.
"""

from collections.abc import Iterator
import math

from absl import logging
import ml_collections
import numpy as np
import tensorflow as tf

from smope_jax import errors
from smope_jax.data import preprocess
from smope_jax.data import sources
from smope_jax.data import splits

Batch = dict[str, np.ndarray]
_SHUFFLE, _AUGMENT = 0, 1  # Separate random streams per purpose.
# The trainer's passes over a task's training images outside its epochs
# (expert counting, class statistics), each with a shuffle and augmentation
# stream of its own.
PASSES = {"count": -1, "stats": -2}


def _seed_sequence(*keys: int) -> np.random.SeedSequence:
  # SeedSequence wants non-negative entropy; zigzag keeps negatives distinct.
  return np.random.SeedSequence([2 * k if k >= 0 else -2 * k - 1 for k in keys])


class _Store:
  """One task's images of one role, held in memory for random access.

  Random access is what lets an epoch follow an arbitrary permutation and a
  process read only its own shard. Items are encoded bytes (decoded on every
  read) or arrays laid out in one flat buffer (variable image sizes allowed).
  """

  def __init__(self, items: list, labels: np.ndarray, decode):
    self.size = len(labels)
    self.labels = tf.constant(labels, tf.int32)
    self._decode = decode
    self._bytes = None
    if items and isinstance(items[0], bytes):
      self._bytes = tf.constant(np.array(items, dtype=object))
      return
    shapes = np.array([a.shape for a in items], np.int64).reshape(-1, 3)
    sizes = np.prod(shapes, axis=1)
    self._shapes = tf.constant(shapes)
    self._offsets = tf.constant(np.cumsum(sizes) - sizes)
    self._flat = tf.constant(
        np.concatenate([a.ravel() for a in items]) if items else [0])

  def image(self, i: tf.Tensor) -> tf.Tensor:
    if self._bytes is not None:
      raw = tf.gather(self._bytes, i)
    else:
      shape, start = tf.gather(self._shapes, i), tf.gather(self._offsets, i)
      raw = tf.reshape(self._flat[start:start + tf.reduce_prod(shape)], shape)
    image = raw if self._decode is None else self._decode(raw)
    return tf.ensure_shape(image, [None, None, 3])


def _options(threads: int) -> tf.data.Options:
  """tf.data options: `threads` > 0 caps the pipeline at that many threads."""
  options = tf.data.Options()
  if threads:
    options.threading.private_threadpool_size = threads
    options.threading.max_intra_op_parallelism = 1
  return options


def _decode_all(items: list, decode, threads: int) -> list[np.ndarray]:
  """Decodes every item once (config.cache_data), in parallel."""
  if not items:
    return []
  tensor = (np.array(items, dtype=object)
            if isinstance(items[0], bytes) else np.stack(items))
  ds = tf.data.Dataset.from_tensor_slices(tensor)
  decoded = ds.map(preprocess.graph_only(decode), tf.data.AUTOTUNE)
  return list(decoded.with_options(_options(threads)).as_numpy_iterator())


class ContinualData:
  """The task sequence of one benchmark and its batches for this process.

  Batches are dicts of NumPy arrays holding this process's share of a global
  batch: 'image' float32 (b, S, S, 3) in [0, 1], 'label' int32 (b,) remapped
  to positions in `class_order`, 'mask' float32 (b,), 0 on padding rows
  (zero image, a label of the task), with b = global_batch // process_count.
  """

  def __init__(self, config: ml_collections.ConfigDict, source,
               process_index: int, process_count: int, threads: int = 0):
    self._config = config
    self._threads = threads
    self._source = source
    self._process_index = process_index
    self._process_count = process_count
    self.num_classes = source.num_classes
    self.class_names = list(source.class_names)
    # HiDe-Prompt's transforms normalise CIFAR-100 with its own statistics.
    self._cifar = config.dataset == "cifar100"
    self.class_order = splits.class_order(
        self.num_classes, config.seed, natural_seed0=config.natural_order_seed0,
        natural=config.hide.natural_order)
    if config.joint:
      self._tasks = [list(self.class_order)]
    else:
      self._tasks = splits.task_classes(self.class_order, config.num_tasks,
                                        config.first_task_classes)
    self.num_tasks = len(self._tasks)
    bounds = np.cumsum([0] + [len(t) for t in self._tasks])
    # Remapped labels of task t: [class_ranges[t][0], class_ranges[t][1]).
    self.class_ranges = [
        (int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:])
    ]
    self._remap = np.empty(self.num_classes, np.int32)
    self._remap[self.class_order] = np.arange(self.num_classes)
    self._train_store = (None, None)  # Only the latest task's: saves memory.
    self._test_stores = {}  # Every task's: evaluation revisits all of them.

  def task_classes(self, task: int) -> list[int]:
    """The dataset's class ids of a task, in arrival order."""
    return self._check_task(task)

  def _check_task(self, task: int) -> list[int]:
    if not 0 <= task < self.num_tasks:
      raise ValueError(f"task {task} not in [0, {self.num_tasks}).")
    return self._tasks[task]

  def _size(self, role: str, task: int) -> int:
    classes = self._check_task(task)
    return int(np.isin(self._source.labels(role), classes).sum())

  def train_size(self, task: int) -> int:
    return self._size("train", task)

  def test_size(self, task: int) -> int:
    return self._size("test", task)

  def steps_per_epoch(self, task: int, global_batch: int) -> int:
    """Training steps of an epoch: the last partial batch is dropped.

    The reference's training loader drops it (`drop_last=True`), so a task
    of 5,000 images with batch 128 takes 39 steps.
    """
    return self.train_size(task) // global_batch

  def _store(self, role: str, task: int) -> _Store:
    examples = self._source.load(role, self._check_task(task))
    items, decode = examples.items, self._source.decode
    if self._config.cache_data:
      items, decode = _decode_all(items, decode, self._threads), None
    return _Store(items, self._remap[examples.labels], decode)

  def _train(self, task: int) -> _Store:
    if self._train_store[0] != task:
      self._train_store = (None, None)  # Free the old one before loading.
      self._train_store = (task, self._store("train", task))
    return self._train_store[1]

  def _test(self, task: int) -> _Store:
    if task not in self._test_stores:
      self._test_stores[task] = self._store("test", task)
    return self._test_stores[task]

  def _local_batch(self, global_batch: int) -> int:
    if global_batch <= 0 or global_batch % self._process_count:
      raise errors.ConfigError(
          f"the global batch size {global_batch} must be a positive multiple "
          f"of the number of processes ({self._process_count}).")
    return global_batch // self._process_count

  def _positions(self, n: int, global_batch: int, b: int, start_step: int,
                 drop_remainder: bool):
    """Positions in the epoch's order that this process reads, and validity.

    Global batch j is positions [j*G, (j+1)*G); process p reads
    [j*G + p*b, j*G + (p+1)*b). Positions >= n pad the last batch, or with
    `drop_remainder` the last partial batch is left out: the same images
    whatever the number of processes.
    """
    num_steps = n // global_batch if drop_remainder else math.ceil(n /
                                                                   global_batch)
    steps = np.arange(start_step, num_steps)
    pos = (steps[:, None] * global_batch + self._process_index * b +
           np.arange(b)).reshape(-1)
    return pos, pos < n

  def _batches(self, store: _Store, pos, index, valid, image_fn,
               b: int) -> Iterator[Batch]:
    if not len(pos):
      return iter(())
    size = self._config.image_size

    def example(p, i, ok):
      image = tf.cond(ok, lambda: image_fn(store.image(i), p),
                      lambda: tf.zeros([size, size, 3]))
      return {
          "image": image,
          "label": tf.gather(store.labels, i),
          "mask": tf.cast(ok, tf.float32)
      }

    ds = tf.data.Dataset.from_tensor_slices(
        (pos.astype(np.int64), index.astype(np.int64), valid))
    ds = ds.map(preprocess.graph_only(example),
                num_parallel_calls=tf.data.AUTOTUNE)
    ds = ds.batch(b).prefetch(tf.data.AUTOTUNE)
    return ds.with_options(_options(self._threads)).as_numpy_iterator()

  def train_batches(self, task: int, epoch: int | str, global_batch: int, *,
                    start_step: int = 0, drop_remainder: bool = True,
                    test_transform: bool = False) -> Iterator[Batch]:
    """One epoch of the task's training images, shuffled and augmented.

    Args:
      task: task index.
      epoch: the epoch, or the name of a pass of PASSES: the key of the
        shuffle and the augmentation.
      global_batch: examples per step summed over processes.
      start_step: first step to produce (resuming mid-epoch); costs nothing.
      drop_remainder: leave out the last partial batch, as the reference's
        training loader does (training and expert counting); otherwise it is
        padded to the full batch with mask 0 (class statistics).
      test_transform: read the images as the test set is read, without
        augmentation (HiDe-Prompt's statistics).

    Returns:
      An iterator over the remaining local batches of the epoch.
    """
    b = self._local_batch(global_batch)
    if start_step < 0:
      raise ValueError(f"start_step={start_step} must be >= 0.")
    store = self._train(task)
    seed = self._config.seed
    epoch = PASSES.get(epoch, epoch)
    perm = np.random.default_rng(_seed_sequence(_SHUFFLE, seed, task,
                                                epoch)).permutation(store.size)
    pos, valid = self._positions(store.size, global_batch, b, start_step,
                                 drop_remainder)
    index = np.where(valid, perm[np.minimum(pos, store.size - 1)], 0)
    base = tf.constant(
        _seed_sequence(_AUGMENT, seed, task,
                       epoch).generate_state(2).astype(np.int64))
    size = self._config.image_size

    def augment(image, p):
      p_seed = tf.random.experimental.stateless_fold_in(base, p)
      if self._config.hide.transforms:
        return preprocess.hide_train_image(image, p_seed, size, self._cifar)
      return preprocess.train_image(image, p_seed, size)

    return self._batches(store, pos, index, valid,
                         self._test_image if test_transform else augment, b)

  def _test_image(self, image, _):
    size = self._config.image_size
    if self._config.hide.transforms:
      return preprocess.hide_test_image(image, size, self._cifar)
    return preprocess.test_image(image, size, self._config.test_resize)

  def test_batches(self, task: int, global_batch: int) -> Iterator[Batch]:
    """The task's test images in a fixed order, each counted exactly once.

    The last batch is padded with mask 0, so summing mask-weighted results
    over all steps and processes covers every test image once.
    """
    b = self._local_batch(global_batch)
    store = self._test(task)
    pos, valid = self._positions(store.size, global_batch, b, 0,
                                 drop_remainder=False)
    index = np.where(valid, pos, 0)
    return self._batches(store, pos, index, valid, self._test_image, b)


def _keep_tf_on_cpu():
  """TF only feeds the input pipeline; accelerators belong to JAX."""
  for kind in ("GPU", "TPU"):
    if tf.config.list_physical_devices(kind):
      try:
        tf.config.set_visible_devices([], kind)
      except RuntimeError:  # TF already initialised its devices.
        logging.warning("Could not hide %s devices from TensorFlow.", kind)


def build_continual_data(config: ml_collections.ConfigDict, *,
                         process_index: int = 0, process_count: int = 1,
                         threads: int = 0) -> ContinualData:
  """Opens `config.dataset` and lays out its continual tasks.

  Reads the labels (and the keys that order the examples) once to fix the
  tasks and splits; images are read per task when first needed.

  Args:
    config: a validated config (see `configuration.validate`).
    process_index: this process (jax.process_index()).
    process_count: number of processes (jax.process_count()).
    threads: threads of each tf.data pipeline; 0 = tf.data's default (about
      one per core). The input budget benchmark measures with 1.

  Returns:
    The ContinualData of this process.

  Raises:
    ConfigError: settings that do not fit the data.
    MissingDataError: the dataset is not prepared or not complete.
  """
  _keep_tf_on_cpu()
  if not 0 <= process_index < process_count:
    raise errors.ConfigError(
        f"process_index {process_index} not in [0, {process_count}).")
  source = sources.make_source(config)
  if config.num_classes and source.num_classes != config.num_classes:
    raise errors.ConfigError(
        f"config.num_classes={config.num_classes} but {source.name} has "
        f"{source.num_classes} classes (0 takes the number from the data).")
  if threads < 0:
    raise ValueError(f"threads={threads} must be >= 0.")
  data = ContinualData(config, source, process_index, process_count, threads)
  for task in range(data.num_tasks):
    if data.train_size(task) < config.batch_size:
      raise errors.ConfigError(
          f"task {task} has {data.train_size(task)} training images, fewer "
          f"than config.batch_size={config.batch_size}: it would take no "
          "step (the last partial batch is dropped); lower the batch size.")
  return data
