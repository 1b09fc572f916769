"""Pretrained weights: every file layout loads into a model that computes the
same function as an independent NumPy ViT, and bad sources fail loudly."""

import collections
import functools
import hashlib
import http.server
import json
import os
import socket
import subprocess
import sys
import threading
import zipfile

import jax
import numpy as np
import pytest
import safetensors.numpy

from smope_jax import convert
from smope_jax import pretrained
from smope_jax.errors import MissingWeightsError
from tests import numpy_vit

TINY = dict(hidden_size=32, num_layers=2, num_heads=4, mlp_dim=64,
            patch_size=4)
IMAGE, CLASSES = 16, 5


def random_backbone(seed=0, variant=None, image_size=IMAGE):
  """Random weights in the Google layout, with realistic scales."""
  rng = np.random.default_rng(seed)
  template = pretrained.backbone_template(variant or TINY, image_size)
  return {k: (rng.normal(size=s.shape) * (0.2 if k.endswith('kernel') else
                                          0.5)).astype(np.float32)
             + (1.0 if k.endswith('scale') else 0.0)
          for k, s in pretrained.flatten(template).items()}


def unflatten(flat):
  tree = {}
  for key, value in flat.items():
    *parents, leaf = key.split('/')
    node = tree
    for name in parents:
      node = node.setdefault(name, {})
    node[leaf] = value
  return tree


def random_head(seed=1):
  rng = np.random.default_rng(seed)
  return {'head/kernel': rng.normal(size=(TINY['hidden_size'], CLASSES)),
          'head/bias': rng.normal(size=(CLASSES,))}


def google_to_timm(flat, num_heads):
  """The timm state dict of a Google-layout backbone (written independently
  of the loader, so that a round trip checks both directions)."""
  out = {'cls_token': flat['cls'],
         'pos_embed': flat['Transformer/posembed_input/pos_embedding'],
         'patch_embed.proj.weight': flat['embedding/kernel'].transpose(
             3, 2, 0, 1),
         'patch_embed.proj.bias': flat['embedding/bias'],
         'norm.weight': flat['Transformer/encoder_norm/scale'],
         'norm.bias': flat['Transformer/encoder_norm/bias']}
  i = 0
  while f'Transformer/encoderblock_{i}/LayerNorm_0/scale' in flat:
    g = lambda name: flat[f'Transformer/encoderblock_{i}/{name}']  # noqa: E731
    a = lambda name: g(f'MultiHeadDotProductAttention_1/{name}')  # noqa: E731
    t = f'blocks.{i}.'
    d = g('LayerNorm_0/scale').shape[0]
    out[t + 'norm1.weight'] = g('LayerNorm_0/scale')
    out[t + 'norm1.bias'] = g('LayerNorm_0/bias')
    out[t + 'attn.qkv.weight'] = np.concatenate(
        [a(f'{n}/kernel').reshape(d, d).T for n in ('query', 'key', 'value')])
    out[t + 'attn.qkv.bias'] = np.concatenate(
        [a(f'{n}/bias').reshape(d) for n in ('query', 'key', 'value')])
    out[t + 'attn.proj.weight'] = a('out/kernel').reshape(d, d).T
    out[t + 'attn.proj.bias'] = a('out/bias')
    out[t + 'norm2.weight'] = g('LayerNorm_2/scale')
    out[t + 'norm2.bias'] = g('LayerNorm_2/bias')
    for fc, dense in (('fc1', 'Dense_0'), ('fc2', 'Dense_1')):
      out[f'{t}mlp.{fc}.weight'] = g(f'MlpBlock_3/{dense}/kernel').T
      out[f'{t}mlp.{fc}.bias'] = g(f'MlpBlock_3/{dense}/bias')
    i += 1
  assert num_heads == flat['Transformer/encoderblock_0/'
                           'MultiHeadDotProductAttention_1/query/bias'].shape[0]
  return {k: np.ascontiguousarray(v) for k, v in out.items()}


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


