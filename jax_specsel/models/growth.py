"""Function-preserving widening (Net2Net) of HuggingFace T5 and LLaMA checkpoints.

Widening by an integer k copies every hidden unit k times, copy-major: a hidden vector h becomes
h' = tile(h, k) on its feature axis (d_model / hidden_size and d_ff / intermediate_size alike),
and attention heads are duplicated with their size unchanged. Then, per stored tensor:
  - an embedding table [V, D] is tiled along D (a lookup: each copy holds the same value);
  - a norm scale [D] is tiled (the mean of squares of a tiled vector is unchanged, so the norm is);
  - a linear map between widened spaces is tiled on both axes and divided by k along its
    contracted (input) axis: each output unit then sums k equal copies of each input / k;
  - T5's relative-position bias [buckets, heads] is tiled per head;
  - the LM head is stored untied, tile(E, k) / k [V, kD], with T5's d_model**-0.5 output scaling
    folded in (a tied, scaled head cannot stay tied: h' E'^T (kD)**-0.5 = sqrt(k) h E^T D**-0.5).
Copy-major heads keep every query head on its own key/value head under grouped-query attention,
and head sizes, T5's unscaled scores and LLaMA's rotary embedding and 1/sqrt(head_dim) all hold,
so the grown model computes the same logits up to float rounding while each decode step moves
k^2 times the weights.

The per-tensor roles are each architecture's `GROWTH_AXES` table (regex over HF tensor names ->
widened axes, contracted axes), next to its other HF tables; this module knows no tensor names.
An architecture contributes `GROWTH_AXES`, `LM_HEAD`, `output_scale(config)` and
`grown_hf_config(hf_config, config, factor)`.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from typing import Iterator

import numpy as np

from jax_specsel.models import checkpoint, checkpoint_tensors, hf_export, registry
from jax_specsel.models.interface import Model
from jax_specsel.models.loading import WeightMismatchError, load_model

GROWTH_FIELD = "jax_specsel_growth"  # config.json: {"factor", "source"[, "source_growth"]}
# Files of a source checkpoint that are weights (rewritten, or not valid once widened).
_WEIGHT_SUFFIXES = (
    ".safetensors",
    ".bin",
    ".msgpack",
    ".h5",
    ".ckpt",
    ".pt",
    ".pth",
    ".gguf",
    ".onnx",
    ".index.json",
)


def check_factor(factor) -> int:
  """Returns `factor` as an int if it is a whole number >= 1.

  Raises:
    ValueError: naming the argument and the fix (bool, float, str and < 1 are refused).
  """
  if isinstance(factor, bool) or not isinstance(factor, (int, np.integer)):
    raise ValueError(
        f"factor={factor!r} ({type(factor).__name__}) is not an integer: growth copies "
        "every hidden unit a whole number of times; pass an int >= 1, e.g. factor=2."
    )
  if factor < 1:
    raise ValueError(
        f"factor={factor} must be >= 1 (1 copies the checkpoint, k widens it k times); "
        "pass e.g. factor=2."
    )
  return int(factor)


def grow_checkpoint(
    src_dir: str,
    dst_dir: str,
    factor: int,
    overwrite: bool = False,
    max_shard_bytes: int = hf_export.DEFAULT_SHARD_BYTES,
) -> str:
  """Writes `src_dir`'s checkpoint widened `factor` times (same function) to `dst_dir`.

  Any T5 (v1.0, v1.1, Flan) or LLaMA checkpoint `load_model` reads is accepted. Tokenizer files
  and generation_config.json are copied; config.json gets the new widths and records the growth
  under "jax_specsel_growth" (transformers keeps unknown fields as attributes and ignores them).
  The destination is written atomically. factor 1 copies the checkpoint.

  Args:
    src_dir: a checkpoint directory or a hub id (as for `load_model`).
    dst_dir: the new checkpoint directory; must not exist, or be empty, unless `overwrite`.
    factor: k, a whole number >= 1.
    overwrite: replace an existing `dst_dir` once the new one is complete.
    max_shard_bytes: the largest weight file written.

  Returns:
    The absolute path of `dst_dir`.

  Raises:
    ValueError: a bad factor (before anything is read). FileExistsError: `dst_dir` is not empty.
    UnsupportedModelError: a model_type without growth tables. WeightMismatchError: a stored
    tensor the architecture does not know, or a missing one.
  """
  source = os.path.abspath(src_dir) if os.path.isdir(src_dir) else src_dir
  return _grow(src_dir, dst_dir, factor, overwrite, source, max_shard_bytes)


def grow_model(model: Model, factor: int, directory: str, overwrite: bool = False) -> Model:
  """`model` widened `factor` times, saved as a HuggingFace checkpoint in `directory` and loaded.

  Args:
    model: a T5 or LLaMA `Model` (exported with `hf_export.save_hf_checkpoint`).
    factor: k, a whole number >= 1.
    directory: where the grown checkpoint is written (as `grow_checkpoint`'s `dst_dir`).
    overwrite: replace an existing `directory`.

  Returns:
    The grown `Model` in the model's dtype, matmul precision and mesh.

  Raises:
    As `grow_checkpoint` and `save_hf_checkpoint`.
  """
  factor = check_factor(factor)
  hf_export.check_destination(directory, overwrite)
  parent = os.path.dirname(os.path.abspath(directory))
  os.makedirs(parent, exist_ok=True)
  with tempfile.TemporaryDirectory(prefix=".grow-source-", dir=parent) as scratch:
    source = os.path.join(scratch, "checkpoint")
    hf_export.save_hf_checkpoint(model, source)
    _grow(source, directory, factor, overwrite, model.name, hf_export.DEFAULT_SHARD_BYTES)
  return load_model(
      directory,
      dtype=model.config.dtype,
      mesh=model.mesh,
      matmul_precision=model.config.matmul_precision,
  )


def _grow(
    src_dir: str, dst_dir: str, factor, overwrite: bool, source_label: str, max_shard_bytes: int
) -> str:
  """`grow_checkpoint` with the source named `source_label` in the growth record."""
  factor = check_factor(factor)
  hf_export.check_destination(dst_dir, overwrite)
  src = checkpoint.resolve_checkpoint_dir(src_dir)
  hf_config = checkpoint.read_config(src)
  arch = registry.architecture(hf_config, os.path.join(src, "config.json"))
  if getattr(arch, "GROWTH_AXES", None) is None:
    raise registry.UnsupportedModelError(
        f"model_type={hf_config.get('model_type')!r} has no growth tables (GROWTH_AXES in "
        f"{arch.__name__}); growth supports T5 and LLaMA checkpoints."
    )
  config = arch.config_for_checkpoint(
      arch.Config.from_hf(hf_config, "float32", checkpoint.read_generation_config(src)),
      checkpoint_tensors.CheckpointTensors(src),
  )
  grown_config = arch.grown_hf_config(hf_config, config, factor) if factor > 1 else dict(hf_config)
  grown_config[GROWTH_FIELD] = _record(hf_config, factor, source_label)
  if factor > 1:
    _check_stored(arch, config, src)
  with hf_export.atomic_directory(dst_dir, overwrite) as temp:
    _copy_files(src, temp, with_weights=factor == 1)
    hf_export.write_json(os.path.join(temp, "config.json"), grown_config)
    if factor > 1:
      with hf_export.TensorWriter(temp, max_shard_bytes) as writer:
        for name, tensor in grown_tensors(arch, config, src, factor):
          writer.add(name, tensor)
  return os.path.abspath(dst_dir)


def _record(hf_config: dict, factor: int, source: str) -> dict:
  record = {"factor": factor, "source": str(source)}
  if GROWTH_FIELD in hf_config:  # grown before: keep the chain
    record["source_growth"] = hf_config[GROWTH_FIELD]
  return record


def _copy_files(src: str, dst: str, with_weights: bool) -> None:
  """Copies the top-level files of `src` except config.json (and the weights, unless asked)."""
  for name in os.listdir(src):
    path = os.path.join(src, name)
    if name == "config.json" or not os.path.isfile(path):
      continue
    if with_weights or not name.endswith(_WEIGHT_SUFFIXES):
      shutil.copyfile(path, os.path.join(dst, name))  # hub snapshots hold symlinks: copy content


def _check_stored(arch, config, src: str) -> None:
  """Every parameter stored and every stored tensor known, before anything is written."""
  weight_map = arch.hf_weight_map(config)
  names = checkpoint_tensors.CheckpointTensors(src).names
  unknown = sorted(n for n in names if n not in weight_map and not arch.is_ignorable(n, config))
  stored_paths = {weight_map[n][0] for n in names if n in weight_map}
  missing = sorted(n for n, (path, _) in weight_map.items() if path not in stored_paths)
  if unknown or missing:
    raise WeightMismatchError(
        f"{src}: cannot grow: unexpected tensor(s) {unknown[:4]}, missing "
        f"tensor(s) {missing[:4]}; config.json does not describe these weights."
    )


def grown_tensors(arch, config, src: str, factor: int) -> Iterator[tuple[str, np.ndarray]]:
  """(HF name, widened tensor) for every stored tensor, then the untied LM head.

  Args:
    arch: the architecture module.
    config: the source's Config (which tables the stored weights tie).
    src: the source checkpoint directory.
    factor: k >= 2.

  Yields:
    numpy arrays in each stored tensor's dtype (computed in float32).
  """
  rules = [
      (re.compile(pattern), widened, contracted)
      for pattern, widened, contracted in arch.GROWTH_AXES
  ]
  for name, tensor in checkpoint_tensors.iter_tensors(src):
    if name != arch.LM_HEAD:  # a stored head (untied, or a tied alias) is written below
      yield name, widen(tensor, *_axes(rules, name, arch), factor)
  weight_map = arch.hf_weight_map(config)
  stored = checkpoint_tensors.CheckpointTensors(src)
  head_path = weight_map[arch.LM_HEAD][0]  # the tied table's parameter when tied
  source = next(n for n, (path, _) in weight_map.items() if path == head_path and n in stored.names)
  head = stored.read(source)
  scaled = (np.asarray(head, np.float32) * np.float32(arch.output_scale(config))).astype(head.dtype)
  yield arch.LM_HEAD, widen(scaled, *_axes(rules, arch.LM_HEAD, arch), factor)


def _axes(rules, name: str, arch) -> tuple[tuple[int, ...], tuple[int, ...]]:
  matches = [
      (widened, contracted) for pattern, widened, contracted in rules if pattern.search(name)
  ]
  if len(matches) != 1:
    raise WeightMismatchError(
        f"tensor {name!r} matches {len(matches)} rows of {arch.__name__}."
        "GROWTH_AXES (exactly one is needed): its growth role is unknown."
    )
  return matches[0]


def widen(tensor, widened: tuple[int, ...], contracted: tuple[int, ...], factor: int) -> np.ndarray:
  """Tiles `tensor` `factor` times along `widened` axes, divided by `factor` per contracted axis.

  Args:
    tensor: an array (numpy, jax or ml_dtypes bfloat16).
    widened: the axes whose units are copied (copy-major: np.tile).
    contracted: the widened axes a product sums over.
    factor: k.

  Returns:
    A numpy array in the tensor's dtype, computed in float32.
  """
  array = np.asarray(tensor)
  if any(axis >= array.ndim for axis in widened) or not set(contracted) <= set(widened):
    raise WeightMismatchError(
        f"growth axes {widened} / {contracted} do not fit a tensor of shape " f"{array.shape}."
    )
  reps = [factor if axis in widened else 1 for axis in range(array.ndim)]
  grown = np.tile(array.astype(np.float32), reps)
  if contracted:
    grown = grown / np.float32(factor ** len(contracted))
  return grown.astype(array.dtype)
