"""Offline data collection (paper sec. 2.3): outputs of target and drafters, alignment, embeddings.

For every query: the target's greedy output, every drafter's greedy output (each drafter decoding
on its own), a sampled target output (scores the autoregressive option without trivially matching
the greedy one, paper sec. 3.2), and the target's query embedding. Scores are ROUGE-L F between each
candidate and the target's greedy output; the size costs and the alpha mix are applied at training
time (`reward_table`), so one collection serves every alpha.

Storage: parquet shards `shard-NNNNN.parquet`, one per fixed range of queries, each written to a
temporary name and renamed, plus `collection.json` (options, parameter counts, config). A collection
killed at any point and restarted redoes only the unfinished shards: every query exactly once.
Several processes split the shards (process p takes p, p + P, ...; bandit/distributed.py), so
merging their work is just loading every shard.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import time
import zlib
from typing import Sequence

import datasets
import numpy as np
from tqdm.auto import tqdm

from jax_specsel.bandit import rewards as rewards_lib
from jax_specsel.decoding import generate
from jax_specsel.decoding.generate import pad_prompts
from jax_specsel.models.interface import Model

AUTOREGRESSIVE = "autoregressive"
_META = "collection.json"


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


def collect(target: Model, drafters: dict[str, Model], examples: datasets.Dataset, output_dir: str,
            config: CollectConfig = CollectConfig(), progress: bool = True, *,
            process_index: int = 0, process_count: int = 1,
            wait_seconds: float = 3600.0) -> datasets.Dataset:
  """Runs (or resumes) a collection, or one process's part of it, and returns the table.

  Args:
    target: the target model (tokenizer attached).
    drafters: name -> drafter model; at least one.
    examples: a dataset with columns id, task, prompt, reference (see data.loaders.load_examples).
    output_dir: shard directory; created if missing, resumed if it holds the same collection.
    config: generation settings.
    progress: show a progress bar with rate and ETA.
    process_index, process_count: this process takes shards process_index, process_index +
      process_count, ... (see bandit/distributed.py). Process 0 writes collection.json; the others
      wait for it (up to `wait_seconds`) and check that they collect with the same settings.
    wait_seconds: how long a process other than 0 waits for collection.json.

  Returns:
    The collected dataset (one row per query, in example order). With process_count > 1 it holds
    the shards finished so far; `distributed.collect` waits for every process first.
  """
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} must be in [0, process_count={process_count}).")
  _check_inputs(target, drafters, examples)
  meta = _metadata(target, drafters, examples, config)
  if process_index == 0:
    _prepare_dir(output_dir, meta)
  else:
    _await_metadata(output_dir, meta, wait_seconds)
  num_shards = -(-len(examples) // config.shard_size)
  todo = [k for k in range(process_index, num_shards, process_count)
          if not os.path.exists(_shard_path(output_dir, k))]
  remaining = sum(len(_shard_range(k, config, len(examples))) for k in todo)
  mine = sum(len(_shard_range(k, config, len(examples)))
             for k in range(process_index, num_shards, process_count))
  bar = tqdm(total=mine, initial=mine - remaining, unit="query", disable=not progress,
             desc="collect" if process_count == 1 else f"collect {process_index}/{process_count}")
  for shard in todo:
    indices = _shard_range(shard, config, len(examples))
    rows = _collect_rows(target, drafters, examples.select(indices), config, bar)
    _write_shard(output_dir, shard, rows)
  bar.close()
  return load_collection(output_dir)[0]


def _check_inputs(target, drafters, examples):
  if not drafters:
    raise ValueError("collect needs at least one drafter (name -> Model).")
  if target.tokenizer is None:
    raise ValueError(f"target {target.name} has no tokenizer: collection turns outputs into text for "
                     "ROUGE-L; load a checkpoint directory with tokenizer files.")
  if len(examples) == 0:
    raise ValueError("empty dataset: there are no queries to collect.")
  missing = {"id", "task", "prompt"} - set(examples.column_names)
  if missing:
    raise ValueError(f"examples lack column(s) {sorted(missing)}; have {examples.column_names} "
                     "(use jax_specsel.data.loaders.load_examples).")


def _metadata(target, drafters, examples, config) -> dict:
  params = {name: int(model.num_params) for name, model in drafters.items()}
  if config.include_autoregressive:
    params[AUTOREGRESSIVE] = int(target.num_params)
  return {"target": target.name, "options": option_names(drafters, config), "param_counts": params,
          "num_queries": len(examples), "embedding_dim": int(target.hidden_size),
          "config": dataclasses.asdict(config)}


def _prepare_dir(output_dir: str, meta: dict) -> None:
  os.makedirs(output_dir, exist_ok=True)
  path = os.path.join(output_dir, _META)
  if os.path.exists(path):
    _check_same(output_dir, meta)
    return
  with open(path + ".tmp", "w") as f:
    json.dump(meta, f, indent=2)
  os.replace(path + ".tmp", path)


def _check_same(output_dir: str, meta: dict) -> None:
  with open(os.path.join(output_dir, _META)) as f:
    existing = json.load(f)
  if existing != json.loads(json.dumps(meta)):
    raise ValueError(f"{output_dir} holds a collection made with other settings or models "
                     f"({existing.get('options')}, {existing.get('config')}); resume only with the "
                     "same ones, or pass a new output directory.")


def _await_metadata(output_dir: str, meta: dict, wait_seconds: float) -> None:
  """Waits for process 0's collection.json (written atomically), then checks it matches ours."""
  path = os.path.join(output_dir, _META)
  deadline = time.monotonic() + wait_seconds
  while not os.path.exists(path):
    if time.monotonic() > deadline:
      raise TimeoutError(f"{path} did not appear within {wait_seconds:.0f}s: process 0 writes it; "
                         "check that process 0 runs and that output_dir is on a file system every "
                         "process shares.")
    time.sleep(0.2)
  _check_same(output_dir, meta)


