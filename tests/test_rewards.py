"""Rewards: ROUGE-L alignment (eq. 1), size costs (A.5) and the alpha mix (eq. 2)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from rouge_score import rouge_scorer

from jax_specsel.bandit import mix_rewards, rouge_l, size_costs


def lcs_f1_reference(candidate: str, reference: str) -> float:
  """Independent ROUGE-L F1: lowercased whitespace tokens, dynamic-programming LCS."""
  strip = lambda text: [w.strip(".,!?;:") for w in text.lower().split()]
  a, b = [w for w in strip(candidate) if w], [w for w in strip(reference) if w]
  table = np.zeros((len(a) + 1, len(b) + 1), dtype=int)
  for i, word_a in enumerate(a):
    for j, word_b in enumerate(b):
      table[i + 1, j + 1] = (
          table[i, j] + 1 if word_a == word_b else max(table[i, j + 1], table[i + 1, j])
      )
  lcs = table[-1, -1]
  if lcs == 0:
    return 0.0
  precision, recall = lcs / len(a), lcs / len(b)
  return 2 * precision * recall / (precision + recall)


GERMAN_PAIRS = [
    ("Die Datei wurde gelöscht", "Die Datei ist gelöscht"),
    ("Die Größe der Tür wurde geändert.", "Die Tür hat eine neue Größe."),
    ("Er grüßt die Mädchen höflich", "Die Mädchen grüßen ihn höflich"),
    ("Straße gesperrt", "Die Straße bleibt gesperrt, sagte die Behörde."),
]


def test_rouge_l_matches_rouge_score_on_ascii_text():
  candidates = [
      "the cat sat on the mat",
      "a quick brown fox",
      "nothing in common here",
      "The Model Outputs Text.",
  ]
  references = [
      "the cat is on the mat",
      "the quick brown fox jumps",
      "completely different",
      "model outputs the text",
  ]
  scorer = rouge_scorer.RougeScorer(["rougeL"])
  expected = [scorer.score(r, c)["rougeL"].fmeasure for c, r in zip(candidates, references)]
  np.testing.assert_allclose(rouge_l(candidates, references), expected, rtol=1e-12)


def test_rouge_l_keeps_umlauts_as_letters():
  candidates, references = zip(*GERMAN_PAIRS)
  ours = rouge_l(candidates, references)
  expected = [lcs_f1_reference(c, r) for c, r in GERMAN_PAIRS]
  np.testing.assert_allclose(ours, expected, rtol=1e-12)
  # Hand check of the first pair: 3 of 4 tokens in common -> F1 = 0.75.
  assert ours[0] == pytest.approx(0.75)
  # rouge-score's default tokenizer splits "gelöscht" into "gel" + "scht": 4 of 5 -> 0.8.
  default = rouge_scorer.RougeScorer(["rougeL"])
  default_values = [default.score(r, c)["rougeL"].fmeasure for c, r in GERMAN_PAIRS]
  assert default_values[0] == pytest.approx(0.8)
  assert not np.allclose(ours, default_values)


def test_rouge_l_empty_texts():
  values = rouge_l(["", "", "words", "  ...  "], ["", "words", "", "..."])
  np.testing.assert_array_equal(values, [1.0, 0.0, 0.0, 1.0])


def test_rouge_l_rejects_bad_input():
  with pytest.raises(ValueError, match="2 candidates but 1 references"):
    rouge_l(["a", "b"], ["a"])
  with pytest.raises(TypeError, match="wrap a single text"):
    rouge_l("a b", "a b")


def test_size_costs_hand_computed():
  # T5-Small 60M, Flan-T5-Small 80M, Flan-T5-Base 220M, in billions as in the paper.
  costs = size_costs([60_000_000, 80_000_000, 220_000_000])
  expected = [1 - math.exp(0.06) / math.exp(0.22), 1 - math.exp(0.08) / math.exp(0.22), 0.0]
  np.testing.assert_allclose(costs, expected, rtol=1e-12, atol=1e-15)
  assert costs[0] == pytest.approx(0.147856, abs=1e-6)  # 1 - e^-0.16
  # Another unit spreads them apart: p in units of 1e8.
  np.testing.assert_allclose(size_costs([60e6, 220e6], unit=1e8), [1 - math.exp(-1.6), 0.0])


def test_size_costs_no_overflow_for_huge_counts():
  # Raw counts (unit=1): exp(11e9) overflows a float64, the stable form does not.
  costs = size_costs([60_000_000, 11_000_000_000], unit=1.0)
  assert np.all(np.isfinite(costs))
  np.testing.assert_array_equal(costs, [1.0, 0.0])
  # Drafters next to an 11B target (the autoregressive option) all get ~1, the target 0.
  costs = size_costs([60e6, 80e6, 11e9])
  np.testing.assert_allclose(costs, [1 - math.exp(0.06 - 11), 1 - math.exp(0.08 - 11), 0.0])


def test_size_costs_rejects_bad_input():
  with pytest.raises(ValueError, match="non-empty"):
    size_costs([])
  with pytest.raises(ValueError, match="non-negative"):
    size_costs([-5, 10])
  with pytest.raises(ValueError, match="unit must be positive"):
    size_costs([1, 2], unit=0)


def test_mix_rewards_follows_eq2_literally():
  alignment = np.array([[0.9, 0.2], [0.1, 0.5]])
  costs = np.array([0.0, 0.8])
  mixed = mix_rewards(alignment, costs, alpha=0.25)
  expected = [
      [0.25 * 0.9 + 0.75 * 0.0, 0.25 * 0.2 + 0.75 * 0.8],
      [0.25 * 0.1 + 0.75 * 0.0, 0.25 * 0.5 + 0.75 * 0.8],
  ]
  np.testing.assert_allclose(mixed, expected)
  np.testing.assert_allclose(mix_rewards(alignment, costs, 1.0), alignment)  # alignment only
  np.testing.assert_allclose(mix_rewards(alignment, costs, 0.0), [[0.0, 0.8], [0.0, 0.8]])
  # alpha -> 0 favours the cheapest option everywhere, alpha -> 1 the best aligned.
  assert list(mix_rewards(alignment, costs, 0.05).argmax(1)) == [1, 1]
  assert list(mix_rewards(alignment, costs, 0.95).argmax(1)) == [0, 1]


@pytest.mark.parametrize("alpha", [-0.1, 1.5, float("nan")])
def test_mix_rewards_rejects_alpha_outside_unit_interval(alpha):
  with pytest.raises(ValueError, match=f"alpha={alpha}"):
    mix_rewards(np.zeros((1, 2)), np.zeros(2), alpha)


def test_mix_rewards_rejects_shape_mismatch():
  with pytest.raises(ValueError, match="costs"):
    mix_rewards(np.zeros((3, 2)), np.zeros(3), 0.5)
