"""`generate_selected`: one compiled program per query that prefills, embeds, chooses and decodes.

The paper's serving path (DESIGN.md, "The serving path"), with nothing recomputed and nothing
crossing to the host in between:

  packed prompt --(one upload)--> [ target first pass (T5 encoder / LLaMA prefill)
                                    -> the query embedding from that same pass (`Model.embed`)
                                    -> policy: standardize + MLP -> argmax, or a sample
                                    -> decode with the chosen option: the speculative while_loop
                                       with its drafter, or plain autoregressive (gamma 0) ]
                 --(one download: tokens, counters, choice, embedding)--> host

So the paper's A.7 convention ("the embedding reuses the target's first pass") holds literally:
the pass that embeds the query is the one decoding continues from.

Batch 1 (the paper's setting) takes `lax.switch` on the choice: exactly one loop runs. Drafters of
one architecture share that loop, their weights picked at run time (the program holds one loop per
architecture, plus autoregressive).
In a batch whose rows choose differently, each chosen option runs its loop over the whole batch
with the rows of the other options marked done (they cost compute in the batched matrix products
but are never changed), one loop after the other: a batch whose rows pick k distinct options costs
about the sum of k loops, each as long as its longest row. Options no row chose are skipped.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jax_specsel.decoding import loop, transfer
from jax_specsel.decoding.generate import (GenerateOutput, Stats, _check_models, _check_settings,
                                           _warn_past_position_limit, check_caches_fit,
                                           check_compatible,
                                           compiled_program, drafter_for, loop_spec, pad_prompts, place_prompts,
                                           unpack_prompts)
from jax_specsel.models.interface import Model

AUTOREGRESSIVE = "autoregressive"
_POLICY_STREAM = 0x5E1EC7  # folded into the seed's key for the dynamic policy's draw


_SPECS: dict = {}  # SelectionSpec -> itself (see `SelectionSpec.interned`)


@dataclasses.dataclass(frozen=True)
class SelectionSpec:
  """Everything static about a selected generation (a jit compile-time constant).

  The greedy and the dynamic policy share the program: which one runs is a run-time flag.

  Attributes:
    options: one LoopSpec per policy option, in the policy's order (gamma 0: autoregressive).
    policy: the policy's static program (`bandit.policy.PolicyProgram`): `.logits(inputs, emb)`.
  """

  options: tuple[loop.LoopSpec, ...]
  policy: Any

  @property
  def gamma_width(self) -> int:
    return max(option.gamma for option in self.options)

  @functools.cached_property
  def branches(self) -> tuple[loop.LoopSpec, ...]:
    """The distinct loops: options whose drafters share an architecture share one loop (their
    weights are chosen at run time), so the program holds one loop per architecture, not per
    drafter (measured on the demo zoo: a program with four loops ran ~15% slower than one with
    one, at equal work)."""
    return tuple(dict.fromkeys(self.options))

  @functools.cached_property
  def branch_of(self) -> tuple[int, ...]:
    """Option index -> index of its loop in `branches`."""
    return tuple(self.branches.index(option) for option in self.options)

  @functools.cached_property
  def branch_sizes(self) -> tuple[int, ...]:
    """Options (drafters) per loop: a loop of one takes its drafter's weights as they are."""
    return tuple(self.branch_of.count(branch) for branch in range(len(self.branches)))

  def interned(self) -> "SelectionSpec":
    """The equal spec built by an earlier call, so `branches` and `branch_of` are computed once
    per option set, not per call: grouping the options compares drafter graph definitions
    (`Decoder` equality walks the module graph), ~0.2 ms a call for three drafters on CPU. The
    lookup itself is cheap: an equal earlier spec holds the very same `Decoder` objects."""
    found = _SPECS.get(self)
    if found is None:
      if len(_SPECS) >= 64:  # a few option sets at a time; keep memory bounded
        _SPECS.pop(next(iter(_SPECS)))
      found = _SPECS[self] = self
    return found

  def cache_length(self, prompt_length: int) -> int:
    """The target cache is prepared once for every option: as long as the longest needs."""
    return max(option.cache_length(prompt_length) for option in self.options)


@dataclasses.dataclass
class SelectedOutput(GenerateOutput):
  """`GenerateOutput` plus what the policy saw and chose, per row.

  choices: option name per row ("autoregressive" or a drafter name).
  choice_ids: int32 [B] index of that option in `policy.option_names`.
  embeddings: float32 [B, D] the query embeddings the policy read (`Model.embed`'s values).
  """

  choices: list[str] = dataclasses.field(default_factory=list)
  choice_ids: np.ndarray | None = None
  embeddings: np.ndarray | None = None


