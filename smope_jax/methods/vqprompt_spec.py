"""VQ-Prompt as the registry knows it: its protocol and config checks.

Plain Python (no JAX), so that configs and their validation can read it
before anything heavy is imported. The model is in `vqprompt`.
"""

import math

from smope_jax import errors
from smope_jax.methods import coda_protocol
from smope_jax.methods import registry

# The benchmarks of the authors' commands, and the backbone each used.
BACKBONES = {
    "cifar100": "sup1k",
    "imagenet_r": "sup1k",
    "caltech_birds2011": "sup21k"
}
EPOCHS = 20


def apply_protocol(config, *, epochs: int, batch_size: int) -> None:
  """Sets VQ-Prompt with the protocol of the authors' commands.

  Not the CODA-Prompt protocol of the other baselines: VQ-Prompt ran in the
  SMoPE repository's training code, so the config's schedule (the
  per-step cosine with its freeze and lag, or CUB-200's per-epoch cosine),
  batch size and alignment rates stay. On top: AdamW without weight decay,
  prompts at 5x the rate of the classifier, lr 0.0025, 20 epochs per task
  on the benchmarks, classifier alignment for 10 epochs at ratio 4 (CUB-200:
  2), no warm-up, pools of 10 prompts of 8 tokens in blocks 0-4, softmax
  temperature 1 (CUB-200: 5), each benchmark's backbone, and seed 0 in the
  natural class order. Elsewhere (the demo) `epochs` and the backbone stay
  the config's, as does a random backbone (`pretrained` ""). `batch_size`,
  the baselines' batch, is not VQ-Prompt's.
  """
  del batch_size
  cub = config.dataset == "caltech_birds2011"
  benchmark = config.dataset in BACKBONES
  config.update(optimizer="adamw", weight_decay=0.0, prompt_lr_multiplier=5.0,
                schedule_delay=True, lr=0.0025,
                epochs=EPOCHS if benchmark else epochs,
                classifier_alignment=True, align_epochs=10,
                align_ratio=2 if cub else 4, dense_warmup=False,
                num_prompted_layers=5, pool_size=10, prompt_length=8,
                vq_temperature=5.0 if cub else 1.0, natural_order_seed0=True)
  if benchmark and config.pretrained:  # "" (a random backbone) stays.
    config.pretrained = BACKBONES[config.dataset]


def check(config, dims: dict) -> None:
  """Raises ConfigError for a VQ-Prompt field out of its range."""
  del dims
  coda_protocol.check_prompts(config)
  temperature = float(config.vq_temperature)
  errors.require(
      math.isfinite(temperature) and temperature > 0,
      f"config.vq_temperature={temperature} must be positive and "
      "finite.")
  for name in ("vq_commit_weight", "vq_codebook_weight"):
    value = float(config[name])
    errors.require(
        math.isfinite(value) and value >= 0,
        f"config.{name}={value} must be finite and not negative.")


SPEC = registry.MethodSpec(name="vqprompt", display_name="VQ-Prompt",
                           method_class="smope_jax.methods.vqprompt:VQPrompt",
                           check=check, apply_protocol=apply_protocol)
