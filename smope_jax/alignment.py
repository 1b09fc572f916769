"""Classifier alignment with Gaussian feature replay.

After every task the mean and population variance of each new class's
pre-logits are stored (read with the training augmentation, the model in
inference mode). From the second task on, the classifier alone is
re-trained on features drawn from N(mean, diag(var) + 1e-4 I) for all seen
classes, CE over all seen classes without masking; backbone and prompts are
untouched. Per epoch, batch_size * align_ratio samples per seen class are
shuffled and (classes of earlier tasks) iterations of that many samples
are taken, with AdamW (weight decay 5e-4).
"""

import jax
import jax.numpy as jnp
import numpy as np
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
    logging.warning(
        "classes %s have no training images; their replay "
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


def epoch_order(key, num_seen, per_class: int, num_classes: int):
  """A shuffled order of one epoch's replayed samples.

  An epoch draws `per_class` samples of every seen class; sample id s
  belongs to class s // per_class. Ids of unseen classes sort last, so the
  first num_seen * per_class entries are a uniform shuffle of the seen ones
  and the shapes do not depend on the task.
  """
  ids = jnp.arange(num_classes * per_class)
  priority = jax.random.uniform(key, ids.shape)
  priority = jnp.where(ids // per_class < num_seen, priority, 2.0)
  return ids[jnp.argsort(priority)]


def align_head(head, means, variances, key, num_seen, iterations, rates, *, tx,
               per_class: int, num_epochs: int):
  """Trains the head on replayed features; returns the new head.

  Jitted with its static arguments bound by `train_step.make_steps`.

  Each iteration draws its samples from N(mean, diag(var) + 1e-4 I) of
  their classes. The reference draws a whole epoch and uses only its first
  (classes of earlier tasks) batches; drawing just those gives them the same
  distribution. One compiled function serves every task: the class count,
  the number of iterations and the learning rates are arguments.

  Args:
    head: {'kernel': (D, C), 'bias': (C,)} classifier over all classes.
    means, variances: (C, D) class statistics in label order; rows of
      unseen classes are ignored.
    key: PRNG key of this task's alignment.
    num_seen: int32, classes seen so far (labels 0..num_seen-1).
    iterations: int32, iterations per epoch (classes of the earlier tasks).
    rates: float32 (num_epochs * C,) learning rate of iteration
      e * iterations + i (entries past the last iteration unused).
    tx: the update direction (a new one per alignment; see
      `schedules.adam`).
    per_class: samples drawn per class and epoch (batch * align_ratio);
      also the number of samples per iteration.
    num_epochs: alignment epochs.
  """
  num_classes = means.shape[0]

  def loss_fn(params, feats, labels):
    logits = feats @ params["kernel"] + params["bias"]
    seen = losses.class_range_mask(num_classes, 0, num_seen)
    logits = jnp.where(seen[None], logits, -jnp.inf)
    return jnp.mean(losses.cross_entropy(logits, labels))

  def epoch(e, carry):
    order_key, noise_key = jax.random.split(jax.random.fold_in(key, e))
    order = epoch_order(order_key, num_seen, per_class, num_classes)

    def iteration(i, carry):
      params, opt_state = carry
      ids = jax.lax.dynamic_slice_in_dim(order, i * per_class, per_class)
      labels = (ids // per_class).astype(jnp.int32)
      noise = jax.random.normal(jax.random.fold_in(noise_key, i),
                                (per_class, means.shape[1]))
      feats = means[labels] + jnp.sqrt(variances[labels] +
                                       VARIANCE_FLOOR) * noise
      grads = jax.grad(loss_fn)(params, feats, labels)
      direction, opt_state = tx.update(grads, opt_state, params)
      rate = rates[e * iterations + i]
      params = jax.tree_util.tree_map(lambda p, u: p - rate * u, params,
                                      direction)
      return params, opt_state

    return jax.lax.fori_loop(0, iterations, iteration, carry)

  head, _ = jax.lax.fori_loop(0, num_epochs, epoch, (head, tx.init(head)))
  return head
