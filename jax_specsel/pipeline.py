"""The paper's pipeline end to end: collect -> train the policy -> evaluate -> experiments -> report.

Used by launch/demo.py (embedded world, models trained here) and by the launches of the paper
configs (real checkpoints and datasets). Each stage is a function so the launches can also run
them one at a time (launch/collect.py, train_policy.py, evaluate.py).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import warnings

import datasets
import ml_collections
import numpy as np

from jax_specsel import validation
from jax_specsel.bandit import collect as collect_lib
from jax_specsel.bandit import collection_store, distributed
from jax_specsel.bandit import reinforce
from jax_specsel.bandit.collect import CollectConfig
from jax_specsel.bandit.online import default_online_config
from jax_specsel.decoding import adaptive_rule
from jax_specsel.decoding.generate import MIN_SAMPLING_TEMPERATURE
from jax_specsel.decoding.selected import AUTOREGRESSIVE
from jax_specsel.eval import evaluate as evaluate_lib
from jax_specsel.eval import experiments, online_shift, report, speed
from jax_specsel.models.interface import Model

log = logging.getLogger(__name__)

# config.trainer -> the policy-training config it selects (whose own `estimator` field is the
# gradient estimator: "reinforce" or "expected").
TRAINERS = {"paper": reinforce.paper_train_config, "default": reinforce.default_train_config}
CONFIG_FIELDS = ("seed", "max_new_tokens", "collect_batch_size", "shard_size", "alpha",
                 "cost_unit", "autoregressive_option", "trainer", "gamma", "temperature",
                 "eval_seeds", "alphas", "sample_sizes")
_RENAMED_FIELDS = {"trainer": "estimator"}  # field -> its old name, still read (deprecated)


def check_config(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming the first bad pipeline field (run it before any work).

  Args:
    config: an experiment or demo config (configs/*.py) with CONFIG_FIELDS (the launches check
      config.output_dir separately: `validation.writable_directory`).
  """
  missing = [field for field in CONFIG_FIELDS
             if field not in config and _RENAMED_FIELDS.get(field, field) not in config]
  if missing:
    raise ValueError(f"config lacks field(s) {missing}: see configs/demo.py for each field.")
  try:
    _check_fields(config)
  except TypeError as err:  # one error type for callers: a bad config value
    raise ValueError(str(err)) from None


ADAPTIVE_FIELDS = ("max_gamma", "probe_every", "hedge_learning_rate", "online_learning_rate",
                   "update_every", "frozen", "shifted_domain", "shifted_queries")


def _check_adaptive(config) -> None:
  """config.adaptive (optional): the policy_adaptive row and the shifted-domain experiment."""
  if "adaptive" not in config:
    return
  settings = config.adaptive
  missing = [f for f in ADAPTIVE_FIELDS if f not in settings]
  if missing:
    raise ValueError(f"config.adaptive lacks {missing}: see configs/demo.py.")
  validation.integer("config.adaptive.max_gamma", settings.max_gamma, minimum=1)
  validation.integer("config.adaptive.probe_every", settings.probe_every, minimum=0)
  validation.integer("config.adaptive.shifted_queries", settings.shifted_queries, minimum=1)
  validation.integer("config.adaptive.update_every", settings.update_every, minimum=1)
  for field in ("hedge_learning_rate", "online_learning_rate"):
    validation.real(f"config.adaptive.{field}", settings[field], 0.0)
  if "track_threshold" in settings:  # optional: RuleSettings' default otherwise
    validation.real("config.adaptive.track_threshold", settings.track_threshold, 0.0, 1.0)
  if not isinstance(settings.frozen, bool):
    raise ValueError(f"config.adaptive.frozen={settings.frozen!r}: must be True or False.")


