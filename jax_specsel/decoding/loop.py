"""The whole generation as one `lax.while_loop`: autoregressive (gamma = 0) and speculative rounds.

One round, per batch row:
  1. the drafter catches up on [previous, pending] at positions position-1, position (its cache
     may lack the last accepted draft), then proposes gamma tokens x_1..x_gamma;
  2. the target scores [pending, x_1..x_gamma] in one `decode` call at `position`;
  3. accept a prefix of n drafts and draw one more token (correction or bonus);
  4. emit x_1..x_n and that token; it becomes the new `pending` at position + n + 1.
With no drafter (gamma = 0) step 2 scores [pending] alone and step 3 draws the next token: plain
autoregressive decoding through the same machinery. Caches are indexed by absolute position, so
rejected drafts need no rollback: the next round overwrites them.

The steps are public so that every loop is built from them (`decode_round` here, the adaptive
loop's rounds): `round_keys`, `draft` (catch-up and `propose`), `verify`, `accept`,
`emitted_block` and `advance`. The loop's types (`LoopSpec`, `LoopState`, `Summary`) are in
`loop_state`.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from jax_specsel.decoding import sampling
from jax_specsel.decoding.loop_state import LoopSpec, LoopState, initial_state
from jax_specsel.models.attention import write_at_positions
from jax_specsel.models.interface import Decoder


def run(spec: LoopSpec, target_params, drafter_params, prompt_ids, prompt_mask, key):
  """Generates for a right-padded prompt batch; jit this with `spec` static.

  Args:
    spec: the static LoopSpec.
    target_params, drafter_params: nnx.State weights (drafter_params None without a drafter).
    prompt_ids: int32 [B, S] right-padded prompts; prompt_mask: int32 [B, S], 1 on real tokens.
    key: PRNG key.

  Returns:
    The final LoopState.
  """
  target_context, target_cache = prepare_target(
      spec, target_params, prompt_ids, prompt_mask, spec.cache_length(prompt_ids.shape[1])
  )
  return decode_prepared(
      spec,
      target_params,
      drafter_params,
      target_context,
      target_cache,
      prompt_ids,
      prompt_mask,
      key,
  )


def prepare_target(spec: LoopSpec, target_params, prompt_ids, prompt_mask, cache_length: int):
  """The target's first pass (T5 encoder, LLaMA prefill): (context, cache of `cache_length`)."""
  cache = spec.target.init_cache(target_params, prompt_ids.shape[0], cache_length)
  return spec.target.prepare(target_params, prompt_ids, prompt_mask, cache)


def fit_cache(spec: LoopSpec, target_params, cache, batch: int, length: int):
  """`cache` (from `prepare_target`, possibly longer) cut to `length` positions: the cache this
  loop would have prepared itself.

  A loop's per-step attention and position-bias work grows with its cache's length, so a loop
  handed a longer cache than it needs (the selected program prepares one cache for every option,
  as long as the longest needs) pays for positions it never reads. Caches hold K/V by
  absolute position (the decoder protocol, models/interface.py), so the first `length` positions
  are the shorter cache, entry for entry. Each leaf is cut to the shape `init_cache` gives it at
  `length` (no layout assumed beyond "a prefix"); a T5 cache, zeros the encoder pass left
  untouched, costs nothing to cut (XLA makes the smaller zeros directly).
  """
  wanted = jax.eval_shape(
      lambda params: spec.target.init_cache(params, batch, length), target_params
  )
  if jax.tree.structure(wanted) != jax.tree.structure(cache):
    raise ValueError("fit_cache: the cache's structure differs from init_cache's at that length.")
  return jax.tree.map(
      lambda leaf, shape: leaf
      if leaf.shape == shape.shape
      else jax.lax.slice(leaf, (0,) * leaf.ndim, shape.shape),
      cache,
      wanted,
  )


