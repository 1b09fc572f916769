"""VQ-Prompt's rules on tiny inputs, against NumPy written from the rules.

The selection (alpha, the continuous prompt, the nearest entry, the
straight-through value) on hand-made pools and in the tiny ViT of
test_baselines.py; the two VQ terms and the gradient each loss sends to the
pool, the keys and the head; float32 routing under a bfloat16 backbone;
the ViT-B/16 sizes from shapes alone; a jitted train step; the protocol,
the config checks and the seed-0 class order.
"""

import ast
import functools
import inspect
import json

import chex
import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from smope_jax import configuration
from smope_jax import data
from smope_jax import errors
from smope_jax import schedules
from smope_jax import train_step as ts
from smope_jax.methods import base
from smope_jax.methods import vqprompt
from smope_jax.methods import registry
from smope_jax.methods import vqprompt_spec
from smope_jax.models import vit
from tests import helpers
from tests.test_baselines import B
from tests.test_baselines import D
from tests.test_baselines import DIMS
from tests.test_baselines import H
from tests.test_baselines import TINY
from tests.test_baselines import _apply
from tests.test_baselines import _assert_close
from tests.test_baselines import _ce
from tests.test_baselines import _images
from tests.test_baselines import _nonzero_rows
from tests.test_baselines import _params
from tests.test_baselines import np_key_value
from tests.test_baselines import np_normalize
from tests.test_baselines import np_prompted_forward
from tests.test_baselines import np_query

LAYERS, POOL, LENGTH, TAU = 2, 5, 4, 0.7
COMMIT, CODEBOOK = 0.4, 0.1

# ---------------------------------------------------------------------------
# NumPy references.


def np_softmax(x):
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def np_quantize(query, keys, pool, tau):
  """float64 alpha (B, M), p_a (B, Lp, D), chosen (B,) from the rules."""
  query, keys, pool = (np.asarray(x, np.float64) for x in (query, keys, pool))
  alpha = np_softmax(query @ np_normalize(keys).T / tau)
  continuous = np.einsum("bm,mld->bld", alpha, pool)
  distances = np.array(
      [[np.sum((continuous[b] - pool[m])**2)
        for m in range(pool.shape[0])]
       for b in range(query.shape[0])])
  return alpha, continuous, distances.argmin(-1)


def np_terms(continuous, quantized, mask):
  """The two VQ terms: per block the mean over real samples' Lp * D."""
  continuous, quantized = (
      np.asarray(x, np.float64) for x in (continuous, quantized))
  per_block = [
      np.sum(np.mean((continuous[l] - quantized[l])**2,
                     (-2, -1)) * mask) / mask.sum()
      for l in range(continuous.shape[0])
  ]
  return sum(per_block)  # The two terms have the same value.


# ---------------------------------------------------------------------------
# The selection on a hand-made pool.

# Width 2, prompts of 2 tokens. Keys along the axes and the diagonal.
HAND_KEYS = np.array([[2.0, 0.0], [0.0, 3.0], [1.0, 1.0]])
# Entry 0 lies far out; entries 1, 2 near the origin.
HAND_POOL = np.array([[[10.0, 10.0], [10.0, 10.0]], [[0.0, 0.0], [0.0, 0.0]],
                      [[1.0, 1.0], [1.0, 1.0]]])
# A query of length 5, not unit length.
HAND_QUERY = np.array([[3.0, 4.0], [-3.0, 0.0]])


