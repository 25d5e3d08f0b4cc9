"""Offline collection for an experiment config (paper sec. 2.3); resumable.

  python launch/collect.py --config=configs/paper_t5_table1.py [--config.train_per_task=1000]
"""

from absl import app, logging
from ml_collections import config_flags

from jax_specsel import experiment, pipeline

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment configuration.", lock_config=True)


def main(argv):
  del argv
  logging.set_verbosity(logging.INFO)
  config = _CONFIG.value
  target, drafters = experiment.load_models(config)
  train = experiment.load_split(config, "train", config.train_per_task)
  dataset, _ = pipeline.collect_stage(target, drafters, train, config, config.output_dir)
  print(f"collected {len(dataset)} queries into {config.output_dir}/collection")


if __name__ == "__main__":
  app.run(main)
