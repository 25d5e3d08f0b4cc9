"""Checkpoint loading: weight-file layouts, tokenizer attachment, and every error's message."""

from __future__ import annotations

import json
import os
import re
import shutil

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import numpy as np
import pytest
import safetensors.torch
import torch
import transformers

import jax_specsel as js
from random_t5 import random_t5

TINY = dict(
    vocab_size=96,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
)
IDS = np.array([[5, 17, 42, 8, 90, 3], [7, 7, 61, 2, 0, 0]])
MASK = np.array([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])


def _random_llama(seed: int = 0, **overrides) -> transformers.LlamaForCausalLM:
  config = transformers.LlamaConfig(**{**TINY, **overrides})
  if "tie_word_embeddings" in overrides:
    config.tie_word_embeddings = overrides["tie_word_embeddings"]
  torch.manual_seed(seed)
  model = transformers.LlamaForCausalLM(config).eval()
  with torch.no_grad():
    for name, param in model.named_parameters():  # redraw so that every tensor matters
      param.copy_(
          1.0 + 0.2 * torch.randn_like(param) if "norm" in name else 0.15 * torch.randn_like(param)
      )
  return model


@pytest.fixture(scope="module")
def hf_model():
  return _random_llama()


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory, hf_model):
  directory = tmp_path_factory.mktemp("tiny_llama")
  hf_model.save_pretrained(str(directory))
  return directory


@pytest.fixture(scope="module")
def reference_logits(base_dir):
  return js.load_model(str(base_dir)).logits(IDS, attention_mask=MASK)


@pytest.fixture
def checkpoint(tmp_path, base_dir):
  """A private copy of the tiny checkpoint that a test may damage."""
  directory = tmp_path / "ckpt"
  shutil.copytree(base_dir, directory)
  return directory


def _edit_json(path, **changes):
  with open(path) as f:
    data = json.load(f)
  data.update(changes)
  with open(path, "w") as f:
    json.dump(data, f)


def _rewrite_weights(directory, edit):
  path = os.path.join(directory, "model.safetensors")
  tensors = safetensors.torch.load_file(path)
  edit(tensors)
  safetensors.torch.save_file(tensors, path)


# ----- weight-file layouts -----


def test_sharded_safetensors_equal_single_file(tmp_path, hf_model, reference_logits):
  hf_model.save_pretrained(str(tmp_path), max_shard_size="40KB")
  shards = [f for f in os.listdir(tmp_path) if f.endswith(".safetensors")]
  assert os.path.isfile(tmp_path / "model.safetensors.index.json") and len(shards) > 1
  logits = js.load_model(str(tmp_path)).logits(IDS, attention_mask=MASK)
  np.testing.assert_array_equal(logits, reference_logits)


def test_pytorch_bin_equals_safetensors(checkpoint, hf_model, reference_logits):
  os.remove(checkpoint / "model.safetensors")
  torch.save(
      {k: v.contiguous() for k, v in hf_model.state_dict().items()},
      checkpoint / "pytorch_model.bin",
  )
  logits = js.load_model(str(checkpoint)).logits(IDS, attention_mask=MASK)
  np.testing.assert_array_equal(logits, reference_logits)


def test_bfloat16_bin_equals_bfloat16_safetensors(tmp_path, hf_model):
  half = _random_llama()
  half.load_state_dict(hf_model.state_dict())
  half = half.to(torch.bfloat16)
  half.save_pretrained(str(tmp_path / "st"))
  shutil.copytree(tmp_path / "st", tmp_path / "bin")
  os.remove(tmp_path / "bin" / "model.safetensors")
  torch.save(dict(half.state_dict()), tmp_path / "bin" / "pytorch_model.bin")
  from_st = js.load_model(str(tmp_path / "st")).logits(IDS, attention_mask=MASK)
  from_bin = js.load_model(str(tmp_path / "bin")).logits(IDS, attention_mask=MASK)
  np.testing.assert_array_equal(from_bin, from_st)


