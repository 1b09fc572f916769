"""Protocol variants and users' own data, end to end through `main`.

Each run is a tiny model for one epoch per task, so the whole protocol
(training, counting, statistics, alignment, evaluation, outputs) runs in
seconds; marked slow all the same (a first task of its own size runs in
test_run_safety's log test).
"""

import io
import json
import os

import numpy as np
import pytest
from PIL import Image

from tests import helpers


def _run(tmp_path, mock_examples=helpers.MOCK_EXAMPLES, **overrides):
  workdir = str(tmp_path / "run")
  config = helpers.tiny_config(**overrides)
  assert helpers.run_main(config, workdir, mock_examples) == 0
  with open(os.path.join(workdir, "metrics.json")) as f:
    return json.load(f), workdir


@pytest.mark.slow
def test_joint_training_is_the_upper_bound(tmp_path):
  metrics, _ = _run(tmp_path, joint=True)
  assert metrics["joint"] is True and metrics["task_classes"] == [10]
  assert len(metrics["acc_matrix"]) == 1


@pytest.mark.slow
def test_validation_run(tmp_path):
  metrics, _ = _run(tmp_path, validation=True)
  assert metrics["evaluated_on"] == "validation"


def _write_png(path, value):
  path.parent.mkdir(parents=True, exist_ok=True)
  image = np.full((12, 10, 3), value, np.uint8)
  image[::2] = 255 - value  # Some structure to learn.
  buffer = io.BytesIO()
  Image.fromarray(image).save(buffer, format="PNG")
  path.write_bytes(buffer.getvalue())


@pytest.mark.slow
def test_image_folder_end_to_end(tmp_path):
  for c, name in enumerate(["ant", "bee", "cow", "doe"]):
    for i in range(40):
      _write_png(tmp_path / "images" / name / f"{i:02d}.png", 50 * c + i)
  metrics, _ = _run(tmp_path, dataset=f"folder:{tmp_path}/images",
                    num_classes=0, num_tasks=2, batch_size=8)
  assert len(metrics["acc_matrix"]) == 2 and metrics["task_classes"] == [2, 2]


@pytest.mark.slow
def test_tfds_dataset_by_name_end_to_end(tmp_path):
  metrics, _ = _run(tmp_path, dataset="mnist", num_classes=0, num_tasks=2,
                    batch_size=8, mock_examples=80)
  assert len(metrics["acc_matrix"]) == 2 and metrics["task_classes"] == [5, 5]
