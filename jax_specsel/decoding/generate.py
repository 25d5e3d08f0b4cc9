"""`generate`: checks inputs, buckets prompts, compiles once per shape, runs the loop, reports stats.

Compilation is ahead of time (`jit(...).lower(...).compile()`), so `stats.seconds` never includes
it, and every compilation is counted (`compilation_count()`) and logged: a benchmark can show that
the count does not grow with the number of queries once their buckets are warm.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from jax_specsel import memory, sharding, token_batches, validation
from jax_specsel.decoding import loop, sampling, transfer
from jax_specsel.models import interface
from jax_specsel.models.interface import Model

log = logging.getLogger(__name__)

MIN_BUCKET = 8
# Sampling temperatures in (0, this) are refused: logits / temperature leave float32's useful range
# (measured: 1e-10 already yields pad tokens on a toy model); 0 is greedy, their limit.
MIN_SAMPLING_TEMPERATURE = 1e-4
MAX_POSITIONS = 2 ** 31 - 1  # positions and lengths are int32 inside the loop
_COMPILED: dict = {}
_COMPILE_SECONDS: list[float] = []
_VOCABULARY_WARNED: set = set()  # (target, drafter) pairs warned about once


class PositionLimitWarning(UserWarning):
  """A decoder-only generation runs past the model's max_position_embeddings (it goes on)."""


class VocabularyWarning(UserWarning):
  """A drafter's vocabulary size differs from the target's and no tokenizers can show that the
  ids mean the same text (generation goes on; `assume_shared_vocabulary=True` states it)."""


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
  def from_summary(cls, summary: loop.Summary, gamma: int, seconds: float,
                   compile_seconds: float) -> "Stats":
    """Counters of one loop (a fetched `loop.Summary`); target_calls: the loop's, from row 0."""
    return cls(drafted=summary.rounds * gamma, accepted=summary.accepted, rounds=summary.rounds,
               per_position=summary.accepted_at[:, :gamma].sum(axis=0),
               target_calls=int(summary.target_calls[0]), seconds=seconds,
               compile_seconds=compile_seconds, new_tokens=int(summary.lengths.sum()))

  def as_dict(self) -> dict:
    return {"drafted": int(self.drafted.sum()), "accepted": int(self.accepted.sum()),
            "acceptance_rate": self.acceptance_rate, "target_calls": self.target_calls,
            "mean_accepted_length": self.mean_accepted_length,
            "per_position": self.per_position.tolist(), "seconds": self.seconds,
            "compile_seconds": self.compile_seconds, "new_tokens": self.new_tokens,
            "ms_per_token": self.ms_per_token}


@dataclasses.dataclass
class GenerateOutput:
  tokens: np.ndarray  # int32 [B, max_new_tokens], padded with the pad id after EOS / length
  lengths: np.ndarray  # int32 [B] generated tokens per row (EOS included when emitted)
  stats: Stats


def compilation_count() -> int:
  """How many generation programs have been compiled in this process."""
  return len(_COMPILE_SECONDS)


def bucket_length(length: int, limit: int | None = None) -> int:
  """The prompt bucket of a length: 8, 12, 16, 24, 32, 48, 64, 96, ... (powers of two and 1.5x
  them, at least MIN_BUCKET), capped at `limit`.

  Half-steps waste at most a third of a row on padding instead of half: the prompt's first pass
  (T5 encoder, LLaMA prefill) is real work per padded token, at the price of up to twice as many
  compiled programs.
  """
  power = max(MIN_BUCKET, 1 << (max(length, 1) - 1).bit_length())
  bucket = power * 3 // 4 if power > MIN_BUCKET and power * 3 // 4 >= length else power
  return min(bucket, limit) if limit else bucket


