"""Shared command-line start-up: flag errors as one line, exit status 2.

absl and ml_collections report a bad flag, a config file that fails to load
or an override of a field that does not exist with a traceback; users get
one line saying what is wrong instead. Config files are loaded here first,
so that their errors name the file and line, and overrides are checked
against the loaded fields, so that a typo gets a suggestion.
"""

import os
import re
import sys
import traceback
import types

from absl import app
from absl import flags
import ml_collections
from ml_collections.config_flags import config_flags as config_flags_lib

from smope_jax import configuration
from smope_jax.errors import ConfigError
from smope_jax.errors import UserError

# Where the program is, e.g. "task 2, step 140": set by the trainer, named
# by the message of an interrupted run.
progress = ""
# The module a config file runs as; registered like an import, so that
# dataclasses and pickling inside it work as under config_flags.
_CONFIG_MODULE = "smope_jax_config_file"


def _one_line(text: str) -> str:
  return " ".join(str(text).split())


def _cause(error: BaseException):
  """The first UserError in an exception's cause/context chain, if any."""
  seen = set()
  while error is not None and id(error) not in seen:
    if isinstance(error, UserError):
      return error
    seen.add(id(error))
    error = error.__cause__ or error.__context__
  return None


def _last_line(text: str) -> str:
  """The final line of a flag error, which config_flags pads with a traceback.

  For "pkg.SomeError: what went wrong" only "what went wrong" is kept.
  """
  lines = [l.strip() for l in text.splitlines() if l.strip()]
  last = lines[-1] if lines else text
  head, sep, rest = last.partition(": ")
  if sep and " " not in head and head.split(".")[-1][:1].isupper():
    return rest
  return last


def _raised(error: Exception, path: str) -> str:
  """'RuntimeError: boom (line 3)': an exception and its line in `path`."""
  lines = [
      frame.lineno
      for frame in traceback.extract_tb(error.__traceback__)
      if os.path.abspath(frame.filename) == os.path.abspath(path)
  ]
  where = f" (line {lines[-1]})" if lines else ""
  return _one_line(f"{type(error).__name__}: {error}") + where


def load_config_file(spec: str) -> ml_collections.ConfigDict:
  """Runs `get_config` of a config file "path[:argument]", as config_flags does.

  Raises:
    ConfigError: the file is missing or unreadable, does not compile, fails
      to run, has no `get_config`, or `get_config` fails or returns no
      ConfigDict with the fields of `configuration.base_config()`; the
      message names the file.
  """
  path, has_argument, argument = spec.partition(":")
  try:
    with open(path, "rb") as f:
      source = f.read()
  except OSError as e:
    raise ConfigError(f"cannot read the config file {path} "
                      f"({e.strerror or e}).") from None
  module = types.ModuleType(_CONFIG_MODULE)
  module.__file__ = path
  sys.modules[_CONFIG_MODULE] = module
  try:
    code = compile(source, path, "exec")
    exec(code, module.__dict__)  # pylint: disable=exec-used
  except SyntaxError as e:
    raise ConfigError(f"{path}, line {e.lineno}: {e.msg}.") from None
  except UserError:
    raise
  except Exception as e:  # pylint: disable=broad-except
    raise ConfigError(f"{path} fails to load: {_raised(e, path)}.") from None
  get_config = getattr(module, "get_config", None)
  if not callable(get_config):
    raise ConfigError(f"{path} defines no get_config(); a config file defines "
                      "get_config(arg=None) returning a ConfigDict.")
  try:
    config = get_config(argument) if has_argument else get_config()
  except UserError:
    raise
  except Exception as e:  # pylint: disable=broad-except
    raise ConfigError(
        f"{path}: get_config() raised {_raised(e, path)}.") from None
  try:
    configuration.check_fields(config)
  except ConfigError as e:
    raise ConfigError(f"{path}: {e}") from None
  return config


def _flag_value(argv: list[str], name: str):
  """The last value given to --name on the command line, or None."""
  value = None
  for i, arg in enumerate(argv[1:], 1):
    if arg == "--":
      break
    if arg in (f"-{name}", f"--{name}") and i + 1 < len(argv):
      value = argv[i + 1]
    elif arg.startswith((f"-{name}=", f"--{name}=")):
      value = arg.split("=", 1)[1]
  return value


