"""In-process malloc setup done by `import pallas_kernels` (pallas_kernels/cpu_env.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from pallas_kernels import cpu_env

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ALL = {"M_ARENA_MAX", "M_MMAP_MAX", "M_TRIM_THRESHOLD", "M_TOP_PAD", "M_MMAP_THRESHOLD"}
glibc_only = pytest.mark.skipif(not cpu_env._is_glibc(), reason="needs glibc on Linux")


def run_plain(code: str, **env: str) -> dict:
  """Runs `code` in a fresh interpreter (no tunables set) and returns the JSON it prints last."""
  base = {k: v for k, v in os.environ.items()
          if k != "GLIBC_TUNABLES" and not k.startswith("MALLOC_") and
          not k.startswith("MOEJAX_HUGEPAGE")}
  base.update(PYTHONPATH=REPO, JAX_PLATFORMS="cpu", **env)
  out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=base, check=True,
                       capture_output=True, text=True)
  return json.loads(out.stdout.strip().splitlines()[-1])


@glibc_only
def test_settings_keep_what_the_user_set():
  assert set(cpu_env.malloc_settings({})) == ALL
  assert cpu_env.malloc_settings({"MOEJAX_HUGEPAGES": "0"}) == {}
  own = cpu_env.malloc_settings({"GLIBC_TUNABLES": "glibc.malloc.arena_max=4:glibc.malloc.hugetlb=1",
                                 "MALLOC_TOP_PAD_": "0"})
  assert set(own) == ALL - {"M_ARENA_MAX", "M_TOP_PAD"}


def test_heap_request_parses_sizes_and_caps_at_half_the_memory():
  assert cpu_env.heap_request({}, None) == 4 << 30
  assert cpu_env.heap_request({"MOEJAX_HUGEPAGE_HEAP": "512M"}, None) == 512 << 20
  assert cpu_env.heap_request({"MOEJAX_HUGEPAGE_HEAP": "3g"}, 16 << 30) == 3 << 30
  assert cpu_env.heap_request({"MOEJAX_HUGEPAGE_HEAP": "8G"}, 4 << 30) == 2 << 30
  assert cpu_env.heap_request({"MOEJAX_HUGEPAGE_HEAP": "0"}, None) == 0
  assert cpu_env.heap_request({"MOEJAX_HUGEPAGE_HEAP": str(3 << 20)}, None) == 2 << 20  # 2 MiB units
  for bad in ("lots", "1.5G", "-1", "G"):
    with pytest.raises(ValueError, match=rf"MOEJAX_HUGEPAGE_HEAP='{bad}' is invalid; allowed: "
                                         "a byte count"):
      cpu_env.heap_request({"MOEJAX_HUGEPAGE_HEAP": bad}, None)


PROBE = """
    import json, resource
    import pallas_kernels
    from pallas_kernels import cpu_env
    import jax, jax.numpy as jnp

    def huge_kb():
      for line in open("/proc/self/smaps_rollup"):
        if line.startswith("AnonHugePages:"):
          return int(line.split()[1])
      return 0

    f = jax.jit(lambda x: x * 2.0 + 1.0)   # a fresh 64 MiB result per call
    x = jnp.ones((16 << 20,), jnp.float32)
    for _ in range(3):
      f(x).block_until_ready()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(5):
      f(x).block_until_ready()
    faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 5
    print(json.dumps({"applied": cpu_env.applied, "heap": cpu_env.heap_reserved,
                      "faults": faults, "huge_kb": huge_kb()}))
"""


@glibc_only
def test_a_plain_process_reuses_large_results_without_page_faults():
  on = run_plain(PROBE)
  off = run_plain(PROBE, MOEJAX_HUGEPAGES="0")
  assert set(on["applied"]) == ALL and off["applied"] == {} and off["heap"] == 0
  # 64 MiB of fresh 4 KiB pages is 16384 faults; reused heap blocks take none.
  assert on["faults"] < 100 < 1000 < off["faults"]


@glibc_only
def test_the_heap_gets_huge_pages_unless_turned_off():
  if not cpu_env._thp_possible():
    pytest.skip("transparent huge pages are off on this machine")
  on = run_plain(PROBE)
  small = run_plain(PROBE, MOEJAX_HUGEPAGE_HEAP="0")
  assert on["heap"] >= 1 << 30 and small["heap"] == 0
  assert on["huge_kb"] >= 64 << 10  # at least the 64 MiB results and input
  assert on["huge_kb"] > small["huge_kb"] + (64 << 10)


@glibc_only
def test_importing_after_jax_started_warns():
  out = run_plain("""
      import json, warnings
      import jax, jax.numpy as jnp
      jnp.ones(3).block_until_ready()
      with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        import pallas_kernels
      print(json.dumps([str(m.message) for m in w]))
  """)
  assert len(out) == 1 and "imported after JAX's backend started" in out[0]


@glibc_only
def test_importing_moejax_applies_the_settings_without_loading_jax():
  out = run_plain("""
      import json, sys
      import moejax
      from pallas_kernels import cpu_env
      print(json.dumps({"applied": cpu_env.applied, "jax": "jax" in sys.modules}))
  """)
  assert set(out["applied"]) == ALL and not out["jax"]
