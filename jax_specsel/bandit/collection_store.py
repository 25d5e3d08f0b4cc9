"""A collection on disk: parquet shards, their locks and collection.json, loaded and checked.

Storage: parquet shards `shard-NNNNN.parquet`, one per fixed range of queries, plus
`collection.json` (options, parameter counts, config, and a fingerprint of the queries: a sha256
of their ids and prompts, whole and per shard). Each shard is written to a temporary name unique
to its writer and renamed: a shard is either complete or absent. A restart with other settings,
models or queries (even as many) is refused, so one table never mixes two datasets;
`load_collection` checks every shard against its fingerprint and refuses an unfinished collection
unless asked (`allow_partial=True`).

Concurrent writers: a writer holds an exclusive lock (`fcntl.flock`) on `shard-NNNNN.lock` while it
collects that shard (`shard_lock`); the kernel releases a dead process's locks, so another writer
can take the shard over. On a file system without locks (a warning says so) two writers may both
collect a shard; the renames are atomic and carry the same queries, so the table still holds
every query exactly once.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import glob
import hashlib
import json
import logging
import os
import socket
import time
import uuid
from typing import Iterator, Sequence

import datasets
import numpy as np
import pyarrow.compute as pc

log = logging.getLogger(__name__)

_META = "collection.json"
_FINGERPRINTS = ("queries_fingerprint", "shard_fingerprints")  # meta keys describing the queries


class CollectionMismatchError(ValueError):
  """A directory holds a collection of other settings, models or queries than the ones given."""


class DamagedCollectionError(ValueError):
  """A shard or collection.json cannot be read, or holds values training cannot use."""


class IncompleteCollectionError(RuntimeError):
  """A collection has shards still missing (it was interrupted or is still running)."""


def query_fingerprints(examples, shard_size: int) -> tuple[str, list[str]]:
  """(fingerprint of all queries, one per shard): sha256 over the queries' (id, prompt) pairs.

  Args:
    examples: a dataset (or a dict of columns) with `id` and `prompt`.
    shard_size: queries per shard.

  Returns:
    Hex digests; the whole one hashes the per-shard ones, so one pass computes both.
  """
  ids, prompts = [str(i) for i in examples["id"]], list(examples["prompt"])
  per_shard = [
      _rows_fingerprint(ids[start : start + shard_size], prompts[start : start + shard_size])
      for start in range(0, len(ids), shard_size)
  ]
  return hashlib.sha256("".join(per_shard).encode()).hexdigest(), per_shard


def _rows_fingerprint(ids: Sequence[str], prompts: Sequence[str]) -> str:
  digest = hashlib.sha256()
  for query_id, prompt in zip(ids, prompts):
    digest.update(json.dumps([query_id, prompt]).encode() + b"\n")  # JSON: no ambiguous joins
  return digest.hexdigest()


def prepare_dir(output_dir: str, meta: dict) -> None:
  """Creates output_dir and its collection.json (`meta`), or checks the one there matches it.

  Raises:
    CollectionMismatchError: output_dir holds a collection of other settings, models or queries.
  """
  os.makedirs(output_dir, exist_ok=True)
  path = os.path.join(output_dir, _META)
  remove_stale_temporaries(path)
  if not os.path.exists(path):
    _create_json(path, meta)  # exclusive: of two runs starting together, one writes it
  _check_same(output_dir, meta)


def _create_json(path: str, payload: dict) -> None:
  """Writes `path` atomically unless it exists (a hard link cannot replace an existing file)."""
  temporary = _unique_temporary(path)
  with open(temporary, "w") as f:
    json.dump(payload, f, indent=2)
  try:
    os.link(temporary, path)
  except FileExistsError:
    pass  # another writer was first: _check_same compares its settings with ours
  except OSError:  # no hard links (some FUSE mounts): atomic, but the last writer wins
    os.replace(temporary, path)
  finally:
    _remove_quietly(temporary)


def _check_same(output_dir: str, meta: dict) -> None:
  """Refuses a directory whose collection has other settings, models or queries than `meta`."""
  existing = _read_meta(output_dir)
  settings = {k: v for k, v in meta.items() if k not in _FINGERPRINTS}
  if {k: v for k, v in existing.items() if k not in _FINGERPRINTS} != json.loads(
      json.dumps(settings)
  ):
    raise CollectionMismatchError(
        f"{output_dir} holds a collection made with other settings or models "
        f"({existing.get('options')}, {existing.get('config')}); resume only with the same ones, "
        "or pass a new output directory."
    )
  if "queries_fingerprint" not in existing:  # written before fingerprints: check shards by content
    _check_shards_hold(output_dir, meta)
    _write_json_atomically(os.path.join(output_dir, _META), meta)
  elif existing["queries_fingerprint"] != meta["queries_fingerprint"]:
    differing = [
        k
        for k, (a, b) in enumerate(zip(existing["shard_fingerprints"], meta["shard_fingerprints"]))
        if a != b
    ]
    raise CollectionMismatchError(
        f"{output_dir} holds a collection of other queries (the same count, {meta['num_queries']}, "
        f"but other ids or prompts, first in shard(s) {differing[:5]}): resuming would mix two "
        "datasets in one table. Pass the examples it was started with, or a new output directory."
    )


def _check_shards_hold(output_dir: str, meta: dict) -> None:
  """Every shard on disk holds the queries `meta` fingerprints (for collections without one)."""
  for shard, expected in enumerate(meta["shard_fingerprints"]):
    path = shard_path(output_dir, shard)
    if os.path.exists(path) and _shard_fingerprint(path) != expected:
      raise CollectionMismatchError(
          f"{path} holds other queries (ids or prompts) than shard {shard} of the examples given: "
          "resuming would mix two datasets. Pass the examples it was started with, or a new "
          "output directory."
      )


def _shard_fingerprint(path: str) -> str:
  import pyarrow.parquet as pq

  table = pq.read_table(path, columns=["id", "prompt"])
  return _rows_fingerprint(table.column("id").to_pylist(), table.column("prompt").to_pylist())


def _read_meta(output_dir: str) -> dict:
  path = os.path.join(output_dir, _META)
  try:
    with open(path) as f:
      return json.load(f)
  except json.JSONDecodeError as err:
    raise CollectionMismatchError(
        f"{path} is not valid JSON ({err}): the file was truncated or "
        "edited; restore it, or start the collection in a new "
        "directory."
    ) from None


def _write_json_atomically(path: str, payload: dict) -> None:
  temporary = _unique_temporary(path)
  with open(temporary, "w") as f:
    json.dump(payload, f, indent=2)
  os.replace(temporary, path)


def await_metadata(output_dir: str, meta: dict, wait_seconds: float) -> None:
  """Waits for process 0's collection.json (written atomically), then checks it matches ours."""
  path = os.path.join(output_dir, _META)
  deadline = time.monotonic() + wait_seconds
  while not os.path.exists(path):
    if time.monotonic() > deadline:
      raise TimeoutError(
          f"{path} did not appear within {wait_seconds:.0f}s: process 0 writes it; "
          "check that process 0 runs and that output_dir is on a file system every "
          "process shares."
      )
    time.sleep(0.2)
  _check_same(output_dir, meta)


