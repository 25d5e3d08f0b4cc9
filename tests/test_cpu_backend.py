"""The launches' XLA:CPU setting: added once, beside the user's flags, never over their choice."""

from __future__ import annotations

import os
import subprocess
import sys

from jax_specsel import cpu_backend

FLAG = cpu_backend.YNN_FUSION_FLAG


def test_the_flag_is_added_beside_other_flags():
  environ = {"XLA_FLAGS": "--xla_dump_to=/tmp/x"}
  assert cpu_backend.prefer_eigen_dots(environ)
  assert environ["XLA_FLAGS"] == f"--xla_dump_to=/tmp/x {FLAG}="
  assert not cpu_backend.prefer_eigen_dots(environ)  # once
  assert environ["XLA_FLAGS"] == f"--xla_dump_to=/tmp/x {FLAG}="


def test_the_flag_is_added_without_other_flags():
  environ = {}
  assert cpu_backend.prefer_eigen_dots(environ)
  assert environ == {"XLA_FLAGS": f"{FLAG}="}


def test_a_users_own_setting_is_kept():
  environ = {"XLA_FLAGS": f"{FLAG}=dot"}
  assert not cpu_backend.prefer_eigen_dots(environ)
  assert environ["XLA_FLAGS"] == f"{FLAG}=dot"


def test_the_launches_flag_parser_applies_it_before_jax_starts():
  code = (
      "import os, jax; from jax._src import xla_bridge; from jax_specsel import experiment;"
      "experiment.parse_flags(['prog']); assert not xla_bridge._backends;"
      "print(os.environ['XLA_FLAGS']); jax.numpy.ones(2).block_until_ready()"
  )
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
  assert done.returncode == 0, done.stderr[-2000:]
  assert done.stdout.strip().splitlines()[-1] == f"{FLAG}="
