"""HiDe-Prompt's losses, as its authors' code computes them.

The reference trains on 8 processes of 24 samples each and averages their
gradients, so each process's batch is a group here: per-group means
averaged over the groups. Both stages use the cross-entropy over the
current task's classes; stage 2 adds a contrastive term of the prompted
features against old classes' centroids. The gradient is clipped as
PyTorch's `clip_grad_norm_` does.
"""

from typing import Optional

import jax
import jax.numpy as jnp
import optax

from smope_jax import losses
from smope_jax.methods import hideprompt_spec

HIGHEST = jax.lax.Precision.HIGHEST
# The reference's per-process batch: loss groups and pairing windows.
DEVICE_BATCH = hideprompt_spec.DEVICE_BATCH
_FLOOR = -1e30  # A logit that takes no part in a softmax.


def pad_to_groups(x: jax.Array, group_size: int) -> jax.Array:
  """x with zero rows appended up to a multiple of `group_size` rows (a
  batch that is not one ends with a shorter group)."""
  extra = -x.shape[0] % group_size
  return jnp.pad(x, [(0, extra)] + [(0, 0)] * (x.ndim - 1))


def group_mean(values: jax.Array, mask: jax.Array,
               group_size: Optional[int] = DEVICE_BATCH) -> jax.Array:
  """Mean over groups of each group's mean over its real samples.

  The reference's processes each average their own batch and the gradient
  is averaged over processes. Groups are consecutive runs of `group_size`
  (the last one shorter if the batch is not a multiple); groups without
  real samples are left out; `group_size=None` treats the batch as one
  group.
  """
  if group_size is None:
    return losses.masked_mean(values, mask)
  mask = pad_to_groups(mask.astype(values.dtype), group_size)
  mask = mask.reshape(-1, group_size)
  values = pad_to_groups(values, group_size).reshape(-1, group_size)
  values = jnp.where(mask > 0, values, 0.0)
  count = mask.sum(-1)
  per_group = (values * mask).sum(-1) / jnp.maximum(count, 1.0)
  used = (count > 0).astype(values.dtype)
  return jnp.sum(per_group * used) / jnp.maximum(used.sum(), 1.0)


def current_task_ce(logits: jax.Array, labels: jax.Array, mask: jax.Array,
                    first_class, end_class,
                    group_size: Optional[int] = DEVICE_BATCH) -> jax.Array:
  """CE over the current task's classes [first, end), others at -inf.

  Both stages train this way (the TII classifier and the prompted head),
  each device batch's mean averaged over the batches.
  """
  current = losses.class_range_mask(logits.shape[-1], first_class, end_class)
  masked = jnp.where(current[None], logits, -jnp.inf)
  return group_mean(losses.cross_entropy(masked, labels), mask, group_size)


def contrastive_loss(features: jax.Array, mask: jax.Array, centroids: jax.Array,
                     valid: jax.Array, temperature: float = 0.8,
                     group_size: Optional[int] = DEVICE_BATCH) -> jax.Array:
  """Pushes the prompted features away from old classes' centroids.

  Per group of samples F (n real) with the K valid centroids Q: M = [Q; F],
  S = M M^T / temperature (no normalisation), and the loss is the mean
  over ALL K + n rows of CE(S[i], target i). The centroid rows count and
  send gradient to F through their softmax denominators. Without
  centroids (task 0) it is the same term over F alone. Groups (the
  reference's device batches) are averaged, groups without real samples
  left out; `group_size=None` takes the batch as one group.

  The constant Q-Q block is computed once, and each row's log-sum-exp is
  assembled from its blocks, so no (K + n)^2 matrix per group is formed.

  Args:
    features: (B, D) prompted final-LN CLS features.
    mask: (B,) 1 for real samples (leading each group).
    centroids: (K, D) stored centroid means (no gradient).
    valid: (K,) which centroids exist (old classes; zero-variance included).
    temperature: the similarity's divisor.
    group_size: samples per group (the last group may be shorter).
  """
  batch, width = features.shape
  group_size = batch if group_size is None else group_size
  features = pad_to_groups(features.astype(jnp.float32), group_size)
  features = features.reshape(-1, group_size, width)
  real = pad_to_groups(mask > 0, group_size).reshape(-1, group_size)
  centroids = jax.lax.stop_gradient(centroids.astype(jnp.float32))
  valid = valid.astype(bool)
  dot = lambda spec, a, b: jnp.einsum(  # noqa: E731
      spec, a, b, precision=HIGHEST) / temperature
  old_old = dot("kd,jd->kj", centroids, centroids)  # (K, K)
  new_old = dot("gnd,kd->gnk", features, centroids)  # (G, n, K)
  new_new = dot("gnd,gmd->gnm", features, features)  # (G, n, n)
  old_diag = jnp.diagonal(old_old)
  new_diag = jnp.diagonal(new_new, axis1=1, axis2=2)
  # Absent columns get a finite floor, not -inf: rows with no column left
  # (dropped below) then keep finite values and zero gradients.
  old_old = jnp.where(valid[None], old_old, _FLOOR)
  new_old = jnp.where(valid[None, None], new_old, _FLOOR)
  new_new = jnp.where(real[:, None, :], new_new, _FLOOR)
  old_new = jnp.where(real[:, None, :], jnp.swapaxes(new_old, 1, 2), _FLOOR)
  # Each row's log-sum-exp over [Q ; F_g] from its two blocks.
  old_lse = jnp.logaddexp(
      jax.nn.logsumexp(old_old, axis=-1)[None],
      jax.nn.logsumexp(old_new, axis=-1))  # (G, K)
  new_lse = jnp.logaddexp(jax.nn.logsumexp(new_old, axis=-1),
                          jax.nn.logsumexp(new_new, axis=-1))  # (G, n)
  old_ce = old_lse - old_diag[None]
  new_ce = new_lse - new_diag
  old_ce = jnp.where(valid[None], old_ce, 0.0).sum(-1)
  new_ce = jnp.where(real, new_ce, 0.0).sum(-1)
  n = real.sum(-1).astype(jnp.float32)
  rows = valid.sum().astype(jnp.float32) + n
  per_group = (old_ce + new_ce) / jnp.maximum(rows, 1.0)
  used = (n > 0).astype(jnp.float32)
  return jnp.sum(per_group * used) / jnp.maximum(used.sum(), 1.0)


def clip_global_norm(max_norm: float = 1.0) -> optax.GradientTransformation:
  """PyTorch's `clip_grad_norm_`: g * min(1, max_norm / (|g| + 1e-6))."""

  def update(updates, state, params=None):
    del params
    norm = optax.global_norm(updates)
    scale = jnp.minimum(1.0, max_norm / (norm + 1e-6))
    return jax.tree_util.tree_map(lambda g: g * scale, updates), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)
