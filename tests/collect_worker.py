"""Child side of the concurrent-writers test in tests/test_collect.py (run under multiprocessing spawn).

Two independent collections started at once on one directory, with the same models and queries.
Each records the shards it wrote itself and the ids of the table it got back.
"""

from __future__ import annotations

import json
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

NUM_QUERIES = 12
SHARD_SIZE = 2


def examples(n: int = NUM_QUERIES, seed: int = 0):
  import datasets
  import numpy as np
  rng = np.random.default_rng(seed)
  return datasets.Dataset.from_list([
      {"id": f"q{i}", "task": "a" if i % 2 else "b",
       "prompt": " ".join(f"w{k}" for k in rng.integers(3, 12, size=1 + i % 4)), "reference": "w3"}
      for i in range(n)])


def run(output_dir: str, report_path: str, barrier) -> None:
  """One writer: collect into output_dir; write {"written": [...], "ids": [...]} to report_path."""
  from fake_models import fake_model_with_tokenizer
  from jax_specsel.bandit import collect as collect_lib
  target = fake_model_with_tokenizer(0, name="target")
  drafters = {"same": fake_model_with_tokenizer(0, name="same"),
              "other": fake_model_with_tokenizer(5, name="other")}
  config = collect_lib.CollectConfig(max_new_tokens=4, batch_size=2, shard_size=SHARD_SIZE)
  data = examples()
  collect_lib.collect(target, drafters, data.select(range(2)), report_path + ".warm", config,
                      progress=False)  # compile first: both writers then race on equal terms
  written, real_write, real_rows = [], collect_lib._write_shard, collect_lib._collect_rows

  def slow_rows(*args):
    time.sleep(0.3)  # a shard takes a while, as on real models: the writers overlap for sure
    return real_rows(*args)

  def recording_write(directory, shard, rows):
    real_write(directory, shard, rows)
    written.append(shard)

  collect_lib._collect_rows, collect_lib._write_shard = slow_rows, recording_write
  barrier.wait(timeout=300)
  table = collect_lib.collect(target, drafters, data, output_dir, config, progress=False)
  with open(report_path, "w") as f:
    json.dump({"written": written, "ids": list(table["id"])}, f)
