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

Precision (measured with tests/test_t5.py's tiny random models): float32 matches transformers
PyTorch float32 to max|ours - ref| / max|ref| < 1e-6 (the tests allow 1e-4). bfloat16 weights and
activations give max|bf16 - f32| / max|f32| of 0.5-1.2% (the tests allow 5%) with greedy argmax
agreeing on >= 98% of positions (the tests require 90%); that is bfloat16's 8-bit mantissa.
float16 runs but, unlike transformers, does not clamp infinities between blocks: original T5
checkpoints are known to overflow in float16, so prefer bfloat16.

Checkpoint names: `shared.weight`, `encoder.embed_tokens.weight`, `decoder.embed_tokens.weight`,
`lm_head.weight`, `{encoder,decoder}.block.N.layer.*`, `{encoder,decoder}.final_layer_norm.weight`.

Embedding tables are tied exactly where transformers 5.23 ties them (`config_for_checkpoint`):
its T5Config always sets tie_word_embeddings=True, so from_pretrained ties encoder.embed_tokens,
decoder.embed_tokens and lm_head to shared.weight, except a table the checkpoint stores with
values *different* from shared.weight, which keeps its own. Real checkpoints store the input
tables equal to (or not at all besides) shared.weight: they load as one table, no extra
parameter. A model saved with `config.tie_word_embeddings = False` set after construction (the
way to build a v1.1/Flan-style random T5 in 5.23) has independent random encoder/decoder tables:
`separate_encoder_embeddings` / `separate_decoder_embeddings` give each stack its own table.

Shapes use dimension letters: B batch, S source length, T decoder query length, L cache length,
D d_model, N heads, H d_kv, I = N * H, F d_ff, V vocabulary, R relative-position buckets.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, ClassVar

import jax
import jax.numpy as jnp
from flax import nnx

from jax_specsel.models import activations, attention, checkpoint


@dataclasses.dataclass(frozen=True)
class Config:
  """T5 hyper-parameters (hashable: it is part of the nnx graphdef, a jit static argument)."""

  vocab_size: int = 32128
  d_model: int = 512
  d_kv: int = 64  # per-head width H; the attention inner width is num_heads * d_kv
  d_ff: int = 2048
  num_heads: int = 8
  num_layers: int = 6  # encoder blocks
  num_decoder_layers: int = 6
  relative_attention_num_buckets: int = 32
  relative_attention_max_distance: int = 128
  dense_act_fn: str = "relu"  # a key of activations.ACTIVATIONS ("gated-gelu" means gated gelu_new)
  is_gated_act: bool = False  # v1.1/Flan: act(x wi_0) * (x wi_1)
  layer_norm_epsilon: float = 1e-6
  tie_word_embeddings: bool = True  # LM head = shared embedding
  scale_decoder_outputs: bool = True  # multiply the final hidden by d_model**-0.5
  separate_encoder_embeddings: bool = False  # the encoder has its own input table (not shared)
  separate_decoder_embeddings: bool = False  # the decoder has its own input table (not shared)
  pad_token_id: int = 0
  eos_token_ids: tuple[int, ...] = (1,)  # stop ids; () runs every row to max_new_tokens
  decoder_start_token_id: int = 0
  dtype: str = "float32"  # parameters, activations and caches
  matmul_precision: str = "auto"  # see interface.matmul_precision: float32 runs at "highest"

  model_type: ClassVar[str] = "t5"  # config.json's model_type (models/registry.py)
  is_encoder_decoder: ClassVar[bool] = True

  @property
  def hidden_size(self) -> int:
    return self.d_model

  @property
  def inner_dim(self) -> int:
    return self.num_heads * self.d_kv

  @property
  def eos_token_id(self) -> int | None:
    """The first stop id, None when there is none."""
    return self.eos_token_ids[0] if self.eos_token_ids else None

  @property
  def uses_shared_embedding(self) -> bool:
    """False when the encoder, the decoder and the LM head all have their own tables."""
    return not (self.separate_encoder_embeddings and self.separate_decoder_embeddings
                and not self.tie_word_embeddings)

  @classmethod
  def from_dict(cls, fields: dict) -> Config:
    """A Config from `dataclasses.asdict` output read back from JSON (lists become tuples).

    Records written before stop ids were a tuple carry a single `eos_token_id`: it is kept.
    """
    fields = dict(fields)
    if "eos_token_id" in fields:
      eos = fields.pop("eos_token_id")
      fields.setdefault("eos_token_ids", () if eos is None else (eos,))
    fields["eos_token_ids"] = tuple(fields.get("eos_token_ids", cls.eos_token_ids))
    return cls(**fields)

  @property
  def params_per_decoder_layer(self) -> int:
    """Weights of one decoder block (self-attn, cross-attn, feed-forward, three norms)."""
    attention_params = 2 * 4 * self.d_model * self.inner_dim
    feed_forward_params = (3 if self.is_gated_act else 2) * self.d_model * self.d_ff
    return attention_params + feed_forward_params + 3 * self.d_model

  @classmethod
  def from_hf(cls, hf_config: dict, dtype: str, generation_config: dict | None = None) -> Config:
    """Reads a parsed HuggingFace T5 config.json the way transformers 5.23 interprets it.

    Stop, pad and decoder-start ids are transformers' `generate` ones (`checkpoint.generation_ids`:
    generation_config.json when there is one, else config.json). Where transformers would raise
    for want of a decoder start id, T5's convention is kept: the decoder starts from config.json's
    pad id (0 when unset, T5Config's default).
    `tie_word_embeddings` here is config.json's flag; `config_for_checkpoint` then decides from
    the stored weights, as transformers does.

    Args:
      hf_config: the parsed config.json.
      dtype: "float32", "bfloat16" or "float16".
      generation_config: the parsed generation_config.json, or None when there is none.

    Returns:
      The Config.

    Raises:
      InvalidConfigError: a field of the wrong type or range (naming it, its value and the fix),
        an unknown or malformed `feed_forward_proj`, a stop id outside the vocabulary.
    """
    act, gated = _feed_forward(hf_config)
    sizes = _sizes(hf_config)
    ids = checkpoint.generation_ids(hf_config, generation_config, sizes["vocab_size"])
    tie = checkpoint.config_flag(hf_config, "tie_word_embeddings", True)
    scale = checkpoint.config_flag(hf_config, "scale_decoder_outputs", tie)
    pad = checkpoint.config_integer(hf_config, "pad_token_id", 0, minimum=None)
    return cls(
        **sizes,
        dense_act_fn=act,
        is_gated_act=gated,
        layer_norm_epsilon=checkpoint.config_real(hf_config, "layer_norm_epsilon", 1e-6),
        tie_word_embeddings=tie,
        scale_decoder_outputs=scale,
        pad_token_id=ids.pad_token_id,
        eos_token_ids=ids.eos_token_ids,
        decoder_start_token_id=(ids.decoder_start_token_id if ids.decoder_start_token_id is not None
                                else pad or 0),
        dtype=dtype,
    )

  def to_hf(self) -> dict:
    """config.json fields transformers 5.x reads back as this architecture (`from_hf`'s inverse).

    Both output flags are written: transformers takes the head's scaling from
    `scale_decoder_outputs` when saved, and ties the tables from the stored weights.

    Returns:
      A JSON-serializable dict.

    Raises:
      ValueError: a gated exact-gelu feed-forward, which no `feed_forward_proj` names
        (transformers reads "gated-gelu" as gelu_new).
    """
    return {
        "architectures": ["T5ForConditionalGeneration"], "model_type": self.model_type,
        "is_encoder_decoder": True, "vocab_size": self.vocab_size, "d_model": self.d_model,
        "d_kv": self.d_kv, "d_ff": self.d_ff, "num_heads": self.num_heads,
        "num_layers": self.num_layers, "num_decoder_layers": self.num_decoder_layers,
        "relative_attention_num_buckets": self.relative_attention_num_buckets,
        "relative_attention_max_distance": self.relative_attention_max_distance,
        "feed_forward_proj": self._feed_forward_proj(),
        "layer_norm_epsilon": self.layer_norm_epsilon,
        "tie_word_embeddings": self.tie_word_embeddings,
        "scale_decoder_outputs": self.scale_decoder_outputs,
        "pad_token_id": self.pad_token_id,
        "eos_token_id": checkpoint.eos_field(self.eos_token_ids),
        "decoder_start_token_id": self.decoder_start_token_id, "dtype": self.dtype,
    }

  def _feed_forward_proj(self) -> str:
    if not self.is_gated_act:
      return self.dense_act_fn
    if self.dense_act_fn == "gelu_new":
      return "gated-gelu"  # transformers' legacy name of gated gelu_new
    if self.dense_act_fn == "gelu":
      raise ValueError("a gated exact-gelu T5 feed-forward has no feed_forward_proj name "
                       "(transformers reads 'gated-gelu' as gelu_new); it cannot be exported.")
    return f"gated-{self.dense_act_fn}"


def _feed_forward(hf_config: dict) -> tuple[str, bool]:
  """(activation, gated) from `feed_forward_proj` ("ACT" or "gated-ACT")."""
  proj = hf_config.get("feed_forward_proj", "relu")
  parts = proj.split("-") if isinstance(proj, str) else []
  if not parts or len(parts) > 2 or (len(parts) == 2 and parts[0] != "gated"):
    raise checkpoint.InvalidConfigError(
        f"config.json: feed_forward_proj={proj!r} is not of the form 'ACT' or 'gated-ACT'; fix "
        "it in config.json (e.g. 'relu' or 'gated-gelu').")
  act = "gelu_new" if proj == "gated-gelu" else parts[-1]  # transformers' legacy special case
  if act not in activations.ACTIVATIONS:
    raise checkpoint.InvalidConfigError(
        f"config.json: feed_forward_proj={proj!r}: activation {act!r} is not supported; "
        f"supported: {sorted(activations.ACTIVATIONS)}.")
  return act, len(parts) == 2


def _sizes(hf_config: dict) -> dict[str, int]:
  """The size fields of config.json, each a whole number >= 1 (T5Config's defaults when absent)."""
  size = lambda name, default: checkpoint.config_integer(hf_config, name, default)
  num_layers = size("num_layers", 6)
  return dict(
      vocab_size=size("vocab_size", 32128), d_model=size("d_model", 512), d_kv=size("d_kv", 64),
      d_ff=size("d_ff", 2048), num_heads=size("num_heads", 8), num_layers=num_layers,
      num_decoder_layers=size("num_decoder_layers", num_layers),
      relative_attention_num_buckets=size("relative_attention_num_buckets", 32),
      relative_attention_max_distance=size("relative_attention_max_distance", 128))


def relative_position_bucket(relative_position: jax.Array, *, bidirectional: bool,
                             num_buckets: int, max_distance: int) -> jax.Array:
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
  # the maximum(., 1) only keeps log finite where the small-distance branch discards the value anyway.
  log_ratio = jnp.log(jnp.maximum(distance, 1).astype(jnp.float32) / max_exact)
  large = max_exact + (log_ratio / math.log(max_distance / max_exact)
                       * (num_buckets - max_exact)).astype(jnp.int32)
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

  def __init__(self, config: Config, *, has_relative_bias: bool, bidirectional: bool,
               rngs: nnx.Rngs):
    d, i, dtype = config.d_model, config.inner_dim, _dtype(config.dtype)
    self.num_heads, self.head_dim = config.num_heads, config.d_kv
    self.bidirectional = bidirectional
    self.num_buckets = config.relative_attention_num_buckets
    self.max_distance = config.relative_attention_max_distance
    # The same initial scales as transformers' T5 (the q scale absorbs the missing 1/sqrt(H)).
    self.q = _normal(rngs, (d, i), (d * config.d_kv) ** -0.5, dtype)  # [D, I]
    self.k = _normal(rngs, (d, i), d ** -0.5, dtype)  # [D, I]
    self.v = _normal(rngs, (d, i), d ** -0.5, dtype)  # [D, I]
    self.o = _normal(rngs, (i, d), i ** -0.5, dtype)  # [I, D]
    self.relative_bias = (_normal(rngs, (self.num_buckets, config.num_heads), d ** -0.5, dtype)
                          if has_relative_bias else None)  # [R, N]

  def _heads(self, x: jax.Array, kernel: nnx.Param) -> jax.Array:
    out = jnp.einsum("BTD,DI->BTI", x, kernel[...])
    return out.reshape(*out.shape[:2], self.num_heads, self.head_dim)  # [B, T, N, H]

  def key_value(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Keys and values [B, T, N, H] of inputs x [B, T, D]."""
    return self._heads(x, self.k), self._heads(x, self.v)

  def __call__(self, x: jax.Array, key: jax.Array, value: jax.Array, mask: jax.Array,
               bias: jax.Array | None) -> jax.Array:
    """Attends queries from x [B, T, D] to key/value [B, L, N, H]; returns [B, T, D]."""
    query = self._heads(x, self.q)
    out = attention.dot_attention(query, key, value, mask, bias, scale=1.0)  # [B, T, N, H]
    out = out.reshape(*out.shape[:2], -1)
    return jnp.einsum("BTI,ID->BTD", out, self.o[...])

  def position_bias(self, query_positions: jax.Array, key_length: int) -> jax.Array:
    """Relative position bias [B, N, T, L] for queries at query_positions [B, T], keys 0..L-1."""
    relative = jnp.arange(key_length)[None, None, :] - query_positions[:, :, None]  # [B, T, L]
    buckets = relative_position_bucket(relative, bidirectional=self.bidirectional,
                                       num_buckets=self.num_buckets, max_distance=self.max_distance)
    values = jnp.take(self.relative_bias[...], buckets, axis=0)  # [B, T, L, N]
    return values.transpose(0, 3, 1, 2)


class FeedForward(nnx.Module):
  """T5 feed-forward: wo(act(x wi)), or v1.1/Flan's gated wo(act(x wi_0) * (x wi_1))."""

  def __init__(self, config: Config, *, rngs: nnx.Rngs):
    d, f, dtype = config.d_model, config.d_ff, _dtype(config.dtype)
    self.activation = config.dense_act_fn
    self.is_gated = config.is_gated_act
    if self.is_gated:
      self.wi_0 = _normal(rngs, (d, f), d ** -0.5, dtype)  # [D, F]
      self.wi_1 = _normal(rngs, (d, f), d ** -0.5, dtype)  # [D, F]
    else:
      self.wi = _normal(rngs, (d, f), d ** -0.5, dtype)  # [D, F]
    self.wo = _normal(rngs, (f, d), f ** -0.5, dtype)  # [F, D]

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

  def __init__(self, config: Config, *, is_decoder: bool, has_relative_bias: bool,
               rngs: nnx.Rngs):
    self.self_attention_norm = LayerNorm(config)
    self.self_attention = Attention(config, has_relative_bias=has_relative_bias,
                                    bidirectional=not is_decoder, rngs=rngs)
    if is_decoder:
      self.cross_attention_norm = LayerNorm(config)
      self.cross_attention = Attention(config, has_relative_bias=False, bidirectional=True,
                                       rngs=rngs)
    self.feed_forward_norm = LayerNorm(config)
    self.feed_forward = FeedForward(config, rngs=rngs)

  def encode(self, x: jax.Array, mask: jax.Array, bias: jax.Array) -> jax.Array:
    """Encoder block on x [B, S, D] with a [B, S, S] padding mask and [1, N, S, S] bias."""
    normed = self.self_attention_norm(x)
    key, value = self.self_attention.key_value(normed)
    x = x + self.self_attention(normed, key, value, mask, bias)
    return x + self.feed_forward(self.feed_forward_norm(x))

  def decode(self, x: jax.Array, start: jax.Array, layer_cache: dict, self_mask: jax.Array,
             bias: jax.Array, cross_kv: tuple[jax.Array, jax.Array],
             cross_mask: jax.Array) -> tuple[jax.Array, dict]:
    """Decoder block on x [B, T, D]: writes its K/V at start.. and returns (x, layer cache).

    cross_kv holds [B, N, S, H] arrays (see `Module.prepare`); the transposes below cancel
    against that storage layout inside XLA, so no copy is made per step.
    """
    normed = self.self_attention_norm(x)
    key, value = self.self_attention.key_value(normed)  # [B, T, N, H]
    layer_cache = {"k": attention.write_at_positions(layer_cache["k"], key, start),
                   "v": attention.write_at_positions(layer_cache["v"], value, start)}
    x = x + self.self_attention(normed, layer_cache["k"], layer_cache["v"], self_mask, bias)
    cross_key, cross_value = (kv.transpose(0, 2, 1, 3) for kv in cross_kv)  # [B, S, N, H]
    x = x + self.cross_attention(self.cross_attention_norm(x), cross_key, cross_value,
                                 cross_mask, None)
    return x + self.feed_forward(self.feed_forward_norm(x)), layer_cache


class Stack(nnx.Module):
  """The encoder or decoder blocks plus the final layer norm (and, untied, its input table)."""

  def __init__(self, config: Config, num_blocks: int, *, is_decoder: bool, own_embeddings: bool,
               rngs: nnx.Rngs):
    self.embed_tokens = (_normal(rngs, (config.vocab_size, config.d_model), 1.0,
                                 _dtype(config.dtype)) if own_embeddings else None)  # [V, D]
    self.blocks = nnx.List([Block(config, is_decoder=is_decoder, has_relative_bias=i == 0,
                                  rngs=rngs) for i in range(num_blocks)])
    self.final_norm = LayerNorm(config)

  def position_bias(self, query_positions: jax.Array, key_length: int) -> jax.Array:
    """[B, N, T, L]: the first block's table, shared by every block of the stack (as in HF)."""
    return self.blocks[0].self_attention.position_bias(query_positions, key_length)


class Module(nnx.Module):
  """T5ForConditionalGeneration in nnx with the prepare / init_cache / decode / embed protocol."""

  def __init__(self, config: Config, *, rngs: nnx.Rngs):
    self.config = config
    dtype = _dtype(config.dtype)
    self.shared = (_normal(rngs, (config.vocab_size, config.d_model), 1.0, dtype)
                   if config.uses_shared_embedding else None)  # [V, D]
    self.encoder = Stack(config, config.num_layers, is_decoder=False,
                         own_embeddings=config.separate_encoder_embeddings, rngs=rngs)
    self.decoder = Stack(config, config.num_decoder_layers, is_decoder=True,
                         own_embeddings=config.separate_decoder_embeddings, rngs=rngs)
    self.lm_head = (None if config.tie_word_embeddings else
                    _normal(rngs, (config.d_model, config.vocab_size), 1.0, dtype))  # [D, V]

  def _embed_tokens(self, ids: jax.Array, stack: Stack) -> jax.Array:
    """[B, T] ids -> [B, T, D] through the stack's own table, else the shared one."""
    table = self.shared if stack.embed_tokens is None else stack.embed_tokens
    return jnp.take(table[...], ids, axis=0)

  def prepare(self, prompt_ids: jax.Array, prompt_mask: jax.Array, cache: Any,
              num_layers: int | None = None) -> tuple[dict, Any]:
    """Runs the encoder once and precomputes every decoder layer's cross-attention K/V.

    Args:
      prompt_ids: int [B, S], right-padded (any id where prompt_mask is 0).
      prompt_mask: {0,1} [B, S], 1 for real tokens.
      cache: the decoder cache; returned unchanged.
      num_layers: ignored (T5 has no early-exit view).

    Returns:
      (context, cache) with context = {"encoder_states": [B, S, D], "encoder_mask": int32 [B, S],
      "cross_kv": per decoder layer (k, v), each [B, N, S, H]}. Heads-major K/V is the layout
      the attention dots read; stored [B, S, N, H] they would be transposed (copied) in every
      decode step, which costs ~2x the cross-attention time on CPU.
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
    cross_kv = tuple(tuple(kv.transpose(0, 2, 1, 3) for kv in block.cross_attention.key_value(states))
                     for block in self.decoder.blocks)
    context = {"encoder_states": states, "encoder_mask": prompt_mask, "cross_kv": cross_kv}
    return context, cache

  def init_cache(self, batch: int, max_len: int, dtype, num_layers: int | None = None) -> tuple:
    """Zero self-attention K/V buffers: per decoder layer {"k", "v"} of [B, L, N, H] in dtype."""
    del num_layers
    shape = (batch, max_len, self.config.num_heads, self.config.d_kv)
    zeros = jnp.zeros(shape, _dtype(dtype))
    return tuple({"k": zeros, "v": zeros} for _ in range(self.config.num_decoder_layers))

  def decode(self, tokens: jax.Array, start: jax.Array, cache: tuple, context: dict,
             num_layers: int | None = None) -> tuple[jax.Array, tuple]:
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
      hidden = hidden * jnp.asarray(self.config.d_model ** -0.5, hidden.dtype)
    if self.lm_head is None:
      return jnp.einsum("BTD,VD->BTV", hidden, self.shared[...],
                        preferred_element_type=jnp.float32)
    return jnp.einsum("BTD,DV->BTV", hidden, self.lm_head[...], preferred_element_type=jnp.float32)

  def embed(self, context: dict) -> jax.Array:
    """Encoder final states mean-pooled over real tokens: float32 [B, D]."""
    states = context["encoder_states"].astype(jnp.float32)
    mask = context["encoder_mask"].astype(jnp.float32)
    total = jnp.einsum("BSD,BS->BD", states, mask)
    return total / jnp.maximum(mask.sum(axis=1, keepdims=True), 1.0)


def _attention_names(prefix: str, path: tuple, with_bias: bool) -> dict:
  names = {f"{prefix}.{p}.weight": (path + (p,), checkpoint.transpose) for p in "qkvo"}
  if with_bias:
    names[f"{prefix}.relative_attention_bias.weight"] = (path + ("relative_bias",), checkpoint.identity)
  return names


def _feed_forward_names(prefix: str, path: tuple, config: Config) -> dict:
  inputs = ("wi_0", "wi_1") if config.is_gated_act else ("wi",)
  return {f"{prefix}.DenseReluDense.{p}.weight": (path + ("feed_forward", p), checkpoint.transpose)
          for p in inputs + ("wo",)}


def _block_names(stack: str, index: int, config: Config) -> dict:
  prefix, path = f"{stack}.block.{index}.layer", (stack, "blocks", index)
  names = _attention_names(f"{prefix}.0.SelfAttention", path + ("self_attention",), index == 0)
  names[f"{prefix}.0.layer_norm.weight"] = (path + ("self_attention_norm", "scale"), checkpoint.identity)
  ff = 1
  if stack == "decoder":
    names.update(_attention_names(f"{prefix}.1.EncDecAttention", path + ("cross_attention",), False))
    names[f"{prefix}.1.layer_norm.weight"] = (path + ("cross_attention_norm", "scale"),
                                              checkpoint.identity)
    ff = 2
  names.update(_feed_forward_names(f"{prefix}.{ff}", path, config))
  names[f"{prefix}.{ff}.layer_norm.weight"] = (path + ("feed_forward_norm", "scale"), checkpoint.identity)
  return names


def hf_weight_map(config: Config) -> dict[str, tuple[tuple, Callable]]:
  """Every HF tensor name the module needs -> (nnx flat state path, transform).

  A table tied to shared.weight is an alias of the same parameter, so a checkpoint that stores
  any one of them loads (the loader checks completeness by parameter path and that stored
  aliases are equal); a separate table maps to its own parameter.
  """
  names = {}
  if config.uses_shared_embedding:
    names["shared.weight"] = (("shared",), checkpoint.identity)
  for stack, separate in (("encoder", config.separate_encoder_embeddings),
                          ("decoder", config.separate_decoder_embeddings)):
    names[f"{stack}.embed_tokens.weight"] = (((stack, "embed_tokens") if separate else ("shared",)),
                                             checkpoint.identity)
  for index in range(config.num_layers):
    names.update(_block_names("encoder", index, config))
  for index in range(config.num_decoder_layers):
    names.update(_block_names("decoder", index, config))
  names["encoder.final_layer_norm.weight"] = (("encoder", "final_norm", "scale"), checkpoint.identity)
  names["decoder.final_layer_norm.weight"] = (("decoder", "final_norm", "scale"), checkpoint.identity)
  if config.tie_word_embeddings:
    names["lm_head.weight"] = (("shared",), checkpoint.identity)  # a stored copy of the tied table
  else:
    names["lm_head.weight"] = (("lm_head",), checkpoint.transpose)
  return names


def is_ignorable(name: str, config: Config) -> bool:
  """Checkpoint tensors that are unused (transformers ignores them too).

  Old checkpoints carry a cross-attention bias table that T5 never uses; shared.weight is unused
  when the encoder, the decoder and the LM head each have their own table.
  """
  if name == "shared.weight":
    return not config.uses_shared_embedding
  return name == "decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight"


_TIED_TABLES = ("shared.weight", "encoder.embed_tokens.weight", "decoder.embed_tokens.weight",
                "lm_head.weight")  # transformers' _tied_weights_keys, source first


def config_for_checkpoint(config: Config, stored_tensors: checkpoint.CheckpointTensors) -> Config:
  """Which tables the stored weights tie, decided as transformers 5.23's from_pretrained does.

  T5Config forces tie_word_embeddings=True, so encoder.embed_tokens, decoder.embed_tokens and
  lm_head are tied to shared.weight, except a table stored with values different from it
  ("both are present in the checkpoints with different values, so we will NOT tie them"),
  which keeps its own. With shared.weight absent the first stored alias takes its place.

  Args:
    config: from `Config.from_hf` (its tie_word_embeddings is config.json's flag).
    stored_tensors: the stored tensors (names, and the embedding tables when several are stored).

  Returns:
    The config with tie_word_embeddings and separate_{encoder,decoder}_embeddings set.
  """
  stored = [name for name in _TIED_TABLES if name in stored_tensors.names]
  if not stored:
    return config  # the loader reports shared.weight as missing

  def own_table(name: str) -> bool:
    return name in stored[1:] and not stored_tensors.equal(name, stored[0])

  return dataclasses.replace(
      config, tie_word_embeddings=not own_table("lm_head.weight"),
      separate_encoder_embeddings=own_table("encoder.embed_tokens.weight"),
      separate_decoder_embeddings=own_table("decoder.embed_tokens.weight"))


# ----------------------------------------------------------------------------- growth (models/growth.py)
# Net2Net widening by k, per stored tensor (HF layout, torch Linear weights [out, in]): the axes
# whose units are tiled k times (copy-major), and among them the contracted ones (summed over by
# the product, so the tiled tensor is divided by k there). Embedding tables are lookups: tiled,
# never divided. Every stored T5 tensor matches exactly one row.
GROWTH_AXES = (
    (r"^(shared|(encoder|decoder)\.embed_tokens)\.weight$", (1,), ()),  # [V, D]
    (r"^lm_head\.weight$", (1,), (1,)),  # [V, D]
    (r"\.(SelfAttention|EncDecAttention)\.[qkv]\.weight$", (0, 1), (1,)),  # [N*H, D]
    (r"\.(SelfAttention|EncDecAttention)\.o\.weight$", (0, 1), (1,)),  # [D, N*H]
    (r"\.relative_attention_bias\.weight$", (1,), ()),  # [R, N]: per head
    (r"\.DenseReluDense\.wi(_0|_1)?\.weight$", (0, 1), (1,)),  # [F, D]
    (r"\.DenseReluDense\.wo\.weight$", (0, 1), (1,)),  # [D, F]
    (r"layer_norm\.weight$", (0,), ()),  # [D]
)
LM_HEAD = "lm_head.weight"  # the output table [V, D] a grown checkpoint always stores untied


def output_scale(config: Config) -> float:
  """What the final hidden state is multiplied by before the LM head (d_model**-0.5 or 1)."""
  return config.d_model ** -0.5 if config.scale_decoder_outputs else 1.0


def grown_hf_config(hf_config: dict, config: Config, factor: int) -> dict:
  """config.json of the checkpoint widened `factor` times (models/growth.py).

  d_model, d_ff and num_heads grow k times, d_kv stays; the head is stored untied with the
  scaling folded in, so both output flags are false.

  Args:
    hf_config: the source config.json (fields this module does not read are kept).
    config: the source's Config (`from_hf`, then `config_for_checkpoint`).
    factor: k.

  Returns:
    The grown config.json dict.
  """
  return {**hf_config, "d_model": config.d_model * factor, "d_ff": config.d_ff * factor,
          "num_heads": config.num_heads * factor, "d_kv": config.d_kv,
          "tie_word_embeddings": False, "scale_decoder_outputs": False}

# ----------------------------------------------------------------------------- sharding, memory
# Tensor-parallel layouts per parameter (read by jax_specsel/sharding.py): per dimension the unit
# split on the `model` axis (None: whole), preferred layout first; () replicated (small tensors).
SHARDING_RULES = (
    (r"^shared$", (("vocab", None), (None, "embed"))),  # [V, D]
    (r"^(encoder|decoder)/embed_tokens$", (("vocab", None), (None, "embed"))),  # [V, D] untied
    (r"^lm_head$", ((None, "vocab"), ("embed", None))),  # [D, V]
    (r"_attention/[qkv]$", ((None, "heads"),)),  # [D, N*H]
    (r"_attention/o$", (("heads", None),)),  # [N*H, D]
    (r"_attention/relative_bias$", ()),  # [R, N]
    (r"feed_forward/wi(_0|_1)?$", ((None, "mlp"),)),  # [D, F]
    (r"feed_forward/wo$", (("mlp", None),)),  # [F, D]
    (r"scale$", ()),  # [D]
)


def dimensions(config: Config) -> dict[str, int]:
  """Unit counts the sharding rules split in, and the widths of the memory estimate's formula.

  Returns:
    {"vocab", "embed", "heads", "kv_heads" (= heads: no grouped-query attention), "head_dim",
     "mlp", "mlp_hidden_tensors" ([tokens, F] temporaries of one feed-forward: 3 gated, else 2)}.
  """
  return {"vocab": config.vocab_size, "embed": config.d_model, "heads": config.num_heads,
          "kv_heads": config.num_heads, "head_dim": config.d_kv, "mlp": config.d_ff,
          "mlp_hidden_tensors": 3 if config.is_gated_act else 2}


def context_bytes(config: Config, rows: int, source_length: int, heads: int) -> int:
  """Bytes of `prepare`'s context, alive for the whole generation: encoder states [B, S, D], their
  int32 mask and every decoder layer's cross-attention K/V [B, N, S, H].

  Args:
    rows, source_length: B per device, and S. heads: the heads per device (N, or N / model).
  """
  itemsize = jnp.dtype(config.dtype).itemsize
  states = rows * source_length * config.d_model * itemsize + rows * source_length * 4
  cross_kv = 2 * config.num_decoder_layers * rows * heads * source_length * config.d_kv * itemsize
  return states + cross_kv
