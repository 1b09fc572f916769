r"""Offline demo: the whole protocol in a few minutes on a laptop CPU.

    python -m smope_jax.main --config=configs/demo.py --workdir=/tmp/demo
    python -m smope_jax.main --config=configs/demo.py:method=l2p --workdir=...
    python -m smope_jax.main --config=configs/demo.py:tiny=true --workdir=...

Runs the dense warm-up, top-K training with router and prototype losses,
expert bookkeeping, classifier alignment, evaluation, checkpoints and plots
on scikit-learn's bundled 8x8 handwritten digits (upsampled to 32 px, 10
classes in 5 tasks) with a tiny ViT. Nothing is downloaded: the frozen
backbone is pre-trained first, in about a minute, on letters rendered from
matplotlib's fonts (never on digits; see smope_jax.demo_backbone), and
cached in the workdir. Its accuracies show continual learning at work; they
are NOT the paper's numbers, which need a pre-trained ViT-B/16 and the real
benchmarks. The settings below suit this tiny model, not the reference's.

`tiny=true` is the tests' quick run: a 2-block ViT of width 16 on 16 px
images, randomly initialised (nothing pre-trained), one epoch per task.
"""

from smope_jax import configuration


def get_config(arg=None):
  args = configuration.parse_arg(arg, "configs/demo.py", method="smope",
                                 tiny=False)
  config = configuration.base_config()
  config.dataset = "digits"
  config.num_classes = 10
  config.num_tasks = 5
  config.image_size = 32  # The 8x8 digits, upsampled.
  config.pretrained = "demo"  # Pre-trained on letters, cached in the workdir.
  config.model.variant = "custom"  # A tiny ViT: 16 patches + CLS.
  config.model.patch_size = 8
  config.model.hidden_size = 64
  config.model.num_layers = 4
  config.model.num_heads = 4
  config.model.mlp_dim = 128
  config.num_prompted_layers = 2
  config.num_experts = 8
  config.top_k = 2
  config.epsilon = 1.0  # Spreads the routing over the 8 experts.
  config.router_weight = 1e-3
  config.prototype_weight = 1e-3
  config.batch_size = 32
  config.eval_batch_size = 64
  config.epochs = 8
  config.freeze_steps = 4
  config.align_epochs = 10
  config.align_lr = 0.05
  config.checkpoint_every_steps = 25
  config.log_every_steps = 5
  config = configuration.use_method(config, args.method, epochs=8,
                                    batch_size=32)
  if args.tiny:  # Whatever the method's protocol, a run of seconds.
    # An evaluation batch of whole windows of 24 (HiDe-Prompt's pairing).
    config.update(pretrained="", image_size=16, epochs=1, freeze_steps=1,
                  align_epochs=1, eval_batch_size=96, progress_bar=False)
    config.model.update(patch_size=8, hidden_size=16, num_layers=2, num_heads=2,
                        mlp_dim=32)
    if args.method == "smope":  # A baseline keeps its protocol's prompts.
      # The reference's router margin, not the demo's wider one: runs on
      # different device layouts then route identically.
      config.update(num_prompted_layers=1, num_experts=4, top_k=2, epsilon=0.4)
  return config
