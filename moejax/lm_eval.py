"""lm-evaluation-harness on a moejax run: registers the "moejax" model, then runs lm-eval.

    python -m moejax.lm_eval --model_args run=RUN_DIR --tasks TASK [--include_path DIR]
        [--batch_size B] [--output_path OUT] [--limit N] [any other lm-eval flag]

lm-eval finds models only in its own package, so this entry point imports
moejax.eval.harness (which registers `MoejaxLM` as "moejax"), adds
`--model moejax` when no --model is given, and passes every argument to
lm-eval's own command line unchanged: its flags, task YAMLs (--include_path)
and output files work as documented there. Needs the `lm-eval` package
(`pip install -e '.[eval]'`). docs/inference.md shows a task on local data.
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
  args = list(sys.argv[1:] if argv is None else argv)
  try:
    from lm_eval.__main__ import cli_evaluate  # noqa: PLC0415
  except ImportError:
    print("error: python -m moejax.lm_eval needs the lm-eval package: "
          "pip install -e '.[eval]' (or pip install lm-eval)", file=sys.stderr)
    return 2
  import moejax.eval.harness  # noqa: F401,PLC0415  (registers "moejax")

  if not any(a == "--model" or a.startswith("--model=") for a in args):
    args = ["--model", "moejax", *args]
  saved = sys.argv
  sys.argv = ["lm-eval", *args]
  try:
    cli_evaluate()
  except SystemExit as e:
    return int(e.code or 0) if not isinstance(e.code, str) else 2
  finally:
    sys.argv = saved
  return 0


if __name__ == "__main__":
  sys.exit(main())