def generate_selected(target: Model, prompt_ids, drafters: Mapping[str, Model], policy,
                      greedy_policy: bool = True, gamma: int = 7, temperature: float = 0.0,
                      top_k: int = 0, top_p: float = 1.0, max_new_tokens: int = 64, seed: int = 0,
                      attention_mask=None, assume_shared_vocabulary: bool = False) -> SelectedOutput:
  """Chooses the drafter per query with `policy` and decodes with it, in one compiled call.

  Emits exactly what `generate(target, prompt_ids, drafter=<the chosen drafter or None>, ...)`
  emits with the same settings and seed (the decode key is the same; the dynamic policy draws
  from a stream folded out of it).

  Args:
    target: the target model.
    prompt_ids: int [B, S] right-padded (with `attention_mask`), or a list of B id lists.
    drafters: name -> drafter `Model`; every policy option must be one of these names or
      "autoregressive". Drafters the policy never names are ignored.
    policy: a trained `jax_specsel.bandit.Policy` over the target's embeddings.
    greedy_policy: True takes the policy's argmax, False samples from it (the dynamic policy).
    gamma, temperature, top_k, top_p, max_new_tokens, seed, attention_mask,
      assume_shared_vocabulary: as for `generate` (gamma is shared by every drafter option).

  Returns:
    SelectedOutput: tokens, lengths, stats as `generate`, plus choices, choice_ids, embeddings.
  """
  started = time.perf_counter()
  _check_settings(gamma, temperature, top_k, top_p, max_new_tokens)
  _check_models(target, None, gamma)
  option_models = _option_models(target, drafters, policy, gamma, assume_shared_vocabulary)
  ids, mask = pad_prompts(prompt_ids, attention_mask, target)
  for drafter in option_models:
    _warn_past_position_limit(target, drafter, mask, max_new_tokens)
  spec = SelectionSpec(
      options=tuple(loop_spec(target, drafter, gamma, temperature, top_k, top_p, max_new_tokens)
                    for drafter in option_models),
      policy=policy.program).interned()
  packed_prompts = place_prompts(target, ids, mask, seed, flags=(int(bool(greedy_policy)),))
  args, trees = _arguments(spec, target, option_models, policy, packed_prompts)
  fits = lambda: check_caches_fit(target, option_models, ids.shape[0],
                                  spec.cache_length(ids.shape[1]), max_new_tokens, together=False)
  compiled, compile_seconds = compiled_program(_PROGRAM, (spec, trees), args,
                                               _program_name(spec, policy), before_compile=fits)
  summary = _PROGRAM.unpack((spec, trees, *args), compiled(*args))
  seconds = time.perf_counter() - started - compile_seconds
  return _output(spec, policy, summary, seconds, compile_seconds)


def policy_option_names(target: Model, policy, caller: str) -> list[str]:
  """The policy's option names, after checking it is a policy, has some and reads this target's
  embeddings."""
  _check_is_policy(policy, caller)
  names = getattr(policy, "option_names", None)
  if not names:
    raise ValueError("the policy has no option names: train it with option_names (drafter names "
                     f"and/or '{AUTOREGRESSIVE}') so {caller} knows what each option means.")
  if policy.input_dim != target.hidden_size:
    raise ValueError(f"the policy reads embeddings of width {policy.input_dim} but target "
                     f"{target.name} embeds queries with width {target.hidden_size}: train the "
                     "policy on this target's embeddings.")
  return list(names)


def _check_is_policy(policy, caller: str) -> None:
  """Refuses what is not a trained policy (None, a path, anything without the policy's program)."""
  if all(hasattr(policy, attribute) for attribute in ("option_names", "program", "input_dim")):
    return
  if isinstance(policy, (str, os.PathLike)):
    raise TypeError(f"{caller}: policy={os.fspath(policy)!r} is a path, not a Policy: load it first, "
                    f"policy = jax_specsel.bandit.load_policy({os.fspath(policy)!r}).")
  raise TypeError(f"{caller}: policy is {'None' if policy is None else type(policy).__name__}: pass a "
                  "trained jax_specsel.bandit.Policy, e.g. jax_specsel.bandit.load_policy(path) "
                  "(one saved by train_policy), or train one with jax_specsel.bandit.train_policy.")


