"""Vision Transformer with SMoPE prompt experts in its first blocks.

Parameter names follow the public Google ViT checkpoints
(`Transformer/encoderblock_{i}/MultiHeadDotProductAttention_1/query/...`), so
converted weights load without renaming. The prompt experts live beside the
backbone under `prompts/{keys,values}` with shape (L, H, E, d), and the
classifier under `head`.
"""

import math
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from smope_jax.models import prompt_attention as pa

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

  @nn.compact
  def __call__(self, x):
    hidden = x.shape[-1]
    x = nn.Dense(self.mlp_dim, dtype=self.dtype, name="Dense_0")(x)
    x = gelu_exact(x)
    return nn.Dense(hidden, dtype=self.dtype, name="Dense_1")(x)


class MultiHeadDotProductAttention(nn.Module):
  """Attention with optional prompt experts; qkv kernels laid out (D, H, d)."""
  num_heads: int
  top_k: int = 5
  dtype: Dtype = jnp.float32
  fused: bool = False

  @nn.compact
  def __call__(self, x, experts=None, eta=None, mode="plain"):
    hidden = x.shape[-1]
    head_dim = hidden // self.num_heads
    proj = lambda name: nn.DenseGeneral(  # noqa: E731
        (self.num_heads, head_dim), dtype=self.dtype, name=name)
    query, key, value = proj("query")(x), proj("key")(x), proj("value")(x)
    routing = None
    if experts is None or mode == "plain":
      out = pa.plain_attention(query, key, value, fused=self.fused)
    else:
      logits, values, scores, selected = pa.route(
          query, experts[0], experts[1], eta, self.top_k, mode)
      out = pa.prompted_attention(query, key, value, logits, values,
                                  fused=self.fused)
      routing = (scores, selected)
    out = nn.DenseGeneral(hidden, axis=(-2, -1), dtype=self.dtype,
                          name="out")(out)
    return out, routing


class Encoder1DBlock(nn.Module):
  """Pre-LayerNorm transformer block."""
  num_heads: int
  mlp_dim: int
  top_k: int = 5
  dtype: Dtype = jnp.float32
  fused: bool = False

  @nn.compact
  def __call__(self, x, experts=None, eta=None, mode="plain"):
    y = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype, name="LayerNorm_0")(x)
    y, routing = MultiHeadDotProductAttention(
        self.num_heads, self.top_k, self.dtype, self.fused,
        name="MultiHeadDotProductAttention_1")(y, experts, eta, mode)
    x = x + y
    y = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype, name="LayerNorm_2")(x)
    y = MlpBlock(self.mlp_dim, self.dtype, name="MlpBlock_3")(y)
    return x + y, routing


class PromptExperts(nn.Module):
  """The learnable expert keys and values P^K, P^V, uniform on [0, 1)."""
  num_layers: int
  num_heads: int
  num_experts: int
  head_dim: int

  @nn.compact
  def __call__(self):
    shape = (self.num_layers, self.num_heads, self.num_experts, self.head_dim)
    keys = self.param("keys", nn.initializers.uniform(1.0), shape, jnp.float32)
    values = self.param("values", nn.initializers.uniform(1.0), shape,
                        jnp.float32)
    return keys, values


class AddPositionEmbs(nn.Module):
  """Learned position embedding added to the token sequence."""

  @nn.compact
  def __call__(self, x):
    pos = self.param("pos_embedding", nn.initializers.normal(stddev=0.02),
                     (1,) + x.shape[1:])
    return x + pos.astype(x.dtype)


