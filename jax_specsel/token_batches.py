"""Token-id batches on the host (numpy, no device op): checked conversion of every accepted prompt
form to [B, S] ids and a 0/1 mask, right padding of ragged rows, right alignment (and moving
per-position results back), batch filling.

`decoding.request.pad_prompts` (prompts -> their bucket, checked against a model) and
`Model.logits` / `Model.embed` build their batches here. Imports nothing from the package.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


def as_id_batch(
    prompt_ids, attention_mask, pad_id: int, name: str = "prompt_ids"
) -> tuple[np.ndarray, np.ndarray]:
  """(ids int64 [B, S], mask int64 [B, S]) from any accepted prompt form, checked.

  Args:
    prompt_ids: an integer array [B, S] or [S], a list of B id lists of any lengths (ragged rows
      are right-padded with `pad_id`), or a 1-D numpy object array of id arrays.
    attention_mask: 0/1 of the ids' shape, or None (every token is real). Kept as given: padding
      may sit on either side (`right_aligned` moves it to the right).
    pad_id: the id that fills ragged rows.
    name: how the ids are called in error messages.

  Returns:
    (ids, mask), both int64 [B, S].

  Raises:
    TypeError: ids that are not integers. ValueError: a malformed batch or mask.
  """
  if isinstance(prompt_ids, np.ndarray) and prompt_ids.dtype == object and prompt_ids.ndim == 1:
    prompt_ids = list(prompt_ids)  # a ragged numpy array: one id sequence per element
  if _is_row_list(prompt_ids):
    rows = [_id_array(row, f"{name}[{i}]") for i, row in enumerate(prompt_ids)]
    for i, row in enumerate(rows):
      if row.ndim != 1:
        raise ValueError(f"{name}[{i}] has shape {row.shape}: each row must be a flat list of ids.")
    if attention_mask is None:
      return right_padded(rows, pad_id)
    if len({len(row) for row in rows}) > 1:
      raise ValueError(
          "attention_mask given with prompt rows of different lengths: pass either "
          "ragged id lists (their lengths mark the real tokens) or a padded [B, S] "
          "array with its mask."
      )
    ids = np.stack(rows)
  else:
    ids = _id_array(prompt_ids, name)
  one_prompt = ids.ndim == 1
  ids = ids[None] if one_prompt else ids
  if ids.ndim != 2 or ids.shape[0] == 0 or ids.shape[1] == 0:
    raise ValueError(
        f"{name} must be [batch, length] with batch >= 1 and length >= 1, got "
        f"shape {ids.shape}."
    )
  return ids, _checked_mask(attention_mask, ids.shape, one_prompt, name)


def _is_row_list(prompt_ids) -> bool:
  if not isinstance(prompt_ids, (list, tuple)) or not prompt_ids:
    return False
  try:
    return np.ndim(prompt_ids[0]) > 0
  except ValueError:  # a ragged element: let _id_array name it
    return True


def _id_array(values, name: str) -> np.ndarray:
  """int64 ids from an array-like, refusing floats, objects and ragged nesting (no truncation)."""
  try:
    array = np.asarray(values)
  except ValueError:  # numpy refuses inhomogeneous nesting
    raise ValueError(
        f"{name} is ragged (nested sequences of different lengths): pass a list of "
        "flat id lists, or a padded [B, S] array with an attention_mask."
    ) from None
  if array.size == 0:
    return array.astype(np.int64)
  if array.dtype == object:
    raise TypeError(
        f"{name} holds Python objects (dtype object): pass integer token ids, as a "
        "list of id lists or an integer array."
    )
  if array.dtype.kind not in "iu":
    raise TypeError(
        f"{name} has dtype {array.dtype}: token ids must be integers (they are not "
        "truncated; cast whole-number ids with .astype(np.int32))."
    )
  return array.astype(np.int64)


def right_padded(
    rows, pad_id: int = 0, width: int | None = None, dtype=np.int64
) -> tuple[np.ndarray, np.ndarray]:
  """Ragged id rows written left-aligned into one array, `pad_id` after each row.

  Args:
    rows: B sequences of ids (lists or 1-D arrays), each at most `width` long.
    pad_id: the id after each row's end.
    width: columns S (default: the longest row, at least 1).
    dtype: of both arrays.

  Returns:
    (ids [B, S], mask [B, S]: 1 on each row's own ids).
  """
  width = max(max(len(row) for row in rows), 1) if width is None else width
  ids = np.full((len(rows), width), pad_id, dtype)
  mask = np.zeros((len(rows), width), dtype)
  for i, row in enumerate(rows):
    ids[i, : len(row)], mask[i, : len(row)] = row, 1
  return ids, mask


def _checked_mask(
    attention_mask, shape: tuple[int, int], one_prompt: bool, name: str
) -> np.ndarray:
  """The mask as int64 of `shape`; refuses other shapes and values other than 0 and 1."""
  if attention_mask is None:
    return np.ones(shape, np.int64)
  mask = np.asarray(attention_mask)
  if one_prompt and mask.ndim == 1:
    mask = mask[None]
  if mask.shape != shape:
    raise ValueError(
        f"attention_mask has shape {np.shape(attention_mask)} but {name} has "
        f"shape {shape if not one_prompt else shape[1:]}: pass one 0/1 value per "
        "prompt token."
    )
  binary = mask.dtype.kind in "biuf" and bool(((mask == 0) | (mask == 1)).all())
  if not binary:
    bad = mask[(mask != 0) & (mask != 1)] if mask.dtype.kind in "biuf" else mask.reshape(-1)
    raise ValueError(
        f"attention_mask holds values other than 0 and 1 (e.g. {bad[:3].tolist()}): "
        "1 marks a real prompt token, 0 padding."
    )
  return mask.astype(np.int64)


def right_aligned(ids: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Moves each row's real tokens to the front (the loop's layout) and refuses holes.

  Tokenizers with padding_side="left" put padding first; rolling the row keeps the tokens in
  order. A 0 between real tokens has no place in a prefix layout, so it is refused.
  """
  lengths = mask.sum(axis=1)
  first = np.argmax(mask, axis=1)
  last = mask.shape[1] - np.argmax(mask[:, ::-1], axis=1)
  holes = (lengths > 0) & (last - first != lengths)
  if holes.any():
    raise ValueError(
        f"attention_mask row(s) {np.flatnonzero(holes)[:5].tolist()} have padding "
        "between real tokens: pass left- or right-padded prompts (one contiguous run "
        "of 1s per row)."
    )
  if not first.any():
    return ids, mask
  columns = (np.arange(mask.shape[1])[None, :] + first[:, None]) % mask.shape[1]
  return np.take_along_axis(ids, columns, axis=1), np.take_along_axis(mask, columns, axis=1)


def original_layout(values: np.ndarray, mask: np.ndarray) -> np.ndarray:
  """Per-position values [B, S, ...] computed on a `right_aligned` batch, moved back to the
  columns of the batch as it was given (`mask`: its mask before alignment)."""
  first = np.argmax(mask, axis=1)  # 0 for rows that were right-padded already (or empty)
  if not first.any():
    return values
  columns = (np.arange(mask.shape[1])[None, :] - first[:, None]) % mask.shape[1]
  columns = columns.reshape(columns.shape + (1,) * (values.ndim - 2))
  return np.take_along_axis(values, columns, axis=1)


def filled_to(rows: Sequence, count: int) -> list:
  """`rows` followed by copies of its first row up to `count` rows: a short last batch keeps the
  compiled batch shape (the copies' outputs are dropped)."""
  return list(rows) + [rows[0]] * (count - len(rows))
