"""The baselines' rules (L2P++, DualPrompt, CODA-Prompt) on tiny inputs.

Every rule is checked against a NumPy computation written from the rule
itself: hand-worked values where they fit on a page, float64 double loops
otherwise, and a float64 prompted ViT (prefix keys and values in front of
each prompted block's own, one softmax over both) for whole forwards.
Parameter counts, the SMoPE regression and the train steps are in
test_baselines_model.py.
"""

import functools

import chex
import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from smope_jax.methods import base
from smope_jax.methods import codaprompt
from smope_jax.methods import dualprompt
from smope_jax.methods import l2p
from smope_jax.models import attention
from smope_jax.models import vit
from tests import numpy_vit

# Tiny ViT: 8 x 8 images in 4 x 4 patches (N = 5 tokens), 4 blocks.
B, S, PATCH, D, LAYERS, H, MLP, C = 4, 8, 4, 16, 4, 2, 32, 6
HD = D // H
DIMS = dict(patch_size=PATCH, hidden_size=D, num_layers=LAYERS, num_heads=H,
            mlp_dim=MLP)
TINY = dict(num_classes=C, **DIMS)

# ---------------------------------------------------------------------------
# NumPy references.


def np_normalize(x, axis=-1):
  """PyTorch's F.normalize: x / max(|x|, 1e-12)."""
  norm = np.sqrt(np.sum(x * x, axis=axis, keepdims=True))
  return x / np.maximum(norm, 1e-12)


def np_top_k(scores, k):
  """Indices of the k largest per row, descending, ties to the lower index."""
  return np.argsort(-scores, axis=-1, kind="stable")[..., :k]


def np_prefix_attention(q, k, v, pk, pv):
  """(B, H, N, d) queries over [prefix ; tokens] in one softmax, float64."""
  scale = q.shape[-1]**-0.5
  logits = np.concatenate(
      [q @ np.swapaxes(pk, -1, -2), q @ np.swapaxes(k, -1, -2)], -1) * scale
  weights = np.exp(logits - logits.max(-1, keepdims=True))
  weights /= weights.sum(-1, keepdims=True)
  return weights @ np.concatenate([pv, v], -2)


def np_heads(tokens):
  """(B, P, D) -> (B, H, P, d), head h taking dims h*d..(h+1)*d."""
  b, p, _ = tokens.shape
  return tokens.reshape(b, p, H, HD).transpose(0, 2, 1, 3)


# The reference ViT's pieces (pre-LN blocks, erf GELU, patch embedding).
# pylint: disable=protected-access
_to64, _patches = numpy_vit._to64, numpy_vit._patches
_layer_norm, _gelu = numpy_vit._layer_norm, numpy_vit._gelu
# pylint: enable=protected-access


def np_prompted_forward(params, images, prefixes):
  """Pre-logits and logits of the ViT with {block: (Pk, Pv)} prefixes.

  Pk, Pv are (B, P, D) raw prompt tokens: no LayerNorm, no projection.
  """
  p = _to64(params)
  x = _patches(np.asarray(images, np.float64), p["embedding"]["kernel"],
               p["embedding"]["bias"])
  x = np.concatenate([np.broadcast_to(p["cls"], (x.shape[0], 1, D)), x], 1)
  t = p["Transformer"]
  x = x + t["posembed_input"]["pos_embedding"]
  for i in range(LAYERS):
    blk = t[f"encoderblock_{i}"]
    a = blk["MultiHeadDotProductAttention_1"]
    y = _layer_norm(x, blk["LayerNorm_0"])
    q, k, v = (np.einsum("bnd,dhe->bhne", y, a[n]["kernel"]) +
               a[n]["bias"][None, :, None] for n in ("query", "key", "value"))
    if i in prefixes:
      pk, pv = (np_heads(np.asarray(z, np.float64)) for z in prefixes[i])
      out = np_prefix_attention(q, k, v, pk, pv)
    else:
      out = np_prefix_attention(q, k, v, q[:, :, :0], v[:, :, :0])
    x = x + np.einsum("bhne,hed->bnd", out,
                      a["out"]["kernel"]) + a["out"]["bias"]
    mlp = blk["MlpBlock_3"]
    y = _layer_norm(x, blk["LayerNorm_2"])
    y = _gelu(y @ mlp["Dense_0"]["kernel"] + mlp["Dense_0"]["bias"])
    x = x + y @ mlp["Dense_1"]["kernel"] + mlp["Dense_1"]["bias"]
  pre_logits = _layer_norm(x, t["encoder_norm"])[:, 0]
  return pre_logits, pre_logits @ p["head"]["kernel"] + p["head"]["bias"]


def np_query(params, images):
  """The baselines' query: final-LN CLS of the prompt-free backbone."""
  return numpy_vit.forward(params, images)[0]


def np_key_value(prompts):
  """(B, ..., L, D) -> ((B, *L/2, D) key tokens, value tokens), float64."""
  prompts = np.asarray(prompts, np.float64)
  half = prompts.shape[-2] // 2
  batch = prompts.shape[0]
  return (prompts[..., :half, :].reshape(batch, -1, D),
          prompts[..., half:, :].reshape(batch, -1, D))


