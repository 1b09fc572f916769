"""Shared config defaults and validation.

Benchmark files in `configs/` start from `base_config()` and set what
differs; `validate` turns a wrong value into one clear `ConfigError`.
"""

import collections.abc
import difflib
import math

import ml_collections

from smope_jax import errors
from smope_jax import precision
from smope_jax.data import benchmarks
from smope_jax.errors import ConfigError
from smope_jax.methods import hideprompt_spec
from smope_jax.methods import registry
from smope_jax.models.variants import VIT_VARIANTS

# The one list of each field's choices; the modules that act on a field
# read it from here.
OPTIMIZERS = ("adamw", "adam")
SCHEDULES = ("cosine", "epoch_cosine")
TEST_RESIZES = ("resize", "resize_crop")
IMAGENET_R_SPLITS = ("reference", "random")


def base_config() -> ml_collections.ConfigDict:
  """Defaults shared by all benchmarks (the CIFAR-100 reference values)."""
  c = ml_collections.ConfigDict()
  # Data.
  c.dataset = "cifar100"  # A benchmark, a TFDS name or "folder:/path".
  c.data_dir = ""  # TFDS data dir of prepared data ("" = TFDS default).
  c.train_split = "train"  # TFDS split syntax (other TFDS datasets).
  c.test_split = "test"  # Likewise; "" = 20 % of each class of train.
  c.image_key = ""  # TFDS image feature ("" = the only Image).
  c.label_key = ""  # TFDS label feature ("" = the only ClassLabel feature).
  c.num_classes = 100  # Checked against the data; 0 = take it from the data.
  c.num_tasks = 10  # Equal tasks in class order; sets the task size.
  c.first_task_classes = 0  # Classes of task 0 (0 = the task size).
  c.joint = False  # Upper bound: all classes as one task.
  c.validation = False  # Hold out 20 % of the training data and evaluate on it.
  c.image_size = 224  # Input resolution.
  c.test_resize = "resize"  # Or "resize_crop" (side 256, centre 224).
  c.imagenet_r_split = "reference"  # The fixed lists, or "random" 80/20.
  c.split_seed = 0  # Seed of the per-class 80/20 splits that we draw ourselves.
  c.cache_data = True  # Keep decoded images in memory.
  c.seed = 0  # Class order, shuffling, augmentation, init.
  c.seeds = ""  # e.g. "0,1,2,3,4": run these seeds, write a mean +- std table.
  # Model.
  c.model = ml_collections.ConfigDict()
  c.model.variant = "B/16"  # ViT size (Ti/16, S/16, B/16, L/16) or "custom".
  c.model.patch_size = 16  # Used when variant == "custom".
  c.model.hidden_size = 768  # Used when variant == "custom".
  c.model.num_layers = 12  # Used when variant == "custom".
  c.model.num_heads = 12  # Used when variant == "custom".
  c.model.mlp_dim = 3072  # Used when variant == "custom".
  c.pretrained = "sup1k"  # Preset, file or converted dir; "" = random.
  c.dtype = "float32"  # Backbone activations, products; or "auto".
  # "highest": full float32 (no TF32 on GPUs); "high", "default": the platform's
  # (CPUs ignore them); "bfloat16": every product of the model on
  # bfloat16-rounded operands summed in float32, on every platform; or "auto".
  # See docs/precision.md.
  c.matmul_precision = "highest"
  # SMoPE's scores and top-K from a full-float32 mean query ("float32") or from
  # the backbone's own bfloat16 queries ("backbone"); or "auto".
  c.routing_precision = "float32"
  c.fused_attention = False  # Use jax.nn.dot_product_attention.
  c.method = registry.REFERENCE  # A registered method (methods/registry.py).
  c.num_prompted_layers = 6  # Blocks 0..L-1 carry prompts.
  c.classifier_alignment = True  # Gaussian replay after each task.
  # The baselines (L2P++, DualPrompt, CODA-Prompt, VQ-Prompt).
  c.pool_size = 30  # Prompts in the pool (DualPrompt: 0 = one per task).
  c.prompt_length = 20  # Tokens per prompt, keys and values together.
  c.g_prompt_length = 6  # DualPrompt's G-prompt tokens.
  c.ortho_weight = 0.0  # CODA-Prompt's orthogonality penalty.
  c.key_loss = "cross_sample"  # L2P: all pairs (reference) or "per_sample".
  c.key_loss_groups = 4  # L2P: the reference's 4-GPU batch split.
  # SMoPE.
  c.num_experts = 25  # E per head (the reference's length 50 = 2E).
  c.top_k = 5  # K active experts per head.
  c.epsilon = 0.4  # Training noise / router margin factor.
  c.inference_penalty = 2.0  # eta for never-used experts at inference.
  c.exclude_unused_at_eval = False  # The paper's (published runs: off).
  c.router_weight = 1e-5  # alpha_r.
  c.prototype_weight = 1e-5  # alpha_p.
  c.dense_warmup = True  # Task 0: dense warm-up for half the epochs first.
  # VQ-Prompt.
  c.vq_temperature = 1.0  # Softmax temperature of the query-key weights.
  c.vq_commit_weight = 0.4  # |p_a - sg(z)|^2: weighted prompt to entry.
  c.vq_codebook_weight = 0.1  # |z - sg(p_a)|^2: entry to weighted prompt.
  c.natural_order_seed0 = False  # Seed 0 keeps classes 0..C-1 (VQ code).
  c.hide = hideprompt_spec.fields()  # HiDe-Prompt's own settings.
  # Optimisation.
  c.batch_size = 128  # GLOBAL batch; must divide by the device count.
  c.eval_batch_size = 256  # Global evaluation batch.
  c.lr = 0.005  # Base rate (head); prompts use lr * prompt_lr_multiplier.
  c.prompt_lr_multiplier = 5.0  # The reference's 5x rate for prompts.
  c.optimizer = "adamw"  # "adamw" (decoupled weight decay) or "adam" (L2).
  c.weight_decay = 0.0  # Weight decay while training tasks.
  c.epochs = 20  # Epochs per task (top-K phase).
  c.schedule = "cosine"  # Per iteration, or "epoch_cosine" (CUB).
  c.schedule_delay = True  # Step n at schedule[n - 1] (the reference).
  c.freeze_steps = 80  # Iterations at 1e-6 before the cosine.
  c.iters_per_epoch = 0  # Sizes the cosine (iter_step); 0 = loader's.
  # Classifier alignment.
  c.align_epochs = 50  # Epochs of Gaussian replay.
  c.align_ratio = 1  # Samples per class and epoch = batch_size * align_ratio.
  c.align_lr = 1e-4  # First step; cosine from align_lr / 10 ...
  c.align_final_lr = 1e-6  # ... to this, per iteration.
  c.align_weight_decay = 5e-4  # AdamW weight decay of the alignment.
  # Run control.
  c.checkpoint_every_steps = 200  # Also checkpoint after every phase.
  c.keep_checkpoints = 3  # Checkpoints kept on disk.
  c.log_every_steps = 20  # Scalars to TensorBoard and the log.
  c.progress_bar = True  # Terminal progress bar (process 0).
  # Fault injection: stop abruptly at this global step (tests).
  c.exit_at_step = -1
  return c