def _option_models(target: Model, drafters: Mapping[str, Model], policy, gamma: int,
                   assume_shared_vocabulary: bool) -> list[Model | None]:
  """The drafter (None: autoregressive) of each policy option, checked before any work."""
  names = policy_option_names(target, policy, "generate_selected")
  unknown = [n for n in names if n != AUTOREGRESSIVE and n not in drafters]
  if unknown:
    raise ValueError(f"the policy chooses among {names} but {unknown} "
                     f"{'is' if len(unknown) == 1 else 'are'} neither a given drafter "
                     f"({sorted(drafters)}) nor '{AUTOREGRESSIVE}': pass drafters= with those names.")
  models = []
  for name in names:
    model = None if name == AUTOREGRESSIVE else drafters[name]
    if model is not None:
      if not isinstance(model, Model):
        raise TypeError(f"drafters[{name!r}] is a {type(model).__name__}, not a jax_specsel Model.")
      _check_models(target, model, gamma)
      model = drafter_for(target, model)  # a single-device drafter joins a sharded target's mesh
      check_compatible(target, model, assume_shared_vocabulary)
    models.append(model)
  return models


def _arguments(spec: SelectionSpec, target, option_models, policy, packed_prompts):
  """(array arguments, static treedefs) of the selected program.

  The weights of the drafters that share a loop travel stacked, leaf by leaf ([members, ...]),
  and the loop indexes the chosen member: no branch per drafter. Picking a member at run time
  copies its weights once per call (XLA cannot alias part of an argument), so a loop with a
  single drafter takes that drafter's own leaves, unstacked: no copy.
  """
  target_leaves, target_tree = target.flat_params()
  stacked, trees = [], []
  for branch in range(len(spec.branches)):
    members = [option_models[i] for i, b in enumerate(spec.branch_of) if b == branch]
    if members[0] is None:
      stacked.append([])
      trees.append(None)
      continue
    parts = [member.flat_params() for member in members]
    stacked.append(parts[0][0] if len(parts) == 1 else
                   _stacked_leaves([leaves for leaves, _ in parts]))
    trees.append(parts[0][1])
  policy_leaves, policy_tree = policy.program_inputs()
  return ((target_leaves, stacked, policy_leaves, packed_prompts),
          (target_tree, tuple(trees), policy_tree))


_STACKED: dict = {}


def _stacked_leaves(members: list[list]) -> list:
  """Each leaf stacked across the members, computed once per set of weight arrays (a new array
  in any member, e.g. after an update of its weights, stacks again)."""
  key = tuple(id(leaf) for leaves in members for leaf in leaves)
  cached = _STACKED.get(key)
  if cached is None:
    if len(_STACKED) >= 16:  # a few drafter sets at a time; keep memory bounded
      _STACKED.pop(next(iter(_STACKED)))
    # The source leaves stay referenced, so their ids cannot be reused by other arrays.
    cached = _STACKED[key] = (members, [jnp.stack(group) for group in zip(*members)])
  return cached[1]


def _program_name(spec: SelectionSpec, policy) -> str:
  return f"selected by the policy among {policy.option_names}, gamma {spec.gamma_width}"