def generate(target: Model, prompt_ids, drafter: Model | None = None, gamma: int = 7,
             temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
             max_new_tokens: int = 64, seed: int = 0, attention_mask=None,
             assume_shared_vocabulary: bool = False) -> GenerateOutput:
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
  _check_settings(gamma, temperature, top_k, top_p, max_new_tokens)
  _check_models(target, drafter, gamma)
  ids, mask = pad_prompts(prompt_ids, attention_mask, target)
  _warn_past_position_limit(target, drafter, mask, max_new_tokens)
  if drafter is not None:
    drafter = drafter_for(target, drafter)
    check_compatible(target, drafter, assume_shared_vocabulary)
  spec = loop_spec(target, drafter, gamma, temperature, top_k, top_p, max_new_tokens)
  target_leaves, target_tree = target.flat_params()
  drafter_leaves, drafter_tree = ([], None) if drafter is None else drafter.flat_params()
  args = (target_leaves, drafter_leaves, place_prompts(target, ids, mask, seed))
  fits = lambda: check_caches_fit(target, [drafter], ids.shape[0], spec.cache_length(ids.shape[1]),
                                  max_new_tokens)
  compiled, compile_seconds = compiled_program(_PROGRAM, (spec, (target_tree, drafter_tree)),
                                               args, _program_name(spec), before_compile=fits)
  summary = _PROGRAM.unpack((spec, (target_tree, drafter_tree), *args), compiled(*args))
  return _output(spec, summary, time.perf_counter() - started - compile_seconds, compile_seconds)


def _output(spec: loop.LoopSpec, summary: loop.Summary, seconds: float,
            compile_seconds: float) -> GenerateOutput:
  """The fetched `loop.Summary` (numpy arrays) as the call's output."""
  return GenerateOutput(tokens=summary.tokens, lengths=summary.lengths,
                        stats=Stats.from_summary(summary, spec.gamma, seconds, compile_seconds))


def loop_spec(target: Model, drafter: Model | None, gamma: int, temperature: float = 0.0,
              top_k: int = 0, top_p: float = 1.0, max_new_tokens: int = 64) -> loop.LoopSpec:
  """The static description of a generation (gamma is 0 without a drafter)."""
  settings = sampling.SamplingSettings(float(temperature), int(top_k), float(top_p))
  return loop.LoopSpec(
      target=target.decoder, drafter=None if drafter is None else drafter.decoder,
      gamma=0 if drafter is None else int(gamma), settings=settings,
      max_new_tokens=int(max_new_tokens), is_encoder_decoder=target.is_encoder_decoder,
      eos_ids=target.eos_ids, pad_id=target.pad_id, start_id=target.decoder_start_id or 0,
      target_vocab=target.vocab_size)


def _check_settings(gamma, temperature, top_k, top_p, max_new_tokens):
  """Raises TypeError / ValueError naming the first bad setting (whole numbers stay whole)."""
  validation.integer("gamma", gamma, minimum=0)  # >= 1 with a drafter: _check_models
  temperature = validation.real("temperature", temperature)
  if temperature < 0:
    raise ValueError(f"temperature={temperature}: must be >= 0 (0 means greedy decoding).")
  if 0 < temperature < MIN_SAMPLING_TEMPERATURE:
    raise ValueError(f"temperature={temperature}: positive temperatures below "
                     f"{MIN_SAMPLING_TEMPERATURE} are refused (logits / temperature leave "
                     "float32's working range in the sampling step and the output is garbage); "
                     "pass temperature=0 for greedy decoding (their limit) or a temperature >= "
                     f"{MIN_SAMPLING_TEMPERATURE}.")
  validation.integer("top_k", top_k, minimum=0)
  if not 0 < validation.real("top_p", top_p) <= 1:
    raise ValueError(f"top_p={top_p}: must be in (0, 1] (1 disables the nucleus filter).")
  validation.integer("max_new_tokens", max_new_tokens, minimum=1)