# How a message names the type a field or argument takes.
KINDS = {
    int: "an integer",
    float: "a number",
    bool: "true or false",
    str: "a string"
}


def parse_arg(arg, config_file: str, **defaults) -> ml_collections.ConfigDict:
  """Parses a config file's argument string, e.g. "tasks=20,method=l2p".

  Every key must be one of `defaults`, and each value is converted to the
  type of its default (int, float, bool or str). An empty or None argument
  gives the defaults.

  Raises:
    ConfigError: an unknown key or a value of the wrong type, naming the
      config file and what it accepts.
  """
  accepted = ", ".join(
      f"{k}=<{KINDS[type(v)]}>" for k, v in defaults.items()) or "no argument"
  args = ml_collections.ConfigDict(defaults)
  for item in filter(None,
                     (part.strip() for part in str(arg or "").split(","))):
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
                        f"{KINDS[kind]}.") from None
  return args


def use_method(config, method: str, *, epochs: int,
               batch_size: int = 128) -> ml_collections.ConfigDict:
  """Sets `config.method` with the protocol behind its published numbers.

  A benchmark config holds SMoPE's settings; each method's spec changes
  what its protocol needs (`registry.MethodSpec.apply_protocol`), with the
  benchmark's `epochs` and `batch_size` for the baselines' protocol.
  """
  spec = registry.get(method)
  config.method = method
  spec.apply_protocol(config, epochs=epochs, batch_size=batch_size)
  return config


