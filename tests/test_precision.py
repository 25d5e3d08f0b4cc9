"""Matrix-product precision reaches the compiled programs (checked in the lowered HLO on CPU).

On recent NVIDIA GPUs JAX runs float32 dots as TF32 unless a dot asks for HIGHEST precision; no
GPU runs these tests, so they check what the GPU would be given: the `precision` attribute of
every `stablehlo.dot_general` in the programs the library compiles, and that the setting is part
of the compile key.
"""

from __future__ import annotations

import importlib
import os
import re

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax
import numpy as np
import pytest
import torch
import transformers

import jax_specsel as js
from jax_specsel.models import interface

# The module, not the function that jax_specsel.decoding re-exports under the same name.
generate_lib = importlib.import_module("jax_specsel.decoding.generate")
request_lib = importlib.import_module("jax_specsel.decoding.request")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
  root = tmp_path_factory.mktemp("precision")
  torch.manual_seed(0)
  llama = transformers.LlamaForCausalLM(
      transformers.LlamaConfig(
          vocab_size=64,
          hidden_size=32,
          intermediate_size=64,
          num_hidden_layers=2,
          num_attention_heads=4,
          num_key_value_heads=2,
          max_position_embeddings=64,
          eos_token_id=1,
          bos_token_id=2,
      )
  )
  llama.eval().save_pretrained(str(root / "llama"))
  t5 = transformers.T5ForConditionalGeneration(
      transformers.T5Config(
          vocab_size=64,
          d_model=32,
          d_kv=8,
          d_ff=64,
          num_heads=4,
          num_layers=1,
          num_decoder_layers=1,
          decoder_start_token_id=0,
      )
  )
  t5.eval().save_pretrained(str(root / "t5"))
  return {"llama": str(root / "llama"), "t5": str(root / "t5")}


def dot_precisions(hlo_text: str) -> set[str]:
  """The precision of every dot_general in a lowered program ("DEFAULT" when none is written)."""
  dots = [line for line in hlo_text.splitlines() if "stablehlo.dot_general" in line]
  assert dots, "no matrix product in the program"
  found = set()
  for line in dots:
    match = re.search(r"precision = \[(\w+), (\w+)\]", line)
    found.update(match.groups() if match else ("DEFAULT",))
  return found


def forward_hlo(model) -> str:
  ids = np.ones((2, 8), np.int32)
  decoder_ids = np.zeros((2, 4), np.int32) if model.is_encoder_decoder else None
  return interface.full_logits.lower(
      model.decoder, model.params, ids, np.ones_like(ids), decoder_ids
  ).as_text()


def generation_hlo(target, drafter=None) -> str:
  """The lowered program `generate` compiles (the whole while_loop) for this pair."""
  spec = generate_lib.loop_spec(target, drafter, gamma=2, max_new_tokens=4)
  ids, mask = request_lib.pad_prompts([[3, 4, 5]], None, target)
  trees = (target.flat_params()[1], None if drafter is None else drafter.flat_params()[1])
  args = (
      target.flat_params()[0],
      [] if drafter is None else drafter.flat_params()[0],
      request_lib.place_prompts(target, ids, mask, 0),
  )  # ids, lengths and seed: one array
  return jax.jit(generate_lib.run_flat, static_argnums=(0, 1)).lower(spec, trees, *args).as_text()


@pytest.mark.parametrize("family", ["llama", "t5"])
def test_float32_runs_every_product_at_highest_precision(checkpoints, family):
  model = js.load_model(checkpoints[family])
  assert interface.matmul_precision(model.config) == "highest"
  assert dot_precisions(forward_hlo(model)) == {"HIGHEST"}
  drafter = model.early_exit(layers=1) if family == "llama" else model
  assert dot_precisions(generation_hlo(model, drafter)) == {"HIGHEST"}


@pytest.mark.parametrize(
    "requested,expected", [("default", {"DEFAULT"}), ("tensorfloat32", {"HIGH"})]
)
def test_float32_can_opt_into_tf32(checkpoints, requested, expected):
  model = js.load_model(checkpoints["llama"], matmul_precision=requested)
  assert dot_precisions(forward_hlo(model)) == expected
  assert dot_precisions(generation_hlo(model)) == expected


def test_bfloat16_keeps_the_default_precision(checkpoints):
  model = js.load_model(checkpoints["t5"], dtype="bfloat16")
  assert interface.matmul_precision(model.config) is None
  assert dot_precisions(forward_hlo(model)) == {"DEFAULT"}
  with jax.default_matmul_precision("highest"):  # None defers to the caller's JAX setting
    assert dot_precisions(forward_hlo(js.load_model(checkpoints["t5"], dtype="bfloat16"))) == {
        "HIGHEST"
    }


def test_precision_is_part_of_the_compile_key(checkpoints):
  full = js.load_model(checkpoints["llama"])
  tf32 = js.load_model(checkpoints["llama"], matmul_precision="default")
  assert full.decoder != tf32.decoder
  assert generate_lib.loop_spec(full, None, 1) != generate_lib.loop_spec(tf32, None, 1)
  before = js.compilation_count()
  first = js.generate(full, [[3, 4, 5]], max_new_tokens=3)
  second = js.generate(tf32, [[3, 4, 5]], max_new_tokens=3)
  assert js.compilation_count() == before + 2  # one program each, never one for both
  np.testing.assert_array_equal(first.tokens, second.tokens)  # on CPU the two agree


def test_unknown_precision_is_refused(checkpoints):
  with pytest.raises(ValueError, match="matmul_precision='fast'.*'highest'"):
    js.load_model(checkpoints["llama"], matmul_precision="fast")
