"""LLaMA-family decoder-only transformer in flax.nnx, speaking the decoder protocol of interface.py.

Architecture (matches transformers' `LlamaForCausalLM`): token embedding, N pre-norm blocks of
grouped-query self-attention with rotary position embeddings (rotate-half convention, default /
linear / "llama3" frequency scaling) and a SwiGLU MLP, a final RMSNorm and an LM head that is
either separate or the embedding transposed.

The K/V cache is a tuple over layers of {"k", "v"}: [B, L, K, H] buffers indexed by absolute
position, so rolling back rejected draft tokens is free (the next call overwrites). Every method
takes `num_layers`: the early-exit view runs only the first k blocks, then the final norm and
the shared LM head (Kavehzadeh et al., Table 6: one LM head for all exits).

Numerics: parameters, activations and the cache are in `Config.dtype`; RMSNorm variance,
rotary embeddings, attention scores/softmax and the logits are computed in float32. As in HF,
the residual stream and the weights of a bfloat16 model are bfloat16. tests/test_llama.py holds
the logits to transformers PyTorch float32: max |logit diff| / max |logit| <= 1e-4 in float32,
<= 5e-2 in bfloat16.

Shapes use dimension letters: B batch, T new tokens, S prompt length, L cache length,
D model width, F MLP width, N query heads, K key/value heads, H head dim, V vocabulary.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jax_specsel.models.attention import causal_mask, dot_attention, write_at_positions
from jax_specsel.models.llama_config import Config


def rope_inverse_frequencies(config: Config) -> np.ndarray:
  """float32 [H/2] rotary inverse frequencies, computed like transformers (float32 throughout).

  Args:
    config: the model config (head_dim, rope_theta and the rope scaling fields).

  Returns:
    numpy float32 [H/2]; a trace-time constant, so the decode step carries no rope tables.
  """
  dim = config.head_dim
  exponents = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
  inv_freq = (np.float32(1.0) / (np.float32(config.rope_theta) ** exponents)).astype(np.float32)
  if config.rope_type == "linear":
    return (inv_freq / np.float32(config.rope_factor)).astype(np.float32)
  if config.rope_type != "llama3":
    return inv_freq
  factor = np.float32(config.rope_factor)
  low, high = np.float32(config.rope_low_freq_factor), np.float32(config.rope_high_freq_factor)
  old_context = np.float32(config.rope_original_max_position_embeddings)
  wavelen = np.float32(2 * math.pi) / inv_freq
  # Long wavelengths (beyond the pre-training context) are slowed by `factor`, short ones kept,
  # and the band in between interpolated smoothly (Llama 3.1).
  scaled = np.where(wavelen > old_context / low, inv_freq / factor, inv_freq)
  smooth = (old_context / wavelen - low) / (high - low)
  smoothed = (1 - smooth) * scaled / factor + smooth * scaled
  is_medium = ~(wavelen < old_context / high) & ~(wavelen > old_context / low)
  return np.where(is_medium, smoothed, scaled).astype(np.float32)


def _rotary_tables(config: Config, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
  """cos, sin float32 [B, T, 1, H/2] for int [B, T] absolute positions."""
  inv_freq = jnp.asarray(rope_inverse_frequencies(config))  # [H/2]
  angles = positions.astype(jnp.float32)[:, :, None] * inv_freq  # [B, T, H/2]
  return jnp.cos(angles)[:, :, None, :], jnp.sin(angles)[:, :, None, :]


def _apply_rotary(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """Rotates [B, T, heads, H] by position, transformers' rotate_half layout (halves, not pairs)."""
  half = x.shape[-1] // 2
  x32 = x.astype(jnp.float32)
  first, second = x32[..., :half], x32[..., half:]
  rotated = jnp.concatenate([first * cos - second * sin, second * cos + first * sin], axis=-1)
  return rotated.astype(x.dtype)


class RMSNorm(nnx.Module):
  """x / rms(x) * scale, the variance in float32, the scale applied in the input dtype (as HF)."""

  def __init__(self, width: int, eps: float, dtype):
    self.scale = nnx.Param(jnp.ones((width,), dtype))  # [D]
    self.eps = eps

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    variance = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
    normed = (x32 * jax.lax.rsqrt(variance + self.eps)).astype(x.dtype)
    return self.scale[...] * normed


