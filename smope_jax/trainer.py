"""The continual-learning task loop: `train_and_evaluate(config, workdir)`.

Per task: start (the method's task boundary) -> [SMoPE, task 0: dense
warm-up] -> training -> [SMoPE: expert counting] -> [class statistics ->
classifier alignment from task 1 on] -> evaluation of every seen task. The
loop is a small state machine: each phase takes the run state and its
`Position` (task, phase, epoch, step, ...) and returns the next ones. The
position is saved with the run state, so a re-run of the same command
resumes where the last one stopped and ends with the results of an
uninterrupted run.
"""

import dataclasses
import functools
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from smope_jax import precision
from smope_jax import alignment, checkpointing, configuration, distributed
from smope_jax import reporting, run_log, schedules
from smope_jax import train_step as steps_lib
from smope_jax.data import pipeline
from smope_jax.errors import UserError
from smope_jax import factory
from smope_jax.position import Position

# Exit status of the `exit_at_step` fault injection.
EXIT_INJECTED_FAULT = 3


def exit_abruptly(step: int) -> None:
  """Ends the process at once, as a preemption or a crash would.

  Nothing is saved or cleaned up: the next run must resume from the last
  checkpoint on disk. Used by tests through `config.exit_at_step`.
  """
  logging.warning("config.exit_at_step=%d reached: exiting without saving",
                  step)
  logging.flush()
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(EXIT_INJECTED_FAULT)  # pylint: disable=protected-access


def all_finite(tree) -> jax.Array:
  """Whether every value of every leaf is finite."""
  return jnp.all(
      jnp.stack(
          [jnp.all(jnp.isfinite(x)) for x in jax.tree_util.tree_leaves(tree)]))


