"""DualPrompt as the registry knows it (JAX-free)."""

import functools

from smope_jax import errors
from smope_jax.methods import coda_protocol
from smope_jax.methods import registry


def check(config, dims: dict) -> None:
  prompted = min(config.num_prompted_layers, dims["num_layers"])
  errors.require(
      prompted >= 3, "DualPrompt needs config.num_prompted_layers >= 3 "
      "(G-prompts in the first two blocks, E-prompts after them).")
  errors.require(
      config.g_prompt_length >= 2 and config.g_prompt_length % 2 == 0,
      f"config.g_prompt_length={config.g_prompt_length} must be even: half "
      "keys, half values.")
  coda_protocol.check_prompts(config, min_pool=0)


# G-prompts in blocks 0-1, E-prompts (one per task: pool 0) in blocks 2-4.
SPEC = registry.MethodSpec(
    name="dualprompt", display_name="DualPrompt",
    method_class="smope_jax.methods.dualprompt:DualPrompt", check=check,
    apply_protocol=functools.partial(coda_protocol.apply, pool_size=0,
                                     prompt_length=20, prompted_layers=5))
