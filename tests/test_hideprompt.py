"""HiDe-Prompt as a registered method: protocol, hooks, and its phases in
the trainer, phase by phase over two tasks, with a checkpoint after each.

The end-to-end runs through `main` (and resume after a kill) are marked
slow.
"""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow as tf

from configs import demo
from smope_jax import configuration, distributed, trainer
from smope_jax.data import pipeline
from smope_jax.data import preprocess
from smope_jax.errors import ConfigError
from smope_jax.hide import losses as hide_losses
from smope_jax.hide import steps as hide_steps
from smope_jax.methods import hideprompt, registry
from tests import helpers

TASK_PHASES = [
    "start", "tii_train", "tii_stats", "tii_align", "train", "merge", "stats",
    "align", "eval"
]


def _benchmark(dataset, classes):
  config = configuration.base_config()
  config.update(dataset=dataset, num_classes=classes)
  return configuration.use_method(config, "hideprompt", epochs=20)


def test_registered_with_the_protocol_of_its_scripts():
  assert registry.get("hideprompt").display_name == "HiDe-Prompt"
  cifar = _benchmark("cifar100", 100)
  configuration.validate(cifar)
  assert (cifar.batch_size, cifar.eval_batch_size, cifar.epochs) == (192, 192,
                                                                     50)
  assert cifar.lr == pytest.approx(2.8125e-3)
  assert cifar.hide.tii_lr == pytest.approx(4.6875e-5)
  assert cifar.hide.tii_ca_lr == pytest.approx(4.6875e-4)
  assert (cifar.prompt_length, cifar.num_prompted_layers) == (5, 5)
  assert (cifar.hide.reg, cifar.hide.schedule) == (0.1, "epoch_step")
  assert cifar.hide.natural_order and cifar.pretrained == "orig_in21k"
  assert cifar.hide.transforms
  imr = _benchmark("imagenet_r", 200)
  assert (imr.epochs, imr.prompt_length, imr.hide.reg,
          imr.hide.schedule) == (150, 20, 0.5, "epoch_cosine_min")
  cub = _benchmark("caltech_birds2011", 200)
  assert not cub.hide.larger_prompt_lr and cub.hide.reg == 0.01
  assert cub.hide.tii_lr == pytest.approx(9.375e-4)
  # Other methods keep their settings: the group is read by HiDe only.
  assert not configuration.base_config().hide.natural_order
  assert not configuration.base_config().hide.transforms
  assert not demo.get_config("method=hideprompt").hide.transforms


def test_batches_off_the_windows_end_with_a_shorter_group():
  config = demo.get_config("method=hideprompt")
  assert (config.batch_size, config.eval_batch_size) == (24, 48)
  config.batch_size = 32
  configuration.validate(config)
  values = jnp.arange(32, dtype=jnp.float32)
  mask = jnp.ones(32).at[30:].set(0.0)
  want = (np.mean(np.arange(24)) + np.mean(np.arange(24, 30))) / 2
  np.testing.assert_allclose(hide_losses.group_mean(values, mask), want)
  config.hide.momentum = 1.0
  with pytest.raises(ConfigError, match="momentum"):
    configuration.validate(config)
  # Evaluation batches off the windows would change the pairing, and so
  # the results (a resume may change the evaluation batch).
  config.hide.momentum = 0.01
  config.eval_batch_size = 40
  with pytest.raises(ConfigError, match="eval_batch_size=40"):
    configuration.validate(config)
  config.hide.intended_pairing = True
  configuration.validate(config)


def _method(**hide):
  config = demo.get_config("method=hideprompt")
  config.hide.update(hide)
  dims = configuration.model_dims(config)
  return hideprompt.HiDePrompt(config, 5, dims), dims


def test_phases_of_a_task():
  method, _ = _method()
  assert method.phases(0, True) == [p for p in TASK_PHASES if "align" not in p]
  assert method.phases(3, True) == TASK_PHASES
  assert "align" not in method.phases(3, False)


def test_spread_windows_deals_real_samples_out_leading_each_window():
  local = {"label": np.arange(48), "mask": (np.arange(48) < 29) * 1.0}
  out = hide_steps.spread_windows(local, 24)
  np.testing.assert_array_equal(out["mask"][:24], np.arange(24) < 15)
  np.testing.assert_array_equal(out["mask"][24:], np.arange(24) < 14)
  assert sorted(out["label"]) == list(range(48))
  assert set(out["label"][out["mask"] > 0]) == set(range(29))
  full = {"label": np.arange(24), "mask": np.ones(24)}
  assert hide_steps.spread_windows(full, 24) is full