def _check_fields(config) -> None:
  _check_adaptive(config)
  validation.integer("config.seed", config.seed, minimum=0)
  for field in ("max_new_tokens", "collect_batch_size", "shard_size", "gamma"):
    validation.integer(f"config.{field}", config[field], minimum=1)
  validation.real("config.alpha", config.alpha, 0.0, 1.0)
  if validation.real("config.cost_unit", config.cost_unit) <= 0:
    raise ValueError(f"config.cost_unit={config.cost_unit}: must be > 0 (parameters per cost unit).")
  if not isinstance(config.autoregressive_option, bool):
    raise ValueError(f"config.autoregressive_option={config.autoregressive_option!r}: must be True or False.")
  trainer_config(config)
  temperature = validation.real("config.temperature", config.temperature, 0.0)
  if 0 < temperature < MIN_SAMPLING_TEMPERATURE:
    raise ValueError(f"config.temperature={temperature}: 0 (greedy) or >= {MIN_SAMPLING_TEMPERATURE}.")
  for field, check in (("eval_seeds", lambda name, v: validation.integer(name, v, minimum=0)),
                       ("alphas", lambda name, v: validation.real(name, v, 0.0, 1.0)),
                       ("sample_sizes", lambda name, v: validation.integer(name, v, minimum=1))):
    values = config[field]
    if isinstance(values, (str, bytes)) or not hasattr(values, "__len__") or not len(values):
      raise ValueError(f"config.{field}={values!r}: must be a non-empty list.")
    for i, value in enumerate(values):
      check(f"config.{field}[{i}]", value)


