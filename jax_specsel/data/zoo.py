"""The world's model zoo: a T5 target and small distilled drafters, trained here, cached on disk.

  target              a T5 trained on every domain of the world (world references as labels).
  drafter_<domain>    a tiny T5 per drafter domain (translate, summarize), trained by
                      sequence-level knowledge distillation: on the target's greedy outputs for
                      that domain's training prompts, so it agrees with the target there only.
  drafter_general     the same tiny size, distilled on the target's outputs for translate and
                      summarize together (`ZooConfig.general_domains`).

No drafter is distilled on arithmetic: as with the paper's GSM8K, only the target is aligned there
and autoregressive decoding should win. The target is slower per step than a drafter only
because it is bigger (6 decoder layers of width 128 against 1 of width 96); nothing else
differs.

Training: optax AdamW with linear warmup and cosine decay (30x the step on T5's relative position
bias tables, see `_optimizer`), one jitted step over the `nnx.split` state, teacher forcing
through the decoder protocol itself (`prepare`, `init_cache`, one `decode` over the whole shifted
label sequence). Each batch holds one domain, so its padded shapes fit that domain (one compile
per domain instead of one padding-heavy shape for all).

Cache: `<cache root>/zoo-<hash of world + zoo config>/` holds zoo.json (configs, sizes, training
records), tokenizer/ (save_pretrained) and models/<name>/ (orbax). It is written to a temporary
sibling and renamed into place, so a build killed half-way never looks complete.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jax_specsel.data import world as world_lib
from jax_specsel.models import t5
from jax_specsel.models.interface import Model

log = logging.getLogger(__name__)

ZOO_VERSION = 1  # bump when training changes so old caches are not reused
TARGET = "target"
GENERAL = "general"
_ZOO_JSON = "zoo.json"


class ZooCacheError(RuntimeError):
  """A zoo cache directory exists but is incomplete, corrupt or built for another config."""


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  """Architecture and training recipe of one zoo member."""

  d_model: int
  num_heads: int
  d_ff: int
  encoder_layers: int
  decoder_layers: int
  train_steps: int
  batch_size: int = 64
  learning_rate: float = 3e-3  # peak of the warmup + cosine schedule
  warmup_steps: int = 100
  weight_decay: float = 0.01  # AdamW, on matrices only (not norm scales)
  position_bias_lr_multiplier: float = 30.0  # see `_optimizer`

  def t5_config(self, vocab_size: int, dtype: str = "float32") -> t5.Config:
    """The T5 architecture: original-T5 style (tied, scaled LM head, ReLU feed-forward)."""
    return t5.Config(vocab_size=vocab_size, d_model=self.d_model,
                     d_kv=self.d_model // self.num_heads,
                     d_ff=self.d_ff, num_heads=self.num_heads, num_layers=self.encoder_layers,
                     num_decoder_layers=self.decoder_layers, tie_word_embeddings=True,
                     scale_decoder_outputs=True, pad_token_id=0, eos_token_ids=(1,),
                     decoder_start_token_id=0, dtype=dtype)


@dataclasses.dataclass(frozen=True)
class ZooConfig:
  """Sizes and training budgets of the whole zoo.

  The default builds in ~9 minutes on the 2-core CPU (target ~6.5 min, the drafters ~2 min, the
  target's distillation outputs ~20 s), which leaves `make demo` inside its 15 minutes.
  """

  # Depth is what makes a batch-1 decode step expensive on a CPU (per-layer op overhead), and
  # training cost grows with parameters: hence a narrow, deep target decoder. A drafter's encoder
  # runs once per query on the whole prompt (a per-call cost of speculation): one layer.
  target: ModelSpec = ModelSpec(d_model=128, num_heads=4, d_ff=512, encoder_layers=2,
                                decoder_layers=6, train_steps=2000, batch_size=32,
                                learning_rate=1.5e-3, warmup_steps=200)
  domain_drafter: ModelSpec = ModelSpec(d_model=96, num_heads=4, d_ff=384, encoder_layers=1,
                                        decoder_layers=1, train_steps=1000, batch_size=32,
                                        learning_rate=1.5e-3, warmup_steps=100)
  general_drafter: ModelSpec = ModelSpec(d_model=96, num_heads=4, d_ff=384, encoder_layers=1,
                                         decoder_layers=1, train_steps=1500, batch_size=32,
                                         learning_rate=1.5e-3, warmup_steps=100)
  # Share of the target's training batches per domain (missing domains: weight 1 / #domains).
  # Summaries are learned fastest (100% exact after 2000 steps at a 0.3 share); arithmetic's
  # carries take longest.
  target_domain_weights: tuple[tuple[str, float], ...] = (
      (world_lib.TRANSLATE, 0.3), (world_lib.SUMMARIZE, 0.2), (world_lib.ARITHMETIC, 0.5))
  drafter_domains: tuple[str, ...] = (world_lib.TRANSLATE, world_lib.SUMMARIZE)
  # Domains the general drafter is distilled on (None: every domain of the world). The world's
  # arithmetic is the domain only the target learns (the paper's GSM8K case); distilled on it too,
  # the generalist reached 0.88 next-token agreement and 60% acceptance there, so it is left out.
  general_domains: tuple[str, ...] | None = (world_lib.TRANSLATE, world_lib.SUMMARIZE)
  distill_per_domain: int = 3000  # training prompts per domain the target labels greedily
  max_new_tokens: int = 48  # greedy generation budget (longest reference: 41 tokens, EOS included)
  generate_batch_size: int = 128
  # One padded batch shape for every domain: one compile per model instead of one per domain,
  # at the price of padding (worth it only when compiling dominates, as in the tiny zoo).
  shared_batch_shape: bool = False
  seed: int = 0
  dtype: str = "float32"

  @classmethod
  def tiny(cls) -> "ZooConfig":
    """A zoo that trains in seconds: for tests, not for speedups."""
    small = ModelSpec(d_model=32, num_heads=2, d_ff=64, encoder_layers=1, decoder_layers=1,
                      train_steps=20, batch_size=16, learning_rate=3e-3, warmup_steps=5)
    return cls(target=dataclasses.replace(small, d_model=48, decoder_layers=2),
               domain_drafter=small, general_drafter=small, distill_per_domain=32,
               max_new_tokens=12, generate_batch_size=32, shared_batch_shape=True)

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, values: dict) -> "ZooConfig":
    values = dict(values)
    for key in ("target", "domain_drafter", "general_drafter"):
      values[key] = ModelSpec(**values[key])
    values["drafter_domains"] = tuple(values["drafter_domains"])
    if values.get("general_domains") is not None:
      values["general_domains"] = tuple(values["general_domains"])
    values["target_domain_weights"] = tuple(tuple(p) for p in values["target_domain_weights"])
    return cls(**values)

  def drafter_names(self) -> tuple[str, ...]:
    return tuple(drafter_name(d) for d in self.drafter_domains) + (drafter_name(GENERAL),)


def drafter_name(domain: str) -> str:
  """"drafter_translate", "drafter_summarize", "drafter_general"."""
  return f"drafter_{domain}"


@dataclasses.dataclass
class Zoo:
  """The trained models of a world.

  Attributes:
    target: the big model (a `jax_specsel.Model`).
    drafters: name -> small `Model` (see `ZooConfig.drafter_names`).
    tokenizer: the shared word-level tokenizer.
    world: the `World` the zoo was trained on.
    config: the `ZooConfig`.
    directory: the cache directory the zoo lives in.
    from_cache: True when loaded without training.
    info: zoo.json: configs, parameter counts, training seconds and final losses per model.
  """

  target: Model
  drafters: dict[str, Model]
  tokenizer: Any
  world: world_lib.World
  config: ZooConfig
  directory: str
  from_cache: bool
  info: dict

  @property
  def models(self) -> dict[str, Model]:
    return {TARGET: self.target, **self.drafters}


# ----------------------------------------------------------------------------- cache layout
def zoo_fingerprint(world: world_lib.World, config: ZooConfig) -> str:
  """A short hash of everything that determines the trained weights."""
  payload = json.dumps({"version": ZOO_VERSION, "world": world.fingerprint(),
                        "zoo": config.to_dict()}, sort_keys=True)
  return hashlib.sha256(payload.encode()).hexdigest()[:16]


def default_cache_root() -> str:
  """$XDG_CACHE_HOME/jax_specsel, else ~/.cache/jax_specsel."""
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(base, "jax_specsel")


def zoo_directory(world: world_lib.World, config: ZooConfig, cache_dir: str | None = None) -> str:
  """Where the zoo for (world, config) lives: `<cache_dir or default root>/zoo-<hash>`."""
  root = os.path.abspath(os.path.expanduser(cache_dir or default_cache_root()))
  return os.path.join(root, f"zoo-{zoo_fingerprint(world, config)}")


def build_zoo(world: world_lib.World, config: ZooConfig | None = None,
              cache_dir: str | None = None, progress: bool = True) -> Zoo:
  """Loads the zoo of (world, config) from the cache, or trains it and caches it.

  Args:
    world: the `World` whose train split the models learn.
    config: sizes and budgets (default `ZooConfig()`; `ZooConfig.tiny()` for tests).
    cache_dir: root directory of zoo caches (default `default_cache_root()`); the zoo itself goes
      to `<cache_dir>/zoo-<hash>`, so different configs never overwrite each other.
    progress: show tqdm bars with the loss while training.

  Returns:
    The `Zoo`; `zoo.from_cache` tells whether training was skipped. A cache directory that
    exists but cannot be loaded (corrupt, incomplete) is logged, deleted and rebuilt.
  """
  config = config or ZooConfig()
  unknown = [d for d in config.drafter_domains + (config.general_domains or ())
             if d not in world.domains]
  if unknown:
    raise ValueError(f"ZooConfig drafter/general domains {unknown} are not domains of this world "
                     f"({world.domains}).")
  directory = zoo_directory(world, config, cache_dir)
  if os.path.isdir(directory):
    try:
      return load_zoo(directory, world)
    except ZooCacheError as err:
      log.warning("%s: rebuilding the zoo.", err)
      shutil.rmtree(directory, ignore_errors=True)
  os.makedirs(os.path.dirname(directory), exist_ok=True)
  _remove_abandoned_partials(directory)
  partial = f"{directory}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}"
  try:
    target, drafters, info = _train_zoo(world, config, progress)
    _save(partial, target, drafters, world, config, info)
    try:
      os.rename(partial, directory)
    except OSError:  # another process finished the same zoo first: keep theirs
      if not os.path.isdir(directory):
        raise
  finally:
    shutil.rmtree(partial, ignore_errors=True)
  zoo = load_zoo(directory, world)  # reading back what was written checks the save
  zoo.from_cache = False
  return zoo


def _remove_abandoned_partials(directory: str) -> None:
  """Deletes temporary build directories (`<zoo>.partial-<pid>-<tag>`) of dead processes."""
  parent, name = os.path.split(directory)
  for entry in os.listdir(parent):
    if entry.startswith(f"{name}.partial-"):
      pid = entry.split("-")[-2]
      if not (pid.isdigit() and _process_alive(int(pid))):
        shutil.rmtree(os.path.join(parent, entry), ignore_errors=True)


def _process_alive(pid: int) -> bool:
  if pid <= 0:
    return False
  try:
    os.kill(pid, 0)  # signal 0: an existence check only
  except (ProcessLookupError, OverflowError):
    return False
  except PermissionError:  # alive, owned by someone else
    return True
  return True


def _save(directory: str, target: Model, drafters: dict[str, Model], world, config, info) -> None:
  import orbax.checkpoint as ocp

  os.makedirs(directory)
  world.tokenizer().save_pretrained(os.path.join(directory, "tokenizer"))
  checkpointer = ocp.StandardCheckpointer()
  models = {TARGET: target, **drafters}
  for name, model in models.items():
    checkpointer.save(os.path.join(directory, "models", name), _flat_params(model.params))
  checkpointer.wait_until_finished()
  record = {"version": ZOO_VERSION, "fingerprint": zoo_fingerprint(world, config),
            "world_config": world.config.to_dict(), "zoo_config": config.to_dict(),
            "models": {name: {"t5_config": dataclasses.asdict(model.config), **info[name]}
                       for name, model in models.items()},
            "distill_generate_seconds": info["distill_generate_seconds"]}
  # zoo.json last: its presence marks a complete save (the rename is the real guarantee).
  with open(os.path.join(directory, _ZOO_JSON), "w") as handle:
    json.dump(record, handle, indent=1)


def load_zoo(directory: str, world: world_lib.World) -> Zoo:
  """Loads a cached zoo directory (written by `build_zoo`) for `world`.

  Args:
    directory: a `zoo-<hash>` directory.
    world: the world it was trained on (checked against the saved world config).

  Returns:
    The `Zoo` with `from_cache=True`.

  Raises:
    ZooCacheError: the directory is incomplete, corrupt or belongs to another world or version.
  """
  import orbax.checkpoint as ocp
  from transformers import PreTrainedTokenizerFast

  record = _read_record(directory)
  if (record.get("version") != ZOO_VERSION
      or world_lib.WorldConfig.from_dict(record.get("world_config", {})) != world.config):
    raise ZooCacheError(f"{directory} was built by zoo version {record.get('version')} for another "
                        "world config")
  config = ZooConfig.from_dict(record["zoo_config"])
  try:
    tokenizer = PreTrainedTokenizerFast.from_pretrained(os.path.join(directory, "tokenizer"))
    checkpointer = ocp.StandardCheckpointer()
    models = {}
    for name in (TARGET,) + config.drafter_names():
      t5_config = t5.Config.from_dict(record["models"][name]["t5_config"])
      abstract = nnx.eval_shape(lambda c=t5_config: t5.Module(c, rngs=nnx.Rngs(0)))
      graphdef, abstract_params = nnx.split(abstract)
      flat = checkpointer.restore(os.path.join(directory, "models", name),
                                  _flat_params(abstract_params))
      module = nnx.merge(graphdef, _unflatten_params(abstract_params, flat))
      models[name] = Model(module, tokenizer=tokenizer, name=name)
  except Exception as err:  # orbax / tokenizers raise many types for missing or truncated files
    raise ZooCacheError(f"{directory} is incomplete or corrupt ({type(err).__name__}: "
                        f"{str(err)[:200]})") from err
  target = models.pop(TARGET)
  return Zoo(target=target, drafters=models, tokenizer=tokenizer, world=world, config=config,
             directory=directory, from_cache=True, info=record)


def _read_record(directory: str) -> dict:
  path = os.path.join(directory, _ZOO_JSON)
  try:
    with open(path) as handle:
      record = json.load(handle)
  except (OSError, ValueError) as err:
    raise ZooCacheError(f"{path} is missing or unreadable ({type(err).__name__})") from err
  if not isinstance(record, dict) or "models" not in record or "zoo_config" not in record:
    raise ZooCacheError(f"{path} lacks the models / zoo_config entries")
  return record


def _flat_params(params: nnx.State) -> dict[str, Any]:
  """{"decoder/blocks/0/...": array}: string keys only, which every orbax version round-trips."""
  leaves = jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(params))[0]
  return {"/".join(str(getattr(k, "key", k)) for k in path): leaf for path, leaf in leaves}


def _unflatten_params(abstract_params: nnx.State, flat: dict[str, Any]) -> nnx.State:
  pure = nnx.to_pure_dict(abstract_params)
  keys = list(_flat_params(abstract_params))
  treedef = jax.tree_util.tree_structure(pure)
  nnx.replace_by_pure_dict(abstract_params, jax.tree_util.tree_unflatten(
      treedef, [jnp.asarray(flat[k]) for k in keys]))
  return abstract_params


# ----------------------------------------------------------------------------- data
@dataclasses.dataclass
class Seq2SeqArrays:
  """One domain's tokenized pairs, right-padded with the pad id (0)."""

  sources: np.ndarray  # int32 [N, S]
  source_mask: np.ndarray  # int32 [N, S]
  labels: np.ndarray  # int32 [N, T], EOS included, pad after it

  def batch(self, rows: np.ndarray) -> dict[str, np.ndarray]:
    labels = self.labels[rows]
    # Teacher forcing: the decoder reads the start id (= pad, 0) then the labels shifted right.
    decoder_inputs = np.concatenate([np.zeros_like(labels[:, :1]), labels[:, :-1]], axis=1)
    return {"sources": self.sources[rows], "source_mask": self.source_mask[rows],
            "decoder_inputs": decoder_inputs, "labels": labels}


def _round_up(value: int, multiple: int) -> int:
  return -(-value // multiple) * multiple


def pad_rows(rows: list[list[int]], multiple: int = 8) -> tuple[np.ndarray, np.ndarray]:
  """Right-pads id lists with 0 to a width rounded up to `multiple`; returns (ids, mask)."""
  width = _round_up(max(len(r) for r in rows), multiple)
  ids = np.zeros((len(rows), width), np.int32)
  mask = np.zeros((len(rows), width), np.int32)
  for i, row in enumerate(rows):
    ids[i, :len(row)], mask[i, :len(row)] = row, 1
  return ids, mask


def encode_pairs(tokenizer, prompts: list[str], labels: list[list[int]]) -> Seq2SeqArrays:
  """Tokenizes prompts (EOS appended, as T5) and pads prompts and label id lists."""
  sources, source_mask = pad_rows(tokenizer(prompts)["input_ids"])
  padded_labels, _ = pad_rows(labels)
  return Seq2SeqArrays(sources, source_mask, padded_labels)


def pad_to_common_shape(data: dict[str, Seq2SeqArrays]) -> dict[str, Seq2SeqArrays]:
  """Pads every domain's arrays to the widest source and label lengths among them."""
  width = max(a.sources.shape[1] for a in data.values())
  label_width = max(a.labels.shape[1] for a in data.values())
  grow = lambda x, w: np.pad(x, ((0, 0), (0, w - x.shape[1])))
  return {domain: Seq2SeqArrays(grow(a.sources, width), grow(a.source_mask, width),
                                grow(a.labels, label_width)) for domain, a in data.items()}


# ----------------------------------------------------------------------------- training
def _loss_and_accuracy(params, graphdef, batch):
  module = nnx.merge(graphdef, params)
  labels = batch["labels"]
  batch_size, length = labels.shape
  cache = module.init_cache(batch_size, length, module.config.dtype)
  context, cache = module.prepare(batch["sources"], batch["source_mask"], cache)
  logits, _ = module.decode(batch["decoder_inputs"], jnp.zeros((batch_size,), jnp.int32), cache,
                            context)
  weights = (labels != 0).astype(jnp.float32)
  losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  loss = (losses * weights).sum() / weights.sum()
  accuracy = ((logits.argmax(-1) == labels) * weights).sum() / weights.sum()
  return loss, accuracy


def _optimizer(spec: ModelSpec) -> optax.GradientTransformation:
  """AdamW (warmup + cosine) with a larger step for the relative position bias tables.

  Adam moves every weight by about the learning rate per step, and T5 initializes its bias tables
  near zero (std d_model**-0.5): at 1e-3 per step they need thousands of steps to reach the
  magnitudes that make attention positional, and that alone stalls learning (measured: a copy
  task at 45% token accuracy after 250 steps, 92% with a 30x step on the bias tables).
  """
  def adamw(peak):
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, peak, min(spec.warmup_steps, spec.train_steps - 1), spec.train_steps,
        end_value=0.05 * peak)
    decay_matrices = lambda params: jax.tree.map(lambda x: x.ndim > 1, params)
    return optax.adamw(schedule, b1=0.9, b2=0.99, eps=1e-8, weight_decay=spec.weight_decay,
                       mask=decay_matrices)

  def label(params):
    paths = jax.tree_util.tree_flatten_with_path(params)[0]
    labels = ["bias" if "relative_bias" in jax.tree_util.keystr(path) else "rest"
              for path, _ in paths]
    return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(params), labels)

  return optax.chain(optax.clip_by_global_norm(1.0), optax.multi_transform(
      {"bias": adamw(spec.learning_rate * spec.position_bias_lr_multiplier),
       "rest": adamw(spec.learning_rate)}, label))


