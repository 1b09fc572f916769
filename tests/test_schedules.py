"""The learning rate of every optimizer step, and the update it scales.

The reference's schedulers lag one step: step 0 of every phase runs at the
group's base rate and step n >= 1 at schedule[n - 1]. Each case below is
small enough to write out by hand.
"""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from smope_jax import schedules
from smope_jax.schedules import Schedule
from configs import cifar100, cub200, demo


def _cosine(start, final, i, n):
  return final + 0.5 * (start - final) * (1 + math.cos(math.pi * i / n))


def test_top_k_phase_rates_by_hand():
  # 2 epochs of 5 steps laid out as 2 x 6 schedule iterations, freeze 3.
  config = demo.get_config()
  config.update(lr=0.01, prompt_lr_multiplier=5.0, freeze_steps=3,
                iters_per_epoch=6, schedule="cosine")
  rates = schedules.phase_schedules(config, epochs=2, loader_steps=5)
  n = 12 - 3  # Cosine iterations of the curve.
  for group, base in (("prompts", 0.05), ("head", 0.01)):
    got = rates[group].rates(10)
    want = [base, 1e-6, 1e-6, 1e-6
           ] + [_cosine(base, 1e-6, i, n) for i in range(6)]
    np.testing.assert_allclose(got, want, rtol=1e-6)
    assert got[4] == pytest.approx(base)  # The cosine starts one step late.
  # The phase stops after 10 steps, before the curve's end.
  assert rates["head"](9) > 1e-3


def test_dense_warm_up_has_its_own_shorter_schedule():
  config = demo.get_config()
  config.update(lr=0.01, freeze_steps=2, iters_per_epoch=0, epochs=4)
  run_epochs = max(int(config.epochs * 0.5), 1)
  rates = schedules.phase_schedules(config, run_epochs, loader_steps=3)
  got = rates["head"].rates(6)
  n = 6 - 2
  want = [0.01, 1e-6, 1e-6] + [_cosine(0.01, 1e-6, i, n) for i in range(3)]
  np.testing.assert_allclose(got, want, rtol=1e-6)


def test_past_the_curve_the_rate_stays_final():
  schedule = Schedule("cosine", base_lr=0.1, total_steps=4, freeze_steps=1)
  assert [schedule(s) for s in (5, 6, 50)] == [1e-6] * 3


def test_cub_per_epoch_schedule_lags_one_epoch():
  config = cub200.get_config()
  config.lr = 0.005
  epochs, steps = 4, 3
  rates = schedules.phase_schedules(config, epochs, loader_steps=steps)
  got = rates["head"].rates(epochs * steps)
  per_epoch = [0.005] + [
      0.005 * math.cos(99 * math.pi * (e - 1) / (200 * (epochs - 1)))
      for e in range(1, epochs)
  ]
  np.testing.assert_allclose(got, np.repeat(per_epoch, steps), rtol=1e-6)
  # Epochs 0 and 1 both run at the base rate.
  assert got[0] == got[steps] == pytest.approx(0.005)
  np.testing.assert_allclose(rates["prompts"].rates(epochs * steps), 5 * got,
                             rtol=1e-6)


def test_undelayed_per_epoch_schedule_of_the_baselines():
  schedule = Schedule("epoch_cosine", base_lr=1e-3, steps_per_epoch=2,
                      num_epochs=3, delayed=False)
  want = [1e-3 * math.cos(99 * math.pi * e / 400) for e in range(3)]
  np.testing.assert_allclose(schedule.rates(6), np.repeat(want, 2), rtol=1e-6)


def test_alignment_schedule_first_step_at_the_group_rate():
  # ca_lr = 1e-4: step 0 at 1e-4, then the cosine 1e-5 -> 1e-6, one late.
  schedule = Schedule("cosine", base_lr=1e-4, start_lr=1e-5, final_lr=1e-6,
                      total_steps=6)
  want = [1e-4] + [_cosine(1e-5, 1e-6, i, 6) for i in range(5)]
  np.testing.assert_allclose(schedule.rates(6), want, rtol=1e-6)
  assert schedule(1) == pytest.approx(1e-5)


def test_cifar_schedule_is_sized_by_iter_step_not_the_loader():
  config = cifar100.get_config()
  rates = schedules.phase_schedules(config, config.epochs, loader_steps=39)
  head = rates["head"]
  assert head.total_steps == 40 * 20 and head.freeze_steps == 80
  assert head(0) == pytest.approx(0.005) and head(80) == pytest.approx(1e-6)
  assert head(81) == pytest.approx(0.005)
  # The run stops after 39 * 20 steps, before the cosine reaches 1e-6.
  assert head(39 * 20 - 1) > 1e-5


def test_unknown_schedule_raises():
  with pytest.raises(ValueError):
    Schedule("linear", base_lr=0.1)


def _trainable():
  rng = np.random.default_rng(0)
  return {
      "prompts": {
          "keys": jnp.asarray(rng.uniform(size=(2, 3, 4, 5)), jnp.float32)
      },
      "head": {
          "kernel": jnp.asarray(rng.normal(size=(6, 7)), jnp.float32),
          "bias": jnp.asarray(rng.normal(size=(7,)), jnp.float32)
      },
  }


def _first_update(weight_decay=0.0, grads=None, rates=None):
  params = _trainable()
  if grads is None:
    rng = np.random.default_rng(1)
    grads = jax.tree_util.tree_map(
        lambda x: jnp.asarray(rng.normal(size=x.shape) + 0.5, jnp.float32),
        params)
  tx = schedules.adam(weight_decay)
  direction, _ = tx.update(grads, tx.init(params), params)
  updates = schedules.apply_rates(direction, rates or {
      "prompts": 5e-3,
      "head": 1e-3
  })
  chex.assert_trees_all_equal_shapes_and_dtypes(updates, params)
  return updates, grads


def test_each_group_moves_at_its_own_rate():
  updates, grads = _first_update()
  # First Adam step from zero moments: |update| = lr * |g| / (|g| + eps).
  for group, leaf, lr in (("prompts", "keys", 5e-3), ("head", "kernel", 1e-3),
                          ("head", "bias", 1e-3)):
    u, g = np.asarray(updates[group][leaf]), np.asarray(grads[group][leaf])
    np.testing.assert_allclose(np.abs(u), lr, rtol=1e-3)
    assert np.all(np.sign(u) == -np.sign(g))


def test_weight_decay_is_decoupled_and_off_by_default():
  zeros = jax.tree_util.tree_map(jnp.zeros_like, _trainable())
  updates, _ = _first_update(grads=zeros)
  for leaf in jax.tree_util.tree_leaves(updates):
    np.testing.assert_array_equal(leaf, np.zeros(leaf.shape))
  # AdamW: -lr * wd * param for a zero gradient.
  updates, _ = _first_update(weight_decay=0.1, grads=zeros)
  np.testing.assert_allclose(updates["head"]["kernel"],
                             -1e-3 * 0.1 * _trainable()["head"]["kernel"],
                             rtol=1e-5)
