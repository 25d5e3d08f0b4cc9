"""jax_specsel: choose, per query, the drafter that makes speculative decoding fastest.

Public API:
  load_model(path_or_id, dtype)   -> Model (T5 or LLaMA, tokenizer attached)
  generate(target, prompt_ids, drafter=None, ...)  (jax_specsel.decoding)
  bandit.train_policy / bandit.load_policy          (jax_specsel.bandit)
"""

from jax_specsel.decoding import GenerateOutput, compilation_count, generate
from jax_specsel.models.interface import Decoder, Model
from jax_specsel.models.loading import (CheckpointNotFoundError, UnsupportedModelError,
                                        WeightMismatchError, load_model)

__all__ = ["Decoder", "Model", "load_model", "generate", "GenerateOutput", "compilation_count", "CheckpointNotFoundError", "UnsupportedModelError",
           "WeightMismatchError"]
