"""Tests for smope_jax.models.vit and the train step on a tiny model."""

import functools
import math

import chex
import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from smope_jax import experts
from smope_jax import losses
from smope_jax import schedules
from smope_jax import train_step as ts
from smope_jax.methods import smope
from smope_jax.models import variants
from smope_jax.models import vit
from configs import demo

B, S, P, D, LAYERS, H, MLP, L, E, K, C = 4, 8, 4, 16, 3, 2, 32, 2, 6, 3, 10
N = (S // P)**2 + 1
HD = D // H

TINY = dict(num_classes=C, patch_size=P, hidden_size=D, num_layers=LAYERS,
            num_heads=H, mlp_dim=MLP)


def _prompts(num_layers=L, num_experts=E, top_k=K, heads=H, head_dim=HD):
  return smope.SMoPEPrompts(num_layers=num_layers, num_heads=heads,
                            num_experts=num_experts, head_dim=head_dim,
                            top_k=top_k, epsilon=0.4, inference_penalty=2.0)


def _model(num_prompted_layers=L, **overrides):
  prompts = _prompts(num_prompted_layers) if num_prompted_layers else None
  return vit.VisionTransformer(**{**TINY, **overrides}, prompts=prompts)


def _images(seed: int = 0, batch: int = B):
  rng = np.random.default_rng(seed)
  return jnp.asarray(rng.uniform(size=(batch, S, S, 3)), jnp.float32)


def _fill(path, shape_dtype, rng):
  """A value for one parameter: prompts uniform [0, 1), the rest small."""
  name = '/'.join(path)
  shape = shape_dtype.shape
  if name.startswith('prompts/'):
    x = rng.uniform(size=shape)
  elif name.endswith('scale'):
    x = 1.0 + 0.1 * rng.normal(size=shape)
  elif name.endswith('kernel'):
    fan_in = int(np.prod(shape[:-1])) if 'out' not in name else H * HD
    x = rng.normal(size=shape) / np.sqrt(fan_in)
  else:
    x = 0.1 * rng.normal(size=shape)
  return jnp.asarray(x, shape_dtype.dtype)


@functools.lru_cache(maxsize=None)
def _params():
  """Tiny-model parameters filled with NumPy (compiling init is slow)."""
  shapes = jax.eval_shape(
      lambda: _model().init(jax.random.key(0), _images(), mode='dense'))
  rng = np.random.default_rng(0)
  flat = flax.traverse_util.flatten_dict(shapes['params'])
  return flax.traverse_util.unflatten_dict({
      path: _fill(path, leaf, rng) for path, leaf in sorted(flat.items())
  })


def _state(seed: int = 0):
  rng = np.random.default_rng(seed)
  counts = rng.integers(1, 4, (L, H, E)).astype(np.int32)
  return {
      'counts': jnp.asarray(counts),
      'frequent': jnp.asarray(rng.uniform(size=(L, H, E)) < 0.3)
  }


def _flat(tree):
  return {
      '/'.join(k): v for k, v in flax.traverse_util.flatten_dict(
          flax.core.unfreeze(tree)).items()
  }


def test_param_tree_follows_google_layout():
  params = _flat(_params())
  expected = {
      'embedding/kernel': (P, P, 3, D),
      'embedding/bias': (D,),
      'cls': (1, 1, D),
      'Transformer/posembed_input/pos_embedding': (1, N, D),
      'Transformer/encoder_norm/scale': (D,),
      'Transformer/encoder_norm/bias': (D,),
      'head/kernel': (D, C),
      'head/bias': (C,),
      'prompts/keys': (L, H, E, HD),
      'prompts/values': (L, H, E, HD),
  }
  for i in range(LAYERS):
    block = f'Transformer/encoderblock_{i}/'
    attn = block + 'MultiHeadDotProductAttention_1/'
    for ln in ('LayerNorm_0', 'LayerNorm_2'):
      expected[block + ln + '/scale'] = (D,)
      expected[block + ln + '/bias'] = (D,)
    for proj in ('query', 'key', 'value'):
      expected[attn + proj + '/kernel'] = (D, H, HD)
      expected[attn + proj + '/bias'] = (H, HD)
    expected[attn + 'out/kernel'] = (H, HD, D)
    expected[attn + 'out/bias'] = (D,)
    expected[block + 'MlpBlock_3/Dense_0/kernel'] = (D, MLP)
    expected[block + 'MlpBlock_3/Dense_0/bias'] = (MLP,)
    expected[block + 'MlpBlock_3/Dense_1/kernel'] = (MLP, D)
    expected[block + 'MlpBlock_3/Dense_1/bias'] = (D,)
  assert {k: v.shape for k, v in params.items()} == expected
  for value in params.values():
    chex.assert_type(value, jnp.float32)


def test_prompt_init_is_uniform_on_unit_interval():
  params = _params()['prompts']
  assert set(params) == {'keys', 'values'}
  for name in ('keys', 'values'):
    x = np.asarray(params[name])
    chex.assert_shape(x, (L, H, E, HD))
    chex.assert_type(x, jnp.float32)
    assert x.min() >= 0.0 and x.max() < 1.0
    assert 0.4 < x.mean() < 0.6
    assert 0.25 < x.std() < 0.33  # Uniform [0, 1): std 0.289.
  assert not np.array_equal(params['keys'], params['values'])


def test_vit_b16_learnable_parameter_count():
  model = vit.VisionTransformer(
      num_classes=200, **variants.VIT_VARIANTS['B/16'],
      prompts=_prompts(6, 25, 5, heads=12, head_dim=64))
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(
      0), jnp.zeros((1, 224, 224, 3)), mode='dense'))['params']
  chex.assert_shape(shapes['prompts']['keys'], (6, 12, 25, 64))
  chex.assert_shape(shapes['prompts']['values'], (6, 12, 25, 64))
  chex.assert_shape(shapes['Transformer']['posembed_input']['pos_embedding'],
                    (1, 197, 768))

  def size(tree):
    return sum(x.size for x in jax.tree_util.tree_leaves(tree))

  trainable, frozen = ts.split_params(shapes)
  assert set(trainable) == {'prompts', 'head'}
  assert size(shapes['prompts']) == 230_400
  assert size(trainable) == 384_200
  assert 'prompts' not in frozen and 'head' not in frozen
  assert size(frozen) + size(trainable) == size(shapes)


