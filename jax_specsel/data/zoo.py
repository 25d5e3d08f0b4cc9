"""The world's model zoo: a T5 target and small distilled drafters, trained here, cached on disk.

  target              a T5 trained on every domain of the world (world references as labels).
  drafter_<domain>    a tiny T5 per drafter domain (translate, summarize), trained by
                      sequence-level knowledge distillation: on the target's greedy outputs for
                      that domain's training prompts, so it agrees with the target there only.
  drafter_general     the same tiny size, distilled on the target's outputs for translate and
                      summarize together (`ZooConfig.general_domains`).

No drafter is distilled on arithmetic: as with the paper's GSM8K, only the target is aligned there
and autoregressive decoding should win. The target is slower per step than a drafter only
because it is bigger; nothing else differs.

The grown target: the demo's budget trains a target of ~2M parameters, whose decode step sits in
the CPU's caches and is compute-bound, so verifying gamma + 1 tokens costs several steps and
speculation cannot pay. Every real target is memory-bound. So the trained target is widened
`ZooConfig.target_growth` times without changing its function (models/growth.py, Net2Net):
the grown model computes the trained one's logits up to float rounding, so the drafters distilled
on the trained target's outputs stay exactly as aligned, while each step moves k^2 times the
weights. The grown target is an ordinary HuggingFace checkpoint in the zoo's directory
(`target-grown-x<k>/`), made once from the trained one.

Cache: `<cache root>/zoo-<hash of world + zoo config>/` holds zoo.json (configs, sizes, training
records), tokenizer/ (save_pretrained) and models/<name>/ (orbax). It is written to a temporary
sibling and renamed into place, so a build killed half-way never looks complete.

This module builds or loads the zoo; the jobs live beside it: data/zoo_config.py (sizes and
budgets), data/zoo_store.py (the cache directory on disk), data/zoo_training.py (T5 training, the
target's greedy outputs for distillation), data/seq2seq.py (tokenized pairs as padded arrays).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from typing import Any

from jax_specsel.data import seq2seq, world as world_lib, zoo_store
from jax_specsel.data.zoo_config import GENERAL, TARGET, ZooConfig, drafter_name
from jax_specsel.data.zoo_store import ZooCacheError
from jax_specsel.data.zoo_training import greedy_generate, train_t5
from jax_specsel.models import growth, t5
from jax_specsel.models.interface import Model
from jax_specsel.models.loading import load_model

log = logging.getLogger(__name__)

ZOO_VERSION = 1  # bump when training changes so old caches are not reused


@dataclasses.dataclass
class Zoo:
  """The trained models of a world.

  Attributes:
    target: the big model (a `jax_specsel.Model`): the trained target grown
      `config.target_growth` times (the same function, k^2 the weights).
    drafters: name -> small `Model` (see `ZooConfig.drafter_names`).
    tokenizer: the shared word-level tokenizer.
    world: the `World` the zoo was trained on.
    config: the `ZooConfig`.
    directory: the cache directory the zoo lives in.
    from_cache: True when loaded without training.
    info: zoo.json: configs, parameter counts, training seconds and final losses per model.
    trained_target: the target as trained, before growth (None until `with_grown_target`).
  """

  target: Model
  drafters: dict[str, Model]
  tokenizer: Any
  world: world_lib.World
  config: ZooConfig
  directory: str
  from_cache: bool
  info: dict
  trained_target: Model | None = None

  @property
  def models(self) -> dict[str, Model]:
    return {TARGET: self.target, **self.drafters}


# ----------------------------------------------------------------------------- cache layout
def zoo_fingerprint(world: world_lib.World, config: ZooConfig) -> str:
  """A short hash of everything that determines the trained weights (not the target's growth)."""
  training = {k: v for k, v in config.to_dict().items() if k != "target_growth"}
  payload = json.dumps(
      {"version": ZOO_VERSION, "world": world.fingerprint(), "zoo": training}, sort_keys=True
  )
  return hashlib.sha256(payload.encode()).hexdigest()[:16]


def default_cache_root() -> str:
  """$XDG_CACHE_HOME/jax_specsel, else ~/.cache/jax_specsel."""
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(base, "jax_specsel")


def zoo_directory(world: world_lib.World, config: ZooConfig, cache_dir: str | None = None) -> str:
  """Where the zoo for (world, config) lives: `<cache_dir or default root>/zoo-<hash>`."""
  root = os.path.abspath(os.path.expanduser(cache_dir or default_cache_root()))
  return os.path.join(root, f"zoo-{zoo_fingerprint(world, config)}")


def build_zoo(
    world: world_lib.World,
    config: ZooConfig | None = None,
    cache_dir: str | None = None,
    progress: bool = True,
) -> Zoo:
  """Loads the zoo of (world, config) from the cache, or trains it and caches it.

  Args:
    world: the `World` whose train split the models learn.
    config: sizes and budgets (default `ZooConfig()`; `ZooConfig.tiny()` for tests).
    cache_dir: root directory of zoo caches (default `default_cache_root()`); the zoo itself goes
      to `<cache_dir>/zoo-<hash>`, so different configs never overwrite each other.
    progress: show tqdm bars with the loss while training.

  Returns:
    The `Zoo`; `zoo.from_cache` tells whether training was skipped. A cache directory that
    exists but cannot be loaded (corrupt, incomplete) is logged, deleted and rebuilt.
  """
  config = config or ZooConfig()
  unknown = [
      d for d in config.drafter_domains + (config.general_domains or ()) if d not in world.domains
  ]
  if unknown:
    raise ValueError(
        f"ZooConfig drafter/general domains {unknown} are not domains of this world "
        f"({world.domains})."
    )
  directory = zoo_directory(world, config, cache_dir)
  if os.path.isdir(directory):
    try:
      return with_grown_target(load_zoo(directory, world), config.target_growth)
    except ZooCacheError as err:
      log.warning("%s: rebuilding the zoo.", err)
      shutil.rmtree(directory, ignore_errors=True)
  os.makedirs(os.path.dirname(directory), exist_ok=True)
  zoo_store.remove_abandoned_partials(directory)
  partial = f"{directory}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}"
  try:
    target, drafters, info = train_zoo(world, config, progress)
    _save(partial, target, drafters, world, config, info)
    try:
      os.rename(partial, directory)
    except OSError:  # another process finished the same zoo first: keep theirs
      if not os.path.isdir(directory):
        raise
  finally:
    shutil.rmtree(partial, ignore_errors=True)
  zoo = load_zoo(directory, world)  # reading back what was written checks the save
  zoo.from_cache = False
  return with_grown_target(zoo, config.target_growth)


def with_grown_target(zoo: Zoo, factor: int) -> Zoo:
  """The zoo with its target widened `factor` times (`growth.grow_model`), the trained target kept
  as `zoo.trained_target`. The grown checkpoint is made once, in `<zoo>/target-grown-x<k>/`
  (written to a temporary sibling and renamed, so a killed growth never looks complete), and
  loaded from there afterwards. zoo.info["target_growth"] records both sizes.
  """
  trained = zoo.trained_target or zoo.target
  zoo.trained_target = trained
  zoo.config = dataclasses.replace(zoo.config, target_growth=factor)
  zoo.info["target_growth"] = {"factor": factor, "trained_params": int(trained.num_params)}
  if factor == 1:
    zoo.target = trained
    zoo.info["target_growth"]["params"] = int(trained.num_params)
    return zoo
  directory = os.path.join(zoo.directory, f"target-grown-x{factor}")
  if not os.path.isdir(directory):
    started = time.perf_counter()
    growth.grow_model(trained, factor, directory)
    log.info("grew the target %dx in %.1fs: %s", factor, time.perf_counter() - started, directory)
  try:
    zoo.target = load_model(directory, dtype=trained.config.dtype, name=TARGET)
  except Exception as err:  # a damaged grown checkpoint: remove it so the next build regrows it
    shutil.rmtree(directory, ignore_errors=True)
    raise ZooCacheError(
        f"{directory} (the grown target) could not be loaded and was removed; "
        f"run again to regrow it ({type(err).__name__}: {str(err)[:200]})"
    ) from err
  zoo.target.tokenizer = zoo.tokenizer  # the drafters' own tokenizer object
  zoo.info["target_growth"]["params"] = int(zoo.target.num_params)
  return zoo


def _save(directory: str, target: Model, drafters: dict[str, Model], world, config, info) -> None:
  """Writes the trained zoo with its record (configs, sizes, training facts) into `directory`."""
  models = {TARGET: target, **drafters}
  record = {
      "version": ZOO_VERSION,
      "fingerprint": zoo_fingerprint(world, config),
      "world_config": world.config.to_dict(),
      "zoo_config": config.to_dict(),
      "models": {
          name: {"t5_config": dataclasses.asdict(model.config), **info[name]}
          for name, model in models.items()
      },
      "distill_generate_seconds": info["distill_generate_seconds"],
  }
  zoo_store.write(directory, models, world.tokenizer(), record)


def load_zoo(directory: str, world: world_lib.World) -> Zoo:
  """Loads a cached zoo directory (written by `build_zoo`) for `world`.

  Args:
    directory: a `zoo-<hash>` directory.
    world: the world it was trained on (checked against the saved world config).

  Returns:
    The `Zoo` with `from_cache=True`.

  Raises:
    ZooCacheError: the directory is incomplete, corrupt or belongs to another world or version.
  """
  record = zoo_store.read_record(directory)
  if (
      record.get("version") != ZOO_VERSION
      or world_lib.WorldConfig.from_dict(record.get("world_config", {})) != world.config
  ):
    raise ZooCacheError(
        f"{directory} was built by zoo version {record.get('version')} for another " "world config"
    )
  config = ZooConfig.from_dict(record["zoo_config"])
  try:
    tokenizer, models = zoo_store.read_models(
        directory,
        {
            name: t5.Config.from_dict(record["models"][name]["t5_config"])
            for name in (TARGET,) + config.drafter_names()
        },
    )
  except Exception as err:  # orbax / tokenizers raise many types for missing or truncated files
    raise ZooCacheError(
        f"{directory} is incomplete or corrupt ({type(err).__name__}: " f"{str(err)[:200]})"
    ) from err
  target = models.pop(TARGET)
  return Zoo(
      target=target,
      drafters=models,
      tokenizer=tokenizer,
      world=world,
      config=config,
      directory=directory,
      from_cache=True,
      info=record,
  )


# ----------------------------------------------------------------------------- training


def train_zoo(world: world_lib.World, config: ZooConfig, progress: bool):
  """Trains the target, labels training prompts with its greedy outputs, distills drafters."""
  tokenizer = world.tokenizer()
  vocab_size = seq2seq.round_up(len(tokenizer), 8)
  train = {domain: world.split("train", domain) for domain in world.domains}
  target_data = {
      domain: seq2seq.encode_pairs(
          tokenizer,
          [e["prompt"] for e in examples],
          tokenizer([e["reference"] for e in examples])["input_ids"],
      )
      for domain, examples in train.items()
  }
  if config.shared_batch_shape:
    target_data = seq2seq.pad_to_common_shape(target_data)
  module, target_record = train_t5(
      config.target,
      target_data,
      vocab_size,
      config.seed,
      TARGET,
      config.dtype,
      progress,
      dict(config.target_domain_weights),
  )
  target = Model(module, tokenizer=tokenizer, name=TARGET)
  info = {TARGET: target_record}
  started = time.perf_counter()
  distill = _distillation_data(target, train, world, config)
  info["distill_generate_seconds"] = round(time.perf_counter() - started, 2)
  if config.shared_batch_shape:
    distill = seq2seq.pad_to_common_shape(distill)
  drafters, records = _distill_drafters(distill, tokenizer, world, config, vocab_size, progress)
  info.update(records)
  return target, drafters, info


def _distillation_data(
    target: Model, train: dict, world: world_lib.World, config: ZooConfig
) -> dict:
  """Sequence-level distillation data per domain: the target's own greedy outputs for that
  domain's training prompts, not the references."""
  tokenizer = target.tokenizer
  distill = {}
  needed = set(config.drafter_domains) | set(config.general_domains or world.domains)
  for domain in (d for d in world.domains if d in needed):
    prompts = [e["prompt"] for e in train[domain][: config.distill_per_domain]]
    outputs = greedy_generate(
        target, tokenizer(prompts)["input_ids"], config.max_new_tokens, config.generate_batch_size
    )
    distill[domain] = seq2seq.encode_pairs(tokenizer, prompts, outputs)
  return distill


def _distill_drafters(
    distill: dict,
    tokenizer,
    world: world_lib.World,
    config: ZooConfig,
    vocab_size: int,
    progress: bool,
) -> tuple[dict[str, Model], dict[str, dict]]:
  """Trains each domain drafter and the general drafter on the distillation data: (name -> drafter,
  name -> its training record)."""
  drafters, records = {}, {}
  steps = dict(config.drafter_steps)
  plan = [
      (
          drafter_name(d),
          dataclasses.replace(
              config.domain_drafter, train_steps=steps.get(d, config.domain_drafter.train_steps)
          ),
          {d: distill[d]},
      )
      for d in config.drafter_domains
  ]
  general = config.general_domains or world.domains
  plan.append((drafter_name(GENERAL), config.general_drafter, {d: distill[d] for d in general}))
  for index, (name, spec, data) in enumerate(plan, start=1):
    module, record = train_t5(
        spec, data, vocab_size, config.seed + index, name, config.dtype, progress
    )
    record["distilled_on"] = sorted(data)
    drafters[name], records[name] = Model(module, tokenizer=tokenizer, name=name), record
  return drafters, records
