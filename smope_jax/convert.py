r"""Converts pretrained ViT weights once into the Google npz layout.

  python -m smope_jax.convert --input=sup21k --output=/data/vit_sup21k \
      [--model=B/16] [--image_size=224]

Writes DIR/backbone.npz ('/'-joined Google ViT keys, checked against the
model's shapes) and DIR/info.json (source, model, image size, sha256 of the
npz). Training then reads DIR with `--config.pretrained=DIR`, without torch
files, network or the conversion step.
"""

import json
import os
import sys

from absl import app
from absl import flags
import numpy as np

from smope_jax import pretrained
from smope_jax.errors import UserError

# Not `required=True`: that would bind every program importing this module.
_INPUT = flags.DEFINE_string(
    "input", None, "A preset name, a checkpoint file or a converted dir.")
_OUTPUT = flags.DEFINE_string("output", None, "Directory to write.")
_MODEL = flags.DEFINE_enum("model", "B/16", list(pretrained.VIT_VARIANTS),
                           "ViT variant the weights are for.")
_IMAGE_SIZE = flags.DEFINE_integer(
    "image_size", 224, "Input size; the position embedding is resized to it.")


def save_backbone(params, directory, *, source, model, image_size):
  """Writes a backbone in the layout `pretrained.load_backbone` reads back."""
  os.makedirs(directory, exist_ok=True)
  npz = os.path.join(directory, pretrained.BACKBONE_FILE)
  tmp = npz + ".tmp.npz"
  with open(tmp, "wb") as f:
    np.savez(f, **pretrained.flatten(params))
  os.replace(tmp, npz)
  info = dict(source=source, model=model, image_size=image_size,
              sha256=pretrained.sha256_file(npz))
  with open(os.path.join(directory, pretrained.INFO_FILE), "w") as f:
    json.dump(info, f, indent=2)
    f.write("\n")
  return info


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not _INPUT.value or not _OUTPUT.value:
    raise app.UsageError("--input and --output are required")
  try:
    template = pretrained.backbone_template(_MODEL.value, _IMAGE_SIZE.value)
    params = pretrained.load_backbone(_INPUT.value, template)
    source = _INPUT.value
    if source not in pretrained.PRESETS:
      source = os.path.abspath(source)
    info = save_backbone(params, _OUTPUT.value, source=source,
                         model=_MODEL.value, image_size=_IMAGE_SIZE.value)
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  print(f'wrote {_OUTPUT.value} (sha256 {info["sha256"]})')


if __name__ == "__main__":
  app.run(main)
