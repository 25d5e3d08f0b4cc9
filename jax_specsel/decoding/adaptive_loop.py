"""The program of `generate_adaptive`: a while_loop whose rounds choose their option and gamma.

See `adaptive.py` for what it computes and why it stays exact; `adaptive_rule.py` for the rule.
A round, per row:
  1. choose the option (0: autoregressive, k >= 1: drafter k - 1) and gamma from the Hedge
     weights and acceptance estimates (the past only; the draw's uniforms are made up front);
  2. the chosen drafter reads what its cache lacks up to `pending` (`_read`: usually the two
     tokens [previous, pending], as `loop` does; after rounds it sat out, the tokens it missed,
     or the whole history) and drafts gamma tokens, one decode step each after the first;
  3. the target verifies [pending, drafts] in one call as wide as the batch's largest gamma;
  4. accept exactly (num_drafted = the row's gamma) and emit as `loop._advance` does;
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

from jax_specsel.decoding import adaptive_rule, loop, sampling
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
  position origin_position[b]: history index i is the token at origin_position + i, and `pending`
  is history[num_generated]. Token index j (tokens[:, j]) is history index j + 1.

  Attributes:
    base: LoopState with gamma = max_gamma; base.drafter_cache is a tuple of K caches.
    contexts: K drafter contexts (T5: encoder states and cross K/V), zeros until prepared.
    prepared: K bool scalars: drafter k's first pass has run (its context and cache are real).
    origin_token, origin_position: int32 [B] history[0] (T5 decoder start / last prompt token).
    emitted_logp: float32 [B, max_new + G + 1] the target's log-probability of each emitted token
      (sampling only; zeros when greedy): the denominator of a sampled acceptance score.
    Per drafter, a tuple of K arrays [B] (entry k is drafter k's: a read or a draft by one
    drafter replaces its entries without touching the others', see `_View`):
    synced: int32 history index up to which (exclusive) drafter k's cache is valid.
    scored_upto: int32 drafter k has been scored on tokens[:, :scored_upto].
    score_sum, score_count: float32 discounted acceptance scores (adaptive_rule).
    total_score, total_count: float32 undiscounted: the hindsight acceptance.
    log_weights: float32 [B, K + 1] Hedge log-weights, autoregressive first.
    gammas: int32 [B, K + 1] each option's best gamma at the current estimates (0: autoregressive).
    round_options, round_gammas: int32 [B, max_rounds] each round's option and gamma (-1 after
      the row's last round).
    drafted_by, accepted_by: int32 [B, K + 1] drafts proposed / accepted per option.
    cost: float32 [B] work spent in target steps (rounds plus the reads that scored drafters).
  """

  base: loop.LoopState
  contexts: tuple
  prepared: tuple[jax.Array, ...]
  origin_token: jax.Array
  origin_position: jax.Array
  emitted_logp: jax.Array
  synced: tuple[jax.Array, ...]
  scored_upto: tuple[jax.Array, ...]
  score_sum: tuple[jax.Array, ...]
  score_count: tuple[jax.Array, ...]
  total_score: tuple[jax.Array, ...]
  total_count: tuple[jax.Array, ...]
  log_weights: jax.Array
  gammas: jax.Array
  round_options: jax.Array
  round_gammas: jax.Array
  drafted_by: jax.Array
  accepted_by: jax.Array
  cost: jax.Array


