r"""Command line: `python -m smope_jax.benchmark --config=CONFIG [--out=F]`.

Prints a table of every registered method's train step and inference (and
a method's own steps) next to the plain ViT, with their learnable
parameters and FLOP ratios, and writes the full record as JSON.
"""

import sys

from absl import flags
from ml_collections import config_flags

from smope_jax import cli
from smope_jax import configuration
from smope_jax import workdir
from smope_jax.errors import UserError
from smope_jax.methods import registry

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file, e.g. configs/imagenet_r.py:tasks=10; "
    "--config.batch_size, --config.dtype and --config.fused_attention "
    "change what is measured.", lock_config=True)
_OUT = flags.DEFINE_string("out", "", "Write the JSON record here.")
_BATCH = flags.DEFINE_integer(
    "batch", 0, "Benchmark batch; 0 = --config.batch_size if given, else "
    "the config's batch (capped at 16 on CPU).")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed calls per row.")
_WARMUP = flags.DEFINE_integer("warmup", 1, "Untimed calls after compiling.")
_MATMUL_SIZE = flags.DEFINE_integer("matmul_size", 2048,
                                    "Side of the float32 reference matmul.")
_METHODS = flags.DEFINE_list(
    "methods", None, "Methods to measure (default: every registered one); "
    "the reference method is always measured (ratios refer to it).")

# The reference matmul's side: 16384 floats square is 1 GiB per operand.
MAX_MATMUL_SIZE = 16384


def check_flags(config) -> None:
  """Flag and config errors, before JAX starts.

  Raises:
    UserError: the first wrong flag, in one sentence.
  """
  configuration.validate(config)
  if config.method != registry.REFERENCE:
    raise UserError("the benchmark measures every method from "
                    f"{registry.display_name(registry.REFERENCE)}'s config: "
                    "pass the config without method=...")
  if not 0 <= _BATCH.value <= configuration.MAX_BATCH:
    raise UserError(f"--batch={_BATCH.value} must be between 1 and "
                    f"{configuration.MAX_BATCH}, or 0 for the config's batch.")
  if _REPEATS.value < 1:
    raise UserError(f"--repeats={_REPEATS.value} must be at least 1.")
  if _WARMUP.value < 0:
    raise UserError(f"--warmup={_WARMUP.value} must not be negative.")
  if not 1 <= _MATMUL_SIZE.value <= MAX_MATMUL_SIZE:
    raise UserError(f"--matmul_size={_MATMUL_SIZE.value} must be between 1 "
                    f"and {MAX_MATMUL_SIZE}.")
  unknown = [m for m in _METHODS.value or () if m not in registry.names()]
  if unknown:
    raise UserError(f"--methods: unknown {','.join(unknown)}; choose from "
                    f"{','.join(registry.names())}.")
  if _OUT.value:
    workdir.check_output_file(_OUT.value, "--out")


def main(argv):
  config = _CONFIG.value
  try:
    cli.refuse_arguments(argv)
    check_flags(config)
    # Imported only now, so that flag errors come before JAX starts.
    import jax  # pylint: disable=g-import-not-at-top
    from smope_jax.benchmark import report  # pylint: disable=g-import-not-at-top
    overridden = "batch_size" in config_flags.get_override_values(
        flags.FLAGS["config"])
    batch, source = report.resolve_batch(config, _BATCH.value, overridden,
                                         jax.default_backend())
    record = report.run(config, batch, repeats=_REPEATS.value,
                        warmup=_WARMUP.value, matmul_size=_MATMUL_SIZE.value,
                        batch_source=source, methods=_METHODS.value)
    record["config"] = config_flags.get_config_filename(flags.FLAGS["config"])
    print(report.format_table(record))
    if _OUT.value:
      workdir.write_json_file(_OUT.value, record, "--out")
      print(f"wrote {_OUT.value}")
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


def run():
  cli.run(main, ["config"])


if __name__ == "__main__":
  run()
