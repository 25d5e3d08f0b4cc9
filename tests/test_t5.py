"""T5 (nnx) against transformers PyTorch: full-forward parity, cached decoding, embeddings, bf16.

Tiny random checkpoints are built with transformers, saved to a temporary directory and loaded
through `js.load_model`, so the weight mapping is exercised strictly (missing or unexpected
tensors raise). Sequences (~30 tokens) are longer than relative_attention_max_distance so the
log-spaced and the last relative-position buckets are all used.
"""

from __future__ import annotations

import functools
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

import jax_specsel as js
from jax_specsel.models import t5, t5_modules
from random_t5 import random_t5

SOURCE_LEN, TARGET_LEN = 30, 25

# Original T5 (relu, tied + scaled output) and v1.1/Flan (gated-gelu, untied, unscaled). Both have
# num_heads * d_kv != d_model.
SPECS = {
    "t5": dict(
        vocab_size=120,
        d_model=32,
        d_kv=8,
        d_ff=64,
        num_heads=3,
        feed_forward_proj="relu",
        relative_attention_num_buckets=8,
        relative_attention_max_distance=12,
        tie=True,
    ),
    "flan": dict(
        vocab_size=200,
        d_model=48,
        d_kv=16,
        d_ff=80,
        num_heads=4,
        feed_forward_proj="gated-gelu",
        relative_attention_num_buckets=16,
        relative_attention_max_distance=10,
        tie=False,
    ),
}


def _build(spec: dict, directory: str) -> transformers.T5ForConditionalGeneration:
  spec = dict(spec)
  model = random_t5(
      0, tie=spec.pop("tie"), num_layers=2, num_decoder_layers=2, decoder_start_token_id=0, **spec
  )
  model.save_pretrained(directory)
  return model


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
  """name -> (checkpoint directory, torch model), each built once."""
  out = {}
  for name, spec in SPECS.items():
    directory = str(tmp_path_factory.mktemp(f"t5_{name}"))
    out[name] = (directory, _build(spec, directory))
  return out


@pytest.fixture(scope="session")
def models(checkpoints):
  return {name: js.load_model(directory) for name, (directory, _) in checkpoints.items()}


def _inputs(vocab_size: int, seed: int = 0):
  """Right-padded batch of prompts with different lengths, and decoder inputs."""
  rng = np.random.default_rng(seed)
  input_ids = rng.integers(2, vocab_size, (3, SOURCE_LEN))
  attention_mask = np.ones_like(input_ids)
  for row, length in enumerate((SOURCE_LEN, 17, 6)):
    attention_mask[row, length:] = 0
    input_ids[row, length:] = 0
  decoder_ids = rng.integers(2, vocab_size, (3, TARGET_LEN))
  decoder_ids[:, 0] = 0  # decoder_start_token_id
  return input_ids, attention_mask, decoder_ids


def _torch_logits(torch_model, input_ids, attention_mask, decoder_ids) -> np.ndarray:
  with torch.no_grad():
    out = torch_model(
        input_ids=torch.tensor(input_ids),
        attention_mask=torch.tensor(attention_mask),
        decoder_input_ids=torch.tensor(decoder_ids),
    )
  return out.logits.numpy()


def _relative_error(ours, ref) -> float:
  return float(np.abs(np.asarray(ours, np.float64) - ref).max() / np.abs(ref).max())


@pytest.mark.parametrize("name", sorted(SPECS))
def test_config_from_checkpoint(name, models, checkpoints):
  config = models[name].config
  torch_config = checkpoints[name][1].config
  assert config.is_encoder_decoder and models[name].is_encoder_decoder
  assert config.tie_word_embeddings == SPECS[name]["tie"]
  assert config.scale_decoder_outputs == torch_config.scale_decoder_outputs == SPECS[name]["tie"]
  assert config.is_gated_act == torch_config.is_gated_act
  assert config.dense_act_fn == torch_config.dense_act_fn
  assert config.inner_dim != config.d_model
  block_params = sum(p.numel() for p in checkpoints[name][1].decoder.block[1].parameters())
  assert config.params_per_decoder_layer == block_params
  # Untied, transformers holds the encoder/decoder embedding aliases as separate tensors.
  aliases = 0 if config.tie_word_embeddings else 2 * config.vocab_size * config.d_model
  assert (
      models[name].num_params == sum(p.numel() for p in checkpoints[name][1].parameters()) - aliases
  )
  hash(config)  # part of the jit-static graphdef


