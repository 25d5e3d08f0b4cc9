"""Tests' distribution checks: a chi-square test of sampled sequences against their exact joint
law, and samples of a slightly wrong law (the power check: the test must reject them)."""

from __future__ import annotations

import numpy as np
from scipy import stats as scipy_stats


def chi_square_pvalue(samples, joint, vocab):
  """Chi-square p-value of sampled sequences [N, n] against their joint distribution [V] * n."""
  counts = np.bincount(np.ravel_multi_index(tuple(samples.T), joint.shape), minlength=joint.size)
  expected = joint.reshape(-1) / joint.sum() * len(samples)
  cells = expected > 0
  assert counts[~cells].sum() == 0, "sampled a sequence the target gives probability 0"
  big = expected[cells] >= 5  # pool the rare cells: the test's approximation needs >= 5 expected
  observed, expected = counts[cells][big], expected[cells][big]
  if not big.all():
    observed = np.append(observed, counts[cells][~big].sum())
    rare = joint.reshape(-1)[cells][~big] / joint.sum() * len(samples)
    expected = np.append(expected, rare.sum())
  return scipy_stats.chisquare(observed, expected * observed.sum() / expected.sum()).pvalue


def perturbed_samples(joint, count, mixture=0.02, seed=0):
  """Samples of a `mixture` blend of `joint` with uniform over its support: what a subtly wrong
  sampler would emit (the power check: the chi-square test must reject these)."""
  support = (joint > 0) / (joint > 0).sum()
  perturbed = ((1 - mixture) * joint / joint.sum() + mixture * support).reshape(-1)
  flat = np.random.default_rng(seed).choice(joint.size, size=count, p=perturbed / perturbed.sum())
  return np.stack(np.unravel_index(flat, joint.shape), axis=1)
