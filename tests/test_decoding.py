"""The decoding loop driven by fake models with exact expected tokens, and the sampling math vs numpy."""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_specsel.decoding as dec
from jax_specsel.decoding import loop, request, sampling
from jax_specsel.decoding.generate import loop_spec
from jax_specsel.decoding.request import VocabularyWarning, pad_prompts
from distribution_checks import chi_square_pvalue, perturbed_samples
from fake_models import (
    exact_joint,
    fake_model,
    fake_model_with_tokenizer,
    reference_greedy,
    transformers_probabilities,
)


# ---------------------------------------------------------------- sampling math vs numpy
def _numpy_speculative(draft_tokens, q, p, uniforms, num_drafted=None):
  """Reference: (num_accepted, next-token distribution) per row, written from the paper; row b
  drafted num_drafted[b] tokens (all by default)."""
  batch, width = draft_tokens.shape
  accepted, dists = [], []
  for b in range(batch):
    gamma = width if num_drafted is None else int(num_drafted[b])
    n = 0
    while n < gamma:
      x = draft_tokens[b, n]
      if uniforms[b, n] < min(1.0, p[b, n, x] / q[b, n, x]):
        n += 1
      else:
        break
    if n < gamma:
      residual = np.maximum(p[b, n] - q[b, n], 0.0)
      dist = residual / residual.sum()
    else:
      dist = p[b, gamma]
    accepted.append(n)
    dists.append(dist)
  return np.array(accepted), np.array(dists)


def test_speculative_accept_matches_numpy_reference():
  rng = np.random.default_rng(0)
  batch, gamma, vocab = 64, 4, 6
  p = rng.dirichlet(np.ones(vocab) * 0.7, size=(batch, gamma + 1))
  q = rng.dirichlet(np.ones(vocab) * 0.7, size=(batch, gamma))
  draft = np.array([[rng.choice(vocab, p=q[b, i]) for i in range(gamma)] for b in range(batch)])
  key = jax.random.PRNGKey(3)
  num_accepted, next_token = sampling.speculative_accept(
      jnp.asarray(draft),
      jnp.log(jnp.asarray(q, jnp.float32)),
      jnp.log(jnp.asarray(p, jnp.float32)),
      key,
  )
  uniform_key, residual_key = jax.random.split(key)
  uniforms = np.asarray(jax.random.uniform(uniform_key, (batch, gamma)))
  ref_accepted, ref_dists = _numpy_speculative(draft, q, p, uniforms)
  np.testing.assert_array_equal(np.asarray(num_accepted), ref_accepted)
  assert 0 < ref_accepted.mean() < gamma  # the case mixes rejections and full acceptances
  ref_next = jax.random.categorical(
      residual_key, jnp.log(jnp.asarray(ref_dists, jnp.float32)), axis=-1
  )
  np.testing.assert_array_equal(np.asarray(next_token), np.asarray(ref_next))


def test_speculative_accept_with_fewer_drafts_than_slots_matches_numpy_reference():
  rng = np.random.default_rng(1)
  batch, gamma, vocab = 96, 4, 6
  p = rng.dirichlet(np.ones(vocab) * 0.7, size=(batch, gamma + 1))
  q = rng.dirichlet(np.ones(vocab) * 0.7, size=(batch, gamma))
  draft = np.array([[rng.choice(vocab, p=q[b, i]) for i in range(gamma)] for b in range(batch)])
  drafted = rng.integers(0, gamma + 1, size=batch)  # 0: an autoregressive row
  key = jax.random.PRNGKey(5)
  num_accepted, next_token = sampling.speculative_accept(
      jnp.asarray(draft),
      jnp.log(jnp.asarray(q, jnp.float32)),
      jnp.log(jnp.asarray(p, jnp.float32)),
      key,
      num_drafted=jnp.asarray(drafted),
  )
  uniform_key, residual_key = jax.random.split(key)
  uniforms = np.asarray(jax.random.uniform(uniform_key, (batch, gamma)))
  ref_accepted, ref_dists = _numpy_speculative(draft, q, p, uniforms, drafted)
  np.testing.assert_array_equal(np.asarray(num_accepted), ref_accepted)
  assert np.any((ref_accepted == drafted) & (drafted < gamma))  # bonus after a short draft
  ref_next = jax.random.categorical(
      residual_key, jnp.log(jnp.asarray(ref_dists, jnp.float32)), axis=-1
  )
  np.testing.assert_array_equal(np.asarray(next_token), np.asarray(ref_next))


