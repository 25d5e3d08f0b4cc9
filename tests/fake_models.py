"""A tiny decoder-only model that speaks the decoder protocol, for driving the loop exactly.

logits(t) = unigram[token_t] + bigram[token_(t-1)], where token_(t-1) is read back from the
cache at absolute position t-1: wrong cache writes or reads change the output.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
from flax import nnx

from jax_specsel.models.attention import write_at_positions
from jax_specsel.models.interface import Model


@dataclasses.dataclass(frozen=True)
class FakeConfig:
  vocab_size: int = 8
  eos_token_id: int = 1
  pad_token_id: int = 0
  max_position_embeddings: int = 512
  dtype: str = "float32"
  is_encoder_decoder: bool = False
  decoder_start_token_id: int | None = None
  hidden_size: int = 4
  num_decoder_layers: int = 1
  params_per_decoder_layer: int = 0


class FakeModule(nnx.Module):

  def __init__(self, config: FakeConfig, unigram: np.ndarray, bigram: np.ndarray):
    self.config = config
    self.unigram = nnx.Param(jnp.asarray(unigram, jnp.float32))  # [V, V]
    self.bigram = nnx.Param(jnp.asarray(bigram, jnp.float32))  # [V, V]

  def init_cache(self, batch, max_len, dtype, num_layers=None):
    return {"tokens": jnp.zeros((batch, max_len), jnp.int32)}

  def prepare(self, prompt_ids, prompt_mask, cache, num_layers=None):
    cache = {
        "tokens": write_at_positions(
            cache["tokens"], prompt_ids, jnp.zeros(prompt_ids.shape[0], jnp.int32)
        )
    }
    return {"last_hidden": jnp.zeros((prompt_ids.shape[0], 4))}, cache

  def decode(self, tokens, start, cache, context, num_layers=None):
    written = write_at_positions(cache["tokens"], tokens, start)
    positions = start[:, None] + jnp.arange(tokens.shape[1])[None]
    previous = jnp.take_along_axis(
        written, jnp.clip(positions - 1, 0, written.shape[1] - 1), axis=1
    )
    previous = jnp.where(positions > 0, previous, self.config.pad_token_id)
    logits = self.unigram[...][tokens] + self.bigram[...][previous]
    return logits, {"tokens": written}

  def embed(self, context):
    return context["last_hidden"]


def fake_model(
    seed: int, vocab_size: int = 8, eos_id: int = 1, sharpness: float = 3.0, name: str = "fake"
) -> Model:
  rng = np.random.default_rng(seed)
  unigram = sharpness * rng.normal(size=(vocab_size, vocab_size))
  bigram = sharpness * rng.normal(size=(vocab_size, vocab_size))
  config = FakeConfig(vocab_size=vocab_size, eos_token_id=eos_id)
  return Model(FakeModule(config, unigram, bigram), name=name)


def reference_greedy(model: Model, prompt: list[int], max_new_tokens: int) -> list[int]:
  """Greedy decoding by re-running the full forward on the growing sequence (no cache)."""
  sequence, out = list(prompt), []
  for _ in range(max_new_tokens):
    token = int(np.argmax(model.logits(np.asarray([sequence]))[0, -1]))
    out.append(token)
    sequence.append(token)
    if token == model.eos_id:
      break
  return out


def word_tokenizer(vocab_size: int):
  """A word-level tokenizer whose id i is the word "w<i>" (ids 0-2: <pad>, </s>, <unk>)."""
  from tokenizers import Tokenizer, models, pre_tokenizers
  from transformers import PreTrainedTokenizerFast

  vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{f"w{i}": i for i in range(3, vocab_size)}}
  core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
  core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
  return PreTrainedTokenizerFast(
      tokenizer_object=core, pad_token="<pad>", eos_token="</s>", unk_token="<unk>"
  )


def fake_model_with_tokenizer(
    seed: int, vocab_size: int = 12, sharpness: float = 3.0, name: str = "fake"
) -> Model:
  model = fake_model(seed, vocab_size=vocab_size, eos_id=1, sharpness=sharpness, name=name)
  model.tokenizer = word_tokenizer(vocab_size)
  return model


def transformers_probabilities(
    logits: np.ndarray, temperature: float, top_k: int = 0, top_p: float = 1.0
) -> np.ndarray:
  """Next-token probabilities [N, V] (float64) after transformers' own logits warpers, in the order
  its `generate` applies them (temperature, top-k, top-p): a reference independent of
  `sampling.process_logits`."""
  import torch
  import transformers

  warpers = [transformers.TemperatureLogitsWarper(temperature)]
  if top_k:
    warpers.append(transformers.TopKLogitsWarper(top_k))
  if top_p < 1.0:
    warpers.append(transformers.TopPLogitsWarper(top_p))
  scores = torch.tensor(np.asarray(logits, np.float32))
  for warper in warpers:
    scores = warper(torch.zeros((scores.shape[0], 1), dtype=torch.long), scores)
  return torch.softmax(scores.double(), dim=-1).numpy()


def exact_joint(
    model: Model,
    prompt: list[int],
    new_tokens: int,
    temperature: float,
    top_k: int = 0,
    top_p: float = 1.0,
) -> np.ndarray:
  """p(x_1..x_n | prompt) over every sequence of n ids, [V] * n, by enumerating all prefixes:
  the model's full-forward logits, processed by `transformers_probabilities`."""
  vocab = model.vocab_size
  joint = np.ones(())
  for depth in range(new_tokens):
    prefixes = np.indices((vocab,) * depth).reshape(depth, vocab**depth).T  # [V**depth, depth]
    rows = np.concatenate([np.tile(prompt, (len(prefixes), 1)), prefixes], axis=1)
    step = transformers_probabilities(model.logits(rows)[:, -1], temperature, top_k, top_p)
    joint = joint[..., None] * step.reshape((vocab,) * depth + (vocab,))
  return joint