def shard_path(output_dir: str, shard: int) -> str:
  """The parquet file of shard number `shard`."""
  return os.path.join(output_dir, f"shard-{shard:05d}.parquet")


def _lock_path(output_dir: str, shard: int) -> str:
  return os.path.join(output_dir, f"shard-{shard:05d}.lock")


def _unique_temporary(path: str) -> str:
  """A temporary name no other writer uses (host, pid, random): renames never collide."""
  return f"{path}.tmp-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def write_shard(output_dir: str, shard: int, rows: list[dict]) -> None:
  """Writes a shard's rows under a temporary name, then renames it into place."""
  path = shard_path(output_dir, shard)
  temporary = _unique_temporary(path)
  try:
    datasets.Dataset.from_list(rows).to_parquet(temporary)
    os.replace(temporary, path)  # atomic: a shard is either complete or absent
  finally:
    _remove_quietly(temporary)


def remove_lock(output_dir: str, shard: int) -> None:
  """Removes a finished shard's lock file (safe while others wait on it: whoever gets the lock
  next sees the shard and skips it)."""
  _remove_quietly(_lock_path(output_dir, shard))


def _remove_quietly(path: str) -> None:
  with contextlib.suppress(FileNotFoundError):
    os.remove(path)


_LOCKS_UNSUPPORTED_WARNED = []


