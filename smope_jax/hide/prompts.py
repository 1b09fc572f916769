"""HiDe-Prompt's prompt module: task prompts, their routing and TII.

As the authors' code runs it (`methods.hideprompt` is the trainer's view
of the method, `hide.losses` its losses). Pure functions and the prompt
module they serve:

- One prefix prompt per task in blocks 0-4: `e_prompt` (L, 2, T, Lp, H, d)
  with index 0/1 of the second axis the key/value halves, Lp tokens EACH,
  the head split the parameter's own (H, d) axes, uniform on [-1, 1).
- Routing (which slot a sample uses): training uses slot t of the current
  task, blended towards the mean of the earlier slots; the statistics pass
  slot t as it is; evaluation the slot of the task that the task-identity
  inference (TII) classifier predicts for the sample.
- The reference reshapes instead of transposing when it lays the selected
  prompts out per sample, so within a device batch a sample's key and
  value prefixes come from other samples' selections and either half; this
  port reproduces that by default (`pairing_sources`).
- At a task boundary slot t starts as a copy of slot t-1; after training it
  is merged towards the mean of the earlier slots.
- The TII classifier (an MLP with a residual LayerNorm and a head over all
  classes) runs on the prompt-free pass's final-LN CLS (the query).
"""

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
from smope_jax import losses
from smope_jax.hide import losses as hide_losses
from smope_jax.methods import base
from smope_jax.models import attention
from smope_jax.models import vit

HIGHEST = jax.lax.Precision.HIGHEST
ROUTINGS = ("train", "stats", "eval")
SLOT_AXIS = -4  # e_prompt (..., T, Lp, H, d): the task slots' axis.

# ---------------------------------------------------------------------------
# Slots: routing, momentum blend, copy and merge.


def _slot(e_prompt: jax.Array, task) -> jax.Array:
  """Slot `task` (traced or not) of (..., T, Lp, H, d): (..., Lp, H, d)."""
  return jax.lax.dynamic_index_in_dim(e_prompt, task,
                                      axis=e_prompt.ndim + SLOT_AXIS,
                                      keepdims=False)


def mean_of_earlier_slots(e_prompt: jax.Array, task) -> jax.Array:
  """Mean of slots 0..task-1 (zeros for task 0), without gradient.

  A masked mean, so `task` may be traced.
  """
  slots = e_prompt.shape[SLOT_AXIS]
  earlier = (jnp.arange(slots) < task).astype(e_prompt.dtype)
  earlier = earlier.reshape((slots, 1, 1, 1))
  total = jnp.sum(e_prompt * earlier, axis=SLOT_AXIS)
  mean = total / jnp.maximum(task, 1).astype(e_prompt.dtype)
  return jax.lax.stop_gradient(mean)


def momentum_blend(e_prompt: jax.Array, task, momentum: float) -> jax.Array:
  """Slot `task` as training uses it: (1 - m) E_t + m sg(mean_{j<t} E_j).

  Task 0 has no earlier slot and uses E_0 as it is. The earlier slots enter
  without gradient, so the gradient reaches slot t only, scaled by 1 - m.
  """
  current = _slot(e_prompt, task)
  blended = ((1.0 - momentum) * current +
             momentum * mean_of_earlier_slots(e_prompt, task))
  return jnp.where(task > 0, blended, current)


def copy_previous_slot(e_prompt: jax.Array, task) -> jax.Array:
  """At the start of task t > 0 slot t becomes a copy of slot t - 1.

  Both halves, every block; the other slots and task 0 are left as they
  are.
  """
  previous = _slot(e_prompt, jnp.maximum(task - 1, 0))
  new = jnp.where(task > 0, previous, _slot(e_prompt, task))
  return jax.lax.dynamic_update_index_in_dim(e_prompt, new, task,
                                             axis=e_prompt.ndim + SLOT_AXIS)


def merge_momentum(e_prompt: jax.Array, task, momentum: float) -> jax.Array:
  """After training task t > 0, slot t keeps the blend that training used.

  E_t <- (1 - m) E_t + m mean_{j<t} E_j, so that the statistics pass and
  evaluation (which do not blend) see the prompt training saw. Task 0 is
  left as it is.
  """
  merged = jax.lax.stop_gradient(momentum_blend(e_prompt, task, momentum))
  return jax.lax.dynamic_update_index_in_dim(e_prompt, merged, task,
                                             axis=e_prompt.ndim + SLOT_AXIS)


