"""jax_specsel: choose, per query, the drafter that makes speculative decoding fastest.

Public API:
  load_model(path_or_id, dtype)   -> Model (T5 or LLaMA, tokenizer attached)
  generate(target, prompt_ids, drafter=None, ...)  (jax_specsel.decoding)
  bandit.train_policy / bandit.load_policy          (jax_specsel.bandit)
  make_mesh(data=1, model=N) -> Mesh; load_model(path, dtype, mesh=mesh) loads sharded;
  shard_model(model, mesh, replicated=False); estimate_memory(config, (data, model), batch,
  cache_length, dtype) -> bytes per device                    (jax_specsel.sharding, .memory)
"""

from jax_specsel.decoding import GenerateOutput, compilation_count, generate
from jax_specsel.memory import estimate_memory
from jax_specsel.models.interface import Decoder, Model
from jax_specsel.models.loading import (CheckpointNotFoundError, CorruptCheckpointError,
                                        UnsupportedModelError, WeightMismatchError, load_model)
from jax_specsel.sharding import make_mesh, shard_model
from jax_specsel import bandit  # noqa: E402  (js.bandit.train_policy / load_policy)

__all__ = ["Decoder", "Model", "load_model", "generate", "GenerateOutput", "compilation_count",
           "CheckpointNotFoundError", "CorruptCheckpointError", "UnsupportedModelError",
           "WeightMismatchError", "make_mesh",
           "shard_model", "estimate_memory", "bandit"]
