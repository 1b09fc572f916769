"""Expert bookkeeping of SMoPE, as pure functions on arrays.

The expert state is a dict of two (L, H, E) arrays: `counts` (int32, how
many training samples had expert j in the top-K of their clean scores,
accumulated over tasks) and `frequent` (bool, marked "frequently used" at a
task boundary; a mark is never removed).
"""

import jax
import jax.numpy as jnp


def init_expert_state(num_layers: int, num_heads: int,
                      num_experts: int) -> dict:
  shape = (num_layers, num_heads, num_experts)
  return {
      "counts": jnp.zeros(shape, jnp.int32),
      "frequent": jnp.zeros(shape, bool)
  }


def batch_activation_counts(scores: jax.Array, top_k: int,
                            mask: jax.Array) -> jax.Array:
  """Per-expert number of real samples whose clean top-K contains it.

  Args:
    scores: clean expert scores (L, B, H, E).
    top_k: K.
    mask: (B,) 1 for real samples, 0 for padding.

  Returns:
    int32 (L, H, E).
  """
  _, top = jax.lax.top_k(scores, top_k)  # (L, B, H, K)
  hits = jax.nn.one_hot(top, scores.shape[-1], dtype=jnp.int32).sum(axis=-2)
  hits = hits * mask.astype(jnp.int32)[None, :, None, None]
  return hits.sum(axis=1)


def update_counts(expert_state: dict, scores: jax.Array, top_k: int,
                  mask: jax.Array) -> dict:
  """Adds one batch's activations; the next batch's routing sees them."""
  counts = expert_state["counts"] + batch_activation_counts(scores, top_k, mask)
  return {**expert_state, "counts": counts}


def mark_frequent(expert_state: dict) -> dict:
  """Marks experts used at least as often as the mean of the used ones.

  Per (layer, head): threshold = sum(counts) / max(#experts with count > 0,
  1), as the reference computes it; marks only accumulate.
  """
  counts = expert_state["counts"].astype(jnp.float32)
  used = jnp.maximum(jnp.sum(counts > 0, axis=-1, keepdims=True), 1)
  threshold = jnp.sum(counts, axis=-1, keepdims=True) / used
  frequent = expert_state["frequent"] | (counts >= threshold)
  return {**expert_state, "frequent": frequent}


def snapshot_prompts(prompts: dict) -> dict:
  """Copy of the expert keys and values taken when a task starts."""
  return jax.tree_util.tree_map(lambda x: jnp.array(x, copy=True), prompts)