@pytest.mark.parametrize('mode', ['plain', 'dense', 'train', 'eval'])
def test_outputs_in_every_mode(mode):
  out = _model().apply({'params': _params()}, _images(), _state(), mode=mode)
  chex.assert_shape(out['logits'], (B, C))
  chex.assert_type(out['logits'], jnp.float32)
  chex.assert_shape(out['pre_logits'], (B, D))
  chex.assert_type(out['pre_logits'], jnp.float32)
  chex.assert_tree_all_finite(out)
  if mode == 'plain':
    assert 'scores' not in out and 'selected' not in out
    return
  chex.assert_shape(out['scores'], (L, B, H, E))
  chex.assert_type(out['scores'], jnp.float32)
  chex.assert_shape(out['selected'], (L, B, H, K))
  chex.assert_type(out['selected'], jnp.int32)
  sel = np.asarray(out['selected'])
  assert np.all((sel >= 0) & (sel < E))
  # K distinct experts per (layer, sample, head).
  assert np.all(np.sort(sel, -1)[..., 1:] != np.sort(sel, -1)[..., :-1])


def test_evaluation_routes_by_the_clean_top_k_unless_exclusion_is_on():
  # Half the experts of every head never used (count 0).
  counts = np.zeros((L, H, E), np.int32)
  counts[..., ::2] = 5
  state = {
      'counts': jnp.asarray(counts),
      'frequent': jnp.zeros((L, H, E), bool)
  }
  model, params = _model(), _params()
  published = model.apply({'params': params}, _images(), {
      **state, 'exclude_unused': False
  }, mode='eval')
  clean = np.asarray(jax.lax.top_k(published['scores'], K)[1])
  np.testing.assert_array_equal(published['selected'], clean)
  excluded = model.apply({'params': params}, _images(), state, mode='eval')
  chosen = np.asarray(excluded['selected'])
  assert np.all(chosen % 2 == 0)  # Only used experts (E = 6, K = 3).
  assert not np.array_equal(chosen, clean)
  # Counting and statistics keep the exclusion: mode 'eval' defaults to it.
  np.testing.assert_array_equal(
      chosen,
      model.apply({'params': params}, _images(), {
          **state, 'exclude_unused': True
      }, mode='eval')['selected'])


