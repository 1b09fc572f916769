"""Where examples come from: TFDS datasets, image folders, scikit-learn digits.

A source presents every dataset the same way: dense class ids 0..C-1 with
their names, two roles ("train", "test"), and for each role a canonical
example order (a unique key per example, e.g. the file name) so that every
host agrees on it however the records happen to be read. The program never
downloads: TFDS datasets must be prepared beforehand.
"""

from collections.abc import Sequence
import dataclasses
import os

from absl import logging
from google.protobuf import json_format
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from smope_jax import errors
from smope_jax.data import benchmarks
from smope_jax.data import imagenet_r
from smope_jax.data import preprocess
from smope_jax.data import splits

ROLES = ("train", "test")
FOLDER_PREFIX = "folder:"
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif")
TFDS_ID = "tfds_id"  # TFDS's own unique example id, for datasets without one.


@dataclasses.dataclass(frozen=True)
class RoleIndex:
  """The examples of one role: where they are read and in which order."""
  split: str  # The TFDS split (or folder) the role reads.
  keys: np.ndarray  # Unique key per example, canonical order.
  labels: np.ndarray  # Dense class ids, int64.

  def subset(self, positions) -> "RoleIndex":
    return RoleIndex(self.split, self.keys[positions], self.labels[positions])


@dataclasses.dataclass
class Examples:
  """Some examples of one role, in canonical order.

  `items` are encoded image bytes or small float arrays; the source's
  `decode` (a TF function) turns one item into an (h, w, 3) image.
  """
  items: list
  labels: np.ndarray


def three_channels(image: tf.Tensor) -> tf.Tensor:
  """Grey images are repeated into RGB; an alpha channel is dropped."""
  return tf.cond(
      tf.shape(image)[-1] == 1, lambda: tf.tile(image, [1, 1, 3]),
      lambda: image[..., :3])


def carve_roles(index: RoleIndex, seed: int) -> dict[str, RoleIndex]:
  """Train and test roles from one set: 20 % of every class held out."""
  train, test = splits.per_class_split(index.keys, index.labels, seed)
  return {"train": index.subset(train), "test": index.subset(test)}


class Source:
  """Base of every source: class names and the index of each role."""

  name: str
  class_names: list[str]
  index: dict[str, RoleIndex]

  @property
  def num_classes(self) -> int:
    return len(self.class_names)

  def labels(self, role: str) -> np.ndarray:
    """Dense labels of all examples of a role, in canonical order."""
    return self.index[role].labels

  def hold_out_validation(self, seed: int) -> None:
    """Replaces the test role by 20 % of the training examples.

    The reference's validation rule: one seeded permutation of the training
    set, its first 80 % train and the rest validate. The test role of the
    dataset is never read afterwards.
    """
    train = self.index["train"]
    kept, held_out = splits.holdout_split(len(train.keys), seed)
    self.index = {"train": train.subset(kept), "test": train.subset(held_out)}

  def load(self, role: str, classes: Sequence[int]) -> Examples:
    """The examples of `role` whose dense class is in `classes`."""
    index = self.index[role]
    wanted = np.flatnonzero(np.isin(index.labels, np.asarray(classes)))
    return Examples(self._items(index, wanted), index.labels[wanted])

  def _items(self, index: RoleIndex, positions: np.ndarray) -> list:
    raise NotImplementedError

  def decode(self, item: tf.Tensor) -> tf.Tensor:
    raise NotImplementedError


