"""Per-image preprocessing: the reference's train augmentation and test resize.

Images come in as uint8 (0..255) or float (0..1) tensors of shape (h, w, 3)
and leave as float32 (size, size, 3) in [0, 1]; the model normalises nothing
further. Random ops are TF *stateless* ops driven by an explicit seed, so an
example's augmentation is a pure function of (seed, image).
"""

import math

import tensorflow as tf


def graph_only(fn):
  """Marks a tf.data function as plain graph code, skipping AutoGraph.

  Our functions have no Python control flow on tensors, and AutoGraph's
  source parsing is slow and, on CPython 3.11, can hit the interpreter's
  spurious "AST constructor recursion depth mismatch" error under threads.
  """
  return tf.autograph.experimental.do_not_convert(fn)


def to_unit_float(image: tf.Tensor) -> tf.Tensor:
  """uint8 0..255 -> float32 0..1; float images are assumed already in 0..1."""
  return tf.image.convert_image_dtype(image, tf.float32)


def _resize(image: tf.Tensor, height, width,
            method: str = "bilinear") -> tf.Tensor:
  # Antialiased bilinear (bicubic) matches PIL's filter used by torchvision.
  image = tf.image.resize(image, [height, width], method, antialias=True)
  return tf.clip_by_value(image, 0.0, 1.0)


def random_resized_crop(
    image: tf.Tensor,
    seed: tf.Tensor,
    size: int,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    attempts: int = 10,
    method: str = "bilinear",
) -> tf.Tensor:
  """torchvision's RandomResizedCrop with stateless randomness.

  Draws `attempts` (area, log-aspect) candidates at once and keeps the first
  that fits inside the image; if none fits, falls back to the largest
  centred crop whose aspect ratio lies in `ratio`, as torchvision does.

  Args:
    image: float (h, w, 3).
    seed: int (2,) stateless seed.
    size: output side.
    scale: range of the crop area as a fraction of the image area.
    ratio: range of the crop aspect ratio (width / height).
    attempts: number of candidates.
    method: the resize's interpolation.

  Returns:
    float32 (size, size, 3).
  """
  shape = tf.shape(image)
  h, w = tf.cast(shape[0], tf.float32), tf.cast(shape[1], tf.float32)
  seeds = tf.random.experimental.stateless_split(seed, 4)
  area = h * w * tf.random.stateless_uniform([attempts], seeds[0], scale[0],
                                             scale[1])
  aspect = tf.exp(
      tf.random.stateless_uniform([attempts], seeds[1], math.log(ratio[0]),
                                  math.log(ratio[1])))
  crop_w = tf.round(tf.sqrt(area * aspect))
  crop_h = tf.round(tf.sqrt(area / aspect))
  fits = (crop_w > 0) & (crop_h > 0) & (crop_w <= w) & (crop_h <= h)
  top = tf.floor(
      tf.random.stateless_uniform([attempts], seeds[2]) * (h - crop_h + 1))
  left = tf.floor(
      tf.random.stateless_uniform([attempts], seeds[3]) * (w - crop_w + 1))
  first = tf.argmax(tf.cast(fits, tf.int32))

  # Fallback: centred crop with the aspect ratio clamped into `ratio`.
  in_ratio = w / h
  fall_w = tf.where(in_ratio > ratio[1], tf.round(h * ratio[1]), w)
  fall_h = tf.where(in_ratio < ratio[0], tf.round(w / ratio[0]), h)
  found = tf.reduce_any(fits)
  crop_h = tf.where(found, crop_h[first], fall_h)
  crop_w = tf.where(found, crop_w[first], fall_w)
  top = tf.where(found, top[first], tf.floor((h - crop_h) / 2))
  left = tf.where(found, left[first], tf.floor((w - crop_w) / 2))

  begin = tf.cast(tf.stack([top, left, 0.0]), tf.int32)
  extent = tf.cast(tf.stack([crop_h, crop_w, 3.0]), tf.int32)
  return _resize(tf.slice(image, begin, extent), size, size, method)


def train_image(image: tf.Tensor, seed: tf.Tensor, size: int) -> tf.Tensor:
  """The training augmentation: random-resized-crop, then horizontal flip."""
  crop_seed, flip_seed = tf.unstack(
      tf.random.experimental.stateless_split(seed, 2))
  image = random_resized_crop(to_unit_float(image), crop_seed, size)
  flip = tf.random.stateless_uniform([], flip_seed) < 0.5
  image = tf.cond(flip, lambda: tf.image.flip_left_right(image), lambda: image)
  return tf.ensure_shape(image, [size, size, 3])


