"""Autoregressive and speculative generation in one jit-compiled while_loop."""

from jax_specsel.decoding.generate import (GenerateOutput, Stats, bucket_length, check_compatible,
                                           compilation_count, generate)
from jax_specsel.decoding.sampling import SamplingSettings

__all__ = ["GenerateOutput", "Stats", "SamplingSettings", "bucket_length", "check_compatible",
           "compilation_count", "generate"]