class TfdsSource(Source):
  """A prepared TFDS dataset: a built-in benchmark or any one by name."""

  def __init__(self, config, validation: bool):
    self.name = config.dataset
    benchmark = benchmarks.BENCHMARKS.get(self.name)
    try:
      self._builder = tfds.builder(self.name, data_dir=config.data_dir or None)
    except tfds.core.registered.DatasetNotFoundError as e:
      raise errors.ConfigError(
          f"config.dataset={self.name!r} is neither a built-in benchmark "
          f"({', '.join(benchmarks.BENCHMARKS)}), a folder ('folder:/path') "
          f"nor a TFDS dataset: {str(e).splitlines()[0]}") from None
    except (ValueError, OSError, tf.errors.OpError,
            json_format.ParseError) as e:  # A damaged dataset_info.json.
      raise self._damaged(e, config.data_dir) from None
    features = self._builder.info.features
    self._image_key = config.image_key or _only_feature(
        features, tfds.features.Image, "image", self.name)
    self._label_key = config.label_key or _only_feature(
        features, tfds.features.ClassLabel, "label", self.name)
    for key in (self._image_key, self._label_key):
      if key not in features:
        raise errors.ConfigError(
            f"{self.name} has no feature {key!r}; its features are "
            f"{sorted(features)} (config.image_key / config.label_key).")
    self._image = features[self._image_key]
    self._key = benchmark.key if benchmark else TFDS_ID
    train_split = benchmark.train_split if benchmark else config.train_split
    test_split = benchmark.test_split if benchmark else config.test_split
    if benchmark and benchmark.reference_lists:
      self.class_names = list(imagenet_r.class_wnids())
      self.index = self._reference_list_roles(config, train_split)
    else:
      self.class_names = list(features[self._label_key].names)
      self.index = {"train": self._read_index(train_split)}
      if not test_split:
        self.index = carve_roles(self.index["train"], config.split_seed)
      elif not validation:
        self.index["test"] = self._read_index(test_split)

  def _damaged(self, error, data_dir=None) -> errors.MissingDataError:
    where = (self._builder.data_dir if hasattr(self, "_builder") else
             data_dir or "the TFDS data directory")
    reason = str(error).strip().splitlines()[0][:200] if str(error) else (
        type(error).__name__)
    return errors.MissingDataError(
        f"the prepared TFDS dataset {self.name!r} in {where} cannot be read "
        f"({reason}); it is damaged or incomplete: delete that directory and "
        f"prepare it again (python launch/prepare_data.py --data_dir=DIR "
        f"{self.name}).")

  def _iterate(self, ds):
    """Iterates a TFDS dataset; damaged files become one clear error."""
    try:
      yield from ds.as_numpy_iterator()
    except tf.errors.OpError as e:
      raise self._damaged(e) from None

  def _reference_list_roles(self, config, split: str) -> dict[str, RoleIndex]:
    """ImageNet-R's roles: the reference's lists, or a seeded 80/20 split."""
    everything = self._read_index(split, label_from_key=True)
    if config.imagenet_r_split == "random":
      return carve_roles(everything, config.split_seed)
    return {
        role: everything.subset(positions) for role, positions in
        imagenet_r.reference_roles(everything.keys).items()
    }

  def _as_dataset(self, split: str) -> tf.data.Dataset:
    """Key, label and still-encoded image of every example of a split."""
    # One feature set for both passes (index, load): cheap, as images stay
    # encoded, and under tfds.testing.mock_data the only way that both passes
    # see the same examples.
    wanted = {self._image_key: True, self._label_key: True}
    read_config = None
    if self._key == TFDS_ID:
      read_config = tfds.ReadConfig(add_tfds_id=True)
    else:
      wanted[self._key] = True
    decoders = tfds.decode.PartialDecoding(
        wanted, decoders={self._image_key: tfds.decode.SkipDecoding()})
    try:
      return self._builder.as_dataset(split=split, shuffle_files=False,
                                      decoders=decoders,
                                      read_config=read_config)
    except AssertionError as e:  # How TFDS reports an unprepared dataset.
      raise errors.MissingDataError(
          f"dataset {self.name!r} is not prepared under data_dir "
          f"{self._builder.data_dir_root} (looked for "
          f"{self._builder.data_dir}); this program never downloads. On a "
          f"machine with network access run `pip install -r "
          f"requirements-data.txt` and `python launch/prepare_data.py "
          f"--data_dir=DIR {self.name}` (or copy a prepared TFDS directory "
          f"to DIR), then pass --config.data_dir=DIR.") from e
    except ValueError as e:  # An unknown split or a bad split expression.
      splits_known = ", ".join(self._builder.info.splits) or "none"
      raise errors.ConfigError(
          f"cannot read split {split!r} of {self.name} ({e}); its splits "
          f"are: {splits_known} (config.train_split / config.test_split "
          "take TFDS split syntax such as 'train[:90%]').") from None

  def _read_index(self, split: str, label_from_key: bool = False) -> RoleIndex:
    """The keys and dense labels of a split, decoding no pixels."""
    key, label = self._key, self._label_key
    ds = self._as_dataset(split).map(
        preprocess.graph_only(lambda ex: (ex[key], ex[label]))).batch(4096)
    keys, labels = [np.zeros([0], object)], [np.zeros([0], np.int64)]
    for batch_keys, batch_labels in self._iterate(ds):
      keys.append(batch_keys.astype(object))
      labels.append(batch_labels.astype(np.int64))
    keys, labels = np.concatenate(keys), np.concatenate(labels)
    order = np.argsort(keys, kind="stable")
    keys, labels = keys[order], labels[order]
    if label_from_key:
      labels = imagenet_r.labels_of(keys)
    return RoleIndex(split, keys, labels)

  def _items(self, index: RoleIndex, positions: np.ndarray) -> list:
    if not len(positions):
      return []
    keys = index.keys[positions]
    table = tf.lookup.StaticHashTable(
        tf.lookup.KeyValueTensorInitializer(tf.constant(keys.astype(bytes)),
                                            tf.ones(len(keys), tf.int64)), 0)
    key, image = self._key, self._image_key
    ds = self._as_dataset(index.split).filter(
        preprocess.graph_only(lambda ex: table.lookup(ex[key]) > 0))
    ds = ds.map(preprocess.graph_only(lambda ex: (ex[key], ex[image])))
    found = {}
    for batch_keys, images in self._iterate(ds.batch(256)):
      found.update(zip(batch_keys, images))
    return [found[k] for k in keys]

  def decode(self, item: tf.Tensor) -> tf.Tensor:
    return three_channels(self._image.decode_example(item))


