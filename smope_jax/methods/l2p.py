"""L2P++ and Deep L2P++: a pool of prompts chosen by query-key similarity.

As the reference code runs them (prefix tuning, the CODA-Prompt variant of
L2P): per prompted block a pool of M prompts (M, L, D) and keys (M, D),
uniform on [0, 1). Every input takes the top-K pool entries by the cosine
of its query (the prompt-free pass's CLS) to the keys, in training and at
test time alike; each block selects with its own keys. The K prompts are
laid end to end: K * L / 2 key and as many value tokens. L2P++ prompts
block 0, Deep L2P++ blocks 0-4. The whole pool trains in every task.

Key loss, added with weight 1 to the classification loss: the reference
sums 1 - cos[b, idx[b', j]] over ALL pairs of samples (b, b') of a batch
(`cos[:, idx]` is a (B, B, K) tensor there), so every chosen key is pulled
towards every query of the batch. It ran on 4 GPUs with DataParallel, so
the pairs formed within each quarter of the batch; `key_loss_groups` sets
that split (1 = the whole batch). `key_loss='per_sample'` pairs each
sample with its own keys only, as L2P's paper does.
"""

import jax
import jax.numpy as jnp

from smope_jax.methods import base


class L2PPrompts(base.PoolPrompts):
  """The pools, each input's top-K entries by query-key cosine."""
  top_k: int

  def prefix(self, layer, block_query, *, query, context, mode):
    del block_query, context, mode
    if layer >= self.num_layers:
      return None
    similarity = base.cosine_to_keys(query, self.keys[layer])  # (B, M)
    _, chosen = jax.lax.top_k(jax.lax.stop_gradient(similarity), self.top_k)
    return base.key_value_prefix(self.pool[layer][chosen], self.num_heads,
                                 aux=dict(similarity=similarity, chosen=chosen))

  def outputs(self, aux, *, query, context, mode):
    """Key similarities (L, B, M) and chosen entries (L, B, K)."""
    del query, context, mode
    return dict(key_similarity=base.stack_aux(aux, "similarity"),
                key_chosen=base.stack_aux(aux, "chosen"))


def key_loss(similarity: jax.Array, chosen: jax.Array, mask: jax.Array,
             group: int, cross_sample: bool) -> jax.Array:
  """Sum of 1 - cos over the prompted layers (see the module docstring).

  Args:
    similarity: (L, B, M) cosines of queries to keys.
    chosen: (L, B, K) chosen pool entries.
    mask: (B,) 1 for real samples.
    group: samples whose pairs are summed together; divides B.
    cross_sample: every query with every sample's chosen keys in its group,
      or each query with its own.
  """
  num_layers, batch, pool = similarity.shape
  distance = (1.0 - similarity) * mask[None, :, None]
  if not cross_sample:
    picked = jnp.take_along_axis(distance, chosen, axis=-1)
    return jnp.sum(picked * mask[None, :, None])
  # How often each entry was chosen within each group, by real samples.
  hits = jax.nn.one_hot(chosen, pool) * mask[None, :, None, None]
  groups = batch // group
  per_group = hits.sum(2).reshape(num_layers, groups, group, pool).sum(2)
  distance = distance.reshape(num_layers, groups, group, pool)
  return jnp.sum(distance * per_group[:, :, None, :])


class L2P(base.Method):
  """L2P++ (block 0) or Deep L2P++ (blocks 0-4): the pool and its keys."""

  def prompts(self):
    c, d = self.config, self.dims
    return L2PPrompts(num_layers=self.num_layers, pool_size=c.pool_size,
                      length=c.prompt_length, hidden_size=d["hidden_size"],
                      num_heads=d["num_heads"], top_k=c.top_k)

  def loss_terms(self, out, trainable, state, task, mask, mode):
    del trainable, state, task
    if mode != "train":
      return {}
    group = mask.shape[0] // self.config.key_loss_groups
    return {
        "key": (key_loss(out["key_similarity"], out["key_chosen"], mask, group,
                         self.config.key_loss == "cross_sample"), 1.0)
    }
