"""The continual-learning task loop: `train_and_evaluate(config, workdir)`.

Per task: start (the method's task boundary) -> [SMoPE, task 0: dense
warm-up] -> training -> [SMoPE: expert counting] -> [class statistics ->
classifier alignment from task 1 on] -> evaluation of every seen task. The
loop is a small state machine whose position (task, phase, epoch, step) is
saved with the run state, so a re-run of the same command resumes where the
last one stopped and ends with the results of an uninterrupted run.
"""

import dataclasses
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from smope_jax import alignment, checkpointing, cli, configuration
from smope_jax import config_compare, distributed, metrics, progress, reporting
from smope_jax import schedules
from smope_jax import train_step as steps_lib
from smope_jax.data import pipeline
from smope_jax.errors import UserError
from smope_jax import factory
from smope_jax.methods import registry


# Above this fraction of a phase spent waiting for data, the log says so.
# (Steps are dispatched asynchronously, so some waiting overlaps compute.)
INPUT_BOUND_FRACTION = 0.5
# What every smope_jax before the config was checkpointed stored in `meta`:
# a checkpoint with these and no config is an older version's, not damaged.
OLDER_META_KEYS = frozenset(("task", "phase", "epoch", "step", "global_step",
                             "save_id", "seed", "acc_matrix", "task_seconds",
                             "train_images_per_second"))
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


def timed(iterator, waited: list):
  """Yields from `iterator`, adding the seconds spent waiting to waited[0].

  JAX dispatches steps asynchronously, so time blocked here is time the
  devices could have spent computing: the input pipeline's share.
  """
  iterator = iter(iterator)
  while True:
    start = time.perf_counter()
    try:
      item = next(iterator)
    except StopIteration:
      return
    finally:
      waited[0] += time.perf_counter() - start
    yield item


def phase_schedules(config, epochs: int,
                    loader_steps: int) -> dict[str, schedules.Schedule]:
  """The learning rate of each trainable group over one training phase.

  Prompts run at `prompt_lr_multiplier` times the base rate, the head at
  it. The per-step cosine is laid out for `iters_per_epoch * epochs` steps
  (the loader's steps per epoch when `iters_per_epoch` is 0), whatever the
  phase really takes.
  """
  common = dict(kind=config.schedule,
                total_steps=(config.iters_per_epoch or loader_steps) * epochs,
                freeze_steps=config.freeze_steps, steps_per_epoch=loader_steps,
                num_epochs=epochs, delayed=config.schedule_delay)
  return {
      "prompts": schedules.Schedule(
          base_lr=config.lr * config.prompt_lr_multiplier, **common),
      "head": schedules.Schedule(base_lr=config.lr, **common)}