def model_dims(config) -> dict:
  """ViT size of the config: a named variant or the custom fields."""
  if config.model.variant == "custom":
    return {
        k: int(config.model[k]) for k in ("patch_size", "hidden_size",
                                         "num_layers", "num_heads", "mlp_dim")
    }
  if config.model.variant not in VIT_VARIANTS:
    raise ConfigError(
        f"config.model.variant={config.model.variant!r} is unknown; use one "
        f"of {sorted(VIT_VARIANTS)} or 'custom'.")
  return dict(VIT_VARIANTS[config.model.variant])


# Seeds go to NumPy, Python's `random` and JAX keys; all take this range.
MAX_SEED = 2**31 - 1


def parse_seeds(config) -> list[int]:
  """The seeds to run: `config.seeds` if set, else `[config.seed]`."""
  if not str(config.seeds).strip():
    seeds = [config.seed]
  else:
    try:
      seeds = [int(s) for s in str(config.seeds).split(",") if s.strip()]
    except ValueError:
      raise ConfigError(f"config.seeds={config.seeds!r} must be "
                        "comma-separated integers, e.g. "
                        "--config.seeds=0,1,2,3,4") from None
    errors.require(
        seeds, f"config.seeds={config.seeds!r} names no seed; give "
        "integers, e.g. --config.seeds=0,1,2,3,4, or leave it empty "
        "to run config.seed.")
  field = (f"config.seeds={config.seeds!r}"
           if str(config.seeds).strip() else f"config.seed={config.seed}")
  for seed in seeds:
    errors.require(
        0 <= seed <= MAX_SEED,
        f"{field}: seed {seed} is out of range; seeds must be integers "
        f"from 0 to {MAX_SEED} (2**31-1).")
    errors.require(
        seeds.count(seed) == 1,
        f"{field} repeats seed {seed}; name each seed once.")
  return seeds


def dotted_fields(config, prefix: str = "") -> dict:
  """{"model.hidden_size": value, ...}: every leaf field by its dotted name.

  `config` is a ConfigDict or a nested Mapping such as a saved config.json.
  """
  fields = {}
  for name, value in config.items():
    if isinstance(value, (ml_collections.ConfigDict, collections.abc.Mapping)):
      fields.update(dotted_fields(value, f"{prefix}{name}."))
    else:
      fields[prefix + name] = value
  return fields


def suggest_field(name: str, fields) -> str:
  """The field the user most likely meant by the dotted `name`, or "".

  In order: the same name in any group (patch_size -> model.patch_size),
  a field named by the initials of the name's words (learning_rate -> lr),
  the closest spelling (difflib).
  """
  fields = list(fields)
  last = name.rpartition(".")[2]
  initials = "".join(word[0] for word in last.split("_") if word)
  for wanted in (last, initials if len(initials) > 1 else None):
    for field in fields:
      if field.rpartition(".")[2] == wanted:
        return field
  close = difflib.get_close_matches(name, fields, n=1)
  return close[0] if close else ""


def _kind_fits(value, default) -> bool:
  """Whether `value` has the type of the base config's `default`."""
  if isinstance(default, bool):
    return isinstance(value, bool)
  if isinstance(default, float):
    return isinstance(value, (int, float)) and not isinstance(value, bool)
  return isinstance(value, type(default)) and not isinstance(value, bool)


