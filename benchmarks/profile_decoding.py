"""Profiles a speculative-decoding run: a jax.profiler trace, an optional HLO dump, compile and
run time.

  python benchmarks/profile_decoding.py --trace_dir=/tmp/trace              # random LLaMA pair
  python benchmarks/profile_decoding.py --target=/ckpt/llama --drafter=/ckpt/llama-68m \
      --xla_dump_to=/tmp/hlo
  tensorboard --logdir=/tmp/trace   (or open the .trace.json.gz / .xplane.pb in ui.perfetto.dev)

--xla_dump_to must act before jax initializes, so this file reads it from sys.argv first.
"""

import os
import sys
import tempfile

for _arg in sys.argv:  # XLA reads XLA_FLAGS once, at backend initialization
  if _arg.startswith("--xla_dump_to="):
    _dump = f" --xla_dump_to={_arg.split('=', 1)[1]} --xla_dump_hlo_as_text"
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + _dump).strip()

import common  # noqa: E402 (the hubs' offline defaults come before any Hugging Face import)

# isort: split

import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import flags  # noqa: E402

import jax_specsel as js  # noqa: E402
from jax_specsel import experiment, validation  # noqa: E402
from jax_specsel.eval import random_models  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("target", None, "Target checkpoint (default: a random LLaMA of ~40M params).")
flags.DEFINE_string(
    "drafter", None, "Drafter checkpoint, 'self', or 'early_exit:K' (default: random)."
)
flags.DEFINE_string("family", "llama", "Random pair family when --target is unset: t5 or llama.")
flags.DEFINE_string("trace_dir", "reports/profile", "Where the jax.profiler trace goes.")
flags.DEFINE_string("xla_dump_to", None, "Dump the HLO of every compiled program here.")
flags.DEFINE_integer("gamma", 7, "Draft tokens per round.")
flags.DEFINE_integer("max_new_tokens", 64, "Tokens per prompt.")
flags.DEFINE_integer("steps", 5, "Profiled generate calls per option.")


def _models(scratch):
  """(target, drafter) from the flags, or a random pair built under `scratch`."""
  if FLAGS.target:
    target = js.load_model(FLAGS.target)
    source = FLAGS.drafter or "self"
  else:
    target_dir, drafter_dir = random_models.random_pair(FLAGS.family, scratch)
    target, source = js.load_model(target_dir), FLAGS.drafter or drafter_dir
  if source == "self":
    return target, target
  if source.startswith("early_exit:"):
    return target, target.early_exit(layers=int(source.split(":")[1]))
  return target, js.load_model(source)


def check_flags() -> None:
  """Validates the flags and output paths before any model is built, compiled or profiled."""
  experiment.integer_flags("gamma", "max_new_tokens", "steps")
  if not FLAGS.target and FLAGS.family not in random_models.RANDOM_PAIRS:
    raise ValueError(
        f"--family={FLAGS.family!r}: choose from " f"{sorted(random_models.RANDOM_PAIRS)}."
    )
  if FLAGS.drafter and FLAGS.drafter.startswith("early_exit:"):
    validation.integer("--drafter early_exit layers", int(FLAGS.drafter.split(":")[1]), minimum=1)
  validation.writable_directory(FLAGS.trace_dir, "--trace_dir")
  if FLAGS.xla_dump_to:
    validation.writable_directory(FLAGS.xla_dump_to, "--xla_dump_to")


def main(argv):
  del argv
  common.checked(check_flags)  # a bad flag: one line, no traceback
  with tempfile.TemporaryDirectory() as scratch:
    target, drafter = _models(scratch)
    vocab = min(target.vocab_size, drafter.vocab_size)  # every prompt id must exist in both
    prompt = random_models.random_prompt_ids(np.random.default_rng(0), vocab, 1, 24)
    rows = []
    for name, option in (("autoregressive", None), ("speculative", drafter)):
      first = js.generate(
          target, prompt, drafter=option, gamma=FLAGS.gamma, max_new_tokens=FLAGS.max_new_tokens
      )
      run_seconds = []
      with jax.profiler.trace(FLAGS.trace_dir):
        for step in range(FLAGS.steps):
          with jax.profiler.StepTraceAnnotation(name, step_num=step):
            out = js.generate(
                target,
                prompt,
                drafter=option,
                gamma=FLAGS.gamma,
                max_new_tokens=FLAGS.max_new_tokens,
                seed=step,
            )
          run_seconds.append(out.stats.seconds)
      rows.append(
          (name, first.stats.compile_seconds, float(np.median(run_seconds)), out.stats.ms_per_token)
      )
  print("| compiled function | compile s | run s (median) | ms/token |\n|---|---|---|---|")
  for name, compile_s, run_s, ms in rows:
    print(f"| generate[{name}] | {compile_s:.2f} | {run_s:.4f} | {ms:.3f} |")
  dump = f", HLO in {FLAGS.xla_dump_to}" if FLAGS.xla_dump_to else ""
  print(f"trace in {FLAGS.trace_dir}{dump}")


if __name__ == "__main__":
  common.run(main)
