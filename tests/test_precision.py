"""bfloat16 products, float32 routing, precision defaults, the study tool."""

import json

import chex
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from smope_jax import precision
from smope_jax import configuration, precision_study, trainer
from smope_jax.errors import ConfigError
from smope_jax.methods import smope
from smope_jax.models import attention, matmul, vit
from smope_jax.models import prompt_attention as pa
import test_trainer


def _bf16(x):
  """x rounded to bfloat16 (to nearest even), back in float64."""
  return np.asarray(x, np.float32).astype(ml_dtypes.bfloat16).astype(np.float64)


def _random(*shape, seed=0):
  return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def test_dot_general_rounds_operands_and_sums_in_float32():
  a, b = _random(6, 40), _random(40, 5, seed=1)
  got = matmul.dot_general(jnp.asarray(a), jnp.asarray(b),
                           (((1,), (0,)), ((), ())))
  chex.assert_type(got, jnp.float32)
  want = _bf16(a) @ _bf16(b)
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-5)
  # It is not the float32 product: the rounding shows.
  assert np.max(np.abs(want - a.astype(np.float64) @ b)) > 1e-3


def test_einsum_and_conv_round_like_numpy():
  q, k = _random(2, 3, 4, 8), _random(2, 3, 5, 8, seed=1)
  got = matmul.einsum("bhqd,bhkd->bhqk", jnp.asarray(q), jnp.asarray(k),
                      bfloat16=True)
  chex.assert_type(got, jnp.float32)
  np.testing.assert_allclose(got,
                             np.einsum("bhqd,bhkd->bhqk", _bf16(q), _bf16(k)),
                             rtol=1e-6, atol=1e-5)
  # A patch embedding is a product of each patch with the kernel.
  images, kernel = _random(2, 8, 8, 3), _random(4, 4, 3, 6, seed=2)
  got = matmul.conv_general_dilated(jnp.asarray(images), jnp.asarray(kernel),
                                    (4, 4), "VALID",
                                    dimension_numbers=("NHWC", "HWIO", "NHWC"))
  patches = _bf16(images).reshape(2, 2, 4, 2, 4, 3).transpose(0, 1, 3, 2, 4, 5)
  want = np.einsum("bijxyc,xyco->bijo", patches, _bf16(kernel))
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-5)
  # In a bfloat16 model the result stays bfloat16.
  chex.assert_type(
      matmul.einsum("ij,jk->ik", jnp.ones((2, 3), jnp.bfloat16),
                    jnp.ones((3, 2), jnp.bfloat16), bfloat16=True),
      jnp.bfloat16)


L, E, K = 2, 6, 3


def _model(**kw):
  products = kw.pop("score_products", "")
  prompts = smope.SMoPEPrompts(num_layers=L, num_heads=2, num_experts=E,
                               head_dim=8, top_k=K, epsilon=0.4,
                               inference_penalty=2.0, score_products=products)
  return vit.VisionTransformer(num_classes=10, patch_size=4, hidden_size=16,
                               num_layers=3, num_heads=2, mlp_dim=32,
                               prompts=prompts, **kw)


_IMAGES = jnp.asarray(
    np.random.default_rng(0).uniform(size=(4, 8, 8, 3)), jnp.float32)
_CONTEXT = {
    "counts": jnp.ones((L, 2, E), jnp.int32),
    "frequent": jnp.zeros((L, 2, E), bool)
}


def _products(model, params):
  """(operand dtypes, precision) of every product in the eval forward."""
  jaxpr = jax.make_jaxpr(
      lambda p: model.apply(p, _IMAGES, _CONTEXT, mode="eval"))(params)
  found = []

  def visit(eqns):
    for eqn in eqns:
      if eqn.primitive.name in ("dot_general", "conv_general_dilated"):
        found.append((tuple(str(v.aval.dtype) for v in eqn.invars),
                      str(eqn.params.get("precision"))))
      for sub in jax.core.jaxprs_in_params(eqn.params):
        visit(sub.eqns)

  visit(jaxpr.jaxpr.eqns)
  return found


@pytest.fixture(scope="module")
def params():
  return _model().init(jax.random.key(0), _IMAGES, _CONTEXT, mode="train")


def test_bfloat16_products_reach_every_product_of_the_model(params):
  found = _products(_model(bfloat16_products=True, score_products="bfloat16"),
                    params)
  # Embedding, 4 Dense per block and 2 attention einsums, scores, prefix
  # values, head.
  assert len(found) >= 1 + 3 * 6 + L * 2 + 1
  assert all(dtypes == ("bfloat16", "bfloat16") for dtypes, _ in found)
  assert not any(dtypes == ("bfloat16", "bfloat16")
                 for dtypes, _ in _products(_model(), params))


def test_float32_routing_keeps_the_scores_products_float32(params):
  model = _model(bfloat16_products=True, float32_routing=True,
                 score_products="float32")
  found = _products(model, params)
  full = [p for p in found if p[0] == ("float32", "float32")]
  # The mean query's projection in each of the 3 blocks (XLA drops the
  # unprompted block's, unused) and the scores of the L prompted blocks.
  assert len(full) == 3 + L
  assert all("HIGHEST" in precision for _, precision in full)
  assert len(found) - len(full) == sum(
      d == ("bfloat16", "bfloat16") for d, _ in found)


