"""Pretrained weights: every file layout loads into a model that computes the
same function as an independent NumPy ViT, and bad sources fail loudly.

The torch-format files are real torch.save output committed under
tests/fixtures (see make_torch_fixtures.py there); torch is needed only to
check that a fresh torch writes what those fixtures hold.
"""

import hashlib
import json
import os
import pickle
import socket
import subprocess
import sys
import zipfile

from flax import traverse_util
import jax
import numpy as np
import pytest
import safetensors.numpy

from smope_jax import weights
from smope_jax.errors import MissingWeightsError
from smope_jax.models import vit
from tests import helpers
from tests import numpy_vit
from tests.fixtures import local_server

FIXTURES = os.path.join(helpers.REPO, "tests", "fixtures")
TINY = dict(hidden_size=32, num_layers=2, num_heads=4, mlp_dim=64, patch_size=4)
IMAGE, CLASSES = 16, 5

to_timm = numpy_vit.google_to_timm
unflatten = numpy_vit.unflatten


def fixture(name):
  return os.path.join(FIXTURES, name)


def reference():
  """(Google-layout weights, images, torch's pre-logits) from the fixture."""
  with np.load(fixture("tiny_vit_reference.npz")) as data:
    weights = {
        k[len("weights/"):]: data[k]
        for k in data.files
        if k.startswith("weights/")
    }
    return weights, data["images"], data["pre_logits"]


def flatten(tree):
  """Nested dict -> {'a/b/c': leaf}, the Google checkpoint key names."""
  return traverse_util.flatten_dict(tree, sep="/")


def random_backbone(seed=0, variant=None, image_size=IMAGE):
  """Random weights in the Google layout, with realistic scales."""
  rng = np.random.default_rng(seed)
  template = weights.backbone_template(variant or TINY, image_size)
  return {
      k: (rng.normal(size=s.shape) *
          (0.2 if k.endswith("kernel") else 0.5)).astype(np.float32) +
         (1.0 if k.endswith("scale") else 0.0)
      for k, s in flatten(template).items()
  }


def random_head():
  rng = np.random.default_rng(1)
  return {"kernel": rng.normal(size=(32, CLASSES)), "bias": rng.normal(size=5)}


def assert_close(actual, expected, tol=1e-5):
  actual, expected = np.asarray(actual), np.asarray(expected)
  assert actual.shape == expected.shape
  err = np.max(np.abs(actual - expected)) / np.max(np.abs(expected))
  assert err < tol, f"relative error {err}"


def template(image_size=IMAGE):
  return weights.backbone_template(TINY, image_size)


def plain_model():
  """The tiny ViT without prompts."""
  return vit.VisionTransformer(num_classes=CLASSES, **TINY)


def check_loaded(loaded, flat, images=None):
  """The loaded tree is the template's, with the source's float32 values,
  and with it the Flax model computes what the NumPy ViT does."""
  got = flatten(loaded)
  assert got.keys() == flatten(template()).keys()
  for key, value in got.items():
    assert value.dtype == np.float32
    np.testing.assert_array_equal(value, flat[key], err_msg=key)
  if images is None:
    return
  head = random_head()
  params = dict(loaded, head=jax.tree.map(np.float32, head))
  out = plain_model().apply({"params": params}, images, mode="plain")
  want_pre, want_logits = numpy_vit.forward(dict(unflatten(flat), head=head),
                                            images)
  assert_close(out["pre_logits"], want_pre)
  assert_close(out["logits"], want_logits)


def test_template_matches_flax_model_and_fixture():
  images = np.zeros((1, IMAGE, IMAGE, 3), np.float32)
  shapes = jax.eval_shape(lambda k: plain_model().init(k, images, mode="plain"),
                          jax.random.key(0))["params"]
  want = {
      k: v.shape
      for k, v in flatten(dict(shapes)).items()
      if not k.startswith("head/")
  }
  assert want == {k: v.shape for k, v in flatten(template()).items()}
  assert want == {k: v.shape for k, v in reference()[0].items()}
  b16 = flatten(weights.backbone_template("B/16", 224))
  assert sum(np.prod(v.shape) for v in b16.values()) == 85_798_656
  assert b16["Transformer/posembed_input/pos_embedding"].shape[1] == 197