def _check_models(target, drafter, gamma) -> None:
  """Type checks of the models (before `check_compatible`) and gamma >= 1 with a drafter."""
  if not isinstance(target, Model):
    raise TypeError(f"target is {_describe(target)}: pass a jax_specsel Model "
                    "(jax_specsel.load_model(path)).")
  if drafter is None:
    return
  if not isinstance(drafter, Model):
    raise TypeError(f"drafter is {_describe(drafter)}: pass a jax_specsel Model "
                    "(jax_specsel.load_model(path) or target.early_exit(layers)), or None for "
                    "autoregressive decoding.")
  if int(gamma) < 1:
    raise ValueError(f"gamma={gamma} with drafter {drafter.name}: a speculative round drafts "
                     "gamma >= 1 tokens; pass drafter=None for autoregressive decoding.")


def _describe(value) -> str:
  text = repr(value)
  return f"{type(value).__name__} {text if len(text) <= 60 else text[:57] + '...'}"


def _warn_past_position_limit(target, drafter, mask, max_new_tokens) -> None:
  """Warns, as transformers does, when a decoder-only model runs past max_position_embeddings.

  transformers' generate goes on with a warning ("you may observe exceptions, performance
  degradation, or nothing at all"): rotary positions extrapolate, they are just untrained.
  T5's relative positions have no such limit.
  """
  needed = int(mask.sum(axis=1).max()) + int(max_new_tokens)
  seen = set()
  for model in (target, drafter):
    if model is None or model.is_encoder_decoder or not model.max_positions or model.name in seen:
      continue
    seen.add(model.name)
    if needed > model.max_positions:
      warnings.warn(PositionLimitWarning(
          f"the longest prompt plus max_new_tokens={int(max_new_tokens)} needs {needed} positions "
          f"but {model.name} was trained on max_position_embeddings={model.max_positions}: "
          "generation goes on (as in transformers), but output past that position may degrade; "
          "shorten the prompt or lower max_new_tokens."), stacklevel=3)


def pad_prompts(prompt_ids, attention_mask, target: Model):
  """Right-pads prompts to their power-of-two bucket in numpy (no device op per new length).

  Args:
    prompt_ids, attention_mask: as `generate` takes them (see there for what is accepted).
    target: the model whose pad id, vocabulary and position limit apply.

  Returns:
    (ids int32 [B, bucket], mask int32 [B, bucket]): each row's real tokens first.

  Raises:
    TypeError: ids that are not integers. ValueError: a malformed batch or mask, an empty
      prompt, ids outside the vocabulary, a prompt longer than the model's positions.
  """
  if attention_mask is None:
    padded = _padded_int_rows(prompt_ids, target)
    if padded is not None:
      return padded
  ids, mask = token_batches.as_id_batch(prompt_ids, attention_mask, target.pad_id)
  if attention_mask is not None:  # built masks are right-aligned already (keeps the call cheap)
    ids, mask = token_batches.right_aligned(ids, mask)
  lengths = mask.sum(axis=1)
  if (lengths == 0).any():
    raise ValueError(f"empty prompt in row(s) {np.flatnonzero(lengths == 0).tolist()}: every row needs "
                     "at least one real token (for decoder-only models, e.g. the BOS token).")
  limit = target.max_positions
  if limit and lengths.max() > limit:
    raise ValueError(f"a prompt has {int(lengths.max())} tokens but {target.name} supports at most "
                     f"{limit} positions (max_position_embeddings): truncate the prompt.")
  out_of_vocab = mask.astype(bool) & ((ids < 0) | (ids >= target.vocab_size))
  if out_of_vocab.any():
    rows = np.unique(np.nonzero(out_of_vocab)[0])
    raise ValueError(f"prompt ids must lie in [0, {target.vocab_size}) for {target.name}; row(s) "
                     f"{rows[:5].tolist()} hold {ids[out_of_vocab][:5].tolist()}: tokenize with "
                     "the model's own tokenizer.")
  bucket = bucket_length(int(lengths.max()), limit)
  padded_ids = np.full((ids.shape[0], bucket), target.pad_id, np.int32)
  padded_mask = np.zeros((ids.shape[0], bucket), np.int32)
  width = min(ids.shape[1], bucket)
  padded_ids[:, :width] = np.where(mask[:, :width] > 0, ids[:, :width], target.pad_id)
  padded_mask[:, :width] = mask[:, :width]
  return padded_ids, padded_mask


