"""Evaluates every option and the trained policy; writes the paper's tables and figures.

  python launch/evaluate.py --config=configs/paper_t5_table1.py [--mesh=1x8]

--mesh=DATAxMODEL places the target tensor-parallel on this host's devices (drafters replicated);
default: the config's `mesh` field if it has one, else one device.

Before any model is loaded: the config, the output directory, the collection (an unfinished one
is refused unless --allow_partial_collection, and then the report says so), the test split (empty
after removing the training queries: refused) and the saved policy are checked.
"""

import os

from absl import app, flags, logging
from ml_collections import config_flags

from jax_specsel import config_checks, experiment, pipeline, sharding, validation
from jax_specsel.bandit import collection_store, load_policy
from jax_specsel.eval import report

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Experiment configuration.", lock_config=True)
flags.DEFINE_string(
    "mesh",
    None,
    "DATAxMODEL device mesh, e.g. 1x8 (default: the config's " "`mesh`, else a single device).",
)
flags.DEFINE_bool(
    "allow_partial_collection", False, "Use an unfinished collection (the shards that exist)."
)
experiment.require_config_flag("configs/paper_t5_table1.py")


def test_queries(config, dataset):
  """The test split without the queries the policy was trained on; ValueError when empty."""
  split = experiment.load_split(config, "test", config.test_per_task)
  seen = set(dataset["id"])  # never evaluate on a query the policy was trained on
  test = split.filter(lambda e: e["id"] not in seen)
  if len(test) == 0:
    raise ValueError(
        f"the test split is empty: {len(split)} test queries of tasks "
        f"{list(config.tasks)} (split {config.get('test_split', 'test')!r}), "
        f"{len(split) - len(test)} of them also in the collection; raise "
        "config.test_per_task or use a test split disjoint from the training queries."
    )
  return test


def main(argv):
  del argv
  logging.set_verbosity(logging.INFO)
  config = FLAGS.config
  with experiment.usage_errors():
    config_checks.check_config(config)
    shape = experiment.mesh_shape(config, FLAGS.mesh)
    validation.writable_directory(config.output_dir, "config.output_dir")
    directory = os.path.join(config.output_dir, "collection")
    dataset, meta = collection_store.load_collection(
        directory, allow_partial=FLAGS.allow_partial_collection
    )
    experiment.check_collection(meta, config, directory)
    test = test_queries(config, dataset)
    policy = load_policy(os.path.join(config.output_dir, "policy"))
  mesh = None if shape is None else sharding.make_mesh(*shape)
  target, drafters = experiment.load_models(config, mesh=mesh)
  result = pipeline.evaluate_stage(target, drafters, test, policy, config, config.output_dir)
  extra = pipeline.experiments_stage(dataset, meta, test, target, result, config, config.output_dir)
  payload = pipeline.write_report(
      result, extra, target, drafters, config.output_dir, collection=meta
  )
  print(report.results_table(payload))
  print(f"report written to {config.output_dir}/report.md")


if __name__ == "__main__":
  app.run(main, flags_parser=experiment.parse_flags)
