"""HuggingFace checkpoints -> `Model`: find the files, stream tensors one at a time, map names.

Each architecture module (t5.py, llama.py) contributes four things, registered in ARCHITECTURES:
  Config.from_hf(hf_config: dict, dtype: str) -> Config     (a frozen, hashable dataclass)
  Module(config, rngs=nnx.Rngs)                              (the nnx module)
  hf_weight_map(config) -> {hf_name: (nnx_path, transform)}  (every tensor the module needs)
  is_ignorable(hf_name, config) -> bool                      (aliases of tied weights, buffers)

Tensors are read lazily (safetensors memory maps, torch.load(mmap=True)), converted and cast one
at a time, so peak host memory stays near one copy of the weights. With a `mesh`, each converted
tensor goes straight into its NamedSharding (jax_specsel/sharding.py) as it is read: no device
ever holds more than its shards plus the one tensor in flight.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
from typing import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jax_specsel import sharding
from jax_specsel.models.interface import Model

log = logging.getLogger(__name__)

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "spiece.model", "tokenizer.model")
_HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "pytorch_model*.bin"]


class CheckpointNotFoundError(FileNotFoundError):
  """The directory, weight file or hub snapshot does not exist (or is not cached offline)."""


class UnsupportedModelError(ValueError):
  """config.json names a model_type this library has no implementation for."""


class WeightMismatchError(ValueError):
  """A tensor is missing, unexpected, or has the wrong shape for the config."""


class CorruptCheckpointError(ValueError):
  """A checkpoint file cannot be parsed (truncated, overwritten) or holds NaN / inf weights."""


# model_type -> module, imported when a checkpoint of that type is loaded (the model files import
# this module, and one architecture failing to import must not stop the others from loading).
ARCHITECTURES = {"t5": "jax_specsel.models.t5", "llama": "jax_specsel.models.llama"}


def load_model(path_or_id: str, dtype: str = "float32", name: str | None = None,
               mesh: jax.sharding.Mesh | None = None) -> Model:
  """Load a HuggingFace checkpoint (local directory or hub id) as a `Model`.

  Args:
    path_or_id: a directory with config.json and weights (model.safetensors, sharded safetensors
      with model.safetensors.index.json, or pytorch_model.bin), or a hub id such as
      "google/flan-t5-small" (downloaded through huggingface_hub unless HF_HUB_OFFLINE=1, in
      which case it must already be cached).
    dtype: "float32", "bfloat16" or "float16": parameters, activations and caches.
    name: a label for tables and logs (default: the last path component or the hub id).
    mesh: a (data, model) mesh from `jax_specsel.make_mesh`: every tensor is placed with the
      tensor-parallel rules of jax_specsel/sharding.py as it is read (default: one device).

  Returns:
    A `Model` with the tokenizer attached when the directory has tokenizer files.

  Raises:
    CheckpointNotFoundError, UnsupportedModelError, WeightMismatchError, CorruptCheckpointError
    (a file that cannot be parsed, NaN / inf weights; naming the file and tensor), ValueError
    (bad dtype or mesh).
  """
  if dtype not in DTYPES:
    raise ValueError(f"dtype={dtype!r} is not supported; use one of {sorted(DTYPES)}.")
  if mesh is not None:
    sharding.check_mesh(mesh)
  directory = resolve_checkpoint_dir(path_or_id)
  hf_config = _read_config(directory)
  config_path = os.path.join(directory, "config.json")
  arch = architecture(hf_config, config_path)
  try:
    config = arch.Config.from_hf(hf_config, dtype)
  except (KeyError, TypeError) as err:  # a field missing or of the wrong type
    raise CorruptCheckpointError(f"{config_path}: cannot build a {hf_config.get('model_type')} config "
                                 f"({type(err).__name__}: {err}): a field is missing or malformed; "
                                 "restore config.json from the checkpoint's source.") from err
  module = _build_module(arch, config, directory, mesh)
  label = name or os.path.basename(os.path.normpath(path_or_id))
  placement = None if mesh is None else sharding.Placement(mesh)
  return Model(module, tokenizer=_load_tokenizer(directory), name=label, placement=placement)


def architecture(hf_config: dict, source: str = "config.json"):
  """The architecture module (t5 / llama) for a parsed config.json; `source` names it in errors."""
  model_type = hf_config.get("model_type")
  if model_type not in ARCHITECTURES:
    raise UnsupportedModelError(
        f"{source}: model_type={model_type!r} is not supported. "
        f"Supported: {sorted(ARCHITECTURES)} (T5 / T5 v1.1 / Flan-T5 and LLaMA-family checkpoints).")
  return importlib.import_module(ARCHITECTURES[model_type])


def read_hf_config(path_or_id: str) -> dict:
  """config.json of a local checkpoint directory or a hub id, without fetching any weights.

  Raises:
    CheckpointNotFoundError: no such directory, or the hub id is neither cached nor reachable.
  """
  path = os.path.expanduser(str(path_or_id))
  if os.path.isdir(path) or os.path.exists(path) or _looks_like_path(path):
    return _read_config(resolve_checkpoint_dir(path))
  import huggingface_hub
  offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
  try:
    config_path = huggingface_hub.hf_hub_download(path, "config.json", local_files_only=offline)
  except Exception as err:  # the hub raises several classes for "not cached" / "no network"
    raise CheckpointNotFoundError(
        f"cannot get config.json of {path!r} ({type(err).__name__}): "
        + ("HF_HUB_OFFLINE=1 and it is not cached; " if offline else "")
        + "pass a local checkpoint directory, or download it with huggingface-cli.") from err
  return read_json(config_path, "config.json")


def resolve_checkpoint_dir(path_or_id: str) -> str:
  """A local directory holding the checkpoint: the path itself, or a hub snapshot."""
  path = os.path.expanduser(str(path_or_id))
  if os.path.isdir(path):
    return path
  if os.path.exists(path):
    raise CheckpointNotFoundError(f"{path} is a file; pass the checkpoint directory that holds "
                                  "config.json and the weight files.")
  if _looks_like_path(path):
    raise CheckpointNotFoundError(f"checkpoint directory {path} does not exist; pass a directory "
                                  "with config.json and model.safetensors, or a hub id like org/name.")
  return _hub_snapshot(path)


def _looks_like_path(text: str) -> bool:
  return text.startswith(("/", ".", "~")) or text.endswith("/") or text.count("/") > 1


def _hub_snapshot(repo_id: str) -> str:
  import huggingface_hub
  offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
  try:
    return huggingface_hub.snapshot_download(repo_id, allow_patterns=_HUB_PATTERNS,
                                             local_files_only=offline)
  except Exception as err:  # the hub raises several classes for "not cached" / "no network"
    hint = ("HF_HUB_OFFLINE=1 is set and it is not in the local cache: download it on a machine "
            "with network (huggingface-cli download " + repo_id + ") or pass a local directory."
            if offline else "check the id, your network and your token, or pass a local directory.")
    raise CheckpointNotFoundError(f"cannot get hub checkpoint {repo_id!r} ({type(err).__name__}): "
                                  f"{hint}") from err


def _read_config(directory: str) -> dict:
  path = os.path.join(directory, "config.json")
  if not os.path.isfile(path):
    raise CheckpointNotFoundError(f"{path} is missing: a HuggingFace checkpoint directory needs "
                                  "config.json next to its weights.")
  return read_json(path, "config.json")


def read_json(path: str, what: str) -> dict:
  """A checkpoint's JSON object; CorruptCheckpointError naming the file when it cannot be parsed."""
  try:
    with open(path) as f:
      value = json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as err:
    raise CorruptCheckpointError(f"{path} is not valid JSON ({err}): the {what} is truncated or "
                                 "was edited by hand; restore it from the checkpoint's source "
                                 "(e.g. huggingface-cli download ... --force-download).") from None
  if not isinstance(value, dict):
    raise CorruptCheckpointError(f"{path} holds a JSON {type(value).__name__}, not an object: "
                                 f"this is not a {what}; restore it from the checkpoint's source.")
  return value