def _linear(in_features: int, out_features: int, bias: bool, dtype, rngs: nnx.Rngs) -> nnx.Linear:
  return nnx.Linear(
      in_features, out_features, use_bias=bias, dtype=dtype, param_dtype=dtype, rngs=rngs
  )


class Attention(nnx.Module):
  """Grouped-query self-attention over an absolute-position K/V cache."""

  def __init__(self, config: Config, dtype, rngs: nnx.Rngs):
    d, h, bias = config.hidden_size, config.head_dim, config.attention_bias
    self.num_heads, self.num_kv_heads, self.head_dim = (
        config.num_attention_heads,
        config.num_key_value_heads,
        h,
    )
    self.q_proj = _linear(d, self.num_heads * h, bias, dtype, rngs)  # kernel [D, N*H]
    self.k_proj = _linear(d, self.num_kv_heads * h, bias, dtype, rngs)  # kernel [D, K*H]
    self.v_proj = _linear(d, self.num_kv_heads * h, bias, dtype, rngs)  # kernel [D, K*H]
    self.o_proj = _linear(self.num_heads * h, d, bias, dtype, rngs)  # kernel [N*H, D]

  def __call__(self, x, rotary, layer_cache, start, mask):
    """x [B, T, D] -> ([B, T, D], updated {"k", "v"} [B, L, K, H])."""
    batch, steps, _ = x.shape
    cos, sin = rotary
    query = self.q_proj(x).reshape(batch, steps, self.num_heads, self.head_dim)  # [B, T, N, H]
    key = self.k_proj(x).reshape(batch, steps, self.num_kv_heads, self.head_dim)  # [B, T, K, H]
    value = self.v_proj(x).reshape(batch, steps, self.num_kv_heads, self.head_dim)  # [B, T, K, H]
    query, key = _apply_rotary(query, cos, sin), _apply_rotary(key, cos, sin)
    keys = write_at_positions(layer_cache["k"], key, start)  # [B, L, K, H]
    values = write_at_positions(layer_cache["v"], value, start)  # [B, L, K, H]
    out = dot_attention(query, keys, values, mask, scale=self.head_dim**-0.5)  # [B, T, N, H]
    return self.o_proj(out.reshape(batch, steps, -1)), {"k": keys, "v": values}


class MLP(nnx.Module):
  """SwiGLU: down(silu(gate(x)) * up(x))."""

  def __init__(self, config: Config, dtype, rngs: nnx.Rngs):
    d, f, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
    self.gate_proj = _linear(d, f, bias, dtype, rngs)  # kernel [D, F]
    self.up_proj = _linear(d, f, bias, dtype, rngs)  # kernel [D, F]
    self.down_proj = _linear(f, d, bias, dtype, rngs)  # kernel [F, D]

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nnx.Module):
  """Pre-norm block: x + attn(norm(x)), then + mlp(norm(.))."""

  def __init__(self, config: Config, dtype, rngs: nnx.Rngs):
    self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
    self.self_attn = Attention(config, dtype, rngs)
    self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
    self.mlp = MLP(config, dtype, rngs)

  def __call__(self, x, rotary, layer_cache, start, mask):
    attended, layer_cache = self.self_attn(
        self.input_layernorm(x), rotary, layer_cache, start, mask
    )
    x = x + attended
    return x + self.mlp(self.post_attention_layernorm(x)), layer_cache


