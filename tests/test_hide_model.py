"""HiDe-Prompt's model-side rules on tiny inputs, against NumPy.

The key/value pairing is checked against the reference's own arithmetic
(select a (2, n) grid, reshape it to (n, 2)) written in NumPy, on full and
short windows; slot routing, the momentum blend and the prompt copy/merge
on hand-made prompts; the TII classifier's forward, masked CE, gradient
(NumPy backpropagation) and one clipped optimizer step; the contrastive
term and its gradient (analytic, float64) per group of 24 and as one
group; inference through a given task prediction; the whole prompted tiny
ViT in every routing; the ViT-B/16 parameter counts from shapes alone.
"""

import math

import chex
import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from smope_jax import schedules
from smope_jax.hide import losses as hl
from smope_jax.hide import prompts as hp
from smope_jax.models import vit
from tests.test_baselines import B
from tests.test_baselines import C
from tests.test_baselines import D
from tests.test_baselines import H
from tests.test_baselines import TINY
from tests.test_baselines import _assert_close
from tests.test_baselines import _images
from tests.test_baselines import _params
from tests.test_baselines import np_prompted_forward
from tests.test_baselines import np_query

LAYERS, TASKS, LENGTH, MOMENTUM = 2, 3, 2, 0.1
CLASS_TO_TASK = np.arange(C) // (C // TASKS)
_erf = np.vectorize(math.erf)

# ---------------------------------------------------------------------------
# NumPy references.


def np_pairing(per_sample, mask, window):
  """Keys, values (B, ...) as the reference lays them out per window.

  `per_sample` (B, 2, ...) holds each sample's own (key, value) halves; the
  reference stacks them as a (2, n) grid over the window's n real samples
  and RESHAPES it to (n, 2). Padding positions keep their own halves.
  """
  per_sample = np.asarray(per_sample, np.float64)
  keys, values = per_sample[:, 0].copy(), per_sample[:, 1].copy()
  for start in range(0, len(mask), window):
    n = int(np.sum(mask[start:start + window]))
    grid = np.swapaxes(per_sample[start:start + n], 0, 1)  # (2, n, ...)
    laid_out = grid.reshape((n, 2) + grid.shape[2:])
    keys[start:start + n] = laid_out[:, 0]
    values[start:start + n] = laid_out[:, 1]
  return keys, values


def np_layer_norm(x, scale, bias, eps):
  mean = x.mean(-1, keepdims=True)
  var = ((x - mean)**2).mean(-1, keepdims=True)
  return (x - mean) / np.sqrt(var + eps) * scale + bias


def np_tii(p, f):
  """float64 TII logits and the intermediate values, from the rules."""
  p = jax.tree_util.tree_map(lambda x: np.asarray(x, np.float64), p)
  f = np.asarray(f, np.float64)
  a = f @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"]
  h = 0.5 * a * (1.0 + _erf(a / math.sqrt(2.0)))
  r = h @ p["Dense_1"]["kernel"] + p["Dense_1"]["bias"] + f
  g = np_layer_norm(r, p["LayerNorm"]["scale"], p["LayerNorm"]["bias"], 1e-5)
  z = g @ p["head"]["kernel"] + p["head"]["bias"]
  return z, (a, h, r, g)


def np_tii_ce_and_grads(p, f, labels, mask, first, end):
  """Masked CE over [first, end) and its gradient by hand-written backprop."""
  z, (a, h, r, g) = np_tii(p, f)
  p = jax.tree_util.tree_map(lambda x: np.asarray(x, np.float64), p)
  f = np.asarray(f, np.float64)
  current = np.zeros(C, bool)
  current[first:end] = True
  zm = np.where(current, z, -np.inf)
  logp = zm - zm.max(-1, keepdims=True)
  logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
  n = mask.sum()
  picked = logp[np.arange(len(labels)), labels]
  ce = -np.sum(np.where(mask > 0, picked, 0.0)) / n
  dz = np.exp(logp)
  dz[np.arange(len(labels)), labels] -= 1.0
  dz *= mask[:, None] / n
  grads = {"head": {"kernel": g.T @ dz, "bias": dz.sum(0)}}
  dg = dz @ p["head"]["kernel"].T
  mean = r.mean(-1, keepdims=True)
  std = np.sqrt(((r - mean)**2).mean(-1, keepdims=True) + 1e-5)
  xhat = (r - mean) / std
  grads["LayerNorm"] = {"scale": (dg * xhat).sum(0), "bias": dg.sum(0)}
  dx = dg * p["LayerNorm"]["scale"]
  dr = (dx - dx.mean(-1, keepdims=True) - xhat *
        (dx * xhat).mean(-1, keepdims=True)) / std
  grads["Dense_1"] = {"kernel": h.T @ dr, "bias": dr.sum(0)}
  dh = dr @ p["Dense_1"]["kernel"].T
  gelu_slope = (0.5 * (1.0 + _erf(a / math.sqrt(2.0))) +
                a * np.exp(-a * a / 2.0) / math.sqrt(2.0 * math.pi))
  da = dh * gelu_slope
  grads["Dense_0"] = {"kernel": f.T @ da, "bias": da.sum(0)}
  return ce, grads


