"""Trains the selection policy on a finished collection (paper sec. 2.4); saves it with orbax.

  python launch/train_policy.py --config=configs/paper_t5_table1.py [--config.alpha=0.5]
"""

import os

from absl import app, logging
from ml_collections import config_flags

from jax_specsel import pipeline
from jax_specsel.bandit import collect

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment configuration.", lock_config=True)


def main(argv):
  del argv
  logging.set_verbosity(logging.INFO)
  config = _CONFIG.value
  dataset, meta = collect.load_collection(os.path.join(config.output_dir, "collection"))
  policy = pipeline.train_stage(dataset, meta, config, config.output_dir)
  print(f"policy over {policy.option_names} saved to {config.output_dir}/policy")


if __name__ == "__main__":
  app.run(main)
