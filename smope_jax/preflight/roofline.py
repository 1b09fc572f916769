"""The roofline bound of a step on a chip, and which chip a device is.

A step cannot take less time than its arithmetic at the chip's peak FLOP/s,
nor less than its memory traffic at the chip's bandwidth; the larger of the
two is the shortest step time the model allows. The traffic is XLA's own
estimate of the bytes the compiled step moves where the compiler gives one
(TPU: each fused operation's operands and results), else the bytes the step
must at least read and write once (its arguments and outputs), which makes
the bound a strict lower bound.
"""

import dataclasses
from typing import Optional

from smope_jax.preflight import chips


@dataclasses.dataclass(frozen=True)
class Bound:
  """Shortest possible seconds of one call on one chip, and why."""
  seconds: float
  compute_seconds: float
  memory_seconds: float

  @property
  def limited_by(self) -> str:
    return "compute" if self.compute_seconds >= self.memory_seconds else (
        "memory")


def traffic_bytes(bytes_accessed: Optional[float], arguments: int,
                  outputs: int) -> float:
  """XLA's estimate of the bytes a call accesses, else what it must at least
  read and write once."""
  return bytes_accessed or float(arguments + outputs)


def bound(chip: chips.Chip, flops: float, traffic: float, *, dtype: str,
          matmul_precision: str) -> Bound:
  """The roofline bound of one device's share of a step."""
  compute = flops / chip.peak_flops(dtype, matmul_precision)
  memory = traffic / chip.bandwidth
  return Bound(max(compute, memory), compute, memory)


def utilization(flops: float, seconds: float, chip: chips.Chip, *, dtype: str,
                matmul_precision: str) -> float:
  """Model FLOP utilisation: achieved FLOP/s over the chip's peak."""
  return flops / seconds / chip.peak_flops(dtype, matmul_precision)


# Device kinds as JAX reports them -> the chip table's key.
_DEVICE_KINDS = (("TPU v4", "v4"), ("TPU v5 lite", "v5e"), ("TPU v5e", "v5e"),
                 ("TPU v5p", "v5p"), ("TPU v5", "v5p"), ("TPU v6", "v6e"),
                 ("H100", "h100"), ("A100-SXM4-40GB", "a100-40gb"),
                 ("A100-PCIE-40GB", "a100-40gb"), ("A100", "a100-80gb"))


def chip_of(device_kind: str) -> Optional[chips.Chip]:
  """The table's chip for a JAX device kind, or None (CPUs, others)."""
  for prefix, key in _DEVICE_KINDS:
    if prefix in device_kind:
      return chips.CHIPS[key]
  return None
