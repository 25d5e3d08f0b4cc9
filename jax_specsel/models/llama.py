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
rotary embeddings, attention scores/softmax and the logits are computed in float32.
Measured against transformers PyTorch float32 on tiny random models (tests/test_llama.py):
  float32:  max |logit diff| / max |logit| <= 1e-4 (measured ~2e-7).
  bfloat16: max |logit diff| / max |logit| <= 5e-2 against the float32 reference (measured
            1.5e-2 to 2.2e-2: bfloat16 keeps 8 mantissa bits and, as in HF, the residual stream
            and the weights are bfloat16; only norms, rotary, softmax and logits run in float32).

Token ids are the ones transformers' `generate` uses (`checkpoint.generation_ids`): the stop ids
`eos_token_ids` come from generation_config.json when the checkpoint has one, else config.json;
a null / absent `eos_token_id` means no stop id (generation runs to max_new_tokens), a list means
several. `pad_token_id` falls back to the first stop id (LLaMA checkpoints usually define no pad
token; padded positions are masked anyway). `eos_token_id` is the first stop id, or None.

Tying: `tie_word_embeddings` in config.json ties the LM head to the embedding, except where the
checkpoint stores both with different values: transformers then does not tie them, and neither
does `config_for_checkpoint`.

Shapes use dimension letters: B batch, T new tokens, S prompt length, L cache length,
D model width, F MLP width, N query heads, K key/value heads, H head dim, V vocabulary.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jax_specsel.models import checkpoint
from jax_specsel.models.attention import causal_mask, dot_attention, write_at_positions
from jax_specsel.models.registry import UnsupportedModelError

_ROPE_TYPES = ("default", "linear", "llama3")


