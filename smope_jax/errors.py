"""Errors whose message is meant for the user, not a traceback.

`main` catches `UserError`, prints its message alone and exits with status 2.
Raise it (or a subclass) wherever bad input can be explained in one sentence:
a wrong config value, a missing dataset or checkpoint, an unreadable file.
"""


class UserError(Exception):
  """A problem the user can fix; the message says how."""


class ConfigError(UserError, ValueError):
  """A config value is invalid."""


class MissingDataError(UserError):
  """A dataset is not available locally."""


class MissingWeightsError(UserError):
  """Pretrained weights are not available locally or do not fit the model."""


def require(condition: bool, message: str) -> None:
  """Raises ConfigError(message) unless `condition` holds."""
  if not condition:
    raise ConfigError(message)
