"""Tests of the continual splits and input pipeline (TFDS is mocked)."""

import contextlib
import random
import io
import os
from unittest import mock

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from PIL import Image

from smope_jax import configuration
from smope_jax import data
from smope_jax import errors
from smope_jax.data import benchmarks
from smope_jax.data import imagenet_r
from smope_jax.data import preprocess

SIZE = 16  # Small images keep the pipeline tests fast.

# Per dataset: (classes, tasks, test resize, mock examples).
_TFDS_SETTINGS = {
    'cifar100': (100, 4, 'resize', 200),
    'caltech_birds2011': (200, 4, 'resize_crop', 200),
    'imagenet_r': (200, 20, 'resize_crop', None),  # The reference's lists.
}


def _config(dataset, **overrides):
  num_classes, num_tasks, test_resize, _ = _TFDS_SETTINGS.get(
      dataset, (10, 5, 'resize', None))
  config = configuration.base_config()
  config.update(
      dict(dataset=dataset, data_dir='', num_classes=num_classes,
           num_tasks=num_tasks, image_size=SIZE, seed=0, split_seed=0,
           cache_data=False, test_resize=test_resize, batch_size=8))
  config.update(overrides)
  return config


_RECORDS = {}  # file name -> serialized example, shared by all tests.


def _imagenet_r_records(features, files: tuple) -> list:
  """Serialized examples named by `files`, with tiny random images."""
  label_of = features['label'].str2int
  for name in files:
    if name not in _RECORDS:
      rng = np.random.default_rng(len(_RECORDS))
      h, w = rng.integers(6, 14, size=2)
      example = {
          'image': rng.integers(0, 256, (h, w, 3), dtype=np.uint8),
          'label': label_of(name.split('/')[0]),
          'file_name': name
      }
      _RECORDS[name] = features.serialize_example(example)
  return [_RECORDS[name] for name in files]


def _all_listed_files() -> tuple:
  return imagenet_r.listed_files('train') + imagenet_r.listed_files('test')


def _few_files_per_class(per_class: int = 6) -> tuple:
  """A small ImageNet-R: the first listed images of every class."""
  taken = {}
  for name in _all_listed_files():
    taken.setdefault(name.split('/')[0], []).append(name)
  return tuple(n for names in taken.values() for n in names[:per_class])


def _fake_imagenet_r(files):
  """Stands in for TFDS's reader: real features, these file names."""

  def as_dataset(self, split, decoders=None, read_config=None,
                 shuffle_files=False):
    del split, read_config, shuffle_files
    features = self.info.features
    records = _imagenet_r_records(features, files)
    if isinstance(decoders, tfds.decode.PartialDecoding):
      features = decoders.extract_features(features)
      decoders = decoders.decoders
    return tf.data.Dataset.from_tensor_slices(records).map(
        lambda s: features.deserialize_example(s, decoders=decoders))

  return as_dataset


@contextlib.contextmanager
def _mocked(dataset, files=None):
  if dataset == 'imagenet_r':
    mock = tfds.testing.mock_data(
        policy=tfds.testing.MockPolicy.USE_CODE,
        as_dataset_fn=_fake_imagenet_r(files or _all_listed_files()))
  else:
    mock = tfds.testing.mock_data(
        num_examples=_TFDS_SETTINGS.get(dataset, (0, 0, 0, 60))[3],
        policy=tfds.testing.MockPolicy.USE_CODE)
  with mock:
    yield


def _collect(batches):
  batches = list(batches)
  return {k: np.stack([b[k] for b in batches]) for k in batches[0]}


# --- splits ------------------------------------------------------------------


def test_class_order_matches_reference():
  assert data.class_order(
      100, 0)[:12] == [23, 8, 11, 7, 48, 13, 1, 91, 94, 54, 16, 63]
  assert data.class_order(100, 1)[:10] == [53, 37, 65, 51, 4, 20, 38, 9, 10, 81]
  assert data.class_order(
      200, 0)[:10] == [131, 181, 22, 172, 144, 92, 97, 187, 58, 93]
  assert sorted(data.class_order(100, 3)) == list(range(100))


def test_task_classes_chunks_order():
  order = data.class_order(100, 0)
  tasks = data.task_classes(order, 10)
  assert [len(t) for t in tasks] == [10] * 10
  assert sum(tasks, []) == order
  assert tasks[0][:3] == [23, 8, 11]
  with pytest.raises(errors.ConfigError, match='num_tasks'):
    data.task_classes(order, 7)


