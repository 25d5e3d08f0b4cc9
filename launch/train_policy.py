"""Trains the selection policy on a finished collection (paper sec. 2.4); saves it with orbax.

  python launch/train_policy.py --config=configs/paper_t5_table1.py [--config.alpha=0.5]
  python launch/train_policy.py --config=... --allow_partial_collection   # an unfinished one

The config and the collection are checked before training: an unfinished collection is refused
(naming its missing shards) unless --allow_partial_collection, and then the policy's metadata
records it (training_info["collection"]); so is a collection of another target or other drafters
than the config names, and one whose shards are damaged or hold unusable values.
"""

import os

from absl import app, flags, logging
from ml_collections import config_flags

from jax_specsel import config_checks, experiment, pipeline, validation
from jax_specsel.bandit import collection_store

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Experiment configuration.", lock_config=True)
flags.DEFINE_bool(
    "allow_partial_collection", False, "Train on an unfinished collection (the shards that exist)."
)
experiment.require_config_flag("configs/paper_t5_table1.py")


def main(argv):
  del argv
  logging.set_verbosity(logging.INFO)
  config = FLAGS.config
  with experiment.usage_errors():
    config_checks.check_config(config)
    validation.writable_directory(config.output_dir, "config.output_dir")
    directory = os.path.join(config.output_dir, "collection")
    dataset, meta = collection_store.load_collection(
        directory, allow_partial=FLAGS.allow_partial_collection
    )
    experiment.check_collection(meta, config, directory)
  policy = pipeline.train_stage(dataset, meta, config, config.output_dir)
  print(f"policy over {policy.option_names} saved to {config.output_dir}/policy")


if __name__ == "__main__":
  app.run(main, flags_parser=experiment.parse_flags)
