"""Stop ids exactly as transformers' `generate`: none, only in generation_config.json, several.

Each case is a tiny random checkpoint saved by transformers; the variants share its weights and
differ only in config.json / generation_config.json. The reference is transformers PyTorch
`generate` on the same directory with nothing passed but the length (it reads the ids itself),
so where the reference stops is transformers' own reading of the files.
"""

from __future__ import annotations

import json
import os
import shutil

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import numpy as np
import pytest
import torch
import transformers

import jax_specsel as js
from distribution_checks import chi_square_pvalue

VOCAB = 16
NEW_TOKENS = 20
OLD_FALLBACK = {"llama": 2, "t5": 1}  # the stop id the loader used to invent for eos null


def _randomize_(model: torch.nn.Module, seed: int) -> None:
  """Redraws every weight (norms near 1): sharper distributions than the default init, so greedy
  decoding has no near-ties between float32 PyTorch and JAX."""
  generator = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, param in model.named_parameters():
      noise = torch.randn(param.shape, generator=generator)
      param.copy_(1.0 + 0.1 * noise if "norm" in name else 0.3 * noise)


def save_checkpoint(family: str, directory, seed: int = 0, vocab: int = VOCAB, **overrides) -> str:
  """A random tiny LLaMA or T5 with `eos_token_id: null` (unless overridden), saved by transformers."""
  if family == "llama":
    config = transformers.LlamaConfig(
        **{
            "vocab_size": vocab,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 128,
            "bos_token_id": None,
            "eos_token_id": None,
            "pad_token_id": None,
            **overrides,
        }
    )
    model = transformers.LlamaForCausalLM(config)
  else:
    config = transformers.T5Config(
        **{
            "vocab_size": vocab,
            "d_model": 32,
            "d_kv": 8,
            "d_ff": 64,
            "num_heads": 4,
            "num_layers": 2,
            "num_decoder_layers": 2,
            "relative_attention_num_buckets": 8,
            "relative_attention_max_distance": 16,
            "eos_token_id": None,
            "pad_token_id": 0,
            "decoder_start_token_id": 0,
            "dropout_rate": 0.0,
            **overrides,
        }
    )
    model = transformers.T5ForConditionalGeneration(config)
  _randomize_(model, seed)
  model.eval().save_pretrained(str(directory))
  return str(directory)


def variant(base: str, directory, config_changes: dict, generation_config: dict | None) -> str:
  """A copy of `base` with config.json fields changed and generation_config.json replaced
  (None: removed)."""
  shutil.copytree(base, directory)
  path = os.path.join(directory, "config.json")
  with open(path) as f:
    config = json.load(f)
  config.update(config_changes)
  with open(path, "w") as f:
    json.dump(config, f)
  generation_path = os.path.join(directory, "generation_config.json")
  os.remove(generation_path)
  if generation_config is not None:
    with open(generation_path, "w") as f:
      json.dump(generation_config, f)
  return str(directory)


def reference_rows(family: str, directory: str, prompts, max_new_tokens: int = NEW_TOKENS):
  """transformers greedy `generate` per prompt: the new tokens, through the stop id if any."""
  cls = (
      transformers.LlamaForCausalLM
      if family == "llama"
      else transformers.T5ForConditionalGeneration
  )
  model = cls.from_pretrained(directory).eval()
  rows = []
  for prompt in prompts:
    ids = torch.tensor([prompt])
    with torch.no_grad():
      out = model.generate(
          ids,
          attention_mask=torch.ones_like(ids),
          do_sample=False,
          num_beams=1,
          max_new_tokens=max_new_tokens,
      )
    rows.append(out[0, 1:].tolist() if family == "t5" else out[0, len(prompt) :].tolist())
  return rows


def our_rows(model, prompts, **kwargs):
  out = js.generate(model, prompts, max_new_tokens=NEW_TOKENS, **kwargs)
  return [row[:n].tolist() for row, n in zip(out.tokens, out.lengths)]


def prompts_for(seed: int, count: int = 6):
  rng = np.random.default_rng(seed)
  return [rng.integers(3, VOCAB, size=n).tolist() for n in rng.integers(2, 9, size=count)]


def assert_matches_transformers(family: str, directory: str, prompts) -> list[list[int]]:
  """Ours == transformers, autoregressive and speculative; returns the reference rows."""
  reference = reference_rows(family, directory, prompts)
  model = js.load_model(directory)
  assert our_rows(model, prompts) == reference
  drafter = model.early_exit(layers=1) if family == "llama" else model
  assert our_rows(model, prompts, drafter=drafter, gamma=3) == reference
  return reference


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
  """family -> (checkpoint with eos null, prompts, transformers' rows for it)."""
  out = {}
  for family in ("llama", "t5"):
    directory = save_checkpoint(family, tmp_path_factory.mktemp(f"{family}_no_eos"))
    prompts = prompts_for(1)
    out[family] = (directory, prompts, reference_rows(family, directory, prompts))
  return out


def _mid_tokens(rows) -> list[int]:
  """Tokens emitted strictly before the last position of some row, most frequent first."""
  counts = np.bincount([t for row in rows for t in row[:-1]], minlength=VOCAB)
  return [int(t) for t in np.argsort(-counts, kind="stable") if counts[t]]


@pytest.mark.parametrize("family", ["llama", pytest.param("t5", marks=pytest.mark.slow)])
def test_no_stop_id_runs_to_max_new_tokens(family, bases):
  directory, prompts, reference = bases[family]
  assert js.load_model(directory).eos_ids == ()
  assert all(len(row) == NEW_TOKENS for row in reference)
  # The old loader stopped at an invented id; the model does emit it, so this case can fail.
  assert OLD_FALLBACK[family] in _mid_tokens(reference)
  assert_matches_transformers(family, directory, prompts)


