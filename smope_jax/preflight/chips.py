"""The chips a run can target: memory, peak FLOP/s, bandwidth, host layout.

Each figure is the vendor's published one (sources beside each entry), per
chip: a TPU v4 or v5p chip is one JAX device ("megacore", two TensorCores);
v5e and v6e chips have one TensorCore. Peaks are dense (no sparsity).

Target names follow the names people already use: Cloud TPU accelerator
types (`tpu:v4-32`, `tpu:v5litepod-8` or `tpu:v5e-8`, `tpu:v5p-8`,
`tpu:v6e-8`; the number counts TensorCores for v4 and v5p, chips for v5e and
v6e) and NVIDIA machines as model x GPUs (`gpu:h100x8`, `gpu:a100-40gbx1`;
8 GPUs per host unless `/HOSTS` says otherwise: `gpu:a100-80gbx12/3`).
"""

import dataclasses
import re

from smope_jax.errors import UserError

TERA = 1e12
GIB = 1024**3


@dataclasses.dataclass(frozen=True)
class Chip:
  """One accelerator chip (one JAX device).

  Attributes:
    name: how the tables name it.
    platform: 'tpu' or 'gpu'.
    memory_bytes: high-bandwidth memory of one chip.
    bandwidth: bytes/s of that memory.
    bf16_flops: peak dense bfloat16 FLOP/s (float32 accumulation).
    f32_flops: peak float32 FLOP/s without reduced-precision passes (GPU:
      the CUDA cores; TPU: six bfloat16 passes per product, bf16_flops / 6).
    tf32_flops: GPUs: peak TensorFloat-32 FLOP/s; TPUs: three bfloat16
      passes (bf16_flops / 3), what precision 'high' asks for.
  """
  name: str
  platform: str
  memory_bytes: int
  bandwidth: float
  bf16_flops: float
  f32_flops: float
  tf32_flops: float

  def peak_flops(self, dtype: str, matmul_precision: str) -> float:
    """Peak FLOP/s of the matrix products a run of this dtype asks for.

    bfloat16 models, and float32 with bfloat16 products, run at the
    bfloat16 peak. Float32 'highest' is true float32 on both platforms
    (six bfloat16 passes on a TPU, CUDA cores on a GPU). 'high' is three
    passes on a TPU and TF32 on a GPU; 'default' is one bfloat16 pass on a
    TPU and TF32 on a GPU.
    """
    if dtype == "bfloat16" or matmul_precision == "bfloat16":
      return self.bf16_flops
    if matmul_precision == "highest":
      return self.f32_flops
    if matmul_precision == "high" or self.platform == "gpu":
      return self.tf32_flops
    return self.bf16_flops


def _tpu(name, memory_gib, bandwidth_gbs, bf16_tflops):
  return Chip(name, "tpu", int(memory_gib * GIB), bandwidth_gbs * 1e9,
              bf16_tflops * TERA, bf16_tflops * TERA / 6,
              bf16_tflops * TERA / 3)


def _gpu(name, memory_gb, bandwidth_gbs, bf16_tflops, tf32_tflops, f32_tflops):
  return Chip(name, "gpu", int(memory_gb * 1e9), bandwidth_gbs * 1e9,
              bf16_tflops * TERA, f32_tflops * TERA, tf32_tflops * TERA)


CHIPS = {
    # cloud.google.com/tpu/docs/v4: 275 TFLOP/s bf16, 32 GiB HBM2,
    # 1200 GB/s per chip.
    "v4": _tpu("TPU v4", 32, 1200, 275),
    # cloud.google.com/tpu/docs/v5e: 197 TFLOP/s bf16, 16 GiB HBM2,
    # 819 GB/s per chip.
    "v5e": _tpu("TPU v5e", 16, 819, 197),
    # cloud.google.com/tpu/docs/v5p: 459 TFLOP/s bf16, 95 GiB HBM2e,
    # 2765 GB/s per chip.
    "v5p": _tpu("TPU v5p", 95, 2765, 459),
    # cloud.google.com/tpu/docs/v6e: 918 TFLOP/s bf16, 32 GiB HBM,
    # 1640 GB/s per chip.
    "v6e": _tpu("TPU v6e", 32, 1640, 918),
    # NVIDIA A100 Tensor Core GPU datasheet (SXM4 40GB): bf16 312, TF32
    # 156, FP32 19.5 TFLOP/s dense; 40 GB HBM2 at 1555 GB/s.
    "a100-40gb": _gpu("A100 40GB", 40, 1555, 312, 156, 19.5),
    # NVIDIA A100 Tensor Core GPU datasheet (SXM4 80GB): bf16 312, TF32
    # 156, FP32 19.5 TFLOP/s dense; 80 GB HBM2e at 2039 GB/s.
    "a100-80gb": _gpu("A100 80GB", 80, 2039, 312, 156, 19.5),
    # NVIDIA H100 Tensor Core GPU datasheet (SXM5): bf16 989, TF32 495,
    # FP32 67 TFLOP/s dense; 80 GB HBM3 at 3.35 TB/s.
    "h100": _gpu("H100 SXM", 80, 3350, 989, 495, 67),
}