def _only_feature(features, kind, role: str, name: str) -> str:
  """The feature of a kind (the image, the label) of a dataset.

  The one named like the role if there is one, else the only one.
  """
  found = [k for k, f in features.items() if isinstance(f, kind)]
  if role in found:  # e.g. 'image' beside a 'segmentation_mask' Image.
    return role
  if len(found) != 1:
    raise errors.ConfigError(
        f"{name} has {len(found)} {kind.__name__} features {found}; name the "
        f"{role} with --config.{role}_key.")
  return found[0]


class FolderSource(Source):
  """Images in class folders: `train/<class>/*` and `test/<class>/*`.

  Without `train/` and `test/`, the class folders sit directly in the root
  and 20 % of every class is held out for test by the seeded per-class rule
  (`config.split_seed`). Class names are the folder names, sorted; keys are
  the paths relative to the root. Local paths and gs:// both work.
  """

  def __init__(self, config, validation: bool):
    self.root = config.dataset[len(FOLDER_PREFIX):].rstrip("/")
    self.name = config.dataset
    if not tf.io.gfile.isdir(self.root):
      raise errors.MissingDataError(
          f"config.dataset={config.dataset!r}: {self.root} is not a "
          "directory; give a folder with one sub-folder of images per class "
          "(or train/ and test/ folders holding such class folders).")
    nested = all(
        tf.io.gfile.isdir(os.path.join(self.root, role)) for role in ROLES)
    train_dir = os.path.join(self.root, "train") if nested else self.root
    self.class_names = self._class_folders(train_dir)
    self.index = {"train": self._read_index(train_dir)}
    if not nested:
      self.index = carve_roles(self.index["train"], config.split_seed)
    elif not validation:
      test_dir = os.path.join(self.root, "test")
      unknown = set(self._class_folders(test_dir)) - set(self.class_names)
      if unknown:
        raise errors.MissingDataError(
            f"{test_dir} has classes without training images: "
            f"{sorted(unknown)[:5]}.")
      self.index["test"] = self._read_index(test_dir)

  def _class_folders(self, directory: str) -> list[str]:
    names = sorted(
        n.rstrip("/")
        for n in tf.io.gfile.listdir(directory)
        if tf.io.gfile.isdir(os.path.join(directory, n)))
    if not names:
      raise errors.MissingDataError(
          f"{directory} has no class folders; put the images of each class "
          "in a folder named after the class.")
    return names

  def _read_index(self, directory: str) -> RoleIndex:
    keys, labels, skipped = [], [], 0
    for label, name in enumerate(self.class_names):
      folder = os.path.join(directory, name)
      if not tf.io.gfile.isdir(folder):
        continue
      for file in sorted(tf.io.gfile.listdir(folder)):
        if file.lower().endswith(IMAGE_EXTENSIONS):
          keys.append(os.path.relpath(os.path.join(folder, file), self.root))
          labels.append(label)
        else:
          skipped += 1
    if skipped:
      logging.warning("%s: skipped %d files that are not %s images", directory,
                      skipped, "/".join(IMAGE_EXTENSIONS))
    if not keys:
      raise errors.MissingDataError(f"{directory} holds no images.")
    return RoleIndex(directory, np.array(keys, object),
                     np.array(labels, np.int64))

  def _items(self, index: RoleIndex, positions: np.ndarray) -> list:
    paths = [os.path.join(self.root, k) for k in index.keys[positions]]
    if not paths:
      return []
    ds = tf.data.Dataset.from_tensor_slices(paths).map(
        tf.io.read_file, num_parallel_calls=tf.data.AUTOTUNE)
    return list(ds.as_numpy_iterator())

  def decode(self, item: tf.Tensor) -> tf.Tensor:
    image = tf.io.decode_image(item, channels=3, expand_animations=False)
    return tf.ensure_shape(image, [None, None, 3])


