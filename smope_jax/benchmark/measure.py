"""Measuring one compiled function: FLOPs, time, memory, and the matmul probe.

FLOPs come from XLA's cost analysis of the compiled executable, so they are
what the device is asked to do after fusion and dead-code elimination, not
a hand count. Times exclude compilation and warm-up and are medians, since
the machine may be shared. Besides wall time, the process CPU time of each
call is kept: on a CPU that other jobs share it says how efficient the work
was even when the wall time says mostly how much of the machine we got.
"""

import dataclasses
import resource
import sys
import time
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp

from smope_jax import train_step
from smope_jax.preflight import roofline

MEMORY_DEVICE = "device memory_stats() peak_bytes_in_use"
MEMORY_RSS = "process peak RSS (resource.getrusage ru_maxrss)"


def compiled_flops(compiled) -> float:
  """Total 'flops' of a compiled executable (dict or list of dicts)."""
  analysis = compiled.cost_analysis()
  if isinstance(analysis, dict):
    analysis = [analysis]
  return float(sum(a.get("flops", 0.0) for a in analysis or []))


def compiled_traffic_bytes(compiled) -> float:
  """The bytes a call accesses, as the roofline bound counts them."""
  analysis = compiled.cost_analysis()
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0] if analysis else None
  stats = compiled.memory_analysis()
  return roofline.traffic_bytes((analysis or {}).get("bytes accessed"),
                                stats.argument_size_in_bytes if stats else 0,
                                stats.output_size_in_bytes if stats else 0)


def compiled_memory_bytes(compiled) -> Optional[int]:
  """Arguments + outputs + temporaries XLA allocates for one call."""
  stats = compiled.memory_analysis()
  if stats is None:
    return None
  return int(stats.argument_size_in_bytes + stats.output_size_in_bytes +
             stats.temp_size_in_bytes - stats.alias_size_in_bytes)


def memory_source() -> str:
  stats = jax.local_devices()[0].memory_stats()
  return MEMORY_DEVICE if stats and "peak_bytes_in_use" in stats else MEMORY_RSS


def peak_memory_bytes() -> int:
  """Peak so far: device allocator if it reports one, else the process RSS."""
  stats = jax.local_devices()[0].memory_stats()
  if stats and "peak_bytes_in_use" in stats:
    return int(stats["peak_bytes_in_use"])
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  return int(peak if sys.platform == "darwin" else peak * 1024)


class Stopwatch:
  """Wall and process CPU seconds of one block."""

  def __enter__(self):
    self._wall, self._cpu = time.perf_counter(), time.process_time()
    return self

  def __exit__(self, *exc):
    self.wall = time.perf_counter() - self._wall
    self.cpu = time.process_time() - self._cpu


class MatmulProbe:
  """A large float32 matmul, timed next to every measured call.

  Each row is compared with the probe samples taken just before and after
  its own calls, so on a machine whose load changes the two see the same
  share of the cores.
  """

  def __init__(self, size: int):
    self.size = size
    self.flops = 2.0 * size**3
    key_a, key_b = jax.random.split(jax.random.PRNGKey(0))
    self._a = jax.random.normal(key_a, (size, size), jnp.float32)
    self._b = jax.random.normal(key_b, (size, size), jnp.float32)
    self._fn = jax.jit(jnp.matmul).lower(self._a, self._b).compile()
    jax.block_until_ready(self._fn(self._a, self._b))
    self.samples: list[Stopwatch] = []

  def sample(self) -> Stopwatch:
    # Untimed first: right after a large step the first matmul runs up to
    # 2x slower (cold caches, fresh pages), which is not its throughput.
    jax.block_until_ready(self._fn(self._a, self._b))
    with Stopwatch() as watch:
      jax.block_until_ready(self._fn(self._a, self._b))
    self.samples.append(watch)
    return watch


@dataclasses.dataclass
class Measurement:
  flops: float
  seconds: list[float]
  cpu_seconds: list[float]
  probe_seconds: list[float]
  probe_cpu_seconds: list[float]
  compile_seconds: float
  compiled_memory_bytes: Optional[int]
  peak_memory_bytes: int
  traffic_bytes: float


def measure(fn: Callable[..., Any], args: tuple, *, donate: tuple = (),
            carry: Optional[Callable[[tuple, Any], tuple]] = None, repeats: int,
            warmup: int, probe: MatmulProbe) -> Measurement:
  """Compiles `fn(*args)`, then times `repeats` calls after `warmup` calls.

  Args:
    fn: the function to jit.
    args: its arguments.
    donate: positions of arguments whose buffers the call may reuse.
    carry: `carry(args, outputs) -> args` for the next call; needed when
      arguments are donated (a training loop feeds its state back).
    repeats, warmup: timed and untimed calls.
    probe: sampled before and after every timed call.
  """
  start = time.perf_counter()
  lowered = jax.jit(fn, donate_argnums=donate).lower(*args)
  try:
    compiled = lowered.compile()
  except jax.errors.JaxRuntimeError as e:
    # As the trainer does (see `train_step.CompileFallback`).
    if train_step.TRITON_GEMM_FAILURE not in str(e):
      raise
    compiled = lowered.compile(train_step.NO_TRITON_GEMM)
  compile_seconds = time.perf_counter() - start
  for _ in range(warmup):
    args = _call(compiled, args, carry)[0]
  calls, probes = [], [probe.sample()]
  for _ in range(repeats):
    args, watch = _call(compiled, args, carry)
    calls.append(watch)
    probes.append(probe.sample())
  return Measurement(compiled_flops(compiled), [w.wall for w in calls],
                     [w.cpu for w in calls], [w.wall for w in probes],
                     [w.cpu for w in probes], compile_seconds,
                     compiled_memory_bytes(compiled), peak_memory_bytes(),
                     compiled_traffic_bytes(compiled))


def _call(compiled, args, carry):
  """One timed call; returns the next call's arguments and the timing."""
  with Stopwatch() as watch:
    outputs = jax.block_until_ready(compiled(*args))
  return (args if carry is None else carry(args, outputs)), watch