def test_quantize_by_hand_nearest_entry_is_not_the_largest_weight():
  got = vqprompt.quantize(jnp.asarray(HAND_QUERY, jnp.float32),
                          jnp.asarray(HAND_KEYS, jnp.float32),
                          jnp.asarray(HAND_POOL, jnp.float32), 1.0)
  chex.assert_shape(got["alpha"], (2, 3))
  chex.assert_shape((got["continuous"], got["quantized"]), (2, 2, 2))
  chex.assert_shape(got["chosen"], (2,))
  chex.assert_type((got["alpha"], got["continuous"], got["quantized"]),
                   jnp.float32)
  chex.assert_type(got["chosen"], jnp.int32)
  # Scores q . K/|K| with q as it is: (3, 4, 7 / sqrt 2) and (-3, 0,
  # -3 / sqrt 2); unit queries would divide the rows by |q| = 5 and 3.
  root2 = np.sqrt(2.0)
  scores = np.array([[3.0, 4.0, 7.0 / root2], [-3.0, 0.0, -3.0 / root2]])
  alpha = np_softmax(scores)
  _assert_close(got["alpha"], alpha, 1e-6)
  unit = np_softmax(scores / np.array([[5.0], [3.0]]))
  assert not np.allclose(alpha, unit, atol=1e-2)
  # p_a = 10 alpha_0 + alpha_2 in every number.
  level = 10 * alpha[:, 0] + alpha[:, 2]
  _assert_close(got["continuous"],
                np.broadcast_to(level[:, None, None], (2, 2, 2)), 1e-6)
  # Sample 0: alpha (0.09, 0.25, 0.65) -> p_a = 1.585, nearest entry 2 (the
  # largest weight). Sample 1: alpha (0.04, 0.85, 0.10) -> p_a = 0.528,
  # nearer to entry 2 (0.22 per number squared) than to entry 1 (0.28),
  # although entry 1 weighs 0.85.
  np.testing.assert_allclose(level, [1.5846, 0.5281], atol=1e-4)
  np.testing.assert_array_equal(got["chosen"], [2, 2])
  assert alpha[1].argmax() == 1
  np.testing.assert_array_equal(got["quantized"], HAND_POOL[[2, 2]])


def test_quantize_temperature_divides_the_scores():
  got = vqprompt.quantize(jnp.asarray(HAND_QUERY, jnp.float32),
                          jnp.asarray(HAND_KEYS, jnp.float32),
                          jnp.asarray(HAND_POOL, jnp.float32), 5.0)
  alpha, continuous, chosen = np_quantize(HAND_QUERY, HAND_KEYS, HAND_POOL, 5.0)
  _assert_close(got["alpha"], alpha, 1e-6)
  _assert_close(got["continuous"], continuous, 1e-6)
  np.testing.assert_array_equal(got["chosen"], chosen)


def test_quantize_ties_go_to_the_first_entry():
  # A zero query weighs the entries (0, 0, 1) equally: p_a = 1/3 is nearest
  # to the equal entries 0 and 1, and the first of them wins.
  pool = np.stack([HAND_POOL[1], HAND_POOL[1], HAND_POOL[2]])
  got = vqprompt.quantize(jnp.zeros((1, 2)), jnp.asarray(HAND_KEYS),
                          jnp.asarray(pool, jnp.float32), 1.0)
  np.testing.assert_array_equal(got["chosen"], [0])


def _hand_module(temperature=1.0):
  return vqprompt.VQPrompts(num_layers=1, pool_size=3, length=2, hidden_size=2,
                            num_heads=1, temperature=temperature)


def test_prefix_value_is_the_straight_through_sum_bit_for_bit():
  params = {
      "pool": jnp.asarray(HAND_POOL[None], jnp.float32),
      "keys": jnp.asarray(HAND_KEYS[None], jnp.float32)
  }
  prefix = _hand_module().apply({"params": params}, 0, None,
                                query=jnp.asarray(HAND_QUERY, jnp.float32),
                                context=None, mode="eval", method="prefix")
  continuous = np.asarray(prefix.aux["continuous"])
  quantized = np.asarray(prefix.aux["quantized"])
  used = continuous + (quantized - continuous)  # float32, as the reference.
  chex.assert_shape((prefix.keys, prefix.values), (2, 1, 1, 2))
  np.testing.assert_array_equal(prefix.keys[:, 0], used[:, :1])
  np.testing.assert_array_equal(prefix.values[:, 0], used[:, 1:])
  np.testing.assert_allclose(used, quantized, rtol=1e-6)
  # Beyond the prompted blocks: no prefix.
  assert _hand_module().apply({"params": params}, 1, None,
                              query=jnp.asarray(HAND_QUERY,
                                                jnp.float32), context=None,
                              mode="eval", method="prefix") is None


# ---------------------------------------------------------------------------
# The tiny ViT: forward, outputs, terms, gradients.


