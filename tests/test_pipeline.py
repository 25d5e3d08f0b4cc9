"""The pipeline end to end on fake models: collect, train, evaluate, experiments, report files."""

from __future__ import annotations

import json

import datasets
import ml_collections
import numpy as np
import pytest

from jax_specsel import pipeline
from jax_specsel.data import tasks
from jax_specsel.eval import evaluate as evaluate_lib
from fake_models import fake_model_with_tokenizer


def _examples(n, seed):
  rng = np.random.default_rng(seed)
  return datasets.Dataset.from_list([
      {"id": f"{seed}-{i}", "task": "fake_a" if i % 2 else "fake_b",
       "prompt": " ".join(f"w{k}" for k in rng.integers(3, 12, size=2)), "reference": "w3 w4"}
      for i in range(n)])


def _config():
  config = ml_collections.ConfigDict()
  config.seed, config.max_new_tokens, config.collect_batch_size, config.shard_size = 0, 6, 8, 16
  config.alpha, config.cost_unit, config.autoregressive_option, config.estimator = 0.5, 1e3, True, "default"
  config.gamma, config.temperature, config.eval_seeds = 3, 0.0, (0, 1)
  config.alphas, config.sample_sizes = (0.0, 1.0), (4, 16)
  return config


@pytest.fixture(scope="module", autouse=True)
def fake_tasks():
  for name in ("fake_a", "fake_b"):
    tasks.register_task(tasks.Task(name=name, template="{input}", source_field="prompt",
                                   target_field="reference", metric="rouge_l"), overwrite=True)


def test_pipeline_writes_the_report(tmp_path):
  target = fake_model_with_tokenizer(0, name="target")
  drafters = {"same": fake_model_with_tokenizer(0, name="same"),
              "other": fake_model_with_tokenizer(4, name="other")}
  payload = pipeline.run(target, drafters, _examples(32, 0), _examples(6, 1), _config(), str(tmp_path))
  for name in ("report.json", "report.md", "figure2_alpha_sweep.png", "figure3_sample_efficiency.png",
               "evaluation.json", "alpha_sweep.json", "sample_efficiency.json"):
    assert (tmp_path / name).exists(), name
  report = json.loads((tmp_path / "report.json").read_text())
  for domain in ("fake_a", "fake_b"):
    rows = report["domains"][domain]
    assert set(rows) == {"autoregressive", "same", "other", "policy_greedy", "policy_dynamic"}
    assert rows["autoregressive"]["speedup"] == pytest.approx(1.0)
    assert rows["same"]["acceptance_rate"] == 1.0
    # greedy decoding: every option reproduces the target's text, so quality is identical
    assert len({round(r["quality"], 6) for r in rows.values()}) == 1
    assert abs(sum(report["choices"][domain].values()) - 1.0) < 1e-9
  assert "| policy_greedy |" in (tmp_path / "report.md").read_text()


def test_price_choices_uses_the_cost_table():
  per_query = {"a": [[0.1, 10], [0.2, 10]], "b": [[0.05, 10], [0.4, 10]]}
  assert evaluate_lib.price_choices(per_query, ["b", "a"]) == pytest.approx(1e3 * 0.25 / 20)
  assert evaluate_lib.price_choices(per_query, ["a", "a"], policy_seconds=0.1) == pytest.approx(1e3 * 0.4 / 20)
