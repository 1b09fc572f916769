"""Independent references: a float64 NumPy ViT and the timm weight layout.

The forward is written from the model description (pre-LN blocks, LayerNorm
eps 1e-6, erf GELU, qkv with bias, scale d**-0.5, CLS prepended before the
position embedding, pre-logits = final-LayerNorm'd CLS), not from the Flax
code, and `google_to_timm` from timm's conventions, not from the loader, so
that agreement checks the converters and the model alike.
"""

import math

import numpy as np

_erf = np.vectorize(math.erf)


def _layer_norm(x, p):
  mean = x.mean(-1, keepdims=True)
  var = ((x - mean)**2).mean(-1, keepdims=True)
  return (x - mean) / np.sqrt(var + 1e-6) * p['scale'] + p['bias']


def _gelu(x):
  return 0.5 * x * (1.0 + _erf(x / math.sqrt(2.0)))


def _patches(images, kernel, bias):
  """A stride-p, p x p convolution as a matmul over flattened patches."""
  b, h, w, c = images.shape
  p = kernel.shape[0]
  x = images.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
  x = x.reshape(b, (h // p) * (w // p), p * p * c)
  return x @ kernel.reshape(p * p * c, -1) + bias


def _attention(x, p):
  q, k, v = (np.einsum('bnd,dhe->bhne', x, p[n]['kernel']) +
             p[n]['bias'][None, :, None] for n in ('query', 'key', 'value'))
  logits = q @ k.transpose(0, 1, 3, 2) * q.shape[-1]**-0.5
  weights = np.exp(logits - logits.max(-1, keepdims=True))
  weights /= weights.sum(-1, keepdims=True)
  out = weights @ v  # (b, h, n, e)
  return np.einsum('bhne,hed->bnd', out, p['out']['kernel']) + p['out']['bias']


def forward(params, images):
  """Returns (pre_logits (B, D), logits (B, C)) in float64."""
  p = _to64(params)
  x = _patches(np.asarray(images, np.float64), p['embedding']['kernel'],
               p['embedding']['bias'])
  cls = np.broadcast_to(p['cls'], (x.shape[0], 1, x.shape[-1]))
  x = np.concatenate([cls, x], 1)
  t = p['Transformer']
  x = x + t['posembed_input']['pos_embedding']
  i = 0
  while f'encoderblock_{i}' in t:
    blk = t[f'encoderblock_{i}']
    x = x + _attention(_layer_norm(x, blk['LayerNorm_0']),
                       blk['MultiHeadDotProductAttention_1'])
    mlp = blk['MlpBlock_3']
    y = _layer_norm(x, blk['LayerNorm_2'])
    y = _gelu(y @ mlp['Dense_0']['kernel'] + mlp['Dense_0']['bias'])
    x = x + y @ mlp['Dense_1']['kernel'] + mlp['Dense_1']['bias']
    i += 1
  pre_logits = _layer_norm(x, t['encoder_norm'])[:, 0]
  return pre_logits, pre_logits @ p['head']['kernel'] + p['head']['bias']


def _to64(tree):
  if isinstance(tree, dict):
    return {k: _to64(v) for k, v in tree.items()}
  return np.asarray(tree, np.float64)


def unflatten(flat):
  """{'a/b': x} -> {'a': {'b': x}}."""
  tree = {}
  for key, value in flat.items():
    *parents, leaf = key.split('/')
    node = tree
    for name in parents:
      node = node.setdefault(name, {})
    node[leaf] = value
  return tree


def google_to_timm(flat):
  """The timm state dict of '/'-joined Google-layout backbone weights.

  timm's Linear weights are (out, in); its qkv projection stacks q, k, v
  along the output, each with heads as contiguous blocks of d outputs; its
  patch embedding is a (D, 3, p, p) NCHW convolution kernel.
  """
  out = {
      'cls_token': flat['cls'],
      'pos_embed': flat['Transformer/posembed_input/pos_embedding'],
      'patch_embed.proj.weight': flat['embedding/kernel'].transpose(3, 2, 0, 1),
      'patch_embed.proj.bias': flat['embedding/bias'],
      'norm.weight': flat['Transformer/encoder_norm/scale'],
      'norm.bias': flat['Transformer/encoder_norm/bias']
  }
  i = 0
  while f'Transformer/encoderblock_{i}/LayerNorm_0/scale' in flat:
    g = lambda name: flat[f'Transformer/encoderblock_{i}/{name}']  # noqa: E731
    a = lambda name: g(f'MultiHeadDotProductAttention_1/{name}')  # noqa: E731
    t, d = f'blocks.{i}.', g('LayerNorm_0/scale').shape[0]
    for norm, ln in (('norm1', 'LayerNorm_0'), ('norm2', 'LayerNorm_2')):
      out[f'{t}{norm}.weight'] = g(f'{ln}/scale')
      out[f'{t}{norm}.bias'] = g(f'{ln}/bias')
    out[t + 'attn.qkv.weight'] = np.concatenate(
        [a(f'{n}/kernel').reshape(d, d).T for n in ('query', 'key', 'value')])
    out[t + 'attn.qkv.bias'] = np.concatenate(
        [a(f'{n}/bias').reshape(d) for n in ('query', 'key', 'value')])
    out[t + 'attn.proj.weight'] = a('out/kernel').reshape(d, d).T
    out[t + 'attn.proj.bias'] = a('out/bias')
    for fc, dense in (('fc1', 'Dense_0'), ('fc2', 'Dense_1')):
      out[f'{t}mlp.{fc}.weight'] = g(f'MlpBlock_3/{dense}/kernel').T
      out[f'{t}mlp.{fc}.bias'] = g(f'MlpBlock_3/{dense}/bias')
    i += 1
  return {k: np.ascontiguousarray(v) for k, v in out.items()}
