"""Weights as (leaves, treedef) for compiled per-query calls, current after in-place updates.

A compiled function called with a flat list of arrays skips flattening an `nnx.State` in Python on
every call, which the per-query paths (generate, the policy's choice) would otherwise pay. A State
is mutable in place, though: `params["lm_head"]["kernel"][...] = x`, a Variable's `set_value`, or
`nnx.update` on the module the State was split from (they share their Variables) changes a leaf
while the State stays the same object. So the structure (treedef and Variables) is cached per
object, and the values are read again from the Variables on every call (cheap next to
flattening). Imports nothing from the package.
"""

from __future__ import annotations

from typing import Any

import jax
from flax import nnx

_RAW_VALUE = nnx.Variable.get_raw_value


def _is_variable(node) -> bool:
  return isinstance(node, nnx.Variable)


class _FlatTree:
  """The structure of one pytree of Variables and arrays, and how to read its leaves again."""

  def __init__(self, parts: tuple, tree):
    self.parts = parts  # the owner's attributes the tree was built from (compared by identity)
    leaves, self.treedef = jax.tree.flatten(tree)
    self.tree = tree
    holders = jax.tree.leaves(tree, is_leaf=_is_variable)
    # Re-reading is exact only when every Variable flattens to its one raw value, in order.
    self.holders = holders if _one_leaf_each(holders, leaves) else None
    self.is_variable = [_is_variable(h) for h in holders]  # isinstance is slow on Variables: once
    self.all_variables = self.holders is not None and all(self.is_variable)

  def leaves(self) -> list:
    if self.all_variables:
      return list(map(_RAW_VALUE, self.holders))
    if self.holders is None:  # Variables holding several arrays: flatten again (rare, slower)
      return jax.tree.leaves(self.tree)
    return [_RAW_VALUE(h) if variable else h for h, variable in zip(self.holders, self.is_variable)]


def _one_leaf_each(holders: list, leaves: list) -> bool:
  if len(holders) != len(leaves):
    return False
  return all((_RAW_VALUE(h) if _is_variable(h) else h) is leaf for h, leaf in zip(holders, leaves))


def cached_flat_params(owner, *names: str) -> tuple[list, Any]:
  """(leaves, treedef) of `owner.<name>` (one name) or of {name: owner.<name>} (several).

  The structure is flattened once per set of attribute objects (again when one is replaced, e.g.
  `model.params = new_state`); the leaves are read from the Variables on every call, so an
  in-place update of a weight is seen by the next call. A structural change made in place
  (adding or removing entries of the State) is not: assign a new State for that.

  Args:
    owner: the object holding the weights (a `Model`, a `Policy`).
    *names: its attributes to flatten (default: "params").

  Returns:
    (the current leaves, the treedef to unflatten them with inside a compiled function).
  """
  names = names or ("params",)
  parts = tuple(getattr(owner, name) for name in names)
  key = "_flat_cache_" + "_".join(names)
  cached = owner.__dict__.get(key)
  if cached is None or any(new is not old for new, old in zip(parts, cached.parts)):
    tree = parts[0] if len(names) == 1 else dict(zip(names, parts))
    cached = owner.__dict__[key] = _FlatTree(parts, tree)
  return cached.leaves(), cached.treedef