@contextlib.contextmanager
def shard_lock(output_dir: str, shard: int, wait: bool) -> Iterator[bool]:
  """Holds the shard's exclusive lock; yields False if another writer holds it and not `wait`.

  flock locks die with their process (even on SIGKILL), so a crashed writer never leaves a
  shard claimed forever. Where the file system has no locks, yields True with a warning.
  """
  fd = os.open(_lock_path(output_dir, shard), os.O_RDWR | os.O_CREAT, 0o644)
  try:
    try:
      fcntl.flock(fd, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      yield False
      return
    except OSError as err:
      if err.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
        raise
      if not _LOCKS_UNSUPPORTED_WARNED:
        _LOCKS_UNSUPPORTED_WARNED.append(True)
        log.warning(
            "%s: the file system has no locks (%s): concurrent collections into it may "
            "collect a shard twice (never mixing rows)",
            output_dir,
            err.strerror,
        )
    os.ftruncate(fd, 0)
    os.write(fd, f"{socket.gethostname()} {os.getpid()}\n".encode())  # who holds it, for humans
    yield True
  finally:
    os.close(fd)  # releases the lock


def remove_stale_temporaries(path: str) -> None:
  """Removes the temporaries of `path` (a shard or collection.json) that dead writers on this
  host left (a SIGKILL leaves them)."""
  host = socket.gethostname()
  for temporary in glob.glob(glob.escape(path) + ".tmp*"):
    owner = temporary.rsplit(".tmp", 1)[1].lstrip("-").rsplit("-", 2)
    if owner == [""] or (len(owner) == 3 and owner[0] == host and not _alive(owner[1])):
      _remove_quietly(temporary)  # [""]: the fixed ".tmp" name of earlier versions


def _alive(pid: str) -> bool:
  try:
    os.kill(int(pid), 0)
  except ProcessLookupError:
    return False
  except (ValueError, PermissionError):
    return True  # not a pid we can judge, or another user's live process
  return True


def load_collection(output_dir: str, allow_partial: bool = False) -> tuple[datasets.Dataset, dict]:
  """(dataset in query order, metadata) of a collection, every shard checked against its queries.

  Args:
    output_dir: the collection directory.
    allow_partial: accept an unfinished collection (the shards that exist); the metadata then
      says so (`complete` False, `missing_shards`, `collected_queries`).

  Returns:
    The rows and collection.json's metadata plus `complete`, `collected_queries` and
    `missing_shards` (file names).

  Raises:
    FileNotFoundError: not a collection directory, or no shard finished yet.
    IncompleteCollectionError: shards are missing and allow_partial is False.
    CollectionMismatchError: a shard holds other queries than collection.json records.
    DamagedCollectionError: a shard cannot be read or holds unusable values (a missing or
      non-finite score, embeddings of another width or non-finite), or collection.json is
      inconsistent; the message names the file, the column and the fix.
  """
  meta_path = os.path.join(output_dir, _META)
  if not os.path.exists(meta_path):
    raise FileNotFoundError(
        f"{meta_path} is missing: {output_dir} is not a collection directory "
        "(run launch/collect.py first)."
    )
  meta = _read_meta(output_dir)
  num_shards = -(-meta["num_queries"] // meta["config"]["shard_size"])
  paths = [shard_path(output_dir, k) for k in range(num_shards)]
  present = [k for k, path in enumerate(paths) if os.path.exists(path)]
  missing = [os.path.basename(paths[k]) for k in range(num_shards) if k not in set(present)]
  if not present:
    raise FileNotFoundError(f"{output_dir} has no finished shard yet.")
  if missing and not allow_partial:
    raise IncompleteCollectionError(
        f"{output_dir} is an unfinished collection: {len(missing)} of {num_shards} shards are "
        f"missing ({', '.join(missing[:5])}{', ...' if len(missing) > 5 else ''}). Rerun the "
        "collection (it resumes only the missing shards), or allow a partial one "
        "(allow_partial=True, --allow_partial_collection); the report then says so."
    )
  _check_meta(meta_path, meta)
  parts = [_read_shard(paths[k]) for k in present]
  for k, part in zip(present, parts):
    _check_shard(paths[k], k, part, meta)
    _check_shard_values(paths[k], part, meta)
  dataset = datasets.concatenate_datasets(parts)
  meta.update(complete=not missing, collected_queries=len(dataset), missing_shards=missing)
  return dataset, meta


_REDO_SHARD = "delete it and rerun the collection (it redoes only the missing shards)"


def _read_shard(path: str) -> datasets.Dataset:
  try:
    return datasets.Dataset.from_parquet(path)
  except Exception as err:  # pyarrow and datasets raise many classes for a damaged file
    detail = str(err).splitlines()[0][:200] if str(err) else ""
    raise DamagedCollectionError(
        f"{path} cannot be read ({type(err).__name__}: {detail}): the "
        f"shard was truncated or damaged; re-collect it: {_REDO_SHARD}."
    ) from None


def _check_meta(path: str, meta: dict) -> None:
  """collection.json's options, sizes and width are usable (a hand edit can break them)."""
  options, counts = meta.get("options"), meta.get("param_counts") or {}
  problem = None
  if not isinstance(options, list) or len(set(map(str, options))) != len(options) or not options:
    problem = f"options={options!r} must be a non-empty list of distinct names"
  elif any(name not in counts for name in options):
    problem = (
        f"param_counts has no entry for {[n for n in options if n not in counts]} of "
        f"options {options}"
    )
  elif type(meta.get("embedding_dim")) is not int or meta["embedding_dim"] < 1:
    problem = f"embedding_dim={meta.get('embedding_dim')!r} must be a positive integer"
  if problem:
    raise DamagedCollectionError(
        f"{path}: {problem}; the file was edited or damaged: restore it "
        "(the collection writes it once, at its start)."
    )


def _check_shard_values(path: str, part: datasets.Dataset, meta: dict) -> None:
  """Every option's score column is present and finite; embeddings are finite, of the recorded
  width (raised here, naming the shard and column, rather than deep inside training)."""
  table = part.data
  for option in meta["options"]:
    column = f"score/{option}"
    if column not in part.column_names:
      have = [c.removeprefix("score/") for c in part.column_names if c.startswith("score/")]
      raise DamagedCollectionError(
          f"{path} has no column {column!r}: collection.json lists option {option!r}, the shard "
          f"scores {have}; an option was renamed in one of them. Rename it back, or {_REDO_SHARD}."
      )
    scores = table.column(column).to_numpy(zero_copy_only=False).astype(np.float64)
    _refuse_non_finite(path, column, np.nonzero(~np.isfinite(scores))[0])
  embeddings = table.column("embedding").combine_chunks()
  widths = pc.list_value_length(embeddings).to_numpy(zero_copy_only=False)
  wrong = np.nonzero(widths != meta["embedding_dim"])[0]
  if wrong.size:
    raise DamagedCollectionError(
        f"{path}, column 'embedding': rows {wrong[:5].tolist()} have width(s) "
        f"{sorted(set(widths[wrong].tolist()))[:5]}, but collection.json records embedding_dim="
        f"{meta['embedding_dim']} (the target's width); the shard or collection.json was edited or "
        f"comes from another target. Restore collection.json, or {_REDO_SHARD}."
    )
  values = pc.list_flatten(embeddings).to_numpy(zero_copy_only=False).astype(np.float64)
  rows = np.unique(np.nonzero(~np.isfinite(values.reshape(-1, meta["embedding_dim"])))[0])
  _refuse_non_finite(path, "embedding", rows)


def _refuse_non_finite(path: str, column: str, rows: np.ndarray) -> None:
  if rows.size:
    raise DamagedCollectionError(
        f"{path}, column {column!r}: rows {rows[:5].tolist()} ({rows.size} in all) hold NaN/inf "
        f"(or are empty); training cannot use them. Re-collect the shard: {_REDO_SHARD}."
    )


def _check_shard(path: str, shard: int, part: datasets.Dataset, meta: dict) -> None:
  """Refuses a shard whose queries differ from the ones collection.json fingerprints."""
  fingerprints = meta.get("shard_fingerprints")
  if fingerprints is None:
    return  # written before fingerprints existed
  if _rows_fingerprint([str(i) for i in part["id"]], part["prompt"]) != fingerprints[shard]:
    raise CollectionMismatchError(
        f"{path} holds other queries (ids or prompts) than collection.json records for shard "
        f"{shard}: it comes from another collection. Delete it and rerun the collection to "
        "redo that shard."
    )
