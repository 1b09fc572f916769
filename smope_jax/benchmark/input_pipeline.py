r"""Input pipeline budget: training images per second and per CPU-second.

    python -m smope_jax.benchmark.input_pipeline --config=configs/cub200.py

Writes a mock copy of the config's benchmark (CIFAR-100, ImageNet-R or
CUB-200) as a prepared TFDS dataset in a temporary directory: the real
builder's features and encodings (CIFAR-100: 32 x 32 PNG; ImageNet-R and
CUB-200: JPEG files kept as they are), at the sizes of `MOCKS`, with smooth
noise that compresses like photographs. It then drives the trainer's own
pipeline, `build_continual_data(config).train_batches`, with the config's
image size, augmentation and batch, and reports images per second of wall
time and images per CPU-second of this process: the per-core figure, which
holds on a machine shared with other jobs. Only TensorFlow feeds the
pipeline; JAX is not started. See docs/input_pipeline.md.
"""

import dataclasses
import functools
import io
import math
import sys
import tempfile

from absl import flags
from ml_collections import config_flags
import numpy as np

from smope_jax import cli
from smope_jax import configuration
from smope_jax.benchmark.measure import Stopwatch
from smope_jax.errors import UserError


def define_flags() -> None:
  """The command's flags, defined when it runs: importing the module for its
  functions (tests, other commands) adds no flags."""
  config_flags.DEFINE_config_file(
      "config", None, "Config file of a benchmark, e.g. configs/cub200.py: "
      "its dataset, image_size and batch_size (--config.batch_size=...) are "
      "measured.", lock_config=True)
  flags.DEFINE_integer("batches", 3,
                       "Timed batches per setting (two more are written).")
  flags.DEFINE_list(
      "threads", ["1", "0"], "tf.data threads to measure; 0 = tf.data's "
      "default (about one per core).")
  flags.DEFINE_list("cache", ["true", "false"],
                    "config.cache_data settings to measure.")


@dataclasses.dataclass(frozen=True)
class Mock:
  """How a benchmark's mock images look."""
  shorter: tuple[int, int]  # Range of the shorter side, px.
  aspect: tuple[float, float]  # Range of longer / shorter side.
  encoding: str  # "PNG" or "JPEG": the bytes TFDS stores as they are.
  longer: int = 0  # Fixed longer side (CUB: 500 px), else from the aspect.


MOCKS = {
    "cifar100":
        Mock(shorter=(32, 32), aspect=(1.0, 1.0), encoding="PNG"),
    # CUB-200-2011's photos are 500 px on their longer side.
    "caltech_birds2011":
        Mock(shorter=(300, 500), aspect=(1.0, 1.0), encoding="JPEG",
             longer=500),
    # ImageNet-R: about 2.2 GB of JPEGs for 30,000 images, ~73 KB each; these
    # sizes (mean ~430 x 540 px) take ~51 KB of our noise at quality 90.
    "imagenet_r":
        Mock(shorter=(300, 560), aspect=(1.0, 1.5), encoding="JPEG"),
}
JPEG_QUALITY = 90
DISTINCT = 64  # Distinct encoded images; the others repeat them.
_TEXTURE = 1024  # Side of the smooth-noise textures images are cut from.


