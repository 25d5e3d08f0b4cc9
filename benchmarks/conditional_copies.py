"""What an "if" inside a compiled loop costs on this backend: lax.cond, lax.switch, nesting, and
the while_loop that runs zero times or once (`decoding.adaptive_loop._when`).

  python launch/conditional_copies.py [--kilobytes=400] [--iterations=1000]

Each variant updates 8 floats of a carried buffer per iteration of a fori_loop; the printed time
per iteration shows whether the construct copies the buffer (tens of microseconds for 400 KB on a
CPU) or updates it in place (well under a microsecond). Measured on the 2-core CPU (BUILD_NOTES,
"Choosing per round"): lax.cond 0.1 us, lax.switch with 2 branches 1 us, with 3 or 6 branches
~43 us, two nested lax.conds ~45 us, nested while-as-if 0.04 us.
"""

from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp
from absl import app, flags

from jax_specsel import experiment

FLAGS = flags.FLAGS
flags.DEFINE_integer("kilobytes", 400, "Size of the carried buffer.")
flags.DEFINE_integer("iterations", 1000, "Loop iterations per timed run.")


def _when(predicate, body, operand):
  return jax.lax.while_loop(lambda c: c[0], lambda c: (jnp.zeros((), bool), body(c[1])),
                            (jnp.asarray(predicate), operand))[1]


@functools.partial(jax.jit, static_argnums=(0, 1))
def _loop(kind: str, iterations: int, buffer, flag):
  size = buffer.shape[0]

  def body(i, buffer):
    update = lambda b: jax.lax.dynamic_update_slice(b, jnp.ones((8,)) * i, (i * 8 % (size - 8),))
    if kind == "plain":
      return update(buffer)
    if kind == "cond":
      return jax.lax.cond(flag > 0, update, lambda b: b, buffer)
    if kind.startswith("switch"):
      return jax.lax.switch(flag % int(kind[6:]), [update] * int(kind[6:]), buffer)
    if kind == "nested cond":
      return jax.lax.cond(flag > 0, update,
                          lambda b: jax.lax.cond(flag > 1, update, lambda c: c, b), buffer)
    if kind == "nested while-as-if":
      return _when(flag > 0, lambda b: _when(flag > 0, update, b), buffer)
    raise ValueError(kind)

  return jax.lax.fori_loop(0, iterations, body, buffer)


def main(argv):
  del argv
  with experiment.usage_errors():  # one line, before anything is compiled
    experiment.integer_flags("kilobytes", "iterations")
  buffer = jnp.zeros((FLAGS.kilobytes * 256,), jnp.float32)
  flag = jnp.int32(1)
  print(f"| construct ({FLAGS.kilobytes} KB carried) | us per iteration |\n|---|---|")
  for kind in ("plain", "cond", "switch2", "switch3", "switch6", "nested cond",
               "nested while-as-if"):
    run = lambda: _loop(kind, FLAGS.iterations, buffer, flag).block_until_ready()
    run()
    best = float("inf")
    for _ in range(5):
      started = time.perf_counter()
      run()
      best = min(best, time.perf_counter() - started)
    print(f"| {kind} | {1e6 * best / FLAGS.iterations:.2f} |")


if __name__ == "__main__":
  app.run(main, flags_parser=experiment.parse_flags)
