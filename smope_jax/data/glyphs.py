"""Letters rendered from the fonts matplotlib ships: images with no digits.

The demo's backbone is pre-trained on these, so it learns strokes, curves
and corners without ever seeing a digit. `render_masters` draws every letter
of every font once, centred on a square canvas; `sample_batch` turns masters
into digit-like training images inside jit: broader strokes, a random
affine warp, noise, then the digits' own path (8x8 cells of 17 grey levels,
upsampled bilinearly to the input size).
"""

import os

import jax
import jax.numpy as jnp
import matplotlib
from matplotlib import ft2font
import numpy as np
import PIL.Image

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
# Sans, serif, monospaced, Computer Modern and STIX faces, upright and
# slanted, regular and bold: the same letter in many shapes.
FONTS = ("DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSans-Oblique.ttf",
         "DejaVuSans-BoldOblique.ttf", "DejaVuSansMono.ttf",
         "DejaVuSansMono-Bold.ttf", "DejaVuSansMono-Oblique.ttf",
         "DejaVuSansMono-BoldOblique.ttf", "DejaVuSerif.ttf",
         "DejaVuSerif-Bold.ttf", "DejaVuSerif-Italic.ttf",
         "DejaVuSerif-BoldItalic.ttf", "STIXGeneral.ttf", "STIXGeneralBol.ttf",
         "STIXGeneralItalic.ttf", "STIXGeneralBolIta.ttf", "cmr10.ttf",
         "cmss10.ttf", "cmtt10.ttf", "cmti10.ttf", "cmb10.ttf")
MASTER_SIZE = 32  # Side of a master; 4x the 8x8 cells of the digits.
CELLS = 8  # The digits' resolution.
GREY_LEVELS = 16  # The digits count 0..16 inked pixels per cell.
MAX_EMBOLDEN = 3  # Up to 3 dilations: strokes up to 6 px wider at 32 px.
# The demo's training crops keep 8-100 % of the area (torchvision's range).
DEMO_MIN_CROP_AREA = 0.08


def _glyph_bitmap(font: ft2font.FT2Font, letter: str) -> np.ndarray:
  """The letter's tightly cropped anti-aliased bitmap, ink in [0, 1]."""
  font.set_text(letter)
  font.draw_glyphs_to_bitmap(antialiased=True)
  image = np.asarray(font.get_image(), np.float32) / 255.0
  rows, cols = np.flatnonzero(image.any(1)), np.flatnonzero(image.any(0))
  return image[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]


def _fit_square(bitmap: np.ndarray, size: int) -> np.ndarray:
  """Scales the bitmap's longer side to `size` and centres it on a square.

  Like the digits, each letter then fills its box.
  """
  height, width = bitmap.shape
  scale = size / max(height, width)
  new_h, new_w = max(1, round(height * scale)), max(1, round(width * scale))
  resized = np.asarray(
      PIL.Image.fromarray(bitmap).resize((new_w, new_h),
                                         PIL.Image.Resampling.BOX))
  canvas = np.zeros((size, size), np.float32)
  top, left = (size - new_h) // 2, (size - new_w) // 2
  canvas[top:top + new_h, left:left + new_w] = np.clip(resized, 0.0, 1.0)
  return canvas


def render_masters(letters: str = LETTERS, fonts=FONTS,
                   size: int = MASTER_SIZE) -> tuple[np.ndarray, np.ndarray]:
  """Every letter in every font: (images (N, size, size), labels (N,)).

  Label i is `letters[i]`; images are float32 ink in [0, 1], font-major.
  """
  directory = os.path.join(matplotlib.get_data_path(), "fonts", "ttf")
  images, labels = [], []
  for name in fonts:
    font = ft2font.FT2Font(os.path.join(directory, name))
    font.set_size(4 * size, 72)
    for label, letter in enumerate(letters):
      images.append(_fit_square(_glyph_bitmap(font, letter), size))
      labels.append(label)
  return np.stack(images), np.asarray(labels, np.int32)


def _embolden(images: jax.Array, steps: jax.Array) -> jax.Array:
  """Dilates image i `steps[i]` times (3x3): pen strokes as thick as digits'.

  Font strokes are thin; the digits were written with a broad pen, so most
  of their strokes fill whole 8x8 cells.
  """
  grown = [images]
  for _ in range(MAX_EMBOLDEN):
    grown.append(
        jax.lax.reduce_window(grown[-1], -jnp.inf, jax.lax.max, (1, 3, 3),
                              (1, 1, 1), "SAME"))
  return jnp.take_along_axis(jnp.stack(grown, 1), steps[:, None, None, None],
                             1)[:, 0]


def _matrices(rows) -> jax.Array:
  """[[a, b], [c, d]] of (B,) entries -> (B, 2, 2)."""
  return jnp.stack([jnp.stack(row, -1) for row in rows], -2)


