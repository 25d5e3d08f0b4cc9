"""The one decoder protocol every model speaks, and `Model`: weights + tokenizer + that protocol.

Every architecture (T5, LLaMA, an early-exit view of LLaMA) is an nnx module with four methods:

  prepare(prompt_ids[B,S], prompt_mask[B,S], cache, num_layers=None) -> (context, cache)
      T5: runs the encoder once and precomputes cross-attention K/V (cache passes through).
      LLaMA: prefills the whole (right-padded) prompt into the cache at positions 0..S-1.
  init_cache(batch, max_len, dtype, num_layers=None) -> cache
      Fixed-shape K/V buffers indexed by absolute position (a pytree, no mutable collections).
  decode(tokens[B,T], start[B], cache, context, num_layers=None) -> (logits[B,T,V] float32, cache)
      Writes K/V at absolute positions start..start+T-1 of each row (positions outside
      [0, max_len) are dropped) and attends causally by absolute position. Rolling back rejected
      draft tokens costs nothing: the next call overwrites from the new length.
  embed(context) -> [B, D] float32
      The query representation for the policy: T5 mean-pools encoder states over real tokens;
      LLaMA takes the final (normed) hidden state of the last real prompt token.

`num_layers` lets an early-exit view run only the first k decoder layers (then the final norm
and the shared LM head); T5 ignores it.

`Decoder` is the static, hashable half (graph definition + exit layer) that jit treats as a
compile-time constant; the weights travel separately as an `nnx.State` pytree argument so they are
never baked into the HLO.

Matrix-product precision: every `Decoder` method traces its module under
`jax.default_matmul_precision(matmul_precision(config))`, so the setting is baked into each
compiled program (visible as `precision = [HIGHEST, HIGHEST]` on the dots of the lowered HLO)
and, being part of the config inside the graph definition, part of every compile key. The
default "auto" is "highest" for float32 models: on recent NVIDIA GPUs JAX otherwise runs float32
dots as TF32 (~1e-3 relative error); bfloat16/float16 models keep JAX's default.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from jax_specsel import sharding, token_batches
from jax_specsel.flat_params import cached_flat_params

log = logging.getLogger(__name__)

Cache = Any  # a pytree of fixed-shape arrays
Context = Any  # a dict of arrays produced by `prepare`

AUTO_PRECISION = "auto"


def check_matmul_precision(value: str) -> str:
  """Returns `value` if it is "auto" or a name `jax.default_matmul_precision` accepts.

  Raises:
    ValueError: naming the accepted values.
  """
  if value == AUTO_PRECISION:
    return value
  try:
    with jax.default_matmul_precision(value):
      pass
  except (ValueError, TypeError) as err:
    raise ValueError(
        f"matmul_precision={value!r} is not supported: use 'auto' (float32: "
        "'highest'; other dtypes: JAX's default), 'highest', or 'default' / "
        f"'tensorfloat32' for TF32 on GPUs ({err})."
    ) from None
  return value


def matmul_precision(config) -> str | None:
  """The precision a model's products run at: None means JAX's default (the global setting).

  Args:
    config: an architecture config; its `matmul_precision` field ("auto" when absent) and dtype.

  Returns:
    "highest" for "auto" with float32 parameters, None for "auto" otherwise, else the field.
  """
  requested = getattr(config, "matmul_precision", AUTO_PRECISION)
  if requested != AUTO_PRECISION:
    return requested
  return "highest" if getattr(config, "dtype", "float32") == "float32" else None


@dataclasses.dataclass(frozen=True)
class Decoder:
  """Static half of a model: everything jit must know at trace time, nothing it must not."""

  graphdef: Any  # nnx.GraphDef of the architecture module (config included)
  exit_layers: int | None = None  # early-exit view: run only the first k decoder layers
  placement: sharding.Placement | None = None  # the mesh the weights live on (None: one device)

  def __post_init__(self):
    # Hashing a GraphDef walks the whole module graph, and every generate() call looks its
    # compiled loop up by a key holding two decoders: so hash once.
    object.__setattr__(self, "_hash", hash((self.graphdef, self.exit_layers, self.placement)))

  def __hash__(self) -> int:
    return self._hash

  def _module(self, params):
    return nnx.merge(self.graphdef, params)

  def _precision(self, module):
    """The matmul-precision context every method traces under (see the module docstring)."""
    precision = matmul_precision(module.config)
    return (
        contextlib.nullcontext() if precision is None else jax.default_matmul_precision(precision)
    )

  def _constrain(self, cache):
    # Pin caches to the mesh: the zeros of init_cache carry no sharding of their own, and the
    # partitioner may otherwise keep a whole (replicated) cache on every device.
    return cache if self.placement is None else sharding.constrain_cache(cache, self.placement)

  def prepare(self, params, prompt_ids, prompt_mask, cache):
    module = self._module(params)
    with self._precision(module):
      context, cache = module.prepare(prompt_ids, prompt_mask, cache, num_layers=self.exit_layers)
    return context, self._constrain(cache)

  def init_cache(self, params, batch: int, max_len: int):
    module = self._module(params)
    cache = module.init_cache(batch, max_len, module.config.dtype, num_layers=self.exit_layers)
    return self._constrain(cache)

  def decode(self, params, tokens, start, cache, context):
    module = self._module(params)
    with self._precision(module):
      logits, cache = module.decode(tokens, start, cache, context, num_layers=self.exit_layers)
    return logits, self._constrain(cache)

  def embed(self, params, context):
    module = self._module(params)
    with self._precision(module):
      return module.embed(context)


@functools.partial(jax.jit, static_argnums=0)
def full_logits(decoder: Decoder, params, input_ids, attention_mask, decoder_input_ids):
  """Uncached forward pass through the protocol: prepare, then one decode call from position 0.

  Jitted with `decoder` static; `Model.logits` is its eager front, and `.lower(...)` gives the
  program whose products the precision tests read.

  Args:
    decoder: the model's static `Decoder`.
    params: its weights.
    input_ids: int [B, S]; decoder-only rows right-aligned (real tokens first).
    attention_mask: {0,1} [B, S].
    decoder_input_ids: int [B, T] for an encoder-decoder model, None for a decoder-only one.

  Returns:
    float32 [B, T, V] logits (T = S for a decoder-only model).
  """
  batch = input_ids.shape[0]
  if decoder_input_ids is None:  # decoder-only: the prompt itself is decoded from position 0
    tokens = input_ids
    cache = decoder.init_cache(params, batch, input_ids.shape[1])
    context = None  # decoder-only decode needs no context
  else:
    tokens = decoder_input_ids
    cache = decoder.init_cache(params, batch, decoder_input_ids.shape[1])
    context, cache = decoder.prepare(params, input_ids, attention_mask, cache)
  start = jnp.zeros((batch,), jnp.int32)
  logits, _ = decoder.decode(params, tokens, start, cache, context)
  return logits


def _on_device(ids: np.ndarray, mask: np.ndarray) -> tuple[jax.Array, jax.Array]:
  return jnp.asarray(ids.astype(np.int32)), jnp.asarray(mask.astype(np.int32))


@functools.partial(jax.jit, static_argnums=0)
def _embed(decoder: Decoder, params, input_ids, attention_mask):
  cache = decoder.init_cache(params, input_ids.shape[0], input_ids.shape[1])
  context, _ = decoder.prepare(params, input_ids, attention_mask, cache)
  return decoder.embed(params, context)


class Model:
  """A loaded model: config, weights, tokenizer and the decoder protocol.

  Attributes:
    decoder: the static `Decoder` (graph definition, exit layer) used as a jit constant.
    params: the weights, an `nnx.State` pytree.
    config: the architecture's frozen config dataclass (`T5Config` or `LlamaConfig`).
    tokenizer: a transformers tokenizer, or None when the directory holds no tokenizer files.
    name: where the model came from (directory or hub id), for tables and logs.
    mesh: the device mesh the weights are placed on (None: a single device).
  """

  def __init__(
      self,
      module: nnx.Module,
      tokenizer=None,
      name: str = "model",
      exit_layers: int | None = None,
      placement: sharding.Placement | None = None,
  ):
    graphdef, params = nnx.split(module)
    self.decoder = Decoder(graphdef, exit_layers, placement)
    self.params = params
    self.config = module.config
    self.tokenizer = tokenizer
    self.name = name if exit_layers is None else f"{name}@layer{exit_layers}"

  def flat_params(self) -> tuple[list, Any]:
    """(leaves, treedef) of `params`, current after in-place updates: see
    `jax_specsel.flat_params.cached_flat_params`."""
    return cached_flat_params(self, "params")

  @classmethod
  def _from_parts(cls, decoder, params, config, tokenizer, name):
    model = cls.__new__(cls)
    model.decoder, model.params, model.config = decoder, params, config
    model.tokenizer, model.name = tokenizer, name
    return model

  # ----- facts the decoding loop and the bandit need -----
  @property
  def is_encoder_decoder(self) -> bool:
    return self.config.is_encoder_decoder

  @property
  def vocab_size(self) -> int:
    return self.config.vocab_size

  @property
  def pad_id(self) -> int:
    return self.config.pad_token_id

  @property
  def eos_ids(self) -> tuple[int, ...]:
    """Every stop id (empty: generation runs to max_new_tokens), as transformers' generate."""
    ids = getattr(self.config, "eos_token_ids", None)
    if ids is None:  # a config with a single `eos_token_id` field (tests' fake models)
      eos = self.config.eos_token_id
      ids = () if eos is None else (eos,)
    return tuple(int(i) for i in ids)

  @property
  def eos_id(self) -> int | None:
    """The first stop id, or None when the model has none."""
    return self.eos_ids[0] if self.eos_ids else None

  @property
  def decoder_start_id(self) -> int | None:
    return self.config.decoder_start_token_id if self.is_encoder_decoder else None

  @property
  def max_positions(self) -> int | None:
    """Longest sequence the model supports (None: relative positions, no hard limit)."""
    return getattr(self.config, "max_position_embeddings", None)

  @property
  def hidden_size(self) -> int:
    return self.config.hidden_size

  @property
  def exit_layers(self) -> int | None:
    return self.decoder.exit_layers

  @property
  def mesh(self):
    """The `jax.sharding.Mesh` holding the weights, or None on a single device."""
    return None if self.decoder.placement is None else self.decoder.placement.mesh

  @property
  def num_params(self) -> int:
    """Parameters this model actually runs (an early-exit view counts only its layers)."""
    total = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(self.params))
    if self.exit_layers is None:
      return total
    per_layer = self.config.params_per_decoder_layer
    return total - per_layer * (self.config.num_decoder_layers - self.exit_layers)

  # ----- eager conveniences (numpy in, numpy out) -----
  # Left- and right-padded batches give the same values on the real tokens: a decoder-only model
  # reads positions from the layout, so its rows are right-aligned first (as `generate` does) and
  # its logits moved back to the columns given. T5 reads the mask (holes in it are allowed there).
  def logits(self, input_ids, decoder_input_ids=None, attention_mask=None) -> np.ndarray:
    """Full forward logits.

    Args:
      input_ids: int [B, S] (or [S], or a list of id lists: right-padded with the pad id), padded
        with any id where `attention_mask` is 0, on either side (left or right padding give the
        same logits on the real tokens).
      decoder_input_ids: int [B, T] (T5 only; required there): decoder inputs starting with the
        decoder start token. Must be None for decoder-only models.
      attention_mask: {0,1} [B, S], 1 for real tokens; default all ones.

    Returns:
      float32 numpy [B, T, V]: logits at every decoder position (T = S for decoder-only models).
    """
    ids, mask = self._host_batch(input_ids, attention_mask)
    if self.is_encoder_decoder and decoder_input_ids is None:
      raise ValueError(
          f"{self.name} is an encoder-decoder model: pass decoder_input_ids "
          f"(starting with decoder_start_token_id={self.decoder_start_id})."
      )
    if not self.is_encoder_decoder and decoder_input_ids is not None:
      raise ValueError(
          f"{self.name} is decoder-only: pass the whole sequence as input_ids and "
          "leave decoder_input_ids=None."
      )
    if decoder_input_ids is not None:
      decoder_input_ids = jnp.asarray(np.asarray(decoder_input_ids, np.int32))
    aligned, aligned_mask = self._aligned(ids, mask)
    out = np.asarray(
        full_logits(
            self.decoder, self.params, *_on_device(aligned, aligned_mask), decoder_input_ids
        ),
        np.float32,
    )
    return out if self.is_encoder_decoder else token_batches.original_layout(out, mask)

  def embed(self, input_ids, attention_mask=None) -> np.ndarray:
    """Query embedding for the policy: float32 numpy [B, D] (see the module docstring); left- and
    right-padded batches embed alike."""
    ids, mask = self._aligned(*self._host_batch(input_ids, attention_mask))
    return np.asarray(_embed(self.decoder, self.params, *_on_device(ids, mask)), np.float32)

  def _host_batch(self, input_ids, attention_mask) -> tuple[np.ndarray, np.ndarray]:
    """ids and mask [B, S] from any form `token_batches.as_id_batch` takes."""
    return token_batches.as_id_batch(input_ids, attention_mask, self.pad_id, name="input_ids")

  def _aligned(self, ids: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Decoder-only rows with their real tokens first (the layout their positions assume)."""
    return (ids, mask) if self.is_encoder_decoder else token_batches.right_aligned(ids, mask)

  def early_exit(self, layers: int) -> "Model":
    """A drafter made of the first `layers` decoder layers + final norm + the shared LM head.

    The view shares the target's weights (no copy). LLaMA only.
    """
    if self.is_encoder_decoder:
      raise ValueError("early_exit is for decoder-only (LLaMA) targets; T5 has no early-exit view.")
    total = self.config.num_decoder_layers
    if not 1 <= layers <= total:
      raise ValueError(
          f"early_exit(layers={layers}): must be between 1 and the model's {total} layers."
      )
    decoder = Decoder(self.decoder.graphdef, layers, self.decoder.placement)
    base = self.name.split("@")[0]
    return Model._from_parts(
        decoder, self.params, self.config, self.tokenizer, f"{base}@layer{layers}"
    )

  def __repr__(self):
    kind = "encoder-decoder" if self.is_encoder_decoder else "decoder-only"
    where = "" if self.mesh is None else f", mesh={dict(self.mesh.shape)}"
    return (
        f"Model({self.name!r}, {kind}, {self.num_params / 1e6:.2f}M params, "
        f"dtype={self.config.dtype}{where})"
    )


def decode_text(model: Model, out) -> list[str]:
  """Generated ids (an output with `tokens` [B, T] and `lengths` [B]) -> text through the model's
  tokenizer (special tokens dropped)."""
  return model.tokenizer.batch_decode(
      [row[:n] for row, n in zip(out.tokens.tolist(), out.lengths)], skip_special_tokens=True
  )


# ----------------------------------------------------------------------------- placement
def _flat_path(keypath) -> tuple:
  return tuple(k.key for k in keypath if isinstance(k, jax.tree_util.DictKey))


def shard_model(model: Model, mesh: jax.sharding.Mesh, replicated: bool = False) -> Model:
  """A copy of a loaded model with its weights placed on `mesh`.

  Args:
    model: a `Model` (on one device, or already placed).
    mesh: from `jax_specsel.make_mesh`.
    replicated: put every weight whole on every device (for small drafters: no collective per
      draft step) instead of following the tensor-parallel rules.

  Returns:
    A `Model` sharing the tokenizer and config, whose decoder carries the placement (its caches
    are constrained to the mesh inside the compiled loop). Early-exit views of a sharded target
    (`model.early_exit(k)`) share its placement.
  """
  sharding.check_mesh(mesh)
  specs = {} if replicated else sharding.param_specs(model, mesh)
  params = jax.tree_util.tree_map_with_path(
      lambda kp, x: jax.device_put(
          x, NamedSharding(mesh, specs.get(_flat_path(kp), PartitionSpec()))
      ),
      model.params,
  )
  decoder = Decoder(
      model.decoder.graphdef,
      model.decoder.exit_layers,
      sharding.Placement(mesh, tensor_parallel=not replicated),
  )
  return Model._from_parts(decoder, params, model.config, model.tokenizer, model.name)


def replicated_on(model: Model, mesh: jax.sharding.Mesh) -> Model:
  """`model` replicated whole on every device of `mesh`, made once per (model, mesh).

  What `generate` does with a single-device drafter next to a sharded target. The copy is cached
  on the model, made again when a weight of `model.params` changed (replaced or updated in
  place), and its creation is logged.

  Args:
    model: a `Model` on one device.
    mesh: the target's mesh.

  Returns:
    `shard_model(model, mesh, replicated=True)`, the same object on every later call.
  """
  replicas = model.__dict__.setdefault("_replicas_by_mesh", {})
  leaves, _ = model.flat_params()
  source, replica = replicas.get(mesh, (None, None))
  if (
      replica is None
      or len(source) != len(leaves)
      or any(a is not b for a, b in zip(source, leaves))
  ):
    log.info(
        "replicating drafter %s (%.1fM parameters) onto the target's mesh %s; done once per "
        "drafter and mesh",
        model.name,
        model.num_params / 1e6,
        dict(mesh.shape),
    )
    replica = shard_model(model, mesh, replicated=True)
    replicas[mesh] = (leaves, replica)
  return replica
