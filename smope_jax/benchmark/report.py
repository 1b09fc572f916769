"""Runs every row, relates it to the matmul probe, and formats the results."""

import datetime
import os
import platform
import statistics

import jax
from absl import logging

from smope_jax import precision
from smope_jax.benchmark import measure
from smope_jax.benchmark import rows as rows_lib
from smope_jax.methods import registry
from smope_jax.preflight import roofline

# Batch on CPU when neither --batch nor --config.batch_size is given: the
# configs' training batches (64-128) take minutes per ViT-B/16 step there.
CPU_BATCH = 16

PRETRAINED_NOTE = ("random backbone weights and random images; "
                   "config.pretrained is ignored (cost does not depend on "
                   "the weights)")


def cpu_name() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def machine() -> dict:
  device = jax.local_devices()[0]
  return {
      "platform": device.platform,
      "device_kind": device.device_kind,
      "device_count": jax.device_count(),
      "cpu": cpu_name(),
      "cpu_count": os.cpu_count(),
      "jax_version": jax.__version__,
      "xla_flags": os.environ.get("XLA_FLAGS", "")
  }


def resolve_batch(config, batch_flag: int, batch_overridden: bool,
                  platform_name: str) -> tuple[int, str]:
  """The benchmark batch and where it came from."""
  if batch_flag > 0:
    return batch_flag, "--batch"
  if batch_overridden:
    return int(config.batch_size), "--config.batch_size"
  if platform_name == "cpu" and config.batch_size > CPU_BATCH:
    return CPU_BATCH, (f"CPU default; the config's batch_size is "
                       f"{config.batch_size}")
  return int(config.batch_size), "config.batch_size"


def modelled(m: measure.Measurement, config) -> dict:
  """The preflight's roofline bound of a row on this device's chip, and the
  measured time against it (empty where the chip is not in the table)."""
  chip = roofline.chip_of(jax.local_devices()[0].device_kind)
  if chip is None:
    return {}
  fields = dict(dtype=config.dtype, matmul_precision=config.matmul_precision)
  bound = roofline.bound(chip, m.flops, m.traffic_bytes, **fields)
  seconds = statistics.median(m.seconds)
  return {
      "chip": chip.name,
      "modelled_seconds": bound.seconds,
      "modelled_limited_by": bound.limited_by,
      "measured_vs_modelled": seconds / bound.seconds,
      "mfu": roofline.utilization(m.flops, seconds, chip, **fields)
  }


def row_result(m: measure.Measurement, batch: int, probe_flops: float,
               probe_flop_per_cpu_second: float, description: str) -> dict:
  """One row and its fractions of the matmul probe.

  Wall time is compared with the probe samples taken around the row's own
  calls (the same share of a shared machine); CPU time, which hardly
  depends on that share, with the median of all probe samples.
  """
  seconds = statistics.median(m.seconds)
  cpu_seconds = statistics.median(m.cpu_seconds)
  flop_per_second = m.flops / seconds
  matmul = probe_flops / statistics.median(m.probe_seconds)
  return {
      "description":
          description,
      "gflops_per_image":
          m.flops / batch / 1e9,
      "gflops_per_step":
          m.flops / 1e9,
      "seconds_median":
          seconds,
      "seconds":
          m.seconds,
      "images_per_second":
          batch / seconds,
      "gflop_per_second":
          flop_per_second / 1e9,
      "matmul_gflop_per_second":
          matmul / 1e9,
      "fraction_of_matmul":
          flop_per_second / matmul,
      "cpu_seconds_median":
          cpu_seconds,
      "cpu_seconds":
          m.cpu_seconds,
      "fraction_of_matmul_cpu_time":
          m.flops / cpu_seconds / probe_flop_per_cpu_second,
      "compile_seconds":
          m.compile_seconds,
      "compiled_memory_bytes":
          m.compiled_memory_bytes,
      "peak_memory_bytes":
          m.peak_memory_bytes,
  }