@functools.cache
def _textures(count: int = 4) -> tuple[np.ndarray, ...]:
  """Smooth noise at three scales plus grain: compresses like a photo."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  rng, out = np.random.default_rng(0), []
  for _ in range(count):
    image = rng.normal(128, 3, (_TEXTURE, _TEXTURE, 3)).astype(np.float32)
    for cells, amplitude in ((8, 90.0), (40, 35.0), (160, 12.0)):
      small = rng.normal(0, 1, (cells, cells, 3)).astype(np.float32)
      image += amplitude * np.stack([
          np.asarray(
              Image.fromarray(small[..., c]).resize(
                  (_TEXTURE, _TEXTURE), Image.BICUBIC)) for c in range(3)
      ], -1)
    out.append(np.clip(image, 0, 255).astype(np.uint8))
  return tuple(out)


def mock_images(dataset: str, count: int, seed: int = 0):
  """`count` encoded images of the benchmark, cut from smooth noise.

  The images repeat after `DISTINCT`: each is decoded and augmented on its
  own, whatever its bytes, and encoding fewer keeps the benchmark short.
  """
  from PIL import Image  # pylint: disable=g-import-not-at-top
  mock, rng = MOCKS[dataset], np.random.default_rng(seed)
  textures, distinct = _textures(), []
  for i in range(count):
    if i >= DISTINCT:
      yield distinct[i % DISTINCT]
      continue
    shorter = int(rng.integers(mock.shorter[0], mock.shorter[1] + 1))
    longer = mock.longer or int(round(shorter * rng.uniform(*mock.aspect)))
    h, w = (shorter, longer) if rng.random() < 0.75 else (longer, shorter)
    image = Image.fromarray(textures[i % len(textures)])
    if h * 8 < _TEXTURE:  # CIFAR: a whole texture shrunk, detail everywhere.
      image = image.resize((w, h), Image.BOX)
    else:
      top = int(rng.integers(0, _TEXTURE - h + 1))
      left = int(rng.integers(0, _TEXTURE - w + 1))
      image = image.crop((left, top, left + w, top + h))
    encoded = io.BytesIO()
    image.save(encoded, mock.encoding, quality=JPEG_QUALITY)
    distinct.append(encoded.getvalue())
    yield distinct[-1]


def _example(dataset: str, features, i: int, image, label: int, role: str):
  """One example with every feature of the real builder."""
  if dataset == "cifar100":
    return {
        "id": f"{role}_{i:05d}",
        "image": image,
        "label": label,
        "coarse_label": label % 20
    }
  if dataset == "imagenet_r":
    from smope_jax.data import imagenet_r  # pylint: disable=g-import-not-at-top
    wnid = imagenet_r.class_wnids()[label]
    return {
        "image": image,
        "label": wnid,
        "file_name": f"{wnid}/mock_{i:05d}.jpg"
    }
  from PIL import Image  # pylint: disable=g-import-not-at-top
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  mask = io.BytesIO()  # Encoded here: TFDS's own PNG encoder is slow.
  Image.new("L", Image.open(io.BytesIO(image)).size).save(mask, "PNG")
  name = features["label"].int2str(label)
  return {
      "image": image,
      "label": label,
      "label_name": name,
      "image/filename": f"{name}/mock_{i:05d}.jpg",
      "bbox": tfds.features.BBox(0.1, 0.1, 0.9, 0.9),
      "segmentation_mask": mask.getvalue()
  }


def write_mock(config, data_dir: str, num_train: int, num_test: int) -> dict:
  """Prepares a mock TFDS copy of `config.dataset` under `data_dir`.

  The real builder's features encode the examples, so the records are what
  `launch/prepare_data.py` writes; labels cycle through all classes. ImageNet-R
  has one split: its train and test roles come from the seeded 80/20 split.

  Returns:
    Number of images and mean encoded bytes per image.
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  dataset, stats = config.dataset, {"images": 0, "bytes": 0}
  real = tfds.builder_cls(dataset)

  def examples(self, role, count, first):
    features = self.info.features
    for i, image in enumerate(mock_images(dataset, count, seed=first)):
      stats["images"] += 1
      stats["bytes"] += len(image)
      yield f"{role}_{i}", _example(dataset, features, first + i, image,
                                    i % config.num_classes, role)

  def split_generators(self, dl_manager):
    del dl_manager  # Nothing is downloaded.
    if dataset == "imagenet_r":
      return {"test": examples(self, "test", num_train + num_test, 0)}
    return {
        "train": examples(self, "train", num_train, 0),
        "test": examples(self, "test", num_test, num_train)
    }

  mock = type(f"Mock{real.__name__}", (real,), {
      "name": real.name,
      "_split_generators": split_generators
  }, skip_registration=True)
  mock(data_dir=data_dir).download_and_prepare()
  return {
      "images": stats["images"],
      "mean_bytes": stats["bytes"] / max(stats["images"], 1)
  }


def measure(config, batches: int, threads: int) -> dict:
  """Steady rates of the first task's training batches.

  Loading the task (reading the records, and with cache_data decoding every
  image once) is timed first. Then one untimed epoch of one batch pays what
  happens once per process (TF's first use of its kernels and threads), and
  an epoch of `batches` + 2 batches is read. The steady rates span from the
  arrival of its first batch to that of its `batches` + 1st: both ends fall
  mid-epoch, where the pipeline, drained by a consumer that takes every
  batch at once, holds about the same unfinished work ahead. The first
  batch, less a steady one, is the start-up every epoch pays.
  """
  from smope_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  data = pipeline.build_continual_data(config, threads=threads)
  b, steps = config.batch_size, data.steps_per_epoch(0, config.batch_size)
  if steps < batches + 2:
    raise UserError(f"the mock data has {steps} batches; --batches={batches} "
                    "needs two more.")
  load = Stopwatch()
  with load:  # An epoch that starts at its end reads nothing.
    list(data.train_batches(0, 0, b, start_step=steps))
  list(data.train_batches(0, 0, b, start_step=steps - 1))
  first, steady = Stopwatch(), Stopwatch()
  with first:
    read = data.train_batches(0, 1, b, start_step=steps - 2 - batches)
    image = next(read)["image"]
  with steady:
    for _ in range(batches):
      next(read)
  del read  # Stops the pipeline: its last batch is never read.
  images = batches * b
  return {
      "threads": threads,
      "cache_data": bool(config.cache_data),
      "batch": b,
      "batches": batches,
      "image_shape": image.shape,
      "image_dtype": str(image.dtype),
      "images_per_second": images / max(steady.wall, 1e-9),
      "images_per_cpu_second": images / max(steady.cpu, 1e-9),
      "epoch_start_wall_seconds": first.wall - steady.wall / batches,
      "epoch_start_cpu_seconds": first.cpu - steady.cpu / batches,
      "load_cpu_ms_per_image": 1e3 * load.cpu / data.train_size(0),
      "load_wall_seconds": load.wall,
  }


