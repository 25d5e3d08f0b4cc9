"""The per-round rule's work: tokens per target step that `generate_adaptive` achieves (reads
included) over the best fixed option's in hindsight, per domain of the embedded world.

  python benchmarks/rule_work.py [--policy=reports/demo/policy --queries=8]
      [--rule=probe_below=0.5,probe_every=1] [--costs=reports/rule_work.json] [--shifted]

Work units come from `AdaptiveOutput.achieved` and `hindsight_values`: deterministic once the
costs are fixed, so rule settings are compared here without timing noise (then timed with
benchmarks/adaptive_overhead.py). The rule is the demo's (configs/demo.py) with --rule's
overrides. The costs are measured here unless --costs names an earlier run's JSON (the same
costs make two runs comparable). --shifted adds the demo's shifted domain under the policy
trained without it (from the demo's collection), served frozen, and --online that domain served
as the demo's shifted experiment serves it, with online updates. Prints a table, writes JSON.

The table's last column bounds what any per-round rule could gain on each domain: the oracle
that knows every drafter's greedy agreement with the answer (teacher-forced) and picks each
round's option and gamma by dynamic programming, against the best fixed option (a drafter at its
best fixed gamma, or autoregressive) simulated on the same agreement, per query, reads free.
"""

from __future__ import annotations

import dataclasses
import json
import os

import common  # first: the hubs' offline defaults come before any Hugging Face import

# isort: split

import numpy as np
from absl import flags

from jax_specsel import experiment, validation
from jax_specsel.decoding import RuleSettings, generate_adaptive
from jax_specsel.decoding.adaptive import Costs
from jax_specsel.eval import round_oracle

DEMO = common.DEMO
FLAGS = flags.FLAGS
flags.DEFINE_string("policy", f"{DEMO.output_dir}/policy", "A policy saved by the demo.")
flags.DEFINE_integer("queries", 8, "Test queries per domain.")
flags.DEFINE_list("rule", [], "RuleSettings overrides, field=value (default: the demo's rule).")
flags.DEFINE_string("costs", "", "JSON of an earlier run whose costs to reuse (default: measure).")
flags.DEFINE_bool("shifted", False, "Also the shifted domain under the held-out policy.")
flags.DEFINE_bool(
    "online",
    False,
    "With --shifted: also serve the demo's shifted_queries in turn, learning online as the demo "
    "does; the work ratio over the last 10 queries is the curve's end.",
)
flags.DEFINE_float(
    "online_learning_rate",
    DEMO.adaptive.online_learning_rate,
    "With --online: the online updates' learning rate (default: the demo's).",
)
flags.DEFINE_integer(
    "update_every",
    DEMO.adaptive.update_every,
    "With --online: queries per online update (default: the demo's).",
)
flags.DEFINE_string("output", "reports/rule_work.json", "Where the JSON goes.")
common.define_zoo_flags()
flags.adopt_module_key_flags(common)


def check_flags() -> RuleSettings:
  """Validates every flag before the zoo loads; returns the rule."""
  from jax_specsel import pipeline

  experiment.integer_flags("queries", "update_every")
  validation.real("--online_learning_rate", FLAGS.online_learning_rate, 0.0, 1.0)
  validation.writable_file(FLAGS.output, "--output")
  if FLAGS.costs and not os.path.isfile(FLAGS.costs):
    raise ValueError(f"--costs={FLAGS.costs} is not a file: name a JSON this script wrote.")
  return pipeline.rule_settings(DEMO.adaptive, **common.rule_overrides(FLAGS.rule))


def load_costs(target, drafters, prompt) -> Costs:
  """--costs' costs, or the costs measured now on `prompt` (as the demo measures them)."""
  from jax_specsel.eval.speed import measure_adaptive_costs

  if not FLAGS.costs:
    return measure_adaptive_costs(target, drafters, DEMO.adaptive.max_gamma, [prompt])
  with open(FLAGS.costs) as handle:
    saved = json.load(handle)["costs"]
  return Costs(step=tuple(saved["step"]), read=tuple(saved["read"]), verify=tuple(saved["verify"]))


def domain_work(target, drafters, policy, prompts, costs, rule) -> dict:
  """Mean achieved / best hindsight value over `prompts`, the share of rounds per option, and
  the oracle's tokens per target step over the best fixed option's (`round_oracle`)."""
  ratios, rounds, oracle, fixed = [], None, 0.0, 0.0
  for seed, prompt in enumerate(prompts):
    out = generate_adaptive(
        target,
        [prompt],
        drafters,
        policy,
        costs=costs,
        max_gamma=DEMO.adaptive.max_gamma,
        rule=rule,
        max_new_tokens=DEMO.max_new_tokens,
        seed=seed,
    )
    ratios.append(float(out.achieved[0] / np.nanmax(out.hindsight_values[0])))
    tokens = [int(t) for t in out.tokens[0][: out.lengths[0]]]
    agree = round_oracle.agreement(drafters, prompt, tokens)
    costs_of = round_oracle.round_costs(agree, costs)
    oracle, fixed = oracle + costs_of[0], fixed + costs_of[1]
    chosen = out.round_options[out.round_options >= 0]
    counts = np.bincount(chosen, minlength=len(out.option_names))
    rounds = counts if rounds is None else rounds + counts
  shares = rounds / max(rounds.sum(), 1)
  return {
      "work_vs_hindsight": float(np.mean(ratios)),
      "per_query": ratios,
      "rounds_by_option": dict(zip(out.option_names, map(float, shares))),
      "oracle_vs_fixed": fixed / oracle,
  }


