"""The program of `generate_adaptive`: a while_loop whose rounds choose their option and gamma.

See `adaptive.py` for what it computes and why it stays exact; `adaptive_rule.py` for the rule.
A round, per row:
  1. choose the option (0: autoregressive, k >= 1: drafter k - 1) and gamma from the Hedge
     weights and acceptance estimates (the past only);
  2. a chosen drafter that fell behind re-reads the whole history (`_read`, history=True);
  3. each chosen drafter drafts as many tokens as its rows' largest gamma, starting from its
     logits at `pending` (kept from its last pass), one decode step per further token;
  4. the target verifies [pending, drafts] in one call as wide as the batch's largest gamma;
  5. accept exactly (num_drafted = the row's gamma) and emit as `loop._advance` does;
  6. every tracked drafter reads [old pending, emitted block] (`_read`): its cache catches up,
     its logits at the new `pending` are kept for the next draft, and it is scored on each
     emitted position; the Hedge weights then add every option's current value.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

from jax_specsel.decoding import adaptive_rule, loop, sampling
from jax_specsel.models.attention import write_at_positions
from jax_specsel.models.interface import Decoder

_CHOICE_STREAM = 0xADA97  # folded into the seed's key for the per-round choices


@dataclasses.dataclass(frozen=True)
class AdaptiveSpec:
  """Everything static about an adaptive generation (a jit compile-time constant).

  Attributes:
    base: the loop's LoopSpec with gamma = max_gamma and no drafter (emission, stop ids, sizes).
    drafters: the K drafters' decoders; drafter_vocabs their vocabulary sizes.
    rule: the per-round rule's settings.
    policy: the offline policy's program (the prior), or None for a uniform prior.
  """

  base: loop.LoopSpec
  drafters: tuple[Decoder, ...]
  drafter_vocabs: tuple[int, ...]
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


@struct.dataclass
class AdaptiveState:
  """The adaptive while_loop's carry: `LoopState` plus per-row, per-drafter bookkeeping.

  The decoder history of row b is [origin_token[b], base.tokens[b, :num_generated]] from absolute
  position origin_position[b]: history index i holds the token at origin_position + i, and
  `base.pending` is history[num_generated].

  Attributes:
    base: LoopState with gamma = max_gamma; base.drafter_cache is a tuple of K caches.
    origin_token, origin_position: int32 [B] history[0] (T5 decoder start / last prompt token).
    emitted_logp: float32 [B, max_new + G + 1] the target's log-probability of each emitted token
      (sampling only; zeros when greedy): the denominator of a sampled acceptance score.
    first_logits: K x float32 [B, V] drafter k's logits at `pending` (valid where synced).
    synced: bool [B, K] drafter k's cache holds every position before `pending`'s.
    scored_upto: int32 [B, K] drafter k has been scored on tokens[:, :scored_upto].
    score_sum, score_count: float32 [B, K] discounted acceptance scores (adaptive_rule).
    total_score, total_count: float32 [B, K] undiscounted: the hindsight acceptance.
    log_weights: float32 [B, K + 1] Hedge log-weights, autoregressive first.
    round_options, round_gammas: int32 [B, max_rounds] each round's option and gamma (-1 after
      the row's last round).
    drafted_by, accepted_by: int32 [B, K + 1] drafts proposed / accepted per option.
    cost: float32 [B] work spent in target steps (rounds plus the passes that scored drafters).
  """

  base: loop.LoopState
  origin_token: jax.Array
  origin_position: jax.Array
  emitted_logp: jax.Array
  first_logits: Any
  synced: jax.Array
  scored_upto: jax.Array
  score_sum: jax.Array
  score_count: jax.Array
  total_score: jax.Array
  total_count: jax.Array
  log_weights: jax.Array
  round_options: jax.Array
  round_gammas: jax.Array
  drafted_by: jax.Array
  accepted_by: jax.Array
  cost: jax.Array




def run(spec: AdaptiveSpec, target_params, drafter_params: tuple, policy_params, costs, ids, mask,
        key) -> jax.Array:
  """The whole adaptive generation (jit with `spec` static); returns `summarize`'s arrays.

  Args:
    drafter_params: K nnx.States; policy_params: the policy program's inputs (None without one).
    costs: float32 [2K + G + 1] `Costs.as_array()`: step [K], catch_up [K], verify [G + 1].
    ids, mask: int32 [B, S] right-padded prompts; key: the decode key.
  """
  base = spec.base
  context, target_cache = loop.prepare_target(base, target_params, ids, mask,
                                              base.cache_length(ids.shape[1]))
  embeddings = base.target.embed(target_params, context).astype(jnp.float32)  # [B, D]
  prior = _prior(spec, policy_params, embeddings)
  state, contexts = _initial(spec, drafter_params, target_cache, ids, mask, key, prior)
  choice_key = jax.random.fold_in(key, _CHOICE_STREAM)

  def body(state):
    return _round(spec, target_params, drafter_params, context, contexts, costs, choice_key, state)

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
  """(AdaptiveState, drafter contexts): every drafter prepared and read up to `pending`."""
  base_state, _ = loop._start(spec.base, None, target_cache, ids, mask, key)
  batch, num = ids.shape[0], spec.num_drafters
  caches, contexts, first = [], [], []
  for decoder, params in zip(spec.drafters, drafter_params):
    cache = decoder.init_cache(params, batch, spec.base.cache_length(ids.shape[1]))
    context, cache = decoder.prepare(params, ids, mask, cache)
    logits, cache = decoder.decode(params, base_state.pending[:, None], base_state.position,
                                   cache, context)
    caches.append(cache)
    contexts.append(context)
    first.append(_on_vocab(logits[:, 0], spec.base.target_vocab))
  zeros = jnp.zeros((batch, num), jnp.float32)
  rounds = jnp.full((batch, spec.max_rounds), -1, jnp.int32)
  state = AdaptiveState(
      base=base_state.replace(drafter_cache=tuple(caches)),
      origin_token=base_state.pending, origin_position=base_state.position,
      emitted_logp=jnp.zeros(base_state.tokens.shape, jnp.float32), first_logits=tuple(first),
      synced=jnp.ones((batch, num), bool), scored_upto=jnp.zeros((batch, num), jnp.int32),
      score_sum=zeros, score_count=zeros, total_score=zeros, total_count=zeros,
      log_weights=adaptive_rule.initial_log_weights(prior, spec.rule),
      round_options=rounds, round_gammas=rounds,
      drafted_by=jnp.zeros((batch, num + 1), jnp.int32),
      accepted_by=jnp.zeros((batch, num + 1), jnp.int32), cost=jnp.zeros((batch,), jnp.float32))
  return state, tuple(contexts)


def _on_vocab(logits: jax.Array, vocab: int) -> jax.Array:
  """Drafter logits [..., Vd] on the target's ids [..., V] (T5 pads 32100 ids to 32128)."""
  width = logits.shape[-1]
  if width >= vocab:
    return logits[..., :vocab]
  fill = jnp.full((*logits.shape[:-1], vocab - width), -jnp.inf, logits.dtype)
  return jnp.concatenate([logits, fill], axis=-1)


