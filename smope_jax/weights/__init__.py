"""Pretrained ViT backbones: presets, a checked download cache, readers.

Every source is mapped to the Google ViT layout our model uses and checked
key by key against a template, so a wrong or partial checkpoint fails loudly
instead of leaving randomly initialised weights behind. Weight files are
untrusted input: no file can run code, make a reader loop, recurse or
allocate much more than its own size, or bring NaN into a model.

`presets` holds the presets and their download cache, `torch_reader` the
restricted torch unpickler, `formats` the file formats and the converted
directory, `loading` the template and the checks a backbone passes.
"""

from smope_jax.weights.base import sha256_file
from smope_jax.weights.base import UnreadableWeightsError
from smope_jax.weights.formats import BACKBONE_FILE
from smope_jax.weights.formats import INFO_FILE
from smope_jax.weights.formats import save_backbone
from smope_jax.weights.formats import timm_to_google
from smope_jax.weights.loading import backbone_template
from smope_jax.weights.loading import check_source
from smope_jax.weights.loading import load_backbone
from smope_jax.weights.presets import check_cache
from smope_jax.weights.presets import PRESETS
from smope_jax.weights.torch_reader import read_torch
