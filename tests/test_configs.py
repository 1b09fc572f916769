"""Every config file loads, validates, and carries the reference settings."""

import importlib.util
import os

import pytest

from smope_jax import configuration
from smope_jax.errors import ConfigError

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))), "configs")


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
    ("imagenet_r", "tasks=10"): ("imagenet_r", 10, 200, 64, 0.0025, 5e-5,
                                 1e-4, 0.5, 50, 6, "cosine", 40, 40, "sup1k"),
    ("imagenet_r", "tasks=20"): ("imagenet_r", 20, 200, 64, 0.0025, 1e-4,
                                 5e-5, 0.3, 50, 4, "cosine", 20, 20, "sup1k"),
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
  with pytest.raises(ConfigError,
                     match="cifar100.py takes method=<a string>"):
    _load("cifar100", "tasks=10")


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


def test_batch_must_divide_over_devices_and_processes():
  config = _load("cifar100")
  configuration.validate_devices(config, 8, 2)
  with pytest.raises(ConfigError, match="divide by the 3 devices"):
    configuration.validate_devices(config, 3, 1)
