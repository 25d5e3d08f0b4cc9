"""LLaMA (flax.nnx) against transformers PyTorch at tiny random init, and cache-path exactness.

Every checkpoint is a random `transformers.LlamaForCausalLM` with all weights (norm scales and
biases included) redrawn so that a swapped or mis-transposed tensor shows up in the logits.
"""

from __future__ import annotations

import functools
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

import jax_specsel as js
from jax_specsel.models import llama, llama_modules

VOCAB = 160
BASE = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=80,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=4,
    max_position_embeddings=64,
    bos_token_id=1,
    eos_token_id=2,
)
VARIANTS = {
    "mha": {},
    "gqa_kv1": dict(num_key_value_heads=1),
    "gqa_kv2": dict(num_key_value_heads=2, num_hidden_layers=3),
    "tied": dict(tie_word_embeddings=True),
    "theta_500k": dict(rope_parameters={"rope_type": "default", "rope_theta": 500000.0}),
    # original_max_position_embeddings=16 puts the four frequencies of head_dim 8 in all three
    # llama3 bands (kept, interpolated, divided by factor).
    "llama3": dict(
        num_key_value_heads=2,
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 10000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16,
        },
    ),
    "head_dim_16": dict(head_dim=16, num_key_value_heads=1),
    "biases_wide": dict(hidden_size=64, intermediate_size=96, attention_bias=True, mlp_bias=True),
}
TOLERANCE = 1e-4  # max |diff| / max |reference| in float32
BF16_TOLERANCE = 5e-2  # documented in llama.py's module docstring


def randomize_(model: torch.nn.Module, seed: int) -> None:
  """Redraws every parameter: norms around 1, everything else ~ N(0, 0.15^2)."""
  generator = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, param in model.named_parameters():
      noise = torch.randn(param.shape, generator=generator)
      param.copy_(1.0 + 0.2 * noise if "norm" in name else 0.15 * noise)


def make_checkpoint(directory, seed: int = 0, **overrides) -> transformers.LlamaForCausalLM:
  """Saves a random tiny LlamaForCausalLM to `directory` and returns it (float32, eval mode)."""
  config = transformers.LlamaConfig(**{**BASE, **overrides})
  if "tie_word_embeddings" in overrides:
    config.tie_word_embeddings = overrides["tie_word_embeddings"]
  torch.manual_seed(seed)
  model = transformers.LlamaForCausalLM(config).eval()
  randomize_(model, seed)
  model.save_pretrained(str(directory))
  return model


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
  """variant -> (directory, HF model, loaded js.Model); built on first use."""
  built = {}

  def get(variant: str):
    if variant not in built:
      directory = tmp_path_factory.mktemp(f"llama_{variant}")
      hf = make_checkpoint(directory, seed=len(built), **VARIANTS[variant])
      built[variant] = (directory, hf, js.load_model(str(directory)))
    return built[variant]

  return get


def padded_batch(lengths, total, seed=0):
  """Right-padded random ids (garbage ids in the padding) and their mask."""
  rng = np.random.RandomState(seed)
  ids = rng.randint(3, VOCAB, size=(len(lengths), total))
  mask = (np.arange(total)[None, :] < np.asarray(lengths)[:, None]).astype(np.int32)
  return ids, mask


def hf_forward(hf, ids, mask=None, hidden=False):
  with torch.no_grad():
    out = hf(
        torch.tensor(ids),
        attention_mask=None if mask is None else torch.tensor(mask),
        output_hidden_states=hidden,
    )
  return out


def assert_close(ours, ref, tolerance=TOLERANCE, what=""):
  ours, ref = np.asarray(ours, np.float32), np.asarray(ref, np.float32)
  assert ours.shape == ref.shape, (what, ours.shape, ref.shape)
  error = np.abs(ours - ref).max() / np.abs(ref).max()
  assert error <= tolerance, f"{what}: relative error {error:.2e} > {tolerance:.0e}"


