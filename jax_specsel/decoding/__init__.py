"""Autoregressive and speculative generation in one jit-compiled while_loop, and the fused
per-query program that chooses the drafter inside it (`generate_selected`)."""

from jax_specsel.decoding.generate import (MIN_SAMPLING_TEMPERATURE, GenerateOutput,
                                           PositionLimitWarning, Stats, bucket_length,
                                           check_compatible, compilation_count, generate)
from jax_specsel.decoding.sampling import SamplingSettings
from jax_specsel.decoding.selected import SelectedOutput, generate_selected

__all__ = ["MIN_SAMPLING_TEMPERATURE", "GenerateOutput", "PositionLimitWarning", "SelectedOutput",
           "Stats", "SamplingSettings", "bucket_length", "check_compatible", "compilation_count",
           "generate", "generate_selected"]
