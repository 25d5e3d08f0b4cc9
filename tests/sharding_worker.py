"""Subprocess side of tests/test_sharding.py (jax must start with the device count it needs).

  python sharding_worker.py sharded CHECKPOINT_ROOT     8 fake CPU devices (XLA_FLAGS set by the
                                                        parent): sharded vs unsharded T5 / LLaMA,
                                                        cache shardings, memory estimate, errors
  python sharding_worker.py collect PORT PROCESS_ID OUTPUT_DIR
                                                        one of two processes of a distributed
                                                        collection over fake models

Each mode prints one line `RESULT <json>` with what it measured; the test asserts on it.
"""

from __future__ import annotations

import json
import logging
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

VOCAB = 96
COLLECT_QUERIES = 12


def collection_inputs():
  """(target, drafters, examples, config) of the distributed-collection test, deterministic."""
  import datasets
  import numpy as np
  from fake_models import fake_model_with_tokenizer
  from jax_specsel.bandit import collect as collect_lib

  rng = np.random.default_rng(0)
  rows = [
      {
          "id": f"q{i}",
          "task": "a" if i % 2 else "b",
          "prompt": " ".join(f"w{k}" for k in rng.integers(3, 12, size=1 + i % 4)),
          "reference": "w3",
      }
      for i in range(COLLECT_QUERIES)
  ]
  target = fake_model_with_tokenizer(0, name="target")
  drafters = {
      "same": fake_model_with_tokenizer(0, name="same"),
      "other": fake_model_with_tokenizer(5, name="other"),
  }
  config = collect_lib.CollectConfig(max_new_tokens=6, batch_size=4, shard_size=5)
  return target, drafters, datasets.Dataset.from_list(rows), config


