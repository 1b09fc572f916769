"""DualPrompt: shared G-prompts and one E-prompt per task.

As the reference code runs it: G-prompts (Lg tokens: Lg/2 keys, Lg/2
values, the same for every input) in the first two prompted blocks, and in
the next ones (blocks 2-4) a pool of E-prompts (M, Le, D) with keys
(M, D), M = the number of tasks, all uniform on [0, 1).

- Training task t uses E-prompt t for every sample (the task id), and the
  key loss sum_b (1 - cos[b, t]) per E-block pulls key t towards the
  queries. Other entries get no gradient, so with Adam and no weight decay
  they do not move: earlier tasks' prompts are frozen in effect, while the
  G-prompts keep training.
- At test time each E-block picks, per input, the entry whose key is most
  similar to the query (top-1 over ALL M keys, including those of tasks not
  learned yet, which still hold their initial values: the reference does
  not mask them).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from smope_jax.methods import base

G_LAYERS = 2  # The first prompted blocks carry G-prompts, the rest E-prompts.


class DualPromptPrompts(base.PromptModule):
  """G-prompts (G, Lg, D); E-prompts (E, M, Le, D) and their keys (E, M, D)."""
  num_layers: int
  pool_size: int
  length: int
  g_length: int
  hidden_size: int
  num_heads: int

  def setup(self):
    uniform = nn.initializers.uniform(1.0)
    g_layers = min(G_LAYERS, self.num_layers)
    e_layers = self.num_layers - g_layers
    self.g_prompts = self.param("g_prompts", uniform,
                                (g_layers, self.g_length, self.hidden_size))
    self.e_prompts = self.param(
        "e_prompts", uniform,
        (e_layers, self.pool_size, self.length, self.hidden_size))
    self.e_keys = self.param("e_keys", uniform,
                             (e_layers, self.pool_size, self.hidden_size))

  def prefix(self, layer, block_query, *, query, context, mode):
    del block_query
    batch = query.shape[0]
    g_layers = self.g_prompts.shape[0]
    if layer < g_layers:
      shared = jnp.broadcast_to(self.g_prompts[layer],
                                (batch,) + self.g_prompts.shape[1:])
      return base.key_value_prefix(shared, self.num_heads)
    e = layer - g_layers
    if e >= self.e_prompts.shape[0]:
      return None
    similarity = base.cosine_to_keys(query, self.e_keys[e])  # (B, M)
    if mode == "train":
      chosen = jnp.full((batch,), context["task"], jnp.int32)
    else:
      chosen = jnp.argmax(jax.lax.stop_gradient(similarity), axis=-1)
    return base.key_value_prefix(
        self.e_prompts[e][chosen], self.num_heads, aux={
            "similarity": similarity,
            "chosen": chosen
        })

  def outputs(self, aux, *, query, context, mode):
    """E-blocks' key similarities (E, B, M) and chosen entries (E, B)."""
    del query, context, mode
    if not aux:  # Only the E-blocks report; a model may have none.
      return {}
    return {
        "key_similarity": base.stack_aux(aux, "similarity"),
        "key_chosen": base.stack_aux(aux, "chosen")
    }


class DualPrompt(base.Method):
  """The task id selects the trained E-prompt; its key loss pulls key t."""

  def prompts(self):
    c, d = self.config, self.dims
    return DualPromptPrompts(num_layers=self.num_layers,
                             pool_size=c.pool_size or self.num_tasks,
                             length=c.prompt_length, g_length=c.g_prompt_length,
                             hidden_size=d["hidden_size"],
                             num_heads=d["num_heads"])

  def loss_terms(self, out, trainable, state, task, mask, mode):
    del trainable, state
    if mode != "train" or "key_similarity" not in out:
      return {}
    to_task = out["key_similarity"][:, :, task]  # (E, B)
    return {"key": (jnp.sum((1.0 - to_task) * mask[None]), 1.0)}
