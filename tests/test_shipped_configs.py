"""Every variant of the shipped variant registries validates and has finite counts."""

from __future__ import annotations

import math

import pytest

from configs import architectures, routers
from moejax.model import counting
from moejax.validation import validate


@pytest.mark.parametrize("name", sorted(architectures.VARIANTS))
def test_architecture_variants_validate(name):
  cfg = architectures.get_config(name)
  validate(cfg)
  assert cfg.name == f"arch-{name}"
  c = counting.param_counts(cfg)
  assert 0 < c["params_active"] <= c["params_total"]
  assert math.isfinite(counting.flops_per_token(cfg)) and counting.flops_per_token(cfg) > 0


@pytest.mark.parametrize("name", routers.ROUTERS + routers.BALANCING + routers.DYNAMICS)
def test_router_variants_validate(name):
  validate(routers.get_config(name))


def test_unknown_variant_is_named():
  with pytest.raises(ValueError, match="no-such"):
    architectures.get_config("no-such")
