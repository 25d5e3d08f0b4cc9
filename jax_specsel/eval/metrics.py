"""Output quality metrics of the paper's tables: BLEU, ROUGE-L and GSM8K-style exact match.

Plus `exact_text` (whole-answer string equality) for answers that are not a single number.

All take parallel lists of hypotheses and references and return a corpus score in [0, 100].
"""

from __future__ import annotations

import decimal
import re
from typing import Callable, Sequence

import numpy as np
import sacrebleu

from jax_specsel.bandit.rewards import rouge_l

# An optionally signed number with optional thousands separators and decimals: -1,234.5
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")


def _check_pairs(name: str, hypotheses: Sequence[str], references: Sequence[str]) -> None:
  if isinstance(hypotheses, str) or isinstance(references, str):
    raise TypeError(f"{name} takes lists of strings; wrap a single text in a list: [text]")
  if len(hypotheses) != len(references):
    raise ValueError(
        f"{name}: {len(hypotheses)} hypotheses but {len(references)} references; "
        "pass one reference per hypothesis"
    )
  if not hypotheses:
    raise ValueError(f"{name}: no hypotheses to score")


def bleu(hypotheses: Sequence[str], references: Sequence[str]) -> float:
  """Corpus BLEU (sacrebleu defaults: 13a tokenization, exponential smoothing).

  Args:
    hypotheses: system outputs.
    references: one reference per output.

  Returns:
    BLEU in [0, 100].
  """
  _check_pairs("bleu", hypotheses, references)
  return float(sacrebleu.corpus_bleu(list(hypotheses), [list(references)]).score)


def rouge_l_score(hypotheses: Sequence[str], references: Sequence[str]) -> float:
  """Mean ROUGE-L F1 x 100, with the Unicode tokenizer of `bandit.rewards.rouge_l`.

  Args:
    hypotheses: system outputs.
    references: one reference per output.

  Returns:
    ROUGE-L in [0, 100].
  """
  _check_pairs("rouge_l", hypotheses, references)
  return float(100.0 * np.mean(rouge_l(hypotheses, references)))


def final_number(text: str) -> decimal.Decimal | None:
  """The answer number of a GSM8K-style text: after '####' if present, else the last number.

  Thousands separators are dropped and the value is parsed exactly ("1,000.0" == "1000").

  Args:
    text: a model output or reference.

  Returns:
    The number, or None if the text has none.
  """
  marker = text.rfind("####")
  numbers = _NUMBER.findall(text[marker + 4 :] if marker >= 0 else text)
  if not numbers:
    return None
  chosen = numbers[0] if marker >= 0 else numbers[-1]
  try:
    return decimal.Decimal(chosen.replace(",", ""))
  except decimal.InvalidOperation:
    return None


def exact_match(hypotheses: Sequence[str], references: Sequence[str]) -> float:
  """Percentage of outputs whose final number equals the reference's (GSM8K accuracy).

  Args:
    hypotheses: system outputs (a worked solution or a bare number).
    references: references (a GSM8K solution with '#### answer', or the bare answer).

  Returns:
    Accuracy in [0, 100]; an output without a number counts as wrong.
  """
  _check_pairs("exact_match", hypotheses, references)
  hits = []
  for hypothesis, reference in zip(hypotheses, references):
    expected = final_number(reference)
    if expected is None:
      raise ValueError(
          f"exact_match: reference {reference!r} has no number; GSM8K-style "
          "exact match needs numeric answers"
      )
    hits.append(final_number(hypothesis) == expected)
  return float(100.0 * np.mean(hits))


def exact_text_match(hypotheses: Sequence[str], references: Sequence[str]) -> float:
  """Percentage of outputs equal to their reference after lowercasing and collapsing spaces.

  For answers that are not one number, e.g. digit-by-digit answers ("8 5"), where the
  GSM8K-style `exact_match` would compare only the last digit.

  Args:
    hypotheses: system outputs.
    references: one reference per output.

  Returns:
    Accuracy in [0, 100].
  """
  _check_pairs("exact_text", hypotheses, references)
  normalize = lambda text: " ".join(text.lower().split())
  return float(
      100.0 * np.mean([normalize(h) == normalize(r) for h, r in zip(hypotheses, references)])
  )


METRIC_FUNCTIONS: dict[str, Callable[[Sequence[str], Sequence[str]], float]] = {
    "bleu": bleu,
    "rouge_l": rouge_l_score,
    "exact_match": exact_match,
    "exact_text": exact_text_match,
}


def quality(metric_name: str, hypotheses: Sequence[str], references: Sequence[str]) -> float:
  """Scores outputs with the metric a task names (`Task.metric`).

  Args:
    metric_name: "bleu", "rouge_l", "exact_match" (final number) or "exact_text".
    hypotheses: system outputs.
    references: one reference per output.

  Returns:
    The score in [0, 100].
  """
  if metric_name not in METRIC_FUNCTIONS:
    raise ValueError(f"unknown metric {metric_name!r}; choose one of {sorted(METRIC_FUNCTIONS)}")
  return METRIC_FUNCTIONS[metric_name](hypotheses, references)
