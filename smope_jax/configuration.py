"""Shared config defaults and validation.

Benchmark files in `configs/` start from `base_config()` and set what
differs; `validate` turns a wrong value into one clear `ConfigError`.
"""

import ml_collections

from smope_jax.errors import ConfigError
from smope_jax.models.variants import VIT_VARIANTS

BENCHMARKS = ("cifar100", "imagenet_r", "caltech_birds2011", "digits")
METHODS = ("smope", "l2p", "deep_l2p", "dualprompt", "codaprompt")
OPTIMIZERS = ("adamw", "adam")
KEY_LOSSES = ("cross_sample", "per_sample")
SCHEDULES = ("cosine", "epoch_cosine")
DTYPES = ("float32", "bfloat16")
MATMUL_PRECISIONS = ("highest", "high", "default")
IMAGENET_R_SPLITS = ("reference", "random")
PRESETS = ("sup21k", "sup1k", "ibot21k", "ibot1k", "dino1k")


def base_config() -> ml_collections.ConfigDict:
  """Defaults shared by all benchmarks (the CIFAR-100 reference values)."""
  c = ml_collections.ConfigDict()
  # Data.
  c.dataset = "cifar100"          # A benchmark of BENCHMARKS, any TFDS name, or "folder:/path".
  c.data_dir = ""                 # TFDS data dir of prepared data ("" = TFDS default).
  c.train_split = "train"         # TFDS split syntax, for TFDS datasets other than the benchmarks.
  c.test_split = "test"           # Likewise; "" = hold out 20 % of each class of train_split.
  c.image_key = ""                # TFDS image feature ("" = the dataset's only Image feature).
  c.label_key = ""                # TFDS label feature ("" = the only ClassLabel feature).
  c.num_classes = 100             # Checked against the data; 0 = take it from the data.
  c.num_tasks = 10                # Equal tasks in class order; sets the task size.
  c.first_task_classes = 0        # Classes of task 0 (0 = the task size); the others keep the size.
  c.joint = False                 # Upper bound: all classes as one task.
  c.validation = False            # Hold out 20 % of the training data and evaluate on it.
  c.image_size = 224              # Input resolution.
  c.test_resize = "resize"        # "resize" (CIFAR) or "resize_crop" (shorter side 256, centre 224).
  c.imagenet_r_split = "reference"  # The reference's fixed lists, or "random" (seeded 80/20).
  c.split_seed = 0                # Seed of the per-class 80/20 splits that we draw ourselves.
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
  c.matmul_precision = "highest"  # Float32 matrix products in full float32 (no TF32 on GPUs).
  c.fused_attention = False       # Use jax.nn.dot_product_attention (zero keys + bias form).
  # The method: SMoPE, or a baseline (see use_method for their protocol).
  c.method = "smope"              # One of METHODS.
  c.num_prompted_layers = 6       # Blocks 0..L-1 carry prompts (baselines: at most all blocks).
  c.classifier_alignment = True   # Class statistics and Gaussian replay after each task.
  # Baselines (L2P++, DualPrompt, CODA-Prompt).
  c.pool_size = 30                # Prompts in the pool (DualPrompt: 0 = one per task).
  c.prompt_length = 20            # Tokens per prompt, keys and values together.
  c.g_prompt_length = 6           # DualPrompt's G-prompt tokens.
  c.ortho_weight = 0.0            # CODA-Prompt's orthogonality penalty.
  c.key_loss = "cross_sample"     # L2P: the reference's all-pairs sum, or "per_sample".
  c.key_loss_groups = 4           # L2P: the batch split the reference's 4 GPUs summed over.
  # SMoPE.
  c.num_experts = 25              # E experts per head (the reference's prompt length 50 = 2E).
  c.top_k = 5                     # K active experts per head.
  c.epsilon = 0.4                 # Training noise / router margin factor.
  c.inference_penalty = 2.0       # eta for never-used experts at inference.
  c.exclude_unused_at_eval = False  # The paper's exclusion at evaluation (the published numbers had none).
  c.router_weight = 1e-5          # alpha_r.
  c.prototype_weight = 1e-5       # alpha_p.
  c.dense_warmup = True           # Task 0: dense warm-up for half the epochs first.
  # Optimisation.
  c.batch_size = 128              # GLOBAL batch; must divide by the device count.
  c.eval_batch_size = 256         # Global evaluation batch.
  c.lr = 0.005                    # Base rate (head); prompts use lr * prompt_lr_multiplier.
  c.prompt_lr_multiplier = 5.0    # The reference trains the prompt experts 5x faster.
  c.optimizer = "adamw"           # "adamw" (decoupled weight decay) or "adam" (L2).
  c.weight_decay = 0.0            # Weight decay while training tasks.
  c.epochs = 20                   # Epochs per task (top-K phase).
  c.schedule = "cosine"           # "cosine" (per iteration, after freeze_steps) or "epoch_cosine" (CUB).
  c.schedule_delay = True         # The reference's lag: step 0 at the base rate, step n at schedule[n - 1].
  c.freeze_steps = 80             # Iterations at 1e-6 before the cosine.
  c.iters_per_epoch = 0           # Sizes the cosine (the reference's iter_step); 0 = the loader's steps.
  # Classifier alignment.
  c.align_epochs = 50             # Epochs of Gaussian replay.
  c.align_ratio = 1               # Samples per class and epoch = batch_size * align_ratio.
  c.align_lr = 1e-4               # The first step's rate; the cosine runs from align_lr / 10 ...
  c.align_final_lr = 1e-6         # ... to this, per iteration.
  c.align_weight_decay = 5e-4     # AdamW weight decay of the alignment.
  # Run control.
  c.checkpoint_every_steps = 200  # Also checkpoint after every phase.
  c.keep_checkpoints = 3          # Checkpoints kept on disk.
  c.log_every_steps = 20          # Scalars to TensorBoard and the log.
  c.progress_bar = True           # Terminal progress bar (process 0).
  c.exit_at_step = -1             # Fault injection: stop abruptly at this global step (tests).
  return c


