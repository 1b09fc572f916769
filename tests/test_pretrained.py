"""Pretrained weights: every file layout loads into a model that computes the
same function as an independent NumPy ViT, and bad sources fail loudly."""

import argparse
import collections
import functools
import hashlib
import http.server
import json
import os
import pickle
import socket
import subprocess
import sys
import threading
import types
import zipfile

import jax
import numpy as np
import pytest
import safetensors.numpy

from smope_jax import convert
from smope_jax import pretrained
from smope_jax.errors import MissingWeightsError
from smope_jax.models import vit
from tests import numpy_vit

to_timm = numpy_vit.google_to_timm
unflatten = numpy_vit.unflatten

TINY = dict(hidden_size=32, num_layers=2, num_heads=4, mlp_dim=64, patch_size=4)
IMAGE, CLASSES = 16, 5


def random_backbone(seed=0, variant=None, image_size=IMAGE):
  """Random weights in the Google layout, with realistic scales."""
  rng = np.random.default_rng(seed)
  template = pretrained.backbone_template(variant or TINY, image_size)
  return {k: (rng.normal(size=s.shape) * (0.2 if k.endswith('kernel') else
                                          0.5)).astype(np.float32)
             + (1.0 if k.endswith('scale') else 0.0)
          for k, s in pretrained.flatten(template).items()}


def random_head():
  rng = np.random.default_rng(1)
  return {'kernel': rng.normal(size=(32, CLASSES)), 'bias': rng.normal(size=5)}


def torch_state(state, prefix=''):
  torch = pytest.importorskip('torch')
  return collections.OrderedDict(
      (prefix + k, torch.from_numpy(np.array(v))) for k, v in state.items())


def assert_close(actual, expected, tol=1e-5):
  actual, expected = np.asarray(actual), np.asarray(expected)
  assert actual.shape == expected.shape
  err = np.max(np.abs(actual - expected)) / np.max(np.abs(expected))
  assert err < tol, f'relative error {err}'


@pytest.fixture(scope='module')
def images():
  return np.random.default_rng(2).uniform(size=(3, IMAGE, IMAGE, 3)).astype(
      np.float32)


def check_loaded(loaded, flat, images=None):
  """The loaded tree is the template's, with the source's float32 values,
  and with it the Flax model computes what the NumPy ViT does."""
  got = pretrained.flatten(loaded)
  assert got.keys() == pretrained.flatten(template()).keys()
  for key, value in got.items():
    assert value.dtype == np.float32
    np.testing.assert_array_equal(value, flat[key], err_msg=key)
  if images is None:
    return
  head = random_head()
  model = vit.SMoPEViT(num_classes=CLASSES, num_prompted_layers=0, **TINY)
  params = dict(loaded, head=jax.tree.map(np.float32, head))
  out = model.apply({'params': params}, images, mode='plain')
  want_pre, want_logits = numpy_vit.forward(dict(unflatten(flat), head=head),
                                            images)
  assert_close(out['pre_logits'], want_pre)
  assert_close(out['logits'], want_logits)


def template(image_size=IMAGE):
  return pretrained.backbone_template(TINY, image_size)


def test_template_matches_flax_model():
  model = vit.SMoPEViT(num_classes=CLASSES, num_prompted_layers=0, **TINY)
  init = functools.partial(model.init, mode='plain')
  shapes = jax.eval_shape(init, jax.random.key(0),
                          np.zeros((1, IMAGE, IMAGE, 3), np.float32))['params']
  want = {k: v.shape for k, v in pretrained.flatten(dict(shapes)).items()
          if not k.startswith('head/')}
  assert want == {k: v.shape for k, v in pretrained.flatten(template()).items()}
  b16 = pretrained.flatten(pretrained.backbone_template('B/16', 224))
  assert sum(np.prod(v.shape) for v in b16.values()) == 85_798_656
  assert b16['Transformer/posembed_input/pos_embedding'].shape[1] == 197


