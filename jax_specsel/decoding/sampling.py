"""The sampling math of speculative decoding, as pure functions on logits.

Leviathan et al. 2023 / Chen et al. 2023: accept draft token x_i while
u_i < min(1, p_i(x_i) / q_i(x_i)); at the first rejection n sample from
normalize(max(0, p_n - q_n)); when all gamma drafts are accepted, sample the bonus token from
p_(gamma+1). Greedy mode accepts while the target's argmax equals the draft. The drafter must
sample from q processed exactly as p is (temperature, top-k, top-p), or the output distribution
is wrong (HF PR #28166).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class SamplingSettings:
  """How logits become a distribution. temperature == 0 means greedy (argmax)."""

  temperature: float = 0.0
  top_k: int = 0  # 0: no top-k filter
  top_p: float = 1.0  # 1.0: no nucleus filter

  @property
  def greedy(self) -> bool:
    return self.temperature == 0.0


def process_logits(logits: jax.Array, settings: SamplingSettings) -> jax.Array:
  """Log-probabilities after temperature, top-k and top-p; filtered ids get -inf.

  Args:
    logits: float [..., V].
    settings: a sampling (non-greedy) setting.

  Returns:
    float32 [..., V] normalized log-probabilities.
  """
  scores = logits.astype(jnp.float32) / settings.temperature
  if settings.top_k and settings.top_k < scores.shape[-1]:
    kth_largest = jax.lax.top_k(scores, settings.top_k)[0][..., -1:]
    scores = jnp.where(scores < kth_largest, -jnp.inf, scores)
  if settings.top_p < 1.0:
    scores = _nucleus_filter(scores, settings.top_p)
  return jax.nn.log_softmax(scores, axis=-1)


def _nucleus_filter(scores: jax.Array, top_p: float) -> jax.Array:
  """Keeps the smallest set of ids whose probability mass reaches top_p (at least one id)."""
  order = jnp.argsort(-scores, axis=-1)
  sorted_scores = jnp.take_along_axis(scores, order, axis=-1)
  sorted_probs = jax.nn.softmax(sorted_scores, axis=-1)
  mass_before = jnp.cumsum(sorted_probs, axis=-1) - sorted_probs
  keep_sorted = mass_before < top_p  # the most likely id always has mass_before == 0
  keep = jnp.take_along_axis(keep_sorted, jnp.argsort(order, axis=-1), axis=-1)
  return jnp.where(keep, scores, -jnp.inf)


def accept_prefix_length(accepted: jax.Array) -> jax.Array:
  """int32 [B]: number of leading True values of bool [B, G] (a rejection rejects the rest)."""
  return jnp.sum(jnp.cumprod(accepted.astype(jnp.int32), axis=-1), axis=-1)


def _drafted(gamma: int, num_drafted) -> jax.Array:
  """bool [B or 1, G]: which draft slots hold a real draft (all, without num_drafted)."""
  slots = jnp.arange(gamma)[None, :]
  return slots < (gamma if num_drafted is None else jnp.reshape(num_drafted, (-1, 1)))


def greedy_accept(
    draft_tokens: jax.Array, target_logits: jax.Array, num_drafted: jax.Array | None = None
) -> tuple[jax.Array, jax.Array]:
  """Greedy verification.

  Args:
    draft_tokens: int [B, G] drafted ids.
    target_logits: float [B, G + 1, V] target logits at the block [last, x_1 .. x_G].
    num_drafted: optional int [B] (or scalar): only the first num_drafted slots hold drafts (a
      round that drafted fewer than G); the others are never accepted.

  Returns:
    (num_accepted int32 [B], next_token int32 [B]): the target's argmax at the first mismatch,
    or the bonus token after the last draft. The emitted text equals greedy autoregressive decoding.
  """
  target_choice = jnp.argmax(target_logits, axis=-1).astype(jnp.int32)  # [B, G+1]
  matches = (target_choice[:, :-1] == draft_tokens) & _drafted(draft_tokens.shape[1], num_drafted)
  num_accepted = accept_prefix_length(matches)
  next_token = jnp.take_along_axis(target_choice, num_accepted[:, None], axis=1)[:, 0]
  return num_accepted, next_token


def speculative_accept(
    draft_tokens: jax.Array,
    draft_logprobs: jax.Array,
    target_logprobs: jax.Array,
    key: jax.Array,
    num_drafted: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
  """Speculative-sampling verification (distribution-preserving).

  Args:
    draft_tokens: int [B, G] ids sampled from q.
    draft_logprobs: float [B, G, V] processed log q at each draft step.
    target_logprobs: float [B, G + 1, V] processed log p at the block [last, x_1 .. x_G].
    key: PRNG key for the uniforms and the residual / bonus draw.
    num_drafted: optional int [B] (or scalar): drafts only in the first num_drafted slots; after
      all of them are accepted the bonus token is drawn from p at slot num_drafted.

  Returns:
    (num_accepted int32 [B], next_token int32 [B]).
  """
  batch, gamma = draft_tokens.shape
  uniform_key, residual_key = jax.random.split(key)
  pick = lambda logprobs: jnp.take_along_axis(logprobs, draft_tokens[..., None], -1)[..., 0]
  p_draft = jnp.exp(pick(target_logprobs[:, :gamma]))
  q_draft = jnp.exp(pick(draft_logprobs))
  uniforms = jax.random.uniform(uniform_key, (batch, gamma))
  # u < p/q written without the division: q(x) > 0 for every drafted x.
  num_accepted = accept_prefix_length((uniforms * q_draft < p_draft) & _drafted(gamma, num_drafted))
  drafted = jnp.broadcast_to(gamma if num_drafted is None else num_drafted, (batch,))
  rows = jnp.arange(batch)
  p_next = jnp.exp(target_logprobs[rows, num_accepted])  # [B, V]
  q_next = jnp.where(
      (num_accepted < drafted)[:, None],
      jnp.exp(draft_logprobs[rows, jnp.minimum(num_accepted, gamma - 1)]),
      0.0,
  )
  residual = jnp.maximum(p_next - q_next, 0.0)
  # p == q exactly leaves no residual mass; then any rejection had probability 0: fall back to p.
  residual = jnp.where(jnp.sum(residual, -1, keepdims=True) > 0, residual, p_next)
  next_token = jax.random.categorical(residual_key, jnp.log(residual), axis=-1).astype(jnp.int32)
  return num_accepted, next_token


def sample_token(logits: jax.Array, settings: SamplingSettings, key: jax.Array):
  """One draw from processed logits [B, V]: (token int32 [B], log-probs [B, V] or None when
  greedy)."""
  if settings.greedy:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32), None
  logprobs = process_logits(logits, settings)
  return jax.random.categorical(key, logprobs, axis=-1).astype(jnp.int32), logprobs
