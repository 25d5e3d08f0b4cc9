"""The pipeline end to end on fake models: collect, train, evaluate, experiments, report files."""

from __future__ import annotations

import json

import datasets
import ml_collections
import numpy as np
import pytest
from flax import nnx

import jax_specsel as js
from jax_specsel import bandit, config_checks, pipeline
from jax_specsel.data import tasks
from jax_specsel.eval import checks as checks_lib
from jax_specsel.eval import evaluate as evaluate_lib
from jax_specsel.eval import run_tables
from fake_models import fake_model_with_tokenizer


def _examples(n, seed):
  rng = np.random.default_rng(seed)
  return datasets.Dataset.from_list(
      [
          {
              "id": f"{seed}-{i}",
              "task": "fake_a" if i % 2 else "fake_b",
              "prompt": " ".join(f"w{k}" for k in rng.integers(3, 12, size=2)),
              "reference": "w3 w4",
          }
          for i in range(n)
      ]
  )


def _config():
  config = ml_collections.ConfigDict()
  config.seed, config.max_new_tokens, config.collect_batch_size, config.shard_size = 0, 6, 8, 16
  config.alpha, config.cost_unit, config.autoregressive_option, config.trainer = (
      0.5,
      1e3,
      True,
      "default",
  )
  config.gamma, config.temperature, config.eval_seeds = 3, 0.0, (0, 1)
  config.alphas, config.sample_sizes = (0.0, 1.0), (4, 16)
  return config


@pytest.fixture(scope="module", autouse=True)
def fake_tasks():
  for name in ("fake_a", "fake_b"):
    tasks.register_task(
        tasks.Task(
            name=name,
            template="{input}",
            source_field="prompt",
            target_field="reference",
            metric="rouge_l",
        ),
        overwrite=True,
    )


def test_pipeline_writes_the_report(tmp_path):
  target = fake_model_with_tokenizer(0, name="target")
  drafters = {
      "same": fake_model_with_tokenizer(0, name="same"),
      "other": fake_model_with_tokenizer(4, name="other"),
  }
  pipeline.run(target, drafters, _examples(32, 0), _examples(6, 1), _config(), str(tmp_path))
  for name in (
      "report.json",
      "report.md",
      "figure2_alpha_sweep.png",
      "figure3_sample_efficiency.png",
      "evaluation.json",
      "alpha_sweep.json",
      "sample_efficiency.json",
  ):
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
  assert set(report["policy_cost"]["all"]) == {"policy_greedy", "policy_dynamic"}
  assert set(report["policy_cost"]) == {"all", "fake_a", "fake_b"}
  assert "share" in report["checks"]["policy_share_of_query_time"]
  assert "## What choosing costs" in (tmp_path / "report.md").read_text()
  regime = report["models"]["regime"]  # the step costs measured on this machine, in the header
  assert regime["target_step_us"] > 0 and regime["round_target_steps"] > 0
  assert set(regime["drafter_step_us"]) == {"same", "other"}
  assert "a gamma-3 round with same costs" in (tmp_path / "report.md").read_text()


def test_policy_cost_is_the_fused_call_minus_the_plain_call_with_the_chosen_option():
  run = lambda seconds, choice=None: run_tables.QueryRun(seconds, 10, 0, 0, "", choice)
  runs = {
      "autoregressive": [[run(1.0), run(2.0)]],
      "drafter": [[run(0.5), run(0.8)]],
      "policy_greedy": [[run(0.51, "drafter"), run(2.02, "autoregressive")]],
  }
  cost = run_tables.policy_cost(runs)["policy_greedy"]
  assert cost["share"] == pytest.approx((0.01 + 0.02) / (0.51 + 2.02))
  assert cost["ms_per_query"] == pytest.approx(1e3 * 0.03 / 2)
  assert cost["median_ratio"] == pytest.approx((0.51 / 0.5 + 2.02 / 2.0) / 2)
  assert run_tables.policy_cost(runs, rows=[0])["policy_greedy"]["share"] == pytest.approx(
      0.01 / 0.51
  )


