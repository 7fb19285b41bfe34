"""Every routing analysis of one run: PNG plots plus `routing_report.md` with the numbers.

`analyze(run_dir, out_dir)` loads a checkpoint (newest by default), captures
its routing on validation batches of the run's corpus, runs each analysis
of this package, compares every other kept checkpoint with it (saturation)
and writes the plots and the report. `tools/analyze_routing.py` is its CLI.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from moejax.analysis import adaptive, coactivation, load, locality, saturation, specialization
from moejax.analysis.routing import Routing, capture, checkpoint_steps, load_model
from moejax.analysis.plotting import token_label
from moejax.moe.routers import get_router



def default_segment_lens(seq_len: int) -> list[int]:
  """1, 2, 4, ... up to the sequence length (at most 8 values, always ending at seq_len)."""
  lens = [2 ** i for i in range(16) if 2 ** i < seq_len]
  return sorted(set(lens[-7:] + [seq_len]))


def default_cache_sizes(num_experts: int, top_k: int) -> list[int]:
  """1, k, 2k and E/2, those within [1, E]."""
  return sorted({m for m in (1, top_k, 2 * top_k, num_experts // 2) if 1 <= m <= num_experts})


def _table(header: Sequence[str], rows: Sequence[Sequence]) -> list[str]:
  fmt = lambda v: f"{v:.4g}" if isinstance(v, (float, np.floating)) else str(v)  # noqa: E731
  out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  out += ["| " + " | ".join(fmt(v) for v in r) + " |" for r in rows]
  return out + [""]


def analyze(run_dir: str, out_dir: str, *, step: int | None = None, num_batches: int | None = None,
            segment_lens: Sequence[int] | None = None, cache_sizes: Sequence[int] | None = None,
            saturation_steps: bool = True) -> dict:
  """Write every plot and `routing_report.md` to out_dir; return the numbers.

  The routing is captured on `num_batches` batches (default
  train.eval_batches) of validation windows spread over the corpus, at
  checkpoint `step` (default newest);
  saturation compares each other kept checkpoint's routing of the same
  tokens with it (skipped when saturation_steps is False).
  """
  model = load_model(run_dir, step)
  cfg = model.cfg
  r = capture(model, "val", num_batches=num_batches)
  os.makedirs(out_dir, exist_ok=True)
  path = lambda name: os.path.join(out_dir, name)  # noqa: E731
  e, layers = r.num_experts, r.layers
  seg = list(segment_lens or default_segment_lens(cfg.train.seq_len))
  cache = list(cache_sizes or default_cache_sizes(e, r.top_k))
  res: dict = {"step": model.step, "router": r.router, "layers": layers,
               "tokens": int(r.mask_BxL.sum()), "plots": []}

  def plot(name: str, fig_fn, *args):
    fig_fn(*args, path=path(name))
    res["plots"].append(name)

  lines = [f"# Routing report: {os.path.abspath(run_dir)}", "",
           f"Checkpoint step {model.step}, router `{r.router}`, E={e}, k={r.top_k}, "
           f"MoE layers {layers}; {res['tokens']} validation tokens "
           f"({r.token_ids_BxL.shape[0]} sequences of {r.token_ids_BxL.shape[1]}).", ""]

  # Load and imbalance.
  load_NxE = load.expert_load(r)
  imb = load.imbalance(load_NxE)
  res["load"], res["load_cv"], res["load_max_over_mean"] = load_NxE, imb["cv"], imb["max_over_mean"]
  plot("load.png", load.plot_load, load_NxE, layers)
  lines += ["## Expert load (load.png)", "",
            "Share of each layer's (token, expert) selections per expert; CV = std/mean, "
            "max/mean = 1 when balanced.", ""]
  lines += _table(["layer", "CV", "max/mean"] + [f"e{j}" for j in range(e)],
                  [[layers[i], imb["cv"][i], imb["max_over_mean"][i], *load_NxE[i]]
                   for i in range(len(layers))])

  # Co-activation.
  co = coactivation.coactivation(r)
  dens = coactivation.density(co)
  res["coactivation"], res["coactivation_density"] = co, dens
  plot("coactivation.png", coactivation.plot_coactivation, co, layers)
  cond = coactivation.conditional(co)
  lines += ["## Co-activation (coactivation.png)", "",
            "Density: share of expert pairs selected together by at least one token. "
            "Strongest pair: the largest P(j | i), i != j.", ""]
  rows = []
  for i in range(len(layers)):
    c = cond[i].copy()
    np.fill_diagonal(c, -1.0)
    a, b = np.unravel_index(np.argmax(c), c.shape)
    rows.append([layers[i], dens[i], f"P({b} | {a}) = {c[a, b]:.3f}" if e > 1 else "-"])
  lines += _table(["layer", "density", "strongest pair"], rows)

  # Token-id specialisation.
  tok = specialization.token_specialization(r)
  res["token_purity"], res["token_concentration"] = tok["purity"], tok["concentration"]
  plot("tokens.png", specialization.plot_tokens, tok["counts"], layers)
  lines += ["## Token-id specialisation (tokens.png)", "",
            "Purity: mean share of a token id's occurrences that go to its most common "
            "expert. Concentration: 1 - H(token | expert) / H(token).", ""]
  lines += _table(["layer", "purity"] + [f"conc e{j}" for j in range(e)],
                  [[layers[i], tok["purity"][i], *tok["concentration"][i]]
                   for i in range(len(layers))])
  lines += [f"Top tokens per expert, layer {layers[0]}:", ""]
  lines += _table(["expert", "top tokens (share of the expert's selections)"],
                  [[j, ", ".join(f"`{token_label(v)}` {s:.2f}"
                                 for v, s in specialization.top_tokens(tok["counts"], 0, j, 8))]
                   for j in range(e)])

  # Domain specialisation.
  if r.domain_B is not None:
    dom = specialization.domain_specialization(r)
    res["domain_ratio"] = dom["ratio"]
    plot("domains.png", specialization.plot_domains, dom["ratio"], dom["tokens"],
         r.domain_names, layers)
    lines += ["## Domain specialisation (domains.png)", "",
              "Ratio = expert's share within a domain / its share overall (1: no "
              "preference). Largest ratios, domains with at least 1% of the tokens:", ""]
    big = dom["tokens"] >= 0.01 * dom["tokens"].sum()
    rows = []
    for i in range(len(layers)):
      m = np.where(big[:, None], dom["ratio"][i], 0.0)
      for flat in np.argsort(-m, axis=None, kind="stable")[:3]:
        d, j = np.unravel_index(flat, m.shape)
        rows.append([layers[i], r.domain_names[d], j, m[d, j], dom["share"][i, d, j],
                     dom["overall"][i, j]])
    lines += _table(["layer", "domain", "expert", "ratio", "share in domain", "overall share"],
                    rows)

  # Saturation across checkpoints.
  others = [s for s in checkpoint_steps(run_dir) if s != model.step] if saturation_steps else []
  if others:
    caps: dict[int, Routing] = {s: capture(load_model(run_dir, s), "val", num_batches=num_batches)
                                for s in others}
    caps[model.step] = r
    steps, sat = saturation.saturation_curve(caps, r)
    res["saturation_steps"], res["saturation"] = steps, sat
    plot("saturation.png", saturation.plot_saturation, steps, sat, layers, model.step)
    lines += ["## Router saturation (saturation.png)", "",
              f"Overlap of each token's selected experts with checkpoint {model.step} "
              "(1 = identical routing).", ""]
    lines += _table(["step"] + [f"layer {x}" for x in layers],
                    [[int(s), *sat[i]] for i, s in enumerate(steps)])
  else:
    lines += ["## Router saturation", "", "Only one checkpoint: nothing to compare.", ""]

  # Local routing consistency.
  loc = locality.grid(r, seg, cache)
  res["srp"], res["sch"] = loc["srp"], loc["sch"]
  res["segment_lens"], res["cache_sizes"] = seg, cache
  plot("locality.png", locality.plot_locality, loc, seg, cache, layers)
  lines += ["## Local routing consistency (locality.png)", "",
            "SRP: share of a segment's routing weight covered by the best fixed set of m "
            "experts; SCH: hit rate of the best m-expert cache loaded once per segment.", ""]
  for name in ("srp", "sch"):
    lines += _table([name.upper(), "segment"] + [f"m={m}" for m in cache],
                    [[f"layer {layers[i]}", s, *loc[name][i, a]]
                     for i in range(len(layers)) for a, s in enumerate(seg)])

  # Experts per token.
  pos = adaptive.by_position(r)
  edges, freq, cnt = adaptive.by_frequency(r)
  res["experts_per_token"] = r.tokens(r.experts_per_token()).mean(-1)
  res["experts_by_position"], res["experts_by_frequency"] = pos, freq
  plot("experts_per_token.png", adaptive.plot_adaptive, pos, edges, freq, layers)
  note = ("" if get_router(r.router).adaptive else
          f" (router `{r.router}` selects a fixed number per token)")
  lines += ["## Experts per token (experts_per_token.png)", "",
            f"Mean over tokens, first and last positions, rarest and most frequent "
            f"token-frequency bins{note}.", ""]
  live = np.flatnonzero(cnt > 0)
  lines += _table(["layer", "mean", "pos 0", f"pos {pos.shape[1] - 1}", "rarest bin",
                   "most frequent bin"],
                  [[layers[i], res["experts_per_token"][i], pos[i, 0], pos[i, -1],
                    freq[i, live[0]], freq[i, live[-1]]] for i in range(len(layers))])
  lines += ["Plots: " + ", ".join(res["plots"]), ""]
  with open(path("routing_report.md"), "w") as f:
    f.write("\n".join(lines))
  return res
