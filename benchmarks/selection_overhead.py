"""What choosing costs per query: `generate_selected` against `generate` with the option it chose.

  python benchmarks/selection_overhead.py                 # the demo zoo and the demo's policy
  python benchmarks/selection_overhead.py --policy=reports/demo/policy --queries=40 --repeats=5
  python benchmarks/selection_overhead.py --random_widths=128,512 --gamma=5 --max_new_tokens=30 \
      --calls=60 --output=reports/selection_overhead_random.json   # random T5s, no zoo needed

Per test query of the embedded world (every domain): the wall time of `generate_selected` (prefill,
embedding, policy and decode in one program) and of `generate` with the option the policy chose,
same seed, both timed around the whole public call, each in blocks over all queries as a
deployment serves them (the block order alternates between repeats).
Prints the median ratio fused / plain over queries and the policy's share of per-query time per
domain, and writes them as JSON to --output. Gamma, the token budget and the zoo default to the
demo's (configs/demo.py).

With --random_widths: random-weight T5s built in-process, shaped as the demo zoo's (target: d_model
W, W/32 heads, d_ff 4W, 2 encoder + 6 decoder layers; three drafters of d_model 96, 4 heads, d_ff
384, 2 + 1 layers; a vocabulary of 304; no stop id, so every call makes max_new_tokens tokens), one
random prompt of --prompt_tokens tokens at batch 1. Per width, per chosen option (--picks) and per
policy size (1 option: only the chosen one; 4 options: autoregressive and the three drafters), a
paper-sized policy (3 layers of 512) that always picks the option: the wall time of the whole
public call `generate_selected` against `generate` with that option, the calls interleaved in a
shuffled order each round (the machine's load hits all alike), medians over --calls calls each,
and the median of the per-round ratios. The outputs are checked equal first.
"""

from __future__ import annotations

import json
import random
import statistics
import time

import common  # first: the hubs' offline defaults come before any Hugging Face import

# isort: split

import numpy as np
from absl import flags, logging

import jax_specsel as js
from jax_specsel import experiment, validation
from jax_specsel.eval import evaluate, run_tables

DEMO = common.DEMO
FLAGS = flags.FLAGS
flags.DEFINE_string("policy", f"{DEMO.output_dir}/policy", "A policy saved by the demo.")
flags.DEFINE_integer("queries", 40, "Test queries per domain.")
flags.DEFINE_integer("repeats", 3, "Timed passes over the queries.")
flags.DEFINE_integer("gamma", DEMO.gamma, "Draft tokens per round (default: the demo's).")
flags.DEFINE_integer(
    "max_new_tokens",
    DEMO.max_new_tokens,
    "Tokens generated at most per query (default: the demo's).",
)
flags.DEFINE_string("output", "reports/selection_overhead.json", "Where the JSON goes.")
flags.DEFINE_list(
    "random_widths", [], "Target widths (d_model) of random T5s; empty: the demo zoo."
)
flags.DEFINE_list(
    "picks",
    ["autoregressive", "d0"],
    "Options the always-one-option policies pick " "(random models: autoregressive, d0, d1, d2).",
)
flags.DEFINE_integer("calls", 60, "Random models: timed calls per variant (medians taken).")
flags.DEFINE_integer("prompt_tokens", 34, "Random models: tokens of the prompt.")
common.define_zoo_flags()
flags.adopt_module_key_flags(common)  # --zoo and --cache_dir in --helpshort

RANDOM_OPTIONS = ("autoregressive", "d0", "d1", "d2")
RANDOM_VOCAB = 304


def _always(names, pick: str, width: int):
  """A paper-sized policy (3 layers of 512) over `names` that picks `pick` for every query."""
  from flax import nnx
  from jax_specsel.bandit.policy import Policy, PolicyNetwork

  network = PolicyNetwork(width, len(names), rngs=nnx.Rngs(0))
  last = network.layers[-1]
  last.kernel[...] = 0.0
  last.bias[...] = 10.0 * (np.arange(len(names)) == list(names).index(pick))
  return Policy(network, option_names=list(names))


