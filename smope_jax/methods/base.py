"""What every prompt method provides, and helpers the baselines share.

A method is two things. Its prompt module (Flax, named `prompts` in the
parameter tree) gives each prompted block its prefix; the model calls
`prefix(layer, block_query, query=..., context=..., mode=...)` for every
block and `outputs(aux, ...)` once, and the module says with `needs_query`
(or, per call, `uses_query`) whether the model must first run the frozen
backbone without prompts to get the query (the final-LN CLS token, without
gradient). Its `Method` object (plain Python, static under jit) says what
the trainer does around the model: the method's state, what happens when a
task starts, the loss terms, the phases it needs, and, for a method with
steps of its own, those steps for the benchmark and the preflight.
"""

import dataclasses
from typing import Any, Callable, ClassVar, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from smope_jax.models import attention

MODES = ("plain", "dense", "train", "eval")


def normalize(x: jax.Array, axis: int = -1, eps: float = 1e-12) -> jax.Array:
  """x / max(|x|, eps), PyTorch's `F.normalize`."""
  norm = jnp.sqrt(jnp.sum(x * x, axis=axis, keepdims=True))
  return x / jnp.maximum(norm, eps)


def cosine_to_keys(query: jax.Array, keys: jax.Array) -> jax.Array:
  """(B, M) cosine similarity of each query to each key."""
  return normalize(query) @ normalize(keys).T


def key_value_prefix(prompts: jax.Array, num_heads: int,
                     aux: Any = None) -> attention.Prefix:
  """A prefix from (B, ..., L, D) prompt tokens: first half keys, rest values.

  The reference's prompt "length" counts both halves: a length-20 prompt
  gives 10 key and 10 value tokens. Selected prompts (B, k, L, D) are laid
  end to end, k * L / 2 keys and as many values.
  """
  half = prompts.shape[-2] // 2
  batch, width = prompts.shape[0], prompts.shape[-1]
  keys = prompts[..., :half, :].reshape(batch, -1, width)
  values = prompts[..., half:, :].reshape(batch, -1, width)
  return attention.Prefix(values=attention.head_major(values, num_heads),
                          keys=attention.head_major(keys, num_heads), aux=aux)


def stack_aux(aux: dict, name: str) -> jax.Array:
  """One aux entry stacked over the prompted layers, in layer order."""
  return jnp.stack([aux[layer][name] for layer in sorted(aux)])


class PromptModule(nn.Module):
  """Base of the methods' prompt modules."""

  needs_query: ClassVar[bool] = True

  def uses_query(self, context, mode: str) -> bool:
    """Whether this call needs the query pass (by default `needs_query`)."""
    del context, mode
    return self.needs_query

  def prefix(self, layer: int, block_query: jax.Array, *, query, context,
             mode: str):
    """The prefix of block `layer`, or None when the block is not prompted.

    Args:
      layer: the block's index.
      block_query: the block's projected queries (B, N, H, d).
      query: (B, D) final-LN CLS of the prompt-free pass, or None when
        `uses_query` is False.
      context: the method's per-step inputs (see `Method.context`).
      mode: one of MODES.
    """
    raise NotImplementedError

  def outputs(self, aux: dict, *, query, context, mode: str) -> dict:
    """Extra model outputs from the blocks' aux values ({layer: aux})."""
    del aux, query, context, mode
    return {}


class PoolPrompts(PromptModule):
  """Per prompted block a pool of prompts (L, M, Lp, D) and their keys
  (L, M, D), uniform on [0, 1) as the reference draws them (L2P, VQ)."""
  num_layers: int
  pool_size: int
  length: int
  hidden_size: int
  num_heads: int

  def setup(self):
    uniform = nn.initializers.uniform(1.0)
    self.pool = self.param(
        "pool", uniform,
        (self.num_layers, self.pool_size, self.length, self.hidden_size))
    self.keys = self.param("keys", uniform,
                           (self.num_layers, self.pool_size, self.hidden_size))