class Encoder(nn.Module):
  """Blocks 0..num_layers-1; the first `len(expert keys)` carry prompts."""
  num_layers: int
  num_heads: int
  mlp_dim: int
  top_k: int = 5
  dtype: Dtype = jnp.float32
  fused: bool = False

  @nn.compact
  def __call__(self, x, experts=None, eta=None, mode="plain"):
    x = AddPositionEmbs(name="posembed_input")(x)
    num_prompted = 0 if experts is None else experts[0].shape[0]
    scores, selected = [], []
    for i in range(self.num_layers):
      prompted = mode != "plain" and i < num_prompted
      x, routing = Encoder1DBlock(
          self.num_heads, self.mlp_dim, self.top_k, self.dtype, self.fused,
          name=f"encoderblock_{i}")(
              x,
              (experts[0][i], experts[1][i]) if prompted else None,
              eta[i] if prompted and eta is not None else None,
              mode if prompted else "plain")
      if routing is not None:
        scores.append(routing[0])
        selected.append(routing[1])
    x = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype, name="encoder_norm")(x)
    if not scores:
      return x, None
    return x, (jnp.stack(scores), jnp.stack(selected))


class SMoPEViT(nn.Module):
  """ViT classifier whose blocks 0..L-1 carry sparse prompt experts.

  Call with images (B, S, S, 3) in [0, 1] and the expert state
  `{'counts': int32 (L, H, E), 'frequent': bool (L, H, E)}` (needed in the
  `train` and `eval` modes). `mode` is one of `plain` (no prompts), `dense`
  (all experts, the first-task warm-up), `train` (top-K with the training
  noise rule) and `eval` (top-K with the inference rule; `exclude_unused`
  False routes as the reference's published evaluation, see
  `prompt_attention.selection_penalty`).

  Returns a dict: `logits` (B, C) and `pre_logits` (B, D) in float32, and for
  prompted modes `scores` (L, B, H, E) float32 clean expert scores and
  `selected` (L, B, H, K) int32 chosen experts.
  """
  num_classes: int
  patch_size: int = 16
  hidden_size: int = 768
  num_layers: int = 12
  num_heads: int = 12
  mlp_dim: int = 3072
  num_prompted_layers: int = 6
  num_experts: int = 25
  top_k: int = 5
  epsilon: float = 0.0
  inference_penalty: float = 2.0
  dtype: Dtype = jnp.float32
  fused_attention: bool = False

  @nn.compact
  def __call__(self, images, expert_state: Optional[dict] = None, *,
               mode: str = "eval", exclude_unused: bool = True):
    if mode not in pa.MODES:
      raise ValueError(f"mode must be one of {pa.MODES}, got {mode!r}")
    head_dim = self.hidden_size // self.num_heads
    x = nn.Conv(self.hidden_size, (self.patch_size, self.patch_size),
                strides=(self.patch_size, self.patch_size), padding="VALID",
                dtype=self.dtype, name="embedding")(images.astype(self.dtype))
    batch, height, width, channels = x.shape
    x = jnp.reshape(x, (batch, height * width, channels))
    cls = self.param("cls", nn.initializers.zeros, (1, 1, channels))
    x = jnp.concatenate(
        [jnp.broadcast_to(cls, (batch, 1, channels)).astype(x.dtype), x], 1)

    experts = eta = None
    if self.num_prompted_layers > 0:
      experts = PromptExperts(self.num_prompted_layers, self.num_heads,
                              self.num_experts, head_dim, name="prompts")()
      if mode in ("train", "eval"):
        if expert_state is None:
          raise ValueError(f"mode {mode!r} needs the expert state")
        eta = pa.selection_penalty(expert_state, mode, self.epsilon,
                                   self.inference_penalty, exclude_unused)

    x, routing = Encoder(self.num_layers, self.num_heads, self.mlp_dim,
                         self.top_k, self.dtype, self.fused_attention,
                         name="Transformer")(x, experts, eta, mode)
    pre_logits = x[:, 0].astype(jnp.float32)
    # PyTorch's nn.Linear initialisation, as in the reference classifier.
    bound = self.hidden_size ** -0.5
    logits = nn.Dense(self.num_classes, dtype=jnp.float32, name="head",
                      kernel_init=symmetric_uniform(bound),
                      bias_init=symmetric_uniform(bound))(pre_logits)
    out = {"logits": logits, "pre_logits": pre_logits}
    if routing is not None:
      out["scores"], out["selected"] = routing
    return out
