"""The input pipeline benchmark on a few batches of each benchmark's mock."""

import subprocess
import sys
import tempfile

import numpy as np
import pytest

from smope_jax import cli
from smope_jax.benchmark import input_pipeline as ip
from smope_jax.data import pipeline
from smope_jax.errors import UserError

CONFIGS = {
    "cifar100": "configs/cifar100.py",
    "imagenet_r": "configs/imagenet_r.py",
    "caltech_birds2011": "configs/cub200.py"
}
MAGIC = {"PNG": b"\x89PNG", "JPEG": b"\xff\xd8"}


def _config(dataset, batch=4):
  config = cli.load_config_file(CONFIGS[dataset])
  config.batch_size = batch
  return config


@pytest.mark.parametrize("dataset", sorted(CONFIGS))
def test_rates_of_each_benchmark(dataset):
  record = ip.run(_config(dataset), batches=1, threads=(1,), cache=(True,))
  (row,) = record["rows"]
  assert row["image_shape"] == (4, 224, 224, 3)
  assert row["image_dtype"] == "float32"
  assert (row["threads"], row["cache_data"], row["batches"]) == (1, True, 1)
  for key in ("images_per_second", "images_per_cpu_second",
              "load_cpu_ms_per_image"):
    assert 0 < row[key] < np.inf, key
  assert record["mock"]["images"] >= 12  # The first and last untimed.
  assert f"| True | 1 | {row['images_per_second']:.0f} |" in ip.format_table(
      record)


@pytest.mark.parametrize("dataset", sorted(CONFIGS))
def test_mock_images_have_the_benchmarks_encoding_and_size(dataset):
  mock = ip.MOCKS[dataset]
  images = list(ip.mock_images(dataset, 3))
  assert len(images) == 3 and len(set(images)) == 3
  from PIL import Image  # pylint: disable=g-import-not-at-top
  import io  # pylint: disable=g-import-not-at-top
  for encoded in images:
    assert encoded.startswith(MAGIC[mock.encoding])
    shorter, longer = sorted(Image.open(io.BytesIO(encoded)).size)
    assert mock.shorter[0] <= shorter <= mock.shorter[1]
    if mock.longer:
      assert longer == mock.longer
  # Photographs, not flat colour: JPEGs of a few hundred px take tens of KB.
  if mock.encoding == "JPEG":
    assert min(len(e) for e in images) > 10_000


def test_thread_cap_changes_no_batch():
  """The benchmark's one-thread pipeline reads what the trainer reads."""
  with tempfile.TemporaryDirectory() as data_dir:
    config = ip.benchmark_config(_config("caltech_birds2011"), data_dir)
    config.image_size, config.cache_data = 16, False
    ip.write_mock(config, data_dir, num_train=8, num_test=2)
    read = [
        list(
            pipeline.build_continual_data(config,
                                          threads=t).train_batches(0, 1, 4))
        for t in (0, 1)
    ]
    assert len(read[0]) == 2
    for a, b in zip(*read):
      for key in a:
        np.testing.assert_array_equal(a[key], b[key])


def test_importing_it_starts_no_tensorflow():
  code = ("import sys; import smope_jax.benchmark.input_pipeline; "
          "assert 'tensorflow' not in sys.modules")
  subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_datasets_without_a_mock_are_refused():
  config = cli.load_config_file("configs/demo.py")
  with pytest.raises(UserError, match="the input benchmark knows cifar100"):
    ip.run(config, batches=1)