def _model(dtype=jnp.float32):
  prompts = vqprompt.VQPrompts(num_layers=LAYERS, pool_size=POOL, length=LENGTH,
                               hidden_size=D, num_heads=H, temperature=TAU)
  return vit.VisionTransformer(**TINY, dtype=dtype, prompts=prompts)


def _method(**fields):
  config = ml_collections.ConfigDict(
      dict(num_prompted_layers=LAYERS, pool_size=POOL, prompt_length=LENGTH,
           vq_temperature=TAU, vq_commit_weight=COMMIT,
           vq_codebook_weight=CODEBOOK, **fields))
  return vqprompt.VQPrompt(config, 3, DIMS)


def _np_selections(params, images):
  """Per block: float64 alpha, p_a, chosen from the NumPy query."""
  query = np_query(params, images)
  pool = np.asarray(params["prompts"]["pool"], np.float64)
  keys = np.asarray(params["prompts"]["keys"], np.float64)
  return [np_quantize(query, keys[l], pool[l], TAU) for l in range(LAYERS)]


def test_forward_matches_numpy_in_train_and_eval():
  model = _model()
  params = _params(model, None)
  images = _images()
  pool = np.asarray(params["prompts"]["pool"], np.float64)
  selections = _np_selections(params, images)
  prefixes = {
      l: np_key_value(pool[l][chosen])
      for l, (_, _, chosen) in enumerate(selections)
  }
  want_pre, want_logits = np_prompted_forward(params, images, prefixes)

  outputs = {
      mode: _apply(model, params, None, mode) for mode in ("train", "eval")
  }
  for out in outputs.values():
    chex.assert_shape(out["vq_alpha"], (LAYERS, B, POOL))
    chex.assert_shape((out["vq_continuous"], out["vq_quantized"]),
                      (LAYERS, B, LENGTH, D))
    chex.assert_shape(out["vq_chosen"], (LAYERS, B))
    chex.assert_type(out["vq_chosen"], jnp.int32)
    for l, (alpha, continuous, chosen) in enumerate(selections):
      _assert_close(out["vq_alpha"][l], alpha, 1e-5)
      _assert_close(out["vq_continuous"][l], continuous, 1e-5)
      np.testing.assert_array_equal(out["vq_chosen"][l], chosen)
      np.testing.assert_array_equal(
          out["vq_quantized"][l],
          np.asarray(params["prompts"]["pool"][l])[chosen])
    _assert_close(out["pre_logits"], want_pre)
    _assert_close(out["logits"], want_logits)
  chex.assert_trees_all_equal(outputs["train"], outputs["eval"])


def test_vq_terms_against_numpy_with_padding():
  rng = np.random.default_rng(4)
  continuous = rng.uniform(size=(LAYERS, B, LENGTH, D))
  quantized = rng.uniform(size=(LAYERS, B, LENGTH, D))
  mask = np.array([1.0, 1.0, 0.0, 1.0])
  commitment, codebook = vqprompt.vq_terms(jnp.asarray(continuous, jnp.float32),
                                           jnp.asarray(quantized, jnp.float32),
                                           jnp.asarray(mask, jnp.float32))
  chex.assert_shape((commitment, codebook), ())
  want = np_terms(continuous, quantized, mask)
  np.testing.assert_allclose(commitment, want, rtol=1e-6)
  np.testing.assert_allclose(codebook, want, rtol=1e-6)


def test_loss_terms_weights_and_modes():
  model = _model()
  params = _params(model, None)
  method = _method()
  mask = jnp.ones(B)
  out = _apply(model, params, None, "train")
  terms = method.loss_terms(out, params, {}, jnp.int32(0), mask, "train")
  assert set(terms) == {"vq_commit", "vq_codebook"}
  want = np_terms(out["vq_continuous"], out["vq_quantized"], np.ones(B))
  assert terms["vq_commit"][1] == COMMIT
  assert terms["vq_codebook"][1] == CODEBOOK
  for value, _ in terms.values():
    np.testing.assert_allclose(value, want, rtol=1e-5)
    assert float(value) > 0
  for mode in ("eval", "plain"):
    assert method.loss_terms(out, params, {}, 0, mask, mode) == {}


