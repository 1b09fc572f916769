"""The one attention kernel of every method: softmax over prefix + tokens.

A prompted block attends over P extra key/value slots (the prefix) before
its N tokens. The prefix logit of query row i and slot p is

    q_i . k_p * scale + bias_p,      scale = d ** -0.5,

in one softmax with the tokens' logits q_i . k_n * scale; the output is the
weighted sum of [prefix values ; token values]. Prefix tuning (L2P,
DualPrompt, CODA-Prompt) gives real keys and no bias. SMoPE's prefix is
rank one: zero keys and the bias s_I * scale, the same for every row, so
its logits are never formed per row. Shapes: B batch, N tokens, H heads,
d head dim, P prefix slots; prefix arrays are head-major, (B, H, P, d).
"""

from typing import Any, Optional

import chex
import flax
import jax
import jax.numpy as jnp

from smope_jax.models import matmul


@flax.struct.dataclass
class Prefix:
  """The extra key/value slots of one prompted block.

  Attributes:
    values: (B, H, P, d) prefix values.
    keys: (B, H, P, d) prefix keys, or None for zero keys.
    bias: (B, H, P) float32 additive logits (already scaled), or None.
    aux: whatever the method reports about this block (e.g. routing).
  """
  values: jax.Array
  keys: Optional[jax.Array] = None
  bias: Optional[jax.Array] = None
  aux: Any = None


def head_major(tokens: jax.Array, num_heads: int) -> jax.Array:
  """(B, P, D) prompt tokens -> (B, H, P, d), head h taking dims h*d.."""
  batch, length, width = tokens.shape
  split = tokens.reshape(batch, length, num_heads, width // num_heads)
  return jnp.swapaxes(split, 1, 2)


def prefix_logits(query: jax.Array, prefix: Prefix,
                  bfloat16_products: bool = False) -> jax.Array:
  """float32 (B, H, N, P) or, for a rank-one prefix, (B, H, 1, P)."""
  logits = None
  if prefix.keys is not None:
    q = jnp.swapaxes(query, 1, 2)  # (B, H, N, d)
    logits = matmul.einsum("bhqd,bhpd->bhqp", q, prefix.keys.astype(q.dtype),
                           bfloat16=bfloat16_products)
    logits = logits.astype(jnp.float32) * query.shape[-1]**-0.5
  if prefix.bias is not None:
    bias = prefix.bias[:, :, None, :].astype(jnp.float32)
    logits = bias if logits is None else logits + bias
  return logits


def prefix_attention(query: jax.Array, key: jax.Array, value: jax.Array,
                     prefix: Optional[Prefix] = None, *, fused: bool = False,
                     bfloat16_products: bool = False) -> jax.Array:
  """Attention over [prefix ; tokens]; (B, N, H, d) in and out.

  Args:
    query, key, value: (B, N, H, d) projections in the compute dtype.
    prefix: the block's prefix, or None for plain attention.
    fused: use `jax.nn.dot_product_attention` with the prefix as P extra
      keys (zeros when it has none) and its bias as an additive bias.
    bfloat16_products: the products of `models.matmul`; the fused kernel
      gets bfloat16 inputs (it sums their products in float32) and its
      output comes back in the query's dtype.
  """
  if prefix is not None:
    batch, _, heads, head_dim = query.shape
    num_prefix = prefix.values.shape[2]
    chex.assert_shape(prefix.values, (batch, heads, num_prefix, head_dim))
  if fused and bfloat16_products:
    dtype = query.dtype
    to_bf16 = lambda x: x.astype(jnp.bfloat16)  # noqa: E731
    if prefix is not None:
      prefix = prefix.replace(
          values=to_bf16(prefix.values),
          keys=(None if prefix.keys is None else to_bf16(prefix.keys)))
    return _fused_attention(to_bf16(query), to_bf16(key), to_bf16(value),
                            prefix).astype(dtype)
  if fused:
    return _fused_attention(query, key, value, prefix)
  return _softmax_attention(query, key, value, prefix, bfloat16_products)


def _fused_attention(query, key, value, prefix):
  scale = query.shape[-1]**-0.5
  if prefix is None:
    return jax.nn.dot_product_attention(query, key, value, scale=scale)
  dtype = query.dtype
  batch, tokens, heads, _ = query.shape
  as_tokens = lambda x: jnp.swapaxes(x, 1, 2).astype(dtype)  # noqa: E731
  prefix_keys = (jnp.zeros_like(prefix.values)
                 if prefix.keys is None else prefix.keys)
  bias = None
  if prefix.bias is not None:
    bias = jnp.concatenate(
        [prefix.bias,
         jnp.zeros((batch, heads, tokens), jnp.float32)],
        axis=-1)[:, :, None, :].astype(dtype)  # (B, H, 1, P + N)
  return jax.nn.dot_product_attention(
      query, jnp.concatenate([as_tokens(prefix_keys), key], axis=1),
      jnp.concatenate([as_tokens(prefix.values), value], axis=1), bias=bias,
      scale=scale)


def _softmax_attention(query, key, value, prefix=None, bfloat16_products=False):
  """Softmax attention with the prefix columns as their own small product.

  Runs head-major, (B, H, N, d): there XLA's CPU matmuls take contiguous
  per-head blocks, several times faster than the token-major einsums. The
  softmax is normalised after the value product, dividing the (N, d) output
  instead of the (N, N) weights, and nothing (N, P + N) is concatenated.
  """
  dtype = query.dtype
  scale = query.shape[-1]**-0.5
  q, k, v = (jnp.swapaxes(x, 1, 2) for x in (query, key, value))
  product = lambda spec, a, b: matmul.einsum(  # noqa: E731
      spec, a, b, bfloat16=bfloat16_products)
  logits = product("bhqd,bhkd->bhqk", q, k).astype(jnp.float32) * scale
  row_max = jnp.max(logits, axis=-1, keepdims=True)
  if prefix is not None:
    extra = prefix_logits(query, prefix, bfloat16_products)
    row_max = jnp.maximum(row_max, jnp.max(extra, axis=-1, keepdims=True))
  # The result does not depend on the shift; no gradient needs to flow.
  row_max = jax.lax.stop_gradient(row_max)
  weights = jnp.exp(logits - row_max)
  denominator = jnp.sum(weights, axis=-1, keepdims=True)
  out = product("bhqk,bhkd->bhqd", weights.astype(dtype), v)
  if prefix is not None:
    extra_weights = jnp.exp(extra - row_max)
    denominator = denominator + jnp.sum(extra_weights, axis=-1, keepdims=True)
    out = out + product("bhqp,bhpd->bhqd", extra_weights.astype(dtype),
                        prefix.values.astype(dtype))
  return jnp.swapaxes(out / denominator.astype(dtype), 1, 2)
