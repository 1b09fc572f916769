r"""SMoPE on Split CIFAR-100 (10 tasks x 10 classes), the reference settings.

    python -m smope_jax.main --config=configs/cifar100.py --workdir=/tmp/cifar100

Backbone: supervised ImageNet-21k -> 1k ViT-B/16 (preset `sup1k`, timm
`augreg2_in21k_ft_in1k`). Data: TFDS `cifar100` (`--config.data_dir`).
Published (10 tasks, 5 seeds): SMoPE FAA 89.23 +- 0.12.
"""

from smope_jax.configuration import base_config


def get_config():
  config = base_config()
  config.dataset = "cifar100"     # TFDS name.
  config.num_classes = 100        # CIFAR-100 classes.
  config.num_tasks = 10           # 10 tasks x 10 classes.
  config.test_resize = "resize"   # Test images: plain resize to 224.
  config.pretrained = "sup1k"     # augreg2_in21k_ft_in1k ViT-B/16.
  config.batch_size = 128         # Reference batch.
  config.lr = 0.005               # Reference base rate.
  config.epochs = 20              # Reference epochs per task.
  config.schedule = "cosine"      # Per-iteration cosine ...
  config.freeze_steps = 80        # ... after 80 iterations at 1e-6.
  config.steps_per_epoch = 40     # Reference iter_step (= ceil(5000 / 128)).
  config.router_weight = 1e-5     # alpha_r.
  config.prototype_weight = 1e-5  # alpha_p.
  config.epsilon = 0.4            # Noise / margin factor.
  config.align_epochs = 50        # Alignment epochs.
  config.align_ratio = 1          # Samples per class = batch * 1.
  return config
