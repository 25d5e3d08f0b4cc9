"""HuggingFace checkpoint directories: find them, read config.json and generation_config.json, and
the errors every checkpoint reader raises (imports only validation.py from the package).

Stop, pad and decoder-start ids are resolved once, here, the way transformers' `generate` resolves
them (`generation_ids`): generation_config.json when the checkpoint has one, else config.json.

Config fields are checked by type and range as they are read (`config_integer`, `config_real`,
`config_flag`), before any module is built: a wrong one raises InvalidConfigError naming the file,
the field, the value and the fix.

The weight files themselves are read by models/checkpoint_tensors.py. `identity` and `transpose`
are the tensor transforms the architectures' weight maps name (a stored tensor -> the module's
parameter); `inverse` gives the transform back (models/hf_export.py).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os

import jax.numpy as jnp
import numpy as np

from jax_specsel import validation

log = logging.getLogger(__name__)

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
GENERATION_CONFIG = "generation_config.json"
_HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "pytorch_model*.bin"]


class CheckpointNotFoundError(FileNotFoundError):
  """The directory, weight file or hub snapshot does not exist (or is not cached offline)."""


class InvalidConfigError(ValueError):
  """config.json or generation_config.json holds a value that cannot be right (e.g. a stop id
  outside the vocabulary, or a file that is not JSON)."""


class CorruptCheckpointError(ValueError):
  """A checkpoint file cannot be parsed (truncated, overwritten) or holds NaN / inf weights."""


@dataclasses.dataclass(frozen=True)
class GenerationIds:
  """The special ids transformers' `generate` uses for a checkpoint (see `generation_ids`)."""

  eos_token_ids: tuple[int, ...]  # stop ids; empty: every row runs to max_new_tokens
  pad_token_id: int  # fills rows after they stop
  decoder_start_token_id: int | None  # None: neither decoder_start_token_id nor bos_token_id set
  source: str  # the file the ids were read from


REQUIRED = object()  # a `default` that makes a config field required


def config_integer(
    fields: dict, name: str, default, minimum: int | None = 1, source: str = "config.json"
) -> int | None:
  """`fields[name]` as a whole number >= `minimum`, checked before any module is built.

  Args:
    fields: the parsed config.json (or a nested dict of it).
    name: the field; how it is called in the message (dotted for a nested dict's field).
    default: returned when the field is absent or null; REQUIRED: an absent field is a KeyError
      (the loader names it as a missing field).
    minimum: the smallest accepted value (sizes: 1; ids: 0; None: no bound).
    source: the file, for the message.

  Raises:
    InvalidConfigError: a string, bool, fraction or value below `minimum`, naming the file, the
      field, the value and the fix.
  """
  value = _field(fields, name, default)
  if value is None:
    return None
  try:
    return validation.integer(name, value, minimum)
  except (TypeError, ValueError) as err:
    raise _invalid_field(
        source, name, err, "a whole number" + ("" if minimum is None else f" >= {minimum}")
    ) from None


def config_real(
    fields: dict, name: str, default, positive: bool = False, source: str = "config.json"
) -> float:
  """`fields[name]` as a finite number (> 0 with `positive`, else >= 0); as `config_integer`."""
  value = _field(fields, name, default)
  try:
    result = validation.real(name, value, low=0.0)
  except (TypeError, ValueError) as err:
    raise _invalid_field(source, name, err, "a finite number >= 0") from None
  if positive and result == 0:
    raise _invalid_field(
        source, name, ValueError(f"{name}={value!r}: must be > 0."), "a number > 0"
    )
  return result


def config_flag(
    fields: dict, name: str, default: bool | None, source: str = "config.json"
) -> bool | None:
  """`fields[name]` as a bool: JSON true / false only ("false" as a string would read as True)."""
  value = fields.get(name)
  if value is None:
    return default
  if not isinstance(value, (bool, np.bool_)):
    raise _invalid_field(
        source,
        name,
        TypeError(f"{name}={value!r} ({type(value).__name__}): " "must be true or false."),
        "true or false",
    )
  return bool(value)


def _field(fields: dict, name: str, default):
  key = name.rpartition(".")[2]
  value = fields.get(key)
  if value is None:
    if default is REQUIRED:
      raise KeyError(key)
    return default
  return value


def _invalid_field(source: str, name: str, err: Exception, wanted: str) -> InvalidConfigError:
  kind = "JSON true or false" if wanted == "true or false" else "a JSON number"
  return InvalidConfigError(
      f"{source}: {err} Fix {name} in {source}: it must be {wanted} ({kind}, "
      "not a string); restore the value from the checkpoint's source."
  )


