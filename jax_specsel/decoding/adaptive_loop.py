"""The program of `generate_adaptive`: a while_loop whose rounds choose their option and gamma.

See `adaptive.py` for what it computes and why it stays exact; `adaptive_rule.py` for the rule,
`adaptive_drafters.py` for what is kept per drafter and the reads that score it, `adaptive_state.py`
for the loop's types and `adaptive_feedback.py` for step 5. A round, per row:
  1. choose the option (0: autoregressive, k >= 1: drafter k - 1) and gamma from the Hedge
     weights and acceptance estimates (the past only; the draw's uniforms are made up front);
  2. the chosen drafter reads what its cache lacks up to `pending` (usually the two tokens
     [previous, pending], as `loop.draft` does; after rounds it sat out, the tokens it missed,
     or the whole history) and proposes gamma tokens (`loop.propose`);
  3. the target verifies [pending, drafts] in one call as wide as the batch's largest gamma;
  4. accept exactly (`loop.accept`, num_drafted = the row's gamma) and `loop.advance`;
  5. the chosen drafter is scored on the positions it drafted (the verification itself: bandit
     feedback); on a row whose probe is due (by its schedule, or at once where the chosen
     drafter's first draft was rejected) and whose chosen option does poorly, every drafter
     not yet scored, each the Hedge weights still track, and one more in turn, reads the tokens
     it missed and is scored on all of them (full information, lazily); the Hedge log-weights
     then add every option's current value, and the next probe is scheduled (sooner if this one
     changed the choice).

Each read scores a drafter on every position it had not been scored on, so a drafter that sat
out many rounds is judged on everything it missed when it comes back. Rounds that choose
autoregressive and learn nothing (no probe due) run back to back (`_autoregressive_rounds`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jax_specsel.decoding import adaptive_feedback, adaptive_rule, loop, loop_state
from jax_specsel.decoding.adaptive_drafters import DrafterRecord, DrafterState
from jax_specsel.decoding.adaptive_state import (
    AdaptiveSpec,
    AdaptiveState,
    AdaptiveSummary,
    DrafterInputs,
    Draws,
    Verified,
    history_of,
    split_costs,
    verify_widths,
)
from jax_specsel.decoding.control import when
from jax_specsel.models.attention import write_at_positions

_CHOICE_STREAM = 0xADA97  # folded into the seed's key for the per-round choices
_TURN_STREAM = 0xADA98  # and for which drafter each row's probes read first in turn


def run(
    spec: AdaptiveSpec, target_params, drafter_params: tuple, policy_params, costs, ids, mask, key
) -> AdaptiveSummary:
  """The whole adaptive generation (jit with `spec` static).

  Args:
    drafter_params: K nnx.States; policy_params: the policy program's inputs (None without one).
    costs: float32 [2K + G + 1] `Costs.as_array()`: step [K], read [K], verify [G + 1].
    ids, mask: int32 [B, S] right-padded prompts; key: the decode key.
  """
  base = spec.base
  context, target_cache = loop.prepare_target(
      base, target_params, ids, mask, base.cache_length(ids.shape[1])
  )
  embeddings = base.target.embed(target_params, context).astype(jnp.float32)  # [B, D]
  prior = _prior(spec, policy_params, embeddings)
  state = _initial(spec, drafter_params, target_cache, ids, mask, key, prior)
  drafters = DrafterInputs(params=tuple(drafter_params), ids=ids, mask=mask)
  # The choices' uniforms and the probes' turns, drawn up front from streams of their own:
  # independent of every draft.
  draws = Draws(
      uniforms=jax.random.uniform(
          jax.random.fold_in(key, _CHOICE_STREAM), (spec.max_rounds + 1, ids.shape[0])
      ),
      turn_offset=jax.random.randint(
          jax.random.fold_in(key, _TURN_STREAM), (ids.shape[0],), 0, spec.num_drafters
      ),
  )

  def body(state):
    state = _round(spec, target_params, drafters, context, costs, draws, state)
    return _autoregressive_rounds(spec, target_params, context, costs, state)

  state = jax.lax.while_loop(lambda s: ~jnp.all(s.base.done), body, state)
  return summarize(spec, state, costs, prior, embeddings)


def _prior(spec: AdaptiveSpec, policy_params, embeddings) -> jax.Array:
  """float32 [B, K + 1]: the policy's probability of each option (0 where it names none)."""
  batch, options = embeddings.shape[0], spec.num_drafters + 1
  if spec.policy is None:
    return jnp.full((batch, options), 1.0 / options, jnp.float32)
  program, index = spec.policy
  probabilities = jax.nn.softmax(program.logits(policy_params, embeddings), axis=-1)
  columns = [probabilities[:, i] if i >= 0 else jnp.zeros((batch,)) for i in index]
  return jnp.stack(columns, axis=1).astype(jnp.float32)


