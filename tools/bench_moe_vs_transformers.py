"""MoE layer forward+backward: moejax's dropless layer vs transformers' Mixtral sparse block.

  python tools/bench_moe_vs_transformers.py [--quick] [--repeats 5] [--warmup 2]
      [--impls eager,grouped_mm] [--shapes T,D,F,E,k;...]

Per shape (T tokens, model width D, expert width F, E experts, top-k), in
one process and one sitting: moejax's `MoELayer` (moe.dispatch=dropless,
moe.gmm_backend=auto, SwiGLU experts, softmax-top-k router) and transformers'
`MixtralSparseMoeBlock` (the same layer: router, top-k, renormalised
weights, SwiGLU experts) with each experts implementation in --impls (torch
CPU; `batched_mm` gathers one [D, F] weight copy per routed token, tens of GB at
these shapes, so it is not in the default --impls), both float32, both given the same router and expert weights (O(1)
router logits, so routing is spread as in a trained model) and the same
input. Each side computes the gradient of sum(y * c) for a fixed dense
cotangent c with respect to the input and every weight. After --warmup
untimed rounds the calls alternate round by round (tools/timing.py); the
medians of --repeats rounds are compared. Prints per shape each side's
median ms and moejax / the fastest transformers implementation (target
<= 1.0), plus max |y_moejax - y_transformers| / max |y| (both compute the same
function).
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402

from moejax.config import default_config  # noqa: E402
from moejax.moe import MoELayer  # noqa: E402
from timing import time_interleaved  # noqa: E402  (tools/, the script's dir)

SHAPES = [(4096, 256, 512, 8, 2), (8192, 512, 1024, 8, 2), (8192, 512, 256, 64, 8)]
QUICK_SHAPES = [(512, 64, 128, 8, 2)]
IMPLS = ("eager", "grouped_mm", "batched_mm")


def weights(shape, seed: int = 0) -> dict[str, np.ndarray]:
  """Router w_gate [D, E] (O(1) logits) and SwiGLU experts [E, D, F] / [E, F, D]."""
  _, d, f, e, _ = shape
  rng = np.random.default_rng(seed)
  n = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
  return {"w_router": n(d, e) * (2.0 / np.sqrt(d)), "w_gate": n(e, d, f) / np.sqrt(d),
          "w_up": n(e, d, f) / np.sqrt(d), "w_down": n(e, f, d) / np.sqrt(f)}


def moejax_fn(shape, w: dict, x: np.ndarray, c: np.ndarray):
  """Jitted grad of sum(layer(x) * c) w.r.t. (params, x), and the layer output."""
  _, _, f, e, k = shape
  moe = default_config().moe
  moe.num_experts, moe.top_k, moe.expert_hidden, moe.dispatch = e, k, f, "dropless"
  moe.topk.order, moe.topk.renormalize = "softmax_topk", True
  layer = MoELayer(ml_collections.FrozenConfigDict(moe), "float32")
  params = {"router": {"w_gate": jnp.asarray(w["w_router"])},
            "experts": {k_: jnp.asarray(w[k_]) for k_ in ("w_gate", "w_up", "w_down")}}
  shapes = jax.eval_shape(layer.init, jax.random.key(0), jnp.asarray(x))["params"]
  assert jax.tree.map(lambda a: a.shape, shapes) == jax.tree.map(lambda a: a.shape, params)
  cj = jnp.asarray(c)

  def loss(p, x):
    return jnp.sum(layer.apply({"params": p}, x)[0] * cj)

  grad = jax.jit(jax.grad(loss, argnums=(0, 1)))
  y = np.asarray(jax.jit(lambda p, x: layer.apply({"params": p}, x)[0])(params, jnp.asarray(x)))
  return grad, (params, jnp.asarray(x)), y


def transformers_fn(shape, w: dict, x: np.ndarray, c: np.ndarray, impl: str):
  """fwd+bwd of transformers' MixtralSparseMoeBlock with experts_implementation=impl."""
  import torch  # noqa: PLC0415
  import transformers  # noqa: PLC0415
  from transformers.models.mixtral import modeling_mixtral  # noqa: PLC0415

  _, d, f, e, k = shape
  cfg = transformers.AutoConfig.for_model(
      "mixtral", hidden_size=d, intermediate_size=f, num_local_experts=e,
      num_experts_per_tok=k, experts_implementation=impl)
  block = modeling_mixtral.MixtralSparseMoeBlock(cfg).float().train()
  block.jitter_noise = 0.0
  with torch.no_grad():
    block.gate.weight.copy_(torch.from_numpy(w["w_router"].T.copy()))
    ex = block.experts
    # transformers 5: gate_up_proj [E, 2F, D] (gate rows first), down_proj [E, D, F].
    gate_up = np.concatenate([w["w_gate"], w["w_up"]], axis=2).transpose(0, 2, 1)
    ex.gate_up_proj.copy_(torch.from_numpy(np.ascontiguousarray(gate_up)))
    ex.down_proj.copy_(torch.from_numpy(np.ascontiguousarray(w["w_down"].transpose(0, 2, 1))))
  xt = torch.from_numpy(x).requires_grad_(True)
  ct = torch.from_numpy(c)

  def step():
    block.zero_grad(set_to_none=True)
    xt.grad = None
    (block(xt) * ct).sum().backward()

  with torch.no_grad():
    y = block(xt).numpy()
  return step, y


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--quick", action="store_true", help="one tiny shape (a smoke run)")
  p.add_argument("--shapes", default=None, help="'T,D,F,E,k;...' instead of the defaults")
  p.add_argument("--impls", default="eager,grouped_mm",
                 help=f"transformers experts implementations, of {list(IMPLS)}")
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--warmup", type=int, default=2)
  args = p.parse_args(argv)
  impls = [s for s in args.impls.split(",") if s]
  for s in impls:
    if s not in IMPLS:
      p.error(f"--impls: {s!r} is not an experts implementation; allowed: {list(IMPLS)}")
  if args.shapes:
    try:
      shapes = [tuple(int(v) for v in s.split(",")) for s in args.shapes.split(";")]
    except ValueError:
      p.error(f"--shapes {args.shapes!r}: allowed 'T,D,F,E,k;...' with integers")
    if any(len(s) != 5 for s in shapes):
      p.error(f"--shapes {args.shapes!r}: every shape needs 5 integers T,D,F,E,k")
  else:
    shapes = QUICK_SHAPES if args.quick else SHAPES
  import torch  # noqa: PLC0415

  print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; jax {jax.__version__}, "
        f"{jax.devices()[0].platform}; float32 fwd+bwd")
  print("| T, D, F, E, k | moejax ms | " + " | ".join(f"transformers {i} ms" for i in impls)
        + " | moejax / best transformers | max |dy| / max |y| |")
  print("|---|---|" + "---|" * len(impls) + "---|---|")
  for shape in shapes:
    t, d = shape[0], shape[1]
    rng = np.random.default_rng(1)
    x = rng.standard_normal((1, t, d)).astype(np.float32)
    c = rng.standard_normal((1, t, d)).astype(np.float32)
    w = weights(shape)
    grad, jargs, y_m = moejax_fn(shape, w, x, c)
    fns = {"moejax": (grad, jargs)}
    diff = 0.0
    for impl in impls:
      step, y_t = transformers_fn(shape, w, x, c, impl)
      fns[impl] = (step, ())
      diff = max(diff, float(np.abs(y_m - y_t).max() / np.abs(y_t).max()))
    med = time_interleaved(fns, args.repeats, warmup=args.warmup, slow_s=60.0)
    best = min(med[i] for i in impls)
    print(f"| {', '.join(map(str, shape))} | {1e3 * med['moejax']:.1f} | "
          + " | ".join(f"{1e3 * med[i]:.1f}" for i in impls)
          + f" | {med['moejax'] / best:.2f}x | {diff:.1e} |", flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
