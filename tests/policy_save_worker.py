"""Child side of the policy-save crash test (tests/test_policy_save.py).

  python policy_save_worker.py PATH POINT

Saves a small policy (options ["new-a", "new-b"]) over PATH with overwrite=True and kills itself
with SIGKILL at POINT of the save, found by watching os.rename:
  orbax    before orbax renames its temporary into the staging directory
  staged   before the old policy is moved away (the staging copy is complete)
  moved    after the old policy was moved away, before the new one is renamed in
  swapped  after the new one was renamed in, before the old copy is removed
Exits 0 only if the point was never reached (the test then fails on the exit status).
"""

from __future__ import annotations

import os
import signal
import sys


def small_policy(option_names, seed):
  from flax import nnx
  from jax_specsel.bandit.policy import Policy, PolicyNetwork

  network = PolicyNetwork(4, 2, hidden_dim=8, num_layers=2, rngs=nnx.Rngs(params=seed))
  return Policy(network, option_names=option_names)


def main(path: str, point: str) -> None:
  path = os.path.abspath(path)
  real_rename = os.rename
  die = lambda: os.kill(os.getpid(), signal.SIGKILL)

  def watched_rename(src, dst, *args, **kwargs):
    src, dst = os.fspath(src), os.fspath(dst)
    if (
        (point == "orbax" and ".orbax-checkpoint-tmp" in src)
        or (point == "staged" and src == path)
        or (point == "moved" and dst == path)
    ):
      die()
    real_rename(src, dst, *args, **kwargs)
    if point == "swapped" and dst == path:
      die()

  os.rename = watched_rename
  small_policy(["new-a", "new-b"], seed=1).save(path, overwrite=True)


if __name__ == "__main__":
  main(*sys.argv[1:])