def _padded_int_rows(prompt_ids, target: Model):
  """The per-query path: a list of non-empty lists of Python ints, written straight into the
  bucket. Returns None for anything else (or anything wrong), which the general path checks and
  names, so this only ever makes a valid call cheaper (~10 us instead of ~60 us a call)."""
  if type(prompt_ids) is not list or not prompt_ids:
    return None
  for row in prompt_ids:
    if type(row) is not list or not row or not all(type(token) is int for token in row):
      return None
  longest, limit = max(len(row) for row in prompt_ids), target.max_positions
  if limit and longest > limit:
    return None
  bucket = bucket_length(longest, limit)
  ids = np.full((len(prompt_ids), bucket), target.pad_id, np.int32)
  mask = np.zeros((len(prompt_ids), bucket), np.int32)
  try:
    for i, row in enumerate(prompt_ids):
      ids[i, :len(row)], mask[i, :len(row)] = row, 1
  except OverflowError:  # an id past int32
    return None
  real = ids[mask > 0]
  if real.min() < 0 or real.max() >= target.vocab_size:
    return None
  return ids, mask


def place_prompts(target: Model, ids: np.ndarray, mask: np.ndarray, seed,
                  flags: tuple[int, ...] = ()) -> np.ndarray | jax.Array:
  """The prompts, their lengths, the seed and run-time flags as one int32 array: one upload.

  Columns 0..S-1 hold the right-padded ids, column S each row's length (the mask is rebuilt from
  it inside the program), column S+1 the seed's uint32 bits (the key is made inside the compiled
  program: building it outside is a device dispatch, ~0.5 ms on CPU), then one column per flag
  (the same value on every row). Split on the mesh's data axis when the target is sharded.
  """
  seed = validation.integer("seed", seed)
  if not 0 <= seed < 2 ** 32:
    raise ValueError(f"seed={seed}: must be in [0, 2**32).")
  lengths = mask.sum(axis=1)  # pad_prompts puts each row's real tokens first
  width = ids.shape[1]
  packed = np.empty((ids.shape[0], width + 2 + len(flags)), np.int32)
  packed[:, :width], packed[:, width] = ids, lengths
  packed[:, width + 1] = np.uint32(seed).view(np.int32)
  packed[:, width + 2:] = flags
  return packed if target.mesh is None else sharding.place_batch(packed, target.mesh)


def unpack_prompts(packed: jax.Array, num_flags: int = 0):
  """Inside the program: (ids [B, S], mask [B, S], PRNG key, flags [num_flags]) from
  `place_prompts`' array (flags read from row 0)."""
  width = packed.shape[1] - 2 - num_flags
  ids, lengths = packed[:, :width], packed[:, width]
  mask = (jnp.arange(width)[None, :] < lengths[:, None]).astype(jnp.int32)
  seed = jax.lax.bitcast_convert_type(packed[0, width + 1], jnp.uint32)
  return ids, mask, jax.random.PRNGKey(seed), packed[0, width + 2:]


def drafter_for(target: Model, drafter: Model) -> Model:
  """The drafter placed where the target is: a single-device drafter next to a sharded target is
  replicated onto the target's mesh (`interface.replicated_on`: once per drafter and mesh, cached
  and logged once). Any other placement is returned unchanged for `check_compatible` to judge."""
  if drafter.mesh is None and target.mesh is not None:
    return interface.replicated_on(drafter, target.mesh)
  return drafter


