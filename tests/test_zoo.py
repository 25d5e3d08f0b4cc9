"""The model zoo: a tiny zoo builds, decodes, caches, and survives broken or partial caches."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time

import numpy as np
import pytest
from flax import nnx

from jax_specsel import token_batches
from jax_specsel.data import seq2seq, zoo as zoo_lib
from jax_specsel.data.world import World, WorldConfig
from jax_specsel.decoding import generate
from jax_specsel.models import t5
from jax_specsel.models.interface import Model

TINY_WORLD = WorldConfig(train_per_domain=64, validation_per_domain=8, test_per_domain=8)
DRAFTERS = {"drafter_translate", "drafter_summarize", "drafter_general"}


@pytest.fixture(scope="module")
def world():
  return World(TINY_WORLD)


@pytest.fixture(scope="module")
def built(world, tmp_path_factory):
  """One real tiny build (training included), shared by the tests below."""
  root = str(tmp_path_factory.mktemp("zoo_cache"))
  started = time.perf_counter()
  zoo = zoo_lib.build_zoo(world, zoo_lib.ZooConfig.tiny(), cache_dir=root, progress=False)
  return zoo, root, time.perf_counter() - started


def _untrained_zoo(world, config, progress):
  """Stands in for `train_zoo` where only the cache logic is under test: random weights."""
  del progress
  vocab = seq2seq.round_up(len(world.tokenizer()), 8)
  tokenizer = world.tokenizer()

  def model(spec, name, seed):
    return Model(t5.Module(spec.t5_config(vocab), rngs=nnx.Rngs(seed)), tokenizer, name)

  target = model(config.target, zoo_lib.TARGET, 0)
  drafters = {
      name: model(config.domain_drafter, name, i)
      for i, name in enumerate(config.drafter_names(), start=1)
  }
  info = {name: {"params": 0, "train_seconds": 0.0} for name in (zoo_lib.TARGET, *drafters)}
  info["distill_generate_seconds"] = 0.0
  return target, drafters, info


@pytest.fixture
def count_training(monkeypatch):
  calls = []

  def fake(world, config, progress):
    calls.append(1)
    return _untrained_zoo(world, config, progress)

  monkeypatch.setattr(zoo_lib, "train_zoo", fake)
  return calls


@pytest.mark.slow
def test_tiny_build_returns_models_that_decode(built, world):
  zoo, root, _ = built
  assert not zoo.from_cache
  assert set(zoo.drafters) == DRAFTERS
  assert zoo.directory.startswith(root) and os.path.basename(zoo.directory).startswith("zoo-")
  assert zoo.tokenizer.pad_token_id == 0 and zoo.tokenizer.eos_token_id == 1
  prompts = [e["prompt"] for e in world.split("test", "arithmetic")[:4]]  # short: cheap compiles
  ids, mask = token_batches.right_padded(zoo.tokenizer(prompts)["input_ids"], pad_id=0)
  for name, model in zoo.models.items():
    assert model.name == name and model.is_encoder_decoder
    assert model.vocab_size >= len(zoo.tokenizer)
    out = generate(model, ids, temperature=0.0, max_new_tokens=6, attention_mask=mask)
    assert out.tokens.shape == (len(prompts), 6)
    assert ((out.tokens >= 0) & (out.tokens < model.vocab_size)).all()
  sizes = {name: m.num_params for name, m in zoo.models.items()}
  assert all(sizes["target"] > sizes[d] for d in DRAFTERS)
  for name, model in zoo.models.items():  # every model trained: its loss fell below ln(V)
    record = zoo.info["models"][name]
    assert record["train_steps"] > 0 and record["final_loss"] < np.log(model.vocab_size)
  assert zoo.info["models"]["drafter_translate"]["distilled_on"] == ["translate"]
  # the generalist: both drafter domains, never arithmetic (the domain only the target learns)
  assert zoo.info["models"]["drafter_general"]["distilled_on"] == ["summarize", "translate"]


@pytest.mark.slow
def test_the_target_is_the_trained_one_grown_without_changing_its_function(built, world):
  zoo, _, _ = built
  factor = zoo_lib.ZooConfig.tiny().target_growth
  trained, grown = zoo.trained_target, zoo.target
  assert factor > 1 and zoo.info["target_growth"]["factor"] == factor
  assert grown.hidden_size == factor * trained.hidden_size
  assert zoo.info["target_growth"]["params"] == grown.num_params > trained.num_params
  assert os.path.isdir(os.path.join(zoo.directory, f"target-grown-x{factor}"))
  prompts = [e["prompt"] for e in world.split("test", "translate")[:4]]
  ids, mask = token_batches.right_padded(zoo.tokenizer(prompts)["input_ids"], pad_id=0)
  before = generate(trained, ids, temperature=0.0, max_new_tokens=8, attention_mask=mask)
  after = generate(grown, ids, temperature=0.0, max_new_tokens=8, attention_mask=mask)
  np.testing.assert_array_equal(before.tokens, after.tokens)
  # The drafters stay as distilled: speculative decoding with the grown target is exact.
  spec = generate(
      grown,
      ids,
      drafter=zoo.drafters["drafter_translate"],
      gamma=3,
      temperature=0.0,
      max_new_tokens=8,
      attention_mask=mask,
  )
  np.testing.assert_array_equal(spec.tokens, after.tokens)


def test_bad_growth_factor_is_refused_before_any_work():
  for bad in (0, 2.5, "2", True):
    with pytest.raises(ValueError, match="target_growth"):
      zoo_lib.ZooConfig(target_growth=bad)


@pytest.mark.slow
def test_second_build_loads_from_cache_without_training(built, world, count_training):
  zoo, root, build_seconds = built
  started = time.perf_counter()
  again = zoo_lib.build_zoo(world, zoo_lib.ZooConfig.tiny(), cache_dir=root, progress=False)
  load_seconds = time.perf_counter() - started
  assert again.from_cache and not count_training
  assert again.directory == zoo.directory
  assert load_seconds < build_seconds
  for name, model in zoo.models.items():
    for a, b in zip(nnx.to_flat_state(model.params), nnx.to_flat_state(again.models[name].params)):
      np.testing.assert_array_equal(np.asarray(a[1][...]), np.asarray(b[1][...]))


def _copy_cache(built, tmp_path) -> tuple[str, str]:
  zoo, _, _ = built
  root = str(tmp_path / "cache")
  directory = os.path.join(root, os.path.basename(zoo.directory))
  shutil.copytree(zoo.directory, directory)
  return root, directory


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["missing_weights", "garbage_json", "no_json", "truncated"])
def test_corrupt_cache_is_rebuilt(built, world, tmp_path, count_training, damage):
  root, directory = _copy_cache(built, tmp_path)
  if damage == "missing_weights":
    shutil.rmtree(os.path.join(directory, "models", "drafter_summarize"))
  elif damage == "garbage_json":
    with open(os.path.join(directory, "zoo.json"), "w") as handle:
      handle.write("{not json")
  elif damage == "no_json":
    os.remove(os.path.join(directory, "zoo.json"))
  else:  # every weight file cut to half its size
    for folder, _, files in os.walk(os.path.join(directory, "models", "target")):
      for name in files:
        path = os.path.join(folder, name)
        size = os.path.getsize(path)
        with open(path, "r+b") as handle:
          handle.truncate(size // 2)
  with pytest.raises(zoo_lib.ZooCacheError):
    zoo_lib.load_zoo(directory, world)
  rebuilt = zoo_lib.build_zoo(world, zoo_lib.ZooConfig.tiny(), cache_dir=root, progress=False)
  assert len(count_training) == 1 and not rebuilt.from_cache
  assert rebuilt.directory == directory
  assert zoo_lib.load_zoo(directory, world).from_cache  # the rebuilt cache is complete


@pytest.mark.slow
def test_partial_build_is_never_taken_for_complete(built, world, tmp_path, count_training):
  root, directory = _copy_cache(built, tmp_path)
  # What a build killed before its final rename leaves behind: a full-looking temporary folder.
  dead_partial = f"{directory}.partial-999999999-deadbeef"
  os.rename(directory, dead_partial)
  zoo = zoo_lib.build_zoo(world, zoo_lib.ZooConfig.tiny(), cache_dir=root, progress=False)
  assert len(count_training) == 1 and not zoo.from_cache
  assert not os.path.exists(dead_partial), "abandoned partial builds are cleaned up"
  assert sorted(os.listdir(root)) == [os.path.basename(directory)]


@pytest.mark.slow
def test_cache_of_another_world_gives_a_clear_error(built):
  zoo, _, _ = built
  with pytest.raises(zoo_lib.ZooCacheError, match="another world"):
    zoo_lib.load_zoo(zoo.directory, World(TINY_WORLD, seed=1))


def test_cache_key_follows_world_and_config(world, tmp_path):
  tiny = zoo_lib.ZooConfig.tiny()
  base = zoo_lib.zoo_directory(world, tiny, str(tmp_path))
  assert base == zoo_lib.zoo_directory(World(TINY_WORLD), tiny, str(tmp_path))
  assert base != zoo_lib.zoo_directory(World(TINY_WORLD, seed=1), tiny, str(tmp_path))
  assert base != zoo_lib.zoo_directory(world, zoo_lib.ZooConfig(), str(tmp_path))
  assert zoo_lib.ZooConfig.from_dict(json.loads(json.dumps(tiny.to_dict()))) == tiny


def test_default_cache_root_honours_xdg(monkeypatch, tmp_path):
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
  assert zoo_lib.default_cache_root() == os.path.join(str(tmp_path), "jax_specsel")


def test_default_config_drafter_decoders_are_far_smaller_than_the_target():
  config = zoo_lib.ZooConfig()
  target = config.target.t5_config(224)
  for spec in (config.domain_drafter, config.general_drafter):
    drafter = spec.t5_config(224)
    # Decode-step weights (what a cached step reads): at most a fifth of the target's.
    assert (
        5 * drafter.params_per_decoder_layer * drafter.num_decoder_layers
        <= target.params_per_decoder_layer * target.num_decoder_layers
    )
  assert "arithmetic" not in config.drafter_domains  # only the target is aligned there


def test_drafter_domains_must_exist(world, tmp_path):
  config = zoo_lib.ZooConfig.tiny()
  with pytest.raises(ValueError, match="not domains"):
    zoo_lib.build_zoo(
        world, dataclasses.replace(config, drafter_domains=("poetry",)), cache_dir=str(tmp_path)
    )
  with pytest.raises(ValueError, match="not domains"):
    zoo_lib.build_zoo(
        world, dataclasses.replace(config, general_domains=("poetry",)), cache_dir=str(tmp_path)
    )
