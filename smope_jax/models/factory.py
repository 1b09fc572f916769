"""The SMoPE model and its initial parameters, from a config."""

import jax
import jax.numpy as jnp
import numpy as np

from smope_jax import configuration, experts, train_step
from smope_jax.models.vit import SMoPEViT


def build_model(config) -> SMoPEViT:
  """The configured ViT with its prompt experts (no parameters yet)."""
  return SMoPEViT(
      num_classes=config.num_classes,
      num_prompted_layers=config.num_prompted_layers,
      num_experts=config.num_experts, top_k=config.top_k,
      epsilon=config.epsilon, inference_penalty=config.inference_penalty,
      dtype=jnp.dtype(config.dtype), fused_attention=config.fused_attention,
      **configuration.model_dims(config))


def init_params(config, model: SMoPEViT) -> dict:
  """Random prompts and head; the backbone from `config.pretrained`.

  With `config.pretrained == ""` the backbone stays random (tests, demo,
  benchmark). Returns numpy arrays.
  """
  images = jnp.zeros((1, config.image_size, config.image_size, 3))
  state = experts.init_expert_state(config.num_prompted_layers,
                                    model.num_heads, config.num_experts)
  params = jax.jit(lambda k: model.init(k, images, state, mode="train"))(
      jax.random.PRNGKey(config.seed))["params"]
  params = jax.tree_util.tree_map(np.asarray, params)
  if config.pretrained:
    from smope_jax import pretrained  # pylint: disable=g-import-not-at-top
    trainable, frozen = train_step.split_params(params)
    frozen = pretrained.load_backbone(config.pretrained, frozen)
    params = train_step.merge_params(trainable, frozen)
  return params