def torch_timm_forward(state, images, num_heads):
  """timm's ViT forward written with torch ops on a timm state dict."""
  torch = pytest.importorskip('torch')
  f = torch.nn.functional
  s = {k: torch.from_numpy(np.asarray(v, np.float64)) for k, v in state.items()}
  x = torch.from_numpy(np.asarray(images, np.float64)).permute(0, 3, 1, 2)
  w = s['patch_embed.proj.weight']
  x = f.conv2d(x, w, s['patch_embed.proj.bias'], stride=w.shape[-1])
  x = x.flatten(2).transpose(1, 2)
  b, n, d = x.shape[0], x.shape[1] + 1, x.shape[2]
  x = torch.cat([s['cls_token'].expand(b, -1, -1), x], 1) + s['pos_embed']
  norm = lambda x, name: f.layer_norm(  # noqa: E731
      x, (d,), s[name + '.weight'], s[name + '.bias'], eps=1e-6)
  linear = lambda x, name: f.linear(  # noqa: E731
      x, s[name + '.weight'], s[name + '.bias'])
  i = 0
  while f'blocks.{i}.norm1.weight' in s:
    qkv = linear(norm(x, f'blocks.{i}.norm1'), f'blocks.{i}.attn.qkv')
    q, k, v = qkv.reshape(b, n, 3, num_heads, -1).permute(2, 0, 3, 1, 4)
    y = f.scaled_dot_product_attention(q, k, v).transpose(1, 2)
    x = x + linear(y.reshape(b, n, d), f'blocks.{i}.attn.proj')
    y = f.gelu(linear(norm(x, f'blocks.{i}.norm2'), f'blocks.{i}.mlp.fc1'))
    x = x + linear(y, f'blocks.{i}.mlp.fc2')
    i += 1
  return norm(x, 'norm')[:, 0].numpy()


def test_timm_mapping_and_numpy_reference_match_torch(images):
  """Pins the Google <-> timm layouts to what torch computes with them."""
  flat = random_backbone()
  back = pretrained.timm_to_google(to_timm(flat), num_heads=4)
  assert back.keys() == flat.keys()
  for key in flat:
    np.testing.assert_array_equal(back[key], flat[key], err_msg=key)
  want = torch_timm_forward(to_timm(flat), images, num_heads=4)
  got, _ = numpy_vit.forward(dict(unflatten(flat), head=random_head()), images)
  assert_close(got, want, tol=1e-10)


def write_npz(tmp_path, flat):
  np.savez(tmp_path / 'vit.npz', **flat, **{
      'head/kernel': np.zeros((32, 7)), 'head/bias': np.zeros(7),
      'pre_logits/kernel': np.zeros((32, 32))})
  return tmp_path / 'vit.npz'


def write_timm(path, flat=None, **extra):
  safetensors.numpy.save_file(dict(to_timm(flat or random_backbone()),
                                   **extra), str(path))
  return path


def write_safetensors(tmp_path, flat):
  return write_timm(tmp_path / 'model.safetensors', flat, **{
      'head.weight': np.ones((7, 32), np.float32),
      'head.bias': np.ones(7, np.float32)})


def write_torch(tmp_path, flat):
  torch = pytest.importorskip('torch')
  torch.save(torch_state(to_timm(flat)), tmp_path / 'pytorch_model.bin')
  return tmp_path / 'pytorch_model.bin'


def write_ibot(tmp_path, flat):
  """iBOT's released backbone: a wrapped, DDP-prefixed student."""
  torch = pytest.importorskip('torch')
  state = torch_state(to_timm(flat), 'module.backbone.')
  state['module.backbone.masked_embed'] = torch.zeros(1, 32)
  state['module.head.mlp.0.weight'] = torch.zeros(8, 32)
  torch.save({'state_dict': state, 'epoch': 100}, tmp_path / 'student.pth')
  return tmp_path / 'student.pth'


