"""VQ-Prompt: the prompt pool as a codebook, one discrete entry per input.

As the authors' code runs it: per prompted block (0-4) a pool of M prompts
(M, Lp, D) and keys (M, D), uniform on [0, 1), shared by all tasks and
trained in every task (nothing is reserved, frozen or re-drawn).

- Weights: alpha = softmax(q Kn^T / tau) over the M entries, with Kn the
  keys scaled to unit rows and q the query as it comes (NOT unit length,
  so the logits grow with |q|).
- The continuous prompt p_a = sum_m alpha_m P_m; the prompt used is the
  pool entry z nearest to p_a in squared distance over all Lp * D numbers
  (the first on ties). It enters the block as p_a + sg(z - p_a): the value
  of z, the gradient of p_a (straight-through), so the classification loss
  reaches every entry weighted by alpha and the keys through alpha, never z.
- Training and testing build the prompt identically.
- Two terms per block, each a mean over the real samples' Lp * D numbers:
  |p_a - sg(z)|^2 (pulls the continuous prompt and the keys, weight 0.4)
  and |z - sg(p_a)|^2 (pulls the chosen entries only, weight 0.1); summed
  over the blocks, in training only. In VQ-VAE's words the first is the
  commitment term and the second the codebook term, although the code
  calls them the other way round; the weights are the code's.
- Routing arithmetic (alpha, p_a, distances, the terms) runs in float32 at
  full precision whatever the backbone's dtype.
"""

import jax
import jax.numpy as jnp

from smope_jax import losses
from smope_jax.methods import base

HIGHEST = jax.lax.Precision.HIGHEST


def quantize(query: jax.Array, keys: jax.Array, pool: jax.Array,
             temperature: float) -> dict:
  """One block's selection from a (B, D) query, (M, D) keys, (M, Lp, D) pool.

  Returns float32 `alpha` (B, M), `continuous` p_a (B, Lp, D), `chosen`
  (B,) int32 and `quantized` z (B, Lp, D).
  """
  query, keys, pool = (x.astype(jnp.float32) for x in (query, keys, pool))
  scores = jnp.einsum("bd,md->bm", query, base.normalize(keys),
                      precision=HIGHEST)
  alpha = jax.nn.softmax(scores / temperature, axis=-1)
  continuous = jnp.einsum("bm,mld->bld", alpha, pool, precision=HIGHEST)
  distances = jnp.sum((continuous[:, None] - pool[None])**2, axis=(-2, -1))
  chosen = jnp.argmin(distances, axis=-1).astype(jnp.int32)
  return {
      "alpha": alpha,
      "continuous": continuous,
      "chosen": chosen,
      "quantized": pool[chosen]
  }


class VQPrompts(base.PoolPrompts):
  """The pools, each input's entry nearest its softmax-weighted sum."""
  temperature: float

  def prefix(self, layer, block_query, *, query, context, mode):
    del block_query, context, mode
    if layer >= self.num_layers:
      return None
    selection = quantize(query, self.keys[layer], self.pool[layer],
                         self.temperature)
    continuous = selection["continuous"]
    # Written as the sum, not as z: the value can differ from z in the last
    # bit, and the gradient must be p_a's.
    prompt = continuous + jax.lax.stop_gradient(selection["quantized"] -
                                                continuous)
    return base.key_value_prefix(prompt, self.num_heads, aux=selection)

  def outputs(self, aux, *, query, context, mode):
    """Per prompted block (L, B, ...): alpha, p_a, the entry and z."""
    del query, context, mode
    return {
        f"vq_{name}": base.stack_aux(aux, name)
        for name in ("alpha", "continuous", "chosen", "quantized")
    }


def vq_terms(continuous: jax.Array, quantized: jax.Array,
             mask: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(commitment, codebook) summed over blocks from (L, B, Lp, D) tensors.

  Each block's term is the mean over the real samples (mask 1) of the mean
  squared difference over Lp * D: the reference's `F.mse_loss` over a
  batch without padding.
  """

  def per_sample(x):  # (L, B, Lp, D) -> (B,), summed over the blocks.
    return jnp.sum(jnp.mean(x**2, axis=(-2, -1)), axis=0)

  commitment = per_sample(continuous - jax.lax.stop_gradient(quantized))
  codebook = per_sample(quantized - jax.lax.stop_gradient(continuous))
  return (losses.masked_mean(commitment,
                             mask), losses.masked_mean(codebook, mask))


class VQPrompt(base.Method):
  """The shared pool and its keys; the two VQ terms in training."""

  def prompts(self):
    c, d = self.config, self.dims
    return VQPrompts(num_layers=self.num_layers, pool_size=c.pool_size,
                     length=c.prompt_length, hidden_size=d["hidden_size"],
                     num_heads=d["num_heads"],
                     temperature=float(c.vq_temperature))

  def loss_terms(self, out, trainable, state, task, mask, mode):
    del trainable, state, task
    if mode != "train":
      return {}
    commitment, codebook = vq_terms(out["vq_continuous"], out["vq_quantized"],
                                    mask)
    return {
        "vq_commit": (commitment, self.config.vq_commit_weight),
        "vq_codebook": (codebook, self.config.vq_codebook_weight)
    }
