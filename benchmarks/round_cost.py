"""What a speculative round and a whole call cost inside and around the compiled loop, in target
steps.

  python benchmarks/round_cost.py                             # the demo zoo (built if not cached)
  python benchmarks/round_cost.py --target=DIR --drafter=DIR \
      --prompt="translate English to German: ..."

Every flag is checked before a model is loaded or timed. A --target without tokenizer files is
timed on random prompt ids within the vocabulary of both models (then --prompt is refused).

Two tables, both in units of one target decode step measured inside a compiled loop:
  * rounds by gamma: `loop.repeat_rounds` (rounds back to back in one program: no dispatch, warm
    weights); a round's cost is also its break-even tokens per round against autoregressive.
  * per call: the wall time of a whole 1-token call of each public entry point (`generate`, and
    `generate_selected` with a policy that always picks that option), against the work it does
    (the target's first pass, the drafter's first pass when it drafts, one round, all timed inside
    compiled loops); the rest is the call's fixed cost: host work, argument passing, the launch,
    cache allocation, the output fetch and cold caches.
Writes both tables as JSON to --output. The speculative calls' gamma and the zoo default to the
demo's (configs/demo.py).
"""

from __future__ import annotations

import json
import statistics
import time

import common  # first: the hubs' offline defaults come before any Hugging Face import

# isort: split

import numpy as np
from absl import flags, logging
from flax import nnx

import jax_specsel as js
from jax_specsel import experiment, validation
from jax_specsel.bandit.policy import Policy, PolicyNetwork
from jax_specsel.eval import random_models, speed

FLAGS = flags.FLAGS
flags.DEFINE_string("target", "", "Target checkpoint (directory or hub id); empty: the demo zoo.")
flags.DEFINE_string("drafter", "", "Drafter checkpoint; with the demo zoo: a drafter name.")
flags.DEFINE_string("prompt", "", "Prompt text (default: the first test prompt of the world).")
flags.DEFINE_list("gammas", ["1", "2", "3", "4", "5", "8"], "Draft tokens per round to time.")
flags.DEFINE_integer(
    "gamma",
    common.DEMO.gamma,
    "Draft tokens per round of the speculative 1-token calls (default: the " "demo's).",
)
flags.DEFINE_integer("rounds", 200, "Rounds per timed program.")
flags.DEFINE_integer("calls", 40, "Timed 1-token calls per entry point (median taken).")
flags.DEFINE_string("output", "reports/round_cost.json", "Where the JSON tables go.")
common.define_zoo_flags()  # the demo zoo's, when --target is empty
flags.adopt_module_key_flags(common)  # --zoo and --cache_dir in --helpshort


def check_flags() -> list[int]:
  """Validates every flag and the output path before any model is loaded; returns --gammas."""
  gammas = experiment.integer_list_flag("gammas")
  experiment.integer_flags("gamma", "rounds", "calls")
  if not FLAGS.target and FLAGS.drafter:
    names = common.zoo_config(FLAGS.zoo).drafter_names()
    if FLAGS.drafter not in names:
      raise ValueError(
          f"--drafter={FLAGS.drafter!r}: without --target, name a drafter of the demo "
          f"zoo, one of {list(names)}, or pass --target and --drafter checkpoints."
      )
  validation.writable_file(FLAGS.output, "--output")
  return gammas


def _prompt_ids(target, drafter, prompt: str) -> np.ndarray:
  """[1, L] ids of `prompt`; random ids within both vocabularies when the target has none."""
  if target.tokenizer is not None:
    return np.asarray([target.tokenizer(prompt)["input_ids"]])
  if FLAGS.prompt:
    experiment.exit_with_usage_error(
        f"--prompt needs a tokenizer, and --target={FLAGS.target} has none (no tokenizer files); "
        "drop --prompt to time random prompt ids, or pass a checkpoint with tokenizer files."
    )
  logging.warning("%s has no tokenizer: timing random prompt ids", FLAGS.target)
  vocab = min(target.vocab_size, drafter.vocab_size)  # every id must exist in both models
  return np.asarray(random_models.random_prompt_ids(np.random.default_rng(0), vocab, 1, 16))


def _models():
  """(target, drafter, prompt text) from the flags, or from the demo zoo when --target is empty."""
  if FLAGS.target:
    target = js.load_model(FLAGS.target)
    drafter = js.load_model(FLAGS.drafter) if FLAGS.drafter else target
    return target, drafter, FLAGS.prompt or "Hello"
  from jax_specsel.data import world as world_lib, zoo as zoo_lib

  world, zoo = common.demo_zoo(FLAGS.zoo, FLAGS.cache_dir)
  drafter = zoo.drafters[FLAGS.drafter or zoo_lib.drafter_name(world_lib.TRANSLATE)]
  return zoo.target, drafter, FLAGS.prompt or world.split("test", world_lib.TRANSLATE)[0]["prompt"]


def _always(option: str, width: int) -> Policy:
  """A paper-sized policy (3 layers of 512) over one option: it always picks `option`."""
  return Policy(PolicyNetwork(width, 1, rngs=nnx.Rngs(0)), option_names=[option])