# ----- 1. full forward parity -----


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_full_forward_matches_transformers(checkpoints, variant):
  _, hf, model = checkpoints(variant)
  lengths = [11, 6, 2]
  ids, mask = padded_batch(lengths, 11, seed=1)
  ours = model.logits(ids, attention_mask=mask)
  ref = hf_forward(hf, ids, mask).logits.numpy()
  assert ours.dtype == np.float32 and ours.shape == (3, 11, VOCAB)
  for row, length in enumerate(lengths):
    assert_close(ours[row, :length], ref[row, :length], what=f"{variant} row {row}")


def test_config_reads_both_rope_layouts_and_token_ids(checkpoints):
  directory, _, model = checkpoints("llama3")
  with open(os.path.join(directory, "config.json")) as f:
    v5 = json.load(f)
  assert "rope_parameters" in v5  # what transformers 5 writes
  legacy = {k: v for k, v in v5.items() if k != "rope_parameters"}
  legacy["rope_theta"] = v5["rope_parameters"]["rope_theta"]
  legacy["rope_scaling"] = {
      "type": "llama3",
      **{k: v for k, v in v5["rope_parameters"].items() if k not in ("rope_type", "rope_theta")},
  }
  assert llama.Config.from_hf(legacy, "float32") == model.config
  assert model.config.rope_type == "llama3" and model.config.rope_factor == 8.0
  hash(model.config)  # part of the jit-static graphdef
  listed = dict(v5, eos_token_id=[7, 2], pad_token_id=None)
  config = llama.Config.from_hf(listed, "float32")
  assert (config.eos_token_id, config.eos_token_ids, config.pad_token_id) == (7, (7, 2), 7)
  with pytest.raises(js.UnsupportedModelError, match="yarn"):
    llama.Config.from_hf(dict(v5, rope_parameters={"rope_type": "yarn", "factor": 2.0}), "float32")


def test_rope_frequencies_match_transformers(checkpoints):
  for variant in ("theta_500k", "llama3", "head_dim_16"):
    _, hf, model = checkpoints(variant)
    np.testing.assert_allclose(
        llama_modules.rope_inverse_frequencies(model.config),
        hf.model.rotary_emb.inv_freq.numpy(),
        rtol=1e-6,
    )


def test_num_params_counts_every_weight(checkpoints):
  for variant in ("mha", "tied", "biases_wide"):
    _, hf, model = checkpoints(variant)
    assert model.num_params == sum(p.numel() for p in hf.parameters())  # tied counted once
    per_layer = sum(p.numel() for p in hf.model.layers[0].parameters())
    assert model.config.params_per_decoder_layer == per_layer


# ----- 2. incremental decoding through the cache -----


# Module-level jits with the (hashable) decoder static: tests that reuse a block length reuse
# the compiled program instead of compiling a fresh closure.
@functools.partial(jax.jit, static_argnums=0)
def _decode(decoder, params, tokens, start, cache):
  return decoder.decode(params, tokens, start, cache, None)


@functools.partial(jax.jit, static_argnums=0)
def _prefill(decoder, params, ids, mask, cache):
  return decoder.prepare(params, ids, mask, cache)


def _step(model, tokens, start, cache):
  batch = tokens.shape[0]
  start = np.broadcast_to(np.asarray(start, np.int32), (batch,))
  return _decode(model.decoder, model.params, jnp.asarray(tokens), jnp.asarray(start), cache)


def _prepare(model, ids, mask, cache):
  return _prefill(
      model.decoder, model.params, jnp.asarray(ids), jnp.asarray(mask, jnp.int32), cache
  )


def test_one_token_at_a_time_equals_full_forward(checkpoints):
  _, _, model = checkpoints("gqa_kv2")
  ids, _ = padded_batch([14, 14], 14, seed=2)
  full = model.logits(ids)
  cache = model.decoder.init_cache(model.params, 2, 16)
  for t in range(14):
    logits, cache = _step(model, ids[:, t : t + 1], t, cache)
    assert_close(logits[:, 0], full[:, t], what=f"position {t}")


