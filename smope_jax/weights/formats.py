"""Weight file formats, read into the Google ViT layout, and the converted
directory that `smope_jax.convert` and the demo write.

npz files use the Google names already; safetensors and torch files use
timm's (also DINO's and iBOT's), which are mapped. Only backbone keys are
read: heads and iBOT's mask token are left out.
"""

import json
import os
import re
import zipfile

from flax import traverse_util
import numpy as np
import safetensors

from smope_jax import workdir
from smope_jax.errors import MissingWeightsError
from smope_jax.errors import UserError
from smope_jax.weights import base
from smope_jax.weights import presets
from smope_jax.weights import torch_reader
from smope_jax.weights.base import UnreadableWeightsError

BACKBONE_FILE = "backbone.npz"
INFO_FILE = "info.json"
_FORMATS = {
    ".npz": "npz",
    ".safetensors": "safetensors",
    ".pth": "torch",
    ".pt": "torch",
    ".bin": "torch",
    ".tar": "torch"
}

# Classifier and pre-training heads and the iBOT mask token: not backbone.
_IGNORED = re.compile(r"^(head|pre_logits)([/.]|$)|^(masked_embed|mask_token)$")
BLOCK = "Transformer/encoderblock_{}/"
POS = "Transformer/posembed_input/pos_embedding"
_FLOAT_DTYPES = ("float16", "bfloat16", "float32", "float64")


class _NpyMember:
  """An array of an npz file, known by its header until it is read."""

  def __init__(self, path, name, shape, dtype):
    self.path, self.name, self.shape, self.dtype = path, name, shape, dtype

  def read(self):
    with zipfile.ZipFile(self.path) as zf, zf.open(self.name) as f:
      return np.lib.format.read_array(f, allow_pickle=False)


def _npy_header(f):
  """(shape, fortran_order, dtype) of a .npy stream; reads no data."""
  version = np.lib.format.read_magic(f)
  if version == (1, 0):
    return np.lib.format.read_array_header_1_0(f)
  if version == (2, 0):
    return np.lib.format.read_array_header_2_0(f)
  raise ValueError(f"unsupported .npy format version {version}")


def _npz_members(path, label):
  """The arrays of an npz file by key, with only their headers read, so a
  malformed one is named without allocating it."""
  members = {}
  with zipfile.ZipFile(path) as zf:
    for name in zf.namelist():
      key = name[:-len(".npy")] if name.endswith(".npy") else name
      if _IGNORED.search(key):
        continue
      try:
        with zf.open(name) as f:
          shape, _, dtype = _npy_header(f)
      except Exception as e:  # A hostile header can break the parser.
        raise UnreadableWeightsError(
            f"cannot read key {base.shown(key)} of {label} "
            f"({base.reason(e)})") from e
      members[key] = _NpyMember(path, name, shape, dtype)
  return members


_TIMM_TOP = {  # timm names outside the blocks -> Google names.
    "cls_token": "cls",
    "pos_embed": POS,
    "patch_embed.proj.bias": "embedding/bias",
    "norm.weight": "Transformer/encoder_norm/scale",
    "norm.bias": "Transformer/encoder_norm/bias"
}
_TIMMBLOCK = {  # timm names inside block i -> Google names (Dense: .T).
    "norm1.weight": "LayerNorm_0/scale",
    "norm1.bias": "LayerNorm_0/bias",
    "norm2.weight": "LayerNorm_2/scale",
    "norm2.bias": "LayerNorm_2/bias",
    "attn.proj.bias": "MultiHeadDotProductAttention_1/out/bias",
    "mlp.fc1.weight": "MlpBlock_3/Dense_0/kernel",
    "mlp.fc1.bias": "MlpBlock_3/Dense_0/bias",
    "mlp.fc2.weight": "MlpBlock_3/Dense_1/kernel",
    "mlp.fc2.bias": "MlpBlock_3/Dense_1/bias"
}


