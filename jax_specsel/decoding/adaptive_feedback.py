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
  """Step 5 of a round: the verification scores the chosen drafter (on the positions from
  `scored_from`, the rows' num_generated before the round); the rows whose probe is due read the
  drafters that sat out where the chosen option does poorly (`probe`); then the Hedge step and
  the probe schedule. A round that learned nothing (autoregressive, no probe) skips the step.

  Each conditional carries only the buffers it changes."""
  drafted = jnp.any(active & (verified.choice > 0))
  records = when(
      drafted,
      lambda records: adaptive_drafters.score_drafted(
          records,
          spec.rule,
          scored_from,
          verified.choice,
          verified.gamma,
          verified.num_accepted,
          verified.drafts,
          verified.draft_logprobs,
          verified.target_logprobs,
          active,
      ),
      tuple(d.record for d in state.drafters),
  )
  state = state.replace(
      drafters=tuple(d.replace(record=r) for d, r in zip(state.drafters, records))
  )
  state, probed = probe(
      spec, drafters, costs, state, verified.choice, active, turn_offset, first_rejected(verified)
  )
  log_weights, gammas = when(
      jnp.any(probed) | drafted,
      lambda carry: hedge_step(spec, state, costs, active, *carry),
      (state.log_weights, state.gammas),
  )
  state = state.replace(log_weights=log_weights, gammas=gammas)
  return probe_schedule(spec, state, probed, verified.choice)


def first_probe_round(spec: AdaptiveSpec) -> int:
  """The round count at which the first probe is due (past the last round: never)."""
  rule = spec.rule
  return rule.first_probe or rule.probe_every or spec.max_rounds + 1


def probe_schedule(spec: AdaptiveSpec, state: AdaptiveState, probed, choice) -> AdaptiveState:
  """After a probe on a row, its next is due `adaptive_rule.next_probe_gap` rounds later: soon if
  the probe changed the row's choice (the argmax), ever later while probes change nothing."""
  changed = adaptive_rule.choose_argmax(state.log_weights) != choice
  gap = adaptive_rule.next_probe_gap(state.probe_gap, changed, spec.rule, spec.max_rounds)
  return state.replace(
      probes=state.probes + probed.astype(jnp.int32),
      probe_gap=jnp.where(probed, gap, state.probe_gap),
      probe_at=jnp.where(probed, state.base.target_calls + gap, state.probe_at),
  )


def current_values(spec, state, costs):
  """(values [B, K + 1], best gammas [B, K + 1]) of every option at the current estimates; a
  drafter not yet scored on the row is worth 0 there (see `adaptive_rule`)."""
  step_costs, _, verify_costs = split_costs(spec, costs)
  records = [d.record for d in state.drafters]
  alpha = adaptive_rule.acceptance(
      jnp.stack([r.score_sum for r in records], axis=1),
      jnp.stack([r.score_count for r in records], axis=1),
      spec.rule,
  )
  values, gammas = adaptive_rule.option_values(alpha, step_costs, verify_costs)
  scored = jnp.stack([r.total_count > 0 for r in records], axis=1)
  return values.at[:, 1:].set(jnp.where(scored, values[:, 1:], 0.0)), gammas


def hedge_step(spec, state, costs, active, log_weights, gammas):
  """(log_weights, gammas) after the Hedge step: every option's value from the current estimates
  is added to its log-weight (on the active rows), and each drafter's best gamma is kept for the
  next choice."""
  values, best = current_values(spec, state, costs)
  return (
      adaptive_rule.hedge_step(log_weights, values, active, spec.rule),
      jnp.where(active[:, None], best, gammas),
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


def catch_up(spec, k, drafters: DrafterInputs, costs, history, rows, drafter, cost, narrowest=0):
  """Drafter k, after its first pass, reads what its cache lacks up to `pending` for `rows` (none:
  nothing runs), at the narrowest of `spec.read_widths[narrowest:]` that covers the longest gap
  of those rows: (drafter, cost, its logits at `pending`)."""
  drafter = adaptive_drafters.prepared(
      spec.drafters[k], drafters.params[k], drafters.ids, drafters.mask, drafter, jnp.any(rows)
  )
  gap = history.num_generated - adaptive_drafters.read_start(drafter.record, history.num_generated)
  widths = spec.read_widths[narrowest:]
  # A width w covers a gap g when the block [start, start + w) reaches `pending` (g < w).
  narrower = sum((gap >= width).astype(jnp.int32) for width in widths if width is not None)
  kind = jnp.max(jnp.where(rows, narrower, -1))
  first = jnp.zeros((rows.shape[0], spec.base.target_vocab), jnp.float32)
  for index, width in enumerate(widths):
    drafter, cost, first = when(
        kind == index,
        lambda carry, width=width: read(
            spec, k, drafters, costs, history, carry[0], carry[1], rows, width
        ),
        (drafter, cost, first),
    )
  return drafter, cost, first


def first_rejected(verified: Verified) -> jax.Array:
  """bool [B]: the row's drafter drafted this round and its first draft was rejected."""
  return (verified.choice > 0) & (verified.gamma > 0) & (verified.num_accepted == 0)


def poor_choice(spec, state: AdaptiveState, costs, choice) -> jax.Array:
  """bool [B]: whether the option each row chose is worth less than `probe_below` of the ideal
  option at the current estimates (where a probe may find a better one)."""
  step_costs, _, verify_costs = split_costs(spec, costs)
  values, _ = current_values(spec, state, costs)
  chosen = jnp.take_along_axis(values, choice[:, None], axis=1)[:, 0]
  poor = chosen < spec.rule.probe_below * adaptive_rule.ideal_value(step_costs, verify_costs)
  return poor | (spec.rule.probe_below >= 1)


def probe(spec, drafters: DrafterInputs, costs, state, choice, active, turn_offset, missed):
  """(state, probed bool [B]): on the rows whose probe is due (`probe_at`, or at once where the
  chosen drafter's first draft was rejected, `missed` [B], with `RuleSettings.probe_on_miss`) and
  whose chosen option is worth less than `probe_below` of the ideal option, each drafter not yet
  scored, each the Hedge weights track (weight >= track_threshold), and one more in turn (from a
  random drafter per row, `turn_offset`: over queries every drafter is seen) reads what it missed
  and is scored on it (the drafter that drafted is current)."""
  rounds_done = state.base.target_calls  # counts this round already
  due = (rounds_done >= state.probe_at) | (missed & spec.rule.probe_on_miss)
  probed = active & ~state.base.done & due & poor_choice(spec, state, costs, choice)
  turn = (state.probes + turn_offset) % spec.num_drafters
  weights = jax.nn.softmax(state.log_weights, axis=1)
  history = history_of(state)

  def reads(carry):
    states, cost = list(carry[0]), carry[1]
    for k in range(spec.num_drafters):
      unscored = states[k].record.total_count == 0
      tracked = weights[:, k + 1] >= spec.rule.track_threshold
      rows = probed & (choice != k + 1) & (unscored | tracked | (turn == k))
      states[k], cost, _ = catch_up(
          spec, k, drafters, costs, history, rows, states[k], cost, narrowest=1
      )
    return tuple(states), cost

  states, cost = when(jnp.any(probed), reads, (state.drafters, state.cost))
  return state.replace(drafters=states, cost=cost), probed