def np_contrastive_groups(features, mask, centroids, valid, tau, group):
  """Per group: M = [Q ; F real], S = M M^T / tau, mean row CE; the mean
  over groups with real samples, and the analytic gradient w.r.t. F."""
  features = np.asarray(features, np.float64)
  q = np.asarray(centroids, np.float64)[np.asarray(valid, bool)]
  group = group or len(features)
  values, grad = [], np.zeros_like(features)
  used = [
      g for g in range(0, len(features), group) if mask[g:g + group].sum() > 0
  ]
  for start in used:
    rows = start + np.flatnonzero(mask[start:start + group])
    m = np.concatenate([q, features[rows]])
    s = m @ m.T / tau
    soft = np.exp(s - s.max(-1, keepdims=True))
    soft /= soft.sum(-1, keepdims=True)
    lse = np.log(np.exp(s - s.max(-1, keepdims=True)).sum(-1)) + s.max(-1)
    values.append(np.mean(lse - np.diag(s)))
    d_s = (soft - np.eye(len(m))) / len(m)
    d_m = (d_s + d_s.T) @ m / tau
    grad[rows] += d_m[len(q):] / len(used)
  return np.mean(values), grad


# ---------------------------------------------------------------------------
# The key/value pairing quirk.


def test_pairing_sources_on_a_full_window_of_24_by_hand():
  (key_half, key_sample), (value_half,
                           value_sample) = hp.pairing_sources(jnp.ones(24), 24)
  chex.assert_shape((key_half, key_sample, value_half, value_sample), (24,))
  chex.assert_type((key_half, key_sample), jnp.int32)
  # Positions 0-11 take half 0 of samples (2b, 2b+1), positions 12-23 half 1
  # of samples (2b - 24, 2b - 23).
  np.testing.assert_array_equal(key_half, [0] * 12 + [1] * 12)
  np.testing.assert_array_equal(value_half, [0] * 12 + [1] * 12)
  np.testing.assert_array_equal(key_sample, list(range(0, 24, 2)) * 2)
  np.testing.assert_array_equal(value_sample, list(range(1, 24, 2)) * 2)


def test_pairing_sources_on_a_short_last_window_and_an_odd_count():
  # 30 samples in windows of 24: the second window holds 6 positions.
  (key_half, key_sample), (value_half,
                           value_sample) = hp.pairing_sources(jnp.ones(30), 24)
  np.testing.assert_array_equal(key_half[24:], [0, 0, 0, 1, 1, 1])
  np.testing.assert_array_equal(key_sample[24:], [24, 26, 28] * 2)
  np.testing.assert_array_equal(value_half[24:], [0, 0, 0, 1, 1, 1])
  np.testing.assert_array_equal(value_sample[24:], [25, 27, 29] * 2)
  # 5 real samples, 3 padding: the middle sample gets key half 0 of sample
  # 4 and value half 1 of sample 0; padding keeps its own halves.
  mask = jnp.asarray([1, 1, 1, 1, 1, 0, 0, 0])
  (key_half, key_sample), (value_half,
                           value_sample) = hp.pairing_sources(mask, 8)
  np.testing.assert_array_equal(key_half, [0, 0, 0, 1, 1, 0, 0, 0])
  np.testing.assert_array_equal(key_sample, [0, 2, 4, 1, 3, 5, 6, 7])
  np.testing.assert_array_equal(value_half, [0, 0, 1, 1, 1, 1, 1, 1])
  np.testing.assert_array_equal(value_sample, [1, 3, 0, 2, 4, 5, 6, 7])