def test_modes_needing_state_and_bad_mode_raise():
  model, params = _model(), _params()
  for mode in ('train', 'eval'):
    with pytest.raises(ValueError):
      model.apply({'params': params}, _images(), None, mode=mode)
  with pytest.raises(ValueError):
    model.apply({'params': params}, _images(), _state(), mode='topk')


def test_bfloat16_model_keeps_scores_and_logits_float32():
  model = _model(dtype=jnp.bfloat16)
  apply = jax.jit(functools.partial(model.apply, mode='train'))
  out = apply({'params': _params()}, _images(), _state())
  chex.assert_type(out['scores'], jnp.float32)
  chex.assert_type(out['selected'], jnp.int32)
  chex.assert_type(out['logits'], jnp.float32)
  chex.assert_type(out['pre_logits'], jnp.float32)
  chex.assert_tree_all_finite(out)


def test_plain_mode_equals_model_without_prompts():
  params = _params()
  backbone = {k: v for k, v in params.items() if k != 'prompts'}
  bare = _model(num_prompted_layers=0)
  bare_shapes = jax.eval_shape(
      lambda: bare.init(jax.random.key(0), _images(), mode='plain'))['params']
  chex.assert_trees_all_equal_shapes(bare_shapes, backbone)
  ref = bare.apply({'params': backbone}, _images(), mode='plain')
  out = _model().apply({'params': params}, _images(), _state(), mode='plain')
  chex.assert_trees_all_close(out, ref, atol=1e-6)
  # Prompted modes differ (the prompts do act).
  topk = _model().apply({'params': params}, _images(), _state(), mode='train')
  assert not np.allclose(topk['logits'], ref['logits'], atol=1e-4)


def test_blocks_from_l_on_are_plain_attention():
  """Replays every block on its captured input: blocks >= L are plain."""
  params = _params()
  out, state = _model().apply({'params': params}, _images(), _state(),
                              mode='train', capture_intermediates=True,
                              mutable=['intermediates'])
  inter = state['intermediates']['Transformer']
  block_out = [inter[f'encoderblock_{i}']['__call__'][0] for i in range(LAYERS)]
  for i in range(LAYERS):
    x_out, routing = block_out[i]
    chex.assert_shape(x_out, (B, N, D))
    if i < L:
      chex.assert_shape(routing['scores'], (B, H, E))
      chex.assert_trees_all_equal(routing['scores'], out['scores'][i])
      chex.assert_trees_all_equal(routing['selected'], out['selected'][i])
    else:
      assert routing is None
      x_in = block_out[i - 1][0]
      block = vit.Encoder1DBlock(H, MLP)
      ref, ref_routing = block.apply(
          {'params': params['Transformer'][f'encoderblock_{i}']}, x_in)
      assert ref_routing is None
      np.testing.assert_allclose(x_out, ref, atol=1e-5, rtol=1e-5)
  assert L < LAYERS  # The loop above did check an unprompted block.


def _batch(seed: int = 1, first: int = 3, end: int = 6):
  labels = jnp.asarray(
      np.random.default_rng(seed).integers(first, end, B), jnp.int32)
  mask = jnp.ones((B,), jnp.float32).at[-1].set(0.0)
  return {'image': _images(seed), 'label': labels, 'mask': mask}