def _costs(spec: AdaptiveSpec, costs):
  k = spec.num_drafters
  return costs[:k], costs[k:2 * k], costs[2 * k:]


def _round(spec, target_params, drafter_params, context, contexts, costs, choice_key, state):
  base, settings = state.base, spec.base.settings
  step_costs, _, verify_costs = _costs(spec, costs)
  active = ~base.done
  if settings.greedy:
    key = draft_key = accept_key = base.key
  else:
    key, draft_key, accept_key = jax.random.split(base.key, 3)
  # 1. the choice, from the past only (its own key stream)
  alpha = adaptive_rule.acceptance(state.score_sum, state.score_count, spec.rule)
  _, gammas = adaptive_rule.option_values(alpha, step_costs, verify_costs)
  choice = adaptive_rule.choose(state.log_weights,
                                jax.random.fold_in(choice_key, base.target_calls), spec.rule)
  gamma = jnp.where(active, jnp.take_along_axis(gammas, choice[:, None], axis=1)[:, 0], 0)
  # 2-3. drafts (a chosen drafter that fell behind first re-reads the history)
  for k in range(spec.num_drafters):
    behind = jnp.any(active & (choice == k + 1) & ~state.synced[:, k])
    state = jax.lax.cond(behind, lambda s, k=k: _read(spec, k, drafter_params[k], contexts[k], s,
                                                      history=True),
                         lambda s: s, state)
  drafts, draft_logprobs, caches = _drafts(spec, drafter_params, contexts, state, choice, gamma,
                                           active, draft_key)
  # 4-5. verify and emit
  width = jnp.max(gamma)
  logits, target_cache = jax.lax.switch(width, [
      lambda w=w: _verify(spec, target_params, context, base, drafts, w)
      for w in range(spec.max_gamma + 1)])
  if settings.greedy:
    target_logprobs = None
    num_accepted, next_token = sampling.greedy_accept(drafts, logits, gamma)
  else:
    target_logprobs = sampling.process_logits(logits, settings)
    num_accepted, next_token = sampling.speculative_accept(drafts, draft_logprobs,
                                                           target_logprobs, accept_key, gamma)
  after = loop._advance(spec.base, base, drafts, num_accepted, next_token, target_cache, caches,
                        key)
  state = _record(spec, state, after, choice, gamma, num_accepted, next_token, drafts,
                  target_logprobs, step_costs, verify_costs)
  # 6. full-information feedback from every tracked drafter, then the Hedge step
  state = _feedback(spec, drafter_params, contexts, costs, state, base.num_generated, choice,
                    active)
  alpha = adaptive_rule.acceptance(state.score_sum, state.score_count, spec.rule)
  values, _ = adaptive_rule.option_values(alpha, step_costs, verify_costs)
  return state.replace(log_weights=adaptive_rule.hedge_step(state.log_weights, values, active,
                                                            spec.rule))


