"""Hostile weight files and downloads: each ends with one clear message,
fast, without allocating what the file asks for, and leaves nothing cached.

Torch files are built here without torch, by a pickler that names torch's
globals; a well-formed one loads (a control), so each hostile variant fails
for its own defect.
"""

import concurrent.futures
import importlib.util
import io
import json
import os
import pickle
import struct
import time
import tracemalloc
import zipfile

import numpy as np
import pytest
import safetensors.numpy

from smope_jax import configuration
from smope_jax import weights
from smope_jax.errors import MissingWeightsError
from tests import helpers
from tests import numpy_vit
from tests.fixtures import local_server
from tests.test_pretrained import IMAGE
from tests.test_pretrained import TINY
from tests.test_pretrained import flatten
from tests.test_pretrained import random_backbone
from tests.test_pretrained import template


class Global:
  """A global that the pickle names by module and name, unimported."""

  def __init__(self, module, name):
    self.module, self.name = module, name

  def __call__(self, *args):
    return Call(self, args)


class Call:
  """`func(*args)`, pickled as REDUCE."""

  def __init__(self, func, args):
    self.func, self.args = func, args


class Storage:
  """A torch storage: its bytes become the zip entry data/<key>."""

  def __init__(self, values, type_name="FloatStorage", numel=None,
               type_global=None, written=True):
    self.data = np.ascontiguousarray(values).tobytes()
    self.numel = np.size(values) if numel is None else numel
    self.type_global = type_global or Global("torch", type_name)
    self.written = written


OrderedDict = Global("collections", "OrderedDict")
_rebuild_tensor_v2 = Global("torch._utils", "_rebuild_tensor_v2")


def tensor(values, size=None, stride=None, offset=0, **storage_args):
  """A tensor as torch.save pickles it: contiguous unless told otherwise."""
  values = np.asarray(values)
  size = values.shape if size is None else size
  if stride is None:
    stride = tuple(int(np.prod(size[i + 1:])) for i in range(len(size)))
  return _rebuild_tensor_v2(Storage(values.reshape(-1), **storage_args), offset,
                            tuple(size), tuple(stride), False, OrderedDict())


class _TorchPickler(pickle._Pickler):  # pylint: disable=protected-access
  """The pure-Python pickler, taught torch's persistent storages."""

  def __init__(self, file, protocol):
    super().__init__(file, protocol=protocol)
    self.storages = {}

  def save(self, obj, save_persistent_id=True):
    if isinstance(obj, Global):
      self.write(pickle.GLOBAL + f"{obj.module}\n{obj.name}\n".encode())
    else:
      super().save(obj, save_persistent_id)

  def reducer_override(self, obj):
    if isinstance(obj, Call):
      return obj.func, obj.args
    return NotImplemented

  def persistent_id(self, obj):
    if not isinstance(obj, Storage):
      return None
    key = self.storages.setdefault(id(obj), (str(len(self.storages)), obj))[0]
    return ("storage", obj.type_global, key, "cpu", obj.numel)


def write_torch(path, obj=None, *, raw_pickle=None, byteorder=b"little",
                compression=zipfile.ZIP_STORED, protocol=2):
  """A zip file laid out like torch.save's."""
  buffer = io.BytesIO()
  pickler = _TorchPickler(buffer, protocol)
  if raw_pickle is None:
    pickler.dump(obj)
  with zipfile.ZipFile(path, "w", compression=compression) as zf:
    zf.writestr("archive/data.pkl", raw_pickle or buffer.getvalue())
    zf.writestr("archive/byteorder", byteorder)
    for key, storage in pickler.storages.values():
      if storage.written:
        zf.writestr(f"archive/data/{key}", storage.data)
  return path


def timm_tensors(flat=None, **changes):
  """A timm state dict of tensors; `changes` replace entries by name."""
  state = {
      k: tensor(v)
      for k, v in numpy_vit.google_to_timm(flat or random_backbone()).items()
  }
  state.update(changes)
  return state


def test_hand_built_torch_file_loads(tmp_path):
  """The control: the builder's well-formed file holds the weights."""
  flat = random_backbone()
  path = write_torch(tmp_path / "ok.pth", {"model": timm_tensors(flat)})
  loaded = flatten(weights.load_backbone(str(path), template()))
  for key, value in flat.items():
    np.testing.assert_array_equal(loaded[key], value, err_msg=key)