def test_template_is_the_google_vit_layout():
  """Pins the names, shapes and dtype every source is read into (B/16)."""
  d, h, m = 768, 12, 3072
  block = {
      "LayerNorm_0/scale": (d,),
      "LayerNorm_0/bias": (d,),
      "LayerNorm_2/scale": (d,),
      "LayerNorm_2/bias": (d,),
      "MlpBlock_3/Dense_0/kernel": (d, m),
      "MlpBlock_3/Dense_0/bias": (m,),
      "MlpBlock_3/Dense_1/kernel": (m, d),
      "MlpBlock_3/Dense_1/bias": (d,),
      "MultiHeadDotProductAttention_1/out/kernel": (h, d // h, d),
      "MultiHeadDotProductAttention_1/out/bias": (d,)
  }
  for proj in ("query", "key", "value"):
    block[f"MultiHeadDotProductAttention_1/{proj}/kernel"] = (d, h, d // h)
    block[f"MultiHeadDotProductAttention_1/{proj}/bias"] = (h, d // h)
  want = {
      "cls": (1, 1, d),
      "embedding/kernel": (16, 16, 3, d),
      "embedding/bias": (d,),
      "Transformer/encoder_norm/scale": (d,),
      "Transformer/encoder_norm/bias": (d,),
      "Transformer/posembed_input/pos_embedding": (1, 1 + 14 * 14, d)
  }
  want.update({
      f"Transformer/encoderblock_{i}/{k}": shape for i in range(12)
      for k, shape in block.items()
  })
  got = flatten(weights.backbone_template("B/16", 224))
  assert {k: v.shape for k, v in got.items()} == want
  assert {v.dtype for v in got.values()} == {np.dtype(np.float32)}


def test_numpy_reference_computes_what_torch_computed():
  """Pins the NumPy ViT and the timm layout to the pre-logits that torch
  computed from the same weights when the fixtures were written."""
  weights, images, torch_pre_logits = reference()
  got, _ = numpy_vit.forward(dict(unflatten(weights), head=random_head()),
                             images)
  assert_close(got, torch_pre_logits, tol=1e-10)


def test_timm_mapping_round_trips():
  flat = reference()[0]
  back = weights.timm_to_google(to_timm(flat), num_heads=4)
  assert back.keys() == flat.keys()
  for key in flat:
    np.testing.assert_array_equal(back[key], flat[key], err_msg=key)


def write_npz(tmp_path, flat):
  np.savez(
      tmp_path / "vit.npz", **flat, **{
          "head/kernel": np.zeros((32, 7)),
          "head/bias": np.zeros(7),
          "pre_logits/kernel": np.zeros((32, 32))
      })
  return tmp_path / "vit.npz"


def write_timm(path, flat=None, **extra):
  safetensors.numpy.save_file(dict(to_timm(flat or random_backbone()), **extra),
                              str(path))
  return path


def write_safetensors(tmp_path, flat):
  return write_timm(
      tmp_path / "model.safetensors", flat, **{
          "head.weight": np.ones((7, 32), np.float32),
          "head.bias": np.ones(7, np.float32)
      })


def torch_timm_bin(unused_tmp_path, unused_flat):
  """A timm / Hugging Face pytorch_model.bin written by torch."""
  return fixture("tiny_vit_timm.bin")


def torch_ibot(unused_tmp_path, unused_flat):
  """iBOT's released backbone: a wrapped, DDP-prefixed student."""
  return fixture("tiny_vit_ibot.pth")


def torch_dino_checkpoint(unused_tmp_path, unused_flat):
  """A DINO / iBOT training checkpoint: the teacher is what they evaluate."""
  return fixture("tiny_vit_dino.pth")


def write_converted(tmp_path, unused_flat):
  """smope_jax.convert's output directory (its CLI is tested below)."""
  params = weights.load_backbone(fixture("tiny_vit_timm.bin"), template())
  info = weights.save_backbone(params, str(tmp_path / "out"), source="x",
                               model="tiny", image_size=IMAGE)
  assert json.loads((tmp_path / "out" / "info.json").read_text()) == info
  assert sorted(os.listdir(tmp_path / "out")) == ["backbone.npz", "info.json"]
  return tmp_path / "out"


@pytest.mark.parametrize("source", [
    write_npz, write_safetensors, torch_timm_bin, torch_ibot,
    torch_dino_checkpoint, write_converted
])
def test_file_layouts_load_the_same_function(tmp_path, source):
  flat, images, _ = reference()
  loaded = weights.load_backbone(str(source(tmp_path, flat)), template())
  check_loaded(loaded, flat, images)


def test_torch_reader_dtypes_and_views():
  got = weights.read_torch(fixture("dtypes_and_views.pth"))["nested"][0]
  with np.load(fixture("dtypes_and_views.npz")) as want:
    for key, value in got.items():
      np.testing.assert_array_equal(np.float32(value), want[key], err_msg=key)
      assert value.dtype.name == str(want[f"dtype/{key}"]), key
  assert got.keys() == {"t", "view", "half", "bf16", "long", "empty", "param"}


def read_all(path):
  """A torch file's contents, or its reference npz's, as comparable data."""
  if path.endswith(".npz"):
    with np.load(path) as data:
      return {k: data[k] for k in data.files}
  return weights.read_torch(path)


def assert_same_tree(a, b, where=""):
  assert type(a) is type(b), where
  if isinstance(a, dict):
    assert list(a) == list(b), where
    for key in a:
      assert_same_tree(a[key], b[key], f"{where}/{key}")
  elif isinstance(a, (list, tuple)):
    assert len(a) == len(b), where
    for i, (x, y) in enumerate(zip(a, b)):
      assert_same_tree(x, y, f"{where}/{i}")
  elif isinstance(a, np.ndarray):
    assert a.dtype == b.dtype and a.shape == b.shape, where
    if a.dtype == np.float64:  # Torch's forward: allow another CPU's maths.
      np.testing.assert_allclose(a, b, rtol=1e-9, err_msg=where)
    else:
      np.testing.assert_array_equal(a, b, err_msg=where)
  else:
    assert a == b, where


def test_fresh_torch_files_match_the_fixtures(tmp_path):
  """Where torch is installed: what it writes today reads like the
  committed files, so the fixtures still stand for real torch output."""
  pytest.importorskip("torch")
  from tests.fixtures import make_torch_fixtures  # pylint: disable=g-import-not-at-top
  make_torch_fixtures.write_fixtures(str(tmp_path))
  assert len(os.listdir(tmp_path)) == 7
  for name in os.listdir(tmp_path):
    if name == "args_namespace.pth":
      continue
    assert_same_tree(read_all(str(tmp_path / name)), read_all(fixture(name)),
                     name)


# Runs the converter with files limited in size, like a nearly full disk
# (writing past the limit fails with EFBIG instead of ENOSPC).
_LIMITED = ("import resource, runpy, signal, sys; "
            "signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
            "resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv.pop(1)),) "
            "* 2); runpy.run_module('smope_jax.convert', run_name='__main__')")


def run_convert(*args, env=None, file_size_limit=None):
  if not file_size_limit:
    return helpers.run_module("convert", *args, env=env, timeout=120)
  return subprocess.run(
      [sys.executable, "-c", _LIMITED,
       str(file_size_limit), *args], capture_output=True, text=True,
      timeout=120, check=False, cwd=helpers.REPO,
      env=dict(os.environ, PYTHONPATH=helpers.REPO, **(env or {})))


def test_convert_cli(tmp_path):
  flat = random_backbone(variant="Ti/16", image_size=32)
  write_timm(tmp_path / "ti.safetensors", flat)
  result = run_convert(f"--input={tmp_path}/ti.safetensors", "--model=Ti/16",
                       "--image_size=32", f"--output={tmp_path}/out")
  assert result.returncode == 0, result.stderr
  out, ti = tmp_path / "out", weights.backbone_template("Ti/16", 32)
  assert sorted(os.listdir(out)) == ["backbone.npz", "info.json"]
  assert json.loads((out / "info.json").read_text()) == dict(
      source=str(tmp_path / "ti.safetensors"), model="Ti/16", image_size=32,
      sha256=hashlib.sha256((out / "backbone.npz").read_bytes()).hexdigest())
  loaded = flatten(weights.load_backbone(str(out), ti))
  for key, value in flat.items():
    np.testing.assert_array_equal(loaded[key], value, err_msg=key)
  with open(out / "backbone.npz", "r+b") as f:
    f.seek(1000)
    f.write(b"\0" * 8)
  with pytest.raises(MissingWeightsError, match="sha256 in its info.json"):
    weights.load_backbone(str(out), ti)
  # Weights that do not fit: one line, and no output directory is left.
  result = run_convert(f"--input={tmp_path}/ti.safetensors", "--model=S/16",
                       f"--output={tmp_path}/bad/dir")
  helpers.assert_one_line_error(result, "wrongly shaped")
  assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize("flags, expected", [
    ([], "--input and --output must be given"),
    (["--input=sup1k"], "--output must be given"),
    (["--input=sup1k", "--output={out}", "--model=X/9"], "--model=X/9"),
    (["--input=sup1k", "--output={out}", "--image_size=0"], "[1, 4096]"),
    (["--input=sup1k", "--output={out}", "--image_size=100"
     ], "not a multiple of the patch size"),
    (["--input=sup1k", "--output={out}", "--nosuch=1"], "nosuch"),
    (["--input=sup1k", "--output={out}", "stray"], "unexpected arguments"),
    (["--input={tmp}/none.pth", "--output={out}"], "neither a file"),
    (["--input=sup1k", "--output={tmp}/afile/out"], "cannot be written"),
    (["--input=sup1k", "--output={tmp}/afile"], "is a file"),
])
def test_convert_flag_and_output_errors_come_first(tmp_path, flags, expected):
  """One line and exit status 2 before any work: the preset's mirror is
  never asked for the file, and nothing is written."""
  (tmp_path / "afile").write_text("x")
  with local_server.serve() as server:
    result = run_convert(
        *(f.format(tmp=tmp_path, out=tmp_path / "out") for f in flags),
        env=dict(SMOPE_JAX_WEIGHTS_URL=server.url,
                 SMOPE_JAX_CACHE=str(tmp_path / "cache")))
    assert server.requests == []
  helpers.assert_one_line_error(result, expected)
  assert sorted(os.listdir(tmp_path)) == ["afile"]


def test_convert_on_a_full_disk_leaves_the_old_output(tmp_path):
  out = tmp_path / "out"
  params = weights.load_backbone(fixture("tiny_vit_timm.bin"), template())
  weights.save_backbone(params, str(out), source="old", model="tiny",
                        image_size=IMAGE)
  before = {n: (out / n).read_bytes() for n in os.listdir(out)}
  write_timm(tmp_path / "ti.safetensors",
             random_backbone(variant="Ti/16", image_size=32))
  result = run_convert(f"--input={tmp_path}/ti.safetensors", "--model=Ti/16",
                       "--image_size=32", f"--output={out}",
                       file_size_limit=1 << 16)
  helpers.assert_one_line_error(result, f"cannot write {out}", "--output")
  assert {n: (out / n).read_bytes() for n in os.listdir(out)} == before


@pytest.mark.parametrize("change, message", [
    (lambda f: f.pop("Transformer/encoderblock_1/LayerNorm_2/bias"),
     "missing keys: Transformer/encoderblock_1/LayerNorm_2/bias"),
    (lambda f: f.update({"fc_norm/scale": np.ones(32)}),
     "unexpected keys: fc_norm/scale"),
    (lambda f: f.update({"embedding/bias": np.ones(31)}),
     r"wrongly shaped keys: embedding/bias \(31,\)"),
])
def test_bad_keys_are_named(tmp_path, change, message):
  flat = random_backbone()
  change(flat)
  np.savez(tmp_path / "vit.npz", **flat)
  with pytest.raises(MissingWeightsError, match=message):
    weights.load_backbone(str(tmp_path / "vit.npz"), template())


def test_unknown_timm_key_and_wrong_head_count(tmp_path):
  path = write_timm(tmp_path / "a.safetensors",
                    **{"fc_norm.weight": np.ones(32, np.float32)})
  with pytest.raises(MissingWeightsError, match="unexpected keys: fc_norm"):
    weights.load_backbone(str(path), template())
  three_heads = weights.backbone_template(dict(TINY, num_heads=3), IMAGE)
  with pytest.raises(
      MissingWeightsError, match=r"blocks\.0\.attn\.\S+ of "
      "shape .* does not map to a ViT with 3 heads"):
    weights.load_backbone(str(path), three_heads)


def test_missing_source_and_unreadable_files(tmp_path):
  with pytest.raises(MissingWeightsError, match="preset"):
    weights.load_backbone(str(tmp_path / "nope.npz"), template())
  (tmp_path / "w.h5").write_bytes(b"x")
  with pytest.raises(MissingWeightsError, match="unknown weights format"):
    weights.load_backbone(str(tmp_path / "w.h5"), template())
  (tmp_path / "emptydir").mkdir()
  for name in ("w.npz", "w.safetensors", "w.pth", "emptydir"):
    if name != "emptydir":
      (tmp_path / name).write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(MissingWeightsError, match="cannot read|truncated"):
      weights.load_backbone(str(tmp_path / name), template())


def test_position_embedding_resize(tmp_path):
  flat = random_backbone()
  pos = flat["Transformer/posembed_input/pos_embedding"]
  ramp = np.linspace(0, 1, 4)  # A ramp stays monotone with the same ends.
  pos[0, 1:] = (ramp[:, None] + 2 * ramp[None, :]).reshape(16, 1)
  np.savez(tmp_path / "vit.npz", **flat)
  for size, side in ((32, 8), (24, 6), (8, 2)):
    got = weights.load_backbone(
        str(tmp_path / "vit.npz"),
        template(size))["Transformer"]["posembed_input"]["pos_embedding"]
    assert got.shape == (1, 1 + side * side, 32)
    np.testing.assert_array_equal(got[0, 0], pos[0, 0])  # CLS kept.
    grid = got[0, 1:].reshape(side, side, 32)
    np.testing.assert_allclose(grid, np.broadcast_to(grid[..., :1], grid.shape),
                               rtol=1e-6)
    assert np.all(np.diff(grid, axis=0) > 0) and np.all(
        np.diff(grid, axis=1) > 0)
    if side > 4:
      assert grid[0, 0, 0] == 0 and grid[-1, -1, 0] == pytest.approx(3)
  # A grid that is not square cannot be resized: the shape is reported.
  np.savez(
      tmp_path / "odd.npz",
      **dict(
          flat,
          **{"Transformer/posembed_input/pos_embedding": np.ones((1, 15, 32))}))
  with pytest.raises(MissingWeightsError, match=r"pos_embedding \(1, 15, 32\)"):
    weights.load_backbone(str(tmp_path / "odd.npz"), template())


@pytest.fixture
def server():
  with local_server.serve() as s:
    yield s


def test_preset_download_cache_and_reuse(tmp_path, server):
  flat = random_backbone()
  body = write_timm(tmp_path / "src.safetensors", flat).read_bytes()
  name, cache = weights.PRESETS["sup21k"][1], tmp_path / "cache"
  server.routes[f"/{name}"] = (200, {}, body)
  for _ in range(2):
    check_loaded(
        weights.load_backbone("sup21k", template(), cache_dir=str(cache),
                              base_url=server.url + "/"), flat)
  assert server.requests == [f"/{name}"]
  assert sorted(os.listdir(cache)) == [name, f"{name}.sha256"]
  assert (
      cache /
      f"{name}.sha256").read_text().strip() == hashlib.sha256(body).hexdigest()
  # A corrupted cached file is detected, reported and removed.
  with open(cache / name, "r+b") as f:
    f.seek(len(body) // 2)
    f.write(b"\xff" * 4)
  with pytest.raises(MissingWeightsError, match="corrupted") as e:
    weights.load_backbone("sup21k", template(), cache_dir=str(cache),
                          base_url=server.url)
  assert str(cache / name) in str(e.value) and "was deleted" in str(e.value)
  assert not os.listdir(cache)


def test_preset_env_overrides_and_hf_etag(tmp_path, server, monkeypatch):
  flat = random_backbone()
  body = write_timm(tmp_path / "src.safetensors", flat).read_bytes()
  name = weights.PRESETS["dino1k"][1]
  # Like huggingface.co: a redirect carrying the LFS sha256, then the bytes.
  etag = {"X-Linked-Etag": f'"{hashlib.sha256(body).hexdigest()}"'}
  server.routes[f"/{name}"] = (302, dict(etag, Location="/cdn/blob"), b"")
  server.routes["/cdn/blob"] = (200, {}, body)
  monkeypatch.setenv("SMOPE_JAX_WEIGHTS_URL", server.url)
  monkeypatch.setenv("SMOPE_JAX_CACHE", str(tmp_path / "env_cache"))
  check_loaded(weights.load_backbone("dino1k", template()), flat)
  assert (tmp_path / "env_cache" / name).exists()
  # A download that does not match the announced digest is not cached.
  server.routes[f"/{name}"][1]["X-Linked-Etag"] = '"' + "0" * 64 + '"'
  with pytest.raises(MissingWeightsError, match="announced"):
    weights.load_backbone("dino1k", template(),
                          cache_dir=str(tmp_path / "other"))
  assert not os.listdir(tmp_path / "other")


def test_offline_preset_names_cache_path(tmp_path):
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    url = "http://127.0.0.1:%d" % s.getsockname()[1]
  cache = tmp_path / "cache"
  with pytest.raises(MissingWeightsError) as e:
    weights.load_backbone("ibot21k", template(), cache_dir=str(cache),
                          base_url=url)
  for part in ("'ibot21k'", url + "/", "--config.pretrained=",
               str(cache / weights.PRESETS["ibot21k"][1])):
    assert part in str(e.value)
  assert not os.listdir(cache)


class _Evil:

  def __init__(self, target):
    self.target = target

  def __reduce__(self):
    return os.mkdir, (self.target,)


def test_torch_reader_refuses_foreign_globals(tmp_path):
  target = str(tmp_path / "pwned")
  with zipfile.ZipFile(tmp_path / "evil.pth", "w") as zf:
    zf.writestr("evil/data.pkl", pickle.dumps({"w": _Evil(target)}))
  with pytest.raises(MissingWeightsError, match="refusing to unpickle"):
    weights.load_backbone(str(tmp_path / "evil.pth"), template())
  assert not os.path.exists(target)
  with pytest.raises(MissingWeightsError, match="argparse.Namespace"):
    weights.read_torch(fixture("args_namespace.pth"))