def test_greedy_accept_rule():
  vocab = 5
  targets = np.array([[2, 3, 4, 0], [2, 1, 1, 1], [4, 4, 4, 3]])  # target argmax per block slot
  logits = np.eye(vocab)[targets] * 5.0
  drafts = np.array([[2, 3, 4], [2, 3, 1], [0, 4, 4]])
  num_accepted, next_token = sampling.greedy_accept(jnp.asarray(drafts), jnp.asarray(logits))
  np.testing.assert_array_equal(np.asarray(num_accepted), [3, 1, 0])
  np.testing.assert_array_equal(np.asarray(next_token), [0, 1, 4])
  # Row 0 drafted only 2 of its 3 slots: both match, the bonus is the target's argmax at slot 2.
  num_accepted, next_token = sampling.greedy_accept(
      jnp.asarray(drafts), jnp.asarray(logits), num_drafted=jnp.asarray([2, 3, 0])
  )
  np.testing.assert_array_equal(np.asarray(num_accepted), [2, 1, 0])
  np.testing.assert_array_equal(np.asarray(next_token), [4, 1, 4])


def test_top_k_top_p_processing_against_numpy():
  logits = np.array([[2.0, 1.0, 0.5, 0.0, -1.0]])
  out = np.exp(
      np.asarray(
          sampling.process_logits(jnp.asarray(logits), sampling.SamplingSettings(0.5, 3, 1.0))
      )
  )
  ref = np.exp(logits[0, :3] / 0.5) / np.exp(logits[0, :3] / 0.5).sum()
  np.testing.assert_allclose(out[0], np.r_[ref, 0, 0], rtol=1e-5)
  probs = np.exp(logits[0]) / np.exp(logits[0]).sum()  # [0.55, 0.20, 0.12, 0.07, 0.03]
  out = np.exp(
      np.asarray(
          sampling.process_logits(jnp.asarray(logits), sampling.SamplingSettings(1.0, 0, 0.8))
      )
  )
  keep = np.cumsum(probs) - probs < 0.8  # the first three reach 0.8
  np.testing.assert_allclose(out[0], np.where(keep, probs, 0) / probs[keep].sum(), rtol=1e-5)


# ---------------------------------------------------------------- the loop, greedy exactness
@pytest.mark.parametrize("gamma", [1, 3, 7])
def test_greedy_speculative_equals_autoregressive(gamma):
  target = fake_model(0, vocab_size=12, eos_id=1)
  prompts = [[2, 3, 4], [5], [6, 7, 8, 9, 10, 11, 2, 3, 4], [3, 3]]
  auto = dec.generate(target, prompts, max_new_tokens=20)
  for drafter_seed in (1, 2):
    drafter = fake_model(drafter_seed, vocab_size=12, eos_id=1, sharpness=1.0)
    spec = dec.generate(target, prompts, drafter=drafter, gamma=gamma, max_new_tokens=20)
    np.testing.assert_array_equal(spec.tokens, auto.tokens)
    np.testing.assert_array_equal(spec.lengths, auto.lengths)
  for row, prompt in enumerate(prompts):  # and both equal uncached decoding, row by row
    ref = reference_greedy(target, prompt, 20)
    assert auto.tokens[row, : auto.lengths[row]].tolist() == ref


@pytest.mark.parametrize("count", [1, 3])
def test_repeat_rounds_replays_the_first_round(count):
  """The timing harness runs the real round: each replay emits what generate's first round did."""
  target = fake_model(0, vocab_size=12, eos_id=1)
  drafter = fake_model(1, vocab_size=12, eos_id=1, sharpness=1.0)
  ids, mask = pad_prompts([[2, 3, 4]], None, target)
  spec = loop_spec(target, drafter, 3, max_new_tokens=20)
  state = jax.jit(loop.repeat_rounds, static_argnums=(0, 1))(
      spec, count, target.params, drafter.params, ids, mask, jax.random.PRNGKey(0)
  )
  assert int(state.rounds[0]) == count and int(state.target_calls) == count
  emitted = int(state.accepted[0]) // count + 1
  full = dec.generate(target, [[2, 3, 4]], drafter=drafter, gamma=3, max_new_tokens=20)
  assert np.asarray(state.tokens)[0, :emitted].tolist() == full.tokens[0, :emitted].tolist()
  assert np.asarray(state.num_generated).tolist() == [0]  # reset after every round


