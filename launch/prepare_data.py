"""Builds TFDS datasets into a data directory, on disk or in a bucket.

    pip install -r requirements-data.txt
    python launch/prepare_data.py --data_dir=gs://my-bucket/tfds \
        cifar100 caltech_birds2011 imagenet_r

It does what `tfds build NAME --data_dir=DIR` does for these datasets. The
`tfds` command of TFDS 4.9 imports Apache Beam and mlcroissant when it
starts, though building them needs neither, so the builders are called
directly. Downloads and extracted archives stay in --download_dir on this
machine; a bucket only receives the prepared files. Pass the same directory
to the launch scripts as --data-dir (or to smope_jax.main as
--config.data_dir).
"""

import os
import sys

from absl import app
from absl import flags

_DATA_DIR = flags.DEFINE_string(
    "data_dir", None, "Where the prepared datasets go: a directory or "
    "gs://bucket/path.", required=True)
_DOWNLOAD_DIR = flags.DEFINE_string(
    "download_dir", "~/tensorflow_datasets/downloads",
    "Where downloads and extracted archives go, on this machine.")


def main(argv):
  names = argv[1:]
  if not names:
    _fail("name the datasets to build, e.g. cifar100 caltech_birds2011 "
          "imagenet_r")
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  builders = []
  for name in names:  # All names are checked before anything is downloaded.
    try:
      builders.append(tfds.builder(name, data_dir=_DATA_DIR.value))
    except tfds.core.DatasetNotFoundError:
      _fail(f"{name!r} is not a TFDS dataset (e.g. cifar100, "
            "caltech_birds2011, imagenet_r)")
  download_dir = os.path.expanduser(_DOWNLOAD_DIR.value)
  for builder in builders:
    builder.download_and_prepare(download_dir=download_dir)
    print(f"{builder.name}: prepared in {builder.data_dir}")


def _fail(message: str) -> None:
  print(f"error: {message}", file=sys.stderr)
  sys.exit(2)


if __name__ == "__main__":
  app.run(main)
