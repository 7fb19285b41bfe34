"""Token-id and domain specialisation of experts.

Token ids: which vocabulary items each expert takes (`token_expert_counts`)
and how concentrated that is (`token_specialization`). Domains (e.g. the
books of the KJV): each expert's share of a domain's selections divided by
its share overall (`domain_specialization`); 1 = no preference, 1/share =
the domain uses only that expert.
"""

from __future__ import annotations

import numpy as np

from moejax.analysis import plotting
from moejax.analysis.routing import Routing


def token_expert_counts(routing: Routing, vocab_size: int | None = None) -> np.ndarray:
  """[N, V, E] number of occurrences of token id v that select expert e."""
  ids_T = routing.token_ids_BxL[routing.mask_BxL].astype(np.int64)
  v = int(ids_T.max(initial=-1)) + 1 if vocab_size is None else int(vocab_size)
  if ids_T.size and ids_T.max() >= v:
    raise ValueError(f"vocab_size={vocab_size!r} is smaller than the largest token id "
                     f"{int(ids_T.max())}; allowed: > max token id")
  sel_NxTxE = routing.tokens(routing.selected_NxBxLxE).astype(np.float64)
  onehot_TxV = np.zeros((ids_T.size, v))
  onehot_TxV[np.arange(ids_T.size), ids_T] = 1.0
  return np.einsum("tv,nte->nve", onehot_TxV, sel_NxTxE)


def _entropy(p: np.ndarray, axis: int) -> np.ndarray:
  return -np.sum(np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0), axis=axis)


def token_specialization(routing: Routing) -> dict[str, np.ndarray]:
  """How concentrated each expert's vocabulary is, and how fixed each token's routing.

  Returns per layer:
    "purity" [N]: over token occurrences, the mean share of a token id's
        occurrences that select that id's most common expert (1: every
        id always goes to one fixed expert; top-k routers: the id's
        most common expert among its k);
    "concentration" [N, E]: 1 - H(token id | expert e) / H(token id), the
        drop in token-id entropy within an expert's tokens (0: the expert
        takes the corpus' token mix, 1: a single token id; 0 for unused
        experts or a capture with one token id);
    "counts" [N, V, E]: `token_expert_counts`.
  """
  counts = token_expert_counts(routing)
  ids_T = routing.token_ids_BxL[routing.mask_BxL].astype(np.int64)
  occ_V = np.bincount(ids_T, minlength=counts.shape[1]).astype(np.float64)
  share_NxV = np.where(occ_V > 0, counts.max(axis=-1) / np.maximum(occ_V, 1.0), 0.0)
  purity_N = (share_NxV * occ_V).sum(-1) / max(occ_V.sum(), 1.0)
  h_all = _entropy(occ_V / max(occ_V.sum(), 1.0), axis=0)
  per_e = counts.sum(axis=1, keepdims=True)  # [N, 1, E]
  p_NxVxE = counts / np.maximum(per_e, 1e-300)
  h_NxE = _entropy(p_NxVxE, axis=1)
  conc = np.where((per_e[:, 0] > 0) & (h_all > 0), 1.0 - h_NxE / max(h_all, 1e-300), 0.0)
  return {"purity": purity_N, "concentration": conc, "counts": counts}


def top_tokens(counts_NxVxE: np.ndarray, layer_row: int, expert: int, n: int = 10
               ) -> list[tuple[int, float]]:
  """The n token ids with the largest share of `expert`'s selections: [(id, share)]."""
  c_V = counts_NxVxE[layer_row, :, expert]
  total = c_V.sum()
  order = np.argsort(-c_V, kind="stable")[:n]
  return [(int(v), float(c_V[v] / total)) for v in order if c_V[v] > 0]