def route(e_layer: jax.Array, routing: str, task, momentum: float, batch: int,
          predicted_task: Optional[jax.Array] = None):
  """Each sample's own (key, value) prompt pair before the pairing quirk,
  as rows of a table (sample b's pair is table[rows[b]]): the table holds
  every slot at evaluation and the one prompt of all samples otherwise, so
  that the pairing moves (B,) indices across the batch, not prompts.

  Args:
    e_layer: one block's prompts (2, T, Lp, H, d).
    routing: `train` (slot t with the momentum blend), `stats` (slot t as
      it is) or `eval` (each sample's predicted task's slot, no blend).
    task: the current task t (traced or not).
    momentum: the blend's m.
    batch: B.
    predicted_task: (B,) int task per sample, for `eval`.

  Returns:
    The (S, 2, Lp, H, d) table, each sample's (B,) int32 row in it and its
    (B,) int32 slot.
  """
  if routing == "eval":
    slots = predicted_task.astype(jnp.int32)
    return jnp.swapaxes(e_layer, 0, 1), slots, slots
  if routing == "train":
    chosen = momentum_blend(e_layer, task, momentum)
  elif routing == "stats":
    chosen = _slot(e_layer, task)
  else:
    raise ValueError(f"routing must be one of {ROUTINGS}, got {routing!r}")
  return (chosen[None], jnp.zeros(
      (batch,), jnp.int32), jnp.full((batch,), task, jnp.int32))


# ---------------------------------------------------------------------------
# The key/value pairing and its quirk.


