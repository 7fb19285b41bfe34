"""Loads a run directory's config.json as a config file (used to continue runs).

`python -m experiments --workdir DIR` without --config is rewritten to
`--config experiments/saved_config.py:DIR/config.json`, so `--config.key=value`
overrides apply to the saved config with the usual type checks. Keys added to
the schema after the run was saved take their defaults.
"""

import json

import ml_collections

from moejax.config import with_defaults


def get_config(path: str) -> ml_collections.ConfigDict:
  with open(path) as f:
    return ml_collections.ConfigDict(with_defaults(json.load(f)))