class DigitsSource(Source):
  """scikit-learn's bundled 8x8 digits: 1797 images, 10 classes, offline.

  Pixels 0..16 become floats in [0, 1], grey is repeated into 3 channels, and
  `decode` upsamples bilinearly to the model's input size; the split is the
  seeded per-class 80/20 rule (keys: the example index).
  """

  name = "digits"
  class_names = [str(d) for d in range(10)]

  def __init__(self, config, validation: bool):
    del validation  # Both roles come from one array.
    from sklearn import datasets  # pylint: disable=g-import-not-at-top
    digits = datasets.load_digits()
    self._images = np.repeat(
        (digits.images / 16.0).astype(np.float32)[..., None], 3, axis=-1)
    self._size = config.image_size
    everything = RoleIndex("", np.arange(len(digits.target)),
                           digits.target.astype(np.int64))
    self.index = carve_roles(everything, config.split_seed)

  def _items(self, index: RoleIndex, positions: np.ndarray) -> list:
    return list(self._images[index.keys[positions]])

  def decode(self, item: tf.Tensor) -> tf.Tensor:
    return tf.image.resize(item, [self._size, self._size], "bilinear")


def make_source(config) -> Source:
  """The source named by `config.dataset`, with validation applied."""
  validation = bool(config.validation)
  benchmark = benchmarks.BENCHMARKS.get(config.dataset)
  if benchmark and benchmark.source == "digits":
    source = DigitsSource(config, validation)
  elif str(config.dataset).startswith(FOLDER_PREFIX):
    source = FolderSource(config, validation)
  else:
    source = TfdsSource(config, validation)
  if validation:
    source.hold_out_validation(config.seed)
  return source
