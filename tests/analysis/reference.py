"""Slow, loop-based references of the routing analyses (independent of the package math)."""

from __future__ import annotations

import itertools
import math

import numpy as np


def tokens(r):
  """[(n, b, l)] of unmasked tokens per layer row n."""
  b, l = r.mask_BxL.shape
  return [(bi, li) for bi in range(b) for li in range(l) if r.mask_BxL[bi, li]]


def load(r):
  out = np.zeros((r.num_layers, r.num_experts))
  for n in range(r.num_layers):
    for bi, li in tokens(r):
      for e in range(r.num_experts):
        out[n, e] += r.selected_NxBxLxE[n, bi, li, e]
    if out[n].sum():
      out[n] /= out[n].sum()
  return out


def cv(x):
  m = sum(x) / len(x)
  return math.sqrt(sum((v - m) ** 2 for v in x) / len(x)) / m


def coactivation(r):
  e = r.num_experts
  toks = tokens(r)
  out = np.zeros((r.num_layers, e, e))
  for n in range(r.num_layers):
    for bi, li in toks:
      s = [j for j in range(e) if r.selected_NxBxLxE[n, bi, li, j]]
      for i in s:
        for j in s:
          out[n, i, j] += 1
  return out / max(len(toks), 1)


def domain_ratio(r):
  d, e = len(r.domain_names), r.num_experts
  out = np.zeros((r.num_layers, d, e))
  for n in range(r.num_layers):
    c = np.zeros((d, e))
    for bi, li in tokens(r):
      for j in range(e):
        c[r.domain_B[bi], j] += r.selected_NxBxLxE[n, bi, li, j]
    for di in range(d):
      for j in range(e):
        overall = c[:, j].sum() / c.sum()
        if c[di].sum() and overall:
          out[n, di, j] = (c[di, j] / c[di].sum()) / overall
  return out


def overlap_mean(a, b):
  out = []
  for n in range(a.num_layers):
    vals = []
    for bi, li in tokens(a):
      sa = {j for j in range(a.num_experts) if a.selected_NxBxLxE[n, bi, li, j]}
      sb = {j for j in range(b.num_experts) if b.selected_NxBxLxE[n, bi, li, j]}
      m = max(len(sa), len(sb))
      vals.append(len(sa & sb) / m if m else 1.0)
    out.append(sum(vals) / len(vals))
  return np.array(out)


def best_set_share(w_NxBxLxE, mask_BxL, seg, m):
  """Brute force over all m-subsets of experts, per segment."""
  n_layers, b, l, e = w_NxBxLxE.shape
  out = []
  for n in range(n_layers):
    vals = []
    for bi in range(b):
      for start in range(0, l - seg + 1, seg):
        tot = [sum(float(w_NxBxLxE[n, bi, li, j]) * bool(mask_BxL[bi, li])
                   for li in range(start, start + seg)) for j in range(e)]
        total = sum(tot)
        if total <= 0:
          continue
        best = max(sum(tot[j] for j in s) for s in itertools.combinations(range(e), m))
        vals.append(best / total)
    out.append(sum(vals) / len(vals) if vals else 0.0)
  return np.array(out)


def purity(r):
  """Per layer: mean over tokens of (occurrences of its id on its id's top expert / occurrences)."""
  out = []
  for n in range(r.num_layers):
    per_id = {}
    for bi, li in tokens(r):
      v = int(r.token_ids_BxL[bi, li])
      c = per_id.setdefault(v, [0, [0] * r.num_experts])
      c[0] += 1
      for e in range(r.num_experts):
        c[1][e] += int(r.selected_NxBxLxE[n, bi, li, e])
    total = sum(c[0] for c in per_id.values())
    out.append(sum(max(c[1]) for c in per_id.values()) / total)
  return np.array(out)


def experts_by_position(r):
  b, l = r.mask_BxL.shape
  out = np.full((r.num_layers, l), np.nan)
  for n in range(r.num_layers):
    for li in range(l):
      ks = [int(r.selected_NxBxLxE[n, bi, li].sum()) for bi in range(b) if r.mask_BxL[bi, li]]
      if ks:
        out[n, li] = sum(ks) / len(ks)
  return out