def test_subgroup_rates_leave_untrained_groups_alone():
  direction = {
      "prompts": {
          "e_prompt": jnp.ones(3),
          "tii": {
              "w": jnp.ones(2)
          }
      },
      "head": {
          "kernel": jnp.ones(2)
      }
  }
  scaled = hide_steps.subgroup_rates(direction, {
      "e_prompt": 0.0,
      "tii": 0.5,
      "head": 2.0
  })
  np.testing.assert_array_equal(scaled["prompts"]["e_prompt"], 0.0)
  np.testing.assert_array_equal(scaled["prompts"]["tii"]["w"], -0.5)
  np.testing.assert_array_equal(scaled["head"]["kernel"], -2.0)


def test_start_task_copies_the_slot_and_draws_the_head_once():
  method, dims = _method()
  e_prompt = jnp.arange(2 * 2 * 5 * 3 * 2,
                        dtype=jnp.float32).reshape(2, 2, 5, 3, 2, 1)
  trainable = {
      "prompts": {
          "e_prompt": e_prompt,
          "tii": {}
      },
      "head": {
          "kernel": jnp.ones((4, 10)),
          "bias": jnp.ones(10)
      }
  }
  key = jax.random.PRNGKey(0)
  first, _ = method.start_task(trainable, {}, jnp.int32(0), key)
  np.testing.assert_array_equal(first["prompts"]["e_prompt"], e_prompt)
  np.testing.assert_array_equal(first["head"]["bias"], 0.0)
  assert 0 < np.std(first["head"]["kernel"]) < 0.05
  later, _ = method.start_task(trainable, {}, jnp.int32(2), key)
  np.testing.assert_array_equal(later["head"]["kernel"], 1.0)
  np.testing.assert_array_equal(later["prompts"]["e_prompt"][:, :, 2],
                                e_prompt[:, :, 1])
  del dims


def test_contrastive_term_reads_the_earlier_tasks_clusters_only():
  method, dims = _method()
  state = method.init_state({})
  rng = np.random.default_rng(0)
  means = rng.normal(size=state["means"].shape).astype(np.float32)
  present = np.zeros(state["present"].shape, bool)
  present[[0, 1, 3], :2] = True  # Classes 0, 1 (task 0) and 3 (task 1).
  state = {
      **state, "means": jnp.asarray(means),
      "present": jnp.asarray(present)
  }
  features = jnp.asarray(rng.normal(size=(24, dims["hidden_size"])),
                         jnp.float32)
  mask = jnp.ones(24)
  terms = method.loss_terms({"pre_logits": features}, {}, state, jnp.int32(1),
                            mask, "train")
  value, weight = terms["contrastive"]
  old = means[[0, 1], :2].reshape(-1, dims["hidden_size"])
  want = hide_losses.contrastive_loss(features, mask, jnp.asarray(old),
                                      jnp.ones(len(old), bool))
  np.testing.assert_allclose(value, want, rtol=1e-6)
  assert weight == method.config.hide.reg
  assert method.loss_terms({}, {}, state, 1, mask, "eval") == {}


# ---------------------------------------------------------------------------
# The phases in the trainer.


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  config = helpers.tiny_config("method=hideprompt", **{
      "hide.tii_epochs": 1,
      "hide.crct_epochs": 2
  })
  return trainer.Run(config, str(tmp_path_factory.mktemp("hide")))


def _host(state):
  return distributed.to_host(state)


def _changed(before, after):
  """Which of e_prompt, tii, head differ."""
  pick = {
      "e_prompt": lambda s: s["trainable"]["prompts"]["e_prompt"],
      "tii": lambda s: s["trainable"]["prompts"]["tii"],
      "head": lambda s: s["trainable"]["head"]
  }
  return {
      name for name, get in pick.items() if not all(
          np.array_equal(a, b)
          for a, b in zip(jax.tree_util.tree_leaves(get(before)),
                          jax.tree_util.tree_leaves(get(after))))
  }


# What each phase may change (the head is drawn again before task 0).
CHANGES = {
    "start": ({"head"}, {"e_prompt"}),
    "tii_train": {"tii"},
    "tii_stats": set(),
    "tii_align": {"tii"},
    "train": {"e_prompt", "head"},
    "merge": (set(), {"e_prompt"}),
    "stats": set(),
    "align": {"head"},
    "eval": set()
}


