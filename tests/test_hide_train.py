"""HiDe-Prompt's trainer-side blocks against direct NumPy computations."""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from smope_jax.hide import alignment
from smope_jax.hide import schedules
from smope_jax.hide import statistics
from smope_jax.methods import hideprompt_spec

K, D = statistics.NUM_CENTROIDS, 4


def _blobs(rng, n_per_blob):
  """Ten well-separated Gaussian blobs in D dimensions with their truth."""
  centres = 100.0 * rng.normal(size=(K, D))
  scales = rng.uniform(0.5, 2.0, size=(K, D))
  blob = np.repeat(np.arange(K), n_per_blob)
  feats = centres[blob] + scales[blob] * rng.normal(size=(len(blob), D))
  feats = feats.astype(np.float32)
  wide = feats.astype(np.float64)
  means = np.stack([wide[blob == j].mean(0) for j in range(K)])
  variances = np.stack([
      ((wide[blob == j] - means[j])**2).mean(0) for j in range(K)
  ])
  return feats, means, variances


def _match(got, want):
  """Index of the row of `got` nearest to each row of `want`."""
  dist = ((want[:, None] - got[None])**2).sum(-1)
  return dist.argmin(1)


# Multi-centroid statistics.


def test_centroids_recover_separated_blobs():
  rng = np.random.default_rng(0)
  (f0, m0, v0), (f1, m1, v1) = _blobs(rng, 20), _blobs(rng, 31)
  feats = np.concatenate([f1, f0])
  labels = np.repeat([4, 3], [len(f1), len(f0)])
  stats = statistics.centroid_statistics(feats, labels, [3, 4], seed=1)
  chex.assert_shape([stats.means, stats.variances], (2, K, D))
  chex.assert_type([stats.means, stats.variances], np.float32)
  assert stats.present.dtype == bool and stats.present.all()
  for row, (means, variances) in enumerate(((m0, v0), (m1, v1))):
    order = _match(stats.means[row], means)
    assert sorted(order) == list(range(K))  # One cluster per blob.
    np.testing.assert_allclose(stats.means[row][order], means, rtol=1e-6)
    # Population variance (divided by the blob's size).
    np.testing.assert_allclose(stats.variances[row][order], variances,
                               rtol=1e-5)


def test_class_with_too_few_samples():
  rng = np.random.default_rng(1)
  few = rng.normal(size=(3, D)).astype(np.float32)
  twice = np.repeat(rng.normal(size=(2, D)), 6, 0).astype(np.float32)
  feats = np.concatenate([few, twice])
  labels = np.repeat([0, 1], [3, 12])
  stats = statistics.centroid_statistics(feats, labels, [0, 1, 2], seed=0)
  np.testing.assert_array_equal(stats.present.sum(1), [3, 2, 0])
  # Each point is its own cluster, with zero variance.
  order = _match(stats.means[0][:3], few.astype(np.float64))
  np.testing.assert_allclose(stats.means[0][:3][order], few, rtol=1e-6)
  np.testing.assert_array_equal(stats.variances[:2], 0.0)
  # Absent slots and the class without samples are zero.
  np.testing.assert_array_equal(stats.means[0][3:], 0.0)
  np.testing.assert_array_equal(stats.means[2], 0.0)
  # None of them is replayed.
  usable = alignment.replayable(jnp.asarray(stats.variances),
                                jnp.asarray(stats.present))
  assert not np.asarray(usable).any()


def test_centroids_are_seeded_per_class():
  rng = np.random.default_rng(2)
  feats = rng.normal(size=(60, D)).astype(np.float32)  # No clear clusters.
  labels = np.repeat([0, 1], 30)
  both = statistics.centroid_statistics(feats, labels, [0, 1], seed=5)
  alone = statistics.centroid_statistics(feats, labels, [1], seed=5)
  np.testing.assert_array_equal(both.means[1], alone.means[0])
  again = statistics.centroid_statistics(feats, labels, [0, 1], seed=5)
  for a, b in zip(both, again):
    np.testing.assert_array_equal(a, b)
  assert (statistics.class_seed(5, 0, 1) != statistics.class_seed(5, 1, 1) !=
          statistics.class_seed(6, 0, 1))


