"""The one place the program learns of a prompt method.

Each method's spec module (JAX-free, so that configuration checks run before
JAX starts) declares a `MethodSpec`: its name, display name, protocol
defaults, config checks and benchmark layout. `methods/__init__` registers
the built-in ones in the tables' order. Everything else (configuration,
trainer, benchmark, comparison, preflight) reads this registry, so adding a
method means its module and one `register` call. The method's model code is
imported only when a run builds it.
"""

import dataclasses
import importlib
import os
import sys
from typing import Any, Callable

from smope_jax import errors

# The project's own method: the benchmark measures every method against it
# and its configs are the benchmark configs' defaults.
REFERENCE = "smope"


def _keep_protocol(config, *, epochs: int, batch_size: int) -> None:
  del config, epochs, batch_size


def _no_check(config, dims: dict) -> None:
  del config, dims


@dataclasses.dataclass(frozen=True)
class MethodSpec:
  """What the program needs to know of a method besides its model code.

  Attributes:
    name: the value of `config.method`.
    display_name: how tables, plots and logs name it.
    method_class: its `base.Method` subclass, or "package.module:Class" to
      import it when a run builds the method (keeps this module JAX-free).
    apply_protocol: `(config, *, epochs, batch_size)` sets the settings
      behind its published numbers on a benchmark config (whose defaults are
      the reference method's); `epochs` and `batch_size` are the benchmark's
      for the baselines' protocol.
    check: `(config, dims)` raises `ConfigError` for a wrong value of the
      method's own fields; `dims` are the ViT's sizes.
    fixed_layout: its prompted blocks are a fixed layout (e.g. blocks 0-4),
      cut to the model's depth on a smaller ViT instead of refused.
    query_pass: it runs the frozen backbone once without prompts for the
      query before the prompted forward (two forwards per image).
  """
  name: str
  display_name: str
  method_class: Any
  apply_protocol: Callable[..., None] = _keep_protocol
  check: Callable[[Any, dict], None] = _no_check
  fixed_layout: bool = True
  query_pass: bool = True


_SPECS: dict[str, MethodSpec] = {}


def _class_path(target) -> str:
  """Where a method class is defined: its source file (or module) and name,
  the same however often its file is loaded."""
  if isinstance(target, str):
    return target
  module = sys.modules.get(target.__module__)
  source = getattr(module, "__file__", None)
  where = os.path.abspath(source) if source else target.__module__
  return f"{where}:{target.__qualname__}"


def register(spec: MethodSpec) -> MethodSpec:
  """Adds a method.

  The same module registering again (a config file read twice) replaces
  its spec; another method of the same name is refused.
  """
  known = _SPECS.get(spec.name)
  if known and _class_path(known.method_class) != _class_path(
      spec.method_class):
    raise ValueError(f"a method named {spec.name!r} is already registered "
                     f"({_class_path(known.method_class)}).")
  _SPECS[spec.name] = spec
  return spec


def names() -> tuple[str, ...]:
  """The registered methods, in registration order (the tables' order)."""
  return tuple(_SPECS)


def get(name: str) -> MethodSpec:
  """The spec of `name`, or a ConfigError listing the methods."""
  if name not in _SPECS:
    raise errors.ConfigError(f"config.method={name!r}; choose one of "
                             f"{names()}.")
  return _SPECS[name]


def display_name(name: str) -> str:
  """The method's display name; an unregistered one (an old run's) as is."""
  return _SPECS[name].display_name if name in _SPECS else name


def method_class(name: str) -> type:
  """The `base.Method` subclass of `name`, imported on first use."""
  target = get(name).method_class
  if isinstance(target, str):
    module, _, attribute = target.partition(":")
    target = getattr(importlib.import_module(module), attribute)
  return target
