"""Generation with real architectures: greedy speculative == greedy autoregressive == transformers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers

import jax_specsel as js

VOCAB = 96
EOS = 1


def _save(model, path):
  if isinstance(model, transformers.T5ForConditionalGeneration):
    # transformers 5.23 gives an untied random T5 independent embed_tokens; real checkpoints keep
    # them equal to shared.weight (one table; tests/test_t5.py covers distinct ones).
    with torch.no_grad():
      model.encoder.embed_tokens.weight.copy_(model.shared.weight)
      model.decoder.embed_tokens.weight.copy_(model.shared.weight)
  model.eval().save_pretrained(path)
  return str(path)


@pytest.fixture(scope="module")
def t5_dirs(tmp_path_factory):
  root = tmp_path_factory.mktemp("t5gen")
  dirs = []
  for seed, (d_model, layers) in enumerate([(48, 2), (32, 1)]):
    torch.manual_seed(seed)
    config = transformers.T5Config(
        vocab_size=VOCAB,
        d_model=d_model,
        d_kv=16,
        d_ff=64,
        num_layers=layers,
        num_decoder_layers=layers,
        num_heads=3,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=16,
        feed_forward_proj="gated-gelu",
        eos_token_id=EOS,
        pad_token_id=0,
        decoder_start_token_id=0,
        tie_word_embeddings=False,
    )
    config.tie_word_embeddings = False
    dirs.append(_save(transformers.T5ForConditionalGeneration(config), root / f"m{seed}"))
  return dirs


@pytest.fixture(scope="module")
def llama_dirs(tmp_path_factory):
  root = tmp_path_factory.mktemp("llamagen")
  dirs = []
  for seed, (hidden, layers, kv) in enumerate([(48, 3, 1), (32, 1, 2)]):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=kv,
        max_position_embeddings=256,
        eos_token_id=EOS,
        bos_token_id=2,
        pad_token_id=0,
    )
    dirs.append(_save(transformers.LlamaForCausalLM(config), root / f"m{seed}"))
  return dirs


def _prompts(rng, batch):
  lengths = rng.integers(2, 11, size=batch)
  return [rng.integers(3, VOCAB, size=n).tolist() for n in lengths]


def _greedy_rows(out):
  return [row[:n].tolist() for row, n in zip(out.tokens, out.lengths)]


def _drafter_options(family, target, drafter, exhaustive):
  """(drafter, gamma) pairs: a separate drafter and, for LLaMA, early exits of the target."""
  gammas = (1, 3, 7)
  options = [(drafter, g) for g in gammas]
  if family == "llama":
    exits = [target.early_exit(layers=1), target.early_exit(layers=2)]
    options += (
        [(e, g) for e in exits for g in gammas] if exhaustive else [(exits[0], 3), (exits[1], 7)]
    )
  return options


def _check_speculative_equals_autoregressive(family, batch, dirs, exhaustive):
  target, drafter = js.load_model(dirs[0]), js.load_model(dirs[1])
  prompts = _prompts(np.random.default_rng(batch), batch)  # different lengths per row
  auto = js.generate(target, prompts, max_new_tokens=24)
  for option, gamma in _drafter_options(family, target, drafter, exhaustive):
    spec = js.generate(target, prompts, drafter=option, gamma=gamma, max_new_tokens=24)
    assert _greedy_rows(spec) == _greedy_rows(auto), (option.name, gamma)


@pytest.mark.parametrize("family", ["t5", pytest.param("llama", marks=pytest.mark.slow)])
def test_greedy_speculative_equals_autoregressive(family, t5_dirs, llama_dirs):
  _check_speculative_equals_autoregressive(
      family, 4, t5_dirs if family == "t5" else llama_dirs, False
  )


@pytest.mark.slow
@pytest.mark.parametrize("family", ["t5", "llama"])
@pytest.mark.parametrize("batch", [1, 4])
def test_greedy_speculative_equals_autoregressive_every_combination(
    family, batch, t5_dirs, llama_dirs
):
  _check_speculative_equals_autoregressive(
      family, batch, t5_dirs if family == "t5" else llama_dirs, True
  )


@pytest.mark.parametrize("family", ["t5", "llama"])
def test_greedy_equals_transformers_generate(family, t5_dirs, llama_dirs):
  target_dir = (t5_dirs if family == "t5" else llama_dirs)[0]
  target = js.load_model(target_dir)
  reference = (
      (transformers.T5ForConditionalGeneration if family == "t5" else transformers.LlamaForCausalLM)
      .from_pretrained(target_dir)
      .eval()
  )
  prompts = _prompts(np.random.default_rng(7), 3)
  ours = _greedy_rows(js.generate(target, prompts, drafter=target, gamma=3, max_new_tokens=20))
  for prompt, row in zip(prompts, ours):
    ids = torch.tensor([prompt])
    with torch.no_grad():
      out = reference.generate(
          ids,
          attention_mask=torch.ones_like(ids),
          do_sample=False,
          max_new_tokens=20,
          num_beams=1,
          eos_token_id=EOS,
          pad_token_id=0,
      )
    new = out[0, 1:] if family == "t5" else out[0, len(prompt) :]
    assert row == new.tolist()


def test_assisted_generation_matches_transformers_assisted(llama_dirs):
  target_dir, drafter_dir = llama_dirs
  target, drafter = js.load_model(target_dir), js.load_model(drafter_dir)
  reference = transformers.LlamaForCausalLM.from_pretrained(target_dir).eval()
  assistant = transformers.LlamaForCausalLM.from_pretrained(drafter_dir).eval()
  prompt = _prompts(np.random.default_rng(3), 1)[0]
  ids = torch.tensor([prompt])
  with torch.no_grad():
    out = reference.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        assistant_model=assistant,
        do_sample=False,
        max_new_tokens=20,
        eos_token_id=EOS,
        pad_token_id=0,
    )
  ours = js.generate(target, [prompt], drafter=drafter, gamma=5, max_new_tokens=20)
  assert _greedy_rows(ours)[0] == out[0, len(prompt) :].tolist()


def test_t5_vocab_padding_rows_are_handled(t5_dirs, tmp_path):
  """A drafter whose vocabulary has fewer (padding) rows drafts for the target unchanged."""
  torch.manual_seed(5)
  config = transformers.T5Config(
      vocab_size=VOCAB - 8,
      d_model=32,
      d_kv=16,
      d_ff=64,
      num_layers=1,
      num_decoder_layers=1,
      num_heads=2,
      feed_forward_proj="gated-gelu",
      eos_token_id=EOS,
      pad_token_id=0,
      decoder_start_token_id=0,
      tie_word_embeddings=False,
  )
  config.tie_word_embeddings = False
  small = js.load_model(_save(transformers.T5ForConditionalGeneration(config), tmp_path / "small"))
  target = js.load_model(t5_dirs[0])
  prompts = _prompts(np.random.default_rng(11), 2)
  auto = js.generate(target, prompts, max_new_tokens=16)
  spec = js.generate(
      target, prompts, drafter=small, gamma=4, max_new_tokens=16, assume_shared_vocabulary=True
  )  # no tokenizers: the sizes differ by padding
  assert _greedy_rows(spec) == _greedy_rows(auto)


def test_family_mismatch_is_refused(t5_dirs, llama_dirs):
  with pytest.raises(ValueError, match="both be encoder-decoder"):
    js.generate(js.load_model(t5_dirs[0]), [[3, 4]], drafter=js.load_model(llama_dirs[0]))
