"""The per-round oracle (`eval.round_oracle`): hand-counted rounds, and agreement read from the
models' own teacher-forced logits."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers

import jax_specsel as js
from jax_specsel.decoding.adaptive import Costs
from jax_specsel.eval import round_oracle
from random_t5 import saved_t5

VOCAB = 40


def test_the_oracle_switches_where_the_aligned_drafter_changes():
  # Drafter a agrees on the first half of the answer, drafter b on the second: rounds cost 1.
  first = np.array([1, 1, 1, 1, 0, 0, 0, 0], bool)
  agree = np.stack([first, ~first])
  costs = Costs(step=(0.0, 0.0), read=(0.0, 0.0), verify=(1.0,) * 4)
  # Oracle: a at gamma 3 emits tokens 0-3 (3 accepted + 1), b at gamma 3 emits 4-7: 2 rounds.
  # Fixed a: 4 tokens, then one a round: 5 rounds; fixed b: 4 single tokens, then 4: 5 rounds.
  assert round_oracle.round_costs(agree, costs) == (2.0, 5.0)


def test_where_no_drafter_agrees_every_round_is_autoregressive():
  agree = np.zeros((2, 6), bool)
  costs = Costs(step=(0.1, 0.2), read=(0.0, 0.0), verify=(1.0, 1.2, 1.3))
  assert round_oracle.round_costs(agree, costs) == pytest.approx((6.0, 6.0))
  # On an answer b knows, b at gamma 2 emits 3 tokens a round for 0.2 * 2 + 1.3: two rounds
  # (fixed and oracle alike; gamma 1 would take three rounds of 1.4).
  agree[1] = True
  assert round_oracle.round_costs(agree, costs) == pytest.approx((2 * 1.7, 2 * 1.7))


def _t5(path):
  # A larger initializer: at the default scale a T5 this small repeats one token.
  return saved_t5(
      path, 3, vocab_size=VOCAB, d_model=24, d_kv=8, d_ff=48, num_layers=2, num_heads=3,
      eos_token_id=1, pad_token_id=0, decoder_start_token_id=0, initializer_factor=8.0,
  )  # fmt: skip


def _llama(path):
  torch.manual_seed(0)
  config = transformers.LlamaConfig(
      vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
      num_attention_heads=4, num_key_value_heads=2, eos_token_id=None, bos_token_id=2,
      pad_token_id=0,
  )  # fmt: skip
  transformers.LlamaForCausalLM(config).eval().save_pretrained(path)
  return js.load_model(str(path))


@pytest.mark.slow  # builds two models of its own; CI runs it with the slow set
@pytest.mark.parametrize("family", ["t5", "llama"])
def test_a_model_agrees_with_its_own_greedy_answer_everywhere(family, tmp_path):
  """A one-position shift between the answer and the logits that guess it would fail this."""
  model = (_t5 if family == "t5" else _llama)(tmp_path)
  prompt = [5, 9, 13, 7, 21]
  out = js.generate(model, [prompt], max_new_tokens=10)
  tokens = [int(t) for t in out.tokens[0][: out.lengths[0]]]
  assert len(set(tokens)) > 2  # not a constant answer, which any shift would still match
  drafters = {"self": model}
  if family == "llama":
    drafters["exit1"] = model.early_exit(layers=1)
  agree = round_oracle.agreement(drafters, prompt, tokens)
  assert agree.shape == (len(drafters), len(tokens)) and agree[0].all()
  if family == "llama":
    assert not agree[1].all()  # a shallower model misses some