def test_from_hf_flags():
  base = {"d_model": 8, "num_layers": 3}
  assert t5.Config.from_hf(base, "float32").num_decoder_layers == 3
  assert t5.Config.from_hf(base, "float32").scale_decoder_outputs  # no flags: original T5
  untied = t5.Config.from_hf({**base, "tie_word_embeddings": False}, "float32")
  assert not untied.tie_word_embeddings and not untied.scale_decoder_outputs
  # transformers 5.23 writes both flags; a saved scale_decoder_outputs wins over the tie flag.
  odd = t5.Config.from_hf(
      {**base, "tie_word_embeddings": True, "scale_decoder_outputs": False}, "float32"
  )
  assert odd.tie_word_embeddings and not odd.scale_decoder_outputs
  silu = t5.Config.from_hf(
      {
          **base,
          "feed_forward_proj": "gated-silu",
          "eos_token_id": [1, 5],
          "pad_token_id": 3,
          "decoder_start_token_id": None,
      },
      "bfloat16",
  )
  assert (silu.dense_act_fn, silu.is_gated_act, silu.eos_token_id) == ("silu", True, 1)
  assert silu.decoder_start_token_id == 3 and silu.dtype == "bfloat16"
  with pytest.raises(ValueError, match="feed_forward_proj"):
    t5.Config.from_hf({**base, "feed_forward_proj": "gated-gelu-x"}, "float32")


@pytest.mark.parametrize("bidirectional", [True, False])
def test_relative_position_bucket_matches_transformers(bidirectional):
  relative = torch.arange(-300, 301)[None, :]
  for buckets, max_distance in ((8, 12), (16, 10), (32, 128)):
    ref = transformers.models.t5.modeling_t5.T5Attention._relative_position_bucket(
        relative, bidirectional=bidirectional, num_buckets=buckets, max_distance=max_distance
    )
    ours = t5_modules.relative_position_bucket(
        jnp.asarray(relative.numpy()),
        bidirectional=bidirectional,
        num_buckets=buckets,
        max_distance=max_distance,
    )
    np.testing.assert_array_equal(np.asarray(ours), ref.numpy())


@pytest.mark.parametrize("name", sorted(SPECS))
def test_full_forward_matches_transformers(name, models, checkpoints):
  model, (_, torch_model) = models[name], checkpoints[name]
  input_ids, attention_mask, decoder_ids = _inputs(model.vocab_size)
  ours = model.logits(input_ids, decoder_ids, attention_mask)
  ref = _torch_logits(torch_model, input_ids, attention_mask, decoder_ids)
  assert ours.dtype == np.float32 and ours.shape == ref.shape
  assert _relative_error(ours, ref) <= 1e-4


@pytest.mark.parametrize("name", sorted(SPECS))
def test_embed_is_mean_pooled_encoder_states(name, models, checkpoints):
  model, (_, torch_model) = models[name], checkpoints[name]
  input_ids, attention_mask, _ = _inputs(model.vocab_size, seed=1)
  with torch.no_grad():
    states = torch_model.encoder(
        input_ids=torch.tensor(input_ids), attention_mask=torch.tensor(attention_mask)
    ).last_hidden_state
  mask = attention_mask[:, :, None].astype(np.float64)
  ref = (states.numpy() * mask).sum(1) / mask.sum(1)
  ours = model.embed(input_ids, attention_mask)
  assert ours.shape == (3, model.hidden_size) and ours.dtype == np.float32
  assert _relative_error(ours, ref) <= 1e-4


# Module-level jits with the (hashable) Decoder static: every test reuses the compiled programs.
@functools.partial(jax.jit, static_argnums=0)
def _prepare(decoder, params, input_ids, attention_mask, cache):
  return decoder.prepare(params, input_ids, attention_mask, cache)


@functools.partial(jax.jit, static_argnums=0)
def _decode(decoder, params, tokens, start, cache, context):
  return decoder.decode(params, tokens, start, cache, context)


class _Incremental:
  """Drives the Decoder protocol (jitted) against the model's own full forward.

  Blocks only use sizes 1, 3, 4 and 6, to bound the number of compilations.
  """

  def __init__(self, model, cache_len: int = 40):
    self.model = model
    self.input_ids, self.attention_mask, self.decoder_ids = _inputs(model.vocab_size, seed=2)
    self.full = model.logits(self.input_ids, self.decoder_ids, self.attention_mask)
    cache = model.decoder.init_cache(model.params, 3, cache_len)
    self.context, self.cache = _prepare(
        model.decoder,
        model.params,
        jnp.asarray(self.input_ids),
        jnp.asarray(self.attention_mask),
        cache,
    )

  def step(self, tokens, start):
    logits, self.cache = _decode(
        self.model.decoder,
        self.model.params,
        jnp.asarray(tokens, jnp.int32),
        jnp.asarray(start, jnp.int32),
        self.cache,
        self.context,
    )
    return np.asarray(logits)

  def row_blocks(self, starts, size):
    return np.stack([self.decoder_ids[row, s : s + size] for row, s in enumerate(starts)])

  def check(self, logits, start):
    """logits [B, T, V] were produced for positions start[b].. of each row."""
    for row, first in enumerate(start):
      expected = self.full[row, first : first + logits.shape[1]]
      assert _relative_error(logits[row], expected) <= 1e-5, (row, first)


