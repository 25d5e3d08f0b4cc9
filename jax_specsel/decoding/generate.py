"""`generate`: autoregressive or speculative generation of a batch of prompts, with its `Stats`.

The request path (checks, padding, the compile cache) is shared with the other entry points:
`request` and `programs`.
"""

from __future__ import annotations

import dataclasses
import time

import jax
import numpy as np

from jax_specsel.decoding import loop, loop_state, programs, request, sampling, transfer
from jax_specsel.models.interface import Model


@dataclasses.dataclass
class Stats:
  """Per-call counters of one `generate` call (per-row arrays where noted).

  drafted: draft tokens proposed (gamma per round per active row), [B].
  accepted: draft tokens the target validated (paper A.6: a rejection rejects the rest), [B].
  acceptance_rate: accepted / drafted over the batch (nan without a drafter).
  rounds: rounds per row, [B]; target_calls: target decode calls for the batch.
  mean_accepted_length: tokens per round including the bonus/correction token = 1 + accepted/rounds.
  per_position: [gamma] rounds in which draft position i was accepted, summed over rows.
  seconds: wall time of the whole call, host work and the output fetch included, compilation
    excluded (what a user waits for per query once the program is warm); compile_seconds: the
    compilation this call triggered (0 when the program was cached).
  """

  drafted: np.ndarray
  accepted: np.ndarray
  rounds: np.ndarray
  per_position: np.ndarray
  target_calls: int
  seconds: float
  compile_seconds: float
  new_tokens: int

  @property
  def acceptance_rate(self) -> float:
    total = int(self.drafted.sum())
    return float(self.accepted.sum()) / total if total else float("nan")

  @property
  def mean_accepted_length(self) -> float:
    return 1.0 + float(self.accepted.sum()) / max(int(self.rounds.sum()), 1)

  @property
  def ms_per_token(self) -> float:
    return 1e3 * self.seconds / max(self.new_tokens, 1)

  @classmethod
  def from_summary(
      cls, summary: loop_state.Summary, gamma: int, seconds: float, compile_seconds: float
  ) -> "Stats":
    """Counters of one loop (a fetched `Summary`); target_calls: the loop's, from row 0."""
    return cls(
        drafted=summary.rounds * gamma,
        accepted=summary.accepted,
        rounds=summary.rounds,
        per_position=summary.accepted_at[:, :gamma].sum(axis=0),
        target_calls=int(summary.target_calls[0]),
        seconds=seconds,
        compile_seconds=compile_seconds,
        new_tokens=int(summary.lengths.sum()),
    )

  def as_dict(self) -> dict:
    return {
        "drafted": int(self.drafted.sum()),
        "accepted": int(self.accepted.sum()),
        "acceptance_rate": self.acceptance_rate,
        "target_calls": self.target_calls,
        "mean_accepted_length": self.mean_accepted_length,
        "per_position": self.per_position.tolist(),
        "seconds": self.seconds,
        "compile_seconds": self.compile_seconds,
        "new_tokens": self.new_tokens,
        "ms_per_token": self.ms_per_token,
    }


@dataclasses.dataclass
class GenerateOutput:
  tokens: np.ndarray  # int32 [B, max_new_tokens], padded with the pad id after EOS / length
  lengths: np.ndarray  # int32 [B] generated tokens per row (EOS included when emitted)
  stats: Stats


