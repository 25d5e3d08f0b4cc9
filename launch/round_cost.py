"""Cost of one speculative round inside the compiled loop, by gamma, against one target step.

  python launch/round_cost.py                                # the demo zoo (built if not cached)
  python launch/round_cost.py --target=DIR --drafter=DIR --prompt="translate English to German: ..."

Times `jax_specsel.decoding.loop.repeat_rounds` (rounds back to back in one program: no dispatch,
warm weights) for gamma = 0 (autoregressive) and each --gammas value, and prints per gamma the
round's cost in target steps and the break-even tokens per round (a drafter must be accepted
often enough to emit that many tokens per round just to match autoregressive decoding), and the
per-call cost a whole generate() call adds (a 1-token call), which a short output does not
amortize. Writes the table as JSON to --output.
"""

from __future__ import annotations

import json
import os
import time

from absl import app, flags, logging

import numpy as np

import jax_specsel as js
from jax_specsel import validation
from jax_specsel.eval import speed

FLAGS = flags.FLAGS
flags.DEFINE_string("target", "", "Target checkpoint (directory or hub id); empty: the demo zoo.")
flags.DEFINE_string("drafter", "", "Drafter checkpoint; with the demo zoo: a drafter name.")
flags.DEFINE_string("prompt", "", "Prompt text (default: the first test prompt of the world).")
flags.DEFINE_list("gammas", ["1", "2", "4", "5", "8"], "Draft tokens per round to time.")
flags.DEFINE_integer("rounds", 200, "Rounds per timed program.")
flags.DEFINE_string("cache_dir", "", "Zoo cache root (demo zoo only).")
flags.DEFINE_string("output", "reports/round_cost.json", "Where the JSON table goes.")


def _models():
  if FLAGS.target:
    target = js.load_model(FLAGS.target)
    drafter = js.load_model(FLAGS.drafter) if FLAGS.drafter else target
    return target, drafter, FLAGS.prompt or "Hello"
  from jax_specsel.data import world as world_lib, zoo as zoo_lib
  world = world_lib.World()
  zoo = zoo_lib.build_zoo(world, zoo_lib.ZooConfig(), cache_dir=FLAGS.cache_dir or None)
  drafter = zoo.drafters[FLAGS.drafter or zoo_lib.drafter_name(world_lib.TRANSLATE)]
  return zoo.target, drafter, FLAGS.prompt or world.split("test", world_lib.TRANSLATE)[0]["prompt"]


def _call_ms(target, ids, drafter, repeats: int = 30) -> dict:
  """Median wall ms of a whole 1-token generate() call and of its timed part (stats.seconds)."""
  js.generate(target, ids, drafter=drafter, gamma=5, max_new_tokens=1)  # compile
  wall, timed = [], []
  for _ in range(repeats):
    started = time.perf_counter()
    out = js.generate(target, ids, drafter=drafter, gamma=5, max_new_tokens=1)
    wall.append(time.perf_counter() - started)
    timed.append(out.stats.seconds)
  return {"wall_ms": 1e3 * float(np.median(wall)), "timed_ms": 1e3 * float(np.median(timed))}


def main(argv):
  del argv
  try:  # before the zoo and the timings: an unwritable --output must not cost a run
    validation.writable_file(FLAGS.output, "--output")
  except ValueError as err:
    raise app.UsageError(str(err)) from None
  target, drafter, prompt = _models()
  ids = np.asarray([target.tokenizer(prompt)["input_ids"]])
  step = speed.time_rounds(target, ids, rounds=FLAGS.rounds)
  rows = [{"gamma": 0, "round_us": 1e6 * step, "target_steps": 1.0}]
  for gamma in map(int, FLAGS.gammas):
    seconds = speed.time_rounds(target, ids, drafter, gamma, rounds=FLAGS.rounds)
    rows.append({"gamma": gamma, "round_us": 1e6 * seconds, "target_steps": seconds / step})
  calls = {"autoregressive": _call_ms(target, ids, None), "speculative": _call_ms(target, ids, drafter)}
  print(f"target {target.name}, drafter {drafter.name}, prompt of {ids.shape[1]} tokens")
  print("per-call cost (a 1-token generate: prompt encoding, dispatch, one round), median ms: "
        + ", ".join(f"{k} {v['wall_ms']:.2f} wall / {v['timed_ms']:.2f} timed" for k, v in calls.items()))
  print("| gamma | round (us) | in target steps = break-even tokens per round |")
  print("|---|---|---|")
  for row in rows:
    print(f"| {row['gamma']} | {row['round_us']:.1f} | {row['target_steps']:.2f} |")
  os.makedirs(os.path.dirname(os.path.abspath(FLAGS.output)), exist_ok=True)
  with open(FLAGS.output, "w") as handle:
    json.dump({"target": target.name, "drafter": drafter.name, "rows": rows, "per_call": calls},
              handle, indent=1)
  logging.info("wrote %s", FLAGS.output)


if __name__ == "__main__":
  app.run(main)
