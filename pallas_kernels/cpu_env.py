"""Process setup that the CPU grouped matmul needs to run at its speed.

Why: XLA:CPU allocates every large result afresh, and glibc serves large
allocations with new mmap'd 4 KiB pages, so each step page-faults through
them. tgmm's [G, k, n] result is G times a dense matmul's (128 MB in float32
at G=64, k=512, n=1024): on the 2-core dev box its page faults alone took
about as long as the products (fresh 128 MB: ~60 ms of zero-filling, ~9 ms
with transparent huge pages). glibc's tunable `glibc.malloc.hugetlb=1` makes
malloc ask for transparent huge pages (madvise) on those mappings, which
removes most of the faults. Two more tunables keep the allocations under
32 MiB on malloc's heap and that heap from being trimmed
(`glibc.malloc.mmap_threshold=32 MiB`, `glibc.malloc.trim_threshold` huge):
with glibc's default dynamic threshold the same program ran in one of two
speeds, fixed for the life of a process (the small E=8 MoE layer, fwd+bwd:
61-66 ms in about half the processes, 70-75 ms in the rest; with the
tunables 10 of 10 processes ran at 60-66 ms). The price is that the heap
keeps its peak size. Tunables must be set before the process starts, so
entry points call `exec_with_hugepage_malloc()` first thing: the process
re-executes itself once with them set (same PID, same arguments).

Skipped (a no-op) when glibc.malloc.hugetlb is already set (so a user's
own choice wins, and the re-executed process does not loop); a user's own
value of either of the other two is kept. Also skipped when MOEJAX_HUGEPAGES=0,
when the C library is not glibc, or when the kernel has transparent huge
pages disabled.
"""

from __future__ import annotations

import os
import platform
import sys

TUNABLE = "glibc.malloc.hugetlb=1"
HEAP_TUNABLES = ("glibc.malloc.mmap_threshold=33554432",  # 32 MiB, glibc's maximum
                 "glibc.malloc.trim_threshold=17179869184")  # 16 GiB: never trim
THP_SETTING = "/sys/kernel/mm/transparent_hugepage/enabled"
OPT_OUT = "MOEJAX_HUGEPAGES"


def hugepage_env(environ: dict[str, str]) -> dict[str, str] | None:
  """The environment to re-execute with, or None when nothing is to be done."""
  if environ.get(OPT_OUT, "1") == "0":
    return None
  tunables = environ.get("GLIBC_TUNABLES", "")
  if "glibc.malloc.hugetlb" in tunables:
    return None
  if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
    return None
  try:
    with open(THP_SETTING) as f:
      if "[never]" in f.read():
        return None
  except OSError:
    return None
  own = [t for t in tunables.split(":") if t]
  names = {t.split("=")[0] for t in own}
  extra = [t for t in HEAP_TUNABLES if t.split("=")[0] not in names]
  return {**environ, "GLIBC_TUNABLES": ":".join(own + [TUNABLE] + extra)}


def exec_with_hugepage_malloc() -> None:
  """Re-executes this process with huge-page malloc (module docstring); returns if not needed.

  Call only from a script's `if __name__ == "__main__":` block, before JAX
  starts: it replaces the running program.
  """
  env = hugepage_env(dict(os.environ))
  if env is None:
    return
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, sys.orig_argv, env)
