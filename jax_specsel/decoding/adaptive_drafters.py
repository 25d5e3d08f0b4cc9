"""What the adaptive loop keeps per drafter, and the passes that score a drafter.

A drafter is scored on a token by its logits at the position before it: a read (the drafter
decoding a block of the emitted history) scores it on every token of the block it had not been
scored on, and a verification scores the drafter that drafted on the positions it drafted.
Scores feed `adaptive_rule`'s acceptance estimates.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

from jax_specsel.decoding import adaptive_rule, loop, sampling
from jax_specsel.decoding.control import when
from jax_specsel.models.interface import Decoder


@struct.dataclass
class DrafterRecord:
  """Per row, how far one drafter is in step with the history and how well it predicts it.

  Every field is [B]; history indices are as in `History`. A read stops at `pending`, whose
  successor is not known yet, so it leaves `synced` one past `scored_upto`; the next read starts
  at the smaller of the two (`read_start`). Rows of a batch read together, so a row may be read
  (and its cache kept valid) when it did not ask.

  Attributes:
    synced: int32 history index up to which (exclusive) the drafter's cache is valid.
    scored_upto: int32 the drafter has been scored on tokens[:, :scored_upto].
    score_sum, score_count: float32 discounted acceptance scores (`adaptive_rule.add_scores`).
    total_score, total_count: float32 the same, undiscounted: the hindsight acceptance.
  """

  synced: jax.Array
  scored_upto: jax.Array
  score_sum: jax.Array
  score_count: jax.Array
  total_score: jax.Array
  total_count: jax.Array

  @classmethod
  def zeros(cls, batch: int) -> "DrafterRecord":
    ints, floats = jnp.zeros((batch,), jnp.int32), jnp.zeros((batch,), jnp.float32)
    return cls(
        synced=ints,
        scored_upto=ints,
        score_sum=floats,
        score_count=floats,
        total_score=floats,
        total_count=floats,
    )


@struct.dataclass
class DrafterState:
  """One drafter in the adaptive loop: its buffers and its record.

  Its first pass over the prompt (T5 encoder / prefill) waits for its first read, so a drafter
  never chosen nor probed costs nothing: until then `prepared` is False and `context` holds
  zeros of the right shapes. The cache holds K/V by absolute position like the target's; entries
  at or past `record.synced` (per row) are stale and never read before they are overwritten.

  Attributes:
    cache: the drafter's K/V buffers [B, ...].
    context: the drafter's first-pass context (T5: encoder states and cross K/V).
    prepared: bool [] the first pass has run (`context` and `cache` are real).
    record: the per-row `DrafterRecord`.
  """

  cache: Any
  context: Any
  prepared: jax.Array
  record: DrafterRecord


@struct.dataclass
class History:
  """The decoder history a read takes its blocks from, read-only.

  History index i is the token at origin_position + i: [origin_token, tokens...], so token index
  j (tokens[:, j], what the loop emitted) is history index j + 1 and `pending` is
  history[num_generated].
  """

  sequence: jax.Array  # int32 [B, H]: [origin_token, tokens...]
  origin_position: jax.Array  # int32 [B]
  num_generated: jax.Array  # int32 [B]
  emitted_logp: jax.Array  # float32 [B, H - 1]: the target's log p of each emitted token


def prepared(
    decoder: Decoder, params, ids, mask, drafter: DrafterState, wanted=True
) -> DrafterState:
  """The drafter after its first pass over the prompt `ids`, `mask` [B, S], run once: where the
  scalar `wanted` holds and the pass has not run yet."""

  def prepare(drafter):
    context, cache = decoder.prepare(params, ids, mask, drafter.cache)
    return drafter.replace(context=context, cache=cache, prepared=jnp.ones((), bool))

  return when(jnp.asarray(wanted) & ~drafter.prepared, prepare, drafter)


def read_start(record: DrafterRecord, num_generated: jax.Array) -> jax.Array:
  """int32 [B]: the history index a read of the drafter starts at.

  Token index j is scored by the drafter's logits at history index j, which a read computes only
  while that index is in its block. The last read stopped at `pending`, whose successor was not
  known yet: the next read must start there again (`scored_upto`), not after it (`synced`), or
  the token emitted after every read is never scored (a drafter read every round would then be
  scored on nothing while the rounds emit one token each).
  """
  return jnp.minimum(jnp.minimum(record.synced, record.scored_upto), num_generated)


def read(
    decoder: Decoder,
    params,
    settings: sampling.SamplingSettings,
    vocab: int,
    rule: adaptive_rule.RuleSettings,
    history: History,
    drafter: DrafterState,
    width: int,
    from_origin: bool = False,
):
  """The drafter reads history[start : start + width] at its absolute positions and is scored
  on every token of it that it had not been scored on.

  start is `read_start` (where its cache stops being valid, or one earlier where the logits that
  score its first unscored token are needed again), or 0 with `from_origin` (the whole history).
  Every row of the batch is read: rows that did not ask merely get valid K/V a little further.

  Returns:
    (the drafter with its cache and record updated, its logits at `pending` float32 [B, V]:
    meaningful where the read reached `pending`).
  """
  record, num_generated = drafter.record, history.num_generated
  start = jnp.zeros_like(num_generated) if from_origin else read_start(record, num_generated)
  sequence = history.sequence
  last = sequence.shape[1] - 1
  index = start[:, None] + jnp.arange(width)[None, :]  # history index of each slot
  block = jnp.take_along_axis(sequence, jnp.minimum(index, last), axis=1)
  logits, cache = decoder.decode(
      params, block, history.origin_position + start, drafter.cache, drafter.context
  )
  logits = loop.on_target_vocab(logits, vocab).astype(jnp.float32)  # [B, W, V]
  first = jnp.take_along_axis(
      logits, jnp.clip(num_generated - start, 0, width - 1)[:, None, None], axis=1
  )[:, 0]
  # Slot j predicts history index + 1, i.e. token index `index`.
  predicted = jnp.take_along_axis(sequence, jnp.minimum(index + 1, last), axis=1)
  scored = (index >= record.scored_upto[:, None]) & (index < num_generated[:, None])
  if settings.greedy:
    scores = (jnp.argmax(logits, axis=-1) == predicted).astype(jnp.float32)
  else:
    logq = jnp.take_along_axis(
        sampling.process_logits(logits, settings), predicted[..., None], axis=-1
    )[..., 0]
    logp = jnp.take_along_axis(history.emitted_logp, jnp.minimum(index, last - 1), axis=1)
    scores = jnp.exp(jnp.minimum(logq - logp, 0.0))
  score_sum, score_count = adaptive_rule.add_scores(
      record.score_sum, record.score_count, scores, scored, rule
  )
  reached = jnp.minimum(start + width, num_generated + 1)
  record = record.replace(
      synced=jnp.maximum(record.synced, reached),
      scored_upto=jnp.maximum(record.scored_upto, jnp.minimum(num_generated, start + width)),
      score_sum=score_sum,
      score_count=score_count,
      total_score=record.total_score + jnp.sum(jnp.where(scored, scores, 0.0), axis=1),
      total_count=record.total_count + jnp.sum(scored, axis=1).astype(jnp.float32),
  )
  return drafter.replace(cache=cache, record=record), first


def score_drafted(
    records: tuple[DrafterRecord, ...],
    rule: adaptive_rule.RuleSettings,
    start,
    choice,
    gamma,
    num_accepted,
    drafts,
    draft_logprobs,
    target_logprobs,
    active,
) -> tuple[DrafterRecord, ...]:
  """The records after the verification scores the drafter that drafted, on each position it drafted up to the
  first rejection (greedy: 1 accepted, 0 rejected; sampling: min(1, p(x) / q(x)), x ~ q), and
  says how far its cache is valid: through its last accepted draft it was fed.

  Args:
    start: int32 [B] num_generated before the round (the old pending's history index).
    choice, gamma, num_accepted: int32 [B] the round's option (k + 1: drafter k), gamma, result.
    drafts: int32 [B, G]; draft_logprobs, target_logprobs: the round's log q and log p (None
      when greedy).
  """
  chosen = active & (choice > 0)
  slots = jnp.arange(drafts.shape[1])[None, :]
  reached = jnp.minimum(num_accepted + 1, gamma)
  scored = chosen[:, None] & (slots < reached[:, None])
  if target_logprobs is None:
    scores = (slots < num_accepted[:, None]).astype(jnp.float32)
  else:
    pick = lambda logprobs: jnp.take_along_axis(logprobs, drafts[..., None], axis=-1)[..., 0]
    scores = jnp.exp(
        jnp.minimum(pick(target_logprobs[:, : drafts.shape[1]]) - pick(draft_logprobs), 0.0)
    )
  # Each row's record is its chosen drafter's: gathered, updated once, scattered back.
  rows = [chosen & (choice == k + 1) for k in range(len(records))]
  old = jax.tree.map(
      lambda *values: sum(jnp.where(r, v, 0) for r, v in zip(rows, values)), *records
  )
  score_sum, score_count = adaptive_rule.add_scores(
      old.score_sum, old.score_count, scores, scored, rule
  )
  new = old.replace(
      score_sum=score_sum,
      score_count=score_count,
      total_score=old.total_score + jnp.sum(jnp.where(scored, scores, 0.0), axis=1),
      total_count=old.total_count + jnp.sum(scored, axis=1).astype(jnp.float32),
      scored_upto=jnp.maximum(old.scored_upto, start + reached),
      synced=start + 1 + jnp.minimum(num_accepted, jnp.maximum(gamma - 1, 0)),
  )
  return tuple(
      jax.tree.map(lambda n, o, r=r: jnp.where(r, n, o), new, record)
      for r, record in zip(rows, records)
  )