def test_partially_aligned_drafter_accepts_some():
  target = fake_model(0, vocab_size=12, eos_id=1)
  drafter = fake_model(0, vocab_size=12, eos_id=1)  # same weights: every draft is accepted
  out = dec.generate(target, [[2, 3, 4]], drafter=drafter, gamma=4, max_new_tokens=12)
  assert out.stats.acceptance_rate == 1.0
  assert out.stats.target_calls == 3 and out.stats.mean_accepted_length == 5.0
  assert out.stats.per_position.tolist() == [3, 3, 3, 3]


def test_eos_inside_accepted_block_stops_the_row():
  target = fake_model(4, vocab_size=10, eos_id=1)
  prompts = [[k] for k in range(2, 10)]
  auto = dec.generate(target, prompts, max_new_tokens=30)
  stopped = [r for r in range(len(prompts)) if auto.tokens[r, auto.lengths[r] - 1] == 1]
  assert stopped, "the fake model should emit EOS for some prompt"
  spec = dec.generate(target, prompts, drafter=target, gamma=7, max_new_tokens=30)
  np.testing.assert_array_equal(spec.tokens, auto.tokens)
  np.testing.assert_array_equal(spec.lengths, auto.lengths)
  for r in stopped:
    assert (spec.tokens[r, spec.lengths[r] :] == target.pad_id).all()


def test_max_new_tokens_smaller_than_gamma():
  target = fake_model(0, vocab_size=12, eos_id=99 % 12)
  auto = dec.generate(target, [[2, 3]], max_new_tokens=3)
  spec = dec.generate(target, [[2, 3]], drafter=target, gamma=7, max_new_tokens=3)
  assert spec.tokens.shape == (1, 3) and spec.lengths.tolist() == [3]
  np.testing.assert_array_equal(spec.tokens, auto.tokens)


def test_buckets_are_powers_of_two_and_their_half_steps():
  assert [
      dec.bucket_length(n) for n in (1, 8, 9, 12, 13, 16, 17, 24, 25, 32, 33, 48, 49, 96, 97)
  ] == [8, 8, 12, 12, 16, 16, 24, 24, 32, 32, 48, 48, 64, 96, 128]
  assert dec.bucket_length(40, limit=36) == 36


@pytest.mark.parametrize("length", [8, 12, 16, 24])
def test_prompt_that_fills_its_bucket_exactly(length):
  assert dec.bucket_length(length) == length
  target = fake_model(0, vocab_size=12, eos_id=1)
  prompt = [2 + (i % 9) for i in range(length)]
  spec = dec.generate(
      target, [prompt], drafter=fake_model(2, vocab_size=12), gamma=3, max_new_tokens=10
  )
  assert spec.tokens[0, : spec.lengths[0]].tolist() == reference_greedy(target, prompt, 10)


def test_prompts_in_one_bucket_reuse_the_compiled_program():
  target = fake_model(0, vocab_size=12, eos_id=1)
  dec.generate(target, [[2, 3, 4]], max_new_tokens=9)
  before = dec.compilation_count()
  for length in range(1, 9):
    dec.generate(target, [[2] * length], max_new_tokens=9)
  assert dec.compilation_count() == before
  dec.generate(target, [[2] * 9], max_new_tokens=9)  # the next bucket (12) compiles once
  assert dec.compilation_count() == before + 1
  dec.generate(target, [[2] * 12], max_new_tokens=9)
  assert dec.compilation_count() == before + 1


