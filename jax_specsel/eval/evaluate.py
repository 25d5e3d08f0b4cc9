"""Evaluation of the paper's tables: quality, ms/token, speedup, acceptance, choice histogram.

Every query is decoded on its own (batch 1), as the paper's A.7 accounting prescribes, and every
row is timed the same way: the wall clock around the whole public call a user makes (host work,
the compiled program, the output fetch). The rows take turns query by query, so that noise and
drift of a shared machine fall on every row alike. Single options call `generate`; the policy rows call
`generate_selected`, which embeds the query from the target's own first pass, applies the policy
and decodes inside one program, so the policy's cost is in the time and nothing is left untimed.
The policy's share of per-query time is measured: the fused call minus the plain call with the
option it chose, on the same query. Greedy repeats are one computation, so a query's time is its
fastest repeat (a stall of the shared machine only ever adds time); sampled repeats are averaged.

With an `AdaptiveSetup`, the row `policy_adaptive` calls `generate_adaptive` (the option and gamma
chosen per round, the policy's probabilities as the prior) and, unless frozen, updates its own
copy of the policy online after every query, inside the timed call: a user serving with online
learning waits for the update too. Each repeat starts again from the offline policy.

Each single option is measured on every query too, which gives the baselines and a per-query cost
table from which policy sweeps (alpha, number of training examples) are priced without re-decoding.
The tables themselves are made from the runs in eval/run_tables.py.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import os
import time
from typing import Any, Sequence

import datasets
import numpy as np

from jax_specsel.bandit.online import OnlinePolicyUpdater
from jax_specsel.decoding import adaptive, adaptive_rule, bucket_length, generate, generate_selected
from jax_specsel.decoding import AUTOREGRESSIVE
from jax_specsel.eval.run_tables import FUSED_VARIANTS, QueryRun, summarize
from jax_specsel.models.interface import Model, decode_text


@dataclasses.dataclass(frozen=True)
class EvalConfig:
  gamma: int = 7
  temperature: float = 0.0  # the paper samples at T=1; greedy makes every option's text identical
  max_new_tokens: int = 64
  # Repeats: ms/token takes each query's fastest (greedy) or their mean (sampled); the spread is
  # over the repeats' totals.
  seeds: tuple[int, ...] = (0, 1, 2)


@dataclasses.dataclass(frozen=True)
class AdaptiveSetup:
  """The `policy_adaptive` row: per-round choice (`generate_adaptive`) and online updates.

  Attributes:
    costs: per-option costs in target steps (`speed.measure_adaptive_costs` on this machine).
    max_gamma: the largest speculation length a round may choose.
    rule: the per-round rule's settings.
    online: an online-update config (`bandit.default_online_config()`), or None: frozen policy.
    update_every: queries whose feedback one online update takes (1: after every query; more
      amortize the update's fixed cost over several queries).
  """

  costs: adaptive.Costs
  max_gamma: int = 5
  rule: adaptive_rule.RuleSettings = adaptive_rule.RuleSettings()
  online: Any = None
  update_every: int = 1


class OnlineLearner:
  """An `OnlinePolicyUpdater` fed one query at a time, updating every `every` queries."""

  def __init__(self, policy, online_config, every: int = 1):
    self.updater = OnlinePolicyUpdater(policy, online_config)
    self.every = int(every)
    self._pending: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []

  def observe(self, out) -> None:
    """Records a served query's feedback (an `AdaptiveOutput`); updates when enough are in."""
    rewards, observed = online_feedback(out, self.updater.policy.option_names)
    self._pending.append((out.embeddings, rewards, observed))
    if len(self._pending) >= self.every:
      embeddings, rewards, observed = (np.concatenate(part) for part in zip(*self._pending))
      self._pending.clear()
      self.updater.update(embeddings, rewards, observed)


def run_option(
    target: Model, drafter: Model | None, prompt_ids: list[int], config: EvalConfig, seed: int
) -> QueryRun:
  """Decodes one query with one option (drafter None: autoregressive), timed around the call."""
  started = time.perf_counter()
  out = generate(
      target,
      [prompt_ids],
      drafter=drafter,
      gamma=config.gamma,
      temperature=config.temperature,
      max_new_tokens=config.max_new_tokens,
      seed=seed,
  )
  seconds = time.perf_counter() - started
  return QueryRun(
      seconds,
      int(out.lengths[0]),
      int(out.stats.accepted.sum()),
      int(out.stats.drafted.sum()),
      decode_text(target, out)[0],
  )


def run_policy(
    target: Model,
    drafters: dict[str, Model],
    policy,
    prompt_ids: list[int],
    greedy: bool,
    config: EvalConfig,
    seed: int,
) -> tuple[QueryRun, str]:
  """(QueryRun, chosen option) of one query through `generate_selected`, timed around the call."""
  started = time.perf_counter()
  out = generate_selected(
      target,
      [prompt_ids],
      drafters,
      policy,
      greedy_policy=greedy,
      gamma=config.gamma,
      temperature=config.temperature,
      max_new_tokens=config.max_new_tokens,
      seed=seed,
  )
  seconds = time.perf_counter() - started
  run = QueryRun(
      seconds,
      int(out.lengths[0]),
      int(out.stats.accepted.sum()),
      int(out.stats.drafted.sum()),
      decode_text(target, out)[0],
  )
  return run, out.choices[0]


def run_adaptive(
    target: Model,
    drafters: dict[str, Model],
    policy,
    prompt_ids: list[int],
    config: EvalConfig,
    seed: int,
    setup: AdaptiveSetup,
    learner: OnlineLearner | None = None,
) -> QueryRun:
  """One query through `generate_adaptive` (prior: `policy`), then, with a learner, the online
  update of its policy from what the query measured; both inside the timed call."""
  started = time.perf_counter()
  out = adaptive.generate_adaptive(
      target,
      [prompt_ids],
      drafters,
      policy,
      costs=setup.costs,
      max_gamma=setup.max_gamma,
      rule=setup.rule,
      temperature=config.temperature,
      max_new_tokens=config.max_new_tokens,
      seed=seed,
  )
  if learner is not None:
    learner.observe(out)
  seconds = time.perf_counter() - started
  played = out.round_options[0][out.round_options[0] >= 0]
  counts = np.bincount(played, minlength=len(out.option_names))
  return QueryRun(
      seconds,
      int(out.lengths[0]),
      int(out.stats.accepted.sum()),
      int(out.stats.drafted.sum()),
      decode_text(target, out)[0],
      rounds_by_option={n: int(c) for n, c in zip(out.option_names, counts)},
      work=(float(out.achieved[0]), float(np.nanmax(out.hindsight_values[0]))),
  )


def online_feedback(out, option_names: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
  """(rewards [B, K], observed [B, K]) in the policy's option order from an `AdaptiveOutput`:
  each option's hindsight tokens per target step, divided by the row's best (so rewards lie in
  [0, 1] as the offline ones do); drafters never scored on the query are unobserved."""
  columns = [out.option_names.index(name) for name in option_names]
  values = out.hindsight_values[:, columns].astype(np.float64)
  observed = np.isfinite(values)
  best = np.max(np.where(observed, values, 0.0), axis=1, keepdims=True)
  rewards = np.where(observed, values / np.maximum(best, 1e-9), 0.0)
  return rewards.astype(np.float32), observed


def query_seed(seed: int, index: int) -> int:
  """The decoding (and dynamic policy) seed of query `index` in repeat `seed`: every option gets the
  same one; distinct per query, so the dynamic policy's draws are independent across queries."""
  return (seed * 1_000_003 + index) % 2**32


def evaluate(
    target: Model,
    drafters: dict[str, Model],
    examples: datasets.Dataset,
    policy=None,
    config: EvalConfig = EvalConfig(),
    adaptive_setup: AdaptiveSetup | None = None,
) -> dict:
  """Measures every single option and, with a policy, its greedy, dynamic (and adaptive) variants.

  Args:
    target: the target model (tokenizer attached).
    drafters: name -> drafter; names must match the policy's option names.
    examples: columns id, task, prompt, reference.
    policy: a trained bandit Policy (option names: drafter names and possibly "autoregressive").
    config: decoding settings and seeds.
    adaptive_setup: with a policy, adds the row `policy_adaptive` (see the module docstring).

  Returns:
    {"domains": {task: {option: row}}, "choices": {task: {option: share}}, "per_query": {...},
     "policy_cost": {variant: {...}}, "round_choices": {task: {option: share of rounds}},
     "round_work": {task: {"achieved", "best_fixed_hindsight", "ratio"}}} with
    rows {quality, ms_per_token, ms_per_token_spread, speedup, acceptance_rate}; see
    `policy_cost` for "policy_cost".
  """
  prompts = target.tokenizer(list(examples["prompt"]))["input_ids"]
  options: dict[str, Model | None] = {AUTOREGRESSIVE: None, **drafters}
  variants = {} if policy is None else {"policy_greedy": True, "policy_dynamic": False}
  if policy is not None:
    _check_policy_options(policy, options)
    if adaptive_setup is not None:
      variants["policy_adaptive"] = adaptive_setup
  warm_up(target, options, drafters, prompts, config, policy, adaptive_setup)
  rows = [*options, *variants]
  runs = {name: [[None] * len(prompts) for _ in config.seeds] for name in rows}
  for repeat, seed in enumerate(config.seeds):
    # Every row decodes query i before any row decodes query i + 1, in an order that rotates
    # from query to query: slow drifts of a shared machine hit every row alike, and a policy
    # row's call is timed next to the plain call with the option it chose. Each repeat starts
    # the adaptive row over from the offline policy.
    decoders = {
        name: _row_decoder(name, target, options, drafters, policy, variants, config)
        for name in rows
    }
    for i, prompt in enumerate(prompts):
      turn = (repeat + i) % len(rows)
      for name in rows[turn:] + rows[:turn]:
        runs[name][repeat][i] = decoders[name](prompt, query_seed(seed, i))
  chosen = {
      variant: [run.choice for run in runs[variant][0]]
      for variant in variants
      if variant in FUSED_VARIANTS
  }
  # Greedy repeats decode the same tokens: each query counts its fastest repeat.
  return summarize(examples, runs, chosen, fastest=config.temperature == 0)


def _row_decoder(name, target, options, drafters, policy, variants, config):
  """(prompt, seed) -> QueryRun for one row of the table: a single option or a policy variant.

  policy_adaptive gets a fresh copy of the offline policy (and, unless its setup is frozen, an
  online updater of that copy): each call of this function starts over.
  """
  if name in options:
    return lambda prompt, seed: run_option(target, options[name], prompt, config, seed)
  if name == "policy_adaptive":
    setup, own = variants[name], policy.copy()
    learner = (
        OnlineLearner(own, setup.online, setup.update_every) if setup.online is not None else None
    )
    return lambda prompt, seed: run_adaptive(
        target, drafters, own, prompt, config, seed, setup, learner
    )

  def decode(prompt, seed):
    run, choice = run_policy(target, drafters, policy, prompt, variants[name], config, seed)
    run.choice = choice
    return run

  return decode


def warm_up(target, options, drafters, prompts, config, policy=None, adaptive_setup=None):
  """Runs every path a timed call will take once, untimed. Each (option, prompt bucket) compiles
  once, the buckets on threads: XLA compiles a program on one core, so two buckets compile at
  once on two. The policy variants and the adaptive row then also run every query once, with the
  first repeat's seed: the first execution of a branch of a compiled program is itself slow on
  XLA:CPU (the kernels' runtimes are set up on first use), and which branches a call takes
  depends on the query (its chosen option, its rounds' choices and probes)."""
  firsts = {}
  for prompt in prompts:
    firsts.setdefault(bucket_length(len(prompt)), prompt)

  def compile_bucket(prompt):
    for drafter in options.values():
      run_option(target, drafter, prompt, config, 0)
    if policy is not None:
      for greedy in (True, False):
        run_policy(target, drafters, policy, prompt, greedy, config, 0)
      if adaptive_setup is not None:
        warm_adaptive(target, drafters, policy, prompt, config, adaptive_setup)

  workers = max(1, min(len(firsts), os.cpu_count() or 1))
  with concurrent.futures.ThreadPoolExecutor(workers) as pool:
    list(pool.map(compile_bucket, firsts.values()))  # list(): a worker's error is raised here
  if policy is None:
    return
  for i, prompt in enumerate(prompts):
    seed = query_seed(config.seeds[0], i)
    for greedy in (True, False):
      run_policy(target, drafters, policy, prompt, greedy, config, seed)
    if adaptive_setup is not None:
      run_adaptive(target, drafters, policy, prompt, config, seed, adaptive_setup)


def warm_adaptive(target, drafters, policy, prompt, config, setup: AdaptiveSetup) -> None:
  """Compiles the adaptive program for this prompt's bucket and, on a throwaway copy of the
  policy, the online update of `update_every` queries: no timed call compiles."""
  own = policy.copy()
  learner = None if setup.online is None else OnlineLearner(own, setup.online, setup.update_every)
  for _ in range(1 if learner is None else setup.update_every):
    run_adaptive(target, drafters, own, prompt, config, 0, setup, learner)


def _check_policy_options(policy, options):
  unknown = set(policy.option_names or ()) - set(options)
  if unknown or not policy.option_names:
    raise ValueError(
        f"the policy chooses among {policy.option_names} but options "
        f"{sorted(unknown)} are not given."
    )