def run(config, batch: int, *, repeats: int, warmup: int, matmul_size: int,
        batch_source: str = "argument", methods=None) -> dict:
  """Measures every row for `config` at `batch` (of `methods`, default every
  registered one); returns the JSON record."""
  # "auto" precision fields become this platform's, as in training.
  config = config.copy_and_resolve_references()
  config.update(precision.resolve_precision(config, jax.default_backend()))
  setup = rows_lib.Setup(config, batch, methods)
  probe = measure.MatmulProbe(matmul_size)
  measured, descriptions = {}, {}
  with jax.default_matmul_precision(
      precision.model_precision(config)["context"]):
    for name, row in setup.rows().items():
      descriptions[name] = row.description
      logging.info("measuring %s (batch %d) ...", name, batch)
      measured[name] = measure.measure(row.fn, row.args, donate=row.donate,
                                       carry=row.carry, repeats=repeats,
                                       warmup=warmup, probe=probe)
  seconds = [w.wall for w in probe.samples]
  cpu_seconds = [w.cpu for w in probe.samples]
  per_cpu_second = probe.flops / statistics.median(cpu_seconds)
  results = {
      name: {
          **row_result(m, batch, probe.flops, per_cpu_second, descriptions[name]),
          **modelled(m, config)
      } for name, m in measured.items()
  }
  results["matmul"] = {
      "description": f"float32 {matmul_size}x{matmul_size} matmul, timed "
                     "before and after every timed call of every row",
      "size": matmul_size,
      "gflops_per_step": probe.flops / 1e9,
      "seconds_median": statistics.median(seconds),
      "seconds": seconds,
      "gflop_per_second": probe.flops / statistics.median(seconds) / 1e9,
      "fraction_of_matmul": 1.0,
      "cpu_seconds_median": statistics.median(cpu_seconds),
      "cpu_seconds": cpu_seconds,
      "fraction_of_matmul_cpu_time": 1.0,
  }
  flops = {
      name: r["gflops_per_image"]
      for name, r in results.items()
      if "gflops_per_image" in r
  }
  model = setup.model
  ref = registry.REFERENCE
  smope = setup.methods[ref].config
  params = setup.parameter_counts()
  ratios = {
      "inference_flops_vs_plain":
          flops[f"{ref}_inference"] / flops["plain_vit"],
      "train_flops_vs_inference":
          flops[f"{ref}_train"] / flops[f"{ref}_inference"],
  }
  for name in setup.methods:
    if name == ref:
      continue
    ratios[f"{name}_inference_flops_vs_plain"] = (flops[f"{name}_inference"] /
                                                  flops["plain_vit"])
    ratios[f"inference_flops_vs_{name}"] = (flops[f"{ref}_inference"] /
                                            flops[f"{name}_inference"])
    ratios[f"train_flops_vs_{name}"] = (flops[f"{ref}_train"] /
                                        flops[f"{name}_train"])
  return {
      "date":
          datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
      "machine":
          machine(),
      "weights":
          PRETRAINED_NOTE,
      "model": {
          "hidden_size": model.hidden_size,
          "num_layers": model.num_layers,
          "num_heads": model.num_heads,
          "mlp_dim": model.mlp_dim,
          "patch_size": model.patch_size,
          "image_size": int(config.image_size),
          "num_classes": model.num_classes,
          "num_prompted_layers": smope.num_prompted_layers,
          "num_experts": smope.num_experts,
          "top_k": smope.top_k,
          "dtype": str(config.dtype),
          "matmul_precision": str(config.matmul_precision),
          "fused_attention": bool(config.fused_attention)
      },
      "batch":
          batch,
      "batch_source":
          batch_source,
      "repeats":
          repeats,
      "warmup":
          warmup,
      "params":
          params[ref],
      "params_by_method":
          params,
      "memory_source":
          measure.memory_source(),
      "rows":
          results,
      "ratios":
          ratios,
  }


def _mb(value) -> str:
  return "-" if value is None else f"{value / 2**20:.0f}"


