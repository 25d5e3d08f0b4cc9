"""Speed measurement: ms/token of generation options, model step times, and the analytic ideal.

Every timer of a model's own work (`time_decode_step`, `time_rounds`, `time_prepare`) runs the
work many times inside one compiled loop (what the decoding loop pays, no dispatch per call) and
reports the best run per call; `spread` is the one definition of "± spread" in every table.

Everything here is measured side by side in one process (the machines are shared and noisy, so
ratios from one run mean more than absolute numbers from different runs).
"""

from __future__ import annotations

import functools
import statistics
import time
from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jax_specsel.decoding import adaptive, loop
from jax_specsel.decoding.generate import generate, loop_spec
from jax_specsel.models.interface import Decoder, Model


def expected_tokens_per_round(acceptance: float, gamma: int) -> float:
  """Leviathan Thm 3.8: (1 - a^(g+1)) / (1 - a), the bonus token included."""
  if acceptance >= 1.0:
    return gamma + 1.0
  return (1.0 - acceptance ** (gamma + 1)) / (1.0 - acceptance)


def solve_acceptance(tokens_per_round: float, gamma: int) -> float:
  """The per-token acceptance a whose expected tokens per round equals the measured tau."""
  tau = min(max(tokens_per_round, 1.0), gamma + 1.0)
  low, high = 0.0, 1.0
  for _ in range(60):  # bisection: expected_tokens_per_round is increasing in a
    mid = 0.5 * (low + high)
    low, high = (mid, high) if expected_tokens_per_round(mid, gamma) < tau else (low, mid)
  return 0.5 * (low + high)


def leviathan_speedup(acceptance: float, gamma: int, cost_ratio: float) -> float:
  """Wall-time improvement (1 - a^(g+1)) / ((1 - a)(g c + 1)) of Leviathan et al. 2023."""
  return expected_tokens_per_round(acceptance, gamma) / (gamma * cost_ratio + 1.0)


def spread(values: Sequence[float]) -> float:
  """The spread of repeated measurements, reported as "value ± spread" in every table: their
  population standard deviation (`statistics.pstdev`), 0.0 for fewer than two values."""
  return statistics.pstdev(values) if len(values) > 1 else 0.0


def _best_seconds_per_call(run, calls: int, repeats: int) -> float:
  """Runs `run` once to compile, then `repeats` timed runs of `calls` calls each: the best run's
  seconds divided by `calls` (the machines are shared: interference only ever adds time)."""
  run()
  best = float("inf")
  for _ in range(repeats):
    started = time.perf_counter()
    run()
    best = min(best, time.perf_counter() - started)
  return best / calls


@functools.partial(jax.jit, static_argnums=(0, 1))
def _repeat_decode(decoder: Decoder, steps: int, params, tokens, position, cache, context):
  def body(index, carry):
    block, cache = carry
    logits, cache = decoder.decode(params, block, position + index, cache, context)
    return jnp.argmax(logits, axis=-1).astype(jnp.int32), cache  # fed back: nothing is hoisted

  return jax.lax.fori_loop(0, steps, body, (tokens, cache))[0]


def time_decode_step(
    model: Model,
    prompt_ids: np.ndarray,
    block: int = 1,
    position: int | None = None,
    cache_length: int = 256,
    steps: int = 32,
    repeats: int = 5,
) -> float:
  """Seconds of one `decode` call of `block` tokens as the decoding loop makes it.

  The calls run inside one compiled loop of `steps` calls: no host dispatch per call, the cache
  carried from call to call, each call's argmax tokens fed to the next. Call i writes its block at
  `position + i`, one token further per call, as autoregressive steps and rounds that accept no
  draft advance (with a fixed-length cache, a call's cost does not depend on its position).

  Args:
    model: target or drafter.
    prompt_ids: int [B, S] prompts, prepared once outside the timing (T5 encodes them, a
      decoder-only model prefills them).
    block: tokens per call: 1 for a drafter or autoregressive step, gamma + 1 to verify.
    position: absolute position of the first call's block (default S, right after the prompt).
    cache_length: K/V buffer length, as the loop would allocate it.
    steps: calls per timed run.
    repeats: timed runs after one that compiles.

  Returns:
    Seconds per call: the best run divided by `steps`.
  """
  decoder, params = model.decoder, model.params
  ids = jnp.asarray(prompt_ids, jnp.int32)
  batch = ids.shape[0]
  cache = decoder.init_cache(params, batch, cache_length)
  context, cache = jax.jit(decoder.prepare)(params, ids, jnp.ones_like(ids), cache)
  tokens = jnp.full((batch, block), 3, jnp.int32)
  start = jnp.full((batch,), ids.shape[1] if position is None else position, jnp.int32)
  run = lambda: jax.block_until_ready(
      _repeat_decode(decoder, steps, params, tokens, start, cache, context)
  )
  return _best_seconds_per_call(run, steps, repeats)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _repeat_rounds(spec, count, target_params, drafter_params, ids, mask):
  return loop.repeat_rounds(
      spec, count, target_params, drafter_params, ids, mask, jax.random.PRNGKey(0)
  ).tokens