@dataclasses.dataclass(frozen=True)
class Config:
  """LLaMA hyper-parameters. Frozen and hashable: it is part of the jit-static graph definition."""

  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_hidden_layers: int
  num_attention_heads: int
  num_key_value_heads: int
  head_dim: int
  rms_norm_eps: float = 1e-6
  rope_theta: float = 10000.0
  rope_type: str = "default"  # "default" | "linear" | "llama3"
  rope_factor: float = 1.0  # linear and llama3: how much longer than pre-training
  rope_low_freq_factor: float = 1.0  # llama3 only
  rope_high_freq_factor: float = 4.0  # llama3 only
  rope_original_max_position_embeddings: int = 8192  # llama3 only
  max_position_embeddings: int = 2048
  tie_word_embeddings: bool = False
  attention_bias: bool = False
  mlp_bias: bool = False
  pad_token_id: int = 0  # the first stop id when the checkpoint defines no pad token
  eos_token_ids: tuple[int, ...] = (2,)  # stop ids; () runs every row to max_new_tokens
  bos_token_id: int | None = 1
  dtype: str = "float32"
  matmul_precision: str = "auto"  # see interface.matmul_precision: float32 runs at "highest"

  model_type = "llama"  # class attributes, not fields: the same for every LLaMA
  is_encoder_decoder = False
  decoder_start_token_id = None

  @property
  def num_decoder_layers(self) -> int:
    return self.num_hidden_layers

  @property
  def eos_token_id(self) -> int | None:
    """The first stop id, None when there is none."""
    return self.eos_token_ids[0] if self.eos_token_ids else None

  @property
  def params_per_decoder_layer(self) -> int:
    d, f, h = self.hidden_size, self.intermediate_size, self.head_dim
    q_width, kv_width = self.num_attention_heads * h, self.num_key_value_heads * h
    attention = d * q_width + 2 * d * kv_width + q_width * d
    if self.attention_bias:
      attention += q_width + 2 * kv_width + d
    mlp = 3 * d * f + ((2 * f + d) if self.mlp_bias else 0)
    return attention + mlp + 2 * d  # + the two RMSNorm scales

  @classmethod
  def from_hf(cls, hf_config: dict, dtype: str, generation_config: dict | None = None) -> "Config":
    """Reads a transformers LLaMA config.json (v4 `rope_scaling` or v5 `rope_parameters` layout).

    Args:
      hf_config: the parsed config.json.
      dtype: "float32", "bfloat16" or "float16" for parameters, activations and the cache.
      generation_config: the parsed generation_config.json, or None when there is none: the stop
        and pad ids then come from config.json (`checkpoint.generation_ids`, as transformers).

    Returns:
      The frozen Config.

    Raises:
      UnsupportedModelError: an activation other than SiLU, a rope type other than default /
        linear / llama3, or partial rotary embeddings.
      InvalidConfigError: a field of the wrong type or range (naming it, its value and the fix),
        a stop id outside the vocabulary.
      KeyError: a required size field is absent (the loader names it).
    """
    hidden_act = hf_config.get("hidden_act", "silu")
    if hidden_act != "silu":
      raise UnsupportedModelError(
          f"config.json: hidden_act={hidden_act!r}; this LLaMA implementation supports only 'silu'.")
    sizes = _sizes(hf_config)
    ids = checkpoint.generation_ids(hf_config, generation_config, sizes["vocab_size"])
    flag = lambda name: checkpoint.config_flag(hf_config, name, False)
    return cls(
        **sizes,
        rms_norm_eps=checkpoint.config_real(hf_config, "rms_norm_eps", 1e-6),
        tie_word_embeddings=flag("tie_word_embeddings"),
        attention_bias=flag("attention_bias"),
        mlp_bias=flag("mlp_bias"),
        pad_token_id=ids.pad_token_id,
        eos_token_ids=ids.eos_token_ids,
        bos_token_id=checkpoint.config_integer(hf_config, "bos_token_id", None, minimum=None),
        dtype=dtype,
        **_rope_fields(hf_config),
    )

  def to_hf(self) -> dict:
    """config.json fields transformers 5.x reads back as this architecture (`from_hf`'s inverse).

    Returns:
      A JSON-serializable dict (v5 layout: rotary settings in `rope_parameters`, `head_dim`
      written explicitly).
    """
    rope = {"rope_type": self.rope_type, "rope_theta": self.rope_theta}
    if self.rope_type in ("linear", "llama3"):
      rope["factor"] = self.rope_factor
    if self.rope_type == "llama3":
      rope.update(low_freq_factor=self.rope_low_freq_factor,
                  high_freq_factor=self.rope_high_freq_factor,
                  original_max_position_embeddings=self.rope_original_max_position_embeddings)
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": self.model_type,
        "vocab_size": self.vocab_size, "hidden_size": self.hidden_size,
        "intermediate_size": self.intermediate_size, "num_hidden_layers": self.num_hidden_layers,
        "num_attention_heads": self.num_attention_heads,
        "num_key_value_heads": self.num_key_value_heads, "head_dim": self.head_dim,
        "hidden_act": "silu", "rms_norm_eps": self.rms_norm_eps, "rope_parameters": rope,
        "max_position_embeddings": self.max_position_embeddings,
        "tie_word_embeddings": self.tie_word_embeddings, "attention_bias": self.attention_bias,
        "mlp_bias": self.mlp_bias, "pad_token_id": self.pad_token_id,
        "bos_token_id": self.bos_token_id,
        "eos_token_id": checkpoint.eos_field(self.eos_token_ids), "dtype": self.dtype,
    }