def _call_seconds(calls: dict, count: int) -> dict:
  """Median wall seconds of each 1-token call, the calls interleaved so load hits all alike."""
  for call in calls.values():
    call()  # compile
  times = {name: [] for name in calls}
  for _ in range(count):
    for name, call in calls.items():
      started = time.perf_counter()
      call()
      times[name].append(time.perf_counter() - started)
  return {name: statistics.median(t) for name, t in times.items()}


def per_call_costs(
    target, drafter, ids, step: float, round_seconds: float, gamma: int
) -> list[dict]:
  """Wall time of 1-token calls against the work they do, in target steps."""
  prepare_target = speed.time_prepare(target, ids)
  prepare_drafter = speed.time_prepare(drafter, ids)
  policies = {
      "autoregressive": _always("autoregressive", target.hidden_size),
      "speculative": _always("drafter", target.hidden_size),
  }
  drafters = {"autoregressive": None, "speculative": drafter}
  calls = {}
  for option in ("autoregressive", "speculative"):
    calls[("generate", option)] = lambda d=drafters[option]: js.generate(
        target, ids, drafter=d, gamma=gamma, max_new_tokens=1
    )
    calls[("generate_selected", option)] = lambda p=policies[option]: js.generate_selected(
        target, ids, {"drafter": drafter}, p, gamma=gamma, max_new_tokens=1
    )
  walls = _call_seconds(calls, FLAGS.calls)
  work = {
      "autoregressive": prepare_target + step,
      "speculative": prepare_target + prepare_drafter + round_seconds,
  }
  rows = []
  for (entry, option), wall in walls.items():
    rows.append(
        {
            "call": entry,
            "option": option,
            "wall_us": 1e6 * wall,
            "wall_steps": wall / step,
            "work_steps": work[option] / step,
            "fixed_steps": (wall - work[option]) / step,
        }
    )
  rows.append(
      {
          "prepare_target_steps": prepare_target / step,
          "prepare_drafter_steps": prepare_drafter / step,
      }
  )
  return rows


def main(argv):
  del argv
  gammas = common.checked(check_flags)  # one line, before the zoo and the timings
  target, drafter, prompt = _models()
  ids = _prompt_ids(target, drafter, prompt)
  step = speed.time_rounds(target, ids, rounds=FLAGS.rounds)
  drafter_step = speed.time_rounds(drafter, ids, rounds=FLAGS.rounds)
  rows = [{"gamma": 0, "round_us": 1e6 * step, "target_steps": 1.0}]
  for gamma in gammas:
    seconds = speed.time_rounds(target, ids, drafter, gamma, rounds=FLAGS.rounds)
    rows.append({"gamma": gamma, "round_us": 1e6 * seconds, "target_steps": seconds / step})
  round_us = {row["gamma"]: row["round_us"] for row in rows}
  round_seconds = (
      round_us[FLAGS.gamma] / 1e6
      if FLAGS.gamma in round_us
      else speed.time_rounds(target, ids, drafter, FLAGS.gamma, rounds=FLAGS.rounds)
  )
  calls = per_call_costs(target, drafter, ids, step, round_seconds, FLAGS.gamma)
  print(
      f"target {target.name} ({target.num_params / 1e6:.2f}M), drafter {drafter.name} "
      f"({drafter.num_params / 1e6:.2f}M), prompt of {ids.shape[1]} tokens; target step "
      f"{1e6 * step:.1f} us, drafter step {1e6 * drafter_step:.1f} us (ratio "
      f"{step / drafter_step:.1f})"
  )
  print("\n| gamma | round (us) | in target steps = break-even tokens per round |\n|---|---|---|")
  for row in rows:
    print(f"| {row['gamma']} | {row['round_us']:.1f} | {row['target_steps']:.2f} |")
  print(
      f"\nfirst passes: target {calls[-1]['prepare_target_steps']:.2f} steps, drafter "
      f"{calls[-1]['prepare_drafter_steps']:.2f} steps"
  )
  print(
      f"\n| 1-token call (gamma {FLAGS.gamma}) | wall (us) | wall (steps) | work (steps) | "
      "fixed cost (steps) |\n|---|---|---|---|---|"
  )
  for row in calls[:-1]:
    print(
        f"| {row['call']} {row['option']} | {row['wall_us']:.0f} | {row['wall_steps']:.2f} | "
        f"{row['work_steps']:.2f} | {row['fixed_steps']:.2f} |"
    )
  with open(FLAGS.output, "w") as handle:
    json.dump(
        {
            "target": target.name,
            "drafter": drafter.name,
            "prompt_tokens": int(ids.shape[1]),
            "target_step_us": 1e6 * step,
            "drafter_step_us": 1e6 * drafter_step,
            "rounds": rows,
            "per_call": calls,
        },
        handle,
        indent=1,
    )
  logging.info("wrote %s", FLAGS.output)


if __name__ == "__main__":
  common.run(main)