# ---------------------------------------------------------------- sampling preserves the distribution
@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 5, 0.9)])
def test_speculative_sampling_matches_target_distribution(temperature, top_k, top_p):
  vocab, num_samples, prompt = 6, 40000, [2, 3]
  target = fake_model(0, vocab_size=vocab, eos_id=vocab + 5, sharpness=1.0)
  drafter = fake_model(1, vocab_size=vocab, eos_id=vocab + 5, sharpness=1.0)
  joint = exact_joint(target, prompt, 2, temperature, top_k, top_p)
  out = dec.generate(
      target,
      [prompt] * num_samples,
      drafter=drafter,
      gamma=3,
      temperature=temperature,
      top_k=top_k,
      top_p=top_p,
      max_new_tokens=2,
      seed=11,
  )
  assert 0.05 < out.stats.acceptance_rate < 0.95  # both branches (accept, residual) are exercised
  assert chi_square_pvalue(out.tokens, joint, vocab) > 1e-3
  # Power check: the same test on samples from a 2%-perturbed distribution must fail.
  assert chi_square_pvalue(perturbed_samples(joint, num_samples), joint, vocab) < 1e-3


@pytest.mark.parametrize(
    "temperature,top_k,top_p",
    [(0.7, 4, 0.85), (1.3, 0, 0.6), (0.5, 3, 1.0), (1.0, 7, 0.3), (2.0, 9, 0.97)],
)
def test_temperature_top_k_top_p_match_transformers_logits_warpers(temperature, top_k, top_p):
  logits = np.random.default_rng(3).normal(scale=2.0, size=(300, 10)).astype(np.float32)
  ours = np.exp(
      np.asarray(
          sampling.process_logits(
              jnp.asarray(logits), sampling.SamplingSettings(temperature, top_k, top_p)
          ),
          np.float64,
      )
  )
  reference = transformers_probabilities(logits, temperature, top_k, top_p)
  np.testing.assert_array_equal(ours > 0, reference > 0)  # the same ids survive the filters
  np.testing.assert_allclose(ours, reference, rtol=1e-5, atol=1e-7)


def _rounds_after_a_rejection(out) -> float:
  """Share of rows that went on for a third round: with gamma 2 and 4 new tokens, one of the
  first two rounds rejected a draft (a round that accepts both emits 3 tokens)."""
  return float(np.mean(out.stats.rounds >= 3))


def test_sampling_after_rejections_matches_the_target_over_four_tokens():
  vocab, count, prompt, settings = 4, 40000, [2, 3], dict(temperature=0.9, top_k=3, top_p=0.95)
  target = fake_model(0, vocab_size=vocab, eos_id=vocab + 5, sharpness=1.0)
  poor = fake_model(1, vocab_size=vocab, eos_id=vocab + 5, sharpness=2.0)
  joint = exact_joint(target, prompt, 4, **settings)
  out = dec.generate(
      target, [prompt] * count, drafter=poor, gamma=2, max_new_tokens=4, seed=5, **settings
  )
  assert _rounds_after_a_rejection(out) > 0.3 and out.stats.acceptance_rate > 0.1
  assert chi_square_pvalue(out.tokens, joint, vocab) > 1e-3
  assert chi_square_pvalue(perturbed_samples(joint, count), joint, vocab) < 1e-3


def test_adaptive_sampling_after_rejections_and_switches_matches_the_target_over_four_tokens():
  from jax_specsel.decoding import adaptive, adaptive_rule

  vocab, count, prompt, settings = 4, 40000, [2, 3], dict(temperature=0.9, top_k=3, top_p=0.95)
  target = fake_model(0, vocab_size=vocab, eos_id=vocab + 5, sharpness=1.0)
  drafters = {
      "poor": fake_model(1, vocab_size=vocab, eos_id=vocab + 5, sharpness=2.0),
      "other": fake_model(2, vocab_size=vocab, eos_id=vocab + 5, sharpness=1.0),
  }
  costs = adaptive.Costs(step=(0.02, 0.02), read=(0.02, 0.02), verify=(1.0, 1.0, 1.0))
  out = dec.generate_adaptive(
      target,
      [prompt] * count,
      drafters,
      costs=costs,
      max_gamma=2,
      max_new_tokens=4,
      seed=6,
      **settings,
      rule=adaptive_rule.RuleSettings(learning_rate=0.0, randomized=True),
  )
  switched = [len(set(row[row >= 0].tolist())) > 1 for row in out.round_options]
  assert np.mean(switched) > 0.3 and _rounds_after_a_rejection(out) > 0.3
  joint = exact_joint(target, prompt, 4, **settings)
  assert chi_square_pvalue(out.tokens, joint, vocab) > 1e-3
  assert chi_square_pvalue(perturbed_samples(joint, count), joint, vocab) < 1e-3


