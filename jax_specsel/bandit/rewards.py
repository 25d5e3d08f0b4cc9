"""Rewards of the offline bandit dataset (paper eq. 1, eq. 2 and appendix A.5).

For query i and drafter j the paper scores s_ij = alpha * f(o_target, o_j) + (1 - alpha) * c_j:

  f    `rouge_l`: ROUGE-L F1 between the target's greedy output and the drafter's (eq. 1);
  c_j  `size_costs`: a fixed speed bonus from parameter counts (A.5), largest candidate 0;
  mix  `mix_rewards`: eq. 2 taken literally, alpha weighs alignment.

Everything here is host-side numpy: it runs once per collected example, not under jit.
"""

from __future__ import annotations

import functools
import re
from typing import Sequence

import numpy as np

# \w with re.UNICODE matches letters of every script (ä, ß, é, Cyrillic...) plus digits and '_'.
_WORD_PATTERN = re.compile(r"\w+", re.UNICODE)


class UnicodeWordTokenizer:
  """Lowercases and splits on runs of Unicode word characters.

  rouge-score's default tokenizer keeps only [a-z0-9], so "gelöscht" becomes the two tokens
  "gel" and "scht" and German or French outputs get inflated overlaps. No stemming: the Porter
  stemmer is English-only.
  """

  def tokenize(self, text: str) -> list[str]:
    return _WORD_PATTERN.findall(text.lower())


@functools.cache
def _scorer():
  """rouge-score's ROUGE-L scorer, built on first use: rouge-score imports nltk and scipy, which
  every command that never scores text would otherwise pay at start-up."""
  from rouge_score import rouge_scorer

  return rouge_scorer.RougeScorer(["rougeL"], tokenizer=UnicodeWordTokenizer())


def rouge_l(candidates: Sequence[str], references: Sequence[str]) -> np.ndarray:
  """ROUGE-L F1 of each candidate against its reference (paper eq. 1, f).

  Tokens are lowercased runs of Unicode word characters (see `UnicodeWordTokenizer`).
  Empty texts: two texts with no tokens agree perfectly (1.0), because a drafter that stops at
  once where the target also stops at once is perfectly aligned; exactly one empty text scores
  0.0. (rouge-score itself returns 0.0 for both cases.)

  Args:
    candidates: drafter outputs, one string per query.
    references: target outputs, same length as `candidates`.

  Returns:
    float64 array [N] of F1 values in [0, 1].
  """
  if isinstance(candidates, str) or isinstance(references, str):
    raise TypeError("rouge_l takes sequences of strings; wrap a single text in a list: [text]")
  if len(candidates) != len(references):
    raise ValueError(
        f"rouge_l got {len(candidates)} candidates but {len(references)} references; "
        "pass one reference per candidate"
    )
  scores = np.empty(len(candidates), dtype=np.float64)
  for index, (candidate, reference) in enumerate(zip(candidates, references)):
    candidate_empty = not _WORD_PATTERN.search(candidate)
    reference_empty = not _WORD_PATTERN.search(reference)
    if candidate_empty or reference_empty:
      scores[index] = 1.0 if candidate_empty and reference_empty else 0.0
    else:
      # rouge-score's signature is score(target, prediction).
      scores[index] = _scorer().score(reference, candidate)["rougeL"].fmeasure
  return scores


def size_costs(param_counts: Sequence[int], unit: float = 1e9) -> np.ndarray:
  """Fixed size costs of appendix A.5: c_i = 1 - exp(p_i) / exp(p_max), with p_i = count / unit.

  Computed as -expm1(p_i - p_max), which neither overflows for large counts nor loses the small
  differences to cancellation. Higher c means a cheaper candidate (c is a speed bonus in eq. 2):
  the largest candidate gets 0, and c approaches 1 as a candidate gets much smaller than it.

  The unit is a modelling choice, not a constant of nature: in billions (the default, as in the
  paper) drafters of 60M-220M differ by only a few percent among themselves, while next to an 11B
  target (the autoregressive option) every drafter gets c ~ 1. Pass unit=1e8 to spread the
  small models apart.

  Args:
    param_counts: number of parameters of each candidate [K] (the target itself counts as a
      candidate when autoregressive decoding is an option).
    unit: parameters per unit of p_i.

  Returns:
    float64 array [K] with values in [0, 1).
  """
  counts = np.asarray(param_counts, dtype=np.float64)
  if counts.ndim != 1 or counts.size == 0:
    raise ValueError(
        f"size_costs needs a non-empty 1-D list of parameter counts, got shape " f"{counts.shape}"
    )
  if not np.all(np.isfinite(counts)) or np.any(counts < 0):
    raise ValueError(f"parameter counts must be finite and non-negative, got {counts.tolist()}")
  if not unit > 0:
    raise ValueError(f"unit must be positive, got {unit}")
  scaled = counts / unit
  return -np.expm1(scaled - scaled.max())


def mix_rewards(alignment: np.ndarray, costs: np.ndarray, alpha: float) -> np.ndarray:
  """Rewards of eq. 2: alpha * alignment + (1 - alpha) * costs.

  Convention (eq. 2 taken literally): alpha weighs alignment. alpha -> 0 favours the cheapest
  candidate (largest c), alpha -> 1 the best-aligned one. The paper's Figure 2 text says the
  opposite (larger alpha favours the smallest drafter), which contradicts eq. 2 as printed; we
  follow the equation. The paper's "alpha = 0.5 for the autoregressive option" reads the same
  under both conventions.

  Args:
    alignment: [N, K] alignment scores f(o_target, o_k), e.g. from `rouge_l`.
    costs: [K] size costs from `size_costs`.
    alpha: weight of alignment, in [0, 1].

  Returns:
    float64 array [N, K].
  """
  if not 0.0 <= alpha <= 1.0:
    raise ValueError(
        f"alpha must lie in [0, 1] (it weighs alignment against size cost), " f"got alpha={alpha}"
    )
  alignment = np.asarray(alignment, dtype=np.float64)
  costs = np.asarray(costs, dtype=np.float64)
  if alignment.ndim != 2 or costs.shape != (alignment.shape[1],):
    raise ValueError(
        f"alignment must be [N, K] and costs [K]; got alignment {alignment.shape} "
        f"and costs {costs.shape}"
    )
  return alpha * alignment + (1.0 - alpha) * costs[None, :]
