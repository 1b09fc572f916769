"""Torch checkpoints read without torch, and never trusted.

A restricted unpickler rebuilds only dicts, lists, tuples, scalars and
tensors; every other global is refused, so no file can run code. Tensors
are checked against their storages before any is built, so no file can
make the reader loop, recurse or allocate much more than its own size.
"""

import collections
import io
import math
import pickle
import re
import zipfile

import ml_dtypes
import numpy as np

from smope_jax.errors import MissingWeightsError
from smope_jax.errors import UserError
from smope_jax.weights import base
from smope_jax.weights.base import UnreadableWeightsError

# Limits on what a file may ask a reader to build. A ViT-B/16 state dict
# pickles to about 30 KB and its largest tensor has 2.4M elements.
MAX_TENSOR_ELEMENTS = 1 << 28
_MAX_PICKLE_BYTES = 8 << 20
_MAX_NESTING = 32


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
    self.storage, self.offset, self.size, self.stride = (storage, offset, size,
                                                         stride)


_TORCH_STORAGES = {
    "FloatStorage": np.float32,
    "HalfStorage": np.float16,
    "BFloat16Storage": ml_dtypes.bfloat16,
    "DoubleStorage": np.float64,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_
}
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
    super().__init__(
        io.BytesIO(
            _read_entry(zf, prefix + "data.pkl", label, _MAX_PICKLE_BYTES)))
    self.zf, self.prefix, self.label = zf, prefix, label
    self.raw, self.storages = {}, {}

  def find_class(self, module, name):
    if module == "torch" and name.endswith("Storage"):
      if name not in _TORCH_STORAGES:
        raise UnreadableWeightsError(
            f"{self.label}: unsupported storage type torch.{base.shown(name)}; "
            "weights are float, integer or bool tensors")
      return _StorageType(name, _TORCH_STORAGES[name])
    if (module, name) not in _TORCH_GLOBALS:
      raise UnreadableWeightsError(
          f"{self.label}: refusing to unpickle {base.shown(module)}."
          f"{base.shown(name)}; a weights file needs only tensors and dicts "
          "(re-save it as a plain state dict)")
    return _TORCH_GLOBALS[module, name]

  def persistent_load(self, pid):
    if not (type(pid) is tuple and len(pid) == 5 and pid[0] == "storage" and
            isinstance(pid[1], _StorageType) and isinstance(pid[2], str) and
            re.fullmatch(r"\w{1,64}", pid[2]) and type(pid[4]) is int):
      raise UnreadableWeightsError(
          f"{self.label}: {base.shown(pid)} is not a reference to a torch "
          "storage")
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
        f"{label}: {base.shown(name)} is compressed, which torch.save never "
        "does")
  if limit is not None and info.file_size > limit:
    raise UnreadableWeightsError(
        f"{label}: {base.shown(name)} has {info.file_size} bytes, more than "
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
            f"{base.shown(name or '(top level)')}); a weights file holds a "
            "tree of dicts and tensors")
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
              f"{label}: a dict key at {base.shown(name or '(top level)')} is "
              f"a {type(key).__name__}, not a name")
        stack.append(
            (child, f"{name}/{key}" if name else str(key), depth + 1, False))
    elif type(node) not in _SCALARS:
      raise UnreadableWeightsError(
          f"{label}: {base.shown(name or 'the top level')} holds a "
          f"{type(node).__name__}, which a weights file never pickles")
  return tensors


def _is_index(value):
  return type(value) is int and 0 <= value < 1 << 62


def _check_tensor(name, ref, label):
  """Returns the tensor's size in bytes; refuses it unless it lies inside
  its storage and within MAX_TENSOR_ELEMENTS. Allocates nothing."""
  where = f"{label}: tensor {base.shown(name)}"
  storage = ref.storage
  if not isinstance(storage, _Storage):
    raise UnreadableWeightsError(
        f"{where} is backed by a {type(storage).__name__}, not by a storage "
        "of bytes in the file")
  size, stride = ref.size, ref.stride
  if not (_is_index(ref.offset) and type(size) is tuple and
          type(stride) is tuple and len(size) == len(stride) <= 32 and
          all(map(_is_index, size + stride))):
    raise UnreadableWeightsError(
        f"{where} has a malformed offset, size or stride "
        f"({base.shown((ref.offset, size, stride))})")
  numel = math.prod(size)
  if numel > MAX_TENSOR_ELEMENTS:
    raise UnreadableWeightsError(
        f"{where} of size {base.shown(size)} has {numel} elements, more than "
        f"the {MAX_TENSOR_ELEMENTS} any weight of a ViT has")
  last = ref.offset + sum((n - 1) * s for n, s in zip(size, stride))
  if (last >= storage.values.size
      if numel else ref.offset > storage.values.size):
    raise UnreadableWeightsError(
        f"{where} of size {base.shown(size)}, stride {base.shown(stride)} and "
        f"offset {ref.offset} reaches past the end of its storage of "
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
  total = sum(_check_tensor(name, ref, label) for name, ref in tensors.values())
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
        f"cannot read weights from {label} ({base.reason(e)})") from e


def unwrap_state_dict(obj, path="checkpoint"):
  """Finds the weights inside DINO / iBOT / timm checkpoint wrappers."""
  while isinstance(
      obj, dict) and not any(isinstance(v, np.ndarray) for v in obj.values()):
    inner = [
        k for k in ("state_dict", "model", "teacher", "student")
        if isinstance(obj.get(k), dict)
    ]
    if not inner:
      raise MissingWeightsError(f"{path}: no state dict found among keys "
                                f"{base.listed(sorted(map(base.shown, obj)))}")
    obj = obj[inner[0]]
  if not isinstance(obj, dict):
    raise MissingWeightsError(f"{path}: holds a {type(obj).__name__}, not a "
                              "state dict")
  return {
      re.sub(r"^((module|backbone)\.)+", "", k): v
      for k, v in obj.items()
      if isinstance(k, str) and isinstance(v, np.ndarray)
  }