def test_ignorable_tensors_are_skipped(checkpoint, reference_logits):
  def add_buffer(tensors):
    tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(4)  # pre-4.38 checkpoints

  _rewrite_weights(checkpoint, add_buffer)
  logits = js.load_model(str(checkpoint)).logits(IDS, attention_mask=MASK)
  np.testing.assert_array_equal(logits, reference_logits)


def test_tied_checkpoint_with_stored_lm_head_copy_loads(tmp_path):
  tied = _random_llama(seed=1, tie_word_embeddings=True)
  tied.save_pretrained(str(tmp_path))

  def add_copy(tensors):
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()

  _rewrite_weights(tmp_path, add_copy)
  model = js.load_model(str(tmp_path))
  assert model.config.tie_word_embeddings
  with torch.no_grad():
    ref = tied(torch.tensor(IDS[:1])).logits.numpy()
  ours = model.logits(IDS[:1])
  assert np.abs(ours - ref).max() <= 1e-4 * np.abs(ref).max()


def test_tied_config_with_a_different_stored_lm_head_is_untied_as_transformers(tmp_path):
  """transformers does not tie two stored tables whose values differ: each keeps its own."""
  tied = _random_llama(seed=2, tie_word_embeddings=True)
  tied.save_pretrained(str(tmp_path))

  def add_other_head(tensors):
    tensors["lm_head.weight"] = 0.15 * torch.randn_like(tensors["model.embed_tokens.weight"])

  _rewrite_weights(tmp_path, add_other_head)
  reference = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path)).eval()
  assert reference.lm_head.weight is not reference.model.embed_tokens.weight
  model = js.load_model(str(tmp_path))
  assert not model.config.tie_word_embeddings
  with torch.no_grad():
    ref = reference(torch.tensor(IDS[:1])).logits.numpy()
  assert np.abs(model.logits(IDS[:1]) - ref).max() <= 1e-4 * np.abs(ref).max()


def test_tokenizer_in_directory_is_attached(checkpoint):
  import tokenizers
  from tokenizers import models, pre_tokenizers, trainers

  assert js.load_model(str(checkpoint)).tokenizer is None
  word_level = tokenizers.Tokenizer(models.WordLevel(unk_token="<unk>"))
  word_level.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
  word_level.train_from_iterator(
      ["the cat sat on the mat", "a dog ran in the park"],
      trainers.WordLevelTrainer(special_tokens=["<unk>", "<pad>", "</s>"]),
  )
  fast = transformers.PreTrainedTokenizerFast(
      tokenizer_object=word_level, unk_token="<unk>", pad_token="<pad>", eos_token="</s>"
  )
  fast.save_pretrained(str(checkpoint))
  model = js.load_model(str(checkpoint))
  assert model.tokenizer is not None
  ids = model.tokenizer("the cat sat on a zebra").input_ids
  assert ids == fast("the cat sat on a zebra").input_ids
  assert len(ids) == 6 and ids[-1] == word_level.token_to_id("<unk>")


# ----- errors: each names the file or key and says what to do -----


def test_missing_directory(tmp_path):
  missing = tmp_path / "nowhere"
  with pytest.raises(js.CheckpointNotFoundError, match=f"{missing}.*does not exist"):
    js.load_model(str(missing))


def test_file_instead_of_directory(checkpoint):
  path = checkpoint / "config.json"
  with pytest.raises(js.CheckpointNotFoundError, match=f"{path} is a file.*checkpoint directory"):
    js.load_model(str(path))


def test_no_weight_file(checkpoint):
  os.remove(checkpoint / "model.safetensors")
  with pytest.raises(js.CheckpointNotFoundError, match="no weight file.*model.safetensors"):
    js.load_model(str(checkpoint))


def test_index_naming_absent_shard(checkpoint):
  with open(checkpoint / "model.safetensors.index.json", "w") as f:
    json.dump({"weight_map": {"model.norm.weight": "model-00002-of-00002.safetensors"}}, f)
  with pytest.raises(js.CheckpointNotFoundError, match="model-00002-of-00002.*incomplete"):
    js.load_model(str(checkpoint))


