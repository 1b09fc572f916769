"""Every config file loads, validates, and carries the reference settings."""

import ast
import importlib.util
import math
import os

import pytest

from smope_jax import configuration
from smope_jax.errors import ConfigError
from tests import helpers

CONFIGS = os.path.join(helpers.REPO, "configs")
CONFIG_FILES = sorted(
    f for f in os.listdir(CONFIGS) if f.endswith(".py") and f != "__init__.py")


def _load(name, *args):
  spec = importlib.util.spec_from_file_location(
      name, os.path.join(CONFIGS, f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(*args)


# The reference settings: (file, arg) -> dataset, tasks, classes, batch, lr,
# alpha_r, alpha_p, epsilon, align epochs, align ratio, schedule, freeze,
# schedule iterations per epoch, backbone.
REFERENCE = {
    ("cifar100", None): ("cifar100", 10, 100, 128, 0.005, 1e-5, 1e-5, 0.4, 50,
                         1, "cosine", 80, 40, "sup1k"),
    ("imagenet_r", "tasks=5"): ("imagenet_r", 5, 200, 64, 0.0025, 1e-4, 1e-5,
                                0.7, 60, 2, "cosine", 80, 80, "sup1k"),
    ("imagenet_r", "tasks=10"): ("imagenet_r", 10, 200, 64, 0.0025, 5e-5, 1e-4,
                                 0.5, 50, 6, "cosine", 40, 40, "sup1k"),
    ("imagenet_r", "tasks=20"): ("imagenet_r", 20, 200, 64, 0.0025, 1e-4, 5e-5,
                                 0.3, 50, 4, "cosine", 20, 20, "sup1k"),
    ("cub200", None): ("caltech_birds2011", 10, 200, 128, 0.005, 1e-5, 5e-5,
                       0.4, 50, 1, "epoch_cosine", 0, 0, "sup21k"),
}


@pytest.mark.parametrize("name,arg", list(REFERENCE))
def test_benchmark_configs_match_the_spec(name, arg):
  config = _load(name, *([arg] if arg else []))
  configuration.validate(config)
  got = (config.dataset, config.num_tasks, config.num_classes,
         config.batch_size, config.lr, config.router_weight,
         config.prototype_weight, config.epsilon, config.align_epochs,
         config.align_ratio, config.schedule, config.freeze_steps,
         config.iters_per_epoch, config.pretrained)
  assert got == REFERENCE[(name, arg)]
  # Shared by every benchmark: ViT-B/16 at 224, E = 25, K = 5, 6 layers.
  assert (config.model.variant, config.image_size, config.num_experts,
          config.top_k, config.num_prompted_layers) == ("B/16", 224, 25, 5, 6)
  assert config.epochs == 20 and config.prompt_lr_multiplier == 5.0
  assert config.weight_decay == 0.0 and config.align_weight_decay == 5e-4
  assert (config.align_lr, config.align_final_lr) == (1e-4, 1e-6)
  # The reference's lag and evaluation routing, the reference's ImageNet-R.
  assert config.schedule_delay and not config.exclude_unused_at_eval
  assert config.matmul_precision == "highest"
  assert config.imagenet_r_split == "reference"


def test_imagenet_r_default_is_ten_tasks_and_bad_argument_is_refused():
  assert _load("imagenet_r").num_tasks == 10
  with pytest.raises(ConfigError, match="tasks=5"):
    _load("imagenet_r", "tasks=7")
  with pytest.raises(ConfigError, match="takes tasks=<an integer>"):
    _load("imagenet_r", "task=10")
  with pytest.raises(ConfigError, match="not an integer"):
    _load("imagenet_r", "tasks=ten")
  with pytest.raises(ConfigError, match="cifar100.py takes method=<a string>"):
    _load("cifar100", "tasks=10")


@pytest.mark.parametrize("name", CONFIG_FILES)
def test_config_files_set_only_what_differs_from_the_defaults(name):
  """`config.x = <literal>` never restates what base_config() gives."""
  with open(os.path.join(CONFIGS, name)) as f:
    tree = ast.parse(f.read())
  defaults = configuration.base_config()
  restated = []
  for node in ast.walk(tree):
    if not (isinstance(node, ast.Assign) and len(node.targets) == 1):
      continue
    field = ast.unparse(node.targets[0])
    if not field.startswith("config."):
      continue
    try:
      value = ast.literal_eval(node.value)
    except ValueError:
      continue  # Set from the file's argument.
    default = defaults
    for part in field.split(".")[1:]:
      default = default[part]
    if value == default:
      restated.append(f"{field} = {value!r}")
  assert not restated, restated


def test_demo_config_validates():
  config = _load("demo")
  configuration.validate(config)
  assert config.dataset == "digits" and config.pretrained == "demo"


@pytest.mark.parametrize("field,value,message", [
    ("dataset", "", "config.dataset"),
    ("num_tasks", 7, "divide the 100 classes"),
    ("first_task_classes", 45, "multiple of the task size 10"),
    ("matmul_precision", "tf32", "config.matmul_precision"),
    ("imagenet_r_split", "mine", "config.imagenet_r_split"),
    ("top_k", 30, "config.top_k"),
    ("batch_size", 0, "config.batch_size"),
    ("lr", -1.0, "config.lr"),
    ("schedule", "linear", "config.schedule"),
    ("dtype", "float16", "config.dtype"),
    ("image_size", 100, "multiple of the patch size"),
    ("num_prompted_layers", 13, "config.num_prompted_layers"),
    ("seeds", "0,a", "config.seeds"),
])
def test_bad_values_raise_config_error_naming_the_field(field, value, message):
  config = _load("cifar100")
  config[field] = value
  with pytest.raises(ConfigError, match=message):
    configuration.validate(config)


# Each reaches the command line as its one `error:` line (test_cli_errors
# runs a few there).
@pytest.mark.parametrize("overrides,expected", [
    ({
        "model.num_heads": 0
    }, "config.model.num_heads=0 must be between 1 and 16384."),
    ({
        "model.num_heads": -4
    }, "config.model.num_heads=-4"),
    ({
        "model.num_heads": 3
    }, "config.model.hidden_size must divide by config.model.num_heads."),
    ({
        "model.patch_size": 0
    }, "config.model.patch_size=0 must be between 1 and 4096."),
    ({
        "model.hidden_size": 0
    }, "config.model.hidden_size=0 must be between 1 and 16384."),
    ({
        "model.hidden_size": 32768
    }, "config.model.hidden_size=32768 must be between 1 and 16384."),
    ({
        "model.mlp_dim": 0
    }, "config.model.mlp_dim=0 must be between 1 and 65536."),
    ({
        "model.num_layers": 0
    }, "config.model.num_layers=0 must be between 1 and 1024."),
    ({
        "image_size": 0
    }, "config.image_size=0 must be between 1 and 4096."),
    ({
        "image_size": 8192
    }, "config.image_size=8192 must be between 1 and 4096."),
    ({
        "image_size": 36
    }, "must be a multiple of the patch size 8."),
    ({
        "image_size": 4096,
        "model.patch_size": 8
    }, "makes 262144 patches of size 8, more than 65536"),
    ({
        "batch_size": 0
    }, "config.batch_size=0 must be between 1 and 1048576."),
    ({
        "batch_size": -3
    }, "config.batch_size=-3 must be between 1"),
    ({
        "batch_size": 2097152
    }, "config.batch_size=2097152 must be between 1 and 1048576."),
    ({
        "eval_batch_size": 0
    }, "config.eval_batch_size=0"),
    ({
        "epochs": 0
    }, "config.epochs=0 must be between 1 and 100000."),
    ({
        "epochs": 1000000
    }, "config.epochs=1000000 must be between"),
    ({
        "align_epochs": -1
    }, "config.align_epochs=-1 must be between 0"),
    ({
        "num_tasks": 0
    }, "config.num_tasks=0 must be between 1"),
    ({
        "num_experts": 100000
    }, "config.num_experts=100000 must be between 0 and 4096."),
    ({
        "top_k": 99
    }, "config.top_k=99"),
    ({
        "lr": math.nan
    }, "config.lr=nan must be positive and finite."),
    ({
        "lr": math.inf
    }, "config.lr=inf must be positive and finite."),
    ({
        "lr": -math.inf
    }, "config.lr=-inf must be positive and finite."),
    ({
        "lr": 0.0
    }, "config.lr=0.0 must be positive and finite."),
    ({
        "align_lr": math.inf
    }, "config.align_lr=inf must be positive"),
    ({
        "align_final_lr": math.nan
    }, "config.align_final_lr=nan must be positive"),
    ({
        "prompt_lr_multiplier": 0.0
    }, "config.prompt_lr_multiplier=0.0"),
    ({
        "router_weight": math.nan
    }, "config.router_weight=nan must be finite and not negative."),
    ({
        "prototype_weight": math.inf
    }, "config.prototype_weight=inf must be finite"),
    ({
        "weight_decay": -1.0
    }, "config.weight_decay=-1.0 must be finite and not negative."),
    ({
        "seeds": ","
    }, "config.seeds=',' names no seed"),
    ({
        "seeds": "0,a"
    }, "config.seeds='0,a' must be comma-separated integers"),
    ({
        "seeds": "0,-1"
    }, "config.seeds='0,-1': seed -1 is out of range; seeds "
     "must be integers from 0 to 2147483647 (2**31-1)."),
    ({
        "seeds": "1,2147483648"
    }, "seed 2147483648 is out of range"),
    ({
        "seeds": "1,1"
    }, "config.seeds='1,1' repeats seed 1"),
    ({
        "seed": -1
    }, "config.seed=-1: seed -1 is out of range"),
    ({
        "split_seed": -1
    }, "config.split_seed=-1 is out of range"),
    ({
        "keep_checkpoints": 0
    }, "config.keep_checkpoints=0 must be a positive integer."),
])
def test_invalid_demo_value_is_one_sentence_naming_it(overrides, expected):
  config = _load("demo")
  config.update_from_flattened_dict(overrides)
  with pytest.raises(ConfigError) as error:
    configuration.validate(config)
  message = str(error.value)
  assert expected in message and "\n" not in message, message


def test_batch_must_divide_over_devices_and_processes():
  config = _load("cifar100")
  configuration.validate_devices(config, 8, 2)
  with pytest.raises(ConfigError, match="divide by the 3 devices"):
    configuration.validate_devices(config, 3, 1)