@pytest.mark.parametrize("name", sorted(SPECS))
def test_decode_one_token_at_a_time(name, models):
  run = _Incremental(models[name])
  for position in range(TARGET_LEN):
    start = [position] * 3
    run.check(run.step(run.decoder_ids[:, position : position + 1], start), start)


@pytest.mark.parametrize("name", sorted(SPECS))
def test_decode_blocks_and_rows_at_different_starts(name, models):
  run = _Incremental(models[name])
  position = 0
  for size in (3, 6, 4, 1, 3, 6, 1, 1):  # consecutive blocks covering all 25 positions
    start = [position] * 3
    run.check(run.step(run.decoder_ids[:, position : position + size], start), start)
    position += size
  assert position == TARGET_LEN
  # A fresh cache; each row advances by its own schedule (rewriting a position with the same
  # token is harmless), so the rows of one call sit at different absolute positions.
  run = _Incremental(models[name])
  run.check(run.step(run.decoder_ids[:, :4], [0, 0, 0]), [0, 0, 0])
  starts = np.array([4, 2, 3])
  while starts.max() + 3 <= TARGET_LEN:
    run.check(run.step(run.row_blocks(starts, 3), starts), starts)
    starts = starts + np.array([3, 2, 1])


@pytest.mark.parametrize("name", sorted(SPECS))
def test_decode_rollback_overwrites_rejected_tokens(name, models):
  run = _Incremental(models[name])
  run.check(run.step(run.decoder_ids[:, :4], [0, 0, 0]), [0, 0, 0])
  run.check(run.step(run.decoder_ids[:, 4:10], [4, 4, 4]), [4, 4, 4])
  wrong = (run.decoder_ids[:, 10:16] + 7) % run.model.vocab_size
  run.step(wrong, [10, 10, 10])  # a rejected draft block at positions 10..15
  # Roll back to a different length per row (before, at and inside the rejected block).
  starts = np.array([8, 10, 9])
  run.check(run.step(run.row_blocks(starts, 6), starts), starts)
  starts = starts + 6
  run.check(run.step(run.row_blocks(starts, 4), starts), starts)


def test_bfloat16_close_to_float32(checkpoints, models):
  directory, _ = checkpoints["flan"]
  model32 = models["flan"]
  model16 = js.load_model(directory, dtype="bfloat16")
  assert model16.config.dtype == "bfloat16"
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(model16.params))
  input_ids, attention_mask, decoder_ids = _inputs(model32.vocab_size)
  full32 = model32.logits(input_ids, decoder_ids, attention_mask)
  full16 = model16.logits(input_ids, decoder_ids, attention_mask)
  assert full16.dtype == np.float32
  assert _relative_error(full16, full32) <= 0.05  # tolerance documented in t5.py
  assert np.mean(full16.argmax(-1) == full32.argmax(-1)) >= 0.9
  cache = model16.decoder.init_cache(model16.params, 3, 32)
  assert jax.tree.leaves(cache)[0].dtype == jnp.bfloat16


def test_weight_map_covers_checkpoint(checkpoints, models):
  """Every saved tensor is either mapped or a documented alias, and every parameter is mapped."""
  from safetensors import safe_open

  for name, (directory, _) in checkpoints.items():
    config = models[name].config
    weight_map = t5.hf_weight_map(config)
    with safe_open(os.path.join(directory, "model.safetensors"), "np") as f:
      saved = set(f.keys())
    assert all(n in weight_map or t5.is_ignorable(n, config) for n in saved)
    paths = {path for path, _ in nnx.to_flat_state(models[name].params)}
    assert paths == {path for path, _ in weight_map.values()}


# ---------------------------------------------------------------- untied input embeddings
def _untied_checkpoint(
    directory, tie_tables: tuple[str, ...] = ()
) -> transformers.T5ForConditionalGeneration:
  """A v1.1-style random T5 saved by transformers with config.tie_word_embeddings=False set after
  construction: shared, encoder.embed_tokens, decoder.embed_tokens and lm_head are four different
  random tables (transformers 5.23 loads each as its own). `tie_tables` names stacks whose table
  is set equal to shared.weight before saving."""
  config = transformers.T5Config(
      vocab_size=90,
      d_model=32,
      d_kv=8,
      d_ff=64,
      num_heads=4,
      num_layers=2,
      num_decoder_layers=2,
      feed_forward_proj="gated-gelu",
      relative_attention_num_buckets=8,
      relative_attention_max_distance=12,
      decoder_start_token_id=0,
      eos_token_id=1,
      pad_token_id=0,
      tie_word_embeddings=False,
      dropout_rate=0.0,
  )
  config.tie_word_embeddings = False
  torch.manual_seed(7)
  model = transformers.T5ForConditionalGeneration(config).eval()
  with torch.no_grad():
    for stack in tie_tables:
      getattr(model, stack).embed_tokens.weight.copy_(model.shared.weight)
  model.save_pretrained(str(directory))
  return model


