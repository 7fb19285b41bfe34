"""The law objects: registry, shapes, reparametrisation, grids, transforms."""

from __future__ import annotations

import numpy as np
import pytest

from moejax.scaling.laws import CHINCHILLA, CLARK, EFFICIENCY_LEVERAGE, LAWS, a_hat, e_hat, get_law
from tests.scaling.conftest import TRUE, design


def test_registry_and_bad_name():
  assert set(LAWS) == {"chinchilla", "clark", "krajewski", "sparsity", "efficiency_leverage"}
  assert get_law("clark") is CLARK
  with pytest.raises(ValueError) as e:
    get_law("kaplan")
  msg = str(e.value)
  assert "--law" in msg and "'kaplan'" in msg and all(n in msg for n in LAWS)


@pytest.mark.parametrize("name", sorted(LAWS))
def test_law_fields_and_batched_predict(name):
  law = LAWS[name]
  assert set(law.init) == set(law.param_names) and set(law.log_params) <= set(law.param_names)
  assert law.formula and law.source
  X = design(law, 7)
  p = law.params_array(TRUE[name])
  y = law.predict(p, **X)
  assert y.shape == (7,) and np.all(np.isfinite(y)) and np.all(y > 0)
  batch = np.stack([p, p * 1.01])
  yb = law.predict(batch, **X)
  assert yb.shape == (2, 7)
  np.testing.assert_allclose(yb[0], y, rtol=1e-12)
  np.testing.assert_allclose(yb[1], law.predict(p * 1.01, **X), rtol=1e-12)
  np.testing.assert_allclose(law.from_theta(law.to_theta(p)), p, rtol=1e-12)
  with pytest.raises(ValueError, match="missing"):
    law.predict(p, **{k: v for k, v in list(X.items())[1:]})


def test_chinchilla_formula_and_grid():
  p = np.array([1.7, 400.0, 410.0, 0.34, 0.28])
  N, D = np.array([1e9]), np.array([2e10])
  np.testing.assert_allclose(CHINCHILLA.predict(p, N=N, D=D),
                             1.7 + 400 / 1e9 ** 0.34 + 410 / 2e10 ** 0.28, rtol=1e-14)
  g = CHINCHILLA.grid()
  assert g.shape == (5400, 5)  # Besiroglu et al.'s 6*6*6*5*5 starts
  sub = CHINCHILLA.grid(100, seed=3)
  assert sub.shape == (100, 5) and np.array_equal(sub, CHINCHILLA.grid(100, seed=3))
  assert {tuple(r) for r in sub} <= {tuple(r) for r in g}


def test_e_hat_saturates():
  E = np.array([1.0, 2.0, 8.0, 64.0, 1e6])
  eh = e_hat(E, 1.847, 314.478)
  assert eh[0] == pytest.approx(1.847)  # dense maps to E_start
  assert np.all(np.diff(eh) > 0) and eh[-1] < 314.478 and eh[-1] > 0.99 * 314.478
  np.testing.assert_allclose(e_hat(E[:3], 1.847, 1e30), E[:3] - 1 + 1.847, rtol=1e-12)
  np.testing.assert_allclose(a_hat(np.array([0.0, 0.1]), 0.02, 1e30), [0.02, 0.12], rtol=1e-9)


def test_clark_is_log10_linear():
  p = CLARK.params_array(TRUE["clark"])
  N, E = np.array([1e8, 1e9]), np.array([8.0, 8.0])
  lE = np.log10(e_hat(E, p[4], p[5]))
  want = p[0] * np.log10(N) + p[1] * lE + p[2] * np.log10(N) * lE + p[3]
  np.testing.assert_allclose(np.log10(CLARK.predict(p, N=N, E=E)), want, rtol=1e-12)


def test_published_el_constants_reproduce_headline():
  """Our log-base reading of the EL law: the paper's constants give 'over 7x' EL at
  1e22 FLOPs, activation ratio 3.1%, granularity 12 (Ling-mini-beta's design)."""
  p = EFFICIENCY_LEVERAGE.params_array(EFFICIENCY_LEVERAGE.reference)
  el = EFFICIENCY_LEVERAGE.predict(p, A=np.array([0.031]), G=np.array([12.0]),
                                   C=np.array([1e22]))
  assert 7.0 < el[0] < 7.6
  lower_c = EFFICIENCY_LEVERAGE.predict(p, A=np.array([0.031]), G=np.array([12.0]),
                                        C=np.array([1e20]))
  assert lower_c[0] < el[0]  # leverage grows with compute