def test_seed_changes_samples_and_is_reproducible():
  target = fake_model(0, vocab_size=12, eos_id=1, sharpness=0.5)
  a = dec.generate(target, [[2, 3]] * 8, temperature=1.0, max_new_tokens=10, seed=1)
  b = dec.generate(target, [[2, 3]] * 8, temperature=1.0, max_new_tokens=10, seed=1)
  c = dec.generate(target, [[2, 3]] * 8, temperature=1.0, max_new_tokens=10, seed=2)
  np.testing.assert_array_equal(a.tokens, b.tokens)
  assert not np.array_equal(a.tokens, c.tokens)


# ---------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"gamma": -1}, r"gamma=-1: must be >= 0"),
        ({"temperature": -0.5}, "temperature"),
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_k": -1}, "top_k"),
        ({"seed": -1}, "seed"),
        ({"seed": 2**32}, "seed"),
        ({"gamma": 2.5}, r"gamma=2.5: must be a whole number \(it would be truncated to 2\)"),
        ({"top_k": 1.5}, "top_k=1.5: must be a whole number"),
        ({"max_new_tokens": 3.5}, "max_new_tokens=3.5: must be a whole number"),
        ({"seed": 1.5}, "seed=1.5: must be a whole number"),
        ({"temperature": float("nan")}, "temperature=nan: must be a finite number"),
        (
            {"temperature": 1e-20},
            r"temperature=1e-20: positive temperatures below 0.0001 are refused.*"
            r"pass temperature=0 for greedy decoding",
        ),
    ],
)
def test_bad_settings_raise(kwargs, message):
  with pytest.raises(ValueError, match=message):
    dec.generate(fake_model(0), [[2, 3]], **kwargs)


def test_settings_of_the_wrong_type_raise():
  with pytest.raises(TypeError, match=r"gamma='3' \(str\): must be an integer"):
    dec.generate(fake_model(0), [[2, 3]], gamma="3")
  with pytest.raises(TypeError, match=r"temperature=None \(NoneType\): must be a number"):
    dec.generate(fake_model(0), [[2, 3]], temperature=None)


def test_gamma_is_unused_without_a_drafter_and_at_least_one_with_one():
  target = fake_model(0, vocab_size=12, eos_id=1)
  plain = dec.generate(target, [[2, 3]], max_new_tokens=6)
  np.testing.assert_array_equal(
      dec.generate(target, [[2, 3]], gamma=0, max_new_tokens=6).tokens, plain.tokens
  )
  np.testing.assert_array_equal(
      dec.generate(target, [[2, 3]], gamma=3.0, drafter=target, max_new_tokens=6).tokens,
      plain.tokens,
  )
  with pytest.raises(
      ValueError, match="gamma=0 with drafter .*pass drafter=None for autoregressive"
  ):
    dec.generate(target, [[2, 3]], drafter=target, gamma=0)


def test_smallest_sampling_temperature_runs_and_tiny_ones_are_refused():
  # At the threshold a sharp fake model samples its argmax: the greedy text, no pad tokens.
  target = fake_model(0, vocab_size=12, eos_id=1, sharpness=0.5)
  greedy = dec.generate(target, [[2, 3]] * 2, max_new_tokens=8)
  cold = dec.generate(
      target, [[2, 3]] * 2, temperature=dec.MIN_SAMPLING_TEMPERATURE, max_new_tokens=8
  )
  np.testing.assert_array_equal(cold.tokens, greedy.tokens)
  with pytest.raises(ValueError, match="temperature=1e-10"):
    dec.generate(target, [[2, 3]], temperature=1e-10)


def test_left_padded_prompts_equal_right_padded_ones():
  target = fake_model(0, vocab_size=12, eos_id=1)
  right = dec.generate(target, [[2, 3, 4], [5, 6]], max_new_tokens=6)
  left = dec.generate(
      target,
      np.array([[2, 3, 4], [0, 5, 6]]),
      max_new_tokens=6,
      attention_mask=np.array([[1, 1, 1], [0, 1, 1]]),
  )
  both_sides = dec.generate(
      target,
      np.array([[9, 2, 3, 4, 9], [9, 9, 5, 6, 9]]),
      max_new_tokens=6,
      attention_mask=np.array([[0, 1, 1, 1, 0], [0, 0, 1, 1, 0]]),
  )
  np.testing.assert_array_equal(left.tokens, right.tokens)
  np.testing.assert_array_equal(both_sides.tokens, right.tokens)
  np.testing.assert_array_equal(left.lengths, right.lengths)


