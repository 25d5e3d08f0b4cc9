"""The one check of an experiment or demo config, run before any work (a bad value fails first).

Pipeline fields (every config; configs/demo.py documents each): seed, max_new_tokens,
collect_batch_size, shard_size, alpha, cost_unit, autoregressive_option, trainer, gamma,
temperature, eval_seeds, alphas, sample_sizes, and the optional `adaptive` section.
Model and data fields (experiment configs, configs/paper_*.py): target, dtype, drafters, tasks,
train_per_task, test_per_task, and the optional data_files, data_dir and mesh.
"""

from __future__ import annotations

import logging
import warnings

import ml_collections

from jax_specsel import experiment, validation
from jax_specsel.bandit import reinforce
from jax_specsel.data import tasks
from jax_specsel.decoding import MIN_SAMPLING_TEMPERATURE
from jax_specsel.models.checkpoint import DTYPES

log = logging.getLogger(__name__)

# config.trainer -> the policy-training config it selects (whose own `estimator` field is the
# gradient estimator: "reinforce" or "expected").
TRAINERS = {"paper": reinforce.paper_train_config, "default": reinforce.default_train_config}
PIPELINE_FIELDS = (
    "seed",
    "max_new_tokens",
    "collect_batch_size",
    "shard_size",
    "alpha",
    "cost_unit",
    "autoregressive_option",
    "trainer",
    "gamma",
    "temperature",
    "eval_seeds",
    "alphas",
    "sample_sizes",
)
_RENAMED_FIELDS = {"trainer": "estimator"}  # field -> its old name, still read (deprecated)
ADAPTIVE_FIELDS = (
    "max_gamma",
    "probe_every",
    "hedge_learning_rate",
    "online_learning_rate",
    "update_every",
    "frozen",
    "shifted_domain",
    "shifted_queries",
)
MODEL_FIELDS = ("target", "dtype", "drafters", "tasks", "train_per_task", "test_per_task")


def check_config(config: ml_collections.ConfigDict, *, models: bool = True) -> None:
  """Raises ValueError naming the first bad field (the pipeline's first, then the models').

  Args:
    config: an experiment config (configs/paper_*.py) or the demo's (configs/demo.py); the
      launches check config.output_dir separately (`validation.writable_directory`).
    models: also check the model and data fields; False for a config whose models come from
      elsewhere (the demo builds its zoo).
  """
  missing = [
      field
      for field in PIPELINE_FIELDS
      if field not in config and _RENAMED_FIELDS.get(field, field) not in config
  ]
  if missing:
    raise ValueError(f"config lacks field(s) {missing}: see configs/demo.py for each field.")
  try:
    _check_pipeline_fields(config)
  except TypeError as err:  # one error type for callers: a bad config value
    raise ValueError(str(err)) from None
  if models:
    _check_model_fields(config)


def _check_adaptive(config) -> None:
  """config.adaptive (optional): the policy_adaptive row and the shifted-domain experiment."""
  if "adaptive" not in config:
    return
  settings = config.adaptive
  missing = [f for f in ADAPTIVE_FIELDS if f not in settings]
  if missing:
    raise ValueError(f"config.adaptive lacks {missing}: see configs/demo.py.")
  validation.integer("config.adaptive.max_gamma", settings.max_gamma, minimum=1)
  validation.integer("config.adaptive.probe_every", settings.probe_every, minimum=0)
  validation.integer("config.adaptive.shifted_queries", settings.shifted_queries, minimum=1)
  validation.integer("config.adaptive.update_every", settings.update_every, minimum=1)
  for field in ("hedge_learning_rate", "online_learning_rate"):
    validation.real(f"config.adaptive.{field}", settings[field], 0.0)
  if "track_threshold" in settings:  # optional: RuleSettings' default otherwise
    validation.real("config.adaptive.track_threshold", settings.track_threshold, 0.0, 1.0)
  if not isinstance(settings.frozen, bool):
    raise ValueError(f"config.adaptive.frozen={settings.frozen!r}: must be True or False.")


