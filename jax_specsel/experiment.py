"""Models and data from an experiment config (configs/*.py): the launches' shared set-up.

Config fields read here (see configs/paper_t5_table1.py for a documented example):
  target, dtype                 checkpoint directory or hub id of the target, and its dtype
  drafters                      {name: checkpoint or "early_exit:K"} (K layers of the target)
  tasks                         task names (jax_specsel.data.tasks registry)
  data_files                    {task: local file} overriding the hub dataset (optional)
  data_dir                      a directory of <task>.jsonl (.json/.csv/.parquet) files for the
                                tasks data_files does not name (optional; "": the hub)
  train_split, test_split       split names; train_per_task / test_per_task: examples per task
  mesh                          optional "DATAxMODEL" device mesh (launch flag --mesh overrides)

Launch helpers: `require_config_flag` and `parse_flags` (for `app.run(main, flags_parser=...)`)
turn a bad flag, a missing or unloadable --config file or an unknown --config.x override into one
clear line; `usage_errors` does the same for the ValueErrors of the checks a launch runs before
any work (`config_checks.check_config` checks a config); `integer_flags` and `integer_list_flag`
check integer flags.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys

import datasets
import ml_collections
from absl import flags

from jax_specsel import cpu_backend, validation
from jax_specsel.bandit.collection_store import CollectionMismatchError, IncompleteCollectionError
from jax_specsel.data import loaders
from jax_specsel.decoding import AUTOREGRESSIVE
from jax_specsel.models.interface import Model, shard_model
from jax_specsel.models.loading import load_model

EARLY_EXIT = "early_exit:"  # a drafter source "early_exit:K": the first K layers of the target

_CONFIG_EXAMPLES = {}  # config flag name -> an example file, for the messages


def exit_with_usage_error(message: str) -> None:
  """Prints `message` as one line on stderr and exits with status 1 (no flag help, no traceback)."""
  text = " ".join(line.strip() for line in str(message).splitlines() if line.strip())
  sys.stderr.write(f"FATAL usage error: {text}\n")
  sys.exit(1)


def require_config_flag(example: str, name: str = "config") -> None:
  """Makes `--config` required with a message naming an example (absl reports it at parse time)."""
  _CONFIG_EXAMPLES[name] = example
  flags.register_validator(
      name,
      lambda value: value is not None,
      message=f"--{name} is required: pass an experiment config file, e.g. " f"--{name}={example}",
  )


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, but every error exits with one clear line; first, before any JAX work,
  the CPU backend's settings (`cpu_backend.prefer_eigen_dots`).

  Besides absl's own errors (a bad value, a missing required flag): ml_collections raises a bare
  AttributeError / KeyError from inside flag parsing for a field the (locked) config does not
  have, and defers a config file it cannot load to the first access of the config.
  """
  cpu_backend.prefer_eigen_dots()
  try:
    remaining = flags.FLAGS(argv)
  except flags.Error as err:
    exit_with_usage_error(f"Flags parsing error: {err} (--helpshort lists the flags)")
  except (AttributeError, KeyError) as err:
    cause = err.__context__ if isinstance(err.__context__, KeyError) else err
    lines = str(cause.args[0] if cause.args else cause).strip('"').split("\n")
    field = lines[0].strip("'\"")
    given = [arg.split("=", 1)[0] for arg in argv[1:] if re.match(r"^--?config\.", arg)]
    named = [arg for arg in given if field in arg.lstrip("-").split(".")[1:]] or given
    hint = " ".join(line.strip() for line in lines[1:])
    exit_with_usage_error(
        f"Flags parsing error: {', '.join(named)}: the config has no field "
        f"{field!r}. {hint + ' ' if hint else ''}Fix the name, or add the field "
        "to the config file."
    )
  _refuse_unloaded_configs()
  return remaining


