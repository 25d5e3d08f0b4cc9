"""Quality metrics against sacrebleu / rouge-score directly and hand-made GSM8K strings."""

from __future__ import annotations

import decimal

import numpy as np
import pytest
import sacrebleu
from rouge_score import rouge_scorer

from jax_specsel.eval import metrics

HYPOTHESES = ["the cat sat on the mat", "a dog barked loudly at night", "hello world"]
REFERENCES = ["the cat is sitting on the mat", "the dog barked at night", "hello there world"]


def test_bleu_equals_sacrebleu_corpus_bleu():
  expected = sacrebleu.corpus_bleu(HYPOTHESES, [REFERENCES]).score
  assert metrics.bleu(HYPOTHESES, REFERENCES) == pytest.approx(expected, rel=1e-12)
  assert metrics.bleu(["exactly the same text here"], ["exactly the same text here"]) == (
      pytest.approx(100.0)
  )
  assert 0.0 < metrics.bleu(HYPOTHESES, REFERENCES) < 100.0


def test_rouge_l_score_equals_rouge_score_mean_times_100():
  scorer = rouge_scorer.RougeScorer(["rougeL"])
  expected = 100 * np.mean(
      [scorer.score(r, h)["rougeL"].fmeasure for h, r in zip(HYPOTHESES, REFERENCES)]
  )
  assert metrics.rouge_l_score(HYPOTHESES, REFERENCES) == pytest.approx(expected, rel=1e-12)
  # Hand value: "hello world" vs "hello there world": LCS 2, P = 1, R = 2/3, F = 0.8.
  assert metrics.rouge_l_score(["hello world"], ["hello there world"]) == pytest.approx(80.0)


def test_final_number_extraction():
  assert metrics.final_number("Natalia sold 48/2 = 24 clips.\n#### 72") == decimal.Decimal(72)
  assert metrics.final_number("So the answer is 1,250 dollars.") == decimal.Decimal(1250)
  assert metrics.final_number("It costs $3.50, not 4.") == decimal.Decimal(4)
  assert metrics.final_number("#### -7 and then 9") == decimal.Decimal(-7)
  assert metrics.final_number("no digits here") is None


def test_exact_match_gsm8k_style():
  references = [
      "Janet has 16 - 3 - 4 = 9 eggs; 9 * 2 = 18\n#### 18",
      "#### 1,000",
      "The total is 72.",
      "5",
  ]
  hypotheses = [
      "She makes 9 * 2 = 18 dollars.",  # last number 18: right
      "The answer is 1000.0",  # same value, other spelling: right
      "#### 70 (after checking 72)",  # the number after #### counts: wrong
      "I don't know",
  ]  # no number: wrong
  assert metrics.exact_match(hypotheses, references) == pytest.approx(50.0)
  assert metrics.exact_match(["#### 18"], ["18"]) == 100.0


def test_exact_text_match_compares_whole_answers():
  # Digit-by-digit answers: exact_match would only see the last digit and call "3 5" right.
  assert metrics.exact_match(["3 5"], ["8 5"]) == 100.0
  assert metrics.exact_text_match(["3 5", " 8  5", "Die Katze"], ["8 5", "8 5", "die katze"]) == (
      pytest.approx(200 / 3)
  )


def test_quality_dispatch_and_errors():
  assert metrics.quality("bleu", HYPOTHESES, REFERENCES) == metrics.bleu(HYPOTHESES, REFERENCES)
  assert metrics.quality("rouge_l", HYPOTHESES, REFERENCES) == metrics.rouge_l_score(
      HYPOTHESES, REFERENCES
  )
  assert metrics.quality("exact_match", ["7"], ["#### 7"]) == 100.0
  assert metrics.quality("exact_text", ["8 5"], ["8 5"]) == 100.0
  with pytest.raises(ValueError, match=r"unknown metric 'meteor'; choose one of \['bleu'"):
    metrics.quality("meteor", HYPOTHESES, REFERENCES)
  with pytest.raises(ValueError, match="2 hypotheses but 1 references"):
    metrics.bleu(["a", "b"], ["a"])
  with pytest.raises(ValueError, match="no hypotheses"):
    metrics.rouge_l_score([], [])
  with pytest.raises(ValueError, match="has no number"):
    metrics.exact_match(["5"], ["five"])
