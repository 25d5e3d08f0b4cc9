"""Per-token decode latency through our cache path vs transformers PyTorch, same weights, one run.

  python benchmarks/step_latency.py               # 6-layer d_model-512 T5 and LLaMA, random weights
  python benchmarks/step_latency.py --torch_threads=1 --steps=50

Both sides decode `steps` single tokens after a `prefix`-token prompt (positions prefix to
prefix+steps-1), each the way its own generation runs them: ours with
`eval/speed.time_decode_step` (the protocol's `decode` with a fixed cache of --cache_length,
inside one compiled loop: no host dispatch per step; the best of --repeats runs), transformers
step by step from Python through `past_key_values` (the median step over all repeats). Reported:
ms per step for each and the ratio ours / transformers.
"""

from __future__ import annotations

import statistics
import tempfile
import time

import common  # first: the hubs' offline defaults come before any Hugging Face import

# isort: split

import numpy as np
from absl import flags

import jax_specsel as js
from jax_specsel import experiment
from jax_specsel.eval import random_models, speed

FLAGS = flags.FLAGS
flags.DEFINE_list("families", ["t5", "llama"], "Architectures to measure.")
flags.DEFINE_integer("prefix", 200, "Tokens already in the cache before the timed steps.")
flags.DEFINE_integer("steps", 50, "Timed single-token steps per repeat.")
flags.DEFINE_integer("repeats", 5, "Timed repeats per side (see the module docstring).")
flags.DEFINE_integer("cache_length", 256, "Our fixed K/V buffer length.")
flags.DEFINE_integer("torch_threads", 0, "torch.set_num_threads (0: torch's default).")


def ours_ms(model, prompt) -> float:
  """ms per single-token step as our loop runs it (`speed.time_decode_step`: in one compiled
  loop, cache carried, no dispatch per step), at positions prefix..prefix+steps-1."""
  return 1e3 * speed.time_decode_step(
      model,
      prompt,
      block=1,
      position=FLAGS.prefix,
      cache_length=FLAGS.cache_length,
      steps=FLAGS.steps,
      repeats=FLAGS.repeats,
  )


def torch_ms(directory, prompt) -> float:
  """ms per single-token step of transformers from Python through `past_key_values` (the median
  step over all repeats), after the same prompt."""
  import torch
  from jax_specsel.eval.hf_baseline import load_torch_model

  model = load_torch_model(directory)
  seq2seq = model.config.is_encoder_decoder
  times = []
  with torch.inference_mode():
    for _ in range(FLAGS.repeats):
      ids = torch.tensor(np.asarray(prompt))
      if seq2seq:
        encoder = model.get_encoder()(input_ids=ids)
        prefix = torch.zeros((1, FLAGS.prefix), dtype=torch.long)
        out = model(encoder_outputs=encoder, decoder_input_ids=prefix, use_cache=True)
      else:
        out = model(input_ids=ids, use_cache=True)
      past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
      for _ in range(FLAGS.steps):
        began = time.perf_counter()
        kwargs = (
            {"encoder_outputs": encoder, "decoder_input_ids": token}
            if seq2seq
            else {"input_ids": token}
        )
        out = model(**kwargs, past_key_values=past, use_cache=True)
        past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        times.append(time.perf_counter() - began)
  return 1e3 * statistics.median(times)


def check_flags() -> None:
  """Validates every flag before any model is built or timed."""
  common.choices_flag("families", random_models.RANDOM_PAIRS)
  experiment.integer_flags("prefix", "steps", "repeats", "cache_length")
  experiment.integer_flags("torch_threads", minimum=0)


def main(argv):
  del argv
  common.checked(check_flags)  # one line, before any model is built
  if FLAGS.torch_threads:
    import torch

    torch.set_num_threads(FLAGS.torch_threads)
  rng = np.random.default_rng(0)
  print(
      "| model | params | ours ms/step | transformers ms/step | ours / transformers |\n"
      "|---|---|---|---|---|"
  )
  with tempfile.TemporaryDirectory() as scratch:
    for family in FLAGS.families:
      directory = random_models.build_random_checkpoint(
          family, random_models.RANDOM_PAIRS[family][0], f"{scratch}/{family}", seed=0
      )
      model = js.load_model(directory)
      # T5: the prompt is the encoder input; the decoder prefix is written by `prepare` + steps.
      prompt = rng.integers(5, 1000, size=(1, FLAGS.prefix)).astype(np.int32)
      ours = ours_ms(model, prompt)
      theirs = torch_ms(directory, prompt)
      print(
          f"| {family} 6L d512 | {model.num_params / 1e6:.1f}M | {ours:.2f} | {theirs:.2f} | "
          f"{ours / theirs:.2f} |",
          flush=True,
      )


if __name__ == "__main__":
  common.run(main)
