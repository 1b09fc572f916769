"""Loading a backbone: from a preset or a file, checked key by key against
the model's parameter template and fitted to its image size."""

import math
import os

from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np

from smope_jax.errors import ConfigError
from smope_jax.errors import MissingWeightsError
from smope_jax.models.variants import VIT_VARIANTS
from smope_jax.models.vit import VisionTransformer
from smope_jax.weights import base
from smope_jax.weights import formats
from smope_jax.weights import presets
from smope_jax.weights import torch_reader
from smope_jax.weights.base import UnreadableWeightsError


def backbone_template(variant, image_size):
  """Shapes of the backbone parameters: the prompt-free model's, headless.

  `variant` is a name in VIT_VARIANTS or a dict of the model's sizes.
  """
  if isinstance(variant, str) and variant not in VIT_VARIANTS:
    raise ConfigError(f"unknown ViT variant {variant!r}; known: "
                      f'{", ".join(VIT_VARIANTS)}')
  dims = VIT_VARIANTS[variant] if isinstance(variant, str) else variant
  if image_size % dims["patch_size"]:
    raise ConfigError(f"image size {image_size} is not a multiple of the "
                      f'patch size {dims["patch_size"]}')
  model = VisionTransformer(num_classes=1, **dims)
  images = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
  params = jax.eval_shape(
      lambda x: model.init(jax.random.PRNGKey(0), x, mode="plain"),
      images)["params"]
  return {k: v for k, v in params.items() if k != "head"}


def _resizable(shape, want):
  """True if a position embedding of `shape` can be resized to `want`."""
  if len(shape) != 3 or shape[0] != 1 or shape[2] != want[2]:
    return False
  if not 2 <= shape[1] <= torch_reader.MAX_TENSOR_ELEMENTS // max(shape[2], 1):
    return False
  return all(math.isqrt(n - 1)**2 == n - 1 for n in (shape[1], want[1]))


def _resize_pos_embedding(pos, num_tokens):
  """Bilinearly resizes the patch grid part; the CLS embedding is kept."""
  old, new = (math.isqrt(n - 1) for n in (pos.shape[1], num_tokens))
  grid = pos[0, 1:].astype(np.float32).reshape(old, old, -1)
  grid = jax.image.resize(grid, (new, new, grid.shape[-1]), "bilinear")
  grid = np.asarray(grid).reshape(1, new * new, -1)
  return np.concatenate([pos[:, :1].astype(np.float32), grid], 1)


def _check_fit(label, got, want):
  """Names every missing, unexpected or wrongly shaped key."""

  def fits(key):
    shape = tuple(got[key].shape)
    return shape == want[key] or (key == formats.POS and
                                  _resizable(shape, want[key]))

  wrong = [
      f"{k} {tuple(got[k].shape)} (need {want[k]})"
      for k in sorted(want.keys() & got.keys())
      if not fits(k)
  ]
  problems = [
      f"{len(keys)} {what} keys: {base.listed(keys)}"
      for what, keys in (("missing", sorted(want.keys() - got.keys())),
                         ("unexpected",
                          sorted(map(base.shown,
                                     got.keys() - want.keys()))),
                         ("wrongly shaped", wrong))
      if keys
  ]
  if problems:
    raise MissingWeightsError(
        f'weights from {label} do not fit the model ({"; ".join(problems)}; '
        "names in the Google ViT layout)")


def _load_file(path, template, label):
  """Reads, checks and converts the weights at `path` to `template`."""
  want = {
      k: tuple(v.shape)
      for k, v in traverse_util.flatten_dict(template, sep="/").items()
  }
  num_heads = want[formats.BLOCK.format(0) +
                   "MultiHeadDotProductAttention_1/query/bias"][0]
  got = formats.read_flat(path, num_heads, label)
  _check_fit(label, got, want)
  values = {k: formats.read_value(k, got[k], label) for k in want}
  pos = values.get(formats.POS)
  if pos is not None and pos.shape != want[formats.POS]:
    values[formats.POS] = _resize_pos_embedding(pos, want[formats.POS][1])
  bad = sorted(k for k, v in values.items() if not np.isfinite(v).all())
  if bad:
    raise UnreadableWeightsError(
        f"weights from {label} hold NaN or infinite values (in float32) in "
        f"{len(bad)} keys: {base.listed(bad)}; use a checkpoint saved before "
        "training diverged")
  return jax.tree_util.tree_map_with_path(
      lambda keys, _: values["/".join(k.key for k in keys)], template)


def check_source(source):
  """Fails fast on a source that names neither a preset nor a weights file.

  Reads nothing, so callers can check a config before doing any work.
  """
  if source in presets.PRESETS:
    return
  path = os.path.expanduser(source)
  if not os.path.exists(path):
    raise MissingWeightsError(
        f"pretrained weights {source!r} are neither a file, a directory nor "
        f'a preset ({", ".join(presets.PRESETS)})')
  formats.weights_format(path)


def load_backbone(source, template, *, cache_dir=None, base_url=None):
  """Loads backbone weights from a preset, a file or a converted directory.

  Returns float32 numpy arrays nested exactly like `template` (the backbone
  part of the parameter tree). Raises MissingWeightsError, with a one-line
  message naming the keys, for missing, unexpected, wrongly shaped,
  non-float or non-finite weights rather than leaving any random, and for
  files that are not weights. A preset is downloaded into the cache
  (`cache_dir`, env SMOPE_JAX_CACHE, ~/.cache/smope_jax) from its URL or
  the mirror `base_url` (env SMOPE_JAX_WEIGHTS_URL) serving the cache's file
  names, and is kept there only once it loads.
  """
  check_source(source)
  if source in presets.PRESETS:
    return presets.load_preset(
        source, lambda path, label: _load_file(path, template, label),
        cache_dir, base_url)
  path = os.path.expanduser(source)
  return _load_file(path, template, path)
