"""The embedded default world end to end (what `make demo` runs)."""

from __future__ import annotations

import logging
import os
import time

import datasets
import ml_collections
import numpy as np

from jax_specsel import config_checks, pipeline, validation
from jax_specsel.data import tasks, world as world_lib
from jax_specsel.eval import checks

log = logging.getLogger(__name__)

_WORLD_METRICS = {
    world_lib.TRANSLATE: "bleu",
    world_lib.SUMMARIZE: "rouge_l",
    world_lib.ARITHMETIC: "exact_text",  # digits are separate words: whole answer
    world_lib.MIXED: "rouge_l",
}


def register_world_tasks() -> None:
  """Makes the world's domains known to the task registry (metrics for the tables)."""
  for domain, metric in _WORLD_METRICS.items():
    tasks.register_task(
        tasks.Task(
            name=domain,
            template="{input}",
            source_field="prompt",
            target_field="reference",
            metric=metric,
        ),
        overwrite=True,
    )


def world_examples(world, split: str, per_domain: int) -> datasets.Dataset:
  rows = []
  for domain in world.domains:
    for example in world.split(split, domain)[:per_domain]:
      rows.append(
          {
              "id": example["id"],
              "task": domain,
              "prompt": example["prompt"],
              "reference": example["reference"],
          }
      )
  return datasets.Dataset.from_list(rows)


def check_demo_config(config: ml_collections.ConfigDict) -> str:
  """Raises ValueError naming the first bad field; returns the (writable) output directory.

  Runs before the zoo, the collection and the evaluation, so a bad value never leaves a stale
  report beside new files.
  """
  config_checks.check_config(config, models=False)
  if config.get("zoo") not in ("default", "tiny"):
    raise ValueError(f"config.zoo={config.get('zoo')!r}: choose 'default' or 'tiny'.")
  for field in ("collect_per_domain", "test_per_domain"):
    try:
      validation.integer(f"config.{field}", config.get(field), minimum=1)
    except TypeError as err:
      raise ValueError(str(err)) from None
  if config.get("cache_dir"):
    validation.writable_directory(config.cache_dir, "config.cache_dir")
  return validation.writable_directory(config.output_dir, "config.output_dir")


def run_demo(config: ml_collections.ConfigDict) -> str:
  """Runs everything; returns the report directory.

  Raises:
    ValueError: a bad config field or an unwritable directory, before any work.
  """
  from jax_specsel.data import zoo as zoo_lib

  output_dir = check_demo_config(config)
  started = time.perf_counter()
  enable_compilation_cache(config.cache_dir or None)
  world = world_lib.World(seed=config.seed)
  zoo_config = zoo_lib.ZooConfig.tiny() if config.zoo == "tiny" else zoo_lib.ZooConfig()
  zoo = zoo_lib.build_zoo(world, zoo_config, cache_dir=config.cache_dir or None)
  log.info(
      "zoo ready after %.0fs: target %s, drafters %s",
      time.perf_counter() - started,
      zoo.target,
      list(zoo.drafters),
  )
  register_world_tasks()
  train = world_examples(world, "train", config.collect_per_domain)
  test = world_examples(world, "test", config.test_per_domain)
  expectations = checks.Expectations(
      drafter_domains={zoo_lib.drafter_name(d): d for d in zoo_config.drafter_domains},
      autoregressive_domains=tuple(
          d for d in world.domains if d not in zoo_config.drafter_domains + (world_lib.MIXED,)
      ),
      mixed_domains=tuple(d for d in world.domains if d == world_lib.MIXED),
  )
  pipeline.run(
      zoo.target,
      zoo.drafters,
      train,
      test,
      config,
      output_dir,
      expectations,
      provenance=growth_provenance(zoo, test),
  )
  log.info("demo finished in %.0fs", time.perf_counter() - started)
  return output_dir


def enable_compilation_cache(cache_dir: str | None = None) -> str:
  """Keeps compiled XLA programs on disk beside the zoo (`<cache root>/xla`), so a rerun loads
  the demo's generation programs instead of compiling them again. Compilation is never part of
  a timed call (`generate` compiles ahead of time); this only shortens the run."""
  import jax
  from jax_specsel.data import zoo as zoo_lib

  directory = os.path.join(
      os.path.abspath(os.path.expanduser(cache_dir or zoo_lib.default_cache_root())), "xla"
  )
  os.makedirs(directory, exist_ok=True)
  jax.config.update("jax_compilation_cache_dir", directory)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
  return directory


def growth_provenance(zoo, examples: datasets.Dataset, count: int = 8) -> str:
  """A sentence for the report: how the target was grown, with the function check measured now
  (the largest logit difference between the trained and the grown target on `count` test
  prompts, teacher-forced on their references)."""
  grown = zoo.info.get("target_growth", {})
  if grown.get("factor", 1) == 1:
    return "The target is used as trained."
  rows = list(range(0, len(examples), max(1, len(examples) // count)))[:count]
  tokenizer = zoo.tokenizer
  ids = tokenizer([examples["prompt"][i] for i in rows], padding=True, return_tensors="np")
  references = tokenizer(
      [examples["reference"][i] for i in rows], padding=True, return_tensors="np"
  )["input_ids"]
  start = np.full((len(rows), 1), zoo.target.decoder_start_id, np.int64)
  decoder_ids = np.concatenate([start, references], axis=1)
  before = zoo.trained_target.logits(ids["input_ids"], decoder_ids, ids["attention_mask"])
  after = zoo.target.logits(ids["input_ids"], decoder_ids, ids["attention_mask"])
  difference = float(np.max(np.abs(after - before)))
  scale = float(np.max(np.abs(before)))
  return (
      f"The target was trained at {grown['trained_params'] / 1e6:.2f}M parameters and grown "
      f"{grown['factor']}x in width (Net2Net, `models/growth.py`) without changing its "
      f"function: on {len(rows)} test prompts its logits differ from the trained target's "
      f"by at most {difference:.1e} (logit scale {scale:.0f}), while each decode step moves "
      f"{grown['factor'] ** 2}x the weights, as a memory-bound target does."
  )
