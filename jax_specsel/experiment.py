"""Models and data from an experiment config (configs/*.py): the launches' shared set-up.

Config fields read here (see configs/paper_t5_table1.py for a documented example):
  target, dtype                 checkpoint directory or hub id of the target, and its dtype
  drafters                      {name: checkpoint or "early_exit:K"} (K layers of the target)
  tasks                         task names (jax_specsel.data.tasks registry)
  data_files                    {task: local file} overriding the hub dataset (optional)
  train_split, test_split       split names; train_per_task / test_per_task: examples per task
  mesh                          optional "DATAxMODEL" device mesh (launch flag --mesh overrides)

Launch helpers: `require_config_flag` and `parse_flags` (for `app.run(main, flags_parser=...)`)
turn a missing --config or an unknown --config.x override into one clear line; `usage_errors`
turns the ValueErrors of the checks a launch runs before any work into absl usage errors.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys

import datasets
import ml_collections
from absl import app, flags

from jax_specsel import validation
from jax_specsel.bandit.collect import AUTOREGRESSIVE, CollectionMismatchError, IncompleteCollectionError
from jax_specsel.data import loaders, tasks
from jax_specsel.models.checkpoint import DTYPES
from jax_specsel.models.interface import Model, shard_model
from jax_specsel.models.loading import load_model

EARLY_EXIT = "early_exit:"
_MODEL_FIELDS = ("target", "dtype", "drafters", "tasks", "train_per_task", "test_per_task")


def require_config_flag(example: str, name: str = "config") -> None:
  """Makes `--config` required with a message naming an example (absl reports it at parse time)."""
  flags.register_validator(name, lambda value: value is not None,
                           message=f"--{name} is required: pass an experiment config file, e.g. "
                                   f"--{name}={example}")


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, but an unknown `--config.x` override exits with one clear line.

  ml_collections raises a bare AttributeError / KeyError from inside flag parsing for a field
  the (locked) config does not have.
  """
  try:
    return app.parse_flags_with_usage(argv)
  except (AttributeError, KeyError) as err:
    cause = err.__context__ if isinstance(err.__context__, KeyError) else err
    lines = str(cause.args[0] if cause.args else cause).strip("\"").split("\n")
    field = lines[0].strip("'\"")
    given = [arg.split("=", 1)[0] for arg in argv[1:] if re.match(r"^--?config\.", arg)]
    named = [arg for arg in given if field in arg.lstrip("-").split(".")[1:]] or given
    hint = " ".join(line.strip() for line in lines[1:])
    sys.stderr.write(f"FATAL Flags parsing error: {', '.join(named)}: the config has no field "
                     f"{field!r}. {hint + ' ' if hint else ''}Fix the name, or add the field to "
                     "the config file.\n")
    sys.exit(1)


@contextlib.contextmanager
def usage_errors():
  """Re-raises the checks' errors (bad config, unwritable path, missing or unfinished
  collection) as `app.UsageError`: absl prints the message without a traceback."""
  try:
    yield
  except (ValueError, TypeError, FileNotFoundError, IncompleteCollectionError) as err:
    raise app.UsageError(str(err)) from None


def check_config(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming the first bad model or data field (the pipeline's fields:
  `pipeline.check_config`).

  Args:
    config: an experiment config (configs/paper_*.py).
  """
  missing = [field for field in _MODEL_FIELDS if field not in config]
  if missing:
    raise ValueError(f"config lacks field(s) {missing}: see configs/paper_t5_table1.py.")
  if not isinstance(config.target, str) or not config.target:
    raise ValueError(f"config.target={config.target!r}: must be a checkpoint directory or hub id.")
  if config.dtype not in DTYPES:
    raise ValueError(f"config.dtype={config.dtype!r}: choose one of {sorted(DTYPES)}.")
  if not config.drafters:
    raise ValueError("config.drafters is empty: name at least one drafter {name: checkpoint}.")
  for name, source in config.drafters.items():
    if not isinstance(source, str) or not source:
      raise ValueError(f"config.drafters[{name!r}]={source!r}: must be a checkpoint or 'early_exit:K'.")
    if source.startswith(EARLY_EXIT):
      _early_exit_layers(name, source)
  if isinstance(config.tasks, str) or not config.tasks:
    raise ValueError(f"config.tasks={config.tasks!r}: must be a non-empty list of task names.")
  for task in config.tasks:
    try:
      tasks.get_task(task)
    except KeyError as err:
      raise ValueError(f"config.tasks: {err.args[0]}") from None
  for field in ("train_per_task", "test_per_task"):
    try:
      validation.integer(f"config.{field}", config[field], minimum=1)
    except TypeError as err:
      raise ValueError(str(err)) from None
  mesh_shape(config)


def check_collection(meta: dict, config: ml_collections.ConfigDict, directory: str) -> None:
  """Refuses a collection whose target or drafters (collection.json) differ from the config's.

  The collection records the target's name (`load_model`'s label: the last path component of
  config.target) and the drafters' names (the keys of config.drafters).

  Raises:
    CollectionMismatchError: naming both sides and the fix.
  """
  target = os.path.basename(os.path.normpath(str(config.target)))
  collected = [name for name in meta["options"] if name != AUTOREGRESSIVE]
  problems = []
  if meta.get("target") != target:
    problems.append(f"target {meta.get('target')!r}, not config.target={config.target!r} "
                    f"(named {target!r})")
  if sorted(collected) != sorted(config.drafters):
    problems.append(f"drafters {sorted(collected)}, not config.drafters {sorted(config.drafters)}")
  if problems:
    raise CollectionMismatchError(
        f"{directory} was collected with {' and '.join(problems)}: a policy trained on it would "
        "choose among other models than this config runs. Pass the config the collection was made "
        "with, or collect again into another config.output_dir.")


def _early_exit_layers(name: str, source: str) -> int:
  try:
    return validation.integer(f"config.drafters[{name!r}] layers",
                              int(source[len(EARLY_EXIT):]), minimum=1)
  except ValueError:
    raise ValueError(f"config.drafters[{name!r}]={source!r}: write early_exit:K with K >= 1 "
                     "layers of the target.") from None


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
        drafters[name] = shard_model(drafters[name], mesh, replicated=True)
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