def test_config_json_missing(checkpoint):
  os.remove(checkpoint / "config.json")
  with pytest.raises(js.CheckpointNotFoundError, match="config.json is missing"):
    js.load_model(str(checkpoint))


def test_unsupported_model_type(checkpoint):
  with open(checkpoint / "config.json", "w") as f:
    json.dump(transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2).to_dict(), f)
  with pytest.raises(js.UnsupportedModelError, match="model_type='gpt2'.*Supported.*llama"):
    js.load_model(str(checkpoint))


def test_missing_tensor(checkpoint):
  _rewrite_weights(checkpoint, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
  with pytest.raises(js.WeightMismatchError, match="missing.*model.layers.1.mlp.up_proj.weight"):
    js.load_model(str(checkpoint))


def test_unexpected_tensor(checkpoint):
  def add(tensors):
    tensors["model.layers.0.self_attn.q_norm.weight"] = torch.ones(8)

  _rewrite_weights(checkpoint, add)
  with pytest.raises(js.WeightMismatchError, match="unexpected.*q_norm.weight.*config.json"):
    js.load_model(str(checkpoint))


def test_shape_mismatch(checkpoint):
  _edit_json(checkpoint / "config.json", intermediate_size=48)
  with pytest.raises(
      js.WeightMismatchError, match="mlp.*shape.*config.json and the weights disagree"
  ):
    js.load_model(str(checkpoint))


def test_uncached_hub_id_offline(tmp_path, monkeypatch):
  import huggingface_hub.constants

  empty = tmp_path / "hf_home"
  empty.mkdir()
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  monkeypatch.setenv("HF_HOME", str(empty))
  monkeypatch.setenv("HF_HUB_CACHE", str(empty / "hub"))
  # huggingface_hub reads its cache location at import time: point the live constant too.
  monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(empty / "hub"))
  with pytest.raises(js.CheckpointNotFoundError, match="tiny-org/not-cached.*HF_HUB_OFFLINE=1"):
    js.load_model("tiny-org/not-cached")


def test_unsupported_dtype(checkpoint):
  with pytest.raises(ValueError, match="dtype='int8'.*bfloat16"):
    js.load_model(str(checkpoint), dtype="int8")


def test_truncated_safetensors(checkpoint):
  path = checkpoint / "model.safetensors"
  path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
  with pytest.raises(
      js.CorruptCheckpointError,
      match=rf"{path} cannot be read \(SafetensorError: .*\): "
      r"the file is truncated or corrupt.*download it again",
  ):
    js.load_model(str(checkpoint))


def test_truncated_pytorch_bin(checkpoint, hf_model):
  os.remove(checkpoint / "model.safetensors")
  path = checkpoint / "pytorch_model.bin"
  torch.save(hf_model.state_dict(), path)
  path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
  with pytest.raises(
      js.CorruptCheckpointError, match=rf"{path} cannot be read .*truncated or corrupt"
  ):
    js.load_model(str(checkpoint))


def test_non_finite_weights_are_named(checkpoint):
  def poison(tensors):
    tensors["model.layers.1.mlp.down_proj.weight"][3, 5] = float("nan")
    tensors["model.layers.1.mlp.down_proj.weight"][0, 0] = float("inf")

  _rewrite_weights(checkpoint, poison)
  with pytest.raises(
      js.CorruptCheckpointError,
      match=r"tensor 'model.layers.1.mlp.down_proj.weight' of .*model.safetensors holds 2 "
      r"NaN/inf value\(s\): the file is corrupt or was partly overwritten",
  ):
    js.load_model(str(checkpoint))


def test_weights_that_overflow_float16_are_named(checkpoint):
  def huge(tensors):
    tensors["model.norm.weight"][0] = 1e6  # finite in float32, inf in float16

  _rewrite_weights(checkpoint, huge)
  with pytest.raises(
      js.CorruptCheckpointError,
      match=r"tensor 'model.norm.weight' of .* overflows float16"
      r".*load the model in bfloat16 or float32",
  ):
    js.load_model(str(checkpoint), dtype="float16")