def time_rounds(
    target: Model,
    prompt_ids: np.ndarray,
    drafter: Model | None = None,
    gamma: int = 0,
    rounds: int = 200,
    repeats: int = 5,
) -> float:
  """Seconds of one decoding round inside a compiled loop: no dispatch, weights and caches warm.

  The denominator generate() cannot give: its time includes the per-call costs (dispatch, the
  prompt's encoding, cold caches) that a short output does not amortize. A round is one target
  step without a drafter (gamma 0), else the drafter's gamma steps plus one verify call over
  gamma + 1 tokens. Returns the best of `repeats` runs of `rounds` rounds, divided by `rounds`.
  """
  spec = loop_spec(target, drafter, max(gamma, 1), max_new_tokens=64)
  ids = jnp.asarray(prompt_ids, jnp.int32)
  args = (target.params, None if drafter is None else drafter.params, ids, jnp.ones_like(ids))
  run = lambda: jax.block_until_ready(_repeat_rounds(spec, rounds, *args))
  return _best_seconds_per_call(run, rounds, repeats)


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _repeat_prepare(decoder: Decoder, count: int, cache_length: int, params, ids, mask):
  def body(index, checksum):
    # The first token changes with the index, so XLA cannot hoist the pass out of the loop.
    varied = ids.at[:, 0].set((ids[:, 0] + index) % 2)
    cache = decoder.init_cache(params, ids.shape[0], cache_length)
    context, cache = decoder.prepare(params, varied, mask, cache)
    leaves = jax.tree.leaves((context, cache))
    return checksum + sum(jnp.sum(leaf[..., :1]).astype(jnp.float32) for leaf in leaves)

  return jax.lax.fori_loop(0, count, body, jnp.zeros((), jnp.float32))


def time_prepare(
    model: Model, prompt_ids: np.ndarray, cache_length: int = 64, count: int = 50, repeats: int = 5
) -> float:
  """Seconds of the model's first pass over a prompt (T5 encoder + cross-attention K/V, LLaMA
  prefill) with its cache allocation, inside a compiled loop: the prompt's share of a call's work.

  Returns the best of `repeats` runs of `count` passes, divided by `count`.
  """
  ids = jnp.asarray(prompt_ids, jnp.int32)
  args = (model.decoder, count, cache_length, model.params, ids, jnp.ones_like(ids))
  run = lambda: jax.block_until_ready(_repeat_prepare(*args))
  return _best_seconds_per_call(run, count, repeats)


def measure_generation(
    target: Model,
    prompts: list[list[int]],
    drafter: Model | None,
    gamma: int,
    max_new_tokens: int,
    repeats: int,
    temperature: float = 0.0,
) -> dict:
  """ms/token (median and `spread` over repeats) and acceptance statistics over prompts, batch 1.

  Each repeat decodes every prompt once; a repeat's ms/token is its total time over its total
  generated tokens. The first pass is a warm-up that compiles each prompt bucket.
  """
  compile_seconds = [0.0]

  def one_pass(seed):
    seconds = tokens = accepted = drafted = rounds = 0
    for prompt in prompts:
      out = generate(
          target,
          [prompt],
          drafter=drafter,
          gamma=gamma,
          temperature=temperature,
          max_new_tokens=max_new_tokens,
          seed=seed,
      )
      compile_seconds[0] += out.stats.compile_seconds
      seconds += out.stats.seconds
      tokens += out.stats.new_tokens
      accepted += int(out.stats.accepted.sum())
      drafted += int(out.stats.drafted.sum())
      rounds += int(out.stats.rounds.sum())
    return 1e3 * seconds / max(tokens, 1), accepted, drafted, rounds, tokens

  one_pass(0)
  runs = [one_pass(seed) for seed in range(repeats)]
  ms = [r[0] for r in runs]
  accepted, drafted, rounds, tokens = (sum(r[i] for r in runs) for i in range(1, 5))
  return {
      "ms_per_token": statistics.median(ms),
      "ms_per_token_spread": spread(ms),
      "acceptance_rate": accepted / drafted if drafted else float("nan"),
      "tokens_per_round": 1.0 + accepted / max(rounds, 1),  # tau: bonus/correction included
      "tokens": tokens // max(len(runs), 1),
      "compile_seconds": compile_seconds[0],
  }


