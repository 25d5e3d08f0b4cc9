"""The paper's policy experiments, priced from the per-query cost table of the single options.

Figure 2 (alpha sweep): share of choices per option and ms/token versus alpha.
Figure 3 (sample efficiency): ms/token versus the number of training examples.
Both train a policy per point on the offline collection and price its choices on the test queries
with `run_tables.price_choices` (every option was decoded on every test query once), so a sweep
costs policy training only. Choices come from the dynamic policy (it samples), as in the paper's
figures; each query is charged the policy's measured per-query cost (`run_tables.policy_cost`: the
fused call minus the plain call with the same option), the same for every point.
"""

from __future__ import annotations

import collections
import statistics
from typing import Sequence

import numpy as np

from jax_specsel.bandit import collect as collect_lib
from jax_specsel.bandit import reinforce
from jax_specsel.eval.run_tables import price_choices
from jax_specsel.eval.speed import spread


def _policy_point(
    embeddings, rewards, names, test_embeddings, per_query, config, seed, policy_seconds_per_query
):
  policy = reinforce.train_policy(embeddings, rewards, seed=seed, config=config, option_names=names)
  chosen = [names[c] for c in policy.choose(test_embeddings, greedy=False, seed=seed)]
  return chosen, price_choices(
      per_query, chosen, policy_seconds=policy_seconds_per_query * len(chosen)
  )


def alpha_sweep(
    dataset,
    meta,
    test_embeddings: np.ndarray,
    per_query: dict,
    alphas: Sequence[float],
    options: Sequence[str] | None = None,
    cost_unit: float = 1e9,
    config=None,
    seed: int = 0,
    policy_seconds_per_query: float = 0.0,
) -> dict:
  """Trains one policy per alpha; returns {"points": [...], "options", "single_options"}."""
  points = []
  for alpha in alphas:
    embeddings, rewards, names = collect_lib.reward_table(dataset, meta, alpha, cost_unit, options)
    chosen, ms = _policy_point(
        embeddings,
        rewards,
        names,
        test_embeddings,
        per_query,
        config,
        seed,
        policy_seconds_per_query,
    )
    counts = collections.Counter(chosen)
    points.append(
        {
            "alpha": float(alpha),
            "ms_per_token": ms,
            "shares": {n: counts[n] / len(chosen) for n in names},
        }
    )
  names = list(options or meta["options"])
  return {"points": points, "options": names, "single_options": _single_options(per_query, names)}


def sample_efficiency(
    dataset,
    meta,
    test_embeddings: np.ndarray,
    per_query: dict,
    alpha: float,
    sizes: Sequence[int],
    seeds: Sequence[int] = (0, 1, 2),
    options: Sequence[str] | None = None,
    cost_unit: float = 1e9,
    config=None,
    policy_seconds_per_query: float = 0.0,
) -> dict:
  """ms/token of the dynamic policy trained on `size` examples, mean and spread over seeds."""
  config = (config or reinforce.default_train_config()).copy_and_resolve_references()
  embeddings, rewards, names = collect_lib.reward_table(dataset, meta, alpha, cost_unit, options)
  points = []
  for size in sizes:
    config.max_examples = int(min(size, len(embeddings)))
    ms = [
        _policy_point(
            embeddings,
            rewards,
            names,
            test_embeddings,
            per_query,
            config,
            s,
            policy_seconds_per_query,
        )[1]
        for s in seeds
    ]
    points.append(
        {
            "examples": config.max_examples,
            "ms_per_token": statistics.mean(ms),
            "ms_per_token_spread": spread(ms),
        }
    )
  return {
      "points": points,
      "alpha": alpha,
      "options": names,
      "single_options": _single_options(per_query, names),
  }


def _single_options(per_query: dict, names) -> dict:
  count = len(next(iter(per_query.values())))
  return {n: price_choices(per_query, [n] * count) for n in names if n in per_query}