def train_t5(spec: ModelSpec, data: dict[str, Seq2SeqArrays], vocab_size: int, seed: int,
             name: str, dtype: str = "float32", progress: bool = True,
             domain_weights: dict[str, float] | None = None) -> tuple[t5.Module, dict]:
  """Trains a T5 from scratch on one or more domains' pairs.

  Args:
    spec: architecture and recipe.
    data: domain -> tokenized pairs; each step draws one batch from one domain.
    vocab_size: the model's vocabulary size.
    seed: initialization and batch-order seed.
    name: label for the progress bar.
    dtype: parameter / activation dtype.
    progress: show a tqdm bar with the running loss.
    domain_weights: probability of drawing each domain (normalized; default uniform).

  Returns:
    (trained module, record with params, steps, seconds, final loss and token accuracy).
  """
  from tqdm.auto import tqdm

  module = t5.Module(spec.t5_config(vocab_size, dtype), rngs=nnx.Rngs(seed))
  graphdef, params = nnx.split(module)
  optimizer = _optimizer(spec)
  opt_state = optimizer.init(params)

  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def train_step(params, opt_state, batch):
    grad_fn = jax.value_and_grad(_loss_and_accuracy, has_aux=True)
    (loss, accuracy), grads = grad_fn(params, graphdef, batch)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss, accuracy

  rng = np.random.default_rng(seed)
  domains = sorted(data)
  weights = np.array([(domain_weights or {}).get(d, 1.0 / len(domains)) for d in domains])
  weights = weights / weights.sum()
  started = time.perf_counter()
  recent = []
  bar = tqdm(range(spec.train_steps), desc=f"train {name}", disable=not progress, leave=False)
  for step in bar:
    arrays = data[domains[int(rng.choice(len(domains), p=weights))]]
    rows = rng.integers(0, len(arrays.labels), size=spec.batch_size)
    params, opt_state, loss, accuracy = train_step(params, opt_state, arrays.batch(rows))
    if step % 25 == 0 or step == spec.train_steps - 1:  # a host sync: not every step
      recent = (recent + [(float(loss), float(accuracy))])[-4:]
      bar.set_postfix(loss=f"{np.mean([r[0] for r in recent]):.3f}",
                      acc=f"{np.mean([r[1] for r in recent]):.3f}")
  bar.close()
  seconds = time.perf_counter() - started
  nnx.update(module, params)
  record = {"params": int(sum(np.prod(x.shape) for x in jax.tree.leaves(params))),
            "train_steps": spec.train_steps, "train_seconds": round(seconds, 2),
            "final_loss": round(float(np.mean([r[0] for r in recent])), 4),
            "final_token_accuracy": round(float(np.mean([r[1] for r in recent])), 4)}
  log.info("trained %s: %s", name, record)
  return module, record