def online_work(target, drafters, prior, prompts, costs, rule, window: int = 10) -> dict:
  """The shifted experiment in work units: the demo's shifted_queries (`prompts` in turn) served
  with online updates of a copy of `prior`; the mean ratio over the last `window` queries."""
  from jax_specsel import pipeline
  from jax_specsel.eval import evaluate as evaluate_lib

  online = pipeline.online_config(DEMO.adaptive) or pipeline.default_online_config()
  online.learning_rate = FLAGS.online_learning_rate
  setup = evaluate_lib.AdaptiveSetup(
      costs=costs,
      max_gamma=DEMO.adaptive.max_gamma,
      rule=rule,
      online=online,
      update_every=FLAGS.update_every,
  )
  policy = prior.copy()
  learner = evaluate_lib.OnlineLearner(policy, setup.online, setup.update_every)
  config = pipeline.eval_config_of(DEMO)
  ratios, rounds = [], {}
  for i in range(DEMO.adaptive.shifted_queries):
    run = evaluate_lib.run_adaptive(
        target, drafters, policy, prompts[i % len(prompts)], config, i, setup, learner
    )
    ratios.append(run.work[0] / run.work[1])
    if i >= DEMO.adaptive.shifted_queries - window:
      for option, count in run.rounds_by_option.items():
        rounds[option] = rounds.get(option, 0) + count
  total = max(sum(rounds.values()), 1)
  return {
      "work_vs_hindsight": float(np.mean(ratios[-window:])),
      "per_query": ratios,
      "rounds_by_option": {option: count / total for option, count in rounds.items()},
  }


def held_out_policy(world_domain: str):
  """The shifted experiment's policy: trained as the demo trains it, without `world_domain`, on
  the collection beside --policy."""
  from jax_specsel import config_checks, pipeline
  from jax_specsel.bandit import collection_store
  from jax_specsel.eval import online_shift

  collection = os.path.join(os.path.dirname(os.path.abspath(FLAGS.policy)), "collection")
  dataset, meta = collection_store.load_collection(collection)
  return online_shift.held_out_policy(
      dataset,
      meta,
      world_domain,
      pipeline.policy_options(meta, DEMO),
      DEMO.alpha,
      DEMO.cost_unit,
      config_checks.trainer_config(DEMO),
      DEMO.seed,
  )


def main(argv):
  del argv
  rule = common.checked(check_flags)
  policy, world, zoo = common.checked(
      common.saved_policy_and_zoo, FLAGS.policy, FLAGS.zoo, FLAGS.cache_dir
  )
  target, drafters = zoo.target, zoo.drafters
  tokens = lambda domain: [
      zoo.tokenizer(e["prompt"])["input_ids"] for e in world.split("test", domain)[: FLAGS.queries]
  ]
  costs = load_costs(target, drafters, tokens(world.domains[0])[0])
  cases = [(domain, policy) for domain in world.domains]
  if FLAGS.shifted:
    shifted = DEMO.adaptive.shifted_domain
    cases.append((f"{shifted} (shifted, held-out policy)", held_out_policy(shifted)))
  if FLAGS.shifted and FLAGS.online:
    cases.append((f"{shifted} (shifted, online, last 10)", cases[-1][1]))
  result = {}
  print(
      f"rule: {rule}\n| domain | achieved / hindsight | rounds by option | oracle / best fixed |"
      "\n|---|---|---|---|"
  )
  for name, prior in cases:
    prompts = tokens(name.split(" ")[0])
    work = online_work if "online" in name else domain_work
    result[name] = work(target, drafters, prior, prompts, costs, rule)
    cells = ", ".join(
        f"{option} {100 * share:.0f}%" for option, share in result[name]["rounds_by_option"].items()
    )
    oracle = result[name].get("oracle_vs_fixed")
    bound = "" if oracle is None else f"{oracle:.3f}"
    print(f"| {name} | {result[name]['work_vs_hindsight']:.3f} | {cells} | {bound} |")
  with open(FLAGS.output, "w") as handle:
    payload = {"rule": dataclasses.asdict(rule), "costs": dataclasses.asdict(costs)}
    json.dump({**payload, "queries": FLAGS.queries, "result": result}, handle, indent=1)


if __name__ == "__main__":
  common.run(main)