def run(spec: AdaptiveSpec, target_params, drafter_params: tuple, policy_params, costs, ids, mask,
        key) -> jax.Array:
  """The whole adaptive generation (jit with `spec` static); returns `summarize`'s array.

  Args:
    drafter_params: K nnx.States; policy_params: the policy program's inputs (None without one).
    costs: float32 [2K + G + 1] `Costs.as_array()`: step [K], read [K], verify [G + 1].
    ids, mask: int32 [B, S] right-padded prompts; key: the decode key.
  """
  base = spec.base
  context, target_cache = loop.prepare_target(base, target_params, ids, mask,
                                              base.cache_length(ids.shape[1]))
  embeddings = base.target.embed(target_params, context).astype(jnp.float32)  # [B, D]
  prior = _prior(spec, policy_params, embeddings)
  state = _initial(spec, drafter_params, target_cache, ids, mask, key, prior, costs)
  drafters = _Drafters(params=tuple(drafter_params), ids=ids, mask=mask)
  # The choices' uniforms and the probes' turns, drawn up front from streams of their own:
  # independent of every draft.
  draws = _Draws(uniforms=jax.random.uniform(jax.random.fold_in(key, _CHOICE_STREAM),
                                             (spec.max_rounds + 1, ids.shape[0])),
                 turn_offset=jax.random.randint(jax.random.fold_in(key, _TURN_STREAM),
                                                (ids.shape[0],), 0, spec.num_drafters))

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
  """The AdaptiveState before the first round. No drafter has run: its first pass (T5 encoder /
  prefill) waits for its first read (`_prepared`), so a drafter never chosen nor probed costs
  nothing; its context starts as zeros of the right shapes."""
  base_state, _ = loop._start(spec.base, None, target_cache, ids, mask, key)
  batch, num = ids.shape[0], spec.num_drafters
  caches, contexts = [], []
  for decoder, params in zip(spec.drafters, drafter_params):
    cache = decoder.init_cache(params, batch, spec.base.cache_length(ids.shape[1]))
    shapes = jax.eval_shape(decoder.prepare, params, ids, mask, cache)[0]
    caches.append(cache)
    contexts.append(jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), shapes))
  zeros = jnp.zeros((batch, num), jnp.float32)
  step_costs, _, verify_costs = _costs(spec, costs)
  _, gammas = adaptive_rule.option_values(adaptive_rule.acceptance(zeros, zeros, spec.rule),
                                          step_costs, verify_costs)
  per_drafter = lambda dtype: tuple(jnp.zeros((batch,), dtype) for _ in range(num))
  rounds = jnp.full((batch, spec.max_rounds), -1, jnp.int32)
  state = AdaptiveState(
      base=base_state.replace(drafter_cache=tuple(caches)), contexts=tuple(contexts),
      prepared=tuple(jnp.zeros((), bool) for _ in range(num)),
      origin_token=base_state.pending, origin_position=base_state.position,
      emitted_logp=jnp.zeros(base_state.tokens.shape, jnp.float32),
      synced=per_drafter(jnp.int32), scored_upto=per_drafter(jnp.int32),
      score_sum=per_drafter(jnp.float32), score_count=per_drafter(jnp.float32),
      total_score=per_drafter(jnp.float32), total_count=per_drafter(jnp.float32),
      log_weights=adaptive_rule.initial_log_weights(prior, spec.rule), gammas=gammas,
      round_options=rounds, round_gammas=rounds,
      drafted_by=jnp.zeros((batch, num + 1), jnp.int32),
      accepted_by=jnp.zeros((batch, num + 1), jnp.int32), cost=jnp.zeros((batch,), jnp.float32))
  return state


def _costs(spec: AdaptiveSpec, costs):
  """(step [K], read [K], verify [G + 1]) from the flat cost array; verify[g] is the cost of the
  call a round with gamma g runs (`verify_widths`)."""
  k = spec.num_drafters
  verify = costs[2 * k:]
  return costs[:k], costs[k:2 * k], verify[jnp.asarray(verify_widths(spec.max_gamma))]


def _round(spec, target_params, drafters, context, costs, draws: _Draws, state):
  base, settings = state.base, spec.base.settings
  step_costs, _, verify_costs = _costs(spec, costs)
  active = ~base.done
  if settings.greedy:
    key = draft_key = accept_key = base.key
  else:
    key, draft_key, accept_key = jax.random.split(base.key, 3)
  # 1. the choice, from the past only
  uniform = draws.uniforms[jnp.minimum(base.target_calls, spec.max_rounds)]
  choice = adaptive_rule.choose(state.log_weights, uniform, spec.rule)
  gamma = jnp.where(active, jnp.take_along_axis(state.gammas, choice[:, None], axis=1)[:, 0], 0)
  # 2. reads and drafts
  state, drafts, draft_logprobs = _drafts(spec, drafters, costs, state, choice,
                                          gamma, active, draft_key)
  # 3-4. verify, accept, emit
  logits, target_cache = _verify(spec, target_params, context, base, drafts, jnp.max(gamma))
  if settings.greedy:
    target_logprobs = None
    num_accepted, next_token = sampling.greedy_accept(drafts, logits, gamma)
  else:
    target_logprobs = sampling.process_logits(logits, settings)
    num_accepted, next_token = sampling.speculative_accept(drafts, draft_logprobs,
                                                           target_logprobs, accept_key, gamma)
  after = loop._advance(spec.base, state.base, drafts, num_accepted, next_token, target_cache,
                        state.base.drafter_cache, key)
  state = _record(spec, state, after, choice, gamma, num_accepted, next_token, drafts,
                  target_logprobs, step_costs, verify_costs)
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
    state = _score_drafted(spec, state, base.num_generated, choice, gamma, num_accepted, drafts,
                           draft_logprobs, target_logprobs, active)
    return _hedge_step(spec, state, costs, active)

  return _when(learned, learn, state)


