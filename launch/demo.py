"""The main job on the embedded default world: `make demo`.

Builds (or loads from the cache) the model zoo, collects the offline bandit data, trains the
policy, evaluates every option and the policy, runs the alpha and sample-efficiency experiments,
and writes a report directory (report.md, report.json, figure PNGs).
"""

from absl import app, flags, logging
from ml_collections import config_flags

from jax_specsel import demo, experiment

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", "configs/demo.py", "Demo configuration.")


def main(argv):
  del argv
  logging.set_verbosity(logging.INFO)
  with experiment.usage_errors():
    demo.check_demo_config(FLAGS.config)  # before the zoo: a bad value costs nothing
  output_dir = demo.run_demo(FLAGS.config)
  print(f"\nreport written to {output_dir}/report.md (and report.json, figures) ")


if __name__ == "__main__":
  app.run(main, flags_parser=experiment.parse_flags)
