"""Pretrained ViT backbones: presets, a checked download cache, readers.

Every source is mapped to the Google ViT layout our model uses and checked
key by key against a template, so a wrong or partial checkpoint fails loudly
instead of leaving randomly initialised weights behind. Weight files are
untrusted input: no file can run code, make a reader loop, recurse or
allocate much more than its own size, or bring NaN into a model.
"""

import collections
import collections.abc
import hashlib
import http.client
import io
import json
import logging
import math
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

from smope_jax.errors import ConfigError
from smope_jax.errors import MissingWeightsError
from smope_jax.errors import UserError
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
    # The earlier augreg 21k -> 1k checkpoint: the baselines' published runs.
    "sup1k_coda": _timm_hub("vit_base_patch16_224.augreg_in21k_ft_in1k"),
    "ibot21k": (f"{_IBOT}/vitb_16_pt22k/checkpoint_student.pth",
                "ibot_vitb16_pt22k_student.pth"),
    "ibot1k": (f"{_IBOT}/vitb_16/checkpoint_teacher.pth",
               "ibot_vitb16_teacher.pth"),
    "dino1k": _timm_hub("vit_base_patch16_224.dino"),
}
BACKBONE_FILE = "backbone.npz"
INFO_FILE = "info.json"
_FORMATS = {".npz": "npz", ".safetensors": "safetensors", ".pth": "torch",
            ".pt": "torch", ".bin": "torch", ".tar": "torch"}

# Classifier and pre-training heads and the iBOT mask token: not backbone.
_IGNORED = re.compile(r"^(head|pre_logits)([/.]|$)|^(masked_embed|mask_token)$")
_BLOCK = "Transformer/encoderblock_{}/"
_POS = "Transformer/posembed_input/pos_embedding"
_FLOAT_DTYPES = ("float16", "bfloat16", "float32", "float64")

# Limits on what a file may ask a reader to build. A ViT-B/16 state dict
# pickles to about 30 KB and its largest tensor has 2.4M elements.
MAX_TENSOR_ELEMENTS = 1 << 28
_MAX_PICKLE_BYTES = 8 << 20
_MAX_NESTING = 32
_MAX_DOWNLOAD_BYTES = 8 << 30


class UnreadableWeightsError(MissingWeightsError):
  """The file is not usable weights at all (corrupt, malformed, NaN), as
  opposed to usable weights for another model: the cache deletes those."""


def _shown(text, limit=80):
  """A name or value as it may appear in a one-line message."""
  text = text if isinstance(text, str) and text.isprintable() else repr(text)
  return text if len(text) <= limit else text[:limit] + "..."


def _reason(error):
  """An exception as '(Type: message)' text on one line."""
  message = " ".join(str(error).split())
  return _shown(f"{type(error).__name__}: {message}", 300)


def _listed(items):
  items = list(items)
  return ", ".join(items[:8]) + (" ..." if len(items) > 8 else "")


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


def _remove(path):
  try:
    os.remove(path)
  except FileNotFoundError:
    pass


# The download cache.


def _preset_location(name, cache_dir, base_url):
  """(URL, cache path) of a preset; `base_url` names a mirror."""
  url, filename = PRESETS[name]
  base_url = base_url or os.environ.get("SMOPE_JAX_WEIGHTS_URL")
  if base_url:
    url = f'{base_url.rstrip("/")}/{filename}'
  cache_dir = (cache_dir or os.environ.get("SMOPE_JAX_CACHE")
               or "~/.cache/smope_jax")
  return url, os.path.join(os.path.expanduser(cache_dir), filename)


