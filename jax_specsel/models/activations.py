"""Activation functions by the names transformers' ACT2FN uses (those without parameters).

An architecture's config.json names its activation (T5's `feed_forward_proj`, e.g. "gated-gelu");
this table maps the name to the jax function with the same numerics (gelu_new is the tanh form).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp


def _gelu_exact(x):
  return jax.nn.gelu(x, approximate=False)


def _gelu_tanh(x):
  return jax.nn.gelu(x, approximate=True)


# transformers' ACT2FN names that have no parameters -> jax functions (gelu_new is the tanh form).
ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "relu": jax.nn.relu,
    "gelu": _gelu_exact,
    "gelu_python": _gelu_exact,
    "gelu_new": _gelu_tanh,
    "gelu_fast": _gelu_tanh,
    "gelu_accurate": _gelu_tanh,
    "gelu_pytorch_tanh": _gelu_tanh,
    "gelu_python_tanh": _gelu_tanh,
    "gelu_10": lambda x: jnp.clip(_gelu_exact(x), -10.0, 10.0),
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "mish": lambda x: x * jnp.tanh(jax.nn.softplus(x)),
    "tanh": jnp.tanh,
    "sigmoid": jax.nn.sigmoid,
    "relu2": lambda x: jnp.square(jax.nn.relu(x)),
    "relu6": jax.nn.relu6,
    "leaky_relu": lambda x: jax.nn.leaky_relu(x, 0.01),
    "linear": lambda x: x,
}