@pytest.mark.slow  # compiles every program of an evaluation; CI runs it with the slow set
def test_threaded_warm_up_compiles_everything_the_timed_calls_run():
  """Two prompt buckets compiled on worker threads: every program the evaluation then runs
  (single options, both fused variants, the adaptive row with its online update) is compiled."""
  target = fake_model_with_tokenizer(0, name="target")
  drafters = {"same": fake_model_with_tokenizer(0, name="same")}
  drafters["other"] = fake_model_with_tokenizer(4, name="other")
  names = ["same", "other", "autoregressive"]
  policy = bandit.Policy(bandit.PolicyNetwork(4, 3, 8, 2, rngs=nnx.Rngs(0)), option_names=names)
  long_prompt = " ".join(f"w{3 + i % 9}" for i in range(30))
  examples = datasets.Dataset.from_list(
      [
          {"id": str(i), "task": "fake_a", "prompt": prompt, "reference": "w3 w4"}
          for i, prompt in enumerate(["w3 w4", long_prompt, "w5 w6", long_prompt])
      ]
  )
  config = evaluate_lib.EvalConfig(gamma=3, max_new_tokens=6, seeds=(0,))
  setup = evaluate_lib.AdaptiveSetup(
      costs=js.decoding.adaptive.Costs(step=(0.1, 0.1), read=(0.2, 0.2), verify=(1.0, 1.1, 1.2)),
      max_gamma=2,
      online=bandit.default_online_config(),
      update_every=2,
  )
  prompts = target.tokenizer(list(examples["prompt"]))["input_ids"]
  assert len({js.decoding.bucket_length(len(p)) for p in prompts}) == 2
  options = {"autoregressive": None, **drafters}
  evaluate_lib.warm_up(target, options, drafters, prompts, config, policy, setup)
  warm = js.compilation_count()
  evaluate_lib.evaluate(target, drafters, examples, policy, config, setup)
  assert js.compilation_count() == warm


def test_greedy_repeats_count_each_querys_fastest_and_sampled_ones_their_mean():
  run = lambda seconds, choice=None: run_tables.QueryRun(seconds, 10, 0, 0, "x", choice)
  examples = datasets.Dataset.from_dict({"task": ["t", "t"], "reference": ["x", "x"]})
  runs = {  # repeat 0 stalls on query 0 (a second of interference), repeat 1 on query 1
      "autoregressive": [[run(2.0), run(1.0)], [run(1.0), run(1.5)]],
      "drafter": [[run(0.5), run(0.5)], [run(0.5), run(0.5)]],
      "policy_greedy": [
          [run(1.52, "drafter"), run(0.51, "drafter")],
          [run(0.53, "drafter"), run(1.5, "drafter")],
      ],
  }
  fastest = run_tables.summarize(examples, runs, {}, fastest=True)
  row = fastest["domains"]["t"]["autoregressive"]
  assert row["ms_per_token"] == pytest.approx(1e3 * (1.0 + 1.0) / 20)
  assert row["ms_per_token_spread"] == pytest.approx(1e3 * 0.25 / 20)  # over the repeats' totals
  assert fastest["per_query"]["autoregressive"] == [[1.0, 10], [1.0, 10]]
  cost = fastest["policy_cost"]["all"]["policy_greedy"]
  assert cost["share"] == pytest.approx((0.03 + 0.01) / (0.53 + 0.51))
  assert fastest["repeat_timing"] == "fastest"
  mean = run_tables.summarize(examples, runs, {})
  assert mean["domains"]["t"]["autoregressive"]["ms_per_token"] == pytest.approx(1e3 * 2.75 / 20)
  assert mean["per_query"]["autoregressive"] == [[2.0, 10], [1.0, 10]]  # the first repeat
  assert mean["repeat_timing"] == "mean"


def test_round_work_averages_achieved_and_hindsight_over_the_domain_rows():
  run = lambda achieved, best: run_tables.QueryRun(1.0, 10, 0, 0, "", work=(achieved, best))
  runs = [run(1.0, 2.0), run(3.0, 2.0), run(9.0, 9.0)]
  assert run_tables.round_work(runs, [0, 1]) == pytest.approx(
      {"achieved": 2.0, "best_fixed_hindsight": 2.0, "ratio": 1.0}
  )


def test_price_choices_uses_the_cost_table():
  per_query = {"a": [[0.1, 10], [0.2, 10]], "b": [[0.05, 10], [0.4, 10]]}
  assert run_tables.price_choices(per_query, ["b", "a"]) == pytest.approx(1e3 * 0.25 / 20)
  assert run_tables.price_choices(per_query, ["a", "a"], policy_seconds=0.1) == pytest.approx(
      1e3 * 0.4 / 20
  )