def _load_preset(name, template, cache_dir, base_url):
  """Loads a preset from the cache, or downloads, checks and caches it.

  A download enters the cache only once it has been read and fits
  `template`, so a truncated, wrong or junk download never breaks later
  runs.
  """
  url, path = _preset_location(name, cache_dir, base_url)
  if os.path.exists(path):
    return _load_cached(path, template)
  tmp, digest = _download(url, path, name)
  try:
    params = _load_file(tmp, template, f"the download of {name!r} from {url}")
    os.replace(tmp, path)
  except MissingWeightsError as e:
    _remove(tmp)
    raise MissingWeightsError(f"{e}; nothing was cached") from e
  except BaseException:
    _remove(tmp)
    raise
  _write_sidecar(path, digest)
  return params


def _load_cached(path, template):
  """Loads a cached preset; one that cannot be read is deleted.

  Every use re-hashes the file against its `.sha256` sidecar. A file put
  there by hand (no sidecar) is read and checked like a download and gets
  its sidecar then. A readable file that does not fit this model is kept:
  it may well be the right preset for another model size.
  """
  sidecar = path + ".sha256"
  try:
    recorded = _read_sidecar(sidecar)
    digest = sha256_file(path)
  except OSError as e:
    raise MissingWeightsError(f"cannot read the cached weights {path} "
                              f"({_reason(e)})") from e
  try:
    if recorded is not None and digest != recorded:
      raise UnreadableWeightsError(
          f"cached weights {path} are corrupted (sha256 {digest}, recorded "
          f"{_shown(recorded)})")
    params = _load_file(path, template, path)
  except UnreadableWeightsError as e:
    raise MissingWeightsError(f"{e}; {_discard(path, sidecar)}") from e
  if recorded is None:
    _write_sidecar(path, digest)
  return params


def _read_sidecar(sidecar):
  """The recorded sha256 of a cached file, or None if there is none."""
  if not os.path.exists(sidecar):
    return None
  with open(sidecar, "rb") as f:
    return f.read(200).decode("ascii", "replace").strip()


def _write_sidecar(path, digest):
  """Records the digest of an admitted file, atomically; best effort."""
  tmp = f"{path}.sha256.{os.getpid()}.tmp"
  try:
    with open(tmp, "w") as f:
      f.write(digest + "\n")
    os.replace(tmp, path + ".sha256")
  except OSError as e:
    _remove(tmp)
    logging.warning("cannot record the sha256 of %s (%s); it is re-read "
                    "and checked on every use instead", path, e)


def _discard(path, sidecar):
  """Deletes a bad cached file; says what happened."""
  try:
    _remove(path)
    _remove(sidecar)
  except OSError as e:
    return (f"deleting the cached file failed ({_reason(e)}); delete {path} "
            "by hand")
  return "the cached file was deleted, run again to download it anew"


class _EtagRecorder(urllib.request.HTTPRedirectHandler):
  """Keeps Hugging Face's X-Linked-Etag (the LFS sha256) from redirects."""

  def __init__(self):
    self.etags = []

  def redirect_request(self, req, fp, code, msg, headers, newurl):
    self.etags.append(headers.get("X-Linked-Etag"))
    return super().redirect_request(req, fp, code, msg, headers, newurl)


class _BadDownload(Exception):
  """The server answered, but not with the complete file."""


def _content_length(headers):
  """The announced size, or None; a malformed one is an error."""
  value = headers.get("Content-Length")
  if value is None:
    return None
  if not re.fullmatch(r"\s*\d{1,15}\s*", value):
    raise _BadDownload(f"the server sent an invalid Content-Length "
                       f"{_shown(repr(value))}")
  return int(value)


def _receive(resp, f):
  """Copies a response body to `f`; returns its sha256 hex digest."""
  if resp.headers.get_content_type() == "text/html":
    raise _BadDownload("the server sent an HTML page, not a weights file")
  length = _content_length(resp.headers)
  if length is not None and length > _MAX_DOWNLOAD_BYTES:
    raise _BadDownload(f"the server announced {length} bytes, more than any "
                       "ViT backbone file")
  digest, size = hashlib.sha256(), 0
  for chunk in iter(lambda: resp.read(1 << 22), b""):
    size += len(chunk)
    if size > _MAX_DOWNLOAD_BYTES:
      raise _BadDownload(f"the server sent more than {_MAX_DOWNLOAD_BYTES} "
                         "bytes, more than any ViT backbone file")
    f.write(chunk)
    digest.update(chunk)
  if length is not None and size != length:
    raise _BadDownload(f"got {size} of {length} bytes")
  return digest.hexdigest()


