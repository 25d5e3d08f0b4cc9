"""`when`: the "if" of the adaptive loop's rounds, as one switchable helper.

XLA:CPU copies the buffers a conditional updates when it has three or more branches or holds
another conditional, while a while_loop updates its carry in place, nested or not. So by default
`when` is a while_loop that runs its body zero times or once; `AS_COND = True` makes it a plain
`lax.cond` (read when a program is traced: set it before the first call).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

AS_COND = False  # True: `when` is `lax.cond`; False: a while_loop run zero times or once


def when(predicate, body, operand):
  """`body(operand)` where the scalar `predicate` holds, else `operand` (body keeps its shapes)."""
  if AS_COND:
    return jax.lax.cond(predicate, body, lambda unchanged: unchanged, operand)
  return jax.lax.while_loop(
      lambda carry: carry[0],
      lambda carry: (jnp.zeros((), bool), body(carry[1])),
      (jnp.asarray(predicate), operand),
  )[1]
