"""A pre-trained backbone for the offline demo, made on the spot and cached.

A random frozen ViT gives every input nearly the same queries, so the
router picks the same experts for everything and old tasks are forgotten:
the demo would show a method that seems broken. No pre-trained weights can
be downloaded offline, so the demo's own tiny ViT is pre-trained here, in
about a minute on a CPU, to classify the 52 letters A-Z and a-z rendered
from the fonts matplotlib ships (`smope_jax.data.glyphs`): no digit and no
digit label is ever seen. The backbone (without the letter classifier) is
written as a converted directory, so the demo loads it like any
pre-trained weights. The training is a pure function of the model size and
the fixed `PRETRAIN_SEED`, not of `config.seed`: every seed of a run gets
the same backbone, as runs share a published checkpoint.
"""

import dataclasses
import errno
import functools
import json
import os
import shutil
import tempfile
import time

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
import optax

from smope_jax import configuration
from smope_jax import weights
from smope_jax.data import glyphs
from smope_jax.errors import MissingWeightsError
from smope_jax.errors import UserError
from smope_jax.models.vit import VisionTransformer

PRETRAIN_SEED = 0
# Bump when the images or the training change, so that old caches, whose
# info.json records the version, are rebuilt.
RECIPE_VERSION = 1


@dataclasses.dataclass(frozen=True)
class Recipe:
  """How the backbone is pre-trained; recorded in its info.json."""
  steps: int = 600
  batch_size: int = 128
  peak_lr: float = 3e-3
  warmup_steps: int = 60
  weight_decay: float = 0.05
  augmented_fraction: float = 0.5  # Also cropped and flipped like digits.
  eval_images: int = 1024  # Fresh letters scored after training (log only).


def describe(recipe: Recipe) -> str:
  """What the backbone was trained on, recorded as its `source`."""
  return (f"demo backbone v{RECIPE_VERSION}: supervised on the "
          f"{len(glyphs.LETTERS)} letters A-Z a-z in {len(glyphs.FONTS)} "
          f"matplotlib fonts, distorted and drawn like the 8x8 digits "
          f"({recipe.augmented_fraction:.0%} also cropped and flipped), "
          f"{recipe.steps} AdamW steps of {recipe.batch_size} images, peak "
          f"lr {recipe.peak_lr}, warm-up {recipe.warmup_steps}, cosine, "
          f"weight decay {recipe.weight_decay}, seed {PRETRAIN_SEED}")


def _expected_info(config, recipe: Recipe) -> dict:
  dims = configuration.model_dims(config)
  return {
      "source":
          describe(recipe),
      "model":
          "custom " + " ".join(f"{k}={v}" for k, v in sorted(dims.items())),
      "image_size":
          int(config.image_size)
  }


def _template(config) -> dict:
  return weights.backbone_template(configuration.model_dims(config),
                                   config.image_size)


def is_valid(directory: str, config, recipe: Recipe = Recipe()) -> bool:
  """True if `directory` holds this recipe's backbone, intact, for `config`."""
  try:
    with open(os.path.join(directory, weights.INFO_FILE)) as f:
      info = json.load(f)
    if not isinstance(info, dict):
      return False
    info.pop("sha256", None)
    if info != _expected_info(config, recipe):
      return False
    weights.load_backbone(directory, _template(config))
  except (OSError, ValueError, MissingWeightsError):
    return False
  return True


def letter_model(config) -> VisionTransformer:
  """The configured ViT, without prompts, with a letter classifier."""
  return VisionTransformer(num_classes=len(glyphs.LETTERS),
                           **configuration.model_dims(config))


def _learning_rates(recipe: Recipe) -> np.ndarray:
  """Linear warm-up to the peak, then a cosine to zero, one rate a step."""
  schedule = optax.warmup_cosine_decay_schedule(0.0, recipe.peak_lr,
                                                recipe.warmup_steps,
                                                recipe.steps)
  return np.asarray(jax.vmap(schedule)(jnp.arange(recipe.steps)), np.float32)


# Module-level jits, the rate an argument: builds of any length in one
# process (tests) share one compilation per batch shape.
@functools.partial(jax.jit, static_argnames=("model", "size"))
def _init_params(key, *, model, size):
  return model.init(key, jnp.zeros((1, size, size, 3)), mode="plain")["params"]


@functools.partial(
    jax.jit, static_argnames=("model", "size", "batch_size",
                              "augmented_fraction", "weight_decay"))
def _train_step(params, opt_state, key, rate, masters, labels, *, model, size,
                batch_size, augmented_fraction, weight_decay):
  images, targets = glyphs.sample_batch(key, masters, labels, batch_size, size,
                                        augmented_fraction)

  def loss_fn(p):
    logits = model.apply({"params": p}, images, mode="plain")["logits"]
    return optax.softmax_cross_entropy_with_integer_labels(logits,
                                                           targets).mean()

  loss, grads = jax.value_and_grad(loss_fn)(params)
  tx = optax.adamw(rate, weight_decay=weight_decay)
  updates, opt_state = tx.update(grads, opt_state, params)
  return optax.apply_updates(params, updates), opt_state, loss


