"""Every jitted step of a run, compiled for a target's devices.

The steps come from `train_step.make_steps`, the builder the trainer uses,
with the run's mesh and shardings laid over the target's devices; their
arguments are `jax.ShapeDtypeStruct`s of the run's real shapes (parameters
from `jax.eval_shape` of the model, the config's global batches), so what
compiles here is what the run executes.
"""

import dataclasses
import re
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from smope_jax import precision
from smope_jax import distributed
from smope_jax import train_step as steps_lib
from smope_jax import factory

# Which config field sizes each step's batch.
BATCH_FIELDS = {"eval": "eval_batch_size"}  # Every other step: batch_size.
# Steps that see no batch of images (by the name's first word): their cost
# is per call.
WHOLE_CALL = ("start", "merge", "alignment")
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all",
               "collective-permute")
# An instruction `%name = SHAPE op(...)`, SHAPE a tuple for combined ops.
_HLO_OP = re.compile(r"^\s*(?:ROOT\s+)?%[\w.\-]+\s*=\s*(.*?)\s(" +
                     "|".join(COLLECTIVES) + r")(?:-start)?\(")
_SHAPE = re.compile(r"\b(pred|[subf]\d+|bf16)\[([\d,]*)\]")
_ITEM_BYTES = {"pred": 1, "bf16": 2}


@dataclasses.dataclass
class Compiled:
  """What the compiler says of one step.

  Memory is per device, in bytes; `flops` and `bytes_accessed` are one
  device's share of one call (None where the compiler does not say).
  """
  name: str
  batch_field: str
  error: Optional[str] = None
  arguments: int = 0
  outputs: int = 0
  temporaries: int = 0
  aliased: int = 0
  flops: Optional[float] = None
  bytes_accessed: Optional[float] = None
  collectives: dict = dataclasses.field(default_factory=dict)

  @property
  def total(self) -> int:
    return self.arguments + self.outputs + self.temporaries - self.aliased


def abstract(tree, sharding):
  """ShapeDtypeStructs of a tree of shapes, placed by `sharding`."""
  return jax.tree_util.tree_map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)


def whole_call(name: str) -> bool:
  return name.split(" ")[0] in WHOLE_CALL


class RunSteps:
  """The steps of one run (config, method, mesh) with their arguments."""

  def __init__(self, config, mesh):
    self.config = config
    self.mesh = mesh
    self.model, self.method = factory.build_model(config, config.num_tasks)
    self.replicated = distributed.replicated(mesh)
    self.batch_sharding = distributed.batch_sharded(mesh)
    self.steps = steps_lib.make_steps(config, self.model, self.method,
                                      self.replicated)
    params = factory.param_shapes(config, self.model, self.method)
    trainable, frozen = steps_lib.split_params(params)
    self.trainable = self.abstract(trainable)
    self.frozen = self.abstract(frozen)
    self.opt_state = self.abstract(jax.eval_shape(self.steps.tx.init,
                                                  trainable))
    self.method_state = self.abstract(
        jax.eval_shape(self.method.init_state, trainable))
    self.hidden = self.model.hidden_size

  def abstract(self, tree):
    """ShapeDtypeStructs of `tree`'s shapes, replicated."""
    return abstract(tree, self.replicated)

  def scalar(self, dtype=jnp.int32, shape=()):
    return jax.ShapeDtypeStruct(shape, dtype, sharding=self.replicated)

  def batch(self, size: int) -> dict:
    s = self.config.image_size
    shard = lambda shape, dtype: jax.ShapeDtypeStruct(  # noqa: E731
        shape, dtype, sharding=self.batch_sharding)
    return {
        "image": shard((size, s, s, 3), jnp.float32),
        "label": shard((size,), jnp.int32),
        "mask": shard((size,), jnp.float32)
    }

  def phases(self) -> list[str]:
    """Every phase any task of the run goes through, in order."""
    first = steps_lib.task_phases(self.method, self.config.classifier_alignment,
                                  0)
    later = steps_lib.task_phases(self.method, self.config.classifier_alignment,
                                  1)
    return [p for p in steps_lib.PHASES if p in first or p in later]

  def calls(self) -> dict[str, tuple]:
    """Step name -> (jitted function, abstract arguments), in run order.

    The class statistics read the training batches through the feature
    step; the alignment replays `batch_size * align_ratio` features per
    iteration on every device. A method with steps of its own lists them
    (`Method.preflight_calls`).
    """
    own = self.method.preflight_calls(self)
    if own is not None:
      return own
    config, task = self.config, self.scalar()
    batch = self.batch(config.batch_size)
    state_args = (self.trainable, self.frozen, self.method_state)
    calls = {}
    for phase in self.phases():
      if phase == "start":
        calls["start"] = (self.steps.start, (self.trainable,
                                             self.method_state, task,
                                             self.scalar(jnp.uint32, (2,))))
      elif phase in steps_lib.TRAINING_MODES:
        mode = steps_lib.TRAINING_MODES[phase]
        inputs = steps_lib.TaskInputs(
            class_range=self.scalar(shape=(2,)), task=task,
            rates={g: self.scalar(jnp.float32) for g in self.trainable},
            method_state=self.method_state)
        calls[f"train ({mode})"] = (self.steps.train_for(mode),
                                    (self.trainable, self.opt_state,
                                     self.frozen, batch, inputs))
      elif phase == "bookkeeping":
        calls["expert counting"] = (self.steps.bookkeeping, (*state_args, batch,
                                                             task))
      elif phase == "stats":
        calls["class statistics"] = (self.steps.features, (*state_args, batch,
                                                           task))
      elif phase == "align":
        classes = (config.num_classes, self.hidden)
        calls["alignment"] = (self.steps.align,
                              (self.trainable["head"],
                               self.scalar(jnp.float32, classes),
                               self.scalar(jnp.float32, classes),
                               self.scalar(jnp.uint32, (2,)), task, task,
                               self.scalar(jnp.float32, (config.align_epochs *
                                                         config.num_classes,))))
      elif phase == "eval":
        calls["eval"] = (self.steps.eval, (*state_args,
                                           self.batch(config.eval_batch_size),
                                           task, task))
    return calls


