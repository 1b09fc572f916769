"""The task loop's phase transitions, on the bundled digits (no mocking)."""

import jax
import numpy as np
import pytest

from smope_jax import distributed, experts, trainer
from configs import demo


def _tiny_config():
  config = demo.get_config()
  config.image_size = 16
  config.model.update(patch_size=8, hidden_size=16, num_layers=2,
                      num_heads=2, mlp_dim=32)
  config.update(num_prompted_layers=1, num_experts=4, top_k=2, epochs=2,
                batch_size=64, eval_batch_size=128, freeze_steps=1,
                align_epochs=1, progress_bar=False)
  return config


def _counts(tree):
  leaves = jax.tree_util.tree_leaves_with_path(tree)
  return [int(np.asarray(v)) for p, v in leaves if "count" in str(p[-1])]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  return trainer.Run(_tiny_config(), str(tmp_path_factory.mktemp("run")))


def test_warmup_then_top_k_phase_gets_a_new_optimizer(run):
  (state, run.frozen), meta = run.fresh_state()
  state = run.phase_start(state, meta)
  assert meta["phase"] == "warmup"
  initial = distributed.to_host(state["trainable"])
  state = run.phase_warmup(state, meta)
  assert meta["phase"] == "train" and meta["epoch"] == 0
  assert _counts(state["opt_state"]) and set(_counts(state["opt_state"])) == {0}
  trained = distributed.to_host(state["trainable"])
  assert not np.allclose(trained["prompts"]["keys"], initial["prompts"]["keys"])

  # The rest of task 0, then the start of task 1.
  for phase in ("train", "count", "stats", "align", "eval"):
    assert meta["phase"] == phase
    state = getattr(run, "phase_" + phase)(state, meta)
  assert meta["task"] == 1 and meta["phase"] == "start"
  counts = distributed.to_host(state["expert_state"]["counts"])
  per_head = counts.sum(-1)
  # Every training image adds K = 2 activations in every head.
  assert np.all(per_head == run.data.train_size(0) * 2)
  prompts = distributed.to_host(state["trainable"]["prompts"])

  state = run.phase_start(state, meta)
  assert meta["phase"] == "train"
  snapshot = distributed.to_host(state["snapshot"])
  np.testing.assert_array_equal(snapshot["keys"], prompts["keys"])
  np.testing.assert_array_equal(snapshot["values"], prompts["values"])
  expected = experts.mark_frequent(
      {"counts": counts, "frequent": np.zeros(counts.shape, bool)})
  np.testing.assert_array_equal(
      distributed.to_host(state["expert_state"]["frequent"]),
      np.asarray(expected["frequent"]))
  assert set(_counts(state["opt_state"])) == {0}
