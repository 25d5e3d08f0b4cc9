"""Tokenized source/label pairs of one domain as padded arrays, for teacher-forced training."""

from __future__ import annotations

import dataclasses

import numpy as np

from jax_specsel import token_batches

PAD_MULTIPLE = 8  # widths rounded up to it: fewer distinct shapes, fewer compiles


@dataclasses.dataclass
class Seq2SeqArrays:
  """One domain's tokenized pairs, right-padded with the pad id (0)."""

  sources: np.ndarray  # int32 [N, S]
  source_mask: np.ndarray  # int32 [N, S]
  labels: np.ndarray  # int32 [N, T], EOS included, pad after it

  def batch(self, rows: np.ndarray) -> dict[str, np.ndarray]:
    labels = self.labels[rows]
    # Teacher forcing: the decoder reads the start id (= pad, 0) then the labels shifted right.
    decoder_inputs = np.concatenate([np.zeros_like(labels[:, :1]), labels[:, :-1]], axis=1)
    return {
        "sources": self.sources[rows],
        "source_mask": self.source_mask[rows],
        "decoder_inputs": decoder_inputs,
        "labels": labels,
    }


def round_up(value: int, multiple: int) -> int:
  """The smallest multiple of `multiple` that is >= value."""
  return -(-value // multiple) * multiple


def _padded(rows: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
  """Right-padded with 0 to the longest row rounded up to PAD_MULTIPLE: (ids, mask) int32."""
  width = round_up(max(len(r) for r in rows), PAD_MULTIPLE)
  return token_batches.right_padded(rows, pad_id=0, width=width, dtype=np.int32)


def encode_pairs(tokenizer, prompts: list[str], labels: list[list[int]]) -> Seq2SeqArrays:
  """Tokenizes prompts (EOS appended, as T5) and pads prompts and label id lists."""
  sources, source_mask = _padded(tokenizer(prompts)["input_ids"])
  padded_labels, _ = _padded(labels)
  return Seq2SeqArrays(sources, source_mask, padded_labels)


def pad_to_common_shape(data: dict[str, Seq2SeqArrays]) -> dict[str, Seq2SeqArrays]:
  """Pads every domain's arrays to the widest source and label lengths among them."""
  width = max(a.sources.shape[1] for a in data.values())
  label_width = max(a.labels.shape[1] for a in data.values())
  grow = lambda x, w: np.pad(x, ((0, 0), (0, w - x.shape[1])))
  return {
      domain: Seq2SeqArrays(
          grow(a.sources, width), grow(a.source_mask, width), grow(a.labels, label_width)
      )
      for domain, a in data.items()
  }
