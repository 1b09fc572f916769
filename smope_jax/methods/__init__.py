"""Prompt methods by name: SMoPE and the baselines it is compared with.

Adding a method means one module with its prompt module and `Method`
subclass (see `base`) and one line here.
"""

from smope_jax.errors import ConfigError
from smope_jax.methods import base
from smope_jax.methods.codaprompt import CodaPrompt
from smope_jax.methods.dualprompt import DualPrompt
from smope_jax.methods.l2p import DeepL2P
from smope_jax.methods.l2p import L2P
from smope_jax.methods.smope import SMoPE

METHODS = {m.name: m for m in (SMoPE, L2P, DeepL2P, DualPrompt, CodaPrompt)}


def get(config, num_tasks: int, dims: dict) -> base.Method:
  """The `config.method` of a run with `num_tasks` tasks and ViT `dims`."""
  if config.method not in METHODS:
    raise ConfigError(f"config.method={config.method!r}; choose one of "
                      f"{tuple(METHODS)}.")
  return METHODS[config.method](config, num_tasks, dims)