def test_bad_masks_raise():
  target = fake_model(0, vocab_size=12, eos_id=1)
  ids = np.array([[2, 3, 4]])
  with pytest.raises(ValueError, match=r"values other than 0 and 1 \(e.g. \[2\]\)"):
    dec.generate(target, ids, attention_mask=np.array([[1, 2, 1]]))
  with pytest.raises(ValueError, match=r"values other than 0 and 1 \(e.g. \[0.5\]\)"):
    dec.generate(target, ids, attention_mask=np.array([[1, 0.5, 1]]))
  with pytest.raises(
      ValueError,
      match=r"attention_mask has shape \(1, 4\) but prompt_ids has shape "
      r"\(1, 3\): pass one 0/1 value per prompt token",
  ):
    dec.generate(target, ids, attention_mask=np.ones((1, 4), int))
  with pytest.raises(
      ValueError,
      match=r"row\(s\) \[0\] have padding between real tokens: pass left- or "
      "right-padded prompts",
  ):
    dec.generate(target, ids, attention_mask=np.array([[1, 0, 1]]))
  with pytest.raises(
      ValueError, match="attention_mask given with prompt rows of different lengths"
  ):
    dec.generate(target, [[2, 3], [4]], attention_mask=[[1, 1], [1]])


def test_prompt_id_types():
  target = fake_model(0, vocab_size=12, eos_id=1)
  reference = dec.generate(target, [[2, 3, 4], [5, 6]], max_new_tokens=6)
  ragged = np.empty(2, dtype=object)
  ragged[0], ragged[1] = np.array([2, 3, 4]), np.array([5, 6])
  np.testing.assert_array_equal(
      dec.generate(target, ragged, max_new_tokens=6).tokens, reference.tokens
  )  # a ragged object array is a list of rows
  with pytest.raises(TypeError, match=r"prompt_ids has dtype float64: token ids must be integers"):
    dec.generate(target, np.array([[2.0, 3.7]]))
  with pytest.raises(TypeError, match=r"prompt_ids\[0\] has dtype float64"):
    dec.generate(target, [[2.0, 3.7], [4.0]])
  with pytest.raises(
      ValueError, match=r"prompt_ids\[1\] is ragged \(nested sequences of different"
  ):
    dec.generate(target, [[2, 3], [[4, 4], 5]])
  with pytest.raises(TypeError, match=r"prompt_ids\[1\] holds Python objects"):
    dec.generate(target, [[2, 3], ["w4", None]])
  with pytest.raises(TypeError, match=r"drafter is str 'abc': pass a jax_specsel Model"):
    dec.generate(target, [[2, 3]], drafter="abc")
  with pytest.raises(TypeError, match=r"target is str 'abc': pass a jax_specsel Model"):
    dec.generate("abc", [[2, 3]])


def test_running_past_max_position_embeddings_warns_and_goes_on():
  target = fake_model(0, vocab_size=12, eos_id=1)  # max_position_embeddings=512
  with pytest.warns(
      dec.PositionLimitWarning,
      match=r"needs 520 positions but fake was trained on " r"max_position_embeddings=512",
  ):
    out = dec.generate(target, [[2] * 500], max_new_tokens=20)
  assert out.tokens.shape == (1, 20)


def test_bad_prompts_raise():
  target = fake_model(0)
  with pytest.raises(ValueError, match="empty prompt"):
    dec.generate(target, np.array([[2, 3]]), attention_mask=np.array([[0, 0]]))
  with pytest.raises(ValueError, match="at most"):
    dec.generate(target, [[2] * 600])
  with pytest.raises(
      ValueError, match=r"prompt ids must lie in \[0, 8\) for fake; row\(s\) \[0\] hold \[300\]"
  ):
    dec.generate(target, [[2, 300]])
  with pytest.raises(ValueError, match=r"prompt_ids must be \[batch, length\]"):
    dec.generate(target, np.zeros((1, 0), np.int32))


