"""The fitter: recovery on synthetic data, published refits, allocation, EL, CIs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import scipy.special

from moejax.scaling.fit import (Objective, compute_optimal, efficiency_leverage, fit, huber,
                                loss_at_compute, loss_nd)
from moejax.scaling.laws import CHINCHILLA, CLARK, KRAJEWSKI, LAWS, SPARSITY
from tests.scaling.conftest import TRUE, reference_table, synthetic

# Relative tolerance per law for recovering parameters from 300 points at 0.1% noise.
RTOL = {"chinchilla": 0.05, "clark": 0.05, "krajewski": 0.05, "sparsity": 0.15,
        "efficiency_leverage": 0.02}


def test_huber_matches_scipy():
  r = np.linspace(-0.01, 0.01, 101)
  np.testing.assert_allclose(huber(r, 1e-3), scipy.special.huber(1e-3, r), rtol=1e-12)


@pytest.mark.parametrize("name", ["chinchilla", "clark", "sparsity"])
def test_gradient_matches_finite_differences(name):
  law = LAWS[name]
  X, y, p = synthetic(law, n=50, noise=0.02)
  obj = Objective(law, X, y, delta=1e-2)
  t = law.to_theta(p) + 0.01
  f, g = obj(t)
  h = 1e-6
  fd = [(obj(t + h * e)[0] - obj(t - h * e)[0]) / (2 * h) for e in np.eye(len(t))]
  np.testing.assert_allclose(g, fd, rtol=1e-4, atol=1e-9)


@pytest.mark.parametrize("name", sorted(LAWS))
def test_recovers_known_parameters(name):
  law = LAWS[name]
  X, y, p = synthetic(law)
  starts = 3 if name == "sparsity" else 6  # sparsity: 10 params, slowest per start
  res = fit(law, X, y, max_starts=starts)
  got = law.params_array(res.params)
  np.testing.assert_allclose(got, p, rtol=RTOL[name], err_msg=str(res.params))
  noise = 1e-3 / np.log(10) if law.resid_log == "log10" else 1e-3
  assert res.rmse_log == pytest.approx(noise, rel=0.2)  # the noise level
  assert res.n_points == len(y) and res.n_starts == starts


def test_fixed_params_and_json():
  X, y, p = synthetic(CLARK)
  fixed = {"E_start": TRUE["clark"]["E_start"], "E_max": TRUE["clark"]["E_max"]}
  res = fit(CLARK, X, y, fixed=fixed, max_starts=4, bootstrap=20, cv_folds=3)
  assert res.params["E_start"] == pytest.approx(fixed["E_start"], rel=1e-12)
  assert set(res.ci) == {"a", "b", "c", "d"}  # no intervals for fixed params
  d = json.loads(res.to_json())
  assert {"law", "params", "ci", "huber_loss", "rmse_log", "n_points"} <= set(d)
  assert d["fixed"] == ["E_max", "E_start"] and d["cv_rmse_log"] > 0


def test_bootstrap_ci_contains_truth_and_cv_error():
  X, y, p = synthetic(CHINCHILLA, n=120, noise=5e-3, seed=4)
  res = fit(CHINCHILLA, X, y, max_starts=6, bootstrap=40, cv_folds=4, seed=1)
  for name, true in zip(CHINCHILLA.param_names, p):
    lo, hi = res.ci[name]
    assert lo < true < hi, (name, lo, true, hi)
    assert lo <= res.params[name] <= hi
  # Held-out error near the noise level, and no better than the in-sample error.
  assert res.rmse_log <= res.cv_rmse_log < 1.5 * 5e-3
  tight = fit(CHINCHILLA, X, y, max_starts=2, bootstrap=40, seed=1, ci_level=0.5)
  assert all(tight.ci[k][1] - tight.ci[k][0] < res.ci[k][1] - res.ci[k][0] for k in res.ci)


def test_chinchilla_reproduces_besiroglu_refit():
  """Hoffmann's procedure on the 240 non-outlier points of Besiroglu et al.'s data:
  Huber delta 1e-3 on ln-loss residuals, L-BFGS from their 5400-point grid, screened
  to the 20 starts with the lowest initial objective (the full grid gives the same
  optimum, see docs/scaling.md)."""
  t = reference_table("chinchilla_epoch.csv")
  keep = t["epoch_outlier_excluded"] == 0
  assert keep.sum() == 240
  res = fit(CHINCHILLA, {"N": t["N_params"][keep], "D": t["D_tokens"][keep]},
            t["loss"][keep], huber_delta=1e-3, max_starts=20)
  pub = CHINCHILLA.reference
  for k, tol in {"E": 0.01, "alpha": 0.01, "beta": 0.01, "A": 0.10, "B": 0.10}.items():
    assert res.params[k] == pytest.approx(pub[k], rel=tol), (k, res.params)


def _clark_data():
  t = reference_table("clark2022_final_step.csv")
  m = ((t["k"] == 1) & (t["routing_frequency"] == 0.5) & (t["seed"] == 42)
       & ((t["router_type"] == "S-Base") | (t["router_type"] == "Dense")))
  return {"N": t["dense_parameter_count"][m], "E": t["num_experts"][m]}, t["loss_validation"][m]


def test_clark_reproduces_table3_sbase():
  """S-Base (k=1, R=0.5, seed 42) plus the dense runs as E=1. E_start and E_max are
  poorly identified (a free fit moves b and d by ~0.015-0.02), so they are held at
  the published values and a, b, c, d are fitted."""
  X, y = _clark_data()
  assert len(y) == 58 and np.sum(X["E"] == 1) == 5
  pub = CLARK.reference
  res = fit(CLARK, X, y, fixed={"E_start": pub["E_start"], "E_max": pub["E_max"]},
            max_starts=4)
  for k in "abcd":
    assert abs(res.params[k] - pub[k]) < 0.01, (k, res.params)
  assert res.rmse_log < 0.005


@pytest.mark.parametrize("law,fixed", [(CHINCHILLA, {}), (KRAJEWSKI, {"G": 4.0}),
                                       (SPARSITY, {"S": 0.875})])
def test_compute_optimal_matches_brute_force(law, fixed):
  p = law.params_array(TRUE[law.name])
  for C in (1e19, 1e21, 1e23):
    N, D = compute_optimal(law, p, C, **fixed)
    assert 6 * N * D == pytest.approx(C, rel=1e-12)
    Ns = np.logspace(5, np.log10(C / 6) - 3, 200001)
    Ls = loss_nd(law, p, Ns, C / (6 * Ns), **fixed)
    n_bf = Ns[np.argmin(Ls)]
    assert N == pytest.approx(n_bf, rel=2e-3)
    assert float(loss_nd(law, p, N, D, **fixed)) <= Ls.min() + 1e-12


def test_compute_optimal_undefined_and_missing_fixed():
  with pytest.raises(ValueError, match="not defined"):
    compute_optimal("clark", CLARK.params_array(TRUE["clark"]), 1e20)
  with pytest.raises(ValueError, match="G="):
    compute_optimal(KRAJEWSKI, KRAJEWSKI.params_array(TRUE["krajewski"]), 1e20)


@pytest.mark.parametrize("allocation", ["optimal", 20.0])
def test_efficiency_leverage_closed_form(allocation):
  """With alpha = beta, scaling A and B by k scales L* - E by k, and L* - E ~ C^(-alpha/2)
  under either allocation, so the dense compute matching the MoE is k^(-2/alpha) C."""
  al, k = 0.3, 0.8
  dense = {"E": 1.7, "A": 400.0, "B": 900.0, "alpha": al, "beta": al}
  moe = dict(dense, A=400.0 * k, B=900.0 * k)
  el = efficiency_leverage("chinchilla", dense, "chinchilla", moe, 1e21, allocation)
  assert el == pytest.approx(k ** (-2 / al), rel=1e-8)
  assert efficiency_leverage("chinchilla", dense, "chinchilla", dense, 1e21,
                             allocation) == pytest.approx(1.0, rel=1e-8)
  below = dict(dense, E=1.0)  # MoE loss under the dense irreducible loss
  assert efficiency_leverage("chinchilla", dense, "chinchilla", below, 1e24) == np.inf
  # Consistency: the dense law at EL * C reaches the MoE loss at C.
  lm = loss_at_compute("chinchilla", moe, 1e21, allocation)
  ld = loss_at_compute("chinchilla", dense, el * 1e21, allocation)
  assert ld == pytest.approx(lm, rel=1e-10)
