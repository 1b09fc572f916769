"""The task loop's phase transitions and batch counts, phase by phase."""

import dataclasses
import io
import json
import logging

import jax
import numpy as np
import pytest
import tensorflow as tf

from smope_jax import checkpointing, distributed, experts, run_log, trainer
from smope_jax.data import sources
from smope_jax.errors import UserError
from tests import helpers


def tiny_config(**overrides):
  """The tiny run with 2 epochs of batch 64 per task, unless overridden."""
  return helpers.tiny_config(**{"epochs": 2, "batch_size": 64, **overrides})


def _counts(tree):
  leaves = jax.tree_util.tree_leaves_with_path(tree)
  return [int(np.asarray(v)) for p, v in leaves if "count" in str(p[-1])]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  return trainer.Run(tiny_config(), str(tmp_path_factory.mktemp("run")))


def test_warmup_then_top_k_phase_gets_a_new_optimizer(run):
  state, position = run.fresh_state()
  state, position = run.start_task(state, position)
  assert position.phase == "warmup"
  initial = distributed.to_host(state["trainable"])
  state, position = run.train_phase(state, position)
  assert position.phase == "train" and position.epoch == 0
  assert _counts(state["opt_state"]) and set(_counts(state["opt_state"])) == {0}
  trained = distributed.to_host(state["trainable"])
  assert not np.allclose(trained["prompts"]["keys"], initial["prompts"]["keys"])

  # The rest of task 0, then the start of task 1.
  for phase in ("train", "bookkeeping", "stats", "align", "eval"):
    assert position.phase == phase
    state, position = run.phases[phase](state, position)
  assert position.task == 1 and position.phase == "start"
  counts = distributed.to_host(state["method_state"]["counts"])
  per_head = counts.sum(-1)
  # The counting pass drops the last partial batch; K = 2 per sample.
  steps = run.data.train_size(0) // 64
  assert np.all(per_head == steps * 64 * 2)
  prompts = distributed.to_host(state["trainable"]["prompts"])

  state, position = run.start_task(state, position)
  assert position.phase == "train"
  snapshot = distributed.to_host(state["method_state"]["snapshot"])
  np.testing.assert_array_equal(snapshot["keys"], prompts["keys"])
  np.testing.assert_array_equal(snapshot["values"], prompts["values"])
  expected = experts.mark_frequent({
      "counts": counts,
      "frequent": np.zeros(counts.shape, bool)
  })
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
    self.index = {
        "train": everything,
        "test": everything.subset(np.arange(0, len(labels), 100))
    }

  def _items(self, index, positions):
    return list(self._images[index.keys[positions]])

  def decode(self, item):
    return tf.image.resize(item, [16, 16])


def test_a_task_of_5000_images_takes_39_steps_and_counts_39_batches(
    tmp_path, monkeypatch):
  monkeypatch.setattr(sources, "make_source", lambda config: _ArraySource())
  run = trainer.Run(
      tiny_config(num_tasks=2, batch_size=128, epochs=1, dense_warmup=False,
                  log_every_steps=1000), str(tmp_path))
  assert run.data.train_size(0) == 5000
  assert run.data.steps_per_epoch(0, 128) == 39
  state, position = run.fresh_state()
  state, position = run.start_task(state, position)
  state, position = run.train_phase(state, position)
  assert position.global_step == 39 and position.phase == "bookkeeping"
  state, position = run.count_experts(state, position)
  counts = distributed.to_host(state["method_state"]["counts"])
  # Every layer and head: 39 batches x 128 samples x K = 2.
  assert np.all(counts.sum(-1) == 39 * 128 * 2)


@pytest.fixture(scope="module", name="fresh")
def _fresh(run):
  """`run`'s fresh state and position, built once."""
  return run.fresh_state()


def _two_checkpoints(run, fresh, directory):
  """Steps 1 and 2 of the fresh state; returns the checkpointer."""
  state, meta = fresh[0], fresh[1].to_meta(run.config.to_dict())
  ckpt = checkpointing.Checkpointer(directory)
  ckpt.save(1, state, meta)
  ckpt.save(2, state, dict(meta, save_id=2))
  return ckpt


@pytest.mark.parametrize("damaged", [[1, 2], "meta", None, {
    "task": 0,
    "phase": "train"
}, {
    "config": [],
    "task": 0
}])
def test_metadata_of_another_shape_is_moved_aside(run, fresh, tmp_path,
                                                  damaged):
  ckpt = _two_checkpoints(run, fresh, tmp_path)
  with open(tmp_path / "2" / "meta" / "metadata", "w") as f:
    json.dump(damaged, f)
  step, _, meta = ckpt.restore_latest(fresh[0], check_meta=run.check_meta)
  ckpt.close()
  assert step == 1 and meta["save_id"] == 0
  assert (tmp_path / "corrupt-2").is_dir() and not (tmp_path / "2").exists()


