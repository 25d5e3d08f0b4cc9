"""`Model` -> an ordinary HuggingFace checkpoint directory that transformers PyTorch loads.

The exporter knows no tensor names: each architecture's `hf_weight_map(config)` (HF name ->
(nnx path, transform)) is inverted with `checkpoint.inverse`; a parameter several HF names
alias (a tied table) is written once, under the first of them, and transformers ties the
others to it on load. `Config.to_hf()` gives config.json; generation_config.json carries the
stop, pad and start ids the model generates with, so `load_model` and transformers' `generate`
read back the same ids.

Directories are written atomically (`atomic_directory`): everything goes into a temporary
sibling that is renamed into place once complete, so a crash never leaves half a checkpoint
under the final name. Weights are written as safetensors shards of at most `max_shard_bytes`
(with transformers' index file when there is more than one), so growth (models/growth.py) can
stream tensors through `TensorWriter` without holding the whole checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from typing import Iterator

import jax
import numpy as np
from flax import nnx

from jax_specsel.models import checkpoint, registry
from jax_specsel.models.interface import Model

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
DEFAULT_SHARD_BYTES = 5 * 2**30
# The ids generation_config.json holds (models/checkpoint.py reads them back, as transformers).
_GENERATION_FIELDS = ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id")


def save_hf_checkpoint(
    model: Model,
    directory: str,
    overwrite: bool = False,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
) -> None:
  """Writes `model` as a HuggingFace checkpoint directory.

  The directory holds config.json, generation_config.json, the weights (model.safetensors, or
  shards with model.safetensors.index.json) in the model's dtype under transformers' tensor
  names, and the tokenizer files when the model has a tokenizer. `load_model(directory)` gives
  the same logits; transformers' `AutoModelFor...from_pretrained(directory)` loads it with no
  missing or unexpected tensors.

  Args:
    model: a T5 or LLaMA `Model` (not an early-exit view); sharded weights are gathered.
    directory: where to write; must not exist, or be empty, unless `overwrite`.
    overwrite: replace an existing directory (the old one is removed only once the new one is
      complete).
    max_shard_bytes: the largest weight file.

  Raises:
    UnsupportedModelError: a config of no registered architecture.
    ValueError: an early-exit view, or a config transformers cannot express.
    FileExistsError: `directory` is not empty and `overwrite` is False.
  """
  arch = registry.architecture_of(model.config)
  if arch is None:
    raise registry.UnsupportedModelError(
        f"{model.name}: {type(model.config).__name__} is no registered architecture's Config; "
        f"only {sorted(registry.ARCHITECTURES)} models can be saved as HuggingFace checkpoints."
    )
  if model.exit_layers is not None:
    raise ValueError(
        f"{model.name} is an early-exit view (the first {model.exit_layers} layers of "
        "a model): save the full model instead; the view is made again on load."
    )
  hf_config = model.config.to_hf()
  check_destination(directory, overwrite)
  with atomic_directory(directory, overwrite) as temp:
    write_json(os.path.join(temp, "config.json"), hf_config)
    write_json(os.path.join(temp, checkpoint.GENERATION_CONFIG), generation_fields(hf_config))
    with TensorWriter(temp, max_shard_bytes) as writer:
      for name, tensor in export_tensors(arch, model):
        writer.add(name, tensor)
    if model.tokenizer is not None:
      model.tokenizer.save_pretrained(temp)


def export_tensors(arch, model: Model) -> Iterator[tuple[str, np.ndarray]]:
  """(HF name, tensor in HF layout) for every parameter of `model`, each written once.

  Args:
    arch: the architecture module of `model.config`.
    model: the model.

  Yields:
    Host numpy arrays in the model's dtype (bfloat16 as ml_dtypes.bfloat16).
  """
  params = {path: var.get_value() for path, var in nnx.to_flat_state(model.params)}
  written = set()
  for name, (path, transform) in arch.hf_weight_map(model.config).items():
    if path in written:  # an alias of a table already written: transformers ties it on load
      continue
    written.add(path)
    value = np.asarray(jax.device_get(params[path]))
    yield name, np.ascontiguousarray(checkpoint.inverse(transform)(value))
  unwritten = sorted(set(params) - written)
  if unwritten:  # a bug in the architecture's map, not in the model
    raise RuntimeError(
        f"{arch.__name__}.hf_weight_map leaves parameters unexported: {unwritten[:4]}"
    )


def generation_fields(hf_config: dict) -> dict:
  """generation_config.json: the special ids of `hf_config` that are set."""
  return {key: hf_config[key] for key in _GENERATION_FIELDS if hf_config.get(key) is not None}


class TensorWriter:
  """Writes (name, array) pairs as safetensors shards of at most `max_shard_bytes` each.

  One shard is held in memory at a time. Closing writes model.safetensors when everything fit
  in one shard, else model-0000i-of-0000n.safetensors and transformers' index file.
  """

  def __init__(self, directory: str, max_shard_bytes: int = DEFAULT_SHARD_BYTES):
    self.directory, self.max_shard_bytes = directory, max_shard_bytes
    self._pending: dict[str, np.ndarray] = {}
    self._pending_bytes = 0
    self._shards: list[list[str]] = []  # names per shard written so far
    self._total_bytes = 0

  def add(self, name: str, tensor: np.ndarray) -> None:
    if name in self._pending or any(name in shard for shard in self._shards):
      raise ValueError(f"tensor {name!r} written twice")
    if self._pending and self._pending_bytes + tensor.nbytes > self.max_shard_bytes:
      self._flush()
    self._pending[name] = np.ascontiguousarray(tensor)
    self._pending_bytes += tensor.nbytes
    self._total_bytes += tensor.nbytes

  def _flush(self) -> None:
    from safetensors.numpy import save_file

    path = os.path.join(self.directory, f".shard-{len(self._shards)}.safetensors")
    save_file(self._pending, path, metadata={"format": "pt"})  # transformers requires the format
    self._shards.append(list(self._pending))
    self._pending, self._pending_bytes = {}, 0

  def close(self) -> None:
    """Writes the last shard and gives the shards their final names."""
    if self._pending or not self._shards:
      self._flush()
    count = len(self._shards)
    if count == 1:
      os.replace(
          os.path.join(self.directory, ".shard-0.safetensors"),
          os.path.join(self.directory, SINGLE_FILE),
      )
      return
    weight_map = {}
    for index, names in enumerate(self._shards):
      final = f"model-{index + 1:05d}-of-{count:05d}.safetensors"
      os.replace(
          os.path.join(self.directory, f".shard-{index}.safetensors"),
          os.path.join(self.directory, final),
      )
      weight_map.update({name: final for name in names})
    write_json(
        os.path.join(self.directory, INDEX_FILE),
        {"metadata": {"total_size": self._total_bytes}, "weight_map": weight_map},
    )

  def __enter__(self) -> TensorWriter:
    return self

  def __exit__(self, exc_type, exc, tb) -> None:
    if exc_type is None:
      self.close()


def write_json(path: str, value: dict) -> None:
  with open(path, "w") as f:
    json.dump(value, f, indent=2, sort_keys=True)
    f.write("\n")


def check_destination(directory: str, overwrite: bool) -> None:
  """Refuses a non-empty `directory` unless `overwrite` (before any work is done).

  Raises:
    FileExistsError: naming the directory and the fix.
  """
  if os.path.isfile(directory):
    raise FileExistsError(f"{directory} is a file: pass a directory path for the checkpoint.")
  if os.path.isdir(directory) and os.listdir(directory) and not overwrite:
    raise FileExistsError(
        f"{directory} exists and is not empty: pass overwrite=True to replace "
        "it, or choose another directory."
    )


@contextlib.contextmanager
def atomic_directory(directory: str, overwrite: bool = False) -> Iterator[str]:
  """Yields a temporary sibling of `directory` to fill; renames it into place on success.

  On an exception the temporary directory is removed and `directory` is left as it was.

  Args:
    directory: the final path (an empty directory there is replaced).
    overwrite: replace a non-empty `directory` too (removed once the new one is in place).

  Raises:
    FileExistsError: from `check_destination`.
  """
  directory = os.path.abspath(directory)
  check_destination(directory, overwrite)
  parent, base = os.path.split(directory)
  os.makedirs(parent, exist_ok=True)
  temp = tempfile.mkdtemp(prefix=f".{base}.tmp-", dir=parent)
  try:
    yield temp
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(temp, 0o777 & ~umask)  # mkdtemp makes it private; a checkpoint is an ordinary dir
    _replace_directory(temp, directory)
  except BaseException:
    shutil.rmtree(temp, ignore_errors=True)
    raise


def _replace_directory(new: str, directory: str) -> None:
  """Renames `new` to `directory`, moving an existing one aside first and removing it after."""
  if not os.path.exists(directory):
    os.rename(new, directory)
    return
  old = tempfile.mkdtemp(
      prefix=f".{os.path.basename(directory)}.old-", dir=os.path.dirname(directory)
  )
  os.rename(directory, os.path.join(old, "replaced"))
  try:
    os.rename(new, directory)
  except OSError:
    os.rename(os.path.join(old, "replaced"), directory)  # put the old one back
    raise
  finally:
    shutil.rmtree(old, ignore_errors=True)
