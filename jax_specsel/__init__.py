"""jax_specsel: choose, per query, the drafter that makes speculative decoding fastest.

Public API:
  load_model(path_or_id, dtype, matmul_precision="auto") -> Model (T5 or LLaMA, tokenizer
    attached; stop ids as transformers' generate reads them)
  generate(target, prompt_ids, drafter=None, ...)  (jax_specsel.decoding)
  generate_selected(target, prompt_ids, drafters, policy, ...): the policy chooses the drafter
    per query inside the same compiled program that decodes
  generate_adaptive(target, prompt_ids, drafters, policy=None, costs=None, ...): the option and
    gamma chosen again every round inside the loop (the policy as the prior)
  bandit.train_policy / bandit.load_policy          (jax_specsel.bandit)
  grow_checkpoint(src_dir, dst_dir, factor) / grow_model(model, factor, directory): a T5 or
    LLaMA widened `factor` times without changing its function (Net2Net; jax_specsel.models.growth)
  save_hf_checkpoint(model, directory): a Model as a transformers checkpoint
  make_mesh(data=1, model=N) -> Mesh; load_model(path, dtype, mesh=mesh) loads sharded;
  shard_model(model, mesh, replicated=False); estimate_memory(config, (data, model), batch,
  cache_length, dtype) -> bytes per device   (jax_specsel.sharding, .models.interface, .memory)
"""

from jax_specsel.versions import check_versions

check_versions()  # before flax is imported: an old flax under a new jax fails inside flax

from jax_specsel.decoding import (
    AdaptiveOutput,
    GenerateOutput,
    SelectedOutput,  # noqa: E402
    compilation_count,
    generate,
    generate_adaptive,
    generate_selected,
)
from jax_specsel.memory import estimate_memory
from jax_specsel.models.growth import grow_checkpoint, grow_model
from jax_specsel.models.hf_export import save_hf_checkpoint
from jax_specsel.models.checkpoint import (
    CheckpointNotFoundError,
    CorruptCheckpointError,
    InvalidConfigError,
)
from jax_specsel.models.interface import Decoder, Model, shard_model
from jax_specsel.models.loading import WeightMismatchError, load_model
from jax_specsel.models.registry import UnsupportedModelError
from jax_specsel.sharding import make_mesh
from jax_specsel import bandit  # noqa: E402  (js.bandit.train_policy / load_policy)

__all__ = [
    "Decoder",
    "Model",
    "load_model",
    "generate",
    "generate_adaptive",
    "generate_selected",
    "AdaptiveOutput",
    "GenerateOutput",
    "SelectedOutput",
    "compilation_count",
    "CheckpointNotFoundError",
    "CorruptCheckpointError",
    "InvalidConfigError",
    "UnsupportedModelError",
    "WeightMismatchError",
    "make_mesh",
    "shard_model",
    "estimate_memory",
    "bandit",
    "grow_checkpoint",
    "grow_model",
    "save_hf_checkpoint",
]