def measure_adaptive_costs(
    target: Model,
    drafters: Mapping[str, Model],
    max_gamma: int,
    prompt_ids: np.ndarray,
    cache_length: int = 128,
) -> adaptive.Costs:
  """Times each drafter's step and catch-up read (`time_decode_step`) and the target's round at
  every gamma (`verify_costs`), all inside compiled loops, and returns them in target steps."""
  ids = np.asarray(prompt_ids, np.int32)
  time_step = lambda model, block: time_decode_step(
      model, ids, block=block, cache_length=cache_length
  )
  unit = time_step(target, 1)
  models = list(drafters.values())
  steps = [time_step(m, 1) / unit for m in models]
  return adaptive.Costs(
      step=tuple(steps),
      read=tuple(time_step(m, 2 * (max_gamma + 1)) / unit for m in models),
      verify=verify_costs(target, models[0], steps[0], ids, max_gamma),
  )


def verify_costs(
    target: Model, drafter: Model, drafter_step: float, ids, max_gamma: int, rounds: int = 40
) -> tuple[float, ...]:
  """v(0..G) in autoregressive rounds: a whole speculative round of gamma g (`time_rounds`: the
  drafter's g steps, the verify call, acceptance, the loop's bookkeeping) less its g draft steps.

  A bare verify call misses the round's own work, and so priced a drafter that is never accepted,
  at gamma 1, about as cheap as autoregressive decoding."""
  unit = time_rounds(target, ids, rounds=rounds, repeats=3)
  verify = [1.0] + [
      time_rounds(target, ids, drafter, g, rounds=rounds, repeats=3) / unit - g * drafter_step
      for g in range(1, max_gamma + 1)
  ]
  # A wider call never costs less: a noisy timing that says so would pick gammas for nothing.
  return tuple(np.maximum.accumulate(verify).tolist())


def regime(
    target: Model,
    drafters: Mapping[str, Model],
    prompt_ids: np.ndarray,
    gamma: int,
    rounds: int = 40,
) -> dict:
  """Whether speculation can pay here: step costs of every model and a gamma round's cost.

  Speculative decoding pays only where scoring gamma + 1 tokens costs about one target step (a
  memory-bound target). Each round is timed inside a compiled loop (`time_rounds`) with the
  first drafter; the result is stated in every report so a reader can check the regime. (As many
  rounds as `verify_costs` times: the same compiled loops serve both.)

  Returns:
    {"target_step_us", "drafter_step_us": {name: us}, "step_ratio": {name: target / drafter},
     "gamma", "round_drafter", "round_target_steps": a gamma round's cost in target steps with
     the first drafter (None without drafters)}.
  """
  ids = np.asarray(prompt_ids, np.int32)
  step = time_rounds(target, ids, rounds=rounds)
  drafter_steps = {name: time_rounds(model, ids, rounds=rounds) for name, model in drafters.items()}
  measured = {
      "target_step_us": 1e6 * step,
      "drafter_step_us": {name: 1e6 * s for name, s in drafter_steps.items()},
      "step_ratio": {name: step / s for name, s in drafter_steps.items()},
      "gamma": int(gamma),
      "round_drafter": None,
      "round_target_steps": None,
  }
  if drafters:
    name, first = next(iter(drafters.items()))
    measured["round_drafter"] = name
    measured["round_target_steps"] = time_rounds(target, ids, first, gamma, rounds=rounds) / step
  return measured
