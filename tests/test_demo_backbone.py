"""The demo's pre-trained backbone: letters in the digits' style, a converted
directory the loader accepts, a cache that is reused or rebuilt, and
features that beat a random backbone."""

import dataclasses
import functools
import json
import os
import shutil

from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import configs.demo
from smope_jax import configuration
from smope_jax import demo_backbone
from smope_jax import weights
from smope_jax.data import glyphs
from smope_jax.errors import UserError
from smope_jax import factory

# A few steps: enough to check the plumbing, not to learn much. Recipes of
# one batch size share one compilation.
TINY = demo_backbone.Recipe(steps=3, batch_size=32, warmup_steps=1,
                            eval_images=64)


@pytest.fixture(name="config", scope="module")
def _config():
  return configs.demo.get_config()


@pytest.fixture(name="built", scope="module")
def _built(config, tmp_path_factory):
  """One tiny backbone, built once for the tests that only read it."""
  directory = str(tmp_path_factory.mktemp("cache") / "demo_backbone")
  return demo_backbone.ensure_demo_backbone(config, directory, TINY)


def template(config):
  return weights.backbone_template(configuration.model_dims(config),
                                   config.image_size)


def npz_sha(directory):
  return weights.sha256_file(os.path.join(directory, weights.BACKBONE_FILE))


def count_pretraining(monkeypatch):
  calls = []
  real = demo_backbone.pretrain

  def counted(*args, **kwargs):
    calls.append(1)
    return real(*args, **kwargs)

  monkeypatch.setattr(demo_backbone, "pretrain", counted)
  return calls


# ---------------------------------------------------------------- glyphs


def test_letters_hold_no_digit():
  assert not set(glyphs.LETTERS) & set("0123456789")
  assert len(set(glyphs.LETTERS)) == len(glyphs.LETTERS) == 52


def test_masters_fill_their_square_with_each_letter():
  images, labels = glyphs.render_masters("oI", glyphs.FONTS[:2], size=32)
  assert images.shape == (4, 32, 32) and images.dtype == np.float32
  np.testing.assert_array_equal(labels, [0, 1, 0, 1])
  assert images.min() >= 0.0 and images.max() <= 1.0
  for image in images:  # The longer side spans the canvas; centred.
    rows, cols = (np.flatnonzero(image.max(axis) > 0.1) for axis in (1, 0))
    assert max(rows[-1] - rows[0], cols[-1] - cols[0]) >= 30
    assert abs((rows[0] + rows[-1]) / 2 - 15.5) <= 1.5
    assert abs((cols[0] + cols[-1]) / 2 - 15.5) <= 1.5
  # "I" is a narrow upright bar, "o" a ring more than twice as wide.
  widths = [np.ptp(np.flatnonzero(image.max(0) > 0.1)) for image in images]
  assert widths[0] > 2 * widths[1] and widths[2] > 2 * widths[3]


def test_digit_style_counts_ink_per_cell_in_17_levels():
  image = np.zeros((1, 32, 32), np.float32)
  image[0, 0:4, 0:4] = 1.0  # Cell (0, 0) fully inked: 16/16.
  image[0, 4:8, 8:10] = 1.0  # Cell (1, 2): 8 of 16 pixels.
  image[0, 28, 28:31] = 1.0  # Cell (7, 7): 3 of 16 pixels.
  image[0, 12, 12] = 0.02  # A trace, rounded away: 0.02/16 -> 0.
  cells = np.asarray(glyphs.to_digit_style(jnp.asarray(image), 8))[0]
  expected = np.zeros((8, 8))
  expected[0, 0], expected[1, 2], expected[7, 7] = 1.0, 0.5, 3 / 16
  np.testing.assert_allclose(cells, expected, atol=1e-6)


def test_digit_style_upsamples_like_the_digits_source():
  ink = np.zeros((1, 32, 32), np.float32)
  ink[0, 8:12, 8:12] = 1.0  # Cell (2, 2) full -> a blurred square.
  up = np.asarray(glyphs.to_digit_style(jnp.asarray(ink), 32))[0]
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  one_cell = np.zeros((8, 8, 1), np.float32)
  one_cell[2, 2] = 1.0
  expected = tf.image.resize(one_cell, [32, 32], "bilinear").numpy()[..., 0]
  np.testing.assert_allclose(up, expected, atol=1e-5)