def generate(
    target: Model,
    prompt_ids,
    drafter: Model | None = None,
    gamma: int = 7,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    max_new_tokens: int = 64,
    seed: int = 0,
    attention_mask=None,
    assume_shared_vocabulary: bool = False,
) -> GenerateOutput:
  """Autoregressive (drafter=None) or speculative generation in one compiled while_loop.

  Every input is checked before anything is compiled or run; nothing is silently truncated.

  Args:
    target: the model whose distribution is sampled (greedy: whose argmax text is reproduced).
    prompt_ids: integer token ids: an array [B, S] (or [S] for one prompt), padded where
      `attention_mask` is 0, or a list of B id lists of any lengths (a 1-D numpy object array
      of id arrays counts as such a list). Float or object ids are refused, not truncated.
    drafter: a `Model` of the same family and tokenizer, an early-exit view, or None.
    gamma: draft tokens per round, a whole number: >= 1 with a drafter; without a drafter it
      is not used (any whole number >= 0 is accepted, 0 included).
    temperature: 0 for greedy; otherwise sampling at a temperature >= MIN_SAMPLING_TEMPERATURE
      (1e-4): smaller positive values are refused (logits / temperature leave float32's
      working range and the loop would emit garbage); pass 0 for their limit, greedy decoding.
      The drafter samples with the same processing.
    top_k: keep the k most likely ids (0: off). top_p: nucleus mass in (0, 1] (1: off).
    max_new_tokens: tokens to generate at most per row. For a decoder-only model, a prompt
      plus max_new_tokens longer than the model's max_position_embeddings warns
      (`PositionLimitWarning`) and generation goes on, as in transformers; a prompt alone
      longer than that limit is refused.
    seed: PRNG seed for every random draw, in [0, 2**32).
    attention_mask: 0/1 of prompt_ids' shape, 1 on real prompt tokens; default: every token is
      real. The ones of a row must be contiguous: right, left (as tokenizers with
      padding_side="left" produce) or both-sided padding are accepted and normalized to the
      right-padded layout the loop uses; padding between real tokens, other values and other
      shapes are refused.
    assume_shared_vocabulary: states that the drafter's ids mean the same text as the target's
      where nothing can check it (vocabulary sizes that differ by padding, no tokenizers to
      compare): silences the `VocabularyWarning` given otherwise. Tokenizers that differ are
      refused either way.

  Returns:
    GenerateOutput(tokens [B, max_new_tokens], lengths [B], stats).

  Raises:
    TypeError: a drafter or target that is not a `Model`, non-integer ids or settings.
    ValueError: settings out of range, a malformed prompt or mask, an incompatible drafter.
  """
  started = time.perf_counter()
  request.check_request(target, gamma, temperature, top_k, top_p, max_new_tokens)
  if drafter is not None:
    drafter = request.checked_drafter(target, drafter, gamma, assume_shared_vocabulary)
  build = lambda: _program(target, drafter, gamma, temperature, top_k, top_p, max_new_tokens)
  prompts = programs.Prompts(prompt_ids, attention_mask, seed)
  return programs.run(target, prompts, [drafter], max_new_tokens, build, _output, started)


def _program(target, drafter, gamma, temperature, top_k, top_p, max_new_tokens) -> programs.Program:
  """The program `generate` runs for these checked models and settings."""
  spec = loop_spec(target, drafter, gamma, temperature, top_k, top_p, max_new_tokens)
  target_leaves, target_tree = target.flat_params()
  drafter_leaves, drafter_tree = ([], None) if drafter is None else drafter.flat_params()
  kind = "greedy" if spec.settings.greedy else "sampled"
  return programs.Program(
      PROGRAM,
      spec,
      (target_tree, drafter_tree),
      (target_leaves, drafter_leaves),
      spec.cache_length,
      f"gamma {spec.gamma}, {kind}",
  )


def loop_spec(
    target: Model,
    drafter: Model | None,
    gamma: int,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    max_new_tokens: int = 64,
) -> loop_state.LoopSpec:
  """The static description of a generation (gamma is 0 without a drafter)."""
  settings = sampling.SamplingSettings(float(temperature), int(top_k), float(top_p))
  return loop_state.LoopSpec(
      target=target.decoder,
      drafter=None if drafter is None else drafter.decoder,
      gamma=0 if drafter is None else int(gamma),
      settings=settings,
      max_new_tokens=int(max_new_tokens),
      is_encoder_decoder=target.is_encoder_decoder,
      eos_ids=target.eos_ids,
      pad_id=target.pad_id,
      start_id=target.decoder_start_id or 0,
      target_vocab=target.vocab_size,
  )


def run_flat(spec, trees, target_leaves, drafter_leaves, packed_prompts):
  """The program `generate` compiles: `loop.run` on flat weight lists (trees: the static
  treedefs): the final `loop_state.Summary`."""
  target_params = jax.tree.unflatten(trees[0], target_leaves)
  drafter_params = None if trees[1] is None else jax.tree.unflatten(trees[1], drafter_leaves)
  ids, mask, key, _ = request.unpack_prompts(packed_prompts)
  return loop_state.summarize(spec, loop.run(spec, target_params, drafter_params, ids, mask, key))


PROGRAM = transfer.Packed(run_flat)  # `run_flat` with its `Summary` packed into one array


def _output(
    spec: loop_state.LoopSpec, packed: np.ndarray, seconds: float, compile_seconds: float
) -> GenerateOutput:
  """The fetched summary as the call's output."""
  summary = PROGRAM.unpack(spec, packed)
  return GenerateOutput(
      tokens=summary.tokens,
      lengths=summary.lengths,
      stats=Stats.from_summary(summary, spec.gamma, seconds, compile_seconds),
  )