_ID_FIELDS = ("eos_token_id", "pad_token_id", "decoder_start_token_id", "bos_token_id")


def generation_ids(
    hf_config: dict, generation_config: dict | None, vocab_size: int
) -> GenerationIds:
  """Stop, pad and decoder-start ids exactly as transformers 5.23 `generate` resolves them.

  transformers' `from_pretrained` takes the generation config from generation_config.json when
  the checkpoint has one, and then ignores the ids in config.json; otherwise it builds it from the
  raw config.json (`GenerationConfig.from_model_config`): an id that is null *or absent* there
  stays unset (the architecture's class default is not used), and a nested "decoder" /
  "generator" / "text_config" dict fills ids the top level leaves unset. `eos_token_id` may be
  one id or a list (several stop ids). In `generate` (`_prepare_special_tokens`) an unset pad id
  becomes the first stop id, and an encoder-decoder model starts from `bos_token_id` when
  `decoder_start_token_id` is unset.

  Where transformers has no pad id at all (no pad and no stop id) this returns 0: without stop
  ids no row ends early, so the pad id only fills masked prompt positions and is never emitted.
  A pad id outside the vocabulary (some configs say -1) is treated the same way as an unset one.

  Args:
    hf_config: the parsed config.json.
    generation_config: the parsed generation_config.json, or None when the checkpoint has none.
    vocab_size: the model's vocabulary size.

  Returns:
    The GenerationIds.

  Raises:
    InvalidConfigError: a stop id outside [0, vocab_size), naming the file and field.
  """
  if generation_config is not None:
    fields, source = generation_config, GENERATION_CONFIG
  else:
    fields, source = _model_config_ids(hf_config), "config.json"
  eos_ids = _stop_ids(fields, source, vocab_size)
  pad = config_integer(fields, "pad_token_id", None, None, source)
  if pad is not None and not 0 <= pad < vocab_size:
    log.info(
        "%s: pad_token_id=%s is outside the vocabulary [0, %d); treated as unset",
        source,
        pad,
        vocab_size,
    )
    pad = None
  if pad is None:
    pad = eos_ids[0] if eos_ids else 0
  start = config_integer(fields, "decoder_start_token_id", None, 0, source)
  start = config_integer(fields, "bos_token_id", None, 0, source) if start is None else start
  return GenerationIds(eos_ids, pad, start, source)


def _stop_ids(fields: dict, source: str, vocab_size: int) -> tuple[int, ...]:
  """The stop ids of `eos_token_id` (one id, a list, or null), each checked to be in the
  vocabulary."""
  eos = fields.get("eos_token_id")
  eos_list = eos if isinstance(eos, (list, tuple)) else [eos]
  eos_ids = (
      ()
      if eos is None
      else tuple(
          config_integer({"eos_token_id": e}, "eos_token_id", None, None, source) for e in eos_list
      )
  )
  outside = [e for e in eos_ids if not 0 <= e < vocab_size]
  if outside:
    raise InvalidConfigError(
        f"{source}: eos_token_id={eos!r} has stop id(s) {outside} outside the vocabulary "
        f"[0, {vocab_size}) (vocab_size in config.json); the model can never emit them. Fix "
        f"eos_token_id in {source} (null or [] means: no stop id, run to max_new_tokens)."
    )
  return eos_ids


def _model_config_ids(hf_config: dict) -> dict:
  """The ids `GenerationConfig.from_model_config` takes from a raw config.json dict."""
  fields = {key: hf_config[key] for key in _ID_FIELDS if hf_config.get(key) is not None}
  for nested_name in ("decoder", "generator", "text_config"):  # the first one present, as HF
    nested = hf_config.get(nested_name)
    if nested:
      if isinstance(nested, dict):
        fields = {**{k: nested[k] for k in _ID_FIELDS if nested.get(k) is not None}, **fields}
      break
  return fields


def eos_field(eos_token_ids: tuple[int, ...]) -> int | list[int] | None:
  """The stop ids as config.json / generation_config.json write `eos_token_id` (one id or a list;
  None for no stop id), which `generation_ids` reads back as the same tuple."""
  if not eos_token_ids:
    return None
  return int(eos_token_ids[0]) if len(eos_token_ids) == 1 else [int(e) for e in eos_token_ids]


def read_generation_config(directory: str) -> dict | None:
  path = os.path.join(directory, GENERATION_CONFIG)
  if not os.path.isfile(path):
    return None
  try:
    with open(path) as f:
      parsed = json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as err:
    # transformers silently falls back to config.json here; a different set of stop ids is
    # exactly the kind of silent change this loader refuses.
    raise InvalidConfigError(
        f"{path} is not valid JSON ({err}); fix or delete it (without it "
        "the stop ids come from config.json)."
    ) from err
  if not isinstance(parsed, dict):
    raise InvalidConfigError(f"{path} must hold a JSON object, got {type(parsed).__name__}.")
  return parsed