def _download(url, path, name):
  """Downloads to a new temp file next to `path`; returns (temp, sha256).

  Checks what can be checked before reading the file: the status, the
  Content-Length, the content type and Hugging Face's LFS digest. The temp
  file is removed on any failure.
  """
  directory = os.path.dirname(path)
  try:
    os.makedirs(directory, exist_ok=True)
    # Hidden, and with the same extension, which tells the format.
    fd, tmp = tempfile.mkstemp(dir=directory,
                               prefix=f".{os.path.basename(path)}.part-",
                               suffix=os.path.splitext(path)[1])
  except OSError as e:
    raise MissingWeightsError(
        f"cannot write to the weights cache {directory} ({_reason(e)}); set "
        "SMOPE_JAX_CACHE to a writable directory") from e
  recorder = _EtagRecorder()
  try:
    logging.info("downloading %s to %s", url, path)
    with os.fdopen(fd, "wb") as f, urllib.request.build_opener(
        recorder).open(url, timeout=60) as resp:
      recorder.etags.append(resp.headers.get("X-Linked-Etag"))
      digest = _receive(resp, f)
    lfs = [e for e in (str(e).strip('"').lower() for e in recorder.etags if e)
           if re.fullmatch("[0-9a-f]{64}", e)]
    if lfs and digest != lfs[0]:
      raise _BadDownload(f"the file is corrupted: sha256 {digest}, the "
                         f"server announced {lfs[0]}")
  except (OSError, ValueError, http.client.HTTPException, _BadDownload) as e:
    _remove(tmp)
    reason = str(e) if isinstance(e, _BadDownload) else _reason(e)
    raise MissingWeightsError(
        f"pretrained weights {name!r} are not cached and could not be "
        f"downloaded from {url} ({reason}); nothing was cached: fetch "
        f"that file elsewhere and place it at {path}, or pass "
        "--config.pretrained=/path/to/file") from e
  except BaseException:
    _remove(tmp)
    raise
  return tmp, digest


# Torch files, read without torch.


class _StorageType:
  """What a pickled `torch.FloatStorage` (etc.) global stands for."""
  __slots__ = ("name", "dtype")

  def __init__(self, name, dtype):
    self.name, self.dtype = name, np.dtype(dtype)

  def __repr__(self):
    return f"torch.{self.name}"


class _Storage:
  """A storage's values, read from its own entry of the zip file."""
  __slots__ = ("values",)

  def __init__(self, values):
    self.values = values


class _TensorRef:
  """The arguments of torch._utils._rebuild_tensor_v2, checked later."""
  __slots__ = ("storage", "offset", "size", "stride")

  def __init__(self, storage, offset, size, stride, *unused_args):
    self.storage, self.offset, self.size, self.stride = (
        storage, offset, size, stride)


_TORCH_STORAGES = {
    "FloatStorage": np.float32, "HalfStorage": np.float16,
    "BFloat16Storage": ml_dtypes.bfloat16, "DoubleStorage": np.float64,
    "LongStorage": np.int64, "IntStorage": np.int32, "ShortStorage": np.int16,
    "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_}
_TORCH_GLOBALS = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _TensorRef,
    ("torch._utils", "_rebuild_parameter"): lambda data, *unused: data,
}
_CONTAINERS = (dict, collections.OrderedDict, list, tuple)
_SCALARS = (type(None), bool, int, float, complex, str, bytes, bytearray)