def _train_zoo(world: world_lib.World, config: ZooConfig, progress: bool):
  """Trains the target, labels training prompts with its greedy outputs, distills drafters."""
  tokenizer = world.tokenizer()
  vocab_size = _round_up(len(tokenizer), 8)
  train = {domain: world.split("train", domain) for domain in world.domains}
  target_data = {
      domain: encode_pairs(tokenizer, [e["prompt"] for e in examples],
                           tokenizer([e["reference"] for e in examples])["input_ids"])
      for domain, examples in train.items()}
  if config.shared_batch_shape:
    target_data = pad_to_common_shape(target_data)
  module, target_record = train_t5(config.target, target_data, vocab_size, config.seed, TARGET,
                                   config.dtype, progress, dict(config.target_domain_weights))
  target = Model(module, tokenizer=tokenizer, name=TARGET)
  info = {TARGET: target_record}

  # Sequence-level distillation data: the target's own greedy outputs, not the references.
  started = time.perf_counter()
  distill = {}
  needed = set(config.drafter_domains) | set(config.general_domains or world.domains)
  for domain in (d for d in world.domains if d in needed):
    prompts = [e["prompt"] for e in train[domain][:config.distill_per_domain]]
    outputs = greedy_generate(target, tokenizer(prompts)["input_ids"], config.max_new_tokens,
                              config.generate_batch_size)
    distill[domain] = encode_pairs(tokenizer, prompts, outputs)
  info["distill_generate_seconds"] = round(time.perf_counter() - started, 2)
  if config.shared_batch_shape:
    distill = pad_to_common_shape(distill)

  drafters = {}
  plan = [(drafter_name(d), config.domain_drafter, {d: distill[d]}) for d in config.drafter_domains]
  general = config.general_domains or world.domains
  plan.append((drafter_name(GENERAL), config.general_drafter, {d: distill[d] for d in general}))
  for index, (name, spec, data) in enumerate(plan, start=1):
    module, record = train_t5(spec, data, vocab_size, config.seed + index, name, config.dtype,
                              progress)
    record["distilled_on"] = sorted(data)
    drafters[name], info[name] = Model(module, tokenizer=tokenizer, name=name), record
  return target, drafters, info