def _sizes(hf_config: dict) -> dict[str, int]:
  """The size fields of config.json, each a whole number >= 1; heads a multiple of K/V heads."""
  size = lambda name, default=checkpoint.REQUIRED: checkpoint.config_integer(hf_config, name, default)
  hidden, heads = size("hidden_size"), size("num_attention_heads")
  kv_heads = size("num_key_value_heads", heads)
  if heads % kv_heads:
    raise checkpoint.InvalidConfigError(
        f"config.json: num_attention_heads={heads} is not a multiple of num_key_value_heads="
        f"{kv_heads}: grouped-query attention shares each K/V head among a whole number of query "
        "heads. Fix one of the two in config.json.")
  head_dim = size("head_dim", hidden // heads)
  if head_dim < 1:  # the default, hidden_size // num_attention_heads, is 0
    raise checkpoint.InvalidConfigError(
        f"config.json: hidden_size={hidden} is smaller than num_attention_heads={heads}, so the "
        "heads would have width 0: fix hidden_size or num_attention_heads, or set head_dim.")
  return dict(vocab_size=size("vocab_size"), hidden_size=hidden,
              intermediate_size=size("intermediate_size"),
              num_hidden_layers=size("num_hidden_layers"), num_attention_heads=heads,
              num_key_value_heads=kv_heads, head_dim=head_dim,
              max_position_embeddings=size("max_position_embeddings", 2048))


def _rope_fields(hf_config: dict) -> dict[str, Any]:
  """Rotary settings from either `rope_parameters` (transformers 5) or `rope_scaling` + `rope_theta`."""
  params = dict(hf_config.get("rope_parameters") or hf_config.get("rope_scaling") or {})
  if any(isinstance(v, dict) for v in params.values()):
    raise UnsupportedModelError(
        f"config.json: per-layer-type rope parameters {sorted(params)} are not supported by LLaMA.")
  rope_type = params.get("rope_type", params.get("type", "default"))
  if rope_type not in _ROPE_TYPES:
    raise UnsupportedModelError(
        f"config.json: rope type {rope_type!r} is not supported; supported: {list(_ROPE_TYPES)}.")
  partial = params.get("partial_rotary_factor", hf_config.get("partial_rotary_factor", 1.0))
  if partial not in (None, 1.0):
    raise UnsupportedModelError(
        f"config.json: partial_rotary_factor={partial} is not supported (LLaMA rotates all dims).")
  nested = "rope_parameters" if hf_config.get("rope_parameters") else "rope_scaling"
  real = lambda name, default=checkpoint.REQUIRED: checkpoint.config_real(
      params, f"{nested}.{name}", default, positive=True)
  theta = real("rope_theta", checkpoint.config_real(hf_config, "rope_theta", 10000.0, positive=True))
  fields = {"rope_type": rope_type, "rope_theta": theta}
  if rope_type in ("linear", "llama3"):
    fields["rope_factor"] = real("factor")
  if rope_type == "llama3":
    fields["rope_low_freq_factor"] = real("low_freq_factor")
    fields["rope_high_freq_factor"] = real("high_freq_factor")
    fields["rope_original_max_position_embeddings"] = checkpoint.config_integer(
        params, f"{nested}.original_max_position_embeddings",
        checkpoint.config_integer(hf_config, "max_position_embeddings", 2048))
  return fields


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
  """x / rms(x) * scale, the variance in float32 and the scale applied in the input dtype (as HF)."""

  def __init__(self, width: int, eps: float, dtype):
    self.scale = nnx.Param(jnp.ones((width,), dtype))  # [D]
    self.eps = eps

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    variance = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
    normed = (x32 * jax.lax.rsqrt(variance + self.eps)).astype(x.dtype)
    return self.scale[...] * normed


def _linear(in_features: int, out_features: int, bias: bool, dtype, rngs: nnx.Rngs) -> nnx.Linear:
  return nnx.Linear(in_features, out_features, use_bias=bias, dtype=dtype, param_dtype=dtype,
                    rngs=rngs)


class Attention(nnx.Module):
  """Grouped-query self-attention over an absolute-position K/V cache."""

  def __init__(self, config: Config, dtype, rngs: nnx.Rngs):
    d, h, bias = config.hidden_size, config.head_dim, config.attention_bias
    self.num_heads, self.num_kv_heads, self.head_dim = (config.num_attention_heads,
                                                        config.num_key_value_heads, h)
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
    out = dot_attention(query, keys, values, mask, scale=self.head_dim ** -0.5)  # [B, T, N, H]
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
    attended, layer_cache = self.self_attn(self.input_layernorm(x), rotary, layer_cache, start, mask)
    x = x + attended
    return x + self.mlp(self.post_attention_layernorm(x)), layer_cache


class Module(nnx.Module):
  """LLaMA causal LM implementing prepare / init_cache / decode / embed (see interface.py)."""

  def __init__(self, config: Config, *, rngs: nnx.Rngs):
    self.config = config
    dtype = jnp.dtype(config.dtype)
    self.embed_tokens = nnx.Embed(config.vocab_size, config.hidden_size, dtype=dtype,
                                  param_dtype=dtype, rngs=rngs)  # embedding [V, D]
    self.layers = nnx.List([DecoderLayer(config, dtype, rngs) for _ in range(config.num_hidden_layers)])
    self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
    # Tied checkpoints reuse the embedding as the output projection; no separate head exists.
    self.lm_head = None if config.tie_word_embeddings else _linear(
        config.hidden_size, config.vocab_size, False, dtype, rngs)  # kernel [D, V]

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
    return tuple({"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}
                 for _ in range(self._layer_count(num_layers)))

  def _hidden_states(self, tokens, start, cache, num_layers):
    """Runs the first `num_layers` blocks: tokens [B, T] -> un-normed [B, T, D], updated cache."""
    count = self._layer_count(num_layers)
    if len(cache) < count:
      raise ValueError(f"the cache holds {len(cache)} layers but {count} are run; build it with "
                       "init_cache(..., num_layers) of the same view.")
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
      return jnp.einsum("BTD,VD->BTV", hidden, self.embed_tokens.embedding[...],
                        preferred_element_type=jnp.float32)
    return jnp.einsum("BTD,DV->BTV", hidden, self.lm_head.kernel[...],
                      preferred_element_type=jnp.float32)

  def embed(self, context) -> jax.Array:
    """float32 [B, D]: the final hidden state of the last real prompt token."""
    return context["last_hidden"].astype(jnp.float32)


def hf_weight_map(config: Config) -> dict[str, tuple[tuple, Any]]:
  """HF tensor name -> (nnx flat state path, transform); Linear weights [out, in] are transposed.

  Args:
    config: the model config (layer count, biases, tying).

  Returns:
    Every tensor the module needs, keyed by its transformers name.
  """
  mapping = {"model.embed_tokens.weight": (("embed_tokens", "embedding"), checkpoint.identity),
             "model.norm.weight": (("norm", "scale"), checkpoint.identity)}
  if config.tie_word_embeddings:  # a stored copy is an alias (the loader checks it is equal)
    mapping["lm_head.weight"] = (("embed_tokens", "embedding"), checkpoint.identity)
  else:
    mapping["lm_head.weight"] = (("lm_head", "kernel"), checkpoint.transpose)
  projections = [("self_attn", p, config.attention_bias) for p in ("q_proj", "k_proj", "v_proj", "o_proj")]
  projections += [("mlp", p, config.mlp_bias) for p in ("gate_proj", "up_proj", "down_proj")]
  for layer in range(config.num_hidden_layers):
    prefix = f"model.layers.{layer}"
    for norm in ("input_layernorm", "post_attention_layernorm"):
      mapping[f"{prefix}.{norm}.weight"] = (("layers", layer, norm, "scale"), checkpoint.identity)
    for block, proj, has_bias in projections:
      mapping[f"{prefix}.{block}.{proj}.weight"] = (("layers", layer, block, proj, "kernel"),
                                                    checkpoint.transpose)
      if has_bias:
        mapping[f"{prefix}.{block}.{proj}.bias"] = (("layers", layer, block, proj, "bias"),
                                                    checkpoint.identity)
  return mapping


def is_ignorable(name: str, config: Config) -> bool:
  """Tensors a checkpoint may carry that the module does not need.

  Args:
    name: the HF tensor name.
    config: the model config.

  Returns:
    True for rotary inverse-frequency buffers (recomputed from the config).
  """
  del config
  return name.endswith("rotary_emb.inv_freq")


def config_for_checkpoint(config: Config, stored_tensors: checkpoint.CheckpointTensors) -> Config:
  """Unties the LM head where transformers 5.23 would not tie it.

  With `tie_word_embeddings` set, transformers ties lm_head.weight to model.embed_tokens.weight,
  unless the checkpoint stores both with different values ("we will NOT tie them"): each then
  keeps its own. Untied configs are never tied.

  Args:
    config: from `Config.from_hf`.
    stored_tensors: the stored tensors (only names and the two tables are looked at).

  Returns:
    `config`, with tie_word_embeddings=False when the stored tables differ.
  """
  tables = ("lm_head.weight", "model.embed_tokens.weight")
  if not config.tie_word_embeddings or not set(tables) <= stored_tensors.names:
    return config
  return config if stored_tensors.equal(*tables) else dataclasses.replace(config, tie_word_embeddings=False)


# ----------------------------------------------------------------------------- growth (models/growth.py)
# Net2Net widening by k, per stored tensor (HF layout, torch Linear weights [out, in]): the axes
# whose units are tiled k times (copy-major: query and key/value heads alike, so every query head
# keeps its own key/value head), and among them the contracted ones (divided by k). The embedding
# is a lookup: tiled, never divided. Every stored LLaMA tensor matches exactly one row.
GROWTH_AXES = (
    (r"^model\.embed_tokens\.weight$", (1,), ()),  # [V, D]
    (r"^lm_head\.weight$", (1,), (1,)),  # [V, D]
    (r"\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)\.weight$", (0, 1), (1,)),  # [out, in]
    (r"\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)\.bias$", (0,), ()),  # [out]
    (r"norm\.weight$", (0,), ()),  # [D]
    (r"rotary_emb\.inv_freq$", (), ()),  # [H/2]: head size unchanged
)
LM_HEAD = "lm_head.weight"  # the output table [V, D] a grown checkpoint always stores untied


def output_scale(config: Config) -> float:
  """What the final hidden state is multiplied by before the LM head: LLaMA does not scale."""
  del config
  return 1.0


def grown_hf_config(hf_config: dict, config: Config, factor: int) -> dict:
  """config.json of the checkpoint widened `factor` times (models/growth.py).

  hidden_size, intermediate_size and both head counts grow k times; head_dim stays and is
  written explicitly (hidden_size / num_attention_heads would give it anyway, but a reader must
  not have to rely on that); the head is stored untied.

  Args:
    hf_config: the source config.json (fields this module does not read are kept).
    config: the source's Config (`from_hf`, then `config_for_checkpoint`).
    factor: k.

  Returns:
    The grown config.json dict.
  """
  return {**hf_config, "hidden_size": config.hidden_size * factor,
          "intermediate_size": config.intermediate_size * factor,
          "num_attention_heads": config.num_attention_heads * factor,
          "num_key_value_heads": config.num_key_value_heads * factor,
          "head_dim": config.head_dim, "tie_word_embeddings": False}

# ----------------------------------------------------------------------------- sharding, memory
# Tensor-parallel layouts per parameter (read by jax_specsel/sharding.py): per dimension the unit
# split on the `model` axis (None: whole), preferred layout first; () replicated (row-parallel
# biases are added after the all-reduce).
SHARDING_RULES = (
    (r"^embed_tokens/embedding$", (("vocab", None), (None, "embed"))),  # [V, D]
    (r"^lm_head/kernel$", ((None, "vocab"), ("embed", None))),  # [D, V]
    (r"self_attn/q_proj/kernel$", ((None, "heads"),)),  # [D, N*H]
    (r"self_attn/q_proj/bias$", (("heads",),)),  # [N*H]
    (r"self_attn/[kv]_proj/kernel$", ((None, "kv_heads"),)),  # [D, K*H]
    (r"self_attn/[kv]_proj/bias$", (("kv_heads",),)),  # [K*H]
    (r"self_attn/o_proj/kernel$", (("heads", None),)),  # [N*H, D]
    (r"mlp/(gate|up)_proj/kernel$", ((None, "mlp"),)),  # [D, F]
    (r"mlp/(gate|up)_proj/bias$", (("mlp",),)),  # [F]
    (r"mlp/down_proj/kernel$", (("mlp", None),)),  # [F, D]
    (r"(o_proj|down_proj)/bias$", ()),  # [D]
    (r"scale$", ()),  # [D]
)


def dimensions(config: Config) -> dict[str, int]:
  """Unit counts the sharding rules split in, and the widths of the memory estimate's formula.

  Returns:
    {"vocab", "embed", "heads", "kv_heads", "head_dim", "mlp", "mlp_hidden_tensors" (the
     [tokens, F] temporaries of one SwiGLU: gate, up and their product)}.
  """
  return {"vocab": config.vocab_size, "embed": config.hidden_size,
          "heads": config.num_attention_heads, "kv_heads": config.num_key_value_heads,
          "head_dim": config.head_dim, "mlp": config.intermediate_size, "mlp_hidden_tensors": 3}


def context_bytes(config: Config, rows: int, source_length: int, heads: int) -> int:
  """Bytes of `prepare`'s context: the float32 last hidden state [B, D] (the prompt itself is in
  the cache).

  Args:
    config: the model config.
    rows: batch rows held per device.
    source_length, heads: not used (the context does not grow with them).
  """
  del source_length, heads
  return rows * config.hidden_size * 4