class _TorchUnpickler(pickle.Unpickler):
  """Unpickles a torch zip checkpoint; refuses any other global."""

  def __init__(self, zf, prefix, label):
    super().__init__(io.BytesIO(_read_entry(zf, prefix + "data.pkl", label,
                                            _MAX_PICKLE_BYTES)))
    self.zf, self.prefix, self.label = zf, prefix, label
    self.raw, self.storages = {}, {}

  def find_class(self, module, name):
    if module == "torch" and name.endswith("Storage"):
      if name not in _TORCH_STORAGES:
        raise UnreadableWeightsError(
            f"{self.label}: unsupported storage type torch.{_shown(name)}; "
            "weights are float, integer or bool tensors")
      return _StorageType(name, _TORCH_STORAGES[name])
    if (module, name) not in _TORCH_GLOBALS:
      raise UnreadableWeightsError(
          f"{self.label}: refusing to unpickle {_shown(module)}.{_shown(name)}"
          "; a weights file needs only tensors and dicts (re-save it as a "
          "plain state dict)")
    return _TORCH_GLOBALS[module, name]

  def persistent_load(self, pid):
    if not (type(pid) is tuple and len(pid) == 5 and pid[0] == "storage"
            and isinstance(pid[1], _StorageType)
            and isinstance(pid[2], str) and re.fullmatch(r"\w{1,64}", pid[2])
            and type(pid[4]) is int):
      raise UnreadableWeightsError(
          f"{self.label}: {_shown(pid)} is not a reference to a torch storage")
    storage_type, key, numel = pid[1], pid[2], pid[4]
    if key not in self.raw:
      self.raw[key] = _read_entry(self.zf, f"{self.prefix}data/{key}",
                                  self.label)
    raw = self.raw[key]
    if len(raw) != numel * storage_type.dtype.itemsize:
      raise UnreadableWeightsError(
          f"{self.label}: storage {key} holds {len(raw)} bytes, not the "
          f"{numel} values of torch.{storage_type.name} it is read as")
    if (key, storage_type.name) not in self.storages:
      self.storages[key, storage_type.name] = _Storage(
          np.frombuffer(raw, storage_type.dtype))
    return self.storages[key, storage_type.name]


def _read_entry(zf, name, label, limit=None):
  """The bytes of a zip entry that torch.save wrote (never compressed).

  Refusing compression bounds what a file can make us hold by its size.
  """
  info = zf.getinfo(name)
  if info.compress_type != zipfile.ZIP_STORED:
    raise UnreadableWeightsError(
        f"{label}: {_shown(name)} is compressed, which torch.save never does")
  if limit is not None and info.file_size > limit:
    raise UnreadableWeightsError(
        f"{label}: {_shown(name)} has {info.file_size} bytes, more than "
        f"the {limit} a weights file needs")
  return zf.read(info)


def _collect_tensors(tree, label):
  """{id: (name, ref)} of the tensors in an unpickled tree, checking it.

  Iterative, so that neither a cycle nor deep nesting can hang or overflow
  anything: both are refused, as is any object that is not a container, a
  scalar or a tensor. Shared subtrees are visited once.
  """
  tensors, on_path, done = {}, set(), set()
  stack = [(tree, "", 0, False)]
  while stack:
    node, name, depth, leaving = stack.pop()
    if leaving:
      on_path.discard(id(node))
      done.add(id(node))
    elif isinstance(node, _TensorRef):
      tensors.setdefault(id(node), (name or "(top level)", node))
    elif type(node) in _CONTAINERS:
      if id(node) in on_path:
        raise UnreadableWeightsError(
            f"{label}: its pickled objects contain a cycle (at "
            f"{_shown(name or '(top level)')}); a weights file holds a tree of "
            "dicts and tensors")
      if id(node) in done:
        continue
      if depth >= _MAX_NESTING:
        raise UnreadableWeightsError(
            f"{label}: its pickled objects are nested more than "
            f"{_MAX_NESTING} levels deep; a weights file holds a shallow "
            "tree of dicts and tensors")
      on_path.add(id(node))
      stack.append((node, name, depth, True))
      items = node.items() if isinstance(node, dict) else enumerate(node)
      for key, child in items:
        if type(key) not in _SCALARS:
          raise UnreadableWeightsError(
              f"{label}: a dict key at {_shown(name or '(top level)')} is a "
              f"{type(key).__name__}, not a name")
        stack.append((child, f"{name}/{key}" if name else str(key),
                      depth + 1, False))
    elif type(node) not in _SCALARS:
      raise UnreadableWeightsError(
          f"{label}: {_shown(name or 'the top level')} holds a "
          f"{type(node).__name__}, which a weights file never pickles")
  return tensors


