"""L2P++ and Deep L2P++ as the registry knows them (JAX-free)."""

import functools

from smope_jax import errors
from smope_jax.methods import coda_protocol
from smope_jax.methods import registry

KEY_LOSSES = ("cross_sample", "per_sample")


def check(config, dims: dict) -> None:
  del dims
  coda_protocol.check_prompts(config)
  errors.require(
      1 <= config.top_k <= config.pool_size,
      f"config.top_k={config.top_k} must be between 1 and "
      f"config.pool_size={config.pool_size}.")
  errors.require(
      config.key_loss in KEY_LOSSES,
      f"config.key_loss={config.key_loss!r}; choose one of "
      f"{KEY_LOSSES}.")
  groups = config.key_loss_groups
  errors.require(groups >= 1, f"config.key_loss_groups={groups} must be "
                 "positive.")
  errors.require(
      config.batch_size % groups == 0,
      f"{registry.display_name(config.method)}'s key loss splits the batch "
      f"of {config.batch_size} into config.key_loss_groups={groups} equal "
      "groups; pick a batch that divides by it (config.batch_size, or the "
      "benchmark's --batch) or set --config.key_loss_groups=1.")


# Pool 30 of length 20; L2P++ prompts block 0, Deep L2P++ blocks 0-4.
L2P = registry.MethodSpec(
    name="l2p", display_name="L2P++", method_class="smope_jax.methods.l2p:L2P",
    check=check,
    apply_protocol=functools.partial(coda_protocol.apply, pool_size=30,
                                     prompt_length=20, prompted_layers=1))

DEEP_L2P = registry.MethodSpec(
    name="deep_l2p", display_name="Deep L2P++",
    method_class="smope_jax.methods.l2p:L2P", check=check,
    apply_protocol=functools.partial(coda_protocol.apply, pool_size=30,
                                     prompt_length=20, prompted_layers=5))
