"""Models and data from an experiment config (configs/*.py): the launches' shared set-up.

Config fields read here (see configs/paper_t5_table1.py for a documented example):
  target, dtype                 checkpoint directory or hub id of the target, and its dtype
  drafters                      {name: checkpoint or "early_exit:K"} (K layers of the target)
  tasks                         task names (jax_specsel.data.tasks registry)
  data_files                    {task: local file} overriding the hub dataset (optional)
  train_split, test_split       split names; train_per_task / test_per_task: examples per task
"""

from __future__ import annotations

import datasets
import ml_collections

from jax_specsel.data import loaders
from jax_specsel.models.interface import Model
from jax_specsel.models.loading import load_model

EARLY_EXIT = "early_exit:"


def load_models(config: ml_collections.ConfigDict) -> tuple[Model, dict[str, Model]]:
  """(target, {name: drafter}) as the config names them."""
  target = load_model(config.target, dtype=config.dtype)
  drafters = {}
  for name, source in config.drafters.items():
    if source.startswith(EARLY_EXIT):
      drafters[name] = target.early_exit(layers=int(source[len(EARLY_EXIT):]))
    else:
      drafters[name] = load_model(source, dtype=config.dtype, name=name)
  return target, drafters


def load_split(config: ml_collections.ConfigDict, split: str, per_task: int) -> datasets.Dataset:
  """Every configured task's examples of one split, `per_task` each (seeded subset), concatenated."""
  files = dict(config.get("data_files", {}) or {})
  parts = []
  for task in config.tasks:
    file = files.get(task) or None
    split_name = config.get(f"{split}_split", split)
    parts.append(loaders.load_examples(task, split=split_name, data_file=file, limit=per_task,
                                       seed=config.seed))
  return datasets.concatenate_datasets(parts)
