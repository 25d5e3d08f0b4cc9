"""The program of `generate_adaptive`: a while_loop whose rounds choose their option and gamma.

See `adaptive.py` for what it computes and why it stays exact; `adaptive_rule.py` for the rule,
`adaptive_drafters.py` for what is kept per drafter and the reads that score it. A round, per row:
  1. choose the option (0: autoregressive, k >= 1: drafter k - 1) and gamma from the Hedge
     weights and acceptance estimates (the past only; the draw's uniforms are made up front);
  2. the chosen drafter reads what its cache lacks up to `pending` (usually the two tokens
     [previous, pending], as `loop.draft` does; after rounds it sat out, the tokens it missed,
     or the whole history) and proposes gamma tokens (`loop.propose`);
  3. the target verifies [pending, drafts] in one call as wide as the batch's largest gamma;
  4. accept exactly (`loop.accept`, num_drafted = the row's gamma) and `loop.advance`;
  5. the chosen drafter is scored on the positions it drafted (the verification itself: bandit
     feedback); every `probe_every` rounds, each drafter the Hedge weights still track, and one
     more in turn, reads the tokens it missed and is scored on all of them (full information,
     lazily); the Hedge log-weights then add every option's current value.

Each read scores a drafter on every position it had not been scored on, so a drafter that sat
out many rounds is judged on everything it missed when it comes back.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

from jax_specsel.decoding import adaptive_drafters, adaptive_rule, loop
from jax_specsel.decoding.adaptive_drafters import DrafterRecord, DrafterState, History
from jax_specsel.decoding.control import when
from jax_specsel.models.attention import write_at_positions
from jax_specsel.models.interface import Decoder

_CHOICE_STREAM = 0xADA97  # folded into the seed's key for the per-round choices
_TURN_STREAM = 0xADA98  # and for which drafter each row's probes read first in turn


@dataclasses.dataclass(frozen=True)
class AdaptiveSpec:
  """Everything static about an adaptive generation (a jit compile-time constant).

  Attributes:
    base: the loop's LoopSpec with gamma = max_gamma and no drafter (emission, stop ids, sizes).
    drafters: the K drafters' decoders.
    rule: the per-round rule's settings.
    policy: the offline policy's program (the prior), or None for a uniform prior.
  """

  base: loop.LoopSpec
  drafters: tuple[Decoder, ...]
  rule: adaptive_rule.RuleSettings
  policy: Any

  @property
  def max_gamma(self) -> int:
    return self.base.gamma

  @property
  def num_drafters(self) -> int:
    return len(self.drafters)

  @property
  def max_rounds(self) -> int:
    return self.base.max_new_tokens  # every round emits at least one token

  @property
  def read_width(self) -> int:
    """Tokens of a catch-up read after rounds a drafter sat out (longer gaps read the history)."""
    return 2 * (self.max_gamma + 1)


@struct.dataclass
class AdaptiveState:
  """The adaptive while_loop's carry: `LoopState` plus per-row, per-drafter bookkeeping.

  The decoder history of row b is [origin_token[b], base.tokens[b, :num_generated]] from absolute
  position origin_position[b] (`History`): history index i is the token at origin_position + i,
  and `pending` is history[num_generated]. Token index j (tokens[:, j]) is history index j + 1.

  Attributes:
    base: LoopState with gamma = max_gamma; base.drafter_cache is None (each drafter's cache is
      in its `DrafterState`).
    drafters: one `DrafterState` per drafter: a read or a draft by drafter k replaces entry k.
    origin_token, origin_position: int32 [B] history[0] (T5 decoder start / last prompt token).
    emitted_logp: float32 [B, max_new + G + 1] the target's log-probability of each emitted token
      (sampling only; zeros when greedy): the denominator of a sampled acceptance score.
    log_weights: float32 [B, K + 1] Hedge log-weights, autoregressive first.
    gammas: int32 [B, K + 1] each option's best gamma at the current estimates (0: autoregressive).
    round_options, round_gammas: int32 [B, max_rounds] each round's option and gamma (-1 after
      the row's last round).
    drafted_by, accepted_by: int32 [B, K + 1] drafts proposed / accepted per option.
    cost: float32 [B] work spent in target steps (rounds plus the reads that scored drafters).
  """

  base: loop.LoopState
  drafters: tuple[DrafterState, ...]
  origin_token: jax.Array
  origin_position: jax.Array
  emitted_logp: jax.Array
  log_weights: jax.Array
  gammas: jax.Array
  round_options: jax.Array
  round_gammas: jax.Array
  drafted_by: jax.Array
  accepted_by: jax.Array
  cost: jax.Array


@struct.dataclass
class AdaptiveSummary:
  """What the host reads of a finished adaptive generation (see `AdaptiveOutput` for meanings).

  A pytree of arrays: `summarize` builds it on the device; it crosses to the host packed into one
  array (`transfer.Packed`).
  """

  base: loop.Summary  # accepted_at as wide as max_gamma
  round_options: jax.Array  # int32 [B, max_rounds]
  round_gammas: jax.Array  # int32 [B, max_rounds]
  drafted_by: jax.Array  # int32 [B, K + 1]
  accepted_by: jax.Array  # int32 [B, K + 1]
  cost: jax.Array  # float32 [B]
  acceptance: jax.Array  # float32 [B, K] hindsight, nan where never scored
  hindsight_values: jax.Array  # float32 [B, K + 1]
  prior: jax.Array  # float32 [B, K + 1]
  embeddings: jax.Array  # float32 [B, D]


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
  state = _initial(spec, drafter_params, target_cache, ids, mask, key, prior, costs)
  drafters = _Drafters(params=tuple(drafter_params), ids=ids, mask=mask)
  # The choices' uniforms and the probes' turns, drawn up front from streams of their own:
  # independent of every draft.
  draws = _Draws(
      uniforms=jax.random.uniform(
          jax.random.fold_in(key, _CHOICE_STREAM), (spec.max_rounds + 1, ids.shape[0])
      ),
      turn_offset=jax.random.randint(
          jax.random.fold_in(key, _TURN_STREAM), (ids.shape[0],), 0, spec.num_drafters
      ),
  )

  def body(state):
    return _round(spec, target_params, drafters, context, costs, draws, state)

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


@struct.dataclass
class _Draws:
  """The rule's randomness, drawn before the first round."""

  uniforms: jax.Array  # float32 [max_rounds + 1, B]: each round's Hedge draw
  turn_offset: jax.Array  # int32 [B]: the drafter a row's first probe reads in turn


