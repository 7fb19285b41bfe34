"""Generate text from a run's checkpoint with the cached decoder (moejax/inference/decode.py).

    python tools/generate.py --run RUN_DIR --prompt TEXT [--max-new-tokens N]
        [--greedy | --temperature T [--top-k K] [--top-p P] [--seed S]]
        [--stop-tokens IDS|none] [--batch-size B] [--json OUT] [--trace OUT.npz]

The prompt comes from exactly one of --prompt TEXT, --prompts FILE.jsonl (one
{"prompt": "..."} or {"tokens": [ids]} per line) or --prompt-tokens 1,2,3.
Texts are tokenized with the run's data.tokenizer (its rules for one text,
without a trailing end-of-text token: Tokenizer.encode_prompt). Decoding stops
at --max-new-tokens or at a stop token: by default the checkpoint's eos_token_id (converted runs) or
the tokenizer's EOS; `--stop-tokens none` turns that off. Without --greedy
the next token is sampled from softmax(logits / T) (T = 1 by default) within
the top-k tokens and the top-p nucleus, with per-prompt keys from --seed.
Prints each continuation; --json writes a list with one object per prompt,
{"prompt_tokens": [...], "tokens": [generated ids], "text": ..., "stopped": bool};
--trace writes the routing of every generated token (a moejax.inference.trace
file: per MoE layer the chosen experts and their weights).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

DISPATCHES = ("dense", "dropless")


def _ids(text: str, arg: str) -> list[int]:
  try:
    out = [int(t) for t in text.split(",") if t.strip()]
  except ValueError:
    raise ValueError(f"{arg} {text!r} must be comma-separated integer token ids") from None
  return out


def read_prompts(path: str, tok) -> list[list[int]]:
  """Prompts of a JSONL file: {"prompt": text} or {"tokens": [ids]} per line."""
  allowed = 'allowed: one JSON object per line, {"prompt": "..."} or {"tokens": [ids]}'
  out = []
  with open(path, encoding="utf-8") as f:
    for n, line in enumerate(f, 1):
      if not line.strip():
        continue
      where = f"--prompts {path!r} line {n}"
      try:
        obj = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f"{where} is not JSON ({e.msg}); {allowed}") from None
      if not isinstance(obj, dict) or len({"prompt", "tokens"} & set(obj)) != 1:
        raise ValueError(f"{where} must hold exactly one of 'prompt' or 'tokens'; {allowed}")
      if "prompt" in obj:
        if not isinstance(obj["prompt"], str):
          raise ValueError(f"{where}: 'prompt' must be a string; {allowed}")
        out.append(tok.encode_prompt(obj["prompt"]).tolist())
      else:
        toks = obj["tokens"]
        if (not isinstance(toks, list)
            or not all(isinstance(t, int) and not isinstance(t, bool) for t in toks)):
          raise ValueError(f"{where}: 'tokens' must be a list of integer ids; {allowed}")
        out.append(toks)
  if not out:
    raise ValueError(f"--prompts {path!r} holds no prompt; {allowed}")
  return out


def default_stop_tokens(run_dir: str, tok) -> list[int]:
  """A converted checkpoint's eos_token_id (int or list), else the tokenizer's EOS."""
  path = os.path.join(run_dir, "hf_config.json")
  if os.path.exists(path):
    with open(path) as f:
      eos = json.load(f).get("eos_token_id")
    if eos is not None:
      return [int(e) for e in (eos if isinstance(eos, list) else [eos])]
  return [] if tok.eos_id is None else [int(tok.eos_id)]


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--run", required=True, help="run directory (config.json + checkpoints/)")
  p.add_argument("--step", type=int, default=-1, help="checkpoint step (-1: newest)")
  src = p.add_mutually_exclusive_group(required=True)
  src.add_argument("--prompt", help="one prompt text")
  src.add_argument("--prompts", metavar="FILE.jsonl", help='{"prompt": ...} or {"tokens": [...]} lines')
  src.add_argument("--prompt-tokens", metavar="IDS", help="one prompt as token ids, e.g. 1,2,3")
  p.add_argument("--max-new-tokens", type=int, default=64)
  p.add_argument("--greedy", action="store_true", help="argmax decoding")
  p.add_argument("--temperature", type=float, default=1.0)
  p.add_argument("--top-k", type=int, default=0, help="sample among the k likeliest (0: all)")
  p.add_argument("--top-p", type=float, default=1.0, help="nucleus mass in (0, 1] (1: all)")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--stop-tokens", default=None, metavar="IDS|none",
                 help="comma-separated stop ids (default: the checkpoint's EOS)")
  p.add_argument("--batch-size", type=int, default=8, help="prompts decoded together")
  p.add_argument("--dispatch", default=None, choices=DISPATCHES,
                 help="evaluate the experts with this dispatcher instead of the run's "
                      "moe.dispatch (same routing; needed for capacity-dispatch runs)")
  p.add_argument("--json", default=None, metavar="OUT", help="write the continuations here")
  p.add_argument("--trace", default=None, metavar="OUT.npz", help="write the routing trace")
  args = p.parse_args(argv)

  from moejax.inference import decode, sampling  # noqa: PLC0415
  from moejax.init.sources import load_run, run_config  # noqa: PLC0415
  from moejax.train import tokenizer as tok_lib  # noqa: PLC0415

  try:
    if not os.path.exists(os.path.join(args.run, "config.json")):
      raise ValueError(f"--run {args.run!r} is not a run directory (no config.json)")
    cfg = run_config(args.run)
    if args.dispatch:
      cfg.moe.dispatch = args.dispatch
    samp = sampling.Sampling(args.greedy, args.temperature, args.top_k, args.top_p)
    tok = tok_lib.get(cfg.data.get("tokenizer", tok_lib.BYTES))
    if args.prompt is not None:
      prompts = [tok.encode_prompt(args.prompt).tolist()]
    elif args.prompt_tokens is not None:
      prompts = [_ids(args.prompt_tokens, "--prompt-tokens")]
    else:
      prompts = read_prompts(args.prompts, tok)
    if args.stop_tokens is None:
      stop = default_stop_tokens(args.run, tok)
    elif args.stop_tokens.strip().lower() == "none":
      stop = []
    else:
      stop = _ids(args.stop_tokens, "--stop-tokens")
    params, collections, step = load_run(args.run, args.step)
    dec = decode.Decoder(cfg, {"params": params, **collections},
                         context=decode.max_context(cfg, args.run))
    gens, routing = dec.generate(prompts, max_new_tokens=args.max_new_tokens, sampling=samp,
                                 seed=args.seed, stop_tokens=stop, batch_size=args.batch_size,
                                 trace=args.trace is not None)
  except (ValueError, OSError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  rows = []
  for g in gens:
    body = g.tokens[:-1] if g.stopped else g.tokens
    rows.append({"prompt_tokens": g.prompt_tokens.tolist(), "tokens": g.tokens.tolist(),
                 "text": tok.decode(body), "stopped": g.stopped})
  for r in rows:
    print(json.dumps({"text": r["text"], "tokens": len(r["tokens"]), "stopped": r["stopped"]}))
  print(f"# step {step}, {len(rows)} prompt(s), {sum(len(r['tokens']) for r in rows)} tokens",
        file=sys.stderr)
  if args.json:
    with open(args.json, "w") as f:
      json.dump(rows, f, indent=1)
      f.write("\n")
  if args.trace:
    from moejax.inference import trace as trace_lib  # noqa: PLC0415
    trace_lib.save(args.trace, decode.to_trace(cfg, gens, routing))
  return 0


if __name__ == "__main__":
  sys.exit(main())