def _is_index(value):
  return type(value) is int and 0 <= value < 1 << 62


def _check_tensor(name, ref, label):
  """Returns the tensor's size in bytes; refuses it unless it lies inside
  its storage and within MAX_TENSOR_ELEMENTS. Allocates nothing."""
  where = f"{label}: tensor {_shown(name)}"
  storage = ref.storage
  if not isinstance(storage, _Storage):
    raise UnreadableWeightsError(
        f"{where} is backed by a {type(storage).__name__}, not by a storage "
        "of bytes in the file")
  size, stride = ref.size, ref.stride
  if not (_is_index(ref.offset) and type(size) is tuple
          and type(stride) is tuple and len(size) == len(stride) <= 32
          and all(map(_is_index, size + stride))):
    raise UnreadableWeightsError(
        f"{where} has a malformed offset, size or stride "
        f"({_shown((ref.offset, size, stride))})")
  numel = math.prod(size)
  if numel > MAX_TENSOR_ELEMENTS:
    raise UnreadableWeightsError(
        f"{where} of size {_shown(size)} has {numel} elements, more than the "
        f"{MAX_TENSOR_ELEMENTS} any weight of a ViT has")
  last = ref.offset + sum((n - 1) * s for n, s in zip(size, stride))
  if (last >= storage.values.size if numel else
      ref.offset > storage.values.size):
    raise UnreadableWeightsError(
        f"{where} of size {_shown(size)}, stride {_shown(stride)} and offset "
        f"{ref.offset} reaches past the end of its storage of "
        f"{storage.values.size} values")
  return numel * storage.values.itemsize


def _tensor_values(ref):
  storage = ref.storage.values
  if 0 in ref.size:
    return np.zeros(ref.size, storage.dtype)
  return np.lib.stride_tricks.as_strided(
      storage[ref.offset:], ref.size,
      [s * storage.itemsize for s in ref.stride]).copy()


def _rebuild(node, arrays, memo):
  """The tree with tensors as arrays; recursion is safe after the checks."""
  if id(node) in arrays:
    return arrays[id(node)]
  if type(node) not in _CONTAINERS:
    return node
  if id(node) not in memo:
    if isinstance(node, dict):
      memo[id(node)] = type(node)(
          (k, _rebuild(v, arrays, memo)) for k, v in node.items())
    else:
      memo[id(node)] = type(node)(_rebuild(v, arrays, memo) for v in node)
  return memo[id(node)]


def _materialize(tree, label, storage_bytes):
  """Checks every tensor, then builds them as numpy arrays.

  All tensors together may hold at most twice the bytes of the storages in
  the file (tensors sharing a storage, like tied weights, each count), so a
  small file cannot make us allocate much more than its size.
  """
  tensors = _collect_tensors(tree, label)
  total = sum(_check_tensor(name, ref, label)
              for name, ref in tensors.values())
  if total > 2 * storage_bytes:
    raise UnreadableWeightsError(
        f"{label}: its tensors would hold {total} bytes, more than twice the "
        f"{storage_bytes} bytes stored in the file (tensors that overlap "
        "themselves or their neighbours)")
  arrays = {key: _tensor_values(ref) for key, (_, ref) in tensors.items()}
  return _rebuild(tree, arrays, {})