@dataclasses.dataclass
class Run:
  """Everything one seed's run needs; built once, then `run()`.

  `config` must have passed `configuration.validate`.
  """
  config: object
  workdir: str

  def __post_init__(self):
    config = self.config
    configuration.validate_devices(config, jax.device_count(),
                                   jax.process_count())
    # "auto" precision fields become this platform's; checkpoints hold those.
    config = self.config = config.copy_and_resolve_references()
    config.update(precision.resolve_precision(config, jax.default_backend()))
    self.mesh = distributed.make_mesh()
    self.replicated = distributed.replicated(self.mesh)
    self.batch_sharding = distributed.batch_sharded(self.mesh)
    # Weights before data: a bad file fails in seconds, not after loading.
    backbone = factory.load_backbone(config, self.workdir)
    self.data = pipeline.build_continual_data(config,
                                              process_index=jax.process_index(),
                                              process_count=jax.process_count())
    if not config.num_classes:
      config = self.config = config.copy_and_resolve_references()
      config.num_classes = self.data.num_classes
    self.model, self.method = factory.build_model(config, self.data.num_tasks)
    self.steps = steps_lib.make_steps(config, self.model, self.method,
                                      self.replicated)
    # Host arrays: each fresh state places its own copy on the devices.
    self.initial, frozen = steps_lib.split_params(
        factory.init_params(config, self.model, self.method, backbone))
    self.frozen = distributed.put_replicated(frozen, self.mesh)
    self.reporter = reporting.Reporter(self.workdir, distributed.is_primary())
    self.log = run_log.RunLog(config, self.data, self.reporter)
    self.checkpointer = checkpointing.Checkpointer(
        f"{self.workdir}/checkpoints", max_to_keep=config.keep_checkpoints)
    self.all_finite = jax.jit(all_finite, out_shardings=self.replicated)
    self.phases = dict(start=self.start_task, warmup=self.train_phase,
                       train=self.train_phase, bookkeeping=self.count_experts,
                       stats=self.class_statistics, align=self.align,
                       eval=self.evaluate)
    self.phases.update(self.method.phase_handlers(self))  # Its own phases.

  # ----------------------------------------------------------------- state

  def fresh_state(self) -> tuple[dict, Position]:
    """The run state and position before its first task."""
    hidden = self.model.hidden_size
    statistics = np.zeros((self.config.num_classes, hidden), np.float32)
    state = dict(trainable=self.initial,
                 opt_state=self.steps.tx.init(self.initial),
                 method_state=self.method.init_state(self.initial),
                 class_means=statistics, class_vars=statistics.copy())
    return (distributed.put_replicated(state, self.mesh),
            Position(seed=int(self.config.seed)))

  def check_meta(self, meta) -> None:
    """Refuses another run's checkpoint (`checkpointing.check_run_meta`)."""
    checkpointing.check_run_meta(meta, self.workdir, self.config.to_dict(),
                                 self.data.num_tasks, steps_lib.PHASES)

  def resume(self) -> tuple[dict, Position]:
    """The latest checkpoint's state and position, or a fresh run's."""
    state, position = self.fresh_state()
    restored = self.checkpointer.restore_latest(state,
                                                check_meta=self.check_meta)
    if restored is None:
      self.reporter.write_config(self.config)
      return state, position
    _, state, meta = restored
    return state, Position.from_meta(meta)

  def save(self, state, position: Position, force=False) -> Position:
    """Checkpoints the run; a non-finite state ends the run unsaved."""
    self.ensure_finite(state, position)
    position = dataclasses.replace(position, save_id=position.save_id + 1)
    self.checkpointer.save(position.save_id, state,
                           position.to_meta(self.config.to_dict()), force=force)
    return position

  def ensure_finite(self, state, position: Position, loss=None, rate="lr"):
    """Stops a diverged run before anything non-finite is saved or reported.

    `rate` names the config field of the learning rate of the phase that
    ran last: the one to lower.

    Raises:
      UserError: the loss or a learnable parameter is NaN or infinite.
    """
    finite = loss is None or np.isfinite(loss)
    what = f"the loss is {loss}"
    if finite:
      finite = bool(distributed.to_host(self.all_finite(state["trainable"])))
      what = "a learnable parameter is not finite"
    if not finite:
      saved = ("no checkpoint was written yet"
               if self.checkpointer.latest_step() is None else
               f"the last checkpoint in {self.workdir}/checkpoints is the "
               "last good state")
      where = f"task {position.task + 1}, phase {position.phase}"
      if position.phase in steps_lib.TRAINING_MODES:
        where += f", epoch {position.epoch + 1}, step {position.step}"
      raise UserError(
          f"training diverged at {where}: {what}. Nothing non-finite was "
          f"saved; {saved}. Lower --config.{rate} (now "
          f"{getattr(self.config, rate)}) or check the input images, and run "
          "again with a new --workdir.")

  # ------------------------------------------------------------------ loop

  def run(self) -> dict:
    state, position = self.resume()
    self.log.start(
        position,
        steps_lib.parameter_counts(
            factory.param_shapes(self.config, self.model, self.method)),
        self.mesh)
    try:
      with jax.default_matmul_precision(
          precision.model_precision(self.config)["context"]):
        while position.task < self.data.num_tasks:
          state, position = self.phases[position.phase](state, position)
      self.checkpointer.wait_until_finished()
      summary = self.summary(state, position)
      self.log.run_done(summary, self.workdir)
      return summary
    finally:
      self.log.phase_ended()
      self.reporter.close()
      self.checkpointer.close()

  def next_phase(self, state, position: Position):
    """Moves to the next phase; a training phase gets a new optimizer."""
    phases = steps_lib.task_phases(self.method,
                                   self.config.classifier_alignment,
                                   position.task)
    following = phases.index(position.phase) + 1
    task = position.task + (following == len(phases))
    phase = "start" if following == len(phases) else phases[following]
    if phase in steps_lib.TRAINING_MODES:
      state["opt_state"] = self.steps.init_optimizer(state["trainable"])
    return state, dataclasses.replace(position, task=task, phase=phase, epoch=0,
                                      step=0)

  def start_task(self, state, position: Position):
    """The method's task boundary (SMoPE's snapshot and marks, CODA's
    Gram-Schmidt), then the first training phase."""
    self.log.task_started(position)
    task = position.task
    key = jax.random.fold_in(jax.random.PRNGKey(self.config.seed), task)
    state["trainable"], state["method_state"] = self.steps.start(
        state["trainable"], state["method_state"], np.int32(task), key)
    return self.next_phase(state, position)

  def summary(self, state, position: Position) -> dict:
    return reporting.run_summary(
        self.config, self.data, position,
        self.method.report(distributed.to_host(state["method_state"])))

  def class_range(self, task: int) -> np.ndarray:
    """int32 (2,): [first class of the task, end of the seen classes)."""
    return np.asarray(self.data.class_ranges[task], np.int32)

  def train_phase(self, state, position: Position):
    """The epochs of the dense warm-up or of the top-K training."""
    config, task = self.config, position.task
    mode = steps_lib.TRAINING_MODES[position.phase]
    epochs = schedules.phase_epochs(config, position.phase)
    steps_per_epoch = self.data.steps_per_epoch(task, config.batch_size)
    rates = schedules.phase_schedules(config, epochs, steps_per_epoch)
    return self.run_epochs(
        state, position, epochs=epochs, steps_per_epoch=steps_per_epoch,
        mode=mode, step_fn=functools.partial(self.steps.train, mode),
        rates_at=lambda epoch, step: {
            g: s(epoch * steps_per_epoch + step) for g, s in rates.items()
        }, batches=lambda epoch, step: self.data.train_batches(
            task, epoch, config.batch_size, start_step=step))

  def run_epochs(self, state, position: Position, *, epochs: int,
                 steps_per_epoch: int, mode: str, step_fn, rates_at, batches):
    """The epochs of a training phase, resumable mid-epoch, then the next
    phase.

    `step_fn(trainable, opt_state, frozen, batch, inputs)` is the jitted
    step, `rates_at(epoch, step)` its rate per group, `batches(epoch,
    start_step)` the epoch's local batches from `start_step` on; `mode` is
    the log's name of the step ("train" counts towards the run's images/s).
    """
    config, task = self.config, position.task
    self.log.training_started(position, epochs, steps_per_epoch)
    while position.epoch < epochs:
      totals, logged = None, 0
      for local in self.log.timed(batches(position.epoch, position.step)):
        batch = distributed.global_batch(local, self.batch_sharding)
        step_rates = {
            g: np.float32(r)
            for g, r in rates_at(position.epoch, position.step).items()
        }
        inputs = steps_lib.TaskInputs(class_range=self.class_range(task),
                                      task=np.int32(task), rates=step_rates,
                                      method_state=state["method_state"])
        state["trainable"], state["opt_state"], step_metrics = step_fn(
            state["trainable"], state["opt_state"], self.frozen, batch, inputs)
        totals = step_metrics if totals is None else jax.tree_util.tree_map(
            jnp.add, totals, step_metrics)
        logged += 1
        position = dataclasses.replace(position, step=position.step + 1,
                                       global_step=position.global_step + 1)
        self.log.train_step(position, mode, step_metrics,
                            local["image"].shape[0] * jax.process_count(),
                            epochs)
        if position.global_step == config.exit_at_step:
          exit_abruptly(config.exit_at_step)
        if (position.step % config.log_every_steps == 0 or
            position.step == steps_per_epoch):
          # A non-finite loss stops the run before any checkpoint has it.
          values = run_log.interval_means(totals, logged)
          self.ensure_finite(state, position, loss=values["loss"])
          position = position.logged(values)
          self.log.interval(position, values, step_rates, epochs)
          totals, logged = None, 0
        if position.global_step % config.checkpoint_every_steps == 0:
          position = self.save(state, position)
      position = dataclasses.replace(position, epoch=position.epoch + 1, step=0)
    images_per_second = self.log.training_ended(position)
    if mode == "train":
      position = dataclasses.replace(
          position, train_images_per_second=(*position.train_images_per_second,
                                             images_per_second))
    return self.finish_phase(state, position)

  def finish_phase(self, state, position: Position):
    """Moves to the next phase and checkpoints there."""
    state, position = self.next_phase(state, position)
    return state, self.save(state, position)

  def count_experts(self, state, position: Position):
    """SMoPE's expert counting (phase "bookkeeping"), in inference mode.

    It reads the training loader (shuffled, augmented, last partial batch
    dropped); each batch's routing sees the counts of the batches before."""
    task, batch_size = position.task, self.config.batch_size
    total = self.data.steps_per_epoch(task, batch_size)
    self.log.phase_started(position, "counting experts", total, position.step)
    for local in self.data.train_batches(task, "count", batch_size,
                                         start_step=position.step):
      batch = distributed.global_batch(local, self.batch_sharding)
      state["method_state"] = self.steps.bookkeeping(state["trainable"],
                                                     self.frozen,
                                                     state["method_state"],
                                                     batch, np.int32(task))
      position = dataclasses.replace(position, step=position.step + 1)
      self.log.tick(batch_size)
    self.log.phase_ended("task %d: counted expert use over %d batches in %s",
                         task + 1, total)
    return self.finish_phase(state, position)

  def class_statistics(self, state, position: Position):
    """Mean and variance of each new class's pre-logits (train augmentation).

    Every training image of the task is read once (no batch is dropped).
    """
    task, batch_size = position.task, self.config.batch_size
    feats, labels = [], []
    self.log.phase_started(position, "class statistics",
                           -(-self.data.train_size(task) // batch_size))
    for local in self.data.train_batches(task, "stats", batch_size,
                                         drop_remainder=False):
      batch = distributed.global_batch(local, self.batch_sharding)
      out = self.steps.features(state["trainable"], self.frozen,
                                state["method_state"], batch, np.int32(task))
      keep = distributed.gather_to_host(batch["mask"]) > 0
      feats.append(distributed.gather_to_host(out)[keep])
      labels.append(distributed.gather_to_host(batch["label"])[keep])
      self.log.tick()
    classes = np.arange(*self.data.class_ranges[task])
    means, variances = alignment.class_statistics(np.concatenate(feats),
                                                  np.concatenate(labels),
                                                  classes)
    host_means = distributed.to_host(state["class_means"]).copy()
    host_vars = distributed.to_host(state["class_vars"]).copy()
    host_means[classes], host_vars[classes] = means, variances
    state["class_means"], state["class_vars"] = distributed.put_replicated(
        (host_means, host_vars), self.mesh)
    self.log.phase_ended("task %d: statistics of %d classes in %s", task + 1,
                         len(classes))
    return self.next_phase(state, position)

  def align(self, state, position: Position):
    """Classifier alignment on replayed features (tasks after the first)."""
    task, config = position.task, self.config
    if task >= 1 and config.align_epochs > 0:
      first, seen = self.data.class_ranges[task]
      iterations = first  # Classes of the earlier tasks.
      key = jax.random.fold_in(jax.random.PRNGKey(config.seed), task)
      self.log.log(
          "task %d: aligning the classifier on %d classes: %d "
          "epochs x %d iterations of %d replayed features", task + 1, seen,
          config.align_epochs, iterations,
          config.batch_size * config.align_ratio)
      self.log.phase_started(position, "alignment", 1)
      trainable = dict(state["trainable"])
      trainable["head"] = self.steps.align(
          trainable["head"], state["class_means"], state["class_vars"], key,
          np.int32(seen), np.int32(iterations),
          schedules.align_rates(config, iterations))
      state["trainable"] = trainable
      self.ensure_finite(state, position, rate="align_lr")
      self.log.phase_ended("task %d: alignment took %s", task + 1)
    return self.next_phase(state, position)

  def evaluate(self, state, position: Position):
    """Accuracy on every seen task, predicting over all seen classes."""
    task = position.task
    seen = np.int32(self.data.class_ranges[task][1])
    row = []
    self.log.phase_started(position, "evaluating", task + 1)
    for j in range(task + 1):
      correct = jnp.int32(0)
      for local in self.data.test_batches(j, self.config.eval_batch_size):
        batch = distributed.global_batch(local, self.batch_sharding)
        correct = correct + self.steps.eval(state["trainable"], self.frozen,
                                            state["method_state"], batch, seen,
                                            np.int32(task))
      correct = int(distributed.to_host(correct))
      row.append(100.0 * correct / self.data.test_size(j))
      self.log.tick()
    self.log.phase_ended("task %d: evaluated %d tasks in %s", task + 1,
                         task + 1)
    return self.finish_task(state, position, row)

  def finish_task(self, state, position: Position, row: list):
    """Adds the task's accuracy row (%, one per seen task), moves on, then
    saves and reports the task."""
    state, position = self.next_phase(
        state,
        dataclasses.replace(
            position, acc_matrix=(*position.acc_matrix, tuple(row)),
            task_seconds=(*position.task_seconds, self.log.task_seconds())))
    summary = self.summary(state, position)
    position = self.save(state, position, force=True)
    self.log.task_done(position, summary)
    return state, position


def train_and_evaluate(config, workdir: str, *, validated=False) -> dict:
  """Runs every requested seed; returns the summary (or the seed table).

  `validated`: the caller ran `configuration.validate(config)` already.
  """
  if not validated:
    configuration.validate(config)
  seeds = configuration.parse_seeds(config)
  if len(seeds) == 1:
    config = config.copy_and_resolve_references()
    config.seed = seeds[0]
    return Run(config, workdir).run()
  summaries = []
  if config.pretrained == "demo":  # One backbone for all seeds, built once.
    from smope_jax import demo_backbone  # pylint: disable=g-import-not-at-top
    config = config.copy_and_resolve_references()
    config.pretrained = demo_backbone.ensure_demo_backbone(
        config, factory.demo_backbone_dir(workdir))
  for seed in seeds:
    seed_config = config.copy_and_resolve_references()
    seed_config.seed, seed_config.seeds = seed, ""
    summaries.append(Run(seed_config, f"{workdir}/seed_{seed}").run())
  reporter = reporting.Reporter(workdir, distributed.is_primary())
  reporter.seed_report(summaries, seeds)
  reporter.close()
  return {"seeds": seeds, "runs": summaries}
