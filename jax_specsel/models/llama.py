"""LLaMA as models/registry.py sees it: the architecture module of model_type "llama".

It gathers what the loader, the exporter, growth, sharding and the memory estimate read of an
architecture (registry.py lists the contract): `Config` (llama_config.py) and the nnx `Module`
(llama_modules.py), and here the HuggingFace tensor names, which tables a checkpoint ties, the
Net2Net growth axes, the sharding rules and the byte formulas.

Tying: `tie_word_embeddings` in config.json ties the LM head to the embedding, except where the
checkpoint stores both with different values: transformers then does not tie them, and neither
does `config_for_checkpoint`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from jax_specsel.models import checkpoint, checkpoint_tensors
from jax_specsel.models.llama_config import Config

# The registry reads `Module` from here, with the rest of the architecture.
from jax_specsel.models.llama_modules import Module  # noqa: F401


def hf_weight_map(config: Config) -> dict[str, tuple[tuple, Any]]:
  """HF tensor name -> (nnx flat state path, transform); Linear weights [out, in] are transposed.

  Args:
    config: the model config (layer count, biases, tying).

  Returns:
    Every tensor the module needs, keyed by its transformers name.
  """
  mapping = {
      "model.embed_tokens.weight": (("embed_tokens", "embedding"), checkpoint.identity),
      "model.norm.weight": (("norm", "scale"), checkpoint.identity),
  }
  if config.tie_word_embeddings:  # a stored copy is an alias (the loader checks it is equal)
    mapping["lm_head.weight"] = (("embed_tokens", "embedding"), checkpoint.identity)
  else:
    mapping["lm_head.weight"] = (("lm_head", "kernel"), checkpoint.transpose)
  projections = [
      ("self_attn", p, config.attention_bias) for p in ("q_proj", "k_proj", "v_proj", "o_proj")
  ]
  projections += [("mlp", p, config.mlp_bias) for p in ("gate_proj", "up_proj", "down_proj")]
  for layer in range(config.num_hidden_layers):
    prefix = f"model.layers.{layer}"
    for norm in ("input_layernorm", "post_attention_layernorm"):
      mapping[f"{prefix}.{norm}.weight"] = (("layers", layer, norm, "scale"), checkpoint.identity)
    for block, proj, has_bias in projections:
      mapping[f"{prefix}.{block}.{proj}.weight"] = (
          ("layers", layer, block, proj, "kernel"),
          checkpoint.transpose,
      )
      if has_bias:
        mapping[f"{prefix}.{block}.{proj}.bias"] = (
            ("layers", layer, block, proj, "bias"),
            checkpoint.identity,
        )
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


def config_for_checkpoint(
    config: Config, stored_tensors: checkpoint_tensors.CheckpointTensors
) -> Config:
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
  if stored_tensors.equal(*tables):
    return config
  return dataclasses.replace(config, tie_word_embeddings=False)


# ------------------------------------------------------------------------ growth (models/growth.py)
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
  return {
      **hf_config,
      "hidden_size": config.hidden_size * factor,
      "intermediate_size": config.intermediate_size * factor,
      "num_attention_heads": config.num_attention_heads * factor,
      "num_key_value_heads": config.num_key_value_heads * factor,
      "head_dim": config.head_dim,
      "tie_word_embeddings": False,
  }


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
  return {
      "vocab": config.vocab_size,
      "embed": config.hidden_size,
      "heads": config.num_attention_heads,
      "kv_heads": config.num_key_value_heads,
      "head_dim": config.head_dim,
      "mlp": config.intermediate_size,
      "mlp_hidden_tensors": 3,
  }


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
