"""T5 / T5 v1.1 / Flan-T5 as models/registry.py sees it: the architecture module of "t5".

It gathers what the loader, the exporter, growth, sharding and the memory estimate read of an
architecture (registry.py lists the contract): `Config` (t5_config.py) and the nnx `Module`
(t5_modules.py), and here the HuggingFace tensor names, which tables a checkpoint ties, the
Net2Net growth axes, the sharding rules and the byte formulas.

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
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax.numpy as jnp

from jax_specsel.models import checkpoint, checkpoint_tensors
from jax_specsel.models.t5_config import Config

# The registry reads `Module` from here, with the rest of the architecture.
from jax_specsel.models.t5_modules import Module  # noqa: F401


def _attention_names(prefix: str, path: tuple, with_bias: bool) -> dict:
  names = {f"{prefix}.{p}.weight": (path + (p,), checkpoint.transpose) for p in "qkvo"}
  if with_bias:
    names[f"{prefix}.relative_attention_bias.weight"] = (
        path + ("relative_bias",),
        checkpoint.identity,
    )
  return names


def _feed_forward_names(prefix: str, path: tuple, config: Config) -> dict:
  inputs = ("wi_0", "wi_1") if config.is_gated_act else ("wi",)
  return {
      f"{prefix}.DenseReluDense.{p}.weight": (path + ("feed_forward", p), checkpoint.transpose)
      for p in inputs + ("wo",)
  }


def _block_names(stack: str, index: int, config: Config) -> dict:
  prefix, path = f"{stack}.block.{index}.layer", (stack, "blocks", index)
  names = _attention_names(f"{prefix}.0.SelfAttention", path + ("self_attention",), index == 0)
  names[f"{prefix}.0.layer_norm.weight"] = (
      path + ("self_attention_norm", "scale"),
      checkpoint.identity,
  )
  ff = 1
  if stack == "decoder":
    names.update(
        _attention_names(f"{prefix}.1.EncDecAttention", path + ("cross_attention",), False)
    )
    names[f"{prefix}.1.layer_norm.weight"] = (
        path + ("cross_attention_norm", "scale"),
        checkpoint.identity,
    )
    ff = 2
  names.update(_feed_forward_names(f"{prefix}.{ff}", path, config))
  names[f"{prefix}.{ff}.layer_norm.weight"] = (
      path + ("feed_forward_norm", "scale"),
      checkpoint.identity,
  )
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
  for stack, separate in (
      ("encoder", config.separate_encoder_embeddings),
      ("decoder", config.separate_decoder_embeddings),
  ):
    names[f"{stack}.embed_tokens.weight"] = (
        ((stack, "embed_tokens") if separate else ("shared",)),
        checkpoint.identity,
    )
  for index in range(config.num_layers):
    names.update(_block_names("encoder", index, config))
  for index in range(config.num_decoder_layers):
    names.update(_block_names("decoder", index, config))
  names["encoder.final_layer_norm.weight"] = (
      ("encoder", "final_norm", "scale"),
      checkpoint.identity,
  )
  names["decoder.final_layer_norm.weight"] = (
      ("decoder", "final_norm", "scale"),
      checkpoint.identity,
  )
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


_TIED_TABLES = (
    "shared.weight",
    "encoder.embed_tokens.weight",
    "decoder.embed_tokens.weight",
    "lm_head.weight",
)  # transformers' _tied_weights_keys, source first


def config_for_checkpoint(
    config: Config, stored_tensors: checkpoint_tensors.CheckpointTensors
) -> Config:
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
      config,
      tie_word_embeddings=not own_table("lm_head.weight"),
      separate_encoder_embeddings=own_table("encoder.embed_tokens.weight"),
      separate_decoder_embeddings=own_table("decoder.embed_tokens.weight"),
  )


# ------------------------------------------------------------------------ growth (models/growth.py)
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
  return config.d_model**-0.5 if config.scale_decoder_outputs else 1.0


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
  return {
      **hf_config,
      "d_model": config.d_model * factor,
      "d_ff": config.d_ff * factor,
      "num_heads": config.num_heads * factor,
      "d_kv": config.d_kv,
      "tie_word_embeddings": False,
      "scale_decoder_outputs": False,
  }


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
  return {
      "vocab": config.vocab_size,
      "embed": config.d_model,
      "heads": config.num_heads,
      "kv_heads": config.num_heads,
      "head_dim": config.d_kv,
      "mlp": config.d_ff,
      "mlp_hidden_tensors": 3 if config.is_gated_act else 2,
  }


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
