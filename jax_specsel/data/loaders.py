"""Loads a task's examples as a `datasets.Dataset` with columns id, task, prompt, reference.

Two sources:
  * a local file (`data_file=`: .jsonl, .json, .csv or .parquet), read with
    `datasets.load_dataset(<format>, data_files=...)` and the task's field names;
  * the task's hub dataset through `datasets.load_dataset(path, name, split=...)`, which works
    offline only when the dataset is already in the local cache.

Set HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 before loading a local file: otherwise `datasets`
first tries the network and waits for its time-out.
"""

from __future__ import annotations

import os
from typing import Any

import datasets
import numpy as np

from jax_specsel.data.tasks import Task, get_field, get_task

_FORMATS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
COLUMNS = ("id", "task", "prompt", "reference")
_ROW_COLUMN = "__row__"


class DatasetUnavailableError(RuntimeError):
  """The task's data can't be read from here (offline and not cached, or no hub source)."""


class MissingFieldError(KeyError):
  """A field the task needs is not in the data; the message lists the columns there are."""

  def __str__(self) -> str:
    return str(self.args[0])  # KeyError would print the repr of the message


def find_task_file(data_dir: str, task: str) -> str | None:
  """The file `data_dir/<task>.<ext>` for the first extension found (.jsonl, .json, .csv,
  .parquet), or None."""
  for extension in _FORMATS:
    path = os.path.join(data_dir, task + extension)
    if os.path.isfile(path):
      return path
  return None


def _file_format(data_file: str) -> str:
  extension = os.path.splitext(data_file)[1].lower()
  if extension not in _FORMATS:
    raise ValueError(
        f"cannot read {data_file!r}: unsupported extension {extension!r}; use one "
        f"of {sorted(_FORMATS)}"
    )
  return _FORMATS[extension]


def _local_dataset(data_file: str, split: str) -> datasets.Dataset:
  if not os.path.isfile(data_file):
    raise FileNotFoundError(f"data_file {data_file!r} does not exist")
  # The split name only labels the file's rows: a local file is one split.
  return datasets.load_dataset(_file_format(data_file), data_files={split: data_file}, split=split)


def _hub_dataset(task: Task, split: str) -> datasets.Dataset:
  how_to = (
      f"provide a local copy: load_examples({task.name!r}, data_file='path/to/file.jsonl') "
      f"or, in a launch, --config.data_dir=DIR with a file {task.name}.jsonl there (or "
      f".json/.csv/.parquet; the fields {list(task.source_fields)}"
      + (f" and {task.target_field!r}" if task.target_field else "")
      + ")"
  )
  if task.hub is None:
    raise DatasetUnavailableError(f"task {task.name!r} has no hub source; {how_to}")
  if split not in task.hub.splits:
    raise ValueError(f"task {task.name!r} has splits {list(task.hub.splits)}, not {split!r}")
  try:
    return datasets.load_dataset(task.hub.path, task.hub.name, split=split)
  except (ConnectionError, FileNotFoundError, datasets.exceptions.DatasetNotFoundError) as error:
    if datasets.config.HF_HUB_OFFLINE:
      reason = (
          f"not in the local cache {datasets.config.HF_DATASETS_CACHE} and downloads are "
          "off (HF_DATASETS_OFFLINE=1 / HF_HUB_OFFLINE=1)"
      )
    else:
      reason = f"unavailable ({type(error).__name__}: {error})"
    config = f", config {task.hub.name!r}" if task.hub.name else ""
    raise DatasetUnavailableError(
        f"hub dataset {task.hub.path!r}{config}, split {split!r}, for task "
        f"{task.name!r} is {reason}; {how_to}"
    ) from error


def _check_fields(dataset: datasets.Dataset, task: Task, origin: str) -> None:
  """Fails early, listing the columns, when a field of the task is missing."""
  if len(dataset) == 0:
    raise ValueError(f"{origin} has no rows")
  fields = list(task.source_fields) + ([task.target_field] if task.target_field else [])
  fields += [task.id_field] if task.id_field and task.id_field in dataset.column_names else []
  if task.categories is not None:
    fields.append("category")
  first_row = dataset[0]
  for field in fields:
    try:
      get_field(first_row, field)
    except KeyError as error:
      columns = dataset.flatten().column_names  # nested fields appear dotted: translation.en
      raise MissingFieldError(
          f"{origin} lacks field {field!r} that task {task.name!r} needs ({error.args[0]}); "
          f"its columns are {columns}"
      ) from None


def _to_examples(dataset: datasets.Dataset, task: Task, split: str) -> datasets.Dataset:
  has_id = task.id_field is not None and task.id_field in dataset.column_names

  def convert(record: dict[str, Any]) -> dict[str, str]:
    example_id = (
        str(record[task.id_field]) if has_id else f"{task.name}/{split}/{record[_ROW_COLUMN]}"
    )
    return {
        "id": example_id,
        "task": task.name,
        "prompt": task.format_prompt(record),
        "reference": task.reference_text(record),
    }

  return dataset.map(convert, remove_columns=dataset.column_names, desc=f"prompts for {task.name}")


def load_examples(
    task: Task | str,
    split: str = "train",
    data_file: str | os.PathLike | None = None,
    limit: int | None = None,
    seed: int = 0,
) -> datasets.Dataset:
  """Loads a task's examples with its prompt template applied.

  Args:
    task: a `Task` or the name of a registered one.
    split: the hub split to read; for a local file only a label (the file is one split).
    data_file: a local .jsonl/.json/.csv/.parquet file with the task's field names (dotted
      names such as translation.en address nested records or literal "a.b" columns).
    limit: keep a random subset of this many examples (seeded; original order kept), or all.
    seed: seed of that subset.

  Returns:
    A `datasets.Dataset` with string columns id, task, prompt and reference (reference is ""
    for reference-free tasks such as Spec-Bench).
  """
  task = get_task(task) if isinstance(task, str) else task
  if limit is not None and limit < 1:
    raise ValueError(f"limit must be None or >= 1, got {limit}")
  if data_file is not None:
    data_file = os.fspath(data_file)
    dataset, origin = _local_dataset(data_file, split), f"data_file {data_file!r}"
  else:
    dataset, origin = _hub_dataset(task, split), f"hub dataset {task.hub.path!r}"
  _check_fields(dataset, task, origin)
  if not (task.id_field and task.id_field in dataset.column_names):
    # Row numbers of the file/split, so ids stay the same under category filters and limits.
    dataset = dataset.add_column(_ROW_COLUMN, list(range(len(dataset))))
  if task.categories is not None:
    dataset = dataset.filter(lambda record: record["category"] in task.categories)
    if len(dataset) == 0:
      raise ValueError(f"{origin} has no rows with category in {list(task.categories)}")
  if limit is not None and limit < len(dataset):
    rows = np.random.default_rng(seed).choice(len(dataset), size=limit, replace=False)
    dataset = dataset.select(np.sort(rows).tolist())
  return _to_examples(dataset, task, split)
