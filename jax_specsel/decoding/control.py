"""`when`: the "if" of the adaptive loop's rounds, a plain `lax.cond` with an identity branch.

XLA:CPU copies the buffers a conditional with three or more branches (or a nested one) updates;
a while_loop run zero times or once avoided that, but measured at the demo's sizes it no longer
paid, so the round's conditionals are plain `lax.cond`s, as on GPU and TPU.
"""

from __future__ import annotations

import jax


def when(predicate, body, operand):
  """`body(operand)` where the scalar `predicate` holds, else `operand` (body keeps its shapes)."""
  return jax.lax.cond(predicate, body, lambda unchanged: unchanged, operand)
