"""smope_jax: SMoPE (sparse mixture of prompt experts) continual learning in JAX/Flax."""

__version__ = "0.1.0"