def test_intended_pairing_takes_each_samples_own_halves():
  (key_half, key_sample), (value_half, value_sample) = hp.pairing_sources(
      jnp.ones(30), 24, intended=True)
  np.testing.assert_array_equal(key_half, np.zeros(30))
  np.testing.assert_array_equal(value_half, np.ones(30))
  np.testing.assert_array_equal(key_sample, np.arange(30))
  np.testing.assert_array_equal(value_sample, np.arange(30))


@pytest.mark.parametrize("batch,window,real", [(24, 24, 24), (30, 24, 30),
                                               (48, 24, 41), (7, 3, 7)])
def test_pair_key_value_equals_the_reference_reshape(batch, window, real):
  rng = np.random.default_rng(batch + real)
  per_sample = rng.normal(size=(batch, 2, 3, 2, 2))
  mask = (np.arange(batch) < real).astype(np.float32)  # Padding last.
  sources = hp.pairing_sources(jnp.asarray(mask), window)
  keys, values = hp.pair_key_value(jnp.asarray(per_sample, jnp.float32),
                                   jnp.arange(batch), sources)
  chex.assert_shape((keys, values), (batch, 3, 2, 2))
  want_keys, want_values = np_pairing(per_sample, mask, window)
  _assert_close(keys, want_keys, 1e-6)
  _assert_close(values, want_values, 1e-6)
  if real == batch == window:
    # One slot for all (training): the first half uses the key half as key
    # and value, the second half the value half.
    shared = np.broadcast_to(per_sample[:1],
                             per_sample.shape).astype(np.float32)
    keys, values = hp.pair_key_value(jnp.asarray(shared[:1]),
                                     jnp.zeros(batch, jnp.int32), sources)
    half = batch // 2
    np.testing.assert_array_equal(keys[:half], values[:half])
    np.testing.assert_array_equal(keys[:half], shared[:half, 0])
    np.testing.assert_array_equal(values[half:], shared[half:, 1])


# ---------------------------------------------------------------------------
# Slots: routing, the momentum blend, copy and merge.


def _hand_slots(num_tasks=4):
  """One block's prompts (2, T, Lp=1, H=1, d=2): half h of slot s = 10s + h."""
  value = 10.0 * np.arange(num_tasks)[None] + np.arange(2)[:, None]
  return jnp.asarray(
      np.broadcast_to(value[:, :, None, None, None], (2, num_tasks, 1, 1, 2)),
      jnp.float32)


def _per_sample(*args):
  """`hp.route`'s (B, 2, Lp, H, d) prompt pairs and (B,) slots."""
  table, rows, slots = hp.route(*args)
  return table[rows], slots


def test_route_train_stats_eval_by_hand():
  e = _hand_slots()
  # Training task 2 with m = 0.1: 0.9 (20 + h) + 0.1 ((0 + h) + (10 + h)) / 2.
  table, rows, _ = hp.route(e, "train", 2, 0.1, 3)
  chex.assert_shape(table, (1, 2, 1, 1, 2))  # One prompt for all samples.
  np.testing.assert_array_equal(rows, [0, 0, 0])
  prompts, slots = _per_sample(e, "train", 2, 0.1, 3)
  chex.assert_shape(prompts, (3, 2, 1, 1, 2))
  chex.assert_type(slots, jnp.int32)
  np.testing.assert_array_equal(slots, [2, 2, 2])
  _assert_close(prompts[:, 0], np.full((3, 1, 1, 2), 18.5), 1e-6)
  _assert_close(prompts[:, 1], np.full((3, 1, 1, 2), 19.5), 1e-6)
  # Task 0 has no earlier slot: E_0 as it is.
  prompts, _ = _per_sample(e, "train", 0, 0.1, 3)
  _assert_close(prompts[:, 1], np.full((3, 1, 1, 2), 1.0), 1e-6)
  # The statistics pass: slot t, no blend.
  prompts, _ = _per_sample(e, "stats", 2, 0.1, 3)
  _assert_close(prompts[:, 0], np.full((3, 1, 1, 2), 20.0), 1e-6)
  # Evaluation: each sample its predicted task's slot.
  prompts, slots = _per_sample(e, "eval", 2, 0.1, 3, jnp.asarray([3, 0, 1]))
  np.testing.assert_array_equal(slots, [3, 0, 1])
  _assert_close(prompts[:, 1, 0, 0, 0], [31.0, 1.0, 11.0], 1e-6)
  with pytest.raises(ValueError, match="routing"):
    hp.route(e, "dense", 2, 0.1, 3)


