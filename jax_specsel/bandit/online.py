"""Online updates of the drafter-selection policy, query after query.

The offline trainer (`reinforce`) fits the policy once on a collected table. When the served
queries drift away from that table (a new domain), the rewards measured while serving can keep
the policy current: after a query, the caller hands its embedding and the measured rewards of the
options (e.g. tokens per unit cost) to `OnlinePolicyUpdater.update`, which takes
`steps_per_update` steps of `config.optimizer` on the estimators the offline trainer shares
(`objective.batch_loss`) and writes the new weights into the `Policy` in place: the policy's own
calls and the fused serving program (`Policy.program_inputs`) use them from the next query on.
The input standardization (input_mean, input_scale) stays the one fitted offline.

Partial feedback: `observed` [N, K] marks the rewards that were measured. Each row's objective
is the policy's expected reward renormalized over its observed options (`objective`): an
unobserved reward never enters the loss (it may even be NaN), and an unobserved option's logit
gets no gradient from that row. A row with a single observed option therefore teaches nothing
(its renormalized policy is certain): learning from one chosen option's reward alone would need
the probability it was chosen with (importance weighting), which this updater does not take.

Saved layout (a directory): `policy/` (Policy.save) and `updater/` (orbax: item `state` =
{optimizer} StandardSave, item `metadata` = JSON of the config, update count and policy shape).
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import uuid
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from jax_specsel import validation
from jax_specsel.bandit import objective
from jax_specsel.bandit.policy import Policy, PolicyLoadError, load_policy

_FORMAT_VERSION = 1
_POLICY_ITEM, _UPDATER_ITEM = "policy", "updater"


def default_online_config() -> ml_collections.ConfigDict:
  """Settings of online updates: plain gradient steps (no weight decay), the hindsight estimator."""
  config = ml_collections.ConfigDict()
  # "sgd", not the offline trainer's AdamW: served queries the policy already gets right give
  # near-zero gradients, which Adam would scale up to full steps that move every other domain's
  # choice (objective.make_optimizer); gradient steps move where the feedback disagrees.
  config.optimizer = "sgd"  # objective.OPTIMIZERS
  config.learning_rate = 0.03
  # Offline 1e-2; here 0: decay applied at every one of thousands of updates would shrink the
  # offline-trained weights toward a uniform policy whatever the rewards say.
  config.weight_decay = 0.0
  config.b1 = 0.9  # b1, b2, eps: AdamW's only
  config.b2 = 0.99
  config.eps = 1e-8
  # "hindsight": learn to pick the best observed option; unlike "expected" (whose gradient
  # vanishes where the prior is confidently wrong) it leaves a wrong prior within an update or two.
  config.estimator = "hindsight"  # objective.ESTIMATORS
  config.baseline = "none"  # "none" | "mean" (leave-one-out batch mean; reinforce only)
  config.steps_per_update = 1  # optimizer steps on each update's feedback
  config.frozen = False  # True: update() validates and reports but never changes the weights
  config.seed = 0  # the sampled actions of "reinforce" (update u, step s: fold_in(seed, u, s))
  return config


def validate_online_config(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming the first missing or bad field of an online config."""
  missing = sorted(set(default_online_config()) - set(config))
  if missing:
    raise ValueError(
        f"the online config lacks {missing}; start from default_online_config() "
        "and override fields"
    )
  objective.validate_estimator(config)
  if not isinstance(config.frozen, (bool, np.bool_)):
    raise ValueError(f"config.frozen={config.frozen!r}: must be True or False.")
  try:
    validation.integer("config.steps_per_update", config.steps_per_update, minimum=1)
    validation.integer("config.seed", config.seed, minimum=0)
    objective.validate_optimizer(config)
  except TypeError as err:  # one error type for a bad config value
    raise ValueError(str(err)) from None


@functools.lru_cache(maxsize=32)
def _make_update_step(graphdef, optimizer, estimator: str, baseline: str, steps: int):
  """Jitted `steps` optimizer steps on one padded batch; (params, state, first loss, reward).

  Cached on its (hashable) arguments: every updater of the same policy shape and settings shares
  one compiled function, compiled once per batch bucket (`_pad_rows`).
  """
  loss_fn = functools.partial(objective.batch_loss, graphdef, estimator, baseline)

  @jax.jit
  def update_step(
      params, optimizer_state, embeddings, rewards, observed, weights, input_mean, input_scale, key
  ):
    def one_step(carry, step):
      params, optimizer_state = carry
      params, optimizer_state, loss, policy_reward = objective.optimizer_step(
          loss_fn,
          optimizer,
          params,
          optimizer_state,
          embeddings,
          rewards,
          input_mean,
          input_scale,
          weights,
          jax.random.fold_in(key, step),
          observed,
      )
      return (params, optimizer_state), (loss, policy_reward)

    (params, optimizer_state), (losses, policy_rewards) = jax.lax.scan(
        one_step, (params, optimizer_state), jnp.arange(steps)
    )
    return params, optimizer_state, losses[0], policy_rewards[0]

  return update_step


