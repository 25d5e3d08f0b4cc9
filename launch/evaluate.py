"""Evaluates every option and the trained policy; writes the paper's tables and figures.

  python launch/evaluate.py --config=configs/paper_t5_table1.py [--mesh=1x8]

--mesh=DATAxMODEL places the target tensor-parallel on this host's devices (drafters replicated);
default: the config's `mesh` field if it has one, else one device.
"""

import os

from absl import app, flags, logging
from ml_collections import config_flags

from jax_specsel import experiment, pipeline, sharding
from jax_specsel.bandit import collect, load_policy
from jax_specsel.eval import report

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment configuration.", lock_config=True)
_MESH = flags.DEFINE_string("mesh", None, "DATAxMODEL device mesh, e.g. 1x8 (default: the config's "
                            "`mesh`, else a single device).")


def main(argv):
  del argv
  logging.set_verbosity(logging.INFO)
  config = _CONFIG.value
  shape = experiment.mesh_shape(config, _MESH.value)
  mesh = None if shape is None else sharding.make_mesh(*shape)
  target, drafters = experiment.load_models(config, mesh=mesh)
  dataset, meta = collect.load_collection(os.path.join(config.output_dir, "collection"))
  seen = set(dataset["id"])  # never evaluate on a query the policy was trained on
  test = experiment.load_split(config, "test", config.test_per_task).filter(lambda e: e["id"] not in seen)
  policy = load_policy(os.path.join(config.output_dir, "policy"))
  result = pipeline.evaluate_stage(target, drafters, test, policy, config, config.output_dir)
  extra = pipeline.experiments_stage(dataset, meta, test, target, result, config, config.output_dir)
  payload = pipeline.write_report(result, extra, target, drafters, config.output_dir)
  print(report.results_table(payload))
  print(f"report written to {config.output_dir}/report.md")


if __name__ == "__main__":
  app.run(main)
