"""The baselines in the whole model: sizes, train steps, SMoPE unchanged.

Parameter counts are those of the reference's ViT-B/16 prompt modules,
taken from the shapes alone (`jax.eval_shape`, nothing initialised). The
train steps run jitted on a tiny model built from the demo config. The
SMoPE regression replays the forward outputs that the model wrote before
every method shared one attention kernel.
"""

import functools
import os

import chex
import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from smope_jax import schedules
from smope_jax import train_step as ts
from smope_jax.methods import smope
from smope_jax import factory
from smope_jax.models import vit
from tests import helpers
from tests import numpy_vit


def _shapes(config):
  """Parameter shapes of the config's model, without initialising."""
  model, method = factory.build_model(config, config.num_tasks)
  images = jnp.zeros((1, config.image_size, config.image_size, 3))
  return jax.eval_shape(lambda: model.init(jax.random.key(
      0), images, method.init_context(), mode="train"))["params"]


def _size(tree):
  return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(tree))


# (config, argument) -> prompt shapes, prompt parameters, classes.
COUNTS = {
    ("cifar100", "method=l2p"): ({
        "pool": (1, 30, 20, 768),
        "keys": (1, 30, 768)
    }, 483_840, 100),
    ("cifar100", "method=deep_l2p"): ({
        "pool": (5, 30, 20, 768),
        "keys": (5, 30, 768)
    }, 2_419_200, 100),
    ("cifar100", "method=dualprompt"): ({
        "g_prompts": (2, 6, 768),
        "e_prompts": (3, 10, 20, 768),
        "e_keys": (3, 10, 768)
    }, 493_056, 100),
    ("imagenet_r", "tasks=5,method=dualprompt"): ({
        "g_prompts": (2, 6, 768),
        "e_prompts": (3, 5, 20, 768),
        "e_keys": (3, 5, 768)
    }, 251_136, 200),
    ("imagenet_r", "tasks=20,method=dualprompt"): ({
        "g_prompts": (2, 6, 768),
        "e_prompts": (3, 20, 20, 768),
        "e_keys": (3, 20, 768)
    }, 976_896, 200),
    ("cifar100", "method=codaprompt"): ({
        "components": (5, 100, 8, 768),
        "keys": (5, 100, 768),
        "attention": (5, 100, 768)
    }, 3_840_000, 100),
}


@pytest.mark.parametrize("name,arg", list(COUNTS))
def test_vit_b16_learnable_parameters_of_each_baseline(name, arg):
  shapes, prompt_count, classes = COUNTS[(name, arg)]
  params = _shapes(helpers.benchmark_config(name, arg))
  assert {k: v.shape for k, v in params["prompts"].items()} == shapes
  assert _size(params["prompts"]) == prompt_count
  # The classifier over all classes: 768 C weights and C biases.
  chex.assert_shape(params["head"]["kernel"], (768, classes))
  chex.assert_shape(params["head"]["bias"], (classes,))
  assert _size(params["head"]) == 768 * classes + classes
  for leaf in jax.tree_util.tree_leaves(params["prompts"]):
    assert leaf.dtype == jnp.float32


# ---------------------------------------------------------------------------
# SMoPE through the shared kernel equals its forward before the redesign.

FIXTURE = os.path.join(helpers.REPO, "tests", "fixtures",
                       "smope_forward_v1.npz")


