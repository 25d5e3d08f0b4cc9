"""Flax (nnx) T5 / T5 v1.1 / Flan-T5 encoder-decoder speaking the decoder protocol of interface.py.

The module mirrors transformers' `T5ForConditionalGeneration` (5.23) numerically:
  * T5 layer norm: RMS only (no mean, no bias), variance in float32, scale applied in the
    parameter dtype.
  * Attention without the 1/sqrt(d) scale; inner width num_heads * d_kv (need not be d_model).
  * Relative position bias: one bucket table in the first block of each stack, shared by all
    blocks of that stack; bidirectional buckets in the encoder, unidirectional in the decoder.
    Bucket edges are computed in float32 exactly like transformers so they agree bit for bit.
  * Output: `tie_word_embeddings` decides whether the shared embedding is the LM head, and
    `scale_decoder_outputs` whether the final hidden is multiplied by d_model**-0.5 first. In
    transformers 5.23 the two are separate: the saved `scale_decoder_outputs` wins, else it is the
    saved `tie_word_embeddings` (default True). Original T5: tied + scaled; v1.1/Flan: untied,
    unscaled.

Parameters and activations run in `Config.dtype`; attention scores, softmax and layer-norm
variance in float32; logits are returned in float32 (the LM head accumulates in float32).
float16 runs but, unlike transformers, does not clamp infinities between blocks: original T5
checkpoints are known to overflow in float16, so prefer bfloat16.
tests/test_t5.py holds the logits to transformers PyTorch: float32 within 1e-4 of the largest
logit, bfloat16 within 5% with greedy argmax agreeing on at least 90% of positions.

Shapes use dimension letters: B batch, S source length, T decoder query length, L cache length,
D d_model, N heads, H d_kv, I = N * H, F d_ff, V vocabulary, R relative-position buckets.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jax_specsel.models import activations, attention, checkpoint
from jax_specsel.models.t5_config import Config


def relative_position_bucket(
    relative_position: jax.Array, *, bidirectional: bool, num_buckets: int, max_distance: int
) -> jax.Array:
  """T5's bucket of (key position - query position), as in Mesh TensorFlow and transformers.

  Args:
    relative_position: int array of key minus query positions.
    bidirectional: True for the encoder (future keys get their own half of the buckets); False
      for the decoder (all future keys share bucket 0, they are masked anyway).
    num_buckets: R.
    max_distance: distances >= this share the last bucket.

  Returns:
    int32 array of the same shape with values in [0, R).
  """
  relative_position = relative_position.astype(jnp.int32)
  if bidirectional:
    num_buckets //= 2
    offset = jnp.where(relative_position > 0, num_buckets, 0)
    distance = jnp.abs(relative_position)
  else:
    offset = 0
    distance = jnp.maximum(-relative_position, 0)
  max_exact = num_buckets // 2
  # Log-spaced buckets beyond max_exact, in float32 like torch so the edges agree exactly;
  # the maximum(., 1) only keeps log finite where the small-distance branch discards the value.
  log_ratio = jnp.log(jnp.maximum(distance, 1).astype(jnp.float32) / max_exact)
  large = max_exact + (
      log_ratio / math.log(max_distance / max_exact) * (num_buckets - max_exact)
  ).astype(jnp.int32)
  large = jnp.minimum(large, num_buckets - 1)
  return offset + jnp.where(distance < max_exact, distance, large)


def _dtype(name) -> Any:
  return checkpoint.DTYPES.get(name, name) if isinstance(name, str) else name


def _normal(rngs: nnx.Rngs, shape: tuple[int, ...], std: float, dtype) -> nnx.Param:
  return nnx.Param((jax.random.normal(rngs.params(), shape, jnp.float32) * std).astype(dtype))


class LayerNorm(nnx.Module):
  """T5 layer norm: x / rms(x) * scale, no mean subtraction and no bias."""

  def __init__(self, config: Config):
    self.epsilon = config.layer_norm_epsilon
    self.scale = nnx.Param(jnp.ones((config.d_model,), _dtype(config.dtype)))  # [D]

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    variance = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
    scale = self.scale[...]
    return (x32 * jax.lax.rsqrt(variance + self.epsilon)).astype(scale.dtype) * scale


class Attention(nnx.Module):
  """Multi-head attention without score scaling; optionally owns the relative-bias table."""

  def __init__(
      self, config: Config, *, has_relative_bias: bool, bidirectional: bool, rngs: nnx.Rngs
  ):
    d, i, dtype = config.d_model, config.inner_dim, _dtype(config.dtype)
    self.num_heads, self.head_dim = config.num_heads, config.d_kv
    self.bidirectional = bidirectional
    self.num_buckets = config.relative_attention_num_buckets
    self.max_distance = config.relative_attention_max_distance
    # The same initial scales as transformers' T5 (the q scale absorbs the missing 1/sqrt(H)).
    self.q = _normal(rngs, (d, i), (d * config.d_kv) ** -0.5, dtype)  # [D, I]
    self.k = _normal(rngs, (d, i), d**-0.5, dtype)  # [D, I]
    self.v = _normal(rngs, (d, i), d**-0.5, dtype)  # [D, I]
    self.o = _normal(rngs, (i, d), i**-0.5, dtype)  # [I, D]
    self.relative_bias = (
        _normal(rngs, (self.num_buckets, config.num_heads), d**-0.5, dtype)
        if has_relative_bias
        else None
    )  # [R, N]

  def _heads(self, x: jax.Array, kernel: nnx.Param) -> jax.Array:
    out = jnp.einsum("BTD,DI->BTI", x, kernel[...])
    return out.reshape(*out.shape[:2], self.num_heads, self.head_dim)  # [B, T, N, H]

  def key_value(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Keys and values [B, T, N, H] of inputs x [B, T, D]."""
    return self._heads(x, self.k), self._heads(x, self.v)

  def __call__(
      self, x: jax.Array, key: jax.Array, value: jax.Array, mask: jax.Array, bias: jax.Array | None
  ) -> jax.Array:
    """Attends queries from x [B, T, D] to key/value [B, L, N, H]; returns [B, T, D]."""
    query = self._heads(x, self.q)
    out = attention.dot_attention(query, key, value, mask, bias, scale=1.0)  # [B, T, N, H]
    out = out.reshape(*out.shape[:2], -1)
    return jnp.einsum("BTI,ID->BTD", out, self.o[...])

  def position_bias(self, query_positions: jax.Array, key_length: int) -> jax.Array:
    """Relative position bias [B, N, T, L] for queries at query_positions [B, T], keys 0..L-1."""
    relative = jnp.arange(key_length)[None, None, :] - query_positions[:, :, None]  # [B, T, L]
    buckets = relative_position_bucket(
        relative,
        bidirectional=self.bidirectional,
        num_buckets=self.num_buckets,
        max_distance=self.max_distance,
    )
    values = jnp.take(self.relative_bias[...], buckets, axis=0)  # [B, T, L, N]
    return values.transpose(0, 3, 1, 2)


