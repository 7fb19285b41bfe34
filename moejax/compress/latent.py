"""Conversion of a trained SwiGLU MoE into Mixture of Latent Experts form (`--method latent`).

`to_latent(cfg, variables, rank)` rewrites every MoE layer's routed SwiGLU
experts as the latent family (moejax/moe/experts/latent.py, Liu et al. 2025)
at latent rank R and returns the new config (moe.expert="latent",
moe.latent.rank=R) and variables, with everything else (attention, router
and its state, expert map, dense layers) as it was.

Per MoE layer and per projection P in (gate, up), the E expert matrices
W_P[e] [D, F] are stacked side by side into M = [W_P[0], ..., W_P[E-1]]
[D, E F] and factored by its truncated singular value decomposition
M ~ U_R S_R V_R^T:

  a_P = U_R [D, R] (orthonormal columns, shared by the layer's experts),
  b_P[e] = U_R^T W_P[e] [R, F] (the columns of S_R V_R^T of expert e),

so W_P[e] ~ a_P b_P[e] = U_R U_R^T W_P[e], the projection of every expert
onto the R-dimensional subspace that keeps most of M (Eckart-Young: no
rank-R factorisation with one shared [D, R] factor has a smaller summed
squared error). w_down is copied. At R = D, U_R is a D x D orthogonal matrix
and the converted layer computes what the source computed (up to float
rounding). The shared experts (moe.num_shared_experts) become one latent
expert of their own, factored the same way (E = 1).

Reported per leaf and MoE layer (the compress.json entry): the relative
Frobenius error ||M - a_P b_P||_F / ||M||_F of w_gate and w_up (w_down: 0,
copied), the same for the shared experts, and the expert parameters per
layer before and after. The change in loss is measured by tools/evaluate.py
on the source run and on the result (docs/compression.md).

Refused by name: a rank outside [1, model.d_model] (`rank`), a run whose
experts are not float SwiGLU experts (`run`: moe.expert other than
"swiglu", quantized experts), a dense or adapter run.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import ml_collections
import numpy as np

from moejax import layout
from moejax.checks import ConfigError, is_int
from moejax.compress.method import Method, Option, Result, check_routed_experts, quant_scheme
from moejax.moe.experts import get_family
from moejax.validation import validate

PROJECTIONS = (("w_gate", "a_gate", "b_gate"), ("w_up", "a_up", "b_up"))
NAMES = {"rank": "rank", "run": "run"}
FLAGS = {"rank": "--rank", "run": "--run"}


@dataclasses.dataclass
class Converted:
  """A latent-expert model and how well it reconstructs the source's experts.

  errors: {leaf: [relative Frobenius error per MoE layer]} of the routed experts;
  shared_errors: the same for the shared experts ({} without them).
  """

  cfg: ml_collections.ConfigDict
  variables: dict
  layers: list[int]
  errors: dict[str, list[float]]
  shared_errors: dict[str, list[float]]


def check_options(cfg: ml_collections.ConfigDict, rank: Any,
                  names: dict[str, str] = NAMES) -> ml_collections.ConfigDict:
  """Every check that needs no variables; returns the converted config (validated)."""
  check_routed_experts(cfg, "convert")
  moe = cfg.moe
  if moe.expert != "swiglu":
    raise ValueError(f"{names['run']}: moe.expert={moe.expert!r}; the latent conversion "
                     "factors SwiGLU experts (allowed: a run with moe.expert='swiglu')")
  scheme = quant_scheme(cfg)
  if scheme != "none":
    raise ValueError(f"{names['run']}: moe.quant.scheme={scheme!r}: the experts are quantized "
                     "codes; the latent conversion factors float experts: convert before "
                     "quantizing")
  d = cfg.model.d_model
  if not is_int(rank) or not 1 <= rank <= d:
    raise ValueError(f"{names['rank']}={rank!r} is invalid: allowed: an integer latent rank in "
                     f"[1, model.d_model={d}] (the shared [D, R] projections span at most "
                     f"D={d} dimensions; {d} reconstructs the experts exactly)")
  out = ml_collections.ConfigDict(cfg.to_dict())
  out.moe.expert = "latent"
  out.moe.latent.rank = int(rank)
  if "init" in out:  # upcycled / grown runs: their variables now live in the checkpoint
    out.init.from_dense = ""
    out.init.grow_from = ""
  try:
    validate(out)
  except ConfigError as e:
    raise ValueError(f"{names['rank']}={rank}: the converted config is invalid: {e}") from None
  return out


def factor(w_ExDxF: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray, float]:
  """(a [D, R], b [E, R, F], relative error) of the truncated SVD of [w[0], ..., w[E-1]]
  [D, E F] (float64): a b[e] is w[e] projected onto the top-R left singular subspace.

  When R exceeds E F (the stacked matrix's rank bound), the left singular basis is
  completed to R orthonormal columns; the extra ones carry nothing (b is zero there)."""
  w = np.asarray(w_ExDxF, np.float64)
  e, d, f = w.shape
  m_DxEF = np.transpose(w, (1, 0, 2)).reshape(d, e * f)
  u, _, _ = np.linalg.svd(m_DxEF, full_matrices=rank > min(d, e * f))
  a_DxR = u[:, :rank]
  b_ExRxF = np.einsum("dr,edf->erf", a_DxR, w)
  approx = np.einsum("dr,erf->edf", a_DxR, b_ExRxF)
  norm = np.linalg.norm(w)
  err = float(np.linalg.norm(w - approx) / norm) if norm > 0 else 0.0
  return a_DxR, b_ExRxF, err


def _factor_layers(leaves: dict[str, np.ndarray], rank: int, experts: bool
                   ) -> tuple[dict[str, np.ndarray], dict[str, list[float]]]:
  """Stacked SwiGLU leaves ([P, E, ...] routed, [P, ...] shared experts) -> latent leaves
  and {w_gate, w_up, w_down: [relative error per layer]}."""
  out, errors = {}, {}
  for w_name, a_name, b_name in PROJECTIONS:
    w_P = np.asarray(leaves[w_name], np.float64)
    if not experts:
      w_P = w_P[:, None]  # one expert
    parts = [factor(w, rank) for w in w_P]
    out[a_name] = np.stack([a for a, _, _ in parts]).astype(np.float32)
    b = np.stack([b for _, b, _ in parts]).astype(np.float32)
    out[b_name] = b if experts else b[:, 0]
    errors[w_name] = [e for _, _, e in parts]
  out["w_down"] = np.asarray(leaves["w_down"], np.float32)
  errors["w_down"] = [0.0] * len(errors["w_gate"])
  return out, errors


def to_latent(cfg: ml_collections.ConfigDict, variables: dict, rank: int) -> Converted:
  """The run's SwiGLU experts as latent experts of rank `rank` (module docstring)."""
  new_cfg = check_options(cfg, rank)
  params = jax.device_get(variables["params"])
  moe = layout.get(params, layout.MOE_PATH, "params")
  node = dict(moe)
  node[layout.EXPERTS], errors = _factor_layers(moe[layout.EXPERTS], rank, True)
  shared_errors = {}
  if layout.SHARED in moe:
    node[layout.SHARED], shared_errors = _factor_layers(moe[layout.SHARED], rank, False)
  out = {"params": layout.replace(params, layout.MOE_PATH, node)}
  for name, tree in variables.items():
    if name not in ("params", "intermediates"):
      out[name] = tree
  return Converted(new_cfg, out, layout.moe_layer_indices(cfg), errors, shared_errors)


def expert_params(cfg: ml_collections.ConfigDict) -> int:
  """Routed-expert parameters of one MoE layer (its experts' own leaves and the shared ones)."""
  moe = cfg.moe
  fam, d, f = get_family(moe), cfg.model.d_model, moe.expert_hidden
  return moe.num_experts * fam.param_count(d, f) + fam.shared_param_count(d, f)


# --------------------------------------------------------------------------- the CLI method


def _cli_check(cfg: ml_collections.ConfigDict, args) -> None:
  check_options(cfg, args.rank, FLAGS)


def _cli_apply(cfg: ml_collections.ConfigDict, variables: dict, calib, args,
               previous: list[dict]) -> Result:
  del calib, previous
  c = to_latent(cfg, variables, args.rank)
  by_layer = lambda errs: {str(l): {k: v[i] for k, v in errs.items()}  # noqa: E731
                           for i, l in enumerate(c.layers)}
  entry = {"rank": args.rank, "d_model": cfg.model.d_model,
           "relative_error": by_layer(c.errors),
           "expert_params_per_layer": {"before": expert_params(cfg),
                                       "after": expert_params(c.cfg)}}
  if c.shared_errors:
    entry["shared_relative_error"] = by_layer(c.shared_errors)
  return Result(c.cfg, c.variables, entry)


def _cli_describe(entry: dict) -> list[str]:
  p = entry["expert_params_per_layer"]
  lines = [f"latent experts at rank {entry['rank']} (model.d_model={entry['d_model']}): routed "
           f"expert parameters per layer {p['before']} -> {p['after']}; relative "
           "reconstruction error ||W - A B||_F / ||W||_F:"]
  for layer, errs in entry["relative_error"].items():
    lines.append(f"  layer {layer}: w_gate {errs['w_gate']:.3g}, w_up {errs['w_up']:.3g}")
  for layer, errs in entry.get("shared_relative_error", {}).items():
    lines.append(f"  layer {layer} shared experts: w_gate {errs['w_gate']:.3g}, "
                 f"w_up {errs['w_up']:.3g}")
  return lines


METHOD = Method(
    name="latent",
    summary="SwiGLU experts factored through shared latent projections by a truncated SVD "
            "(moejax/compress/latent.py)",
    options=(Option("--rank", {"required": True, "type": int,
                               "help": "latent rank R in [1, model.d_model]"}),),
    check=_cli_check, apply=_cli_apply, calibrates=lambda args: False,
    describe=_cli_describe)