@functools.lru_cache(maxsize=32)
def _make_evaluation(graphdef, estimator: str, baseline: str):
  """Jitted (loss, policy reward) of one padded batch without a step (the frozen updater)."""

  @jax.jit
  def evaluate(params, embeddings, rewards, observed, weights, input_mean, input_scale, key):
    return objective.batch_loss(
        graphdef,
        estimator,
        baseline,
        params,
        embeddings,
        rewards,
        input_mean,
        input_scale,
        weights,
        jax.random.fold_in(key, 0),
        observed,
    )

  return evaluate


class OnlinePolicyUpdater:
  """Keeps a `Policy` learning from the rewards measured while serving.

  Attributes:
    policy: the policy it updates (its params change in place at every non-frozen update).
    config: a copy of the online config (`default_online_config`), fixed at construction.
    optimizer_state: the optimizer state (empty for "sgd"), carried from update to update.
    updates: how many updates changed the weights so far.
  """

  def __init__(self, policy: Policy, config: ml_collections.ConfigDict | None = None):
    config = default_online_config() if config is None else config
    validate_online_config(config)
    self.policy = policy
    self.config = ml_collections.FrozenConfigDict(config)
    self._optimizer = objective.make_optimizer(config)
    # On the params' device, as every update returns it: the first update and the later ones
    # then share one compiled executable (an uncommitted state would compile a second).
    device = jax.tree.leaves(policy.params)[0].sharding
    self.optimizer_state = jax.device_put(self._optimizer.init(policy.params), device)
    self.updates = 0
    self._base_key = jax.random.key(int(config.seed))
    self._update_step = _make_update_step(
        policy.graphdef,
        self._optimizer,
        config.estimator,
        config.baseline,
        int(config.steps_per_update),
    )
    self._evaluate = _make_evaluation(policy.graphdef, config.estimator, config.baseline)

  def update(self, embeddings, rewards, observed=None) -> dict[str, Any]:
    """Learns from the measured rewards of a batch of served queries.

    Args:
      embeddings: float [N, D] query embeddings (the policy's input), or [D] for one query.
      rewards: float [N, K] (or [K]) reward of each option, in the policy's option order.
      observed: optional bool [N, K] (or [K]): True where the reward was measured. None: all
        were. Unobserved entries are ignored whatever they hold (see the module docstring).

    Returns:
      {"loss": the surrogate loss before this update, "policy_reward": the policy's expected
       (reinforce: sampled) reward on the observed options before this update,
       "mean_reward": mean of the observed rewards, "num_queries": N,
       "updates": the update count after this call}.

    Raises:
      ValueError: a malformed input (named, with the fix); nothing is changed then.
    """
    batch = _check_feedback(embeddings, rewards, observed, self.policy)
    key = jax.random.fold_in(self._base_key, self.updates)
    fixed = (self.policy.input_mean, self.policy.input_scale, key)
    if self.config.frozen:
      loss, policy_reward = self._evaluate(self.policy.params, *batch.arrays, *fixed)
    else:
      params, self.optimizer_state, loss, policy_reward = self._update_step(
          self.policy.params, self.optimizer_state, *batch.arrays, *fixed
      )
      _write_in_place(self.policy.params, params)
      self.updates += 1
    return {
        "loss": float(loss),
        "policy_reward": float(policy_reward),
        "mean_reward": batch.mean_reward,
        "num_queries": batch.num_queries,
        "updates": self.updates,
    }

  def save(self, path: str | os.PathLike, overwrite: bool = False) -> None:
    """Writes policy, optimizer state, update count and config to directory `path`.

    Args:
      path: directory to create; `load_online_updater(path)` continues exactly from here.
      overwrite: replace an existing directory instead of raising FileExistsError.
    """
    path = os.path.abspath(os.fspath(path))
    if os.path.exists(path) and not overwrite:
      raise FileExistsError(f"{path} exists; pass overwrite=True or choose a new path")
    staging = f"{path}.saving-{uuid.uuid4().hex[:8]}"  # as Policy.save: never a half save
    os.makedirs(staging)
    try:
      self.policy.save(os.path.join(staging, _POLICY_ITEM))
      with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
        checkpointer.save(
            os.path.join(staging, _UPDATER_ITEM),
            args=ocp.args.Composite(
                state=ocp.args.StandardSave({"optimizer": self.optimizer_state}),
                metadata=ocp.args.JsonSave(self._metadata()),
            ),
        )
    except BaseException:
      shutil.rmtree(staging, ignore_errors=True)
      raise
    previous = f"{path}.previous-{uuid.uuid4().hex[:8]}"
    if os.path.exists(path):
      os.rename(path, previous)
    os.rename(staging, path)
    shutil.rmtree(previous, ignore_errors=True)

  def _metadata(self) -> dict[str, Any]:
    return {
        "format_version": _FORMAT_VERSION,
        "updates": self.updates,
        "config": json.loads(self.config.to_json()),
        "policy_shape": _policy_shape(self.policy),
    }


