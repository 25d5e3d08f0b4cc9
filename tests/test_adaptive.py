"""`generate_adaptive`: the option and gamma chosen per round inside the loop.

Exactness is checked against plain decoding (greedy: identical tokens) and against the target's
own distribution computed by transformers PyTorch (sampling: chi-square), with the rule forced to
switch options at random every round; the rule's math against numpy references.
"""

from __future__ import annotations


import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from scipy import stats as scipy_stats

import jax_specsel as js
from jax_specsel.decoding import adaptive, adaptive_rule
from jax_specsel.eval import speed
from random_t5 import saved_t5

VOCAB = 96
EOS = 1
# Uniform prior, no learning, a Hedge draw every round: every option drafts in turn, with the
# gamma its acceptance estimate gives (the harshest switching the loop can see).
SWITCHING = adaptive_rule.RuleSettings(learning_rate=0.0, randomized=True)


def _cheap(drafters, max_gamma):
  """Costs under which drafting pays even at low acceptance: rounds pick gammas above 1."""
  return adaptive.Costs(
      step=(0.02,) * len(drafters), read=(0.02,) * len(drafters), verify=(1.0,) * (max_gamma + 1)
  )


def _t5(path, seed, d_model, layers, vocab=VOCAB):
  return saved_t5(
      path,
      seed,
      vocab_size=vocab,
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


def _llama_torch(vocab, eos, seed=0):
  torch.manual_seed(seed)
  config = transformers.LlamaConfig(
      vocab_size=vocab,
      hidden_size=48,
      intermediate_size=96,
      num_hidden_layers=3,
      num_attention_heads=4,
      num_key_value_heads=2,
      max_position_embeddings=256,
      eos_token_id=eos,
      bos_token_id=2,
      pad_token_id=0,
  )
  return transformers.LlamaForCausalLM(config).eval()


def _prompts(seed: int, count: int, vocab=VOCAB) -> list[list[int]]:
  rng = np.random.default_rng(seed)
  return [rng.integers(3, vocab, size=n).tolist() for n in rng.integers(3, 9, size=count)]


def _only_option(target, name="autoregressive"):
  """A policy that names one option alone: the others start at the prior floor."""
  from flax import nnx
  from jax_specsel.bandit.policy import Policy, PolicyNetwork

  return Policy(
      PolicyNetwork(target.hidden_size, 1, hidden_dim=8, rngs=nnx.Rngs(0)),
      option_names=[name],
  )


def _under_autoregressive_prior(target, drafters, prompts, rule, **kwargs):
  """`generate_adaptive` with `_only_option` (autoregressive) as prior, cheap costs, max_gamma 3."""
  return adaptive.generate_adaptive(
      target,
      prompts,
      drafters,
      _only_option(target),
      costs=_cheap(drafters, 3),
      max_gamma=3,
      rule=rule,
      **kwargs,
  )


def _rows(out):
  return [row[:n].tolist() for row, n in zip(out.tokens, out.lengths)]


@pytest.fixture(scope="module")
def t5_models(tmp_path_factory):
  root = tmp_path_factory.mktemp("t5adaptive")
  target = _t5(root / "target", 0, 48, 2)
  return target, {
      "small": _t5(root / "small", 1, 32, 1),
      "self": target,
      "tiny": _t5(root / "tiny", 2, 24, 1),
  }


@pytest.fixture(scope="module")
def llama_models(tmp_path_factory):
  """A LLaMA whose second stop id is a token it emits often: rows stop early, inside blocks."""
  root = tmp_path_factory.mktemp("llamaadaptive")
  _llama_torch(VOCAB, EOS).save_pretrained(root / "probe")
  probe = js.load_model(str(root / "probe"))
  emitted = np.concatenate(_rows(js.generate(probe, _prompts(1, 8), max_new_tokens=24)))
  frequent = int(np.bincount(emitted[emitted != EOS], minlength=VOCAB)[3:].argmax() + 3)
  _llama_torch(VOCAB, [EOS, frequent]).save_pretrained(root / "target")
  target = js.load_model(str(root / "target"))
  assert frequent in target.eos_ids
  return target, {"exit1": target.early_exit(1), "exit2": target.early_exit(2), "self": target}


@pytest.mark.parametrize("family", ["t5", pytest.param("llama", marks=pytest.mark.slow)])
def test_greedy_output_equals_plain_decoding_while_options_switch(family, t5_models, llama_models):
  target, drafters = t5_models if family == "t5" else llama_models
  prompts = _prompts(3, 6)
  plain = js.generate(target, prompts, max_new_tokens=20)
  for seed, prompt in enumerate(prompts[:3]):  # batch 1: no row waits for another
    out = adaptive.generate_adaptive(
        target,
        [prompt],
        drafters,
        rule=SWITCHING,
        max_gamma=4,
        costs=_cheap(drafters, 4),
        max_new_tokens=20,
        seed=seed,
    )
    assert _rows(out) == [_rows(plain)[seed]]
  batched = adaptive.generate_adaptive(
      target,
      prompts,
      drafters,
      rule=SWITCHING,
      max_gamma=4,
      costs=_cheap(drafters, 4),
      max_new_tokens=20,
      seed=7,
  )
  assert _rows(batched) == _rows(plain)
  played = batched.round_options[batched.round_options >= 0]
  assert len(set(played.tolist())) == len(drafters) + 1  # every option drafted some round
  assert len(set(batched.round_gammas[batched.round_options > 0].tolist())) >= 2
  if family == "llama":
    assert (batched.lengths < 20).sum() >= 2  # rows stopped early on the frequent stop id


@pytest.mark.slow
def test_counters_agree_with_the_rounds(t5_models):
  target, drafters = t5_models
  out = adaptive.generate_adaptive(
      target, _prompts(4, 5), drafters, rule=SWITCHING, max_gamma=3, max_new_tokens=16, seed=3
  )
  for row in range(5):
    options, gammas = out.round_options[row], out.round_gammas[row]
    played = options >= 0
    assert played.sum() == out.stats.rounds[row]
    assert np.all(gammas[played][options[played] == 0] == 0)
    assert np.all(
        (gammas[played][options[played] > 0] >= 1) & (gammas[played][options[played] > 0] <= 3)
    )
    drafted = np.bincount(options[played], weights=gammas[played], minlength=len(drafters) + 1)
    np.testing.assert_array_equal(out.drafted_by[row], drafted)
    assert np.all(out.accepted_by[row] <= out.drafted_by[row])
    # every round emits 1 + its accepted drafts (the last one may be cut by max_new_tokens)
    assert out.lengths[row] <= out.stats.rounds[row] + out.accepted_by[row].sum()
  self_column = 1 + list(drafters).index("self")
  np.testing.assert_allclose(out.acceptance[:, self_column - 1], 1.0)  # it is the target
  np.testing.assert_array_equal(out.accepted_by[:, self_column], out.drafted_by[:, self_column])
  best = np.nanmax(out.hindsight_values, axis=1)
  np.testing.assert_allclose(out.regret, best - out.lengths / out.cost, rtol=1e-5)


@pytest.mark.slow
def test_the_rule_learns_the_cheap_perfect_drafter_within_the_query(t5_models):
  target, drafters = t5_models
  costs = adaptive.Costs(
      step=(0.5, 0.05, 0.3), read=(0.5, 0.05, 0.3), verify=(1.0, 1.0, 1.0, 1.0, 1.0)
  )
  out = adaptive.generate_adaptive(
      target,
      _prompts(5, 4),
      drafters,
      costs=costs,
      max_gamma=4,
      max_new_tokens=48,
      seed=0,
      rule=adaptive_rule.RuleSettings(randomized=False),
  )
  self_option = 1 + list(drafters).index("self")
  for row in range(4):
    played = out.round_options[row][out.round_options[row] >= 0]
    assert np.mean(played[len(played) // 2 :] == self_option) >= 0.9, played
  assert np.all(out.round_gammas[out.round_options == self_option] == 4)  # acceptance 1: the max


@pytest.mark.slow
def test_a_probe_reads_every_unscored_drafter_where_the_choice_does_poorly(t5_models):
  """A prior that rules every drafter out, so autoregressive is chosen throughout. Its value is
  below probe_below of a perfect drafter's, so the round-2 probe reads every drafter (none had
  been scored); with probe_below=0 no probe runs and no drafter is ever scored."""
  target, drafters = t5_models
  for below, expected in ((0.6, True), (0.0, False)):
    rule = adaptive_rule.RuleSettings(
        learning_rate=0.0, randomized=False, probe_every=0, first_probe=2, probe_below=below
    )  # the prior alone chooses
    for seed, prompt in enumerate(_prompts(3, 12)):
      out = _under_autoregressive_prior(
          target,
          drafters,
          [prompt],
          max_new_tokens=8,
          rule=rule,
          seed=seed,
      )
      assert np.all(out.round_options[out.round_options >= 0] == 0)  # never drafted
      assert np.all(np.isfinite(out.acceptance[0]) == expected), (below, out.acceptance)


@pytest.mark.slow  # compiles two loops; CI runs it with the slow set
def test_a_rejected_first_draft_makes_a_probe_due_at_once(llama_models):
  """The prior alone chooses "exit1" (the target's first layer: its first draft is often
  rejected) and no probe is ever scheduled (probe_every=0, first_probe=0). With probe_on_miss, a
  round whose first draft was rejected reads the drafters that sat out (they are scored: their
  acceptance is finite); without it they are never scored. Either way the output is plain
  decoding's."""
  target, drafters = llama_models
  names, prompts = list(drafters), _prompts(7, 6)
  plain = _rows(js.generate(target, prompts, max_new_tokens=16))
  others = [i for i, name in enumerate(names) if name != "exit1"]
  for on_miss in (True, False):
    rule = adaptive_rule.RuleSettings(
        learning_rate=0.0, probe_every=0, first_probe=0, probe_below=1.0, probe_on_miss=on_miss
    )
    out = adaptive.generate_adaptive(
        target,
        prompts,
        drafters,
        _only_option(target, "exit1"),
        costs=_cheap(drafters, 3),
        max_gamma=3,
        rule=rule,
        max_new_tokens=16,
    )
    assert _rows(out) == plain
    played = out.round_options
    assert np.all(played[played >= 0] == 1 + names.index("exit1"))
    # A round emits its accepted drafts plus one token; only the last may be cut short, so a row
    # shorter than 2 * rounds - 1 had a round before its last that emitted one token: a miss.
    missed = out.lengths < 2 * np.sum(played >= 0, axis=1) - 1
    assert np.any(missed), (out.lengths, played, out.acceptance)
    scored = np.isfinite(out.acceptance[:, others])
    if on_miss:
      assert np.all(scored[missed]), (missed, out.acceptance)
    else:
      assert not np.any(scored), out.acceptance


@pytest.mark.slow  # compiles two loops per temperature; CI runs it with the slow set
@pytest.mark.parametrize("temperature", [1.0, 0.0])
def test_autoregressive_stretches_emit_what_single_rounds_emit(temperature, t5_models):
  """Rounds that choose autoregressive and learn nothing run back to back: greedy and sampled,
  batched, their tokens and round counts equal those of the same rounds run one at a time (a
  probe due every round keeps them apart), and greedy they are plain decoding's."""
  target, drafters = t5_models
  stretched = adaptive_rule.RuleSettings(learning_rate=0.0, probe_below=0.0)
  single = adaptive_rule.RuleSettings(
      learning_rate=0.0, probe_every=1, first_probe=1, probe_backoff=1, probe_below=1.0
  )
  prompts = _prompts(5, 4)
  outs = [
      _under_autoregressive_prior(
          target,
          drafters,
          prompts,
          max_new_tokens=12,
          rule=rule,
          temperature=temperature,
          seed=3,
      )
      for rule in (stretched, single)
  ]
  assert _rows(outs[0]) == _rows(outs[1]), temperature
  np.testing.assert_array_equal(outs[0].round_options, outs[1].round_options)
  assert np.all(outs[0].round_options[outs[0].round_options >= 0] == 0)
  assert np.all(np.isnan(outs[0].acceptance)) and np.all(np.isfinite(outs[1].acceptance))
  plain = _rows(js.generate(target, prompts, max_new_tokens=12))
  assert (_rows(outs[0]) == plain) == (temperature == 0.0)  # sampled: the check can fail


def test_probes_back_off_while_they_change_nothing():
  rule = adaptive_rule.RuleSettings(probe_every=2, probe_backoff=3)
  gap = jnp.array([2, 6, 18, 2], jnp.int32)
  changed = jnp.array([False, False, False, True])
  np.testing.assert_array_equal(
      adaptive_rule.next_probe_gap(gap, changed, rule, max_rounds=20), [6, 18, 20, 2]
  )
  once = adaptive_rule.RuleSettings(probe_every=0)
  np.testing.assert_array_equal(adaptive_rule.next_probe_gap(gap, changed, once, 20), [21] * 4)
  with pytest.raises(ValueError, match="probe_backoff=0"):
    adaptive_rule.RuleSettings(probe_backoff=0)
  with pytest.raises(ValueError, match="probe_below=1.5"):
    adaptive_rule.RuleSettings(probe_below=1.5)
  with pytest.raises(ValueError, match="probe_on_miss=1: pass True or False"):
    adaptive_rule.RuleSettings(probe_on_miss=1)


def _exact_two_token_distribution(model: transformers.LlamaForCausalLM, prompt, vocab, temperature):
  with torch.no_grad():
    first = torch.softmax(model(torch.tensor([prompt])).logits[0, -1] / temperature, -1)
    rows = torch.tensor([prompt + [x] for x in range(vocab)])
    second = torch.softmax(model(rows).logits[:, -1] / temperature, -1)
  return (first[:, None] * second).numpy().astype(np.float64)  # [x1, x2]


# With the slow set: test_decoding checks adaptive sampling after rejections and switches by default.
@pytest.mark.slow
def test_sampled_output_is_distributed_as_the_target_while_options_switch(tmp_path):
  vocab, temperature = 12, 0.8
  reference = _llama_torch(vocab, None, seed=3)
  with torch.no_grad():  # sharper distributions than a random init: fewer cells carry the mass
    reference.lm_head.weight.mul_(6.0)
  reference.save_pretrained(tmp_path / "llama")
  target = js.load_model(str(tmp_path / "llama"))
  drafters = {"exit1": target.early_exit(1), "exit2": target.early_exit(2)}
  prompt = [5, 7, 3, 9]
  count = 6000
  out = adaptive.generate_adaptive(
      target,
      [prompt] * count,
      drafters,
      rule=SWITCHING,
      max_gamma=3,
      max_new_tokens=2,
      temperature=temperature,
      seed=11,
  )
  assert len(set(out.round_options[:, 0].tolist())) == 3  # rows started with every option
  assert out.stats.accepted.sum() > 0 and (out.stats.accepted < out.stats.drafted).any()
  expected = _exact_two_token_distribution(reference, prompt, vocab, temperature).ravel()
  observed = np.bincount(out.tokens[:, 0] * vocab + out.tokens[:, 1], minlength=vocab * vocab)
  big = expected * count >= 5
  f_obs = np.append(observed[big], observed[~big].sum())
  f_exp = np.append(expected[big], expected[~big].sum()) * count
  assert scipy_stats.chisquare(f_obs, f_exp * f_obs.sum() / f_exp.sum()).pvalue > 1e-3
  skewed = 0.9 * expected + 0.1 * np.roll(expected, 1)  # the test can fail
  s_exp = np.append(skewed[big], skewed[~big].sum()) * count
  assert scipy_stats.chisquare(f_obs, s_exp * f_obs.sum() / s_exp.sum()).pvalue < 1e-3


@pytest.mark.slow
def test_new_prompts_of_a_warm_bucket_compile_nothing(t5_models):
  target, drafters = t5_models
  adaptive.generate_adaptive(target, [[5, 6, 7]], drafters, max_gamma=3, max_new_tokens=8)
  before = js.compilation_count()
  for seed, prompt in enumerate(_prompts(6, 5)):
    adaptive.generate_adaptive(
        target, [prompt[:8]], drafters, max_gamma=3, max_new_tokens=8, seed=seed
    )
  assert js.compilation_count() == before


def test_rule_math_matches_numpy_references():
  rule = adaptive_rule.RuleSettings(decay=0.8, prior_acceptance=0.3, prior_count=2.0)
  scores = np.array([[1.0, 0.0, 1.0, 0.5]], np.float32)
  scored = np.array([[True, False, True, True]])
  total, count = adaptive_rule.add_scores(
      np.float32([2.0]), np.float32([3.0]), scores, scored, rule
  )
  weights = np.array([0.8**2, 0.8**1, 1.0])  # the three scored positions, latest weighs most
  np.testing.assert_allclose(total, [2.0 * 0.8**3 + weights @ [1.0, 1.0, 0.5]], rtol=1e-6)
  np.testing.assert_allclose(count, [3.0 * 0.8**3 + weights.sum()], rtol=1e-6)
  alpha = np.array([[0.9, 0.4]], np.float32)
  step, verify = np.float32([0.1, 0.05]), np.float32([1.0, 1.2, 1.3, 1.5])
  values, gammas = adaptive_rule.drafter_values(alpha, step, verify)
  for k in range(2):
    candidates = [
        speed.expected_tokens_per_round(float(alpha[0, k]), g) / (g * step[k] + verify[g])
        for g in (1, 2, 3)
    ]
    np.testing.assert_allclose(values[0, k], max(candidates), rtol=1e-5)
    assert gammas[0, k] == 1 + int(np.argmax(candidates))


def test_bad_inputs_raise_before_any_work(t5_models):
  target, drafters = t5_models
  with pytest.raises(ValueError, match="non-empty dict"):
    adaptive.generate_adaptive(target, [[3, 4]], {})
  with pytest.raises(ValueError, match="means plain decoding"):
    adaptive.generate_adaptive(target, [[3, 4]], {"autoregressive": drafters["small"]})
  with pytest.raises(TypeError, match="not a jax_specsel Model"):
    adaptive.generate_adaptive(target, [[3, 4]], {"small": "abc"})
  wrong = adaptive.Costs(step=(0.1,), read=(0.1,), verify=(1.0, 1.0))
  with pytest.raises(ValueError, match="measure them for these drafters"):
    adaptive.generate_adaptive(target, [[3, 4]], drafters, costs=wrong, max_gamma=3)
  with pytest.raises(ValueError, match="RuleSettings.decay"):
    adaptive_rule.RuleSettings(decay=1.5)
  with pytest.raises(ValueError, match="max_new_tokens"):
    adaptive.generate_adaptive(target, [[3, 4]], drafters, max_new_tokens=0)
  for bad in (0, -1):
    with pytest.raises(
        ValueError, match=rf"max_gamma={bad}: must be >= 1 .*use generate without a drafter"
    ):
      adaptive.generate_adaptive(target, [[3, 4]], drafters, max_gamma=bad)
  with pytest.raises(ValueError, match=r"max_gamma=2.5: must be a whole number.*Pass max_gamma"):
    adaptive.generate_adaptive(target, [[3, 4]], drafters, max_gamma=2.5)


@pytest.mark.slow  # shares its program with test_counters_agree_with_the_rounds there
def test_regret_hindsight_values_and_cost_recomputed_from_the_round_records(t5_models):
  target, drafters = t5_models
  max_gamma, step = 3, np.array([0.3, 0.05, 0.2])
  # Reads cost next to nothing, so the cost is the rounds' alone: gamma draft steps + one verify.
  costs = adaptive.Costs(step=tuple(step), read=(1e-7,) * 3, verify=(1.0,) * (max_gamma + 1))
  # The program of test_counters_agree_with_the_rounds (costs are run-time arguments): no compile.
  out = adaptive.generate_adaptive(
      target,
      _prompts(8, 5),
      drafters,
      costs=costs,
      rule=SWITCHING,
      max_gamma=max_gamma,
      max_new_tokens=16,
      seed=2,
  )
  per_round = np.where(
      out.round_options > 0,
      out.round_gammas * step[np.maximum(out.round_options - 1, 0)] + 1.0,
      np.where(out.round_options == 0, 1.0, 0.0),
  )  # -1: no round, no cost
  cost = per_round.sum(axis=1)
  np.testing.assert_allclose(out.cost, cost, rtol=1e-5)
  hindsight = np.full((5, len(drafters) + 1), np.nan)
  hindsight[:, 0] = 1.0  # autoregressive: one token per target step
  for row in range(5):
    for k, alpha in enumerate(out.acceptance[row]):
      if np.isfinite(alpha):  # the best fixed gamma: expected tokens of a round over its cost
        a = min(float(alpha), 0.999)
        hindsight[row, k + 1] = max(
            sum(a**i for i in range(g + 1)) / (g * step[k] + 1.0) for g in range(1, max_gamma + 1)
        )
  assert np.isfinite(hindsight[:, 1:]).sum() >= 4  # several drafters were scored
  np.testing.assert_allclose(out.hindsight_values, hindsight, rtol=1e-5)
  np.testing.assert_allclose(out.achieved, out.lengths / cost, rtol=1e-5)
  np.testing.assert_allclose(
      out.regret, np.nanmax(hindsight, axis=1) - out.lengths / cost, rtol=1e-4, atol=1e-6
  )


@pytest.mark.slow  # builds a LLaMA of its own; CI runs it with the slow set
@pytest.mark.parametrize("probe_every", [1, 12, 20])
def test_drafters_read_after_rounds_are_scored_on_every_token_they_missed(probe_every, tmp_path):
  """Autoregressive in every round (one token a round), every drafter read after round 1 and then
  every `probe_every` rounds, the last probe after the last round but one: each drafter's
  hindsight acceptance is its teacher-forced greedy agreement with the emitted tokens (all but
  the last, which no probe follows), computed here from its own logits. The gaps (1, 12, 20
  tokens) take each width of a read (8, 16, the whole history: max_gamma 3). A read that resumed
  after the position it last read, or one too narrow for its gap, would miss some of them."""
  _llama_torch(VOCAB, eos=None, seed=3).save_pretrained(tmp_path)
  target = js.load_model(str(tmp_path))
  drafters = {
      "exit1": target.early_exit(layers=1),
      "exit2": target.early_exit(layers=2),
      "self": target,
  }
  rule = adaptive_rule.RuleSettings(
      learning_rate=0.0,
      randomized=False,
      probe_every=probe_every,
      probe_backoff=1,
      probe_below=1.0,
      track_threshold=0.0,
      prior_floor=1e-6,
  )
  max_new_tokens = 12 if probe_every == 1 else 2 + probe_every * (24 // probe_every)
  # Each read is charged by its width: the narrowest of 8, 16 or the whole history (max_new + 1)
  # that covers the tokens since the last probe.
  probe_rounds = list(range(1, max_new_tokens, probe_every))  # none follows the last round
  gaps = np.diff([0, *probe_rounds])
  widths = np.where(gaps < 8, 8, np.where(gaps < 16, 16, max_new_tokens + 1))
  read_cost = len(drafters) * np.sum(0.02 * widths / 8)  # `_cheap`: 0.02 a read of 8
  partial = 0
  for seed, prompt in enumerate(_prompts(9, 3)):
    out = _under_autoregressive_prior(
        target, drafters, [prompt], max_new_tokens=max_new_tokens, rule=rule, seed=seed
    )
    assert np.all(out.round_options[out.round_options >= 0] == 0)
    assert out.cost[0] == pytest.approx(max_new_tokens + read_cost, rel=1e-5)
    tokens = out.tokens[0][: out.lengths[0]]
    sequence = np.concatenate([prompt, tokens])[None]
    for k, drafter in enumerate(drafters.values()):
      predicted = drafter.logits(sequence)[0, len(prompt) - 1 : -1].argmax(-1)
      expected = np.mean(predicted[:-1] == tokens[:-1])
      assert out.acceptance[0, k] == pytest.approx(expected, abs=1e-6), (k, seed)
      partial += 0 < expected < 1
  assert partial  # the check can fail: some drafter agrees on some tokens and not others
