"""The task loop's phase transitions and batch counts, phase by phase."""

import json

import jax
import numpy as np
import pytest
import tensorflow as tf

from smope_jax import checkpointing, distributed, experts, trainer
from smope_jax.data import sources
from smope_jax.errors import UserError
from configs import demo


def tiny_config(**overrides):
  config = demo.get_config()
  config.pretrained = ""
  config.image_size = 16
  config.model.update(patch_size=8, hidden_size=16, num_layers=2,
                      num_heads=2, mlp_dim=32)
  config.update(num_prompted_layers=1, num_experts=4, top_k=2, epochs=2,
                batch_size=64, eval_batch_size=128, freeze_steps=1,
                align_epochs=1, progress_bar=False)
  config.update(overrides)
  return config


def _counts(tree):
  leaves = jax.tree_util.tree_leaves_with_path(tree)
  return [int(np.asarray(v)) for p, v in leaves if "count" in str(p[-1])]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  return trainer.Run(tiny_config(), str(tmp_path_factory.mktemp("run")))


def test_warmup_then_top_k_phase_gets_a_new_optimizer(run):
  (state, run.frozen), meta = run.fresh_state()
  state = run.start_task(state, meta)
  assert meta["phase"] == "warmup"
  initial = distributed.to_host(state["trainable"])
  state = run.train_phase(state, meta)
  assert meta["phase"] == "train" and meta["epoch"] == 0
  assert _counts(state["opt_state"]) and set(_counts(state["opt_state"])) == {0}
  trained = distributed.to_host(state["trainable"])
  assert not np.allclose(trained["prompts"]["keys"], initial["prompts"]["keys"])

  # The rest of task 0, then the start of task 1.
  for phase in ("train", "bookkeeping", "stats", "align", "eval"):
    assert meta["phase"] == phase
    state = run.phases[phase](state, meta)
  assert meta["task"] == 1 and meta["phase"] == "start"
  counts = distributed.to_host(state["method_state"]["counts"])
  per_head = counts.sum(-1)
  # The counting pass drops the last partial batch; K = 2 per sample.
  steps = run.data.train_size(0) // 64
  assert np.all(per_head == steps * 64 * 2)
  prompts = distributed.to_host(state["trainable"]["prompts"])

  state = run.start_task(state, meta)
  assert meta["phase"] == "train"
  snapshot = distributed.to_host(state["method_state"]["snapshot"])
  np.testing.assert_array_equal(snapshot["keys"], prompts["keys"])
  np.testing.assert_array_equal(snapshot["values"], prompts["values"])
  expected = experts.mark_frequent(
      {"counts": counts, "frequent": np.zeros(counts.shape, bool)})
  np.testing.assert_array_equal(
      distributed.to_host(state["method_state"]["frequent"]),
      np.asarray(expected["frequent"]))
  assert set(_counts(state["opt_state"])) == {0}


class _ArraySource(sources.Source):
  """10 classes of 1,000 random 8x8 images: 5,000 per task of 5 classes."""

  name = "arrays"
  class_names = [str(c) for c in range(10)]

  def __init__(self):
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(10), 1000)
    self._images = rng.uniform(size=(len(labels), 8, 8, 3)).astype(np.float32)
    everything = sources.RoleIndex("", np.arange(len(labels)), labels)
    self.index = {"train": everything, "test": everything.subset(
        np.arange(0, len(labels), 100))}

  def _items(self, index, positions):
    return list(self._images[index.keys[positions]])

  def decode(self, item):
    return tf.image.resize(item, [16, 16])


def test_a_task_of_5000_images_takes_39_steps_and_counts_39_batches(
    tmp_path, monkeypatch):
  monkeypatch.setattr(sources, "make_source", lambda config: _ArraySource())
  run = trainer.Run(tiny_config(num_tasks=2, batch_size=128, epochs=1,
                                 dense_warmup=False, log_every_steps=1000),
                    str(tmp_path))
  assert run.data.train_size(0) == 5000
  assert run.data.steps_per_epoch(0, 128) == 39
  (state, run.frozen), meta = run.fresh_state()
  state = run.start_task(state, meta)
  state = run.train_phase(state, meta)
  assert meta["global_step"] == 39 and meta["phase"] == "bookkeeping"
  state = run.bookkeeping(state, meta)
  counts = distributed.to_host(state["method_state"]["counts"])
  # Every layer and head: 39 batches x 128 samples x K = 2.
  assert np.all(counts.sum(-1) == 39 * 128 * 2)


@pytest.fixture(scope="module", name="fresh")
def _fresh(run):
  """`run`'s fresh state and meta, built once (about 6 s of CPU)."""
  (state, run.frozen), meta = run.fresh_state()
  return state, meta


def _two_checkpoints(fresh, directory):
  """Steps 1 and 2 of the fresh state; returns the checkpointer."""
  state, meta = fresh
  ckpt = checkpointing.Checkpointer(directory)
  ckpt.save(1, state, meta)
  ckpt.save(2, state, dict(meta, save_id=2))
  return ckpt


@pytest.mark.parametrize("damaged", [
    [1, 2], "meta", None, {"task": 0, "phase": "train"},
    {"config": [], "task": 0}])
def test_metadata_of_another_shape_is_moved_aside(run, fresh, tmp_path,
                                                  damaged):
  ckpt = _two_checkpoints(fresh, tmp_path)
  with open(tmp_path / "2" / "meta" / "metadata", "w") as f:
    json.dump(damaged, f)
  step, _, meta = ckpt.restore_latest(fresh[0],
                                      check_meta=run.check_checkpoint)
  ckpt.close()
  assert step == 1 and meta["save_id"] == 0
  assert (tmp_path / "corrupt-2").is_dir() and not (tmp_path / "2").exists()


def test_an_older_versions_checkpoint_is_refused(run, fresh, tmp_path):
  """Versions before the config was checkpointed wrote these keys."""
  ckpt = _two_checkpoints(fresh, tmp_path)
  older = {"task": 0, "phase": "train", "epoch": 0, "step": 3,
           "global_step": 3, "save_id": 2, "seed": 0, "acc_matrix": [],
           "task_seconds": [], "train_log": [], "train_images_per_second": []}
  with open(tmp_path / "2" / "meta" / "metadata", "w") as f:
    json.dump(older, f)
  with pytest.raises(UserError, match="written by an older smope_jax; use a "
                     "new --workdir"):
    ckpt.restore_latest(fresh[0], check_meta=run.check_checkpoint)
  ckpt.close()
  assert (tmp_path / "2").is_dir()


def test_a_diverging_alignment_names_align_lr_and_its_task(run, fresh,
                                                          monkeypatch):
  config = run.config.copy_and_resolve_references()
  config.align_lr = 1e30
  monkeypatch.setattr(run, "config", config)
  state, meta = dict(fresh[0]), dict(fresh[1], task=1, phase="align")
  # Replayed features of unit variance around random class means.
  means = np.random.default_rng(0).normal(
      size=state["class_means"].shape).astype(np.float32)
  state["class_means"], state["class_vars"] = distributed.put_replicated(
      (means, np.ones_like(means)), run.mesh)
  with pytest.raises(UserError) as e:
    run.align(state, meta)
  assert str(e.value).startswith(
      "training diverged at task 2, phase align: a learnable parameter is "
      "not finite.")
  assert "Lower --config.align_lr (now 1e+30)" in str(e.value)