# The device description XLA compiles GPU code for (files beside this one).
GPU_DESCRIPTIONS = {
    "h100": "h100_sxm.txtpb",
    "a100-40gb": "a100_sxm_40.txtpb",
    "a100-80gb": "a100_sxm_80.txtpb"
}
GPUS_PER_HOST = 8

# TPU slices: chips -> topology, per generation (the shapes Cloud TPU
# creates for these accelerator types).
_TORUS_3D = {
    4: "2x2x1",
    8: "2x2x2",
    16: "2x2x4",
    32: "2x4x4",
    64: "4x4x4",
    128: "4x4x8",
    256: "4x8x8",
    512: "8x8x8"
}
_TORUS_2D = {
    1: "1x1",
    4: "2x2",
    8: "2x4",
    16: "4x4",
    32: "4x8",
    64: "8x8",
    128: "8x16",
    256: "16x16"
}
# Generation -> (topology prefix, TensorCores per chip in the type's
# number, 3-D torus).
_TPU_KINDS = {
    "v4": ("v4", 2, True),
    "v5p": ("v5", 2, True),
    "v5e": ("v5e", 1, False),
    "v6e": ("v6e", 1, False)
}
_ALIASES = {"v5litepod": "v5e", "v6litepod": "v6e"}


@dataclasses.dataclass(frozen=True)
class Target:
  """A machine or slice to compile for.

  Attributes:
    name: as given, e.g. 'tpu:v5e-8'.
    chip: the chip's key in CHIPS.
    devices: JAX devices (chips) in all.
    hosts: processes the run has, one per host.
    topology: TPU topology name (e.g. 'v5e:2x4') or GPU 'slices x hosts x
      devices per host' (e.g. '1x1x8').
    chips_per_host: TPU chips per host as a 3-D bound (TPUs only).
  """
  name: str
  chip: str
  devices: int
  hosts: int
  topology: str
  chips_per_host: tuple = ()

  @property
  def spec(self) -> Chip:
    return CHIPS[self.chip]

  @property
  def platform(self) -> str:
    return self.spec.platform


EXAMPLES = ("tpu:v5e-8, tpu:v4-32, tpu:v5p-8, tpu:v6e-8, gpu:h100x8, "
            "gpu:a100-40gbx1")


def parse_target(text: str) -> Target:
  """'tpu:v5e-8' or 'gpu:h100x8' -> Target.

  Raises:
    UserError: an unknown chip or a size Cloud TPU does not create.
  """
  platform, _, rest = text.partition(":")
  if platform == "tpu":
    return _tpu_target(text, rest)
  if platform == "gpu":
    return _gpu_target(text, rest)
  raise UserError(f"--target={text}: expected tpu:TYPE or gpu:MODELxN, "
                  f"e.g. {EXAMPLES}.")


def _tpu_target(text: str, rest: str) -> Target:
  match = re.fullmatch(r"(v[0-9]+[a-z]*)-([0-9]+)", rest)
  kind = match and _ALIASES.get(match.group(1), match.group(1))
  if not match or kind not in _TPU_KINDS:
    raise UserError(f"--target={text}: unknown TPU type; known: "
                    f"{', '.join(sorted(_TPU_KINDS))} as Cloud TPU names "
                    "them, e.g. tpu:v5e-8, tpu:v4-32.")
  prefix, cores_per_chip, torus_3d = _TPU_KINDS[kind]
  number = int(match.group(2))
  chips = number // cores_per_chip
  shapes = _TORUS_3D if torus_3d else _TORUS_2D
  if number % cores_per_chip or chips not in shapes:
    sizes = ", ".join(f"{kind}-{c * cores_per_chip}" for c in shapes)
    raise UserError(f"--target={text}: no {kind} slice of that size; "
                    f"choose one of {sizes}.")
  # Single-host v5e/v6e machines hold up to 8 chips; larger slices, and
  # every v4/v5p host, hold 4.
  per_host = (2, 4,
              1) if chips == 8 and not torus_3d else ((1, 1,
                                                       1) if chips == 1 else
                                                      (2, 2, 1))
  hosts = max(1, chips // (per_host[0] * per_host[1]))
  return Target(text, kind, chips, hosts, f"{prefix}:{shapes[chips]}", per_host)


def _gpu_target(text: str, rest: str) -> Target:
  match = re.fullmatch(r"([a-z0-9-]+)x([0-9]+)(?:/([0-9]+))?", rest)
  if (not match or match.group(1) not in GPU_DESCRIPTIONS or
      int(match.group(2)) < 1):
    raise UserError(f"--target={text}: expected gpu:MODELxN or "
                    f"gpu:MODELxN/HOSTS with MODEL one of "
                    f"{', '.join(GPU_DESCRIPTIONS)}, e.g. gpu:h100x8.")
  count = int(match.group(2))
  hosts = int(match.group(3) or -(-count // GPUS_PER_HOST))
  if not 1 <= hosts <= count or count % hosts:
    raise UserError(f"--target={text}: {count} GPUs do not split evenly "
                    f"over {hosts} hosts.")
  return Target(text, match.group(1), count, hosts,
                f"1x{hosts}x{count // hosts}")
