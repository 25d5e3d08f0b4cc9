"""Offline data collection (paper sec. 2.3): outputs of target and drafters, alignment, embeddings.

For every query: the target's greedy output, every drafter's greedy output (each drafter decoding
on its own), a sampled target output (scores the autoregressive option without trivially matching
the greedy one, paper sec. 3.2), and the target's query embedding. Scores are ROUGE-L F between each
candidate and the target's greedy output; the size costs and the alpha mix are applied at training
time (`reward_table`), so one collection serves every alpha.

The rows are stored in shards (`collection_store`). A collection killed at any point and restarted
redoes only the unfinished shards: every query exactly once. Two runs started on one directory
split the work: a writer skips a shard another one holds, does the others, then waits for the held
ones (taking one over if its writer died), so each query is collected once and both return the
whole table. Several processes of one run split the shards (process p takes p, p + P, ...;
bandit/distributed.py), so merging their work is just loading every shard.
"""

from __future__ import annotations

import dataclasses
import os
import zlib
from typing import Sequence

import datasets
import numpy as np
from tqdm.auto import tqdm

from jax_specsel import token_batches
from jax_specsel.bandit import collection_store as store
from jax_specsel.bandit import rewards as rewards_lib
from jax_specsel.decoding import generate
from jax_specsel.decoding.request import pad_prompts
from jax_specsel.decoding import AUTOREGRESSIVE
from jax_specsel.models.interface import Model, decode_text


@dataclasses.dataclass(frozen=True)
class CollectConfig:
  """How outputs are produced; stored with the collection and checked on resume."""

  max_new_tokens: int = 64
  batch_size: int = 16  # queries per generate call (the last batch is padded to this size)
  shard_size: int = 256  # queries per parquet shard (the unit of resumption)
  include_autoregressive: bool = True  # score the target's own sampled output as an option
  sample_temperature: float = 1.0
  seed: int = 0


def option_names(drafters: dict[str, Model], config: CollectConfig) -> list[str]:
  names = list(drafters)
  return names + [AUTOREGRESSIVE] if config.include_autoregressive else names


