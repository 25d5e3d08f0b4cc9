"""Offline policy training on the bandit table (paper section 2.4 and 3.1).

Input: query embeddings [N, D] and a full reward table rewards[i, k] (already alpha-mixed,
see `rewards.mix_rewards`): the offline collection scores every option on every query.

Two gradient estimators of J = E_q E_{a~pi(.|q)} r(q, a) (`objective`): "reinforce" (sampled
action, the paper's) and "expected" (-sum_a pi(a|q) r(q, a), exact on the batch, possible because
the offline table holds every option's reward).

Configs are ml_collections.ConfigDict (like every config of this project: `--config.x=`
overrides work on them): `default_train_config()` (the library default, chosen by
benchmarks/experiment_estimators.py) and `paper_train_config()` (plain REINFORCE, paper settings).
"""

from __future__ import annotations

import functools
import math
import os
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from flax import nnx
from ml_collections import config_dict

from jax_specsel import validation
from jax_specsel.bandit import objective
from jax_specsel.bandit.policy import Policy, PolicyNetwork, check_option_names, non_finite_arrays


def paper_train_config() -> ml_collections.ConfigDict:
  """The paper's settings (section 3.1, Table 9): plain REINFORCE, no baseline, raw inputs."""
  config = ml_collections.ConfigDict()
  config.hidden_dim = 512  # width of the hidden layers
  config.num_layers = 3  # Linear layers, tanh between them
  config.optimizer = "adamw"  # objective.OPTIMIZERS
  config.learning_rate = 1e-3
  config.weight_decay = 1e-2
  config.b1 = 0.9
  config.b2 = 0.99
  config.eps = 1e-8
  config.batch_size = 64
  config.epochs = 3
  config.estimator = "reinforce"  # "reinforce" (sampled action) | "expected" (all options)
  config.baseline = "none"  # "none" | "mean" (leave-one-out batch mean; reinforce only)
  config.standardize_inputs = False  # subtract the training mean, divide by the training std
  config.max_examples = config_dict.placeholder(int)  # None or a random subset of this size
  config.seed = 0  # used when train_policy gets no explicit seed
  return config


def default_train_config() -> ml_collections.ConfigDict:
  """The library default: the paper's network and optimizer, the exact expected gradient and
  standardized inputs.

  Chosen by benchmarks/experiment_estimators.py (a synthetic contextual bandit, greedy best-arm
  accuracy on held-out queries): the expected estimator learns best
  at every training-set size, and standardization matters once the embeddings carry a shared
  offset and uneven per-dimension scales, as pooled transformer states do.
  """
  config = paper_train_config()
  config.estimator = "expected"
  config.standardize_inputs = True
  return config