def test_an_older_versions_checkpoint_is_refused(run, fresh, tmp_path):
  """Versions before the config was checkpointed wrote these keys."""
  ckpt = _two_checkpoints(run, fresh, tmp_path)
  older = {
      "task": 0,
      "phase": "train",
      "epoch": 0,
      "step": 3,
      "global_step": 3,
      "save_id": 2,
      "seed": 0,
      "acc_matrix": [],
      "task_seconds": [],
      "train_log": [],
      "train_images_per_second": []
  }
  with open(tmp_path / "2" / "meta" / "metadata", "w") as f:
    json.dump(older, f)
  with pytest.raises(
      UserError, match="written by an older smope_jax; use a "
      "new --workdir"):
    ckpt.restore_latest(fresh[0], check_meta=run.check_meta)
  ckpt.close()
  assert (tmp_path / "2").is_dir()


def test_a_diverging_alignment_names_align_lr_and_its_task(
    run, fresh, monkeypatch):
  config = run.config.copy_and_resolve_references()
  config.align_lr = 1e30
  monkeypatch.setattr(run, "config", config)
  state = dict(fresh[0])
  position = dataclasses.replace(fresh[1], task=1, phase="align")
  # Replayed features of unit variance around random class means.
  means = np.random.default_rng(0).normal(
      size=state["class_means"].shape).astype(np.float32)
  state["class_means"], state["class_vars"] = distributed.put_replicated(
      (means, np.ones_like(means)), run.mesh)
  with pytest.raises(UserError) as e:
    run.align(state, position)
  assert str(e.value).startswith(
      "training diverged at task 2, phase align: a learnable parameter is "
      "not finite.")
  assert "Lower --config.align_lr (now 1e+30)" in str(e.value)


def test_a_checkpoint_of_todays_metadata_format_resumes(run, fresh, tmp_path,
                                                        monkeypatch):
  """The metadata dict as `Run` wrote it before `Position` (mid-task, with
  its task clock) resumes at its position."""
  meta = {
      "config": run.config.to_dict(),
      "task": 1,
      "phase": "train",
      "epoch": 1,
      "step": 3,
      "global_step": 40,
      "save_id": 7,
      "seed": int(run.config.seed),
      "acc_matrix": [[55.5]],
      "task_seconds": [12.5],
      "train_log": [{
          "global_step": 10,
          "task": 0,
          "phase": "warmup",
          "loss": 2.5,
          "acc": 10.0
      }],
      "train_images_per_second": [300.0],
      "task_clock": 1.7e9
  }
  ckpt = checkpointing.Checkpointer(tmp_path)
  ckpt.save(7, fresh[0], meta)
  monkeypatch.setattr(run, "checkpointer", ckpt)
  _, position = run.resume()
  ckpt.close()
  assert position == trainer.Position(
      task=1, phase="train", epoch=1, step=3, global_step=40, save_id=7,
      seed=int(run.config.seed), acc_matrix=((55.5,),), task_seconds=(12.5,),
      train_log=(meta["train_log"][0],), train_images_per_second=(300.0,))
  del meta["task_clock"]  # A clock, not part of the position.
  assert json.loads(json.dumps(position.to_meta(run.config.to_dict()))) == meta


class _Terminal(io.StringIO):

  def isatty(self):
    return True


def _log_a_training_interval(run, stream):
  """A RunLog with the bar asked for, through two steps and an interval."""
  config = run.config.copy_and_resolve_references()
  config.progress_bar = True
  log = run_log.RunLog(config, run.data, run.reporter, stream=stream)
  position = trainer.Position(seed=0, phase="train")
  log.training_started(position, epochs=2, steps_per_epoch=5)
  for step in (1, 2):
    position = dataclasses.replace(position, step=step, global_step=step)
    log.train_step(position, "train", np.zeros(()), 64, epochs=2)
  log.interval(position, {
      "loss": 1.5,
      "acc": 50.0
  }, {"prompts": np.float32(0.01)}, epochs=2)
  log.training_ended(position)


def test_a_training_interval_logs_its_metrics_and_etas(run, caplog):
  with caplog.at_level(logging.INFO):
    _log_a_training_interval(run, io.StringIO())
  line = [
      r.getMessage() for r in caplog.records if "| loss " in r.getMessage()
  ][0]
  assert line.startswith(f"task 1/{run.data.num_tasks} train epoch 1/2 step 2/")
  for needle in ("| loss 1.5000 () | acc 50.0% | lr prompts 0.01 | ",
                 " img/s | ETA phase ", ", run "):
    assert needle in line, (needle, line)


def test_the_bar_is_drawn_on_a_terminal_only(run, tmp_path):
  terminal = _Terminal()
  _log_a_training_interval(run, terminal)
  assert "\r" in terminal.getvalue()
  assert f"task 1/{run.data.num_tasks} train epoch 1/2" in terminal.getvalue()
  with open(tmp_path / "stderr.txt", "w") as file:
    _log_a_training_interval(run, file)
  assert (tmp_path / "stderr.txt").read_text() == ""
