"""The model zoo's cache directory on disk: write it, read it back, clean up after dead builds.

Layout of `<cache root>/zoo-<hash>/`: zoo.json (the record: configs, sizes, training facts),
tokenizer/ (save_pretrained) and models/<name>/ (orbax, the parameters under string keys). A build
writes a temporary sibling `<zoo>.partial-<pid>-<tag>` and renames it into place (data/zoo.py), so
a build killed half-way never looks complete.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jax_specsel.models import t5
from jax_specsel.models.interface import Model

ZOO_JSON = "zoo.json"


class ZooCacheError(RuntimeError):
  """A zoo cache directory exists but is incomplete, corrupt or built for another config."""


def remove_abandoned_partials(directory: str) -> None:
  """Deletes temporary build directories (`<zoo>.partial-<pid>-<tag>`) of dead processes."""
  parent, name = os.path.split(directory)
  for entry in os.listdir(parent):
    if entry.startswith(f"{name}.partial-"):
      pid = entry.split("-")[-2]
      if not (pid.isdigit() and _process_alive(int(pid))):
        shutil.rmtree(os.path.join(parent, entry), ignore_errors=True)


def _process_alive(pid: int) -> bool:
  if pid <= 0:
    return False
  try:
    os.kill(pid, 0)  # signal 0: an existence check only
  except (ProcessLookupError, OverflowError):
    return False
  except PermissionError:  # alive, owned by someone else
    return True
  return True


def write(directory: str, models: dict[str, Model], tokenizer, record: dict) -> None:
  """Writes a zoo into a new directory: tokenizer, every model's parameters, then zoo.json.

  Args:
    directory: the (temporary) directory to create.
    models: name -> model.
    tokenizer: the shared tokenizer (saved with save_pretrained).
    record: what zoo.json holds (written last: its presence marks a complete save, the rename
      into place is the real guarantee).
  """
  import orbax.checkpoint as ocp

  os.makedirs(directory)
  tokenizer.save_pretrained(os.path.join(directory, "tokenizer"))
  checkpointer = ocp.StandardCheckpointer()
  for name, model in models.items():
    checkpointer.save(os.path.join(directory, "models", name), _flat_params(model.params))
  checkpointer.wait_until_finished()
  with open(os.path.join(directory, ZOO_JSON), "w") as handle:
    json.dump(record, handle, indent=1)


def read_models(directory: str, configs: dict[str, t5.Config]) -> tuple[Any, dict[str, Model]]:
  """(tokenizer, name -> Model) of a directory `write` made.

  Args:
    directory: the zoo directory.
    configs: name -> the T5 config each model was saved with.

  Raises:
    Whatever orbax or tokenizers raise for a missing or truncated file (the caller turns it into
    a ZooCacheError).
  """
  import orbax.checkpoint as ocp
  from transformers import PreTrainedTokenizerFast

  tokenizer = PreTrainedTokenizerFast.from_pretrained(os.path.join(directory, "tokenizer"))
  checkpointer = ocp.StandardCheckpointer()
  models = {}
  for name, t5_config in configs.items():
    abstract = nnx.eval_shape(lambda c=t5_config: t5.Module(c, rngs=nnx.Rngs(0)))
    graphdef, abstract_params = nnx.split(abstract)
    flat = checkpointer.restore(
        os.path.join(directory, "models", name), _flat_params(abstract_params)
    )
    module = nnx.merge(graphdef, _unflatten_params(abstract_params, flat))
    models[name] = Model(module, tokenizer=tokenizer, name=name)
  return tokenizer, models


def read_record(directory: str) -> dict:
  """zoo.json of a zoo directory (ZooCacheError when it is missing, unreadable or incomplete)."""
  path = os.path.join(directory, ZOO_JSON)
  try:
    with open(path) as handle:
      record = json.load(handle)
  except (OSError, ValueError) as err:
    raise ZooCacheError(f"{path} is missing or unreadable ({type(err).__name__})") from err
  if not isinstance(record, dict) or "models" not in record or "zoo_config" not in record:
    raise ZooCacheError(f"{path} lacks the models / zoo_config entries")
  return record


def _flat_params(params: nnx.State) -> dict[str, Any]:
  """{"decoder/blocks/0/...": array}: string keys only, which every orbax version round-trips."""
  leaves = jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(params))[0]
  return {"/".join(str(getattr(k, "key", k)) for k in path): leaf for path, leaf in leaves}


def _unflatten_params(abstract_params: nnx.State, flat: dict[str, Any]) -> nnx.State:
  pure = nnx.to_pure_dict(abstract_params)
  keys = list(_flat_params(abstract_params))
  treedef = jax.tree_util.tree_structure(pure)
  nnx.replace_by_pure_dict(
      abstract_params, jax.tree_util.tree_unflatten(treedef, [jnp.asarray(flat[k]) for k in keys])
  )
  return abstract_params