def decode_prepared(
    spec: LoopSpec,
    target_params,
    drafter_params,
    target_context,
    target_cache,
    prompt_ids,
    prompt_mask,
    key,
    active=None,
) -> LoopState:
  """The while_loop over rounds, starting from the target's first pass (`prepare_target`).

  Args:
    spec, target_params, drafter_params, prompt_ids, prompt_mask, key: as for `run`.
    target_context, target_cache: from `prepare_target`, the cache at least
      `spec.cache_length(S)` long.
    active: optional bool [B]: the rows to decode; the others start done and stay untouched.

  Returns:
    The final LoopState.
  """
  state, drafter_context = start(
      spec, drafter_params, target_cache, prompt_ids, prompt_mask, key, active
  )

  def body(state):
    return decode_round(spec, target_params, drafter_params, target_context, drafter_context, state)

  return jax.lax.while_loop(lambda s: ~jnp.all(s.done), body, state)


def repeat_rounds(
    spec: LoopSpec, count: int, target_params, drafter_params, prompt_ids, prompt_mask, key
):
  """A timing harness: `count` rounds, each from the first round's position (jit with spec, count
  static). Caches and weights stay warm and nothing is dispatched per round, so the time over
  `count` is the pure cost of one round; the tokens it leaves are meaningless."""
  target_context, target_cache = prepare_target(
      spec, target_params, prompt_ids, prompt_mask, spec.cache_length(prompt_ids.shape[1])
  )
  state, drafter_context = start(spec, drafter_params, target_cache, prompt_ids, prompt_mask, key)

  def body(_, current):
    after = decode_round(
        spec, target_params, drafter_params, target_context, drafter_context, current
    )
    return after.replace(
        position=state.position,
        previous=state.previous,
        num_generated=state.num_generated,
        done=state.done,
    )

  return jax.lax.fori_loop(0, count, body, state)


def start(
    spec: LoopSpec, drafter_params, target_cache, prompt_ids, prompt_mask, key, active=None
) -> tuple[LoopState, Any]:
  """The drafter's first pass and the state before the first round.

  Args:
    spec, drafter_params, prompt_ids, prompt_mask, key: as for `run`.
    target_cache: the target's cache from `prepare_target`.
    active: optional bool [B]: the rows to decode; the others start done.

  Returns:
    (LoopState, the drafter's context: None without a drafter).
  """
  drafter_context = drafter_cache = None
  if spec.drafter is not None:
    drafter_cache = spec.drafter.init_cache(
        drafter_params, prompt_ids.shape[0], spec.cache_length(prompt_ids.shape[1])
    )
    drafter_context, drafter_cache = spec.drafter.prepare(
        drafter_params, prompt_ids, prompt_mask, drafter_cache
    )
  state = initial_state(spec, prompt_ids, prompt_mask, target_cache, drafter_cache, key)
  if active is not None:
    state = state.replace(done=~active)
  return state, drafter_context


def decode_round(
    spec: LoopSpec, target_params, drafter_params, target_context, drafter_context, state: LoopState
) -> LoopState:
  """One round: draft (with a drafter), verify, accept, advance."""
  key, draft_key, accept_key = round_keys(spec.settings, state.key)
  draft_tokens = draft_logprobs = None
  drafter_cache = state.drafter_cache
  if spec.gamma:
    draft_tokens, draft_logprobs, drafter_cache = draft(
        spec, drafter_params, drafter_context, state, draft_key
    )
  target_logits, target_cache = verify(spec, target_params, target_context, state, draft_tokens)
  num_accepted, next_token, _ = accept(
      spec.settings, draft_tokens, draft_logprobs, target_logits, accept_key
  )
  return advance(
      spec, state, draft_tokens, num_accepted, next_token, target_cache, drafter_cache, key
  )


def round_keys(settings: sampling.SamplingSettings, key: jax.Array):
  """(next round's key, drafting key, acceptance key); greedy rounds draw nothing, so the key is
  passed on unsplit (a split is a few dozen ops a round)."""
  if settings.greedy:
    return key, key, key
  return tuple(jax.random.split(key, 3))


