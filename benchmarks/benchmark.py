"""Speed benchmark: our loop vs the models' step times, Leviathan's ideal and transformers.

  python benchmarks/benchmark.py                    # random T5 and LLaMA pairs (tens of M params)
  python benchmarks/benchmark.py --families=llama --gamma=5 --max_new_tokens=32
  python benchmarks/benchmark.py --target=/ckpt/flan-t5-xl \
      --drafters=/ckpt/t5-small,/ckpt/t5-small-xsum

Per option (autoregressive, each drafter): ms/token (median and spread over repeats, compilation
excluded), acceptance rate (paper A.6), tau (tokens per round incl. the bonus), t_draft, t_verify,
t_ar, loop efficiency = ((gamma t_draft + t_verify) / tau) / measured, Leviathan's analytic
speedup next to the measured one, and transformers' plain / assisted generate on the same weights.
Writes benchmark.json and benchmark.md into --output_dir.
"""

from __future__ import annotations

import functools
import json
import os
import tempfile

import common  # first: the hubs' offline defaults come before any Hugging Face import

# isort: split

import jax
import numpy as np
from absl import flags, logging

import jax_specsel as js
from jax_specsel import experiment, validation
from jax_specsel.eval import random_models, speed
from jax_specsel.models import checkpoint

FLAGS = flags.FLAGS
flags.DEFINE_list(
    "families", ["t5", "llama"], "Random model pairs to build when --target is unset."
)
flags.DEFINE_string("target", None, "A checkpoint directory / hub id (instead of random pairs).")
flags.DEFINE_list("drafters", [], "Drafter checkpoints for --target; 'self' = the target itself.")
flags.DEFINE_integer("gamma", 7, "Draft tokens per round.")
flags.DEFINE_integer("max_new_tokens", 64, "Tokens generated per prompt.")
flags.DEFINE_integer("num_prompts", 4, "Prompts per pass (batch 1 each).")
flags.DEFINE_integer("prompt_length", 24, "Tokens per random prompt.")
flags.DEFINE_integer("repeats", 3, "Timed passes over the prompts (after one warm-up pass).")
flags.DEFINE_bool("hf", True, "Also time transformers generate / assisted generate (needs torch).")
flags.DEFINE_string("output_dir", "reports/benchmark", "Where benchmark.json and .md go.")
flags.DEFINE_integer(
    "torch_threads", 0, "torch.set_num_threads for the transformers side (0: default)."
)


def benchmark_pair(target_dir: str, drafter_dirs: list[str], prompts: list[list[int]]) -> dict:
  """One target and its drafters timed: the table row of every option."""
  target = js.load_model(target_dir)
  drafters = {
      ("self" if d == "self" else os.path.basename(d.rstrip("/"))): (
          target if d == "self" else js.load_model(d)
      )
      for d in drafter_dirs
  }
  gamma, max_new = FLAGS.gamma, FLAGS.max_new_tokens
  prompt = np.asarray(prompts[:1])
  position = len(prompts[0]) + max_new // 2
  t_ar = speed.time_decode_step(target, prompt, 1, position)
  t_verify = speed.time_decode_step(target, prompt, gamma + 1, position)
  rows = {
      "autoregressive": speed.measure_generation(
          target, prompts, None, gamma, max_new, FLAGS.repeats
      )
  }
  rows["autoregressive"].update(t_ar_ms=1e3 * t_ar)
  for name, drafter in drafters.items():
    t_draft = speed.time_decode_step(drafter, prompt, 1, position)
    row = speed.measure_generation(target, prompts, drafter, gamma, max_new, FLAGS.repeats)
    tau = row["tokens_per_round"]
    ideal_ms = 1e3 * (gamma * t_draft + t_verify) / tau
    accept = speed.solve_acceptance(tau, gamma)
    row.update(
        t_draft_ms=1e3 * t_draft,
        t_verify_ms=1e3 * t_verify,
        t_ar_ms=1e3 * t_ar,
        ideal_ms_per_token=ideal_ms,
        loop_efficiency=ideal_ms / row["ms_per_token"],
        speedup=rows["autoregressive"]["ms_per_token"] / row["ms_per_token"],
        leviathan_speedup=speed.leviathan_speedup(accept, gamma, t_draft / t_ar),
    )
    rows[name] = row
  if FLAGS.hf:
    _add_hf(rows, target_dir, drafter_dirs, prompts)
  return {
      "target": target.name,
      "target_params": target.num_params,
      "gamma": gamma,
      "max_new_tokens": max_new,
      "options": rows,
  }


