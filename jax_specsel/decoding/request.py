"""What a generation request must satisfy, and its prompts packed for the device.

Every entry point (`generate`, `generate_selected`, `generate_adaptive`) checks its settings,
models, drafters and policy here, before anything is compiled or run, and pads and packs its
prompts here: one upload per call, into a prompt bucket that a compiled program is reused for.
"""

from __future__ import annotations

import functools
import logging
import os
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from jax_specsel import sharding, token_batches, validation
from jax_specsel.models import interface
from jax_specsel.models.interface import Model

log = logging.getLogger(__name__)

AUTOREGRESSIVE = "autoregressive"  # the option name of plain decoding, next to the drafters' names
MIN_BUCKET = 8
# Sampling temperatures in (0, this) are refused: logits / temperature leave float32's useful
# range; 0 is greedy, their limit.
MIN_SAMPLING_TEMPERATURE = 1e-4
VOCABULARY_WARNED: set = set()  # (target, drafter) pairs already warned about: warned once each


class PositionLimitWarning(UserWarning):
  """A decoder-only generation runs past the model's max_position_embeddings (it goes on)."""


class VocabularyWarning(UserWarning):
  """A drafter's vocabulary size differs from the target's and no tokenizers can show that the
  ids mean the same text (generation goes on; `assume_shared_vocabulary=True` states it)."""


def check_settings(gamma, temperature, top_k, top_p, max_new_tokens) -> None:
  """Raises TypeError / ValueError naming the first bad setting (whole numbers stay whole)."""
  validation.integer("gamma", gamma, minimum=0)  # >= 1 with a drafter: `checked_drafter`
  temperature = validation.real("temperature", temperature)
  if temperature < 0:
    raise ValueError(f"temperature={temperature}: must be >= 0 (0 means greedy decoding).")
  if 0 < temperature < MIN_SAMPLING_TEMPERATURE:
    raise ValueError(
        f"temperature={temperature}: positive temperatures below "
        f"{MIN_SAMPLING_TEMPERATURE} are refused (logits / temperature leave "
        "float32's working range in the sampling step and the output is garbage); "
        "pass temperature=0 for greedy decoding (their limit) or a temperature >= "
        f"{MIN_SAMPLING_TEMPERATURE}."
    )
  validation.integer("top_k", top_k, minimum=0)
  if not 0 < validation.real("top_p", top_p) <= 1:
    raise ValueError(f"top_p={top_p}: must be in (0, 1] (1 disables the nucleus filter).")
  validation.integer("max_new_tokens", max_new_tokens, minimum=1)


def check_request(target, gamma, temperature, top_k, top_p, max_new_tokens) -> None:
  """Every entry point's first checks: the settings (`check_settings`), then the target."""
  check_settings(gamma, temperature, top_k, top_p, max_new_tokens)
  check_target(target)


def check_target(target) -> None:
  """Raises TypeError unless the target is a `Model`."""
  if not isinstance(target, Model):
    raise TypeError(
        f"target is {_describe(target)}: pass a jax_specsel Model "
        "(jax_specsel.load_model(path))."
    )


def checked_drafter(
    target: Model, drafter, gamma, assume_shared_vocabulary: bool = False, name: str | None = None
) -> Model:
  """The drafter, checked and placed where the target is: every entry point's drafter check.

  Args:
    target: a checked target.
    drafter: what the caller passed as a drafter.
    gamma: the draft length it would run with (a speculative round drafts at least one token).
    assume_shared_vocabulary: as for `check_compatible`.
    name: its key in a `drafters` mapping, or None for `generate`'s `drafter` argument (the
      messages name it as the caller passed it).

  Returns:
    The drafter, replicated onto the target's mesh if it sits on one device next to a sharded
    target (`drafter_for`).

  Raises:
    TypeError: not a `Model`. ValueError: gamma < 1, or a drafter that cannot draft for the target.
  """
  if not isinstance(drafter, Model):
    if name is not None:
      raise TypeError(f"drafters[{name!r}] is a {type(drafter).__name__}, not a jax_specsel Model.")
    raise TypeError(
        f"drafter is {_describe(drafter)}: pass a jax_specsel Model "
        "(jax_specsel.load_model(path) or target.early_exit(layers)), or None for "
        "autoregressive decoding."
    )
  if int(gamma) < 1:
    raise ValueError(
        f"gamma={gamma} with drafter {drafter.name}: a speculative round drafts "
        "gamma >= 1 tokens; pass drafter=None for autoregressive decoding."
    )
  drafter = drafter_for(target, drafter)
  check_compatible(target, drafter, assume_shared_vocabulary)
  return drafter


