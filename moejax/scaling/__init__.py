"""Scaling-law fitting: laws (`laws`), the Huber/L-BFGS fitter (`fit`), tables (`data`),
published measurements to check fits against (`reference`)."""

from moejax.scaling.fit import (FitResult, compute_optimal, efficiency_leverage, fit,
                                huber, loss_at_compute, loss_nd)
from moejax.scaling.laws import LAWS, Law, a_hat, e_hat, get_law

__all__ = ["LAWS", "FitResult", "Law", "a_hat", "compute_optimal", "e_hat",
           "efficiency_leverage", "fit", "get_law", "huber", "loss_at_compute", "loss_nd"]