def test_two_tasks_phase_by_phase_with_a_checkpoint_after_each(run):
  state, position = run.fresh_state()
  m = run.config.hide.momentum
  done = []
  while position.task < 2:
    task, phase = position.task, position.phase
    before = _host(state)
    saved = position.save_id
    state, position = run.phases[phase](state, position)
    after = _host(state)
    done.append(phase)
    want = CHANGES[phase]
    if isinstance(want, tuple):
      want = want[task > 0]
    assert _changed(before, after) == want, (task, phase)
    if phase != "start":  # Every HiDe phase ends with a checkpoint.
      assert position.save_id > saved, phase
    e_before = before["trainable"]["prompts"]["e_prompt"]
    e_after = after["trainable"]["prompts"]["e_prompt"]
    if phase == "start" and task == 1:
      np.testing.assert_array_equal(e_after[:, :, 1], e_before[:, :, 0])
    if phase == "train":  # Only the task's slot learns.
      others = [s for s in range(e_after.shape[2]) if s != task]
      np.testing.assert_array_equal(e_after[:, :, others], e_before[:, :,
                                                                    others])
    if phase == "merge" and task == 1:
      np.testing.assert_allclose(e_after[:, :, 1], (1 - m) * e_before[:, :, 1] +
                                 m * e_before[:, :, 0], rtol=1e-6)
    if phase in ("tii_stats", "stats"):
      prefix = "tii_" if phase == "tii_stats" else ""
      present = after["method_state"][f"{prefix}present"]
      first, end = run.data.class_ranges[task]
      assert present[first:end].any(-1).all() and not present[end:].any()
    if phase == "eval":
      identity = after["method_state"]["tii_accuracy"]
      assert (identity[task, :task + 1] >= 0).all()
      assert (identity[task, task + 1:] == -1).all()
  assert done == TASK_PHASES[:1] + [
      p for p in TASK_PHASES[1:] if "align" not in p
  ] + TASK_PHASES
  assert position.phase == "start" and len(position.acc_matrix) == 2

  run.checkpointer.wait_until_finished()
  resumed, where = run.resume()
  assert where == position
  for a, b in zip(jax.tree_util.tree_leaves(_host(resumed)),
                  jax.tree_util.tree_leaves(_host(state))):
    np.testing.assert_array_equal(a, b)
  report = run.method.report(_host(state)["method_state"])
  assert [len(r) for r in report["task_identity_accuracy"]] == [1, 2]


# ---------------------------------------------------------------------------
# Through `main` (slow).

# Two tasks of the tiny run, with checkpoints and logs inside epochs.
OVERRIDES = {
    "num_tasks": 2,
    "hide.tii_epochs": 1,
    "hide.crct_epochs": 2,
    "checkpoint_every_steps": 4,
    "log_every_steps": 2
}


def _metrics(workdir):
  with open(os.path.join(workdir, "metrics.json")) as f:
    return json.load(f)


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("hide_main"))
  config = helpers.tiny_config("method=hideprompt", **OVERRIDES)
  assert helpers.run_main(config, workdir) == 0
  return workdir


@pytest.mark.slow
def test_main_runs_both_stages_of_every_task(finished):
  metrics = _metrics(finished)
  assert metrics["method"] == "hideprompt"
  assert len(metrics["acc_matrix"]) == 2
  assert [len(r) for r in metrics["task_identity_accuracy"]] == [1, 2]
  phases = [(e["task"], e["phase"]) for e in metrics["train_log"]]
  assert sorted(set(phases)) == [(0, "tii_train"), (0, "train"),
                                 (1, "tii_train"), (1, "train")]
  assert all(
      "contrastive" in e for e in metrics["train_log"] if e["phase"] == "train")


@pytest.mark.slow
@pytest.mark.parametrize("phase", ["tii_train", "train"])
def test_killed_run_resumes_to_identical_results(finished, phase, tmp_path):
  reference = _metrics(finished)
  steps = [
      e["global_step"]
      for e in reference["train_log"]
      if e["task"] == 1 and e["phase"] == phase
  ]
  workdir = str(tmp_path)
  result = _runner(workdir, f"--config.exit_at_step={steps[len(steps) // 2]}")
  assert result.returncode == 3, result.stderr[-2000:]
  config = helpers.tiny_config("method=hideprompt", **OVERRIDES)
  assert helpers.run_main(config, workdir) == 0
  resumed = _metrics(workdir)
  assert resumed["acc_matrix"] == reference["acc_matrix"]
  assert (
      resumed["task_identity_accuracy"] == reference["task_identity_accuracy"])
  np.testing.assert_allclose([e["loss"] for e in resumed["train_log"]],
                             [e["loss"] for e in reference["train_log"]],
                             rtol=1e-6)


