"""A HuggingFace checkpoint's weight files: found, streamed one tensor at a time, read on demand.

Tensors are read lazily (safetensors memory maps, torch.load(mmap=True)), so peak host memory
stays near one copy of the weights; models/loading.py converts and places them one at a time.
A file that cannot be parsed raises CorruptCheckpointError naming it (models/checkpoint.py).
"""

from __future__ import annotations

import contextlib
import os
from typing import Iterator

import jax
import jax.numpy as jnp
import numpy as np

from jax_specsel.models.checkpoint import (
    CheckpointNotFoundError,
    CorruptCheckpointError,
    read_json,
)


def weight_files(directory: str) -> list[str]:
  """The checkpoint's weight files, in the order of preference safetensors > torch .bin."""
  for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
    index_path = os.path.join(directory, index_name)
    if os.path.isfile(index_path):
      index = read_json(index_path, "weight index")
      if not isinstance(index.get("weight_map"), dict):
        raise CorruptCheckpointError(
            f"{index_path} has no 'weight_map' object: restore the index "
            "from the checkpoint's source."
        )
      shards = sorted(set(index["weight_map"].values()))
      missing = [s for s in shards if not os.path.isfile(os.path.join(directory, s))]
      if missing:
        raise CheckpointNotFoundError(
            f"{index_path} lists shards that are not there: "
            f"{missing[:3]}; the download is incomplete."
        )
      return [os.path.join(directory, s) for s in shards]
  for single in ("model.safetensors", "pytorch_model.bin"):
    if os.path.isfile(os.path.join(directory, single)):
      return [os.path.join(directory, single)]
  raise CheckpointNotFoundError(
      f"no weight file in {directory}: expected model.safetensors, "
      "model.safetensors.index.json with shards, or pytorch_model.bin."
  )


def iter_tensors(directory: str) -> Iterator[tuple[str, jax.Array | np.ndarray]]:
  """Yields (name, tensor) one at a time across all weight files."""
  for _, name, tensor in iter_file_tensors(directory):
    yield name, tensor


def iter_file_tensors(directory: str) -> Iterator[tuple[str, str, jax.Array | np.ndarray]]:
  """Yields (file, name, tensor) one at a time across all weight files."""
  for path in weight_files(directory):
    tensors = _iter_safetensors(path) if path.endswith(".safetensors") else _iter_torch_bin(path)
    for name, tensor in tensors:
      yield path, name, tensor


def _unreadable(path: str, err: Exception) -> CorruptCheckpointError:
  first_line = str(err).splitlines()[0][:200] if str(err) else ""
  return CorruptCheckpointError(
      f"{path} cannot be read ({type(err).__name__}: {first_line}): "
      "the file is truncated or corrupt (an interrupted download or copy?); download it again "
      "(huggingface-cli download ... --force-download) or re-save the checkpoint."
  )


def _iter_safetensors(path: str):
  with _safetensors_errors(path):
    # framework="flax": numpy has no bfloat16, and checkpoints are often stored in it.
    with safetensors_open(path) as f:
      for key in f.keys():
        yield key, f.get_tensor(key)


@contextlib.contextmanager
def _safetensors_errors(path: str):
  """Turns the reader's errors (a truncated, empty or overwritten file) into one that names it."""
  import safetensors

  try:
    yield
  except safetensors.SafetensorError as err:
    raise _unreadable(path, err) from err


def safetensors_open(path: str):
  """`safetensors.safe_open` of a weight file; every read of one goes through here, so a file
  that cannot be parsed raises CorruptCheckpointError naming it, whichever path reads it first."""
  import safetensors

  with _safetensors_errors(path):
    return safetensors.safe_open(path, framework="flax")


class CheckpointTensors:
  """A checkpoint's tensor names, and single tensors read on demand (memory-mapped, not cast).

  What `config_for_checkpoint` looks at before the module is built: whether tables that
  transformers ties are stored, and whether they are equal.
  """

  def __init__(self, directory: str):
    self.directory = directory
    self._readers: dict | None = None

  @property
  def names(self) -> frozenset[str]:
    return frozenset(self._all_readers())

  def _all_readers(self) -> dict:
    if self._readers is None:
      self._readers = {
          name: reader
          for path in weight_files(self.directory)
          for name, reader in _lazy_tensors(path)
      }
    return self._readers

  def read(self, name: str):
    """The stored tensor `name` as an array in its stored dtype (KeyError if absent)."""
    return self._all_readers()[name]()

  def equal(self, name: str, other: str) -> bool:
    """Whether two stored tensors hold the same shape and values (transformers' `torch.equal`)."""
    first, second = self.read(name), self.read(other)
    return tuple(first.shape) == tuple(second.shape) and bool(jnp.array_equal(first, second))


def _lazy_tensors(path: str):
  """(name, zero-argument reader) per tensor of one weight file; nothing is read until called."""
  if path.endswith(".safetensors"):
    with safetensors_open(path) as f:
      keys = list(f.keys())

    def reader(key):
      with _safetensors_errors(path), safetensors_open(path) as f:
        return f.get_tensor(key)

    return [(key, lambda key=key: reader(key)) for key in keys]
  tensors = dict(_iter_torch_bin(path))  # memory-mapped: the values are views, not copies
  return [(key, lambda value=value: value) for key, value in tensors.items()]


def _iter_torch_bin(path: str):
  try:
    import torch
  except ImportError as err:
    raise CheckpointNotFoundError(
        f"{path} is a PyTorch pickle and reading it needs torch: "
        "pip install torch==2.13.0, or convert it to "
        "safetensors."
    ) from err
  import pickle
  import zipfile

  try:
    state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
  except (
      RuntimeError,
      OSError,
      EOFError,
      pickle.UnpicklingError,
      zipfile.BadZipFile,
      ValueError,
  ) as err:
    raise _unreadable(path, err) from err
  for key, tensor in state.items():
    if tensor.dtype == torch.bfloat16:
      import ml_dtypes

      yield key, tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    else:
      yield key, tensor.numpy()