def _random_rows(width: int) -> list[dict]:
  """The table rows of one target width (see the module docstring)."""
  from jax_specsel.eval.random_models import random_prompt_ids, random_t5_model

  target = random_t5_model(width, width // 32, 4 * width, 2, 6, RANDOM_VOCAB, seed=0, name="target")
  drafters = {
      name: random_t5_model(96, 4, 384, 2, 1, RANDOM_VOCAB, seed=i, name=name)
      for i, name in enumerate(RANDOM_OPTIONS[1:], start=1)
  }
  prompt = random_prompt_ids(np.random.default_rng(0), RANDOM_VOCAB, 1, FLAGS.prompt_tokens)
  settings = dict(gamma=FLAGS.gamma, max_new_tokens=FLAGS.max_new_tokens)
  calls = {}
  for pick in FLAGS.picks:
    drafter = None if pick == "autoregressive" else drafters[pick]
    calls[(pick, "plain")] = lambda d=drafter: js.generate(target, prompt, drafter=d, **settings)
    for count, names in ((1, (pick,)), (4, RANDOM_OPTIONS)):
      policy = _always(names, pick, width)
      calls[(pick, count)] = lambda p=policy: js.generate_selected(
          target, prompt, drafters, p, **settings
      )
  outputs = {key: call() for key, call in calls.items()}  # compiles every program
  for (pick, variant), out in outputs.items():
    if variant == "plain":
      continue
    expected = outputs[(pick, "plain")]
    if out.choices != [pick] or out.tokens.tolist() != expected.tokens.tolist():
      raise AssertionError(
          f"width {width}, {variant} options picking {pick}: generate_selected "
          "differs from generate with that option"
      )
  for call in calls.values():  # every branch once more, untimed
    call()
  walls = {key: [] for key in calls}
  order = list(calls)
  for _ in range(FLAGS.calls):
    random.shuffle(order)
    for key in order:
      started = time.perf_counter()
      calls[key]()
      walls[key].append(time.perf_counter() - started)
  rows = []
  for pick in FLAGS.picks:
    plain = walls[(pick, "plain")]
    for count in (1, 4):
      fused = walls[(pick, count)]
      rows.append(
          {
              "width": width,
              "target_params_M": target.num_params / 1e6,
              "pick": pick,
              "options": count,
              "plain_ms": 1e3 * statistics.median(plain),
              "fused_ms": 1e3 * statistics.median(fused),
              "ratio": statistics.median(fused) / statistics.median(plain),
              "paired_ratio": statistics.median(f / p for f, p in zip(fused, plain)),
              "extra_ms": 1e3 * (statistics.median(fused) - statistics.median(plain)),
          }
      )
  return rows


def random_main() -> None:
  """The random-model table: every --random_widths width, printed and written to --output."""
  rows = []
  print(
      "| target d_model (params) | options | pick | plain ms | fused ms | ratio | paired ratio "
      "| extra ms |\n|---|---|---|---|---|---|---|---|",
      flush=True,
  )
  for width in map(int, FLAGS.random_widths):
    for row in _random_rows(width):
      rows.append(row)
      print(
          f"| {row['width']} ({row['target_params_M']:.1f}M) | {row['options']} | "
          f"{row['pick']} | {row['plain_ms']:.3f} | {row['fused_ms']:.3f} | {row['ratio']:.4f} | "
          f"{row['paired_ratio']:.4f} | {row['extra_ms']:+.3f} |",
          flush=True,
      )
  with open(FLAGS.output, "w") as handle:
    json.dump(
        {
            "gamma": FLAGS.gamma,
            "max_new_tokens": FLAGS.max_new_tokens,
            "prompt_tokens": FLAGS.prompt_tokens,
            "calls": FLAGS.calls,
            "batch": 1,
            "jax_specsel": js.__file__,
            "rows": rows,
        },
        handle,
        indent=1,
    )
  logging.info("wrote %s", FLAGS.output)


def check_flags() -> None:
  """Validates every flag and the output path before the policy, the zoo or any timing."""
  experiment.integer_flags(
      "queries", "repeats", "gamma", "max_new_tokens", "calls", "prompt_tokens"
  )
  validation.writable_file(FLAGS.output, "--output")
  unknown = sorted(set(FLAGS.picks) - set(RANDOM_OPTIONS))
  if FLAGS.random_widths and unknown:
    raise ValueError(f"--picks={unknown}: choose from {list(RANDOM_OPTIONS)}.")
  for width in FLAGS.random_widths:
    if not width.isdigit() or int(width) < 32 or int(width) % 32:
      raise ValueError(f"--random_widths={width!r}: each a multiple of 32 (heads of 32).")


def timed_runs(zoo, policy, prompts: list, config: evaluate.EvalConfig) -> dict:
  """{option: [repeat][query] run}: each query through generate_selected (policy_greedy) and
  through generate with the option the policy chose, in blocks as a deployment serves them."""
  # Untimed: compiles every program and records the greedy policy's choice of each query.
  choices = [
      evaluate.run_policy(zoo.target, zoo.drafters, policy, prompt, True, config, 0)[1]
      for prompt in prompts
  ]
  for prompt in prompts[:: FLAGS.queries]:
    for drafter in (None, *zoo.drafters.values()):
      evaluate.run_option(zoo.target, drafter, prompt, config, 0)
  names = ("policy_greedy", "autoregressive", *zoo.drafters)
  runs = {name: [[None] * len(prompts) for _ in range(FLAGS.repeats)] for name in names}
  for repeat in range(FLAGS.repeats):
    # Every query through one call, then every query through the other; the block order
    # alternates between repeats.
    blocks = ("fused", "plain") if repeat % 2 == 0 else ("plain", "fused")
    for block in blocks:
      for i, prompt in enumerate(prompts):
        seed = evaluate.query_seed(repeat, i)
        if block == "fused":
          run, choice = evaluate.run_policy(
              zoo.target, zoo.drafters, policy, prompt, True, config, seed
          )
          run.choice = choice
          runs["policy_greedy"][repeat][i] = run
        else:
          drafter = None if choices[i] == "autoregressive" else zoo.drafters[choices[i]]
          runs[choices[i]][repeat][i] = evaluate.run_option(
              zoo.target, drafter, prompt, config, seed
          )
  return runs


def zoo_main() -> None:
  """The demo zoo's table: the policy's overhead per domain, printed and written to --output."""
  policy, world, zoo = common.checked(
      common.saved_policy_and_zoo, FLAGS.policy, FLAGS.zoo, FLAGS.cache_dir
  )
  config = evaluate.EvalConfig(
      gamma=FLAGS.gamma, max_new_tokens=FLAGS.max_new_tokens, seeds=tuple(range(FLAGS.repeats))
  )
  queries = [
      (domain, example["prompt"])
      for domain in world.domains
      for example in world.split("test", domain)[: FLAGS.queries]
  ]
  prompts = [zoo.tokenizer(prompt)["input_ids"] for _, prompt in queries]
  runs = timed_runs(zoo, policy, prompts, config)
  domains = [domain for domain, _ in queries]
  result = {"all": run_tables.policy_cost(runs)["policy_greedy"]}
  for domain in world.domains:
    rows = [i for i, d in enumerate(domains) if d == domain]
    result[domain] = run_tables.policy_cost(runs, rows)["policy_greedy"]
  print("| domain | median fused / plain | policy share | ms per query |\n|---|---|---|---|")
  for domain, cost in result.items():
    print(
        f"| {domain} | {cost['median_ratio']:.3f} | {100 * cost['share']:.2f}% | "
        f"{cost['ms_per_query']:.3f} |"
    )
  median_seconds = statistics.median(r.seconds for r in runs["policy_greedy"][0])
  with open(FLAGS.output, "w") as handle:
    json.dump(
        {
            "policy": FLAGS.policy,
            "queries": len(prompts),
            "repeats": FLAGS.repeats,
            "gamma": FLAGS.gamma,
            "cost": result,
            "median_ms_per_query": median_seconds * 1e3,
        },
        handle,
        indent=1,
    )
  logging.info("wrote %s", FLAGS.output)


def main(argv):
  del argv
  common.checked(check_flags)  # one line, before the zoo and the timings
  if FLAGS.random_widths:
    random_main()
  else:
    zoo_main()


if __name__ == "__main__":
  common.run(main)
