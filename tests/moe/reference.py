"""Independent slow NumPy (float64) references for the MoE tests.

Everything here loops over tokens / experts / slots on purpose: it shares no
code with moejax and is written to be obviously right, not fast.
"""

from __future__ import annotations

import math

import numpy as np


def softmax(row):
  row = np.asarray(row, np.float64)
  e = np.exp(row - np.max(row))
  return e / np.sum(e)


def logsumexp(row):
  row = np.asarray(row, np.float64)
  m = np.max(row)
  return m + math.log(np.sum(np.exp(row - m)))


def topk_route(logits_TxE, k, order="softmax_topk", renormalize=False):
  """Returns (token_A, expert_A, weight_A, probs_TxE), slots choice-major.

  Ties go to the lower expert index (stable sort on the negated values).
  """
  logits = np.asarray(logits_TxE, np.float64)
  t, _ = logits.shape
  experts = np.zeros((t, k), np.int64)
  weights = np.zeros((t, k), np.float64)
  probs = np.zeros_like(logits)
  for i in range(t):
    probs[i] = softmax(logits[i])
    if order == "softmax_topk":
      idx = np.argsort(-probs[i], kind="stable")[:k]
      w = probs[i][idx]
      if renormalize:
        w = w / np.sum(w)
    elif order == "topk_softmax":
      idx = np.argsort(-logits[i], kind="stable")[:k]
      w = softmax(logits[i][idx])
    else:
      raise ValueError(order)
    experts[i] = idx
    weights[i] = w
  token_A, expert_A, weight_A = [], [], []
  for c in range(k):  # choice-major: slot c * T + t
    for i in range(t):
      token_A.append(i)
      expert_A.append(experts[i, c])
      weight_A.append(weights[i, c])
  return (np.array(token_A), np.array(expert_A), np.array(weight_A), probs)


def silu(x):
  return x / (1.0 + np.exp(-x))


def swiglu(x_D, w_gate_DxF, w_up_DxF, w_down_FxD):
  x = np.asarray(x_D, np.float64)
  g = x @ np.asarray(w_gate_DxF, np.float64)
  u = x @ np.asarray(w_up_DxF, np.float64)
  return (silu(g) * u) @ np.asarray(w_down_FxD, np.float64)


def moe(x_TxD, token, expert, weight, valid, w, keep=None):
  """y[token] += weight * SwiGLU_expert(x[token]) for every valid (kept) slot."""
  x = np.asarray(x_TxD, np.float64)
  y = np.zeros_like(x)
  for a in range(len(token)):
    if not valid[a] or (keep is not None and not keep[a]):
      continue
    e = int(expert[a])
    t = int(token[a])
    y[t] += float(weight[a]) * swiglu(x[t], w["w_gate"][e], w["w_up"][e],
                                      w["w_down"][e])
  return y


def capacity_keep(expert, valid, num_experts, capacity):
  """First come first served in slot order: (pos_A, keep_A)."""
  used = [0] * num_experts
  pos = np.zeros(len(expert), np.int64)
  keep = np.zeros(len(expert), bool)
  for a in range(len(expert)):
    if not valid[a]:
      continue
    e = int(expert[a])
    pos[a] = used[e]
    keep[a] = used[e] < capacity
    used[e] += 1
  return pos, keep


def counts(expert, valid, num_experts):
  c = np.zeros(num_experts, np.float64)
  for a in range(len(expert)):
    if valid[a]:
      c[int(expert[a])] += 1
  return c


def switch_load_balance(probs_TxE, counts_E):
  probs = np.asarray(probs_TxE, np.float64)
  t, e = probs.shape
  total = max(float(np.sum(counts_E)), 1.0)
  loss = 0.0
  for i in range(e):
    f_i = counts_E[i] / total
    p_i = sum(probs[j, i] for j in range(t)) / t
    loss += f_i * p_i
  return e * loss


def router_z_loss(logits_TxE):
  logits = np.asarray(logits_TxE, np.float64)
  return sum(logsumexp(row) ** 2 for row in logits) / logits.shape[0]


def load_metrics(counts_E):
  c = np.asarray(counts_E, np.float64)
  load = c / max(np.sum(c), 1.0)
  mean = np.mean(load)
  std = math.sqrt(sum((l - mean) ** 2 for l in load) / len(load))
  return {"load": load, "load_max_over_mean": np.max(load) / mean,
          "load_cv": std / mean}


def router_metrics(probs_TxE):
  p = np.asarray(probs_TxE, np.float64)
  ent, top1 = [], []
  for row in p:
    ent.append(-sum(v * math.log(v) for v in row if v > 0))
    top1.append(max(row))
  return {"router_entropy": np.mean(ent), "top1_prob": np.mean(top1)}


def random_expert_weights(rng, e, d, f):
  """float32 SwiGLU expert weights with roughly unit-variance outputs."""
  return {
      "w_gate": (rng.standard_normal((e, d, f)) / math.sqrt(d)).astype(np.float32),
      "w_up": (rng.standard_normal((e, d, f)) / math.sqrt(d)).astype(np.float32),
      "w_down": (rng.standard_normal((e, f, d)) / math.sqrt(f)).astype(np.float32),
  }


def swiglu_experts(w, dtype):
  """`w` (NumPy or JAX SwiGLU leaves) bound as the ExpertWeights dispatchers take."""
  import jax.numpy as jnp  # noqa: PLC0415 (the rest of this module is NumPy only)
  from moejax.moe.experts import ExpertWeights, SwiGLUExperts  # noqa: PLC0415
  return ExpertWeights({k: jnp.asarray(v) for k, v in w.items()}, SwiGLUExperts(), dtype)
