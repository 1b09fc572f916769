"""An independent float64 NumPy ViT forward for the Google checkpoint layout.

Written from the model description (pre-LN blocks, LayerNorm eps 1e-6, erf
GELU, qkv with bias, scale d**-0.5, CLS prepended before the position
embedding, pre-logits = final-LayerNorm'd CLS), not from the Flax code, so
that agreement between the two checks the converters and the model alike.
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
  q, k, v = (np.einsum('bnd,dhe->bhne', x, p[n]['kernel'])
             + p[n]['bias'][None, :, None] for n in ('query', 'key', 'value'))
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
