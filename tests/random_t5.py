"""Random transformers T5s saved as checkpoints and loaded by jax_specsel, for the tests.

The encoder's and decoder's embeddings are set to the shared table, as in every real T5
checkpoint (a random transformers T5 draws them independently).
"""

from __future__ import annotations

import torch
import transformers

import jax_specsel as js


def saved_t5(path, seed: int, **config):
  """A T5ForConditionalGeneration of `config` (T5Config fields) drawn with torch seed `seed`,
  saved to `path` and loaded as a jax_specsel Model."""
  torch.manual_seed(seed)
  model = transformers.T5ForConditionalGeneration(transformers.T5Config(**config))
  with torch.no_grad():
    model.encoder.embed_tokens.weight.copy_(model.shared.weight)
    model.decoder.embed_tokens.weight.copy_(model.shared.weight)
  model.eval().save_pretrained(path)
  return js.load_model(str(path))