def resize_shorter_side(image: tf.Tensor, short: int,
                        method: str = "bilinear") -> tf.Tensor:
  """torchvision's `Resize(short)`: the shorter side becomes `short`.

  The aspect ratio is kept: the longer side becomes int(short * long /
  shorter side), truncated as torchvision computes it in Python floats.
  """
  shape = tf.cast(tf.shape(image)[:2], tf.float64)
  h, w = shape[0], shape[1]
  shorter, longer = tf.minimum(h, w), tf.maximum(h, w)
  short = tf.constant(short, tf.float64)
  long_side = tf.floor(short * longer / shorter)
  new_h = tf.where(w <= h, long_side, short)
  new_w = tf.where(w <= h, short, long_side)
  return _resize(image, tf.cast(new_h, tf.int32), tf.cast(new_w, tf.int32),
                 method)


def center_crop(image: tf.Tensor, size: int) -> tf.Tensor:
  """torchvision's `CenterCrop(size)`: top = round((h - size) / 2), alike left.

  Python's round, like tf.round, rounds halves to even.
  """
  shape = tf.cast(tf.shape(image)[:2], tf.float64)
  top = tf.cast(tf.round((shape[0] - size) / 2.0), tf.int32)
  left = tf.cast(tf.round((shape[1] - size) / 2.0), tf.int32)
  return image[top:top + size, left:left + size]


def test_image(image: tf.Tensor, size: int, mode: str) -> tf.Tensor:
  """The evaluation transform.

  Args:
    image: uint8 or float (h, w, 3).
    size: output side (`config.image_size`).
    mode: 'resize' (CIFAR, digits): resize to size x size. 'resize_crop'
      (ImageNet-R, CUB): the reference's `Resize(256)` then
      `CenterCrop(224)` at 224 px: the shorter side is scaled to
      r = round(size * 256 / 224) keeping the aspect ratio (a 500 x 375
      image becomes 341 x 256), then the centred size x size window.

  Returns:
    float32 (size, size, 3).
  """
  image = to_unit_float(image)
  if mode == "resize":
    image = _resize(image, size, size)
  elif mode == "resize_crop":
    image = center_crop(resize_shorter_side(image, round(size * 256 / 224)),
                        size)
  else:
    raise ValueError(f"unknown test resize {mode!r} (config.test_resize).")
  return tf.ensure_shape(image, [size, size, 3])


# HiDe-Prompt's transforms (its authors' code): CIFAR-100 is normalised
# with its own mean and std and gets ColorJitter(brightness=63/255) and a
# bicubic crop; the other benchmarks crop from 5 % of the area up, bilinear,
# unnormalised; every test image (and every statistics pass) is resized
# bicubic so that its shorter side is 256 / 224 of the size, then centre
# cropped.
CIFAR_MEAN = (0.5071, 0.4867, 0.4408)
CIFAR_STD = (0.2675, 0.2565, 0.2761)
BRIGHTNESS = 63 / 255


def _cifar_normalize(image: tf.Tensor) -> tf.Tensor:
  return (image - tf.constant(CIFAR_MEAN)) / tf.constant(CIFAR_STD)


def hide_train_image(image: tf.Tensor, seed: tf.Tensor, size: int,
                     cifar: bool) -> tf.Tensor:
  """HiDe-Prompt's training augmentation (see above)."""
  crop_seed, flip_seed, jitter_seed = tf.unstack(
      tf.random.experimental.stateless_split(seed, 3))
  image = random_resized_crop(to_unit_float(image), crop_seed, size,
                              scale=(0.08, 1.0) if cifar else (0.05, 1.0),
                              method="bicubic" if cifar else "bilinear")
  flip = tf.random.stateless_uniform([], flip_seed) < 0.5
  image = tf.cond(flip, lambda: tf.image.flip_left_right(image), lambda: image)
  if cifar:  # PIL's brightness on the uint8 image, then the normalisation.
    factor = tf.random.stateless_uniform([], jitter_seed, 1 - BRIGHTNESS,
                                         1 + BRIGHTNESS)
    image = tf.round(tf.clip_by_value(image * factor, 0.0, 1.0) * 255) / 255
    image = _cifar_normalize(image)
  return tf.ensure_shape(image, [size, size, 3])


def hide_test_image(image: tf.Tensor, size: int, cifar: bool) -> tf.Tensor:
  """HiDe-Prompt's test transform (see above)."""
  image = resize_shorter_side(to_unit_float(image), round(size * 256 / 224),
                              method="bicubic")
  image = center_crop(image, size)
  if cifar:
    image = _cifar_normalize(image)
  return tf.ensure_shape(image, [size, size, 3])
