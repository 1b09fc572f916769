"""Shared config defaults and validation.

Benchmark files in `configs/` start from `base_config()` and set what
differs; `validate` turns a wrong value into one clear `ConfigError`.
"""

import ml_collections

from smope_jax.errors import ConfigError
from smope_jax.models.variants import VIT_VARIANTS

DATASETS = ("cifar100", "imagenet_r", "caltech_birds2011", "digits")
SCHEDULES = ("cosine", "epoch_cosine")
DTYPES = ("float32", "bfloat16")
PRESETS = ("sup21k", "sup1k", "ibot21k", "ibot1k", "dino1k")


def base_config() -> ml_collections.ConfigDict:
  """Defaults shared by all benchmarks (the CIFAR-100 reference values)."""
  c = ml_collections.ConfigDict()
  # Data.
  c.dataset = "cifar100"          # One of DATASETS.
  c.data_dir = ""                 # TFDS data dir of prepared data ("" = TFDS default).
  c.num_classes = 100             # Classes in the benchmark.
  c.num_tasks = 10                # Tasks; classes split evenly in class order.
  c.image_size = 224              # Input resolution.
  c.test_resize = "resize"        # "resize" (CIFAR) or "resize_crop" (256 -> 224 center crop).
  c.split_seed = 0                # Seed of the ImageNet-R 80/20 split.
  c.cache_data = True             # Keep decoded images in memory.
  c.seed = 0                      # Class order, shuffling, augmentation, init.
  c.seeds = ""                    # e.g. "0,1,2,3,4": run these seeds, write a mean +- std table.
  # Model.
  c.model = ml_collections.ConfigDict()
  c.model.variant = "B/16"        # ViT size (Ti/16, S/16, B/16, L/16) or "custom".
  c.model.patch_size = 16         # Used when variant == "custom".
  c.model.hidden_size = 768       # Used when variant == "custom".
  c.model.num_layers = 12         # Used when variant == "custom".
  c.model.num_heads = 12          # Used when variant == "custom".
  c.model.mlp_dim = 3072          # Used when variant == "custom".
  c.pretrained = "sup1k"          # Preset name, checkpoint file or converted dir; "" = random init (tests only).
  c.dtype = "float32"             # Backbone compute dtype; prompts, scores and losses stay float32.
  c.fused_attention = False       # Use jax.nn.dot_product_attention (zero keys + bias form).
  # SMoPE.
  c.num_prompted_layers = 6       # Blocks 0..L-1 carry prompt experts.
  c.num_experts = 25              # E experts per head (the reference's prompt length 50 = 2E).
  c.top_k = 5                     # K active experts per head.
  c.epsilon = 0.4                 # Training noise / router margin factor.
  c.inference_penalty = 2.0       # eta for never-used experts at inference.
  c.router_weight = 1e-5          # alpha_r.
  c.prototype_weight = 1e-5       # alpha_p.
  c.dense_warmup = True           # Task 0: dense warm-up for half the epochs first.
  # Optimisation.
  c.batch_size = 128              # GLOBAL batch; must divide by the device count.
  c.eval_batch_size = 256         # Global evaluation batch.
  c.lr = 0.005                    # Base rate (head); prompts use lr * prompt_lr_multiplier.
  c.prompt_lr_multiplier = 5.0    # Reference: 5x for the prompt experts.
  c.weight_decay = 0.0            # AdamW weight decay while training tasks.
  c.epochs = 20                   # Epochs per task (top-K phase).
  c.schedule = "cosine"           # "cosine" (per iteration, after freeze_steps) or "epoch_cosine" (CUB).
  c.freeze_steps = 80             # Iterations at 1e-6 before the cosine.
  c.steps_per_epoch = 0           # Schedule's iterations per epoch; 0 = ceil(train images / batch).
  # Classifier alignment.
  c.align_epochs = 50             # Epochs of Gaussian replay.
  c.align_ratio = 1               # Samples per class and epoch = batch_size * align_ratio.
  c.align_lr = 1e-5               # Cosine from this ...
  c.align_final_lr = 1e-6         # ... to this, per iteration.
  c.align_weight_decay = 5e-4     # AdamW weight decay of the alignment.
  # Run control.
  c.checkpoint_every_steps = 200  # Also checkpoint after every task.
  c.keep_checkpoints = 3          # Checkpoints kept on disk.
  c.log_every_steps = 20          # Scalars to TensorBoard and the log.
  c.progress_bar = True           # Terminal progress bar (process 0).
  c.exit_at_step = -1             # Fault injection: stop abruptly at this global step (tests).
  return c


