"""HF export and function-preserving growth (models/hf_export.py, models/growth.py).

Tiny random checkpoints are built with transformers PyTorch (every norm scale redrawn so a
mis-tiled scale shows in the logits), plus one original-T5-style model built by our own module
from the zoo's `ModelSpec.t5_config` (the demo target's shape). Each is grown k = 2 and 4 times;
the grown model must compute the original's logits in our implementation and in transformers.
"""

from __future__ import annotations

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
from flax import nnx

import jax_specsel as js
from jax_specsel.data import zoo_config
from jax_specsel.models import growth, hf_export, t5
from jax_specsel.models.interface import Model

GROWN_TOLERANCE = 1e-4  # max |grown - original| / max |original|, float32
EXPORT_TOLERANCE = 1e-5  # transformers on an exported checkpoint against ours
SOURCE_LEN, TARGET_LEN = 14, 9
T5_SPECS = {  # original T5 (relu, tied and scaled head) and v1.1/Flan (gated-gelu, untied)
    "t5_original": dict(
        vocab_size=96, d_model=24, d_kv=8, d_ff=40, num_heads=3, feed_forward_proj="relu", tie=True
    ),
    "t5_v1_1": dict(
        vocab_size=104,
        d_model=32,
        d_kv=8,
        d_ff=48,
        num_heads=2,
        feed_forward_proj="gated-gelu",
        tie=False,
    ),
}
LLAMA_SPECS = {  # grouped-query attention, untied and tied
    "llama_gqa": dict(num_key_value_heads=2),
    "llama_gqa_tied": dict(num_key_value_heads=1, tie_word_embeddings=True),
}
LLAMA_BASE = dict(
    vocab_size=112,
    hidden_size=32,
    intermediate_size=56,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=64,
    bos_token_id=1,
    eos_token_id=2,
)
SOURCES = [*T5_SPECS, *LLAMA_SPECS]
FACTORS = (2, 4)


def _redraw_norms_(model: torch.nn.Module, seed: int) -> None:
  """Norm scales around 1 instead of exactly 1; the other weights keep transformers' init."""
  generator = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, param in model.named_parameters():
      if "norm" in name:
        param.copy_(1.0 + 0.2 * torch.randn(param.shape, generator=generator))


def _t5(spec: dict, directory: str):
  spec = dict(spec)
  tie = spec.pop("tie")
  config = transformers.T5Config(
      num_layers=2,
      num_decoder_layers=2,
      decoder_start_token_id=0,
      relative_attention_num_buckets=8,
      relative_attention_max_distance=10,
      dropout_rate=0.0,
      tie_word_embeddings=tie,
      **spec,
  )
  config.tie_word_embeddings = tie  # transformers forces True (shared/PITFALLS.md)
  torch.manual_seed(0)
  model = transformers.T5ForConditionalGeneration(config).eval()
  with torch.no_grad():  # real untied checkpoints keep the input tables equal to shared
    model.encoder.embed_tokens.weight.copy_(model.shared.weight)
    model.decoder.embed_tokens.weight.copy_(model.shared.weight)
  _redraw_norms_(model, 1)
  model.save_pretrained(directory)
  return model


def _llama(overrides: dict, directory: str):
  config = transformers.LlamaConfig(**{**LLAMA_BASE, **overrides})
  if "tie_word_embeddings" in overrides:
    config.tie_word_embeddings = overrides["tie_word_embeddings"]
  torch.manual_seed(0)
  model = transformers.LlamaForCausalLM(config).eval()
  _redraw_norms_(model, 2)
  model.save_pretrained(directory)
  return model


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
  """name -> (checkpoint directory, transformers model, our Model)."""
  built = {}
  for name in SOURCES:
    directory = str(tmp_path_factory.mktemp(name))
    hf = (
        _t5(T5_SPECS[name], directory) if name in T5_SPECS else _llama(LLAMA_SPECS[name], directory)
    )
    built[name] = (directory, hf, js.load_model(directory))
  return built


