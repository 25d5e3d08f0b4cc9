"""Compiled generation programs: compiled once per key, kept in a bounded cache, and run by the one
path every entry point shares (check -> pad -> compile -> run -> unpack).

Compilation is ahead of time (`jit(...).lower(...).compile()`), so `Stats.seconds` never includes
it, and every compilation is counted (`compilation_count()`) and logged: a benchmark can show that
the count does not grow with the number of queries once their buckets are warm.
"""

from __future__ import annotations

import collections
import logging
import time
from typing import Any, Callable, Hashable, NamedTuple, Sequence

import jax
import numpy as np

from jax_specsel import memory
from jax_specsel.decoding import request
from jax_specsel.models.interface import Model

log = logging.getLogger(__name__)

MAX_PROGRAMS = 256  # compiled programs kept; the least recently used one is dropped past this
MAX_POSITIONS = 2**31 - 1  # positions and lengths are int32 inside the loop


class LruCache:
  """A dict of at most `max_size` entries that drops the least recently used one past that."""

  def __init__(self, max_size: int):
    self.max_size = max_size
    self._entries: collections.OrderedDict = collections.OrderedDict()

  def __len__(self) -> int:
    return len(self._entries)

  def get(self, key, default=None):
    """The value stored under `key` (now the most recently used), or `default`."""
    try:
      self._entries.move_to_end(key)
    except KeyError:
      return default
    return self._entries[key]

  def put(self, key, value) -> list:
    """Stores `value` under `key`; returns the keys dropped to stay within `max_size`."""
    self._entries[key] = value
    self._entries.move_to_end(key)
    dropped = []
    while len(self._entries) > self.max_size:
      dropped.append(self._entries.popitem(last=False)[0])
    return dropped


_PROGRAMS = LruCache(MAX_PROGRAMS)
_COMPILE_SECONDS: list[float] = []


def compilation_count() -> int:
  """How many generation programs have been compiled in this process."""
  return len(_COMPILE_SECONDS)


def compiled_program(function, static: tuple, args: tuple, description: str, before_compile=None):
  """`function` compiled ahead of time for (static, batch, prompt bucket), cached and counted.

  The cache key is (function, static[0], batch, packed prompt width). It is sufficient because
  the spec, static[0], is a frozen description of everything that decides the program (the
  decoders' graph definitions, which fix the weights' treedefs, dtypes and placement, and the
  settings), every other argument's shape follows from the spec, and the packed prompts' shape
  is (batch, width). The cache keeps `MAX_PROGRAMS` programs; a dropped one compiles again (and
  counts again) when it is next needed.

  Args:
    function: a pure function of (*static, *args); args[-1] is the packed prompt array.
    static: hashable compile-time arguments (specs, treedefs); static[0] is the spec.
    args: the array arguments (flat weight lists and the packed prompts).
    description: what the log line says about the program.
    before_compile: called only when the program must be compiled (a check whose answer a
      compiled program already gave: e.g. `check_caches_fit`).

  Returns:
    (compiled callable, compile seconds: 0.0 when it was cached).
  """
  batch, width = args[-1].shape
  key = (function, static[0], batch, width)
  compiled = _PROGRAMS.get(key)
  if compiled is not None:
    return compiled, 0.0
  if before_compile is not None:
    before_compile()
  started = time.perf_counter()
  compiled = (
      jax.jit(function, static_argnums=tuple(range(len(static)))).lower(*static, *args).compile()
  )
  seconds = time.perf_counter() - started
  _COMPILE_SECONDS.append(seconds)
  log.info(
      "compiled generation #%d (batch %d, packed prompt width %d, %s) in %.2fs",
      len(_COMPILE_SECONDS),
      batch,
      width,
      description,
      seconds,
  )
  if _PROGRAMS.put(key, compiled):
    log.info("dropped the least recently used compiled program (more than %d kept)", MAX_PROGRAMS)
  return compiled, seconds


class Program(NamedTuple):
  """What one entry point's program adds to the shared path.

  Attributes:
    function: pure (spec, trees, *weights, packed prompts) -> the result fetched to the host.
    spec: the frozen static description of the generation (the compile key's core).
    trees: the weights' static treedefs.
    weights: the array arguments before the packed prompts (flat weight lists, costs).
    cache_length: prompt bucket -> positions of the caches the program allocates.
    description: what the compile log line says about the program.
  """

  function: Callable
  spec: Hashable
  trees: Any
  weights: tuple
  cache_length: Callable[[int], int]
  description: str


