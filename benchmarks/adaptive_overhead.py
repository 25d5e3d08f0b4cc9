"""What choosing per round costs against choosing per query: `generate_adaptive` over
`generate_selected` on the same queries and seeds, interleaved query by query.

  python benchmarks/adaptive_overhead.py --policy=reports/demo/policy [--queries=12 --repeats=5]
      [--domains=arithmetic --rule=probe_below=0 --clock=process]

Per test query of the embedded world: the time of `generate_adaptive` (the policy as prior,
costs measured here first) and of `generate_selected` (the policy's one choice), both timed around
the whole public call, the order alternating from query to query. Prints the median ratio per
domain and the rounds each option drafted, and writes them as JSON to --output. The decoding and
rule settings default to the demo's (configs/demo.py); --rule overrides RuleSettings fields.

--clock=wall (the default) is what a user waits for. --clock=process times the process's CPU
time (both cores' work) instead: steadier on a shared machine (BUILD_NOTES.md, "Issue 20, ninth
pass"), so rule settings a percent or two apart can be compared; it counts the work and not the
waiting, so report wall ratios as the speed.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import statistics
import time

import common  # first: the hubs' offline defaults come before any Hugging Face import

# isort: split

import numpy as np
from absl import flags

from jax_specsel import experiment, validation
from jax_specsel.decoding import generate_adaptive, generate_selected
from jax_specsel.eval.speed import measure_adaptive_costs

DEMO = common.DEMO
FLAGS = flags.FLAGS
CLOCKS = {"wall": time.perf_counter, "process": time.process_time}
flags.DEFINE_string("policy", f"{DEMO.output_dir}/policy", "A policy saved by the demo.")
flags.DEFINE_integer("queries", 12, "Test queries per domain.")
flags.DEFINE_integer("repeats", 5, "Timed passes over the queries.")
flags.DEFINE_integer("gamma", DEMO.gamma, "generate_selected's gamma (default: the demo's).")
flags.DEFINE_integer(
    "max_gamma", DEMO.adaptive.max_gamma, "generate_adaptive's largest gamma (default: the demo's)."
)
flags.DEFINE_integer(
    "probe_every", DEMO.adaptive.probe_every, "Rounds between probes (default: the demo's)."
)
flags.DEFINE_float(
    "track_threshold",
    DEMO.adaptive.track_threshold,
    "Hedge weight from which a " "drafter is read at every probe (default: the demo's).",
)
flags.DEFINE_integer(
    "max_new_tokens",
    DEMO.max_new_tokens,
    "Tokens generated at most per query (default: the demo's).",
)
flags.DEFINE_list(
    "rule", [], "RuleSettings overrides, field=value (over --probe_every and --track_threshold)."
)
flags.DEFINE_list("domains", [], "Domains of the world to time (default: all).")
flags.DEFINE_enum(
    "clock", "wall", list(CLOCKS), "What times a call: wall (perf_counter) or process CPU time."
)
flags.DEFINE_string("output", "reports/adaptive_overhead.json", "Where the JSON goes.")
common.define_zoo_flags()
flags.adopt_module_key_flags(common)  # --zoo and --cache_dir in --helpshort


def check_flags():
  """Validates every flag and the output path before the policy, the zoo or any timing; returns
  the rule."""
  from jax_specsel import pipeline
  from jax_specsel.data import world as world_lib

  experiment.integer_flags("queries", "repeats", "gamma", "max_gamma", "max_new_tokens")
  experiment.integer_flags("probe_every", minimum=0)
  common.choices_flag("domains", world_lib.DOMAINS, allow_empty=True)
  validation.writable_file(FLAGS.output, "--output")
  return pipeline.rule_settings(
      DEMO.adaptive,
      probe_every=FLAGS.probe_every,
      track_threshold=FLAGS.track_threshold,
      **common.rule_overrides(FLAGS.rule),
  )


def main(argv):
  del argv
  rule = common.checked(check_flags)  # one line, before the zoo and the timings
  policy, world, zoo = common.checked(
      common.saved_policy_and_zoo, FLAGS.policy, FLAGS.zoo, FLAGS.cache_dir
  )
  target, drafters = zoo.target, zoo.drafters
  probe = zoo.tokenizer([world.split("test", world.domains[0])[0]["prompt"]])["input_ids"]
  costs = measure_adaptive_costs(target, drafters, FLAGS.max_gamma, probe)
  selected, adaptive = timed_calls(target, drafters, policy, costs, rule)
  result = {}
  print(f"rule: {rule}\nclock: {FLAGS.clock}")
  print("| domain | median adaptive / selected | rounds drafted by |\n|---|---|---|")
  for domain in FLAGS.domains or world.domains:
    prompts = [
        zoo.tokenizer(e["prompt"])["input_ids"]
        for e in world.split("test", domain)[: FLAGS.queries]
    ]
    result[domain] = domain_result(prompts, selected, adaptive)
    cells = ", ".join(
        f"{name} {100 * share:.0f}%" for name, share in result[domain]["rounds_by_option"].items()
    )
    print(f"| {domain} | {result[domain]['median_ratio']:.3f} | {cells} |")
  with open(FLAGS.output, "w") as handle:
    json.dump(
        {
            "policy": FLAGS.policy,
            "queries": FLAGS.queries,
            "repeats": FLAGS.repeats,
            "clock": FLAGS.clock,
            "rule": dataclasses.asdict(rule),
            "costs": [float(c) for c in np.asarray(costs.as_array())],
            "result": result,
        },
        handle,
        indent=1,
    )


def timed_calls(target, drafters, policy, costs, rule):
  """(selected, adaptive): each (prompt, seed) -> (seconds of the whole public call on --clock,
  its output or None), with the flags' settings."""
  clock = CLOCKS[FLAGS.clock]

  def selected(prompt, seed):
    started = clock()
    generate_selected(
        target,
        [prompt],
        drafters,
        policy,
        gamma=FLAGS.gamma,
        max_new_tokens=FLAGS.max_new_tokens,
        seed=seed,
    )
    return clock() - started, None

  def adaptive(prompt, seed):
    started = clock()
    out = generate_adaptive(
        target,
        [prompt],
        drafters,
        policy,
        costs=costs,
        max_gamma=FLAGS.max_gamma,
        rule=rule,
        max_new_tokens=FLAGS.max_new_tokens,
        seed=seed,
    )
    return clock() - started, out

  return selected, adaptive


def domain_result(prompts, selected, adaptive) -> dict:
  """One domain's median adaptive / selected ratio over the repeats, the order alternating from
  query to query, and the share of rounds each option drafted (every bucket compiled first)."""
  for prompt in prompts:  # compiles every bucket, untimed
    selected(prompt, 0)
    adaptive(prompt, 0)
  ratios, rounds = [], collections.Counter()
  for repeat in range(FLAGS.repeats):
    for i, prompt in enumerate(prompts):
      order = (adaptive, selected) if (i + repeat) % 2 else (selected, adaptive)
      timed = {call: call(prompt, i) for call in order}
      ratios.append(timed[adaptive][0] / timed[selected][0])
      out = timed[adaptive][1]
      played = out.round_options[0][out.round_options[0] >= 0]
      rounds.update(out.option_names[o] for o in played.tolist())
  total = sum(rounds.values())
  shares = {name: count / total for name, count in sorted(rounds.items())}
  return {"median_ratio": statistics.median(ratios), "rounds_by_option": shares}


if __name__ == "__main__":
  common.run(main)
