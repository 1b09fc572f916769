"""CODA-Prompt: prompts as attention-weighted sums of learned components.

As the reference code runs it: per prompted block (0-4) M components
(M, Lp, D), keys (M, D) and attention vectors (M, D); each task owns
pt = int(M / T) of them, rows [t pt, (t + 1) pt) for task t.

- Weights: alpha[b, m] = < normalize(q[b] * A[m]), normalize(K[m]) >, a
  cosine in [-1, 1] (no softmax, no top-k); the prompt is
  sum_m alpha[b, m] P[m], its first Lp / 2 tokens keys and the rest values.
- Rows used: training task t uses rows [0, (t + 1) pt) with the rows of
  earlier tasks detached (no gradient); testing uses the same rows.
- Task boundaries (`gram_schmidt`): the components of the new task are
  re-drawn by classical Gram-Schmidt; learned rows are kept, later rows are
  zero. The same happens at initialisation for task 0.
- Loss: classification only with the released settings; with
  `ortho_weight` > 0, ortho_weight * (O(K) + O(A) + O(P)) per block with
  O(X) = mean((X X^T - I)^2) over the rows used.
"""

import jax
import jax.numpy as jnp

from smope_jax.methods import base

NEAR_ZERO = 1e-8


def gram_schmidt(rows: jax.Array, start, stop, key) -> jax.Array:
  """The reference's re-initialisation of rows [start, stop) of (M, ...).

  Rows before `start` are copied unchanged (learned components, not
  renormalised); rows from `stop` on become zero. For k = start..stop-1 a
  draw v ~ N(0, I) becomes u_k = v - sum_{j<k} (v . u_j / u_j . u_j) u_j over
  ALL earlier rows (the learned ones and the new ones made so far, not yet
  normalised); then the new rows are scaled to unit norm. Learned rows are
  not mutually orthogonal, so neither is the result exactly: this is the
  formula, not an orthonormal basis. An earlier row with u . u < 1e-8 (the
  reference would redraw forever) is left out of the projection.

  `start` and `stop` may be traced, so one compiled function serves every
  task.
  """
  shape = rows.shape
  flat = rows.reshape(shape[0], -1).astype(jnp.float32)
  index = jnp.arange(shape[0])
  out = jnp.where((index < start)[:, None], flat, 0.0)

  def draw(k, out):
    v = jax.random.normal(jax.random.fold_in(key, k), flat.shape[1:])
    norms = jnp.sum(out * out, axis=-1)
    usable = (index < k) & (norms >= NEAR_ZERO)
    coefficients = jnp.where(usable, (out @ v) / jnp.where(usable, norms, 1.0),
                             0.0)
    new = v - coefficients @ out
    return jnp.where(((index == k) & (k >= start) & (k < stop))[:, None],
                     new[None], out)

  out = jax.lax.fori_loop(0, shape[0], draw, out)
  fresh = ((index >= start) & (index < stop))[:, None]
  norms = jnp.sqrt(jnp.sum(out * out, axis=-1, keepdims=True))
  out = jnp.where(fresh, out / jnp.where(fresh, norms, 1.0), out)
  return out.reshape(shape).astype(rows.dtype)


class CodaPrompts(base.PromptModule):
  """Components (L, M, Lp, D), keys and attention vectors (L, M, D)."""
  num_layers: int
  pool_size: int
  length: int
  hidden_size: int
  num_heads: int
  per_task: int

  def setup(self):

    def task_zero(key, shape):
      keys = jax.random.split(key, shape[0])
      return jnp.stack([
          gram_schmidt(jnp.zeros(shape[1:]), 0, self.per_task, k) for k in keys
      ])

    l, m, d = self.num_layers, self.pool_size, self.hidden_size
    self.components = self.param("components", task_zero,
                                 (l, m, self.length, d))
    self.keys = self.param("keys", task_zero, (l, m, d))
    self.attention = self.param("attention", task_zero, (l, m, d))

  def rows_used(self, layer, task, mode):
    """Keys, attention vectors and components of the rows the task uses.

    Rows of later tasks are zero; in training the earlier tasks' rows are
    detached.
    """
    index = jnp.arange(self.pool_size)
    used = index < (task + 1) * self.per_task
    frozen = index < task * self.per_task
    tensors = []
    for x in (self.keys[layer], self.attention[layer], self.components[layer]):
      mask = used.reshape((-1,) + (1,) * (x.ndim - 1))
      if mode == "train":
        old = frozen.reshape(mask.shape)
        x = jnp.where(old, jax.lax.stop_gradient(x), x)
      tensors.append(jnp.where(mask, x, 0.0))
    return tensors

  def prefix(self, layer, block_query, *, query, context, mode):
    del block_query
    if layer >= self.num_layers:
      return None
    keys, attn, components = self.rows_used(layer, context["task"], mode)
    attended = base.normalize(query[:, None, :] * attn[None])  # (B, M, D)
    alpha = jnp.einsum("bmd,md->bm", attended, base.normalize(keys))
    prompt = jnp.einsum("bm,mld->bld", alpha, components)
    return base.key_value_prefix(prompt, self.num_heads, aux={"alpha": alpha})


def ortho_penalty(x: jax.Array, num_used) -> jax.Array:
  """mean((X X^T - I)^2) over the first `num_used` rows of X (M, ...)."""
  flat = x.reshape(x.shape[0], -1)
  gram = flat @ flat.T - jnp.eye(flat.shape[0])
  index = jnp.arange(flat.shape[0])
  inside = (index[:, None] < num_used) & (index[None, :] < num_used)
  return jnp.sum(jnp.where(inside, gram**2, 0.0)) / num_used**2


class CodaPrompt(base.Method):
  """Gram-Schmidt at task boundaries; the optional orthogonality penalty."""

  def __init__(self, config, num_tasks, dims):
    super().__init__(config, num_tasks, dims)
    self.per_task = int(config.pool_size / num_tasks)

  def prompts(self):
    c, d = self.config, self.dims
    return CodaPrompts(num_layers=self.num_layers, pool_size=c.pool_size,
                       length=c.prompt_length, hidden_size=d["hidden_size"],
                       num_heads=d["num_heads"], per_task=self.per_task)

  def start_task(self, trainable, state, task, key):
    """From task 1 on: new rows for the task's components (keys, A, P)."""
    start, stop = task * self.per_task, (task + 1) * self.per_task
    prompts = {}
    for i, name in enumerate(("keys", "attention", "components")):
      layers = trainable["prompts"][name]
      keys = jax.random.split(jax.random.fold_in(key, i), layers.shape[0])
      redrawn = jnp.stack(
          [gram_schmidt(x, start, stop, k) for x, k in zip(layers, keys)])
      prompts[name] = jnp.where(task > 0, redrawn, layers)
    return {**trainable, "prompts": prompts}, state

  def loss_terms(self, out, trainable, state, task, mask, mode):
    del out, state, mask
    weight = self.config.ortho_weight
    if mode != "train" or weight <= 0:
      return {}
    used = (task + 1) * self.per_task
    frozen = jnp.arange(self.config.pool_size) < task * self.per_task
    total = 0.0
    for name in ("keys", "attention", "components"):
      for x in trainable["prompts"][name]:
        old = frozen.reshape((-1,) + (1,) * (x.ndim - 1))
        total += ortho_penalty(jnp.where(old, jax.lax.stop_gradient(x), x),
                               used)
    return {"ortho": (total, weight)}
