"""`generate_selected`: the fused prefill -> embed -> choose -> decode program.

Checked against the pieces it fuses, each computed on its own: `Model.embed`, `Policy.choose`,
and `generate` with the option the policy picked (greedy: identical tokens and counters).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from scipy import stats as scipy_stats

import jax_specsel as js
from jax_specsel.bandit.policy import Policy, PolicyNetwork

VOCAB = 96
EOS = 1


def _save(model, path):
  if isinstance(model, transformers.T5ForConditionalGeneration):
    with torch.no_grad():  # real checkpoints keep embed_tokens equal to shared.weight
      model.encoder.embed_tokens.weight.copy_(model.shared.weight)
      model.decoder.embed_tokens.weight.copy_(model.shared.weight)
  model.eval().save_pretrained(path)
  return str(path)


@pytest.fixture(scope="module")
def t5_models(tmp_path_factory):
  root = tmp_path_factory.mktemp("t5sel")
  models = []
  for seed, (d_model, layers) in enumerate([(48, 2), (32, 1), (24, 1)]):
    torch.manual_seed(seed)
    config = transformers.T5Config(
        vocab_size=VOCAB,
        d_model=d_model,
        d_kv=8,
        d_ff=64,
        num_layers=layers,
        num_decoder_layers=layers,
        num_heads=3,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=16,
        eos_token_id=EOS,
        pad_token_id=0,
        decoder_start_token_id=0,
    )
    models.append(
        js.load_model(_save(transformers.T5ForConditionalGeneration(config), root / f"m{seed}"))
    )
  target, *drafters = models
  return target, {"small": drafters[0], "tiny": drafters[1]}


@pytest.fixture(scope="module")
def llama_models(tmp_path_factory):
  root = tmp_path_factory.mktemp("llamasel")
  torch.manual_seed(0)
  config = transformers.LlamaConfig(
      vocab_size=VOCAB,
      hidden_size=48,
      intermediate_size=96,
      num_hidden_layers=3,
      num_attention_heads=4,
      num_key_value_heads=2,
      max_position_embeddings=256,
      eos_token_id=EOS,
      bos_token_id=2,
      pad_token_id=0,
  )
  target = js.load_model(_save(transformers.LlamaForCausalLM(config), root / "llama"))
  return target, {"exit1": target.early_exit(1), "exit2": target.early_exit(2)}


def _prompts(seed: int, count: int) -> list[list[int]]:
  rng = np.random.default_rng(seed)
  # 3-8 tokens: one prompt bucket, so each option set compiles once per batch size.
  return [rng.integers(3, VOCAB, size=n).tolist() for n in rng.integers(3, 9, size=count)]


def _embeddings(target, prompts) -> np.ndarray:
  return np.concatenate([target.embed(np.asarray([p])) for p in prompts])


def _policy(target, prompts, names, seed_from: int = 0) -> Policy:
  """A random policy standardized on these prompts' embeddings, whose greedy choices differ
  between the prompts (the first network seed that gives at least two distinct choices)."""
  embeddings = _embeddings(target, prompts)
  mean, scale = embeddings.mean(0), embeddings.std(0) + 1e-6
  for seed in range(seed_from, seed_from + 50):
    network = PolicyNetwork(target.hidden_size, len(names), hidden_dim=16, rngs=nnx.Rngs(seed))
    policy = Policy(network, input_mean=mean, input_scale=scale, option_names=names)
    if len(set(policy.choose(embeddings).tolist())) >= 2:
      return policy
  raise AssertionError("no random policy separated the prompts")


def _rows(out):
  return [row[:n].tolist() for row, n in zip(out.tokens, out.lengths)]


def _chosen_drafter(drafters, name):
  return None if name == "autoregressive" else drafters[name]


@pytest.mark.parametrize("family", ["t5", pytest.param("llama", marks=pytest.mark.slow)])
def test_batch_one_emits_what_generate_emits_with_the_chosen_option(
    family, t5_models, llama_models
):
  target, drafters = t5_models if family == "t5" else llama_models
  prompts = _prompts(1, 8)
  policy = _policy(target, prompts, [*drafters, "autoregressive"])
  expected = policy.choose(_embeddings(target, prompts))
  for prompt, expected_choice in zip(prompts, expected):
    out = js.generate_selected(target, [prompt], drafters, policy, gamma=3, max_new_tokens=12)
    assert out.choice_ids.tolist() == [expected_choice]
    alone = js.generate(
        target,
        [prompt],
        drafter=_chosen_drafter(drafters, out.choices[0]),
        gamma=3,
        max_new_tokens=12,
    )
    assert _rows(out) == _rows(alone)
    np.testing.assert_array_equal(out.stats.rounds, alone.stats.rounds)
    np.testing.assert_array_equal(out.stats.accepted, alone.stats.accepted)
    assert out.stats.target_calls == alone.stats.target_calls
    np.testing.assert_allclose(
        out.embeddings, target.embed(np.asarray([prompt])), rtol=1e-5, atol=1e-6
    )


@pytest.mark.slow
@pytest.mark.parametrize("family", ["t5", "llama"])
def test_a_mixed_choice_batch_serves_every_row_with_its_own_option(family, t5_models, llama_models):
  target, drafters = t5_models if family == "t5" else llama_models
  prompts = _prompts(2, 6)
  policy = _policy(target, prompts, [*drafters, "autoregressive"], seed_from=7)
  out = js.generate_selected(target, prompts, drafters, policy, gamma=2, max_new_tokens=10)
  assert out.choice_ids.tolist() == policy.choose(_embeddings(target, prompts)).tolist()
  assert len(set(out.choices)) >= 2
  auto = js.generate(target, prompts, max_new_tokens=10)
  assert _rows(out) == _rows(auto)  # greedy: every option yields the target's own text
  for name in set(out.choices):
    rows = [i for i, c in enumerate(out.choices) if c == name]
    alone = js.generate(
        target,
        [prompts[i] for i in rows],
        drafter=_chosen_drafter(drafters, name),
        gamma=2,
        max_new_tokens=10,
    )
    np.testing.assert_array_equal(out.stats.accepted[rows], alone.stats.accepted)
    np.testing.assert_array_equal(out.stats.drafted[rows], alone.stats.drafted)


def test_dynamic_policy_samples_the_policy_distribution(t5_models):
  target, drafters = t5_models
  prompt = _prompts(3, 1)[0]
  policy = _policy(target, _prompts(3, 6), [*drafters, "autoregressive"])
  probabilities = policy.probabilities(target.embed(np.asarray([prompt])))[0].astype(np.float64)
  probabilities /= probabilities.sum()
  count = 3000
  out = js.generate_selected(
      target, [prompt] * count, drafters, policy, greedy_policy=False, max_new_tokens=1, seed=5
  )
  again = js.generate_selected(
      target, [prompt] * count, drafters, policy, greedy_policy=False, max_new_tokens=1, seed=5
  )
  np.testing.assert_array_equal(out.choice_ids, again.choice_ids)
  counts = np.bincount(out.choice_ids, minlength=len(probabilities))
  assert scipy_stats.chisquare(counts, probabilities * count).pvalue > 1e-3
  skewed = 0.92 * probabilities + 0.08 * np.eye(len(probabilities))[np.argmin(probabilities)]
  assert scipy_stats.chisquare(counts, skewed * count).pvalue < 1e-3  # the test can fail


def test_new_prompts_of_a_warm_bucket_compile_nothing(t5_models):
  target, drafters = t5_models
  prompts = _prompts(4, 6)
  policy = _policy(target, prompts, [*drafters, "autoregressive"])
  js.generate_selected(target, [[5, 6, 7]], drafters, policy, max_new_tokens=8)
  before = js.compilation_count()
  for prompt in prompts:
    js.generate_selected(target, [prompt[:8]], drafters, policy, max_new_tokens=8)
  assert js.compilation_count() == before


def test_bad_inputs_raise_before_any_work(t5_models, llama_models):
  target, drafters = t5_models
  policy = _policy(target, _prompts(5, 6), ["small", "autoregressive"])
  with pytest.raises(ValueError, match=r"\['small'\] is neither a given drafter"):
    js.generate_selected(target, [[3, 4]], {"other": drafters["small"]}, policy)
  with pytest.raises(ValueError, match=r"\['small'\] is neither a given drafter"):
    js.generate_selected(target, [[3, 4]], {}, policy)  # no drafters and not only autoregressive
  llama, _ = llama_models
  with pytest.raises(ValueError, match="width 48 but target .* width 32"):
    js.generate_selected(
        target.__class__._from_parts(
            drafters["small"].decoder, drafters["small"].params, drafters["small"].config, None, "d"
        ),
        [[3, 4]],
        drafters,
        _policy(llama, _prompts(5, 6), ["exit1", "autoregressive"]),
    )
  unnamed = Policy(PolicyNetwork(target.hidden_size, 2, hidden_dim=8, rngs=nnx.Rngs(0)))
  with pytest.raises(ValueError, match="no option names"):
    js.generate_selected(target, [[3, 4]], drafters, unnamed)
  with pytest.raises(TypeError, match="not a jax_specsel Model"):
    js.generate_selected(target, [[3, 4]], {"small": "abc"}, policy)
  with pytest.raises(ValueError, match="gamma"):
    js.generate_selected(target, [[3, 4]], drafters, policy, gamma=0)


def test_a_missing_policy_or_a_path_says_how_to_load_one(t5_models, tmp_path):
  target, drafters = t5_models
  with pytest.raises(
      TypeError,
      match=r"generate_selected: policy is None: pass a trained "
      r"jax_specsel.bandit.Policy, e.g. jax_specsel.bandit.load_policy\(path\)",
  ):
    js.generate_selected(target, [[3, 4]], drafters, None)
  path = str(tmp_path / "policy")
  with pytest.raises(
      TypeError,
      match=rf"policy='{path}' is a path, not a Policy: load it first, "
      rf"policy = jax_specsel.bandit.load_policy\('{path}'\)",
  ):
    js.generate_selected(target, [[3, 4]], drafters, path)
  with pytest.raises(TypeError, match=r"generate_adaptive: policy='.*' is a path.*load_policy"):
    js.generate_adaptive(target, [[3, 4]], drafters, policy=tmp_path / "policy")


def test_sampled_first_tokens_follow_the_target_whichever_option_the_policy_draws():
  from fake_models import fake_model, transformers_probabilities

  vocab, count, prompt, settings = 6, 30000, [2, 3], dict(temperature=1.2, top_k=5, top_p=0.95)
  target = fake_model(0, vocab_size=vocab, eos_id=vocab + 5, sharpness=1.0, name="target")
  drafters = {"poor": fake_model(1, vocab_size=vocab, eos_id=vocab + 5, sharpness=2.0, name="poor")}
  policy = Policy(
      PolicyNetwork(target.hidden_size, 2, hidden_dim=4, rngs=nnx.Rngs(0)),
      option_names=["poor", "autoregressive"],
  )
  out = js.generate_selected(
      target,
      [prompt] * count,
      drafters,
      policy,
      greedy_policy=False,
      gamma=3,
      max_new_tokens=3,
      seed=4,
      **settings,
  )
  expected = transformers_probabilities(target.logits(np.asarray([prompt]))[:, -1], **settings)[0]
  assert out.stats.acceptance_rate < 0.9  # the poor drafter's drafts are rejected often
  for option in ("poor", "autoregressive"):
    rows = np.asarray(out.choices) == option
    assert rows.sum() > count // 10, option  # the dynamic policy draws both options
    counts = np.bincount(out.tokens[rows, 0], minlength=vocab)
    kept = expected > 0
    assert counts[~kept].sum() == 0, "sampled an id the processing filters out"
    assert scipy_stats.chisquare(counts[kept], expected[kept] * rows.sum()).pvalue > 1e-3, option
    skewed = 0.9 * expected[kept] + 0.1 / kept.sum()  # a 10% mixture with uniform: must fail
    assert scipy_stats.chisquare(counts[kept], skewed * rows.sum()).pvalue < 1e-3, option
