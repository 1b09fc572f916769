"""SMoPE: one shared prefix prompt split into sparse prompt experts.

Each prompted block's heads hold E experts, a key and a value vector each;
every input activates its top-K experts per head, scored by the block's
mean query, so the whole forward costs one ViT forward (no query pass).
The routing rules live in `models.prompt_attention`, the losses in
`losses`, the expert bookkeeping in `experts`.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from smope_jax import precision
from smope_jax import experts, losses
from smope_jax.methods import base
from smope_jax.models import attention
from smope_jax.models import prompt_attention as routing


class SMoPEPrompts(base.PromptModule):
  """Expert keys and values (L, H, E, d), uniform on [0, 1).

  `score_products` says how the expert scores' product is computed (see
  `prompt_attention.expert_scores`).
  """
  num_layers: int
  num_heads: int
  num_experts: int
  head_dim: int
  top_k: int
  epsilon: float
  inference_penalty: float
  score_products: str = ""

  needs_query = False

  def setup(self):
    shape = (self.num_layers, self.num_heads, self.num_experts, self.head_dim)
    self.keys = self.param("keys", nn.initializers.uniform(1.0), shape,
                           jnp.float32)
    self.values = self.param("values", nn.initializers.uniform(1.0), shape,
                             jnp.float32)

  def prefix(self, layer, block_query, *, query, context, mode):
    del query
    if layer >= self.num_layers:
      return None
    eta = None
    if mode in ("train", "eval"):
      if context is None:
        raise ValueError(f"mode {mode!r} needs the expert counts and marks")
      eta = routing.selection_penalty(context, mode, self.epsilon,
                                      self.inference_penalty,
                                      context.get("exclude_unused",
                                                  True))[layer]
    logits, values, scores, selected = routing.route(block_query,
                                                     self.keys[layer],
                                                     self.values[layer], eta,
                                                     self.top_k, mode,
                                                     self.score_products)
    return attention.Prefix(values=values, bias=logits,
                            aux=dict(scores=scores, selected=selected))

  def outputs(self, aux, *, query, context, mode):
    """Clean scores (L, B, H, E) and chosen experts (L, B, H, K)."""
    del query, context, mode
    return dict(scores=base.stack_aux(aux, "scores"),
                selected=base.stack_aux(aux, "selected"))


class SMoPE(base.Method):
  """The trainer's hooks: counts and marks, snapshot, router and prototype."""

  bookkeeping = True

  def __init__(self, config, num_tasks, dims):
    super().__init__(config, num_tasks, dims)
    self.dense_warmup = bool(config.dense_warmup)

  def prompts(self):
    c, d = self.config, self.dims
    return SMoPEPrompts(
        num_layers=c.num_prompted_layers, num_heads=d["num_heads"],
        num_experts=c.num_experts, head_dim=d["hidden_size"] // d["num_heads"],
        top_k=c.top_k, epsilon=c.epsilon, inference_penalty=c.inference_penalty,
        score_products=precision.model_precision(c)["score_products"])

  def init_state(self, trainable):
    dims = trainable["prompts"]["keys"].shape[:3]
    state = experts.init_expert_state(*dims)
    state["snapshot"] = experts.snapshot_prompts(trainable["prompts"])
    return state

  def start_task(self, trainable, state, task, key):
    """From task 1 on: snapshot the experts, then mark the frequent ones."""
    del key
    later = task > 0
    marked = experts.mark_frequent(state)["frequent"]
    snapshot = experts.snapshot_prompts(trainable["prompts"])
    keep = lambda new, old: jnp.where(later, new, old)  # noqa: E731
    return trainable, {
        **state, "frequent": keep(marked, state["frequent"]),
        "snapshot": jax.tree_util.tree_map(keep, snapshot, state["snapshot"])
    }

  def init_context(self):
    shape = (self.config.num_prompted_layers, self.dims["num_heads"],
             self.config.num_experts)
    return {**experts.init_expert_state(*shape), "exclude_unused": True}

  def context(self, state, task, *, evaluating=False, mask=None):
    """Never-used experts are excluded, except in an evaluation that keeps
    the published numbers' routing (`config.exclude_unused_at_eval`)."""
    del task, mask
    return {
        "counts": state["counts"],
        "frequent": state["frequent"],
        "exclude_unused": (not evaluating or self.config.exclude_unused_at_eval)
    }

  def loss_terms(self, out, trainable, state, task, mask, mode):
    """Router loss in top-K mode; prototype loss against the snapshot.

    On task 0 no expert is marked, so the prototype term is exactly 0.
    """
    del task
    c, terms = self.config, {}
    if mode != "train":
      return terms
    if c.router_weight > 0:
      terms["router"] = (losses.router_loss(out["scores"], out["selected"],
                                            c.epsilon, mask), c.router_weight)
    if c.prototype_weight > 0:
      terms["prototype"] = (losses.prototype_loss(trainable["prompts"]["keys"],
                                                  state["snapshot"]["keys"],
                                                  state["frequent"],
                                                  c.top_k), c.prototype_weight)
    return terms

  def bookkeep(self, state, out, mask):
    """Adds the batch's clean top-K to the activation counts."""
    counted = experts.update_counts(state, out["scores"], self.config.top_k,
                                    mask)
    return {**state, "counts": counted["counts"]}

  def report(self, state):
    return {
        "expert_counts": np.asarray(state["counts"]).tolist(),
        "expert_frequent": np.asarray(state["frequent"]).tolist(),
        "top_k": self.config.top_k
    }
