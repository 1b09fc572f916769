"""CODA-Prompt as the registry knows it (JAX-free)."""

import functools

from smope_jax.methods import coda_protocol
from smope_jax.methods import registry


def check(config, dims: dict) -> None:
  del dims
  coda_protocol.check_prompts(config)


# 100 components of length 8 in blocks 0-4.
SPEC = registry.MethodSpec(
    name="codaprompt", display_name="CODA-Prompt",
    method_class="smope_jax.methods.codaprompt:CodaPrompt", check=check,
    apply_protocol=functools.partial(coda_protocol.apply, pool_size=100,
                                     prompt_length=8, prompted_layers=5))
