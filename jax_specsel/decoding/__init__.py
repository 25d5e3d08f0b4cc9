"""Autoregressive and speculative generation in one jit-compiled while_loop, the fused per-query
program that chooses the drafter inside it (`generate_selected`), and the loop that chooses the
option and gamma again every round (`generate_adaptive`)."""

from jax_specsel.decoding.adaptive import AdaptiveOutput, Costs, generate_adaptive
from jax_specsel.decoding.adaptive_rule import RuleSettings
from jax_specsel.decoding.generate import GenerateOutput, Stats, generate
from jax_specsel.decoding.programs import compilation_count
from jax_specsel.decoding.request import (
    AUTOREGRESSIVE,
    MIN_SAMPLING_TEMPERATURE,
    PositionLimitWarning,
    VocabularyWarning,
    bucket_length,
    check_compatible,
)
from jax_specsel.decoding.sampling import SamplingSettings
from jax_specsel.decoding.selected import SelectedOutput, generate_selected

__all__ = [
    "AUTOREGRESSIVE",
    "AdaptiveOutput",
    "Costs",
    "MIN_SAMPLING_TEMPERATURE",
    "GenerateOutput",
    "RuleSettings",
    "PositionLimitWarning",
    "SelectedOutput",
    "Stats",
    "SamplingSettings",
    "bucket_length",
    "check_compatible",
    "compilation_count",
    "generate",
    "generate_adaptive",
    "generate_selected",
    "VocabularyWarning",
]