def _add_hf(rows, target_dir, drafter_dirs, prompts):
  """Adds transformers' plain and assisted generate on the same weights to `rows`."""
  from jax_specsel.eval import hf_baseline

  if FLAGS.torch_threads:
    import torch

    torch.set_num_threads(FLAGS.torch_threads)
  target = hf_baseline.load_torch_model(target_dir)
  plain = hf_baseline.measure_hf_generation(
      target, prompts, None, FLAGS.gamma, FLAGS.max_new_tokens, FLAGS.repeats
  )
  ours = rows["autoregressive"]["ms_per_token"]
  rows["autoregressive"].update(
      hf_ms_per_token=plain["ms_per_token"], ratio_to_hf=ours / plain["ms_per_token"]
  )
  for d in drafter_dirs:
    name = "self" if d == "self" else os.path.basename(d.rstrip("/"))
    drafter = target if d == "self" else hf_baseline.load_torch_model(d)
    assisted = hf_baseline.measure_hf_generation(
        target, prompts, drafter, FLAGS.gamma, FLAGS.max_new_tokens, FLAGS.repeats
    )
    rows[name].update(
        hf_ms_per_token=assisted["ms_per_token"],
        ratio_to_hf=rows[name]["ms_per_token"] / assisted["ms_per_token"],
    )


def _cell(row: dict, key: str, fmt: str = "{:.3f}") -> str:
  """`row[key]` formatted, or "-" where the row lacks it."""
  return fmt.format(row[key]) if key in row else "-"


def markdown(result: dict) -> str:
  """One pair's results as a markdown table under a heading naming the target and the device."""
  head = (
      f"### {result['target']} ({result['target_params'] / 1e6:.1f}M params), "
      f"gamma={result['gamma']}, {result['max_new_tokens']} new tokens, "
      f"{jax.devices()[0].device_kind}\n\n"
      "| option | ms/token | speedup | accept | tau | t_draft ms | t_verify ms | t_ar ms "
      "| loop eff. | Leviathan | HF ms/token | ours/HF |\n|---" + "|---" * 11 + "|\n"
  )
  lines = []
  for name, r in result["options"].items():
    cell = functools.partial(_cell, r)
    lines.append(
        f"| {name} | {r['ms_per_token']:.3f} ± {r['ms_per_token_spread']:.3f} | "
        f"{cell('speedup', '{:.2f}x')} | {cell('acceptance_rate', '{:.2f}')} | "
        f"{r['tokens_per_round']:.2f} | {cell('t_draft_ms')} | {cell('t_verify_ms')} | "
        f"{cell('t_ar_ms')} | {cell('loop_efficiency', '{:.2f}')} | "
        f"{cell('leviathan_speedup', '{:.2f}x')} | {cell('hf_ms_per_token')} | "
        f"{cell('ratio_to_hf', '{:.2f}')} |"
    )
  return head + "\n".join(lines) + "\n"


def check_flags() -> str:
  """Validates the flags before any model is built or timed; returns the output directory."""
  experiment.integer_flags("gamma", "max_new_tokens", "num_prompts", "prompt_length", "repeats")
  experiment.integer_flags("torch_threads", minimum=0)
  if not FLAGS.target:
    common.choices_flag("families", random_models.RANDOM_PAIRS)
  return validation.writable_directory(FLAGS.output_dir, "--output_dir")


def smallest_vocabulary(directories: list[str]) -> int:
  """The smallest config.json vocab_size of the checkpoints ('self' skipped), before loading."""
  sizes = [checkpoint.read_hf_config(d).get("vocab_size") for d in directories if d != "self"]
  return min([int(v) for v in sizes if v] or [1000])


def main(argv):
  del argv
  common.checked(check_flags)  # a bad flag: one line, no traceback
  rng = np.random.default_rng(0)
  results = []
  with tempfile.TemporaryDirectory() as scratch:
    if FLAGS.target:
      pairs = [(FLAGS.target, FLAGS.drafters or ["self"])]
    else:
      pairs = []
      for family in FLAGS.families:
        target_dir, drafter_dir = random_models.random_pair(family, scratch)
        pairs.append((target_dir, [drafter_dir, "self"]))
    for target_dir, drafter_dirs in pairs:
      vocab = smallest_vocabulary([target_dir] + drafter_dirs)  # every prompt id must exist
      prompts = random_models.random_prompt_ids(rng, vocab, FLAGS.num_prompts, FLAGS.prompt_length)
      logging.info("benchmarking %s with %s", target_dir, drafter_dirs)
      results.append(benchmark_pair(target_dir, drafter_dirs, prompts))
      print(markdown(results[-1]), flush=True)
  os.makedirs(FLAGS.output_dir, exist_ok=True)
  with open(os.path.join(FLAGS.output_dir, "benchmark.json"), "w") as f:
    json.dump(
        {"jax": jax.__version__, "device": jax.devices()[0].device_kind, "results": results},
        f,
        indent=2,
    )
  with open(os.path.join(FLAGS.output_dir, "benchmark.md"), "w") as f:
    f.write("\n".join(markdown(r) for r in results))
  print(f"wrote {FLAGS.output_dir}/benchmark.json and benchmark.md")


if __name__ == "__main__":
  common.run(main)