@pytest.fixture(scope="module")
def grown(sources, tmp_path_factory):
  """(name, k) -> (grown checkpoint directory, our grown Model), grown on first use."""
  cache = {}

  def get(name: str, factor: int):
    if (name, factor) not in cache:
      directory = str(tmp_path_factory.mktemp(f"{name}_x{factor}") / "grown")
      growth.grow_checkpoint(sources[name][0], directory, factor)
      cache[name, factor] = (directory, js.load_model(directory))
    return cache[name, factor]

  return get


@pytest.fixture(scope="module")
def zoo_target():
  """The demo target's architecture (original T5 via ModelSpec.t5_config), random, tiny.

  The weights are drawn in numpy into the module's abstract state: no per-shape jax program.
  """
  spec = zoo_config.ModelSpec(
      d_model=32, num_heads=4, d_ff=64, encoder_layers=2, decoder_layers=2, train_steps=1
  )
  config = spec.t5_config(vocab_size=80)
  graphdef, state = nnx.split(nnx.eval_shape(lambda: t5.Module(config, rngs=nnx.Rngs(0))))
  rng = np.random.default_rng(3)

  def draw(path, leaf):
    name = jax.tree_util.keystr(path)
    if "scale" in name:  # norm scales around 1 (not exactly 1: a mis-tiled scale must show)
      return jnp.asarray(1.0 + 0.2 * rng.standard_normal(leaf.shape), leaf.dtype)
    std = 1.0 if "shared" in name or "relative_bias" in name else leaf.shape[0] ** -0.5
    return jnp.asarray(std * rng.standard_normal(leaf.shape), leaf.dtype)

  state = jax.tree_util.tree_map_with_path(draw, state)
  return Model(nnx.merge(graphdef, state), name="zoo_target")


def _inputs(model: Model, seed: int = 0):
  """(input_ids, attention_mask, decoder_input_ids or None) for a right-padded batch of 3."""
  rng = np.random.default_rng(seed)
  ids = rng.integers(3, model.vocab_size, (3, SOURCE_LEN))
  mask = (np.arange(SOURCE_LEN)[None, :] < np.array([[SOURCE_LEN], [9], [4]])).astype(np.int32)
  if not model.is_encoder_decoder:
    return ids, mask, None
  decoder_ids = rng.integers(3, model.vocab_size, (3, TARGET_LEN))
  decoder_ids[:, 0] = model.decoder_start_id
  return ids, mask, decoder_ids


def _ours(model: Model, inputs) -> np.ndarray:
  ids, mask, decoder_ids = inputs
  return model.logits(ids, decoder_input_ids=decoder_ids, attention_mask=mask)


def _torch(model, inputs) -> np.ndarray:
  ids, mask, decoder_ids = (None if x is None else torch.tensor(np.asarray(x)) for x in inputs)
  with torch.no_grad():
    if decoder_ids is None:
      return model(input_ids=ids, attention_mask=mask).logits.numpy()
    return model(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder_ids).logits.numpy()


def _real(logits: np.ndarray, inputs) -> np.ndarray:
  """Decoder-only logits at real (unpadded) positions only; T5's are all real."""
  _, mask, decoder_ids = inputs
  return logits if decoder_ids is not None else logits[mask.astype(bool)]


def _relative(ours: np.ndarray, ref: np.ndarray) -> float:
  return float(np.abs(ours - ref).max() / np.abs(ref).max())


def _strict_hf(directory: str, encoder_decoder: bool):
  """transformers' model for `directory`, asserting no missing / unexpected / mismatched tensor."""
  cls = (
      transformers.T5ForConditionalGeneration if encoder_decoder else transformers.LlamaForCausalLM
  )
  model, info = cls.from_pretrained(directory, output_loading_info=True)
  assert not any(info.values()), info
  return model.eval()


# ----------------------------------------------------------------------------- growth


@pytest.mark.parametrize("factor", FACTORS)
@pytest.mark.parametrize("name", SOURCES)
def test_grown_logits_equal_original(sources, grown, name, factor):
  _, _, original = sources[name]
  _, bigger = grown(name, factor)
  inputs = _inputs(original)
  error = _relative(_real(_ours(bigger, inputs), inputs), _real(_ours(original, inputs), inputs))
  print(f"{name} k={factor}: grown vs original {error:.1e}")
  assert error <= GROWN_TOLERANCE
  assert bigger.config.hidden_size == factor * original.config.hidden_size
  assert bigger.num_params > (factor**2 - 1) * original.num_params / 2


