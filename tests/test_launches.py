"""The absl launches refuse bad flags, configs, paths and data with one clear message, before work.

Each launch runs in a subprocess (they define absl flags at import and exit through absl), with a
target that does not exist wherever a check could wrongly come after model loading: the test then
sees the missing checkpoint instead of the message it expects.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import datasets
import pytest

from jax_specsel.bandit import collect as collect_lib
from fake_models import fake_model_with_tokenizer

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
PAPER_CONFIG = "configs/paper_t5_table1.py"
QUERIES = 12
CONFIG = collect_lib.CollectConfig(max_new_tokens=4, batch_size=4, shard_size=5)


def _launch(script: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
  env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
             PYTHONPATH=os.pathsep.join([ROOT, HERE, os.environ.get("PYTHONPATH", "")]))
  env.pop("XLA_FLAGS", None)
  return subprocess.run([sys.executable, os.path.join(ROOT, "launch", script), *args], cwd=ROOT,
                        env=env, capture_output=True, text=True, timeout=timeout)


def _fails_with(completed: subprocess.CompletedProcess, message: str) -> None:
  """Exit status 1 and the message on ONE line: no traceback, no usage text, no flag help."""
  output = completed.stdout + completed.stderr
  assert completed.returncode == 1, output[-3000:]
  fatal = [line for line in output.splitlines() if line.startswith("FATAL")]
  assert len(fatal) == 1 and message in fatal[0], output[-3000:]
  assert "Traceback" not in output and "--helpshort or --helpfull" not in output, output[-3000:]
  assert "\nflags:\n" not in output, output[-3000:]


def _examples(n: int = QUERIES) -> datasets.Dataset:
  return datasets.Dataset.from_list([{"id": f"q{i}", "task": "xsum", "prompt": f"w{3 + i % 8} w4",
                                      "reference": "w3"} for i in range(n)])


def _collection(output_dir, finished: bool = True) -> None:
  """A collection of fake models under output_dir/collection (shards 1 and 2 of 3 missing
  when not finished)."""
  target = fake_model_with_tokenizer(0, name="target")
  drafters = {"same": fake_model_with_tokenizer(0, name="same"),
              "other": fake_model_with_tokenizer(5, name="other")}
  directory = os.path.join(output_dir, "collection")
  collect_lib.collect(target, drafters, _examples(), directory, CONFIG, progress=False)
  if not finished:
    for shard in (1, 2):
      os.remove(os.path.join(directory, f"shard-{shard:05d}.parquet"))


def _config_file(tmp_path, **fields) -> str:
  """A paper config naming the fake collection's models (target, drafters same and other)."""
  fields = {"target": str(tmp_path / "target"), "output_dir": str(tmp_path),
            "drafters": {"same": str(tmp_path / "same"), "other": str(tmp_path / "other")},
            **fields}
  path = tmp_path / "config.py"
  path.write_text("from configs import paper_t5_table1\n\n\ndef get_config():\n"
                  "  config = paper_t5_table1.get_config()\n"
                  + "".join(f"  config.{name} = {value!r}\n" for name, value in fields.items())
                  + "  return config\n")
  return str(path)


def test_missing_config_flag():
  _fails_with(_launch("train_policy.py"),
              "--config is required: pass an experiment config file, e.g. "
              "--config=configs/paper_t5_table1.py")


def test_a_config_file_that_does_not_exist_is_one_line():
  _fails_with(_launch("train_policy.py", "--config=/no/such/config.py"),
              "--config=/no/such/config.py: cannot load the config file ([Errno 2] No such file or "
              "directory: '/no/such/config.py'); pass an existing experiment config file, e.g. "
              "--config=configs/paper_t5_table1.py")


def test_a_flag_of_the_wrong_type_is_one_line():
  _fails_with(_launch("benchmark.py", "--gamma=abc"),
              "Flags parsing error: flag --gamma=abc: invalid literal for int() with base 10: 'abc'")


def test_the_paper_configs_fix_for_a_missing_dataset_is_a_config_field(tmp_path):
  from jax_specsel.data import loaders, tasks
  local = tasks.Task(name="local-only", template="{input}", source_field="prompt",
                     target_field="reference", metric="rouge_l")  # no hub source
  with pytest.raises(loaders.DatasetUnavailableError, match=r"or, in a launch, --config.data_dir=DIR "
                                                            r"with a file local-only.jsonl there"):
    loaders.load_examples(local, split="train")
  _fails_with(_launch("collect.py", f"--config={PAPER_CONFIG}", f"--config.data_dir={tmp_path}",
                      f"--config.output_dir={tmp_path / 'run'}"),
              f"config.data_dir={str(tmp_path)!r} has no file for task 'iwslt2017-en-de': add "
              "iwslt2017-en-de.jsonl (or .json/.csv/.parquet) there, or name it in "
              "config.data_files.")
  assert not (tmp_path / "run").exists()