_KINDS = {int: "an integer", float: "a number", bool: "true or false",
          str: "a string"}


def parse_arg(arg, config_file: str, **defaults) -> ml_collections.ConfigDict:
  """Parses a config file's argument string, e.g. "tasks=20,method=l2p".

  Every key must be one of `defaults`, and each value is converted to the
  type of its default (int, float, bool or str). An empty or None argument
  gives the defaults.

  Raises:
    ConfigError: an unknown key or a value of the wrong type, naming the
      config file and what it accepts.
  """
  accepted = ", ".join(f"{k}=<{_KINDS[type(v)]}>" for k, v in
                       defaults.items()) or "no argument"
  args = ml_collections.ConfigDict(defaults)
  for item in filter(None, (part.strip() for part in str(arg or "").split(","))):
    key, sep, value = (p.strip() for p in item.partition("="))
    if not sep or key not in defaults:
      raise ConfigError(f"{config_file} takes {accepted}; got {item!r}.")
    kind = type(defaults[key])
    try:
      if kind is bool:
        if value.lower() not in ("true", "false", "1", "0"):
          raise ValueError(value)
        args[key] = value.lower() in ("true", "1")
      else:
        args[key] = kind(value)
    except ValueError:
      raise ConfigError(f"{config_file}: {key}={value!r} is not "
                        f"{_KINDS[kind]}.") from None
  return args


# Prompted blocks of the baselines: L2P++ 0; Deep L2P++ 0-4; DualPrompt
# G-prompts in 0-1 and E-prompts in 2-4; CODA-Prompt 0-4.
BASELINE_LAYERS = {"l2p": 1, "deep_l2p": 5, "dualprompt": 5, "codaprompt": 5}
# Pool size, prompt length (keys + values) of each baseline.
BASELINE_PROMPTS = {"l2p": (30, 20), "deep_l2p": (30, 20),
                    "dualprompt": (0, 20), "codaprompt": (100, 8)}


