"""Online updates of the selection policy: domain shift, frozen, masks, checkpoints, input checks."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx

from jax_specsel import bandit

DIM, NUM_OPTIONS = 16, 3
CENTRES = 2.0 * np.random.default_rng(7).normal(size=(2, DIM))  # the old domain A, and B
# Offline rewards: option 0 best on A, option 1 best on B. Shifted domain: option 2 best on A.
OFFLINE_REWARDS = np.array([[0.8, 0.4, 0.3], [0.3, 0.8, 0.4]])
SHIFTED_REWARDS = np.array([0.3, 0.4, 0.8])


def queries(cluster: int, count: int, seed: int) -> np.ndarray:
  """[count, DIM] embeddings around one cluster centre."""
  noise = np.random.default_rng([seed, cluster]).normal(size=(count, DIM))
  return (CENTRES[cluster] + 0.5 * noise).astype(np.float32)


def noisy(mean_rewards: np.ndarray, count: int, seed: int) -> np.ndarray:
  rng = np.random.default_rng(seed)
  return (mean_rewards + 0.1 * rng.normal(size=(count, NUM_OPTIONS))).astype(np.float32)


@pytest.fixture(scope="module")
def saved_policy(tmp_path_factory):
  """Path of an offline-trained policy that prefers option 0 on cluster A."""
  embeddings = np.concatenate([queries(0, 256, seed=0), queries(1, 256, seed=0)])
  rewards = np.concatenate([noisy(OFFLINE_REWARDS[0], 256, 1), noisy(OFFLINE_REWARDS[1], 256, 2)])
  config = bandit.default_train_config()
  config.hidden_dim = 64
  policy = bandit.train_policy(
      embeddings, rewards, seed=0, config=config, option_names=["small", "medium", "autoregressive"]
  )
  path = tmp_path_factory.mktemp("online") / "policy"
  policy.save(path)
  return path


@pytest.fixture
def policy(saved_policy):
  """A fresh copy of the offline policy for every test (updates change it in place)."""
  return bandit.load_policy(saved_policy)


def flat_params(policy: bandit.Policy) -> list[np.ndarray]:
  return [np.array(leaf) for leaf in jax.tree.leaves(policy.params)]


def assert_same_params(first: list[np.ndarray], second: list[np.ndarray]) -> None:
  assert len(first) == len(second)
  for a, b in zip(first, second):
    np.testing.assert_array_equal(a, b)


def test_shifted_domain_moves_greedy_choice_within_50_single_query_updates(policy):
  held_out = queries(0, 200, seed=99)
  assert np.mean(policy.choose(held_out) == 0) >= 0.95  # the offline preference
  updater = bandit.OnlinePolicyUpdater(policy)
  embeddings, rewards = queries(0, 50, seed=5), noisy(SHIFTED_REWARDS, 50, 6)
  for step in range(50):
    stats = updater.update(embeddings[step], rewards[step])
  probabilities = policy.probabilities(held_out)
  assert np.mean(probabilities.argmax(axis=1) == 2) >= 0.95
  assert probabilities[:, 2].mean() > 0.5
  assert stats["updates"] == updater.updates == 50 and stats["num_queries"] == 1
  assert stats["mean_reward"] == pytest.approx(rewards[-1].mean(), abs=1e-6)


def test_reinforce_with_mean_baseline_also_adapts(policy):
  config = bandit.default_online_config()
  config.estimator, config.baseline = "reinforce", "mean"
  updater = bandit.OnlinePolicyUpdater(policy, config)
  for step in range(50):  # 50 updates of 4 queries: sampled actions need more feedback
    updater.update(queries(0, 4, seed=1000 + step), noisy(SHIFTED_REWARDS, 4, 2000 + step))
  assert np.mean(policy.choose(queries(0, 200, seed=99)) == 2) >= 0.95


def test_reinforce_draws_fresh_actions_each_update_from_the_seed():
  """With weights that barely move, only the key changes the sampled actions between updates."""

  def sampled_rewards(seed):
    policy = bandit.Policy(bandit.PolicyNetwork(DIM, NUM_OPTIONS, 8, 2, rngs=nnx.Rngs(0)))
    config = bandit.default_online_config()
    config.estimator, config.learning_rate, config.seed = "reinforce", 1e-9, seed
    updater = bandit.OnlinePolicyUpdater(policy, config)
    embeddings, rewards = queries(0, 4, seed=0), np.tile([0.0, 1.0, 2.0], (4, 1))
    return [updater.update(embeddings, rewards)["policy_reward"] for _ in range(8)]

  first = sampled_rewards(seed=0)
  assert len(set(first)) > 1
  assert sampled_rewards(seed=0) == first and sampled_rewards(seed=1) != first


def test_first_update_is_one_adamw_step_on_the_expected_reward(policy):
  config = bandit.default_online_config()
  config.optimizer, config.estimator, config.learning_rate = "adamw", "expected", 3e-3
  embeddings, rewards = queries(0, 3, seed=3), noisy(SHIFTED_REWARDS, 3, 4)  # padded to 4 rows
  optimizer = optax.adamw(
      config.learning_rate,
      b1=config.b1,
      b2=config.b2,
      eps=config.eps,
      weight_decay=config.weight_decay,
  )

  @jax.jit
  def reference_step(params):  # minus the mean over the 3 queries of sum_k pi_k r_k
    def loss_fn(params):
      inputs = {
          "params": params,
          "input_mean": policy.input_mean,
          "input_scale": policy.input_scale,
      }
      probabilities = jax.nn.softmax(policy.program.logits(inputs, embeddings))
      return -(probabilities * rewards).sum(axis=1).mean()

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, _ = optimizer.update(grads, optimizer.init(params), params)
    return loss, optax.apply_updates(params, updates)

  loss, expected = reference_step(jax.tree.map(np.array, policy.params))
  stats = bandit.OnlinePolicyUpdater(policy, config).update(embeddings, rewards)
  assert stats["loss"] == pytest.approx(float(loss), rel=1e-5)
  for got, want in zip(flat_params(policy), jax.tree.leaves(expected), strict=True):
    np.testing.assert_allclose(got, np.asarray(want), rtol=1e-5, atol=1e-6)


def test_default_update_is_one_gradient_step_toward_the_tempered_best_observed(policy):
  """The default: SGD on the cross-entropy from softmax(rewards / 0.1) over the observed options
  to the policy renormalized over them (numpy target, jax.grad of the reference loss)."""
  config = bandit.default_online_config()
  assert (config.optimizer, config.estimator) == ("sgd", "hindsight")
  embeddings, rewards = queries(0, 3, seed=3), noisy(SHIFTED_REWARDS, 3, 4)
  observed = np.array([[True, True, True], [True, False, True], [False, True, True]])
  target = np.where(observed, np.exp(rewards / 0.1), 0.0)
  target /= target.sum(axis=1, keepdims=True)

  @jax.jit
  def reference_step(params):
    def loss_fn(params):
      inputs = {
          "params": params,
          "input_mean": policy.input_mean,
          "input_scale": policy.input_scale,
      }
      logits = jnp.where(observed, policy.program.logits(inputs, embeddings), -jnp.inf)
      log_probs = jax.nn.log_softmax(logits)
      return -jnp.where(observed, target * log_probs, 0.0).sum(axis=1).mean()

    loss, grads = jax.value_and_grad(loss_fn)(params)
    return loss, jax.tree.map(lambda p, g: p - config.learning_rate * g, params, grads)

  loss, expected = reference_step(jax.tree.map(np.array, policy.params))
  stats = bandit.OnlinePolicyUpdater(policy, config).update(embeddings, rewards, observed)
  assert stats["loss"] == pytest.approx(float(loss), rel=1e-5)
  for got, want in zip(flat_params(policy), jax.tree.leaves(expected), strict=True):
    np.testing.assert_allclose(got, np.asarray(want), rtol=1e-5, atol=1e-6)


def test_feedback_the_policy_agrees_with_leaves_the_other_domain_alone(policy):
  """Cluster A's queries, rewarded as the policy already chooses (option 0 best): the default
  update barely moves cluster B's choice probabilities; AdamW on the expected reward scales the
  small gradients up to full steps and moves them four times as much or more."""
  other = queries(1, 100, seed=77)
  before = policy.probabilities(other)

  def drift(config):
    own = policy.copy()
    updater = bandit.OnlinePolicyUpdater(own, config)
    for step in range(8):
      updater.update(queries(0, 4, seed=300 + step), noisy(OFFLINE_REWARDS[0], 4, 400 + step))
    return np.abs(own.probabilities(other) - before).max()

  adam = bandit.default_online_config()
  adam.optimizer, adam.estimator, adam.learning_rate = "adamw", "expected", 3e-3
  assert drift(bandit.default_online_config()) < drift(adam) / 4


def test_program_inputs_and_choices_follow_the_updated_weights(policy, saved_policy):
  updater = bandit.OnlinePolicyUpdater(policy)
  before_leaves, treedef = policy.program_inputs()  # fills the flattening cache
  before = flat_params(policy)
  query = queries(0, 1, seed=8)
  choice_before = policy.choose_one(query[0])
  for step in range(30):
    updater.update(query[0], SHIFTED_REWARDS)
  leaves, treedef_after = policy.program_inputs()
  assert treedef_after == treedef
  inputs = jax.tree.unflatten(treedef, leaves)
  assert_same_params(
      [np.asarray(leaf) for leaf in jax.tree.leaves(inputs["params"])], flat_params(policy)
  )
  assert not all(np.array_equal(a, b) for a, b in zip(before, flat_params(policy)))
  assert not all(np.array_equal(a, np.asarray(b)) for a, b in zip(before_leaves, leaves))
  np.testing.assert_allclose(
      np.asarray(jax.nn.softmax(policy.program.logits(inputs, query))),
      policy.probabilities(query),
      rtol=1e-6,
  )
  assert (choice_before, policy.choose_one(query[0])) == (0, 2)
  offline = bandit.load_policy(saved_policy)  # the standardization stays the offline one
  np.testing.assert_array_equal(inputs["input_mean"], offline.input_mean)
  np.testing.assert_array_equal(inputs["input_scale"], offline.input_scale)


def test_frozen_changes_nothing_but_reports(policy):
  config = bandit.default_online_config()
  config.frozen = True
  updater = bandit.OnlinePolicyUpdater(policy, config)
  before, optimizer_before = flat_params(policy), jax.tree.map(np.array, updater.optimizer_state)
  probabilities = policy.probabilities(queries(0, 1, seed=8))[0]
  for step in range(5):
    stats = updater.update(queries(0, 1, seed=8)[0], SHIFTED_REWARDS)
  assert_same_params(flat_params(policy), before)
  assert_same_params(jax.tree.leaves(updater.optimizer_state), jax.tree.leaves(optimizer_before))
  assert updater.updates == 0 and stats["updates"] == 0
  assert stats["policy_reward"] == pytest.approx(float(probabilities @ SHIFTED_REWARDS), rel=1e-5)
  with pytest.raises(ValueError, match="rewards have shape"):
    updater.update(queries(0, 1, seed=8)[0], [1.0, 2.0])


@pytest.mark.parametrize("estimator,baseline", [("expected", "none"), ("reinforce", "mean")])
def test_unobserved_rewards_do_not_matter(saved_policy, estimator, baseline):
  config = bandit.default_online_config()
  config.estimator, config.baseline = estimator, baseline
  embeddings, rewards = queries(0, 4, seed=11), noisy(SHIFTED_REWARDS, 4, 12)
  observed = np.ones_like(rewards, bool)
  observed[::2, 2] = False  # the best option unmeasured on half the rows
  observed[1, 0] = False
  results = []
  for fill in (1e6, -3.0, np.nan):
    policy = bandit.load_policy(saved_policy)
    updater = bandit.OnlinePolicyUpdater(policy, config)
    stats = [
        updater.update(embeddings, np.where(observed, rewards, fill), observed) for _ in range(3)
    ]
    results.append((flat_params(policy), stats))
  for params, stats in results[1:]:
    assert_same_params(params, results[0][0])
    assert stats == results[0][1]
  assert max(s["policy_reward"] for s in results[0][1]) < 2  # never an unobserved 1e6
  # The mask is what protects the update: the same huge values marked observed change it.
  policy = bandit.load_policy(saved_policy)
  bandit.OnlinePolicyUpdater(policy, config).update(embeddings, np.where(observed, rewards, 1e6))
  assert not all(np.array_equal(a, b) for a, b in zip(flat_params(policy), results[0][0]))


def test_policy_reward_is_renormalized_over_observed_options(policy):
  embedding = queries(0, 1, seed=13)
  observed = np.array([[True, False, True]])
  probabilities = policy.probabilities(embedding)[0]
  stats = bandit.OnlinePolicyUpdater(policy).update(embedding, [[0.2, 50.0, 0.9]], observed)
  restricted = probabilities[[0, 2]] / probabilities[[0, 2]].sum()
  assert stats["policy_reward"] == pytest.approx(float(restricted @ [0.2, 0.9]), rel=1e-5)
  assert stats["mean_reward"] == pytest.approx(0.55)


def test_one_query_forms_agree(saved_policy):
  embedding, observed = queries(0, 1, seed=14), np.array([True, False, True])
  results = []
  for arguments in (
      (embedding[0], SHIFTED_REWARDS, observed),
      (embedding[0], SHIFTED_REWARDS[None], observed),
      (embedding, SHIFTED_REWARDS[None], observed[None]),
  ):
    policy = bandit.load_policy(saved_policy)
    results.append((bandit.OnlinePolicyUpdater(policy).update(*arguments), flat_params(policy)))
  for stats, params in results[1:]:
    assert stats == results[0][0]
    assert_same_params(params, results[0][1])


def test_one_compilation_for_repeated_single_queries(policy):
  """The first update compiles the only executable its later single-query updates use (its
  optimizer state starts on the device, as every update returns it)."""
  config = bandit.default_online_config()
  config.learning_rate = 1.2345e-3  # an update step of its own: no other test compiled it
  updater = bandit.OnlinePolicyUpdater(policy.copy(), config)
  compiled = lambda: updater._update_step._cache_size()  # shared by updaters of this shape
  updater.update(queries(0, 1, seed=0)[0], SHIFTED_REWARDS)
  after_first = compiled()
  assert after_first == 1
  for step in range(1, 4):
    updater.update(queries(0, 1, seed=step)[0], noisy(SHIFTED_REWARDS, 1, step)[0])
  assert compiled() == after_first
  updater.update(queries(0, 3, seed=3), noisy(SHIFTED_REWARDS, 3, 3))
  after_three = compiled()
  assert after_three <= after_first + 1
  updater.update(queries(0, 4, seed=4), noisy(SHIFTED_REWARDS, 4, 4))  # 3 was padded to 4 rows
  assert compiled() == after_three


def test_save_restore_continues_identically(policy, tmp_path):
  config = bandit.default_online_config()  # sampled actions: the restored PRNG position matters
  config.estimator, config.baseline, config.steps_per_update, config.seed = (
      "reinforce",
      "mean",
      2,
      5,
  )
  updater = bandit.OnlinePolicyUpdater(policy, config)
  for step in range(3):
    updater.update(queries(0, 2, seed=step), noisy(SHIFTED_REWARDS, 2, step))
  updater.save(tmp_path / "online")
  restored = bandit.load_online_updater(tmp_path / "online")
  assert restored.updates == 3 and restored.config == updater.config
  assert restored.policy.option_names == policy.option_names
  embeddings, rewards = queries(0, 2, seed=50), noisy(SHIFTED_REWARDS, 2, 51)
  assert restored.update(embeddings, rewards) == updater.update(embeddings, rewards)
  assert_same_params(flat_params(restored.policy), flat_params(policy))
  # The optimizer state matters: the same weights with a fresh optimizer step elsewhere.
  fresh = bandit.load_policy(tmp_path / "online" / "policy")
  bandit.OnlinePolicyUpdater(fresh, config).update(embeddings, rewards)
  assert not all(np.array_equal(a, b) for a, b in zip(flat_params(fresh), flat_params(policy)))


def test_save_refuses_existing_and_load_refuses_other_directories(policy, saved_policy, tmp_path):
  updater = bandit.OnlinePolicyUpdater(policy)
  updater.save(tmp_path / "online")
  with pytest.raises(FileExistsError, match="overwrite=True"):
    updater.save(tmp_path / "online")
  updater.update(queries(0, 1, seed=1)[0], SHIFTED_REWARDS)
  updater.save(tmp_path / "online", overwrite=True)
  assert bandit.load_online_updater(tmp_path / "online").updates == 1
  with pytest.raises(bandit.PolicyLoadError, match="bare policy.*load_policy"):
    bandit.load_online_updater(saved_policy)
  (tmp_path / "empty").mkdir()
  with pytest.raises(bandit.PolicyLoadError, match="is empty"):
    bandit.load_online_updater(tmp_path / "empty")
  with pytest.raises(FileNotFoundError, match="no saved online updater"):
    bandit.load_online_updater(tmp_path / "missing")
  other = bandit.Policy(bandit.PolicyNetwork(DIM, 4, 8, 2, rngs=nnx.Rngs(0)))
  other.save(tmp_path / "online" / "policy", overwrite=True)  # a policy of another shape
  with pytest.raises(bandit.PolicyLoadError, match="parts of two saves"):
    bandit.load_online_updater(tmp_path / "online")


GOOD = dict(embeddings=queries(0, 2, seed=0), rewards=noisy(SHIFTED_REWARDS, 2, 0))


def _with(**changes):
  return {**GOOD, **changes}


@pytest.mark.parametrize(
    "arguments,message",
    [
        (_with(embeddings=np.ones((2, DIM + 1))), r"shape \(2, 17\).*\[N, 16\]"),
        (_with(embeddings=np.ones((1, 2, DIM))), r"shape \(1, 2, 16\)"),
        (_with(embeddings=np.ones((0, DIM)), rewards=np.ones((0, 3))), "no queries"),
        (_with(rewards=np.ones((2, 4))), r"3 options \(\['small', 'medium', 'autoregressive'\]\)"),
        (_with(rewards=np.ones((3, 3))), r"rewards \[2, 3\]"),
        (_with(rewards=np.ones(3)), r"rewards have shape \(3,\)"),
        (
            _with(rewards=np.array([[1, 2, np.nan], [1, 2, 3]])),
            r"NaN/inf at observed.*first: \[0\]",
        ),
        (
            _with(rewards=np.array([[1, 2, 3], [1, np.inf, 3]])),
            r"NaN/inf at observed.*first: \[1\]",
        ),
        (_with(embeddings=np.full((2, DIM), np.nan)), "embeddings contain NaN/inf"),
        (_with(observed=np.ones((2, 3), int)), "observed must be a bool array"),
        (_with(observed=np.ones((2, 2), bool)), r"observed must be .*\(2, 3\)"),
        (
            _with(observed=np.array([[True, False, False], [False] * 3])),
            r"marking no option in 1 rows \(first: \[1\]\)",
        ),
    ],
)
def test_bad_inputs_are_named_and_change_nothing(policy, arguments, message):
  updater = bandit.OnlinePolicyUpdater(policy)
  before = flat_params(policy)
  with pytest.raises(ValueError, match=message):
    updater.update(**arguments)
  assert_same_params(flat_params(policy), before)
  assert updater.updates == 0


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("learning_rate", float("nan"), "config.learning_rate=nan: must be a finite"),
        ("learning_rate", -1e-3, "config.learning_rate=-0.001: must be > 0"),
        ("learning_rate", "fast", "config.learning_rate='fast'"),
        ("estimator", "ppo", r"config.estimator='ppo'; choose one of"),
        ("optimizer", "adam", r"config.optimizer='adam'; choose one of \('adamw', 'sgd'\)"),
        ("baseline", "mean", "only applies to estimator='reinforce'"),
        ("steps_per_update", 0, "config.steps_per_update=0: must be >= 1"),
        ("frozen", "yes", "config.frozen='yes': must be True or False"),
        ("b2", 1.0, r"config.b2=1.0: must be in \[0, 1\)"),
        ("seed", -1, "config.seed=-1: must be >= 0"),
    ],
)
def test_bad_config_is_named(policy, field, value, message):
  config = ml_collections.ConfigDict({**bandit.default_online_config().to_dict(), field: value})
  with pytest.raises(ValueError, match=message):
    bandit.OnlinePolicyUpdater(policy, config)


def test_config_missing_a_field_is_named():
  config = bandit.default_online_config()
  del config["steps_per_update"]
  with pytest.raises(ValueError, match=r"lacks \['steps_per_update'\]; start from"):
    bandit.validate_online_config(config)
