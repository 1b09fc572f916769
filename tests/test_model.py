"""Tests for smope_jax.models.vit and the train step on a tiny model."""

import functools
import types

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
from smope_jax.models import vit

B, S, P, D, LAYERS, H, MLP, L, E, K, C = 4, 8, 4, 16, 3, 2, 32, 2, 6, 3, 10
N = (S // P) ** 2 + 1
HD = D // H

TINY = dict(num_classes=C, patch_size=P, hidden_size=D, num_layers=LAYERS,
            num_heads=H, mlp_dim=MLP, num_prompted_layers=L, num_experts=E,
            top_k=K, epsilon=0.4)


def _model(**overrides):
  return vit.SMoPEViT(**{**TINY, **overrides})


def _images(seed: int = 0, batch: int = B):
  return jax.random.uniform(jax.random.key(seed), (batch, S, S, 3))


@functools.lru_cache(maxsize=None)
def _params():
  return _model().init(jax.random.key(0), _images(), mode='dense')['params']


def _state(seed: int = 0):
  rng = np.random.default_rng(seed)
  counts = rng.integers(1, 4, (L, H, E)).astype(np.int32)
  return {'counts': jnp.asarray(counts),
          'frequent': jnp.asarray(rng.uniform(size=(L, H, E)) < 0.3)}


def _flat(tree):
  return {'/'.join(k): v for k, v in
          flax.traverse_util.flatten_dict(flax.core.unfreeze(tree)).items()}


def test_param_tree_follows_google_layout():
  params = _flat(_params())
  expected = {
      'embedding/kernel': (P, P, 3, D), 'embedding/bias': (D,),
      'cls': (1, 1, D),
      'Transformer/posembed_input/pos_embedding': (1, N, D),
      'Transformer/encoder_norm/scale': (D,),
      'Transformer/encoder_norm/bias': (D,),
      'head/kernel': (D, C), 'head/bias': (C,),
      'prompts/keys': (L, H, E, HD), 'prompts/values': (L, H, E, HD),
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
  params = _params()
  for name in ('keys', 'values'):
    x = np.asarray(params['prompts'][name])
    chex.assert_shape(x, (L, H, E, HD))
    assert x.min() >= 0.0 and x.max() < 1.0
    assert 0.35 < x.mean() < 0.65
    assert x.std() > 0.2  # Uniform [0, 1): std 0.289.
  assert not np.array_equal(params['prompts']['keys'],
                            params['prompts']['values'])


def test_vit_b16_learnable_parameter_count():
  model = vit.SMoPEViT(num_classes=200, **vit.VIT_VARIANTS['B/16'],
                       num_prompted_layers=6, num_experts=25, top_k=5)
  shapes = jax.eval_shape(
      lambda: model.init(jax.random.key(0), jnp.zeros((1, 224, 224, 3)),
                         mode='dense'))['params']
  chex.assert_shape(shapes['prompts']['keys'], (6, 12, 25, 64))
  chex.assert_shape(shapes['prompts']['values'], (6, 12, 25, 64))
  chex.assert_shape(shapes['Transformer']['posembed_input']['pos_embedding'],
                    (1, 197, 768))
  size = lambda tree: sum(x.size for x in jax.tree_util.tree_leaves(tree))  # noqa: E731
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


def test_modes_needing_state_and_bad_mode_raise():
  model, params = _model(), _params()
  for mode in ('train', 'eval'):
    with pytest.raises(ValueError):
      model.apply({'params': params}, _images(), None, mode=mode)
  with pytest.raises(ValueError):
    model.apply({'params': params}, _images(), _state(), mode='topk')


def test_bfloat16_model_keeps_scores_and_logits_float32():
  model = _model(dtype=jnp.bfloat16)
  out = model.apply({'params': _params()}, _images(), _state(), mode='train')
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
  out, state = _model().apply(
      {'params': params}, _images(), _state(), mode='train',
      capture_intermediates=True, mutable=['intermediates'])
  inter = state['intermediates']['Transformer']
  block_out = [inter[f'encoderblock_{i}']['__call__'][0]
               for i in range(LAYERS)]
  for i in range(LAYERS):
    x_out, routing = block_out[i]
    chex.assert_shape(x_out, (B, N, D))
    if i < L:
      scores, selected = routing
      chex.assert_shape(scores, (B, H, E))
      chex.assert_trees_all_equal(scores, out['scores'][i])
      chex.assert_trees_all_equal(selected, out['selected'][i])
    else:
      assert routing is None
      x_in = block_out[i - 1][0]
      block = vit.Encoder1DBlock(H, MLP, K)
      ref, ref_routing = block.apply(
          {'params': params['Transformer'][f'encoderblock_{i}']}, x_in)
      assert ref_routing is None
      np.testing.assert_allclose(x_out, ref, atol=1e-5, rtol=1e-5)
  # Changing a prompted block's experts changes nothing before that block.
  assert L < LAYERS


def _batch(seed: int = 1, first: int = 3, end: int = 6):
  labels = jnp.asarray(np.random.default_rng(seed).integers(first, end, B),
                       jnp.int32)
  mask = jnp.ones((B,), jnp.float32).at[-1].set(0.0)
  return {'image': _images(seed), 'label': labels, 'mask': mask}


WEIGHTS = ts.LossWeights(router=0.1, prototype=0.1, epsilon=0.4, top_k=K)


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
    ce = losses.task_cross_entropy(out['logits'], batch['label'],
                                   batch['mask'], 3, 6)
    router = losses.router_loss(out['scores'], out['selected'], 0.4,
                                batch['mask'])
    return ce + router_weight * router, out

  grads, out = jax.grad(loss_fn, has_aux=True)(trainable, 0.1)
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

  # Without the router loss, the values of experts that no (layer, sample,
  # head) selected get no gradient (top-K is sparse).
  grads, out = jax.grad(loss_fn, has_aux=True)(trainable, 0.0)
  used = np.zeros((L, H, E), bool)
  sel = np.asarray(out['selected'])
  for l in range(L):
    for h in range(H):
      used[l, h, np.unique(sel[l, :, h])] = True
  g_values = np.abs(np.asarray(grads['prompts']['values'])).sum(-1)
  assert np.all(g_values[~used] == 0)
  assert np.all(g_values[used] > 0)
  assert np.any(~used)


def _config(**overrides):
  fields = dict(schedule='cosine', lr=0.01, prompt_lr_multiplier=5.0,
                freeze_steps=0, weight_decay=0.0)
  return types.SimpleNamespace(**{**fields, **overrides})


def _path_names(path):
  return [p.key for p in path if isinstance(p, jax.tree_util.DictKey)]


def test_train_step_leaves_backbone_alone_and_state_holds_trainable_only():
  params = _params()
  trainable, frozen = ts.split_params(params)
  frozen_before = jax.tree_util.tree_map(np.array, frozen)
  tx = schedules.task_optimizer(_config(), steps_per_epoch=5, num_epochs=2)
  opt_state = tx.init(trainable)

  array_leaves = [
      (path, leaf) for path, leaf in
      jax.tree_util.tree_flatten_with_path(opt_state)[0] if np.ndim(leaf) > 0]
  n_trainable = len(jax.tree_util.tree_leaves(trainable))
  assert len(array_leaves) == 2 * n_trainable  # Adam's mu and nu.
  for path, leaf in array_leaves:
    names = _path_names(path)
    assert names[0] in ('prompts', 'head'), names
  n_state = sum(np.size(leaf) for leaf in jax.tree_util.tree_leaves(opt_state))
  n_params = sum(np.size(leaf) for leaf in jax.tree_util.tree_leaves(trainable))
  assert n_state < 2 * n_params + 16  # Plus step counters only.

  old_keys = experts.snapshot_prompts(trainable['prompts'])['keys']
  new_trainable, new_opt_state, metrics = ts.train_step(
      trainable, opt_state, frozen, _state(), old_keys, _batch(),
      jnp.array([3, 6], jnp.int32), model=_model(), tx=tx, mode='train',
      weights=WEIGHTS, use_prototype=True)
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
  tx = schedules.task_optimizer(_config(lr=0.01), steps_per_epoch=10,
                                num_epochs=1)
  opt_state = tx.init(trainable)
  old_keys = trainable['prompts']['keys']
  step = jax.jit(functools.partial(
      ts.train_step, model=_model(), tx=tx, mode=mode, weights=WEIGHTS,
      use_prototype=(mode == 'train')))
  batch, state = _batch(), _state()
  class_range = jnp.array([3, 6], jnp.int32)
  history = []
  for _ in range(6):
    trainable, opt_state, metrics = step(trainable, opt_state, frozen, state,
                                         old_keys, batch, class_range)
    chex.assert_tree_all_finite(metrics)
    chex.assert_tree_all_finite(trainable)
    history.append(float(metrics['loss']))
  assert ('router' in metrics) == (mode == 'train')
  assert history[-1] < history[0] - 1e-3, history
