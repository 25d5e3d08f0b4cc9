"""LLaMA's hyper-parameters: `Config`, read from a HuggingFace config.json and written back to one.

`Config.from_hf` reads transformers' v4 (`rope_scaling`) and v5 (`rope_parameters`) layouts and
refuses what this implementation does not run (another activation, another rope type, partial
rotary embeddings); `Config.to_hf` is its inverse for export.

Token ids are the ones transformers' `generate` uses (`checkpoint.generation_ids`): the stop ids
`eos_token_ids` come from generation_config.json when the checkpoint has one, else config.json;
a null / absent `eos_token_id` means no stop id (generation runs to max_new_tokens), a list means
several. `pad_token_id` falls back to the first stop id (LLaMA checkpoints usually define no pad
token; padded positions are masked anyway). `eos_token_id` is the first stop id, or None.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from jax_specsel.models import checkpoint
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
          f"config.json: hidden_act={hidden_act!r}; this LLaMA implementation supports only "
          "'silu'."
      )
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
      rope.update(
          low_freq_factor=self.rope_low_freq_factor,
          high_freq_factor=self.rope_high_freq_factor,
          original_max_position_embeddings=self.rope_original_max_position_embeddings,
      )
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": self.model_type,
        "vocab_size": self.vocab_size,
        "hidden_size": self.hidden_size,
        "intermediate_size": self.intermediate_size,
        "num_hidden_layers": self.num_hidden_layers,
        "num_attention_heads": self.num_attention_heads,
        "num_key_value_heads": self.num_key_value_heads,
        "head_dim": self.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": self.rms_norm_eps,
        "rope_parameters": rope,
        "max_position_embeddings": self.max_position_embeddings,
        "tie_word_embeddings": self.tie_word_embeddings,
        "attention_bias": self.attention_bias,
        "mlp_bias": self.mlp_bias,
        "pad_token_id": self.pad_token_id,
        "bos_token_id": self.bos_token_id,
        "eos_token_id": checkpoint.eos_field(self.eos_token_ids),
        "dtype": self.dtype,
    }


def _sizes(hf_config: dict) -> dict[str, int]:
  """The size fields of config.json, each a whole number >= 1; heads a multiple of K/V heads."""
  size = lambda name, default=checkpoint.REQUIRED: checkpoint.config_integer(
      hf_config, name, default
  )
  hidden, heads = size("hidden_size"), size("num_attention_heads")
  kv_heads = size("num_key_value_heads", heads)
  if heads % kv_heads:
    raise checkpoint.InvalidConfigError(
        f"config.json: num_attention_heads={heads} is not a multiple of num_key_value_heads="
        f"{kv_heads}: grouped-query attention shares each K/V head among a whole number of query "
        "heads. Fix one of the two in config.json."
    )
  head_dim = size("head_dim", hidden // heads)
  if head_dim < 1:  # the default, hidden_size // num_attention_heads, is 0
    raise checkpoint.InvalidConfigError(
        f"config.json: hidden_size={hidden} is smaller than num_attention_heads={heads}, so the "
        "heads would have width 0: fix hidden_size or num_attention_heads, or set head_dim."
    )
  return dict(
      vocab_size=size("vocab_size"),
      hidden_size=hidden,
      intermediate_size=size("intermediate_size"),
      num_hidden_layers=size("num_hidden_layers"),
      num_attention_heads=heads,
      num_key_value_heads=kv_heads,
      head_dim=head_dim,
      max_position_embeddings=size("max_position_embeddings", 2048),
  )


def _rope_fields(hf_config: dict) -> dict[str, Any]:
  """Rotary settings from `rope_parameters` (transformers 5) or `rope_scaling` + `rope_theta`."""
  params = dict(hf_config.get("rope_parameters") or hf_config.get("rope_scaling") or {})
  if any(isinstance(v, dict) for v in params.values()):
    raise UnsupportedModelError(
        f"config.json: per-layer-type rope parameters {sorted(params)} are not supported by LLaMA."
    )
  rope_type = params.get("rope_type", params.get("type", "default"))
  if rope_type not in _ROPE_TYPES:
    raise UnsupportedModelError(
        f"config.json: rope type {rope_type!r} is not supported; supported: {list(_ROPE_TYPES)}."
    )
  partial = params.get("partial_rotary_factor", hf_config.get("partial_rotary_factor", 1.0))
  if partial not in (None, 1.0):
    raise UnsupportedModelError(
        f"config.json: partial_rotary_factor={partial} is not supported (LLaMA rotates all dims)."
    )
  nested = "rope_parameters" if hf_config.get("rope_parameters") else "rope_scaling"
  real = lambda name, default=checkpoint.REQUIRED: checkpoint.config_real(
      params, f"{nested}.{name}", default, positive=True
  )
  theta = real(
      "rope_theta", checkpoint.config_real(hf_config, "rope_theta", 10000.0, positive=True)
  )
  fields = {"rope_type": rope_type, "rope_theta": theta}
  if rope_type in ("linear", "llama3"):
    fields["rope_factor"] = real("factor")
  if rope_type == "llama3":
    fields["rope_low_freq_factor"] = real("low_freq_factor")
    fields["rope_high_freq_factor"] = real("high_freq_factor")
    fields["rope_original_max_position_embeddings"] = checkpoint.config_integer(
        params,
        f"{nested}.original_max_position_embeddings",
        checkpoint.config_integer(hf_config, "max_position_embeddings", 2048),
    )
  return fields