def test_empty_and_scatter():
  stats = statistics.empty(5, D, K)
  chex.assert_shape([stats.means, stats.variances], (5, K, D))
  chex.assert_shape(stats.present, (5, K))
  rng = np.random.default_rng(3)
  feats = rng.normal(size=(40, D)).astype(np.float32)
  new = statistics.centroid_statistics(feats, np.zeros(40), [0], seed=0)
  out = statistics.scatter(stats, [2], new)
  np.testing.assert_array_equal(out.means[2], new.means[0])
  assert out.present[2].all() and not out.present[[0, 1, 3, 4]].any()
  assert not stats.present.any()  # The input is unchanged.


# Gaussian-replay alignment.


def _head(params, feats):
  return feats @ params["kernel"] + params["bias"]


def _numpy_head_grads(params, feats, labels, weights, num_seen):
  """Gradient of the weighted mean CE over the seen classes' logits."""
  x = np.asarray(feats, np.float64)
  logits = x @ params["kernel"] + params["bias"]
  logits[:, num_seen:] = -np.inf
  p = np.exp(logits - logits.max(1, keepdims=True))
  p /= p.sum(1, keepdims=True)
  p[np.arange(len(labels)), labels] -= 1.0
  g = p * weights[:, None] / max(weights.sum(), 1.0)
  return {"kernel": x.T @ g, "bias": g.sum(0)}


def _params(rng, classes):
  return {
      "kernel": rng.normal(size=(D, classes)).astype(np.float32),
      "bias": rng.normal(size=classes).astype(np.float32)
  }


@pytest.mark.parametrize("weight_decay", [0.0, 0.05])
def test_align_step_is_masked_sgd_with_momentum(weight_decay):
  rng = np.random.default_rng(4)
  classes, num_seen, n = 6, 4, 5
  params = _params(rng, classes)
  tx = alignment.momentum_direction(weight_decay)
  state = tx.init(jax.tree_util.tree_map(jnp.asarray, params))
  want, buf = {k: v.astype(np.float64) for k, v in params.items()}, None
  got = jax.tree_util.tree_map(jnp.asarray, params)
  for rate in (0.1, 0.05):
    feats = rng.normal(size=(n, D)).astype(np.float32)
    labels = rng.integers(0, num_seen, n)
    weights = np.array([1, 1, 1, 1, 0], np.float32)
    got, state = alignment.align_step(got, state, jnp.asarray(feats),
                                      jnp.asarray(labels), jnp.asarray(weights),
                                      jnp.int32(num_seen), jnp.float32(rate),
                                      apply_fn=_head, tx=tx)
    grads = _numpy_head_grads(want, feats, labels, weights, num_seen)
    grads = {k: grads[k] + weight_decay * want[k] for k in grads}
    buf = grads if buf is None else {k: 0.9 * buf[k] + grads[k] for k in buf}
    want = {k: want[k] - rate * buf[k] for k in want}
    chex.assert_trees_all_equal_shapes_and_dtypes(
        got, jax.tree_util.tree_map(jnp.asarray, params))
    for k in want:
      np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=1e-6)
  # Unseen classes get no gradient: their columns move by the decay alone
  # (p1 = p0 (1 - 0.1 wd), p2 = p1 - 0.05 wd (0.9 p0 + p1)).
  p0 = params["kernel"][:, num_seen:].astype(np.float64)
  p1 = p0 * (1 - 0.1 * weight_decay)
  np.testing.assert_allclose(got["kernel"][:, num_seen:],
                             p1 - 0.05 * weight_decay * (0.9 * p0 + p1),
                             rtol=1e-6, atol=1e-7)


def test_align_step_without_samples_changes_nothing():
  rng = np.random.default_rng(5)
  params = jax.tree_util.tree_map(jnp.asarray, _params(rng, 3))
  tx = alignment.momentum_direction()
  state = jax.tree_util.tree_map(jnp.ones_like, tx.init(params))
  out, out_state = alignment.align_step(params, state, jnp.ones((2, D)),
                                        jnp.zeros(2, jnp.int32), jnp.zeros(2),
                                        jnp.int32(3), jnp.float32(0.1),
                                        apply_fn=_head, tx=tx)
  chex.assert_trees_all_equal(out, params)
  chex.assert_trees_all_equal(out_state, state)


