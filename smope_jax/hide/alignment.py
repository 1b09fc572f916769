"""Gaussian replay over class clusters: HiDe-Prompt's alignment phases.

After each task from the second on, a classifier is re-trained on features
drawn from the stored clusters (`hide.statistics`) of every class seen so
far: the task-identity classifier (its MLP, LayerNorm and head) on the
frozen backbone's statistics, and the head alone on the prompted ones. The
caller's `apply_fn` maps features to logits, so both share this code.

One alignment, as the reference runs it:
  - a new SGD with momentum 0.9 (no Nesterov, no dampening; no weight
    decay unless `config.hide.named_weight_decay`),
    kept over all its epochs, at one rate per epoch
    (`hide.schedules.cosine_annealing`);
  - every epoch draws `per_centroid` samples from N(mean, diag(var) +
    1e-4 I) of each cluster of each seen class, skipping absent clusters
    and those whose mean variance is 0, shuffles them, and takes
    `iterations` (classes of the earlier tasks) batches of `per_centroid`
    samples in that order (24 per cluster for the task-identity
    classifier, 120 for the head);
  - each batch's loss is the mean CE with the logits of unseen classes at
    -inf.
Only the batches an epoch uses are drawn; they have the same distribution
as the head of a fully drawn and shuffled epoch. Should an epoch run out
of samples (fewer replayable clusters than iterations), the iterations
past its last sample leave parameters and momentum unchanged (the
reference would stop on a NaN loss there). The first released version of
the reference had the two sample counts the other way round
(`PER_CENTROID_FIRST_RELEASE`).
"""

import functools
from typing import Callable

import jax
import jax.numpy as jnp
import optax

from smope_jax import losses

VARIANCE_FLOOR = 1e-4
MOMENTUM = 0.9
# Samples per cluster (and per batch): task-identity classifier, head.
PER_CENTROID = {"tii": 24, "head": 120}
PER_CENTROID_FIRST_RELEASE = {"tii": 120, "head": 24}


def momentum_direction(
    weight_decay: float = 0.0) -> optax.GradientTransformation:
  """PyTorch SGD's momentum buffer (buf = 0.9 buf + g, first buf = g, with
  g = grad + weight_decay * param) as the update direction; the rate is
  applied by the caller."""
  return optax.chain(optax.add_decayed_weights(weight_decay),
                     optax.trace(decay=MOMENTUM, nesterov=False))


def replayable(variances: jax.Array, present: jax.Array) -> jax.Array:
  """bool (C, K): clusters the replay draws from (present, mean var != 0)."""
  return present & (jnp.mean(variances, axis=-1) != 0)


def epoch_order(key, usable: jax.Array, num_seen, per_centroid: int):
  """A shuffled order of one epoch's sample ids, usable ones first.

  Sample id s belongs to cluster s // per_centroid of the flattened (C, K)
  clusters; ids of unusable clusters or unseen classes sort last, so the
  usable ids come first in a uniform shuffle whatever the task.

  Returns the (C * K * per_centroid,) order and whether each entry is
  usable.
  """
  num_classes, num_centroids = usable.shape
  ids = jnp.arange(num_classes * num_centroids * per_centroid)
  centroid = ids // per_centroid
  seen = centroid // num_centroids < num_seen
  ok = seen & usable.reshape(-1)[centroid]
  priority = jnp.where(ok, jax.random.uniform(key, ids.shape), 2.0)
  order = jnp.argsort(priority)
  return order, ok[order]