def check_fields(config) -> None:
  """Every field of `base_config()`, of its type, and no other."""
  errors.require(
      isinstance(config, ml_collections.ConfigDict),
      f"the config is a {type(config).__name__}, not an "
      "ml_collections.ConfigDict; get_config() must return one, e.g. "
      "configuration.base_config() with changes.")
  expected = dotted_fields(base_config())
  given = dotted_fields(config)
  missing = [name for name in expected if name not in given]
  errors.require(
      not missing, f"the config lacks config.{', config.'.join(missing[:5])}"
      f"{' and more' if len(missing) > 5 else ''}; start the config "
      "file from configuration.base_config().")
  unknown = [name for name in given if name not in expected]
  if unknown:
    guess = suggest_field(unknown[0], expected)
    raise ConfigError(f"the config has an unknown field config.{unknown[0]}"
                      f"{f'; did you mean config.{guess}?' if guess else '.'}")
  for name, default in expected.items():
    kind = KINDS[float if isinstance(default, float) else type(default)]
    errors.require(_kind_fits(given[name], default),
                   f"config.{name}={given[name]!r} must be {kind}.")


# Bounds beyond any real machine or run: a value past them is a typo.
MAX_IMAGE_SIZE = 4096
MAX_TOKENS = 65536  # Patches per image.
MAX_HIDDEN_SIZE = 16384
MAX_MLP_DIM = 65536
MAX_LAYERS = 1024
MAX_BATCH = 2**20
MAX_EPOCHS = 100_000
MAX_CLASSES = 2**20
MAX_PROMPTS = 4096  # Experts, pool entries, prompt tokens.


def _check_range(name: str, value, low: int, high: int) -> None:
  errors.require(low <= value <= high,
                 f"config.{name}={value} must be between {low} and {high}.")