def _hedge_step(spec, state, costs, active):
  """Every option's value from the current estimates is added to its Hedge log-weight (on the
  active rows), and each drafter's best gamma is kept for the next choice."""
  step_costs, _, verify_costs = _costs(spec, costs)
  alpha = adaptive_rule.acceptance(jnp.stack(state.score_sum, axis=1),
                                   jnp.stack(state.score_count, axis=1), spec.rule)
  values, gammas = adaptive_rule.option_values(alpha, step_costs, verify_costs)
  return state.replace(
      log_weights=adaptive_rule.hedge_step(state.log_weights, values, active, spec.rule),
      gammas=jnp.where(active[:, None], gammas, state.gammas))


# XLA:CPU copies the buffers a conditional updates when it has three or more branches or holds
# another conditional (measured: a 400 KB buffer through lax.switch of 3 branches, or through
# nested lax.conds, costs ~43 us a round; through one lax.cond ~0.1 us), while a while_loop
# updates its carry in place, nested or not. So every "if" of a round is `_when`: a while_loop
# that runs its body zero times or once, carrying just the buffers the body changes.


def _when(predicate, body, operand):
  """`body(operand)` where the scalar `predicate` holds, else `operand` (body keeps its shapes)."""
  return jax.lax.while_loop(lambda carry: carry[0],
                            lambda carry: (jnp.zeros((), bool), body(carry[1])),
                            (jnp.asarray(predicate), operand))[1]


@struct.dataclass
class _View:
  """Drafter k's slice of the state: what a read or a draft by drafter k changes ([B] arrays)."""

  cache: Any
  context: Any
  prepared: jax.Array
  synced: jax.Array
  scored_upto: jax.Array
  score_sum: jax.Array
  score_count: jax.Array
  total_score: jax.Array
  total_count: jax.Array
  cost: jax.Array


_PER_DRAFTER = ("contexts", "prepared", "synced", "scored_upto", "score_sum", "score_count",
                "total_score", "total_count")
_VIEW_FIELD = {"contexts": "context"}


def _view(state: AdaptiveState, k: int) -> _View:
  return _View(cache=state.base.drafter_cache[k], cost=state.cost,
               **{_VIEW_FIELD.get(name, name): getattr(state, name)[k] for name in _PER_DRAFTER})


def _with_view(state: AdaptiveState, k: int, view: _View) -> AdaptiveState:
  """Drafter k's entries replaced by the view's (no array op: the entries are separate arrays)."""
  put = lambda values, new: tuple(new if i == k else v for i, v in enumerate(values))
  return state.replace(base=state.base.replace(drafter_cache=put(state.base.drafter_cache,
                                                                 view.cache)),
                       cost=view.cost,
                       **{name: put(getattr(state, name), getattr(view, _VIEW_FIELD.get(name, name)))
                          for name in _PER_DRAFTER})


def _prepared(spec, k, drafters: _Drafters, view: _View, wanted=True) -> _View:
  """Drafter k's first pass over the prompt (T5 encoder / prefill), run once: on its first read
  (where the scalar `wanted` holds)."""
  def prepare(view):
    context, cache = spec.drafters[k].prepare(drafters.params[k], drafters.ids, drafters.mask,
                                              view.cache)
    return view.replace(context=context, cache=cache, prepared=jnp.ones((), bool))

  return _when(jnp.asarray(wanted) & ~view.prepared, prepare, view)


