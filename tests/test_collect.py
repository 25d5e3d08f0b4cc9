"""Offline collection: rows, scores, resumption exactly once, errors, and the reward table."""

from __future__ import annotations

import datasets
import numpy as np
import pytest

from jax_specsel.bandit import collect as collect_lib
from fake_models import fake_model_with_tokenizer

CONFIG = collect_lib.CollectConfig(max_new_tokens=6, batch_size=4, shard_size=5)


def _examples(n=12):
  rng = np.random.default_rng(0)
  rows = [{"id": f"q{i}", "task": "a" if i % 2 else "b",
           "prompt": " ".join(f"w{k}" for k in rng.integers(3, 12, size=1 + i % 4)), "reference": "w3"}
          for i in range(n)]
  return datasets.Dataset.from_list(rows)


@pytest.fixture(scope="module")
def models():
  target = fake_model_with_tokenizer(0, name="target")
  return target, {"same": fake_model_with_tokenizer(0, name="same"),
                  "other": fake_model_with_tokenizer(5, name="other")}


def test_collect_writes_every_query_with_scores(models, tmp_path):
  target, drafters = models
  data = collect_lib.collect(target, drafters, _examples(), str(tmp_path), CONFIG, progress=False)
  assert data["id"] == [f"q{i}" for i in range(12)]
  assert len(list(tmp_path.glob("shard-*.parquet"))) == 3  # 12 queries, 5 per shard
  np.testing.assert_allclose(data["score/same"], 1.0)  # same weights: same greedy text
  assert 0.0 <= min(data["score/other"]) and max(data["score/other"]) <= 1.0
  assert np.mean(data["score/other"]) < 0.9
  assert np.asarray(data["embedding"]).shape == (12, target.hidden_size)
  _, meta = collect_lib.load_collection(str(tmp_path))
  assert meta["options"] == ["same", "other", "autoregressive"]
  assert meta["param_counts"]["autoregressive"] == target.num_params


def test_interrupted_collection_resumes_each_query_exactly_once(models, tmp_path, monkeypatch):
  target, drafters = models
  reference = collect_lib.collect(target, drafters, _examples(), str(tmp_path / "ref"), CONFIG,
                                  progress=False)
  real_write, calls = collect_lib._write_shard, []

  def crash_on_second_shard(output_dir, shard, rows):
    calls.append(shard)
    if len(calls) == 2:
      raise KeyboardInterrupt("killed")
    real_write(output_dir, shard, rows)

  monkeypatch.setattr(collect_lib, "_write_shard", crash_on_second_shard)
  with pytest.raises(KeyboardInterrupt):
    collect_lib.collect(target, drafters, _examples(), str(tmp_path / "run"), CONFIG, progress=False)
  monkeypatch.setattr(collect_lib, "_write_shard", real_write)
  assert len(list((tmp_path / "run").glob("shard-*.parquet"))) == 1
  resumed = collect_lib.collect(target, drafters, _examples(), str(tmp_path / "run"), CONFIG,
                                progress=False)
  assert resumed["id"] == reference["id"]  # each query exactly once, in order
  assert resumed["output/autoregressive"] == reference["output/autoregressive"]  # stable seeds
  assert resumed["score/other"] == reference["score/other"]


def test_resume_with_other_settings_is_refused(models, tmp_path):
  target, drafters = models
  collect_lib.collect(target, drafters, _examples(4), str(tmp_path), CONFIG, progress=False)
  other = collect_lib.CollectConfig(max_new_tokens=7, batch_size=4, shard_size=5)
  with pytest.raises(ValueError, match="other settings"):
    collect_lib.collect(target, drafters, _examples(4), str(tmp_path), other, progress=False)


def test_bad_input(models, tmp_path):
  target, drafters = models
  with pytest.raises(ValueError, match="empty dataset"):
    collect_lib.collect(target, drafters, _examples(0), str(tmp_path), CONFIG, progress=False)
  with pytest.raises(ValueError, match="at least one drafter"):
    collect_lib.collect(target, {}, _examples(), str(tmp_path), CONFIG, progress=False)
  with pytest.raises(FileNotFoundError, match="not a collection"):
    collect_lib.load_collection(str(tmp_path / "nothing"))


def test_reward_table_mixes_alignment_and_cost(models, tmp_path):
  target, drafters = models
  data = collect_lib.collect(target, drafters, _examples(), str(tmp_path), CONFIG, progress=False)
  _, meta = collect_lib.load_collection(str(tmp_path))
  embeddings, rewards, names = collect_lib.reward_table(data, meta, alpha=1.0,
                                                        options=["same", "other"])
  assert names == ["same", "other"] and rewards.shape == (12, 2) and embeddings.shape[0] == 12
  np.testing.assert_allclose(rewards[:, 0], 1.0)
  _, only_cost, _ = collect_lib.reward_table(data, meta, alpha=0.0, cost_unit=1.0)
  assert only_cost[:, -1].max() == 0.0  # autoregressive = the largest model: no speed bonus
  with pytest.raises(ValueError, match="not collected"):
    collect_lib.reward_table(data, meta, alpha=0.5, options=["missing"])