@pytest.mark.parametrize("name", SOURCES)
def test_transformers_loads_grown_checkpoint(sources, grown, name):
  _, reference, original = sources[name]
  directory, bigger = grown(name, 2)
  hf = _strict_hf(directory, original.is_encoder_decoder)
  inputs = _inputs(original, seed=1)
  theirs = _real(_torch(hf, inputs), inputs)
  ours = _real(_ours(bigger, inputs), inputs)
  assert _relative(ours, theirs) <= EXPORT_TOLERANCE
  assert _relative(theirs, _real(_torch(reference, inputs), inputs)) <= GROWN_TOLERANCE
  print(f"{name} k=2: transformers grown vs ours {_relative(ours, theirs):.1e}")


def test_grown_config_records_growth_and_unties_head(sources, grown):
  directory, _ = grown("t5_original", 2)
  with open(os.path.join(directory, "config.json")) as f:
    saved = json.load(f)
  assert (saved["d_model"], saved["d_ff"], saved["num_heads"], saved["d_kv"]) == (48, 80, 6, 8)
  assert saved["tie_word_embeddings"] is False and saved["scale_decoder_outputs"] is False
  assert saved[growth.GROWTH_FIELD] == {"factor": 2, "source": sources["t5_original"][0]}
  hf_config = transformers.AutoConfig.from_pretrained(directory)  # the extra field is harmless
  assert hf_config.jax_specsel_growth["factor"] == 2
  # transformers 5 forces T5's tie flag to True; only the stored values untie the head.
  assert hf_config.tie_word_embeddings is True and hf_config.scale_decoder_outputs is False
  directory, _ = grown("llama_gqa", 4)
  with open(os.path.join(directory, "config.json")) as f:
    saved = json.load(f)
  assert (
      saved["hidden_size"],
      saved["num_attention_heads"],
      saved["num_key_value_heads"],
      saved["head_dim"],
  ) == (128, 16, 8, 8)


# Factor 2 with the slow set: the demo grows its target by 4.
@pytest.mark.parametrize("factor", [pytest.param(2, marks=pytest.mark.slow), 4])
def test_grow_model_zoo_target_same_logits_and_greedy_output(zoo_target, tmp_path, factor):
  bigger = growth.grow_model(zoo_target, factor, str(tmp_path / "grown"))
  inputs = _inputs(zoo_target, seed=2)
  error = _relative(_ours(bigger, inputs), _ours(zoo_target, inputs))
  print(f"zoo target k={factor}: grown vs original {error:.1e}")
  assert error <= GROWN_TOLERANCE
  assert bigger.config.num_heads == 4 * factor and not bigger.config.tie_word_embeddings
  prompts = [[5, 9, 13, 40, 2], [7, 7, 30], [60, 3, 18, 22, 21, 11, 9], [4]]
  expected = js.generate(zoo_target, prompts, temperature=0.0, max_new_tokens=8)
  actual = js.generate(bigger, prompts, temperature=0.0, max_new_tokens=8)
  np.testing.assert_array_equal(actual.tokens, expected.tokens)
  np.testing.assert_array_equal(actual.lengths, expected.lengths)


def test_grown_llama_greedy_output_equal(sources, grown):
  _, _, original = sources["llama_gqa_tied"]
  _, bigger = grown("llama_gqa_tied", 2)
  prompts = [[5, 9, 13, 40, 2, 17], [7, 7, 30], [60, 3, 18, 22, 21, 11, 9], [4, 8]]
  expected = js.generate(original, prompts, temperature=0.0, max_new_tokens=8)
  actual = js.generate(bigger, prompts, temperature=0.0, max_new_tokens=8)
  np.testing.assert_array_equal(actual.tokens, expected.tokens)


