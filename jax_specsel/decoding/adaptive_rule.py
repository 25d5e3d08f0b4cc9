"""The per-round choice of `generate_adaptive`: which option drafts and how many tokens.

Pure functions on per-row estimates, run inside the compiled loop. Units: everything is measured
in target decode steps (a plain autoregressive round costs 1 and emits 1 token), so the value of
an option is the expected number of tokens it emits per target step of work.

- Acceptance of drafter k: a discounted mean of per-position acceptance scores (`RuleSettings.
  decay` per scored position), started from `prior_acceptance` with weight `prior_count`. A
  score is the probability that drafter k's draft of that position would have been accepted:
  greedy, 1 when its argmax equals the emitted token; sampling, min(1, q_k(e) / p(e)) for the
  emitted token e ~ p, an unbiased estimate of the acceptance probability sum_x min(p, q_k)
  (Leviathan et al. 2023, Definition 3.1).
- Value of drafter k at speculation length g (Leviathan et al. eq. 1, costs measured):
  E[tokens] / cost = (1 - a^(g+1)) / (1 - a) / (g * c_k + v(g)), with c_k its draft step and v(g)
  the target's verify call over g+1 tokens; its best g in 1..max_gamma sets its value.
- The choice: Hedge (exponential weights, Freund & Schapire 1997) over the options, started from
  the offline policy's probabilities for the query (log-weights = prior_strength * log prior) and
  given every option's current value as its reward on each round that brought new scores (full
  information, lazily: a drafter that sat out is scored on every token it missed when it reads
  them at a probe or when it is chosen again). A drafter not yet scored on the query has no value
  there (its reward is 0): only the prior or a probe brings it in, never optimism about the unseen,
  which would spend a drafted round on every option the prior rules out. Past log-weights are discounted by `forget` (a
  tracking variant that follows a best option that changes; `forget=0` is plain Hedge, whose
  regret against the best fixed option is O(sqrt(T log K)) for the rewards it is given).
  `randomized` samples the option from the weights, otherwise their argmax is taken. The draw
  uses uniforms of its own key stream, so a round's choice depends only on the past: every
  accept/reject stays exact.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class RuleSettings:
  """Static settings of the per-round rule (part of the compiled program's key).

  Attributes:
    learning_rate: Hedge's eta: log-weight added per round per unit of value. With `forget` the
      log-weights settle near eta * value / forget, so eta / forget sets how sharply the draw
      prefers the best current value.
    forget: share of the log-weights forgotten at each Hedge step (0: plain Hedge): discounted
      Hedge follows an answer whose best option changes (and recovers from early evidence that
      misled it, or from a prior that was wrong) within about 1 / forget learning rounds.
    prior_strength: multiplies log prior in the initial log-weights (0: ignore the prior).
    prior_floor: prior probabilities below this count as this: a prior that rules an option out
      still lets a few rounds of evidence bring it back (the policy may be wrong on a new domain).
    prior_acceptance, prior_count: the acceptance estimate before any score, and its weight in
      scored positions.
    decay: per-position discount of past scores (1: a plain mean), so an answer that changes
      domain midway is followed within about 1 / (1 - decay) tokens.
    track_threshold: at each probe, every drafter whose Hedge weight is at least this reads what
      it missed and is scored on it; the others wait for their turn (one per probe, round
      robin) or for being chosen.
    probe_every: rounds from a probe to the next while probes change the choice (0: one probe
      at most; a drafter is then scored only on the positions it drafts and on what it missed
      when it is chosen again).
    probe_backoff: after a probe that left the choice as it was, the gap to the next probe is
      multiplied by this (up to the round budget): probes grow rare while they find nothing
      better (1: every probe_every rounds).
    probe_on_miss: a probe is also due at once on a round whose chosen drafter had its first draft
      rejected (what a switch of domain looks like), whatever the schedule says: the drafters
      that sat out are read while the evidence of a change is fresh, and an autoregressive
      choice, which gives no such evidence, keeps the backed-off schedule.
    first_probe: the round (counted from 1) of the first probe (0: none before probe_every).
      A probe reads every drafter not yet scored on the query, those the Hedge weights track, and
      one more in turn (the first in turn drawn per query).
    probe_below: a scheduled probe runs only on rows whose chosen option is worth less than this
      share of the most any option can give (`ideal_value`): reads pay only while a clearly
      better option may exist (0: never probe; 1: whatever was chosen).
    randomized: sample the option from the Hedge weights (else take their argmax).
  """

  # The defaults start where the per-query policy would (its argmax, drafted at full gamma), read
  # the other drafters only while the chosen option does clearly worse than a good drafter would
  # (after round 1, then at rounds 2, 4, 8, ... while nothing better turns up, and at once when
  # the chosen drafter's first draft is rejected), and follow a domain switch within a round or
  # two: the argmax keeps a hundredth of the past log-weights, so the acceptance estimates
  # (`decay`, about three positions) do the smoothing and the Hedge step adds almost no inertia
  # (a tenth kept a drafter that had just missed twice ahead of one that had just hit).
  learning_rate: float = 8.0
  forget: float = 0.99
  prior_strength: float = 1.0
  prior_floor: float = 0.01
  prior_acceptance: float = 0.5
  prior_count: float = 1.0
  decay: float = 0.65
  track_threshold: float = 0.01
  probe_every: int = 1
  first_probe: int = 1
  probe_backoff: int = 2
  probe_on_miss: bool = True
  probe_below: float = 0.7
  randomized: bool = False

  def __post_init__(self):
    checks = {
        "learning_rate": self.learning_rate >= 0,
        "forget": 0 <= self.forget < 1,
        "prior_strength": self.prior_strength >= 0,
        "prior_floor": 0 < self.prior_floor <= 1,
        "prior_acceptance": 0 < self.prior_acceptance < 1,
        "prior_count": self.prior_count > 0,
        "decay": 0 < self.decay <= 1,
        "track_threshold": 0 <= self.track_threshold <= 1,
        "probe_every": self.probe_every >= 0,
        "first_probe": self.first_probe >= 0,
        "probe_backoff": self.probe_backoff >= 1,
        "probe_below": 0 <= self.probe_below <= 1,
    }
    for name, ok in checks.items():
      value = getattr(self, name)
      if not ok or not np.isfinite(float(value)):
        raise ValueError(f"RuleSettings.{name}={value!r} is out of range: see its docstring.")
    for name in ("probe_on_miss", "randomized"):
      if not isinstance(getattr(self, name), bool):
        raise ValueError(f"RuleSettings.{name}={getattr(self, name)!r}: pass True or False.")


def acceptance(score_sum: jax.Array, score_count: jax.Array, rule: RuleSettings) -> jax.Array:
  """Current acceptance estimates [..., K] from discounted score sums and counts."""
  return (score_sum + rule.prior_acceptance * rule.prior_count) / (score_count + rule.prior_count)


def add_scores(score_sum, score_count, scores, scored, rule: RuleSettings):
  """Discounted update with the positions of one pass.

  Args:
    score_sum, score_count: float [B] running discounted sums.
    scores: float [B, W] per-position acceptance scores; scored: bool [B, W] which count.

  Returns:
    (score_sum, score_count) after discounting by decay per newly scored position.
  """
  count = jnp.sum(scored, axis=1).astype(jnp.float32)
  discount = rule.decay**count
  # Later positions weigh more: position j of the pass is discounted by decay^(positions after it).
  after = jnp.cumsum(scored[:, ::-1], axis=1)[:, ::-1] - scored
  weights = jnp.where(scored, rule.decay ** after.astype(jnp.float32), 0.0)
  return (
      score_sum * discount + jnp.sum(weights * scores, axis=1),
      score_count * discount + jnp.sum(weights, axis=1),
  )


def drafter_values(alpha: jax.Array, step_costs: jax.Array, verify_costs: jax.Array):
  """(best value [B, K], best gamma int32 [B, K]) of each drafter at acceptance `alpha` [B, K].

  step_costs: float [K] a draft step in target steps; verify_costs: float [G + 1] v(0..G).
  """
  max_gamma = verify_costs.shape[0] - 1
  gammas = jnp.arange(1, max_gamma + 1, dtype=jnp.float32)  # [G]
  a = jnp.clip(alpha, 0.0, 0.999)[..., None]
  tokens = (1.0 - a ** (gammas + 1.0)) / (1.0 - a)  # [B, K, G]
  cost = gammas * step_costs[:, None] + verify_costs[1:]  # [K, G]
  values = tokens / cost
  return jnp.max(values, axis=-1), (jnp.argmax(values, axis=-1) + 1).astype(jnp.int32)


def option_values(alpha, step_costs, verify_costs):
  """(values [B, K+1], gammas int32 [B, K+1]) of every option: autoregressive first (1 / v(0))."""
  values, gammas = drafter_values(alpha, step_costs, verify_costs)
  batch = alpha.shape[0]
  autoregressive = jnp.full((batch, 1), 1.0 / verify_costs[0])
  return (
      jnp.concatenate([autoregressive, values], axis=1),
      jnp.concatenate([jnp.zeros((batch, 1), jnp.int32), gammas], axis=1),
  )


def ideal_value(step_costs: jax.Array, verify_costs: jax.Array) -> jax.Array:
  """The most any option can give (a scalar): a drafter always accepted, at its best gamma."""
  return jnp.max(drafter_values(jnp.ones((1, step_costs.shape[0])), step_costs, verify_costs)[0])


def next_probe_gap(gap: jax.Array, changed: jax.Array, rule: RuleSettings, max_rounds: int):
  """Rounds from a probe to the next, int32 [B]: `probe_every` after a probe that changed the
  choice, else the last gap times `probe_backoff`, at most `max_rounds`; without `probe_every`
  past any round (one probe at most)."""
  if not rule.probe_every:
    return jnp.full_like(gap, max_rounds + 1)
  grown = jnp.minimum(rule.probe_backoff * gap, max_rounds)
  return jnp.where(changed, rule.probe_every, grown).astype(gap.dtype)


def initial_log_weights(prior: jax.Array, rule: RuleSettings) -> jax.Array:
  """Log-weights [B, K+1] from prior probabilities [B, K+1] (a zero prior stays possible)."""
  return rule.prior_strength * jnp.log(jnp.maximum(prior, rule.prior_floor))


def hedge_step(log_weights: jax.Array, values: jax.Array, active: jax.Array, rule: RuleSettings):
  """Adds eta * value to each option's (discounted) log-weight on active rows, kept centred."""
  updated = (1.0 - rule.forget) * log_weights + rule.learning_rate * values
  updated = updated - jnp.max(updated, axis=1, keepdims=True)
  return jnp.where(active[:, None], updated, log_weights)


def choose_argmax(log_weights: jax.Array) -> jax.Array:
  """int32 [B]: the option with the largest log-weight."""
  return jnp.argmax(log_weights, axis=-1).astype(jnp.int32)


def choose(log_weights: jax.Array, uniform: jax.Array, rule: RuleSettings) -> jax.Array:
  """The option of each row, int32 [B]: a Hedge draw by inverse CDF of `uniform` [B] (drawn
  ahead, independent of everything decoded), or the argmax."""
  if rule.randomized:
    cumulative = jnp.cumsum(jax.nn.softmax(log_weights, axis=-1), axis=-1)
    below = jnp.sum(cumulative < uniform[:, None], axis=-1)
    return jnp.minimum(below, log_weights.shape[-1] - 1).astype(jnp.int32)
  return choose_argmax(log_weights)