@dataclasses.dataclass(frozen=True)
class TimedStep:
  """One of a method's own steps, for the benchmark.

  `kind` "train": `fn` takes `train_step.train_step`'s arguments (trainable,
  opt_state, frozen, batch, inputs, *, model, method, tx) with a rate per
  name of `groups`; "forward": `fn(params, images, *, model, method)`.
  """
  description: str
  kind: str
  fn: Callable
  groups: tuple = ()


class Method:
  """The trainer's view of a prompt method. Subclasses override the hooks."""

  # Task 0 starts with a dense warm-up (mode 'dense') for half the epochs.
  dense_warmup: ClassVar[bool] = False
  # A pass over each task's training data after training (see `bookkeep`).
  bookkeeping: ClassVar[bool] = False

  def __init__(self, config, num_tasks: int, dims: dict):
    self.config = config
    self.num_tasks = num_tasks
    self.dims = dims
    # The baselines' fixed layouts (e.g. blocks 0-4) end with a smaller ViT.
    self.num_layers = min(config.num_prompted_layers, dims["num_layers"])

  def prompts(self) -> PromptModule:
    raise NotImplementedError

  def init_state(self, trainable: dict) -> dict:
    """The method's state besides the parameters (checkpointed)."""
    del trainable
    return {}

  def start_task(self, trainable: dict, state: dict, task, key):
    """What happens when task `task` starts; jitted, `task` traced."""
    del task, key
    return trainable, state

  def init_context(self):
    """A context for building the parameters (task 0, nothing learned)."""
    return {"task": jnp.int32(0)}

  def context(self, state: dict, task, *, evaluating: bool = False, mask=None):
    """The prompt module's per-step inputs, built inside the jitted step.

    `evaluating` marks the test-set evaluation, whose rules a method may
    set apart from its other inference passes; `mask` (B,) marks the
    batch's real samples (None where the caller has no batch).
    """
    del state, evaluating, mask
    return {"task": task}

  def phases(self, task: int, classifier_alignment: bool) -> list[str]:
    """The phases of task `task`, in order (names of `train_step.PHASES`).

    Every task starts with "start" and ends with "eval"; a method with
    phases of its own handles them in `phase_handlers`.
    """
    phases = ["start"]
    if task == 0 and self.dense_warmup:
      phases.append("warmup")
    phases.append("train")
    if self.bookkeeping:
      phases.append("bookkeeping")
    if classifier_alignment:
      phases += ["stats", "align"]
    return phases + ["eval"]

  def phase_handlers(self, run) -> dict:
    """{phase: handler(state, position) -> (state, position)} for the
    phases this method runs its own way; the trainer's `Run` handles the
    rest."""
    del run
    return {}

  def optimizer(self):
    """The update direction of the training phases (an optax transform
    whose rate is applied per step), or None for the config's Adam(W)."""
    return None

  def timed_steps(self) -> dict[str, TimedStep]:
    """The benchmark's rows of a method with steps of its own, by name
    ("train" replaces the generic train step); empty for the others."""
    return {}

  def preflight_calls(self, run_steps) -> Optional[dict]:
    """{step name: (jitted step, abstract arguments)} in run order for the
    preflight, built on its `RunSteps`, for a method whose phases run steps
    of their own; None: the trainer's generic steps."""
    del run_steps
    return None

  def loss_terms(self, out: dict, trainable: dict, state: dict, task,
                 mask: jax.Array, mode: str) -> dict:
    """{name: (value, weight)} added to the classification loss."""
    del out, trainable, state, task, mask, mode
    return {}

  def bookkeep(self, state: dict, out: dict, mask: jax.Array) -> dict:
    """Updates the state from an inference-mode batch (if `bookkeeping`)."""
    del out, mask
    return state

  def report(self, state: dict) -> dict:
    """JSON-ready facts about the state for metrics.json."""
    del state
    return {}
