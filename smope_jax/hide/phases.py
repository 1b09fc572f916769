"""HiDe-Prompt's phases in the trainer's task loop (`trainer.Run`).

Each handler takes the run state and its `Position` and returns the next
ones, and checkpoints after its phase, so that a killed run resumes at the
phase (or, in training, the step) where it stopped. The two training
phases keep the last partial batch of an epoch (the reference's loader
does), padded and with its real samples dealt out over the windows of 24.
Statistics read every training image of the task with the test transform
and cluster each class on the host (`hide.statistics`).
"""

import jax
import jax.numpy as jnp
import numpy as np

from smope_jax import distributed
from smope_jax.hide import alignment
from smope_jax.hide import losses as hide_losses
from smope_jax.hide import schedules
from smope_jax.hide import statistics
from smope_jax.hide import steps as hide_steps

WINDOW = hide_losses.DEVICE_BATCH
# Random streams of the two statistics sets and the two alignments.
TII_STREAM, PROMPT_STREAM = 0, 1


class Phases:
  """The handlers of HiDe-Prompt's phases for one `trainer.Run`."""

  def __init__(self, run):
    self.run = run
    self.config = run.config
    self.steps = hide_steps.make_steps(run.config, run.model, run.method,
                                       run.replicated)

  def handlers(self) -> dict:
    return {
        "tii_train": self.tii_train,
        "tii_stats": self.tii_stats,
        "tii_align": self.tii_align,
        "train": self.prompt_train,
        "merge": self.merge,
        "stats": self.prompt_stats,
        "align": self.head_align,
        "eval": self.evaluate
    }

  # -------------------------------------------------------------- training

  def tii_train(self, state, position):
    """Stage 1: the TII classifier on the frozen features, Adam at the
    stage-1 schedule; the prompts and the head stay."""
    h = self.config.hide
    schedule = schedules.EpochSchedule(h.tii_schedule, h.tii_lr, h.tii_epochs)
    return self._train(
        state, position, h.tii_epochs, self.steps.tii_train, "tii", lambda e: {
            "e_prompt": 0.0,
            "tii": schedule(e),
            "head": 0.0
        })

  def prompt_train(self, state, position):
    """Stage 2: the task's prompt and the head with the true task id."""
    config = self.config
    base = schedules.prompt_phase_rates(config.lr, config.hide.larger_prompt_lr)
    prompt, head = (schedules.EpochSchedule(config.hide.schedule, base[g],
                                            config.epochs)
                    for g in ("prompt", "head"))
    return self._train(
        state, position, config.epochs, self.steps.prompt_train, "train",
        lambda e: {
            "e_prompt": prompt(e),
            "tii": 0.0,
            "head": head(e)
        })

  def _train(self, state, position, epochs, step_fn, mode, rates_of):
    """`run.run_epochs` with a new optimizer, HiDe's batches (the last
    partial one kept, real samples dealt over the windows) and one rate per
    subgroup and epoch."""
    run, config, task = self.run, self.config, position.task
    if position.epoch == 0 and position.step == 0:  # A new optimizer.
      state["opt_state"] = run.steps.init_optimizer(state["trainable"])

    def batches(epoch, start_step):
      for local in run.data.train_batches(task, epoch, config.batch_size,
                                          start_step=start_step,
                                          drop_remainder=False):
        yield hide_steps.spread_windows(local, WINDOW)

    return run.run_epochs(
        state, position, epochs=epochs,
        steps_per_epoch=-(-run.data.train_size(task) // config.batch_size),
        mode=mode, step_fn=step_fn,
        rates_at=lambda epoch, step: rates_of(epoch), batches=batches)

  # ------------------------------------------------------------ statistics

  def tii_stats(self, state, position):
    """Clusters of the frozen features of the task's classes."""
    return self._statistics(state, position, "tii_", TII_STREAM,
                            self.steps.plain_features)

  def prompt_stats(self, state, position):
    """Clusters of the prompted features (the task's prompt as merged)."""
    return self._statistics(state, position, "", PROMPT_STREAM,
                            self.steps.prompt_features)

  def _statistics(self, state, position, prefix, stream, features_fn):
    run, task = self.run, position.task
    batch_size = self.config.batch_size
    feats, labels = [], []
    run.log.phase_started(position, f"{position.phase} (clusters)",
                          -(-run.data.train_size(task) // batch_size))
    for local in run.data.train_batches(task, "stats", batch_size,
                                        drop_remainder=False,
                                        test_transform=True):
      batch = distributed.global_batch(hide_steps.spread_windows(local, WINDOW),
                                       run.batch_sharding)
      out = features_fn(state["trainable"], run.frozen, state["method_state"],
                        batch, np.int32(task))
      keep = distributed.gather_to_host(batch["mask"]) > 0
      feats.append(distributed.gather_to_host(out)[keep])
      labels.append(distributed.gather_to_host(batch["label"])[keep])
      run.log.tick()
    classes = np.arange(*run.data.class_ranges[task])
    new = statistics.centroid_statistics(np.concatenate(feats),
                                         np.concatenate(labels), classes,
                                         seed=int(self.config.seed),
                                         stream=stream)
    host = distributed.to_host(state["method_state"])
    names = [f"{prefix}{n}" for n in ("means", "vars", "present")]
    stored = statistics.scatter(
        statistics.CentroidStatistics(*(host[n] for n in names)), classes, new)
    state["method_state"] = distributed.put_replicated(
        {
            **host,
            **dict(zip(names, stored))
        }, run.mesh)
    run.log.phase_ended("task %d, %s: %d clusters of %d classes in %s",
                        task + 1, position.phase, int(new.present.sum()),
                        len(classes))
    return self.run.finish_phase(state, position)

  # ------------------------------------------------------------- alignment

  def tii_align(self, state, position):
    """The TII classifier re-trained on replayed frozen features."""
    h = self.config.hide
    return self._align(state, position, "tii_", self.steps.tii_align_epoch,
                       schedules.cosine_annealing(h.tii_ca_lr, h.crct_epochs),
                       ("prompts", "tii"), TII_STREAM)

  def head_align(self, state, position):
    """The head re-trained on replayed prompted features."""
    h = self.config.hide
    return self._align(state, position, "", self.steps.head_align_epoch,
                       schedules.cosine_annealing(h.ca_lr, h.crct_epochs),
                       ("head",), PROMPT_STREAM)

  def _align(self, state, position, prefix, epoch_fn, rates, path, stream):
    run, task = self.run, position.task
    first, seen = run.data.class_ranges[task]
    key = jax.random.fold_in(
        jax.random.fold_in(jax.random.PRNGKey(self.config.seed), task), stream)
    run.log.phase_started(position, position.phase, 1)
    trainable = state["trainable"]
    params = trainable
    for name in path:
      params = params[name]
    ms = state["method_state"]
    params = alignment.align(params, ms[f"{prefix}means"], ms[f"{prefix}vars"],
                             ms[f"{prefix}present"], key, seen, first, rates,
                             epoch_fn=epoch_fn)
    if path == ("head",):
      state["trainable"] = {**trainable, "head": params}
    else:
      state["trainable"] = {
          **trainable, "prompts": {
              **trainable["prompts"], "tii": params
          }
      }
    run.ensure_finite(state, position, rate="lr")
    run.log.phase_ended("task %d, %s: replay took %s", task + 1, position.phase)
    return self.run.finish_phase(state, position)

  # ----------------------------------------------------- merge, evaluation

  def merge(self, state, position):
    """Slot t keeps the momentum blend its training used."""
    trainable = state["trainable"]
    state["trainable"] = {
        **trainable, "prompts": {
            **trainable["prompts"], "e_prompt":
                self.steps.merge(trainable["prompts"]["e_prompt"],
                                 np.int32(position.task))
        }
    }
    return self.run.finish_phase(state, position)

  def evaluate(self, state, position):
    """Accuracy and task-identity accuracy on every seen task."""
    run, task = self.run, position.task
    ranges = run.data.class_ranges
    row, identity = [], []
    run.log.phase_started(position, "evaluating", task + 1)
    for j in range(task + 1):
      tii_seen = ranges[j if self.config.hide.evaluated_task_mask else task][1]
      correct = found = jnp.int32(0)
      for local in run.data.test_batches(j, self.config.eval_batch_size):
        batch = distributed.global_batch(local, run.batch_sharding)
        c, f = self.steps.eval(state["trainable"], run.frozen,
                               state["method_state"], batch, np.int32(task),
                               np.int32(tii_seen))
        correct, found = correct + c, found + f
      size = run.data.test_size(j)
      row.append(100.0 * int(distributed.to_host(correct)) / size)
      identity.append(100.0 * int(distributed.to_host(found)) / size)
      run.log.tick()
    run.log.phase_ended("task %d: evaluated %d tasks in %s", task + 1, task + 1)
    run.log.log("task %d: task-identity accuracy per task %s", task + 1,
                " ".join(f"{a:.1f}" for a in identity))
    host = distributed.to_host(state["method_state"])
    accuracy = np.array(host["tii_accuracy"])
    accuracy[task, :task + 1] = identity
    state["method_state"] = distributed.put_replicated(
        {
            **host, "tii_accuracy": accuracy
        }, run.mesh)
    return run.finish_task(state, position, row)
