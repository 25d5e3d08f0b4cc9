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
import time
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jax_specsel.decoding import loop, loop_state, programs, request, transfer
from jax_specsel.decoding.generate import GenerateOutput, Stats, loop_spec
from jax_specsel.decoding.request import AUTOREGRESSIVE, unpack_prompts
from jax_specsel.models.interface import Model

_POLICY_STREAM = 0x5E1EC7  # folded into the seed's key for the dynamic policy's draw
_SPECS = programs.LruCache(64)  # SelectionSpec -> itself (see `SelectionSpec.interned`)


@dataclasses.dataclass(frozen=True)
class SelectionSpec:
  """Everything static about a selected generation (a jit compile-time constant).

  The greedy and the dynamic policy share the program: which one runs is a run-time flag.

  Attributes:
    options: one LoopSpec per policy option, in the policy's order (gamma 0: autoregressive).
    policy: the policy's static program (`bandit.policy.PolicyProgram`): `.logits(inputs, emb)`.
  """

  options: tuple[loop_state.LoopSpec, ...]
  policy: Any

  @property
  def gamma_width(self) -> int:
    return max(option.gamma for option in self.options)

  @functools.cached_property
  def branches(self) -> tuple[loop_state.LoopSpec, ...]:
    """The distinct loops: options whose drafters share an architecture share one loop (their
    weights are chosen at run time), so the program holds one loop per architecture, not per
    drafter (a program with more loops runs slower at equal work)."""
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
    (`Decoder` equality walks the module graph), too slow to repeat per query. The lookup itself
    is cheap: an equal earlier spec holds the very same `Decoder` objects."""
    found = _SPECS.get(self)
    if found is None:
      found = self
      _SPECS.put(self, self)
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


def generate_selected(
    target: Model,
    prompt_ids,
    drafters: Mapping[str, Model],
    policy,
    greedy_policy: bool = True,
    gamma: int = 7,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    max_new_tokens: int = 64,
    seed: int = 0,
    attention_mask=None,
    assume_shared_vocabulary: bool = False,
) -> SelectedOutput:
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
  request.check_request(target, gamma, temperature, top_k, top_p, max_new_tokens)
  option_models = _option_models(target, drafters, policy, gamma, assume_shared_vocabulary)

  def build() -> programs.Program:
    spec = SelectionSpec(
        options=tuple(
            loop_spec(target, drafter, gamma, temperature, top_k, top_p, max_new_tokens)
            for drafter in option_models
        ),
        policy=policy.program,
    ).interned()
    weights, trees = _arguments(spec, target, option_models, policy)
    return programs.Program(
        _PROGRAM, spec, trees, weights, spec.cache_length, _program_name(spec, policy)
    )

  def unpack(spec, packed, seconds, compile_seconds) -> SelectedOutput:
    return _output(spec, policy, packed, seconds, compile_seconds)

  prompts = programs.Prompts(prompt_ids, attention_mask, seed, flags=(int(bool(greedy_policy)),))
  return programs.run(
      target, prompts, option_models, max_new_tokens, build, unpack, started, together=False
  )


def _option_models(
    target: Model, drafters: Mapping[str, Model], policy, gamma: int, assume_shared_vocabulary: bool
) -> list[Model | None]:
  """The drafter (None: autoregressive) of each policy option, checked before any work."""
  names = request.policy_option_names(target, policy, "generate_selected")
  unknown = [n for n in names if n != AUTOREGRESSIVE and n not in drafters]
  if unknown:
    raise ValueError(
        f"the policy chooses among {names} but {unknown} "
        f"{'is' if len(unknown) == 1 else 'are'} neither a given drafter "
        f"({sorted(drafters)}) nor '{AUTOREGRESSIVE}': pass drafters= with those "
        "names."
    )
  models = []
  for name in names:
    model = None if name == AUTOREGRESSIVE else drafters[name]
    if model is not None:
      model = request.checked_drafter(target, model, gamma, assume_shared_vocabulary, name=name)
    models.append(model)
  return models


def _arguments(spec: SelectionSpec, target, option_models, policy):
  """(array arguments before the packed prompts, static treedefs) of the selected program.

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
    leaves, tree = members[0].flat_params()
    stacked.append(leaves if len(members) == 1 else _stacked_leaves(members))
    trees.append(tree)
  policy_leaves, policy_tree = policy.program_inputs()
  return (target_leaves, stacked, policy_leaves), (target_tree, tuple(trees), policy_tree)


# Drafter Models that share a loop -> (their leaves when stacked, the stacked leaves).
_STACKED = programs.LruCache(16)


def _stacked_leaves(members: list[Model]) -> list:
  """Each weight stacked across the drafters that share a loop: made once per drafter set, and
  again when one of their weights changed.

  Keyed by the drafter `Model`s themselves, which the cache keeps alive (so no other object can
  take an identity in a live key), and checked against their current leaves by identity, which
  sees a weight replaced or updated in place (either is a new array object).
  """
  leaves = [member.flat_params()[0] for member in members]
  cached = _STACKED.get(tuple(members))
  if cached is None or not all(_same_objects(now, then) for now, then in zip(leaves, cached[0])):
    cached = (leaves, [jnp.stack(group) for group in zip(*leaves)])
    _STACKED.put(tuple(members), cached)
  return cached[1]


def _same_objects(now: list, then: list) -> bool:
  return len(now) == len(then) and all(a is b for a, b in zip(now, then))