def read_hf_config(path_or_id: str) -> dict:
  """config.json of a local checkpoint directory or a hub id, without fetching any weights.

  Raises:
    CheckpointNotFoundError: no such directory, or the hub id is neither cached nor reachable.
  """
  path = os.path.expanduser(str(path_or_id))
  if os.path.isdir(path) or os.path.exists(path) or _looks_like_path(path):
    return read_config(resolve_checkpoint_dir(path))
  import huggingface_hub

  offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
  try:
    config_path = huggingface_hub.hf_hub_download(path, "config.json", local_files_only=offline)
  except Exception as err:  # the hub raises several classes for "not cached" / "no network"
    raise CheckpointNotFoundError(
        f"cannot get config.json of {path!r} ({type(err).__name__}): "
        + ("HF_HUB_OFFLINE=1 and it is not cached; " if offline else "")
        + "pass a local checkpoint directory, or download it with huggingface-cli."
    ) from err
  return read_json(config_path, "config.json")


def resolve_checkpoint_dir(path_or_id: str) -> str:
  """A local directory holding the checkpoint: the path itself, or a hub snapshot."""
  path = os.path.expanduser(str(path_or_id))
  if os.path.isdir(path):
    return path
  if os.path.exists(path):
    raise CheckpointNotFoundError(
        f"{path} is a file; pass the checkpoint directory that holds "
        "config.json and the weight files."
    )
  if _looks_like_path(path):
    raise CheckpointNotFoundError(
        f"checkpoint directory {path} does not exist; pass a directory "
        "with config.json and model.safetensors, or a hub id like "
        "org/name."
    )
  return _hub_snapshot(path)


def _looks_like_path(text: str) -> bool:
  return text.startswith(("/", ".", "~")) or text.endswith("/") or text.count("/") > 1


def _hub_snapshot(repo_id: str) -> str:
  import huggingface_hub

  offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
  try:
    return huggingface_hub.snapshot_download(
        repo_id, allow_patterns=_HUB_PATTERNS, local_files_only=offline
    )
  except Exception as err:  # the hub raises several classes for "not cached" / "no network"
    hint = (
        "HF_HUB_OFFLINE=1 is set and it is not in the local cache: download it on a machine "
        "with network (huggingface-cli download " + repo_id + ") or pass a local directory."
        if offline
        else "check the id, your network and your token, or pass a local directory."
    )
    raise CheckpointNotFoundError(
        f"cannot get hub checkpoint {repo_id!r} ({type(err).__name__}): " f"{hint}"
    ) from err


def read_config(directory: str) -> dict:
  path = os.path.join(directory, "config.json")
  if not os.path.isfile(path):
    raise CheckpointNotFoundError(
        f"{path} is missing: a HuggingFace checkpoint directory needs "
        "config.json next to its weights."
    )
  return read_json(path, "config.json")


def read_json(path: str, what: str) -> dict:
  """A checkpoint's JSON object; CorruptCheckpointError naming the file when it cannot be parsed."""
  try:
    with open(path) as f:
      value = json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as err:
    raise CorruptCheckpointError(
        f"{path} is not valid JSON ({err}): the {what} is truncated or "
        "was edited by hand; restore it from the checkpoint's source "
        "(e.g. huggingface-cli download ... --force-download)."
    ) from None
  if not isinstance(value, dict):
    raise CorruptCheckpointError(
        f"{path} holds a JSON {type(value).__name__}, not an object: "
        f"this is not a {what}; restore it from the checkpoint's source."
    )
  return value


def identity(x):
  return x


def transpose(x):
  return x.T


# Each weight-map transform -> the one that undoes it (a parameter -> the stored tensor).
_INVERSES = {identity: identity, transpose: transpose}


def inverse(transform):
  """The transform that undoes a weight-map transform.

  Args:
    transform: a transform an architecture's `hf_weight_map` names (`identity`, `transpose`).

  Returns:
    The function mapping the module's parameter back to the stored HuggingFace tensor.

  Raises:
    ValueError: a transform with no registered inverse (add it to `_INVERSES`).
  """
  try:
    return _INVERSES[transform]
  except (KeyError, TypeError):
    raise ValueError(
        f"weight-map transform {transform!r} has no inverse: register one in "
        "jax_specsel/models/checkpoint.py _INVERSES to export such "
        "parameters."
    ) from None
