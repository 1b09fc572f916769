r"""Command line: `python -m smope_jax.benchmark --config=CONFIG [--out=F]`.

Prints a table of every method's train step and inference (SMoPE, L2P++,
Deep L2P++, DualPrompt, CODA-Prompt) next to the plain ViT, with their
learnable parameters and FLOP ratios, and writes the full record as JSON.
"""

import sys

from absl import flags
from ml_collections import config_flags

from smope_jax import cli
from smope_jax import configuration
from smope_jax import workdir
from smope_jax.errors import UserError

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
_MATMUL_SIZE = flags.DEFINE_integer(
    "matmul_size", 2048, "Side of the float32 reference matmul.")
_METHODS = flags.DEFINE_list(
    "methods", ["smope", "l2p", "deep_l2p", "dualprompt", "codaprompt"],
    "Methods to measure; SMoPE is always measured (ratios refer to it).")


# The reference matmul's side: 16384 floats square is 1 GiB per operand.
MAX_MATMUL_SIZE = 16384


def check_flags(config) -> None:
  """Flag and config errors, before JAX starts.

  Raises:
    UserError: the first wrong flag, in one sentence.
  """
  configuration.validate(config)
  if config.method != "smope":
    raise UserError("the benchmark measures every method from SMoPE's "
                    "config: pass the config without method=...")
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
  unknown = [m for m in _METHODS.value if m not in configuration.METHODS]
  if unknown:
    raise UserError(f"--methods: unknown {','.join(unknown)}; choose from "
                    f"{','.join(configuration.METHODS)}.")
  if _OUT.value:
    workdir.check_output_file(_OUT.value, "--out")


def check_key_loss_groups(config, batch: int) -> None:
  """L2P's key loss splits each batch into `key_loss_groups` equal parts."""
  if ({"l2p", "deep_l2p"} & set(_METHODS.value) and
      batch % config.key_loss_groups):
    raise UserError(f"L2P's key loss splits the batch of {batch} into "
                    f"config.key_loss_groups={config.key_loss_groups} equal "
                    "groups; pick a batch that divides by it (--batch) or "
                    "set --config.key_loss_groups=1.")


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
    batch, source = report.resolve_batch(
        config, _BATCH.value, overridden, jax.default_backend())
    check_key_loss_groups(config, batch)
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
