"""transformers (PyTorch) plain and assisted generation, timed the same way as ours.

Used by benchmarks/benchmark.py to put our ms/token next to the reference stack's. Needs torch (the
`test` extra); nothing else in the library imports this module.
"""

from __future__ import annotations

import statistics
import time

from jax_specsel.eval.speed import spread


def load_torch_model(directory: str):
  """The transformers PyTorch model of a checkpoint directory, in eval mode, float32."""
  import torch
  from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM

  config = AutoConfig.from_pretrained(directory)
  cls = AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM
  return cls.from_pretrained(directory, dtype=torch.float32).eval()


def measure_hf_generation(
    target,
    prompts: list[list[int]],
    drafter=None,
    gamma: int = 7,
    max_new_tokens: int = 64,
    repeats: int = 3,
) -> dict:
  """ms/token of `generate` (greedy), assisted when `drafter` is given (constant gamma schedule)."""
  import torch

  kwargs = dict(do_sample=False, max_new_tokens=max_new_tokens, num_beams=1)
  if drafter is not None:
    kwargs.update(assistant_model=drafter)
    drafter.generation_config.num_assistant_tokens = gamma
    drafter.generation_config.num_assistant_tokens_schedule = "constant"
    drafter.generation_config.assistant_confidence_threshold = 0.0

  def one_pass():
    seconds = tokens = 0
    for prompt in prompts:
      ids = torch.tensor([prompt])
      with torch.inference_mode():
        started = time.perf_counter()
        out = target.generate(ids, attention_mask=torch.ones_like(ids), **kwargs)
        seconds += time.perf_counter() - started
      new = out.shape[1] - (1 if target.config.is_encoder_decoder else ids.shape[1])
      tokens += new
    return 1e3 * seconds / max(tokens, 1)

  one_pass()
  ms = [one_pass() for _ in range(repeats)]
  return {"ms_per_token": statistics.median(ms), "ms_per_token_spread": spread(ms)}