def test_batches_are_deterministic_images_of_known_letters():
  masters, labels = map(jnp.asarray,
                        glyphs.render_masters("AbZ", glyphs.FONTS[:1]))
  sample = jax.jit(
      lambda k: glyphs.sample_batch(k, masters, labels, 16, 32, 0.5))
  images, targets = sample(jax.random.PRNGKey(3))
  again, _ = sample(jax.random.PRNGKey(3))
  other, _ = sample(jax.random.PRNGKey(4))
  assert images.shape == (16, 32, 32, 3) and targets.shape == (16,)
  assert set(np.asarray(targets)) <= {0, 1, 2}
  assert float(images.min()) >= 0.0 and float(images.max()) <= 1.0
  np.testing.assert_array_equal(images[..., 0], images[..., 2])  # Grey.
  np.testing.assert_array_equal(images, again)
  assert not np.array_equal(images, other)


def test_random_resized_crop_zooms_in():
  image = np.zeros((1, 32, 32), np.float32)
  image[0, 15:17, 15:17] = 1.0
  crops = glyphs.random_resized_crop(jnp.repeat(jnp.asarray(image), 64, 0),
                                     jax.random.PRNGKey(0), 0.25)
  # A crop shows at most the whole image and, smaller, magnifies its part.
  assert crops.shape == (64, 32, 32)
  ink = np.asarray(crops).sum((1, 2))
  assert ink.max() > 1.5 * image.sum() and ink.min() >= 0.0


# ------------------------------------------------------------ the backbone


def test_builds_a_converted_directory_the_demo_model_loads(config, built):
  assert sorted(os.listdir(built)) == sorted(
      [weights.BACKBONE_FILE, weights.INFO_FILE])
  with open(os.path.join(built, weights.INFO_FILE)) as f:
    info = json.load(f)
  assert info["sha256"] == npz_sha(built)
  assert "52 letters" in info["source"]
  assert "3 AdamW steps of 32 images" in info["source"]
  assert info["image_size"] == 32
  with np.load(os.path.join(built, weights.BACKBONE_FILE)) as data:
    keys = set(data.files)
  # The backbone exactly: no letter classifier, no prompts.
  assert keys == set(traverse_util.flatten_dict(template(config), sep="/"))
  # The real loading path of a run: the model's backbone is the file's.
  with_backbone = config.copy_and_resolve_references()
  with_backbone.pretrained = built
  params = factory.init_params(
      with_backbone, *factory.build_model(with_backbone, config.num_tasks),
      factory.load_backbone(with_backbone, "unused-workdir"))
  with np.load(os.path.join(built, weights.BACKBONE_FILE)) as data:
    np.testing.assert_array_equal(params["cls"], data["cls"])
    np.testing.assert_array_equal(
        params["Transformer"]["encoderblock_3"]["MlpBlock_3"]["Dense_1"]
        ["kernel"], data["Transformer/encoderblock_3/MlpBlock_3/Dense_1/"
                         "kernel"])
  assert params["head"]["kernel"].shape == (64, config.num_classes)


def test_pretrained_demo_builds_into_the_workdir(config, built, tmp_path,
                                                 monkeypatch):
  """`config.pretrained = "demo"` is built once in WORKDIR/demo_backbone."""
  monkeypatch.setattr(
      demo_backbone, "ensure_demo_backbone",
      functools.partial(demo_backbone.ensure_demo_backbone, recipe=TINY))
  demo = config.copy_and_resolve_references()
  demo.pretrained = "demo"
  loaded = factory.load_backbone(demo, str(tmp_path))
  assert npz_sha(str(tmp_path / "demo_backbone")) == npz_sha(built)
  with np.load(os.path.join(built, weights.BACKBONE_FILE)) as data:
    np.testing.assert_array_equal(loaded["embedding"]["kernel"],
                                  data["embedding/kernel"])


