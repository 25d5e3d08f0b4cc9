"""Policy.save under a SIGKILL at every point of the swap: the path always loads (old or new), and
the next save leaves nothing beside it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from jax_specsel import bandit
from policy_save_worker import small_policy

HERE = os.path.dirname(os.path.abspath(__file__))
OLD, NEW = ["old-a", "old-b"], ["new-a", "new-b"]


def _killed_save(path, point: str) -> None:
  env = dict(
      os.environ,
      PYTHONPATH=os.pathsep.join([os.path.dirname(HERE), HERE, os.environ.get("PYTHONPATH", "")]),
  )
  env.pop("XLA_FLAGS", None)
  completed = subprocess.run(
      [sys.executable, os.path.join(HERE, "policy_save_worker.py"), str(path), point],
      env=env,
      capture_output=True,
      text=True,
      timeout=300,
  )
  assert completed.returncode == -signal.SIGKILL, completed.stderr[-3000:]


# What a kill at each point leaves beside the path, and which policy the next load finds.
@pytest.mark.parametrize(
    "point,left_beside,loads",
    [
        ("orbax", ".saving-", OLD),  # orbax's temporary only: the old policy was never touched
        ("staged", ".saving-", OLD),  # a complete new copy, the old one still in place
        ("moved", ".previous-", NEW),  # nothing at the path: the complete new copy wins
        ("swapped", ".previous-", NEW),
    ],
)  # the new one in place, the old copy not yet removed
def test_a_kill_at_any_point_of_a_save_leaves_a_loadable_policy(
    point, left_beside, loads, tmp_path
):
  path = tmp_path / "policy"
  small_policy(OLD, seed=0).save(path)
  _killed_save(path, point)
  assert any(name.startswith("policy" + left_beside) for name in os.listdir(tmp_path))
  assert bandit.load_policy(path).option_names == loads
  small_policy(NEW, seed=2).save(path, overwrite=True)  # a clean rerun
  assert os.listdir(tmp_path) == ["policy"]
  assert bandit.load_policy(path).option_names == NEW


def test_a_save_killed_before_its_first_policy_existed_is_named_on_load(tmp_path):
  path = tmp_path / "policy"
  _killed_save(path, "orbax")  # a first save: nothing was ever complete
  with pytest.raises(
      FileNotFoundError,
      match=r"no saved policy at .*policy \(expected a directory "
      r"from Policy.save\); beside it only \['policy.saving-"
      r"[0-9a-f]{8}.orbax-checkpoint-tmp.*\], unfinished "
      r"copies of a save that was interrupted",
  ):
    bandit.load_policy(path)
  small_policy(NEW, seed=2).save(path)
  assert os.listdir(tmp_path) == ["policy"]


def test_overwrite_replaces_a_file_or_a_policy_and_leaves_nothing_beside(tmp_path):
  path = tmp_path / "policy"
  path.write_text("not a policy")
  small_policy(OLD, seed=0).save(path, overwrite=True)
  assert os.listdir(tmp_path) == ["policy"]
  small_policy(NEW, seed=1).save(path, overwrite=True)
  assert os.listdir(tmp_path) == ["policy"]
  assert bandit.load_policy(path).option_names == NEW
  with pytest.raises(FileExistsError, match="exists; pass overwrite=True"):
    small_policy(OLD, seed=0).save(path)