def _method():
  config = demo.get_config()
  config.update(num_prompted_layers=L, num_experts=E, top_k=K, epsilon=0.4,
                router_weight=0.1, prototype_weight=0.1)
  return smope.SMoPE(config, num_tasks=2, dims=dict(num_heads=H, hidden_size=D,
                                                    num_layers=LAYERS))


def test_gradients_reach_prompts_and_head_only():
  params = _params()
  trainable, frozen = ts.split_params(params)
  assert set(trainable) == {'prompts', 'head'}
  assert not {'prompts', 'head'} & set(frozen)
  chex.assert_trees_all_equal(ts.merge_params(trainable, frozen), params)
  model, batch, state = _model(), _batch(), _state()

  def loss_fn(trainable, router_weight):
    out = model.apply({'params': ts.merge_params(trainable, frozen)},
                      batch['image'], state, mode='train')
    ce = losses.task_cross_entropy(out['logits'], batch['label'], batch['mask'],
                                   3, 6)
    router = losses.router_loss(out['scores'], out['selected'], 0.4,
                                batch['mask'])
    return ce + router_weight * router, out

  grad_fn = jax.jit(jax.grad(loss_fn, has_aux=True))
  grads, out = grad_fn(trainable, 0.1)
  assert set(grads) == {'prompts', 'head'}
  chex.assert_trees_all_equal_shapes(grads, trainable)
  chex.assert_tree_all_finite(grads)
  for leaf in (grads['prompts']['keys'], grads['prompts']['values'],
               grads['head']['kernel'], grads['head']['bias']):
    assert float(jnp.abs(leaf).max()) > 0
  # Only the current task's logits receive gradient.
  g_head = np.asarray(grads['head']['kernel'])
  assert np.all(g_head[:, :3] == 0) and np.all(g_head[:, 6:] == 0)
  assert np.abs(g_head[:, 3:6]).max() > 0

  # Without the router loss, the values of experts that no real sample
  # selected get no gradient (top-K is sparse; the padded row counts 0).
  grads, out = grad_fn(trainable, 0.0)
  used = np.zeros((L, H, E), bool)
  sel = np.asarray(out['selected'])[:, np.asarray(batch['mask']) > 0]
  for l in range(L):
    for h in range(H):
      used[l, h, np.unique(sel[l, :, h])] = True
  g_values = np.abs(np.asarray(grads['prompts']['values'])).sum(-1)
  assert np.all(g_values[~used] == 0)
  assert np.all(g_values[used] > 0)
  assert np.any(~used)


@functools.lru_cache(maxsize=None)
def _optimizer():
  return schedules.adam()


def _inputs(old_keys, class_range=(3, 6)):
  return ts.TaskInputs(
      class_range=jnp.array(class_range, jnp.int32), task=jnp.int32(1), rates={
          'prompts': jnp.float32(0.05),
          'head': jnp.float32(0.01)
      }, method_state={
          **_state(), 'snapshot': {
              'keys': old_keys
          }
      })


@functools.lru_cache(maxsize=None)
def _jitted_train_step(mode: str):
  return jax.jit(
      functools.partial(ts.train_step, model=_model(), method=_method(),
                        tx=_optimizer(), mode=mode))


def _path_names(path):
  return [p.key for p in path if isinstance(p, jax.tree_util.DictKey)]


