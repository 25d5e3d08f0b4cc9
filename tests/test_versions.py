"""The version pairing guard and the pyproject extras that avoid the bad pairing."""

from __future__ import annotations

import os
import tomllib

import pytest

from jax_specsel import versions

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize(
    "jax_version,flax_version,refused",
    [
        ("0.11.2", "0.12.8", True),  # measured: flax fails to import (shared/GPU.md)
        ("0.11.0rc1", "0.12.9", True),
        ("0.11.2", "0.12.10", False),  # measured on an H100
        ("0.10.2", "0.12.8", False),  # what `make test` resolves here
        ("0.12.0.dev20261201+cuda13", "0.13.0", False),
    ],
)
def test_version_guard(jax_version, flax_version, refused):
  if refused:
    with pytest.raises(ImportError, match=r"needs flax >= 0.12.10.*pip install 'flax>=0.12.10'"):
      versions.check_versions(jax_version, flax_version)
  else:
    versions.check_versions(jax_version, flax_version)


def test_installed_versions_pass_the_guard():
  versions.check_versions()


def test_accelerator_extras_require_a_flax_that_imports_with_new_jax():
  with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
    project = tomllib.load(f)["project"]
  for extra in ("cuda12", "cuda13", "tpu"):
    assert "flax>=0.12.10" in project["optional-dependencies"][extra], extra
  assert "torch==2.13.0" in project["optional-dependencies"]["test"]
