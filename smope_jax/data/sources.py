"""Where examples come from: prepared TFDS datasets or scikit-learn's digits.

A source presents every benchmark the same way: dense class ids 0..C-1, two
roles ('train', 'test'), and for each role a canonical example order (sorted
by a unique key such as the file name) so that all hosts agree on it however
TFDS happens to read the records.
"""

from collections.abc import Sequence
import dataclasses

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from smope_jax import errors
from smope_jax.data import preprocess
from smope_jax.data import splits

ROLES = ("train", "test")


@dataclasses.dataclass(frozen=True)
class _TfdsSpec:
  key: str  # A unique string feature that fixes the canonical order.
  carved: bool = False  # True: train/test carved out of TFDS 'test' by us.


_TFDS = {
    "cifar100": _TfdsSpec(key="id"),
    "caltech_birds2011": _TfdsSpec(key="image/filename"),
    "imagenet_r": _TfdsSpec(key="file_name", carved=True),
}
DATASETS = (*_TFDS, "digits")


@dataclasses.dataclass
class Examples:
  """Some examples of one role, in canonical order.

  `items` are encoded image bytes (TFDS) or small float arrays (digits); the
  source's `decode` (a TF function) turns one item into an (h, w, 3) image.
  """
  items: list
  labels: np.ndarray  # Dense class ids.


class TfdsSource:
  """A prepared TFDS dataset, read without ever downloading."""

  def __init__(self, name: str, data_dir: str | None, split_seed: int):
    self.name = name
    self._spec = _TFDS[name]
    self._builder = tfds.builder(name, data_dir=data_dir)
    self._image = self._builder.info.features["image"]
    if self._spec.carved:
      keys, raw_labels = self._read_index("test")
      # TFDS labels of imagenet_r are ImageNet-1k ids; its 200 classes become
      # 0..199 in wnid order, the order of the reference's class folders.
      self._raw_classes = np.unique(raw_labels)
      labels = np.searchsorted(self._raw_classes, raw_labels)
      train, test = splits.imagenet_r_split(keys, labels, split_seed)
      chosen = {"train": ("test", keys[train], labels[train]),
                "test": ("test", keys[test], labels[test])}
    else:
      self._raw_classes = np.arange(
          self._builder.info.features["label"].num_classes)
      chosen = {role: (role, *self._read_index(role)) for role in ROLES}
    # Per role: TFDS split, keys and dense labels, sorted by key.
    self._index = {}
    for role, (split, keys, labels) in chosen.items():
      order = np.argsort(keys, kind="stable")
      self._index[role] = (split, keys[order], labels[order])

  @property
  def num_classes(self) -> int:
    return len(self._raw_classes)

  def _as_dataset(self, split: str) -> tf.data.Dataset:
    """Key, label and still-encoded image of every example of a split."""
    # One feature set for both passes (index, load): cheap, as images stay
    # encoded, and under tfds.testing.mock_data the only way that both passes
    # see the same examples.
    spec = tfds.decode.PartialDecoding(
        {"image": True, "label": True, self._spec.key: True},
        decoders={"image": tfds.decode.SkipDecoding()})
    try:
      return self._builder.as_dataset(
          split=split, shuffle_files=False, decoders=spec)
    except AssertionError as e:  # How TFDS reports an unprepared dataset.
      raise errors.MissingDataError(
          f"Dataset {self.name!r} is not prepared under data_dir "
          f"{self._builder.data_dir_root} (looked for "
          f"{self._builder.data_dir}); this program never downloads. On a "
          f"machine with network access run `tfds build {self.name} "
          f"--data_dir=DIR` (or copy a prepared TFDS directory to DIR), then "
          f"pass --config.data_dir=DIR.") from e

  def _read_index(self, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(keys as bytes, raw labels) of a TFDS split, decoding no pixels."""
    ds = self._as_dataset(split).map(preprocess.graph_only(
        lambda ex: (ex[self._spec.key], ex["label"]))).batch(4096)
    keys, labels = [np.zeros([0], object)], [np.zeros([0], np.int64)]
    for batch_keys, batch_labels in ds.as_numpy_iterator():
      keys.append(batch_keys.astype(object))
      labels.append(batch_labels.astype(np.int64))
    return np.concatenate(keys), np.concatenate(labels)

  def labels(self, role: str) -> np.ndarray:
    """Dense labels of all examples of a role, in canonical order."""
    return self._index[role][2]

  def load(self, role: str, classes: Sequence[int]) -> Examples:
    """The examples of `role` whose dense class is in `classes`."""
    split, keys, labels = self._index[role]
    wanted = np.flatnonzero(np.isin(labels, classes))
    raw = tf.constant(self._raw_classes[np.asarray(classes)], tf.int64)
    ds = self._as_dataset(split).filter(preprocess.graph_only(
        lambda ex: tf.reduce_any(ex["label"] == raw)))
    ds = ds.map(preprocess.graph_only(
        lambda ex: (ex[self._spec.key], ex["image"]))).batch(256)
    found = {}
    for batch_keys, images in ds.as_numpy_iterator():
      found.update(zip(batch_keys, images))
    # ImageNet-R's roles share one TFDS split: `keys` picks this role's part.
    return Examples(items=[found[k] for k in keys[wanted]],
                    labels=labels[wanted])

  def decode(self, item: tf.Tensor) -> tf.Tensor:
    return self._image.decode_example(item)


class DigitsSource:
  """scikit-learn's bundled 8x8 digits: 1797 images, 10 classes, offline.

  Pixels 0..16 become floats in [0, 1], grey is repeated into 3 channels, and
  `decode` upsamples bilinearly to the model's input size; the split is the
  same seeded per-class 80/20 rule as ImageNet-R (keys: the example index).
  """

  name = "digits"
  num_classes = 10

  def __init__(self, image_size: int, split_seed: int):
    from sklearn import datasets  # pylint: disable=g-import-not-at-top
    digits = datasets.load_digits()
    self._images = np.repeat(
        (digits.images / 16.0).astype(np.float32)[..., None], 3, axis=-1)
    self._size = image_size
    labels = digits.target.astype(np.int64)
    train, test = splits.per_class_split(
        np.arange(len(labels)), labels, split_seed)
    self._index = {"train": (train, labels[train]),
                   "test": (test, labels[test])}

  def labels(self, role: str) -> np.ndarray:
    return self._index[role][1]

  def load(self, role: str, classes: Sequence[int]) -> Examples:
    indices, labels = self._index[role]
    wanted = np.isin(labels, classes)
    return Examples(items=list(self._images[indices[wanted]]),
                    labels=labels[wanted])

  def decode(self, item: tf.Tensor) -> tf.Tensor:
    return tf.image.resize(item, [self._size, self._size], "bilinear")


def make_source(config) -> TfdsSource | DigitsSource:
  """The source named by `config.dataset`."""
  if config.dataset == "digits":
    return DigitsSource(config.image_size, config.split_seed)
  if config.dataset not in _TFDS:
    raise errors.ConfigError(
        f"Unknown config.dataset={config.dataset!r}; valid: "
        f'{", ".join(DATASETS)}.')
  # An empty data_dir means TFDS's default ($TFDS_DATA_DIR or
  # ~/tensorflow_datasets).
  return TfdsSource(config.dataset, config.data_dir or None, config.split_seed)
