"""The drafter-selection policy: an MLP over query embeddings, softmax over options.

Paper section 3.1: a 3-layer MLP (Linear(D,512) tanh Linear(512,512) tanh Linear(512,K)) whose
input is the target's sentence embedding of the query and whose output is a distribution over
the drafting options (drafters, and optionally plain autoregressive decoding).

`Policy` holds the network weights as an `nnx.State` pytree plus the metadata needed to use it
later (input width, option names, training config, input standardization). Its jitted functions
(`policy_network`) close over the static graph definition only, never over the weights.

Saved layout (orbax, a directory): item `state` = {params, input_mean, input_scale} (StandardSave)
and item `metadata` = JSON (widths, option names, config, training info).
"""

from __future__ import annotations

import json
import os
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from jax_specsel.bandit import policy_store
from jax_specsel.bandit.policy_network import PolicyNetwork, PolicyProgram, jitted_functions
from jax_specsel.flat_params import cached_flat_params

_FORMAT_VERSION = 1


class Policy:
  """A trained drafter-selection policy.

  Attributes:
    input_dim: width D of the query embeddings it takes.
    num_options: number K of options it chooses among.
    option_names: optional names of the options (e.g. drafter ids, "autoregressive").
    config: the training config (ml_collections.ConfigDict) or None.
    training_info: dict of training facts (steps, resumed_from_step, mean reward per epoch).
    params: the network weights (nnx.State of nnx.Param).
  """

  def __init__(
      self,
      network: PolicyNetwork,
      *,
      input_mean: np.ndarray | None = None,
      input_scale: np.ndarray | None = None,
      option_names: Sequence[str] | None = None,
      config: ml_collections.ConfigDict | None = None,
      training_info: dict[str, Any] | None = None,
  ):
    self.graphdef, self.params = nnx.split(network, nnx.Param)
    self.input_dim = int(network.layers[0].in_features)
    self.num_options = int(network.layers[-1].out_features)
    self.hidden_dim = int(network.layers[0].out_features)
    self.num_layers = len(network.layers)
    mean = np.zeros(self.input_dim) if input_mean is None else input_mean
    scale = np.ones(self.input_dim) if input_scale is None else input_scale
    self.input_mean = jnp.asarray(mean, jnp.float32)  # [D]
    self.input_scale = jnp.asarray(scale, jnp.float32)  # [D]
    if self.input_mean.shape != (self.input_dim,) or self.input_scale.shape != (self.input_dim,):
      raise ValueError(
          f"input_mean/input_scale must have shape ({self.input_dim},), got "
          f"{self.input_mean.shape} and {self.input_scale.shape}"
      )
    self.option_names = check_option_names(option_names, self.num_options)
    self.config = config
    self.training_info = dict(training_info or {})
    self._probabilities_fn, self._choices_fn, self._single_choice_fn = jitted_functions(
        self.graphdef
    )
    self.program = PolicyProgram(self.graphdef)
    self._unused_key = None  # the key greedy calls pass (and ignore), created on first use

  def _check_batch(self, embeddings) -> jax.Array:
    embeddings = jnp.asarray(embeddings, jnp.float32)
    if embeddings.ndim != 2:
      raise ValueError(
          f"expected embeddings of shape [M, {self.input_dim}], got "
          f"{embeddings.shape}; use choose_one for a single [D] embedding"
      )
    if embeddings.shape[1] != self.input_dim:
      raise ValueError(
          f"embeddings have width {embeddings.shape[1]} but the policy was trained "
          f"on width {self.input_dim}; embed queries with the same target model"
      )
    return embeddings

  def probabilities(self, embeddings) -> np.ndarray:
    """Option probabilities pi(.|q).

    Args:
      embeddings: [M, D] query embeddings.

    Returns:
      float32 array [M, K], rows summing to 1.

    Raises:
      ValueError: rows holding NaN/inf (named by index).
    """
    embeddings = self._check_batch(embeddings)
    probabilities, finite = self._probabilities_fn(
        self.params, self.input_mean, self.input_scale, embeddings
    )
    _refuse_non_finite_rows(np.nonzero(~np.asarray(finite))[0], embeddings.shape[0])
    return np.asarray(probabilities)

  def choose(self, embeddings, greedy: bool = True, seed: int = 0) -> np.ndarray:
    """Options for a batch of queries.

    Args:
      embeddings: [M, D] query embeddings.
      greedy: True takes the argmax (the paper's greedy policy); False samples from pi(.|q)
        (the dynamic policy).
      seed: seed of the samples when greedy is False (same seed, same choices).

    Returns:
      int32 array [M] of option indices in [0, K).

    Raises:
      ValueError: rows holding NaN/inf (named by index).
    """
    embeddings = self._check_batch(embeddings)
    key = jax.random.key(seed)
    choices = np.asarray(
        self._choices_fn(
            self.params, self.input_mean, self.input_scale, embeddings, key, bool(greedy)
        )
    )
    _refuse_non_finite_rows(np.nonzero(choices < 0)[0], embeddings.shape[0])
    return choices

  def choose_one(
      self, embedding, greedy: bool = True, seed: int = 0, key: jax.Array | None = None
  ) -> int:
    """The option for one query: the cheap per-query path the paper times (appendix A.7).

    Args:
      embedding: [D] embedding of one query (numpy or a device array; a device array is not
        copied to the host).
      greedy: argmax if True, else a sample from pi(.|q).
      seed: seed of the sample when greedy is False and no key is given.
      key: a jax PRNG key; overrides seed (saves creating a key on every call).

    Returns:
      The option index.
    """
    # Device arrays of the right dtype pass through untouched (a cast would be one more dispatch).
    if not (isinstance(embedding, jax.Array) and embedding.dtype == jnp.float32):
      embedding = np.asarray(embedding, np.float32)
    if embedding.shape != (self.input_dim,):
      raise ValueError(
          f"choose_one takes one embedding of shape ({self.input_dim},), got "
          f"{embedding.shape}; for a batch use choose"
      )
    if key is None:
      # Greedy ignores the key: reuse one instead of creating a key on every call.
      key = self._greedy_key() if greedy else jax.random.key(seed)
    leaves, treedef = cached_flat_params(self, "params")
    choice = int(
        self._single_choice_fn(
            treedef, leaves, self.input_mean, self.input_scale, embedding, key, bool(greedy)
        )
    )
    if choice < 0:
      raise ValueError(
          "the embedding holds NaN/inf: the policy cannot choose for it; check the "
          "model that embedded the query (its dtype or weights)."
      )
    return choice

  def copy(self) -> "Policy":
    """An independent copy: online updates of one leave the other's weights unchanged."""
    network = nnx.merge(self.graphdef, jax.tree.map(jnp.copy, self.params))
    return Policy(
        network,
        input_mean=np.asarray(self.input_mean),
        input_scale=np.asarray(self.input_scale),
        option_names=self.option_names,
        config=self.config,
        training_info=json.loads(json.dumps(self.training_info)),
    )

  def program_inputs(self) -> tuple[list, Any]:
    """(leaves, treedef) of {"params", "input_mean", "input_scale"}: the arrays `program` reads.

    Current after an in-place update of a weight; the structure is flattened once per set of
    arrays (a per-query call should not flatten an nnx.State): see `cached_flat_params`.
    """
    return cached_flat_params(self, "params", "input_mean", "input_scale")

  def _greedy_key(self) -> jax.Array:
    if self._unused_key is None:
      self._unused_key = jax.random.key(0)
    return self._unused_key

  def option_name(self, index: int) -> str:
    """Name of option `index` (its index as a string when no names were given)."""
    return str(index) if self.option_names is None else self.option_names[index]

  def _metadata(self) -> dict[str, Any]:
    return {
        "format_version": _FORMAT_VERSION,
        "input_dim": self.input_dim,
        "num_options": self.num_options,
        "hidden_dim": self.hidden_dim,
        "num_layers": self.num_layers,
        "option_names": self.option_names,
        "config": None if self.config is None else json.loads(self.config.to_json()),
        "training_info": self.training_info,
    }

  def save(self, path: str | os.PathLike, overwrite: bool = False) -> None:
    """Writes the policy to directory `path` with orbax (weights + metadata).

    The policy is written beside `path` and swapped in by renames (`policy_store`): a process
    killed at any point leaves either the old or the new policy loadable, a kill between the
    renames is repaired by the next `load_policy` or `save`, and every save removes what earlier
    interrupted saves left beside `path`.

    Args:
      path: directory to create.
      overwrite: replace an existing directory instead of raising FileExistsError.
    """
    path = os.path.abspath(os.fspath(path))
    policy_store.recover_interrupted_save(path)
    if os.path.lexists(path) and not overwrite:
      raise FileExistsError(f"{path} exists; pass overwrite=True or choose a new path")
    state = {"params": self.params, "input_mean": self.input_mean, "input_scale": self.input_scale}
    staging = policy_store.staging_path(path)
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
      checkpointer.save(
          staging,
          args=ocp.args.Composite(
              state=ocp.args.StandardSave(state), metadata=ocp.args.JsonSave(self._metadata())
          ),
      )
    policy_store.swap_in(staging, path)


