"""Tests for smope_jax.losses against direct NumPy computations."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from smope_jax import losses

LAYERS, B, H, E, K, D = 2, 5, 3, 7, 3, 4


def _log_softmax(x):
  x = np.asarray(x, np.float64)
  m = x.max(-1, keepdims=True)
  return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def test_masked_mean():
  values = jnp.array([1.0, 2.0, 3.0, 100.0])
  mask = jnp.array([1.0, 1.0, 1.0, 0.0])
  out = losses.masked_mean(values, mask)
  chex.assert_shape(out, ())
  assert float(out) == pytest.approx(2.0)
  assert float(losses.masked_mean(values, jnp.zeros(4))) == 0.0


@pytest.mark.parametrize('first,end', [(0, 4), (4, 7), (7, 10)])
def test_task_cross_entropy_is_ce_over_current_task(first, end):
  rng = np.random.default_rng(first)
  logits = jnp.asarray(rng.normal(size=(6, 10)) * 3, jnp.float32)
  labels = jnp.asarray(rng.integers(first, end, 6), jnp.int32)
  mask = jnp.array([1, 1, 0, 1, 1, 0], jnp.float32)
  loss = losses.task_cross_entropy(logits, labels, mask, first, end)
  chex.assert_shape(loss, ())
  chex.assert_type(loss, jnp.float32)

  task = np.asarray(logits)[:, first:end]
  ce = -_log_softmax(task)[np.arange(6), np.asarray(labels) - first]
  expected = (ce * np.asarray(mask)).sum() / np.asarray(mask).sum()
  np.testing.assert_allclose(loss, expected, rtol=1e-5)

  # Traced bounds give the same value (one compiled step for every task).
  jitted = jax.jit(losses.task_cross_entropy)(logits, labels, mask,
                                              jnp.int32(first), jnp.int32(end))
  np.testing.assert_allclose(jitted, expected, rtol=1e-5)

  # Earlier tasks, unseen classes and padded rows do not matter.
  outside = np.ones(10, bool)
  outside[first:end] = False
  changed = np.asarray(logits).copy()
  changed[:, outside] += 50.0 * rng.normal(size=(6, outside.sum()))
  changed[np.asarray(mask) == 0] = 123.0
  loss2 = losses.task_cross_entropy(jnp.asarray(changed), labels, mask, first,
                                    end)
  np.testing.assert_allclose(loss2, loss, rtol=1e-6)


def test_task_cross_entropy_gradient_has_no_nan():
  rng = np.random.default_rng(1)
  logits = jnp.asarray(rng.normal(size=(4, 10)), jnp.float32)
  labels = jnp.array([4, 5, 6, 4], jnp.int32)
  mask = jnp.array([1, 1, 1, 0], jnp.float32)
  grad = jax.grad(losses.task_cross_entropy)(logits, labels, mask, 4, 7)
  chex.assert_shape(grad, (4, 10))
  chex.assert_tree_all_finite(grad)
  grad = np.asarray(grad)
  assert np.all(grad[:, :4] == 0) and np.all(grad[:, 7:] == 0)
  assert np.all(grad[3] == 0)  # Padded row.
  # Softmax gradient of a mean: rows sum to 0, p - onehot over the task.
  p = np.exp(_log_softmax(np.asarray(logits)[:3, 4:7]))
  p[np.arange(3), np.asarray(labels[:3]) - 4] -= 1.0
  np.testing.assert_allclose(grad[:3, 4:7], p / 3, rtol=1e-5, atol=1e-7)


def test_task_cross_entropy_padding_with_foreign_label_stays_finite():
  """A padded row whose label lies outside the task has CE = inf.

  The data pipeline gives padding a label of the task, but masked_mean must
  not turn 0 * inf into NaN for any caller.
  """
  logits = jnp.asarray(
      np.random.default_rng(2).normal(size=(3, 10)), jnp.float32)
  labels = jnp.array([4, 5, 0], jnp.int32)
  mask = jnp.array([1, 1, 0], jnp.float32)
  loss = losses.task_cross_entropy(logits, labels, mask, 4, 7)
  grad = jax.grad(losses.task_cross_entropy)(logits, labels, mask, 4, 7)
  chex.assert_tree_all_finite((loss, grad))


def _routing(seed: int):
  rng = np.random.default_rng(seed)
  scores = rng.normal(size=(LAYERS, B, H, E)).astype(np.float32)
  # Any K distinct experts per (layer, sample, head).
  selected = np.argsort(rng.uniform(size=(LAYERS, B, H, E)), -1)[..., :K]
  mask = np.array([1, 1, 1, 0, 1], np.float32)
  return (jnp.asarray(scores), jnp.asarray(selected,
                                           jnp.int32), jnp.asarray(mask))


def _numpy_router_loss(scores, selected, epsilon, mask):
  scores = np.asarray(scores, np.float64)
  selected, mask = np.asarray(selected), np.asarray(mask, np.float64)
  total = 0.0
  for l in range(scores.shape[0]):
    for h in range(scores.shape[2]):
      for k in range(selected.shape[-1]):
        ce = np.zeros(scores.shape[1])
        for b in range(scores.shape[1]):
          s = scores[l, b, h]
          onehot = np.zeros(s.shape)
          onehot[selected[l, b, h]] = 1.0
          logits = s + epsilon * (1 - onehot) * (s.max() - s.min())
          ce[b] = -_log_softmax(logits)[selected[l, b, h, k]]
        total += (ce * mask).sum() / mask.sum()
  return total


@pytest.mark.parametrize('epsilon', [0.0, 0.4, 0.7])
def test_router_loss_matches_numpy(epsilon):
  scores, selected, mask = _routing(int(epsilon * 10))
  loss = losses.router_loss(scores, selected, epsilon, mask)
  chex.assert_shape(loss, ())
  chex.assert_type(loss, jnp.float32)
  np.testing.assert_allclose(
      loss, _numpy_router_loss(scores, selected, epsilon, mask), rtol=1e-5)


def test_router_margin_carries_no_gradient():
  scores, selected, mask = _routing(5)
  epsilon = 0.5
  grad = jax.grad(losses.router_loss)(scores, selected, epsilon, mask)
  chex.assert_shape(grad, (LAYERS, B, H, E))
  chex.assert_tree_all_finite(grad)

  spread = scores.max(-1, keepdims=True) - scores.min(-1, keepdims=True)
  chosen = jax.nn.one_hot(selected, E).max(-2)

  def with_spread(s, spread):
    logits = s + epsilon * (1.0 - chosen) * spread
    picked = -jnp.take_along_axis(jax.nn.log_softmax(logits), selected, -1)
    return losses.masked_mean(picked.sum(axis=(0, 2, 3)), mask)

  # Spread held constant: same gradient.
  expected = jax.grad(with_spread)(scores, spread)
  np.testing.assert_allclose(grad, expected, rtol=1e-5, atol=1e-7)
  # Differentiating through max/min would change it.
  leaky = jax.grad(lambda s: with_spread(
      s,
      s.max(-1, keepdims=True) - s.min(-1, keepdims=True)))(scores)
  assert not np.allclose(leaky, grad, atol=1e-4)
  # Softmax-CE gradients: every (l, b, h) row sums to 0; padded row is 0.
  np.testing.assert_allclose(np.asarray(grad).sum(-1), 0.0, atol=1e-6)
  assert np.all(np.asarray(grad)[:, 3] == 0)


def _keys(seed: int):
  rng = np.random.default_rng(seed)
  old = rng.uniform(size=(LAYERS, H, E, D)).astype(np.float32)
  new = (old + 0.3 * rng.normal(size=old.shape)).astype(np.float32)
  return jnp.asarray(new), jnp.asarray(old)


def _numpy_prototype_loss(keys, old_keys, frequent, top_k):
  keys, old = np.asarray(keys, np.float64), np.asarray(old_keys, np.float64)
  frequent = np.asarray(frequent)
  total = 0.0
  for l in range(keys.shape[0]):
    for h in range(keys.shape[1]):
      marked = np.flatnonzero(frequent[l, h])
      if marked.size == 0:
        continue
      per_u = []
      for u in marked:
        sim = old[l, h] @ old[l, h, u]
        targets = np.argsort(-sim, kind='stable')[:top_k]
        log_p = _log_softmax(keys[l, h] @ old[l, h, u])
        per_u.append(-log_p[targets].sum())
      total += np.mean(per_u)
  return total


def test_prototype_loss_matches_numpy():
  keys, old = _keys(0)
  frequent = np.zeros((LAYERS, H, E), bool)
  frequent[0, 0, [1, 4]] = True
  frequent[0, 2, :] = True
  frequent[1, 1, 6] = True  # Heads (0, 1), (1, 0), (1, 2) have no marks.
  loss = losses.prototype_loss(keys, old, jnp.asarray(frequent), K)
  chex.assert_shape(loss, ())
  chex.assert_type(loss, jnp.float32)
  np.testing.assert_allclose(loss,
                             _numpy_prototype_loss(keys, old, frequent,
                                                   K), rtol=1e-5)
  # Nothing marked: zero, with zero gradient.
  none = jnp.zeros((LAYERS, H, E), bool)
  assert float(losses.prototype_loss(keys, old, none, K)) == 0.0
  grad = jax.grad(losses.prototype_loss)(keys, old, none, K)
  np.testing.assert_array_equal(grad, np.zeros(keys.shape))


def test_prototype_loss_gradient_only_reaches_current_keys():
  keys, old = _keys(1)
  frequent = jnp.asarray(
      np.random.default_rng(1).uniform(size=(LAYERS, H, E)) < 0.4)
  g_keys, g_old = jax.grad(losses.prototype_loss, argnums=(0, 1))(keys, old,
                                                                  frequent, K)
  chex.assert_shape(g_keys, (LAYERS, H, E, D))
  chex.assert_shape(g_old, (LAYERS, H, E, D))
  chex.assert_tree_all_finite((g_keys, g_old))
  np.testing.assert_array_equal(g_old, np.zeros(old.shape))
  assert float(jnp.abs(g_keys).max()) > 0
  # Heads without marks get no gradient.
  empty = ~np.asarray(frequent).any(-1)
  assert np.all(np.asarray(g_keys)[empty] == 0)
  # At keys == old keys the loss is still positive (soft targets).
  assert float(losses.prototype_loss(old, old, frequent, K)) > 0