def test_momentum_blend_gradient_reaches_slot_t_scaled_by_one_minus_m():
  e = _hand_slots()
  weights = np.random.default_rng(0).normal(size=(3, 2, 1, 1, 2))

  def loss(e, task):
    prompts, _ = _per_sample(e, "train", task, 0.1, 3)
    return jnp.sum(prompts * weights)

  grad = jax.jit(jax.grad(loss))(e, jnp.int32(2))
  _assert_close(grad[:, 2], 0.9 * weights.sum(0), 1e-6)
  for slot in (0, 1, 3):
    np.testing.assert_array_equal(grad[:, slot], 0.0)
  grad = jax.grad(loss)(e, 0)
  _assert_close(grad[:, 0], weights.sum(0), 1e-6)


def test_copy_and_merge_at_a_task_boundary():
  # Full layout (L=2, 2, T=4, Lp, H, d), slot s of block l = 100 l + 10 s + h.
  e = jnp.stack([_hand_slots() + 100.0 * l for l in range(2)])
  copy, merge = jax.jit(hp.copy_previous_slot), jax.jit(hp.merge_momentum,
                                                        static_argnums=2)
  copied = copy(e, jnp.int32(2))
  chex.assert_shape(copied, e.shape)
  np.testing.assert_array_equal(copied[:, :, 2], e[:, :, 1])
  for slot in (0, 1, 3):
    np.testing.assert_array_equal(copied[:, :, slot], e[:, :, slot])
  np.testing.assert_array_equal(copy(e, jnp.int32(0)), e)
  # After training task 2: (1 - m) E_2 + m (E_0 + E_1) / 2 = E_2 - 1.5 for
  # m = 0.1, in both halves and both blocks.
  merged = merge(copied, jnp.int32(2), 0.1)
  want = 0.9 * e[:, :, 1] + 0.1 * (e[:, :, 0] + e[:, :, 1]) / 2
  _assert_close(merged[:, :, 2], want, 1e-5)
  np.testing.assert_allclose(merged[0, 0, 2, 0, 0, 0], 9.5, rtol=1e-6)
  for slot in (0, 1, 3):
    np.testing.assert_array_equal(merged[:, :, slot], copied[:, :, slot])
  np.testing.assert_array_equal(merge(e, jnp.int32(0), 0.1), e)
  # The merged slot is what training used with the blend.
  used, _ = _per_sample(copied[1], "train", 2, 0.1, 1)
  _assert_close(merged[1, :, 2], np.asarray(used[0]), 1e-5)


# ---------------------------------------------------------------------------
# The TII classifier, its masked CE and the clipped step.

TII_D = 8


def _tii_params(seed=0):
  module = hp.TIIClassifier(num_classes=C)
  params = module.init(jax.random.key(seed), jnp.zeros((1, TII_D)))["params"]
  # Non-trivial LayerNorm and biases, so that their gradients are checked.
  rng = np.random.default_rng(seed)
  flat = flax.traverse_util.flatten_dict(params)
  for path in flat:
    if path[-1] != "kernel":
      flat[path] = flat[path] + jnp.asarray(
          0.3 * rng.normal(size=flat[path].shape), jnp.float32)
    else:
      flat[path] = jnp.asarray(
          rng.normal(size=flat[path].shape) / np.sqrt(flat[path].shape[0]),
          jnp.float32)
  return module, flax.traverse_util.unflatten_dict(flat)


def test_tii_classifier_forward_and_shapes():
  module, params = _tii_params()
  chex.assert_shape(params["Dense_0"]["kernel"], (TII_D, 2 * TII_D))
  chex.assert_shape(params["Dense_1"]["kernel"], (2 * TII_D, TII_D))
  chex.assert_shape(params["LayerNorm"]["scale"], (TII_D,))
  chex.assert_shape(params["head"]["kernel"], (TII_D, C))
  f = np.random.default_rng(1).normal(size=(5, TII_D)) * 2.0
  got = module.apply({"params": params}, jnp.asarray(f, jnp.float32))
  chex.assert_shape(got, (5, C))
  chex.assert_type(got, jnp.float32)
  _assert_close(got, np_tii(params, f)[0], 1e-5)