# ---------------------------------------------------------------------------
# The tiny model and its parameters.


def _images(seed=0, batch=B):
  rng = np.random.default_rng(seed)
  return jnp.asarray(rng.uniform(size=(batch, S, S, 3)), jnp.float32)


def _fill(path, leaf, rng):
  """Prompts uniform [0, 1) (every row, used or not); the rest small."""
  name = "/".join(path)
  if name.startswith("prompts/"):
    x = rng.uniform(size=leaf.shape)
  elif name.endswith("scale"):
    x = 1.0 + 0.1 * rng.normal(size=leaf.shape)
  elif name.endswith("kernel"):
    fan_in = H * HD if "/out/" in name else int(np.prod(leaf.shape[:-1]))
    x = rng.normal(size=leaf.shape) / np.sqrt(fan_in)
  else:
    x = 0.1 * rng.normal(size=leaf.shape)
  return jnp.asarray(x, leaf.dtype)


def _params(model, context, seed=0):
  shapes = jax.eval_shape(
      lambda: model.init(jax.random.key(0), _images(), context, mode="train"))
  rng = np.random.default_rng(seed)
  flat = flax.traverse_util.flatten_dict(shapes["params"])
  return flax.traverse_util.unflatten_dict({
      path: _fill(path, leaf, rng) for path, leaf in sorted(flat.items())
  })


def _with(params, path, value):
  """A copy of `params` with the leaf at '/'-joined `path` replaced."""
  flat = flax.traverse_util.flatten_dict(params)
  flat[tuple(path.split("/"))] = jnp.asarray(value, jnp.float32)
  return flax.traverse_util.unflatten_dict(flat)


def _apply(model, params, context, mode):
  return model.apply({"params": params}, _images(), context, mode=mode)


def _grads(model, params, context, *losses_of_outputs):
  """The training-mode outputs, and the gradient of each loss of them
  w.r.t. ALL parameters (backbone included), in one compiled function."""
  forward = lambda p: model.apply(  # noqa: E731
      {"params": p}, _images(), context, mode="train")

  def grads(p):
    return (forward(p),) + tuple(
        jax.grad(lambda p, f=f: f(forward(p)))(p) for f in losses_of_outputs)

  return jax.jit(grads)(params)


def _ce(out):
  labels = jnp.arange(B) % C
  return -jnp.mean(jax.nn.log_softmax(out["logits"])[jnp.arange(B), labels])


def _nonzero_rows(grad):
  """Boolean per leading-axis row: does any entry of the row get gradient."""
  g = np.abs(np.asarray(grad))
  return g.reshape(g.shape[0], -1).max(-1) > 0


def _assert_close(got, want, tol=2e-5):
  np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=tol,
                             atol=tol)


# ---------------------------------------------------------------------------
# The prefix: key/value split, head split, and the attention kernel.


def test_key_value_prefix_splits_keys_values_and_heads_by_hand():
  # One prompt of 4 tokens (2 keys, 2 values) of width 4, 2 heads of 2 dims:
  # token t, dim c holds 10 t + c.
  prompt = 10.0 * np.arange(4)[:, None] + np.arange(4)[None, :]
  prefix = base.key_value_prefix(jnp.asarray(prompt[None]), num_heads=2,
                                 aux="kept")
  chex.assert_shape((prefix.keys, prefix.values), (1, 2, 2, 2))
  chex.assert_type((prefix.keys, prefix.values), jnp.float32)
  assert prefix.bias is None and prefix.aux == "kept"
  np.testing.assert_array_equal(prefix.keys[0, 0], [[0, 1], [10, 11]])
  np.testing.assert_array_equal(prefix.keys[0, 1], [[2, 3], [12, 13]])
  np.testing.assert_array_equal(prefix.values[0, 0], [[20, 21], [30, 31]])
  np.testing.assert_array_equal(prefix.values[0, 1], [[22, 23], [32, 33]])


def test_key_value_prefix_lays_selected_prompts_end_to_end():
  # Two selected prompts (B, k=2, L=4, D=4): keys are prompt 0's tokens 0-1
  # then prompt 1's tokens 0-1; values their tokens 2-3, in the same order.
  prompts = (100.0 * np.arange(2)[:, None, None] +
             10.0 * np.arange(4)[None, :, None] + np.arange(4)[None, None, :])
  prefix = base.key_value_prefix(jnp.asarray(prompts[None]), num_heads=2)
  chex.assert_shape((prefix.keys, prefix.values), (1, 2, 4, 2))
  np.testing.assert_array_equal(prefix.keys[0, 0],
                                [[0, 1], [10, 11], [100, 101], [110, 111]])
  np.testing.assert_array_equal(prefix.keys[0, 1],
                                [[2, 3], [12, 13], [102, 103], [112, 113]])
  np.testing.assert_array_equal(prefix.values[0, 1],
                                [[22, 23], [32, 33], [122, 123], [132, 133]])


