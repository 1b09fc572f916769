"""The devices of a target, described by its compiler, without the hardware.

JAX compiles for a TPU slice or an NVIDIA machine it does not have
("deviceless" ahead-of-time compilation): libtpu, or the CUDA plugin and
ptxas, describe the target's devices, and executables built for them report
their memory and cost. Neither compiler is a dependency of the package: they
are the extras `preflight-tpu` and `preflight-gpu`.
"""

import importlib.util
import os
import pathlib

from smope_jax.errors import UserError
from smope_jax.preflight import chips

# Set before JAX starts: the workstation's own backend stays the CPU (no TPU
# runtime start-up, no CUDA driver).
ENVIRONMENT = {"JAX_PLATFORMS": "cpu"}
# Set before a compiler loads: libtpu asks no cloud metadata server and
# takes no machine-wide lock file (another process may compile at the same
# time), JAX accepts a CUDA plugin without a driver.
COMPILER_ENVIRONMENT = {
    "TPU_SKIP_MDS_QUERY": "1",
    "ALLOW_MULTIPLE_LIBTPU_LOAD": "1",
    "JAX_SKIP_CUDA_CONSTRAINTS_CHECK": "1"
}

EXTRAS = {"tpu": "preflight-tpu", "gpu": "preflight-gpu"}
# The modules each extra installs: the compiler, and for GPUs ptxas.
COMPILER_MODULES = {
    "tpu": ("libtpu",),
    "gpu": ("jax_cuda12_plugin", "jax_plugins.xla_cuda12", "nvidia.cuda_nvcc")
}


def prepare_environment() -> None:
  """Sets ENVIRONMENT where the user has not; call before importing JAX."""
  for name, value in {**ENVIRONMENT, **COMPILER_ENVIRONMENT}.items():
    os.environ.setdefault(name, value)


def _installed(module: str) -> bool:
  try:
    return importlib.util.find_spec(module) is not None
  except ModuleNotFoundError:  # A missing parent package.
    return False


def require_compiler(platform: str) -> None:
  """Raises UserError naming the extra to install when it is missing."""
  missing = [m for m in COMPILER_MODULES[platform] if not _installed(m)]
  if missing:
    raise UserError(
        f"compiling for {platform.upper()}s needs {', '.join(missing)}: "
        f"pip install \"smope-jax[{EXTRAS[platform]}]\" (from a checkout: "
        f"pip install \".[{EXTRAS[platform]}]\").")


def gpu_spec_text(chip: str) -> str:
  """The device description XLA compiles for (shipped with the package)."""
  path = (pathlib.Path(__file__).with_name("gpu_specs") /
          chips.GPU_DESCRIPTIONS[chip])
  return path.read_text()


def target_devices(target: chips.Target) -> list:
  """The compile-only devices of every host of the target, in JAX order.

  Raises:
    UserError: the compiler is not installed or refuses the target.
  """
  require_compiler(target.platform)
  for name, value in COMPILER_ENVIRONMENT.items():
    os.environ.setdefault(name, value)
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  try:
    if target.platform == "tpu":
      megacore = target.chip in ("v4", "v5p")
      topology = topologies.get_topology_desc(
          platform="tpu", topology_name=target.topology,
          chip_config_name="megacore" if megacore else "default",
          chips_per_host_bounds=target.chips_per_host)
    else:
      topology = topologies.get_topology_desc(
          platform="cuda", target_config=gpu_spec_text(target.chip),
          topology=target.topology)
  except Exception as e:  # pylint: disable=broad-except
    first = str(e).strip().splitlines()[0] if str(e).strip() else repr(e)
    raise UserError(f"the compiler could not describe {target.name}: "
                    f"{first}") from None
  devices = list(topology.devices)
  if len(devices) != target.devices:
    raise UserError(f"the compiler describes {len(devices)} devices for "
                    f"{target.name}, not {target.devices}.")
  return devices