def _counts(config, batches: int) -> tuple[int, int]:
  """Training and test images to write: `batches` + 2 training batches.

  ImageNet-R's roles come from the seeded split, which holds out
  floor(0.2 n + 0.5) of a class of n images: none while classes have at
  most 2 (labels cycle through the classes), else at most 0.2 n + 0.5.
  """
  needed, classes = (batches + 2) * config.batch_size, config.num_classes
  if config.dataset != "imagenet_r":
    return needed, 2
  if needed <= 2 * classes:
    return needed, 0
  return math.ceil((needed + classes / 2) / 0.8), 0


def benchmark_config(config, data_dir: str):
  """The config as measured: one task holding every class, the mock data."""
  config = config.copy_and_resolve_references()
  config.data_dir, config.num_tasks, config.first_task_classes = data_dir, 1, 0
  if config.dataset == "imagenet_r":
    config.imagenet_r_split = "random"  # The mock lacks the listed files.
  configuration.validate(config)
  return config


def run(config, batches: int, threads=(1, 0), cache=(True, False)) -> dict:
  """Writes the mock data, measures every setting; returns the record."""
  if config.dataset not in MOCKS:
    raise UserError(f"config.dataset={config.dataset!r}: the input benchmark "
                    f"knows {', '.join(MOCKS)}.")
  if batches < 1:
    raise UserError(f"--batches={batches} must be at least 1.")
  with tempfile.TemporaryDirectory() as data_dir:
    config = benchmark_config(config, data_dir)
    written = write_mock(config, data_dir, *_counts(config, batches))
    rows = []
    for cache_data in cache:
      config.cache_data = cache_data
      for t in threads:
        rows.append(measure(config, batches, t))
  return {
      "dataset": config.dataset,
      "image_size": config.image_size,
      "batch": config.batch_size,
      "mock": written,
      "rows": rows,
      "mock_sizes": dataclasses.asdict(MOCKS[config.dataset])
  }


def format_table(record: dict) -> str:
  lines = [
      f"{record['dataset']}: {record['mock']['images']} mock images, "
      f"{record['mock']['mean_bytes'] / 1e3:.1f} KB each on average; "
      f"batch {record['batch']} of {record['image_size']} px",
      "| cache_data | tf.data threads | images/s (wall) | images per "
      "CPU-second | "
      "CPU ms/image | epoch start, CPU s | load, CPU ms/image |",
      "|---|---:|---:|---:|---:|---:|---:|"
  ]
  for r in record["rows"]:
    lines.append(
        f"| {r['cache_data']} | {r['threads'] or 'default'} | "
        f"{r['images_per_second']:.0f} | {r['images_per_cpu_second']:.0f} | "
        f"{1e3 / r['images_per_cpu_second']:.2f} | "
        f"{r['epoch_start_cpu_seconds']:.2f} | "
        f"{r['load_cpu_ms_per_image']:.2f} |")
  return "\n".join(lines)


def _parse(values, kind, name):
  try:
    parsed = [kind(v) for v in values]
  except ValueError:
    parsed = None
  if not parsed or (kind is int and min(parsed) < 0):
    raise UserError(f"--{name}={','.join(values)} is not a list of "
                    f"{'threads >= 0' if kind is int else 'true/false'}.")
  return parsed


def _bool(text: str) -> bool:
  if text.lower() not in ("true", "false", "1", "0"):
    raise ValueError(text)
  return text.lower() in ("true", "1")


def main(argv):
  try:
    cli.refuse_arguments(argv)
    values = flags.FLAGS
    threads = _parse(values.threads, int, "threads")
    cache = _parse(values.cache, _bool, "cache")
    print(format_table(run(values.config, values.batches, threads, cache)))
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  define_flags()
  cli.run(main, ["config"])