@struct.dataclass
class _Drafters:
  """What every round reads about the drafters: their params and the prompt of their first pass."""

  params: tuple
  ids: jax.Array  # int32 [B, S]
  mask: jax.Array  # int32 [B, S]


def _initial(spec, drafter_params, target_cache, ids, mask, key, prior, costs):
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
  zeros = jnp.zeros((batch, num), jnp.float32)
  step_costs, _, verify_costs = _costs(spec, costs)
  _, gammas = adaptive_rule.option_values(
      adaptive_rule.acceptance(zeros, zeros, spec.rule), step_costs, verify_costs
  )
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
  )


def _costs(spec: AdaptiveSpec, costs):
  """(step [K], read [K], verify [G + 1]) from the flat cost array; verify[g] is the cost of the
  call a round with gamma g runs (`verify_widths`)."""
  k = spec.num_drafters
  verify = costs[2 * k :]
  return costs[:k], costs[k : 2 * k], verify[jnp.asarray(verify_widths(spec.max_gamma))]


def _history(state: AdaptiveState) -> History:
  return History(
      sequence=jnp.concatenate([state.origin_token[:, None], state.base.tokens], axis=1),
      origin_position=state.origin_position,
      num_generated=state.base.num_generated,
      emitted_logp=state.emitted_logp,
  )


def _round(spec, target_params, drafters, context, costs, draws: _Draws, state):
  base, settings = state.base, spec.base.settings
  step_costs, _, verify_costs = _costs(spec, costs)
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
  state = _record(
      spec,
      state,
      after,
      choice,
      gamma,
      num_accepted,
      next_token,
      drafts,
      target_logprobs,
      step_costs,
      verify_costs,
  )
  # 5. feedback: probes score the drafters that sat out; the verification scores the chosen
  # one; then the Hedge step. A round that learned nothing (autoregressive, no probe) skips it.
  rounds_done = state.base.target_calls  # counts this round already
  every, first = spec.rule.probe_every, spec.rule.first_probe
  due = (rounds_done % every == 0) if every else jnp.asarray(False)
  if first:
    due = due | (rounds_done == first)
  if every or first:
    state = _probe(spec, drafters, costs, state, choice, active, due, draws.turn_offset)
  learned = due | jnp.any(active & (choice > 0))

  def learn(state):
    state = state.replace(
        drafters=adaptive_drafters.score_drafted(
            state.drafters,
            spec.rule,
            base.num_generated,
            choice,
            gamma,
            num_accepted,
            drafts,
            draft_logprobs,
            target_logprobs,
            active,
        )
    )
    return _hedge_step(spec, state, costs, active)

  return when(learned, learn, state)


