r"""Which policy-gradient estimator learns the drafter choice best, and from how few examples?

A synthetic contextual bandit with the shape of the real problem: query embeddings from
`num_clusters` overlapping Gaussian clusters (domains), `num_options` options (drafters), each
cluster with its own best option; rewards = the cluster's mean reward of the option + Gaussian
noise. Trains `jax_specsel.bandit.train_policy` with each estimator on N training examples and
measures greedy best-arm accuracy (and expected-reward regret) on held-out queries.

  python benchmarks/experiment_estimators.py --output=/tmp/estimators.json
"""

from __future__ import annotations

import itertools
import json
import time

import common  # first: the hubs' offline defaults come before any Hugging Face import

# isort: split

import numpy as np
from absl import flags

from jax_specsel import bandit, experiment, validation

FLAGS = flags.FLAGS
flags.DEFINE_string("output", None, "write the results as JSON to this path")
flags.DEFINE_list("sizes", ["256", "1024", "4096", "16384"], "training set sizes")
flags.DEFINE_integer("seeds", 3, "seeds per (estimator, size)")
flags.DEFINE_integer("test_size", 4096, "held-out queries")
flags.DEFINE_integer("dim", 64, "embedding width D")
flags.DEFINE_float(
    "cluster_spread",
    0.5,
    "std of cluster centres per dimension (embedding noise std is 1; 0.5 leaves a Bayes-optimal\n"
    "    best-arm accuracy of ~99%: the clusters overlap)",
)
flags.DEFINE_float("reward_noise", 0.15, "std of the reward noise")
flags.DEFINE_bool(
    "standardize_variant",
    True,
    "also run the default estimator with standardized inputs on " "shifted, anisotropic embeddings",
)

# Mean reward of each option (column) in each cluster (row): a different best option per
# cluster (clusters 0 and 3 share option 0), best 0.6 against 0.45-0.5.
_MEAN_REWARDS = np.array(
    [[0.60, 0.50, 0.45], [0.45, 0.60, 0.50], [0.50, 0.45, 0.60], [0.60, 0.45, 0.50]]
)

# Raw inputs as in the paper, then the library default (expected + standardized inputs).
_VARIANTS = {
    "reinforce/none (paper)": dict(
        estimator="reinforce", baseline="none", standardize_inputs=False
    ),
    "reinforce/mean": dict(estimator="reinforce", baseline="mean", standardize_inputs=False),
    "expected": dict(estimator="expected", baseline="none", standardize_inputs=False),
    "expected + standardize": dict(estimator="expected", baseline="none", standardize_inputs=True),
}


def make_bandit(
    num_examples: int,
    centres: np.ndarray,
    rng: np.random.Generator,
    reward_noise: float,
    warp: tuple[np.ndarray, np.ndarray] | None = None,
):
  """Samples (embeddings [N, D], noisy rewards [N, K], best option [N], mean rewards [N, K])."""
  clusters = rng.integers(0, len(centres), num_examples)
  embeddings = centres[clusters] + rng.normal(size=(num_examples, centres.shape[1]))
  if warp is not None:
    # Pooled transformer states share a large offset and have very uneven per-dim scales.
    offset, scales = warp
    embeddings = offset + embeddings * scales
  mean_rewards = _MEAN_REWARDS[clusters]
  rewards = mean_rewards + reward_noise * rng.normal(size=mean_rewards.shape)
  return (
      embeddings.astype(np.float32),
      rewards.astype(np.float32),
      mean_rewards.argmax(axis=1),
      mean_rewards,
  )


def evaluate(policy: bandit.Policy, embeddings, best_options, mean_rewards) -> dict[str, float]:
  """Greedy best-arm accuracy and mean regret in expected reward on held-out queries."""
  choices = policy.choose(embeddings, greedy=True)
  rows = np.arange(len(choices))
  regret = mean_rewards.max(axis=1) - mean_rewards[rows, choices]
  return {"accuracy": float(np.mean(choices == best_options)), "regret": float(regret.mean())}


