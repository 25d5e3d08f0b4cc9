"""The request path's caches: the bounded compile cache and the stacked weights of drafters."""

from __future__ import annotations

from flax import nnx

import jax_specsel as js
from fake_models import fake_model
from jax_specsel.bandit.policy import Policy, PolicyNetwork
from jax_specsel.decoding import programs

PROMPT = [[3, 4, 5]]


def test_the_cache_drops_the_least_recently_used_entry():
  cache = programs.LruCache(2)
  assert cache.put("a", 1) == [] and cache.put("b", 2) == []
  assert cache.get("a") == 1  # "b" is now the least recently used
  assert cache.put("c", 3) == ["b"]
  assert (cache.get("b"), cache.get("a"), cache.get("c"), len(cache)) == (None, 1, 3, 2)


def test_selected_follows_an_in_place_update_of_drafters_that_share_a_loop():
  target = fake_model(0)
  drafters = {"a": fake_model(1), "b": fake_model(2)}  # one architecture: their weights stack
  policy = Policy(
      PolicyNetwork(target.hidden_size, 2, hidden_dim=4, rngs=nnx.Rngs(0)), option_names=["a", "b"]
  )

  def accepted():
    selected = js.generate_selected(target, PROMPT, drafters, policy, gamma=3, max_new_tokens=12)
    alone = js.generate(
        target, PROMPT, drafter=drafters[selected.choices[0]], gamma=3, max_new_tokens=12
    )
    assert selected.tokens.tolist() == alone.tokens.tolist()
    return int(selected.stats.accepted[0]), int(alone.stats.accepted[0])

  before, expected = accepted()
  assert before == expected
  for drafter in drafters.values():  # both now draft the target's own greedy tokens
    for name in ("unigram", "bigram"):
      drafter.params[name][...] = target.params[name][...]
  after, expected = accepted()
  assert after == expected > before
