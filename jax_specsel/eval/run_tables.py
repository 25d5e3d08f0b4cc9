"""The evaluation's tables, made from its timed runs: per-domain rows (quality, ms/token with its
spread, speedup, acceptance), the policies' choice shares, the per-query cost table and the
policy's measured cost, and the adaptive row's round shares and work."""

from __future__ import annotations

import collections
import dataclasses
import statistics
from typing import Sequence

import numpy as np

from jax_specsel.data.tasks import get_task
from jax_specsel.decoding import AUTOREGRESSIVE
from jax_specsel.eval import metrics
from jax_specsel.eval.speed import spread

FUSED_VARIANTS = ("policy_greedy", "policy_dynamic")  # one choice per query: policy_cost applies


@dataclasses.dataclass
class QueryRun:
  """One query decoded by one row of the table, timed around the public call."""

  seconds: float  # wall clock around the public call
  tokens: int
  accepted: int
  drafted: int
  text: str
  choice: str | None = None  # the option a policy row chose
  rounds_by_option: dict[str, int] | None = None  # policy_adaptive: rounds each option drafted
  # policy_adaptive: (tokens per target step of work achieved, the best fixed option's in
  # hindsight among the options scored on the query), in the measured costs' units.
  work: tuple[float, float] | None = None


def policy_cost(runs: dict, rows: Sequence[int] | None = None, fastest: bool = False) -> dict:
  """What choosing costs per query, measured: the fused call minus the plain call with the option
  it chose, on the same queries (paper Table 1: ~1% over the option mostly picked).

  Args:
    runs: option or variant name -> [seed][query] QueryRun (policy runs carry `.choice`).
    rows: the queries to count (default all).
    fastest: per query, the fused call's fastest repeat against the chosen option's fastest
      (`fastest_run`); otherwise every repeat against the plain call of the same seed.

  Returns:
    {variant: {"share": sum(fused - plain) / sum(fused), "ms_per_query": mean difference,
               "median_ratio": median over queries of fused / plain}}.
  """
  out = {}
  for variant in (v for v in runs if v in FUSED_VARIANTS):
    pairs = []  # (fused seconds, plain seconds)
    for i in range(len(runs[variant][0])) if rows is None else rows:
      if fastest:
        fused = fastest_run(runs[variant], i)
        pairs.append((fused.seconds, fastest_run(runs[fused.choice], i).seconds))
      else:
        for seed_index, repeat in enumerate(runs[variant]):
          pairs.append((repeat[i].seconds, runs[repeat[i].choice][seed_index][i].seconds))
    extra = sum(f - p for f, p in pairs)
    total = sum(f for f, _ in pairs)
    out[variant] = {
        "share": extra / total if total else float("nan"),
        "ms_per_query": 1e3 * extra / max(len(pairs), 1),
        "median_ratio": statistics.median(f / p for f, p in pairs) if pairs else float("nan"),
    }
  return out


def fastest_run(option_runs, i: int) -> QueryRun:
  """Query i's fastest repeat for one row ([seed][query] QueryRun). Greedy repeats are one
  computation (the same tokens), and a shared machine's interference, such as a stall of a
  second, only ever adds time: the fastest repeat is the query's time. (Sampled repeats are each
  their own draw, and are averaged instead.)"""
  return min((repeat[i] for repeat in option_runs), key=lambda run: run.seconds)