def test_kernel_with_prefix_keys_is_one_softmax_over_prefix_and_tokens():
  """Fused or not, with an additive prefix bias or without."""
  batch, tokens, heads, dim, slots = 2, 5, 2, 4, 3
  rng = np.random.default_rng(1)
  q, k, v = (rng.normal(size=(batch, tokens, heads, dim)) for _ in range(3))
  pk, pv = (rng.normal(size=(batch, heads, slots, dim)) for _ in range(2))
  bias = rng.normal(size=(batch, heads, slots))
  as32 = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
  for with_bias in (False, True):
    want = np.zeros((batch, tokens, heads, dim))
    scale = dim**-0.5
    for b in range(batch):
      for h in range(heads):
        logits = np.concatenate([
            q[b, :, h] @ pk[b, h].T * scale, q[b, :, h] @ k[b, :, h].T * scale
        ], -1)
        if with_bias:
          logits[:, :slots] += bias[b, h]
        weights = np.exp(logits - logits.max(-1, keepdims=True))
        weights /= weights.sum(-1, keepdims=True)
        want[b, :, h] = weights @ np.concatenate([pv[b, h], v[b, :, h]])
    prefix = attention.Prefix(values=as32(pv), keys=as32(pk),
                              bias=as32(bias) if with_bias else None)
    for fused in (False, True):
      got = attention.prefix_attention(as32(q), as32(k), as32(v), prefix,
                                       fused=fused)
      chex.assert_shape(got, (batch, tokens, heads, dim))
      chex.assert_type(got, jnp.float32)
      _assert_close(got, want, 1e-5)


def test_kernel_without_prefix_is_plain_attention():
  rng = np.random.default_rng(2)
  q, k, v = (rng.normal(size=(2, 5, 2, 4)) for _ in range(3))
  got = attention.prefix_attention(
      *(jnp.asarray(x, jnp.float32) for x in (q, k, v)))
  t = lambda x: x.transpose(0, 2, 1, 3)  # noqa: E731
  want = np_prefix_attention(t(q), t(k), t(v), t(q)[:, :, :0], t(v)[:, :, :0])
  _assert_close(got, t(want), 1e-5)


# ---------------------------------------------------------------------------
# L2P++.


def test_normalize_is_torch_f_normalize():
  x = jnp.array([[3.0, 4.0], [0.0, 0.0], [1e-13, 0.0]])
  got = np.asarray(base.normalize(x))
  np.testing.assert_allclose(got[0], [0.6, 0.8], rtol=1e-6)
  np.testing.assert_array_equal(got[1], [0.0, 0.0])  # No NaN at zero.
  np.testing.assert_allclose(got[2], [0.1, 0.0], rtol=1e-5)  # eps clamps.


def _l2p_hand_module(top_k=2):
  return l2p.L2PPrompts(num_layers=1, pool_size=5, length=4, hidden_size=4,
                        num_heads=2, top_k=top_k)


# Queries and keys whose cosines are worked out by hand (width 4).
HAND_QUERY = np.array([[3.0, 4.0, 0.0, 0.0], [0.0, 0.0, 0.0, -2.0]])
HAND_KEYS = np.array([[1.0, 0.0, 0.0, 0.0], [0.0, 2.0, 0.0, 0.0],
                      [0.0, 0.0, 5.0, 0.0], [1.0, 1.0, 0.0, 0.0],
                      [0.0, 0.0, 0.0, -1.0]])
# cos = normalize(q) . normalize(K): sample 0 -> (0.6, 0.8, 0, 7 / (5 sqrt 2),
# 0); sample 1 -> (0, 0, 0, 0, 1).
HAND_COSINE = np.array([[0.6, 0.8, 0.0, 7.0 / (5.0 * np.sqrt(2.0)), 0.0],
                        [0.0, 0.0, 0.0, 0.0, 1.0]])
# Pool entry m, token t, dim c holds 100 m + 10 t + c.
HAND_POOL = (100.0 * np.arange(5)[:, None, None] +
             10.0 * np.arange(4)[None, :, None] + np.arange(4)[None, None, :])


def test_l2p_cosine_top_k_and_prefix_by_hand():
  module = _l2p_hand_module()
  params = {
      "pool": jnp.asarray(HAND_POOL[None], jnp.float32),
      "keys": jnp.asarray(HAND_KEYS[None], jnp.float32)
  }
  prefix = module.apply({"params": params}, 0, None,
                        query=jnp.asarray(HAND_QUERY, jnp.float32),
                        context=None, mode="train", method="prefix")
  chex.assert_shape(prefix.aux["similarity"], (2, 5))
  chex.assert_shape(prefix.aux["chosen"], (2, 2))
  chex.assert_type(prefix.aux["chosen"], jnp.int32)
  np.testing.assert_allclose(prefix.aux["similarity"], HAND_COSINE, rtol=1e-6,
                             atol=1e-7)
  # Sample 0: 0.99 (entry 3) then 0.8 (entry 1). Sample 1: entry 4, then a
  # four-way tie at 0 that goes to the lowest index, entry 0.
  np.testing.assert_array_equal(prefix.aux["chosen"], [[3, 1], [4, 0]])
  # 2 prompts x 2 key tokens, laid end to end; head h takes dims 2h, 2h+1.
  chex.assert_shape((prefix.keys, prefix.values), (2, 2, 4, 2))
  np.testing.assert_array_equal(
      prefix.keys[0, 0], [[300, 301], [310, 311], [100, 101], [110, 111]])
  np.testing.assert_array_equal(
      prefix.keys[0, 1], [[302, 303], [312, 313], [102, 103], [112, 113]])
  np.testing.assert_array_equal(
      prefix.values[0, 0], [[320, 321], [330, 331], [120, 121], [130, 131]])
  np.testing.assert_array_equal(prefix.values[1, 1],
                                [[422, 423], [432, 433], [22, 23], [32, 33]])