@functools.partial(jax.jit, static_argnames=("model", "count", "size"))
def _letter_accuracy(params, key, masters, labels, *, model, count, size):
  images, targets = glyphs.sample_batch(key, masters, labels, count, size)
  logits = model.apply({"params": params}, images, mode="plain")["logits"]
  return jnp.mean(jnp.argmax(logits, -1) == targets)


def pretrain(config, recipe: Recipe = Recipe()) -> tuple[dict, float]:
  """Trains the ViT on letters; returns (backbone params, letter accuracy).

  The accuracy is measured on `recipe.eval_images` fresh letters (distorted,
  not cropped).
  """
  model, size = letter_model(config), int(config.image_size)
  masters, labels = map(jnp.asarray, glyphs.render_masters())
  init_key, data_key, eval_key = jax.random.split(
      jax.random.PRNGKey(PRETRAIN_SEED), 3)
  params = _init_params(init_key, model=model, size=size)
  # AdamW's state does not depend on the rate.
  opt_state = optax.adamw(0.0, weight_decay=recipe.weight_decay).init(params)
  loss = jnp.nan
  for step, rate in enumerate(_learning_rates(recipe)):
    params, opt_state, loss = _train_step(
        params, opt_state, jax.random.fold_in(data_key, step), rate, masters,
        labels, model=model, size=size, batch_size=recipe.batch_size,
        augmented_fraction=recipe.augmented_fraction,
        weight_decay=recipe.weight_decay)
  accuracy = float(
      _letter_accuracy(params, eval_key, masters, labels, model=model,
                       count=recipe.eval_images, size=size))
  logging.info("demo backbone: final letter loss %.3f", float(loss))
  backbone = {
      k: jax.tree_util.tree_map(np.asarray, params[k]) for k in _template(config)
  }
  return backbone, accuracy


def _staging_directory(directory: str) -> str:
  """A new empty directory beside `directory`, to be renamed into place.

  Made before training, so an unwritable place fails at once.
  """
  parent = os.path.dirname(os.path.abspath(directory))
  try:
    os.makedirs(parent, exist_ok=True)
    return tempfile.mkdtemp(prefix=".demo_backbone-", dir=parent)
  except OSError as e:
    raise UserError(_unwritable(directory, e)) from e


def _publish(backbone: dict, staging: str, directory: str, config,
             recipe: Recipe) -> None:
  """Writes the converted directory into `staging`, then renames it.

  A run stopped mid-write thus leaves no directory that looks complete. If
  another process published the same backbone meanwhile (the training is
  deterministic), its directory is kept.
  """
  info = _expected_info(config, recipe)
  try:
    weights.save_backbone(backbone, staging, source=info["source"],
                          model=info["model"], image_size=info["image_size"])
    if is_valid(directory, config, recipe):
      return
    shutil.rmtree(directory, ignore_errors=True)
    os.replace(staging, directory)
  except OSError as e:
    if not is_valid(directory, config, recipe):
      raise UserError(_unwritable(directory, e)) from e


def _unwritable(directory: str, error: OSError) -> str:
  """The one line for a backbone that cannot be written, with its fix."""
  fix = "pass a writable local --workdir"
  if error.errno in (errno.ENOSPC, errno.EDQUOT):
    fix = "free some space there or pass a --workdir on another disk"
  return (f"cannot write the demo backbone to {directory} "
          f"({error.strerror or error}); {fix}")


def ensure_demo_backbone(config, directory: str,
                         recipe: Recipe = Recipe()) -> str:
  """Returns `directory` holding the demo backbone, pre-training it if needed.

  A directory left by an earlier run is reused if its info.json records this
  recipe and model and its weights match their sha256; otherwise (missing,
  partial, corrupted or for another model size) it is trained and written
  anew.
  """
  if is_valid(directory, config, recipe):
    logging.info("demo backbone: reusing %s", directory)
    return directory
  staging = _staging_directory(directory)
  try:
    logging.info("demo backbone: pre-training the ViT into %s: %s", directory,
                 describe(recipe))
    start = time.perf_counter()
    backbone, accuracy = pretrain(config, recipe)
    _publish(backbone, staging, directory, config, recipe)
  finally:
    shutil.rmtree(staging, ignore_errors=True)
  logging.info(
      "demo backbone: done in %.1f s; letter accuracy %.1f %% on %d "
      "fresh images (chance %.1f %%)",
      time.perf_counter() - start, 100 * accuracy, recipe.eval_images,
      100 / len(glyphs.LETTERS))
  return directory
