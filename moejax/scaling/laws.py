"""Scaling laws as small frozen objects: formula, parameters, init grid, predict.

Every law predicts a positive target (loss `L`, or efficiency leverage `EL`)
from named variables, vectorised in NumPy float64. `predict(params, **vars)`
takes the parameters in natural units, in `param_names` order, either one
vector `(P,)` (-> shape of the variables) or a batch `(S, P)` (-> `(S, n)`),
so a whole initialisation grid is scored in one call.

Fitting happens in a reparametrised space `theta` where the parameters in
`log_params` are replaced by their natural log (A = exp(a), as Hoffmann et
al. 2022 and Besiroglu et al. 2024 do), which keeps them positive without
bounds. `predict` is written with exp/log/power only, so it is complex-analytic
in theta and the fitter differentiates it by complex step (exact to float64).

Variables: N parameters (active ones for MoE), D training tokens, E experts,
G granularity (dense FFN width / expert width), S sparsity 1 - k/E,
A activation ratio k/E, C training FLOPs.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable, Mapping

import numpy as np

Array = np.ndarray


def _cols(params: Array) -> list[Array]:
  """Split params (..., P) into P arrays shaped (..., 1) that broadcast over n points."""
  p = np.asarray(params)
  return [p[..., i, None] for i in range(p.shape[-1])]


def _pow(x: Array, e: Array) -> Array:
  """x**e for positive x as exp(e log x): analytic in e (complex-step safe)."""
  return np.exp(e * np.log(x))


@dataclasses.dataclass(frozen=True)
class Law:
  """A scaling law: target = f(variables; params)."""
  name: str
  variables: tuple[str, ...]
  param_names: tuple[str, ...]
  formula: str
  source: str
  fn: Callable[..., Array]  # fn(cols: list[(..., 1)], **vars) -> target
  init: Mapping[str, Array]  # theta-space starting values (log for log_params)
  log_params: tuple[str, ...] = ()
  target: str = "L"
  resid_log: str = "ln"  # residual = log(pred) - log(obs), natural log or "log10"
  reference: Mapping[str, float] | None = None  # published values, for docs/tests

  def predict(self, params: Array, **vars: Array) -> Array:
    """Target at `vars` for params (P,) or (S, P) in natural units."""
    missing = [v for v in self.variables if v not in vars]
    if missing:
      raise ValueError(f"law {self.name!r} needs variables {self.variables}, missing {missing}")
    params = np.asarray(params)
    if params.shape[-1] != len(self.param_names):
      raise ValueError(f"law {self.name!r} has {len(self.param_names)} params "
                       f"{self.param_names}, got shape {params.shape}")
    x = {k: np.asarray(vars[k]) for k in self.variables}
    x = {k: v if np.iscomplexobj(v) else v.astype(np.float64) for k, v in x.items()}
    out = self.fn(_cols(params), **x)
    if params.ndim == 1:  # one parameter vector: the variables' broadcast shape
      out = out.reshape(np.broadcast_shapes(*(v.shape for v in x.values())))
    return out

  @property
  def log_mask(self) -> Array:
    return np.array([n in self.log_params for n in self.param_names])

  def to_theta(self, params: Array) -> Array:
    """Natural-unit params -> fit space (log of the positive ones)."""
    p = np.asarray(params, dtype=np.float64)
    return np.where(self.log_mask, np.log(np.where(self.log_mask, p, 1.0)), p)

  def from_theta(self, theta: Array) -> Array:
    """Fit space -> natural units (works for complex theta too)."""
    return np.where(self.log_mask, np.exp(theta), theta)

  def grid(self, max_points: int | None = None, seed: int = 0) -> Array:
    """Init grid in theta space, (S, P): the full product of `init`, or
    `max_points` of its points drawn without replacement (seeded) when larger."""
    axes = [np.asarray(self.init[n], dtype=np.float64) for n in self.param_names]
    sizes = [len(a) for a in axes]
    total = int(np.prod(sizes))
    if max_points is None or total <= max_points:
      return np.array(list(itertools.product(*axes)))
    flat = np.random.default_rng(seed).choice(total, size=max_points, replace=False)
    idx = np.unravel_index(np.sort(flat), sizes)
    return np.stack([a[i] for a, i in zip(axes, idx)], axis=-1)

  def params_dict(self, params: Array) -> dict[str, float]:
    return {n: float(v) for n, v in zip(self.param_names, params)}

  def params_array(self, params: Mapping[str, float]) -> Array:
    return np.array([float(params[n]) for n in self.param_names])


# --- chinchilla: Hoffmann et al. 2022 (Approach 3) ------------------------------

def _chinchilla(p, N, D):
  E, A, B, al, be = p
  return E + A * _pow(N, -al) + B * _pow(D, -be)


CHINCHILLA = Law(
    name="chinchilla",
    variables=("N", "D"),
    param_names=("E", "A", "B", "alpha", "beta"),
    formula="L = E + A/N^alpha + B/D^beta",
    source="Hoffmann et al. 2022, 'Training Compute-Optimal Large Language Models' "
           "(Approach 3); init grid of Besiroglu et al. 2024, 'Chinchilla Scaling: "
           "A replication attempt'",
    fn=_chinchilla,
    log_params=("E", "A", "B"),
    # Besiroglu et al.'s grid: e, a, b are logs of E, A, B. 6*6*6*5*5 = 5400 starts.
    init={"E": np.arange(-1.0, 1.51, 0.5), "A": np.arange(0.0, 25.1, 5.0),
          "B": np.arange(0.0, 25.1, 5.0), "alpha": np.arange(0.0, 2.01, 0.5),
          "beta": np.arange(0.0, 2.01, 0.5)},
    reference={"E": 1.817, "A": 482.0, "B": 2085.4, "alpha": 0.3478, "beta": 0.3658},
)


# --- clark: Clark et al. 2022, routed language models ---------------------------

def e_hat(E: Array, E_start: Array, E_max: Array) -> Array:
  """Saturating expert count: 1/Ê = 1/(E - 1 + (1/E_start - 1/E_max)^-1) + 1/E_max.

  Clark et al. 2022, eq. for Ê (as in the authors' released notebook,
  google-deepmind/scaling_laws_for_routing): Ê = E_start at E = 1 (dense),
  grows like E - 1 + E_start, and saturates at E_max.
  """
  return 1.0 / (1.0 / (E - 1.0 + 1.0 / (1.0 / E_start - 1.0 / E_max)) + 1.0 / E_max)


def _clark_log10(p, N, E):
  a, b, c, d, E_start, E_max = p
  lN, lE = np.log10(N), np.log10(e_hat(E, E_start, E_max))
  return a * lN + b * lE + c * lN * lE + d


CLARK = Law(
    name="clark",
    variables=("N", "E"),
    param_names=("a", "b", "c", "d", "E_start", "E_max"),
    formula="log10 L = a log10 N + b log10 Ê + c log10 N log10 Ê + d, "
            "1/Ê = 1/(E - 1 + (1/E_start - 1/E_max)^-1) + 1/E_max",
    source="Clark et al. 2022, 'Unified Scaling Laws for Routed Language Models', "
           "eq. (1) with the saturating Ê; N = dense (per-token) parameter count",
    fn=lambda p, N, E: 10.0 ** _clark_log10(p, N, E),
    log_params=("E_start", "E_max"),
    init={"a": np.array([-0.2, -0.05]), "b": np.array([-0.2, 0.0]),
          "c": np.array([0.0, 0.02]), "d": np.array([0.5, 1.5]),
          "E_start": np.log([1.5, 3.0]), "E_max": np.log([100.0, 1000.0])},
    resid_log="log10",
    reference={"a": -0.082, "b": -0.108, "c": 0.009, "d": 1.104,
               "E_start": 1.847, "E_max": 314.478},
)


# --- krajewski: fine-grained MoE, Krajewski et al. 2024 -------------------------

def _krajewski(p, N, D, G):
  a, al, b, be, c, g, ga = p
  return c + (g * _pow(G, -ga) + a) * _pow(N, -al) + b * _pow(D, -be)


KRAJEWSKI = Law(
    name="krajewski",
    variables=("N", "D", "G"),
    param_names=("a", "alpha", "b", "beta", "c", "g", "gamma"),
    formula="L = c + (g/G^gamma + a)/N^alpha + b/D^beta",
    source="Krajewski et al. 2024, 'Scaling Laws for Fine-Grained Mixture of Experts' "
           "(N = active non-embedding params, G = dense FFN width / expert width)",
    fn=_krajewski,
    log_params=("a", "b", "c", "g"),
    init={"a": np.log([5.0, 50.0]), "alpha": np.array([0.1, 0.3]),
          "b": np.log([10.0, 100.0]), "beta": np.array([0.1, 0.3]),
          "c": np.log([0.3, 1.5]), "g": np.log([0.5, 5.0]),
          "gamma": np.array([0.3, 1.0])},
    reference={"a": 18.1, "alpha": 0.115, "b": 30.8, "beta": 0.147, "c": 0.47,
               "g": 2.1, "gamma": 0.58},
)


# --- sparsity: Abnar et al. 2025, optimal sparsity for MoE ----------------------

def _sparsity(p, N, D, S):
  a, al, b, be, c, lam, d, de, ga, e = p
  dense = 1.0 - S  # = k/E
  return (a * _pow(N, -al) + b * _pow(D, -be) + c * _pow(dense, -lam)
          + d * _pow(dense, -de) * _pow(N, -ga) + e)


SPARSITY = Law(
    name="sparsity",
    variables=("N", "D", "S"),
    param_names=("a", "alpha", "b", "beta", "c", "lambda", "d", "delta", "gamma", "e"),
    formula="L = a/N^alpha + b/D^beta + c/(1-S)^lambda + d/((1-S)^delta N^gamma) + e, "
            "S = 1 - k/E",
    source="Abnar et al. 2025, 'Parameters vs FLOPs: Scaling Laws for Optimal Sparsity "
           "for Mixture-of-Experts Language Models' (N = active params)",
    fn=_sparsity,
    log_params=("a", "b", "c", "d", "e"),
    init={"a": np.log([10.0, 100.0]), "alpha": np.array([0.2, 0.4]),
          "b": np.log([10.0, 100.0]), "beta": np.array([0.2, 0.4]),
          "c": np.log([0.01, 0.1]), "lambda": np.array([-0.2, 0.2]),
          "d": np.log([1.0, 10.0]), "delta": np.array([-0.3, 0.3]),
          "gamma": np.array([0.1, 0.3]), "e": np.log([0.5, 1.5])},
)


# --- efficiency_leverage: Ling team (Tian et al. 2025) --------------------------

def a_hat(A: Array, A_start: Array, A_max: Array) -> Array:
  """Saturating activation ratio: 1/Â = 1/(A + (1/A_start - 1/A_max)^-1) + 1/A_max."""
  return 1.0 / (1.0 / (A + 1.0 / (1.0 / A_start - 1.0 / A_max)) + 1.0 / A_max)


def _el(p, A, G, C):
  a, d, ga, be, A_start, A_max = p
  lG = np.log2(G)
  return _pow(a_hat(A, A_start, A_max), a + d * np.log10(C) + ga * lG**2 + be * lG)


EFFICIENCY_LEVERAGE = Law(
    name="efficiency_leverage",
    variables=("A", "G", "C"),
    param_names=("a", "d", "gamma", "beta", "A_start", "A_max"),
    formula="EL = Â^(a + d log10 C + gamma (log2 G)^2 + beta log2 G), "
            "1/Â = 1/(A + (1/A_start - 1/A_max)^-1) + 1/A_max",
    source="Tian et al. 2025 (Ling team, Ant Group), 'Towards Greater Leverage: Scaling "
           "Laws for Efficient Mixture-of-Experts Language Models', arXiv:2507.17702, "
           "unified EL law (A = activated/total experts, G granularity, C FLOPs). The "
           "paper's log bases are our inference: log10 C and log2 G make its constants "
           "give EL ~ 7.2 at C=1e22, A=3.1%, G=12 (the paper: 'over 7x').",
    fn=_el,
    log_params=("A_start", "A_max"),
    target="EL",
    init={"a": np.array([0.5, 1.5]), "d": np.array([-0.1, 0.0]),
          "gamma": np.array([0.0, 0.05]), "beta": np.array([-0.2, 0.0]),
          "A_start": np.log([0.005, 0.05]), "A_max": np.log([1e3, 1e12])},
    reference={"a": 1.23, "d": -7.61e-2, "gamma": 1.67e-2, "beta": -1.17e-1,
               "A_start": 1.63e-2, "A_max": 5.28e16},
)


LAWS: dict[str, Law] = {law.name: law for law in
                        (CHINCHILLA, CLARK, KRAJEWSKI, SPARSITY, EFFICIENCY_LEVERAGE)}


def get_law(name: str) -> Law:
  """The law called `name`; ValueError naming --law/law, the value and the choices."""
  if name not in LAWS:
    raise ValueError(f"--law/law: unknown scaling law {name!r}; allowed: {sorted(LAWS)}")
  return LAWS[name]