def _policy_shape(policy: Policy) -> dict[str, int]:
  return {
      "input_dim": policy.input_dim,
      "num_options": policy.num_options,
      "hidden_dim": policy.hidden_dim,
      "num_layers": policy.num_layers,
  }


def _write_in_place(target: nnx.State, source: nnx.State) -> None:
  """Copies the values of `source` into the Variables of `target` (the same objects stay).

  `cached_flat_params` re-reads the Variables' values at every call, so `Policy.program_inputs`
  and the policy's jitted calls see the new weights without re-flattening anything.
  """
  is_variable = lambda node: isinstance(node, nnx.Variable)
  targets = jax.tree.leaves(target, is_leaf=is_variable)
  sources = jax.tree.leaves(source, is_leaf=is_variable)
  for variable, new in zip(targets, sources, strict=True):
    variable.set_value(new.get_value())


class _Feedback(NamedTuple):
  arrays: tuple  # (embeddings [B, D], rewards [B, K], observed [B, K], weights [B]), B padded
  mean_reward: float  # mean of the observed rewards
  num_queries: int  # N, the real rows


def _check_feedback(embeddings, rewards, observed, policy: Policy) -> _Feedback:
  """Validates one update's inputs and pads them to a power-of-two batch (one compile each)."""
  width, num_options = policy.input_dim, policy.num_options
  embeddings = np.asarray(embeddings, np.float32)
  rewards = np.asarray(rewards, np.float32)
  if embeddings.ndim == 1:  # one query: [D] with rewards and observed [K] (or [1, K])
    embeddings, rewards = embeddings[None], np.atleast_2d(rewards)
    observed = None if observed is None else np.atleast_2d(observed)
  observed = np.ones(rewards.shape, bool) if observed is None else np.asarray(observed)
  if embeddings.ndim != 2 or embeddings.shape[1] != width:
    raise ValueError(
        f"embeddings have shape {embeddings.shape} but the policy takes [N, {width}] "
        f"(or [{width}] for one query); embed the queries with the model the policy "
        "was trained on"
    )
  num_queries = embeddings.shape[0]
  if num_queries == 0:
    raise ValueError("embeddings hold no queries (shape (0, D)); pass at least one query")
  if rewards.shape != (num_queries, num_options):
    raise ValueError(
        f"rewards have shape {rewards.shape} but the policy chooses among "
        f"{num_options} options ({policy.option_names or 'unnamed'}) for "
        f"{num_queries} queries: pass rewards [{num_queries}, {num_options}], one "
        "column per option in the policy's order"
    )
  if observed.dtype != np.bool_ or observed.shape != rewards.shape:
    raise ValueError(
        f"observed must be a bool array of the rewards' shape {rewards.shape} "
        f"(True where a reward was measured), got {observed.dtype} "
        f"{observed.shape}; pass e.g. np.isfinite(rewards) or None for all"
    )
  _check_rows(
      "observed has rows marking no option",
      ~observed.any(axis=1),
      "drop those queries or mark the options whose reward was measured",
  )
  _check_rows(
      "embeddings contain NaN/inf",
      ~np.isfinite(embeddings).all(axis=1),
      "drop or repair those queries",
  )
  _check_rows(
      "rewards contain NaN/inf at observed entries",
      (observed & ~np.isfinite(rewards)).any(axis=1),
      "drop or repair those queries, or mark those entries False in observed",
  )
  rewards = np.where(observed, rewards, 0.0).astype(np.float32)
  mean_reward = float(rewards[observed].mean())
  return _Feedback(_pad_rows(embeddings, rewards, observed), mean_reward, num_queries)