def _check_pipeline_fields(config) -> None:
  _check_adaptive(config)
  validation.integer("config.seed", config.seed, minimum=0)
  for field in ("max_new_tokens", "collect_batch_size", "shard_size", "gamma"):
    validation.integer(f"config.{field}", config[field], minimum=1)
  validation.real("config.alpha", config.alpha, 0.0, 1.0)
  if validation.real("config.cost_unit", config.cost_unit) <= 0:
    raise ValueError(
        f"config.cost_unit={config.cost_unit}: must be > 0 (parameters per cost unit)."
    )
  if not isinstance(config.autoregressive_option, bool):
    raise ValueError(
        f"config.autoregressive_option={config.autoregressive_option!r}: must be True or False."
    )
  trainer_config(config)
  temperature = validation.real("config.temperature", config.temperature, 0.0)
  if 0 < temperature < MIN_SAMPLING_TEMPERATURE:
    raise ValueError(
        f"config.temperature={temperature}: 0 (greedy) or >= {MIN_SAMPLING_TEMPERATURE}."
    )
  for field, check in (
      ("eval_seeds", lambda name, v: validation.integer(name, v, minimum=0)),
      ("alphas", lambda name, v: validation.real(name, v, 0.0, 1.0)),
      ("sample_sizes", lambda name, v: validation.integer(name, v, minimum=1)),
  ):
    values = config[field]
    if isinstance(values, (str, bytes)) or not hasattr(values, "__len__") or not len(values):
      raise ValueError(f"config.{field}={values!r}: must be a non-empty list.")
    for i, value in enumerate(values):
      check(f"config.{field}[{i}]", value)


def trainer_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The policy-training config that `config.trainer` names ("paper" or "default").

  A config written before the field was renamed names it `estimator` (the word the training
  config uses for its gradient estimator): that is still read, with a FutureWarning.

  Raises:
    ValueError: an unknown name, both fields, or an old `estimator` that names a gradient
      estimator instead of a training config.
  """
  if "estimator" not in config:
    name = config.trainer
  elif "trainer" in config:
    raise ValueError(
        f"config has both trainer={config.trainer!r} and estimator={config.estimator!r}: "
        "`estimator` is the old name of `trainer`; remove it."
    )
  else:
    name = config.estimator
    if name not in TRAINERS:
      raise ValueError(
          f"config.estimator={name!r}: this experiment field is now called `trainer` and "
          f"names a training config, one of {sorted(TRAINERS)}; the gradient estimator "
          "('reinforce' / 'expected') is a field of that training config."
      )
    message = (
        f"config.estimator={name!r} is deprecated: rename the field to config.trainer (it "
        "selects the policy-training config, whose own `estimator` is the gradient estimator)."
    )
    warnings.warn(message, FutureWarning, stacklevel=2)
    log.warning(message)
  if name not in TRAINERS:
    raise ValueError(f"config.trainer={name!r}: choose one of {sorted(TRAINERS)}.")
  return TRAINERS[name]()


def _check_model_fields(config: ml_collections.ConfigDict) -> None:
  """The model and data fields of an experiment config (configs/paper_*.py)."""
  missing = [field for field in MODEL_FIELDS if field not in config]
  if missing:
    raise ValueError(f"config lacks field(s) {missing}: see configs/paper_t5_table1.py.")
  if not isinstance(config.target, str) or not config.target:
    raise ValueError(f"config.target={config.target!r}: must be a checkpoint directory or hub id.")
  if config.dtype not in DTYPES:
    raise ValueError(f"config.dtype={config.dtype!r}: choose one of {sorted(DTYPES)}.")
  if not config.drafters:
    raise ValueError("config.drafters is empty: name at least one drafter {name: checkpoint}.")
  for name, source in config.drafters.items():
    if not isinstance(source, str) or not source:
      raise ValueError(
          f"config.drafters[{name!r}]={source!r}: must be a checkpoint or 'early_exit:K'."
      )
    if source.startswith(experiment.EARLY_EXIT):
      _early_exit_layers(name, source)
  if isinstance(config.tasks, str) or not config.tasks:
    raise ValueError(f"config.tasks={config.tasks!r}: must be a non-empty list of task names.")
  for task in config.tasks:
    try:
      tasks.get_task(task)
    except KeyError as err:
      raise ValueError(f"config.tasks: {err.args[0]}") from None
  for field in ("train_per_task", "test_per_task"):
    try:
      validation.integer(f"config.{field}", config[field], minimum=1)
    except TypeError as err:
      raise ValueError(str(err)) from None
  experiment.data_files(config)
  experiment.mesh_shape(config)


def _early_exit_layers(name: str, source: str) -> int:
  try:
    return validation.integer(
        f"config.drafters[{name!r}] layers", int(source[len(experiment.EARLY_EXIT) :]), minimum=1
    )
  except ValueError:
    raise ValueError(
        f"config.drafters[{name!r}]={source!r}: write early_exit:K with K >= 1 "
        "layers of the target."
    ) from None