def check_compatible(target: Model, drafter: Model, assume_shared_vocabulary: bool = False) -> None:
  """Raises ValueError unless the drafter can draft for the target (same family and tokenizer).

  Generation stops on the target's stop ids and pads with the target's pad id; the drafter's own
  stop ids only serve as a tokenizer check when the models carry no tokenizers: they must share
  an id when both have some (a base drafter's single EOS inside an instruct target's several
  end-of-turn ids is fine). Without two tokenizers to compare, vocabulary sizes that differ by
  padding (at most 256) are accepted with a `VocabularyWarning` (logged and warned once per pair)
  unless `assume_shared_vocabulary` states that the ids are shared.
  """
  if drafter.mesh != target.mesh:
    raise ValueError(f"drafter {drafter.name} is on mesh {_mesh_name(drafter)} but target {target.name} "
                     f"on {_mesh_name(target)}: a drafter on one device is replicated onto the target's "
                     "mesh automatically, one on another mesh is not. Load the drafter on one device, or "
                     "place it with jax_specsel.shard_model(drafter, target.mesh, replicated=True).")
  if drafter.is_encoder_decoder != target.is_encoder_decoder:
    raise ValueError(f"drafter {drafter.name} and target {target.name} must both be encoder-decoder "
                     "or both decoder-only.")
  if target.tokenizer is not None and drafter.tokenizer is not None:
    if not _same_vocabulary(target.tokenizer, drafter.tokenizer):
      raise ValueError(f"drafter {drafter.name} and target {target.name} have different tokenizers: "
                       "speculative decoding needs a shared vocabulary (ids must mean the same text).")
    return
  if drafter.eos_ids and target.eos_ids and not set(drafter.eos_ids) & set(target.eos_ids):
    raise ValueError(f"drafter {drafter.name} stops on ids {list(drafter.eos_ids)} but target "
                     f"{target.name} on {list(target.eos_ids)} (no eos/pad id in common): different "
                     "tokenizers.")
  if abs(target.vocab_size - drafter.vocab_size) > 256:
    raise ValueError(f"vocabulary sizes differ by more than padding ({drafter.vocab_size} vs "
                     f"{target.vocab_size}): the drafter's tokenizer cannot be the target's.")
  if drafter.vocab_size != target.vocab_size and not assume_shared_vocabulary:
    _warn_unchecked_vocabulary(target, drafter)


def _warn_unchecked_vocabulary(target: Model, drafter: Model) -> None:
  """Logs and warns, once per pair, that nothing shows the drafter's ids mean the target's text."""
  pair = (target.name, drafter.name, target.vocab_size, drafter.vocab_size)
  if pair in _VOCABULARY_WARNED:
    return
  _VOCABULARY_WARNED.add(pair)
  missing = [m.name for m in (target, drafter) if m.tokenizer is None]
  message = (f"drafter {drafter.name} has vocab_size {drafter.vocab_size} but target {target.name} "
             f"{target.vocab_size}, and {' and '.join(missing)} carr{'y' if len(missing) > 1 else 'ies'} "
             "no tokenizer to compare: nothing checks that the ids mean the same text. Generation "
             "goes on assuming they do (the output keeps the target's distribution; a drafter with "
             "another vocabulary only gets its drafts rejected). Load the models with their "
             "tokenizer files to check it, or pass assume_shared_vocabulary=True to state it.")
  log.warning("%s", message)
  warnings.warn(VocabularyWarning(message), stacklevel=4)


def _mesh_name(model: Model) -> str:
  return "one device" if model.mesh is None else str(dict(model.mesh.shape))


@functools.lru_cache(maxsize=32)
def _same_vocabulary(tokenizer, other) -> bool:
  """Whether two tokenizers map the same strings to the same ids (cached per pair: building the
  vocabulary dicts costs ~0.3 ms at 224 tokens and tens of ms at 32k, on every generate call)."""
  return tokenizer is other or dict(tokenizer.get_vocab()) == dict(other.get_vocab())


def _run_flat(spec, trees, target_leaves, drafter_leaves, packed_prompts):
  """`loop.run` on flat weight lists (trees: the static treedefs): the final `loop.Summary`."""
  target_params = jax.tree.unflatten(trees[0], target_leaves)
  drafter_params = None if trees[1] is None else jax.tree.unflatten(trees[1], drafter_leaves)
  ids, mask, key, _ = unpack_prompts(packed_prompts)
  return loop.summarize(spec, loop.run(spec, target_params, drafter_params, ids, mask, key))


_PROGRAM = transfer.Packed(_run_flat, num_static=2)  # its `loop.Summary` fetched as one array


