"""`python -m smope_jax.main` on mocked TFDS data, as a script.

    python tests/e2e_runner.py --mock_examples=48 -- --config=... --workdir=...

The mock (`tfds.testing.mock_data`) only lives in the process that enters
it, so tests of several devices or processes, or of a killed run, start
this script instead of `python -m smope_jax.main`.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# pylint: disable=g-import-not-at-top,wrong-import-position
from smope_jax import main
from tests import helpers

if __name__ == "__main__":
  args = sys.argv[1:]
  examples = helpers.MOCK_EXAMPLES
  if args and args[0].startswith("--mock_examples="):
    examples = int(args.pop(0).split("=", 1)[1])
  if args and args[0] == "--":
    args.pop(0)
  sys.argv = [sys.argv[0], *args]
  with helpers.mocked_tfds(examples):
    main.run()