def test_l2p_top_k_ties_go_to_the_lower_index():
  module = _l2p_hand_module(top_k=3)
  keys = np.ones((5, 4))
  keys[2] = 2.0  # Same direction: every cosine is equal.
  params = {
      "pool": jnp.asarray(HAND_POOL[None], jnp.float32),
      "keys": jnp.asarray(keys[None], jnp.float32)
  }
  prefix = module.apply({"params": params}, 0, None, query=jnp.ones((2, 4)),
                        context=None, mode="eval", method="prefix")
  np.testing.assert_array_equal(prefix.aux["chosen"], [[0, 1, 2]] * 2)


def _l2p_model(num_layers=2, pool=6, top_k=3):
  prompts = l2p.L2PPrompts(num_layers=num_layers, pool_size=pool, length=4,
                           hidden_size=D, num_heads=H, top_k=top_k)
  return vit.VisionTransformer(**TINY, prompts=prompts)


def test_l2p_forward_matches_numpy_in_train_and_eval():
  """Each prompted block selects with its own keys from the query pass."""
  model = _l2p_model()
  params = _params(model, None)
  images = _images()
  query = np_query(params, images)
  pool = np.asarray(params["prompts"]["pool"], np.float64)
  keys = np.asarray(params["prompts"]["keys"], np.float64)
  prefixes, chosen, cosines = {}, [], []
  for layer in range(2):
    cos = np_normalize(query) @ np_normalize(keys[layer]).T
    idx = np_top_k(cos, 3)
    prefixes[layer] = np_key_value(pool[layer][idx])
    chosen.append(idx)
    cosines.append(cos)
  # The blocks' keys differ, and so do their selections.
  assert not np.array_equal(chosen[0], chosen[1])
  want_pre, want_logits = np_prompted_forward(params, images, prefixes)

  outputs = {
      mode: _apply(model, params, None, mode) for mode in ("train", "eval")
  }
  for out in outputs.values():
    chex.assert_shape(out["key_similarity"], (2, B, 6))
    chex.assert_shape(out["key_chosen"], (2, B, 3))
    chex.assert_type(out["key_chosen"], jnp.int32)
    _assert_close(out["key_similarity"], np.stack(cosines), 1e-5)
    np.testing.assert_array_equal(out["key_chosen"], np.stack(chosen))
    _assert_close(out["pre_logits"], want_pre)
    _assert_close(out["logits"], want_logits)
  # Training and testing select, and compute, identically.
  chex.assert_trees_all_equal(outputs["train"], outputs["eval"])


def np_key_loss(cos, idx, mask, group, cross_sample):
  """The reference's sum of 1 - cos as a plain loop over (l, b, b', j)."""
  total = 0.0
  layers, batch, k = idx.shape
  for l in range(layers):
    for b in range(batch):
      partners = (range(b - b % group, b - b % group +
                        group) if cross_sample else [b])
      for other in partners:
        for j in range(k):
          total += (1.0 - cos[l, b, idx[l, other, j]]) * mask[b] * mask[other]
  return total


def test_l2p_key_loss_against_a_double_loop():
  rng = np.random.default_rng(3)
  cos = rng.uniform(-1, 1, size=(2, 4, 7))
  idx = np_top_k(cos, 3)
  mask = np.array([1.0, 1.0, 0.0, 1.0])  # The third sample is padding.
  for group in (2, 4):
    for cross_sample in (True, False):
      got = l2p.key_loss(jnp.asarray(cos, jnp.float32), jnp.asarray(idx),
                         jnp.asarray(mask, jnp.float32), group, cross_sample)
      chex.assert_shape(got, ())
      want = np_key_loss(cos, idx, mask, group, cross_sample)
      np.testing.assert_allclose(got, want, rtol=1e-5)
    # The cross-sample quirk is not the per-sample loss.
    assert abs(
        np_key_loss(cos, idx, mask, group, True) -
        np_key_loss(cos, idx, mask, group, False)) > 1e-3


def _method_config(**fields):
  """The few config fields the methods' hooks read."""
  defaults = dict(key_loss="cross_sample", key_loss_groups=2, pool_size=6,
                  ortho_weight=0.0, num_prompted_layers=2, prompt_length=4,
                  g_prompt_length=4, top_k=3)
  return ml_collections.ConfigDict({**defaults, **fields})