@pytest.mark.parametrize("tie_tables", [(), ("encoder",)])
def test_untied_input_embeddings_match_transformers(tmp_path, tie_tables):
  directory = str(tmp_path / "untied")
  _untied_checkpoint(directory, tie_tables)
  reference = transformers.T5ForConditionalGeneration.from_pretrained(directory).eval()
  assert reference.decoder.embed_tokens.weight is not reference.shared.weight  # HF keeps its own
  model = js.load_model(directory)
  config = model.config
  assert config.separate_decoder_embeddings and not config.tie_word_embeddings
  assert config.separate_encoder_embeddings == ("encoder" not in tie_tables)
  # transformers' parameter count (tied tables once), less shared.weight where no stack uses it.
  unused_shared = 0 if config.uses_shared_embedding else config.vocab_size * config.d_model
  assert model.num_params == sum(p.numel() for p in reference.parameters()) - unused_shared
  assert config.uses_shared_embedding == bool(tie_tables)
  input_ids, attention_mask, decoder_ids = _inputs(config.vocab_size, seed=2)
  ours = model.logits(input_ids, decoder_ids, attention_mask)
  assert (
      _relative_error(ours, _torch_logits(reference, input_ids, attention_mask, decoder_ids)) < 1e-4
  )
  prompts = [row[:n].tolist() for row, n in zip(input_ids, attention_mask.sum(1))]
  out = js.generate(model, prompts, max_new_tokens=12)
  for prompt, tokens, length in zip(prompts, out.tokens, out.lengths):
    ids = torch.tensor([prompt])
    with torch.no_grad():
      expected = reference.generate(
          ids, attention_mask=torch.ones_like(ids), do_sample=False, num_beams=1, max_new_tokens=12
      )[0, 1:].tolist()
    assert tokens[:length].tolist() == expected


def test_equal_stored_tables_load_as_one(checkpoints, models):
  """Real checkpoints store the input tables equal to shared.weight: no extra parameter."""
  directory, _ = checkpoints["flan"]
  from safetensors import safe_open

  with safe_open(os.path.join(directory, "model.safetensors"), "np") as f:
    assert {"encoder.embed_tokens.weight", "decoder.embed_tokens.weight"} <= set(f.keys())
  config = models["flan"].config
  assert not (config.separate_encoder_embeddings or config.separate_decoder_embeddings)
  paths = {path for path, _ in nnx.to_flat_state(models["flan"].params)}
  assert ("shared",) in paths and not any("embed_tokens" in path for path in paths)


def test_untied_table_of_the_wrong_shape_is_refused(tmp_path):
  from safetensors.torch import load_file, save_file

  directory = str(tmp_path / "untied")
  _untied_checkpoint(directory)
  path = os.path.join(directory, "model.safetensors")
  tensors = load_file(path)
  tensors["decoder.embed_tokens.weight"] = tensors["decoder.embed_tokens.weight"][:, :16].clone()
  save_file(tensors, path, metadata={"format": "pt"})
  with pytest.raises(js.WeightMismatchError, match="decoder.embed_tokens.weight.*shape"):
    js.load_model(directory)


def test_left_and_right_padded_batches_match_transformers_on_the_unpadded_prompts(
    models, checkpoints
):
  model, (_, torch_model) = models["flan"], checkpoints["flan"]
  right_ids, right_mask, decoder_ids = _inputs(model.vocab_size, seed=4)
  lengths = right_mask.sum(1)
  left_ids = np.stack([np.roll(row, SOURCE_LEN - n) for row, n in zip(right_ids, lengths)])
  left_mask = right_mask[:, ::-1].copy()
  for b, n in enumerate(lengths):
    prompt = right_ids[b : b + 1, :n]
    ref_logits = _torch_logits(torch_model, prompt, np.ones_like(prompt), decoder_ids[b : b + 1])[0]
    with torch.no_grad():
      ref_embed = (
          torch_model.encoder(input_ids=torch.tensor(prompt)).last_hidden_state[0].mean(0).numpy()
      )
    for ids, mask, side in ((right_ids, right_mask, "right"), (left_ids, left_mask, "left")):
      logits = model.logits(ids, decoder_input_ids=decoder_ids, attention_mask=mask)[b]
      assert _relative_error(logits, ref_logits) <= 1e-4, (side, b)
      assert _relative_error(model.embed(ids, mask)[b], ref_embed) <= 1e-4, (side, b)