def _timm_key_to_google(key, x, num_heads, out):
  m = re.fullmatch(r"blocks\.(\d+)\.(.+)", key)
  block, name, table = ((BLOCK.format(m[1]), m[2], _TIMMBLOCK) if m else
                        ("", key, _TIMM_TOP))
  attn = block + "MultiHeadDotProductAttention_1/"
  if name in table:
    out[block + table[name]] = x.T if name.startswith("mlp.fc") else x
  elif not m and name == "patch_embed.proj.weight":
    out["embedding/kernel"] = np.transpose(x, (2, 3, 1, 0))
  elif m and name == "attn.proj.weight":
    out[attn + "out/kernel"] = x.T.reshape(num_heads, -1, x.shape[0])
  elif m and name in ("attn.qkv.weight", "attn.qkv.bias"):
    for proj, part in zip(("query", "key", "value"), np.split(x, 3)):
      if name.endswith("weight"):
        out[f"{attn}{proj}/kernel"] = part.T.reshape(-1, num_heads,
                                                     len(part) // num_heads)
      else:
        out[f"{attn}{proj}/bias"] = part.reshape(num_heads, -1)
  else:
    out[key] = x


def timm_to_google(state, num_heads):
  """Maps timm / DINO / iBOT names and shapes to the Google layout.

  Unknown keys keep their own name, so the template check reports them. A
  key whose shape cannot be mapped raises ValueError naming it.
  """
  out = {}
  for key, x in state.items():
    try:
      _timm_key_to_google(key, x, num_heads, out)
    except (ValueError, TypeError, IndexError) as e:
      raise ValueError(
          f"{base.shown(key)} of shape {np.shape(x)} does not map to a ViT "
          f"with {num_heads} heads ({base.reason(e)})") from e
  return out


def weights_format(path):
  """'npz', 'safetensors' or 'torch', by the extension; a directory is a
  converted one."""
  if os.path.isdir(path):
    return "npz"
  ext = os.path.splitext(path)[1].lower()
  if ext not in _FORMATS:
    raise MissingWeightsError(
        f"{path}: unknown weights format {ext!r}; expected a preset "
        f'({", ".join(presets.PRESETS)}), .npz, .safetensors, .pth/.bin or a '
        "directory written by smope_jax.convert")
  return _FORMATS[ext]


def _converted_npz(directory):
  """The npz of a converted directory, after checking its recorded sha256."""
  with open(os.path.join(directory, INFO_FILE)) as f:
    expected = json.load(f)["sha256"]
  npz = os.path.join(directory, BACKBONE_FILE)
  if base.sha256_file(npz) != expected:
    raise UnreadableWeightsError(f"{npz} does not match the sha256 in its "
                                 f"{INFO_FILE}; convert it again")
  return npz


_SAFETENSORS_FLOATS = {
    "F16": "float16",
    "BF16": "bfloat16",
    "F32": "float32",
    "F64": "float64"
}


def _refuse_non_float(label, dtypes):
  """Names the keys whose dtype is not floating point.

  `dtypes` maps keys to (dtype name, dtype as shown in the message).
  """
  wrong = [
      f"{base.shown(k)} ({shown})" for k, (name,
                                           shown) in sorted(dtypes.items())
      if name not in _FLOAT_DTYPES
  ]
  if wrong:
    raise UnreadableWeightsError(
        f"weights from {label} have {len(wrong)} keys that are not floating "
        f"point: {base.listed(wrong)}")


def _safetensors_state(path, label):
  """The backbone arrays of a safetensors file; dtypes checked first."""
  with safetensors.safe_open(path, "np") as f:
    keys = [k for k in f.keys() if not _IGNORED.search(k)]
    dtypes = {k: f.get_slice(k).get_dtype() for k in keys}
    _refuse_non_float(label, {
        k: (_SAFETENSORS_FLOATS.get(d), d) for k, d in dtypes.items()
    })
    return {k: f.get_tensor(k) for k in keys}


def read_flat(path, num_heads, label):
  """Reads a file or converted directory into '/'-joined Google keys.

  Values are numpy arrays, or npz members that `read_value` reads once
  their shape has been checked. Heads and other non-backbone keys are left
  out.
  """
  kind = weights_format(path)
  try:
    if os.path.isdir(path):
      path = _converted_npz(path)
    if kind == "npz":
      state = _npz_members(path, label)
    elif kind == "safetensors":
      state = _safetensors_state(path, label)
    else:
      state = torch_reader.unwrap_state_dict(
          torch_reader.read_torch(path, label), label)
  except UserError:
    raise
  except Exception as e:  # A hostile file can break a parser anywhere.
    raise UnreadableWeightsError(
        f"cannot read weights from {label} ({base.reason(e)})") from e
  state = {k: v for k, v in state.items() if not _IGNORED.search(k)}
  _refuse_non_float(label, {
      k: (np.dtype(v.dtype).name, str(v.dtype)) for k, v in state.items()
  })
  if kind == "npz":
    return state
  try:
    return timm_to_google(state, num_heads)
  except ValueError as e:
    raise MissingWeightsError(f"weights from {label}: {e}") from e


def read_value(key, x, label):
  """The float32 array of a key whose shape has been checked."""
  try:
    x = x.read() if isinstance(x, _NpyMember) else x
  except Exception as e:  # A hostile file can break a parser anywhere.
    raise UnreadableWeightsError(
        f"cannot read key {key} of {label} ({base.reason(e)})") from e
  with np.errstate(all="ignore"):  # Overflow shows up as inf, refused next.
    return np.asarray(x, np.float32)


def save_backbone(params, directory, *, source, model, image_size):
  """Writes a backbone as a converted directory, which `read_flat` reads.

  Each file is replaced atomically; the npz goes first, so a failure between
  the two leaves an info.json whose sha256 no longer matches, which loading
  reports. Raises OSError if the directory cannot be written: the fix
  depends on the caller (`--output` for convert, the workdir for the demo).
  Returns the info.json record.
  """
  npz = os.path.join(directory, BACKBONE_FILE)
  os.makedirs(directory, exist_ok=True)
  with workdir.atomic_file(npz, "wb") as f:
    np.savez(f, **traverse_util.flatten_dict(params, sep="/"))
  info = dict(source=source, model=model, image_size=image_size,
              sha256=base.sha256_file(npz))
  with workdir.atomic_file(os.path.join(directory, INFO_FILE)) as f:
    json.dump(info, f, indent=2)
    f.write("\n")
  return info
