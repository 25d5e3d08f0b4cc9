"""The policy's network and its forward functions: the static half of a policy, no weights.

`PolicyNetwork` is the paper's MLP (section 3.1). The forward functions take the weights as
arguments and close over the graph definition only, so one compiled program serves every policy of
one shape; `PolicyProgram` carries the graph into a program that chooses inside itself.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx


class PolicyNetwork(nnx.Module):
  """MLP from a query embedding [B, D] to option logits [B, K], tanh between layers.

  Initialization is flax's default (LeCun-normal kernels, zero biases), not PyTorch's uniform
  one that the paper inherited; at 3 layers of 512 this makes no measurable difference.
  """

  def __init__(
      self,
      input_dim: int,
      num_options: int,
      hidden_dim: int = 512,
      num_layers: int = 3,
      *,
      rngs: nnx.Rngs,
  ):
    for name, value in (
        ("input_dim", input_dim),
        ("num_options", num_options),
        ("hidden_dim", hidden_dim),
        ("num_layers", num_layers),
    ):
      if value < 1:  # a width of 0 fails later inside the initializer (division by the fan-in)
        raise ValueError(f"{name} must be >= 1, got {value}")
    widths = [input_dim] + [hidden_dim] * (num_layers - 1) + [num_options]
    self.layers = nnx.List(
        [nnx.Linear(fan_in, fan_out, rngs=rngs) for fan_in, fan_out in zip(widths[:-1], widths[1:])]
    )

  def __call__(self, embeddings: jax.Array) -> jax.Array:
    hidden = embeddings  # [B, D]
    for layer in self.layers[:-1]:
      hidden = jnp.tanh(layer(hidden))  # [B, H]
    return self.layers[-1](hidden)  # [B, K]


def standardized_logits(graphdef, params, input_mean, input_scale, embeddings):
  """Option logits [M, K] of embeddings [M, D]: standardize, then the MLP (the one forward pass
  the trainer, the policy's own calls and the fused serving program all use)."""
  network = nnx.merge(graphdef, params)
  return network((embeddings - input_mean) / input_scale)


@dataclasses.dataclass(frozen=True)
class PolicyProgram:
  """The static half of a policy (as `Decoder` is for a model): its graph, hashed once.

  A compiled program that chooses inside itself (`jax_specsel.decoding.generate_selected`) takes
  this as a compile-time constant and the policy's arrays (`Policy.program_inputs()`) as arguments.
  """

  graphdef: Any

  def __post_init__(self):
    # Hashing a GraphDef walks the module graph; a per-query compile-cache lookup should not.
    object.__setattr__(self, "_hash", hash(self.graphdef))

  def __hash__(self) -> int:
    return self._hash

  def logits(self, inputs: dict, embeddings: jax.Array) -> jax.Array:
    """[M, K] option logits; inputs: {"params", "input_mean", "input_scale"} (program_inputs)."""
    return standardized_logits(
        self.graphdef, inputs["params"], inputs["input_mean"], inputs["input_scale"], embeddings
    )


def _finite_rows(embeddings):
  """[M] bool: the rows free of NaN/inf (the argmax of NaN logits would silently be option 0)."""
  return jnp.all(jnp.isfinite(embeddings), axis=-1)


def _probabilities(graphdef, params, input_mean, input_scale, embeddings):
  probabilities = jax.nn.softmax(
      standardized_logits(graphdef, params, input_mean, input_scale, embeddings), axis=-1
  )
  return probabilities, _finite_rows(embeddings)


def _choices(graphdef, params, input_mean, input_scale, embeddings, key, greedy):
  """Option per row; -1 marks a row holding NaN/inf, which the caller refuses by index."""
  logits = standardized_logits(graphdef, params, input_mean, input_scale, embeddings)
  if greedy:
    choices = jnp.argmax(logits, axis=-1).astype(jnp.int32)
  else:
    choices = jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)
  return jnp.where(_finite_rows(embeddings), choices, -1)


def _single_choice(graphdef, treedef, leaves, input_mean, input_scale, embedding, key, greedy):
  params = jax.tree.unflatten(treedef, leaves)  # flat leaves: no nnx.State flattening per call
  return _choices(graphdef, params, input_mean, input_scale, embedding[None, :], key, greedy)[0]


@functools.lru_cache(maxsize=64)
def jitted_functions(graphdef) -> tuple[Callable, Callable, Callable]:
  """Jitted (probabilities, batch choices, single choice) bound to one graph definition.

  The graph definition is bound here rather than passed as a static argument, whose hash (a walk
  of the module graph) would land on every per-query call. Cached, so policies of the same shape
  share the compiled code. The weights stay arguments, never baked into the compiled program.
  """
  return (
      jax.jit(functools.partial(_probabilities, graphdef)),
      jax.jit(functools.partial(_choices, graphdef), static_argnums=5),
      jax.jit(functools.partial(_single_choice, graphdef), static_argnums=(0, 6)),
  )
