"""The speed helpers: one definition of spread, one decode-step timer."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fake_models import fake_model
from jax_specsel.eval import speed


def test_spread_is_the_population_standard_deviation():
  assert speed.spread([2.0, 4.0, 4.0, 4.0, 5.0, 5.0, 7.0, 9.0]) == pytest.approx(2.0)
  assert speed.spread([3.0]) == 0.0 and speed.spread([]) == 0.0


@pytest.mark.parametrize("block", [1, 4])
def test_time_decode_step_times_calls_inside_one_program(block):
  model = fake_model(0)
  prompt = np.asarray([[3, 4, 5]], np.int32)
  seconds = speed.time_decode_step(model, prompt, block=block, cache_length=64, steps=8, repeats=2)
  assert math.isfinite(seconds) and 0.0 < seconds < 1.0