# How a torch.save file starts: a zip archive's first entry (torch >= 1.6)
# or the pickle protocol opcode of the legacy format.
_ZIP_START = b"PK\x03\x04"
_PICKLE_START = b"\x80"


def read_torch(path, label=None):
  """Reads a torch.save file (zip format, torch >= 1.6) without torch.

  Tensors become numpy arrays; anything but dicts, lists, tuples, scalars
  and tensors is refused. Messages call the file `label` (default: path).
  """
  label = label or path
  if not zipfile.is_zipfile(path):
    with open(path, "rb") as f:
      head = f.read(len(_ZIP_START))
    if not head or head == _ZIP_START:
      raise UnreadableWeightsError(
          f"{label}: truncated (a zip archive without its end, as an "
          "interrupted download or copy leaves); fetch or copy it again")
    if head.startswith(_PICKLE_START):
      raise UnreadableWeightsError(
          f"{label}: a legacy torch < 1.6 checkpoint, which is not "
          "supported; re-save it with a recent torch")
    raise UnreadableWeightsError(
        f"{label}: not a torch checkpoint (neither a zip archive nor a "
        "legacy pickle)")
  try:
    with zipfile.ZipFile(path) as zf:
      pkl = [n for n in zf.namelist() if n.endswith("data.pkl")]
      if len(pkl) != 1:
        raise UnreadableWeightsError(f"{label}: not a torch checkpoint")
      prefix = pkl[0][:-len("data.pkl")]
      if prefix + "byteorder" in zf.namelist() and _read_entry(
          zf, prefix + "byteorder", label, 16) != b"little":
        raise UnreadableWeightsError(
            f"{label}: saved on a big-endian machine; re-save it on a "
            "little-endian one")
      unpickler = _TorchUnpickler(zf, prefix, label)
      tree = unpickler.load()
      return _materialize(tree, label, sum(map(len, unpickler.raw.values())))
  except UserError:
    raise
  except Exception as e:  # A hostile file can break a parser anywhere.
    raise UnreadableWeightsError(
        f"cannot read weights from {label} ({_reason(e)})") from e


def unwrap_state_dict(obj, path="checkpoint"):
  """Finds the weights inside DINO / iBOT / timm checkpoint wrappers."""
  while isinstance(obj, dict) and not any(
      isinstance(v, np.ndarray) for v in obj.values()):
    inner = [k for k in ("state_dict", "model", "teacher", "student")
             if isinstance(obj.get(k), dict)]
    if not inner:
      raise MissingWeightsError(f"{path}: no state dict found among keys "
                                f"{_listed(sorted(map(_shown, obj)))}")
    obj = obj[inner[0]]
  if not isinstance(obj, dict):
    raise MissingWeightsError(f"{path}: holds a {type(obj).__name__}, not a "
                              "state dict")
  return {re.sub(r"^((module|backbone)\.)+", "", k): v for k, v in obj.items()
          if isinstance(k, str) and isinstance(v, np.ndarray)}


# Other formats and the mapping to the Google layout.


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
            f"cannot read key {_shown(key)} of {label} ({_reason(e)})") from e
      members[key] = _NpyMember(path, name, shape, dtype)
  return members


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


def _timm_key_to_google(key, x, num_heads, out):
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
          f"{_shown(key)} of shape {np.shape(x)} does not map to a ViT with "
          f"{num_heads} heads ({_reason(e)})") from e
  return out


def _weights_format(path):
  if os.path.isdir(path):
    return "npz"
  ext = os.path.splitext(path)[1].lower()
  if ext not in _FORMATS:
    raise MissingWeightsError(
        f"{path}: unknown weights format {ext!r}; expected a preset "
        f'({", ".join(PRESETS)}), .npz, .safetensors, .pth/.bin or a '
        "directory written by smope_jax.convert")
  return _FORMATS[ext]


