"""The protocol behind the baselines' published numbers (the CODA-Prompt
code), and the checks their key-value prompts share. JAX-free."""

from smope_jax import errors


def apply(config, *, epochs: int, batch_size: int, pool_size: int,
          prompt_length: int, prompted_layers: int) -> None:
  """Sets the CODA-Prompt protocol with a baseline's prompt sizes.

  Adam at 1e-3 for prompts and classifier alike, a per-epoch cosine
  stepped at each epoch's start (no lag), `epochs` epochs of `batch_size`,
  no classifier alignment, and the ImageNet-1k backbone of that code
  (`sup1k_coda`, the augreg checkpoint before SMoPE's `augreg2`).
  `prompt_lr_multiplier` and `classifier_alignment` switch on the SMoPE
  repository's protocol (5x the rate for prompts; alignment with its
  defaults of 10 epochs, ratio 4).
  """
  if config.pretrained == "sup1k":
    config.pretrained = "sup1k_coda"
  config.update(optimizer="adam", lr=1e-3, weight_decay=0.0,
                schedule="epoch_cosine", schedule_delay=False, freeze_steps=0,
                iters_per_epoch=0, epochs=epochs, batch_size=batch_size,
                prompt_lr_multiplier=1.0, classifier_alignment=False,
                align_epochs=10, align_ratio=4, dense_warmup=False, top_k=5,
                pool_size=pool_size, prompt_length=prompt_length,
                num_prompted_layers=prompted_layers)


def check_prompts(config, *, min_pool: int = 1) -> None:
  """Key-value prompts need an even length; the pool at least `min_pool`."""
  errors.require(
      config.prompt_length >= 2 and config.prompt_length % 2 == 0,
      f"config.prompt_length={config.prompt_length} must be even: "
      "half keys, half values.")
  errors.require(config.pool_size >= min_pool,
                 f"config.pool_size={config.pool_size} must be positive.")
