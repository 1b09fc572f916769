"""A config's model, its prompt method, its backbone weights, and their
initial parameters: what wires configuration, methods, models and weights."""

import os

import jax
import jax.numpy as jnp
import numpy as np

from smope_jax import precision
from smope_jax import configuration, methods, train_step
from smope_jax import demo_backbone
from smope_jax import weights
from smope_jax.methods import base
from smope_jax.models.vit import VisionTransformer


def build_model(config,
                num_tasks: int) -> tuple[VisionTransformer, base.Method]:
  """The configured ViT with `config.method`'s prompts (no parameters yet).

  Precision fields left "auto" take this platform's defaults.

  `num_tasks` sizes what depends on it (DualPrompt's pool, CODA-Prompt's
  components per task).
  """
  config = config.copy_and_resolve_references()
  config.update(precision.resolve_precision(config, jax.default_backend()))
  dims = configuration.model_dims(config)
  method = methods.build(config, num_tasks, dims)
  computes = precision.model_precision(config)
  model = VisionTransformer(num_classes=config.num_classes,
                            dtype=jnp.dtype(config.dtype),
                            fused_attention=config.fused_attention,
                            prompts=method.prompts(),
                            bfloat16_products=computes["bfloat16_products"],
                            float32_routing=computes["float32_routing"], **dims)
  return model, method


def demo_backbone_dir(workdir: str) -> str:
  """Where the demo's backbone is cached: the workdir, or locally for a
  bucket (the cache is a local directory)."""
  if "://" in workdir:
    return os.path.expanduser("~/.cache/smope_jax/demo_backbone")
  return f"{workdir}/demo_backbone"


def load_backbone(config, workdir: str):
  """The pretrained backbone of `config.pretrained`, or None for random.

  Read before anything else is built, so that missing or bad weights fail
  in seconds. "demo" is the demo's own small backbone, made once in the
  workdir (see `smope_jax.demo_backbone`).
  """
  if not config.pretrained:
    return None
  source = config.pretrained
  if source == "demo":
    source = demo_backbone.ensure_demo_backbone(config,
                                                demo_backbone_dir(workdir))
  weights.check_source(source)
  template = weights.backbone_template(configuration.model_dims(config),
                                       config.image_size)
  return weights.load_backbone(source, template)


def param_shapes(config, model: VisionTransformer, method: base.Method):
  """The parameter tree's shapes and dtypes, without computing it."""
  images = jax.ShapeDtypeStruct((1, config.image_size, config.image_size, 3),
                                jnp.float32)
  return jax.eval_shape(
      lambda x: model.init(jax.random.PRNGKey(0), x, method.init_context(), mode
                           ="train"), images)["params"]


def init_params(config, model: VisionTransformer, method: base.Method,
                backbone=None) -> dict:
  """Initial prompts and head, with `backbone` (from `load_backbone`).

  Without a backbone it stays random (tests, benchmark). Returns numpy
  arrays.
  """
  images = jnp.zeros((1, config.image_size, config.image_size, 3))
  params = jax.jit(
      lambda k: model.init(k, images, method.init_context(), mode="train"))(
          jax.random.PRNGKey(config.seed))["params"]
  params = jax.tree_util.tree_map(np.asarray, params)
  if backbone is not None:
    trainable, _ = train_step.split_params(params)
    params = train_step.merge_params(trainable, backbone)
  return params
