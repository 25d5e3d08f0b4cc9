"""Evaluation of the paper's tables: quality, ms/token, speedup, acceptance, choice histogram.

Every query is decoded on its own (batch 1), as the paper's A.7 accounting prescribes: the query
embedding is computed but not timed (it reuses the target's first pass), the policy's inference is
timed and added to the decoding time of the option it chose. Each single option (autoregressive,
every drafter) is measured on every query too, which gives the baselines and a per-query cost table
from which policy sweeps (alpha, number of training examples) are priced without re-decoding.
"""

from __future__ import annotations

import collections
import dataclasses
import statistics
import time
from typing import Sequence

import datasets
import jax
import numpy as np

from jax_specsel.bandit.collect import AUTOREGRESSIVE, decode_text, embed_prompts
from jax_specsel.data.tasks import get_task
from jax_specsel.decoding import bucket_length, generate
from jax_specsel.eval import metrics
from jax_specsel.models.interface import Model


@dataclasses.dataclass(frozen=True)
class EvalConfig:
  gamma: int = 7
  temperature: float = 0.0  # the paper samples at T=1; greedy makes every option's text identical
  max_new_tokens: int = 64
  seeds: tuple[int, ...] = (0, 1, 2)  # repeats over which ms/token mean and spread are taken


@dataclasses.dataclass
class QueryRun:
  seconds: float
  tokens: int
  accepted: int
  drafted: int
  text: str


def run_option(target: Model, drafter: Model | None, prompt_ids: list[int], config: EvalConfig,
               seed: int) -> QueryRun:
  """Decodes one query with one option (drafter None: autoregressive)."""
  out = generate(target, [prompt_ids], drafter=drafter, gamma=config.gamma,
                 temperature=config.temperature, max_new_tokens=config.max_new_tokens, seed=seed)
  return QueryRun(out.stats.seconds, int(out.lengths[0]), int(out.stats.accepted.sum()),
                  int(out.stats.drafted.sum()), decode_text(target, out)[0])


def evaluate(target: Model, drafters: dict[str, Model], examples: datasets.Dataset, policy=None,
             config: EvalConfig = EvalConfig()) -> dict:
  """Measures every single option and, with a policy, its greedy and dynamic variants.

  Args:
    target: the target model (tokenizer attached).
    drafters: name -> drafter; names must match the policy's option names.
    examples: columns id, task, prompt, reference.
    policy: a trained bandit Policy (option names: drafter names and possibly "autoregressive").
    config: decoding settings and seeds.

  Returns:
    {"domains": {task: {option: row}}, "choices": {task: {option: share}}, "per_query": {...}}
    with rows {quality, ms_per_token, ms_per_token_spread, speedup, acceptance_rate}.
  """
  prompts = target.tokenizer(list(examples["prompt"]))["input_ids"]
  options: dict[str, Model | None] = {AUTOREGRESSIVE: None, **drafters}
  variants = {} if policy is None else {"policy_greedy": True, "policy_dynamic": False}
  embeddings = None
  if policy is not None:
    _check_policy_options(policy, options)
    embeddings = embed_prompts(target, prompts)  # not timed (paper A.7)
  _warm_up(target, options, prompts, config, policy, embeddings)
  runs = {name: [] for name in (*options, *variants)}
  chosen = {variant: [] for variant in variants}
  for seed in config.seeds:
    per_seed = {name: [] for name in runs}
    key = jax.random.key(seed)
    # Every option decodes query i before any decodes query i+1: all of them (the policy
    # variants included, which run the policy's program in between) start from the same cache
    # state, so the side-by-side ratios do not favour whichever option ran back to back.
    for i, prompt in enumerate(prompts):
      for name, drafter in options.items():
        per_seed[name].append(run_option(target, drafter, prompt, config, seed))
      for variant, greedy in variants.items():
        key, sub = jax.random.split(key)
        run, choice = _run_policy_once(target, options, policy, prompt, embeddings[i], greedy,
                                       sub, config, seed)
        per_seed[variant].append(run)
        if seed == config.seeds[0]:
          chosen[variant].append(choice)
    for name, seed_runs in per_seed.items():
      runs[name].append(seed_runs)
  return _summarize(examples, runs, chosen)


