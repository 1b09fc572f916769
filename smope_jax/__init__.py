"""smope_jax: SMoPE (sparse mixture of prompt experts) and the prompt methods
it is compared with, for continual learning in JAX/Flax."""

__version__ = "0.2.0"  # As pyproject.toml's; tests/test_packaging.py checks.