def weight_files(directory: str) -> list[str]:
  """The checkpoint's weight files, in the order of preference safetensors > torch .bin."""
  for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
    index_path = os.path.join(directory, index_name)
    if os.path.isfile(index_path):
      index = read_json(index_path, "weight index")
      if not isinstance(index.get("weight_map"), dict):
        raise CorruptCheckpointError(f"{index_path} has no 'weight_map' object: restore the index "
                                     "from the checkpoint's source.")
      shards = sorted(set(index["weight_map"].values()))
      missing = [s for s in shards if not os.path.isfile(os.path.join(directory, s))]
      if missing:
        raise CheckpointNotFoundError(f"{index_path} lists shards that are not there: {missing[:3]}; "
                                      "the download is incomplete.")
      return [os.path.join(directory, s) for s in shards]
  for single in ("model.safetensors", "pytorch_model.bin"):
    if os.path.isfile(os.path.join(directory, single)):
      return [os.path.join(directory, single)]
  raise CheckpointNotFoundError(f"no weight file in {directory}: expected model.safetensors, "
                                "model.safetensors.index.json with shards, or pytorch_model.bin.")


def iter_tensors(directory: str) -> Iterator[tuple[str, jax.Array | np.ndarray]]:
  """Yields (name, tensor) one at a time across all weight files."""
  for _, name, tensor in _iter_file_tensors(directory):
    yield name, tensor