class Module(nnx.Module):
  """LLaMA causal LM implementing prepare / init_cache / decode / embed (see interface.py)."""

  def __init__(self, config: Config, *, rngs: nnx.Rngs):
    self.config = config
    dtype = jnp.dtype(config.dtype)
    self.embed_tokens = nnx.Embed(
        config.vocab_size, config.hidden_size, dtype=dtype, param_dtype=dtype, rngs=rngs
    )  # embedding [V, D]
    self.layers = nnx.List(
        [DecoderLayer(config, dtype, rngs) for _ in range(config.num_hidden_layers)]
    )
    self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
    # Tied checkpoints reuse the embedding as the output projection; no separate head exists.
    self.lm_head = (
        None
        if config.tie_word_embeddings
        else _linear(config.hidden_size, config.vocab_size, False, dtype, rngs)
    )  # kernel [D, V]

  def _layer_count(self, num_layers: int | None) -> int:
    total = self.config.num_hidden_layers
    count = total if num_layers is None else num_layers
    if not 1 <= count <= total:
      raise ValueError(f"num_layers={num_layers} must be between 1 and the model's {total} layers.")
    return count

  def init_cache(self, batch: int, max_len: int, dtype, num_layers: int | None = None):
    """Zeroed K/V buffers.

    Args:
      batch: rows B.
      max_len: cache length L (prompt + everything that will be decoded).
      dtype: cache dtype (a name such as "bfloat16" or a jnp dtype).
      num_layers: cache only the first k layers (early-exit view); default all.

    Returns:
      A tuple over layers of {"k": [B, L, K, H], "v": [B, L, K, H]} zeros.
    """
    shape = (batch, max_len, self.config.num_key_value_heads, self.config.head_dim)
    return tuple(
        {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}
        for _ in range(self._layer_count(num_layers))
    )

  def _hidden_states(self, tokens, start, cache, num_layers):
    """Runs the first `num_layers` blocks: tokens [B, T] -> un-normed [B, T, D], updated cache."""
    count = self._layer_count(num_layers)
    if len(cache) < count:
      raise ValueError(
          f"the cache holds {len(cache)} layers but {count} are run; build it with "
          "init_cache(..., num_layers) of the same view."
      )
    steps, length = tokens.shape[1], cache[0]["k"].shape[1]
    start = start.astype(jnp.int32)
    positions = start[:, None] + jnp.arange(steps, dtype=jnp.int32)[None, :]  # [B, T]
    rotary = _rotary_tables(self.config, positions)
    mask = causal_mask(start, steps, length)  # [B, T, L], shared by every layer
    x = self.embed_tokens(tokens)  # [B, T, D]
    new_cache = list(cache)  # layers past the exit (a shared full cache) pass through untouched
    for index in range(count):
      x, new_cache[index] = self.layers[index](x, rotary, cache[index], start, mask)
    return x, tuple(new_cache)

  def prepare(self, prompt_ids, prompt_mask, cache, num_layers: int | None = None):
    """Prefills a right-padded prompt at positions 0..S-1.

    Args:
      prompt_ids: int [B, S], right-padded.
      prompt_mask: {0,1} [B, S], 1 on real tokens.
      cache: from `init_cache` with L >= S.
      num_layers: run only the first k layers (early-exit view); default all.

    Returns:
      ({"last_hidden": float32 [B, D]}, cache). last_hidden is the final-normed state of each
      row's last real token. Pad positions also land in the cache, but decoding overwrites them
      from the real length on and causal masking never lets a real token see them before that.
    """
    start = jnp.zeros((prompt_ids.shape[0],), jnp.int32)
    hidden, cache = self._hidden_states(prompt_ids, start, cache, num_layers)  # [B, S, D]
    last = jnp.maximum(jnp.sum(prompt_mask.astype(jnp.int32), axis=1) - 1, 0)  # [B]
    last_hidden = hidden[jnp.arange(hidden.shape[0]), last]  # [B, D]; norm is per position
    return {"last_hidden": self.norm(last_hidden).astype(jnp.float32)}, cache

  def decode(self, tokens, start, cache, context=None, num_layers: int | None = None):
    """Scores tokens at positions start[b] + t and writes their K/V.

    Args:
      tokens: int [B, T].
      start: int [B] absolute position of tokens[:, 0] in each row.
      cache: from `init_cache` / `prepare` / a previous `decode`.
      context: ignored (decoder-only; may be None).
      num_layers: run only the first k layers, then the final norm and the shared LM head.

    Returns:
      (float32 [B, T, V] logits, updated cache).
    """
    del context  # the prompt lives in the cache
    hidden, cache = self._hidden_states(tokens, start, cache, num_layers)
    return self._logits(self.norm(hidden)), cache

  def _logits(self, hidden: jax.Array) -> jax.Array:
    """[B, T, D] -> float32 [B, T, V] (dot accumulated in float32 even for bfloat16 weights)."""
    if self.lm_head is None:
      return jnp.einsum(
          "BTD,VD->BTV",
          hidden,
          self.embed_tokens.embedding[...],
          preferred_element_type=jnp.float32,
      )
    return jnp.einsum(
        "BTD,DV->BTV", hidden, self.lm_head.kernel[...], preferred_element_type=jnp.float32
    )

  def embed(self, context) -> jax.Array:
    """float32 [B, D]: the final hidden state of the last real prompt token."""
    return context["last_hidden"].astype(jnp.float32)
