"""Runs a script of the repository (a launch or a diagnostic) in a subprocess, and checks that it
failed with one clear line: the scripts define absl flags at import and exit through absl."""

from __future__ import annotations

import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def run_script(path: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
  """Runs `path` (relative to the repository root) offline, with this tree's package first."""
  env = dict(
      os.environ,
      HF_HUB_OFFLINE="1",
      HF_DATASETS_OFFLINE="1",
      TOKENIZERS_PARALLELISM="false",
      PYTHONPATH=os.pathsep.join([ROOT, HERE, os.environ.get("PYTHONPATH", "")]),
  )
  env.pop("XLA_FLAGS", None)
  return subprocess.run(
      [sys.executable, os.path.join(ROOT, path), *args],
      cwd=ROOT,
      env=env,
      capture_output=True,
      text=True,
      timeout=timeout,
  )


def fails_with(completed: subprocess.CompletedProcess, message: str) -> None:
  """Exit status 1 and the message on ONE line: no traceback, no usage text, no flag help."""
  output = completed.stdout + completed.stderr
  assert completed.returncode == 1, output[-3000:]
  fatal = [line for line in output.splitlines() if line.startswith("FATAL")]
  assert len(fatal) == 1 and message in fatal[0], output[-3000:]
  assert "Traceback" not in output and "--helpshort or --helpfull" not in output, output[-3000:]
  assert "\nflags:\n" not in output, output[-3000:]