def test_factor_one_copies_and_shards_load(sources, tmp_path):
  directory, _, original = sources["t5_v1_1"]
  copy = growth.grow_checkpoint(directory, str(tmp_path / "copy"), 1)
  assert json.load(open(os.path.join(copy, "config.json")))[growth.GROWTH_FIELD]["factor"] == 1
  inputs = _inputs(original, seed=3)
  np.testing.assert_array_equal(_ours(js.load_model(copy), inputs), _ours(original, inputs))
  sharded = growth.grow_checkpoint(directory, str(tmp_path / "sharded"), 2, max_shard_bytes=40_000)
  assert os.path.isfile(os.path.join(sharded, hf_export.INDEX_FILE))
  theirs = _torch(_strict_hf(sharded, True), inputs)
  assert _relative(_ours(js.load_model(sharded), inputs), theirs) <= EXPORT_TOLERANCE


@pytest.mark.parametrize("factor", [2.5, 2.0, "2", True, 0, -3, None])
def test_bad_factor_refused_before_any_work(tmp_path, factor):
  missing = str(tmp_path / "no-such-checkpoint")  # the factor is checked before the source
  with pytest.raises(ValueError, match=r"factor=.*pass (an int >= 1, )?e\.g\. factor=2"):
    growth.grow_checkpoint(missing, str(tmp_path / "out"), factor)
  assert not os.path.exists(tmp_path / "out")


def test_bad_factor_refused_by_grow_model(zoo_target, tmp_path):
  with pytest.raises(ValueError, match="factor=1.5"):
    growth.grow_model(zoo_target, 1.5, str(tmp_path / "out"))
  assert os.listdir(tmp_path) == []


def test_unsupported_model_type_and_existing_destination_refused(sources, tmp_path):
  source = tmp_path / "gpt2"
  source.mkdir()
  (source / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_embd": 8}))
  with pytest.raises(js.UnsupportedModelError, match="'gpt2'"):
    growth.grow_checkpoint(str(source), str(tmp_path / "out"), 2)
  with pytest.raises(FileExistsError, match="overwrite=True"):
    growth.grow_checkpoint(sources["llama_gqa"][0], str(source), 2)
  assert sorted(os.listdir(tmp_path)) == ["gpt2"]  # no temporary directory left behind


# ----------------------------------------------------------------------------- export


def test_export_round_trip_zoo_target(zoo_target, tmp_path):
  directory = str(tmp_path / "export")
  hf_export.save_hf_checkpoint(zoo_target, directory)
  inputs = _inputs(zoo_target, seed=4)
  ours = _ours(zoo_target, inputs)
  back = js.load_model(directory)
  assert back.config == zoo_target.config
  np.testing.assert_array_equal(_ours(back, inputs), ours)
  hf = _strict_hf(directory, True)
  assert hf.config.scale_decoder_outputs and hf.lm_head.weight is hf.shared.weight
  error = _relative(ours, _torch(hf, inputs))
  print(f"zoo target export: transformers vs ours {error:.1e}")
  assert error <= EXPORT_TOLERANCE


@pytest.mark.parametrize("name", ["t5_v1_1", "llama_gqa_tied"])
def test_export_round_trip_loaded_checkpoint(sources, tmp_path, name):
  _, reference, model = sources[name]
  directory = str(tmp_path / "export")
  hf_export.save_hf_checkpoint(model, directory)
  inputs = _inputs(model, seed=5)
  back = js.load_model(directory)
  assert (back.config, back.eos_ids, back.pad_id) == (model.config, model.eos_ids, model.pad_id)
  np.testing.assert_array_equal(_ours(back, inputs), _ours(model, inputs))
  theirs = _real(_torch(_strict_hf(directory, model.is_encoder_decoder), inputs), inputs)
  assert _relative(_real(_ours(model, inputs), inputs), theirs) <= EXPORT_TOLERANCE
  np.testing.assert_array_equal(theirs, _real(_torch(reference, inputs), inputs))
  with pytest.raises(FileExistsError, match="overwrite=True"):
    hf_export.save_hf_checkpoint(model, directory)
  hf_export.save_hf_checkpoint(model, directory, overwrite=True)
  assert sorted(os.listdir(tmp_path)) == ["export"]
