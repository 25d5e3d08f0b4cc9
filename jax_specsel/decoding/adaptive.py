"""`generate_adaptive`: the drafter and gamma chosen again every round, inside one compiled loop.

Beyond the paper's one choice per query (`generate_selected`): one program per (batch, prompt
bucket, option set, settings) runs

  target first pass -> query embedding -> the offline policy's probabilities (the prior)
  -> while_loop over rounds:
       choose an option per row (autoregressive or drafter k) and its gamma from the past only
       (`adaptive_rule`), the chosen drafter drafts gamma <= max_gamma tokens, the target
       verifies [pending, drafts] in one call as wide as the batch's largest gamma,
       accept/reject exactly as `loop` does (sampling.greedy_accept / speculative_accept with
       num_drafted), then every tracked drafter reads the emitted block in one pass that both
       keeps its cache in step and scores it on every emitted position (full information)
  -> one download: tokens, counters, per-round choices, per-drafter scores, hindsight values.

Exactness: a round's option and gamma are functions of the emitted past and of a key stream of
their own, never of the round's draws; given them, the round is a speculative round with that
drafter and gamma (or an autoregressive step), so greedy output equals greedy autoregressive
decoding and sampled output is distributed as the target's.

A drafter that is not tracked falls behind (its cache misses the tokens emitted since); when it is
probed or chosen it re-reads the whole decoder history in one pass (a short prefill), which also
scores it on everything it missed.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Mapping

import jax
import numpy as np

from jax_specsel import validation
from jax_specsel.decoding import (
    adaptive_loop,
    adaptive_rule,
    adaptive_state,
    programs,
    request,
    transfer,
)
from jax_specsel.decoding.generate import GenerateOutput, Stats, loop_spec
from jax_specsel.decoding.request import AUTOREGRESSIVE, unpack_prompts
from jax_specsel.models.interface import Model


@dataclasses.dataclass(frozen=True)
class Costs:
  """Per-option costs in target decode steps, measured once per (target, drafters, machine).

  Attributes:
    step: float [K] one draft step of each drafter.
    read: float [K] one catch-up read of each drafter (2 * (max_gamma + 1) tokens: after rounds
      it sat out; a read of the whole history is charged in proportion to its width).
    verify: float [G + 1] a target call over g + 1 tokens, g = 0..max_gamma (verify[0] = 1).
  """

  step: tuple[float, ...]
  read: tuple[float, ...]
  verify: tuple[float, ...]

  def as_array(self) -> np.ndarray:
    return np.asarray([*self.step, *self.read, *self.verify], np.float32)


def parameter_costs(target: Model, drafters: Mapping[str, Model], max_gamma: int) -> Costs:
  """The memory-bound estimate (GPU decoding at small batch): a step costs its weight bytes, a
  verify call or catch-up read costs one step whatever its width."""
  ratios = tuple(m.num_params / target.num_params for m in drafters.values())
  return Costs(step=ratios, read=ratios, verify=(1.0,) * (max_gamma + 1))


@dataclasses.dataclass
class AdaptiveOutput(GenerateOutput):
  """`GenerateOutput` plus what the per-round rule did, per row (options: `option_names`).

  option_names: ["autoregressive", *drafter names]: the option index of every array below.
  round_options, round_gammas: int32 [B, max_new_tokens] option and gamma of each round (-1 after
    the row's last round).
  drafted_by, accepted_by: int32 [B, K + 1] drafts proposed / accepted per option.
  acceptance: float32 [B, K] each drafter's mean acceptance score over the positions it was
    scored on (nan where never scored): the hindsight estimate.
  hindsight_values: float32 [B, K + 1] tokens per target step each fixed option would have given
    (autoregressive: 1 / verify[0]; a drafter at its best fixed gamma for its hindsight acceptance).
  achieved: float32 [B] tokens per target step the row got (lengths / cost).
  regret: float32 [B] best hindsight value minus achieved (negative: better than any fixed option).
  cost: float32 [B] work spent in target steps (rounds plus scoring passes).
  prior: float32 [B, K + 1] the offline policy's probabilities (uniform without a policy).
  embeddings: float32 [B, D] the query embeddings the policy read.
  """

  option_names: list[str] = dataclasses.field(default_factory=list)
  round_options: np.ndarray | None = None
  round_gammas: np.ndarray | None = None
  drafted_by: np.ndarray | None = None
  accepted_by: np.ndarray | None = None
  acceptance: np.ndarray | None = None
  hindsight_values: np.ndarray | None = None
  achieved: np.ndarray | None = None
  regret: np.ndarray | None = None
  cost: np.ndarray | None = None
  prior: np.ndarray | None = None
  embeddings: np.ndarray | None = None


def generate_adaptive(
    target: Model,
    prompt_ids,
    drafters: Mapping[str, Model],
    policy=None,
    costs: Costs | None = None,
    max_gamma: int = 5,
    rule: adaptive_rule.RuleSettings = adaptive_rule.RuleSettings(),
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    max_new_tokens: int = 64,
    seed: int = 0,
    attention_mask=None,
    assume_shared_vocabulary: bool = False,
) -> AdaptiveOutput:
  """Decodes with the option (autoregressive or a drafter) and gamma chosen again every round.

  Greedy output equals `generate(target, prompt_ids)`'s; sampled output is distributed as the
  target's (the choices depend only on the past: see the module docstring).

  Args:
    target: the target model.
    prompt_ids: int [B, S] right-padded (with `attention_mask`), or a list of B id lists.
    drafters: name -> drafter Model (at least one), each able to draft for the target.
    policy: optional trained `bandit.Policy` over the target's embeddings whose option names are
      among "autoregressive" and the drafter names: its probabilities for the query are the prior
      of the per-round rule (options it does not name start at probability 0). None: uniform.
    costs: per-option costs in target steps (`eval.speed.measure_adaptive_costs` here); None uses
      `parameter_costs`, the memory-bound (GPU, small batch) estimate.
    max_gamma: the largest speculation length a round may pick (static shapes).
    rule: the per-round rule's settings (`adaptive_rule.RuleSettings`).
    temperature, top_k, top_p, max_new_tokens, seed, attention_mask, assume_shared_vocabulary:
      as for `generate`.

  Returns:
    AdaptiveOutput.
  """
  started = time.perf_counter()
  _check_max_gamma(max_gamma)
  request.check_request(target, max_gamma, temperature, top_k, top_p, max_new_tokens)
  names, models = _drafter_models(target, drafters, max_gamma, assume_shared_vocabulary)
  costs = parameter_costs(target, dict(zip(names, models)), max_gamma) if costs is None else costs
  _check_costs(costs, len(models), max_gamma)
  options = [AUTOREGRESSIVE, *names]
  prior_index = _prior_index(target, policy, options)
  settings = (temperature, top_k, top_p, max_new_tokens)
  build = functools.partial(
      _program, target, models, options, policy, prior_index, costs, rule, max_gamma, settings
  )
  prompts = programs.Prompts(prompt_ids, attention_mask, seed)
  unpack = functools.partial(_output, options)
  return programs.run(target, prompts, models, max_new_tokens, build, unpack, started)


def _program(
    target: Model, models, options, policy, prior_index, costs: Costs, rule, max_gamma, settings
) -> programs.Program:
  """The program `generate_adaptive` runs for these checked models, policy and costs (`settings`:
  temperature, top_k, top_p, max_new_tokens)."""
  base = loop_spec(target, None, 0, *settings)
  spec = adaptive_state.AdaptiveSpec(
      base=dataclasses.replace(base, gamma=int(max_gamma)),
      drafters=tuple(m.decoder for m in models),
      rule=rule,
      policy=None if policy is None else (policy.program, prior_index),
  )
  policy_leaves, policy_tree = ([], None) if policy is None else policy.program_inputs()
  drafter_parts = [m.flat_params() for m in models]
  target_leaves, target_tree = target.flat_params()
  weights = (
      target_leaves,
      [leaves for leaves, _ in drafter_parts],
      policy_leaves,
      costs.as_array(),
  )
  trees = (target_tree, tuple(tree for _, tree in drafter_parts), policy_tree)
  return programs.Program(
      _PROGRAM,
      spec,
      trees,
      weights,
      spec.base.cache_length,
      f"adaptive over {options}, gamma <= {max_gamma}",
  )


def _check_max_gamma(max_gamma) -> None:
  """max_gamma must be a whole number >= 1 (the checks shared with `generate` call it gamma)."""
  try:
    value = validation.integer("max_gamma", max_gamma)
  except (TypeError, ValueError) as err:
    raise type(err)(f"{err} Pass max_gamma as a whole number >= 1.") from None
  if value < 1:
    raise ValueError(
        f"max_gamma={value}: must be >= 1 (the most tokens a round may draft; each "
        "round may still choose plain autoregressive decoding). For plain decoding "
        "only, use generate without a drafter."
    )


def _drafter_models(
    target: Model, drafters: Mapping[str, Model], max_gamma: int, assume_shared_vocabulary: bool
):
  """(names, models) of the drafters, each checked and placed next to the target."""
  if not isinstance(drafters, Mapping) or not drafters:
    raise ValueError(
        f"drafters={drafters!r}: pass a non-empty dict name -> drafter Model "
        "(for plain decoding use generate without a drafter)."
    )
  names, models = [], []
  for name, model in drafters.items():
    if name == AUTOREGRESSIVE:
      raise ValueError(f"drafters[{name!r}]: that name means plain decoding; rename the drafter.")
    model = request.checked_drafter(target, model, max_gamma, assume_shared_vocabulary, name=name)
    names.append(str(name))
    models.append(model)
  return names, models


def _check_costs(costs: Costs, num_drafters: int, max_gamma: int) -> None:
  if not isinstance(costs, Costs):
    raise TypeError(
        f"costs is a {type(costs).__name__}: pass adaptive.Costs "
        "(eval.speed.measure_adaptive_costs)."
    )
  shapes = (len(costs.step), len(costs.read), len(costs.verify))
  if shapes != (num_drafters, num_drafters, max_gamma + 1):
    raise ValueError(
        f"costs have (step, read, verify) lengths {shapes} but {num_drafters} "
        f"drafters and max_gamma={max_gamma} need "
        f"{(num_drafters, num_drafters, max_gamma + 1)}: "
        "measure them for these drafters and max_gamma "
        "(eval.speed.measure_adaptive_costs)."
    )
  values = costs.as_array()
  if not np.all(np.isfinite(values)) or np.any(values <= 0):
    raise ValueError(f"costs must be finite and positive, got {costs}.")


def _prior_index(target: Model, policy, options: list[str]) -> tuple[int, ...] | None:
  """For each option, the index of its probability in the policy's output (-1: not named)."""
  if policy is None:
    return None
  names = request.policy_option_names(target, policy, "generate_adaptive")
  unknown = [n for n in names if n not in options]
  if unknown:
    raise ValueError(
        f"the policy chooses among {names} but {unknown} are not among the options "
        f"{options}: pass those drafters."
    )
  return tuple(names.index(o) if o in names else -1 for o in options)


def _run_flat(spec, trees, target_leaves, drafter_leaves, policy_leaves, costs, packed_prompts):
  target_tree, drafter_trees, policy_tree = trees
  target_params = jax.tree.unflatten(target_tree, target_leaves)
  drafter_params = tuple(
      jax.tree.unflatten(tree, leaves) for tree, leaves in zip(drafter_trees, drafter_leaves)
  )
  policy_params = None if policy_tree is None else jax.tree.unflatten(policy_tree, policy_leaves)
  ids, mask, key, _ = unpack_prompts(packed_prompts)
  return adaptive_loop.run(
      spec, target_params, drafter_params, policy_params, costs, ids, mask, key
  )


_PROGRAM = transfer.Packed(_run_flat)  # its `AdaptiveSummary` packed into one array


def _output(
    names: list[str], spec, packed: np.ndarray, seconds: float, compile_seconds: float
) -> AdaptiveOutput:
  """The fetched `AdaptiveSummary` as the call's output."""
  summary = _PROGRAM.unpack(spec, packed)
  base = summary.base
  achieved = base.lengths / np.maximum(summary.cost, 1e-9)
  stats = Stats(
      drafted=summary.drafted_by.sum(axis=1),
      accepted=summary.accepted_by.sum(axis=1),
      rounds=base.rounds,
      per_position=base.accepted_at.sum(axis=0),
      target_calls=int(base.target_calls[0]),
      seconds=seconds,
      compile_seconds=compile_seconds,
      new_tokens=int(base.lengths.sum()),
  )
  return AdaptiveOutput(
      tokens=base.tokens,
      lengths=base.lengths,
      stats=stats,
      option_names=names,
      round_options=summary.round_options,
      round_gammas=summary.round_gammas,
      drafted_by=summary.drafted_by,
      accepted_by=summary.accepted_by,
      acceptance=summary.acceptance,
      hindsight_values=summary.hindsight_values,
      achieved=achieved.astype(np.float32),
      regret=(np.nanmax(summary.hindsight_values, axis=1) - achieved).astype(np.float32),
      cost=summary.cost,
      prior=summary.prior,
      embeddings=summary.embeddings,
  )
