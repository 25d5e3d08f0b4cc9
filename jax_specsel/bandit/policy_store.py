"""A saved policy's directory on disk, replaced crash-safely.

A save writes the new copy beside the directory (`path.saving-*`, `staging_path`) and swaps it in
by two renames (`swap_in`), the old copy moved aside first (`path.previous-*`). A process killed
at any point leaves either the old or the new policy loadable: a kill between the two renames is
repaired by `recover_interrupted_save`, and every swap removes what earlier interrupted saves
left beside the directory.
"""

from __future__ import annotations

import contextlib
import glob
import os
import re
import shutil
import uuid

from absl import logging

_SAVING, _PREVIOUS = ".saving-", ".previous-"  # suffixes of a save's staging and replaced copies
ITEMS = ("metadata", "state")  # the orbax items of a complete policy directory


def staging_path(path: str) -> str:
  """A fresh name beside `path` (an absolute directory path) to write the new copy to."""
  return f"{path}{_SAVING}{uuid.uuid4().hex[:8]}"


def swap_in(staging: str, path: str) -> None:
  """Moves an existing `path` aside, renames the finished `staging` copy to `path`, then removes
  the copies this and earlier (interrupted) saves left beside it."""
  if os.path.lexists(path):
    os.rename(path, f"{path}{_PREVIOUS}{uuid.uuid4().hex[:8]}")
  os.rename(staging, path)
  _remove_leftovers(path)


def _beside(path: str, suffix: str) -> list[str]:
  """Entries `path<suffix>*` in path's directory (orbax temporaries of a staging copy included)."""
  return sorted(glob.glob(glob.escape(path + suffix) + "*"))


def _is_complete(directory: str) -> bool:
  """A finished Policy.save directory (orbax renames its temporary into place only when done)."""
  name = os.path.basename(directory)
  return (
      re.fullmatch(r".*\.(saving|previous)-[0-9a-f]{8}", name) is not None
      and not os.path.islink(directory)
      and all(os.path.isdir(os.path.join(directory, item)) for item in ITEMS)
  )


def recover_interrupted_save(path: str | os.PathLike) -> str | None:
  """Puts back the policy of a save killed between its two renames; a no-op when `path` exists.

  With nothing at `path`, a complete new copy (`path.saving-*`) wins, else the old one
  (`path.previous-*`); the newest if several.

  Returns:
    The directory renamed to `path`, or None.
  """
  path = os.path.abspath(os.fspath(path))
  if os.path.lexists(path):
    return None
  for suffix in (_SAVING, _PREVIOUS):
    candidates = [d for d in _beside(path, suffix) if _is_complete(d)]
    if candidates:
      chosen = max(candidates, key=os.path.getmtime)
      try:
        os.rename(chosen, path)
      except OSError:
        if not os.path.isdir(path):  # another process recovering at once got there first
          raise
      logging.warning("%s: recovered the policy of an interrupted save from %s", path, chosen)
      return chosen
  return None


def _remove_leftovers(path: str) -> None:
  """Removes the staging and replaced copies of this and of earlier (interrupted) saves."""
  for leftover in _beside(path, _SAVING) + _beside(path, _PREVIOUS):
    if os.path.isdir(leftover) and not os.path.islink(leftover):
      shutil.rmtree(leftover, ignore_errors=True)
    else:
      with contextlib.suppress(FileNotFoundError):
        os.remove(leftover)


def leftovers_note(path: str) -> str:
  """For an error message: the unfinished copies an interrupted save left beside `path`."""
  leftovers = [os.path.basename(p) for p in _beside(path, _SAVING) + _beside(path, _PREVIOUS)]
  if not leftovers:
    return ""
  return (
      f"; beside it only {leftovers}, unfinished copies of a save that was interrupted "
      "before it completed: train and save the policy again (the next save removes them)"
  )