def _iter_file_tensors(directory: str) -> Iterator[tuple[str, str, jax.Array | np.ndarray]]:
  """Yields (file, name, tensor) one at a time across all weight files."""
  for path in weight_files(directory):
    tensors = _iter_safetensors(path) if path.endswith(".safetensors") else _iter_torch_bin(path)
    for name, tensor in tensors:
      yield path, name, tensor


def _unreadable(path: str, err: Exception) -> CorruptCheckpointError:
  return CorruptCheckpointError(
      f"{path} cannot be read ({type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}): "
      "the file is truncated or corrupt (an interrupted download or copy?); download it again "
      "(huggingface-cli download ... --force-download) or re-save the checkpoint.")


def _iter_safetensors(path: str):
  import safetensors
  try:
    # framework="flax": numpy has no bfloat16, and checkpoints are often stored in it.
    with safetensors.safe_open(path, framework="flax") as f:
      for key in f.keys():
        yield key, f.get_tensor(key)
  except safetensors.SafetensorError as err:
    raise _unreadable(path, err) from err


def _iter_torch_bin(path: str):
  try:
    import torch
  except ImportError as err:
    raise CheckpointNotFoundError(f"{path} is a PyTorch pickle and reading it needs torch: "
                                  "pip install torch==2.13.0, or convert it to safetensors.") from err
  import pickle
  import zipfile
  try:
    state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
  except (RuntimeError, OSError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError) as err:
    raise _unreadable(path, err) from err
  for key, tensor in state.items():
    if tensor.dtype == torch.bfloat16:
      import ml_dtypes
      yield key, tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    else:
      yield key, tensor.numpy()


