"""Small input checks shared by the library and the launches (imports nothing from the package).

Every check raises before any expensive work and names the input and the fix: a launch turns the
error into a one-line usage message (`experiment.usage_errors`), the library lets it propagate.
"""

from __future__ import annotations

import math
import numbers
import os
import tempfile


def integer(name: str, value, minimum: int | None = None) -> int:
  """`value` as an int, refusing anything that is not a whole number (no silent truncation).

  Args:
    name: how the value is called in messages (an argument or a config field).
    value: the value to check: an int, a numpy integer or an integral float such as 3.0.
    minimum: the smallest accepted value (None: no bound).

  Returns:
    The value as a Python int.

  Raises:
    TypeError: not a number (a string, None, a bool).
    ValueError: a number that is not whole (2.5, nan) or below `minimum`.
  """
  if type(value) is int:  # the common case, checked first: generate runs this per call
    if minimum is not None and value < minimum:
      raise ValueError(f"{name}={value}: must be >= {minimum}.")
    return value
  value = _scalar(value)
  if isinstance(value, bool) or not isinstance(value, numbers.Real):
    raise TypeError(f"{name}={value!r} ({type(value).__name__}): must be an integer.")
  if not isinstance(value, numbers.Integral):
    if not (math.isfinite(value) and float(value).is_integer()):
      raise ValueError(
          f"{name}={value!r}: must be a whole number (it would be truncated to "
          f"{int(value) if math.isfinite(value) else value})."
      )
  result = int(value)
  if minimum is not None and result < minimum:
    raise ValueError(f"{name}={result}: must be >= {minimum}.")
  return result


def real(name: str, value, low: float | None = None, high: float | None = None) -> float:
  """`value` as a finite float within [low, high] (either bound optional).

  Raises:
    TypeError: not a number. ValueError: NaN, infinite, or out of range.
  """
  value = _scalar(value)
  if type(value) not in (float, int) and (
      isinstance(value, bool) or not isinstance(value, numbers.Real)
  ):
    raise TypeError(f"{name}={value!r} ({type(value).__name__}): must be a number.")
  result = float(value)
  if not math.isfinite(result):
    raise ValueError(f"{name}={value!r}: must be a finite number.")
  if (low is not None and result < low) or (high is not None and result > high):
    bounds = f"[{'-inf' if low is None else low}, {'inf' if high is None else high}]"
    raise ValueError(f"{name}={value!r}: must be in {bounds}.")
  return result


def _scalar(value):
  """A 0-d numpy / jax array as its Python number; anything else unchanged."""
  if getattr(value, "ndim", None) == 0 and hasattr(value, "item"):
    return value.item()
  return value


def writable_directory(path: str, name: str) -> str:
  """Creates `path` if needed and proves it writable by creating and removing a file there.

  Args:
    path: the output directory.
    name: the flag or field that set it, for the message.

  Returns:
    The absolute path.

  Raises:
    ValueError: the directory cannot be created or written (naming the OS error).
  """
  path = os.path.abspath(os.path.expanduser(str(path)))
  try:
    _write_probe(path)
  except OSError as err:
    raise ValueError(
        f"{name}={path}: cannot write there ({type(err).__name__}: "
        f"{err.strerror or err}); pass a directory you can write to."
    ) from err
  return path


def writable_file(path: str, name: str) -> str:
  """Checks that `path` can be written (its directory writable; the file, if present, too).

  Returns:
    The absolute path.

  Raises:
    ValueError: the file or its directory cannot be written.
  """
  path = os.path.abspath(os.path.expanduser(str(path)))
  if os.path.isdir(path):
    raise ValueError(f"{name}={path} is a directory; pass a file path.")
  try:
    _write_probe(os.path.dirname(path))
  except OSError as err:
    raise ValueError(
        f"{name}={path}: cannot write its directory ({type(err).__name__}: "
        f"{err.strerror or err}); pass a path you can write to."
    ) from err
  if os.path.exists(path) and not os.access(path, os.W_OK):
    raise ValueError(f"{name}={path}: the file exists and is not writable; pass another path.")
  return path


def _write_probe(directory: str) -> None:
  os.makedirs(directory, exist_ok=True)
  with tempfile.NamedTemporaryFile(dir=directory, prefix=".write-test-"):
    pass
