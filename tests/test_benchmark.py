"""The cost benchmark on the tiny demo model: JSON schema and cost relations.

One subprocess runs the real command line (1 timed call, small matmul
probe); the tests read the JSON it writes.
"""

import importlib.util
import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import pytest

from smope_jax.benchmark import report
from smope_jax import train_step as ts
from smope_jax import factory
from tests import helpers

MODEL_ROWS = ("smope_train", "smope_inference", "plain_vit", "dense_prompts",
              "l2p_inference", "l2p_train", "hideprompt_inference",
              "hideprompt_stage1", "hideprompt_tii_train", "hideprompt_train")
POSITIVE_ROW_KEYS = ("gflops_per_image", "gflops_per_step", "seconds_median",
                     "images_per_second", "gflop_per_second",
                     "matmul_gflop_per_second", "fraction_of_matmul",
                     "cpu_seconds_median", "fraction_of_matmul_cpu_time",
                     "compile_seconds", "compiled_memory_bytes",
                     "peak_memory_bytes")
BATCH = 4


@pytest.fixture(scope="module")
def record(tmp_path_factory):
  out = tmp_path_factory.mktemp("benchmark") / "demo.json"
  proc = helpers.run_module("benchmark", "--config=configs/demo.py",
                            f"--config.batch_size={BATCH}", "--repeats=1",
                            "--warmup=0", "--matmul_size=256",
                            "--methods=l2p,hideprompt", f"--out={out}",
                            timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "| smope_train |" in proc.stdout
  with open(out) as f:
    return json.load(f)


def _positive(value):
  return isinstance(
      value, (int, float)) and not isinstance(value, bool) and (value > 0)


def test_top_level_schema(record):
  for key in ("date", "machine", "weights", "model", "batch", "batch_source",
              "repeats", "warmup", "params", "params_by_method",
              "memory_source", "rows", "ratios", "config"):
    assert key in record, key
  assert record["batch"] == BATCH and record["repeats"] == 1
  assert record["batch_source"] == "--config.batch_size"
  assert record["config"].endswith("configs/demo.py")
  assert "pretrained is ignored" in record["weights"]
  assert record["memory_source"] in (report.measure.MEMORY_DEVICE,
                                     report.measure.MEMORY_RSS)
  assert isinstance(record["machine"]["platform"], str)
  assert set(record["rows"]) == set(MODEL_ROWS) | {"matmul"}


@pytest.mark.parametrize("name", MODEL_ROWS)
def test_model_rows_hold_positive_numbers(record, name):
  row = record["rows"][name]
  assert isinstance(row["description"], str) and row["description"]
  for key in POSITIVE_ROW_KEYS:
    assert _positive(row[key]), (name, key, row[key])
  assert len(row["seconds"]) == len(row["cpu_seconds"]) == 1
  assert row["images_per_second"] == pytest.approx(BATCH /
                                                   row["seconds_median"])
  assert row["gflops_per_step"] == pytest.approx(BATCH *
                                                 row["gflops_per_image"])
  assert row["fraction_of_matmul"] == pytest.approx(
      row["gflop_per_second"] / row["matmul_gflop_per_second"])


def test_matmul_row(record):
  row = record["rows"]["matmul"]
  assert row["size"] == 256
  assert row["gflops_per_step"] == pytest.approx(2 * 256**3 / 1e9)
  assert row["fraction_of_matmul"] == 1.0
  assert _positive(row["gflop_per_second"])
  # Sampled before and after every timed call of every model row.
  assert len(row["seconds"]) == len(MODEL_ROWS) * (record["repeats"] + 1)


def test_parameter_counts(record):
  p, m = record["params"], record["model"]
  head_dim = m["hidden_size"] // m["num_heads"]
  prompts = m["num_prompted_layers"] * m["num_heads"] * m["num_experts"] * (
      2 * head_dim)
  head = m["hidden_size"] * m["num_classes"] + m["num_classes"]
  assert (p["prompts"], p["head"]) == (prompts, head)
  assert p["learnable"] == p["prompts"] + p["head"]
  assert _positive(p["frozen"]) and p["frozen"] > p["learnable"]


def test_cost_relations(record):
  flops = {n: record["rows"][n]["gflops_per_image"] for n in MODEL_ROWS}
  # L2P needs a query pass: about two forwards; SMoPE one.
  assert flops["l2p_inference"] > 1.5 * flops["plain_vit"]
  assert flops["smope_inference"] < 0.6 * flops["l2p_inference"]
  assert flops["plain_vit"] <= flops["smope_inference"] < flops["dense_prompts"]
  assert flops["smope_train"] > flops["smope_inference"]
  assert flops["smope_train"] < flops["l2p_train"]
  ratios = record["ratios"]
  assert ratios["inference_flops_vs_l2p"] == pytest.approx(
      flops["smope_inference"] / flops["l2p_inference"])
  assert ratios["inference_flops_vs_plain"] == pytest.approx(
      flops["smope_inference"] / flops["plain_vit"])
  l2p = record["params_by_method"]["l2p"]
  assert l2p["prompts"] == 1 * 30 * 20 * 64 + 1 * 30 * 64  # Pool and keys.
  assert l2p["head"] == record["params"]["head"]


def test_hideprompt_rows_cost_its_two_stages(record):
  """Inference is stage 1 (the frozen ViT and the TII classifier) and then
  the prompted forward (both share the patch embedding); stage 2's train
  step has no stage-1 pass."""
  rows = record["rows"]
  flops = {n: rows[n]["gflops_per_image"] for n in MODEL_ROWS}
  stage1 = flops["hideprompt_stage1"]
  prompted = flops["hideprompt_inference"] - stage1
  assert flops["plain_vit"] < stage1 < 1.1 * flops["plain_vit"]
  assert 0.8 * flops["plain_vit"] < prompted < 1.2 * flops["plain_vit"]
  assert stage1 < flops["hideprompt_tii_train"] < flops["hideprompt_train"]
  assert 2 * prompted < flops["hideprompt_train"] < 3 * prompted
  assert "TII" in rows["hideprompt_stage1"]["description"]
  assert record["ratios"]["train_flops_vs_hideprompt"] == pytest.approx(
      flops["smope_train"] / flops["hideprompt_train"])


def test_table_lists_every_row(record):
  table = report.format_table(record)
  for name in MODEL_ROWS:
    assert f"| {name} |" in table
  assert "learnable parameters" in table


def test_imagenet_r_learnable_count_is_the_papers():
  """384,200 = 6 x 12 x 25 x 2 x 64 prompts + the 200-class head: the paper's "0.38 M"."""
  spec = importlib.util.spec_from_file_location(
      "imagenet_r", os.path.join(helpers.REPO, "configs", "imagenet_r.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config("tasks=10")
  model, _ = factory.build_model(config, config.num_tasks)
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(
      0), jnp.zeros((1, 224, 224, 3)), None, mode="dense"))["params"]
  counts = ts.parameter_counts(shapes)
  assert counts["learnable"] == 384_200
  assert counts["prompts"] == 230_400


def test_batch_resolution():
  config = ml_collections.ConfigDict({"batch_size": 64})
  assert report.resolve_batch(config, 8, True, "cpu") == (8, "--batch")
  assert report.resolve_batch(config, 0, True, "cpu")[0] == 64
  assert report.resolve_batch(config, 0, False, "cpu")[0] == report.CPU_BATCH
  assert report.resolve_batch(config, 0, False, "gpu")[0] == 64