def test_l2p_loss_term_is_the_key_loss_of_the_model_outputs():
  model = _l2p_model()
  params = _params(model, None)
  mask = jnp.ones(B)
  out = _apply(model, params, None, "train")
  for key_loss in ("cross_sample", "per_sample"):
    method = l2p.L2P(_method_config(key_loss=key_loss, key_loss_groups=2), 3,
                     DIMS)
    value, weight = method.loss_terms(out, params, {}, jnp.int32(0), mask,
                                      "train")["key"]
    assert weight == 1.0
    want = np_key_loss(np.asarray(out["key_similarity"], np.float64),
                       np.asarray(out["key_chosen"]), np.ones(B), 2,
                       key_loss == "cross_sample")
    np.testing.assert_allclose(value, want, rtol=1e-5)
    assert method.loss_terms(out, params, {}, 0, mask, "eval") == {}


def test_l2p_key_loss_reaches_only_the_keys_and_ce_every_pool_entry():
  model = _l2p_model(num_layers=1, pool=4, top_k=2)
  params = _params(model, None)
  query = np_query(params, _images())
  # Keys 0, 1 point at sample 0's query, keys 2, 3 at sample 1's: together
  # the samples choose every pool entry.
  keys = np.stack([query[0], 2.0 * query[0], query[1], 3.0 * query[1]])
  params = _with(params, "prompts/keys", keys[None])
  method = l2p.L2P(_method_config(key_loss_groups=1), 3, DIMS)
  key_loss = lambda o: method.loss_terms(  # noqa: E731
      o, params, {}, 0, jnp.ones(B), "train")["key"][0]
  out, key_grads, ce_grads = _grads(model, params, None, key_loss, _ce)
  assert set(np.asarray(out["key_chosen"]).ravel()) == {0, 1, 2, 3}
  chex.assert_tree_all_finite((key_grads, ce_grads))
  assert _nonzero_rows(key_grads["prompts"]["keys"][0]).all()
  for path, leaf in flax.traverse_util.flatten_dict(key_grads).items():
    if path != ("prompts", "keys"):  # Not the pool, head or backbone.
      assert not np.any(np.asarray(leaf)), path
  ce_grads = ce_grads["prompts"]
  assert not np.any(np.asarray(ce_grads["keys"]))  # Top-k: no CE to keys.
  assert _nonzero_rows(ce_grads["pool"][0]).all()


# ---------------------------------------------------------------------------
# DualPrompt.


def _dual_model():
  """G-prompts in blocks 0, 1; E-prompts (3 tasks) in blocks 2, 3."""
  prompts = dualprompt.DualPromptPrompts(num_layers=4, pool_size=3, length=4,
                                         g_length=4, hidden_size=D, num_heads=H)
  return vit.VisionTransformer(**TINY, prompts=prompts)


def _dual_method():
  return dualprompt.DualPrompt(_method_config(), 3, DIMS)


def test_dualprompt_g_prompts_are_the_same_for_every_input():
  module = dualprompt.DualPromptPrompts(num_layers=4, pool_size=3, length=4,
                                        g_length=4, hidden_size=D, num_heads=H)
  g = np.random.default_rng(4).uniform(size=(2, 4, D)).astype(np.float32)
  params = {
      "g_prompts": jnp.asarray(g, jnp.float32),
      "e_prompts": jnp.zeros((2, 3, 4, D)),
      "e_keys": jnp.ones((2, 3, D))
  }
  query = jnp.asarray(np.random.default_rng(5).normal(size=(3, D)), jnp.float32)
  for layer in (0, 1):
    for mode in ("train", "eval"):
      prefix = module.apply({"params": params}, layer, None, query=query,
                            context={"task": jnp.int32(1)}, mode=mode,
                            method="prefix")
      chex.assert_shape((prefix.keys, prefix.values), (3, H, 2, HD))
      want_keys, want_values = np_key_value(np.broadcast_to(
          g[layer], (3, 4, D)))
      _assert_close(prefix.keys, np_heads(want_keys), 0)
      _assert_close(prefix.values, np_heads(want_values), 0)
  # Blocks past the G- and E-blocks carry no prompt.
  assert module.apply({"params": params}, 4, None, query=query,
                      context={"task": 0}, mode="eval", method="prefix") is None


def test_dualprompt_training_uses_the_task_prompt_for_every_sample():
  model = _dual_model()
  params = _params(model, {"task": 0})
  images = _images()
  g = np.asarray(params["prompts"]["g_prompts"], np.float64)
  e = np.asarray(params["prompts"]["e_prompts"], np.float64)
  task = 1
  prefixes = {
      l: np_key_value(np.broadcast_to(g[l], (B,) + g[l].shape)) for l in (0, 1)
  }
  prefixes.update({
      l: np_key_value(np.broadcast_to(e[l - 2, task], (B,) + e.shape[2:]))
      for l in (2, 3)
  })
  want_pre, want_logits = np_prompted_forward(params, images, prefixes)
  out = _apply(model, params, {"task": jnp.int32(task)}, "train")
  chex.assert_shape(out["key_chosen"], (2, B))
  np.testing.assert_array_equal(out["key_chosen"], np.full((2, B), task))
  _assert_close(out["pre_logits"], want_pre)
  _assert_close(out["logits"], want_logits)