def _initial(spec, drafter_params, target_cache, ids, mask, key, prior):
  """The AdaptiveState before the first round; no drafter has run its first pass yet."""
  base_state, _ = loop.start(spec.base, None, target_cache, ids, mask, key)
  batch, num = ids.shape[0], spec.num_drafters
  drafters = []
  for decoder, params in zip(spec.drafters, drafter_params):
    cache = decoder.init_cache(params, batch, spec.base.cache_length(ids.shape[1]))
    shapes = jax.eval_shape(decoder.prepare, params, ids, mask, cache)[0]
    drafters.append(
        DrafterState(
            cache=cache,
            context=jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), shapes),
            prepared=jnp.zeros((), bool),
            record=DrafterRecord.zeros(batch),
        )
    )
  # The first round drafts at max_gamma, as the per-query policy does.
  gammas = jnp.full((batch, num + 1), spec.max_gamma, jnp.int32).at[:, 0].set(0)
  rounds = jnp.full((batch, spec.max_rounds), -1, jnp.int32)
  return AdaptiveState(
      base=base_state,
      drafters=tuple(drafters),
      origin_token=base_state.pending,
      origin_position=base_state.position,
      emitted_logp=jnp.zeros(base_state.tokens.shape, jnp.float32),
      log_weights=adaptive_rule.initial_log_weights(prior, spec.rule),
      gammas=gammas,
      round_options=rounds,
      round_gammas=rounds,
      drafted_by=jnp.zeros((batch, num + 1), jnp.int32),
      accepted_by=jnp.zeros((batch, num + 1), jnp.int32),
      cost=jnp.zeros((batch,), jnp.float32),
      probe_at=jnp.full((batch,), adaptive_feedback.first_probe_round(spec), jnp.int32),
      probe_gap=jnp.full((batch,), spec.rule.probe_every, jnp.int32),
      probes=jnp.zeros((batch,), jnp.int32),
  )


def _round(spec, target_params, drafters, context, costs, draws: Draws, state):
  base, settings = state.base, spec.base.settings
  step_costs, _, verify_costs = split_costs(spec, costs)
  active = ~base.done
  key, draft_key, accept_key = loop.round_keys(settings, base.key)
  # 1. the choice, from the past only
  uniform = draws.uniforms[jnp.minimum(base.target_calls, spec.max_rounds)]
  choice = adaptive_rule.choose(state.log_weights, uniform, spec.rule)
  gamma = jnp.where(active, jnp.take_along_axis(state.gammas, choice[:, None], axis=1)[:, 0], 0)
  # 2. reads and drafts
  state, drafts, draft_logprobs = _drafts(
      spec, drafters, costs, state, choice, gamma, active, draft_key
  )
  # 3-4. verify, accept, emit
  logits, target_cache = _verify(spec, target_params, context, base, drafts, jnp.max(gamma))
  num_accepted, next_token, target_logprobs = loop.accept(
      settings, drafts, draft_logprobs, logits, accept_key, gamma
  )
  after = loop.advance(spec.base, base, drafts, num_accepted, next_token, target_cache, None, key)
  verified = Verified(
      choice, gamma, drafts, draft_logprobs, num_accepted, next_token, target_logprobs
  )
  state = _record(spec, state, after, verified, step_costs, verify_costs)
  # 5. feedback: probes, the chosen drafter scored on its verification, the Hedge step
  return adaptive_feedback.feedback(
      spec, drafters, costs, draws.turn_offset, state, base.num_generated, verified, active
  )


