"""Sparse prompt-expert attention of SMoPE, as pure functions.

Shapes: B batch, N tokens, H heads, d head dim, E experts, K active experts.
Queries, keys and values arrive as the block's projections, laid out
(B, N, H, d) like Flax's attention. Expert keys and values are (H, E, d).

Every input's prompt column is rank one: the logit of expert j is the same
for every query row (the mean query scores the experts), so the prompt part
costs O(B*H*(E*d + N*K)) on top of plain attention.
"""

from typing import Optional

import chex
import jax
import jax.numpy as jnp

MODES = ("plain", "dense", "train", "eval")


def expert_scores(query: jax.Array, expert_keys: jax.Array) -> jax.Array:
  """Clean expert scores s = q_bar . P^K, in float32, shape (B, H, E).

  q_bar is the mean of the projected queries over all N tokens, taken after
  the projection and before the attention scale.
  """
  chex.assert_rank(query, 4)
  mean_query = jnp.mean(query.astype(jnp.float32), axis=1)  # (B, H, d)
  return jnp.einsum("bhd,hed->bhe", mean_query, expert_keys.astype(jnp.float32))


def selection_penalty(expert_state, mode: str, epsilon: float,
                      inference_penalty: float,
                      exclude_unused: bool = True) -> jax.Array:
  """Per-expert eta of the selection scores, shape (L, H, E), float32.

  Training penalises experts marked frequently used by `epsilon`. Inference
  penalises never-used experts (count 0) by `inference_penalty` (2.0 in the
  reference, which effectively excludes them). With `exclude_unused` False,
  inference penalises every expert alike, as the reference's published
  evaluation did: it reloaded the model without its counts, so all counts
  were 0; the shared penalty leaves the clean top-K. Dense mode has no
  selection.
  """
  counts, frequent = expert_state["counts"], expert_state["frequent"]
  if mode == "train":
    return jnp.where(frequent, jnp.float32(epsilon), 0.0).astype(jnp.float32)
  if mode == "eval":
    unused = (counts == 0) | (not exclude_unused)
    return jnp.where(unused, jnp.float32(inference_penalty),
                     0.0).astype(jnp.float32)
  return jnp.zeros(counts.shape, jnp.float32)


def score_spread(scores: jax.Array) -> jax.Array:
  """max_j s - min_j s per (sample, head), without gradient. Shape (B, H, 1)."""
  spread = (jnp.max(scores, axis=-1, keepdims=True) -
            jnp.min(scores, axis=-1, keepdims=True))
  return jax.lax.stop_gradient(spread)


def select_experts(scores: jax.Array, eta: jax.Array, top_k: int) -> jax.Array:
  """Indices of the top-K of s_hat = s - eta * spread, shape (B, H, K) int32.

  Args:
    scores: clean scores (B, H, E).
    eta: per-expert penalty of this layer (H, E).
    top_k: static K.
  """
  penalised = scores - eta[None] * score_spread(scores)
  _, indices = jax.lax.top_k(jax.lax.stop_gradient(penalised), top_k)
  return indices.astype(jnp.int32)


def gather_expert_vectors(expert_vectors: jax.Array,
                          indices: jax.Array) -> jax.Array:
  """Rows I of the shared per-head experts (H, E, d) -> (B, H, K, d)."""
  heads = jnp.arange(expert_vectors.shape[0])[None, :, None]
  return expert_vectors[heads, indices]


