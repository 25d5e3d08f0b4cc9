"""The one installed-version pairing known not to work, refused at import with the fix.

flax 0.12.8 (and anything before 0.12.10) fails to import under jax 0.11.x with an AttributeError
deep inside flax (`jax.experimental.hijax` has no `HiPrimitive`; measured on a CUDA 13 machine,
shared/GPU.md). pip cannot express "flax >= 0.12.10 when jax >= 0.11" in pyproject, so an old flax
left in an environment whose jax was upgraded reaches this check first.
"""

from __future__ import annotations

import itertools
from importlib import metadata

FIRST_JAX_NEEDING_NEW_FLAX = (0, 11)
FIRST_FLAX_FOR_NEW_JAX = (0, 12, 10)


def release(version: str) -> tuple[int, ...]:
  """The leading numeric release of a version string: "0.12.10" -> (0, 12, 10), "0.11.0rc1" -> (0, 11, 0)."""
  numbers = []
  for piece in version.split("+")[0].split("."):
    digits = "".join(itertools.takewhile(str.isdigit, piece))
    if not digits:
      break
    numbers.append(int(digits))
    if len(digits) != len(piece):
      break
  return tuple(numbers)


def check_versions(jax_version: str | None = None, flax_version: str | None = None) -> None:
  """Raises ImportError, naming the fix, for jax >= 0.11 with flax < 0.12.10.

  Args:
    jax_version, flax_version: version strings; default the installed distributions' (no check
      when either is not installed as a distribution, e.g. a source checkout on sys.path).
  """
  try:
    jax_version = jax_version or metadata.version("jax")
    flax_version = flax_version or metadata.version("flax")
  except metadata.PackageNotFoundError:
    return
  if (
      release(jax_version) >= FIRST_JAX_NEEDING_NEW_FLAX
      and release(flax_version) < FIRST_FLAX_FOR_NEW_JAX
  ):
    raise ImportError(
        f"jax {jax_version} needs flax >= 0.12.10, but flax {flax_version} is installed (it fails to "
        "import with this jax). Fix: pip install 'flax>=0.12.10' (or reinstall with "
        "pip install -e '.[cuda13]', which requires it)."
    )