def test_dualprompt_test_time_picks_top_1_over_all_keys_even_future_ones():
  model = _dual_model()
  params = _params(model, {"task": 0})
  images = _images()
  query = np_query(params, images)
  keys = np.asarray(params["prompts"]["e_keys"], np.float64).copy()
  keys[0, 2] = query[0]  # Task 2's key (not learned yet) matches sample 0.
  params = _with(params, "prompts/e_keys", keys)
  g = np.asarray(params["prompts"]["g_prompts"], np.float64)
  e = np.asarray(params["prompts"]["e_prompts"], np.float64)
  prefixes = {
      l: np_key_value(np.broadcast_to(g[l], (B,) + g[l].shape)) for l in (0, 1)
  }
  chosen = []
  for l in (2, 3):
    cos = np_normalize(query) @ np_normalize(keys[l - 2]).T
    idx = np.argmax(cos, -1)
    chosen.append(idx)
    prefixes[l] = np_key_value(e[l - 2][idx])
  assert chosen[0][0] == 2
  want_pre, want_logits = np_prompted_forward(params, images, prefixes)
  out = _apply(model, params, {"task": jnp.int32(0)}, "eval")
  chex.assert_shape(out["key_similarity"], (2, B, 3))
  np.testing.assert_array_equal(out["key_chosen"], np.stack(chosen))
  _assert_close(out["pre_logits"], want_pre)
  _assert_close(out["logits"], want_logits)


def test_dualprompt_key_loss_and_frozen_rows():
  model = _dual_model()
  params = _params(model, {"task": 0})
  method = _dual_method()
  task = 1
  context = {"task": jnp.int32(task)}
  query = np_query(params, _images())
  keys = np.asarray(params["prompts"]["e_keys"], np.float64)
  want = sum(
      np.sum(1.0 - np_normalize(query) @ np_normalize(keys[e, task]))
      for e in range(2))
  key_loss = lambda o: method.loss_terms(  # noqa: E731
      o, params, {}, jnp.int32(task), jnp.ones(B), "train")["key"][0]
  total = lambda o: _ce(o) + key_loss(o)  # noqa: E731
  out, grads, key_only = _grads(model, params, context, total, key_loss)
  value, weight = method.loss_terms(out, params, {}, jnp.int32(task),
                                    jnp.ones(B), "train")["key"]
  assert weight == 1.0
  np.testing.assert_allclose(value, want, rtol=1e-5)
  assert method.loss_terms(out, params, {}, task, jnp.ones(B), "eval") == {}
  grads = grads["prompts"]
  chex.assert_tree_all_finite(grads)
  for name in ("e_prompts", "e_keys"):
    for e in range(2):
      np.testing.assert_array_equal(_nonzero_rows(grads[name][e]),
                                    [False, True, False])
  assert _nonzero_rows(grads["g_prompts"]).all()

  for path, leaf in flax.traverse_util.flatten_dict(key_only).items():
    if path != ("prompts", "e_keys"):
      assert not np.any(np.asarray(leaf)), path


# ---------------------------------------------------------------------------
# CODA-Prompt.

M, PT, LP = 6, 2, 4  # Components, components per task, prompt length.


def _coda_module(num_layers=1, width=D):
  return codaprompt.CodaPrompts(num_layers=num_layers, pool_size=M, length=LP,
                                hidden_size=width, num_heads=H, per_task=PT)


def _coda_params(seed=6, num_layers=1, width=D):
  """Every row random (also rows of later tasks, which must not count)."""
  rng = np.random.default_rng(seed)
  shapes = {
      "components": (num_layers, M, LP, width),
      "keys": (num_layers, M, width),
      "attention": (num_layers, M, width)
  }
  return {
      name: jnp.asarray(rng.uniform(size=shape), jnp.float32)
      for name, shape in shapes.items()
  }


def np_coda(query, keys, attn, components, rows):
  """alpha (B, rows) and the prompt (B, Lp, D) from the first `rows` rows."""
  k, a, p = keys[:rows], attn[:rows], components[:rows]
  alpha = np.einsum("bmd,md->bm", np_normalize(query[:, None, :] * a[None]),
                    np_normalize(k))
  return alpha, np.einsum("bm,mld->bld", alpha, p)


def test_coda_weights_and_prompt_against_numpy():
  module = _coda_module()
  params = _coda_params()
  query = np.random.default_rng(7).normal(size=(3, D))
  for task in range(3):
    _check_coda_prefix(module, params, query, task)


