"""Tests for smope_jax.schedules: learning-rate schedules and the optimizer."""

import math
import types

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from smope_jax import schedules


def _lr(schedule, step):
  value = schedule(jnp.asarray(step, jnp.int32))
  chex.assert_shape(value, ())
  return float(value)


def test_frozen_then_cosine():
  base, total, freeze = 0.01, 100, 10
  schedule = schedules.frozen_then_cosine(base, total, freeze)
  for step in range(freeze):
    assert _lr(schedule, step) == pytest.approx(1e-6, rel=1e-5)
  assert _lr(schedule, freeze) == pytest.approx(base, rel=1e-6)
  n = total - freeze
  for step in range(freeze, total):
    i = step - freeze
    expected = 1e-6 + 0.5 * (base - 1e-6) * (1 + math.cos(math.pi * i / n))
    assert _lr(schedule, step) == pytest.approx(expected, rel=1e-4, abs=1e-9)
  last = _lr(schedule, total - 1)
  assert 1e-6 < last < 1e-5
  for step in (total, total + 1, 10 * total):
    assert _lr(schedule, step) == pytest.approx(1e-6, rel=1e-5)
  cosine = np.array([_lr(schedule, s) for s in range(freeze, total)])
  assert np.all(np.diff(cosine) < 0)
  # Jit-friendly: a traced step gives the same values.
  steps = jnp.arange(total + 3)
  np.testing.assert_allclose(
      jax.jit(jax.vmap(schedule))(steps),
      [_lr(schedule, int(s)) for s in steps], rtol=1e-4)


def test_frozen_then_cosine_without_freeze_and_custom_final():
  schedule = schedules.frozen_then_cosine(1e-5, 50, 0, final_lr=1e-6)
  assert _lr(schedule, 0) == pytest.approx(1e-5, rel=1e-6)
  assert _lr(schedule, 25) == pytest.approx(0.5 * (1e-5 + 1e-6), rel=1e-5)
  assert _lr(schedule, 50) == pytest.approx(1e-6, rel=1e-5)


@pytest.mark.parametrize('epochs', [2, 5, 20])
def test_per_epoch_cosine(epochs):
  base, steps_per_epoch = 0.005, 7
  schedule = schedules.per_epoch_cosine(base, steps_per_epoch, epochs)
  for step in range(steps_per_epoch * epochs):
    e = step // steps_per_epoch
    expected = base * math.cos(99 * math.pi * e / (200 * (epochs - 1)))
    assert _lr(schedule, step) == pytest.approx(expected, rel=1e-5)
  assert _lr(schedule, 0) == pytest.approx(base)
  last = _lr(schedule, steps_per_epoch * epochs - 1)
  assert last == pytest.approx(base * math.cos(0.495 * math.pi), rel=1e-4)
  assert 0 < last < 0.02 * base


def _config(**overrides):
  fields = dict(schedule='cosine', lr=1e-3, prompt_lr_multiplier=5.0,
                freeze_steps=0, weight_decay=0.0)
  return types.SimpleNamespace(**{**fields, **overrides})


def _trainable():
  rng = np.random.default_rng(0)
  return {
      'prompts': {'keys': jnp.asarray(rng.uniform(size=(2, 3, 4, 5)),
                                      jnp.float32),
                  'values': jnp.asarray(rng.uniform(size=(2, 3, 4, 5)),
                                        jnp.float32)},
      'head': {'kernel': jnp.asarray(rng.normal(size=(6, 7)), jnp.float32),
               'bias': jnp.asarray(rng.normal(size=(7,)), jnp.float32)},
  }


def _first_update(config, grads=None):
  params = _trainable()
  if grads is None:
    rng = np.random.default_rng(1)
    grads = jax.tree_util.tree_map(
        lambda x: jnp.asarray(rng.normal(size=x.shape) + 0.5, jnp.float32),
        params)
  tx = schedules.task_optimizer(config, steps_per_epoch=10, num_epochs=3)
  updates, _ = tx.update(grads, tx.init(params), params)
  chex.assert_trees_all_equal_shapes_and_dtypes(updates, params)
  return updates, grads


@pytest.mark.parametrize('kind', ['cosine', 'epoch_cosine'])
def test_task_optimizer_gives_prompts_five_times_the_rate(kind):
  updates, grads = _first_update(_config(schedule=kind))
  # First Adam step from zero moments: |update| = lr * |g| / (|g| + eps).
  for path, leaf in (('prompts', 'keys'), ('prompts', 'values'),
                     ('head', 'kernel'), ('head', 'bias')):
    lr = 5e-3 if path == 'prompts' else 1e-3
    u, g = np.asarray(updates[path][leaf]), np.asarray(grads[path][leaf])
    np.testing.assert_allclose(np.abs(u), lr, rtol=1e-3)
    assert np.all(np.sign(u) == -np.sign(g))
  ratio = (np.abs(updates['prompts']['keys']).mean() /
           np.abs(updates['head']['kernel']).mean())
  assert ratio == pytest.approx(5.0, rel=1e-3)


def test_task_optimizer_freeze_steps_and_no_weight_decay():
  # Spec 4: the first `freeze_steps` iterations run at 1e-6 (both groups).
  updates, _ = _first_update(_config(freeze_steps=3))
  for leaf in jax.tree_util.tree_leaves(updates):
    np.testing.assert_allclose(np.abs(leaf), 1e-6, rtol=1e-3)
  # Zero gradients and nonzero parameters: weight decay 0 means no update.
  zeros = jax.tree_util.tree_map(jnp.zeros_like, _trainable())
  updates, _ = _first_update(_config(), grads=zeros)
  for leaf in jax.tree_util.tree_leaves(updates):
    np.testing.assert_array_equal(leaf, np.zeros(leaf.shape))
  # A nonzero weight decay would move them: the test can see decay.
  updates, _ = _first_update(_config(weight_decay=0.1), grads=zeros)
  assert float(jnp.abs(updates['head']['kernel']).max()) > 0


def test_unknown_schedule_raises():
  with pytest.raises(ValueError):
    schedules.task_schedule('linear', 0.1, 10, 2, 0)
