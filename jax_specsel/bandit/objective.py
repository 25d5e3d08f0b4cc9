"""The policy's training objective, shared by the offline trainer and the online updater.

Two gradient estimators of J = E_q E_{a~pi(.|q)} r(q, a) (see `reinforce` for their comparison):
  "reinforce"  sample a ~ pi(.|q) and minimize -log pi(a|q) * (r(q, a) - b), as the paper;
               b = 0 ("none") or the leave-one-out mean of the batch's sampled rewards ("mean").
  "expected"   minimize -sum_a pi(a|q) r(q, a): the exact gradient of J on the batch, possible
               when every option's reward is known (no sampling variance).
and one surrogate for feedback that scores several options (online, full information):
  "hindsight"  minimize the cross-entropy from softmax(r(q, .) / HINDSIGHT_TEMPERATURE) to pi:
               learn to pick what turned out best. Its gradient p - target does not vanish where
               the policy is confidently wrong (J's does, p (r - E r) with p near 0), and does
               where the policy already agrees. Rewards in [0, 1] (each row's best = 1).

With an `observed` mask [B, K] (online feedback that scored only some options), both estimate the
gradient of the same restricted objective: the expected reward of pi renormalized over the
observed options of each row. An unobserved option gets probability 0 in that row, so its reward
value never enters the loss and its logit gets no gradient from that row.

Also here: the AdamW optimizer both trainers build from a config, and the checks of the config
fields they share (estimator, baseline, optimizer settings).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_collections
import optax

from jax_specsel import validation
from jax_specsel.bandit.policy_network import standardized_logits

ESTIMATORS = ("reinforce", "expected", "hindsight")
HINDSIGHT_TEMPERATURE = 0.1  # rewards 0.1 apart: target odds e : 1
BASELINES = ("none", "mean")
OPTIMIZERS = ("adamw", "sgd")

# The logit an unobserved option gets: exp(x - logsumexp) is exactly 0 in float32, and unlike
# -inf it keeps every intermediate of the forward and backward pass finite.
_UNOBSERVED_LOGIT = -1e30


def per_example_loss(
    log_probs, rewards, weights, key, estimator: str, baseline: str, observed=None
):
  """Surrogate losses [B] (see the module docstring), and the policy's rewards [B].

  Args:
    log_probs: [B, K] log pi(.|q) of each row.
    rewards: [B, K] reward of each option.
    weights: [B] 1 for a real row, 0 for padding.
    key: PRNG key of the sampled actions ("reinforce" only).
    estimator: one of ESTIMATORS.
    baseline: "none" or "mean" ("reinforce" only).
    observed: optional bool [B, K]: the options the "hindsight" target spreads over.
  """
  expected_rewards = jnp.sum(jnp.exp(log_probs) * rewards, axis=-1)  # [B]
  if estimator == "expected":
    return -expected_rewards, expected_rewards
  if estimator == "hindsight":
    scaled = rewards / HINDSIGHT_TEMPERATURE
    target = jax.nn.softmax(scaled if observed is None else jnp.where(observed, scaled, -jnp.inf))
    return -jnp.sum(target * log_probs, axis=-1), expected_rewards
  actions = jax.random.categorical(key, jax.lax.stop_gradient(log_probs), axis=-1)  # [B]
  sampled_rewards = jnp.take_along_axis(rewards, actions[:, None], axis=-1)[:, 0]  # [B]
  advantage = sampled_rewards
  if baseline == "mean":
    # Leave-one-out mean: excluding the row's own reward keeps the estimator unbiased.
    total = jnp.sum(weights * sampled_rewards)
    others = jnp.sum(weights) - weights
    loo_mean = jnp.where(
        others > 0, (total - weights * sampled_rewards) / jnp.maximum(others, 1), 0.0
    )
    advantage = sampled_rewards - loo_mean
  chosen_log_probs = jnp.take_along_axis(log_probs, actions[:, None], axis=-1)[:, 0]
  return -chosen_log_probs * jax.lax.stop_gradient(advantage), sampled_rewards


def batch_loss(
    graphdef,
    estimator: str,
    baseline: str,
    params,
    embeddings,
    rewards,
    input_mean,
    input_scale,
    weights,
    key,
    observed=None,
):
  """(weighted mean surrogate loss, weighted mean policy reward) of one batch.

  Args:
    graphdef, params: the policy network, split (`nnx.split(network, nnx.Param)`).
    estimator, baseline: as in `per_example_loss`.
    embeddings: [B, D] raw query embeddings (standardized here with input_mean/input_scale [D]).
    rewards: [B, K] rewards; entries outside `observed` must be finite (they are multiplied by 0).
    weights: [B] 1 for a real row, 0 for padding.
    key: PRNG key of the sampled actions.
    observed: optional bool [B, K]; each row needs at least one True. None: all observed.
  """
  logits = standardized_logits(graphdef, params, input_mean, input_scale, embeddings)  # [B, K]
  if observed is not None:
    logits = jnp.where(observed, logits, _UNOBSERVED_LOGIT)
    rewards = jnp.where(observed, rewards, 0.0)
  log_probs = jax.nn.log_softmax(logits)  # [B, K]
  losses, policy_rewards = per_example_loss(
      log_probs, rewards, weights, key, estimator, baseline, observed
  )
  count = jnp.sum(weights)
  return jnp.sum(weights * losses) / count, jnp.sum(weights * policy_rewards) / count


def optimizer_step(
    loss_fn, optimizer: optax.GradientTransformation, params, optimizer_state, *loss_args
):
  """One optimizer step on `loss_fn(params, *loss_args) -> (loss, aux)`.

  Returns:
    (new params, new optimizer state, loss, aux), loss and aux taken before the step.
  """
  (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, *loss_args)
  updates, optimizer_state = optimizer.update(grads, optimizer_state, params)
  return optax.apply_updates(params, updates), optimizer_state, loss, aux


def make_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """config.optimizer (default "adamw") from config.{learning_rate, b1, b2, eps, weight_decay}.

  "adamw": optax.adamw, the trainers' choice. "sgd": plain gradient steps (b1, b2 and eps unused;
  weight decay added to the gradient): a step in proportion to the gradient, so feedback the
  policy already agrees with (a saturated softmax, a gradient near zero) moves nothing, where
  Adam would scale that near-zero gradient up to a full learning-rate step in every weight.
  """
  return _cached_optimizer(
      str(config.get("optimizer", "adamw")),
      float(config.learning_rate),
      float(config.b1),
      float(config.b2),
      float(config.eps),
      float(config.weight_decay),
  )


@functools.lru_cache(maxsize=None)
def _cached_optimizer(name, learning_rate, b1, b2, eps, weight_decay):
  # Cached so that equal settings give the same object, and so the same compiled train step.
  if name == "sgd":
    return optax.chain(optax.add_decayed_weights(weight_decay), optax.sgd(learning_rate))
  return optax.adamw(learning_rate, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay)


def validate_estimator(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError unless config.estimator and config.baseline are a valid pair."""
  if config.estimator not in ESTIMATORS:
    raise ValueError(f"config.estimator={config.estimator!r}; choose one of {ESTIMATORS}")
  if config.baseline not in BASELINES:
    raise ValueError(f"config.baseline={config.baseline!r}; choose one of {BASELINES}")
  if config.estimator != "reinforce" and config.baseline != "none":
    raise ValueError(
        f"config.baseline='mean' only applies to estimator='reinforce' (the "
        f"{config.estimator!r} estimator samples nothing, so has no variance to reduce); set "
        "config.baseline='none'"
    )


def validate_optimizer(config: ml_collections.ConfigDict) -> None:
  """Raises TypeError or ValueError naming the first bad optimizer field of `config`."""
  if config.get("optimizer", "adamw") not in OPTIMIZERS:
    raise ValueError(f"config.optimizer={config.optimizer!r}; choose one of {OPTIMIZERS}")
  # optax takes NaN or a negative rate silently and trains a policy of NaN weights.
  if validation.real("config.learning_rate", config.learning_rate) <= 0:
    raise ValueError(f"config.learning_rate={config.learning_rate}: must be > 0.")
  validation.real("config.weight_decay", config.weight_decay, 0.0)
  for field in ("b1", "b2"):
    if not 0 <= validation.real(f"config.{field}", config[field]) < 1:
      raise ValueError(f"config.{field}={config[field]}: must be in [0, 1).")
  if validation.real("config.eps", config.eps) <= 0:
    raise ValueError(f"config.eps={config.eps}: must be > 0.")