def domain_counts(routing: Routing) -> np.ndarray:
  """[N, D, E] selections of expert e by tokens of domain d."""
  if routing.domain_B is None:
    raise ValueError("routing has no domain labels (domain_B is None): capture a data "
                     "split of the corpus or texts with domains=")
  d = len(routing.domain_names)
  dom_BxL = np.broadcast_to(routing.domain_B[:, None], routing.mask_BxL.shape)
  dom_T = dom_BxL[routing.mask_BxL]
  onehot_TxD = np.zeros((dom_T.size, d))
  onehot_TxD[np.arange(dom_T.size), dom_T] = 1.0
  sel_NxTxE = routing.tokens(routing.selected_NxBxLxE).astype(np.float64)
  return np.einsum("td,nte->nde", onehot_TxD, sel_NxTxE)


def domain_specialization(routing: Routing) -> dict[str, np.ndarray]:
  """Expert share within each domain relative to its overall share.

  Returns "ratio" [N, D, E] = (c[d, e] / sum_e c[d, e]) / (sum_d c[d, e] /
  sum c), 0 where the domain or the expert has no selection; "share" [N, D,
  E] the within-domain shares; "overall" [N, E] the overall shares; "tokens"
  [D] the number of tokens per domain.
  """
  c = domain_counts(routing)
  share = c / np.maximum(c.sum(-1, keepdims=True), 1e-300)
  overall = c.sum(1) / np.maximum(c.sum((1, 2))[:, None], 1e-300)  # [N, E]
  ratio = np.where(overall[:, None, :] > 0, share / np.maximum(overall[:, None, :], 1e-300), 0.0)
  dom_BxL = np.broadcast_to(routing.domain_B[:, None], routing.mask_BxL.shape)
  tokens = np.bincount(dom_BxL[routing.mask_BxL], minlength=c.shape[1])
  return {"ratio": ratio, "share": share, "overall": overall, "tokens": tokens}


def plot_domains(ratio_NxDxE: np.ndarray, tokens_D: np.ndarray, domain_names: list[str],
                 layers: list[int], path: str | None = None, max_domains: int = 24):
  """Heatmap per layer of the domain-specialisation ratio (log2 scale) for the
  `max_domains` domains with the most tokens."""
  keep = [d for d in np.argsort(-tokens_D, kind="stable")[:max_domains] if tokens_D[d] > 0]
  n, e = ratio_NxDxE.shape[0], ratio_NxDxE.shape[-1]
  cols = min(n, 4)
  rows = -(-n // cols)
  fig = plotting.new_figure(2.5 + (1.2 + 0.3 * e) * cols, (1.0 + 0.22 * len(keep)) * rows)
  for i in range(n):
    r = np.log2(np.maximum(ratio_NxDxE[i][keep], 1.0 / 64))
    ax = fig.add_subplot(rows, cols, i + 1)
    plotting.heatmap(ax, r, xlabel="expert", ylabel="domain" if i % cols == 0 else "",
                     title=f"layer {layers[i]}",
                     yticks=[domain_names[d] for d in keep] if i % cols == 0 else [],
                     cmap="RdBu_r", vmin=-2.0, vmax=2.0)
  fig.suptitle("log2(expert share in domain / overall share)")
  return plotting.save(fig, path)


def plot_tokens(counts_NxVxE: np.ndarray, layers: list[int], path: str | None = None,
                top: int = 32):
  """Heatmap per layer of P(expert | token id) for the `top` most frequent token ids."""
  occ_V = counts_NxVxE[0].sum(-1)
  ids = [v for v in np.argsort(-occ_V, kind="stable")[:top] if occ_V[v] > 0]
  n, e = counts_NxVxE.shape[0], counts_NxVxE.shape[-1]
  fig = plotting.new_figure(2.0 + 0.25 * len(ids), (1.0 + 0.3 * e) * n)
  for i in range(n):
    c = counts_NxVxE[i][ids]  # [V', E]
    p = c / np.maximum(c.sum(-1, keepdims=True), 1e-300)
    plotting.heatmap(fig.add_subplot(n, 1, i + 1), p.T, xlabel="token", ylabel="expert",
                     title=f"layer {layers[i]}: share of a token's selections per expert",
                     xticks=[plotting.token_label(int(v)) for v in ids], vmin=0.0)
  return plotting.save(fig, path)
