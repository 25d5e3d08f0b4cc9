"""The diagnostics in benchmarks/ refuse bad flags and paths with one clear line before any work,
take the demo's settings from configs/demo.py, and run on models without a tokenizer."""

from __future__ import annotations

import importlib
import json
import os
import subprocess

import pytest

import script_runs


def _benchmark(script: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
  return script_runs.run_script(os.path.join("benchmarks", script), *args, timeout=timeout)


def test_a_flag_of_the_wrong_type_is_one_line():
  script_runs.fails_with(
      _benchmark("benchmark.py", "--gamma=abc"),
      "Flags parsing error: flag --gamma=abc: invalid literal for int() with base 10: 'abc'",
  )


def _first_case_of_each_script_by_default(cases):
  """Each script's first case runs in the default set, its other cases with the slow set: every
  case is a subprocess that imports the package."""
  seen, params = set(), []
  for script, args, message in cases:
    marks = [pytest.mark.slow] if script in seen else []
    seen.add(script)
    params.append(pytest.param(script, args, message, marks=marks))
  return params


_DIAGNOSTICS = [
    (
        "benchmark.py",
        ["--output_dir=/proc/jax_specsel/out"],
        "--output_dir=/proc/jax_specsel/out: cannot write there",
    ),
    ("benchmark.py", ["--gamma=0"], "--gamma=0: must be >= 1."),
    ("benchmark.py", ["--families=gpt2"], "--families=gpt2: choose from ['llama', 't5']."),
    (
        "profile_decoding.py",
        ["--trace_dir=/proc/jax_specsel/trace"],
        "--trace_dir=/proc/jax_specsel/trace: cannot write there",
    ),
    (
        "round_cost.py",
        ["--target=/no/such/target", "--output=/proc/jax_specsel/round_cost.json"],
        "--output=/proc/jax_specsel/round_cost.json: cannot write its directory",
    ),
    (
        "adaptive_overhead.py",
        ["--output=/proc/jax_specsel/adaptive.json"],
        "--output=/proc/jax_specsel/adaptive.json: cannot write its directory",
    ),
    (
        "adaptive_overhead.py",
        ["--policy=/no/such/policy", "--output=/tmp/adaptive_overhead.json"],
        "--policy=/no/such/policy is not a saved policy directory",
    ),
    ("adaptive_overhead.py", ["--probe_every=-1"], "--probe_every=-1: must be >= 0."),
    (
        "adaptive_overhead.py",
        ["--rule=probe_below=2"],
        "RuleSettings.probe_below=2.0 is out of range",
    ),
    ("adaptive_overhead.py", ["--domains=poetry"], "--domains=poetry: choose from"),
    ("selection_overhead.py", ["--repeats=0"], "--repeats=0: must be >= 1."),
    (
        "rule_work.py",
        ["--rule=probe_sooner=1"],
        "--rule=probe_sooner=1: write field=value with a field of",
    ),
    ("rule_work.py", ["--costs=/no/such.json"], "--costs=/no/such.json is not a file"),
    (
        "compare_backends.py",
        ["--backends=cpu,quantum"],
        "--backends=cpu,quantum: choose from ['cpu', 'gpu', 'tpu'].",
    ),
    ("step_latency.py", ["--families=gpt2"], "--families=gpt2: choose from ['llama', 't5']."),
    ("conditional_copies.py", ["--iterations=0"], "--iterations=0: must be >= 1."),
    (
        "experiment_estimators.py",
        ["--sizes=256,many"],
        "--sizes=256,many: 'many' is not an integer; give a comma-separated list of integers",
    ),
    ("round_cost.py", ["--gammas=a,b"], "--gammas=a,b: 'a' is not an integer"),
    ("round_cost.py", ["--gammas=2,0"], "--gammas entry=0: must be >= 1."),
    (
        "round_cost.py",
        ["--drafter=drafter_nowhere"],
        "--drafter='drafter_nowhere': without --target, name a drafter of the demo zoo",
    ),
]


@pytest.mark.parametrize("script,args,message", _first_case_of_each_script_by_default(_DIAGNOSTICS))
def test_diagnostics_check_flags_and_outputs_first(script, args, message, tmp_path):
  cache = tmp_path / "zoo"  # where round_cost would build the demo zoo: never reached
  extra = [f"--cache_dir={cache}"] if script == "round_cost.py" else []
  script_runs.fails_with(_benchmark(script, *args, *extra, timeout=120), message)
  assert not cache.exists()


def test_the_demo_settings_come_from_its_config():
  demo = importlib.import_module("configs.demo").get_config()
  completed = _benchmark("adaptive_overhead.py", "--helpshort", timeout=120)
  help_text = " ".join(completed.stdout.split())
  for flag, value in (
      ("gamma", demo.gamma),
      ("max_gamma", demo.adaptive.max_gamma),
      ("probe_every", demo.adaptive.probe_every),
      ("track_threshold", demo.adaptive.track_threshold),
      ("max_new_tokens", demo.max_new_tokens),
      ("zoo", demo.zoo),
      ("policy", f"{demo.output_dir}/policy"),
  ):
    assert f"--{flag}: " in help_text, help_text
    option = help_text.split(f"--{flag}: ", 1)[1]
    assert f"(default: '{value}')" in option.split("--", 1)[0], (flag, option[:200])


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
  """A random LLaMA with a 96-token vocabulary: prompt ids up to 1000 would not exist in it."""
  import torch
  import transformers

  config = transformers.LlamaConfig(
      vocab_size=96,
      hidden_size=32,
      intermediate_size=64,
      num_hidden_layers=2,
      num_attention_heads=4,
      num_key_value_heads=2,
      max_position_embeddings=128,
      eos_token_id=95,
      bos_token_id=1,
      pad_token_id=0,
  )
  torch.manual_seed(0)
  directory = tmp_path_factory.mktemp("tiny_llama")
  transformers.LlamaForCausalLM(config).save_pretrained(str(directory))
  return str(directory)


@pytest.mark.slow
def test_round_cost_times_a_target_without_tokenizer_on_random_prompt_ids(tiny_llama, tmp_path):
  output = tmp_path / "round_cost.json"
  args = [f"--target={tiny_llama}", "--gammas=1", "--gamma=1", "--rounds=2", "--calls=1"]
  script_runs.fails_with(
      _benchmark("round_cost.py", *args, "--prompt=hello", f"--output={output}"),
      f"--prompt needs a tokenizer, and --target={tiny_llama} has none",
  )
  completed = _benchmark("round_cost.py", *args, f"--output={output}")
  assert completed.returncode == 0, completed.stderr[-3000:]
  result = json.loads(output.read_text())
  assert result["prompt_tokens"] == 16 and [row["gamma"] for row in result["rounds"]] == [0, 1]


@pytest.mark.slow
def test_benchmark_and_profile_draw_prompts_from_the_models_vocabulary(tiny_llama, tmp_path):
  bench = _benchmark(
      "benchmark.py",
      f"--target={tiny_llama}",
      "--hf=false",
      "--num_prompts=1",
      "--repeats=1",
      "--max_new_tokens=4",
      "--prompt_length=8",
      f"--output_dir={tmp_path / 'bench'}",
  )
  assert bench.returncode == 0, bench.stderr[-3000:]
  result = json.loads((tmp_path / "bench" / "benchmark.json").read_text())["results"][0]
  assert set(result["options"]) == {"autoregressive", "self"}
  profile = _benchmark(
      "profile_decoding.py",
      f"--target={tiny_llama}",
      "--steps=1",
      "--max_new_tokens=4",
      f"--trace_dir={tmp_path / 'trace'}",
  )
  assert profile.returncode == 0, profile.stderr[-3000:]
  assert "| generate[speculative] |" in profile.stdout
