"""The shifted domain: a policy that never saw a domain serves it, choosing per round and
learning online across queries (beyond the paper: its sec. 6 names online learning as future work).

The policy is trained on the same collection without that domain's queries, so its prior for them
comes from other domains. The domain's test queries are then served one after another through
`generate_adaptive`, once with online updates of (a copy of) the policy and once with the policy
frozen, and once with each single option, the variants taking turns query by query; every call is
timed around the whole public call (the online update included). Speed against queries seen is
the curve.
"""

from __future__ import annotations

import functools
import statistics
from typing import Sequence

import datasets
import numpy as np

from jax_specsel.bandit import collect as collect_lib
from jax_specsel.bandit import reinforce
from jax_specsel.bandit.policy import Policy
from jax_specsel.decoding import AUTOREGRESSIVE
from jax_specsel.eval import evaluate as evaluate_lib
from jax_specsel.models.interface import Model


def held_out_policy(
    dataset: datasets.Dataset,
    meta: dict,
    domain: str,
    options: Sequence[str],
    alpha: float,
    cost_unit: float,
    train_config,
    seed: int,
) -> Policy:
  """The policy trained as the pipeline trains it, on every collected query but `domain`'s."""
  rest = dataset.filter(lambda row: row["task"] != domain)
  if len(rest) == len(dataset):
    raise ValueError(
        f"no collected query has task {domain!r}: choose the shifted domain among "
        f"{sorted(set(dataset['task']))}."
    )
  embeddings, rewards, names = collect_lib.reward_table(rest, meta, alpha, cost_unit, options)
  return reinforce.train_policy(
      embeddings, rewards, seed=seed, config=train_config, option_names=names
  )


def run_shift(
    target: Model,
    drafters: dict[str, Model],
    policy: Policy,
    prompts: list[list[int]],
    setup: evaluate_lib.AdaptiveSetup,
    config: evaluate_lib.EvalConfig,
    queries: int,
    window: int = 10,
) -> dict:
  """Serves `queries` queries (the prompts in turn) with each variant; returns the curves.

  Returns:
    {"queries": n, "ms_per_token": {variant: [per query]}, "running": {variant: [mean over the
     last `window` queries]}, "final": {variant: ms/token over the last window},
     "best_fixed": name, "online_vs_best_fixed": final online / final best fixed,
     "prior_choices": {option: share}} where variants are "online", "frozen" and every single
    option.
  """
  options: dict[str, Model | None] = {AUTOREGRESSIVE: None, **drafters}
  runs = _serve(target, drafters, options, policy, prompts, setup, config, queries)
  ms = {name: [1e3 * r.seconds / max(r.tokens, 1) for r in rows] for name, rows in runs.items()}
  tail = slice(max(queries - window, 0), queries)
  final = {
      name: 1e3 * sum(r.seconds for r in rows[tail]) / max(sum(r.tokens for r in rows[tail]), 1)
      for name, rows in runs.items()
  }
  best = min(options, key=lambda name: final[name])
  embeddings = np.concatenate([target.embed(np.asarray([p])) for p in prompts])
  chosen = [policy.option_name(i) for i in policy.choose(embeddings)]
  return {
      "queries": queries,
      "window": window,
      "ms_per_token": ms,
      "running": {name: _running_mean(values, window) for name, values in ms.items()},
      "final": final,
      "best_fixed": best,
      "online_vs_best_fixed": final["online"] / final[best],
      "frozen_vs_best_fixed": final["frozen"] / final[best],
      "prior_choices": {name: chosen.count(name) / len(chosen) for name in sorted(set(chosen))},
  }


def _serve(target, drafters, options, policy, prompts, setup, config, queries: int) -> dict:
  """Variant -> [QueryRun per query]: `queries` queries (the prompts in turn) served online, frozen
  and with every single option, after an untimed warm-up. The variants take turns: every variant
  serves query i before any serves query i + 1, in an order rotated per query, so that the
  machine's drift over the run falls on all of them alike (each learns only from its own)."""
  sequence = [prompts[i % len(prompts)] for i in range(queries)]
  for i, prompt in enumerate(
      prompts
  ):  # every path the timed queries take, once (`evaluate.warm_up`)
    evaluate_lib.run_adaptive(
        target, drafters, policy, prompt, config, evaluate_lib.query_seed(0, i), setup
    )
  evaluate_lib.warm_adaptive(target, drafters, policy, sequence[0], config, setup)
  for drafter in options.values():
    evaluate_lib.run_option(target, drafter, sequence[0], config, 0)
  decoders = {}  # variant -> (prompt, seed) -> QueryRun
  for name, learn in (("online", True), ("frozen", False)):
    own = policy.copy()
    learner = (
        evaluate_lib.OnlineLearner(own, setup.online, setup.update_every)
        if learn and setup.online is not None
        else None
    )
    decoders[name] = functools.partial(
        _adaptive_query, target, drafters, own, config, setup, learner
    )
  for name, drafter in options.items():
    decoders[name] = functools.partial(_option_query, target, drafter, config)
  runs = {name: [] for name in decoders}
  names = list(decoders)
  for i, prompt in enumerate(sequence):
    turn = i % len(names)
    for name in names[turn:] + names[:turn]:
      runs[name].append(decoders[name](prompt, evaluate_lib.query_seed(0, i)))
  return runs


def _adaptive_query(target, drafters, policy, config, setup, learner, prompt, seed):
  return evaluate_lib.run_adaptive(target, drafters, policy, prompt, config, seed, setup, learner)


def _option_query(target, drafter, config, prompt, seed):
  return evaluate_lib.run_option(target, drafter, prompt, config, seed)


def _running_mean(values: list[float], window: int) -> list[float]:
  return [statistics.mean(values[max(0, i + 1 - window) : i + 1]) for i in range(len(values))]
