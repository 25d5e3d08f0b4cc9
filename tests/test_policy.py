"""The selection policy and its offline trainer on a synthetic contextual bandit."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from flax import nnx

from jax_specsel import bandit

# Mean reward of option k (column) in cluster c (row): each cluster has its own best option
# (clusters 0 and 3 share option 0), best 0.6 against 0.45-0.5: a modest margin.
MEAN_REWARDS = np.array(
    [[0.60, 0.50, 0.45], [0.45, 0.60, 0.50], [0.50, 0.45, 0.60], [0.60, 0.45, 0.50]]
)
DIM = 64
# Always choosing option 0 is right in 2 of 4 clusters: the best constant policy scores 50%.
BEST_CONSTANT_ACCURACY = 0.5


# Overlapping Gaussian clusters: per-dimension centre std 0.6 against unit noise.
CENTRES = 0.6 * np.random.default_rng(12345).normal(size=(len(MEAN_REWARDS), DIM))


def make_bandit(num_examples: int, seed: int, noise: float = 0.15):
  """(embeddings [N, D], noisy rewards [N, 3], best option [N]) from the clusters."""
  rng = np.random.default_rng(seed)
  clusters = rng.integers(0, len(MEAN_REWARDS), num_examples)
  embeddings = (CENTRES[clusters] + rng.normal(size=(num_examples, DIM))).astype(np.float32)
  rewards = MEAN_REWARDS[clusters] + noise * rng.normal(size=(num_examples, 3))
  return embeddings, rewards.astype(np.float32), MEAN_REWARDS[clusters].argmax(axis=1)


TRAIN = make_bandit(8192, seed=0)
HELD_OUT = make_bandit(2000, seed=1)


def bayes_optimal_accuracy() -> float:
  """Accuracy of the ideal policy that knows the centres (the ceiling of any learner)."""
  sq_distances = ((HELD_OUT[0][:, None, :] - CENTRES[None]) ** 2).sum(-1)
  posterior = np.exp(-0.5 * (sq_distances - sq_distances.min(axis=1, keepdims=True)))
  posterior /= posterior.sum(axis=1, keepdims=True)
  return float(np.mean((posterior @ MEAN_REWARDS).argmax(axis=1) == HELD_OUT[2]))


def held_out_accuracy(policy: bandit.Policy) -> float:
  embeddings, _, best = HELD_OUT
  return float(np.mean(policy.choose(embeddings, greedy=True) == best))


@pytest.fixture(scope="module")
def default_policy():
  return bandit.train_policy(
      TRAIN[0], TRAIN[1], seed=0, option_names=["t5-small", "t5-small-xsum", "autoregressive"]
  )


@pytest.fixture(scope="module")
def small_policy():
  """A briefly trained policy whose probabilities are far from one-hot."""
  config = bandit.default_train_config()
  config.epochs = 1
  config.max_examples = 128
  return bandit.train_policy(TRAIN[0], TRAIN[1], seed=3, config=config)


def test_default_trainer_finds_best_arm(default_policy):
  assert bayes_optimal_accuracy() > 0.99  # the clusters overlap, but not hopelessly
  assert held_out_accuracy(default_policy) >= 0.95
  assert default_policy.input_dim == DIM and default_policy.num_options == 3
  assert default_policy.training_info["steps"] == 3 * 8192 // 64


def test_paper_config_is_the_paper_and_learns():
  config = bandit.paper_train_config()
  assert (config.hidden_dim, config.num_layers, config.batch_size, config.epochs) == (512, 3, 64, 3)
  assert (config.learning_rate, config.weight_decay, config.b1, config.b2, config.eps) == (
      1e-3,
      1e-2,
      0.9,
      0.99,
      1e-8,
  )
  assert (config.estimator, config.baseline, config.standardize_inputs) == (
      "reinforce",
      "none",
      False,
  )
  policy = bandit.train_policy(TRAIN[0], TRAIN[1], seed=0, config=config)
  assert held_out_accuracy(policy) > BEST_CONSTANT_ACCURACY + 0.05


def test_reinforce_with_mean_baseline_learns():
  config = bandit.paper_train_config()
  config.baseline = "mean"
  config.max_examples = 4096  # the baseline needs fewer examples than plain REINFORCE
  policy = bandit.train_policy(TRAIN[0], TRAIN[1], seed=0, config=config)
  assert held_out_accuracy(policy) >= 0.9


def test_save_load_round_trip(default_policy, tmp_path):
  default_policy.save(tmp_path / "policy")
  loaded = bandit.load_policy(tmp_path / "policy")
  embeddings = HELD_OUT[0][:300]
  np.testing.assert_array_equal(loaded.choose(embeddings), default_policy.choose(embeddings))
  np.testing.assert_array_equal(
      loaded.choose(embeddings, greedy=False, seed=5),
      default_policy.choose(embeddings, greedy=False, seed=5),
  )
  np.testing.assert_array_equal(
      loaded.probabilities(embeddings), default_policy.probabilities(embeddings)
  )
  assert loaded.option_names == ["t5-small", "t5-small-xsum", "autoregressive"]
  assert loaded.config.estimator == default_policy.config.estimator
  assert loaded.training_info == default_policy.training_info
  with pytest.raises(FileExistsError, match="overwrite=True"):
    default_policy.save(tmp_path / "policy")
  default_policy.save(tmp_path / "policy", overwrite=True)


def test_standardization_stats_are_stored_and_reloaded(tmp_path):
  embeddings = TRAIN[0][:256] * 10.0 + 100.0
  config = bandit.default_train_config()
  config.standardize_inputs = True
  config.epochs = 1
  policy = bandit.train_policy(embeddings, TRAIN[1][:256], seed=0, config=config)
  np.testing.assert_allclose(policy.input_mean, embeddings.mean(0), rtol=1e-5)
  np.testing.assert_allclose(policy.input_scale, embeddings.std(0), rtol=1e-4)
  policy.save(tmp_path / "p")
  loaded = bandit.load_policy(tmp_path / "p")
  np.testing.assert_array_equal(loaded.input_mean, policy.input_mean)
  np.testing.assert_array_equal(
      loaded.probabilities(embeddings[:50]), policy.probabilities(embeddings[:50])
  )


def test_training_checkpoint_restore_continues_from_saved_step(tmp_path):
  embeddings, rewards = TRAIN[0][:320], TRAIN[1][:320]
  config = bandit.paper_train_config()  # sampled actions: the RNG stream must resume too
  config.epochs = 1
  first = bandit.train_policy(
      embeddings, rewards, seed=4, config=config, checkpoint_dir=tmp_path / "ckpt"
  )
  assert first.training_info["resumed_from_step"] == 0
  config.epochs = 2
  resumed = bandit.train_policy(
      embeddings, rewards, seed=4, config=config, checkpoint_dir=tmp_path / "ckpt"
  )
  assert resumed.training_info["resumed_from_step"] == 5  # 320 / 64 steps per epoch
  assert resumed.training_info["steps"] == 10
  assert len(resumed.training_info["epoch_mean_reward"]) == 1  # only epoch 2 ran
  uninterrupted = bandit.train_policy(embeddings, rewards, seed=4, config=config)
  np.testing.assert_allclose(
      resumed.probabilities(embeddings[:100]),
      uninterrupted.probabilities(embeddings[:100]),
      atol=1e-6,
  )
  assert not np.allclose(
      first.probabilities(embeddings[:100]),
      uninterrupted.probabilities(embeddings[:100]),
      atol=1e-4,
  )
  with pytest.raises(ValueError, match="different run"):
    bandit.train_policy(
        embeddings, rewards, seed=5, config=config, checkpoint_dir=tmp_path / "ckpt"
    )


def test_dynamic_choices_depend_on_seed_only(small_policy):
  embeddings = HELD_OUT[0][:500]
  a = small_policy.choose(embeddings, greedy=False, seed=1)
  b = small_policy.choose(embeddings, greedy=False, seed=1)
  c = small_policy.choose(embeddings, greedy=False, seed=2)
  np.testing.assert_array_equal(a, b)
  assert np.mean(a != c) > 0.05
  assert small_policy.choose_one(embeddings[0], greedy=False, seed=9) == small_policy.choose_one(
      embeddings[0], greedy=False, seed=9
  )


def test_dynamic_choices_follow_the_probabilities(small_policy):
  embeddings = np.repeat(HELD_OUT[0][:4], 2000, axis=0)
  choices = small_policy.choose(embeddings, greedy=False, seed=0).reshape(4, 2000)
  frequencies = np.stack([(choices == k).mean(axis=1) for k in range(3)], axis=1)
  probabilities = small_policy.probabilities(HELD_OUT[0][:4])
  assert probabilities.max() < 0.97  # not one-hot: sampling really varies
  tolerance = 4.5 * np.sqrt(probabilities * (1 - probabilities) / 2000) + 1e-3  # binomial sd
  assert np.all(np.abs(frequencies - probabilities) < tolerance), (frequencies, probabilities)


def test_greedy_is_argmax_and_choose_one_agrees(small_policy):
  embeddings = HELD_OUT[0][:64]
  greedy = small_policy.choose(embeddings)
  np.testing.assert_array_equal(greedy, small_policy.probabilities(embeddings).argmax(axis=1))
  assert [small_policy.choose_one(e) for e in embeddings[:8]] == list(greedy[:8])
  np.testing.assert_allclose(small_policy.probabilities(embeddings).sum(axis=1), 1.0, rtol=1e-5)


def test_max_examples_limits_training_set(small_policy):
  assert small_policy.training_info["num_examples"] == 128
  assert small_policy.training_info["steps"] == 2


def test_training_errors():
  embeddings, rewards = TRAIN[0][:10], TRAIN[1][:10]
  with pytest.raises(ValueError, match="empty dataset"):
    bandit.train_policy(np.zeros((0, DIM)), np.zeros((0, 3)))
  with pytest.raises(ValueError, match="a drafter list of one: nothing to choose"):
    bandit.train_policy(embeddings, rewards[:, :1])
  with pytest.raises(ValueError, match="10 embeddings but 9 reward rows"):
    bandit.train_policy(embeddings, rewards[:9])
  bad = embeddings.copy()
  bad[3, 0] = np.nan
  with pytest.raises(ValueError, match=r"embeddings contain NaN/inf in 1 rows \(first: \[3\]\)"):
    bandit.train_policy(bad, rewards)
  config = bandit.default_train_config()
  config.baseline = "mean"
  with pytest.raises(ValueError, match="only applies to estimator='reinforce'"):
    bandit.train_policy(embeddings, rewards, config=config)
  config = bandit.default_train_config()
  config.estimator = "ppo"
  with pytest.raises(ValueError, match="config.estimator='ppo'"):
    bandit.train_policy(embeddings, rewards, config=config)


def test_wrong_embedding_width_names_both_widths(small_policy):
  with pytest.raises(ValueError, match=f"width 16 but the policy was trained on width {DIM}"):
    small_policy.choose(np.zeros((2, 16), np.float32))
  with pytest.raises(ValueError, match=f"width 16 but the policy was trained on width {DIM}"):
    small_policy.probabilities(np.zeros((2, 16), np.float32))
  with pytest.raises(ValueError, match=rf"shape \({DIM},\), got \(16,\)"):
    small_policy.choose_one(np.zeros(16, np.float32))
  with pytest.raises(ValueError, match="use choose_one"):
    small_policy.choose(np.zeros(DIM, np.float32))


def test_load_policy_missing_path(tmp_path):
  with pytest.raises(FileNotFoundError, match="no saved policy"):
    bandit.load_policy(tmp_path / "nothing")


def test_no_options_and_no_width_are_named():
  embeddings, rewards = TRAIN[0][:10], TRAIN[1][:10]
  with pytest.raises(
      ValueError, match=r"rewards have 0 columns \(shape \(10, 0\)\): no options to choose"
  ):
    bandit.train_policy(embeddings, rewards[:, :0])
  with pytest.raises(ValueError, match=r"embeddings have width 0 \(shape \(10, 0\)\)"):
    bandit.train_policy(embeddings[:, :0], rewards)
  with pytest.raises(ValueError, match="input_dim must be >= 1, got 0"):
    bandit.PolicyNetwork(0, 3, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="num_options must be >= 1, got 0"):
    bandit.PolicyNetwork(4, 0, rngs=nnx.Rngs(0))


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("learning_rate", float("nan"), "config.learning_rate=nan: must be a finite number"),
        ("learning_rate", -1e-3, r"config.learning_rate=-0.001: must be > 0"),
        ("b2", 1.0, r"config.b2=1.0: must be in \[0, 1\)"),
        ("eps", 0.0, "config.eps=0.0: must be > 0"),
        ("weight_decay", float("inf"), "config.weight_decay=inf: must be a finite number"),
        ("batch_size", 0, "config.batch_size=0: must be >= 1"),
    ],
)
def test_bad_optimizer_settings_are_refused(field, value, message):
  config = bandit.default_train_config()
  config[field] = value
  with pytest.raises(ValueError, match=message):
    bandit.train_policy(TRAIN[0][:10], TRAIN[1][:10], config=config)


def test_save_over_an_existing_policy_replaces_it_whole(small_policy, default_policy, tmp_path):
  small_policy.save(tmp_path / "policy")
  default_policy.save(tmp_path / "policy", overwrite=True)
  loaded = bandit.load_policy(tmp_path / "policy")
  np.testing.assert_array_equal(
      loaded.probabilities(HELD_OUT[0][:20]), default_policy.probabilities(HELD_OUT[0][:20])
  )
  assert sorted(p.name for p in tmp_path.iterdir()) == ["policy"]  # no staging left behind


def test_empty_or_damaged_policy_directory_is_named(small_policy, tmp_path):
  (tmp_path / "empty").mkdir()
  with pytest.raises(
      bandit.PolicyLoadError,
      match=rf"{tmp_path / 'empty'} is empty: no policy was saved " r"there; train one",
  ):
    bandit.load_policy(tmp_path / "empty")
  small_policy.save(tmp_path / "no_state")
  shutil.rmtree(tmp_path / "no_state" / "state")
  with pytest.raises(
      bandit.PolicyLoadError,
      match=r"no_state lacks \['state'\]: it is not a complete " r"Policy.save directory",
  ):
    bandit.load_policy(tmp_path / "no_state")
  small_policy.save(tmp_path / "damaged")
  data_files = [
      p for p in (tmp_path / "damaged" / "state").rglob("*") if p.is_file() and p.parent.name == "d"
  ]
  assert data_files
  for path in data_files:  # the array data, as a partial copy leaves it
    path.write_bytes(path.read_bytes()[:8])
  with pytest.raises(
      bandit.PolicyLoadError,
      match=rf"cannot read the policy at {tmp_path / 'damaged'} "
      r"\(.*\): the directory is damaged or was written only "
      r"in part; train and save the policy again",
  ):
    bandit.load_policy(tmp_path / "damaged")


def _tiny_policy(option_names=None, seed=0):
  network = bandit.PolicyNetwork(4, 3, hidden_dim=8, num_layers=2, rngs=nnx.Rngs(params=seed))
  return bandit.Policy(network, option_names=option_names)


def test_nan_or_inf_embeddings_are_refused_naming_the_rows():
  policy = _tiny_policy()
  embeddings = np.ones((6, 4), np.float32)
  embeddings[2, 1], embeddings[5, 0] = np.nan, np.inf
  for call in (policy.choose, policy.probabilities, lambda e: policy.choose(e, greedy=False)):
    with pytest.raises(
        ValueError,
        match=r"embeddings rows \[2, 5\] \(2 of 6\) hold NaN/inf: the "
        r"policy cannot choose for them",
    ):
      call(embeddings)
  with pytest.raises(ValueError, match="the embedding holds NaN/inf"):
    policy.choose_one(embeddings[2])
  assert policy.choose(embeddings[:2]).shape == (2,)  # finite rows still choose
  assert 0 <= policy.choose_one(embeddings[0]) < 3


def test_duplicate_option_names_are_refused_at_construction_training_and_load(tmp_path):
  message = r"option names \['a'\] are given more than once in \['a', 'b', 'a'\]"
  with pytest.raises(ValueError, match=message):
    _tiny_policy(["a", "b", "a"])
  with pytest.raises(ValueError, match=message):
    bandit.train_policy(TRAIN[0][:10], TRAIN[1][:10], option_names=["a", "b", "a"])
  _tiny_policy(["a", "b", "c"]).save(tmp_path / "policy")
  metadata_file = tmp_path / "policy" / "metadata" / "metadata"
  metadata_file.write_text(metadata_file.read_text().replace('"c"', '"a"'))
  with pytest.raises(
      bandit.PolicyLoadError, match=rf"{tmp_path / 'policy' / 'metadata'}: {message}"
  ):
    bandit.load_policy(tmp_path / "policy")


def test_option_names_that_do_not_match_the_reward_columns_fail_before_training(monkeypatch):
  from jax_specsel.bandit import reinforce

  monkeypatch.setattr(reinforce, "PolicyNetwork", lambda *args, **kwargs: pytest.fail("trained"))
  with pytest.raises(
      ValueError,
      match=r"2 option names for 3 options \(reward columns\): "
      r"\['a', 'b'\]; pass one name per column",
  ):
    bandit.train_policy(TRAIN[0][:10], TRAIN[1][:10], option_names=["a", "b"])


def test_a_policy_with_nan_weights_is_refused_at_load_naming_the_file(tmp_path):
  policy = _tiny_policy(["a", "b", "c"])
  policy.params["layers"][1]["bias"].value = (
      policy.params["layers"][1]["bias"].value.at[0].set(np.nan)
  )  # as a flipped byte in the weight file leaves it
  policy.save(tmp_path / "policy")
  with pytest.raises(
      bandit.PolicyLoadError,
      match=rf"{tmp_path / 'policy' / 'state'} holds NaN/inf in "
      r"\['params/layers/1/bias'\]: the weight file is damaged",
  ):
    bandit.load_policy(tmp_path / "policy")


def test_training_that_diverges_is_refused():
  config = bandit.default_train_config()
  config.learning_rate, config.epochs = 1e30, 3  # the decay step alone multiplies by -1e28
  with pytest.raises(
      FloatingPointError,
      match=r"policy training diverged: after 3 steps the weights "
      r"\[.*\] hold NaN/inf. Lower config.learning_rate",
  ):
    bandit.train_policy(TRAIN[0][:64], TRAIN[1][:64], config=config)