def _warm_up(target, options, prompts, config, policy=None, embeddings=None):
  """Compiles every (option, prompt bucket) and the policy once: no timed call compiles."""
  seen = set()
  for prompt in prompts:
    bucket = bucket_length(len(prompt))
    if bucket not in seen:
      seen.add(bucket)
      for drafter in options.values():
        run_option(target, drafter, prompt, config, 0)
  if policy is not None:
    for greedy in (True, False):
      policy.choose_one(embeddings[0], greedy=greedy, key=jax.random.key(0))


def _check_policy_options(policy, options):
  unknown = set(policy.option_names) - set(options)
  if unknown:
    raise ValueError(f"the policy chooses among {policy.option_names} but options "
                     f"{sorted(unknown)} are not given.")


def _run_policy_once(target, options, policy, prompt, embedding, greedy, key, config, seed):
  """(QueryRun with the policy's inference time added, chosen option name) for one query."""
  started = time.perf_counter()
  choice = policy.option_names[int(policy.choose_one(embedding, greedy=greedy, key=key))]
  policy_seconds = time.perf_counter() - started
  run = run_option(target, options[choice], prompt, config, seed)
  run.seconds += policy_seconds
  return run, choice


def _summarize(examples, runs, choices) -> dict:
  tasks = list(examples["task"])
  references = list(examples["reference"])
  domains, shares = {}, {}
  for task in dict.fromkeys(tasks):
    rows = [i for i, t in enumerate(tasks) if t == task]
    domains[task] = {name: _option_row(task, option_runs, rows, references)
                     for name, option_runs in runs.items()}
    base = domains[task][AUTOREGRESSIVE]["ms_per_token"]
    for row in domains[task].values():
      row["speedup"] = base / row["ms_per_token"]
    for variant, chosen in choices.items():
      counts = collections.Counter(chosen[i] for i in rows)
      shares.setdefault(task, {})[variant] = {k: v / len(rows) for k, v in sorted(counts.items())}
  per_query = {name: [[r.seconds, r.tokens] for r in option_runs[0]] for name, option_runs in runs.items()}
  return {"domains": domains, "choices": {t: s.get("policy_greedy", {}) for t, s in shares.items()},
          "choices_by_variant": shares, "per_query": per_query}


def _option_row(task, option_runs, rows, references) -> dict:
  ms = [1e3 * sum(runs[i].seconds for i in rows) / max(sum(runs[i].tokens for i in rows), 1)
        for runs in option_runs]
  first = option_runs[0]
  drafted = sum(first[i].drafted for i in rows)
  metric = _metric_for(task)
  quality = (None if metric is None else  # reference-free tasks (Spec-Bench): speed only
             metrics.quality(metric, [first[i].text for i in rows], [references[i] for i in rows]))
  return {"quality": quality, "metric": metric, "ms_per_token": statistics.mean(ms),
          "ms_per_token_spread": statistics.pstdev(ms) if len(ms) > 1 else 0.0,
          "acceptance_rate": sum(first[i].accepted for i in rows) / drafted if drafted else None}


def _metric_for(task: str) -> str | None:
  try:
    return get_task(task).metric
  except KeyError:  # an unregistered task label: ROUGE-L against its references
    return "rouge_l"


def price_choices(per_query: dict, chosen: Sequence[str], policy_seconds: float = 0.0) -> float:
  """ms/token of a policy from the per-query cost table of the single options (no re-decoding)."""
  seconds = sum(per_query[name][i][0] for i, name in enumerate(chosen)) + policy_seconds
  tokens = sum(per_query[name][i][1] for i, name in enumerate(chosen))
  return 1e3 * seconds / max(tokens, 1)