def _drafts(spec, drafter_params, contexts, state, choice, gamma, active, key):
  """(drafts int32 [B, G], log q float32 [B, G, V] or None, drafter caches): each row's drafts
  from the drafter it chose (zeros for autoregressive rows, never accepted: gamma is 0 there)."""
  base, max_gamma = state.base, spec.max_gamma
  batch, vocab = base.pending.shape[0], spec.base.target_vocab
  drafts = jnp.zeros((batch, max_gamma), jnp.int32)
  logprobs = None if spec.base.settings.greedy else jnp.zeros((batch, max_gamma, vocab),
                                                              jnp.float32)
  caches = list(base.drafter_cache)
  for k in range(spec.num_drafters):
    rows = active & (choice == k + 1)
    count = jnp.max(jnp.where(rows, gamma, 0))
    run = lambda _, k=k, count=count: _draft(spec, k, drafter_params[k], contexts[k], caches[k],
                                             state.first_logits[k], base.position, count, key)
    skip = lambda _, k=k: (jnp.zeros_like(drafts), logprobs, caches[k])
    tokens, token_logprobs, caches[k] = jax.lax.cond(jnp.any(rows), run, skip, None)
    drafts = jnp.where(rows[:, None], tokens, drafts)
    if logprobs is not None:
      logprobs = jnp.where(rows[:, None, None], token_logprobs, logprobs)
  return drafts, logprobs, tuple(caches)


def _draft(spec, k, params, context, cache, first_logits, position, count, key):
  """Drafter k proposes `count` (traced, <= G) tokens from its logits at `pending`: the first
  from `first_logits`, each further one from a decode step; slots past `count` stay zero."""
  settings, max_gamma, vocab = spec.base.settings, spec.max_gamma, spec.base.target_vocab
  keys = (jnp.broadcast_to(key, (max_gamma, *key.shape)) if settings.greedy
          else jax.random.split(key, max_gamma))
  batch = position.shape[0]
  first, first_logprobs = sampling.sample_token(first_logits, settings, keys[0])
  tokens = jnp.zeros((batch, max_gamma), jnp.int32).at[:, 0].set(first)
  logprobs = None
  if not settings.greedy:
    logprobs = jnp.zeros((batch, max_gamma, vocab), jnp.float32).at[:, 0].set(first_logprobs)

  def step(i, carry):
    cache, tokens, logprobs = carry
    logits, cache = spec.drafters[k].decode(params, tokens[:, i - 1][:, None], position + i,
                                            cache, context)
    token, token_logprobs = sampling.sample_token(_on_vocab(logits[:, 0], vocab), settings,
                                                  keys[i])
    tokens = tokens.at[:, i].set(token)
    if logprobs is not None:
      logprobs = logprobs.at[:, i].set(token_logprobs)
    return cache, tokens, logprobs

  cache, tokens, logprobs = jax.lax.fori_loop(1, count, step, (cache, tokens, logprobs))
  return tokens, logprobs, cache