def bayes_optimal_accuracy(centres, embeddings, best_options) -> float:
  """Accuracy of the best possible policy: knows the centres, picks max posterior reward."""
  sq_distances = ((embeddings[:, None, :] - centres[None]) ** 2).sum(-1)  # [N, clusters]
  log_posterior = -0.5 * (sq_distances - sq_distances.min(axis=1, keepdims=True))
  posterior = np.exp(log_posterior)
  posterior /= posterior.sum(axis=1, keepdims=True)
  return float(np.mean((posterior @ _MEAN_REWARDS).argmax(axis=1) == best_options))


def run_variant(name: str, overrides: dict, sizes, seeds: int, warp=None) -> list[dict]:
  """Trains and evaluates one estimator variant for every (size, seed)."""
  results = []
  for size, seed in itertools.product(sizes, range(seeds)):
    rng = np.random.default_rng(1000 + seed)
    centres = FLAGS.cluster_spread * rng.normal(size=(len(_MEAN_REWARDS), FLAGS.dim))
    train = make_bandit(size, centres, rng, FLAGS.reward_noise, warp)
    test = make_bandit(FLAGS.test_size, centres, rng, FLAGS.reward_noise, warp)
    config = bandit.paper_train_config()
    config.update(overrides)
    start = time.perf_counter()
    policy = bandit.train_policy(train[0], train[1], seed=seed, config=config)
    seconds = time.perf_counter() - start
    metrics = evaluate(policy, *test[0:1], test[2], test[3])
    results.append(
        {"variant": name, "size": size, "seed": seed, "train_seconds": seconds, **metrics}
    )
    if warp is None and name == next(iter(_VARIANTS)):
      results.append(
          {
              "variant": "bayes-optimal (true centres)",
              "size": size,
              "seed": seed,
              "accuracy": bayes_optimal_accuracy(centres, test[0], test[2]),
          }
      )
    print(
        f"{name:28s} N={size:6d} seed={seed} acc={metrics['accuracy']:.3f} "
        f"regret={metrics['regret']:.4f} ({seconds:.1f}s)",
        flush=True,
    )
  return results


def summary_table(results: list[dict], sizes) -> str:
  """Mean (min-max) accuracy per variant and size, as text."""
  lines = [f"{'variant':30s}" + "".join(f"{'N=' + str(s):>22s}" for s in sizes)]
  for name in dict.fromkeys(r["variant"] for r in results):
    cells = []
    for size in sizes:
      accs = [r["accuracy"] for r in results if r["variant"] == name and r["size"] == size]
      cells.append(f"{100 * np.mean(accs):6.1f}% ({100 * min(accs):.0f}-{100 * max(accs):.0f})")
    lines.append(f"{name:30s}" + "".join(f"{c:>22s}" for c in cells))
  return "\n".join(lines)


def check_flags() -> list[int]:
  """Validates every flag and the output path before any training; returns the sizes."""
  sizes = experiment.integer_list_flag("sizes")
  experiment.integer_flags("seeds", "test_size", "dim")
  for name in ("cluster_spread", "reward_noise"):
    validation.real(f"--{name}", FLAGS[name].value, 0.0)
  if FLAGS.output:
    validation.writable_file(FLAGS.output, "--output")
  return sizes


def main(argv):
  del argv
  sizes = common.checked(check_flags)  # one line, before any training
  results = []
  for name, overrides in _VARIANTS.items():
    results += run_variant(name, overrides, sizes, FLAGS.seeds)
  if FLAGS.standardize_variant:
    rng = np.random.default_rng(7)
    warp = (rng.normal(scale=5.0, size=FLAGS.dim), np.exp(rng.normal(scale=1.0, size=FLAGS.dim)))
    for standardize in (False, True):
      name = f"expected, warped, std={standardize}"
      results += run_variant(
          name,
          dict(estimator="expected", baseline="none", standardize_inputs=standardize),
          sizes,
          FLAGS.seeds,
          warp,
      )
  table = summary_table(results, sizes)
  print("\nGreedy best-arm accuracy on held-out queries, mean (min-max) over seeds\n" + table)
  if FLAGS.output:
    with open(FLAGS.output, "w") as f:
      json.dump(
          {
              "mean_rewards": _MEAN_REWARDS.tolist(),
              "dim": FLAGS.dim,
              "cluster_spread": FLAGS.cluster_spread,
              "reward_noise": FLAGS.reward_noise,
              "test_size": FLAGS.test_size,
              "results": results,
              "table": table,
          },
          f,
          indent=1,
      )


if __name__ == "__main__":
  common.run(main)