class FeedForward(nnx.Module):
  """T5 feed-forward: wo(act(x wi)), or v1.1/Flan's gated wo(act(x wi_0) * (x wi_1))."""

  def __init__(self, config: Config, *, rngs: nnx.Rngs):
    d, f, dtype = config.d_model, config.d_ff, _dtype(config.dtype)
    self.activation = config.dense_act_fn
    self.is_gated = config.is_gated_act
    if self.is_gated:
      self.wi_0 = _normal(rngs, (d, f), d**-0.5, dtype)  # [D, F]
      self.wi_1 = _normal(rngs, (d, f), d**-0.5, dtype)  # [D, F]
    else:
      self.wi = _normal(rngs, (d, f), d**-0.5, dtype)  # [D, F]
    self.wo = _normal(rngs, (f, d), f**-0.5, dtype)  # [F, D]

  def __call__(self, x: jax.Array) -> jax.Array:
    act = activations.ACTIVATIONS[self.activation]
    if self.is_gated:
      hidden = act(jnp.einsum("BTD,DF->BTF", x, self.wi_0[...]))
      hidden = hidden * jnp.einsum("BTD,DF->BTF", x, self.wi_1[...])
    else:
      hidden = act(jnp.einsum("BTD,DF->BTF", x, self.wi[...]))
    return jnp.einsum("BTF,FD->BTD", hidden, self.wo[...])


