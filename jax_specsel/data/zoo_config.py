"""The zoo's configs: each member's architecture and training recipe, and the whole zoo's sizes
and budgets (`ZooConfig`), with the names of its models."""

from __future__ import annotations

import dataclasses

from jax_specsel.data import world as world_lib
from jax_specsel.models import t5

TARGET = "target"
GENERAL = "general"


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  """Architecture and training recipe of one zoo member."""

  d_model: int
  num_heads: int
  d_ff: int
  encoder_layers: int
  decoder_layers: int
  train_steps: int
  batch_size: int = 64
  learning_rate: float = 3e-3  # peak of the warmup + cosine schedule
  warmup_steps: int = 100
  weight_decay: float = 0.01  # AdamW, on matrices only (not norm scales)
  position_bias_lr_multiplier: float = 30.0  # see data/zoo_training.py

  def t5_config(self, vocab_size: int, dtype: str = "float32") -> t5.Config:
    """The T5 architecture: original-T5 style (tied, scaled LM head, ReLU feed-forward)."""
    return t5.Config(
        vocab_size=vocab_size,
        d_model=self.d_model,
        d_kv=self.d_model // self.num_heads,
        d_ff=self.d_ff,
        num_heads=self.num_heads,
        num_layers=self.encoder_layers,
        num_decoder_layers=self.decoder_layers,
        tie_word_embeddings=True,
        scale_decoder_outputs=True,
        pad_token_id=0,
        eos_token_ids=(1,),
        decoder_start_token_id=0,
        dtype=dtype,
    )


@dataclasses.dataclass(frozen=True)
class ZooConfig:
  """Sizes and training budgets of the whole zoo (the default trains in minutes on a 2-core CPU)."""

  # Depth is what makes a batch-1 decode step expensive on a CPU (per-layer op overhead), and
  # training cost grows with parameters: hence a narrow, deep target decoder. A drafter's encoder
  # runs once per query on the whole prompt (a per-call cost of speculation): one layer.
  target: ModelSpec = ModelSpec(
      d_model=128,
      num_heads=4,
      d_ff=512,
      encoder_layers=2,
      decoder_layers=6,
      train_steps=2200,
      batch_size=32,
      learning_rate=1.5e-3,
      warmup_steps=200,
  )
  # Two encoder layers: a one-layer encoder left the translate drafter markedly less accurate.
  domain_drafter: ModelSpec = ModelSpec(
      d_model=96,
      num_heads=4,
      d_ff=384,
      encoder_layers=2,
      decoder_layers=1,
      train_steps=1400,
      batch_size=32,
      learning_rate=1.5e-3,
      warmup_steps=100,
  )
  general_drafter: ModelSpec = ModelSpec(
      d_model=96,
      num_heads=4,
      d_ff=384,
      encoder_layers=2,
      decoder_layers=1,
      train_steps=1600,
      batch_size=32,
      learning_rate=1.5e-3,
      warmup_steps=100,
  )
  # Per-domain drafter budgets: summaries are learned within a few hundred steps, translation
  # needs the longest budget.
  drafter_steps: tuple[tuple[str, int], ...] = (
      (world_lib.TRANSLATE, 2400),
      (world_lib.SUMMARIZE, 500),
  )
  # Share of the target's training batches per domain (missing domains: weight 1 / #domains).
  # Each skill is learned abruptly after enough batches of it, arithmetic needing the most.
  # The mixed domain's batches train both of its halves' skills too (translate 0.3 + 0.2 mixed).
  target_domain_weights: tuple[tuple[str, float], ...] = (
      (world_lib.TRANSLATE, 0.3),
      (world_lib.SUMMARIZE, 0.08),
      (world_lib.ARITHMETIC, 0.42),
      (world_lib.MIXED, 0.2),
  )
  drafter_domains: tuple[str, ...] = (world_lib.TRANSLATE, world_lib.SUMMARIZE)
  # Domains the general drafter is distilled on (None: every domain of the world). The world's
  # arithmetic is the domain only the target learns (the paper's GSM8K case), so it is left out:
  # distilled on it too, the generalist would align with the target there.
  general_domains: tuple[str, ...] | None = (world_lib.TRANSLATE, world_lib.SUMMARIZE)
  distill_per_domain: int = 3000  # training prompts per domain the target labels greedily
  max_new_tokens: int = 48  # greedy generation budget (longest reference: 41 tokens, EOS included)
  generate_batch_size: int = 128
  # One padded batch shape for every domain: one compile per model instead of one per domain,
  # at the price of padding (worth it only when compiling dominates, as in the tiny zoo).
  shared_batch_shape: bool = False
  seed: int = 0
  dtype: str = "float32"
  # The trained target widened this many times (function-preserving; 1: used as trained): the
  # smallest factor at which a speculative round costs few target steps on a CPU
  # (benchmarks/round_cost.py measures it). Not part of the training fingerprint: every factor
  # grows the same zoo.
  target_growth: int = 4

  def __post_init__(self):
    if (
        isinstance(self.target_growth, bool)
        or not isinstance(self.target_growth, int)
        or self.target_growth < 1
    ):
      raise ValueError(
          f"ZooConfig.target_growth={self.target_growth!r}: must be an integer >= 1 "
          "(1 keeps the trained target)."
      )

  @classmethod
  def tiny(cls) -> "ZooConfig":
    """A zoo that trains in seconds: for tests, not for speedups."""
    small = ModelSpec(
        d_model=32,
        num_heads=2,
        d_ff=64,
        encoder_layers=1,
        decoder_layers=1,
        train_steps=20,
        batch_size=16,
        learning_rate=3e-3,
        warmup_steps=5,
    )
    return cls(
        target=dataclasses.replace(small, d_model=48, decoder_layers=2),
        domain_drafter=small,
        general_drafter=small,
        drafter_steps=(),
        distill_per_domain=32,
        max_new_tokens=12,
        generate_batch_size=32,
        shared_batch_shape=True,
        target_growth=2,
    )

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, values: dict) -> "ZooConfig":
    values = dict(values)
    for key in ("target", "domain_drafter", "general_drafter"):
      values[key] = ModelSpec(**values[key])
    values["drafter_domains"] = tuple(values["drafter_domains"])
    values["drafter_steps"] = tuple(tuple(p) for p in values.get("drafter_steps", ()))
    if values.get("general_domains") is not None:
      values["general_domains"] = tuple(values["general_domains"])
    values["target_domain_weights"] = tuple(tuple(p) for p in values["target_domain_weights"])
    return cls(**values)

  def drafter_names(self) -> tuple[str, ...]:
    return tuple(drafter_name(d) for d in self.drafter_domains) + (drafter_name(GENERAL),)


def drafter_name(domain: str) -> str:
  """ "drafter_translate", "drafter_summarize", "drafter_general"."""
  return f"drafter_{domain}"
