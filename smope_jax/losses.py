"""Losses of SMoPE while training a task: classification, router, prototype."""

import jax
import jax.numpy as jnp

from smope_jax.models.prompt_attention import score_spread


def masked_mean(values: jax.Array, mask: jax.Array) -> jax.Array:
  """Mean over real samples only (padding in the last batch has mask 0).

  Padding rows are zeroed before the sum, so a non-finite loss on a padding
  row (e.g. a -inf logit as its label) cannot turn the mean into NaN.
  """
  mask = mask.astype(values.dtype)
  kept = jnp.where(mask > 0, values, 0.0) * mask
  return jnp.sum(kept) / jnp.maximum(jnp.sum(mask), 1.0)


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Per-sample cross-entropy with integer labels; -inf logits are allowed."""
  log_probs = jax.nn.log_softmax(logits, axis=-1)
  return -jnp.take_along_axis(log_probs, labels[..., None], axis=-1)[..., 0]


def class_range_mask(num_classes: int, low: int, high: int) -> jax.Array:
  """True for the classes in [low, high)."""
  classes = jnp.arange(num_classes)
  return (classes >= low) & (classes < high)


def task_cross_entropy(logits: jax.Array, labels: jax.Array, mask: jax.Array,
                       first_class, end_class) -> jax.Array:
  """CE over the classes seen so far with earlier tasks' logits at -inf.

  Classes from `end_class` on are not seen yet and take no part; classes
  before `first_class` (earlier tasks) get -inf, so in effect the loss is CE
  over the current task's classes, as in the reference. The bounds may be
  traced values, so one compiled step serves every task.
  """
  current = class_range_mask(logits.shape[-1], first_class, end_class)
  masked = jnp.where(current[None], logits, -jnp.inf)
  return masked_mean(cross_entropy(masked, labels), mask)


def router_loss(scores: jax.Array, selected: jax.Array, epsilon: float,
                mask: jax.Array) -> jax.Array:
  """Margin cross-entropy that makes the selected experts win by a margin.

  For every prompted layer, head and selected index I_k: CE of
  s + epsilon * (1 - onehot(I)) * (max s - min s) against I_k, averaged over
  the batch and summed over layers, heads and k.

  Args:
    scores: clean scores (L, B, H, E).
    selected: chosen experts (L, B, H, K).
    epsilon: the margin factor.
    mask: (B,) real-sample mask.
  """
  num_experts = scores.shape[-1]
  chosen = jax.nn.one_hot(selected, num_experts).max(axis=-2)  # (L,B,H,E)
  logits = scores + epsilon * (1.0 - chosen) * score_spread(scores)
  log_probs = jax.nn.log_softmax(logits, axis=-1)
  picked = -jnp.take_along_axis(log_probs, selected, axis=-1)  # (L,B,H,K)
  per_sample = picked.sum(axis=(0, 2, 3))  # (B,)
  return masked_mean(per_sample, mask)


def prototype_loss(keys: jax.Array, old_keys: jax.Array, frequent: jax.Array,
                   top_k: int) -> jax.Array:
  """Keeps frequently used experts' old neighbourhoods among current keys.

  For each (layer, head) and each frequently used expert u: targets are the
  top-K of P_old[u] . P_old^T, logits are P_old[u] . P^T; CE for each of the
  K targets, mean over the frequently used experts, summed over layers,
  heads and k. A (layer, head) without marked experts contributes 0.

  Args:
    keys: current expert keys (L, H, E, d).
    old_keys: keys when the task started (L, H, E, d).
    frequent: marks (L, H, E).
    top_k: K.
  """
  old_keys = jax.lax.stop_gradient(old_keys)
  old_sim = jnp.einsum("lhud,lhed->lhue", old_keys, old_keys)
  _, targets = jax.lax.top_k(old_sim, top_k)  # (L, H, E, K)
  logits = jnp.einsum("lhud,lhed->lhue", old_keys, keys)
  log_probs = jax.nn.log_softmax(logits, axis=-1)
  ce = -jnp.take_along_axis(log_probs, targets, axis=-1).sum(-1)  # (L,H,E)
  weight = frequent.astype(ce.dtype)
  per_head = (ce * weight).sum(-1) / jnp.maximum(weight.sum(-1), 1.0)
  return per_head.sum()
