"""The loop's types: its static spec (`LoopSpec`), its while_loop carry (`LoopState`), the state
before the first round, and what the host reads of a finished loop (`Summary`)."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

from jax_specsel.decoding import sampling
from jax_specsel.models.interface import Decoder


@dataclasses.dataclass(frozen=True)
class LoopSpec:
  """Everything static about a generation call (a jit compile-time constant)."""

  target: Decoder
  drafter: Decoder | None
  gamma: int  # 0 when there is no drafter
  settings: sampling.SamplingSettings
  max_new_tokens: int
  is_encoder_decoder: bool
  eos_ids: tuple[int, ...]  # the target's stop ids; () never stops before max_new_tokens
  pad_id: int
  start_id: int  # T5 decoder start token; unused for decoder-only models
  target_vocab: int

  def cache_length(self, prompt_length: int) -> int:
    """Room for the prompt (decoder-only), every emitted token and one over-long verify block."""
    prompt_part = 0 if self.is_encoder_decoder else prompt_length
    return prompt_part + self.max_new_tokens + self.gamma + 2


@struct.dataclass
class LoopState:
  """The while_loop's carry: one generation in progress, B rows decoded side by side.

  Row b has emitted `num_generated[b]` tokens. Its last emitted token (before the first round: the
  T5 decoder start token, or the last prompt token of a decoder-only model) is `pending[b]`, at
  absolute position `position[b]`; the next round scores it first, writing its K/V into the
  target's cache (a decoder-only prompt's last token is there already from the prefill: the first
  round writes the same K/V again). `previous[b]` is the token at `position[b] - 1`: the drafter
  re-reads [previous, pending] every round (its two-token catch-up) because when a round accepts
  every draft the drafter never ran on its own last draft, which is `previous` then; re-writing a
  position it already holds is harmless, and every round keeps one shape.

  Attributes:
    tokens: int32 [B, max_new_tokens + gamma + 1] emitted ids; entries at or past
      `num_generated[b]` are garbage (a round writes its whole block; the counters say what counts).
    num_generated: int32 [B] tokens emitted per row (EOS included), at most max_new_tokens.
    pending: int32 [B] the last emitted token, scored next (meaningless once the row is done).
    position: int32 [B] absolute position of `pending`.
    previous: int32 [B] the token at `position - 1` (pad before the first decoder position).
    done: bool [B] the row emitted EOS, reached max_new_tokens, or does not take part (a row that
      chose another option in a selected batch). A done row's tokens, counters and positions never
      change again; the batched decode calls still write its cache at its frozen position (never
      read).
    target_cache, drafter_cache: K/V buffers by absolute position (`drafter_cache` None without a
      drafter); entries at or past a row's `position` are stale drafts or prompt padding, never
      read before they are overwritten.
    key: the PRNG key of the next round.
    rounds: int32 [B] rounds this row took part in.
    accepted: int32 [B] accepted draft tokens (paper A.6: a rejection rejects the rest).
    accepted_at: int32 [B, gamma] rounds in which draft position i was accepted.
    target_calls: int32 [] target decode calls (one per round for the whole batch).
  """

  tokens: jax.Array
  num_generated: jax.Array
  pending: jax.Array
  position: jax.Array
  previous: jax.Array
  done: jax.Array
  target_cache: Any
  drafter_cache: Any
  key: jax.Array
  rounds: jax.Array
  accepted: jax.Array
  accepted_at: jax.Array
  target_calls: jax.Array


def initial_state(spec, prompt_ids, prompt_mask, target_cache, drafter_cache, key) -> LoopState:
  """The LoopState before the first round (all rows active), holding the caches as given."""
  batch = prompt_ids.shape[0]
  zeros = jnp.zeros((batch,), jnp.int32)
  if spec.is_encoder_decoder:
    pending = jnp.full((batch,), spec.start_id, jnp.int32)
    position, previous = zeros, jnp.full((batch,), spec.pad_id, jnp.int32)
  else:  # the first round re-feeds the last prompt token (its K/V is written twice)
    last = jnp.sum(prompt_mask, axis=1).astype(jnp.int32) - 1
    pending = jnp.take_along_axis(prompt_ids, last[:, None], axis=1)[:, 0]
    before_last = jnp.take_along_axis(prompt_ids, jnp.maximum(last - 1, 0)[:, None], axis=1)[:, 0]
    position, previous = last, jnp.where(last > 0, before_last, spec.pad_id)
  return LoopState(
      tokens=jnp.full((batch, spec.max_new_tokens + spec.gamma + 1), spec.pad_id, jnp.int32),
      num_generated=zeros,
      pending=pending,
      position=position,
      previous=previous,
      done=jnp.zeros((batch,), bool),
      target_cache=target_cache,
      drafter_cache=drafter_cache,
      key=key,
      rounds=zeros,
      accepted=zeros,
      accepted_at=jnp.zeros((batch, spec.gamma), jnp.int32),
      target_calls=jnp.zeros((), jnp.int32),
  )


@struct.dataclass
class Summary:
  """What the host reads of a finished generation, one row per batch row (caches stay behind).

  A pytree of arrays: `summarize` builds it on the device; it crosses to the host packed into one
  array (`transfer.Packed`).
  """

  tokens: jax.Array  # int32 [B, max_new_tokens], pad after each row's length
  lengths: jax.Array  # int32 [B] tokens generated (EOS included when emitted)
  rounds: jax.Array  # int32 [B]
  accepted: jax.Array  # int32 [B]
  target_calls: jax.Array  # int32 [B] target calls of the loop that decoded the row
  accepted_at: jax.Array  # int32 [B, gamma_width], zeros past the loop's gamma


def summarize(spec: LoopSpec, state: LoopState, gamma_width: int | None = None) -> Summary:
  """The final state's `Summary`; accepted_at is widened to `gamma_width` (default spec.gamma)."""
  gamma_width = spec.gamma if gamma_width is None else gamma_width
  batch = state.tokens.shape[0]
  emitted = jnp.arange(spec.max_new_tokens)[None, :] < state.num_generated[:, None]
  return Summary(
      tokens=jnp.where(emitted, state.tokens[:, : spec.max_new_tokens], spec.pad_id),
      lengths=state.num_generated,
      rounds=state.rounds,
      accepted=state.accepted,
      target_calls=jnp.broadcast_to(state.target_calls, (batch,)),
      accepted_at=jnp.pad(state.accepted_at, ((0, 0), (0, gamma_width - spec.gamma))),
  )