def test_first_task_size():
  order = data.class_order(100, 0)
  # The reference's first_split_size=50, other_split_size=10.
  tasks = data.task_classes(order, 10, first_task_classes=50)
  assert [len(t) for t in tasks] == [50, 10, 10, 10, 10, 10]
  assert sum(tasks, []) == order
  assert [len(t) for t in data.task_classes(range(10), 5, 4)] == [4, 2, 2, 2]
  assert data.task_classes(range(10), 5, 10) == [list(range(10))]
  for tasks, first in ((5, 5), (5, 11), (2, 3)):
    with pytest.raises(errors.ConfigError, match='first_task_classes'):
      data.task_classes(range(10), tasks, first)


def test_per_class_split_and_deterministic():
  rng = np.random.default_rng(1)
  labels = np.repeat(np.arange(5), [10, 11, 12, 13, 37])
  names = np.array([f'n{l:02d}/img_{i:03d}.jpg' for i, l in enumerate(labels)])
  train, test = data.per_class_split(names, labels, seed=0)
  assert np.intersect1d(train, test).size == 0
  assert len(train) + len(test) == len(labels)
  for c, n in enumerate([10, 11, 12, 13, 37]):
    assert np.sum(labels[test] == c) == int(n * 0.2 + 0.5)
  # Same file names in any reading order -> the same held-out files.
  perm = rng.permutation(len(labels))
  _, test_perm = data.per_class_split(names[perm], labels[perm], seed=0)
  assert set(names[perm][test_perm]) == set(names[test])
  _, test_other = data.per_class_split(names, labels, seed=1)
  assert set(names[test_other]) != set(names[test])


def test_holdout_split_is_the_references_seeded_permutation():
  train, held_out = data.holdout_split(10, seed=3)
  perm = np.random.RandomState(3).permutation(10)
  assert set(train) == set(perm[:8]) and set(held_out) == set(perm[8:])
  assert np.intersect1d(train, held_out).size == 0


# --- preprocessing -----------------------------------------------------------


def test_random_resized_crop_falls_back_to_centre_crop():
  # A 3x50 strip: no candidate crop fits, so torchvision takes the centred
  # crop of aspect 4/3, i.e. columns 23..26; pixel value = column / 50.
  image = tf.constant(
      np.tile(np.arange(50, dtype=np.float32)[None, :, None] / 50, [3, 1, 3]))
  out = preprocess.random_resized_crop(image, tf.constant([0, 1]), 8).numpy()
  assert out.shape == (8, 8, 3)
  np.testing.assert_allclose([out.min() * 50, out.max() * 50], [23, 26],
                             atol=1e-4)


def _smooth_image(height, width):
  """A smooth synthetic RGB image: resampling errors stay small."""
  y, x = np.mgrid[0:height, 0:width].astype(np.float64)
  image = np.stack(
      [x / width, y / height, 0.5 + 0.5 * np.sin(x / 37.0) * np.cos(y / 29.0)],
      -1)
  return (255 * image).round().astype(np.uint8)


@pytest.mark.parametrize(
    'height,width,resized',
    [
        (375, 500, (256, 341)),  # Landscape: 500 x 375 -> 341 x 256.
        (500, 375, (341, 256)),  # Portrait.
        (300, 300, (256, 256)),
    ])
def test_test_crop_keeps_the_aspect_ratio_like_torchvision(
    height, width, resized):
  image = _smooth_image(height, width)
  shorter = preprocess.resize_shorter_side(
      preprocess.to_unit_float(tf.constant(image)), 256)
  assert tuple(shorter.shape[:2]) == resized
  got = preprocess.test_image(tf.constant(image), 224, 'resize_crop').numpy()
  # torchvision: PIL bilinear Resize(256), then the centred 224 x 224.
  pil = Image.fromarray(image).resize(resized[::-1], Image.BILINEAR)
  top = int(round((resized[0] - 224) / 2.0))
  left = int(round((resized[1] - 224) / 2.0))
  want = np.asarray(pil, np.float32)[top:top + 224, left:left + 224] / 255
  assert got.shape == (224, 224, 3)
  np.testing.assert_allclose(got, want, atol=0.02)
  assert np.abs(got - want).mean() < 0.003


# --- TFDS pipelines (mocked) -------------------------------------------------