def test_unknown_config_override():
  _fails_with(_launch("collect.py", f"--config={PAPER_CONFIG}", "--config.alpah=0.5"),
              "--config.alpah: the config has no field 'alpah'. Did you mean \"alpha\" instead of "
              "\"alpah\"? Fix the name, or add the field to the config file.")


@pytest.mark.parametrize("override,message", [
    ("--config.trainer=bogus", "config.trainer='bogus': choose one of ['default', 'paper']."),
    ("--config.alpha=nan", "config.alpha=nan: must be a finite number."),
    ("--config.gamma=0", "config.gamma=0: must be >= 1.")])
def test_bad_config_values_are_refused_before_work(override, message, tmp_path):
  output_dir = tmp_path / "run"
  _fails_with(_launch("train_policy.py", f"--config={PAPER_CONFIG}", override,
                      f"--config.output_dir={output_dir}"), message)
  assert not output_dir.exists()  # refused before anything was written


@pytest.mark.slow
def test_unfinished_collection_needs_the_explicit_flag(tmp_path):
  _collection(tmp_path, finished=False)
  args = [f"--config={_config_file(tmp_path)}"]
  _fails_with(_launch("train_policy.py", *args),
              "is an unfinished collection: 2 of 3 shards are missing (shard-00001.parquet, "
              "shard-00002.parquet). Rerun the collection")
  completed = _launch("train_policy.py", *args, "--allow_partial_collection")
  assert completed.returncode == 0, completed.stderr[-3000:]
  metadata = json.loads((tmp_path / "policy" / "metadata" / "metadata").read_text())
  assert metadata["training_info"]["collection"] == {
      "complete": False, "collected_queries": 5, "num_queries": QUERIES,
      "missing_shards": ["shard-00001.parquet", "shard-00002.parquet"]}


def test_evaluate_with_an_empty_test_split_fails_before_loading_models(tmp_path):
  _collection(tmp_path)
  data_file = tmp_path / "xsum.jsonl"  # the test file holds only the collected queries
  data_file.write_text("".join(json.dumps({"id": f"q{i}", "document": "d", "summary": "s"}) + "\n"
                               for i in range(QUERIES)))
  config_file = _config_file(tmp_path, tasks=("xsum",), data_files={"xsum": str(data_file)})
  _fails_with(_launch("evaluate.py", f"--config={config_file}"),
              f"the test split is empty: {QUERIES} test queries of tasks ['xsum'] (split 'test'), "
              f"{QUERIES} of them also in the collection; raise config.test_per_task")


@pytest.mark.parametrize("script", ["train_policy.py", "evaluate.py"])
def test_a_collection_of_other_models_than_the_config_is_refused(script, tmp_path):
  _collection(tmp_path)
  _fails_with(_launch(script, f"--config={PAPER_CONFIG}", f"--config.output_dir={tmp_path}"),
              f"{tmp_path / 'collection'} was collected with target 'target', not "
              "config.target='google/flan-t5-xxl' (named 'flan-t5-xxl') and drafters ['other', "
              "'same'], not config.drafters ['t5-small', 't5-small-xsum']: a policy trained on it "
              "would choose among other models than this config runs.")
  _fails_with(_launch(script, f"--config={_config_file(tmp_path, drafters={'same': 'x'})}"),
              "was collected with drafters ['other', 'same'], not config.drafters ['same']")
  assert not (tmp_path / "policy").exists()


def test_a_damaged_collection_is_refused_before_training(tmp_path):
  _collection(tmp_path)
  shard = tmp_path / "collection" / "shard-00002.parquet"
  shard.write_bytes(shard.read_bytes()[:100])
  _fails_with(_launch("train_policy.py", f"--config={_config_file(tmp_path)}"),
              f"{shard} cannot be read")
  assert not (tmp_path / "policy").exists()


def test_demo_config_error_comes_before_the_zoo(tmp_path):
  output_dir = tmp_path / "demo"
  _fails_with(_launch("demo.py", "--config.alpha=1.5", f"--config.output_dir={output_dir}",
                      f"--config.cache_dir={tmp_path / 'cache'}"),
              "config.alpha=1.5: must be in [0.0, 1.0].")
  assert not output_dir.exists() and not (tmp_path / "cache").exists()