# ----------------------------------------------------------------------------- generation & checks
def greedy_generate(model: Model, prompt_rows: list[list[int]], max_new_tokens: int,
                    batch_size: int = 128, drafter: Model | None = None) -> list[list[int]]:
  """Greedy outputs of `model` (through `jax_specsel.decoding.generate`) for many prompts.

  Args:
    model: the model to decode with.
    prompt_rows: token id lists (EOS included, as the tokenizer returns them).
    max_new_tokens: generation budget per prompt.
    batch_size: rows per call; the last chunk is padded with copies so one program serves all.
    drafter: optional drafter (greedy speculative decoding gives the same tokens).

  Returns:
    One id list per prompt: the generated tokens, EOS included when it was emitted.
  """
  from jax_specsel.decoding import generate

  batch_size = min(batch_size, len(prompt_rows))
  outputs = []
  for begin in range(0, len(prompt_rows), batch_size):
    chunk = list(prompt_rows[begin:begin + batch_size])
    ids, mask = pad_rows(chunk + [chunk[-1]] * (batch_size - len(chunk)))
    result = generate(model, ids, drafter=drafter, temperature=0.0,
                      max_new_tokens=max_new_tokens, attention_mask=mask)
    outputs.extend(result.tokens[i, :result.lengths[i]].tolist() for i in range(len(chunk)))
  return outputs