def _cyclic_dict():
  checkpoint = {}
  checkpoint["model"] = checkpoint
  return checkpoint


def _cyclic_list():
  log = []
  log.append(log)
  return {"model": timm_tensors(), "log": log}


def _deep_pickle():
  """Lists nested 100000 deep, in 200 KB of opcodes."""
  depth = 100_000
  return (pickle.PROTO + b"\x02" + pickle.EMPTY_LIST * depth + pickle.APPEND *
          (depth - 1) + pickle.STOP)


ONE = np.zeros(1, np.float32)
TORCH_CASES = {
    "cyclic dict": (dict(obj=_cyclic_dict()), "contain a cycle"),
    "cyclic list": (dict(obj=_cyclic_list()), "contain a cycle (at log"),
    "deep nesting": (dict(raw_pickle=_deep_pickle()), "nested more than 32"),
    "stride-0 giant":
        (dict(obj=timm_tensors(cls_token=tensor(ONE, (1 << 40,), (0,)))),
         "tensor cls_token of size (1099511627776,) has 1099511627776 "
         "elements, more than"),
    "stride-0 broadcast":
        (dict(obj=timm_tensors(cls_token=tensor(ONE, (1 << 24,), (0,)))),
         "more than twice"),
    "past its storage":
        (dict(obj=timm_tensors(
            cls_token=tensor(np.zeros(6, np.float32), (2, 3), (3,
                                                               1), offset=1))),
         "tensor cls_token of size (2, 3), stride (3, 1) and offset 1 reaches "
         "past the end of its storage of 6 values"),
    "huge stride":
        (dict(obj=timm_tensors(cls_token=tensor(ONE, (2,), (1 << 61,)))),
         "reaches past the end"),
    "negative stride":
        (dict(obj=timm_tensors(cls_token=tensor(ONE, (1,), (-1,)))),
         "tensor cls_token has a malformed offset, size or stride"),
    "size not a tuple": (dict(
        obj={
            "cls_token":
                _rebuild_tensor_v2(Storage(ONE), 0, "big", (
                    1,), False, OrderedDict())
        }), "malformed offset, size or stride"),
    "storage is a list":
        (dict(obj=timm_tensors(cls_token=_rebuild_tensor_v2([0.0] * 32, 0, (
            1, 1, 32), (32, 32, 1), False, OrderedDict()))),
         "tensor cls_token is backed by a list, not by a storage of bytes"),
    "storage is bytes": (dict(
        obj=timm_tensors(cls_token=_rebuild_tensor_v2(b"\0" * 128, 0, (
            1, 1, 32), (32, 32, 1), False, OrderedDict())),
        protocol=3), "backed by a bytes"),
    "unknown storage type":
        (dict(obj=timm_tensors(
            cls_token=tensor(ONE, type_name="ComplexFloatStorage"))),
         "unsupported storage type torch.ComplexFloatStorage"),
    "storage type not a storage":
        (dict(obj=timm_tensors(cls_token=tensor(ONE, type_global=OrderedDict))),
         "is not a reference to a torch storage"),
    "storage shorter than its numel":
        (dict(obj=timm_tensors(cls_token=tensor(ONE, numel=1 << 30))),
         "holds 4 bytes, not the 1073741824 values of torch.FloatStorage"),
    "storage missing":
        (dict(obj=timm_tensors(cls_token=tensor(ONE, written=False))),
         "There is no item named 'archive/data/"),
    "compressed storages": (dict(obj=timm_tensors(),
                                 compression=zipfile.ZIP_DEFLATED),
                            "is compressed, which torch.save never does"),
    "oversized pickle": (dict(obj={"blob": b"\0" * (9 << 20)}),
                         "more than the 8388608 a weights file needs"),
    "big-endian": (dict(obj=timm_tensors(),
                        byteorder=b"big"), "saved on a big-endian machine"),
    "a set": (dict(obj={
        "model": timm_tensors(),
        "tags": {1, 2}
    }, protocol=4), "tags holds a set"),
}


