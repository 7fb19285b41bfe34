"""Fit scaling laws: Huber on log residuals, L-BFGS from a grid, bootstrap CIs.

The procedure is Hoffmann et al. 2022's Approach 3 as refit by Besiroglu et
al. 2024: minimise sum_i Huber_delta(r_i) with r_i = log(pred_i) - log(obs_i)
(natural log; log10 for laws with `resid_log == "log10"`, i.e. clark, whose
law is stated in log10), with scipy's L-BFGS-B in float64 in the law's
reparametrised space (positive parameters as logs), from every point of the
law's init grid, keeping the best. Gradients are exact: complex-step
derivatives of the (analytic) prediction, one vectorised call per evaluation.

Everything is NumPy/SciPy float64, so nothing here touches JAX's x64 flag.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping

import numpy as np
import scipy.optimize

from moejax.scaling.laws import Law, get_law

Array = np.ndarray
_H = 1e-20  # complex-step size: exact derivatives, no cancellation


def huber(r: Array, delta: float) -> Array:
  """0.5 r^2 for |r| <= delta, delta (|r| - delta/2) beyond (scipy.special.huber)."""
  a = np.abs(r)
  return np.where(a <= delta, 0.5 * r * r, delta * (a - 0.5 * delta))


@dataclasses.dataclass
class FitResult:
  """Best fit of one law to one data set, with optional CIs and validation error."""
  law: str
  params: dict[str, float]
  ci: dict[str, tuple[float, float]]
  huber_loss: float
  rmse_log: float
  n_points: int
  huber_delta: float = 1e-3
  resid_log: str = "ln"
  n_starts: int = 0
  fixed: tuple[str, ...] = ()
  cv_rmse_log: float | None = None
  extras: dict = dataclasses.field(default_factory=dict)

  def to_dict(self) -> dict:
    d = dataclasses.asdict(self)
    d["ci"] = {k: [float(lo), float(hi)] for k, (lo, hi) in self.ci.items()}
    d["fixed"] = list(self.fixed)
    return d

  def to_json(self, **kw) -> str:
    return json.dumps(self.to_dict(), indent=kw.pop("indent", 2), **kw)


class Objective:
  """Huber objective of `law` on (X, y) over the free coordinates of theta."""

  def __init__(self, law: Law, X: Mapping[str, Array], y: Array, delta: float = 1e-3,
               fixed: Mapping[str, float] | None = None):
    self.law, self.delta = law, float(delta)
    self.X = {k: np.asarray(X[k], dtype=np.float64) for k in law.variables}
    self.y = np.asarray(y, dtype=np.float64)
    if np.any(~np.isfinite(self.y)) or np.any(self.y <= 0):
      raise ValueError(f"targets {law.target} must be finite and > 0 for log residuals")
    self.log = np.log10 if law.resid_log == "log10" else np.log
    self.logy = self.log(self.y)
    fixed = dict(fixed or {})
    bad = set(fixed) - set(law.param_names)
    if bad:
      raise ValueError(f"fixed params {sorted(bad)} not in {law.param_names}")
    self.free = np.array([n not in fixed for n in law.param_names])
    self.theta_fixed = law.to_theta(np.array([fixed.get(n, 1.0) for n in law.param_names]))

  def full(self, tf: Array) -> Array:
    """Free coordinates (..., F) -> full theta (..., P)."""
    tf = np.asarray(tf)
    out = np.broadcast_to(self.theta_fixed, tf.shape[:-1] + self.theta_fixed.shape)
    out = out.astype(tf.dtype if np.iscomplexobj(tf) else np.float64, copy=True)
    out[..., self.free] = tf
    return out

  def resid(self, theta: Array) -> Array:
    """log(pred) - log(obs) for full theta (P,) or (S, P)."""
    with np.errstate(all="ignore"):
      return self.log(self.law.predict(self.law.from_theta(theta), **self.X)) - self.logy

  def values(self, tf: Array, chunk: int = 512) -> Array:
    """Objective at each row of tf (S, F); non-finite -> inf. For grid screening."""
    out = []
    for i in range(0, len(tf), chunk):
      r = self.resid(self.full(tf[i:i + chunk]))
      v = huber(r, self.delta).sum(-1)
      out.append(np.where(np.isfinite(v), v, np.inf))
    return np.concatenate(out) if out else np.zeros(0)

  def __call__(self, tf: Array) -> tuple[float, Array]:
    """(objective, gradient) at free coordinates tf (F,), by complex step."""
    F = tf.shape[0]
    batch = np.tile(tf.astype(np.complex128), (F + 1, 1))
    batch[1:] += 1j * _H * np.eye(F)
    r = self.resid(self.full(batch))
    r0, J = r[0].real, r[1:].imag / _H
    f = float(huber(r0, self.delta).sum())
    if not np.isfinite(f):
      return 1e30, np.zeros(F)
    g = J @ np.clip(r0, -self.delta, self.delta)
    return f, np.where(np.isfinite(g), g, 0.0)


_LBFGS = {"maxiter": 5000, "maxfun": 20000, "ftol": 1e-15, "gtol": 1e-12, "maxcor": 20}


def _minimize(obj: Objective, t0: Array) -> tuple[Array, float]:
  res = scipy.optimize.minimize(obj, t0, jac=True, method="L-BFGS-B", options=_LBFGS)
  return res.x, float(res.fun)


def _best(obj: Objective, starts: Array) -> tuple[Array, float]:
  best_t, best_f = starts[0], math.inf
  for t0 in starts:
    t, f = _minimize(obj, t0)
    if np.isfinite(f) and f < best_f:
      best_t, best_f = t, f
  return best_t, best_f


def _take(X: Mapping[str, Array], idx: Array) -> dict[str, Array]:
  return {k: np.asarray(v)[idx] for k, v in X.items()}


def fit(law: Law | str, X: Mapping[str, Array], y: Array, *, huber_delta: float = 1e-3,
        fixed: Mapping[str, float] | None = None, max_starts: int | None = None,
        grid_points: int | None = 20000, bootstrap: int = 0, ci_level: float = 0.95,
        cv_folds: int = 0, seed: int = 0) -> FitResult:
  """Best-of-grid Huber fit of `law` to targets `y` at variables `X`.

  max_starts: run L-BFGS only from the `max_starts` grid points with the lowest
    initial objective (deterministic screening); None runs every grid point.
  grid_points: cap on the init grid (a seeded sample of the product beyond it).
  fixed: parameters held at given natural-unit values (e.g. clark's E_start).
  bootstrap: resamples (with replacement, seeded) for percentile CIs at
    `ci_level`; each refit warm-starts from the best fit, not the grid.
  cv_folds: k-fold (seeded shuffle) held-out RMSE of log residuals, each fold
    warm-started from the best fit.
  """
  law = get_law(law) if isinstance(law, str) else law
  y = np.asarray(y, dtype=np.float64)
  obj = Objective(law, X, y, huber_delta, fixed)
  grid = law.grid(grid_points, seed)[:, obj.free]
  if max_starts is not None and max_starts < len(grid):
    order = np.argsort(obj.values(grid), kind="stable")
    grid = grid[order[:max_starts]]
  t, f = _best(obj, grid)
  theta = obj.full(t)
  r = obj.resid(theta)
  params = law.from_theta(theta)
  names = [n for n, free in zip(law.param_names, obj.free) if free]
  ci: dict[str, tuple[float, float]] = {}
  rng = np.random.default_rng(seed)
  n = len(y)
  if bootstrap:
    draws = []
    for _ in range(bootstrap):
      idx = rng.integers(0, n, n)
      ob = Objective(law, _take(obj.X, idx), y[idx], huber_delta, fixed)
      draws.append(law.from_theta(ob.full(_minimize(ob, t)[0])))
    draws = np.array(draws)
    q = 100 * (1 - ci_level) / 2
    lo, hi = np.nanpercentile(draws, [q, 100 - q], axis=0)
    ci = {nm: (float(lo[i]), float(hi[i])) for i, nm in enumerate(law.param_names)
          if nm in names}
  cv = None
  if cv_folds:
    if cv_folds < 2 or cv_folds > n:
      raise ValueError(f"cv_folds must be in [2, {n}], got {cv_folds}")
    folds = np.array_split(rng.permutation(n), cv_folds)
    held = []
    for k in range(cv_folds):
      tr = np.concatenate([folds[j] for j in range(cv_folds) if j != k])
      ob = Objective(law, _take(obj.X, tr), y[tr], huber_delta, fixed)
      th = ob.full(_minimize(ob, t)[0])
      te = Objective(law, _take(obj.X, folds[k]), y[folds[k]], huber_delta, fixed)
      held.append(te.resid(th))
    cv = float(np.sqrt(np.mean(np.concatenate(held) ** 2)))
  return FitResult(law=law.name, params=law.params_dict(params), ci=ci, huber_loss=f,
                   rmse_log=float(np.sqrt(np.mean(r ** 2))), n_points=n,
                   huber_delta=huber_delta, resid_log=law.resid_log, n_starts=len(grid),
                   fixed=tuple(sorted(fixed or {})), cv_rmse_log=cv)


# --- compute-optimal allocation and efficiency leverage -------------------------

_ND_LAWS = ("chinchilla", "krajewski", "sparsity")


def _p(law: Law, params: Mapping[str, float] | Array) -> Array:
  return law.params_array(params) if isinstance(params, Mapping) else np.asarray(params)


def loss_nd(law: Law, params, N: Array, D: Array, **fixed: float) -> Array:
  """L(N, D) of a law with N and D variables, other variables held at `fixed`."""
  if law.name not in _ND_LAWS:
    raise ValueError(f"law {law.name!r} has no (N, D) loss; allowed: {_ND_LAWS}")
  extra = [v for v in law.variables if v not in ("N", "D")]
  missing = [v for v in extra if v not in fixed]
  if missing:
    raise ValueError(f"law {law.name!r} needs fixed values for {missing}")
  return law.predict(_p(law, params), N=N, D=D, **{v: fixed[v] for v in extra})


def compute_optimal(law: Law | str, params, C: float | Array,
                    **fixed: float) -> tuple[Array, Array]:
  """(N*, D*) minimising L(N, D) subject to C = 6 N D.

  chinchilla (and krajewski at fixed G, whose N term is (g/G^gamma + a)/N^alpha):
  closed form G = (alpha A / (beta B))^(1/(alpha+beta)), N* = G (C/6)^(beta/(alpha+beta)),
  D* = (C/6)/N*. sparsity (at fixed S): numeric 1-D minimisation over log N.
  """
  law = get_law(law) if isinstance(law, str) else law
  p = law.params_dict(_p(law, params))
  C6 = np.asarray(C, dtype=np.float64) / 6.0
  if law.name in ("chinchilla", "krajewski"):
    if law.name == "chinchilla":
      A, B, al, be = p["A"], p["B"], p["alpha"], p["beta"]
    else:
      if "G" not in fixed:
        raise ValueError("krajewski compute_optimal needs G=<granularity>")
      A = p["g"] / fixed["G"] ** p["gamma"] + p["a"]
      B, al, be = p["b"], p["alpha"], p["beta"]
    Gc = (al * A / (be * B)) ** (1.0 / (al + be))
    N = Gc * C6 ** (be / (al + be))
    return N, C6 / N
  if law.name == "sparsity":
    if "S" not in fixed:
      raise ValueError("sparsity compute_optimal needs S=<sparsity>")
    Ns = []
    for c6 in np.atleast_1d(C6):
      fun = lambda lN: float(loss_nd(law, p, np.exp(lN), c6 / np.exp(lN), **fixed))
      lc = math.log(c6)
      res = scipy.optimize.minimize_scalar(fun, bounds=(0.0, lc), method="bounded",
                                           options={"xatol": 1e-10})
      Ns.append(math.exp(res.x))
    N = np.reshape(Ns, np.shape(C6))
    return N, C6 / N
  raise ValueError(f"compute-optimal allocation is not defined for law {law.name!r}; "
                   f"allowed: {_ND_LAWS}")


def loss_at_compute(law: Law | str, params, C: float | Array,
                    allocation: str | float = "optimal", **fixed: float) -> Array:
  """Loss at training compute C = 6 N D: compute-optimal (N*, D*), or a fixed
  tokens-per-parameter ratio r = D/N (N = sqrt(C/(6 r)))."""
  law = get_law(law) if isinstance(law, str) else law
  C = np.asarray(C, dtype=np.float64)
  if allocation == "optimal":
    N, D = compute_optimal(law, params, C, **fixed)
  else:
    r = float(allocation)
    N = np.sqrt(C / (6.0 * r))
    D = r * N
  return loss_nd(law, params, N, D, **fixed)


def efficiency_leverage(dense_law: Law | str, dense_params, moe_law: Law | str, moe_params,
                        C: float, allocation: str | float = "optimal",
                        dense_fixed: Mapping[str, float] | None = None,
                        moe_fixed: Mapping[str, float] | None = None) -> float:
  """EL = C_dense / C_moe: dense compute reaching the MoE's loss at compute C.

  Both laws are L(N, D) laws (N = active params, C = 6 N D); both models are
  trained with the same `allocation` (compute-optimal, or a fixed D/N ratio).
  Returns inf when the MoE's loss is below the dense law's irreducible loss.
  """
  dl = get_law(dense_law) if isinstance(dense_law, str) else dense_law
  ml = get_law(moe_law) if isinstance(moe_law, str) else moe_law
  dense_fixed, moe_fixed = dict(dense_fixed or {}), dict(moe_fixed or {})
  target = float(loss_at_compute(ml, moe_params, C, allocation, **moe_fixed))
  f = lambda lc: float(loss_at_compute(dl, dense_params, math.exp(lc), allocation,
                                       **dense_fixed)) - target
  lo, hi = math.log(C) - 60.0, math.log(C) + 60.0
  if f(hi) > 0:
    return math.inf
  if f(lo) < 0:
    return 0.0
  lc = scipy.optimize.brentq(f, lo, hi, xtol=1e-12, rtol=1e-14)
  return math.exp(lc) / C


def predict_json(law: Law | str, fit_json: Mapping, **vars: Array) -> Array:
  """Predict from a fit.json dict (as written by tools/fit_scaling_laws.py)."""
  law = get_law(law) if isinstance(law, str) else law
  return law.predict(law.params_array(fit_json["params"]), **vars)