class Block(nnx.Module):
  """One pre-norm T5 block: self-attention, (decoder only) cross-attention, feed-forward."""

  def __init__(self, config: Config, *, is_decoder: bool, has_relative_bias: bool, rngs: nnx.Rngs):
    self.self_attention_norm = LayerNorm(config)
    self.self_attention = Attention(
        config, has_relative_bias=has_relative_bias, bidirectional=not is_decoder, rngs=rngs
    )
    if is_decoder:
      self.cross_attention_norm = LayerNorm(config)
      self.cross_attention = Attention(
          config, has_relative_bias=False, bidirectional=True, rngs=rngs
      )
    self.feed_forward_norm = LayerNorm(config)
    self.feed_forward = FeedForward(config, rngs=rngs)

  def encode(self, x: jax.Array, mask: jax.Array, bias: jax.Array) -> jax.Array:
    """Encoder block on x [B, S, D] with a [B, S, S] padding mask and [1, N, S, S] bias."""
    normed = self.self_attention_norm(x)
    key, value = self.self_attention.key_value(normed)
    x = x + self.self_attention(normed, key, value, mask, bias)
    return x + self.feed_forward(self.feed_forward_norm(x))

  def decode(
      self,
      x: jax.Array,
      start: jax.Array,
      layer_cache: dict,
      self_mask: jax.Array,
      bias: jax.Array,
      cross_kv: tuple[jax.Array, jax.Array],
      cross_mask: jax.Array,
  ) -> tuple[jax.Array, dict]:
    """Decoder block on x [B, T, D]: writes its K/V at start.. and returns (x, layer cache).

    cross_kv holds [B, N, S, H] arrays (see `Module.prepare`): the transposes below cancel against
    that layout for the keys. XLA:CPU still transposes the values, and the self-attention cache
    ([B, L, N, H]), once per step; head-major or key-transposed caches moved these copies rather
    than removed them and measured no faster (BUILD_NOTES, "cache layouts").
    """
    normed = self.self_attention_norm(x)
    key, value = self.self_attention.key_value(normed)  # [B, T, N, H]
    layer_cache = {
        "k": attention.write_at_positions(layer_cache["k"], key, start),
        "v": attention.write_at_positions(layer_cache["v"], value, start),
    }
    x = x + self.self_attention(normed, layer_cache["k"], layer_cache["v"], self_mask, bias)
    cross_key, cross_value = (kv.transpose(0, 2, 1, 3) for kv in cross_kv)  # [B, S, N, H]
    x = x + self.cross_attention(
        self.cross_attention_norm(x), cross_key, cross_value, cross_mask, None
    )
    return x + self.feed_forward(self.feed_forward_norm(x)), layer_cache


class Stack(nnx.Module):
  """The encoder or decoder blocks plus the final layer norm (and, untied, its input table)."""

  def __init__(
      self,
      config: Config,
      num_blocks: int,
      *,
      is_decoder: bool,
      own_embeddings: bool,
      rngs: nnx.Rngs,
  ):
    self.embed_tokens = (
        _normal(rngs, (config.vocab_size, config.d_model), 1.0, _dtype(config.dtype))
        if own_embeddings
        else None
    )  # [V, D]
    self.blocks = nnx.List(
        [
            Block(config, is_decoder=is_decoder, has_relative_bias=i == 0, rngs=rngs)
            for i in range(num_blocks)
        ]
    )
    self.final_norm = LayerNorm(config)

  def position_bias(self, query_positions: jax.Array, key_length: int) -> jax.Array:
    """[B, N, T, L]: the first block's table, shared by every block of the stack (as in HF)."""
    return self.blocks[0].self_attention.position_bias(query_positions, key_length)


