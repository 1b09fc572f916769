"""The preflight: compile a run for a target, judge whether it fits, and
find the largest per-device batch that does when it does not.

A TPU compiler refuses a program that does not fit the chip's memory
("RESOURCE_EXHAUSTED", "Ran out of memory"); a GPU compiler does not check,
so the run's per-device total is held against the chip's memory times the
fraction JAX may allocate (`XLA_PYTHON_CLIENT_MEM_FRACTION`, 0.9 in the
launch scripts).
"""

import dataclasses
import re
from typing import Optional

from absl import logging

from smope_jax import precision
from smope_jax import configuration, distributed, train_step
from smope_jax.errors import UserError
from smope_jax.preflight import chips, devices, roofline
from smope_jax.preflight import steps as preflight_steps

OUT_OF_MEMORY = ("RESOURCE_EXHAUSTED", "Ran out of memory", "out of memory")
# Without a GPU, XLA cannot size the scratch space of CUB's radix sort (the
# alignment shuffles by sorting); such a step is compiled with XLA's own
# sort, which needs no more memory.
NO_CUDA_LIBRARIES = "Error loading CUDA libraries"
NO_CUB_SORT = {"xla_gpu_enable_cub_radix_sort": False}
# How a TPU compiler names the memory it can use, in GiB, when it refuses.
USABLE_MEMORY = re.compile(r"exceeds available HBM \(([\d.]+)G\)")
# Probes the largest-batch search may spend on one batch field.
MAX_SEARCH_PROBES = 24


@dataclasses.dataclass
class Result:
  """A whole preflight: the target, every step, the verdict."""
  target: chips.Target
  config: object
  steps: list
  capacity: int
  largest: dict = dataclasses.field(default_factory=dict)
  notes: list = dataclasses.field(default_factory=list)

  def per_device(self, field: str) -> int:
    return int(self.config[field]) // self.target.devices

  def out_of_memory(self, step) -> bool:
    if step.error:
      return any(s in step.error for s in OUT_OF_MEMORY)
    return step.total > self.capacity

  @property
  def failed(self) -> list:
    """Steps that did not compile for another reason than memory."""
    return [s for s in self.steps if s.error and not self.out_of_memory(s)]

  @property
  def fits(self) -> bool:
    return not self.failed and not any(
        self.out_of_memory(s) for s in self.steps)

  def bound(self, step) -> Optional[roofline.Bound]:
    if step.error or step.flops is None:
      return None
    traffic = roofline.traffic_bytes(step.bytes_accessed, step.arguments,
                                     step.outputs)
    return roofline.bound(self.target.spec, step.flops, traffic,
                          dtype=self.config.dtype,
                          matmul_precision=self.config.matmul_precision)


