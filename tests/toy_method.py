r"""A prompt method defined outside the package: this module and one
`registry.register` call are all it takes.

It is also a config file, so that the program registers the method when
it reads the config:

    python -m smope_jax.main --config=tests/toy_method.py:method=toy ...
    python -m smope_jax.benchmark --config=tests/toy_method.py --methods=toy

One shared prompt per prompted block, the same for every image (no query
pass), trained with the classifier.
"""

import flax.linen as nn
import jax.numpy as jnp

from smope_jax import configuration
from smope_jax.methods import base
from smope_jax.methods import registry
from tests import helpers


class ToyPrompts(base.PromptModule):
  """One prompt (L, Lp, D) per prompted block, keys then values."""
  needs_query = False
  num_layers: int
  length: int
  hidden_size: int
  num_heads: int

  @nn.compact
  def prefix(self, layer, block_query, *, query, context, mode):
    del query, context, mode
    prompts = self.param("prompts", nn.initializers.uniform(1.0),
                         (self.num_layers, self.length, self.hidden_size))
    if layer >= self.num_layers:
      return None
    batch = block_query.shape[0]
    return base.key_value_prefix(
        jnp.broadcast_to(prompts[layer], (batch, *prompts.shape[1:])),
        self.num_heads)


class ToyMethod(base.Method):

  def prompts(self):
    return ToyPrompts(num_layers=self.num_layers,
                      length=self.config.prompt_length,
                      hidden_size=self.dims["hidden_size"],
                      num_heads=self.dims["num_heads"])


def apply_protocol(config, *, epochs, batch_size):
  del epochs, batch_size
  config.update(prompt_length=4, dense_warmup=False)


SPEC = registry.register(
    registry.MethodSpec(name="toy", display_name="Toy prompt",
                        method_class=ToyMethod, apply_protocol=apply_protocol,
                        query_pass=False))


def get_config(arg=None):
  args = configuration.parse_arg(arg, "tests/toy_method.py", method="smope")
  # The tests' tiny run in two tasks, prompts in the first block only.
  return helpers.tiny_config(f"method={args.method}", num_tasks=2,
                             num_prompted_layers=1)