def _describe(value) -> str:
  text = repr(value)
  return f"{type(value).__name__} {text if len(text) <= 60 else text[:57] + '...'}"


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
    raise ValueError(
        f"drafter {drafter.name} is on mesh {_mesh_name(drafter)} but target "
        f"{target.name} on {_mesh_name(target)}: a drafter on one device is "
        "replicated onto the target's mesh automatically, one on another mesh is "
        "not. Load the drafter on one device, or place it with "
        "jax_specsel.shard_model(drafter, target.mesh, replicated=True)."
    )
  if drafter.is_encoder_decoder != target.is_encoder_decoder:
    raise ValueError(
        f"drafter {drafter.name} and target {target.name} must both be "
        "encoder-decoder or both decoder-only."
    )
  if target.tokenizer is not None and drafter.tokenizer is not None:
    if not _same_vocabulary(target.tokenizer, drafter.tokenizer):
      raise ValueError(
          f"drafter {drafter.name} and target {target.name} have different "
          "tokenizers: speculative decoding needs a shared vocabulary (ids must mean "
          "the same text)."
      )
    return
  if drafter.eos_ids and target.eos_ids and not set(drafter.eos_ids) & set(target.eos_ids):
    raise ValueError(
        f"drafter {drafter.name} stops on ids {list(drafter.eos_ids)} but target "
        f"{target.name} on {list(target.eos_ids)} (no eos/pad id in common): "
        "different tokenizers."
    )
  if abs(target.vocab_size - drafter.vocab_size) > 256:
    raise ValueError(
        f"vocabulary sizes differ by more than padding ({drafter.vocab_size} vs "
        f"{target.vocab_size}): the drafter's tokenizer cannot be the target's."
    )
  if drafter.vocab_size != target.vocab_size and not assume_shared_vocabulary:
    _warn_unchecked_vocabulary(target, drafter)


def _warn_unchecked_vocabulary(target: Model, drafter: Model) -> None:
  """Logs and warns, once per pair, that nothing shows the drafter's ids mean the target's text."""
  pair = (target.name, drafter.name, target.vocab_size, drafter.vocab_size)
  if pair in VOCABULARY_WARNED:
    return
  VOCABULARY_WARNED.add(pair)
  missing = [m.name for m in (target, drafter) if m.tokenizer is None]
  verb = "carry" if len(missing) > 1 else "carries"
  message = (
      f"drafter {drafter.name} has vocab_size {drafter.vocab_size} but target "
      f"{target.name} {target.vocab_size}, and {' and '.join(missing)} {verb} "
      "no tokenizer to compare: nothing checks that the ids mean the same text. Generation "
      "goes on assuming they do (the output keeps the target's distribution; a drafter with "
      "another vocabulary only gets its drafts rejected). Load the models with their "
      "tokenizer files to check it, or pass assume_shared_vocabulary=True to state it."
  )
  log.warning("%s", message)
  # Points at the caller of the entry point: here <- check_compatible <- checked_drafter <- it.
  warnings.warn(VocabularyWarning(message), stacklevel=5)


def _mesh_name(model: Model) -> str:
  return "one device" if model.mesh is None else str(dict(model.mesh.shape))


@functools.lru_cache(maxsize=32)
def _same_vocabulary(tokenizer, other) -> bool:
  """Whether two tokenizers map the same strings to the same ids (cached per pair: building the
  vocabulary dicts of a large tokenizer is too slow to repeat on every call)."""
  return tokenizer is other or dict(tokenizer.get_vocab()) == dict(other.get_vocab())


def policy_option_names(target: Model, policy, caller: str) -> list[str]:
  """The policy's option names, after checking it is a policy, has some and reads this target's
  embeddings."""
  _check_is_policy(policy, caller)
  names = getattr(policy, "option_names", None)
  if not names:
    raise ValueError(
        "the policy has no option names: train it with option_names (drafter names "
        f"and/or '{AUTOREGRESSIVE}') so {caller} knows what each option means."
    )
  if policy.input_dim != target.hidden_size:
    raise ValueError(
        f"the policy reads embeddings of width {policy.input_dim} but target "
        f"{target.name} embeds queries with width {target.hidden_size}: train the "
        "policy on this target's embeddings."
    )
  return list(names)


def _check_is_policy(policy, caller: str) -> None:
  """Refuses what is not a trained policy (None, a path, anything without the policy's program)."""
  if all(hasattr(policy, attribute) for attribute in ("option_names", "program", "input_dim")):
    return
  if isinstance(policy, (str, os.PathLike)):
    path = os.fspath(policy)
    raise TypeError(
        f"{caller}: policy={path!r} is a path, not a Policy: load it first, "
        f"policy = jax_specsel.bandit.load_policy({path!r})."
    )
  kind = "None" if policy is None else type(policy).__name__
  raise TypeError(
      f"{caller}: policy is {kind}: pass a trained jax_specsel.bandit.Policy, e.g. "
      "jax_specsel.bandit.load_policy(path) (one saved by train_policy), or train one "
      "with jax_specsel.bandit.train_policy."
  )


