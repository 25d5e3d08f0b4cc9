"""A program's result, a pytree of [B, ...] arrays, crossing to the host as one int32 array.

One output buffer and one fetch cost less per call than one per leaf (measurable next to a tiny
model's whole generation); the columns are laid out from the result's own tree, its leaves in
tree order, so no column index is kept by hand.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jax_specsel.decoding import programs


def pack(tree) -> jax.Array:
  """Inside a program: every leaf [B, ...] as int32 columns of one [B, W] array (floats are
  bit-cast from float32, integers and bools converted)."""
  leaves = jax.tree.leaves(tree)
  batch = leaves[0].shape[0]
  columns = []
  for leaf in leaves:
    leaf = leaf.reshape(batch, -1)
    if jnp.issubdtype(leaf.dtype, jnp.floating):
      leaf = jax.lax.bitcast_convert_type(leaf.astype(jnp.float32), jnp.int32)
    columns.append(leaf.astype(jnp.int32))
  return jnp.concatenate(columns, axis=1)


class Packed:
  """`function(spec, *static, *arrays)` whose result leaves the program packed (`pack`);
  `unpack(spec, packed)` rebuilds the result's tree of numpy arrays on the host.

  The layout (the tree, each leaf's columns, shape past the batch axis and dtype) is recorded per
  spec when the program is traced (the spec decides the result's tree and widths), so a call only
  looks it up. Layouts are kept for as many specs as `programs` keeps compiled programs, least
  recently used dropped first: a cached program's layout is always there.
  """

  def __init__(self, function):
    self.function = function
    self._layouts = programs.LruCache(programs.MAX_PROGRAMS)
    functools.update_wrapper(self, function)

  def __call__(self, spec, *args) -> jax.Array:
    tree = self.function(spec, *args)
    leaves, treedef = jax.tree.flatten(tree)
    layout, start = [], 0
    for leaf in leaves:
      width = int(np.prod(leaf.shape[1:], dtype=np.int64))
      layout.append((slice(start, start + width), tuple(leaf.shape[1:]), np.dtype(leaf.dtype)))
      start += width
    self._layouts.put(spec, (treedef, layout))
    return pack(tree)

  def unpack(self, spec, packed):
    """The result's tree of numpy arrays from the fetched `packed` of a program traced with
    `spec`."""
    found = self._layouts.get(spec)
    if found is None:
      raise KeyError(f"no layout for {spec!r}: its program was not traced in this process")
    treedef, layout = found
    packed = np.asarray(packed)
    batch = packed.shape[0]
    return jax.tree.unflatten(
        treedef,
        [
            _column(packed[:, columns], dtype).reshape(batch, *shape)
            for columns, shape, dtype in layout
        ],
    )


def _column(columns: np.ndarray, dtype: np.dtype) -> np.ndarray:
  """int32 columns as `dtype`: float32 bits viewed, other dtypes converted."""
  if dtype == np.int32:
    return columns
  if dtype.kind == "f":
    return columns.view(np.float32).astype(dtype, copy=False)
  return columns.astype(dtype)