def compile_step(name: str, fn, args, *, precision: str,
                 compiler_options: Optional[dict] = None) -> Compiled:
  """Lowers and compiles one step; a compiler error becomes `error`."""
  result = Compiled(name, BATCH_FIELDS.get(name, "batch_size"))
  try:
    with jax.default_matmul_precision(precision):
      compiled = fn.lower(*args).compile(compiler_options)
  except Exception as e:  # pylint: disable=broad-except
    result.error = one_line(e)
    return result
  memory = compiled.memory_analysis()
  if memory is not None:
    result.arguments = int(memory.argument_size_in_bytes)
    result.outputs = int(memory.output_size_in_bytes)
    result.temporaries = int(memory.temp_size_in_bytes)
    result.aliased = int(memory.alias_size_in_bytes)
  cost = _first(compiled.cost_analysis())
  if cost:
    result.flops = float(cost.get("flops", 0.0))
    result.bytes_accessed = float(cost.get("bytes accessed", 0.0)) or None
  result.collectives = collectives(compiled.as_text())
  return result


def _first(analysis) -> Optional[dict]:
  if isinstance(analysis, (list, tuple)):
    return analysis[0] if analysis else None
  return analysis


def one_line(error: Exception) -> str:
  """The compiler's message, in its most telling line."""
  lines = [l.strip() for l in str(error).splitlines() if l.strip()]
  if not lines:
    return type(error).__name__
  telling = [
      l for l in lines if "RESOURCE_EXHAUSTED" in l or
      "Ran out of memory" in l or "INTERNAL" in l
  ]
  return (telling or lines)[0][:400]


def collectives(hlo_text: str) -> dict[str, tuple[int, int]]:
  """Collective op -> (count, bytes moved per call) in optimized HLO."""
  found: dict[str, list[int]] = {}
  for line in hlo_text.splitlines():
    match = _HLO_OP.search(line)
    if not match:
      continue
    size = sum(
        _shape_bytes(dtype, dims)
        for dtype, dims in _SHAPE.findall(match.group(1)))
    entry = found.setdefault(match.group(2), [0, 0])
    entry[0] += 1
    entry[1] += size
  return {k: tuple(v) for k, v in found.items()}


def _shape_bytes(dtype: str, dims: str) -> int:
  item = _ITEM_BYTES.get(dtype) or max(1, int(dtype[1:]) // 8)
  return item * int(np.prod([int(d) for d in dims.split(",") if d] or [1]))


def host_flops(config, per_device: dict[str, int]) -> dict[str, float]:
  """FLOPs of one device's share of each step, from XLA's HLO cost analysis
  on this host: for compilers that report none without the device (GPU).

  The same steps are built for one CPU device with each step's per-device
  batch, and analysed before optimisation (the arithmetic does not depend
  on the platform).
  """
  local = config.copy_and_resolve_references()
  local.batch_size = per_device["batch_size"]
  local.eval_batch_size = per_device["eval_batch_size"]
  mesh = jax.sharding.Mesh(np.asarray(jax.devices("cpu")[:1]),
                           (distributed.DATA_AXIS,))
  run = RunSteps(local, mesh)
  flops = {}
  with jax.default_matmul_precision(
      precision.model_precision(config)["context"]):
    for name, (fn, args) in run.calls().items():
      cost = _first(fn.lower(*args).cost_analysis())
      flops[name] = float(cost.get("flops", 0.0)) if cost else None
  return flops