def model_dims(config) -> dict:
  """ViT size of the config: a named variant or the custom fields."""
  if config.model.variant == "custom":
    return {k: int(config.model[k]) for k in
            ("patch_size", "hidden_size", "num_layers", "num_heads",
             "mlp_dim")}
  if config.model.variant not in VIT_VARIANTS:
    raise ConfigError(
        f"config.model.variant={config.model.variant!r} is unknown; use one "
        f"of {sorted(VIT_VARIANTS)} or 'custom'.")
  return dict(VIT_VARIANTS[config.model.variant])


def parse_seeds(config) -> list[int]:
  """The seeds to run: `config.seeds` if set, else `[config.seed]`."""
  if not str(config.seeds).strip():
    return [int(config.seed)]
  try:
    return [int(s) for s in str(config.seeds).split(",") if s.strip()]
  except ValueError:
    raise ConfigError(f"config.seeds={config.seeds!r} must be comma-separated "
                      "integers, e.g. --config.seeds=0,1,2,3,4") from None


def _require(condition: bool, message: str):
  if not condition:
    raise ConfigError(message)


def validate(config) -> None:
  """Raises ConfigError naming the first invalid field and what it accepts."""
  _require(config.dataset in DATASETS,
           f"config.dataset={config.dataset!r}; choose one of {DATASETS}.")
  _require(config.num_tasks >= 1 and config.num_classes % config.num_tasks == 0,
           f"config.num_classes={config.num_classes} must split evenly into "
           f"config.num_tasks={config.num_tasks} tasks.")
  dims = model_dims(config)
  _require(config.image_size % dims["patch_size"] == 0,
           f"config.image_size={config.image_size} must be a multiple of the "
           f"patch size {dims['patch_size']}.")
  _require(dims["hidden_size"] % dims["num_heads"] == 0,
           "config.model.hidden_size must divide by config.model.num_heads.")
  _require(1 <= config.num_prompted_layers <= dims["num_layers"],
           f"config.num_prompted_layers={config.num_prompted_layers} must be "
           f"between 1 and the {dims['num_layers']} layers.")
  _require(1 <= config.top_k <= config.num_experts,
           f"config.top_k={config.top_k} must be between 1 and "
           f"config.num_experts={config.num_experts}.")
  _require(config.test_resize in ("resize", "resize_crop"),
           f"config.test_resize={config.test_resize!r}; use 'resize' or "
           "'resize_crop'.")
  _require(config.schedule in SCHEDULES,
           f"config.schedule={config.schedule!r}; choose one of {SCHEDULES}.")
  _require(config.dtype in DTYPES,
           f"config.dtype={config.dtype!r}; choose one of {DTYPES}.")
  for name in ("batch_size", "eval_batch_size", "epochs", "align_ratio",
               "checkpoint_every_steps", "log_every_steps", "keep_checkpoints"):
    _require(int(config[name]) >= 1,
             f"config.{name}={config[name]} must be a positive integer.")
  for name in ("lr", "align_lr", "align_final_lr"):
    _require(float(config[name]) > 0, f"config.{name} must be positive.")
  for name in ("freeze_steps", "steps_per_epoch", "align_epochs",
               "router_weight", "prototype_weight", "epsilon",
               "weight_decay", "align_weight_decay"):
    _require(float(config[name]) >= 0, f"config.{name} must not be negative.")
  parse_seeds(config)


def validate_devices(config, device_count: int, process_count: int) -> None:
  """The global batches must split evenly over devices and hosts."""
  for name in ("batch_size", "eval_batch_size"):
    value = int(config[name])
    _require(value % device_count == 0,
             f"config.{name}={value} must divide by the {device_count} "
             f"devices of this run; try {max(device_count, value - value % device_count)}.")
    _require(value % process_count == 0,
             f"config.{name}={value} must divide by the {process_count} "
             "processes of this run.")
