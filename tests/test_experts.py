"""Tests for smope_jax.experts: counting, marking and snapshots."""

import functools

import chex
import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from smope_jax import experts
from smope_jax import train_step as ts
from smope_jax.methods import smope
from smope_jax.models import vit
from configs import demo

# The tiny model of test_model.py, so a joint run reuses compiled ops.
B, S, P, D, LAYERS, H, MLP, L, E, K, C = 4, 8, 4, 16, 3, 2, 32, 2, 6, 3, 10


def _method():
  config = demo.get_config()
  config.update(num_prompted_layers=L, num_experts=E, top_k=K, epsilon=0.4)
  return smope.SMoPE(config, num_tasks=2, dims=dict(num_heads=H, hidden_size=D,
                                                    num_layers=LAYERS))


def _model():
  return vit.VisionTransformer(num_classes=C, patch_size=P, hidden_size=D,
                               num_layers=LAYERS, num_heads=H, mlp_dim=MLP,
                               prompts=_method().prompts())


def _count(trainable, frozen, state, batch):
  """The trainer's bookkeeping step (eval routing, clean top-K)."""
  return ts.bookkeeping_step(trainable, frozen, state, batch, 0, model=_model(),
                             method=_method())


def _images(seed: int):
  rng = np.random.default_rng(seed)
  return jnp.asarray(rng.uniform(size=(B, S, S, 3)), jnp.float32)


@functools.lru_cache(maxsize=None)
def _params():
  """Parameters filled with NumPy: prompts uniform [0, 1), the rest small."""
  shapes = jax.eval_shape(
      lambda: _model().init(jax.random.key(0), _images(0), mode='dense'))
  rng = np.random.default_rng(0)
  flat = {}
  for path, leaf in sorted(
      flax.traverse_util.flatten_dict(shapes['params']).items()):
    if path[0] == 'prompts':
      x = rng.uniform(size=leaf.shape)
    elif path[-1] == 'scale':
      x = np.ones(leaf.shape)
    else:
      x = 0.3 * rng.normal(size=leaf.shape)
    flat[path] = jnp.asarray(x, leaf.dtype)
  return flax.traverse_util.unflatten_dict(flat)


def _eval_apply():
  model = _model()
  return lambda params, images, state: model.apply({'params': params}, images,
                                                   state, mode='eval')


def _state(counts, frequent=None):
  counts = jnp.asarray(counts, jnp.int32)
  if frequent is None:
    frequent = jnp.zeros(counts.shape, bool)
  return {'counts': counts, 'frequent': jnp.asarray(frequent, bool)}


def test_init_expert_state():
  state = experts.init_expert_state(3, 2, 5)
  assert set(state) == {'counts', 'frequent'}
  chex.assert_shape(state['counts'], (3, 2, 5))
  chex.assert_type(state['counts'], jnp.int32)
  chex.assert_shape(state['frequent'], (3, 2, 5))
  chex.assert_type(state['frequent'], jnp.bool_)
  assert not np.any(state['counts']) and not np.any(state['frequent'])


def test_batch_counts_from_clean_top_k_and_mask():
  scores = jnp.array([[
      [[5., 4., 3., 2., 1.]],
      [[0., 1., 2., 3., 4.]],
      [[9., 9., 0., 0., 0.]],  # Padding.
      [[1., 9., 0., 8., 2.]]
  ]])  # (1, 4, 1, 5)
  mask = jnp.array([1., 1., 0., 1.])
  counts = experts.batch_activation_counts(scores, 2, mask)
  chex.assert_shape(counts, (1, 1, 5))
  chex.assert_type(counts, jnp.int32)
  np.testing.assert_array_equal(counts[0, 0], [1, 2, 0, 2, 1])
  assert int(counts.sum()) == 2 * 3  # K per real sample.


def test_counts_accumulate_across_batches():
  rng = np.random.default_rng(0)
  state = _state(rng.integers(0, 5, (L, H, E)),
                 rng.uniform(size=(L, H, E)) < 0.5)
  first = jnp.asarray(rng.normal(size=(L, B, H, E)), jnp.float32)
  second = jnp.asarray(rng.normal(size=(L, B, H, E)), jnp.float32)
  mask = jnp.ones((B,)).at[-2:].set(0.0)
  after = experts.update_counts(state, first, K, mask)
  after = experts.update_counts(after, second, K, mask)
  chex.assert_type(after['counts'], jnp.int32)
  expected = (state['counts'] +
              experts.batch_activation_counts(first, K, mask) +
              experts.batch_activation_counts(second, K, mask))
  np.testing.assert_array_equal(after['counts'], expected)
  np.testing.assert_array_equal(after['frequent'], state['frequent'])
  added = np.asarray(after['counts'] - state['counts'])
  np.testing.assert_array_equal(added.sum(-1), np.full((L, H), 2 * (B - 2) * K))