def _row(speedup):
  return {"speedup": speedup, "ms_per_token": 1.0 / speedup, "acceptance_rate": 0.5, "quality": 1.0}


def _result(translate_drafter_speedup, arithmetic_ar_share, policy_translate_speedup):
  options = ("autoregressive", "drafter_translate", "policy_greedy")
  speedups = {
      "translate": (1.0, translate_drafter_speedup, policy_translate_speedup),
      "arithmetic": (1.0, 0.7, 1.0),
  }
  return {
      "domains": {
          d: {o: _row(v) for o, v in zip(options, values)} for d, values in speedups.items()
      },
      "choices": {
          "translate": {"drafter_translate": 1.0},
          "arithmetic": {
              "autoregressive": arithmetic_ar_share,
              "drafter_translate": 1 - arithmetic_ar_share,
          },
      },
  }


def test_effect_checks_name_what_holds_and_what_falls_short():
  expectations = checks_lib.Expectations(
      drafter_domains={"drafter_translate": "translate"}, autoregressive_domains=("arithmetic",)
  )
  holds = checks_lib.effect_checks(_result(1.6, 0.9, 1.6), expectations)
  assert holds["drafter_translate_in_domain"]["at_least_min_speedup"]
  assert holds["drafter_translate_in_domain"]["slower_than_autoregressive_outside"]
  assert holds["arithmetic_policy_chooses_autoregressive"]["for_most_queries"]
  assert checks_lib.shortfalls(holds) == []

  falls = checks_lib.effect_checks(_result(1.1, 0.3, 1.0), expectations)
  notes = checks_lib.shortfalls(falls)
  assert any("drafter_translate reaches 1.10x in its own domain translate" in n for n in notes)
  assert any("autoregressive for only 30%" in n for n in notes)
  assert any("not faster on average" in n for n in notes)  # 1.0 on average, as autoregressive
  assert any("translate: the greedy policy (1.00x) is more than 5% slower" in n for n in notes)


def test_mixed_domain_checks_per_round_choice_against_every_other_option():
  result = _result(1.6, 0.9, 1.6)
  options = ("autoregressive", "drafter_translate", "policy_greedy", "policy_adaptive")
  result["domains"]["mixed"] = {o: _row(v) for o, v in zip(options, (1.0, 1.3, 1.25, 1.5))}
  expectations = checks_lib.Expectations(
      drafter_domains={"drafter_translate": "translate"}, mixed_domains=("mixed",)
  )
  checks = checks_lib.effect_checks(result, expectations)
  mixed = checks["mixed_adaptive_vs_best"]
  assert mixed["best_rival"] == "drafter_translate" and mixed["gain"] == pytest.approx(1.5 / 1.3)
  assert mixed["adaptive_reaches_gain"] is False and "mixed_adaptive_vs_policy" not in checks
  # a mixed domain is no drafter's "outside": 1.3x there is not a shortfall of drafter_translate
  assert checks["drafter_translate_in_domain"]["slower_than_autoregressive_outside"]
  assert any(
      "mixed: per-round choice reaches 1.50x, 1.15x the best other option "
      "drafter_translate (1.30x), short of 1.2x" in n
      for n in checks_lib.shortfalls(checks)
  )
  result["domains"]["mixed"]["policy_adaptive"] = _row(1.6)
  assert checks_lib.effect_checks(result, expectations)["mixed_adaptive_vs_best"][
      "adaptive_reaches_gain"
  ]


def test_policy_share_above_the_limit_is_a_shortfall():
  result = _result(1.6, 0.9, 1.6)
  result["policy_cost"] = {"all": {"policy_greedy": {"share": 0.03, "ms_per_query": 0.2}}}
  checks = checks_lib.effect_checks(result, checks_lib.Expectations())
  assert checks["policy_share_of_query_time"]["below_limit"] is False
  assert any("choosing costs 3.0% of per-query time" in n for n in checks_lib.shortfalls(checks))
  result["policy_cost"]["all"]["policy_greedy"]["share"] = 0.004
  assert checks_lib.effect_checks(result)["policy_share_of_query_time"]["below_limit"] is True