def _warp(images: jax.Array, key: jax.Array) -> jax.Array:
  """Random rotation, scale, aspect, shear and shift about the centre."""
  batch, size = images.shape[0], images.shape[1]
  keys = jax.random.split(key, 5)
  angle = jax.random.uniform(keys[0], (batch,), minval=-0.35, maxval=0.35)
  scale = jnp.exp(jax.random.uniform(keys[1], (batch,), minval=-0.3,
                                     maxval=0.1))
  aspect = jnp.exp(
      jax.random.uniform(keys[2], (batch,), minval=-0.25, maxval=0.25))
  shear = jax.random.uniform(keys[3], (batch,), minval=-0.3, maxval=0.3)
  shift = jax.random.uniform(keys[4],
                             (batch, 2), minval=-0.12, maxval=0.12) * size
  cos, sin, one, zero = (jnp.cos(angle), jnp.sin(angle), jnp.ones(batch),
                         jnp.zeros(batch))
  # Source -> output in (y, x): rotation @ shear @ scale; sampling needs the
  # inverse (output -> source).
  rotation = _matrices([[cos, -sin], [sin, cos]])
  shearing = _matrices([[one, zero], [shear, one]])
  scaling = _matrices([[scale * jnp.sqrt(aspect), zero],
                       [zero, scale / jnp.sqrt(aspect)]])
  inverse = jnp.linalg.inv(rotation @ shearing @ scaling)
  centre = (size - 1) / 2
  grid = jnp.stack(
      jnp.meshgrid(jnp.arange(size), jnp.arange(size), indexing="ij"),
      -1) - centre  # (S, S, 2).
  source = jnp.einsum("bij,byxj->byxi", inverse, grid - shift[:, None, None])
  return _sample_bilinear(images, source + centre)


def _sample_bilinear(images: jax.Array, coords: jax.Array) -> jax.Array:
  """images (B, S, S) read at coords (B, S', S', 2) = (y, x); zero outside."""

  def sample(image, points):
    return jax.scipy.ndimage.map_coordinates(image,
                                             [points[..., 0], points[..., 1]],
                                             order=1, mode="constant")

  return jax.vmap(sample)(images, coords)


def random_resized_crop(images: jax.Array, key: jax.Array,
                        min_area: float) -> jax.Array:
  """Crops of `min_area`..1 of the area, aspect 3/4..4/3, resized back.

  The demo trains on digits augmented this way, so the backbone learns to
  recognise strokes in such crops too.
  """
  batch, size = images.shape[0], images.shape[1]
  area_key, aspect_key, place_key = jax.random.split(key, 3)
  area = jax.random.uniform(area_key, (batch,), minval=min_area, maxval=1.0)
  aspect = jnp.exp(
      jax.random.uniform(aspect_key, (batch,), minval=np.log(3 / 4),
                         maxval=np.log(4 / 3)))
  extent = jnp.clip(
      jnp.stack([jnp.sqrt(area / aspect),
                 jnp.sqrt(area * aspect)], -1), 0.0, 1.0) * size
  corner = jax.random.uniform(place_key, (batch, 2)) * (size - extent)
  steps = (jnp.arange(size) + 0.5) / size  # Pixel centres in [0, 1].
  grid = jnp.stack(jnp.meshgrid(steps, steps, indexing="ij"), -1)
  coords = corner[:, None, None] + grid * extent[:, None, None] - 0.5
  return _sample_bilinear(images, coords)


def to_digit_style(images: jax.Array, image_size: int) -> jax.Array:
  """(B, S, S) ink -> (B, image_size, image_size) as the demo decodes digits.

  Ink is averaged over 8x8 cells and rounded to the digits' 17 grey levels,
  then upsampled bilinearly like `DigitsSource.decode`.
  """
  batch, size = images.shape[0], images.shape[1]
  cell = size // CELLS
  cells = images.reshape(batch, CELLS, cell, CELLS, cell).mean((2, 4))
  cells = jnp.round(jnp.clip(cells, 0.0, 1.0) * GREY_LEVELS) / GREY_LEVELS
  return jax.image.resize(cells, (batch, image_size, image_size), "linear",
                          antialias=False)


def sample_batch(key: jax.Array, masters: jax.Array, labels: jax.Array,
                 batch_size: int, image_size: int,
                 augmented_fraction: float = 0.0):
  """A random batch of distorted letters in the digits' style (jittable).

  Returns (images (B, image_size, image_size, 3) in [0, 1], labels (B,)).
  About `augmented_fraction` of the images are then augmented as the demo
  augments its digits: a random resized crop of 8-100 % of the area and a
  horizontal flip half of the time.
  """
  pick, stroke, warp, noise, crop, flip, chosen = jax.random.split(key, 7)
  index = jax.random.randint(pick, (batch_size,), 0, masters.shape[0])
  images = _embolden(
      masters[index],
      jax.random.randint(stroke, (batch_size,), 0, MAX_EMBOLDEN + 1))
  images = _warp(images, warp)
  images = images + 0.1 * jax.random.normal(noise, images.shape)
  images = to_digit_style(images, image_size)
  augmented = random_resized_crop(images, crop, DEMO_MIN_CROP_AREA)
  flipped = jax.random.bernoulli(flip, 0.5, (batch_size, 1, 1))
  augmented = jnp.where(flipped, augmented[:, :, ::-1], augmented)
  use = jax.random.bernoulli(chosen, augmented_fraction, (batch_size, 1, 1))
  images = jnp.clip(jnp.where(use, augmented, images), 0.0, 1.0)
  return jnp.repeat(images[..., None], 3, axis=-1), labels[index]
