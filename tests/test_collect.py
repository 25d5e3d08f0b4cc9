"""Offline collection: rows, scores, resumption exactly once, errors, and the reward table."""

from __future__ import annotations

import fcntl
import json
import multiprocessing
import os
import signal
import subprocess
import sys

import datasets
import numpy as np
import pytest

import collect_worker
from jax_specsel.bandit import collect as collect_lib
from jax_specsel.bandit import collection_store as store
from fake_models import fake_model_with_tokenizer

CONFIG = collect_lib.CollectConfig(max_new_tokens=6, batch_size=4, shard_size=5)


def _examples(n=12, seed=0):
  rng = np.random.default_rng(seed)
  rows = [
      {
          "id": f"q{i}",
          "task": "a" if i % 2 else "b",
          "prompt": " ".join(f"w{k}" for k in rng.integers(3, 12, size=1 + i % 4)),
          "reference": "w3",
      }
      for i in range(n)
  ]
  return datasets.Dataset.from_list(rows)


@pytest.fixture(scope="module")
def models():
  target = fake_model_with_tokenizer(0, name="target")
  return target, {
      "same": fake_model_with_tokenizer(0, name="same"),
      "other": fake_model_with_tokenizer(5, name="other"),
  }


def test_collect_writes_every_query_with_scores(models, tmp_path):
  target, drafters = models
  data = collect_lib.collect(target, drafters, _examples(), str(tmp_path), CONFIG, progress=False)
  assert data["id"] == [f"q{i}" for i in range(12)]
  assert len(list(tmp_path.glob("shard-*.parquet"))) == 3  # 12 queries, 5 per shard
  np.testing.assert_allclose(data["score/same"], 1.0)  # same weights: same greedy text
  assert 0.0 <= min(data["score/other"]) and max(data["score/other"]) <= 1.0
  assert np.mean(data["score/other"]) < 0.9
  assert np.asarray(data["embedding"]).shape == (12, target.hidden_size)
  _, meta = store.load_collection(str(tmp_path))
  assert meta["options"] == ["same", "other", "autoregressive"]
  assert meta["param_counts"]["autoregressive"] == target.num_params


def test_interrupted_collection_resumes_each_query_exactly_once(models, tmp_path, monkeypatch):
  target, drafters = models
  reference = collect_lib.collect(
      target, drafters, _examples(), str(tmp_path / "ref"), CONFIG, progress=False
  )
  real_write, calls = store.write_shard, []

  def crash_on_second_shard(output_dir, shard, rows):
    calls.append(shard)
    if len(calls) == 2:
      raise KeyboardInterrupt("killed")
    real_write(output_dir, shard, rows)

  monkeypatch.setattr(store, "write_shard", crash_on_second_shard)
  with pytest.raises(KeyboardInterrupt):
    collect_lib.collect(
        target, drafters, _examples(), str(tmp_path / "run"), CONFIG, progress=False
    )
  monkeypatch.setattr(store, "write_shard", real_write)
  assert len(list((tmp_path / "run").glob("shard-*.parquet"))) == 1
  resumed = collect_lib.collect(
      target, drafters, _examples(), str(tmp_path / "run"), CONFIG, progress=False
  )
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
    store.load_collection(str(tmp_path / "nothing"))


def test_reward_table_mixes_alignment_and_cost(models, tmp_path):
  target, drafters = models
  data = collect_lib.collect(target, drafters, _examples(), str(tmp_path), CONFIG, progress=False)
  _, meta = store.load_collection(str(tmp_path))
  embeddings, rewards, names = collect_lib.reward_table(
      data, meta, alpha=1.0, options=["same", "other"]
  )
  assert names == ["same", "other"] and rewards.shape == (12, 2) and embeddings.shape[0] == 12
  np.testing.assert_allclose(rewards[:, 0], 1.0)
  _, only_cost, _ = collect_lib.reward_table(data, meta, alpha=0.0, cost_unit=1.0)
  assert only_cost[:, -1].max() == 0.0  # autoregressive = the largest model: no speed bonus
  with pytest.raises(ValueError, match="not collected"):
    collect_lib.reward_table(data, meta, alpha=0.5, options=["missing"])


