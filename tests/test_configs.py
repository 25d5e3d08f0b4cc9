"""Every experiment config loads and is complete (no download: only the config objects)."""

from __future__ import annotations

import glob
import importlib
import os

import pytest

from jax_specsel.data import tasks

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAPER_FIELDS = (
    "target",
    "dtype",
    "drafters",
    "tasks",
    "train_per_task",
    "test_per_task",
    "max_new_tokens",
    "collect_batch_size",
    "shard_size",
    "alpha",
    "cost_unit",
    "autoregressive_option",
    "trainer",
    "gamma",
    "temperature",
    "eval_seeds",
    "alphas",
    "sample_sizes",
    "output_dir",
    "seed",
)
PIPELINE_FIELDS = (
    "seed",
    "max_new_tokens",
    "collect_batch_size",
    "shard_size",
    "alpha",
    "cost_unit",
    "autoregressive_option",
    "trainer",
    "gamma",
    "temperature",
    "eval_seeds",
    "alphas",
    "sample_sizes",
    "output_dir",
)


def _config_modules():
  names = sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(ROOT, "configs", "*.py")))
  return [n for n in names if n != "__init__"]


def test_there_is_a_config_per_paper_experiment():
  assert {
      "demo",
      "paper_t5_table1",
      "paper_t5_table2",
      "paper_t5_table3_4",
      "paper_vicuna_table5",
      "paper_llama_table6",
  } <= set(_config_modules())


@pytest.mark.parametrize("name", _config_modules())
def test_config_is_complete(name, monkeypatch):
  monkeypatch.syspath_prepend(ROOT)
  config = importlib.import_module(f"configs.{name}").get_config()
  required = PIPELINE_FIELDS if name == "demo" else PAPER_FIELDS
  missing = [field for field in required if field not in config]
  assert not missing, f"configs/{name}.py lacks {missing}"
  assert 0.0 <= config.alpha <= 1.0 and config.gamma >= 1 and config.temperature >= 0
  if name != "demo":
    for task in config.tasks:
      tasks.get_task(task)  # every task is registered
    assert config.drafters
  assert config.trainer in ("paper", "default")
  assert "estimator" not in config, "the experiment field is `trainer` (estimator: its old name)"


@pytest.mark.parametrize("name", _config_modules())
def test_shipped_configs_pass_the_launch_checks(name, monkeypatch, tmp_path):
  from jax_specsel import config_checks, demo

  monkeypatch.syspath_prepend(ROOT)
  config = importlib.import_module(f"configs.{name}").get_config()
  config_checks.check_config(config, models=name != "demo")
  if name == "demo":
    config.output_dir, config.cache_dir = str(tmp_path / "out"), str(tmp_path / "cache")
    assert demo.check_demo_config(config) == str(tmp_path / "out")


def test_demo_config_errors_name_the_field(monkeypatch, tmp_path):
  from jax_specsel import demo

  monkeypatch.syspath_prepend(ROOT)
  for field, value, message in (
      ("zoo", "huge", "config.zoo='huge': choose 'default' or 'tiny'"),
      ("test_per_domain", 0, "config.test_per_domain=0: must be >= 1"),
      ("alpha", -0.1, r"config.alpha=-0.1: must be in \[0.0, 1.0\]"),
  ):
    config = importlib.import_module("configs.demo").get_config()
    config.output_dir = str(tmp_path / "out")
    config[field] = value
    with pytest.raises(ValueError, match=message):
      demo.check_demo_config(config)
  assert not (tmp_path / "out").exists()


def test_experiment_config_errors_name_the_field(monkeypatch):
  from jax_specsel import config_checks

  monkeypatch.syspath_prepend(ROOT)
  for field, value, message in (
      ("tasks", ("xsum", "nope"), r"config.tasks: unknown task 'nope'"),
      (
          "drafters",
          {"exit": "early_exit:zero"},
          r"config.drafters\['exit'\]='early_exit:zero': write " r"early_exit:K with K >= 1",
      ),
      ("dtype", "int8", r"config.dtype='int8': choose one of"),
      ("test_per_task", 0, r"config.test_per_task=0: must be >= 1"),
  ):
    config = importlib.import_module("configs.paper_t5_table1").get_config()
    config[field] = value
    with pytest.raises(ValueError, match=message):
      config_checks.check_config(config)