def summarize(examples, runs, choices, fastest: bool = False) -> dict:
  """The tables `evaluate.evaluate` returns, made from its runs.

  Args:
    examples: the evaluated queries (columns task, reference), in the order of the runs.
    runs: row name (option or policy variant) -> [seed][query] QueryRun.
    choices: fused policy variant -> the option it chose per query (first repeat).
    fastest: the repeats are one computation (greedy): each query's time is its fastest repeat
      (`fastest_run`), else the repeats' mean rate; the spread is over the repeats' totals.

  Returns:
    The dict `evaluate.evaluate` describes.
  """
  tasks = list(examples["task"])
  references = list(examples["reference"])
  domains, shares = {}, {}
  for task in dict.fromkeys(tasks):
    rows = [i for i, t in enumerate(tasks) if t == task]
    domains[task] = {
        name: _option_row(task, option_runs, rows, references, fastest)
        for name, option_runs in runs.items()
    }
    base = domains[task][AUTOREGRESSIVE]["ms_per_token"]
    for row in domains[task].values():
      row["speedup"] = base / row["ms_per_token"]
    for variant, chosen in choices.items():
      counts = collections.Counter(chosen[i] for i in rows)
      shares.setdefault(task, {})[variant] = {k: v / len(rows) for k, v in sorted(counts.items())}
  pick = fastest_run if fastest else (lambda option_runs, i: option_runs[0][i])
  per_query = {
      name: [[run.seconds, run.tokens] for run in (pick(option_runs, i) for i in range(len(tasks)))]
      for name, option_runs in runs.items()
  }
  cost = {"all": policy_cost(runs, fastest=fastest)}
  for task in dict.fromkeys(tasks):
    cost[task] = policy_cost(runs, [i for i, t in enumerate(tasks) if t == task], fastest)
  result = {
      "domains": domains,
      "choices": {t: s.get("policy_greedy", {}) for t, s in shares.items()},
      "choices_by_variant": shares,
      "per_query": per_query,
      "policy_cost": cost,
      "repeat_timing": "fastest" if fastest else "mean",
  }
  if "policy_adaptive" in runs:
    by_task = _rows_by_task(tasks)
    result["round_choices"] = {
        task: _round_shares(runs["policy_adaptive"][0], rows) for task, rows in by_task.items()
    }
    result["round_work"] = {
        task: round_work(runs["policy_adaptive"][0], rows) for task, rows in by_task.items()
    }
  return result


def _rows_by_task(tasks: list[str]) -> dict[str, list[int]]:
  return {task: [i for i, t in enumerate(tasks) if t == task] for task in dict.fromkeys(tasks)}


def round_work(adaptive_runs: list[QueryRun], rows: list[int]) -> dict[str, float]:
  """Mean tokens per target step of work (policy_adaptive, first repeat): what the rounds got,
  the best fixed option's in hindsight, and their ratio: the rule's choices apart from the
  per-round overhead in wall time (both count the reads that scored drafters as work)."""
  achieved = [adaptive_runs[i].work[0] for i in rows]
  best = [adaptive_runs[i].work[1] for i in rows]
  return {
      "achieved": float(np.mean(achieved)),
      "best_fixed_hindsight": float(np.mean(best)),
      "ratio": float(np.mean(achieved) / np.mean(best)),
  }


def _round_shares(adaptive_runs: list[QueryRun], rows: list[int]) -> dict[str, float]:
  """Share of the rounds each option drafted (policy_adaptive, first repeat)."""
  totals = collections.Counter()
  for i in rows:
    totals.update(adaptive_runs[i].rounds_by_option)
  count = sum(totals.values())
  return {name: value / count for name, value in sorted(totals.items())} if count else {}


def _option_row(task, option_runs, rows, references, fastest) -> dict:
  ms = [
      1e3 * sum(runs[i].seconds for i in rows) / max(sum(runs[i].tokens for i in rows), 1)
      for runs in option_runs
  ]
  first = option_runs[0]
  fastest_ms = (
      1e3
      * sum(fastest_run(option_runs, i).seconds for i in rows)
      / max(sum(first[i].tokens for i in rows), 1)
  )
  drafted = sum(first[i].drafted for i in rows)
  metric = _metric_for(task)
  quality = (
      None
      if metric is None  # reference-free tasks (Spec-Bench): speed only
      else metrics.quality(metric, [first[i].text for i in rows], [references[i] for i in rows])
  )
  return {
      "quality": quality,
      "metric": metric,
      "ms_per_token": fastest_ms if fastest else statistics.mean(ms),
      "ms_per_token_spread": spread(ms),
      "acceptance_rate": sum(first[i].accepted for i in rows) / drafted if drafted else None,
  }


def _metric_for(task: str) -> str | None:
  try:
    return get_task(task).metric
  except KeyError:  # an unregistered task label: ROUGE-L against its references
    return "rouge_l"


def price_choices(per_query: dict, chosen: Sequence[str], policy_seconds: float = 0.0) -> float:
  """ms/token of a policy from the per-query cost table of the single options (no re-decoding);
  policy_seconds: what choosing added over all these queries (see `policy_cost`)."""
  seconds = sum(per_query[name][i][0] for i, name in enumerate(chosen)) + policy_seconds
  tokens = sum(per_query[name][i][1] for i, name in enumerate(chosen))
  return 1e3 * seconds / max(tokens, 1)
