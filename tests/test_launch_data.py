"""Data preparation: launch/prepare_data.py and the README's install line.

The script runs in subprocesses on a tiny dataset defined there (no network).
The install line is tried in a fresh virtual environment: marked slow.
"""

import os
import pathlib
import re
import subprocess
import sys
import venv

import pytest

from tests import helpers

ROOT = pathlib.Path(helpers.REPO)
PREPARE = ROOT / "launch" / "prepare_data.py"

# A TFDS dataset of 6 train and 2 test images, registered when its package
# is imported.
TINY_DATASET = """
import os
import numpy as np
import tensorflow_datasets as tfds

class TinyImages(tfds.core.GeneratorBasedBuilder):
  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return self.dataset_info_from_configs(features=tfds.features.FeaturesDict(
        {"image": tfds.features.Image(shape=(4, 4, 3)),
         "label": tfds.features.ClassLabel(num_classes=2)}))

  def _split_generators(self, dl_manager):
    with open(os.environ["SEEN_DOWNLOAD_DIR"], "w") as f:
      f.write(os.fspath(dl_manager.download_dir))
    return {"train": self._generate_examples(6), "test": self._generate_examples(2)}

  def _generate_examples(self, n):
    for i in range(n):
      yield i, {"image": np.full((4, 4, 3), i, np.uint8), "label": i % 2}
"""

# Registers the tiny dataset, then runs the script with the arguments given.
RUN_SCRIPT = """
import runpy, sys
import tiny_images
sys.argv = sys.argv[1:]  # Drop "-c": the script and its arguments.
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def prepare(tmp_path, *args):
  (tmp_path / "tiny_images").mkdir(exist_ok=True)
  (tmp_path / "tiny_images" / "__init__.py").write_text(TINY_DATASET)
  env = dict(os.environ, SEEN_DOWNLOAD_DIR=str(tmp_path / "seen"),
             HOME=str(tmp_path / "home"), PYTHONPATH=str(tmp_path))
  return subprocess.run([sys.executable, "-c", RUN_SCRIPT,
                         str(PREPARE), *args], capture_output=True, text=True,
                        timeout=300, env=env, cwd=ROOT)


def test_prepare_data_builds_into_the_data_dir(tmp_path):
  data = tmp_path / "tfds"
  result = prepare(tmp_path, f"--data_dir={data}", "tiny_images")
  assert result.returncode == 0, result.stderr[-3000:]
  assert f"tiny_images: prepared in {data}/tiny_images/1.0.0" in result.stdout
  # Downloads stay on this machine, by default under ~/tensorflow_datasets.
  assert (tmp_path / "seen").read_text() == str(
      tmp_path / "home" / "tensorflow_datasets" / "downloads")
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  splits = tfds.builder_from_directory(data / "tiny_images" /
                                       "1.0.0").info.splits
  assert (splits["train"].num_examples, splits["test"].num_examples) == (6, 2)


def test_prepare_data_refuses_unknown_names_before_downloading(tmp_path):
  result = prepare(tmp_path, f"--data_dir={tmp_path}/tfds",
                   f"--download_dir={tmp_path}/dl", "tiny_images", "cifar1000")
  assert result.returncode == 2
  assert result.stderr.splitlines()[-1] == (
      "error: 'cifar1000' is not a TFDS dataset (e.g. cifar100, "
      "caltech_birds2011, imagenet_r)")
  assert not (tmp_path / "seen").exists()


def readme_install_line() -> str:
  """The pip line of the README's data preparation."""
  text = (ROOT / "README.md").read_text()
  section = text.split("### Preparing the TFDS datasets offline", 1)[1]
  section = re.split(r"\n##+ ", section, maxsplit=1)[0]
  (line,) = re.findall(r"^pip install .*$", section, re.M)
  return line


@pytest.mark.slow
def test_readme_install_line_in_a_fresh_environment(tmp_path):
  """Installs what the README says, then imports what the builds need."""
  line = readme_install_line()
  assert line == "pip install -r requirements-data.txt"
  env_dir = tmp_path / "venv"
  venv.create(env_dir, with_pip=True)
  python = str(env_dir / "bin" / "python")
  install = subprocess.run([python, "-m", *line.split()], capture_output=True,
                           text=True, timeout=1800, cwd=ROOT)
  assert install.returncode == 0, install.stdout[-3000:] + install.stderr[-3000:]
  imports = subprocess.run(
      [
          python, "-c",
          "import tensorflow_datasets as tfds, tensorflow, cv2, importlib_resources; "
          "tfds.core.lazy_imports.cv2.imdecode"
      ],  # How the CUB-200 builder gets OpenCV.
      capture_output=True,
      text=True,
      timeout=300)
  assert imports.returncode == 0, imports.stderr[-3000:]
  # The script looks the datasets up in TFDS before anything else.
  unknown = subprocess.run(
      [python, str(PREPARE), f"--data_dir={tmp_path}/tfds", "cifar1000"],
      capture_output=True, text=True, timeout=300, cwd=ROOT)
  assert unknown.returncode == 2, unknown.stderr[-3000:]
  assert "error: 'cifar1000' is not a TFDS dataset" in unknown.stderr
