"""What an "if" inside a compiled loop costs on this backend: lax.cond, lax.switch, nesting, and
a while_loop that runs zero times or once (the while-as-if the decoding loop can use instead).

  python benchmarks/conditional_copies.py [--kilobytes=400] [--iterations=1000]

Each variant updates 8 floats of a carried buffer per iteration of a fori_loop; the printed time
per iteration shows whether the construct copies the whole buffer each iteration (a time that
grows with --kilobytes) or updates it in place.
"""

from __future__ import annotations

import functools
import time

import common  # first: the hubs' offline defaults come before any Hugging Face import

# isort: split

import jax
import jax.numpy as jnp
from absl import flags

from jax_specsel import experiment

FLAGS = flags.FLAGS
flags.DEFINE_integer("kilobytes", 400, "Size of the carried buffer.")
flags.DEFINE_integer("iterations", 1000, "Loop iterations per timed run.")


def _when(predicate, body, operand):
  """`body(operand)` if `predicate`, else `operand`, as a while_loop of zero or one iterations."""
  return jax.lax.while_loop(
      lambda c: c[0], lambda c: (jnp.zeros((), bool), body(c[1])), (jnp.asarray(predicate), operand)
  )[1]


@functools.partial(jax.jit, static_argnums=(0, 1))
def _loop(kind: str, iterations: int, buffer, flag):
  """`iterations` updates of `buffer`, each behind the conditional construct `kind`."""
  size = buffer.shape[0]

  def body(i, buffer):
    def update(b):
      return jax.lax.dynamic_update_slice(b, jnp.ones((8,)) * i, (i * 8 % (size - 8),))

    if kind == "plain":
      return update(buffer)
    if kind == "cond":
      return jax.lax.cond(flag > 0, update, lambda b: b, buffer)
    if kind.startswith("switch"):
      return jax.lax.switch(flag % int(kind[6:]), [update] * int(kind[6:]), buffer)
    if kind == "nested cond":
      return jax.lax.cond(
          flag > 0, update, lambda b: jax.lax.cond(flag > 1, update, lambda c: c, b), buffer
      )
    if kind == "nested while-as-if":
      return _when(flag > 0, lambda b: _when(flag > 0, update, b), buffer)
    raise ValueError(kind)

  return jax.lax.fori_loop(0, iterations, body, buffer)


def main(argv):
  del argv
  common.checked(experiment.integer_flags, "kilobytes", "iterations")  # before any compile
  buffer = jnp.zeros((FLAGS.kilobytes * 256,), jnp.float32)
  flag = jnp.int32(1)
  print(f"| construct ({FLAGS.kilobytes} KB carried) | us per iteration |\n|---|---|")
  for kind in (
      "plain",
      "cond",
      "switch2",
      "switch3",
      "switch6",
      "nested cond",
      "nested while-as-if",
  ):
    _loop(kind, FLAGS.iterations, buffer, flag).block_until_ready()  # compiles, untimed
    best = float("inf")
    for _ in range(5):
      started = time.perf_counter()
      _loop(kind, FLAGS.iterations, buffer, flag).block_until_ready()
      best = min(best, time.perf_counter() - started)
    print(f"| {kind} | {1e6 * best / FLAGS.iterations:.2f} |")


if __name__ == "__main__":
  common.run(main)