def _interrupted(models, examples, output_dir, monkeypatch, crash_at=2):
  """A collection killed while writing its `crash_at`-th shard (the earlier ones are on disk)."""
  target, drafters = models
  real_write, calls = store.write_shard, []

  def crash(directory, shard, rows):
    calls.append(shard)
    if len(calls) == crash_at:
      raise KeyboardInterrupt("killed")
    real_write(directory, shard, rows)

  monkeypatch.setattr(store, "write_shard", crash)
  with pytest.raises(KeyboardInterrupt):
    collect_lib.collect(target, drafters, examples, str(output_dir), CONFIG, progress=False)
  monkeypatch.setattr(store, "write_shard", real_write)


def test_resume_with_other_queries_of_the_same_count_is_refused(models, tmp_path, monkeypatch):
  target, drafters = models
  _interrupted(models, _examples(12, seed=0), tmp_path / "run", monkeypatch)
  other = _examples(12, seed=1)  # same ids and count, other prompts
  with pytest.raises(
      store.CollectionMismatchError,
      match=r"holds a collection of other queries \(the same count, 12, but other ids or "
      r"prompts, first in shard\(s\) \[0, 1, 2\]\): resuming would mix two datasets",
  ):
    collect_lib.collect(target, drafters, other, str(tmp_path / "run"), CONFIG, progress=False)
  # A finished collection is protected the same way (it used to return the old table silently).
  collect_lib.collect(
      target, drafters, _examples(12), str(tmp_path / "done"), CONFIG, progress=False
  )
  with pytest.raises(store.CollectionMismatchError, match="other queries"):
    collect_lib.collect(target, drafters, other, str(tmp_path / "done"), CONFIG, progress=False)
  meta = json.loads((tmp_path / "done" / "collection.json").read_text())
  assert len(meta["shard_fingerprints"]) == 3 and len(meta["queries_fingerprint"]) == 64


def test_shard_of_another_collection_is_refused_on_load(models, tmp_path):
  target, drafters = models
  for name, seed in (("a", 0), ("b", 1)):
    collect_lib.collect(
        target, drafters, _examples(12, seed), str(tmp_path / name), CONFIG, progress=False
    )
  (tmp_path / "a" / "shard-00001.parquet").write_bytes(
      (tmp_path / "b" / "shard-00001.parquet").read_bytes()
  )
  with pytest.raises(
      store.CollectionMismatchError,
      match=r"shard-00001.parquet holds other queries \(ids or prompts\) than collection.json "
      r"records for shard 1: .*Delete it and rerun the collection",
  ):
    store.load_collection(str(tmp_path / "a"))


def test_collection_without_fingerprints_resumes_and_gains_them(models, tmp_path, monkeypatch):
  target, drafters = models
  reference = collect_lib.collect(
      target, drafters, _examples(), str(tmp_path / "ref"), CONFIG, progress=False
  )
  _interrupted(models, _examples(), tmp_path / "old", monkeypatch)
  meta_path = tmp_path / "old" / "collection.json"
  meta = json.loads(meta_path.read_text())
  for key in ("queries_fingerprint", "shard_fingerprints"):
    del meta[key]  # as written before fingerprints existed
  meta_path.write_text(json.dumps(meta))
  with pytest.raises(
      store.CollectionMismatchError, match=r"shard-00000.parquet holds other queries"
  ):
    collect_lib.collect(
        target, drafters, _examples(12, seed=1), str(tmp_path / "old"), CONFIG, progress=False
    )
  resumed = collect_lib.collect(
      target, drafters, _examples(), str(tmp_path / "old"), CONFIG, progress=False
  )
  assert resumed["id"] == reference["id"]
  assert "queries_fingerprint" in json.loads(meta_path.read_text())


def test_unfinished_collection_is_refused_unless_allowed(models, tmp_path, monkeypatch):
  _interrupted(models, _examples(), tmp_path, monkeypatch)  # shard 0 of 3 written
  with pytest.raises(
      store.IncompleteCollectionError,
      match=r"unfinished collection: 2 of 3 shards are missing \(shard-00001.parquet, "
      r"shard-00002.parquet\). Rerun the collection",
  ):
    store.load_collection(str(tmp_path))
  data, meta = store.load_collection(str(tmp_path), allow_partial=True)
  assert data["id"] == [f"q{i}" for i in range(5)]
  assert (meta["complete"], meta["collected_queries"], meta["num_queries"]) == (False, 5, 12)
  assert meta["missing_shards"] == ["shard-00001.parquet", "shard-00002.parquet"]


