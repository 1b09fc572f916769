"""Vision Transformer whose blocks take a prompt method's prefixes.

Parameter names follow the public Google ViT checkpoints
(`Transformer/encoderblock_{i}/MultiHeadDotProductAttention_1/query/...`), so
converted weights load without renaming. A method's prompt parameters live
beside the backbone under `prompts/...` (see `smope_jax.methods`), and the
classifier under `head`.
"""

import functools
import math
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from smope_jax.models import attention
from smope_jax.models import matmul

Dtype = Any


def gelu_exact(x: jax.Array) -> jax.Array:
  """The erf GELU of the reference checkpoints (not the tanh approximation).

  Written as PyTorch's x * (1 + erf(x / sqrt 2)) / 2: XLA vectorises erf as
  one rational polynomial, while `jax.nn.gelu(approximate=False)` goes
  through erfc with two branches, exp and divisions. Same function; the
  results differ by at most 2.5e-7 * max(1, |x|) in float32.
  """
  return x * 0.5 * (1.0 + jax.lax.erf(x * math.sqrt(0.5)))


def symmetric_uniform(bound: float):
  """Initializer drawing uniformly from [-bound, bound)."""

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


class MlpBlock(nn.Module):
  mlp_dim: int
  dtype: Dtype = jnp.float32
  bfloat16_products: bool = False

  @nn.compact
  def __call__(self, x):
    hidden = x.shape[-1]
    products = matmul.layer_kwargs(self.bfloat16_products)
    x = nn.Dense(self.mlp_dim, dtype=self.dtype, name="Dense_0", **products)(x)
    x = gelu_exact(x)
    return nn.Dense(hidden, dtype=self.dtype, name="Dense_1", **products)(x)


def mean_query_float32(tokens: jax.Array, projection: dict) -> jax.Array:
  """The mean projected query of the tokens in full float32, (B, 1, H, d).

  The projection is affine, so the mean of the projected tokens is the
  projection of their mean: one (B, D) x (D, H, d) product, at HIGHEST
  precision whatever the model's dtype and precision.
  """
  mean = jnp.mean(tokens.astype(jnp.float32), axis=1)  # (B, D)
  query = jnp.einsum("bD,Dhd->bhd", mean,
                     projection["kernel"].astype(jnp.float32),
                     precision=jax.lax.Precision.HIGHEST)
  return (query + projection["bias"].astype(jnp.float32))[:, None]


class MultiHeadDotProductAttention(nn.Module):
  """Attention over an optional prefix; qkv kernels laid out (D, H, d).

  With `float32_routing` the prefix sees `mean_query_float32` of the block's
  input instead of its projected queries (the methods that route by the
  block's queries use only their mean).
  """
  num_heads: int
  dtype: Dtype = jnp.float32
  fused: bool = False
  bfloat16_products: bool = False
  float32_routing: bool = False

  @nn.compact
  def __call__(self, x, prefix_fn: Optional[Callable] = None):
    """Returns the output and the prefix's aux (None without a prefix).

    `prefix_fn(query)` gives the block's `attention.Prefix` (or None) from
    its projected queries (B, N, H, d).
    """
    hidden = x.shape[-1]
    head_dim = hidden // self.num_heads
    products = matmul.layer_kwargs(self.bfloat16_products)
    proj = lambda name: nn.DenseGeneral(  # noqa: E731
        (self.num_heads, head_dim), dtype=self.dtype, name=name, **products)
    query_proj = proj("query")
    query, key, value = query_proj(x), proj("key")(x), proj("value")(x)
    prefix = None
    if prefix_fn is not None:
      prefix = prefix_fn(
          mean_query_float32(x, query_proj.variables["params"]) if self.
          float32_routing else query)
    out = attention.prefix_attention(query, key, value, prefix,
                                     fused=self.fused,
                                     bfloat16_products=self.bfloat16_products)
    out = nn.DenseGeneral(hidden, axis=(-2, -1), dtype=self.dtype, name="out",
                          **products)(out)
    return out, None if prefix is None else prefix.aux


class Encoder1DBlock(nn.Module):
  """Pre-LayerNorm transformer block."""
  num_heads: int
  mlp_dim: int
  dtype: Dtype = jnp.float32
  fused: bool = False
  bfloat16_products: bool = False
  float32_routing: bool = False

  @nn.compact
  def __call__(self, x, prefix_fn=None):
    y = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype, name="LayerNorm_0")(x)
    y, aux = MultiHeadDotProductAttention(
        self.num_heads, self.dtype, self.fused,
        bfloat16_products=self.bfloat16_products,
        float32_routing=self.float32_routing,
        name="MultiHeadDotProductAttention_1")(y, prefix_fn)
    x = x + y
    y = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype, name="LayerNorm_2")(x)
    y = MlpBlock(self.mlp_dim, self.dtype, self.bfloat16_products,
                 name="MlpBlock_3")(y)
    return x + y, aux


