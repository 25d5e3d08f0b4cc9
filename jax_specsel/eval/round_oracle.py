"""What per-round choices could gain at best: an oracle that knows the answer, against the best
fixed option, both in target steps of work (greedy decoding).

Given every drafter's teacher-forced greedy agreement with an answer, a round of drafter k at
gamma g from position p accepts its drafts up to the first disagreement, emits one more token and
costs g * step[k] + verify[g] (`decoding.adaptive.Costs`); an autoregressive round emits one
token for verify[0]. The oracle picks each round's option and gamma by dynamic programming over
positions; reads are free for it. The ratio of the best fixed option's cost to the oracle's
bounds what `generate_adaptive` could gain over the per-query choice on that answer.
"""

from __future__ import annotations

import itertools

import numpy as np


def agreement(drafters, prompt, tokens) -> np.ndarray:
  """bool [K, L]: whether each drafter (name -> Model) guesses each token of the answer `tokens`
  [L] to the prompt `prompt` (id lists) greedily, given the answer before it (teacher-forced)."""
  rows = []
  for drafter in drafters.values():
    if drafter.is_encoder_decoder:
      logits = drafter.logits([prompt], [[drafter.decoder_start_id, *tokens[:-1]]])[0]
    else:
      logits = drafter.logits([[*prompt, *tokens[:-1]]])[0, len(prompt) - 1 :]
    rows.append(np.argmax(logits, axis=-1) == np.asarray(tokens))
  return np.asarray(rows)


def _accepted(agree: np.ndarray, position: int, gamma: int) -> int:
  """Drafts accepted in a round of `gamma` from `position` (greedy: up to the first miss)."""
  misses = np.flatnonzero(~agree[position : position + gamma])
  return int(misses[0]) if misses.size else min(gamma, agree.size - position)


def round_costs(agree: np.ndarray, costs) -> tuple[float, float]:
  """(the oracle's cost, the best fixed option's cost) in target steps to emit the answer whose
  agreement is `agree` [K, L]: the oracle picks each round's option and gamma knowing the future
  (dynamic programming over positions), the fixed option keeps one drafter and gamma (or
  autoregressive) for the whole answer. A round of drafter k at gamma g costs g * step[k] +
  verify[g] and emits its accepted drafts and one more token; reads cost nothing here."""
  step, verify = np.asarray(costs.step), np.asarray(costs.verify)
  length, gammas = agree.shape[1], range(1, len(verify))
  best = np.zeros(length + 1)
  for position in range(length - 1, -1, -1):
    best[position] = verify[0] + best[position + 1]
    for k, g in itertools.product(range(len(step)), gammas):
      end = min(length, position + _accepted(agree[k], position, g) + 1)
      best[position] = min(best[position], g * step[k] + verify[g] + best[end])

  def fixed(k, g):
    position, cost = 0, 0.0
    while position < length:
      position += _accepted(agree[k], position, g) + 1
      cost += g * step[k] + verify[g]
    return cost

  fixed_costs = [fixed(k, g) for k, g in itertools.product(range(len(step)), gammas)]
  return float(best[0]), float(min(length * verify[0], *fixed_costs))
