"""SMoPE as the registry knows it: the project's own method.

Its protocol is the benchmark config itself (the SMoPE repository's
settings), so it applies nothing.
"""

from smope_jax import errors
from smope_jax.methods import registry


def check(config, dims: dict) -> None:
  del dims
  errors.require(
      1 <= config.top_k <= config.num_experts,
      f"config.top_k={config.top_k} must be between 1 and "
      f"config.num_experts={config.num_experts}.")


SPEC = registry.MethodSpec(name="smope", display_name="SMoPE",
                           method_class="smope_jax.methods.smope:SMoPE",
                           check=check, fixed_layout=False, query_pass=False)