def check_forward(loaded, flat, images):
  """Loaded weights in the Flax model == the source in the NumPy ViT."""
  vit = pytest.importorskip('smope_jax.models.vit')
  head = random_head()
  model = vit.SMoPEViT(num_classes=CLASSES, num_prompted_layers=0,
                       **TINY)
  params = dict(loaded, **unflatten({k: v.astype(np.float32)
                                     for k, v in head.items()}))
  out = model.apply({'params': params}, images, mode='plain')
  want_pre, want_logits = numpy_vit.forward(unflatten({**flat, **head}),
                                            images)
  assert_close(out['pre_logits'], want_pre)
  assert_close(out['logits'], want_logits)


def check_loaded(loaded, flat):
  assert 'head' not in loaded
  got = pretrained.flatten(loaded)
  assert got.keys() == pretrained.flatten(template()).keys()
  for key, value in got.items():
    assert value.dtype == np.float32
    np.testing.assert_array_equal(value, flat[key], err_msg=key)


def template(image_size=IMAGE):
  return pretrained.backbone_template(TINY, image_size)


def test_template_matches_flax_model():
  vit = pytest.importorskip('smope_jax.models.vit')
  model = vit.SMoPEViT(num_classes=CLASSES, num_prompted_layers=0, **TINY)
  init = functools.partial(model.init, mode='plain')
  shapes = jax.eval_shape(init, jax.random.key(0),
                          np.zeros((1, IMAGE, IMAGE, 3), np.float32))['params']
  want = {k: v.shape for k, v in pretrained.flatten(dict(shapes)).items()
          if not k.startswith('head/')}
  assert want == {k: v.shape for k, v in pretrained.flatten(template()).items()}


def test_b16_template_size():
  flat = pretrained.flatten(pretrained.backbone_template('B/16', 224))
  assert sum(np.prod(v.shape) for v in flat.values()) == 85_798_656
  assert flat['Transformer/posembed_input/pos_embedding'].shape == (1, 197,
                                                                    768)


def test_timm_mapping_inverts_google_to_timm():
  flat = random_backbone()
  back = pretrained.timm_to_google(google_to_timm(flat, 4), num_heads=4)
  assert back.keys() == flat.keys()
  for key in flat:
    np.testing.assert_array_equal(back[key], flat[key], err_msg=key)


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


def test_numpy_reference_matches_torch_timm_semantics(images):
  """Pins the Google <-> timm layouts to what torch computes with them."""
  flat = random_backbone()
  want = torch_timm_forward(google_to_timm(flat, 4), images, num_heads=4)
  got, _ = numpy_vit.forward(unflatten({**flat, **random_head()}), images)
  assert_close(got, want, tol=1e-10)


def test_google_npz(tmp_path, images):
  flat = random_backbone()
  extra = {'head/kernel': np.zeros((32, 7)), 'head/bias': np.zeros(7),
           'pre_logits/kernel': np.zeros((32, 32))}
  np.savez(tmp_path / 'vit.npz', **flat, **extra)
  loaded = pretrained.load_backbone(str(tmp_path / 'vit.npz'), template())
  check_loaded(loaded, flat)
  check_forward(loaded, flat, images)


def test_timm_safetensors(tmp_path, images):
  flat = random_backbone()
  state = google_to_timm(flat, 4)
  state['head.weight'] = np.ones((CLASSES + 2, 32), np.float32)
  state['head.bias'] = np.ones(CLASSES + 2, np.float32)
  safetensors.numpy.save_file(state, str(tmp_path / 'model.safetensors'))
  loaded = pretrained.load_backbone(str(tmp_path / 'model.safetensors'),
                                    template())
  check_loaded(loaded, flat)
  check_forward(loaded, flat, images)


def test_timm_torch_pickle(tmp_path, images):
  torch = pytest.importorskip('torch')
  flat = random_backbone()
  torch.save(torch_state(google_to_timm(flat, 4)), tmp_path / 'vit.pth')
  loaded = pretrained.load_backbone(str(tmp_path / 'vit.pth'), template())
  check_loaded(loaded, flat)
  check_forward(loaded, flat, images)


