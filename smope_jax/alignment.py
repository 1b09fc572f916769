"""Classifier alignment with Gaussian feature replay (spec section 4).

After every task the mean and population variance of each new class's
pre-logits are stored. From the second task on, the classifier alone is
re-trained on features drawn from N(mean, diag(var) + 1e-4 I) for all seen
classes; backbone and prompts are untouched.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from smope_jax import losses

VARIANCE_FLOOR = 1e-4


def class_statistics(features: np.ndarray, labels: np.ndarray,
                     classes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Per-class mean and population variance, computed in float64.

  Returns two (len(classes), D) float32 arrays. A class without training
  images (only possible with synthetic data) gets zeros and a warning.
  """
  features = np.asarray(features, np.float64)
  empty = [int(c) for c in classes if not np.any(labels == c)]
  if empty:
    logging.warning("classes %s have no training images; their replay "
                    "statistics are zero", empty)
  means, variances = [], []
  for c in classes:
    rows = features[labels == c]
    if len(rows) == 0:
      rows = np.zeros((1, features.shape[1]))
    means.append(rows.mean(axis=0))
    variances.append(rows.var(axis=0))
  return (np.stack(means).astype(np.float32),
          np.stack(variances).astype(np.float32))


def sample_features(key, means, variances, per_class: int):
  """(S * per_class, D) shuffled features and their labels 0..S-1."""
  num_classes, dim = means.shape
  draw_key, shuffle_key = jax.random.split(key)
  noise = jax.random.normal(draw_key, (num_classes, per_class, dim))
  feats = means[:, None] + jnp.sqrt(variances[:, None] + VARIANCE_FLOOR) * noise
  labels = jnp.repeat(jnp.arange(num_classes, dtype=jnp.int32), per_class)
  order = jax.random.permutation(shuffle_key, num_classes * per_class)
  return feats.reshape(-1, dim)[order], labels[order]


@functools.partial(jax.jit,
                   static_argnames=("tx", "per_class", "steps_per_epoch",
                                    "num_epochs"))
def align_head(head, means, variances, key, *, tx, per_class: int,
               steps_per_epoch: int, num_epochs: int):
  """Trains the head on replayed features; returns the new head.

  Args:
    head: {'kernel': (D, C), 'bias': (C,)} classifier over all classes.
    means, variances: (S, D) statistics of the S classes seen so far, in
      label order (label c has row c).
    key: PRNG key of this task's alignment.
    tx: the optimizer (a new one per alignment).
    per_class: samples drawn per class and epoch (batch * align_ratio); also
      the number of samples per iteration.
    steps_per_epoch: iterations per epoch (classes of the earlier tasks).
    num_epochs: alignment epochs.
  """
  num_seen = means.shape[0]

  def loss_fn(params, feats, labels):
    logits = feats @ params["kernel"] + params["bias"]
    seen = jnp.arange(logits.shape[-1]) < num_seen
    logits = jnp.where(seen[None], logits, -jnp.inf)
    return jnp.mean(losses.cross_entropy(logits, labels))

  def epoch(carry, epoch_key):
    feats, labels = sample_features(epoch_key, means, variances, per_class)

    def iteration(carry, i):
      params, opt_state = carry
      start = i * per_class
      batch = jax.lax.dynamic_slice_in_dim(feats, start, per_class)
      batch_labels = jax.lax.dynamic_slice_in_dim(labels, start, per_class)
      grads = jax.grad(loss_fn)(params, batch, batch_labels)
      updates, opt_state = tx.update(grads, opt_state, params)
      return (optax.apply_updates(params, updates), opt_state), None

    carry, _ = jax.lax.scan(iteration, carry, jnp.arange(steps_per_epoch))
    return carry, None

  (head, _), _ = jax.lax.scan(epoch, (head, tx.init(head)),
                              jax.random.split(key, num_epochs))
  return head