def test_the_build_depends_on_the_fixed_seed_only(config, built, tmp_path):
  other_seed = config.copy_and_resolve_references()
  other_seed.seed = 7
  again = demo_backbone.ensure_demo_backbone(other_seed,
                                             str(tmp_path / "again"), TINY)
  assert npz_sha(again) == npz_sha(built)


def test_a_second_call_reuses_the_cache(config, tmp_path, monkeypatch):
  directory = str(tmp_path / "demo_backbone")
  calls = count_pretraining(monkeypatch)
  demo_backbone.ensure_demo_backbone(config, directory, TINY)
  sha, mtime = npz_sha(directory), os.path.getmtime(
      os.path.join(directory, weights.BACKBONE_FILE))
  assert demo_backbone.ensure_demo_backbone(config, directory,
                                            TINY) == directory
  assert len(calls) == 1
  assert npz_sha(directory) == sha
  assert os.path.getmtime(os.path.join(directory,
                                       weights.BACKBONE_FILE)) == mtime


def corrupt_weights(directory):
  path = os.path.join(directory, weights.BACKBONE_FILE)
  with open(path, "r+b") as f:
    f.seek(os.path.getsize(path) // 2)
    byte = f.read(1)
    f.seek(-1, os.SEEK_CUR)
    f.write(bytes([byte[0] ^ 0xFF]))


def truncate_weights(directory):
  path = os.path.join(directory, weights.BACKBONE_FILE)
  with open(path, "r+b") as f:
    f.truncate(100)


def drop_info(directory):
  os.remove(os.path.join(directory, weights.INFO_FILE))


def garble_info(directory):
  with open(os.path.join(directory, weights.INFO_FILE), "w") as f:
    f.write("{not json")


@pytest.mark.parametrize(
    "damage", [corrupt_weights, truncate_weights, drop_info, garble_info])
def test_a_damaged_cache_is_rebuilt(config, built, tmp_path, monkeypatch,
                                    damage):
  directory = str(tmp_path / "demo_backbone")
  shutil.copytree(built, directory)
  damage(directory)
  assert not demo_backbone.is_valid(directory, config, TINY)
  calls = count_pretraining(monkeypatch)
  demo_backbone.ensure_demo_backbone(config, directory, TINY)
  assert len(calls) == 1
  assert demo_backbone.is_valid(directory, config, TINY)
  assert npz_sha(directory) == npz_sha(built)
  assert not [n for n in os.listdir(tmp_path) if n != "demo_backbone"]


def test_another_recipe_or_model_size_is_rebuilt(config, built):
  assert demo_backbone.is_valid(built, config, TINY)
  longer = dataclasses.replace(TINY, steps=4)
  assert not demo_backbone.is_valid(built, config, longer)
  wider = config.copy_and_resolve_references()
  wider.model.mlp_dim = 256
  assert not demo_backbone.is_valid(built, wider, TINY)
  bigger_images = config.copy_and_resolve_references()
  bigger_images.image_size = 48
  assert not demo_backbone.is_valid(built, bigger_images, TINY)


def test_an_unwritable_directory_is_a_user_error(config, tmp_path):
  blocker = tmp_path / "a_file"
  blocker.write_text("not a directory")
  with pytest.raises(UserError, match="cannot write the demo backbone"):
    demo_backbone.ensure_demo_backbone(config, str(blocker / "sub"), TINY)


def test_a_full_disk_is_a_user_error_naming_the_workdir(config, tmp_path,
                                                        tmpfs):
  with tmpfs(tmp_path / "mnt", "size=64k") as mnt:
    with pytest.raises(UserError) as e:
      demo_backbone.ensure_demo_backbone(config, str(mnt / "demo_backbone"),
                                         TINY)
    assert str(e.value) == (
        f"cannot write the demo backbone to {mnt / 'demo_backbone'} (No "
        "space left on device); free some space there or pass a --workdir "
        "on another disk")
    assert not os.listdir(mnt)  # The staging directory is gone.


def test_a_backbone_published_meanwhile_is_kept(config, built, tmp_path,
                                                monkeypatch):
  """Two processes building at once: the second keeps the first's copy."""
  directory = str(tmp_path / "demo_backbone")

  replace = os.replace

  def publish_first_then_fail(source, target):
    if target != directory:
      return replace(source, target)
    shutil.copytree(built, target)
    raise OSError(39, "Directory not empty")

  monkeypatch.setattr(os, "replace", publish_first_then_fail)
  assert demo_backbone.ensure_demo_backbone(config, directory,
                                            TINY) == directory
  assert npz_sha(directory) == npz_sha(built)
  assert os.listdir(tmp_path) == ["demo_backbone"]


def features(config, backbone, images):
  """Pre-logits (CLS after the final norm) of the backbone."""
  model = demo_backbone.letter_model(config)
  head = {
      "kernel": jnp.zeros((model.hidden_size, model.num_classes)),
      "bias": jnp.zeros((model.num_classes,))
  }
  apply = jax.jit(functools.partial(model.apply, mode="plain"))
  return np.asarray(
      apply({"params": {
          **backbone, "head": head
      }}, images)["pre_logits"])


def random_backbone(config):
  params = demo_backbone.letter_model(config).init(jax.random.PRNGKey(1),
                                                   jnp.zeros((1, 32, 32, 3)),
                                                   mode="plain")
  return {k: v for k, v in params["params"].items() if k != "head"}


def nearest_class_mean_accuracy(train, train_labels, test, test_labels):
  classes = np.unique(train_labels)
  means = np.stack([train[train_labels == c].mean(0) for c in classes])
  distances = ((test[:, None] - means[None])**2).sum(-1)
  return float(np.mean(classes[distances.argmin(1)] == test_labels))


@pytest.mark.slow
def test_pretrained_features_tell_letters_apart_better(config, tmp_path):
  short = dataclasses.replace(TINY, steps=200, warmup_steps=20)
  directory = demo_backbone.ensure_demo_backbone(
      config, str(tmp_path / "demo_backbone"), short)
  trained = weights.load_backbone(directory, template(config))
  # Five distinct letters, fresh distortions; class means from 200 images.
  masters, labels = map(jnp.asarray, glyphs.render_masters("AoTxS"))
  train_images, train_labels = glyphs.sample_batch(jax.random.PRNGKey(10),
                                                   masters, labels, 200, 32)
  test_images, test_labels = glyphs.sample_batch(jax.random.PRNGKey(11),
                                                 masters, labels, 200, 32)
  accuracy = {
      name:
          nearest_class_mean_accuracy(features(config, backbone, train_images),
                                      np.asarray(train_labels),
                                      features(config, backbone, test_images),
                                      np.asarray(test_labels))
      for name, backbone in (("trained", trained), ("random",
                                                    random_backbone(config)))
  }
  # Measured: 0.57 against 0.37 (chance 0.2).
  assert accuracy["trained"] > accuracy["random"] + 0.1, accuracy


@pytest.mark.slow
def test_the_demo_recipe_transfers_to_digits(config, tmp_path):
  """The full recipe (about a minute): digits it never saw, told apart."""
  from sklearn import datasets  # pylint: disable=g-import-not-at-top
  directory = demo_backbone.ensure_demo_backbone(
      config, str(tmp_path / "demo_backbone"))
  trained = weights.load_backbone(directory, template(config))
  digits = datasets.load_digits()
  images = jax.image.resize(jnp.asarray(digits.images / 16.0, jnp.float32),
                            (len(digits.images), 32, 32), "linear")
  images = jnp.repeat(images[..., None], 3, axis=-1)
  half = len(images) // 2
  accuracy = {}
  for name, backbone in (("trained", trained), ("random",
                                                random_backbone(config))):
    feats = features(config, backbone, images)
    accuracy[name] = nearest_class_mean_accuracy(feats[:half],
                                                 digits.target[:half],
                                                 feats[half:],
                                                 digits.target[half:])
  assert accuracy["trained"] > accuracy["random"] + 0.1, accuracy