def _overrides(argv: list[str], name: str) -> list[str]:
  """Dotted fields overridden by --name.a.b=..., as config_flags finds them."""
  pattern = re.compile(rf"-{{1,2}}(no)?{re.escape(name)}\.")
  return [
      arg.split("=", 1)[0].split(".", 1)[1]
      for arg in argv[1:]
      if pattern.match(arg)
  ]


def _field(config, dotted: str):
  """The value at a dotted path, or raises KeyError if there is none."""
  node = config
  for part in dotted.split("."):
    if not isinstance(node, ml_collections.ConfigDict) or part not in node:
      raise KeyError(dotted)
    node = node[part]
  return node


def _check_overrides(argv: list[str], name: str, config) -> None:
  """Every --name.field=... names a field of the config; typos get a guess."""
  fields = list(configuration.dotted_fields(config))
  for dotted in _overrides(argv, name):
    try:
      _field(config, dotted)
    except KeyError:
      guess = configuration.suggest_field(dotted, fields)
      hint = (f"did you mean {name}.{guess}?"
              if guess else "see the config file for the fields it has.")
      raise ConfigError(f"--{name}.{dotted}: the config has no field "
                        f"{dotted!r}; {hint}") from None


def _config_flag_names() -> list[str]:
  return [
      name for name in flags.FLAGS
      if config_flags_lib.is_config_flag(flags.FLAGS[name])
  ]


def _preload_configs(argv: list[str]) -> dict:
  """{flag name: config} for each config file on the command line."""
  configs = {}
  for name in _config_flag_names():
    spec = _flag_value(argv, name)
    if spec:
      configs[name] = load_config_file(spec)
      _check_overrides(argv, name, configs[name])
  return configs


def _bad_value(error: flags.Error, configs: dict) -> str:
  """A wrong-type override as "--config.x=v: config.x takes an integer"."""
  match = re.match(r"flag --(\w+)\.([\w.]+)=(.*?): ", str(error), re.S)
  if match and match.group(1) in configs:
    name, dotted, value = match.groups()
    kind = type(_field(configs[name], dotted))
    if kind in configuration.KINDS:
      return (f"--{name}.{dotted}={value}: {name}.{dotted} takes "
              f"{configuration.KINDS[kind]}.")
  line = _last_line(str(_cause(error) or error))
  # absl's own messages start with a capital ("Unknown command line flag").
  return line[:1].lower() + line[1:] if re.match("[A-Z][a-z]", line) else line


def refuse_arguments(argv: list[str]) -> None:
  """Every input is a flag: a word left after them is a mistake."""
  if len(argv) > 1:
    raise UserError(f"unexpected arguments: {' '.join(argv[1:])}; give "
                    "every setting as a flag, e.g. --config.lr=0.01.")


HELP_FLAGS = {
    "--help", "-help", "-h", "-?", "--helpshort", "--helpfull", "--helpxml"
}


def _installed_configs(argv: list[str]) -> list[str]:
  """`--config=configs/x.py` finds the installed configs from any directory.

  A path that exists is kept; otherwise a `configs/` file is looked up in
  the `configs` package that `pip install` puts beside smope_jax.
  """
  names = _config_flag_names()
  out = []
  for arg in argv:
    flag, sep, spec = arg.partition("=")
    path, colon, argument = spec.partition(":")
    if (sep and flag.lstrip("-") in names and path.startswith("configs/") and
        not os.path.exists(path)):
      try:
        import configs  # pylint: disable=g-import-not-at-top
        installed = os.path.join(os.path.dirname(configs.__file__),
                                 path[len("configs/"):])
        if os.path.exists(installed):
          arg = f"{flag}={installed}{colon}{argument}"
      except ImportError:
        pass
    out.append(arg)
  return out


def parse_flags(argv: list[str]) -> list[str]:
  """Parses flags; a bad flag or config ends with one line and status 2."""
  configs = {}
  argv = _installed_configs(argv)
  try:
    configs = _preload_configs(argv)
    remaining = flags.FLAGS(argv)
  except SystemExit:
    # absl ends --help with status 1; help that was asked for succeeded.
    if HELP_FLAGS & set(argv[1:]):
      sys.exit(0)
    raise
  except UserError as e:
    message = str(e)
  except flags.Error as e:
    message = _bad_value(e, configs)
  else:
    return remaining
  print(f"error: {message}", file=sys.stderr)
  sys.exit(2)


def run(main, required: list[str]) -> None:
  """`app.run(main)` with `required` flags and one-line flag errors."""
  flags.mark_flags_as_required(required)
  app.run(main, flags_parser=parse_flags)
