"""XLA:CPU settings that every launch applies before JAX starts its backends.

A workaround for one backend, kept out of the decoding code: on a CPU whose few-row matmuls are
compute-bound, XLA:CPU's YNNPACK dots make a target's verify call over gamma + 1 tokens cost
several single-token steps, where its Eigen dots stay near the memory-bound cost that
speculative decoding relies on (measured in BUILD_NOTES.md, "Issue 20, eighth pass").
"""

from __future__ import annotations

import os
from typing import MutableMapping

YNN_FUSION_FLAG = "--xla_cpu_experimental_ynn_fusion_type"


def prefer_eigen_dots(environ: MutableMapping[str, str] = os.environ) -> bool:
  """Turns XLA:CPU's YNNPACK fusions off in `environ["XLA_FLAGS"]`, unless it already sets that
  flag (to keep YNNPACK, set `--xla_cpu_experimental_ynn_fusion_type` there yourself).

  XLA reads XLA_FLAGS once, when JAX first starts a backend: call this before any JAX work. The
  flag touches only CPU compilation; GPU and TPU programs are compiled as before.

  Returns:
    Whether the flag was added.
  """
  flags = environ.get("XLA_FLAGS", "")
  if YNN_FUSION_FLAG in flags:
    return False
  environ["XLA_FLAGS"] = f"{flags} {YNN_FUSION_FLAG}=".strip()
  return True