def replay_batch(key, means, variances, ids, per_centroid: int):
  """Features and labels of the sample ids (one draw each)."""
  num_centroids, dim = means.shape[1:]
  centroid = ids // per_centroid
  labels = (centroid // num_centroids).astype(jnp.int32)
  mean = means.reshape(-1, dim)[centroid]
  std = jnp.sqrt(variances.reshape(-1, dim)[centroid] + VARIANCE_FLOOR)
  noise = jax.random.normal(key, (ids.shape[0], dim), means.dtype)
  return mean + std * noise, labels


def masked_loss(params, feats, labels, weights, num_seen, apply_fn):
  """Mean CE over the weighted samples, unseen classes' logits at -inf."""
  logits = apply_fn(params, feats)
  seen = losses.class_range_mask(logits.shape[-1], 0, num_seen)
  logits = jnp.where(seen[None], logits, -jnp.inf)
  return losses.masked_mean(losses.cross_entropy(logits, labels), weights)


def align_step(params, opt_state, feats, labels, weights, num_seen, rate, *,
               apply_fn: Callable, tx: optax.GradientTransformation):
  """One SGD step on a replayed batch; no change if it has no sample."""
  grads = jax.grad(masked_loss)(params, feats, labels, weights, num_seen,
                                apply_fn)
  direction, new_state = tx.update(grads, opt_state, params)
  new_params = jax.tree_util.tree_map(lambda p, u: p - rate * u, params,
                                      direction)
  keep = jnp.sum(weights) > 0

  def pick(new, old):
    return jax.tree_util.tree_map(lambda a, b: jnp.where(keep, a, b), new, old)

  return pick(new_params, params), pick(new_state, opt_state)


def align_epoch(params, opt_state, means, variances, present, key, num_seen,
                iterations, rate, *, apply_fn: Callable,
                tx: optax.GradientTransformation, per_centroid: int):
  """One epoch of the alignment; jit with the keywords bound.

  Args:
    params: the trained parameters (what `apply_fn` reads).
    opt_state: `tx`'s state, carried over the epochs.
    means, variances: float32 (C, K, D) cluster statistics in label order.
    present: bool (C, K) cluster presence.
    key: this epoch's PRNG key.
    num_seen: int32, classes seen so far (labels 0..num_seen-1).
    iterations: int32, batches this epoch (classes of the earlier tasks).
    rate: float32, this epoch's learning rate.
    apply_fn: (params, (n, D) features) -> (n, C) logits.
    tx: the update direction (`momentum_direction`).
    per_centroid: samples per cluster, and per batch.

  Returns:
    The new params and opt_state.
  """
  order_key, noise_key = jax.random.split(key)
  usable = replayable(variances, present)
  order, ok = epoch_order(order_key, usable, num_seen, per_centroid)

  def iteration(i, carry):
    ids = jax.lax.dynamic_slice_in_dim(order, i * per_centroid, per_centroid)
    weights = jax.lax.dynamic_slice_in_dim(ok, i * per_centroid, per_centroid)
    feats, labels = replay_batch(jax.random.fold_in(noise_key, i), means,
                                 variances, ids, per_centroid)
    return align_step(*carry, feats, labels, weights.astype(feats.dtype),
                      num_seen, rate, apply_fn=apply_fn, tx=tx)

  return jax.lax.fori_loop(0, iterations, iteration, (params, opt_state))


def make_align_epoch(apply_fn: Callable, per_centroid: int, *,
                     weight_decay: float = 0.0, **jit_options):
  """`align_epoch` jitted for one classifier, sample count and decay."""
  return jax.jit(
      functools.partial(align_epoch, apply_fn=apply_fn,
                        per_centroid=per_centroid,
                        tx=momentum_direction(weight_decay)), **jit_options)


def align(params, means, variances, present, key, num_seen: int,
          iterations: int, rates, *, epoch_fn: Callable):
  """A whole alignment; returns the new params.

  A fresh momentum state, then one `epoch_fn` (from `make_align_epoch`)
  call per epoch e at rates[e] with the key fold_in(key, e): the result
  depends only on the arguments.
  """
  tx = momentum_direction()
  opt_state = tx.init(params)
  for e, rate in enumerate(rates):
    params, opt_state = epoch_fn(params, opt_state, means, variances, present,
                                 jax.random.fold_in(key, e),
                                 jnp.int32(num_seen), jnp.int32(iterations),
                                 jnp.float32(rate))
  return params