def test_blocks_after_prefill_equal_full_forward(checkpoints):
  _, _, model = checkpoints("head_dim_16")  # one kv head, head_dim != hidden / heads
  ids, _ = padded_batch([16, 16], 16, seed=3)
  full = model.logits(ids)
  cache = model.decoder.init_cache(model.params, 2, 20)
  prompt = 5
  _, cache = _prepare(model, ids[:, :prompt], np.ones((2, prompt)), cache)
  position = prompt
  for block in (3, 1, 4, 3):
    logits, cache = _step(model, ids[:, position : position + block], position, cache)
    assert_close(logits, full[:, position : position + block], what=f"block at {position}")
    position += block


def test_rows_with_different_starts_equal_their_own_full_forward(checkpoints):
  _, _, model = checkpoints("llama3")
  lengths = np.array([3, 7, 5])  # real prompt lengths; the prompt batch is right-padded to 7
  sequences, _ = padded_batch([16, 16, 16], 16, seed=4)
  prompt_ids, prompt_mask = padded_batch(lengths, 7, seed=5)
  prompt_ids = np.where(prompt_mask == 1, sequences[:, :7], prompt_ids)  # garbage in the padding
  full = model.logits(sequences)
  cache = model.decoder.init_cache(model.params, 3, 24)
  _, cache = _prepare(model, prompt_ids, prompt_mask, cache)
  start = lengths.copy()
  for block in (4, 1, 4):
    tokens = np.stack([sequences[b, s : s + block] for b, s in enumerate(start)])
    logits, cache = _step(model, tokens, start, cache)
    for b, s in enumerate(start):
      assert_close(logits[b], full[b, s : s + block], what=f"row {b} block at {s}")
    start = start + block


def test_rollback_rewrites_stale_entries(checkpoints):
  _, _, model = checkpoints("gqa_kv2")
  ids, _ = padded_batch([15, 15], 15, seed=6)
  wrong, _ = padded_batch([6, 6], 6, seed=7)
  full = model.logits(ids)
  cache = model.decoder.init_cache(model.params, 2, 16)
  for position in (0, 3, 6):
    _, cache = _step(model, ids[:, position : position + 3], position, cache)
  # A rejected draft block overwrites positions 6..11 (three correct entries among them).
  _, cache = _step(model, wrong[:, :3], 6, cache)
  _, cache = _step(model, wrong[:, 3:], 9, cache)
  logits, cache = _step(model, ids[:, 6:9], 6, cache)
  assert_close(logits, full[:, 6:9], what="rewritten block")  # stale 9..11 must stay invisible
  for position in (9, 12):
    logits, cache = _step(model, ids[:, position : position + 3], position, cache)
    assert_close(logits, full[:, position : position + 3], what=f"over stale entries at {position}")


# ----- 3. query embedding -----


@pytest.mark.parametrize("variant", ["mha", "tied"])
def test_embed_is_final_normed_hidden_state_of_last_real_token(checkpoints, variant):
  _, hf, model = checkpoints(variant)
  lengths = [9, 4, 1]
  ids, mask = padded_batch(lengths, 9, seed=8)
  out = hf_forward(hf, ids, mask, hidden=True)
  with torch.no_grad():
    base = hf.model(torch.tensor(ids), attention_mask=torch.tensor(mask)).last_hidden_state
  # HF's hidden_states[-1] is the state after the final norm (what the LM head reads).
  torch.testing.assert_close(out.hidden_states[-1], base)
  ref = np.stack([out.hidden_states[-1][b, n - 1].numpy() for b, n in enumerate(lengths)])
  ours = model.embed(ids, attention_mask=mask)
  assert ours.dtype == np.float32 and ours.shape == (3, model.hidden_size)
  assert_close(ours, ref, what="embed")


# ----- 4. early exit -----


