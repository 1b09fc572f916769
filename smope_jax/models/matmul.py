"""The model's matrix products in bfloat16, the same on every platform.

`config.matmul_precision="bfloat16"` computes every matrix product of the
model (the patch embedding, the Dense layers, the attention einsums, the
classifier) as a TPU's DEFAULT precision computes a float32 product: both
operands rounded to bfloat16, the products summed in float32. Storage and
everything else stay in the model's dtype. XLA ignores precision settings
on CPUs and reads 'default' as TF32 on GPUs, so the rounding is written out
here and gives the same numbers on a laptop as on an accelerator; on a TPU
or a GPU it runs as one bfloat16 pass of the matrix units.
"""

import jax
import jax.numpy as jnp


def _rounded(*operands):
  return [jnp.asarray(x).astype(jnp.bfloat16) for x in operands]


def dot_general(lhs, rhs, dimension_numbers, precision=None,
                preferred_element_type=None, **kwargs):
  """`lax.dot_general` of bfloat16-rounded operands, summed in float32.

  Returns the operands' promoted dtype (float32 for float32 storage), so a
  Flax layer given it keeps its usual output dtype.
  """
  del precision, preferred_element_type
  dtype = jnp.result_type(lhs, rhs)
  out = jax.lax.dot_general(*_rounded(lhs, rhs), dimension_numbers,
                            preferred_element_type=jnp.float32, **kwargs)
  return out.astype(dtype)


def conv_general_dilated(lhs, rhs, *args, precision=None,
                         preferred_element_type=None, **kwargs):
  """`lax.conv_general_dilated` with the rounding of `dot_general`."""
  del precision, preferred_element_type
  dtype = jnp.result_type(lhs, rhs)
  out = jax.lax.conv_general_dilated(*_rounded(lhs, rhs), *args,
                                     preferred_element_type=jnp.float32,
                                     **kwargs)
  return out.astype(dtype)


def layer_kwargs(bfloat16: bool) -> dict:
  """Arguments of a Flax Dense/DenseGeneral layer: {} keeps Flax's default."""
  return {"dot_general": dot_general} if bfloat16 else {}


def conv_kwargs(bfloat16: bool) -> dict:
  """Arguments of a Flax Conv layer: {} keeps Flax's default."""
  return {"conv_general_dilated": conv_general_dilated} if bfloat16 else {}


def einsum(spec: str, a: jax.Array, b: jax.Array, *, bfloat16: bool = False,
           precision=None) -> jax.Array:
  """`jnp.einsum` of two operands, or its bfloat16-products form.

  `precision` applies to the plain form only (e.g. HIGHEST for a product
  that must stay float32 whatever the context's default).
  """
  if not bfloat16:
    return jnp.einsum(spec, a, b, precision=precision)
  dtype = jnp.result_type(a, b)
  return jnp.einsum(spec, *_rounded(a, b),
                    preferred_element_type=jnp.float32).astype(dtype)