def use_method(config, method: str, *, epochs: int,
               batch_size: int = 128) -> ml_collections.ConfigDict:
  """Sets `config.method` with its defaults.

  SMoPE keeps the config's settings. The baselines get the protocol behind
  their published numbers (the CODA-Prompt code): Adam at 1e-3 for prompts
  and classifier alike, a per-epoch cosine stepped at each epoch's start
  (no lag), `epochs` epochs of `batch_size`, no classifier alignment, and
  each method's prompt sizes. `prompt_lr_multiplier` and
  `classifier_alignment` switch on the SMoPE repository's protocol (5x the
  rate for prompts; alignment with its defaults of 10 epochs, ratio 4).
  """
  if method not in METHODS:
    raise ConfigError(f"method={method!r}; choose one of {METHODS}.")
  config.method = method
  if method == "smope":
    return config
  pool, length = BASELINE_PROMPTS[method]
  config.update(
      optimizer="adam", lr=1e-3, weight_decay=0.0, schedule="epoch_cosine",
      schedule_delay=False, freeze_steps=0, iters_per_epoch=0,
      epochs=epochs, batch_size=batch_size, prompt_lr_multiplier=1.0,
      classifier_alignment=False, align_epochs=10, align_ratio=4,
      dense_warmup=False, top_k=5, pool_size=pool, prompt_length=length,
      num_prompted_layers=BASELINE_LAYERS[method])
  return config


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
  _require(isinstance(config.dataset, str) and config.dataset.strip() != "",
           f"config.dataset={config.dataset!r}; name a benchmark "
           f"{BENCHMARKS}, a TFDS dataset or 'folder:/path'.")
  _require(config.num_tasks >= 1,
           f"config.num_tasks={config.num_tasks} must be positive.")
  _require(config.num_classes >= 0 and config.first_task_classes >= 0,
           "config.num_classes and config.first_task_classes must not be "
           "negative.")
  if config.num_classes and not config.joint:
    # The data knows the class count; check what the config alone can.
    from smope_jax.data import splits  # pylint: disable=g-import-not-at-top
    splits.task_classes(range(config.num_classes), config.num_tasks,
                        config.first_task_classes)
  dims = model_dims(config)
  _require(config.image_size % dims["patch_size"] == 0,
           f"config.image_size={config.image_size} must be a multiple of the "
           f"patch size {dims['patch_size']}.")
  _require(dims["hidden_size"] % dims["num_heads"] == 0,
           "config.model.hidden_size must divide by config.model.num_heads.")
  prompted = config.num_prompted_layers
  if config.method != "smope":  # The baselines' layout, on a smaller model.
    prompted = min(prompted, dims["num_layers"])
  _require(1 <= prompted <= dims["num_layers"],
           f"config.num_prompted_layers={config.num_prompted_layers} must be "
           f"between 1 and the {dims['num_layers']} layers.")
  _require(config.method in METHODS,
           f"config.method={config.method!r}; choose one of {METHODS}.")
  if config.method == "smope":
    _require(1 <= config.top_k <= config.num_experts,
             f"config.top_k={config.top_k} must be between 1 and "
             f"config.num_experts={config.num_experts}.")
  if config.method in ("l2p", "deep_l2p"):
    _require(1 <= config.top_k <= config.pool_size,
             f"config.top_k={config.top_k} must be between 1 and "
             f"config.pool_size={config.pool_size}.")
    _require(config.key_loss in KEY_LOSSES,
             f"config.key_loss={config.key_loss!r}; choose one of "
             f"{KEY_LOSSES}.")
    _require(config.key_loss_groups >= 1 and
             config.batch_size % config.key_loss_groups == 0,
             f"config.key_loss_groups={config.key_loss_groups} must divide "
             f"config.batch_size={config.batch_size}.")
  if config.method == "dualprompt":
    _require(prompted >= 3,
             "DualPrompt needs config.num_prompted_layers >= 3 (G-prompts "
             "in the first two blocks, E-prompts after them).")
  if config.method != "smope":
    _require(config.prompt_length >= 2 and config.prompt_length % 2 == 0,
             f"config.prompt_length={config.prompt_length} must be even: "
             "half keys, half values.")
    _require(config.pool_size >= (1 if config.method != "dualprompt" else 0),
             f"config.pool_size={config.pool_size} must be positive.")
  for name, choices in (("test_resize", ("resize", "resize_crop")),
                        ("schedule", SCHEDULES), ("dtype", DTYPES),
                        ("matmul_precision", MATMUL_PRECISIONS),
                        ("optimizer", OPTIMIZERS),
                        ("imagenet_r_split", IMAGENET_R_SPLITS)):
    _require(config[name] in choices,
             f"config.{name}={config[name]!r}; choose one of {choices}.")
  for name in ("batch_size", "eval_batch_size", "epochs", "align_ratio",
               "checkpoint_every_steps", "log_every_steps", "keep_checkpoints"):
    _require(int(config[name]) >= 1,
             f"config.{name}={config[name]} must be a positive integer.")
  for name in ("lr", "align_lr", "align_final_lr"):
    _require(float(config[name]) > 0, f"config.{name} must be positive.")
  for name in ("freeze_steps", "iters_per_epoch", "align_epochs",
               "router_weight", "prototype_weight", "epsilon",
               "weight_decay", "align_weight_decay", "ortho_weight"):
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