def _run_selected(spec: SelectionSpec, trees, target_leaves, stacked_leaves, policy_leaves,
                  packed_prompts):
  """The whole selected generation: its `SelectedSummary`."""
  target_tree, branch_trees, policy_tree = trees
  target_params = jax.tree.unflatten(target_tree, target_leaves)
  ids, mask, key, (greedy_policy,) = unpack_prompts(packed_prompts, num_flags=1)
  first = spec.options[0]
  context, cache = loop.prepare_target(first, target_params, ids, mask,
                                       spec.cache_length(ids.shape[1]))
  embeddings = first.target.embed(target_params, context).astype(jnp.float32)  # [B, D]
  logits = spec.policy.logits(jax.tree.unflatten(policy_tree, policy_leaves), embeddings)
  # Only the dynamic policy draws: the draw (a fold-in and a Gumbel sample, ~40 small kernels in
  # two rolled loops on XLA:CPU) sits between the policy and the chosen loop, so the greedy
  # policy skips it rather than computing it and throwing it away.
  choice = jax.lax.cond(
      greedy_policy > 0,
      lambda: jnp.argmax(logits, axis=-1).astype(jnp.int32),
      lambda: jax.random.categorical(jax.random.fold_in(key, _POLICY_STREAM), logits,
                                     axis=-1).astype(jnp.int32))
  member_of = jnp.asarray(_members(spec))

  def decode_with(branch, member, active):  # loop `branch` with its drafter `member`
    option, tree = spec.branches[branch], branch_trees[branch]
    if tree is None:
      params = None
    elif spec.branch_sizes[branch] == 1:  # the drafter's own leaves: nothing to pick
      params = jax.tree.unflatten(tree, stacked_leaves[branch])
    else:
      # The barrier keeps XLA from sinking the member's slice into the loop (a copy of the
      # drafter's weights at every drafter step instead of once per call).
      params = jax.tree.unflatten(tree, jax.lax.optimization_barrier(
          [leaf[member] for leaf in stacked_leaves[branch]]))
    # Each loop runs on a cache of its own length, as `generate` would (see `loop.fit_cache`).
    own_cache = loop.fit_cache(option, target_params, cache, ids.shape[0],
                               option.cache_length(ids.shape[1]))
    state = loop.decode_prepared(option, target_params, params, context, own_cache, ids, mask,
                                 key, active)
    return loop.summarize(option, state, spec.gamma_width)

  if ids.shape[0] == 1:
    branch = jnp.asarray(spec.branch_of)[choice[0]]
    summary = jax.lax.switch(branch, [lambda b=b: decode_with(b, member_of[choice[0]], None)
                                      for b in range(len(spec.branches))])
  else:
    summary = _decode_rows(spec, decode_with, choice, ids.shape[0])
  return SelectedSummary(base=summary, choice=choice, embeddings=embeddings)


_PROGRAM = transfer.Packed(_run_selected, num_static=2)  # its `SelectedSummary` as one array


def _members(spec: SelectionSpec) -> list[int]:
  """Option index -> its position among the options sharing its loop."""
  return [spec.branch_of[:i].count(b) for i, b in enumerate(spec.branch_of)]


def _decode_rows(spec: SelectionSpec, decode_with, choice, batch: int) -> loop.Summary:
  """A batch: one loop per chosen option over the whole batch, the other rows marked done."""
  summary = _empty_summary(batch, spec.options[0].max_new_tokens, spec.gamma_width)
  members = _members(spec)
  for index in range(len(spec.options)):
    rows = choice == index
    run = lambda current, i=index, r=rows: _where_rows(
        r, decode_with(spec.branch_of[i], members[i], r), current)
    summary = jax.lax.cond(jnp.any(rows), run, lambda current: current, summary)
  return summary


def _empty_summary(batch: int, max_new_tokens: int, gamma_width: int) -> loop.Summary:
  rows = jnp.zeros((batch,), jnp.int32)
  return loop.Summary(tokens=jnp.zeros((batch, max_new_tokens), jnp.int32), lengths=rows,
                      rounds=rows, accepted=rows, target_calls=rows,
                      accepted_at=jnp.zeros((batch, gamma_width), jnp.int32))


def _where_rows(rows, new, old):
  """Each leaf of `new` on `rows` (bool [B]), of `old` elsewhere."""
  return jax.tree.map(lambda n, o: jnp.where(rows.reshape((-1,) + (1,) * (n.ndim - 1)), n, o),
                      new, old)


@struct.dataclass
class SelectedSummary:
  """What the host reads of a selected generation (a pytree, fetched packed: `transfer`)."""

  base: loop.Summary  # accepted_at as wide as the largest gamma
  choice: jax.Array  # int32 [B] the option index each row chose
  embeddings: jax.Array  # float32 [B, D] the query embeddings the policy read


def _output(spec: SelectionSpec, policy, summary: SelectedSummary, seconds: float,
            compile_seconds: float) -> SelectedOutput:
  """The fetched `SelectedSummary` (numpy arrays) as the call's output."""
  base, choice_ids = summary.base, summary.choice
  gammas = np.fromiter((option.gamma for option in spec.options), np.int32, len(spec.options))
  # target_calls: each option that ran counts its own loop's calls once.
  _, first_rows = np.unique(choice_ids, return_index=True)
  stats = Stats(drafted=base.rounds * gammas[choice_ids], accepted=base.accepted,
                rounds=base.rounds, per_position=base.accepted_at.sum(axis=0),
                target_calls=int(base.target_calls[first_rows].sum()), seconds=seconds,
                compile_seconds=compile_seconds, new_tokens=int(base.lengths.sum()))
  return SelectedOutput(tokens=base.tokens, lengths=base.lengths, stats=stats,
                        choices=[policy.option_names[c] for c in choice_ids.tolist()],
                        choice_ids=choice_ids, embeddings=summary.embeddings)