def test_ibot_nested_prefixed_torch_pickle(tmp_path, images):
  torch = pytest.importorskip('torch')
  flat, other = random_backbone(0), random_backbone(5)
  state = torch_state(google_to_timm(flat, 4), 'module.backbone.')
  state['module.backbone.masked_embed'] = torch.zeros(1, 32)
  state['module.head.mlp.0.weight'] = torch.zeros(8, 32)
  torch.save({'state_dict': state, 'epoch': 100}, tmp_path / 'student.pth')
  loaded = pretrained.load_backbone(str(tmp_path / 'student.pth'), template())
  check_loaded(loaded, flat)
  check_forward(loaded, flat, images)
  # A full checkpoint: the teacher is the network iBOT and DINO evaluate.
  torch.save({'student': torch_state(google_to_timm(other, 4),
                                     'module.backbone.'),
              'teacher': torch_state(google_to_timm(flat, 4), 'backbone.')},
             tmp_path / 'checkpoint.pth')
  check_loaded(pretrained.load_backbone(str(tmp_path / 'checkpoint.pth'),
                                        template()), flat)


def test_converted_directory(tmp_path, images):
  flat = random_backbone()
  np.savez(tmp_path / 'vit.npz', **flat)
  params = pretrained.load_backbone(str(tmp_path / 'vit.npz'), template())
  info = convert.save_backbone(params, str(tmp_path / 'out'), source='x',
                               model='tiny', image_size=IMAGE)
  with np.load(tmp_path / 'out' / 'backbone.npz') as npz:
    assert sorted(npz.files) == sorted(flat)
  with open(tmp_path / 'out' / 'info.json') as f:
    assert json.load(f) == info
  loaded = pretrained.load_backbone(str(tmp_path / 'out'), template())
  check_loaded(loaded, flat)
  check_forward(loaded, flat, images)
  with open(tmp_path / 'out' / 'backbone.npz', 'r+b') as f:
    f.seek(100)
    f.write(b'\0' * 8)
  with pytest.raises(MissingWeightsError, match='sha256'):
    pretrained.load_backbone(str(tmp_path / 'out'), template())


