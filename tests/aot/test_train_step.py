"""moejax/aot/train_step.py: the trainer's step compiled for TPU slices, lowered for GPUs."""

from __future__ import annotations

import pytest

from moejax.aot import train_step
from moejax.checks import ConfigError
from tests.aot.conftest import ep_config, needs_libtpu
from tests.conftest import tiny_config

F32 = 4


def expert_state_bytes(cfg) -> int:
  """Float32 SwiGLU expert weights of every layer plus their two AdamW moments."""
  d, f = cfg.model.d_model, cfg.moe.expert_hidden
  return cfg.model.num_layers * cfg.moe.num_experts * 3 * d * f * F32 * 3


@needs_libtpu
def test_expert_parallel_step_compiles_with_ragged_exchange_and_sharded_experts():
  ep = train_step.compile_for_tpu(ep_config(expert=4), "v5e:2x2", ragged=True)
  assert ep.status == "fits", ep.error
  assert ep.mesh == {"data": 1, "fsdp": 1, "expert": 4}
  assert ep.gmm_backend == "mosaic_tpu" and ep.mosaic_kernels > 0
  assert ep.ragged_exchanges > 0
  assert ep.required_bytes == (ep.argument_bytes + ep.output_bytes - ep.alias_bytes
                               + ep.temp_bytes + ep.code_bytes)
  assert 0 < ep.required_bytes < ep.hbm_bytes
  assert ep.alias_bytes > 0  # the donated state is updated in place
  assert ep.flops > 0 and ep.compile_s > 0 and ep.lower_s > 0
  # The same model data-parallel: every chip holds all experts and their moments.
  dp = train_step.compile_for_tpu(ep_config(expert=1), "v5e:2x2", ragged=True)
  assert dp.status == "fits", dp.error
  assert dp.mesh == {"data": 4, "fsdp": 1, "expert": 1}
  assert dp.model_flops == ep.model_flops
  assert dp.argument_bytes - ep.argument_bytes == pytest.approx(
      expert_state_bytes(ep_config()) * 3 / 4, rel=0.01)


@needs_libtpu
def test_padded_exchange_has_no_ragged_all_to_all():
  r = train_step.compile_for_tpu(ep_config(expert=4), "v5e:2x2", ragged=False)
  assert r.status == "fits", r.error
  assert r.ragged_exchanges == 0 and not r.ragged


@needs_libtpu
def test_a_step_too_large_for_the_chip_is_out_of_memory():
  cfg = ep_config(expert=1, batch_size=16, seq_len=8192)  # [16, 2, 8192, 8192] scores
  r = train_step.compile_for_tpu(cfg, "v5e:1x1")
  assert r.status == "out_of_memory" and not r.fits
  assert "RESOURCE_EXHAUSTED" in r.error
  assert r.required_bytes > r.hbm_bytes


@needs_libtpu
def test_a_mesh_that_does_not_fit_the_slice_is_a_config_error():
  with pytest.raises(ConfigError, match=r"parallel\.data=-1 is invalid.*does not divide the 4 available devices"):
    train_step.compile_for_tpu(ep_config(expert=8), "v5e:2x2")


def test_target_config_resolves_only_auto():
  cfg = tiny_config()
  assert train_step.target_config(cfg, "tpu").moe.gmm_backend == "mosaic_tpu"
  assert train_step.target_config(cfg, "gpu").moe.gmm_backend == "triton"
  assert cfg.moe.gmm_backend == "auto"  # a copy
  cfg.moe.gmm_backend = "xla"
  assert train_step.target_config(cfg, "tpu").moe.gmm_backend == "xla"
  with pytest.raises(ValueError, match=r"platform='cuda' is unknown; allowed: \['gpu', 'tpu'\]"):
    train_step.target_config(cfg, "cuda")


@pytest.mark.parametrize("backend,kernels", [("auto", True), ("xla", False)])
def test_gpu_lowering_has_triton_kernels_only_with_the_triton_backend(backend, kernels):
  cfg = tiny_config(gmm_backend=backend)
  g = train_step.lower_for_gpu(cfg)
  assert g.gmm_backend == ("triton" if backend == "auto" else backend)
  assert (g.triton_kernels > 0) == kernels
  assert g.text_bytes > 0