def _check_model(config) -> dict:
  """The ViT dimensions: each within bounds, and fitting together."""
  dims = model_dims(config)  # Only a custom ViT's can be out of bounds.
  for name, high in (("patch_size", MAX_IMAGE_SIZE), ("hidden_size",
                                                      MAX_HIDDEN_SIZE),
                     ("num_layers", MAX_LAYERS), ("num_heads", MAX_HIDDEN_SIZE),
                     ("mlp_dim", MAX_MLP_DIM)):
    errors.require(
        1 <= dims[name] <= high,
        f"config.model.{name}={dims[name]} must be between 1 and "
        f"{high}.")
  _check_range("image_size", config.image_size, 1, MAX_IMAGE_SIZE)
  errors.require(
      config.image_size % dims["patch_size"] == 0,
      f"config.image_size={config.image_size} must be a multiple of the "
      f"patch size {dims['patch_size']}.")
  tokens = (config.image_size // dims["patch_size"])**2
  errors.require(
      tokens <= MAX_TOKENS,
      f"config.image_size={config.image_size} makes {tokens} patches of "
      f"size {dims['patch_size']}, more than {MAX_TOKENS}; use a larger "
      "patch or a smaller image.")
  errors.require(
      dims["hidden_size"] % dims["num_heads"] == 0,
      "config.model.hidden_size must divide by config.model.num_heads.")
  return dims


def _check_method(config, dims: dict) -> None:
  """The prompted layers, then the chosen method's own checks."""
  spec = registry.get(config.method)
  prompted = config.num_prompted_layers
  if spec.fixed_layout:  # A fixed layout is cut to a smaller model.
    prompted = min(prompted, dims["num_layers"])
  errors.require(
      1 <= prompted <= dims["num_layers"],
      f"config.num_prompted_layers={config.num_prompted_layers} "
      f"must be between 1 and the {dims['num_layers']} layers.")
  for name in ("num_experts", "pool_size", "prompt_length", "g_prompt_length"):
    _check_range(name, config[name], 0, MAX_PROMPTS)
  spec.check(config, dims)


def _check_numbers(config) -> None:
  """Counts within bounds; rates and loss weights finite."""
  for name, high in (("batch_size", MAX_BATCH), ("eval_batch_size", MAX_BATCH),
                     ("epochs", MAX_EPOCHS)):
    _check_range(name, config[name], 1, high)
  for name in ("align_ratio", "checkpoint_every_steps", "log_every_steps",
               "keep_checkpoints"):
    errors.require(config[name] >= 1,
                   f"config.{name}={config[name]} must be a positive integer.")
  _check_range("align_epochs", config.align_epochs, 0, MAX_EPOCHS)
  for name in ("freeze_steps", "iters_per_epoch"):
    errors.require(config[name] >= 0, f"config.{name} must not be negative.")
  errors.require(config.exit_at_step >= -1,
                 "config.exit_at_step must be -1 (off) or a step.")
  for name in ("lr", "align_lr", "align_final_lr", "prompt_lr_multiplier"):
    value = float(config[name])
    errors.require(
        math.isfinite(value) and value > 0,
        f"config.{name}={value} must be positive and finite.")
  for name in ("router_weight", "prototype_weight", "ortho_weight", "epsilon",
               "inference_penalty", "weight_decay", "align_weight_decay"):
    value = float(config[name])
    errors.require(
        math.isfinite(value) and value >= 0,
        f"config.{name}={value} must be finite and not negative.")
  errors.require(
      0 <= config.split_seed <= MAX_SEED,
      f"config.split_seed={config.split_seed} is out of range; seeds "
      f"must be integers from 0 to {MAX_SEED} (2**31-1).")


def validate(config) -> None:
  """Raises ConfigError naming the first invalid field and what it accepts.

  Needs nothing but the config (no JAX, no TensorFlow, no files), so that a
  wrong value ends the program before anything starts.
  """
  check_fields(config)
  errors.require(
      config.dataset.strip() != "",
      f"config.dataset={config.dataset!r}; name a benchmark "
      f"{tuple(benchmarks.BENCHMARKS)}, a TFDS dataset or "
      "'folder:/path'.")
  benchmark = benchmarks.BENCHMARKS.get(config.dataset)
  errors.require(
      not benchmark or config.num_classes in (0, benchmark.num_classes),
      f"config.num_classes={config.num_classes}, but {config.dataset} has "
      f"{benchmark and benchmark.num_classes} classes; set "
      f"{benchmark and benchmark.num_classes} or 0 (from the data).")
  _check_range("num_tasks", config.num_tasks, 1, MAX_CLASSES)
  errors.require(
      config.num_classes >= 0 and config.first_task_classes >= 0,
      "config.num_classes and config.first_task_classes must not be "
      "negative.")
  _check_range("num_classes", config.num_classes, 0, MAX_CLASSES)
  if config.num_classes and not config.joint:
    # The data knows the class count; check what the config alone can.
    from smope_jax.data import splits  # pylint: disable=g-import-not-at-top
    splits.task_classes(range(config.num_classes), config.num_tasks,
                        config.first_task_classes)
  _check_method(config, _check_model(config))
  for name, choices in (("test_resize", TEST_RESIZES), ("schedule", SCHEDULES),
                        ("dtype", precision.DTYPES),
                        ("matmul_precision", precision.MATMUL_PRECISIONS),
                        ("routing_precision", precision.ROUTING_PRECISIONS),
                        ("optimizer", OPTIMIZERS), ("imagenet_r_split",
                                                    IMAGENET_R_SPLITS)):
    errors.require(config[name] in choices,
                   f"config.{name}={config[name]!r}; choose one of {choices}.")
  _check_numbers(config)
  parse_seeds(config)


def validate_devices(config, device_count: int, process_count: int) -> None:
  """The global batches must split evenly over devices and hosts."""
  for name in ("batch_size", "eval_batch_size"):
    value = int(config[name])
    errors.require(
        value % device_count == 0,
        f"config.{name}={value} must divide by the {device_count} "
        f"devices of this run; try "
        f"{max(device_count, value - value % device_count)}.")
    errors.require(
        value % process_count == 0,
        f"config.{name}={value} must divide by the {process_count} "
        "processes of this run.")
