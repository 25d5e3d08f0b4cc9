"""The absl launches refuse bad flags, configs, paths and data with one clear message, before work.

Each launch runs in a subprocess (they define absl flags at import and exit through absl), with a
target that does not exist wherever a check could wrongly come after model loading: the test then
sees the missing checkpoint instead of the message it expects.
"""

from __future__ import annotations

import json
import os
import subprocess

import datasets
import pytest

import script_runs
from jax_specsel.bandit import collect as collect_lib
from fake_models import fake_model_with_tokenizer

PAPER_CONFIG = "configs/paper_t5_table1.py"
QUERIES = 12
CONFIG = collect_lib.CollectConfig(max_new_tokens=4, batch_size=4, shard_size=5)


def _launch(script: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
  return script_runs.run_script(os.path.join("launch", script), *args, timeout=timeout)


_fails_with = script_runs.fails_with


def _examples(n: int = QUERIES) -> datasets.Dataset:
  return datasets.Dataset.from_list(
      [
          {"id": f"q{i}", "task": "xsum", "prompt": f"w{3 + i % 8} w4", "reference": "w3"}
          for i in range(n)
      ]
  )


def _collection(output_dir, finished: bool = True) -> None:
  """A collection of fake models under output_dir/collection (shards 1 and 2 of 3 missing
  when not finished)."""
  target = fake_model_with_tokenizer(0, name="target")
  drafters = {
      "same": fake_model_with_tokenizer(0, name="same"),
      "other": fake_model_with_tokenizer(5, name="other"),
  }
  directory = os.path.join(output_dir, "collection")
  collect_lib.collect(target, drafters, _examples(), directory, CONFIG, progress=False)
  if not finished:
    for shard in (1, 2):
      os.remove(os.path.join(directory, f"shard-{shard:05d}.parquet"))


def _config_file(tmp_path, **fields) -> str:
  """A paper config naming the fake collection's models (target, drafters same and other)."""
  fields = {
      "target": str(tmp_path / "target"),
      "output_dir": str(tmp_path),
      "drafters": {"same": str(tmp_path / "same"), "other": str(tmp_path / "other")},
      **fields,
  }
  path = tmp_path / "config.py"
  path.write_text(
      "from configs import paper_t5_table1\n\n\ndef get_config():\n"
      "  config = paper_t5_table1.get_config()\n"
      + "".join(f"  config.{name} = {value!r}\n" for name, value in fields.items())
      + "  return config\n"
  )
  return str(path)


def test_missing_config_flag():
  _fails_with(
      _launch("train_policy.py"),
      "--config is required: pass an experiment config file, e.g. "
      "--config=configs/paper_t5_table1.py",
  )


def test_a_config_file_that_does_not_exist_is_one_line():
  _fails_with(
      _launch("train_policy.py", "--config=/no/such/config.py"),
      "--config=/no/such/config.py: cannot load the config file ([Errno 2] No such file or "
      "directory: '/no/such/config.py'); pass an existing experiment config file, e.g. "
      "--config=configs/paper_t5_table1.py",
  )


def test_the_paper_configs_fix_for_a_missing_dataset_is_a_config_field(tmp_path):
  from jax_specsel.data import loaders, tasks

  local = tasks.Task(
      name="local-only",
      template="{input}",
      source_field="prompt",
      target_field="reference",
      metric="rouge_l",
  )  # no hub source
  with pytest.raises(
      loaders.DatasetUnavailableError,
      match=r"or, in a launch, --config.data_dir=DIR " r"with a file local-only.jsonl there",
  ):
    loaders.load_examples(local, split="train")
  _fails_with(
      _launch(
          "collect.py",
          f"--config={PAPER_CONFIG}",
          f"--config.data_dir={tmp_path}",
          f"--config.output_dir={tmp_path / 'run'}",
      ),
      f"config.data_dir={str(tmp_path)!r} has no file for task 'iwslt2017-en-de': add "
      "iwslt2017-en-de.jsonl (or .json/.csv/.parquet) there, or name it in "
      "config.data_files.",
  )
  assert not (tmp_path / "run").exists()


def test_unknown_config_override():
  _fails_with(
      _launch("collect.py", f"--config={PAPER_CONFIG}", "--config.alpah=0.5"),
      "--config.alpah: the config has no field 'alpah'. Did you mean \"alpha\" instead of "
      '"alpah"? Fix the name, or add the field to the config file.',
  )


@pytest.mark.parametrize(
    "override,message",
    [
        ("--config.trainer=bogus", "config.trainer='bogus': choose one of ['default', 'paper']."),
        ("--config.alpha=nan", "config.alpha=nan: must be a finite number."),
        ("--config.gamma=0", "config.gamma=0: must be >= 1."),
    ],
)
def test_bad_config_values_are_refused_before_work(override, message, tmp_path):
  output_dir = tmp_path / "run"
  _fails_with(
      _launch(
          "train_policy.py",
          f"--config={PAPER_CONFIG}",
          override,
          f"--config.output_dir={output_dir}",
      ),
      message,
  )
  assert not output_dir.exists()  # refused before anything was written


@pytest.mark.slow
def test_unfinished_collection_needs_the_explicit_flag(tmp_path):
  _collection(tmp_path, finished=False)
  args = [f"--config={_config_file(tmp_path)}"]
  _fails_with(
      _launch("train_policy.py", *args),
      "is an unfinished collection: 2 of 3 shards are missing (shard-00001.parquet, "
      "shard-00002.parquet). Rerun the collection",
  )
  completed = _launch("train_policy.py", *args, "--allow_partial_collection")
  assert completed.returncode == 0, completed.stderr[-3000:]
  metadata = json.loads((tmp_path / "policy" / "metadata" / "metadata").read_text())
  assert metadata["training_info"]["collection"] == {
      "complete": False,
      "collected_queries": 5,
      "num_queries": QUERIES,
      "missing_shards": ["shard-00001.parquet", "shard-00002.parquet"],
  }


def test_evaluate_with_an_empty_test_split_fails_before_loading_models(tmp_path):
  _collection(tmp_path)
  data_file = tmp_path / "xsum.jsonl"  # the test file holds only the collected queries
  data_file.write_text(
      "".join(
          json.dumps({"id": f"q{i}", "document": "d", "summary": "s"}) + "\n"
          for i in range(QUERIES)
      )
  )
  config_file = _config_file(tmp_path, tasks=("xsum",), data_files={"xsum": str(data_file)})
  _fails_with(
      _launch("evaluate.py", f"--config={config_file}"),
      f"the test split is empty: {QUERIES} test queries of tasks ['xsum'] (split 'test'), "
      f"{QUERIES} of them also in the collection; raise config.test_per_task",
  )


@pytest.mark.parametrize(
    "script", [pytest.param("train_policy.py", marks=pytest.mark.slow), "evaluate.py"]
)
def test_a_collection_of_other_models_than_the_config_is_refused(script, tmp_path):
  _collection(tmp_path)
  _fails_with(
      _launch(script, f"--config={PAPER_CONFIG}", f"--config.output_dir={tmp_path}"),
      f"{tmp_path / 'collection'} was collected with target 'target', not "
      "config.target='google/flan-t5-xxl' (named 'flan-t5-xxl') and drafters ['other', "
      "'same'], not config.drafters ['t5-small', 't5-small-xsum']: a policy trained on it "
      "would choose among other models than this config runs.",
  )
  _fails_with(
      _launch(script, f"--config={_config_file(tmp_path, drafters={'same': 'x'})}"),
      "was collected with drafters ['other', 'same'], not config.drafters ['same']",
  )
  assert not (tmp_path / "policy").exists()


def test_a_damaged_collection_is_refused_before_training(tmp_path):
  _collection(tmp_path)
  shard = tmp_path / "collection" / "shard-00002.parquet"
  shard.write_bytes(shard.read_bytes()[:100])
  _fails_with(
      _launch("train_policy.py", f"--config={_config_file(tmp_path)}"), f"{shard} cannot be read"
  )
  assert not (tmp_path / "policy").exists()


def test_demo_config_error_comes_before_the_zoo(tmp_path):
  output_dir = tmp_path / "demo"
  _fails_with(
      _launch(
          "demo.py",
          "--config.alpha=1.5",
          f"--config.output_dir={output_dir}",
          f"--config.cache_dir={tmp_path / 'cache'}",
      ),
      "config.alpha=1.5: must be in [0.0, 1.0].",
  )
  assert not output_dir.exists() and not (tmp_path / "cache").exists()


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