class AddPositionEmbs(nn.Module):
  """Learned position embedding added to the token sequence."""

  @nn.compact
  def __call__(self, x):
    pos = self.param("pos_embedding", nn.initializers.normal(stddev=0.02),
                     (1,) + x.shape[1:])
    return x + pos.astype(x.dtype)


class Encoder(nn.Module):
  """The blocks and the final LayerNorm."""
  num_layers: int
  num_heads: int
  mlp_dim: int
  dtype: Dtype = jnp.float32
  fused: bool = False
  bfloat16_products: bool = False
  float32_routing: bool = False

  @nn.compact
  def __call__(self, x, prefix_for: Optional[Callable] = None):
    """Returns the encoded tokens and {block: aux} of the prompted blocks.

    `prefix_for(i)` gives block i's `prefix_fn` (see the attention).
    """
    x = AddPositionEmbs(name="posembed_input")(x)
    aux = {}
    for i in range(self.num_layers):
      x, block_aux = Encoder1DBlock(
          self.num_heads, self.mlp_dim, self.dtype, self.fused,
          self.bfloat16_products, self.float32_routing,
          name=f"encoderblock_{i}")(
              x, prefix_for(i) if prefix_for is not None else None)
      if block_aux is not None:
        aux[i] = block_aux
    x = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype, name="encoder_norm")(x)
    return x, aux


class VisionTransformer(nn.Module):
  """ViT classifier over frozen features, with a method's prompts.

  Call with images (B, S, S, 3) in [0, 1], the method's context (see
  `Method.context`) and a mode: `plain` (no prompts), `dense` (SMoPE's
  warm-up: all experts), `train` or `eval` (the method's training and
  inference rules). A method whose prompts need a query first runs the
  frozen backbone without prompts: its final-LN CLS, without gradient.

  Returns a dict: `logits` (B, C) and `pre_logits` (B, D) in float32, plus
  the method's own outputs in prompted modes (e.g. SMoPE's `scores`
  (L, B, H, E) and `selected` (L, B, H, K)).

  `bfloat16_products` computes every matrix product as `models.matmul`
  says; `float32_routing` gives the prompts each block's mean query in full
  float32 (see `mean_query_float32`), whatever `dtype` and the products.
  """
  num_classes: int
  patch_size: int = 16
  hidden_size: int = 768
  num_layers: int = 12
  num_heads: int = 12
  mlp_dim: int = 3072
  dtype: Dtype = jnp.float32
  fused_attention: bool = False
  bfloat16_products: bool = False
  float32_routing: bool = False
  prompts: Optional[nn.Module] = None

  @nn.compact
  def __call__(self, images, context=None, *, mode: str = "eval"):
    if mode not in ("plain", "dense", "train", "eval"):
      raise ValueError(f"mode must be plain, dense, train or eval, got "
                       f"{mode!r}")
    x = nn.Conv(self.hidden_size, (self.patch_size, self.patch_size),
                strides=(self.patch_size, self.patch_size), padding="VALID",
                dtype=self.dtype, name="embedding",
                **matmul.conv_kwargs(self.bfloat16_products))(images.astype(
                    self.dtype))
    batch, height, width, channels = x.shape
    x = jnp.reshape(x, (batch, height * width, channels))
    cls = self.param("cls", nn.initializers.zeros, (1, 1, channels))
    x = jnp.concatenate(
        [jnp.broadcast_to(cls, (batch, 1, channels)).astype(x.dtype), x], 1)

    encoder = Encoder(self.num_layers, self.num_heads, self.mlp_dim, self.dtype,
                      self.fused_attention, self.bfloat16_products,
                      self.float32_routing, name="Transformer")
    prompted = self.prompts is not None and mode != "plain"
    query = prefix_for = None
    if prompted:
      if self.prompts.uses_query(context, mode):
        plain, _ = encoder(x)
        query = jax.lax.stop_gradient(plain[:, 0].astype(jnp.float32))
      prefix_for = lambda i: functools.partial(  # noqa: E731
          self.prompts.prefix, i, query=query, context=context, mode=mode)
    x, aux = encoder(x, prefix_for)
    pre_logits = x[:, 0].astype(jnp.float32)
    # PyTorch's nn.Linear initialisation, as in the reference classifier.
    bound = self.hidden_size**-0.5
    logits = nn.Dense(self.num_classes, dtype=jnp.float32, name="head",
                      kernel_init=symmetric_uniform(bound),
                      bias_init=symmetric_uniform(bound),
                      **matmul.layer_kwargs(self.bfloat16_products))(pre_logits)
    out = {"logits": logits, "pre_logits": pre_logits}
    if prompted:
      out.update(
          self.prompts.outputs(aux, query=query, context=context, mode=mode))
    return out
