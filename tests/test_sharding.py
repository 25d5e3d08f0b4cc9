"""Sharded targets, data-parallel collection and the memory estimator.

The multi-device checks need jax to start with 8 fake CPU devices (or as one of two distributed
processes), but this pytest process already runs jax on one device: they run in subprocesses of
tests/sharding_worker.py (one for all 8-device checks, two for the distributed collection) and
the tests here assert on the `RESULT` json each prints. Rules, estimates and errors that need no
devices are checked in this process.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
import transformers
from jax.sharding import PartitionSpec as P

import jax_specsel as js
import sharding_worker
from fake_models import fake_model
from random_t5 import random_t5
from jax_specsel import memory, sharding
from jax_specsel.bandit import collect as collect_lib
from jax_specsel.bandit import collection_store
from jax_specsel.bandit import distributed
from jax_specsel.models import llama, t5

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
VOCAB = sharding_worker.VOCAB
# The real Flan-T5-XXL (google/flan-t5-xxl config.json): the Table 1 target.
FLAN_T5_XXL = t5.Config(
    vocab_size=32128,
    d_model=4096,
    d_kv=64,
    d_ff=10240,
    num_heads=64,
    num_layers=24,
    num_decoder_layers=24,
    dense_act_fn="gelu_new",
    is_gated_act=True,
    tie_word_embeddings=False,
    scale_decoder_outputs=False,
    dtype="bfloat16",
)


def _env(**extra) -> dict:
  env = dict(
      os.environ,
      HF_HUB_OFFLINE="1",
      HF_DATASETS_OFFLINE="1",
      TOKENIZERS_PARALLELISM="false",
      PYTHONPATH=os.pathsep.join([ROOT, HERE, os.environ.get("PYTHONPATH", "")]),
  )
  env.pop("XLA_FLAGS", None)
  env.update(extra)
  return env


def _result(completed: subprocess.CompletedProcess) -> dict:
  lines = [line for line in completed.stdout.splitlines() if line.startswith("RESULT ")]
  assert (
      completed.returncode == 0 and lines
  ), f"worker failed (exit {completed.returncode}):\n{completed.stdout[-3000:]}\n{completed.stderr[-6000:]}"
  return json.loads(lines[-1][len("RESULT ") :])


def _save(model, directory) -> str:
  model.eval().save_pretrained(str(directory))
  return str(directory)


def _t5(seed: int, heads: int, layers: int) -> transformers.T5ForConditionalGeneration:
  """A Flan-style (gated-gelu, untied) random T5."""
  return random_t5(
      seed,
      tie=False,
      vocab_size=VOCAB,
      d_model=32,
      d_kv=8,
      d_ff=64,
      num_heads=heads,
      num_layers=layers,
      num_decoder_layers=layers,
      relative_attention_num_buckets=8,
      relative_attention_max_distance=16,
      feed_forward_proj="gated-gelu",
      eos_token_id=1,
      pad_token_id=0,
      decoder_start_token_id=0,
  )


@pytest.fixture(scope="module")
def sharded_run(tmp_path_factory):
  """One 8-device subprocess: T5 on data 2 x model 4, LLaMA (8 heads, 2 kv heads) on 1 x 8."""
  root = tmp_path_factory.mktemp("sharding")
  _save(_t5(0, heads=4, layers=2), root / "t5")
  torch.manual_seed(2)
  llama_config = transformers.LlamaConfig(
      vocab_size=VOCAB,
      hidden_size=64,
      intermediate_size=128,
      num_hidden_layers=3,
      num_attention_heads=8,
      num_key_value_heads=2,
      max_position_embeddings=256,
      eos_token_id=1,
      bos_token_id=2,
      pad_token_id=0,
  )
  _save(transformers.LlamaForCausalLM(llama_config), root / "llama")
  torch.manual_seed(3)
  drafter_config = transformers.LlamaConfig(
      vocab_size=VOCAB,
      hidden_size=32,
      intermediate_size=64,
      num_hidden_layers=1,
      num_attention_heads=4,
      num_key_value_heads=2,
      max_position_embeddings=256,
      eos_token_id=1,
      bos_token_id=2,
      pad_token_id=0,
  )
  _save(transformers.LlamaForCausalLM(drafter_config), root / "llama_drafter")
  completed = subprocess.run(
      [sys.executable, os.path.join(HERE, "sharding_worker.py"), "sharded", str(root)],
      env=_env(XLA_FLAGS="--xla_force_host_platform_device_count=8"),
      capture_output=True,
      text=True,
      timeout=600,
  )
  return _result(completed), completed.stderr


@pytest.mark.slow
@pytest.mark.parametrize("family", ["t5", "llama"])
def test_sharded_forward_and_greedy_generation_equal_unsharded(sharded_run, family):
  result = sharded_run[0][family]
  # Row-parallel matmuls add partial sums in another order: float32 rounding, nothing more.
  assert result["max_logit_diff"] <= 1e-5 * max(1.0, result["max_logit"]), result
  assert result["auto_equal"], "sharded greedy decoding differs from the unsharded model"
  assert result["speculative_equal"], "sharded speculative greedy differs from autoregressive"
  assert result["acceptance"] > 0.1  # drafts were accepted, not only corrected


@pytest.mark.slow
@pytest.mark.parametrize("family", ["t5", "llama"])
def test_sampling_selected_and_adaptive_on_a_sharded_target(sharded_run, family):
  result = sharded_run[0][family]
  assert result["sampled_equal"], "sharded sampling differs from unsharded with the same seed"
  assert result["selected_equal"], "generate_selected on a sharded target is not greedy decoding"
  assert result["adaptive_equal"], "generate_adaptive on a sharded target is not greedy decoding"
  assert result["selected_embedding_diff"] <= 1e-4, result["selected_embedding_diff"]


@pytest.mark.slow
def test_parameters_follow_the_tensor_parallel_rules(sharded_run):
  result, stderr = sharded_run
  assert result["devices"] == 8
  t5_specs, llama_specs = result["t5"]["param_specs"], result["llama"]["param_specs"]
  # Specs as lists without trailing None: ["model"] is P("model", None).
  assert t5_specs["decoder/blocks/0/self_attention/q"] == [None, "model"]  # column-parallel
  assert t5_specs["decoder/blocks/0/cross_attention/o"] == ["model"]  # row-parallel
  assert t5_specs["encoder/blocks/1/feed_forward/wi_0"] == [None, "model"]
  assert t5_specs["encoder/blocks/1/feed_forward/wo"] == ["model"]
  assert t5_specs["shared"] == ["model"] and t5_specs["lm_head"] == [None, "model"]  # vocab
  assert t5_specs["encoder/final_norm/scale"] == []
  assert t5_specs["decoder/blocks/0/self_attention/relative_bias"] == []
  assert result["t5"]["q_shard_shape"] == [32, 8]  # 4 heads of 8 over model=4: one head each
  assert llama_specs["layers/2/self_attn/q_proj/kernel"] == [None, "model"]
  assert llama_specs["layers/2/mlp/down_proj/kernel"] == ["model"]
  # 2 key/value heads do not divide model=8: replicated, and a log line says so.
  assert llama_specs["layers/0/self_attn/k_proj/kernel"] == []
  assert "layers/*/self_attn/k_proj/kernel (64, 16) is replicated" in stderr
  assert "does not divide the model axis (8)" in stderr


@pytest.mark.slow
def test_caches_are_split_on_batch_and_heads_inside_the_loop(sharded_run):
  t5_result, llama_result = sharded_run[0]["t5"], sharded_run[0]["llama"]
  assert t5_result["target_cache_spec"] == ["data", None, "model"]  # [B, L, N, H]
  assert t5_result["drafter_cache_spec"] == ["data"]  # replicated drafter: batch split only
  # LLaMA: data=1 and 2 kv heads on model=8 -> whole cache on each device (the logged fallback).
  assert llama_result["target_cache_spec"] == []
  assert "keeps its 2 key/value head(s) replicated" in sharded_run[1]


@pytest.mark.slow
@pytest.mark.parametrize("family", ["t5", "llama"])
def test_memory_estimate_equals_the_placed_arrays(sharded_run, family):
  result = sharded_run[0][family]
  assert result["estimate"] == result["actual"]


@pytest.mark.slow
def test_worker_reports_clear_mesh_errors(sharded_run):
  errors = sharded_run[0]["errors"]
  assert "needs data * model = 6 devices but 8 are available" in errors["mesh_3x2"]
  assert "8 devices do not split into 3" in errors["mesh_data3"]
  assert "jax.sharding.Mesh" in errors["load_bad_mesh"]


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


@pytest.mark.slow
def test_two_process_collection_equals_one_process(tmp_path):
  port, shared = _free_port(), tmp_path / "two"
  workers = [
      subprocess.Popen(
          [
              sys.executable,
              os.path.join(HERE, "sharding_worker.py"),
              "collect",
              str(port),
              str(i),
              str(shared),
          ],
          env=_env(),
          text=True,
          stdout=subprocess.PIPE,
          stderr=subprocess.PIPE,
      )
      for i in range(2)
  ]
  results = []
  for worker in workers:
    stdout, stderr = worker.communicate(timeout=300)
    results.append(
        _result(subprocess.CompletedProcess(worker.args, worker.returncode, stdout, stderr))
    )
  target, drafters, examples, config = sharding_worker.collection_inputs()
  single = collect_lib.collect(
      target, drafters, examples, str(tmp_path / "one"), config, progress=False
  )
  merged, meta = collection_store.load_collection(str(shared))
  assert [r["shards"] for r in results] == [[0, 2], [1]]  # 12 queries, 5 per shard, 2 processes
  assert all(r["count"] == 2 and r["rows"] == len(examples) for r in results)
  assert merged["id"] == single["id"] == [f"q{i}" for i in range(len(examples))]
  for column in single.column_names:
    if column == "embedding":
      np.testing.assert_allclose(merged[column], single[column], rtol=1e-6)
    else:
      assert merged[column] == single[column], column
  assert meta == collection_store.load_collection(str(tmp_path / "one"))[1]
  assert sorted(p.name for p in shared.iterdir()) == [
      "collection.json",
      "shard-00000.parquet",
      "shard-00001.parquet",
      "shard-00002.parquet",
  ]


def test_collect_refuses_a_bad_process_index(tmp_path):
  target, drafters, examples, config = sharding_worker.collection_inputs()
  with pytest.raises(ValueError, match="process_index=2 must be in"):
    collect_lib.collect(
        target,
        drafters,
        examples,
        str(tmp_path),
        config,
        progress=False,
        process_index=2,
        process_count=2,
    )
  assert distributed.shards_of(1, 3, 8) == [1, 4, 7]


def test_a_second_process_waits_for_and_checks_collection_json(tmp_path):
  target, drafters, examples, config = sharding_worker.collection_inputs()
  with pytest.raises(TimeoutError, match="process 0 writes it"):
    collect_lib.collect(
        target,
        drafters,
        examples,
        str(tmp_path),
        config,
        progress=False,
        process_index=1,
        process_count=2,
        wait_seconds=0.3,
    )


def test_rules_on_axis_sizes_alone(caplog):
  config = llama.Config(
      vocab_size=30,
      hidden_size=16,
      intermediate_size=24,
      num_hidden_layers=1,
      num_attention_heads=4,
      num_key_value_heads=1,
      head_dim=4,
  )
  with caplog.at_level(logging.INFO, logger="jax_specsel.sharding"):
    specs = sharding.param_specs(config, (1, 4))
  assert specs[("layers", 0, "self_attn", "q_proj", "kernel")] == P(None, "model")
  assert specs[("layers", 0, "self_attn", "k_proj", "kernel")] == P()  # GQA with 1 kv head
  assert specs[("layers", 0, "mlp", "up_proj", "kernel")] == P(None, "model")
  # A vocabulary of 30 does not split 4 ways: the embedding falls back to d_model.
  assert specs[("embed_tokens", "embedding")] == P(None, "model")
  assert specs[("lm_head", "kernel")] == P("model", None)
  assert "k_proj/kernel (16, 4) is replicated" in caplog.text
  assert all(s == P() for s in sharding.param_specs(config, (4, 1)).values())  # pure data parallel
  assert sharding.cache_spec((4, 9, 2, 8), {"data": 2, "model": 2}) == P(
      "data", None, "model", None
  )
  assert sharding.batch_spec((3, 7), {"data": 2, "model": 1}) == P()  # 3 rows on 2 replicas


def test_untied_t5_input_tables_are_vocab_parallel():
  import dataclasses

  untied = dataclasses.replace(
      FLAN_T5_XXL, separate_encoder_embeddings=True, separate_decoder_embeddings=True
  )
  specs = sharding.param_specs(untied, (1, 8))
  assert (
      specs[("encoder", "embed_tokens")] == specs[("decoder", "embed_tokens")] == P("model", None)
  )
  assert ("shared",) not in specs  # every stack and the LM head have their own table
  full = memory.estimate_memory(untied, (1, 1), batch=1, cache_length=137)
  assert full["num_params"] == 11_135_332_352 + 32128 * 4096  # one more table than Flan-T5-XXL


def test_mesh_errors_on_this_process():
  import jax

  devices = jax.device_count()
  with pytest.raises(
      ValueError, match=f"needs data \\* model = 8 devices but {devices} are available"
  ):
    js.make_mesh(data=2, model=4)
  with pytest.raises(ValueError, match="must be >= 1"):
    js.make_mesh(data=0)
  with pytest.raises(ValueError, match="jax.sharding.Mesh"):
    js.load_model("/nonexistent", mesh=(1, 8))
  with pytest.raises(ValueError, match="expected \\(data, model\\)"):
    sharding.axis_sizes((1, 2, 4))
  with pytest.raises(ValueError, match="unknown mesh axes"):
    sharding.axis_sizes({"data": 1, "tensor": 8})


@pytest.mark.slow
def test_single_device_drafter_is_replicated_onto_the_target_mesh(sharded_run):
  """8 devices: target on data 2 x model 4, drafter loaded on one device."""
  result, stderr = sharded_run
  run = result["unsharded_drafter"]
  assert run["equal"], "sharded target + unsharded drafter differs from the unsharded pair"
  assert run["replica_mesh"] == {"data": 2, "model": 4} and run["replica_cached"]
  assert run["drafter_still_on_one_device"]
  assert stderr.count("replicating drafter small_drafter") == 1  # two generate calls, one copy
  assert "a drafter on one device is replicated onto the target's mesh" in run["other_mesh_error"]
  assert (
      "on mesh {'data': 1, 'model': 8} but target llama on {'data': 2, 'model': 4}"
      in run["other_mesh_error"]
  )


def test_generate_replicates_a_single_device_drafter_and_refuses_other_meshes():
  mesh = js.make_mesh(data=1, model=1)
  target = js.shard_model(fake_model(0), mesh)  # no rules for the fake model: replicated
  assert target.mesh is mesh and "mesh=" in repr(target)
  drafter = fake_model(1)
  expected = js.generate(fake_model(0), [[3, 4]], drafter=drafter, max_new_tokens=6)
  placed = js.generate(target, [[3, 4]], drafter=drafter, max_new_tokens=6)
  np.testing.assert_array_equal(placed.tokens, expected.tokens)
  with pytest.raises(ValueError, match="is on mesh .*'model': 1.* but target fake on one device"):
    js.generate(fake_model(0), [[3, 4]], drafter=js.shard_model(drafter, mesh), max_new_tokens=2)


def test_flan_t5_xxl_estimate():
  """The Table 1 target: 11.14B parameters, bfloat16; exact parameter bytes per device."""
  full = memory.estimate_memory(FLAN_T5_XXL, (1, 1), batch=1, cache_length=137, source_length=512)
  assert full["num_params"] == 11_135_332_352 and full["params"] == 2 * 11_135_332_352
  tensor_parallel = memory.estimate_memory(
      FLAN_T5_XXL, (1, 8), batch=1, cache_length=137, source_length=512
  )
  norms = (2 * 24 + 3 * 24 + 2) * 4096 * 2 + 2 * 32 * 64 * 2  # replicated scales and bias tables
  assert tensor_parallel["params"] == (full["params"] - norms) // 8 + norms
  assert tensor_parallel["caches"] == full["caches"] // 8  # 64 heads split 8 ways
  assert 0 < tensor_parallel["activations"] < full["activations"]
  data_parallel = memory.estimate_memory(
      FLAN_T5_XXL, (8, 1), batch=32, cache_length=137, source_length=512
  )
  assert data_parallel["params"] == full["params"]
  with pytest.raises(ValueError, match="dtype='int8' is not supported"):
    memory.estimate_memory(FLAN_T5_XXL, (1, 8), 1, 137, "int8")
  with pytest.raises(ValueError, match="must be >= 1"):
    memory.estimate_memory(FLAN_T5_XXL, (1, 8), 0, 137)


def test_collect_launch_estimates_memory_from_config_json_alone(tmp_path):
  target = tmp_path / "target"
  target.mkdir()  # config.json only: loading it would fail, estimating must not
  (target / "config.json").write_text(
      json.dumps(
          {
              "model_type": "llama",
              "vocab_size": 256,
              "hidden_size": 64,
              "intermediate_size": 128,
              "num_hidden_layers": 2,
              "num_attention_heads": 8,
              "num_key_value_heads": 8,
          }
      )
  )
  config_file = tmp_path / "config.py"
  config_file.write_text(textwrap.dedent(f"""
      import ml_collections
      def get_config():
        return ml_collections.ConfigDict(dict(
            target={str(target)!r}, dtype="bfloat16", drafters={{"exit": "early_exit:1"}},
            max_new_tokens=16, gamma=3, collect_batch_size=8))
      """))
  completed = subprocess.run(
      [
          sys.executable,
          os.path.join(ROOT, "launch", "collect.py"),
          f"--config={config_file}",
          "--mesh=2x4",
          "--estimate_memory",
          "--prompt_length=32",
      ],
      env=_env(),
      capture_output=True,
      text=True,
      timeout=300,
  )
  assert completed.returncode == 0, completed.stderr[-3000:]
  assert (
      "GiB/device on mesh data=2 x model=4 (bfloat16, batch 8, cache 53, source 32)"
      in completed.stdout
  )
