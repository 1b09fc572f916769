r"""SMoPE on Split ImageNet-R with 5, 10 or 20 tasks, the reference settings.

    python -m smope_jax.main --config=configs/imagenet_r.py:tasks=10 \
        --workdir=/tmp/imagenet_r10

Backbone: supervised ImageNet-21k -> 1k ViT-B/16 (preset `sup1k`). Data: TFDS
`imagenet_r` with the reference's fixed train/test lists and class
numbering (shipped in smope_jax/data/reference/imagenet_r). Published (10
tasks, 5 seeds): SMoPE FAA 79.32 +- 0.42.
"""

from smope_jax import configuration
from smope_jax.errors import ConfigError

# tasks -> (freeze iterations, iterations per epoch of the schedule, alpha_r,
# alpha_p, epsilon, align epochs, align ratio): the reference's commands.
SETTINGS = {
    5: (80, 80, 1e-4, 1e-5, 0.7, 60, 2),
    10: (40, 40, 5e-5, 1e-4, 0.5, 50, 6),
    20: (20, 20, 1e-4, 5e-5, 0.3, 50, 4),
}


def get_config(arg=None):
  args = configuration.parse_arg(arg, "configs/imagenet_r.py", tasks=10,
                                 method="smope")
  if args.tasks not in SETTINGS:
    raise ConfigError("configs/imagenet_r.py takes tasks=5, tasks=10 or "
                      f"tasks=20, got tasks={args.tasks}.")
  (freeze, iters, router, prototype, epsilon, align_epochs,
   align_ratio) = SETTINGS[args.tasks]
  config = configuration.base_config()
  config.dataset = "imagenet_r"
  config.num_classes = 200
  config.num_tasks = args.tasks
  config.test_resize = "resize_crop"
  config.batch_size = 64
  config.lr = 0.0025
  config.freeze_steps = freeze
  config.iters_per_epoch = iters
  config.router_weight = router
  config.prototype_weight = prototype
  config.epsilon = epsilon
  config.align_epochs = align_epochs
  config.align_ratio = align_ratio
  return configuration.use_method(config, args.method, epochs=50)
