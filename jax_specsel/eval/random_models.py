"""Random-weight HuggingFace checkpoints for speed measurements (timing needs no trained weights).

Needs torch and transformers' PyTorch models (the `test` extra).
"""

from __future__ import annotations

import os

import numpy as np

# A target of a few tens of millions of parameters and a drafter ~10x cheaper per step.
RANDOM_PAIRS = {
    "t5": (
        dict(d_model=512, d_kv=64, d_ff=2048, num_layers=6, num_heads=8),
        dict(d_model=256, d_kv=32, d_ff=1024, num_layers=2, num_heads=4),
    ),
    "llama": (
        dict(
            hidden_size=512,
            intermediate_size=1376,
            num_hidden_layers=6,
            num_attention_heads=8,
            num_key_value_heads=8,
        ),
        dict(
            hidden_size=256,
            intermediate_size=688,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=4,
        ),
    ),
}


def build_random_checkpoint(family: str, sizes: dict, directory: str, seed: int) -> str:
  """Saves a random transformers model as a HF checkpoint directory; returns the directory.

  The EOS id is the last id, so random weights rarely stop early and every option generates
  about the same number of tokens.
  """
  import torch
  import transformers

  torch.manual_seed(seed)
  if family == "t5":
    vocab = 32128
    config = transformers.T5Config(
        vocab_size=vocab,
        feed_forward_proj="gated-gelu",
        eos_token_id=vocab - 1,
        pad_token_id=0,
        decoder_start_token_id=0,
        tie_word_embeddings=False,
        **sizes,
    )
    config.tie_word_embeddings = False  # transformers 5.23 forces True in the constructor
    model = transformers.T5ForConditionalGeneration(config)
    with torch.no_grad():  # untied random T5s get independent embed_tokens; real ones share them
      model.encoder.embed_tokens.weight.copy_(model.shared.weight)
      model.decoder.embed_tokens.weight.copy_(model.shared.weight)
  elif family == "llama":
    vocab = 32000
    config = transformers.LlamaConfig(
        vocab_size=vocab,
        eos_token_id=vocab - 1,
        bos_token_id=1,
        pad_token_id=0,
        max_position_embeddings=1024,
        **sizes,
    )
    model = transformers.LlamaForCausalLM(config)
  else:
    raise ValueError(f"unknown family {family!r}: use 't5' or 'llama'.")
  model.eval().save_pretrained(directory)
  return directory


def random_pair(family: str, directory: str) -> tuple[str, str]:
  """(target_dir, drafter_dir) of a random pair of the family, saved under directory."""
  target_sizes, drafter_sizes = RANDOM_PAIRS[family]
  target = build_random_checkpoint(
      family, target_sizes, os.path.join(directory, f"{family}-target"), 0
  )
  drafter = build_random_checkpoint(
      family, drafter_sizes, os.path.join(directory, f"{family}-drafter"), 1
  )
  return target, drafter


def random_prompt_ids(
    rng: np.random.Generator,
    vocab_size: int,
    num_prompts: int,
    length: int,
    low: int = 5,
    high: int = 1000,
) -> list[list[int]]:
  """Random prompts [num_prompts][length] of ids in [low, min(high, vocab_size)).

  Ids below `low` are usually special tokens (pad, eos, bos, unk); a vocabulary smaller than
  `high` caps the range, so every id exists in the model (a tiny vocabulary keeps >= 1 id).

  Args:
    rng: the random generator.
    vocab_size: the smallest vocabulary of the models the prompts go to.
    num_prompts, length: the shape.
    low, high: the preferred id range.
  """
  if vocab_size < 1:
    raise ValueError(f"vocab_size={vocab_size}: a model needs at least one token id.")
  high = min(high, vocab_size)
  low = min(low, high - 1)
  return rng.integers(low, high, size=(num_prompts, length)).tolist()


def random_t5_model(
    d_model: int,
    num_heads: int,
    d_ff: int,
    encoder_layers: int,
    decoder_layers: int,
    vocab_size: int = 304,
    seed: int = 0,
    name: str = "t5",
    eos_token_ids: tuple[int, ...] = (),
):
  """A random-weight T5 `Model` built in-process (no torch, no files), shaped as the demo zoo's
  (original-T5 style, tied and scaled head, d_kv = d_model / num_heads).

  The default stops on no id, so every call generates exactly max_new_tokens and the options of
  a timing run do equal work.
  """
  from flax import nnx
  from jax_specsel.models import t5
  from jax_specsel.models.interface import Model

  config = t5.Config(
      vocab_size=vocab_size,
      d_model=d_model,
      d_kv=d_model // num_heads,
      d_ff=d_ff,
      num_heads=num_heads,
      num_layers=encoder_layers,
      num_decoder_layers=decoder_layers,
      tie_word_embeddings=True,
      scale_decoder_outputs=True,
      pad_token_id=0,
      eos_token_ids=tuple(eos_token_ids),
      decoder_start_token_id=0,
  )
  return Model(t5.Module(config, rngs=nnx.Rngs(seed)), tokenizer=None, name=name)