def test_epoch_order_puts_replayable_seen_clusters_first():
  per = 3
  present = np.ones((3, 2), bool)
  present[0, 1] = False
  variances = np.ones((3, 2, D), np.float32)
  variances[1, 0] = 0.0  # Zero variance: not replayed.
  usable = alignment.replayable(jnp.asarray(variances), jnp.asarray(present))
  np.testing.assert_array_equal(usable, [[1, 0], [0, 1], [1, 1]])
  order, ok = alignment.epoch_order(jax.random.PRNGKey(0), usable, 2, per)
  chex.assert_shape([order, ok], (3 * 2 * per,))
  want = {0, 1, 2, 9, 10, 11}  # Clusters (0, 0) and (1, 1) of classes < 2.
  assert set(np.asarray(order[:6]).tolist()) == want
  np.testing.assert_array_equal(ok, [True] * 6 + [False] * 12)


def test_replay_batch_draws_from_the_clusters():
  per, n = 4, 20000
  means = np.zeros((2, 2, D), np.float32)
  means[1, 1] = [1.0, -2.0, 3.0, 0.5]
  variances = np.zeros((2, 2, D), np.float32)
  variances[1, 1] = [0.0, 0.25, 1.0, 4.0]
  ids = jnp.full((n,), 3 * per + 1)  # Cluster 1 of class 1.
  feats, labels = alignment.replay_batch(jax.random.PRNGKey(1),
                                         jnp.asarray(means),
                                         jnp.asarray(variances), ids, per)
  chex.assert_shape(feats, (n, D))
  chex.assert_type(feats, jnp.float32)
  np.testing.assert_array_equal(labels, 1)
  feats = np.asarray(feats, np.float64)
  np.testing.assert_allclose(feats.mean(0), means[1, 1], atol=0.05)
  np.testing.assert_allclose(feats.var(0), variances[1, 1] + 1e-4, rtol=0.05)


def _clusters(rng, classes):
  means = 3.0 * rng.normal(size=(classes, K, D)).astype(np.float32)
  variances = rng.uniform(0.1, 0.5, (classes, K, D)).astype(np.float32)
  present = np.ones((classes, K), bool)
  return means, variances, present