def test_smope_forward_equals_the_stored_pre_redesign_outputs():
  stored = np.load(FIXTURE)
  params = flax.traverse_util.unflatten_dict({
      tuple(k[len("param:"):].split("/")): jnp.asarray(stored[k])
      for k in stored.files
      if k.startswith("param:")
  })
  prompts = smope.SMoPEPrompts(num_layers=2, num_heads=2, num_experts=6,
                               head_dim=8, top_k=3, epsilon=0.4,
                               inference_penalty=2.0)
  model = vit.VisionTransformer(num_classes=10, patch_size=4, hidden_size=16,
                                num_layers=3, num_heads=2, mlp_dim=32,
                                prompts=prompts)
  images = jnp.asarray(stored["images"])
  chex.assert_shape(images, (4, 8, 8, 3))
  context = {
      "counts": jnp.asarray(stored["counts"]),
      "frequent": jnp.asarray(stored["frequent"])
  }
  runs = {mode: (mode, context) for mode in ("plain", "dense", "train", "eval")}
  runs["eval_published"] = ("eval", {**context, "exclude_unused": False})
  # The fixture's routing must exercise the exclusion, or the two evaluation
  # runs would not tell the routings apart.
  assert not np.array_equal(stored["eval:selected"],
                            stored["eval_published:selected"])
  for run, (mode, ctx) in runs.items():
    out = model.apply({"params": params}, images, ctx, mode=mode)
    names = sorted(
        k.split(":")[1] for k in stored.files if k.startswith(run + ":"))
    assert sorted(out) == names, run
    for name in names:
      want = stored[f"{run}:{name}"]
      chex.assert_shape(out[name], want.shape)
      chex.assert_type(out[name], want.dtype)
      if name == "selected":
        np.testing.assert_array_equal(out[name], want, err_msg=run)
      else:
        np.testing.assert_allclose(out[name], want, rtol=1e-6, atol=1e-6,
                                   err_msg=f"{run}:{name}")


# ---------------------------------------------------------------------------
# Each baseline's jitted train step on a tiny model.

BATCH, TASK, NUM_TASKS = 8, 1, 5
CLASS_RANGE = (2, 4)  # Task 1 of 5 two-class tasks.


def _tiny_config(method, ortho_weight):
  """The tiny run's method on a 3-block ViT."""
  config = helpers.tiny_config(f"method={method}", ortho_weight=ortho_weight,
                               **{"model.num_layers": 3})
  config.num_prompted_layers = min(config.num_prompted_layers, 3)
  return config


def _random_params(model, method, rng):
  """Every prompt row uniform on [0, 1) (also rows no task uses yet, which
  must not move); small random backbone and head. Compiling init is slow."""
  shapes = jax.eval_shape(lambda: model.init(
      jax.random.key(0),
      _batch()["image"], method.init_context(), mode="train"))["params"]

  def fill(path, leaf):
    name = "/".join(path)
    if name.startswith("prompts/"):
      x = rng.uniform(size=leaf.shape)
    elif name.endswith("scale"):
      x = 1.0 + 0.1 * rng.normal(size=leaf.shape)
    elif name.endswith("kernel"):
      x = rng.normal(size=leaf.shape) / np.sqrt(np.prod(leaf.shape[:-1]))
    else:
      x = 0.1 * rng.normal(size=leaf.shape)
    return jnp.asarray(x, leaf.dtype)

  flat = flax.traverse_util.flatten_dict(shapes)
  return flax.traverse_util.unflatten_dict({
      path: fill(path, leaf) for path, leaf in sorted(flat.items())
  })


def _batch():
  rng = np.random.default_rng(0)
  return {
      "image": jnp.asarray(rng.uniform(size=(BATCH, 16, 16, 3)), jnp.float32),
      "label": jnp.asarray(2 + np.arange(BATCH) % 2, jnp.int32),
      "mask": jnp.ones(BATCH, jnp.float32)
  }


def _changed_rows(before, after):
  """Per row of the second axis (pool entry / component): did it move."""
  moved = np.asarray(before) != np.asarray(after)
  return moved.reshape(moved.shape[0], moved.shape[1], -1).any(-1)


@pytest.mark.parametrize("method,ortho_weight", [("l2p", 0.0),
                                                 ("deep_l2p", 0.0),
                                                 ("dualprompt", 0.0),
                                                 ("codaprompt", 0.5)])