def _drafts(spec, drafters: _Drafters, costs, state, choice, gamma, active, key):
  """(state, drafts int32 [B, G], log q [B, G, V] or None): each row's drafts from the drafter it
  chose, after that drafter read what its cache lacked (zeros for autoregressive rows: gamma 0
  there, never accepted)."""
  base, max_gamma = state.base, spec.max_gamma
  batch, vocab = base.pending.shape[0], spec.base.target_vocab
  drafts = jnp.zeros((batch, max_gamma), jnp.int32)
  logprobs = None if spec.base.settings.greedy else jnp.zeros((batch, max_gamma, vocab),
                                                              jnp.float32)
  history = _History.of(state)
  for k in range(spec.num_drafters):
    rows = active & (choice == k + 1)
    count = jnp.max(jnp.where(rows, gamma, 0))

    def read_and_draft(carry, k=k, rows=rows, count=count):
      view, drafts, logprobs = carry
      view = _prepared(spec, k, drafters, view)
      gap = history.num_generated - read_start(view, history.num_generated)
      kind = jnp.max(jnp.where(rows, jnp.where(
          gap <= 1, 0, jnp.where(gap < spec.read_width, 1, 2)), -1))
      first = jnp.zeros((batch, vocab), jnp.float32)
      for index, width in enumerate((2, spec.read_width, None)):
        view, first = _when(kind == index, lambda vf, width=width: _read(
            spec, k, drafters.params[k], costs, history, vf[0], rows, width), (view, first))
      tokens, token_logprobs, cache = _draft(spec, k, drafters.params[k], view.context,
                                             view.cache, first, base.position, count, key)
      drafts = jnp.where(rows[:, None], tokens, drafts)
      if logprobs is not None:
        logprobs = jnp.where(rows[:, None, None], token_logprobs, logprobs)
      # Rows that did not choose k were fed its drafts past their pending: not valid there.
      synced = jnp.where(rows | (count < 2), view.synced,
                         jnp.minimum(view.synced, history.num_generated + 1))
      return view.replace(cache=cache, synced=synced), drafts, logprobs

    view, drafts, logprobs = _when(jnp.any(rows), read_and_draft,
                                   (_view(state, k), drafts, logprobs))
    state = _with_view(state, k, view)
  return state, drafts, logprobs


@struct.dataclass
class _History:
  """What a read takes from the state, read-only: the decoder history and its targets."""

  sequence: jax.Array  # int32 [B, H]: [origin_token, tokens...]
  origin_position: jax.Array  # int32 [B]
  num_generated: jax.Array  # int32 [B]
  emitted_logp: jax.Array  # float32 [B, H - 1]

  @classmethod
  def of(cls, state: AdaptiveState) -> "_History":
    return cls(sequence=jnp.concatenate([state.origin_token[:, None], state.base.tokens], axis=1),
               origin_position=state.origin_position, num_generated=state.base.num_generated,
               emitted_logp=state.emitted_logp)


def read_start(view: _View, num_generated: jax.Array) -> jax.Array:
  """int32 [B]: the history index a read of drafter k starts at.

  Token index j is scored by the drafter's logits at history index j, which a read computes only
  while that index is in its block. The last read stopped at `pending`, whose successor was not
  known yet: the next read must start there again (`scored_upto`), not after it (`synced`), or
  the token emitted after every read is never scored (a drafter read every round would then be
  scored on nothing while the rounds emit one token each).
  """
  return jnp.minimum(jnp.minimum(view.synced, view.scored_upto), num_generated)