@pytest.mark.parametrize("layers", [1, 2])
def test_early_exit_matches_transformers_intermediate_states(checkpoints, layers):
  _, hf, model = checkpoints("gqa_kv2")  # 3 layers
  drafter = model.early_exit(layers=layers)
  lengths = [10, 5]
  ids, mask = padded_batch(lengths, 10, seed=9)
  out = hf_forward(hf, ids, mask, hidden=True)
  with torch.no_grad():
    ref = hf.lm_head(hf.model.norm(out.hidden_states[layers])).numpy()
  ours = drafter.logits(ids, attention_mask=mask)
  for row, length in enumerate(lengths):
    assert_close(ours[row, :length], ref[row, :length], what=f"exit {layers} row {row}")
  # The exit's query embedding is its own normed state after k layers.
  with torch.no_grad():
    normed = hf.model.norm(out.hidden_states[layers]).numpy()
  ref_embed = np.stack([normed[b, n - 1] for b, n in enumerate(lengths)])
  assert_close(drafter.embed(ids, attention_mask=mask), ref_embed, what=f"exit {layers} embed")
  assert (
      drafter.num_params == model.num_params - (3 - layers) * model.config.params_per_decoder_layer
  )
  assert len(drafter.decoder.init_cache(drafter.params, 1, 8)) == layers


def test_early_exit_incremental_equals_its_full_forward(checkpoints):
  _, _, model = checkpoints("gqa_kv2")
  drafter = model.early_exit(layers=2)
  ids, _ = padded_batch([12, 12], 12, seed=10)
  full = drafter.logits(ids)
  cache = drafter.decoder.init_cache(drafter.params, 2, 12)
  _, cache = _prepare(drafter, ids[:, :4], np.ones((2, 4)), cache)
  for position, block in ((4, 1), (5, 3), (8, 3)):
    logits, cache = _step(drafter, ids[:, position : position + block], position, cache)
    assert_close(logits, full[:, position : position + block], what=f"exit block at {position}")


# ----- 5. bfloat16 -----


def test_bfloat16_stays_within_documented_tolerance(checkpoints):
  directory, hf, _ = checkpoints("llama3")
  model = js.load_model(str(directory), dtype="bfloat16")
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(model.params))
  cache = model.decoder.init_cache(model.params, 1, 4)
  assert cache[0]["k"].dtype == jnp.bfloat16
  lengths = [12, 7]
  ids, mask = padded_batch(lengths, 12, seed=11)
  ours = model.logits(ids, attention_mask=mask)
  ref = hf_forward(hf, ids, mask).logits.numpy()
  assert ours.dtype == np.float32
  for row, length in enumerate(lengths):
    assert_close(ours[row, :length], ref[row, :length], BF16_TOLERANCE, what=f"bf16 row {row}")


# ----- 5. left padding -----


def test_left_and_right_padded_batches_match_transformers_on_the_unpadded_prompts(checkpoints):
  _, hf, model = checkpoints("gqa_kv2")
  lengths, width = [9, 4, 1], 9
  right_ids, right_mask = padded_batch(lengths, width, seed=12)
  prompts = [right_ids[b, :n] for b, n in enumerate(lengths)]
  left_ids = np.stack(
      [np.roll(row, width - n) for row, n in zip(right_ids, lengths)]
  )  # garbage first
  left_mask = right_mask[:, ::-1].copy()
  references = [hf_forward(hf, p[None], hidden=True) for p in prompts]
  for ids, mask, side in ((right_ids, right_mask, "right"), (left_ids, left_mask, "left")):
    logits, embeddings = model.logits(ids, attention_mask=mask), model.embed(
        ids, attention_mask=mask
    )
    for b, (n, ref) in enumerate(zip(lengths, references)):
      real = slice(0, n) if side == "right" else slice(width - n, width)
      assert_close(logits[b, real], ref.logits[0].numpy(), what=f"{side}-padded logits row {b}")
      assert_close(
          embeddings[b], ref.hidden_states[-1][0, -1].numpy(), what=f"{side}-padded embed row {b}"
      )