@pytest.mark.parametrize("family", ["llama", "t5"])
def test_stop_id_only_in_generation_config(family, bases, tmp_path):
  base, prompts, no_stop = bases[family]
  stop = _mid_tokens(no_stop)[0]
  generation = {"eos_token_id": stop, "decoder_start_token_id": 0, "pad_token_id": 0}
  directory = variant(base, tmp_path / "ckpt", {"eos_token_id": None}, generation)
  assert js.load_model(directory).eos_ids == (stop,)
  reference = assert_matches_transformers(family, directory, prompts)
  assert any(len(row) < NEW_TOKENS and row[-1] == stop for row in reference)


@pytest.mark.parametrize("family", ["llama", "t5"])
def test_several_stop_ids(family, bases, tmp_path):
  base, prompts, no_stop = bases[family]
  emitted = set(t for row in no_stop for t in row)
  never = next(t for t in range(3, VOCAB) if t not in emitted)
  second, third = _mid_tokens(no_stop)[:2]
  # The first listed id never occurs: stopping at all proves the later ids are honoured.
  generation = {"eos_token_id": [never, second, third], "decoder_start_token_id": 0}
  directory = variant(base, tmp_path / "ckpt", {"eos_token_id": None}, generation)
  model = js.load_model(directory)
  assert model.eos_ids == (never, second, third) and model.pad_id == never  # HF: pad = first
  reference = assert_matches_transformers(family, directory, prompts)
  assert any(len(row) < NEW_TOKENS for row in reference)


def test_generation_config_without_eos_overrides_config_json(bases, tmp_path):
  """transformers ignores config.json's ids once generation_config.json exists."""
  base, prompts, no_stop = bases["llama"]
  stop = _mid_tokens(no_stop)[0]
  directory = variant(base, tmp_path / "ckpt", {"eos_token_id": stop}, {"max_length": 64})
  assert js.load_model(directory).eos_ids == ()
  reference = assert_matches_transformers("llama", directory, prompts)
  assert all(len(row) == NEW_TOKENS for row in reference)


def test_stop_id_in_config_json_without_generation_config(bases, tmp_path):
  base, prompts, no_stop = bases["llama"]
  stop = _mid_tokens(no_stop)[0]
  directory = variant(base, tmp_path / "ckpt", {"eos_token_id": [stop]}, None)
  assert js.load_model(directory).eos_ids == (stop,)
  reference = assert_matches_transformers("llama", directory, prompts)
  assert any(len(row) < NEW_TOKENS for row in reference)


# ---------------------------------------------------------------- sampling without a stop id
@pytest.mark.parametrize("speculative", [False, True])
def test_sampling_without_stop_id_matches_target_distribution(speculative, tmp_path):
  """The joint law of the first two sampled tokens is transformers' (chi-square), and no row
  ends after one token: the old invented stop id cut the rows that sampled it."""
  vocab, num_samples, prompt = 12, 20000, [3, 7, 5]
  directory = save_checkpoint("llama", tmp_path / "ckpt", seed=4, vocab=vocab)
  reference = transformers.LlamaForCausalLM.from_pretrained(directory).eval()
  with torch.no_grad():
    first = torch.softmax(reference(torch.tensor([prompt])).logits[0, -1].double(), -1)
    second = torch.softmax(
        reference(torch.tensor([prompt + [x] for x in range(vocab)])).logits[:, -1].double(), -1
    )
  joint = (first[:, None] * second).numpy()
  assert joint[OLD_FALLBACK["llama"]].sum() > 0.02  # the old stop id is a likely first token
  model = js.load_model(directory)
  drafter = model.early_exit(layers=1) if speculative else None
  out = js.generate(
      model,
      [prompt] * num_samples,
      drafter=drafter,
      gamma=2,
      temperature=1.0,
      max_new_tokens=2,
      seed=5,
  )
  assert (out.lengths == 2).all()
  assert chi_square_pvalue(out.tokens, joint, vocab) > 1e-3
  # Power: samples from a 2%-perturbed law fail the same test.
  rng = np.random.default_rng(0)
  perturbed = 0.98 * joint + 0.02 * (joint > 0) / (joint > 0).sum()
  flat = rng.choice(vocab * vocab, size=num_samples, p=perturbed.reshape(-1) / perturbed.sum())
  assert chi_square_pvalue(np.stack([flat // vocab, flat % vocab], 1), joint, vocab) < 1e-3


# ---------------------------------------------------------------- bad stop ids
@pytest.mark.parametrize(
    "config_changes,generation,where",
    [
        ({}, {"eos_token_id": [3, VOCAB + 4]}, "generation_config.json: eos_token_id"),
        ({"eos_token_id": -1}, None, "config.json: eos_token_id"),
    ],
)
def test_stop_id_outside_the_vocabulary_is_refused(
    bases, tmp_path, config_changes, generation, where
):
  directory = variant(bases["llama"][0], tmp_path / "ckpt", config_changes, generation)
  with pytest.raises(js.InvalidConfigError, match=f"{directory}: {where}.*outside the vocabulary"):
    js.load_model(directory)


def test_unreadable_generation_config_is_refused(bases, tmp_path):
  directory = variant(bases["t5"][0], tmp_path / "ckpt", {}, None)
  with open(os.path.join(directory, "generation_config.json"), "w") as f:
    f.write('{"eos_token_id": [1,')
  with pytest.raises(js.InvalidConfigError, match="generation_config.json is not valid JSON"):
    js.load_model(directory)