def _runner(workdir, *flags, devices: int = 1):
  """The tiny HiDe-Prompt run through `main` in a subprocess of `devices`
  CPU devices; returns it finished (status, output)."""
  env = dict(os.environ, PYTHONPATH=helpers.REPO,
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
  return subprocess.run([
      sys.executable,
      os.path.join(helpers.REPO, "tests", "e2e_runner.py"), "--",
      *helpers.tiny_flags("method=hideprompt", **OVERRIDES),
      f"--workdir={workdir}", *flags
  ], cwd=helpers.REPO, env=env, capture_output=True, text=True, timeout=900,
                        check=False)


@pytest.mark.slow
def test_eight_devices_give_the_results_of_one(finished, tmp_path):
  """Each device holds 3 samples of a window of 24: the grouped losses, the
  key/value windows and the gathered statistics still span the window."""
  assert jax.device_count() == 1  # `finished` ran on one device.
  result = _runner(tmp_path, devices=8)
  assert result.returncode == 0, result.stderr[-3000:]
  one, eight = _metrics(finished), _metrics(tmp_path)
  assert eight["acc_matrix"] == one["acc_matrix"]
  assert (eight["task_identity_accuracy"] == one["task_identity_accuracy"])
  assert ([(e["phase"], e["global_step"]) for e in eight["train_log"]
          ] == [(e["phase"], e["global_step"]) for e in one["train_log"]])
  for name in ("loss", "ce"):
    np.testing.assert_allclose([e[name] for e in eight["train_log"]],
                               [e[name] for e in one["train_log"]], rtol=1e-5,
                               atol=1e-6)


# ---------------------------------------------------------------------------
# HiDe-Prompt's transforms.


def _constant(value, shape=(40, 30, 3)):
  return tf.constant(np.full(shape, value, np.uint8))


def test_hide_test_transform_normalises_cifar_only():
  out = preprocess.hide_test_image(_constant(128), 24, cifar=True).numpy()
  want = (128 / 255 - np.array(preprocess.CIFAR_MEAN)) / np.array(
      preprocess.CIFAR_STD)
  assert out.shape == (24, 24, 3)
  np.testing.assert_allclose(out, np.broadcast_to(want, out.shape), atol=1e-5)
  plain = preprocess.hide_test_image(_constant(128), 24, cifar=False).numpy()
  np.testing.assert_allclose(plain, 128 / 255, atol=1e-5)


def test_hide_train_transform_jitters_brightness_on_cifar():
  seed = tf.constant([3, 4], tf.int64)
  out = preprocess.hide_train_image(_constant(100), seed, 24,
                                    cifar=True).numpy()
  pixels = out * np.array(preprocess.CIFAR_STD) + np.array(
      preprocess.CIFAR_MEAN)
  np.testing.assert_allclose(pixels,
                             np.broadcast_to(pixels[:1, :1], pixels.shape),
                             atol=1e-5)
  factor = pixels[0, 0, 0] * 255 / 100
  assert abs(factor - 1) <= preprocess.BRIGHTNESS + 0.01
  np.testing.assert_allclose(pixels * 255, np.round(pixels * 255),
                             atol=1e-3)  # Re-quantised to uint8 levels.
  plain = preprocess.hide_train_image(_constant(100), seed, 24,
                                      cifar=False).numpy()
  np.testing.assert_allclose(plain, 100 / 255, atol=1e-5)


def test_the_pipeline_reads_with_the_hide_transforms_when_asked():
  config = demo.get_config("method=hideprompt")
  config.image_size = 16
  ours = pipeline.build_continual_data(config.copy_and_resolve_references())
  config.hide.transforms = True
  theirs = pipeline.build_continual_data(config)
  batch = lambda data: next(data.test_batches(0, 48))["image"]  # noqa: E731
  assert not np.allclose(batch(ours), batch(theirs))
  stats = next(
      theirs.train_batches(0, "stats", 48, drop_remainder=False,
                           test_transform=True))["image"]
  again = next(
      theirs.train_batches(0, "stats", 48, drop_remainder=False,
                           test_transform=True))["image"]
  np.testing.assert_array_equal(stats, again)
  assert stats.min() >= 0 and stats.max() <= 1  # Digits: not normalised.