def test_tii_initialisation_is_timm_trunc_normal_and_zero_biases():
  module = hp.TIIClassifier(num_classes=100)
  params = module.init(jax.random.key(0), jnp.zeros((1, 768)))["params"]
  w = np.asarray(params["Dense_0"]["kernel"])
  chex.assert_shape(w, (768, 1536))
  np.testing.assert_allclose(w.std(), 0.02, rtol=0.01)
  # Cut at +-2 in value, not at 2 standard deviations: about 4.6% of the
  # weights lie beyond 0.04.
  np.testing.assert_allclose(np.mean(np.abs(w) > 0.04), 0.0455, atol=0.003)
  for name in ("Dense_0", "Dense_1", "head"):
    np.testing.assert_array_equal(params[name]["bias"], 0.0)
  np.testing.assert_array_equal(params["LayerNorm"]["scale"], 1.0)


def test_tii_masked_ce_gradient_and_one_clipped_step_against_numpy():
  module, params = _tii_params()
  # A sharper head: larger gradients, so that the clip acts clearly.
  params["head"]["kernel"] = 4.0 * params["head"]["kernel"]
  rng = np.random.default_rng(2)
  f = rng.normal(size=(6, TII_D)) * 3.0
  labels = np.array([2, 3, 3, 2, 2, 0])  # Current task: classes [2, 4).
  mask = np.array([1.0, 1.0, 1.0, 1.0, 1.0, 0.0])  # Last row padding.

  def loss(p):
    logits = module.apply({"params": p}, jnp.asarray(f, jnp.float32))
    return hl.current_task_ce(logits, jnp.asarray(labels), jnp.asarray(mask), 2,
                              4, group_size=None)

  value, grads = jax.value_and_grad(loss)(params)
  want_value, want_grads = np_tii_ce_and_grads(params, f, labels, mask, 2, 4)
  np.testing.assert_allclose(value, want_value, rtol=1e-5)
  chex.assert_trees_all_equal_shapes(grads, params)
  jax.tree_util.tree_map(lambda g, w: _assert_close(g, w, 1e-4), grads,
                         want_grads)
  # Only the current task's head columns get gradient.
  head = np.asarray(grads["head"]["kernel"])
  assert np.all(head[:, [0, 1, 4, 5]] == 0) and np.all(head[:, 2:4] != 0)

  norm = np.sqrt(
      sum(np.sum(g**2) for g in jax.tree_util.tree_leaves(want_grads)))
  assert norm > 1.5  # The clip acts.
  scale = 1.0 / (norm + 1e-6)
  rate = 0.5
  for direction, step in ((optax.identity(), lambda g: scale * g),
                          (schedules.adam(0.0, decoupled=False),
                           lambda g: scale * g / (np.abs(scale * g) + 1e-8))):
    tx = optax.chain(hl.clip_global_norm(), direction)
    updates, _ = tx.update(grads, tx.init(params), params)
    new = optax.apply_updates(
        params, jax.tree_util.tree_map(lambda u: -rate * u, updates))
    want = jax.tree_util.tree_map(
        lambda p, g: np.asarray(p, np.float64) - rate * step(g), params,
        want_grads)
    jax.tree_util.tree_map(lambda g, w: _assert_close(g, w, 1e-4), new, want)


def test_clip_global_norm_by_hand():
  tx = hl.clip_global_norm(1.0)
  big = {"a": jnp.asarray([3.0, 4.0])}
  out, _ = tx.update(big, tx.init(big))
  _assert_close(out["a"], np.array([3.0, 4.0]) / (5.0 + 1e-6), 1e-7)
  small = {"a": jnp.asarray([0.3, 0.4]), "b": jnp.asarray([[0.0]])}
  out, _ = tx.update(small, tx.init(small))
  chex.assert_trees_all_equal(out, small)