class _FixedPrompts(base.PromptModule):
  """Given prompts (L, B, Lp, D) from the context: dCE / d(used prompt)."""
  needs_query = False
  num_layers: int
  num_heads: int

  def prefix(self, layer, block_query, *, query, context, mode):
    del block_query, query, mode
    if layer >= self.num_layers:
      return None
    return base.key_value_prefix(context[layer], self.num_heads)


def _prompt_gradient(params, used):
  """dCE / dP_ per block, from the model fed the used prompts directly."""
  model = vit.VisionTransformer(
      **TINY, prompts=_FixedPrompts(num_layers=LAYERS, num_heads=H))
  backbone = {k: v for k, v in params.items() if k != "prompts"}
  return np.asarray(
      jax.grad(lambda p: _ce(
          model.apply({"params": backbone}, _images(), p, mode="train")))(
              jnp.asarray(used, jnp.float32)), np.float64)


def np_key_gradient(query, keys, alpha, d_alpha, tau):
  """Back through alpha = softmax(q . K / |K| / tau) to K, float64."""
  d_scores = alpha * (d_alpha - np.sum(alpha * d_alpha, -1, keepdims=True))
  d_unit = (d_scores / tau).T @ query  # (M, D) w.r.t. K / |K|.
  norms = np.linalg.norm(keys, axis=-1, keepdims=True)
  unit = keys / norms
  return (d_unit - unit * np.sum(unit * d_unit, -1, keepdims=True)) / norms


def test_gradients_of_each_loss_reach_what_the_rules_say():
  model = _model()
  params = _params(model, None)
  method = _method()
  mask = jnp.ones(B)
  forward = lambda p: model.apply(  # noqa: E731
      {"params": p}, _images(), None, mode="train")

  def term(name):
    return lambda p: method.loss_terms(forward(p), p, {}, 0, mask, "train")[name
                                                                           ][0]

  def total(p):
    out = forward(p)
    extra = method.loss_terms(out, p, {}, 0, mask, "train")
    return _ce(out) + sum(w * v for v, w in extra.values())

  out = forward(params)
  grads = jax.jit(lambda p: [
      jax.grad(f)(p) for f in
      (lambda p: _ce(forward(p)), term("vq_commit"), term("vq_codebook"), total)
  ])(params)
  ce_grads, commit_grads, codebook_grads, total_grads = grads
  chex.assert_tree_all_finite(grads)
  alpha = np.asarray(out["vq_alpha"], np.float64)
  continuous = np.asarray(out["vq_continuous"], np.float64)
  quantized = np.asarray(out["vq_quantized"], np.float64)
  chosen = np.asarray(out["vq_chosen"])
  pool = np.asarray(params["prompts"]["pool"], np.float64)
  keys = np.asarray(params["prompts"]["keys"], np.float64)
  query = np_query(params, _images())
  scale = 2.0 / (B * LENGTH * D)
  # The test needs a block where some entry goes unchosen.
  assert any(len(set(chosen[l])) < POOL for l in range(LAYERS))

  used = continuous + (quantized - continuous)
  g_used = _prompt_gradient(params, used)  # (L, B, Lp, D)
  for l in range(LAYERS):
    # CE: every entry gets sum_b alpha[b, m] dCE/dP_[b]; the keys through
    # alpha, dCE/dalpha[b, m] = <dCE/dP_[b], P_m>.
    _assert_close(ce_grads["prompts"]["pool"][l],
                  np.einsum("bm,bld->mld", alpha[l], g_used[l]), 1e-5)
    assert _nonzero_rows(ce_grads["prompts"]["pool"][l]).all()
    d_alpha = np.einsum("bld,mld->bm", g_used[l], pool[l])
    _assert_close(ce_grads["prompts"]["keys"][l],
                  np_key_gradient(query, keys[l], alpha[l], d_alpha, TAU), 1e-5)
    # |p_a - sg(z)|^2: the pool through p_a (weighted by alpha) and keys.
    diff = continuous[l] - quantized[l]
    _assert_close(commit_grads["prompts"]["pool"][l],
                  scale * np.einsum("bm,bld->mld", alpha[l], diff), 1e-5)
    d_alpha = scale * np.einsum("bld,mld->bm", diff, pool[l])
    _assert_close(commit_grads["prompts"]["keys"][l],
                  np_key_gradient(query, keys[l], alpha[l], d_alpha, TAU), 1e-5)
    # |z - sg(p_a)|^2: only the chosen entries, summed over their samples.
    want = np.zeros_like(pool[l])
    for b in range(B):
      want[chosen[l, b]] -= scale * diff[b]
    _assert_close(codebook_grads["prompts"]["pool"][l], want, 1e-5)
    np.testing.assert_array_equal(
        _nonzero_rows(codebook_grads["prompts"]["pool"][l]),
        np.isin(np.arange(POOL), chosen[l]))
  assert not np.any(np.asarray(codebook_grads["prompts"]["keys"]))
  # Nothing of the VQ terms reaches the head or, through the query, the
  # backbone; the total is the weighted sum of the three.
  for grad in (commit_grads, codebook_grads):
    for path, leaf in flax.traverse_util.flatten_dict(grad).items():
      if path[0] != "prompts":
        assert not np.any(np.asarray(leaf)), path
  want_total = jax.tree_util.tree_map(
      lambda a, b, c: a + COMMIT * b + CODEBOOK * c, ce_grads, commit_grads,
      codebook_grads)
  chex.assert_trees_all_close(total_grads, want_total, rtol=1e-5, atol=1e-7)
  assert np.any(np.asarray(total_grads["head"]["kernel"]))