def write_full_ssl_checkpoint(tmp_path, flat):
  """A DINO / iBOT training checkpoint: the teacher is what they evaluate."""
  torch = pytest.importorskip('torch')
  torch.save({'student': torch_state(to_timm(random_backbone(5)), 'module.'),
              'teacher': torch_state(to_timm(flat), 'backbone.')},
             tmp_path / 'checkpoint.pth')
  return tmp_path / 'checkpoint.pth'


def write_converted(tmp_path, flat):
  """smope_jax.convert's output directory (its CLI is tested below)."""
  params = pretrained.load_backbone(str(write_torch(tmp_path, flat)),
                                    template())
  info = convert.save_backbone(params, str(tmp_path / 'out'), source='x',
                               model='tiny', image_size=IMAGE)
  assert json.loads((tmp_path / 'out' / 'info.json').read_text()) == info
  return tmp_path / 'out'


@pytest.mark.parametrize('write', [write_npz, write_safetensors, write_torch,
                                   write_ibot, write_full_ssl_checkpoint,
                                   write_converted])
def test_file_layouts_load_the_same_function(tmp_path, images, write):
  flat = random_backbone()
  loaded = pretrained.load_backbone(str(write(tmp_path, flat)), template())
  check_loaded(loaded, flat, images)


def run_convert(*args):
  return subprocess.run(
      [sys.executable, '-m', 'smope_jax.convert', *args], capture_output=True,
      text=True, timeout=120, check=False,
      cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_convert_cli(tmp_path):
  flat = random_backbone(variant='Ti/16', image_size=32)
  write_timm(tmp_path / 'ti.safetensors', flat)
  result = run_convert(f'--input={tmp_path}/ti.safetensors', '--model=Ti/16',
                       '--image_size=32', f'--output={tmp_path}/out')
  assert result.returncode == 0, result.stderr
  out, ti = tmp_path / 'out', pretrained.backbone_template('Ti/16', 32)
  assert json.loads((out / 'info.json').read_text()) == dict(
      source=str(tmp_path / 'ti.safetensors'), model='Ti/16', image_size=32,
      sha256=hashlib.sha256((out / 'backbone.npz').read_bytes()).hexdigest())
  loaded = pretrained.flatten(pretrained.load_backbone(str(out), ti))
  for key, value in flat.items():
    np.testing.assert_array_equal(loaded[key], value, err_msg=key)
  with open(out / 'backbone.npz', 'r+b') as f:
    f.seek(1000)
    f.write(b'\0' * 8)
  with pytest.raises(MissingWeightsError, match='sha256 in its info.json'):
    pretrained.load_backbone(str(out), ti)
  # A bad input is one line on stderr and exit status 2, no traceback.
  result = run_convert(f'--input={tmp_path}/ti.safetensors', '--model=S/16',
                       f'--output={tmp_path}/bad')
  assert result.returncode == 2
  last = result.stderr.strip().splitlines()[-1]
  assert last.startswith('error: ') and 'wrongly shaped' in last
  assert 'Traceback' not in result.stderr


@pytest.mark.parametrize('change, message', [
    (lambda f: f.pop('Transformer/encoderblock_1/LayerNorm_2/bias'),
     'missing keys: Transformer/encoderblock_1/LayerNorm_2/bias'),
    (lambda f: f.update({'fc_norm/scale': np.ones(32)}),
     'unexpected keys: fc_norm/scale'),
    (lambda f: f.update({'embedding/bias': np.ones(31)}),
     r'wrongly shaped keys: embedding/bias \(31,\)'),
])
def test_bad_keys_are_named(tmp_path, change, message):
  flat = random_backbone()
  change(flat)
  np.savez(tmp_path / 'vit.npz', **flat)
  with pytest.raises(MissingWeightsError, match=message):
    pretrained.load_backbone(str(tmp_path / 'vit.npz'), template())


def test_unknown_timm_key_and_wrong_head_count(tmp_path):
  path = write_timm(tmp_path / 'a.safetensors',
                    **{'fc_norm.weight': np.ones(32, np.float32)})
  with pytest.raises(MissingWeightsError, match='unexpected keys: fc_norm'):
    pretrained.load_backbone(str(path), template())
  three_heads = pretrained.backbone_template(dict(TINY, num_heads=3), IMAGE)
  with pytest.raises(MissingWeightsError, match='3 heads'):
    pretrained.load_backbone(str(path), three_heads)


def test_missing_source_and_unreadable_files(tmp_path):
  with pytest.raises(MissingWeightsError, match='preset'):
    pretrained.load_backbone(str(tmp_path / 'nope.npz'), template())
  (tmp_path / 'w.h5').write_bytes(b'x')
  with pytest.raises(MissingWeightsError, match='unknown weights format'):
    pretrained.load_backbone(str(tmp_path / 'w.h5'), template())
  (tmp_path / 'emptydir').mkdir()
  for name in ('w.npz', 'w.safetensors', 'w.pth', 'emptydir'):
    if name != 'emptydir':
      (tmp_path / name).write_bytes(b'PK\x03\x04 truncated')
    with pytest.raises(MissingWeightsError, match='cannot read|not a zip'):
      pretrained.load_backbone(str(tmp_path / name), template())


def test_position_embedding_resize(tmp_path):
  flat = random_backbone()
  pos = flat['Transformer/posembed_input/pos_embedding']
  ramp = np.linspace(0, 1, 4)  # A ramp stays monotone with the same ends.
  pos[0, 1:] = (ramp[:, None] + 2 * ramp[None, :]).reshape(16, 1)
  np.savez(tmp_path / 'vit.npz', **flat)
  for size, side in ((32, 8), (24, 6), (8, 2)):
    got = pretrained.load_backbone(str(tmp_path / 'vit.npz'), template(size))[
        'Transformer']['posembed_input']['pos_embedding']
    assert got.shape == (1, 1 + side * side, 32)
    np.testing.assert_array_equal(got[0, 0], pos[0, 0])  # CLS kept.
    grid = got[0, 1:].reshape(side, side, 32)
    np.testing.assert_allclose(grid, np.broadcast_to(grid[..., :1],
                                                     grid.shape), rtol=1e-6)
    assert np.all(np.diff(grid, axis=0) > 0) and np.all(
        np.diff(grid, axis=1) > 0)
    if side > 4:
      assert grid[0, 0, 0] == 0 and grid[-1, -1, 0] == pytest.approx(3)


@pytest.fixture
def server():
  """A local HTTP server with canned responses; it records the requests."""
  routes, requests = {}, []

  class Handler(http.server.BaseHTTPRequestHandler):

    def do_GET(self):  # noqa: N802
      requests.append(self.path)
      status, headers, body = routes.get(self.path, (404, {}, b''))
      self.send_response(status)
      for key, value in dict(headers, **{'Content-Length': len(body)}).items():
        self.send_header(key, str(value))
      self.end_headers()
      self.wfile.write(body)

    def log_message(self, *args):
      pass

  httpd = http.server.ThreadingHTTPServer(('127.0.0.1', 0), Handler)
  thread = threading.Thread(target=httpd.serve_forever, daemon=True)
  thread.start()
  yield types.SimpleNamespace(
      url=f'http://127.0.0.1:{httpd.server_address[1]}', routes=routes,
      requests=requests)
  httpd.shutdown()
  httpd.server_close()
  thread.join(timeout=10)


def test_preset_download_cache_and_reuse(tmp_path, server):
  flat = random_backbone()
  body = write_timm(tmp_path / 'src.safetensors', flat).read_bytes()
  name, cache = pretrained.PRESETS['sup21k'][1], tmp_path / 'cache'
  server.routes[f'/{name}'] = (200, {}, body)
  for _ in range(2):
    check_loaded(pretrained.load_backbone(
        'sup21k', template(), cache_dir=str(cache), base_url=server.url + '/'),
                 flat)
  assert server.requests == [f'/{name}']
  assert sorted(os.listdir(cache)) == [name, f'{name}.sha256']
  assert (cache / f'{name}.sha256').read_text().strip() == hashlib.sha256(
      body).hexdigest()
  # A corrupted cached file is detected, reported and removed.
  with open(cache / name, 'r+b') as f:
    f.seek(len(body) // 2)
    f.write(b'\xff' * 4)
  with pytest.raises(MissingWeightsError, match='corrupted') as e:
    pretrained.load_backbone('sup21k', template(), cache_dir=str(cache),
                             base_url=server.url)
  assert str(cache / name) in str(e.value) and not (cache / name).exists()


def test_preset_env_overrides_and_hf_etag(tmp_path, server, monkeypatch):
  flat = random_backbone()
  body = write_timm(tmp_path / 'src.safetensors', flat).read_bytes()
  name = pretrained.PRESETS['dino1k'][1]
  # Like huggingface.co: a redirect carrying the LFS sha256, then the bytes.
  etag = {'X-Linked-Etag': f'"{hashlib.sha256(body).hexdigest()}"'}
  server.routes[f'/{name}'] = (302, dict(etag, Location='/cdn/blob'), b'')
  server.routes['/cdn/blob'] = (200, {}, body)
  monkeypatch.setenv('SMOPE_JAX_WEIGHTS_URL', server.url)
  monkeypatch.setenv('SMOPE_JAX_CACHE', str(tmp_path / 'env_cache'))
  check_loaded(pretrained.load_backbone('dino1k', template()), flat)
  assert (tmp_path / 'env_cache' / name).exists()
  # A download that does not match the announced digest is not cached.
  server.routes[f'/{name}'][1]['X-Linked-Etag'] = '"' + '0' * 64 + '"'
  with pytest.raises(MissingWeightsError, match='announced'):
    pretrained.load_backbone('dino1k', template(),
                             cache_dir=str(tmp_path / 'other'))
  assert not os.listdir(tmp_path / 'other')


def test_offline_preset_names_cache_path(tmp_path):
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    url = 'http://127.0.0.1:%d' % s.getsockname()[1]
  cache = tmp_path / 'cache'
  with pytest.raises(MissingWeightsError) as e:
    pretrained.load_backbone('ibot21k', template(), cache_dir=str(cache),
                             base_url=url)
  for part in ("'ibot21k'", url + '/', '--config.pretrained=',
               str(cache / pretrained.PRESETS['ibot21k'][1])):
    assert part in str(e.value)
  assert not os.listdir(cache)


def test_torch_reader_dtypes_and_views(tmp_path):
  torch = pytest.importorskip('torch')
  base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
  state = {'t': base.t(), 'view': base[1:, 2:4], 'half': base.half(),
           'bf16': (base / 7).bfloat16(), 'long': torch.arange(5),
           'empty': torch.zeros(0, 3), 'param': torch.nn.Parameter(base)}
  torch.save({'nested': [state]}, tmp_path / 'x.pth')
  got = pretrained.read_torch(str(tmp_path / 'x.pth'))['nested'][0]
  for key, value in state.items():
    want = value.detach().float().numpy()
    np.testing.assert_array_equal(np.float32(got[key]), want, err_msg=key)
  assert got['bf16'].dtype.name == 'bfloat16' and got['long'].dtype == np.int64
  assert got['half'].dtype == np.float16


class _Evil:

  def __init__(self, target):
    self.target = target

  def __reduce__(self):
    return os.mkdir, (self.target,)


def test_torch_reader_refuses_foreign_globals(tmp_path):
  torch = pytest.importorskip('torch')
  target = str(tmp_path / 'pwned')
  with zipfile.ZipFile(tmp_path / 'evil.pth', 'w') as zf:
    zf.writestr('evil/data.pkl', pickle.dumps({'w': _Evil(target)}))
  with pytest.raises(MissingWeightsError, match='refusing to unpickle'):
    pretrained.load_backbone(str(tmp_path / 'evil.pth'), template())
  assert not os.path.exists(target)
  torch.save({'args': argparse.Namespace(lr=1.0)}, tmp_path / 'args.pth')
  with pytest.raises(MissingWeightsError, match='argparse.Namespace'):
    pretrained.read_torch(str(tmp_path / 'args.pth'))