def test_group_mean_and_ce_over_8_groups_of_24():
  rng = np.random.default_rng(3)
  values = rng.uniform(size=192)
  mask = np.ones(192)
  mask[24 + 20:48] = 0.0  # Group 1 has 20 real samples.
  mask[168:] = 0.0  # Group 7 has none and is left out.
  want = np.mean(
      [values[g:g + 24][mask[g:g + 24] > 0].mean() for g in range(0, 168, 24)])
  got = hl.group_mean(jnp.asarray(values, jnp.float32), jnp.asarray(mask))
  chex.assert_shape(got, ())
  np.testing.assert_allclose(got, want, rtol=1e-6)
  got = hl.group_mean(jnp.asarray(values, jnp.float32), jnp.asarray(mask), None)
  np.testing.assert_allclose(got, values[mask > 0].mean(), rtol=1e-6)
  # The CE of stage 2: per group over the current task's classes.
  logits = rng.normal(size=(192, C))
  labels = rng.integers(4, 6, size=192)
  got = hl.current_task_ce(jnp.asarray(logits, jnp.float32),
                           jnp.asarray(labels), jnp.asarray(mask), 4, 6)
  current = logits[:, 4:6]
  per_sample = (np.log(np.exp(current).sum(-1)) -
                logits[np.arange(192), labels])
  want = np.mean([
      per_sample[g:g + 24][mask[g:g + 24] > 0].mean()
      for g in range(0, 168, 24)
  ])
  np.testing.assert_allclose(got, want, rtol=1e-5)


# ---------------------------------------------------------------------------
# The contrastive term.


def test_contrastive_by_hand():
  # Q = [(1, 0)] (plus an absent centroid), F = [(0, 1)]: S = I / 0.8, each
  # row's CE is log(e^1.25 + 1) - 1.25.
  got = hl.contrastive_loss(jnp.asarray([[0.0, 1.0]]), jnp.ones(1),
                            jnp.asarray([[1.0, 0.0], [5.0, 5.0]]),
                            jnp.asarray([True, False]), group_size=None)
  np.testing.assert_allclose(got, np.log(np.exp(1.25) + 1) - 1.25, rtol=1e-6)


def _contrastive_inputs(batch, seed):
  rng = np.random.default_rng(seed)
  features = rng.normal(size=(batch, 4)) * 0.7
  centroids = rng.normal(size=(6, 4)) * 0.7
  valid = np.array([1, 1, 0, 1, 0, 1], bool)
  return features, centroids, valid


def test_contrastive_over_8_groups_of_24_and_as_one_group():
  features, centroids, valid = _contrastive_inputs(192, 4)
  mask = np.ones(192)
  mask[48 + 17:72] = 0.0  # Group 2 has 17 real samples.
  mask[168:] = 0.0  # Group 7 has none.
  args = (jnp.asarray(features, jnp.float32), jnp.asarray(mask),
          jnp.asarray(centroids, jnp.float32), jnp.asarray(valid))
  grouped = hl.contrastive_loss(*args)
  whole = hl.contrastive_loss(*args, group_size=None)
  chex.assert_shape((grouped, whole), ())
  chex.assert_type((grouped, whole), jnp.float32)
  want_grouped, _ = np_contrastive_groups(features, mask, centroids, valid, 0.8,
                                          24)
  want_whole, _ = np_contrastive_groups(features, mask, centroids, valid, 0.8,
                                        None)
  np.testing.assert_allclose(grouped, want_grouped, rtol=1e-5)
  np.testing.assert_allclose(whole, want_whole, rtol=1e-5)
  assert abs(want_grouped - want_whole) > 0.5  # The grouping matters.


@pytest.mark.parametrize("with_centroids", [True, False])
def test_contrastive_gradient_against_the_analytic_one(with_centroids):
  features, centroids, valid = _contrastive_inputs(48, 5)
  if not with_centroids:  # Task 0: the term over the features alone.
    valid = np.zeros_like(valid)
  mask = np.ones(48)
  mask[24 + 9:] = 0.0
  grad = jax.grad(hl.contrastive_loss)(jnp.asarray(features, jnp.float32),
                                       jnp.asarray(mask),
                                       jnp.asarray(centroids, jnp.float32),
                                       jnp.asarray(valid))
  chex.assert_shape(grad, (48, 4))
  _, want = np_contrastive_groups(features, mask, centroids, valid, 0.8, 24)
  _assert_close(grad, want, 1e-5)
  np.testing.assert_array_equal(grad[24 + 9:], 0.0)  # Padding rows.
  # The centroids get no gradient.
  centroid_grad = jax.grad(hl.contrastive_loss,
                           argnums=2)(jnp.asarray(features, jnp.float32),
                                      jnp.asarray(mask),
                                      jnp.asarray(centroids, jnp.float32),
                                      jnp.asarray(valid))
  np.testing.assert_array_equal(centroid_grad, 0.0)


# ---------------------------------------------------------------------------
# Inference through a given task prediction.