def _program_name(spec: loop.LoopSpec) -> str:
  return f"gamma {spec.gamma}, {'greedy' if spec.settings.greedy else 'sampled'}"


def check_caches_fit(target: Model, drafters, batch: int, cache_length: int, max_new_tokens: int,
                     together: bool = True) -> None:
  """Refuses, before compiling, caches that cannot fit: the program would die allocating them.

  Args:
    target: the target (its cache is always held).
    drafters: the drafters whose caches the program holds (None entries: autoregressive).
    batch, cache_length: the caches' rows and positions (`LoopSpec.cache_length`).
    max_new_tokens: the setting named in the message.
    together: True when every drafter's cache is held at once (adaptive); False when only one
      runs at a time (a selected option): the largest then counts.

  Raises:
    ValueError: naming max_new_tokens, the caches' bytes, the memory that bounds them and the fix.
  """
  if cache_length > MAX_POSITIONS:
    raise ValueError(f"max_new_tokens={max_new_tokens}: the caches would need {cache_length} "
                     f"positions, beyond the loop's int32 positions ({MAX_POSITIONS}); lower "
                     "max_new_tokens.")
  free = memory.free_bytes(target.mesh)
  if free is None:
    return
  drafter_bytes = [memory.cache_bytes_per_device(d, batch, cache_length) for d in drafters if d is not None]
  needed = memory.cache_bytes_per_device(target, batch, cache_length) + (
      sum(drafter_bytes) if together else max(drafter_bytes, default=0))
  available, source = free
  if needed <= available:
    return
  per_position = needed / cache_length
  fitting = max(int(available / per_position) - (cache_length - max_new_tokens), 0)
  raise ValueError(
      f"max_new_tokens={max_new_tokens} needs K/V caches of {_size(needed)} per device ({cache_length} "
      f"positions x batch {batch}, target {target.name}"
      + (f" and {len(drafter_bytes)} drafter(s)" if drafter_bytes else "")
      + f") but there is {_size(available)} ({source}): lower max_new_tokens (about {fitting} "
      "fit at this batch and prompt length), the batch, or the dtype, or shard the target on a mesh.")


def _size(count: float) -> str:
  """Bytes in the largest binary unit that keeps the number >= 1 (KiB at least)."""
  for unit, scale in (("TiB", 1024 ** 4), ("GiB", 1024 ** 3), ("MiB", 1024 ** 2)):
    if count >= scale:
      return f"{count / scale:.2f} {unit}"
  return f"{count / 1024:.2f} KiB"


def compiled_program(function, static: tuple, args: tuple, description: str,
                     before_compile=None):
  """`function` compiled ahead of time for (static, batch, prompt bucket), cached and counted.

  Args:
    function: a pure function of (*static, *args); args[-1] is the packed prompt array.
    static: hashable compile-time arguments (specs, treedefs): part of the cache key. Weight
      treedefs follow from the decoders' graph definitions inside the specs.
    args: the array arguments (flat weight lists and the packed prompts).
    description: what the log line says about the program.
    before_compile: called only when the program must be compiled (a check whose answer a
      compiled program already gave: e.g. `check_caches_fit`).

  Returns:
    (compiled callable, compile seconds: 0.0 when it was cached).
  """
  batch, width = args[-1].shape
  cache_key = (static[0], batch, width)  # width: the prompt bucket (+ fixed columns)
  if cache_key in _COMPILED:
    return _COMPILED[cache_key], 0.0
  if before_compile is not None:
    before_compile()
  started = time.perf_counter()
  compiled = jax.jit(function, static_argnums=tuple(range(len(static)))).lower(
      *static, *args).compile()
  seconds = time.perf_counter() - started
  _COMPILED[cache_key] = compiled
  _COMPILE_SECONDS.append(seconds)
  log.info("compiled generation #%d (batch %d, packed prompt width %d, %s) in %.2fs",
           len(_COMPILE_SECONDS), batch, width, description, seconds)
  return compiled, seconds
