"""What choosing costs per query: `generate_selected` against `generate` with the option it chose.

  python launch/selection_overhead.py                     # the demo zoo and the demo's policy
  python launch/selection_overhead.py --policy=reports/demo/policy --queries=40 --repeats=5

Per test query of the embedded world (every domain): the wall time of `generate_selected` (prefill,
embedding, policy and decode in one program) and of `generate` with the option the policy chose,
same seed, both timed around the whole public call, each in blocks over all queries as a
deployment serves them (the block order alternates between repeats).
Prints the median ratio fused / plain over queries (the issue's bar: <= 1.05) and the policy's
share of per-query time per domain, and writes them as JSON to --output.
"""

from __future__ import annotations

import json
import statistics

from absl import app, flags, logging

from jax_specsel import demo as demo_lib, experiment, validation
from jax_specsel.eval import evaluate

FLAGS = flags.FLAGS
flags.DEFINE_string("policy", "reports/demo/policy", "A policy saved by the demo (Policy.save).")
flags.DEFINE_integer("queries", 40, "Test queries per domain.")
flags.DEFINE_integer("repeats", 3, "Timed passes over the queries.")
flags.DEFINE_integer("gamma", 5, "Draft tokens per round (as the demo).")
flags.DEFINE_integer("max_new_tokens", 48, "Tokens generated at most per query (as the demo).")
flags.DEFINE_string("cache_dir", "", "Zoo cache root.")
flags.DEFINE_string("output", "reports/selection_overhead.json", "Where the JSON goes.")


def check_flags() -> None:
  """Validates every flag and the output path before the policy, the zoo or any timing."""
  experiment.integer_flags("queries", "repeats", "gamma", "max_new_tokens")
  validation.writable_file(FLAGS.output, "--output")


def main(argv):
  del argv
  with experiment.usage_errors():  # one line, before the zoo and the timings
    check_flags()
    policy, world, zoo = demo_lib.saved_policy_and_zoo(FLAGS.policy, FLAGS.cache_dir or None)
  config = evaluate.EvalConfig(gamma=FLAGS.gamma, max_new_tokens=FLAGS.max_new_tokens,
                               seeds=tuple(range(FLAGS.repeats)))
  queries = [(domain, example["prompt"]) for domain in world.domains
             for example in world.split("test", domain)[:FLAGS.queries]]
  prompts = [zoo.tokenizer(prompt)["input_ids"] for _, prompt in queries]
  # Untimed: compiles every program and records the greedy policy's choice of each query.
  choices = [evaluate.run_policy(zoo.target, zoo.drafters, policy, prompt, True, config, 0)[1]
             for prompt in prompts]
  for prompt in prompts[::FLAGS.queries]:
    for drafter in (None, *zoo.drafters.values()):
      evaluate.run_option(zoo.target, drafter, prompt, config, 0)
  names = ("policy_greedy", "autoregressive", *zoo.drafters)
  runs = {name: [[None] * len(prompts) for _ in range(FLAGS.repeats)] for name in names}
  for repeat in range(FLAGS.repeats):
    # Blocks, as a deployment serves: every query through generate_selected, then every query
    # through generate with the option it chose; the block order alternates between repeats.
    blocks = ("fused", "plain") if repeat % 2 == 0 else ("plain", "fused")
    for block in blocks:
      for i, prompt in enumerate(prompts):
        seed = evaluate.query_seed(repeat, i)
        if block == "fused":
          run, choice = evaluate.run_policy(zoo.target, zoo.drafters, policy, prompt, True, config,
                                            seed)
          run.choice = choice
          runs["policy_greedy"][repeat][i] = run
        else:
          drafter = None if choices[i] == "autoregressive" else zoo.drafters[choices[i]]
          runs[choices[i]][repeat][i] = evaluate.run_option(zoo.target, drafter, prompt, config,
                                                            seed)
  domains = [domain for domain, _ in queries]
  result = {"all": evaluate.policy_cost(runs)["policy_greedy"]}
  for domain in world.domains:
    rows = [i for i, d in enumerate(domains) if d == domain]
    result[domain] = evaluate.policy_cost(runs, rows)["policy_greedy"]
  print("| domain | median fused / plain | policy share | ms per query |\n|---|---|---|---|")
  for domain, cost in result.items():
    print(f"| {domain} | {cost['median_ratio']:.3f} | {100 * cost['share']:.2f}% | "
          f"{cost['ms_per_query']:.3f} |")
  with open(FLAGS.output, "w") as handle:
    json.dump({"policy": FLAGS.policy, "queries": len(prompts), "repeats": FLAGS.repeats,
               "gamma": FLAGS.gamma, "cost": result,
               "median_ms_per_query": statistics.median(r.seconds for r in runs["policy_greedy"][0])
               * 1e3}, handle, indent=1)
  logging.info("wrote %s", FLAGS.output)


if __name__ == "__main__":
  app.run(main, flags_parser=experiment.parse_flags)