def test_inference_through_a_given_stage1_prediction():
  # Tasks of 2 classes; tasks 0-1 seen (4 classes).
  tii = np.array([
      [0.0, 2.0, 0.0, 0.0, 0.0, 9.0],  # class 5 unseen -> 1
      [0.0, 0.0, 0.0, 3.0, 1.0, 0.0],  # class 3 -> task 1
      [5.0, 0.0, 1.0, 0.0, 0.0, 0.0]
  ])  # class 0 -> task 0
  tasks = hp.predicted_task(jnp.asarray(tii), jnp.asarray(CLASS_TO_TASK), 4)
  chex.assert_type(tasks, jnp.int32)
  np.testing.assert_array_equal(tasks, [0, 1, 0])
  # The predicted task's slot.
  _, slots = _per_sample(_hand_slots(), "eval", 1, 0.1, 3, tasks)
  np.testing.assert_array_equal(slots, [0, 1, 0])
  # The final argmax is over ALL classes: an unseen class can win.
  logits = jnp.asarray([[1.0, 0.0, 0.0, 0.0, 0.0, 4.0],
                        [0.0, 0.0, 2.0, 0.0, 3.0, 0.0],
                        [0.0, 1.0, 0.0, 0.0, 0.0, 0.0]])
  np.testing.assert_array_equal(hp.predict(logits, 4), [5, 4, 1])
  np.testing.assert_array_equal(hp.predict(logits, 4, all_classes=False),
                                [0, 2, 1])


# ---------------------------------------------------------------------------
# The prompt module in the tiny ViT.


def _module(**fields):
  return hp.HiDePrompts(num_layers=LAYERS, num_tasks=TASKS, length=LENGTH,
                        hidden_size=D, num_heads=H, num_classes=C,
                        momentum=MOMENTUM, **fields)


def _model_params(model):
  params = _params(model, {"task": jnp.int32(0)})
  rng = np.random.default_rng(7)
  prompts = flax.traverse_util.flatten_dict(params["prompts"])
  for path, leaf in prompts.items():  # e_prompt U[-1, 1), TII N(0, 0.25).
    x = (rng.uniform(-1.0, 1.0, leaf.shape) if path == ("e_prompt",) else 0.5 *
         rng.normal(size=leaf.shape))
    prompts[path] = jnp.asarray(x, jnp.float32)
  params = {**params, "prompts": flax.traverse_util.unflatten_dict(prompts)}
  # The queries of the test images are alike: a head on their deviations
  # from the batch mean makes the predicted tasks differ.
  _, (_, _, _, g) = np_tii(params["prompts"]["tii"],
                           np_query(params, _images()))
  kernel = 10.0 * rng.normal(size=(D, C))
  head = {
      "kernel": jnp.asarray(kernel, jnp.float32),
      "bias": jnp.asarray(-g.mean(0) @ kernel, jnp.float32)
  }
  tii = {**params["prompts"]["tii"], "head": head}
  return {**params, "prompts": {**params["prompts"], "tii": tii}}


def _np_prefixes(params, slots, routing, task, mask, window):
  """Per block (keys, values) (B, Lp, D) from the rules, float64."""
  e = np.asarray(params["prompts"]["e_prompt"], np.float64)
  prefixes = {}
  for layer in range(LAYERS):
    if routing == "train" and task > 0:
      chosen = ((1 - MOMENTUM) * e[layer][:, slots] +
                MOMENTUM * e[layer][:, :task].mean(1, keepdims=True))
    else:
      chosen = e[layer][:, slots]
    per_sample = np.swapaxes(chosen, 0, 1)  # (B, 2, Lp, H, d)
    keys, values = np_pairing(per_sample, mask, window)
    prefixes[layer] = (keys.reshape(len(slots), LENGTH,
                                    D), values.reshape(len(slots), LENGTH, D))
  return prefixes


@pytest.mark.parametrize("routing,window,real",
                         [("train", 4, 4), ("train", 3, 4), ("stats", 4, 3),
                          ("eval", 4, 4), ("eval", 3, 3)])