def run_collect(port: int, process_id: int, output_dir: str) -> dict:
  import jax
  from jax_specsel.bandit import distributed

  index, count = distributed.initialize(f"localhost:{port}", num_processes=2, process_id=process_id)
  target, drafters, examples, config = collection_inputs()
  data = distributed.collect(target, drafters, examples, output_dir, config, progress=False)
  num_shards = -(-len(examples) // config.shard_size)
  result = {
      "index": index,
      "count": count,
      "rows": len(data),
      "ids": list(data["id"]),
      "shards": distributed.shards_of(index, count, num_shards),
      "local_devices": len(jax.local_devices()),
  }
  jax.distributed.shutdown()
  return result


def _per_device_bytes(tree) -> int:
  """Largest total over devices of the bytes each device holds of `tree`'s arrays."""
  import collections
  import jax

  totals = collections.Counter()
  for leaf in jax.tree.leaves(tree):
    for shard in leaf.addressable_shards:
      totals[shard.device.id] += shard.data.nbytes
  return max(totals.values())


def _prompts(seed: int, batch: int = 4):
  import numpy as np

  rng = np.random.default_rng(seed)
  return [rng.integers(3, VOCAB, size=n).tolist() for n in rng.integers(2, 10, size=batch)]


def _loop_state_shardings(target, drafter, prompts):
  """Output shardings of the whole LoopState (caches included) of the loop `generate` runs.

  generate's own program returns only a small summary (caches never leave the device), so the
  loop is lowered here on its own, with the same spec and inputs, to see where its caches live.
  """
  import jax
  from jax_specsel.decoding import loop
  from jax_specsel.decoding.generate import loop_spec
  from jax_specsel.decoding.request import pad_prompts

  spec = loop_spec(target, drafter, 3, max_new_tokens=10)
  ids, mask = pad_prompts(prompts, None, target)
  place = lambda x: sharding_module().place_batch(x, target.mesh)
  compiled = (
      jax.jit(loop.run, static_argnums=0)
      .lower(
          spec,
          target.params,
          None if drafter is None else drafter.params,
          place(ids),
          place(mask),
          jax.random.PRNGKey(0),
      )
      .compile()
  )
  return compiled.output_shardings


def sharding_module():
  from jax_specsel import sharding

  return sharding


def _spec(sharding) -> list:
  """The partition spec as a list, trailing None dropped (compiled outputs drop them too)."""
  spec = [None if a is None else str(a) for a in sharding.spec]
  while spec and spec[-1] is None:
    spec.pop()
  return spec


def check_family(
    name: str, directory: str, drafter_of, mesh, decoder_inputs: bool, q_path: tuple
) -> dict:
  """Sharded vs unsharded: logits, greedy tokens (autoregressive and speculative), shardings."""
  import numpy as np
  import jax
  import jax_specsel as js

  reference, sharded = js.load_model(directory), js.load_model(directory, mesh=mesh)
  rng = np.random.default_rng(1)
  ids = rng.integers(3, VOCAB, (4, 11))
  kwargs = {"decoder_input_ids": rng.integers(3, VOCAB, (4, 6))} if decoder_inputs else {}
  ref_logits, sharded_logits = reference.logits(ids, **kwargs), sharded.logits(ids, **kwargs)
  prompts = _prompts(2)
  auto = js.generate(reference, prompts, max_new_tokens=10)
  sharded_auto = js.generate(sharded, prompts, max_new_tokens=10)
  drafter = drafter_of(sharded)
  speculative = js.generate(sharded, prompts, drafter=drafter, gamma=3, max_new_tokens=10)
  others = check_other_entry_points(reference, sharded, drafter, prompts, auto)
  states = {
      0: _loop_state_shardings(sharded, None, prompts),
      3: _loop_state_shardings(sharded, drafter, prompts),
  }
  bucket = js.decoding.bucket_length(max(len(p) for p in prompts))
  cache_length = 10 + 3 + 2 + (0 if decoder_inputs else bucket)  # LoopSpec.cache_length
  cache = jax.jit(lambda p: sharded.decoder.init_cache(p, 4, cache_length))(sharded.params)
  estimate = js.estimate_memory(sharded.config, dict(mesh.shape), 4, cache_length)
  params = {"/".join(map(str, path)): _spec(leaf.sharding) for path, leaf in _flat(sharded.params)}
  return {
      "family": name,
      "max_logit_diff": float(np.abs(ref_logits - sharded_logits).max()),
      "max_logit": float(np.abs(ref_logits).max()),
      "auto_equal": bool(
          (auto.tokens == sharded_auto.tokens).all()
          and (auto.lengths == sharded_auto.lengths).all()
      ),
      "speculative_equal": bool((auto.tokens == speculative.tokens).all()),
      "acceptance": speculative.stats.acceptance_rate,
      "param_specs": params,
      "q_shard_shape": list(dict(_flat(sharded.params))[q_path].addressable_shards[0].data.shape),
      "target_cache_spec": _spec(states[0].target_cache[0]["k"]),
      "drafter_cache_spec": _spec(states[3].drafter_cache[0]["k"]),
      "estimate": {k: estimate[k] for k in ("params", "caches")},
      "actual": {"params": _per_device_bytes(sharded.params), "caches": _per_device_bytes(cache)},
      **others,
  }


def check_other_entry_points(reference, sharded, drafter, prompts, auto) -> dict:
  """Sampling, generate_selected and generate_adaptive on the sharded target: sampled tokens equal
  the unsharded model's with the same seed; the selected and adaptive greedy outputs equal
  greedy autoregressive decoding; the embedding the policy read equals the unsharded one."""
  import numpy as np
  from flax import nnx
  import jax_specsel as js
  from jax_specsel.bandit.policy import Policy, PolicyNetwork

  sampled = {"temperature": 0.8, "top_k": 20, "seed": 7, "max_new_tokens": 10}
  reference_sample = js.generate(reference, prompts, **sampled)
  sharded_sample = js.generate(sharded, prompts, **sampled)
  policy = Policy(
      PolicyNetwork(reference.hidden_size, 2, hidden_dim=8, rngs=nnx.Rngs(0)),
      option_names=["autoregressive", "drafter"],
  )
  selected = js.generate_selected(
      sharded, prompts, {"drafter": drafter}, policy, gamma=3, max_new_tokens=10
  )
  adaptive = js.generate_adaptive(sharded, prompts, {"drafter": drafter}, policy, max_new_tokens=10)
  same = lambda out: bool((out.tokens == auto.tokens).all() and (out.lengths == auto.lengths).all())
  ids = np.zeros((len(prompts), max(map(len, prompts))), np.int32)
  mask = np.zeros_like(ids)
  for row, prompt in enumerate(prompts):
    ids[row, : len(prompt)], mask[row, : len(prompt)] = prompt, 1
  return {
      "sampled_equal": bool((reference_sample.tokens == sharded_sample.tokens).all()),
      "selected_equal": same(selected),
      "adaptive_equal": same(adaptive),
      "selected_choices": sorted(set(selected.choices)),
      "selected_embedding_diff": float(
          np.abs(selected.embeddings - reference.embed(ids, attention_mask=mask)).max()
      ),
  }


def _flat(params):
  from flax import nnx

  return [(path, var.get_value()) for path, var in nnx.to_flat_state(params)]


def check_errors(checkpoint: str) -> dict:
  import jax_specsel as js

  errors = {}
  for label, call in {
      "mesh_3x2": lambda: js.make_mesh(data=3, model=2),
      "mesh_data3": lambda: js.make_mesh(data=3),
      "load_bad_mesh": lambda: js.load_model(checkpoint, mesh="1x8"),
  }.items():
    try:
      call()
      errors[label] = None
    except ValueError as err:
      errors[label] = str(err)
  return errors


def check_unsharded_drafter(root: str) -> dict:
  """Sharded target + a drafter loaded on one device: replicated onto the mesh automatically."""
  import jax_specsel as js
  from jax_specsel.models import interface

  target_dir = os.path.join(root, "llama")
  drafter = js.load_model(os.path.join(root, "llama_drafter"), name="small_drafter")
  prompts = _prompts(3)
  expected = js.generate(
      js.load_model(target_dir), prompts, drafter=drafter, gamma=3, max_new_tokens=10
  )
  mesh = js.make_mesh(data=2, model=4)
  sharded = js.load_model(target_dir, mesh=mesh)
  runs = [
      js.generate(sharded, prompts, drafter=drafter, gamma=3, max_new_tokens=10) for _ in range(2)
  ]
  replica = interface.replicated_on(drafter, mesh)
  other_mesh = interface.shard_model(drafter, js.make_mesh(data=1, model=8), replicated=True)
  try:
    js.generate(sharded, prompts, drafter=other_mesh, gamma=3, max_new_tokens=10)
    other_mesh_error = None
  except ValueError as err:
    other_mesh_error = str(err)
  return {
      "equal": all(
          bool((run.tokens == expected.tokens).all() and (run.lengths == expected.lengths).all())
          for run in runs
      ),
      "acceptance": runs[0].stats.acceptance_rate,
      "replica_mesh": dict(replica.mesh.shape),
      "replica_cached": replica is interface.replicated_on(drafter, mesh),
      "drafter_still_on_one_device": drafter.mesh is None,
      "other_mesh_error": other_mesh_error,
  }


def run_sharded(root: str) -> dict:
  import jax
  import jax_specsel as js
  from jax_specsel.models import interface

  logging.basicConfig(level=logging.INFO, stream=sys.stderr, force=True)  # absl may have a handler
  result = {"devices": jax.device_count(), "errors": check_errors(os.path.join(root, "t5"))}
  # T5 drafts with a replicated copy of itself (every draft accepted: bonus tokens), LLaMA with
  # its sharded first layer (some accepted, some rejected).
  replicated_t5 = js.load_model(os.path.join(root, "t5"), name="t5_copy")
  result["t5"] = check_family(
      "t5",
      os.path.join(root, "t5"),
      lambda target: interface.shard_model(replicated_t5, target.mesh, replicated=True),
      js.make_mesh(data=2, model=4),
      decoder_inputs=True,
      q_path=("decoder", "blocks", 0, "self_attention", "q"),
  )
  result["llama"] = check_family(
      "llama",
      os.path.join(root, "llama"),
      lambda target: target.early_exit(layers=1),
      js.make_mesh(data=1, model=8),
      decoder_inputs=False,
      q_path=("layers", 0, "self_attn", "q_proj", "kernel"),
  )
  result["unsharded_drafter"] = check_unsharded_drafter(root)
  return result


def main(argv):
  mode = argv[1]
  if mode == "sharded":
    result = run_sharded(argv[2])
  elif mode == "collect":
    result = run_collect(int(argv[2]), int(argv[3]), argv[4])
  else:
    raise SystemExit(f"unknown mode {mode!r}; see the module docstring.")
  print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
  main(sys.argv)
