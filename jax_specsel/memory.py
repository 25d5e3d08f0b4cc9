"""Bytes per device of a model on a (data, model) mesh: parameters, caches, context, activations.

Parameters and caches are exact: their shapes come from the architecture itself (`nnx.eval_shape`
of the module and of `init_cache`, nothing allocated) and their splits from the same rules that
place real arrays (jax_specsel/sharding.py), so the estimate equals the bytes of
`array.addressable_shards` on each device. The T5 context (encoder states and every decoder
layer's cross-attention K/V, alive for the whole generation) assumes the partitioner keeps the
heads split the way the K/V kernels are. Activations are a stated rough estimate: the live
temporaries of one layer in the larger of two phases,

  prefill  (T5 encoder / LLaMA prompt, S tokens attending to S keys)
  verify   (a block of gamma + 1 tokens attending to the L cache positions, plus float32 logits
            and the sampling's softmax over the vocabulary)

counting the residual stream, q/k/v, float32 attention scores and probabilities and the MLP
hidden. XLA's buffer assignment fuses some of these and keeps others, so treat the number as
within a small factor; it matters only for long prompts at large batch.

`cache_bytes_per_device` and `free_bytes` serve the generation entry points' check, before
compiling, that the caches a setting asks for can fit at all.
"""

from __future__ import annotations

import dataclasses
import os

import jax
import numpy as np
from flax import nnx
from jax.sharding import PartitionSpec

from jax_specsel import sharding
from jax_specsel.models import checkpoint, registry

GIB = 1024**3


def estimate_memory(
    config,
    mesh_shape=(1, 1),
    batch: int = 1,
    cache_length: int = 128,
    dtype: str | None = None,
    *,
    source_length: int | None = None,
    block_tokens: int = 8,
    tensor_parallel: bool = True,
) -> dict:
  """Bytes per device for one model placed on a mesh.

  Args:
    config: a t5.Config / llama.Config, a parsed HF config.json dict, or a checkpoint directory /
      hub id (only its config.json is read; offline it must be cached).
    mesh_shape: (data, model), {"data": d, "model": m}, or a Mesh.
    batch: rows decoded together (split on `data` when it divides).
    cache_length: K/V cache positions (prompt + new tokens + gamma + 2 for decoder-only models,
      new tokens + gamma + 2 for T5: `LoopSpec.cache_length`).
    dtype: "float32" / "bfloat16" / "float16" (default: the config's, float32 for HF dicts).
    source_length: prompt tokens (T5 encoder length, LLaMA prefill); default cache_length.
    block_tokens: tokens per verify block (gamma + 1).
    tensor_parallel: False for a model replicated on every device (a small drafter).

  Returns:
    {"params", "caches", "context", "activations", "total"}: bytes per device (ints);
    "params_unsharded": bytes of all weights; "mesh", "dtype", "batch", "cache_length",
    "source_length", "num_params" describe the case.

  Raises:
    ValueError: a bad mesh shape, batch or length, or an unknown dtype.
  """
  config = _as_config(config, dtype)
  sizes = sharding.axis_sizes(mesh_shape)
  _check_sizes(batch, cache_length, block_tokens)
  source_length = cache_length if source_length is None else int(source_length)
  module = sharding.abstract_module(config)
  params, unsharded, count = _param_bytes(nnx.state(module), config, sizes, tensor_parallel)
  cache = jax.eval_shape(lambda: module.init_cache(batch, cache_length, config.dtype))
  caches = _cache_tree_bytes(cache, sizes, tensor_parallel)
  context = _context_bytes(config, sizes, batch, source_length, tensor_parallel)
  activations = _activation_bytes(
      config, sizes, batch, cache_length, source_length, block_tokens, tensor_parallel
  )
  return {
      "params": params,
      "caches": caches,
      "context": context,
      "activations": activations,
      "total": params + caches + context + activations,
      "params_unsharded": unsharded,
      "num_params": count,
      "mesh": sizes,
      "dtype": config.dtype,
      "batch": batch,
      "cache_length": cache_length,
      "source_length": source_length,
  }


def _check_sizes(batch: int, cache_length: int, block_tokens: int) -> None:
  if batch < 1 or cache_length < 1 or block_tokens < 1:
    raise ValueError(
        f"batch={batch}, cache_length={cache_length}, block_tokens={block_tokens}: "
        "all must be >= 1."
    )


def _as_config(config, dtype: str | None):
  if isinstance(config, str):
    config = checkpoint.read_hf_config(config)
  if isinstance(config, dict):
    dtype = dtype or "float32"
    _check_dtype(dtype)
    return registry.architecture(config).Config.from_hf(config, dtype)
  if not dataclasses.is_dataclass(config):
    raise ValueError(
        f"config must be a model Config, a config.json dict or a checkpoint path, got "
        f"{type(config).__name__}."
    )
  if dtype is not None:
    _check_dtype(dtype)
    config = dataclasses.replace(config, dtype=dtype)
  return config


def _check_dtype(dtype: str) -> None:
  if dtype not in checkpoint.DTYPES:
    raise ValueError(f"dtype={dtype!r} is not supported; use one of {sorted(checkpoint.DTYPES)}.")