def prompted_attention(query: jax.Array, key: jax.Array, value: jax.Array,
                       prompt_logits: jax.Array, prompt_values: jax.Array,
                       *, fused: bool = False) -> jax.Array:
  """Softmax over [prompt logits ; q.k * scale] and the weighted value sum.

  Args:
    query, key, value: (B, N, H, d) projections in the compute dtype.
    prompt_logits: (B, H, P) float32, already multiplied by the scale; the
      same for every query row (P = K in top-K mode, E in dense mode).
    prompt_values: (B, H, P, d) the active experts' value vectors.
    fused: use `jax.nn.dot_product_attention` with P zero keys whose additive
      bias is the prompt logit (the spec's fused equivalent).

  Returns:
    (B, N, H, d) attention output before the output projection.
  """
  batch, tokens, heads, head_dim = query.shape
  num_prompts = prompt_logits.shape[-1]
  chex.assert_shape(prompt_logits, (batch, heads, num_prompts))
  chex.assert_shape(prompt_values, (batch, heads, num_prompts, head_dim))
  if fused:
    dtype = query.dtype
    zero_keys = jnp.zeros((batch, num_prompts, heads, head_dim), dtype)
    values_p = jnp.swapaxes(prompt_values, 1, 2).astype(dtype)  # (B,P,H,d)
    bias = jnp.concatenate(
        [prompt_logits, jnp.zeros((batch, heads, tokens), jnp.float32)],
        axis=-1)[:, :, None, :]  # (B, H, 1, P + N)
    return jax.nn.dot_product_attention(
        query, jnp.concatenate([zero_keys, key], axis=1),
        jnp.concatenate([values_p, value], axis=1),
        bias=bias.astype(dtype), scale=head_dim ** -0.5)
  return _softmax_attention(query, key, value, prompt_logits, prompt_values)


def plain_attention(query: jax.Array, key: jax.Array, value: jax.Array,
                    *, fused: bool = False) -> jax.Array:
  """Standard softmax attention of an unprompted block, (B, N, H, d)."""
  if fused:
    return jax.nn.dot_product_attention(query, key, value,
                                        scale=query.shape[-1] ** -0.5)
  return _softmax_attention(query, key, value)


def _softmax_attention(query, key, value, prompt_logits=None,
                       prompt_values=None):
  """Softmax attention, optionally over extra rank-one prompt columns.

  Runs head-major, (B, H, N, d): there XLA's CPU matmuls take contiguous
  per-head blocks, several times faster than the token-major einsums. The
  softmax is normalised after the value product, dividing the (N, d) output
  instead of the (N, N) weights, and the prompt columns enter as their own
  small product, so nothing (N, P + N) is concatenated or sliced.
  """
  dtype = query.dtype
  scale = query.shape[-1] ** -0.5
  q, k, v = (jnp.swapaxes(x, 1, 2) for x in (query, key, value))
  logits = jnp.einsum("bhqd,bhkd->bhqk", q, k).astype(jnp.float32) * scale
  row_max = jnp.max(logits, axis=-1, keepdims=True)
  if prompt_logits is not None:
    row_max = jnp.maximum(
        row_max, jnp.max(prompt_logits, axis=-1)[:, :, None, None])
  # The result does not depend on the shift; no gradient needs to flow.
  row_max = jax.lax.stop_gradient(row_max)
  weights = jnp.exp(logits - row_max)
  denominator = jnp.sum(weights, axis=-1, keepdims=True)
  out = jnp.einsum("bhqk,bhkd->bhqd", weights.astype(dtype), v)
  if prompt_logits is not None:
    prompt_weights = jnp.exp(prompt_logits[:, :, None, :] - row_max)
    denominator = denominator + jnp.sum(prompt_weights, axis=-1,
                                        keepdims=True)
    out = out + jnp.einsum("bhqp,bhpd->bhqd", prompt_weights.astype(dtype),
                           prompt_values.astype(dtype))
  return jnp.swapaxes(out / denominator.astype(dtype), 1, 2)


def route(query: jax.Array, expert_keys: jax.Array, expert_values: jax.Array,
          eta: Optional[jax.Array], top_k: int, mode: str):
  """Scores the experts and picks the prompt columns for one block.

  Returns (prompt_logits (B,H,P), prompt_values (B,H,P,d), scores (B,H,E),
  selected (B,H,K)). In dense mode every expert takes part (P = E) and
  `selected` is the top-K of the clean scores, for reporting only.
  """
  scores = expert_scores(query, expert_keys)
  scale = query.shape[-1] ** -0.5
  if mode == "dense":
    selected = select_experts(scores, jnp.zeros(scores.shape[1:]), top_k)
    values = jnp.broadcast_to(expert_values[None].astype(jnp.float32),
                              (scores.shape[0],) + expert_values.shape)
    return scores * scale, values, scores, selected
  selected = select_experts(scores, eta, top_k)
  # The attention logits use the CLEAN scores of the selected experts.
  prompt_logits = jnp.take_along_axis(scores, selected, axis=-1) * scale
  values = gather_expert_vectors(expert_values.astype(jnp.float32), selected)
  return prompt_logits, values, scores, selected
