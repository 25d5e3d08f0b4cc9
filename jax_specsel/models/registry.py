"""HuggingFace `model_type` -> the module that implements that architecture.

This module imports nothing from the package: the loader, the sharding rules and the memory
estimate ask it for an architecture module, and it imports that module by its path only when a
model of that type is asked for (one architecture failing to import never stops the others).

An architecture module provides (BUILD_NOTES.md, "Adding an architecture"):

  Config                frozen dataclass (a jit-static part of the graph definition) with the
                        class attribute `model_type`, `Config.from_hf(hf_config, dtype,
                        generation_config=None)`, `is_encoder_decoder`, `num_decoder_layers`,
                        `params_per_decoder_layer`, `hidden_size`, `vocab_size`, the token ids,
                        `dtype` and `matmul_precision`
  Module                the nnx module speaking the decoder protocol (models/interface.py)
  config_for_checkpoint(config, checkpoint) -> Config   which tables the stored weights tie
  hf_weight_map(config) -> {hf_name: (nnx_path, transform)}   every tensor the module needs
  is_ignorable(hf_name, config) -> bool     stored tensors the module does not need
  SHARDING_RULES        ((regex over "/"-joined nnx paths, layouts), ...) (sharding.py)
  dimensions(config) -> {"vocab", "embed", "heads", "kv_heads", "head_dim", "mlp",
                         "mlp_hidden_tensors"}: unit counts for the sharding rules and widths
                        for the memory estimate's activation formula
  context_bytes(config, rows, source_length, heads) -> int   bytes of what `prepare` returns
                        for `rows` rows, `heads` attention heads held per device

For export (models/hf_export.py) and growth (models/growth.py):

  Config.to_hf() -> dict    config.json fields transformers reads back as the same model
  GROWTH_AXES           ((regex over HF tensor names, widened axes, contracted axes), ...)
  LM_HEAD               the HF name of the output table, stored untied by growth
  output_scale(config) -> float   the factor applied to the final hidden state before the head
  grown_hf_config(hf_config, config, factor) -> dict   config.json widened `factor` times
"""

from __future__ import annotations

import importlib
from types import ModuleType

# One line per architecture: model_type in config.json -> the module implementing it.
ARCHITECTURES = {"t5": "jax_specsel.models.t5", "llama": "jax_specsel.models.llama"}


class UnsupportedModelError(ValueError):
  """config.json names a model_type (or a feature of one) this library has no implementation for."""


def architecture(hf_config: dict, source: str = "config.json") -> ModuleType:
  """The architecture module for a parsed config.json.

  Args:
    hf_config: the parsed config.json (its `model_type` is looked up).
    source: how the file is named in the error message.

  Returns:
    The imported architecture module.

  Raises:
    UnsupportedModelError: a model_type with no architecture module.
  """
  model_type = hf_config.get("model_type")
  if model_type not in ARCHITECTURES:
    raise UnsupportedModelError(
        f"{source}: model_type={model_type!r} is not supported. "
        f"Supported: {sorted(ARCHITECTURES)} (T5 / T5 v1.1 / Flan-T5 and LLaMA-family checkpoints)."
    )
  return importlib.import_module(ARCHITECTURES[model_type])


def architecture_of(config) -> ModuleType | None:
  """The architecture module whose `Config` `config` is, or None (a test's fake config).

  Args:
    config: a model config object.

  Returns:
    The module, read from the config class's `model_type`; None when it names no registered
    architecture or the config is not that module's Config.
  """
  module_path = ARCHITECTURES.get(getattr(type(config), "model_type", None))
  if module_path is None:
    return None
  module = importlib.import_module(module_path)
  return module if isinstance(config, module.Config) else None
