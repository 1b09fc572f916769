"""What a run tells its user while it runs: log lines, ETAs and the bar.

`trainer.Run` calls a `RunLog` at each event with its position. The lines go
to the log (and the workdir's log.txt); the bar (tqdm, on stderr) only to
process 0's terminal and only with `config.progress_bar`, so redirected
output (nohup, SLURM, CI, `launch/tpu_vm.sh logs`) gets the lines alone.
"""

import contextlib
import sys
import time

from absl import logging
import jax
import tqdm

from smope_jax import cli, distributed, progress, reporting
from smope_jax.methods import registry

# Above this fraction of a phase spent waiting for data, the log says so.
# (Steps are dispatched asynchronously, so some waiting overlaps compute.)
INPUT_BOUND_FRACTION = 0.5


def interval_means(totals, steps: int) -> dict:
  """The mean step metrics of an interval from their summed device values;
  "acc" is the share of its samples classified right, in percent."""
  host = distributed.to_host(totals)
  values = {
      name: float(value) / steps
      for name, value in host.items()
      if name not in ("correct", "count")
  }
  values["acc"] = 100.0 * float(host["correct"]) / max(float(host["count"]),
                                                       1.0)
  return values


def _eta(seconds: float | None) -> str:
  return progress.format_seconds(seconds) if seconds is not None else "?"


