"""The paper's pipeline end to end: collect -> train the policy -> evaluate -> experiments -> report.

Used by launch/demo.py (embedded world, models trained here) and by the launches of the paper
configs (real checkpoints and datasets). Each stage is a function so the launches can also run
them one at a time (launch/collect.py, train_policy.py, evaluate.py). The config is checked by
`config_checks`; the paper-effect checks and the report's text are `eval.checks` and `eval.report`.
"""

from __future__ import annotations

import logging
import os

import datasets
import ml_collections
import numpy as np

from jax_specsel import config_checks, validation
from jax_specsel.bandit import collect as collect_lib
from jax_specsel.bandit import collection_store, distributed, reinforce
from jax_specsel.bandit.collect import CollectConfig
from jax_specsel.bandit.online import default_online_config
from jax_specsel.decoding import adaptive_rule
from jax_specsel.decoding import AUTOREGRESSIVE
from jax_specsel.eval import checks as checks_lib
from jax_specsel.eval import evaluate as evaluate_lib
from jax_specsel.eval import experiments, online_shift, report, speed
from jax_specsel.models.interface import Model

log = logging.getLogger(__name__)


def collect_stage(
    target: Model,
    drafters: dict[str, Model],
    train: datasets.Dataset,
    config: ml_collections.ConfigDict,
    output_dir: str,
):
  collect_config = CollectConfig(
      max_new_tokens=config.max_new_tokens,
      batch_size=config.collect_batch_size,
      shard_size=config.shard_size,
      include_autoregressive=True,
      sample_temperature=1.0,
      seed=config.seed,
  )
  # One process: collect.collect. Several (after jax.distributed.initialize): each takes its shards.
  dataset = distributed.collect(
      target, drafters, train, os.path.join(output_dir, "collection"), collect_config
  )
  return dataset, collection_store.load_collection(os.path.join(output_dir, "collection"))[1]


def policy_options(meta: dict, config) -> list[str]:
  names = [n for n in meta["options"] if n != AUTOREGRESSIVE]
  return names + [AUTOREGRESSIVE] if config.autoregressive_option else names


def train_stage(dataset, meta, config, output_dir: str):
  """Trains the policy on a collection (`load_collection`'s dataset and meta) and saves it.

  A partial collection (loaded with allow_partial=True) is recorded in the policy's metadata
  (training_info["collection"]) and logged.
  """
  train_config = config_checks.trainer_config(config)
  options = policy_options(meta, config)
  embeddings, rewards, names = collect_lib.reward_table(
      dataset, meta, config.alpha, config.cost_unit, options
  )
  policy = reinforce.train_policy(
      embeddings, rewards, seed=config.seed, config=train_config, option_names=names
  )
  policy.training_info["collection"] = collection_summary(meta)
  if not policy.training_info["collection"]["complete"]:
    log.warning("policy trained on a PARTIAL collection: %s", policy.training_info["collection"])
  policy.save(os.path.join(output_dir, "policy"), overwrite=True)
  best = np.argmax(rewards, axis=1)
  agreement = float(np.mean(policy.choose(embeddings) == best))
  log.info(
      "policy trained on %d queries over %s; greedy agrees with the best-reward option on %.1f%%",
      len(embeddings),
      names,
      100 * agreement,
  )
  return policy


def eval_config_of(config) -> evaluate_lib.EvalConfig:
  return evaluate_lib.EvalConfig(
      gamma=config.gamma,
      temperature=config.temperature,
      max_new_tokens=config.max_new_tokens,
      seeds=tuple(config.eval_seeds),
  )


def rule_settings(settings, **overrides) -> adaptive_rule.RuleSettings:
  """The per-round rule of config.adaptive (`settings`): its fields there, RuleSettings' defaults
  for the rest, then `overrides` (field -> value)."""
  fields = dict(
      learning_rate=settings.hedge_learning_rate,
      probe_every=settings.probe_every,
      track_threshold=settings.get("track_threshold", adaptive_rule.RuleSettings.track_threshold),
  )
  return adaptive_rule.RuleSettings(**{**fields, **overrides})


def online_config(settings) -> ml_collections.ConfigDict | None:
  """The online updates' config of config.adaptive (`settings`); None when it is frozen."""
  if settings.frozen:
    return None
  online = default_online_config()
  online.learning_rate = settings.online_learning_rate
  return online