def _refuse_unloaded_configs() -> None:
  """A config file that could not be loaded: one line naming the flag, the file and the cause."""
  for name in flags.FLAGS:
    value = flags.FLAGS[name].value
    if type(value).__name__ != "_ErrorConfig":  # ml_collections' stand-in for a failed load
      continue
    error = object.__getattribute__(value, "_error")
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    example = _CONFIG_EXAMPLES.get(name, "configs/paper_t5_table1.py")
    exit_with_usage_error(
        f"--{name}={flags.FLAGS[name].serialize().split('=', 1)[-1]}: cannot "
        f"load the config file ({lines[-1] if lines else error}); pass an "
        f"existing experiment config file, e.g. --{name}={example}"
    )


def integer_flags(*names: str, minimum: int = 1) -> None:
  """Raises ValueError for the first of the integer flags `names` below `minimum`."""
  for name in names:
    validation.integer(f"--{name}", flags.FLAGS[name].value, minimum=minimum)


def integer_list_flag(name: str, minimum: int = 1) -> list[int]:
  """The list flag `name` as ints (each >= minimum); ValueError naming the flag and the entry."""
  values = flags.FLAGS[name].value
  if not values:
    raise ValueError(f"--{name} is empty: give a comma-separated list of integers.")
  result = []
  for value in values:
    try:
      number = int(value)
    except ValueError:
      raise ValueError(
          f"--{name}={','.join(values)}: {value!r} is not an integer; give a "
          "comma-separated list of integers, e.g. 1,2,4."
      ) from None
    result.append(validation.integer(f"--{name} entry", number, minimum=minimum))
  return result


@contextlib.contextmanager
def usage_errors():
  """Turns the checks' errors (bad config, unwritable path, missing or unfinished collection)
  into one line on stderr and exit status 1 (`exit_with_usage_error`)."""
  try:
    yield
  except (ValueError, TypeError, FileNotFoundError, IncompleteCollectionError) as err:
    exit_with_usage_error(str(err))


def data_files(config: ml_collections.ConfigDict) -> dict[str, str | None]:
  """{task: local file or None (the hub)} from config.data_files and config.data_dir.

  Raises:
    ValueError: data_dir is not a directory, or lacks a file for a task data_files leaves open.
  """
  files = {
      task: (dict(config.get("data_files", {}) or {}).get(task) or None) for task in config.tasks
  }
  data_dir = config.get("data_dir", "") or ""
  if not data_dir:
    return files
  if not os.path.isdir(data_dir):
    raise ValueError(
        f"config.data_dir={data_dir!r} is not a directory: pass the directory of "
        "<task>.jsonl files, or '' to read the tasks from the hub."
    )
  for task in [task for task, file in files.items() if file is None]:
    files[task] = loaders.find_task_file(data_dir, task)
    if files[task] is None:
      raise ValueError(
          f"config.data_dir={data_dir!r} has no file for task {task!r}: add "
          f"{task}.jsonl (or .json/.csv/.parquet) there, or name it in "
          "config.data_files."
      )
  return files


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
    problems.append(
        f"target {meta.get('target')!r}, not config.target={config.target!r} " f"(named {target!r})"
    )
  if sorted(collected) != sorted(config.drafters):
    problems.append(f"drafters {sorted(collected)}, not config.drafters {sorted(config.drafters)}")
  if problems:
    raise CollectionMismatchError(
        f"{directory} was collected with {' and '.join(problems)}: a policy trained on it would "
        "choose among other models than this config runs. Pass the config the collection was made "
        "with, or collect again into another config.output_dir."
    )


def mesh_shape(
    config: ml_collections.ConfigDict, override: str | None = None
) -> tuple[int, int] | None:
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
      drafters[name] = target.early_exit(layers=int(source[len(EARLY_EXIT) :]))
    else:
      drafters[name] = load_model(source, dtype=config.dtype, name=name)
      if mesh is not None:
        drafters[name] = shard_model(drafters[name], mesh, replicated=True)
  return target, drafters


def load_split(config: ml_collections.ConfigDict, split: str, per_task: int) -> datasets.Dataset:
  """Every configured task's examples of one split, `per_task` each (seeded subset), concatenated."""
  files = data_files(config)
  parts = []
  for task in config.tasks:
    file = files[task]
    split_name = config.get(f"{split}_split", split)
    parts.append(
        loaders.load_examples(
            task, split=split_name, data_file=file, limit=per_task, seed=config.seed
        )
    )
  return datasets.concatenate_datasets(parts)