def check_source(source):
  """Fails fast on a source that names neither a preset nor a weights file.

  Reads nothing, so callers can check a config before doing any work.
  """
  if source in PRESETS:
    return
  path = os.path.expanduser(source)
  if not os.path.exists(path):
    raise MissingWeightsError(
        f"pretrained weights {source!r} are neither a file, a directory nor "
        f'a preset ({", ".join(PRESETS)})')
  _weights_format(path)


def _converted_npz(directory):
  """The npz of a converted directory, after checking its recorded sha256."""
  with open(os.path.join(directory, INFO_FILE)) as f:
    expected = json.load(f)["sha256"]
  npz = os.path.join(directory, BACKBONE_FILE)
  if sha256_file(npz) != expected:
    raise UnreadableWeightsError(f"{npz} does not match the sha256 in its "
                                 f"{INFO_FILE}; convert it again")
  return npz


_SAFETENSORS_FLOATS = {"F16": "float16", "BF16": "bfloat16", "F32": "float32",
                       "F64": "float64"}


def _refuse_non_float(label, dtypes):
  """Names the keys whose dtype is not floating point.

  `dtypes` maps keys to (dtype name, dtype as shown in the message).
  """
  wrong = [f"{_shown(k)} ({shown})" for k, (name, shown) in
           sorted(dtypes.items()) if name not in _FLOAT_DTYPES]
  if wrong:
    raise UnreadableWeightsError(
        f"weights from {label} have {len(wrong)} keys that are not floating "
        f"point: {_listed(wrong)}")


def _safetensors_state(path, label):
  """The backbone arrays of a safetensors file; dtypes checked first."""
  with safetensors.safe_open(path, "np") as f:
    keys = [k for k in f.keys() if not _IGNORED.search(k)]
    dtypes = {k: f.get_slice(k).get_dtype() for k in keys}
    _refuse_non_float(label, {k: (_SAFETENSORS_FLOATS.get(d), d)
                              for k, d in dtypes.items()})
    return {k: f.get_tensor(k) for k in keys}


def _read_flat(path, num_heads, label):
  """Reads a file or converted directory into '/'-joined Google keys.

  Values are numpy arrays, or `_NpyMember`s read once their shape has been
  checked. Heads and other non-backbone keys are left out.
  """
  kind = _weights_format(path)
  try:
    if os.path.isdir(path):
      path = _converted_npz(path)
    if kind == "npz":
      state = _npz_members(path, label)
    elif kind == "safetensors":
      state = _safetensors_state(path, label)
    else:
      state = unwrap_state_dict(read_torch(path, label), label)
  except UserError:
    raise
  except Exception as e:  # A hostile file can break a parser anywhere.
    raise UnreadableWeightsError(
        f"cannot read weights from {label} ({_reason(e)})") from e
  state = {k: v for k, v in state.items() if not _IGNORED.search(k)}
  _refuse_non_float(label, {k: (np.dtype(v.dtype).name, str(v.dtype))
                            for k, v in state.items()})
  if kind == "npz":
    return state
  try:
    return timm_to_google(state, num_heads)
  except ValueError as e:
    raise MissingWeightsError(f"weights from {label}: {e}") from e


def _resizable(shape, want):
  """True if a position embedding of `shape` can be resized to `want`."""
  if len(shape) != 3 or shape[0] != 1 or shape[2] != want[2]:
    return False
  if not 2 <= shape[1] <= MAX_TENSOR_ELEMENTS // max(shape[2], 1):
    return False
  return all(math.isqrt(n - 1)**2 == n - 1 for n in (shape[1], want[1]))