def test_train_step_leaves_backbone_alone_and_state_holds_trainable_only():
  params = _params()
  trainable, frozen = ts.split_params(params)
  frozen_before = jax.tree_util.tree_map(np.array, frozen)
  opt_state = _optimizer().init(trainable)

  array_leaves = [
      (path, leaf)
      for path, leaf in jax.tree_util.tree_flatten_with_path(opt_state)[0]
      if np.ndim(leaf) > 0
  ]
  n_trainable = len(jax.tree_util.tree_leaves(trainable))
  assert len(array_leaves) == 2 * n_trainable  # Adam's mu and nu.
  for path, leaf in array_leaves:
    names = _path_names(path)
    assert names[0] in ('prompts', 'head'), names
  n_state = sum(np.size(leaf) for leaf in jax.tree_util.tree_leaves(opt_state))
  n_params = sum(np.size(leaf) for leaf in jax.tree_util.tree_leaves(trainable))
  assert n_state < 2 * n_params + 16  # Plus step counters only.

  old_keys = experts.snapshot_prompts(trainable['prompts'])['keys']
  new_trainable, new_opt_state, metrics = _jitted_train_step('train')(
      trainable, opt_state, frozen, _batch(), _inputs(old_keys))
  chex.assert_trees_all_equal(frozen, frozen_before)
  chex.assert_trees_all_equal_structs(new_trainable, trainable)
  chex.assert_trees_all_equal_structs(new_opt_state, opt_state)
  for leaf_new, leaf_old in zip(jax.tree_util.tree_leaves(new_trainable),
                                jax.tree_util.tree_leaves(trainable)):
    assert not np.array_equal(leaf_new, leaf_old)
  for name in ('loss', 'ce', 'router', 'prototype', 'correct', 'count'):
    assert name in metrics
    chex.assert_shape(metrics[name], ())
  chex.assert_tree_all_finite(metrics)
  assert float(metrics['count']) == B - 1
  # The prototype term starts at keys == old keys: a finite positive value.
  assert float(metrics['prototype']) > 0


@pytest.mark.parametrize('mode', ['dense', 'train'])
def test_train_step_reduces_loss_on_a_fixed_batch(mode):
  trainable, frozen = ts.split_params(_params())
  opt_state = _optimizer().init(trainable)
  old_keys = trainable['prompts']['keys']
  step = _jitted_train_step(mode)
  batch, inputs = _batch(), _inputs(old_keys)
  history = []
  for _ in range(6):
    trainable, opt_state, metrics = step(trainable, opt_state, frozen, batch,
                                         inputs)
    chex.assert_tree_all_finite(metrics)
    chex.assert_tree_all_finite(trainable)
    history.append(float(metrics['loss']))
  assert ('router' in metrics) == (mode == 'train')
  assert history[-1] < history[0] - 1e-3, history


def _np_layer_norm(x, p):
  mean = x.mean(-1, keepdims=True)
  var = x.var(-1, keepdims=True)
  return (x - mean) / np.sqrt(var + 1e-6) * p['scale'] + p['bias']


_erf = np.vectorize(math.erf)