def test_bfloat16_backbone_keeps_routing_in_float32():
  model = _model(jnp.bfloat16)
  params = _params(model, None)
  out = _apply(model, params, None, "train")
  chex.assert_type((out["vq_alpha"], out["vq_continuous"], out["vq_quantized"]),
                   jnp.float32)
  pool = np.asarray(params["prompts"]["pool"], np.float64)
  for l in range(LAYERS):
    alpha = np.asarray(out["vq_alpha"][l], np.float64)
    np.testing.assert_allclose(alpha.sum(-1), 1.0, rtol=1e-6)
    # p_a from alpha at float32 accuracy (bfloat16 would be off by ~1e-2).
    np.testing.assert_allclose(out["vq_continuous"][l],
                               np.einsum("bm,mld->bld", alpha, pool[l]),
                               rtol=1e-6, atol=1e-6)
  terms = _method().loss_terms(out, params, {}, 0, jnp.ones(B), "train")
  chex.assert_type([v for v, _ in terms.values()], jnp.float32)
  got = vqprompt.quantize(jnp.asarray(HAND_QUERY, jnp.bfloat16),
                          jnp.asarray(HAND_KEYS), jnp.asarray(HAND_POOL), 1.0)
  chex.assert_type((got["alpha"], got["continuous"]), jnp.float32)


# ---------------------------------------------------------------------------
# ViT-B/16 sizes, a jitted train step.


def _vq_config(name):
  """The benchmark config (SMoPE's) under VQ-Prompt's protocol."""
  config = helpers.benchmark_config(name)
  return configuration.use_method(config, "vqprompt", epochs=config.epochs,
                                  batch_size=128)


def _build(config, num_tasks):
  dims = configuration.model_dims(config)
  method = vqprompt.VQPrompt(config, num_tasks, dims)
  model = vit.VisionTransformer(num_classes=config.num_classes,
                                prompts=method.prompts(), **dims)
  return model, method


@pytest.mark.parametrize("name,classes", [("cifar100", 100),
                                          ("caltech_birds2011", 200)])
def test_vit_b16_learnable_parameters(name, classes):
  config = _vq_config({
      "cifar100": "cifar100",
      "caltech_birds2011": "cub200"
  }[name])
  model, method = _build(config, 10)
  images = jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32)
  params = jax.eval_shape(
      lambda x: model.init(jax.random.key(0), x, method.init_context(), mode=
                           "train"), images)["params"]
  prompts = params["prompts"]
  assert {
      k: v.shape for k, v in prompts.items()
  } == {
      "pool": (5, 10, 8, 768),
      "keys": (5, 10, 768)
  }
  size = lambda t: sum(
      int(np.prod(x.shape))  # noqa: E731
      for x in jax.tree_util.tree_leaves(t))
  assert size(prompts) == 345_600
  assert size(params["head"]) == 768 * classes + classes
  chex.assert_type(jax.tree_util.tree_leaves(prompts), jnp.float32)