def test_malformed_config_json(checkpoint):
  path = checkpoint / "config.json"
  path.write_text(path.read_text()[:40])
  with pytest.raises(
      js.CorruptCheckpointError,
      match=rf"{path} is not valid JSON \(.*\): the config.json "
      r"is truncated or was edited by hand; restore it",
  ):
    js.load_model(str(checkpoint))
  path.write_text("[1, 2]")
  with pytest.raises(js.CorruptCheckpointError, match=rf"{path} holds a JSON list, not an object"):
    js.load_model(str(checkpoint))
  path.write_text(json.dumps({"model_type": "llama"}))
  with pytest.raises(
      js.CorruptCheckpointError,
      match=rf"{path}: cannot build a llama config "
      r"\((KeyError|TypeError): .*\): a field is missing",
  ):
    js.load_model(str(checkpoint))


def test_malformed_weight_index(checkpoint):
  path = checkpoint / "model.safetensors.index.json"
  path.write_text('{"weight_map": ')
  with pytest.raises(js.CorruptCheckpointError, match=rf"{path} is not valid JSON .*weight index"):
    js.load_model(str(checkpoint))


# ----- T5: the same layouts through the other architecture -----


def _tiny_t5(directory) -> transformers.T5ForConditionalGeneration:
  """A Flan-style (gated-gelu, untied) random T5, saved to `directory`."""
  model = random_t5(
      3,
      tie=False,
      vocab_size=80,
      d_model=32,
      d_kv=8,
      d_ff=48,
      num_heads=3,
      num_layers=2,
      num_decoder_layers=2,
      feed_forward_proj="gated-gelu",
      decoder_start_token_id=0,
  )
  model.save_pretrained(str(directory))
  return model


@pytest.fixture(scope="module")
def t5_dir(tmp_path_factory):
  pytest.importorskip("jax_specsel.models.t5")
  directory = tmp_path_factory.mktemp("tiny_t5")
  return directory, _tiny_t5(directory)


def _t5_logits(directory):
  decoder_ids = np.array([[0, 11, 4, 9], [0, 5, 5, 70]])
  return js.load_model(str(directory)).logits(
      IDS % 80, decoder_input_ids=decoder_ids, attention_mask=MASK
  )


def test_t5_sharded_and_bin_equal_single_file(tmp_path, t5_dir):
  directory, hf = t5_dir
  reference = _t5_logits(directory)
  hf.save_pretrained(str(tmp_path / "sharded"), max_shard_size="30KB")
  assert os.path.isfile(tmp_path / "sharded" / "model.safetensors.index.json")
  np.testing.assert_array_equal(_t5_logits(tmp_path / "sharded"), reference)
  shutil.copytree(directory, tmp_path / "bin")
  os.remove(tmp_path / "bin" / "model.safetensors")
  torch.save(
      {k: v.contiguous() for k, v in hf.state_dict().items()},
      tmp_path / "bin" / "pytorch_model.bin",
  )
  np.testing.assert_array_equal(_t5_logits(tmp_path / "bin"), reference)


def test_t5_missing_tensor(tmp_path, t5_dir):
  directory, _ = t5_dir
  shutil.copytree(directory, tmp_path / "ckpt")
  name = "decoder.block.1.layer.2.DenseReluDense.wi_1.weight"
  _rewrite_weights(tmp_path / "ckpt", lambda t: t.pop(name))
  with pytest.raises(js.WeightMismatchError, match=f"missing.*{name}"):
    js.load_model(str(tmp_path / "ckpt"))