def test_bad_config_and_empty_splits_are_refused_before_any_work(tmp_path):
  target = fake_model_with_tokenizer(0, name="target")
  drafters = {"same": fake_model_with_tokenizer(0, name="same")}
  output_dir = tmp_path / "out"
  for field, value, message in (
      ("alpha", 1.5, r"config.alpha=1.5: must be in \[0.0, 1.0\]"),
      ("trainer", "bogus", r"config.trainer='bogus': choose one of " r"\['default', 'paper'\]"),
      ("temperature", 1e-9, r"config.temperature=1e-09: 0 \(greedy\) or >= 0.0001"),
      ("alphas", (0.0, float("nan")), r"config.alphas\[1\]=nan: must be a finite"),
      ("eval_seeds", (), r"config.eval_seeds=\(\): must be a non-empty list"),
  ):
    config = _config()
    config[field] = value
    with pytest.raises(ValueError, match=message):
      pipeline.run(target, drafters, _examples(8, 0), _examples(4, 1), config, str(output_dir))
  with pytest.raises(ValueError, match="the test split is empty: nothing to evaluate"):
    pipeline.run(target, drafters, _examples(8, 0), _examples(0, 1), _config(), str(output_dir))
  with pytest.raises(ValueError, match=r"config lacks field\(s\) \['gamma'\]"):
    config = _config()
    del config["gamma"]
    config_checks.check_config(config, models=False)
  assert not output_dir.exists()  # nothing collected, trained or written


def test_a_partial_collection_is_stated_in_the_report(tmp_path):
  target = fake_model_with_tokenizer(0, name="target")
  row = dict(_row(1.0), ms_per_token_spread=0.0)
  result = {
      "domains": {"fake_a": {"autoregressive": row, "policy_greedy": row}},
      "choices": {"fake_a": {"autoregressive": 1.0}},
      "choices_by_variant": {},
  }
  meta = {
      "num_queries": 12,
      "complete": False,
      "collected_queries": 5,
      "missing_shards": ["shard-00001.parquet", "shard-00002.parquet"],
  }
  payload = pipeline.write_report(result, {}, target, {}, str(tmp_path), collection=meta)
  assert payload["collection"] == {
      "complete": False,
      "collected_queries": 5,
      "num_queries": 12,
      "missing_shards": ["shard-00001.parquet", "shard-00002.parquet"],
  }
  assert json.loads((tmp_path / "report.json").read_text())["collection"]["complete"] is False
  assert (
      "**Partial collection**: the policy and the experiments used 5 of 12 collected queries "
      "(missing shard-00001.parquet, shard-00002.parquet)"
  ) in (tmp_path / "report.md").read_text()
  complete = pipeline.write_report(
      result, {}, target, {}, str(tmp_path), collection={"num_queries": 12, "complete": True}
  )
  assert (
      complete["collection"]["complete"] and "Partial" not in (tmp_path / "report.md").read_text()
  )


def test_the_old_estimator_field_is_read_with_a_deprecation_warning():
  from jax_specsel.bandit import reinforce

  old = _config()
  del old["trainer"]
  old.estimator = "paper"
  with pytest.warns(FutureWarning, match="rename the field to config.trainer"):
    config_checks.check_config(old, models=False)
  with pytest.warns(FutureWarning):
    assert config_checks.trainer_config(old) == reinforce.paper_train_config()
  old.estimator = "reinforce"  # the training config's own word: refused, with what to write
  with pytest.raises(
      ValueError,
      match=r"config.estimator='reinforce': this experiment field is now " r"called `trainer`",
  ):
    config_checks.check_config(old, models=False)
  both = _config()
  both.estimator = "default"
  with pytest.raises(ValueError, match="`estimator` is the old name of `trainer`; remove it"):
    config_checks.check_config(both, models=False)
  neither = _config()
  del neither["trainer"]
  with pytest.raises(ValueError, match=r"config lacks field\(s\) \['trainer'\]"):
    config_checks.check_config(neither, models=False)


