"""Attention pieces shared by T5 and LLaMA: cache writes by absolute position, masks, GQA attention.

Shapes use dimension letters: B batch, T query length, L cache (key) length, S source length,
N query heads, K key/value heads, G = N // K query heads per key/value head, H head dim.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def write_at_positions(buffer: jax.Array, values: jax.Array, start: jax.Array) -> jax.Array:
  """Writes values[b, t] to buffer[b, start[b] + t]; positions outside [0, L) are dropped.

  Args:
    buffer: [B, L, ...] cache buffer.
    values: [B, T, ...] new entries.
    start: int [B] absolute position of values[:, 0] in each row.

  Returns:
    The updated buffer (same shape and dtype).
  """
  batch, length = buffer.shape[:2]
  steps = values.shape[1]
  positions = start[:, None] + jnp.arange(steps)[None, :]  # [B, T]
  # Negative indices would wrap around in JAX: send them (and overflow) past the end to be dropped.
  positions = jnp.where((positions < 0) | (positions >= length), length, positions)
  rows = jnp.broadcast_to(jnp.arange(batch)[:, None], positions.shape)
  return buffer.at[rows, positions].set(values.astype(buffer.dtype), mode="drop")


def causal_mask(start: jax.Array, steps: int, length: int) -> jax.Array:
  """bool [B, T, L]: query t of row b (at position start[b] + t) may see keys at positions <= it."""
  query_positions = start[:, None] + jnp.arange(steps)[None, :]  # [B, T]
  key_positions = jnp.arange(length)[None, None, :]  # [1, 1, L]
  return key_positions <= query_positions[:, :, None]


def padding_mask(key_mask: jax.Array, steps: int) -> jax.Array:
  """bool [B, T, S] from a {0,1} [B, S] mask of real source tokens."""
  return jnp.broadcast_to(
      key_mask[:, None, :].astype(bool), (key_mask.shape[0], steps, key_mask.shape[1])
  )


def dot_attention(
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    mask: jax.Array,
    bias: jax.Array | None = None,
    scale: float = 1.0,
) -> jax.Array:
  """Grouped-query attention with a boolean mask and an optional additive bias.

  Args:
    query: [B, T, N, H].
    key, value: [B, L, K, H] with N a multiple of K (K == N is plain multi-head attention).
    mask: bool [B, T, L], True where a query may attend.
    bias: optional [B or 1, N, T, L] added to the scores (T5 relative position bias).
    scale: multiplier on query . key (T5 uses 1.0, LLaMA head_dim ** -0.5).

  Returns:
    [B, T, N, H] in the query's dtype. Scores and softmax run in float32. A query with no
    visible key (a dropped position) gets a uniform average instead of NaN.
  """
  batch, steps, num_heads, head_dim = query.shape
  num_kv = key.shape[2]
  groups = num_heads // num_kv
  q = query.reshape(batch, steps, num_kv, groups, head_dim)
  scores = jnp.einsum("BTKGH,BLKH->BKGTL", q, key, preferred_element_type=jnp.float32) * scale
  if bias is not None:
    scores = scores + bias.reshape(bias.shape[0], num_kv, groups, steps, -1).astype(jnp.float32)
  scores = jnp.where(mask[:, None, None, :, :], scores, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(scores, axis=-1).astype(value.dtype)
  out = jnp.einsum("BKGTL,BLKH->BTKGH", probs, value)
  return out.reshape(batch, steps, num_heads, head_dim)
