"""The preflight's tables, verdict line and JSON record.

Tables fit 80 columns: one of memory per device, one of cost per call
(FLOPs per image, the roofline bound, images/s per chip, collectives).
"""

from smope_jax.methods import registry
from smope_jax.preflight import chips
from smope_jax.preflight import steps as preflight_steps

NAME_WIDTH = 19


def gib(n: float) -> str:
  return f"{n / chips.GIB:.2f}"


def _bytes(n: int) -> str:
  for unit, size in (("GiB", chips.GIB), ("MiB", 1024**2), ("KiB", 1024)):
    if n >= size:
      return f"{n / size:.1f} {unit}"
  return f"{n} B"


def header(result, config_name: str) -> list[str]:
  target, config = result.target, result.config
  spec = target.spec
  method = registry.display_name(config.method)
  peak = spec.peak_flops(config.dtype, config.matmul_precision)
  lines = [
      f"preflight: {config_name} on {target.name}",
      f"  {method}, {config.dtype}, matmul precision "
      f"'{config.matmul_precision}'",
      f"  {target.devices} x {spec.name}: {_bytes(spec.memory_bytes)}, "
      f"{peak / 1e12:.1f} TFLOP/s at this precision, "
      f"{spec.bandwidth / 1e9:.0f} GB/s",
      f"  {target.hosts} host{'s' if target.hosts > 1 else ''}, topology "
      f"{target.topology}",
      f"  batch {config.batch_size} ({result.per_device('batch_size')} per "
      f"device), eval batch {config.eval_batch_size} "
      f"({result.per_device('eval_batch_size')} per device)"
  ]
  if target.platform == "gpu":
    lines.append(f"  capacity per device: {_bytes(result.capacity)} (the "
                 "share JAX may allocate)")
  return lines


def memory_table(result) -> list[str]:
  lines = [
      "", f"{'memory per device':<{NAME_WIDTH + 2}}  arguments "
      f"temporaries   outputs     total  of {_bytes(result.capacity)}"
  ]
  for step in result.steps:
    name = f"  {step.name:<{NAME_WIDTH}}"
    if step.error:
      verdict = ("does not fit"
                 if result.out_of_memory(step) else "does not compile")
      lines.append(f"{name}  {verdict} (compiler message below)")
      continue
    share = 100.0 * step.total / result.capacity
    lines.append(f"{name} {_bytes(step.arguments):>10} "
                 f"{_bytes(step.temporaries):>11} {_bytes(step.outputs):>9} "
                 f"{_bytes(step.total):>9} {share:4.0f} %")
  return lines


def cost_table(result) -> list[str]:
  lines = [
      "", f"{'cost per call, one device':<{NAME_WIDTH + 2}} GFLOP/img "
      "bound ms  img/s/chip  collectives"
  ]
  for step in result.steps:
    if step.error:
      continue
    whole = preflight_steps.whole_call(step.name)
    images = 0 if whole else result.per_device(step.batch_field)
    bound = result.bound(step)
    if step.flops is None:
      gflops = f"{'-':>9}"
    elif images:
      gflops = f"{step.flops / images / 1e9:9.2f}"
    else:
      gflops = f"{step.flops / 1e9:8.2f}*"
    ms = f"{bound.seconds * 1e3:8.3f}" if bound else f"{'-':>8}"
    rate = (f"{images / bound.seconds:10.0f}"
            if bound and images and bound.seconds > 0 else f"{'-':>10}")
    lines.append(f"  {step.name:<{NAME_WIDTH}} {gflops} {ms}  {rate}  "
                 f"{collective_text(step.collectives)}")
  lines.append("  (* whole call, not per image; bound = max(FLOPs at peak, "
               "bytes at bandwidth))")
  return lines


def collective_text(found: dict) -> str:
  if not found:
    return "none"
  return ", ".join(
      f"{op} x{count} {_bytes(size)}" for op, (count,
                                               size) in sorted(found.items()))


def errors(result) -> list[str]:
  return [f"  {s.name}: {s.error}" for s in result.steps if s.error]


def train_rate(result):
  """(images/s per chip, step name) of the slowest training step."""
  rates = []
  for step in result.steps:
    bound = result.bound(step)
    if step.name.startswith("train") and bound and bound.seconds > 0:
      rates.append((result.per_device("batch_size") / bound.seconds, step.name))
  return min(rates) if rates else None


def verdict(result) -> str:
  """The last line: fits, does not fit (and what does), or no compile."""
  name = result.target.name
  if result.failed:
    step = result.failed[0]
    return (f"preflight: {step.name} does not compile for {name}: "
            f"{step.error}")
  if not result.fits:
    parts = []
    for field, per_device in result.largest.items():
      if per_device:
        parts.append(f"largest per-device batch that fits: {per_device} "
                     f"(--config.{field}="
                     f"{per_device * result.target.devices})")
      else:
        parts.append(f"not even 1 image per device fits ({field})")
    worst = ", ".join(s.name for s in result.steps if result.out_of_memory(s))
    return (f"preflight: does not fit {name}: {worst} over "
            f"{gib(result.capacity)} GiB per device; " + "; ".join(parts))
  largest = max(result.steps, key=lambda s: s.total)
  line = (f"preflight: fits {name}: largest step {largest.name} needs "
          f"{gib(largest.total)} of {gib(result.capacity)} GiB per device")
  rate = train_rate(result)
  devices = result.target.devices
  if rate:
    line += f"; training at most {rate[0]:.0f} img/s per chip"
    if devices > 1:
      line += f" ({rate[0] * devices:.0f} for the {devices} chips)"
  return line


def record(result) -> dict:
  """Everything measured, for --json."""
  steps = []
  for step in result.steps:
    bound = result.bound(step)
    steps.append({
        "name": step.name,
        "batch_field": step.batch_field,
        "per_device_batch": result.per_device(step.batch_field),
        "error": step.error,
        "arguments": step.arguments,
        "temporaries": step.temporaries,
        "outputs": step.outputs,
        "aliased": step.aliased,
        "total": step.total,
        "flops": step.flops,
        "bytes_accessed": step.bytes_accessed,
        "collectives": {
            k: list(v) for k, v in step.collectives.items()
        },
        "bound_seconds": bound.seconds if bound else None,
        "limited_by": bound.limited_by if bound else None
    })
  target = result.target
  return {
      "target": target.name,
      "chip": target.chip,
      "devices": target.devices,
      "hosts": target.hosts,
      "topology": target.topology,
      "capacity": result.capacity,
      "dtype": result.config.dtype,
      "matmul_precision": result.config.matmul_precision,
      "batch_size": result.config.batch_size,
      "eval_batch_size": result.config.eval_batch_size,
      "fits": result.fits,
      "largest": result.largest,
      "notes": result.notes,
      "steps": steps,
      "verdict": verdict(result)
  }
