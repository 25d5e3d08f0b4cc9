"""The flat weights the per-query paths pass to compiled programs follow in-place updates."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import jax_specsel as js
from fake_models import FakeConfig, FakeModule, fake_model
from jax_specsel.bandit import Policy, PolicyNetwork
from jax_specsel.models.interface import Model

PROMPT = [[3, 4, 5]]


def _forcing(vocab_size: int, token: int) -> jnp.ndarray:
  """A unigram table whose every row makes `token` the argmax by far."""
  table = np.zeros((vocab_size, vocab_size), np.float32)
  table[:, token] = 100.0
  return jnp.asarray(table)


def _greedy(model, max_new_tokens: int = 4) -> list[int]:
  out = js.generate(model, PROMPT, temperature=0.0, max_new_tokens=max_new_tokens)
  return out.tokens[0, : out.lengths[0]].tolist()


def test_model_sees_an_in_place_weight_update():
  model = fake_model(0)
  before = _greedy(model)  # warms the cache of flat weights
  old_leaves, treedef = model.flat_params()
  model.params["unigram"][...] = _forcing(model.vocab_size, 6)
  new_leaves, new_treedef = model.flat_params()
  assert new_treedef == treedef
  assert any(new is not old for new, old in zip(new_leaves, old_leaves))
  np.testing.assert_array_equal(
      np.asarray(jax.tree.unflatten(treedef, new_leaves)["unigram"]),
      np.asarray(model.params["unigram"][...]),
  )
  assert _greedy(model) == [6, 6, 6, 6] != before


def test_model_sees_an_update_of_the_module_it_was_built_from():
  source = fake_model(1)
  module = FakeModule(
      FakeConfig(),
      np.asarray(source.params["unigram"][...]),
      np.asarray(source.params["bigram"][...]),
  )
  model = Model(module, name="shared")
  _greedy(model)
  module.unigram[...] = _forcing(8, 5)  # the model's State shares the module's Variables
  assert _greedy(model) == [5, 5, 5, 5]


def test_model_sees_a_replaced_state():
  model = fake_model(2)
  _greedy(model)
  graphdef, state = nnx.split(
      FakeModule(FakeConfig(), np.asarray(_forcing(8, 7)), np.zeros((8, 8), np.float32))
  )
  del graphdef
  model.params = state
  assert _greedy(model) == [7, 7, 7, 7]


def test_policy_sees_an_in_place_weight_update():
  policy = Policy(PolicyNetwork(4, 3, hidden_dim=8, rngs=nnx.Rngs(0)))
  embedding = np.ones(4, np.float32)
  policy.choose_one(embedding)  # warms the caches
  leaves_before, _ = policy.program_inputs()
  last = policy.params["layers"][2]
  last["kernel"][...] = jnp.zeros_like(last["kernel"][...])
  last["bias"][...] = jnp.asarray([0.0, 0.0, 50.0])
  assert policy.choose_one(embedding) == 2
  leaves_after, treedef = policy.program_inputs()
  assert any(new is not old for new, old in zip(leaves_after, leaves_before))
  inputs = jax.tree.unflatten(treedef, leaves_after)
  np.testing.assert_array_equal(np.asarray(inputs["params"]["layers"][2]["bias"]), [0.0, 0.0, 50.0])
  policy.input_mean = jnp.full((4,), 1.0)  # a replaced array is seen as before
  inputs = jax.tree.unflatten(treedef, policy.program_inputs()[0])
  assert np.asarray(inputs["input_mean"]).tolist() == [1.0] * 4