def test_baseline_train_step(method, ortho_weight):
  """Task 1's step: jitted, backbone untouched, the right rows learn."""
  config = _tiny_config(method, ortho_weight)
  model, prompt_method = factory.build_model(config, NUM_TASKS)
  params = _random_params(model, prompt_method, np.random.default_rng(1))
  trainable, frozen = ts.split_params(params)
  frozen_before = jax.tree_util.tree_map(np.array, frozen)
  before = jax.tree_util.tree_map(np.array, trainable)
  state = prompt_method.init_state(trainable)
  tx = schedules.adam()
  opt_state = tx.init(trainable)
  step = jax.jit(
      functools.partial(ts.train_step, model=model, method=prompt_method, tx=tx,
                        mode="train"))
  inputs = ts.TaskInputs(
      class_range=jnp.array(CLASS_RANGE, jnp.int32), task=jnp.int32(TASK),
      rates={
          "prompts": jnp.float32(1e-2),
          "head": jnp.float32(1e-2)
      }, method_state=state)
  batch = _batch()
  after, new_opt_state, metrics = step(trainable, opt_state, frozen, batch,
                                       inputs)

  chex.assert_trees_all_equal(frozen, frozen_before)
  chex.assert_trees_all_equal_structs(after, before)
  chex.assert_trees_all_equal_structs(new_opt_state, opt_state)
  chex.assert_tree_all_finite((after, metrics))
  for name in ("loss", "ce", "correct", "count"):
    chex.assert_shape(metrics[name], ())

  # The reported terms, and a loss that is their (unweighted) sum.
  terms = {
      "l2p": {"key"},
      "deep_l2p": {"key"},
      "dualprompt": {"key"},
      "codaprompt": {"ortho"} if ortho_weight else set()
  }[method]
  assert set(metrics) - {"loss", "ce", "correct", "count"} == terms
  weight = ortho_weight if method == "codaprompt" else 1.0
  want = metrics["ce"] + sum(weight * metrics[t] for t in terms)
  np.testing.assert_allclose(metrics["loss"], want, rtol=1e-6)
  for t in terms:
    assert float(metrics[t]) > 0

  # Only the current task's classes of the head learn.
  moved = np.asarray(before["head"]["kernel"] != after["head"]["kernel"])
  assert moved[:, slice(*CLASS_RANGE)].all()
  assert not moved[:, :CLASS_RANGE[0]].any()
  assert not moved[:, CLASS_RANGE[1]:].any()

  # Which prompt rows learn (Adam moves exactly the rows with gradient).
  prompts_before, prompts_after = before["prompts"], after["prompts"]
  if method in ("l2p", "deep_l2p"):
    query = numpy_vit.forward(params, batch["image"])[0]
    query = query / np.linalg.norm(query, axis=-1, keepdims=True)
    want_rows = np.zeros(prompts_before["pool"].shape[:2], bool)
    for layer, keys in enumerate(np.asarray(prompts_before["keys"],
                                            np.float64)):
      cos = query @ (keys / np.linalg.norm(keys, axis=-1, keepdims=True)).T
      chosen = np.argsort(-cos, axis=-1, kind="stable")[:, :config.top_k]
      want_rows[layer, np.unique(chosen)] = True
    assert not want_rows.all()
    for name in ("pool", "keys"):
      np.testing.assert_array_equal(
          _changed_rows(prompts_before[name], prompts_after[name]), want_rows,
          err_msg=name)
  elif method == "dualprompt":
    want_rows = np.zeros(prompts_before["e_keys"].shape[:2], bool)
    want_rows[:, TASK] = True
    for name in ("e_prompts", "e_keys"):
      np.testing.assert_array_equal(
          _changed_rows(prompts_before[name], prompts_after[name]), want_rows,
          err_msg=name)
    assert not np.any(
        np.asarray(prompts_before["g_prompts"]) == np.asarray(
            prompts_after["g_prompts"]))
  else:
    per_task = prompt_method.per_task
    index = np.arange(config.pool_size)
    want = (index >= TASK * per_task) & (index < (TASK + 1) * per_task)
    for name in ("keys", "attention", "components"):
      changed = _changed_rows(prompts_before[name], prompts_after[name])
      np.testing.assert_array_equal(changed,
                                    np.broadcast_to(want, changed.shape),
                                    err_msg=name)