class RunLog:
  """The log lines, ETAs, phase clocks and bar of one run."""

  def __init__(self, config, data, reporter, stream=None):
    self.config, self.data, self.reporter = config, data, reporter
    self._stream = stream or sys.stderr
    self._drawn = bool(reporter.primary and config.progress_bar and
                       self._stream.isatty())
    self._bar = None
    self._clock = None  # The current phase's `progress.PhaseClock`.
    self._waited = 0.0  # Seconds the current phase waited for data.
    self._run_clock = time.perf_counter()
    self._task_clock = time.time()  # A resumed task counts from the resume.
    self._train_seconds = 0.0
    self._compiled = set()  # Modes whose train step this process compiled.

  @property
  def title(self) -> str:
    """The run in a few words, for logs and plot titles."""
    c = self.config
    method = registry.display_name(c.method)
    label = f"{c.dataset}, {self.data.num_tasks} tasks, {method}, seed {c.seed}"
    return label + (" (upper bound: joint)" if c.joint else "")

  @contextlib.contextmanager
  def _above_bar(self):
    """Lifts the bar off its line while something else writes a line."""
    if self._bar is not None:
      self._bar.clear()
    yield
    if self._bar is not None:
      self._bar.refresh()

  def log(self, message: str, *args) -> None:
    """An INFO line that does not collide with the bar."""
    with self._above_bar():
      logging.info(message, *args)

  def start(self, position, counts: dict, mesh) -> None:
    """What the run is about to do, or that it is finished already."""
    log, data, config = self.log, self.data, self.config
    if position.task >= data.num_tasks:
      log("%s: finished already (%d tasks); reporting its results", self.title,
          position.task)
      return
    if position.global_step or position.task:
      log("%s: resuming task %d, phase %s, epoch %d, step %d", self.title,
          position.task + 1, position.phase, position.epoch + 1, position.step)
    else:
      log("%s: starting", self.title)
    if config.joint:
      log(
          "joint training of all %d classes as one task: the upper bound of "
          "continual learning", data.num_classes)
    if config.validation:
      log("validation run: 20 % of the training data is held out and "
          "evaluated on; the test split is never read")
    order = data.class_order
    log("class order (seed %d) starts %s%s", config.seed,
        ", ".join(map(str, order[:10])), ", ..." if len(order) > 10 else "")
    batch = config.batch_size
    for t in range(data.num_tasks):
      log(
          "task %d: %d classes, %d training images (%d steps of %d per "
          "epoch), %d %s images", t + 1, len(data.task_classes(t)),
          data.train_size(t), data.steps_per_epoch(t, batch), batch,
          data.test_size(t), reporting.evaluated_on(config))
    log("%s: learnable parameters %s (prompts %s, head %s), frozen %s",
        registry.display_name(config.method), f"{counts['learnable']:,}",
        f"{counts['prompts']:,}", f"{counts['head']:,}",
        f"{counts['frozen']:,}")
    log("devices: %d %s (%d per process, %d processes), mesh %s",
        jax.device_count(),
        jax.devices()[0].platform, jax.local_device_count(),
        jax.process_count(), dict(mesh.shape))
    log(
        "precision on %s: dtype %s, matmul_precision %s, routing_precision "
        "%s", jax.default_backend(), config.dtype, config.matmul_precision,
        config.routing_precision)

  def task_started(self, position) -> None:
    self._task_clock = time.time()
    cli.progress = f"task {position.task + 1}, start"

  def task_seconds(self) -> float:
    """Wall-clock seconds since the task started (or the run resumed)."""
    return time.time() - self._task_clock

  # ---------------------------------------------------------------- phases

  def phase_started(self, position, what: str, total: int,
                    done: int = 0) -> None:
    """Starts the clock and the bar of a phase of `total` units."""
    self._open(f"task {position.task + 1} {what}", total, done)

  def _open(self, label: str, total: int, done: int) -> None:
    self.phase_ended()
    self._clock = progress.PhaseClock(total, done)
    self._waited = 0.0
    # `{postfix}` is ", " and the fields given to `tick`, if any.
    self._bar = tqdm.tqdm(
        desc=label, total=total, initial=done, file=self._stream, leave=False,
        dynamic_ncols=True, disable=not self._drawn,
        bar_format="{desc} {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} "
        "[{elapsed}{postfix}]")

  def tick(self, images: int = 0) -> None:
    """One unit of the phase done."""
    self._clock.step(images)
    self._bar.update()

  def phase_ended(self, message: str = "", *args) -> None:
    """Removes the bar; logs `message` with the phase's time as last arg."""
    if self._bar is not None:
      self._bar.close()
      self._bar = None
    if message:
      self.log(message, *args, progress.format_seconds(self._clock.elapsed))

  def timed(self, iterator):
    """Yields from `iterator`, counting the phase's seconds waiting on it.

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
        self._waited += time.perf_counter() - start
      yield item

  # -------------------------------------------------------------- training

  def training_started(self, position, epochs: int,
                       steps_per_epoch: int) -> None:
    self._open(self._phase_label(position, epochs), steps_per_epoch * epochs,
               position.epoch * steps_per_epoch + position.step)

  def train_step(self, position, mode: str, step_metrics, images: int,
                 epochs: int) -> None:
    """One training step done; `position` already counts it."""
    clock = self._clock
    first = clock.first_step_seconds is None
    if first:  # Time the compilation apart from the steady steps.
      jax.block_until_ready(step_metrics)
    if self._drawn:  # The ETA of the phase and the last interval's rate.
      self._bar.set_description_str(self._phase_label(position, epochs),
                                    refresh=False)
      self._bar.set_postfix_str(
          f"ETA {_eta(clock.eta())}, {clock.last_rate:.1f} img/s",
          refresh=False)
    self.tick(images)
    if first and mode not in self._compiled:
      self._compiled.add(mode)
      self.log("first %s step (compilation) took %s", mode,
               progress.format_seconds(clock.first_step_seconds))
    cli.progress = (f"task {position.task + 1}, {position.phase} epoch "
                    f"{position.epoch + 1}, step {position.step}")

  def _phase_label(self, position, epochs: int) -> str:
    return (f"task {position.task + 1}/{self.data.num_tasks} {position.phase} "
            f"epoch {min(position.epoch + 1, epochs)}/{epochs}")

  def interval(self, position, values: dict, rates: dict, epochs: int) -> None:
    """The mean step metrics since the last interval, with ETAs."""
    images_per_second = self._clock.interval()
    scalars = {f"train/{k}": v for k, v in values.items()}
    scalars.update({f"train/lr_{g}": float(r) for g, r in rates.items()})
    scalars["train/images_per_second"] = images_per_second
    with self._above_bar():
      self.reporter.scalars(position.global_step, scalars)
    losses = " ".join(
        f"{k} {v:.4g}" for k, v in values.items() if k not in ("loss", "acc"))
    self.log(
        "%s step %d/%d | loss %.4f (%s) | acc %.1f%% | lr %s | %.1f img/s | "
        "ETA phase %s, run %s", self._phase_label(position, epochs),
        position.step, self._clock.total_steps // max(epochs, 1),
        values["loss"], losses, values["acc"], " ".join(
            f"{g} {float(r):.3g}" for g, r in rates.items()), images_per_second,
        _eta(self._clock.eta()), _eta(self._run_eta(position)))

  def _run_eta(self, position) -> float | None:
    """Seconds left in the run: its remaining training steps at the current
    pace, scaled by the share of time the run so far spent outside them."""
    clock = self._clock
    per_step = clock.seconds_per_step
    if per_step is None:
      return None
    batch = self.config.batch_size
    remaining = clock.total_steps - clock.done
    for task in range(position.task + 1, self.data.num_tasks):
      remaining += self.data.steps_per_epoch(task, batch) * self.config.epochs
    elapsed = time.perf_counter() - self._run_clock
    trained = self._train_seconds + clock.elapsed
    overhead = elapsed / trained if trained > 0 and position.task else 1.0
    return per_step * remaining * overhead

  def training_ended(self, position) -> float:
    """Ends the phase; returns its steady images per second."""
    seconds = self._clock.elapsed
    self._train_seconds += seconds
    self.phase_ended()
    if seconds > 0 and self._waited / seconds > INPUT_BOUND_FRACTION:
      self.log(
          "input pipeline is likely the bottleneck: %.0f%% of the %s phase "
          "waited for data (more host CPUs, config.cache_data=True or a "
          "smaller image_size help)", 100 * self._waited / seconds,
          position.phase)
    return self._clock.images_per_second

  # --------------------------------------------------------------- results

  def task_done(self, position, summary: dict) -> None:
    """The evaluation's scalars, metrics.json, the plots and the table."""
    self.reporter.scalars(
        position.global_step,
        {f"eval/{k}": summary[k] for k in ("faa", "caa", "ffm")})
    self.reporter.task_report(summary, self.title)

  def run_done(self, summary: dict, workdir: str) -> None:
    """The final report; metrics.json and the plots again where missing.

    A finished run re-run after they were deleted, or one stopped between
    its last checkpoint and writing them, thus ends with all of them.
    """
    missing = self.reporter.missing_results(summary)
    if missing:
      self.log("writing again what is missing from %s: %s", workdir,
               ", ".join(missing))
      self.reporter.write_results(summary, self.title)
    self.reporter.final_report(summary)
    self.log("%d tasks done: FAA %.2f  CAA %.2f  FFM %.2f (%s)",
             summary["tasks_done"], summary["faa"], summary["caa"],
             summary["ffm"], f"{workdir}/metrics.json")
