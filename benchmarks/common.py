"""The diagnostics' shared preamble: offline hubs, absl start-up, one-line usage errors, and the
demo's settings and zoo.

Every script in benchmarks/ imports this module before anything else (it sits beside them, so
`import common` finds it). The demo's settings come from `configs/demo.py` (`DEMO`), so a
diagnostic measures what the demo runs instead of a copy of its values.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os

# Diagnostics run on local checkpoints, the cached zoo or random models; set these to 0 to allow
# a hub download.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from absl import app, flags  # noqa: E402

from jax_specsel import experiment  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO_CONFIG = os.path.join(ROOT, "configs", "demo.py")
ZOOS = ("default", "tiny")


def demo_config():
  """The demo's settings: `get_config()` of configs/demo.py, read from its file."""
  spec = importlib.util.spec_from_file_location("demo_config", DEMO_CONFIG)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


DEMO = demo_config()


def run(main) -> None:
  """`app.run` with the flag parser that turns every flag error into one line."""
  app.run(main, flags_parser=experiment.parse_flags)


def checked(check, *args):
  """`check(*args)`, its ValueErrors (and the like) turned into one line on stderr and exit 1."""
  with experiment.usage_errors():
    return check(*args)


def choices_flag(name: str, known, allow_empty: bool = False) -> list[str]:
  """The list flag `name`; ValueError when an entry is not in `known` (or it is empty)."""
  values = flags.FLAGS[name].value
  if set(values) - set(known) or (not values and not allow_empty):
    raise ValueError(f"--{name}={','.join(values)}: choose from {sorted(known)}.")
  return values


def rule_overrides(items: list[str]) -> dict:
  """A --rule list flag's `field=value` items as RuleSettings fields, each value of its default's
  type; ValueError names a bad item."""
  from jax_specsel.decoding import RuleSettings

  known = {f.name: f.default for f in dataclasses.fields(RuleSettings)}
  overrides = {}
  for item in items:
    name, _, value = item.partition("=")
    if name not in known or not value:
      raise ValueError(f"--rule={item}: write field=value with a field of {sorted(known)}.")
    kind = type(known[name])
    try:
      overrides[name] = value.lower() in ("1", "true") if kind is bool else kind(value)
    except ValueError:
      raise ValueError(f"--rule={item}: {name} takes a {kind.__name__}.") from None
  return overrides


def define_zoo_flags() -> None:
  """--zoo and --cache_dir, defaulting to the demo's zoo and its cache."""
  flags.DEFINE_enum("zoo", DEMO.zoo, ZOOS, "Which demo zoo (default: configs/demo.py's).")
  flags.DEFINE_string(
      "cache_dir",
      DEMO.cache_dir,
      "Zoo cache root (default: configs/demo.py's; " "empty: under the user cache).",
  )


def zoo_config(zoo: str):
  """The `ZooConfig` the demo builds for `zoo` ("default" or "tiny")."""
  from jax_specsel.data import zoo as zoo_lib

  return zoo_lib.ZooConfig.tiny() if zoo == "tiny" else zoo_lib.ZooConfig()


def demo_zoo(zoo: str, cache_dir: str):
  """(world, zoo) as the demo builds them (loaded from the cache when it is there)."""
  from jax_specsel.data import world as world_lib, zoo as zoo_lib

  world = world_lib.World(seed=DEMO.seed)
  return world, zoo_lib.build_zoo(world, zoo_config(zoo), cache_dir=cache_dir or None)


def saved_policy_and_zoo(policy_path: str, zoo: str, cache_dir: str):
  """(policy, world, zoo) of a finished demo run, for the diagnostics that measure on its models.

  Raises:
    ValueError: `policy_path` is not a saved policy directory (checked before the zoo loads).
  """
  from jax_specsel.bandit.policy import load_policy

  if not os.path.isdir(policy_path):
    raise ValueError(
        f"--policy={policy_path} is not a saved policy directory: run `make demo` "
        "first (it saves reports/demo/policy) or point --policy at one."
    )
  policy = load_policy(policy_path)
  return (policy, *demo_zoo(zoo, cache_dir))
