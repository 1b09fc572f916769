"""A config's model, its prompt method, and their initial parameters."""

import jax
import jax.numpy as jnp
import numpy as np

from smope_jax import configuration, methods, train_step
from smope_jax.methods import base
from smope_jax.models.vit import VisionTransformer


def build_model(config, num_tasks: int) -> tuple[VisionTransformer,
                                                 base.Method]:
  """The configured ViT with `config.method`'s prompts (no parameters yet).

  `num_tasks` sizes what depends on it (DualPrompt's pool, CODA-Prompt's
  components per task).
  """
  dims = configuration.model_dims(config)
  method = methods.get(config, num_tasks, dims)
  model = VisionTransformer(
      num_classes=config.num_classes, dtype=jnp.dtype(config.dtype),
      fused_attention=config.fused_attention, prompts=method.prompts(),
      **dims)
  return model, method


def init_params(config, model: VisionTransformer,
                method: base.Method) -> dict:
  """Initial prompts and head; the backbone from `config.pretrained`.

  With `config.pretrained == ""` the backbone stays random (tests, demo,
  benchmark). Returns numpy arrays.
  """
  images = jnp.zeros((1, config.image_size, config.image_size, 3))
  params = jax.jit(lambda k: model.init(
      k, images, method.init_context(), mode="train"))(
          jax.random.PRNGKey(config.seed))["params"]
  params = jax.tree_util.tree_map(np.asarray, params)
  if config.pretrained:
    from smope_jax import pretrained  # pylint: disable=g-import-not-at-top
    trainable, frozen = train_step.split_params(params)
    frozen = pretrained.load_backbone(config.pretrained, frozen)
    params = train_step.merge_params(trainable, frozen)
  return params
