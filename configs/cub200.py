r"""SMoPE on Split CUB-200 (10 tasks x 20 classes), the reference settings.

    python -m smope_jax.main --config=configs/cub200.py --workdir=/tmp/cub200

Backbone: supervised ImageNet-21k ViT-B/16 (preset `sup21k`, timm
`augreg_in21k`). Data: TFDS `caltech_birds2011`. Published (10 tasks, 5
seeds): SMoPE FAA 87.43 +- 0.39.
"""

from smope_jax.configuration import base_config


def get_config():
  config = base_config()
  config.dataset = "caltech_birds2011"  # TFDS name.
  config.num_classes = 200              # Bird species.
  config.num_tasks = 10                 # 10 tasks x 20 classes.
  config.test_resize = "resize_crop"    # Test: resize 256, center crop 224.
  config.pretrained = "sup21k"          # augreg_in21k ViT-B/16.
  config.batch_size = 128               # Reference batch.
  config.lr = 0.005                     # Reference base rate.
  config.epochs = 20                    # Epochs per task.
  config.schedule = "epoch_cosine"      # Reference per-epoch cosine.
  config.freeze_steps = 0               # No frozen iterations.
  config.steps_per_epoch = 0            # Actual iterations per epoch.
  config.router_weight = 1e-5           # alpha_r.
  config.prototype_weight = 5e-5        # alpha_p.
  config.epsilon = 0.4                  # Noise / margin factor.
  config.align_epochs = 50              # Alignment epochs.
  config.align_ratio = 1                # Samples per class = batch * 1.
  return config