def _read(spec, k, params, costs, history: _History, view: _View, rows,
          width: int | None):
  """Drafter k reads history[start : start + width] at its absolute positions.

  start is `read_start`: where its cache stops being valid, or one earlier where the logits that
  score its first unscored token are needed again; width None reads the whole history from 0. Every row of the batch is read (rows that did not ask
  merely get valid K/V a little further); the read's cost is charged to `rows`.

  Returns:
    (the view with drafter k's cache, synced and scores updated, its logits at `pending`
    [B, V] (meaningful where the read reached `pending`)).
  """
  settings, vocab = spec.base.settings, spec.base.target_vocab
  _, read_costs, _ = _costs(spec, costs)
  num_generated = history.num_generated
  if width is None:
    start, width = jnp.zeros_like(num_generated), spec.max_rounds + 1
  else:
    start = read_start(view, num_generated)
  charge = 0.0 if width == 2 else read_costs[k] * width / spec.read_width  # 2: in a draft step
  sequence = history.sequence
  last = sequence.shape[1] - 1
  index = start[:, None] + jnp.arange(width)[None, :]  # history index of each slot
  block = jnp.take_along_axis(sequence, jnp.minimum(index, last), axis=1)
  logits, cache = spec.drafters[k].decode(params, block, history.origin_position + start,
                                          view.cache, view.context)
  logits = loop.on_target_vocab(logits, vocab).astype(jnp.float32)  # [B, W, V]
  first = jnp.take_along_axis(
      logits, jnp.clip(num_generated - start, 0, width - 1)[:, None, None], axis=1)[:, 0]
  # Slot j predicts history index + 1, i.e. token index `index`.
  predicted = jnp.take_along_axis(sequence, jnp.minimum(index + 1, last), axis=1)
  scored = (index >= view.scored_upto[:, None]) & (index < num_generated[:, None])
  if settings.greedy:
    scores = (jnp.argmax(logits, axis=-1) == predicted).astype(jnp.float32)
  else:
    logq = jnp.take_along_axis(sampling.process_logits(logits, settings), predicted[..., None],
                               axis=-1)[..., 0]
    logp = jnp.take_along_axis(history.emitted_logp, jnp.minimum(index, last - 1), axis=1)
    scores = jnp.exp(jnp.minimum(logq - logp, 0.0))
  score_sum, score_count = adaptive_rule.add_scores(view.score_sum, view.score_count, scores,
                                                    scored, spec.rule)
  reached = jnp.minimum(start + width, num_generated + 1)
  return view.replace(
      cache=cache, synced=jnp.maximum(view.synced, reached),
      scored_upto=jnp.maximum(view.scored_upto, jnp.minimum(num_generated, start + width)),
      score_sum=score_sum, score_count=score_count,
      total_score=view.total_score + jnp.sum(jnp.where(scored, scores, 0.0), axis=1),
      total_count=view.total_count + jnp.sum(scored, axis=1).astype(jnp.float32),
      cost=view.cost + jnp.where(rows, charge, 0.0)), first


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
    token, token_logprobs = sampling.sample_token(loop.on_target_vocab(logits[:, 0], vocab),
                                                  settings, keys[i])
    tokens = tokens.at[:, i].set(token)
    if logprobs is not None:
      logprobs = logprobs.at[:, i].set(token_logprobs)
    return cache, tokens, logprobs

  cache, tokens, logprobs = jax.lax.fori_loop(1, count, step, (cache, tokens, logprobs))
  return tokens, logprobs, cache


def verify_widths(max_gamma: int) -> tuple[int, ...]:
  """The drafts a verify call scores for each gamma 0..G: 0, then the two widths a round can
  run (half and full: a third would be a conditional with three branches, see above)."""
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
      block = jnp.concatenate([base.pending[:, None], drafts[:, :run_width]], axis=1)
      out, cache = spec.base.target.decode(target_params, block, base.position, carry[1], context)
      padding = ((0, 0), (0, max_gamma - run_width), (0, 0))
      return jnp.pad(out.astype(jnp.float32), padding), cache

    carry = _when((width > low) & (width <= run_width), call, carry)
  return carry


def _score_drafted(spec, state, start, choice, gamma, num_accepted, drafts, draft_logprobs,
                   target_logprobs, active):
  """The verification scores the drafter that drafted, on each position it drafted up to the
  first rejection (greedy: 1 accepted, 0 rejected; sampling: min(1, p(x) / q(x)), x ~ q), and
  says how far its cache is valid: through its last accepted draft it was fed.

  Args:
    start: int32 [B] num_generated before the round (the old pending's history index).
  """
  chosen = active & (choice > 0)
  slots = jnp.arange(spec.max_gamma)[None, :]
  reached = jnp.minimum(num_accepted + 1, gamma)
  scored = chosen[:, None] & (slots < reached[:, None])
  if target_logprobs is None:
    scores = (slots < num_accepted[:, None]).astype(jnp.float32)
  else:
    pick = lambda logprobs: jnp.take_along_axis(logprobs, drafts[..., None], axis=-1)[..., 0]
    scores = jnp.exp(jnp.minimum(pick(target_logprobs[:, :spec.max_gamma])
                                 - pick(draft_logprobs), 0.0))
  rows = [chosen & (choice == k + 1) for k in range(spec.num_drafters)]
  pick = lambda values: sum(jnp.where(r, v, 0) for r, v in zip(rows, values))
  score_sum, score_count = adaptive_rule.add_scores(pick(state.score_sum), pick(state.score_count),
                                                    scores, scored, spec.rule)
  valid = start + 1 + jnp.minimum(num_accepted, jnp.maximum(gamma - 1, 0))
  put = lambda values, new: tuple(jnp.where(r, new, v) for r, v in zip(rows, values))
  return state.replace(
      score_sum=put(state.score_sum, score_sum), score_count=put(state.score_count, score_count),
      total_score=put(state.total_score,
                      pick(state.total_score) + jnp.sum(jnp.where(scored, scores, 0.0), axis=1)),
      total_count=put(state.total_count,
                      pick(state.total_count) + jnp.sum(scored, axis=1).astype(jnp.float32)),
      scored_upto=put(state.scored_upto, jnp.maximum(pick(state.scored_upto), start + reached)),
      synced=put(state.synced, valid))


