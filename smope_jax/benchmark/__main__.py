r"""Command line: `python -m smope_jax.benchmark --config=CONFIG [--out=F]`.

Prints a table of every method's train step and inference (SMoPE, L2P++,
Deep L2P++, DualPrompt, CODA-Prompt) next to the plain ViT, with their
learnable parameters and FLOP ratios, and writes the full record as JSON.
"""

import json
import sys

from absl import app
from absl import flags
from ml_collections import config_flags

from smope_jax import cli
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


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
  # Imported here so that --help and flag errors come before JAX starts.
  import jax  # pylint: disable=g-import-not-at-top
  from smope_jax import configuration  # pylint: disable=g-import-not-at-top
  from smope_jax.benchmark import report  # pylint: disable=g-import-not-at-top
  config = _CONFIG.value
  try:
    configuration.validate(config)
    if config.method != "smope":
      raise UserError("the benchmark measures every method from SMoPE's "
                      "config: pass the config without method=...")
    if _REPEATS.value < 1 or _WARMUP.value < 0 or _MATMUL_SIZE.value < 1:
      raise UserError("--repeats and --matmul_size must be >= 1 and "
                      "--warmup >= 0.")
    unknown = set(_METHODS.value) - set(configuration.METHODS)
    if unknown:
      raise UserError(f"--methods: unknown {sorted(unknown)}; choose from "
                      f"{','.join(configuration.METHODS)}.")
    overridden = "batch_size" in config_flags.get_override_values(
        flags.FLAGS["config"])
    batch, source = report.resolve_batch(
        config, _BATCH.value, overridden, jax.default_backend())
    record = report.run(config, batch, repeats=_REPEATS.value,
                        warmup=_WARMUP.value, matmul_size=_MATMUL_SIZE.value,
                        batch_source=source, methods=_METHODS.value)
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  record["config"] = config_flags.get_config_filename(flags.FLAGS["config"])
  print(report.format_table(record))
  if _OUT.value:
    with open(_OUT.value, "w") as f:
      json.dump(record, f, indent=2)
    print(f"wrote {_OUT.value}")


if __name__ == "__main__":
  cli.run(main, ["config"])