def validate_train_config(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming the first bad field of a training config."""
  objective.validate_estimator(config)
  try:
    for field in ("hidden_dim", "num_layers", "batch_size", "epochs"):
      validation.integer(f"config.{field}", config[field], minimum=1)
    if config.max_examples is not None:
      validation.integer("config.max_examples", config.max_examples, minimum=1)
    objective.validate_optimizer(config)
  except TypeError as err:  # one error type for a bad config value
    raise ValueError(str(err)) from None


def _check_dataset(embeddings, rewards) -> tuple[np.ndarray, np.ndarray]:
  embeddings = np.asarray(embeddings, dtype=np.float32)
  rewards = np.asarray(rewards, dtype=np.float32)
  if embeddings.ndim != 2 or rewards.ndim != 2:
    raise ValueError(
        f"embeddings must be [N, D] and rewards [N, K]; got {embeddings.shape} "
        f"and {rewards.shape}"
    )
  if embeddings.shape[0] == 0:
    raise ValueError("empty dataset: no training examples; collect at least one query")
  if embeddings.shape[1] == 0:
    raise ValueError(
        f"embeddings have width 0 (shape {embeddings.shape}): the policy needs the "
        "target's query embeddings (collection column 'embedding')."
    )
  if rewards.shape[1] == 0:
    raise ValueError(
        f"rewards have 0 columns (shape {rewards.shape}): no options to choose among; "
        "pass one reward column per drafter (and autoregressive) option"
    )
  if rewards.shape[1] == 1:
    raise ValueError("a drafter list of one: nothing to choose; use that drafter directly")
  if embeddings.shape[0] != rewards.shape[0]:
    raise ValueError(
        f"{embeddings.shape[0]} embeddings but {rewards.shape[0]} reward rows; "
        "pass one reward row per embedded query"
    )
  for name, array in (("embeddings", embeddings), ("rewards", rewards)):
    if not np.all(np.isfinite(array)):
      bad_rows = np.unique(np.nonzero(~np.isfinite(array))[0])
      raise ValueError(
          f"{name} contain NaN/inf in {bad_rows.size} rows (first: "
          f"{bad_rows[:5].tolist()}); drop or repair those examples"
      )
  return embeddings, rewards


def _standardization(embeddings: np.ndarray, enabled: bool) -> tuple[np.ndarray, np.ndarray]:
  width = embeddings.shape[1]
  if not enabled:
    return np.zeros(width, np.float32), np.ones(width, np.float32)
  mean = embeddings.mean(axis=0)
  std = embeddings.std(axis=0)
  # A constant feature carries no information: leave it unscaled rather than divide by ~0.
  return mean.astype(np.float32), np.where(std > 1e-6, std, 1.0).astype(np.float32)


@functools.lru_cache(maxsize=32)
def _make_train_step(graphdef, optimizer, estimator: str, baseline: str):
  """A jitted step over one mini-batch [B, D], [B, K] (weights [B] mark real rows).

  Batches are gathered on the host: the table (N x D, gigabytes for a large target) never has
  to fit on the device, and every dataset size shares one compiled step.

  Cached on its (hashable) arguments: retraining a policy of the same shape and settings reuses
  the compiled step instead of compiling it again.
  """

  loss_fn = functools.partial(objective.batch_loss, graphdef, estimator, baseline)

  @jax.jit
  def train_step(
      params, optimizer_state, embeddings, rewards, input_mean, input_scale, weights, base_key, step
  ):
    key = jax.random.fold_in(base_key, step)
    return objective.optimizer_step(
        loss_fn,
        optimizer,
        params,
        optimizer_state,
        embeddings,
        rewards,
        input_mean,
        input_scale,
        weights,
        key,
    )

  return train_step


def _epoch_batches(num_examples: int, batch_size: int, seed: int, epoch: int):
  """Shuffled index batches of one epoch, the last padded with weight-0 rows (one shape)."""
  order = np.random.default_rng([seed, epoch]).permutation(num_examples)
  num_batches = math.ceil(num_examples / batch_size)
  padded = np.zeros(num_batches * batch_size, np.int32)
  padded[:num_examples] = order
  weights = np.zeros(num_batches * batch_size, np.float32)
  weights[:num_examples] = 1.0
  return padded.reshape(num_batches, batch_size), weights.reshape(num_batches, batch_size)


class _Checkpoints:
  """Training checkpoints (params, optimizer state, step) in an orbax CheckpointManager."""

  def __init__(self, directory: str, run_facts: dict[str, Any]):
    self.manager = ocp.CheckpointManager(
        os.path.abspath(directory), options=ocp.CheckpointManagerOptions(max_to_keep=2, create=True)
    )
    self.run_facts = run_facts

  def restore(self, params, optimizer_state) -> tuple[Any, Any, int]:
    step = self.manager.latest_step()
    if step is None:
      return params, optimizer_state, 0
    saved_facts = self.manager.restore(step, args=ocp.args.Composite(run=ocp.args.JsonRestore()))[
        "run"
    ]
    if saved_facts != self.run_facts:
      raise ValueError(
          f"checkpoint directory {self.manager.directory} holds a different run "
          f"({saved_facts}) than this one ({self.run_facts}); use a fresh directory"
      )
    target = jax.tree.map(
        ocp.utils.to_shape_dtype_struct, {"params": params, "optimizer": optimizer_state}
    )
    state = self.manager.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target))
    )["state"]
    logging.info("restored policy training state at step %d", step)
    return state["params"], state["optimizer"], step

  def save(self, step: int, params, optimizer_state) -> None:
    self.manager.save(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave({"params": params, "optimizer": optimizer_state}),
            run=ocp.args.JsonSave(self.run_facts),
        ),
    )

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def _select_examples(embeddings, rewards, max_examples, seed):
  if max_examples is None or max_examples >= embeddings.shape[0]:
    return embeddings, rewards
  subset = np.sort(
      np.random.default_rng([seed, 1]).choice(embeddings.shape[0], max_examples, replace=False)
  )
  return embeddings[subset], rewards[subset]


def _run_epochs(
    train_step,
    params,
    optimizer_state,
    embeddings,
    rewards,
    stats,
    config,
    seed: int,
    start_step: int,
    checkpoints: _Checkpoints | None,
):
  """The training loop from `start_step` to the end of config.epochs.

  The batch order of epoch e and the action samples of step t depend only on (seed, e) and
  (seed, t), so a run resumed from a checkpoint continues exactly as an uninterrupted one.
  """
  num_examples = embeddings.shape[0]
  steps_per_epoch = math.ceil(num_examples / config.batch_size)
  base_key = jax.random.key(seed)
  epoch_rewards = []
  for epoch in range(start_step // steps_per_epoch, config.epochs):
    batch_indices, batch_weights = _epoch_batches(num_examples, config.batch_size, seed, epoch)
    first_step = max(start_step, epoch * steps_per_epoch)
    reward_sum = jnp.zeros(())  # summed on the device: one host sync per epoch, not per step
    for step in range(first_step, (epoch + 1) * steps_per_epoch):
      batch = step - epoch * steps_per_epoch
      rows = batch_indices[batch]
      params, optimizer_state, _, mean_reward = train_step(
          params,
          optimizer_state,
          embeddings[rows],
          rewards[rows],
          *stats,
          batch_weights[batch],
          base_key,
          step,
      )
      reward_sum = reward_sum + mean_reward
    epoch_rewards.append(float(reward_sum) / ((epoch + 1) * steps_per_epoch - first_step))
    logging.info("policy epoch %d: mean training reward %.4f", epoch, epoch_rewards[-1])
    if checkpoints is not None:
      checkpoints.save((epoch + 1) * steps_per_epoch, params, optimizer_state)
  return params, epoch_rewards


def _refuse_diverged(params, config, steps: int) -> None:
  """A policy whose weights turned NaN/inf would choose option 0 for every query: refuse it."""
  damaged = non_finite_arrays(params)
  if damaged:
    raise FloatingPointError(
        f"policy training diverged: after {steps} steps the weights {damaged} hold NaN/inf. "
        f"Lower config.learning_rate (now {config.learning_rate}) or rescale the rewards; "
        "nothing was returned or saved."
    )


def _open_checkpoints(
    checkpoint_dir, config, seed: int, embeddings, rewards
) -> _Checkpoints | None:
  """The run's training checkpoints (None without a directory), keyed by what makes a run the
  same run: a restart of another one is refused."""
  if checkpoint_dir is None:
    return None
  run_facts = {
      "seed": seed,
      "num_examples": embeddings.shape[0],
      "input_dim": embeddings.shape[1],
      "num_options": rewards.shape[1],
      "batch_size": int(config.batch_size),
      "estimator": config.estimator,
      "baseline": config.baseline,
  }
  return _Checkpoints(os.fspath(checkpoint_dir), run_facts)


def _train(
    network, embeddings, rewards, input_mean, input_scale, config, seed: int, checkpoint_dir
) -> tuple[PolicyNetwork, dict[str, Any]]:
  """Trains `network` from the run's latest checkpoint (or from the start) to the end of
  config.epochs: (the trained network, the training facts a Policy keeps)."""
  graphdef, params = nnx.split(network, nnx.Param)
  optimizer = objective.make_optimizer(config)
  optimizer_state = optimizer.init(params)
  checkpoints = _open_checkpoints(checkpoint_dir, config, seed, embeddings, rewards)
  start_step = 0
  if checkpoints is not None:
    params, optimizer_state, start_step = checkpoints.restore(params, optimizer_state)
  try:
    train_step = _make_train_step(graphdef, optimizer, config.estimator, config.baseline)
    params, epoch_rewards = _run_epochs(
        train_step,
        params,
        optimizer_state,
        embeddings,
        rewards,
        (jnp.asarray(input_mean), jnp.asarray(input_scale)),
        config,
        seed,
        start_step,
        checkpoints,
    )
  finally:
    if checkpoints is not None:
      checkpoints.close()
  num_examples = embeddings.shape[0]
  total_steps = config.epochs * math.ceil(num_examples / config.batch_size)
  _refuse_diverged(params, config, total_steps)
  training_info = {
      "steps": max(total_steps, start_step),
      "resumed_from_step": start_step,
      "num_examples": num_examples,
      "seed": seed,
      "epoch_mean_reward": epoch_rewards,
  }
  return nnx.merge(graphdef, params), training_info


def train_policy(
    embeddings,
    rewards,
    seed: int | None = None,
    config: ml_collections.ConfigDict | None = None,
    *,
    option_names: Sequence[str] | None = None,
    checkpoint_dir: str | os.PathLike | None = None,
) -> Policy:
  """Trains a drafter-selection policy on the offline bandit table.

  All randomness (initialization, shuffling, sampled actions, the max_examples subset) comes
  from `seed`: the same inputs and seed give the same policy.

  Args:
    embeddings: [N, D] query embeddings from the target model.
    rewards: [N, K] reward of each option on each query (alpha-mixed, `mix_rewards`).
    seed: the random seed; None takes config.seed.
    config: a training config (`default_train_config()` when None).
    option_names: optional K names of the options, saved with the policy.
    checkpoint_dir: if given, params and optimizer state are saved there after every epoch, and
      a run restarted with the same directory continues from the latest saved step (training
      longer = the same call with a larger config.epochs).

  Returns:
    The trained `Policy`.

  Raises:
    ValueError: a bad config, table or option names (before any training).
    FloatingPointError: the weights turned NaN/inf during training.
  """
  config = default_train_config() if config is None else config
  validate_train_config(config)
  seed = int(config.seed if seed is None else seed)
  embeddings, rewards = _check_dataset(embeddings, rewards)
  option_names = check_option_names(option_names, rewards.shape[1])  # before any training
  embeddings, rewards = _select_examples(embeddings, rewards, config.max_examples, seed)
  input_dim, num_options = embeddings.shape[1], rewards.shape[1]
  input_mean, input_scale = _standardization(embeddings, config.standardize_inputs)
  network = PolicyNetwork(
      input_dim, num_options, config.hidden_dim, config.num_layers, rngs=nnx.Rngs(params=seed)
  )
  network, training_info = _train(
      network, embeddings, rewards, input_mean, input_scale, config, seed, checkpoint_dir
  )
  return Policy(
      network,
      input_mean=input_mean,
      input_scale=input_scale,
      option_names=option_names,
      config=config,
      training_info=training_info,
  )
