"""A run saved before a config key existed still continues (the key takes its default)."""

import json

from experiments import saved_config
from moejax.config import config_changes, default_config
from tests.conftest import tiny_config


def _old_run_config(tmp_path):
  d = json.loads(tiny_config().to_json_best_effort())
  del d["parallel"], d["moe"]["z_loss_weight"]  # as if saved by an older moejax
  path = tmp_path / "config.json"
  path.write_text(json.dumps(d))
  return d, path


def test_missing_keys_take_defaults(tmp_path):
  d, path = _old_run_config(tmp_path)
  cfg = saved_config.get_config(str(path))
  assert cfg.parallel.to_dict() == default_config().parallel.to_dict()
  assert cfg.moe.z_loss_weight == default_config().moe.z_loss_weight
  assert cfg.model.d_model == d["model"]["d_model"]
  assert config_changes(d, cfg) == []


def test_new_key_set_away_from_its_default_is_a_change(tmp_path):
  d, path = _old_run_config(tmp_path)
  cfg = saved_config.get_config(str(path))
  cfg.moe.z_loss_weight = 2 * default_config().moe.z_loss_weight + 1
  assert config_changes(d, cfg) == ["moe.z_loss_weight"]
