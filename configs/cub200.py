r"""SMoPE on Split CUB-200 (10 tasks x 20 classes), the reference settings.

    python -m smope_jax.main --config=configs/cub200.py --workdir=/tmp/cub200

Backbone: supervised ImageNet-21k ViT-B/16 (preset `sup21k`, timm
`augreg_in21k`). Data: TFDS `caltech_birds2011`. Published (10 tasks, 5
seeds): SMoPE FAA 87.43 +- 0.39.
"""

from smope_jax import configuration


def get_config(arg=None):
  args = configuration.parse_arg(arg, "configs/cub200.py", method="smope")
  config = configuration.base_config()
  config.dataset = "caltech_birds2011"
  config.num_classes = 200
  config.test_resize = "resize_crop"
  config.pretrained = "sup21k"
  # The reference's per-epoch cosine, no freeze.
  config.schedule = "epoch_cosine"
  config.freeze_steps = 0
  config.prototype_weight = 5e-5
  return configuration.use_method(config, args.method, epochs=20)
