"""The paper's pipeline end to end: collect -> train the policy -> evaluate -> experiments -> report.

Used by launch/demo.py (embedded world, models trained here) and by the launches of the paper
configs (real checkpoints and datasets). Each stage is a function so the launches can also run
them one at a time (launch/collect.py, train_policy.py, evaluate.py).
"""

from __future__ import annotations

import json
import logging
import os

import datasets
import ml_collections
import numpy as np

from jax_specsel.bandit import collect as collect_lib
from jax_specsel.bandit import distributed
from jax_specsel.bandit import reinforce
from jax_specsel.bandit.collect import AUTOREGRESSIVE, CollectConfig
from jax_specsel.eval import evaluate as evaluate_lib
from jax_specsel.eval import experiments, report
from jax_specsel.models.interface import Model

log = logging.getLogger(__name__)


def collect_stage(target: Model, drafters: dict[str, Model], train: datasets.Dataset,
                  config: ml_collections.ConfigDict, output_dir: str):
  collect_config = CollectConfig(max_new_tokens=config.max_new_tokens, batch_size=config.collect_batch_size,
                                 shard_size=config.shard_size, include_autoregressive=True,
                                 sample_temperature=1.0, seed=config.seed)
  # One process: collect.collect. Several (after jax.distributed.initialize): each takes its shards.
  dataset = distributed.collect(target, drafters, train, os.path.join(output_dir, "collection"),
                                collect_config)
  return dataset, collect_lib.load_collection(os.path.join(output_dir, "collection"))[1]


def policy_options(meta: dict, config) -> list[str]:
  names = [n for n in meta["options"] if n != AUTOREGRESSIVE]
  return names + [AUTOREGRESSIVE] if config.autoregressive_option else names


def train_stage(dataset, meta, config, output_dir: str):
  options = policy_options(meta, config)
  embeddings, rewards, names = collect_lib.reward_table(dataset, meta, config.alpha, config.cost_unit, options)
  train_config = reinforce.paper_train_config() if config.estimator == "paper" else reinforce.default_train_config()
  policy = reinforce.train_policy(embeddings, rewards, seed=config.seed, config=train_config,
                                  option_names=names)
  policy.save(os.path.join(output_dir, "policy"), overwrite=True)
  best = np.argmax(rewards, axis=1)
  agreement = float(np.mean(policy.choose(embeddings) == best))
  log.info("policy trained on %d queries over %s; greedy agrees with the best-reward option on %.1f%%",
           len(embeddings), names, 100 * agreement)
  return policy


def evaluate_stage(target, drafters, test, policy, config, output_dir: str) -> dict:
  eval_config = evaluate_lib.EvalConfig(gamma=config.gamma, temperature=config.temperature,
                                        max_new_tokens=config.max_new_tokens, seeds=tuple(config.eval_seeds))
  result = evaluate_lib.evaluate(target, drafters, test, policy, eval_config)
  report.write_json(os.path.join(output_dir, "evaluation.json"), result)
  return result


def experiments_stage(dataset, meta, test, target, result, config, output_dir: str) -> dict:
  test_embeddings = collect_lib.embed_prompts(target, target.tokenizer(list(test["prompt"]))["input_ids"])
  options = policy_options(meta, config)
  sweep = experiments.alpha_sweep(dataset, meta, test_embeddings, result["per_query"], config.alphas,
                                  options, config.cost_unit, seed=config.seed)
  curve = experiments.sample_efficiency(dataset, meta, test_embeddings, result["per_query"], config.alpha,
                                        config.sample_sizes, options=options, cost_unit=config.cost_unit)
  report.write_json(os.path.join(output_dir, "alpha_sweep.json"), sweep)
  report.write_json(os.path.join(output_dir, "sample_efficiency.json"), curve)
  report.plot_alpha_sweep(sweep, os.path.join(output_dir, "figure2_alpha_sweep.png"))
  report.plot_sample_efficiency(curve, os.path.join(output_dir, "figure3_sample_efficiency.png"))
  return {"alpha_sweep": sweep, "sample_efficiency": curve}


def run(target: Model, drafters: dict[str, Model], train: datasets.Dataset, test: datasets.Dataset,
        config: ml_collections.ConfigDict, output_dir: str) -> dict:
  """All stages; writes report.json, report.md, the figures and intermediate files to output_dir."""
  os.makedirs(output_dir, exist_ok=True)
  dataset, meta = collect_stage(target, drafters, train, config, output_dir)
  policy = train_stage(dataset, meta, config, output_dir)
  result = evaluate_stage(target, drafters, test, policy, config, output_dir)
  extra = experiments_stage(dataset, meta, test, target, result, config, output_dir)
  return write_report(result, extra, target, drafters, output_dir)


def write_report(result: dict, extra: dict, target: Model, drafters: dict[str, Model],
                 output_dir: str) -> dict:
  """report.json (the schema `make demo` promises) and report.md in output_dir."""
  payload = {"domains": result["domains"], "choices": result["choices"],
             "choices_by_variant": result["choices_by_variant"], "checks": effect_checks(result),
             "figures": {"alpha_sweep": "figure2_alpha_sweep.png",
                         "sample_efficiency": "figure3_sample_efficiency.png"},
             "experiments": extra}
  report.write_json(os.path.join(output_dir, "report.json"), payload)
  with open(os.path.join(output_dir, "report.md"), "w") as f:
    f.write(markdown_report(payload, target, drafters))
  return payload


def effect_checks(result: dict) -> dict:
  """The paper's effect, measured: what holds and what falls short (reported, never tuned away)."""
  domains = result["domains"]
  singles = [o for o in next(iter(domains.values())) if not o.startswith("policy")]
  checks = {}
  for domain, rows in domains.items():
    best = max(singles, key=lambda o: rows[o]["speedup"])
    greedy = rows.get("policy_greedy")
    checks[domain] = {"best_single_option": best, "best_single_speedup": rows[best]["speedup"],
                      "policy_greedy_speedup": greedy["speedup"] if greedy else None,
                      "policy_within_5pct_of_best": bool(greedy and greedy["ms_per_token"]
                                                         <= 1.05 * rows[best]["ms_per_token"])}
  if "policy_greedy" in next(iter(domains.values())):
    average = {o: np.mean([domains[d][o]["speedup"] for d in domains]) for o in singles + ["policy_greedy"]}
    checks["average_speedup"] = {k: float(v) for k, v in average.items()}
    checks["policy_beats_every_single_option_on_average"] = bool(
        all(average["policy_greedy"] > average[o] for o in singles))
  return checks


def markdown_report(payload: dict, target: Model, drafters: dict[str, Model]) -> str:
  sizes = ", ".join(f"{name} {model.num_params / 1e6:.2f}M" for name, model in drafters.items())
  parts = [f"# Context-aware drafter selection: report\n\nTarget {target.name} "
           f"({target.num_params / 1e6:.2f}M params); drafters: {sizes}.\n",
           "## Table 1 layout: quality, speedup (ms/token ± spread over seeds), acceptance\n",
           report.results_table(payload), "\n## Choices of the policy per domain\n",
           report.choices_table(payload), "\n## Checks of the paper's effect\n",
           "```json\n" + json.dumps(payload["checks"], indent=2) + "\n```\n",
           "\n## Figures\n\n![alpha sweep](figure2_alpha_sweep.png)\n\n"
           "![sample efficiency](figure3_sample_efficiency.png)\n"]
  return "\n".join(parts)