def test_model_forward_matches_numpy(routing, window, real):
  model = vit.VisionTransformer(**TINY, prompts=_module(window=window))
  params = _model_params(model)
  images = _images()
  mask = (np.arange(B) < real).astype(np.float32)
  task = 2
  context = {
      "task": jnp.int32(task),
      "routing": routing,
      "class_to_task": jnp.asarray(CLASS_TO_TASK),
      "seen_classes": jnp.int32(C),
      "mask": jnp.asarray(mask)
  }
  out = model.apply({"params": params}, images, context,
                    mode="train" if routing == "train" else "eval")
  if routing == "eval":
    tii_logits, _ = np_tii(params["prompts"]["tii"], np_query(params, images))
    _assert_close(out["tii_logits"], tii_logits, 1e-4)
    slots = CLASS_TO_TASK[tii_logits.argmax(-1)]
    assert len(set(slots)) > 1  # Neighbours' prompts differ.
  else:  # No query pass: the given task's prompt.
    assert "tii_logits" not in out
    slots = np.full(B, task)
  chex.assert_shape(out["prompt_slot"], (B,))
  np.testing.assert_array_equal(out["prompt_slot"], slots)
  prefixes = _np_prefixes(params, slots, routing, task, mask, window)
  want_pre, want_logits = np_prompted_forward(params, images, prefixes)
  _assert_close(out["pre_logits"], want_pre, 1e-4)
  _assert_close(out["logits"], want_logits, 1e-4)
  # The intended pairing gives another forward.
  intended = vit.VisionTransformer(
      **TINY, prompts=_module(window=window, intended_pairing=True))
  other = intended.apply({"params": params}, images, context,
                         mode="train" if routing == "train" else "eval")
  assert not np.allclose(other["pre_logits"], out["pre_logits"], atol=1e-3)


def test_default_routing_follows_the_mode_and_gradients_stay_in_slot_t():
  model = vit.VisionTransformer(**TINY, prompts=_module())
  params = _model_params(model)
  context = {
      "task": jnp.int32(1),
      "class_to_task": jnp.asarray(CLASS_TO_TASK),
      "seen_classes": jnp.int32(4)
  }

  def ce(p):
    out = model.apply({"params": p}, _images(), context, mode="train")
    return jnp.mean(out["logits"][:, 2])

  grad = jax.grad(ce)(params)["prompts"]
  rows = np.abs(np.asarray(grad["e_prompt"])).sum(axis=(0, 1, 3, 4, 5))
  assert rows[1] > 0 and rows[0] == 0 and rows[2] == 0
  jax.tree_util.tree_map(lambda g: np.testing.assert_array_equal(g, 0.0),
                         grad["tii"])
  out = model.apply({"params": params}, _images(), context, mode="eval")
  tasks = hp.predicted_task(out["tii_logits"], jnp.asarray(CLASS_TO_TASK), 4)
  np.testing.assert_array_equal(out["prompt_slot"], tasks)
  assert np.all(np.asarray(tasks) < 2)


def test_vit_b16_parameter_shapes_and_counts():
  prompts = hp.HiDePrompts(num_layers=5, num_tasks=10, length=5,
                           hidden_size=768, num_heads=12, num_classes=100,
                           momentum=0.01)
  model = vit.VisionTransformer(num_classes=100, patch_size=16, hidden_size=768,
                                num_layers=12, num_heads=12, mlp_dim=3072,
                                prompts=prompts)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(
      0), jnp.zeros((1, 224, 224, 3)), {"task": jnp.int32(0)}, mode="train")
                         )["params"]["prompts"]
  chex.assert_shape(shapes["e_prompt"], (5, 2, 10, 5, 12, 64))
  size = lambda t: sum(
      int(np.prod(x.shape))  # noqa: E731
      for x in jax.tree_util.tree_leaves(t))
  assert size(shapes["e_prompt"]) == 384_000
  tii = dict(shapes["tii"])
  head = tii.pop("head")
  assert size(tii) == 2_363_136
  assert size(head) == 768 * 100 + 100
  for leaf in jax.tree_util.tree_leaves(shapes):
    assert leaf.dtype == jnp.float32


def test_e_prompt_initialisation_is_uniform_on_minus_one_one():
  module = hp.HiDePrompts(num_layers=5, num_tasks=10, length=5, hidden_size=64,
                          num_heads=4, num_classes=10, momentum=0.01)
  params = module.init(jax.random.key(0), jnp.zeros((2, 64)),
                       method="classify")["params"]
  e = np.asarray(params["e_prompt"])
  chex.assert_shape(e, (5, 2, 10, 5, 4, 16))
  assert e.min() >= -1.0 and e.max() < 1.0
  assert e.min() < -0.99 and e.max() > 0.99
  np.testing.assert_allclose(e.mean(), 0.0, atol=0.03)