def window_positions(mask: jax.Array, window: int):
  """Per position: its window's start, its index in the window and the
  window's real-sample count. Windows are consecutive runs of `window`
  positions (the last may be shorter); real samples lead each window."""
  batch = mask.shape[0]
  position = jnp.arange(batch)
  windows = -(-batch // window)
  padded = jnp.zeros((windows * window,), jnp.int32).at[:batch].set(
      (mask > 0).astype(jnp.int32))
  counts = padded.reshape(windows, window).sum(-1)
  start = (position // window) * window
  return start, position - start, counts[position // window]


def pairing_sources(mask: jax.Array, window: int = hide_losses.DEVICE_BATCH,
                    intended: bool = False):
  """Where each position's key and value prefixes come from.

  The reference selects a (2, n) grid of prompts (half d of sample j) for a
  device batch of n samples and reshapes it to (n, 2) instead of swapping
  the axes. Read row-major, position b then takes flat entries 2b (key)
  and 2b + 1 (value) of the grid: key = half (2b) // n of sample (2b) % n,
  value = half (2b + 1) // n of sample (2b + 1) % n. With one slot for
  all samples (training, statistics) the first half of the batch uses the
  key half as key and value, the second half the value half; at
  evaluation a sample's prefixes are other samples' prompts. n is the real
  count of the window (the reference's last batch of an epoch is short);
  padding positions, and every position under `intended`, take their own
  key half as key and value half as value.

  Args:
    mask: (B,) 1 for real samples.
    window: the device batch of the reference.
    intended: each sample's own halves (what the method means).

  Returns:
    ((key_half, key_sample), (value_half, value_sample)), each (B,) int32.
  """
  start, index, count = window_positions(mask, window)
  own = start + index
  if intended:
    zeros = jnp.zeros_like(own)
    return (zeros, own), (zeros + 1, own)
  real = index < count
  count = jnp.maximum(count, 1)
  flat_key, flat_value = 2 * index, 2 * index + 1
  key = (jnp.where(real, flat_key // count,
                   0), jnp.where(real, start + flat_key % count, own))
  value = (jnp.where(real, flat_value // count,
                     1), jnp.where(real, start + flat_value % count, own))
  return key, value


def pair_key_value(table: jax.Array, rows: jax.Array, sources):
  """Keys and values (B, Lp, H, d) from the (S, 2, Lp, H, d) table of
  `route`, each sample's (B,) row in it and the pairing `sources`."""
  (key_half, key_sample), (value_half, value_sample) = sources
  return (table[rows[key_sample], key_half], table[rows[value_sample],
                                                   value_half])


def head_major_prefix(keys: jax.Array, values: jax.Array,
                      aux=None) -> attention.Prefix:
  """(B, Lp, H, d) keys and values -> the kernel's (B, H, Lp, d) prefix."""
  return attention.Prefix(values=jnp.swapaxes(values, 1, 2),
                          keys=jnp.swapaxes(keys, 1, 2), aux=aux)


# ---------------------------------------------------------------------------
# Task-identity inference and prediction.


def torch_trunc_normal(stddev: float = 0.02):
  """Normal(0, stddev) cut at +-2 in absolute value, as timm draws it.

  For stddev 0.02 the cut lies at 100 standard deviations, so in effect
  untruncated (Flax's truncated normal cuts at 2 standard deviations).
  """

  def init(key, shape, dtype=jnp.float32):
    bound = 2.0 / stddev
    return stddev * jax.random.truncated_normal(key, -bound, bound, shape,
                                                dtype)

  return init


class TIIClassifier(nn.Module):
  """The stage-1 classifier on frozen features f: MLP, residual, LN, head.

  g = LayerNorm(W2 GELU(W1 f + b1) + b2 + f) with W1: D -> 2D, W2: 2D -> D
  and a plain LayerNorm (eps 1e-5, not the backbone's 1e-6); logits =
  W_head g + b_head over all classes. Weights trunc-normal(0.02), biases 0.
  """
  num_classes: int
  hidden_ratio: int = 2

  @nn.compact
  def __call__(self, features: jax.Array) -> jax.Array:
    width = features.shape[-1]
    dense = lambda n, name: nn.Dense(  # noqa: E731
        n, kernel_init=torch_trunc_normal(), bias_init=nn.initializers.zeros,
        precision=HIGHEST, name=name)
    hidden = vit.gelu_exact(
        dense(self.hidden_ratio * width, "Dense_0")(features))
    mapped = dense(width, "Dense_1")(hidden) + features
    normed = nn.LayerNorm(epsilon=1e-5, use_fast_variance=False,
                          name="LayerNorm")(mapped)
    return dense(self.num_classes, "head")(normed)


def predicted_task(tii_logits: jax.Array, class_to_task: jax.Array,
                   seen_classes) -> jax.Array:
  """Each sample's task: the task of its top TII class among [0, seen).

  The reference masks the TII logits to the classes of the tasks learned
  so far (the first `seen_classes` classes in its label order) and maps
  the argmax class to its task.
  """
  seen = losses.class_range_mask(tii_logits.shape[-1], 0, seen_classes)
  best = jnp.argmax(jnp.where(seen[None], tii_logits, -jnp.inf), axis=-1)
  return class_to_task[best].astype(jnp.int32)


def predict(logits: jax.Array, seen_classes,
            all_classes: bool = True) -> jax.Array:
  """The final prediction: argmax over ALL classes, as the reference does.

  The head rows of classes not learned yet keep their initial values and
  still compete; `all_classes=False` takes the argmax over the first
  `seen_classes` classes instead.
  """
  if all_classes:
    return jnp.argmax(logits, axis=-1)
  seen = losses.class_range_mask(logits.shape[-1], 0, seen_classes)
  return jnp.argmax(jnp.where(seen[None], logits, -jnp.inf), axis=-1)


# ---------------------------------------------------------------------------
# The prompt module.


class HiDePrompts(base.PromptModule):
  """Task prompts in blocks 0..L-1 and the TII classifier on the query.

  Context: `task` (t); optional `routing` (one of ROUTINGS; by default
  `train` in training mode and `eval` otherwise); `class_to_task` (C,) and
  `seen_classes` for evaluation routing; optional `mask` (B,) whose real
  counts set the pairing windows (all real without it).
  """
  num_layers: int
  num_tasks: int
  length: int
  hidden_size: int
  num_heads: int
  num_classes: int
  momentum: float
  window: int = hide_losses.DEVICE_BATCH
  intended_pairing: bool = False

  needs_query = True

  def setup(self):
    self.e_prompt = self.param(
        "e_prompt", vit.symmetric_uniform(1.0),
        (self.num_layers, 2, self.num_tasks, self.length, self.num_heads,
         self.hidden_size // self.num_heads))
    self.tii = TIIClassifier(self.num_classes)

  def classify(self, query: jax.Array) -> jax.Array:
    """TII logits (B, C) of the prompt-free features."""
    return self.tii(query)

  def _routing(self, context, mode):
    return context.get("routing", "train" if mode == "train" else "eval")

  def uses_query(self, context, mode: str) -> bool:
    """Only the test routing reads the query (the TII classifier's input);
    training and statistics take the given task's prompt. Initialising
    reads it too, so that the classifier gets its parameters."""
    return self.is_initializing() or self._routing(context, mode) == "eval"

  def prefix(self, layer, block_query, *, query, context, mode):
    if layer >= self.num_layers:
      return None
    batch = block_query.shape[0]
    routing = self._routing(context, mode)
    predicted = None
    if routing == "eval":
      predicted = predicted_task(self.classify(query), context["class_to_task"],
                                 context["seen_classes"])
    table, rows, slots = route(self.e_prompt[layer], routing, context["task"],
                               self.momentum, batch, predicted)
    mask = context.get("mask", jnp.ones((batch,), jnp.float32))
    sources = pairing_sources(mask, self.window, self.intended_pairing)
    keys, values = pair_key_value(table, rows, sources)
    return head_major_prefix(keys, values, aux={"slot": slots})

  def outputs(self, aux, *, query, context, mode):
    """Each sample's slot (B,) and, after a query pass, the TII logits
    (B, C) of the query."""
    del context, mode
    out = {"prompt_slot": aux[min(aux)]["slot"]}
    if query is not None:
      out["tii_logits"] = self.classify(query)
    return out
