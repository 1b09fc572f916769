r"""Command line: `python -m smope_jax.preflight --config=CFG --target=T`.

Compiles every jitted step of the run for a TPU slice or an NVIDIA machine
on this computer, without the hardware, and prints per step the memory per
device, FLOPs per image, the collectives and the roofline bound; then one
verdict line. Exit status 0: it fits; 3: it does not fit or does not
compile (the verdict says why, and the largest batch that fits); 2: a user
error, in one line.

    python -m smope_jax.preflight --config=configs/imagenet_r.py:tasks=10 \
        --target=tpu:v5e-8
"""

import sys

from absl import flags
from ml_collections import config_flags

from smope_jax import precision
from smope_jax import cli, configuration, workdir
from smope_jax.errors import UserError
from smope_jax.preflight import chips, devices

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file, e.g. configs/imagenet_r.py:tasks=10; "
    "--config.batch_size, --config.dtype, ... change what is compiled.",
    lock_config=True)
_TARGET = flags.DEFINE_string("target", None,
                              f"What to compile for: {chips.EXAMPLES}.")
_MEMORY_FRACTION = flags.DEFINE_float(
    "memory_fraction", 0.9, "GPUs: the share of each GPU's memory JAX may "
    "allocate (XLA_PYTHON_CLIENT_MEM_FRACTION; the launch scripts' 0.9).")
_JSON = flags.DEFINE_string("json", "", "Also write the record here.")

EXIT_DOES_NOT_FIT = 3


def check_flags(config):
  """Flag and config errors, before any compiler starts."""
  configuration.validate(config)
  target = chips.parse_target(_TARGET.value)
  if not 0 < _MEMORY_FRACTION.value <= 1:
    raise UserError(f"--memory_fraction={_MEMORY_FRACTION.value} must be in "
                    "(0, 1].")
  if _JSON.value:
    workdir.check_output_file(_JSON.value, "--json")
  devices.require_compiler(target.platform)
  return target


def main(argv):
  config = _CONFIG.value
  try:
    cli.refuse_arguments(argv)
    target = check_flags(config)
    devices.prepare_environment()
    # JAX starts only now: flag errors come first, and in the environment
    # that keeps this computer's own backend the CPU.
    from smope_jax.preflight import check, report  # pylint: disable=g-import-not-at-top
    config = config.copy_and_resolve_references()
    config.pretrained = ""  # Shapes only: no weights are read.
    # "auto" precision fields become the target platform's, as its run's.
    config.update(precision.resolve_precision(config, target.platform))
    result = check.Preflight(config, target, _MEMORY_FRACTION.value).run()
    name = config_flags.get_config_filename(flags.FLAGS["config"])
    lines = report.header(result, name) + report.memory_table(result)
    lines += report.cost_table(result)
    if any(s.error for s in result.steps):
      lines += ["", "compiler messages:"] + report.errors(result)
    lines += [f"note: {n}" for n in result.notes]
    lines += ["", report.verdict(result)]
    print("\n".join(lines))
    if _JSON.value:
      workdir.write_json_file(_JSON.value, report.record(result), "--json")
    if not result.fits:
      sys.exit(EXIT_DOES_NOT_FIT)
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


def run():
  cli.run(main, ["config", "target"])


if __name__ == "__main__":
  run()
