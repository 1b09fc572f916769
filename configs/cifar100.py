r"""SMoPE on Split CIFAR-100 (10 tasks x 10 classes), the reference settings.

    python -m smope_jax.main --config=configs/cifar100.py --workdir=/tmp/cifar100

Backbone: supervised ImageNet-21k -> 1k ViT-B/16 (preset `sup1k`, timm
`augreg2_in21k_ft_in1k`). Data: TFDS `cifar100` (`--config.data_dir`).
Published (10 tasks, 5 seeds): SMoPE FAA 89.23 +- 0.12.
"""

from smope_jax import configuration


def get_config(arg=None):
  args = configuration.parse_arg(arg, "configs/cifar100.py", method="smope")
  config = configuration.base_config()  # Its defaults are CIFAR-100's.
  config.iters_per_epoch = 40  # The reference's iter_step; the loader takes 39.
  return configuration.use_method(config, args.method, epochs=20)
