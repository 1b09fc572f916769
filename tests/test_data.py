"""Tests of the continual splits and input pipeline (TFDS is mocked)."""

import contextlib
from unittest import mock

import ml_collections
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from smope_jax import data
from smope_jax import errors
from smope_jax.data import preprocess

SIZE = 16  # Small images keep the pipeline tests fast.

# Per dataset: (classes, tasks, test resize, mock examples).
_TFDS_SETTINGS = {
    'cifar100': (100, 4, 'resize', 120),
    'caltech_birds2011': (200, 4, 'resize_crop', 120),
    'imagenet_r': (8, 4, 'resize_crop', None),  # Custom examples, see below.
}
# Fake ImageNet-R: 8 ImageNet-1k classes with 12 images each.
_IMR_RAW_CLASSES = (1, 7, 42, 100, 321, 512, 640, 999)
_IMR_PER_CLASS = 12


def _config(dataset, **overrides):
  num_classes, num_tasks, test_resize, _ = _TFDS_SETTINGS.get(
      dataset, (10, 5, 'resize', None))
  config = ml_collections.ConfigDict(dict(
      dataset=dataset, data_dir='', num_classes=num_classes,
      num_tasks=num_tasks, image_size=SIZE, seed=0, split_seed=0,
      cache_data=False, test_resize=test_resize))
  config.update(overrides)
  return config


def _fake_imagenet_r(self, split, decoders=None, read_config=None,
                     shuffle_files=False):
  """Stands in for TFDS's reader: real features, controlled labels."""
  del split, read_config, shuffle_files
  features = self.info.features
  if isinstance(decoders, tfds.decode.PartialDecoding):
    features = decoders.extract_features(features)
    decoders = decoders.decoders
  rng = np.random.default_rng(0)
  serialized = []
  for label in _IMR_RAW_CLASSES:
    wnid = self.info.features['label'].int2str(label)
    for k in range(_IMR_PER_CLASS):
      h, w = rng.integers(12, 40, size=2)
      example = {
          'image': rng.integers(0, 256, (h, w, 3), dtype=np.uint8),
          'label': label,
          'file_name': f'{wnid}/img_{k:03d}.jpg',
      }
      serialized.append(features.serialize_example(
          {key: example[key] for key in features.keys()}))
  return tf.data.Dataset.from_tensor_slices(serialized).map(
      lambda s: features.deserialize_example(s, decoders=decoders))


@contextlib.contextmanager
def _mocked(dataset):
  if dataset == 'imagenet_r':
    mock = tfds.testing.mock_data(
        policy=tfds.testing.MockPolicy.USE_CODE, as_dataset_fn=_fake_imagenet_r)
  else:
    mock = tfds.testing.mock_data(
        num_examples=_TFDS_SETTINGS[dataset][3],
        policy=tfds.testing.MockPolicy.USE_CODE)
  with mock:
    yield


def _collect(batches):
  batches = list(batches)
  return {k: np.stack([b[k] for b in batches]) for k in batches[0]}


# --- splits ------------------------------------------------------------------


def test_class_order_matches_reference():
  assert data.class_order(100, 0)[:12] == [
      23, 8, 11, 7, 48, 13, 1, 91, 94, 54, 16, 63]
  assert data.class_order(100, 1)[:10] == [
      53, 37, 65, 51, 4, 20, 38, 9, 10, 81]
  assert data.class_order(200, 0)[:10] == [
      131, 181, 22, 172, 144, 92, 97, 187, 58, 93]
  assert sorted(data.class_order(100, 3)) == list(range(100))


def test_task_classes_chunks_order():
  order = data.class_order(100, 0)
  tasks = data.task_classes(order, 10)
  assert [len(t) for t in tasks] == [10] * 10
  assert sum(tasks, []) == order
  assert tasks[0][:3] == [23, 8, 11]
  with pytest.raises(errors.ConfigError, match='num_tasks'):
    data.task_classes(order, 7)