class Module(nnx.Module):
  """T5ForConditionalGeneration in nnx with the prepare / init_cache / decode / embed protocol."""

  def __init__(self, config: Config, *, rngs: nnx.Rngs):
    self.config = config
    dtype = _dtype(config.dtype)
    self.shared = (
        _normal(rngs, (config.vocab_size, config.d_model), 1.0, dtype)
        if config.uses_shared_embedding
        else None
    )  # [V, D]
    self.encoder = Stack(
        config,
        config.num_layers,
        is_decoder=False,
        own_embeddings=config.separate_encoder_embeddings,
        rngs=rngs,
    )
    self.decoder = Stack(
        config,
        config.num_decoder_layers,
        is_decoder=True,
        own_embeddings=config.separate_decoder_embeddings,
        rngs=rngs,
    )
    self.lm_head = (
        None
        if config.tie_word_embeddings
        else _normal(rngs, (config.d_model, config.vocab_size), 1.0, dtype)
    )  # [D, V]

  def _embed_tokens(self, ids: jax.Array, stack: Stack) -> jax.Array:
    """[B, T] ids -> [B, T, D] through the stack's own table, else the shared one."""
    table = self.shared if stack.embed_tokens is None else stack.embed_tokens
    return jnp.take(table[...], ids, axis=0)

  def prepare(
      self, prompt_ids: jax.Array, prompt_mask: jax.Array, cache: Any, num_layers: int | None = None
  ) -> tuple[dict, Any]:
    """Runs the encoder once and precomputes every decoder layer's cross-attention K/V.

    Args:
      prompt_ids: int [B, S], right-padded (any id where prompt_mask is 0).
      prompt_mask: {0,1} [B, S], 1 for real tokens.
      cache: the decoder cache; returned unchanged.
      num_layers: ignored (T5 has no early-exit view).

    Returns:
      (context, cache) with context = {"encoder_states": [B, S, D], "encoder_mask": int32 [B, S],
      "cross_kv": per decoder layer (k, v), each [B, N, S, H]}. Heads-major, the keys are read
      in place by the attention dot; stored [B, S, N, H] they were transposed in every decode
      step.
    """
    del num_layers
    length = prompt_ids.shape[1]
    prompt_mask = prompt_mask.astype(jnp.int32)
    x = self._embed_tokens(prompt_ids, self.encoder)  # [B, S, D]
    mask = attention.padding_mask(prompt_mask, length)  # [B, S, S]
    bias = self.encoder.position_bias(jnp.arange(length)[None, :], length)  # [1, N, S, S]
    for block in self.encoder.blocks:
      x = block.encode(x, mask, bias)
    states = self.encoder.final_norm(x)
    cross_kv = tuple(
        tuple(kv.transpose(0, 2, 1, 3) for kv in block.cross_attention.key_value(states))
        for block in self.decoder.blocks
    )
    context = {"encoder_states": states, "encoder_mask": prompt_mask, "cross_kv": cross_kv}
    return context, cache

  def init_cache(self, batch: int, max_len: int, dtype, num_layers: int | None = None) -> tuple:
    """Zero self-attention K/V buffers: per decoder layer {"k", "v"} of [B, L, N, H] in dtype."""
    del num_layers
    shape = (batch, max_len, self.config.num_heads, self.config.d_kv)
    zeros = jnp.zeros(shape, _dtype(dtype))
    return tuple({"k": zeros, "v": zeros} for _ in range(self.config.num_decoder_layers))

  def decode(
      self,
      tokens: jax.Array,
      start: jax.Array,
      cache: tuple,
      context: dict,
      num_layers: int | None = None,
  ) -> tuple[jax.Array, tuple]:
    """Decoder step(s): tokens [B, T] at absolute positions start[b]..start[b]+T-1.

    Args:
      tokens: int [B, T] decoder inputs.
      start: int [B] absolute position of tokens[:, 0] in each row.
      cache: from `init_cache` (or a previous `decode`).
      context: from `prepare`.
      num_layers: ignored (T5 has no early-exit view).

    Returns:
      (logits float32 [B, T, V], updated cache).
    """
    del num_layers
    steps = tokens.shape[1]
    length = cache[0]["k"].shape[1]
    start = start.astype(jnp.int32)
    x = self._embed_tokens(tokens, self.decoder)  # [B, T, D]
    query_positions = start[:, None] + jnp.arange(steps)[None, :]  # [B, T]
    self_mask = attention.causal_mask(start, steps, length)  # [B, T, L]
    cross_mask = attention.padding_mask(context["encoder_mask"], steps)  # [B, T, S]
    bias = self.decoder.position_bias(query_positions, length)  # [B, N, T, L]
    new_cache = []
    for block, layer_cache, cross_kv in zip(self.decoder.blocks, cache, context["cross_kv"]):
      x, layer_cache = block.decode(x, start, layer_cache, self_mask, bias, cross_kv, cross_mask)
      new_cache.append(layer_cache)
    return self._logits(self.decoder.final_norm(x)), tuple(new_cache)

  def _logits(self, hidden: jax.Array) -> jax.Array:
    if self.config.scale_decoder_outputs:
      hidden = hidden * jnp.asarray(self.config.d_model**-0.5, hidden.dtype)
    if self.lm_head is None:
      return jnp.einsum("BTD,VD->BTV", hidden, self.shared[...], preferred_element_type=jnp.float32)
    return jnp.einsum("BTD,DV->BTV", hidden, self.lm_head[...], preferred_element_type=jnp.float32)

  def embed(self, context: dict) -> jax.Array:
    """Encoder final states mean-pooled over real tokens: float32 [B, D]."""
    states = context["encoder_states"].astype(jnp.float32)
    mask = context["encoder_mask"].astype(jnp.float32)
    total = jnp.einsum("BSD,BS->BD", states, mask)
    return total / jnp.maximum(mask.sum(axis=1, keepdims=True), 1.0)