def test_the_adaptive_section_adds_its_row_round_choices_and_the_shifted_domain(tmp_path):
  target = fake_model_with_tokenizer(0, name="target")
  drafters = {
      "same": fake_model_with_tokenizer(0, name="same"),
      "other": fake_model_with_tokenizer(4, name="other"),
  }
  config = _config()
  config.eval_seeds = (0,)
  config.adaptive = ml_collections.ConfigDict(
      dict(
          max_gamma=3,
          probe_every=4,
          hedge_learning_rate=1.0,
          online_learning_rate=3e-3,
          update_every=2,
          frozen=False,
          shifted_domain="fake_a",
          shifted_queries=5,
      )
  )
  payload = pipeline.run(target, drafters, _examples(32, 0), _examples(6, 1), config, str(tmp_path))
  for domain in ("fake_a", "fake_b"):
    rows = payload["domains"][domain]
    assert "policy_adaptive" in rows
    assert len({round(r["quality"], 6) for r in rows.values()}) == 1  # greedy: the target's text
    assert abs(sum(payload["round_choices"][domain].values()) - 1.0) < 1e-9
    work = payload["round_work"][domain]  # autoregressive is always observed: 1 token a step
    assert 0 < work["achieved"] and work["best_fixed_hindsight"] >= 1.0
    assert work["ratio"] == pytest.approx(work["achieved"] / work["best_fixed_hindsight"])
    assert "adaptive_within_tolerance" in payload["checks"][f"{domain}_adaptive_vs_policy"]
  assert set(payload["policy_cost"]["all"]) == {"policy_greedy", "policy_dynamic"}
  shifted = json.loads((tmp_path / "shifted.json").read_text())
  assert shifted["domain"] == "fake_a" and len(shifted["ms_per_token"]["online"]) == 5
  assert set(shifted["final"]) == {"online", "frozen", "autoregressive", "same", "other"}
  assert (tmp_path / "figure_shifted_domain.png").exists()
  markdown = (tmp_path / "report.md").read_text()
  assert "| policy_adaptive |" in markdown and "## Shifted domain: fake_a" in markdown
  config.adaptive = ml_collections.ConfigDict({**config.adaptive.to_dict(), "frozen": "no"})
  with pytest.raises(ValueError, match="config.adaptive.frozen"):
    config_checks.check_config(config, models=False)


@pytest.mark.slow  # the tiny zoo is trained, then every stage runs
def test_the_demo_runs_end_to_end_on_the_tiny_zoo(tmp_path, monkeypatch):
  """`demo.run_demo` as `make demo` runs it, on the tiny zoo and a handful of queries: every stage
  writes its files, greedy decoding gives every option the target's own text, and the saved
  policy and collection load back."""
  import importlib
  import os
  from jax_specsel import bandit, demo
  from jax_specsel.bandit import collection_store

  monkeypatch.syspath_prepend(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  config = importlib.import_module("configs.demo").get_config()
  config.zoo, config.cache_dir, config.output_dir = (
      "tiny",
      str(tmp_path / "zoo"),
      str(tmp_path / "out"),
  )
  config.collect_per_domain, config.test_per_domain, config.eval_seeds = 8, 2, (0,)
  config.shard_size, config.collect_batch_size, config.max_new_tokens = 16, 8, 16
  config.alphas, config.sample_sizes = (0.0, 1.0), (4, 16)
  config.adaptive.shifted_queries = 3
  assert demo.run_demo(config) == str(tmp_path / "out")
  out = tmp_path / "out"
  for name in (
      "report.json",
      "report.md",
      "evaluation.json",
      "alpha_sweep.json",
      "shifted.json",
      "sample_efficiency.json",
      "figure2_alpha_sweep.png",
      "figure_shifted_domain.png",
  ):
    assert (out / name).exists(), name
  report = json.loads((out / "report.json").read_text())
  dataset, meta = collection_store.load_collection(str(out / "collection"))
  domains = sorted(set(dataset["task"]))
  assert sorted(report["domains"]) == domains and len(dataset) == 8 * len(domains)
  policy = bandit.load_policy(out / "policy")
  assert policy.option_names == [n for n in meta["options"] if n != "autoregressive"] + [
      "autoregressive"
  ]
  for domain in domains:
    rows = report["domains"][domain]
    assert {
        "autoregressive",
        "policy_greedy",
        "policy_dynamic",
        "policy_adaptive",
        *policy.option_names,
    } <= set(rows)
    assert len({round(row["quality"], 6) for row in rows.values()}) == 1  # greedy: the same text
  assert report["collection"]["complete"]
