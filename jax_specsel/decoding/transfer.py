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

MAX_LAYOUTS = 64  # layouts kept per function: a few option sets at a time


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
  """`function(*static, *arrays)` whose result leaves the program packed (`pack`); `unpack`
  rebuilds the result's tree of numpy arrays on the host.

  The layout (the tree, each leaf's shape past the batch axis and dtype) is recorded per static
  arguments when the program is traced, so a call only looks it up.
  """

  def __init__(self, function, num_static: int):
    self.function = function
    self.num_static = num_static
    self._layouts: dict = {}  # static arguments -> (treedef, [(columns, shape, dtype)])
    functools.update_wrapper(self, function)

  def __call__(self, *args) -> jax.Array:
    tree = self.function(*args)
    self._remember(args[:self.num_static], tree)
    return pack(tree)

  def _remember(self, static: tuple, tree) -> None:
    """Records the layout of `tree` (a result, or its shapes): per leaf, its columns, its shape
    past the batch axis and its dtype."""
    leaves, treedef = jax.tree.flatten(tree)
    layout, start = [], 0
    for leaf in leaves:
      width = int(np.prod(leaf.shape[1:], dtype=np.int64))
      layout.append((slice(start, start + width), tuple(leaf.shape[1:]), np.dtype(leaf.dtype)))
      start += width
    if len(self._layouts) >= MAX_LAYOUTS:
      self._layouts.pop(next(iter(self._layouts)))
    self._layouts[static] = (treedef, layout)

  def unpack(self, args: tuple, packed):
    """The result's tree of numpy arrays from the fetched `packed`, for the call `args` (static
    arguments first, as the program was traced with)."""
    packed = np.asarray(packed)
    static = tuple(args[:self.num_static])
    found = self._layouts.get(static)
    if found is None:  # traced before its layout was dropped: trace it again
      self._remember(static, jax.eval_shape(functools.partial(self.function, *static),
                                            *args[self.num_static:]))
      found = self._layouts[static]
    treedef, layout = found
    batch = packed.shape[0]
    return jax.tree.unflatten(treedef, [_column(packed[:, columns], dtype).reshape(batch, *shape)
                                        for columns, shape, dtype in layout])


def _column(columns: np.ndarray, dtype: np.dtype) -> np.ndarray:
  """int32 columns as `dtype`: float32 bits viewed, other dtypes converted."""
  if dtype == np.int32:
    return columns
  if dtype.kind == "f":
    return columns.view(np.float32).astype(dtype, copy=False)
  return columns.astype(dtype)