def test_float32_routing_scores_in_a_bfloat16_model(params):
  out = _model(dtype=jnp.bfloat16, float32_routing=True,
               score_products="float32").apply(params, _IMAGES, _CONTEXT,
                                               mode="train")
  chex.assert_type(out["scores"], jnp.float32)
  chex.assert_type(out["selected"], jnp.int32)
  chex.assert_shape(out["scores"], (L, 4, 2, E))
  # In a float32 model the float32 path is the same scores, to rounding.
  plain = _model().apply(params, _IMAGES, _CONTEXT, mode="eval")
  routed = _model(float32_routing=True,
                  score_products="float32").apply(params, _IMAGES, _CONTEXT,
                                                  mode="eval")
  np.testing.assert_allclose(routed["scores"], plain["scores"], rtol=1e-5,
                             atol=1e-5)


def test_mean_query_float32_is_the_mean_projected_token():
  tokens = _random(3, 5, 16).astype(ml_dtypes.bfloat16)
  projection = {
      "kernel": _random(16, 2, 8, seed=1),
      "bias": _random(2, 8, seed=2)
  }
  got = vit.mean_query_float32(jnp.asarray(tokens),
                               jax.tree.map(jnp.asarray, projection))
  chex.assert_type(got, jnp.float32)
  chex.assert_shape(got, (3, 1, 2, 8))
  want = np.einsum("bnD,Dhd->bnhd", tokens.astype(np.float64),
                   projection["kernel"]) + projection["bias"]
  np.testing.assert_allclose(got[:, 0], want.mean(1), rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="products"):
    pa.expert_scores(jnp.zeros((1, 2, 2, 8)), jnp.zeros((2, E, 8)), "tf32")


def test_resolve_precision_per_platform():
  config = configuration.base_config()
  for field in ("dtype", "matmul_precision", "routing_precision"):
    config[field] = "auto"
  for platform in ("cpu", "gpu", "tpu"):
    got = precision.resolve_precision(config, platform)
    assert got == precision.PRECISION_DEFAULTS[platform]
    assert "auto" not in got.values()
  assert (precision.resolve_precision(
      config, "cuda") == precision.PRECISION_DEFAULTS["gpu"])
  config.matmul_precision = "bfloat16"  # A concrete value is kept.
  assert precision.resolve_precision(config,
                                     "tpu")["matmul_precision"] == "bfloat16"
  with pytest.raises(ConfigError, match="platform 'ipu'"):
    precision.resolve_precision(config, "ipu")


def test_model_precision_leaves_the_float32_model_alone():
  config = configuration.base_config()
  assert precision.model_precision(config) == {
      "bfloat16_products": False,
      "float32_routing": False,
      "score_products": "",
      "context": "highest"
  }
  config.dtype = "bfloat16"
  assert precision.model_precision(config)["float32_routing"]
  config.update(dtype="float32", matmul_precision="bfloat16",
                routing_precision="backbone")
  assert precision.model_precision(config) == {
      "bfloat16_products": True,
      "float32_routing": False,
      "score_products": "bfloat16",
      "context": "highest"
  }
  config.matmul_precision = "fp8"
  with pytest.raises(ConfigError, match="config.matmul_precision"):
    configuration.validate(config)


def test_agreement_counts_same_expert_sets():
  ref = np.array([[[[0, 1], [2, 3]], [[4, 5], [0, 2]]]])  # (1, 2, 2, 2)
  same = ref[..., ::-1]  # Order within K does not matter.
  assert precision_study.agreement(same, ref) == 1.0
  other = ref.copy()
  other[0, 1, 0] = [4, 6]
  assert precision_study.agreement(other, ref) == 0.75


def test_final_losses_average_the_last_task_top_k_intervals():
  log = [{
      "task": 0,
      "phase": "train",
      "router": 9.0,
      "prototype": 0.0
  }, {
      "task": 1,
      "phase": "train",
      "router": 2.0,
      "prototype": 1.0
  }, {
      "task": 1,
      "phase": "train",
      "router": 4.0,
      "prototype": 3.0
  }, {
      "task": 2,
      "phase": "warmup",
      "router": 7.0
  }]
  assert precision_study.final_losses({"train_log": log}) == {
      "router": 3.0,
      "prototype": 2.0
  }


@pytest.mark.slow
def test_study_reads_a_finished_run(tmp_path):
  config = test_trainer.tiny_config(epochs=1, num_tasks=2, dense_warmup=False,
                                    classifier_alignment=False)
  workdir = str(tmp_path / "run")
  trainer.train_and_evaluate(config, workdir)
  with open(f"{workdir}/metrics.json") as f:
    metrics = json.load(f)
  [row] = precision_study.study(workdir, [])
  # The study's forward is the run's last evaluation.
  np.testing.assert_allclose(row["last_row_recomputed"],
                             metrics["acc_matrix"][-1])
  # One prompted block and 2 heads per image.
  assert row["decisions"] > 0 and row["decisions"] % 2 == 0
  assert row["faa"] == metrics["faa"] and row["routing_agreement"] == 1.0
  assert "| 100.00 % of" in precision_study.format_table([row])


def test_fused_attention_takes_bfloat16_products():
  q, k, v = (jnp.asarray(_random(2, 5, 2, 8, seed=s)) for s in range(3))
  prefix = attention.Prefix(values=jnp.asarray(_random(2, 2, 3, 8, seed=3)),
                            bias=jnp.asarray(_random(2, 2, 3, seed=4)))
  fused = attention.prefix_attention(q, k, v, prefix, fused=True,
                                     bfloat16_products=True)
  unfused = attention.prefix_attention(q, k, v, prefix, bfloat16_products=True)
  exact = attention.prefix_attention(q, k, v, prefix)
  chex.assert_type(fused, jnp.float32)
  np.testing.assert_allclose(fused, unfused, atol=3e-2)
  assert 0 < np.max(np.abs(unfused - exact)) < 3e-2
