"""Offline collection split over processes (hosts) on JAX's distributed runtime.

The collection (collect.py) is already cut into fixed query ranges, one parquet shard each, written
atomically. After `jax.distributed.initialize`, process p of P takes shards p, p + P, p + 2P, ...
and decodes them on its own local devices (its own mesh: tensor-parallel and/or batch-parallel
over `jax.local_devices()`). No process needs another's arrays, so nothing crosses hosts but one
barrier at the end; merging is `collection_store.load_collection(output_dir)`, nothing lost or
duplicated.

  Process 0 writes collection.json; the others wait for it and check they were given the same
    models, settings and queries (a fingerprint of ids and prompts): different ones would mix
    incompatible rows. Each shard is written under its own lock to a name unique to its writer,
    so a second run started on the same directory splits the work instead of colliding.
  Restart after a failure with any process count: each process redoes only the missing shards it
    now owns, so every query is still collected exactly once.
  output_dir must be a file system every process sees (NFS, a GCS FUSE mount, a local disk when
    all processes run on one machine).

  # on each host (TPU pods, SLURM and GKE need no arguments: the runtime finds its peers)
  distributed.initialize()                        # or coordinator_address=..., num_processes=..., process_id=...
  mesh = jax_specsel.make_mesh(data=1, model=len(jax.local_devices()))
  target = jax_specsel.load_model(path, dtype="bfloat16", mesh=mesh)
  dataset = distributed.collect(target, drafters, examples, output_dir, config)
"""

from __future__ import annotations

import logging
import os

import datasets
import jax

from jax_specsel.bandit import collect as collect_lib
from jax_specsel.bandit import collection_store
from jax_specsel.models.interface import Model

log = logging.getLogger(__name__)


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    **kwargs,
) -> tuple[int, int]:
  """`jax.distributed.initialize`, once; returns (process_index, process_count).

  Args:
    coordinator_address: "host:port" of process 0 (None: detected on TPU pods, SLURM, GKE...).
    num_processes, process_id: this run's size and this process's rank (None: detected).
    **kwargs: passed on (local_device_ids, initialization_timeout, ...).

  Returns:
    (jax.process_index(), jax.process_count()).
  """
  if num_processes == 1 and coordinator_address is None:
    return 0, 1  # a single process needs no runtime
  if not jax.distributed.is_initialized():
    jax.distributed.initialize(
        coordinator_address=coordinator_address,
        num_processes=num_processes,
        process_id=process_id,
        **kwargs,
    )
  return jax.process_index(), jax.process_count()


def shards_of(process_index: int, process_count: int, num_shards: int) -> list[int]:
  """The shard numbers process `process_index` of `process_count` collects."""
  return list(range(process_index, num_shards, process_count))


def collect(
    target: Model,
    drafters: dict[str, Model],
    examples: datasets.Dataset,
    output_dir: str,
    config: collect_lib.CollectConfig = collect_lib.CollectConfig(),
    progress: bool = True,
) -> datasets.Dataset:
  """This process's shards of a collection, then (after every process is done) the whole table.

  Args:
    target, drafters, examples, config, progress: as in `collect.collect`; every process must
      pass the same examples and settings (checked against collection.json and its fingerprint
      of the queries).
    output_dir: the shared shard directory.

  Returns:
    The complete collected dataset, in query order, on every process.

  Raises:
    RuntimeError: after the barrier some shards are missing (a process failed to write them);
      rerun to collect only those.
  """
  index, count = jax.process_index(), jax.process_count()
  collect_lib.collect(
      target,
      drafters,
      examples,
      output_dir,
      config,
      progress,
      process_index=index,
      process_count=count,
  )
  if count > 1:
    from jax.experimental import multihost_utils
    # A barrier on the runtime (not polling the file system): it fails if a peer died.
    multihost_utils.sync_global_devices(f"jax_specsel collect {os.path.abspath(output_dir)}")
  num_shards = -(-len(examples) // config.shard_size)
  missing = [
      k for k in range(num_shards) if not os.path.exists(collection_store.shard_path(output_dir, k))
  ]
  if missing:
    owners = sorted({k % count for k in missing})
    raise RuntimeError(
        f"{output_dir}: shard(s) {missing[:5]} are missing after every process "
        f"finished (owned by process(es) {owners}); rerun to collect only those."
    )
  log.info(
      "process %d/%d: collection complete (%d shards) in %s", index, count, num_shards, output_dir
  )
  return collection_store.load_collection(output_dir)[0]
