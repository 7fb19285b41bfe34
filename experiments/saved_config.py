"""Loads a run directory's config.json as a config file (used to continue runs).

`python -m experiments --workdir DIR` without --config is rewritten to
`--config experiments/saved_config.py:DIR/config.json`, so `--config.key=value`
overrides apply to the saved config with the usual type checks. Keys added to
the schema after the run was saved take their defaults.
"""

import json

import ml_collections

from moejax.config import default_config


def _merge(base: dict, saved: dict) -> dict:
  out = dict(base)
  for k, v in saved.items():
    out[k] = _merge(base[k], v) if isinstance(v, dict) and isinstance(base.get(k), dict) else v
  return out


def get_config(path: str) -> ml_collections.ConfigDict:
  with open(path) as f:
    saved = json.load(f)
  base = json.loads(default_config().to_json_best_effort())
  return ml_collections.ConfigDict(_merge(base, saved))