@pytest.mark.slow  # two collector processes; CI runs it with the slow set
def test_two_writers_on_one_directory_split_the_work(tmp_path):
  context = multiprocessing.get_context("spawn")  # jax does not survive fork
  barrier = context.Barrier(2)
  reports = [str(tmp_path / f"writer{i}.json") for i in range(2)]
  workers = [
      context.Process(target=collect_worker.run, args=(str(tmp_path / "shared"), report, barrier))
      for report in reports
  ]
  for worker in workers:
    worker.start()
  for worker in workers:
    worker.join(timeout=600)
  assert [w.exitcode for w in workers] == [0, 0]
  results = [json.loads(open(report).read()) for report in reports]
  every_id = [f"q{i}" for i in range(collect_worker.NUM_QUERIES)]
  assert all(r["ids"] == every_id for r in results)  # both return the whole table, each query once
  written = results[0]["written"] + results[1]["written"]
  # Every shard written exactly once over both writers: no work done twice, no rename collision.
  assert sorted(written) == list(range(collect_worker.NUM_QUERIES // collect_worker.SHARD_SIZE))
  assert store.load_collection(str(tmp_path / "shared"))[0]["id"] == every_id
  leftovers = [
      p.name
      for p in (tmp_path / "shared").iterdir()
      if not p.name.endswith(".parquet") and p.name != "collection.json"
  ]
  assert leftovers == []


class _KillOnWait:
  """`fcntl` for the collector, except that a blocking flock (the collector starting to wait for
  a held shard) first kills the holder with SIGKILL: the kill comes exactly then, no timer."""

  def __init__(self, holder: subprocess.Popen):
    self.holder = holder

  def __getattr__(self, name):
    return getattr(fcntl, name)

  def flock(self, fd, operation):
    if not operation & fcntl.LOCK_NB:
      self.holder.kill()
    return fcntl.flock(fd, operation)


def test_shard_held_by_a_writer_that_dies_is_taken_over(models, tmp_path, monkeypatch):
  target, drafters = models
  tmp_path.mkdir(exist_ok=True)
  holder = subprocess.Popen(
      [
          sys.executable,
          "-c",
          "import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR | "
          "os.O_CREAT); fcntl.flock(fd, fcntl.LOCK_EX); print('held', flush=True); time.sleep(600)",
          str(tmp_path / "shard-00001.lock"),
      ],
      stdout=subprocess.PIPE,
      text=True,
  )
  assert holder.stdout.readline().strip() == "held"
  dead = subprocess.run(
      [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
  ).stdout.strip()
  import socket

  stale = tmp_path / f"shard-00001.parquet.tmp-{socket.gethostname()}-{dead}-0123abcd"
  stale.write_text("half a shard")
  real_write, holder_state = store.write_shard, {}

  def recording_write(directory, shard, rows):
    holder_state[shard] = holder.poll()  # None while the holder lives
    real_write(directory, shard, rows)

  monkeypatch.setattr(store, "write_shard", recording_write)
  monkeypatch.setattr(store, "fcntl", _KillOnWait(holder))
  data = collect_lib.collect(target, drafters, _examples(), str(tmp_path), CONFIG, progress=False)
  holder.wait()
  assert data["id"] == [f"q{i}" for i in range(12)]
  assert holder_state[0] is None and holder_state[2] is None  # the free shards went first
  assert holder_state[1] is not None  # shard 1 only after its holder died
  assert not stale.exists()


def _rewrite_shard(path, change):
  """Rewrites one parquet shard with `change(columns)` applied to its columns (a dict of lists)."""
  import pyarrow as pa
  import pyarrow.parquet as pq

  columns = pq.read_table(path).to_pydict()
  change(columns)
  pq.write_table(pa.table(columns), path)


def _set_row(column, row, value):
  def change(columns):
    columns[column][row] = value

  return change


def _rename_column(old, new):
  def change(columns):
    columns[new] = columns.pop(old)

  return change


@pytest.mark.parametrize(
    "damage,message",
    [
        (
            lambda path: path.write_bytes(path.read_bytes()[:200]),
            r"shard-00001.parquet cannot be read \(.*\): the shard was truncated or damaged; re-collect it: "
            r"delete it and rerun the collection \(it redoes only the missing shards\)",
        ),
        (
            lambda path: _rewrite_shard(path, _set_row("score/other", 2, float("nan"))),
            r"shard-00001.parquet, column 'score/other': rows \[2\] \(1 in all\) hold NaN/inf \(or are "
            r"empty\); training cannot use them. Re-collect the shard: delete it and rerun",
        ),
        (
            lambda path: _rewrite_shard(path, _set_row("embedding", 3, [0.5, 0.5])),
            r"shard-00001.parquet, column 'embedding': rows \[3\] have width\(s\) \[2\], but "
            r"collection.json records embedding_dim=\d+ \(the target's width\)",
        ),
        (
            lambda path: _rewrite_shard(path, _set_row("embedding", 0, [float("inf")] * 4)),
            r"shard-00001.parquet, column 'embedding': rows \[0\] \(1 in all\) hold NaN/inf",
        ),
        (
            lambda path: _rewrite_shard(path, _rename_column("score/other", "score/renamed")),
            r"shard-00001.parquet has no column 'score/other': collection.json lists option 'other', the "
            r"shard scores \['same', 'autoregressive', 'renamed'\]; an option was renamed in one of them",
        ),
    ],
)
def test_a_damaged_shard_is_named_with_the_fix_on_load(models, tmp_path, damage, message):
  target, drafters = models
  assert target.hidden_size == 4  # the inf row above is of the recorded width
  collect_lib.collect(target, drafters, _examples(), str(tmp_path), CONFIG, progress=False)
  damage(tmp_path / "shard-00001.parquet")
  with pytest.raises(store.DamagedCollectionError, match=message):
    store.load_collection(str(tmp_path))
  if "cannot be read" in message:  # the fix the message gives: delete the shard and resume
    (tmp_path / "shard-00001.parquet").unlink()
    data = collect_lib.collect(target, drafters, _examples(), str(tmp_path), CONFIG, progress=False)
    assert data["id"] == [f"q{i}" for i in range(12)]


@pytest.mark.parametrize(
    "field,value,message",
    [
        (
            "embedding_dim",
            7,
            r"shard-00000.parquet, column 'embedding': rows \[0, 1, 2, 3, 4\] have "
            r"width\(s\) \[4\], but collection.json records embedding_dim=7",
        ),
        (
            "options",
            ["same", "same", "autoregressive"],
            r"collection.json: options=\['same', 'same', 'autoregressive'\] must be a non-empty list of "
            r"distinct names; the file was edited or damaged",
        ),
        (
            "options",
            ["same", "renamed", "autoregressive"],
            r"collection.json: param_counts has no entry for \['renamed'\]",
        ),
    ],
)
def test_an_inconsistent_collection_json_is_refused_on_load(
    models, tmp_path, field, value, message
):
  target, drafters = models
  collect_lib.collect(target, drafters, _examples(), str(tmp_path), CONFIG, progress=False)
  meta_path = tmp_path / "collection.json"
  meta = json.loads(meta_path.read_text())
  meta[field] = value
  meta_path.write_text(json.dumps(meta))
  with pytest.raises(store.DamagedCollectionError, match=message):
    store.load_collection(str(tmp_path))


# The shard kill with the slow set: the metadata kill checks the same resume by default.
@pytest.mark.parametrize("point", [pytest.param("shard", marks=pytest.mark.slow), "meta"])
def test_a_collector_killed_while_writing_resumes_each_query_exactly_once(point, tmp_path):
  """A real collector process killed (SIGKILL) halfway through writing a shard or collection.json,
  then resumed: every query once, in order, and nothing of the killed writer left behind."""
  here = os.path.dirname(os.path.abspath(__file__))
  env = dict(
      os.environ,
      PYTHONPATH=os.pathsep.join([os.path.dirname(here), here, os.environ.get("PYTHONPATH", "")]),
  )
  env.pop("XLA_FLAGS", None)
  output_dir = tmp_path / "run"
  killed = subprocess.run(
      [sys.executable, os.path.join(here, "collect_worker.py"), str(output_dir), point],
      env=env,
      capture_output=True,
      text=True,
      timeout=300,
  )
  assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
  temporaries = [p.name for p in output_dir.iterdir() if ".tmp-" in p.name]
  assert len(temporaries) == 1, temporaries  # the half-written file the kill left
  finished = sorted(p.name for p in output_dir.glob("shard-*.parquet"))
  assert finished == (["shard-00000.parquet"] if point == "shard" else [])
  target, drafters = collect_worker.models()
  resumed = collect_lib.collect(
      target,
      drafters,
      collect_worker.examples(),
      str(output_dir),
      collect_worker.config(),
      progress=False,
  )
  every_id = [f"q{i}" for i in range(collect_worker.NUM_QUERIES)]
  assert resumed["id"] == every_id
  assert store.load_collection(str(output_dir))[0]["id"] == every_id
  leftovers = [
      p.name
      for p in output_dir.iterdir()
      if not p.name.endswith(".parquet") and p.name != "collection.json"
  ]
  assert leftovers == []