def _check_rows(problem: str, bad_rows: np.ndarray, fix: str) -> None:
  if bad_rows.any():
    rows = np.nonzero(bad_rows)[0]
    raise ValueError(f"{problem} in {rows.size} rows (first: {rows[:5].tolist()}); {fix}")


def _pad_rows(embeddings, rewards, observed) -> tuple:
  """Pads N rows to the next power of two with weight-0 rows (all options observed, reward 0)."""
  num_queries = embeddings.shape[0]
  padding = (1 << (num_queries - 1).bit_length()) - num_queries
  weights = np.concatenate([np.ones(num_queries, np.float32), np.zeros(padding, np.float32)])
  pad = lambda array, value: np.concatenate(
      [array, np.full((padding,) + array.shape[1:], value, array.dtype)]
  )
  return pad(embeddings, 0.0), pad(rewards, 0.0), pad(observed, True), weights


def load_online_updater(path: str | os.PathLike) -> OnlinePolicyUpdater:
  """Loads an updater written by `OnlinePolicyUpdater.save`.

  Args:
    path: the directory given to `save`.

  Returns:
    The updater, policy included, whose next update equals the saved one's next update.

  Raises:
    FileNotFoundError: no directory at `path`.
    PolicyLoadError: not an updater directory (e.g. a bare Policy.save), incomplete or damaged.
  """
  path = os.path.abspath(os.fspath(path))
  if not os.path.isdir(path):
    raise FileNotFoundError(
        f"no saved online updater at {path} (expected a directory from " "OnlinePolicyUpdater.save)"
    )
  _check_updater_dir(path)
  policy = load_policy(os.path.join(path, _POLICY_ITEM))
  try:
    return _restore(path, policy)
  except PolicyLoadError:
    raise
  except Exception as err:  # orbax, TensorStore and json raise many classes for damaged files
    detail = str(err).splitlines()[0][:200] if str(err) else ""
    raise PolicyLoadError(
        f"cannot read the updater state at {path} ({type(err).__name__}: "
        f"{detail}): the directory is damaged or was written only in part; "
        "save the updater again or restore a copy."
    ) from err


def _check_updater_dir(path: str) -> None:
  entries = set(os.listdir(path))
  if not entries:
    raise PolicyLoadError(
        f"{path} is empty: no online updater was saved there; pass the "
        "directory OnlinePolicyUpdater.save wrote."
    )
  if {"metadata", "state"} <= entries:
    raise PolicyLoadError(
        f"{path} holds a bare policy (Policy.save), not an online updater: "
        "load it with load_policy and start updating it with "
        "OnlinePolicyUpdater(policy, config)."
    )
  missing = [item for item in (_POLICY_ITEM, _UPDATER_ITEM) if item not in entries]
  if missing:
    raise PolicyLoadError(
        f"{path} lacks {missing}: it is not a complete "
        "OnlinePolicyUpdater.save directory; save the updater again or "
        "restore a copy."
    )


def _restore(path: str, policy: Policy) -> OnlinePolicyUpdater:
  updater_path = os.path.join(path, _UPDATER_ITEM)
  with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
    metadata = checkpointer.restore(
        updater_path, args=ocp.args.Composite(metadata=ocp.args.JsonRestore())
    )["metadata"]
    if metadata.get("format_version") != _FORMAT_VERSION:
      raise PolicyLoadError(
          f"{updater_path} has updater format "
          f"{metadata.get('format_version')}, this library reads format "
          f"{_FORMAT_VERSION}"
      )
    if metadata["policy_shape"] != _policy_shape(policy):
      raise PolicyLoadError(
          f"{path}: the optimizer state was saved for a policy of shape "
          f"{metadata['policy_shape']} but {_POLICY_ITEM}/ holds one of shape "
          f"{_policy_shape(policy)} (parts of two saves); save the updater "
          "again."
      )
    config = ml_collections.ConfigDict(metadata["config"])
    if "optimizer" not in config:  # saved before the field existed: AdamW was the only one
      config.optimizer = "adamw"
    updater = OnlinePolicyUpdater(policy, config)
    target = jax.tree.map(ocp.utils.to_shape_dtype_struct, {"optimizer": updater.optimizer_state})
    state = checkpointer.restore(
        updater_path, args=ocp.args.Composite(state=ocp.args.StandardRestore(target))
    )["state"]
  updater.optimizer_state = state["optimizer"]
  updater.updates = int(metadata["updates"])
  return updater
