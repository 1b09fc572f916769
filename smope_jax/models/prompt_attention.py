"""SMoPE's expert routing: scores, selection and the prefix it gives.

Shapes: B batch, N tokens, H heads, d head dim, E experts, K active experts.
Queries arrive as the block's projections, laid out (B, N, H, d) like
Flax's attention. Expert keys and values are (H, E, d).

Every input's prompt column is rank one: the logit of expert j is the same
for every query row (the mean query scores the experts), so the prompt part
costs O(B*H*(E*d + N*K)) on top of plain attention; `models.attention`
takes it as a prefix with zero keys and these logits as its bias.
"""

from typing import Optional

import chex
import jax
import jax.numpy as jnp

from smope_jax.models import matmul

# How the scores' product is computed: "" at the context's precision,
# "bfloat16" as every product of the model (`models.matmul`), "float32" in
# full float32 whatever the context.
SCORE_PRODUCTS = ("", "bfloat16", "float32")


def expert_scores(query: jax.Array, expert_keys: jax.Array,
                  products: str = "") -> jax.Array:
  """Clean expert scores s = q_bar . P^K, in float32, shape (B, H, E).

  q_bar is the mean of the projected queries over all N tokens, taken after
  the projection and before the attention scale. `products` is one of
  SCORE_PRODUCTS.
  """
  chex.assert_rank(query, 4)
  if products not in SCORE_PRODUCTS:
    raise ValueError(f"products must be one of {SCORE_PRODUCTS}, got "
                     f"{products!r}")
  mean_query = jnp.mean(query.astype(jnp.float32), axis=1)  # (B, H, d)
  precision = jax.lax.Precision.HIGHEST if products == "float32" else None
  return matmul.einsum("bhd,hed->bhe", mean_query,
                       expert_keys.astype(jnp.float32),
                       bfloat16=products == "bfloat16", precision=precision)


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


def route(query: jax.Array, expert_keys: jax.Array, expert_values: jax.Array,
          eta: Optional[jax.Array], top_k: int, mode: str, products: str = ""):
  """Scores the experts and picks the prompt columns for one block.

  Returns (prompt_logits (B,H,P), prompt_values (B,H,P,d), scores (B,H,E),
  selected (B,H,K)). In dense mode every expert takes part (P = E) and
  `selected` is the top-K of the clean scores, for reporting only.
  `products` is the scores' (see `expert_scores`).
  """
  scores = expert_scores(query, expert_keys, products)
  scale = query.shape[-1]**-0.5
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