def _program_name(spec: SelectionSpec, policy) -> str:
  return f"selected by the policy among {policy.option_names}, gamma {spec.gamma_width}"


def _run_selected(
    spec: SelectionSpec, trees, target_leaves, stacked_leaves, policy_leaves, packed_prompts
):
  """The whole selected generation: its `SelectedSummary`."""
  target_tree, branch_trees, policy_tree = trees
  target_params = jax.tree.unflatten(target_tree, target_leaves)
  ids, mask, key, (greedy_policy,) = unpack_prompts(packed_prompts, num_flags=1)
  first = spec.options[0]
  context, cache = loop.prepare_target(
      first, target_params, ids, mask, spec.cache_length(ids.shape[1])
  )
  embeddings = first.target.embed(target_params, context).astype(jnp.float32)  # [B, D]
  logits = spec.policy.logits(jax.tree.unflatten(policy_tree, policy_leaves), embeddings)
  # Only the dynamic policy draws: the draw sits between the policy and the chosen loop, so the
  # greedy policy skips it rather than computing it and throwing it away.
  choice = jax.lax.cond(
      greedy_policy > 0,
      lambda: jnp.argmax(logits, axis=-1).astype(jnp.int32),
      lambda: jax.random.categorical(
          jax.random.fold_in(key, _POLICY_STREAM), logits, axis=-1
      ).astype(jnp.int32),
  )
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
      params = jax.tree.unflatten(
          tree, jax.lax.optimization_barrier([leaf[member] for leaf in stacked_leaves[branch]])
      )
    # Each loop runs on a cache of its own length, as `generate` would (see `loop.fit_cache`).
    own_cache = loop.fit_cache(
        option, target_params, cache, ids.shape[0], option.cache_length(ids.shape[1])
    )
    state = loop.decode_prepared(
        option, target_params, params, context, own_cache, ids, mask, key, active
    )
    return loop_state.summarize(option, state, spec.gamma_width)

  if ids.shape[0] == 1:
    branch = jnp.asarray(spec.branch_of)[choice[0]]
    summary = jax.lax.switch(
        branch,
        [lambda b=b: decode_with(b, member_of[choice[0]], None) for b in range(len(spec.branches))],
    )
  else:
    summary = _decode_rows(spec, decode_with, choice, ids.shape[0])
  return SelectedSummary(base=summary, choice=choice, embeddings=embeddings)


_PROGRAM = transfer.Packed(_run_selected)  # its `SelectedSummary` packed into one array


def _members(spec: SelectionSpec) -> list[int]:
  """Option index -> its position among the options sharing its loop."""
  return [spec.branch_of[:i].count(b) for i, b in enumerate(spec.branch_of)]


def _decode_rows(spec: SelectionSpec, decode_with, choice, batch: int) -> loop_state.Summary:
  """A batch: one loop per chosen option over the whole batch, the other rows marked done."""
  summary = _empty_summary(batch, spec.options[0].max_new_tokens, spec.gamma_width)
  members = _members(spec)
  for index in range(len(spec.options)):
    rows = choice == index
    run = lambda current, i=index, r=rows: _where_rows(
        r, decode_with(spec.branch_of[i], members[i], r), current
    )
    summary = jax.lax.cond(jnp.any(rows), run, lambda current: current, summary)
  return summary


def _empty_summary(batch: int, max_new_tokens: int, gamma_width: int) -> loop_state.Summary:
  rows = jnp.zeros((batch,), jnp.int32)
  return loop_state.Summary(
      tokens=jnp.zeros((batch, max_new_tokens), jnp.int32),
      lengths=rows,
      rounds=rows,
      accepted=rows,
      target_calls=rows,
      accepted_at=jnp.zeros((batch, gamma_width), jnp.int32),
  )


def _where_rows(rows, new, old):
  """Each leaf of `new` on `rows` (bool [B]), of `old` elsewhere."""
  return jax.tree.map(
      lambda n, o: jnp.where(rows.reshape((-1,) + (1,) * (n.ndim - 1)), n, o), new, old
  )


@struct.dataclass
class SelectedSummary:
  """What the host reads of a selected generation (a pytree, fetched packed: `transfer`)."""

  base: loop_state.Summary  # accepted_at as wide as the largest gamma
  choice: jax.Array  # int32 [B] the option index each row chose
  embeddings: jax.Array  # float32 [B, D] the query embeddings the policy read


def _output(
    spec: SelectionSpec, policy, packed: np.ndarray, seconds: float, compile_seconds: float
) -> SelectedOutput:
  """The fetched `SelectedSummary` as the call's output."""
  summary = _PROGRAM.unpack(spec, packed)
  base, choice_ids = summary.base, summary.choice
  gammas = np.fromiter((option.gamma for option in spec.options), np.int32, len(spec.options))
  # target_calls: each option that ran counts its own loop's calls once.
  _, first_rows = np.unique(choice_ids, return_index=True)
  stats = Stats(
      drafted=base.rounds * gammas[choice_ids],
      accepted=base.accepted,
      rounds=base.rounds,
      per_position=base.accepted_at.sum(axis=0),
      target_calls=int(base.target_calls[first_rows].sum()),
      seconds=seconds,
      compile_seconds=compile_seconds,
      new_tokens=int(base.lengths.sum()),
  )
  return SelectedOutput(
      tokens=base.tokens,
      lengths=base.lengths,
      stats=stats,
      choices=[policy.option_names[c] for c in choice_ids.tolist()],
      choice_ids=choice_ids,
      embeddings=summary.embeddings,
  )