def test_eval_counts_use_clean_scores_and_next_batch_sees_them():
  """An expert with count 0 is never routed to, but counting sees it.

  Layer 0's scores depend only on the images, so its clean top expert for
  sample b is known in advance. With that expert at count 0 eval routing
  skips it; the counting pass (clean top-K) counts it; the next eval pass,
  with the updated counts, can pick it.
  """
  params, images = _params(), _images(1)
  apply = _eval_apply()
  trainable, frozen = ts.split_params(params)
  out = apply(params, images, _state(np.ones((L, H, E))))
  chex.assert_shape(out['scores'], (L, B, H, E))
  chex.assert_type(out['scores'], jnp.float32)
  chex.assert_shape(out['selected'], (L, B, H, K))
  best = np.asarray(jnp.argmax(out['scores'][0], -1))  # (B, H)
  b, h = 0, 0
  star = int(best[b, h])

  counts = np.ones((L, H, E), np.int32)
  counts[0, h, star] = 0
  state = _state(counts)
  out = apply(params, images, state)
  assert star == int(jnp.argmax(out['scores'][0, b, h]))  # Same layer-0 input.
  assert not np.any(np.asarray(out['selected'][0, :, h]) == star)

  # Counting, as the trainer does it (eval routing, clean top-K).
  updated = _count(trainable, frozen, state, {
      'image': images,
      'mask': jnp.ones((B,))
  })
  chex.assert_shape(updated['counts'], (L, H, E))
  chex.assert_type(updated['counts'], jnp.int32)
  _, clean_top = jax.lax.top_k(out['scores'], K)
  expected = counts + np.asarray(
      jax.nn.one_hot(clean_top, E, dtype=jnp.int32).sum((1, 3)))
  np.testing.assert_array_equal(updated['counts'], expected)
  assert int(updated['counts'][0, h, star]) >= 1
  # Not the count of the (penalised) selection.
  by_selection = counts + np.asarray(
      jax.nn.one_hot(out['selected'], E, dtype=jnp.int32).sum((1, 3)))
  assert not np.array_equal(updated['counts'], by_selection)

  out = apply(params, images, updated)
  assert star in np.asarray(out['selected'][0, b, h])


def test_counting_ignores_padding_through_count_step():
  params, images = _params(), _images(2)
  trainable, frozen = ts.split_params(params)
  state = _state(np.ones((L, H, E)))
  mask = jnp.array([1., 1., 0., 0.])
  updated = _count(trainable, frozen, state, {'image': images, 'mask': mask})
  added = np.asarray(updated['counts'] - state['counts'])
  np.testing.assert_array_equal(added.sum(-1), np.full((L, H), 2 * K))
  # Same as counting the first two images alone.
  out = _eval_apply()(params, images, state)
  np.testing.assert_array_equal(
      added,
      experts.batch_activation_counts(out['scores'][:, :2], K, jnp.ones((2,))))


def test_mark_frequent_by_hand():
  counts = np.array([[
      [4, 2, 0, 2],  # 8 / 3 = 2.67 -> expert 0.
      [0, 0, 0, 0],  # Nothing used: all marked.
      [3, 3, 3, 3],  # Threshold 3: all marked.
      [1, 2, 0, 0],  # 3 / 2 = 1.5 -> expert 1.
      [0, 0, 5, 0]
  ]])  # 5 / 1 = 5 -> expert 2.
  state = experts.mark_frequent(_state(counts))
  chex.assert_shape(state['frequent'], (1, 5, 4))
  chex.assert_type(state['frequent'], jnp.bool_)
  np.testing.assert_array_equal(
      state['frequent'][0],
      [[True, False, False, False], [True, True, True, True],
       [True, True, True, True], [False, True, False, False],
       [False, False, True, False]])
  np.testing.assert_array_equal(state['counts'], counts)
  # The threshold divides by the USED experts, not by E (8 / 4 = 2 would
  # also mark experts 1 and 3 in the first head).
  assert not state['frequent'][0, 0, 1]


def test_marks_are_never_removed():
  counts = np.array([[[6, 1, 1, 0]]])
  state = experts.mark_frequent(_state(counts))
  np.testing.assert_array_equal(state['frequent'][0, 0],
                                [True, False, False, False])
  # Later counts make expert 0 rare and expert 2 frequent.
  state = {**state, 'counts': jnp.array([[[6, 1, 20, 0]]], jnp.int32)}
  state = experts.mark_frequent(state)
  np.testing.assert_array_equal(state['frequent'][0, 0],
                                [True, False, True, False])
  state = experts.mark_frequent(state)
  np.testing.assert_array_equal(state['frequent'][0, 0],
                                [True, False, True, False])


def test_snapshot_is_a_copy():
  rng = np.random.default_rng(3)
  prompts = {
      'keys': rng.uniform(size=(L, H, E, 4)).astype(np.float32),
      'values': rng.uniform(size=(L, H, E, 4)).astype(np.float32)
  }
  original = jax.tree_util.tree_map(np.copy, prompts)
  snap = experts.snapshot_prompts(prompts)
  chex.assert_trees_all_equal_shapes_and_dtypes(snap, prompts)
  chex.assert_trees_all_equal(snap, original)
  # Mutating the (host) originals in place leaves the snapshot alone.
  prompts['keys'][...] = 7.0
  prompts['values'] += 1.0
  chex.assert_trees_all_equal(snap, original)

  # So does an optimizer update of device arrays.
  params = jax.tree_util.tree_map(jnp.asarray, original)
  snap = experts.snapshot_prompts(params)
  tx = optax.adam(0.1)
  grads = jax.tree_util.tree_map(jnp.ones_like, params)
  updates, _ = tx.update(grads, tx.init(params), params)
  params = optax.apply_updates(params, updates)
  assert not np.allclose(params['keys'], original['keys'])
  chex.assert_trees_all_equal(snap, original)
  for a, b in zip(jax.tree_util.tree_leaves(snap),
                  jax.tree_util.tree_leaves(params)):
    assert a is not b