def warn_past_position_limit(target: Model, drafters, mask: np.ndarray, max_new_tokens) -> None:
  """Warns, as transformers does, when a decoder-only model runs past max_position_embeddings.

  transformers' generate goes on with a warning ("you may observe exceptions, performance
  degradation, or nothing at all"): rotary positions extrapolate, they are just untrained.
  T5's relative positions have no such limit. Each model (by name) is named at most once.

  Args:
    target: the target. drafters: the drafters the program holds (None entries: autoregressive).
    mask: the padded prompts' mask. max_new_tokens: the setting.
  """
  needed = int(mask.sum(axis=1).max()) + int(max_new_tokens)
  seen = set()
  for model in (target, *drafters):
    if model is None or model.is_encoder_decoder or not model.max_positions or model.name in seen:
      continue
    seen.add(model.name)
    if needed > model.max_positions:
      # stacklevel: here <- programs.run <- the entry point <- its caller.
      warnings.warn(
          PositionLimitWarning(
              f"the longest prompt plus max_new_tokens={int(max_new_tokens)} needs {needed} positions "
              f"but {model.name} was trained on max_position_embeddings={model.max_positions}: "
              "generation goes on (as in transformers), but output past that position may degrade; "
              "shorten the prompt or lower max_new_tokens."
          ),
          stacklevel=4,
      )


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


def pad_prompts(prompt_ids, attention_mask, target: Model):
  """Right-pads prompts to their bucket (`bucket_length`) in numpy: no device op per new length.

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
    raise ValueError(
        f"empty prompt in row(s) {np.flatnonzero(lengths == 0).tolist()}: every row "
        "needs at least one real token (for decoder-only models, e.g. the BOS token)."
    )
  limit = target.max_positions
  if limit and lengths.max() > limit:
    raise ValueError(
        f"a prompt has {int(lengths.max())} tokens but {target.name} supports at most "
        f"{limit} positions (max_position_embeddings): truncate the prompt."
    )
  out_of_vocab = mask.astype(bool) & ((ids < 0) | (ids >= target.vocab_size))
  if out_of_vocab.any():
    rows = np.unique(np.nonzero(out_of_vocab)[0])
    raise ValueError(
        f"prompt ids must lie in [0, {target.vocab_size}) for {target.name}; row(s) "
        f"{rows[:5].tolist()} hold {ids[out_of_vocab][:5].tolist()}: tokenize with "
        "the model's own tokenizer."
    )
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
  names, so this only ever makes a valid call cheaper."""
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
      ids[i, : len(row)], mask[i, : len(row)] = row, 1
  except OverflowError:  # an id past int32
    return None
  real = ids[mask > 0]
  if real.min() < 0 or real.max() >= target.vocab_size:
    return None
  return ids, mask


def place_prompts(
    target: Model, ids: np.ndarray, mask: np.ndarray, seed, flags: tuple[int, ...] = ()
) -> np.ndarray | jax.Array:
  """The prompts, their lengths, the seed and run-time flags as one int32 array: one upload.

  Columns 0..S-1 hold the right-padded ids, column S each row's length (the mask is rebuilt from
  it inside the program), column S+1 the seed's uint32 bits (the key is made inside the compiled
  program, since building it outside is a device dispatch of its own), then one column per flag
  (the same value on every row). Split on the mesh's data axis when the target is sharded.
  """
  seed = validation.integer("seed", seed)
  if not 0 <= seed < 2**32:
    raise ValueError(f"seed={seed}: must be in [0, 2**32).")
  lengths = mask.sum(axis=1)  # pad_prompts puts each row's real tokens first
  width = ids.shape[1]
  packed = np.empty((ids.shape[0], width + 2 + len(flags)), np.int32)
  packed[:, :width], packed[:, width] = ids, lengths
  packed[:, width + 1] = np.uint32(seed).view(np.int32)
  packed[:, width + 2 :] = flags
  return packed if target.mesh is None else sharding.place_batch(packed, target.mesh)


def unpack_prompts(packed: jax.Array, num_flags: int = 0):
  """Inside the program: (ids [B, S], mask [B, S], PRNG key, flags [num_flags]) from
  `place_prompts`' array (flags read from row 0)."""
  width = packed.shape[1] - 2 - num_flags
  ids, lengths = packed[:, :width], packed[:, width]
  mask = (jnp.arange(width)[None, :] < lengths[:, None]).astype(jnp.int32)
  seed = jax.lax.bitcast_convert_type(packed[0, width + 1], jnp.uint32)
  return ids, mask, jax.random.PRNGKey(seed), packed[0, width + 2 :]