class Prompts(NamedTuple):
  """A call's prompts as given, with its seed and the run-time flags packed next to them."""

  ids: Any
  attention_mask: Any
  seed: Any
  flags: tuple[int, ...] = ()


def run(
    target: Model,
    prompts: Prompts,
    drafters: Sequence[Model | None],
    max_new_tokens: int,
    build: Callable[[], Program],
    unpack: Callable[[Any, Any, float, float], Any],
    started: float,
    together: bool = True,
):
  """Pads and checks the prompts, compiles (once per key), runs and unpacks one generation.

  Every entry point checks its settings, models and drafters first, then calls this.

  Args:
    target: the checked target. prompts: the call's prompts, seed and flags.
    drafters: the checked drafters the program holds (None entries: autoregressive).
    max_new_tokens: the checked setting.
    build: the program for these drafters; called after the prompt checks, so no weight is
      stacked or flattened for a call that is refused.
    unpack: (spec, fetched result, seconds, compile seconds) -> the entry point's output.
    started: `time.perf_counter()` at the entry point's start (its host work counts as time).
    together: as for `check_caches_fit`.

  Returns:
    What `unpack` returns.
  """
  ids, mask = request.pad_prompts(prompts.ids, prompts.attention_mask, target)
  request.warn_past_position_limit(target, drafters, mask, max_new_tokens)
  packed_prompts = request.place_prompts(target, ids, mask, prompts.seed, prompts.flags)
  program = build()
  args = (*program.weights, packed_prompts)
  fits = lambda: check_caches_fit(
      target, drafters, ids.shape[0], program.cache_length(ids.shape[1]), max_new_tokens, together
  )
  compiled, compile_seconds = compiled_program(
      program.function,
      (program.spec, program.trees),
      args,
      program.description,
      before_compile=fits,
  )
  result = _fetched(compiled(*args))
  seconds = time.perf_counter() - started - compile_seconds
  return unpack(program.spec, result, seconds, compile_seconds)


def _fetched(result):
  """The program's result on the host: `np.asarray` for one array (cheaper per call than
  `jax.device_get`, which a pytree of arrays takes)."""
  return np.asarray(result) if isinstance(result, jax.Array) else jax.device_get(result)


def check_caches_fit(
    target: Model,
    drafters,
    batch: int,
    cache_length: int,
    max_new_tokens: int,
    together: bool = True,
) -> None:
  """Refuses, before compiling, caches that cannot fit: the program would die allocating them.

  Args:
    target: the target (its cache is always held).
    drafters: the drafters whose caches the program holds (None entries: autoregressive).
    batch, cache_length: the caches' rows and positions (`LoopSpec.cache_length`).
    max_new_tokens: the setting named in the message.
    together: True when every drafter's cache is held at once (adaptive); False when only one
      runs at a time (a selected option): the largest then counts.

  Raises:
    ValueError: naming max_new_tokens, the caches' bytes, the memory that bounds them and the fix.
  """
  if cache_length > MAX_POSITIONS:
    raise ValueError(
        f"max_new_tokens={max_new_tokens}: the caches would need {cache_length} "
        f"positions, beyond the loop's int32 positions ({MAX_POSITIONS}); lower "
        "max_new_tokens."
    )
  free = memory.free_bytes(target.mesh)
  if free is None:
    return
  drafter_bytes = [
      memory.cache_bytes_per_device(d, batch, cache_length) for d in drafters if d is not None
  ]
  needed = memory.cache_bytes_per_device(target, batch, cache_length) + (
      sum(drafter_bytes) if together else max(drafter_bytes, default=0)
  )
  available, source = free
  if needed <= available:
    return
  per_position = needed / cache_length
  fitting = max(int(available / per_position) - (cache_length - max_new_tokens), 0)
  raise ValueError(
      f"max_new_tokens={max_new_tokens} needs K/V caches of {_size(needed)} per device "
      f"({cache_length} positions x batch {batch}, target {target.name}"
      + (f" and {len(drafter_bytes)} drafter(s)" if drafter_bytes else "")
      + f") but there is {_size(available)} ({source}): lower max_new_tokens (about {fitting} "
      "fit at this batch and prompt length), the batch, or the dtype, or shard the target on a "
      "mesh."
  )


def _size(count: float) -> str:
  """Bytes in the largest binary unit that keeps the number >= 1 (KiB at least)."""
  for unit, scale in (("TiB", 1024**4), ("GiB", 1024**3), ("MiB", 1024**2)):
    if count >= scale:
      return f"{count / scale:.2f} {unit}"
  return f"{count / 1024:.2f} KiB"