def check_option_names(option_names: Sequence[str] | None, num_options: int) -> list[str] | None:
  """The names as strings, one per option and all distinct (None stays None).

  Raises:
    ValueError: a count other than `num_options`, or a name given twice.
  """
  if option_names is None:
    return None
  if isinstance(option_names, str):
    raise ValueError(
        f"option_names={option_names!r}: pass a list of {num_options} names, " "not one string."
    )
  names = [str(name) for name in option_names]
  if len(names) != num_options:
    raise ValueError(
        f"{len(names)} option names for {num_options} options (reward columns): "
        f"{names}; pass one name per column."
    )
  repeated = sorted({name for name in names if names.count(name) > 1})
  if repeated:
    raise ValueError(
        f"option names {repeated} are given more than once in {names}: every "
        "option needs its own name (choices are reported by name)."
    )
  return names


def _refuse_non_finite_rows(rows: np.ndarray, total: int) -> None:
  if rows.size:
    raise ValueError(
        f"embeddings rows {rows[:10].tolist()}{' ...' if rows.size > 10 else ''} "
        f"({rows.size} of {total}) hold NaN/inf: the policy cannot choose for them; "
        "check the model that embedded those queries (its dtype or weights), or "
        "drop them."
    )


def non_finite_arrays(tree) -> list[str]:
  """Paths (e.g. "params/layers/0/kernel") of the arrays in `tree` holding NaN or inf."""
  return [
      jax.tree_util.keystr(key_path, simple=True, separator="/").removesuffix("/value")
      for key_path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
      if not np.all(np.isfinite(np.asarray(leaf)))
  ]