def next_token_agreement(drafter: Model, prompt_rows: list[list[int]],
                         target_outputs: list[list[int]]) -> float:
  """Fraction of the target's output tokens the drafter predicts given the target's prefix.

  This is the per-token acceptance probability of greedy speculative decoding (a drafter
  proposes from the accepted prefix, which is the target's own output).
  """
  sources, source_mask = pad_rows(prompt_rows)
  labels, label_mask = pad_rows(target_outputs)
  decoder_inputs = np.concatenate([np.zeros_like(labels[:, :1]), labels[:, :-1]], axis=1)
  logits = drafter.logits(sources, decoder_input_ids=decoder_inputs, attention_mask=source_mask)
  hits = (logits.argmax(-1) == labels) & (label_mask > 0)
  return float(hits.sum() / max(label_mask.sum(), 1))


def evaluate_zoo(zoo: Zoo, split: str = "test", limit_per_domain: int | None = None) -> dict:
  """Greedy quality of every model and each drafter's agreement with the target, per domain.

  Args:
    zoo: the zoo.
    split: world split to evaluate on.
    limit_per_domain: evaluate only the first examples of each domain (None: all).

  Returns:
    {"accuracy": {model: {domain: exact-match rate vs the world references}},
     "agreement": {drafter: {domain: {"exact": outputs identical to the target's,
                                      "next_token": see `next_token_agreement`,
                                      "prefix": mean common-prefix fraction of the target output}}}}
  """
  tokenizer, config = zoo.tokenizer, zoo.config
  accuracy = {name: {} for name in zoo.models}
  agreement = {name: {} for name in zoo.drafters}
  for domain in zoo.world.domains:
    examples = zoo.world.split(split, domain)[:limit_per_domain]
    prompts = tokenizer([e["prompt"] for e in examples])["input_ids"]
    outputs = {name: greedy_generate(model, prompts, config.max_new_tokens,
                                     config.generate_batch_size)
               for name, model in zoo.models.items()}
    for name, rows in outputs.items():
      texts = tokenizer.batch_decode(rows, skip_special_tokens=True)
      hits = [text == e["reference"] for text, e in zip(texts, examples)]
      accuracy[name][domain] = float(np.mean(hits))
    reference_rows = outputs[TARGET]
    for name, drafter in zoo.drafters.items():
      rows = outputs[name]
      agreement[name][domain] = {
          "exact": float(np.mean([a == b for a, b in zip(rows, reference_rows)])),
          "next_token": next_token_agreement(drafter, prompts, reference_rows),
          "prefix": float(np.mean([_common_prefix(a, b) / max(len(b), 1)
                                   for a, b in zip(rows, reference_rows)]))}
  return {"accuracy": accuracy, "agreement": agreement}


