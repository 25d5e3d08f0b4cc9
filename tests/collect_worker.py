"""Child side of the collection tests in tests/test_collect.py that need other processes.

`run` (under multiprocessing spawn): two independent collections started at once on one
directory, with the same models and queries; each records the shards it wrote itself and the ids
of the table it got back.

`python collect_worker.py OUTPUT_DIR POINT`: a collection that kills itself with SIGKILL halfway
through writing a file (the half-written temporary stays, as after a real kill):
  shard  the second shard, before its rename into place
  meta   collection.json, before its link into place
"""

from __future__ import annotations

import json
import os
import signal
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
  return datasets.Dataset.from_list(
      [
          {
              "id": f"q{i}",
              "task": "a" if i % 2 else "b",
              "prompt": " ".join(f"w{k}" for k in rng.integers(3, 12, size=1 + i % 4)),
              "reference": "w3",
          }
          for i in range(n)
      ]
  )


def models():
  """(target, drafters) of every collection here: fake models with a word tokenizer."""
  from fake_models import fake_model_with_tokenizer

  target = fake_model_with_tokenizer(0, name="target")
  return target, {
      "same": fake_model_with_tokenizer(0, name="same"),
      "other": fake_model_with_tokenizer(5, name="other"),
  }


def config():
  from jax_specsel.bandit import collect as collect_lib

  return collect_lib.CollectConfig(max_new_tokens=4, batch_size=2, shard_size=SHARD_SIZE)


def run(output_dir: str, report_path: str, barrier) -> None:
  """One writer: collect into output_dir; write {"written": [...], "ids": [...]} to report_path."""
  from jax_specsel.bandit import collect as collect_lib
  from jax_specsel.bandit import collection_store

  target, drafters = models()
  config_ = config()
  data = examples()
  collect_lib.collect(
      target, drafters, data.select(range(2)), report_path + ".warm", config_, progress=False
  )  # compile first: both writers then race on equal terms
  written, real_write, real_rows = [], collection_store.write_shard, collect_lib.collect_rows

  def slow_rows(*args):
    time.sleep(0.3)  # a shard takes a while, as on real models: the writers overlap for sure
    return real_rows(*args)

  def recording_write(directory, shard, rows):
    real_write(directory, shard, rows)
    written.append(shard)

  collect_lib.collect_rows, collection_store.write_shard = slow_rows, recording_write
  barrier.wait(timeout=300)
  table = collect_lib.collect(target, drafters, data, output_dir, config_, progress=False)
  with open(report_path, "w") as f:
    json.dump({"written": written, "ids": list(table["id"])}, f)


def _die_half_written(path: str) -> None:
  """Leaves `path` (a finished temporary) half written, then dies as a killed process does."""
  with open(path, "r+b") as f:
    f.truncate(os.path.getsize(path) // 2)
  os.kill(os.getpid(), signal.SIGKILL)


def killed_collection(output_dir: str, point: str) -> None:
  """Collects into output_dir and dies at `point` (see the module docstring)."""
  from jax_specsel.bandit import collect as collect_lib

  real_replace, real_link = os.replace, os.link

  def watched_replace(src, dst, *args, **kwargs):
    if point == "shard" and os.path.basename(os.fspath(dst)) == "shard-00001.parquet":
      _die_half_written(os.fspath(src))
    return real_replace(src, dst, *args, **kwargs)

  def watched_link(src, dst, *args, **kwargs):
    if point == "meta" and os.path.basename(os.fspath(dst)) == "collection.json":
      _die_half_written(os.fspath(src))
    return real_link(src, dst, *args, **kwargs)

  os.replace, os.link = watched_replace, watched_link
  target, drafters = models()
  collect_lib.collect(target, drafters, examples(), output_dir, config(), progress=False)


if __name__ == "__main__":
  killed_collection(*sys.argv[1:])