def draft(spec: LoopSpec, drafter_params, drafter_context, state: LoopState, key):
  """The drafter catches up on [previous, pending], then proposes spec.gamma tokens.

  Returns:
    (tokens int32 [B, gamma], log q float32 [B, gamma, V] or None when greedy, drafter cache).
  """
  catch_up = jnp.stack([state.previous, state.pending], axis=1)
  logits, cache = spec.drafter.decode(
      drafter_params, catch_up, state.position - 1, state.drafter_cache, drafter_context
  )
  return propose(
      spec.settings,
      spec.drafter,
      drafter_params,
      drafter_context,
      cache,
      on_target_vocab(logits[:, -1], spec.target_vocab),
      state.position,
      key,
      spec.gamma,
      spec.gamma,
  )


def propose(
    settings: sampling.SamplingSettings,
    drafter: Decoder,
    params,
    context,
    cache,
    first_logits,
    position,
    key,
    count,
    width: int,
):
  """`count` draft tokens (a Python int, or traced and <= width): the first drawn from
  `first_logits` (the drafter's logits at `pending`), each further one from a decode step.

  Args:
    first_logits: float [B, V] on the target's ids (`on_target_vocab`).
    position: int32 [B] the position of `pending`; draft i is fed back at position + i.
    key: the drafting key, split into `width` keys: draft i draws with key i.
    width: the static number of draft slots; slots past `count` stay zero.

  Returns:
    (tokens int32 [B, width], log q float32 [B, width, V] or None when greedy, drafter cache).
  """
  keys = (
      jnp.broadcast_to(key, (width, *key.shape))
      if settings.greedy
      else jax.random.split(key, width)
  )
  batch, vocab = first_logits.shape
  first, first_logprobs = sampling.sample_token(first_logits, settings, keys[0])
  tokens = jnp.zeros((batch, width), jnp.int32).at[:, 0].set(first)
  logprobs = None
  if not settings.greedy:
    logprobs = jnp.zeros((batch, width, vocab), jnp.float32).at[:, 0].set(first_logprobs)

  def step(i, carry):
    cache, tokens, logprobs = carry
    logits, cache = drafter.decode(params, tokens[:, i - 1][:, None], position + i, cache, context)
    token, token_logprobs = sampling.sample_token(
        on_target_vocab(logits[:, 0], vocab), settings, keys[i]
    )
    tokens = tokens.at[:, i].set(token)
    if logprobs is not None:
      logprobs = logprobs.at[:, i].set(token_logprobs)
    return cache, tokens, logprobs

  cache, tokens, logprobs = jax.lax.fori_loop(1, count, step, (cache, tokens, logprobs))
  return tokens, logprobs, cache


def on_target_vocab(logits: jax.Array, vocab: int) -> jax.Array:
  """Drafter logits [..., Vd] on the target's ids [..., V]: vocabularies may differ by padding
  rows (T5: 32100 vs 32128)."""
  width = logits.shape[-1]
  if width >= vocab:
    return logits[..., :vocab]
  fill = jnp.full((*logits.shape[:-1], vocab - width), -jnp.inf, logits.dtype)
  return jnp.concatenate([logits, fill], axis=-1)


def verify(spec: LoopSpec, target_params, target_context, state: LoopState, draft_tokens):
  """The target over the block [pending, draft_tokens] (draft_tokens None: [pending] alone) at
  `state.position`: (logits [B, 1 + drafts, V], target cache)."""
  block = state.pending[:, None]
  if draft_tokens is not None:
    block = jnp.concatenate([block, draft_tokens], axis=1)
  return spec.target.decode(
      target_params, block, state.position, state.target_cache, target_context
  )