def test_imagenet_r_split_per_class_and_deterministic():
  rng = np.random.default_rng(1)
  labels = np.repeat(np.arange(5), [10, 11, 12, 13, 37])
  names = np.array([f'n{l:02d}/img_{i:03d}.jpg' for i, l in enumerate(labels)])
  train, test = data.imagenet_r_split(names, labels, split_seed=0)
  assert np.intersect1d(train, test).size == 0
  assert len(train) + len(test) == len(labels)
  for c, n in enumerate([10, 11, 12, 13, 37]):
    assert np.sum(labels[test] == c) == int(n * 0.2 + 0.5)
  # Same file names in any reading order -> the same held-out files.
  perm = rng.permutation(len(labels))
  _, test_perm = data.imagenet_r_split(names[perm], labels[perm], split_seed=0)
  assert set(names[perm][test_perm]) == set(names[test])
  _, test_other = data.imagenet_r_split(names, labels, split_seed=1)
  assert set(names[test_other]) != set(names[test])


# --- preprocessing -----------------------------------------------------------


def test_random_resized_crop_falls_back_to_centre_crop():
  # A 3x50 strip: no candidate crop fits, so torchvision takes the centred
  # crop of aspect 4/3, i.e. columns 23..26; pixel value = column / 50.
  image = tf.constant(np.tile(
      np.arange(50, dtype=np.float32)[None, :, None] / 50, [3, 1, 3]))
  out = preprocess.random_resized_crop(image, tf.constant([0, 1]), 8).numpy()
  assert out.shape == (8, 8, 3)
  np.testing.assert_allclose([out.min() * 50, out.max() * 50], [23, 26],
                             atol=1e-4)


def test_test_image_resize_crop():
  # At 224 px: resize to 256, keep the centre 224 (offset 16).
  image = tf.constant(np.arange(256, dtype=np.float32)[None, :, None]
                      * np.ones([256, 1, 3], np.float32) / 255)
  out = preprocess.test_image(image, 224, 'resize_crop').numpy()
  np.testing.assert_allclose(out[0, :, 0] * 255, np.arange(16, 240),
                             atol=1e-3)


# --- TFDS pipelines (mocked) -------------------------------------------------


@pytest.mark.parametrize('dataset', sorted(_TFDS_SETTINGS))
def test_tfds_pipeline(dataset):
  config = _config(dataset)
  with _mocked(dataset):
    cd = data.build_continual_data(config)
    c = cd.classes_per_task
    assert cd.num_classes == config.num_classes
    assert cd.class_order == data.class_order(config.num_classes, 0)
    task, g = 1, 8
    n = cd.train_size(task)
    assert n > g  # Enough for a few steps and a padded last batch.

    train = _collect(cd.train_batches(task, 0, g))
    steps = cd.steps_per_epoch(task, g)
    assert train['image'].shape == (steps, g, SIZE, SIZE, 3)
    assert train['image'].dtype == np.float32
    assert train['label'].dtype == np.int32
    assert train['mask'].dtype == np.float32
    assert 0.0 <= train['image'].min() and train['image'].max() <= 1.0
    assert train['mask'].sum() == n
    assert np.all(train['mask'][:-1] == 1)
    pad = train['mask'] == 0
    assert np.all(train['image'][pad] == 0)
    assert set(train['label'].ravel()) <= set(range(task * c, (task + 1) * c))

    test = _collect(cd.test_batches(task, g))
    assert test['mask'].sum() == cd.test_size(task)
    assert set(test['label'].ravel()) <= set(range(task * c, (task + 1) * c))

    # Two processes: their local halves, side by side, are the global batch.
    halves = [data.build_continual_data(config, process_index=p,
                                        process_count=2) for p in range(2)]
    for global_batches, read in (
        (train, lambda cd: cd.train_batches(task, 0, g)),
        (test, lambda cd: cd.test_batches(task, g))):
      local = [_collect(read(half)) for half in halves]
      for key in global_batches:
        np.testing.assert_array_equal(
            np.concatenate([l[key] for l in local], axis=1),
            global_batches[key])

    # Resuming at a step reproduces the rest of the epoch.
    resumed = _collect(cd.train_batches(task, 0, g, start_step=2))
    for key in train:
      np.testing.assert_array_equal(resumed[key], train[key][2:])

    # Another epoch: another order; another build: the same batches.
    other = _collect(cd.train_batches(task, 1, g))
    assert not np.array_equal(other['label'], train['label'])
    rebuilt = data.build_continual_data(config)
    again = _collect(rebuilt.train_batches(task, 0, g))
    for key in train:
      np.testing.assert_array_equal(again[key], train[key])


