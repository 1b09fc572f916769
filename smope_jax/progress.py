"""Progress of a phase: intervals, throughput and ETAs, and their format.

Times exclude the first step of a phase when it compiles, so images/s and
ETAs describe the steady state.
"""

import time


def format_seconds(seconds: float) -> str:
  """123456 -> '1d10h17m', 75 -> '1m15s', 8.2 -> '8s'."""
  seconds = max(int(seconds), 0)
  days, rest = divmod(seconds, 86400)
  hours, rest = divmod(rest, 3600)
  minutes, secs = divmod(rest, 60)
  if days:
    return f"{days}d{hours:02d}h{minutes:02d}m"
  if hours:
    return f"{hours}h{minutes:02d}m"
  if minutes:
    return f"{minutes}m{secs:02d}s"
  return f"{secs}s"


class PhaseClock:
  """Steps and images of one phase, timed per interval and overall.

  `start_step` is where a resumed phase picks up. The first step's time
  (compilation, on the first phase that uses a step) is kept apart.
  """

  def __init__(self, total_steps: int, start_step: int = 0):
    self.total_steps = total_steps
    self.done = start_step
    self.started = time.perf_counter()
    self.first_step_seconds = None
    self._steady_start = None
    self._steady_steps = 0
    self._steady_images = 0
    self._interval_start = self.started
    self._interval_images = 0
    self.last_rate = 0.0  # Images/s of the last logged interval.

  def step(self, images: int) -> None:
    now = time.perf_counter()
    self.done += 1
    if self.first_step_seconds is None:
      self.first_step_seconds = now - self.started
      self._steady_start = self._interval_start = now
      return
    self._steady_steps += 1
    self._steady_images += images
    self._interval_images += images

  def interval(self) -> float:
    """Images per second since the last call (0 before any steady step)."""
    now = time.perf_counter()
    seconds = now - self._interval_start
    rate = self._interval_images / seconds if self._interval_images else 0.0
    self._interval_start, self._interval_images = now, 0
    self.last_rate = rate
    return rate

  @property
  def elapsed(self) -> float:
    return time.perf_counter() - self.started

  @property
  def images_per_second(self) -> float:
    """Over the phase, without the first step."""
    if not self._steady_steps:
      return 0.0
    return self._steady_images / (time.perf_counter() - self._steady_start)

  @property
  def seconds_per_step(self) -> float | None:
    if not self._steady_steps:
      return None
    return (time.perf_counter() - self._steady_start) / self._steady_steps

  def eta(self) -> float | None:
    """Seconds left in the phase at the steady pace, None before it is known."""
    per_step = self.seconds_per_step
    if per_step is None:
      return None
    return per_step * (self.total_steps - self.done)
