"""Figure for a fit: target vs compute with the fitted frontier, isoFLOP
curves (groups of equal compute), and log residuals. matplotlib, Agg backend."""

from __future__ import annotations

import textwrap
from collections.abc import Mapping

import numpy as np

from moejax.scaling.fit import FitResult, compute_optimal, loss_at_compute, loss_nd
from moejax.scaling.laws import Law

Array = np.ndarray


def compute_of(X: Mapping[str, Array]) -> Array | None:
  """Training FLOPs per point: C if given, else 6 N D, else None."""
  if "C" in X:
    return np.asarray(X["C"], dtype=np.float64)
  if "N" in X and "D" in X:
    return 6.0 * np.asarray(X["N"]) * np.asarray(X["D"])
  return None


def groups(v: Array, gap: float = 0.03) -> list[Array]:
  """Indices grouped by equal log10 value (sorted, split where the gap > `gap` dex)."""
  lv = np.log10(v)
  order = np.argsort(lv)
  cuts = np.where(np.diff(lv[order]) > gap)[0] + 1
  return np.split(order, cuts)


def plot_fit(law: Law, res: FitResult, X: Mapping[str, Array], y: Array, path: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  p = law.params_array(res.params)
  pred = law.predict(p, **X)
  C = compute_of(X)
  nd = law.name in ("chinchilla", "krajewski", "sparsity")
  fixed = {v: float(np.median(X[v])) for v in law.variables if v not in ("N", "D")}
  fig, ax = plt.subplots(1, 3, figsize=(16, 4.8))
  cmap = plt.get_cmap("viridis")

  # 1. target vs compute (or vs the first variable) with the compute-optimal frontier.
  xv, xl = (C, "training compute C [FLOPs]") if C is not None else (
      np.asarray(X[law.variables[0]]), law.variables[0])
  sc = ax[0].scatter(xv, y, s=12, c=np.log10(xv), cmap=cmap, label="data")
  if nd:
    Cs = np.logspace(np.log10(xv.min()), np.log10(xv.max()), 100)
    lab = "compute-optimal frontier" + (f" ({', '.join(f'{k}={v:.3g}' for k, v in fixed.items())})"
                                        if fixed else "")
    ax[0].plot(Cs, loss_at_compute(law, p, Cs, **fixed), "k-", lw=1.5, label=lab)
  ax[0].set(xscale="log", xlabel=xl, ylabel=law.target,
            title=textwrap.fill(f"{law.name}: {law.formula}", 80))
  ax[0].title.set_fontsize(7)
  ax[0].legend(fontsize=7)
  fig.colorbar(sc, ax=ax[0], label=f"log10 {xl.split()[0] if C is None else 'C'}")

  # 2. isoFLOP curves: groups of equal compute, target vs N with the fitted curve.
  if nd and C is not None:
    gs = [g for g in groups(C) if len(g) >= 3]
    for i, g in enumerate(gs):
      col = cmap(i / max(len(gs) - 1, 1))
      c = float(np.exp(np.mean(np.log(C[g]))))
      ax[1].scatter(X["N"][g], y[g], s=12, color=col)
      Ns = np.logspace(np.log10(X["N"][g].min()) - 0.2, np.log10(X["N"][g].max()) + 0.2, 80)
      ax[1].plot(Ns, loss_nd(law, p, Ns, c / (6 * Ns), **fixed), color=col, lw=1,
                 label=f"C={c:.2g}")
      n_opt = compute_optimal(law, p, c, **fixed)[0]
      ax[1].plot([n_opt], loss_nd(law, p, n_opt, c / (6 * n_opt), **fixed), "k*", ms=7)
    ax[1].set(xscale="log", xlabel="N (params)", ylabel=law.target,
              title="isoFLOP curves (* = compute-optimal N)")
    if len(gs) <= 12:
      ax[1].legend(fontsize=6)
  else:
    # Curves over the first variable for each value of a grouping variable.
    v0 = law.variables[0]
    gv = next((v for v in law.variables[1:] if len(np.unique(X[v])) <= 12), None)
    keys = np.unique(X[gv]) if gv else [None]
    for i, k in enumerate(keys):
      m = X[gv] == k if gv else np.ones(len(y), bool)
      col = cmap(i / max(len(keys) - 1, 1))
      ax[1].scatter(X[v0][m], y[m], s=12, color=col)
      xs = np.logspace(np.log10(X[v0][m].min()), np.log10(X[v0][m].max()), 60)
      others = {v: (np.full_like(xs, k) if v == gv else np.full_like(xs, np.median(X[v][m])))
                for v in law.variables if v != v0}
      ax[1].plot(xs, law.predict(p, **{v0: xs}, **others), color=col, lw=1,
                 label=f"{gv}={k:g}" if gv else "fit")
    ax[1].set(xscale="log", xlabel=v0, ylabel=law.target,
              title=f"fit per {gv}" if gv else "fit")
    ax[1].legend(fontsize=6)

  # 3. residuals in the fitted log space.
  log = np.log10 if law.resid_log == "log10" else np.log
  r = log(pred) - log(y)
  ax[2].scatter(pred, r, s=12, c=np.log10(xv), cmap=cmap)
  ax[2].axhline(0, color="k", lw=0.8)
  for s in (-1, 1):
    ax[2].axhline(s * res.huber_delta, color="r", lw=0.6, ls="--")
  lg = law.resid_log
  ax[2].set(xlabel=f"predicted {law.target}", ylabel=f"{lg}(pred) - {lg}(obs)",
            title=f"residuals (rmse {res.rmse_log:.3g}, n={res.n_points}; "
                  f"dashed: Huber delta)")
  ax[2].title.set_fontsize(9)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