class Preflight:
  """Compiles a config's steps for a target's devices."""

  def __init__(self, config, target: chips.Target, memory_fraction: float):
    self.config = config
    self.target = target
    self.mesh = distributed.make_mesh(devices.target_devices(target))
    capacity = target.spec.memory_bytes
    if target.platform == "gpu":
      capacity = int(capacity * memory_fraction)
    self.capacity = capacity
    self.search_capacity = capacity  # Lowered to what a compiler reports.
    # Steps that compiled only with extra XLA options, and those options.
    self.used_options: dict[str, dict] = {}

  def compile_all(self, config) -> list:
    """Every step of `config` (batch fields may differ from the run's)."""
    configuration.validate_devices(config, self.target.devices,
                                   self.target.hosts)
    run = preflight_steps.RunSteps(config, self.mesh)
    results = []
    for name, (fn, args) in run.calls().items():
      logging.info("compiling %s for %s", name, self.target.name)
      results.append(self._compile(name, fn, args, config))
    return results

  def _compile(self, name, fn, args, config):
    """One step, compiled again with the options a GPU compile may need."""
    options = dict(self.used_options.get(name, {}))
    context = precision.model_precision(config)["context"]
    while True:
      result = preflight_steps.compile_step(name, fn, args, precision=context,
                                            compiler_options=options or None)
      retry = {}
      if result.error and train_step.TRITON_GEMM_FAILURE in result.error:
        retry = train_step.NO_TRITON_GEMM
      elif result.error and NO_CUDA_LIBRARIES in result.error:
        retry = NO_CUB_SORT
      if not retry or retry.items() <= options.items():
        return result
      logging.warning("%s: %s; compiling again with %s", name, result.error,
                      retry)
      options.update(retry)
      self.used_options.setdefault(name, {}).update(retry)

  def run(self) -> Result:
    result = Result(self.target, self.config, self.compile_all(self.config),
                    self.capacity)
    for name, options in self.used_options.items():
      if "xla_gpu_enable_triton_gemm" in options:
        result.notes.append(
            f"{name}: XLA's Triton GEMM emitter found no tile sizes for a "
            "matrix product without autotuning; compiled with "
            "--xla_gpu_enable_triton_gemm=false (cuBLAS), as the trainer "
            "does when a GPU compile fails so")
      if "xla_gpu_enable_cub_radix_sort" in options:
        result.notes.append(
            f"{name}: compiled with XLA's own sort instead of CUB's, whose "
            "scratch size needs a GPU to compute")
    self._fill_flops(result)
    if not result.failed:
      for field in ("batch_size", "eval_batch_size"):
        if any(
            result.out_of_memory(s)
            for s in result.steps
            if s.batch_field == field):
          result.largest[field] = self.largest_batch(result, field)
    return result

  def _fill_flops(self, result: Result) -> None:
    """FLOPs from this host's cost analysis where the compiler gave none."""
    if all(s.flops is not None or s.error for s in result.steps):
      return
    per_device = {
        f: result.per_device(f) for f in ("batch_size", "eval_batch_size")
    }
    flops = preflight_steps.host_flops(self.config, per_device)
    for step in result.steps:
      if step.flops is None and not step.error:
        step.flops = flops.get(step.name)

  def probe(self, field: str, per_device: int, names: set) -> Optional[int]:
    """The largest per-device total of the named steps with `per_device`
    images of `field`, or None when one does not fit."""
    config = self.config.copy_and_resolve_references()
    config[field] = per_device * self.target.devices
    run = preflight_steps.RunSteps(config, self.mesh)
    totals = []
    for name, (fn, args) in run.calls().items():
      if name not in names:
        continue
      step = self._compile(name, fn, args, config)
      probe = Result(self.target, config, [step], self.capacity)
      if probe.out_of_memory(step):
        usable = USABLE_MEMORY.search(step.error or "")
        if usable:
          self.search_capacity = min(self.search_capacity,
                                     int(float(usable.group(1)) * chips.GIB))
        return None
      if step.error:
        raise UserError(f"{name} does not compile for {self.target.name} "
                        f"at {per_device} images per device: {step.error}")
      totals.append(step.total)
    return max(totals)

  def largest_batch(self, result: Result, field: str) -> int:
    """The largest per-device batch of `field` that fits, by compiling.

    Each probe compiles every step of that batch (which of them needs most
    memory differs between chips). Memory grows about linearly with the
    batch, so after fitting probes the search aims where that line meets
    the capacity (for TPUs, the usable memory the compiler reports once it
    refuses a probe); once a probe the line said would fit does not, it
    halves the bracket [fits, does not fit] instead, down to neighbours.
    """
    names = {s.name for s in result.steps if s.batch_field == field}
    fits, fails = 0, result.per_device(field)
    measured, missed = {}, False
    for _ in range(MAX_SEARCH_PROBES):
      if fails - fits <= 1:
        break
      guess = self._guess(fits, fails, measured, missed)
      logging.info("largest %s: trying %d per device", field, guess)
      total = self.probe(field, guess, names)
      if total is None:
        fails, missed = guess, bool(measured)
      else:
        fits, measured[guess] = guess, total
    return fits

  def _guess(self, fits: int, fails: int, measured: dict, missed: bool) -> int:
    """The next probe inside (fits, fails): 1 first, then along the line
    through the last two fitting probes until the line has missed once,
    then the bracket's middle."""
    if fits == 0:
      return 1
    middle = (fits + fails) // 2
    points = sorted(measured.items())
    if len(points) == 1:
      return min(max(fits * 16, fits + 1), middle)
    (b0, m0), (b1, m1) = points[-2], points[-1]
    slope = (m1 - m0) / (b1 - b0)
    if missed or slope <= 0:
      return middle
    aim = b1 + int((self.search_capacity - m1) / slope)
    return min(max(aim, fits + 1), fails - 1)