def format_table(record: dict) -> str:
  """Markdown table of the rows, then the counts and ratios."""
  lines = [
      "| row | GFLOPs/image | images/s | GFLOP/s | matmul GFLOP/s | "
      "of matmul | of matmul, CPU time | XLA memory (MiB) | "
      "peak memory (MiB) |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"
  ]
  for name, r in record["rows"].items():
    if name == "matmul":
      lines.append(f"| matmul {r['size']}^3, all samples | - | - | "
                   f"{r['gflop_per_second']:.1f} | "
                   f"{r['gflop_per_second']:.1f} | 100% | 100% | - | - |")
      continue
    lines.append(
        f"| {name} | {r['gflops_per_image']:.4g} | "
        f"{r['images_per_second']:.2f} | {r['gflop_per_second']:.1f} | "
        f"{r['matmul_gflop_per_second']:.1f} | "
        f"{100 * r['fraction_of_matmul']:.0f}% | "
        f"{100 * r['fraction_of_matmul_cpu_time']:.0f}% | "
        f"{_mb(r['compiled_memory_bytes'])} | "
        f"{_mb(r['peak_memory_bytes'])} |")
  lines += modelled_table(record)
  ratios, m = record["ratios"], record["machine"]
  lines += [
      "", "| method | learnable parameters | prompts | head | "
      "inference GFLOPs vs plain ViT | SMoPE inference / this | "
      "SMoPE train step / this |", "|---|---:|---:|---:|---:|---:|---:|"
  ]
  for name, p in record["params_by_method"].items():
    if name == registry.REFERENCE:
      cost = (f"{ratios['inference_flops_vs_plain']:.4f}x", "1", "1")
    else:
      cost = (f"{ratios[f'{name}_inference_flops_vs_plain']:.4f}x",
              f"{ratios[f'inference_flops_vs_{name}']:.4f}",
              f"{ratios[f'train_flops_vs_{name}']:.4f}")
    lines.append(f"| {registry.display_name(name)} | {p['learnable']:,} | "
                 f"{p['prompts']:,} | {p['head']:,} | " + " | ".join(cost) +
                 " |")
  lines += [
      "",
      f"frozen backbone parameters: {record['params']['frozen']:,}; SMoPE "
      f"train step {ratios['train_flops_vs_inference']:.2f}x its inference",
      f"batch {record['batch']} ({record['batch_source']}), median of "
      f"{record['repeats']} timed calls "
      f"after {record['warmup']} warm-up; {m['platform']} "
      f"({m['cpu']}, {m['cpu_count']} cores), jax {m['jax_version']}, "
      f"{record['model']['dtype']}",
      f"peak memory: {record['memory_source']}; XLA memory: arguments + "
      "outputs + temporaries of the compiled call",
      f"weights: {record['weights']}",
  ]
  return "\n".join(lines)


def modelled_table(record: dict) -> list[str]:
  """Measured against the preflight's roofline bound, where it applies."""
  rows = {n: r for n, r in record["rows"].items() if "modelled_seconds" in r}
  if not rows:
    return [
        "", f"no modelled bound: {record['machine']['device_kind']} is "
        "not a chip of the preflight's table (smope_jax/preflight/"
        "chips.py)"
    ]
  chip = next(iter(rows.values()))["chip"]
  lines = [
      "", f"| row | measured ms | modelled ms ({chip}, "
      f"{record['model']['dtype']}, "
      f"'{record['model']['matmul_precision']}') | limited by | "
      "measured / modelled | MFU |", "|---|---:|---:|---|---:|---:|"
  ]
  for name, r in rows.items():
    lines.append(f"| {name} | {1e3 * r['seconds_median']:.3f} | "
                 f"{1e3 * r['modelled_seconds']:.3f} | "
                 f"{r['modelled_limited_by']} | "
                 f"{r['measured_vs_modelled']:.2f}x | "
                 f"{100 * r['mfu']:.1f}% |")
  return lines
