"""Models and data from an experiment config (configs/*.py): the launches' shared set-up.

Config fields read here (see configs/paper_t5_table1.py for a documented example):
  target, dtype                 checkpoint directory or hub id of the target, and its dtype
  drafters                      {name: checkpoint or "early_exit:K"} (K layers of the target)
  tasks                         task names (jax_specsel.data.tasks registry)
  data_files                    {task: local file} overriding the hub dataset (optional)
  train_split, test_split       split names; train_per_task / test_per_task: examples per task
  mesh                          optional "DATAxMODEL" device mesh (launch flag --mesh overrides)
"""

from __future__ import annotations

import datasets
import ml_collections

from jax_specsel import sharding
from jax_specsel.data import loaders
from jax_specsel.models.interface import Model
from jax_specsel.models.loading import load_model

EARLY_EXIT = "early_exit:"


def mesh_shape(config: ml_collections.ConfigDict, override: str | None = None) -> tuple[int, int] | None:
  """(data, model) from `override` or the config's optional `mesh` field ("2x4"); None: one device.

  Raises:
    ValueError: the text is not of the form DATAxMODEL.
  """
  text = override if override is not None else config.get("mesh", "")
  if not text:
    return None
  try:
    data, model = (int(part) for part in str(text).lower().split("x"))
  except ValueError:
    raise ValueError(f"mesh={text!r}: expected DATAxMODEL, e.g. 1x8 or 2x4.") from None
  return data, model


def load_models(config: ml_collections.ConfigDict, mesh=None) -> tuple[Model, dict[str, Model]]:
  """(target, {name: drafter}) as the config names them.

  With a `mesh` (jax_specsel.make_mesh) the target is loaded tensor-parallel straight into its
  shards; separate drafters are small, so they are replicated on every device (no collective per
  draft step), and early-exit drafters share the target's shards.
  """
  target = load_model(config.target, dtype=config.dtype, mesh=mesh)
  drafters = {}
  for name, source in config.drafters.items():
    if source.startswith(EARLY_EXIT):
      drafters[name] = target.early_exit(layers=int(source[len(EARLY_EXIT):]))
    else:
      drafters[name] = load_model(source, dtype=config.dtype, name=name)
      if mesh is not None:
        drafters[name] = sharding.shard_model(drafters[name], mesh, replicated=True)
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