def _verify(spec, target_params, context, base, drafts, width: int):
  """The target over [pending, drafts[:, :width]]: logits padded to [B, G + 1, V], its cache."""
  block = jnp.concatenate([base.pending[:, None], drafts[:, :width]], axis=1)
  logits, cache = spec.base.target.decode(target_params, block, base.position, base.target_cache,
                                          context)
  padding = spec.max_gamma - width
  return jnp.pad(logits.astype(jnp.float32), ((0, 0), (0, padding), (0, 0))), cache


def _record(spec, state, after, choice, gamma, num_accepted, next_token, drafts,
            target_logprobs, step_costs, verify_costs):
  """The round's bookkeeping: emitted log p, per-round choices, per-option counters, cost."""
  base = state.base
  active = ~base.done
  emitted_logp = state.emitted_logp
  if target_logprobs is not None:
    slots = jnp.arange(spec.max_gamma + 1)[None, :]
    block = jnp.concatenate([drafts, next_token[:, None]], axis=1)
    emitted = jnp.where(slots < num_accepted[:, None], block, next_token[:, None])
    logp = jnp.take_along_axis(target_logprobs, emitted[..., None], axis=-1)[..., 0]
    emitted_logp = jnp.where(active[:, None],
                             write_at_positions(emitted_logp, logp, base.num_generated),
                             emitted_logp)
  this_round = active[:, None] & (jnp.arange(spec.max_rounds)[None, :] == base.rounds[:, None])
  chosen = jax.nn.one_hot(choice, spec.num_drafters + 1, dtype=jnp.int32) * active[:, None]
  drafter_cost = (gamma * jnp.take(step_costs, jnp.maximum(choice - 1, 0))
                  + jnp.take(verify_costs, gamma))
  cost = jnp.where(choice == 0, verify_costs[0], drafter_cost)
  return state.replace(
      base=after, emitted_logp=emitted_logp,
      round_options=jnp.where(this_round, choice[:, None], state.round_options),
      round_gammas=jnp.where(this_round, gamma[:, None], state.round_gammas),
      drafted_by=state.drafted_by + chosen * gamma[:, None],
      accepted_by=state.accepted_by + chosen * num_accepted[:, None],
      cost=state.cost + jnp.where(active, cost, 0.0))


