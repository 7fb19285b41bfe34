"""Shared helpers for the scaling-law tests: reference data and synthetic designs."""

from __future__ import annotations

import pathlib

import numpy as np

from moejax.scaling.data import read_table
from moejax.scaling.laws import Law
from moejax.scaling.reference import reference_path

REPO = pathlib.Path(__file__).resolve().parents[2]
REFERENCE = reference_path("chinchilla_epoch").parent  # the package's reference_data/

# Ground truth for the synthetic recovery tests (published values where they exist).
TRUE = {
    "chinchilla": dict(E=1.8, A=400.0, B=2000.0, alpha=0.34, beta=0.36),
    "clark": dict(a=-0.082, b=-0.108, c=0.009, d=1.104, E_start=1.847, E_max=314.478),
    "krajewski": dict(a=18.1, alpha=0.115, b=30.8, beta=0.147, c=0.47, g=2.1, gamma=0.58),
    "sparsity": {"a": 30.0, "alpha": 0.3, "b": 50.0, "beta": 0.3, "c": 0.3, "lambda": -0.3,
                 "d": 5.0, "delta": 0.2, "gamma": 0.15, "e": 1.0},
    "efficiency_leverage": dict(a=1.23, d=-7.61e-2, gamma=1.67e-2, beta=-1.17e-1,
                                A_start=1.63e-2, A_max=1e3),
}


def design(law: Law, n: int, seed: int = 1) -> dict[str, np.ndarray]:
  """Random design points spanning a few decades of each variable of `law`."""
  g = np.random.default_rng(seed)
  span = {"N": lambda: 10 ** g.uniform(7, 10, n), "D": lambda: 10 ** g.uniform(9, 12, n),
          "E": lambda: 2.0 ** g.integers(0, 10, n), "G": lambda: 2.0 ** g.integers(0, 6, n),
          "S": lambda: 1 - 1 / 2.0 ** g.integers(0, 7, n),
          "A": lambda: 1 / 2.0 ** g.integers(1, 8, n), "C": lambda: 10 ** g.uniform(18, 23, n)}
  return {v: span[v]() for v in law.variables}


def synthetic(law: Law, n: int = 300, noise: float = 1e-3, seed: int = 0):
  """(X, y, true params array): y = law(true) * exp(noise * standard normal)."""
  X = design(law, n)
  p = law.params_array(TRUE[law.name])
  y = law.predict(p, **X) * np.exp(noise * np.random.default_rng(seed).standard_normal(n))
  return X, y, p


def reference_table(name: str) -> dict[str, np.ndarray]:
  """Columns of a table shipped in moejax/scaling/reference_data (always present)."""
  return read_table(str(reference_path(name)))