def test_init_is_uniform_on_zero_one():
  module = vqprompt.VQPrompts(num_layers=LAYERS, pool_size=POOL, length=LENGTH,
                              hidden_size=64, num_heads=H, temperature=TAU)
  params = module.init(jax.random.key(3), 0, None, query=jnp.ones((1, 64)),
                       context=None, mode="train", method="prefix")["params"]
  chex.assert_shape(params["pool"], (LAYERS, POOL, LENGTH, 64))
  chex.assert_shape(params["keys"], (LAYERS, POOL, 64))
  for leaf in jax.tree_util.tree_leaves(params):
    x = np.asarray(leaf)
    assert x.min() >= 0.0 and x.max() < 1.0
    assert 0.45 < x.mean() < 0.55


def test_train_step_moves_every_pool_row_and_not_the_backbone():
  config = helpers.tiny_config("method=vqprompt", **{"model.num_layers": 3})
  model, method = _build(config, 5)
  rng = np.random.default_rng(1)
  batch = {
      "image": jnp.asarray(rng.uniform(size=(8, 16, 16, 3)), jnp.float32),
      "label": jnp.asarray(2 + np.arange(8) % 2, jnp.int32),
      "mask": jnp.ones(8, jnp.float32)
  }
  params = model.init(jax.random.key(0), batch["image"], method.init_context(),
                      mode="train")["params"]
  trainable, frozen = ts.split_params(params)
  before = jax.tree_util.tree_map(np.array, trainable)
  frozen_before = jax.tree_util.tree_map(np.array, frozen)
  tx = schedules.adam(0.0, decoupled=True)
  step = jax.jit(
      functools.partial(ts.train_step, model=model, method=method, tx=tx,
                        mode="train"))
  inputs = ts.TaskInputs(
      class_range=jnp.array([2, 4], jnp.int32), task=jnp.int32(1), rates={
          "prompts": jnp.float32(5e-3),
          "head": jnp.float32(1e-3)
      }, method_state=method.init_state(trainable))
  after, _, metrics = step(trainable, tx.init(trainable), frozen, batch, inputs)
  chex.assert_trees_all_equal(frozen, frozen_before)
  chex.assert_tree_all_finite((after, metrics))
  assert set(metrics) == {
      "loss", "ce", "correct", "count", "vq_commit", "vq_codebook"
  }
  np.testing.assert_allclose(
      metrics["loss"],
      metrics["ce"] + 0.4 * metrics["vq_commit"] + 0.1 * metrics["vq_codebook"],
      rtol=1e-6)
  # 3 blocks of the tiny ViT (of the protocol's 5); every entry moves.
  for name in ("pool", "keys"):
    moved = np.asarray(before["prompts"][name] != after["prompts"][name])
    chex.assert_shape(moved, (3, 10) + moved.shape[2:])
    assert moved.reshape(3, 10, -1).any(-1).all(), name


# ---------------------------------------------------------------------------
# Protocol, checks, class order.


def test_protocol_of_each_benchmark():
  cifar = _vq_config("cifar100")
  imagenet_r = _vq_config("imagenet_r")
  cub = _vq_config("cub200")
  for config in (cifar, imagenet_r, cub):
    assert config.method == "vqprompt"
    assert (config.optimizer, config.weight_decay, config.lr,
            config.prompt_lr_multiplier, config.epochs) == ("adamw", 0.0,
                                                            0.0025, 5.0, 20)
    assert config.classifier_alignment and not config.dense_warmup
    assert (config.align_epochs, config.align_lr, config.align_final_lr,
            config.align_weight_decay) == (10, 1e-4, 1e-6, 5e-4)
    assert (config.num_prompted_layers, config.pool_size,
            config.prompt_length) == (5, 10, 8)
    assert (config.vq_commit_weight, config.vq_codebook_weight) == (0.4, 0.1)
    assert config.natural_order_seed0 and config.schedule_delay
    configuration.validate(config)
  assert (cifar.pretrained, cifar.batch_size, cifar.schedule,
          cifar.freeze_steps, cifar.iters_per_epoch, cifar.align_ratio,
          cifar.vq_temperature) == ("sup1k", 128, "cosine", 80, 40, 4, 1.0)
  assert (imagenet_r.pretrained, imagenet_r.batch_size, imagenet_r.freeze_steps,
          imagenet_r.iters_per_epoch) == ("sup1k", 64, 40, 40)
  assert (cub.pretrained, cub.batch_size, cub.schedule, cub.align_ratio,
          cub.vq_temperature) == ("sup21k", 128, "epoch_cosine", 2, 5.0)
  demo = configuration.use_method(helpers.benchmark_config("demo"), "vqprompt",
                                  epochs=8, batch_size=32)
  assert (demo.pretrained, demo.epochs, demo.batch_size) == ("demo", 8, 32)
  configuration.validate(demo)