def _resize_pos_embedding(pos, num_tokens):
  """Bilinearly resizes the patch grid part; the CLS embedding is kept."""
  old, new = (math.isqrt(n - 1) for n in (pos.shape[1], num_tokens))
  grid = pos[0, 1:].astype(np.float32).reshape(old, old, -1)
  grid = jax.image.resize(grid, (new, new, grid.shape[-1]), "bilinear")
  grid = np.asarray(grid).reshape(1, new * new, -1)
  return np.concatenate([pos[:, :1].astype(np.float32), grid], 1)


def _check_fit(label, got, want):
  """Names every missing, unexpected or wrongly shaped key."""
  def fits(key):
    shape = tuple(got[key].shape)
    return shape == want[key] or (key == _POS and _resizable(shape, want[key]))
  wrong = [f"{k} {tuple(got[k].shape)} (need {want[k]})"
           for k in sorted(want.keys() & got.keys()) if not fits(k)]
  problems = [f"{len(keys)} {what} keys: {_listed(keys)}"
              for what, keys in (
                  ("missing", sorted(want.keys() - got.keys())),
                  ("unexpected", sorted(map(_shown, got.keys() - want.keys()))),
                  ("wrongly shaped", wrong)) if keys]
  if problems:
    raise MissingWeightsError(
        f'weights from {label} do not fit the model ({"; ".join(problems)}; '
        "names in the Google ViT layout)")


def _value(key, x, label):
  """The float32 array of a checked key."""
  try:
    x = x.read() if isinstance(x, _NpyMember) else x
  except Exception as e:  # A hostile file can break a parser anywhere.
    raise UnreadableWeightsError(
        f"cannot read key {key} of {label} ({_reason(e)})") from e
  with np.errstate(all="ignore"):  # Overflow shows up as inf, refused next.
    return np.asarray(x, np.float32)


def _load_file(path, template, label):
  """Reads, checks and converts the weights at `path` to `template`."""
  want = {k: tuple(v.shape) for k, v in flatten(template).items()}
  num_heads = want[
      _BLOCK.format(0) + "MultiHeadDotProductAttention_1/query/bias"][0]
  got = _read_flat(path, num_heads, label)
  _check_fit(label, got, want)
  values = {k: _value(k, got[k], label) for k in want}
  if _POS in values and values[_POS].shape != want[_POS]:
    values[_POS] = _resize_pos_embedding(values[_POS], want[_POS][1])
  bad = sorted(k for k, v in values.items() if not np.isfinite(v).all())
  if bad:
    raise UnreadableWeightsError(
        f"weights from {label} hold NaN or infinite values (in float32) in "
        f"{len(bad)} keys: {_listed(bad)}; use a checkpoint saved before "
        "training diverged")
  return jax.tree_util.tree_map_with_path(
      lambda keys, _: values["/".join(k.key for k in keys)], template)


def flatten(tree, prefix=""):
  """Nested dict -> {'a/b/c': leaf}, the Google checkpoint key names."""
  if isinstance(tree, collections.abc.Mapping):
    return {k: v for name, sub in tree.items()
            for k, v in flatten(sub, f"{prefix}{name}/").items()}
  return {prefix[:-1]: tree}


def load_backbone(source, template, *, cache_dir=None, base_url=None):
  """Loads backbone weights from a preset, a file or a converted directory.

  Returns float32 numpy arrays nested exactly like `template` (the backbone
  part of the parameter tree). Raises MissingWeightsError, with a one-line
  message naming the keys, for missing, unexpected, wrongly shaped,
  non-float or non-finite weights rather than leaving any random, and for
  files that are not weights. A preset is downloaded into the cache
  (`cache_dir`, env SMOPE_JAX_CACHE, ~/.cache/smope_jax) from its URL or
  the mirror `base_url` (env SMOPE_JAX_WEIGHTS_URL) serving the cache's file
  names, and is kept there only once it loads.
  """
  check_source(source)
  if source in PRESETS:
    return _load_preset(source, template, cache_dir, base_url)
  path = os.path.expanduser(source)
  return _load_file(path, template, path)