def collect(
    target: Model,
    drafters: dict[str, Model],
    examples: datasets.Dataset,
    output_dir: str,
    config: CollectConfig = CollectConfig(),
    progress: bool = True,
    *,
    process_index: int = 0,
    process_count: int = 1,
    wait_seconds: float = 3600.0,
) -> datasets.Dataset:
  """Runs (or resumes) a collection, or one process's part of it, and returns the table.

  Args:
    target: the target model (tokenizer attached).
    drafters: name -> drafter model; at least one.
    examples: a dataset with columns id, task, prompt, reference (see data.loaders.load_examples).
    output_dir: shard directory; created if missing, resumed if it holds the same collection
      (settings, models and queries); another collection writing it at the same time splits
      the shards with this one (see the module docstring).
    config: generation settings.
    progress: show a progress bar with rate and ETA.
    process_index, process_count: this process takes shards process_index, process_index +
      process_count, ... (see bandit/distributed.py). Process 0 writes collection.json; the others
      wait for it (up to `wait_seconds`) and check that they collect the same queries with the
      same settings.
    wait_seconds: how long a process other than 0 waits for collection.json.

  Returns:
    The collected dataset (one row per query, in example order). With process_count > 1 it holds
    the shards finished so far; `distributed.collect` waits for every process first.

  Raises:
    CollectionMismatchError: output_dir holds a collection of other settings, models or queries.
  """
  if not 0 <= process_index < process_count:
    raise ValueError(
        f"process_index={process_index} must be in [0, process_count={process_count})."
    )
  _check_inputs(target, drafters, examples)
  meta = _metadata(target, drafters, examples, config)
  if process_index == 0:
    store.prepare_dir(output_dir, meta)
  else:
    store.await_metadata(output_dir, meta, wait_seconds)
  num_shards = -(-len(examples) // config.shard_size)
  mine = list(range(process_index, num_shards, process_count))
  todo = [k for k in mine if not os.path.exists(store.shard_path(output_dir, k))]
  size = lambda shards: sum(len(_shard_range(k, config, len(examples))) for k in shards)
  bar = tqdm(
      total=size(mine),
      initial=size(mine) - size(todo),
      unit="query",
      disable=not progress,
      desc="collect" if process_count == 1 else f"collect {process_index}/{process_count}",
  )
  _collect_shards(target, drafters, examples, output_dir, todo, config, bar)
  bar.close()
  return store.load_collection(output_dir, allow_partial=process_count > 1)[0]


def _collect_shards(target, drafters, examples, output_dir, shards, config, bar) -> None:
  """Collects `shards`: first those no other writer holds, then waits for the held ones (or takes
  them over)."""
  held = []
  for shard in shards:
    if not _collect_shard(target, drafters, examples, output_dir, shard, config, bar, wait=False):
      held.append(shard)
  for shard in held:
    _collect_shard(target, drafters, examples, output_dir, shard, config, bar, wait=True)


def _collect_shard(target, drafters, examples, output_dir, shard, config, bar, wait: bool) -> bool:
  """Collects one shard under its lock; False when another writer holds it and `wait` is False."""
  indices = _shard_range(shard, config, len(examples))
  with store.shard_lock(output_dir, shard, wait) as locked:
    if not locked:
      return False
    if os.path.exists(store.shard_path(output_dir, shard)):  # another writer finished it meanwhile
      bar.update(len(indices))
    else:
      store.remove_stale_temporaries(store.shard_path(output_dir, shard))
      rows = collect_rows(target, drafters, examples.select(indices), config, bar)
      store.write_shard(output_dir, shard, rows)
    store.remove_lock(output_dir, shard)
  return True


def _shard_range(shard: int, config: CollectConfig, total: int) -> range:
  return range(shard * config.shard_size, min((shard + 1) * config.shard_size, total))


def _check_inputs(target, drafters, examples):
  if not drafters:
    raise ValueError("collect needs at least one drafter (name -> Model).")
  if target.tokenizer is None:
    raise ValueError(
        f"target {target.name} has no tokenizer: collection turns outputs into text for "
        "ROUGE-L; load a checkpoint directory with tokenizer files."
    )
  if len(examples) == 0:
    raise ValueError("empty dataset: there are no queries to collect.")
  missing = {"id", "task", "prompt"} - set(examples.column_names)
  if missing:
    raise ValueError(
        f"examples lack column(s) {sorted(missing)}; have {examples.column_names} "
        "(use jax_specsel.data.loaders.load_examples)."
    )


def _metadata(target, drafters, examples, config) -> dict:
  params = {name: int(model.num_params) for name, model in drafters.items()}
  if config.include_autoregressive:
    params[AUTOREGRESSIVE] = int(target.num_params)
  whole, per_shard = store.query_fingerprints(examples, config.shard_size)
  return {
      "target": target.name,
      "options": option_names(drafters, config),
      "param_counts": params,
      "num_queries": len(examples),
      "embedding_dim": int(target.hidden_size),
      "config": dataclasses.asdict(config),
      "queries_fingerprint": whole,
      "shard_fingerprints": per_shard,
  }


def collect_rows(target, drafters, examples, config, bar) -> list[dict]:
  """The rows of `examples` (one per query), in order, `config.batch_size` queries a batch."""
  rows = []
  for start in range(0, len(examples), config.batch_size):
    batch = examples.select(range(start, min(start + config.batch_size, len(examples))))
    rows.extend(_collect_batch(target, drafters, batch, config))
    bar.update(len(batch))
  return rows


def _collect_batch(target, drafters, batch, config) -> list[dict]:
  prompt_ids = target.tokenizer(list(batch["prompt"]))["input_ids"]
  real = len(prompt_ids)
  prompt_ids = token_batches.filled_to(prompt_ids, config.batch_size)  # one compiled shape
  run = lambda model, **kw: decode_text(
      model, generate(model, prompt_ids, max_new_tokens=config.max_new_tokens, **kw)
  )[:real]
  target_text = run(target)
  outputs = {name: run(model) for name, model in drafters.items()}
  if config.include_autoregressive:
    # A stable per-batch seed (str hash() is salted per process): reruns give the same samples.
    seed = (config.seed + zlib.crc32(str(batch["id"][0]).encode())) % (2**31 - 1)
    outputs[AUTOREGRESSIVE] = run(target, temperature=config.sample_temperature, seed=seed)
  embeddings = embed_prompts(target, prompt_ids)[:real]
  scores = {name: rewards_lib.rouge_l(texts, target_text) for name, texts in outputs.items()}
  rows = []
  for i in range(real):
    row = {
        "id": str(batch["id"][i]),
        "task": batch["task"][i],
        "prompt": batch["prompt"][i],
        "reference": batch["reference"][i] if "reference" in batch.column_names else "",
        "embedding": embeddings[i].tolist(),
        "target_output": target_text[i],
    }
    for name in outputs:
      row[f"output/{name}"] = outputs[name][i]
      row[f"score/{name}"] = float(scores[name][i])
    rows.append(row)
  return rows


def embed_prompts(model: Model, prompt_ids: Sequence[Sequence[int]]) -> np.ndarray:
  """The policy's input for ragged prompts: [B, D] float32 (prompts padded to their bucket)."""
  ids, mask = pad_prompts(list(prompt_ids), None, model)
  return model.embed(ids, mask)


def reward_table(
    dataset: datasets.Dataset,
    meta: dict,
    alpha: float,
    cost_unit: float = 1e9,
    options: Sequence[str] | None = None,
) -> tuple[np.ndarray, np.ndarray, list[str]]:
  """(embeddings [N, D], rewards [N, K], option names): eq. 2 with the A.5 size costs.

  Args:
    dataset, meta: from `load_collection`.
    alpha: weight of alignment (eq. 2 taken literally; see rewards.mix_rewards).
    cost_unit: parameter-count unit of the A.5 cost (1e9: billions, as the paper's sizes).
    options: a subset of the collected options (None: all), e.g. without autoregressive; not empty.
  """
  names = list(meta["options"] if options is None else options)
  if not names:
    raise ValueError(f"options is empty: choose at least two of {meta['options']} (or None: all).")
  unknown = set(names) - set(meta["options"])
  if unknown:
    raise ValueError(f"options {sorted(unknown)} were not collected; available: {meta['options']}.")
  missing = [f"score/{n}" for n in names if f"score/{n}" not in dataset.column_names]
  if missing:
    raise ValueError(
        f"the dataset lacks column(s) {missing}: pass the table load_collection "
        "returns with its metadata."
    )
  alignment = np.stack([np.asarray(dataset[f"score/{n}"], np.float32) for n in names], axis=1)
  costs = rewards_lib.size_costs([meta["param_counts"][n] for n in names], unit=cost_unit)
  embeddings = np.asarray(dataset["embedding"], np.float32)
  return embeddings, rewards_lib.mix_rewards(alignment, costs, alpha), names