def _feedback(spec, drafter_params, contexts, costs, state, start, choice, active):
  """Every drafter some row tracks reads the round's emitted block (or, where it fell behind,
  the whole history); the others fall behind on the rows that advanced.

  Args:
    start: int32 [B] num_generated before the round: history[start] was the round's `pending`.
    choice, active: the round's choices and the rows that took part.
  """
  _, catch_up_costs, _ = _costs(spec, costs)
  weights = jax.nn.softmax(state.log_weights, axis=1)
  every = spec.rule.probe_every
  round_index = state.base.target_calls - 1
  for k in range(spec.num_drafters):
    probe = False
    if every:
      probe = (round_index % every == every - 1) & ((round_index // every) % spec.num_drafters == k)
    track = active & ((weights[:, k + 1] >= spec.rule.track_threshold) | (choice == k + 1) | probe)
    behind = jnp.any(active & ~state.synced[:, k])
    history_factor = -(-(spec.max_rounds + 1) // (spec.max_gamma + 2))
    charge = jnp.where(behind, history_factor, 1.0) * catch_up_costs[k]
    read = lambda s, k=k, behind=behind: jax.lax.cond(
        behind, lambda t: _read(spec, k, drafter_params[k], contexts[k], t, history=True),
        lambda t: _read(spec, k, drafter_params[k], contexts[k], t, start=start), s)
    fall_behind = lambda s, k=k: s.replace(synced=s.synced.at[:, k].set(s.synced[:, k] & ~active))
    state = jax.lax.cond(jnp.any(track), read, fall_behind, state)
    state = state.replace(cost=state.cost + jnp.where(track, charge, 0.0))
  return state


def _read(spec, k, params, context, state, history: bool = False, start=None):
  """Drafter k reads history[start : start + width] at its absolute positions.

  Its cache then holds every position up to `pending`'s, its logits at `pending` are kept for its
  next draft, and each position it had not been scored on is scored: slot j predicts history
  index start + j + 1, i.e. token tokens[start + j].

  Args:
    history: read from history index 0 (max_new_tokens + 1 wide): the drafter fell behind.
    start: int32 [B] otherwise: the round's old num_generated (max_gamma + 2 wide).
  """
  base, settings, vocab = state.base, spec.base.settings, spec.base.target_vocab
  batch = base.pending.shape[0]
  if history:
    start, width = jnp.zeros((batch,), jnp.int32), spec.max_rounds + 1
  else:
    width = spec.max_gamma + 2
  sequence = jnp.concatenate([state.origin_token[:, None], base.tokens], axis=1)
  index = jnp.minimum(start[:, None] + jnp.arange(width)[None, :], sequence.shape[1] - 1)
  block = jnp.take_along_axis(sequence, index, axis=1)  # [B, W]
  logits, cache = spec.drafters[k].decode(params, block, state.origin_position + start,
                                          base.drafter_cache[k], context)
  logits = _on_vocab(logits, vocab)  # [B, W, V]
  pending_slot = base.num_generated - start
  first = jnp.take_along_axis(logits, pending_slot[:, None, None], axis=1)[:, 0]
  predicted = jnp.take_along_axis(sequence, jnp.minimum(index + 1, sequence.shape[1] - 1), axis=1)
  token_index = index  # slot j predicts tokens[start + j]
  scored = ((token_index >= state.scored_upto[:, k:k + 1])
            & (token_index < base.num_generated[:, None])
            & (start[:, None] + jnp.arange(width)[None, :] < sequence.shape[1] - 1))
  if settings.greedy:
    scores = (jnp.argmax(logits, axis=-1) == predicted).astype(jnp.float32)
  else:
    logq = jnp.take_along_axis(sampling.process_logits(logits, settings), predicted[..., None],
                               axis=-1)[..., 0]
    logp = jnp.take_along_axis(state.emitted_logp, token_index, axis=1)
    scores = jnp.exp(jnp.minimum(logq - logp, 0.0))
  score_sum, score_count = adaptive_rule.add_scores(state.score_sum[:, k], state.score_count[:, k],
                                                    scores, scored, spec.rule)
  caches = tuple(cache if i == k else c for i, c in enumerate(base.drafter_cache))
  firsts = tuple(first if i == k else f for i, f in enumerate(state.first_logits))
  return state.replace(
      base=base.replace(drafter_cache=caches), first_logits=firsts,
      synced=state.synced.at[:, k].set(True),
      scored_upto=state.scored_upto.at[:, k].set(jnp.maximum(state.scored_upto[:, k],
                                                             base.num_generated)),
      score_sum=state.score_sum.at[:, k].set(score_sum),
      score_count=state.score_count.at[:, k].set(score_count),
      total_score=state.total_score.at[:, k].add(jnp.sum(jnp.where(scored, scores, 0.0), axis=1)),
      total_count=state.total_count.at[:, k].add(jnp.sum(scored, axis=1).astype(jnp.float32)))


def summarize(spec: AdaptiveSpec, state: AdaptiveState, costs, prior, embeddings) -> jax.Array:
  """The final state as one int32 [B, W] array (float columns bit-cast): one transfer.

  Columns: `loop.summarize` (gamma width max_gamma), round_options [R], round_gammas [R],
  drafted_by [K+1], accepted_by [K+1], then float32 bits: cost [1], acceptance [K] (hindsight,
  nan where never scored), hindsight_values [K+1], prior [K+1], embeddings [D].
  """
  _, _, verify_costs = _costs(spec, costs)
  step_costs = costs[:spec.num_drafters]
  scored = state.total_count > 0
  acceptance = jnp.where(scored, state.total_score / jnp.maximum(state.total_count, 1.0), jnp.nan)
  values, _ = adaptive_rule.option_values(jnp.where(scored, acceptance, 0.0), step_costs,
                                          verify_costs)
  values = values.at[:, 1:].set(jnp.where(scored, values[:, 1:], jnp.nan))
  floats = jnp.concatenate([state.cost[:, None], acceptance, values, prior, embeddings], axis=1)
  ints = jnp.concatenate([loop.summarize(spec.base, state.base), state.round_options,
                          state.round_gammas, state.drafted_by, state.accepted_by], axis=1)
  return jnp.concatenate([ints, jax.lax.bitcast_convert_type(floats.astype(jnp.float32),
                                                             jnp.int32)], axis=1)