class PolicyLoadError(ValueError):
  """A policy directory is empty, incomplete or damaged (the message names it and the fix)."""


def load_policy(path: str | os.PathLike) -> Policy:
  """Loads a policy written by `Policy.save`.

  Args:
    path: the directory given to `save`.

  Returns:
    The policy, with identical weights, standardization, option names and config.

  Raises:
    FileNotFoundError: no directory at `path`.
    PolicyLoadError: the directory is empty, lacks an item, or cannot be read.
  """
  path = os.path.abspath(os.fspath(path))
  policy_store.recover_interrupted_save(path)
  if not os.path.isdir(path):
    raise FileNotFoundError(
        f"no saved policy at {path} (expected a directory from Policy.save)"
        + policy_store.leftovers_note(path)
    )
  _check_policy_dir(path)
  try:
    return _restore(path)
  except PolicyLoadError:
    raise
  except Exception as err:  # orbax, TensorStore and json raise many classes for damaged files
    detail = str(err).splitlines()[0][:200] if str(err) else ""
    raise PolicyLoadError(
        f"cannot read the policy at {path} ({type(err).__name__}: {detail}): the "
        "directory is damaged or was written only in part; train and save the "
        "policy again (launch/train_policy.py) or restore a copy."
    ) from err


def _check_policy_dir(path: str) -> None:
  if not os.listdir(path):
    raise PolicyLoadError(
        f"{path} is empty: no policy was saved there; train one "
        "(launch/train_policy.py) or pass the directory Policy.save wrote."
    )
  missing = [item for item in policy_store.ITEMS if not os.path.isdir(os.path.join(path, item))]
  if missing:
    raise PolicyLoadError(
        f"{path} lacks {missing}: it is not a complete Policy.save directory; "
        "train and save the policy again or restore a copy."
    )


def _restore(path: str) -> Policy:
  with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
    metadata = checkpointer.restore(path, args=ocp.args.Composite(metadata=ocp.args.JsonRestore()))[
        "metadata"
    ]
    if metadata.get("format_version") != _FORMAT_VERSION:
      raise PolicyLoadError(
          f"{path} has policy format {metadata.get('format_version')}, this "
          f"library reads format {_FORMAT_VERSION}"
      )
    abstract_network = nnx.eval_shape(
        lambda: PolicyNetwork(
            metadata["input_dim"],
            metadata["num_options"],
            metadata["hidden_dim"],
            metadata["num_layers"],
            rngs=nnx.Rngs(0),
        )
    )
    _, abstract_params = nnx.split(abstract_network, nnx.Param)
    vector = jax.ShapeDtypeStruct((metadata["input_dim"],), jnp.float32)
    target = {"params": abstract_params, "input_mean": vector, "input_scale": vector}
    state = checkpointer.restore(
        path, args=ocp.args.Composite(state=ocp.args.StandardRestore(target))
    )["state"]
  damaged = non_finite_arrays(state)
  if damaged:
    raise PolicyLoadError(
        f"{os.path.join(path, 'state')} holds NaN/inf in {damaged}: the weight "
        "file is damaged (or was saved from a diverged training); restore a "
        "copy, or train and save the policy again."
    )
  try:
    check_option_names(metadata["option_names"], metadata["num_options"])
  except ValueError as err:
    raise PolicyLoadError(
        f"{os.path.join(path, 'metadata')}: {err} The file was edited or "
        "damaged; restore a copy or save the policy again."
    ) from None
  network = nnx.merge(nnx.graphdef(abstract_network), state["params"])
  config = metadata["config"]
  return Policy(
      network,
      input_mean=np.asarray(state["input_mean"]),
      input_scale=np.asarray(state["input_scale"]),
      option_names=metadata["option_names"],
      config=None if config is None else ml_collections.ConfigDict(config),
      training_info=metadata["training_info"],
  )