def _param_bytes(abstract, config, sizes, tensor_parallel) -> tuple[int, int, int]:
  per_device = unsharded = count = 0
  for path, var in nnx.to_flat_state(abstract):
    value = var.get_value()
    spec = (
        sharding.spec_for(path, value.shape, config, sizes) if tensor_parallel else PartitionSpec()
    )
    per_device += sharding.bytes_per_device(value.shape, value.dtype.itemsize, spec, sizes)
    unsharded += value.size * value.dtype.itemsize
    count += value.size
  return per_device, unsharded, count


def _context_bytes(config, sizes, batch, source_length, tensor_parallel) -> int:
  """What `prepare` returns, per device: the architecture's formula (`context_bytes`)."""
  arch = registry.architecture_of(config)
  heads = arch.dimensions(config)["heads"]
  return arch.context_bytes(
      config,
      _split(batch, sizes[sharding.DATA]),
      source_length,
      _split(heads, sizes[sharding.MODEL] if tensor_parallel else 1),
  )


def _split(count: int, parts: int) -> int:
  """Per-device share of `count` items split `parts` ways (whole when it does not divide)."""
  return count // parts if count % parts == 0 else count


def _activation_bytes(
    config, sizes, batch, cache_length, source_length, block_tokens, tensor_parallel
) -> int:
  """Live temporaries of one layer in the larger of prefill and verify (module docstring)."""
  itemsize = np.dtype(checkpoint.DTYPES[config.dtype]).itemsize
  model = sizes[sharding.MODEL] if tensor_parallel else 1
  b = _split(batch, sizes[sharding.DATA])
  widths = registry.architecture_of(config).dimensions(config)
  width, head_dim, mlp_tensors = widths["embed"], widths["head_dim"], widths["mlp_hidden_tensors"]
  heads, ffn = _split(widths["heads"], model), _split(widths["mlp"], model)
  vocab = _split(widths["vocab"], model)

  def layer(tokens: int, keys: int) -> int:
    residual = 3 * b * tokens * width * itemsize  # stream, normed input, block output
    qkv = 3 * b * tokens * heads * head_dim * itemsize
    scores = 2 * b * heads * tokens * keys * 4  # float32 scores and probabilities
    return residual + qkv + scores + mlp_tensors * b * tokens * ffn * itemsize

  prefill = layer(source_length, source_length)
  verify = layer(block_tokens, cache_length) + 3 * b * block_tokens * vocab * 4  # logits, softmax
  return max(prefill, verify)


def format_estimate(name: str, estimate: dict) -> str:
  """One human-readable line per model: GiB per device and the case it describes."""
  gib = lambda key: f"{estimate[key] / GIB:.2f}"
  mesh = estimate["mesh"]
  return (
      f"{name}: {gib('total')} GiB/device on mesh data={mesh['data']} x model={mesh['model']} "
      f"({estimate['dtype']}, batch {estimate['batch']}, cache {estimate['cache_length']}, "
      f"source {estimate['source_length']}): params {gib('params')} "
      f"(of {gib('params_unsharded')} for {estimate['num_params'] / 1e9:.2f}B), caches "
      f"{gib('caches')}, context {gib('context')}, activations ~{gib('activations')}"
  )


def cache_bytes_per_device(model, batch: int, cache_length: int) -> int:
  """Bytes one device holds of the K/V caches `model.decoder.init_cache` builds (nothing is
  allocated: the shapes come from an abstract evaluation of the model's own `init_cache`).

  Args:
    model: a loaded `Model` (any architecture speaking the decoder protocol, early exits too).
    batch, cache_length: the cache's rows and positions.
  """
  cache = jax.eval_shape(
      lambda params: model.decoder.init_cache(params, batch, cache_length), model.params
  )
  placement = model.decoder.placement
  sizes = sharding.axis_sizes((1, 1) if placement is None else placement.mesh)
  tensor_parallel = placement is not None and placement.tensor_parallel
  return _cache_tree_bytes(cache, sizes, tensor_parallel)


def _cache_tree_bytes(cache, sizes, tensor_parallel: bool) -> int:
  """Bytes per device of a cache pytree (of arrays or shapes) split by the cache rules."""
  return sum(
      sharding.bytes_per_device(
          x.shape, x.dtype.itemsize, sharding.cache_spec(x.shape, sizes, tensor_parallel), sizes
      )
      for x in jax.tree.leaves(cache)
  )


def free_bytes(mesh=None) -> tuple[int, str] | None:
  """(bytes a new buffer may still take per device, where that number comes from), or None.

  Accelerators report it (`memory_stats()`: bytes_limit - bytes_in_use, the least over the mesh's
  devices). On the CPU backend the buffers live in host RAM: its total size (`os.sysconf`) is the
  bound, so only what can never fit is refused. None where neither is known.
  """
  devices = jax.local_devices()[:1] if mesh is None else list(mesh.devices.flat)
  stats = [_memory_stats(device) for device in devices]
  if all(s and "bytes_limit" in s for s in stats):
    free = min(s["bytes_limit"] - s.get("bytes_in_use", 0) for s in stats)
    return free, f"free on {devices[0].platform} device memory (memory_stats)"
  if all(device.platform == "cpu" for device in devices):
    try:
      return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"), "host RAM in total"
    except (ValueError, OSError, AttributeError):  # no such sysconf name on this system
      return None
  return None


def _memory_stats(device) -> dict | None:
  try:
    return device.memory_stats()
  except Exception:  # some backends raise instead of returning None
    return None
