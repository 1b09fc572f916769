"""HiDe-Prompt's jitted steps, and how its batches are laid out.

Both stages train on the same parameter tree ({'prompts': {'e_prompt',
'tii'}, 'head'}) with one clipped Adam (`hide.schedules.adam`): each step
takes a rate per named subgroup, zero for the subgroups its phase does not
train, so one optimizer state shape serves every phase. Gradients of the
untrained subgroups are zero anyway (their loss does not read them), so
the global-norm clip sees only the trained ones, as the reference's does.
"""

import dataclasses
import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from smope_jax import train_step
from smope_jax.hide import alignment
from smope_jax.hide import losses as hide_losses
from smope_jax.hide import prompts as hide_prompts

# The named subgroups of the trainable tree, each with its own rate.
SUBGROUPS = ("e_prompt", "tii", "head")


def subgroup_rates(direction: dict, rates: dict) -> dict:
  """Scales each subgroup of an update direction by -its rate."""
  scale = lambda tree, r: jax.tree_util.tree_map(  # noqa: E731
      lambda u: -r * u, tree)
  prompts = direction["prompts"]
  return {
      "prompts": {
          "e_prompt": scale(prompts["e_prompt"], rates["e_prompt"]),
          "tii": scale(prompts["tii"], rates["tii"])
      },
      "head": scale(direction["head"], rates["head"])
  }


def spread_windows(local: dict, window: int) -> dict:
  """The batch with its real samples spread evenly over its windows.

  The reference's processes each get an equal share of a short last batch
  (its windows of 24 hold equal counts); the loader pads at the end, so
  the real rows are dealt out here, leading each window.
  """
  mask = np.asarray(local["mask"])
  size, real = len(mask), int(mask.sum())
  if real == size or size % window:
    return local
  windows = size // window
  counts = real // windows + (np.arange(windows) < real % windows)
  order, taken, pads = [], 0, real
  for count in counts:
    order += list(range(taken, taken + count))
    order += list(range(pads, pads + window - count))
    taken, pads = taken + count, pads + window - count
  return {k: np.asarray(v)[order] for k, v in local.items()}


def plain_features(trainable, frozen, images, model) -> jax.Array:
  """The frozen backbone's final-LN CLS (the TII classifier's input)."""
  return model.apply({"params": train_step.merge_params(trainable, frozen)},
                     images, None, mode="plain")["pre_logits"]


def tii_logits(params, images, *, model, method) -> jax.Array:
  """Stage 1's forward: the frozen backbone, then the TII classifier."""
  features = model.apply({"params": params}, images, None,
                         mode="plain")["pre_logits"]
  return hide_prompts.TIIClassifier(method.num_classes).apply(
      {"params": params["prompts"]["tii"]}, features)


def _metrics(total, terms, logits, batch, class_range):
  predictions = train_step.predict_seen(logits, class_range[1], class_range[0])
  metrics = dict(terms, loss=total, count=jnp.sum(batch["mask"]))
  metrics["correct"] = jnp.sum((predictions == batch["label"]) * batch["mask"])
  return metrics


def _update(trainable, opt_state, grads, rates, tx):
  direction, opt_state = tx.update(grads, opt_state, trainable)
  return optax.apply_updates(trainable, subgroup_rates(direction, rates)), \
      opt_state


