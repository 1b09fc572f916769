r"""Converts pretrained ViT weights once into the Google npz layout.

  python -m smope_jax.convert --input=sup21k --output=/data/vit_sup21k \
      [--model=B/16] [--image_size=224]

Writes DIR/backbone.npz ('/'-joined Google ViT keys, checked against the
model's shapes) and DIR/info.json (source, model, image size, sha256 of the
npz). Training then reads DIR with `--config.pretrained=DIR`, without torch
files, network or the conversion step. Both files are written whole or not
at all; flag errors, a missing input and an unwritable output are reported
before any weights are read.
"""

import contextlib
import os
import sys
import tempfile

from absl import app
from absl import flags

from smope_jax import cli
from smope_jax import weights
from smope_jax.errors import UserError
from smope_jax.models.variants import VIT_VARIANTS

# Not `required=True`: that would bind every program importing this module;
# `main` checks them.
_INPUT = flags.DEFINE_string(
    "input", None, "A preset name, a checkpoint file or a converted dir.")
_OUTPUT = flags.DEFINE_string("output", None, "Directory to write.")
_MODEL = flags.DEFINE_enum("model", "B/16", list(VIT_VARIANTS),
                           "ViT variant the weights are for.")
_IMAGE_SIZE = flags.DEFINE_integer(
    "image_size", 224, "Input size; the position embedding is resized to it.",
    lower_bound=1, upper_bound=4096)


def _check_output(directory):
  """Fails unless `directory` can be created and written to.

  Returns the directories this created, for removal if the work fails.
  """
  directory = os.path.abspath(directory)
  if os.path.exists(directory) and not os.path.isdir(directory):
    raise UserError(f"--output={directory} is a file; name a directory")
  created, parent = [], directory
  while not os.path.exists(parent):
    created.append(parent)
    parent = os.path.dirname(parent)
  try:
    os.makedirs(directory, exist_ok=True)
    with tempfile.TemporaryFile(dir=directory):
      pass
  except OSError as e:
    _remove_empty(created)
    raise UserError(f"--output={directory} cannot be written "
                    f"({e.strerror or e}); choose another --output") from e
  return created


def _remove_empty(directories):
  for directory in directories:
    with contextlib.suppress(OSError):
      os.rmdir(directory)


def _convert(source, output, model, image_size):
  template = weights.backbone_template(model, image_size)
  weights.check_source(source)
  created = _check_output(output)
  try:
    params = weights.load_backbone(source, template)
    if source not in weights.PRESETS:
      source = os.path.abspath(source)
    try:
      return weights.save_backbone(params, output, source=source, model=model,
                                   image_size=image_size)
    except OSError as e:
      raise UserError(f"cannot write {output} ({e.strerror or e}); free "
                      "some space or choose another --output") from e
  except BaseException:
    _remove_empty(created)
    raise


def main(argv):
  try:
    if len(argv) > 1:
      raise UserError(f"unexpected arguments: {' '.join(argv[1:])}; every "
                      "option is a --flag")
    missing = [f"--{f.name}" for f in (_INPUT, _OUTPUT) if not f.value]
    if missing:
      raise UserError(f'{" and ".join(missing)} must be given, e.g. '
                      "--input=sup1k --output=/data/vit/sup1k")
    info = _convert(_INPUT.value, _OUTPUT.value, _MODEL.value,
                    _IMAGE_SIZE.value)
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  print(f'wrote {_OUTPUT.value} (sha256 {info["sha256"]})')


def run():
  app.run(main, flags_parser=cli.parse_flags)


if __name__ == "__main__":
  run()
