"""Autoregressive and speculative generation in one jit-compiled while_loop."""

from jax_specsel.decoding.generate import (MIN_SAMPLING_TEMPERATURE, GenerateOutput,
                                           PositionLimitWarning, Stats, bucket_length,
                                           check_compatible, compilation_count, generate)
from jax_specsel.decoding.sampling import SamplingSettings

__all__ = ["MIN_SAMPLING_TEMPERATURE", "GenerateOutput", "PositionLimitWarning", "Stats",
           "SamplingSettings", "bucket_length", "check_compatible",
           "compilation_count", "generate"]
