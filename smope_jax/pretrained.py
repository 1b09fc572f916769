"""Pretrained ViT backbones: presets, a checksummed download cache, readers.

Every source is mapped to the Google ViT layout our model uses and checked
key by key against a template, so a wrong or partial checkpoint fails loudly
instead of leaving randomly initialised weights behind.
"""

import collections
import collections.abc
import hashlib
import http.client
import json
import logging
import os
import pickle
import re
import tempfile
import urllib.request
import zipfile

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import safetensors
import safetensors.numpy

from smope_jax.errors import ConfigError
from smope_jax.errors import MissingWeightsError
from smope_jax.models.variants import VIT_VARIANTS


_IBOT = ("https://lf3-nlp-opensource.bytetos.com/obj/nlp-opensource/archive/"
         "2022/ibot")


def _timm_hub(name):
  return (f"https://huggingface.co/timm/{name}/resolve/main/model.safetensors",
          f"{name}.safetensors")


# name -> (download URL, file name in the cache and on a mirror).
PRESETS = {
    "sup21k": _timm_hub("vit_base_patch16_224.augreg_in21k"),
    "sup1k": _timm_hub("vit_base_patch16_224.augreg2_in21k_ft_in1k"),
    "ibot21k": (f"{_IBOT}/vitb_16_pt22k/checkpoint_student.pth",
                "ibot_vitb16_pt22k_student.pth"),
    "ibot1k": (f"{_IBOT}/vitb_16/checkpoint_teacher.pth",
               "ibot_vitb16_teacher.pth"),
    "dino1k": _timm_hub("vit_base_patch16_224.dino"),
}
BACKBONE_FILE = "backbone.npz"
INFO_FILE = "info.json"

# Classifier and pre-training heads and the iBOT mask token: not backbone.
_IGNORED = re.compile(r"^(head|pre_logits)([/.]|$)|^(masked_embed|mask_token)$")
_BLOCK = "Transformer/encoderblock_{}/"
_POS = "Transformer/posembed_input/pos_embedding"