def _autoregressive_rounds(spec, target_params, context, costs, state):
  """The rounds `_round` would run next while every active row chooses autoregressive and no
  row's probe falls due, run back to back without the drafters' and the feedback's conditionals:
  such a round learns nothing (no drafter drafts or reads; the Hedge weights, and so the next
  choice, stay as they are). Only with the argmax choice: a Hedge draw changes with each round."""
  if spec.rule.randomized:
    return state
  settings, max_gamma = spec.base.settings, spec.max_gamma
  step_costs, _, verify_costs = split_costs(spec, costs)
  # Fixed while the stretch runs: it learns nothing and probes nothing.
  choice = adaptive_rule.choose_argmax(state.log_weights)
  poor = adaptive_feedback.poor_choice(spec, state, costs, choice)

  def continues(state):
    probes = poor & (state.base.target_calls + 1 >= state.probe_at)
    stays = (choice == 0) & ~probes
    return jnp.any(~state.base.done) & jnp.all(stays | state.base.done)

  def autoregressive_round(state):
    base = state.base
    key, _, accept_key = loop.round_keys(settings, base.key)
    batch = base.pending.shape[0]
    zeros = jnp.zeros((batch,), jnp.int32)
    drafts = jnp.zeros((batch, max_gamma), jnp.int32)
    draft_logprobs = (
        None if settings.greedy else jnp.zeros((batch, max_gamma, spec.base.target_vocab))
    )
    logits, target_cache = loop.verify(spec.base, target_params, context, base, drafts[:, :0])
    logits = jnp.pad(logits.astype(jnp.float32), ((0, 0), (0, max_gamma), (0, 0)))
    num_accepted, next_token, target_logprobs = loop.accept(
        settings, drafts, draft_logprobs, logits, accept_key, zeros
    )
    after = loop.advance(spec.base, base, drafts, num_accepted, next_token, target_cache, None, key)
    verified = Verified(
        zeros, zeros, drafts, draft_logprobs, num_accepted, next_token, target_logprobs
    )
    return _record(spec, state, after, verified, step_costs, verify_costs)

  return jax.lax.while_loop(continues, autoregressive_round, state)


def _drafts(spec, drafters: DrafterInputs, costs, state, choice, gamma, active, key):
  """(state, drafts int32 [B, G], log q [B, G, V] or None): each row's drafts from the drafter it
  chose, after that drafter read what its cache lacked (zeros for autoregressive rows: gamma 0
  there, never accepted)."""
  base, max_gamma, settings = state.base, spec.max_gamma, spec.base.settings
  batch, vocab = base.pending.shape[0], spec.base.target_vocab
  drafts = jnp.zeros((batch, max_gamma), jnp.int32)
  logprobs = None if settings.greedy else jnp.zeros((batch, max_gamma, vocab), jnp.float32)
  history = history_of(state)
  states, cost = list(state.drafters), state.cost
  for k in range(spec.num_drafters):
    rows = active & (choice == k + 1)
    count = jnp.max(jnp.where(rows, gamma, 0))
    read_and_draft = functools.partial(
        _read_and_draft, spec, k, drafters, costs, history, base.position, key, rows, count
    )
    states[k], cost, drafts, logprobs = when(
        jnp.any(rows), read_and_draft, (states[k], cost, drafts, logprobs)
    )
  return state.replace(drafters=tuple(states), cost=cost), drafts, logprobs


def _read_and_draft(
    spec, k, drafters: DrafterInputs, costs, history, position, key, rows, count, carry
):
  """Drafter k catches up (`adaptive_feedback.catch_up`) and proposes `count` tokens at
  `position`: the carry (its DrafterState, cost, drafts, log q) with the drafts of `rows` in
  place."""
  drafter, cost, drafts, logprobs = carry
  drafter, cost, first = adaptive_feedback.catch_up(
      spec, k, drafters, costs, history, rows, drafter, cost
  )
  tokens, token_logprobs, cache = loop.propose(
      spec.base.settings,
      spec.drafters[k],
      drafters.params[k],
      drafter.context,
      drafter.cache,
      first,
      position,
      key,
      count,
      spec.max_gamma,
  )
  drafts = jnp.where(rows[:, None], tokens, drafts)
  if logprobs is not None:
    logprobs = jnp.where(rows[:, None, None], token_logprobs, logprobs)
  # Rows that did not choose k were fed its drafts past their pending: not valid there.
  synced = drafter.record.synced
  synced = jnp.where(rows | (count < 2), synced, jnp.minimum(synced, history.num_generated + 1))
  return (
      drafter.replace(cache=cache, record=drafter.record.replace(synced=synced)),
      cost,
      drafts,
      logprobs,
  )