def adaptive_setup(target, drafters, test, config) -> evaluate_lib.AdaptiveSetup | None:
  """The `policy_adaptive` row's setup from config.adaptive (None when the config has none):
  the per-option costs are measured here, on this machine, on the first test prompt."""
  if "adaptive" not in config:
    return None
  settings = config.adaptive
  prompt = target.tokenizer([test["prompt"][0]])["input_ids"]
  costs = speed.measure_adaptive_costs(target, drafters, settings.max_gamma, prompt)
  log.info("adaptive costs (target steps): %s", costs)
  return evaluate_lib.AdaptiveSetup(
      costs=costs,
      max_gamma=settings.max_gamma,
      rule=rule_settings(settings),
      online=online_config(settings),
      update_every=settings.update_every,
  )


def evaluate_stage(
    target,
    drafters,
    test,
    policy,
    config,
    output_dir: str,
    setup: evaluate_lib.AdaptiveSetup | None = None,
) -> dict:
  result = evaluate_lib.evaluate(target, drafters, test, policy, eval_config_of(config), setup)
  report.write_json(os.path.join(output_dir, "evaluation.json"), result)
  return result


def shift_stage(dataset, meta, test, target, drafters, setup, config, output_dir: str) -> dict:
  """The shifted domain (`eval.online_shift`): config.adaptive.shifted_domain held out of the
  policy's training, then served with online updates; writes shifted.json and its figure."""
  domain = config.adaptive.shifted_domain
  policy = online_shift.held_out_policy(
      dataset,
      meta,
      domain,
      policy_options(meta, config),
      config.alpha,
      config.cost_unit,
      config_checks.trainer_config(config),
      config.seed,
  )
  rows = [i for i, task in enumerate(test["task"]) if task == domain]
  if not rows:
    raise ValueError(f"config.adaptive.shifted_domain={domain!r} has no test query.")
  prompts = target.tokenizer([test["prompt"][i] for i in rows])["input_ids"]
  result = online_shift.run_shift(
      target,
      drafters,
      policy,
      prompts,
      setup,
      eval_config_of(config),
      config.adaptive.shifted_queries,
  )
  result["domain"] = domain
  report.write_json(os.path.join(output_dir, "shifted.json"), result)
  report.plot_shift(result, os.path.join(output_dir, "figure_shifted_domain.png"))
  return result


def experiments_stage(dataset, meta, test, target, result, config, output_dir: str) -> dict:
  test_embeddings = collect_lib.embed_prompts(
      target, target.tokenizer(list(test["prompt"]))["input_ids"]
  )
  options = policy_options(meta, config)
  # What choosing costs a query, as measured in the evaluation (never negative: noise can be).
  overhead = max(0.0, result["policy_cost"]["all"]["policy_dynamic"]["ms_per_query"] / 1e3)
  sweep = experiments.alpha_sweep(
      dataset,
      meta,
      test_embeddings,
      result["per_query"],
      config.alphas,
      options,
      config.cost_unit,
      seed=config.seed,
      policy_seconds_per_query=overhead,
  )
  curve = experiments.sample_efficiency(
      dataset,
      meta,
      test_embeddings,
      result["per_query"],
      config.alpha,
      config.sample_sizes,
      options=options,
      cost_unit=config.cost_unit,
      policy_seconds_per_query=overhead,
  )
  report.write_json(os.path.join(output_dir, "alpha_sweep.json"), sweep)
  report.write_json(os.path.join(output_dir, "sample_efficiency.json"), curve)
  report.plot_alpha_sweep(sweep, os.path.join(output_dir, "figure2_alpha_sweep.png"))
  report.plot_sample_efficiency(curve, os.path.join(output_dir, "figure3_sample_efficiency.png"))
  return {"alpha_sweep": sweep, "sample_efficiency": curve}


def run(
    target: Model,
    drafters: dict[str, Model],
    train: datasets.Dataset,
    test: datasets.Dataset,
    config: ml_collections.ConfigDict,
    output_dir: str,
    expectations: checks_lib.Expectations | None = None,
    provenance: str = "",
) -> dict:
  """All stages; writes report.json, report.md, the figures and intermediate files to output_dir.

  The config, the splits and the output directory are checked first: a bad value fails before
  any collection, training or evaluation (ValueError naming it).

  Args:
    provenance: a sentence on where the models come from, for the report's header (the demo:
      how its target was grown).
  """
  config_checks.check_config(config, models=False)
  check_splits(train, test)
  validation.writable_directory(output_dir, "output_dir")
  regime = regime_stage(target, drafters, test, config)
  dataset, meta = collect_stage(target, drafters, train, config, output_dir)
  policy = train_stage(dataset, meta, config, output_dir)
  setup = adaptive_setup(target, drafters, test, config)
  result = evaluate_stage(target, drafters, test, policy, config, output_dir, setup)
  extra = experiments_stage(dataset, meta, test, target, result, config, output_dir)
  if setup is not None:
    result["shifted"] = shift_stage(
        dataset, meta, test, target, drafters, setup, config, output_dir
    )
  return write_report(
      result,
      extra,
      target,
      drafters,
      output_dir,
      expectations,
      collection=meta,
      regime=regime,
      provenance=provenance,
  )