def _hedge_step(spec, state, costs, active):
  """Every option's value from the current estimates is added to its Hedge log-weight (on the
  active rows), and each drafter's best gamma is kept for the next choice."""
  step_costs, _, verify_costs = _costs(spec, costs)
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


def _read(spec, k, drafters: _Drafters, costs, history, drafter, cost, rows, width: int | None):
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
    _, read_costs, _ = _costs(spec, costs)
    cost = cost + jnp.where(rows, read_costs[k] * width / spec.read_width, 0.0)
  return drafter, cost, first


def _drafts(spec, drafters: _Drafters, costs, state, choice, gamma, active, key):
  """(state, drafts int32 [B, G], log q [B, G, V] or None): each row's drafts from the drafter it
  chose, after that drafter read what its cache lacked (zeros for autoregressive rows: gamma 0
  there, never accepted)."""
  base, max_gamma, settings = state.base, spec.max_gamma, spec.base.settings
  batch, vocab = base.pending.shape[0], spec.base.target_vocab
  drafts = jnp.zeros((batch, max_gamma), jnp.int32)
  logprobs = None if settings.greedy else jnp.zeros((batch, max_gamma, vocab), jnp.float32)
  history = _history(state)
  states, cost = list(state.drafters), state.cost
  for k in range(spec.num_drafters):
    rows = active & (choice == k + 1)
    count = jnp.max(jnp.where(rows, gamma, 0))

    def read_and_draft(carry, k=k, rows=rows, count=count):
      drafter, cost, drafts, logprobs = carry
      drafter = adaptive_drafters.prepared(
          spec.drafters[k], drafters.params[k], drafters.ids, drafters.mask, drafter
      )
      gap = history.num_generated - adaptive_drafters.read_start(
          drafter.record, history.num_generated
      )
      kind = jnp.max(
          jnp.where(rows, jnp.where(gap <= 1, 0, jnp.where(gap < spec.read_width, 1, 2)), -1)
      )
      first = jnp.zeros((batch, vocab), jnp.float32)
      for index, width in enumerate((2, spec.read_width, None)):
        drafter, cost, first = when(
            kind == index,
            lambda carry, width=width: _read(
                spec, k, drafters, costs, history, carry[0], carry[1], rows, width
            ),
            (drafter, cost, first),
        )
      tokens, token_logprobs, cache = loop.propose(
          settings,
          spec.drafters[k],
          drafters.params[k],
          drafter.context,
          drafter.cache,
          first,
          base.position,
          key,
          count,
          max_gamma,
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

    states[k], cost, drafts, logprobs = when(
        jnp.any(rows), read_and_draft, (states[k], cost, drafts, logprobs)
    )
  return state.replace(drafters=tuple(states), cost=cost), drafts, logprobs


def verify_widths(max_gamma: int) -> tuple[int, ...]:
  """The drafts a verify call scores for each gamma 0..G: 0, then the two widths a round can
  run (half and full: a third would be a conditional with three branches, see `control`)."""
  half = (max_gamma + 1) // 2
  return tuple(0 if g == 0 else half if g <= half else max_gamma for g in range(max_gamma + 1))


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


def _probe(spec, drafters: _Drafters, costs, state, choice, active, due, turn_offset):
  """On a probe round, each drafter the Hedge weights track (weight >= track_threshold), and one
  more in turn (from a random drafter per row, `turn_offset`: over queries every drafter is
  seen), reads what it missed and is scored on it (the drafter that drafted is current)."""
  every = max(spec.rule.probe_every, 1)
  weights = jax.nn.softmax(state.log_weights, axis=1)
  running = active & ~state.base.done
  turn = (state.base.target_calls // every + turn_offset) % spec.num_drafters
  history = _history(state)

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
            lambda c, width=width, k=k, rows=rows: _read(
                spec, k, drafters, costs, history, c[0], c[1], rows, width
            )[:2],
            (states[k], cost),
        )
    return tuple(states), cost

  states, cost = when(due, probe, (state.drafters, state.cost))
  return state.replace(drafters=states, cost=cost)


def _record(
    spec,
    state,
    after,
    choice,
    gamma,
    num_accepted,
    next_token,
    drafts,
    target_logprobs,
    step_costs,
    verify_costs,
):
  """The round's bookkeeping: emitted log p, per-round choices, per-option counters, cost."""
  base = state.base
  active = ~base.done
  emitted_logp = state.emitted_logp
  if target_logprobs is not None:
    emitted = loop.emitted_block(drafts, num_accepted, next_token)
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
  _, _, verify_costs = _costs(spec, costs)
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
      base=loop.summarize(spec.base, state.base),
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
