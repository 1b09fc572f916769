"""Runs `smope_jax.main` on mocked TFDS data, in-process or as a script.

    python tests/e2e_runner.py --mock_examples=48 -- --config=... --workdir=...

The mock (`tfds.testing.mock_data`) only lives in the process that enters
it, so multi-device and multi-process tests start this script instead of
`python -m smope_jax.main`.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# The demo config with a tiny random ViT (nothing pre-trained).
TINY_MODEL = (
    "--config=configs/demo.py",
    "--config.pretrained=",
    "--config.image_size=16",
    "--config.model.patch_size=8",
    "--config.model.hidden_size=16",
    "--config.model.num_layers=2",
    "--config.model.num_heads=2",
    "--config.model.mlp_dim=32",
    "--config.num_prompted_layers=1",
    "--config.num_experts=4",
    "--config.top_k=2",
    # The reference's router margin, not the demo's wider one: runs on
    # different device layouts then route identically.
    "--config.epsilon=0.4",
)
# Tiny SMoPE protocol: 2 tasks of mocked CIFAR-100 (50 classes each).
TINY_FLAGS = TINY_MODEL + (
    "--config.dataset=cifar100",
    "--config.num_classes=100",
    "--config.num_tasks=2",
    "--config.batch_size=8",
    "--config.eval_batch_size=16",
    "--config.epochs=2",
    "--config.freeze_steps=2",
    "--config.align_epochs=2",
    "--config.checkpoint_every_steps=3",
    "--config.log_every_steps=1",
)
MOCK_EXAMPLES = 48
# The same tiny model on the bundled digits (no mock needed), 1 epoch.
TINY_DIGITS = TINY_MODEL + (
    "--config.batch_size=32",
    "--config.eval_batch_size=128",
    "--config.epochs=1",
    "--config.freeze_steps=1",
    "--config.align_epochs=1",
    "--config.progress_bar=False",
)


def run_main(argv: list[str], mock_examples: int = MOCK_EXAMPLES) -> int:
  """Parses `argv` as main's flags and runs it under mocked TFDS.

  Returns the exit status (0, or the status main exits with).
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from absl import flags  # pylint: disable=g-import-not-at-top
  from smope_jax import main as main_lib  # pylint: disable=g-import-not-at-top
  flags.FLAGS.unparse_flags()
  # A previous run in this process registered its --config.x override flags.
  for name in [n for n in flags.FLAGS if n.startswith("config.")]:
    delattr(flags.FLAGS, name)
  # config_flags finds the --config.x overrides in sys.argv when parsing.
  saved_argv, sys.argv = sys.argv, ["main"] + list(argv)
  try:
    flags.FLAGS(sys.argv)
  finally:
    sys.argv = saved_argv
  with tfds.testing.mock_data(num_examples=mock_examples,
                              policy=tfds.testing.MockPolicy.USE_CODE):
    try:
      main_lib.main(["main"])
    except SystemExit as e:
      return int(e.code or 0)
  return 0


if __name__ == "__main__":
  args = sys.argv[1:]
  examples = MOCK_EXAMPLES
  if args and args[0].startswith("--mock_examples="):
    examples = int(args.pop(0).split("=", 1)[1])
  if args and args[0] == "--":
    args.pop(0)
  sys.exit(run_main(args, examples))