def test_incompatible_drafter_raises():
  target = fake_model(0, vocab_size=12, eos_id=1)
  with pytest.raises(ValueError, match="eos/pad"):
    dec.generate(target, [[2, 3]], drafter=fake_model(1, vocab_size=12, eos_id=3))
  with pytest.raises(ValueError, match="vocabulary sizes"):
    dec.generate(target, [[2, 3]], drafter=fake_model(1, vocab_size=400, eos_id=1))


def test_a_drafter_vocabulary_that_nothing_can_check_warns_until_the_assumption_is_stated(caplog):
  target = fake_model(0, vocab_size=12, eos_id=1, name="target-v12")
  drafter = fake_model(1, vocab_size=14, eos_id=1, name="drafter-v14")
  message = (
      r"drafter drafter-v14 has vocab_size 14 but target target-v12 12, and target-v12 and "
      r"drafter-v14 carry no tokenizer to compare.*pass assume_shared_vocabulary=True"
  )
  with pytest.warns(VocabularyWarning, match=message):
    dec.generate(target, [[2, 3]], drafter=drafter, gamma=2, max_new_tokens=2)
  assert any("assume_shared_vocabulary=True" in r.getMessage() for r in caplog.records)
  for call in (
      lambda **k: dec.generate(target, [[2, 3]], drafter=drafter, gamma=2, max_new_tokens=2, **k),
      lambda **k: dec.generate_adaptive(
          target, [[2, 3]], {"d": drafter}, max_gamma=2, max_new_tokens=2, **k
      ),
  ):
    request.VOCABULARY_WARNED.clear()
    with warnings.catch_warnings():
      warnings.simplefilter("error", VocabularyWarning)
      call(assume_shared_vocabulary=True)  # stated: no warning
    with pytest.warns(VocabularyWarning):
      call()


def test_drafter_tokenizers_that_differ_are_refused_whatever_is_assumed():
  target = fake_model_with_tokenizer(0, vocab_size=12, name="target")
  drafter = fake_model_with_tokenizer(1, vocab_size=14, name="drafter")
  with pytest.raises(
      ValueError, match="different tokenizers: speculative decoding needs a shared vocabulary"
  ):
    dec.generate(target, [[2, 3]], drafter=drafter, assume_shared_vocabulary=True)


@pytest.mark.filterwarnings("ignore::jax_specsel.decoding.PositionLimitWarning")
def test_caches_that_cannot_fit_are_refused_before_compiling(monkeypatch):
  from flax import nnx
  from jax_specsel import memory
  from jax_specsel.bandit.policy import Policy, PolicyNetwork

  target, drafter = fake_model(0, vocab_size=12, name="target"), fake_model(
      1, vocab_size=12, name="drafter"
  )
  policy = Policy(
      PolicyNetwork(target.hidden_size, 2, hidden_dim=4, rngs=nnx.Rngs(0)),
      option_names=["d", "autoregressive"],
  )
  monkeypatch.setattr(memory, "free_bytes", lambda mesh=None: (2**20, "host RAM in total"))
  before = dec.compilation_count()
  # The fake caches hold one int32 per position: 300000 positions of two models are 2.3 MiB.
  message = (
      r"max_new_tokens=300000 needs K/V caches of 2.29 MiB per device \(300\d+ positions x batch 1, "
      r"target target and 1 drafter\(s\)\) but there is 1.00 MiB \(host RAM in total\): lower "
      r"max_new_tokens \(about 1\d{5} fit"
  )
  calls = [
      lambda: dec.generate(target, [[2, 3]], drafter=drafter, gamma=2, max_new_tokens=300000),
      lambda: dec.generate_selected(
          target, [[2, 3]], {"d": drafter}, policy, gamma=2, max_new_tokens=300000
      ),
      lambda: dec.generate_adaptive(
          target, [[2, 3]], {"d": drafter}, max_gamma=2, max_new_tokens=300000
      ),
  ]
  for call in calls:
    with pytest.raises(ValueError, match=message):
      call()
  assert dec.compilation_count() == before
  monkeypatch.undo()
  assert memory.free_bytes()[0] > 2**20  # the CPU backend: host RAM
  with pytest.raises(
      ValueError,
      match=r"max_new_tokens=2147483647: the caches would need 2147483\d+ "
      r"positions, beyond the loop's int32 positions",
  ):
    dec.generate(target, [[2, 3]], max_new_tokens=2**31 - 1)