def _check_coda_prefix(module, params, query, task):
  rows = (task + 1) * PT
  want_alpha, want_prompt = np_coda(
      query,
      *(np.asarray(params[n][0], np.float64)
        for n in ("keys", "attention", "components")), rows)
  # A cosine, not a softmax: values of both signs.
  assert want_alpha.min() < 0 < want_alpha.max()
  prefixes = {}
  for mode in ("train", "eval"):
    prefix = module.apply({"params": params}, 0, None,
                          query=jnp.asarray(query, jnp.float32),
                          context={"task": jnp.int32(task)}, mode=mode,
                          method="prefix")
    alpha = np.asarray(prefix.aux["alpha"])
    chex.assert_shape(alpha, (3, M))
    _assert_close(alpha[:, :rows], want_alpha, 1e-5)
    np.testing.assert_array_equal(alpha[:, rows:], 0.0)
    want_keys, want_values = np_key_value(want_prompt)
    chex.assert_shape((prefix.keys, prefix.values), (3, H, LP // 2, HD))
    _assert_close(prefix.keys, np_heads(want_keys), 1e-5)
    _assert_close(prefix.values, np_heads(want_values), 1e-5)
    prefixes[mode] = prefix
  chex.assert_trees_all_close(prefixes["train"].values, prefixes["eval"].values,
                              rtol=0, atol=0)


def test_coda_training_grads_reach_only_the_task_rows():
  module = _coda_module()
  params = _coda_params()
  query = jnp.asarray(np.random.default_rng(8).normal(size=(3, D)), jnp.float32)
  weights = jax.random.normal(jax.random.key(0), (2, 3, H, LP // 2, HD))

  @functools.partial(jax.jit, static_argnames="mode")
  def grads(p, task, mode):

    def loss(p):
      prefix = module.apply({"params": p}, 0, None, query=query,
                            context={"task": task}, mode=mode, method="prefix")
      return (jnp.sum(prefix.keys * weights[0]) +
              jnp.sum(prefix.values * weights[1]))

    return jax.grad(loss)(p)

  index = np.arange(M)
  for task in range(3):
    got = grads(params, jnp.int32(task), "train")
    chex.assert_tree_all_finite(got)  # Zeroed rows give no NaN.
    want = (index >= task * PT) & (index < (task + 1) * PT)
    for name in ("keys", "attention", "components"):
      np.testing.assert_array_equal(_nonzero_rows(got[name][0]), want, name)
    # At test time (no gradient in practice) earlier rows are not detached.
    got = grads(params, jnp.int32(task), "eval")
    chex.assert_tree_all_finite(got)
    np.testing.assert_array_equal(_nonzero_rows(got["components"][0]), index
                                  < (task + 1) * PT)


def test_coda_forward_through_the_model_matches_numpy():
  prompts = codaprompt.CodaPrompts(num_layers=3, pool_size=M, length=LP,
                                   hidden_size=D, num_heads=H, per_task=PT)
  model = vit.VisionTransformer(**TINY, prompts=prompts)
  params = _params(model, {"task": 0})
  images = _images()
  query = np_query(params, images)
  p = {
      n: np.asarray(params["prompts"][n], np.float64)
      for n in ("keys", "attention", "components")
  }
  for task in (0, 2):
    prefixes = {
        l:
            np_key_value(
                np_coda(query, p["keys"][l], p["attention"][l],
                        p["components"][l], (task + 1) * PT)[1])
        for l in range(3)
    }
    want_pre, want_logits = np_prompted_forward(params, images, prefixes)
    for mode in ("train", "eval"):
      out = _apply(model, params, {"task": jnp.int32(task)}, mode)
      _assert_close(out["pre_logits"], want_pre)
      _assert_close(out["logits"], want_logits)


def np_gram_schmidt(rows, start, stop, draws):
  """The reference loop in float64; draws[k] is the normal draw of row k."""
  out = np.where(np.arange(len(rows))[:, None] < start, rows, 0.0)
  for k in range(start, stop):
    v = draws[k]
    u = v.copy()
    for j in range(k):
      if out[j] @ out[j] >= 1e-8:
        u -= (v @ out[j]) / (out[j] @ out[j]) * out[j]
    out[k] = u
  for k in range(start, stop):
    out[k] /= np.linalg.norm(out[k])
  return out


def _draws(key, count, width):
  """The implementation's normal draw of row k: fold k into the key."""
  return np.stack([
      np.asarray(jax.random.normal(jax.random.fold_in(key, k), (width,)),
                 np.float64) for k in range(count)
  ])


def test_gram_schmidt_keeps_learned_rows_zeroes_later_ones_orthogonalises():
  # Learned rows that are orthogonal: scaled basis vectors.
  learned = np.zeros((6, 5))
  learned[0, 0], learned[1, 3] = 3.0, 0.5
  learned[2:] = 7.0  # Rows at and after `start` are overwritten.
  got = np.asarray(
      codaprompt.gram_schmidt(jnp.asarray(learned, jnp.float32), 2, 4,
                              jax.random.key(1)), np.float64)
  chex.assert_shape(got, (6, 5))
  np.testing.assert_array_equal(got[:2], learned[:2])  # Not renormalised.
  np.testing.assert_array_equal(got[4:], 0.0)
  np.testing.assert_allclose(np.linalg.norm(got[2:4], axis=-1), 1.0, rtol=1e-6)
  gram = got[:4] @ got[:4].T
  off_diagonal = gram - np.diag(np.diag(gram))
  np.testing.assert_allclose(off_diagonal, 0.0, atol=1e-6)


def test_gram_schmidt_follows_the_classical_formula_on_unorthogonal_rows():
  key = jax.random.key(2)
  width = 7
  # The draw convention first: with nothing learned, row 0 is its draw,
  # normalised.
  first = np.asarray(codaprompt.gram_schmidt(jnp.zeros((3, width)), 0, 1, key))
  draws = _draws(key, 4, width)
  np.testing.assert_allclose(first[0], draws[0] / np.linalg.norm(draws[0]),
                             rtol=1e-5)
  # Learned rows 0, 1 are far from orthogonal, row 2 is (near) zero and is
  # left out of the projections; rows 3..4 are new.
  learned = np.random.default_rng(9).uniform(size=(6, width))
  learned[2] = 1e-5
  got = np.asarray(
      codaprompt.gram_schmidt(jnp.asarray(learned, jnp.float32), 3, 5, key),
      np.float64)
  want = np_gram_schmidt(
      learned.astype(np.float32).astype(np.float64), 3, 5,
      _draws(key, 6, width))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  # Not an orthonormal basis: the new rows are not orthogonal to row 0.
  assert abs(got[3] @ got[0]) > 1e-3


def test_coda_init_is_task_0_gram_schmidt_and_start_task_redraws_from_1():
  method = codaprompt.CodaPrompt(_method_config(pool_size=M), M // PT, {
      **DIMS, "hidden_size": 4
  })
  assert method.per_task == PT
  module = method.prompts()
  params = jax.jit(lambda key: module.init(key, 0, None, query=jnp.ones(
      (1, 4)), context={"task": jnp.int32(0)}, mode="train", method="prefix"))(
          jax.random.key(3))["params"]
  chex.assert_shape(params["components"], (2, M, LP, 4))
  chex.assert_shape((params["keys"], params["attention"]), (2, M, 4))
  flat = lambda x: np.asarray(x, np.float64).reshape(2, M, -1)  # noqa: E731
  for name, x in params.items():
    x = flat(x)
    for layer in range(2):  # Task 0's rows orthonormal, the rest zero.
      np.testing.assert_allclose(x[layer, :PT] @ x[layer, :PT].T, np.eye(PT),
                                 atol=1e-5, err_msg=name)
      np.testing.assert_array_equal(x[layer, PT:], 0.0)
    assert not np.allclose(x[0, :PT], x[1, :PT])  # Each layer its own draw.

  # Task 0 "learned" its rows: still orthogonal, no longer unit.
  learned = jax.tree_util.tree_map(lambda x: 2.0 * x, params)
  trainable = {"prompts": learned, "head": {"bias": jnp.zeros(3)}}
  start_task = jax.jit(method.start_task)
  same, _ = start_task(trainable, {}, jnp.int32(0), jax.random.key(5))
  chex.assert_trees_all_equal(same, trainable)  # Task 0 keeps the init.
  new, state = start_task(trainable, {}, jnp.int32(1), jax.random.key(5))
  assert state == {}
  chex.assert_trees_all_equal(new["head"], trainable["head"])
  for name in ("keys", "attention", "components"):
    before, after = flat(learned[name]), flat(new["prompts"][name])
    np.testing.assert_array_equal(after[:, :PT], before[:, :PT])
    np.testing.assert_array_equal(after[:, 2 * PT:], 0.0)
    for layer in range(2):
      used = after[layer, :2 * PT]
      gram = used @ used.T
      np.testing.assert_allclose(np.diag(gram)[PT:], 1.0, rtol=1e-5)
      np.testing.assert_allclose(gram - np.diag(np.diag(gram)), 0.0, atol=1e-5,
                                 err_msg=name)
    assert not np.allclose(after[0, PT:2 * PT], after[1, PT:2 * PT])


def np_ortho(x, rows):
  flat = np.asarray(x, np.float64).reshape(x.shape[0], -1)[:rows]
  return np.mean((flat @ flat.T - np.eye(rows))**2)


def test_coda_ortho_penalty_over_the_used_rows():
  method = codaprompt.CodaPrompt(_method_config(pool_size=M, ortho_weight=0.3),
                                 M // PT, {
                                     **DIMS, "hidden_size": 4
                                 })
  trainable = {"prompts": _coda_params(seed=10, num_layers=2, width=4)}
  for task in (0, 1):
    _check_ortho_penalty(method, trainable, task)
  method.config.ortho_weight = 0.0
  assert method.loss_terms({}, trainable, {}, 1, jnp.ones(B), "train") == {}


@functools.partial(jax.jit, static_argnums=0)
def _ortho_value_and_grad(method, trainable, task):
  return jax.value_and_grad(lambda t: method.loss_terms({}, t, {
  }, task, jnp.ones(B), "train")["ortho"][0])(trainable)


def _check_ortho_penalty(method, trainable, task):
  prompts = trainable["prompts"]
  rows = (task + 1) * PT
  want = sum(
      np_ortho(prompts[n][l], rows)
      for n in ("keys", "attention", "components")
      for l in range(2))
  assert method.loss_terms({}, trainable, {}, task, jnp.ones(B),
                           "train")["ortho"][1] == 0.3
  value, grads = _ortho_value_and_grad(method, trainable, jnp.int32(task))
  np.testing.assert_allclose(value, want, rtol=1e-5)
  want_rows = (np.arange(M) >= task * PT) & (np.arange(M) < rows)
  for name in ("keys", "attention", "components"):
    for l in range(2):
      np.testing.assert_array_equal(_nonzero_rows(grads["prompts"][name][l]),
                                    want_rows)
  assert method.loss_terms({}, trainable, {}, task, jnp.ones(B), "eval") == {}