@pytest.mark.parametrize("case", TORCH_CASES)
def test_hostile_torch_files_are_refused_fast_and_small(tmp_path, case):
  write_args, expected = TORCH_CASES[case]
  path = write_torch(tmp_path / "hostile.pth", **write_args)
  tracemalloc.start()
  start = time.perf_counter()
  try:
    with pytest.raises(MissingWeightsError) as e:
      weights.load_backbone(str(path), template())
    seconds = time.perf_counter() - start
    peak = tracemalloc.get_traced_memory()[1]
  finally:
    tracemalloc.stop()
  assert expected in str(e.value) and "\n" not in str(e.value)
  assert str(path) in str(e.value)
  assert seconds < 10
  # Nothing is allocated for what the file declares: the giant tensors
  # would need 64 MB to 4 TB, the oversized pickle 9 MB.
  assert peak < 2 * os.path.getsize(path) + (32 << 20), peak


def test_truncated_legacy_and_junk_torch_files_are_told_apart(tmp_path):
  whole = write_torch(tmp_path / "ok.pth", {"model": timm_tensors()})
  data = whole.read_bytes()
  # A legacy (torch < 1.6) file starts with its pickled magic number.
  legacy = pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2)
  for name, content, expected in (("half.pth", data[:len(data) // 2],
                                   "truncated"), ("end_missing.pth", data[:-10],
                                                  "truncated"),
                                  ("empty.pth", b"", "truncated"),
                                  ("legacy.pth", legacy,
                                   "a legacy torch < 1.6 checkpoint"),
                                  ("junk.pth", b"<html>",
                                   "not a torch checkpoint")):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(MissingWeightsError) as e:
      weights.load_backbone(str(path), template())
    assert str(e.value).startswith(f"{path}: {expected}"), e.value


def _npy_header_only(shape, descr="<f4"):
  """An .npy member that declares `shape` but holds no data."""
  header = io.BytesIO()
  np.lib.format.write_array_header_1_0(header, {
      "descr": descr,
      "fortran_order": False,
      "shape": shape
  })
  return header.getvalue()


def write_npz(path, flat, raw_members=()):
  with zipfile.ZipFile(path, "w") as zf:
    for key, value in flat.items():
      buffer = io.BytesIO()
      np.lib.format.write_array(buffer, np.asanyarray(value), allow_pickle=True)
      zf.writestr(key + ".npy", buffer.getvalue())
    for key, data in raw_members:
      zf.writestr(key + ".npy", data)
  return path


def _changed(key, value):
  """Random weights with `key` set to `value`, or left out if it is None."""
  flat = random_backbone()
  flat[key] = value
  return {k: v for k, v in flat.items() if v is not None}


def write_safetensors(path, state):
  safetensors.numpy.save_file(state, str(path))
  return path


def _safetensors_with_dtype(key, dtype):
  """A timm safetensors file whose `key` is stored as `dtype` (e.g. F8)."""
  state = numpy_vit.google_to_timm(random_backbone())
  header = {}
  offset, blobs = 0, []
  for name, value in state.items():
    data = value.tobytes() if name != key else b"\0" * value.size
    header[name] = {
        "dtype": "F32" if name != key else dtype,
        "shape": list(value.shape),
        "data_offsets": [offset, offset + len(data)]
    }
    offset += len(data)
    blobs.append(data)
  text = json.dumps(header).encode()
  return struct.pack("<Q", len(text)) + text + b"".join(blobs)


CLS = "cls"
POS = "Transformer/posembed_input/pos_embedding"
NAN_CLS = np.full((1, 1, 32), np.nan, np.float32)
KEY_CASES = {
    "npz wrong shape":
        (lambda p: write_npz(p / "w.npz", _changed(CLS, np.ones(
            (1, 33)))), r"wrongly shaped keys: cls (1, 33) (need (1, 1, 32))"),
    "npz declared giant shape":
        (lambda p: write_npz(p / "w.npz", _changed("embedding/bias", None), [
            ("embedding/bias", _npy_header_only((1 << 40,)))
        ]), "wrongly shaped keys: embedding/bias (1099511627776,)"),
    "npz int": (lambda p: write_npz(
        p / "w.npz", _changed(CLS, np.ones(
            (1, 1, 32), np.int64))), "not floating point: cls (int64)"),
    "npz object": (lambda p: write_npz(
        p / "w.npz", _changed(CLS, np.array([{
            "x": 1
        }], object))), "cls (object)"),
    "npz complex": (lambda p: write_npz(
        p / "w.npz", _changed(CLS, np.ones(
            (1, 1, 32), np.complex64))), "cls (complex64)"),
    "npz text":
        (lambda p: write_npz(p / "w.npz", _changed(CLS, np.array(["abc"]))),
         "cls (<U3)"),
    "npz nan": (lambda p: write_npz(p / "w.npz", _changed(CLS, NAN_CLS)),
                "NaN or infinite values (in float32) in 1 keys: cls"),
    "npz overflows float32": (lambda p: write_npz(
        p / "w.npz", _changed(POS, np.full(
            (1, 17, 32), 1e300))), f"infinite values (in float32) "
                              f"in 1 keys: {POS}"),
    "safetensors wrong shape":
        (lambda p: write_safetensors(
            p / "w.safetensors",
            dict(numpy_vit.google_to_timm(random_backbone()), **
                 {"norm.weight": np.ones(31, np.float32)})),
         "wrongly shaped keys: Transformer/encoder_norm/scale (31,)"),
    "safetensors int": (lambda p: write_safetensors(
        p / "w.safetensors",
        dict(numpy_vit.google_to_timm(random_backbone()), cls_token=np.ones(
            (1, 1, 32), np.int64))), "not floating point: cls_token (I64)"),
    "safetensors float8": (lambda p: (p / "w.safetensors").write_bytes(
        _safetensors_with_dtype("pos_embed", "F8_E4M3")) and p /
                           "w.safetensors", "pos_embed (F8_E4M3)"),
    "safetensors inf": (lambda p: write_safetensors(
        p / "w.safetensors",
        dict(numpy_vit.google_to_timm(random_backbone()), **
             {"blocks.1.mlp.fc2.bias": np.full(32, np.inf, np.float32)})),
                        "infinite values (in float32) in 1 keys: "
                        "Transformer/encoderblock_1/MlpBlock_3/Dense_1/bias"),
    "torch int": (lambda p: write_torch(
        p / "w.pth",
        timm_tensors(cls_token=tensor(np.ones(
            (1, 1, 32), np.int64), type_name="LongStorage"))),
                  "not floating point: cls_token (int64)"),
    "torch bool": (lambda p: write_torch(
        p / "w.pth",
        timm_tensors(cls_token=tensor(np.ones(
            (1, 1, 32), bool), type_name="BoolStorage"))), "cls_token (bool)"),
    "torch 2-d patch kernel": (lambda p: write_torch(
        p / "w.pth",
        timm_tensors(**{
            "patch_embed.proj.weight": tensor(np.ones((32, 48), np.float32))
        })), "patch_embed.proj.weight of shape (32, 48) does not map"),
    "torch scalar qkv": (lambda p: write_torch(
        p / "w.pth",
        timm_tensors(**{"blocks.0.attn.qkv.weight": tensor(np.float32(1))})),
                         "blocks.0.attn.qkv.weight of shape () does not map"),
    "torch wrong shape": (lambda p: write_torch(
        p / "w.pth",
        timm_tensors(**{"blocks.1.norm2.bias": tensor(np.ones(30, np.float32))})
    ), "wrongly shaped keys: Transformer/encoderblock_1/LayerNorm_2/bias "
                          "(30,)"),
    "torch nan": (lambda p: write_torch(
        p / "w.pth", timm_tensors(cls_token=tensor(NAN_CLS))),
                  "NaN or infinite values (in float32) in 1 keys: cls"),
}


@pytest.mark.parametrize("case", KEY_CASES)
def test_malformed_keys_are_named(tmp_path, case):
  write, expected = KEY_CASES[case]
  path = write(tmp_path)
  tracemalloc.start()
  try:
    with pytest.raises(MissingWeightsError) as e:
      weights.load_backbone(str(path), template())
    peak = tracemalloc.get_traced_memory()[1]
  finally:
    tracemalloc.stop()
  assert expected in str(e.value) and "\n" not in str(e.value)
  assert peak < 64 << 20, peak


# Downloads from a local server.


def preset_body():
  """A valid timm safetensors file for the tiny test model."""
  buffer = safetensors.numpy.save(numpy_vit.google_to_timm(random_backbone()))
  return buffer


@pytest.fixture
def server():
  with local_server.serve() as s:
    yield s


NAME = weights.PRESETS["sup21k"][1]
HTML = b"<!DOCTYPE html><html><body>Sign in to continue</body></html>"
DOWNLOAD_CASES = {
    "truncated, no length header":
        (lambda body: (200, {
            "Content-Length": None
        }, body[:len(body) // 2]),
         "cannot read weights from the download of 'sup21k'"),
    "html page": (lambda body: (200, {
        "Content-Type": "text/html"
    }, HTML), "the server sent an HTML page, not a weights file"),
    "html page as octet-stream": (lambda body: (200, {
        "Content-Type": "application/octet-stream"
    }, HTML), "cannot read weights from the download"),
    "junk bytes": (lambda body: (200, {}, os.urandom(5000)),
                   "cannot read weights from the download"),
    "malformed length header": (lambda body: (200, {
        "Content-Length": "12abc"
    }, body), "the server sent an invalid Content-Length '12abc'"),
    "length beyond the body": (lambda body: (200, {
        "Content-Length": len(body) + 1000
    }, body), f"got {len(preset_body())} of {len(preset_body()) + 1000} bytes"),
    "length below the body": (lambda body: (200, {
        "Content-Length": len(body) - 1000
    }, body), "cannot read weights from the download"),
    "not found": (lambda body: (404, {}, b"no"), "HTTP Error 404"),
    "another model":
        (lambda body:
         (200, {},
          safetensors.numpy.save(
              numpy_vit.google_to_timm(
                  random_backbone(variant=dict(TINY, hidden_size=16))))),
         "do not fit the model"),
}


@pytest.mark.parametrize("case", DOWNLOAD_CASES)
def test_bad_downloads_are_not_cached(tmp_path, server, case):
  respond, expected = DOWNLOAD_CASES[case]
  server.routes[f"/{NAME}"] = respond(preset_body())
  cache = tmp_path / "cache"
  start = time.perf_counter()
  with pytest.raises(MissingWeightsError) as e:
    weights.load_backbone("sup21k", template(), cache_dir=str(cache),
                          base_url=server.url)
  assert time.perf_counter() - start < 10
  assert expected in str(e.value) and "\n" not in str(e.value)
  assert "nothing was cached" in str(e.value)
  assert not os.listdir(cache)
  # The next run downloads again, and a good file is admitted.
  server.routes[f"/{NAME}"] = (200, {}, preset_body())
  weights.load_backbone("sup21k", template(), cache_dir=str(cache),
                        base_url=server.url)
  assert sorted(os.listdir(cache)) == [NAME, NAME + ".sha256"]


def test_cached_file_that_cannot_be_read_is_deleted(tmp_path, server):
  """A file placed in the cache by hand is checked on first use."""
  cache = tmp_path / "cache"
  cache.mkdir()
  (cache / NAME).write_bytes(b"<html>not weights</html>")
  with pytest.raises(
      MissingWeightsError, match="cannot read weights from "
      ".*the cached file was deleted, run again"):
    weights.load_backbone("sup21k", template(), cache_dir=str(cache),
                          base_url=server.url)
  assert not os.listdir(cache) and server.requests == []
  # NaN weights cannot be used by any model either.
  state = numpy_vit.google_to_timm(random_backbone())
  state["cls_token"] = NAN_CLS
  safetensors.numpy.save_file(state, str(cache / NAME))
  with pytest.raises(MissingWeightsError, match="NaN .* was deleted"):
    weights.load_backbone("sup21k", template(), cache_dir=str(cache))
  assert not os.listdir(cache)


def test_cached_file_for_another_model_is_kept(tmp_path, server):
  """Readable weights of another size are reported, not deleted."""
  server.routes[f"/{NAME}"] = (200, {}, preset_body())
  cache = tmp_path / "cache"
  weights.load_backbone("sup21k", template(), cache_dir=str(cache),
                        base_url=server.url)
  other = weights.backbone_template(dict(TINY, num_layers=3), IMAGE)
  with pytest.raises(MissingWeightsError,
                     match="missing keys: Transformer/encoderblock_2/") as e:
    weights.load_backbone("sup21k", other, cache_dir=str(cache))
  assert "deleted" not in str(e.value)
  assert sorted(os.listdir(cache)) == [NAME, NAME + ".sha256"]


def test_orig_in21k_loads_without_its_representation_layer(tmp_path, server):
  """HiDe-Prompt's backbone: the original ImageNet-21k file, whose
  `pre_logits` layer (and head, if any) are not backbone."""
  state = numpy_vit.google_to_timm(random_backbone())
  width = TINY["hidden_size"]
  state.update({
      "pre_logits.fc.weight": np.ones((width, width), np.float32),
      "pre_logits.fc.bias": np.zeros(width, np.float32)
  })
  name = weights.PRESETS["orig_in21k"][1]
  server.routes[f"/{name}"] = (200, {}, safetensors.numpy.save(state))
  cache = tmp_path / "cache"
  loaded = weights.load_backbone("orig_in21k", template(), cache_dir=str(cache),
                                 base_url=server.url)
  want = random_backbone()
  assert flatten(loaded).keys() == want.keys()
  for key, value in flatten(loaded).items():
    np.testing.assert_allclose(value, want[key], rtol=1e-6, err_msg=key)
  assert sorted(os.listdir(cache)) == [name, name + ".sha256"]


def test_unwritable_cache_is_one_clear_error(tmp_path, server):
  (tmp_path / "afile").write_text("x")
  with pytest.raises(
      MissingWeightsError, match="cannot write to the weights "
      "cache .*afile/cache .*SMOPE_JAX_CACHE"):
    weights.load_backbone("sup21k", template(),
                          cache_dir=str(tmp_path / "afile" / "cache"),
                          base_url=server.url)
  assert server.requests == []


# Through the command line, where the user meets them.


def _demo_template():
  """The backbone template of configs/demo.py, which the CLI runs use."""
  spec = importlib.util.spec_from_file_location(
      "demo_config", os.path.join(helpers.REPO, "configs", "demo.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  return weights.backbone_template(configuration.model_dims(config),
                                   config.image_size)


def _demo_weights():
  rng = np.random.default_rng(0)
  return {
      k: rng.normal(size=v.shape).astype(np.float32) * 0.1
      for k, v in flatten(_demo_template()).items()
  }


def _demo_timm():
  return {
      k: tensor(v) for k, v in numpy_vit.google_to_timm(_demo_weights()).items()
  }


def _file_case(write, *expected):
  """A CLI case: `--config.pretrained` names the file `write(dir)` made."""

  def setup(directory, unused_server):
    return str(write(directory)), {}

  return setup, expected


def _download_case(response, *expected):
  """A CLI case: the preset sup21k comes from the local server, from a
  mirror directory of the case's own."""

  def setup(directory, server):
    server.routes[f"/{directory.name}/{NAME}"] = response
    return "sup21k", {"SMOPE_JAX_WEIGHTS_URL": f"{server.url}/{directory.name}"}

  return setup, expected


def _demo_npz(directory, **changes):
  return write_npz(directory / "w.npz", dict(_demo_weights(), **changes))


def _demo_safetensors(directory, **changes):
  state = dict(numpy_vit.google_to_timm(_demo_weights()), **changes)
  return write_safetensors(directory / "w.safetensors", state)


def _demo_torch(directory, **changes):
  return write_torch(directory / "w.pth", dict(_demo_timm(), **changes))


ONE_64 = np.ones(64, np.float32)
# Each case starts `main` (about 13 s of CPU, mostly start-up), so the
# default suite runs a few kinds and the `slow` suite the rest.
CLI_CASES = {
    "cyclic pickle":
        _file_case(lambda d: write_torch(d / "w.pth", _cyclic_dict()), "cycle"),
    "nan weights":
        _file_case(
            lambda d: _demo_npz(d, cls=np.full((1, 1, 64), np.nan, np.float32)),
            "NaN or infinite values", "cls"),
    "download without length":
        _download_case((200, {
            "Content-Length": None
        }, b"\x00" * 3000), "download of 'sup21k'", "nothing was cached"),
}
SLOW_CLI_CASES = {
    "stride-0 giant tensor":
        _file_case(
            lambda d: _demo_torch(d, cls_token=tensor(ONE, (1 << 40,), (0,))),
            "cls_token of size (1099511627776,)"),
    "unknown storage type":
        _file_case(
            lambda d: _demo_torch(
                d, cls_token=tensor(ONE, type_name="QInt8Storage")),
            "torch.QInt8Storage"),
    "deep pickle":
        _file_case(
            lambda d: write_torch(d / "w.pth", raw_pickle=_deep_pickle()),
            "nested more than"),
    "storage is a list":
        _file_case(
            lambda d: _demo_torch(
                d, cls_token=_rebuild_tensor_v2([0.0] * 64, 0, (1, 1, 64),
                                                (64, 64, 1), False, OrderedDict(
                                                ))), "not by a storage"),
    "npz wrong shape":
        _file_case(lambda d: _demo_npz(d, cls=np.ones((1, 64), np.float32)),
                   "wrongly shaped keys: cls (1, 64)"),
    "npz wrong dtype":
        _file_case(
            lambda d: _demo_npz(d, **{"embedding/bias": np.ones(64, np.int32)}),
            "embedding/bias (int32)"),
    "safetensors wrong shape":
        _file_case(lambda d: _demo_safetensors(d, **{"norm.bias": ONE_64[:63]}),
                   "Transformer/encoder_norm/bias (63,)"),
    "safetensors wrong dtype":
        _file_case(
            lambda d: _demo_safetensors(d, cls_token=np.ones(
                (1, 1, 64), np.int8)), "cls_token (I8)"),
    "torch wrong shape":
        _file_case(
            lambda d: _demo_torch(d, **{"norm.weight": tensor(ONE_64[:60])}),
            "Transformer/encoder_norm/scale (60,)"),
    "torch wrong dtype":
        _file_case(
            lambda d: _demo_torch(
                d, **{
                    "norm.bias":
                        tensor(np.ones(64, np.int16), type_name="ShortStorage")
                }), "norm.bias (int16)"),
    "html page":
        _download_case((200, {
            "Content-Type": "text/html; charset=utf-8"
        }, HTML), "HTML page", "nothing was cached"),
    "bad length header":
        _download_case((200, {
            "Content-Length": "-5"
        }, b"\x00" * 3000), "invalid Content-Length", "nothing was cached"),
}


def _run_main(case, directory, server):
  setup, _ = case
  directory.mkdir()
  source, env = setup(directory, server)
  start = time.perf_counter()
  result = helpers.run_module(
      "main", "--config=configs/demo.py", f"--config.pretrained={source}",
      f"--workdir={directory / 'run'}", env={
          "SMOPE_JAX_CACHE": str(directory / "cache"),
          **env
      })
  return result, time.perf_counter() - start, directory / "cache"


def _run_all(cases, tmp_path_factory):
  """Runs `main` once per case, two at a time."""
  root = tmp_path_factory.mktemp("cli")
  with local_server.serve() as server, \
      concurrent.futures.ThreadPoolExecutor(2) as pool:
    futures = {
        name: pool.submit(_run_main, case, root / str(i), server)
        for i, (name, case) in enumerate(cases.items())
    }
    return {name: future.result() for name, future in futures.items()}


@pytest.fixture(scope="module")
def cli_results(tmp_path_factory):
  return _run_all(CLI_CASES, tmp_path_factory)


@pytest.fixture(scope="module")
def slow_cli_results(tmp_path_factory):
  return _run_all(SLOW_CLI_CASES, tmp_path_factory)


def _check_cli(results, cases, case):
  result, seconds, cache = results[case]
  line = helpers.assert_one_line_error(result, *cases[case][1])
  assert not cache.exists() or not os.listdir(cache), line
  assert seconds < 120, seconds


@pytest.mark.parametrize("case", CLI_CASES)
def test_hostile_weights_through_main(cli_results, case):
  _check_cli(cli_results, CLI_CASES, case)


@pytest.mark.slow
@pytest.mark.parametrize("case", SLOW_CLI_CASES)
def test_more_hostile_weights_through_main(slow_cli_results, case):
  _check_cli(slow_cli_results, SLOW_CLI_CASES, case)