@dataclasses.dataclass
class Run:
  """Everything one seed's run needs; built once, then `run()`."""
  config: object
  workdir: str

  def __post_init__(self):
    config = self.config
    configuration.validate(config)
    configuration.validate_devices(config, jax.device_count(),
                                   jax.process_count())
    # "auto" precision fields become this platform's; checkpoints hold those.
    config = self.config = config.copy_and_resolve_references()
    config.update(configuration.resolve_precision(config,
                                                  jax.default_backend()))
    self.mesh = distributed.make_mesh()
    self.replicated = distributed.replicated(self.mesh)
    self.batch_sharding = distributed.batch_sharded(self.mesh)
    # Weights before data: a bad file fails in seconds, not after loading.
    self.backbone = factory.load_backbone(config, self.workdir)
    self.data = pipeline.build_continual_data(
        config, process_index=jax.process_index(),
        process_count=jax.process_count())
    if not config.num_classes:
      config = self.config = config.copy_and_resolve_references()
      config.num_classes = self.data.num_classes
    self.model, self.method = factory.build_model(config, self.data.num_tasks)
    self.steps = steps_lib.make_steps(config, self.model, self.method,
                                      self.replicated)
    self.reporter = reporting.Reporter(self.workdir, distributed.is_primary(),
                                       config.progress_bar)
    self.checkpointer = checkpointing.Checkpointer(
        f"{self.workdir}/checkpoints", max_to_keep=config.keep_checkpoints)
    self.all_finite = jax.jit(lambda tree: jnp.all(jnp.stack([
        jnp.all(jnp.isfinite(x)) for x in jax.tree_util.tree_leaves(tree)])),
                              out_shardings=self.replicated)
    self.run_clock = time.perf_counter()
    self.train_seconds = 0.0
    self.compiled = set()  # Modes whose train step this process compiled.
    self.phases = {"start": self.start_task, "warmup": self.train_phase,
                   "train": self.train_phase,
                   "bookkeeping": self.bookkeeping,
                   "stats": self.class_statistics, "align": self.align,
                   "eval": self.evaluate}

  def task_phases(self, task: int) -> list[str]:
    """The phases of a task for this run's method and config."""
    return steps_lib.task_phases(self.method,
                                 self.config.classifier_alignment, task)

  # ----------------------------------------------------------------- state

  def fresh_state(self) -> tuple[dict, dict]:
    params = factory.init_params(self.config, self.model, self.method,
                                 self.backbone)
    trainable, frozen = steps_lib.split_params(params)
    hidden = self.model.hidden_size
    state = {
        "trainable": trainable,
        "opt_state": self.steps.tx.init(trainable),
        "method_state": self.method.init_state(trainable),
        "class_means": np.zeros((self.config.num_classes, hidden), np.float32),
        "class_vars": np.zeros((self.config.num_classes, hidden), np.float32),
    }
    meta = {"config": self.config.to_dict(),
            "task": 0, "phase": "start", "epoch": 0, "step": 0,
            "global_step": 0, "save_id": 0, "seed": int(self.config.seed),
            "acc_matrix": [], "task_seconds": [],
            "train_log": [],
            "train_images_per_second": []}
    return (distributed.put_replicated(state, self.mesh),
            distributed.put_replicated(frozen, self.mesh)), meta

  def save(self, state, meta, force=False):
    """Checkpoints the run; a non-finite state ends the run unsaved."""
    self.ensure_finite(state, meta)
    meta["save_id"] += 1
    self.checkpointer.save(meta["save_id"], state, meta, force=force)

  def ensure_finite(self, state, meta, loss=None, rate="lr"):
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
      saved = ("no checkpoint was written yet" if
               self.checkpointer.latest_step() is None else
               f"the last checkpoint in {self.workdir}/checkpoints is the "
               "last good state")
      where = f"task {meta['task'] + 1}, phase {meta['phase']}"
      if meta["phase"] in steps_lib.TRAINING_MODES:
        where += f", epoch {meta['epoch'] + 1}, step {meta['step']}"
      raise UserError(
          f"training diverged at {where}: {what}. Nothing non-finite was "
          f"saved; {saved}. Lower --config.{rate} (now "
          f"{getattr(self.config, rate)}) or check the input images, and run "
          "again with a new --workdir.")

  # ------------------------------------------------------------------ loop

  def run(self) -> dict:
    (state, self.frozen), meta = self.fresh_state()
    restored = self.checkpointer.restore_latest(
        state, check_meta=self.check_checkpoint)
    if restored is None:
      self.reporter.write_config(self.config)
    else:
      _, state, meta = restored
    self.log_start(meta)
    try:
      with jax.default_matmul_precision(
          configuration.model_precision(self.config)["context"]):
        while meta["task"] < self.data.num_tasks:
          state = self.phases[meta["phase"]](state, meta)
      self.checkpointer.wait_until_finished()
      summary = self.summary(state, meta)
      self.write_missing_results(summary)
      self.reporter.final_report(summary)
      self.reporter.log("%d tasks done: FAA %.2f  CAA %.2f  FFM %.2f (%s)",
                        summary["tasks_done"], summary["faa"],
                        summary["caa"], summary["ffm"],
                        f"{self.workdir}/metrics.json")
      return summary
    finally:
      self.reporter.close()
      self.checkpointer.close()

  def write_missing_results(self, summary: dict) -> None:
    """Writes metrics.json and the plots again where they are missing.

    A finished run re-run after they were deleted, or one stopped between
    its last checkpoint and writing them, thus ends with all of them.
    """
    missing = self.reporter.missing_results(summary)
    if missing:
      self.reporter.log("writing again what is missing from %s: %s",
                        self.workdir, ", ".join(missing))
      self.reporter.write_results(summary, self.title)

  def check_checkpoint(self, meta: dict) -> None:
    """Refuses another run's checkpoint; a malformed one counts as corrupt.

    Raises:
      UserError: the checkpoint was written by an older smope_jax or with
        a config that computes otherwise (only result-neutral fields such
        as logging intervals may differ).
      checkpointing.MalformedCheckpoint: its metadata is not this
        version's or its stored position cannot be right, so it is moved
        aside and an older one is tried.
    """
    if isinstance(meta, dict) and "config" not in meta and (
        OLDER_META_KEYS <= meta.keys()):
      raise UserError(f"the checkpoints in {self.workdir}/checkpoints were "
                      "written by an older smope_jax; use a new --workdir")
    if not (isinstance(meta, dict) and isinstance(meta.get("config"), dict)):
      raise checkpointing.MalformedCheckpoint(
          f"its metadata is a {type(meta).__name__} without the run's config")
    config_compare.require_same_config(self.workdir, meta["config"],
                                       self.config.to_dict())
    count = lambda key: isinstance(meta.get(key), int) and (  # noqa: E731
        not isinstance(meta.get(key), bool)) and meta[key] >= 0
    problems = [key for key in ("task", "epoch", "step", "global_step",
                                "save_id") if not count(key)]
    if not problems:
      if meta["task"] > self.data.num_tasks:
        problems.append(f"task {meta['task']}")
      if meta.get("phase") not in steps_lib.PHASES:
        problems.append(f"phase {meta.get('phase')!r}")
      rows = meta.get("acc_matrix")
      if not (isinstance(rows, list) and len(rows) == meta["task"] and all(
          isinstance(row, list) and len(row) == t + 1 and
          all(isinstance(a, (int, float)) and 0 <= a <= 100 for a in row)
          for t, row in enumerate(rows))):
        problems.append("accuracy matrix")
    if problems:
      raise checkpointing.MalformedCheckpoint(
          "its stored position is malformed: " + ", ".join(problems))

  @property
  def title(self) -> str:
    """The run in a few words, for logs and plot titles."""
    c = self.config
    method = registry.display_name(c.method)
    label = f"{c.dataset}, {self.data.num_tasks} tasks, {method}, seed {c.seed}"
    return label + (" (upper bound: joint)" if c.joint else "")

  def log_start(self, meta) -> None:
    """What the run is about to do, or that it is finished already."""
    log = self.reporter.log
    if meta["task"] >= self.data.num_tasks:
      log("%s: finished already (%d tasks); reporting its results",
          self.title, meta["task"])
      return
    if meta["global_step"] or meta["task"]:
      log("%s: resuming task %d, phase %s, epoch %d, step %d", self.title,
          meta["task"] + 1, meta["phase"], meta["epoch"] + 1, meta["step"])
    else:
      log("%s: starting", self.title)
    if self.config.joint:
      log("joint training of all %d classes as one task: the upper bound of "
          "continual learning", self.data.num_classes)
    if self.config.validation:
      log("validation run: 20 % of the training data is held out and "
          "evaluated on; the test split is never read")
    order = self.data.class_order
    log("class order (seed %d) starts %s%s", self.config.seed,
        ", ".join(map(str, order[:10])), ", ..." if len(order) > 10 else "")
    batch = self.config.batch_size
    for t in range(self.data.num_tasks):
      log("task %d: %d classes, %d training images (%d steps of %d per "
          "epoch), %d %s images", t + 1, len(self.data.task_classes(t)),
          self.data.train_size(t), self.data.steps_per_epoch(t, batch), batch,
          self.data.test_size(t), self.evaluated_on)
    counts = steps_lib.parameter_counts(
        factory.param_shapes(self.config, self.model, self.method))
    log("%s: learnable parameters %s (prompts %s, head %s), frozen %s",
        registry.display_name(self.config.method), f"{counts['learnable']:,}",
        f"{counts['prompts']:,}", f"{counts['head']:,}",
        f"{counts['frozen']:,}")
    log("devices: %d %s (%d per process, %d processes), mesh %s",
        jax.device_count(), jax.devices()[0].platform,
        jax.local_device_count(), jax.process_count(),
        dict(self.mesh.shape))
    log("precision on %s: dtype %s, matmul_precision %s, routing_precision "
        "%s", jax.default_backend(), self.config.dtype,
        self.config.matmul_precision, self.config.routing_precision)

  def advance(self, state, meta):
    """Moves to the next phase; a training phase gets a new optimizer."""
    phases = self.task_phases(meta["task"])
    following = phases.index(meta["phase"]) + 1
    if following == len(phases):
      meta["task"] += 1
      phase = "start"
    else:
      phase = phases[following]
    meta.update(phase=phase, epoch=0, step=0)
    if phase in steps_lib.TRAINING_MODES:
      state["opt_state"] = self.steps.init_optimizer(state["trainable"])
    return state

  def start_task(self, state, meta):
    """The method's task boundary (SMoPE's snapshot and marks, CODA's
    Gram-Schmidt), then the first training phase."""
    meta["task_clock"] = time.time()
    task = meta["task"]
    cli.progress = f"task {task + 1}, start"
    key = jax.random.fold_in(jax.random.PRNGKey(self.config.seed), task)
    state["trainable"], state["method_state"] = self.steps.start(
        state["trainable"], state["method_state"], np.int32(task), key)
    return self.advance(state, meta)

  def phase_epochs(self, phase: str) -> int:
    if phase == "warmup":  # Half the epochs, as the reference's int(E / 2).
      return max(int(self.config.epochs * 0.5), 1)
    return self.config.epochs

  def task_range(self, task: int) -> np.ndarray:
    """int32 (2,): [first class of the task, end of the seen classes)."""
    return np.asarray(self.data.class_ranges[task], np.int32)

  def train_phase(self, state, meta):
    """The epochs of the dense warm-up or of the top-K training."""
    task, config, phase = meta["task"], self.config, meta["phase"]
    mode = steps_lib.TRAINING_MODES[phase]
    epochs = self.phase_epochs(phase)
    steps_per_epoch = self.data.steps_per_epoch(task, config.batch_size)
    rates = phase_schedules(config, epochs, steps_per_epoch)
    clock = progress.PhaseClock(steps_per_epoch * epochs,
                                meta["epoch"] * steps_per_epoch + meta["step"])
    waited = [0.0]
    while meta["epoch"] < epochs:
      totals, logged = None, 0
      for local in timed(self.data.train_batches(
          task, meta["epoch"], config.batch_size, start_step=meta["step"]),
                         waited):
        batch = distributed.global_batch(local, self.batch_sharding)
        phase_step = meta["epoch"] * steps_per_epoch + meta["step"]
        step_rates = {g: np.float32(s(phase_step)) for g, s in rates.items()}
        inputs = steps_lib.TaskInputs(
            class_range=self.task_range(task), task=np.int32(task),
            rates=step_rates, method_state=state["method_state"])
        state["trainable"], state["opt_state"], step_metrics = self.steps.train(
            mode, state["trainable"], state["opt_state"], self.frozen, batch,
            inputs)
        first = clock.first_step_seconds is None
        if first:  # Time the compilation apart from the steady steps.
          jax.block_until_ready(step_metrics)
        clock.step(local["image"].shape[0] * jax.process_count())
        if first and mode not in self.compiled:
          self.compiled.add(mode)
          self.reporter.log("first %s step (compilation) took %s", mode,
                            progress.format_seconds(clock.first_step_seconds))
        totals = step_metrics if totals is None else jax.tree_util.tree_map(
            jnp.add, totals, step_metrics)
        logged += 1
        meta["step"] += 1
        meta["global_step"] += 1
        cli.progress = (f"task {task + 1}, {phase} epoch {meta['epoch'] + 1}, "
                        f"step {meta['step']}")
        if meta["global_step"] == config.exit_at_step:
          exit_abruptly(config.exit_at_step)
        last_of_epoch = meta["step"] == steps_per_epoch
        if meta["step"] % config.log_every_steps == 0 or last_of_epoch:
          self.log_interval(state, meta, totals, logged, clock, step_rates,
                            epochs)
          totals, logged = None, 0
        else:
          self.draw_bar(meta, clock, epochs)
        if meta["global_step"] % config.checkpoint_every_steps == 0:
          self.save(state, meta)
      meta["epoch"] += 1
      meta["step"] = 0
    seconds = time.perf_counter() - clock.started
    self.train_seconds += seconds
    if mode == "train":
      meta["train_images_per_second"].append(clock.images_per_second)
    if seconds > 0 and waited[0] / seconds > INPUT_BOUND_FRACTION:
      self.reporter.log(
          "input pipeline is likely the bottleneck: %.0f%% of the %s phase "
          "waited for data (more host CPUs, config.cache_data=True or a "
          "smaller image_size help)", 100 * waited[0] / seconds, phase)
    state = self.advance(state, meta)
    self.save(state, meta)
    return state

  def phase_label(self, meta, epochs: int) -> str:
    return (f"task {meta['task'] + 1}/{self.data.num_tasks} {meta['phase']} "
            f"epoch {min(meta['epoch'] + 1, epochs)}/{epochs}")

  def draw_bar(self, meta, clock, epochs: int) -> None:
    """Elapsed time, ETA and the last interval's images/s, fixed widths."""
    eta = clock.eta()
    eta = progress.format_seconds(eta) if eta is not None else "?"
    self.reporter.bar.draw(
        self.phase_label(meta, epochs), clock.done, clock.total_steps,
        f"{progress.format_seconds(clock.elapsed):>7} ETA {eta:>7} "
        f"{clock.last_rate:7.1f} img/s")

  def log_interval(self, state, meta, totals, steps: int, clock, rates,
                   epochs: int) -> None:
    """Logs the mean step metrics since the last interval, with ETAs.

    A non-finite loss stops the run here, before it reaches a checkpoint or
    metrics.json.
    """
    host = distributed.to_host(totals)
    values = {name: float(value) / steps for name, value in host.items()
              if name not in ("correct", "count")}
    self.ensure_finite(state, meta, loss=values["loss"])
    values["acc"] = 100.0 * float(host["correct"]) / max(
        float(host["count"]), 1.0)
    meta["train_log"].append(
        {"global_step": meta["global_step"], "task": meta["task"],
         "phase": meta["phase"], **values})
    images_per_second = clock.interval()
    scalars = {f"train/{k}": v for k, v in values.items()}
    scalars.update({f"train/lr_{g}": float(r) for g, r in rates.items()})
    scalars["train/images_per_second"] = images_per_second
    self.reporter.scalars(meta["global_step"], scalars)
    eta = clock.eta()
    run_eta = self.run_eta(meta, clock)
    losses = " ".join(f"{k} {v:.4g}" for k, v in values.items()
                      if k not in ("loss", "acc"))
    self.reporter.log(
        "%s step %d/%d | loss %.4f (%s) | acc %.1f%% | lr %s | %.1f img/s | "
        "ETA phase %s, run %s", self.phase_label(meta, epochs), meta["step"],
        self.data.steps_per_epoch(meta["task"], self.config.batch_size),
        values["loss"], losses, values["acc"],
        " ".join(f"{g} {float(r):.3g}" for g, r in rates.items()),
        images_per_second,
        progress.format_seconds(eta) if eta is not None else "?",
        progress.format_seconds(run_eta) if run_eta is not None else "?")
    self.draw_bar(meta, clock, epochs)

  def run_eta(self, meta, clock) -> float | None:
    """Seconds left in the run: its remaining training steps at the current
    pace, scaled by the share of time the run so far spent outside them."""
    per_step = clock.seconds_per_step
    if per_step is None:
      return None
    batch = self.config.batch_size
    remaining = clock.total_steps - clock.done
    for task in range(meta["task"] + 1, self.data.num_tasks):
      remaining += self.data.steps_per_epoch(task, batch) * self.config.epochs
    elapsed = time.perf_counter() - self.run_clock
    trained = self.train_seconds + (time.perf_counter() - clock.started)
    overhead = elapsed / trained if trained > 0 and meta["task"] else 1.0
    return per_step * remaining * overhead

  def bookkeeping(self, state, meta):
    """SMoPE's expert counting: an inference-mode pass over the task's data.

    It reads the training loader (shuffled, augmented, last partial batch
    dropped), and each batch's routing already sees the counts of the
    batches before it.
    """
    task, batch_size = meta["task"], self.config.batch_size
    total = self.data.steps_per_epoch(task, batch_size)
    clock = progress.PhaseClock(total, meta["step"])
    for local in self.data.train_batches(task, "count", batch_size,
                                         start_step=meta["step"]):
      batch = distributed.global_batch(local, self.batch_sharding)
      state["method_state"] = self.steps.bookkeeping(
          state["trainable"], self.frozen, state["method_state"], batch,
          np.int32(task))
      meta["step"] += 1
      clock.step(batch_size)
      self.reporter.bar.draw(f"task {task + 1} counting experts", clock.done,
                             total, "")
    self.reporter.log("task %d: counted expert use over %d batches in %s",
                      task + 1, total, progress.format_seconds(
                          time.perf_counter() - clock.started))
    state = self.advance(state, meta)
    self.save(state, meta)
    return state

  def class_statistics(self, state, meta):
    """Mean and variance of each new class's pre-logits (train augmentation).

    Every training image of the task is read once (no batch is dropped).
    """
    task = meta["task"]
    feats, labels = [], []
    started = time.perf_counter()
    for step, local in enumerate(self.data.train_batches(
        task, "stats", self.config.batch_size, drop_remainder=False)):
      self.reporter.bar.draw(f"task {task + 1} class statistics", step,
                             -(-self.data.train_size(task) //
                               self.config.batch_size), "")
      batch = distributed.global_batch(local, self.batch_sharding)
      out = self.steps.features(state["trainable"], self.frozen,
                                state["method_state"], batch, np.int32(task))
      keep = distributed.gather_to_host(batch["mask"]) > 0
      feats.append(distributed.gather_to_host(out)[keep])
      labels.append(distributed.gather_to_host(batch["label"])[keep])
    classes = np.arange(*self.data.class_ranges[task])
    means, variances = alignment.class_statistics(
        np.concatenate(feats), np.concatenate(labels), classes)
    host_means = distributed.to_host(state["class_means"]).copy()
    host_vars = distributed.to_host(state["class_vars"]).copy()
    host_means[classes], host_vars[classes] = means, variances
    state["class_means"], state["class_vars"] = distributed.put_replicated(
        (host_means, host_vars), self.mesh)
    self.reporter.log("task %d: statistics of %d classes in %s", task + 1,
                      len(classes), progress.format_seconds(
                          time.perf_counter() - started))
    return self.advance(state, meta)

  def align(self, state, meta):
    """Classifier alignment on replayed features (tasks after the first)."""
    task, config = meta["task"], self.config
    if task >= 1 and config.align_epochs > 0:
      first, seen = self.data.class_ranges[task]
      iterations = first  # Classes of the earlier tasks.
      schedule = schedules.Schedule(
          "cosine", base_lr=config.align_lr, start_lr=config.align_lr / 10,
          final_lr=config.align_final_lr,
          total_steps=iterations * config.align_epochs)
      rates = np.zeros(config.align_epochs * config.num_classes, np.float32)
      rates[:schedule.total_steps] = schedule.rates(schedule.total_steps)
      key = jax.random.fold_in(jax.random.PRNGKey(config.seed), task)
      self.reporter.log("task %d: aligning the classifier on %d classes: %d "
                        "epochs x %d iterations of %d replayed features",
                        task + 1, seen, config.align_epochs, iterations,
                        config.batch_size * config.align_ratio)
      started = time.perf_counter()
      trainable = dict(state["trainable"])
      trainable["head"] = self.steps.align(
          trainable["head"], state["class_means"], state["class_vars"],
          key, np.int32(seen), np.int32(iterations), rates)
      state["trainable"] = trainable
      self.ensure_finite(state, meta, rate="align_lr")
      self.reporter.log("task %d: alignment took %s", task + 1,
                        progress.format_seconds(time.perf_counter() - started))
    return self.advance(state, meta)

  def evaluate(self, state, meta):
    """Accuracy on every seen task, predicting over all seen classes."""
    task = meta["task"]
    seen = np.int32(self.data.class_ranges[task][1])
    row, started = [], time.perf_counter()
    for j in range(task + 1):
      correct = jnp.int32(0)
      self.reporter.bar.draw(f"task {task + 1} evaluating", j, task + 1,
                             f"task {j + 1}")
      for local in self.data.test_batches(j, self.config.eval_batch_size):
        batch = distributed.global_batch(local, self.batch_sharding)
        correct = correct + self.steps.eval(
            state["trainable"], self.frozen, state["method_state"], batch,
            seen, np.int32(task))
      correct = int(distributed.to_host(correct))
      row.append(100.0 * correct / self.data.test_size(j))
    meta["acc_matrix"].append(row)
    meta["task_seconds"].append(time.time() - meta.pop("task_clock",
                                                       time.time()))
    self.reporter.log("task %d: evaluated %d tasks in %s", task + 1,
                      task + 1, progress.format_seconds(
                          time.perf_counter() - started))
    state = self.advance(state, meta)
    summary = self.summary(state, meta)
    self.reporter.scalars(meta["global_step"], {
        f"eval/{k}": summary[k] for k in ("faa", "caa", "ffm")})
    self.save(state, meta, force=True)
    self.reporter.task_report(summary, self.title)
    return state

  @property
  def evaluated_on(self) -> str:
    return "validation" if self.config.validation else "test"

  def summary(self, state, meta) -> dict:
    matrix = accuracy_matrix(meta["acc_matrix"])
    sizes = [self.data.test_size(j) for j in range(len(meta["acc_matrix"]))]
    out = metrics.summarize(matrix, test_sizes=sizes)
    out.update(
        method=self.config.method, dataset=self.config.dataset,
        seed=meta["seed"], tasks_done=len(meta["acc_matrix"]),
        evaluated_on=self.evaluated_on, joint=bool(self.config.joint),
        task_classes=[b - a for a, b in self.data.class_ranges],
        task_seconds=meta["task_seconds"],
        train_images_per_second=meta["train_images_per_second"],
        train_log=meta["train_log"],
        **self.method.report(distributed.to_host(state["method_state"])))
    return out


def accuracy_matrix(rows: list[list[float]]) -> np.ndarray:
  """Square matrix of the finished tasks; NaN above the diagonal."""
  matrix = np.full((len(rows), len(rows)), np.nan)
  for t, row in enumerate(rows):
    matrix[t, :len(row)] = row
  return matrix


def train_and_evaluate(config, workdir: str) -> dict:
  """Runs every requested seed; returns the summary (or the seed table)."""
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
  reporter = reporting.Reporter(workdir, distributed.is_primary(), False)
  reporter.seed_report(summaries, seeds)
  reporter.close()
  return {"seeds": seeds, "runs": summaries}