def _common_prefix(a: list[int], b: list[int]) -> int:
  length = 0
  for x, y in zip(a, b):
    if x != y:
      break
    length += 1
  return length


def measure_decode_step(models: dict[str, Model], steps: int = 32, repeats: int = 7,
                        cache_length: int = 64, prompt_length: int = 32) -> dict[str, float]:
  """Median seconds per cached batch-1 decode step of each model, measured side by side.

  Each model runs `steps` greedy steps inside one jitted `lax.fori_loop` (as in the decoding
  loop, no host round trip per step); the models take turns so background load hits all alike.

  Returns:
    name -> seconds per decode step.
  """
  runners = {name: _step_runner(model, steps, cache_length, prompt_length)
             for name, model in models.items()}
  times = {name: [] for name in models}
  for _ in range(repeats):
    for name, run in runners.items():
      started = time.perf_counter()
      jax.block_until_ready(run())
      times[name].append((time.perf_counter() - started) / steps)
  return {name: float(np.median(t)) for name, t in times.items()}


def _step_runner(model: Model, steps: int, cache_length: int, prompt_length: int):
  decoder, params = model.decoder, model.params
  prompt = jnp.ones((1, prompt_length), jnp.int32)
  cache = decoder.init_cache(params, 1, cache_length)
  context, cache = jax.jit(decoder.prepare)(params, prompt, jnp.ones_like(prompt), cache)

  @jax.jit
  def run(params, cache, context):
    def body(position, carry):
      token, cache = carry
      logits, cache = decoder.decode(params, token, jnp.full((1,), position, jnp.int32), cache,
                                     context)
      return logits[:, -1:].argmax(-1).astype(jnp.int32), cache

    return jax.lax.fori_loop(0, steps, body, (jnp.zeros((1, 1), jnp.int32), cache))[0]

  jax.block_until_ready(run(params, cache, context))  # compile outside the timing
  return lambda: run(params, cache, context)