def backbone_template(variant, image_size):
  """Shapes of the backbone parameters, without building the Flax model."""
  if isinstance(variant, str) and variant not in VIT_VARIANTS:
    raise ConfigError(f"unknown ViT variant {variant!r}; known: "
                      f'{", ".join(VIT_VARIANTS)}')
  v = VIT_VARIANTS[variant] if isinstance(variant, str) else variant
  d, h, m, p = v["hidden_size"], v["num_heads"], v["mlp_dim"], v["patch_size"]
  if image_size % p:
    raise ConfigError(f"image size {image_size} is not a multiple of the "
                      f"patch size {p}")
  spec = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)  # noqa: E731
  dense = lambda *s: {"kernel": spec(*s), "bias": spec(*s[-1:])}  # noqa: E731
  norm = lambda: {"scale": spec(d), "bias": spec(d)}  # noqa: E731
  qkv = lambda: {"kernel": spec(d, h, d // h),  # noqa: E731
                 "bias": spec(h, d // h)}
  block = lambda: {  # noqa: E731
      "LayerNorm_0": norm(), "LayerNorm_2": norm(),
      "MultiHeadDotProductAttention_1": {
          "query": qkv(), "key": qkv(), "value": qkv(),
          "out": dense(h, d // h, d)},
      "MlpBlock_3": {"Dense_0": dense(d, m), "Dense_1": dense(m, d)}}
  transformer = {f"encoderblock_{i}": block() for i in range(v["num_layers"])}
  transformer["encoder_norm"] = norm()
  transformer["posembed_input"] = {
      "pos_embedding": spec(1, 1 + (image_size // p)**2, d)}
  return {"embedding": dense(p, p, 3, d), "cls": spec(1, 1, d),
          "Transformer": transformer}


def sha256_file(path):
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 22), b""):
      digest.update(chunk)
  return digest.hexdigest()


def fetch_preset(name, *, cache_dir=None, base_url=None):
  """Returns the local path of a preset, downloading it once into the cache.

  `base_url` (or env SMOPE_JAX_WEIGHTS_URL) names a mirror serving the cache
  file names. Each reuse re-hashes the file against its `.sha256` sidecar.
  """
  url, filename = PRESETS[name]
  base_url = base_url or os.environ.get("SMOPE_JAX_WEIGHTS_URL")
  if base_url:
    url = f'{base_url.rstrip("/")}/{filename}'
  cache_dir = (cache_dir or os.environ.get("SMOPE_JAX_CACHE")
               or "~/.cache/smope_jax")
  path = os.path.join(os.path.expanduser(cache_dir), filename)
  sidecar = path + ".sha256"
  if not os.path.exists(path):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    digest = _download(url, path, name)
  elif os.path.exists(sidecar):
    with open(sidecar) as f:
      expected = f.read().strip()
    if (digest := sha256_file(path)) != expected:
      os.remove(path)
      os.remove(sidecar)
      raise MissingWeightsError(
          f"cached weights {path} are corrupted (sha256 {digest}, recorded "
          f"{expected}); the file was deleted, run again to download it anew")
    return path
  else:  # Placed there by hand: trust it on first use.
    digest = sha256_file(path)
  with open(sidecar, "w") as f:
    f.write(digest + "\n")
  return path


class _EtagRecorder(urllib.request.HTTPRedirectHandler):
  """Keeps Hugging Face's X-Linked-Etag (the LFS sha256) from redirects."""

  def __init__(self):
    self.etags = []

  def redirect_request(self, req, fp, code, msg, headers, newurl):
    self.etags.append(headers.get("X-Linked-Etag"))
    return super().redirect_request(req, fp, code, msg, headers, newurl)


def _download(url, path, name):
  """Downloads to a temp file, checks it, renames it; returns its sha256."""
  recorder = _EtagRecorder()
  fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path),
                             prefix=os.path.basename(path), suffix=".part")
  digest, size = hashlib.sha256(), 0
  try:
    logging.info("downloading %s to %s", url, path)
    with os.fdopen(fd, "wb") as f, urllib.request.build_opener(
        recorder).open(url, timeout=60) as resp:
      recorder.etags.append(resp.headers.get("X-Linked-Etag"))
      for chunk in iter(lambda: resp.read(1 << 22), b""):
        f.write(chunk)
        digest.update(chunk)
        size += len(chunk)
      if size != int(resp.headers.get("Content-Length", size)):
        raise OSError(f'got {size} of {resp.headers["Content-Length"]} bytes')
  except (OSError, http.client.HTTPException) as e:
    os.remove(tmp)
    raise MissingWeightsError(
        f"pretrained weights {name!r} are not cached and could not be "
        f"downloaded from {url} ({e}); fetch that file elsewhere and place "
        f"it at {path}, or pass --config.pretrained=/path/to/file") from e
  digest = digest.hexdigest()
  lfs = [e for e in (str(e).strip('"').lower() for e in recorder.etags if e)
         if re.fullmatch("[0-9a-f]{64}", e)]
  if lfs and digest != lfs[0]:
    os.remove(tmp)
    raise MissingWeightsError(
        f"download of {name!r} from {url} is corrupted: sha256 {digest}, "
        f"the server announced {lfs[0]}")
  os.replace(tmp, path)
  return digest


def _rebuild_tensor(storage, offset, size, stride, *unused_args):
  """Numpy stand-in for torch._utils._rebuild_tensor_v2."""
  end = offset + sum((n - 1) * s for n, s in zip(size, stride))
  if 0 in size:
    return np.zeros(size, storage.dtype)
  if min(stride, default=0) < 0 or not 0 <= offset <= end < storage.size:
    raise ValueError(f"a tensor of size {tuple(size)} overruns its storage")
  return np.lib.stride_tricks.as_strided(
      storage[offset:], size, [s * storage.itemsize for s in stride]).copy()


_TORCH_STORAGES = {
    "FloatStorage": np.float32, "HalfStorage": np.float16,
    "BFloat16Storage": ml_dtypes.bfloat16, "LongStorage": np.int64}
_TORCH_GLOBALS = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): lambda data, *unused: data,
}


class _TorchUnpickler(pickle.Unpickler):
  """Unpickles a torch zip checkpoint into numpy; refuses any other global."""

  def __init__(self, zf, prefix, path):
    super().__init__(zf.open(prefix + "data.pkl"))
    self.zf, self.prefix, self.path, self.storages = zf, prefix, path, {}

  def find_class(self, module, name):
    if module == "torch" and name in _TORCH_STORAGES:
      return np.dtype(_TORCH_STORAGES[name])
    if (module, name) not in _TORCH_GLOBALS:
      raise MissingWeightsError(
          f"{self.path}: refusing to unpickle {module}.{name}; a weights file "
          "needs only tensors and dicts (re-save it as a plain state dict)")
    return _TORCH_GLOBALS[module, name]

  def persistent_load(self, pid):
    if pid[0] != "storage" or not isinstance(pid[1], np.dtype):
      raise MissingWeightsError(f"{self.path}: unsupported storage {pid[:2]}")
    key = str(pid[2])
    if key not in self.storages:
      self.storages[key] = np.frombuffer(
          self.zf.read(f"{self.prefix}data/{key}"), pid[1])
    return self.storages[key]


def read_torch(path):
  """Reads a torch.save file (zip format, torch >= 1.6) without torch."""
  if not zipfile.is_zipfile(path):
    raise MissingWeightsError(
        f"{path}: not a zip-format torch checkpoint (legacy torch < 1.6 "
        "files are not supported; re-save it with a recent torch)")
  with zipfile.ZipFile(path) as zf:
    pkl = [n for n in zf.namelist() if n.endswith("data.pkl")]
    if len(pkl) != 1:
      raise MissingWeightsError(f"{path}: not a torch checkpoint")
    return _TorchUnpickler(zf, pkl[0][:-len("data.pkl")], path).load()


def unwrap_state_dict(obj, path="checkpoint"):
  """Finds the weights inside DINO / iBOT / timm checkpoint wrappers."""
  while isinstance(obj, dict) and not any(
      isinstance(v, np.ndarray) for v in obj.values()):
    inner = [k for k in ("state_dict", "model", "teacher", "student")
             if isinstance(obj.get(k), dict)]
    if not inner:
      raise MissingWeightsError(f"{path}: no state dict found among keys "
                                f"{sorted(map(str, obj))[:10]}")
    obj = obj[inner[0]]
  if not isinstance(obj, dict):
    raise MissingWeightsError(f"{path}: holds a {type(obj).__name__}, not a "
                              "state dict")
  return {re.sub(r"^((module|backbone)\.)+", "", k): v for k, v in obj.items()
          if isinstance(v, np.ndarray)}


_TIMM_TOP = {  # timm names outside the blocks -> Google names.
    "cls_token": "cls", "pos_embed": _POS,
    "patch_embed.proj.bias": "embedding/bias",
    "norm.weight": "Transformer/encoder_norm/scale",
    "norm.bias": "Transformer/encoder_norm/bias"}
_TIMM_BLOCK = {  # timm names inside block i -> Google names (Dense: .T).
    "norm1.weight": "LayerNorm_0/scale", "norm1.bias": "LayerNorm_0/bias",
    "norm2.weight": "LayerNorm_2/scale", "norm2.bias": "LayerNorm_2/bias",
    "attn.proj.bias": "MultiHeadDotProductAttention_1/out/bias",
    "mlp.fc1.weight": "MlpBlock_3/Dense_0/kernel",
    "mlp.fc1.bias": "MlpBlock_3/Dense_0/bias",
    "mlp.fc2.weight": "MlpBlock_3/Dense_1/kernel",
    "mlp.fc2.bias": "MlpBlock_3/Dense_1/bias"}


def timm_to_google(state, num_heads):
  """Maps timm / DINO / iBOT names and shapes to the Google layout.

  Unknown keys keep their own name, so the template check reports them.
  """
  out = {}
  for key, x in state.items():
    m = re.fullmatch(r"blocks\.(\d+)\.(.+)", key)
    block, name, table = ((_BLOCK.format(m[1]), m[2], _TIMM_BLOCK) if m
                          else ("", key, _TIMM_TOP))
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
  return out


def _read_flat(source, num_heads):
  """Reads a file or converted directory into '/'-joined Google keys."""
  ext = ".npz" if os.path.isdir(source) else os.path.splitext(source)[1]
  if (ext := ext.lower()) not in (".npz", ".safetensors", ".pth", ".pt",
                                  ".bin", ".tar"):
    raise MissingWeightsError(
        f"{source}: unknown weights format {ext!r}; expected a preset "
        f'({", ".join(PRESETS)}), .npz, .safetensors, .pth/.bin or a '
        "directory written by smope_jax.convert")
  try:
    if os.path.isdir(source):
      with open(os.path.join(source, INFO_FILE)) as f:
        expected = json.load(f)["sha256"]
      source = os.path.join(source, BACKBONE_FILE)
      if sha256_file(source) != expected:
        raise MissingWeightsError(f"{source} does not match the sha256 in "
                                  f"its {INFO_FILE}; convert it again")
    if ext == ".npz":
      with np.load(source, allow_pickle=False) as data:
        return {k: data[k] for k in data.files}
    if ext == ".safetensors":
      state = safetensors.numpy.load_file(source)
    else:
      state = unwrap_state_dict(read_torch(source), source)
  except (OSError, EOFError, KeyError, ValueError, TypeError,
          zipfile.BadZipFile, pickle.UnpicklingError,
          safetensors.SafetensorError) as e:
    raise MissingWeightsError(f"cannot read weights from {source} "
                              f"({type(e).__name__}: {e})") from e
  try:
    return timm_to_google(state, num_heads)
  except ValueError as e:
    raise MissingWeightsError(f"{source}: attention weights do not split "
                              f"into {num_heads} heads ({e})") from e


def _resize_pos_embedding(pos, num_tokens):
  """Bilinearly resizes the patch grid part; the CLS embedding is kept."""
  old, new = (int(round((n - 1)**0.5)) for n in (pos.shape[1], num_tokens))
  if old * old != pos.shape[1] - 1 or new * new != num_tokens - 1:
    return pos
  grid = pos[0, 1:].astype(np.float32).reshape(old, old, -1)
  grid = jax.image.resize(grid, (new, new, grid.shape[-1]), "bilinear")
  grid = np.asarray(grid).reshape(1, new * new, -1)
  return np.concatenate([pos[:, :1].astype(np.float32), grid], 1)


def flatten(tree, prefix=""):
  """Nested dict -> {'a/b/c': leaf}, the Google checkpoint key names."""
  if isinstance(tree, collections.abc.Mapping):
    return {k: v for name, sub in tree.items()
            for k, v in flatten(sub, f"{prefix}{name}/").items()}
  return {prefix[:-1]: tree}


def load_backbone(source, template, *, cache_dir=None, base_url=None):
  """Loads backbone weights from a preset, a file or a converted directory.

  Returns float32 numpy arrays nested exactly like `template` (the backbone
  part of the parameter tree). Raises MissingWeightsError naming every
  missing, unexpected or wrongly shaped key rather than leaving any random.
  """
  path = os.path.expanduser(source)
  if source in PRESETS:
    path = fetch_preset(source, cache_dir=cache_dir, base_url=base_url)
  elif not os.path.exists(path):
    raise MissingWeightsError(
        f"pretrained weights {source!r} are neither a file, a directory nor "
        f'a preset ({", ".join(PRESETS)})')
  want = {k: tuple(v.shape) for k, v in flatten(template).items()}
  num_heads = want[
      _BLOCK.format(0) + "MultiHeadDotProductAttention_1/query/bias"][0]
  got = {k: v for k, v in _read_flat(path, num_heads).items()
         if not _IGNORED.search(k)}
  if _POS in got and _POS in want and got[_POS].shape != want[_POS]:
    got[_POS] = _resize_pos_embedding(got[_POS], want[_POS][1])
  wrong = [f"{k} {got[k].shape} (need {want[k]})"
           for k in sorted(want.keys() & got.keys()) if got[k].shape != want[k]]
  problems = [f'{len(keys)} {what} keys: {", ".join(keys[:8])}'
              + (" ..." if len(keys) > 8 else "")
              for what, keys in (
                  ("missing", sorted(want.keys() - got.keys())),
                  ("unexpected", sorted(got.keys() - want.keys())),
                  ("wrongly shaped", wrong)) if keys]
  if problems:
    raise MissingWeightsError(
        f'weights from {path} do not fit the model ({"; ".join(problems)}; '
        "names in the Google ViT layout)")
  return jax.tree_util.tree_map_with_path(
      lambda keys, _: np.asarray(got["/".join(k.key for k in keys)],
                                 np.float32), template)