def _probe(spec, drafters: _Drafters, costs, state, choice, active, due, turn_offset):
  """On a probe round, each drafter the Hedge weights track (weight >= track_threshold), and one
  more in turn (from a random drafter per row, `turn_offset`: over queries every drafter is
  seen), reads what it missed and is scored on it (the drafter that drafted is current)."""
  every = max(spec.rule.probe_every, 1)
  weights = jax.nn.softmax(state.log_weights, axis=1)
  running = active & ~state.base.done
  turn = (state.base.target_calls // every + turn_offset) % spec.num_drafters
  history = _History.of(state)

  def probe(views):
    views = list(views)
    for k in range(spec.num_drafters):
      if k:  # the cost column runs through every drafter's reads in turn
        views[k] = views[k].replace(cost=views[k - 1].cost)
      rows = running & (choice != k + 1) & (
          (weights[:, k + 1] >= spec.rule.track_threshold) | (turn == k))
      views[k] = _prepared(spec, k, drafters, views[k], jnp.any(rows))
      start = read_start(views[k], history.num_generated)
      far = jnp.any(rows & (history.num_generated - start >= spec.read_width))
      for wanted, width in ((~far, spec.read_width), (far, None)):
        views[k] = _when(jnp.any(rows) & wanted, lambda v, width=width, k=k, rows=rows: _read(
            spec, k, drafters.params[k], costs, history, v, rows, width)[0], views[k])
    return tuple(views)

  views = _when(due, probe, tuple(_view(state, k) for k in range(spec.num_drafters)))
  for k, view in enumerate(views):
    state = _with_view(state, k, view.replace(cost=views[-1].cost))
  return state


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
def summarize(spec: AdaptiveSpec, state: AdaptiveState, costs, prior, embeddings) -> jax.Array:
  """The final state as one int32 [B, W] array (float columns bit-cast): one transfer.

  Columns: `loop.summarize` (gamma width max_gamma), round_options [R], round_gammas [R],
  drafted_by [K+1], accepted_by [K+1], then float32 bits: cost [1], acceptance [K] (hindsight,
  nan where never scored), hindsight_values [K+1], prior [K+1], embeddings [D].
  """
  _, _, verify_costs = _costs(spec, costs)
  step_costs = costs[:spec.num_drafters]
  total_score, total_count = (jnp.stack(v, axis=1) for v in (state.total_score, state.total_count))
  scored = total_count > 0
  acceptance = jnp.where(scored, total_score / jnp.maximum(total_count, 1.0), jnp.nan)
  values, _ = adaptive_rule.option_values(jnp.where(scored, acceptance, 0.0), step_costs,
                                          verify_costs)
  values = values.at[:, 1:].set(jnp.where(scored, values[:, 1:], jnp.nan))
  floats = jnp.concatenate([state.cost[:, None], acceptance, values, prior, embeddings], axis=1)
  ints = jnp.concatenate([loop.summarize(spec.base, state.base), state.round_options,
                          state.round_gammas, state.drafted_by, state.accepted_by], axis=1)
  return jnp.concatenate([ints, jax.lax.bitcast_convert_type(floats.astype(jnp.float32),
                                                             jnp.int32)], axis=1)
