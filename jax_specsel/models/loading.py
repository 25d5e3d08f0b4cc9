"""HuggingFace checkpoints -> `Model`: build the architecture's module, fill it tensor by tensor.

The architecture comes from the registry (models/registry.py: config.json's `model_type` -> the
module); the files are read by models/checkpoint.py and models/checkpoint_tensors.py. Each
architecture module contributes its Config (`Config.from_hf`), `config_for_checkpoint` (which
tables the stored weights tie), its nnx `Module`, `hf_weight_map` (every tensor the module needs)
and `is_ignorable` (stored tensors it does not need).

Tensors are converted and cast one at a time, so peak host memory stays near one copy of the
weights. With a `mesh`, each converted tensor goes straight into its NamedSharding
(jax_specsel/sharding.py) as it is read: no device ever holds more than its shards plus the one
tensor in flight.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from jax_specsel import sharding
from jax_specsel.models import checkpoint, checkpoint_tensors

# The errors load_model raises, importable from here as well as from where they are defined.
from jax_specsel.models.checkpoint import (  # noqa: F401
    CheckpointNotFoundError,
    CorruptCheckpointError,
    InvalidConfigError,
)
from jax_specsel.models.interface import Model, check_matmul_precision
from jax_specsel.models.registry import UnsupportedModelError, architecture  # noqa: F401

log = logging.getLogger(__name__)

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "spiece.model", "tokenizer.model")


class WeightMismatchError(ValueError):
  """A tensor is missing, unexpected, or has the wrong shape for the config."""


def load_model(
    path_or_id: str,
    dtype: str = "float32",
    name: str | None = None,
    mesh: jax.sharding.Mesh | None = None,
    matmul_precision: str = "auto",
) -> Model:
  """Load a HuggingFace checkpoint (local directory or hub id) as a `Model`.

  Args:
    path_or_id: a directory with config.json and weights (model.safetensors, sharded safetensors
      with model.safetensors.index.json, or pytorch_model.bin), or a hub id such as
      "google/flan-t5-small" (downloaded through huggingface_hub unless HF_HUB_OFFLINE=1, in
      which case it must already be cached). generation_config.json, when present, supplies the
      stop ids exactly as in transformers (`generation_ids`).
    dtype: "float32", "bfloat16" or "float16": parameters, activations and caches.
    name: a label for tables and logs (default: the last path component or the hub id).
    mesh: a (data, model) mesh from `jax_specsel.make_mesh`: every tensor is placed with the
      tensor-parallel rules of jax_specsel/sharding.py as it is read (default: one device).
    matmul_precision: precision of the model's matrix products, applied inside every compiled
      program. "auto" (default): "highest" for float32 (true float32; JAX would otherwise use
      TF32 on recent NVIDIA GPUs), JAX's default for bfloat16/float16. "default" or
      "tensorfloat32" opts float32 into TF32 for speed; any name `jax.default_matmul_precision`
      accepts is allowed.

  Returns:
    A `Model` with the tokenizer attached when the directory has tokenizer files.

  Raises:
    CheckpointNotFoundError, UnsupportedModelError, WeightMismatchError, InvalidConfigError (a
    stop id outside the vocabulary), CorruptCheckpointError (a file that cannot be parsed, NaN /
    inf weights; naming the file and tensor), ValueError (bad dtype, mesh or matmul_precision).
  """
  if dtype not in checkpoint.DTYPES:
    raise ValueError(f"dtype={dtype!r} is not supported; use one of {sorted(checkpoint.DTYPES)}.")
  check_matmul_precision(matmul_precision)
  if mesh is not None:
    sharding.check_mesh(mesh)
  directory = checkpoint.resolve_checkpoint_dir(path_or_id)
  hf_config = checkpoint.read_config(directory)
  config_path = os.path.join(directory, "config.json")
  arch = architecture(hf_config, config_path)
  try:
    config = _checkpoint_config(arch, hf_config, dtype, directory)
  except (KeyError, TypeError) as err:  # a field missing or of the wrong type
    raise CorruptCheckpointError(
        f"{config_path}: cannot build a {hf_config.get('model_type')} config "
        f"({type(err).__name__}: {err}): a field is missing or malformed; "
        "restore config.json from the checkpoint's source."
    ) from err
  config = dataclasses.replace(config, matmul_precision=matmul_precision)
  module = build_module(arch, config, directory, mesh)
  label = name or os.path.basename(os.path.normpath(path_or_id))
  placement = None if mesh is None else sharding.Placement(mesh)
  return Model(module, tokenizer=_load_tokenizer(directory), name=label, placement=placement)


def _checkpoint_config(arch, hf_config: dict, dtype: str, directory: str):
  """The architecture's Config for a checkpoint: config.json, generation_config.json (if any) and
  which embedding tables the stored weights tie (`config_for_checkpoint`)."""
  generation_config = checkpoint.read_generation_config(directory)
  try:
    config = arch.Config.from_hf(hf_config, dtype, generation_config=generation_config)
  except InvalidConfigError as err:
    raise InvalidConfigError(f"{directory}: {err}") from None
  return arch.config_for_checkpoint(config, checkpoint_tensors.CheckpointTensors(directory))


def build_module(arch, config, directory: str, mesh=None) -> nnx.Module:
  abstract = nnx.eval_shape(lambda: arch.Module(config, rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(abstract)
  expected = {path: var.get_value() for path, var in nnx.to_flat_state(state)}
  placements = {}
  if mesh is not None:
    sizes = sharding.axis_sizes(mesh)
    placements = {
        path: jax.sharding.NamedSharding(mesh, sharding.spec_for(path, v.shape, config, sizes))
        for path, v in expected.items()
    }
  weight_map = arch.hf_weight_map(config)
  uncovered = sorted(set(expected) - {path for path, _ in weight_map.values()})
  if uncovered:  # a bug in the architecture's map, not in the checkpoint
    raise RuntimeError(f"{arch.__name__}.hf_weight_map leaves parameters unfilled: {uncovered[:4]}")
  dtype = checkpoint.DTYPES[config.dtype]
  values, unexpected = {}, []
  for file, name, tensor in checkpoint_tensors.iter_file_tensors(directory):
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
      raise WeightMismatchError(
          f"{directory}: tensor {name!r} is an alias of a parameter already "
          f"loaded from another tensor, with different values: the checkpoint "
          "is inconsistent (config_for_checkpoint should have untied them)."
      )
    values[path] = value
  _check_complete(weight_map, values, unexpected, directory)
  nnx.replace_by_pure_dict(state, _nest(values))
  return nnx.merge(graphdef, state)


def _convert(name, tensor, transform: Callable, shape, dtype):
  array = transform(jnp.asarray(tensor))
  if tuple(array.shape) != tuple(shape):
    raise WeightMismatchError(
        f"tensor {name!r} has shape {tuple(tensor.shape)} (after conversion "
        f"{tuple(array.shape)}) but the config implies {tuple(shape)}: "
        "config.json and the weights disagree."
    )
  return array.astype(dtype)


def _check_finite(file: str, name: str, tensor, value, dtype: str) -> None:
  """Refuses NaN / inf weights (a corrupt or partly overwritten file): they give NaN logits.

  One reduction per tensor, cheap next to reading it. Checked after the cast, so a finite value
  that overflows a float16 load is caught too.
  """
  if bool(jnp.isfinite(value).all()):
    return
  if bool(jnp.isfinite(jnp.asarray(tensor)).all()):
    raise CorruptCheckpointError(
        f"tensor {name!r} of {file} overflows {dtype} (values beyond its "
        "range become inf): load the model in bfloat16 or float32."
    )
  count = int((~jnp.isfinite(jnp.asarray(tensor))).sum())
  raise CorruptCheckpointError(
      f"tensor {name!r} of {file} holds {count} NaN/inf value(s): the file "
      "is corrupt or was partly overwritten; download it again "
      "(huggingface-cli download ... --force-download) or re-save the "
      "checkpoint."
  )


def _check_complete(weight_map, values, unexpected, directory):
  filled = {path for path in values}
  missing = sorted(name for name, (path, _) in weight_map.items() if path not in filled)
  if missing:
    raise WeightMismatchError(
        f"{directory}: {len(missing)} tensor(s) the config needs are missing "
        f"from the weights, e.g. {missing[:4]}; the checkpoint is incomplete "
        "or belongs to a different config."
    )
  if unexpected:
    raise WeightMismatchError(
        f"{directory}: {len(unexpected)} unexpected tensor(s), e.g. "
        f"{sorted(unexpected)[:4]}; config.json does not describe these weights."
    )


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
