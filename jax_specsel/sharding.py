"""Device meshes and sharding rules: tensor-parallel targets, batch-parallel caches and prompts.

One mesh with two named axes (Megatron-style tensor parallelism inside a replica, data
parallelism across replicas), handed to JAX's SPMD partitioner; no collective is written by hand:

  data   splits the batch (prompts, caches, logits). Weights are replicated along it.
  model  splits attention heads, the MLP width and the vocabulary:
           column-parallel  T5 q/k/v, wi/wi_0/wi_1; LLaMA q/k/v_proj, gate/up_proj  [D, heads|F]
           row-parallel     T5 o, wo; LLaMA o_proj, down_proj                       [heads|F, D]
           vocab-parallel   the embedding [V, D] and the LM head [D, V] (so the logits come out
                            split on V: the largest activation of a decode step is never whole
                            on one device); d_model is the fallback when V does not divide.
         Norm scales, T5's relative-position table and row-parallel biases stay replicated: they
         are small, and splitting them would only add collectives.

A tensor whose split dimension does not divide the `model` axis (GQA with 1 key/value head on
model=2, a vocabulary of 32001 on model=8) is replicated instead, and a log line says so.
Divisibility is checked in whole heads, never in head_dim slices, so a split never cuts a head.

Each architecture module owns its rules (`SHARDING_RULES`, found through models/registry.py),
keyed on the nnx flat parameter paths (the ones `nnx.to_flat_state` and the loader's weight maps
use), joined with "/": e.g. "decoder/blocks/0/self_attention/q".

Placing a model's weights (`shard_model`, `replicated_on`) lives with the model, in
models/interface.py: this module knows meshes and rules, not models.

The same rules, evaluated on axis sizes without devices (`param_specs`), drive the memory
estimator (jax_specsel/memory.py), so the estimate and the placed arrays cannot disagree.

Multi-host: the library runs one model replica group per host (`make_mesh` defaults to this
process's local devices) and splits the queries across hosts (jax_specsel/bandit/distributed.py).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import re
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jax_specsel.models import registry

log = logging.getLogger(__name__)

DATA, MODEL = "data", "model"
AXES = (DATA, MODEL)

# A layout names, per tensor dimension, the logical unit it is split in (None: not split). Every
# named dimension goes on the `model` axis; the name picks the unit count that must divide it.
# Each architecture module holds its rules (SHARDING_RULES) and unit counts (`dimensions`);
# an empty tuple of layouts means intentionally replicated (no fallback log line).
Layout = tuple


@dataclasses.dataclass(frozen=True)
class Placement:
  """Where a model's weights live: part of the jit-static `Decoder`, so it must be hashable.

  Attributes:
    mesh: the device mesh (axes `data` and `model`).
    tensor_parallel: True when the weights follow the rules above; False for a drafter
      replicated on every device (its caches are then split on `data` only).
  """

  mesh: Mesh
  tensor_parallel: bool = True


def make_mesh(
    data: int = 1, model: int | None = None, devices: Sequence[jax.Device] | None = None
) -> Mesh:
  """A (data, model) device mesh.

  Args:
    data: replicas of the model, each taking a slice of the batch.
    model: devices per replica (tensor parallelism); default: all devices left after `data`.
    devices: the devices to use; default this process's local devices (one replica group per
      host: hosts split the queries, see bandit/distributed.py).

  Returns:
    A `jax.sharding.Mesh` with axes ("data", "model"), both of `AxisType.Auto` (shardings are
    propagated by the partitioner, not part of the array types).

  Raises:
    ValueError: the axis sizes are not positive, or data * model differs from the device count.
  """
  devices = list(jax.local_devices() if devices is None else devices)
  if data < 1 or (model is not None and model < 1):
    raise ValueError(f"make_mesh(data={data}, model={model}): axis sizes must be >= 1.")
  if model is None:
    if len(devices) % data:
      raise ValueError(
          f"make_mesh(data={data}): {len(devices)} devices do not split into {data} "
          "replicas; pass data and model with data * model == the device count."
      )
    model = len(devices) // data
  if data * model != len(devices):
    raise ValueError(
        f"make_mesh(data={data}, model={model}) needs data * model = {data * model} "
        f"devices but {len(devices)} are available ({devices[0].platform}); choose "
        f"axis sizes whose product is {len(devices)}, or pass devices=[...] explicitly."
    )
  auto = (jax.sharding.AxisType.Auto,) * 2
  # jax.make_mesh orders devices along the physical topology (ICI rings on TPU, NVLink on GPU).
  return jax.make_mesh((data, model), AXES, axis_types=auto, devices=devices)


def axis_sizes(mesh_or_shape) -> dict[str, int]:
  """{"data": d, "model": m} from a Mesh, a (data, model) pair or a dict with those keys.

  Raises:
    ValueError: a mesh without the two axes, or sizes that are not positive integers.
  """
  if isinstance(mesh_or_shape, Mesh):
    sizes = dict(mesh_or_shape.shape)
    if set(sizes) != set(AXES):
      raise ValueError(
          f"the mesh has axes {tuple(sizes)}; this library shards over axes {AXES}: "
          "build it with jax_specsel.make_mesh(data=..., model=...)."
      )
  elif isinstance(mesh_or_shape, Mapping):
    sizes = {axis: mesh_or_shape.get(axis, 1) for axis in AXES}
    unknown = set(mesh_or_shape) - set(AXES)
    if unknown:
      raise ValueError(f"unknown mesh axes {sorted(unknown)}; the axes are {AXES}.")
  else:
    shape = tuple(mesh_or_shape)
    if len(shape) != 2:
      raise ValueError(f"mesh shape {shape}: expected (data, model), e.g. (1, 8).")
    sizes = dict(zip(AXES, shape))
  if not all(isinstance(v, (int, np.integer)) and v >= 1 for v in sizes.values()):
    raise ValueError(f"mesh axis sizes must be positive integers, got {sizes}.")
  return {axis: int(sizes[axis]) for axis in AXES}


def check_mesh(mesh) -> Mesh:
  """Returns `mesh` if it is a Mesh with axes data and model; raises a ValueError saying how to make one."""
  if not isinstance(mesh, Mesh):
    raise ValueError(
        f"mesh must be a jax.sharding.Mesh (jax_specsel.make_mesh(data=..., model=...)), "
        f"got {type(mesh).__name__}."
    )
  axis_sizes(mesh)
  return mesh


@functools.lru_cache(maxsize=None)
def _log_once(message: str) -> None:
  log.info(message)


def _layout_fits(layout: Layout, shape: tuple[int, ...], units: dict[str, int], model: int) -> bool:
  if len(layout) != len(shape):
    return False
  return all(
      name is None or (units[name] % model == 0 and size % model == 0)
      for name, size in zip(layout, shape)
  )


def spec_for(
    path: tuple, shape: tuple[int, ...], config, sizes: Mapping[str, int]
) -> PartitionSpec:
  """The PartitionSpec of one parameter under the rules (see the module docstring).

  Args:
    path: the nnx flat parameter path, e.g. ("layers", 0, "self_attn", "k_proj", "kernel").
    shape: the parameter's shape.
    config: the model config (T5 or LLaMA; other models get every tensor replicated).
    sizes: {"data": d, "model": m}.

  Returns:
    A PartitionSpec over the mesh axes (replicated when no layout divides).
  """
  arch = registry.architecture_of(config)
  if arch is None:
    _log_once(
        f"no sharding rules for {type(config).__module__}.{type(config).__name__} (no "
        "architecture in models/registry.py): every parameter is replicated."
    )
    return PartitionSpec()
  name = "/".join(str(p) for p in path)
  generic = re.sub(r"/\d+/", "/*/", name)  # one log line per kind of tensor, not per layer
  layouts = next(
      (layouts for pattern, layouts in arch.SHARDING_RULES if re.search(pattern, name)), None
  )
  if layouts is None:
    _log_once(f"sharding: no rule matches parameter {generic}; it is replicated.")
    return PartitionSpec()
  model = sizes[MODEL]
  if model == 1 or not layouts:
    return PartitionSpec()
  units = arch.dimensions(config)
  for layout in layouts:
    if _layout_fits(layout, shape, units, model):
      return PartitionSpec(*(None if n is None else MODEL for n in layout))
  wanted = [n for n in layouts[0] if n is not None]
  counts = ", ".join(f"{n}={units[n]}" for n in wanted)
  _log_once(
      f"sharding: {generic} {tuple(shape)} is replicated: its {'/'.join(wanted)} dimension "
      f"({counts}) does not divide the model axis ({model})."
  )
  return PartitionSpec()


def param_specs(model_or_config, mesh_or_shape) -> dict[tuple, PartitionSpec]:
  """Flat parameter path -> PartitionSpec, computed from axis sizes alone (no devices needed).

  Args:
    model_or_config: a loaded `Model`, or an architecture config (t5.Config / llama.Config).
    mesh_or_shape: a Mesh, a (data, model) pair or {"data": d, "model": m}.

  Returns:
    {nnx flat path: PartitionSpec} for every parameter.
  """
  sizes = axis_sizes(mesh_or_shape)
  config, shapes = _config_and_shapes(model_or_config)
  return {path: spec_for(path, shape, config, sizes) for path, shape in shapes.items()}


def _config_and_shapes(model_or_config) -> tuple[Any, dict[tuple, tuple[int, ...]]]:
  params = getattr(model_or_config, "params", None)
  if params is not None:
    flat = nnx.to_flat_state(params)
    return model_or_config.config, {path: tuple(var.get_value().shape) for path, var in flat}
  abstract = nnx.state(abstract_module(model_or_config))
  return model_or_config, {
      path: tuple(var.get_value().shape) for path, var in nnx.to_flat_state(abstract)
  }


@functools.lru_cache(maxsize=8)
def abstract_module(config):
  """The architecture's nnx module for `config` with abstract (shape-only) weights: nothing allocated.

  Cached per config (tracing a large model's initializers is slow); treat it as read-only.

  Raises:
    ValueError: the config belongs to no supported architecture.
  """
  arch = registry.architecture_of(config)
  if arch is None:
    raise ValueError(
        f"{type(config).__name__} is not a config of a supported architecture "
        f"({sorted(registry.ARCHITECTURES)}); pass a loaded Model or a t5/llama Config."
    )
  return nnx.eval_shape(lambda: arch.Module(config, rngs=nnx.Rngs(0)))


def batch_spec(shape: tuple[int, ...], sizes: Mapping[str, int]) -> PartitionSpec:
  """Leading (batch) dimension on `data` when it divides, everything else replicated."""
  data = sizes[DATA]
  if data == 1 or not shape:
    return PartitionSpec()
  if shape[0] % data:
    _log_once(
        f"sharding: batch {shape[0]} does not divide the data axis ({data}); the batch is "
        "replicated (every replica decodes every row). Use a batch size divisible by data."
    )
    return PartitionSpec()
  return PartitionSpec(DATA, *([None] * (len(shape) - 1)))


def cache_spec(
    shape: tuple[int, ...], sizes: Mapping[str, int], tensor_parallel: bool = True
) -> PartitionSpec:
  """Sharding of one cache leaf: [B, L, heads, H] K/V buffers split on batch and heads.

  Args:
    shape: the leaf's shape. Rank-4 leaves follow the decoder protocol's K/V layout
      [B, L, heads, H]; other ranks only have their batch (first) dimension split.
    sizes: {"data": d, "model": m}.
    tensor_parallel: False for a replicated model (heads stay whole on each device).

  Returns:
    The PartitionSpec (heads replicated, with a log line, when they do not divide `model`).
  """
  spec = list(batch_spec(shape, sizes)) + [None] * len(shape)
  spec = spec[: len(shape)]
  model = sizes[MODEL]
  if tensor_parallel and model > 1 and len(shape) == 4:
    if shape[2] % model == 0:
      spec[2] = MODEL
    else:
      _log_once(
          f"sharding: cache {tuple(shape)} keeps its {shape[2]} key/value head(s) replicated: "
          f"they do not divide the model axis ({model})."
      )
  return PartitionSpec(*spec)


def constrain_cache(cache, placement: Placement):
  """Inside jit: pins every cache leaf to its `cache_spec` so the while_loop carry stays sharded."""
  sizes = axis_sizes(placement.mesh)
  return jax.tree.map(
      lambda x: jax.lax.with_sharding_constraint(
          x, NamedSharding(placement.mesh, cache_spec(x.shape, sizes, placement.tensor_parallel))
      ),
      cache,
  )


def place_batch(array, mesh: Mesh) -> jax.Array:
  """Puts a host batch (numpy) on `mesh`, rows split on `data` when they divide."""
  array = np.asarray(array)
  return jax.device_put(array, NamedSharding(mesh, batch_spec(array.shape, axis_sizes(mesh))))


def replicate(value, mesh: Mesh):
  """Puts every leaf of `value` whole on every device of `mesh` (PRNG keys, small tables)."""
  return jax.device_put(value, NamedSharding(mesh, PartitionSpec()))


def bytes_per_device(
    shape: tuple[int, ...], itemsize: int, spec: PartitionSpec, sizes: Mapping[str, int]
) -> int:
  """Bytes one device holds of an array of `shape` split by `spec` (the largest shard)."""
  count = 1
  for dim, axis in zip(shape, tuple(spec) + (None,) * len(shape)):
    split = (
        1
        if axis is None
        else math.prod(sizes[a] for a in ((axis,) if isinstance(axis, str) else axis))
    )
    count *= -(-dim // split)
  return count * itemsize
