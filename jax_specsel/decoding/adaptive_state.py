"""The adaptive loop's types: its static spec, its while_loop carry, what the host reads of it, the
randomness drawn up front, and the flat cost array split by kind."""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import struct

from jax_specsel.decoding import adaptive_rule, loop_state
from jax_specsel.decoding.adaptive_drafters import DrafterState, History
from jax_specsel.models.interface import Decoder


@dataclasses.dataclass(frozen=True)
class AdaptiveSpec:
  """Everything static about an adaptive generation (a jit compile-time constant).

  Attributes:
    base: the loop's LoopSpec with gamma = max_gamma and no drafter (emission, stop ids, sizes).
    drafters: the K drafters' decoders.
    rule: the per-round rule's settings.
    policy: the offline policy's program (the prior), or None for a uniform prior.
  """

  base: loop_state.LoopSpec
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
    """Tokens of a catch-up read after rounds a drafter sat out (the unit its cost is measured in)."""
    return 2 * (self.max_gamma + 1)

  @property
  def read_widths(self) -> tuple[int | None, ...]:
    """The widths a read may take, narrowest first: the two tokens of a draft step, one and two
    catch-up blocks, and None, the whole history from its start (for the longest gaps). A read
    runs at the narrowest that covers its rows' gaps: its cost grows with its width."""
    return (2, self.read_width, 2 * self.read_width, None)


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
    probe_at: int32 [B] the round count from which the row's next probe is due (`probe_schedule`).
    probe_gap: int32 [B] rounds from the row's last probe to its next
      (`adaptive_rule.next_probe_gap`; `probe_every` before any probe).
    probes: int32 [B] probes run on the row so far (which drafter the next reads in turn).
  """

  base: loop_state.LoopState
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
  probe_at: jax.Array
  probe_gap: jax.Array
  probes: jax.Array


@struct.dataclass
class AdaptiveSummary:
  """What the host reads of a finished adaptive generation (see `AdaptiveOutput` for meanings).

  A pytree of arrays: `summarize` builds it on the device; it crosses to the host packed into one
  array (`transfer.Packed`).
  """

  base: loop_state.Summary  # accepted_at as wide as max_gamma
  round_options: jax.Array  # int32 [B, max_rounds]
  round_gammas: jax.Array  # int32 [B, max_rounds]
  drafted_by: jax.Array  # int32 [B, K + 1]
  accepted_by: jax.Array  # int32 [B, K + 1]
  cost: jax.Array  # float32 [B]
  acceptance: jax.Array  # float32 [B, K] hindsight, nan where never scored
  hindsight_values: jax.Array  # float32 [B, K + 1]
  prior: jax.Array  # float32 [B, K + 1]
  embeddings: jax.Array  # float32 [B, D]


@struct.dataclass
class Draws:
  """The rule's randomness, drawn before the first round."""

  uniforms: jax.Array  # float32 [max_rounds + 1, B]: each round's Hedge draw
  turn_offset: jax.Array  # int32 [B]: the drafter a row's first probe reads in turn


@struct.dataclass
class DrafterInputs:
  """What every round reads about the drafters: their params and the prompt of their first pass."""

  params: tuple
  ids: jax.Array  # int32 [B, S]
  mask: jax.Array  # int32 [B, S]


class Verified(NamedTuple):
  """A round's choice and what its verification decided, per row: what the round's bookkeeping
  and feedback read."""

  choice: jax.Array  # int32 [B] the option each row chose (0: autoregressive)
  gamma: jax.Array  # int32 [B] its draft length (0 on done rows)
  drafts: jax.Array  # int32 [B, G], zeros for autoregressive rows
  draft_logprobs: Any  # float32 [B, G, V] log q, or None when greedy
  num_accepted: jax.Array  # int32 [B]
  next_token: jax.Array  # int32 [B]
  target_logprobs: Any  # float32 [B, G + 1, V] the target's log p, or None when greedy


def split_costs(spec: AdaptiveSpec, costs):
  """(step [K], read [K], verify [G + 1]) from the flat cost array; verify[g] is the cost of the
  call a round with gamma g runs (`verify_widths`)."""
  k = spec.num_drafters
  verify = costs[2 * k :]
  return costs[:k], costs[k : 2 * k], verify[jnp.asarray(verify_widths(spec.max_gamma))]


def history_of(state: AdaptiveState) -> History:
  """Row b's decoder history so far (see `AdaptiveState`)."""
  return History(
      sequence=jnp.concatenate([state.origin_token[:, None], state.base.tokens], axis=1),
      origin_position=state.origin_position,
      num_generated=state.base.num_generated,
      emitted_logp=state.emitted_logp,
  )


def verify_widths(max_gamma: int) -> tuple[int, ...]:
  """The drafts a verify call scores for each gamma 0..G: 0, then the two widths a round can
  run (half and full: a third would be a conditional with three branches, see `control`)."""
  half = (max_gamma + 1) // 2
  return tuple(0 if g == 0 else half if g <= half else max_gamma for g in range(max_gamma + 1))
