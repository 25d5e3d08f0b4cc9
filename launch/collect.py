"""Offline collection for an experiment config (paper sec. 2.3); resumable, shardable, multi-host.

  python launch/collect.py --config=configs/paper_t5_table1.py [--config.train_per_task=1000]
  python launch/collect.py --config=configs/paper_t5_table1.py --mesh=1x8 --estimate_memory
  python launch/collect.py --config=configs/paper_t5_table1.py --mesh=2x4      # 8 local devices
  python launch/collect.py --config=... --mesh=1x4 --distributed               # every host of a pod

--mesh=DATAxMODEL places the target on this process's devices (tensor-parallel over MODEL, the
batch split over DATA; drafters replicated); default: the config's `mesh` field if it has one,
else one device. --distributed joins JAX's distributed runtime (arguments detected on TPU pods,
SLURM and GKE, or given with --coordinator_address/--num_processes/--process_id) and each
process collects its share of the shards into the same (shared) output directory.
--estimate_memory prints bytes per device for the target and the drafters from their
config.json alone (local directory or hub cache) and exits before anything is loaded.
The config and the output directory are checked before any model is loaded. Two collections
started on one directory split its shards (per-shard locks).
"""

from absl import app, flags, logging
from ml_collections import config_flags

from jax_specsel import config_checks, experiment, memory, pipeline, sharding, validation
from jax_specsel.bandit import distributed
from jax_specsel.models import checkpoint, registry

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Experiment configuration.", lock_config=True)
flags.DEFINE_string(
    "mesh",
    None,
    "DATAxMODEL device mesh, e.g. 1x8 or 2x4 (default: the "
    "config's `mesh`, else a single device).",
)
flags.DEFINE_bool("estimate_memory", False, "Print the memory per device and exit.")
flags.DEFINE_integer("prompt_length", 512, "Prompt tokens assumed by --estimate_memory.")
flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize first.")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0.")
flags.DEFINE_integer("num_processes", None, "Processes in the run.")
flags.DEFINE_integer("process_id", None, "This process's rank.")
experiment.require_config_flag("configs/paper_t5_table1.py")


def print_memory_estimates(config, shape) -> None:
  shape = shape or (1, 1)
  cache_length = config.max_new_tokens + config.gamma + 2  # LoopSpec.cache_length (+ prompt below)
  common = dict(
      batch=config.collect_batch_size,
      source_length=FLAGS.prompt_length,
      block_tokens=config.gamma + 1,
      dtype=config.dtype,
  )
  models = [("target", config.target, True)] + [
      (name, source, False)
      for name, source in config.drafters.items()
      if not source.startswith(experiment.EARLY_EXIT)
  ]  # early exits live in the target's shards
  for name, source, tensor_parallel in models:
    hf_config = checkpoint.read_hf_config(source)
    decoder_only = not registry.architecture(hf_config, source).Config.is_encoder_decoder
    length = cache_length + (FLAGS.prompt_length if decoder_only else 0)
    estimate = memory.estimate_memory(
        hf_config, shape, cache_length=length, tensor_parallel=tensor_parallel, **common
    )
    print(memory.format_estimate(f"{name} ({source})", estimate))


def main(argv):
  del argv
  logging.set_verbosity(logging.INFO)
  config = FLAGS.config
  with experiment.usage_errors():
    shape = experiment.mesh_shape(config, FLAGS.mesh)
    if FLAGS.estimate_memory:  # reads only the models and three sizes: a partial config will do
      for field in ("max_new_tokens", "gamma", "collect_batch_size"):
        validation.integer(f"config.{field}", config[field], minimum=1)
    else:
      config_checks.check_config(config)
  if FLAGS.estimate_memory:
    print_memory_estimates(config, shape)
    return
  with experiment.usage_errors():
    validation.writable_directory(config.output_dir, "config.output_dir")
    train = experiment.load_split(config, "train", config.train_per_task)
    pipeline.check_splits(train, None)
  if FLAGS.distributed:
    index, count = distributed.initialize(
        FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id
    )
    logging.info("process %d of %d", index, count)
  mesh = None if shape is None else sharding.make_mesh(*shape)
  target, drafters = experiment.load_models(config, mesh=mesh)
  dataset, _ = pipeline.collect_stage(target, drafters, train, config, config.output_dir)
  print(f"collected {len(dataset)} queries into {config.output_dir}/collection")


if __name__ == "__main__":
  app.run(main, flags_parser=experiment.parse_flags)
