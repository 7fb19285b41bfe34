"""Chain-of-Experts: C routing rounds over one MoE layer's experts (Wang et al. 2025).

Wang et al. 2025, "Chain-of-Experts: Unlocking the Communication Power of
Mixture-of-Experts Models" (arXiv:2506.18945). With `moe.chain.rounds` C > 1
the MoE layer routes its input C times in sequence, each round with its own
router and the SAME experts (routed, shared and zero-computation experts):

  x_0 = x (the layer input), y_c = MoE_c(x_{c-1}), x_c = x_{c-1} + y_c,
  layer output sum_c y_c (= x_C - x_0).

The paper's update is this inner residual, x^(c) = sum_i g_{c,i} E_i(x^(c-1))
+ x^(c-1), and its layer output is x^(C) itself; the block's own residual
then adds the normed input x_0 to the residual stream a second time. moejax
returns x_C - x_0, so C = 1 is exactly the plain layer, and every round adds
its output to the residual stream once. A token costs C * k expert
applications (C times the shared experts): C rounds of k = 1 cost what one
round of k = 2 costs, as in the paper's CoE-2(K/2) comparisons
(moejax/model/counting.py counts C routers and C * k active experts).

Every router chains: round c's router is a full router of `moe.router`
(its own parameters, "moe_state" and statistics) named `router` for round 1
(a one-round layer's tree is the plain one) and `router_round{c}` after it;
a router with a carry (recurrent) passes it from round to round as from layer
to layer.

How the rounds' reports combine into the layer's (`combine_rounds`):
  losses                 every auxiliary loss (balancing, z-loss, a router's
                         own) is the mean over rounds, so its weight means
                         what it means for one round
  load, load_max_over_mean, load_cv
                         from the expert counts summed over all rounds
  experts_per_token      summed over rounds (C * k for a top-k router)
  other metrics          reduced over rounds as each declares (`Metric.reduce`:
                         the mean for entropy, top-1 probability, dropped and
                         skipped fractions and the routers' own fractions)
  state_stats            {router name: that round's stats}; moejax/moe/state.py
                         updates each round's router state from its own (a
                         router pooling over layers pools over rounds too)
  balance_counts         [C, choices]; the global-batch balancing loss of
                         round c uses row c of the global counts
The sown "routing" intermediates hold one entry per round, in round order
(the analyses, calibration and decoding traces read the first: round 1).

Config: moe.chain.rounds (a positive integer; 1 = the plain layer).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from moejax.checks import positive_int
from moejax.moe.metrics import Metric, load_metrics

ROUTER = "router"  # round 1's router: the plain layer's (moejax/layout.py ROUTER)
SUMMED = ("experts_per_token",)  # metrics summed over rounds


def rounds(cfg_moe) -> int:
  """C, the routing rounds of every MoE layer (1 without the `moe.chain` group)."""
  return int(cfg_moe.get("chain", {}).get("rounds", 1))


def router_name(c: int) -> str:
  """Name of round c's router (c = 0 is round 1: `router`)."""
  return ROUTER if c == 0 else f"{ROUTER}_round{c + 1}"


def router_names(cfg_moe) -> tuple[str, ...]:
  """The routers of one MoE layer, in round order."""
  return tuple(router_name(c) for c in range(rounds(cfg_moe)))


def check_config(cfg) -> None:
  """moe.chain.*: rounds is a positive integer (every router chains)."""
  positive_int(cfg, "moe.chain.rounds")


def combine_rounds(per_round: list[dict], counts_E: list[jax.Array],
                   schema: tuple[Metric, ...]) -> dict:
  """The layer's aux from each round's {losses, metrics, state_stats, balance_counts}.

  `counts_E` are each round's expert counts [E] (the load metrics' input);
  `schema` is the layer's metric schema (each metric's reduction).
  """
  reduce = {m.name: m for m in schema}
  stack = lambda vs: jnp.stack(vs)  # noqa: E731
  losses = {k: jnp.mean(stack([r["losses"][k] for r in per_round]), axis=0)
            for k in per_round[0]["losses"]}
  load = load_metrics(sum(counts_E[1:], counts_E[0]))
  metrics = {}
  for name in per_round[0]["metrics"]:
    values = [r["metrics"][name] for r in per_round]
    if name in load:
      metrics[name] = load[name]
    elif name in SUMMED:
      metrics[name] = jnp.sum(stack(values), axis=0)
    else:
      metrics[name] = reduce[name].apply(stack(values), axis=0)
  state = {}
  if any(r["state_stats"] for r in per_round):
    state = {router_name(c): r["state_stats"] for c, r in enumerate(per_round)}
  return {"losses": losses, "metrics": metrics, "state_stats": state,
          "balance_counts": stack([r["balance_counts"] for r in per_round])}