def regime_stage(target: Model, drafters: dict[str, Model], test: datasets.Dataset, config) -> dict:
  """Step costs on this machine (`speed.regime`, first test prompt): is the target memory-bound
  enough for speculation to pay? Stated in the report's header."""
  prompt = target.tokenizer([test["prompt"][0]])["input_ids"]
  measured = speed.regime(target, drafters, prompt, config.gamma)
  log.info(
      "regime: target step %.0f us, a gamma-%d round costs %s target steps",
      measured["target_step_us"],
      config.gamma,
      measured["round_target_steps"],
  )
  return measured


def check_splits(train: datasets.Dataset | None, test: datasets.Dataset | None) -> None:
  """Raises ValueError for an empty split (None: not used by the caller)."""
  for name, split in (("train", train), ("test", test)):
    if split is not None and len(split) == 0:
      raise ValueError(
          f"the {name} split is empty: nothing to "
          f"{'collect' if name == 'train' else 'evaluate'}; check the task names, "
          f"data files and config.{name}_per_task (or the demo's per-domain counts)."
      )


def collection_summary(meta: dict) -> dict:
  """Whether the collection a stage used was complete (from `load_collection`'s metadata)."""
  return {
      "complete": bool(meta.get("complete", True)),
      "collected_queries": int(meta.get("collected_queries", meta.get("num_queries", 0))),
      "num_queries": int(meta.get("num_queries", 0)),
      "missing_shards": list(meta.get("missing_shards", [])),
  }


def write_report(
    result: dict,
    extra: dict,
    target: Model,
    drafters: dict[str, Model],
    output_dir: str,
    expectations: checks_lib.Expectations | None = None,
    collection: dict | None = None,
    regime: dict | None = None,
    provenance: str = "",
) -> dict:
  """report.json (the schema `make demo` promises) and report.md in output_dir.

  Args:
    collection: `load_collection`'s metadata: the report records whether the collection behind
      the policy and the experiments was complete (a partial one is stated in report.md).
  """
  checks = checks_lib.effect_checks(result, expectations)
  payload = {
      "domains": result["domains"],
      "choices": result["choices"],
      "choices_by_variant": result["choices_by_variant"],
      "policy_cost": result.get("policy_cost", {}),
      "repeat_timing": result.get("repeat_timing", "mean"),
      "round_choices": result.get("round_choices", {}),
      "round_work": result.get("round_work", {}),
      "shifted": _shift_summary(result.get("shifted")),
      "checks": checks,
      "shortfalls": checks_lib.shortfalls(checks),
      "figures": {
          "alpha_sweep": "figure2_alpha_sweep.png",
          "sample_efficiency": "figure3_sample_efficiency.png",
      },
      "experiments": extra,
  }
  if result.get("shifted"):
    payload["figures"]["shifted_domain"] = "figure_shifted_domain.png"
  if collection is not None:
    payload["collection"] = collection_summary(collection)
  payload["models"] = {
      "target": target.name,
      "target_params": int(target.num_params),
      "drafter_params": {n: int(m.num_params) for n, m in drafters.items()},
      "provenance": provenance,
      "regime": regime or {},
  }
  report.write_json(os.path.join(output_dir, "report.json"), payload)
  with open(os.path.join(output_dir, "report.md"), "w") as f:
    f.write(report.markdown_report(payload, target, drafters))
  return payload


def _shift_summary(shifted: dict | None) -> dict:
  """What report.json keeps of the shifted-domain run (the curves stay in shifted.json)."""
  if not shifted:
    return {}
  return {
      key: shifted[key]
      for key in (
          "domain",
          "queries",
          "window",
          "final",
          "best_fixed",
          "online_vs_best_fixed",
          "frozen_vs_best_fixed",
          "prior_choices",
      )
  }