def _verify(spec, target_params, context, base, drafts, width):
  """The target over [pending, drafts[:, :w]] for the smallest run width w >= `width` (traced):
  logits padded to [B, G + 1, V] and its cache."""
  max_gamma = spec.max_gamma
  batch, vocab = drafts.shape[0], spec.base.target_vocab
  logits = jnp.zeros((batch, max_gamma + 1, vocab), jnp.float32)
  carry = (logits, base.target_cache)
  widths = sorted(set(verify_widths(max_gamma)))
  for index, run_width in enumerate(widths):
    low = -1 if index == 0 else widths[index - 1]

    def call(carry, run_width=run_width):
      out, cache = loop.verify(
          spec.base,
          target_params,
          context,
          base.replace(target_cache=carry[1]),
          drafts[:, :run_width],
      )
      padding = ((0, 0), (0, max_gamma - run_width), (0, 0))
      return jnp.pad(out.astype(jnp.float32), padding), cache

    carry = when((width > low) & (width <= run_width), call, carry)
  return carry


def _record(spec, state, after, verified: Verified, step_costs, verify_costs):
  """The round's bookkeeping: emitted log p, per-round choices, per-option counters, cost."""
  base = state.base
  active = ~base.done
  choice, gamma, num_accepted = verified.choice, verified.gamma, verified.num_accepted
  target_logprobs = verified.target_logprobs
  emitted_logp = state.emitted_logp
  if target_logprobs is not None:
    emitted = loop.emitted_block(verified.drafts, num_accepted, verified.next_token)
    logp = jnp.take_along_axis(target_logprobs, emitted[..., None], axis=-1)[..., 0]
    emitted_logp = jnp.where(
        active[:, None], write_at_positions(emitted_logp, logp, base.num_generated), emitted_logp
    )
  this_round = active[:, None] & (jnp.arange(spec.max_rounds)[None, :] == base.rounds[:, None])
  chosen = jax.nn.one_hot(choice, spec.num_drafters + 1, dtype=jnp.int32) * active[:, None]
  drafter_cost = gamma * jnp.take(step_costs, jnp.maximum(choice - 1, 0)) + jnp.take(
      verify_costs, gamma
  )
  cost = jnp.where(choice == 0, verify_costs[0], drafter_cost)
  return state.replace(
      base=after,
      emitted_logp=emitted_logp,
      round_options=jnp.where(this_round, choice[:, None], state.round_options),
      round_gammas=jnp.where(this_round, gamma[:, None], state.round_gammas),
      drafted_by=state.drafted_by + chosen * gamma[:, None],
      accepted_by=state.accepted_by + chosen * num_accepted[:, None],
      cost=state.cost + jnp.where(active, cost, 0.0),
  )


def summarize(
    spec: AdaptiveSpec, state: AdaptiveState, costs, prior, embeddings
) -> AdaptiveSummary:
  """The final state's `AdaptiveSummary`: the hindsight acceptance and values are computed here."""
  _, _, verify_costs = split_costs(spec, costs)
  step_costs = costs[: spec.num_drafters]
  total_score = jnp.stack([d.record.total_score for d in state.drafters], axis=1)
  total_count = jnp.stack([d.record.total_count for d in state.drafters], axis=1)
  scored = total_count > 0
  acceptance = jnp.where(scored, total_score / jnp.maximum(total_count, 1.0), jnp.nan)
  values, _ = adaptive_rule.option_values(
      jnp.where(scored, acceptance, 0.0), step_costs, verify_costs
  )
  values = values.at[:, 1:].set(jnp.where(scored, values[:, 1:], jnp.nan))
  as_float = lambda x: x.astype(jnp.float32)
  return AdaptiveSummary(
      base=loop_state.summarize(spec.base, state.base),
      round_options=state.round_options,
      round_gammas=state.round_gammas,
      drafted_by=state.drafted_by,
      accepted_by=state.accepted_by,
      cost=as_float(state.cost),
      acceptance=as_float(acceptance),
      hindsight_values=as_float(values),
      prior=as_float(prior),
      embeddings=as_float(embeddings),
  )