@pytest.mark.parametrize("damage", ["truncated", "empty"])
def test_t5_unreadable_safetensors_is_named(tmp_path, t5_dir, damage):
  directory, _ = t5_dir
  shutil.copytree(directory, tmp_path / "ckpt")
  path = tmp_path / "ckpt" / "model.safetensors"
  path.write_bytes(path.read_bytes()[: path.stat().st_size // 2] if damage == "truncated" else b"")
  with pytest.raises(
      js.CorruptCheckpointError,
      match=rf"{path} cannot be read \(SafetensorError: .*\): "
      r"the file is truncated or corrupt.*download it again",
  ):
    js.load_model(str(tmp_path / "ckpt"))


# ----- config.json fields of the wrong type or value -----

BAD_LLAMA_FIELDS = [
    ("num_attention_heads", "4", r"must be an integer"),
    ("hidden_size", 32.5, r"must be a whole number"),
    ("max_position_embeddings", "512", r"must be an integer"),
    ("vocab_size", 0, r"must be >= 1"),
    ("intermediate_size", -64, r"must be >= 1"),
    ("num_hidden_layers", True, r"must be an integer"),
    ("rms_norm_eps", "1e-6", r"must be a number"),
    ("tie_word_embeddings", "false", r"must be true or false"),
]
BAD_T5_FIELDS = [
    ("num_heads", "4", r"must be an integer"),
    ("d_model", 32.5, r"must be a whole number"),
    ("vocab_size", 0, r"must be >= 1"),
    ("d_kv", 0, r"must be >= 1"),
    ("num_decoder_layers", False, r"must be an integer"),
]


def _expect_invalid_config(monkeypatch, directory, field, value, reason):
  """load_model raises InvalidConfigError naming the file, field, value and fix, before any module
  is built (building one fails the test)."""
  monkeypatch.setattr(
      js.models.loading,
      "build_module",
      lambda *a, **k: pytest.fail("a module was built from an invalid config"),
  )
  pattern = (
      re.escape(f"{directory}: config.json: {field}={value!r}") + rf".*{reason}.* Fix {field} in "
      r"config.json: it must be .*restore the value"
  )
  with pytest.raises(js.InvalidConfigError, match=pattern):
    js.load_model(str(directory))


@pytest.mark.parametrize("field,value,reason", BAD_LLAMA_FIELDS)
def test_llama_config_field_of_wrong_type_or_value(checkpoint, monkeypatch, field, value, reason):
  _edit_json(checkpoint / "config.json", **{field: value})
  _expect_invalid_config(monkeypatch, checkpoint, field, value, reason)


@pytest.mark.parametrize("field,value,reason", BAD_T5_FIELDS)
def test_t5_config_field_of_wrong_type_or_value(
    tmp_path, t5_dir, monkeypatch, field, value, reason
):
  directory, _ = t5_dir
  shutil.copytree(directory, tmp_path / "ckpt")
  _edit_json(tmp_path / "ckpt" / "config.json", **{field: value})
  _expect_invalid_config(monkeypatch, tmp_path / "ckpt", field, value, reason)


def test_llama_config_inconsistent_heads_and_bad_stop_id(checkpoint):
  _edit_json(checkpoint / "config.json", num_key_value_heads=3)
  with pytest.raises(
      js.InvalidConfigError,
      match=r"config.json: num_attention_heads=4 is not a multiple "
      r"of num_key_value_heads=3.*Fix one of the two",
  ):
    js.load_model(str(checkpoint))
  _edit_json(checkpoint / "config.json", num_key_value_heads=2)
  os.remove(checkpoint / "generation_config.json")
  _edit_json(checkpoint / "config.json", eos_token_id="2")
  with pytest.raises(
      js.InvalidConfigError,
      match=r"config.json: eos_token_id='2' \(str\): must be an "
      r"integer. Fix eos_token_id in config.json",
  ):
    js.load_model(str(checkpoint))


def test_cache_bytes_checked_before_compiling_equal_the_memory_estimate(base_dir, t5_dir):
  from jax_specsel import memory

  for directory in (base_dir, t5_dir[0]):
    model = js.load_model(str(directory))
    assert (
        memory.cache_bytes_per_device(model, 3, 40)
        == js.estimate_memory(model.config, batch=3, cache_length=40)["caches"]
    )
