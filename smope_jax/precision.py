"""How a config's dtype and matmul precision fields become a computation.

Needs no JAX, so that a launcher can ask what a config will run as on a
platform it does not run on; docs/precision.md has the measurements behind
the defaults.
"""

from smope_jax import errors

DTYPES = ("float32", "bfloat16", "auto")
MATMUL_PRECISIONS = ("highest", "high", "default", "bfloat16", "auto")
ROUTING_PRECISIONS = ("float32", "backbone", "auto")

# What an "auto" dtype, matmul_precision or routing_precision becomes on each
# platform; docs/precision.md gives the measurements behind the choice.
PRECISION_DEFAULTS = {
    "cpu": {
        "dtype": "float32",
        "matmul_precision": "highest",
        "routing_precision": "float32"
    },
    "gpu": {
        "dtype": "float32",
        "matmul_precision": "highest",
        "routing_precision": "float32"
    },
    "tpu": {
        "dtype": "float32",
        "matmul_precision": "highest",
        "routing_precision": "float32"
    },
}
_PLATFORM_NAMES = {
    "cpu": "cpu",
    "gpu": "gpu",
    "cuda": "gpu",
    "rocm": "gpu",
    "tpu": "tpu"
}


def resolve_precision(config, platform: str) -> dict:
  """The concrete precision fields of `config` on `platform`.

  Each of dtype, matmul_precision and routing_precision keeps its value
  unless it is "auto", which takes PRECISION_DEFAULTS[platform]. Needs no
  JAX, so that a launcher can ask for a platform it does not run on.

  Args:
    config: a config of `base_config()`'s fields.
    platform: "cpu", "gpu" or "tpu" (also JAX's "cuda" and "rocm").

  Raises:
    ConfigError: an unknown platform.
  """
  name = _PLATFORM_NAMES.get(str(platform).lower())
  errors.require(
      name is not None, f"platform {platform!r} is unknown; use one of "
      f"{tuple(PRECISION_DEFAULTS)}.")
  defaults = PRECISION_DEFAULTS[name]
  return {
      field: defaults[field] if config[field] == "auto" else config[field]
      for field in defaults
  }


def model_precision(config) -> dict:
  """How the model computes under the config's concrete precision fields.

  `bfloat16_products`: every matrix product of the model on bfloat16
  operands, summed in float32. `float32_routing`: the expert scores from a
  float32 mean query at full precision; taken only where the backbone is
  not full float32 already, so the float32 model computes exactly as
  without it. `score_products`: how the scores' own product is computed
  (`prompt_attention.SCORE_PRODUCTS`). `context`: the default precision
  of all other products (`jax.default_matmul_precision`); full float32
  under "bfloat16", whose rounding the model writes out.
  """
  bf16_products = config.matmul_precision == "bfloat16"
  float32_routing = config.routing_precision == "float32" and (
      config.dtype != "float32" or config.matmul_precision != "highest")
  score_products = ("float32"
                    if float32_routing else "bfloat16" if bf16_products else "")
  return {
      "bfloat16_products": bf16_products,
      "float32_routing": float32_routing,
      "score_products": score_products,
      "context": ("highest" if bf16_products else config.matmul_precision)
  }
