"""Prompt methods: SMoPE and the baselines it is compared with.

A method is two modules: its model code (a `base.PromptModule` and a
`base.Method` subclass, JAX) and its spec (JAX-free), a
`registry.MethodSpec`. The built-in specs are registered here, in the
tables' order; a method of your own needs only its modules and one
`registry.register` call, from a module its config file imports.
"""

from smope_jax.methods import codaprompt_spec
from smope_jax.methods import dualprompt_spec
from smope_jax.methods import hideprompt_spec
from smope_jax.methods import l2p_spec
from smope_jax.methods import registry
from smope_jax.methods import smope_spec
from smope_jax.methods import vqprompt_spec

for _spec in (smope_spec.SPEC, l2p_spec.L2P, l2p_spec.DEEP_L2P,
              dualprompt_spec.SPEC, codaprompt_spec.SPEC, vqprompt_spec.SPEC,
              hideprompt_spec.SPEC):
  registry.register(_spec)


def build(config, num_tasks: int, dims: dict):
  """The `base.Method` of `config.method` for `num_tasks` tasks and ViT
  `dims` (imports the method's model code)."""
  return registry.method_class(config.method)(config, num_tasks, dims)