@pytest.mark.parametrize('dataset', sorted(_TFDS_SETTINGS))
def test_tfds_pipeline(dataset):
  config = _config(dataset)
  files = None
  if dataset == 'imagenet_r':  # Images of many sizes; a few per class.
    config.imagenet_r_split = 'random'
    files = _few_files_per_class()
  with _mocked(dataset, files):
    cd = data.build_continual_data(config)
    assert cd.num_classes == config.num_classes
    assert cd.class_order == data.class_order(config.num_classes, 0)
    task, g = 1, 8
    first, end = cd.class_ranges[task]
    n = cd.train_size(task)
    assert n > 3 * g and n % g  # A few steps and a partial last batch.

    train = _collect(cd.train_batches(task, 0, g))
    steps = cd.steps_per_epoch(task, g)
    assert steps == n // g
    assert train['image'].shape == (steps, g, SIZE, SIZE, 3)
    assert train['image'].dtype == np.float32
    assert train['label'].dtype == np.int32
    assert train['mask'].dtype == np.float32
    assert 0.0 <= train['image'].min() and train['image'].max() <= 1.0
    # The last partial batch is dropped: every row is a real image.
    assert np.all(train['mask'] == 1)
    assert set(train['label'].ravel()) <= set(range(first, end))
    padded = _collect(cd.train_batches(task, 'stats', g, drop_remainder=False))
    assert padded['mask'].sum() == n
    assert np.all(padded['image'][padded['mask'] == 0] == 0)

    test = _collect(cd.test_batches(task, g))
    assert test['mask'].sum() == cd.test_size(task)
    assert set(test['label'].ravel()) <= set(range(first, end))

    # Two processes: their local halves, side by side, are the global batch;
    # so the dropped images do not depend on the number of processes.
    halves = [
        data.build_continual_data(config, process_index=p, process_count=2)
        for p in range(2)
    ]
    for global_batches, read in ((train,
                                  lambda cd: cd.train_batches(task, 0, g)),
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
  # Images of varying sizes.
  with _mocked('imagenet_r', _few_files_per_class()):
    plain = data.build_continual_data(
        _config('imagenet_r', imagenet_r_split='random'))
    cached = data.build_continual_data(
        _config('imagenet_r', imagenet_r_split='random', cache_data=True))
    for a, b in ((plain.train_batches(0, 3, 8), cached.train_batches(0, 3, 8)),
                 (plain.test_batches(0, 8), cached.test_batches(0, 8))):
      a, b = _collect(a), _collect(b)
      for key in a:
        np.testing.assert_array_equal(a[key], b[key])


# --- ImageNet-R: the reference's split and numbering -------------------------


def test_packaged_imagenet_r_lists_are_complete_and_disjoint():
  wnids = imagenet_r.class_wnids()
  assert len(wnids) == len(set(wnids)) == 200
  assert wnids[:2] == ('n02165456', 'n03594945')
  train, test = imagenet_r.listed_files('train'), imagenet_r.listed_files(
      'test')
  assert (len(train), len(test)) == (24000, 6000)
  assert len(set(train)) == 24000 and len(set(test)) == 6000
  assert not set(train) & set(test)
  for names in (train, test):
    assert {n.split('/')[0] for n in names} == set(wnids)
  labels = imagenet_r.labels_of(train)
  assert all(wnids[l] == n.split('/')[0] for l, n in zip(labels, train))


def test_imagenet_r_roles_are_exactly_the_listed_files():
  with _mocked('imagenet_r'):
    cd = data.build_continual_data(_config('imagenet_r', num_tasks=10))
    source = cd._source  # pylint: disable=protected-access
    for role in ('train', 'test'):
      keys = [k.decode() for k in source.index[role].keys]
      assert keys == list(imagenet_r.listed_files(role))
      np.testing.assert_array_equal(source.labels(role),
                                    imagenet_r.labels_of(keys))
    assert cd.class_names == list(imagenet_r.class_wnids())
    # Seed 0, 10 tasks: task 0 holds the reference's classes 131, 181, 22...
    order = random.Random(0)
    expected = list(range(200))
    order.shuffle(expected)
    assert cd.task_classes(0) == expected[:20]
    assert cd.task_classes(0)[:3] == [131, 181, 22]
    wnids = imagenet_r.class_wnids()
    task0_files = {
        n for n in imagenet_r.listed_files('train')
        if n.split('/')[0] in {wnids[c] for c in expected[:20]}
    }
    assert cd.train_size(0) == len(task0_files)
    assert sum(cd.train_size(t) for t in range(10)) == 24000
    assert sum(cd.test_size(t) for t in range(10)) == 6000


@pytest.mark.parametrize('change,message', [
    ('missing', 'lacks 3 listed images'),
    ('extra', 'holds 2 images the split does not list'),
])
def test_imagenet_r_copy_that_differs_from_the_lists(change, message):
  files = list(_all_listed_files())
  if change == 'missing':
    dropped = files[5:8]
    files = files[:5] + files[8:]
  else:
    files += ['n02165456/unlisted_1.jpg', 'n02165456/unlisted_2.jpg']
  with _mocked('imagenet_r', tuple(files)):
    with pytest.raises(errors.MissingDataError, match=message) as info:
      data.build_continual_data(_config('imagenet_r'))
  if change == 'missing':
    assert dropped[0] in str(info.value)
  assert 'imagenet_r_split=random' in str(info.value)


def test_imagenet_r_random_split_stays_available():
  with _mocked('imagenet_r'):
    cd = data.build_continual_data(
        _config('imagenet_r', imagenet_r_split='random'))
  total = sum(cd.train_size(t) + cd.test_size(t) for t in range(20))
  held_out = sum(cd.test_size(t) for t in range(20))
  assert total == 30000 and 0.19 < held_out / total < 0.21


def _prepare_real_imagenet_r(tmp_path) -> str:
  """A real TFDS imagenet_r of 12 listed images (two classes)."""
  pytest.importorskip('importlib_resources')  # TFDS needs it to prepare.
  rng = np.random.default_rng(0)
  listed = _few_files_per_class(per_class=6)[:12]  # Two classes.
  for name in listed:
    path = tmp_path / 'raw' / 'imagenet-r' / name
    path.parent.mkdir(parents=True, exist_ok=True)
    image = rng.integers(0, 256, (*rng.integers(20, 60, size=2), 3),
                         dtype=np.uint8)
    tf.io.write_file(str(path), tf.io.encode_jpeg(image))
  data_dir = str(tmp_path / 'tfds')
  with mock.patch.object(tfds.download.DownloadManager, 'download_and_extract',
                         lambda self, url: str(tmp_path / 'raw')):
    tfds.builder('imagenet_r', data_dir=data_dir).download_and_prepare()
  return data_dir


def test_real_prepared_imagenet_r(tmp_path, monkeypatch):
  """Reads real TFRecords (the mocks above replace TFDS's reader)."""
  data_dir = _prepare_real_imagenet_r(tmp_path)
  with pytest.raises(errors.MissingDataError, match='lacks 29988 listed'):
    data.build_continual_data(_config('imagenet_r', data_dir=data_dir))
  cd = data.build_continual_data(
      _config('imagenet_r', data_dir=data_dir, num_tasks=1,
              imagenet_r_split='random'))
  assert cd.train_size(0) + cd.test_size(0) == 12
  test = _collect(cd.test_batches(0, 8))
  assert test['image'].shape[1:] == (8, SIZE, SIZE, 3)
  assert test['mask'].sum() == cd.test_size(0)
  # Read as any TFDS dataset: a split it lacks is named with those it has.
  monkeypatch.delitem(benchmarks.BENCHMARKS, 'imagenet_r')
  with pytest.raises(errors.ConfigError, match="its splits are: test"):
    data.build_continual_data(
        _config('imagenet_r', data_dir=data_dir, num_classes=0, num_tasks=1,
                train_split='test', test_split='validation'))
  generic = data.build_continual_data(
      _config('imagenet_r', data_dir=data_dir, num_classes=0, num_tasks=1,
              batch_size=4, train_split='test[:50%]', test_split='test[50%:]'))
  assert generic.train_size(0) == generic.test_size(0) == 6


def test_damaged_tfds_directory_is_one_clear_error(tmp_path):
  data_dir = _prepare_real_imagenet_r(tmp_path)
  config = _config('imagenet_r', data_dir=data_dir, num_tasks=1,
                   imagenet_r_split='random')
  records = [
      os.path.join(root, name)
      for root, _, names in os.walk(data_dir)
      for name in names
      if '.tfrecord' in name
  ]
  with open(records[0], 'r+b') as f:  # Cut the records short.
    f.truncate(os.path.getsize(records[0]) // 2)
  with pytest.raises(errors.MissingDataError, match='cannot be read'):
    data.build_continual_data(config)
  (info,) = [
      os.path.join(root, 'dataset_info.json')
      for root, _, names in os.walk(data_dir)
      if 'dataset_info.json' in names
  ]
  with open(info, 'w') as f:
    f.write('{not json')
  with pytest.raises(errors.MissingDataError, match='prepare it again'):
    data.build_continual_data(config)


# --- validation, task sizes, joint training ----------------------------------


def test_validation_never_reads_the_test_split(monkeypatch):
  read = []
  with _mocked('cifar100'):
    builder_class = type(tfds.builder('cifar100'))
    original = builder_class.as_dataset

    def recording(self, split, **kwargs):
      read.append(split)
      return original(self, split=split, **kwargs)

    monkeypatch.setattr(builder_class, 'as_dataset', recording)
    cd = data.build_continual_data(_config('cifar100', validation=True))
    for task in range(cd.num_tasks):
      _collect(cd.test_batches(task, 8))
    source = cd._source  # pylint: disable=protected-access
  assert set(read) == {'train'}
  train, held_out = source.index['train'].keys, source.index['test'].keys
  assert not set(train) & set(held_out)
  assert len(held_out) == 200 - int(0.8 * 200)


def test_first_task_classes_and_joint_on_digits():
  cd = data.build_continual_data(
      _config('digits', num_tasks=5, first_task_classes=4))
  assert cd.class_ranges == [(0, 4), (4, 6), (6, 8), (8, 10)]
  assert [len(cd.task_classes(t)) for t in range(4)] == [4, 2, 2, 2]
  joint = data.build_continual_data(_config('digits', joint=True))
  assert joint.num_tasks == 1 and joint.class_ranges == [(0, 10)]
  assert joint.train_size(0) + joint.test_size(0) == 1797


# --- your own data: any TFDS dataset, image folders --------------------------


def test_any_tfds_dataset_by_name():
  with _mocked('mnist'):
    cd = data.build_continual_data(
        _config('mnist', num_classes=0, num_tasks=5, batch_size=2))
    assert cd.num_classes == 10 and cd.class_names[:2] == ['0', '1']
    batch = next(iter(cd.test_batches(0, 8)))
    assert batch['image'].shape == (8, SIZE, SIZE, 3)  # Grey -> RGB.
    # No test split: 20 % of every class of train_split is held out.
    carved = data.build_continual_data(
        _config('mnist', num_classes=0, num_tasks=5, test_split='',
                batch_size=2))
    source = carved._source  # pylint: disable=protected-access
    assert source.index['test'].split == 'train'  # Never the test split.
    labels = source.labels('train').tolist() + source.labels('test').tolist()
    assert len(labels) == 60
    for c in range(10):
      assert source.labels('test').tolist().count(c) == int(
          labels.count(c) * 0.2 + 0.5)
    with pytest.raises(errors.ConfigError, match='has no feature'):
      data.build_continual_data(
          _config('mnist', num_classes=0, num_tasks=5, image_key='picture'))


def _write_png(path, value):
  path.parent.mkdir(parents=True, exist_ok=True)
  image = np.full((10, 12, 3), value, np.uint8)
  buffer = io.BytesIO()
  Image.fromarray(image).save(buffer, format='PNG')
  path.write_bytes(buffer.getvalue())


@pytest.mark.parametrize('nested', [True, False])
def test_image_folder(tmp_path, nested):
  classes = ['cat', 'dog', 'eel', 'fox']
  for c, name in enumerate(classes):
    for i in range(10):
      role = ('test' if i >= 8 else 'train') if nested else ''
      _write_png(tmp_path / role / name / f'{i}.png', 40 * c + i)
  (tmp_path / ('train' if nested else '') / 'cat' / 'notes.txt').write_text('x')
  cd = data.build_continual_data(
      _config(f'folder:{tmp_path}', num_classes=0, num_tasks=2, batch_size=4))
  assert cd.class_names == classes and cd.num_classes == 4
  assert [cd.train_size(t) for t in range(2)] == [16, 16]
  assert [cd.test_size(t) for t in range(2)] == [4, 4]
  batch = _collect(cd.test_batches(1, 4))
  assert batch['image'].shape == (1, 4, SIZE, SIZE, 3)
  # Labels follow the class order: task 1 holds remapped labels 2 and 3.
  order = data.class_order(4, 0)
  values = batch['image'][0, :, 0, 0, 0] * 255
  for label, value in zip(batch['label'][0], values):
    assert int(round(value)) // 40 == order[label]


def test_missing_folder_is_a_clear_error(tmp_path):
  with pytest.raises(errors.MissingDataError, match='not a directory'):
    data.build_continual_data(
        _config(f'folder:{tmp_path}/nowhere', num_classes=0))


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
  assert train['mask'].sum() == cd.train_size(4) // 64 * 64
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
    data.build_continual_data(_config('no_such_dataset_anywhere'))
  with pytest.raises(errors.ConfigError, match='num_classes=7'):
    data.build_continual_data(_config('digits', num_classes=7))
  with pytest.raises(errors.ConfigError, match='fewer than'):
    data.build_continual_data(_config('digits', batch_size=1000))
  cd = data.build_continual_data(_config('digits'), process_count=3)
  with pytest.raises(errors.ConfigError, match='multiple'):
    cd.test_batches(0, 8)