def tii_step(trainable, opt_state, frozen, batch, inputs, *, model, method, tx):
  """One step of the TII classifier: CE over the current task's classes."""
  feats = jax.lax.stop_gradient(
      plain_features(trainable, frozen, batch["image"], model))
  first, end = inputs.class_range[0], inputs.class_range[1]
  classifier = hide_prompts.TIIClassifier(method.num_classes)

  def loss_fn(params):
    logits = classifier.apply({"params": params["prompts"]["tii"]}, feats)
    ce = hide_losses.current_task_ce(logits, batch["label"], batch["mask"],
                                     first, end, method.group_size)
    return ce, logits

  (ce, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(trainable)
  trainable, opt_state = _update(trainable, opt_state, grads, inputs.rates, tx)
  return trainable, opt_state, _metrics(ce, {"ce": ce}, logits, batch,
                                        inputs.class_range)


def prompt_step(trainable, opt_state, frozen, batch, inputs, *, model, method,
                tx):
  """One step of the task prompt and head: CE + the method's terms."""
  context = method.context(inputs.method_state, inputs.task, mask=batch["mask"])
  first, end = inputs.class_range[0], inputs.class_range[1]

  def loss_fn(params):
    out = model.apply({"params": train_step.merge_params(params, frozen)},
                      batch["image"], context, mode="train")
    ce = hide_losses.current_task_ce(out["logits"], batch["label"],
                                     batch["mask"], first, end,
                                     method.group_size)
    extra = method.loss_terms(out, params, inputs.method_state, inputs.task,
                              batch["mask"], "train")
    total = ce + sum(weight * value for value, weight in extra.values())
    terms = {"ce": ce, **{name: value for name, (value, _) in extra.items()}}
    return total, (terms, out["logits"])

  (total, (terms, logits)), grads = jax.value_and_grad(loss_fn,
                                                       has_aux=True)(trainable)
  trainable, opt_state = _update(trainable, opt_state, grads, inputs.rates, tx)
  return trainable, opt_state, _metrics(total, terms, logits, batch,
                                        inputs.class_range)


def feature_step(trainable, frozen, method_state, batch, task, *, model, method,
                 instructed: bool):
  """Features of the statistics: the frozen ones, or (`instructed`) the
  prompted ones through the true task's prompt as it is."""
  if not instructed:
    return plain_features(trainable, frozen, batch["image"], model)
  context = dict(method.context(method_state, task, mask=batch["mask"]),
                 routing="stats")
  return model.apply({"params": train_step.merge_params(trainable, frozen)},
                     batch["image"], context, mode="eval")["pre_logits"]


def eval_step(trainable, frozen, method_state, batch, task, tii_seen, *, model,
              method, all_classes: bool):
  """Correct predictions and correct task identities of the real images.

  The TII classifier picks each image's task among the first `tii_seen`
  classes' tasks; that task's prompt gives the logits, whose argmax runs
  over all classes (`all_classes`) or over those seen by task `task`.
  """
  context = dict(
      method.context(method_state, task, evaluating=True, mask=batch["mask"]),
      seen_classes=tii_seen, routing="eval")
  out = model.apply({"params": train_step.merge_params(trainable, frozen)},
                    batch["image"], context, mode="eval")
  seen = (task + 1) * method.task_size
  predictions = hide_prompts.predict(out["logits"], seen, all_classes)
  true_task = batch["label"] // method.task_size
  count = lambda ok: jnp.sum(ok * batch["mask"]).astype(  # noqa: E731
      jnp.int32)
  return (count(predictions == batch["label"]),
          count(out["prompt_slot"] == true_task))


def head_logits(head: dict, features: jax.Array) -> jax.Array:
  return jnp.dot(features, head["kernel"],
                 precision=jax.lax.Precision.HIGHEST) + head["bias"]


@dataclasses.dataclass(frozen=True)
class Steps:
  """HiDe-Prompt's jitted steps of one run."""
  tii_train: Callable
  prompt_train: Callable
  plain_features: Callable
  prompt_features: Callable
  eval: Callable
  merge: Callable
  tii_align_epoch: Callable
  head_align_epoch: Callable


def make_steps(config, model, method, replicated) -> Steps:
  """Jits the steps; parameters and states come back replicated."""
  tx = method.optimizer()
  bound = dict(model=model, method=method)
  train = lambda fn: jax.jit(  # noqa: E731
      functools.partial(fn, tx=tx, **bound), out_shardings=(replicated,) * 3,
      donate_argnums=(0, 1))
  per_centroid = (alignment.PER_CENTROID_FIRST_RELEASE if
                  config.hide.first_release_samples else alignment.PER_CENTROID)
  classifier = hide_prompts.TIIClassifier(method.num_classes)

  def align_epoch(apply_fn, samples):
    return alignment.make_align_epoch(apply_fn, samples,
                                      weight_decay=method.weight_decay,
                                      out_shardings=replicated)

  def merge(e_prompt, task):
    return hide_prompts.merge_momentum(e_prompt, task, config.hide.momentum)

  return Steps(
      tii_train=train(tii_step), prompt_train=train(prompt_step),
      plain_features=jax.jit(
          functools.partial(feature_step, instructed=False,
                            **bound)), prompt_features=jax.jit(
                                functools.partial(feature_step, instructed=True,
                                                  **bound)),
      eval=jax.jit(
          functools.partial(eval_step, all_classes=config.hide.all_classes,
                            **bound), out_shardings=replicated),
      merge=jax.jit(merge,
                    out_shardings=replicated), tii_align_epoch=align_epoch(
                        lambda p, f: classifier.apply({"params": p}, f),
                        per_centroid["tii"]),
      head_align_epoch=align_epoch(head_logits, per_centroid["head"]))


def preflight_calls(run) -> dict[str, tuple]:
  """Step name -> (jitted step, abstract arguments) in run order, for the
  preflight's `RunSteps` `run` (its mesh, shapes and builders): the steps
  of `make_steps`, as the phases call them."""
  config, steps = run.config, make_steps(run.config, run.model, run.method,
                                         run.replicated)
  task, key = run.scalar(), run.scalar(jnp.uint32, (2,))
  batch = run.batch(config.batch_size)
  inputs = train_step.TaskInputs(
      class_range=run.scalar(shape=(2,)), task=task,
      rates={g: run.scalar(jnp.float32) for g in SUBGROUPS},
      method_state=run.method_state)
  trained = (run.trainable, run.opt_state, run.frozen, batch, inputs)
  features = (run.trainable, run.frozen, run.method_state, batch, task)

  def replay(params, prefix):
    momentum = jax.eval_shape(alignment.momentum_direction().init, params)
    stored = (
        run.method_state[f"{prefix}{n}"] for n in ("means", "vars", "present"))
    return (params, run.abstract(momentum), *stored, key, task, task,
            run.scalar(jnp.float32))

  prompts = run.trainable["prompts"]
  return {
      "start": (run.steps.start, (run.trainable, run.method_state, task, key)),
      "train (stage 1)": (steps.tii_train, trained),
      "features (stage 1)": (steps.plain_features, features),
      "alignment (stage 1)": (steps.tii_align_epoch,
                              replay(prompts["tii"], "tii_")),
      "train (stage 2)": (steps.prompt_train, trained),
      "merge": (steps.merge, (prompts["e_prompt"], task)),
      "class statistics": (steps.prompt_features, features),
      "alignment (head)": (steps.head_align_epoch,
                           replay(run.trainable["head"], "")),
      "eval": (steps.eval, (run.trainable, run.frozen, run.method_state,
                            run.batch(config.eval_batch_size), task, task)),
  }