def _np_forward(params, images, state, mode):
  """The tiny model written out in float64 NumPy, rule by rule."""
  p = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), params)
  images = np.asarray(images, np.float64)
  g = S // P
  patches = images.reshape(B, g, P, g, P, 3).transpose(0, 1, 3, 2, 4, 5)
  x = patches.reshape(B, g * g, P * P * 3) @ p['embedding']['kernel'].reshape(
      P * P * 3, D) + p['embedding']['bias']
  x = np.concatenate([np.broadcast_to(p['cls'], (B, 1, D)), x], 1)
  x = x + p['Transformer']['posembed_input']['pos_embedding']
  counts, frequent = (np.asarray(state['counts']),
                      np.asarray(state['frequent']))
  scores_all, selected_all = [], []
  for i in range(LAYERS):
    blk = p['Transformer'][f'encoderblock_{i}']
    att = blk['MultiHeadDotProductAttention_1']
    y = _np_layer_norm(x, blk['LayerNorm_0'])
    q, k, v = (np.einsum('bnD,Dhd->bnhd', y, att[n]['kernel']) + att[n]['bias']
               for n in ('query', 'key', 'value'))
    out = np.zeros_like(q)
    prompted = mode != 'plain' and i < L
    if prompted:
      scores = np.zeros((B, H, E))
      selected = np.zeros((B, H, K), np.int64)
    for b in range(B):
      for h in range(H):
        logits = k[b, :, h] @ q[b, :, h].T * HD**-0.5  # (N keys, N queries)
        vals = v[b, :, h]
        if prompted:
          pk = p['prompts']['keys'][i, h]
          pv = p['prompts']['values'][i, h]
          s = pk @ q[b, :, h].mean(0)
          scores[b, h] = s
          if mode == 'dense':
            idx = np.arange(E)
          else:
            if mode == 'train':
              eta = 0.4 * frequent[i, h]
            else:
              eta = 2.0 * (counts[i, h] == 0)
            s_hat = s - eta * (s.max() - s.min())
            idx = np.argsort(-s_hat, kind='stable')[:K]
          selected[b, h] = np.argsort(
              -s, kind='stable')[:K] if (mode == 'dense') else idx
          logits = np.concatenate([
              np.broadcast_to((s[idx] * HD**-0.5)[:, None],
                              (len(idx), N)), logits
          ], 0)
          vals = np.concatenate([pv[idx], vals], 0)
        w = np.exp(logits - logits.max(0))
        w /= w.sum(0)
        out[b, :, h] = w.T @ vals
    if prompted:
      scores_all.append(scores)
      selected_all.append(selected)
    x = x + np.einsum('bnhd,hdD->bnD', out,
                      att['out']['kernel']) + (att['out']['bias'])
    y = _np_layer_norm(x, blk['LayerNorm_2'])
    mlp = blk['MlpBlock_3']
    y = y @ mlp['Dense_0']['kernel'] + mlp['Dense_0']['bias']
    y = 0.5 * y * (1.0 + _erf(y / np.sqrt(2.0)))
    x = x + y @ mlp['Dense_1']['kernel'] + mlp['Dense_1']['bias']
  x = _np_layer_norm(x, p['Transformer']['encoder_norm'])
  pre = x[:, 0]
  result = {
      'pre_logits': pre,
      'logits': pre @ p['head']['kernel'] + p['head']['bias']
  }
  if scores_all:
    result['scores'] = np.stack(scores_all)
    result['selected'] = np.stack(selected_all)
  return result


@pytest.mark.parametrize('mode', ['plain', 'dense', 'train', 'eval'])
def test_forward_matches_numpy_reference(mode):
  state = _state(3)
  counts = np.array(state['counts'])
  counts[0, 0, :2] = 0  # Some never-used experts for the eval rule.
  state = {**state, 'counts': jnp.asarray(counts)}
  images = _images(3)
  for fused in (False, True):
    out = _model(fused_attention=fused).apply({'params': _params()}, images,
                                              state, mode=mode)
    ref = _np_forward(_params(), images, state, mode)
    assert set(out) == set(ref)
    if 'selected' in ref:
      np.testing.assert_array_equal(out['selected'], ref['selected'])
      np.testing.assert_allclose(out['scores'], ref['scores'], rtol=1e-4,
                                 atol=1e-4)
    np.testing.assert_allclose(out['pre_logits'], ref['pre_logits'], rtol=1e-4,
                               atol=1e-4)
    np.testing.assert_allclose(out['logits'], ref['logits'], rtol=1e-4,
                               atol=1e-4)


def test_gelu_is_the_exact_erf_gelu():
  """The fast formulation matches jax's exact (erf) GELU, not the tanh one."""
  x = jnp.linspace(-12.0, 12.0, 20001, dtype=jnp.float32)
  fast = vit.gelu_exact(x)
  exact = jax.nn.gelu(x, approximate=False)
  tanh = jax.nn.gelu(x, approximate=True)
  bound = 2.5e-7 * jnp.maximum(1.0, jnp.abs(x)) + 1e-7
  assert bool(jnp.all(jnp.abs(fast - exact) <= bound))
  assert float(jnp.max(jnp.abs(fast - tanh))) > 1e-4
