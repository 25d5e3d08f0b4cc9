"""Runs the benchmark on every backend present (or those named) and merges one table.

  python benchmarks/compare_backends.py                 # every backend jax finds: cpu, gpu, tpu
  python benchmarks/compare_backends.py --backends=cpu,gpu --families=llama

Each backend runs benchmarks/benchmark.py in its own process with JAX_PLATFORMS set (a process can
initialize only one accelerator platform cleanly); the merged table has ms/token, speedup, compile
time, device name and jax version per backend and option.
"""

import json
import os
import subprocess
import sys

import common  # first: the hubs' offline defaults come before any Hugging Face import

# isort: split

from absl import flags

from jax_specsel import experiment, validation
from jax_specsel.eval import random_models

FLAGS = flags.FLAGS
flags.DEFINE_list("backends", [], "Backends to compare (default: every one present).")
flags.DEFINE_list("families", ["t5", "llama"], "Random model pairs (see benchmark.py).")
flags.DEFINE_string("output_dir", "reports/backends", "Where per-backend runs and the merge go.")
flags.DEFINE_integer("max_new_tokens", 64, "Tokens per prompt.")
flags.DEFINE_integer("repeats", 3, "Timed passes.")


BACKENDS = ("cpu", "gpu", "tpu")


def present_backends() -> list[str]:
  """The backends of BACKENDS that jax finds on this machine."""
  import jax

  found = []
  for backend in BACKENDS:
    try:
      if jax.devices(backend):
        found.append(backend)
    except RuntimeError:
      pass
  return found


def run_backend(backend: str) -> dict:
  """benchmark.py in its own process on `backend`; returns its benchmark.json."""
  out_dir = os.path.join(FLAGS.output_dir, backend)
  platform = {"gpu": "cuda"}.get(backend, backend)
  env = dict(os.environ, JAX_PLATFORMS=platform)
  command = [
      sys.executable,
      os.path.join(os.path.dirname(__file__), "benchmark.py"),
      "--hf=false",
      f"--families={','.join(FLAGS.families)}",
      f"--output_dir={out_dir}",
      f"--max_new_tokens={FLAGS.max_new_tokens}",
      f"--repeats={FLAGS.repeats}",
  ]
  subprocess.run(command, env=env, check=True)
  with open(os.path.join(out_dir, "benchmark.json")) as f:
    return json.load(f)


def merged_table(runs: dict) -> str:
  """Every backend's rows in one markdown table."""
  lines = [
      "| backend | device | jax | target | option | ms/token | speedup | compile s |",
      "|---|---|---|---|---|---|---|---|",
  ]
  for backend, run in runs.items():
    for result in run["results"]:
      for option, row in result["options"].items():
        lines.append(
            f"| {backend} | {run['device']} | {run['jax']} | {result['target']} | "
            f"{option} | {row['ms_per_token']:.3f} | {row.get('speedup', 1.0):.2f}x | "
            f"{row.get('compile_seconds', float('nan')):.1f} |"
        )
  return "\n".join(lines) + "\n"


def check_flags() -> None:
  """Validates every flag and the output directory before any backend is started."""
  common.choices_flag("backends", BACKENDS, allow_empty=True)
  common.choices_flag("families", random_models.RANDOM_PAIRS)
  experiment.integer_flags("max_new_tokens", "repeats")
  validation.writable_directory(FLAGS.output_dir, "--output_dir")


def main(argv):
  del argv
  common.checked(check_flags)  # one line, before any benchmark runs
  backends = FLAGS.backends or present_backends()
  runs = {backend: run_backend(backend) for backend in backends}
  os.makedirs(FLAGS.output_dir, exist_ok=True)
  with open(os.path.join(FLAGS.output_dir, "backends.json"), "w") as f:
    json.dump(runs, f, indent=2)
  table = merged_table(runs)
  with open(os.path.join(FLAGS.output_dir, "backends.md"), "w") as f:
    f.write(table)
  print(table)


if __name__ == "__main__":
  common.run(main)
