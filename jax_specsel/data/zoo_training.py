"""Training the zoo's models: a T5 from scratch on tokenized pairs, and the target's greedy
outputs that its drafters are distilled on.

Training: optax AdamW with linear warmup and cosine decay (30x the step on T5's relative position
bias tables, see `_optimizer`), one jitted step over the `nnx.split` state, teacher forcing
through the decoder protocol itself (`prepare`, `init_cache`, one `decode` over the whole shifted
label sequence). Each batch holds one domain, so its padded shapes fit that domain.
"""

from __future__ import annotations

import functools
import logging
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jax_specsel import token_batches
from jax_specsel.data.seq2seq import Seq2SeqArrays
from jax_specsel.decoding import generate
from jax_specsel.models import t5
from jax_specsel.models.interface import Model

log = logging.getLogger(__name__)


def _loss_and_accuracy(params, graphdef, batch):
  module = nnx.merge(graphdef, params)
  labels = batch["labels"]
  batch_size, length = labels.shape
  cache = module.init_cache(batch_size, length, module.config.dtype)
  context, cache = module.prepare(batch["sources"], batch["source_mask"], cache)
  logits, _ = module.decode(
      batch["decoder_inputs"], jnp.zeros((batch_size,), jnp.int32), cache, context
  )
  weights = (labels != 0).astype(jnp.float32)
  losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  loss = (losses * weights).sum() / weights.sum()
  accuracy = ((logits.argmax(-1) == labels) * weights).sum() / weights.sum()
  return loss, accuracy


def _optimizer(spec) -> optax.GradientTransformation:
  """AdamW (warmup + cosine) with a larger step for the relative position bias tables.

  Adam moves every weight by about the learning rate per step, and T5 initializes its bias tables
  near zero (std d_model**-0.5): at 1e-3 per step they need thousands of steps to reach the
  magnitudes that make attention positional, and that alone stalls learning.
  """

  def adamw(peak):
    schedule = optax.warmup_cosine_decay_schedule(
        0.0,
        peak,
        min(spec.warmup_steps, spec.train_steps - 1),
        spec.train_steps,
        end_value=0.05 * peak,
    )
    decay_matrices = lambda params: jax.tree.map(lambda x: x.ndim > 1, params)
    return optax.adamw(
        schedule, b1=0.9, b2=0.99, eps=1e-8, weight_decay=spec.weight_decay, mask=decay_matrices
    )

  def label(params):
    paths = jax.tree_util.tree_flatten_with_path(params)[0]
    labels = [
        "bias" if "relative_bias" in jax.tree_util.keystr(path) else "rest" for path, _ in paths
    ]
    return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(params), labels)

  return optax.chain(
      optax.clip_by_global_norm(1.0),
      optax.multi_transform(
          {
              "bias": adamw(spec.learning_rate * spec.position_bias_lr_multiplier),
              "rest": adamw(spec.learning_rate),
          },
          label,
      ),
  )


def train_t5(
    spec,
    data: dict[str, Seq2SeqArrays],
    vocab_size: int,
    seed: int,
    name: str,
    dtype: str = "float32",
    progress: bool = True,
    domain_weights: dict[str, float] | None = None,
) -> tuple[t5.Module, dict]:
  """Trains a T5 from scratch on one or more domains' pairs.

  Args:
    spec: architecture and recipe (a `zoo_config.ModelSpec`: its `t5_config` and training fields).
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

  started = time.perf_counter()
  params, recent = _run_steps(
      train_step, params, opt_state, data, spec, seed, domain_weights, name, progress
  )
  seconds = time.perf_counter() - started
  nnx.update(module, params)
  record = {
      "params": int(sum(np.prod(x.shape) for x in jax.tree.leaves(params))),
      "train_steps": spec.train_steps,
      "train_seconds": round(seconds, 2),
      "final_loss": round(float(np.mean([r[0] for r in recent])), 4),
      "final_token_accuracy": round(float(np.mean([r[1] for r in recent])), 4),
  }
  log.info("trained %s: %s", name, record)
  return module, record


def _run_steps(
    train_step,
    params,
    opt_state,
    data: dict[str, Seq2SeqArrays],
    spec,
    seed: int,
    domain_weights: dict[str, float] | None,
    name: str,
    progress: bool,
):
  """Runs spec.train_steps steps, each on a batch of one domain drawn by `domain_weights`: (the
  trained params, the last few (loss, token accuracy) readings)."""
  from tqdm.auto import tqdm

  rng = np.random.default_rng(seed)
  domains = sorted(data)
  weights = np.array([(domain_weights or {}).get(d, 1.0 / len(domains)) for d in domains])
  weights = weights / weights.sum()
  recent = []
  bar = tqdm(range(spec.train_steps), desc=f"train {name}", disable=not progress, leave=False)
  for step in bar:
    arrays = data[domains[int(rng.choice(len(domains), p=weights))]]
    rows = rng.integers(0, len(arrays.labels), size=spec.batch_size)
    params, opt_state, loss, accuracy = train_step(params, opt_state, arrays.batch(rows))
    if step % 25 == 0 or step == spec.train_steps - 1:  # a host sync: not every step
      recent = (recent + [(float(loss), float(accuracy))])[-4:]
      bar.set_postfix(
          loss=f"{np.mean([r[0] for r in recent]):.3f}",
          acc=f"{np.mean([r[1] for r in recent]):.3f}",
      )
  bar.close()
  return params, recent


def greedy_generate(
    model: Model,
    prompt_rows: list[list[int]],
    max_new_tokens: int,
    batch_size: int = 128,
    drafter: Model | None = None,
) -> list[list[int]]:
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
  batch_size = min(batch_size, len(prompt_rows))
  outputs = []
  for begin in range(0, len(prompt_rows), batch_size):
    chunk = list(prompt_rows[begin : begin + batch_size])
    result = generate(
        model,
        token_batches.filled_to(chunk, batch_size),
        drafter=drafter,
        temperature=0.0,
        max_new_tokens=max_new_tokens,
    )
    outputs.extend(result.tokens[i, : result.lengths[i]].tolist() for i in range(len(chunk)))
  return outputs
