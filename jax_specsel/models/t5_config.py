"""T5's hyper-parameters: `Config`, read from a HuggingFace config.json and written back to one.

`Config.from_hf` reads config.json the way transformers 5.23 interprets it (sizes, the
feed-forward's activation, the output flags, and the stop / pad / decoder-start ids of
`checkpoint.generation_ids`); `Config.to_hf` is its inverse for export.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from jax_specsel.models import activations, checkpoint


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
    return not (
        self.separate_encoder_embeddings
        and self.separate_decoder_embeddings
        and not self.tie_word_embeddings
    )

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
        decoder_start_token_id=(
            ids.decoder_start_token_id if ids.decoder_start_token_id is not None else pad or 0
        ),
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
        "architectures": ["T5ForConditionalGeneration"],
        "model_type": self.model_type,
        "is_encoder_decoder": True,
        "vocab_size": self.vocab_size,
        "d_model": self.d_model,
        "d_kv": self.d_kv,
        "d_ff": self.d_ff,
        "num_heads": self.num_heads,
        "num_layers": self.num_layers,
        "num_decoder_layers": self.num_decoder_layers,
        "relative_attention_num_buckets": self.relative_attention_num_buckets,
        "relative_attention_max_distance": self.relative_attention_max_distance,
        "feed_forward_proj": self._feed_forward_proj(),
        "layer_norm_epsilon": self.layer_norm_epsilon,
        "tie_word_embeddings": self.tie_word_embeddings,
        "scale_decoder_outputs": self.scale_decoder_outputs,
        "pad_token_id": self.pad_token_id,
        "eos_token_id": checkpoint.eos_field(self.eos_token_ids),
        "decoder_start_token_id": self.decoder_start_token_id,
        "dtype": self.dtype,
    }

  def _feed_forward_proj(self) -> str:
    if not self.is_gated_act:
      return self.dense_act_fn
    if self.dense_act_fn == "gelu_new":
      return "gated-gelu"  # transformers' legacy name of gated gelu_new
    if self.dense_act_fn == "gelu":
      raise ValueError(
          "a gated exact-gelu T5 feed-forward has no feed_forward_proj name "
          "(transformers reads 'gated-gelu' as gelu_new); it cannot be exported."
      )
    return f"gated-{self.dense_act_fn}"


def _feed_forward(hf_config: dict) -> tuple[str, bool]:
  """(activation, gated) from `feed_forward_proj` ("ACT" or "gated-ACT")."""
  proj = hf_config.get("feed_forward_proj", "relu")
  parts = proj.split("-") if isinstance(proj, str) else []
  if not parts or len(parts) > 2 or (len(parts) == 2 and parts[0] != "gated"):
    raise checkpoint.InvalidConfigError(
        f"config.json: feed_forward_proj={proj!r} is not of the form 'ACT' or 'gated-ACT'; fix "
        "it in config.json (e.g. 'relu' or 'gated-gelu')."
    )
  act = "gelu_new" if proj == "gated-gelu" else parts[-1]  # transformers' legacy special case
  if act not in activations.ACTIVATIONS:
    raise checkpoint.InvalidConfigError(
        f"config.json: feed_forward_proj={proj!r}: activation {act!r} is not supported; "
        f"supported: {sorted(activations.ACTIVATIONS)}."
    )
  return act, len(parts) == 2


def _sizes(hf_config: dict) -> dict[str, int]:
  """The size fields of config.json, each a whole number >= 1 (T5Config's defaults when absent)."""
  size = lambda name, default: checkpoint.config_integer(hf_config, name, default)
  num_layers = size("num_layers", 6)
  return dict(
      vocab_size=size("vocab_size", 32128),
      d_model=size("d_model", 512),
      d_kv=size("d_kv", 64),
      d_ff=size("d_ff", 2048),
      num_heads=size("num_heads", 8),
      num_layers=num_layers,
      num_decoder_layers=size("num_decoder_layers", num_layers),
      relative_attention_num_buckets=size("relative_attention_num_buckets", 32),
      relative_attention_max_distance=size("relative_attention_max_distance", 128),
  )
