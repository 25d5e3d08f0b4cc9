"""What an adaptive round learns: a drafter's read that scores it (`read`), the probes of the
drafters that sat out, the chosen drafter scored on its verification, and the Hedge step."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jax_specsel.decoding import adaptive_drafters, adaptive_rule
from jax_specsel.decoding.adaptive_state import (
    AdaptiveSpec,
    AdaptiveState,
    DrafterInputs,
    Verified,
    history_of,
    split_costs,
)
from jax_specsel.decoding.control import when


def feedback(
    spec: AdaptiveSpec,
    drafters: DrafterInputs,
    costs,
    turn_offset,
    state: AdaptiveState,
    scored_from,
    verified: Verified,
    active,
) -> AdaptiveState:
  """Step 5 of a round: probes score the drafters that sat out; the verification scores the chosen
  one (on the positions from `scored_from`, the rows' num_generated before the round); then the
  Hedge step. A round that learned nothing (autoregressive, no probe) skips it."""
  rounds_done = state.base.target_calls  # counts this round already
  every, first = spec.rule.probe_every, spec.rule.first_probe
  due = (rounds_done % every == 0) if every else jnp.asarray(False)
  if first:
    due = due | (rounds_done == first)
  if every or first:
    state = probe(spec, drafters, costs, state, verified.choice, active, due, turn_offset)
  learned = due | jnp.any(active & (verified.choice > 0))

  def learn(state):
    state = state.replace(
        drafters=adaptive_drafters.score_drafted(
            state.drafters,
            spec.rule,
            scored_from,
            verified.choice,
            verified.gamma,
            verified.num_accepted,
            verified.drafts,
            verified.draft_logprobs,
            verified.target_logprobs,
            active,
        )
    )
    return hedge_step(spec, state, costs, active)

  return when(learned, learn, state)


def hedge_step(spec, state, costs, active):
  """Every option's value from the current estimates is added to its Hedge log-weight (on the
  active rows), and each drafter's best gamma is kept for the next choice."""
  step_costs, _, verify_costs = split_costs(spec, costs)
  alpha = adaptive_rule.acceptance(
      jnp.stack([d.record.score_sum for d in state.drafters], axis=1),
      jnp.stack([d.record.score_count for d in state.drafters], axis=1),
      spec.rule,
  )
  values, gammas = adaptive_rule.option_values(alpha, step_costs, verify_costs)
  return state.replace(
      log_weights=adaptive_rule.hedge_step(state.log_weights, values, active, spec.rule),
      gammas=jnp.where(active[:, None], gammas, state.gammas),
  )


def read(spec, k, drafters: DrafterInputs, costs, history, drafter, cost, rows, width: int | None):
  """Drafter k reads `width` tokens from where it stopped (None: the whole history from 0), its
  cost charged to `rows` (a two-token read is part of a draft step): (drafter, cost, its logits
  at `pending`)."""
  from_origin = width is None
  width = spec.max_rounds + 1 if from_origin else width
  drafter, first = adaptive_drafters.read(
      spec.drafters[k],
      drafters.params[k],
      spec.base.settings,
      spec.base.target_vocab,
      spec.rule,
      history,
      drafter,
      width,
      from_origin,
  )
  if width != 2:
    _, read_costs, _ = split_costs(spec, costs)
    cost = cost + jnp.where(rows, read_costs[k] * width / spec.read_width, 0.0)
  return drafter, cost, first


def probe(spec, drafters: DrafterInputs, costs, state, choice, active, due, turn_offset):
  """On a probe round, each drafter the Hedge weights track (weight >= track_threshold), and one
  more in turn (from a random drafter per row, `turn_offset`: over queries every drafter is
  seen), reads what it missed and is scored on it (the drafter that drafted is current)."""
  every = max(spec.rule.probe_every, 1)
  weights = jax.nn.softmax(state.log_weights, axis=1)
  running = active & ~state.base.done
  turn = (state.base.target_calls // every + turn_offset) % spec.num_drafters
  history = history_of(state)

  def probe(carry):
    states, cost = list(carry[0]), carry[1]
    for k in range(spec.num_drafters):
      rows = (
          running
          & (choice != k + 1)
          & ((weights[:, k + 1] >= spec.rule.track_threshold) | (turn == k))
      )
      states[k] = adaptive_drafters.prepared(
          spec.drafters[k],
          drafters.params[k],
          drafters.ids,
          drafters.mask,
          states[k],
          jnp.any(rows),
      )
      start = adaptive_drafters.read_start(states[k].record, history.num_generated)
      far = jnp.any(rows & (history.num_generated - start >= spec.read_width))
      for wanted, width in ((~far, spec.read_width), (far, None)):
        states[k], cost = when(
            jnp.any(rows) & wanted,
            lambda c, width=width, k=k, rows=rows: read(
                spec, k, drafters, costs, history, c[0], c[1], rows, width
            )[:2],
            (states[k], cost),
        )
    return tuple(states), cost

  states, cost = when(due, probe, (state.drafters, state.cost))
  return state.replace(drafters=states, cost=cost)