def test_defaults_leave_other_methods_unchanged():
  config = configuration.base_config()
  assert not config.natural_order_seed0
  assert (config.vq_temperature, config.vq_commit_weight,
          config.vq_codebook_weight) == (1.0, 0.4, 0.1)


@pytest.mark.parametrize("field,value,message", [
    ("pool_size", 0, "pool_size=0 must be positive"),
    ("prompt_length", 7, "prompt_length=7 must be even"),
    ("vq_temperature", 0.0, "vq_temperature=0.0 must be positive"),
    ("vq_temperature", float("inf"), "vq_temperature=inf must be positive"),
    ("vq_commit_weight", -0.1, "vq_commit_weight=-0.1 must be finite"),
    ("vq_codebook_weight", float("nan"), "vq_codebook_weight=nan must be"),
])
def test_config_check_errors(field, value, message):
  config = configuration.base_config()
  configuration.use_method(config, "vqprompt", epochs=20, batch_size=128)
  vqprompt_spec.check(config, DIMS)
  config[field] = value
  with pytest.raises(errors.ConfigError, match=message):
    vqprompt_spec.check(config, DIMS)


def test_spec_module_imports_no_jax():
  tree = ast.parse(inspect.getsource(vqprompt_spec))
  names = [
      alias.name for node in ast.walk(tree)
      if isinstance(node, (ast.Import, ast.ImportFrom)) for alias in node.names
  ]
  names += [
      node.module
      for node in ast.walk(tree)
      if isinstance(node, ast.ImportFrom)
  ]
  assert not [n for n in names if n and {"jax", "flax"} & set(n.split("."))]
  assert registry.display_name("vqprompt") == "VQ-Prompt"
  assert registry.method_class("vqprompt") is vqprompt.VQPrompt


def test_seed0_class_order_with_and_without_the_switch():
  shuffled = data.class_order(100, 0)
  assert shuffled != list(range(100)) and sorted(shuffled) == list(range(100))
  assert data.class_order(100, 0, natural_seed0=True) == list(range(100))
  for seed in (1, 12, 48):
    assert (data.class_order(100, seed,
                             natural_seed0=True) == data.class_order(100, seed))
  config = configuration.base_config()
  config.update(dataset="digits", num_classes=10, num_tasks=5, image_size=16,
                cache_data=False, batch_size=8, natural_order_seed0=True)
  loaded = data.build_continual_data(config)
  assert loaded.class_order == list(range(10))
  assert loaded.class_ranges[1] == (2, 4)


# ---------------------------------------------------------------------------
# End to end.


@pytest.mark.slow
def test_tiny_digits_run_end_to_end(tmp_path):
  """Through `main`: every task trains with both VQ terms, aligns, tests."""
  config = helpers.tiny_config("method=vqprompt")
  assert helpers.run_main(config, tmp_path) == 0
  with open(tmp_path / "metrics.json") as f:
    metrics = json.load(f)
  assert metrics["method"] == "vqprompt"
  assert len(metrics["acc_matrix"]) == 5
  train = [e for e in metrics["train_log"] if e["phase"] == "train"]
  assert train and all(
      e["vq_commit"] > 0 and e["vq_codebook"] > 0 for e in train)
  assert {e["phase"] for e in metrics["train_log"]} == {"train"}