def accept(
    settings: sampling.SamplingSettings,
    draft_tokens,
    draft_logprobs,
    target_logits,
    key,
    num_drafted=None,
):
  """The round's acceptance: (num_accepted int32 [B], next_token int32 [B], the target's
  processed log p [B, G + 1, V], or None when greedy or without drafts).

  Without drafts (draft_tokens None) the next token is drawn from the target alone; with them,
  `sampling.greedy_accept` or `sampling.speculative_accept` (see there for `num_drafted`).
  """
  if draft_tokens is None:
    token, _ = sampling.sample_token(target_logits[:, 0], settings, key)
    return jnp.zeros((target_logits.shape[0],), jnp.int32), token, None
  if settings.greedy:
    return (*sampling.greedy_accept(draft_tokens, target_logits, num_drafted), None)
  target_logprobs = sampling.process_logits(target_logits, settings)
  num_accepted, next_token = sampling.speculative_accept(
      draft_tokens, draft_logprobs, target_logprobs, key, num_drafted
  )
  return num_accepted, next_token, target_logprobs


def emitted_block(draft_tokens, num_accepted, next_token) -> jax.Array:
  """int32 [B, G + 1]: the round's tokens, x_1..x_n then next_token in the slots after (only the
  first num_accepted + 1 are emitted); [B, 1] without drafts."""
  if draft_tokens is None:
    return next_token[:, None]
  slots = jnp.arange(draft_tokens.shape[1] + 1)[None, :]
  drafted = jnp.concatenate([draft_tokens, next_token[:, None]], axis=1)
  return jnp.where(slots < num_accepted[:, None], drafted, next_token[:, None])


def advance(
    spec: LoopSpec,
    state: LoopState,
    draft_tokens,
    num_accepted,
    next_token,
    target_cache,
    drafter_cache,
    key,
) -> LoopState:
  """Emits x_1..x_n + next_token per active row, stops rows at a stop id or max_new_tokens, and
  updates the counters (done rows keep everything)."""
  gamma, active = spec.gamma, ~state.done
  slots = jnp.arange(gamma + 1)[None, :]  # [1, G+1]
  emitted = emitted_block(draft_tokens, num_accepted, next_token)
  is_stop = jnp.zeros(emitted.shape, bool)
  for stop_id in spec.eos_ids:  # static: usually one id, several for chat models, none for some
    is_stop = is_stop | (emitted == stop_id)
  is_eos = is_stop & (slots <= num_accepted[:, None])
  first_eos = jnp.where(jnp.any(is_eos, 1), jnp.argmax(is_eos, 1), gamma + 1)
  room = spec.max_new_tokens - state.num_generated
  kept = jnp.minimum(jnp.minimum(num_accepted + 1, first_eos + 1), room)
  finished = (first_eos <= num_accepted) | (kept >= room)
  tokens = write_at_positions(state.tokens, emitted, state.num_generated)
  if gamma:
    previous = jnp.where(
        num_accepted > 0,
        jnp.take_along_axis(draft_tokens, jnp.maximum(num_accepted - 1, 0)[:, None], axis=1)[:, 0],
        state.pending,
    )
    accepted_at = state.accepted_at + ((slots[:, :gamma] < num_accepted[:, None]) & active[:, None])
  else:
    previous, accepted_at = state.pending, state.accepted_at
  keep = lambda new, old: jnp.where(active, new, old)
  return LoopState(
      tokens=jnp.where(active[:, None], tokens, state.tokens),
      num_generated=keep(state.num_generated + kept, state.num_generated),
      pending=keep(next_token, state.pending),
      position=keep(state.position + num_accepted + 1, state.position),
      previous=keep(previous, state.previous),
      done=state.done | finished,
      target_cache=target_cache,
      drafter_cache=drafter_cache,
      key=key,
      rounds=state.rounds + active,
      accepted=state.accepted + num_accepted * active,
      accepted_at=accepted_at.astype(jnp.int32),
      target_calls=state.target_calls + 1,
  )