def run_convert(*args):
  return subprocess.run(
      [sys.executable, '-m', 'smope_jax.convert', *args], capture_output=True,
      text=True, timeout=120, check=False,
      cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_convert_cli(tmp_path):
  flat = random_backbone(variant='Ti/16', image_size=32)
  safetensors.numpy.save_file(google_to_timm(flat, 3),
                              str(tmp_path / 'ti.safetensors'))
  result = run_convert(f'--input={tmp_path}/ti.safetensors', '--model=Ti/16',
                       '--image_size=32', f'--output={tmp_path}/out')
  assert result.returncode == 0, result.stderr
  with open(tmp_path / 'out' / 'info.json') as f:
    info = json.load(f)
  assert info['model'] == 'Ti/16' and info['image_size'] == 32
  assert info['sha256'] == hashlib.sha256(
      (tmp_path / 'out' / 'backbone.npz').read_bytes()).hexdigest()
  loaded = pretrained.flatten(pretrained.load_backbone(
      str(tmp_path / 'out'), pretrained.backbone_template('Ti/16', 32)))
  for key, value in flat.items():
    np.testing.assert_array_equal(loaded[key], value, err_msg=key)
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
  state = google_to_timm(random_backbone(), 4)
  state['fc_norm.weight'] = np.ones(32, np.float32)
  safetensors.numpy.save_file(state, str(tmp_path / 'a.safetensors'))
  with pytest.raises(MissingWeightsError, match='unexpected keys: fc_norm'):
    pretrained.load_backbone(str(tmp_path / 'a.safetensors'), template())
  three_heads = pretrained.backbone_template(dict(TINY, num_heads=3), IMAGE)
  with pytest.raises(MissingWeightsError, match='3 heads'):
    pretrained.load_backbone(str(tmp_path / 'a.safetensors'), three_heads)


def test_missing_source_and_unknown_format(tmp_path):
  with pytest.raises(MissingWeightsError, match='preset'):
    pretrained.load_backbone(str(tmp_path / 'nope.npz'), template())
  (tmp_path / 'w.h5').write_bytes(b'x')
  with pytest.raises(MissingWeightsError, match='unknown weights format'):
    pretrained.load_backbone(str(tmp_path / 'w.h5'), template())


def test_position_embedding_resize(tmp_path):
  flat = random_backbone()
  pos = flat['Transformer/posembed_input/pos_embedding']
  pos[0, 1:] = 0.25  # A constant grid stays constant under bilinear resize.
  np.savez(tmp_path / 'vit.npz', **flat)
  for size in (24, 8):
    loaded = pretrained.load_backbone(str(tmp_path / 'vit.npz'),
                                      template(size))
    got = loaded['Transformer']['posembed_input']['pos_embedding']
    assert got.shape == (1, 1 + (size // 4)**2, 32)
    np.testing.assert_array_equal(got[0, 0], pos[0, 0])
    np.testing.assert_allclose(got[0, 1:], 0.25, rtol=1e-6)
  # A smooth ramp is interpolated, not copied or reordered.
  ramp = np.linspace(0, 1, 4)
  pos[0, 1:] = np.repeat((ramp[:, None] + 2 * ramp[None, :]).reshape(16, 1),
                         32, 1)
  np.savez(tmp_path / 'vit.npz', **flat)
  got = pretrained.load_backbone(str(tmp_path / 'vit.npz'), template(32))[
      'Transformer']['posembed_input']['pos_embedding'][0, 1:, 0].reshape(8, 8)
  assert np.all(np.diff(got, axis=0) >= 0) and np.all(np.diff(got, axis=1) > 0)
  assert got[0, 0] == pytest.approx(0.0) and got[-1, -1] == pytest.approx(3.0)


class _Server:
  """A local HTTP server with canned responses that counts requests."""

  def __init__(self):
    self.routes, self.requests = {}, []
    server = self

    class Handler(http.server.BaseHTTPRequestHandler):

      def do_GET(self):  # noqa: N802
        server.requests.append(self.path)
        status, headers, body = server.routes.get(self.path, (404, {}, b''))
        self.send_response(status)
        for key, value in headers.items():
          self.send_header(key, value)
        self.send_header('Content-Length', str(len(body)))
        self.end_headers()
        self.wfile.write(body)

      def log_message(self, *args):
        pass

    self.httpd = http.server.ThreadingHTTPServer(('127.0.0.1', 0), Handler)
    self.url = f'http://127.0.0.1:{self.httpd.server_address[1]}'
    self.thread = threading.Thread(target=self.httpd.serve_forever,
                                   kwargs={'poll_interval': 0.05}, daemon=True)
    self.thread.start()

  def close(self):
    self.httpd.shutdown()
    self.httpd.server_close()
    self.thread.join(timeout=10)


@pytest.fixture
def server():
  s = _Server()
  yield s
  s.close()


def test_preset_download_cache_and_reuse(tmp_path, server):
  flat = random_backbone()
  np_file = tmp_path / 'src.safetensors'
  safetensors.numpy.save_file(google_to_timm(flat, 4), str(np_file))
  body = np_file.read_bytes()
  name = pretrained.PRESETS['sup21k'][1]
  server.routes[f'/{name}'] = (200, {}, body)
  cache = tmp_path / 'cache'
  for _ in range(2):
    loaded = pretrained.load_backbone('sup21k', template(),
                                      cache_dir=str(cache),
                                      base_url=server.url + '/')
    check_loaded(loaded, flat)
  assert server.requests == [f'/{name}']
  digest = hashlib.sha256(body).hexdigest()
  assert (cache / f'{name}.sha256').read_text().strip() == digest
  assert sorted(os.listdir(cache)) == [name, f'{name}.sha256']
  # A corrupted cached file is detected, reported and removed.
  with open(cache / name, 'r+b') as f:
    f.seek(len(body) // 2)
    f.write(b'\xff' * 4)
  with pytest.raises(MissingWeightsError, match='corrupted') as e:
    pretrained.load_backbone('sup21k', template(), cache_dir=str(cache),
                             base_url=server.url)
  assert str(cache / name) in str(e.value)
  assert not (cache / name).exists()


def test_preset_env_overrides_and_hf_etag(tmp_path, server, monkeypatch):
  flat = random_backbone()
  src = tmp_path / 'src.safetensors'
  safetensors.numpy.save_file(google_to_timm(flat, 4), str(src))
  body = src.read_bytes()
  name = pretrained.PRESETS['dino1k'][1]
  # Like huggingface.co: a redirect carrying the LFS sha256, then the bytes.
  etag = hashlib.sha256(body).hexdigest()
  server.routes[f'/{name}'] = (302, {'Location': '/cdn/blob',
                                     'X-Linked-Etag': f'"{etag}"'}, b'')
  server.routes['/cdn/blob'] = (200, {}, body)
  monkeypatch.setenv('SMOPE_JAX_WEIGHTS_URL', server.url)
  monkeypatch.setenv('SMOPE_JAX_CACHE', str(tmp_path / 'env_cache'))
  check_loaded(pretrained.load_backbone('dino1k', template()), flat)
  assert (tmp_path / 'env_cache' / name).exists()
  # A download that does not match the announced digest never enters the
  # cache.
  server.routes[f'/{name}'][1]['X-Linked-Etag'] = '"' + '0' * 64 + '"'
  with pytest.raises(MissingWeightsError, match='announced'):
    pretrained.load_backbone('dino1k', template(),
                             cache_dir=str(tmp_path / 'other'))
  assert os.listdir(tmp_path / 'other') == []


def test_offline_preset_names_cache_path(tmp_path):
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    port = s.getsockname()[1]
  cache = tmp_path / 'cache'
  with pytest.raises(MissingWeightsError) as e:
    pretrained.load_backbone('ibot21k', template(), cache_dir=str(cache),
                             base_url=f'http://127.0.0.1:{port}')
  message = str(e.value)
  want_path = str(cache / pretrained.PRESETS['ibot21k'][1])
  assert "'ibot21k'" in message and want_path in message
  assert f'http://127.0.0.1:{port}/' in message
  assert '--config.pretrained=' in message
  assert os.listdir(cache) == []


def test_torch_reader_dtypes_and_views(tmp_path):
  torch = pytest.importorskip('torch')
  base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
  state = {'t': base.t(), 'view': base[1:, 2:4], 'half': base.half(),
           'bf16': (base / 7).bfloat16(), 'long': torch.arange(5),
           'empty': torch.zeros(0, 3), 'param': torch.nn.Parameter(base)}
  torch.save({'nested': [state]}, tmp_path / 'x.pth')
  got = pretrained.read_torch(str(tmp_path / 'x.pth'))['nested'][0]
  for key, value in state.items():
    want = value.detach().float().numpy() if key == 'bf16' else (
        value.detach().numpy())
    np.testing.assert_array_equal(np.asarray(got[key], want.dtype), want,
                                  err_msg=key)
  assert got['bf16'].dtype.name == 'bfloat16' and got['long'].dtype == np.int64


class _Evil:

  def __reduce__(self):
    return os.mkdir, (self.target,)


def test_torch_reader_refuses_foreign_globals(tmp_path):
  torch = pytest.importorskip('torch')
  evil = _Evil()
  evil.target = str(tmp_path / 'pwned')
  with zipfile.ZipFile(tmp_path / 'evil.pth', 'w') as zf:
    zf.writestr('evil/data.pkl', __import__('pickle').dumps({'w': evil}))
  with pytest.raises(MissingWeightsError, match='refusing to unpickle'):
    pretrained.load_backbone(str(tmp_path / 'evil.pth'), template())
  assert not os.path.exists(evil.target)
  torch.save({'args': __import__('argparse').Namespace(lr=1.0)},
             tmp_path / 'args.pth')
  with pytest.raises(MissingWeightsError, match='argparse.Namespace'):
    pretrained.read_torch(str(tmp_path / 'args.pth'))