def trainer_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The policy-training config that `config.trainer` names ("paper" or "default").

  A config written before the field was renamed names it `estimator` (the word the training
  config uses for its gradient estimator): that is still read, with a FutureWarning.

  Raises:
    ValueError: an unknown name, both fields, or an old `estimator` that names a gradient
      estimator instead of a training config.
  """
  if "estimator" not in config:
    name = config.trainer
  elif "trainer" in config:
    raise ValueError(f"config has both trainer={config.trainer!r} and estimator={config.estimator!r}: "
                     "`estimator` is the old name of `trainer`; remove it.")
  else:
    name = config.estimator
    if name not in TRAINERS:
      raise ValueError(f"config.estimator={name!r}: this experiment field is now called `trainer` and "
                       f"names a training config, one of {sorted(TRAINERS)}; the gradient estimator "
                       "('reinforce' / 'expected') is a field of that training config.")
    message = (f"config.estimator={name!r} is deprecated: rename the field to config.trainer (it "
               "selects the policy-training config, whose own `estimator` is the gradient estimator).")
    warnings.warn(message, FutureWarning, stacklevel=2)
    log.warning(message)
  if name not in TRAINERS:
    raise ValueError(f"config.trainer={name!r}: choose one of {sorted(TRAINERS)}.")
  return TRAINERS[name]()


def collect_stage(target: Model, drafters: dict[str, Model], train: datasets.Dataset,
                  config: ml_collections.ConfigDict, output_dir: str):
  collect_config = CollectConfig(max_new_tokens=config.max_new_tokens, batch_size=config.collect_batch_size,
                                 shard_size=config.shard_size, include_autoregressive=True,
                                 sample_temperature=1.0, seed=config.seed)
  # One process: collect.collect. Several (after jax.distributed.initialize): each takes its shards.
  dataset = distributed.collect(target, drafters, train, os.path.join(output_dir, "collection"),
                                collect_config)
  return dataset, collection_store.load_collection(os.path.join(output_dir, "collection"))[1]


def policy_options(meta: dict, config) -> list[str]:
  names = [n for n in meta["options"] if n != AUTOREGRESSIVE]
  return names + [AUTOREGRESSIVE] if config.autoregressive_option else names


def train_stage(dataset, meta, config, output_dir: str):
  """Trains the policy on a collection (`load_collection`'s dataset and meta) and saves it.

  A partial collection (loaded with allow_partial=True) is recorded in the policy's metadata
  (training_info["collection"]) and logged.
  """
  train_config = trainer_config(config)
  options = policy_options(meta, config)
  embeddings, rewards, names = collect_lib.reward_table(dataset, meta, config.alpha, config.cost_unit,
                                                        options)
  policy = reinforce.train_policy(embeddings, rewards, seed=config.seed,
                                  config=train_config, option_names=names)
  policy.training_info["collection"] = collection_summary(meta)
  if not policy.training_info["collection"]["complete"]:
    log.warning("policy trained on a PARTIAL collection: %s", policy.training_info["collection"])
  policy.save(os.path.join(output_dir, "policy"), overwrite=True)
  best = np.argmax(rewards, axis=1)
  agreement = float(np.mean(policy.choose(embeddings) == best))
  log.info("policy trained on %d queries over %s; greedy agrees with the best-reward option on %.1f%%",
           len(embeddings), names, 100 * agreement)
  return policy


def eval_config_of(config) -> evaluate_lib.EvalConfig:
  return evaluate_lib.EvalConfig(gamma=config.gamma, temperature=config.temperature,
                                 max_new_tokens=config.max_new_tokens,
                                 seeds=tuple(config.eval_seeds))


def adaptive_setup(target, drafters, test, config) -> evaluate_lib.AdaptiveSetup | None:
  """The `policy_adaptive` row's setup from config.adaptive (None when the config has none):
  the per-option costs are measured here, on this machine, on the first test prompt."""
  if "adaptive" not in config:
    return None
  settings = config.adaptive
  prompt = target.tokenizer([test["prompt"][0]])["input_ids"]
  costs = speed.measure_adaptive_costs(target, drafters, settings.max_gamma, prompt)
  log.info("adaptive costs (target steps): %s", costs)
  online = None
  if not settings.frozen:
    online = default_online_config()
    online.learning_rate = settings.online_learning_rate
  rule = adaptive_rule.RuleSettings(
      learning_rate=settings.hedge_learning_rate, probe_every=settings.probe_every,
      track_threshold=settings.get("track_threshold", adaptive_rule.RuleSettings.track_threshold))
  return evaluate_lib.AdaptiveSetup(costs=costs, max_gamma=settings.max_gamma, rule=rule,
                                    online=online, update_every=settings.update_every)


def evaluate_stage(target, drafters, test, policy, config, output_dir: str,
                   setup: evaluate_lib.AdaptiveSetup | None = None) -> dict:
  result = evaluate_lib.evaluate(target, drafters, test, policy, eval_config_of(config), setup)
  report.write_json(os.path.join(output_dir, "evaluation.json"), result)
  return result


def shift_stage(dataset, meta, test, target, drafters, setup, config, output_dir: str) -> dict:
  """The shifted domain (`eval.online_shift`): config.adaptive.shifted_domain held out of the
  policy's training, then served with online updates; writes shifted.json and its figure."""
  domain = config.adaptive.shifted_domain
  policy = online_shift.held_out_policy(dataset, meta, domain, policy_options(meta, config),
                                        config.alpha, config.cost_unit, trainer_config(config),
                                        config.seed)
  rows = [i for i, task in enumerate(test["task"]) if task == domain]
  if not rows:
    raise ValueError(f"config.adaptive.shifted_domain={domain!r} has no test query.")
  prompts = target.tokenizer([test["prompt"][i] for i in rows])["input_ids"]
  result = online_shift.run_shift(target, drafters, policy, prompts, setup, eval_config_of(config),
                                  config.adaptive.shifted_queries)
  result["domain"] = domain
  report.write_json(os.path.join(output_dir, "shifted.json"), result)
  report.plot_shift(result, os.path.join(output_dir, "figure_shifted_domain.png"))
  return result


def experiments_stage(dataset, meta, test, target, result, config, output_dir: str) -> dict:
  test_embeddings = collect_lib.embed_prompts(target, target.tokenizer(list(test["prompt"]))["input_ids"])
  options = policy_options(meta, config)
  # What choosing costs a query, as measured in the evaluation (never negative: noise can be).
  overhead = max(0.0, result["policy_cost"]["all"]["policy_dynamic"]["ms_per_query"] / 1e3)
  sweep = experiments.alpha_sweep(dataset, meta, test_embeddings, result["per_query"], config.alphas,
                                  options, config.cost_unit, seed=config.seed,
                                  policy_seconds_per_query=overhead)
  curve = experiments.sample_efficiency(dataset, meta, test_embeddings, result["per_query"], config.alpha,
                                        config.sample_sizes, options=options, cost_unit=config.cost_unit,
                                        policy_seconds_per_query=overhead)
  report.write_json(os.path.join(output_dir, "alpha_sweep.json"), sweep)
  report.write_json(os.path.join(output_dir, "sample_efficiency.json"), curve)
  report.plot_alpha_sweep(sweep, os.path.join(output_dir, "figure2_alpha_sweep.png"))
  report.plot_sample_efficiency(curve, os.path.join(output_dir, "figure3_sample_efficiency.png"))
  return {"alpha_sweep": sweep, "sample_efficiency": curve}


def run(target: Model, drafters: dict[str, Model], train: datasets.Dataset, test: datasets.Dataset,
        config: ml_collections.ConfigDict, output_dir: str,
        expectations: Expectations | None = None, provenance: str = "") -> dict:
  """All stages; writes report.json, report.md, the figures and intermediate files to output_dir.

  The config, the splits and the output directory are checked first: a bad value fails before
  any collection, training or evaluation (ValueError naming it).

  Args:
    provenance: a sentence on where the models come from, for the report's header (the demo:
      how its target was grown).
  """
  check_config(config)
  check_splits(train, test)
  validation.writable_directory(output_dir, "output_dir")
  regime = regime_stage(target, drafters, test, config)
  dataset, meta = collect_stage(target, drafters, train, config, output_dir)
  policy = train_stage(dataset, meta, config, output_dir)
  setup = adaptive_setup(target, drafters, test, config)
  result = evaluate_stage(target, drafters, test, policy, config, output_dir, setup)
  extra = experiments_stage(dataset, meta, test, target, result, config, output_dir)
  if setup is not None:
    result["shifted"] = shift_stage(dataset, meta, test, target, drafters, setup, config,
                                    output_dir)
  return write_report(result, extra, target, drafters, output_dir, expectations, collection=meta,
                      regime=regime, provenance=provenance)


def regime_stage(target: Model, drafters: dict[str, Model], test: datasets.Dataset,
                 config) -> dict:
  """Step costs on this machine (`speed.regime`, first test prompt): is the target memory-bound
  enough for speculation to pay? Stated in the report's header."""
  prompt = target.tokenizer([test["prompt"][0]])["input_ids"]
  measured = speed.regime(target, drafters, prompt, config.gamma)
  log.info("regime: target step %.0f us, a gamma-%d round costs %s target steps",
           measured["target_step_us"], config.gamma, measured["round_target_steps"])
  return measured


def check_splits(train: datasets.Dataset | None, test: datasets.Dataset | None) -> None:
  """Raises ValueError for an empty split (None: not used by the caller)."""
  for name, split in (("train", train), ("test", test)):
    if split is not None and len(split) == 0:
      raise ValueError(f"the {name} split is empty: nothing to "
                       f"{'collect' if name == 'train' else 'evaluate'}; check the task names, "
                       f"data files and config.{name}_per_task (or the demo's per-domain counts).")


def collection_summary(meta: dict) -> dict:
  """Whether the collection a stage used was complete (from `load_collection`'s metadata)."""
  return {"complete": bool(meta.get("complete", True)),
          "collected_queries": int(meta.get("collected_queries", meta.get("num_queries", 0))),
          "num_queries": int(meta.get("num_queries", 0)),
          "missing_shards": list(meta.get("missing_shards", []))}


def write_report(result: dict, extra: dict, target: Model, drafters: dict[str, Model],
                 output_dir: str, expectations: Expectations | None = None,
                 collection: dict | None = None, regime: dict | None = None,
                 provenance: str = "") -> dict:
  """report.json (the schema `make demo` promises) and report.md in output_dir.

  Args:
    collection: `load_collection`'s metadata: the report records whether the collection behind
      the policy and the experiments was complete (a partial one is stated in report.md).
  """
  checks = effect_checks(result, expectations)
  payload = {"domains": result["domains"], "choices": result["choices"],
             "choices_by_variant": result["choices_by_variant"],
             "policy_cost": result.get("policy_cost", {}),
             "round_choices": result.get("round_choices", {}),
             "round_work": result.get("round_work", {}),
             "shifted": _shift_summary(result.get("shifted")), "checks": checks,
             "shortfalls": shortfalls(checks),
             "figures": {"alpha_sweep": "figure2_alpha_sweep.png",
                         "sample_efficiency": "figure3_sample_efficiency.png"},
             "experiments": extra}
  if result.get("shifted"):
    payload["figures"]["shifted_domain"] = "figure_shifted_domain.png"
  if collection is not None:
    payload["collection"] = collection_summary(collection)
  payload["models"] = {"target": target.name, "target_params": int(target.num_params),
                       "drafter_params": {n: int(m.num_params) for n, m in drafters.items()},
                       "provenance": provenance, "regime": regime or {}}
  report.write_json(os.path.join(output_dir, "report.json"), payload)
  with open(os.path.join(output_dir, "report.md"), "w") as f:
    f.write(markdown_report(payload, target, drafters))
  return payload


@dataclasses.dataclass(frozen=True)
class Expectations:
  """What the paper's effect predicts for a setting whose domains are known (the embedded world).

  Attributes:
    drafter_domains: drafter name -> the domain it was aligned on (it should be >= min_speedup
      times faster than autoregressive there and at most max_speedup_outside everywhere else).
    autoregressive_domains: domains where only the target is aligned: the policy should pick
      the autoregressive option for most queries.
    min_speedup: the in-domain speedup a domain drafter should reach.
    max_speedup_outside: the speedup a domain drafter should stay at or below outside its domain
      (a misaligned drafter should cost, as the paper's drafters do out of domain).
    policy_tolerance: the greedy policy should be within this fraction of the best single option.
    max_policy_share: what choosing may cost, as a share of per-query time (paper: ~1%).
    mixed_domains: domains whose answers switch domain midway: per-round choice should beat
      every single option and the per-query policy there by `mixed_gain`; they count as no
      drafter's "outside" either.
    mixed_gain: the factor per-round choice should reach on the mixed domains.
    adaptive_tolerance: per-round choice should be within this of the per-query greedy policy
      in every other domain (no loss where one drafter fits).
    shifted_tolerance: on the shifted domain, the online policy should end within this of the
      best single option.
  """

  drafter_domains: dict[str, str] = dataclasses.field(default_factory=dict)
  autoregressive_domains: tuple[str, ...] = ()
  mixed_domains: tuple[str, ...] = ()
  mixed_gain: float = 1.2
  min_speedup: float = 1.5
  max_speedup_outside: float = 0.8
  policy_tolerance: float = 0.05
  max_policy_share: float = 0.01
  adaptive_tolerance: float = 0.03
  shifted_tolerance: float = 0.05


def effect_checks(result: dict, expectations: Expectations | None = None) -> dict:
  """The paper's effect, measured: what holds and what falls short (reported, never tuned away)."""
  expectations = expectations or Expectations()
  domains = result["domains"]
  singles = [o for o in next(iter(domains.values())) if not o.startswith("policy")]
  checks = {}
  for domain, rows in domains.items():
    best = max(singles, key=lambda o: rows[o]["speedup"])
    greedy = rows.get("policy_greedy")
    checks[domain] = {"best_single_option": best, "best_single_speedup": rows[best]["speedup"],
                      "policy_greedy_speedup": greedy["speedup"] if greedy else None,
                      "policy_within_5pct_of_best": bool(
                          greedy and greedy["ms_per_token"]
                          <= (1 + expectations.policy_tolerance) * rows[best]["ms_per_token"])}
  if "policy_greedy" in next(iter(domains.values())):
    average = {o: np.mean([domains[d][o]["speedup"] for d in domains]) for o in singles + ["policy_greedy"]}
    checks["average_speedup"] = {k: float(v) for k, v in average.items()}
    checks["policy_beats_every_single_option_on_average"] = bool(
        all(average["policy_greedy"] > average[o] for o in singles))
  checks.update(_expected_effect_checks(result, expectations))
  checks.update(_adaptive_checks(result, expectations))
  cost = result.get("policy_cost", {}).get("all", {}).get("policy_greedy")
  if cost is not None:
    checks["policy_share_of_query_time"] = {
        "share": cost["share"], "ms_per_query": cost["ms_per_query"],
        "limit": expectations.max_policy_share,
        "below_limit": bool(cost["share"] < expectations.max_policy_share)}
  return checks


def _expected_effect_checks(result: dict, expectations: Expectations) -> dict:
  domains, checks = result["domains"], {}
  for drafter, home in expectations.drafter_domains.items():
    if home not in domains or drafter not in domains[home]:
      continue
    outside = {d: rows[drafter]["speedup"] for d, rows in domains.items()
               if d != home and d not in expectations.mixed_domains}
    checks[f"{drafter}_in_domain"] = {
        "domain": home, "speedup": domains[home][drafter]["speedup"],
        "at_least_min_speedup": bool(domains[home][drafter]["speedup"] >= expectations.min_speedup),
        "speedup_outside": outside,
        "limit_outside": expectations.max_speedup_outside,
        "slower_than_autoregressive_outside": bool(
            all(v <= expectations.max_speedup_outside for v in outside.values()))}
  for domain in expectations.autoregressive_domains:
    share = result["choices"].get(domain, {}).get(AUTOREGRESSIVE)
    if share is not None:
      checks[f"{domain}_policy_chooses_autoregressive"] = {"share": share,
                                                           "for_most_queries": bool(share > 0.5)}
  return checks


def _adaptive_checks(result: dict, expectations: Expectations) -> dict:
  """Per-round choice against the per-query policy per domain, and the shifted domain's end."""
  checks = {}
  for domain, rows in result["domains"].items():
    if "policy_adaptive" in rows and domain in expectations.mixed_domains:
      rivals = {o: row["speedup"] for o, row in rows.items() if o != "policy_adaptive"}
      best = max(rivals, key=rivals.get)
      gain = rows["policy_adaptive"]["speedup"] / rivals[best]
      checks[f"{domain}_adaptive_vs_best"] = {
          "adaptive_speedup": rows["policy_adaptive"]["speedup"], "best_rival": best,
          "best_rival_speedup": rivals[best], "gain": gain, "goal": expectations.mixed_gain,
          "adaptive_reaches_gain": bool(gain >= expectations.mixed_gain)}
    elif "policy_adaptive" in rows and "policy_greedy" in rows:
      ratio = rows["policy_adaptive"]["ms_per_token"] / rows["policy_greedy"]["ms_per_token"]
      checks[f"{domain}_adaptive_vs_policy"] = {
          "adaptive_speedup": rows["policy_adaptive"]["speedup"],
          "policy_greedy_speedup": rows["policy_greedy"]["speedup"], "time_ratio": ratio,
          "adaptive_within_tolerance": bool(ratio <= 1 + expectations.adaptive_tolerance)}
  shifted = result.get("shifted")
  if shifted:
    checks["shifted_domain"] = {
        "domain": shifted["domain"], "best_fixed": shifted["best_fixed"],
        "online_vs_best_fixed": shifted["online_vs_best_fixed"],
        "frozen_vs_best_fixed": shifted["frozen_vs_best_fixed"],
        "prior_choices": shifted["prior_choices"],
        "online_within_tolerance": bool(
            shifted["online_vs_best_fixed"] <= 1 + expectations.shifted_tolerance)}
  return checks


def _shift_summary(shifted: dict | None) -> dict:
  """What report.json keeps of the shifted-domain run (the curves stay in shifted.json)."""
  if not shifted:
    return {}
  return {key: shifted[key] for key in ("domain", "queries", "window", "final", "best_fixed",
                                        "online_vs_best_fixed", "frozen_vs_best_fixed",
                                        "prior_choices")}


def shortfalls(checks: dict) -> list[str]:
  """Plain sentences for every check of the paper's effect that did not hold."""
  notes = []
  if checks.get("policy_beats_every_single_option_on_average") is False:
    notes.append("the greedy policy is not faster on average than every single fixed option "
                 f"(average speedups {_rounded(checks['average_speedup'])})")
  for name, value in checks.items():
    if not isinstance(value, dict):
      continue
    subject = name.removesuffix("_in_domain").removesuffix("_policy_chooses_autoregressive")
    if value.get("policy_within_5pct_of_best") is False:
      notes.append(f"{name}: the greedy policy ({value['policy_greedy_speedup']:.2f}x) is more than "
                   f"5% slower than the best single option {value['best_single_option']} "
                   f"({value['best_single_speedup']:.2f}x)")
    if value.get("at_least_min_speedup") is False:
      notes.append(f"{subject} reaches {value['speedup']:.2f}x in its own domain "
                   f"{value['domain']}, short of the expected speedup")
    if value.get("slower_than_autoregressive_outside") is False:
      notes.append(f"{subject} is not at most {value['limit_outside']:.2f}x autoregressive "
                   f"outside its domain ({_rounded(value['speedup_outside'])})")
    if value.get("below_limit") is False:
      notes.append(f"choosing costs {100 * value['share']:.1f}% of per-query time "
                   f"({value['ms_per_query']:.3f} ms a query), above {100 * value['limit']:.0f}%")
    if value.get("adaptive_within_tolerance") is False:
      notes.append(f"{name.removesuffix('_adaptive_vs_policy')}: per-round choice takes "
                   f"{value['time_ratio']:.2f}x the per-query policy's time per token")
    if value.get("adaptive_reaches_gain") is False:
      notes.append(f"{name.removesuffix('_adaptive_vs_best')}: per-round choice reaches "
                   f"{value['adaptive_speedup']:.2f}x, {value['gain']:.2f}x the best other option "
                   f"{value['best_rival']} ({value['best_rival_speedup']:.2f}x), short of "
                   f"{value['goal']:.1f}x")
    if value.get("online_within_tolerance") is False:
      notes.append(f"shifted domain {value['domain']}: after the online updates the adaptive "
                   f"policy takes {value['online_vs_best_fixed']:.2f}x the best single option's "
                   f"({value['best_fixed']}) time per token")
    if value.get("for_most_queries") is False:
      notes.append(f"{subject}: the policy picks autoregressive for only "
                   f"{100 * value['share']:.0f}% of the queries")
  return notes


def _rounded(values: dict) -> dict:
  return {k: round(float(v), 2) for k, v in values.items()}


def markdown_report(payload: dict, target: Model, drafters: dict[str, Model]) -> str:
  sizes = ", ".join(f"{name} {model.num_params / 1e6:.2f}M" for name, model in drafters.items())
  models = payload.get("models", {})
  parts = [f"# Context-aware drafter selection: report\n\nTarget {target.name} "
           f"({target.num_params / 1e6:.2f}M params); drafters: {sizes}. "
           f"{models.get('provenance', '')}\n", _regime_markdown(models.get("regime")),
           _partial_collection_note(payload.get("collection")),
           "## Table 1 layout: quality, speedup (ms/token ± spread over seeds), acceptance\n",
           report.results_table(payload), "\n## Choices of the policy per domain\n",
           report.choices_table(payload), "\n## What choosing costs\n", _policy_cost_markdown(payload),
           "\n## Per-round choice (policy_adaptive): share of rounds per option\n",
           _round_choices_markdown(payload), _shifted_markdown(payload),
           "\n## Checks of the paper's effect\n",
           _shortfalls_markdown(payload["shortfalls"]),
           "```json\n" + json.dumps(payload["checks"], indent=2) + "\n```\n",
           "\n## Figures\n\n![alpha sweep](figure2_alpha_sweep.png)\n\n"
           "![sample efficiency](figure3_sample_efficiency.png)\n"]
  return "\n".join(parts)


def _regime_markdown(regime: dict | None) -> str:
  """The measured step costs: whether this machine is in the regime where speculation pays."""
  if not regime or regime.get("round_target_steps") is None:
    return ""
  steps = ", ".join(f"{name} {us:.1f} us (ratio {regime['step_ratio'][name]:.0f})"
                    for name, us in regime["drafter_step_us"].items())
  return (f"Measured here, inside compiled loops: a target step {regime['target_step_us']:.0f} us; "
          f"drafter steps {steps}; a gamma-{regime['gamma']} round with {regime['round_drafter']} "
          f"costs {regime['round_target_steps']:.2f} target steps (speculation pays where this is "
          "close to 1: a memory-bound target).\n")


def _policy_cost_markdown(payload: dict) -> str:
  """The policy's measured share of per-query time (fused call minus the plain call with the
  option it chose, same queries and seeds)."""
  cost = payload.get("policy_cost", {})
  if not cost:
    return "No policy was evaluated.\n"
  variants = list(cost["all"])
  lines = ["| domain | " + " | ".join(f"{v}: share / ms per query / median fused:plain"
                                     for v in variants) + " |",
           "|---|" + "---|" * len(variants)]
  for domain, by_variant in cost.items():
    cells = [f"{100 * by_variant[v]['share']:.2f}% / {by_variant[v]['ms_per_query']:.3f} / "
             f"{by_variant[v]['median_ratio']:.3f}" for v in variants]
    lines.append(f"| {domain} | " + " | ".join(cells) + " |")
  return ("Measured: `generate_selected` (embed from the target's first pass, policy, decode, in one "
          "program) minus `generate` with the option it chose, same query and seed.\n\n"
          + "\n".join(lines) + "\n")


def _round_choices_markdown(payload: dict) -> str:
  shares = payload.get("round_choices") or {}
  if not shares:
    return "Not run (the config has no `adaptive` section).\n"
  work = payload.get("round_work") or {}
  lines = ["| domain | rounds drafted by | tokens per target step: achieved / best fixed in "
           "hindsight |", "|---|---|---|"]
  for domain, by_option in shares.items():
    cells = ", ".join(f"{name} {100 * share:.0f}%" for name, share in by_option.items() if share)
    row = work.get(domain)
    ratio = (f"{row['achieved']:.2f} / {row['best_fixed_hindsight']:.2f} ({row['ratio']:.2f})"
             if row else "-")
    lines.append(f"| {domain} | {cells} | {ratio} |")
  note = ("\nWork in the measured costs' units (a target step = 1; the reads that scored "
          "drafters count): what the per-round choices got against the best single option with "
          "the acceptance it showed on the same query, apart from the loop's wall-time "
          "overhead.\n")
  return "\n".join(lines) + "\n" + (note if work else "")


def _shifted_markdown(payload: dict) -> str:
  shifted = payload.get("shifted") or {}
  if not shifted:
    return ""
  finals = ", ".join(f"{name} {value:.3f}" for name, value in shifted["final"].items())
  return (f"\n## Shifted domain: {shifted['domain']} held out of the policy's training\n\n"
          f"The held-out policy's greedy choices there: {shifted['prior_choices']}. "
          f"{shifted['queries']} queries served in turn; ms/token over the last "
          f"{shifted['window']}: {finals}. Online / best single option ({shifted['best_fixed']}): "
          f"{shifted['online_vs_best_fixed']:.3f}; frozen: {shifted['frozen_vs_best_fixed']:.3f}."
          "\n\n![shifted domain](figure_shifted_domain.png)\n")


def _partial_collection_note(collection: dict | None) -> str:
  if not collection or collection["complete"]:
    return ""
  return (f"**Partial collection**: the policy and the experiments used "
          f"{collection['collected_queries']} of {collection['num_queries']} collected queries "
          f"(missing {', '.join(collection['missing_shards'])}).\n")


def _shortfalls_markdown(notes: list[str]) -> str:
  if not notes:
    return "Every check below holds.\n"
  return ("**Falls short** (measured, reported as is):\n\n"
          + "\n".join(f"- {note}" for note in notes) + "\n")