def _build_module(arch, config, directory: str, mesh=None) -> nnx.Module:
  abstract = nnx.eval_shape(lambda: arch.Module(config, rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(abstract)
  expected = {path: var.get_value() for path, var in nnx.to_flat_state(state)}
  placements = {}
  if mesh is not None:
    sizes = sharding.axis_sizes(mesh)
    placements = {path: jax.sharding.NamedSharding(mesh, sharding.spec_for(path, v.shape, config, sizes))
                  for path, v in expected.items()}
  weight_map = arch.hf_weight_map(config)
  uncovered = sorted(set(expected) - {path for path, _ in weight_map.values()})
  if uncovered:  # a bug in the architecture's map, not in the checkpoint
    raise RuntimeError(f"{arch.__name__}.hf_weight_map leaves parameters unfilled: {uncovered[:4]}")
  dtype = DTYPES[config.dtype]
  values, unexpected = {}, []
  for file, name, tensor in _iter_file_tensors(directory):
    if name not in weight_map:
      if not arch.is_ignorable(name, config):
        unexpected.append(name)
      continue
    path, transform = weight_map[name]
    value = _convert(name, tensor, transform, expected[path].shape, dtype)
    _check_finite(file, name, tensor, value, config.dtype)
    if path in placements:  # straight into the shards; the whole tensor is dropped right after
      value = jax.device_put(value, placements[path])
    if path in values and not bool(jnp.array_equal(values[path], value)):
      # Aliases (T5's shared / encoder / decoder embeddings) must agree, or shard order decides.
      raise WeightMismatchError(f"{directory}: tensor {name!r} is an alias of a parameter already "
                                f"loaded from another tensor, with different values: the checkpoint "
                                "is inconsistent (re-save it with tied embeddings equal).")
    values[path] = value
  _check_complete(weight_map, values, unexpected, directory)
  nnx.replace_by_pure_dict(state, _nest(values))
  return nnx.merge(graphdef, state)


def _convert(name, tensor, transform: Callable, shape, dtype):
  array = transform(jnp.asarray(tensor))
  if tuple(array.shape) != tuple(shape):
    raise WeightMismatchError(f"tensor {name!r} has shape {tuple(tensor.shape)} (after conversion "
                              f"{tuple(array.shape)}) but the config implies {tuple(shape)}: "
                              "config.json and the weights disagree.")
  return array.astype(dtype)


def _check_finite(file: str, name: str, tensor, value, dtype: str) -> None:
  """Refuses NaN / inf weights (a corrupt or partly overwritten file): they give NaN logits.

  One reduction per tensor, cheap next to reading it. Checked after the cast, so a finite value
  that overflows a float16 load is caught too.
  """
  if bool(jnp.isfinite(value).all()):
    return
  if bool(jnp.isfinite(jnp.asarray(tensor)).all()):
    raise CorruptCheckpointError(f"tensor {name!r} of {file} overflows {dtype} (values beyond its "
                                 "range become inf): load the model in bfloat16 or float32.")
  count = int((~jnp.isfinite(jnp.asarray(tensor))).sum())
  raise CorruptCheckpointError(f"tensor {name!r} of {file} holds {count} NaN/inf value(s): the file "
                               "is corrupt or was partly overwritten; download it again "
                               "(huggingface-cli download ... --force-download) or re-save the "
                               "checkpoint.")


def _check_complete(weight_map, values, unexpected, directory):
  filled = {path for path in values}
  missing = sorted(name for name, (path, _) in weight_map.items() if path not in filled)
  if missing:
    raise WeightMismatchError(f"{directory}: {len(missing)} tensor(s) the config needs are missing "
                              f"from the weights, e.g. {missing[:4]}; the checkpoint is incomplete "
                              "or belongs to a different config.")
  if unexpected:
    raise WeightMismatchError(f"{directory}: {len(unexpected)} unexpected tensor(s), e.g. "
                              f"{sorted(unexpected)[:4]}; config.json does not describe these weights.")


def _nest(flat: dict) -> dict:
  nested: dict = {}
  for path, value in flat.items():
    node = nested
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = value
  return nested


def _load_tokenizer(directory: str):
  if not any(os.path.isfile(os.path.join(directory, f)) for f in _TOKENIZER_FILES):
    log.info("no tokenizer files in %s: the model has no tokenizer attached", directory)
    return None
  from transformers import AutoTokenizer
  return AutoTokenizer.from_pretrained(directory)


def identity(x):
  return x


def transpose(x):
  return x.T
