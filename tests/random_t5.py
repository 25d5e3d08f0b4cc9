"""Random transformers T5s for the tests: the torch model, and saved as a checkpoint and loaded.

The encoder's and decoder's input embeddings are set to the shared table, as in every real T5
checkpoint (a random transformers T5 draws them independently). An untied T5 (v1.1 / Flan) needs
`config.tie_word_embeddings = False` set after construction: transformers 5.23 forces True from
the argument, which only sets the output scaling (shared/PITFALLS.md).
"""

from __future__ import annotations

import torch
import transformers

import jax_specsel as js


def random_t5(seed: int, tie: bool = True, **config) -> transformers.T5ForConditionalGeneration:
  """A T5ForConditionalGeneration of `config` (T5Config fields, dropout off) drawn with torch
  seed `seed`, in eval mode; `tie`: whether the LM head is the shared table (original T5)."""
  config = transformers.T5Config(**{"dropout_rate": 0.0, **config}, tie_word_embeddings=tie)
  config.tie_word_embeddings = tie
  torch.manual_seed(seed)
  model = transformers.T5ForConditionalGeneration(config).eval()
  with torch.no_grad():
    model.encoder.embed_tokens.weight.copy_(model.shared.weight)
    model.decoder.embed_tokens.weight.copy_(model.shared.weight)
  return model


def saved_t5(path, seed: int, **config):
  """`random_t5(seed, **config)` saved to `path` and loaded as a jax_specsel Model."""
  random_t5(seed, **config).save_pretrained(path)
  return js.load_model(str(path))