def _shard_range(shard: int, config: CollectConfig, total: int) -> range:
  return range(shard * config.shard_size, min((shard + 1) * config.shard_size, total))


def _shard_path(output_dir: str, shard: int) -> str:
  return os.path.join(output_dir, f"shard-{shard:05d}.parquet")


def _write_shard(output_dir: str, shard: int, rows: list[dict]) -> None:
  path = _shard_path(output_dir, shard)
  datasets.Dataset.from_list(rows).to_parquet(path + ".tmp")
  os.replace(path + ".tmp", path)  # atomic: a shard is either complete or absent


def _collect_rows(target, drafters, examples, config, bar) -> list[dict]:
  rows = []
  for start in range(0, len(examples), config.batch_size):
    batch = examples.select(range(start, min(start + config.batch_size, len(examples))))
    rows.extend(_collect_batch(target, drafters, batch, config))
    bar.update(len(batch))
  return rows


def _collect_batch(target, drafters, batch, config) -> list[dict]:
  prompt_ids = target.tokenizer(list(batch["prompt"]))["input_ids"]
  real = len(prompt_ids)
  prompt_ids = prompt_ids + [prompt_ids[0]] * (config.batch_size - real)  # one compiled shape
  run = lambda model, **kw: decode_text(model, generate(model, prompt_ids,
                                                        max_new_tokens=config.max_new_tokens, **kw))[:real]
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
    row = {"id": str(batch["id"][i]), "task": batch["task"][i], "prompt": batch["prompt"][i],
           "reference": batch["reference"][i] if "reference" in batch.column_names else "",
           "embedding": embeddings[i].tolist(), "target_output": target_text[i]}
    for name in outputs:
      row[f"output/{name}"] = outputs[name][i]
      row[f"score/{name}"] = float(scores[name][i])
    rows.append(row)
  return rows


def decode_text(model: Model, out) -> list[str]:
  """Generated ids -> text through the model's tokenizer (special tokens dropped)."""
  return model.tokenizer.batch_decode([row[:n] for row, n in zip(out.tokens.tolist(), out.lengths)],
                                      skip_special_tokens=True)


def embed_prompts(model: Model, prompt_ids: Sequence[Sequence[int]]) -> np.ndarray:
  """The policy's input for ragged prompts: [B, D] float32 (prompts padded to their bucket)."""
  ids, mask = pad_prompts(list(prompt_ids), None, model)
  return model.embed(ids, mask)


def load_collection(output_dir: str) -> tuple[datasets.Dataset, dict]:
  """(dataset in query order, metadata) of a finished or partial collection."""
  meta_path = os.path.join(output_dir, _META)
  if not os.path.exists(meta_path):
    raise FileNotFoundError(f"{meta_path} is missing: {output_dir} is not a collection directory "
                            "(run launch/collect.py first).")
  with open(meta_path) as f:
    meta = json.load(f)
  shards = sorted(glob.glob(os.path.join(output_dir, "shard-*.parquet")))
  if not shards:
    raise FileNotFoundError(f"{output_dir} has no finished shard yet.")
  return datasets.concatenate_datasets([datasets.Dataset.from_parquet(s) for s in shards]), meta


def reward_table(dataset: datasets.Dataset, meta: dict, alpha: float, cost_unit: float = 1e9,
                 options: Sequence[str] | None = None) -> tuple[np.ndarray, np.ndarray, list[str]]:
  """(embeddings [N, D], rewards [N, K], option names): eq. 2 with the A.5 size costs.

  Args:
    dataset, meta: from `load_collection`.
    alpha: weight of alignment (eq. 2 taken literally; see rewards.mix_rewards).
    cost_unit: parameter-count unit of the A.5 cost (1e9: billions, as the paper's sizes).
    options: a subset of the collected options (default all), e.g. without autoregressive.
  """
  names = list(options or meta["options"])
  unknown = set(names) - set(meta["options"])
  if unknown:
    raise ValueError(f"options {sorted(unknown)} were not collected; available: {meta['options']}.")
  alignment = np.stack([np.asarray(dataset[f"score/{n}"], np.float32) for n in names], axis=1)
  costs = rewards_lib.size_costs([meta["param_counts"][n] for n in names], unit=cost_unit)
  embeddings = np.asarray(dataset["embedding"], np.float32)
  return embeddings, rewards_lib.mix_rewards(alignment, costs, alpha), names