def test_cache_data_changes_nothing():
  with _mocked('imagenet_r'):  # Images of varying sizes.
    plain = data.build_continual_data(_config('imagenet_r'))
    cached = data.build_continual_data(
        _config('imagenet_r', cache_data=True))
    for a, b in ((plain.train_batches(0, 3, 8), cached.train_batches(0, 3, 8)),
                 (plain.test_batches(0, 8), cached.test_batches(0, 8))):
      a, b = _collect(a), _collect(b)
      for key in a:
        np.testing.assert_array_equal(a[key], b[key])


def test_imagenet_r_classes_and_split():
  with _mocked('imagenet_r'):
    cd = data.build_continual_data(_config('imagenet_r'))
  assert cd.num_classes == len(_IMR_RAW_CLASSES)
  held_out = int(_IMR_PER_CLASS * 0.2 + 0.5)
  for task in range(cd.num_tasks):
    assert cd.test_size(task) == cd.classes_per_task * held_out
    assert cd.train_size(task) == cd.classes_per_task * (
        _IMR_PER_CLASS - held_out)


def test_real_prepared_imagenet_r(tmp_path):
  """Reads real TFRecords (the mocks above replace TFDS's reader)."""
  pytest.importorskip('importlib_resources')  # TFDS needs it to prepare.
  wnids = tfds.builder('imagenet_r').info.features['label'].names
  rng = np.random.default_rng(0)
  for label in _IMR_RAW_CLASSES[:4]:
    folder = tmp_path / 'raw' / 'imagenet-r' / wnids[label]
    folder.mkdir(parents=True)
    for k in range(10):
      image = rng.integers(0, 256, (*rng.integers(20, 60, size=2), 3),
                           dtype=np.uint8)
      tf.io.write_file(str(folder / f'art_{k}.jpg'), tf.io.encode_jpeg(image))
  data_dir = str(tmp_path / 'tfds')
  with mock.patch.object(tfds.download.DownloadManager, 'download_and_extract',
                         lambda self, url: str(tmp_path / 'raw')):
    tfds.builder('imagenet_r', data_dir=data_dir).download_and_prepare()
  cd = data.build_continual_data(
      _config('imagenet_r', data_dir=data_dir, num_classes=4, num_tasks=2))
  assert [cd.train_size(t) for t in range(2)] == [16, 16]
  assert [cd.test_size(t) for t in range(2)] == [4, 4]
  test = _collect(cd.test_batches(1, 8))
  assert test['image'].shape == (1, 8, SIZE, SIZE, 3)
  assert test['mask'].sum() == 4 and set(test['label'].ravel()) <= {2, 3}


# --- digits, errors ----------------------------------------------------------


def test_digits():
  cd = data.build_continual_data(_config('digits'))
  assert cd.num_classes == 10 and cd.num_tasks == 5
  assert cd.class_order == data.class_order(10, 0)
  total = sum(cd.train_size(t) + cd.test_size(t) for t in range(5))
  assert total == 1797
  assert 0.18 < sum(cd.test_size(t) for t in range(5)) / total < 0.22
  train = _collect(cd.train_batches(4, 0, 64))
  assert train['image'].shape[1:] == (64, SIZE, SIZE, 3)
  assert set(train['label'].ravel()) <= {8, 9}
  assert train['mask'].sum() == cd.train_size(4)
  test = _collect(cd.test_batches(4, 64))
  assert test['mask'].sum() == cd.test_size(4)
  assert test['image'].max() <= 1.0 and test['image'].max() > 0.5


def test_missing_dataset(tmp_path):
  with pytest.raises(errors.MissingDataError) as info:
    data.build_continual_data(_config('cifar100', data_dir=str(tmp_path)))
  message = str(info.value)
  assert 'cifar100' in message and '--config.data_dir' in message
  assert str(tmp_path) in message


def test_config_errors():
  with pytest.raises(errors.ConfigError, match='digits'):
    data.build_continual_data(_config('mnist'))
  with pytest.raises(errors.ConfigError, match='test_resize'):
    data.build_continual_data(_config('digits', test_resize='crop'))
  cd = data.build_continual_data(_config('digits'), process_count=3)
  with pytest.raises(errors.ConfigError, match='multiple'):
    cd.test_batches(0, 8)
