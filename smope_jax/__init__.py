"""smope_jax: SMoPE (sparse mixture of prompt experts) continual learning in JAX/Flax."""

__version__ = "0.2.0"  # As pyproject.toml's; tests/test_packaging.py checks.