@pytest.mark.parametrize("script,args,message", [
    ("benchmark.py", ["--output_dir=/proc/jax_specsel/out"],
     "--output_dir=/proc/jax_specsel/out: cannot write there"),
    ("benchmark.py", ["--gamma=0"], "--gamma=0: must be >= 1."),
    ("benchmark.py", ["--families=gpt2"], "--families=gpt2: choose from ['llama', 't5']."),
    ("profile_decoding.py", ["--trace_dir=/proc/jax_specsel/trace"],
     "--trace_dir=/proc/jax_specsel/trace: cannot write there"),
    ("round_cost.py", ["--target=/no/such/target", "--output=/proc/jax_specsel/round_cost.json"],
     "--output=/proc/jax_specsel/round_cost.json: cannot write its directory"),
    ("adaptive_overhead.py", ["--output=/proc/jax_specsel/adaptive.json"],
     "--output=/proc/jax_specsel/adaptive.json: cannot write its directory"),
    ("adaptive_overhead.py", ["--policy=/no/such/policy", "--output=/tmp/adaptive_overhead.json"],
     "--policy=/no/such/policy is not a saved policy directory"),
    ("adaptive_overhead.py", ["--probe_every=-1"], "--probe_every=-1: must be >= 0."),
    ("selection_overhead.py", ["--repeats=0"], "--repeats=0: must be >= 1."),
    ("compare_backends.py", ["--backends=cpu,quantum"],
     "--backends=cpu,quantum: choose from ['cpu', 'gpu', 'tpu']."),
    ("step_latency.py", ["--families=gpt2"], "--families=gpt2: choose from ['llama', 't5']."),
    ("conditional_copies.py", ["--iterations=0"], "--iterations=0: must be >= 1."),
    ("experiment_estimators.py", ["--sizes=256,many"],
     "--sizes=256,many: 'many' is not an integer; give a comma-separated list of integers"),
    ("round_cost.py", ["--gammas=a,b"], "--gammas=a,b: 'a' is not an integer"),
    ("round_cost.py", ["--gammas=2,0"], "--gammas entry=0: must be >= 1."),
    ("round_cost.py", ["--drafter=drafter_nowhere"],
     "--drafter='drafter_nowhere': without --target, name a drafter of the demo zoo")])
def test_measurement_launches_check_flags_and_outputs_first(script, args, message, tmp_path):
  cache = tmp_path / "zoo"  # where round_cost would build the demo zoo: never reached
  extra = [f"--cache_dir={cache}"] if script == "round_cost.py" else []
  _fails_with(_launch(script, *args, *extra, timeout=120), message)
  assert not cache.exists()


def test_random_prompts_stay_inside_the_vocabulary():
  import numpy as np
  from jax_specsel.eval import random_models
  rng = np.random.default_rng(0)
  small = np.asarray(random_models.random_prompt_ids(rng, 12, 4, 24))
  assert small.shape == (4, 24) and small.min() >= 5 and small.max() < 12
  assert set(np.unique(random_models.random_prompt_ids(rng, 3, 2, 8))) == {2}  # a tiny vocabulary
  large = np.asarray(random_models.random_prompt_ids(rng, 32000, 4, 24))
  assert large.min() >= 5 and large.max() < 1000  # as before for real vocabularies
  with pytest.raises(ValueError, match="vocab_size=0"):
    random_models.random_prompt_ids(rng, 0, 1, 1)


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
  """A random LLaMA with a 96-token vocabulary: prompt ids up to 1000 would not exist in it."""
  import torch
  import transformers
  config = transformers.LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64,
                                    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                    max_position_embeddings=128, eos_token_id=95, bos_token_id=1,
                                    pad_token_id=0)
  torch.manual_seed(0)
  directory = tmp_path_factory.mktemp("tiny_llama")
  transformers.LlamaForCausalLM(config).save_pretrained(str(directory))
  return str(directory)


@pytest.mark.slow
def test_round_cost_times_a_target_without_tokenizer_on_random_prompt_ids(tiny_llama, tmp_path):
  output = tmp_path / "round_cost.json"
  args = [f"--target={tiny_llama}", "--gammas=1", "--gamma=1", "--rounds=2", "--calls=1"]
  _fails_with(_launch("round_cost.py", *args, "--prompt=hello", f"--output={output}"),
              f"--prompt needs a tokenizer, and --target={tiny_llama} has none")
  completed = _launch("round_cost.py", *args, f"--output={output}")
  assert completed.returncode == 0, completed.stderr[-3000:]
  result = json.loads(output.read_text())
  assert result["prompt_tokens"] == 16 and [row["gamma"] for row in result["rounds"]] == [0, 1]


@pytest.mark.slow
def test_benchmark_and_profile_draw_prompts_from_the_models_vocabulary(tiny_llama, tmp_path):
  bench = _launch("benchmark.py", f"--target={tiny_llama}", "--hf=false", "--num_prompts=1",
                  "--repeats=1", "--max_new_tokens=4", "--prompt_length=8",
                  f"--output_dir={tmp_path / 'bench'}")
  assert bench.returncode == 0, bench.stderr[-3000:]
  result = json.loads((tmp_path / "bench" / "benchmark.json").read_text())["results"][0]
  assert set(result["options"]) == {"autoregressive", "self"}
  profile = _launch("profile_decoding.py", f"--target={tiny_llama}", "--steps=1", "--max_new_tokens=4",
                    f"--trace_dir={tmp_path / 'trace'}")
  assert profile.returncode == 0, profile.stderr[-3000:]
  assert "| generate[speculative] |" in profile.stdout