def test_align_epoch_is_sgd_over_its_draws():
  rng = np.random.default_rng(6)
  classes, num_seen, iterations, per, rate = 5, 4, 3, 6, 0.2
  means, variances, present = _clusters(rng, classes)
  variances[0, 2] = 0.0
  present[1, 3] = False
  params = _params(rng, classes)
  tx = alignment.momentum_direction()
  key = jax.random.PRNGKey(7)
  got, _ = jax.jit(alignment.align_epoch,
                   static_argnames=("apply_fn", "tx", "per_centroid"))(
                       jax.tree_util.tree_map(jnp.asarray, params),
                       tx.init(jax.tree_util.tree_map(jnp.asarray, params)),
                       jnp.asarray(means), jnp.asarray(variances),
                       jnp.asarray(present), key, jnp.int32(num_seen),
                       jnp.int32(iterations), jnp.float32(rate), apply_fn=_head,
                       tx=tx, per_centroid=per)
  # The same draws, then plain SGD with momentum in NumPy.
  order_key, noise_key = jax.random.split(key)
  usable = alignment.replayable(jnp.asarray(variances), jnp.asarray(present))
  order, ok = alignment.epoch_order(order_key, usable, num_seen, per)
  want = {k: v.astype(np.float64) for k, v in params.items()}
  buf = None
  for i in range(iterations):
    ids = order[i * per:(i + 1) * per]
    assert np.asarray(ok[i * per:(i + 1) * per]).all()
    feats, labels = alignment.replay_batch(jax.random.fold_in(noise_key, i),
                                           jnp.asarray(means),
                                           jnp.asarray(variances), ids, per)
    labels = np.asarray(labels)
    assert (labels < num_seen).all()
    assert usable[labels, np.asarray(ids) // per % K].all()
    grads = _numpy_head_grads(want, feats, labels, np.ones(per), num_seen)
    buf = grads if buf is None else {k: 0.9 * buf[k] + grads[k] for k in buf}
    want = {k: want[k] - rate * buf[k] for k in want}
  for k in want:
    np.testing.assert_allclose(got[k], want[k], rtol=1e-4, atol=1e-5)


def test_align_epoch_stops_when_the_samples_run_out():
  rng = np.random.default_rng(8)
  means, variances, present = _clusters(rng, 3)
  present[:] = False
  present[0, 0] = True  # One replayable cluster: one batch per epoch.
  params = jax.tree_util.tree_map(jnp.asarray, _params(rng, 3))
  epoch = alignment.make_align_epoch(_head, per_centroid=4)
  args = (jnp.asarray(means), jnp.asarray(variances), jnp.asarray(present),
          jax.random.PRNGKey(0), jnp.int32(2))
  state = alignment.momentum_direction().init(params)
  one = epoch(params, state, *args, jnp.int32(1), jnp.float32(0.1))
  three = epoch(params, state, *args, jnp.int32(3), jnp.float32(0.1))
  chex.assert_trees_all_equal(one, three)
  assert not np.allclose(one[0]["kernel"], params["kernel"])


def _tii_apply(params, feats):
  """The task-identity classifier: residual MLP, LayerNorm, head."""
  h = jax.nn.gelu(feats @ params["w1"] + params["b1"], approximate=False)
  y = h @ params["w2"] + params["b2"] + feats
  mu = y.mean(-1, keepdims=True)
  y = (y - mu) / jnp.sqrt(((y - mu)**2).mean(-1, keepdims=True) + 1e-5)
  return (y * params["scale"] + params["offset"]) @ params["head"]


def test_align_is_deterministic_and_fits_the_clusters():
  rng = np.random.default_rng(9)
  classes, num_seen = 4, 3
  means, variances, present = _clusters(rng, classes)
  # Clusters around one centre per class, so the classes are separable.
  means = 5.0 * rng.normal(size=(classes, 1, D)) + 0.2 * means
  means = means.astype(np.float32)
  init = lambda *shape: jnp.asarray(0.02 * rng.normal(size=shape), jnp.float32)
  params = {
      "w1": init(D, 2 * D),
      "b1": jnp.zeros(2 * D),
      "w2": init(2 * D, D),
      "b2": jnp.zeros(D),
      "scale": jnp.ones(D),
      "offset": jnp.zeros(D),
      "head": init(D, classes)
  }
  stats = (jnp.asarray(means), jnp.asarray(variances), jnp.asarray(present))
  epoch = alignment.make_align_epoch(_tii_apply, per_centroid=8)
  rates = schedules.cosine_annealing(0.5, 8)
  run = lambda key: alignment.align(params, *stats, key, num_seen, 4, rates,
                                    epoch_fn=epoch)
  first = run(jax.random.PRNGKey(3))
  chex.assert_trees_all_equal(first, run(jax.random.PRNGKey(3)))
  chex.assert_trees_all_equal_shapes_and_dtypes(first, params)
  assert not np.allclose(run(jax.random.PRNGKey(4))["w1"], first["w1"])
  # The replayed clusters' means are classified better than before.
  feats, labels = jnp.asarray(means[:num_seen].reshape(-1, D)), np.repeat(
      np.arange(num_seen), K)
  loss = lambda p: float(
      alignment.masked_loss(p, feats, labels, jnp.ones(len(labels)), num_seen,
                            _tii_apply))
  assert loss(first) < 0.01 * loss(params)


# Schedules and optimizers.


def test_lr_scaling_by_the_reference_device_batch():
  """lr * 24 / 256: the reference's per-process batch of a global 192."""
  assert hideprompt_spec.scaled(5e-4) == pytest.approx(4.6875e-5)
  assert hideprompt_spec.scaled(0.03) == pytest.approx(2.8125e-3)
  assert hideprompt_spec.scaled(0.01) == pytest.approx(9.375e-4)
  assert hideprompt_spec.scaled(0.005) == pytest.approx(4.6875e-4)
  assert schedules.prompt_phase_rates(0.01, True) == {
      "prompt": 0.01,
      "head": pytest.approx(0.001)
  }
  assert schedules.prompt_phase_rates(0.01, False) == {
      "prompt": 0.01,
      "head": 0.01
  }


def test_alignment_cosine_has_no_lag():
  rates = schedules.cosine_annealing(0.005, 30)
  chex.assert_shape(rates, (30,))
  chex.assert_type(rates, np.float32)
  assert rates[0] == pytest.approx(0.005)
  assert rates[1] == pytest.approx(0.0025 * (1 + math.cos(math.pi / 30)))
  assert rates[15] == pytest.approx(0.0025)
  assert rates[29] == pytest.approx(1.3695e-5, rel=1e-3)


def test_step_schedule_lags_one_epoch():
  schedule = schedules.EpochSchedule("epoch_step", 0.01, num_epochs=50)
  got = [schedule(e) for e in range(50)]
  assert got[:31] == [0.01] * 31  # Epoch 30 still at the base rate.
  np.testing.assert_allclose(got[31:], 0.001, rtol=1e-12)
  short = schedules.EpochSchedule("epoch_step", 0.01, num_epochs=20)
  np.testing.assert_array_equal(short.rates(3), np.float32(0.01))
  assert schedules.EpochSchedule("epoch_step", 1.0)(61) == pytest.approx(0.01)


def test_cosine_schedule_lags_one_epoch_to_its_minimum():
  base, epochs = 2.8125e-3, 4
  schedule = schedules.EpochSchedule("epoch_cosine_min", base, epochs)
  # Epoch e >= 1 runs at the curve's value for e - 1.
  curve = [
      1e-5 + 0.5 * (base - 1e-5) * (1 + math.cos(math.pi * e / 4))
      for e in range(3)
  ]
  want = [base, *curve]
  assert want[:2] == [base, base]
  np.testing.assert_allclose([schedule(e) for e in range(4)], want, rtol=1e-12)
  assert schedule(5) == schedule(9) == 1e-5  # After the cycle.
  rates = schedule.rates(steps_per_epoch=3)
  chex.assert_shape(rates, (12,))
  np.testing.assert_allclose(rates, np.repeat(want, 3), rtol=1e-6)


def test_constant_schedule_and_unknown_kind():
  schedule = schedules.EpochSchedule("constant", 4.6875e-5, num_epochs=20)
  assert {schedule(e) for e in range(20)} == {4.6875e-5}
  with pytest.raises(ValueError):
    schedules.EpochSchedule("cosine", 0.1)


def _numpy_adam(params, grads_list, rates, weight_decay):
  """PyTorch: clip the global norm to 1 (1 / (norm + 1e-6)), add the L2
  term, Adam's bias-corrected moments, step."""
  p = {k: v.astype(np.float64) for k, v in params.items()}
  m = {k: np.zeros_like(v) for k, v in p.items()}
  v = {k: np.zeros_like(x) for k, x in p.items()}
  for t, (grads, rate) in enumerate(zip(grads_list, rates), start=1):
    norm = math.sqrt(
        sum((g.astype(np.float64)**2).sum() for g in grads.values()))
    coef = min(1.0, 1.0 / (norm + 1e-6))
    for k in p:
      g = grads[k] * coef + weight_decay * p[k]
      m[k] = 0.9 * m[k] + 0.1 * g
      v[k] = 0.999 * v[k] + 0.001 * g * g
      m_hat, v_hat = m[k] / (1 - 0.9**t), v[k] / (1 - 0.999**t)
      p[k] = p[k] - rate * m_hat / (np.sqrt(v_hat) + 1e-8)
  return p


@pytest.mark.parametrize("weight_decay", [0.0, schedules.NAMED_WEIGHT_DECAY])
def test_clipped_adam_against_numpy(weight_decay):
  rng = np.random.default_rng(10)
  params = {
      "prompt": rng.normal(size=(3, 5)).astype(np.float32),
      "head": rng.normal(size=(5, 2)).astype(np.float32)
  }
  # The first gradient's norm is far above 1 (clipped), the second's below.
  grads_list = [{
      k: (3.0 * rng.normal(size=v.shape)).astype(np.float32)
      for k, v in params.items()
  }, {
      k: (0.01 * rng.normal(size=v.shape)).astype(np.float32)
      for k, v in params.items()
  }]
  rates = (1e-2, 5e-3)
  tx = schedules.adam(weight_decay)
  got = jax.tree_util.tree_map(jnp.asarray, params)
  state = tx.init(got)
  for grads, rate in zip(grads_list, rates):
    grads = jax.tree_util.tree_map(jnp.asarray, grads)
    direction, state = tx.update(grads, state, got)
    got = jax.tree_util.tree_map(lambda p, u, r=rate: p - r * u, got, direction)
  chex.assert_trees_all_equal_shapes_and_dtypes(
      got, jax.tree_util.tree_map(jnp.asarray, params))
  want = _numpy_adam(params, grads_list, rates, weight_decay)
  for k in want:
    np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=1e-7)
